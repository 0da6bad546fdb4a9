//! `Idempotency-Key` handling for POST routes: same key and same request replays the stored
//! response; same key with a different request is 422; a duplicate while the first is still
//! running is 409. Responses below 500 are kept (`idempotency.ttl_s`, 24 h by default); a 5xx
//! releases the key so the client's retry runs again.

use std::future::Future;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::problem::{ApiError, PROBLEM_JSON};
use crate::storage::{IdempotencyBegin, StoredResponse};

pub const HEADER: &str = "idempotency-key";
/// Set on replayed responses so clients and logs can tell.
pub const REPLAYED: &str = "idempotent-replayed";

/// A handler's outcome before it becomes a response: status and JSON body.
pub struct Reply {
    pub status: StatusCode,
    pub body: String,
    pub content_type: &'static str,
    /// Never stored for replay (e.g. cryptograms: credentials must not persist).
    pub sensitive: bool,
    /// Carried from an [`ApiError`] so 429/503 answers keep their `Retry-After`.
    pub retry_after: Option<std::time::Duration>,
}

impl Reply {
    pub fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Reply {
        Reply {
            status,
            body: serde_json::to_string(v).unwrap_or_default(),
            content_type: "application/json",
            sensitive: false,
            retry_after: None,
        }
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Reply {
        Reply {
            status: e.status,
            body: e.body(),
            content_type: PROBLEM_JSON,
            sensitive: false,
            retry_after: e.retry_after,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut r = (self.status, self.body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
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
        ApiError::bad_request("invalid_idempotency_key", "Idempotency-Key must be ASCII")
    })?;
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
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
    let digest = state.services.keyring.request_digest(request_parts);
    let store = &state.services.store;
    let lock_ttl = Duration::from_secs(state.idempotency_lock_ttl_s);
    match store
        .idempotency_begin(scope, &key, &digest, lock_ttl)
        .await
    {
        Err(e) => return ApiError::from(crate::domain::DomainError::from(e)).into_response(),
        Ok(IdempotencyBegin::InFlight { same_request: true }) => {
            return ApiError::conflict(
                "idempotency_in_flight",
                "a request with this Idempotency-Key is still being processed",
            )
            .into_response();
        }
        Ok(IdempotencyBegin::InFlight {
            same_request: false,
        }) => return mismatch().into_response(),
        Ok(IdempotencyBegin::Completed(stored)) => {
            if stored.request_digest != digest {
                return mismatch().into_response();
            }
            let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
            let ct = if status.is_success() {
                "application/json"
            } else {
                PROBLEM_JSON
            };
            let mut r = Reply {
                status,
                body: stored.body,
                content_type: ct,
                sensitive: false,
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
            body: reply.body.clone(),
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
    ApiError::unprocessable(
        "idempotency_key_reused",
        "this Idempotency-Key was used with a different request",
    )
}
