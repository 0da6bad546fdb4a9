//! Contract of the atomic outbox append for issuer operations: an operation write that carries
//! its webhook events (`IssuerOperationStore::update_operation_with`, `apply_notification_with`)
//! stores the events, their pending deliveries and their jobs exactly when it stores the change,
//! on standalone Redis, a Redis Cluster and redb. Plus, on Cluster, the sweep that stores the
//! events a crashed writer left in an issuer's outbox shard (`P:{i:I}:whq`), once.

use std::time::Duration;

use time::OffsetDateTime;
use tokengate::domain::issuer::IssuerId;
use tokengate::domain::issuer_ops::{
    ChangeSource, IssuerOperation, OperationCall, OperationKind, OperationStatus, OperationTarget,
    RemoteOperation, new_request_id,
};
use tokengate::domain::ports::StoreError;
use tokengate::domain::ports::issuer_operations::{
    IssuerOperationStore, NotificationWrite, OperationInsert,
};
use tokengate::domain::ports::outbox::{EventAppend, JobNext, OutboxStore};
use tokengate::domain::webhooks::{
    DeliveryState, DeliveryStatus, EndpointId, EventId, EventType, SealedSecret, WebhookEndpoint,
    WebhookEvent,
};

const LEASE: Duration = Duration::from_millis(500);
const RETENTION: Duration = Duration::from_secs(3600);
const TTL: Duration = Duration::from_secs(600);

fn op(issuer: &IssuerId) -> IssuerOperation {
    IssuerOperation::new(
        issuer.clone(),
        OperationKind::ClickToPayEnrolment,
        OperationTarget::Card("card-1".into()),
        new_request_id(),
        OperationCall::ClickToPayEnrolment {
            cardholder_name: "ADA LOVELACE".into(),
            reason: None,
            reason_code: None,
        },
        OffsetDateTime::now_utc(),
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

fn endpoint(issuer: &IssuerId) -> WebhookEndpoint {
    WebhookEndpoint {
        id: EndpointId::generate(),
        merchant_id: issuer.tenant(),
        url: "https://bank.example/hook".into(),
        events: EventType::ALL
            .iter()
            .copied()
            .filter(EventType::is_issuer_event)
            .collect(),
        secret: SealedSecret {
            key_id: "k1".into(),
            blob: vec![1; 60],
        },
        created_at: OffsetDateTime::now_utc(),
        previous_secret: None,
        secret_rotated_at: None,
    }
}

fn append(op: &IssuerOperation, ty: EventType, endpoints: &[&WebhookEndpoint]) -> EventAppend {
    let at = OffsetDateTime::now_utc();
    let id = EventId::generate(at);
    EventAppend {
        event: WebhookEvent {
            payload: format!(r#"{{"id":"{id}","type":"{}"}}"#, ty.as_str()),
            id,
            merchant_id: op.issuer_id.tenant(),
            event_type: ty,
            token_id: None,
            operation_id: Some(op.id.to_string()),
            created_at: at,
        },
        endpoints: endpoints.iter().map(|e| e.id.clone()).collect(),
        retention: RETENTION,
    }
}

/// Claims until nothing more comes within a few polls; returns every job's event id, finished.
async fn drain<S: OutboxStore>(s: &S) -> Vec<EventId> {
    let mut out = Vec::new();
    for _ in 0..3 {
        let jobs = s.claim_jobs("c1", 64, LEASE).await.unwrap();
        for j in &jobs {
            out.push(j.event.clone());
            assert!(s.finish_job(j, JobNext::Done).await.unwrap());
        }
        if jobs.is_empty() {
            break;
        }
    }
    out.sort();
    out
}

async fn inserted<S: IssuerOperationStore>(s: &S, issuer: &IssuerId) -> IssuerOperation {
    let o = op(issuer);
    assert_eq!(
        s.insert_operation(&o).await.unwrap(),
        OperationInsert::Inserted
    );
    o
}

/// A change with its events: all stored, pending deliveries, one job per delivery. A change
/// that loses its compare-and-set, or whose operation is gone, stores no event.
async fn update_appends_events_only_with_the_change<S>(s: &S)
where
    S: IssuerOperationStore + OutboxStore,
{
    let issuer = IssuerId::generate();
    let tenant = issuer.tenant();
    let (e1, e2) = (endpoint(&issuer), endpoint(&issuer));
    assert!(s.insert_endpoint(&e1, 16).await.unwrap());
    assert!(s.insert_endpoint(&e2, 16).await.unwrap());
    let o = inserted(s, &issuer).await;
    assert!(drain(s).await.is_empty());

    // Two events of one change (an operation succeeded and a card enrolled): both or neither.
    let done = o
        .apply_remote(
            &remote("d1-op-1", OperationStatus::Successful),
            ChangeSource::Gateway,
            OffsetDateTime::now_utc(),
        )
        .expect("a change");
    let ok = append(&done, EventType::IssuerOperationSucceeded, &[&e1, &e2]);
    let enrolled = append(&done, EventType::IssuerClickToPayEnrolled, &[&e1]);
    s.update_operation_with(&done, &[ok.clone(), enrolled.clone()])
        .await
        .unwrap();
    assert_eq!(
        s.get_operation(&issuer, &o.id).await.unwrap(),
        Some(done.clone())
    );
    for (a, n) in [(&ok, 2), (&enrolled, 1)] {
        let stored = s
            .get_event(&tenant, &a.event.id)
            .await
            .unwrap()
            .expect("event stored with the change");
        assert_eq!(stored.event, a.event);
        assert_eq!(stored.deliveries.len(), n);
        assert!(
            stored
                .deliveries
                .iter()
                .all(|d| d.status == DeliveryStatus::Pending)
        );
    }
    let mut want = vec![
        ok.event.id.clone(),
        ok.event.id.clone(),
        enrolled.event.id.clone(),
    ];
    want.sort();
    assert_eq!(drain(s).await, want);

    // The same version again: the compare-and-set refuses, and no event is stored.
    let lost = append(&done, EventType::IssuerOperationSucceeded, &[&e1]);
    assert!(matches!(
        s.update_operation_with(&done, std::slice::from_ref(&lost))
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(s.get_event(&tenant, &lost.event.id).await.unwrap(), None);

    // An operation that does not exist: nothing either.
    let ghost = op(&issuer).rejected("NOT_FOUND", OffsetDateTime::now_utc());
    let orphan = append(&ghost, EventType::IssuerOperationFailed, &[&e1]);
    assert!(matches!(
        s.update_operation_with(&ghost, std::slice::from_ref(&orphan))
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.get_event(&tenant, &orphan.event.id).await.unwrap(), None);
    assert!(drain(s).await.is_empty(), "no job for a change not made");

    // Without events: the plain compare-and-set, nothing queued.
    let mut later = done.clone();
    later.version += 1;
    s.update_operation_with(&later, &[]).await.unwrap();
    assert!(drain(s).await.is_empty());
    let listed = s.list_events(&tenant, None, 10).await.unwrap();
    assert_eq!(listed.len(), 2, "only the winning change has events");
}

/// A notification applied with its event: change, marker and event together; a redelivery
/// (marker present) and a version conflict store none of them.
async fn notification_appends_events_once<S>(s: &S)
where
    S: IssuerOperationStore + OutboxStore,
{
    let issuer = IssuerId::generate();
    let tenant = issuer.tenant();
    let e1 = endpoint(&issuer);
    assert!(s.insert_endpoint(&e1, 16).await.unwrap());
    let o = inserted(s, &issuer).await;
    let now = OffsetDateTime::now_utc();

    let failed = o
        .apply_remote(
            &remote("d1-op-2", OperationStatus::Failed),
            ChangeSource::Notification,
            now,
        )
        .expect("a change");
    let first = append(&failed, EventType::IssuerOperationFailed, &[&e1]);
    assert_eq!(
        s.apply_notification_with(&failed, "n-1", TTL, std::slice::from_ref(&first))
            .await
            .unwrap(),
        NotificationWrite::Applied
    );
    assert!(
        s.get_event(&tenant, &first.event.id)
            .await
            .unwrap()
            .is_some()
    );

    // Redelivered (another instance built another event for it): not stored.
    let mut again = failed.clone();
    again.version += 1;
    let dup = append(&again, EventType::IssuerOperationFailed, &[&e1]);
    assert_eq!(
        s.apply_notification_with(&again, "n-1", TTL, std::slice::from_ref(&dup))
            .await
            .unwrap(),
        NotificationWrite::Duplicate
    );
    assert_eq!(s.get_event(&tenant, &dup.event.id).await.unwrap(), None);
    assert_eq!(
        s.get_operation(&issuer, &o.id)
            .await
            .unwrap()
            .map(|r| r.version),
        Some(failed.version)
    );

    // A version conflict: neither marker nor event (the same key applies later).
    let stale = append(&failed, EventType::IssuerOperationFailed, &[&e1]);
    assert!(matches!(
        s.apply_notification_with(&failed, "n-2", TTL, std::slice::from_ref(&stale))
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(s.get_event(&tenant, &stale.event.id).await.unwrap(), None);
    assert_eq!(
        s.apply_notification_with(&again, "n-2", TTL, &[])
            .await
            .unwrap(),
        NotificationWrite::Applied,
        "the refused write left no marker"
    );

    assert_eq!(drain(s).await, vec![first.event.id.clone()]);
}

/// Concurrent notifications about one operation, each with its event: exactly one applies, and
/// exactly its event is stored and queued.
async fn concurrent_notifications_store_one_event<S>(s: std::sync::Arc<S>)
where
    S: IssuerOperationStore + OutboxStore,
{
    let issuer = IssuerId::generate();
    let tenant = issuer.tenant();
    let e1 = endpoint(&issuer);
    assert!(s.insert_endpoint(&e1, 16).await.unwrap());
    let o = inserted(&*s, &issuer).await;
    let mut tasks = Vec::new();
    for i in 0..12u32 {
        let (s, o, e1) = (s.clone(), o.clone(), e1.clone());
        tasks.push(tokio::spawn(async move {
            let status = if i % 2 == 0 {
                OperationStatus::Successful
            } else {
                OperationStatus::Failed
            };
            let next = o
                .apply_remote(
                    &remote("d1-op-3", status),
                    ChangeSource::Notification,
                    OffsetDateTime::now_utc(),
                )
                .expect("a change");
            let a = append(&next, EventType::IssuerOperationSucceeded, &[&e1]);
            match s
                .apply_notification_with(&next, &format!("n-{i}"), TTL, std::slice::from_ref(&a))
                .await
            {
                Ok(NotificationWrite::Applied) => Some(a.event.id),
                Ok(NotificationWrite::Duplicate) | Err(StoreError::Conflict) => None,
                Err(e) => panic!("{e}"),
            }
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        won.extend(t.await.unwrap());
    }
    assert_eq!(won.len(), 1, "one compare-and-set wins");
    let listed: Vec<EventId> = s
        .list_events(&tenant, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.event.id)
        .collect();
    assert_eq!(listed, won);
    assert_eq!(drain(&*s).await, won);
}

mod by_ref {
    use super::*;
    crate::store_tests!(by_ref: update_appends_events_only_with_the_change, notification_appends_events_once);
}

mod by_arc {
    use super::*;
    crate::store_tests!(by_arc: concurrent_notifications_store_one_event);
}

/// The JSON an operation script leaves in the issuer's shard on Cluster for one event.
fn shard_member(a: &EventAppend) -> String {
    serde_json::json!({
        "event": a.event,
        "endpoints": a.endpoints,
        "retentionMs": u64::try_from(RETENTION.as_millis()).unwrap(),
    })
    .to_string()
}

/// Cluster only: a writer that died after its operation script and before moving the events
/// out of the issuer's shard (simulated by leaving a member there with an old score) loses
/// nothing: a worker's claim sweeps it into the tenant's outbox once it is older than the lease,
/// exactly once: a member whose event is already stored (the mover died before removing it)
/// does not reset its deliveries nor queue it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sweep_stores_events_left_in_an_issuer_shard() {
    let cluster = tokio::task::spawn_blocking(crate::support::redis_server::RedisCluster::start)
        .await
        .expect("cluster start");
    let s = crate::support::cases::cluster_store(&cluster).await;
    let issuer = IssuerId::generate();
    let tenant = issuer.tenant();
    let e1 = endpoint(&issuer);
    assert!(s.insert_endpoint(&e1, 16).await.unwrap());
    let o = inserted(&s, &issuer).await;
    // A normal write first: it registers the issuer's shard and moves its own event at once.
    let done = o.rejected("CARD_NOT_FOUND", OffsetDateTime::now_utc());
    let a = append(&done, EventType::IssuerOperationFailed, &[&e1]);
    s.update_operation_with(&done, std::slice::from_ref(&a))
        .await
        .unwrap();
    assert_eq!(drain(&s).await, vec![a.event.id.clone()]);
    s.put_delivery(&tenant, &a.event.id, &delivered(&e1))
        .await
        .unwrap();

    // The crash: a new event left in the shard, 10 s ago, and the first one back in it (its
    // mover died between storing it and removing the shard entry).
    let nodes: Vec<String> = cluster
        .addrs()
        .iter()
        .map(|a| format!("redis://{a}/"))
        .collect();
    let client = redis::cluster::ClusterClient::new(nodes).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let shard = format!("tgtest:{{i:{issuer}}}:whq");
    let left = append(&done, EventType::IssuerOperationFailed, &[&e1]);
    let old = u64::try_from(OffsetDateTime::now_utc().unix_timestamp() - 10).unwrap() * 1000;
    for m in [shard_member(&left), shard_member(&a)] {
        let _: i64 = redis::cmd("ZADD")
            .arg(&shard)
            .arg(old)
            .arg(m)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(s.get_event(&tenant, &left.event.id).await.unwrap(), None);

    // The sweep runs at most once per lease per process and under a deployment-wide lease.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(LEASE).await;
        seen = drain(&s).await;
    }
    assert_eq!(
        seen,
        vec![left.event.id.clone()],
        "the left event is queued, once"
    );
    let stored = s
        .get_event(&tenant, &left.event.id)
        .await
        .unwrap()
        .expect("stored by the sweep");
    assert_eq!(stored.event, left.event);
    let first = s.get_event(&tenant, &a.event.id).await.unwrap().unwrap();
    assert_eq!(
        first.deliveries[0].status,
        DeliveryStatus::Delivered,
        "an event already stored keeps its deliveries"
    );
    let remaining: i64 = redis::cmd("ZCARD")
        .arg(&shard)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(remaining, 0, "and the shard is empty");
}

fn delivered(ep: &WebhookEndpoint) -> DeliveryState {
    DeliveryState {
        status: DeliveryStatus::Delivered,
        attempts: 1,
        delivered_at: Some(OffsetDateTime::now_utc()),
        last_status: Some(200),
        ..DeliveryState::pending(ep.id.clone())
    }
}
