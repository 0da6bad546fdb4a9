//! API key records: [`ApiKeyStore`], beside the core store's hash -> merchant index (which holds
//! the keys issued before records existed). Implemented for Redis (`redis_apikeys.rs`) and the
//! embedded store (`embedded_apikeys.rs`); layout in `docs/storage.md`.

use async_trait::async_trait;
use time::OffsetDateTime;

use super::StoreError;
use crate::domain::apikeys::ApiKeyRecord;
use crate::domain::merchant::ApiKeyHash;
use crate::domain::token::MerchantId;

#[async_trait]
pub trait ApiKeyStore: Send + Sync + 'static {
    /// Stores a key record and indexes it by the key's hash, unless the merchant already has a
    /// record with that id: then `Ok(false)` and nothing is written (a legacy key migrated by
    /// two requests at once, or after its revocation, keeps the first record).
    async fn insert_key(&self, rec: &ApiKeyRecord, hash: &ApiKeyHash) -> Result<bool, StoreError>;

    /// The record of the key with this hash; `None` for a key without a record (unknown, or
    /// issued before records existed).
    async fn key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError>;

    /// The merchant's key records with `last_used_at` filled in, in no particular order.
    async fn list_keys(&self, merchant: &MerchantId) -> Result<Vec<ApiKeyRecord>, StoreError>;

    /// Marks a key revoked (keeping an earlier revocation time); `None` when the merchant has no
    /// key with this id.
    async fn revoke_key(
        &self,
        merchant: &MerchantId,
        id: &str,
        at: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, StoreError>;

    /// Records that a key was used at `at`. Best-effort, last write wins.
    async fn touch_key(
        &self,
        merchant: &MerchantId,
        id: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;
}

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
