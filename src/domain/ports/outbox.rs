//! The webhook outbox: the [`OutboxStore`] trait behind merchant webhooks (endpoints, events,
//! delivery states, and the durable job queue the delivery workers share).
//!
//! Implemented for Redis (`redis_outbox.rs`: a stream with a consumer group, a sorted set of
//! due retries, a dead-letter stream) and for the embedded store (`embedded_outbox.rs`: redb
//! tables with the same semantics). Layout in `docs/storage.md`, delivery semantics in
//! `docs/webhooks.md`.
//!
//! # The job queue
//!
//! A job is one delivery of one event to one endpoint, with the number of attempts made so far
//! in this round. [`OutboxStore::claim_jobs`] hands out due jobs under a lease: a job that is
//! not finished within the lease (its worker died, or stopped mid-attempt) is handed out again,
//! to any worker. [`OutboxStore::finish_job`] ends the lease with the next step (done, retry at
//! a time, dead-letter) in one atomic operation. So a job is never lost between claim and
//! finish, and in the normal case it is held by one worker at a time.
//!
//! How the usual non-success cases show up, as for [`super::TokenStore`]: misses are `Ok(None)`
//! or `Ok(false)`; a backend that is down is [`StoreError::Unavailable`].

use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;
use crate::domain::token::MerchantId;
use crate::domain::webhooks::{
    DeliveryState, EndpointId, EventId, EventRecord, WebhookEndpoint, WebhookEvent,
};

/// Dead-lettered jobs kept for operators (the oldest are dropped beyond this). The delivery
/// state of the event says `dead` regardless.
pub const DEAD_LETTER_MAX: usize = 10_000;

/// A claimed delivery job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxJob {
    pub merchant: MerchantId,
    pub event: EventId,
    pub endpoint: EndpointId,
    /// Attempts already made in this round.
    pub attempts: u32,
    /// The backend's handle on this claim (a stream entry id, a lease key); opaque.
    pub handle: String,
}

/// What happens to a job when its attempt is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobNext {
    /// Delivered (or nothing left to deliver): the job goes away.
    Done,
    /// Another attempt at `at_ms` (Unix milliseconds), with `attempts + 1`.
    Retry { at_ms: u64 },
    /// Give up: the job moves to the dead-letter list with a short reason code.
    Dead { reason: String },
}

/// Persistence of the webhook outbox.
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    // --- endpoints --------------------------------------------------------------------------

    /// Stores an endpoint unless the merchant already has `max` of them (then `Ok(false)`,
    /// nothing written). Atomic: concurrent inserts cannot exceed `max`.
    async fn insert_endpoint(&self, ep: &WebhookEndpoint, max: usize) -> Result<bool, StoreError>;

    /// The merchant's endpoints, in no particular order.
    async fn list_endpoints(
        &self,
        merchant: &MerchantId,
    ) -> Result<Vec<WebhookEndpoint>, StoreError>;

    async fn get_endpoint(
        &self,
        merchant: &MerchantId,
        id: &EndpointId,
    ) -> Result<Option<WebhookEndpoint>, StoreError>;

    /// Replaces the stored endpoint `expected` by `new` (same merchant and id), only if the
    /// stored one still equals `expected`: a compare-and-set, so an update and a secret
    /// rotation racing each other cannot silently undo one another, and a deleted endpoint is
    /// not brought back. `Ok(false)` (nothing written) when it changed or is gone.
    async fn replace_endpoint(
        &self,
        expected: &WebhookEndpoint,
        new: &WebhookEndpoint,
    ) -> Result<bool, StoreError>;

    /// Removes an endpoint; `Ok(false)` when the merchant has no such endpoint.
    async fn delete_endpoint(
        &self,
        merchant: &MerchantId,
        id: &EndpointId,
    ) -> Result<bool, StoreError>;

    // --- events -----------------------------------------------------------------------------

    /// Stores `event` with a `pending` delivery per endpoint and queues one job per delivery,
    /// due now. Also drops events older than `retention` (a bounded batch per call). One
    /// transaction on the embedded store and on standalone Redis; on Redis Cluster the event is
    /// written before its jobs, so a job never names a missing event.
    async fn enqueue_event(
        &self,
        event: &WebhookEvent,
        endpoints: &[EndpointId],
        retention: Duration,
    ) -> Result<(), StoreError>;

    /// The event and its deliveries; `None` when unknown (or expired).
    async fn get_event(
        &self,
        merchant: &MerchantId,
        id: &EventId,
    ) -> Result<Option<EventRecord>, StoreError>;

    /// Up to `limit` of the merchant's events, newest first, strictly older than `before`.
    async fn list_events(
        &self,
        merchant: &MerchantId,
        before: Option<&EventId>,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError>;

    /// Replaces the delivery state of one event for one endpoint.
    async fn put_delivery(
        &self,
        merchant: &MerchantId,
        event: &EventId,
        state: &DeliveryState,
    ) -> Result<(), StoreError>;

    /// Resets the deliveries to `endpoints` to `pending` and queues a fresh job (0 attempts) for
    /// each, due now. Same atomicity as [`OutboxStore::enqueue_event`].
    async fn redeliver(
        &self,
        merchant: &MerchantId,
        event: &EventId,
        endpoints: &[EndpointId],
    ) -> Result<(), StoreError>;

    // --- job queue --------------------------------------------------------------------------

    /// Claims up to `max` due jobs for `consumer` (due retries, jobs whose previous claim is
    /// older than `lease`, new jobs). A claimed job is not handed out again before `lease`
    /// passes.
    async fn claim_jobs(
        &self,
        consumer: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxJob>, StoreError>;

    /// Ends a claim with the next step, atomically. `Ok(false)` when the claim was no longer
    /// held (its lease ran out and another worker took the job): then nothing is scheduled, the
    /// new holder decides.
    async fn finish_job(&self, job: &OutboxJob, next: JobNext) -> Result<bool, StoreError>;
}
