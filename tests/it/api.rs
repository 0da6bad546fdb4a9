//! Integration tests: the public REST API end to end, on the embedded store and on Redis.
//! These run with D1 disabled (vault-only); tests/it/gateway_d1.rs covers the D1 flows.

use serde_json::{Value, json};

use crate::support::app::{ADMIN, Backend, TestApp, card_body, expect_problem};
use crate::support::captured_logs;

const VISA: &str = "4111111111111111";
const MC: &str = "5555555555554444";

async fn app(backend: Backend) -> TestApp {
    TestApp::builder(backend)
        .env("TOKENGATE__D1__ENABLED", "false")
        .start()
        .await
}

crate::backend_tests!(all:
    tokenize_and_fetch,
    dedup_and_reissue,
    tenant_isolation,
    idempotency,
    merchant_creation_replays_its_key_sealed,
    bad_input_is_4xx_problem,
    health_and_ready,
);

async fn tokenize_and_fetch(b: Backend) {
    let app = app(b).await;
    let (mid, key) = app.create_merchant("Acme").await;
    assert!(mid.starts_with("mer_"));
    assert!(key.starts_with("tgk_"));

    let r = app.tokenize(&key, VISA).await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("x-request-id"));
    let text = r.text().await.unwrap();
    assert!(!text.contains(VISA), "PAN in response");
    let v: Value = serde_json::from_str(&text).unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("tok_") && id.len() == 26, "{id}");
    assert_eq!(v["status"], "PENDING");
    assert_eq!(v["usage"], "CARD_ON_FILE");
    assert_eq!(v["networkToken"], Value::Null);
    assert_eq!(v["customerReference"], "cust-42");
    assert_eq!(
        v["card"],
        json!({"brand": "VISA", "bin": "411111", "last4": "1111", "expiryMonth": 12, "expiryYear": 2030})
    );
    assert!(v["createdAt"].is_string() && v["updatedAt"].is_string());

    let r = app.get(&format!("/v1/tokens/{id}"), &key).await;
    assert_eq!(r.status(), 200);
    let got: Value = r.json().await.unwrap();
    assert_eq!(got, v);

    // An unknown but well-formed id, and a malformed one: both 404.
    let r = app.get("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA", &key).await;
    expect_problem(r, 404, "token_not_found").await;
    let r = app.get("/v1/tokens/whatever", &key).await;
    expect_problem(r, 404, "token_not_found").await;
}

async fn dedup_and_reissue(b: Backend) {
    let app = app(b).await;
    let (_, key) = app.create_merchant("Acme").await;
    let first: Value = app.tokenize(&key, VISA).await.json().await.unwrap();
    // Same card, formatted differently: same token, 200.
    let r = app
        .post(
            "/v1/tokens",
            &key,
            &card_body("4111 1111 1111 1111", 12, 2030),
        )
        .await;
    assert_eq!(r.status(), 200);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    // Reissued card: same PAN, new expiry -> same token, expiry updated.
    let r = app
        .post("/v1/tokens", &key, &card_body(VISA, 3, 2032))
        .await;
    assert_eq!(r.status(), 200);
    let renewed: Value = r.json().await.unwrap();
    assert_eq!(renewed["id"], first["id"]);
    assert_eq!(renewed["card"]["expiryMonth"], 3);
    assert_eq!(renewed["card"]["expiryYear"], 2032);
    // A different card: a new token.
    let r = app.tokenize(&key, MC).await;
    assert_eq!(r.status(), 201);
    let other: Value = r.json().await.unwrap();
    assert_ne!(other["id"], first["id"]);
    assert_eq!(other["card"]["brand"], "MASTERCARD");

    // Concurrent tokenizations of one new card: exactly one 201, the rest 200, one id.
    let pan = "4012888888881881";
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let client = app.client.clone();
        let url = app.url("/v1/tokens");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&card_body(pan, 1, 2031))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            (status, v["id"].as_str().unwrap().to_owned())
        }));
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (s, id) = t.await.unwrap();
        if s == 201 {
            created += 1;
        } else {
            assert_eq!(s, 200);
        }
        ids.insert(id);
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
}

async fn tenant_isolation(b: Backend) {
    let app = app(b).await;
    let (_, key_a) = app.create_merchant("A").await;
    let (_, key_b) = app.create_merchant("B").await;
    let a: Value = app.tokenize(&key_a, VISA).await.json().await.unwrap();
    let id = a["id"].as_str().unwrap();
    // B cannot see A's token: 404, not 403.
    let r = app.get(&format!("/v1/tokens/{id}"), &key_b).await;
    expect_problem(r, 404, "token_not_found").await;
    // The same card at B is B's own token.
    let r = app.tokenize(&key_b, VISA).await;
    assert_eq!(r.status(), 201);
    let b_tok: Value = r.json().await.unwrap();
    assert_ne!(b_tok["id"], a["id"]);
}

/// A retried merchant creation (same `Idempotency-Key`) gets the same merchant and API key, and
/// the stored replay copy holds the key only sealed: the raw store never contains it.
async fn merchant_creation_replays_its_key_sealed(b: Backend) {
    let app = app(b).await;
    let create = || async {
        app.client
            .post(app.url("/v1/merchants"))
            .bearer_auth(ADMIN)
            .header("Idempotency-Key", "onboard-acme-1")
            .json(&json!({"name": "Acme"}))
            .send()
            .await
            .unwrap()
    };
    let r1 = create().await;
    assert_eq!(r1.status(), 201);
    let v1: Value = r1.json().await.unwrap();
    let r2 = create().await;
    assert_eq!(r2.status(), 201);
    assert_eq!(r2.headers()["idempotent-replayed"], "true");
    let v2: Value = r2.json().await.unwrap();
    assert_eq!(v1["id"], v2["id"]);
    assert_eq!(v1["apiKey"], v2["apiKey"]);
    let key = v1["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(app.tokenize(&key, VISA).await.status(), 201);

    let raw = match (&app.redis, &app.cluster) {
        (Some(r), _) => crate::store_contract::dump_node(&r.url()).await,
        (None, Some(c)) => crate::store_contract::dump_cluster(c).await,
        (None, None) => {
            let mut all = Vec::new();
            for e in std::fs::read_dir(&app.data_dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_file() {
                    all.extend(std::fs::read(p).unwrap());
                }
            }
            all
        }
    };
    assert!(!raw.is_empty());
    let needle = key.as_bytes();
    assert!(
        !raw.windows(needle.len()).any(|w| w == needle),
        "the API key is in the raw store"
    );
}

async fn idempotency(b: Backend) {
    let app = app(b).await;
    let (_, key) = app.create_merchant("Acme").await;
    let send = |body: Value, idem: &'static str| {
        let client = app.client.clone();
        let url = app.url("/v1/tokens");
        let key = key.clone();
        async move {
            client
                .post(url)
                .bearer_auth(key)
                .header("Idempotency-Key", idem)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let r1 = send(card_body(VISA, 12, 2030), "order-1").await;
    assert_eq!(r1.status(), 201);
    let b1 = r1.text().await.unwrap();
    let r2 = send(card_body(VISA, 12, 2030), "order-1").await;
    assert_eq!(r2.status(), 201, "replay keeps the original status");
    assert_eq!(r2.headers()["idempotent-replayed"], "true");
    assert_eq!(r2.text().await.unwrap(), b1);
    // Same key, different body.
    let r3 = send(card_body(MC, 12, 2030), "order-1").await;
    expect_problem(r3, 422, "idempotency_key_reused").await;
    // Without a key the same card is a dedup hit (200), not a replay.
    let r4 = app.tokenize(&key, VISA).await;
    assert_eq!(r4.status(), 200);
    // A 4xx is stored and replayed too.
    let bad = json!({"card": {"number": "4111111111111112", "expiryMonth": 1, "expiryYear": 2031}, "usage": "ONE_OFF"});
    let r5 = send(bad.clone(), "order-2").await;
    expect_problem(r5, 422, "invalid_card_number_luhn").await;
    let r6 = send(bad, "order-2").await;
    assert_eq!(r6.headers()["idempotent-replayed"], "true");
    expect_problem(r6, 422, "invalid_card_number_luhn").await;
    // A malformed key.
    let r7 = send(card_body(VISA, 12, 2030), "has space").await;
    expect_problem(r7, 400, "invalid_idempotency_key").await;
    // Keys are per merchant: another merchant's identical key is independent.
    let (_, key2) = app.create_merchant("Other").await;
    let r8 = app
        .client
        .post(app.url("/v1/tokens"))
        .bearer_auth(&key2)
        .header("Idempotency-Key", "order-1")
        .json(&card_body(MC, 12, 2030))
        .send()
        .await
        .unwrap();
    assert_eq!(r8.status(), 201);
}

async fn bad_input_is_4xx_problem(b: Backend) {
    let app = app(b).await;
    let (_, key) = app.create_merchant("Acme").await;
    let raw = |body: &'static str| {
        let client = app.client.clone();
        let url = app.url("/v1/tokens");
        let key = key.clone();
        async move {
            client
                .post(url)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let mut bodies = Vec::new();
    let p = expect_problem(raw("{not json").await, 400, "malformed_json").await;
    bodies.push(p);
    let p = expect_problem(raw("").await, 400, "body_missing").await;
    bodies.push(p);
    let p = expect_problem(
        raw(r#"{"card": {"number": 4111111111111111, "expiryMonth": 12, "expiryYear": 2030}, "usage": "ONE_OFF"}"#).await,
        400,
        "invalid_field",
    )
    .await;
    bodies.push(p);
    let p = expect_problem(
        raw(r#"{"card": {"number": "4111111111111111", "expiryMonth": "12", "expiryYear": 2030}, "usage": "ONE_OFF"}"#).await,
        400,
        "invalid_field",
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap().contains("card.expiryMonth"),
        "{p}"
    );
    bodies.push(p);
    let p = expect_problem(
        raw(r#"{"card": {"number": "4111111111111111", "expiryMonth": 12}, "usage": "ONE_OFF"}"#)
            .await,
        400,
        "missing_field",
    )
    .await;
    bodies.push(p);
    let p = expect_problem(
        raw(r#"{"card": {"number": "4111111111111111", "expiryMonth": 12, "expiryYear": 2030}, "usage": "SOMETIMES"}"#).await,
        400,
        "invalid_field",
    )
    .await;
    bodies.push(p);
    let p = expect_problem(
        raw(r#"{"card": {"number": "4111111111111112", "expiryMonth": 12, "expiryYear": 2030}, "usage": "ONE_OFF"}"#).await,
        422,
        "invalid_card_number_luhn",
    )
    .await;
    bodies.push(p);
    let p = expect_problem(
        raw(r#"{"card": {"number": "4111111111111111", "expiryMonth": 1, "expiryYear": 2020}, "usage": "ONE_OFF"}"#).await,
        422,
        "card_expired",
    )
    .await;
    bodies.push(p);
    let p = expect_problem(
        raw(r#"{"card": {"number": "4111111111111111", "expiryMonth": 13, "expiryYear": 2030}, "usage": "ONE_OFF"}"#).await,
        422,
        "invalid_expiry",
    )
    .await;
    bodies.push(p);
    // Oversized body.
    let big = format!(
        r#"{{"card": {{"number": "4111111111111111", "expiryMonth": 12, "expiryYear": 2030}}, "usage": "ONE_OFF", "customerReference": "{}"}}"#,
        "x".repeat(40_000)
    );
    let r = app
        .client
        .post(app.url("/v1/tokens"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    bodies.push(expect_problem(r, 413, "body_too_large").await);
    // Wrong content type.
    let r = app
        .client
        .post(app.url("/v1/tokens"))
        .bearer_auth(&key)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    bodies.push(expect_problem(r, 415, "unsupported_media_type").await);
    // Unknown route, wrong method.
    let r = app.get("/v1/nothing", &key).await;
    bodies.push(expect_problem(r, 404, "route_not_found").await);
    let r = app
        .client
        .put(app.url("/v1/tokens"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    bodies.push(expect_problem(r, 405, "method_not_allowed").await);
    // Credentials: missing, wrong scheme, unknown key, merchant key on admin route.
    let r = app
        .client
        .post(app.url("/v1/tokens"))
        .json(&card_body(VISA, 12, 2030))
        .send()
        .await
        .unwrap();
    bodies.push(expect_problem(r, 401, "unauthorized").await);
    let r = app
        .client
        .post(app.url("/v1/tokens"))
        .header("authorization", format!("Basic {key}"))
        .json(&card_body(VISA, 12, 2030))
        .send()
        .await
        .unwrap();
    bodies.push(expect_problem(r, 401, "unauthorized").await);
    let r = app
        .post("/v1/tokens", "tgk_notakey", &card_body(VISA, 12, 2030))
        .await;
    bodies.push(expect_problem(r, 401, "unauthorized").await);
    let r = app.post("/v1/merchants", &key, &json!({"name": "x"})).await;
    bodies.push(expect_problem(r, 401, "unauthorized").await);
    let r = app.post("/v1/merchants", ADMIN, &json!({"name": ""})).await;
    bodies.push(expect_problem(r, 422, "invalid_merchant_name").await);
    let r = app.post("/v1/merchants", ADMIN, &json!({"nom": "x"})).await;
    bodies.push(expect_problem(r, 400, "invalid_field").await);

    // No problem body echoes a card number.
    for b in &bodies {
        let s = b.to_string();
        assert!(
            !s.contains("4111111111111111") && !s.contains("4111111111111112"),
            "card number echoed: {s}"
        );
    }
}

async fn health_and_ready(b: Backend) {
    let app = app(b).await;
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_503_and_recovers_nothing_half_written() {
    let mut app = app(Backend::Redis).await;
    let (_, key) = app.create_merchant("Acme").await;
    let before: Value = app.tokenize(&key, VISA).await.json().await.unwrap();
    app.redis.as_mut().unwrap().stop();
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    expect_problem(r, 503, "store_unavailable").await;
    // A new key is not in the API-key cache, so use the cached one: the store call fails.
    let r = app.tokenize(&key, MC).await;
    let p = expect_problem(r, 503, "store_unavailable").await;
    assert!(!p.to_string().contains(MC));
    let r = app
        .get(
            &format!("/v1/tokens/{}", before["id"].as_str().unwrap()),
            &key,
        )
        .await;
    expect_problem(r, 503, "store_unavailable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_survives_restart_and_holds_no_clear_pan() {
    let app = app(Backend::Embedded).await;
    let dir = app.data_dir.clone();
    let (_, key) = app.create_merchant("Acme").await;
    let tok: Value = app.tokenize(&key, VISA).await.json().await.unwrap();
    let (tmp, _) = app.stop().await;
    let app2 = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__D1__ENABLED", "false")
        .data_dir(dir.clone())
        .start()
        .await;
    let r = app2
        .get(&format!("/v1/tokens/{}", tok["id"].as_str().unwrap()), &key)
        .await;
    assert_eq!(r.status(), 200);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again, tok);
    // Dedup still works after restart (fingerprint index persisted).
    assert_eq!(app2.tokenize(&key, VISA).await.status(), 200);
    app2.stop().await;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(VISA.len()).any(|w| w == VISA.as_bytes()),
            "clear PAN in the data directory"
        );
    }
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_the_pan() {
    // A PAN used only by this test, so other tests' traffic cannot mask a leak.
    let pan = "4000056655665556";
    let app = app(Backend::Redis).await;
    let (_, key) = app.create_merchant("Acme").await;
    let t: Value = app.tokenize(&key, pan).await.json().await.unwrap();
    app.get(&format!("/v1/tokens/{}", t["id"].as_str().unwrap()), &key)
        .await;
    app.post(
        "/v1/tokens",
        &key,
        &json!({"card": {"number": pan, "expiryMonth": 1}}),
    )
    .await;
    app.post("/v1/tokens", &key, &json!({"card": {"number": 4000056655665556u64, "expiryMonth": 1, "expiryYear": 2030}, "usage": "ONE_OFF"}))
        .await;
    let logs = captured_logs();
    assert!(!logs.is_empty(), "log capture works");
    assert!(!logs.contains(pan), "PAN found in logs");
    assert!(!logs.contains(&key), "API key found in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_per_key_is_429_with_retry_after() {
    let app = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__D1__ENABLED", "false")
        .env("TOKENGATE__RATE_LIMIT__PER_KEY_PER_S", "1")
        .env("TOKENGATE__RATE_LIMIT__PER_KEY_BURST", "3")
        .start()
        .await;
    let (_, key) = app.create_merchant("Acme").await;
    let (_, other) = app.create_merchant("Other").await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(app.get("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA", &key).await);
    }
    // The burst of 3 passes (404: no such token), then the limit answers.
    for r in statuses.drain(..3) {
        assert_eq!(r.status(), 404);
    }
    let limited = statuses.remove(0);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    expect_problem(limited, 429, "rate_limited").await;
    // Another merchant's key is unaffected.
    let r = app
        .get("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA", &other)
        .await;
    assert_eq!(r.status(), 404);
    // After the interval the key may send again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = app.get("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA", &key).await;
    assert_eq!(r.status(), 404);
}
