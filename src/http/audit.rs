//! The audit trail over HTTP: who is acting ([`AuditCtx`]: the API key id and the request's
//! `x-request-id`) and recording an audited action's outcome. The route that lists the trail is
//! `handlers::audit_events`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::problem::ApiError;
use super::state::AppState;
use crate::domain::apikeys::is_key_id;
use crate::domain::audit::{AuditAction, AuditTenant, NewAuditEvent, SUCCESS};

/// Put in the request's extensions by [`crate::http::auth::MerchantAuth`] and
/// [`crate::http::auth::IssuerAuth`]: the id of the API key that authenticated the request.
#[derive(Debug, Clone)]
pub struct AuthedKey {
    pub key_id: String,
}

/// Who acts, for the audit trail: the authenticating key's id (or `admin`) and the request id.
#[derive(Debug, Clone)]
pub struct AuditCtx {
    pub actor: String,
    pub request_id: Option<String>,
}

impl AuditCtx {
    pub fn admin(parts_request_id: Option<String>) -> AuditCtx {
        AuditCtx {
            actor: crate::domain::audit::ADMIN_ACTOR.to_owned(),
            request_id: parts_request_id,
        }
    }
}

/// The request id set by the middleware stack (`src/http/stack.rs`) before handlers run.
pub fn request_id(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(super::telemetry::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl FromRequestParts<AppState> for AuditCtx {
    type Rejection = ApiError;
    /// Needs [`crate::http::auth::MerchantAuth`] to have run first (an earlier handler argument); without it the
    /// handler is mis-wired, which is a bug, answered 500.
    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        let key = parts.extensions.get::<AuthedKey>().ok_or_else(|| {
            tracing::error!("AuditCtx used without MerchantAuth before it");
            ApiError::internal()
        })?;
        Ok(AuditCtx {
            actor: key.key_id.clone(),
            request_id: request_id(&parts.headers),
        })
    }
}

/// The outcome to record: `success`, or the problem code answered.
pub fn outcome<T>(r: &Result<T, ApiError>) -> String {
    match r {
        Ok(_) => SUCCESS.to_owned(),
        Err(e) => e.code.to_owned(),
    }
}

/// What an audited action concerns, besides the tenant: recorded as the event's `tokenId`,
/// `keyId`, `cardId` / `consumerId` / `operationId` or `endpointId`. Ids only: never a card
/// number or personal data.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    /// Nothing more (merchant creation, or a refusal before any target was known).
    None,
    /// A token id (`tok_...`).
    Token(&'a str),
    /// The API key created or revoked (`key_...`), not the key that acted.
    ApiKey(&'a str),
    /// An issuer's card or consumer at D1 (well-formed ids only), and the operation the action
    /// started, if it did.
    Issuer {
        card: Option<&'a str>,
        consumer: Option<&'a str>,
        operation: Option<&'a str>,
    },
    /// A webhook endpoint (`we_...`).
    Endpoint(&'a str),
}

impl<'a> Subject<'a> {
    /// The key a request path names: a path segment may hold anything, and only a well-formed
    /// key id is worth keeping in the trail.
    pub fn requested_key(id: &'a str) -> Subject<'a> {
        if is_key_id(id) {
            Subject::ApiKey(id)
        } else {
            Subject::None
        }
    }
}

/// Appends an event to the tenant's trail (a merchant's, or an issuer's). `Err` only when the
/// store failed, so callers decide whether that fails the request (a card reveal) or is logged
/// (an action already done).
pub async fn record(
    state: &AppState,
    ctx: &AuditCtx,
    tenant: impl Into<AuditTenant>,
    action: AuditAction,
    subject: Subject<'_>,
    outcome: String,
) -> Result<(), ApiError> {
    let Some(log) = &state.services.audit else {
        return Ok(());
    };
    let own = |v: Option<&str>| v.map(str::to_owned);
    let mut event = NewAuditEvent {
        at: time::OffsetDateTime::now_utc(),
        actor: ctx.actor.clone(),
        tenant: tenant.into(),
        action,
        token_id: None,
        key_id: None,
        card_id: None,
        consumer_id: None,
        operation_id: None,
        endpoint_id: None,
        request_id: ctx.request_id.clone(),
        outcome,
    };
    match subject {
        Subject::None => {}
        Subject::Token(t) => event.token_id = Some(t.to_owned()),
        Subject::ApiKey(k) => event.key_id = Some(k.to_owned()),
        Subject::Issuer {
            card,
            consumer,
            operation,
        } => {
            event.card_id = own(card);
            event.consumer_id = own(consumer);
            event.operation_id = own(operation);
        }
        Subject::Endpoint(e) => event.endpoint_id = Some(e.to_owned()),
    }
    log.record(&event).await.map(|_| ()).map_err(ApiError::from)
}

/// [`record`] for actions that already happened: a failure to record is logged, not answered.
pub async fn record_best_effort(
    state: &AppState,
    ctx: &AuditCtx,
    tenant: impl Into<AuditTenant>,
    action: AuditAction,
    subject: Subject<'_>,
    outcome: String,
) {
    let tenant: AuditTenant = tenant.into();
    if let Err(e) = record(state, ctx, tenant.clone(), action, subject, outcome).await {
        tracing::warn!(tenant_id = %tenant, code = e.code, "audit event not recorded");
    }
}
