//! Scoped API keys, card reveal and the audit trail, on both backends: scopes are enforced per
//! route, reveal is opt-in and audited, audit events page with a cursor, revocation takes
//! effect, tenants are isolated, and the revealed PAN leaks neither to logs nor to the store.

use std::process::Command;

use reqwest::Response;
use serde_json::{Value, json};

use crate::support::app::{ADMIN, Backend, TestApp, expect_problem};
use crate::support::captured_logs;
use crate::support::redis_server::RedisServer;

/// A PAN used only by this file, so other tests' traffic cannot mask (or cause) a leak.
const PAN: &str = "5555555555554444";

async fn app(b: Backend) -> TestApp {
    TestApp::builder(b)
        .env("TOKENGATE__D1__CALL_TIMEOUT_MS", "1500")
        // Revocation is then effective at once on this instance's next request.
        .env("TOKENGATE__AUTH__API_KEY_CACHE_TTL_MS", "0")
        .start()
        .await
}

/// Creates a key with `scopes`; returns (id, secret).
async fn new_key(app: &TestApp, key: &str, name: &str, scopes: &[&str]) -> (String, String) {
    let r = app
        .post(
            "/v1/api-keys",
            key,
            &json!({"name": name, "scopes": scopes}),
        )
        .await;
    assert_eq!(r.status(), 201, "create key {name}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["name"], name);
    assert_eq!(v["lastUsedAt"], Value::Null);
    assert_eq!(v["scopes"], json!(scopes));
    assert!(v["id"].as_str().unwrap().starts_with("key_"), "{v}");
    (
        v["id"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    key: &str,
    rid: &str,
) -> Response {
    app.client
        .request(method, app.url(path))
        .bearer_auth(key)
        .header("x-request-id", rid)
        // What a cryptogram needs; the other routes here take no body and ignore it.
        .json(&json!({"transactionType": "CIT"}))
        .send()
        .await
        .unwrap()
}

async fn audit_page(app: &TestApp, key: &str, query: &str) -> Value {
    let r = app.get(&format!("/v1/audit-events{query}"), key).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn all_audit(app: &TestApp, key: &str) -> Vec<Value> {
    audit_page(app, key, "?limit=100").await["data"]
        .as_array()
        .unwrap()
        .clone()
}

fn find<'a>(events: &'a [Value], action: &str, request_id: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["action"] == action && e["requestId"] == request_id)
        .unwrap_or_else(|| panic!("no {action} event for {request_id} in {events:?}"))
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

async fn scopes_reveal_and_audit(b: Backend) {
    let app = app(b).await;
    let (merchant_id, admin_key) = app.create_merchant("Acme").await;
    let t: Value = app.tokenize(&admin_key, PAN).await.json().await.unwrap();
    assert_eq!(t["status"], "ACTIVE", "{t}");
    let tok = t["id"].as_str().unwrap().to_owned();

    // The key issued with the merchant has every scope except card:reveal.
    let keys: Value = app
        .get("/v1/api-keys", &admin_key)
        .await
        .json()
        .await
        .unwrap();
    let first = &keys["data"][0];
    assert_eq!(keys["data"].as_array().unwrap().len(), 1, "{keys}");
    let first_id = first["id"].as_str().unwrap().to_owned();
    let scopes: Vec<&str> = first["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(!scopes.contains(&"card:reveal"), "{scopes:?}");
    assert!(scopes.contains(&"keys") && scopes.contains(&"audit:read"));
    let p = expect_problem(
        send(
            &app,
            reqwest::Method::POST,
            &format!("/v1/tokens/{tok}/reveal"),
            &admin_key,
            "rid-default-reveal",
        )
        .await,
        403,
        "insufficient_scope",
    )
    .await;
    assert!(!p.to_string().contains(PAN));

    // A billing engine's key: cryptograms only.
    let (billing_id, billing) = new_key(&app, &admin_key, "billing-engine", &["cryptograms"]).await;
    let r = send(
        &app,
        reqwest::Method::POST,
        &format!("/v1/tokens/{tok}/cryptograms"),
        &billing,
        "rid-crypto-1",
    )
    .await;
    assert_eq!(r.status(), 201);
    expect_problem(app.tokenize(&billing, PAN).await, 403, "insufficient_scope").await;
    expect_problem(
        app.get(&format!("/v1/tokens/{tok}"), &billing).await,
        403,
        "insufficient_scope",
    )
    .await;
    expect_problem(
        send(
            &app,
            reqwest::Method::POST,
            &format!("/v1/tokens/{tok}/reveal"),
            &billing,
            "rid-billing-reveal",
        )
        .await,
        403,
        "insufficient_scope",
    )
    .await;
    expect_problem(
        app.get("/v1/audit-events", &billing).await,
        403,
        "insufficient_scope",
    )
    .await;
    expect_problem(
        app.get("/v1/api-keys", &billing).await,
        403,
        "insufficient_scope",
    )
    .await;

    // A key with card:reveal gets the card, uncached, and the reveal is audited.
    let (reveal_id, reveal) = new_key(&app, &admin_key, "pan-fallback", &["card:reveal"]).await;
    let r = send(
        &app,
        reqwest::Method::POST,
        &format!("/v1/tokens/{tok}/reveal"),
        &reveal,
        "rid-reveal-1",
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["content-type"], "application/json");
    let card: Value = r.json().await.unwrap();
    assert_eq!(
        card,
        json!({"number": PAN, "expiryMonth": 12, "expiryYear": 2030})
    );

    // A refused cryptogram on a suspended token is recorded with its problem code.
    let r = send(
        &app,
        reqwest::Method::POST,
        &format!("/v1/tokens/{tok}/suspend"),
        &admin_key,
        "rid-suspend",
    )
    .await;
    assert_eq!(r.status(), 200);
    expect_problem(
        send(
            &app,
            reqwest::Method::POST,
            &format!("/v1/tokens/{tok}/cryptograms"),
            &billing,
            "rid-crypto-2",
        )
        .await,
        409,
        "token_suspended",
    )
    .await;
    // A deleted token's card is not revealed.
    let r = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/tokens/{tok}"),
        &admin_key,
        "rid-delete",
    )
    .await;
    assert_eq!(r.status(), 200);
    expect_problem(
        send(
            &app,
            reqwest::Method::POST,
            &format!("/v1/tokens/{tok}/reveal"),
            &reveal,
            "rid-reveal-2",
        )
        .await,
        409,
        "token_deleted",
    )
    .await;

    let events = all_audit(&app, &admin_key).await;
    let e = find(&events, "card.reveal", "rid-reveal-1");
    assert_eq!(e["actor"], reveal_id.as_str());
    assert_eq!(e["tokenId"], tok.as_str());
    assert_eq!(e["merchantId"], merchant_id.as_str());
    assert_eq!(e["outcome"], "success");
    assert!(e["id"].as_str().unwrap().starts_with("aud_") && e["at"].is_string());
    let e = find(&events, "card.reveal", "rid-billing-reveal");
    assert_eq!(
        (e["actor"].as_str(), e["outcome"].as_str()),
        (Some(billing_id.as_str()), Some("insufficient_scope"))
    );
    assert_eq!(e["tokenId"], tok.as_str());
    assert_eq!(
        find(&events, "card.reveal", "rid-default-reveal")["actor"],
        first_id.as_str()
    );
    assert_eq!(
        find(&events, "card.reveal", "rid-reveal-2")["outcome"],
        "token_deleted"
    );
    let e = find(&events, "cryptogram.create", "rid-crypto-1");
    assert_eq!(
        (e["actor"].as_str(), e["outcome"].as_str()),
        (Some(billing_id.as_str()), Some("success"))
    );
    assert_eq!(
        find(&events, "cryptogram.create", "rid-crypto-2")["outcome"],
        "token_suspended"
    );
    assert_eq!(
        find(&events, "token.suspend", "rid-suspend")["outcome"],
        "success"
    );
    assert_eq!(
        find(&events, "token.delete", "rid-delete")["actor"],
        first_id.as_str()
    );
    // Key creations name the key created (`keyId`), apart from the key that acted (`actor`).
    let mut created: Vec<&str> = events
        .iter()
        .filter(|e| e["action"] == "api_key.create")
        .map(|e| {
            assert_eq!(e["actor"], first_id.as_str(), "{e}");
            assert_eq!(e["outcome"], "success", "{e}");
            assert!(e.get("tokenId").is_none_or(Value::is_null), "{e}");
            e["keyId"].as_str().unwrap()
        })
        .collect();
    created.sort_unstable();
    let mut expected = vec![billing_id.as_str(), reveal_id.as_str()];
    expected.sort_unstable();
    assert_eq!(created, expected);
    // Events about tokens carry no `keyId`.
    assert!(
        find(&events, "card.reveal", "rid-reveal-1")
            .get("keyId")
            .is_none(),
        "keyId only on API key events"
    );
    let m = events
        .iter()
        .find(|e| e["action"] == "merchant.create")
        .expect("merchant.create");
    assert_eq!(m["actor"], "admin");
    // Newest first: the merchant's creation is the oldest event.
    assert_eq!(events.last().unwrap()["action"], "merchant.create");

    // lastUsedAt is set once a key is used (written off the request path).
    let mut used = Value::Null;
    for _ in 0..50 {
        let keys: Value = app
            .get("/v1/api-keys", &admin_key)
            .await
            .json()
            .await
            .unwrap();
        used = keys["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == billing_id.as_str())
            .unwrap()["lastUsedAt"]
            .clone();
        if used.is_string() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(used.is_string(), "lastUsedAt of a used key: {used}");

    // The PAN went out in one response body only: not in the logs, not in the store.
    let logs = captured_logs();
    assert!(!logs.is_empty());
    assert!(!logs.contains(PAN), "PAN found in logs");
    assert!(!logs.contains(&reveal), "API key secret found in logs");
    let data_dir = app.data_dir.clone();
    let (_tmp, redis) = app.stop().await;
    let raw = match b {
        Backend::Embedded => std::fs::read(data_dir.join("tokengate.redb")).unwrap(),
        Backend::Redis => {
            let server = redis.unwrap();
            redis_cli(&server, &["CONFIG", "SET", "rdbcompression", "no"]);
            assert_eq!(redis_cli(&server, &["SAVE"]), "OK");
            std::fs::read(server.dir().join("dump.rdb")).unwrap()
        }
        Backend::RedisCluster => unreachable!("this test runs on embedded and standalone Redis"),
    };
    assert!(raw.len() > 1000, "store dump is suspiciously small");
    // The audit trail really is in the store (the dump is not empty of it).
    assert!(
        raw.windows(b"rid-reveal-1".len())
            .any(|w| w == b"rid-reveal-1"),
        "audit event stored"
    );
    assert!(
        !raw.windows(PAN.len()).any(|w| w == PAN.as_bytes()),
        "PAN stored in clear"
    );
    assert!(
        !raw.windows(reveal.len()).any(|w| w == reveal.as_bytes()),
        "API key secret stored in clear"
    );
}

async fn audit_pages_with_a_cursor(b: Backend) {
    let app = app(b).await;
    let (_, key) = app.create_merchant("Pager").await;
    // 1 merchant.create + 5 refused cryptograms (unknown token) = 6 events.
    for i in 0..5 {
        let r = send(
            &app,
            reqwest::Method::POST,
            "/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA/cryptograms",
            &key,
            &format!("rid-page-{i}"),
        )
        .await;
        assert_eq!(r.status(), 404);
    }
    let mut seen = Vec::new();
    let mut query = "?limit=4".to_owned();
    let mut pages = 0;
    loop {
        let page = audit_page(&app, &key, &query).await;
        pages += 1;
        for e in page["data"].as_array().unwrap() {
            seen.push(e.clone());
        }
        match page["nextCursor"].as_str() {
            Some(c) => query = format!("?limit=4&cursor={c}"),
            None => break,
        }
        assert!(pages < 5, "pagination does not end");
    }
    assert_eq!(pages, 2);
    let rids: Vec<&str> = seen
        .iter()
        .map(|e| e["requestId"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        rids[..5],
        [
            "rid-page-4",
            "rid-page-3",
            "rid-page-2",
            "rid-page-1",
            "rid-page-0"
        ],
        "newest first"
    );
    assert_eq!(seen.len(), 6);
    assert_eq!(seen[5]["action"], "merchant.create");
    assert!(seen[..5].iter().all(|e| e["outcome"] == "token_not_found"));
    let ids: std::collections::HashSet<&str> =
        seen.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 6, "no event twice across pages");
    // The oldest possible cursor: an empty last page (Redis refuses `(0-0` as a range end).
    let page = audit_page(&app, &key, "?cursor=aud_0-0").await;
    assert_eq!(page, json!({"data": [], "nextCursor": null}));
    expect_problem(
        app.get("/v1/audit-events?cursor=nonsense", &key).await,
        422,
        "invalid_cursor",
    )
    .await;
    expect_problem(
        app.get("/v1/audit-events?limit=0", &key).await,
        400,
        "invalid_query",
    )
    .await;
}

async fn revoked_keys_stop_working_and_tenants_are_isolated(b: Backend) {
    let app = app(b).await;
    let (_, a_key) = app.create_merchant("A").await;
    let (_, b_key) = app.create_merchant("B").await;
    let (a_reader_id, a_reader) = new_key(&app, &a_key, "reader", &["tokens:read"]).await;
    let r = app
        .get("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA", &a_reader)
        .await;
    assert_eq!(r.status(), 404, "works before revocation");

    // Another merchant cannot see or revoke A's keys, nor read A's audit trail.
    let b_keys: Value = app.get("/v1/api-keys", &b_key).await.json().await.unwrap();
    assert!(!b_keys.to_string().contains(&a_reader_id), "{b_keys}");
    let r = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/api-keys/{a_reader_id}"),
        &b_key,
        "rid-b-revoke",
    )
    .await;
    expect_problem(r, 404, "api_key_not_found").await;
    let r = app
        .get("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA", &a_reader)
        .await;
    assert_eq!(
        r.status(),
        404,
        "still works after another merchant's attempt"
    );
    let b_events = all_audit(&app, &b_key).await;
    assert!(b_events.iter().all(|e| e["merchantId"] != Value::Null));
    let a_events = all_audit(&app, &a_key).await;
    let a_mid = a_events[0]["merchantId"].clone();
    assert!(
        b_events.iter().all(|e| e["merchantId"] != a_mid),
        "{b_events:?}"
    );
    assert!(
        !b_events.iter().any(|e| e["action"] == "api_key.create"),
        "A's key creation is not in B's trail"
    );
    assert!(a_events.iter().any(|e| e["action"] == "api_key.create"));
    // B's refused revocation is in B's trail, not A's, naming the key B asked for.
    let e = find(&b_events, "api_key.revoke", "rid-b-revoke");
    assert_eq!(e["outcome"], "api_key_not_found");
    assert_eq!(e["keyId"], a_reader_id.as_str());

    // A revokes the reader: it stops working (cache TTL 0 here).
    let r = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/api-keys/{a_reader_id}"),
        &a_key,
        "rid-a-revoke",
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["revokedAt"].is_string(), "{v}");
    expect_problem(
        app.get("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA", &a_reader)
            .await,
        401,
        "unauthorized",
    )
    .await;
    let a_events = all_audit(&app, &a_key).await;
    let e = find(&a_events, "api_key.revoke", "rid-a-revoke");
    assert_eq!(e["outcome"], "success");
    assert_eq!(
        e["keyId"],
        a_reader_id.as_str(),
        "the revoked key, not the actor"
    );
    assert_ne!(e["actor"], a_reader_id.as_str());
    // A key without the `keys` scope is refused, and the refusal names the key it aimed at.
    let (_, a_reader2) = new_key(&app, &a_key, "reader-2", &["tokens:read"]).await;
    let r = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/api-keys/{a_reader_id}"),
        &a_reader2,
        "rid-scope-revoke",
    )
    .await;
    expect_problem(r, 403, "insufficient_scope").await;
    let r = send(
        &app,
        reqwest::Method::DELETE,
        "/v1/api-keys/not-a-key-id",
        &a_key,
        "rid-junk-revoke",
    )
    .await;
    expect_problem(r, 404, "api_key_not_found").await;
    let a_events = all_audit(&app, &a_key).await;
    let e = find(&a_events, "api_key.revoke", "rid-scope-revoke");
    assert_eq!(e["outcome"], "insufficient_scope");
    assert_eq!(e["keyId"], a_reader_id.as_str());
    let e = find(&a_events, "api_key.revoke", "rid-junk-revoke");
    assert!(
        e.get("keyId").is_none(),
        "only well-formed key ids are recorded: {e}"
    );

    // Revoking the merchant's own (first) key works too, and it stops working.
    let keys: Value = app.get("/v1/api-keys", &a_key).await.json().await.unwrap();
    let own = keys["data"][0]["id"].as_str().unwrap().to_owned();
    assert_ne!(own, a_reader_id);
    let r = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/api-keys/{own}"),
        &a_key,
        "rid-self",
    )
    .await;
    assert_eq!(r.status(), 200);
    expect_problem(app.get("/v1/api-keys", &a_key).await, 401, "unauthorized").await;
    // B is unaffected.
    assert_eq!(app.get("/v1/api-keys", &b_key).await.status(), 200);
}

async fn bad_key_requests_are_refused(b: Backend) {
    let app = app(b).await;
    let (_, key) = app.create_merchant("V").await;
    for body in [
        json!({"name": "x", "scopes": ["tokens:admin"]}),
        json!({"name": "x", "scopes": []}),
    ] {
        expect_problem(
            app.post("/v1/api-keys", &key, &body).await,
            422,
            "invalid_scopes",
        )
        .await;
    }
    expect_problem(
        app.post(
            "/v1/api-keys",
            &key,
            &json!({"name": " ", "scopes": ["keys"]}),
        )
        .await,
        422,
        "invalid_key_name",
    )
    .await;
    expect_problem(
        app.post("/v1/api-keys", &key, &json!({"scopes": ["keys"]}))
            .await,
        400,
        "missing_field",
    )
    .await;
}

async fn admin_issues_a_key_to_a_merchant_locked_out_of_key_management(b: Backend) {
    let app = app(b).await;
    let (merchant_id, key) = app.create_merchant("Locked").await;
    let (_, other_key) = app.create_merchant("Other").await;
    let keys: Value = app.get("/v1/api-keys", &key).await.json().await.unwrap();
    let only = keys["data"][0]["id"].as_str().unwrap().to_owned();
    // The merchant revokes its only key: it can no longer manage keys (or do anything).
    let r = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/api-keys/{only}"),
        &key,
        "rid-lockout",
    )
    .await;
    assert_eq!(r.status(), 200);
    expect_problem(app.get("/v1/api-keys", &key).await, 401, "unauthorized").await;

    let path = format!("/v1/merchants/{merchant_id}/api-keys");
    let body = json!({"name": "recovery", "scopes": ["keys", "audit:read"]});
    // Only the admin: not a merchant key (not even another merchant's), not a wrong token.
    expect_problem(
        app.post(&path, &other_key, &body).await,
        401,
        "unauthorized",
    )
    .await;
    expect_problem(app.post(&path, "wrong", &body).await, 401, "unauthorized").await;
    // Unknown or malformed merchant: 404, nothing recorded anywhere.
    for unknown in [
        "/v1/merchants/mer_AAAAAAAAAAAAAAAA/api-keys",
        "/v1/merchants/nope/api-keys",
    ] {
        expect_problem(
            app.post(unknown, ADMIN, &body).await,
            404,
            "merchant_not_found",
        )
        .await;
    }
    // Bad values for a merchant that exists: refused, and the refusal is in its trail.
    expect_problem(
        app.client
            .post(app.url(&path))
            .bearer_auth(ADMIN)
            .header("x-request-id", "rid-admin-bad")
            .json(&json!({"name": "x", "scopes": ["tokens:admin"]}))
            .send()
            .await
            .unwrap(),
        422,
        "invalid_scopes",
    )
    .await;
    expect_problem(
        app.post(&path, ADMIN, &json!({"scopes": ["keys"]})).await,
        400,
        "missing_field",
    )
    .await;

    let r = app
        .client
        .post(app.url(&path))
        .bearer_auth(ADMIN)
        .header("x-request-id", "rid-admin-issue")
        .header("idempotency-key", "issue-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["name"], "recovery");
    assert_eq!(v["scopes"], json!(["keys", "audit:read"]));
    assert_eq!(v["revokedAt"], Value::Null);
    let new_id = v["id"].as_str().unwrap().to_owned();
    let secret = v["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("tgk_"));

    // The merchant manages its keys again with it, and its scopes are enforced.
    let keys: Value = app.get("/v1/api-keys", &secret).await.json().await.unwrap();
    let listed: Vec<&str> = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [only.as_str(), new_id.as_str()], "oldest first");
    expect_problem(app.tokenize(&secret, PAN).await, 403, "insufficient_scope").await;
    let (_, tokens_key) = new_key(&app, &secret, "tokens", &["tokens:write"]).await;
    assert_eq!(app.tokenize(&tokens_key, PAN).await.status(), 201);
    // The other merchant is untouched.
    let other: Value = app
        .get("/v1/api-keys", &other_key)
        .await
        .json()
        .await
        .unwrap();
    assert!(!other.to_string().contains(&new_id));

    // The secret is shown once: the same Idempotency-Key issues no copy of it.
    let r = app
        .client
        .post(app.url(&path))
        .bearer_auth(ADMIN)
        .header("idempotency-key", "issue-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_ne!(
        r.headers().get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let again: Value = r.json().await.unwrap();
    assert_ne!(
        again["secret"],
        secret.as_str(),
        "a secret is never replayed"
    );

    // The admin's actions are in the merchant's trail: actor `admin`, the merchant, the key.
    let events = all_audit(&app, &secret).await;
    let e = find(&events, "api_key.create", "rid-admin-issue");
    assert_eq!(e["actor"], "admin");
    assert_eq!(e["merchantId"], merchant_id.as_str());
    assert_eq!(e["keyId"], new_id.as_str());
    assert_eq!(e["outcome"], "success");
    let e = find(&events, "api_key.create", "rid-admin-bad");
    assert_eq!(
        (e["actor"].as_str(), e["outcome"].as_str()),
        (Some("admin"), Some("invalid_scopes"))
    );
    assert!(e.get("keyId").is_none(), "no key was created: {e}");
    assert_eq!(
        find(&events, "api_key.revoke", "rid-lockout")["keyId"],
        only.as_str()
    );
    let other_events = all_audit(&app, &other_key).await;
    assert!(
        !other_events
            .iter()
            .any(|e| e["actor"] == "admin" && e["action"] == "api_key.create"),
        "{other_events:?}"
    );
    let logs = captured_logs();
    assert!(!logs.contains(&secret), "API key secret found in logs");
}

crate::backend_tests!(standalone:
    scopes_reveal_and_audit,
    audit_pages_with_a_cursor,
    revoked_keys_stop_working_and_tenants_are_isolated,
    bad_key_requests_are_refused,
    admin_issues_a_key_to_a_merchant_locked_out_of_key_management,
    revoking_a_key_makes_room_under_the_active_key_limit,
);

/// At most 100 active keys; revoked keys are kept (they name keys in the trail) but do not count,
/// so revoking one makes room for another.
async fn revoking_a_key_makes_room_under_the_active_key_limit(b: Backend) {
    let app = app(b).await;
    let (_, key) = app.create_merchant("Busy").await;
    let listed: Value = app.get("/v1/api-keys", &key).await.json().await.unwrap();
    let already = listed["data"].as_array().expect("data").len();
    let mut ids = Vec::new();
    for i in already..100 {
        let (id, _) = new_key(&app, &key, &format!("k{i}"), &["tokens:read"]).await;
        ids.push(id);
    }
    let over = app
        .post(
            "/v1/api-keys",
            &key,
            &json!({"name": "one too many", "scopes": ["tokens:read"]}),
        )
        .await;
    expect_problem(over, 422, "too_many_api_keys").await;
    let r = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/api-keys/{}", ids[0]),
        &key,
        "rid-make-room",
    )
    .await;
    assert!(r.status().is_success(), "revoke: {}", r.status());
    new_key(&app, &key, "after revoking", &["tokens:read"]).await;
}
