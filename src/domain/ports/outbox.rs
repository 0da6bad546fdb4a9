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
//! # Order per subject
//!
//! Events of one subject ([`WebhookEvent::subject`]: the token, or the issuer operation) are
//! delivered to each endpoint in the order they were appended. The append puts each
//! delivery's job at the tail of the (endpoint, subject) chain, in the same atomic write as the
//! event; only the chain's head is in the job queue. When the head's job ends with
//! [`JobNext::Done`] or [`JobNext::Dead`], [`OutboxStore::finish_job`] removes it from the
//! chain and queues the next one (before it releases the claim, so a crash in between leaves
//! the job claimed, and whoever takes it over finds the delivery finished, drops it and
//! releases the chain then). A retry keeps the head in place, so a later event of the subject
//! waits while an earlier one is pending or backing off; other subjects are not held up.
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
    /// The event's ordering subject ([`WebhookEvent::subject`]) when the job is part of its
    /// in-order chain to this endpoint; `None` for events without a subject, for redeliveries
    /// (sent out of band) and for jobs queued before ordering existed.
    pub subject: Option<String>,
    /// The backend's handle on this claim (a stream entry id, a lease key); opaque.
    pub handle: String,
}

/// A webhook event to store **in the same atomic step** as the token change that caused it
/// (`TokenStore::update_token_with`, `LifecycleStore::apply_event_with`): the event, a `pending`
/// delivery per endpoint and their jobs are written only if the token write is, and always if
/// it is, so a crash can lose neither the change's event nor produce an event for a change that
/// did not happen. Events older than `retention` are trimmed as [`OutboxStore::enqueue_event`]
/// does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventAppend {
    pub event: WebhookEvent,
    /// The endpoints subscribed to the event's type when it was created (at least one).
    pub endpoints: Vec<EndpointId>,
    pub retention: Duration,
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
    /// transaction on the embedded store and one script on Redis; on Redis Cluster the script
    /// puts the jobs in the merchant's outbox shard (same slot as the event), from which they
    /// move to the shared queue right after, or by the workers' sweep if the mover died
    /// (`docs/storage.md`), so a job is never lost and never names a missing event.
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
    /// older than `lease`, new jobs). On Redis Cluster it also sweeps, at most once per `lease`
    /// per process, the merchants' outbox shards for jobs older than `lease` that were never
    /// moved to the shared queue (their writer died in between). A claimed job is not handed out again before `lease`
    /// passes.
    async fn claim_jobs(
        &self,
        consumer: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxJob>, StoreError>;

    /// Ends a claim with the next step, atomically. `Ok(false)` when the claim was no longer
    /// held (its lease ran out and another worker took the job): then nothing is scheduled, the
    /// new holder decides. `Done` and `Dead` of a job with a subject also release its chain:
    /// the next event of the subject to this endpoint is queued, due now (idempotent: only
    /// while the job's event is the chain's head).
    async fn finish_job(&self, job: &OutboxJob, next: JobNext) -> Result<bool, StoreError>;
}
