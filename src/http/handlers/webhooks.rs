//! Merchant webhook routes: endpoints (`/v1/webhook-endpoints`) and the event log with delivery
//! status (`/v1/events`). Thin adapters over [`crate::domain::webhooks::WebhookService`].
//!
//! The signing secret is in the body of the `201` that creates an endpoint (and of the `200`
//! that rotates it) and nowhere else. For `Idempotency-Key` replays the stored response is kept
//! *without* it: the secret is put into the body on the way out, from the request that just
//! made it or, for a replay, from the endpoint's sealed copy, if that is still the secret the
//! request made (`secretRotatedAt` matches). So the idempotency store never holds a secret in
//! clear, and a replay never shows a secret its request did not produce.

use std::sync::Arc;
use std::time::Duration;

use axum::body::to_bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::domain::audit::{AuditAction, AuditTenant};
use crate::domain::token::MerchantId;
use crate::domain::webhooks::{
    DEFAULT_ROTATION_OVERLAP, DeliveryState, EndpointId, EventRecord, WebhookEndpoint,
    WebhookService,
};
use crate::http::audit::{self, AuditCtx, Subject};
use crate::http::auth::MerchantAuth;
use crate::http::dto::rfc3339;
use crate::http::extract::{Body, parse_json};
use crate::http::idempotency::{Reply, key_from, run_idempotent};
use crate::http::params::{IdempotencyKeyHeader, PathId};
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

/// Largest response body re-read to add the secret (it is a small JSON object).
const MAX_CREATED_BODY: usize = 64 * 1024;

fn service(state: &AppState) -> Result<Arc<WebhookService>, ApiError> {
    state.services.webhooks.clone().ok_or_else(|| {
        ApiError::of(
            &codes::WEBHOOKS_UNAVAILABLE,
            "webhooks are not configured in this deployment",
        )
    })
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateEndpointRequest {
    url: String,
    events: Vec<String>,
}

/// `PATCH /v1/webhook-endpoints/{id}`: what is given changes, what is left out stays.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct UpdateEndpointRequest {
    url: Option<String>,
    events: Option<Vec<String>>,
}

/// `POST /v1/webhook-endpoints/{id}/rotate-secret`; the body may be left out.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RotateSecretRequest {
    /// How long the replaced secret keeps signing too, 0 to 604800 seconds (7 days); default
    /// 86400 (24 hours).
    #[schema(minimum = 0, maximum = 604800)]
    overlap_seconds: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = WebhookEndpoint)]
struct EndpointView<'a> {
    id: &'a str,
    url: &'a str,
    events: Vec<&'static str>,
    created_at: String,
    /// When the secret was last rotated; `null` if never.
    secret_rotated_at: Option<String>,
    /// While the secret replaced by the last rotation still signs (both signatures are sent):
    /// until when. `null` otherwise.
    previous_secret_expires_at: Option<String>,
}

impl<'a> From<&'a WebhookEndpoint> for EndpointView<'a> {
    fn from(ep: &'a WebhookEndpoint) -> Self {
        EndpointView {
            id: ep.id.as_str(),
            url: &ep.url,
            events: ep.events.iter().map(|e| e.as_str()).collect(),
            created_at: rfc3339(ep.created_at),
            secret_rotated_at: ep.secret_rotated_at.map(rfc3339),
            previous_secret_expires_at: ep
                .live_previous_secret(time::OffsetDateTime::now_utc())
                .map(|p| rfc3339(p.expires_at)),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = WebhookDelivery)]
struct DeliveryView<'a> {
    endpoint_id: &'a str,
    status: &'static str,
    attempts: u32,
    last_attempt_at: Option<String>,
    next_attempt_at: Option<String>,
    delivered_at: Option<String>,
    last_error: Option<&'a str>,
    last_response_status: Option<u16>,
}

impl<'a> From<&'a DeliveryState> for DeliveryView<'a> {
    fn from(d: &'a DeliveryState) -> Self {
        DeliveryView {
            endpoint_id: d.endpoint_id.as_str(),
            status: d.status.as_str(),
            attempts: d.attempts,
            last_attempt_at: d.last_attempt_at.map(rfc3339),
            next_attempt_at: d.next_attempt_at.map(rfc3339),
            delivered_at: d.delivered_at.map(rfc3339),
            last_error: d.last_error.as_deref(),
            last_response_status: d.last_status,
        }
    }
}

/// An event with its delivery status: the summary (`status`, `attempts`, `lastError`) covers
/// all endpoints, `deliveries` has one entry per endpoint.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = WebhookEvent)]
struct EventView<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'static str,
    /// The token a merchant event is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    token_id: Option<&'a str>,
    /// The operation an issuer event is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    operation_id: Option<&'a str>,
    created_at: String,
    status: &'static str,
    attempts: u32,
    last_error: Option<&'a str>,
    deliveries: Vec<DeliveryView<'a>>,
}

impl<'a> From<&'a EventRecord> for EventView<'a> {
    fn from(r: &'a EventRecord) -> Self {
        let last_error = r
            .deliveries
            .iter()
            .filter(|d| d.last_error.is_some())
            .max_by_key(|d| d.last_attempt_at)
            .and_then(|d| d.last_error.as_deref());
        EventView {
            id: r.event.id.as_str(),
            event_type: r.event.event_type.as_str(),
            token_id: r.event.token_id.as_ref().map(|t| t.as_str()),
            operation_id: r.event.operation_id.as_deref(),
            created_at: rfc3339(r.event.created_at),
            status: r.status().as_str(),
            attempts: r.deliveries.iter().map(|d| d.attempts).sum(),
            last_error,
            deliveries: r.deliveries.iter().map(DeliveryView::from).collect(),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct Page<T> {
    data: Vec<T>,
    next_cursor: Option<String>,
}

fn json(status: StatusCode, v: &impl Serialize) -> Response {
    Reply::json(status, v).into_response()
}

// --- endpoints ---------------------------------------------------------------------------------

/// Registers an endpoint for the merchant's webhook events; the `201` shows its signing secret,
/// once.
#[utoipa::path(post, path = "/v1/webhook-endpoints", tag = "webhooks",
    security(("merchantApiKey" = [])),
    params(IdempotencyKeyHeader),
    request_body = CreateEndpointRequest,
    responses(
        (status = 201, description = "The endpoint, with its signing secret (shown once)", body = EndpointCreatedSchema),
        codes::CreateEndpointProblems,
    ))]
pub async fn create_endpoint(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    create_endpoint_for(
        &state,
        &merchant.id,
        &headers,
        body,
        b"/v1/webhook-endpoints",
        None,
    )
    .await
}

/// Registers an endpoint of `tenant` (a merchant, or an issuer's tenant id); with `audited`,
/// the outcome goes to the tenant's audit trail (issuers: docs/security.md; a merchant's
/// endpoint changes are not audited actions).
async fn create_endpoint_for(
    state: &AppState,
    tenant: &MerchantId,
    headers: &HeaderMap,
    body: bytes::Bytes,
    path: &'static [u8],
    audited: Option<&AuditCtx>,
) -> Response {
    let hooks = match service(state) {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    let key = match key_from(headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let parts: [&[u8]; 3] = [b"POST", path, &body];
    let mut fresh: Option<Zeroizing<String>> = None;
    let resp = run_idempotent(state, tenant.as_str(), key, &parts, || async {
        let req: CreateEndpointRequest = match parse_json(&body) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let result = hooks
            .create_endpoint(tenant, &req.url, &req.events)
            .await
            .map_err(ApiError::from);
        if let Some(ctx) = audited {
            let id = result.as_ref().ok().map(|(ep, _)| ep.id.as_str());
            audit::record_best_effort(
                state,
                ctx,
                AuditTenant::of_tenant_id(tenant),
                AuditAction::WebhookEndpointCreate,
                id.map_or(Subject::None, Subject::Endpoint),
                audit::outcome(&result),
            )
            .await;
        }
        match result {
            Ok((ep, secret)) => {
                fresh = Some(secret);
                // Stored for replay as is: without the secret.
                Reply::json(StatusCode::CREATED, &EndpointView::from(&ep))
            }
            Err(e) => e.into(),
        }
    })
    .await;
    if resp.status() != StatusCode::CREATED {
        return resp;
    }
    add_secret(&hooks, tenant, resp, fresh).await
}

/// Registers an endpoint for the issuer's webhook events (`issuer.operation.succeeded`,
/// `issuer.operation.failed`, `issuer.click_to_pay.enrolled`, `issuer.click_to_pay.opted_out`);
/// the `201` shows its signing secret, once. Signed and delivered as merchant webhooks are
/// (docs/webhooks.md).
#[utoipa::path(post, path = "/v1/issuer/webhook-endpoints", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(IdempotencyKeyHeader),
    request_body = CreateEndpointRequest,
    responses(
        (status = 201, description = "The endpoint, with its signing secret (shown once)", body = EndpointCreatedSchema),
        codes::IssuerCreateEndpointProblems,
    ))]
pub async fn issuer_create_endpoint(
    State(state): State<AppState>,
    crate::http::auth::IssuerAuth(issuer, _): crate::http::auth::IssuerAuth,
    ctx: AuditCtx,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let tenant = issuer.id.tenant();
    create_endpoint_for(
        &state,
        &tenant,
        &headers,
        body,
        b"/v1/issuer/webhook-endpoints",
        Some(&ctx),
    )
    .await
}

/// The issuer's webhook endpoints.
#[utoipa::path(get, path = "/v1/issuer/webhook-endpoints", tag = "issuer",
    security(("issuerApiKey" = [])),
    responses(
        (status = 200, description = "Every endpoint of the issuer", body = Page<EndpointView>),
        codes::IssuerListProblems,
    ))]
pub async fn issuer_list_endpoints(
    State(state): State<AppState>,
    crate::http::auth::IssuerAuth(issuer, _): crate::http::auth::IssuerAuth,
) -> Response {
    list_endpoints_for(&state, &issuer.id.tenant()).await
}

/// Deletes one of the issuer's webhook endpoints.
#[utoipa::path(delete, path = "/v1/issuer/webhook-endpoints/{id}", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(PathId),
    responses(
        (status = 204, description = "Deleted"),
        codes::IssuerEndpointProblems,
    ))]
pub async fn issuer_delete_endpoint(
    State(state): State<AppState>,
    crate::http::auth::IssuerAuth(issuer, _): crate::http::auth::IssuerAuth,
    ctx: AuditCtx,
    Path(id): Path<String>,
) -> Response {
    delete_endpoint_for(&state, &issuer.id.tenant(), &id, Some(&ctx)).await
}

/// The issuer's webhook events, newest first, with their delivery status.
#[utoipa::path(get, path = "/v1/issuer/events", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (default 20)", minimum = 1, maximum = 100),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "One page of events", body = Page<EventView>),
        codes::IssuerListProblems,
    ))]
pub async fn issuer_list_events(
    State(state): State<AppState>,
    crate::http::auth::IssuerAuth(issuer, _): crate::http::auth::IssuerAuth,
    RawQuery(query): RawQuery,
) -> Response {
    list_events_for(&state, &issuer.id.tenant(), query.as_deref()).await
}

/// Changes an endpoint's URL and/or event types, checked as at registration; the secret stays.
#[utoipa::path(patch, path = "/v1/webhook-endpoints/{id}", tag = "webhooks",
    security(("merchantApiKey" = [])),
    params(PathId, IdempotencyKeyHeader),
    request_body = UpdateEndpointRequest,
    responses(
        (status = 200, description = "The endpoint as changed (without its secret)", body = EndpointView),
        codes::UpdateEndpointProblems,
    ))]
pub async fn update_endpoint(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let hooks = match service(&state) {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let path = format!("/v1/webhook-endpoints/{id}");
    let parts: [&[u8]; 3] = [b"PATCH", path.as_bytes(), &body];
    run_idempotent(&state, merchant.id.as_str(), key, &parts, || async {
        let req: UpdateEndpointRequest = match parse_json(&body) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        match hooks
            .update_endpoint(&merchant.id, &id, req.url.as_deref(), req.events.as_deref())
            .await
        {
            Ok(ep) => Reply::json(StatusCode::OK, &EndpointView::from(&ep)),
            Err(e) => ApiError::from(e).into(),
        }
    })
    .await
}

/// Gives the endpoint a new signing secret, shown once in the answer. For `overlapSeconds`
/// deliveries carry the signatures of both the new and the replaced secret.
#[utoipa::path(post, path = "/v1/webhook-endpoints/{id}/rotate-secret", tag = "webhooks",
    security(("merchantApiKey" = [])),
    params(PathId, IdempotencyKeyHeader),
    request_body(content = Option<RotateSecretRequest>, description = "May be left out (default overlap, 24 hours)"),
    responses(
        (status = 200, description = "The endpoint, with its new signing secret (shown once)", body = EndpointCreatedSchema),
        codes::RotateSecretProblems,
    ))]
pub async fn rotate_secret(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let hooks = match service(&state) {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let path = format!("/v1/webhook-endpoints/{id}/rotate-secret");
    let parts: [&[u8]; 3] = [b"POST", path.as_bytes(), &body];
    let mut fresh: Option<Zeroizing<String>> = None;
    let resp = run_idempotent(&state, merchant.id.as_str(), key, &parts, || async {
        let req: RotateSecretRequest = if body.is_empty() {
            RotateSecretRequest::default()
        } else {
            match parse_json(&body) {
                Ok(r) => r,
                Err(e) => return e.into(),
            }
        };
        let overlap = req
            .overlap_seconds
            .map_or(DEFAULT_ROTATION_OVERLAP, Duration::from_secs);
        match hooks.rotate_secret(&merchant.id, &id, overlap).await {
            Ok((ep, secret)) => {
                fresh = Some(secret);
                // Stored for replay as is: without the secret.
                Reply::json(StatusCode::OK, &EndpointView::from(&ep))
            }
            Err(e) => ApiError::from(e).into(),
        }
    })
    .await;
    if resp.status() != StatusCode::OK {
        return resp;
    }
    add_secret(&hooks, &merchant.id, resp, fresh).await
}

/// The body of `POST /v1/webhook-endpoints` (`201`) and of `POST .../rotate-secret` (`200`):
/// [`EndpointView`] plus the signing secret. A schema only (OpenAPI): the body is built by
/// [`add_secret`]; tests/it/openapi.rs holds it against real answers.
#[derive(utoipa::ToSchema)]
#[schema(as = WebhookEndpointCreated, rename_all = "camelCase")]
#[expect(dead_code, reason = "a schema only; never constructed")]
struct EndpointCreatedSchema {
    #[schema(example = "whe_...")]
    id: String,
    url: String,
    events: Vec<String>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    secret_rotated_at: Option<String>,
    #[schema(format = DateTime)]
    previous_secret_expires_at: Option<String>,
    /// The HMAC signing secret of this endpoint's deliveries. Shown here once.
    secret: String,
}

/// Puts `secret` into an endpoint body: the one just generated, or for a replay the endpoint's
/// own (opened from its sealed copy) if it is still the one the replayed request produced (its
/// `secretRotatedAt` is the stored answer's). A replay for an endpoint deleted since, or whose
/// secret was rotated since, has no secret to show, and is answered as stored.
async fn add_secret(
    hooks: &WebhookService,
    merchant: &MerchantId,
    resp: Response,
    fresh: Option<Zeroizing<String>>,
) -> Response {
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_CREATED_BODY).await else {
        return ApiError::internal().into_response();
    };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return ApiError::internal().into_response();
    };
    let secret = match fresh {
        Some(s) => Some(s),
        None => {
            let id = v["id"].as_str().unwrap_or_default().to_owned();
            let stored_rotation = v["secretRotatedAt"].as_str().map(str::to_owned);
            match hooks.get_endpoint(merchant, &id).await {
                Ok(ep) if ep.secret_rotated_at.map(rfc3339) == stored_rotation => {
                    match hooks.endpoint_secret(&ep) {
                        Ok(s) => Some(s),
                        Err(e) => return ApiError::from(e).into_response(),
                    }
                }
                _ => None,
            }
        }
    };
    if let (Some(s), Some(obj)) = (&secret, v.as_object_mut()) {
        obj.insert("secret".into(), serde_json::Value::String(s.to_string()));
    }
    let out = Zeroizing::new(serde_json::to_string(&v).unwrap_or_default());
    // The copy inside the JSON value is wiped too, not just dropped.
    if let Some(serde_json::Value::String(mut s)) =
        v.as_object_mut().and_then(|o| o.remove("secret"))
    {
        s.zeroize();
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    // A secret must not sit in any cache on the way.
    parts
        .headers
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Response::from_parts(parts, axum::body::Body::from(out.as_bytes().to_vec()))
}

/// The merchant's webhook endpoints (one page holds them all).
#[utoipa::path(get, path = "/v1/webhook-endpoints", tag = "webhooks",
    security(("merchantApiKey" = [])),
    responses(
        (status = 200, description = "Every endpoint of the merchant", body = Page<EndpointView>),
        codes::ListProblems,
    ))]
pub async fn list_endpoints(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
) -> Response {
    list_endpoints_for(&state, &merchant.id).await
}

async fn list_endpoints_for(state: &AppState, tenant: &MerchantId) -> Response {
    let result = match service(state) {
        Ok(h) => h.list_endpoints(tenant).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    match result {
        Ok(eps) => json(
            StatusCode::OK,
            &Page {
                data: eps.iter().map(EndpointView::from).collect(),
                next_cursor: None,
            },
        ),
        Err(e) => e.into_response(),
    }
}

/// One webhook endpoint (without its secret).
#[utoipa::path(get, path = "/v1/webhook-endpoints/{id}", tag = "webhooks",
    security(("merchantApiKey" = [])),
    params(PathId),
    responses(
        (status = 200, description = "The endpoint", body = EndpointView),
        codes::EndpointProblems,
    ))]
pub async fn get_endpoint(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
) -> Response {
    let result = match service(&state) {
        Ok(h) => h
            .get_endpoint(&merchant.id, &id)
            .await
            .map_err(ApiError::from),
        Err(e) => Err(e),
    };
    match result {
        Ok(ep) => json(StatusCode::OK, &EndpointView::from(&ep)),
        Err(e) => e.into_response(),
    }
}

/// Deletes a webhook endpoint; its queued deliveries are dropped.
#[utoipa::path(delete, path = "/v1/webhook-endpoints/{id}", tag = "webhooks",
    security(("merchantApiKey" = [])),
    params(PathId),
    responses(
        (status = 204, description = "Deleted"),
        codes::EndpointProblems,
    ))]
pub async fn delete_endpoint(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
) -> Response {
    delete_endpoint_for(&state, &merchant.id, &id, None).await
}

/// Removes an endpoint of `tenant`; with `audited`, as [`create_endpoint_for`].
async fn delete_endpoint_for(
    state: &AppState,
    tenant: &MerchantId,
    id: &str,
    audited: Option<&AuditCtx>,
) -> Response {
    let result = match service(state) {
        Ok(h) => h.delete_endpoint(tenant, id).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    if let Some(ctx) = audited {
        // The endpoint asked for, when it has the shape of an endpoint id.
        let subject = EndpointId::parse(id).map_or(Subject::None, |_| Subject::Endpoint(id));
        audit::record_best_effort(
            state,
            ctx,
            AuditTenant::of_tenant_id(tenant),
            AuditAction::WebhookEndpointDelete,
            subject,
            audit::outcome(&result),
        )
        .await;
    }
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

// --- events ------------------------------------------------------------------------------------

/// The merchant's webhook events, newest first, with their delivery status.
#[utoipa::path(get, path = "/v1/events", tag = "webhooks",
    security(("merchantApiKey" = [])),
    params(
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (default 20)", minimum = 1, maximum = 100),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "One page of events", body = Page<EventView>),
        codes::ListProblems,
    ))]
pub async fn list_events(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    RawQuery(query): RawQuery,
) -> Response {
    list_events_for(&state, &merchant.id, query.as_deref()).await
}

async fn list_events_for(state: &AppState, tenant: &MerchantId, query: Option<&str>) -> Response {
    let hooks = match service(state) {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    let (limit, cursor) = match crate::http::extract::page_query(query) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    match hooks.list_events(tenant, cursor.as_deref(), limit).await {
        Ok((events, next)) => json(
            StatusCode::OK,
            &Page {
                data: events.iter().map(EventView::from).collect(),
                next_cursor: next.map(|n| n.as_str().to_owned()),
            },
        ),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// One webhook event with its delivery status per endpoint.
#[utoipa::path(get, path = "/v1/events/{id}", tag = "webhooks",
    security(("merchantApiKey" = [])),
    params(PathId),
    responses(
        (status = 200, description = "The event", body = EventView),
        codes::EventProblems,
    ))]
pub async fn get_event(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
) -> Response {
    let result = match service(&state) {
        Ok(h) => h.get_event(&merchant.id, &id).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    match result {
        Ok(r) => json(StatusCode::OK, &EventView::from(&r)),
        Err(e) => e.into_response(),
    }
}

/// Queues a dead-lettered (or delivered) event again for its endpoints.
#[utoipa::path(post, path = "/v1/events/{id}/redeliver", tag = "webhooks",
    security(("merchantApiKey" = [])),
    params(PathId, IdempotencyKeyHeader),
    responses(
        (status = 202, description = "Queued again", body = EventView),
        codes::RedeliverProblems,
    ))]
pub async fn redeliver_event(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let hooks = match service(&state) {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let path = format!("/v1/events/{id}/redeliver");
    let parts: [&[u8]; 2] = [b"POST", path.as_bytes()];
    run_idempotent(&state, merchant.id.as_str(), key, &parts, || async {
        match hooks.redeliver(&merchant.id, &id).await {
            Ok(r) => Reply::json(StatusCode::ACCEPTED, &EventView::from(&r)),
            Err(e) => ApiError::from(e).into(),
        }
    })
    .await
}
