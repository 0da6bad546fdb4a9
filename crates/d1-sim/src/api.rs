//! The simulated D1 API (`/authz/v1/...`), as docs/d1-protocol.md specifies it.
//!
//! Every route goes through [`gate`], the one middleware that plays a request's part as
//! infrastructure (counting, injected latency and faults, correlation id, bearer token, noise);
//! handlers only do the D1 business. [`ApiError`] is the one place errors become responses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zeroize::Zeroizing;

use super::context::{Shared, Stats};
use super::faults::{Injected, Op, TIMEOUT_HOLD};
use super::notify::EventType;
use super::state::{ACCESS_TOKEN_TTL, Action, CardInput, Created, StateError, TokenInfo};
use tokengate_cards::{Expiry, Pan};
use tokengate_d1_protocol::{jose, model};

/// Path prefix of the API, as in the real D1 base URL.
pub const BASE_PATH: &str = "/authz/v1";

/// The only grant type the token endpoint accepts.
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Longest assertion lifetime D1 accepts.
const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// A cryptogram is meant for one authorization right away.
const CRYPTOGRAM_VALIDITY: time::Duration = time::Duration::minutes(15);
/// Delay after which an asynchronous tokenization completes.
const ASYNC_COMPLETION: Duration = Duration::from_millis(100);

/// Marker in a response's extensions: the connection must be dropped instead of answering.
/// The connection layer (`server.rs`) acts on it.
#[derive(Debug, Clone, Copy)]
pub struct ResetConnection;

/// An error answer in D1's shape `{"errorCode", "errorMessage", "retryable"}`. Messages are
/// fixed text or field names, never request values, so no card data can be echoed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MissingField(String),
    #[error("{0}")]
    InvalidField(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    InvalidState(String),
    /// The issuer deleted the card at D1: nothing more can be done with it.
    #[error("the card is deleted")]
    CardDeleted,
    #[error("too many requests")]
    TooManyRequests { retry_after: u64 },
    #[error("internal error")]
    Internal,
    #[error("service unavailable")]
    Unavailable { retry_after: u64 },
}

impl ApiError {
    /// D1's `errorCode` and the message, for answers that carry errors per item (batches).
    pub fn code_and_message(&self) -> (&'static str, String) {
        (self.parts().1, self.to_string())
    }

    fn parts(&self) -> (StatusCode, &'static str, bool, Option<u64>) {
        match self {
            ApiError::MissingField(_) => (StatusCode::BAD_REQUEST, "MISSING_FIELD", false, None),
            ApiError::InvalidField(_) => (StatusCode::BAD_REQUEST, "INVALID_FIELD", false, None),
            ApiError::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "AUTHORIZER_UNAUTHORIZED",
                false,
                None,
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND", false, None),
            ApiError::InvalidState(_) => (StatusCode::CONFLICT, "INVALID_STATE", false, None),
            ApiError::CardDeleted => (StatusCode::BAD_REQUEST, "CARD_DELETED", false, None),
            ApiError::TooManyRequests { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_REQUESTS",
                true,
                Some(*retry_after),
            ),
            // Not flagged retryable: the outcome of a failed non-idempotent call is unknown.
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                false,
                None,
            ),
            ApiError::Unavailable { retry_after } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "SERVICE_UNAVAILABLE",
                true,
                Some(*retry_after),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, retryable, retry_after) = self.parts();
        let body = model::ErrorBody {
            error_code: Some(code.to_owned()),
            error_message: Some(self.to_string()),
            retryable: Some(retryable),
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::MerchantNotFound => ApiError::NotFound("unknown merchant"),
            StateError::TokenNotFound => ApiError::NotFound("unknown token"),
            StateError::InvalidState(_) => ApiError::InvalidState(e.to_string()),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

/// The D1 API router.
pub fn router(shared: Arc<Shared>) -> Router {
    let g = |op: Op| from_fn_with_state((shared.clone(), op), gate);
    let mgw = format!("{BASE_PATH}/merchant-gateways/{{mgid}}");
    let tokens = format!("{mgw}/merchants/{{merchant_id}}/tokens");
    let token = format!("{tokens}/{{token_id}}");
    Router::new()
        .route(
            &format!("{BASE_PATH}/oauth2/token"),
            post(oauth_token).route_layer(g(Op::Oauth)),
        )
        .route(
            &format!("{mgw}/merchants"),
            post(onboard_merchant).route_layer(g(Op::OnboardMerchant)),
        )
        .route(&tokens, post(create_token).route_layer(g(Op::CreateToken)))
        .route(&tokens, get(find_token).route_layer(g(Op::FindToken)))
        .route(&token, get(get_token).route_layer(g(Op::GetToken)))
        .route(&token, delete(delete_token).route_layer(g(Op::Delete)))
        .route(
            &format!("{token}/suspend"),
            post(suspend_token).route_layer(g(Op::Suspend)),
        )
        .route(
            &format!("{token}/resume"),
            post(resume_token).route_layer(g(Op::Resume)),
        )
        .route(
            &format!("{token}/transactions"),
            post(create_transaction).route_layer(g(Op::CreateTransaction)),
        )
        // The issuer side, under its own base path (`/banking/v1`).
        .merge(super::issuer::routes(shared.clone()))
        .merge(super::orders::routes(&shared))
        .fallback(|| async { ApiError::NotFound("no such resource") })
        .with_state(shared)
}

/// Infrastructure around every D1 operation, in the order a real edge applies it:
/// 1. count the request (stats show what the client really sent, faults included);
/// 2. injected latency, then the fault roll (reset, timeout, 429/500/503);
/// 3. `x-correlation-id` (D1 rejects a request without one before looking at it);
/// 4. the bearer token, on everything but the token endpoint;
/// 5. noise added to whatever the handler answered.
pub(crate) async fn gate(
    State((shared, op)): State<(Arc<Shared>, Op)>,
    req: Request,
    next: Next,
) -> Response {
    shared.stats.count_request(op);
    let faults = shared.faults();
    let delay = faults.latency_for(op);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let retry_after = faults.retry_after_seconds;
    let resp = match faults.roll(op) {
        Injected::Reset => return reset_response(),
        Injected::Timeout => {
            tokio::time::sleep(TIMEOUT_HOLD).await;
            return reset_response();
        }
        Injected::Status(429) => ApiError::TooManyRequests { retry_after }.into_response(),
        Injected::Status(503) => ApiError::Unavailable { retry_after }.into_response(),
        Injected::Status(_) => ApiError::Internal.into_response(),
        Injected::Serve => match check_request(&shared, op, req.headers()) {
            Ok(()) => next.run(req).await,
            Err(e) => e.into_response(),
        },
    };
    if faults.noise_for(op) {
        add_noise(resp).await
    } else {
        resp
    }
}

pub(crate) fn reset_response() -> Response {
    let mut resp = StatusCode::INTERNAL_SERVER_ERROR.into_response();
    resp.extensions_mut().insert(ResetConnection);
    resp
}

pub(crate) fn check_request(shared: &Shared, op: Op, headers: &HeaderMap) -> Result<(), ApiError> {
    let correlation = headers
        .get("x-correlation-id")
        .ok_or_else(|| ApiError::MissingField("x-correlation-id header is required".into()))?;
    if !valid_id(correlation.as_bytes()) {
        return Err(ApiError::InvalidField(
            "x-correlation-id must match ^[A-Za-z0-9_-]{1,64}$".into(),
        ));
    }
    if op == Op::Oauth {
        return Ok(());
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::Unauthorized("a bearer access token is required".into()))?;
    if !shared.store.access_token_valid(token.trim()) {
        return Err(ApiError::Unauthorized(
            "access token is unknown or expired".into(),
        ));
    }
    Ok(())
}

/// `^[A-Za-z0-9_-]{1,64}$`, the id pattern D1 uses for correlation and request ids.
fn valid_id(s: &[u8]) -> bool {
    (1..=64).contains(&s.len())
        && s.iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}

/// What `noise` adds: an unknown object-valued field on every JSON object answer, an unknown
/// enum value in a field this protocol version does not define (`tokenType` on token objects,
/// `cryptogramType` on transactions, `errorDetails` on errors), and an unknown header. Known
/// fields keep their values, so a client that ignores what it does not know behaves the same.
pub(crate) async fn add_noise(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return ApiError::Internal.into_response();
    };
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    map.insert(
        "futureField".into(),
        json!({"introducedIn": "v2", "values": [1, "two", null], "nested": {"flag": true}}),
    );
    if map.contains_key("tokenId") {
        map.insert("tokenType".into(), json!("NEW_KIND"));
    }
    if map.contains_key("cryptogramExpiryDate") {
        map.insert("cryptogramType".into(), json!("NEW_KIND"));
    }
    if map.contains_key("errorCode") {
        map.insert(
            "errorDetails".into(),
            json!([{"kind": "NEW_KIND", "hint": "unknown to this client"}]),
        );
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert("x-d1-future", HeaderValue::from_static("NEW_KIND"));
    Response::from_parts(parts, Body::from(Value::Object(map).to_string()))
}

/// Parses a JSON object body; anything else is `INVALID_FIELD`.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ApiError::InvalidField("body must be a JSON object".into())),
    }
}

/// A required string property.
fn required_str<'a>(map: &'a Map<String, Value>, name: &str) -> Result<&'a str, ApiError> {
    match map.get(name) {
        None | Some(Value::Null) => Err(ApiError::MissingField(format!("{name} is required"))),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::InvalidField(format!("{name} must be a string"))),
    }
}

fn check_mgid(shared: &Shared, mgid: &str) -> Result<(), ApiError> {
    if mgid == shared.merchant_gateway_id {
        Ok(())
    } else {
        Err(ApiError::NotFound("unknown merchant gateway"))
    }
}

/// A token object answer, written straight from the shared wire type (no `serde_json::Value`
/// tree built and walked on every call).
fn token_response(status: StatusCode, info: &TokenInfo) -> Response {
    (status, axum::Json(info.to_object())).into_response()
}

/// `POST /oauth2/token`: JWT-bearer grant with an ES256 assertion.
async fn oauth_token(State(shared): State<Arc<Shared>>, body: Bytes) -> ApiResult {
    let map = object(&body)?;
    let grant_type = required_str(&map, "grant_type")?;
    let assertion = required_str(&map, "assertion")?;
    if map.len() != 2 {
        return Err(ApiError::InvalidField(
            "body must contain only grant_type and assertion".into(),
        ));
    }
    if grant_type != JWT_BEARER {
        return Err(ApiError::InvalidField(format!(
            "grant_type must be {JWT_BEARER}"
        )));
    }
    let keys = &shared.keys.es256;
    let claims = jose::verify_assertion(
        assertion,
        &|kid| keys.get(kid).copied(),
        MAX_ASSERTION_LIFETIME,
    )
    .map_err(|e| {
        tracing::debug!(error = %e, "assertion rejected");
        ApiError::Unauthorized(format!("assertion rejected: {e}"))
    })?;
    // Every registered key belongs to our merchant gateway, so the key proves the issuer only
    // if the assertion claims to be it.
    if claims.iss != shared.merchant_gateway_id || claims.sub != claims.iss {
        return Err(ApiError::Unauthorized(
            "assertion iss/sub is not the merchant gateway of this key".into(),
        ));
    }
    // The audience is the API base; its host is not compared, since the gateway may reach the
    // simulator under any name (127.0.0.1, localhost, a container name).
    if !audience_path_ok(&claims.aud) {
        return Err(ApiError::Unauthorized(format!(
            "assertion aud must be the API base URL ending in {BASE_PATH}"
        )));
    }
    let token = shared.store.issue_access_token();
    Stats::bump(&shared.stats.oauth_tokens_issued);
    let mut resp = (
        StatusCode::OK,
        axum::Json(model::OAuthTokenResponse {
            access_token: token,
            expires_in: ACCESS_TOKEN_TTL.as_secs(),
            token_type: Some("Bearer".into()),
        }),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

fn audience_path_ok(aud: &str) -> bool {
    let rest = aud
        .strip_prefix("https://")
        .or_else(|| aud.strip_prefix("http://"));
    let Some(rest) = rest else { return false };
    let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("");
    path.trim_end_matches('/') == BASE_PATH
}

/// `POST /merchant-gateways/{mgid}/merchants`.
async fn onboard_merchant(
    State(shared): State<Arc<Shared>>,
    Path(mgid): Path<String>,
    body: Bytes,
) -> ApiResult {
    check_mgid(&shared, &mgid)?;
    let map = object(&body)?;
    let name = required_str(&map, "merchantName")?;
    if name.trim().is_empty() || name.len() > 256 {
        return Err(ApiError::InvalidField(
            "merchantName must have 1 to 256 characters".into(),
        ));
    }
    let id = shared.store.add_merchant(name);
    tracing::info!(merchant_id = %id, "merchant onboarded");
    Ok((
        StatusCode::CREATED,
        axum::Json(model::OnboardMerchantResponse { merchant_id: id }),
    )
        .into_response())
}

/// The decrypted card data of `encryptedData`. `Pan` parses (length, digits, Luhn) and wipes
/// itself; `exp` is not secret.
#[derive(Deserialize)]
struct CardPlaintext {
    pan: Pan,
    exp: String,
}

/// The create-token body when it is a JSON object with the three fields as strings (other
/// fields ignored, as the general path does), borrowed from the request: no map of owned keys
/// and values, no copy of the JWE, on the hot path of every new card.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateTokenBody<'a> {
    #[serde(borrow)]
    request_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    usage: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    encrypted_data: std::borrow::Cow<'a, str>,
}

impl<'a> CreateTokenBody<'a> {
    /// `None` for anything [`object`] + [`required_str`] would not accept as is, so that path
    /// answers it: serde would also take a JSON array for a struct, hence the `{` check;
    /// a duplicate field or a `null` fails here and is judged there.
    fn parse(body: &'a [u8]) -> Option<CreateTokenBody<'a>> {
        if body.trim_ascii_start().first() != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(body).ok()
    }
}

/// `POST .../merchants/{merchantId}/tokens`.
async fn create_token(
    State(shared): State<Arc<Shared>>,
    Path((mgid, merchant_id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    check_mgid(&shared, &mgid)?;
    if !shared.store.has_merchant(&merchant_id) {
        return Err(ApiError::NotFound("unknown merchant"));
    }
    // A well-formed body is read straight into borrowed fields; anything else takes the
    // general path, which gives the precise error.
    let typed = CreateTokenBody::parse(&body);
    let map;
    let (request_id, usage, encrypted) = if let Some(b) = &typed {
        (&*b.request_id, &*b.usage, &*b.encrypted_data)
    } else {
        map = object(&body)?;
        (
            required_str(&map, "requestId")?,
            required_str(&map, "usage")?,
            required_str(&map, "encryptedData")?,
        )
    };
    if !valid_id(request_id.as_bytes()) {
        return Err(ApiError::InvalidField(
            "requestId must match ^[A-Za-z0-9_-]{1,64}$".into(),
        ));
    }
    if !matches!(usage, "CARD_ON_FILE" | "ONE_OFF" | "RECURRING") {
        return Err(ApiError::InvalidField(
            "usage must be CARD_ON_FILE, ONE_OFF or RECURRING".into(),
        ));
    }
    // A retry returns the token the first request made, before the card is even looked at:
    // that is what makes a retry after a lost response safe.
    if let Some(existing) = shared.store.find_by_request(&merchant_id, request_id) {
        return Ok(token_response(StatusCode::OK, &existing));
    }
    let card = decrypt_card(&shared, encrypted)?;
    let pending = shared.faults().async_tokenization;
    let created = shared
        .store
        .create_token(&merchant_id, request_id, &card, pending)?;
    let info = match created {
        Created::Existing(info) => return Ok(token_response(StatusCode::OK, &info)),
        Created::New(info) => info,
    };
    Stats::bump(&shared.stats.tokens_created);
    tracing::info!(token_id = %info.token_id, merchant_id = %merchant_id, pending, "token created");
    if !pending {
        return Ok(token_response(StatusCode::CREATED, &info));
    }
    let (task_shared, token_id) = (shared.clone(), info.token_id.clone());
    tokio::spawn(async move {
        tokio::time::sleep(ASYNC_COMPLETION).await;
        if let Some(done) = task_shared.store.complete_pending(&token_id) {
            task_shared
                .notifier
                .emit(EventType::TokenCreated, &merchant_id, &done, None);
        }
    });
    Ok(token_response(StatusCode::ACCEPTED, &info))
}

fn decrypt_card(shared: &Shared, compact: &str) -> Result<CardInput, ApiError> {
    let keys = &shared.keys.jwe;
    let (_kid, plaintext) = jose::jwe_decrypt_with(compact, &|kid| keys.get(kid))
        .map_err(|e| ApiError::InvalidField(format!("encryptedData: {e}")))?;
    // The serde error text is not passed on: it could quote part of the plaintext.
    let card: CardPlaintext = serde_json::from_slice(&plaintext).map_err(|_| {
        ApiError::InvalidField(
            "encryptedData must hold {\"pan\", \"exp\"} with a valid card number".into(),
        )
    })?;
    let expiry = Expiry::from_mmyy(&card.exp)
        .ok_or_else(|| ApiError::InvalidField("encryptedData exp must be MMYY".into()))?;
    if !expiry.is_current(OffsetDateTime::now_utc()) {
        return Err(ApiError::InvalidField("the card is expired".into()));
    }
    Ok(CardInput {
        pan: card.pan,
        expiry,
    })
}

/// `GET .../tokens?requestId=...`.
async fn find_token(
    State(shared): State<Arc<Shared>>,
    Path((mgid, merchant_id)): Path<(String, String)>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult {
    check_mgid(&shared, &mgid)?;
    if !shared.store.has_merchant(&merchant_id) {
        return Err(ApiError::NotFound("unknown merchant"));
    }
    let Query(query) =
        query.map_err(|_| ApiError::InvalidField("query string is malformed".into()))?;
    let request_id = query
        .get("requestId")
        .ok_or_else(|| ApiError::MissingField("requestId is required".into()))?;
    let info = shared
        .store
        .find_by_request(&merchant_id, request_id)
        .ok_or(ApiError::NotFound("no token for this requestId"))?;
    Ok(token_response(StatusCode::OK, &info))
}

/// `GET .../tokens/{tokenId}`.
async fn get_token(
    State(shared): State<Arc<Shared>>,
    Path((mgid, merchant_id, token_id)): Path<(String, String, String)>,
) -> ApiResult {
    check_mgid(&shared, &mgid)?;
    let info = shared
        .store
        .get(Some(&merchant_id), &token_id)
        .ok_or(ApiError::NotFound("unknown token"))?;
    Ok(token_response(StatusCode::OK, &info))
}

/// Suspend, resume and delete share everything but the action.
fn lifecycle(
    shared: &Shared,
    mgid: &str,
    merchant_id: &str,
    token_id: &str,
    body: &[u8],
    action: Action,
) -> ApiResult {
    check_mgid(shared, mgid)?;
    // The body is optional (`{"reason": "..."}`), but if present it must be a JSON object.
    if !body.iter().all(u8::is_ascii_whitespace) {
        let map = object(body)?;
        if let Some(reason) = map.get("reason")
            && !reason.is_string()
        {
            return Err(ApiError::InvalidField("reason must be a string".into()));
        }
    }
    let info = shared.store.apply(Some(merchant_id), token_id, &action)?;
    tracing::info!(token_id = %token_id, status = ?info.status, "token lifecycle");
    Ok(token_response(StatusCode::OK, &info))
}

async fn suspend_token(
    State(shared): State<Arc<Shared>>,
    Path((mgid, merchant_id, token_id)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult {
    lifecycle(
        &shared,
        &mgid,
        &merchant_id,
        &token_id,
        &body,
        Action::Suspend,
    )
}

async fn resume_token(
    State(shared): State<Arc<Shared>>,
    Path((mgid, merchant_id, token_id)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult {
    lifecycle(
        &shared,
        &mgid,
        &merchant_id,
        &token_id,
        &body,
        Action::Resume,
    )
}

async fn delete_token(
    State(shared): State<Arc<Shared>>,
    Path((mgid, merchant_id, token_id)): Path<(String, String, String)>,
) -> ApiResult {
    lifecycle(&shared, &mgid, &merchant_id, &token_id, b"", Action::Delete)
}

/// `POST .../tokens/{tokenId}/transactions`: a fresh cryptogram, encrypted to the gateway.
/// ECI `05` for a customer-initiated transaction (the cardholder is present in the session),
/// `07` for a merchant-initiated one.
async fn create_transaction(
    State(shared): State<Arc<Shared>>,
    Path((mgid, merchant_id, token_id)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult {
    check_mgid(&shared, &mgid)?;
    let map = object(&body)?;
    let eci = match required_str(&map, "transactionType")? {
        "CIT" => "05",
        "MIT" => "07",
        _ => {
            return Err(ApiError::InvalidField(
                "transactionType must be CIT or MIT".into(),
            ));
        }
    };
    if let Some(amount) = map.get("amount") {
        check_amount(amount)?;
    }
    let (mut number, expiry) = shared.store.credentials(&merchant_id, &token_id)?;
    let mut cryptogram = Zeroizing::new([0u8; 20]);
    rand::fill(&mut cryptogram[..]);
    let plaintext = model::CryptogramPlaintext {
        // Moved, not copied: the plaintext struct wipes it when dropped.
        token_number: std::mem::take(&mut *number),
        token_expiry_date: expiry,
        cryptogram: STANDARD.encode(&cryptogram[..]),
    }
    .to_zeroizing_json()
    .map_err(|_| ApiError::Internal)?;
    let keys = &shared.keys;
    let encrypted = jose::jwe_encrypt(&plaintext, &keys.gateway_jwe, &keys.gateway_jwe_kid)
        .map_err(|e| {
            tracing::error!(error = %e, "cryptogram encryption failed");
            ApiError::Internal
        })?;
    let expires = (OffsetDateTime::now_utc() + CRYPTOGRAM_VALIDITY)
        .format(&Rfc3339)
        .map_err(|_| ApiError::Internal)?;
    tracing::info!(token_id = %token_id, eci, "cryptogram issued");
    Ok((
        StatusCode::CREATED,
        axum::Json(model::TransactionResponse {
            encrypted_data: encrypted,
            eci: eci.to_owned(),
            cryptogram_expiry_date: Some(expires),
        }),
    )
        .into_response())
}

/// `{"value": <minor units>, "currency": "EUR"}`.
fn check_amount(amount: &Value) -> Result<(), ApiError> {
    let ok = amount.get("value").is_some_and(Value::is_u64)
        && amount
            .get("currency")
            .and_then(Value::as_str)
            .is_some_and(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()));
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidField(
            "amount must be {\"value\": <non-negative integer>, \"currency\": <ISO 4217 code>}"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_audience() {
        assert!(valid_id(b"abc_DEF-123"));
        assert!(!valid_id(b""));
        assert!(!valid_id(&[b'a'; 65]));
        assert!(!valid_id(b"a b"));
        assert!(audience_path_ok("https://127.0.0.1:8443/authz/v1"));
        assert!(audience_path_ok(
            "https://api.d1-stg.thalescloud.io/authz/v1/"
        ));
        assert!(!audience_path_ok(
            "https://127.0.0.1:8443/authz/v1/oauth2/token"
        ));
        assert!(!audience_path_ok("mgid"));
    }

    #[test]
    fn error_shape() {
        let (status, code, retryable, retry_after) =
            ApiError::Unavailable { retry_after: 3 }.parts();
        assert_eq!(
            (status, code, retryable, retry_after),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "SERVICE_UNAVAILABLE",
                true,
                Some(3)
            )
        );
        let resp = ApiError::TooManyRequests { retry_after: 2 }.into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
    }

    /// The typed create-token body takes exactly the bodies the general path reads as three
    /// strings, and leaves every other one to it.
    #[test]
    fn create_token_body_fast_path_agrees_with_the_general_path() {
        let general = |b: &[u8]| -> Option<(String, String, String)> {
            let map = object(b).ok()?;
            Some((
                required_str(&map, "requestId").ok()?.to_owned(),
                required_str(&map, "usage").ok()?.to_owned(),
                required_str(&map, "encryptedData").ok()?.to_owned(),
            ))
        };
        let bodies: [&[u8]; 9] = [
            br#"{"requestId":"r1","usage":"ONE_OFF","encryptedData":"a.b.c.d.e"}"#,
            br#" {"usage":"ONE_OFF","encryptedData":"x","requestId":"r1","extra":[1]}"#,
            br#"["r1","ONE_OFF","x"]"#,
            br#"{"requestId":null,"usage":"ONE_OFF","encryptedData":"x"}"#,
            br#"{"requestId":1,"usage":"ONE_OFF","encryptedData":"x"}"#,
            br#"{"usage":"ONE_OFF","encryptedData":"x"}"#,
            br#"{"requestId":"a","requestId":"b","usage":"ONE_OFF","encryptedData":"x"}"#,
            br#"{"requestId":"r1","usage":"ONE_OFF","encryptedData":"x"} x"#,
            b"",
        ];
        for b in bodies {
            if let Some(t) = CreateTokenBody::parse(b) {
                let fast = (
                    t.request_id.into_owned(),
                    t.usage.into_owned(),
                    t.encrypted_data.into_owned(),
                );
                assert_eq!(Some(fast), general(b), "{}", String::from_utf8_lossy(b));
            }
        }
        assert!(CreateTokenBody::parse(bodies[0]).is_some());
        assert!(CreateTokenBody::parse(bodies[1]).is_some());
        assert!(CreateTokenBody::parse(bodies[2]).is_none());
    }

    /// The card plaintext the client writes (the shared `model::CardPlaintext`) is what the
    /// simulator reads: the two sides cannot disagree on its field names.
    #[test]
    fn the_clients_card_plaintext_decodes_here() {
        let json = model::CardPlaintext {
            pan: "4111111111111111",
            exp: "1230",
        }
        .to_zeroizing_json()
        .expect("serializes");
        let card: CardPlaintext = serde_json::from_slice(&json).expect("decodes");
        assert_eq!(card.exp, "1230");
        assert_eq!(card.pan.last4(), "1111");
    }
}
