//! The simulator's physical card orders over real sockets with mutual TLS, driven by a raw HTTP
//! client (`tests/it/sim.rs` helpers): production orders and their dedup by `issuerRequestId`,
//! production progressing to CARD_SHIPPED with tracking, a lost answer retried into one order,
//! batches with a failing item, injected production exceptions, PRODUCE notifications, and what
//! the simulator keeps (no CVC, no track data, no full PAN).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::http::StatusCode;
use serde_json::{Value, json};
use tokengate_d1_protocol::jose;

use crate::sim::{
    Answer, Api, Sim, answer, control, correlation_id, future_expiry, start_sim, stats,
};

const ISSUER: &str = "ISSUER0001";
const PAN: &str = "4111111111111111";
const CVC: &str = "737";
const TRACK2: &str = "4111111111111111=30121010000000000";

fn card_jwe(s: &Sim, pan: &str) -> Result<String> {
    let key = jose::public_key_from_pem(&s.m.d1_jwe_pub_pem)?;
    let plaintext = json!({"pan": pan, "exp": future_expiry(), "cvc": CVC, "track2": TRACK2,
        "cardholderName": "ADA LOVELACE"})
    .to_string();
    Ok(jose::jwe_encrypt(
        plaintext.as_bytes(),
        &key,
        &s.m.d1_jwe_kid,
    )?)
}

fn order(s: &Sim, request_id: &str, pan: &str) -> Result<Value> {
    Ok(json!({
        "issuerRequestId": request_id,
        "distributionChannel": "CENTRAL",
        "services": {"productId": "VISA_CLASSIC_01"},
        "encryptedData": card_jwe(s, pan)?,
        "shipment": {"deliveryType": "CARDHOLDER", "address": {"line1": "1 Main St", "city": "Paris",
            "postalCode": "75001", "country": "FR"}},
    }))
}

fn banking(s: &Sim, path: &str) -> String {
    let base = s.handle.base_url().replace("/authz/v1", "/banking/v1");
    format!("{base}/issuers/{ISSUER}{path}")
}

async fn send(
    api: &Api,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> Result<Answer> {
    let mut req = api
        .client
        .request(method, url)
        .header("x-correlation-id", correlation_id())
        .bearer_auth(&api.token);
    if let Some(b) = body {
        req = req.json(b);
    }
    answer(req.send().await?).await
}

async fn place(s: &Sim, api: &Api, card: &str, body: &Value) -> Result<Answer> {
    let url = banking(s, &format!("/physicalCards/{card}/operations:production"));
    send(api, reqwest::Method::POST, &url, Some(body)).await
}

async fn status(s: &Sim, api: &Api, card: &str) -> Result<Answer> {
    let url = banking(s, &format!("/physicalCards/{card}/productionStatus"));
    send(api, reqwest::Method::GET, &url, None).await
}

async fn config(s: &Sim, body: Value) -> Result<()> {
    let a = control(s, reqwest::Method::PUT, "/sim/orders/config", Some(body)).await?;
    ensure!(
        a.status == StatusCode::OK,
        "config: {} {}",
        a.status,
        a.body
    );
    Ok(())
}

async fn wait_for_stage(s: &Sim, api: &Api, card: &str, stage: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = status(s, api, card).await?;
        if a.body["details"]["status"] == stage {
            return Ok(a.body);
        }
        if Instant::now() > deadline {
            bail!("{card} never reached {stage}: {}", a.body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn created(st: &Value, request_id: &str) -> u64 {
    st["productionOrders"]["createdByIssuerRequestId"][format!("{ISSUER}/{request_id}")]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_produced_and_shipped_and_a_retry_is_the_same_order() -> Result<()> {
    let s = start_sim().await?;
    let notes: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = notes.clone();
    s.handle
        .set_produce_sink(Some(Arc::new(move |issuer: &str, op: Value| {
            assert_eq!(issuer, ISSUER);
            sink.lock().unwrap().push(op);
        })));
    config(&s, json!({"stepDelayMs": 30})).await?;
    let api = Api::login(&s).await?;
    let body = order(&s, "req-1", PAN)?;
    let first = place(&s, &api, "card-1", &body).await?;
    ensure!(
        first.status == StatusCode::ACCEPTED,
        "{} {}",
        first.status,
        first.body
    );
    let op = first.body["operationId"]
        .as_str()
        .context("operationId")?
        .to_owned();
    // The same issuerRequestId again (even with a fresh JWE) is the same order.
    let again = place(&s, &api, "card-1", &order(&s, "req-1", PAN)?).await?;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.body["operationId"], op.as_str());
    // ... but not for another card.
    let other = place(&s, &api, "card-2", &order(&s, "req-1", PAN)?).await?;
    assert_eq!(other.status, StatusCode::CONFLICT);

    let shipped = wait_for_stage(&s, &api, "card-1", "CARD_SHIPPED").await?;
    assert_eq!(shipped["operationId"], op.as_str());
    assert_eq!(shipped["issuerRequestId"], "req-1");
    let t = &shipped["details"]["shipment"];
    for f in [
        "carrier",
        "trackingNumber",
        "status",
        "message",
        "trackingUrl",
    ] {
        assert!(t[f].is_string(), "tracking {f} missing: {shipped}");
    }
    let st = stats(&s).await?;
    assert_eq!(created(&st, "req-1"), 1, "{st}");
    assert_eq!(st["productionOrders"]["ordersCreated"], 1);
    assert_eq!(st["requests"]["production"], 3);

    // One notification per step, each a PRODUCE operation with details.status.
    let seen: Vec<String> = notes
        .lock()
        .unwrap()
        .iter()
        .map(|n| n["details"]["status"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        seen,
        [
            "CARD_PROD_REQUESTED",
            "CARD_PROD_READY",
            "CARD_PROD_DONE",
            "CARD_SHIPPED"
        ]
    );
    let last = notes.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last["operation"], "PRODUCE");
    assert_eq!(last["status"], "SUCCESSFUL");
    assert_eq!(last["operationId"], op.as_str());

    // What the simulator keeps: the masked PAN, nothing of the CVC or the tracks.
    let kept = control(
        &s,
        reqwest::Method::GET,
        "/sim/issuers/ISSUER0001/physicalCards/card-1/production",
        None,
    )
    .await?;
    assert_eq!(kept.body["maskedPan"], "411111******1111");
    let text = kept.body.to_string();
    for secret in [PAN, CVC, TRACK2, "30121010000000000"] {
        assert!(
            !text.contains(secret),
            "the simulator kept {secret}: {text}"
        );
    }
    for n in notes.lock().unwrap().iter() {
        assert!(!n.to_string().contains(PAN));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_retried_makes_one_order() -> Result<()> {
    let s = start_sim().await?;
    config(&s, json!({"autoProgress": false, "dropResponses": 1})).await?;
    let api = Api::login(&s).await?;
    let body = order(&s, "req-lost", PAN)?;
    let url = banking(&s, "/physicalCards/card-9/operations:production");
    let lost = api
        .client
        .post(&url)
        .header("x-correlation-id", correlation_id())
        .bearer_auth(&api.token)
        .json(&body)
        .send()
        .await;
    ensure!(lost.is_err(), "the answer should have been lost: {lost:?}");
    let retry = place(&s, &api, "card-9", &body).await?;
    assert_eq!(retry.status, StatusCode::ACCEPTED);
    let st = stats(&s).await?;
    assert_eq!(created(&st, "req-lost"), 1, "{st}");
    assert_eq!(
        st["productionOrders"]["requestsByIssuerRequestId"]["ISSUER0001/req-lost"],
        2
    );
    let now = status(&s, &api, "card-9").await?;
    assert_eq!(now.body["details"]["status"], "CARD_PROD_REQUESTED");
    assert_eq!(now.body["operationId"], retry.body["operationId"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_per_item_and_bad_orders_are_refused() -> Result<()> {
    let s = start_sim().await?;
    config(&s, json!({"autoProgress": false})).await?;
    let api = Api::login(&s).await?;
    let mut items = Vec::new();
    for (i, pan) in [PAN, "4111111111111112", "5555555555554444"]
        .iter()
        .enumerate()
    {
        let mut o = order(&s, &format!("b-{i}"), pan)?;
        o["cardId"] = json!(format!("bc-{i}"));
        items.push(o);
    }
    let url = banking(&s, "/physicalCards/operations:production");
    let a = send(
        &api,
        reqwest::Method::POST,
        &url,
        Some(&json!({"orders": items})),
    )
    .await?;
    ensure!(a.status == StatusCode::ACCEPTED, "{} {}", a.status, a.body);
    let results = a.body["results"].as_array().context("results")?;
    assert_eq!(results.len(), 3);
    assert!(results[0]["operationId"].is_string());
    assert_eq!(results[1]["errorCode"], "INVALID_FIELD");
    assert!(!results[1].to_string().contains("4111111111111112"));
    assert!(results[2]["operationId"].is_string());
    assert_eq!(stats(&s).await?["productionOrders"]["ordersCreated"], 2);
    let empty = send(
        &api,
        reqwest::Method::POST,
        &url,
        Some(&json!({"orders": []})),
    )
    .await?;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);

    // Validation: INSTANT ships nothing; the issuer id has 10 characters.
    let mut instant = order(&s, "i-1", PAN)?;
    instant["distributionChannel"] = json!("INSTANT");
    let a = place(&s, &api, "card-i", &instant).await?;
    assert_eq!(
        (a.status, a.error_code()),
        (StatusCode::BAD_REQUEST, "INVALID_FIELD")
    );
    let bad_issuer =
        banking(&s, "/physicalCards/card-x/operations:production").replace(ISSUER, "SHORT");
    let a = send(
        &api,
        reqwest::Method::POST,
        &bad_issuer,
        Some(&order(&s, "x", PAN)?),
    )
    .await?;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let none = status(&s, &api, "never-ordered").await?;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_exceptions_are_final_and_steps_can_be_driven() -> Result<()> {
    let s = start_sim().await?;
    config(
        &s,
        json!({"stepDelayMs": 20, "failCards": {"card-bad": "DATA_EXCEPTION"}}),
    )
    .await?;
    let api = Api::login(&s).await?;
    place(&s, &api, "card-bad", &order(&s, "f-1", PAN)?).await?;
    let failed = wait_for_stage(&s, &api, "card-bad", "DATA_EXCEPTION").await?;
    assert!(failed["details"]["shipment"].is_null());

    config(&s, json!({"autoProgress": false})).await?;
    place(&s, &api, "card-m", &order(&s, "m-1", PAN)?).await?;
    let step = |st: &str| json!({"status": st});
    let path = "/sim/issuers/ISSUER0001/physicalCards/card-m/production";
    let a = control(
        &s,
        reqwest::Method::POST,
        path,
        Some(step("CARD_PROD_READY")),
    )
    .await?;
    assert_eq!(a.status, StatusCode::OK);
    let a = control(
        &s,
        reqwest::Method::POST,
        path,
        Some(step("CARD_PROD_EXCEPTION")),
    )
    .await?;
    assert_eq!(a.status, StatusCode::OK);
    let a = control(
        &s,
        reqwest::Method::POST,
        path,
        Some(step("CARD_PROD_DONE")),
    )
    .await?;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert_eq!(
        status(&s, &api, "card-m").await?.body["details"]["status"],
        "CARD_PROD_EXCEPTION"
    );
    Ok(())
}
