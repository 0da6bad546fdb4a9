//! The leased, resumable walk over every token that the vault's maintenance jobs share: data-key
//! rotation (`domain::rekey`) and fingerprint-key rotation (`domain::fp_reindex`).
//!
//! A job is one [`Walker`] (what to do with one token, and what comes after a whole walk) driven
//! through a [`LeasedWalk`] (the rest, which the jobs must do alike for one to resume what
//! another instance started):
//!
//! - a **lease** under the job's name, so one instance at a time works ([`LeasedWalk::acquire`]);
//! - the job's **saved progress** under the same name, JSON of the job's own `Progress` type
//!   ([`LeasedWalk::load`], [`LeasedWalk::save`]). Its shape is the job's, unchanged by this
//!   module: an instance running an older build resumes a cursor saved by this one and back;
//! - one **batch** of the walk ([`LeasedWalk::batch`]): a page of `LifecycleStore::scan_tokens`
//!   (every primary on Redis Cluster) from the saved cursor, each token visited, the cursor
//!   advanced, and the job told when a whole walk is over;
//! - the **pause** between batches that ends on the shutdown signal ([`LeasedWalk::pause`]).
//!
//! What one token needs is a versioned compare-and-set on its record: [`edit_token`] re-reads
//! and tries again on a concurrent write, so a job never overwrites a change it did not see.
//!
//! Each job keeps its own sequencing around these pieces (when it takes the lease, which
//! failures it logs how, whether it needs a lease at all once done): those differ on purpose.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::error::DomainError;
use super::token::{MerchantId, TokenId, TokenRecord};
use crate::domain::ports::lifecycle::LifecycleStore;
use crate::domain::ports::{StoreError, TokenStore};

/// How a walking job runs (`[rekey]`, `[fp_reindex]` in the config).
#[derive(Debug, Clone)]
pub struct WalkSettings {
    /// Pause between two batches.
    pub interval: Duration,
    /// Tokens per batch (one `scan_tokens` page).
    pub batch: usize,
    /// How long the lease holds without renewal: a holder that dies is continued after it.
    pub lease: Duration,
}

/// The job-specific half of a walk.
#[async_trait]
pub trait Walker: Send + Sync {
    /// What the job saves between batches. Its serialized shape is the job's stored format.
    type Progress: Serialize + DeserializeOwned + Send;

    /// Where the walk in `p` continues (`None`: at the start).
    fn cursor(p: &mut Self::Progress) -> &mut Option<String>;

    /// Brings one token to the job's target, counting what it needed in `p` (and its metrics).
    async fn visit(
        &self,
        p: &mut Self::Progress,
        merchant: &MerchantId,
        token: &TokenId,
    ) -> Result<(), DomainError>;

    /// A whole walk is over (the cursor is `None` again): report it and decide what comes next.
    fn walk_complete(&self, p: &mut Self::Progress);
}

/// One job's hold on its walk: its lease, its saved progress and its batches, all under the
/// job's name, for the instance `holder`.
pub struct LeasedWalk {
    name: &'static str,
    store: Arc<dyn LifecycleStore>,
    settings: WalkSettings,
    holder: String,
}

impl LeasedWalk {
    /// `name` names both the lease and the saved progress; the holder id is random per instance.
    pub fn new(
        name: &'static str,
        store: Arc<dyn LifecycleStore>,
        settings: WalkSettings,
    ) -> LeasedWalk {
        let mut id = [0u8; 8];
        rand::fill(&mut id);
        LeasedWalk {
            name,
            store,
            settings,
            holder: hex::encode(id),
        }
    }

    /// Takes (or renews) the job's lease: `Ok(true)` when this instance holds it for the next
    /// `lease`, `Ok(false)` when another instance is working.
    pub async fn acquire(&self) -> Result<bool, StoreError> {
        self.store
            .acquire_lease(self.name, &self.holder, self.settings.lease)
            .await
    }

    /// Gives the lease up (if still held), so another instance continues at once rather than
    /// after the lease expires. Best effort: an expiry does the same later.
    pub async fn release(&self) {
        let _ = self.store.release_lease(self.name, &self.holder).await;
    }

    /// The saved progress, `None` if none. Unreadable progress (only by tampering or a format
    /// change) is treated as none too: the job starts over, which is always safe.
    pub async fn load<P: DeserializeOwned>(&self) -> Result<Option<P>, StoreError> {
        let saved = self.store.load_job_state(self.name).await?;
        Ok(saved.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Saves the progress (`Some`) or clears it (`None`). Callers hold the lease (last write
    /// wins), except for a state every instance would write alike.
    pub async fn save<P: Serialize>(&self, p: Option<&P>) -> Result<(), StoreError> {
        let json = p
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("job progress does not encode: {e}")))?;
        self.store.save_job_state(self.name, json.as_deref()).await
    }

    /// One page of the walk from `p`'s cursor: visits each token, advances the cursor and, at
    /// the end of a whole walk, tells the walker. Saves nothing: the job decides what and how.
    /// On an error `p` is part-way through the page; callers drop it and redo the batch from
    /// the saved cursor (a token visited twice needs nothing the second time).
    pub async fn batch<W: Walker>(
        &self,
        walker: &W,
        p: &mut W::Progress,
    ) -> Result<(), DomainError> {
        let page = self
            .store
            .scan_tokens(W::cursor(p).as_deref(), self.settings.batch)
            .await?;
        for (merchant, token) in &page.items {
            walker.visit(p, merchant, token).await?;
        }
        *W::cursor(p) = page.next;
        if W::cursor(p).is_none() {
            walker.walk_complete(p);
        }
        Ok(())
    }

    /// Waits one interval; `false` if the shutdown signal came first.
    pub async fn pause(&self, stop: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(self.settings.interval) => true,
            _ = stop.wait_for(|s| *s) => false,
        }
    }
}

/// What [`edit_token`]'s edit decided for one reading of the record.
pub enum Edit<T> {
    /// Nothing to write; done with `T`.
    Keep(T),
    /// The edit changed the record: write it (one version up), then done with `T`.
    Write(T),
}

/// How often a record is re-read after a concurrent write before the batch fails (and is
/// retried from the saved cursor).
const ATTEMPTS: usize = 5;

/// Reads the token, applies `edit` and writes the result with a versioned compare-and-set,
/// re-reading and editing again when a concurrent write came first. Keeps `updated_at`: what a
/// maintenance job changes is nothing a merchant can see. `Ok(None)` when the token is gone
/// (removed between the scan and the read, e.g. a failed reservation): nothing to do.
pub async fn edit_token<T>(
    store: &dyn TokenStore,
    merchant: &MerchantId,
    token: &TokenId,
    mut edit: impl FnMut(&mut TokenRecord) -> Edit<T>,
) -> Result<Option<T>, DomainError> {
    for _ in 0..ATTEMPTS {
        let Some(mut rec) = store.get_token(merchant, token).await? else {
            return Ok(None);
        };
        let done = match edit(&mut rec) {
            Edit::Keep(done) => return Ok(Some(done)),
            Edit::Write(done) => done,
        };
        rec.version += 1;
        match store.update_token(&rec).await {
            Ok(()) => return Ok(Some(done)),
            Err(StoreError::Conflict) => continue,
            Err(StoreError::NotFound) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    Err(DomainError::Conflict)
}
