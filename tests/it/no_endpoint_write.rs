//! Contract of `TokenStore::update_token_if_no_endpoints`, the new-card activation that skips
//! the webhook endpoint read: it writes the token and its reconciliation check only while the
//! merchant has no endpoint at all, checked in the write itself, and otherwise writes nothing
//! (the caller then reads the endpoints and writes with the event). An endpoint registered
//! just before the write, by anyone, is seen by it; one deleted again lets it write. Version
//! conflicts and missing tokens answer as `update_token_scheduled`. Runs on all three backends.

use tokengate::domain::ports::lifecycle::LifecycleStore;
use tokengate::domain::ports::outbox::OutboxStore;
use tokengate::domain::ports::{CheckAt, InsertOutcome, StoreError, TokenStore};
use tokengate::domain::token::{MerchantId, TokenStatus};
use tokengate::domain::webhooks::EventType;

use crate::support::records::{endpoint, next, token};

/// Far enough ahead that every due time used here is due by then.
const ALL: u64 = u64::MAX / 4;

async fn writes_only_while_the_merchant_has_no_endpoint<S>(s: &S)
where
    S: TokenStore + LifecycleStore + OutboxStore,
{
    let m = MerchantId::generate();
    let rec = token(&m);
    assert!(matches!(
        s.insert_token_scheduled(&rec, CheckAt::At(1_000))
            .await
            .unwrap(),
        InsertOutcome::Inserted
    ));

    // An endpoint exists (even one not subscribed to the change's event): nothing written,
    // neither the token nor its check.
    let mut ep = endpoint(&m);
    ep.events = vec![EventType::Deleted];
    assert!(s.insert_endpoint(&ep, 16).await.unwrap());
    let active = next(&rec, TokenStatus::Active);
    assert!(
        !s.update_token_if_no_endpoints(&active, CheckAt::At(50_000))
            .await
            .unwrap()
    );
    assert_eq!(s.get_token(&m, &rec.id).await.unwrap(), Some(rec.clone()));
    assert_eq!(
        s.due_checks(ALL, 100).await.unwrap(),
        vec![(m.clone(), rec.id.clone())]
    );
    // Another merchant's endpoint does not count.
    let other = MerchantId::generate();
    assert!(s.insert_endpoint(&endpoint(&other), 16).await.unwrap());

    // Deleted again: the very next write goes through, with its check, and stores no event.
    assert!(s.delete_endpoint(&m, &ep.id).await.unwrap());
    assert!(
        s.update_token_if_no_endpoints(&active, CheckAt::At(50_000))
            .await
            .unwrap()
    );
    assert_eq!(
        s.get_token(&m, &rec.id).await.unwrap(),
        Some(active.clone())
    );
    assert!(s.due_checks(1_000, 100).await.unwrap().is_empty());
    assert_eq!(
        s.due_checks(50_000, 100).await.unwrap(),
        vec![(m.clone(), rec.id.clone())]
    );
    assert!(s.list_events(&m, None, 10).await.unwrap().is_empty());

    // The same version again: a conflict, not a write.
    assert!(matches!(
        s.update_token_if_no_endpoints(&active, CheckAt::At(60_000))
            .await,
        Err(StoreError::Conflict)
    ));
    // A token that does not exist.
    let ghost = next(&token(&m), TokenStatus::Active);
    assert!(matches!(
        s.update_token_if_no_endpoints(&ghost, CheckAt::At(10))
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        s.due_checks(ALL, 100).await.unwrap(),
        vec![(m.clone(), rec.id.clone())]
    );
}

crate::store_tests!(by_ref: writes_only_while_the_merchant_has_no_endpoint);
