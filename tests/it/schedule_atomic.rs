//! Contract of the token writes that carry their reconciliation check
//! (`TokenStore::insert_token_scheduled`, `TokenStore::update_token_scheduled`): the reservation
//! of a new card is on the schedule as soon as it is stored, its activation (with its webhook
//! event) moves the check, a terminal status takes it off, and a write that is refused (dedup,
//! version conflict, missing token) leaves the schedule as it was. On standalone Redis and
//! redb the check is in the token's atomic step; on a Cluster it follows as its own command
//! (another slot). Runs on all three backends.

use time::OffsetDateTime;
use tokengate::domain::ports::lifecycle::LifecycleStore;
use tokengate::domain::ports::outbox::{EventAppend, OutboxStore};
use tokengate::domain::ports::{CheckAt, InsertOutcome, StoreError, TokenStore};
use tokengate::domain::token::{MerchantId, TokenId, TokenRecord, TokenStatus};
use tokengate::domain::webhooks::{EventId, EventType, WebhookEndpoint, WebhookEvent};

/// Far enough ahead that every due time used here is due by then.
const ALL: u64 = u64::MAX / 4;

use crate::support::records::{endpoint, next, token};

fn activated(rec: &TokenRecord, ep: &WebhookEndpoint) -> EventAppend {
    let at = OffsetDateTime::now_utc();
    let id = EventId::generate(at);
    EventAppend {
        event: WebhookEvent {
            payload: format!(r#"{{"id":"{id}","type":"token.activated"}}"#),
            id,
            merchant_id: rec.merchant_id.clone(),
            event_type: EventType::Activated,
            token_id: Some(rec.id.clone()),
            operation_id: None,
            created_at: at,
        },
        endpoints: vec![ep.id.clone()],
        retention: std::time::Duration::from_secs(3600),
    }
}

/// Every (merchant, token) due by `at`, in due order.
async fn due<S: LifecycleStore>(s: &S, at: u64) -> Vec<(MerchantId, TokenId)> {
    s.due_checks(at, 100).await.unwrap()
}

/// A new card's life on the schedule: the reservation carries its check, the activation (with
/// its event) moves it, a deleted token leaves the schedule.
async fn new_card_checks_ride_on_its_writes<S>(s: &S)
where
    S: TokenStore + LifecycleStore + OutboxStore,
{
    let m = MerchantId::generate();
    let ep = endpoint(&m);
    assert!(s.insert_endpoint(&ep, 16).await.unwrap());
    let rec = token(&m);
    let me = (m.clone(), rec.id.clone());
    assert!(due(s, ALL).await.is_empty());

    // The reservation and its check.
    assert!(matches!(
        s.insert_token_scheduled(&rec, CheckAt::At(1_000))
            .await
            .unwrap(),
        InsertOutcome::Inserted
    ));
    assert_eq!(due(s, 1_000).await, vec![me.clone()]);
    assert!(due(s, 999).await.is_empty(), "due at the time given");

    // The activation with its webhook event: the check moves (one entry, not two).
    let active = next(&rec, TokenStatus::Active);
    let event = activated(&active, &ep);
    s.update_token_scheduled(&active, Some(&event), CheckAt::At(50_000))
        .await
        .unwrap();
    assert_eq!(
        s.get_token(&m, &rec.id).await.unwrap(),
        Some(active.clone())
    );
    assert!(
        s.get_event(&m, &event.event.id).await.unwrap().is_some(),
        "the event is stored with the change"
    );
    assert!(due(s, 49_999).await.is_empty());
    assert_eq!(due(s, ALL).await, vec![me.clone()]);

    // Without an event, as a lifecycle change without listeners.
    let suspended = next(&active, TokenStatus::Suspended);
    s.update_token_scheduled(&suspended, None, CheckAt::At(70_000))
        .await
        .unwrap();
    assert!(due(s, 69_999).await.is_empty());
    assert_eq!(due(s, 70_000).await, vec![me.clone()]);

    // `Unchanged` leaves the schedule alone.
    let resumed = next(&suspended, TokenStatus::Active);
    s.update_token_scheduled(&resumed, None, CheckAt::Unchanged)
        .await
        .unwrap();
    assert_eq!(due(s, 70_000).await, vec![me.clone()]);

    // A terminal status takes the token off the schedule.
    let deleted = next(&resumed, TokenStatus::Deleted);
    s.update_token_scheduled(&deleted, None, CheckAt::Never)
        .await
        .unwrap();
    assert!(due(s, ALL).await.is_empty());
    // Taking it off again is harmless.
    let again = next(&deleted, TokenStatus::Deleted);
    s.update_token_scheduled(&again, None, CheckAt::Never)
        .await
        .unwrap();
    assert!(due(s, ALL).await.is_empty());
}

/// A write the store refuses writes no check: a duplicate reservation (dedup), a stale
/// version, a missing token.
async fn refused_writes_leave_the_schedule_alone<S>(s: &S)
where
    S: TokenStore + LifecycleStore,
{
    let m = MerchantId::generate();
    let rec = token(&m);
    assert!(matches!(
        s.insert_token_scheduled(&rec, CheckAt::At(1_000))
            .await
            .unwrap(),
        InsertOutcome::Inserted
    ));
    let me = (m.clone(), rec.id.clone());

    // A second reservation of the same card (same fingerprint, another id): dedup, no check.
    let mut twin = token(&m);
    twin.fingerprints.pan = rec.fingerprints.pan.clone();
    assert!(matches!(
        s.insert_token_scheduled(&twin, CheckAt::At(500))
            .await
            .unwrap(),
        InsertOutcome::Existing(_)
    ));
    assert_eq!(due(s, ALL).await, vec![me.clone()]);

    // A stale version: conflict, the check stays where it was.
    let mut stale = next(&rec, TokenStatus::Active);
    stale.version = 9;
    assert!(matches!(
        s.update_token_scheduled(&stale, None, CheckAt::At(500))
            .await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        s.update_token_scheduled(&stale, None, CheckAt::Never).await,
        Err(StoreError::Conflict)
    ));
    assert!(due(s, 999).await.is_empty());
    assert_eq!(due(s, 1_000).await, vec![me.clone()]);

    // A token that does not exist: not put on the schedule.
    let ghost = next(&token(&m), TokenStatus::Active);
    assert!(matches!(
        s.update_token_scheduled(&ghost, None, CheckAt::At(10))
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(due(s, ALL).await, vec![me]);
}

crate::store_tests!(by_ref:
    new_card_checks_ride_on_its_writes,
    refused_writes_leave_the_schedule_alone,
);
