//! Reconciliation: a background job that asks D1 about tokens we have not heard about, so a lost
//! notification (D1 gave up redelivering, we were down, an event was dropped upstream) is
//! repaired rather than leaving a token in the wrong state for ever.
//!
//! # The schedule
//!
//! Every live token has a "check at" time on a schedule ([`LifecycleStore::schedule_check`]):
//! `PENDING` tokens `reconcile.pending_grace_s` after they were last touched, other tokens
//! `reconcile.stale_after_s` after we last heard about them. Creating a token, applying an event
//! and each check push it forward; `DELETED` takes the token off. Each tick takes at most
//! `reconcile.batch` due tokens, asks D1 (`get_token`, or `find_token_by_request` for a `PENDING`
//! token whose D1 id we never learnt) and applies the answer through the same path as
//! notifications ([`Lifecycle::apply_observation`]: stale check, state machine, compare-and-set).
//!
//! # Consistency trade-off
//!
//! The schedule is maintained **best-effort, outside the token's own atomic write**: on Redis
//! it is one sorted set for the deployment (a Cluster slot of its own), so it cannot share a
//! transaction with a merchant's token keys. A crash between the two writes, or a failed
//! schedule write (logged), leaves the schedule behind the token:
//! - a token missing from it is not reconciled until its next event or API change puts it back;
//! - an entry for a token that changed meanwhile is harmless: the check re-reads the token and
//!   either finds nothing to do or reschedules it.
//!
//! Tokens created while reconciliation was off (or before it existed) are not on the schedule.
//! Reconciliation is a safety net behind D1's redelivery, not the primary path.
//!
//! Clocks: a repair is stamped (`last_event_at`) with our clock, read before asking D1; events
//! carry D1's. If D1's clock runs behind ours by `s`, an event D1 stamps within `s` after a
//! repair looks older and is ignored, until the next check of that token repairs it again. Keep
//! both sides NTP-synchronised; the window is the skew, not the interval.
//!
//! Capacity: at most `batch` D1 reads per `interval`, i.e. 1.7 million a day with the defaults
//! (100 per 5 s). Size them so that covers the live tokens once per `stale_after`; when it does
//! not, the earliest-due tokens still go first and the rest wait, D1 is never flooded.
//!
//! # One instance at a time
//!
//! A tick runs under a lease in the store (`reconcile`, `reconcile.lease_ms`), extended by the
//! holder on every tick and released on shutdown, so with several instances one does the work
//! and another takes over within the lease time if it dies. A tick stops starting new checks
//! after half the lease time, so it never outlives its lease.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use time::OffsetDateTime;
use tokio::sync::watch;

use super::error::{DomainError, ProviderError};
use super::lifecycle::{Lifecycle, Observed};
use super::provider::NetworkTokenProvider;
use super::schedule::{Schedule, unix_ms};
use super::token::{MerchantId, TokenId, TokenStatus};
use crate::domain::ports::lifecycle::LifecycleStore;

/// Name of the lease a tick runs under.
pub const LEASE_NAME: &str = "reconcile";
/// Longest wait before retrying a token whose check failed.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// How often and how much.
#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    pub interval: Duration,
    pub batch: usize,
    pub lease_ttl: Duration,
}

/// What one tick did (for logs and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// Whether this instance held the lease (otherwise nothing else was done).
    pub leader: bool,
    pub checked: usize,
    pub repaired: usize,
    pub failed: usize,
}

/// The background job; see the module docs.
pub struct Reconciler {
    lifecycle: Lifecycle,
    store: Arc<dyn LifecycleStore>,
    schedule: Schedule,
    provider: Arc<dyn NetworkTokenProvider>,
    settings: ReconcileSettings,
    /// This instance's lease holder id.
    holder: String,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("settings", &self.settings)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

/// What a single check found.
enum Checked {
    Observed(Observed),
    /// D1 does not know the token (or the request): left as it is, checked again later.
    NotAtProvider,
    /// Nothing to reconcile (gone, deleted, never sent to D1).
    Skipped,
}

impl Reconciler {
    pub fn new(
        lifecycle: Lifecycle,
        store: Arc<dyn LifecycleStore>,
        schedule: Schedule,
        provider: Arc<dyn NetworkTokenProvider>,
        settings: ReconcileSettings,
    ) -> Reconciler {
        Reconciler {
            lifecycle,
            store,
            schedule,
            provider,
            settings,
            holder: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// Ticks every `interval` until `stop` turns true (or its sender is gone), then releases the
    /// lease. A tick in progress is abandoned at once: each of its steps is a single atomic
    /// store write or a read from D1, so stopping between any two is safe.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        tracing::info!(
            interval_ms = self.settings.interval.as_millis() as u64,
            batch = self.settings.batch,
            "reconciliation started"
        );
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.settings.interval) => {}
                () = stopped(&mut stop) => break,
            }
            tokio::select! {
                report = self.tick() => {
                    if report.checked > 0 {
                        tracing::info!(checked = report.checked, repaired = report.repaired,
                            failed = report.failed, "reconciliation tick");
                    }
                }
                () = stopped(&mut stop) => break,
            }
        }
        if let Err(e) = self.store.release_lease(LEASE_NAME, &self.holder).await {
            tracing::debug!(error = %e, "could not release the reconciliation lease");
        }
        tracing::info!("reconciliation stopped");
    }

    /// One bounded round: take or extend the lease, check up to `batch` due tokens.
    pub async fn tick(&self) -> TickReport {
        let mut report = TickReport::default();
        match self
            .store
            .acquire_lease(LEASE_NAME, &self.holder, self.settings.lease_ttl)
            .await
        {
            Ok(true) => report.leader = true,
            Ok(false) => return report,
            Err(e) => {
                tracing::warn!(error = %e, "reconciliation lease unavailable; tick skipped");
                return report;
            }
        }
        let started = Instant::now();
        let due = match self
            .store
            .due_checks(unix_ms(SystemTime::now()), self.settings.batch)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the reconciliation schedule");
                return report;
            }
        };
        for (merchant, token) in due {
            // Never outlive the lease: another instance may take over after it.
            if started.elapsed() > self.settings.lease_ttl / 2 {
                break;
            }
            report.checked += 1;
            match self.check(&merchant, &token).await {
                Ok(Checked::Observed(Observed::Repaired)) => report.repaired += 1,
                Ok(_) => {}
                Err(e) => {
                    report.failed += 1;
                    tracing::warn!(token_id = %token, error = %e, "reconciliation check failed");
                    self.schedule
                        .retry_in(&merchant, &token, self.retry_delay())
                        .await;
                    // D1 down or overloaded: the rest of the batch would fail the same way and
                    // only add load; they stay due for the next tick.
                    if matches!(
                        e,
                        DomainError::Upstream(
                            ProviderError::Unavailable { .. } | ProviderError::Timeout
                        )
                    ) {
                        break;
                    }
                }
            }
        }
        report
    }

    fn retry_delay(&self) -> Duration {
        (self.settings.interval * 10).min(MAX_RETRY_DELAY)
    }

    async fn check(&self, merchant: &MerchantId, token: &TokenId) -> Result<Checked, DomainError> {
        let store = &self.lifecycle.services().store;
        let Some(rec) = store.get_token(merchant, token).await? else {
            self.schedule.forget(merchant, token).await;
            return Ok(Checked::Skipped);
        };
        if rec.status.is_terminal() {
            self.schedule.forget(merchant, token).await;
            return Ok(Checked::Skipped);
        }
        let Some(d1_merchant) = store
            .get_merchant(merchant)
            .await?
            .and_then(|m| m.d1_merchant_id)
        else {
            self.schedule.forget(merchant, token).await;
            return Ok(Checked::Skipped);
        };
        // Taken before asking: anything D1 notifies while we wait is newer and must win.
        let observed_at = OffsetDateTime::now_utc();
        let answer = match (&rec.network_token, &rec.status) {
            (Some(nt), _) => self.provider.get_token(&d1_merchant, &nt.d1_token_id).await,
            (None, TokenStatus::Pending) => {
                self.provider
                    .find_token_by_request(&d1_merchant, rec.id.as_str())
                    .await
            }
            // Never sent to D1 (e.g. created with D1 disabled): nothing to ask about.
            (None, _) => {
                self.schedule.forget(merchant, token).await;
                return Ok(Checked::Skipped);
            }
        };
        match answer {
            Ok(pt) => Ok(Checked::Observed(
                self.lifecycle
                    .apply_observation(merchant, token, &pt, observed_at)
                    .await?,
            )),
            Err(ProviderError::NotFound) => {
                // Not guessed at: a token D1 does not know is left as it is (a PENDING one is
                // re-driven by the merchant's retry with the same request id) and looked at
                // again later.
                tracing::warn!(token_id = %token, status = rec.status.as_str(),
                    "D1 does not know this token; left unchanged");
                self.schedule.note(&rec).await;
                Ok(Checked::NotAtProvider)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Resolves when `stop` becomes true or its sender is dropped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}
