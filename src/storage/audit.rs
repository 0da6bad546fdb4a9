//! The audit trail's storage: [`AuditStore`], append-only per merchant. Implemented for Redis
//! (`redis_audit.rs`: one stream per merchant, trimmed with `MINID`) and for the embedded
//! store (`embedded_audit.rs`: a redb table keyed by merchant, time and sequence). Layout in
//! `docs/storage.md`.

use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;
use crate::domain::audit::{AuditEvent, AuditEventId, NewAuditEvent};
use crate::domain::token::MerchantId;

/// Events of one merchant removed per append at most (embedded store), so the cost of
/// enforcing retention per write stays bounded.
pub const TRIM_BATCH: usize = 64;

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

/// Unix milliseconds of `now - retention` (0 when that precedes the epoch).
pub(crate) fn cutoff_ms(now_ms: u64, retention: Duration) -> u64 {
    now_ms.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX))
}

/// serde_json messages can quote values; keep only the kind and position.
pub(crate) fn decode(b: &[u8]) -> Result<NewAuditEvent, StoreError> {
    serde_json::from_slice(b).map_err(|e| {
        StoreError::Corrupt(format!(
            "audit event is not valid JSON ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

pub(crate) fn encode(e: &NewAuditEvent) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(e).map_err(|_| StoreError::Corrupt("audit event not encodable".into()))
}
