//! The reconciliation schedule: when each live token should next be checked against D1 (the
//! "check at" times `reconcile.rs` works through). Written by the use cases that change tokens
//! (tokenize, lifecycle), so it sits below all of them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::token::{MerchantId, TokenId, TokenRecord, TokenStatus};
use crate::domain::ports::CheckAt;
use crate::domain::ports::lifecycle::LifecycleStore;

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn due_in(after: Duration) -> u64 {
    unix_ms(SystemTime::now() + after)
}

/// Keeps tokens on the reconciliation schedule. Cheap to clone.
#[derive(Clone)]
pub struct Schedule {
    store: Arc<dyn LifecycleStore>,
    pending_grace: Duration,
    stale_after: Duration,
}

impl Schedule {
    pub fn new(
        store: Arc<dyn LifecycleStore>,
        pending_grace: Duration,
        stale_after: Duration,
    ) -> Schedule {
        Schedule {
            store,
            pending_grace,
            stale_after,
        }
    }

    /// When `rec` should next be checked; `None` when never (terminal).
    pub(crate) fn next_check(&self, rec: &TokenRecord) -> Option<Duration> {
        match rec.status {
            TokenStatus::Deleted => None,
            TokenStatus::Pending => Some(self.pending_grace),
            _ => Some(self.stale_after),
        }
    }

    /// The check a token write of `rec` carries to keep it on the schedule (or take it off), so
    /// the store writes both in one atomic step (`TokenStore::insert_token_scheduled`,
    /// `TokenStore::update_token_scheduled`). The domain decides the time; the store writes it.
    pub(crate) fn check_for(&self, rec: &TokenRecord) -> CheckAt {
        match self.next_check(rec) {
            Some(after) => CheckAt::At(due_in(after)),
            None => CheckAt::Never,
        }
    }

    /// Puts `rec` on the schedule for its next check (or takes it off). Best-effort: a failure is
    /// logged, never returned, because the caller's own write already succeeded and the schedule
    /// only drives the safety net (see the module docs).
    pub async fn note(&self, rec: &TokenRecord) {
        let res = match self.next_check(rec) {
            Some(after) => {
                self.store
                    .schedule_check(&rec.merchant_id, &rec.id, due_in(after))
                    .await
            }
            None => self.store.unschedule_check(&rec.merchant_id, &rec.id).await,
        };
        if let Err(e) = res {
            tracing::warn!(token_id = %rec.id, error = %e, "could not update the reconciliation schedule");
        }
    }

    pub(crate) async fn retry_in(&self, merchant: &MerchantId, token: &TokenId, after: Duration) {
        if let Err(e) = self
            .store
            .schedule_check(merchant, token, due_in(after))
            .await
        {
            tracing::warn!(token_id = %token, error = %e, "could not reschedule a reconciliation check");
        }
    }

    pub(crate) async fn forget(&self, merchant: &MerchantId, token: &TokenId) {
        if let Err(e) = self.store.unschedule_check(merchant, token).await {
            tracing::warn!(token_id = %token, error = %e, "could not unschedule a reconciliation check");
        }
    }
}
