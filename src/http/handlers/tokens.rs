//! Route handlers: thin adapters from HTTP to the domain services.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use zeroize::Zeroize;

use crate::domain::audit::{AuditAction, SUCCESS};
use crate::domain::provider::{Amount, LifecycleAction};
use crate::domain::service::{TokenizeCommand, Tokenized};
use crate::domain::token::TokenId;
use crate::http::audit::{self, AuditCtx};
use crate::http::auth::{AdminAuth, MerchantAuth};
use crate::http::dto::{
    CreateCryptogramRequest, CreateMerchantRequest, CreateTokenRequest, CryptogramView, HealthView,
    MerchantCreated, TokenView,
};
use crate::http::extract::{Body, parse_json};
use crate::http::handlers::token_views::token_json;
use crate::http::idempotency::{Reply, key_from, run_idempotent};
use crate::http::params::{IdempotencyKeyHeader, TokenIdPath};
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses(
    (status = 200, description = "The process runs", body = HealthView),
))]
pub async fn healthz() -> Response {
    (StatusCode::OK, axum::Json(HealthView { status: "ok" })).into_response()
}

/// Readiness: 200 when the token store answers.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "The store answers", body = HealthView),
        codes::ReadyProblems,
    ))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    match state.services.store.ping().await {
        Ok(()) => (StatusCode::OK, axum::Json(HealthView { status: "ready" })).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            ApiError::of(
                &codes::STORE_UNAVAILABLE,
                "the token store is not reachable",
            )
            .into_response()
        }
    }
}

pub async fn not_found() -> ApiError {
    ApiError::of(&codes::ROUTE_NOT_FOUND, "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::of(
        &codes::METHOD_NOT_ALLOWED,
        "this route does not support this HTTP method",
    )
}

fn parse_token_id(s: &str) -> Result<TokenId, ApiError> {
    // A malformed id cannot name any token: same answer as an unknown one.
    TokenId::parse(s)
        .ok_or_else(|| ApiError::of(&codes::TOKEN_NOT_FOUND, "no such token for this merchant"))
}

/// Wipes a request body that held card data, when this handler holds the only reference.
fn wipe(body: Bytes) {
    if let Ok(mut m) = body.try_into_mut() {
        m.zeroize();
    }
}

/// Onboards a merchant (at D1 too) and issues its API key, shown once.
#[utoipa::path(post, path = "/v1/merchants", tag = "merchants",
    security(("adminToken" = [])),
    params(IdempotencyKeyHeader),
    request_body = CreateMerchantRequest,
    responses(
        (status = 201, description = "The merchant and its API key", body = MerchantCreated),
        codes::CreateMerchantProblems,
    ))]
pub async fn create_merchant(
    State(state): State<AppState>,
    _admin: AdminAuth,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let parts: [&[u8]; 3] = [b"POST", b"/v1/merchants", &body];
    run_idempotent(&state, "admin", key, &parts, || async {
        let req: CreateMerchantRequest = match parse_json(&body) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        match state.services.create_merchant(&req.name).await {
            Ok((m, key)) => {
                // A failed creation has no merchant whose trail could hold it: only successes
                // are recorded (docs/security.md).
                let ctx = AuditCtx::admin(audit::request_id(&headers));
                audit::record_best_effort(
                    &state,
                    &ctx,
                    &m.id,
                    AuditAction::MerchantCreate,
                    audit::Subject::None,
                    SUCCESS.to_owned(),
                )
                .await;
                // The first API key is in the body: a replay copy is kept only sealed, so a
                // retried creation gets the same merchant and key without the store holding it.
                Reply::json(StatusCode::CREATED, &MerchantCreated::new(&m, &key.secret)).sealed()
            }
            Err(e) => ApiError::from(e).into(),
        }
    })
    .await
}

/// Tokenizes a card: 201 with a new token, or 200 with the merchant's existing token for it.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(IdempotencyKeyHeader),
    request_body = CreateTokenRequest,
    responses(
        (status = 200, description = "The merchant already tokenized this card: its existing token", body = TokenView),
        (status = 201, description = "A new token", body = TokenView),
        codes::CreateTokenProblems,
    ))]
pub async fn create_token(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let parsed: Result<CreateTokenRequest, ApiError> = parse_json(&body);
    let parts: [&[u8]; 3] = [b"POST", b"/v1/tokens", &body];
    let resp = run_idempotent(&state, merchant.id.as_str(), key, &parts, || async {
        let req = match parsed {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let cmd = TokenizeCommand {
            pan: req.card.number,
            expiry_month: req.card.expiry_month,
            expiry_year: req.card.expiry_year,
            usage: req.usage,
            customer_reference: req.customer_reference,
        };
        match state.services.tokenize(&merchant, cmd).await {
            Ok(Tokenized::Created(r)) => Reply::json(StatusCode::CREATED, &TokenView::from(&*r)),
            Ok(Tokenized::Existing(r)) => Reply::json_bytes(StatusCode::OK, token_json(&r)),
            Err(e) => ApiError::from(e).into(),
        }
    })
    .await;
    wipe(body);
    resp
}

/// Reads a token of the authenticated merchant.
#[utoipa::path(get, path = "/v1/tokens/{id}", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(TokenIdPath),
    responses(
        (status = 200, description = "The token", body = TokenView),
        codes::GetTokenProblems,
    ))]
pub async fn get_token(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_token_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match state.services.read_token(&merchant.id, &id).await {
        Ok(Some(r)) => Reply::json_bytes(StatusCode::OK, token_json(&r)).into_response(),
        Ok(None) => {
            ApiError::of(&codes::TOKEN_NOT_FOUND, "no such token for this merchant").into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Token credentials and a fresh cryptogram for one card-not-present authorization. Only for
/// `ACTIVE` tokens; never stored, not even for idempotent replay. An `MIT` of a token with a
/// recurring agreement also carries its `networkTransactionId` and `agreementReference`.
#[utoipa::path(post, path = "/v1/tokens/{id}/cryptograms", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(TokenIdPath, IdempotencyKeyHeader),
    request_body = CreateCryptogramRequest,
    responses(
        (status = 201, description = "Credentials for one authorization", body = CryptogramView),
        codes::CryptogramProblems,
    ))]
pub async fn create_cryptogram(
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
    let path = format!("/v1/tokens/{id}/cryptograms");
    let parts: [&[u8]; 3] = [b"POST", path.as_bytes(), &body];
    run_idempotent(&state, merchant.id.as_str(), key, &parts, || async {
        let req: CreateCryptogramRequest = match parse_json(&body) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let amount = req.amount.map(|a| Amount {
            value: a.value,
            currency: a.currency,
        });
        let result = state
            .services
            .create_cryptogram(&merchant, &id, req.transaction_type, amount)
            .await
            .map_err(ApiError::from);
        let id_str = id.as_str();
        audit::record_best_effort(
            &state,
            &ctx,
            &merchant.id,
            AuditAction::CryptogramCreate,
            audit::Subject::Token(id_str),
            audit::outcome(&result),
        )
        .await;
        match result {
            Ok(c) => {
                let mut reply = Reply::json(StatusCode::CREATED, &CryptogramView::from(&c));
                // Credentials for one authorization: never persisted, not even for replay.
                reply.sensitive = true;
                reply
            }
            Err(e) => e.into(),
        }
    })
    .await
}

async fn lifecycle(
    state: AppState,
    merchant: std::sync::Arc<crate::domain::merchant::Merchant>,
    ctx: AuditCtx,
    id: String,
    headers: HeaderMap,
    action: LifecycleAction,
    verb: &'static str,
) -> Response {
    let id = match parse_token_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let path = format!("/v1/tokens/{id}/{verb}");
    let parts: [&[u8]; 2] = [b"POST", path.as_bytes()];
    run_idempotent(&state, merchant.id.as_str(), key, &parts, || async {
        let result = state
            .services
            .lifecycle(&merchant, &id, action)
            .await
            .map_err(ApiError::from);
        let audited = match action {
            LifecycleAction::Suspend => AuditAction::TokenSuspend,
            LifecycleAction::Resume => AuditAction::TokenResume,
            LifecycleAction::Delete => AuditAction::TokenDelete,
        };
        audit::record_best_effort(
            &state,
            &ctx,
            &merchant.id,
            audited,
            audit::Subject::Token(id.as_str()),
            audit::outcome(&result),
        )
        .await;
        match result {
            Ok(r) => Reply::json(StatusCode::OK, &TokenView::from(&r)),
            Err(e) => e.into(),
        }
    })
    .await
}

/// Suspends an `ACTIVE` token (at D1, then here).
#[utoipa::path(post, path = "/v1/tokens/{id}/suspend", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(TokenIdPath, IdempotencyKeyHeader),
    responses(
        (status = 200, description = "The token in its new status (repeating the current status is a no-op 200)", body = TokenView),
        codes::TokenLifecycleProblems,
    ))]
pub async fn suspend_token(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    ctx: AuditCtx,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    lifecycle(
        state,
        merchant,
        ctx,
        id,
        headers,
        LifecycleAction::Suspend,
        "suspend",
    )
    .await
}

/// Resumes a `SUSPENDED` token (at D1, then here).
#[utoipa::path(post, path = "/v1/tokens/{id}/resume", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(TokenIdPath, IdempotencyKeyHeader),
    responses(
        (status = 200, description = "The token in its new status (repeating the current status is a no-op 200)", body = TokenView),
        codes::TokenLifecycleProblems,
    ))]
pub async fn resume_token(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    ctx: AuditCtx,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    lifecycle(
        state,
        merchant,
        ctx,
        id,
        headers,
        LifecycleAction::Resume,
        "resume",
    )
    .await
}

/// Deletes a token (at D1, then here). `DELETED` is terminal; the record stays readable.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(TokenIdPath, IdempotencyKeyHeader),
    responses(
        (status = 200, description = "The token in its new status (repeating the current status is a no-op 200)", body = TokenView),
        codes::TokenLifecycleProblems,
    ))]
pub async fn delete_token(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    ctx: AuditCtx,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    lifecycle(
        state,
        merchant,
        ctx,
        id,
        headers,
        LifecycleAction::Delete,
        "delete",
    )
    .await
}
