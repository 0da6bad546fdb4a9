//! Integration tests: the gateway in sandbox mode, tokenizing through the in-process D1
//! simulator over real sockets with mTLS, OAuth (ES256 assertions) and JWE.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::app::{Backend, TestApp, card_body, expect_problem};
use crate::support::captured_logs;

const VISA: &str = "4111111111111111";

fn luhn(d: &str) -> bool {
    let mut sum = 0;
    for (i, c) in d.bytes().rev().enumerate() {
        let mut v = u32::from(c - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum % 10 == 0
}

async fn sandbox(backend: Backend) -> TestApp {
    TestApp::builder(backend)
        .env("TOKENGATE__D1__CALL_TIMEOUT_MS", "1500")
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_through_d1_on_redis() {
    full_lifecycle(Backend::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_through_d1_on_redis_cluster() {
    full_lifecycle(Backend::RedisCluster).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_through_d1_embedded() {
    full_lifecycle(Backend::Embedded).await
}

async fn full_lifecycle(backend: Backend) {
    let app = sandbox(backend).await;
    let r = app
        .post(
            "/v1/merchants",
            crate::support::app::ADMIN,
            &json!({"name": "Acme"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let m: Value = r.json().await.unwrap();
    assert!(
        m["d1MerchantId"].as_str().is_some_and(|s| !s.is_empty()),
        "{m}"
    );
    let key = m["apiKey"].as_str().unwrap().to_owned();

    let r = app.tokenize(&key, VISA).await;
    assert_eq!(r.status(), 201);
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["status"], "ACTIVE", "{t}");
    let nt = &t["networkToken"];
    assert!(nt["id"].as_str().is_some_and(|s| !s.is_empty()), "{t}");
    assert_eq!(nt["last4"].as_str().unwrap().len(), 4);
    assert!(nt["expiryMonth"].as_u64().is_some() && nt["expiryYear"].as_u64().is_some());
    assert!(nt["par"].as_str().is_some());
    let id = t["id"].as_str().unwrap().to_owned();

    // Same card again: the same token, and no second D1 token.
    let r = app.tokenize(&key, VISA).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.sim_stats().await["tokensCreated"], 1);

    let cryptogram = |tt: &'static str| {
        let app = &app;
        let key = key.clone();
        let id = id.clone();
        async move {
            app.post(
                &format!("/v1/tokens/{id}/cryptograms"),
                &key,
                &json!({"transactionType": tt, "amount": {"value": 1299, "currency": "EUR"}}),
            )
            .await
        }
    };
    let r = cryptogram("CIT").await;
    assert_eq!(r.status(), 201);
    let c1: Value = r.json().await.unwrap();
    let number = c1["tokenNumber"].as_str().unwrap().to_owned();
    assert!(number.starts_with("489537") && luhn(&number), "{number}");
    assert_ne!(number, VISA);
    assert_eq!(&number[number.len() - 4..], nt["last4"].as_str().unwrap());
    assert!(c1["cryptogram"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(c1["eci"].is_string());
    assert_eq!(c1["expiryMonth"], nt["expiryMonth"]);
    // A fresh cryptogram on every call.
    let c2: Value = cryptogram("MIT").await.json().await.unwrap();
    assert_ne!(c1["cryptogram"], c2["cryptogram"]);

    // Suspend -> cryptogram refused -> resume -> cryptogram ok -> delete.
    let r = app
        .post(&format!("/v1/tokens/{id}/suspend"), &key, &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "SUSPENDED");
    expect_problem(cryptogram("CIT").await, 409, "token_suspended").await;
    // Suspending twice is idempotent.
    let r = app
        .post(&format!("/v1/tokens/{id}/suspend"), &key, &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .post(&format!("/v1/tokens/{id}/resume"), &key, &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ACTIVE");
    assert_eq!(cryptogram("CIT").await.status(), 201);
    let r = app
        .client
        .delete(app.url(&format!("/v1/tokens/{id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "DELETED");
    expect_problem(cryptogram("CIT").await, 409, "token_deleted").await;
    let r = app
        .post(&format!("/v1/tokens/{id}/resume"), &key, &json!({}))
        .await;
    expect_problem(r, 409, "token_deleted").await;
    let got: Value = app
        .get(&format!("/v1/tokens/{id}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["status"], "DELETED");
    // After delete, the card tokenizes afresh.
    let r = app.tokenize(&key, VISA).await;
    assert_eq!(r.status(), 201);
    let t2: Value = r.json().await.unwrap();
    assert_ne!(t2["id"], t["id"]);

    // Token numbers and cryptograms never reach the logs.
    let logs = captured_logs();
    assert!(!logs.contains(&number), "token number in logs");
    assert!(!logs.contains(c1["cryptogram"].as_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d1_unavailable_is_503_and_leaves_nothing() {
    let app = sandbox(Backend::Redis).await;
    let (_, key) = app.create_merchant("Acme").await;
    app.sim_faults(
        json!({"errorRates": {"503": 1.0}, "operations": ["createToken"], "retryAfterSeconds": 2}),
    )
    .await;
    let r = app.tokenize(&key, VISA).await;
    let retry_after = r.headers().get("retry-after").cloned();
    let p = expect_problem(r, 503, "d1_unavailable").await;
    assert_eq!(
        retry_after.as_ref().map(|v| v.to_str().unwrap()),
        Some("2"),
        "{p}"
    );
    app.sim_faults(json!({})).await;
    // Nothing was left behind: the card tokenizes as new (201), one D1 token in all.
    let r = app.tokenize(&key, VISA).await;
    assert_eq!(r.status(), 201);
    assert_eq!(app.sim_stats().await["tokensCreated"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d1_timeout_is_504_and_retry_reuses_the_reservation() {
    let app = sandbox(Backend::Redis).await;
    let (_, key) = app.create_merchant("Acme").await;
    app.sim_faults(json!({"latency": {"fixedMs": 3000}, "operations": ["createToken"]}))
        .await;
    let r = app.tokenize(&key, VISA).await;
    expect_problem(r, 504, "d1_timeout").await;
    app.sim_faults(json!({})).await;
    // The reservation is re-driven with the same request id once it is older than a moment.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = app.tokenize(&key, VISA).await;
    assert_eq!(r.status(), 200);
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["status"], "ACTIVE", "{t}");
    // The slow first call may have completed in the simulator: still one D1 token.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.sim_stats().await["tokensCreated"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_429s_and_noise_still_yield_one_token_per_card() {
    let app = sandbox(Backend::Redis).await;
    let (_, key) = app.create_merchant("Acme").await;
    app.sim_faults(json!({"errorRates": {"429": 0.4}, "retryAfterSeconds": 0, "noise": true, "operations": ["createToken", "createTransaction"]}))
        .await;
    let cards = [
        "4111111111111111",
        "5555555555554444",
        "4012888888881881",
        "5105105105105100",
        "4000056655665556",
        "2223003122003222",
    ];
    let mut ok = 0;
    for pan in cards {
        let r = app.tokenize(&key, pan).await;
        let s = r.status().as_u16();
        if s == 201 {
            ok += 1;
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["status"], "ACTIVE");
        } else {
            // All retries exhausted: a clean 503, never a 500.
            expect_problem(r, 503, "d1_unavailable").await;
        }
    }
    assert!(ok >= 3, "retries should absorb most 429s, got {ok}");
    app.sim_faults(json!({})).await;
    assert_eq!(app.sim_stats().await["tokensCreated"], ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_become_a_clean_gateway_error() {
    let app = sandbox(Backend::Redis).await;
    let (_, key) = app.create_merchant("Acme").await;
    app.sim_faults(json!({"resetRate": 1.0, "operations": ["createToken"]}))
        .await;
    let r = app.tokenize(&key, VISA).await;
    let status = r.status().as_u16();
    assert!(status == 502 || status == 503 || status == 504, "{status}");
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(ct, "application/problem+json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_idempotency_key_is_409() {
    let app = sandbox(Backend::Redis).await;
    let (_, key) = app.create_merchant("Acme").await;
    app.sim_faults(json!({"latency": {"fixedMs": 600}, "operations": ["createToken"]}))
        .await;
    let send = || {
        let client = app.client.clone();
        let url = app.url("/v1/tokens");
        let key = key.clone();
        async move {
            client
                .post(url)
                .bearer_auth(key)
                .header("Idempotency-Key", "same-key")
                .json(&card_body(VISA, 12, 2030))
                .send()
                .await
                .unwrap()
        }
    };
    let first = tokio::spawn(send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = send().await;
    expect_problem(second, 409, "idempotency_in_flight").await;
    assert_eq!(first.await.unwrap().status(), 201);
    let third = send().await;
    assert_eq!(third.status(), 201);
    assert_eq!(third.headers()["idempotent-replayed"], "true");
}

/// The middleware's own answers (src/http/stack.rs): a request over `server.max_concurrency`
/// and one past `server.request_timeout_ms` get their problem with `Retry-After: 1`, and both
/// still echo the request id; the slot of the timed-out request is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_and_shedding_answer_problems_with_retry_after_and_request_id() {
    let app = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__SERVER__MAX_CONCURRENCY", "1")
        .env("TOKENGATE__SERVER__REQUEST_TIMEOUT_MS", "1000")
        .env("TOKENGATE__D1__CALL_TIMEOUT_MS", "5000")
        .start()
        .await;
    let (_, key) = app.create_merchant("Slow Co").await;
    app.sim_faults(json!({"latency": {"fixedMs": 3000}, "operations": ["createToken"]}))
        .await;
    let slow = {
        let client = app.client.clone();
        let url = app.url("/v1/tokens");
        let key = key.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(key)
                .header("x-request-id", "it-slow-1")
                .json(&card_body(VISA, 12, 2030))
                .send()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The one slot is taken by the slow request: this one is shed at once.
    let r = app
        .client
        .get(app.url("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA"))
        .bearer_auth(&key)
        .header("x-request-id", "it-shed-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["x-request-id"], "it-shed-1");
    expect_problem(r, 503, "overloaded").await;

    let r = slow.await.unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["x-request-id"], "it-slow-1");
    let v = expect_problem(r, 503, "request_timeout").await;
    assert_eq!(
        v["detail"],
        "the request did not complete within the gateway's time budget"
    );
    // The timed-out request's slot is free again; a generated id is echoed.
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "{id}");
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_with_503_instead_of_queueing() {
    let app = TestApp::builder(Backend::Redis)
        .env("TOKENGATE__SERVER__MAX_CONCURRENCY", "2")
        .start()
        .await;
    let (_, key) = app.create_merchant("Acme").await;
    app.sim_faults(json!({"latency": {"fixedMs": 800}, "operations": ["createToken"]}))
        .await;
    let cards = [
        "4111111111111111",
        "5555555555554444",
        "4012888888881881",
        "5105105105105100",
        "4000056655665556",
        "2223003122003222",
    ];
    let mut tasks = Vec::new();
    for pan in cards {
        let client = app.client.clone();
        let url = app.url("/v1/tokens");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&card_body(pan, 12, 2030))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            (s, v)
        }));
    }
    let mut shed = 0;
    let mut created = 0;
    for t in tasks {
        let (s, v) = t.await.unwrap();
        match s {
            201 => created += 1,
            503 => {
                assert_eq!(v["code"], "overloaded");
                shed += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(created >= 2 && shed >= 1, "created {created}, shed {shed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let app = sandbox(Backend::Redis).await;
    let (_, key) = app.create_merchant("Acme").await;
    app.sim_faults(json!({"latency": {"fixedMs": 700}, "operations": ["createToken"]}))
        .await;
    let client = app.client.clone();
    let url = app.url("/v1/tokens");
    let inflight = tokio::spawn(async move {
        client
            .post(url)
            .bearer_auth(key)
            .json(&card_body(VISA, 12, 2030))
            .send()
            .await
            .unwrap()
            .status()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = app.addr;
    app.stop().await;
    assert_eq!(inflight.await.unwrap(), 201);
    // And the listener is closed afterwards.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
