//! Click to Pay for issuers (docs/issuer.md): enrolment, update and opt-out start asynchronous
//! D1 operations (answered `202` with the operation, finished by D1's notification); profiles
//! are read from D1 on each request, the card number masked (first 6 / last 4) and the other
//! personal data only for keys holding `issuer:click-to-pay:pii`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::DomainError;
use crate::domain::apikeys::Scope;
use crate::domain::audit::AuditAction;
use crate::domain::issuer::{Issuer, valid_card_id, valid_consumer_id};
use crate::domain::issuer_ops::{IssuerOperation, OperationTarget};
use crate::domain::issuer_provider::ClickToPayProfile;
use crate::domain::issuer_service::Reason;
use crate::http::audit::{self, AuditCtx, Subject};
use crate::http::auth::IssuerAuth;
use crate::http::extract::{Body, parse_json};
use crate::http::handlers::issuers::OperationView;
use crate::http::idempotency::{Reply, key_from, run_idempotent};
use crate::http::params::IdempotencyKeyHeader;
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

/// `POST /v1/issuer/cards/{card_id}/click-to-pay/enrolment`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnrolmentRequest {
    /// 1 to 26 characters (D1, Visa).
    #[schema(example = "ADA LOVELACE", max_length = 26)]
    pub cardholder_name: String,
    /// `^[a-zA-Z0-9 ]{1,64}$`.
    #[schema(example = "customer request")]
    pub reason: Option<String>,
    /// D1's reason code; D1 assumes `ISSUER_DECISION` when absent.
    #[schema(example = "ISSUER_DECISION")]
    pub reason_code: Option<String>,
}

/// The update routes' body: all fields optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateRequest {
    /// A new cardholder name (cards only), 1 to 26 characters.
    pub cardholder_name: Option<String>,
    pub reason: Option<String>,
    pub reason_code: Option<String>,
}

/// The opt-out routes' body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OptOutRequest {
    pub reason: Option<String>,
    pub reason_code: Option<String>,
}

/// One Click to Pay profile (one directory). Personal data only with
/// `issuer:click-to-pay:pii`; the card number always masked.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ClickToPayProfile)]
pub struct ProfileView {
    pub directory: Option<String>,
    pub consumer_id: Option<String>,
    /// First 6 and last 4 digits.
    #[schema(example = "411111******1111")]
    pub masked_pan: Option<String>,
    /// `MMYY`.
    pub expiry: Option<String>,
    /// Whether the fields below were withheld (the key lacks `issuer:click-to-pay:pii`).
    pub personal_data_withheld: bool,
    pub first_name: Option<String>,
    pub middle_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub language: Option<String>,
    pub cardholder_name: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub billing_address: Option<serde_json::Value>,
}

impl ProfileView {
    fn new(p: ClickToPayProfile, pii: bool) -> ProfileView {
        let keep = |v: Option<String>| if pii { v } else { None };
        ProfileView {
            directory: p.directory,
            consumer_id: p.consumer_id,
            masked_pan: p.masked_pan,
            expiry: p.expiry,
            personal_data_withheld: !pii,
            first_name: keep(p.first_name),
            middle_name: keep(p.middle_name),
            last_name: keep(p.last_name),
            email: keep(p.email),
            phone: keep(p.phone),
            language: p.language,
            cardholder_name: keep(p.cardholder_name),
            billing_address: if pii { p.billing_address } else { None },
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ClickToPayProfiles)]
struct ProfilesView {
    /// At most one per configured directory; empty when not enrolled.
    click_to_pay_profiles: Vec<ProfileView>,
}

/// A malformed optional body is refused; an empty one is the defaults.
fn parse_optional<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        Ok(T::default())
    } else {
        parse_json(body)
    }
}

/// The audit subject of an action on `target` (a well-formed id only: a path segment may hold
/// anything) and the operation it started.
pub(crate) fn subject<'a>(target: &'a OperationTarget, operation: Option<&'a str>) -> Subject<'a> {
    let (card, consumer) = match target {
        OperationTarget::Card(c) => (Some(c.as_str()).filter(|c| valid_card_id(c)), None),
        OperationTarget::Consumer(c) => (None, Some(c.as_str()).filter(|c| valid_consumer_id(c))),
    };
    Subject::Issuer {
        card,
        consumer,
        operation,
    }
}

/// What a Click to Pay write is, for the audit trail.
struct Audited<'a> {
    ctx: &'a AuditCtx,
    action: AuditAction,
    target: &'a OperationTarget,
}

/// `202` with the operation (or its problem), under the issuer's idempotency scope; the
/// outcome in the issuer's audit trail (a replay of a stored answer is not a new action).
async fn start<F, Fut>(
    state: &AppState,
    issuer: &Issuer,
    headers: &HeaderMap,
    path: &str,
    body: &[u8],
    audited: Audited<'_>,
    run: F,
) -> Response
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<IssuerOperation, ApiError>>,
{
    let key = match key_from(headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let parts: [&[u8]; 3] = [b"POST", path.as_bytes(), body];
    run_idempotent(state, issuer.id.as_str(), key, &parts, || async {
        let result = run().await;
        let op_id = result.as_ref().ok().map(|op| op.id.as_str());
        audit::record_best_effort(
            state,
            audited.ctx,
            &issuer.id,
            audited.action,
            subject(audited.target, op_id),
            audit::outcome(&result),
        )
        .await;
        match result {
            Ok(op) => Reply::json(StatusCode::ACCEPTED, &OperationView::from(&op)),
            Err(e) => e.into(),
        }
    })
    .await
}

fn domain(e: DomainError) -> ApiError {
    ApiError::from(e)
}

/// Enrols a card in Click to Pay: the first card of a consumer creates the consumer profile,
/// later ones add cards. `202` with the `PENDING` operation; D1's notification finishes it.
#[utoipa::path(post, path = "/v1/issuer/cards/{card_id}/click-to-pay/enrolment", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("card_id" = String, Path, description = "D1's card id"), IdempotencyKeyHeader),
    request_body = EnrolmentRequest,
    responses(
        (status = 202, description = "The operation (PENDING; finished by D1's notification)", body = OperationView),
        codes::ClickToPayEnrolmentProblems,
    ))]
pub async fn enrol(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    ctx: AuditCtx,
    Path(card_id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let path = format!("/v1/issuer/cards/{card_id}/click-to-pay/enrolment");
    let target = OperationTarget::Card(card_id.clone());
    let audited = Audited {
        ctx: &ctx,
        action: AuditAction::ClickToPayEnrol,
        target: &target,
    };
    start(&state, &issuer, &headers, &path, &body, audited, || async {
        let req: EnrolmentRequest = parse_json(&body)?;
        // Re-enrolment is refused while the card is deleted at D1.
        state
            .cards
            .ensure_not_deleted(&issuer.id, &card_id)
            .await
            .map_err(domain)?;
        state
            .issuers
            .click_to_pay_enrol(
                &issuer,
                &card_id,
                &req.cardholder_name,
                Reason {
                    reason: req.reason,
                    reason_code: req.reason_code,
                },
            )
            .await
            .map_err(domain)
    })
    .await
}

async fn update(
    state: AppState,
    (issuer, ctx): (Issuer, AuditCtx),
    target: OperationTarget,
    path: String,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let audited = Audited {
        ctx: &ctx,
        action: AuditAction::ClickToPayUpdate,
        target: &target,
    };
    start(&state, &issuer, &headers, &path, &body, audited, || async {
        let req: UpdateRequest = parse_optional(&body)?;
        if matches!(target, OperationTarget::Consumer(_)) && req.cardholder_name.is_some() {
            return Err(ApiError::of(
                &codes::INVALID_FIELD,
                "cardholderName is a card's; update it on the card",
            ));
        }
        state
            .issuers
            .click_to_pay_update(
                &issuer,
                target.clone(),
                req.cardholder_name.as_deref(),
                Reason {
                    reason: req.reason,
                    reason_code: req.reason_code,
                },
            )
            .await
            .map_err(domain)
    })
    .await
}

/// Updates a card's Click to Pay data. `202` with the operation.
#[utoipa::path(post, path = "/v1/issuer/cards/{card_id}/click-to-pay/update", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("card_id" = String, Path, description = "D1's card id"), IdempotencyKeyHeader),
    request_body = UpdateRequest,
    responses(
        (status = 202, description = "The operation", body = OperationView),
        codes::ClickToPayProblems,
    ))]
pub async fn update_card(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    ctx: AuditCtx,
    Path(card_id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let path = format!("/v1/issuer/cards/{card_id}/click-to-pay/update");
    update(
        state,
        (issuer, ctx),
        OperationTarget::Card(card_id),
        path,
        headers,
        body,
    )
    .await
}

/// Updates a consumer's Click to Pay data. `202` with the operation.
#[utoipa::path(post, path = "/v1/issuer/consumers/{consumer_id}/click-to-pay/update", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("consumer_id" = String, Path, description = "D1's consumer id"), IdempotencyKeyHeader),
    request_body = UpdateRequest,
    responses(
        (status = 202, description = "The operation", body = OperationView),
        codes::ClickToPayConsumerProblems,
    ))]
pub async fn update_consumer(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    ctx: AuditCtx,
    Path(consumer_id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let path = format!("/v1/issuer/consumers/{consumer_id}/click-to-pay/update");
    update(
        state,
        (issuer, ctx),
        OperationTarget::Consumer(consumer_id),
        path,
        headers,
        body,
    )
    .await
}

async fn opt_out(
    state: AppState,
    (issuer, ctx): (Issuer, AuditCtx),
    target: OperationTarget,
    path: String,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let audited = Audited {
        ctx: &ctx,
        action: AuditAction::ClickToPayOptOut,
        target: &target,
    };
    start(&state, &issuer, &headers, &path, &body, audited, || async {
        let req: OptOutRequest = parse_optional(&body)?;
        state
            .issuers
            .click_to_pay_opt_out(
                &issuer,
                target.clone(),
                Reason {
                    reason: req.reason,
                    reason_code: req.reason_code,
                },
            )
            .await
            .map_err(domain)
    })
    .await
}

/// Opts a card out of Click to Pay (the last card of a consumer removes the cardholder
/// details). `202` with the operation.
#[utoipa::path(post, path = "/v1/issuer/cards/{card_id}/click-to-pay/opt-out", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("card_id" = String, Path, description = "D1's card id"), IdempotencyKeyHeader),
    request_body = OptOutRequest,
    responses(
        (status = 202, description = "The operation", body = OperationView),
        codes::ClickToPayProblems,
    ))]
pub async fn opt_out_card(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    ctx: AuditCtx,
    Path(card_id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let path = format!("/v1/issuer/cards/{card_id}/click-to-pay/opt-out");
    opt_out(
        state,
        (issuer, ctx),
        OperationTarget::Card(card_id),
        path,
        headers,
        body,
    )
    .await
}

/// Opts a consumer out of Click to Pay: the profile and all its cards are removed. `202` with
/// the operation (finished by D1's consumer-operation notification).
#[utoipa::path(post, path = "/v1/issuer/consumers/{consumer_id}/click-to-pay/opt-out", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("consumer_id" = String, Path, description = "D1's consumer id"), IdempotencyKeyHeader),
    request_body = OptOutRequest,
    responses(
        (status = 202, description = "The operation", body = OperationView),
        codes::ClickToPayConsumerProblems,
    ))]
pub async fn opt_out_consumer(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    ctx: AuditCtx,
    Path(consumer_id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let path = format!("/v1/issuer/consumers/{consumer_id}/click-to-pay/opt-out");
    opt_out(
        state,
        (issuer, ctx),
        OperationTarget::Consumer(consumer_id),
        path,
        headers,
        body,
    )
    .await
}

/// Reads profiles; a read with personal data (`pii`) is a sensitive read, recorded in the
/// issuer's audit trail with its outcome (never with the data read).
async fn profiles(
    state: AppState,
    (issuer, ctx): (Issuer, AuditCtx),
    pii: bool,
    target: OperationTarget,
) -> Response {
    let result = state
        .issuers
        .click_to_pay_profiles(&issuer, target.clone())
        .await
        .map_err(ApiError::from);
    if pii {
        audit::record_best_effort(
            &state,
            &ctx,
            &issuer.id,
            AuditAction::ClickToPayProfilesRead,
            subject(&target, None),
            audit::outcome(&result),
        )
        .await;
    }
    match result {
        Ok(list) => axum::Json(ProfilesView {
            click_to_pay_profiles: list.into_iter().map(|p| ProfileView::new(p, pii)).collect(),
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// A card's Click to Pay profiles (read from D1).
#[utoipa::path(get, path = "/v1/issuer/cards/{card_id}/click-to-pay/profiles", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("card_id" = String, Path, description = "D1's card id")),
    responses(
        (status = 200, description = "The profiles", body = ProfilesView),
        codes::ClickToPayProfilesProblems,
    ))]
pub async fn card_profiles(
    State(state): State<AppState>,
    IssuerAuth(issuer, scopes): IssuerAuth,
    ctx: AuditCtx,
    Path(card_id): Path<String>,
) -> Response {
    let pii = scopes.contains(Scope::IssuerClickToPayPii);
    profiles(state, (issuer, ctx), pii, OperationTarget::Card(card_id)).await
}

/// A consumer's Click to Pay profiles (read from D1).
#[utoipa::path(get, path = "/v1/issuer/consumers/{consumer_id}/click-to-pay/profiles", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("consumer_id" = String, Path, description = "D1's consumer id")),
    responses(
        (status = 200, description = "The profiles", body = ProfilesView),
        codes::ClickToPayConsumerProfilesProblems,
    ))]
pub async fn consumer_profiles(
    State(state): State<AppState>,
    IssuerAuth(issuer, scopes): IssuerAuth,
    ctx: AuditCtx,
    Path(consumer_id): Path<String>,
) -> Response {
    let pii = scopes.contains(Scope::IssuerClickToPayPii);
    profiles(
        state,
        (issuer, ctx),
        pii,
        OperationTarget::Consumer(consumer_id),
    )
    .await
}
