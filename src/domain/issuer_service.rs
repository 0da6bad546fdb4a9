//! The issuer use cases: onboarding issuers, starting D1 operations for them, folding D1's
//! card/consumer-operation notifications in exactly once, and the background worker that
//! re-drives calls whose outcome is unknown and polls operations no notification finished.
//!
//! # Write before calling, re-drive with the same id
//!
//! An operation is stored `PENDING` with a fresh `issuerRequestId` **before** D1 is called. D1's
//! answer decides what happens next:
//! - 2xx: D1 has the operation; its `operationId` is noted and the operation stays `PENDING`
//!   until a notification (or a poll) finishes it;
//! - 4xx: D1 refused it; the operation is `FAILED` with D1's `errorCode`, and the caller gets a
//!   4xx problem carrying that code;
//! - 5xx, timeout, D1 unavailable: the outcome is unknown; the operation stays `PENDING` and the
//!   worker re-drives the same call with the same `issuerRequestId`, which D1 answers with the
//!   operation it already has (never a second one).
//!
//! # Exactly once
//!
//! A notification item is applied in one atomic store step that replaces the operation
//! (compare-and-set) and marks the item as processed ([`IssuerOperationStore::apply_notification`]),
//! so a batch delivered twice, or to two instances at once, changes each operation once and
//! emits one webhook. A final status never goes back to `PENDING`
//! ([`IssuerOperation::apply_remote`]), so reordered deliveries cannot regress an operation.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::watch;

use super::apikeys::{ApiKeyRecord, Scopes, TenantKind, parse_scopes_for};
use super::error::{DomainError, ProviderError};
use super::issuer::{Issuer, IssuerId, check_d1_issuer_id, check_issuer_name};
use super::issuer_ops::{
    ChangeSource, IssuerOperation, OperationCall, OperationFilter, OperationId, OperationKind,
    OperationStatus, OperationTarget, RemoteOperation, new_request_id, valid_d1_id,
};
use super::issuer_provider::{IssuerProvider, StartOperation};
use super::merchant::NewApiKey;
use super::service::Services;
use crate::domain::ports::StoreError;
use crate::domain::ports::issuer_operations::{
    IssuerOperationStore, NotificationWrite, OperationInsert, OperationPage,
};
use crate::domain::ports::issuers::IssuerStore;
use crate::domain::ports::lifecycle::LifecycleStore;
use crate::domain::ports::outbox::EventAppend;

/// Version conflicts retried before answering "try again".
const CAS_ATTEMPTS: usize = 5;
/// The worker's lease (one instance re-drives and polls at a time).
const LEASE_NAME: &str = "issuer-operations";

/// Timing of the re-drive and polling worker (`[issuer]` in the configuration).
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// How often the worker looks for due operations.
    pub worker_interval: Duration,
    /// Delay before the first re-drive of a call whose outcome is unknown.
    pub redrive_after: Duration,
    /// How long a `PENDING` operation D1 acknowledged waits for a notification before it is
    /// polled with get-operation.
    pub poll_after: Duration,
    /// Longest delay between two re-drives or polls of one operation (the delay doubles).
    pub max_backoff: Duration,
    /// Operations looked at per issuer and tick.
    pub batch: usize,
    /// How long a processed notification item is remembered (D1's redelivery window).
    pub notification_ttl: Duration,
    /// The worker lease's lifetime.
    pub lease: Duration,
}

impl Default for IssuerSettings {
    fn default() -> Self {
        IssuerSettings {
            worker_interval: Duration::from_secs(1),
            redrive_after: Duration::from_secs(2),
            poll_after: Duration::from_secs(60),
            max_backoff: Duration::from_secs(600),
            batch: 100,
            notification_ttl: Duration::from_secs(7 * 24 * 3600),
            lease: Duration::from_secs(30),
        }
    }
}

/// Told about every change of an operation of its kind that the gateway stored (from a
/// notification or a poll), after it is stored: how part 2 follows production tracking
/// (`details.status` of `PRODUCE`) without this module knowing about card orders.
#[async_trait]
pub trait OperationHook: Send + Sync + 'static {
    async fn operation_changed(
        &self,
        before: &IssuerOperation,
        after: &IssuerOperation,
    ) -> Result<(), DomainError>;
}

/// What a notification batch did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NotifyReport {
    pub applied: usize,
    pub duplicate: usize,
    pub unchanged: usize,
    /// Items naming an operation this gateway did not start: recorded in the log, acknowledged.
    pub unknown: usize,
}

/// The issuer use cases.
#[derive(Clone)]
pub struct IssuerService {
    pub issuers: Arc<dyn IssuerStore>,
    pub ops: Arc<dyn IssuerOperationStore>,
    provider: Option<Arc<dyn IssuerProvider>>,
    services: Services,
    settings: IssuerSettings,
    hooks: Arc<RwLock<Hooks>>,
}

/// The registered [`OperationHook`]s, by operation kind.
type Hooks = HashMap<String, Vec<Arc<dyn OperationHook>>>;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn unix_ms(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

fn after(d: Duration) -> OffsetDateTime {
    now() + time::Duration::try_from(d).unwrap_or(time::Duration::ZERO)
}

/// The dedup key of a notification item: a digest of everything the item says, so the same item
/// delivered again is recognised, and a later item about the same operation is not.
pub fn notification_key(issuer: &IssuerId, r: &RemoteOperation) -> String {
    let mut h = Sha256::new();
    let end = r
        .end_time
        .map(|t| unix_ms(t).to_string())
        .unwrap_or_default();
    let details = r
        .details
        .as_ref()
        .map(|d| d.to_string())
        .unwrap_or_default();
    for part in [
        issuer.as_str(),
        r.d1_operation_id.as_str(),
        r.kind.as_str(),
        r.status.map_or("?", OperationStatus::as_str),
        end.as_str(),
        r.error_code.as_deref().unwrap_or(""),
        details.as_str(),
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    crate::crypto::hex_lower(&h.finalize()[..16])
}

impl IssuerService {
    pub fn new(
        issuers: Arc<dyn IssuerStore>,
        ops: Arc<dyn IssuerOperationStore>,
        provider: Option<Arc<dyn IssuerProvider>>,
        services: Services,
        settings: IssuerSettings,
    ) -> IssuerService {
        IssuerService {
            issuers,
            ops,
            provider,
            services,
            settings,
            hooks: Arc::new(RwLock::new(HashMap::new())),
        }
    }

    pub fn settings(&self) -> &IssuerSettings {
        &self.settings
    }

    /// Registers `hook` for changes of operations of `kind` (e.g. `PRODUCE`).
    pub fn register_hook(&self, kind: &OperationKind, hook: Arc<dyn OperationHook>) {
        self.hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind.as_str().to_owned())
            .or_default()
            .push(hook);
    }

    fn provider(&self) -> Result<&Arc<dyn IssuerProvider>, DomainError> {
        self.provider
            .as_ref()
            .ok_or(DomainError::Upstream(ProviderError::NotConfigured))
    }

    // --- issuers ---------------------------------------------------------------------------

    /// Onboards an issuer and issues its first API key (default issuer scopes).
    pub async fn create_issuer(
        &self,
        name: &str,
        d1_issuer_id: &str,
    ) -> Result<(Issuer, ApiKeyRecord, NewApiKey), DomainError> {
        let name = check_issuer_name(name)?;
        check_d1_issuer_id(d1_issuer_id)?;
        let issuer = Issuer {
            id: IssuerId::generate(),
            name,
            d1_issuer_id: d1_issuer_id.to_owned(),
            created_at: now(),
        };
        if !self.issuers.insert_issuer(&issuer).await? {
            return Err(DomainError::Duplicate {
                problem: "d1_issuer_id_taken",
                detail: "another issuer is onboarded with this d1IssuerId".into(),
            });
        }
        let (rec, key) = self
            .services
            .create_api_key(
                &issuer.id.tenant(),
                "default",
                Scopes::default_for_issuer_key(),
            )
            .await?;
        Ok((issuer, rec, key))
    }

    /// Issues another key for an issuer (admin), with issuer scopes only.
    pub async fn create_issuer_key(
        &self,
        issuer: &IssuerId,
        name: &str,
        scopes: &[String],
    ) -> Result<(ApiKeyRecord, NewApiKey), DomainError> {
        if self.issuers.get_issuer(issuer).await?.is_none() {
            return Err(DomainError::IssuerNotFound);
        }
        let scopes = parse_scopes_for(scopes, TenantKind::Issuer)?;
        self.services
            .create_api_key(&issuer.tenant(), name, scopes)
            .await
    }

    pub async fn get_issuer(&self, id: &IssuerId) -> Result<Issuer, DomainError> {
        self.issuers
            .get_issuer(id)
            .await?
            .ok_or(DomainError::IssuerNotFound)
    }

    /// Every issuer, oldest first.
    pub async fn list_issuers(&self) -> Result<Vec<Issuer>, DomainError> {
        let mut v = self.issuers.list_issuers().await?;
        v.sort_by(|a, b| (a.created_at, a.id.as_str()).cmp(&(b.created_at, b.id.as_str())));
        Ok(v)
    }

    // --- operations ------------------------------------------------------------------------

    /// Stores a `PENDING` operation, then asks D1 to start it (see the module docs). Answers the
    /// operation as stored after D1's answer; a D1 refusal is an error carrying D1's code (the
    /// operation is kept, `FAILED`).
    pub async fn start_operation(
        &self,
        issuer: &Issuer,
        kind: OperationKind,
        target: OperationTarget,
        call: OperationCall,
    ) -> Result<IssuerOperation, DomainError> {
        let provider = self.provider()?.clone();
        let mut op = IssuerOperation::new(
            issuer.id.clone(),
            kind,
            target,
            new_request_id(),
            call,
            now(),
        );
        // The call below is in flight: the worker looks only once it could have answered.
        op.next_check_at = after(self.settings.redrive_after);
        match self.ops.insert_operation(&op).await? {
            OperationInsert::Inserted => {}
            // A fresh random request id cannot collide; if it ever did, nothing was written.
            OperationInsert::Existing(_) => {
                return Err(DomainError::Internal("issuerRequestId collision".into()));
            }
        }
        self.submit(issuer, &provider, op).await
    }

    // --- operations whose D1 call the caller makes (part 2: card orders) ------------------

    /// Stores a `PENDING` operation for a D1 call the caller makes itself (card orders carry
    /// card data, which is never stored, so only their caller can re-drive them). The caller's
    /// `issuer_request_id` is the anchor: the same id again answers the stored operation and
    /// `false` (nothing written), so a retried order is the same order.
    pub async fn begin_external(
        &self,
        issuer: &Issuer,
        kind: OperationKind,
        target: OperationTarget,
        issuer_request_id: &str,
    ) -> Result<(IssuerOperation, bool), DomainError> {
        if !valid_d1_id(issuer_request_id) {
            return Err(DomainError::Validation {
                code: "invalid_issuer_request_id",
                detail: "issuerRequestId must match ^[A-Za-z0-9_-]{1,64}$".into(),
            });
        }
        let mut op = IssuerOperation::new(
            issuer.id.clone(),
            kind,
            target,
            issuer_request_id.to_owned(),
            OperationCall::External,
            now(),
        );
        op.next_check_at = after(self.settings.poll_after);
        match self.ops.insert_operation(&op).await? {
            OperationInsert::Inserted => Ok((op, true)),
            OperationInsert::Existing(existing) => Ok((*existing, false)),
        }
    }

    /// D1 accepted the caller's call: its operation id is noted (polled later if no
    /// notification comes). Answers the operation as stored.
    pub async fn external_acknowledged(
        &self,
        op: IssuerOperation,
        d1_operation_id: &str,
    ) -> IssuerOperation {
        let next = op.acknowledged(d1_operation_id, after(self.settings.poll_after));
        self.store_update(op, next).await
    }

    /// D1 refused the caller's call: the operation is `FAILED` with D1's code (its webhook
    /// events written with it).
    pub async fn external_rejected(&self, op: IssuerOperation, code: &str) -> IssuerOperation {
        let next = op.rejected(code, now());
        self.store_update(op, next).await
    }

    /// Calls D1 for `op` (first call or re-drive) and stores what D1 answered.
    async fn submit(
        &self,
        issuer: &Issuer,
        provider: &Arc<dyn IssuerProvider>,
        op: IssuerOperation,
    ) -> Result<IssuerOperation, DomainError> {
        let target = match (&op.card_id, &op.consumer_id) {
            (Some(c), _) => OperationTarget::Card(c.clone()),
            (None, Some(c)) => OperationTarget::Consumer(c.clone()),
            (None, None) => return Err(DomainError::Internal("operation without target".into())),
        };
        let result = provider
            .start_operation(&StartOperation {
                d1_issuer_id: &issuer.d1_issuer_id,
                kind: &op.kind,
                target: &target,
                issuer_request_id: &op.issuer_request_id,
                call: &op.call,
            })
            .await;
        match result {
            Ok(ack) => {
                let next = op.acknowledged(&ack.d1_operation_id, after(self.settings.poll_after));
                Ok(self.store_update(op, next).await)
            }
            Err(ProviderError::Rejected { status, code }) => {
                let next = op.rejected(&code, now());
                self.store_update(op, next).await;
                Err(DomainError::Upstream(ProviderError::Rejected {
                    status,
                    code,
                }))
            }
            Err(ProviderError::NotFound) => {
                // D1 does not know the card or consumer (without a code of its own).
                let code = "NOT_FOUND".to_owned();
                let next = op.rejected(&code, now());
                self.store_update(op, next).await;
                Err(DomainError::Upstream(ProviderError::Rejected {
                    status: 404,
                    code,
                }))
            }
            Err(ProviderError::NotConfigured) => {
                Err(DomainError::Upstream(ProviderError::NotConfigured))
            }
            Err(e) => {
                // Unknown outcome: stays PENDING, re-driven by the worker with the same id.
                tracing::info!(operation_id = %op.id, error = %e,
                    "D1 outcome unknown; the operation will be re-driven");
                let backoff = self.backoff(self.settings.redrive_after, op.attempts);
                let next = op.rescheduled(after(backoff));
                Ok(self.store_update(op, next).await)
            }
        }
    }

    /// Writes `next` over `prev` with the webhook events of the change (same atomic step); on a
    /// conflict (a notification won the race) the stored record is re-read and answered: it is
    /// at least as recent as ours, and its own write stored its events.
    pub async fn store_update(
        &self,
        prev: IssuerOperation,
        next: IssuerOperation,
    ) -> IssuerOperation {
        let written = match self.webhook_events(Some(&prev), &next).await {
            Ok(events) => self
                .ops
                .update_operation_with(&next, &events)
                .await
                .map(|()| self.webhooks_stored(&events))
                .map_err(DomainError::from),
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => next,
            Err(e) => {
                tracing::warn!(operation_id = %prev.id, error = %e, "operation update not stored");
                match self.ops.get_operation(&prev.issuer_id, &prev.id).await {
                    Ok(Some(cur)) => cur,
                    _ => prev,
                }
            }
        }
    }

    fn backoff(&self, base: Duration, attempts: u32) -> Duration {
        base.saturating_mul(1u32 << attempts.min(16))
            .min(self.settings.max_backoff)
    }

    pub async fn get_operation(
        &self,
        issuer: &IssuerId,
        id: &str,
    ) -> Result<IssuerOperation, DomainError> {
        let Some(id) = OperationId::parse(id) else {
            return Err(DomainError::OperationNotFound);
        };
        self.ops
            .get_operation(issuer, &id)
            .await?
            .ok_or(DomainError::OperationNotFound)
    }

    pub async fn list_operations(
        &self,
        issuer: &IssuerId,
        filter: &OperationFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<OperationPage, DomainError> {
        if let Some(c) = cursor
            && !super::issuer_ops::valid_cursor(c)
        {
            return Err(DomainError::Validation {
                code: "invalid_cursor",
                detail: "the cursor is not one this list returned".into(),
            });
        }
        Ok(self
            .ops
            .list_operations(issuer, filter, limit, cursor)
            .await?)
    }

    // --- notifications ---------------------------------------------------------------------

    /// The issuer D1 notifications for `d1_issuer_id` are about; `None` for one not onboarded.
    pub async fn issuer_by_d1_id(&self, d1_issuer_id: &str) -> Result<Option<Issuer>, DomainError> {
        Ok(self.issuers.issuer_by_d1_id(d1_issuer_id).await?)
    }

    /// Applies a batch of D1 operation notifications for `issuer`, each item exactly once (see
    /// the module docs). An error means a redelivery may succeed (items applied before it stay
    /// applied, and are recognised then).
    pub async fn handle_notification(
        &self,
        issuer: &Issuer,
        items: &[RemoteOperation],
    ) -> Result<NotifyReport, DomainError> {
        let mut report = NotifyReport::default();
        for item in items {
            self.apply_item(issuer, item, &mut report).await?;
        }
        Ok(report)
    }

    async fn find_operation(
        &self,
        issuer: &IssuerId,
        item: &RemoteOperation,
    ) -> Result<Option<IssuerOperation>, StoreError> {
        if valid_d1_id(&item.d1_operation_id)
            && let Some(op) = self
                .ops
                .operation_by_d1_id(issuer, &item.d1_operation_id)
                .await?
        {
            return Ok(Some(op));
        }
        match item.issuer_request_id.as_deref() {
            Some(r) if valid_d1_id(r) => self.ops.operation_by_request_id(issuer, r).await,
            _ => Ok(None),
        }
    }

    async fn apply_item(
        &self,
        issuer: &Issuer,
        item: &RemoteOperation,
        report: &mut NotifyReport,
    ) -> Result<(), DomainError> {
        let key = notification_key(&issuer.id, item);
        for _ in 0..CAS_ATTEMPTS {
            let found = match self.find_operation(&issuer.id, item).await? {
                Some(op) => Some(op),
                None => self.adopt_card_operation(issuer, item).await?,
            };
            let Some(op) = found else {
                // Not ours (or not known yet): acknowledged so D1 stops redelivering, and logged
                // with its ids (never card data: items carry none) for the operator.
                tracing::warn!(issuer_id = %issuer.id, d1_operation_id = %item.d1_operation_id,
                    operation = item.kind.as_str(), "notification for an unknown operation; ignored");
                report.unknown += 1;
                return Ok(());
            };
            let Some(next) = op.apply_remote(item, ChangeSource::Notification, now()) else {
                report.unchanged += 1;
                return Ok(());
            };
            let events = self.webhook_events(Some(&op), &next).await?;
            match self
                .ops
                .apply_notification_with(&next, &key, self.settings.notification_ttl, &events)
                .await
            {
                Ok(NotificationWrite::Applied) => {
                    report.applied += 1;
                    self.webhooks_stored(&events);
                    self.announce(Some(&op), &next).await;
                    return Ok(());
                }
                Ok(NotificationWrite::Duplicate) => {
                    report.duplicate += 1;
                    return Ok(());
                }
                Err(StoreError::Conflict) | Err(StoreError::NotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(DomainError::Conflict)
    }

    /// A card lifecycle operation (`DELETE`, `SUSPEND`, `RESUME`) D1 ran without us (the bank
    /// used another D1 channel) is still news about the issuer's card: it is recorded as an
    /// operation of its own (`issuerRequestId` derived from D1's operation id, so every
    /// instance and every redelivery derives the same one and the insert dedups them), `PENDING`
    /// and not yet naming D1's id, so the caller applies the item to it exactly like to an
    /// operation we started (marker + compare-and-set, hooks, webhooks). `None`: not adoptable.
    async fn adopt_card_operation(
        &self,
        issuer: &Issuer,
        item: &RemoteOperation,
    ) -> Result<Option<IssuerOperation>, StoreError> {
        let adoptable = matches!(
            item.kind,
            OperationKind::Delete | OperationKind::Suspend | OperationKind::Resume
        );
        let Some(card_id) = item.card_id.as_deref() else {
            return Ok(None);
        };
        if !adoptable
            || !valid_d1_id(&item.d1_operation_id)
            || !super::issuer::valid_card_id(card_id)
        {
            return Ok(None);
        }
        let digest = Sha256::digest(item.d1_operation_id.as_bytes());
        let request_id = format!("d1op_{}", crate::crypto::hex_lower(&digest[..16]));
        let mut op = IssuerOperation::new(
            issuer.id.clone(),
            item.kind.clone(),
            OperationTarget::Card(card_id.to_owned()),
            request_id,
            OperationCall::External,
            item.start_time.unwrap_or_else(now),
        );
        op.next_check_at = after(self.settings.poll_after);
        match self.ops.insert_operation(&op).await? {
            OperationInsert::Inserted => {
                tracing::info!(issuer_id = %issuer.id, operation_id = %op.id,
                    operation = op.kind.as_str(), "recorded a card operation D1 ran for the issuer");
                Ok(Some(op))
            }
            OperationInsert::Existing(existing) => Ok(Some(*existing)),
        }
    }

    /// The webhook events of the change `before` -> `after`, to write with it (none without
    /// webhooks or listeners).
    async fn webhook_events(
        &self,
        before: Option<&IssuerOperation>,
        after: &IssuerOperation,
    ) -> Result<Vec<EventAppend>, DomainError> {
        match &self.services.webhooks {
            Some(w) => w.issuer_events_for(before, after).await,
            None => Ok(Vec::new()),
        }
    }

    /// After a write stored `events`: wakes the delivery worker.
    fn webhooks_stored(&self, events: &[EventAppend]) {
        if let Some(w) = &self.services.webhooks {
            w.events_stored(events);
        }
    }

    /// After a stored change: the registered hooks (changes with a `before` only). Best effort:
    /// the change (and its webhook events, written with it) is stored, a failure here is logged.
    async fn announce(&self, before: Option<&IssuerOperation>, after: &IssuerOperation) {
        let Some(before) = before else { return };
        let hooks = self
            .hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(after.kind.as_str())
            .cloned()
            .unwrap_or_default();
        for h in hooks {
            if let Err(e) = h.operation_changed(before, after).await {
                tracing::warn!(operation_id = %after.id, error = %e, "operation hook failed");
            }
        }
    }

    // --- the worker ------------------------------------------------------------------------

    /// Re-drives and polls until `stop` turns true. One instance at a time (a lease), though two
    /// at once would only repeat calls D1 dedups and race on compare-and-set writes.
    pub async fn run(self, lifecycle: Arc<dyn LifecycleStore>, mut stop: watch::Receiver<bool>) {
        let holder = uuid::Uuid::new_v4().simple().to_string();
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.settings.worker_interval) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            match lifecycle
                .acquire_lease(LEASE_NAME, &holder, self.settings.lease)
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "issuer operations lease unavailable");
                    continue;
                }
            }
            tokio::select! {
                () = self.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        let _ = lifecycle.release_lease(LEASE_NAME, &holder).await;
    }

    /// One round over every issuer's due operations.
    pub async fn tick(&self) {
        let issuers = match self.issuers.list_issuers().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "issuer list unavailable; tick skipped");
                return;
            }
        };
        let now_ms = u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
        )
        .unwrap_or(u64::MAX);
        for issuer in issuers {
            let due = match self
                .ops
                .due_operations(&issuer.id, now_ms, self.settings.batch)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(issuer_id = %issuer.id, error = %e, "due operations unavailable");
                    continue;
                }
            };
            for id in due {
                if let Err(e) = self.check(&issuer, &id).await {
                    tracing::info!(operation_id = %id, error = %e, "operation check failed; retried later");
                }
            }
        }
    }

    /// Re-drives (outcome unknown) or polls (acknowledged, no notification yet) one operation.
    async fn check(&self, issuer: &Issuer, id: &OperationId) -> Result<(), DomainError> {
        let Some(op) = self.ops.get_operation(&issuer.id, id).await? else {
            return Ok(());
        };
        if op.status.is_final() {
            return Ok(());
        }
        let provider = self.provider()?.clone();
        if !op.submitted && op.call != OperationCall::External {
            tracing::info!(operation_id = %op.id, attempt = op.attempts + 1, "re-driving a D1 call");
            self.submit(issuer, &provider, op)
                .await
                .map(|_| ())
                .or_else(|e| match e {
                    // Recorded as FAILED by submit; nothing more to do.
                    DomainError::Upstream(ProviderError::Rejected { .. }) => Ok(()),
                    other => Err(other),
                })?;
            return Ok(());
        }
        let Some(d1_id) = op.d1_operation_id.clone() else {
            let next = op.rescheduled(after(self.backoff(self.settings.poll_after, op.attempts)));
            self.store_update(op, next).await;
            return Ok(());
        };
        let remote = provider.get_operation(&issuer.d1_issuer_id, &d1_id).await;
        let backoff = self.backoff(self.settings.poll_after, op.attempts);
        match remote {
            Ok(r) => {
                let changed = op.apply_remote(&r, ChangeSource::Poll, now());
                let mut next = changed.clone().unwrap_or_else(|| op.clone());
                next.version = op.version + 1;
                next.attempts = op.attempts.saturating_add(1);
                next.next_check_at = after(backoff);
                let events = if changed.is_some() {
                    self.webhook_events(Some(&op), &next).await?
                } else {
                    Vec::new()
                };
                match self.ops.update_operation_with(&next, &events).await {
                    Ok(()) => {
                        self.webhooks_stored(&events);
                        if changed.is_some() {
                            self.announce(Some(&op), &next).await;
                        }
                    }
                    Err(StoreError::Conflict) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => {
                tracing::info!(operation_id = %op.id, error = %e, "get-operation failed; polled again later");
                let next = op.rescheduled(after(backoff));
                self.store_update(op, next).await;
            }
        }
        Ok(())
    }
}

// --- Click to Pay ----------------------------------------------------------------------------

/// Longest cardholder name D1 accepts (Visa's limit).
pub const MAX_CARDHOLDER_NAME: usize = 26;

/// The optional `reason` and `reasonCode` of a Click to Pay call, checked against D1's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reason {
    pub reason: Option<String>,
    pub reason_code: Option<String>,
}

fn invalid(code: &'static str, detail: &str) -> DomainError {
    DomainError::Validation {
        code,
        detail: detail.to_owned(),
    }
}

fn check_card_id(card_id: &str) -> Result<(), DomainError> {
    if super::issuer::valid_card_id(card_id) {
        Ok(())
    } else {
        Err(invalid(
            "invalid_card_id",
            "cardId must match ^[A-Za-z0-9_-]{1,48}$",
        ))
    }
}

fn check_consumer_id(consumer_id: &str) -> Result<(), DomainError> {
    if super::issuer::valid_consumer_id(consumer_id) {
        Ok(())
    } else {
        Err(invalid(
            "invalid_consumer_id",
            "consumerId must match ^[A-Za-z0-9_-]{1,64}$",
        ))
    }
}

fn check_reason(r: &Reason) -> Result<(), DomainError> {
    if let Some(reason) = &r.reason
        && !((1..=64).contains(&reason.len())
            && reason
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b' '))
    {
        return Err(invalid(
            "invalid_reason",
            "reason must match ^[a-zA-Z0-9 ]{1,64}$",
        ));
    }
    if let Some(code) = &r.reason_code
        && !((1..=64).contains(&code.len())
            && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
    {
        return Err(invalid(
            "invalid_reason_code",
            "reasonCode must be 1 to 64 characters of A-Z and `_`, e.g. ISSUER_DECISION",
        ));
    }
    Ok(())
}

/// 1 to 26 printable characters (D1: at most 26, Visa's limit).
fn check_cardholder_name(name: &str) -> Result<(), DomainError> {
    let n = name.chars().count();
    if n == 0
        || n > MAX_CARDHOLDER_NAME
        || name.chars().any(char::is_control)
        || name.trim().is_empty()
    {
        return Err(invalid(
            "invalid_cardholder_name",
            "cardholderName must be 1 to 26 printable characters",
        ));
    }
    Ok(())
}

impl IssuerService {
    /// Enrols a card in Click to Pay (`operations:clickToPayEnrolment`). Validated before
    /// anything is stored or sent.
    pub async fn click_to_pay_enrol(
        &self,
        issuer: &Issuer,
        card_id: &str,
        cardholder_name: &str,
        reason: Reason,
    ) -> Result<IssuerOperation, DomainError> {
        check_card_id(card_id)?;
        check_cardholder_name(cardholder_name)?;
        check_reason(&reason)?;
        self.start_operation(
            issuer,
            OperationKind::ClickToPayEnrolment,
            OperationTarget::Card(card_id.to_owned()),
            OperationCall::ClickToPayEnrolment {
                cardholder_name: cardholder_name.to_owned(),
                reason: reason.reason,
                reason_code: reason.reason_code,
            },
        )
        .await
    }

    /// Updates a card's or a consumer's Click to Pay data (`operations:clickToPayUpdate`).
    pub async fn click_to_pay_update(
        &self,
        issuer: &Issuer,
        target: OperationTarget,
        cardholder_name: Option<&str>,
        reason: Reason,
    ) -> Result<IssuerOperation, DomainError> {
        match &target {
            OperationTarget::Card(c) => check_card_id(c)?,
            OperationTarget::Consumer(c) => check_consumer_id(c)?,
        }
        if let Some(n) = cardholder_name {
            check_cardholder_name(n)?;
        }
        check_reason(&reason)?;
        self.start_operation(
            issuer,
            OperationKind::ClickToPayUpdate,
            target,
            OperationCall::ClickToPayUpdate {
                cardholder_name: cardholder_name.map(str::to_owned),
                reason: reason.reason,
                reason_code: reason.reason_code,
            },
        )
        .await
    }

    /// Opts a card or a consumer out of Click to Pay (`operations:clickToPayOptOut`).
    pub async fn click_to_pay_opt_out(
        &self,
        issuer: &Issuer,
        target: OperationTarget,
        reason: Reason,
    ) -> Result<IssuerOperation, DomainError> {
        match &target {
            OperationTarget::Card(c) => check_card_id(c)?,
            OperationTarget::Consumer(c) => check_consumer_id(c)?,
        }
        check_reason(&reason)?;
        self.start_operation(
            issuer,
            OperationKind::ClickToPayOptOut,
            target,
            OperationCall::ClickToPayOptOut {
                reason: reason.reason,
                reason_code: reason.reason_code,
            },
        )
        .await
    }

    /// The Click to Pay profiles of a card or consumer (at most one per directory; empty when
    /// not enrolled). The card number in them is masked by the D1 client.
    pub async fn click_to_pay_profiles(
        &self,
        issuer: &Issuer,
        target: OperationTarget,
    ) -> Result<Vec<super::issuer_provider::ClickToPayProfile>, DomainError> {
        match &target {
            OperationTarget::Card(c) => check_card_id(c)?,
            OperationTarget::Consumer(c) => check_consumer_id(c)?,
        }
        let provider = self.provider()?.clone();
        match provider
            .click_to_pay_profiles(&issuer.d1_issuer_id, &target)
            .await
        {
            Ok(p) => Ok(p),
            // D1 does not know the card or consumer: nothing is enrolled.
            Err(ProviderError::NotFound) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::storage::embedded::EmbeddedStore;

    /// Counts the changes it is told about, and remembers the last `details.status`.
    #[derive(Default)]
    struct Tracker {
        calls: AtomicUsize,
        last: std::sync::Mutex<Option<String>>,
    }

    #[async_trait]
    impl OperationHook for Tracker {
        async fn operation_changed(
            &self,
            _before: &IssuerOperation,
            after: &IssuerOperation,
        ) -> Result<(), DomainError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            *self.last.lock().unwrap() = after
                .details
                .as_ref()
                .and_then(|d| d.get("status"))
                .and_then(|s| s.as_str())
                .map(str::to_owned);
            Ok(())
        }
    }

    fn produce(d1: &str, status: OperationStatus, details: &str) -> RemoteOperation {
        RemoteOperation {
            d1_operation_id: d1.into(),
            kind: OperationKind::Produce,
            status: Some(status),
            start_time: None,
            end_time: None,
            card_id: Some("card-1".into()),
            consumer_id: None,
            issuer_request_id: None,
            error_code: None,
            error: None,
            details: Some(serde_json::json!({ "status": details })),
        }
    }

    /// The path part 2 takes: an order whose D1 call the caller makes, idempotent on its
    /// `issuerRequestId`, then production tracking from D1's notifications through a hook,
    /// each change once.
    #[tokio::test]
    async fn external_operations_and_hooks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let keyring =
            Arc::new(crate::crypto::Keyring::new(&crate::crypto::dev::material()).unwrap());
        let services = Services::new(store.clone(), keyring, None, Duration::from_secs(1))
            .with_keys(store.clone());
        let svc = IssuerService::new(
            store.clone(),
            store.clone(),
            None,
            services,
            IssuerSettings::default(),
        );
        let tracker = Arc::new(Tracker::default());
        svc.register_hook(&OperationKind::Produce, tracker.clone());
        let (issuer, _, _) = svc.create_issuer("Bank", "BANK000001").await.unwrap();

        let target = || OperationTarget::Card("card-1".into());
        let (op, created) = svc
            .begin_external(&issuer, OperationKind::Produce, target(), "order-1")
            .await
            .unwrap();
        assert!(created);
        let (again, created) = svc
            .begin_external(&issuer, OperationKind::Produce, target(), "order-1")
            .await
            .unwrap();
        assert!(!created, "the same issuerRequestId is the same order");
        assert_eq!(again.id, op.id);
        assert!(
            svc.begin_external(&issuer, OperationKind::Produce, target(), "bad id")
                .await
                .is_err()
        );
        let op = svc.external_acknowledged(op, "d1-order-1").await;
        assert_eq!(op.d1_operation_id.as_deref(), Some("d1-order-1"));

        let batch = [
            produce(
                "d1-order-1",
                OperationStatus::Pending,
                "CARD_PROD_REQUESTED",
            ),
            produce("d1-order-1", OperationStatus::Pending, "CARD_PROD_READY"),
            produce("d1-order-1", OperationStatus::Successful, "CARD_SHIPPED"),
        ];
        let r = svc.handle_notification(&issuer, &batch).await.unwrap();
        assert_eq!(r.applied, 3);
        // Redelivered: nothing changes, no hook call.
        let r = svc.handle_notification(&issuer, &batch).await.unwrap();
        assert_eq!(r.applied, 0);
        assert_eq!(tracker.calls.load(Ordering::SeqCst), 3);
        assert_eq!(
            tracker.last.lock().unwrap().as_deref(),
            Some("CARD_SHIPPED")
        );
        let stored = svc.get_operation(&issuer.id, op.id.as_str()).await.unwrap();
        assert_eq!(stored.status, OperationStatus::Successful);
        let tracked: Vec<_> = stored
            .history
            .iter()
            .filter_map(|h| h.details_status.as_deref())
            .collect();
        assert_eq!(
            tracked,
            ["CARD_PROD_REQUESTED", "CARD_PROD_READY", "CARD_SHIPPED"]
        );
        // A stranger's operation is acknowledged and ignored.
        let r = svc
            .handle_notification(
                &issuer,
                &[produce("nobody", OperationStatus::Failed, "DATA_EXCEPTION")],
            )
            .await
            .unwrap();
        assert_eq!(r.unknown, 1);
    }
}
