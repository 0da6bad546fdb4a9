//! `/v1/tokens/{id}/recurring-agreement`: record, read and end the token's recurring agreement
//! (`domain::recurring`), whose network transaction id every later `MIT` cryptogram carries.
//!
//! Why `PUT` on a singular sub-resource rather than `POST .../agreements`: a token has at most
//! one agreement (the one its `MIT` cryptograms carry, chosen without the cryptogram request
//! naming it), and recording is a replacement of the whole, so `PUT` says exactly that and is
//! naturally idempotent (the same body twice leaves the same agreement and answers the same).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::domain::audit::AuditAction;
use crate::domain::recurring::{AgreementAmount, AgreementInput};
use crate::domain::token::TokenId;
use crate::http::audit::{self, AuditCtx};
use crate::http::auth::MerchantAuth;
use crate::http::dto::{PutRecurringAgreementRequest, RecurringAgreementView};
use crate::http::extract::{Body, parse_json};
use crate::http::idempotency::{Reply, key_from, run_idempotent};
use crate::http::params::{IdempotencyKeyHeader, TokenIdPath};
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

fn parse_token_id(s: &str) -> Result<TokenId, ApiError> {
    // A malformed id cannot name any token: same answer as an unknown one.
    TokenId::parse(s)
        .ok_or_else(|| ApiError::of(&codes::TOKEN_NOT_FOUND, "no such token for this merchant"))
}

impl From<PutRecurringAgreementRequest> for AgreementInput {
    fn from(r: PutRecurringAgreementRequest) -> Self {
        AgreementInput {
            network_transaction_id: r.network_transaction_id,
            agreement_reference: r.agreement_reference,
            amount: r.amount.map(|a| AgreementAmount {
                value: a.value,
                currency: a.currency,
            }),
            frequency: r.frequency,
            initial_transaction_at: r.initial_transaction_at,
        }
    }
}

/// Records (or replaces) the token's recurring agreement: the outcome of the initial
/// customer-initiated authorization. Only for `ACTIVE` tokens. Every later `MIT` cryptogram of
/// the token carries its `networkTransactionId` and `agreementReference`.
#[utoipa::path(put, path = "/v1/tokens/{id}/recurring-agreement", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(TokenIdPath, IdempotencyKeyHeader),
    request_body = PutRecurringAgreementRequest,
    responses(
        (status = 200, description = "The agreement as recorded (the same terms again: unchanged, with their first `recordedAt`)", body = RecurringAgreementView),
        codes::PutAgreementProblems,
    ))]
pub async fn put_agreement(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    ctx: AuditCtx,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let id = match parse_token_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let path = format!("/v1/tokens/{id}/recurring-agreement");
    let parts: [&[u8]; 3] = [b"PUT", path.as_bytes(), &body];
    run_idempotent(&state, merchant.id.as_str(), key, &parts, || async {
        let req: PutRecurringAgreementRequest = match parse_json(&body) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let result = state
            .services
            .record_agreement(&merchant.id, &id, req.into())
            .await
            .map_err(ApiError::from);
        audit::record_best_effort(
            &state,
            &ctx,
            &merchant.id,
            AuditAction::RecurringAgreementRecord,
            audit::Subject::Token(id.as_str()),
            audit::outcome(&result),
        )
        .await;
        match result {
            Ok(a) => Reply::json(StatusCode::OK, &RecurringAgreementView::from(&a)),
            Err(e) => e.into(),
        }
    })
    .await
}

/// The token's recurring agreement (whatever the token's status).
#[utoipa::path(get, path = "/v1/tokens/{id}/recurring-agreement", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(TokenIdPath),
    responses(
        (status = 200, description = "The agreement", body = RecurringAgreementView),
        codes::GetAgreementProblems,
    ))]
pub async fn get_agreement(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_token_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match state.services.get_agreement(&merchant.id, &id).await {
        Ok(Some(a)) => {
            Reply::json(StatusCode::OK, &RecurringAgreementView::from(&a)).into_response()
        }
        Ok(None) => ApiError::of(
            &codes::RECURRING_AGREEMENT_NOT_FOUND,
            "this token has no recurring agreement",
        )
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Ends the token's recurring agreement: later `MIT` cryptograms carry no network transaction
/// id. Allowed whatever the token's status; without an agreement it is a no-op 204.
#[utoipa::path(delete, path = "/v1/tokens/{id}/recurring-agreement", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(TokenIdPath, IdempotencyKeyHeader),
    responses(
        (status = 204, description = "The token has no agreement any more (ended now, or had none)"),
        codes::EndAgreementProblems,
    ))]
pub async fn end_agreement(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    ctx: AuditCtx,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let id = match parse_token_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let path = format!("/v1/tokens/{id}/recurring-agreement");
    let parts: [&[u8]; 2] = [b"DELETE", path.as_bytes()];
    run_idempotent(&state, merchant.id.as_str(), key, &parts, || async {
        let result = state
            .services
            .end_agreement(&merchant.id, &id)
            .await
            .map_err(ApiError::from);
        audit::record_best_effort(
            &state,
            &ctx,
            &merchant.id,
            AuditAction::RecurringAgreementEnd,
            audit::Subject::Token(id.as_str()),
            audit::outcome(&result),
        )
        .await;
        match result {
            Ok(()) => Reply::no_content(),
            Err(e) => e.into(),
        }
    })
    .await
}
