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
