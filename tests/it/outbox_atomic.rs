//! Contract of the atomic outbox append: a token write that carries its webhook event
//! (`TokenStore::update_token_with`, `LifecycleStore::apply_event_with`) stores the event, its
//! pending deliveries and its jobs exactly when it stores the change, on standalone Redis, a
//! Redis Cluster and redb. Plus, on Cluster, the sweep that queues jobs a crashed writer left
//! in a merchant's outbox shard.

use std::time::Duration;

use time::OffsetDateTime;
use tokengate::domain::ports::lifecycle::{EventWrite, LifecycleStore};
use tokengate::domain::ports::outbox::{EventAppend, JobNext, OutboxStore};
use tokengate::domain::ports::{InsertOutcome, StoreError, TokenStore};
use tokengate::domain::token::{MerchantId, TokenRecord, TokenStatus};
use tokengate::domain::webhooks::{
    DeliveryStatus, EventId, EventType, WebhookEndpoint, WebhookEvent,
};

const LEASE: Duration = Duration::from_millis(500);
const RETENTION: Duration = Duration::from_secs(3600);

use crate::support::records::{endpoint, next, token};

fn append(rec: &TokenRecord, ty: EventType, endpoints: &[&WebhookEndpoint]) -> EventAppend {
    let at = OffsetDateTime::now_utc();
    let id = EventId::generate(at);
    EventAppend {
        event: WebhookEvent {
            payload: format!(r#"{{"id":"{id}","type":"{}"}}"#, ty.as_str()),
            id,
            merchant_id: rec.merchant_id.clone(),
            event_type: ty,
            token_id: Some(rec.id.clone()),
            operation_id: None,
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
    out
}

/// A change with its event: both stored, one pending delivery per endpoint, one job each. A
/// change that loses its compare-and-set, or whose token is gone, stores no event.
async fn update_appends_event_only_with_the_change<S>(s: &S)
where
    S: TokenStore + OutboxStore,
{
    let m = MerchantId::generate();
    let (e1, e2) = (endpoint(&m), endpoint(&m));
    assert!(s.insert_endpoint(&e1, 16).await.unwrap());
    assert!(s.insert_endpoint(&e2, 16).await.unwrap());
    let rec = token(&m);
    assert!(matches!(
        s.insert_token(&rec).await.unwrap(),
        InsertOutcome::Inserted
    ));
    assert!(drain(s).await.is_empty());

    let active = next(&rec, TokenStatus::Active);
    let won = append(&active, EventType::Activated, &[&e1, &e2]);
    s.update_token_with(&active, Some(&won)).await.unwrap();
    assert_eq!(
        s.get_token(&m, &rec.id).await.unwrap(),
        Some(active.clone())
    );
    let stored = s
        .get_event(&m, &won.event.id)
        .await
        .unwrap()
        .expect("event stored");
    assert_eq!(stored.event, won.event);
    assert_eq!(stored.deliveries.len(), 2);
    assert!(
        stored
            .deliveries
            .iter()
            .all(|d| d.status == DeliveryStatus::Pending)
    );
    assert_eq!(drain(s).await, vec![won.event.id.clone(); 2]);

    // The same version again: the compare-and-set refuses, and the event is not stored.
    let lost = append(&active, EventType::Activated, &[&e1]);
    assert!(matches!(
        s.update_token_with(&active, Some(&lost)).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(s.get_event(&m, &lost.event.id).await.unwrap(), None);

    // A token that does not exist: nothing either.
    let ghost = next(&token(&m), TokenStatus::Active);
    let orphan = append(&ghost, EventType::Activated, &[&e1]);
    assert!(matches!(
        s.update_token_with(&ghost, Some(&orphan)).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.get_event(&m, &orphan.event.id).await.unwrap(), None);
    assert!(drain(s).await.is_empty(), "no job for a change not made");

    // Without an event: the plain update, nothing queued.
    let suspended = next(&active, TokenStatus::Suspended);
    s.update_token_with(&suspended, None).await.unwrap();
    assert!(drain(s).await.is_empty());
    let listed = s.list_events(&m, None, 10).await.unwrap();
    assert_eq!(listed.len(), 1, "only the winning change has an event");
}

/// A D1 notification applied with its event: event and marker together; a duplicate of the
/// notification (marker present) stores neither change nor event.
async fn apply_event_appends_event_once<S>(s: &S)
where
    S: TokenStore + LifecycleStore + OutboxStore,
{
    let m = MerchantId::generate();
    let e1 = endpoint(&m);
    assert!(s.insert_endpoint(&e1, 16).await.unwrap());
    let rec = next(&token(&m), TokenStatus::Active);
    let mut rec = rec;
    rec.version = 1;
    assert!(matches!(
        s.insert_token(&rec).await.unwrap(),
        InsertOutcome::Inserted
    ));
    let ttl = Duration::from_secs(600);

    let suspended = next(&rec, TokenStatus::Suspended);
    let first = append(&suspended, EventType::Suspended, &[&e1]);
    assert_eq!(
        s.apply_event_with(&suspended, "d1-evt-1", ttl, Some(&first))
            .await
            .unwrap(),
        EventWrite::Applied
    );
    assert!(s.get_event(&m, &first.event.id).await.unwrap().is_some());

    // Redelivered by D1 (another instance built another event id for it): not stored.
    let again = next(&suspended, TokenStatus::Suspended);
    let dup = append(&again, EventType::Suspended, &[&e1]);
    assert_eq!(
        s.apply_event_with(&again, "d1-evt-1", ttl, Some(&dup))
            .await
            .unwrap(),
        EventWrite::Duplicate
    );
    assert_eq!(s.get_event(&m, &dup.event.id).await.unwrap(), None);
    assert_eq!(
        s.get_token(&m, &rec.id).await.unwrap().map(|r| r.version),
        Some(suspended.version)
    );

    // A version conflict: neither marker nor event.
    let stale = append(&suspended, EventType::Suspended, &[&e1]);
    assert!(matches!(
        s.apply_event_with(&suspended, "d1-evt-2", ttl, Some(&stale))
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(s.get_event(&m, &stale.event.id).await.unwrap(), None);
    assert!(!s.event_seen(&m, "d1-evt-2").await.unwrap());

    assert_eq!(drain(s).await, vec![first.event.id.clone()]);
}

/// Many concurrent writers of one token, each with its own event: exactly as many events as
/// successful writes, and one job per stored event.
async fn concurrent_writers_store_one_event_per_winning_write<S>(s: std::sync::Arc<S>)
where
    S: TokenStore + OutboxStore,
{
    let m = MerchantId::generate();
    let e1 = endpoint(&m);
    assert!(s.insert_endpoint(&e1, 16).await.unwrap());
    let mut rec = next(&token(&m), TokenStatus::Active);
    rec.version = 1;
    assert!(matches!(
        s.insert_token(&rec).await.unwrap(),
        InsertOutcome::Inserted
    ));
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let s = s.clone();
        let rec = rec.clone();
        let e1 = e1.clone();
        tasks.push(tokio::spawn(async move {
            let status = if i % 2 == 0 {
                TokenStatus::Suspended
            } else {
                TokenStatus::Deleted
            };
            let n = next(&rec, status);
            let a = append(&n, EventType::Updated, &[&e1]);
            match s.update_token_with(&n, Some(&a)).await {
                Ok(()) => Some(a.event.id),
                Err(StoreError::Conflict) => None,
                Err(e) => panic!("{e}"),
            }
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        won.extend(t.await.unwrap());
    }
    assert_eq!(won.len(), 1, "one compare-and-set wins");
    let listed = s.list_events(&m, None, 100).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|r| r.event.id.clone())
            .collect::<Vec<_>>(),
        won
    );
    assert_eq!(drain(&*s).await, won);
}

mod by_ref {
    use super::*;
    crate::store_tests!(by_ref: update_appends_event_only_with_the_change, apply_event_appends_event_once);
}

mod by_arc {
    use super::*;
    crate::store_tests!(by_arc: concurrent_writers_store_one_event_per_winning_write);
}

/// Cluster only: a writer that died after its script and before moving the jobs out of the
/// merchant's shard (simulated by putting a job back in the shard with an old score) loses
/// nothing: a worker's claim sweeps it into the shared queue once it is older than the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sweep_queues_jobs_left_in_a_shard() {
    let cluster = tokio::task::spawn_blocking(crate::support::redis_server::RedisCluster::start)
        .await
        .expect("cluster start");
    let s = crate::support::cases::cluster_store(&cluster).await;
    let m = MerchantId::generate();
    let e1 = endpoint(&m);
    assert!(s.insert_endpoint(&e1, 16).await.unwrap());
    let rec = token(&m);
    assert!(matches!(
        s.insert_token(&rec).await.unwrap(),
        InsertOutcome::Inserted
    ));
    let active = next(&rec, TokenStatus::Active);
    let a = append(&active, EventType::Activated, &[&e1]);
    s.update_token_with(&active, Some(&a)).await.unwrap();
    assert_eq!(drain(&s).await, vec![a.event.id.clone()]);

    // The crash: the job is back in the shard, as the script left it, 10 s ago.
    let nodes: Vec<String> = cluster
        .addrs()
        .iter()
        .map(|a| format!("redis://{a}/"))
        .collect();
    let client = redis::cluster::ClusterClient::new(nodes).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let shard = format!("tgtest:{{m:{m}}}:whq");
    let job = format!("{m} {} {} 0", a.event.id, e1.id);
    let old = u64::try_from(OffsetDateTime::now_utc().unix_timestamp() - 10).unwrap() * 1000;
    let _: i64 = redis::cmd("ZADD")
        .arg(&shard)
        .arg(old)
        .arg(&job)
        .query_async(&mut conn)
        .await
        .unwrap();
    // The sweep runs at most once per lease per process and under a deployment-wide lease.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(LEASE).await;
        seen = drain(&s).await;
    }
    assert_eq!(seen, vec![a.event.id.clone()], "the left job is queued");
    let left: i64 = redis::cmd("ZCARD")
        .arg(&shard)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "and removed from the shard");
}
