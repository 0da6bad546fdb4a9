//! HTTP side of the metrics (src/observability.rs): the middleware that counts and times every
//! request by route template, and `GET /metrics`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::observability;

/// Counts and times one request. The route label is axum's `MatchedPath` (the template, e.g.
/// `/v1/tokens/{id}`), never the raw path: token ids in paths must not become label values.
/// Requests no route matched (404 fallback) are `unmatched`.
pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = observability::method_label(req.method());
    // A clone of the matched path is a reference count, not a copy of the string.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let resp = next.run(req).await;
    observability::record_http(
        method,
        route.as_ref().map_or("unmatched", MatchedPath::as_str),
        resp.status().as_u16(),
        started.elapsed(),
    );
    resp
}

/// Prometheus text exposition of this process's metrics. Unauthenticated, like `/healthz`:
/// no label carries card data, an id or a credential (see src/observability.rs).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "Prometheus text format (version 0.0.4)",
        content_type = "text/plain; version=0.0.4", body = String),
))]
pub async fn metrics() -> Response {
    let body = observability::handle().render();
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
