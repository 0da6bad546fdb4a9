//! The issuer's audit trail end to end (docs/security.md, "Audit trail"): every issuer write
//! (Click to Pay enrolment, update, opt-out; card orders; webhook endpoint changes; the admin's
//! onboarding, keys) and every read of Click to Pay profiles with personal data lands in the
//! issuer's own trail with its outcome, refusals included; `GET /v1/issuer/audit-events` pages
//! through it; merchants and issuers never see each other's trails; and no card number or
//! personal data is in any entry. On the embedded store, standalone Redis and a Redis Cluster.

use serde_json::{Value, json};

use crate::issuer_api::{PAN, builder, enrol, issuer, receiver, seed, subscribe, until_final};
use crate::support::app::{Backend, TestApp, expect_problem};
use crate::support::issuer::issuer_key;

crate::backend_tests!(all: issuer_actions_are_in_the_issuer_trail);

/// The whole trail, newest first, through the API in pages of `limit`.
async fn trail(app: &TestApp, key: &str, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..50 {
        let path = match &cursor {
            Some(c) => format!("/v1/issuer/audit-events?limit={limit}&cursor={c}"),
            None => format!("/v1/issuer/audit-events?limit={limit}"),
        };
        let r = app.get(&path, key).await;
        assert_eq!(r.status(), 200, "{path}");
        let page: Value = r.json().await.unwrap();
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= limit);
        out.extend(data.iter().cloned());
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
    panic!("the trail does not end");
}

/// The newest entry of `action`.
fn newest<'a>(trail: &'a [Value], action: &str) -> &'a Value {
    trail
        .iter()
        .find(|e| e["action"] == action)
        .unwrap_or_else(|| panic!("no {action} in {trail:#?}"))
}

async fn issuer_actions_are_in_the_issuer_trail(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    let other = issuer(&app).await;
    let (_, merchant_key) = app.create_merchant("Shop").await;

    // Onboarding by the admin: the issuer's first entry, naming its first key.
    let t = trail(&app, &iss.key, 20).await;
    assert_eq!(t.len(), 1, "{t:#?}");
    assert_eq!(t[0]["action"], "issuer.create");
    assert_eq!(t[0]["actor"], "admin");
    assert_eq!(t[0]["issuerId"], iss.id.as_str());
    assert!(t[0].get("merchantId").is_none(), "{}", t[0]);
    assert!(t[0]["keyId"].as_str().unwrap().starts_with("key_"));

    // Keys the admin issues for it.
    let (pii_id, pii_key) = issuer_key(
        &app,
        &iss.id,
        "desk",
        &["issuer:click-to-pay", "issuer:click-to-pay:pii"],
    )
    .await;
    let (_, orders_only) = issuer_key(&app, &iss.id, "desk", &["issuer:orders"]).await;

    // Webhook endpoint changes.
    let hook = receiver().await;
    subscribe(&app, &iss, &hook.url).await;
    let r = app.get("/v1/issuer/webhook-endpoints", &iss.key).await;
    let eps: Value = r.json().await.unwrap();
    let ep_id = eps["data"][0]["id"].as_str().unwrap().to_owned();

    // Click to Pay: an enrolment that succeeds, one refused before D1, an opt-out.
    let consumer = seed(
        &app,
        &iss,
        "card-1",
        json!({"pan": PAN, "expiry": "1230", "firstName": "Ada", "lastName": "Lovelace", "email": "ada@example.com"}),
    )
    .await;
    let op = enrol(&app, &iss, "card-1").await;
    let op_id = op["id"].as_str().unwrap().to_owned();
    until_final(&app, &iss.key, &op_id).await;
    let r = app
        .post(
            "/v1/issuer/cards/card-1/click-to-pay/enrolment",
            &iss.key,
            &json!({"cardholderName": "A NAME FAR LONGER THAN TWENTY SIX"}),
        )
        .await;
    expect_problem(r, 422, "invalid_cardholder_name").await;
    // A key without the Click to Pay scope: refused, and the refusal is on record.
    let r = app
        .post(
            "/v1/issuer/cards/card-1/click-to-pay/update",
            &orders_only,
            &json!({}),
        )
        .await;
    expect_problem(r, 403, "insufficient_scope").await;

    // Profiles: without personal data, not a sensitive read; with it, recorded.
    let r = app
        .get("/v1/issuer/cards/card-1/click-to-pay/profiles", &iss.key)
        .await;
    assert_eq!(r.status(), 200);
    let r = app
        .get(
            &format!("/v1/issuer/consumers/{consumer}/click-to-pay/profiles"),
            &pii_key,
        )
        .await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.contains("ada@example.com"), "the read returned PII");

    let r = app
        .post(
            &format!("/v1/issuer/consumers/{consumer}/click-to-pay/opt-out"),
            &iss.key,
            &json!({"reason": "customer request"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let opt_out: Value = r.json().await.unwrap();

    // A batch order refused as a whole (no card reaches D1).
    let r = app
        .post(
            "/v1/issuer/production-orders/batch",
            &orders_only,
            &json!({"orders": []}),
        )
        .await;
    expect_problem(r, 422, "invalid_batch_size").await;

    let r = app
        .client
        .delete(app.url(&format!("/v1/issuer/webhook-endpoints/{ep_id}")))
        .bearer_auth(&iss.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    // The trail, in pages of 3: every action, newest first, each once.
    let t = trail(&app, &iss.key, 3).await;
    let actions: Vec<&str> = t.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "webhook_endpoint.delete",
            "production_order.batch",
            "click_to_pay.opt_out",
            "click_to_pay.profiles_read",
            "click_to_pay.update",
            "click_to_pay.enrol",
            "click_to_pay.enrol",
            "webhook_endpoint.create",
            "api_key.create",
            "api_key.create",
            "issuer.create",
        ],
        "{t:#?}"
    );
    let ids: Vec<&str> = t.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "an entry twice across pages");
    assert!(t.iter().all(|e| e["issuerId"] == iss.id.as_str()));

    let enrolled = &t[6];
    assert_eq!(enrolled["outcome"], "success");
    assert_eq!(enrolled["cardId"], "card-1");
    assert_eq!(enrolled["operationId"], op_id.as_str());
    assert!(enrolled["actor"].as_str().unwrap().starts_with("key_"));
    assert!(enrolled["requestId"].is_string());
    assert_eq!(t[5]["outcome"], "invalid_cardholder_name");
    assert!(t[5].get("operationId").is_none(), "{}", t[5]);
    assert_eq!(t[4]["outcome"], "insufficient_scope");
    assert_eq!(t[4]["cardId"], "card-1");
    let read = newest(&t, "click_to_pay.profiles_read");
    assert_eq!(read["actor"], pii_id.as_str());
    assert_eq!(read["consumerId"], consumer.as_str());
    assert_eq!(read["outcome"], "success");
    let out = newest(&t, "click_to_pay.opt_out");
    assert_eq!(out["operationId"], opt_out["id"]);
    assert_eq!(out["consumerId"], consumer.as_str());
    assert_eq!(
        newest(&t, "production_order.batch")["outcome"],
        "invalid_batch_size"
    );
    assert_eq!(
        newest(&t, "webhook_endpoint.create")["endpointId"],
        ep_id.as_str()
    );
    assert_eq!(
        newest(&t, "webhook_endpoint.delete")["endpointId"],
        ep_id.as_str()
    );
    let key_events: Vec<&Value> = t
        .iter()
        .filter(|e| e["action"] == "api_key.create")
        .collect();
    assert!(key_events.iter().all(|e| e["actor"] == "admin"));
    assert!(key_events.iter().any(|e| e["keyId"] == pii_id.as_str()));

    // Nothing sensitive in the trail: no card number, no personal data, no secret.
    let all = serde_json::to_string(&t).unwrap();
    for secret in [
        PAN,
        "Lovelace",
        "ada@example.com",
        "ADA LOVELACE",
        "whsec_",
        "tgk_",
    ] {
        assert!(!all.contains(secret), "{secret} is in the trail");
    }

    // Each tenant sees its own trail only.
    let theirs = trail(&app, &other.key, 20).await;
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0]["issuerId"], other.id.as_str());
    let r = app.get("/v1/audit-events?limit=100", &merchant_key).await;
    let merchant_trail: Value = r.json().await.unwrap();
    assert!(
        !merchant_trail.to_string().contains(&iss.id),
        "{merchant_trail}"
    );
    // The route's scope and tenant kind.
    let r = app.get("/v1/issuer/audit-events", &merchant_key).await;
    expect_problem(r, 403, "insufficient_scope").await;
    let r = app.get("/v1/issuer/audit-events", &pii_key).await;
    expect_problem(r, 403, "insufficient_scope").await;
    let r = app.get("/v1/audit-events", &iss.key).await;
    expect_problem(r, 403, "insufficient_scope").await;
    let r = app
        .get("/v1/issuer/audit-events?cursor=nope", &iss.key)
        .await;
    expect_problem(r, 422, "invalid_cursor").await;
}
