//! Issuer operations (`domain::issuer_ops`): [`IssuerOperationStore`]. Implemented by
//! `storage/redis/issuer_operations.rs` (every key of an issuer under the hash tag
//! `{i:<issuer id>}`, so each script touches one Cluster slot) and
//! `storage/embedded/issuer_operations.rs` (one redb transaction per operation); layout in
//! `docs/storage.md`, "Issuer operations".
//!
//! How the usual cases show up:
//! - **miss**: `Ok(None)`; updates of a missing record: [`StoreError::NotFound`];
//! - **duplicate `issuerRequestId`**: [`OperationInsert::Existing`] with the stored operation;
//! - **version conflict**: [`StoreError::Conflict`], nothing written;
//! - **redelivered notification**: [`NotificationWrite::Duplicate`], nothing written.
//!
//! The issuer webhook events of a change ([`EventAppend`], built by
//! `WebhookService::issuer_events_for`) are written **in the same atomic step** as the change
//! (`update_operation_with`, `apply_notification_with`), as token writes do: a crash cannot
//! keep the change and lose its events, nor store events of a change that was not made.

use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;
use super::outbox::EventAppend;
use crate::domain::issuer::IssuerId;
use crate::domain::issuer_ops::{IssuerOperation, OperationFilter, OperationId};

/// Result of [`IssuerOperationStore::insert_operation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperationInsert {
    Inserted,
    /// The issuer already has an operation with this `issuerRequestId`: nothing written.
    Existing(Box<IssuerOperation>),
}

/// Result of [`IssuerOperationStore::apply_notification`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationWrite {
    /// The operation was replaced and the notification marked as processed, atomically.
    Applied,
    /// The notification was already processed: nothing written.
    Duplicate,
}

/// A page of [`IssuerOperationStore::list_operations`]: newest first; `next` is the cursor of
/// the following page.
#[derive(Debug, Default)]
pub struct OperationPage {
    pub items: Vec<IssuerOperation>,
    pub next: Option<String>,
}

/// Longest notification dedup key (it becomes part of a storage key).
pub const MAX_DEDUP_KEY_LEN: usize = 128;

#[async_trait]
pub trait IssuerOperationStore: Send + Sync + 'static {
    /// Stores a new operation (version 1) with its indexes, unless the issuer already has one
    /// with the same `issuer_request_id`.
    async fn insert_operation(&self, op: &IssuerOperation) -> Result<OperationInsert, StoreError>;

    async fn get_operation(
        &self,
        issuer: &IssuerId,
        id: &OperationId,
    ) -> Result<Option<IssuerOperation>, StoreError>;

    async fn operation_by_request_id(
        &self,
        issuer: &IssuerId,
        issuer_request_id: &str,
    ) -> Result<Option<IssuerOperation>, StoreError>;

    async fn operation_by_d1_id(
        &self,
        issuer: &IssuerId,
        d1_operation_id: &str,
    ) -> Result<Option<IssuerOperation>, StoreError>;

    /// Replaces the operation if the stored version is `op.version - 1` (compare-and-set),
    /// keeping every index in step (D1 id, status, the worker's due list).
    async fn update_operation(&self, op: &IssuerOperation) -> Result<(), StoreError> {
        self.update_operation_with(op, &[]).await
    }

    /// [`Self::update_operation`] that also stores `events` (the issuer's webhook events of
    /// this change: event, pending deliveries, jobs) in the same atomic step: all of them
    /// exactly when the operation is written. Their `merchant_id` is the issuer's tenant
    /// (`IssuerId::tenant`). On Redis Cluster the events are written to the issuer's outbox
    /// shard (`P:{i:I}:whq`, the operation's slot) and moved to the tenant's outbox right
    /// after, or by the delivery workers' sweep if the writer died in between.
    async fn update_operation_with(
        &self,
        op: &IssuerOperation,
        events: &[EventAppend],
    ) -> Result<(), StoreError>;

    /// Atomically: unless `dedup_key` is already marked for the issuer, replaces the operation
    /// exactly as [`Self::update_operation`] **and** marks the key for `ttl`. Two deliveries of
    /// one notification, even on two instances at once, cannot both answer `Applied`.
    async fn apply_notification(
        &self,
        op: &IssuerOperation,
        dedup_key: &str,
        ttl: Duration,
    ) -> Result<NotificationWrite, StoreError> {
        self.apply_notification_with(op, dedup_key, ttl, &[]).await
    }

    /// [`Self::apply_notification`] with the change's webhook `events` in the same atomic step
    /// (as [`Self::update_operation_with`]): a duplicate or a conflict stores none of them.
    async fn apply_notification_with(
        &self,
        op: &IssuerOperation,
        dedup_key: &str,
        ttl: Duration,
        events: &[EventAppend],
    ) -> Result<NotificationWrite, StoreError>;

    /// One page of the issuer's operations, newest first, after `cursor` (a sort key this list
    /// returned; the caller checked its shape). Index-backed: by card when `card_id` is given,
    /// else by status when given, else all.
    async fn list_operations(
        &self,
        issuer: &IssuerId,
        filter: &OperationFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<OperationPage, StoreError>;

    /// Up to `limit` `PENDING` operations of the issuer whose `next_check_at` is at or before
    /// `now_ms`, earliest first (the re-drive and polling worker's list).
    async fn due_operations(
        &self,
        issuer: &IssuerId,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<OperationId>, StoreError>;
}
