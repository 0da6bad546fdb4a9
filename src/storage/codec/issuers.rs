//! Encodings of issuers and issuer operations shared by the Redis and embedded adapters, so
//! both backends read and write the same bytes.

use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::domain::ports::StoreError;

pub(crate) fn encode<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|_| StoreError::Corrupt(format!("{what} not encodable")))
}

/// serde's message can quote a value; only the error's kind and position are kept.
pub(crate) fn decode<T: DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| {
        StoreError::Corrupt(format!(
            "{what} is not valid JSON ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

/// Unix ms of `at` (0 before the epoch): the score of the worker's due list.
pub(crate) fn unix_ms(at: OffsetDateTime) -> u64 {
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}
