//! `Idempotency-Key` handling for POST routes: same key and same request replays the stored
//! response; same key with a different request is 422; a duplicate while the first is still
//! running is 409. Responses below 500 are kept (`idempotency.ttl_s`, 24 h by default); a 5xx
//! releases the key so the client's retry runs again.

use std::future::Future;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::problem::{ApiError, PROBLEM_JSON, codes};
use super::state::AppState;
use crate::domain::ports::{IdempotencyBegin, StoredResponse};

pub const HEADER: &str = "idempotency-key";
/// Set on replayed responses so clients and logs can tell.
pub const REPLAYED: &str = "idempotent-replayed";

/// A handler's outcome before it becomes a response: status and JSON body.
pub struct Reply {
    pub status: StatusCode,
    /// UTF-8 JSON (every constructor writes a `String` or a [`Reply::json_bytes`] view).
    pub body: Bytes,
    pub content_type: &'static str,
    /// Never stored for replay (e.g. cryptograms: credentials must not persist).
    pub sensitive: bool,
    /// Carries a secret shown once (a new API key): kept for replay only sealed by the vault,
    /// so the store never holds the secret in clear (see [`seal_body`]).
    pub sealed: bool,
    /// Carried from an [`ApiError`] so 429/503 answers keep their `Retry-After`.
    pub retry_after: Option<std::time::Duration>,
}

/// Serialises `v` into one buffer sized for a typical view (a token is ~400 bytes), so it is
/// not regrown while written; the buffer then becomes the response body without a copy.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut buf = Vec::with_capacity(512);
    if serde_json::to_writer(&mut buf, v).is_err() {
        // As `serde_json::to_string(v).unwrap_or_default()` answered before: an empty body.
        buf.clear();
    }
    buf
}

impl Reply {
    pub fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Reply {
        Reply {
            status,
            body: Bytes::from(to_json(v)),
            content_type: "application/json",
            sensitive: false,
            sealed: false,
            retry_after: None,
        }
    }

    /// A reply whose JSON is already written (a cached token view, `views::token_json`).
    pub fn json_bytes(status: StatusCode, json: Bytes) -> Reply {
        Reply {
            status,
            body: json,
            content_type: "application/json",
            sensitive: false,
            sealed: false,
            retry_after: None,
        }
    }

    /// A reply without a body (204), stored and replayed like any other.
    pub fn no_content() -> Reply {
        Reply {
            status: StatusCode::NO_CONTENT,
            body: Bytes::new(),
            content_type: "application/json",
            sensitive: false,
            sealed: false,
            retry_after: None,
        }
    }

    /// Marks the reply as carrying a secret: stored for replay sealed, never in clear.
    pub fn sealed(mut self) -> Reply {
        self.sealed = true;
        self
    }
}

/// Stored bodies of sealed replies start with this, then `<key id>:<base64 of the blob>`.
const SEALED_PREFIX: &str = "sealed:v1:";
/// Seal purpose: the AAD binds the blob to replay bodies of this scope and idempotency key.
const SEAL_PURPOSE: &str = "idempotent-reply";

/// Seals a reply body for the idempotency store, bound to its scope and key.
fn seal_body(state: &AppState, scope: &str, key: &str, body: &str) -> String {
    use base64::Engine;
    let (key_id, blob) =
        state
            .services
            .keyring
            .seal_secret(SEAL_PURPOSE, &[scope, key], body.as_bytes());
    format!(
        "{SEALED_PREFIX}{key_id}:{}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// Opens a stored body written by [`seal_body`]; other bodies are returned as they are. `None`
/// when a sealed body does not open (retired key, tampering).
fn open_body(state: &AppState, scope: &str, key: &str, stored: String) -> Option<String> {
    use base64::Engine;
    let Some(rest) = stored.strip_prefix(SEALED_PREFIX) else {
        return Some(stored);
    };
    let (key_id, b64) = rest.split_once(':')?;
    let blob = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let plain = state
        .services
        .keyring
        .open_secret(SEAL_PURPOSE, &[scope, key], key_id, &blob)
        .ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Reply {
        Reply {
            status: e.status,
            body: Bytes::from(e.body()),
            content_type: PROBLEM_JSON,
            sensitive: false,
            sealed: false,
            retry_after: e.retry_after,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        // Built directly (not through `(StatusCode, String)`, which sets a `text/plain` type
        // that would only be replaced): the body `String` becomes the response body as is.
        let mut r = Response::new(axum::body::Body::from(self.body));
        *r.status_mut() = self.status;
        // No content, hence no content type.
        if self.status != StatusCode::NO_CONTENT {
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type),
            );
        }
        if let Some(ra) = self.retry_after {
            super::problem::set_retry_after(r.headers_mut(), ra);
        }
        r
    }
}

/// Reads and validates the `Idempotency-Key` header.
pub fn key_from(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(HEADER) else {
        return Ok(None);
    };
    let s = v.to_str().map_err(|_| {
        ApiError::of(
            &codes::INVALID_IDEMPOTENCY_KEY,
            "Idempotency-Key must be ASCII",
        )
    })?;
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(ApiError::of(
            &codes::INVALID_IDEMPOTENCY_KEY,
            "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces",
        ));
    }
    Ok(Some(s.to_owned()))
}

/// Runs `run` at most once per idempotency key in `scope` (a merchant id, or `admin`).
pub async fn run_idempotent<F, Fut>(
    state: &AppState,
    scope: &str,
    key: Option<String>,
    request_parts: &[&[u8]],
    run: F,
) -> Response
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Reply>,
{
    let Some(key) = key else {
        return run().await.into_response();
    };
    // Boxed: a request without a key (the common case) does not carry this path's state
    // (store calls, digests) in its future, which axum moves and boxes per request.
    Box::pin(run_keyed(state, scope, key, request_parts, run)).await
}

/// [`run_idempotent`] with an `Idempotency-Key`.
async fn run_keyed<F, Fut>(
    state: &AppState,
    scope: &str,
    key: String,
    request_parts: &[&[u8]],
    run: F,
) -> Response
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Reply>,
{
    let digest = state.services.keyring.request_digest(request_parts);
    let store = &state.services.store;
    let lock_ttl = Duration::from_secs(state.idempotency_lock_ttl_s);
    match store
        .idempotency_begin(scope, &key, &digest, lock_ttl)
        .await
    {
        Err(e) => return ApiError::from(crate::domain::DomainError::from(e)).into_response(),
        Ok(IdempotencyBegin::InFlight { same_request: true }) => {
            return ApiError::of(
                &codes::IDEMPOTENCY_IN_FLIGHT,
                "a request with this Idempotency-Key is still being processed",
            )
            .into_response();
        }
        Ok(IdempotencyBegin::InFlight {
            same_request: false,
        }) => return mismatch().into_response(),
        Ok(IdempotencyBegin::Completed(stored)) => {
            // A record written under another fingerprint key of the ring (before a rotation,
            // or by an instance not rolled yet) is matched under that key.
            if stored.request_digest != digest
                && !state
                    .services
                    .keyring
                    .request_digest_matches(&stored.request_digest, request_parts)
            {
                return mismatch().into_response();
            }
            let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
            let ct = if status.is_success() {
                "application/json"
            } else {
                PROBLEM_JSON
            };
            let Some(body) = open_body(state, scope, &key, stored.body) else {
                // The work was done, but its answer (a secret) cannot be shown again.
                tracing::error!("a sealed idempotent reply did not open; its key may be retired");
                return ApiError::of(&codes::IDEMPOTENCY_REPLY_UNAVAILABLE, "this request was already processed, but its answer can no longer be replayed; do not retry with this Idempotency-Key",
                )
                .into_response();
            };
            let mut r = Reply {
                status,
                body: Bytes::from(body),
                content_type: ct,
                sensitive: false,
                sealed: false,
                retry_after: None,
            }
            .into_response();
            r.headers_mut()
                .insert(REPLAYED, HeaderValue::from_static("true"));
            return r;
        }
        Ok(IdempotencyBegin::Started) => {}
    }
    let reply = run().await;
    let keep = reply.status.as_u16() < 500 && !reply.sensitive;
    let outcome = if keep {
        let stored = StoredResponse {
            request_digest: digest,
            status: reply.status.as_u16(),
            body: {
                // Always UTF-8 (see `Reply::body`); a stored body is a `String`.
                let body = String::from_utf8_lossy(&reply.body);
                if reply.sealed {
                    seal_body(state, scope, &key, &body)
                } else {
                    body.into_owned()
                }
            },
        };
        store
            .idempotency_complete(
                scope,
                &key,
                &stored,
                Duration::from_secs(state.idempotency_ttl_s),
            )
            .await
    } else {
        store.idempotency_abort(scope, &key).await
    };
    if let Err(e) = outcome {
        // The work is done; failing to record it only weakens replay, so answer anyway.
        tracing::warn!(error = %e, "could not record idempotency outcome");
    }
    reply.into_response()
}

fn mismatch() -> ApiError {
    ApiError::of(
        &codes::IDEMPOTENCY_KEY_REUSED,
        "this Idempotency-Key was used with a different request",
    )
}
