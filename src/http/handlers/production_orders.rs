//! Physical card orders for issuers (docs/issuer-orders.md): order a card's production (`202`
//! with the operation), order a batch of 1 to 1,000 cards (a result per card), and read a
//! card's production status with its full history and shipment tracking.
//!
//! The card data of an order (PAN, expiry, CVC, track data, cardholder name) is parsed straight
//! into wiping types (`tokengate_cards`), encrypted to D1 by the D1 client and dropped; the
//! request body is wiped when the handler returns. It is never stored, logged or echoed: the
//! answers carry the masked PAN at most, and an idempotent replay stores only the answer.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokengate_cards::{Cvc, EmbossName, Expiry, Pan, Track1, Track2};
use utoipa::ToSchema;
use zeroize::Zeroize;

use crate::domain::DomainError;
use crate::domain::audit::AuditAction;
use crate::domain::issuer_ops::OperationTarget;
use crate::domain::production_orders::{
    Delivery, DistributionChannel, OrderServices, OrderShipment, OrderSpec, PaymentApplication,
    PostalAddress, ProductionCard, ProductionEvent, ProductionOrder, ShipmentTracking,
};
use crate::domain::production_service::{BatchItem, MAX_BATCH, Placed};
use crate::http::audit::{self, AuditCtx, Subject};
use crate::http::auth::IssuerAuth;
use crate::http::extract::{Body, parse_json};
use crate::http::handlers::issuers::OperationView;
use crate::http::idempotency::{Reply, key_from, run_idempotent};
use crate::http::params::IdempotencyKeyHeader;
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

/// The card data to personalise. Never stored, logged or echoed.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = ProductionCardData)]
pub struct CardDataInput {
    /// 12-19 digits, Luhn-valid.
    #[schema(value_type = String, example = "4111111111111111")]
    pub pan: Pan,
    /// `MMYY`, not in the past.
    #[schema(example = "1230", pattern = "^[0-9]{4}$")]
    pub exp: String,
    /// Card security code, 3 or 4 digits.
    #[schema(value_type = String, example = "737", pattern = "^[0-9]{3,4}$")]
    pub cvc: Cvc,
    /// Magnetic-stripe track 1 without sentinels (ISO 7813 format B).
    #[serde(default)]
    #[schema(value_type = Option<String>, max_length = 76)]
    pub track1: Option<Track1>,
    /// Magnetic-stripe track 2 without sentinels (digits and `=`).
    #[serde(default)]
    #[schema(value_type = Option<String>, max_length = 37)]
    pub track2: Option<Track2>,
    /// The name to emboss: 2 to 26 letters, digits, spaces or `. ' - /`.
    #[schema(value_type = String, example = "ADA LOVELACE", max_length = 26)]
    pub cardholder_name: EmbossName,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = ProductionServices)]
pub struct ServicesInput {
    /// The card product configured at onboarding with D1.
    #[schema(example = "VISA_CLASSIC_01")]
    pub product_id: String,
    pub packaging: Option<String>,
    /// Carrier letter template.
    pub card_carrier: Option<String>,
    /// INSTANT only: the branch or kiosk whose printer produces the card.
    pub issuance_location: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = PostalAddress)]
pub struct AddressInput {
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2.
    #[schema(example = "FR")]
    pub country: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = ProductionShipment)]
pub struct ShipmentInput {
    /// `CARDHOLDER` (to `address`) or `BULK` (CENTRAL only, to `bulkDestinationId`).
    #[schema(example = "CARDHOLDER")]
    pub delivery_type: String,
    #[schema(example = "STANDARD")]
    pub method: Option<String>,
    pub recipient_name: Option<String>,
    pub address: Option<AddressInput>,
    pub bulk_destination_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = ProductionPaymentApplication)]
pub struct PaymentApplicationInput {
    /// Chip personalisation profile configured at onboarding.
    pub profile_id: String,
    /// EMV application identifier, 10 to 32 hex digits.
    pub aid: Option<String>,
}

/// `POST /v1/issuer/cards/{card_id}/production-orders`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductionOrderRequest {
    /// Your id of this order, `^[A-Za-z0-9_-]{1,64}$`: the same id on a retry is the same
    /// order, never a second card.
    #[schema(example = "order-2026-000042")]
    pub issuer_request_id: String,
    /// `THALES`, `INSTANT` or `CENTRAL`.
    #[schema(example = "CENTRAL")]
    pub distribution_channel: String,
    pub card: CardDataInput,
    pub services: ServicesInput,
    pub shipment: Option<ShipmentInput>,
    pub payment_application: Option<PaymentApplicationInput>,
}

/// One card of `POST /v1/issuer/production-orders/batch`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchOrderInput {
    #[schema(example = "271b-6e47-8ec3-7f3f")]
    pub card_id: String,
    #[serde(flatten)]
    pub order: ProductionOrderRequest,
}

/// `POST /v1/issuer/production-orders/batch`: 1 to 1,000 cards.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchOrderRequest {
    /// Items are parsed one by one: a malformed item fails alone (its result says why).
    #[schema(value_type = Vec<BatchOrderInput>, min_items = 1, max_items = 1000)]
    pub orders: Vec<serde_json::Value>,
}

/// The result of one card of a batch, in request order.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchItemResult {
    pub index: usize,
    pub card_id: Option<String>,
    pub issuer_request_id: Option<String>,
    /// HTTP status this card would have had alone: `202`, or a 4xx/5xx.
    #[schema(example = 202)]
    pub status: u16,
    pub operation: Option<OperationView>,
    /// The problem of a failed card (`application/problem+json` fields).
    #[schema(value_type = Option<Object>)]
    pub problem: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchOrderResponse {
    pub accepted: usize,
    pub failed: usize,
    pub results: Vec<BatchItemResult>,
}

/// A step of production.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductionStepView {
    /// `CARD_PROD_REQUESTED`, `CARD_PROD_READY`, `CARD_PROD_DONE`, `DATA_EXCEPTION`,
    /// `CARD_PROD_EXCEPTION`, `CARD_PROD_CANCELED`, `CARD_SHIPPED` (new values may appear).
    #[schema(example = "CARD_PROD_READY")]
    pub status: String,
    #[schema(format = DateTime)]
    pub at: String,
    pub shipment: Option<ShipmentView>,
    pub error_code: Option<String>,
}

/// Shipment tracking, as D1 reports it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShipmentView {
    pub carrier: Option<String>,
    pub tracking_number: Option<String>,
    pub status: Option<String>,
    pub message: Option<String>,
    pub tracking_url: Option<String>,
}

/// One order of a card: where production stands and how it got there.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductionOrderView {
    pub issuer_request_id: String,
    /// The order's operation (`GET /v1/issuer/operations/{operationId}`).
    pub operation_id: Option<String>,
    pub distribution_channel: &'static str,
    /// First 6 and last 4 digits.
    #[schema(example = "411111******1111")]
    pub masked_pan: String,
    #[schema(example = "CARD_SHIPPED")]
    pub status: String,
    pub shipment: Option<ShipmentView>,
    /// Every step, oldest first.
    pub history: Vec<ProductionStepView>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// `GET /v1/issuer/cards/{card_id}/production-status`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductionStatusView {
    pub card_id: String,
    /// The card's latest order.
    pub current: ProductionOrderView,
    /// Earlier orders of the card (reissues), newest first.
    pub earlier_orders: Vec<ProductionOrderView>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn shipment_view(s: &ShipmentTracking) -> ShipmentView {
    ShipmentView {
        carrier: s.carrier.clone(),
        tracking_number: s.tracking_number.clone(),
        status: s.status.clone(),
        message: s.message.clone(),
        tracking_url: s.tracking_url.clone(),
    }
}

fn step_view(e: &ProductionEvent) -> ProductionStepView {
    ProductionStepView {
        status: e.status.as_str().to_owned(),
        at: rfc3339(e.at),
        shipment: e.shipment.as_ref().map(shipment_view),
        error_code: e.error_code.clone(),
    }
}

impl From<&ProductionOrder> for ProductionOrderView {
    fn from(o: &ProductionOrder) -> Self {
        ProductionOrderView {
            issuer_request_id: o.issuer_request_id.clone(),
            operation_id: o.operation_id.clone(),
            distribution_channel: o.distribution_channel.as_str(),
            masked_pan: o.masked_pan.clone(),
            status: o.status.as_str().to_owned(),
            shipment: o.shipment.as_ref().map(shipment_view),
            history: o.history.iter().map(step_view).collect(),
            created_at: rfc3339(o.created_at),
            updated_at: rfc3339(o.updated_at),
        }
    }
}

fn invalid(code: &'static str, detail: &str) -> DomainError {
    DomainError::Validation {
        code,
        detail: detail.to_owned(),
    }
}

/// The request as the domain takes it: the options and the card data.
fn into_domain(
    req: ProductionOrderRequest,
) -> Result<(String, OrderSpec, ProductionCard), DomainError> {
    let channel = DistributionChannel::parse(&req.distribution_channel).ok_or_else(|| {
        invalid(
            "invalid_production_order",
            "distributionChannel must be THALES, INSTANT or CENTRAL",
        )
    })?;
    let c = req.card;
    let expiry = Expiry::from_mmyy(&c.exp)
        .ok_or_else(|| invalid("invalid_expiry", "card.exp must be MMYY"))?;
    if !expiry.is_current(OffsetDateTime::now_utc()) {
        return Err(DomainError::InvalidCard(
            tokengate_cards::CardError::Expired,
        ));
    }
    let shipment = match req.shipment {
        None => None,
        Some(s) => Some(OrderShipment {
            delivery: match (s.delivery_type.as_str(), s.address, s.bulk_destination_id) {
                ("CARDHOLDER", Some(a), None) => Delivery::Cardholder(PostalAddress {
                    line1: a.line1,
                    line2: a.line2,
                    city: a.city,
                    postal_code: a.postal_code,
                    country: a.country,
                }),
                ("CARDHOLDER", None, _) => {
                    return Err(invalid(
                        "invalid_production_order",
                        "shipment.address is required for a CARDHOLDER delivery",
                    ));
                }
                ("BULK", None, Some(d)) => Delivery::Bulk { destination_id: d },
                ("BULK", _, None) => {
                    return Err(invalid(
                        "invalid_production_order",
                        "shipment.bulkDestinationId is required for a BULK delivery",
                    ));
                }
                ("CARDHOLDER" | "BULK", _, _) => {
                    return Err(invalid(
                        "invalid_production_order",
                        "a CARDHOLDER delivery takes an address, a BULK one a bulkDestinationId, not both",
                    ));
                }
                _ => {
                    return Err(invalid(
                        "invalid_production_order",
                        "shipment.deliveryType must be CARDHOLDER or BULK",
                    ));
                }
            },
            method: s.method,
            recipient_name: s.recipient_name,
        }),
    };
    let spec = OrderSpec {
        channel,
        services: OrderServices {
            product_id: req.services.product_id,
            packaging: req.services.packaging,
            card_carrier: req.services.card_carrier,
            issuance_location: req.services.issuance_location,
        },
        shipment,
        payment_application: req.payment_application.map(|a| PaymentApplication {
            profile_id: a.profile_id,
            aid: a.aid,
        }),
    };
    let card = ProductionCard {
        pan: c.pan,
        expiry,
        cvc: c.cvc,
        track1: c.track1,
        track2: c.track2,
        cardholder_name: c.cardholder_name,
    };
    Ok((req.issuer_request_id, spec, card))
}

/// Wipes the request body (it held the card data) if no one else holds it.
fn wipe(body: Bytes) {
    if let Ok(mut m) = body.try_into_mut() {
        m.zeroize();
    }
}

/// Orders the production of a physical card. `202` with the order's operation (`PENDING`;
/// production progress arrives by D1's notifications). The same `issuerRequestId` again is the
/// same order: the same operation is answered and no second card is made.
#[utoipa::path(post, path = "/v1/issuer/cards/{card_id}/production-orders", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("card_id" = String, Path, description = "D1's card id"), IdempotencyKeyHeader),
    request_body = ProductionOrderRequest,
    responses(
        (status = 202, description = "The order's operation (PENDING until shipped or failed)", body = OperationView),
        codes::ProductionOrderProblems,
    ))]
pub async fn order_card(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    ctx: AuditCtx,
    Path(card_id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let path = format!("/v1/issuer/cards/{card_id}/production-orders");
    let parts: [&[u8]; 3] = [b"POST", path.as_bytes(), &body];
    let parsed: Result<ProductionOrderRequest, ApiError> = parse_json(&body);
    let resp = run_idempotent(&state, issuer.id.as_str(), key, &parts, || async {
        let result = async {
            let (request_id, spec, card) = into_domain(parsed?)?;
            Ok::<Placed, ApiError>(
                state
                    .production
                    .place_order(&issuer, &card_id, &request_id, &spec, card)
                    .await?,
            )
        }
        .await;
        // The card id and the operation, never the card data.
        let target = OperationTarget::Card(card_id.clone());
        let op_id = result.as_ref().ok().map(|p| p.operation.id.as_str());
        audit::record_best_effort(
            &state,
            &ctx,
            &issuer.id,
            AuditAction::ProductionOrderCreate,
            super::click_to_pay::subject(&target, op_id),
            audit::outcome(&result),
        )
        .await;
        match result {
            Ok(p) => Reply::json(StatusCode::ACCEPTED, &OperationView::from(&p.operation)),
            Err(e) => e.into(),
        }
    })
    .await;
    wipe(body);
    resp
}

/// Orders 1 to 1,000 cards in one request (one D1 call). `207` with a result per card, in
/// request order: `202` and the operation, or the card's problem. A card's failure does not
/// fail the others; each card follows the single order's rules (its `issuerRequestId` is its
/// identity). `422` for an empty batch or one of more than 1,000 cards.
#[utoipa::path(post, path = "/v1/issuer/production-orders/batch", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(IdempotencyKeyHeader),
    request_body = BatchOrderRequest,
    responses(
        (status = 207, description = "A result per card, in request order", body = BatchOrderResponse),
        codes::ProductionBatchProblems,
    ))]
pub async fn order_batch(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    ctx: AuditCtx,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let parts: [&[u8]; 3] = [b"POST", b"/v1/issuer/production-orders/batch", &body];
    let parsed: Result<BatchOrderRequest, ApiError> = parse_json(&body);
    let resp = run_idempotent(&state, issuer.id.as_str(), key, &parts, || async {
        let r = batch(&state, &issuer, parsed).await;
        // One event for the batch: its outcome is the request's (each card's own result is in
        // the answer; per-card events would cost up to 1,000 appends per request).
        audit::record_best_effort(
            &state,
            &ctx,
            &issuer.id,
            AuditAction::ProductionOrderBatch,
            Subject::None,
            audit::outcome(&r),
        )
        .await;
        match r {
            Ok(reply) => reply,
            Err(e) => e.into(),
        }
    })
    .await;
    wipe(body);
    resp
}

/// The batch order itself: the `207` answer, or the request's own problem.
async fn batch(
    state: &AppState,
    issuer: &crate::domain::issuer::Issuer,
    parsed: Result<BatchOrderRequest, ApiError>,
) -> Result<Reply, ApiError> {
    let req = parsed?;
    if req.orders.is_empty() || req.orders.len() > MAX_BATCH {
        return Err(ApiError::of(
            &codes::INVALID_BATCH_SIZE,
            format!("orders must have 1 to {MAX_BATCH} items"),
        ));
    }
    let mut ids: Vec<(Option<String>, Option<String>)> = Vec::with_capacity(req.orders.len());
    let mut items = Vec::with_capacity(req.orders.len());
    for mut v in req.orders {
        let id = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        ids.push((id("cardId"), id("issuerRequestId")));
        // Through `parse_json`'s error mapping (path and redaction), from the item's bytes.
        let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(8192));
        if serde_json::to_writer(&mut *bytes, &v).is_err() {
            bytes.clear();
        }
        wipe_value(&mut v);
        let item = parse_json::<BatchOrderInput>(&bytes)
            .map_err(ItemError::Api)
            .and_then(|it| {
                let card_id = it.card_id;
                into_domain(it.order)
                    .map(|(issuer_request_id, spec, card)| BatchItem {
                        card_id,
                        issuer_request_id,
                        spec,
                        card,
                    })
                    .map_err(ItemError::Domain)
            });
        items.push(item);
    }
    let (domain_items, api_errors): (Vec<_>, Vec<_>) = items
        .into_iter()
        .map(|r| match r {
            Ok(it) => (Ok(it), None),
            Err(ItemError::Domain(e)) => (Err(e), None),
            // Placeholder for the domain; the API error is reported instead.
            Err(ItemError::Api(e)) => (
                Err(DomainError::Validation {
                    code: "invalid_item",
                    detail: String::new(),
                }),
                Some(e),
            ),
        })
        .unzip();
    let outcomes = state.production.place_batch(issuer, domain_items).await?;
    let mut results = Vec::with_capacity(outcomes.len());
    let (mut accepted, mut failed) = (0, 0);
    for (index, ((outcome, api_error), (card_id, issuer_request_id))) in
        outcomes.into_iter().zip(api_errors).zip(ids).enumerate()
    {
        let r = match (outcome, api_error) {
            (_, Some(e)) => Err(e),
            (Ok(p), None) => Ok(p),
            (Err(e), None) => Err(ApiError::from(e)),
        };
        results.push(match r {
            Ok(p) => {
                accepted += 1;
                BatchItemResult {
                    index,
                    card_id,
                    issuer_request_id,
                    status: 202,
                    operation: Some(OperationView::from(&p.operation)),
                    problem: None,
                }
            }
            Err(e) => {
                failed += 1;
                BatchItemResult {
                    index,
                    card_id,
                    issuer_request_id,
                    status: e.status.as_u16(),
                    operation: None,
                    problem: serde_json::from_str(&e.body()).ok(),
                }
            }
        });
    }
    Ok(Reply::json(
        StatusCode::MULTI_STATUS,
        &BatchOrderResponse {
            accepted,
            failed,
            results,
        },
    ))
}

enum ItemError {
    Api(ApiError),
    Domain(DomainError),
}

/// Wipes the strings of a parsed JSON value (a batch item held card data).
fn wipe_value(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(wipe_value),
        serde_json::Value::Object(m) => m.values_mut().for_each(wipe_value),
        _ => {}
    }
}

/// A card's production status: its latest order with every step and the shipment tracking,
/// and the card's earlier orders. `404` when the card was never ordered.
#[utoipa::path(get, path = "/v1/issuer/cards/{card_id}/production-status", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("card_id" = String, Path, description = "D1's card id")),
    responses(
        (status = 200, description = "Where production stands", body = ProductionStatusView),
        codes::ProductionStatusProblems,
    ))]
pub async fn production_status(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    Path(card_id): Path<String>,
) -> Response {
    match state.production.card_production(&issuer, &card_id).await {
        Ok(p) => (
            StatusCode::OK,
            axum::Json(ProductionStatusView {
                card_id,
                current: ProductionOrderView::from(&p.latest),
                earlier_orders: p.earlier.iter().map(ProductionOrderView::from).collect(),
            }),
        )
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
