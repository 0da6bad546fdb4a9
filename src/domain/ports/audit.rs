//! The audit trail's storage: [`AuditStore`], append-only per tenant (a merchant or an issuer,
//! [`AuditTenant`]). Implemented for Redis (`redis/audit.rs`: one stream per tenant, trimmed
//! with `MINID`) and for the embedded store (`embedded/audit.rs`: a redb table keyed by tenant
//! id, time and sequence). Layout in `docs/storage.md`.

use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;
use crate::domain::audit::{AuditEvent, AuditEventId, AuditTenant, NewAuditEvent};

#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends `event` to its tenant's trail and drops that tenant's events older than
    /// `retention`. Returns the id given to the event. Never overwrites: there is no duplicate
    /// case (an id is unique per tenant).
    async fn append(
        &self,
        event: &NewAuditEvent,
        retention: Duration,
    ) -> Result<AuditEventId, StoreError>;

    /// Up to `limit` events of `tenant`, newest first, strictly older than `before`. A
    /// tenant without events gives an empty list.
    async fn list(
        &self,
        tenant: &AuditTenant,
        before: Option<AuditEventId>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, StoreError>;
}
