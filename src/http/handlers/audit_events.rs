//! The audit trail over HTTP, cursor-paginated: `GET /v1/audit-events` (a merchant's trail)
//! and `GET /v1/issuer/audit-events` (an issuer's).

use crate::domain::audit::{AuditEvent, AuditTenant};
use crate::http::auth::{IssuerAuth, MerchantAuth};
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
    /// The merchant whose trail this is (merchant events).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "mer_NJayePY2ypiUCAIv")]
    merchant_id: Option<String>,
    /// The issuer whose trail this is (issuer events).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "iss_NJayePY2ypiUCAIv")]
    issuer_id: Option<String>,
    /// Merchants: `merchant.create`, `cryptogram.create`, `token.suspend`, `token.resume`,
    /// `token.delete`, `card.reveal`, `api_key.create`, `api_key.revoke`, `client_certs.update`,
    /// `recurring_agreement.record`, `recurring_agreement.end`. Issuers: `issuer.create`,
    /// `api_key.create`, `client_certs.update`, `click_to_pay.enrol`, `click_to_pay.update`,
    /// `click_to_pay.opt_out`, `click_to_pay.profiles_read` (with personal data only),
    /// `production_order.create`, `production_order.batch`, `webhook_endpoint.create`,
    /// `webhook_endpoint.delete`.
    action: String,
    /// The token the action concerns (token actions).
    token_id: Option<String>,
    /// The API key the action concerns (`api_key.create`: the key created; `api_key.revoke`: the
    /// key revoked), which is not the `actor`. Present only on those events, and on a refused
    /// revocation only when the requested id has the shape of a key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "key_3f1c0a9d2b7e4c5a8f6d1e2b")]
    key_id: Option<String>,
    /// Issuer actions: D1's card id (a reference, never a card number).
    #[serde(skip_serializing_if = "Option::is_none")]
    card_id: Option<String>,
    /// Issuer actions: D1's consumer id.
    #[serde(skip_serializing_if = "Option::is_none")]
    consumer_id: Option<String>,
    /// Issuer actions: the operation the action started (`op_...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    operation_id: Option<String>,
    /// Webhook endpoint actions: the endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint_id: Option<String>,
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
            merchant_id: match &ev.tenant {
                AuditTenant::Merchant(m) => Some(m.as_str().to_owned()),
                AuditTenant::Issuer(_) => None,
            },
            issuer_id: match &ev.tenant {
                AuditTenant::Issuer(i) => Some(i.as_str().to_owned()),
                AuditTenant::Merchant(_) => None,
            },
            action: serde_json::to_value(ev.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            token_id: ev.token_id.clone(),
            key_id: ev.key_id.clone(),
            card_id: ev.card_id.clone(),
            consumer_id: ev.consumer_id.clone(),
            operation_id: ev.operation_id.clone(),
            endpoint_id: ev.endpoint_id.clone(),
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
    page(
        &state,
        &AuditTenant::Merchant(merchant.id.clone()),
        query.as_deref(),
    )
    .await
}

/// The issuer's audit trail, newest first: its Click to Pay and card order actions, webhook
/// endpoint changes, reads of profiles with personal data, and what the admin did for it
/// (onboarding, API keys, client certificates). Scope `issuer:operations`.
#[utoipa::path(get, path = "/v1/issuer/audit-events", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (default 20)", minimum = 1, maximum = 100),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "One page of audit events", body = AuditEventPage),
        codes::IssuerAuditListProblems,
    ))]
pub async fn list_issuer_audit_events(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    RawQuery(query): RawQuery,
) -> Response {
    page(&state, &AuditTenant::Issuer(issuer.id), query.as_deref()).await
}

async fn page(state: &AppState, tenant: &AuditTenant, query: Option<&str>) -> Response {
    let (limit, cursor) = match crate::http::extract::page_query(query) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let Some(log) = &state.services.audit else {
        return ApiError::internal().into_response();
    };
    match log.list(tenant, cursor.as_deref(), limit).await {
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
