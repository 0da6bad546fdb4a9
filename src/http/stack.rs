//! The one tower middleware stack of the API, outermost layer first.

use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{BoxError, ServiceBuilder};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

use super::problem::{ApiError, codes};

/// Middleware settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub request_timeout: std::time::Duration,
    pub max_concurrency: usize,
    pub body_limit: usize,
    /// `log.access`, `log.access_sample` (src/http/telemetry.rs).
    pub access_log: super::telemetry::AccessLog,
}

pub fn apply(router: Router, s: &HttpSettings) -> Router {
    router.layer(
        ServiceBuilder::new()
            // A request id first, so every later layer and every log line can carry it; a
            // client-supplied x-request-id is kept so traces join up across services.
            .layer(SetRequestIdLayer::x_request_id(FastRequestUuid))
            // Echo it on the response so a client can quote it in a support ticket.
            .layer(PropagateRequestIdLayer::x_request_id())
            // The request span (request id and route template), metrics by route and the access
            // log (src/http/telemetry.rs): one cheap middleware instead of tower-http's
            // TraceLayer, whose span logged the raw path (token ids) and whose per-response
            // event formatted the whole span. Outside shedding and timeouts so their 503s are
            // counted and logged too. Never bodies or headers (card data, credentials).
            .layer(axum::middleware::from_fn_with_state(
                s.access_log,
                super::telemetry::track,
            ))
            // Turns shedding and timeouts below into problem responses.
            .layer(HandleErrorLayer::new(handle_stack_error))
            // Shed outside the limit: when all permits are taken, answer 503 at once instead
            // of queueing (a queue only adds latency to requests that will time out anyway).
            .load_shed()
            // One global limit shared by all routes (not per route), bounding memory and the
            // load we put on Redis and D1.
            .layer(GlobalConcurrencyLimitLayer::new(s.max_concurrency))
            // The whole-request budget, inside the limit so a slow request frees its permit.
            .timeout(s.request_timeout),
    )
}

/// Random (v4) UUIDs as request ids, from the user-space CSPRNG. tower-http's `MakeRequestUuid`
/// draws each one from the OS (`getrandom`), a system call per request that showed in the GET
/// profile (docs/performance.md). Request ids need uniqueness, not secrecy from the OS pool.
#[derive(Clone, Copy)]
struct FastRequestUuid;

impl MakeRequestId for FastRequestUuid {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        let mut buf = uuid::Uuid::encode_buffer();
        let s = id.hyphenated().encode_lower(&mut buf);
        axum::http::HeaderValue::from_str(s)
            .ok()
            .map(RequestId::new)
    }
}

async fn handle_stack_error(err: BoxError) -> axum::response::Response {
    if err.is::<tower::load_shed::error::Overloaded>() {
        ApiError::of(
            &codes::OVERLOADED,
            "the gateway is at its concurrency limit; retry shortly",
        )
        .with_retry_after(Some(Duration::from_secs(1)))
        .into_response()
    } else if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::of(
            &codes::REQUEST_TIMEOUT,
            "the request did not complete within the gateway's time budget",
        )
        .with_retry_after(Some(Duration::from_secs(1)))
        .into_response()
    } else {
        tracing::error!(error = %err, "middleware error");
        let mut e = ApiError::internal();
        e.status = StatusCode::INTERNAL_SERVER_ERROR;
        e.into_response()
    }
}
