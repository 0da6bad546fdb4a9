//! The audit trail over HTTP: who is acting ([`AuditCtx`]: the API key id and the request's
//! `x-request-id`), recording an audited action's outcome, and `GET /v1/audit-events`.

use axum::extract::{FromRequestParts, RawQuery, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::extract::MerchantAuth;
use super::idempotency::Reply;
use super::problem::{ApiError, ProblemBody};
use crate::domain::apikeys::is_key_id;
use crate::domain::audit::{AuditAction, AuditEvent, NewAuditEvent, SUCCESS};
use crate::domain::token::MerchantId;

/// Put in the request's extensions by [`MerchantAuth`]: the id of the API key that
/// authenticated the request.
#[derive(Debug, Clone)]
pub struct AuthedKey {
    pub key_id: String,
}

/// Who acts, for the audit trail: the authenticating key's id (or `admin`) and the request id.
#[derive(Debug, Clone)]
pub struct AuditCtx {
    pub actor: String,
    pub request_id: Option<String>,
}

impl AuditCtx {
    pub fn admin(parts_request_id: Option<String>) -> AuditCtx {
        AuditCtx {
            actor: crate::domain::audit::ADMIN_ACTOR.to_owned(),
            request_id: parts_request_id,
        }
    }
}

/// The request id set by the middleware stack (`src/http/stack.rs`) before handlers run.
pub fn request_id(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(super::stack::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl FromRequestParts<AppState> for AuditCtx {
    type Rejection = ApiError;
    /// Needs [`MerchantAuth`] to have run first (an earlier handler argument); without it the
    /// handler is mis-wired, which is a bug, answered 500.
    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        let key = parts.extensions.get::<AuthedKey>().ok_or_else(|| {
            tracing::error!("AuditCtx used without MerchantAuth before it");
            ApiError::internal()
        })?;
        Ok(AuditCtx {
            actor: key.key_id.clone(),
            request_id: request_id(&parts.headers),
        })
    }
}

/// The outcome to record: `success`, or the problem code answered.
pub fn outcome<T>(r: &Result<T, ApiError>) -> String {
    match r {
        Ok(_) => SUCCESS.to_owned(),
        Err(e) => e.code.to_owned(),
    }
}

/// What an audited action concerns, besides the merchant: recorded as the event's `tokenId` or
/// `keyId`.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    /// Nothing more (merchant creation, or a refusal before any target was known).
    None,
    /// A token id (`tok_...`).
    Token(&'a str),
    /// The API key created or revoked (`key_...`), not the key that acted.
    ApiKey(&'a str),
}

impl<'a> Subject<'a> {
    /// The key a request path names: a path segment may hold anything, and only a well-formed
    /// key id is worth keeping in the trail.
    pub fn requested_key(id: &'a str) -> Subject<'a> {
        if is_key_id(id) {
            Subject::ApiKey(id)
        } else {
            Subject::None
        }
    }
}

/// Appends an event to the merchant's trail. `Err` only when the store failed, so callers
/// decide whether that fails the request (a card reveal) or is logged (an action already done).
pub async fn record(
    state: &AppState,
    ctx: &AuditCtx,
    merchant: &MerchantId,
    action: AuditAction,
    subject: Subject<'_>,
    outcome: String,
) -> Result<(), ApiError> {
    let Some(log) = &state.services.audit else {
        return Ok(());
    };
    let (token_id, key_id) = match subject {
        Subject::None => (None, None),
        Subject::Token(t) => (Some(t.to_owned()), None),
        Subject::ApiKey(k) => (None, Some(k.to_owned())),
    };
    let event = NewAuditEvent {
        at: time::OffsetDateTime::now_utc(),
        actor: ctx.actor.clone(),
        merchant_id: merchant.clone(),
        action,
        token_id,
        key_id,
        request_id: ctx.request_id.clone(),
        outcome,
    };
    log.record(&event).await.map(|_| ()).map_err(ApiError::from)
}

/// [`record`] for actions that already happened: a failure to record is logged, not answered.
pub async fn record_best_effort(
    state: &AppState,
    ctx: &AuditCtx,
    merchant: &MerchantId,
    action: AuditAction,
    subject: Subject<'_>,
    outcome: String,
) {
    if let Err(e) = record(state, ctx, merchant, action, subject, outcome).await {
        tracing::warn!(merchant_id = %merchant, code = e.code, "audit event not recorded");
    }
}

/// One audit event.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEventView {
    /// `aud_<unix ms>-<sequence>`.
    id: String,
    /// RFC 3339.
    at: String,
    /// The API key id (`key_...`) that acted, the client certificate (`cert_...`) for a request
    /// it authenticated alone, or `admin`.
    actor: String,
    merchant_id: String,
    /// `merchant.create`, `cryptogram.create`, `token.suspend`, `token.resume`, `token.delete`,
    /// `card.reveal`, `api_key.create`, `api_key.revoke`, `client_certs.update`.
    action: String,
    /// The token the action concerns (token actions).
    token_id: Option<String>,
    /// The API key the action concerns (`api_key.create`: the key created; `api_key.revoke`: the
    /// key revoked), which is not the `actor`. Present only on those events, and on a refused
    /// revocation only when the requested id has the shape of a key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "key_3f1c0a9d2b7e4c5a8f6d1e2b")]
    key_id: Option<String>,
    /// The `x-request-id` of the request.
    request_id: Option<String>,
    /// `success` or the problem code answered (`token_suspended`, `insufficient_scope`, ...).
    outcome: String,
}

impl From<&AuditEvent> for AuditEventView {
    fn from(e: &AuditEvent) -> Self {
        let ev = &e.event;
        AuditEventView {
            id: e.id.to_string(),
            at: ev
                .at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            actor: ev.actor.clone(),
            merchant_id: ev.merchant_id.as_str().to_owned(),
            action: serde_json::to_value(ev.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            token_id: ev.token_id.clone(),
            key_id: ev.key_id.clone(),
            request_id: ev.request_id.clone(),
            outcome: ev.outcome.clone(),
        }
    }
}

/// One page of audit events.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEventPage {
    data: Vec<AuditEventView>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page.
    next_cursor: Option<String>,
}

/// The merchant's audit trail, newest first.
#[utoipa::path(get, path = "/v1/audit-events", tag = "audit",
    security(("merchantApiKey" = [])),
    params(
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (default 20)", minimum = 1, maximum = 100),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "One page of audit events", body = AuditEventPage),
        (status = 400, description = "`invalid_query`", body = ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: missing, malformed or unknown API key", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "`insufficient_scope`: the API key lacks `audit:read`", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_cursor`", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` (with `Retry-After`): the API key's or the merchant's request rate limit", body = ProblemBody, content_type = "application/problem+json"),
        (status = 500, description = "`internal_error`", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`, `overloaded`, `request_timeout`", body = ProblemBody, content_type = "application/problem+json"),
    ))]
pub async fn list_audit_events(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    RawQuery(query): RawQuery,
) -> Response {
    let (limit, cursor) = match super::extract::page_query(query.as_deref()) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let Some(log) = &state.services.audit else {
        return ApiError::internal().into_response();
    };
    match log.list(&merchant.id, cursor.as_deref(), limit).await {
        Ok((events, next)) => Reply::json(
            StatusCode::OK,
            &AuditEventPage {
                data: events.iter().map(AuditEventView::from).collect(),
                next_cursor: next.map(|n| n.to_string()),
            },
        )
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
