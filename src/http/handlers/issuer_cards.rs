//! The issuer's cards (`issuer:cards`, docs/issuer.md "Cards"): what the gateway knows of a
//! card (lifecycle and Click to Pay state from D1's notifications, the last production status,
//! the newest operations; never card data), and deleting a card at D1, which also opts it out
//! of Click to Pay.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::issuer_cards::CardView;
use crate::http::auth::IssuerAuth;
use crate::http::dto::rfc3339;
use crate::http::handlers::issuers::OperationView;
use crate::http::idempotency::{Reply, key_from, run_idempotent};
use crate::http::params::IdempotencyKeyHeader;
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

/// The card's Click to Pay state as the gateway last learnt it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = IssuerCardClickToPay)]
pub struct ClickToPayView {
    /// `ENROLLED`, `OPTED_OUT`, or `UNKNOWN` (no Click to Pay operation of the card finished
    /// through this gateway).
    #[schema(example = "OPTED_OUT")]
    pub status: &'static str,
    /// Why it left: `OPT_OUT` or `CARD_DELETED` (D1 deleting a card opts it out).
    #[schema(example = "CARD_DELETED")]
    pub reason: Option<&'static str>,
    /// The Click to Pay consumer, when D1's profile of the card named it.
    pub consumer_id: Option<String>,
}

/// The card's latest physical card order (docs/issuer-orders.md).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = IssuerCardProduction)]
pub struct ProductionView {
    /// `CARD_PROD_REQUESTED` ... `CARD_SHIPPED`.
    #[schema(example = "CARD_SHIPPED")]
    pub status: String,
    pub issuer_request_id: String,
    pub operation_id: Option<String>,
    /// First 6 and last 4 digits, as stored with the order.
    #[schema(example = "411111******1111")]
    pub masked_pan: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// What the gateway knows of one of the issuer's cards.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = IssuerCard)]
pub struct CardResponse {
    #[schema(example = "card-1")]
    pub card_id: String,
    /// `ACTIVE`, `SUSPENDED` or `DELETED` from D1's card-operation notifications; `null` when
    /// none told us.
    #[schema(example = "DELETED")]
    pub lifecycle_state: Option<&'static str>,
    #[schema(format = DateTime)]
    pub deleted_at: Option<String>,
    pub click_to_pay: ClickToPayView,
    pub production: Option<ProductionView>,
    /// The newest operations about the card (at most 5), newest first.
    pub last_operations: Vec<OperationView>,
    #[schema(format = DateTime)]
    pub updated_at: Option<String>,
}

impl From<&CardView> for CardResponse {
    fn from(v: &CardView) -> Self {
        use crate::domain::issuer_cards::{CardLifecycle, ClickToPayState};
        let r = v.record.as_ref();
        CardResponse {
            card_id: v.card_id.clone(),
            lifecycle_state: r.and_then(|r| r.lifecycle).map(|l| match l {
                CardLifecycle::Active => "ACTIVE",
                CardLifecycle::Suspended => "SUSPENDED",
                CardLifecycle::Deleted => "DELETED",
            }),
            deleted_at: r.and_then(|r| r.deleted_at).map(rfc3339),
            click_to_pay: ClickToPayView {
                status: match r.and_then(|r| r.click_to_pay) {
                    Some(ClickToPayState::Enrolled) => "ENROLLED",
                    Some(ClickToPayState::OptedOut) => "OPTED_OUT",
                    None => "UNKNOWN",
                },
                reason: r.and_then(|r| r.opt_out_reason).map(|x| x.as_str()),
                consumer_id: r.and_then(|r| r.consumer_id.clone()),
            },
            production: v.production.as_ref().map(|o| ProductionView {
                status: o.status.as_str().to_owned(),
                issuer_request_id: o.issuer_request_id.clone(),
                operation_id: o.operation_id.clone(),
                masked_pan: o.masked_pan.clone(),
                updated_at: rfc3339(o.updated_at),
            }),
            last_operations: v.operations.iter().map(OperationView::from).collect(),
            updated_at: r.map(|r| rfc3339(r.updated_at)),
        }
    }
}

/// What the gateway knows of one of the issuer's cards: lifecycle state and Click to Pay state
/// from D1's notifications, the latest production status and the newest operations. No card
/// data. Another issuer's card, or one the gateway never heard of, is `404`.
#[utoipa::path(get, path = "/v1/issuer/cards/{card_id}", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("card_id" = String, Path, description = "D1's card id")),
    responses(
        (status = 200, description = "The card", body = CardResponse),
        codes::IssuerCardProblems,
    ))]
pub async fn get_card(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    Path(card_id): Path<String>,
) -> Response {
    match state.cards.get_card(&issuer.id, &card_id).await {
        Ok(v) => axum::Json(CardResponse::from(&v)).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Deletes the card at D1, which also opts it out of Click to Pay (`DELETE` operation). `202`
/// with the `PENDING` operation, finished by D1's notification; when D1's answer is lost the
/// operation stays `PENDING` and is re-driven with the same `issuerRequestId`. Honours
/// `Idempotency-Key`.
#[utoipa::path(delete, path = "/v1/issuer/cards/{card_id}", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("card_id" = String, Path, description = "D1's card id"), IdempotencyKeyHeader),
    responses(
        (status = 202, description = "The operation (PENDING; finished by D1's notification)", body = OperationView),
        codes::IssuerCardDeleteProblems,
    ))]
pub async fn delete_card(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    Path(card_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let path = format!("/v1/issuer/cards/{card_id}");
    let parts: [&[u8]; 3] = [b"DELETE", path.as_bytes(), b""];
    run_idempotent(&state, issuer.id.as_str(), key, &parts, || async {
        match state.cards.delete_card(&issuer, &card_id).await {
            Ok(op) => Reply::json(StatusCode::ACCEPTED, &OperationView::from(&op)),
            Err(e) => ApiError::from(e).into(),
        }
    })
    .await
}
