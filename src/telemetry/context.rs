//! The request a log line belongs to: its id and route template, held in a tokio task-local
//! while the request's future is polled, and written by the log formats (`json.rs`, `text.rs`)
//! exactly where a `request` span with the fields `request_id` and `route` would have been.
//!
//! It replaces a `tracing` span per request, whose cost was paid whether or not anything was
//! logged inside the request (about 6% of the gateway's CPU per GET: a registry slot, the
//! span's fields formatted and stored, the subscriber stack and its filter called on every
//! poll's enter and exit, the close; docs/performance.md, "GET path, round 4"). A task-local
//! costs two swaps of a thread-local per poll; the fields are read only by a line that is
//! written.
//!
//! The lines are the same as with the span: JSON lines carry
//! `"span":{"request_id":...,"route":...,"name":"request"}` when no other span is current
//! (the JSON format shows only the innermost span), text lines `request{request_id=".."
//! route=".."}:` before any other span. Spans opened inside a request still print; they are
//! no longer children of a `request` span for a filter (`RUST_LOG` span directives).

use std::future::Future;
use std::sync::Arc;

use http::HeaderValue;
use tokio::task::futures::TaskLocalFuture;

tokio::task_local! {
    static REQUEST: Option<RequestContext>;
}

/// What every line logged while handling one request carries.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The request id as it may be logged (src/http/telemetry.rs decides).
    pub request_id: HeaderValue,
    /// The route template, never the raw path (paths hold token ids).
    pub route: Arc<str>,
}

/// The name of the span the context stands for in log lines.
pub const SPAN_NAME: &str = "request";

/// Runs `fut` with `ctx` as the request context of every line logged while it is polled (and
/// while it is dropped). `None`: lines carry no request context (the `request` span would have
/// been filtered out by `log.level`).
pub fn scope<F: Future>(
    ctx: Option<RequestContext>,
    fut: F,
) -> TaskLocalFuture<Option<RequestContext>, F> {
    REQUEST.scope(ctx, fut)
}

/// `f(request_id, route)` of the request being handled on this thread, if any.
pub fn with<R>(f: impl FnOnce(&str, &str) -> R) -> Option<R> {
    REQUEST
        .try_with(|ctx| {
            ctx.as_ref().map(|c| {
                // Ids are checked to be visible ASCII before they get here; anything else is
                // written as `-`, as when the id is not loggable.
                f(c.request_id.to_str().unwrap_or("-"), &c.route)
            })
        })
        .ok()
        .flatten()
}
