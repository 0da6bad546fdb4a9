//! The issuer side end to end (docs/issuer.md): a real gateway with the D1 simulator in-process
//! over real sockets (mutual TLS, OAuth, notifications back to the gateway), on the embedded
//! store, standalone Redis and a Redis Cluster. Tenants and scopes, Click to Pay enrolment
//! finished by D1's notification, the card that fails while its consumer is enrolled, consumer
//! opt-out, validation that never reaches D1, a lost D1 answer re-driven into one D1 operation,
//! the polling fallback, and no card number in any answer, log line or store byte.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::app::{ADMIN, Backend, TestApp, TestAppBuilder, expect_problem};
use crate::support::captured_logs;
pub(crate) use crate::support::issuer::{Iss, Receiver, eventually, issuer};
use crate::support::issuer::{add_key, gateway, issuer_key};
use crate::support::redis_server::RedisServer;

pub(crate) const CLIENT_ID: &str = "d1-issuer-test-client";
pub(crate) const CLIENT_SECRET: &str = "issuer-notify-secret-0123456789abcdef";
pub(crate) const PAN: &str = "4111111111111111";
const PAN2: &str = "5555555555554444";

pub(crate) fn builder(backend: Backend) -> TestAppBuilder {
    gateway(backend, (CLIENT_ID, CLIENT_SECRET))
}

/// Seeds a card at the simulated D1; answers its consumer id.
pub(crate) async fn seed(app: &TestApp, iss: &Iss, card: &str, body: Value) -> String {
    let url = format!(
        "{}/sim/issuers/{}/cards/{card}",
        app.sim_control.as_ref().unwrap(),
        iss.d1
    );
    let r = app.client.put(url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "seed card");
    let v: Value = r.json().await.unwrap();
    v["consumerId"].as_str().unwrap().to_owned()
}

pub(crate) async fn sim_settings(app: &TestApp, v: Value) {
    let url = format!("{}/sim/issuer-settings", app.sim_control.as_ref().unwrap());
    let r = app.client.put(url).json(&v).send().await.unwrap();
    assert_eq!(r.status(), 200, "issuer settings");
}

pub(crate) async fn operation(app: &TestApp, key: &str, id: &str) -> Value {
    let r = app.get(&format!("/v1/issuer/operations/{id}"), key).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

pub(crate) async fn until_final(app: &TestApp, key: &str, id: &str) -> Value {
    eventually("a final operation status", || async {
        let op = operation(app, key, id).await;
        (op["status"] != "PENDING").then_some(op)
    })
    .await
}

pub(crate) async fn enrol(app: &TestApp, iss: &Iss, card: &str) -> Value {
    let r = app
        .post(
            &format!("/v1/issuer/cards/{card}/click-to-pay/enrolment"),
            &iss.key,
            &json!({"cardholderName": "ADA LOVELACE", "reason": "customer request"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let op: Value = r.json().await.unwrap();
    assert_eq!(op["operation"], "CLICK_TO_PAY_ENROLMENT");
    op
}

pub(crate) async fn profiles(app: &TestApp, key: &str, path: &str) -> Value {
    let r = app.get(path, key).await;
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

pub(crate) async fn receiver() -> Receiver {
    Receiver::start().await
}

pub(crate) async fn subscribe(app: &TestApp, iss: &Iss, url: &str) {
    let r = app
        .post(
            "/v1/issuer/webhook-endpoints",
            &iss.key,
            &json!({"url": url, "events": ["issuer.operation.succeeded", "issuer.operation.failed", "issuer.click_to_pay.enrolled", "issuer.click_to_pay.opted_out"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
}

crate::backend_tests!(all:
    tenants_scopes_and_isolation,
    enrolment_completes_through_a_notification,
    card_fails_but_consumer_is_enrolled,
    consumer_opt_out_removes_every_card,
    validation_never_reaches_d1,
    lost_d1_answer_is_redriven_into_one_operation,
    polling_finishes_an_operation_without_notification,
);

async fn tenants_scopes_and_isolation(backend: Backend) {
    let app = builder(backend).start().await;
    // Onboarding rules.
    for bad in ["SHORT", "ELEVENCHARS", "BAD ISSUER"] {
        let r = app
            .client
            .post(app.url("/v1/issuers"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": "Bank", "d1IssuerId": bad}))
            .send()
            .await
            .unwrap();
        expect_problem(r, 422, "invalid_d1_issuer_id").await;
    }
    let a = issuer(&app).await;
    let b = issuer(&app).await;
    let r = app
        .client
        .post(app.url("/v1/issuers"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "Again", "d1IssuerId": a.d1}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 409, "d1_issuer_id_taken").await;
    let list: Value = app
        .client
        .get(app.url("/v1/issuers"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == a.id.as_str())
    );
    let one = app
        .client
        .get(app.url(&format!("/v1/issuers/{}", a.id)))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    let missing = app
        .client
        .get(app.url("/v1/issuers/iss_AAAAAAAAAAAAAAAA"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    expect_problem(missing, 404, "issuer_not_found").await;
    let r = app
        .client
        .get(app.url("/v1/issuers"))
        .bearer_auth(&a.key)
        .send()
        .await
        .unwrap();
    expect_problem(r, 401, "unauthorized").await;

    // Keys of one kind are refused on the other kind's routes.
    let (_, merchant_key) = app.create_merchant("Shop").await;
    expect_problem(
        app.get("/v1/issuer/operations", &merchant_key).await,
        403,
        "insufficient_scope",
    )
    .await;
    expect_problem(
        app.get("/v1/tokens/tok_d7XXXyQu2WZRKlyWvsMJRA", &a.key)
            .await,
        403,
        "insufficient_scope",
    )
    .await;
    expect_problem(app.tokenize(&a.key, PAN).await, 403, "insufficient_scope").await;
    let r = app
        .post(
            "/v1/issuer/cards/card-1/click-to-pay/enrolment",
            &merchant_key,
            &json!({"cardholderName": "X"}),
        )
        .await;
    expect_problem(r, 403, "insufficient_scope").await;
    // A merchant key cannot be given issuer scopes, nor an issuer key merchant ones.
    let r = app
        .post(
            "/v1/api-keys",
            &merchant_key,
            &json!({"name": "x", "scopes": ["issuer:orders"]}),
        )
        .await;
    expect_problem(r, 422, "invalid_scopes").await;
    let r = add_key(&app, &a.id, "x", &["tokens:read"]).await;
    expect_problem(r, 422, "invalid_scopes").await;
    // A key without `issuer:operations` cannot read operations.
    let (_, narrow) = issuer_key(&app, &a.id, "c2p only", &["issuer:click-to-pay"]).await;
    expect_problem(
        app.get("/v1/issuer/operations", &narrow).await,
        403,
        "insufficient_scope",
    )
    .await;

    // An operation of A is invisible to B.
    seed(&app, &a, "card-a", json!({"pan": PAN, "expiry": "1230"})).await;
    let op = enrol(&app, &a, "card-a").await;
    let id = op["id"].as_str().unwrap();
    assert_eq!(operation(&app, &a.key, id).await["id"], id);
    expect_problem(
        app.get(&format!("/v1/issuer/operations/{id}"), &b.key)
            .await,
        404,
        "operation_not_found",
    )
    .await;
    let listed: Value = app
        .get("/v1/issuer/operations", &b.key)
        .await
        .json()
        .await
        .unwrap();
    assert!(listed["data"].as_array().unwrap().is_empty());
    let listed: Value = app
        .get("/v1/issuer/operations?cardId=card-a", &a.key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"][0]["id"], id);
    // Pages: one operation per page, following the cursor.
    let op2 = enrol(&app, &a, "card-a").await;
    let page1: Value = app
        .get("/v1/issuer/operations?limit=1", &a.key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page1["data"][0]["id"], op2["id"]);
    let cursor = page1["nextCursor"].as_str().unwrap();
    let page2: Value = app
        .get(
            &format!("/v1/issuer/operations?limit=1&cursor={cursor}"),
            &a.key,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page2["data"][0]["id"], id);
    assert!(page2["nextCursor"].is_null());
    expect_problem(
        app.get("/v1/issuer/operations?status=DONE", &a.key).await,
        400,
        "invalid_query",
    )
    .await;
    expect_problem(
        app.get("/v1/issuer/operations?cursor=nope", &a.key).await,
        422,
        "invalid_cursor",
    )
    .await;
}

async fn enrolment_completes_through_a_notification(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    let hook = receiver().await;
    subscribe(&app, &iss, &hook.url).await;
    let consumer = seed(&app, &iss, "card-1", json!({"pan": PAN, "expiry": "1230", "firstName": "Ada", "lastName": "Lovelace", "email": "ada@example.com"})).await;
    // Not enrolled yet: no profile.
    let p = profiles(
        &app,
        &iss.key,
        "/v1/issuer/cards/card-1/click-to-pay/profiles",
    )
    .await;
    assert_eq!(p["clickToPayProfiles"], json!([]));

    let op = enrol(&app, &iss, "card-1").await;
    assert!(op["d1OperationId"].is_string(), "D1 acknowledged: {op}");
    let id = op["id"].as_str().unwrap();
    let done = until_final(&app, &iss.key, id).await;
    assert_eq!(done["status"], "SUCCESSFUL");
    assert_eq!(done["history"].as_array().unwrap().len(), 2);
    assert_eq!(done["history"][1]["source"], "NOTIFICATION");
    // The profile exists now: PAN masked, personal data withheld without the PII scope.
    let p = profiles(
        &app,
        &iss.key,
        "/v1/issuer/cards/card-1/click-to-pay/profiles",
    )
    .await;
    let prof = &p["clickToPayProfiles"][0];
    assert_eq!(prof["maskedPan"], "411111******1111");
    assert_eq!(prof["personalDataWithheld"], true);
    assert!(prof["email"].is_null() && prof["lastName"].is_null());
    assert_eq!(prof["consumerId"], consumer.as_str());
    // With the PII scope.
    let (_, pii_key) = issuer_key(
        &app,
        &iss.id,
        "support desk",
        &["issuer:click-to-pay", "issuer:click-to-pay:pii"],
    )
    .await;
    let p = profiles(
        &app,
        &pii_key,
        &format!("/v1/issuer/consumers/{consumer}/click-to-pay/profiles"),
    )
    .await;
    let prof = &p["clickToPayProfiles"][0];
    assert_eq!(prof["email"], "ada@example.com");
    assert_eq!(prof["cardholderName"], "ADA LOVELACE");
    assert_eq!(prof["maskedPan"], "411111******1111");
    // Webhooks: the operation succeeded, the card is enrolled; one of each.
    eventually("two webhooks", || async {
        (hook.bodies().len() >= 2).then_some(())
    })
    .await;
    // A moment for any duplicate to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits = hook.events();
    let mut types: Vec<&str> = hits.iter().map(|h| h["type"].as_str().unwrap()).collect();
    types.sort_unstable();
    assert_eq!(
        types,
        ["issuer.click_to_pay.enrolled", "issuer.operation.succeeded"],
        "{hits:?}"
    );
    assert_eq!(hits[0]["data"]["operation"]["id"], id);
    // No card number in any answer body so far, any log line, or the webhook payloads.
    for h in &hits {
        assert!(!h.to_string().contains(PAN));
    }
    assert!(!captured_logs().contains(PAN), "a PAN reached the logs");
    no_pan_in_store(&app);
    // Idempotency-Key as on the merchant routes: a retry answers the same operation, and D1
    // sees one call.
    let update = || {
        app.client
            .post(app.url("/v1/issuer/cards/card-1/click-to-pay/update"))
            .bearer_auth(&iss.key)
            .header("Idempotency-Key", "update-card-1")
            .json(&json!({"cardholderName": "A LOVELACE"}))
            .send()
    };
    let first: Value = update().await.unwrap().json().await.unwrap();
    let second: Value = update().await.unwrap().json().await.unwrap();
    assert_eq!(first["operation"], "CLICK_TO_PAY_UPDATE");
    assert_eq!(first["id"], second["id"]);
    assert_eq!(app.sim_stats().await["requests"]["clickToPayUpdate"], 1);
}

/// The embedded store's file holds no card number (Redis: see `no_pan_in_redis`).
pub(crate) fn no_pan_in_store(app: &TestApp) {
    for entry in std::fs::read_dir(&app.data_dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        assert!(
            !bytes.windows(PAN.len()).any(|w| w == PAN.as_bytes()),
            "a PAN is in the store file"
        );
    }
    if let Some(r) = &app.redis {
        let out = std::process::Command::new("redis-cli")
            .args(["-u", &r.url(), "--scan"])
            .output()
            .unwrap();
        let keys = String::from_utf8_lossy(&out.stdout).to_string();
        for k in keys.lines().filter(|k| k.contains("{i:")) {
            let out = std::process::Command::new("redis-cli")
                .args(["-u", &r.url(), "DUMP", k])
                .output()
                .unwrap();
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains(PAN),
                "{k} holds a PAN"
            );
        }
    }
}

async fn card_fails_but_consumer_is_enrolled(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    let consumer = seed(
        &app,
        &iss,
        "card-bad",
        json!({"pan": PAN2, "expiry": "1230", "consumerId": "cons-ada", "failEnrolment": true}),
    )
    .await;
    let op = enrol(&app, &iss, "card-bad").await;
    let done = until_final(&app, &iss.key, op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "FAILED");
    assert_eq!(done["errorCode"], "CARD_NOT_ELIGIBLE");
    // The consumer profile exists, without the card.
    let p = profiles(
        &app,
        &iss.key,
        &format!("/v1/issuer/consumers/{consumer}/click-to-pay/profiles"),
    )
    .await;
    assert_eq!(p["clickToPayProfiles"].as_array().unwrap().len(), 1);
    assert!(p["clickToPayProfiles"][0]["maskedPan"].is_null());
    let p = profiles(
        &app,
        &iss.key,
        "/v1/issuer/cards/card-bad/click-to-pay/profiles",
    )
    .await;
    assert_eq!(p["clickToPayProfiles"], json!([]));
    // The failed list is index-backed.
    let failed: Value = app
        .get("/v1/issuer/operations?status=FAILED", &iss.key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(failed["data"].as_array().unwrap().len(), 1);
}

async fn consumer_opt_out_removes_every_card(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    let hook = receiver().await;
    subscribe(&app, &iss, &hook.url).await;
    for (card, pan) in [("card-1", PAN), ("card-2", PAN2)] {
        seed(
            &app,
            &iss,
            card,
            json!({"pan": pan, "expiry": "1230", "consumerId": "cons-1"}),
        )
        .await;
        let op = enrol(&app, &iss, card).await;
        assert_eq!(
            until_final(&app, &iss.key, op["id"].as_str().unwrap()).await["status"],
            "SUCCESSFUL"
        );
    }
    // Re-reading after each step: one profile, two cards enrolled.
    for card in ["card-1", "card-2"] {
        let p = profiles(
            &app,
            &iss.key,
            &format!("/v1/issuer/cards/{card}/click-to-pay/profiles"),
        )
        .await;
        assert_eq!(
            p["clickToPayProfiles"].as_array().unwrap().len(),
            1,
            "{card}"
        );
    }
    let r = app
        .post(
            "/v1/issuer/consumers/cons-1/click-to-pay/opt-out",
            &iss.key,
            &json!({"reason": "user left"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let op: Value = r.json().await.unwrap();
    assert_eq!(op["consumerId"], "cons-1");
    let done = until_final(&app, &iss.key, op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "SUCCESSFUL");
    for path in [
        "/v1/issuer/cards/card-1/click-to-pay/profiles",
        "/v1/issuer/cards/card-2/click-to-pay/profiles",
        "/v1/issuer/consumers/cons-1/click-to-pay/profiles",
    ] {
        assert_eq!(
            profiles(&app, &iss.key, path).await["clickToPayProfiles"],
            json!([]),
            "{path}"
        );
    }
    // Re-enrolment later is allowed; the last card opted out removes the profile again.
    let op = enrol(&app, &iss, "card-1").await;
    assert_eq!(
        until_final(&app, &iss.key, op["id"].as_str().unwrap()).await["status"],
        "SUCCESSFUL"
    );
    let r = app
        .post(
            "/v1/issuer/cards/card-1/click-to-pay/opt-out",
            &iss.key,
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let op: Value = r.json().await.unwrap();
    assert_eq!(
        until_final(&app, &iss.key, op["id"].as_str().unwrap()).await["status"],
        "SUCCESSFUL"
    );
    assert_eq!(
        profiles(
            &app,
            &iss.key,
            "/v1/issuer/consumers/cons-1/click-to-pay/profiles"
        )
        .await["clickToPayProfiles"],
        json!([])
    );
    let opted = eventually("opted-out webhooks", || async {
        let n = hook
            .events()
            .iter()
            .filter(|h| h["type"] == "issuer.click_to_pay.opted_out")
            .count();
        (n >= 2).then_some(n)
    })
    .await;
    assert_eq!(opted, 2);
}

async fn validation_never_reaches_d1(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    let cases = [
        (
            "/v1/issuer/cards/card%201/click-to-pay/enrolment",
            json!({"cardholderName": "A"}),
            422,
            "invalid_card_id",
        ),
        (
            &*format!("/v1/issuer/cards/{}/click-to-pay/enrolment", "c".repeat(49)),
            json!({"cardholderName": "A"}),
            422,
            "invalid_card_id",
        ),
        (
            "/v1/issuer/cards/card-1/click-to-pay/enrolment",
            json!({"cardholderName": "A".repeat(27)}),
            422,
            "invalid_cardholder_name",
        ),
        (
            "/v1/issuer/cards/card-1/click-to-pay/enrolment",
            json!({"cardholderName": ""}),
            422,
            "invalid_cardholder_name",
        ),
        (
            "/v1/issuer/cards/card-1/click-to-pay/enrolment",
            json!({"cardholderName": "A", "reason": "no-dashes!"}),
            422,
            "invalid_reason",
        ),
        (
            "/v1/issuer/cards/card-1/click-to-pay/enrolment",
            json!({"cardholderName": "A", "reasonCode": "lower"}),
            422,
            "invalid_reason_code",
        ),
        (
            "/v1/issuer/cards/card-1/click-to-pay/enrolment",
            json!({"name": "A"}),
            400,
            "invalid_field",
        ),
        (
            "/v1/issuer/consumers/c%20x/click-to-pay/opt-out",
            json!({}),
            422,
            "invalid_consumer_id",
        ),
        (
            "/v1/issuer/consumers/cons-1/click-to-pay/update",
            json!({"cardholderName": "A"}),
            400,
            "invalid_field",
        ),
    ];
    for (path, body, status, code) in cases {
        let r = app.post(path, &iss.key, &body).await;
        let problem = expect_problem(r, status, code).await;
        assert!(!problem.to_string().contains(PAN));
    }
    let stats = app.sim_stats().await;
    for op in [
        "clickToPayEnrolment",
        "clickToPayOptOut",
        "clickToPayUpdate",
    ] {
        assert_eq!(stats["requests"][op], 0, "{op} reached D1");
    }
    // Nothing was stored either.
    let listed: Value = app
        .get("/v1/issuer/operations", &iss.key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"], json!([]));
    // D1's own refusal (an unknown card) is a clear 4xx with its code kept, the operation FAILED.
    let r = app
        .post(
            "/v1/issuer/cards/unknown-card/click-to-pay/enrolment",
            &iss.key,
            &json!({"cardholderName": "A"}),
        )
        .await;
    let p = expect_problem(r, 422, "d1_rejected").await;
    assert!(
        p["detail"].as_str().unwrap().contains("CARD_NOT_FOUND"),
        "{p}"
    );
    let listed: Value = app
        .get("/v1/issuer/operations?status=FAILED", &iss.key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"][0]["errorCode"], "CARD_NOT_FOUND");
}

async fn lost_d1_answer_is_redriven_into_one_operation(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    seed(&app, &iss, "card-1", json!({"pan": PAN, "expiry": "1230"})).await;
    // D1 creates the operation but its answer is lost (a 500 after accepting), and completes
    // slowly, so the gateway's re-drive comes first.
    sim_settings(&app, json!({"completionDelayMs": 1500, "loseAnswers": 1})).await;
    let op = enrol(&app, &iss, "card-1").await;
    assert_eq!(op["status"], "PENDING");
    assert!(
        op["d1OperationId"].is_null(),
        "the outcome is unknown: {op}"
    );
    let id = op["id"].as_str().unwrap();
    let acked = eventually("the re-drive", || async {
        let o = operation(&app, &iss.key, id).await;
        o["d1OperationId"].is_string().then_some(o)
    })
    .await;
    assert_eq!(acked["issuerRequestId"], op["issuerRequestId"]);
    let done = until_final(&app, &iss.key, id).await;
    assert_eq!(done["status"], "SUCCESSFUL");
    let stats = app.sim_stats().await;
    assert_eq!(stats["issuerOperationsCreated"], 1, "{stats}");
    assert!(stats["requests"]["clickToPayEnrolment"].as_u64().unwrap() >= 2);
}

async fn polling_finishes_an_operation_without_notification(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    seed(&app, &iss, "card-1", json!({"pan": PAN, "expiry": "1230"})).await;
    sim_settings(
        &app,
        json!({"completionDelayMs": 10, "suppressNotifications": true}),
    )
    .await;
    let op = enrol(&app, &iss, "card-1").await;
    let done = until_final(&app, &iss.key, op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "SUCCESSFUL");
    assert_eq!(done["history"][1]["source"], "POLL");
    assert!(
        app.sim_stats().await["requests"]["getOperation"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

// --- notifications: redelivered, reordered, to two instances sharing one Redis ----------------

pub(crate) async fn access_token(app: &TestApp) -> String {
    let r = app
        .client
        .post(app.url("/oauth2/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

pub(crate) async fn notify(app: &TestApp, bearer: &str, d1: &str, body: &Value) -> u16 {
    app.client
        .post(app.url(&format!("/notifications/d1/v2/issuers/{d1}/cards")))
        .bearer_auth(bearer)
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_twice_out_of_order_on_two_instances_is_applied_once() {
    let server = RedisServer::start();
    let url = server.url();
    let instance = || {
        builder(Backend::Embedded)
            .env("TOKENGATE__STORAGE__REDIS_URL", &url)
            .start()
    };
    let a = instance().await;
    let b = instance().await;
    let iss = issuer(&a).await;
    let hook = receiver().await;
    subscribe(&a, &iss, &hook.url).await;
    // Only the batches below finish the operations: A's simulator stays silent.
    sim_settings(&a, json!({"completionDelayMs": 60000})).await;
    let mut ops = Vec::new();
    for card in ["card-1", "card-2"] {
        seed(&a, &iss, card, json!({"pan": PAN, "expiry": "1230"})).await;
        ops.push(enrol(&a, &iss, card).await);
    }
    let item = |op: &Value, status: &str| {
        json!({
            "operationId": op["d1OperationId"], "operation": "CLICK_TO_PAY_ENROLMENT",
            "status": status, "startTime": "2026-12-01T10:00:00.000Z",
            "endTime": if status == "PENDING" { Value::Null } else { json!("2026-12-01T10:00:01.000Z") },
            "cardId": op["cardId"], "issuerRequestId": op["issuerRequestId"],
        })
    };
    let batch = json!({"operations": [item(&ops[0], "SUCCESSFUL"), item(&ops[1], "FAILED"), item(&ops[0], "PENDING")]});
    let reordered = json!({"operations": [item(&ops[0], "PENDING"), item(&ops[1], "PENDING"), item(&ops[1], "FAILED"), item(&ops[0], "SUCCESSFUL")]});
    let (ta, tb) = (access_token(&a).await, access_token(&b).await);
    for _ in 0..3 {
        let (x, y) = tokio::join!(
            notify(&a, &ta, &iss.d1, &batch),
            notify(&b, &tb, &iss.d1, &reordered)
        );
        assert_eq!((x, y), (204, 204));
    }
    for (op, want) in [(&ops[0], "SUCCESSFUL"), (&ops[1], "FAILED")] {
        for app in [&a, &b] {
            let o = operation(app, &iss.key, op["id"].as_str().unwrap()).await;
            assert_eq!(o["status"], want);
            let changes: Vec<&Value> = o["history"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|h| h["status"] == want)
                .collect();
            assert_eq!(changes.len(), 1, "one status change: {o}");
        }
    }
    // One webhook per change (succeeded + enrolled for op 0, failed for op 1), whichever
    // instance applied it.
    eventually("three webhooks", || async {
        (hook.bodies().len() >= 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = hook.events();
    let mut types: Vec<&str> = hits.iter().map(|h| h["type"].as_str().unwrap()).collect();
    types.sort_unstable();
    assert_eq!(
        types,
        [
            "issuer.click_to_pay.enrolled",
            "issuer.operation.failed",
            "issuer.operation.succeeded"
        ]
    );
    // Not ours: acknowledged, changes nothing. Malformed: 400. Unknown issuer: 404.
    let stranger = json!({"operations": [{"operationId": "not-ours-1", "operation": "PRODUCE", "status": "SUCCESSFUL", "startTime": "2026-12-01T10:00:00Z", "cardId": "x"}]});
    assert_eq!(notify(&a, &ta, &iss.d1, &stranger).await, 204);
    assert_eq!(notify(&a, &ta, &iss.d1, &json!({"operations": [{"operationId": "bad id!", "operation": "PRODUCE", "status": "PENDING"}]})).await, 400);
    assert_eq!(notify(&a, &ta, "NOBODY0001", &batch).await, 404);
    assert_eq!(notify(&a, "not-a-token", &iss.d1, &batch).await, 401);
}
