//! The audit trail's storage: [`AuditStore`], append-only per merchant. Implemented for Redis
//! (`redis_audit.rs`: one stream per merchant, trimmed with `MINID`) and for the embedded
//! store (`embedded_audit.rs`: a redb table keyed by merchant, time and sequence). Layout in
//! `docs/storage.md`.

use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;
use crate::domain::audit::{AuditEvent, AuditEventId, NewAuditEvent};
use crate::domain::token::MerchantId;

#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends `event` to its merchant's trail and drops that merchant's events older than
    /// `retention`. Returns the id given to the event. Never overwrites: there is no duplicate
    /// case (an id is unique per merchant).
    async fn append(
        &self,
        event: &NewAuditEvent,
        retention: Duration,
    ) -> Result<AuditEventId, StoreError>;

    /// Up to `limit` events of `merchant`, newest first, strictly older than `before`. A
    /// merchant without events gives an empty list.
    async fn list(
        &self,
        merchant: &MerchantId,
        before: Option<AuditEventId>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, StoreError>;
}
