//! Storage operations of the token lifecycle: processed-event markers (so each D1 notification
//! is applied once), the reconciliation schedule, leases for singleton background jobs and their
//! saved progress, and the walk over every token those jobs use.
//!
//! A separate trait from [`super::TokenStore`] because these are a different concern with their
//! own keys, but implemented by the same two stores on the same connection or file
//! (`redis_lifecycle.rs`, `embedded_lifecycle.rs`). Key layout: `docs/storage.md`, section
//! "Lifecycle".
//!
//! How the usual cases show up:
//! - **duplicate event**: [`EventWrite::Duplicate`] or `Ok(false)`, nothing written;
//! - **version conflict / missing token** in [`LifecycleStore::apply_event`]: exactly as
//!   [`super::TokenStore::update_token`] (`Conflict`, `NotFound`), marker not written either;
//! - **backend down**: `StoreError::Unavailable`, with the same "unknown outcome" caveat for
//!   writes; every write here is safe to retry.

use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;
use super::outbox::EventAppend;
use crate::domain::token::{MerchantId, TokenId, TokenRecord};

/// Result of [`LifecycleStore::apply_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventWrite {
    /// The token was replaced and the event marked as processed, in one atomic step.
    Applied,
    /// The event was already marked as processed: nothing was written.
    Duplicate,
}

/// Lifecycle persistence. Event ids are scoped by merchant (two merchants' events never collide)
/// and are at most [`MAX_EVENT_ID_LEN`] printable ASCII characters (checked by the caller).
#[async_trait]
pub trait LifecycleStore: Send + Sync + 'static {
    /// Whether `event_id` is marked as processed for `merchant`. A cheap pre-check only: the
    /// exactly-once guarantee comes from [`Self::apply_event`] being atomic.
    async fn event_seen(&self, merchant: &MerchantId, event_id: &str) -> Result<bool, StoreError>;

    /// Marks `event_id` as processed for `ttl` without touching any token (for events that
    /// change nothing, so a redelivery is recognised cheaply). `Ok(true)` the first time,
    /// `Ok(false)` when it was already marked.
    async fn mark_event(
        &self,
        merchant: &MerchantId,
        event_id: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Atomically: unless `event_id` is already marked for the record's merchant, replaces the
    /// token exactly like `TokenStore::update_token` (compare-and-set on `rec.version - 1`, same
    /// index maintenance) **and** marks the event for `ttl`. Two deliveries of one event, even
    /// on two gateway instances at once, cannot both answer `Applied`.
    async fn apply_event(
        &self,
        rec: &TokenRecord,
        event_id: &str,
        ttl: Duration,
    ) -> Result<EventWrite, StoreError> {
        self.apply_event_with(rec, event_id, ttl, None).await
    }

    /// [`Self::apply_event`], and when `webhook` is given, the merchant webhook event of the
    /// change appended to the outbox in the same atomic step (written only with `Applied`).
    async fn apply_event_with(
        &self,
        rec: &TokenRecord,
        event_id: &str,
        ttl: Duration,
        webhook: Option<&EventAppend>,
    ) -> Result<EventWrite, StoreError>;

    /// Puts the token on the reconciliation schedule at `due_ms` (Unix milliseconds), replacing
    /// any earlier entry for it. Idempotent.
    async fn schedule_check(
        &self,
        merchant: &MerchantId,
        token: &TokenId,
        due_ms: u64,
    ) -> Result<(), StoreError>;

    /// Takes the token off the schedule. Idempotent.
    async fn unschedule_check(
        &self,
        merchant: &MerchantId,
        token: &TokenId,
    ) -> Result<(), StoreError>;

    /// Up to `limit` scheduled tokens due at or before `now_ms`, earliest first. They stay on the
    /// schedule until rescheduled or unscheduled, so a check that fails is retried next time.
    /// Entries that do not parse as ids (only possible by tampering) are dropped, not returned.
    async fn due_checks(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(MerchantId, TokenId)>, StoreError>;

    /// Takes the lease `name` for `holder` if it is free or expired, or extends it if `holder`
    /// already has it; `Ok(true)` when `holder` holds it for the next `ttl`.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Gives the lease up if `holder` still holds it (never someone else's).
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    /// One page of a walk over every token of every merchant, for maintenance jobs (the data-key
    /// re-encryption of `domain::rekey`). Start with `cursor = None`; the page's `next` is the
    /// cursor of the following page, `None` when the walk is complete. A page may be empty
    /// while `next` is not. Tokens written during a walk may or may not be seen.
    ///
    /// The cursor is valid on every instance sharing the store (a walk one instance started,
    /// another can continue). On Redis Cluster the walk visits every primary in turn; a cursor
    /// that names a node no longer in the cluster restarts the walk from the beginning (tokens
    /// may then be seen twice; never skipped).
    async fn scan_tokens(&self, cursor: Option<&str>, count: usize)
    -> Result<ScanPage, StoreError>;

    /// The saved progress of the maintenance job `name` (e.g. a [`Self::scan_tokens`] cursor),
    /// `None` if none is saved. Saved under the job's lease, so a holder that dies is continued
    /// by the next one rather than restarted.
    async fn load_job_state(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Saves (`Some`) or clears (`None`) the progress of job `name`. Last write wins: callers
    /// hold the job's lease.
    async fn save_job_state(&self, name: &str, state: Option<&str>) -> Result<(), StoreError>;
}

/// A page of [`LifecycleStore::scan_tokens`].
#[derive(Debug, Default)]
pub struct ScanPage {
    pub items: Vec<(MerchantId, TokenId)>,
    pub next: Option<String>,
}

/// Longest event id accepted: it becomes part of a storage key.
pub const MAX_EVENT_ID_LEN: usize = 128;
