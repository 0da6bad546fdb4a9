//! `/v1/api-keys`: a merchant's API keys, each with a name and scopes (docs/api.md, "API keys");
//! and the admin's `POST /v1/merchants/{id}/api-keys`, which issues a key for an existing
//! merchant (the way back for a merchant that revoked its last `keys`-scoped key). Creating and
//! revoking keys is audited, naming the key created or revoked.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::domain::DomainError;
use crate::domain::apikeys::{ApiKeyRecord, parse_scopes};
use crate::domain::audit::AuditAction;
use crate::domain::merchant::NewApiKey;
use crate::domain::token::MerchantId;
use crate::http::audit::{self, AuditCtx, Subject};
use crate::http::auth::{AdminAuth, MerchantAuth};
use crate::http::dto::rfc3339;
use crate::http::extract::{Body, parse_json};
use crate::http::idempotency::{Reply, key_from, run_idempotent};
use crate::http::params::{IdempotencyKeyHeader, MerchantIdPath, PathId};
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    /// 1 to 100 printable characters, e.g. `billing-engine`.
    pub name: String,
    /// Scopes: `tokens:write`, `tokens:read`, `cryptograms`, `card:reveal`, `webhooks`,
    /// `keys`, `audit:read`. At least one.
    pub scopes: Vec<String>,
}

/// An API key (never its secret).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ApiKey)]
pub struct ApiKeyView {
    #[schema(example = "key_3f1c0a9d2b7e4c5a8f6d1e2b")]
    id: String,
    name: String,
    scopes: Vec<&'static str>,
    #[schema(format = DateTime)]
    created_at: String,
    /// Updated at most about once a minute; `null` until first used.
    #[schema(format = DateTime)]
    last_used_at: Option<String>,
    /// `null` while the key works.
    #[schema(format = DateTime)]
    revoked_at: Option<String>,
}

impl From<&ApiKeyRecord> for ApiKeyView {
    fn from(r: &ApiKeyRecord) -> Self {
        ApiKeyView {
            id: r.id.clone(),
            name: r.name.clone(),
            scopes: r.scopes.iter().map(|s| s.as_str()).collect(),
            created_at: rfc3339(r.created_at),
            last_used_at: r.last_used_at.map(rfc3339),
            revoked_at: r.revoked_at.map(rfc3339),
        }
    }
}

/// A new key with its secret, shown once.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ApiKeyCreated)]
pub struct ApiKeyCreatedView<'a> {
    id: String,
    name: String,
    scopes: Vec<&'static str>,
    #[schema(format = DateTime)]
    created_at: String,
    /// `null`: the key has not been used yet.
    #[schema(value_type = Option<String>, format = DateTime)]
    last_used_at: Option<String>,
    /// `null`: a new key works.
    #[schema(value_type = Option<String>, format = DateTime)]
    revoked_at: Option<String>,
    /// The secret (`Authorization: Bearer <secret>`). Shown once, never stored.
    #[schema(example = "tgk_...")]
    secret: &'a str,
}

impl<'a> ApiKeyCreatedView<'a> {
    pub fn new(r: &ApiKeyRecord, secret: &'a str) -> Self {
        let v = ApiKeyView::from(r);
        ApiKeyCreatedView {
            id: v.id,
            name: v.name,
            scopes: v.scopes,
            created_at: v.created_at,
            last_used_at: v.last_used_at,
            revoked_at: v.revoked_at,
            secret,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ApiKeyList {
    data: Vec<ApiKeyView>,
}

/// Issues an API key with the given scopes; the `201` shows its secret, once (it is not kept
/// for idempotent replay either).
#[utoipa::path(post, path = "/v1/api-keys", tag = "api-keys",
    security(("merchantApiKey" = [])),
    params(IdempotencyKeyHeader),
    request_body = CreateApiKeyRequest,
    responses(
        (status = 201, description = "The key and its secret (shown once)", body = ApiKeyCreatedView),
        codes::CreateApiKeyProblems,
    ))]
pub async fn create_api_key(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    ctx: AuditCtx,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let parts: [&[u8]; 3] = [b"POST", b"/v1/api-keys", &body];
    run_idempotent(&state, merchant.id.as_str(), key, &parts, || async {
        let req: CreateApiKeyRequest = match parse_json(&body) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let result = match parse_scopes(&req.scopes) {
            Ok(scopes) => state
                .services
                .create_api_key(&merchant.id, &req.name, scopes)
                .await
                .map_err(ApiError::from),
            Err(e) => Err(ApiError::from(e)),
        };
        let created = result.as_ref().ok().map(|(rec, _)| rec.id.as_str());
        audit::record_best_effort(
            &state,
            &ctx,
            &merchant.id,
            AuditAction::ApiKeyCreate,
            created.map_or(Subject::None, Subject::ApiKey),
            audit::outcome(&result),
        )
        .await;
        match result {
            Ok((rec, new)) => created_reply(&rec, &new),
            Err(e) => e.into(),
        }
    })
    .await
}

/// The `201` of a key creation: the secret is shown once, so the reply is never persisted, not
/// even for idempotent replay.
fn created_reply(rec: &ApiKeyRecord, new: &NewApiKey) -> Reply {
    let mut reply = Reply::json(
        StatusCode::CREATED,
        &ApiKeyCreatedView::new(rec, &new.secret),
    );
    reply.sensitive = true;
    reply
}

/// Issues an API key for an existing merchant (admin): the way back for a merchant that revoked
/// its last `keys`-scoped key. Same body and answer as the merchant's own `POST /v1/api-keys`;
/// the secret is shown once (not kept for idempotent replay either). Recorded in the merchant's
/// audit trail as `api_key.create` by `admin`, naming the new key.
#[utoipa::path(post, path = "/v1/merchants/{id}/api-keys", tag = "merchants",
    security(("adminToken" = [])),
    params(MerchantIdPath, IdempotencyKeyHeader),
    request_body = CreateApiKeyRequest,
    responses(
        (status = 201, description = "The key and its secret (shown once)", body = ApiKeyCreatedView),
        codes::AdminCreateApiKeyProblems,
    ))]
pub async fn create_api_key_for_merchant(
    State(state): State<AppState>,
    _admin: AdminAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    // A malformed id names no merchant: the same answer as an unknown one.
    let Some(merchant) = MerchantId::parse(&id) else {
        return ApiError::from(DomainError::MerchantNotFound).into_response();
    };
    let path = format!("/v1/merchants/{merchant}/api-keys");
    let parts: [&[u8]; 3] = [b"POST", path.as_bytes(), &body];
    run_idempotent(&state, "admin", key, &parts, || async {
        let req: CreateApiKeyRequest = match parse_json(&body) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let result = match state
            .services
            .create_api_key_for_merchant(&merchant, &req.name, &req.scopes)
            .await
        {
            // No merchant, no trail to record the refusal in (as for merchant creation).
            Err(e @ DomainError::MerchantNotFound) => return ApiError::from(e).into(),
            r => r.map_err(ApiError::from),
        };
        let ctx = AuditCtx::admin(audit::request_id(&headers));
        let created = result.as_ref().ok().map(|(rec, _)| rec.id.as_str());
        audit::record_best_effort(
            &state,
            &ctx,
            &merchant,
            AuditAction::ApiKeyCreate,
            created.map_or(Subject::None, Subject::ApiKey),
            audit::outcome(&result),
        )
        .await;
        match result {
            Ok((rec, new)) => created_reply(&rec, &new),
            Err(e) => e.into(),
        }
    })
    .await
}

/// The merchant's API keys, revoked ones included (with `revokedAt`), oldest first.
#[utoipa::path(get, path = "/v1/api-keys", tag = "api-keys",
    security(("merchantApiKey" = [])),
    responses(
        (status = 200, description = "The keys", body = ApiKeyList),
        codes::ListApiKeysProblems,
    ))]
pub async fn list_api_keys(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
) -> Response {
    match state.services.list_api_keys(&merchant.id).await {
        Ok(keys) => Reply::json(
            StatusCode::OK,
            &ApiKeyList {
                data: keys.iter().map(ApiKeyView::from).collect(),
            },
        )
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Revokes an API key: it stops working on this instance at once and on every instance within
/// `auth.api_key_cache_ttl_ms`. The calling key may revoke itself, even the merchant's last
/// `keys`-scoped key (then only the admin can issue it a key: `POST /v1/merchants/{id}/api-keys`).
#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "api-keys",
    security(("merchantApiKey" = [])),
    params(PathId),
    responses(
        (status = 200, description = "The revoked key (revoking again is a no-op 200)", body = ApiKeyView),
        codes::RevokeApiKeyProblems,
    ))]
pub async fn revoke_api_key(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    ctx: AuditCtx,
    Path(id): Path<String>,
) -> Response {
    let result = match state.services.revoke_api_key(&merchant.id, &id).await {
        Ok(Some(rec)) => Ok(rec),
        Ok(None) => Err(ApiError::of(
            &codes::API_KEY_NOT_FOUND,
            "no such API key for this merchant",
        )),
        Err(e) => Err(ApiError::from(e)),
    };
    audit::record_best_effort(
        &state,
        &ctx,
        &merchant.id,
        AuditAction::ApiKeyRevoke,
        // The key asked for, even when refused (unknown, or another merchant's).
        Subject::requested_key(&id),
        audit::outcome(&result),
    )
    .await;
    match result {
        Ok(rec) => Reply::json(StatusCode::OK, &ApiKeyView::from(&rec)).into_response(),
        Err(e) => e.into_response(),
    }
}
