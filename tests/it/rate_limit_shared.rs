//! `rate_limit.shared`: two gateway instances on one Redis (standalone and Cluster) draw from one
//! budget per API key and per merchant, leased in batches (`domain::ratelimit`).
//! The control case runs the same traffic with per-instance limits and must let more through,
//! so the bound checked below is one the shared mode actually earns.

use std::time::{Duration, Instant};

use crate::support::app::{Backend, TestApp};
use crate::support::redis_server::{RedisCluster, RedisServer};

/// Per-key limit of the tests: 10/s with a burst of 20.
const RATE: f64 = 10.0;
const BURST: u32 = 20;
/// Requests sent, alternating between the two instances, as fast as they answer.
const REQUESTS: usize = 80;

/// Two instances with `storage` settings and the test's limits; `shared` picks the mode.
async fn two_instances(storage: &[(&str, String)], shared: bool) -> (TestApp, TestApp) {
    let mut apps = Vec::new();
    for _ in 0..2 {
        let mut b = TestApp::builder(Backend::Embedded)
            .env("TOKENGATE__D1__ENABLED", "false")
            .env("TOKENGATE__RATE_LIMIT__PER_KEY_PER_S", &RATE.to_string())
            .env("TOKENGATE__RATE_LIMIT__PER_KEY_BURST", &BURST.to_string())
            .env("TOKENGATE__RATE_LIMIT__PER_MERCHANT_PER_S", "0")
            .env("TOKENGATE__RATE_LIMIT__SHARED", &shared.to_string())
            .env("TOKENGATE__RATE_LIMIT__SHARED_BATCH", "5");
        for (k, v) in storage {
            b = b.env(k, v);
        }
        apps.push(b.start().await);
    }
    let b = apps.pop().unwrap();
    let a = apps.pop().unwrap();
    (a, b)
}

/// Sends [`REQUESTS`] GETs with one key, alternating instances; returns (allowed, refused,
/// elapsed). A refusal must be a 429 `rate_limited` with `Retry-After`.
async fn drive(a: &TestApp, b: &TestApp, key: &str) -> (usize, usize, Duration) {
    let started = Instant::now();
    let (mut allowed, mut refused) = (0, 0);
    for i in 0..REQUESTS {
        let app = if i % 2 == 0 { a } else { b };
        let r = app.get("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA", key).await;
        match r.status().as_u16() {
            404 => allowed += 1,
            429 => {
                assert!(
                    r.headers().contains_key("retry-after"),
                    "429 without Retry-After"
                );
                let body: serde_json::Value = r.json().await.unwrap();
                assert_eq!(body["code"], "rate_limited");
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    (allowed, refused, started.elapsed())
}

/// Most requests a fleet-wide limit can allow in `elapsed`: the burst plus the rate.
fn fleet_bound(elapsed: Duration) -> usize {
    BURST as usize + (RATE * elapsed.as_secs_f64()).ceil() as usize + 1
}

async fn shared_vs_local(storage: Vec<(&str, String)>) {
    // Shared: the two instances together stay within one key's budget.
    let (a, b) = two_instances(&storage, true).await;
    let (_, key) = a.create_merchant("Shared").await;
    let (allowed, refused, elapsed) = drive(&a, &b, &key).await;
    let bound = fleet_bound(elapsed);
    assert!(
        allowed <= bound,
        "shared mode let {allowed} through in {elapsed:?}, more than the fleet budget {bound}"
    );
    // And the budget is usable: at least half the burst went through, on both instances.
    assert!(allowed >= BURST as usize / 2, "only {allowed} allowed");
    assert!(refused > 0);
    drop((a, b));

    // Control, same traffic with per-instance limits: each instance has its own burst, so the
    // pair lets more through than one fleet budget.
    let (a, b) = two_instances(&storage, false).await;
    let (_, key) = a.create_merchant("Local").await;
    let (allowed_local, _, elapsed) = drive(&a, &b, &key).await;
    assert!(
        allowed_local > fleet_bound(elapsed),
        "per-instance limits allowed {allowed_local}: the traffic does not tell the modes apart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_rate_limit_spans_two_instances_on_redis() {
    let redis = RedisServer::start();
    shared_vs_local(vec![("TOKENGATE__STORAGE__REDIS_URL", redis.url())]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_rate_limit_spans_two_instances_on_redis_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let list: Vec<String> = cluster.addrs().iter().map(|a| format!("\"{a}\"")).collect();
    shared_vs_local(vec![(
        "TOKENGATE__STORAGE__REDIS_CLUSTER_NODES",
        format!("[{}]", list.join(",")),
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_rate_limit_spans_the_merchants_keys_and_the_instances() {
    let redis = RedisServer::start();
    let mut apps = Vec::new();
    for _ in 0..2 {
        apps.push(
            TestApp::builder(Backend::Embedded)
                .env("TOKENGATE__D1__ENABLED", "false")
                .env("TOKENGATE__RATE_LIMIT__PER_KEY_PER_S", "0")
                .env("TOKENGATE__RATE_LIMIT__PER_MERCHANT_PER_S", "10")
                .env("TOKENGATE__RATE_LIMIT__PER_MERCHANT_BURST", "20")
                .env("TOKENGATE__RATE_LIMIT__SHARED", "true")
                .env("TOKENGATE__STORAGE__REDIS_URL", &redis.url())
                .start()
                .await,
        );
    }
    let (merchant, key1) = apps[0].create_merchant("Two keys").await;
    // A second key of the same merchant, issued by the admin.
    let r = apps[0]
        .client
        .post(apps[0].url(&format!("/v1/merchants/{merchant}/api-keys")))
        .bearer_auth(crate::support::app::ADMIN)
        .json(&serde_json::json!({"name": "second", "scopes": ["tokens:read"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let key2 = r.json::<serde_json::Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let started = Instant::now();
    let mut allowed = 0;
    for i in 0..REQUESTS {
        let app = &apps[i % 2];
        let key = if (i / 2) % 2 == 0 { &key1 } else { &key2 };
        let r = app.get("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA", key).await;
        if r.status() == 404 {
            allowed += 1;
        } else {
            assert_eq!(r.status(), 429);
        }
    }
    let bound = 20 + (10.0 * started.elapsed().as_secs_f64()).ceil() as usize + 1;
    assert!(allowed <= bound, "{allowed} allowed, budget {bound}");
    assert!(allowed >= 10, "only {allowed} allowed");
}

#[tokio::test]
async fn shared_rate_limit_needs_redis() {
    let cfg = tokengate::config::Config::load_with_env(
        None,
        &[("TOKENGATE__RATE_LIMIT__SHARED".into(), "true".into())],
    )
    .unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("rate_limit.shared"), "{err}");
}
