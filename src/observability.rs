//! Prometheus metrics: the process-wide recorder, every metric name, and the helpers the other
//! layers call. `GET /metrics` (src/http/telemetry.rs) renders [`handle`].
//!
//! # Metrics
//!
//! | name | type | labels |
//! |---|---|---|
//! | `tokengate_http_requests_total` | counter | `method`, `route`, `status` |
//! | `tokengate_http_request_duration_seconds` | histogram | `method`, `route`, `status` |
//! | `tokengate_d1_calls_total` | counter | `operation`, `outcome` |
//! | `tokengate_d1_call_duration_seconds` | histogram | `operation`, `outcome` (calls refused before sending are counted, not timed) |
//! | `tokengate_d1_circuit_open` | gauge (0 or 1) | none (1 from the moment the D1 circuit breaker opens until a probe closes it) |
//! | `tokengate_store_operation_duration_seconds` | histogram | `operation`, `outcome` |
//! | `tokengate_store_errors_total` | counter | `operation`, `kind` (`unavailable`, `corrupt`) |
//! | `tokengate_store_durability_waits_total` | counter | `mode` (`wait`, `waitaof`), `outcome` (`confirmed`, `timeout`, `refused`, `error`) |
//! | `tokengate_store_durability_wait_seconds` | histogram | `mode`, `outcome` (write and confirmation, one round trip) |
//! | `tokengate_token_transitions_total` | counter | `from`, `to` (`NONE` for created/removed) |
//! | `tokengate_tokens` | gauge | `status` |
//! | `tokengate_token_counts_complete` | gauge (0 or 1) | none |
//! | `tokengate_build_info` | gauge (always 1) | `version` |
//! | `tokengate_log_dropped_lines_total` | counter | none (log lines dropped because the log writer thread was too far behind; src/telemetry.rs) |
//!
//! **Labels never carry a PAN, a token number, a token id, a merchant id or a key**: `route` is
//! the route *template* (`/v1/tokens/{id}`, from axum's `MatchedPath`; `unmatched` for 404s),
//! `method` is one of the standard methods or `OTHER`, and statuses outside the known set are
//! reported as `OTHER` (a status string D1 invents must not grow the label set without bound).
//!
//! **`tokengate_tokens` is the absolute number of tokens per status in the store** (every
//! merchant, `DELETED` tombstones included; statuses outside the known set as `OTHER`). The
//! store keeps per-merchant counts in the same atomic step as every token write
//! (`storage::counts`, `docs/storage.md` "Token counts"), whichever instance or code path
//! writes; `domain::token_counts` reads their sum every `metrics.token_counts_interval_ms`
//! (15 s by default) and sets the gauge. A scrape reads the gauge only: no store access, no
//! scan. So the value is up to one interval old, survives restarts (it is read back at start-up),
//! and is the same on every instance: aggregate instances with `max`, not `sum`.
//! Records written before the counts existed are counted by a one-time backfill;
//! `tokengate_token_counts_complete` is 0 until it has finished (the gauge is then too low).
//! `tokengate_token_transitions_total` counts the status changes this process wrote
//! ([`token_transition`]), for rates and alerting.
//!
//! # One recorder per process
//!
//! The `metrics` facade has one global recorder per process. [`handle`] installs ours the first
//! time it is called and every later call (another gateway in the same process, as the
//! integration tests start dozens) shares it, so all gateways of one process render the same
//! metrics. That is the right answer for one gateway per process (production) and acceptable
//! for tests, which assert on metrics they caused (counters only go up).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "tokengate_http_requests_total";
pub const HTTP_DURATION: &str = "tokengate_http_request_duration_seconds";
pub const D1_CALLS: &str = "tokengate_d1_calls_total";
pub const D1_DURATION: &str = "tokengate_d1_call_duration_seconds";
pub const D1_CIRCUIT_OPEN: &str = "tokengate_d1_circuit_open";
pub const STORE_DURATION: &str = "tokengate_store_operation_duration_seconds";
pub const STORE_ERRORS: &str = "tokengate_store_errors_total";
pub const DURABILITY_WAITS: &str = "tokengate_store_durability_waits_total";
pub const DURABILITY_WAIT_DURATION: &str = "tokengate_store_durability_wait_seconds";
pub const TOKEN_TRANSITIONS: &str = "tokengate_token_transitions_total";
pub const TOKENS: &str = "tokengate_tokens";
pub const TOKEN_COUNTS_COMPLETE: &str = "tokengate_token_counts_complete";
pub const BUILD_INFO: &str = "tokengate_build_info";
pub const LOG_DROPPED: &str = "tokengate_log_dropped_lines_total";

/// Histogram buckets (seconds) for every latency: 1 ms to 10 s, the range between an embedded
/// store read and a D1 call at its time budget.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder's handle; installs the recorder on first use (see the module docs).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new();
        let builder = builder
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "metrics: invalid histogram buckets; using summaries");
                PrometheusBuilder::new()
            });
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::error!(
                "metrics: another recorder is already installed in this process; /metrics will be empty"
            );
        }
        describe();
        gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        handle
    })
}

/// Installs the recorder (idempotent). Called when a gateway is built, before anything records.
pub fn init() {
    let _ = handle();
}

/// Drains histogram buckets; the exporter leaves this to us because we run no exporter task.
/// Cheap; `Gateway::run` calls it every few seconds.
pub fn run_upkeep() {
    handle().run_upkeep();
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by method, route template and status"
    );
    describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request latency, by method, route template and status"
    );
    describe_counter!(
        D1_CALLS,
        "D1 API calls (all attempts of one call count once), by operation and outcome"
    );
    describe_histogram!(
        D1_DURATION,
        metrics::Unit::Seconds,
        "D1 API call latency including retries, by operation and outcome"
    );
    describe_histogram!(
        STORE_DURATION,
        metrics::Unit::Seconds,
        "Token store operation latency, by operation and outcome"
    );
    describe_counter!(
        STORE_ERRORS,
        "Token store failures (backend unavailable or corrupt record), by operation and kind"
    );
    describe_counter!(
        DURABILITY_WAITS,
        "Redis writes confirmed on replicas or AOF (storage.redis_durability), by mode and outcome"
    );
    describe_histogram!(
        DURABILITY_WAIT_DURATION,
        metrics::Unit::Seconds,
        "Latency of a confirmed Redis write (the write and its WAIT/WAITAOF), by mode and outcome"
    );
    describe_counter!(
        TOKEN_TRANSITIONS,
        "Token status changes written by this process (NONE: created or removed)"
    );
    describe_gauge!(
        TOKENS,
        "Tokens in the store per status, from the store's counts (refreshed periodically)"
    );
    describe_gauge!(
        TOKEN_COUNTS_COMPLETE,
        "1 once the token counts include records written before they existed, else 0"
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build");
    describe_gauge!(
        D1_CIRCUIT_OPEN,
        "1 while the D1 circuit breaker is open or probing (half-open), 0 once closed"
    );
    describe_counter!(
        LOG_DROPPED,
        "Log lines dropped because the log writer thread was too far behind (stdout stalled)"
    );
}

/// The log writer's own count (src/telemetry.rs), copied in at each scrape: the writer cannot
/// record metrics itself.
pub fn set_log_dropped_lines(n: u64) {
    counter!(LOG_DROPPED).absolute(n);
}

// --- HTTP ------------------------------------------------------------------------------------

/// The `method` label: standard methods as they are, anything else `OTHER` (a client can send
/// any token as a method; it must not become a label value).
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// One answered HTTP request. `route` is a route template or `unmatched`, never a raw path.
pub fn record_http(method: &'static str, route: &str, status: u16, elapsed: Duration) {
    let status = status_label(status);
    // Before the recorder is installed `counter!` hands out no-op handles: never cache those.
    if HANDLE.get().is_none() {
        let route = route.to_owned();
        counter!(HTTP_REQUESTS, "method" => method, "route" => route.clone(), "status" => status)
            .increment(1);
        histogram!(HTTP_DURATION, "method" => method, "route" => route, "status" => status)
            .record(elapsed.as_secs_f64());
        return;
    }
    let (requests, duration) = http_handles(method, route, status);
    requests.increment(1);
    duration.record(elapsed.as_secs_f64());
}

/// Label sets of the request metrics, with their handles. Routes are templates from the router
/// (a closed set), interned once, so a request costs a lookup with no allocation instead of two
/// label allocations and two registry lookups (about 5% of a GET's CPU in a profile).
type HttpKey = (&'static str, &'static str, &'static str);
static HTTP_HANDLES: std::sync::LazyLock<
    dashmap::DashMap<HttpKey, (metrics::Counter, metrics::Histogram)>,
> = std::sync::LazyLock::new(dashmap::DashMap::new);
static ROUTES: std::sync::LazyLock<dashmap::DashMap<String, &'static str>> =
    std::sync::LazyLock::new(dashmap::DashMap::new);

/// `route` as a `&'static str`: leaked once per distinct route template; callers pass router
/// templates or `unmatched`, never raw paths, so the set is bounded by the routes in src/http.
fn intern_route(route: &str) -> &'static str {
    match ROUTES.get(route) {
        Some(r) => *r,
        None => *ROUTES
            .entry(route.to_owned())
            .or_insert_with(|| Box::leak(route.to_owned().into_boxed_str())),
    }
}

fn http_handles(
    method: &'static str,
    route: &str,
    status: &'static str,
) -> (metrics::Counter, metrics::Histogram) {
    let route = intern_route(route);
    let key = (method, route, status);
    if let Some(h) = HTTP_HANDLES.get(&key) {
        return h.clone();
    }
    HTTP_HANDLES
        .entry(key)
        .or_insert_with(|| {
            (
                counter!(HTTP_REQUESTS, "method" => method, "route" => route, "status" => status),
                histogram!(HTTP_DURATION, "method" => method, "route" => route, "status" => status),
            )
        })
        .clone()
}

/// The `status` labels: the codes the API answers with, then the classes of any other code.
const STATUS_LABELS: [&str; 22] = [
    "200", "201", "204", "400", "401", "403", "404", "405", "409", "413", "415", "422", "429",
    "500", "502", "503", "504", "1xx", "2xx", "3xx", "4xx", "5xx",
];

/// The index of `status`'s label in [`STATUS_LABELS`]; a small closed set, so a label is a
/// `&'static str` and costs no allocation per request.
fn status_slot(status: u16) -> usize {
    match status {
        200 => 0,
        201 => 1,
        204 => 2,
        400 => 3,
        401 => 4,
        403 => 5,
        404 => 6,
        405 => 7,
        409 => 8,
        413 => 9,
        415 => 10,
        422 => 11,
        429 => 12,
        500 => 13,
        502 => 14,
        503 => 15,
        504 => 16,
        s if s < 200 => 17,
        s if s < 300 => 18,
        s if s < 400 => 19,
        s if s < 500 => 20,
        _ => 21,
    }
}

fn status_label(status: u16) -> &'static str {
    STATUS_LABELS[status_slot(status)]
}

/// The `method` labels of [`method_label`], in the order of [`method_slot`].
const METHOD_LABELS: usize = 8;

fn method_slot(method: &'static str) -> usize {
    match method {
        "GET" => 0,
        "POST" => 1,
        "PUT" => 2,
        "DELETE" => 3,
        "PATCH" => 4,
        "HEAD" => 5,
        "OPTIONS" => 6,
        _ => 7,
    }
}

/// The request metrics of one route template, held by the route's middleware
/// (src/http/stack.rs): the handles of each (method, status) pair, resolved the first time the
/// pair occurs and kept, so a request costs an atomic load per handle instead of two hashed
/// lookups in shared maps (route, then label set) and two handle clones (docs/performance.md,
/// "GET and dedup, round 5"). Lazily, not at start-up, so `/metrics` shows a series only once
/// it has a sample, as before.
pub struct HttpRouteMetrics {
    route: &'static str,
    handles: Box<[OnceLock<(metrics::Counter, metrics::Histogram)>]>,
}

impl HttpRouteMetrics {
    /// `route` is a route template or `unmatched`, never a raw path (interned once: the set is
    /// bounded by the router's routes).
    pub fn new(route: &str) -> Self {
        HttpRouteMetrics {
            route: intern_route(route),
            handles: (0..METHOD_LABELS * STATUS_LABELS.len())
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// One answered request of this route: the same series as [`record_http`].
    pub fn record(&self, method: &'static str, status: u16, elapsed: Duration) {
        if HANDLE.get().is_none() {
            return record_http(method, self.route, status, elapsed);
        }
        let slot = status_slot(status);
        let (requests, duration) = self.handles[method_slot(method) * STATUS_LABELS.len() + slot]
            .get_or_init(|| {
                let (route, status) = (self.route, STATUS_LABELS[slot]);
                (
                    counter!(HTTP_REQUESTS, "method" => method, "route" => route, "status" => status),
                    histogram!(HTTP_DURATION, "method" => method, "route" => route, "status" => status),
                )
            });
        requests.increment(1);
        duration.record(elapsed.as_secs_f64());
    }
}

// --- D1 --------------------------------------------------------------------------------------

/// A D1 call that was sent (with its retries) and finished, one way or another.
pub fn record_d1_call(operation: &'static str, outcome: &'static str, elapsed: Duration) {
    counter!(D1_CALLS, "operation" => operation, "outcome" => outcome).increment(1);
    histogram!(D1_DURATION, "operation" => operation, "outcome" => outcome)
        .record(elapsed.as_secs_f64());
}

/// A D1 call refused before anything was sent (`concurrency_limit`, `circuit_open`): counted,
/// not timed (its latency would say nothing about D1).
pub fn record_d1_refused(operation: &'static str, reason: &'static str) {
    counter!(D1_CALLS, "operation" => operation, "outcome" => reason).increment(1);
}

/// The D1 circuit breaker opened (`true`) or closed again (`false`).
pub fn d1_circuit_open(open: bool) {
    gauge!(D1_CIRCUIT_OPEN).set(if open { 1.0 } else { 0.0 });
}

// --- store -----------------------------------------------------------------------------------

/// The outcome of one store operation, the `outcome` label. `Conflict` and `NotFound` are
/// normal answers (optimistic concurrency, idempotent removes) and only appear as outcomes;
/// `Unavailable` and `Corrupt` also count as errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    Ok,
    Conflict,
    NotFound,
    Unavailable,
    Corrupt,
}

impl StoreOutcome {
    const ALL: usize = 5;

    pub fn label(self) -> &'static str {
        match self {
            StoreOutcome::Ok => "ok",
            StoreOutcome::Conflict => "conflict",
            StoreOutcome::NotFound => "not_found",
            StoreOutcome::Unavailable => "unavailable",
            StoreOutcome::Corrupt => "corrupt",
        }
    }
}

/// The metric handles of one store operation (`operation` label), one per outcome, each
/// resolved the first time that outcome occurs and kept: an operation then costs one atomic load
/// and the histogram's own record, instead of a hashed lookup of the `(operation, outcome)`
/// pair in a shared map and a handle clone per call (the store-metrics wrapper showed in the GET
/// and dedup profiles, which make one or two store calls each: docs/performance.md, "GET and
/// dedup, round 5"). Handles are registered lazily, not at start-up, so `/metrics` shows a
/// series only once it has a sample, as before. Meant to live in a `static` per operation
/// (src/storage/instrumented.rs): there is one recorder per process.
pub struct StoreOpMetrics {
    operation: &'static str,
    durations: [OnceLock<metrics::Histogram>; StoreOutcome::ALL],
}

impl StoreOpMetrics {
    pub const fn new(operation: &'static str) -> Self {
        StoreOpMetrics {
            operation,
            durations: [const { OnceLock::new() }; StoreOutcome::ALL],
        }
    }

    /// One operation that ended with `outcome` after `elapsed`.
    pub fn record(&self, outcome: StoreOutcome, elapsed: Duration) {
        let operation = self.operation;
        let label = outcome.label();
        let secs = elapsed.as_secs_f64();
        if HANDLE.get().is_some() {
            self.durations[outcome as usize]
                .get_or_init(
                    || histogram!(STORE_DURATION, "operation" => operation, "outcome" => label),
                )
                .record(secs);
        } else {
            // Before the recorder is installed `histogram!` hands out no-op handles: never
            // keep those.
            histogram!(STORE_DURATION, "operation" => operation, "outcome" => label).record(secs);
        }
        if matches!(outcome, StoreOutcome::Unavailable | StoreOutcome::Corrupt) {
            // Failures are rare: resolved per call.
            counter!(STORE_ERRORS, "operation" => operation, "kind" => label).increment(1);
        }
    }
}

/// One confirmed write (`storage.redis_durability`): `mode` is `wait` or `waitaof`, `outcome`
/// `confirmed`, `timeout` (fewer acknowledgements than asked), `refused` (the server refused
/// the command) or `error` (the connection failed). Both are fixed strings: no ids.
pub fn record_durability_wait(mode: &'static str, outcome: &'static str, elapsed: Duration) {
    counter!(DURABILITY_WAITS, "mode" => mode, "outcome" => outcome).increment(1);
    histogram!(DURABILITY_WAIT_DURATION, "mode" => mode, "outcome" => outcome)
        .record(elapsed.as_secs_f64());
}

// --- tokens ----------------------------------------------------------------------------------

/// A token write that succeeded: `None` before means created, `None` after means removed.
/// A write that keeps the status is not a transition and records nothing. (The
/// `tokengate_tokens` gauge comes from the store's counts instead: [`set_token_counts`].)
///
/// The labels are the statuses' bounded labels (`TokenStatus::label`, `OTHER` for whatever else
/// D1 sends): metrics know no domain types.
pub fn token_transition(before: Option<&'static str>, after: Option<&'static str>) {
    let from = before.unwrap_or("NONE");
    let to = after.unwrap_or("NONE");
    if from == to {
        return;
    }
    counter!(TOKEN_TRANSITIONS, "from" => from, "to" => to).increment(1);
}

/// Sets `tokengate_tokens` (every label, zeros included, so a status that emptied reads 0 rather
/// than its last value) and `tokengate_token_counts_complete` from the store's counts.
pub fn set_token_counts<'a>(
    by_status: impl IntoIterator<Item = (&'a &'static str, &'a u64)>,
    complete: bool,
) {
    for (label, n) in by_status {
        gauge!(TOKENS, "status" => *label).set(*n as f64);
    }
    gauge!(TOKEN_COUNTS_COMPLETE).set(if complete { 1.0 } else { 0.0 });
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use super::*;

    #[test]
    fn unknown_statuses_and_methods_collapse() {
        let m = http::Method::from_bytes(b"X-TOK-123").unwrap();
        assert_eq!(method_label(&m), "OTHER");
        assert_eq!(status_label(299), "2xx");
        assert_eq!(status_label(404), "404");
    }

    #[test]
    fn route_metrics_record_the_same_series_as_record_http() {
        let h = handle();
        let route = HttpRouteMetrics::new("/test/route-metrics/{id}");
        let other = HttpRouteMetrics::new("/test/route-metrics/{id}");
        route.record("GET", 200, Duration::from_millis(3));
        route.record("GET", 200, Duration::from_millis(3));
        // A second instance of the same route shares the series.
        other.record("GET", 200, Duration::from_millis(3));
        route.record("DELETE", 599, Duration::from_millis(3));
        record_http(
            "GET",
            "/test/route-metrics/{id}",
            404,
            Duration::from_millis(1),
        );
        let text = h.render();
        for line in [
            "tokengate_http_requests_total{method=\"GET\",route=\"/test/route-metrics/{id}\",status=\"200\"} 3",
            "tokengate_http_requests_total{method=\"DELETE\",route=\"/test/route-metrics/{id}\",status=\"5xx\"} 1",
            "tokengate_http_requests_total{method=\"GET\",route=\"/test/route-metrics/{id}\",status=\"404\"} 1",
            "tokengate_http_request_duration_seconds_count{method=\"GET\",route=\"/test/route-metrics/{id}\",status=\"200\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }

    #[test]
    fn store_op_metrics_record_by_outcome() {
        static OP: StoreOpMetrics = StoreOpMetrics::new("test_store_op_metrics");
        let h = handle();
        OP.record(StoreOutcome::Ok, Duration::from_millis(1));
        OP.record(StoreOutcome::Ok, Duration::from_millis(1));
        OP.record(StoreOutcome::Unavailable, Duration::from_millis(1));
        let text = h.render();
        for line in [
            "tokengate_store_operation_duration_seconds_count{operation=\"test_store_op_metrics\",outcome=\"ok\"} 2",
            "tokengate_store_operation_duration_seconds_count{operation=\"test_store_op_metrics\",outcome=\"unavailable\"} 1",
            "tokengate_store_errors_total{operation=\"test_store_op_metrics\",kind=\"unavailable\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
        // No series for an outcome that never happened.
        assert!(
            !text.contains("operation=\"test_store_op_metrics\",outcome=\"conflict\""),
            "{text}"
        );
    }

    #[test]
    fn status_labels_match_their_slots() {
        for (status, label) in [
            (200, "200"),
            (422, "422"),
            (504, "504"),
            (102, "1xx"),
            (302, "3xx"),
            (418, "4xx"),
            (599, "5xx"),
        ] {
            assert_eq!(status_label(status), label);
        }
    }

    #[test]
    fn recorder_renders_build_info_and_transitions() {
        let h = handle();
        token_transition(None, Some("PENDING"));
        token_transition(Some("PENDING"), Some("ACTIVE"));
        // Same status: not a transition.
        token_transition(Some("ACTIVE"), Some("ACTIVE"));
        let text = h.render();
        assert!(
            text.contains(&format!(
                "tokengate_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(
            text.contains("tokengate_token_transitions_total{from=\"PENDING\",to=\"ACTIVE\"}"),
            "{text}"
        );
        assert!(!text.contains("from=\"ACTIVE\",to=\"ACTIVE\""), "{text}");
    }
}
