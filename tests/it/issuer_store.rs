//! Store contract of issuers and issuer operations (`IssuerStore`, `IssuerOperationStore`) on
//! Redis, Redis Cluster and the embedded store: unique D1 issuer ids, the `issuerRequestId`
//! anchor, lookups by D1 operation id, compare-and-set updates keeping the list indexes and
//! the worker's due list in step, notification dedup in the same atomic step (also under
//! concurrency), index-backed pagination with filters, and isolation between issuers; and the
//! issuer card records (`IssuerCardStore`): compare-and-set, isolation, one of two racing writers.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokengate::domain::issuer::{Issuer, IssuerId};
use tokengate::domain::issuer_ops::{
    ChangeSource, IssuerOperation, OperationCall, OperationFilter, OperationKind, OperationStatus,
    OperationTarget, RemoteOperation, new_request_id,
};
use tokengate::domain::ports::StoreError;
use tokengate::domain::ports::issuer_operations::{
    IssuerOperationStore, NotificationWrite, OperationInsert,
};
use tokengate::domain::ports::issuers::IssuerStore;

crate::store_tests!(by_ref: issuers_are_unique_per_d1_id, operations_round_trip_and_index, lists_page_and_filter);
mod concurrent {
    use super::*;
    crate::store_tests!(by_arc: one_of_two_concurrent_notifications_applies);
}

fn issuer(d1: &str) -> Issuer {
    Issuer {
        id: IssuerId::generate(),
        name: "Bank".into(),
        d1_issuer_id: d1.into(),
        created_at: OffsetDateTime::now_utc(),
    }
}

fn d1_id() -> String {
    // 10 characters, unique per test run.
    let id = IssuerId::generate();
    format!("T{}", &id.as_str()[4..13])
}

fn op(issuer: &IssuerId, card: &str, at: OffsetDateTime) -> IssuerOperation {
    IssuerOperation::new(
        issuer.clone(),
        OperationKind::ClickToPayEnrolment,
        OperationTarget::Card(card.into()),
        new_request_id(),
        OperationCall::ClickToPayEnrolment {
            cardholder_name: "ADA LOVELACE".into(),
            reason: None,
            reason_code: None,
        },
        at,
    )
}

fn remote(d1: &str, status: OperationStatus) -> RemoteOperation {
    RemoteOperation {
        d1_operation_id: d1.into(),
        kind: OperationKind::ClickToPayEnrolment,
        status: Some(status),
        start_time: None,
        end_time: None,
        card_id: None,
        consumer_id: None,
        issuer_request_id: None,
        error_code: None,
        error: None,
        details: None,
    }
}

async fn issuers_are_unique_per_d1_id<S: IssuerStore>(s: &S) {
    let d1 = d1_id();
    let a = issuer(&d1);
    assert!(s.insert_issuer(&a).await.unwrap());
    assert!(
        !s.insert_issuer(&issuer(&d1)).await.unwrap(),
        "a D1 id is one issuer's"
    );
    assert_eq!(s.get_issuer(&a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(s.issuer_by_d1_id(&d1).await.unwrap(), Some(a.clone()));
    assert_eq!(s.issuer_by_d1_id("ZZZZZZZZZZ").await.unwrap(), None);
    assert_eq!(s.get_issuer(&IssuerId::generate()).await.unwrap(), None);
    assert!(s.list_issuers().await.unwrap().contains(&a));
}

async fn operations_round_trip_and_index<S: IssuerStore + IssuerOperationStore>(s: &S) {
    let a = issuer(&d1_id());
    let b = issuer(&d1_id());
    let o = op(&a.id, "card-1", OffsetDateTime::now_utc());
    assert_eq!(
        s.insert_operation(&o).await.unwrap(),
        OperationInsert::Inserted
    );
    // The request id is the anchor: a second operation with it is refused, the first answered.
    let mut dup = op(&a.id, "card-2", OffsetDateTime::now_utc());
    dup.issuer_request_id = o.issuer_request_id.clone();
    assert_eq!(
        s.insert_operation(&dup).await.unwrap(),
        OperationInsert::Existing(Box::new(o.clone()))
    );
    // Another issuer may use the same request id, and does not see the first one's operation.
    let mut other = op(&b.id, "card-1", OffsetDateTime::now_utc());
    other.issuer_request_id = o.issuer_request_id.clone();
    assert_eq!(
        s.insert_operation(&other).await.unwrap(),
        OperationInsert::Inserted
    );
    assert_eq!(s.get_operation(&b.id, &o.id).await.unwrap(), None);
    assert_eq!(
        s.operation_by_request_id(&a.id, &o.issuer_request_id)
            .await
            .unwrap(),
        Some(o.clone())
    );
    // Due right away (a new operation is due for its first look).
    let now_ms = u64::try_from(OffsetDateTime::now_utc().unix_timestamp() * 1000 + 1000).unwrap();
    assert!(
        s.due_operations(&a.id, now_ms, 10)
            .await
            .unwrap()
            .contains(&o.id)
    );

    // D1 acknowledged: indexed by its id, checked again later.
    let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
    let acked = o.acknowledged("d1-op-1", later);
    s.update_operation(&acked).await.unwrap();
    assert_eq!(
        s.operation_by_d1_id(&a.id, "d1-op-1").await.unwrap(),
        Some(acked.clone())
    );
    assert_eq!(s.operation_by_d1_id(&b.id, "d1-op-1").await.unwrap(), None);
    assert!(
        !s.due_operations(&a.id, now_ms, 10)
            .await
            .unwrap()
            .contains(&o.id)
    );
    // A stale writer loses and writes nothing.
    assert!(matches!(
        s.update_operation(&o.acknowledged("x", later)).await,
        Err(StoreError::Conflict)
    ));
    let ghost = op(&a.id, "card-9", OffsetDateTime::now_utc());
    assert!(matches!(
        s.update_operation(&ghost.rescheduled(later)).await,
        Err(StoreError::NotFound)
    ));

    // A notification: applied once, its redelivery is a duplicate, nothing regresses.
    let done = acked
        .apply_remote(
            &remote("d1-op-1", OperationStatus::Successful),
            ChangeSource::Notification,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    let ttl = Duration::from_secs(60);
    assert_eq!(
        s.apply_notification(&done, "k1", ttl).await.unwrap(),
        NotificationWrite::Applied
    );
    let mut again = done.clone();
    again.version += 1;
    assert_eq!(
        s.apply_notification(&again, "k1", ttl).await.unwrap(),
        NotificationWrite::Duplicate
    );
    let stored = s.get_operation(&a.id, &o.id).await.unwrap().unwrap();
    assert_eq!(stored, done);
    assert_eq!(stored.status, OperationStatus::Successful);
    // The same key at another issuer is another notification.
    let o_b = s.get_operation(&b.id, &other.id).await.unwrap().unwrap();
    let acked_b = o_b.acknowledged("d1-op-b", later);
    s.update_operation(&acked_b).await.unwrap();
    let done_b = acked_b
        .apply_remote(
            &remote("d1-op-b", OperationStatus::Failed),
            ChangeSource::Notification,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    assert_eq!(
        s.apply_notification(&done_b, "k1", ttl).await.unwrap(),
        NotificationWrite::Applied
    );
    // A final operation is off the due list.
    assert!(
        !s.due_operations(&b.id, u64::MAX / 2, 10)
            .await
            .unwrap()
            .contains(&other.id)
    );
}

async fn lists_page_and_filter<S: IssuerOperationStore>(s: &S) {
    let iss = IssuerId::generate();
    let t0 = OffsetDateTime::now_utc() - time::Duration::minutes(10);
    let mut ops = Vec::new();
    for i in 0..7 {
        let card = if i % 2 == 0 { "card-even" } else { "card-odd" };
        let o = op(&iss, card, t0 + time::Duration::seconds(i));
        s.insert_operation(&o).await.unwrap();
        ops.push(o);
    }
    // Two of the even ones succeed.
    for o in [&ops[0], &ops[4]] {
        let acked = o.acknowledged(&format!("d1-{}", o.id), t0);
        s.update_operation(&acked).await.unwrap();
        let done = acked
            .apply_remote(
                &remote("x", OperationStatus::Successful),
                ChangeSource::Poll,
                t0,
            )
            .unwrap();
        s.update_operation(&done).await.unwrap();
    }
    // All, newest first, in pages of 3.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = s
            .list_operations(&iss, &OperationFilter::default(), 3, cursor.as_deref())
            .await
            .unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.iter().map(|o| o.id.clone()));
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    let expected: Vec<_> = ops.iter().rev().map(|o| o.id.clone()).collect();
    assert_eq!(seen, expected);
    // By card.
    let even = s
        .list_operations(
            &iss,
            &OperationFilter {
                card_id: Some("card-even".into()),
                status: None,
            },
            10,
            None,
        )
        .await
        .unwrap();
    assert_eq!(even.items.len(), 4);
    assert!(even.next.is_none());
    // By status, and by card and status.
    let ok = OperationFilter {
        card_id: None,
        status: Some(OperationStatus::Successful),
    };
    let page = s.list_operations(&iss, &ok, 10, None).await.unwrap();
    assert_eq!(
        page.items.iter().map(|o| o.id.clone()).collect::<Vec<_>>(),
        vec![ops[4].id.clone(), ops[0].id.clone()]
    );
    let pending_odd = OperationFilter {
        card_id: Some("card-odd".into()),
        status: Some(OperationStatus::Pending),
    };
    let page = s
        .list_operations(&iss, &pending_odd, 2, None)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 2);
    let rest = s
        .list_operations(&iss, &pending_odd, 2, page.next.as_deref())
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert!(
        rest.items
            .iter()
            .all(|o| o.card_id.as_deref() == Some("card-odd")
                && o.status == OperationStatus::Pending)
    );
    // Another issuer sees none of them.
    let none = s
        .list_operations(&IssuerId::generate(), &OperationFilter::default(), 10, None)
        .await
        .unwrap();
    assert!(none.items.is_empty() && none.next.is_none());
}

async fn one_of_two_concurrent_notifications_applies<S: IssuerOperationStore>(s: Arc<S>) {
    let iss = IssuerId::generate();
    for round in 0..10 {
        let o = op(&iss, "card-c", OffsetDateTime::now_utc());
        s.insert_operation(&o).await.unwrap();
        let done = o
            .apply_remote(
                &remote(&format!("d1-c-{round}"), OperationStatus::Successful),
                ChangeSource::Notification,
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        let (a, b) = (s.clone(), s.clone());
        let (d1, d2) = (done.clone(), done.clone());
        let key = format!("key-{round}");
        let (k1, k2) = (key.clone(), key.clone());
        let t1 = tokio::spawn(async move {
            a.apply_notification(&d1, &k1, Duration::from_secs(60))
                .await
        });
        let t2 = tokio::spawn(async move {
            b.apply_notification(&d2, &k2, Duration::from_secs(60))
                .await
        });
        let r = [t1.await.unwrap(), t2.await.unwrap()];
        let applied = r
            .iter()
            .filter(|x| matches!(x, Ok(NotificationWrite::Applied)))
            .count();
        assert_eq!(applied, 1, "round {round}: {r:?}");
        assert!(
            r.iter()
                .all(|x| matches!(x, Ok(_) | Err(StoreError::Conflict)))
        );
    }
}

/// `IssuerCardStore`: the card records of `domain::issuer_cards`, compare-and-set on every
/// backend, isolated per issuer, and two racing writers of one card: exactly one wins.
mod cards {
    use tokengate::domain::issuer_cards::{
        CardLifecycle, ClickToPayState, IssuerCard, OptOutReason,
    };
    use tokengate::domain::ports::issuer_cards::IssuerCardStore;

    use super::*;

    crate::store_tests!(by_arc: card_records_compare_and_set);

    fn card(issuer: &IssuerId, id: &str) -> IssuerCard {
        IssuerCard {
            issuer_id: issuer.clone(),
            card_id: id.into(),
            lifecycle: None,
            click_to_pay: Some(ClickToPayState::Enrolled),
            opt_out_reason: None,
            consumer_id: Some("cons-1".into()),
            deleted_at: None,
            last_change_operation_id: None,
            updated_at: OffsetDateTime::now_utc(),
            version: 1,
        }
    }

    async fn card_records_compare_and_set<S: IssuerCardStore>(s: Arc<S>) {
        let iss = IssuerId::generate();
        let other = IssuerId::generate();
        assert!(s.get_card(&iss, "card-1").await.unwrap().is_none());
        let mut c = card(&iss, "card-1");
        s.put_card(&c).await.unwrap();
        // A second creation of the same card is a conflict, nothing written.
        let mut dup = card(&iss, "card-1");
        dup.consumer_id = None;
        assert!(matches!(s.put_card(&dup).await, Err(StoreError::Conflict)));
        let stored = s.get_card(&iss, "card-1").await.unwrap().unwrap();
        assert_eq!(stored.consumer_id.as_deref(), Some("cons-1"));
        assert_eq!(stored.version, 1);
        // Isolated per issuer.
        assert!(s.get_card(&other, "card-1").await.unwrap().is_none());
        // An update on the stored version wins; a stale one conflicts.
        c.version = 2;
        c.lifecycle = Some(CardLifecycle::Deleted);
        c.click_to_pay = Some(ClickToPayState::OptedOut);
        c.opt_out_reason = Some(OptOutReason::CardDeleted);
        c.deleted_at = Some(OffsetDateTime::now_utc());
        s.put_card(&c).await.unwrap();
        let mut stale = c.clone();
        stale.lifecycle = Some(CardLifecycle::Active);
        assert!(matches!(
            s.put_card(&stale).await,
            Err(StoreError::Conflict)
        ));
        let stored = s.get_card(&iss, "card-1").await.unwrap().unwrap();
        assert_eq!(stored.lifecycle, Some(CardLifecycle::Deleted));
        assert_eq!(stored.opt_out_reason, Some(OptOutReason::CardDeleted));
        assert_eq!(stored.version, 2);
        // Updating a card that was never created: NotFound.
        let mut missing = card(&iss, "card-2");
        missing.version = 4;
        assert!(matches!(
            s.put_card(&missing).await,
            Err(StoreError::NotFound)
        ));
        // Two writers of version 3 at once: exactly one is stored.
        let (mut x, mut y) = (stored.clone(), stored.clone());
        x.version = 3;
        y.version = 3;
        x.consumer_id = Some("x".into());
        y.consumer_id = Some("y".into());
        let (s1, s2) = (s.clone(), s.clone());
        let (rx, ry) = tokio::join!(
            tokio::spawn(async move { s1.put_card(&x).await }),
            tokio::spawn(async move { s2.put_card(&y).await })
        );
        let oks = [rx.unwrap(), ry.unwrap()]
            .iter()
            .filter(|r| r.is_ok())
            .count();
        assert_eq!(oks, 1);
        let stored = s.get_card(&iss, "card-1").await.unwrap().unwrap();
        assert_eq!(stored.version, 3);
    }
}
