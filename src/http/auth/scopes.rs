//! Which scope each merchant route needs, decided in one table and enforced by
//! [`crate::http::auth::MerchantAuth`] for every handler that authenticates a merchant. A route
//! missing from the table is refused (fail closed), so a new route cannot be reachable by every
//! key by omission.

use axum::extract::MatchedPath;
use axum::http::Method;
use axum::http::request::Parts;

use crate::domain::apikeys::{Caller, IssuerCaller, Scope};
use crate::domain::audit::AuditAction;
use crate::domain::issuer::{valid_card_id, valid_consumer_id};
use crate::domain::token::TokenId;
use crate::http::audit::{self, AuditCtx, Subject};
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

/// The scope `method` on the route `path` (its pattern, e.g. `/v1/tokens/{id}`) needs, and the
/// audited action it is, if any (a refusal is audited too).
pub fn required(method: &Method, path: &str) -> Option<(Scope, Option<AuditAction>)> {
    let m = method.as_str();
    Some(match (m, path) {
        ("POST", "/v1/tokens") => (Scope::TokensWrite, None),
        ("GET", "/v1/tokens") => (Scope::TokensRead, None),
        // Each token deleted is audited by the handler; a refusal, for the customer as a whole.
        ("DELETE", "/v1/tokens") => (Scope::TokensWrite, Some(AuditAction::TokenDelete)),
        ("GET", "/v1/tokens/{id}") => (Scope::TokensRead, None),
        ("DELETE", "/v1/tokens/{id}") => (Scope::TokensWrite, Some(AuditAction::TokenDelete)),
        ("POST", "/v1/tokens/{id}/suspend") => {
            (Scope::TokensWrite, Some(AuditAction::TokenSuspend))
        }
        ("POST", "/v1/tokens/{id}/resume") => (Scope::TokensWrite, Some(AuditAction::TokenResume)),
        ("POST", "/v1/tokens/{id}/cryptograms") => {
            (Scope::Cryptograms, Some(AuditAction::CryptogramCreate))
        }
        ("POST", "/v1/tokens/{id}/reveal") => (Scope::CardReveal, Some(AuditAction::CardReveal)),
        // Recording the agreement changes what every later MIT cryptogram says: a token write.
        ("PUT", "/v1/tokens/{id}/recurring-agreement") => (
            Scope::TokensWrite,
            Some(AuditAction::RecurringAgreementRecord),
        ),
        ("GET", "/v1/tokens/{id}/recurring-agreement") => (Scope::TokensRead, None),
        ("DELETE", "/v1/tokens/{id}/recurring-agreement") => {
            (Scope::TokensWrite, Some(AuditAction::RecurringAgreementEnd))
        }
        // Changing an endpoint or rotating its secret needs what creating it needs; like
        // creation, not an audited action (the secret is never in the trail either way).
        (_, p) if p.starts_with("/v1/webhook-endpoints") || p.starts_with("/v1/events") => {
            (Scope::Webhooks, None)
        }
        ("POST", "/v1/api-keys") => (Scope::Keys, Some(AuditAction::ApiKeyCreate)),
        ("GET", "/v1/api-keys") => (Scope::Keys, None),
        ("DELETE", "/v1/api-keys/{id}") => (Scope::Keys, Some(AuditAction::ApiKeyRevoke)),
        ("GET", "/v1/audit-events") => (Scope::AuditRead, None),
        // --- issuer routes (IssuerAuth; docs/issuer.md) ---------------------------------------
        (_, p) if p.starts_with("/v1/issuer/operations") => (Scope::IssuerOperations, None),
        ("GET", "/v1/issuer/audit-events") => (Scope::IssuerOperations, None),
        ("POST", "/v1/issuer/webhook-endpoints") => (
            Scope::IssuerOperations,
            Some(AuditAction::WebhookEndpointCreate),
        ),
        ("DELETE", "/v1/issuer/webhook-endpoints/{id}") => (
            Scope::IssuerOperations,
            Some(AuditAction::WebhookEndpointDelete),
        ),
        (_, p)
            if p.starts_with("/v1/issuer/webhook-endpoints")
                || p.starts_with("/v1/issuer/events") =>
        {
            (Scope::IssuerOperations, None)
        }
        // Reads with personal data are audited by the handler (they need the pii scope too).
        ("GET", p) if p.ends_with("/click-to-pay/profiles") => (Scope::IssuerClickToPay, None),
        ("POST", p) if p.starts_with("/v1/issuer/") && p.contains("/click-to-pay/") => {
            let action = if p.ends_with("/enrolment") {
                AuditAction::ClickToPayEnrol
            } else if p.ends_with("/opt-out") {
                AuditAction::ClickToPayOptOut
            } else {
                AuditAction::ClickToPayUpdate
            };
            (Scope::IssuerClickToPay, Some(action))
        }
        ("POST", "/v1/issuer/cards/{card_id}/production-orders") => (
            Scope::IssuerOrders,
            Some(AuditAction::ProductionOrderCreate),
        ),
        ("POST", "/v1/issuer/production-orders/batch") => {
            (Scope::IssuerOrders, Some(AuditAction::ProductionOrderBatch))
        }
        ("GET" | "DELETE", "/v1/issuer/cards/{card_id}") => (Scope::IssuerCards, None),
        (_, p) if p.starts_with("/v1/issuer/cards/{card_id}/production") => {
            (Scope::IssuerOrders, None)
        }
        (_, p) if p.starts_with("/v1/issuer/production-orders") => (Scope::IssuerOrders, None),
        _ => return None,
    })
}

/// What a refused audited action was aimed at: the id segment of `/v1/tokens/{id}/...` or
/// `/v1/api-keys/{id}`, when it is well-formed (a malformed id names nothing, and is not worth
/// keeping in the trail).
fn subject(path: &str) -> Subject<'_> {
    let id = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.split('/').next())
    };
    if let Some(t) = id("/v1/tokens/").filter(|t| TokenId::parse(t).is_some()) {
        Subject::Token(t)
    } else {
        id("/v1/api-keys/").map_or(Subject::None, Subject::requested_key)
    }
}

fn insufficient(detail: String) -> ApiError {
    ApiError::of(&codes::INSUFFICIENT_SCOPE, detail)
}

/// What a refused audited issuer action was aimed at: the card or consumer of
/// `/v1/issuer/{cards,consumers}/{id}/...`, when the id is well-formed.
fn issuer_subject(path: &str) -> Subject<'_> {
    let id = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.split('/').next())
    };
    let card = id("/v1/issuer/cards/").filter(|c| valid_card_id(c));
    let consumer = id("/v1/issuer/consumers/").filter(|c| valid_consumer_id(c));
    if card.is_none() && consumer.is_none() {
        return Subject::None;
    }
    Subject::Issuer {
        card,
        consumer,
        operation: None,
    }
}

/// [`check`] for issuer keys: the route must be in the table with an issuer scope the key holds;
/// a refused audited action is recorded in the issuer's trail.
pub async fn check_issuer(
    parts: &Parts,
    state: &AppState,
    caller: &IssuerCaller,
) -> Result<(), ApiError> {
    let path = parts
        .extensions
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let Some((scope, action)) = required(&parts.method, &path) else {
        tracing::error!(method = %parts.method, path = %path, "route has no scope rule; refused");
        return Err(insufficient("this route is not open to API keys".into()));
    };
    if caller.scopes.contains(scope) {
        return Ok(());
    }
    if let Some(action) = action {
        let ctx = AuditCtx {
            actor: caller.key_id.clone(),
            request_id: audit::request_id(&parts.headers),
        };
        audit::record_best_effort(
            state,
            &ctx,
            &caller.issuer.id,
            action,
            issuer_subject(parts.uri.path()),
            "insufficient_scope".to_owned(),
        )
        .await;
    }
    Err(insufficient(format!(
        "this API key lacks the `{scope}` scope"
    )))
}

/// Refuses (403 `insufficient_scope`) a caller whose key lacks the route's scope, recording the
/// refusal when the route is an audited action.
pub async fn check(parts: &Parts, state: &AppState, caller: &Caller) -> Result<(), ApiError> {
    // Borrowed, not copied: this runs on every merchant request.
    let path = parts
        .extensions
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    let Some((scope, action)) = required(&parts.method, path) else {
        tracing::error!(method = %parts.method, path = %path, "route has no scope rule; refused");
        return Err(insufficient("this route is not open to API keys".into()));
    };
    if caller.scopes.contains(scope) {
        return Ok(());
    }
    if let Some(action) = action {
        let ctx = AuditCtx {
            actor: caller.key_id.clone(),
            request_id: audit::request_id(&parts.headers),
        };
        // Boxed: a refusal's audit write is not part of every request's future.
        Box::pin(audit::record_best_effort(
            state,
            &ctx,
            &caller.merchant.id,
            action,
            subject(parts.uri.path()),
            "insufficient_scope".to_owned(),
        ))
        .await;
    }
    Err(insufficient(format!(
        "this API key lacks the `{scope}` scope"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_merchant_route_has_a_rule() {
        let routes = [
            ("POST", "/v1/tokens"),
            ("GET", "/v1/tokens"),
            ("DELETE", "/v1/tokens"),
            ("GET", "/v1/tokens/{id}"),
            ("DELETE", "/v1/tokens/{id}"),
            ("POST", "/v1/tokens/{id}/suspend"),
            ("POST", "/v1/tokens/{id}/resume"),
            ("POST", "/v1/tokens/{id}/cryptograms"),
            ("POST", "/v1/tokens/{id}/reveal"),
            ("PUT", "/v1/tokens/{id}/recurring-agreement"),
            ("GET", "/v1/tokens/{id}/recurring-agreement"),
            ("DELETE", "/v1/tokens/{id}/recurring-agreement"),
            ("POST", "/v1/webhook-endpoints"),
            ("GET", "/v1/webhook-endpoints"),
            ("GET", "/v1/webhook-endpoints/{id}"),
            ("DELETE", "/v1/webhook-endpoints/{id}"),
            ("PATCH", "/v1/webhook-endpoints/{id}"),
            ("POST", "/v1/webhook-endpoints/{id}/rotate-secret"),
            ("GET", "/v1/events"),
            ("GET", "/v1/events/{id}"),
            ("POST", "/v1/events/{id}/redeliver"),
            ("POST", "/v1/api-keys"),
            ("GET", "/v1/api-keys"),
            ("DELETE", "/v1/api-keys/{id}"),
            ("GET", "/v1/audit-events"),
            ("GET", "/v1/issuer/operations"),
            ("GET", "/v1/issuer/operations/{operation_id}"),
            ("GET", "/v1/issuer/audit-events"),
            ("POST", "/v1/issuer/webhook-endpoints"),
            ("GET", "/v1/issuer/webhook-endpoints"),
            ("DELETE", "/v1/issuer/webhook-endpoints/{id}"),
            ("POST", "/v1/issuer/cards/{card_id}/click-to-pay/enrolment"),
            (
                "POST",
                "/v1/issuer/consumers/{consumer_id}/click-to-pay/opt-out",
            ),
            ("GET", "/v1/issuer/cards/{card_id}/click-to-pay/profiles"),
            ("POST", "/v1/issuer/cards/{card_id}/production-orders"),
            ("POST", "/v1/issuer/production-orders/batch"),
        ];
        for (m, p) in routes {
            let method = Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET);
            assert!(required(&method, p).is_some(), "{m} {p}");
        }
        assert!(required(&Method::GET, "/v1/unknown").is_none());
        assert_eq!(
            required(
                &Method::POST,
                "/v1/issuer/cards/{card_id}/click-to-pay/opt-out"
            ),
            Some((Scope::IssuerClickToPay, Some(AuditAction::ClickToPayOptOut)))
        );
        assert_eq!(
            required(&Method::GET, "/v1/issuer/audit-events"),
            Some((Scope::IssuerOperations, None))
        );
        assert!(matches!(
            issuer_subject("/v1/issuer/cards/card-1/click-to-pay/enrolment"),
            Subject::Issuer {
                card: Some("card-1"),
                consumer: None,
                operation: None
            }
        ));
        assert!(matches!(
            issuer_subject("/v1/issuer/cards/bad%20id/click-to-pay/enrolment"),
            Subject::None
        ));
        assert_eq!(
            required(&Method::POST, "/v1/tokens/{id}/reveal").map(|r| r.0),
            Some(Scope::CardReveal)
        );
    }

    #[test]
    fn refusals_name_a_well_formed_target_only() {
        let tok = "tok_d7XXXyQu2WZRKlyWvsMJRA";
        let key = "key_3f1c0a9d2b7e4c5a8f6d1e2b";
        assert!(
            matches!(subject(&format!("/v1/tokens/{tok}/reveal")), Subject::Token(t) if t == tok)
        );
        assert!(matches!(subject(&format!("/v1/tokens/{tok}")), Subject::Token(t) if t == tok));
        assert!(matches!(subject(&format!("/v1/api-keys/{key}")), Subject::ApiKey(k) if k == key));
        for path in [
            "/v1/api-keys",
            "/v1/api-keys/key_unknown",
            "/v1/tokens/nope",
            "/v1/tokens",
        ] {
            assert!(matches!(subject(path), Subject::None), "{path}");
        }
    }
}
