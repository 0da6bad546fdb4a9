//! The `tokengate_tokens{status}` gauge from the store's own counts (`storage::counts`): a
//! background task reads the summed per-merchant counts every `metrics.token_counts_interval_ms`
//! (15 s by default) and sets the gauge, so a scrape only reads the gauge and the store is read
//! once per interval whatever the scrape rate. Every instance reports the same absolute numbers
//! (aggregate with `max`, not `sum`).
//!
//! The same task drives the one-time backfill that counts records written before the counts
//! existed, in bounded batches under a store lease (one instance at a time; progress is kept
//! in the store, so another instance continues if the holder stops). Until it completes,
//! `tokengate_token_counts_complete` is 0 and the gauge leaves those records out.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::ports::counts::{BACKFILL_JOB, TokenCountStore};
use crate::domain::ports::lifecycle::LifecycleStore;

/// Records counted per backfill step: one bounded store round per step (a scan page plus one
/// script per record on Redis, one write transaction on redb).
const BACKFILL_BATCH: usize = 500;
/// Pause between backfill steps while one is needed: fast enough to count a million records in
/// a few minutes, slow enough to leave the store to the API traffic.
const BACKFILL_PAUSE: Duration = Duration::from_millis(200);
/// The backfill lease; renewed on every step, so it only expires when its holder stopped.
const BACKFILL_LEASE: Duration = Duration::from_secs(30);

pub struct TokenCountReporter {
    counts: Arc<dyn TokenCountStore>,
    leases: Arc<dyn LifecycleStore>,
    interval: Duration,
    holder: String,
}

impl TokenCountReporter {
    pub fn new(
        counts: Arc<dyn TokenCountStore>,
        leases: Arc<dyn LifecycleStore>,
        interval: Duration,
    ) -> TokenCountReporter {
        let mut id = [0u8; 8];
        rand::fill(&mut id);
        TokenCountReporter {
            counts,
            leases,
            interval,
            holder: hex::encode(id),
        }
    }

    /// Reports at once, then every interval, until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut complete = self.report().await.unwrap_or(false);
        let mut next_report = tokio::time::Instant::now() + self.interval;
        loop {
            // While the backfill is incomplete, wake up often to step it.
            let wake = if complete {
                next_report
            } else {
                next_report.min(tokio::time::Instant::now() + BACKFILL_PAUSE)
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            if !complete && self.backfill_step().await {
                complete = true;
                // Report the complete numbers now rather than at the next interval.
                next_report = tokio::time::Instant::now();
            }
            if tokio::time::Instant::now() >= next_report {
                if let Some(c) = self.report().await {
                    complete = complete || c;
                }
                next_report = tokio::time::Instant::now() + self.interval;
            }
        }
        let _ = self.leases.release_lease(BACKFILL_JOB, &self.holder).await;
    }

    /// Reads the counts and sets the gauges; `Some(complete)` on success.
    async fn report(&self) -> Option<bool> {
        match self.counts.token_counts().await {
            Ok(c) => {
                crate::observability::set_token_counts(&c.by_status, c.complete);
                Some(c.complete)
            }
            Err(e) => {
                // The gauge keeps its last value; the next interval tries again.
                tracing::warn!(error = %e, "token counts unavailable");
                None
            }
        }
    }

    /// One backfill step if this instance holds (or takes) the lease; true once complete.
    async fn backfill_step(&self) -> bool {
        match self
            .leases
            .acquire_lease(BACKFILL_JOB, &self.holder, BACKFILL_LEASE)
            .await
        {
            Ok(true) => {}
            Ok(false) => return false, // another instance is counting
            Err(e) => {
                tracing::warn!(error = %e, "token counts backfill: lease unavailable");
                return false;
            }
        }
        match self.counts.backfill_token_counts(BACKFILL_BATCH).await {
            Ok(true) => {
                tracing::info!("token counts backfill complete");
                let _ = self.leases.release_lease(BACKFILL_JOB, &self.holder).await;
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(error = %e, "token counts backfill step failed; will retry");
                false
            }
        }
    }
}
