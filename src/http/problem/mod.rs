//! The one place that turns errors into HTTP responses: RFC 9457 `application/problem+json`
//! with a stable machine `code`. Status codes are decided here and nowhere else: every code is
//! declared once in the catalogue ([`codes`]), with its status and meaning, and each route's
//! OpenAPI problem responses are derived from it.
//! (One exception, documented at [`OAuthError`]: `POST /oauth2/token` answers in OAuth's format.)

pub mod codes;

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::error::{DomainError, ProviderError};
use crate::domain::token::TokenStatus;
use tokengate_cards::CardError;

pub use codes::Problem;

/// An error as the API reports it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub retry_after: Option<Duration>,
}

/// The body of every error response (RFC 9457); its OpenAPI schema is `Problem`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
pub(crate) struct ProblemBody<'a> {
    /// `urn:tokengate:problem:<code>`.
    #[serde(rename = "type")]
    #[schema(example = "urn:tokengate:problem:token_not_found")]
    type_: String,
    /// Short, human-readable summary of the status.
    #[schema(example = "Not found")]
    title: &'a str,
    /// The HTTP status code, repeated.
    #[schema(example = 404)]
    status: u16,
    /// For humans; never echoes submitted values.
    detail: &'a str,
    /// Stable machine-readable code (docs/api.md lists them all).
    #[schema(example = "token_not_found")]
    code: &'a str,
}

impl ApiError {
    /// The problem `p` of the catalogue ([`codes`]) with a detail for this occurrence. The
    /// status, code and title come from the catalogue, nowhere else.
    pub fn of(p: &'static Problem, detail: impl Into<String>) -> ApiError {
        ApiError {
            status: p.status,
            code: p.code,
            title: p.title,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// A problem whose code comes from below as a string at `status` (the domain's validation
    /// codes, the cards crate's codes). Every such code is in the catalogue
    /// (`tests/it/architecture.rs` scans the domain for them); one that is not is still
    /// answered with its code, and logged so the gap is found.
    pub fn coded(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        match codes::find(status, code) {
            Some(p) => ApiError::of(p, detail),
            None => {
                tracing::error!(
                    code,
                    status = status.as_u16(),
                    "problem code missing from the catalogue"
                );
                debug_assert!(false, "problem code {code} missing from the catalogue");
                ApiError {
                    status,
                    code,
                    title: status.canonical_reason().unwrap_or("Error"),
                    detail: detail.into(),
                    retry_after: None,
                }
            }
        }
    }

    /// A 422 the domain raised by code (`DomainError::Validation` and the like).
    pub fn validation(code: &'static str, detail: impl Into<String>) -> ApiError {
        Self::coded(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }

    pub fn internal() -> ApiError {
        Self::of(
            &codes::INTERNAL_ERROR,
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
        ApiError::validation(e.code(), e.to_string())
    }
}

fn state_problem(s: &TokenStatus) -> &'static Problem {
    match s {
        TokenStatus::Deleted => &codes::TOKEN_DELETED,
        TokenStatus::Suspended => &codes::TOKEN_SUSPENDED,
        TokenStatus::Pending => &codes::TOKEN_PENDING,
        _ => &codes::TOKEN_NOT_ACTIVE,
    }
}

/// `Retry-After` of `wallet_index_building`: the backfill indexes a few thousand tokens a second,
/// so most deployments are done within minutes; asking sooner only adds calls that are refused.
const WALLET_INDEX_RETRY_AFTER: Duration = Duration::from_secs(30);

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::InvalidCard(c) => c.into(),
            DomainError::Validation { code, detail } => ApiError::validation(code, detail),
            DomainError::TokenNotFound => {
                ApiError::of(&codes::TOKEN_NOT_FOUND, "no such token for this merchant")
            }
            DomainError::MerchantNotFound => {
                ApiError::of(&codes::MERCHANT_NOT_FOUND, "no such merchant")
            }
            DomainError::IssuerNotFound => {
                ApiError::of(&codes::ISSUER_NOT_FOUND, "no such issuer")
            }
            DomainError::OperationNotFound => ApiError::of(
                &codes::OPERATION_NOT_FOUND,
                "no such operation for this issuer",
            ),
            DomainError::ProductionOrderNotFound => ApiError::of(
                &codes::PRODUCTION_ORDER_NOT_FOUND,
                "this card was never ordered by this issuer",
            ),
            DomainError::IssuerCardNotFound => ApiError::of(
                &codes::ISSUER_CARD_NOT_FOUND,
                "this issuer has no such card at the gateway",
            ),
            DomainError::CardDeleted => ApiError::of(
                &codes::CARD_DELETED,
                "the card is deleted at D1; it cannot be enrolled or deleted again",
            ),
            DomainError::Duplicate { problem, detail } => {
                ApiError::coded(StatusCode::CONFLICT, problem, detail)
            }
            DomainError::TokenState(s) => ApiError::of(
                state_problem(&s),
                format!(
                    "token status is {}; this operation is not allowed",
                    s.as_str()
                ),
            ),
            DomainError::Conflict => ApiError::of(
                &codes::CONCURRENT_UPDATE,
                "the token was changed concurrently; retry the request",
            ),
            DomainError::StoreUnavailable => ApiError::of(
                &codes::STORE_UNAVAILABLE,
                "the token store is unavailable; retry later",
            )
            .with_retry_after(Some(Duration::from_secs(1))),
            DomainError::WalletIndexBuilding => ApiError::of(
                &codes::WALLET_INDEX_BUILDING,
                "the gateway is still indexing tokens stored before customer wallets existed; nothing was deleted, retry later",
            )
            .with_retry_after(Some(WALLET_INDEX_RETRY_AFTER)),
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
            ProviderError::Unavailable { retry_after } => ApiError::of(
                &codes::D1_UNAVAILABLE,
                "the network token service is unavailable or overloaded; retry later",
            )
            .with_retry_after(Some(retry_after.unwrap_or(Duration::from_secs(1)))),
            ProviderError::Timeout => ApiError::of(
                &codes::D1_TIMEOUT,
                "the network token service did not answer in time; retrying is safe",
            ),
            ProviderError::Rejected { status, code } => {
                let p = if status == 409 {
                    &codes::D1_REJECTED_CONFLICT
                } else {
                    &codes::D1_REJECTED
                };
                ApiError::of(
                    p,
                    format!("the network token service refused the request ({code})"),
                )
            }
            ProviderError::NotFound => ApiError::of(
                &codes::D1_NOT_FOUND,
                "the network token service does not know this token",
            ),
            ProviderError::BadResponse(msg) => {
                tracing::warn!(error = %msg, "bad response from D1");
                ApiError::of(
                    &codes::D1_BAD_RESPONSE,
                    "the network token service answered with an error",
                )
            }
            ProviderError::NotConfigured => ApiError::of(
                &codes::D1_NOT_CONFIGURED,
                "no network token service is configured in this deployment",
            ),
        }
    }
}

// --- D1's calls to us (src/http/handlers/notify.rs) ----------------------------------------------------

/// A failure while applying a D1 notification. D1 redelivers on any answer but 2xx and treats
/// 503 as retryable, so everything a later attempt may fix (store down, a version conflict that
/// outlasted the retries) is a 503 with `Retry-After`, never a 409.
pub fn notification_error(e: DomainError) -> ApiError {
    match e {
        DomainError::Internal(msg) => {
            tracing::error!(error = %msg, "internal error while applying a notification");
            ApiError::internal()
        }
        other => {
            tracing::warn!(error = %other, "notification not applied; D1 will redeliver it");
            ApiError::of(
                &codes::NOTIFICATION_NOT_APPLIED,
                "the notification could not be applied now; redeliver it",
            )
            .with_retry_after(Some(Duration::from_secs(1)))
        }
    }
}

/// 401 for `notify-update` without a valid access token, with the RFC 6750 challenge.
pub fn notify_unauthorized(e: crate::domain::notify_auth::BearerError) -> Response {
    use crate::domain::notify_auth::BearerError;
    let (detail, challenge) = match e {
        BearerError::Missing => (
            "send the access token from POST /oauth2/token as `Authorization: Bearer <token>`",
            "Bearer realm=\"tokengate\"",
        ),
        BearerError::Invalid => (
            "the access token is not valid or has expired",
            "Bearer realm=\"tokengate\", error=\"invalid_token\"",
        ),
    };
    let mut resp = ApiError::of(&codes::UNAUTHORIZED, detail).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    resp
}

/// An error of `POST /oauth2/token`, in OAuth 2.0's own format (RFC 6749 section 5.2):
/// `{"error": "...", "error_description": "..."}`. **The one exception to problem+json** in this
/// API: the caller is an OAuth client (D1), which parses this shape and no other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthError {
    /// Client authentication failed (unknown client, wrong secret, no HTTP Basic): 401.
    InvalidClient,
    /// Malformed request (content type, form encoding, a missing or repeated parameter): 400.
    InvalidRequest(&'static str),
    /// A `grant_type` other than `client_credentials`: 400.
    UnsupportedGrantType,
}

/// The body of an [`OAuthError`]; its OpenAPI schema is `OAuthErrorResponse`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OAuthErrorResponse)]
pub(crate) struct OAuthErrorBody<'a> {
    #[schema(example = "invalid_client")]
    error: &'a str,
    error_description: &'a str,
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let (status, error, description) = match self {
            OAuthError::InvalidClient => (
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication failed",
            ),
            OAuthError::InvalidRequest(d) => (StatusCode::BAD_REQUEST, "invalid_request", d),
            OAuthError::UnsupportedGrantType => (
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only grant_type=client_credentials is supported",
            ),
        };
        let body = serde_json::to_string(&OAuthErrorBody {
            error,
            error_description: description,
        })
        .unwrap_or_default();
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        // RFC 6749 5.1/5.2: token responses must not be cached.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if self == OAuthError::InvalidClient {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"tokengate\""),
            );
        }
        resp
    }
}

// --- merchant webhooks (src/http/handlers/webhooks.rs) --------------------------------------------------

impl From<crate::domain::webhooks::WebhookError> for ApiError {
    fn from(e: crate::domain::webhooks::WebhookError) -> Self {
        use crate::domain::webhooks::{MAX_ENDPOINTS_PER_MERCHANT, WebhookError};
        match e {
            WebhookError::Validation { code, detail } => ApiError::validation(code, detail),
            // 400, not 422: the URL is well formed, but the gateway will not call it. The detail
            // names the class only, never the address a name resolved to (internal DNS).
            WebhookError::Forbidden(class) => ApiError::of(
                &codes::WEBHOOK_URL_FORBIDDEN,
                format!(
                    "the url's host is or resolves to {} ({}); webhook receivers must be reachable on the public internet",
                    class.describe(),
                    class.as_str()
                ),
            ),
            WebhookError::EndpointNotFound => ApiError::of(
                &codes::WEBHOOK_ENDPOINT_NOT_FOUND,
                "no such webhook endpoint for this merchant",
            ),
            WebhookError::EventNotFound => {
                ApiError::of(&codes::EVENT_NOT_FOUND, "no such event for this merchant")
            }
            WebhookError::TooManyEndpoints => ApiError::of(
                &codes::TOO_MANY_WEBHOOK_ENDPOINTS,
                format!(
                    "a merchant can have at most {MAX_ENDPOINTS_PER_MERCHANT} webhook endpoints; delete one first"
                ),
            ),
            WebhookError::NotRedeliverable => ApiError::of(
                &codes::EVENT_NOT_REDELIVERABLE,
                "every delivery of this event is still queued or retrying, or its endpoints were deleted",
            ),
            // The endpoint, not a token, lost its compare-and-set rounds.
            WebhookError::Domain(DomainError::Conflict) => ApiError::of(
                &codes::CONCURRENT_UPDATE,
                "the webhook endpoint was changed concurrently; retry the request",
            ),
            WebhookError::Domain(d) => d.into(),
        }
    }
}

// --- client certificates (src/http/auth/client_cert.rs) ---------------------------------------------

impl From<crate::domain::client_certs::CertRefusal> for ApiError {
    fn from(r: crate::domain::client_certs::CertRefusal) -> Self {
        use crate::domain::client_certs::CertRefusal;
        // Never says which merchant a certificate belongs to.
        match r {
            CertRefusal::Mismatch => ApiError::of(
                &codes::CLIENT_CERT_MISMATCH,
                "the client certificate of this connection is bound to another merchant than the API key",
            ),
            CertRefusal::Required => ApiError::of(
                &codes::CLIENT_CERT_REQUIRED,
                "this merchant requires one of its client certificates (mutual TLS) on every request",
            ),
        }
    }
}

impl From<crate::domain::client_certs::ClientCertError> for ApiError {
    fn from(e: crate::domain::client_certs::ClientCertError) -> Self {
        use crate::domain::client_certs::ClientCertError;
        match e {
            ClientCertError::Validation { code, detail } => ApiError::validation(code, detail),
            ClientCertError::InUse(fp) => ApiError::of(
                &codes::CLIENT_CERT_IN_USE,
                format!(
                    "certificate {fp} is bound to another merchant or issuer; unbind it there first"
                ),
            ),
            ClientCertError::Domain(d) => d.into(),
        }
    }
}
