//! The Redis token cache (`src/storage/redis/token_cache.rs`): a change made through one store or
//! gateway instance is seen at once by another instance that cached the token, losing the
//! tracking connection empties the cache, and Cluster stays uncached.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokengate::domain::ports::TokenStore;
use tokengate::domain::token::{
    CardMeta, Fingerprints, MerchantId, SealedPan, TokenId, TokenRecord, TokenStatus, Usage,
};
use tokengate::storage::redis::{RedisConfig, RedisStore};
use tokengate_cards::{Brand, Expiry};

use crate::support::app::{Backend, TestApp};
use crate::support::cases::redis_config;
use crate::support::redis_server::{RedisCluster, RedisServer};

fn cached_config(url: String, nodes: Vec<String>) -> RedisConfig {
    RedisConfig {
        token_cache_entries: 1000,
        ..redis_config(url, nodes)
    }
}

async fn cached_store(server: &RedisServer) -> RedisStore {
    let store = RedisStore::connect(&cached_config(server.url(), Vec::new()))
        .await
        .expect("connect");
    assert!(
        store.wait_token_cache(Duration::from_secs(5)).await,
        "the tracking connection came up"
    );
    store
}

fn record(m: &MerchantId, fingerprint: &str) -> TokenRecord {
    let now = OffsetDateTime::now_utc();
    TokenRecord {
        id: TokenId::generate(),
        merchant_id: m.clone(),
        usage: Usage::CardOnFile,
        status: TokenStatus::Active,
        card: CardMeta {
            brand: Brand::Visa,
            bin: "411111".into(),
            last4: "1111".into(),
            expiry: Expiry::trusted(12, 2030).expect("valid expiry"),
        },
        network_token: None,
        customer_reference: None,
        sealed_pan: SealedPan {
            key_id: "k1".into(),
            blob: b"not-a-real-blob".to_vec(),
        },
        fingerprints: Fingerprints {
            pan: fingerprint.to_owned(),
            pan_expiry: format!("{fingerprint}e"),
            previous: Vec::new(),
        },
        created_at: now,
        updated_at: now,
        last_event_at: None,
        recurring_agreement: None,
        version: 1,
    }
}

async fn status_read(store: &RedisStore, rec: &TokenRecord) -> TokenStatus {
    store
        .read_token(&rec.merchant_id, &rec.id)
        .await
        .expect("read")
        .expect("token exists")
        .status
        .clone()
}

/// Writes `status` as the next version of `rec` through `store`.
async fn set_status(store: &RedisStore, rec: &mut TokenRecord, status: TokenStatus) {
    rec.status = status;
    rec.version += 1;
    store.update_token(rec).await.expect("update");
}

/// Ids of the server's clients with tracking on (`flags` holds `t`).
async fn tracking_clients(url: &str) -> Vec<String> {
    let client = redis::Client::open(url).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .expect("client list");
    list.lines()
        .filter(|l| {
            l.split(' ')
                .any(|f| f.strip_prefix("flags=").is_some_and(|v| v.contains('t')))
        })
        .filter_map(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("id="))
                .map(str::to_owned)
        })
        .collect()
}

async fn kill_client(server: &RedisServer, id: &str) {
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(&mut conn)
        .await
        .expect("client kill");
}

/// Two stores on one server: every change made through A is read through B's cache at once,
/// many times over (a stale hit would show the previous status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_store_is_seen_at_once_through_another() {
    let server = RedisServer::start();
    let a = cached_store(&server).await;
    let b = cached_store(&server).await;
    let m = MerchantId::generate();
    let mut rec = record(&m, "fp-coherence");
    a.insert_token(&rec).await.expect("insert");

    assert_eq!(status_read(&b, &rec).await, TokenStatus::Active);
    let before = b.token_cache_stats().expect("cache on");
    assert_eq!(status_read(&b, &rec).await, TokenStatus::Active);
    let after = b.token_cache_stats().expect("cache on");
    assert_eq!(after.hits, before.hits + 1, "the second read is a hit");

    for i in 0..200 {
        let next = if i % 2 == 0 {
            TokenStatus::Suspended
        } else {
            TokenStatus::Active
        };
        set_status(&a, &mut rec, next.clone()).await;
        assert_eq!(status_read(&b, &rec).await, next, "round {i}");
        // And cached again for the next round.
        assert_eq!(status_read(&b, &rec).await, next, "round {i}, hit");
    }
    let stats = b.token_cache_stats().expect("cache on");
    assert!(stats.hits >= 200, "{stats:?}");
    assert!(stats.invalidations >= 200, "{stats:?}");

    // The dedup read (fingerprint index, then record) through the cache, and a removal.
    let found = b
        .read_by_fingerprint(&m, "fp-coherence")
        .await
        .expect("read")
        .expect("found");
    assert_eq!(found.id, rec.id);
    set_status(&a, &mut rec, TokenStatus::Deleted).await;
    assert!(
        b.read_by_fingerprint(&m, "fp-coherence")
            .await
            .expect("read")
            .is_none(),
        "a tombstone is no dedup target"
    );
    assert_eq!(status_read(&b, &rec).await, TokenStatus::Deleted);
    a.remove_token(&m, &rec.id).await.expect("remove");
    assert!(b.read_token(&m, &rec.id).await.expect("read").is_none());
}

/// Losing the tracking connection loses the invalidations sent on it: the cache must be empty
/// afterwards. The change below is made once the new connection is up; it tracks nothing yet, so
/// only the flush makes B read the new status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_tracking_connection_empties_the_cache() {
    let server = RedisServer::start();
    let a = RedisStore::connect(&redis_config(server.url(), Vec::new()))
        .await
        .expect("connect");
    let b = cached_store(&server).await;
    let m = MerchantId::generate();
    let mut rec = record(&m, "fp-loss");
    a.insert_token(&rec).await.expect("insert");
    assert_eq!(status_read(&b, &rec).await, TokenStatus::Active);
    assert_eq!(status_read(&b, &rec).await, TokenStatus::Active);
    let before = b.token_cache_stats().expect("cache on");
    assert_eq!(before.entries, 1, "{before:?}");

    let old = tracking_clients(&server.url()).await;
    assert_eq!(old.len(), 1, "B's tracking connection: {old:?}");
    kill_client(&server, &old[0]).await;
    // Wait for B to notice and open a new tracking connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = tracking_clients(&server.url()).await;
        let stats = b.token_cache_stats().expect("cache on");
        if stats.tracking && now.len() == 1 && now[0] != old[0] {
            assert!(stats.flushes > before.flushes, "{stats:?}");
            assert_eq!(stats.entries, 0, "{stats:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no new tracking connection");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set_status(&a, &mut rec, TokenStatus::Suspended).await;
    assert_eq!(status_read(&b, &rec).await, TokenStatus::Suspended);
}

/// A restart of Redis (every connection dropped, the server's tracking table gone) and a
/// `FLUSHALL` (a null invalidation) both empty the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_or_flushall_empties_the_cache() {
    let mut server = RedisServer::start();
    let b = cached_store(&server).await;
    let m = MerchantId::generate();
    let rec = record(&m, "fp-restart");
    b.insert_token(&rec).await.expect("insert");
    assert_eq!(status_read(&b, &rec).await, TokenStatus::Active);
    assert_eq!(b.token_cache_stats().expect("on").entries, 1);

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.token_cache_stats().expect("on").entries != 0
        || !b.token_cache_stats().expect("on").tracking
    {
        assert!(
            Instant::now() < deadline,
            "cache not emptied after a restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The restarted server is empty (no persistence in tests): the token is gone, not cached.
    let gone = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(r) = b.read_token(&m, &rec.id).await {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("reads work again");
    assert!(gone.is_none());

    // The shared connection may still be reconnecting: retry the write until it goes through.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.insert_token(&rec).await.is_err() {
        assert!(Instant::now() < deadline, "writes never worked again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status_read(&b, &rec).await, TokenStatus::Active);
    let flushes = b.token_cache_stats().expect("on").flushes;
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("flushall");
    assert!(b.read_token(&m, &rec.id).await.expect("read").is_none());
    assert!(b.token_cache_stats().expect("on").flushes > flushes);
}

/// The bound holds, and Cluster is not cached (no tracking connection per node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_bounded_and_cluster_is_uncached() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&RedisConfig {
        token_cache_entries: 32,
        ..redis_config(server.url(), Vec::new())
    })
    .await
    .expect("connect");
    assert!(store.wait_token_cache(Duration::from_secs(5)).await);
    let m = MerchantId::generate();
    for i in 0..200 {
        let rec = record(&m, &format!("fp-bound-{i}"));
        store.insert_token(&rec).await.expect("insert");
        assert!(store.read_token(&m, &rec.id).await.expect("read").is_some());
    }
    let stats = store.token_cache_stats().expect("on");
    // 16 shards of ceil(32 / 16) = 2 entries each.
    assert!(stats.entries <= 32, "{stats:?}");

    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("cluster");
    let cs = RedisStore::connect(&cached_config(String::new(), cluster.addrs()))
        .await
        .expect("connect cluster");
    assert!(cs.token_cache_stats().is_none());
    let rec = record(&m, "fp-cluster");
    cs.insert_token(&rec).await.expect("insert");
    assert!(cs.read_token(&m, &rec.id).await.expect("read").is_some());
}

// --- two gateway instances on one Redis --------------------------------------------------------

async fn get_status(app: &TestApp, key: &str, id: &str) -> String {
    let r = app.get(&format!("/v1/tokens/{id}"), key).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    v["status"].as_str().expect("status").to_owned()
}

/// Suspend on A, GET on B at once; a D1 notification handled by A, seen by B at once. B has
/// the token cached each time (it read it just before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_see_each_others_changes_at_once() {
    const ON: (&str, &str) = ("TOKENGATE__STORAGE__REDIS_TOKEN_CACHE_ENTRIES", "1000");
    let a = TestApp::builder(Backend::Redis)
        .env(ON.0, ON.1)
        .start()
        .await;
    let url = a.redis.as_ref().expect("redis").url();
    let b = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__STORAGE__REDIS_URL", &url)
        .env(ON.0, ON.1)
        .start()
        .await;
    let (_, key) = a.create_merchant("two instances").await;
    let r = a.tokenize(&key, "4111111111111111").await;
    assert_eq!(r.status(), 201);
    let t: Value = r.json().await.expect("json");
    let id = t["id"].as_str().expect("id").to_owned();
    let d1 = t["networkToken"]["id"].as_str().expect("d1 id").to_owned();

    for round in 0..20 {
        // B caches the token...
        assert_eq!(get_status(&b, &key, &id).await, "ACTIVE", "round {round}");
        assert_eq!(get_status(&b, &key, &id).await, "ACTIVE", "round {round}");
        // ...A suspends it, and B's very next answer has the change.
        let r = a
            .post(&format!("/v1/tokens/{id}/suspend"), &key, &json!({}))
            .await;
        assert_eq!(r.status(), 200, "round {round}");
        assert_eq!(
            get_status(&b, &key, &id).await,
            "SUSPENDED",
            "round {round}"
        );
        let r = a
            .post(&format!("/v1/tokens/{id}/resume"), &key, &json!({}))
            .await;
        assert_eq!(r.status(), 200, "round {round}");
        assert_eq!(get_status(&b, &key, &id).await, "ACTIVE", "round {round}");
    }

    // A D1 notification (delivered to A by its simulator): once A shows it, so does B.
    assert_eq!(get_status(&b, &key, &id).await, "ACTIVE");
    assert_eq!(a.sim_event(&d1, json!({"type": "SUSPEND"})).await, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get_status(&a, &key, &id).await != "SUSPENDED" {
        assert!(
            Instant::now() < deadline,
            "A never applied the notification"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(get_status(&b, &key, &id).await, "SUSPENDED");
    // Both instances had their tracking connection.
    assert_eq!(tracking_clients(&url).await.len(), 2);
}
