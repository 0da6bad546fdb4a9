//! `POST /v1/tokens/{id}/reveal`: the card number behind a token, for PAN-fallback
//! authorization. The one response that carries a PAN (docs/security.md): the key needs
//! `card:reveal` (src/http/auth/scopes.rs), the reveal is audited before the card is sent (no audit
//! record, no card), the body is built in a zeroizing buffer that is wiped once sent, and it is
//! never cached (`Cache-Control: no-store`) nor stored for idempotent replay.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::domain::audit::AuditAction;
use crate::domain::token::TokenId;
use crate::http::audit::{self, AuditCtx};
use crate::http::auth::MerchantAuth;
use crate::http::idempotency::key_from;
use crate::http::params::{IdempotencyKeyHeader, TokenIdPath};
use crate::http::problem::{ApiError, codes};
use crate::http::state::AppState;
use tokengate_cards::{Expiry, Pan};

/// The revealed card. Documents the body only: [`card_json`] writes it by hand so the PAN never
/// passes through an intermediate `String` that is not wiped.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = RevealedCard)]
#[allow(
    dead_code,
    reason = "schema of the body card_json writes by hand; never constructed"
)]
pub struct RevealedCardView {
    /// The card number (PAN), digits only.
    #[schema(example = "4111111111111111")]
    number: String,
    #[schema(minimum = 1, maximum = 12)]
    expiry_month: u8,
    expiry_year: u16,
}

/// A response body that wipes itself when the last reference to it is dropped (after hyper
/// wrote it).
struct WipedOnDrop(Zeroizing<String>);

impl AsRef<[u8]> for WipedOnDrop {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// `{"number":"…","expiryMonth":M,"expiryYear":Y}` in one allocation sized up front, so no
/// reallocation leaves an unwiped copy of the digits behind.
fn card_json(pan: &Pan, expiry: Expiry) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(96));
    s.push_str("{\"number\":\"");
    s.push_str(pan.expose_digits());
    s.push_str("\",\"expiryMonth\":");
    s.push_str(&expiry.month.to_string());
    s.push_str(",\"expiryYear\":");
    s.push_str(&expiry.year.to_string());
    s.push('}');
    s
}

fn parse_token_id(s: &str) -> Result<TokenId, ApiError> {
    TokenId::parse(s)
        .ok_or_else(|| ApiError::of(&codes::TOKEN_NOT_FOUND, "no such token for this merchant"))
}

/// The card number behind a token, for PAN-fallback authorization. Needs the `card:reveal`
/// scope; audited; never cached or stored for replay (an `Idempotency-Key` is validated but
/// nothing is kept: a repeat reveals again, and is audited again).
#[utoipa::path(post, path = "/v1/tokens/{id}/reveal", tag = "tokens",
    security(("merchantApiKey" = [])),
    params(TokenIdPath, IdempotencyKeyHeader),
    responses(
        (status = 200, description = "The card (`Cache-Control: no-store`)", body = RevealedCardView),
        codes::RevealProblems,
    ))]
pub async fn reveal_card(
    State(state): State<AppState>,
    MerchantAuth(merchant): MerchantAuth,
    ctx: AuditCtx,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = key_from(&headers) {
        return e.into_response();
    }
    let id = match parse_token_id(&id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let result = state
        .services
        .reveal_card(&merchant.id, &id)
        .await
        .map_err(ApiError::from);
    // No record, no card: a reveal that cannot be audited is refused.
    if let Err(e) = audit::record(
        &state,
        &ctx,
        &merchant.id,
        AuditAction::CardReveal,
        audit::Subject::Token(id.as_str()),
        audit::outcome(&result),
    )
    .await
    {
        return e.into_response();
    }
    let (pan, expiry) = match result {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let body = Bytes::from_owner(WipedOnDrop(card_json(&pan, expiry)));
    drop(pan);
    let mut resp = (StatusCode::OK, Body::from(body)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test should stop loudly")]
mod tests {
    use super::*;

    #[test]
    fn card_json_is_valid_json_with_the_card() {
        let pan: Pan = "4111111111111111".parse().unwrap();
        let exp = Expiry::trusted(12, 2030).unwrap();
        let s = card_json(&pan, exp);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["number"], "4111111111111111");
        assert_eq!(v["expiryMonth"], 12);
        assert_eq!(v["expiryYear"], 2030);
        // Sized up front: the longest PAN fits without reallocation.
        assert!(s.len() + 3 <= s.capacity());
    }
}
