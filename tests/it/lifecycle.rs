//! Token lifecycle from D1 (issue 4 parts 1-3 and reconciliation): OAuth client credentials for
//! D1's calls, `notify-update` applied exactly once and in order, forged calls refused, async
//! tokenization completed by notification, reconciliation repairing what a notification did not
//! bring, two gateway instances on one Redis. Plus the `LifecycleStore` contract on every backend.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that fails must fail loudly"
)]

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::support::app::{ADMIN, Backend, TestApp, expect_problem};
use crate::support::captured_logs;
use crate::support::redis_server::RedisServer;

const VISA: &str = "4111111111111111";
const MASTERCARD: &str = "5555555555554444";
const CLIENT_ID: &str = "d1-test-client";
const CLIENT_SECRET: &str = "test-notify-secret-0123456789abcdef-xyz";
/// `d1.merchant_gateway_id` default.
const MGID: &str = "tokengate-sandbox";

// --- helpers -----------------------------------------------------------------------------------

fn with_credentials(backend: Backend) -> crate::support::app::TestAppBuilder {
    TestApp::builder(backend)
        .env("TOKENGATE__NOTIFY__CLIENT_ID", CLIENT_ID)
        .env("TOKENGATE__NOTIFY__CLIENT_SECRET", CLIENT_SECRET)
}

async fn gateway(backend: Backend) -> TestApp {
    with_credentials(backend).start().await
}

/// A merchant onboarded at D1 (the simulator): (API key, our merchant id, D1 merchant id).
struct Merchant {
    key: String,
    id: String,
    d1: String,
}

async fn merchant(app: &TestApp) -> Merchant {
    let r = app
        .post("/v1/merchants", ADMIN, &json!({"name": "Acme"}))
        .await;
    assert_eq!(r.status(), 201);
    let m: Value = r.json().await.unwrap();
    Merchant {
        key: m["apiKey"].as_str().unwrap().to_owned(),
        id: m["id"].as_str().unwrap().to_owned(),
        d1: m["d1MerchantId"].as_str().unwrap().to_owned(),
    }
}

/// Tokenizes `pan`; returns the token as the API shows it.
async fn tokenize(app: &TestApp, key: &str, pan: &str) -> Value {
    let r = app.tokenize(key, pan).await;
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

fn id(t: &Value) -> String {
    t["id"].as_str().unwrap().to_owned()
}

fn d1_id(t: &Value) -> String {
    t["networkToken"]["id"].as_str().unwrap().to_owned()
}

async fn get(app: &TestApp, key: &str, id: &str) -> Value {
    let r = app.get(&format!("/v1/tokens/{id}"), key).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Polls the token until `ok` holds, for at most `within`; returns the last view.
async fn wait_until(
    app: &TestApp,
    key: &str,
    id: &str,
    within: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let t = get(app, key, id).await;
        if ok(&t) {
            return t;
        }
        if Instant::now() > deadline {
            panic!("condition not reached within {within:?}; token is {t}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_status(app: &TestApp, key: &str, id: &str, status: &str, within: Duration) -> Value {
    wait_until(app, key, id, within, |t| t["status"] == status).await
}

/// Waits until the simulator has delivered `n` notifications in all.
async fn wait_delivered(app: &TestApp, n: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let delivered = app.sim_stats().await["notificationsDelivered"]
            .as_u64()
            .unwrap();
        if delivered >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {delivered} of {n} notifications delivered"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn delivered(app: &TestApp) -> u64 {
    app.sim_stats().await["notificationsDelivered"]
        .as_u64()
        .unwrap()
}

async fn token_request(app: &TestApp, auth: Option<(&str, &str)>, body: &str) -> reqwest::Response {
    let mut req = app
        .client
        .post(app.url("/oauth2/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned());
    if let Some((id, secret)) = auth {
        req = req.basic_auth(id, Some(secret));
    }
    req.send().await.unwrap()
}

/// An access token from the gateway's `/oauth2/token`, as D1 gets one.
async fn access_token(app: &TestApp) -> String {
    let r = token_request(
        app,
        Some((CLIENT_ID, CLIENT_SECRET)),
        "grant_type=client_credentials",
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

/// A notification body as D1 sends it.
fn event(
    event_id: &str,
    event_type: &str,
    at: OffsetDateTime,
    d1_token: &str,
    status: &str,
) -> Value {
    json!({
        "eventId": event_id,
        "eventType": event_type,
        "timestamp": rfc3339(at),
        "tokenId": d1_token,
        "status": status,
    })
}

fn notify_path(mgid: &str, d1_merchant: &str, d1_token: &str) -> String {
    format!("/merchant-gateways/{mgid}/merchants/{d1_merchant}/tokens/{d1_token}/notify-update")
}

async fn notify(
    app: &TestApp,
    bearer: Option<&str>,
    path: &str,
    body: &Value,
) -> reqwest::Response {
    let mut req = app.client.post(app.url(path)).json(body);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    req.send().await.unwrap()
}

/// The stored version of a token, read straight from Redis (not visible in the API).
async fn redis_version(url: &str, merchant: &str, token: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let v: String = redis::cmd("HGET")
        .arg(format!("tg:{{m:{merchant}}}:tok:{token}"))
        .arg("v")
        .query_async(&mut con)
        .await
        .unwrap();
    v.parse().unwrap()
}

// --- OAuth for D1's calls ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_endpoint_issues_tokens_and_answers_oauth_errors() {
    let app = gateway(Backend::Embedded).await;

    let r = token_request(
        &app,
        Some((CLIENT_ID, CLIENT_SECRET)),
        "grant_type=client_credentials&scope=notify",
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 900);
    assert_eq!(v["scope"], "notify");
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let expires_at = v["expires_at"].as_i64().unwrap();
    assert!((now + 890..=now + 910).contains(&expires_at), "{v}");
    let token = v["access_token"].as_str().unwrap().to_owned();
    assert!(!token.is_empty());

    // OAuth's own error format, not problem+json.
    let oauth_error = |r: reqwest::Response, status: u16, error: &'static str| async move {
        assert_eq!(r.status().as_u16(), status, "{error}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], error, "{v}");
        assert!(v.get("code").is_none());
    };
    let wrong = token_request(
        &app,
        Some((CLIENT_ID, "not-the-secret-but-long-enough-000000")),
        "grant_type=client_credentials",
    )
    .await;
    assert_eq!(
        wrong.headers()["www-authenticate"],
        "Basic realm=\"tokengate\""
    );
    oauth_error(wrong, 401, "invalid_client").await;
    let r = token_request(
        &app,
        Some(("someone-else", CLIENT_SECRET)),
        "grant_type=client_credentials",
    )
    .await;
    oauth_error(r, 401, "invalid_client").await;
    let r = token_request(&app, None, "grant_type=client_credentials").await;
    oauth_error(r, 401, "invalid_client").await;
    let r = token_request(
        &app,
        Some((CLIENT_ID, CLIENT_SECRET)),
        "grant_type=password",
    )
    .await;
    oauth_error(r, 400, "unsupported_grant_type").await;
    let r = token_request(&app, Some((CLIENT_ID, CLIENT_SECRET)), "scope=notify").await;
    oauth_error(r, 400, "invalid_request").await;
    let r = token_request(
        &app,
        Some((CLIENT_ID, CLIENT_SECRET)),
        "grant_type=client_credentials&grant_type=client_credentials",
    )
    .await;
    oauth_error(r, 400, "invalid_request").await;
    let r = app
        .client
        .post(app.url("/oauth2/token"))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    oauth_error(r, 400, "invalid_request").await;

    // Neither the secret nor an access token ever reaches the logs.
    let logs = captured_logs();
    assert!(!logs.contains(CLIENT_SECRET));
    assert!(!logs.contains(&token));
    let basic = STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    assert!(!logs.contains(&basic));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_expire() {
    let app = with_credentials(Backend::Embedded)
        .env("TOKENGATE__NOTIFY__TOKEN_TTL_S", "1")
        .start()
        .await;
    let m = merchant(&app).await;
    let t = tokenize(&app, &m.key, VISA).await;
    let bearer = access_token(&app).await;
    let path = notify_path(MGID, &m.d1, &d1_id(&t));
    let body = event(
        "evt_exp_1",
        "STATUS_UPDATE",
        OffsetDateTime::now_utc(),
        &d1_id(&t),
        "SUSPENDED",
    );
    // Expiry has whole-second resolution: wait past the next second boundary.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = notify(&app, Some(&bearer), &path, &body).await;
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"tokengate\", error=\"invalid_token\""
    );
    expect_problem(r, 401, "unauthorized").await;
    assert_eq!(get(&app, &m.key, &id(&t)).await["status"], "ACTIVE");
    // A fresh token works.
    let bearer = access_token(&app).await;
    assert_eq!(
        notify(&app, Some(&bearer), &path, &body).await.status(),
        204
    );
    assert_eq!(get(&app, &m.key, &id(&t)).await["status"], "SUSPENDED");
}

// --- notifications from the simulator ----------------------------------------------------------

async fn suspend_resume_delete(backend: Backend) {
    let app = gateway(backend).await;
    let m = merchant(&app).await;
    let t = tokenize(&app, &m.key, VISA).await;
    let (id, d1) = (id(&t), d1_id(&t));
    assert_eq!(t["status"], "ACTIVE");

    assert_eq!(app.sim_event(&d1, json!({"type": "SUSPEND"})).await, 200);
    wait_status(&app, &m.key, &id, "SUSPENDED", Duration::from_secs(1)).await;
    assert_eq!(app.sim_event(&d1, json!({"type": "RESUME"})).await, 200);
    wait_status(&app, &m.key, &id, "ACTIVE", Duration::from_secs(1)).await;
    assert_eq!(app.sim_event(&d1, json!({"type": "DELETE"})).await, 200);
    let deleted = wait_status(&app, &m.key, &id, "DELETED", Duration::from_secs(1)).await;
    // Every delivery was authenticated with the credentials the gateway handed the simulator
    // and answered 2xx at once: no redelivery was needed.
    let stats = app.sim_stats().await;
    assert_eq!(stats["notificationsDelivered"], 3, "{stats}");
    assert_eq!(stats["notificationAttempts"], 3, "{stats}");

    // DELETED is terminal: a later RESUME (newer timestamp) is acknowledged and ignored.
    let bearer = access_token(&app).await;
    let body = event(
        "evt_late_resume",
        "STATUS_UPDATE",
        OffsetDateTime::now_utc(),
        &d1,
        "ACTIVE",
    );
    let r = notify(&app, Some(&bearer), &notify_path(MGID, &m.d1, &d1), &body).await;
    assert_eq!(r.status(), 204);
    let after = get(&app, &m.key, &id).await;
    assert_eq!(after["status"], "DELETED");
    assert_eq!(after["updatedAt"], deleted["updatedAt"]);
    // The card can be tokenized afresh: the tombstone freed it.
    assert_ne!(id, self::id(&tokenize(&app, &m.key, VISA).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_suspend_resume_delete_on_redis() {
    suspend_resume_delete(Backend::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_suspend_resume_delete_embedded() {
    suspend_resume_delete(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_updates_expiry_and_keeps_the_token_id() {
    let app = gateway(Backend::Redis).await;
    let m = merchant(&app).await;
    let t = tokenize(&app, &m.key, VISA).await;
    let (id, d1) = (id(&t), d1_id(&t));

    assert_eq!(
        app.sim_event(&d1, json!({"type": "RENEW", "expiry": "0934"}))
            .await,
        200
    );
    let r = wait_until(&app, &m.key, &id, Duration::from_secs(1), |t| {
        t["networkToken"]["expiryYear"] == 2034
    })
    .await;
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["status"], "ACTIVE");
    assert_eq!(r["networkToken"]["id"], d1.as_str());
    assert_eq!(r["networkToken"]["expiryMonth"], 9);
    assert_eq!(r["card"]["expiryMonth"], 9);
    assert_eq!(r["card"]["expiryYear"], 2034);
    // The simulator mints a new token number on renewal; its last digits are taken over.
    assert_eq!(r["networkToken"]["last4"].as_str().unwrap().len(), 4);
    // The renewed card is the same card: tokenizing it with its new expiry finds this token.
    let again = app
        .post(
            "/v1/tokens",
            &m.key,
            &crate::support::app::card_body(VISA, 9, 2034),
        )
        .await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id.as_str());
    // Cryptograms use the renewed token.
    let c = app
        .post(
            &format!("/v1/tokens/{id}/cryptograms"),
            &m.key,
            &json!({"transactionType": "MIT"}),
        )
        .await;
    assert_eq!(c.status(), 201);
    let c: Value = c.json().await.unwrap();
    assert_eq!(c["expiryYear"], 2034);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_notifications_apply_once() {
    let app = gateway(Backend::Redis).await;
    let url = app.redis.as_ref().unwrap().url();
    let m = merchant(&app).await;
    let t = tokenize(&app, &m.key, VISA).await;
    let (id, d1) = (id(&t), d1_id(&t));
    let v0 = redis_version(&url, &m.id, &id).await;

    app.sim_faults(json!({"duplicateNotifications": true}))
        .await;
    assert_eq!(app.sim_event(&d1, json!({"type": "SUSPEND"})).await, 200);
    wait_status(&app, &m.key, &id, "SUSPENDED", Duration::from_secs(1)).await;
    // Both copies were delivered (and acknowledged), one was applied.
    wait_delivered(&app, 2, Duration::from_secs(2)).await;
    assert_eq!(redis_version(&url, &m.id, &id).await, v0 + 1);

    assert_eq!(app.sim_event(&d1, json!({"type": "RESUME"})).await, 200);
    wait_status(&app, &m.key, &id, "ACTIVE", Duration::from_secs(1)).await;
    wait_delivered(&app, 4, Duration::from_secs(2)).await;
    assert_eq!(redis_version(&url, &m.id, &id).await, v0 + 2);
}

async fn replayed_notification_applies_once(backend: Backend) {
    let app = gateway(backend).await;
    let m = merchant(&app).await;
    let t = tokenize(&app, &m.key, VISA).await;
    let (id, d1) = (id(&t), d1_id(&t));
    let bearer = access_token(&app).await;
    let path = notify_path(MGID, &m.d1, &d1);
    let body = event(
        "evt_replay_1",
        "STATUS_UPDATE",
        OffsetDateTime::now_utc(),
        &d1,
        "SUSPENDED",
    );

    assert_eq!(
        notify(&app, Some(&bearer), &path, &body).await.status(),
        204
    );
    let first = get(&app, &m.key, &id).await;
    assert_eq!(first["status"], "SUSPENDED");
    let v1 = match &app.redis {
        Some(r) => Some(redis_version(&r.url(), &m.id, &id).await),
        None => None,
    };
    for _ in 0..3 {
        assert_eq!(
            notify(&app, Some(&bearer), &path, &body).await.status(),
            204
        );
    }
    let after = get(&app, &m.key, &id).await;
    assert_eq!(after, first, "a replay changes nothing, not even updatedAt");
    if let (Some(r), Some(v1)) = (&app.redis, v1) {
        assert_eq!(redis_version(&r.url(), &m.id, &id).await, v1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_notification_applies_once_on_redis() {
    replayed_notification_applies_once(Backend::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_notification_applies_once_embedded() {
    replayed_notification_applies_once(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_notifications_keep_the_newest_state() {
    let app = gateway(Backend::Redis).await;
    let m = merchant(&app).await;
    let t = tokenize(&app, &m.key, VISA).await;
    let (id, d1) = (id(&t), d1_id(&t));
    let bearer = access_token(&app).await;
    let path = notify_path(MGID, &m.d1, &d1);
    let t1 = OffsetDateTime::now_utc();
    let t2 = t1 + Duration::from_millis(5);

    // The newer SUSPEND arrives first, the older RESUME afterwards: the older is ignored.
    let newer = event("evt_ooo_2", "STATUS_UPDATE", t2, &d1, "SUSPENDED");
    let older = event("evt_ooo_1", "STATUS_UPDATE", t1, &d1, "ACTIVE");
    assert_eq!(
        notify(&app, Some(&bearer), &path, &newer).await.status(),
        204
    );
    let suspended = get(&app, &m.key, &id).await;
    assert_eq!(suspended["status"], "SUSPENDED");
    assert_eq!(
        notify(&app, Some(&bearer), &path, &older).await.status(),
        204
    );
    assert_eq!(get(&app, &m.key, &id).await, suspended);

    // The simulator reordering its own deliveries: RESUME is delivered before SUSPEND.
    let d = delivered(&app).await;
    let c = tokenize(&app, &m.key, MASTERCARD).await;
    let (cid, cd1) = (self::id(&c), d1_id(&c));
    app.sim_faults(json!({"reorderNotifications": true})).await;
    assert_eq!(app.sim_event(&cd1, json!({"type": "SUSPEND"})).await, 200);
    assert_eq!(app.sim_event(&cd1, json!({"type": "RESUME"})).await, 200);
    wait_delivered(&app, d + 2, Duration::from_secs(2)).await;
    let c = get(&app, &m.key, &cid).await;
    assert_eq!(c["status"], "ACTIVE", "the late SUSPEND must not win: {c}");
}

// --- what must not get in ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_notifications_change_nothing() {
    let app = gateway(Backend::Redis).await;
    let m = merchant(&app).await;
    let t = tokenize(&app, &m.key, VISA).await;
    let (id, d1) = (id(&t), d1_id(&t));
    let path = notify_path(MGID, &m.d1, &d1);
    let now = OffsetDateTime::now_utc();
    let body = event("evt_forged_1", "STATUS_UPDATE", now, &d1, "SUSPENDED");

    // No bearer token.
    let r = notify(&app, None, &path, &body).await;
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"tokengate\""
    );
    expect_problem(r, 401, "unauthorized").await;
    // A made-up token, a well-formed one signed with another secret, a merchant API key.
    let other = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__NOTIFY__CLIENT_ID", CLIENT_ID)
        .env(
            "TOKENGATE__NOTIFY__CLIENT_SECRET",
            "another-secret-0123456789abcdef-0123456789",
        )
        .start()
        .await;
    let foreign = {
        let r = token_request(
            &other,
            Some((CLIENT_ID, "another-secret-0123456789abcdef-0123456789")),
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    for bad in [
        "garbage",
        "tgn1.99999999999.AAAA",
        foreign.as_str(),
        m.key.as_str(),
    ] {
        expect_problem(
            notify(&app, Some(bad), &path, &body).await,
            401,
            "unauthorized",
        )
        .await;
    }
    let bearer = access_token(&app).await;
    // Someone else's merchant gateway id.
    let wrong = notify_path("someone-else", &m.d1, &d1);
    expect_problem(
        notify(&app, Some(&bearer), &wrong, &body).await,
        404,
        "merchant_gateway_not_found",
    )
    .await;
    // Malformed bodies: 400 problem+json.
    for (bad, code) in [
        (
            json!({"eventType": "STATUS_UPDATE", "timestamp": rfc3339(now)}),
            "missing_field",
        ),
        (
            json!({"eventId": "e1", "eventType": "STATUS_UPDATE", "timestamp": "yesterday"}),
            "invalid_field",
        ),
        (
            json!({"eventId": "e 1", "eventType": "STATUS_UPDATE", "timestamp": rfc3339(now)}),
            "invalid_field",
        ),
        (
            json!({"eventId": "e2", "eventType": "STATUS_UPDATE", "timestamp": rfc3339(now), "tokenId": "other"}),
            "token_id_mismatch",
        ),
        (json!([1, 2]), "invalid_field"),
    ] {
        expect_problem(notify(&app, Some(&bearer), &path, &bad).await, 400, code).await;
    }
    let r = app
        .client
        .post(app.url(&path))
        .bearer_auth(&bearer)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_problem(r, 400, "malformed_json").await;
    let unchanged = get(&app, &m.key, &id).await;
    assert_eq!(unchanged["status"], "ACTIVE");
    assert_eq!(unchanged["updatedAt"], t["updatedAt"]);

    // Unknown merchant or token: acknowledged (D1 must not retry for ever), nothing changes.
    let unknown_merchant = notify_path(MGID, "NO-SUCH-MERCHANT", &d1);
    assert_eq!(
        notify(&app, Some(&bearer), &unknown_merchant, &body)
            .await
            .status(),
        204
    );
    let unknown_token = notify_path(MGID, &m.d1, "NO-SUCH-TOKEN");
    let b = event(
        "evt_unknown_tok",
        "STATUS_UPDATE",
        now,
        "NO-SUCH-TOKEN",
        "SUSPENDED",
    );
    assert_eq!(
        notify(&app, Some(&bearer), &unknown_token, &b)
            .await
            .status(),
        204
    );
    // An unknown event type: acknowledged, recorded, no change.
    let b = event("evt_new_kind", "TOKEN_TELEPORTED", now, &d1, "SUSPENDED");
    assert_eq!(notify(&app, Some(&bearer), &path, &b).await.status(), 204);
    let same = get(&app, &m.key, &id).await;
    assert_eq!(same["status"], "ACTIVE");
    assert_eq!(same["updatedAt"], t["updatedAt"]);
    // An unknown status value: kept as it is, never a 500.
    let b = event("evt_frozen", "STATUS_UPDATE", now, &d1, "FROZEN");
    assert_eq!(notify(&app, Some(&bearer), &path, &b).await.status(), 204);
    assert_eq!(get(&app, &m.key, &id).await["status"], "FROZEN");
    // And a known status again afterwards.
    let b = event(
        "evt_unfrozen",
        "STATUS_UPDATE",
        now + Duration::from_millis(1),
        &d1,
        "ACTIVE",
    );
    assert_eq!(notify(&app, Some(&bearer), &path, &b).await.status(), 204);
    assert_eq!(get(&app, &m.key, &id).await["status"], "ACTIVE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_without_credentials_when_auth_is_not_required() {
    let app = TestApp::builder(Backend::Embedded)
        .env("TOKENGATE__NOTIFY__REQUIRE_AUTH", "false")
        .start()
        .await;
    let m = merchant(&app).await;
    let t = tokenize(&app, &m.key, VISA).await;
    let d1 = d1_id(&t);
    let path = notify_path(MGID, &m.d1, &d1);
    let body = event(
        "evt_open_1",
        "STATUS_UPDATE",
        OffsetDateTime::now_utc(),
        &d1,
        "SUSPENDED",
    );
    // A token that is sent is still checked (and none can be valid: no credentials exist).
    expect_problem(
        notify(&app, Some("garbage"), &path, &body).await,
        401,
        "unauthorized",
    )
    .await;
    let r = token_request(&app, Some(("x", "y")), "grant_type=client_credentials").await;
    assert_eq!(r.status(), 401);
    assert_eq!(notify(&app, None, &path, &body).await.status(), 204);
    assert_eq!(get(&app, &m.key, &id(&t)).await["status"], "SUSPENDED");
    // The simulator's own notifications (sent without a token) are accepted too.
    assert_eq!(app.sim_event(&d1, json!({"type": "RESUME"})).await, 200);
    wait_status(&app, &m.key, &id(&t), "ACTIVE", Duration::from_secs(1)).await;
}

// --- asynchronous tokenization and reconciliation ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_tokenization_is_completed_by_token_created() {
    let app = gateway(Backend::Redis).await;
    let m = merchant(&app).await;
    app.sim_faults(json!({"asyncTokenization": true})).await;
    let t = tokenize(&app, &m.key, VISA).await;
    assert_eq!(t["status"], "PENDING", "{t}");
    let id = id(&t);
    let done = wait_status(&app, &m.key, &id, "ACTIVE", Duration::from_secs(2)).await;
    let nt = &done["networkToken"];
    assert!(nt["id"].as_str().is_some_and(|s| !s.is_empty()), "{done}");
    assert_eq!(nt["last4"].as_str().unwrap().len(), 4);
    assert!(nt["expiryYear"].as_u64().is_some() && nt["par"].as_str().is_some());
    // Usable at once.
    let c = app
        .post(
            &format!("/v1/tokens/{id}/cryptograms"),
            &m.key,
            &json!({"transactionType": "CIT"}),
        )
        .await;
    assert_eq!(c.status(), 201);
}

/// Our token ids in the store (Redis), to find a reservation whose creation answered an error.
async fn stored_token_ids(url: &str, merchant: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("tg:{{m:{merchant}}}:tok:*"))
        .query_async(&mut con)
        .await
        .unwrap();
    keys.iter()
        .map(|k| k.rsplit(':').next().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_created_is_matched_by_request_id_when_we_never_learnt_the_d1_id() {
    let app = with_credentials(Backend::Redis)
        .env("TOKENGATE__D1__CALL_TIMEOUT_MS", "500")
        .start()
        .await;
    let url = app.redis.as_ref().unwrap().url();
    let m = merchant(&app).await;
    // D1 answers too late: the reservation stays PENDING without a D1 token id.
    app.sim_faults(json!({"latency": {"fixedMs": 1500}, "operations": ["createToken"]}))
        .await;
    expect_problem(app.tokenize(&m.key, VISA).await, 504, "d1_timeout").await;
    app.sim_faults(json!({})).await;
    let ids = stored_token_ids(&url, &m.id).await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids[0].clone();
    let pending = get(&app, &m.key, &id).await;
    assert_eq!(pending["status"], "PENDING");
    assert!(pending["networkToken"].is_null());

    // TOKEN_CREATED names a D1 token we never stored: matched through requestId (our id).
    let bearer = access_token(&app).await;
    let mut body = event(
        "evt_created_1",
        "TOKEN_CREATED",
        OffsetDateTime::now_utc(),
        "D1-LATE",
        "ACTIVE",
    );
    body["requestId"] = json!(id);
    body["tokenLastDigits"] = json!("1234");
    body["tokenExpiryDate"] = json!("1230");
    body["par"] = json!("PARLATE1");
    let r = notify(
        &app,
        Some(&bearer),
        &notify_path(MGID, &m.d1, "D1-LATE"),
        &body,
    )
    .await;
    assert_eq!(r.status(), 204);
    let done = get(&app, &m.key, &id).await;
    assert_eq!(done["status"], "ACTIVE", "{done}");
    assert_eq!(done["networkToken"]["id"], "D1-LATE");
    assert_eq!(done["networkToken"]["last4"], "1234");
    assert_eq!(done["networkToken"]["expiryMonth"], 12);
    assert_eq!(done["networkToken"]["expiryYear"], 2030);
    assert_eq!(done["networkToken"]["par"], "PARLATE1");

    // Once bound, another D1 token claiming the same request id is refused (recorded, 204).
    let mut other = event(
        "evt_created_2",
        "TOKEN_CREATED",
        OffsetDateTime::now_utc(),
        "D1-OTHER",
        "ACTIVE",
    );
    other["requestId"] = json!(id);
    let r = notify(
        &app,
        Some(&bearer),
        &notify_path(MGID, &m.d1, "D1-OTHER"),
        &other,
    )
    .await;
    assert_eq!(r.status(), 204);
    assert_eq!(get(&app, &m.key, &id).await, done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_repairs_what_notifications_did_not_bring() {
    let app = with_credentials(Backend::Redis)
        .env("TOKENGATE__RECONCILE__INTERVAL_MS", "200")
        .env("TOKENGATE__RECONCILE__STALE_AFTER_S", "0")
        .env("TOKENGATE__RECONCILE__PENDING_GRACE_S", "0")
        .start()
        .await;
    let m = merchant(&app).await;
    let t = tokenize(&app, &m.key, VISA).await;
    let (id, d1) = (id(&t), d1_id(&t));
    // The simulator now holds each notification back for 5 s: for the gateway it is lost
    // until then, and only reconciliation can learn the new state earlier.
    app.sim_faults(json!({"reorderNotifications": true})).await;
    let d = delivered(&app).await;
    let started = Instant::now();
    assert_eq!(app.sim_event(&d1, json!({"type": "SUSPEND"})).await, 200);
    wait_status(&app, &m.key, &id, "SUSPENDED", Duration::from_secs(3)).await;
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        delivered(&app).await,
        d,
        "repaired before the notification arrived"
    );

    // Reconciliation does not disturb ordering: RESUME releases the held SUSPEND, which comes
    // after it and is ignored as older.
    assert_eq!(app.sim_event(&d1, json!({"type": "RESUME"})).await, 200);
    wait_delivered(&app, d + 2, Duration::from_secs(2)).await;
    wait_status(&app, &m.key, &id, "ACTIVE", Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&app, &m.key, &id).await["status"], "ACTIVE");

    // A PENDING token whose TOKEN_CREATED is held back is completed the same way.
    app.sim_faults(json!({"reorderNotifications": true, "asyncTokenization": true}))
        .await;
    let p = tokenize(&app, &m.key, MASTERCARD).await;
    assert_eq!(p["status"], "PENDING");
    let pid = self::id(&p);
    let done = wait_status(&app, &m.key, &pid, "ACTIVE", Duration::from_secs(3)).await;
    assert_eq!(done["networkToken"]["last4"].as_str().unwrap().len(), 4);
    assert_eq!(
        delivered(&app).await,
        d + 2,
        "TOKEN_CREATED is still held back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reconciliation_a_held_notification_is_only_late() {
    // The control for the test above: the same held notification, reconciliation off.
    let app = with_credentials(Backend::Embedded)
        .env("TOKENGATE__RECONCILE__ENABLED", "false")
        .start()
        .await;
    let m = merchant(&app).await;
    let t = tokenize(&app, &m.key, VISA).await;
    let (id, d1) = (id(&t), d1_id(&t));
    app.sim_faults(json!({"reorderNotifications": true})).await;
    assert_eq!(app.sim_event(&d1, json!({"type": "SUSPEND"})).await, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(get(&app, &m.key, &id).await["status"], "ACTIVE");
    wait_status(&app, &m.key, &id, "SUSPENDED", Duration::from_secs(4)).await;
}

// --- two instances, one Redis ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_apply_each_event_once() {
    let server = RedisServer::start();
    let url = server.url();
    // Same credentials (so tokens verify across instances), same development vault keys;
    // reconciliation off so only the events below change the token.
    let instance = || {
        with_credentials(Backend::Embedded)
            .env("TOKENGATE__STORAGE__REDIS_URL", &url)
            .env("TOKENGATE__RECONCILE__ENABLED", "false")
            .start()
    };
    let a = instance().await;
    let b = instance().await;
    let m = merchant(&a).await;
    let t = tokenize(&a, &m.key, VISA).await;
    let (id, d1) = (id(&t), d1_id(&t));
    // Both see the same data.
    assert_eq!(get(&b, &m.key, &id).await["status"], "ACTIVE");
    // A token from one instance is accepted by the other (stateless tokens).
    let bearer = access_token(&a).await;
    let path = notify_path(MGID, &m.d1, &d1);
    let v0 = redis_version(&url, &m.id, &id).await;

    // The same event delivered to both instances at once, 20 times over.
    let base = OffsetDateTime::now_utc();
    let mut bodies = Vec::new();
    for i in 0..20u64 {
        let status = if i % 2 == 0 { "SUSPENDED" } else { "ACTIVE" };
        let body = event(
            &format!("evt_twin_{i}"),
            "STATUS_UPDATE",
            base + Duration::from_millis(i),
            &d1,
            status,
        );
        let (ra, rb) = tokio::join!(
            notify(&a, Some(&bearer), &path, &body),
            notify(&b, Some(&bearer), &path, &body)
        );
        assert_eq!((ra.status().as_u16(), rb.status().as_u16()), (204, 204));
        assert_eq!(get(&a, &m.key, &id).await["status"], status);
        bodies.push(body);
    }
    assert_eq!(redis_version(&url, &m.id, &id).await, v0 + 20);
    // Replays to either instance change nothing.
    for body in &bodies {
        assert_eq!(notify(&b, Some(&bearer), &path, body).await.status(), 204);
    }
    assert_eq!(redis_version(&url, &m.id, &id).await, v0 + 20);

    // Two different events racing on the two instances: the newer one's state wins, whatever
    // the arrival order.
    for round in 0..10u64 {
        let t0 = OffsetDateTime::now_utc() + Duration::from_secs(1);
        let (old_s, new_s) = if round % 2 == 0 {
            ("ACTIVE", "SUSPENDED")
        } else {
            ("SUSPENDED", "ACTIVE")
        };
        let older = event(
            &format!("evt_race_old_{round}"),
            "STATUS_UPDATE",
            t0,
            &d1,
            old_s,
        );
        let newer = event(
            &format!("evt_race_new_{round}"),
            "STATUS_UPDATE",
            t0 + Duration::from_millis(1),
            &d1,
            new_s,
        );
        let (ra, rb) = tokio::join!(
            notify(&a, Some(&bearer), &path, &older),
            notify(&b, Some(&bearer), &path, &newer)
        );
        assert_eq!((ra.status().as_u16(), rb.status().as_u16()), (204, 204));
        assert_eq!(get(&b, &m.key, &id).await["status"], new_s, "round {round}");
    }
    drop((a, b));
}

// --- the LifecycleStore contract on every backend ----------------------------------------------

mod store {
    use std::sync::Arc;
    use std::time::Duration;

    use time::OffsetDateTime;
    use tokengate::domain::ports::lifecycle::{EventWrite, LifecycleStore};
    use tokengate::domain::ports::{InsertOutcome, StoreError, TokenStore};
    use tokengate::domain::token::{
        CardMeta, Fingerprints, MerchantId, NetworkTokenMeta, SealedPan, TokenId, TokenRecord,
        TokenStatus, Usage,
    };

    use tokengate_cards::{Brand, Expiry};

    const HOUR: Duration = Duration::from_secs(3600);

    fn record(m: &MerchantId) -> TokenRecord {
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
                expiry: Expiry::trusted(12, 2030).unwrap(),
            },
            network_token: Some(NetworkTokenMeta {
                d1_token_id: format!("D1-{}", uuid::Uuid::new_v4().simple()),
                last4: Some("9999".into()),
                expiry: Expiry::trusted(1, 2031),
                par: None,
            }),
            customer_reference: None,
            sealed_pan: SealedPan {
                key_id: "k1".into(),
                blob: vec![1, 2, 3],
            },
            fingerprints: Fingerprints {
                pan: uuid::Uuid::new_v4().simple().to_string(),
                pan_expiry: "e".into(),
                previous: Vec::new(),
            },
            created_at: now,
            updated_at: now,
            last_event_at: None,
            recurring_agreement: None,
            version: 1,
        }
    }

    fn next(r: &TokenRecord, status: TokenStatus) -> TokenRecord {
        let mut n = r.clone();
        n.version += 1;
        n.status = status;
        n
    }

    async fn inserted<S: TokenStore>(s: &S) -> TokenRecord {
        let r = record(&MerchantId::generate());
        assert!(matches!(
            s.insert_token(&r).await.unwrap(),
            InsertOutcome::Inserted
        ));
        r
    }

    crate::store_tests!(by_arc:
        apply_event_writes_token_and_marker_once,
        apply_event_conflict_and_missing_write_no_marker,
        concurrent_deliveries_of_one_event_apply_once,
        marks_are_per_merchant_and_expire,
        schedule_orders_moves_and_forgets,
        leases_exclude_others_until_released_or_expired,
    );

    async fn apply_event_writes_token_and_marker_once<S: TokenStore + LifecycleStore>(s: Arc<S>) {
        let r = inserted(&*s).await;
        let m = &r.merchant_id;
        assert!(!s.event_seen(m, "evt-1").await.unwrap());
        let mut n = next(&r, TokenStatus::Suspended);
        // A new D1 id moves the D1 index, exactly like update_token.
        n.network_token.as_mut().unwrap().d1_token_id = "D1-moved".into();
        assert_eq!(
            s.apply_event(&n, "evt-1", HOUR).await.unwrap(),
            EventWrite::Applied
        );
        assert!(s.event_seen(m, "evt-1").await.unwrap());
        assert_eq!(s.get_token(m, &r.id).await.unwrap(), Some(n.clone()));
        assert_eq!(
            s.find_by_d1_token(m, "D1-moved").await.unwrap(),
            Some(n.clone())
        );
        let old_d1 = &r.network_token.as_ref().unwrap().d1_token_id;
        assert_eq!(s.find_by_d1_token(m, old_d1).await.unwrap(), None);
        // The same event again, even with a version that would fit: nothing written.
        let again = next(&n, TokenStatus::Active);
        assert_eq!(
            s.apply_event(&again, "evt-1", HOUR).await.unwrap(),
            EventWrite::Duplicate
        );
        assert_eq!(s.get_token(m, &r.id).await.unwrap(), Some(n.clone()));
        // Another event applies; DELETED drops the fingerprint index as update_token does.
        let del = next(&n, TokenStatus::Deleted);
        assert_eq!(
            s.apply_event(&del, "evt-2", HOUR).await.unwrap(),
            EventWrite::Applied
        );
        assert_eq!(
            s.find_by_fingerprint(m, &r.fingerprints.pan).await.unwrap(),
            None
        );
        // mark_event on an event already applied reports it was there.
        assert!(!s.mark_event(m, "evt-2", HOUR).await.unwrap());
    }

    async fn apply_event_conflict_and_missing_write_no_marker<S: TokenStore + LifecycleStore>(
        s: Arc<S>,
    ) {
        let r = inserted(&*s).await;
        let m = &r.merchant_id;
        let mut stale = next(&r, TokenStatus::Suspended);
        stale.version = 7;
        assert!(matches!(
            s.apply_event(&stale, "evt-c", HOUR).await,
            Err(StoreError::Conflict)
        ));
        assert!(
            !s.event_seen(m, "evt-c").await.unwrap(),
            "no marker on conflict"
        );
        // The retry with the right version applies.
        assert_eq!(
            s.apply_event(&next(&r, TokenStatus::Suspended), "evt-c", HOUR)
                .await
                .unwrap(),
            EventWrite::Applied
        );
        let ghost = next(&record(m), TokenStatus::Active);
        assert!(matches!(
            s.apply_event(&ghost, "evt-g", HOUR).await,
            Err(StoreError::NotFound)
        ));
        assert!(!s.event_seen(m, "evt-g").await.unwrap());
    }

    async fn concurrent_deliveries_of_one_event_apply_once<S: TokenStore + LifecycleStore>(
        s: Arc<S>,
    ) {
        let r = inserted(&*s).await;
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let s = s.clone();
            let n = next(&r, TokenStatus::Suspended);
            tasks.push(tokio::spawn(async move {
                s.apply_event(&n, "evt-many", HOUR).await
            }));
        }
        let mut applied = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(EventWrite::Applied) => applied += 1,
                Ok(EventWrite::Duplicate) | Err(StoreError::Conflict) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(applied, 1);
        let stored = s.get_token(&r.merchant_id, &r.id).await.unwrap().unwrap();
        assert_eq!(stored.version, r.version + 1);
    }

    async fn marks_are_per_merchant_and_expire<S: TokenStore + LifecycleStore>(s: Arc<S>) {
        let (m1, m2) = (MerchantId::generate(), MerchantId::generate());
        assert!(s.mark_event(&m1, "evt-x", HOUR).await.unwrap());
        assert!(!s.mark_event(&m1, "evt-x", HOUR).await.unwrap());
        assert!(!s.event_seen(&m2, "evt-x").await.unwrap());
        assert!(s.mark_event(&m2, "evt-x", HOUR).await.unwrap());
        assert!(
            s.mark_event(&m1, "evt-short", Duration::from_millis(50))
                .await
                .unwrap()
        );
        assert!(s.event_seen(&m1, "evt-short").await.unwrap());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(!s.event_seen(&m1, "evt-short").await.unwrap());
        assert!(s.mark_event(&m1, "evt-short", HOUR).await.unwrap());
    }

    async fn schedule_orders_moves_and_forgets<S: TokenStore + LifecycleStore>(s: Arc<S>) {
        // The schedule is shared by the deployment: start from what is due now (nothing).
        let far = u64::MAX / 4;
        assert!(s.due_checks(1_000, 10).await.unwrap().is_empty());
        let m = MerchantId::generate();
        let (a, b, c) = (
            TokenId::generate(),
            TokenId::generate(),
            TokenId::generate(),
        );
        s.schedule_check(&m, &a, 300).await.unwrap();
        s.schedule_check(&m, &b, 100).await.unwrap();
        s.schedule_check(&m, &c, far).await.unwrap();
        let due = s.due_checks(1_000, 10).await.unwrap();
        assert_eq!(due, vec![(m.clone(), b.clone()), (m.clone(), a.clone())]);
        assert_eq!(
            s.due_checks(1_000, 1).await.unwrap(),
            vec![(m.clone(), b.clone())]
        );
        assert!(s.due_checks(99, 10).await.unwrap().is_empty());
        // Rescheduling moves the one entry, it does not add a second.
        s.schedule_check(&m, &b, 200_000).await.unwrap();
        assert_eq!(
            s.due_checks(1_000, 10).await.unwrap(),
            vec![(m.clone(), a.clone())]
        );
        assert_eq!(
            s.due_checks(300_000, 10).await.unwrap(),
            vec![(m.clone(), a.clone()), (m.clone(), b.clone())]
        );
        s.unschedule_check(&m, &a).await.unwrap();
        s.unschedule_check(&m, &a).await.unwrap();
        assert_eq!(
            s.due_checks(300_000, 10).await.unwrap(),
            vec![(m.clone(), b.clone())]
        );
        assert_eq!(s.due_checks(far, 10).await.unwrap().len(), 2);
    }

    async fn leases_exclude_others_until_released_or_expired<S: TokenStore + LifecycleStore>(
        s: Arc<S>,
    ) {
        let ttl = Duration::from_secs(30);
        assert!(s.acquire_lease("job", "a", ttl).await.unwrap());
        assert!(!s.acquire_lease("job", "b", ttl).await.unwrap());
        assert!(
            s.acquire_lease("job", "a", ttl).await.unwrap(),
            "the holder extends"
        );
        assert!(s.acquire_lease("other-job", "b", ttl).await.unwrap());
        s.release_lease("job", "b").await.unwrap();
        assert!(
            !s.acquire_lease("job", "b", ttl).await.unwrap(),
            "not b's to release"
        );
        s.release_lease("job", "a").await.unwrap();
        assert!(
            s.acquire_lease("job", "b", Duration::from_millis(50))
                .await
                .unwrap()
        );
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(
            s.acquire_lease("job", "a", ttl).await.unwrap(),
            "expired: free again"
        );
    }
}
