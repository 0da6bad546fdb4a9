//! The issuer (tenant) records: [`IssuerStore`]. Implemented by `storage/redis/issuers.rs` and
//! `storage/embedded/issuers.rs`; layout in `docs/storage.md`, "Issuers".

use async_trait::async_trait;

use super::StoreError;
use crate::domain::issuer::{Issuer, IssuerId};

#[async_trait]
pub trait IssuerStore: Send + Sync + 'static {
    /// Stores an issuer and indexes its D1 issuer id, unless another issuer already has that
    /// D1 id: then `Ok(false)` and nothing is written (two tenants must never receive each
    /// other's D1 notifications).
    async fn insert_issuer(&self, issuer: &Issuer) -> Result<bool, StoreError>;

    async fn get_issuer(&self, id: &IssuerId) -> Result<Option<Issuer>, StoreError>;

    /// The issuer onboarded under D1's issuer id `d1_issuer_id`.
    async fn issuer_by_d1_id(&self, d1_issuer_id: &str) -> Result<Option<Issuer>, StoreError>;

    /// Every issuer, in no particular order (issuers are few: the operator onboards them).
    async fn list_issuers(&self) -> Result<Vec<Issuer>, StoreError>;
}
