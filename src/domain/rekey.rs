//! Data-key rotation: a background job that re-seals every PAN written under an older vault key
//! with the active key, in bounded batches, so an old key can be retired.
//!
//! Rotation, end to end (docs/security.md): add the new key to `vault.keys`, make it
//! `vault.active_key_id`, roll the instances (every key in the ring still opens); this job then
//! walks all tokens, `rekey.batch` per tick, under a store lease so only one instance works at a
//! time. Each re-seal is a versioned compare-and-set, so it never overwrites a concurrent change
//! (it re-reads and retries). A record whose key is no longer in the ring is **reported** (an
//! error log line with its token id and key id, and the `tokengate_rekey_unreadable_total`
//! counter), never silently skipped or made unreadable. When a full pass finds no record under
//! an old key (`tokengate_rekey_old_key_records` = 0), the old key can be removed from config.
//!
//! The walk's progress (the store's scan cursor and the pass's counts so far) is saved in the
//! store after every batch (`LifecycleStore::save_job_state`), under the lease: when the holder
//! dies or stops, whichever instance takes the lease next continues the pass where it stopped.
//! The cursor is valid on every instance and, on Redis Cluster, walks every primary
//! (`LifecycleStore::scan_tokens`). A batch that fails is retried from the last saved cursor; a
//! batch done twice re-seals nothing twice (records already under the active key are skipped).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use super::error::DomainError;
use super::leased_walk::{Edit, LeasedWalk, WalkSettings, Walker, edit_token};
use super::service::Services;
use super::token::{MerchantId, TokenId};
use crate::crypto::CryptoError;
use crate::domain::ports::lifecycle::LifecycleStore;

/// How the job runs (`[rekey]` in the config).
pub type RekeySettings = WalkSettings;

/// Outcome of one token.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Current,
    Resealed,
    Unreadable,
    Gone,
}

/// Counts of one pass over the vault.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PassStats {
    pub scanned: u64,
    pub resealed: u64,
    pub unreadable: u64,
}

pub struct Rekeyer {
    services: Services,
    walk: LeasedWalk,
}

/// Name of the lease and of the saved progress.
const LEASE: &str = "rekey";

/// Saved progress of a pass: where the walk continues, and what it found so far (so the
/// instance that completes the pass reports the whole pass).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    cursor: Option<String>,
    pass: PassStats,
}

impl Rekeyer {
    pub fn new(
        services: Services,
        store: Arc<dyn LifecycleStore>,
        settings: RekeySettings,
    ) -> Rekeyer {
        Rekeyer {
            services,
            walk: LeasedWalk::new(LEASE, store, settings),
        }
    }

    /// Runs until `stop` turns true: a batch every interval, under the lease.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        while self.walk.pause(&mut stop).await {
            match self.walk.acquire().await {
                Ok(true) => {}
                Ok(false) => continue, // another instance is working
                Err(e) => {
                    tracing::warn!(error = %e, "rekey: lease unavailable");
                    continue;
                }
            }
            // Where the last batch, on any instance, stopped.
            let mut progress: Progress = match self.walk.load().await {
                Ok(saved) => saved.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "rekey: progress unavailable");
                    continue;
                }
            };
            if let Err(e) = self.walk.batch(&self, &mut progress).await {
                tracing::warn!(error = %e, "rekey: batch failed; will retry");
                continue;
            }
            // A complete pass leaves nothing to continue: the next one starts from the top.
            let save = progress.cursor.is_some().then_some(&progress);
            if let Err(e) = self.walk.save(save).await {
                // The batch is done again next time: harmless, only slower.
                tracing::warn!(error = %e, "rekey: progress not saved");
            }
        }
    }

    /// Processes one page of the walk; returns the cursor of the next page.
    pub async fn tick(
        &self,
        cursor: Option<&str>,
        pass: &mut PassStats,
    ) -> Result<Option<String>, DomainError> {
        let mut progress = Progress {
            cursor: cursor.map(str::to_owned),
            pass: std::mem::take(pass),
        };
        let done = self.walk.batch(self, &mut progress).await;
        *pass = progress.pass;
        done.map(|()| progress.cursor)
    }

    /// Runs whole passes until one completes; for tests and the CLI.
    pub async fn run_one_pass(&self) -> Result<PassStats, DomainError> {
        let mut pass = PassStats::default();
        let mut cursor: Option<String> = None;
        loop {
            cursor = self.tick(cursor.as_deref(), &mut pass).await?;
            if cursor.is_none() {
                return Ok(pass);
            }
        }
    }

    /// Re-seals one record under the active key (a compare-and-set that re-reads on a
    /// concurrent write).
    async fn reseal(&self, merchant: &MerchantId, token: &TokenId) -> Result<Outcome, DomainError> {
        let keyring = &self.services.keyring;
        let outcome = edit_token(&*self.services.store, merchant, token, |rec| {
            if rec.sealed_pan.key_id == keyring.active_key_id() {
                return Edit::Keep(Outcome::Current);
            }
            let pan = match keyring.open(&rec.sealed_pan, &rec.merchant_id, &rec.id) {
                Ok(pan) => pan,
                Err(e) => {
                    let why = match e {
                        CryptoError::UnknownKey(_) => "key retired (not in the keyring)",
                        _ => "ciphertext does not open",
                    };
                    tracing::error!(
                        token_id = %rec.id,
                        key_id = %rec.sealed_pan.key_id,
                        reason = why,
                        "rekey: record cannot be re-sealed"
                    );
                    return Edit::Keep(Outcome::Unreadable);
                }
            };
            rec.sealed_pan = keyring.seal(&pan, &rec.merchant_id, &rec.id);
            Edit::Write(Outcome::Resealed)
        })
        .await?;
        Ok(outcome.unwrap_or(Outcome::Gone))
    }
}

#[async_trait]
impl Walker for Rekeyer {
    type Progress = Progress;

    fn cursor(p: &mut Progress) -> &mut Option<String> {
        &mut p.cursor
    }

    async fn visit(
        &self,
        p: &mut Progress,
        merchant: &MerchantId,
        token: &TokenId,
    ) -> Result<(), DomainError> {
        p.pass.scanned += 1;
        metrics::counter!("tokengate_rekey_scanned_total").increment(1);
        match self.reseal(merchant, token).await? {
            Outcome::Resealed => {
                p.pass.resealed += 1;
                metrics::counter!("tokengate_rekey_resealed_total").increment(1);
            }
            Outcome::Unreadable => {
                p.pass.unreadable += 1;
                metrics::counter!("tokengate_rekey_unreadable_total").increment(1);
            }
            Outcome::Current | Outcome::Gone => {}
        }
        Ok(())
    }

    /// Reports the pass; there is no phase after it (the next pass starts from the top).
    fn walk_complete(&self, p: &mut Progress) {
        let pass = &p.pass;
        metrics::gauge!("tokengate_rekey_old_key_records")
            .set((pass.resealed + pass.unreadable) as f64);
        if pass.resealed > 0 || pass.unreadable > 0 {
            tracing::info!(
                scanned = pass.scanned,
                resealed = pass.resealed,
                unreadable = pass.unreadable,
                active_key = self.services.keyring.active_key_id(),
                "rekey: pass over the vault complete"
            );
        }
    }
}
