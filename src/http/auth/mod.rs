//! Authentication of every request: merchant and issuer API keys (with their client
//! certificates, rate limits and scopes) and the admin token. Below the handlers: they take [`MerchantAuth`] or
//! [`AdminAuth`] as an extractor.
//!
//! - [`client_cert`]: mutual-TLS client certificates bound to merchants and issuers;
//! - [`scopes`]: the one table of which scope each merchant route needs.

pub mod client_cert;
pub mod scopes;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;

use crate::domain::apikeys::{IssuerCaller, Principal};
use crate::domain::issuer::Issuer;
use crate::domain::merchant::Merchant;
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;

fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// A request authenticated with a merchant API key.
/// The merchant is shared with the API-key cache (not copied per request).
pub struct MerchantAuth(pub std::sync::Arc<Merchant>);

impl FromRequestParts<AppState> for MerchantAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // --- client certificates (mutual TLS), src/http/auth/client_cert.rs -------------------------
        // No key: only a certificate bound to a merchant in `CERT` mode authenticates (else
        // 401). With a key: the connection's certificate must not belong to another merchant,
        // and must be one of the key's merchant's when that merchant requires it (else 403).
        let caller = match bearer(parts) {
            // Boxed: the rare keyless path is not part of every request's future.
            None => Box::pin(client_cert::authenticate_without_key(parts, state)).await?,
            Some(key) => {
                let caller = match state.services.authenticate_any(key).await? {
                    Some(Principal::Merchant(c)) => c,
                    // A valid key of the other tenant kind: authenticated, not allowed here.
                    Some(Principal::Issuer(_)) => {
                        return Err(ApiError::of(
                            &codes::INSUFFICIENT_SCOPE,
                            "this is an issuer API key; merchant routes need a merchant key",
                        ));
                    }
                    None => {
                        return Err(ApiError::of(
                            &codes::UNAUTHORIZED,
                            "the API key is not valid",
                        ));
                    }
                };
                client_cert::check_with_key(parts, state, &caller).await?;
                caller
            }
        };
        // --- end of client certificates --------------------------------------------------------
        let merchant = &caller.merchant;
        // Limits apply to authenticated callers only: an unknown key costs a hash and a
        // (cached-miss) lookup, and must not consume a real merchant's budget.
        // The caller's key id (derived from the key's hash by `authenticate`) names the key:
        // hashing the key a second time here cost a SHA-256 per request (docs/performance.md).
        if let Err(e) = state
            .rate_limiter
            .check(&caller.key_id, merchant.id.as_str())
            .await
        {
            let which = match e.scope {
                crate::domain::ratelimit::Scope::ApiKey => "this API key",
                crate::domain::ratelimit::Scope::Merchant => "this merchant",
            };
            return Err(ApiError::of(
                &codes::RATE_LIMITED,
                format!(
                    "the request rate limit of {which} is exceeded; retry after the indicated delay"
                ),
            )
            .with_retry_after(Some(e.retry_after)));
        }
        // Every merchant route needs its scope (one table: src/http/auth/scopes.rs).
        scopes::check(parts, state, &caller).await?;
        // For handlers that record who acted (src/http/audit.rs).
        parts.extensions.insert(crate::http::audit::AuthedKey {
            key_id: caller.key_id.clone(),
        });
        Ok(MerchantAuth(caller.merchant))
    }
}

/// A request authenticated with an issuer API key (`docs/issuer.md`): the issuer side of D1.
/// Merchant keys are refused with 403, as issuer keys are on merchant routes; the route's scope
/// comes from the same table ([`scopes::required`]).
pub struct IssuerAuth(pub Issuer, pub crate::domain::apikeys::Scopes);

impl FromRequestParts<AppState> for IssuerAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = bearer(parts).ok_or_else(|| {
            ApiError::of(
                &codes::UNAUTHORIZED,
                "send the issuer API key as `Authorization: Bearer <key>`",
            )
        })?;
        let caller: IssuerCaller = match state.services.authenticate_any(key).await? {
            Some(Principal::Issuer(c)) => c,
            Some(Principal::Merchant(_)) => {
                return Err(ApiError::of(
                    &codes::INSUFFICIENT_SCOPE,
                    "this is a merchant API key; issuer routes need an issuer key",
                ));
            }
            None => {
                return Err(ApiError::of(
                    &codes::UNAUTHORIZED,
                    "the API key is not valid",
                ));
            }
        };
        // Client certificates, as for merchants: a key of an issuer that binds certificates
        // needs one of them on the connection, and no certificate acts for another tenant.
        client_cert::check_with_issuer_key(parts, state, &caller).await?;
        // The same per-key and per-tenant limits as merchants, the issuer in the tenant's place.
        if let Err(e) = state
            .rate_limiter
            .check(&caller.key_id, caller.issuer.id.as_str())
            .await
        {
            return Err(ApiError::of(
                &codes::RATE_LIMITED,
                "the request rate limit of this API key or issuer is exceeded; retry after the indicated delay",
            )
            .with_retry_after(Some(e.retry_after)));
        }
        scopes::check_issuer(parts, state, &caller).await?;
        parts.extensions.insert(crate::http::audit::AuthedKey {
            key_id: caller.key_id.clone(),
        });
        Ok(IssuerAuth(caller.issuer, caller.scopes))
    }
}

/// A request authenticated with the admin token.
pub struct AdminAuth;

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(|| {
            ApiError::of(
                &codes::UNAUTHORIZED,
                "send the admin token as `Authorization: Bearer <token>`",
            )
        })?;
        let expected = state.admin_token.expose_secret().as_bytes();
        if bool::from(token.as_bytes().ct_eq(expected)) {
            Ok(AdminAuth)
        } else {
            Err(ApiError::of(
                &codes::UNAUTHORIZED,
                "the admin token is not valid",
            ))
        }
    }
}
