//! Fingerprint-key rotation: a background job that re-indexes every token's dedup fingerprint
//! under the active fingerprint key (`vault.active_fingerprint_key_id`), then drops the index
//! entries under the other keys, so an old fingerprint key can be retired.
//!
//! A fingerprint is keyed, so re-indexing needs the PAN: the job opens each record (as the
//! data-key job, `domain::rekey`, does), computes its fingerprints under the active key and
//! writes them with a versioned compare-and-set (`TokenStore::update_token`): the record and its
//! index entries change in one atomic step (one Lua script in the merchant's slot, one redb
//! transaction). It runs in phases, each a full walk over every token (`scan_tokens`: every
//! primary on Redis Cluster), `batch` records per tick, under a store lease:
//!
//! 1. **reindex**: a record not yet indexed under the active key gets its new fingerprints; its
//!    entries under the other keys are **kept** (`Fingerprints::previous`), so instances that
//!    still look a card up under an older key keep finding it. Meanwhile tokenize looks a card
//!    up under the active key, then the previous keys, and indexes a new record under all of
//!    them (`Services::tokenize`): dedup holds throughout the pass.
//! 2. **cleanup** (once a reindex pass found every record readable): instances that read this
//!    phase stop indexing new records under the previous keys; the walk drops every record's
//!    entries under them (and re-indexes any record an instance on an old configuration wrote
//!    meanwhile). It repeats until a whole walk has nothing left to change.
//! 3. **done** for the active key: every instance that reads it stops looking cards up under the
//!    previous keys (`tokengate_fp_reindex_complete` = 1); the operator may remove them.
//!
//! Progress (phase, cursor, the pass's counts) is saved in the store after every batch
//! (`LifecycleStore::save_job_state`), under the lease: whichever instance takes the lease next
//! continues where the last holder stopped (a batch may be done twice; a record already in its
//! target state is skipped after one read). A record whose PAN does not open (its data key was
//! retired too early) is reported (an error log line with its token id, the
//! `tokengate_fp_reindex_unreadable_total` counter) and keeps the phase from completing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use async_trait::async_trait;
use tokio::sync::watch;

use super::error::DomainError;
use super::leased_walk::{Edit, LeasedWalk, WalkSettings, Walker, edit_token};
use super::service::Services;
use super::token::{MerchantId, TokenId, TokenRecord};
use crate::crypto::fingerprint_key_id;
use crate::domain::ports::lifecycle::LifecycleStore;

/// Name of the lease and of the saved progress.
pub const JOB: &str = "fp-reindex";

/// How the job runs (`[fp_reindex]` in the config).
pub type FpReindexSettings = WalkSettings;

/// Where the re-index under one active key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Reindex,
    Cleanup,
    Done,
}

impl Phase {
    /// The value of [`Services::fp_reindex_phase`] (0 while unknown).
    fn code(self) -> u8 {
        match self {
            Phase::Reindex => 1,
            Phase::Cleanup => 2,
            Phase::Done => 3,
        }
    }
}

/// What this instance knows of the job's phase for its active fingerprint key, shared with
/// tokenize (`Services::fp_reindex_phase`): 0 unknown, then [`Phase::code`].
#[derive(Debug, Default)]
pub struct PhaseFlag(AtomicU8);

impl PhaseFlag {
    fn set(&self, phase: Phase) {
        self.0.store(phase.code(), Ordering::Release);
    }

    /// Whether new records are still indexed under the previous keys too (until cleanup).
    pub fn index_previous(&self) -> bool {
        self.0.load(Ordering::Acquire) < Phase::Cleanup.code()
    }

    /// Whether cards are still looked up under the previous keys too (until done).
    pub fn lookup_previous(&self) -> bool {
        self.0.load(Ordering::Acquire) < Phase::Done.code()
    }
}

/// Counts of one walk.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PassStats {
    pub scanned: u64,
    /// Records given fingerprints under the active key.
    pub reindexed: u64,
    /// Index entries under other keys dropped (cleanup).
    pub removed: u64,
    /// Records whose PAN does not open.
    pub unreadable: u64,
}

/// Saved progress: the active key it is for, the phase, where the walk continues, and the
/// walk's counts so far (so the instance that completes a walk judges the whole walk).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub active: String,
    pub phase: Phase,
    pub cursor: Option<String>,
    pub pass: PassStats,
}

/// What one record needed.
#[derive(Debug, Default)]
struct Change {
    reindexed: bool,
    removed: u64,
    unreadable: bool,
}

pub struct FpReindexer {
    services: Services,
    walk: LeasedWalk,
}

impl FpReindexer {
    pub fn new(
        services: Services,
        store: Arc<dyn LifecycleStore>,
        settings: FpReindexSettings,
    ) -> FpReindexer {
        FpReindexer {
            services,
            walk: LeasedWalk::new(JOB, store, settings),
        }
    }

    /// Runs until `stop` turns true: a step every interval (no lease needed once done).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.step().await {
                tracing::warn!(error = %e, "fp reindex: step failed; will retry");
            }
            if !self.walk.pause(&mut stop).await {
                break;
            }
        }
        // Stopped midway: let another instance continue at once rather than after the lease.
        self.walk.release().await;
    }

    /// The saved progress, if readable. Unreadable progress (only by tampering or a format
    /// change) is treated as none: the job starts over, which is always safe.
    pub async fn load(&self) -> Result<Option<Progress>, DomainError> {
        Ok(self.walk.load().await?)
    }

    /// One step: reads the saved progress (and tells tokenize its phase); unless done, takes the
    /// lease and processes one batch. Returns the phase after the step (`None`: this instance
    /// did not work, another holds the lease or the progress is for a key it does not have).
    pub async fn step(&self) -> Result<Option<Phase>, DomainError> {
        let keyring = &self.services.keyring;
        let active = keyring.active_fingerprint_key_id().to_owned();
        let saved = self.load().await?;
        // `fresh`: not what was saved, so saved before anything else happens.
        let (progress, fresh) = match saved {
            Some(p) if p.active == active => (p, false),
            // A new rotation: this instance's active key replaces the one the progress is for.
            Some(p)
                if keyring
                    .previous_fingerprint_key_ids()
                    .any(|id| id == p.active) =>
            {
                (Progress::start(&active, Phase::Reindex), true)
            }
            Some(p) => {
                // This instance does not have the key the job works for: an instance on an
                // older configuration, or a key removed before its pass completed. Leave it.
                tracing::warn!(
                    job_key = %p.active,
                    active_key = %active,
                    "fp reindex: the saved progress is for a fingerprint key this instance does not have; keep that key in vault.fingerprint_keys until its pass completes"
                );
                return Ok(None);
            }
            // Nothing saved: a store that never rotated. With one key there is nothing to
            // re-index; otherwise start.
            None if keyring.previous_fingerprint_key_ids().next().is_none() => {
                (Progress::start(&active, Phase::Done), true)
            }
            None => (Progress::start(&active, Phase::Reindex), true),
        };
        self.services.fp_reindex_phase.set(progress.phase);
        if progress.phase == Phase::Done {
            metrics::gauge!("tokengate_fp_reindex_complete").set(1.0);
            if fresh {
                // Recorded once; no lease needed: every instance would write the same.
                self.save(&progress).await?;
            }
            return Ok(Some(Phase::Done));
        }
        metrics::gauge!("tokengate_fp_reindex_complete").set(0.0);
        if !self.walk.acquire().await? {
            return Ok(None); // another instance is working
        }
        // One page of the walk in the progress's phase, saved after it.
        let mut next = progress;
        self.walk.batch(self, &mut next).await?;
        self.save(&next).await?;
        self.services.fp_reindex_phase.set(next.phase);
        if next.phase == Phase::Done {
            metrics::gauge!("tokengate_fp_reindex_complete").set(1.0);
            self.walk.release().await;
        }
        Ok(Some(next.phase))
    }

    async fn save(&self, p: &Progress) -> Result<(), DomainError> {
        Ok(self.walk.save(Some(p)).await?)
    }

    /// Runs steps until the job is done for the active key; for tests and the CLI. Fails after
    /// `max_steps` steps (a record that does not open keeps it from completing).
    pub async fn run_to_completion(&self, max_steps: usize) -> Result<(), DomainError> {
        for _ in 0..max_steps {
            if self.step().await? == Some(Phase::Done) {
                return Ok(());
            }
        }
        Err(DomainError::Conflict)
    }

    /// Brings one record to its phase's target: indexed under the active key, and in cleanup
    /// without entries under other keys. A version conflict means a concurrent write: re-read
    /// and try again. Keeps `updated_at`: nothing a merchant can see changed.
    async fn record(
        &self,
        merchant: &MerchantId,
        token: &TokenId,
        cleanup: bool,
    ) -> Result<Change, DomainError> {
        let active = self.services.keyring.active_fingerprint_key_id();
        let change = edit_token(&*self.services.store, merchant, token, |rec| {
            let mut change = Change::default();
            if fingerprint_key_id(&rec.fingerprints.pan) != active {
                match self.reindexed(rec) {
                    Some(fps) => {
                        rec.fingerprints = fps;
                        change.reindexed = true;
                    }
                    None => {
                        // Its entries are all it can be found by: left as they are.
                        change.unreadable = true;
                        return Edit::Keep(change);
                    }
                }
            }
            if cleanup {
                change.removed = rec.fingerprints.previous.len() as u64;
                rec.fingerprints.previous.clear();
            }
            if !change.reindexed && change.removed == 0 {
                Edit::Keep(change)
            } else {
                Edit::Write(change)
            }
        })
        .await?;
        Ok(change.unwrap_or_default())
    }

    /// `rec`'s fingerprints under the active key, its current entries kept as `previous`;
    /// `None` (reported) when its PAN does not open.
    fn reindexed(&self, rec: &TokenRecord) -> Option<crate::crypto::Fingerprints> {
        let keyring = &self.services.keyring;
        match keyring.open(&rec.sealed_pan, &rec.merchant_id, &rec.id) {
            Ok(pan) => {
                let mut fps = keyring.fingerprints(&rec.merchant_id, &pan, &rec.card.expiry);
                fps.carry_over(&rec.fingerprints);
                Some(fps)
            }
            Err(e) => {
                tracing::error!(
                    token_id = %rec.id,
                    key_id = %rec.sealed_pan.key_id,
                    error = %e,
                    "fp reindex: record cannot be opened to re-index its fingerprint"
                );
                None
            }
        }
    }
}

impl Progress {
    fn start(active: &str, phase: Phase) -> Progress {
        Progress {
            active: active.to_owned(),
            phase,
            cursor: None,
            pass: PassStats::default(),
        }
    }
}

#[async_trait]
impl Walker for FpReindexer {
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
        metrics::counter!("tokengate_fp_reindex_scanned_total").increment(1);
        let c = self
            .record(merchant, token, p.phase == Phase::Cleanup)
            .await?;
        if c.reindexed {
            p.pass.reindexed += 1;
            metrics::counter!("tokengate_fp_reindex_reindexed_total").increment(1);
        }
        if c.removed > 0 {
            p.pass.removed += c.removed;
            metrics::counter!("tokengate_fp_reindex_removed_entries_total").increment(c.removed);
        }
        if c.unreadable {
            p.pass.unreadable += 1;
            metrics::counter!("tokengate_fp_reindex_unreadable_total").increment(1);
        }
        Ok(())
    }

    /// Judges the walk: the phase after it, and a new walk's counts.
    fn walk_complete(&self, p: &mut Progress) {
        let pass = std::mem::take(&mut p.pass);
        metrics::gauge!("tokengate_fp_reindex_pending_records")
            .set((pass.reindexed + pass.unreadable) as f64);
        tracing::info!(
            phase = ?p.phase,
            scanned = pass.scanned,
            reindexed = pass.reindexed,
            removed_entries = pass.removed,
            unreadable = pass.unreadable,
            active_fingerprint_key = %p.active,
            "fp reindex: walk over the vault complete"
        );
        p.phase = match p.phase {
            // Every record is under the active key (unless some did not open: walk again).
            Phase::Reindex if pass.unreadable == 0 => Phase::Cleanup,
            // Done only after a walk that found nothing left to change: a record written
            // meanwhile by an instance that had not yet read "cleanup" is caught by it.
            Phase::Cleanup if pass.unreadable == 0 && pass.reindexed == 0 && pass.removed == 0 => {
                Phase::Done
            }
            other => other,
        };
    }
}
