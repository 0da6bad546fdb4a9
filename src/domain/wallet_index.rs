//! The one-time backfill of the customer wallet index (`domain::wallet`): tokens stored before
//! the index existed are not in it, so a wallet would not list them and a "forget me" would not
//! delete them. This background task indexes them through the store
//! (`TokenStore::backfill_wallet_index`) in bounded batches, under a store lease so one instance
//! works at a time; progress is kept in the store, so if the holder stops, another instance
//! (or the same one after a restart) takes the lease over once it expires and continues.
//!
//! Until it completes, wallet lists say so (`indexComplete: false`) and delete-all is refused
//! (`wallet_index_building`, `domain::service::wallets`). On a store with nothing to backfill
//! it completes on its first step; after completion the task ends.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::ports::TokenStore;
use crate::domain::ports::lifecycle::LifecycleStore;
use crate::domain::wallet::BACKFILL_JOB;

/// Tokens per step: one bounded store round (a scan page plus up to two commands per token on
/// Redis, one write transaction on redb).
const BATCH: usize = 500;
/// Pause between steps: a million tokens in a few minutes, while leaving the store to the API
/// traffic (the token counts backfill runs at the same pace).
const PAUSE: Duration = Duration::from_millis(200);
/// The lease; renewed on every step, so it only expires when its holder stopped.
const LEASE: Duration = Duration::from_secs(30);

pub struct WalletIndexBackfill {
    store: Arc<dyn TokenStore>,
    leases: Arc<dyn LifecycleStore>,
    holder: String,
}

impl WalletIndexBackfill {
    pub fn new(store: Arc<dyn TokenStore>, leases: Arc<dyn LifecycleStore>) -> WalletIndexBackfill {
        let mut id = [0u8; 8];
        rand::fill(&mut id);
        WalletIndexBackfill {
            store,
            leases,
            holder: hex::encode(id),
        }
    }

    /// Steps at once (a fresh deployment is complete before its first wallet request, in
    /// practice), then every [`PAUSE`] until complete or until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        // A completed index (the usual case after the first start) costs one read, no lease.
        if matches!(self.store.wallet_index_complete().await, Ok(true)) {
            return;
        }
        loop {
            if self.step().await {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(PAUSE) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        // Stopped midway: let another instance continue at once rather than after the lease.
        let _ = self.leases.release_lease(BACKFILL_JOB, &self.holder).await;
    }

    /// One step if this instance holds (or takes) the lease; true once complete.
    async fn step(&self) -> bool {
        match self
            .leases
            .acquire_lease(BACKFILL_JOB, &self.holder, LEASE)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                // Another instance is indexing; its completion ends this task too.
                return matches!(self.store.wallet_index_complete().await, Ok(true));
            }
            Err(e) => {
                tracing::warn!(error = %e, "wallet index backfill: lease unavailable");
                return false;
            }
        }
        match self.store.backfill_wallet_index(BATCH).await {
            Ok(true) => {
                tracing::info!("wallet index backfill complete");
                let _ = self.leases.release_lease(BACKFILL_JOB, &self.holder).await;
                true
            }
            Ok(false) => false,
            Err(e) => {
                // A corrupt record stops the backfill here (never skipped silently): wallet
                // deletes stay refused until an operator repairs it, rather than missing it.
                tracing::warn!(error = %e, "wallet index backfill step failed; will retry");
                false
            }
        }
    }
}
