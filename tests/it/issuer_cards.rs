//! The issuer's cards end to end (docs/issuer.md, "Cards"): deleting a card at D1 through the
//! API and from the simulator's control API (the bank using another D1 channel), which opts it
//! out of Click to Pay; the `DELETE` notification applied once across two instances; the card
//! routes' scopes, tenancy and validation; no card number anywhere. On the embedded store,
//! standalone Redis and a Redis Cluster, with the simulator over real sockets.

use std::time::Duration;

use serde_json::{Value, json};

use crate::issuer_api::{
    Iss, PAN, access_token, builder, enrol, eventually, issuer, no_pan_in_store, notify, operation,
    profiles, receiver, seed, sim_settings, subscribe, until_final,
};
use crate::support::app::{Backend, TestApp, expect_problem};
use crate::support::captured_logs;
use crate::support::issuer::issuer_key;

crate::backend_tests!(all:
    delete_through_the_api_opts_the_card_out,
    deletion_at_d1_is_applied_once_across_instances,
    card_routes_scopes_tenancy_and_validation,
);

async fn card(app: &TestApp, key: &str, card: &str) -> Value {
    let r = app.get(&format!("/v1/issuer/cards/{card}"), key).await;
    assert_eq!(r.status(), 200, "GET card {card}");
    r.json().await.unwrap()
}

async fn delete(app: &TestApp, key: &str, card: &str, idem: Option<&str>) -> reqwest::Response {
    let mut r = app
        .client
        .delete(app.url(&format!("/v1/issuer/cards/{card}")))
        .bearer_auth(key);
    if let Some(k) = idem {
        r = r.header("Idempotency-Key", k);
    }
    r.send().await.unwrap()
}

/// The webhook types received so far, sorted.
fn types(hits: &[Value]) -> Vec<String> {
    let mut t: Vec<String> = hits
        .iter()
        .map(|h| h["type"].as_str().unwrap().to_owned())
        .collect();
    t.sort_unstable();
    t
}

async fn enrolled(app: &TestApp, iss: &Iss, card_id: &str) {
    let op = enrol(app, iss, card_id).await;
    let done = until_final(app, &iss.key, op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "SUCCESSFUL", "{done}");
}

async fn delete_through_the_api_opts_the_card_out(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    let hook = receiver().await;
    subscribe(&app, &iss, &hook.url).await;
    let consumer = seed(
        &app,
        &iss,
        "card-1",
        json!({"pan": PAN, "expiry": "1230", "firstName": "Ada", "email": "ada@example.com"}),
    )
    .await;
    enrolled(&app, &iss, "card-1").await;
    let c = eventually("the card enrolled", || async {
        let c = card(&app, &iss.key, "card-1").await;
        (c["clickToPay"]["status"] == "ENROLLED").then_some(c)
    })
    .await;
    assert_eq!(c["clickToPay"]["consumerId"], consumer.as_str(), "{c}");
    assert!(c["lifecycleState"].is_null(), "{c}");

    // Delete: 202 with the operation; the same Idempotency-Key answers the same operation and
    // D1 sees one call.
    let r = delete(&app, &iss.key, "card-1", Some("delete-card-1")).await;
    assert_eq!(r.status(), 202);
    let op: Value = r.json().await.unwrap();
    assert_eq!(op["operation"], "DELETE");
    assert_eq!(op["cardId"], "card-1");
    let again: Value = delete(&app, &iss.key, "card-1", Some("delete-card-1"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["id"], op["id"]);
    let id = op["id"].as_str().unwrap();
    let done = until_final(&app, &iss.key, id).await;
    assert_eq!(done["status"], "SUCCESSFUL", "{done}");
    assert_eq!(app.sim_stats().await["requests"]["cardDelete"], 1);

    // The card is deleted and out of Click to Pay; D1's profiles are empty (the last card of
    // the consumer: the cardholder details are gone too).
    let c = eventually("the card deleted", || async {
        let c = card(&app, &iss.key, "card-1").await;
        (c["lifecycleState"] == "DELETED").then_some(c)
    })
    .await;
    assert_eq!(c["clickToPay"]["status"], "OPTED_OUT", "{c}");
    assert_eq!(c["clickToPay"]["reason"], "CARD_DELETED", "{c}");
    assert!(c["deletedAt"].is_string());
    assert_eq!(c["lastOperations"][0]["id"], id, "newest first: {c}");
    let p = profiles(
        &app,
        &iss.key,
        "/v1/issuer/cards/card-1/click-to-pay/profiles",
    )
    .await;
    assert_eq!(p["clickToPayProfiles"], json!([]));
    let p = profiles(
        &app,
        &iss.key,
        &format!("/v1/issuer/consumers/{consumer}/click-to-pay/profiles"),
    )
    .await;
    assert_eq!(p["clickToPayProfiles"], json!([]));

    // Re-enrolment and a second delete are refused while the card is deleted, before D1.
    let r = app
        .post(
            "/v1/issuer/cards/card-1/click-to-pay/enrolment",
            &iss.key,
            &json!({"cardholderName": "ADA LOVELACE"}),
        )
        .await;
    expect_problem(r, 409, "card_deleted").await;
    expect_problem(
        delete(&app, &iss.key, "card-1", None).await,
        409,
        "card_deleted",
    )
    .await;
    assert_eq!(app.sim_stats().await["requests"]["cardDelete"], 1);

    // D1's own refusal (a card it does not know) keeps its code; the operation is FAILED.
    let p = expect_problem(
        delete(&app, &iss.key, "never-seeded", None).await,
        422,
        "d1_rejected",
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap().contains("CARD_NOT_FOUND"),
        "{p}"
    );

    // Webhooks: enrolment succeeded + enrolled, deletion succeeded + opted out (reason
    // CARD_DELETED), the refused deletion failed; one of each.
    eventually("five webhooks", || async {
        (hook.bodies().len() >= 5).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits = hook.events();
    assert_eq!(
        types(&hits),
        [
            "issuer.click_to_pay.enrolled",
            "issuer.click_to_pay.opted_out",
            "issuer.operation.failed",
            "issuer.operation.succeeded",
            "issuer.operation.succeeded"
        ],
        "{hits:?}"
    );
    let out = hits
        .iter()
        .find(|h| h["type"] == "issuer.click_to_pay.opted_out")
        .unwrap();
    assert_eq!(out["data"]["reason"], "CARD_DELETED");
    assert_eq!(out["data"]["cardId"], "card-1");
    assert_eq!(out["data"]["operation"]["id"], id);
    for h in &hits {
        assert!(!h.to_string().contains(PAN));
    }
    assert!(!c.to_string().contains(PAN));
    assert!(!captured_logs().contains(PAN), "a PAN reached the logs");
    no_pan_in_store(&app);
}

/// A second gateway on the same store: on Redis and Cluster another instance; the embedded
/// store is one process's file, so there the "second instance" is the same gateway (the
/// deliveries still race each other).
async fn second_instance(a: &TestApp, backend: Backend) -> Option<TestApp> {
    let b = match backend {
        Backend::Embedded => return None,
        Backend::Redis => builder(Backend::Embedded).env(
            "TOKENGATE__STORAGE__REDIS_URL",
            &a.redis.as_ref().unwrap().url(),
        ),
        Backend::RedisCluster => {
            let nodes: Vec<String> = a
                .cluster
                .as_ref()
                .unwrap()
                .addrs()
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect();
            builder(Backend::Embedded).env(
                "TOKENGATE__STORAGE__REDIS_CLUSTER_NODES",
                &format!("[{}]", nodes.join(",")),
            )
        }
    };
    Some(b.start().await)
}

async fn deletion_at_d1_is_applied_once_across_instances(backend: Backend) {
    let a = builder(backend).start().await;
    let b = second_instance(&a, backend).await;
    let b = b.as_ref().unwrap_or(&a);
    let iss = issuer(&a).await;
    let hook = receiver().await;
    subscribe(&a, &iss, &hook.url).await;
    seed(&a, &iss, "card-1", json!({"pan": PAN, "expiry": "1230"})).await;
    enrolled(&a, &iss, "card-1").await;

    // The bank deletes the card through another D1 channel. D1's notifications are held back
    // here: the batches below, delivered twice to both instances at once and reordered, are
    // the only way the gateways hear of it.
    sim_settings(&a, json!({"suppressNotifications": true})).await;
    let url = format!(
        "{}/sim/issuers/{}/cards/card-1/delete",
        a.sim_control.as_ref().unwrap(),
        iss.d1
    );
    let r = a.client.post(url).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let d1_op = r.json::<Value>().await.unwrap()["operationId"]
        .as_str()
        .unwrap()
        .to_owned();
    // D1 has opted the card out: its profile is empty already.
    eventually("D1 to finish the deletion", || async {
        let p = profiles(
            &a,
            &iss.key,
            "/v1/issuer/cards/card-1/click-to-pay/profiles",
        )
        .await;
        (p["clickToPayProfiles"] == json!([])).then_some(())
    })
    .await;
    let item = |status: &str| {
        json!({"operationId": d1_op, "operation": "DELETE", "status": status,
               "startTime": "2026-12-01T10:00:00.000Z", "cardId": "card-1",
               "endTime": if status == "PENDING" { Value::Null } else { json!("2026-12-01T10:00:01.000Z") }})
    };
    let batch = json!({"operations": [item("PENDING"), item("SUCCESSFUL")]});
    let reordered = json!({"operations": [item("SUCCESSFUL"), item("PENDING")]});
    let (ta, tb) = (access_token(&a).await, access_token(b).await);
    for _ in 0..2 {
        let (x, y) = tokio::join!(
            notify(&a, &ta, &iss.d1, &batch),
            notify(b, &tb, &iss.d1, &reordered)
        );
        assert_eq!((x, y), (204, 204));
    }

    // One DELETE operation, recorded from D1's notification, SUCCESSFUL once; the card deleted
    // and opted out, seen alike from both instances.
    for app in [&a, b] {
        let c = card(app, &iss.key, "card-1").await;
        assert_eq!(c["lifecycleState"], "DELETED", "{c}");
        assert_eq!(c["clickToPay"]["status"], "OPTED_OUT", "{c}");
        assert_eq!(c["clickToPay"]["reason"], "CARD_DELETED", "{c}");
        let deletes: Vec<&Value> = c["lastOperations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["operation"] == "DELETE")
            .collect();
        assert_eq!(deletes.len(), 1, "one operation: {c}");
        assert_eq!(deletes[0]["d1OperationId"], d1_op.as_str());
        let op = operation(app, &iss.key, deletes[0]["id"].as_str().unwrap()).await;
        assert_eq!(op["status"], "SUCCESSFUL");
        let finals = op["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["status"] == "SUCCESSFUL")
            .count();
        assert_eq!(finals, 1, "one status change: {op}");
    }
    // Enrolment succeeded + enrolled, then the deletion: succeeded + opted out, once each.
    eventually("four webhooks", || async {
        (hook.bodies().len() >= 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = hook.events();
    assert_eq!(
        types(&hits),
        [
            "issuer.click_to_pay.enrolled",
            "issuer.click_to_pay.opted_out",
            "issuer.operation.succeeded",
            "issuer.operation.succeeded"
        ],
        "{hits:?}"
    );
    // D1 refuses anything more for the deleted card, with its error shape.
    let r = a
        .post(
            "/v1/issuer/cards/card-1/click-to-pay/opt-out",
            &iss.key,
            &json!({}),
        )
        .await;
    let p = expect_problem(r, 422, "d1_rejected").await;
    assert!(
        p["detail"].as_str().unwrap().contains("CARD_DELETED"),
        "{p}"
    );
    assert!(!captured_logs().contains(PAN), "a PAN reached the logs");
    no_pan_in_store(&a);
}

async fn card_routes_scopes_tenancy_and_validation(backend: Backend) {
    let app = builder(backend).start().await;
    let iss = issuer(&app).await;
    let other = issuer(&app).await;
    seed(&app, &iss, "card-1", json!({"pan": PAN, "expiry": "1230"})).await;
    // Unknown to the gateway: 404 (the card exists at D1, but nothing was done through us).
    expect_problem(
        app.get("/v1/issuer/cards/card-1", &iss.key).await,
        404,
        "issuer_card_not_found",
    )
    .await;
    enrolled(&app, &iss, "card-1").await;
    let c = card(&app, &iss.key, "card-1").await;
    assert_eq!(
        c["lastOperations"][0]["operation"],
        "CLICK_TO_PAY_ENROLMENT"
    );
    // Another issuer: 404 on read, never 403; its delete reaches D1 under its own issuer id,
    // where the card does not exist.
    expect_problem(
        app.get("/v1/issuer/cards/card-1", &other.key).await,
        404,
        "issuer_card_not_found",
    )
    .await;
    let p = expect_problem(
        delete(&app, &other.key, "card-1", None).await,
        422,
        "d1_rejected",
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap().contains("CARD_NOT_FOUND"),
        "{p}"
    );
    assert!(card(&app, &iss.key, "card-1").await["lifecycleState"].is_null());
    // Scopes: a merchant key, and an issuer key without issuer:cards.
    let (_, merchant_key) = app.create_merchant("Shop").await;
    expect_problem(
        app.get("/v1/issuer/cards/card-1", &merchant_key).await,
        403,
        "insufficient_scope",
    )
    .await;
    expect_problem(
        delete(&app, &merchant_key, "card-1", None).await,
        403,
        "insufficient_scope",
    )
    .await;
    let (_, narrow) = issuer_key(
        &app,
        &iss.id,
        "ops only",
        &["issuer:operations", "issuer:click-to-pay"],
    )
    .await;
    expect_problem(
        app.get("/v1/issuer/cards/card-1", &narrow).await,
        403,
        "insufficient_scope",
    )
    .await;
    expect_problem(
        delete(&app, &narrow, "card-1", None).await,
        403,
        "insufficient_scope",
    )
    .await;
    // A malformed card id: 422 before anything reaches D1 or the store.
    let before = app.sim_stats().await["requests"]["cardDelete"].clone();
    for bad in ["bad%20id", "x%2Fy", &"a".repeat(49)] {
        expect_problem(
            delete(&app, &iss.key, bad, None).await,
            422,
            "invalid_card_id",
        )
        .await;
        expect_problem(
            app.get(&format!("/v1/issuer/cards/{bad}"), &iss.key).await,
            422,
            "invalid_card_id",
        )
        .await;
    }
    assert_eq!(app.sim_stats().await["requests"]["cardDelete"], before);
}
