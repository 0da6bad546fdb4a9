//! Merchants (tenants) and their API keys.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::token::MerchantId;

/// A merchant onboarded by the PSP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merchant {
    pub id: MerchantId,
    pub name: String,
    /// The merchant's id at D1, once onboarded there.
    pub d1_merchant_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A freshly generated API key: shown to the caller once, then only its hash is kept.
pub struct NewApiKey {
    pub secret: Zeroizing<String>,
    pub hash: ApiKeyHash,
}

impl fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NewApiKey(hash={})", self.hash.0)
    }
}

/// SHA-256 of an API key. Keys carry 256 random bits, so a fast hash is enough: there is
/// nothing to brute-force, unlike passwords.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiKeyHash(pub String);

/// Prefix that makes keys recognisable to secret scanners.
pub const API_KEY_PREFIX: &str = "tgk_";

impl NewApiKey {
    pub fn generate() -> NewApiKey {
        let mut raw = Zeroizing::new([0u8; 32]);
        rand::fill(&mut raw[..]);
        let secret = Zeroizing::new(format!(
            "{API_KEY_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(&raw[..])
        ));
        let hash = ApiKeyHash::of(&secret);
        NewApiKey { secret, hash }
    }
}

impl ApiKeyHash {
    pub fn of(key: &str) -> ApiKeyHash {
        // Every authenticated request hashes its key: the faster hex of src/crypto.
        ApiKeyHash(crate::crypto::hex_lower(&Sha256::digest(key.as_bytes())))
    }
}
