//! Route handlers: thin adapters from HTTP to the domain services.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use zeroize::Zeroize;

use super::AppState;
use super::dto::{
    CreateCryptogramRequest, CreateMerchantRequest, CreateTokenRequest, CryptogramView,
    MerchantCreated, TokenView,
};
use super::extract::{AdminAuth, Body, MerchantAuth, parse_json};
use super::idempotency::{Reply, key_from, run_idempotent};
use super::problem::ApiError;
use crate::domain::provider::{Amount, LifecycleAction};
use crate::domain::service::{TokenizeCommand, Tokenized};
use crate::domain::token::TokenId;

pub async fn healthz() -> Response {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"status": "ok"})),
    )
        .into_response()
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    match state.services.store.ping().await {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ready"})),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            ApiError::unavailable("store_unavailable", "the token store is not reachable")
                .into_response()
        }
    }
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("route_not_found", "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Method not allowed",
        "this route does not support this HTTP method",
    )
}

fn parse_token_id(s: &str) -> Result<TokenId, ApiError> {
    // A malformed id cannot name any token: same answer as an unknown one.
    TokenId::parse(s)
        .ok_or_else(|| ApiError::not_found("token_not_found", "no such token for this merchant"))
}

/// Wipes a request body that held card data, when this handler holds the only reference.
fn wipe(body: Bytes) {
    if let Ok(mut m) = body.try_into_mut() {
        m.zeroize();
    }
}

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
                Reply::json(StatusCode::CREATED, &MerchantCreated::new(&m, &key.secret))
            }
            Err(e) => ApiError::from(e).into(),
        }
    })
    .await
}

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
            Ok(Tokenized::Created(r)) => Reply::json(StatusCode::CREATED, &TokenView::from(&r)),
            Ok(Tokenized::Existing(r)) => Reply::json(StatusCode::OK, &TokenView::from(&r)),
            Err(e) => ApiError::from(e).into(),
        }
    })
    .await;
    wipe(body);
    resp
}

pub async fn get_token(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_token_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match state.services.get_token(&merchant.id, &id).await {
        Ok(Some(r)) => Reply::json(StatusCode::OK, &TokenView::from(&r)).into_response(),
        Ok(None) => ApiError::not_found("token_not_found", "no such token for this merchant")
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub async fn create_cryptogram(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
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
        match state
            .services
            .create_cryptogram(&merchant, &id, req.transaction_type, amount)
            .await
        {
            Ok(c) => {
                let mut reply = Reply::json(StatusCode::CREATED, &CryptogramView::from(&c));
                // Credentials for one authorization: never persisted, not even for replay.
                reply.sensitive = true;
                reply
            }
            Err(e) => ApiError::from(e).into(),
        }
    })
    .await
}

async fn lifecycle(
    state: AppState,
    merchant: crate::domain::merchant::Merchant,
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
        match state.services.lifecycle(&merchant, &id, action).await {
            Ok(r) => Reply::json(StatusCode::OK, &TokenView::from(&r)),
            Err(e) => ApiError::from(e).into(),
        }
    })
    .await
}

pub async fn suspend_token(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    lifecycle(
        state,
        merchant,
        id,
        headers,
        LifecycleAction::Suspend,
        "suspend",
    )
    .await
}

pub async fn resume_token(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    lifecycle(
        state,
        merchant,
        id,
        headers,
        LifecycleAction::Resume,
        "resume",
    )
    .await
}

pub async fn delete_token(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    lifecycle(
        state,
        merchant,
        id,
        headers,
        LifecycleAction::Delete,
        "delete",
    )
    .await
}
