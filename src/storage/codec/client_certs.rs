//! Encodings of the client certs records shared by the Redis and embedded adapters, so both
//! backends read and write the same bytes.

use crate::domain::client_certs::ClientCertPolicy;
use crate::domain::ports::StoreError;
use crate::domain::token::MerchantId;

pub(crate) fn encode(p: &ClientCertPolicy) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(p)
        .map_err(|_| StoreError::Corrupt("client certificate policy not encodable".into()))
}

pub(crate) fn decode(b: &[u8]) -> Result<ClientCertPolicy, StoreError> {
    serde_json::from_slice(b).map_err(|e| {
        StoreError::Corrupt(format!(
            "client certificate policy is not valid JSON ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

/// The tenant an index entry names: a merchant, or an issuer's tenant id (issuers bind
/// certificates under it, `domain::client_certs`).
pub(crate) fn parse_merchant(s: &str) -> Result<MerchantId, StoreError> {
    MerchantId::parse_tenant(s)
        .ok_or_else(|| StoreError::Corrupt("client certificate index names a bad tenant".into()))
}
