//! The issuer side's test set-up, shared by the `issuer_*` tests and `tls`: a gateway with the
//! issuer worker and webhooks on fast timers, onboarding an issuer through the admin API (a fresh
//! D1 issuer id, its first API key), further keys for it, a loopback webhook receiver, and
//! waiting for what the worker finishes in the background.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use reqwest::Client;
use serde_json::{Value, json};

use super::app::{ADMIN, Backend, TestApp, TestAppBuilder};

/// How long a background outcome (a notification, a re-drive, a webhook) may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// A gateway (sandbox mode: D1 is the in-process simulator) that accepts D1's notifications with
/// `notify` (client id, secret), re-drives and polls issuer operations and sends webhooks on fast
/// timers, so a test sees them within [`WAIT`].
pub fn gateway(backend: Backend, notify: (&str, &str)) -> TestAppBuilder {
    TestApp::builder(backend)
        .env("TOKENGATE__NOTIFY__CLIENT_ID", notify.0)
        .env("TOKENGATE__NOTIFY__CLIENT_SECRET", notify.1)
        .env("TOKENGATE__ISSUER__WORKER_INTERVAL_MS", "50")
        .env("TOKENGATE__ISSUER__REDRIVE_AFTER_MS", "100")
        .env("TOKENGATE__ISSUER__POLL_AFTER_MS", "300")
        .env("TOKENGATE__WEBHOOKS__POLL_INTERVAL_MS", "50")
        .env("TOKENGATE__WEBHOOKS__BACKOFF_BASE_MS", "50")
}

/// Polls `f` until it answers `Some`, for at most [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
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

/// An onboarded issuer: its id, its D1 issuer id and its first API key (all issuer scopes).
pub struct Iss {
    pub id: String,
    pub d1: String,
    pub key: String,
}

/// A D1 issuer id (10 characters), unique per call.
pub fn d1_issuer_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("IS{}", &u[..8]).to_uppercase()
}

/// Onboards an issuer with D1 issuer id `d1` as the admin, through `client` against `base`
/// (the gateway's plain or HTTPS address).
pub async fn onboard(client: &Client, base: &str, d1: &str) -> Iss {
    let r = client
        .post(format!("{base}/v1/issuers"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "Example Bank", "d1IssuerId": d1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["d1IssuerId"], d1);
    Iss {
        id: v["id"].as_str().unwrap().to_owned(),
        d1: d1.to_owned(),
        key: v["apiKey"].as_str().unwrap().to_owned(),
    }
}

/// Onboards an issuer on `app` with a fresh D1 issuer id.
pub async fn issuer(app: &TestApp) -> Iss {
    onboard(&app.client, &app.base, &d1_issuer_id()).await
}

/// The admin's answer to a new API key for issuer `issuer_id` named `name` with `scopes`
/// (unchecked: callers test refusals with it).
pub async fn add_key(
    app: &TestApp,
    issuer_id: &str,
    name: &str,
    scopes: &[&str],
) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/v1/issuers/{issuer_id}/api-keys")))
        .bearer_auth(ADMIN)
        .json(&json!({"name": name, "scopes": scopes}))
        .send()
        .await
        .unwrap()
}

/// A new API key for issuer `issuer_id` with `scopes`, issued by the admin: (key id, secret).
pub async fn issuer_key(
    app: &TestApp,
    issuer_id: &str,
    name: &str,
    scopes: &[&str],
) -> (String, String) {
    let r = add_key(app, issuer_id, name, scopes).await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

/// A webhook receiver on loopback (sandbox mode allows plain http on loopback): every body it
/// was sent, in order of arrival.
pub struct Receiver {
    pub url: String,
    hits: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        async fn hit(State(h): State<Arc<Mutex<Vec<String>>>>, body: String) -> &'static str {
            h.lock().unwrap().push(body);
            "ok"
        }
        let hits = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = Router::new()
            .route("/hook", post(hit))
            .with_state(hits.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://127.0.0.1:{port}/hook"),
            hits,
        }
    }

    /// The bodies received so far, as sent.
    pub fn bodies(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }

    /// The bodies received so far as JSON (`null` for one that is not).
    pub fn events(&self) -> Vec<Value> {
        self.bodies()
            .iter()
            .map(|b| serde_json::from_str(b).unwrap_or(Value::Null))
            .collect()
    }
}
