//! Physical card orders end to end (docs/issuer-orders.md): a real gateway with the D1
//! simulator over real sockets (mutual TLS, OAuth, PRODUCE notifications back to the gateway),
//! on the embedded store, standalone Redis and a Redis Cluster. An order produced and shipped
//! with tracking; the same `issuerRequestId` is the same order; an order retried after a D1
//! timeout and after a lost answer is ONE production order at D1; a batch with an invalid item;
//! a production exception; and no PAN, CVC or track data in any answer, log line, webhook or
//! store byte.

use serde_json::{Value, json};

use crate::support::app::{Backend, TestApp, TestAppBuilder, expect_problem};
use crate::support::captured_logs;
use crate::support::issuer::{Iss, Receiver, eventually, gateway, issuer};

const CLIENT_ID: &str = "d1-orders-test-client";
const CLIENT_SECRET: &str = "orders-notify-secret-0123456789abcdef";
const PAN: &str = "4111111111111111";
/// Four digits (a CID), so the byte checks cannot be fooled by a 3-digit run elsewhere.
const CVC: &str = "8351";
const TRACK1: &str = "B4111111111111111^LOVELACE/ADA^30121010000000000000";
const TRACK2: &str = "4111111111111111=30121010000000000";
/// Parts of the track data that are neither the PAN nor the expiry (the discretionary data).
const TRACK_TAIL: &str = "1010000000000";
/// The CVC as it would appear if serialized or debug-printed: four bare digits also occur in
/// timestamps and ids, so the byte and log checks look for the quoted value.
const CVC_QUOTED: &str = "\"8351\"";

fn builder(backend: Backend) -> TestAppBuilder {
    gateway(backend, (CLIENT_ID, CLIENT_SECRET)).env("TOKENGATE__D1__CALL_TIMEOUT_MS", "5000")
}

fn sim_url(app: &TestApp, path: &str) -> String {
    format!("{}{path}", app.sim_control.as_ref().unwrap())
}

async fn sim_put(app: &TestApp, path: &str, v: Value) {
    let r = app
        .client
        .put(sim_url(app, path))
        .json(&v)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
}

async fn sim_stats(app: &TestApp) -> Value {
    app.client
        .get(sim_url(app, "/sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn created(stats: &Value, iss: &Iss, request_id: &str) -> u64 {
    stats["productionOrders"]["createdByIssuerRequestId"][format!("{}/{request_id}", iss.d1)]
        .as_u64()
        .unwrap_or(0)
}

fn card() -> Value {
    json!({"pan": PAN, "exp": "1230", "cvc": CVC, "track1": TRACK1, "track2": TRACK2,
           "cardholderName": "ADA LOVELACE"})
}

fn order(request_id: &str) -> Value {
    json!({
        "issuerRequestId": request_id,
        "distributionChannel": "CENTRAL",
        "card": card(),
        "services": {"productId": "VISA_CLASSIC_01", "cardCarrier": "WELCOME"},
        "shipment": {"deliveryType": "CARDHOLDER", "method": "STANDARD", "recipientName": "Ada Lovelace",
                     "address": {"line1": "12 St James Sq", "city": "London", "postalCode": "SW1Y 4JH", "country": "GB"}},
        "paymentApplication": {"profileId": "EMV_VISA_A", "aid": "A0000000031010"},
    })
}

/// Every answer body of the test passes through here: none may carry card data.
fn clean(text: &str) -> &str {
    for secret in [PAN, CVC_QUOTED, TRACK1, TRACK2, TRACK_TAIL] {
        assert!(!text.contains(secret), "card data in an answer: {text}");
    }
    text
}

async fn place(app: &TestApp, iss: &Iss, card_id: &str, body: &Value) -> (u16, Value) {
    let r = app
        .post(
            &format!("/v1/issuer/cards/{card_id}/production-orders"),
            &iss.key,
            body,
        )
        .await;
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(clean(&text)).unwrap_or(Value::Null),
    )
}

async fn production(app: &TestApp, iss: &Iss, card_id: &str) -> (u16, Value) {
    let r = app
        .get(
            &format!("/v1/issuer/cards/{card_id}/production-status"),
            &iss.key,
        )
        .await;
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(clean(&text)).unwrap_or(Value::Null),
    )
}

async fn until_stage(app: &TestApp, iss: &Iss, card_id: &str, stage: &str) -> Value {
    eventually(stage, || async {
        let (s, v) = production(app, iss, card_id).await;
        (s == 200 && v["current"]["status"] == stage).then_some(v)
    })
    .await
}

/// Every byte the store holds: the embedded files, or every key of the issuer's slot on Redis.
fn no_card_data_in_store(app: &TestApp) {
    let check = |bytes: &[u8], what: &str| {
        for secret in [PAN, CVC_QUOTED, TRACK1, TRACK2, TRACK_TAIL] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "card data in {what}"
            );
        }
    };
    let mut seen_order = false;
    for entry in std::fs::read_dir(&app.data_dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        seen_order |= bytes.windows(16).any(|w| w == b"411111******1111");
        check(&bytes, "the store file");
    }
    if let Some(r) = &app.redis {
        let out = std::process::Command::new("redis-cli")
            .args(["-u", &r.url(), "--scan"])
            .output()
            .unwrap();
        for k in String::from_utf8_lossy(&out.stdout).lines() {
            for cmd in [["HGETALL", k], ["DUMP", k]] {
                let out = std::process::Command::new("redis-cli")
                    .args(["-u", &r.url(), cmd[0], cmd[1]])
                    .output()
                    .unwrap();
                seen_order |= String::from_utf8_lossy(&out.stdout).contains("411111******1111");
                check(&out.stdout, k);
            }
        }
    }
    // Positive control: the order is in what was read, so the check is not blind (a Cluster
    // spreads slots over nodes this reads only through the first node's keys).
    if app.redis.is_some() || app.cluster.is_none() {
        assert!(
            seen_order,
            "the order record was not found in the store bytes"
        );
    }
}

crate::backend_tests!(all:
    an_order_is_produced_and_shipped_with_tracking,
    an_order_retried_after_a_d1_timeout_is_one_production_order,
    a_batch_with_an_invalid_item_and_a_production_exception,
);

async fn an_order_is_produced_and_shipped_with_tracking(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    let hook = Receiver::start().await;
    let r = app
        .post(
            "/v1/issuer/webhook-endpoints",
            &iss.key,
            &json!({"url": hook.url, "events": ["issuer.production.status_changed", "issuer.operation.succeeded"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    sim_put(&app, "/sim/orders/config", json!({"stepDelayMs": 100})).await;

    let (s, op) = place(&app, &iss, "card-1", &order("order-1")).await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(op["operation"], "PRODUCE");
    assert_eq!(op["issuerRequestId"], "order-1");
    assert!(op["d1OperationId"].is_string(), "{op}");
    let id = op["id"].as_str().unwrap().to_owned();
    // The same issuerRequestId again is the same order: the same operation.
    let (s, again) = place(&app, &iss, "card-1", &order("order-1")).await;
    assert_eq!((s, again["id"].as_str()), (202, Some(id.as_str())));
    // ... and with another card it is refused.
    let (s, other) = place(&app, &iss, "card-2", &order("order-1")).await;
    assert_eq!(
        (s, other["code"].as_str()),
        (409, Some("issuer_request_id_in_use"))
    );

    let shipped = until_stage(&app, &iss, "card-1", "CARD_SHIPPED").await;
    let cur = &shipped["current"];
    assert_eq!(cur["maskedPan"], "411111******1111");
    assert_eq!(cur["operationId"], id.as_str());
    let stages: Vec<&str> = cur["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "CARD_PROD_REQUESTED",
            "CARD_PROD_READY",
            "CARD_PROD_DONE",
            "CARD_SHIPPED"
        ]
    );
    for f in [
        "carrier",
        "trackingNumber",
        "status",
        "message",
        "trackingUrl",
    ] {
        assert!(cur["shipment"][f].is_string(), "tracking {f}: {shipped}");
    }
    // The operation finished with the shipment.
    let op = eventually("the operation to succeed", || async {
        let r = app
            .get(&format!("/v1/issuer/operations/{id}"), &iss.key)
            .await;
        let v: Value = serde_json::from_str(clean(&r.text().await.unwrap())).unwrap();
        (v["status"] == "SUCCESSFUL").then_some(v)
    })
    .await;
    assert_eq!(op["details"]["status"], "CARD_SHIPPED");
    // D1 made one card.
    assert_eq!(created(&sim_stats(&app).await, &iss, "order-1"), 1);
    // Webhooks: a status change per step after the request, and the operation's success.
    let hits = eventually("the webhooks", || async {
        let h = hook.bodies();
        let changes = h
            .iter()
            .filter(|b| b.contains("issuer.production.status_changed"))
            .count();
        (changes >= 3 && h.iter().any(|b| b.contains("issuer.operation.succeeded"))).then_some(h)
    })
    .await;
    for h in &hits {
        clean(h);
    }
    assert!(
        hits.iter()
            .any(|h| h.contains("CARD_SHIPPED") && h.contains("trackingNumber"))
    );
    let logs = captured_logs();
    for secret in [PAN, CVC_QUOTED, TRACK1, TRACK2, TRACK_TAIL] {
        if let Some(i) = logs.find(secret) {
            let line = logs[..i].rfind('\n').map_or(0, |b| b + 1);
            let end = logs[i..].find('\n').map_or(logs.len(), |e| i + e);
            panic!(
                "card data reached the logs: {}",
                &logs[line..end].replace(secret, "<SECRET>")
            );
        }
    }
    no_card_data_in_store(&app);
}

async fn an_order_retried_after_a_d1_timeout_is_one_production_order(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    sim_put(&app, "/sim/orders/config", json!({"autoProgress": false})).await;
    // 1. D1 holds the request past the client's deadline: the outcome is unknown.
    sim_put(
        &app,
        "/sim/faults",
        json!({"timeoutRate": 1.0, "operations": ["production"]}),
    )
    .await;
    let (s, op) = place(&app, &iss, "card-t", &order("order-t")).await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(op["status"], "PENDING");
    assert!(op["d1OperationId"].is_null(), "{op}");
    let id = op["id"].as_str().unwrap().to_owned();
    // 2. The retry reaches D1, which makes the card, but the answer is lost on the way back.
    app.client
        .delete(sim_url(&app, "/sim/faults"))
        .send()
        .await
        .unwrap();
    sim_put(
        &app,
        "/sim/orders/config",
        json!({"autoProgress": false, "dropResponses": 1}),
    )
    .await;
    let (s, op) = place(&app, &iss, "card-t", &order("order-t")).await;
    assert_eq!((s, op["id"].as_str()), (202, Some(id.as_str())));
    // The answer is lost, so only D1's PRODUCE notification can have told the gateway the
    // operation id: it races the lost answer and sometimes lands before this response.
    let told_by_notification = op["history"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["source"] == "NOTIFICATION");
    assert!(
        op["d1OperationId"].is_null() || told_by_notification,
        "{op}"
    );
    // 3. The next retry is answered with the order D1 already has.
    let (s, op) = place(&app, &iss, "card-t", &order("order-t")).await;
    assert_eq!((s, op["id"].as_str()), (202, Some(id.as_str())));
    assert!(op["d1OperationId"].is_string(), "{op}");
    let stats = sim_stats(&app).await;
    assert_eq!(created(&stats, &iss, "order-t"), 1, "{stats}");
    assert_eq!(stats["productionOrders"]["ordersCreated"], 1);
    // 4. Once D1 has it, a retry does not call D1 again.
    let before = sim_stats(&app).await["requests"]["production"]
        .as_u64()
        .unwrap();
    let (s, _) = place(&app, &iss, "card-t", &order("order-t")).await;
    assert_eq!(s, 202);
    assert_eq!(
        sim_stats(&app).await["requests"]["production"]
            .as_u64()
            .unwrap(),
        before
    );
    let list: Value = app
        .get("/v1/issuer/operations?cardId=card-t", &iss.key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
}

async fn a_batch_with_an_invalid_item_and_a_production_exception(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    sim_put(
        &app,
        "/sim/orders/config",
        json!({"stepDelayMs": 50, "failCards": {"card-b2": "CARD_PROD_EXCEPTION"}}),
    )
    .await;
    let mut bad = order("batch-1");
    bad["card"]["pan"] = json!("4111111111111112");
    let items: Vec<Value> = [
        ("card-b0", order("batch-0")),
        ("card-b1", bad),
        ("card-b2", order("batch-2")),
    ]
    .into_iter()
    .map(|(c, mut o)| {
        o["cardId"] = json!(c);
        o
    })
    .collect();
    let r = app
        .post(
            "/v1/issuer/production-orders/batch",
            &iss.key,
            &json!({"orders": items}),
        )
        .await;
    assert_eq!(r.status(), 207);
    let text = r.text().await.unwrap();
    assert!(!text.contains("4111111111111112"));
    let v: Value = serde_json::from_str(clean(&text)).unwrap();
    assert_eq!(
        (v["accepted"].as_u64(), v["failed"].as_u64()),
        (Some(2), Some(1)),
        "{v}"
    );
    let res = v["results"].as_array().unwrap();
    assert_eq!(res[0]["status"], 202);
    assert_eq!(res[1]["status"], 422);
    assert_eq!(res[1]["problem"]["code"], "invalid_card_number_luhn");
    assert_eq!(res[1]["cardId"], "card-b1");
    assert_eq!(res[2]["status"], 202);
    let stats = sim_stats(&app).await;
    assert_eq!(stats["productionOrders"]["ordersCreated"], 2, "{stats}");
    assert_eq!(stats["requests"]["productionBatch"], 1);
    // 0 or more than 1,000 cards.
    let r = app
        .post(
            "/v1/issuer/production-orders/batch",
            &iss.key,
            &json!({"orders": []}),
        )
        .await;
    expect_problem(r, 422, "invalid_batch_size").await;
    // The card in failCards ends in a production exception: final, the operation FAILED.
    let failed = until_stage(&app, &iss, "card-b2", "CARD_PROD_EXCEPTION").await;
    let op_id = failed["current"]["operationId"]
        .as_str()
        .unwrap()
        .to_owned();
    let op = eventually("the operation to fail", || async {
        let v: Value = app
            .get(&format!("/v1/issuer/operations/{op_id}"), &iss.key)
            .await
            .json()
            .await
            .unwrap();
        (v["status"] == "FAILED").then_some(v)
    })
    .await;
    assert_eq!(op["errorCode"], "CARD_PROD_EXCEPTION");
    until_stage(&app, &iss, "card-b0", "CARD_SHIPPED").await;
    // Validation never reaches D1.
    let before = sim_stats(&app).await["requests"]["production"]
        .as_u64()
        .unwrap_or(0);
    let mut instant = order("inst-1");
    instant["distributionChannel"] = json!("INSTANT");
    let (s, p) = place(&app, &iss, "card-i", &instant).await;
    assert_eq!(
        (s, p["code"].as_str()),
        (422, Some("invalid_production_order"))
    );
    let mut cvc = order("cvc-1");
    cvc["card"]["cvc"] = json!(12345);
    let (s, p) = place(&app, &iss, "card-c", &cvc).await;
    // A type error is a 400 (the API's rule), and the value is not echoed.
    assert_eq!(s, 400, "{p}");
    assert!(!p.to_string().contains("12345"));
    assert_eq!(
        sim_stats(&app).await["requests"]["production"]
            .as_u64()
            .unwrap_or(0),
        before
    );
    let (s, _) = production(&app, &iss, "never-ordered").await;
    assert_eq!(s, 404);
    no_card_data_in_store(&app);
}
