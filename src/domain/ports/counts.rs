//! Token counts by status, kept by the stores themselves: each merchant's counts change in the
//! same atomic step as the token write that changes them (the Redis token scripts, the redb
//! write transaction), so they never drift from the records, whichever instance or code path
//! writes. Reading them costs one small read per merchant, never a scan of the tokens: the
//! `tokengate_tokens` gauge is refreshed from them periodically (`domain::token_counts`).
//!
//! Records written before the counts existed are not in them until a one-time **backfill**
//! (leased, in bounded batches, resumable) has counted each of them once; until it has
//! completed, [`TokenCounts::complete`] is false and the totals may be too low. Layout and the
//! exact rules: `docs/storage.md`, "Token counts".

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::StoreError;

/// The status labels counts are kept under: the known statuses, and `OTHER` for whatever else
/// D1 sends (so a new upstream status cannot grow the counts without bound). The same labels as
/// the metrics (`TokenStatus::label`).
pub const COUNT_LABELS: [&str; 7] = [
    "PENDING",
    "ACTIVE",
    "SUSPENDED",
    "INACTIVE",
    "EXPIRED",
    "DELETED",
    "OTHER",
];

/// The label a stored status is counted under.
pub fn count_label(status: &str) -> &'static str {
    COUNT_LABELS[..6]
        .iter()
        .find(|l| **l == status)
        .copied()
        .unwrap_or("OTHER")
}

/// Tokens per status label, summed over every merchant.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TokenCounts {
    /// Every label of [`COUNT_LABELS`], zero included.
    pub by_status: BTreeMap<&'static str, u64>,
    /// Whether the backfill has counted every record written before the counts existed. While
    /// false, the totals leave those records out.
    pub complete: bool,
}

impl TokenCounts {
    /// All labels at zero.
    pub fn zero(complete: bool) -> TokenCounts {
        TokenCounts {
            by_status: COUNT_LABELS.iter().map(|l| (*l, 0)).collect(),
            complete,
        }
    }

    /// Adds `n` (a stored count; negative only through tampering, then ignored) under the label
    /// of `status`.
    pub fn add(&mut self, status: &str, n: i64) {
        if let Ok(n) = u64::try_from(n) {
            *self.by_status.entry(count_label(status)).or_insert(0) += n;
        }
    }
}

/// Name of the backfill job (its lease and saved progress, `LifecycleStore` job state).
pub const BACKFILL_JOB: &str = "token-counts-backfill";

#[async_trait]
pub trait TokenCountStore: Send + Sync + 'static {
    /// The counts of every merchant, summed. One read per merchant (Redis: `HGETALL` of its
    /// counts hash; redb: one table walk of a few rows per merchant), no token is read.
    async fn token_counts(&self) -> Result<TokenCounts, StoreError>;

    /// One bounded step (at most about `batch` records) of the one-time backfill that counts
    /// records written before the counts existed. `Ok(true)` once it is complete (then it does
    /// nothing). Safe to run on several instances at once (a record is counted at most once),
    /// though callers hold the [`BACKFILL_JOB`] lease to avoid the wasted work; progress is kept
    /// in the store, so a step continues where the last one, on any instance, stopped.
    async fn backfill_token_counts(&self, batch: usize) -> Result<bool, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(count_label("ACTIVE"), "ACTIVE");
        assert_eq!(count_label("DELETED"), "DELETED");
        assert_eq!(count_label("FROZEN"), "OTHER");
        assert_eq!(count_label("OTHER"), "OTHER");
        let mut c = TokenCounts::zero(true);
        c.add("FROZEN", 2);
        c.add("ACTIVE", 3);
        c.add("ACTIVE", -1);
        assert_eq!(c.by_status["OTHER"], 2);
        assert_eq!(c.by_status["ACTIVE"], 3);
        assert_eq!(c.by_status.len(), COUNT_LABELS.len());
    }
}
