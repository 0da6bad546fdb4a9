//! The D1 client's physical card orders (`d1::production`) against the simulator over mutual
//! TLS: an order (card data as a JWE the simulator opens), the same `issuerRequestId` answered
//! with the same operation, a lost answer that leaves the outcome unknown and whose retry makes
//! no second card, a batch with a refused item, D1's refusals mapped with their `errorCode`,
//! and the production status with shipment tracking.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use time::OffsetDateTime;
use tokengate::d1::{D1Client, D1Config, D1ProductionClient};
use tokengate::domain::error::ProviderError;
use tokengate::domain::production_orders::{
    BatchOrder, Delivery, DistributionChannel, OrderServices, OrderShipment, OrderSpec,
    PostalAddress, ProductionCard, ProductionProvider, ProductionStage,
};
use tokengate_cards::{Cvc, EmbossName, Expiry, Track2};
use tokengate_d1_protocol::issuer_orders::ProductionPaths;

use crate::sim::{Sim, control, start_sim, stats};

const ISSUER: &str = "ISSUER0002";

fn client(s: &Sim) -> Result<D1ProductionClient> {
    let mut cfg = D1Config::sandbox(&s.handle.base_url(), &s.m);
    cfg.call_timeout = Duration::from_secs(5);
    let base = s.handle.base_url().replace("/authz/v1", "/banking/v1");
    D1ProductionClient::new(D1Client::new(cfg)?, &base, ProductionPaths::default())
        .map_err(anyhow::Error::msg)
}

fn card(pan: &str) -> Result<ProductionCard> {
    let year = u16::try_from(OffsetDateTime::now_utc().year() + 3)?;
    Ok(ProductionCard {
        pan: pan.parse()?,
        expiry: Expiry::trusted(12, year).ok_or_else(|| anyhow::anyhow!("expiry"))?,
        cvc: Cvc::parse("737")?,
        track1: None,
        track2: Some(Track2::parse("4111111111111111=30121010000000000")?),
        cardholder_name: EmbossName::parse("ADA LOVELACE")?,
    })
}

fn spec(channel: DistributionChannel) -> OrderSpec {
    OrderSpec {
        channel,
        services: OrderServices {
            product_id: "VISA_CLASSIC_01".into(),
            ..Default::default()
        },
        shipment: Some(OrderShipment {
            delivery: Delivery::Cardholder(PostalAddress {
                line1: "1 Main St".into(),
                line2: None,
                city: "Paris".into(),
                postal_code: "75001".into(),
                country: "FR".into(),
            }),
            method: Some("STANDARD".into()),
            recipient_name: None,
        }),
        payment_application: None,
    }
}

fn created(st: &serde_json::Value, request_id: &str) -> u64 {
    st["productionOrders"]["createdByIssuerRequestId"][format!("{ISSUER}/{request_id}")]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_go_through_the_client_once_per_request_id() -> Result<()> {
    let s = start_sim().await?;
    let c = client(&s)?;
    let cfg = control(
        &s,
        reqwest::Method::PUT,
        "/sim/orders/config",
        Some(json!({"stepDelayMs": 30})),
    )
    .await?;
    assert_eq!(cfg.status, 200);
    let central = spec(DistributionChannel::Central);
    let a = c
        .order_production(
            ISSUER,
            "card-1",
            "req-1",
            &central,
            &card("4111111111111111")?,
        )
        .await?;
    let b = c
        .order_production(
            ISSUER,
            "card-1",
            "req-1",
            &central,
            &card("4111111111111111")?,
        )
        .await?;
    assert_eq!(a, b);
    assert_eq!(created(&stats(&s).await?, "req-1"), 1);
    // The simulator opened the JWE: it kept the masked PAN and the name, not the CVC or tracks.
    let kept = control(
        &s,
        reqwest::Method::GET,
        &format!("/sim/issuers/{ISSUER}/physicalCards/card-1/production"),
        None,
    )
    .await?;
    assert_eq!(kept.body["maskedPan"], "411111******1111");
    assert_eq!(kept.body["cardholderName"], "ADA LOVELACE");
    // No value is the CVC and no field holds one or track data. (A substring search for "737"
    // would also hit random operation ids and timestamps.)
    fn holds_secret(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s == "737",
            serde_json::Value::Array(a) => a.iter().any(holds_secret),
            serde_json::Value::Object(o) => o.iter().any(|(k, v)| {
                let k = k.to_ascii_lowercase();
                k.contains("cvc") || k.contains("cvv") || k.contains("track") || holds_secret(v)
            }),
            _ => false,
        }
    }
    assert!(!holds_secret(&kept.body), "{}", kept.body);

    // Production status, until shipped with tracking.
    let deadline = Instant::now() + Duration::from_secs(10);
    let shipped = loop {
        let st = c.production_status(ISSUER, "card-1").await?;
        if st.status == ProductionStage::Shipped {
            break st;
        }
        if Instant::now() > deadline {
            bail!("never shipped: {st:?}");
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    assert_eq!(
        shipped.d1_operation_id.as_deref(),
        Some(a.d1_operation_id.as_str())
    );
    assert_eq!(shipped.issuer_request_id.as_deref(), Some("req-1"));
    let t = shipped.shipment.expect("tracking");
    assert!(t.carrier.is_some() && t.tracking_number.is_some() && t.tracking_url.is_some());
    assert!(matches!(
        c.production_status(ISSUER, "never-ordered").await,
        Err(ProviderError::NotFound)
    ));

    // D1's refusal keeps its code: INSTANT ships nothing (a shipment is an invalid field).
    let mut instant = spec(DistributionChannel::Instant);
    instant.services.issuance_location = Some("BRANCH-1".into());
    let e = c
        .order_production(
            ISSUER,
            "card-2",
            "req-2",
            &spec(DistributionChannel::Instant),
            &card("4111111111111111")?,
        )
        .await;
    assert!(
        matches!(&e, Err(ProviderError::Rejected { status: 400, code }) if code == "INVALID_FIELD"),
        "{e:?}"
    );
    c.order_production(
        ISSUER,
        "card-2",
        "req-2",
        &{
            let mut i = instant;
            i.shipment = None;
            i
        },
        &card("4111111111111111")?,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_an_unknown_outcome_and_the_retry_makes_no_second_card() -> Result<()> {
    let s = start_sim().await?;
    let c = client(&s)?;
    control(
        &s,
        reqwest::Method::PUT,
        "/sim/orders/config",
        Some(json!({"autoProgress": false, "dropResponses": 1})),
    )
    .await?;
    let central = spec(DistributionChannel::Central);
    let lost = c
        .order_production(
            ISSUER,
            "card-9",
            "req-9",
            &central,
            &card("4111111111111111")?,
        )
        .await;
    assert!(
        matches!(lost, Err(ProviderError::BadResponse(_))),
        "the outcome must be unknown, not a refusal: {lost:?}"
    );
    let again = c
        .order_production(
            ISSUER,
            "card-9",
            "req-9",
            &central,
            &card("4111111111111111")?,
        )
        .await?;
    let st = stats(&s).await?;
    assert_eq!(created(&st, "req-9"), 1, "{st}");
    let status = c.production_status(ISSUER, "card-9").await?;
    assert_eq!(
        status.d1_operation_id.as_deref(),
        Some(again.d1_operation_id.as_str())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_per_item() -> Result<()> {
    let s = start_sim().await?;
    let c = client(&s)?;
    let central = spec(DistributionChannel::Central);
    let thales_bulk = OrderSpec {
        channel: DistributionChannel::Thales,
        shipment: Some(OrderShipment {
            delivery: Delivery::Bulk {
                destination_id: "HUB-1".into(),
            },
            method: None,
            recipient_name: None,
        }),
        ..spec(DistributionChannel::Thales)
    };
    let cards = [
        card("4111111111111111")?,
        card("5555555555554444")?,
        card("4000056655665556")?,
    ];
    let items = [
        BatchOrder {
            card_id: "b-0",
            issuer_request_id: "rb-0",
            spec: &central,
            card: &cards[0],
        },
        // BULK is CENTRAL only: D1 refuses this item alone.
        BatchOrder {
            card_id: "b-1",
            issuer_request_id: "rb-1",
            spec: &thales_bulk,
            card: &cards[1],
        },
        BatchOrder {
            card_id: "b-2",
            issuer_request_id: "rb-2",
            spec: &central,
            card: &cards[2],
        },
    ];
    let results = c.order_production_batch(ISSUER, &items).await?;
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[2].is_ok());
    assert!(
        matches!(&results[1], Err(ProviderError::Rejected { code, .. }) if code == "INVALID_FIELD"),
        "{:?}",
        results[1]
    );
    let st = stats(&s).await?;
    assert_eq!(st["productionOrders"]["ordersCreated"], 2);
    assert_eq!(st["requests"]["productionBatch"], 1);
    Ok(())
}
