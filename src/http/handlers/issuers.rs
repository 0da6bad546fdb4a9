//! Issuers (the issuer side of D1, docs/issuer.md): the admin's onboarding routes
//! (`/v1/issuers`), and an issuer's view of its asynchronous D1 operations
//! (`/v1/issuer/operations`).

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::audit::{AuditAction, SUCCESS};
use crate::domain::issuer::{Issuer, IssuerId, valid_card_id};
use crate::domain::issuer_ops::{IssuerOperation, OperationFilter, OperationStatus};
use crate::http::audit::{self, AuditCtx, Subject};
use crate::http::auth::{AdminAuth, IssuerAuth};
use crate::http::dto::rfc3339;
use crate::http::extract::{Body, DEFAULT_LIMIT, MAX_LIMIT, parse_json};
use crate::http::handlers::keys::{ApiKeyCreatedView, CreateApiKeyRequest};
use crate::http::idempotency::{Reply, key_from, run_idempotent};
use crate::http::params::IdempotencyKeyHeader;
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateIssuerRequest {
    /// 1 to 200 printable characters.
    #[schema(example = "Example Bank", min_length = 1)]
    pub name: String,
    /// The issuer's id at D1: exactly 10 characters.
    #[schema(example = "EXBANK0001", min_length = 10, max_length = 10)]
    pub d1_issuer_id: String,
}

/// An issuer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Issuer)]
pub struct IssuerView<'a> {
    #[schema(example = "iss_NJayePY2ypiUCAIv")]
    pub id: &'a str,
    pub name: &'a str,
    #[schema(example = "EXBANK0001")]
    pub d1_issuer_id: &'a str,
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl<'a> From<&'a Issuer> for IssuerView<'a> {
    fn from(i: &'a Issuer) -> Self {
        IssuerView {
            id: i.id.as_str(),
            name: &i.name,
            d1_issuer_id: &i.d1_issuer_id,
            created_at: rfc3339(i.created_at),
        }
    }
}

/// A new issuer and its first API key (default issuer scopes), shown once.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = IssuerCreated)]
pub struct IssuerCreated<'a> {
    #[schema(example = "iss_NJayePY2ypiUCAIv")]
    pub id: &'a str,
    pub name: &'a str,
    pub d1_issuer_id: &'a str,
    /// The issuer's API key (`Authorization: Bearer <apiKey>`). Shown once.
    #[schema(example = "tgk_...")]
    pub api_key: &'a str,
    #[schema(format = DateTime)]
    pub created_at: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = IssuerList)]
struct IssuerList<'a> {
    data: Vec<IssuerView<'a>>,
}

/// One change in an operation's history.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = OperationStatusChange)]
pub struct StatusChangeView {
    #[schema(example = "SUCCESSFUL")]
    pub status: &'static str,
    /// `details.status` at that point (production tracking), if any.
    pub details_status: Option<String>,
    #[schema(format = DateTime)]
    pub at: String,
    /// `GATEWAY`, `NOTIFICATION` or `POLL`: who told us.
    pub source: &'static str,
}

/// An asynchronous D1 operation of the issuer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = IssuerOperation)]
pub struct OperationView {
    #[schema(example = "op_d7XXXyQu2WZRKlyWvsMJRA")]
    pub id: String,
    /// D1's operation kind: `CLICK_TO_PAY_ENROLMENT`, `CLICK_TO_PAY_UPDATE`,
    /// `CLICK_TO_PAY_OPT_OUT`, `PRODUCE`, ... (new values may appear).
    #[schema(example = "CLICK_TO_PAY_ENROLMENT")]
    pub operation: String,
    /// `PENDING`, `SUCCESSFUL` or `FAILED`.
    #[schema(example = "PENDING")]
    pub status: &'static str,
    pub card_id: Option<String>,
    pub consumer_id: Option<String>,
    /// Sent to D1 with the call and every re-drive of it: D1's idempotency anchor.
    pub issuer_request_id: String,
    /// D1's `operationId`, once known.
    pub d1_operation_id: Option<String>,
    #[schema(format = DateTime)]
    pub start_time: String,
    #[schema(format = DateTime)]
    pub end_time: Option<String>,
    /// D1's `errorCode` when the operation failed.
    pub error_code: Option<String>,
    pub error: Option<String>,
    /// D1's `details` as last received (e.g. production tracking).
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
    pub history: Vec<StatusChangeView>,
}

impl From<&IssuerOperation> for OperationView {
    fn from(op: &IssuerOperation) -> Self {
        OperationView {
            id: op.id.as_str().to_owned(),
            operation: op.kind.as_str().to_owned(),
            status: op.status.as_str(),
            card_id: op.card_id.clone(),
            consumer_id: op.consumer_id.clone(),
            issuer_request_id: op.issuer_request_id.clone(),
            d1_operation_id: op.d1_operation_id.clone(),
            start_time: rfc3339(op.start_time),
            end_time: op.end_time.map(rfc3339),
            error_code: op.error_code.clone(),
            error: op.error.clone(),
            details: op.details.clone(),
            history: op
                .history
                .iter()
                .map(|h| StatusChangeView {
                    status: h.status.as_str(),
                    details_status: h.details_status.clone(),
                    at: rfc3339(h.at),
                    source: match h.source {
                        crate::domain::issuer_ops::ChangeSource::Gateway => "GATEWAY",
                        crate::domain::issuer_ops::ChangeSource::Notification => "NOTIFICATION",
                        crate::domain::issuer_ops::ChangeSource::Poll => "POLL",
                    },
                })
                .collect(),
        }
    }
}

/// A page of operations, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = IssuerOperationPage)]
struct OperationPageView {
    data: Vec<OperationView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// Onboards an issuer and issues its first API key, shown once.
#[utoipa::path(post, path = "/v1/issuers", tag = "issuers",
    security(("adminToken" = [])),
    params(IdempotencyKeyHeader),
    request_body = CreateIssuerRequest,
    responses(
        (status = 201, description = "The issuer and its API key", body = IssuerCreated),
        codes::CreateIssuerProblems,
    ))]
pub async fn create_issuer(
    State(state): State<AppState>,
    _admin: AdminAuth,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let key = match key_from(&headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let parts: [&[u8]; 3] = [b"POST", b"/v1/issuers", &body];
    run_idempotent(&state, "admin", key, &parts, || async {
        let req: CreateIssuerRequest = match parse_json(&body) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        match state
            .issuers
            .create_issuer(&req.name, &req.d1_issuer_id)
            .await
        {
            Ok((issuer, rec, key)) => {
                // As for merchants: a failed creation has no trail to hold it, only successes
                // are recorded (docs/security.md).
                let ctx = AuditCtx::admin(audit::request_id(&headers));
                audit::record_best_effort(
                    &state,
                    &ctx,
                    &issuer.id,
                    AuditAction::IssuerCreate,
                    Subject::ApiKey(rec.id.as_str()),
                    SUCCESS.to_owned(),
                )
                .await;
                let view = IssuerCreated {
                    id: issuer.id.as_str(),
                    name: &issuer.name,
                    d1_issuer_id: &issuer.d1_issuer_id,
                    api_key: &key.secret,
                    created_at: rfc3339(issuer.created_at),
                };
                // The key is in the body: a replay copy is kept only sealed.
                Reply::json(StatusCode::CREATED, &view).sealed()
            }
            Err(e) => ApiError::from(e).into(),
        }
    })
    .await
}

/// Every issuer, oldest first.
#[utoipa::path(get, path = "/v1/issuers", tag = "issuers",
    security(("adminToken" = [])),
    responses(
        (status = 200, description = "The issuers", body = IssuerList),
        codes::ListIssuersProblems,
    ))]
pub async fn list_issuers(State(state): State<AppState>, _admin: AdminAuth) -> Response {
    match state.issuers.list_issuers().await {
        Ok(list) => axum::Json(IssuerList {
            data: list.iter().map(IssuerView::from).collect(),
        })
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn parse_issuer_id(s: &str) -> Result<IssuerId, ApiError> {
    IssuerId::parse(s).ok_or_else(|| ApiError::of(&codes::ISSUER_NOT_FOUND, "no such issuer"))
}

/// One issuer.
#[utoipa::path(get, path = "/v1/issuers/{id}", tag = "issuers",
    security(("adminToken" = [])),
    params(("id" = String, Path, description = "The issuer's id (`iss_...`)")),
    responses(
        (status = 200, description = "The issuer", body = IssuerView),
        codes::GetIssuerProblems,
    ))]
pub async fn get_issuer(
    State(state): State<AppState>,
    _admin: AdminAuth,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_issuer_id(&id) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    match state.issuers.get_issuer(&id).await {
        Ok(i) => axum::Json(IssuerView::from(&i)).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Issues another API key for an issuer (issuer scopes only: `issuer:cards`,
/// `issuer:click-to-pay`, `issuer:click-to-pay:pii`, `issuer:orders`, `issuer:operations`).
#[utoipa::path(post, path = "/v1/issuers/{id}/api-keys", tag = "issuers",
    security(("adminToken" = [])),
    params(("id" = String, Path, description = "The issuer's id (`iss_...`)"), IdempotencyKeyHeader),
    request_body = CreateApiKeyRequest,
    responses(
        (status = 201, description = "The key and its secret, shown once", body = ApiKeyCreatedView),
        codes::AdminCreateIssuerKeyProblems,
    ))]
pub async fn create_issuer_key(
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
    let id = match parse_issuer_id(&id) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let path = format!("/v1/issuers/{id}/api-keys");
    let parts: [&[u8]; 3] = [b"POST", path.as_bytes(), &body];
    run_idempotent(&state, "admin", key, &parts, || async {
        let req: CreateApiKeyRequest = match parse_json(&body) {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let result = state
            .issuers
            .create_issuer_key(&id, &req.name, &req.scopes)
            .await
            .map_err(ApiError::from);
        // In the issuer's trail when the issuer exists (an unknown one has no trail).
        if !matches!(&result, Err(e) if e.code == codes::ISSUER_NOT_FOUND.code) {
            let ctx = AuditCtx::admin(audit::request_id(&headers));
            let created = result.as_ref().ok().map(|(rec, _)| rec.id.as_str());
            audit::record_best_effort(
                &state,
                &ctx,
                &id,
                AuditAction::ApiKeyCreate,
                created.map_or(Subject::None, Subject::ApiKey),
                audit::outcome(&result),
            )
            .await;
        }
        match result {
            Ok((rec, key)) => Reply::json(
                StatusCode::CREATED,
                &ApiKeyCreatedView::new(&rec, &key.secret),
            )
            .sealed(),
            Err(e) => e.into(),
        }
    })
    .await
}

/// One of the issuer's operations.
#[utoipa::path(get, path = "/v1/issuer/operations/{operation_id}", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(("operation_id" = String, Path, description = "Our operation id (`op_...`)")),
    responses(
        (status = 200, description = "The operation", body = OperationView),
        codes::GetOperationProblems,
    ))]
pub async fn get_operation(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    Path(id): Path<String>,
) -> Response {
    match state.issuers.get_operation(&issuer.id, &id).await {
        Ok(op) => axum::Json(OperationView::from(&op)).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Parses `?cardId=&status=&limit=&cursor=`; unknown or repeated parameters are refused.
fn operation_query(
    raw: Option<&str>,
) -> Result<(OperationFilter, usize, Option<String>), ApiError> {
    let bad = |d: String| ApiError::of(&codes::INVALID_QUERY, d);
    let mut filter = OperationFilter::default();
    let mut limit = None;
    let mut cursor = None;
    let mut seen: Vec<&str> = Vec::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if seen.contains(&k) {
            return Err(bad(format!("`{k}` is given more than once")));
        }
        match k {
            "cardId" => {
                if !valid_card_id(v) {
                    return Err(ApiError::of(
                        &codes::INVALID_CARD_ID,
                        "cardId must match ^[A-Za-z0-9_-]{1,48}$",
                    ));
                }
                filter.card_id = Some(v.to_owned());
            }
            "status" => {
                filter.status =
                    Some(OperationStatus::parse(v).ok_or_else(|| {
                        bad("`status` must be PENDING, SUCCESSFUL or FAILED".into())
                    })?);
            }
            "limit" => {
                limit = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            bad(format!("limit must be an integer from 1 to {MAX_LIMIT}"))
                        })?,
                );
            }
            "cursor" if !v.is_empty() => cursor = Some(v.to_owned()),
            _ => {
                return Err(bad(
                    "the query parameters are `cardId`, `status`, `limit` and `cursor`".into(),
                ));
            }
        }
        seen.push(k);
    }
    Ok((filter, limit.unwrap_or(DEFAULT_LIMIT), cursor))
}

/// The issuer's operations, newest first, filterable by card and status (index-backed).
#[utoipa::path(get, path = "/v1/issuer/operations", tag = "issuer",
    security(("issuerApiKey" = [])),
    params(
        ("cardId" = Option<String>, Query, description = "Only operations on this card"),
        ("status" = Option<String>, Query, description = "`PENDING`, `SUCCESSFUL` or `FAILED`"),
        ("limit" = Option<usize>, Query, description = "1 to 100, default 20"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of operations", body = OperationPageView),
        codes::ListOperationsProblems,
    ))]
pub async fn list_operations(
    State(state): State<AppState>,
    IssuerAuth(issuer, _): IssuerAuth,
    RawQuery(q): RawQuery,
) -> Response {
    let (filter, limit, cursor) = match operation_query(q.as_deref()) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    match state
        .issuers
        .list_operations(&issuer.id, &filter, limit, cursor.as_deref())
        .await
    {
        Ok(page) => axum::Json(OperationPageView {
            data: page.items.iter().map(OperationView::from).collect(),
            next_cursor: page.next,
        })
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_query_accepts_its_parameters_only() {
        let (f, l, c) = operation_query(Some("cardId=c-1&status=FAILED&limit=5&cursor=x")).unwrap();
        assert_eq!(f.card_id.as_deref(), Some("c-1"));
        assert_eq!(f.status, Some(OperationStatus::Failed));
        assert_eq!((l, c.as_deref()), (5, Some("x")));
        for bad in [
            "status=DONE",
            "limit=0",
            "page=1",
            "cardId=a&cardId=b",
            "cardId=a%20b",
        ] {
            assert!(operation_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
