//! Encodings of the audit records shared by the Redis and embedded adapters, so both
//! backends read and write the same bytes.

use crate::domain::audit::NewAuditEvent;
use crate::domain::ports::StoreError;
use std::time::Duration;

/// Events of one merchant removed per append at most (embedded store), so the cost of
/// enforcing retention per write stays bounded.
pub const TRIM_BATCH: usize = 64;

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
