//! The one place that turns errors into HTTP responses: RFC 9457 `application/problem+json`
//! with a stable machine `code`. Status codes are decided here and nowhere else.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::card::CardError;
use crate::domain::error::{DomainError, ProviderError};
use crate::domain::token::TokenStatus;

/// An error as the API reports it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub retry_after: Option<Duration>,
}

#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    type_: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            title,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, code, "Bad request", detail)
    }

    pub fn unprocessable(code: &'static str, detail: impl Into<String>) -> ApiError {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
            "Unprocessable request",
            detail,
        )
    }

    pub fn unauthorized(detail: impl Into<String>) -> ApiError {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
        )
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, code, "Not found", detail)
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> ApiError {
        Self::new(StatusCode::CONFLICT, code, "Conflict", detail)
    }

    pub fn unavailable(code: &'static str, detail: impl Into<String>) -> ApiError {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            "Service unavailable",
            detail,
        )
    }

    pub fn internal() -> ApiError {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "Internal error",
            "an unexpected error occurred; it has been logged",
        )
    }

    pub fn with_retry_after(mut self, d: Option<Duration>) -> ApiError {
        self.retry_after = d;
        self
    }

    /// The JSON body (also what idempotent replay stores).
    pub fn body(&self) -> String {
        serde_json::to_string(&ProblemBody {
            type_: format!("urn:tokengate:problem:{}", self.code),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code,
        })
        .unwrap_or_default()
    }
}

pub const PROBLEM_JSON: &str = "application/problem+json";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, self.body()).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(ra) = self.retry_after {
            set_retry_after(h, ra);
        }
        resp
    }
}

/// `Retry-After` in whole seconds, at least 1 (a 0 invites an immediate retry storm).
pub fn set_retry_after(h: &mut axum::http::HeaderMap, ra: Duration) {
    let secs = ra.as_secs_f64().ceil().max(1.0) as u64;
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        h.insert(header::RETRY_AFTER, v);
    }
}

impl From<CardError> for ApiError {
    fn from(e: CardError) -> Self {
        ApiError::unprocessable(e.code(), e.to_string())
    }
}

fn state_code(s: &TokenStatus) -> &'static str {
    match s {
        TokenStatus::Deleted => "token_deleted",
        TokenStatus::Suspended => "token_suspended",
        TokenStatus::Pending => "token_pending",
        _ => "token_not_active",
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::InvalidCard(c) => c.into(),
            DomainError::Validation { code, detail } => ApiError::unprocessable(code, detail),
            DomainError::TokenNotFound => {
                ApiError::not_found("token_not_found", "no such token for this merchant")
            }
            DomainError::MerchantNotFound => {
                ApiError::not_found("merchant_not_found", "no such merchant")
            }
            DomainError::TokenState(s) => ApiError::conflict(
                state_code(&s),
                format!(
                    "token status is {}; this operation is not allowed",
                    s.as_str()
                ),
            ),
            DomainError::Conflict => ApiError::conflict(
                "concurrent_update",
                "the token was changed concurrently; retry the request",
            ),
            DomainError::StoreUnavailable => ApiError::unavailable(
                "store_unavailable",
                "the token store is unavailable; retry later",
            )
            .with_retry_after(Some(Duration::from_secs(1))),
            DomainError::Upstream(p) => p.into(),
            DomainError::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                ApiError::internal()
            }
        }
    }
}

impl From<ProviderError> for ApiError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::Unavailable { retry_after } => ApiError::unavailable(
                "d1_unavailable",
                "the network token service is unavailable or overloaded; retry later",
            )
            .with_retry_after(Some(retry_after.unwrap_or(Duration::from_secs(1)))),
            ProviderError::Timeout => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "d1_timeout",
                "Gateway timeout",
                "the network token service did not answer in time; retrying is safe",
            ),
            ProviderError::Rejected { status, code } => {
                let (st, title) = if status == 409 {
                    (StatusCode::CONFLICT, "Conflict")
                } else {
                    (StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable request")
                };
                ApiError::new(
                    st,
                    "d1_rejected",
                    title,
                    format!("the network token service refused the request ({code})"),
                )
            }
            ProviderError::NotFound => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "d1_not_found",
                "Bad gateway",
                "the network token service does not know this token",
            ),
            ProviderError::BadResponse(msg) => {
                tracing::warn!(error = %msg, "bad response from D1");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "d1_bad_response",
                    "Bad gateway",
                    "the network token service answered with an error",
                )
            }
            ProviderError::NotConfigured => ApiError::unavailable(
                "d1_not_configured",
                "no network token service is configured in this deployment",
            ),
        }
    }
}
