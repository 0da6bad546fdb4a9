//! `GET /v1/audit-events`: a merchant's audit trail, cursor-paginated.

use crate::domain::audit::AuditEvent;
use crate::http::auth::MerchantAuth;
use crate::http::idempotency::Reply;
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

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
    /// `card.reveal`, `api_key.create`, `api_key.revoke`, `client_certs.update`,
    /// `recurring_agreement.record`, `recurring_agreement.end`.
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
        codes::AuditListProblems,
    ))]
pub async fn list_audit_events(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    RawQuery(query): RawQuery,
) -> Response {
    let (limit, cursor) = match crate::http::extract::page_query(query.as_deref()) {
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
