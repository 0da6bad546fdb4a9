//! Token lifecycle events from D1 (`notify-update`), each applied exactly once, and the same
//! path for what reconciliation learns by asking D1.
//!
//! # Exactly once
//!
//! - **Redelivery and duplicates**: every event carries an `eventId`. Applying an event is one
//!   atomic store step that replaces the token (compare-and-set on its version) *and* writes a
//!   processed-event marker (kept `notify.event_ttl_s`, 7 days by default); a second delivery
//!   finds the marker and changes nothing. Two instances receiving the same event at once race on
//!   that one step: exactly one wins ([`LifecycleStore::apply_event`]).
//! - **Order**: an event older (by its `timestamp`) than the newest one applied to the token
//!   (`last_event_at`) is ignored, so a late SUSPEND cannot undo a newer RESUME. Events that
//!   change nothing visible still advance `last_event_at` for that reason.
//! - **Nothing acknowledged is lost**: the HTTP handler answers 204 only after the event is
//!   durably applied (or durably recorded as a no-op). If we die before answering, D1 sees no
//!   2xx and redelivers; the marker makes that redelivery harmless if the write did land.
//!
//! # State machine
//!
//! `DELETED` is terminal: nothing moves a token out of it. D1 is the source of truth for every
//! other transition (ACTIVE <-> SUSPENDED, PENDING -> ACTIVE on `TOKEN_CREATED`, and statuses we
//! do not know, kept as [`TokenStatus::Unknown`]); only a move *back* to `PENDING` is refused.
//! `RENEWAL` refreshes the network token's last digits and expiry (and the card's, when sent)
//! and keeps our token id. Unknown event types are recorded and acknowledged, never an error.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::error::DomainError;
use super::merchant::Merchant;
use super::provider::ProviderToken;
use super::schedule::Schedule;
use super::service::Services;
use super::token::{MerchantId, NetworkTokenMeta, TokenId, TokenRecord, TokenStatus};
use crate::domain::ports::StoreError;
use crate::domain::ports::lifecycle::{EventWrite, LifecycleStore};
use crate::domain::ports::outbox::EventAppend;
use tokengate_cards::Expiry;

/// Version conflicts retried before answering "try again" (D1 then redelivers).
const CAS_ATTEMPTS: usize = 5;

/// What kind of event D1 reports (`eventType`). Unknown kinds are kept, not refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    StatusUpdate,
    Renewal,
    TokenCreated,
    Other(String),
}

impl EventKind {
    pub fn parse(s: &str) -> EventKind {
        match s {
            "STATUS_UPDATE" => EventKind::StatusUpdate,
            "RENEWAL" => EventKind::Renewal,
            "TOKEN_CREATED" => EventKind::TokenCreated,
            other => EventKind::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            EventKind::StatusUpdate => "STATUS_UPDATE",
            EventKind::Renewal => "RENEWAL",
            EventKind::TokenCreated => "TOKEN_CREATED",
            EventKind::Other(s) => s,
        }
    }
}

/// One notification, as the HTTP layer parsed it. Metadata D1 sent in an unusable shape is
/// already dropped (absent), since it is not a reason to refuse the whole event.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// D1's merchant id (path).
    pub d1_merchant_id: String,
    /// D1's token id (path).
    pub d1_token_id: String,
    pub event_id: String,
    pub kind: EventKind,
    pub timestamp: OffsetDateTime,
    /// Our token id, as given to D1 at creation.
    pub request_id: Option<String>,
    pub status: Option<TokenStatus>,
    pub token_last4: Option<String>,
    pub token_expiry: Option<Expiry>,
    pub card_last4: Option<String>,
    pub card_expiry: Option<Expiry>,
    pub par: Option<String>,
}

/// How a notification was handled. Every variant is acknowledged (204): only errors make D1
/// redeliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    Applied {
        token: TokenId,
    },
    /// Already processed (redelivery or a concurrent duplicate).
    Duplicate,
    /// Older than what the token already reflects.
    Stale,
    /// Recorded but nothing to change (terminal token, unknown event type, ...).
    Ignored(&'static str),
    UnknownMerchant,
    UnknownToken,
}

/// What reconciliation did with one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Our record was behind D1 and has been updated.
    Repaired,
    Unchanged,
    /// A newer event was applied meanwhile; the observation was dropped.
    Superseded,
    /// The token is gone from our store.
    Gone,
}

/// A change D1 reports, from an event or from reading the token.
struct Change<'a> {
    d1_token_id: &'a str,
    at: OffsetDateTime,
    status: Option<TokenStatus>,
    token_last4: Option<&'a str>,
    token_expiry: Option<Expiry>,
    par: Option<&'a str>,
    card_last4: Option<&'a str>,
    card_expiry: Option<Expiry>,
}

enum Decision {
    Apply(Box<TokenRecord>),
    Stale,
    Ignore(&'static str),
}

/// The state machine: what `change` makes of `rec`. Pure, so it is tested on its own.
fn decide(rec: &TokenRecord, change: &Change<'_>) -> Decision {
    if rec.status.is_terminal() {
        return Decision::Ignore("token is deleted");
    }
    if rec.last_event_at.is_some_and(|last| change.at < last) {
        return Decision::Stale;
    }
    if let Some(nt) = &rec.network_token
        && nt.d1_token_id != change.d1_token_id
    {
        return Decision::Ignore("token is bound to another D1 token");
    }
    let mut next = rec.clone();
    if let Some(status) = &change.status {
        if *status == TokenStatus::Pending && rec.status != TokenStatus::Pending {
            return Decision::Ignore("PENDING is only an initial status");
        }
        next.status = status.clone();
        // A deleted token takes its recurring agreement with it; a renewal keeps it (the
        // network transaction id stays valid across the card's reissue).
        if next.status.is_terminal() {
            next.recurring_agreement = None;
        }
    }
    let prev = rec.network_token.as_ref();
    next.network_token = Some(NetworkTokenMeta {
        d1_token_id: change.d1_token_id.to_owned(),
        last4: change
            .token_last4
            .map(str::to_owned)
            .or_else(|| prev.and_then(|p| p.last4.clone())),
        expiry: change.token_expiry.or_else(|| prev.and_then(|p| p.expiry)),
        par: change
            .par
            .map(str::to_owned)
            .or_else(|| prev.and_then(|p| p.par.clone())),
    });
    if let Some(e) = change.card_expiry {
        next.card.expiry = e;
    }
    if let Some(l) = change.card_last4 {
        l.clone_into(&mut next.card.last4);
    }
    next.last_event_at = Some(rec.last_event_at.map_or(change.at, |l| l.max(change.at)));
    Decision::Apply(Box::new(next))
}

/// Whether anything a merchant can see differs (timestamps and version aside).
fn visible_change(a: &TokenRecord, b: &TokenRecord) -> bool {
    a.status != b.status || a.network_token != b.network_token || a.card != b.card
}

/// Applies D1's lifecycle events and reconciliation results to our tokens.
#[derive(Clone)]
pub struct Lifecycle {
    services: Services,
    store: Arc<dyn LifecycleStore>,
    schedule: Option<Schedule>,
    event_ttl: Duration,
}

impl Lifecycle {
    /// `schedule` is the reconciliation schedule to keep in step (none when reconciliation is
    /// off); `event_ttl` how long processed event ids are remembered.
    pub fn new(
        services: Services,
        store: Arc<dyn LifecycleStore>,
        schedule: Option<Schedule>,
        event_ttl: Duration,
    ) -> Lifecycle {
        Lifecycle {
            services,
            store,
            schedule,
            event_ttl,
        }
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Handles one `notify-update`. `Ok` means durably handled (answer 204); `Err` means D1
    /// should redeliver.
    pub async fn handle_notification(&self, ev: &TokenEvent) -> Result<EventOutcome, DomainError> {
        let store = &self.services.store;
        let Some(merchant) = store.merchant_by_d1_id(&ev.d1_merchant_id).await? else {
            // Not ours (or not onboarded through us): nothing to attach it to, and D1 must not
            // retry forever. Ids only, never event content.
            tracing::warn!(event_id = %ev.event_id, event_type = ev.kind.as_str(),
                "notification for an unknown merchant; acknowledged and dropped");
            return Ok(EventOutcome::UnknownMerchant);
        };
        // Cheap pre-check; the atomic apply below is what guarantees exactly once.
        if self.store.event_seen(&merchant.id, &ev.event_id).await? {
            tracing::debug!(event_id = %ev.event_id, "duplicate notification");
            return Ok(EventOutcome::Duplicate);
        }
        if let EventKind::Other(kind) = &ev.kind {
            tracing::warn!(event_id = %ev.event_id, event_type = %kind,
                "notification of an unknown event type; recorded and acknowledged");
            return self
                .record(&merchant, ev, EventOutcome::Ignored("unknown event type"))
                .await;
        }
        let status = match ev.kind {
            // A creation without a status means the token exists: ACTIVE.
            EventKind::TokenCreated => Some(ev.status.clone().unwrap_or(TokenStatus::Active)),
            EventKind::StatusUpdate if ev.status.is_none() => {
                tracing::warn!(event_id = %ev.event_id, "status update without a status; recorded and acknowledged");
                return self
                    .record(&merchant, ev, EventOutcome::Ignored("no status"))
                    .await;
            }
            _ => ev.status.clone(),
        };
        let change = Change {
            d1_token_id: &ev.d1_token_id,
            at: ev.timestamp,
            status,
            token_last4: ev.token_last4.as_deref(),
            token_expiry: ev.token_expiry,
            par: ev.par.as_deref(),
            card_last4: ev.card_last4.as_deref(),
            card_expiry: ev.card_expiry,
        };
        for _ in 0..CAS_ATTEMPTS {
            let Some(rec) = self.find_target(&merchant, ev).await? else {
                tracing::warn!(event_id = %ev.event_id, event_type = ev.kind.as_str(),
                    "notification for an unknown token; recorded and acknowledged");
                return self.record(&merchant, ev, EventOutcome::UnknownToken).await;
            };
            let mut next = match decide(&rec, &change) {
                Decision::Apply(next) => *next,
                Decision::Stale => {
                    tracing::info!(event_id = %ev.event_id, token_id = %rec.id,
                        "notification older than the token's state; ignored");
                    return self.record(&merchant, ev, EventOutcome::Stale).await;
                }
                Decision::Ignore(why) => {
                    tracing::info!(event_id = %ev.event_id, token_id = %rec.id, reason = why,
                        "notification ignored");
                    return self.record(&merchant, ev, EventOutcome::Ignored(why)).await;
                }
            };
            self.refresh_fingerprints(&rec, &mut next);
            next.version = rec.version + 1;
            next.updated_at = OffsetDateTime::now_utc();
            // The merchant's webhook event goes into the same atomic step as the change and
            // the marker: applied once, announced once, even across a crash.
            let webhook = self.webhook_event(&rec, &next).await?;
            match self
                .store
                .apply_event_with(&next, &ev.event_id, self.event_ttl, webhook.as_ref())
                .await
            {
                Ok(EventWrite::Applied) => {
                    self.services.webhook_stored(webhook.as_ref());
                    tracing::info!(event_id = %ev.event_id, event_type = ev.kind.as_str(),
                        token_id = %next.id, status = next.status.as_str(), "token event applied");
                    self.after_write(&rec, &next).await;
                    return Ok(EventOutcome::Applied { token: next.id });
                }
                Ok(EventWrite::Duplicate) => return Ok(EventOutcome::Duplicate),
                Err(StoreError::Conflict) => continue,
                // Removed between read and write (a failed tokenization undone).
                Err(StoreError::NotFound) => {
                    return self.record(&merchant, ev, EventOutcome::UnknownToken).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(DomainError::Conflict)
    }

    /// The token an event is about: by D1 token id, else by our id as the request id (an event
    /// can beat our own write of the D1 id, e.g. `TOKEN_CREATED` of an asynchronous
    /// tokenization). `decide` refuses a token already bound to another D1 token.
    async fn find_target(
        &self,
        merchant: &Merchant,
        ev: &TokenEvent,
    ) -> Result<Option<TokenRecord>, DomainError> {
        let store = &self.services.store;
        if let Some(rec) = store
            .find_by_d1_token(&merchant.id, &ev.d1_token_id)
            .await?
        {
            return Ok(Some(rec));
        }
        match ev.request_id.as_deref().and_then(TokenId::parse) {
            Some(id) => Ok(store.get_token(&merchant.id, &id).await?),
            None => Ok(None),
        }
    }

    /// Marks an event that changes nothing as processed, so a redelivery is recognised early.
    /// A failure is logged, not returned: without the marker a redelivery reaches the same
    /// outcome again, so the acknowledgement stays correct.
    async fn record(
        &self,
        merchant: &Merchant,
        ev: &TokenEvent,
        outcome: EventOutcome,
    ) -> Result<EventOutcome, DomainError> {
        if let Err(e) = self
            .store
            .mark_event(&merchant.id, &ev.event_id, self.event_ttl)
            .await
        {
            tracing::warn!(event_id = %ev.event_id, error = %e, "could not record a no-op event");
        }
        Ok(outcome)
    }

    /// A renewal can change the card expiry, which the expiry-bound fingerprint covers: recompute
    /// it from the vaulted PAN so later tokenizations of the renewed card match exactly.
    fn refresh_fingerprints(&self, before: &TokenRecord, next: &mut TokenRecord) {
        if before.card.expiry == next.card.expiry {
            return;
        }
        let keyring = &self.services.keyring;
        match keyring.open(&before.sealed_pan, &before.merchant_id, &before.id) {
            Ok(pan) => {
                let mut fps = keyring.fingerprints(&next.merchant_id, &pan, &next.card.expiry);
                // Under the active fingerprint key now; entries under other keys stay until a
                // rotation's re-index pass completes (`domain::fp_reindex`).
                fps.carry_over(&before.fingerprints);
                next.fingerprints = fps;
            }
            Err(e) => {
                tracing::warn!(token_id = %before.id, error = %e,
                    "could not open the vaulted card to refresh its fingerprint; kept the old one");
            }
        }
    }

    /// Applies what reconciliation read from D1 (`observed_at` taken *before* the read, so an
    /// event that happened during the read wins). Writes only when something visible differs.
    pub(crate) async fn apply_observation(
        &self,
        merchant: &MerchantId,
        token: &TokenId,
        pt: &ProviderToken,
        observed_at: OffsetDateTime,
    ) -> Result<Observed, DomainError> {
        let store = &self.services.store;
        let change = Change {
            d1_token_id: &pt.d1_token_id,
            at: observed_at,
            status: Some(pt.status.clone()),
            token_last4: pt.last4.as_deref(),
            token_expiry: pt.expiry,
            par: pt.par.as_deref(),
            card_last4: None,
            card_expiry: None,
        };
        for _ in 0..CAS_ATTEMPTS {
            let Some(rec) = store.get_token(merchant, token).await? else {
                return Ok(Observed::Gone);
            };
            let mut next = match decide(&rec, &change) {
                Decision::Apply(next) if visible_change(&rec, &next) => *next,
                Decision::Apply(_) | Decision::Ignore(_) => {
                    self.reschedule(&rec).await;
                    return Ok(Observed::Unchanged);
                }
                Decision::Stale => {
                    self.reschedule(&rec).await;
                    return Ok(Observed::Superseded);
                }
            };
            next.version = rec.version + 1;
            next.updated_at = OffsetDateTime::now_utc();
            let webhook = self.webhook_event(&rec, &next).await?;
            match store.update_token_with(&next, webhook.as_ref()).await {
                Ok(()) => {
                    self.services.webhook_stored(webhook.as_ref());
                    tracing::info!(event_type = "RECONCILIATION", token_id = %next.id,
                        status = next.status.as_str(), "token repaired from D1's state");
                    self.after_write(&rec, &next).await;
                    return Ok(Observed::Repaired);
                }
                Err(StoreError::Conflict) => continue,
                Err(StoreError::NotFound) => return Ok(Observed::Gone),
                Err(e) => return Err(e.into()),
            }
        }
        Err(DomainError::Conflict)
    }

    /// The merchant webhook event of a D1-caused change, for the write that makes it: only
    /// for a visible change (the same rule as [`Self::on_token_changed`]).
    async fn webhook_event(
        &self,
        before: &TokenRecord,
        after: &TokenRecord,
    ) -> Result<Option<EventAppend>, DomainError> {
        if !visible_change(before, after) {
            return Ok(None);
        }
        self.services.webhook_event(before, after).await
    }

    async fn after_write(&self, before: &TokenRecord, after: &TokenRecord) {
        self.reschedule(after).await;
        if visible_change(before, after) {
            self.on_token_changed(before, after).await;
        }
    }

    async fn reschedule(&self, rec: &TokenRecord) {
        if let Some(s) = &self.schedule {
            s.note(rec).await;
        }
    }

    /// Called once per visible change of a token caused by D1 (an applied event or a
    /// reconciliation repair), after it is durably stored (with its merchant webhook event,
    /// in the same step). Logs the transition (ids and statuses only).
    pub async fn on_token_changed(&self, before: &TokenRecord, after: &TokenRecord) {
        // Status gauges and transition counters (src/observability.rs); same status: no-op.
        crate::observability::token_transition(
            Some(before.status.label()),
            Some(after.status.label()),
        );
        tracing::info!(
            token_id = %after.id,
            merchant_id = %after.merchant_id,
            from = before.status.as_str(),
            to = after.status.as_str(),
            version = after.version,
            "token changed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::token::{CardMeta, Fingerprints, SealedPan, Usage};
    use tokengate_cards::Brand;

    fn rec(status: TokenStatus) -> TokenRecord {
        let now = OffsetDateTime::now_utc();
        TokenRecord {
            id: TokenId::generate(),
            merchant_id: MerchantId::generate(),
            usage: Usage::CardOnFile,
            status,
            card: CardMeta {
                brand: Brand::Visa,
                bin: "411111".into(),
                last4: "1111".into(),
                expiry: Expiry {
                    month: 12,
                    year: 2030,
                },
            },
            network_token: Some(NetworkTokenMeta {
                d1_token_id: "d1tok".into(),
                last4: Some("4321".into()),
                expiry: Expiry::trusted(12, 2030),
                par: Some("PAR1".into()),
            }),
            customer_reference: None,
            sealed_pan: SealedPan {
                key_id: "k".into(),
                blob: vec![],
            },
            fingerprints: Fingerprints {
                pan: "fp".into(),
                pan_expiry: "fpe".into(),
                previous: Vec::new(),
            },
            created_at: now,
            updated_at: now,
            last_event_at: None,
            recurring_agreement: None,
            version: 3,
        }
    }

    fn change(status: Option<TokenStatus>, at: OffsetDateTime) -> Change<'static> {
        Change {
            d1_token_id: "d1tok",
            at,
            status,
            token_last4: None,
            token_expiry: None,
            par: None,
            card_last4: None,
            card_expiry: None,
        }
    }

    fn applied(d: Decision) -> TokenRecord {
        match d {
            Decision::Apply(r) => *r,
            Decision::Stale => panic!("stale"),
            Decision::Ignore(w) => panic!("ignored: {w}"),
        }
    }

    #[test]
    fn active_and_suspended_alternate_and_stamp_the_time() {
        let t0 = OffsetDateTime::now_utc();
        let r = rec(TokenStatus::Active);
        let s = applied(decide(&r, &change(Some(TokenStatus::Suspended), t0)));
        assert_eq!(s.status, TokenStatus::Suspended);
        assert_eq!(s.last_event_at, Some(t0));
        let a = applied(decide(
            &s,
            &change(Some(TokenStatus::Active), t0 + Duration::from_secs(1)),
        ));
        assert_eq!(a.status, TokenStatus::Active);
    }

    #[test]
    fn older_events_are_stale_and_deleted_is_terminal() {
        let t0 = OffsetDateTime::now_utc();
        let mut r = rec(TokenStatus::Suspended);
        r.last_event_at = Some(t0);
        let older = change(Some(TokenStatus::Active), t0 - Duration::from_millis(1));
        assert!(matches!(decide(&r, &older), Decision::Stale));
        let d = rec(TokenStatus::Deleted);
        let later = change(Some(TokenStatus::Active), t0 + Duration::from_secs(5));
        assert!(matches!(decide(&d, &later), Decision::Ignore(_)));
    }

    #[test]
    fn pending_only_moves_forward_and_unknown_statuses_are_kept() {
        let t0 = OffsetDateTime::now_utc();
        let r = rec(TokenStatus::Active);
        assert!(matches!(
            decide(&r, &change(Some(TokenStatus::Pending), t0)),
            Decision::Ignore(_)
        ));
        let mut p = rec(TokenStatus::Pending);
        p.network_token = None;
        let a = applied(decide(&p, &change(Some(TokenStatus::Active), t0)));
        assert_eq!(a.status, TokenStatus::Active);
        assert_eq!(a.network_token.map(|n| n.d1_token_id), Some("d1tok".into()));
        let frozen = TokenStatus::parse("FROZEN");
        let u = applied(decide(&r, &change(Some(frozen.clone()), t0)));
        assert_eq!(u.status, frozen);
    }

    #[test]
    fn renewal_updates_metadata_and_keeps_the_id() {
        let t0 = OffsetDateTime::now_utc();
        let r = rec(TokenStatus::Active);
        let mut c = change(None, t0);
        c.token_last4 = Some("9876");
        c.token_expiry = Expiry::trusted(9, 2031);
        c.card_expiry = Expiry::trusted(9, 2031);
        let n = applied(decide(&r, &c));
        assert_eq!(n.id, r.id);
        assert_eq!(n.status, TokenStatus::Active);
        let nt = n.network_token.clone().unwrap();
        assert_eq!(nt.last4.as_deref(), Some("9876"));
        assert_eq!(nt.expiry, Expiry::trusted(9, 2031));
        assert_eq!(
            nt.par.as_deref(),
            Some("PAR1"),
            "absent fields keep their value"
        );
        assert_eq!(
            n.card.expiry,
            Expiry {
                month: 9,
                year: 2031
            }
        );
        assert!(visible_change(&r, &n));
    }

    #[test]
    fn renewal_keeps_the_recurring_agreement_and_deletion_drops_it() {
        let t0 = OffsetDateTime::now_utc();
        let mut r = rec(TokenStatus::Active);
        r.recurring_agreement = Some(crate::domain::recurring::RecurringAgreement {
            network_transaction_id: "MCC123ABC0115".into(),
            agreement_reference: "sub_1".into(),
            amount: None,
            frequency: None,
            initial_transaction_at: None,
            recorded_at: t0,
        });
        let mut c = change(None, t0);
        c.token_last4 = Some("9876");
        c.token_expiry = Expiry::trusted(9, 2031);
        let renewed = applied(decide(&r, &c));
        assert_eq!(renewed.recurring_agreement, r.recurring_agreement);
        let deleted = applied(decide(
            &renewed,
            &change(Some(TokenStatus::Deleted), t0 + Duration::from_secs(1)),
        ));
        assert_eq!(deleted.recurring_agreement, None);
    }

    #[test]
    fn another_d1_token_is_not_ours_to_change() {
        let r = rec(TokenStatus::Active);
        let mut c = change(Some(TokenStatus::Suspended), OffsetDateTime::now_utc());
        c.d1_token_id = "other";
        assert!(matches!(decide(&r, &c), Decision::Ignore(_)));
    }

    #[test]
    fn same_state_is_not_a_visible_change_but_advances_the_clock() {
        let t0 = OffsetDateTime::now_utc();
        let r = rec(TokenStatus::Active);
        let n = applied(decide(&r, &change(Some(TokenStatus::Active), t0)));
        assert!(!visible_change(&r, &n));
        assert_eq!(n.last_event_at, Some(t0));
    }

    #[test]
    fn event_kinds_round_trip() {
        for k in ["STATUS_UPDATE", "RENEWAL", "TOKEN_CREATED", "SOMETHING_NEW"] {
            assert_eq!(EventKind::parse(k).as_str(), k);
        }
        assert_eq!(
            EventKind::parse("SOMETHING_NEW"),
            EventKind::Other("SOMETHING_NEW".into())
        );
    }
}
