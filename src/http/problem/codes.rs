//! The catalogue of every problem the API answers: each code declared once, with its status,
//! title and meaning. Handlers build errors from these constants ([`super::ApiError::of`]), and
//! each route's OpenAPI problem responses are derived from the sets at the bottom of this file
//! ([`responses`]), so the documented codes and the answered ones come from the same place.
//! `tests/it/openapi.rs` checks every problem answer seen in the suite against its route.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use utoipa::openapi::extensions::ExtensionsBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};

/// One problem the API can answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Problem {
    pub status: StatusCode,
    /// Stable machine-readable code (`code` and the `type` URN of the body).
    pub code: &'static str,
    /// The body's `title`: a short summary of the status.
    pub title: &'static str,
    /// What it means for the client, in the OpenAPI document.
    pub about: &'static str,
}

/// The body's `title` for a status.
const fn title(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "Bad request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not found",
        405 => "Method not allowed",
        409 => "Conflict",
        413 => "Payload too large",
        415 => "Unsupported media type",
        422 => "Unprocessable request",
        429 => "Too many requests",
        500 => "Internal error",
        502 => "Bad gateway",
        503 => "Service unavailable",
        504 => "Gateway timeout",
        _ => "Error",
    }
}

macro_rules! catalogue {
    ($( $name:ident = $status:ident $code:literal $about:literal; )*) => {
        $(
            #[doc = $about]
            pub const $name: Problem = Problem {
                status: StatusCode::$status,
                code: $code,
                title: title(StatusCode::$status),
                about: $about,
            };
        )*
        /// Every problem of the catalogue.
        pub const ALL: &[&Problem] = &[$(&$name),*];
    };
}

catalogue! {
    // --- request shape (400, 413, 415) --------------------------------------------------------
    MALFORMED_JSON = BAD_REQUEST "malformed_json" "the body is not valid JSON";
    BODY_MISSING = BAD_REQUEST "body_missing" "a JSON request body is required";
    BODY_UNREADABLE = BAD_REQUEST "body_unreadable" "the request body could not be read";
    INVALID_FIELD = BAD_REQUEST "invalid_field" "a field has the wrong type or format (the detail names it, never its value)";
    MISSING_FIELD = BAD_REQUEST "missing_field" "a required field is missing (the detail names it)";
    INVALID_QUERY = BAD_REQUEST "invalid_query" "the query parameters are wrong: an unknown or repeated parameter, a required one missing (`customerReference`), `limit` outside 1 to 100, an unknown `status` (the detail says which)";
    INVALID_PATH = BAD_REQUEST "invalid_path" "an id in the path is malformed";
    INVALID_IDEMPOTENCY_KEY = BAD_REQUEST "invalid_idempotency_key" "`Idempotency-Key` must be 1 to 255 printable ASCII characters without spaces";
    TOKEN_ID_MISMATCH = BAD_REQUEST "token_id_mismatch" "`tokenId` in the body differs from the one in the path";
    WEBHOOK_URL_FORBIDDEN = BAD_REQUEST "webhook_url_forbidden" "the URL's host is, or resolves to, an address webhooks may not be sent to (loopback, private, link-local, ...; docs/webhooks.md)";
    BODY_TOO_LARGE = PAYLOAD_TOO_LARGE "body_too_large" "the request body exceeds `server.body_limit_bytes`";
    UNSUPPORTED_MEDIA_TYPE = UNSUPPORTED_MEDIA_TYPE "unsupported_media_type" "send the body as `application/json`";
    // --- authentication and authorization (401, 403, 429) -------------------------------------
    UNAUTHORIZED = UNAUTHORIZED "unauthorized" "missing, malformed or unknown credentials";
    INSUFFICIENT_SCOPE = FORBIDDEN "insufficient_scope" "the API key is valid but lacks the scope this route needs";
    CLIENT_CERT_MISMATCH = FORBIDDEN "client_cert_mismatch" "the connection's client certificate is bound to another tenant (merchant or issuer) than the API key";
    CLIENT_CERT_REQUIRED = FORBIDDEN "client_cert_required" "this merchant or issuer requires one of its client certificates (mutual TLS) on every request";
    RATE_LIMITED = TOO_MANY_REQUESTS "rate_limited" "the API key's or the merchant's request rate limit is exceeded (with `Retry-After`)";
    // --- resources (404) ----------------------------------------------------------------------
    ROUTE_NOT_FOUND = NOT_FOUND "route_not_found" "no such route";
    TOKEN_NOT_FOUND = NOT_FOUND "token_not_found" "no such token for this merchant (a malformed id answers the same)";
    MERCHANT_NOT_FOUND = NOT_FOUND "merchant_not_found" "no such merchant";
    API_KEY_NOT_FOUND = NOT_FOUND "api_key_not_found" "no such API key for this merchant";
    WEBHOOK_ENDPOINT_NOT_FOUND = NOT_FOUND "webhook_endpoint_not_found" "no such webhook endpoint for this merchant";
    EVENT_NOT_FOUND = NOT_FOUND "event_not_found" "no such event for this merchant";
    RECURRING_AGREEMENT_NOT_FOUND = NOT_FOUND "recurring_agreement_not_found" "the token has no recurring agreement recorded (never recorded, ended, or the token was deleted)";
    MERCHANT_GATEWAY_NOT_FOUND = NOT_FOUND "merchant_gateway_not_found" "this gateway does not serve that `merchantGatewayId`";
    ISSUER_NOT_FOUND = NOT_FOUND "issuer_not_found" "no such issuer (D1 notifications: no issuer is onboarded with that D1 issuer id)";
    PRODUCTION_ORDER_NOT_FOUND = NOT_FOUND "production_order_not_found" "this card was never ordered by this issuer (a malformed card id answers the same)";
    ISSUER_CARD_NOT_FOUND = NOT_FOUND "issuer_card_not_found" "the gateway knows no such card for this issuer: no operation, order or D1 notification named it";
    OPERATION_NOT_FOUND = NOT_FOUND "operation_not_found" "no such operation for this issuer (a malformed id answers the same)";
    METHOD_NOT_ALLOWED = METHOD_NOT_ALLOWED "method_not_allowed" "this route does not support this HTTP method";
    // --- state conflicts (409) ----------------------------------------------------------------
    CONCURRENT_UPDATE = CONFLICT "concurrent_update" "the token was changed concurrently; retry the request";
    TOKEN_DELETED = CONFLICT "token_deleted" "the token is deleted";
    CARD_DELETED = CONFLICT "card_deleted" "the issuer's card is deleted at D1 (which also opted it out of Click to Pay); it cannot be enrolled or deleted again";
    TOKEN_SUSPENDED = CONFLICT "token_suspended" "the token is suspended";
    TOKEN_PENDING = CONFLICT "token_pending" "the token is not active yet (tokenization still pending at D1)";
    TOKEN_NOT_ACTIVE = CONFLICT "token_not_active" "the token's status does not allow this operation";
    IDEMPOTENCY_IN_FLIGHT = CONFLICT "idempotency_in_flight" "a request with this `Idempotency-Key` is still being processed";
    IDEMPOTENCY_REPLY_UNAVAILABLE = CONFLICT "idempotency_reply_unavailable" "this request was processed, but its answer can no longer be replayed; do not retry with this key";
    TOO_MANY_WEBHOOK_ENDPOINTS = CONFLICT "too_many_webhook_endpoints" "the merchant has the most webhook endpoints allowed; delete one first";
    EVENT_NOT_REDELIVERABLE = CONFLICT "event_not_redeliverable" "every delivery of this event is still queued or retrying, or its endpoints were deleted";
    CLIENT_CERT_IN_USE = CONFLICT "client_cert_in_use" "the certificate is bound to another merchant or issuer; unbind it there first";
    ISSUER_REQUEST_ID_IN_USE = CONFLICT "issuer_request_id_in_use" "this `issuerRequestId` was already used for another card or operation of this issuer";
    D1_ISSUER_ID_TAKEN = CONFLICT "d1_issuer_id_taken" "another issuer is onboarded with this `d1IssuerId`";
    D1_REJECTED_CONFLICT = CONFLICT "d1_rejected" "D1 refused the request as conflicting with the token's state (D1's `errorCode` in the detail)";
    // --- validation (422) ---------------------------------------------------------------------
    IDEMPOTENCY_KEY_REUSED = UNPROCESSABLE_ENTITY "idempotency_key_reused" "this `Idempotency-Key` was used with a different request";
    INVALID_CARD_NUMBER = UNPROCESSABLE_ENTITY "invalid_card_number" "the card number is not 12 to 19 digits (spaces and dashes allowed as separators)";
    INVALID_CARD_NUMBER_LUHN = UNPROCESSABLE_ENTITY "invalid_card_number_luhn" "the card number fails the Luhn check";
    INVALID_EXPIRY = UNPROCESSABLE_ENTITY "invalid_expiry" "the expiry month or year is not plausible";
    CARD_EXPIRED = UNPROCESSABLE_ENTITY "card_expired" "the card is expired";
    INVALID_CUSTOMER_REFERENCE = UNPROCESSABLE_ENTITY "invalid_customer_reference" "`customerReference` is too long or has characters outside the allowed set";
    INVALID_AMOUNT = UNPROCESSABLE_ENTITY "invalid_amount" "`amount` needs a positive `value` and an ISO 4217 `currency`";
    INVALID_NETWORK_TRANSACTION_ID = UNPROCESSABLE_ENTITY "invalid_network_transaction_id" "`networkTransactionId` must be 1 to 64 characters of `A-Z`, `a-z`, `0-9`, `.`, `_`, `:`, `-`";
    INVALID_AGREEMENT_REFERENCE = UNPROCESSABLE_ENTITY "invalid_agreement_reference" "`agreementReference` must be 1 to 64 printable characters";
    INVALID_FREQUENCY = UNPROCESSABLE_ENTITY "invalid_frequency" "`frequency` is not one of `DAILY`, `WEEKLY`, `MONTHLY`, `QUARTERLY`, `YEARLY`, `UNSCHEDULED`";
    INVALID_INITIAL_TRANSACTION_AT = UNPROCESSABLE_ENTITY "invalid_initial_transaction_at" "`initialTransactionAt` must be an RFC 3339 time from the year 2000 on, not in the future";
    INVALID_MERCHANT_NAME = UNPROCESSABLE_ENTITY "invalid_merchant_name" "the merchant name is empty or too long";
    INVALID_KEY_NAME = UNPROCESSABLE_ENTITY "invalid_key_name" "the API key name is empty or too long";
    INVALID_SCOPES = UNPROCESSABLE_ENTITY "invalid_scopes" "give at least one known scope";
    TOO_MANY_API_KEYS = UNPROCESSABLE_ENTITY "too_many_api_keys" "the merchant has the most active API keys allowed; revoke one first";
    INVALID_CURSOR = UNPROCESSABLE_ENTITY "invalid_cursor" "the `cursor` is not one this list returned";
    INVALID_WEBHOOK_URL = UNPROCESSABLE_ENTITY "invalid_webhook_url" "the webhook URL is not an absolute https URL of at most 2,048 characters";
    INSECURE_WEBHOOK_URL = UNPROCESSABLE_ENTITY "insecure_webhook_url" "the webhook URL must use https outside sandbox mode";
    INVALID_EVENT_TYPES = UNPROCESSABLE_ENTITY "invalid_event_types" "give at least one known event type";
    INVALID_ROTATION_OVERLAP = UNPROCESSABLE_ENTITY "invalid_rotation_overlap" "`overlapSeconds` must be 0 to 604,800 (7 days)";
    INVALID_CLIENT_CERT_FINGERPRINT = UNPROCESSABLE_ENTITY "invalid_client_cert_fingerprint" "a certificate's `sha256` is not 64 hex digits";
    INVALID_CLIENT_CERT_NAME = UNPROCESSABLE_ENTITY "invalid_client_cert_name" "a certificate's name is empty or too long";
    DUPLICATE_CLIENT_CERT = UNPROCESSABLE_ENTITY "duplicate_client_cert" "the same certificate is listed twice";
    TOO_MANY_CLIENT_CERTS = UNPROCESSABLE_ENTITY "too_many_client_certs" "more certificates than a merchant may bind";
    CLIENT_CERT_NEEDED = UNPROCESSABLE_ENTITY "client_cert_needed" "this mode needs at least one certificate";
    INVALID_AUTH_MODE = UNPROCESSABLE_ENTITY "invalid_auth_mode" "an issuer's `authMode` is `API_KEY` or `API_KEY_AND_CERT` (`CERT` is for merchants)";
    INVALID_ISSUER_NAME = UNPROCESSABLE_ENTITY "invalid_issuer_name" "the issuer name is empty or too long";
    INVALID_D1_ISSUER_ID = UNPROCESSABLE_ENTITY "invalid_d1_issuer_id" "`d1IssuerId` must be exactly 10 characters of `A-Z`, `a-z`, `0-9`, `-`, `_`";
    INVALID_CARD_ID = UNPROCESSABLE_ENTITY "invalid_card_id" "`cardId` must match `^[A-Za-z0-9_-]{1,48}$` (D1's pattern)";
    INVALID_CONSUMER_ID = UNPROCESSABLE_ENTITY "invalid_consumer_id" "`consumerId` must match `^[A-Za-z0-9_-]{1,64}$`";
    INVALID_CARDHOLDER_NAME = UNPROCESSABLE_ENTITY "invalid_cardholder_name" "`cardholderName` must be 1 to 26 printable characters";
    INVALID_REASON = UNPROCESSABLE_ENTITY "invalid_reason" "`reason` must match `^[a-zA-Z0-9 ]{1,64}$` (D1's pattern)";
    INVALID_ISSUER_REQUEST_ID = UNPROCESSABLE_ENTITY "invalid_issuer_request_id" "`issuerRequestId` must match `^[A-Za-z0-9_-]{1,64}$`";
    INVALID_REASON_CODE = UNPROCESSABLE_ENTITY "invalid_reason_code" "`reasonCode` must be 1 to 64 characters of `A-Z` and `_` (e.g. `ISSUER_DECISION`, `USER_DECISION`)";
    INVALID_BATCH_SIZE = UNPROCESSABLE_ENTITY "invalid_batch_size" "a batch order carries 1 to 1,000 cards";
    DUPLICATE_ISSUER_REQUEST_ID = UNPROCESSABLE_ENTITY "duplicate_issuer_request_id" "the same `issuerRequestId` appears twice in one batch";
    INVALID_PRODUCTION_ORDER = UNPROCESSABLE_ENTITY "invalid_production_order" "a physical card order's options break a rule of its `distributionChannel` (shipment, delivery type, issuance location) or a field's format";
    D1_REJECTED = UNPROCESSABLE_ENTITY "d1_rejected" "D1 refused the request (D1's `errorCode` in the detail)";
    // --- the gateway and its dependencies (500, 502, 503, 504) --------------------------------
    INTERNAL_ERROR = INTERNAL_SERVER_ERROR "internal_error" "an unexpected error; it has been logged";
    D1_NOT_FOUND = BAD_GATEWAY "d1_not_found" "D1 does not know this token";
    D1_BAD_RESPONSE = BAD_GATEWAY "d1_bad_response" "D1 answered with an error or something unreadable";
    OVERLOADED = SERVICE_UNAVAILABLE "overloaded" "the gateway is at its concurrency limit; retry shortly";
    REQUEST_TIMEOUT = SERVICE_UNAVAILABLE "request_timeout" "the request did not complete within the gateway's time budget";
    STORE_UNAVAILABLE = SERVICE_UNAVAILABLE "store_unavailable" "the token store is unavailable; retry later (with `Retry-After`)";
    D1_UNAVAILABLE = SERVICE_UNAVAILABLE "d1_unavailable" "D1 is unavailable or overloaded, or the circuit breaker is open; retry later (with `Retry-After`)";
    D1_NOT_CONFIGURED = SERVICE_UNAVAILABLE "d1_not_configured" "no network token service is configured in this deployment";
    WEBHOOKS_UNAVAILABLE = SERVICE_UNAVAILABLE "webhooks_unavailable" "webhooks are not configured in this deployment";
    WALLET_INDEX_BUILDING = SERVICE_UNAVAILABLE "wallet_index_building" "`DELETE /v1/tokens?customerReference=`: the gateway is still indexing tokens stored before customer wallets existed, so it cannot yet find all of the customer's tokens; nothing was deleted, retry later (with `Retry-After`)";
    NOTIFICATION_NOT_APPLIED = SERVICE_UNAVAILABLE "notification_not_applied" "the notification could not be applied now; redeliver it (with `Retry-After`)";
    D1_TIMEOUT = GATEWAY_TIMEOUT "d1_timeout" "D1 did not answer in time; retrying is safe";
}

/// The catalogue entry for `code` at `status`, for codes that come from the domain as strings
/// (validation codes, card errors).
pub fn find(status: StatusCode, code: &str) -> Option<&'static Problem> {
    ALL.iter()
        .copied()
        .find(|p| p.status == status && p.code == code)
}

// --- groups several routes share ------------------------------------------------------------

/// What the middleware stack can answer on any route.
pub const ANY_ROUTE: &[&Problem] = &[&OVERLOADED, &REQUEST_TIMEOUT, &INTERNAL_ERROR];
/// Merchant authentication (API key, client certificate, rate limit, scope).
pub const MERCHANT_AUTH: &[&Problem] = &[
    &UNAUTHORIZED,
    &INSUFFICIENT_SCOPE,
    &CLIENT_CERT_MISMATCH,
    &CLIENT_CERT_REQUIRED,
    &RATE_LIMITED,
    &STORE_UNAVAILABLE,
];
/// Issuer authentication (API key, client certificate, rate limit, scope).
pub const ISSUER_AUTH: &[&Problem] = &[
    &UNAUTHORIZED,
    &INSUFFICIENT_SCOPE,
    &CLIENT_CERT_MISMATCH,
    &CLIENT_CERT_REQUIRED,
    &RATE_LIMITED,
    &STORE_UNAVAILABLE,
];
/// The admin token.
pub const ADMIN_AUTH: &[&Problem] = &[&UNAUTHORIZED];
/// A JSON request body.
pub const JSON_BODY: &[&Problem] = &[
    &MALFORMED_JSON,
    &BODY_MISSING,
    &BODY_UNREADABLE,
    &INVALID_FIELD,
    &MISSING_FIELD,
    &BODY_TOO_LARGE,
    &UNSUPPORTED_MEDIA_TYPE,
];
/// A POST that honours `Idempotency-Key`.
pub const IDEMPOTENT: &[&Problem] = &[
    &INVALID_IDEMPOTENCY_KEY,
    &IDEMPOTENCY_IN_FLIGHT,
    &IDEMPOTENCY_REPLY_UNAVAILABLE,
    &IDEMPOTENCY_KEY_REUSED,
];
/// A call to D1.
pub const D1_CALL: &[&Problem] = &[
    &D1_REJECTED,
    &D1_REJECTED_CONFLICT,
    &D1_NOT_FOUND,
    &D1_BAD_RESPONSE,
    &D1_UNAVAILABLE,
    &D1_NOT_CONFIGURED,
    &D1_TIMEOUT,
];
/// An operation on an existing token.
pub const TOKEN_STATE: &[&Problem] = &[
    &TOKEN_NOT_FOUND,
    &TOKEN_DELETED,
    &TOKEN_SUSPENDED,
    &TOKEN_PENDING,
    &TOKEN_NOT_ACTIVE,
    &CONCURRENT_UPDATE,
];
/// A cursor-paginated list.
pub const PAGINATED: &[&Problem] = &[&INVALID_QUERY, &INVALID_CURSOR];
/// The card fields of a request.
pub const CARD: &[&Problem] = &[
    &INVALID_CARD_NUMBER,
    &INVALID_CARD_NUMBER_LUHN,
    &INVALID_EXPIRY,
    &CARD_EXPIRED,
];

/// The problem responses of one operation, grouped by status: one response per status whose
/// description lists its codes and whose `x-problem-codes` extension lists them for tools (and
/// for the tests that compare answers with the document). 429 and 503 document `Retry-After`.
pub fn responses(sets: &[&[&Problem]]) -> BTreeMap<String, RefOr<Response>> {
    let mut by_status: BTreeMap<u16, Vec<&Problem>> = BTreeMap::new();
    for p in sets.iter().flat_map(|s| s.iter().copied()) {
        let list = by_status.entry(p.status.as_u16()).or_default();
        if !list.iter().any(|q| q.code == p.code) {
            list.push(p);
        }
    }
    by_status
        .into_iter()
        .map(|(status, problems)| {
            let description = problems
                .iter()
                .map(|p| format!("`{}`: {}", p.code, p.about))
                .collect::<Vec<_>>()
                .join("; ");
            let codes: Vec<&str> = problems.iter().map(|p| p.code).collect();
            let mut builder = ResponseBuilder::new()
                .description(description)
                .content(
                    super::PROBLEM_JSON,
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .extensions(Some(
                    ExtensionsBuilder::new()
                        .add("x-problem-codes", serde_json::json!(codes))
                        .build(),
                ));
            if status == 429 || status == 503 {
                builder = builder.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
                        .description(Some("Seconds to wait before retrying (when given)."))
                        .build(),
                );
            }
            (status.to_string(), RefOr::T(builder.build()))
        })
        .collect()
}

/// Declares a type whose `utoipa::IntoResponses` lists the problems of one operation, for its
/// `#[utoipa::path(responses(..., Name))]`: groups and single problems of this catalogue.
macro_rules! route_problems {
    ($( $(#[$m:meta])* $name:ident = [$($set:expr),* $(,)?]; )*) => {
        $(
            $(#[$m])*
            pub struct $name;

            impl utoipa::IntoResponses for $name {
                fn responses() -> BTreeMap<String, RefOr<Response>> {
                    responses(&[ANY_ROUTE, $($set),*])
                }
            }
        )*
    };
}

route_problems! {
    /// `GET /readyz`.
    ReadyProblems = [&[&STORE_UNAVAILABLE]];
    /// `POST /v1/merchants`.
    CreateMerchantProblems = [ADMIN_AUTH, JSON_BODY, IDEMPOTENT, D1_CALL, &[&INVALID_MERCHANT_NAME, &STORE_UNAVAILABLE]];
    /// `POST /v1/tokens`.
    CreateTokenProblems = [MERCHANT_AUTH, JSON_BODY, IDEMPOTENT, D1_CALL, CARD, &[&CONCURRENT_UPDATE, &INVALID_CUSTOMER_REFERENCE]];
    /// `GET /v1/tokens/{id}`.
    GetTokenProblems = [MERCHANT_AUTH, &[&TOKEN_NOT_FOUND]];
    /// `DELETE`, suspend and resume of a token.
    TokenLifecycleProblems = [MERCHANT_AUTH, IDEMPOTENT, TOKEN_STATE, D1_CALL];
    /// `POST /v1/tokens/{id}/cryptograms`.
    CryptogramProblems = [MERCHANT_AUTH, JSON_BODY, IDEMPOTENT, TOKEN_STATE, D1_CALL, &[&INVALID_AMOUNT]];
    /// `PUT /v1/tokens/{id}/recurring-agreement`.
    PutAgreementProblems = [MERCHANT_AUTH, JSON_BODY, IDEMPOTENT, TOKEN_STATE, &[&INVALID_NETWORK_TRANSACTION_ID, &INVALID_AGREEMENT_REFERENCE, &INVALID_AMOUNT, &INVALID_FREQUENCY, &INVALID_INITIAL_TRANSACTION_AT]];
    /// `GET /v1/tokens/{id}/recurring-agreement`.
    GetAgreementProblems = [MERCHANT_AUTH, &[&TOKEN_NOT_FOUND, &RECURRING_AGREEMENT_NOT_FOUND]];
    /// `DELETE /v1/tokens/{id}/recurring-agreement` (any token status).
    EndAgreementProblems = [MERCHANT_AUTH, IDEMPOTENT, &[&TOKEN_NOT_FOUND, &CONCURRENT_UPDATE]];
    /// `POST /v1/tokens/{id}/reveal`.
    RevealProblems = [MERCHANT_AUTH, &[&INVALID_IDEMPOTENCY_KEY], TOKEN_STATE];
    /// `POST /v1/api-keys`.
    CreateApiKeyProblems = [MERCHANT_AUTH, JSON_BODY, IDEMPOTENT, &[&INVALID_KEY_NAME, &INVALID_SCOPES, &TOO_MANY_API_KEYS]];
    /// The admin's `POST /v1/merchants/{id}/api-keys`.
    AdminCreateApiKeyProblems = [ADMIN_AUTH, JSON_BODY, IDEMPOTENT, &[&INVALID_KEY_NAME, &INVALID_SCOPES, &TOO_MANY_API_KEYS, &MERCHANT_NOT_FOUND, &STORE_UNAVAILABLE]];
    /// `GET /v1/api-keys`.
    ListApiKeysProblems = [MERCHANT_AUTH];
    /// `DELETE /v1/api-keys/{id}`.
    RevokeApiKeyProblems = [MERCHANT_AUTH, &[&API_KEY_NOT_FOUND]];
    /// The client-certificate bindings of a merchant (admin).
    ClientCertProblems = [ADMIN_AUTH, JSON_BODY, IDEMPOTENT, &[&MERCHANT_NOT_FOUND, &INVALID_CLIENT_CERT_FINGERPRINT, &INVALID_CLIENT_CERT_NAME, &DUPLICATE_CLIENT_CERT, &TOO_MANY_CLIENT_CERTS, &CLIENT_CERT_NEEDED, &CLIENT_CERT_IN_USE, &INVALID_SCOPES, &STORE_UNAVAILABLE]];
    /// `POST /v1/webhook-endpoints`.
    CreateEndpointProblems = [MERCHANT_AUTH, JSON_BODY, IDEMPOTENT, &[&INVALID_WEBHOOK_URL, &INSECURE_WEBHOOK_URL, &WEBHOOK_URL_FORBIDDEN, &INVALID_EVENT_TYPES, &TOO_MANY_WEBHOOK_ENDPOINTS, &WEBHOOKS_UNAVAILABLE]];
    /// `PATCH /v1/webhook-endpoints/{id}`.
    UpdateEndpointProblems = [MERCHANT_AUTH, JSON_BODY, IDEMPOTENT, &[&INVALID_WEBHOOK_URL, &INSECURE_WEBHOOK_URL, &WEBHOOK_URL_FORBIDDEN, &INVALID_EVENT_TYPES, &WEBHOOK_ENDPOINT_NOT_FOUND, &CONCURRENT_UPDATE, &WEBHOOKS_UNAVAILABLE]];
    /// `POST /v1/webhook-endpoints/{id}/rotate-secret`.
    RotateSecretProblems = [MERCHANT_AUTH, JSON_BODY, IDEMPOTENT, &[&INVALID_ROTATION_OVERLAP, &WEBHOOK_ENDPOINT_NOT_FOUND, &CONCURRENT_UPDATE, &WEBHOOKS_UNAVAILABLE]];
    /// `GET`/`DELETE /v1/webhook-endpoints/{id}`.
    EndpointProblems = [MERCHANT_AUTH, &[&WEBHOOK_ENDPOINT_NOT_FOUND, &WEBHOOKS_UNAVAILABLE]];
    /// The webhook lists (endpoints, events).
    ListProblems = [MERCHANT_AUTH, PAGINATED, &[&WEBHOOKS_UNAVAILABLE]];
    /// `GET /v1/audit-events`.
    AuditListProblems = [MERCHANT_AUTH, PAGINATED];
    /// `GET /v1/tokens?customerReference=...` (a customer's wallet).
    WalletListProblems = [MERCHANT_AUTH, PAGINATED, &[&INVALID_CUSTOMER_REFERENCE]];
    /// `DELETE /v1/tokens?customerReference=...`: per-token failures are in the 207 body, not
    /// problems; these are the call's own.
    WalletDeleteProblems = [MERCHANT_AUTH, IDEMPOTENT, &[&INVALID_QUERY, &INVALID_CUSTOMER_REFERENCE, &WALLET_INDEX_BUILDING]];
    /// `GET /v1/events/{id}`.
    EventProblems = [MERCHANT_AUTH, &[&EVENT_NOT_FOUND, &WEBHOOKS_UNAVAILABLE]];
    /// `POST /v1/events/{id}/redeliver`.
    RedeliverProblems = [MERCHANT_AUTH, IDEMPOTENT, &[&EVENT_NOT_FOUND, &EVENT_NOT_REDELIVERABLE, &WEBHOOKS_UNAVAILABLE]];
    /// The admin's `POST /v1/issuers`.
    CreateIssuerProblems = [ADMIN_AUTH, JSON_BODY, IDEMPOTENT, &[&INVALID_ISSUER_NAME, &INVALID_D1_ISSUER_ID, &D1_ISSUER_ID_TAKEN, &STORE_UNAVAILABLE]];
    /// The admin's `GET /v1/issuers`.
    ListIssuersProblems = [ADMIN_AUTH, &[&STORE_UNAVAILABLE]];
    /// The admin's `GET /v1/issuers/{id}`.
    GetIssuerProblems = [ADMIN_AUTH, &[&ISSUER_NOT_FOUND, &STORE_UNAVAILABLE]];
    /// The admin's `POST /v1/issuers/{id}/api-keys`.
    AdminCreateIssuerKeyProblems = [ADMIN_AUTH, JSON_BODY, IDEMPOTENT, &[&INVALID_KEY_NAME, &INVALID_SCOPES, &TOO_MANY_API_KEYS, &ISSUER_NOT_FOUND, &STORE_UNAVAILABLE]];
    /// `GET /v1/issuer/operations/{operationId}`.
    GetOperationProblems = [ISSUER_AUTH, &[&OPERATION_NOT_FOUND]];
    /// `GET /v1/issuer/audit-events`.
    IssuerAuditListProblems = [ISSUER_AUTH, PAGINATED];
    /// `GET /v1/issuer/operations`.
    ListOperationsProblems = [ISSUER_AUTH, PAGINATED, &[&INVALID_CARD_ID]];
    /// The client-certificate bindings of an issuer (admin).
    IssuerClientCertProblems = [ADMIN_AUTH, JSON_BODY, IDEMPOTENT, &[&ISSUER_NOT_FOUND, &INVALID_CLIENT_CERT_FINGERPRINT, &INVALID_CLIENT_CERT_NAME, &DUPLICATE_CLIENT_CERT, &TOO_MANY_CLIENT_CERTS, &CLIENT_CERT_NEEDED, &INVALID_AUTH_MODE, &CLIENT_CERT_IN_USE, &INVALID_SCOPES, &STORE_UNAVAILABLE]];
    /// `POST /v1/issuer/webhook-endpoints`.
    IssuerCreateEndpointProblems = [ISSUER_AUTH, JSON_BODY, IDEMPOTENT, &[&INVALID_WEBHOOK_URL, &INSECURE_WEBHOOK_URL, &WEBHOOK_URL_FORBIDDEN, &INVALID_EVENT_TYPES, &TOO_MANY_WEBHOOK_ENDPOINTS, &WEBHOOKS_UNAVAILABLE]];
    /// `DELETE /v1/issuer/webhook-endpoints/{id}`.
    IssuerEndpointProblems = [ISSUER_AUTH, &[&WEBHOOK_ENDPOINT_NOT_FOUND, &WEBHOOKS_UNAVAILABLE]];
    /// The issuer's webhook lists (endpoints, events).
    IssuerListProblems = [ISSUER_AUTH, PAGINATED, &[&WEBHOOKS_UNAVAILABLE]];
    /// Click to Pay enrolment, update and opt-out of a card.
    ClickToPayProblems = [ISSUER_AUTH, JSON_BODY, IDEMPOTENT, D1_CALL, &[&INVALID_CARD_ID, &INVALID_CARDHOLDER_NAME, &INVALID_REASON, &INVALID_REASON_CODE, &STORE_UNAVAILABLE]];
    /// Click to Pay enrolment of a card (refused while the card is deleted).
    ClickToPayEnrolmentProblems = [ISSUER_AUTH, JSON_BODY, IDEMPOTENT, D1_CALL, &[&INVALID_CARD_ID, &INVALID_CARDHOLDER_NAME, &INVALID_REASON, &INVALID_REASON_CODE, &CARD_DELETED, &STORE_UNAVAILABLE]];
    /// Click to Pay update and opt-out of a consumer.
    ClickToPayConsumerProblems = [ISSUER_AUTH, JSON_BODY, IDEMPOTENT, D1_CALL, &[&INVALID_CONSUMER_ID, &INVALID_REASON, &INVALID_REASON_CODE, &STORE_UNAVAILABLE]];
    /// `GET /v1/issuer/cards/{card_id}`.
    IssuerCardProblems = [ISSUER_AUTH, &[&INVALID_CARD_ID, &ISSUER_CARD_NOT_FOUND]];
    /// `DELETE /v1/issuer/cards/{card_id}`.
    IssuerCardDeleteProblems = [ISSUER_AUTH, IDEMPOTENT, D1_CALL, &[&INVALID_CARD_ID, &CARD_DELETED, &STORE_UNAVAILABLE]];
    /// A card's Click to Pay profiles.
    ClickToPayProfilesProblems = [ISSUER_AUTH, D1_CALL, &[&INVALID_CARD_ID]];
    /// A consumer's Click to Pay profiles.
    ClickToPayConsumerProfilesProblems = [ISSUER_AUTH, D1_CALL, &[&INVALID_CONSUMER_ID]];
    /// `POST /v1/issuer/cards/{card_id}/production-orders`.
    ProductionOrderProblems = [ISSUER_AUTH, JSON_BODY, IDEMPOTENT, D1_CALL, CARD, &[&INVALID_CARD_ID, &INVALID_ISSUER_REQUEST_ID, &INVALID_PRODUCTION_ORDER, &ISSUER_REQUEST_ID_IN_USE, &CONCURRENT_UPDATE]];
    /// `POST /v1/issuer/production-orders/batch` (a card's own problems are in its result).
    ProductionBatchProblems = [ISSUER_AUTH, JSON_BODY, IDEMPOTENT, D1_CALL, &[&INVALID_BATCH_SIZE]];
    /// `GET /v1/issuer/cards/{card_id}/production-status`.
    ProductionStatusProblems = [ISSUER_AUTH, &[&INVALID_CARD_ID, &PRODUCTION_ORDER_NOT_FOUND]];
    /// `POST /notifications/d1/v2/issuers/{issuerId}/cards` and `.../consumers` (D1).
    IssuerNotifyProblems = [JSON_BODY, &[&UNAUTHORIZED, &INVALID_PATH, &ISSUER_NOT_FOUND, &NOTIFICATION_NOT_APPLIED]];
    /// `POST .../notify-update` (D1).
    NotifyProblems = [JSON_BODY, &[&UNAUTHORIZED, &INVALID_PATH, &TOKEN_ID_MISMATCH, &MERCHANT_GATEWAY_NOT_FOUND, &TOKEN_NOT_FOUND, &NOTIFICATION_NOT_APPLIED]];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_per_status_and_snake_case() {
        for (i, p) in ALL.iter().enumerate() {
            assert!(
                p.code
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                p.code
            );
            assert!(p.status.is_client_error() || p.status.is_server_error());
            assert!(
                !ALL[..i]
                    .iter()
                    .any(|q| q.code == p.code && q.status == p.status),
                "{} declared twice",
                p.code
            );
            assert_ne!(p.title, "Error", "{}: no title for its status", p.code);
        }
    }

    #[test]
    fn responses_group_codes_by_status() {
        let r = responses(&[&[&TOKEN_NOT_FOUND, &MERCHANT_NOT_FOUND, &RATE_LIMITED]]);
        assert_eq!(r.keys().collect::<Vec<_>>(), ["404", "429"]);
        let v = serde_json::to_value(&r["404"]).unwrap_or_default();
        assert_eq!(
            v["x-problem-codes"],
            serde_json::json!(["token_not_found", "merchant_not_found"])
        );
        assert!(v["headers"].is_null());
        let v = serde_json::to_value(&r["429"]).unwrap_or_default();
        assert!(v["headers"]["Retry-After"].is_object());
    }
}
