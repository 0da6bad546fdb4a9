//! Simulated physical card orders (central issuance): `operations:production` (single and
//! batch), `productionStatus`, production that progresses on its own or step by step from the
//! control API, injectable production exceptions, and a PRODUCE notification per step.
//!
//! What the simulator keeps of an order is what production and tracking need and nothing of
//! the sensitive authentication data: the card data is decrypted from the JWE, checked (PAN
//! digits and Luhn, expiry, CVC and track shapes, cardholder name), and only the masked PAN
//! (first 6 / last 4), the expiry and the embossing name are kept; the CVC and track data are
//! wiped when the request ends ([`ProductionCardData`] zeroizes itself).
//!
//! Choices the protocol leaves open (docs/d1-protocol.md):
//! - an order is identified by `(issuerId, issuerRequestId)`: a repeated request answers the
//!   first order's `operationId` (202) without looking at the card data again, so a retry is
//!   never a second card; the same `issuerRequestId` for another card is `409 INVALID_STATE`;
//! - the operation is `PENDING` from CARD_PROD_REQUESTED to CARD_PROD_DONE, `SUCCESSFUL` at
//!   CARD_SHIPPED (at CARD_PROD_DONE for INSTANT, which ships nothing) and `FAILED` at
//!   DATA_EXCEPTION, CARD_PROD_EXCEPTION and CARD_PROD_CANCELED;
//! - shipment tracking may be updated after CARD_SHIPPED (a new `status`/`message`), each
//!   update notified like a step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokengate_cards::{Expiry, Pan};
use tokengate_d1_protocol::issuer_orders::{
    BatchItemResult, BatchOrderRequest, BatchOrderResponse, DistributionChannel, MAX_BATCH,
    OrderFieldError, PRODUCTION_BATCH_PATH, PRODUCTION_PATH, PRODUCTION_STATUS_PATH,
    ProductionCardData, ProductionDetails, ProductionOrderRequest, ProductionOrderResponse,
    ProductionStage, ProductionStatusResponse, ShipmentTracking, valid_id,
};
use tokengate_d1_protocol::jose;

use super::api::{ApiError, ResetConnection, gate};
use super::context::Shared;
use super::faults::Op;
use super::notify::format_timestamp;
use super::state::{lock, random_id};

/// Path prefix of D1's issuer (banking) API, as in the real base URL.
pub const ISSUER_BASE_PATH: &str = "/banking/v1";

/// Receives a PRODUCE operation to notify: `(issuerId, operation object)`, the object in the
/// shape of one entry of a card-operations notification's `operations`.
pub type ProduceSink = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// How production behaves (`PUT /sim/orders/config`). Absent fields take the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct OrderConfig {
    /// Production advances REQUESTED -> READY -> DONE -> SHIPPED by itself.
    pub auto_progress: bool,
    /// Delay before each automatic step.
    pub step_delay_ms: u64,
    /// Cards whose production ends in this stage (DATA_EXCEPTION, CARD_PROD_EXCEPTION or
    /// CARD_PROD_CANCELED) instead of CARD_PROD_DONE.
    pub fail_cards: HashMap<String, ProductionStage>,
    /// The next this many production requests are processed and then answered by dropping the
    /// connection, as if the answer was lost: the order exists, the client does not know it.
    pub drop_responses: u32,
}

impl Default for OrderConfig {
    fn default() -> Self {
        OrderConfig {
            auto_progress: true,
            step_delay_ms: 100,
            fail_cards: HashMap::new(),
            drop_responses: 0,
        }
    }
}

const MAX_STEP_DELAY_MS: u64 = 60_000;

impl OrderConfig {
    fn validate(&self) -> Result<(), String> {
        if self.step_delay_ms > MAX_STEP_DELAY_MS {
            return Err(format!("stepDelayMs must be at most {MAX_STEP_DELAY_MS}"));
        }
        if let Some((card, _)) = self.fail_cards.iter().find(|(_, s)| !is_failure(s)) {
            return Err(format!(
                "failCards.{card} must be DATA_EXCEPTION, CARD_PROD_EXCEPTION or CARD_PROD_CANCELED"
            ));
        }
        Ok(())
    }
}

fn is_failure(s: &ProductionStage) -> bool {
    matches!(
        s,
        ProductionStage::DataException | ProductionStage::ProdException | ProductionStage::Canceled
    )
}

/// Order of the normal steps; failures and unknown stages have none.
fn rank(s: &ProductionStage) -> Option<u8> {
    match s {
        ProductionStage::Requested => Some(0),
        ProductionStage::Ready => Some(1),
        ProductionStage::Done => Some(2),
        ProductionStage::Shipped => Some(3),
        _ => None,
    }
}

/// One production order as the simulator keeps it: no CVC, no track data, no full PAN.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub issuer_id: String,
    pub card_id: String,
    pub issuer_request_id: String,
    pub operation_id: String,
    pub distribution_channel: DistributionChannel,
    /// First 6 and last 4 digits, the rest masked.
    pub masked_pan: String,
    pub card_expiry: String,
    pub cardholder_name: String,
    pub start_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    pub stage: ProductionStage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shipment: Option<ShipmentTracking>,
    /// Every step: (stage, time).
    pub history: Vec<(ProductionStage, String)>,
}

impl Order {
    /// The operation status this stage means (see the module docs).
    pub fn operation_status(&self) -> &'static str {
        match &self.stage {
            ProductionStage::Shipped => "SUCCESSFUL",
            ProductionStage::Done if self.distribution_channel == DistributionChannel::Instant => {
                "SUCCESSFUL"
            }
            s if is_failure(s) => "FAILED",
            _ => "PENDING",
        }
    }

    /// The entry of a card-operations notification for the current step.
    pub fn notification(&self) -> Value {
        let mut op = json!({
            "operationId": self.operation_id,
            "operation": "PRODUCE",
            "status": self.operation_status(),
            "startTime": self.start_time,
            "cardId": self.card_id,
            "issuerRequestId": self.issuer_request_id,
            "details": ProductionDetails {
                status: self.stage.clone(),
                shipment: self.shipment.clone(),
            },
        });
        if let Value::Object(map) = &mut op {
            if let Some(end) = &self.end_time {
                map.insert("endTime".into(), json!(end));
            }
            if is_failure(&self.stage) {
                map.insert("errorCode".into(), json!(self.stage.as_str()));
                map.insert(
                    "error".into(),
                    json!(match self.stage {
                        ProductionStage::DataException => "card data rejected by production",
                        ProductionStage::Canceled => "production canceled",
                        _ => "production failed (stock or template problem)",
                    }),
                );
            }
        }
        op
    }

    fn status_response(&self) -> ProductionStatusResponse {
        ProductionStatusResponse {
            card_id: self.card_id.clone(),
            operation_id: Some(self.operation_id.clone()),
            issuer_request_id: Some(self.issuer_request_id.clone()),
            details: ProductionDetails {
                status: self.stage.clone(),
                shipment: self.shipment.clone(),
            },
            updated_at: self.history.last().map(|(_, t)| t.clone()),
        }
    }
}

type OrderKey = (String, String);

#[derive(Default)]
struct Inner {
    orders: HashMap<OrderKey, Order>,
    /// (issuerId, cardId) -> issuerRequestIds, oldest first.
    by_card: HashMap<(String, String), Vec<String>>,
    config: OrderConfig,
    /// Production requests received per (issuerId, issuerRequestId), retries included.
    received: HashMap<OrderKey, u64>,
    /// Orders created per (issuerId, issuerRequestId): 1 unless a retry made a second card.
    created: HashMap<OrderKey, u64>,
}

/// What a production request led to.
pub enum Placed {
    New(Order),
    /// An earlier request with this `issuerRequestId` made this order.
    Existing(Order),
}

/// The simulator's production orders.
#[derive(Default)]
pub struct OrderBook {
    inner: Mutex<Inner>,
    sink: Mutex<Option<ProduceSink>>,
}

/// The card data kept from a decrypted `encryptedData`: nothing secret.
pub struct KeptCard {
    masked_pan: String,
    expiry: String,
    cardholder_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("no production order for this card")]
    NotFound,
    #[error("production is {0}; it cannot go to {1}")]
    Invalid(String, String),
}

impl OrderBook {
    /// Where PRODUCE notifications go; without a sink they are dropped.
    pub fn set_sink(&self, sink: Option<ProduceSink>) {
        *lock(&self.sink) = sink;
    }

    fn sink(&self) -> Option<ProduceSink> {
        lock(&self.sink).clone()
    }

    pub fn config(&self) -> OrderConfig {
        lock(&self.inner).config.clone()
    }

    pub fn set_config(&self, config: OrderConfig) -> Result<(), String> {
        config.validate()?;
        lock(&self.inner).config = config;
        Ok(())
    }

    /// Counts a production request and reports whether its answer is to be dropped.
    fn receive(&self, issuer_id: &str, request_id: &str) -> bool {
        let mut inner = lock(&self.inner);
        *inner
            .received
            .entry((issuer_id.to_owned(), request_id.to_owned()))
            .or_default() += 1;
        if inner.config.drop_responses > 0 {
            inner.config.drop_responses -= 1;
            return true;
        }
        false
    }

    /// The order of `(issuer, issuerRequestId)`, if any.
    pub fn find(&self, issuer_id: &str, request_id: &str) -> Option<Order> {
        lock(&self.inner)
            .orders
            .get(&(issuer_id.to_owned(), request_id.to_owned()))
            .cloned()
    }

    /// The order D1 knows as `operation_id` (get-operation answers PRODUCE operations too).
    pub fn by_operation(&self, issuer_id: &str, operation_id: &str) -> Option<Order> {
        lock(&self.inner)
            .orders
            .values()
            .find(|o| o.issuer_id == issuer_id && o.operation_id == operation_id)
            .cloned()
    }

    /// The latest order of a card.
    pub fn latest(&self, issuer_id: &str, card_id: &str) -> Option<Order> {
        let inner = lock(&self.inner);
        let req = inner
            .by_card
            .get(&(issuer_id.to_owned(), card_id.to_owned()))?
            .last()?;
        inner
            .orders
            .get(&(issuer_id.to_owned(), req.clone()))
            .cloned()
    }

    /// Places an order, or returns the one placed earlier with the same `issuerRequestId`.
    /// `Err` with the other card's id when that request id ordered another card.
    fn place(
        &self,
        issuer_id: &str,
        card_id: &str,
        req: &ProductionOrderRequest,
        card: KeptCard,
    ) -> Result<Placed, ApiError> {
        let now = now();
        let key = (issuer_id.to_owned(), req.issuer_request_id.clone());
        let mut inner = lock(&self.inner);
        if let Some(existing) = inner.orders.get(&key) {
            return existing_for(existing, card_id);
        }
        let order = Order {
            issuer_id: issuer_id.to_owned(),
            card_id: card_id.to_owned(),
            issuer_request_id: req.issuer_request_id.clone(),
            operation_id: random_id("prodop_", 18),
            distribution_channel: req.distribution_channel,
            masked_pan: card.masked_pan,
            card_expiry: card.expiry,
            cardholder_name: card.cardholder_name,
            start_time: now.clone(),
            end_time: None,
            stage: ProductionStage::Requested,
            shipment: None,
            history: vec![(ProductionStage::Requested, now)],
        };
        inner.orders.insert(key.clone(), order.clone());
        inner
            .by_card
            .entry((issuer_id.to_owned(), card_id.to_owned()))
            .or_default()
            .push(req.issuer_request_id.clone());
        *inner.created.entry(key).or_default() += 1;
        Ok(Placed::New(order))
    }

    /// Moves the card's latest order to `stage` (with `shipment` tracking for CARD_SHIPPED).
    /// Normal steps only go forward; a failure is allowed from any step before shipping;
    /// nothing follows a failure; a shipped card only gets tracking updates.
    pub fn step(
        &self,
        issuer_id: &str,
        card_id: &str,
        stage: ProductionStage,
        shipment: Option<ShipmentTracking>,
    ) -> Result<Order, StepError> {
        let order = {
            let mut inner = lock(&self.inner);
            let req = inner
                .by_card
                .get(&(issuer_id.to_owned(), card_id.to_owned()))
                .and_then(|v| v.last())
                .cloned()
                .ok_or(StepError::NotFound)?;
            let order = inner
                .orders
                .get_mut(&(issuer_id.to_owned(), req))
                .ok_or(StepError::NotFound)?;
            apply_step(order, stage, shipment)?;
            order.clone()
        };
        Ok(order)
    }

    /// An automatic step: applied only when the order is still at `from` (a manual step or a
    /// failure in between wins).
    fn auto_step(&self, key: &OrderKey, from: &ProductionStage) -> Option<Order> {
        let order = {
            let mut inner = lock(&self.inner);
            let fail = inner.config.fail_cards.clone();
            let order = inner.orders.get_mut(key)?;
            if &order.stage != from {
                return None;
            }
            let next = match from {
                ProductionStage::Requested => ProductionStage::Ready,
                ProductionStage::Ready => match fail.get(&order.card_id) {
                    Some(f) => f.clone(),
                    None => ProductionStage::Done,
                },
                ProductionStage::Done
                    if order.distribution_channel != DistributionChannel::Instant =>
                {
                    ProductionStage::Shipped
                }
                _ => return None,
            };
            let tracking = (next == ProductionStage::Shipped).then(new_tracking);
            apply_step(order, next, tracking).ok()?;
            order.clone()
        };
        Some(order)
    }

    /// `/sim/stats` `productionOrders`: requests and orders per `issuerId/issuerRequestId`.
    pub fn stats_json(&self) -> Value {
        let inner = lock(&self.inner);
        let per = |m: &HashMap<OrderKey, u64>| -> serde_json::Map<String, Value> {
            m.iter()
                .map(|((i, r), n)| (format!("{i}/{r}"), json!(n)))
                .collect()
        };
        json!({
            "ordersCreated": inner.created.values().sum::<u64>(),
            "requests": inner.received.values().sum::<u64>(),
            "createdByIssuerRequestId": per(&inner.created),
            "requestsByIssuerRequestId": per(&inner.received),
        })
    }
}

/// Notifies the current step of `order`: to the sink when one is set (tests), else as a
/// card-operations notification to the gateway (`{"operations": [...]}`, with the notifier's
/// redelivery, duplicate and reorder behaviour).
fn announce(shared: &Shared, order: &Order) {
    if let Some(sink) = shared.orders.sink() {
        sink(&order.issuer_id, order.notification());
        return;
    }
    shared.notifier.emit_to(
        format!("/notifications/d1/v2/issuers/{}/cards", order.issuer_id),
        &order.operation_id,
        &json!({ "operations": [order.notification()] }),
    );
}

fn existing_for(existing: &Order, card_id: &str) -> Result<Placed, ApiError> {
    if existing.card_id == card_id {
        Ok(Placed::Existing(existing.clone()))
    } else {
        Err(ApiError::InvalidState(
            "issuerRequestId was already used for another card".into(),
        ))
    }
}

fn apply_step(
    order: &mut Order,
    stage: ProductionStage,
    shipment: Option<ShipmentTracking>,
) -> Result<(), StepError> {
    let refuse = |o: &Order, s: &ProductionStage| {
        StepError::Invalid(o.stage.as_str().to_owned(), s.as_str().to_owned())
    };
    let from = &order.stage;
    let ok = match (&stage, rank(from), rank(&stage)) {
        // Tracking update of a shipped card.
        (ProductionStage::Shipped, Some(3), _) => shipment.is_some(),
        (_, None, _) => false,
        (ProductionStage::Other(_), _, _) => false,
        (s, Some(r), _) if is_failure(s) => r < 3,
        (ProductionStage::Shipped, _, _)
            if order.distribution_channel == DistributionChannel::Instant =>
        {
            false
        }
        (_, Some(a), Some(b)) => b > a,
        _ => false,
    };
    if !ok {
        return Err(refuse(order, &stage));
    }
    let now = now();
    if stage == ProductionStage::Shipped {
        order.shipment = Some(shipment.unwrap_or_else(new_tracking));
    }
    order.stage = stage.clone();
    order.history.push((stage, now.clone()));
    if order.operation_status() != "PENDING" {
        order.end_time = Some(now);
    }
    Ok(())
}

fn new_tracking() -> ShipmentTracking {
    let number = format!("SP{:010}", rand::random_range(0..10_000_000_000u64));
    ShipmentTracking {
        carrier: Some("SIMPOST".into()),
        tracking_url: Some(format!("https://tracking.sim.invalid/{number}")),
        tracking_number: Some(number),
        status: Some("IN_TRANSIT".into()),
        message: Some("handed over to the carrier".into()),
    }
}

fn now() -> String {
    format_timestamp(OffsetDateTime::now_utc())
}

/// `Pan`'s Display is the PCI DSS mask (first 6, `*`, last 4).
fn masked(pan: &Pan) -> String {
    pan.to_string()
}

// --- D1 API ------------------------------------------------------------------------------------

/// The order routes under [`ISSUER_BASE_PATH`], each behind the API's one gate (counting,
/// faults, correlation id, bearer token).
pub fn routes(shared: &Arc<Shared>) -> Router<Arc<Shared>> {
    let g = |op: Op| from_fn_with_state((shared.clone(), op), gate);
    let path = |t: &str| {
        format!(
            "{ISSUER_BASE_PATH}{}",
            t.replace("{issuerId}", "{issuer_id}")
                .replace("{cardId}", "{card_id}")
        )
    };
    Router::new()
        .route(
            &path(PRODUCTION_PATH),
            post(order_card).route_layer(g(Op::Production)),
        )
        .route(
            &path(PRODUCTION_BATCH_PATH),
            post(order_batch).route_layer(g(Op::ProductionBatch)),
        )
        .route(
            &path(PRODUCTION_STATUS_PATH),
            get(production_status).route_layer(g(Op::ProductionStatus)),
        )
}

fn field_error(e: OrderFieldError) -> ApiError {
    if e.missing {
        ApiError::MissingField(e.to_string())
    } else {
        ApiError::InvalidField(e.to_string())
    }
}

fn check_ids(issuer_id: &str, card_id: &str) -> Result<(), ApiError> {
    if issuer_id.chars().count() != 10 {
        return Err(ApiError::InvalidField(
            "issuerId must have exactly 10 characters".into(),
        ));
    }
    if !valid_id(card_id, 48) {
        return Err(ApiError::InvalidField(
            "cardId must match ^[A-Za-z0-9_-]{1,48}$".into(),
        ));
    }
    Ok(())
}

/// Decrypts and checks the card data; keeps the masked PAN, expiry and name. Error texts name
/// the field only (a serde message could quote the plaintext).
fn open_card(shared: &Shared, compact: &str) -> Result<KeptCard, ApiError> {
    let keys = &shared.keys.jwe;
    let (_kid, plaintext) = jose::jwe_decrypt_with(compact, &|kid| keys.get(kid))
        .map_err(|e| ApiError::InvalidField(format!("encryptedData: {e}")))?;
    let card: ProductionCardData = serde_json::from_slice(&plaintext).map_err(|_| {
        ApiError::InvalidField(
            "encryptedData must hold {pan, exp, cvc, track1?, track2?, cardholderName}".into(),
        )
    })?;
    card.validate_shape()
        .map_err(|e| ApiError::InvalidField(format!("encryptedData.{e}")))?;
    let pan: Pan = card.pan.parse().map_err(|e: tokengate_cards::CardError| {
        ApiError::InvalidField(format!("encryptedData.pan: {e}"))
    })?;
    let expiry = Expiry::from_mmyy(&card.exp)
        .ok_or_else(|| ApiError::InvalidField("encryptedData.exp must be MMYY".into()))?;
    if !expiry.is_current(OffsetDateTime::now_utc()) {
        return Err(ApiError::InvalidField("the card is expired".into()));
    }
    Ok(KeptCard {
        masked_pan: masked(&pan),
        expiry: card.exp.clone(),
        cardholder_name: card.cardholder_name.clone(),
    })
    // `card` (CVC, tracks, PAN) and `pan` are wiped here.
}

/// One order: validation, dedup on `issuerRequestId`, card data, placement, progression.
fn order_one(
    shared: &Arc<Shared>,
    issuer_id: &str,
    card_id: &str,
    req: &ProductionOrderRequest,
) -> Result<Placed, ApiError> {
    check_ids(issuer_id, card_id)?;
    req.validate().map_err(field_error)?;
    // A card the issuer deleted at D1 is never produced again.
    if shared.issuer.is_deleted(issuer_id, card_id) {
        return Err(ApiError::CardDeleted);
    }
    // A retry answers the first order before the card data is even looked at: that is what
    // makes a retry after a lost answer safe.
    if let Some(existing) = shared.orders.find(issuer_id, &req.issuer_request_id) {
        return existing_for(&existing, card_id);
    }
    let card = open_card(shared, &req.encrypted_data)?;
    let placed = shared.orders.place(issuer_id, card_id, req, card)?;
    if let Placed::New(order) = &placed {
        tracing::info!(card_id = %card_id, operation_id = %order.operation_id, "production ordered");
        announce(shared, order);
        spawn_progress(shared, order);
    }
    Ok(placed)
}

fn spawn_progress(shared: &Arc<Shared>, order: &Order) {
    let config = shared.orders.config();
    if !config.auto_progress {
        return;
    }
    let delay = Duration::from_millis(config.step_delay_ms);
    let key = (order.issuer_id.clone(), order.issuer_request_id.clone());
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut from = ProductionStage::Requested;
        loop {
            tokio::time::sleep(delay).await;
            let Some(o) = shared.orders.auto_step(&key, &from) else {
                return;
            };
            announce(&shared, &o);
            if o.stage.is_final() {
                return;
            }
            from = o.stage;
        }
    });
}

fn accepted(order: &Order) -> Response {
    (
        StatusCode::ACCEPTED,
        axum::Json(ProductionOrderResponse {
            operation_id: order.operation_id.clone(),
            status: Some(order.operation_status().to_owned()),
        }),
    )
        .into_response()
}

fn lost_answer() -> Response {
    let mut resp = StatusCode::INTERNAL_SERVER_ERROR.into_response();
    resp.extensions_mut().insert(ResetConnection);
    resp
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    // The serde message names fields and types, never the value (the card data is inside a
    // JWE string here, and strings are not quoted by serde's type errors).
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_data() {
            "body does not match the order schema"
        } else {
            "body must be a JSON object"
        };
        ApiError::InvalidField(what.into())
    })
}

/// `POST /issuers/{issuerId}/physicalCards/{cardId}/operations:production` -> 202.
async fn order_card(
    State(shared): State<Arc<Shared>>,
    Path((issuer_id, card_id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ProductionOrderRequest = parse(&body)?;
    let drop_answer = shared.orders.receive(&issuer_id, &req.issuer_request_id);
    let placed = order_one(&shared, &issuer_id, &card_id, &req)?;
    if drop_answer {
        return Ok(lost_answer());
    }
    let (Placed::New(order) | Placed::Existing(order)) = placed;
    Ok(accepted(&order))
}

/// `POST /issuers/{issuerId}/physicalCards/operations:production` (batch) -> 202 with one
/// result per card, in request order; a card's failure does not fail the others.
async fn order_batch(
    State(shared): State<Arc<Shared>>,
    Path(issuer_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: BatchOrderRequest = parse(&body)?;
    if req.orders.is_empty() || req.orders.len() > MAX_BATCH {
        return Err(ApiError::InvalidField(format!(
            "orders must have 1 to {MAX_BATCH} items"
        )));
    }
    let mut results = Vec::with_capacity(req.orders.len());
    let mut drop_answer = false;
    for item in &req.orders {
        drop_answer |= shared
            .orders
            .receive(&issuer_id, &item.order.issuer_request_id);
        let mut r = BatchItemResult {
            card_id: item.card_id.clone(),
            issuer_request_id: item.order.issuer_request_id.clone(),
            operation_id: None,
            error_code: None,
            error: None,
        };
        match order_one(&shared, &issuer_id, &item.card_id, &item.order) {
            Ok(Placed::New(o) | Placed::Existing(o)) => r.operation_id = Some(o.operation_id),
            Err(e) => {
                let (code, msg) = e.code_and_message();
                r.error_code = Some(code.to_owned());
                r.error = Some(msg);
            }
        }
        results.push(r);
    }
    if drop_answer {
        return Ok(lost_answer());
    }
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(BatchOrderResponse { results }),
    )
        .into_response())
}

/// `GET /issuers/{issuerId}/physicalCards/{cardId}/productionStatus`: the latest order.
async fn production_status(
    State(shared): State<Arc<Shared>>,
    Path((issuer_id, card_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_ids(&issuer_id, &card_id)?;
    let order = shared
        .orders
        .latest(&issuer_id, &card_id)
        .ok_or(ApiError::NotFound("no production order for this card"))?;
    Ok(axum::Json(order.status_response()).into_response())
}

// --- control API -------------------------------------------------------------------------------

/// `/sim/orders/config` (GET, PUT, DELETE) and
/// `POST /sim/issuers/{issuerId}/physicalCards/{cardId}/production` (a step).
pub fn control_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/sim/orders/config",
            put(put_config).get(get_config).delete(reset_config),
        )
        .route(
            "/sim/issuers/{issuer_id}/physicalCards/{card_id}/production",
            post(control_step).get(control_order),
        )
}

async fn get_config(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.orders.config()).into_response()
}

async fn put_config(State(shared): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let config: OrderConfig = serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidField(format!("orders config: {e}")))?;
    shared
        .orders
        .set_config(config.clone())
        .map_err(ApiError::InvalidField)?;
    Ok(axum::Json(config).into_response())
}

async fn reset_config(State(shared): State<Arc<Shared>>) -> Response {
    let config = OrderConfig::default();
    // The default configuration is valid.
    let _ = shared.orders.set_config(config.clone());
    axum::Json(config).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StepRequest {
    status: ProductionStage,
    shipment: Option<ShipmentTracking>,
}

/// A production step as if the personalisation centre reported it; notified like any step.
async fn control_step(
    State(shared): State<Arc<Shared>>,
    Path((issuer_id, card_id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: StepRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::InvalidField(format!(
            "body must be {{\"status\": <production stage>, \"shipment\"?: {{...}}}}: {e}"
        ))
    })?;
    let order = shared
        .orders
        .step(&issuer_id, &card_id, req.status, req.shipment)
        .map_err(|e| match e {
            StepError::NotFound => ApiError::NotFound("no production order for this card"),
            e @ StepError::Invalid(..) => ApiError::InvalidState(e.to_string()),
        })?;
    announce(&shared, &order);
    Ok(axum::Json(order).into_response())
}

/// The latest order of a card as the simulator keeps it (tests check what is kept).
async fn control_order(
    State(shared): State<Arc<Shared>>,
    Path((issuer_id, card_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let order = shared
        .orders
        .latest(&issuer_id, &card_id)
        .ok_or(ApiError::NotFound("no production order for this card"))?;
    Ok(axum::Json(order).into_response())
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use tokengate_d1_protocol::issuer_orders::{Address, Services, Shipment};

    use super::*;

    fn req(id: &str, channel: DistributionChannel) -> ProductionOrderRequest {
        ProductionOrderRequest {
            issuer_request_id: id.into(),
            distribution_channel: channel,
            services: Services {
                product_id: "P1".into(),
                ..Default::default()
            },
            encrypted_data: "x".into(),
            shipment: Some(Shipment {
                delivery_type: "CARDHOLDER".into(),
                address: Some(Address {
                    line1: "1 Main St".into(),
                    city: "Paris".into(),
                    postal_code: "75001".into(),
                    country: "FR".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            payment_application: None,
        }
    }

    fn kept() -> KeptCard {
        KeptCard {
            masked_pan: "411111******1111".into(),
            expiry: "1230".into(),
            cardholder_name: "JANE DOE".into(),
        }
    }

    #[test]
    fn same_request_id_is_the_same_order() {
        let book = OrderBook::default();
        let a = match book
            .place(
                "ISSUER0001",
                "card-1",
                &req("r1", DistributionChannel::Thales),
                kept(),
            )
            .unwrap()
        {
            Placed::New(o) => o,
            Placed::Existing(_) => panic!("first is new"),
        };
        let Placed::Existing(b) = book
            .place(
                "ISSUER0001",
                "card-1",
                &req("r1", DistributionChannel::Thales),
                kept(),
            )
            .unwrap()
        else {
            panic!("second is the same order")
        };
        assert_eq!(a.operation_id, b.operation_id);
        assert!(
            book.place(
                "ISSUER0001",
                "card-2",
                &req("r1", DistributionChannel::Thales),
                kept()
            )
            .is_err()
        );
        let stats = book.stats_json();
        assert_eq!(stats["ordersCreated"], 1);
        assert_eq!(stats["createdByIssuerRequestId"]["ISSUER0001/r1"], 1);
    }

    #[test]
    fn steps_go_forward_and_failures_are_final() {
        let book = OrderBook::default();
        book.place(
            "ISSUER0001",
            "c1",
            &req("r1", DistributionChannel::Thales),
            kept(),
        )
        .unwrap();
        assert!(
            book.step("ISSUER0001", "c1", ProductionStage::Requested, None)
                .is_err()
        );
        book.step("ISSUER0001", "c1", ProductionStage::Ready, None)
            .unwrap();
        let o = book
            .step("ISSUER0001", "c1", ProductionStage::Done, None)
            .unwrap();
        assert_eq!(o.operation_status(), "PENDING");
        let o = book
            .step("ISSUER0001", "c1", ProductionStage::Shipped, None)
            .unwrap();
        assert_eq!(o.operation_status(), "SUCCESSFUL");
        assert!(o.shipment.as_ref().unwrap().tracking_number.is_some());
        assert!(o.end_time.is_some());
        assert!(
            book.step("ISSUER0001", "c1", ProductionStage::ProdException, None)
                .is_err()
        );
        assert_eq!(o.history.len(), 4);
        let n = o.notification();
        assert_eq!(n["details"]["status"], "CARD_SHIPPED");
        assert_eq!(n["operation"], "PRODUCE");
        assert_eq!(n["issuerRequestId"], "r1");

        book.place(
            "ISSUER0001",
            "c2",
            &req("r2", DistributionChannel::Central),
            kept(),
        )
        .unwrap();
        let f = book
            .step("ISSUER0001", "c2", ProductionStage::DataException, None)
            .unwrap();
        assert_eq!(f.operation_status(), "FAILED");
        assert_eq!(f.notification()["errorCode"], "DATA_EXCEPTION");
        assert!(
            book.step("ISSUER0001", "c2", ProductionStage::Ready, None)
                .is_err()
        );
    }

    #[test]
    fn auto_steps_yield_to_manual_ones_and_honour_fail_cards() {
        let book = OrderBook::default();
        let mut cfg = OrderConfig::default();
        cfg.fail_cards
            .insert("c1".into(), ProductionStage::ProdException);
        book.set_config(cfg).unwrap();
        book.place(
            "ISSUER0001",
            "c1",
            &req("r1", DistributionChannel::Thales),
            kept(),
        )
        .unwrap();
        let key = ("ISSUER0001".to_owned(), "r1".to_owned());
        assert!(book.auto_step(&key, &ProductionStage::Ready).is_none());
        book.auto_step(&key, &ProductionStage::Requested).unwrap();
        let o = book.auto_step(&key, &ProductionStage::Ready).unwrap();
        assert_eq!(o.stage, ProductionStage::ProdException);
        let mut bad = OrderConfig::default();
        bad.fail_cards.insert("c".into(), ProductionStage::Shipped);
        assert!(book.set_config(bad).is_err());
    }

    #[test]
    fn instant_orders_succeed_when_done() {
        let book = OrderBook::default();
        let mut r = req("r1", DistributionChannel::Instant);
        r.shipment = None;
        book.place("ISSUER0001", "c1", &r, kept()).unwrap();
        let key = ("ISSUER0001".to_owned(), "r1".to_owned());
        book.auto_step(&key, &ProductionStage::Requested).unwrap();
        let o = book.auto_step(&key, &ProductionStage::Ready).unwrap();
        assert_eq!(o.operation_status(), "SUCCESSFUL");
        assert!(book.auto_step(&key, &ProductionStage::Done).is_none());
        assert!(
            book.step("ISSUER0001", "c1", ProductionStage::Shipped, None)
                .is_err()
        );
    }
}
