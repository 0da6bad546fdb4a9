//! Encodings of the apikeys records shared by the Redis and embedded adapters, so both
//! backends read and write the same bytes.

use crate::domain::apikeys::ApiKeyRecord;
use crate::domain::ports::StoreError;
use time::OffsetDateTime;

pub(crate) fn encode(rec: &ApiKeyRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(rec).map_err(|_| StoreError::Corrupt("API key record not encodable".into()))
}

pub(crate) fn decode(b: &[u8]) -> Result<ApiKeyRecord, StoreError> {
    serde_json::from_slice(b).map_err(|e| {
        StoreError::Corrupt(format!(
            "API key record is not valid JSON ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

/// Unix ms of `at` (0 before the epoch).
pub(crate) fn unix_ms(at: OffsetDateTime) -> u64 {
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

pub(crate) fn from_unix_ms(ms: u64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

/// `rec` revoked at `at`, unless it already was.
pub(crate) fn revoked(mut rec: ApiKeyRecord, at: OffsetDateTime) -> ApiKeyRecord {
    if rec.revoked_at.is_none() {
        rec.revoked_at = Some(at);
    }
    rec
}
