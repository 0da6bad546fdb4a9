//! The audit trail on the embedded store: one redb table keyed by (tenant id, unix ms, sequence
//! within that ms) holding the event JSON; the tenant id is the merchant's (`mer_...`, as it
//! always was) or the issuer's (`iss_...`). An append finds the tenant's newest key in the same
//! write transaction, so ids only grow even if the clock steps back, and removes up to
//! [`TRIM_BATCH`] of the tenant's events past retention.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::{EmbeddedStore, begin_write};
use crate::domain::audit::{AuditEvent, AuditEventId, AuditTenant, NewAuditEvent};
use crate::domain::ports::StoreError;
use crate::domain::ports::audit::AuditStore;
use crate::storage::codec::audit::{TRIM_BATCH, cutoff_ms, decode, encode};

/// (tenant id, unix ms, sequence) -> event JSON.
const AUDIT: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("audit");

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[async_trait]
impl AuditStore for EmbeddedStore {
    async fn append(
        &self,
        event: &NewAuditEvent,
        retention: Duration,
    ) -> Result<AuditEventId, StoreError> {
        let json = encode(event)?;
        let m = event.tenant.as_str().to_owned();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            let id = {
                let mut t = txn.open_table(AUDIT)?;
                let now = now_ms();
                let last = t
                    .range((m.as_str(), 0, 0)..=(m.as_str(), u64::MAX, u64::MAX))?
                    .next_back()
                    .transpose()?
                    .map(|(k, _)| {
                        let (_, ms, seq) = k.value();
                        (ms, seq)
                    });
                let id = match last {
                    Some((ms, seq)) if ms >= now => AuditEventId {
                        ms,
                        seq: seq.saturating_add(1),
                    },
                    _ => AuditEventId { ms: now, seq: 0 },
                };
                t.insert((m.as_str(), id.ms, id.seq), json.as_slice())?;
                let cutoff = cutoff_ms(now, retention);
                let mut old = Vec::new();
                for entry in t
                    .range((m.as_str(), 0, 0)..(m.as_str(), cutoff, 0))?
                    .take(TRIM_BATCH)
                {
                    let (k, _) = entry?;
                    let (_, ms, seq) = k.value();
                    old.push((ms, seq));
                }
                for (ms, seq) in old {
                    t.remove((m.as_str(), ms, seq))?;
                }
                id
            };
            txn.commit()?;
            Ok(id)
        })
        .await
    }

    async fn list(
        &self,
        tenant: &AuditTenant,
        before: Option<AuditEventId>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let m = tenant.as_str().to_owned();
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let t = match txn.open_table(AUDIT) {
                Ok(t) => t,
                // No event was ever appended: the table is made on first use.
                Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let start = (m.as_str(), 0, 0);
            let range = match before {
                Some(b) => t.range(start..(m.as_str(), b.ms, b.seq))?,
                None => t.range(start..=(m.as_str(), u64::MAX, u64::MAX))?,
            };
            let mut out = Vec::new();
            for entry in range.rev().take(limit) {
                let (k, v) = entry?;
                let (_, ms, seq) = k.value();
                out.push(AuditEvent {
                    id: AuditEventId { ms, seq },
                    event: decode(v.value())?,
                });
            }
            Ok(out)
        })
        .await
    }
}
