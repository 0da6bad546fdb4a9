//! D1's calls to the gateway:
//!
//! - `POST /oauth2/token`: OAuth 2.0 client credentials (HTTP Basic, form body
//!   `grant_type=client_credentials`), answering a stateless access token
//!   (`domain::notify_auth`). Errors in OAuth's own JSON format (see `problem::OAuthError`).
//! - `POST /merchant-gateways/{merchantGatewayId}/merchants/{merchantId}/tokens/{tokenId}/notify-update`:
//!   a token lifecycle event, applied synchronously (`domain::lifecycle`) before answering 204.
//!   Applying takes a few store round trips; answering only afterwards is what makes every
//!   acknowledged event durable: if we die first, D1 gets no 2xx and redelivers, and the
//!   processed-event marker makes a redelivery of an event that did land a no-op.

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zeroize::Zeroizing;

use crate::domain::lifecycle::{EventKind, TokenEvent};
use crate::domain::ports::lifecycle::MAX_EVENT_ID_LEN;
use crate::domain::token::TokenStatus;
use crate::http::extract::{Body, parse_json};
use crate::http::problem::{
    ApiError, OAuthError, OAuthErrorBody, ProblemBody, codes, notification_error,
    notify_unauthorized,
};
use crate::http::state::AppState;
use tokengate_cards::Expiry;

// --- POST /oauth2/token -----------------------------------------------------------------------

/// `application/x-www-form-urlencoded` decoding (`+` is a space, `%XX` a byte); `None` for
/// malformed escapes or non-UTF-8 results.
fn form_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The form parameters; a repeated one is an error (RFC 6749 section 3.2).
fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, OAuthError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| OAuthError::InvalidRequest("the form body is not UTF-8"))?;
    let mut params: Vec<(String, String)> = Vec::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = form_decode(k).ok_or(OAuthError::InvalidRequest("malformed form encoding"))?;
        let v = form_decode(v).ok_or(OAuthError::InvalidRequest("malformed form encoding"))?;
        if params.iter().any(|(seen, _)| *seen == k) {
            return Err(OAuthError::InvalidRequest("a parameter is repeated"));
        }
        params.push((k, v));
    }
    Ok(params)
}

/// `Authorization: Basic base64(id:secret)`. The secret is wiped when dropped.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, Zeroizing<String>)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = Zeroizing::new(STANDARD.decode(b64.trim()).ok()?);
    let text = std::str::from_utf8(&decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), Zeroizing::new(secret.to_owned())))
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// `POST /oauth2/token` form body (RFC 6749 section 4.4). A schema only (OpenAPI).
#[derive(utoipa::ToSchema)]
#[schema(as = OAuthTokenRequest)]
#[expect(dead_code, reason = "a schema only; the form is parsed by parse_form")]
struct TokenRequestSchema {
    /// Only `client_credentials`.
    #[schema(example = "client_credentials")]
    grant_type: String,
    /// Accepted and ignored (there is one scope).
    scope: Option<String>,
}

/// `200` of `POST /oauth2/token`. A schema only (OpenAPI): the handler writes it with `json!`.
#[derive(utoipa::ToSchema)]
#[schema(as = OAuthTokenResponse)]
#[expect(dead_code, reason = "a schema only; never constructed")]
struct TokenResponseSchema {
    access_token: String,
    #[schema(example = "Bearer")]
    token_type: String,
    /// Seconds.
    expires_in: u64,
    /// Unix seconds.
    expires_at: i64,
    scope: String,
}

/// OAuth 2.0 client credentials for D1 (HTTP Basic): the access token `notify-update` needs.
/// Errors are in OAuth's own format, not problem+json.
#[utoipa::path(post, path = "/oauth2/token", tag = "d1",
    security(("d1ClientBasic" = [])),
    request_body(content = TokenRequestSchema, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "An access token (`Cache-Control: no-store`)", body = TokenResponseSchema),
        (status = 400, description = "`invalid_request`, `unsupported_grant_type`", body = OAuthErrorBody, content_type = "application/json"),
        (status = 401, description = "`invalid_client`", body = OAuthErrorBody, content_type = "application/json"),
        (status = 413, description = "`body_too_large`", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "`overloaded`, `request_timeout`", body = ProblemBody, content_type = "application/problem+json"),
    ))]
/// `POST /oauth2/token`.
pub async fn oauth_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let auth = &state.notify.auth;
    // The client first: an unauthenticated caller learns nothing about the rest.
    let Some((id, secret)) = basic_credentials(&headers) else {
        return OAuthError::InvalidClient.into_response();
    };
    if !auth.check_client(&id, &secret) {
        tracing::warn!("token request with wrong client credentials");
        return OAuthError::InvalidClient.into_response();
    }
    let Ok(body) = body else {
        return OAuthError::InvalidRequest("the request body could not be read").into_response();
    };
    if !is_form(&headers) {
        return OAuthError::InvalidRequest("send the body as application/x-www-form-urlencoded")
            .into_response();
    }
    let params = match parse_form(&body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    // Other parameters (scope included) are accepted and ignored, as RFC 6749 asks: there is
    // one scope, and it is what the response says was granted.
    match params.iter().find(|(k, _)| k == "grant_type") {
        None => {
            return OAuthError::InvalidRequest("grant_type is required").into_response();
        }
        Some((_, g)) if g != "client_credentials" => {
            return OAuthError::UnsupportedGrantType.into_response();
        }
        Some(_) => {}
    }
    let Some(token) = auth.issue(OffsetDateTime::now_utc()) else {
        return OAuthError::InvalidClient.into_response();
    };
    let body = serde_json::json!({
        "access_token": token.access_token.as_str(),
        "token_type": "Bearer",
        "expires_in": token.expires_in,
        "expires_at": token.expires_at,
        "scope": token.scope,
    });
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    let h = resp.headers_mut();
    // RFC 6749 5.1: a token response is never cached.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

// --- notify-update ----------------------------------------------------------------------------

/// A `notify-update` caller that passed the bearer check (or none is required and none was
/// sent; a token that is sent is always checked).
pub struct D1Caller;

impl FromRequestParts<AppState> for D1Caller {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        let auth = &state.notify.auth;
        if token.is_none() && !auth.required() {
            return Ok(D1Caller);
        }
        auth.verify(token, OffsetDateTime::now_utc())
            .map(|()| D1Caller)
            .map_err(notify_unauthorized)
    }
}

/// The notification body (docs/d1-protocol.md, "Notifications"). Unknown fields are ignored, as
/// D1's compatibility rules require.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = TokenNotification)]
struct NotifyBody {
    event_id: String,
    event_type: String,
    timestamp: String,
    #[serde(default)]
    token_id: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    token_last_digits: Option<String>,
    #[serde(default)]
    token_expiry_date: Option<String>,
    #[serde(default)]
    card_last_digits: Option<String>,
    #[serde(default)]
    card_expiry_date: Option<String>,
    #[serde(default)]
    par: Option<String>,
}

fn valid_event_id(s: &str) -> bool {
    (1..=MAX_EVENT_ID_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// D1 ids are opaque; bounded and printable so they are safe as storage keys and in logs.
fn valid_d1_id(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Four digits, or nothing: metadata in another shape is unusable, not a reason to refuse.
fn last_digits(s: Option<String>) -> Option<String> {
    s.filter(|v| v.len() == 4 && v.bytes().all(|b| b.is_ascii_digit()))
}

fn par(s: Option<String>) -> Option<String> {
    s.filter(|v| (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Statuses are enum-like words; anything else is malformed (not a new enum value).
fn status(s: Option<String>) -> Result<Option<TokenStatus>, ApiError> {
    match s {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v)
            if v.len() <= 32
                && v.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') =>
        {
            Ok(Some(TokenStatus::parse(&v)))
        }
        Some(_) => Err(ApiError::of(
            &codes::INVALID_FIELD,
            "`status` must be an upper-case word such as ACTIVE",
        )),
    }
}

fn to_event(
    d1_merchant_id: String,
    d1_token_id: String,
    b: NotifyBody,
) -> Result<TokenEvent, ApiError> {
    if !valid_event_id(&b.event_id) {
        return Err(ApiError::of(
            &codes::INVALID_FIELD,
            format!("`eventId` must be 1 to {MAX_EVENT_ID_LEN} characters of [A-Za-z0-9._:-]"),
        ));
    }
    if b.event_type.is_empty() || b.event_type.len() > 64 {
        return Err(ApiError::of(
            &codes::INVALID_FIELD,
            "`eventType` must be 1 to 64 characters",
        ));
    }
    let timestamp = OffsetDateTime::parse(&b.timestamp, &Rfc3339).map_err(|_| {
        ApiError::of(
            &codes::INVALID_FIELD,
            "`timestamp` must be an RFC 3339 date-time",
        )
    })?;
    if let Some(t) = &b.token_id
        && *t != d1_token_id
    {
        return Err(ApiError::of(
            &codes::TOKEN_ID_MISMATCH,
            "`tokenId` in the body differs from the one in the path",
        ));
    }
    Ok(TokenEvent {
        d1_merchant_id,
        d1_token_id,
        event_id: b.event_id,
        kind: EventKind::parse(&b.event_type),
        timestamp,
        request_id: b.request_id,
        status: status(b.status)?,
        token_last4: last_digits(b.token_last_digits),
        token_expiry: b.token_expiry_date.as_deref().and_then(Expiry::from_mmyy),
        card_last4: last_digits(b.card_last_digits),
        card_expiry: b.card_expiry_date.as_deref().and_then(Expiry::from_mmyy),
        par: par(b.par),
    })
}

/// `POST /merchant-gateways/{mgid}/merchants/{merchantId}/tokens/{tokenId}/notify-update`.
/// D1's token lifecycle notification; applied before answering `204`.
#[utoipa::path(post,
    path = "/merchant-gateways/{merchant_gateway_id}/merchants/{merchant_id}/tokens/{token_id}/notify-update",
    tag = "d1",
    security(("d1AccessToken" = [])),
    params(
        ("merchant_gateway_id" = String, Path, description = "Our merchant gateway id at D1"),
        ("merchant_id" = String, Path, description = "D1's merchant id"),
        ("token_id" = String, Path, description = "D1's token id"),
    ),
    request_body = NotifyBody,
    responses(
        (status = 204, description = "Applied (or recognised as a redelivery)"),
        codes::NotifyProblems,
    ))]
pub async fn notify_update(
    State(state): State<AppState>,
    _caller: D1Caller,
    Path((mgid, d1_merchant_id, d1_token_id)): Path<(String, String, String)>,
    Body(body): Body,
) -> Response {
    let notify = &state.notify;
    if mgid != notify.merchant_gateway_id {
        return ApiError::of(
            &codes::MERCHANT_GATEWAY_NOT_FOUND,
            "this gateway does not serve that merchantGatewayId",
        )
        .into_response();
    }
    if !valid_d1_id(&d1_merchant_id) || !valid_d1_id(&d1_token_id) {
        return ApiError::of(
            &codes::INVALID_PATH,
            "merchantId and tokenId must be 1 to 128 printable characters",
        )
        .into_response();
    }
    let parsed: NotifyBody = match parse_json(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let event = match to_event(d1_merchant_id, d1_token_id, parsed) {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    match notify.lifecycle.handle_notification(&event).await {
        Ok(outcome) => {
            tracing::debug!(event_id = %event.event_id, ?outcome, "notification handled");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => notification_error(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("a+b%20c%3D").as_deref(), Some("a b c="));
        assert_eq!(form_decode("%zz"), None);
        assert_eq!(form_decode("%4"), None);
        let p = parse_form(b"grant_type=client_credentials&scope=notify+x&flag").unwrap();
        assert_eq!(
            p,
            vec![
                ("grant_type".into(), "client_credentials".into()),
                ("scope".into(), "notify x".into()),
                ("flag".into(), String::new()),
            ]
        );
        assert!(parse_form(b"grant_type=a&grant_type=b").is_err());
    }

    #[test]
    fn basic_credentials_parse() {
        let mut h = HeaderMap::new();
        let v = format!("Basic {}", STANDARD.encode("id:se:cret"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&v).unwrap());
        let (id, secret) = basic_credentials(&h).unwrap();
        assert_eq!(id, "id");
        assert_eq!(secret.as_str(), "se:cret");
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(basic_credentials(&h).is_none());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert!(basic_credentials(&h).is_none());
    }

    #[test]
    fn body_validation() {
        let body = |ts: &str, id: &str| NotifyBody {
            event_id: id.into(),
            event_type: "STATUS_UPDATE".into(),
            timestamp: ts.into(),
            token_id: None,
            request_id: None,
            status: Some("FROZEN".into()),
            token_last_digits: Some("12345".into()),
            token_expiry_date: Some("1399".into()),
            card_last_digits: Some("4321".into()),
            card_expiry_date: Some("0931".into()),
            par: Some("bad par!".into()),
        };
        let ev = to_event(
            "m".into(),
            "t".into(),
            body("2026-11-23T12:00:00.123Z", "evt_1"),
        )
        .unwrap();
        assert_eq!(ev.status, Some(TokenStatus::Unknown("FROZEN".into())));
        // Unusable metadata is dropped, usable kept.
        assert_eq!(ev.token_last4, None);
        assert_eq!(ev.token_expiry, None);
        assert_eq!(ev.par, None);
        assert_eq!(ev.card_last4.as_deref(), Some("4321"));
        assert_eq!(ev.card_expiry, Expiry::trusted(9, 2031));
        assert!(to_event("m".into(), "t".into(), body("yesterday", "evt_1")).is_err());
        assert!(
            to_event(
                "m".into(),
                "t".into(),
                body("2026-11-23T12:00:00Z", "evt 1")
            )
            .is_err()
        );
        let mut other = body("2026-11-23T12:00:00Z", "evt_2");
        other.token_id = Some("other".into());
        assert!(to_event("m".into(), "t".into(), other).is_err());
        let mut lower = body("2026-11-23T12:00:00Z", "evt_3");
        lower.status = Some("active; drop".into());
        assert!(to_event("m".into(), "t".into(), lower).is_err());
    }
}
