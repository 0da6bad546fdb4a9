//! HTTP side of the metrics and logs: the request context of log lines, the metrics and the
//! access-log line of every request (called by the middleware in src/http/stack.rs), and
//! `GET /metrics`.

use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::observability;
use crate::telemetry::context::RequestContext;

pub use crate::telemetry::ACCESS_TARGET;

/// The request id header: taken from the client when it sends one, else generated (stack.rs).
pub const REQUEST_ID: &str = "x-request-id";

/// `log.access` and `log.access_sample`.
#[derive(Debug, Clone, Copy)]
pub struct AccessLog {
    pub enabled: bool,
    /// Fraction (0 to 1) of requests answered below 400 that are logged.
    pub sample: f64,
}

impl AccessLog {
    /// Whether a response with `status` gets an access-log line. Every 4xx and 5xx is logged:
    /// they are what an operator searches the log for (failed requests, refused credentials,
    /// rate limiting), normally rare, and a sample would hide the one being looked for. Sampling
    /// is for the high-volume successes. `draw` (uniform in 0..1) is only called when the
    /// decision depends on it, so the default (1.0) never touches the random generator.
    pub fn should_log(self, status: u16, draw: impl FnOnce() -> f64) -> bool {
        if !self.enabled {
            return false;
        }
        if status >= 400 || self.sample >= 1.0 {
            return true;
        }
        self.sample > 0.0 && draw() < self.sample
    }
}

/// The request id as logged: the one src/http/stack.rs generated or the client sent. A client id
/// that is not visible ASCII, is longer than 64 bytes, or holds a run of 13 or more digits (a
/// card number pasted into a header) is logged as `-`: log lines are bounded, and a PAN never
/// reaches one. Generated ids (UUIDs: at most 12 digits in a row) always pass.
pub(super) fn loggable_request_id(v: Option<&HeaderValue>) -> &str {
    let Some(s) = v.and_then(|v| v.to_str().ok()) else {
        return "-";
    };
    if s.is_empty() || s.len() > 64 {
        return "-";
    }
    let mut run = 0;
    for b in s.bytes() {
        run = if b.is_ascii_digit() { run + 1 } else { 0 };
        if run >= 13 {
            return "-";
        }
    }
    s
}

/// The route of a request no route matched (the 404 fallback): the raw path is never logged.
pub const UNMATCHED: &str = "unmatched";

/// The request context of every line logged while a request is handled
/// (src/telemetry/context.rs): its id as logged and its route template (the template, never the
/// raw path: paths hold token ids). `None` when `log.level` filters out info lines of this
/// module, as it filtered out the `request` span the context replaces.
pub(super) fn request_context(
    request_id: &HeaderValue,
    route: &Arc<str>,
) -> Option<RequestContext> {
    if !tracing::span_enabled!(tracing::Level::INFO, request_id, route) {
        return None;
    }
    let loggable = loggable_request_id(Some(request_id));
    Some(RequestContext {
        request_id: if loggable == "-" {
            HeaderValue::from_static("-")
        } else {
            request_id.clone()
        },
        route: Arc::clone(route),
    })
}

/// One answered request: its metrics and its access-log line (src/http/stack.rs calls it with
/// every response, the middleware's own 503s included).
///
/// The route is axum's `MatchedPath` (the template, e.g. `/v1/tokens/{id}`), never the raw
/// path: token ids in paths must not become label values or reach a log line. Requests no route
/// matched (404 fallback) are `unmatched`.
///
/// The access-log line is one event emitted after the response, outside the request context,
/// with every field explicit: method, route, status, latency_ms, request_id. 5xx lines are at
/// warn, so they still show with `log.level = "warn"`.
pub(super) fn record(
    access: AccessLog,
    method: &'static str,
    route: &str,
    metrics: &observability::HttpRouteMetrics,
    request_id: &HeaderValue,
    started: Instant,
    status: u16,
) {
    let elapsed = started.elapsed();
    metrics.record(method, status, elapsed);
    if access.should_log(status, rand::random::<f64>) {
        let request_id = loggable_request_id(Some(request_id));
        // Milliseconds with microsecond resolution, as a number (JSON) rather than a string.
        let latency_ms = elapsed.as_micros() as f64 / 1000.0;
        if status >= 500 {
            tracing::warn!(target: ACCESS_TARGET, method, route, status, latency_ms, request_id, "request");
        } else {
            tracing::info!(target: ACCESS_TARGET, method, route, status, latency_ms, request_id, "request");
        }
    }
}

/// Prometheus text exposition of this process's metrics. Unauthenticated, like `/healthz`:
/// no label carries card data, an id or a credential (see src/observability.rs).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "Prometheus text format (version 0.0.4)",
        content_type = "text/plain; version=0.0.4", body = String),
))]
pub async fn metrics() -> Response {
    observability::set_log_dropped_lines(crate::telemetry::dropped_lines());
    let body = observability::handle().render();
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> f64 {
        panic!("the decision did not need a draw")
    }

    #[test]
    fn sampling_applies_to_successes_only() {
        let all = AccessLog {
            enabled: true,
            sample: 1.0,
        };
        let none = AccessLog {
            enabled: true,
            sample: 0.0,
        };
        let tenth = AccessLog {
            enabled: true,
            sample: 0.1,
        };
        let off = AccessLog {
            enabled: false,
            sample: 1.0,
        };
        for status in [200, 201, 204, 304] {
            assert!(all.should_log(status, never));
            assert!(!none.should_log(status, never));
            assert!(!off.should_log(status, never));
            assert!(tenth.should_log(status, || 0.05));
            assert!(!tenth.should_log(status, || 0.1));
            assert!(!tenth.should_log(status, || 0.9));
        }
        for status in [400, 401, 404, 429, 500, 503] {
            assert!(none.should_log(status, never), "{status}");
            assert!(tenth.should_log(status, never), "{status}");
            assert!(!off.should_log(status, never), "{status}");
        }
    }

    #[test]
    fn sampled_share_is_close_to_the_fraction() {
        let quarter = AccessLog {
            enabled: true,
            sample: 0.25,
        };
        let logged = (0..20_000)
            .filter(|_| quarter.should_log(200, rand::random::<f64>))
            .count();
        assert!((4_000..6_000).contains(&logged), "{logged}");
    }

    #[test]
    fn request_ids_are_logged_only_when_harmless() {
        let hv = |s: &str| HeaderValue::from_str(s).unwrap();
        let uuid = "0b7d3f1e-9c4a-4e2b-8f6d-123456789012";
        assert_eq!(loggable_request_id(Some(&hv(uuid))), uuid);
        assert_eq!(loggable_request_id(Some(&hv("client-42"))), "client-42");
        assert_eq!(loggable_request_id(None), "-");
        assert_eq!(loggable_request_id(Some(&hv("4111111111111111"))), "-");
        assert_eq!(loggable_request_id(Some(&hv("id-4111111111111-x"))), "-");
        assert_eq!(loggable_request_id(Some(&hv(&"a".repeat(65)))), "-");
        let not_ascii = HeaderValue::from_bytes("é".as_bytes()).unwrap();
        assert_eq!(loggable_request_id(Some(&not_ascii)), "-");
    }
}
