//! The audit trail on Redis: one stream per tenant, under the tenant's hash tag:
//! `P:{m:M}:audit` for a merchant (the key it always had), `P:{i:I}:audit` for an issuer (the
//! slot of its operations). An append is one `XADD ... MINID <cutoff> *`: the entry id (server time in ms and a
//! sequence) becomes the event id, and the merchant's entries older than retention are removed
//! by the same command. Reading is `XREVRANGE` from the cursor (exclusive) downwards.
//!
//! Trimming is exact, not `MINID ~`: the approximate form only drops whole stream nodes (100
//! entries each by default) and never the node holding the newest entry, so a merchant with
//! fewer events than a node kept all of them past retention. Exact trimming costs in proportion
//! to the entries it removes, which is about one per append once a trail is at its steady size.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::RedisStore;
use crate::domain::audit::{AuditEvent, AuditEventId, AuditTenant, NewAuditEvent};
use crate::domain::ports::StoreError;
use crate::domain::ports::audit::AuditStore;
use crate::storage::codec::audit::{cutoff_ms, decode, encode};

/// The single field of a stream entry, holding the event JSON.
const FIELD: &str = "e";

fn stream_key(store: &RedisStore, t: &AuditTenant) -> String {
    match t {
        AuditTenant::Merchant(m) => format!("{}audit", store.merchant_key_start(m)),
        AuditTenant::Issuer(i) => format!("{}audit", store.issuer_key_start(i)),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A stream entry id `<ms>-<seq>` as an event id.
fn parse_entry_id(s: &str) -> Result<AuditEventId, StoreError> {
    AuditEventId::parse(&format!("aud_{s}"))
        .ok_or_else(|| StoreError::Corrupt("audit stream entry id is malformed".into()))
}

#[async_trait]
impl AuditStore for RedisStore {
    async fn append(
        &self,
        event: &NewAuditEvent,
        retention: Duration,
    ) -> Result<AuditEventId, StoreError> {
        let json = encode(event)?;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream_key(self, &event.tenant))
            .arg("MINID")
            .arg(cutoff_ms(now_ms(), retention))
            .arg("*")
            .arg(FIELD)
            .arg(json);
        let id: String = self.query(cmd).await?;
        parse_entry_id(&id)
    }

    async fn list(
        &self,
        tenant: &AuditTenant,
        before: Option<AuditEventId>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let end = match before {
            // Nothing precedes the smallest id (and Redis refuses `(0-0` as an end: an error,
            // not an empty page, for a cursor a client can send).
            Some(AuditEventId { ms: 0, seq: 0 }) => return Ok(Vec::new()),
            Some(b) => format!("({}-{}", b.ms, b.seq),
            None => "+".to_owned(),
        };
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(stream_key(self, tenant))
            .arg(end)
            .arg("-")
            .arg("COUNT")
            .arg(limit);
        let entries: Vec<(String, Vec<Vec<u8>>)> = self.query(cmd).await?;
        let mut out = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let json = fields
                .chunks(2)
                .find(|kv| kv.first().map(Vec::as_slice) == Some(FIELD.as_bytes()))
                .and_then(|kv| kv.get(1))
                .ok_or_else(|| StoreError::Corrupt("audit stream entry has no event".into()))?;
            out.push(AuditEvent {
                id: parse_entry_id(&id)?,
                event: decode(json)?,
            });
        }
        Ok(out)
    }
}
