//! Integration tests: merchant webhooks end to end. The gateway runs in sandbox mode (tokens
//! become ACTIVE through the in-process D1 simulator); a real axum receiver on a free port gets
//! the deliveries and the tests check their signatures with an independent HMAC. Also: retries,
//! dead letters and redelivery, a gateway stopped mid-delivery, two gateways on one Redis, and
//! the outbox store contract on the embedded store, Redis and Redis Cluster; and the SSRF guard
//! (registration refusals, a DNS-rebinding name refused at delivery, the allow-list).

use std::future::Future;
use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokengate::domain::ports::outbox::{JobNext, OutboxStore};
use tokengate::domain::token::MerchantId;
use tokengate::domain::webhooks::{
    DeliveryState, DeliveryStatus, EndpointId, EventId, EventType, SealedSecret, WebhookEndpoint,
    WebhookEvent,
};
use tokengate::egress::testing::StaticResolver;
use tokengate::storage::embedded::EmbeddedStore;
use tokengate::storage::redis::RedisStore;
use tokio::sync::oneshot;

use crate::support::app::{Backend, TestApp, TestAppBuilder, expect_problem};
use crate::support::captured_logs;
use crate::support::cases::redis_config;
use crate::support::redis_server::{RedisCluster, RedisServer, free_port};

const VISA: &str = "4111111111111111";
const WAIT: Duration = Duration::from_secs(20);

// --- fixtures ----------------------------------------------------------------------------------

/// Short backoff, fast polling and a short lease, so retries and take-overs happen in seconds.
pub(crate) fn fast(b: TestAppBuilder) -> TestAppBuilder {
    b.env("TOKENGATE__D1__CALL_TIMEOUT_MS", "2000")
        .env("TOKENGATE__WEBHOOKS__BACKOFF_BASE_MS", "50")
        .env("TOKENGATE__WEBHOOKS__BACKOFF_MAX_MS", "200")
        .env("TOKENGATE__WEBHOOKS__POLL_INTERVAL_MS", "50")
        .env("TOKENGATE__WEBHOOKS__TIMEOUT_MS", "2000")
        .env("TOKENGATE__WEBHOOKS__CLAIM_IDLE_MS", "3000")
}

async fn sandbox(b: Backend) -> TestApp {
    fast(TestApp::builder(b)).start().await
}

/// What the receiver saw of one request.
#[derive(Clone, Debug)]
pub(crate) struct Hit {
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

impl Hit {
    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub(crate) fn event_id(&self) -> &str {
        self.header("tokengate-event-id")
    }
}

#[derive(Default)]
pub(crate) struct RecvState {
    hits: Mutex<Vec<Hit>>,
    /// Answered once `fail_next` is used up.
    pub(crate) status: AtomicU16,
    /// This many requests are answered 500 first.
    pub(crate) fail_next: AtomicUsize,
    /// Delay before answering (after the hit is recorded).
    pub(crate) delay_ms: AtomicU64,
}

/// A webhook receiver on 127.0.0.1; stops when dropped.
pub(crate) struct Receiver {
    port: u16,
    pub(crate) state: Arc<RecvState>,
    _stop: oneshot::Sender<()>,
}

async fn receive(State(s): State<Arc<RecvState>>, headers: HeaderMap, body: String) -> StatusCode {
    s.hits.lock().unwrap().push(Hit { headers, body });
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if s.fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    StatusCode::from_u16(s.status.load(Ordering::SeqCst)).unwrap()
}

impl Receiver {
    pub(crate) async fn start() -> Receiver {
        Self::on(0).await
    }

    async fn on(port: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind receiver");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(RecvState::default());
        state.status.store(200, Ordering::SeqCst);
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Receiver {
            port,
            state,
            _stop: tx,
        }
    }

    /// The same receiver behind TLS (rustls) with `tls`'s certificate.
    async fn tls(tls: rustls::ServerConfig) -> Receiver {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use hyper_util::service::TowerToHyperService;

        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind receiver");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(RecvState::default());
        state.status.store(200, Ordering::SeqCst);
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (tx, mut rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = &mut rx => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => return,
                    },
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // A client that refuses our certificate just ends the handshake.
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        Receiver {
            port,
            state,
            _stop: tx,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub(crate) fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    pub(crate) fn hits_for(&self, event_id: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.event_id() == event_id)
            .collect()
    }
}

/// Polls `f` until it returns `Some`, or fails the test after `WAIT`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks `Tokengate-Signature` the way docs/webhooks.md tells receivers to, with an HMAC
/// computed here (not the gateway's code).
pub(crate) fn assert_signed(secret: &str, hit: &Hit) {
    let sig = hit.header("tokengate-signature");
    let mut t = None;
    let mut v1 = None;
    for part in sig.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = Some(v.to_owned()),
            _ => {}
        }
    }
    let t = t.unwrap_or_else(|| panic!("no t= in {sig:?}"));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - t).abs() <= 300, "signature time {t} far from {now}");
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(hit.body.as_bytes());
    assert_eq!(
        v1.as_deref(),
        Some(hex::encode(mac.finalize().into_bytes()).as_str()),
        "signature of {}",
        hit.event_id()
    );
}

pub(crate) async fn post_empty(app: &TestApp, path: &str, key: &str) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

/// A merchant (onboarded at the simulator) with one ACTIVE token.
pub(crate) async fn merchant_with_token(app: &TestApp, name: &str) -> (String, String) {
    let (_, key) = app.create_merchant(name).await;
    let r = app.tokenize(&key, VISA).await;
    assert_eq!(r.status(), 201);
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["status"], "ACTIVE", "{t}");
    (key, t["id"].as_str().unwrap().to_owned())
}

/// Registers an endpoint; returns its id and secret.
pub(crate) async fn endpoint(
    app: &TestApp,
    key: &str,
    url: &str,
    events: &[&str],
) -> (String, String) {
    let r = app
        .post(
            "/v1/webhook-endpoints",
            key,
            &json!({"url": url, "events": events}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

pub(crate) async fn event(app: &TestApp, key: &str, id: &str) -> Value {
    let r = app.get(&format!("/v1/events/{id}"), key).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

pub(crate) async fn events(app: &TestApp, key: &str) -> Vec<Value> {
    let r = app.get("/v1/events?limit=100", key).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["data"].as_array().unwrap().clone()
}

/// Waits for the event's delivery to `endpoint` to satisfy `pred`; returns the event.
async fn wait_delivery(
    app: &TestApp,
    key: &str,
    event_id: &str,
    endpoint: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    eventually(&format!("delivery of {event_id} to {endpoint}"), || async {
        let e = event(app, key, event_id).await;
        let d = e["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["endpointId"] == endpoint)
            .cloned()
            .unwrap_or(Value::Null);
        pred(&d).then_some(e)
    })
    .await
}

fn delivery<'a>(event: &'a Value, endpoint: &str) -> &'a Value {
    event["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["endpointId"] == endpoint)
        .unwrap()
}

fn redis_cli(server: &RedisServer, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(server.port.to_string())
        .args(args)
        .output()
        .expect("redis-cli must be installed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

crate::backend_tests!(standalone:
    suspend_delivers_a_signed_event,
    retries_until_receivers_recover,
    dead_letter_then_redeliver,
    stopped_mid_delivery_delivers_after_restart,
    endpoints_validation_idempotency_and_isolation,
    update_moves_deliveries_and_keeps_the_checks,
    rotation_signs_with_both_secrets_during_the_overlap,
);

// The outbox (a Redis Stream and ZSETs under the merchant's hash tag) on a real Cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_delivers_a_signed_event_on_redis_cluster() {
    suspend_delivers_a_signed_event(Backend::RedisCluster).await
}

// --- end to end --------------------------------------------------------------------------------

async fn suspend_delivers_a_signed_event(b: Backend) {
    let app = sandbox(b).await;
    let rx = Receiver::start().await;
    let (key, token) = merchant_with_token(&app, "Acme").await;

    let r = app
        .post(
            "/v1/webhook-endpoints",
            &key,
            &json!({"url": rx.url(), "events": ["token.suspended", "token.resumed", "token.suspended"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let ep: Value = r.json().await.unwrap();
    let ep_id = ep["id"].as_str().unwrap().to_owned();
    let secret = ep["secret"].as_str().unwrap().to_owned();
    assert!(ep_id.starts_with("whe_"), "{ep}");
    assert!(
        secret.starts_with("whsec_") && secret.len() == 6 + 43,
        "{ep}"
    );
    assert_eq!(ep["url"], rx.url());
    assert_eq!(ep["events"], json!(["token.suspended", "token.resumed"]));
    assert!(ep["createdAt"].is_string());

    // Listing and reading never show the secret again.
    let list: Value = app
        .get("/v1/webhook-endpoints", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], ep_id.as_str());
    assert!(list["data"][0].get("secret").is_none(), "{list}");
    let one: Value = app
        .get(&format!("/v1/webhook-endpoints/{ep_id}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert!(
        one.get("secret").is_none() && one["id"] == ep_id.as_str(),
        "{one}"
    );

    let r = post_empty(&app, &format!("/v1/tokens/{token}/suspend"), &key).await;
    assert_eq!(r.status(), 200);
    let hit = eventually("the suspended event", || async {
        rx.hits().first().cloned()
    })
    .await;
    assert_eq!(hit.header("tokengate-event-type"), "token.suspended");
    assert_eq!(hit.header("content-type"), "application/json");
    assert!(hit.header("user-agent").starts_with("tokengate-webhooks/"));
    assert_signed(&secret, &hit);
    assert!(!hit.body.contains(VISA), "PAN in a webhook body");
    let body: Value = serde_json::from_str(&hit.body).unwrap();
    let event_id = hit.event_id().to_owned();
    assert!(event_id.starts_with("evt_"), "{event_id}");
    assert_eq!(body["id"], event_id.as_str());
    assert_eq!(body["type"], "token.suspended");
    assert!(body["createdAt"].is_string());
    // The token exactly as GET /v1/tokens/{id} shows it.
    let current: Value = app
        .get(&format!("/v1/tokens/{token}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["data"]["token"], current);
    assert_eq!(body["data"]["token"]["status"], "SUSPENDED");

    // Delivery status is visible.
    let e = wait_delivery(&app, &key, &event_id, &ep_id, |d| {
        d["status"] == "delivered"
    })
    .await;
    assert_eq!(e["status"], "delivered");
    assert_eq!(e["type"], "token.suspended");
    assert_eq!(e["tokenId"], token.as_str());
    assert_eq!(e["attempts"], 1);
    assert_eq!(e["lastError"], Value::Null);
    let d = delivery(&e, &ep_id);
    assert_eq!(d["attempts"], 1);
    assert_eq!(d["lastResponseStatus"], 200);
    assert!(d["deliveredAt"].is_string() && d["lastAttemptAt"].is_string());

    // Resume: a second event, to the same endpoint.
    let r = post_empty(&app, &format!("/v1/tokens/{token}/resume"), &key).await;
    assert_eq!(r.status(), 200);
    let resumed = eventually("the resumed event", || async {
        rx.hits()
            .into_iter()
            .find(|h| h.header("tokengate-event-type") == "token.resumed")
    })
    .await;
    assert_signed(&secret, &resumed);

    // Deletion: the endpoint does not subscribe to token.deleted, so no event at all.
    let r = app
        .client
        .delete(app.url(&format!("/v1/tokens/{token}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = events(&app, &key).await;
    let types: Vec<&str> = all.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["token.resumed", "token.suspended"], "newest first");
    assert_eq!(rx.hits().len(), 2, "exactly one delivery per event");

    // The secret is stored only sealed: it appears nowhere in the raw store.
    let secret_body = secret.trim_start_matches("whsec_").to_owned();
    let data_dir = app.data_dir.clone();
    // The cluster outlives the gateway for the dump below.
    let mut app = app;
    let cluster = app.cluster.take();
    let (_tmp, redis) = app.stop().await;
    let raw = match b {
        Backend::Embedded => std::fs::read(data_dir.join("tokengate.redb")).unwrap(),
        Backend::Redis => {
            let server = redis.unwrap();
            // Uncompressed, so a secret in clear would show up verbatim.
            redis_cli(&server, &["CONFIG", "SET", "rdbcompression", "no"]);
            assert_eq!(redis_cli(&server, &["SAVE"]), "OK");
            std::fs::read(server.dir().join("dump.rdb")).unwrap()
        }
        Backend::RedisCluster => {
            crate::store_contract::dump_cluster(&cluster.expect("cluster")).await
        }
    };
    assert!(raw.len() > 1000, "store dump is suspiciously small");
    let found = raw
        .windows(secret_body.len())
        .any(|w| w == secret_body.as_bytes());
    assert!(!found, "webhook secret stored in clear");
    assert!(
        !raw.windows(VISA.len()).any(|w| w == VISA.as_bytes()),
        "PAN stored in clear"
    );
    let logs = captured_logs();
    assert!(!logs.contains(&secret_body), "webhook secret in the logs");
    assert!(!logs.contains(&rx.url()), "endpoint URL in the logs");
}

async fn retries_until_receivers_recover(b: Backend) {
    let app = fast(TestApp::builder(b))
        .env("TOKENGATE__WEBHOOKS__MAX_ATTEMPTS", "50")
        .start()
        .await;
    let (key, token) = merchant_with_token(&app, "Acme").await;
    // One receiver answers 500 twice, the other is not listening yet.
    let flaky = Receiver::start().await;
    flaky.state.fail_next.store(2, Ordering::SeqCst);
    let down_port = free_port();
    let down_url = format!("http://127.0.0.1:{down_port}/hook");
    let (flaky_ep, flaky_secret) = endpoint(&app, &key, &flaky.url(), &["token.suspended"]).await;
    let (down_ep, down_secret) = endpoint(&app, &key, &down_url, &["token.suspended"]).await;

    let r = post_empty(&app, &format!("/v1/tokens/{token}/suspend"), &key).await;
    assert_eq!(r.status(), 200);
    let event_id = eventually("the event", || async {
        events(&app, &key)
            .await
            .first()
            .map(|e| e["id"].as_str().unwrap().to_owned())
    })
    .await;

    // The flaky receiver gets it on the third attempt.
    let e = wait_delivery(&app, &key, &event_id, &flaky_ep, |d| {
        d["status"] == "delivered"
    })
    .await;
    let d = delivery(&e, &flaky_ep);
    assert_eq!(d["attempts"], 3, "{e}");
    assert_eq!(d["lastResponseStatus"], 200);
    let hits = flaky.hits_for(&event_id);
    assert_eq!(hits.len(), 3);
    for h in &hits {
        assert_signed(&flaky_secret, h);
        assert_eq!(h.body, hits[0].body, "every attempt carries the same body");
    }

    // The other one keeps failing, visibly, with retries scheduled.
    let e = wait_delivery(&app, &key, &event_id, &down_ep, |d| {
        d["status"] == "failed" && d["attempts"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    let d = delivery(&e, &down_ep);
    assert_eq!(d["lastError"], "connect_failed", "{e}");
    assert!(d["nextAttemptAt"].is_string(), "{e}");
    assert_eq!(
        e["status"], "failed",
        "one delivery failing makes the event failed"
    );
    assert_eq!(e["lastError"], "connect_failed");

    // Once it listens, a retry gets through.
    let up = Receiver::on(down_port).await;
    let e = wait_delivery(&app, &key, &event_id, &down_ep, |d| {
        d["status"] == "delivered"
    })
    .await;
    assert_eq!(e["status"], "delivered");
    assert!(
        delivery(&e, &down_ep)["attempts"].as_u64().unwrap() >= 3,
        "{e}"
    );
    let hits = up.hits_for(&event_id);
    assert_eq!(hits.len(), 1);
    assert_signed(&down_secret, &hits[0]);
}

async fn dead_letter_then_redeliver(b: Backend) {
    let app = fast(TestApp::builder(b))
        .env("TOKENGATE__WEBHOOKS__MAX_ATTEMPTS", "3")
        .start()
        .await;
    let (key, token) = merchant_with_token(&app, "Acme").await;
    let rx = Receiver::start().await;
    rx.state.status.store(500, Ordering::SeqCst);
    let (ep, secret) = endpoint(&app, &key, &rx.url(), &["token.suspended"]).await;
    let r = post_empty(&app, &format!("/v1/tokens/{token}/suspend"), &key).await;
    assert_eq!(r.status(), 200);

    let event_id = eventually("a hit", || async {
        rx.hits().first().map(|h| h.event_id().to_owned())
    })
    .await;
    let e = wait_delivery(&app, &key, &event_id, &ep, |d| d["status"] == "dead").await;
    assert_eq!(e["status"], "dead");
    let d = delivery(&e, &ep);
    assert_eq!(d["attempts"], 3, "{e}");
    assert_eq!(d["lastError"], "http_500");
    assert_eq!(d["lastResponseStatus"], 500);
    assert_eq!(d["nextAttemptAt"], Value::Null);
    // No attempt after the last one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.hits_for(&event_id).len(), 3);
    if let Some(server) = &app.redis {
        assert_eq!(redis_cli(server, &["XLEN", "tg:{wh}:dead"]), "1");
    }

    // Fixed receiver, manual redelivery: a new round, delivered.
    rx.state.status.store(200, Ordering::SeqCst);
    let r = post_empty(&app, &format!("/v1/events/{event_id}/redeliver"), &key).await;
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], event_id.as_str());
    assert!(
        v["status"] == "pending" || v["status"] == "delivered",
        "{v}"
    );
    let e = wait_delivery(&app, &key, &event_id, &ep, |d| d["status"] == "delivered").await;
    assert_eq!(delivery(&e, &ep)["attempts"], 1, "{e}");
    let hits = rx.hits_for(&event_id);
    assert_eq!(hits.len(), 4);
    assert_signed(&secret, &hits[3]);
    assert_eq!(hits[3].body, hits[0].body);

    // A delivered event can be sent again on request.
    let r = post_empty(&app, &format!("/v1/events/{event_id}/redeliver"), &key).await;
    assert_eq!(r.status(), 202);
    eventually("the second redelivery", || async {
        (rx.hits_for(&event_id).len() == 5).then_some(())
    })
    .await;

    // Unknown and malformed ids.
    let unknown = EventId::generate(time::OffsetDateTime::now_utc());
    let r = post_empty(&app, &format!("/v1/events/{unknown}/redeliver"), &key).await;
    expect_problem(r, 404, "event_not_found").await;
    let r = post_empty(&app, "/v1/events/evt_nope/redeliver", &key).await;
    expect_problem(r, 404, "event_not_found").await;
}

async fn stopped_mid_delivery_delivers_after_restart(b: Backend) {
    let app = sandbox(b).await;
    let (key, token) = merchant_with_token(&app, "Acme").await;
    let rx = Receiver::start().await;
    // The receiver holds the first request long enough for the gateway to go away meanwhile.
    rx.state.delay_ms.store(5_000, Ordering::SeqCst);
    let (ep, secret) = endpoint(&app, &key, &rx.url(), &["token.suspended"]).await;
    let r = post_empty(&app, &format!("/v1/tokens/{token}/suspend"), &key).await;
    assert_eq!(r.status(), 200);
    let event_id = eventually("the first attempt to arrive", || async {
        rx.hits().first().map(|h| h.event_id().to_owned())
    })
    .await;

    // Stop the gateway while the attempt is in flight: nothing records its outcome.
    let data_dir = app.data_dir.clone();
    let (tmp, redis) = app.stop().await;
    rx.state.delay_ms.store(0, Ordering::SeqCst);

    // A new gateway on the same store takes the job over once its claim is stale.
    let builder = fast(TestApp::builder(b));
    let app = match redis {
        Some(server) => builder.redis_server(server).start().await,
        None => builder.data_dir(data_dir).start().await,
    };
    let e = wait_delivery(&app, &key, &event_id, &ep, |d| d["status"] == "delivered").await;
    assert_eq!(
        delivery(&e, &ep)["attempts"],
        1,
        "the abandoned attempt left no trace: {e}"
    );
    let hits = rx.hits_for(&event_id);
    assert_eq!(
        hits.len(),
        2,
        "at least once: the interrupted attempt, then the delivery"
    );
    assert_signed(&secret, &hits[1]);
    drop(tmp);
}

async fn endpoints_validation_idempotency_and_isolation(b: Backend) {
    let app = sandbox(b).await;
    let rx = Receiver::start().await;
    let (key, token) = merchant_with_token(&app, "Acme").await;
    let (_, other) = app.create_merchant("Other").await;

    // Authentication first.
    let r = app
        .client
        .get(app.url("/v1/webhook-endpoints"))
        .send()
        .await
        .unwrap();
    expect_problem(r, 401, "unauthorized").await;

    // Validation.
    for (body, status, code) in [
        (
            json!({"url": "ftp://example.com/", "events": ["token.suspended"]}),
            422,
            "invalid_webhook_url",
        ),
        (
            json!({"url": "https://u:p@example.com/", "events": ["token.suspended"]}),
            422,
            "invalid_webhook_url",
        ),
        (
            json!({"url": format!("https://example.com/{}", "a".repeat(2100)), "events": ["token.suspended"]}),
            422,
            "invalid_webhook_url",
        ),
        (
            json!({"url": "https://example.com/", "events": []}),
            422,
            "invalid_event_types",
        ),
        (
            json!({"url": "https://example.com/", "events": ["token.frozen"]}),
            422,
            "invalid_event_types",
        ),
        (
            json!({"url": "https://example.com/", "events": ["token.suspended"], "x": 1}),
            400,
            "invalid_field",
        ),
        (json!({"events": ["token.suspended"]}), 400, "missing_field"),
    ] {
        let r = app.post("/v1/webhook-endpoints", &key, &body).await;
        expect_problem(r, status, code).await;
    }
    // Sandbox mode accepts plain http to any host (documented); production only to loopback.
    let r = app
        .post(
            "/v1/webhook-endpoints",
            &key,
            &json!({"url": "http://example.com/hook", "events": ["token.deleted"]}),
        )
        .await;
    assert_eq!(r.status(), 201);

    // Idempotency: a replay returns the same endpoint and the same secret.
    let create = |k: &'static str, url: String| {
        app.client
            .post(app.url("/v1/webhook-endpoints"))
            .bearer_auth(&key)
            .header("idempotency-key", k)
            .json(&json!({"url": url, "events": ["token.suspended"]}))
            .send()
    };
    let first = create("ep-1", rx.url()).await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = create("ep-1", rx.url()).await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["cache-control"], "no-store");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["secret"], first["secret"]);
    assert!(first["secret"].as_str().unwrap().starts_with("whsec_"));
    let r = create("ep-1", "https://example.com/other".into())
        .await
        .unwrap();
    expect_problem(r, 422, "idempotency_key_reused").await;
    let ep_id = first["id"].as_str().unwrap().to_owned();
    let list: Value = app
        .get("/v1/webhook-endpoints", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        2,
        "the replay made no endpoint"
    );

    // Another merchant sees nothing of it.
    let list: Value = app
        .get("/v1/webhook-endpoints", &other)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"], json!([]));
    let r = app
        .get(&format!("/v1/webhook-endpoints/{ep_id}"), &other)
        .await;
    expect_problem(r, 404, "webhook_endpoint_not_found").await;
    let r = app
        .client
        .delete(app.url(&format!("/v1/webhook-endpoints/{ep_id}")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    expect_problem(r, 404, "webhook_endpoint_not_found").await;
    let r = app.get("/v1/webhook-endpoints/whe_nope", &key).await;
    expect_problem(r, 404, "webhook_endpoint_not_found").await;

    // Six events, paged two ways; the other merchant sees none of them.
    for i in 0..3 {
        for verb in ["suspend", "resume"] {
            let r = post_empty(&app, &format!("/v1/tokens/{token}/{verb}"), &key).await;
            assert_eq!(r.status(), 200, "{verb} {i}");
        }
    }
    // Only suspensions are subscribed: three events.
    let all = eventually("three events", || async {
        let all = events(&app, &key).await;
        (all.len() == 3).then_some(all)
    })
    .await;
    let ids: Vec<String> = all
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(ids, sorted, "newest first");
    let page: Value = app
        .get("/v1/events?limit=2", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    let cursor = page["nextCursor"].as_str().unwrap().to_owned();
    assert_eq!(cursor, ids[1]);
    let page2: Value = app
        .get(&format!("/v1/events?limit=2&cursor={cursor}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page2["data"].as_array().unwrap().len(), 1);
    assert_eq!(page2["data"][0]["id"], ids[2].as_str());
    assert_eq!(page2["nextCursor"], Value::Null);
    let r = app.get("/v1/events?limit=0", &key).await;
    expect_problem(r, 400, "invalid_query").await;
    let r = app.get("/v1/events?cursor=evt_bad", &key).await;
    expect_problem(r, 422, "invalid_cursor").await;

    let theirs: Value = app.get("/v1/events", &other).await.json().await.unwrap();
    assert_eq!(theirs["data"], json!([]));
    let r = app.get(&format!("/v1/events/{}", ids[0]), &other).await;
    expect_problem(r, 404, "event_not_found").await;
    let r = post_empty(&app, &format!("/v1/events/{}/redeliver", ids[0]), &other).await;
    expect_problem(r, 404, "event_not_found").await;

    // Deleting: 204, then gone; a second delete is 404.
    let del = |id: String, k: String| {
        app.client
            .delete(app.url(&format!("/v1/webhook-endpoints/{id}")))
            .bearer_auth(k)
            .send()
    };
    let r = del(ep_id.clone(), key.clone()).await.unwrap();
    assert_eq!(r.status(), 204);
    let r = del(ep_id.clone(), key.clone()).await.unwrap();
    expect_problem(r, 404, "webhook_endpoint_not_found").await;

    // At most 16 endpoints per merchant.
    let (_, third) = app.create_merchant("Third").await;
    for i in 0..16 {
        let r = app
            .post(
                "/v1/webhook-endpoints",
                &third,
                &json!({"url": format!("https://example.com/{i}"), "events": ["token.updated"]}),
            )
            .await;
        assert_eq!(r.status(), 201, "endpoint {i}");
    }
    let r = app
        .post(
            "/v1/webhook-endpoints",
            &third,
            &json!({"url": "https://example.com/17", "events": ["token.updated"]}),
        )
        .await;
    expect_problem(r, 409, "too_many_webhook_endpoints").await;
}

// --- changing endpoints: update and secret rotation --------------------------------------------

async fn patch(app: &TestApp, path: &str, key: &str, body: &Value) -> reqwest::Response {
    app.client
        .patch(app.url(path))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The `t` and every `v1` of a delivery's `Tokengate-Signature`, in order.
fn signatures(hit: &Hit) -> (i64, Vec<String>) {
    let sig = hit.header("tokengate-signature");
    let mut t = None;
    let mut v1 = Vec::new();
    for part in sig.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1.push(v.to_owned()),
            _ => {}
        }
    }
    (t.unwrap_or_else(|| panic!("no t= in {sig:?}")), v1)
}

/// HMAC-SHA256 of `"<t>.<body>"` under `secret`, computed here (not the gateway's code).
fn hmac_hex(secret: &str, t: i64, body: &str) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Asserts the delivery carries exactly one `v1` per secret, in this order (newest first).
fn assert_signed_by(hit: &Hit, secrets: &[&str]) {
    let (t, v1) = signatures(hit);
    let want: Vec<String> = secrets.iter().map(|s| hmac_hex(s, t, &hit.body)).collect();
    assert_eq!(v1, want, "signatures of {}", hit.event_id());
    // The gateway's own verifier accepts each secret alone.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for s in secrets {
        assert!(tokengate::domain::webhooks::verify_signature(
            s.as_bytes(),
            hit.header("tokengate-signature"),
            hit.body.as_bytes(),
            now,
            tokengate::domain::webhooks::REPLAY_WINDOW,
        ));
    }
}

/// Suspends then resumes `token`; returns the deliveries of the two events to `rx`.
async fn suspend_and_resume(app: &TestApp, key: &str, token: &str, rx: &Receiver) -> Vec<Hit> {
    let before = rx.hits().len();
    for verb in ["suspend", "resume"] {
        let r = post_empty(app, &format!("/v1/tokens/{token}/{verb}"), key).await;
        assert_eq!(r.status(), 200, "{verb}");
    }
    eventually("two deliveries", || async {
        let hits = rx.hits();
        (hits.len() >= before + 2).then(|| hits[before..].to_vec())
    })
    .await
}

/// `PATCH /v1/webhook-endpoints/{id}`: the URL and the event types change (deliveries follow),
/// with the checks of registration; the secret stays; idempotent; other merchants get 404.
async fn update_moves_deliveries_and_keeps_the_checks(b: Backend) {
    let app = sandbox(b).await;
    let (rx1, rx2) = (Receiver::start().await, Receiver::start().await);
    let (key, token) = merchant_with_token(&app, "Acme").await;
    let (_, other) = app.create_merchant("Other").await;
    let (ep_id, secret) = endpoint(&app, &key, &rx1.url(), &["token.suspended"]).await;
    let path = format!("/v1/webhook-endpoints/{ep_id}");

    let r = patch(
        &app,
        &path,
        &key,
        &json!({"url": rx2.url(), "events": ["token.resumed"]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let ep: Value = r.json().await.unwrap();
    assert_eq!(ep["id"], ep_id.as_str());
    assert_eq!(ep["url"], rx2.url());
    assert_eq!(ep["events"], json!(["token.resumed"]));
    assert!(ep.get("secret").is_none(), "{ep}");
    let read: Value = app.get(&path, &key).await.json().await.unwrap();
    assert_eq!(read, ep);

    // Only the resumption is subscribed now, and it goes to the new URL, signed as before.
    for verb in ["suspend", "resume"] {
        let r = post_empty(&app, &format!("/v1/tokens/{token}/{verb}"), &key).await;
        assert_eq!(r.status(), 200, "{verb}");
    }
    let hit = eventually("the resumed event at the new URL", || async {
        rx2.hits().first().cloned()
    })
    .await;
    assert_eq!(hit.header("tokengate-event-type"), "token.resumed");
    assert_signed(&secret, &hit);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx1.hits().is_empty(), "the old URL got a delivery");
    assert_eq!(rx2.hits().len(), 1, "an unsubscribed event was delivered");

    // Either field alone; the other stays.
    let r = patch(
        &app,
        &path,
        &key,
        &json!({"events": ["token.suspended", "token.resumed", "token.suspended"]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let ep: Value = r.json().await.unwrap();
    assert_eq!(ep["url"], rx2.url());
    assert_eq!(ep["events"], json!(["token.suspended", "token.resumed"]));

    // The checks of registration; a refused change changes nothing.
    for (body, status, code) in [
        (
            json!({"url": "https://10.0.0.1/hook"}),
            400,
            "webhook_url_forbidden",
        ),
        (
            json!({"url": "https://169.254.169.254/latest/meta-data/"}),
            400,
            "webhook_url_forbidden",
        ),
        (
            json!({"url": "ftp://example.com/"}),
            422,
            "invalid_webhook_url",
        ),
        (
            json!({"url": "https://u:p@example.com/"}),
            422,
            "invalid_webhook_url",
        ),
        (json!({"events": []}), 422, "invalid_event_types"),
        (
            json!({"events": ["token.frozen"]}),
            422,
            "invalid_event_types",
        ),
        (json!({"secret": "whsec_mine"}), 400, "invalid_field"),
        (json!({"url": 7}), 400, "invalid_field"),
    ] {
        let r = patch(&app, &path, &key, &body).await;
        expect_problem(r, status, code).await;
    }
    let read: Value = app.get(&path, &key).await.json().await.unwrap();
    assert_eq!(read, ep, "a refused update changed the endpoint");

    // Idempotency-Key: the replay answers the same; another body with the key is refused.
    let send = |k: &'static str, body: Value| {
        app.client
            .patch(app.url(&path))
            .bearer_auth(&key)
            .header("idempotency-key", k)
            .json(&body)
            .send()
    };
    let body = json!({"url": rx1.url()});
    let first = send("upd-1", body.clone()).await.unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    let again = send("upd-1", body).await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let r = send("upd-1", json!({"url": rx2.url()})).await.unwrap();
    expect_problem(r, 422, "idempotency_key_reused").await;
    assert_eq!(first["url"], rx1.url());

    // Another merchant's endpoint, like an unknown one, is not found; nothing changes.
    let r = patch(&app, &path, &other, &json!({"url": rx2.url()})).await;
    expect_problem(r, 404, "webhook_endpoint_not_found").await;
    let r = patch(
        &app,
        "/v1/webhook-endpoints/whe_nope",
        &key,
        &json!({"url": rx2.url()}),
    )
    .await;
    expect_problem(r, 404, "webhook_endpoint_not_found").await;
    let read: Value = app.get(&path, &key).await.json().await.unwrap();
    assert_eq!(read["url"], rx1.url());

    // A deleted endpoint cannot be updated back into existence.
    let r = app
        .client
        .delete(app.url(&path))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = patch(&app, &path, &key, &json!({"url": rx2.url()})).await;
    expect_problem(r, 404, "webhook_endpoint_not_found").await;
    let list: Value = app
        .get("/v1/webhook-endpoints", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"], json!([]));
}

/// `POST /v1/webhook-endpoints/{id}/rotate-secret`: the new secret is shown once; during the
/// overlap every delivery carries the new and the old signature, after it only the new one; a
/// rotation during an overlap drops the oldest secret; the secrets never reach the logs or a
/// later read; other merchants get 404.
async fn rotation_signs_with_both_secrets_during_the_overlap(b: Backend) {
    let app = sandbox(b).await;
    let rx = Receiver::start().await;
    let (key, token) = merchant_with_token(&app, "Acme").await;
    let (_, other) = app.create_merchant("Other").await;
    let (ep_id, s1) = endpoint(&app, &key, &rx.url(), &["token.suspended", "token.resumed"]).await;
    let path = format!("/v1/webhook-endpoints/{ep_id}/rotate-secret");
    let rotate = |body: Option<Value>, idem: Option<&'static str>| {
        let mut r = app.client.post(app.url(&path)).bearer_auth(&key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        if let Some(k) = idem {
            r = r.header("idempotency-key", k);
        }
        r.send()
    };

    // A long overlap: both secrets sign, new first.
    let r = rotate(Some(json!({"overlapSeconds": 600})), Some("rot-1"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let rotated: Value = r.json().await.unwrap();
    let s2 = rotated["secret"].as_str().unwrap().to_owned();
    assert!(s2.starts_with("whsec_") && s2.len() == 6 + 43 && s2 != s1);
    assert_eq!(rotated["id"], ep_id.as_str());
    assert_eq!(rotated["url"], rx.url());
    assert!(rotated["secretRotatedAt"].is_string(), "{rotated}");
    let expires = time::OffsetDateTime::parse(
        rotated["previousSecretExpiresAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(left > time::Duration::seconds(590) && left <= time::Duration::seconds(600));
    // The replay shows the same secret (from its sealed copy, not the idempotency store).
    let again = rotate(Some(json!({"overlapSeconds": 600})), Some("rot-1"))
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["secret"], s2.as_str());
    // Reads never show a secret.
    let ep_path = format!("/v1/webhook-endpoints/{ep_id}");
    let read = app.get(&ep_path, &key).await.text().await.unwrap();
    let list = app
        .get("/v1/webhook-endpoints", &key)
        .await
        .text()
        .await
        .unwrap();
    for body in [&read, &list] {
        assert!(
            !body.contains("whsec_") && !body.contains("\"secret\""),
            "{body}"
        );
    }
    let read: Value = serde_json::from_str(&read).unwrap();
    assert_eq!(
        read["previousSecretExpiresAt"],
        rotated["previousSecretExpiresAt"]
    );

    for hit in suspend_and_resume(&app, &key, &token, &rx).await {
        assert_signed_by(&hit, &[&s2, &s1]);
    }

    // A rotation during the overlap: the secret it replaces (s2) overlaps, s1 is dropped.
    let r = rotate(Some(json!({"overlapSeconds": 2})), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rotated: Value = r.json().await.unwrap();
    let s3 = rotated["secret"].as_str().unwrap().to_owned();
    let expires = time::OffsetDateTime::parse(
        rotated["previousSecretExpiresAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    for hit in suspend_and_resume(&app, &key, &token, &rx).await {
        assert_signed_by(&hit, &[&s3, &s2]);
    }
    // The first rotation's replay no longer has its secret to show: s2 is not current.
    let stale = rotate(Some(json!({"overlapSeconds": 600})), Some("rot-1"))
        .await
        .unwrap();
    assert_eq!(stale.status(), 200);
    assert!(stale.json::<Value>().await.unwrap().get("secret").is_none());

    // After the window: the new secret alone.
    let wait = expires - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(200);
    if wait.is_positive() {
        tokio::time::sleep(wait.unsigned_abs()).await;
    }
    let read: Value = app.get(&ep_path, &key).await.json().await.unwrap();
    assert_eq!(read["previousSecretExpiresAt"], Value::Null);
    for hit in suspend_and_resume(&app, &key, &token, &rx).await {
        assert_signed_by(&hit, &[&s3]);
    }

    // No overlap: the old secret stops at once. No body: the default overlap, 24 hours.
    let r = rotate(Some(json!({"overlapSeconds": 0})), None)
        .await
        .unwrap();
    let rotated: Value = r.json().await.unwrap();
    let s4 = rotated["secret"].as_str().unwrap().to_owned();
    assert_eq!(rotated["previousSecretExpiresAt"], Value::Null);
    for hit in suspend_and_resume(&app, &key, &token, &rx).await {
        assert_signed_by(&hit, &[&s4]);
    }
    let r = rotate(None, None).await.unwrap();
    assert_eq!(r.status(), 200);
    let rotated: Value = r.json().await.unwrap();
    let s5 = rotated["secret"].as_str().unwrap().to_owned();
    let expires = time::OffsetDateTime::parse(
        rotated["previousSecretExpiresAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(left > time::Duration::hours(23) && left <= time::Duration::hours(24));

    // Bounds and shape.
    for (body, status, code) in [
        (
            json!({"overlapSeconds": 604_801}),
            422,
            "invalid_rotation_overlap",
        ),
        (json!({"overlapSeconds": -1}), 400, "invalid_field"),
        (json!({"overlapSeconds": "1d"}), 400, "invalid_field"),
        (json!({"overlap": 60}), 400, "invalid_field"),
    ] {
        let r = rotate(Some(body), None).await.unwrap();
        expect_problem(r, status, code).await;
    }
    let r = rotate(Some(json!({"overlapSeconds": 604_800})), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s6 = r.json::<Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_owned();

    // Another merchant's endpoint, like an unknown one, is not found.
    let r = post_empty(&app, &path, &other).await;
    expect_problem(r, 404, "webhook_endpoint_not_found").await;
    let r = post_empty(&app, "/v1/webhook-endpoints/whe_nope/rotate-secret", &key).await;
    expect_problem(r, 404, "webhook_endpoint_not_found").await;

    // No secret ever reaches the logs.
    let logs = captured_logs();
    for s in [&s1, &s2, &s3, &s4, &s5, &s6] {
        assert!(
            !logs.contains(s.trim_start_matches("whsec_")),
            "a webhook secret in the logs"
        );
    }
}

// --- https --------------------------------------------------------------------------------------

/// HTTPS receivers: one whose certificate chains to the CA in `webhooks.ca_file` gets the event;
/// one with a certificate from another CA is refused (the delivery fails, nothing is sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_receivers_are_verified_against_trusted_roots() {
    let trusted = tokengate_d1_protocol::devkeys::DevMaterial::generate("mgid-webhooks").unwrap();
    let stranger = tokengate_d1_protocol::devkeys::DevMaterial::generate("mgid-webhooks").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("webhooks-ca.pem");
    std::fs::write(&ca_file, &trusted.ca_cert_pem).unwrap();
    let app = fast(TestApp::builder(Backend::Embedded))
        .env("TOKENGATE__WEBHOOKS__CA_FILE", ca_file.to_str().unwrap())
        .start()
        .await;
    let (key, token) = merchant_with_token(&app, "Acme").await;
    let server = |m: &tokengate_d1_protocol::devkeys::DevMaterial| {
        tokengate_d1_protocol::tls::server_config(
            &m.gateway_server_cert_pem,
            &m.gateway_server_key_pem,
            None,
            false,
        )
        .unwrap()
    };
    let good = Receiver::tls(server(&trusted)).await;
    let bad = Receiver::tls(server(&stranger)).await;
    let good_url = format!("https://localhost:{}/hook", good.port);
    let bad_url = format!("https://localhost:{}/hook", bad.port);
    let (good_ep, secret) = endpoint(&app, &key, &good_url, &["token.suspended"]).await;
    let (bad_ep, _) = endpoint(&app, &key, &bad_url, &["token.suspended"]).await;

    let r = post_empty(&app, &format!("/v1/tokens/{token}/suspend"), &key).await;
    assert_eq!(r.status(), 200);
    let hit = eventually("the https delivery", || async {
        good.hits().first().cloned()
    })
    .await;
    assert_signed(&secret, &hit);
    let event_id = hit.event_id().to_owned();
    wait_delivery(&app, &key, &event_id, &good_ep, |d| {
        d["status"] == "delivered"
    })
    .await;
    let e = wait_delivery(&app, &key, &event_id, &bad_ep, |d| {
        d["status"] == "failed" && d["attempts"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    assert_eq!(delivery(&e, &bad_ep)["lastError"], "connect_failed", "{e}");
    assert!(
        bad.hits().is_empty(),
        "a request reached an untrusted server"
    );
}

// --- the SSRF guard (src/egress.rs) -------------------------------------------------------------

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// A refusal names the class and nothing of the host or what it resolved to.
async fn expect_forbidden(app: &TestApp, key: &str, url: &str, class: &str, hidden: &[&str]) {
    let r = app
        .post(
            "/v1/webhook-endpoints",
            key,
            &json!({"url": url, "events": ["token.suspended"]}),
        )
        .await;
    let p = expect_problem(r, 400, "webhook_url_forbidden").await;
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("({class})")), "{url}: {detail}");
    for h in hidden {
        assert!(!detail.contains(h), "{url}: the detail shows {h}: {detail}");
    }
}

/// Registration refuses hosts that are, or resolve to, internal addresses of every class, in
/// sandbox mode too (it only keeps loopback open), and the gateway's own listeners. The
/// allow-list opens its networks; a name that does not resolve yet is left to delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_urls_are_refused_at_registration() {
    let dns = Arc::new(StaticResolver::new());
    dns.set("metadata.merchant.test", &ips(&["169.254.169.254"]));
    dns.set("intranet.merchant.test", &ips(&["10.1.2.3"]));
    dns.set(
        "mixed.merchant.test",
        &ips(&["93.184.215.14", "192.168.0.10"]),
    );
    dns.set("ula.merchant.test", &ips(&["fd00:abcd::1"]));
    dns.set(
        "public.merchant.test",
        &ips(&["93.184.215.14", "2606:4700::1111"]),
    );
    dns.set("listed.merchant.test", &ips(&["10.20.0.7"]));
    let app = fast(TestApp::builder(Backend::Embedded))
        .resolver(dns.clone())
        .env(
            "TOKENGATE__WEBHOOKS__ALLOW_PRIVATE_NETWORKS",
            r#"["10.20.0.0/16"]"#,
        )
        .start()
        .await;
    let (_, key) = app.create_merchant("Acme").await;
    let own = app.addr.port();
    let control = app.sim_control.clone().unwrap();
    let refused: Vec<(String, &str, &str)> = vec![
        (
            "https://169.254.169.254/latest/meta-data/".into(),
            "link_local",
            "169.254",
        ),
        (
            "https://metadata.merchant.test/hook".into(),
            "link_local",
            "merchant.test",
        ),
        ("https://10.0.0.1/hook".into(), "private", "10.0.0.1"),
        (
            "https://intranet.merchant.test/hook".into(),
            "private",
            "10.1.2.3",
        ),
        (
            "https://mixed.merchant.test/hook".into(),
            "private",
            "192.168",
        ),
        ("https://172.16.5.4:8443/hook".into(), "private", "172.16"),
        ("https://192.168.1.1/hook".into(), "private", "192.168"),
        ("https://100.64.1.1/hook".into(), "shared_cgnat", "100.64"),
        (
            "https://ula.merchant.test/hook".into(),
            "unique_local",
            "fd00",
        ),
        ("https://[fd12::1]/hook".into(), "unique_local", "fd12"),
        ("https://[fe80::1]/hook".into(), "link_local", "fe80"),
        ("https://[::ffff:10.0.0.1]/hook".into(), "private", "ffff"),
        (
            "https://[::ffff:169.254.169.254]/hook".into(),
            "link_local",
            "ffff",
        ),
        (
            "https://[64:ff9b::a9fe:a9fe]/hook".into(),
            "link_local",
            "ff9b",
        ),
        ("https://0.0.0.0/hook".into(), "unspecified", "0.0.0.0"),
        ("https://[::]/hook".into(), "unspecified", "[::]"),
        ("https://224.0.0.1/hook".into(), "multicast", "224"),
        ("https://255.255.255.255/hook".into(), "broadcast", "255"),
        ("https://192.0.2.10/hook".into(), "documentation", "192.0.2"),
        ("https://240.0.0.1/hook".into(), "reserved", "240"),
        (
            format!("http://127.0.0.1:{own}/v1/merchants"),
            "own_listener",
            "127.0.0.1",
        ),
        (
            format!("http://localhost:{own}/v1/merchants"),
            "own_listener",
            "localhost",
        ),
        (format!("{control}/sim/faults"), "own_listener", "127.0.0.1"),
    ];
    for (url, class, hidden) in &refused {
        expect_forbidden(&app, &key, url, class, &[hidden]).await;
    }

    let rx = Receiver::start().await;
    for url in [
        "https://public.merchant.test/hook".to_owned(),
        // Opened by webhooks.allow_private_networks, by name and as a literal.
        "https://listed.merchant.test/hook".to_owned(),
        "https://10.20.99.1/hook".to_owned(),
        // Sandbox mode keeps loopback open for local receivers.
        rx.url(),
        format!("http://[::ffff:127.0.0.1]:{}/hook", rx.port),
        // Not resolvable now: accepted, and checked again at every delivery.
        "https://not-yet-in-dns.merchant.test/hook".to_owned(),
    ] {
        let r = app
            .post(
                "/v1/webhook-endpoints",
                &key,
                &json!({"url": url, "events": ["token.suspended"]}),
            )
            .await;
        assert_eq!(r.status(), 201, "{url}");
    }
}

/// DNS rebinding: a name that was public at registration resolves to cloud metadata when the
/// event is delivered. The attempt fails with a clear code (nothing is sent, the worker goes
/// on); once the name answers an allowed address again, a retry delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_is_refused_at_delivery() {
    let dns = Arc::new(StaticResolver::new());
    const NAME: &str = "hooks.merchant.test";
    dns.set(NAME, &ips(&["93.184.215.14"]));
    let app = fast(TestApp::builder(Backend::Embedded))
        .resolver(dns.clone())
        // Enough attempts that the retries outlast the switch back below.
        .env("TOKENGATE__WEBHOOKS__MAX_ATTEMPTS", "100")
        .start()
        .await;
    let rx = Receiver::start().await;
    let (key, token) = merchant_with_token(&app, "Acme").await;
    let url = format!("http://{NAME}:{}/hook", rx.port);
    let (ep, secret) = endpoint(&app, &key, &url, &["token.suspended"]).await;

    dns.set(NAME, &ips(&["169.254.169.254"]));
    let r = post_empty(&app, &format!("/v1/tokens/{token}/suspend"), &key).await;
    assert_eq!(r.status(), 200);
    let event_id = eventually("the suspension event", || async {
        events(&app, &key)
            .await
            .first()
            .map(|e| e["id"].as_str().unwrap().to_owned())
    })
    .await;
    let e = wait_delivery(&app, &key, &event_id, &ep, |d| {
        d["status"] == "failed" && d["attempts"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    assert_eq!(
        delivery(&e, &ep)["lastError"],
        "forbidden_address_link_local",
        "{e}"
    );
    assert!(
        rx.hits().is_empty(),
        "a refused delivery reached a receiver"
    );

    // The worker carries on: the same name on the receiver's (sandbox-allowed) loopback address.
    dns.set(NAME, &ips(&["127.0.0.1"]));
    wait_delivery(&app, &key, &event_id, &ep, |d| d["status"] == "delivered").await;
    let hits = rx.hits_for(&event_id);
    assert_eq!(hits.len(), 1);
    assert_signed(&secret, &hits[0]);
    // The request went to the checked address under the URL's own host name.
    assert_eq!(hits[0].header("host"), format!("{NAME}:{}", rx.port));
}

/// Production mode (no D1, no simulator): loopback is no longer a free pass for plain http;
/// the allow-list opens internal networks, over https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_refuses_loopback_and_opens_only_listed_networks() {
    let app = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__MODE", "production")
        .env("TOKENGATE__VAULT__ACTIVE_KEY_ID", "k1")
        .env(
            "TOKENGATE__VAULT__KEYS__K1",
            "c3NyZi10ZXN0LWRhdGEta2V5LTAxMjM0NTY3ODlhYmM=",
        )
        .env(
            "TOKENGATE__VAULT__FINGERPRINT_KEY",
            "c3NyZi10ZXN0LWZpbmdlcnByaW50LWtleS0wMTIzNCE=",
        )
        .env("TOKENGATE__D1__ENABLED", "false")
        .env("TOKENGATE__NOTIFY__REQUIRE_AUTH", "false")
        .env(
            "TOKENGATE__WEBHOOKS__ALLOW_PRIVATE_NETWORKS",
            r#"["10.20.0.0/16"]"#,
        )
        .start()
        .await;
    let (_, key) = app.create_merchant("Acme").await;
    for (url, class, hidden) in [
        ("http://127.0.0.1:9000/hook", "loopback", "127.0.0.1"),
        ("http://localhost:9000/hook", "loopback", "localhost"),
        ("http://[::1]:9000/hook", "loopback", "::1"),
        ("https://[::ffff:127.0.0.1]/hook", "loopback", "ffff"),
        ("https://10.30.0.1/hook", "private", "10.30"),
    ] {
        expect_forbidden(&app, &key, url, class, &[hidden]).await;
    }
    let r = app
        .post(
            "/v1/webhook-endpoints",
            &key,
            &json!({"url": "https://10.20.0.8:8443/hook", "events": ["token.suspended"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    // Listed, but plain http is still only for loopback hosts outside sandbox mode.
    let r = app
        .post(
            "/v1/webhook-endpoints",
            &key,
            &json!({"url": "http://10.20.0.8/hook", "events": ["token.suspended"]}),
        )
        .await;
    expect_problem(r, 422, "insecure_webhook_url").await;
}

// --- two gateways, one Redis -------------------------------------------------------------------

/// Two gateways (fast delivery settings): A with its own Redis, B sharing it (and so its
/// outbox, consumer group and endpoints).
async fn two_instances() -> (TestApp, TestApp) {
    let a = fast(TestApp::builder(Backend::Redis)).start().await;
    let url = a.redis.as_ref().unwrap().url();
    let b = fast(TestApp::builder(Backend::Embedded))
        .env("TOKENGATE__STORAGE__REDIS_URL", &url)
        .start()
        .await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_deliver_each_event_once() {
    let (a, b) = two_instances().await;
    let rx = Receiver::start().await;
    // Slow answers keep deliveries in flight, so both workers find work.
    rx.state.delay_ms.store(150, Ordering::SeqCst);
    let (_, key) = a.create_merchant("Acme").await;
    let (_, secret) = endpoint(&b, &key, &rx.url(), &["token.suspended", "token.resumed"]).await;
    let pans = [
        "4111111111111111",
        "5555555555554444",
        "4012888888881881",
        "4000056655665556",
    ];
    let mut tokens = Vec::new();
    for pan in pans {
        let r = a.tokenize(&key, pan).await;
        assert_eq!(r.status(), 201);
        let t: Value = r.json().await.unwrap();
        tokens.push(t["id"].as_str().unwrap().to_owned());
    }
    // Lifecycle calls go through A (whose simulator knows the tokens); both deliver.
    let mut tasks = Vec::new();
    for t in tokens {
        let client = a.client.clone();
        let base = a.base.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                for verb in ["suspend", "resume"] {
                    let r = client
                        .post(format!("{base}/v1/tokens/{t}/{verb}"))
                        .bearer_auth(&key)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let expected = 4 * 3 * 2;
    let all = eventually("every event delivered", || async {
        let all = events(&a, &key).await;
        (all.len() == expected && all.iter().all(|e| e["status"] == "delivered")).then_some(all)
    })
    .await;
    // Let any duplicate that is going to happen happen.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = rx.hits();
    assert_eq!(hits.len(), expected, "each event delivered exactly once");
    for e in &all {
        let id = e["id"].as_str().unwrap();
        let mine = rx.hits_for(id);
        assert_eq!(mine.len(), 1, "{id}");
        assert_signed(&secret, &mine[0]);
    }
    // Both instances did part of the work (the delivery log names the consumer).
    let logs = captured_logs();
    let mut consumers = std::collections::BTreeSet::new();
    for line in logs.lines().filter(|l| l.contains("webhook delivered")) {
        if all.iter().any(|e| line.contains(e["id"].as_str().unwrap()))
            && let Some(i) = line.find("consumer=gw-")
        {
            consumers.insert(line[i..].split_whitespace().next().unwrap().to_owned());
        }
    }
    assert_eq!(consumers.len(), 2, "deliveries by {consumers:?}");
    // Both instances joined the one consumer group.
    let server = a.redis.as_ref().unwrap();
    let consumers = redis_cli(
        server,
        &["XINFO", "CONSUMERS", "tg:{wh}:outbox", "webhook-workers"],
    );
    assert_eq!(consumers.matches("gw-").count(), 2, "{consumers}");
    drop(b);
}

/// A new card of a merchant without endpoints is activated without reading them
/// (`TokenStore::update_token_if_no_endpoints` checks in the write): an endpoint registered on
/// another instance is honoured by the very next activation, and once it is deleted there the
/// activations store no event again (both when this instance last saw an endpoint and after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_events_follow_endpoints_changed_on_another_instance() {
    let (a, b) = two_instances().await;
    let rx = Receiver::start().await;
    let (_, key) = a.create_merchant("Acme").await;
    let activate = |pan: &'static str| {
        let (a, key) = (&a, &key);
        async move {
            let r = a.tokenize(key, pan).await;
            assert_eq!(r.status(), 201);
            let t: Value = r.json().await.unwrap();
            assert_eq!(t["status"], "ACTIVE", "{t}");
            t["id"].as_str().unwrap().to_owned()
        }
    };
    let activated = || async {
        events(&a, &key)
            .await
            .iter()
            .filter(|e| e["type"] == "token.activated")
            .map(|e| e["tokenId"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };

    activate("4111111111111111").await;
    assert!(activated().await.is_empty());

    let (ep, _) = endpoint(&b, &key, &rx.url(), &["token.activated"]).await;
    let second = activate("5555555555554444").await;
    assert_eq!(activated().await, vec![second.clone()]);

    let r = b
        .client
        .delete(b.url(&format!("/v1/webhook-endpoints/{ep}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    activate("4012888888881881").await;
    activate("4000056655665556").await;
    assert_eq!(activated().await, vec![second]);
    drop(b);
}

// --- the outbox store contract -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_contract_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    outbox_contract(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_contract_redis() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&redis_config(server.url(), Vec::new()))
        .await
        .unwrap();
    outbox_contract(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_contract_redis_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let store = RedisStore::connect(&redis_config(String::new(), cluster.addrs()))
        .await
        .unwrap();
    assert!(store.is_cluster());
    outbox_contract(&store).await;
}

fn sample_endpoint(m: &MerchantId) -> WebhookEndpoint {
    WebhookEndpoint {
        id: EndpointId::generate(),
        merchant_id: m.clone(),
        url: "https://example.com/hook".into(),
        events: vec![EventType::Suspended],
        secret: SealedSecret {
            key_id: "k1".into(),
            blob: vec![1; 60],
        },
        created_at: time::OffsetDateTime::now_utc(),
        previous_secret: None,
        secret_rotated_at: None,
    }
}

fn sample_event(m: &MerchantId, at: time::OffsetDateTime) -> WebhookEvent {
    WebhookEvent {
        id: EventId::generate(at),
        merchant_id: m.clone(),
        event_type: EventType::Suspended,
        token_id: Some(tokengate::domain::token::TokenId::generate()),
        operation_id: None,
        created_at: at,
        payload: r#"{"id":"x"}"#.into(),
    }
}

async fn outbox_contract(store: &dyn OutboxStore) {
    let m = MerchantId::generate();
    let lease = Duration::from_millis(600);
    let retention = Duration::from_secs(3600);

    // Endpoints: the limit holds, reads are per merchant.
    let e1 = sample_endpoint(&m);
    let e2 = sample_endpoint(&m);
    assert!(store.insert_endpoint(&e1, 2).await.unwrap());
    assert!(store.insert_endpoint(&e2, 2).await.unwrap());
    assert!(
        !store
            .insert_endpoint(&sample_endpoint(&m), 2)
            .await
            .unwrap()
    );
    assert_eq!(store.list_endpoints(&m).await.unwrap().len(), 2);
    assert_eq!(
        store.get_endpoint(&m, &e1.id).await.unwrap(),
        Some(e1.clone())
    );
    let stranger = MerchantId::generate();
    assert_eq!(store.get_endpoint(&stranger, &e1.id).await.unwrap(), None);
    assert!(!store.delete_endpoint(&stranger, &e1.id).await.unwrap());
    assert!(store.list_endpoints(&stranger).await.unwrap().is_empty());

    // An event with two deliveries: two jobs, handed out once.
    let now = time::OffsetDateTime::now_utc();
    let ev = sample_event(&m, now);
    store
        .enqueue_event(&ev, &[e1.id.clone(), e2.id.clone()], retention)
        .await
        .unwrap();
    let rec = store.get_event(&m, &ev.id).await.unwrap().unwrap();
    assert_eq!(rec.event, ev);
    assert_eq!(rec.deliveries.len(), 2);
    assert!(
        rec.deliveries
            .iter()
            .all(|d| d.status == DeliveryStatus::Pending)
    );
    assert_eq!(store.get_event(&stranger, &ev.id).await.unwrap(), None);

    let jobs = store.claim_jobs("c1", 10, lease).await.unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(
        jobs.iter()
            .all(|j| j.event == ev.id && j.merchant == m && j.attempts == 0)
    );
    assert!(
        store.claim_jobs("c2", 10, lease).await.unwrap().is_empty(),
        "claimed jobs are held"
    );

    // Done and retry; finishing twice finds nothing.
    let (j1, j2) = (&jobs[0], &jobs[1]);
    assert!(store.finish_job(j1, JobNext::Done).await.unwrap());
    assert!(!store.finish_job(j1, JobNext::Done).await.unwrap());
    let due = tokengate::domain::webhooks::unix_ms(time::OffsetDateTime::now_utc()) + 300;
    assert!(
        store
            .finish_job(j2, JobNext::Retry { at_ms: due })
            .await
            .unwrap()
    );
    assert!(
        store.claim_jobs("c1", 10, lease).await.unwrap().is_empty(),
        "retry not due yet"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let retried = store.claim_jobs("c1", 10, lease).await.unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].endpoint, j2.endpoint);
    assert_eq!(retried[0].attempts, 1);

    // A claim that is never finished is handed out again after the lease, once.
    assert!(store.claim_jobs("c2", 10, lease).await.unwrap().is_empty());
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    let taken = store.claim_jobs("c2", 10, lease).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].attempts, 1);
    // The old and the new holder both finish: exactly one of them schedules the retry.
    let later = due + 60_000;
    let old = store
        .finish_job(&retried[0], JobNext::Retry { at_ms: later })
        .await
        .unwrap();
    let new = store
        .finish_job(&taken[0], JobNext::Retry { at_ms: later })
        .await
        .unwrap();
    assert!(old ^ new, "old {old}, new {new}");

    // Dead letters are not handed out; a redelivery queues a fresh job.
    let ev2 = sample_event(&m, time::OffsetDateTime::now_utc());
    store
        .enqueue_event(&ev2, std::slice::from_ref(&e1.id), retention)
        .await
        .unwrap();
    let jobs = store.claim_jobs("c1", 10, lease).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert!(
        store
            .finish_job(
                &jobs[0],
                JobNext::Dead {
                    reason: "http_500".into()
                }
            )
            .await
            .unwrap()
    );
    let mut dead = DeliveryState::pending(e1.id.clone());
    dead.status = DeliveryStatus::Dead;
    dead.attempts = 1;
    dead.last_error = Some("http_500".into());
    store.put_delivery(&m, &ev2.id, &dead).await.unwrap();
    let rec = store.get_event(&m, &ev2.id).await.unwrap().unwrap();
    assert_eq!(rec.deliveries, vec![dead]);
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert!(store.claim_jobs("c1", 10, lease).await.unwrap().is_empty());
    store
        .redeliver(&m, &ev2.id, std::slice::from_ref(&e1.id))
        .await
        .unwrap();
    let rec = store.get_event(&m, &ev2.id).await.unwrap().unwrap();
    assert_eq!(rec.deliveries[0].status, DeliveryStatus::Pending);
    let jobs = store.claim_jobs("c1", 10, lease).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].event.clone(), jobs[0].attempts),
        (ev2.id.clone(), 0)
    );
    assert!(store.finish_job(&jobs[0], JobNext::Done).await.unwrap());

    // Listing: newest first, paged by cursor, per merchant.
    let page = store.list_events(&m, None, 10).await.unwrap();
    let ids: Vec<&EventId> = page.iter().map(|r| &r.event.id).collect();
    assert_eq!(ids, [&ev2.id, &ev.id]);
    let older = store.list_events(&m, Some(&ev2.id), 10).await.unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].event.id, ev.id);
    assert!(
        store
            .list_events(&stranger, None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Retention: an event older than it is dropped by the next enqueue.
    let old_ev = sample_event(&m, now - Duration::from_secs(7200));
    store.enqueue_event(&old_ev, &[], retention).await.unwrap();
    let ev3 = sample_event(&m, time::OffsetDateTime::now_utc());
    store.enqueue_event(&ev3, &[], retention).await.unwrap();
    assert_eq!(store.get_event(&m, &old_ev.id).await.unwrap(), None);
    let page = store.list_events(&m, None, 10).await.unwrap();
    assert_eq!(
        page.len(),
        3,
        "{:?}",
        page.iter().map(|r| &r.event.id).collect::<Vec<_>>()
    );

    // Deleting an endpoint.
    assert!(store.delete_endpoint(&m, &e1.id).await.unwrap());
    assert!(!store.delete_endpoint(&m, &e1.id).await.unwrap());
    assert_eq!(store.get_endpoint(&m, &e1.id).await.unwrap(), None);
}

/// Issue 4's acceptance: a SUSPEND triggered at D1 (the simulator) shows in
/// `GET /v1/tokens/{id}` within a second and reaches the merchant as a signed `token.suspended`;
/// a RENEW reaches it as `token.updated` with the new expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d1_suspend_reaches_the_merchant_as_a_signed_webhook() {
    let app = sandbox(Backend::Redis).await;
    let rx = Receiver::start().await;
    let (key, token) = merchant_with_token(&app, "Acme").await;
    let (_, secret) = endpoint(&app, &key, &rx.url(), &["token.suspended", "token.updated"]).await;
    let t: Value = app
        .get(&format!("/v1/tokens/{token}"), &key)
        .await
        .json()
        .await
        .unwrap();
    let d1_id = t["networkToken"]["id"].as_str().unwrap().to_owned();

    let started = Instant::now();
    assert!(
        app.sim_event(&d1_id, json!({"type": "SUSPEND"}))
            .await
            .is_success()
    );
    eventually("SUSPENDED through the API", || async {
        let v: Value = app
            .get(&format!("/v1/tokens/{token}"), &key)
            .await
            .json()
            .await
            .unwrap();
        (v["status"] == "SUSPENDED").then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    let hit = eventually("the suspended webhook", || async {
        rx.hits()
            .into_iter()
            .find(|h| h.header("tokengate-event-type") == "token.suspended")
    })
    .await;
    assert_signed(&secret, &hit);
    let body: Value = serde_json::from_str(&hit.body).unwrap();
    assert_eq!(body["data"]["token"]["id"], token.as_str());
    assert_eq!(body["data"]["token"]["status"], "SUSPENDED");

    assert!(
        app.sim_event(&d1_id, json!({"type": "RENEW", "expiry": "0931"}))
            .await
            .is_success()
    );
    let hit = eventually("the updated webhook", || async {
        rx.hits()
            .into_iter()
            .find(|h| h.header("tokengate-event-type") == "token.updated")
    })
    .await;
    assert_signed(&secret, &hit);
    let body: Value = serde_json::from_str(&hit.body).unwrap();
    assert_eq!(body["data"]["token"]["id"], token.as_str());
    assert_eq!(body["data"]["token"]["networkToken"]["expiryMonth"], 9);
    assert_eq!(body["data"]["token"]["networkToken"]["expiryYear"], 2031);
}
