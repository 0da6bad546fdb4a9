//! The one middleware of the API, around every route: request id, load shedding, the request
//! timeout, the request context of log lines, metrics and the access log.
//!
//! It replaces seven tower layers (tower-http's `SetRequestId` and `PropagateRequestId`, an
//! axum `from_fn` middleware, `HandleError`, `LoadShed`, `GlobalConcurrencyLimit`, `Timeout`)
//! with the same answers. In a GET profile the seven nested futures were moved around on
//! every poll (`memmove` ~3%), `SetRequestId` alone was 1.7%, and the `from_fn` middleware
//! boxed its future and cloned the inner service per call; a semaphore stood where a counter
//! does (docs/performance.md, "GET path, round 4"). What each step does, in order:
//!
//! 1. **Request id**: the client's `x-request-id` is kept (traces join up across services),
//!    else a random UUID is generated and put on the request (the audit trail reads it there).
//!    Either is echoed on the response, so a client can quote it in a support ticket.
//! 2. **Load shedding at `server.max_concurrency`**: one counter of requests in flight shared
//!    by all routes (not per route), bounding memory and the load we put on Redis and D1. Over
//!    the limit the answer is `503 overloaded` at once instead of a queue (a queue only adds
//!    latency to requests that will time out anyway).
//! 3. **The whole-request budget** (`server.request_timeout_ms`): when it elapses the handler
//!    is dropped, its slot freed, and the answer is `503 request_timeout`.
//! 4. **Request context** (src/telemetry/context.rs, a task-local around the handler rather
//!    than a `tracing` span): every log line written while the handler runs carries the
//!    request id and the route template.
//! 5. **Metrics and access log** (src/http/telemetry.rs), outside shedding and timeouts so their
//!    503s are counted and logged too. Never bodies or headers (card data, credentials).
//!
//! axum's `Router::layer` puts the middleware around each route (and the fallback) after the
//! router matched it, so the route template (`MatchedPath`) is known here.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use super::problem::{ApiError, codes};
use super::telemetry::{self, AccessLog};
use crate::observability;
use crate::telemetry::context::{self, RequestContext};

/// Middleware settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub request_timeout: std::time::Duration,
    pub max_concurrency: usize,
    pub body_limit: usize,
    /// `log.access`, `log.access_sample` (src/http/telemetry.rs).
    pub access_log: super::telemetry::AccessLog,
}

/// The request id header: taken from the client when it sends one, else generated.
static X_REQUEST_ID: HeaderName = HeaderName::from_static(telemetry::REQUEST_ID);

/// The API routes with the middleware around each of them.
pub fn apply(router: Router, s: &HttpSettings) -> Router {
    router.layer(Gate::new(s))
}

/// The middleware's [`Layer`]: every route's instance shares one in-flight counter.
#[derive(Clone)]
pub struct Gate {
    shared: Arc<Shared>,
}

struct Shared {
    in_flight: AtomicUsize,
    max_concurrency: usize,
    request_timeout: Duration,
    access: AccessLog,
}

impl Gate {
    pub fn new(s: &HttpSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                in_flight: AtomicUsize::new(0),
                max_concurrency: s.max_concurrency,
                request_timeout: s.request_timeout,
                access: s.access_log,
            }),
        }
    }
}

impl<S> Layer<S> for Gate {
    type Service = GateService<S>;

    fn layer(&self, inner: S) -> GateService<S> {
        GateService {
            inner,
            shared: Arc::clone(&self.shared),
            route: Arc::default(),
        }
    }
}

/// One route's service with the middleware around it.
#[derive(Clone)]
pub struct GateService<S> {
    inner: S,
    shared: Arc<Shared>,
    /// The route template this instance serves, kept from its first request: axum layers each
    /// route (and the fallback) separately, so every request an instance sees has the same
    /// `MatchedPath`, and the log context and metrics share one [`Route`] per route.
    route: Arc<OnceLock<Arc<Route>>>,
}

/// A route template and its request metrics' handles.
struct Route {
    name: Arc<str>,
    metrics: observability::HttpRouteMetrics,
}

impl Route {
    fn new(name: &str) -> Arc<Route> {
        Arc::new(Route {
            name: Arc::from(name),
            metrics: observability::HttpRouteMetrics::new(name),
        })
    }
}

impl<S> GateService<S> {
    /// The route template of `req`, or `unmatched` for the 404 fallback.
    fn route_of(&self, req: &Request) -> Arc<Route> {
        static UNMATCHED: OnceLock<Arc<Route>> = OnceLock::new();
        match req.extensions().get::<MatchedPath>() {
            Some(m) => {
                let cached = self.route.get_or_init(|| Route::new(m.as_str()));
                if *cached.name == *m.as_str() {
                    Arc::clone(cached)
                } else {
                    // Not the route this instance first saw (never with our router): a copy.
                    Route::new(m.as_str())
                }
            }
            None => Arc::clone(UNMATCHED.get_or_init(|| Route::new(telemetry::UNMATCHED))),
        }
    }
}

/// A request's slot under `server.max_concurrency`, given back when dropped (the handler
/// finished, timed out, or the connection went away and the future was dropped).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
        // A plain counter is exactly "load shed + concurrency limit": the slot is taken or the
        // request is refused at once, nothing ever waits for one.
        let before = shared.in_flight.fetch_add(1, Ordering::Relaxed);
        if before >= shared.max_concurrency {
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Self(Arc::clone(shared)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S> Service<Request> for GateService<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let started = Instant::now();
        // A client-supplied id is kept as sent (the first one if it sent several), as
        // tower-http's SetRequestId did.
        let request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(v) => v.clone(),
            None => {
                let v = fast_request_id();
                req.headers_mut().insert(X_REQUEST_ID.clone(), v.clone());
                v
            }
        };
        let method = observability::method_label(req.method());
        let route = self.route_of(&req);
        let state = match InFlight::take(&self.shared) {
            Some(slot) => State::Running {
                fut: context::scope(
                    telemetry::request_context(&request_id, &route.name),
                    tokio::time::timeout(self.shared.request_timeout, self.inner.call(req)),
                ),
                _slot: slot,
            },
            None => State::Shed,
        };
        GateFuture {
            state,
            started,
            method,
            route,
            request_id: Some(request_id),
            access: self.shared.access,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`GateService`].
    pub struct GateFuture<F> {
        #[pin]
        state: State<F>,
        started: Instant,
        method: &'static str,
        route: Arc<Route>,
        request_id: Option<HeaderValue>,
        access: AccessLog,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running {
            #[pin]
            fut: TaskLocalFuture<Option<RequestContext>, tokio::time::Timeout<F>>,
            _slot: InFlight,
        },
        Shed,
        Done,
    }
}

impl<F> Future for GateFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    #[expect(
        clippy::panic,
        reason = "polling a completed future is the caller's bug, as for every std future"
    )]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let mut resp = match this.state.as_mut().project() {
            StateProj::Running { fut, .. } => match ready!(fut.poll(cx)) {
                Ok(Ok(resp)) => resp,
                Ok(Err(never)) => match never {},
                Err(_elapsed) => timed_out(),
            },
            StateProj::Shed => overloaded(),
            StateProj::Done => panic!("GateFuture polled after completion"),
        };
        // The handler's future and the slot go now, not when the caller drops this future.
        this.state.set(State::Done);
        let status = resp.status().as_u16();
        if let Some(id) = this.request_id.take() {
            telemetry::record(
                *this.access,
                this.method,
                &this.route.name,
                &this.route.metrics,
                &id,
                *this.started,
                status,
            );
            // Echoed unless the handler set one itself (as tower-http's PropagateRequestId).
            if !resp.headers().contains_key(&X_REQUEST_ID) {
                resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
            }
        }
        Poll::Ready(Ok(resp))
    }
}

/// A random (v4) UUID as a request id, from the user-space CSPRNG. tower-http's
/// `MakeRequestUuid` drew each one from the OS (`getrandom`), a system call per request that
/// showed in the GET profile (docs/performance.md). Request ids need uniqueness, not secrecy
/// from the OS pool.
///
/// The text is written into an array that becomes the header value's reference-counted owner
/// (`Bytes::from_owner`): one allocation, and the clones for the request, the log context and
/// the response are counter increments (`HeaderValue::from_str` copied the text into a
/// `Bytes` whose first clone allocated again to become shared).
fn fast_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf);
    // A hyphenated UUID is always a valid header value.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Every slot under `server.max_concurrency` is taken.
fn overloaded() -> Response {
    ApiError::of(
        &codes::OVERLOADED,
        "the gateway is at its concurrency limit; retry shortly",
    )
    .with_retry_after(Some(Duration::from_secs(1)))
    .into_response()
}

/// `server.request_timeout_ms` elapsed before the handler answered.
fn timed_out() -> Response {
    ApiError::of(
        &codes::REQUEST_TIMEOUT,
        "the request did not complete within the gateway's time budget",
    )
    .with_retry_after(Some(Duration::from_secs(1)))
    .into_response()
}
