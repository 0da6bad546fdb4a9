//! D1's card- and consumer-operation notifications to the issuer side
//! (`POST /notifications/d1/v2/issuers/{issuerId}/cards` and `.../consumers`): a batch
//! `{"operations": [...]}`, authenticated like the token notifications ([`D1Caller`]), applied
//! before answering 204 (`domain::issuer_service`: each item exactly once across instances).
//! A failure a redelivery may fix answers 503 with `Retry-After`; an item about an operation we
//! did not start is acknowledged and logged, never a 5xx.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokengate_d1_protocol::issuer::{OperationObject, OperationsNotification};

use crate::domain::issuer::{check_d1_issuer_id, valid_card_id, valid_consumer_id};
use crate::domain::issuer_ops::{OperationKind, OperationStatus, RemoteOperation, valid_d1_id};
use crate::http::extract::{Body, parse_json};
use crate::http::handlers::notify::D1Caller;
use crate::http::problem::{ApiError, codes, notification_error};
use crate::http::state::AppState;

/// Items per batch accepted (D1's batches carry up to 1,000 cards).
pub const MAX_ITEMS: usize = 1000;
/// Largest `details` object kept per item (bytes of JSON): it is stored with the operation.
const MAX_DETAILS: usize = 16 * 1024;

/// One operation in a notification (OpenAPI schema; decoded as the shared wire type).
#[derive(utoipa::ToSchema)]
#[schema(as = D1OperationItem)]
#[expect(
    dead_code,
    reason = "a schema only; decoded as tokengate_d1_protocol::issuer::OperationObject"
)]
struct OperationItemSchema {
    #[schema(example = "01c5a05e-2b1f-4f2e-9a51-8f0d5e4c1a2b")]
    operation_id: String,
    #[schema(example = "CLICK_TO_PAY_ENROLMENT")]
    operation: String,
    #[schema(example = "SUCCESSFUL")]
    status: String,
    #[schema(format = DateTime)]
    start_time: String,
    #[schema(format = DateTime)]
    end_time: Option<String>,
    card_id: Option<String>,
    consumer_id: Option<String>,
    #[schema(value_type = Option<Object>)]
    details: Option<serde_json::Value>,
    error_code: Option<String>,
    error: Option<String>,
    issuer_request_id: Option<String>,
}

/// The notification body (OpenAPI schema).
#[derive(utoipa::ToSchema)]
#[schema(as = D1OperationsNotification)]
#[expect(
    dead_code,
    reason = "a schema only; decoded as tokengate_d1_protocol::issuer::OperationsNotification"
)]
struct NotificationSchema {
    operations: Vec<OperationItemSchema>,
}

fn invalid(detail: String) -> ApiError {
    ApiError::of(&codes::INVALID_FIELD, detail)
}

fn time_of(s: Option<&str>) -> Option<OffsetDateTime> {
    s.and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
}

/// Machine codes only; anything else is dropped rather than stored.
fn error_code(s: Option<String>) -> Option<String> {
    s.filter(|c| {
        (1..=64).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

/// Checks one item and turns it into the domain's view. Malformed ids are refused (400: D1's
/// documented patterns); unknown `operation` and `status` values are kept (compatibility).
fn to_remote(i: usize, o: OperationObject) -> Result<RemoteOperation, ApiError> {
    if !valid_d1_id(&o.operation_id) {
        return Err(invalid(format!(
            "operations[{i}].operationId must match ^[A-Za-z0-9_-]{{1,64}}$"
        )));
    }
    if o.operation.is_empty()
        || o.operation.len() > 64
        || !o
            .operation
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(format!(
            "operations[{i}].operation must be an upper-case word such as PRODUCE"
        )));
    }
    if o.card_id.as_deref().is_some_and(|c| !valid_card_id(c)) {
        return Err(invalid(format!(
            "operations[{i}].cardId must match ^[A-Za-z0-9_-]{{1,48}}$"
        )));
    }
    if o.consumer_id
        .as_deref()
        .is_some_and(|c| !valid_consumer_id(c))
    {
        return Err(invalid(format!(
            "operations[{i}].consumerId must match ^[A-Za-z0-9_-]{{1,64}}$"
        )));
    }
    let details = o.details.filter(|d| d.to_string().len() <= MAX_DETAILS);
    Ok(RemoteOperation {
        d1_operation_id: o.operation_id,
        kind: OperationKind::parse(&o.operation),
        status: OperationStatus::parse(&o.status),
        start_time: time_of(o.start_time.as_deref()),
        end_time: time_of(o.end_time.as_deref()),
        card_id: o.card_id,
        consumer_id: o.consumer_id,
        issuer_request_id: o.issuer_request_id.filter(|r| valid_d1_id(r)),
        error_code: error_code(o.error_code),
        error: o
            .error
            .map(|e| e.chars().filter(|c| !c.is_control()).take(256).collect()),
        details,
    })
}

async fn notify(state: AppState, d1_issuer_id: String, body: bytes::Bytes) -> Response {
    if check_d1_issuer_id(&d1_issuer_id).is_err() {
        return ApiError::of(
            &codes::INVALID_PATH,
            "issuerId must be exactly 10 characters of A-Z, a-z, 0-9, `-`, `_`",
        )
        .into_response();
    }
    let parsed: OperationsNotification = match parse_json(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if parsed.operations.len() > MAX_ITEMS {
        return invalid(format!("operations holds at most {MAX_ITEMS} items")).into_response();
    }
    let mut items = Vec::with_capacity(parsed.operations.len());
    for (i, o) in parsed.operations.into_iter().enumerate() {
        match to_remote(i, o) {
            Ok(r) => items.push(r),
            Err(e) => return e.into_response(),
        }
    }
    let issuer = match state.issuers.issuer_by_d1_id(&d1_issuer_id).await {
        Ok(Some(i)) => i,
        Ok(None) => {
            return ApiError::of(
                &codes::ISSUER_NOT_FOUND,
                "no issuer is onboarded with this D1 issuer id",
            )
            .into_response();
        }
        Err(e) => return notification_error(e).into_response(),
    };
    match state.issuers.handle_notification(&issuer, &items).await {
        Ok(report) => {
            tracing::debug!(issuer_id = %issuer.id, ?report, "issuer notification handled");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => notification_error(e).into_response(),
    }
}

/// `POST /notifications/d1/v2/issuers/{issuerId}/cards`: D1's "notify card operations".
#[utoipa::path(post, path = "/notifications/d1/v2/issuers/{issuerId}/cards", tag = "d1",
    security(("d1AccessToken" = [])),
    params(("issuerId" = String, Path, description = "D1's issuer id (10 characters)")),
    request_body = NotificationSchema,
    responses(
        (status = 204, description = "Applied (or recognised as a redelivery, or not ours)"),
        codes::IssuerNotifyProblems,
    ))]
pub async fn notify_cards(
    State(state): State<AppState>,
    _caller: D1Caller,
    Path(d1_issuer_id): Path<String>,
    Body(body): Body,
) -> Response {
    notify(state, d1_issuer_id, body).await
}

/// `POST /notifications/d1/v2/issuers/{issuerId}/consumers`: D1's "notify consumer
/// operations" (consumer opt-out and update).
#[utoipa::path(post, path = "/notifications/d1/v2/issuers/{issuerId}/consumers", tag = "d1",
    security(("d1AccessToken" = [])),
    params(("issuerId" = String, Path, description = "D1's issuer id (10 characters)")),
    request_body = NotificationSchema,
    responses(
        (status = 204, description = "Applied (or recognised as a redelivery, or not ours)"),
        codes::IssuerNotifyProblems,
    ))]
pub async fn notify_consumers(
    State(state): State<AppState>,
    _caller: D1Caller,
    Path(d1_issuer_id): Path<String>,
    Body(body): Body,
) -> Response {
    notify(state, d1_issuer_id, body).await
}
