//! Recurring agreements (issue 14): a PSP records the initial CIT's network transaction id on a
//! token (`PUT /v1/tokens/{id}/recurring-agreement`), and every later MIT cryptogram of the token
//! carries it; CIT cryptograms never do. Driven through the real gateway in sandbox mode (D1
//! simulator, its notifications) on the embedded store, Redis and Redis Cluster.

use std::time::{Duration, Instant};

use reqwest::{Method, Response};
use serde_json::{Value, json};

use crate::support::app::{Backend, TestApp, expect_problem};

const VISA: &str = "4111111111111111";
const MASTERCARD: &str = "5555555555554444";
const NTID: &str = "MCC123ABC0115";

// --- helpers -----------------------------------------------------------------------------------

/// The gateway with D1 notification credentials, so the simulator's events reach it.
async fn gateway(backend: Backend) -> TestApp {
    TestApp::builder(backend)
        .env("TOKENGATE__NOTIFY__CLIENT_ID", "d1-test-client")
        .env(
            "TOKENGATE__NOTIFY__CLIENT_SECRET",
            "test-notify-secret-0123456789abcdef-xyz",
        )
        .start()
        .await
}

async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    key: &str,
    idempotency_key: Option<&str>,
    body: Option<&Value>,
) -> Response {
    let mut rb = app.client.request(method, app.url(path)).bearer_auth(key);
    if let Some(k) = idempotency_key {
        rb = rb.header("idempotency-key", k);
    }
    if let Some(b) = body {
        rb = rb.json(b);
    }
    rb.send().await.unwrap()
}

fn path(id: &str) -> String {
    format!("/v1/tokens/{id}/recurring-agreement")
}

async fn put(app: &TestApp, key: &str, id: &str, body: &Value) -> Response {
    send(app, Method::PUT, &path(id), key, None, Some(body)).await
}

async fn end(app: &TestApp, key: &str, id: &str) -> Response {
    send(app, Method::DELETE, &path(id), key, None, None).await
}

fn agreement() -> Value {
    json!({
        "networkTransactionId": NTID,
        "agreementReference": "sub_8812",
        "amount": {"value": 1999, "currency": "EUR"},
        "frequency": "MONTHLY",
        "initialTransactionAt": "2026-01-15T10:00:00Z"
    })
}

async fn tokenize(app: &TestApp, key: &str, pan: &str) -> Value {
    let r = app.tokenize(key, pan).await;
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

async fn token(app: &TestApp, key: &str, id: &str) -> Value {
    let r = app.get(&format!("/v1/tokens/{id}"), key).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn cryptogram(app: &TestApp, key: &str, id: &str, tt: &str) -> Response {
    app.post(
        &format!("/v1/tokens/{id}/cryptograms"),
        key,
        &json!({"transactionType": tt, "amount": {"value": 1999, "currency": "EUR"}}),
    )
    .await
}

async fn issued(app: &TestApp, key: &str, id: &str, tt: &str) -> Value {
    let r = cryptogram(app, key, id, tt).await;
    assert_eq!(r.status(), 201, "{tt} cryptogram");
    let c: Value = r.json().await.unwrap();
    assert!(
        c["cryptogram"].as_str().is_some_and(|s| !s.is_empty()),
        "{c}"
    );
    c
}

/// Polls the token until `ok` holds (D1's notifications arrive asynchronously).
async fn wait_token(app: &TestApp, key: &str, id: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = token(app, key, id).await;
        if ok(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "condition not reached; token {t}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn audit_actions(app: &TestApp, key: &str) -> Vec<(String, String)> {
    let r = app.get("/v1/audit-events?limit=100", key).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// --- the flow, on every backend ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurring_flow_embedded() {
    recurring_flow(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurring_flow_on_redis() {
    recurring_flow(Backend::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurring_flow_on_redis_cluster() {
    recurring_flow(Backend::RedisCluster).await
}

/// Record, read back, MIT carries the id and CIT does not, idempotent replay, suspended
/// refusal, survival of a D1 renewal, end, and the agreement going with a deleted token.
async fn recurring_flow(backend: Backend) {
    let app = gateway(backend).await;
    let (_, key) = app.create_merchant("Acme").await;
    let t = tokenize(&app, &key, VISA).await;
    let id = t["id"].as_str().unwrap().to_owned();
    let d1 = t["networkToken"]["id"].as_str().unwrap().to_owned();
    assert!(t["recurringAgreement"].is_null(), "{t}");

    // Before any agreement: MITs are allowed (unscheduled ones need none recorded here) and
    // carry no id; reading the agreement is a 404 of its own.
    let c = issued(&app, &key, &id, "MIT").await;
    assert!(c.get("networkTransactionId").is_none(), "{c}");
    expect_problem(
        app.get(&path(&id), &key).await,
        404,
        "recurring_agreement_not_found",
    )
    .await;

    // The initial CIT: the PSP authorizes it and learns the network transaction id.
    let c = issued(&app, &key, &id, "CIT").await;
    assert!(c.get("networkTransactionId").is_none(), "{c}");

    // Recorded, then read back, in the token view too.
    let r = put(&app, &key, &id, &agreement()).await;
    assert_eq!(r.status(), 200);
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["networkTransactionId"], NTID);
    assert_eq!(a["agreementReference"], "sub_8812");
    assert_eq!(a["amount"], json!({"value": 1999, "currency": "EUR"}));
    assert_eq!(a["frequency"], "MONTHLY");
    assert_eq!(a["initialTransactionAt"], "2026-01-15T10:00:00Z");
    assert!(a["recordedAt"].is_string());
    let r = app.get(&path(&id), &key).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), a);
    let view = token(&app, &key, &id).await;
    assert_eq!(view["recurringAgreement"], a);
    assert!(!view.to_string().contains(VISA), "no PAN in the token view");

    // Every MIT carries it; a CIT never does.
    for _ in 0..2 {
        let c = issued(&app, &key, &id, "MIT").await;
        assert_eq!(c["networkTransactionId"], NTID, "{c}");
        assert_eq!(c["agreementReference"], "sub_8812", "{c}");
    }
    let c = issued(&app, &key, &id, "CIT").await;
    assert!(c.get("networkTransactionId").is_none(), "{c}");
    assert!(c.get("agreementReference").is_none(), "{c}");

    // The same PUT again is a no-op with the same answer (recordedAt kept); with an
    // Idempotency-Key it is replayed, and the key cannot be reused for another body.
    let r = put(&app, &key, &id, &agreement()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), a);
    let p = path(&id);
    let replaced =
        json!({"networkTransactionId": "483299310332879", "agreementReference": "sub_8813"});
    let first = send(&app, Method::PUT, &p, &key, Some("ra-1"), Some(&replaced)).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["networkTransactionId"], "483299310332879");
    assert!(
        first["amount"].is_null() && first["frequency"].is_null(),
        "{first}"
    );
    let again = send(&app, Method::PUT, &p, &key, Some("ra-1"), Some(&replaced)).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let reused = send(
        &app,
        Method::PUT,
        &p,
        &key,
        Some("ra-1"),
        Some(&agreement()),
    )
    .await;
    expect_problem(reused, 422, "idempotency_key_reused").await;
    let c = issued(&app, &key, &id, "MIT").await;
    assert_eq!(
        c["networkTransactionId"], "483299310332879",
        "replaced: {c}"
    );
    assert_eq!(put(&app, &key, &id, &agreement()).await.status(), 200);

    // A suspended token takes no new agreement, and keeps the one it has.
    let r = app
        .post(&format!("/v1/tokens/{id}/suspend"), &key, &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    expect_problem(
        put(&app, &key, &id, &agreement()).await,
        409,
        "token_suspended",
    )
    .await;
    let r = app.get(&path(&id), &key).await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["networkTransactionId"],
        NTID
    );
    let r = app
        .post(&format!("/v1/tokens/{id}/resume"), &key, &json!({}))
        .await;
    assert_eq!(r.status(), 200);

    // D1 renews the card: the network transaction id stays valid across the reissue.
    assert_eq!(
        app.sim_event(&d1, json!({"type": "RENEW", "expiry": "0934"}))
            .await,
        200
    );
    let renewed = wait_token(&app, &key, &id, |t| t["networkToken"]["expiryYear"] == 2034).await;
    assert_eq!(renewed["recurringAgreement"]["networkTransactionId"], NTID);
    let c = issued(&app, &key, &id, "MIT").await;
    assert_eq!(c["expiryYear"], 2034);
    assert_eq!(c["networkTransactionId"], NTID, "{c}");

    // Ended: later MITs carry nothing; ending again is a no-op, replayed with its key.
    let r = end(&app, &key, &id).await;
    assert_eq!(r.status(), 204);
    assert!(r.headers().get("content-type").is_none());
    let c = issued(&app, &key, &id, "MIT").await;
    assert!(c.get("networkTransactionId").is_none(), "{c}");
    assert_eq!(end(&app, &key, &id).await.status(), 204);
    let r = send(&app, Method::DELETE, &p, &key, Some("ra-end"), None).await;
    assert_eq!(r.status(), 204);
    let r = send(&app, Method::DELETE, &p, &key, Some("ra-end"), None).await;
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert!(token(&app, &key, &id).await["recurringAgreement"].is_null());

    // Deleted by the merchant: the agreement goes with the token; nothing can be recorded.
    assert_eq!(put(&app, &key, &id, &agreement()).await.status(), 200);
    let r = send(
        &app,
        Method::DELETE,
        &format!("/v1/tokens/{id}"),
        &key,
        None,
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let deleted: Value = r.json().await.unwrap();
    assert_eq!(deleted["status"], "DELETED");
    assert!(deleted["recurringAgreement"].is_null(), "{deleted}");
    expect_problem(
        app.get(&path(&id), &key).await,
        404,
        "recurring_agreement_not_found",
    )
    .await;
    expect_problem(
        put(&app, &key, &id, &agreement()).await,
        409,
        "token_deleted",
    )
    .await;
    assert_eq!(end(&app, &key, &id).await.status(), 204);

    // Deleted by D1 (a notification): the same.
    let t2 = tokenize(&app, &key, MASTERCARD).await;
    let id2 = t2["id"].as_str().unwrap().to_owned();
    let d2 = t2["networkToken"]["id"].as_str().unwrap().to_owned();
    assert_eq!(put(&app, &key, &id2, &agreement()).await.status(), 200);
    assert_eq!(app.sim_event(&d2, json!({"type": "DELETE"})).await, 200);
    let gone = wait_token(&app, &key, &id2, |t| t["status"] == "DELETED").await;
    assert!(gone["recurringAgreement"].is_null(), "{gone}");

    // Audited like other token writes, refusals included.
    let trail = audit_actions(&app, &key).await;
    let has = |action: &str, outcome: &str| trail.iter().any(|(a, o)| a == action && o == outcome);
    assert!(has("recurring_agreement.record", "success"), "{trail:?}");
    assert!(
        has("recurring_agreement.record", "token_suspended"),
        "{trail:?}"
    );
    assert!(
        has("recurring_agreement.record", "token_deleted"),
        "{trail:?}"
    );
    assert!(has("recurring_agreement.end", "success"), "{trail:?}");
}

// --- refusals (backend-independent: the embedded store) ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_agreements_are_refused_before_anything_is_stored() {
    let app = gateway(Backend::Embedded).await;
    let (_, key) = app.create_merchant("Acme").await;
    let id = tokenize(&app, &key, VISA).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let with = |field: &str, value: Value| {
        let mut a = agreement();
        a[field] = value;
        a
    };
    let cases = [
        (
            with("networkTransactionId", json!("")),
            "invalid_network_transaction_id",
        ),
        (
            with("networkTransactionId", json!("abc def")),
            "invalid_network_transaction_id",
        ),
        (
            with("networkTransactionId", json!("x".repeat(65))),
            "invalid_network_transaction_id",
        ),
        (
            with("agreementReference", json!("")),
            "invalid_agreement_reference",
        ),
        (
            with("agreementReference", json!("a\u{7}b")),
            "invalid_agreement_reference",
        ),
        (
            with("agreementReference", json!("r".repeat(65))),
            "invalid_agreement_reference",
        ),
        (
            with("amount", json!({"value": 0, "currency": "EUR"})),
            "invalid_amount",
        ),
        (
            with("amount", json!({"value": 1999, "currency": "eur"})),
            "invalid_amount",
        ),
        (with("frequency", json!("FORTNIGHTLY")), "invalid_frequency"),
        (
            with("initialTransactionAt", json!("15/01/2026")),
            "invalid_initial_transaction_at",
        ),
        (
            with("initialTransactionAt", json!("2999-01-01T00:00:00Z")),
            "invalid_initial_transaction_at",
        ),
    ];
    for (body, code) in cases {
        let v = expect_problem(put(&app, &key, &id, &body).await, 422, code).await;
        // The detail names the field, never the submitted value.
        assert!(!v["detail"].as_str().unwrap().contains("abc def"), "{v}");
    }
    // Unreadable bodies are 400s.
    let mut missing = agreement();
    missing
        .as_object_mut()
        .unwrap()
        .remove("networkTransactionId");
    expect_problem(put(&app, &key, &id, &missing).await, 400, "missing_field").await;
    expect_problem(
        put(&app, &key, &id, &with("unknown", json!(1))).await,
        400,
        "invalid_field",
    )
    .await;
    expect_problem(
        put(&app, &key, &id, &with("networkTransactionId", json!(42))).await,
        400,
        "invalid_field",
    )
    .await;
    // Nothing was stored.
    expect_problem(
        app.get(&path(&id), &key).await,
        404,
        "recurring_agreement_not_found",
    )
    .await;
    assert!(token(&app, &key, &id).await["recurringAgreement"].is_null());
    // Headroom: 64 characters of the allowed set are accepted.
    let long = with(
        "networkTransactionId",
        json!(format!("{}-_.:", "A1".repeat(30))),
    );
    assert_eq!(put(&app, &key, &id, &long).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agreements_are_per_merchant_and_need_the_token_scopes() {
    let app = gateway(Backend::Embedded).await;
    let (_, key) = app.create_merchant("Acme").await;
    let (_, other) = app.create_merchant("Other").await;
    let id = tokenize(&app, &key, VISA).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(put(&app, &key, &id, &agreement()).await.status(), 200);

    // Another merchant's token, an unknown one and a malformed id: 404, never 403.
    expect_problem(app.get(&path(&id), &other).await, 404, "token_not_found").await;
    expect_problem(
        put(&app, &other, &id, &agreement()).await,
        404,
        "token_not_found",
    )
    .await;
    expect_problem(end(&app, &other, &id).await, 404, "token_not_found").await;
    let unknown = "tok_AAAAAAAAAAAAAAAAAAAAAA";
    expect_problem(
        put(&app, &key, unknown, &agreement()).await,
        404,
        "token_not_found",
    )
    .await;
    expect_problem(app.get(&path("nope"), &key).await, 404, "token_not_found").await;
    assert_eq!(app.get(&path(&id), &key).await.status(), 200, "untouched");

    // A read-only key reads the agreement but neither records nor ends it.
    let r = app
        .post(
            "/v1/api-keys",
            &key,
            &json!({"name": "reader", "scopes": ["tokens:read"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let reader = r.json::<Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.get(&path(&id), &reader).await.status(), 200);
    expect_problem(
        put(&app, &reader, &id, &agreement()).await,
        403,
        "insufficient_scope",
    )
    .await;
    expect_problem(end(&app, &reader, &id).await, 403, "insufficient_scope").await;
    let trail = audit_actions(&app, &key).await;
    assert!(
        trail
            .iter()
            .any(|(a, o)| a == "recurring_agreement.end" && o == "insufficient_scope"),
        "{trail:?}"
    );
    // Unauthenticated: 401.
    expect_problem(app.get(&path(&id), "tgk_wrong").await, 401, "unauthorized").await;
}
