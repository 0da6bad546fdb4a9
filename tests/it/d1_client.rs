//! Integration tests: the crate's D1 client against a small fake D1 written here (axum over
//! real TLS with mutual TLS on a real socket), independent of the simulator in `src/sim`.
//!
//! The fake verifies what the client sends the way D1 would (ES256 assertion, bearer token,
//! correlation id, card data JWE) and can be scripted to answer errors, `Retry-After`, delays
//! or unknown fields, so each resilience rule is checked against real HTTP.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokengate::d1::{D1Client, D1Config};
use tokengate::domain::error::ProviderError;
use tokengate::domain::provider::{Amount, LifecycleAction, NetworkTokenProvider, TransactionType};
use tokengate::domain::token::{TokenStatus, Usage};
use tokengate_cards::{Expiry, Pan};
use tokengate_d1_protocol::devkeys::DevMaterial;
use tokengate_d1_protocol::jose;
use tokengate_d1_protocol::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::support;

const MGID: &str = "mgw-d1-client-test";
/// A valid test PAN not used elsewhere in the suite, so the log check below is specific.
const PAN: &str = "4000056655665556";
/// What the fake puts in cryptogram responses; must never reach the logs.
const TOKEN_NUMBER: &str = "4895379912345670";
const CRYPTOGRAM: &str = "AAECAwQFBgcICQoLDA0ODxAREhM=";

/// One canned answer for the next API request (after authentication).
#[derive(Clone)]
struct Scripted {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
    delay: Duration,
}

impl Scripted {
    fn status(status: u16, code: &str) -> Scripted {
        Scripted {
            status,
            retry_after: None,
            body: json!({"errorCode": code, "errorMessage": "scripted", "retryable": false}),
            delay: Duration::ZERO,
        }
    }
    fn retry_after(mut self, s: u64) -> Scripted {
        self.retry_after = Some(s);
        self
    }
    /// Waits `d`, then answers normally.
    fn delay(d: Duration) -> Scripted {
        Scripted {
            status: 0,
            retry_after: None,
            body: Value::Null,
            delay: d,
        }
    }
}

/// A request as the fake saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    body: Value,
    correlation_id: String,
    version: Version,
    /// Decrypted card data of a create-token request: (pan, exp, kid).
    card: Option<(String, String, String)>,
}

struct FakeState {
    m: DevMaterial,
    base: String,
    oauth_requests: AtomicUsize,
    oauth_delay: Mutex<Duration>,
    /// Status the token endpoint answers with while set.
    oauth_fail: Mutex<Option<u16>>,
    expires_in: AtomicU64,
    valid_tokens: Mutex<HashSet<String>>,
    api_requests: AtomicUsize,
    tls_connections: AtomicUsize,
    script: Mutex<VecDeque<Scripted>>,
    /// Answer for every API request while set (after the script is used up).
    fail_all: Mutex<Option<Scripted>>,
    seen: Mutex<Vec<Seen>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct FakeD1 {
    state: Arc<FakeState>,
    addr: SocketAddr,
}

fn error(status: u16, code: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        axum::Json(json!({"errorCode": code, "errorMessage": "fake", "retryable": false})),
    )
        .into_response()
}

fn valid_correlation_id(h: &HeaderMap) -> Option<String> {
    let v = h.get("x-correlation-id")?.to_str().ok()?;
    let ok = (1..=64).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| v.to_owned())
}

async fn oauth(State(s): State<Arc<FakeState>>, headers: HeaderMap, body: String) -> Response {
    s.oauth_requests.fetch_add(1, Ordering::SeqCst);
    if valid_correlation_id(&headers).is_none() {
        return error(400, "MISSING_FIELD");
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return error(400, "INVALID_FIELD");
    };
    let obj_keys: Vec<&String> = req
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    if req["grant_type"] != "urn:ietf:params:oauth:grant-type:jwt-bearer" || obj_keys.len() != 2 {
        return error(400, "INVALID_FIELD");
    }
    let Some(assertion) = req["assertion"].as_str() else {
        return error(400, "MISSING_FIELD");
    };
    let Ok(public) = jose::public_key_from_pem(&s.m.gateway_es256_pub_pem) else {
        return error(500, "INTERNAL_ERROR");
    };
    let kid = s.m.es256_kid.clone();
    let keys = move |k: &str| (k == kid).then_some(public);
    let claims = match jose::verify_assertion(assertion, &keys, Duration::from_secs(900)) {
        Ok(c) => c,
        Err(_) => return error(401, "AUTHORIZER_UNAUTHORIZED"),
    };
    if claims.iss != MGID || claims.sub != MGID || claims.aud != s.base {
        return error(401, "AUTHORIZER_UNAUTHORIZED");
    }
    let delay = *lock(&s.oauth_delay);
    tokio::time::sleep(delay).await;
    if let Some(status) = *lock(&s.oauth_fail) {
        return error(status, "INTERNAL_ERROR");
    }
    let token = format!("at-{}", uuid::Uuid::new_v4().simple());
    lock(&s.valid_tokens).insert(token.clone());
    axum::Json(json!({
        "access_token": token,
        "expires_in": s.expires_in.load(Ordering::SeqCst),
        "token_type": "Bearer",
    }))
    .into_response()
}

fn token_json(token_id: &str, request_id: Option<&str>, status: &str) -> Value {
    json!({
        "tokenId": token_id,
        "requestId": request_id,
        "status": status,
        "cardBin": "400005",
        "cardLastDigits": "5556",
        "cardExpiryDate": "1230",
        "tokenLastDigits": "4321",
        "tokenExpiryDate": "1130",
        "par": "V0010013826ABCDEF",
    })
}

async fn api(State(s): State<Arc<FakeState>>, req: Request) -> Response {
    s.api_requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return error(400, "INVALID_FIELD");
    };
    let Some(correlation_id) = valid_correlation_id(&parts.headers) else {
        return error(400, "MISSING_FIELD");
    };
    let bearer = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    if !bearer.is_some_and(|t| lock(&s.valid_tokens).contains(&t)) {
        return error(401, "AUTHORIZER_UNAUTHORIZED");
    }
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let card = match json_body["encryptedData"].as_str() {
        Some(jwe) => {
            let Ok(key) = jose::secret_key_from_pem(&s.m.d1_jwe_key_pem) else {
                return error(500, "INTERNAL_ERROR");
            };
            let kid = s.m.d1_jwe_kid.clone();
            let Ok((kid, plain)) =
                jose::jwe_decrypt(jwe, &|k: &str| (k == kid).then(|| key.clone()))
            else {
                return error(400, "INVALID_FIELD");
            };
            let Ok(v) = serde_json::from_slice::<Value>(&plain) else {
                return error(400, "INVALID_FIELD");
            };
            Some((
                v["pan"].as_str().unwrap_or_default().to_owned(),
                v["exp"].as_str().unwrap_or_default().to_owned(),
                kid,
            ))
        }
        None => None,
    };
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    lock(&s.seen).push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        body: json_body.clone(),
        correlation_id,
        version: parts.version,
        card,
    });

    let scripted = lock(&s.script)
        .pop_front()
        .or_else(|| lock(&s.fail_all).clone());
    if let Some(sc) = scripted {
        tokio::time::sleep(sc.delay).await;
        if sc.status != 0 {
            let status =
                StatusCode::from_u16(sc.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = (status, axum::Json(sc.body)).into_response();
            if let Some(ra) = sc.retry_after
                && let Ok(v) = ra.to_string().parse()
            {
                resp.headers_mut().insert("retry-after", v);
            }
            return resp;
        }
    }

    let prefix = format!("/authz/v1/merchant-gateways/{MGID}/merchants");
    let Some(rest) = path.strip_prefix(&prefix) else {
        return error(404, "NOT_FOUND");
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let method = parts.method.as_str();
    let ok = |status: u16, v: Value| {
        (
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            axum::Json(v),
        )
            .into_response()
    };
    match (method, segs.as_slice()) {
        ("POST", []) => ok(201, json!({"merchantId": "mer-fake-1"})),
        ("POST", [_, "tokens"]) => ok(
            201,
            token_json("d1tok-1", json_body["requestId"].as_str(), "ACTIVE"),
        ),
        ("GET", [_, "tokens"]) => {
            if query.as_deref() == Some("requestId=tok_known") {
                ok(200, token_json("d1tok-1", Some("tok_known"), "ACTIVE"))
            } else {
                error(404, "NOT_FOUND")
            }
        }
        ("GET", [_, "tokens", "noisy"]) => {
            let mut v = token_json("noisy", None, "FROZEN_BY_NETWORK");
            v["someFutureField"] = json!({"nested": [1, 2, 3]});
            v["tokenExpiryDate"] = json!("not-a-date");
            v["riskScore"] = json!(0.3);
            ok(200, v)
        }
        ("GET", [_, "tokens", id]) => ok(200, token_json(id, None, "ACTIVE")),
        ("DELETE", [_, "tokens", id]) => ok(200, token_json(id, None, "DELETED")),
        ("POST", [_, "tokens", id, "suspend"]) => ok(200, token_json(id, None, "SUSPENDED")),
        ("POST", [_, "tokens", id, "resume"]) => ok(200, token_json(id, None, "ACTIVE")),
        ("POST", [_, "tokens", _, "transactions"]) => {
            let Ok(public) = jose::public_key_from_pem(&s.m.gateway_jwe_pub_pem) else {
                return error(500, "INTERNAL_ERROR");
            };
            let payload = json!({
                "tokenNumber": TOKEN_NUMBER,
                "tokenExpiryDate": "1130",
                "cryptogram": CRYPTOGRAM,
            });
            let Ok(jwe) = jose::jwe_encrypt(
                payload.to_string().as_bytes(),
                &public,
                &s.m.gateway_jwe_kid,
            ) else {
                return error(500, "INTERNAL_ERROR");
            };
            ok(
                201,
                json!({"encryptedData": jwe, "eci": "07",
                       "cryptogramExpiryDate": "2030-01-01T00:00:00Z", "extra": true}),
            )
        }
        _ => error(404, "NOT_FOUND"),
    }
}

impl FakeD1 {
    async fn start(m: DevMaterial) -> Result<FakeD1> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(FakeState {
            m: m.clone(),
            base: format!("https://127.0.0.1:{}/authz/v1", addr.port()),
            oauth_requests: AtomicUsize::new(0),
            oauth_delay: Mutex::new(Duration::ZERO),
            oauth_fail: Mutex::new(None),
            expires_in: AtomicU64::new(900),
            valid_tokens: Mutex::new(HashSet::new()),
            api_requests: AtomicUsize::new(0),
            tls_connections: AtomicUsize::new(0),
            script: Mutex::new(VecDeque::new()),
            fail_all: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/authz/v1/oauth2/token", post(oauth))
            .fallback(api)
            .with_state(state.clone());
        let tls_cfg = tls::server_config(
            &m.d1_server_cert_pem,
            &m.d1_server_key_pem,
            Some(&m.ca_cert_pem),
            true,
        )?;
        let acceptor = TlsAcceptor::from(Arc::new(tls_cfg));
        let counters = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let app = app.clone();
                let counters = counters.clone();
                tokio::spawn(async move {
                    // A failed handshake (e.g. no or a foreign client certificate) ends here,
                    // before any HTTP is read.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counters.tls_connections.fetch_add(1, Ordering::SeqCst);
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        Ok(FakeD1 { state, addr })
    }

    fn base_url(&self) -> String {
        self.state.base.clone()
    }

    /// Client settings for tests: short budgets so failures show quickly.
    fn config(&self) -> D1Config {
        let mut cfg = D1Config::sandbox(&self.base_url(), &self.state.m);
        cfg.call_timeout = Duration::from_secs(5);
        cfg.max_retries = 2;
        cfg.max_concurrency = 256;
        cfg.breaker_failure_threshold = 50;
        cfg.breaker_open_for = Duration::from_secs(5);
        cfg
    }

    fn client(&self) -> Result<D1Client> {
        Ok(D1Client::new(self.config())?)
    }

    fn oauth_requests(&self) -> usize {
        self.state.oauth_requests.load(Ordering::SeqCst)
    }

    fn api_requests(&self) -> usize {
        self.state.api_requests.load(Ordering::SeqCst)
    }

    fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        lock(&self.state.script).extend(answers);
    }

    fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }
}

async fn start() -> Result<FakeD1> {
    support::init_logs();
    FakeD1::start(DevMaterial::generate(MGID)?).await
}

fn pan() -> Result<Pan> {
    PAN.parse().context("test PAN")
}

fn expiry() -> Result<Expiry> {
    Expiry::trusted(12, 2030).context("test expiry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_is_fetched_once_for_100_concurrent_calls() -> Result<()> {
    let fake = start().await?;
    // Slow token endpoint: every caller arrives while the one token request is in flight.
    *lock(&fake.state.oauth_delay) = Duration::from_millis(200);
    let client = fake.client()?;
    let calls = (0..100).map(|i| {
        let c = client.clone();
        tokio::spawn(async move { c.get_token("mer-1", &format!("d1tok-{i}")).await })
    });
    for r in futures::future::join_all(calls).await {
        let t = r??;
        ensure!(t.status == TokenStatus::Active);
    }
    ensure!(
        fake.oauth_requests() == 1,
        "oauth requests: {}",
        fake.oauth_requests()
    );
    ensure!(fake.api_requests() == 100);
    // The cached token keeps serving later calls.
    client.get_token("mer-1", "d1tok-x").await?;
    ensure!(fake.oauth_requests() == 1);
    // Every call had its own correlation id.
    let ids: HashSet<String> = fake.seen().into_iter().map(|s| s.correlation_id).collect();
    ensure!(ids.len() == 101, "distinct correlation ids: {}", ids.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_token_endpoint_is_asked_once_per_wave_of_callers() -> Result<()> {
    let fake = start().await?;
    *lock(&fake.state.oauth_delay) = Duration::from_millis(200);
    *lock(&fake.state.oauth_fail) = Some(500);
    let mut cfg = fake.config();
    cfg.max_retries = 0;
    let client = D1Client::new(cfg)?;
    let calls = (0..20).map(|_| {
        let c = client.clone();
        tokio::spawn(async move { c.get_token("mer-1", "t").await })
    });
    for r in futures::future::join_all(calls).await {
        let err = r?;
        ensure!(
            matches!(&err, Err(ProviderError::BadResponse(m)) if m.contains("oauth")),
            "{err:?}"
        );
    }
    ensure!(
        fake.oauth_requests() == 1,
        "oauth: {}",
        fake.oauth_requests()
    );
    ensure!(fake.api_requests() == 0);
    // Later callers try again, and succeed once the endpoint recovers.
    *lock(&fake.state.oauth_fail) = None;
    client.get_token("mer-1", "t").await?;
    ensure!(fake.oauth_requests() == 2);
    Ok(())
}

#[tokio::test]
async fn connections_are_pooled_and_speak_h2() -> Result<()> {
    let fake = start().await?;
    let client = fake.client()?;
    for i in 0..5 {
        client.get_token("mer-1", &format!("t{i}")).await?;
    }
    ensure!(
        fake.state.tls_connections.load(Ordering::SeqCst) == 1,
        "TLS connections: {}",
        fake.state.tls_connections.load(Ordering::SeqCst)
    );
    ensure!(fake.seen().iter().all(|s| s.version == Version::HTTP_2));
    Ok(())
}

#[tokio::test]
async fn token_is_refreshed_before_expiry() -> Result<()> {
    let fake = start().await?;
    // 2 s tokens: refreshed after 1 s (half the lifetime, since 60 s would be longer).
    fake.state.expires_in.store(2, Ordering::SeqCst);
    let client = fake.client()?;
    client.get_token("m", "t").await?;
    client.get_token("m", "t").await?;
    ensure!(fake.oauth_requests() == 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.get_token("m", "t").await?;
    // The refresh runs in the background (next test): wait for it, bounded.
    wait_for_oauth_requests(&fake, 2).await?;
    ensure!(
        fake.oauth_requests() == 2,
        "oauth: {}",
        fake.oauth_requests()
    );
    // The new token serves later calls without another request.
    client.get_token("m", "t").await?;
    ensure!(fake.oauth_requests() == 2);
    Ok(())
}

async fn wait_for_oauth_requests(fake: &FakeD1, n: usize) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(5);
    while fake.oauth_requests() < n {
        if Instant::now() > until {
            bail!("oauth requests: {} (waited for {n})", fake.oauth_requests());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_token_due_for_refresh_is_refreshed_off_the_request_path() -> Result<()> {
    let fake = start().await?;
    fake.state.expires_in.store(2, Ordering::SeqCst);
    // A slow token endpoint: a call that waited for it would take 600 ms more.
    *lock(&fake.state.oauth_delay) = Duration::from_millis(600);
    let client = fake.client()?;
    // No token yet: the first call has to wait for one.
    client.get_token("m", "t").await?;
    ensure!(fake.oauth_requests() == 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Due for refresh, still valid: these calls use it and one background refresh starts.
    let started = Instant::now();
    for i in 0..5 {
        client.get_token("m", &format!("t{i}")).await?;
    }
    ensure!(
        started.elapsed() < Duration::from_millis(500),
        "calls waited for the token endpoint: {:?}",
        started.elapsed()
    );
    wait_for_oauth_requests(&fake, 2).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    ensure!(
        fake.oauth_requests() == 2,
        "one background refresh, not one per call: {}",
        fake.oauth_requests()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_spread_over_connection_lanes() -> Result<()> {
    let fake = start().await?;
    let mut cfg = fake.config();
    cfg.connections = 3;
    let client = D1Client::new(cfg)?;
    client.get_token("mer-1", "warm").await?;
    ensure!(fake.state.tls_connections.load(Ordering::SeqCst) == 1);
    fake.script((0..12).map(|_| Scripted::delay(Duration::from_millis(300))));
    let calls = (0..12).map(|i| {
        let c = client.clone();
        tokio::spawn(async move { c.get_token("mer-1", &format!("slow-{i}")).await })
    });
    for r in futures::future::join_all(calls).await {
        r??;
    }
    let tls = fake.state.tls_connections.load(Ordering::SeqCst);
    // Slow calls in flight together went out on more than one connection; every one was h2.
    ensure!(tls > 1, "TLS connections: {tls}");
    ensure!(fake.seen().iter().all(|s| s.version == Version::HTTP_2));
    // Connections are kept: a quiet client opens no more.
    for i in 0..5 {
        client.get_token("mer-1", &format!("after-{i}")).await?;
    }
    ensure!(fake.state.tls_connections.load(Ordering::SeqCst) == tls);
    Ok(())
}

#[tokio::test]
async fn a_401_refreshes_the_token_and_replays_once() -> Result<()> {
    let fake = start().await?;
    let client = fake.client()?;
    client.get_token("mer-1", "t1").await?;
    ensure!(fake.oauth_requests() == 1);
    // D1 forgets every token (e.g. revoked): the next call gets a 401, refreshes, succeeds.
    lock(&fake.state.valid_tokens).clear();
    let t = client.get_token("mer-1", "t2").await?;
    ensure!(t.d1_token_id == "t2");
    ensure!(fake.oauth_requests() == 2);
    ensure!(fake.api_requests() == 3, "api: {}", fake.api_requests());

    // A 401 that persists with the fresh token is reported, not looped on.
    fake.script([
        Scripted::status(401, "AUTHORIZER_UNAUTHORIZED"),
        Scripted::status(401, "AUTHORIZER_UNAUTHORIZED"),
    ]);
    let before = fake.api_requests();
    let err = client.get_token("mer-1", "t3").await;
    ensure!(
        matches!(&err, Err(ProviderError::Rejected { status: 401, code }) if code == "AUTHORIZER_UNAUTHORIZED"),
        "{err:?}"
    );
    ensure!(fake.api_requests() - before == 2);
    ensure!(fake.oauth_requests() == 3);
    Ok(())
}

#[tokio::test]
async fn a_503_with_retry_after_is_retried_with_the_same_request_id() -> Result<()> {
    let fake = start().await?;
    let client = fake.client()?;
    fake.script([Scripted::status(503, "SERVICE_UNAVAILABLE").retry_after(1)]);
    let started = Instant::now();
    let t = client
        .create_token(
            "mer-1",
            &pan()?,
            &expiry()?,
            Usage::CardOnFile,
            "tok_retry_1",
        )
        .await?;
    let elapsed = started.elapsed();
    ensure!(t.d1_token_id == "d1tok-1" && t.status == TokenStatus::Active);
    ensure!(
        elapsed >= Duration::from_secs(1),
        "Retry-After not honoured: {elapsed:?}"
    );
    let seen = fake.seen();
    ensure!(seen.len() == 2, "requests: {}", seen.len());
    ensure!(seen[0].body["requestId"] == "tok_retry_1");
    // Byte-identical replay: same requestId, same JWE, same correlation id.
    ensure!(seen[0].body == seen[1].body);
    ensure!(seen[0].correlation_id == seen[1].correlation_id);
    Ok(())
}

#[tokio::test]
async fn a_429_retry_after_longer_than_the_budget_fails_fast() -> Result<()> {
    let fake = start().await?;
    let client = fake.client()?;
    fake.script([Scripted::status(429, "TOO_MANY_REQUESTS").retry_after(30)]);
    let started = Instant::now();
    let err = client.get_token("mer-1", "t").await;
    ensure!(
        matches!(err, Err(ProviderError::Unavailable { retry_after: Some(d) }) if d == Duration::from_secs(30)),
        "{err:?}"
    );
    ensure!(started.elapsed() < Duration::from_secs(2));
    ensure!(fake.api_requests() == 1);
    Ok(())
}

#[tokio::test]
async fn retries_stop_after_max_retries_with_backoff() -> Result<()> {
    let fake = start().await?;
    let client = fake.client()?;
    // 503 without Retry-After: backoff, 1 + max_retries (2) attempts, then Unavailable.
    *lock(&fake.state.fail_all) = Some(Scripted::status(503, "SERVICE_UNAVAILABLE"));
    let err = client.get_token("mer-1", "t").await;
    ensure!(
        matches!(err, Err(ProviderError::Unavailable { retry_after: None })),
        "{err:?}"
    );
    ensure!(fake.api_requests() == 3, "api: {}", fake.api_requests());
    // 500 is retried for a GET ...
    *lock(&fake.state.fail_all) = Some(Scripted::status(500, "INTERNAL_ERROR"));
    let before = fake.api_requests();
    let err = client.get_token("mer-1", "t").await;
    ensure!(
        matches!(&err, Err(ProviderError::BadResponse(m)) if m.contains("500")),
        "{err:?}"
    );
    ensure!(fake.api_requests() - before == 3);
    // ... but not for a POST: it may have been processed.
    let before = fake.api_requests();
    let err = client
        .create_token("mer-1", &pan()?, &expiry()?, Usage::OneOff, "tok_500")
        .await;
    ensure!(matches!(err, Err(ProviderError::BadResponse(_))), "{err:?}");
    ensure!(fake.api_requests() - before == 1);
    Ok(())
}

#[tokio::test]
async fn a_400_is_not_retried() -> Result<()> {
    let fake = start().await?;
    let client = fake.client()?;
    fake.script([Scripted::status(400, "INVALID_FIELD")]);
    let err = client
        .create_token("mer-1", &pan()?, &expiry()?, Usage::Recurring, "tok_400")
        .await;
    ensure!(
        matches!(&err, Err(ProviderError::Rejected { status: 400, code }) if code == "INVALID_FIELD"),
        "{err:?}"
    );
    ensure!(fake.api_requests() == 1);
    // 409 and 404 likewise, mapped to their own errors.
    fake.script([Scripted::status(409, "INVALID_STATE")]);
    let err = client
        .lifecycle("mer-1", "t", LifecycleAction::Suspend)
        .await;
    ensure!(
        matches!(&err, Err(ProviderError::Rejected { status: 409, code }) if code == "INVALID_STATE"),
        "{err:?}"
    );
    let err = client.find_token_by_request("mer-1", "tok_unknown").await;
    ensure!(matches!(err, Err(ProviderError::NotFound)), "{err:?}");
    ensure!(fake.api_requests() == 3);
    Ok(())
}

#[tokio::test]
async fn breaker_opens_after_consecutive_failures_and_sheds_load() -> Result<()> {
    let fake = start().await?;
    let mut cfg = fake.config();
    cfg.max_retries = 0;
    cfg.breaker_failure_threshold = 3;
    cfg.breaker_open_for = Duration::from_millis(500);
    let client = D1Client::new(cfg)?;
    // Warm up the token so only API calls are counted below.
    client.get_token("mer-1", "warm").await?;
    *lock(&fake.state.fail_all) = Some(Scripted::status(500, "INTERNAL_ERROR"));
    let before = fake.api_requests();
    for _ in 0..3 {
        let err = client.get_token("mer-1", "t").await;
        ensure!(matches!(err, Err(ProviderError::BadResponse(_))), "{err:?}");
    }
    ensure!(client.breaker_open());
    let started = Instant::now();
    let err = client.get_token("mer-1", "t").await;
    ensure!(
        matches!(err, Err(ProviderError::Unavailable { retry_after: Some(d) }) if d <= Duration::from_millis(500)),
        "{err:?}"
    );
    ensure!(started.elapsed() < Duration::from_millis(100));
    ensure!(
        fake.api_requests() - before == 3,
        "the open breaker let a call through"
    );

    // D1 recovers; after open_for one probe goes through and closes the breaker.
    *lock(&fake.state.fail_all) = None;
    tokio::time::sleep(Duration::from_millis(550)).await;
    client.get_token("mer-1", "t").await?;
    ensure!(!client.breaker_open());
    client.get_token("mer-1", "t").await?;
    ensure!(fake.api_requests() - before == 5);
    Ok(())
}

#[tokio::test]
async fn client_errors_do_not_open_the_breaker() -> Result<()> {
    let fake = start().await?;
    let mut cfg = fake.config();
    cfg.breaker_failure_threshold = 2;
    let client = D1Client::new(cfg)?;
    for _ in 0..4 {
        let err = client.find_token_by_request("mer-1", "tok_nope").await;
        ensure!(matches!(err, Err(ProviderError::NotFound)), "{err:?}");
    }
    ensure!(!client.breaker_open());
    Ok(())
}

#[tokio::test]
async fn a_slow_d1_times_out_within_the_budget() -> Result<()> {
    let fake = start().await?;
    let mut cfg = fake.config();
    cfg.call_timeout = Duration::from_millis(300);
    let client = D1Client::new(cfg)?;
    client.get_token("mer-1", "warm").await?;
    fake.script([Scripted::delay(Duration::from_secs(3))]);
    let started = Instant::now();
    let err = client.get_token("mer-1", "t").await;
    let elapsed = started.elapsed();
    ensure!(matches!(err, Err(ProviderError::Timeout)), "{err:?}");
    ensure!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_millis(1500),
        "elapsed {elapsed:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_full_concurrency_limit_refuses_at_once() -> Result<()> {
    let fake = start().await?;
    let mut cfg = fake.config();
    cfg.max_concurrency = 2;
    let client = D1Client::new(cfg)?;
    client.get_token("mer-1", "warm").await?;
    fake.script([
        Scripted::delay(Duration::from_millis(800)),
        Scripted::delay(Duration::from_millis(800)),
    ]);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.get_token("mer-1", "slow").await })
        })
        .collect();
    // Let both slow calls reach the fake.
    let wait_until = Instant::now() + Duration::from_secs(3);
    while fake.api_requests() < 3 {
        if Instant::now() > wait_until {
            bail!("slow calls never arrived");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let err = client.get_token("mer-1", "t").await;
    ensure!(
        matches!(err, Err(ProviderError::Unavailable { retry_after: None })),
        "{err:?}"
    );
    ensure!(started.elapsed() < Duration::from_millis(100));
    ensure!(fake.api_requests() == 3);
    for s in slow {
        s.await??;
    }
    // Slots are released: calls go through again.
    client.get_token("mer-1", "t").await?;
    Ok(())
}

#[tokio::test]
async fn unknown_fields_and_status_values_are_decoded() -> Result<()> {
    let fake = start().await?;
    let client = fake.client()?;
    let t = client.get_token("mer-1", "noisy").await?;
    ensure!(
        t.status == TokenStatus::Unknown("FROZEN_BY_NETWORK".into()),
        "{t:?}"
    );
    ensure!(t.last4.as_deref() == Some("4321"));
    // An unparsable expiry is dropped, not an error.
    ensure!(t.expiry.is_none());
    ensure!(t.par.as_deref() == Some("V0010013826ABCDEF"));
    Ok(())
}

#[tokio::test]
async fn card_data_is_sent_as_jwe_to_d1s_key() -> Result<()> {
    let fake = start().await?;
    let client = fake.client()?;
    let t = client
        .create_token("mer-1", &pan()?, &expiry()?, Usage::CardOnFile, "tok_jwe_1")
        .await?;
    ensure!(t.d1_token_id == "d1tok-1");
    ensure!(t.expiry == Expiry::trusted(11, 2030));
    let seen = fake.seen();
    let create = seen.last().context("no request seen")?;
    ensure!(create.method == "POST");
    ensure!(create.path == format!("/authz/v1/merchant-gateways/{MGID}/merchants/mer-1/tokens"));
    ensure!(create.body["usage"] == "CARD_ON_FILE");
    ensure!(create.body["requestId"] == "tok_jwe_1");
    let (card_pan, exp, kid) = create.card.clone().context("no card data decrypted")?;
    ensure!(card_pan == PAN && exp == "1230" && kid == fake.state.m.d1_jwe_kid);
    // The PAN appears nowhere in clear on the wire.
    ensure!(!create.body.to_string().contains(PAN));
    let keys: Vec<&String> = create
        .body
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    ensure!(keys.len() == 3, "unexpected request fields: {keys:?}");
    Ok(())
}

#[tokio::test]
async fn cryptograms_are_decrypted_with_the_gateway_key() -> Result<()> {
    let fake = start().await?;
    let client = fake.client()?;
    let amount = Amount {
        value: 1299,
        currency: "EUR".into(),
    };
    let c = client
        .create_cryptogram("mer-1", "d1tok-1", TransactionType::Cit, Some(&amount))
        .await?;
    ensure!(c.token_number.as_str() == TOKEN_NUMBER);
    ensure!(c.cryptogram.as_str() == CRYPTOGRAM);
    ensure!(c.expiry == Expiry::trusted(11, 2030).context("expiry")?);
    ensure!(c.eci == "07");
    ensure!(!format!("{c:?}").contains(TOKEN_NUMBER));
    let seen = fake.seen();
    let req = seen.last().context("no request")?;
    ensure!(req.path.ends_with("/tokens/d1tok-1/transactions"));
    ensure!(
        req.body == json!({"transactionType": "CIT", "amount": {"value": 1299, "currency": "EUR"}})
    );
    Ok(())
}

#[tokio::test]
async fn merchants_lookup_and_lifecycle_use_the_documented_paths() -> Result<()> {
    let fake = start().await?;
    let client = fake.client()?;
    ensure!(client.onboard_merchant("Acme").await? == "mer-fake-1");
    let found = client
        .find_token_by_request("mer-fake-1", "tok_known")
        .await?;
    ensure!(found.d1_token_id == "d1tok-1");
    let s = client
        .lifecycle("mer-fake-1", "d1tok-1", LifecycleAction::Suspend)
        .await?;
    ensure!(s.status == TokenStatus::Suspended);
    let r = client
        .lifecycle("mer-fake-1", "d1tok-1", LifecycleAction::Resume)
        .await?;
    ensure!(r.status == TokenStatus::Active);
    let d = client
        .lifecycle("mer-fake-1", "d1tok-1", LifecycleAction::Delete)
        .await?;
    ensure!(d.status == TokenStatus::Deleted);
    let calls: Vec<(String, String, Option<String>)> = fake
        .seen()
        .into_iter()
        .map(|s| (s.method, s.path, s.query))
        .collect();
    let base = format!("/authz/v1/merchant-gateways/{MGID}/merchants");
    let tok = format!("{base}/mer-fake-1/tokens/d1tok-1");
    let expected = vec![
        ("POST".to_owned(), base.clone(), None),
        (
            "GET".to_owned(),
            format!("{base}/mer-fake-1/tokens"),
            Some("requestId=tok_known".to_owned()),
        ),
        ("POST".to_owned(), format!("{tok}/suspend"), None),
        ("POST".to_owned(), format!("{tok}/resume"), None),
        ("DELETE".to_owned(), tok.clone(), None),
    ];
    ensure!(calls == expected, "{calls:#?}");
    ensure!(fake.seen()[0].body == json!({"merchantName": "Acme"}));
    Ok(())
}

#[tokio::test]
async fn a_server_requiring_mtls_refuses_clients_without_a_valid_certificate() -> Result<()> {
    let fake = start().await?;
    // 1. A TLS client with no certificate at all.
    let cfg = tls::client_config(&fake.state.m.ca_cert_pem, None)?;
    let tcp = tokio::net::TcpStream::connect(fake.addr).await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?;
    let answer = async {
        let mut tls = TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await?;
        tls.write_all(b"GET /authz/v1/oauth2/token HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    }
    .await;
    match answer {
        Err(_) => {}
        Ok(bytes) => ensure!(
            !String::from_utf8_lossy(&bytes).contains("HTTP/"),
            "server answered a client without a certificate"
        ),
    }

    // 2. The D1 client with a certificate from another CA.
    let foreign = DevMaterial::generate(MGID)?;
    let mut cfg = fake.config();
    cfg.client_cert_pem = foreign.gateway_client_cert_pem.clone();
    cfg.client_key_pem = foreign.gateway_client_key_pem.as_str().into();
    cfg.max_retries = 0;
    let client = D1Client::new(cfg)?;
    let err = client.get_token("mer-1", "t").await;
    ensure!(
        matches!(
            err,
            Err(ProviderError::Unavailable { .. }) | Err(ProviderError::BadResponse(_))
        ),
        "{err:?}"
    );
    ensure!(fake.oauth_requests() == 0 && fake.api_requests() == 0);
    ensure!(fake.state.tls_connections.load(Ordering::SeqCst) == 0);
    Ok(())
}

#[tokio::test]
async fn an_unreachable_d1_is_unavailable() -> Result<()> {
    support::init_logs();
    let m = DevMaterial::generate(MGID)?;
    // A port that was free a moment ago: connection refused.
    let port = TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let client = D1Client::new(D1Config::sandbox(
        &format!("https://127.0.0.1:{port}/authz/v1"),
        &m,
    ))?;
    let err = client.get_token("mer-1", "t").await;
    ensure!(
        matches!(err, Err(ProviderError::Unavailable { .. })),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn logs_carry_operations_but_no_secrets() -> Result<()> {
    let fake = start().await?;
    let client = fake.client()?;
    client
        .create_token(
            "mer-1",
            &pan()?,
            &expiry()?,
            Usage::CardOnFile,
            "tok_logs_1",
        )
        .await?;
    let c = client
        .create_cryptogram("mer-1", "d1tok-1", TransactionType::Mit, None)
        .await?;
    ensure!(c.token_number.as_str() == TOKEN_NUMBER);
    let correlation = fake
        .seen()
        .first()
        .map(|s| s.correlation_id.clone())
        .context("no request")?;
    let tokens: Vec<String> = lock(&fake.state.valid_tokens).iter().cloned().collect();
    let logs = support::captured_logs();
    ensure!(logs.contains(&correlation), "the call was not logged");
    ensure!(logs.contains("createToken") && logs.contains("createTransaction"));
    for secret in [PAN, TOKEN_NUMBER, CRYPTOGRAM] {
        ensure!(!logs.contains(secret), "a secret reached the logs");
    }
    for t in tokens {
        ensure!(!logs.contains(&t), "an access token reached the logs");
    }
    ensure!(!logs.contains("PRIVATE KEY"));
    Ok(())
}
