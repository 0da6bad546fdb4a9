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

fn http_handles(
    method: &'static str,
    route: &str,
    status: &'static str,
) -> (metrics::Counter, metrics::Histogram) {
    let route: &'static str = match ROUTES.get(route) {
        Some(r) => *r,
        // Leaked once per distinct route template; callers pass router templates or
        // `unmatched`, never raw paths, so the set is bounded by the routes in src/http.
        None => *ROUTES
            .entry(route.to_owned())
            .or_insert_with(|| Box::leak(route.to_owned().into_boxed_str())),
    };
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

/// Status codes are a small closed set; `&'static str` avoids an allocation per request.
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        415 => "415",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 200 => "1xx",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
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

/// One store operation. `Conflict` and `NotFound` are normal answers (optimistic concurrency,
/// idempotent removes) and only appear as outcomes; `Unavailable` and `Corrupt` also count as
/// errors.
pub fn record_store_op(operation: &'static str, outcome: &'static str, elapsed: Duration) {
    store_duration(operation, outcome).record(elapsed.as_secs_f64());
    if matches!(outcome, "unavailable" | "corrupt") {
        counter!(STORE_ERRORS, "operation" => operation, "kind" => outcome).increment(1);
    }
}

/// Histograms of the store operations by `(operation, outcome)`, both `&'static str` (a closed
/// set): resolved once, so an operation costs a map lookup instead of a label-set allocation and
/// a registry lookup (`register_histogram` showed in the GET and dedup profiles, which make one
/// or two store calls each: docs/performance.md, "GET path, round 3").
static STORE_HANDLES: std::sync::LazyLock<
    dashmap::DashMap<(&'static str, &'static str), metrics::Histogram>,
> = std::sync::LazyLock::new(dashmap::DashMap::new);

fn store_duration(operation: &'static str, outcome: &'static str) -> metrics::Histogram {
    // Before the recorder is installed `histogram!` hands out no-op handles: never cache those.
    if HANDLE.get().is_none() {
        return histogram!(STORE_DURATION, "operation" => operation, "outcome" => outcome);
    }
    if let Some(h) = STORE_HANDLES.get(&(operation, outcome)) {
        return h.clone();
    }
    STORE_HANDLES
        .entry((operation, outcome))
        .or_insert_with(
            || histogram!(STORE_DURATION, "operation" => operation, "outcome" => outcome),
        )
        .clone()
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
