//! The D1 client: a few pooled HTTPS connections (mTLS, HTTP/2 multiplexed, or HTTP/1.1),
//! OAuth2 JWT-bearer tokens cached single-flight and refreshed in the background, JWE card data,
//! and the resilience policy, behind [`NetworkTokenProvider`].
//!
//! # Connections
//!
//! D1 at real latency (~150 ms a call) means hundreds of calls in flight: 3,000 calls/s hold
//! about 450. One HTTP/2 connection carries at most the server's `MAX_CONCURRENT_STREAMS`
//! (hyper's default is 200, many edges use 100-128); requests beyond it wait inside the h2
//! connection for a stream, behind every slow call ahead of them (head-of-line blocking), and
//! one connection's TLS and framing run on one task. So the client keeps `connections`
//! independent lanes, each its own pooled client (one multiplexed h2 connection, or a pool of
//! HTTP/1.1 connections when D1 does not offer h2), and sends each request on the lane with
//! the fewest calls in flight.
//!
//! # One call, outermost first
//!
//! 1. **Concurrency limit** (`Semaphore::try_acquire`): when `max_concurrency` calls are in
//!    flight the call fails at once with `Unavailable`. Queueing behind a slow D1 would only
//!    turn its outage into ours.
//! 2. **Circuit breaker** ([`Breaker`]): open => `Unavailable { retry_after }` at once.
//! 3. **Time budget** (`call_timeout`): covers the token request, every attempt, every backoff
//!    sleep and reading the body. Exceeded => `Timeout` (the outcome upstream is unknown).
//! 4. **Authentication**: a cached access token; a 401 invalidates it and the call is replayed
//!    once with a fresh one. A token due for refresh (60 s before it expires) is still valid:
//!    the call uses it and one background task fetches the next, so the token request is on a
//!    call's path only when there is no valid token at all (the first call, or after a 401).
//! 5. **Retries**: on 429, 503, connection failures (the request never left), and 500 for GETs;
//!    after `Retry-After` seconds when given, else jittered exponential backoff. A retried
//!    request is byte-identical (same body, same `requestId`, same JWE), so D1's idempotency on
//!    `requestId` guarantees a retry never creates a second token. No retry when the delay
//!    would not fit in the remaining budget: the caller gets `Unavailable` with the delay.
//!
//! # What `Unavailable` promises
//!
//! The domain treats `Unavailable` as "D1 certainly did not act" (it then drops its
//! reservation). So it is only returned when that is true: D1 answered 429/503, the breaker or
//! the limiter refused, or no connection could be made. A connection that broke after the
//! request was sent is `BadResponse` (outcome unknown), like a timeout.
//!
//! Logs (`tracing`, debug level) carry operation, status, latency, attempt and correlation id;
//! never card numbers, token numbers, cryptograms, access tokens or keys.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use p256::PublicKey;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::resilience::{Breaker, backoff, parse_retry_after};
use crate::domain::error::ProviderError;
use crate::domain::provider::{
    Amount, Cryptogram, LifecycleAction, NetworkTokenProvider, ProviderToken, TransactionType,
};
use crate::domain::token::{TokenStatus, Usage};
use tokengate_cards::{Expiry, Pan};
use tokengate_d1_protocol::devkeys::DevMaterial;
use tokengate_d1_protocol::jose::{self, Es256Signer, JoseError};
use tokengate_d1_protocol::model::{
    AmountDto, CardPlaintext, CreateTokenRequest, CryptogramPlaintext, ErrorBody, JWT_BEARER_GRANT,
    LifecycleRequest, OAuthTokenRequest, OAuthTokenResponse, OnboardMerchantRequest,
    OnboardMerchantResponse, TokenObject, TransactionRequest, TransactionResponse,
};
use tokengate_d1_protocol::paths::D1Paths;
use tokengate_d1_protocol::tls::{self, TlsError};

/// Lifetime of our client assertions. D1 accepts up to 15 minutes; each assertion is used once,
/// right away, so a short one limits the damage if one leaks.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// Refresh the access token this long before it expires (protocol doc: 60 s).
const TOKEN_REFRESH_LEAD: Duration = Duration::from_secs(60);
/// Ceiling on `expires_in`, so a bogus answer cannot pin a token in the cache for years.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Largest response body read; D1 answers are small JSON objects.
const MAX_BODY: usize = 1 << 20;
/// Idle pooled connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Upper bound of `connections` (lanes), so a typo cannot open thousands of TLS sessions.
const MAX_CONNECTIONS: usize = 64;

/// `application/json`, a static header value (no string parsed per request).
fn json() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

/// The `outcome` label of a D1 call.
fn provider_outcome(result: Result<(), &ProviderError>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(ProviderError::Unavailable { .. }) => "unavailable",
        Err(ProviderError::Timeout) => "timeout",
        Err(ProviderError::Rejected { .. }) => "rejected",
        Err(ProviderError::NotFound) => "not_found",
        Err(ProviderError::BadResponse(_)) => "bad_response",
        Err(ProviderError::NotConfigured) => "not_configured",
    }
}

/// D1's token object as the domain sees it.
impl From<TokenObject> for ProviderToken {
    fn from(t: TokenObject) -> Self {
        ProviderToken {
            d1_token_id: t.token_id,
            status: TokenStatus::parse(&t.status),
            last4: t.token_last_digits,
            // A malformed expiry is metadata we cannot use, not a reason to fail the call.
            expiry: t.token_expiry_date.as_deref().and_then(Expiry::from_mmyy),
            par: t.par,
        }
    }
}

/// Everything the client needs. Secrets are `SecretString` (redacted in `Debug`).
#[derive(Debug, Clone)]
pub struct D1Config {
    /// API base, e.g. `https://api.d1-stg.thalescloud.io/authz/v1`. Also the assertion `aud`.
    pub base_url: String,
    pub merchant_gateway_id: String,
    /// PKCS#8 PEM P-256 key signing our client assertions.
    pub es256_key_pem: SecretString,
    /// Key id D1 registered for that key (assertion header `kid`).
    pub es256_kid: String,
    /// D1's P-256 public key (SPKI PEM) for card data JWE.
    pub d1_jwe_public_pem: String,
    pub d1_jwe_kid: String,
    /// Our P-256 private key (PKCS#8 PEM) for JWE that D1 sends us (cryptograms).
    pub gateway_jwe_key_pem: SecretString,
    pub gateway_jwe_kid: String,
    /// Our mTLS client certificate chain (PEM) and key.
    pub client_cert_pem: String,
    pub client_key_pem: SecretString,
    /// CA bundle that D1's server certificate must chain to.
    pub ca_pem: String,
    pub paths: D1Paths,
    /// Budget of one call, all attempts included.
    pub call_timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Calls in flight before new ones are refused.
    pub max_concurrency: usize,
    /// Independent connection lanes to D1 (see the module docs).
    pub connections: usize,
    pub breaker_failure_threshold: u32,
    pub breaker_open_for: Duration,
}

impl D1Config {
    /// Sandbox configuration against the simulator at `base_url`, keyed with development
    /// material, with the defaults of `config/default.toml`.
    pub fn sandbox(base_url: &str, dev: &DevMaterial) -> D1Config {
        D1Config {
            base_url: base_url.to_owned(),
            merchant_gateway_id: dev.merchant_gateway_id.clone(),
            es256_key_pem: SecretString::from(dev.gateway_es256_key_pem.as_str()),
            es256_kid: dev.es256_kid.clone(),
            d1_jwe_public_pem: dev.d1_jwe_pub_pem.clone(),
            d1_jwe_kid: dev.d1_jwe_kid.clone(),
            gateway_jwe_key_pem: SecretString::from(dev.gateway_jwe_key_pem.as_str()),
            gateway_jwe_kid: dev.gateway_jwe_kid.clone(),
            client_cert_pem: dev.gateway_client_cert_pem.clone(),
            client_key_pem: SecretString::from(dev.gateway_client_key_pem.as_str()),
            ca_pem: dev.ca_cert_pem.clone(),
            paths: D1Paths::default(),
            call_timeout: Duration::from_secs(5),
            max_retries: 2,
            max_concurrency: 1024,
            connections: 4,
            breaker_failure_threshold: 20,
            breaker_open_for: Duration::from_secs(5),
        }
    }
}

/// Why a [`D1Client`] could not be built. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum D1Error {
    #[error("D1 client configuration: {0}")]
    Config(String),
    #[error("D1 client TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("D1 client keys: {0}")]
    Keys(#[from] JoseError),
}

/// A cached OAuth2 access token.
struct AccessToken {
    /// Distinguishes tokens, so a 401 only evicts the token that drew it.
    serial: u64,
    /// `Bearer <token>`, built and checked once when the token arrives, not formatted and
    /// validated again on every call. Marked sensitive (hpack never indexes it). Its bytes are
    /// shared by every request that carries it and freed, not wiped, when the token goes, as
    /// the copies hyper and h2 make of any header always were.
    bearer: HeaderValue,
    refresh_at: Instant,
    expires_at: Instant,
}

/// The last token request's outcome, for the callers that waited on it.
struct Flight {
    /// Token requests completed.
    done: u64,
    /// Why the last one failed, if it did.
    failed: Option<Failure>,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One connection lane: its own pool (one h2 connection, or HTTP/1.1 connections), and how
/// many calls it carries now.
struct Lane {
    http: HttpClient,
    in_flight: AtomicUsize,
}

/// Holds a lane's in-flight count up while a request (body included) is on it.
struct LaneGuard<'a>(&'a Lane);

impl Drop for LaneGuard<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Inner {
    lanes: Vec<Lane>,
    /// Base URL without a trailing slash.
    base: String,
    mgid: String,
    paths: D1Paths,
    signer: Es256Signer,
    d1_jwe_public: PublicKey,
    d1_jwe_kid: String,
    gateway_jwe_key: jose::JweDecryptionKey,
    gateway_jwe_kid: String,
    /// Current token; read without waiting on the hot path.
    token: RwLock<Option<Arc<AccessToken>>>,
    /// Held while fetching a token: the single flight.
    refresh: tokio::sync::Mutex<Flight>,
    /// Token requests completed so far (mirror of `Flight::done`, readable without the lock).
    flights_done: AtomicU64,
    token_serial: AtomicU64,
    /// Set while a background token refresh runs (at most one).
    refreshing: AtomicBool,
    limiter: Semaphore,
    breaker: Breaker,
    call_timeout: Duration,
    max_retries: u32,
}

/// Client for D1. Cheap to clone; clones share the connection pool, token cache, breaker and
/// concurrency limit.
#[derive(Clone)]
pub struct D1Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for D1Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("D1Client")
            .field("base", &self.inner.base)
            .field("mgid", &self.inner.mgid)
            .finish_non_exhaustive()
    }
}

/// One request as the retry loop replays it.
pub(crate) struct Spec {
    pub(crate) op: &'static str,
    pub(crate) method: Method,
    pub(crate) url: String,
    pub(crate) body: Option<Bytes>,
    /// Attach `Authorization: Bearer`.
    pub(crate) auth: bool,
    /// Also retry 500 (safe only when repeating the request cannot change anything).
    pub(crate) retry_500: bool,
    /// A 404 is D1 refusing the request (its `errorCode` kept, `Rejected`), not the resource
    /// being gone (`NotFound`): the issuer API answers an unknown card this way.
    pub(crate) not_found_is_rejection: bool,
}

/// An HTTP answer, whatever its status.
struct Reply {
    status: StatusCode,
    retry_after: Option<Duration>,
    body: Bytes,
}

/// A failed call, and whether it says something about D1's health (breaker input).
#[derive(Clone)]
struct Failure {
    error: ProviderError,
    upstream_fault: bool,
}

impl Failure {
    fn new(error: ProviderError, upstream_fault: bool) -> Failure {
        Failure {
            error,
            upstream_fault,
        }
    }
}

/// A fresh `x-correlation-id`: a random (v4) UUID in its 32-hex-digit form. The bytes come from
/// the thread's user-space CSPRNG (`rand::rng()`, reseeded from the OS): `Uuid::new_v4` asks the
/// kernel (`getrandom`) on every call, a system call per D1 call for an id that is not a secret.
fn correlation_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .simple()
        .to_string()
}

/// Characters kept as-is in a path segment or query value (RFC 3986 unreserved).
pub(crate) fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    push_component(&mut out, s);
    out
}

/// Appends `s` percent-encoded (everything but RFC 3986 unreserved characters) to `out`.
fn push_component(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
}

/// Maps a non-2xx answer to the domain error (status codes decided here, once).
fn failure_from_reply(op: &str, reply: &Reply, not_found_is_rejection: bool) -> Failure {
    let code = || {
        serde_json::from_slice::<ErrorBody>(&reply.body)
            .ok()
            .and_then(|b| b.error_code)
            // Machine codes only; anything else is replaced rather than echoed.
            .filter(|c| {
                (1..=64).contains(&c.len())
                    && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            })
    };
    let status = reply.status;
    match status.as_u16() {
        429 => Failure::new(
            ProviderError::Unavailable {
                retry_after: reply.retry_after,
            },
            false,
        ),
        503 => Failure::new(
            ProviderError::Unavailable {
                retry_after: reply.retry_after,
            },
            true,
        ),
        404 if !not_found_is_rejection => Failure::new(ProviderError::NotFound, false),
        400..=499 => Failure::new(
            ProviderError::Rejected {
                status: status.as_u16(),
                code: code().unwrap_or_else(|| format!("HTTP_{}", status.as_u16())),
            },
            false,
        ),
        500..=599 => Failure::new(
            ProviderError::BadResponse(match code() {
                Some(c) => format!("{op}: HTTP {} {c}", status.as_u16()),
                None => format!("{op}: HTTP {}", status.as_u16()),
            }),
            true,
        ),
        _ => Failure::new(
            ProviderError::BadResponse(format!("{op}: unexpected HTTP {}", status.as_u16())),
            true,
        ),
    }
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    op: &str,
    body: &[u8],
) -> Result<T, ProviderError> {
    // serde's message can quote the offending value, which may be sensitive: not passed on.
    serde_json::from_slice(body)
        .map_err(|_| ProviderError::BadResponse(format!("{op}: invalid response body")))
}

pub(crate) fn encode_json<T: Serialize>(op: &str, v: &T) -> Result<Bytes, ProviderError> {
    // Sized for the largest common body (createToken's, about 700 bytes with its JWE), so the
    // buffer is not grown and copied three times from serde_json's default.
    let mut buf = Vec::with_capacity(1024);
    serde_json::to_writer(&mut buf, v)
        .map(|()| Bytes::from(buf))
        .map_err(|_| ProviderError::BadResponse(format!("{op}: could not encode the request")))
}

impl D1Client {
    pub fn new(cfg: D1Config) -> Result<D1Client, D1Error> {
        let base = cfg.base_url.trim_end_matches('/').to_owned();
        let uri: http::Uri = base
            .parse()
            .map_err(|_| D1Error::Config("base_url is not a valid URL".into()))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(D1Error::Config(
                "base_url must be an https:// URL (D1 requires mutual TLS)".into(),
            ));
        }
        if uri.query().is_some() {
            return Err(D1Error::Config("base_url must not have a query".into()));
        }
        if cfg.merchant_gateway_id.is_empty() {
            return Err(D1Error::Config("merchant_gateway_id is empty".into()));
        }
        if cfg.max_concurrency == 0 {
            return Err(D1Error::Config("max_concurrency must be at least 1".into()));
        }
        if !(1..=MAX_CONNECTIONS).contains(&cfg.connections) {
            return Err(D1Error::Config(format!(
                "connections must be between 1 and {MAX_CONNECTIONS}"
            )));
        }
        if cfg.call_timeout.is_zero() {
            return Err(D1Error::Config("call_timeout must be positive".into()));
        }
        cfg.paths.validate().map_err(D1Error::Config)?;

        let signer =
            Es256Signer::from_pkcs8_pem(cfg.es256_key_pem.expose_secret(), &cfg.es256_kid)?;
        let d1_jwe_public = jose::public_key_from_pem(&cfg.d1_jwe_public_pem)?;
        let gateway_jwe_key =
            jose::JweDecryptionKey::from_pem(cfg.gateway_jwe_key_pem.expose_secret())?;

        let mut tls_config = tls::client_config(
            &cfg.ca_pem,
            Some((&cfg.client_cert_pem, cfg.client_key_pem.expose_secret())),
        )?;
        // hyper-rustls sets ALPN itself from the enabled HTTP versions and refuses a preset.
        tls_config.alpn_protocols.clear();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        // A connect that cannot finish within the whole budget is pointless.
        http.set_connect_timeout(Some(cfg.call_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_only()
            .enable_all_versions()
            .wrap_connector(http);
        let lanes = (0..cfg.connections)
            .map(|_| Lane {
                http: Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(POOL_IDLE)
                    .build(https.clone()),
                in_flight: AtomicUsize::new(0),
            })
            .collect();

        Ok(D1Client {
            inner: Arc::new(Inner {
                lanes,
                base,
                mgid: cfg.merchant_gateway_id,
                paths: cfg.paths,
                signer,
                d1_jwe_public,
                d1_jwe_kid: cfg.d1_jwe_kid,
                gateway_jwe_key,
                gateway_jwe_kid: cfg.gateway_jwe_kid,
                token: RwLock::new(None),
                refresh: tokio::sync::Mutex::new(Flight {
                    done: 0,
                    failed: None,
                }),
                flights_done: AtomicU64::new(0),
                token_serial: AtomicU64::new(0),
                refreshing: AtomicBool::new(false),
                limiter: Semaphore::new(cfg.max_concurrency),
                breaker: Breaker::new(cfg.breaker_failure_threshold, cfg.breaker_open_for),
                call_timeout: cfg.call_timeout,
                max_retries: cfg.max_retries,
            }),
        })
    }

    /// The lane with the fewest calls in flight (the first of equals, so a quiet client keeps
    /// to one connection); counted until the guard drops.
    fn lane(&self) -> LaneGuard<'_> {
        let lanes = &self.inner.lanes;
        let mut best = &lanes[0];
        let mut least = usize::MAX;
        for lane in lanes {
            let n = lane.in_flight.load(Ordering::Relaxed);
            if n < least {
                least = n;
                best = lane;
            }
        }
        best.in_flight.fetch_add(1, Ordering::Relaxed);
        LaneGuard(best)
    }

    /// Whether the circuit breaker currently refuses calls.
    pub fn breaker_open(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// Fills a path template; ids are percent-encoded so no value can add path segments.
    ///
    /// One pass into one buffer sized up front (the base, the template and the ids), rather
    /// than a `replace` (a search and a new string) per placeholder and a `format!` on every call.
    fn url(&self, template: &str, merchant: Option<&str>, token: Option<&str>) -> String {
        let inner = &self.inner;
        let ids = inner.mgid.len() + merchant.map_or(0, str::len) + token.map_or(0, str::len);
        let mut url = String::with_capacity(inner.base.len() + template.len() + ids);
        url.push_str(&inner.base);
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            url.push_str(&rest[..open]);
            let after = &rest[open..];
            let placeholder = after.find('}').map_or("", |close| &after[..=close]);
            let value = match placeholder {
                "{mgid}" => Some(inner.mgid.as_str()),
                "{merchantId}" => merchant,
                "{tokenId}" => token,
                _ => None,
            };
            if let Some(v) = value {
                push_component(&mut url, v);
                rest = &after[placeholder.len()..];
            } else {
                // Not a placeholder we fill (or an id this call does not have): kept as is.
                url.push('{');
                rest = &after[1..];
            }
        }
        url.push_str(rest);
        url
    }

    // ---- the call pipeline ------------------------------------------------------------------

    /// Runs one API call through limiter, breaker and time budget; returns a 2xx body.
    pub(crate) async fn execute(&self, spec: Spec) -> Result<Bytes, ProviderError> {
        let inner = &self.inner;
        let Ok(_permit) = inner.limiter.try_acquire() else {
            tracing::debug!(op = spec.op, "d1 call refused: concurrency limit reached");
            crate::observability::record_d1_refused(spec.op, "concurrency_limit");
            return Err(ProviderError::Unavailable { retry_after: None });
        };
        let admission = inner.breaker.admit().inspect_err(|_| {
            tracing::debug!(op = spec.op, "d1 call refused: circuit open");
            crate::observability::record_d1_refused(spec.op, "circuit_open");
        })?;
        let correlation_id = correlation_id();
        let started = Instant::now();
        let deadline = started + inner.call_timeout;

        let outcome =
            match tokio::time::timeout_at(deadline, self.run(&spec, &correlation_id, deadline))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(Failure::new(ProviderError::Timeout, true)),
            };
        let outcome = outcome.and_then(|reply| {
            if reply.status.is_success() {
                Ok(reply)
            } else {
                Err(failure_from_reply(
                    spec.op,
                    &reply,
                    spec.not_found_is_rejection,
                ))
            }
        });
        admission.record(outcome.as_ref().err().is_some_and(|f| f.upstream_fault));
        let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        // The one place a call completes: its metrics (src/observability.rs).
        crate::observability::record_d1_call(
            spec.op,
            provider_outcome(outcome.as_ref().map(|_| ()).map_err(|f| &f.error)),
            started.elapsed(),
        );
        match &outcome {
            Ok(r) => tracing::debug!(
                op = spec.op,
                status = r.status.as_u16(),
                latency_ms,
                correlation_id = %correlation_id,
                "d1 call done"
            ),
            Err(f) => tracing::debug!(
                op = spec.op,
                error = %f.error,
                latency_ms,
                correlation_id = %correlation_id,
                "d1 call failed"
            ),
        }
        outcome.map(|r| r.body).map_err(|f| f.error)
    }

    /// Authentication around the retry loop: a 401 evicts the token and replays once.
    async fn run(
        &self,
        spec: &Spec,
        correlation_id: &str,
        deadline: Instant,
    ) -> Result<Reply, Failure> {
        let mut replayed = false;
        loop {
            let token = if spec.auth {
                Some(self.access_token(correlation_id, deadline).await?)
            } else {
                None
            };
            let reply = self
                .attempts(spec, correlation_id, deadline, token.as_deref())
                .await?;
            if let Some(t) = &token
                && reply.status == StatusCode::UNAUTHORIZED
                && !replayed
            {
                tracing::debug!(
                    op = spec.op,
                    correlation_id,
                    "d1 refused the access token; refreshing"
                );
                self.invalidate(t);
                replayed = true;
                continue;
            }
            return Ok(reply);
        }
    }

    /// Sends `spec`, retrying as the module docs describe. Returns the last answer, whatever its
    /// status; fails only when no answer came.
    async fn attempts(
        &self,
        spec: &Spec,
        correlation_id: &str,
        deadline: Instant,
        token: Option<&AccessToken>,
    ) -> Result<Reply, Failure> {
        let mut attempt: u32 = 0;
        loop {
            let sent = Instant::now();
            let result = self.send_once(spec, correlation_id, token).await;
            let latency_ms = u64::try_from(sent.elapsed().as_millis()).unwrap_or(u64::MAX);
            let (retryable, retry_after) = match &result {
                Ok(r) => {
                    tracing::debug!(
                        op = spec.op,
                        attempt,
                        status = r.status.as_u16(),
                        latency_ms,
                        correlation_id,
                        "d1 attempt"
                    );
                    let s = r.status;
                    let retryable = s == StatusCode::TOO_MANY_REQUESTS
                        || s == StatusCode::SERVICE_UNAVAILABLE
                        || (spec.retry_500 && s == StatusCode::INTERNAL_SERVER_ERROR);
                    (retryable, r.retry_after)
                }
                Err(SendError::Connect) => {
                    tracing::debug!(
                        op = spec.op,
                        attempt,
                        latency_ms,
                        correlation_id,
                        "d1 connect failed"
                    );
                    (true, None)
                }
                Err(SendError::AfterSend) => {
                    tracing::debug!(
                        op = spec.op,
                        attempt,
                        latency_ms,
                        correlation_id,
                        "d1 connection broke after sending"
                    );
                    (false, None)
                }
            };
            if retryable && attempt < self.inner.max_retries {
                let delay = retry_after.unwrap_or_else(|| backoff(attempt));
                if Instant::now() + delay < deadline {
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                    continue;
                }
            }
            return result.map_err(|e| match e {
                // The request never reached D1: certainly not processed.
                SendError::Connect => {
                    Failure::new(ProviderError::Unavailable { retry_after: None }, true)
                }
                SendError::AfterSend => Failure::new(
                    ProviderError::BadResponse(format!(
                        "{}: connection closed without a complete response",
                        spec.op
                    )),
                    true,
                ),
            });
        }
    }

    async fn send_once(
        &self,
        spec: &Spec,
        correlation_id: &str,
        token: Option<&AccessToken>,
    ) -> Result<Reply, SendError> {
        let mut req = Request::builder()
            .method(spec.method.clone())
            .uri(&spec.url)
            .header(header::ACCEPT, json())
            .header(
                header::HeaderName::from_static("x-correlation-id"),
                correlation_id,
            );
        if spec.body.is_some() {
            req = req.header(header::CONTENT_TYPE, json());
        }
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, t.bearer.clone());
        }
        let req = req
            .body(Full::new(spec.body.clone().unwrap_or_default()))
            .map_err(|_| SendError::Connect)?;
        let lane = self.lane();
        let resp = lane.0.http.request(req).await.map_err(|e| {
            if e.is_connect() {
                SendError::Connect
            } else {
                SendError::AfterSend
            }
        })?;
        let status = resp.status();
        let retry_after = parse_retry_after(resp.headers().get(header::RETRY_AFTER));
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|_| SendError::AfterSend)?
            .to_bytes();
        Ok(Reply {
            status,
            retry_after,
            body,
        })
    }

    // ---- OAuth ------------------------------------------------------------------------------

    fn cached_token(&self) -> Option<Arc<AccessToken>> {
        self.inner
            .token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A usable access token; at most one token request is in flight at any time. Callers that
    /// waited for a request share its outcome, failure included, so a failing token endpoint
    /// gets one request per wave of callers rather than one per caller.
    async fn access_token(
        &self,
        correlation_id: &str,
        deadline: Instant,
    ) -> Result<Arc<AccessToken>, Failure> {
        if let Some(t) = self.cached_token() {
            let now = Instant::now();
            if now < t.refresh_at {
                return Ok(t);
            }
            if now < t.expires_at {
                // Due for refresh but still valid: this call goes on with it, and the next
                // token is fetched off the request path.
                self.refresh_in_background();
                return Ok(t);
            }
        }
        self.refresh_token(correlation_id, deadline).await
    }

    /// Starts one background token refresh, unless one is running. Its outcome only lands in
    /// the cache (and in `Flight`): the caller already has a valid token.
    fn refresh_in_background(&self) {
        if self
            .inner
            .refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            let correlation_id = correlation_id();
            let deadline = Instant::now() + client.inner.call_timeout;
            let result =
                tokio::time::timeout_at(deadline, client.refresh_token(&correlation_id, deadline))
                    .await;
            if !matches!(result, Ok(Ok(_))) {
                tracing::debug!(
                    correlation_id = %correlation_id,
                    "background access token refresh failed; the next call retries"
                );
            }
            client.inner.refreshing.store(false, Ordering::Release);
        });
    }

    /// The single flight of token requests: waits for a running one, else asks D1.
    async fn refresh_token(
        &self,
        correlation_id: &str,
        deadline: Instant,
    ) -> Result<Arc<AccessToken>, Failure> {
        let seen = self.inner.flights_done.load(Ordering::Acquire);
        let mut flight = match self.inner.refresh.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                // Someone else is refreshing: a token that is due for refresh but not yet
                // expired still works, so do not wait for them.
                if let Some(t) = self.cached_token()
                    && Instant::now() < t.expires_at
                {
                    return Ok(t);
                }
                self.inner.refresh.lock().await
            }
        };
        // The refresh we may have waited for could have produced a fresh token ...
        if let Some(t) = self.cached_token()
            && Instant::now() < t.refresh_at
        {
            return Ok(t);
        }
        // ... or failed just now: share that answer instead of asking again at once.
        if flight.done != seen
            && let Some(f) = &flight.failed
        {
            return Err(f.clone());
        }
        // If this future is cancelled mid-request, `done` stays put and waiters try themselves.
        let result = self.fetch_token(correlation_id, deadline).await;
        flight.done += 1;
        self.inner
            .flights_done
            .store(flight.done, Ordering::Release);
        match result {
            Ok(t) => {
                flight.failed = None;
                let fresh = Arc::new(t);
                *self.inner.token.write().unwrap_or_else(|e| e.into_inner()) = Some(fresh.clone());
                Ok(fresh)
            }
            Err(f) => {
                flight.failed = Some(f.clone());
                Err(f)
            }
        }
    }

    /// Evicts `used` if it is still the cached token (a newer one is left alone).
    fn invalidate(&self, used: &AccessToken) {
        let mut slot = self.inner.token.write().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|t| t.serial == used.serial) {
            *slot = None;
        }
    }

    async fn fetch_token(
        &self,
        correlation_id: &str,
        deadline: Instant,
    ) -> Result<AccessToken, Failure> {
        const OP: &str = "oauth";
        let inner = &self.inner;
        let assertion = inner
            .signer
            .sign_assertion(&inner.mgid, &inner.base, ASSERTION_LIFETIME)
            .map_err(|e| Failure::new(ProviderError::BadResponse(format!("{OP}: {e}")), false))?;
        let body = encode_json(
            OP,
            &OAuthTokenRequest {
                grant_type: JWT_BEARER_GRANT,
                assertion: &assertion,
            },
        )
        .map_err(|e| Failure::new(e, false))?;
        let spec = Spec {
            op: OP,
            method: Method::POST,
            url: self.url(&inner.paths.oauth_token, None, None),
            body: Some(body),
            auth: false,
            // Asking again for a token changes nothing upstream.
            retry_500: true,
            not_found_is_rejection: false,
        };
        let requested = Instant::now();
        let reply = self.attempts(&spec, correlation_id, deadline, None).await?;
        if !reply.status.is_success() {
            return Err(failure_from_reply(OP, &reply, false));
        }
        let resp: OAuthTokenResponse =
            decode(OP, &reply.body).map_err(|e| Failure::new(e, false))?;
        if resp.access_token.is_empty()
            || resp
                .token_type
                .as_deref()
                .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
        {
            return Err(Failure::new(
                ProviderError::BadResponse(format!("{OP}: not a bearer token")),
                false,
            ));
        }
        let bearer = Zeroizing::new(format!("Bearer {}", resp.access_token));
        let Ok(mut bearer) = HeaderValue::from_str(&bearer) else {
            return Err(Failure::new(
                ProviderError::BadResponse(format!(
                    "{OP}: access token is not a valid header value"
                )),
                false,
            ));
        };
        bearer.set_sensitive(true);
        let lifetime = Duration::from_secs(resp.expires_in).min(MAX_TOKEN_LIFETIME);
        // Refresh 60 s early, or halfway for tokens shorter than two minutes.
        let lead = TOKEN_REFRESH_LEAD.min(lifetime / 2);
        Ok(AccessToken {
            serial: inner.token_serial.fetch_add(1, Ordering::Relaxed),
            bearer,
            refresh_at: requested + (lifetime - lead),
            expires_at: requested + lifetime,
        })
    }

    // ---- operations -------------------------------------------------------------------------

    async fn token_call(
        &self,
        op: &'static str,
        method: Method,
        url: String,
        body: Option<Bytes>,
    ) -> Result<ProviderToken, ProviderError> {
        let retry_500 = method == Method::GET;
        let body = self
            .execute(Spec {
                op,
                method,
                url,
                body,
                auth: true,
                retry_500,
                not_found_is_rejection: false,
            })
            .await?;
        Ok(decode::<TokenObject>(op, &body)?.into())
    }

    /// Encrypts `plaintext` (card data, in a wiping buffer the caller owns) to D1's key as a
    /// compact JWE, for calls other than token creation (physical card orders).
    pub(crate) fn encrypt_for_d1(
        &self,
        op: &str,
        plaintext: &[u8],
    ) -> Result<String, ProviderError> {
        jose::jwe_encrypt(plaintext, &self.inner.d1_jwe_public, &self.inner.d1_jwe_kid).map_err(
            |e| ProviderError::BadResponse(format!("{op}: card data encryption failed: {e}")),
        )
    }

    fn card_jwe(&self, pan: &Pan, expiry: &Expiry) -> Result<String, ProviderError> {
        let exp = expiry.mmyy();
        let plain = CardPlaintext {
            pan: pan.expose_digits(),
            exp: &exp,
        }
        .to_zeroizing_json()
        .map_err(|_| {
            ProviderError::BadResponse("createToken: could not encode card data".into())
        })?;
        jose::jwe_encrypt(&plain, &self.inner.d1_jwe_public, &self.inner.d1_jwe_kid).map_err(|e| {
            ProviderError::BadResponse(format!("createToken: card data encryption failed: {e}"))
        })
    }
}

/// Transport failures, split by whether the request can have reached D1.
enum SendError {
    /// No connection (refused, DNS, TLS handshake): the request was not sent.
    Connect,
    /// The connection broke after the request may have been sent.
    AfterSend,
}

#[async_trait]
impl NetworkTokenProvider for D1Client {
    async fn onboard_merchant(&self, name: &str) -> Result<String, ProviderError> {
        const OP: &str = "onboardMerchant";
        let body = encode_json(
            OP,
            &OnboardMerchantRequest {
                merchant_name: name,
            },
        )?;
        let body = self
            .execute(Spec {
                op: OP,
                method: Method::POST,
                url: self.url(&self.inner.paths.merchants, None, None),
                body: Some(body),
                auth: true,
                retry_500: false,
                not_found_is_rejection: false,
            })
            .await?;
        let resp: OnboardMerchantResponse = decode(OP, &body)?;
        if resp.merchant_id.is_empty() {
            return Err(ProviderError::BadResponse(format!(
                "{OP}: empty merchantId"
            )));
        }
        Ok(resp.merchant_id)
    }

    async fn create_token(
        &self,
        d1_merchant_id: &str,
        pan: &Pan,
        expiry: &Expiry,
        usage: Usage,
        request_id: &str,
    ) -> Result<ProviderToken, ProviderError> {
        const OP: &str = "createToken";
        // Encrypted once: every retry sends these exact bytes with the same requestId.
        let encrypted = self.card_jwe(pan, expiry)?;
        let body = encode_json(
            OP,
            &CreateTokenRequest {
                request_id,
                usage: usage.as_str(),
                encrypted_data: &encrypted,
            },
        )?;
        let url = self.url(&self.inner.paths.tokens, Some(d1_merchant_id), None);
        self.token_call(OP, Method::POST, url, Some(body)).await
    }

    async fn get_token(
        &self,
        d1_merchant_id: &str,
        d1_token_id: &str,
    ) -> Result<ProviderToken, ProviderError> {
        let url = self.url(
            &self.inner.paths.token,
            Some(d1_merchant_id),
            Some(d1_token_id),
        );
        self.token_call("getToken", Method::GET, url, None).await
    }

    async fn find_token_by_request(
        &self,
        d1_merchant_id: &str,
        request_id: &str,
    ) -> Result<ProviderToken, ProviderError> {
        let url = format!(
            "{}?requestId={}",
            self.url(&self.inner.paths.tokens, Some(d1_merchant_id), None),
            encode_component(request_id)
        );
        self.token_call("findToken", Method::GET, url, None).await
    }

    async fn create_cryptogram(
        &self,
        d1_merchant_id: &str,
        d1_token_id: &str,
        transaction_type: TransactionType,
        amount: Option<&Amount>,
    ) -> Result<Cryptogram, ProviderError> {
        const OP: &str = "createTransaction";
        let body = encode_json(
            OP,
            &TransactionRequest {
                transaction_type: transaction_type.as_str(),
                amount: amount.map(|a| AmountDto {
                    value: a.value,
                    currency: &a.currency,
                }),
            },
        )?;
        let body = self
            .execute(Spec {
                op: OP,
                method: Method::POST,
                url: self.url(
                    &self.inner.paths.transactions,
                    Some(d1_merchant_id),
                    Some(d1_token_id),
                ),
                body: Some(body),
                auth: true,
                retry_500: false,
                not_found_is_rejection: false,
            })
            .await?;
        let resp: TransactionResponse = decode(OP, &body)?;
        let inner = &self.inner;
        let keys = |kid: &str| (kid == inner.gateway_jwe_kid).then_some(&inner.gateway_jwe_key);
        let (_, plain) = jose::jwe_decrypt_with(&resp.encrypted_data, &keys)
            .map_err(|e| ProviderError::BadResponse(format!("{OP}: encryptedData: {e}")))?;
        let payload: CryptogramPlaintext = decode(OP, &plain)?;
        let (token_number, expiry, cryptogram) = payload.into_parts();
        let expiry = Expiry::from_mmyy(&expiry)
            .ok_or_else(|| ProviderError::BadResponse(format!("{OP}: invalid tokenExpiryDate")))?;
        if token_number.is_empty() || cryptogram.is_empty() {
            return Err(ProviderError::BadResponse(format!(
                "{OP}: empty token number or cryptogram"
            )));
        }
        Ok(Cryptogram {
            token_number,
            expiry,
            cryptogram,
            eci: resp.eci,
        })
    }

    async fn lifecycle(
        &self,
        d1_merchant_id: &str,
        d1_token_id: &str,
        action: LifecycleAction,
    ) -> Result<ProviderToken, ProviderError> {
        let p = &self.inner.paths;
        let (op, method, template, body) = match action {
            LifecycleAction::Suspend => ("suspend", Method::POST, &p.suspend, true),
            LifecycleAction::Resume => ("resume", Method::POST, &p.resume, true),
            LifecycleAction::Delete => ("delete", Method::DELETE, &p.token, false),
        };
        let body = if body {
            Some(encode_json(op, &LifecycleRequest::default())?)
        } else {
            None
        };
        let url = self.url(template, Some(d1_merchant_id), Some(d1_token_id));
        self.token_call(op, method, url, body).await
    }
}

#[cfg(test)]
// `allow`, not `expect`: whether clippy flags unwraps in tests depends on crate-level settings.
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use super::*;

    #[test]
    fn default_paths_are_valid_and_bad_ones_refused() {
        D1Paths::default().validate().unwrap();
        let bad = D1Paths {
            token: "/tokens/{tokenID}".into(),
            ..D1Paths::default()
        };
        assert!(bad.validate().is_err());
        let bad = D1Paths {
            merchants: "merchants".into(),
            ..D1Paths::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn ids_are_percent_encoded() {
        assert_eq!(encode_component("tok_A-b.~9"), "tok_A-b.~9");
        assert_eq!(encode_component("a/../b?x=1"), "a%2F..%2Fb%3Fx%3D1");
    }

    #[test]
    fn status_mapping() {
        let reply = |status: u16, body: &str, ra: Option<u64>| Reply {
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: ra.map(Duration::from_secs),
            body: Bytes::from(body.to_owned()),
        };
        // The issuer API's 404 is a refusal with D1's code.
        let f = failure_from_reply(
            "op",
            &reply(404, r#"{"errorCode":"CARD_NOT_FOUND"}"#, None),
            true,
        );
        assert!(
            matches!(&f.error, ProviderError::Rejected { status: 404, code } if code == "CARD_NOT_FOUND")
        );
        let f = failure_from_reply("op", &reply(429, "", Some(2)), false);
        assert!(
            matches!(f.error, ProviderError::Unavailable { retry_after: Some(d) } if d == Duration::from_secs(2))
        );
        assert!(!f.upstream_fault);
        let f = failure_from_reply("op", &reply(503, "", None), false);
        assert!(matches!(
            f.error,
            ProviderError::Unavailable { retry_after: None }
        ));
        assert!(f.upstream_fault);
        let f = failure_from_reply(
            "op",
            &reply(404, r#"{"errorCode":"NOT_FOUND"}"#, None),
            false,
        );
        assert!(matches!(f.error, ProviderError::NotFound));
        let f = failure_from_reply(
            "op",
            &reply(409, r#"{"errorCode":"INVALID_STATE"}"#, None),
            false,
        );
        assert!(
            matches!(&f.error, ProviderError::Rejected { status: 409, code } if code == "INVALID_STATE")
        );
        assert!(!f.upstream_fault);
        // A code that is not a machine code is not echoed.
        let f = failure_from_reply(
            "op",
            &reply(400, r#"{"errorCode":"4111 1111 1111 1111"}"#, None),
            false,
        );
        assert!(matches!(&f.error, ProviderError::Rejected { code, .. } if code == "HTTP_400"));
        let f = failure_from_reply("op", &reply(500, "<html>oops</html>", None), false);
        assert!(matches!(&f.error, ProviderError::BadResponse(m) if m == "op: HTTP 500"));
        assert!(f.upstream_fault);
    }

    #[test]
    fn config_is_validated() {
        let dev = DevMaterial::generate("mgid-cfg").unwrap();
        let ok = D1Config::sandbox("https://127.0.0.1:1/authz/v1/", &dev);
        let client = D1Client::new(ok.clone()).unwrap();
        assert_eq!(
            client.url(&D1Paths::default().token, Some("m 1"), Some("t/2")),
            "https://127.0.0.1:1/authz/v1/merchant-gateways/mgid-cfg/merchants/m%201/tokens/t%2F2"
        );
        // What a call does not fill, and what is not a placeholder, stays as written; ids
        // that look like placeholders are encoded, never filled.
        assert_eq!(
            client.url(
                "/x/{mgid}/{merchantId}/{tokenId}/{other}/{",
                None,
                Some("{mgid}")
            ),
            "https://127.0.0.1:1/authz/v1/x/mgid-cfg/{merchantId}/%7Bmgid%7D/{other}/{"
        );
        let plain_http = D1Config {
            base_url: "http://127.0.0.1:1".into(),
            ..ok.clone()
        };
        assert!(matches!(D1Client::new(plain_http), Err(D1Error::Config(_))));
        let no_slots = D1Config {
            max_concurrency: 0,
            ..ok.clone()
        };
        assert!(D1Client::new(no_slots).is_err());
        let bad_key = D1Config {
            es256_key_pem: SecretString::from("nope"),
            ..ok.clone()
        };
        let err = D1Client::new(bad_key).unwrap_err();
        assert!(matches!(err, D1Error::Keys(_)));
        let bad_ca = D1Config {
            ca_pem: "nope".into(),
            ..ok
        };
        assert!(matches!(D1Client::new(bad_ca), Err(D1Error::Tls(_))));
        // Debug never shows key material.
        let dbg = format!("{:?}", D1Config::sandbox("https://x", &dev));
        assert!(!dbg.contains("PRIVATE KEY"));
    }

    #[test]
    fn token_object_maps_to_provider_token_keeping_unknown_status() {
        let json = r#"{"tokenId":"t1","requestId":"tok_x","status":"FROZEN_BY_ISSUER",
            "tokenLastDigits":"4321","tokenExpiryDate":"0329","par":"V001","newField":{"a":[1]},
            "cardBin":"411111"}"#;
        let t: super::TokenObject = serde_json::from_str(json).unwrap();
        let p = ProviderToken::from(t);
        assert_eq!(p.status, TokenStatus::Unknown("FROZEN_BY_ISSUER".into()));
        assert_eq!(p.d1_token_id, "t1");
        assert_eq!(p.last4.as_deref(), Some("4321"));
        assert_eq!(p.expiry, Expiry::trusted(3, 2029));
        assert_eq!(p.par.as_deref(), Some("V001"));
    }

    #[test]
    fn pending_token_has_only_id_and_status() {
        let t: super::TokenObject =
            serde_json::from_str(r#"{"tokenId":"t2","status":"PENDING"}"#).unwrap();
        let p = ProviderToken::from(t);
        assert_eq!(p.status, TokenStatus::Pending);
        assert_eq!(p.last4, None);
        assert_eq!(p.expiry, None);
        // A malformed expiry does not fail decoding.
        let t: super::TokenObject =
            serde_json::from_str(r#"{"tokenId":"t3","status":"ACTIVE","tokenExpiryDate":"13/29"}"#)
                .unwrap();
        assert_eq!(ProviderToken::from(t).expiry, None);
    }
}
