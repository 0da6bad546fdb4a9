//! API keys: several per merchant, each with a name and scopes, revocable.
//!
//! A key's id is derived from its hash ([`key_id`]), so keys issued before key records existed
//! (the first key of older merchants, stored only as a hash -> merchant index) have the same id
//! without a stored one. Such a key gets a record with [`Scopes::default_for_merchant_key`] the
//! first time it authenticates; from then on it is listed and revocable like any other.
//!
//! Revocation takes effect on this instance at once and on others within
//! `auth.api_key_cache_ttl_ms` (each instance caches a verified key that long).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::DomainError;
use super::merchant::{ApiKeyHash, Merchant};
use super::token::MerchantId;

/// The public id of an API key, `key_` and the first 24 hex digits of its hash: stable, and it
/// reveals nothing usable about the secret (256 random bits behind a one-way hash).
pub fn key_id(hash: &ApiKeyHash) -> String {
    let h = hash.0.get(..24).unwrap_or(&hash.0);
    format!("key_{h}")
}

/// Whether `s` has the shape of a key id (`key_` and 24 lowercase hex digits): what a path
/// segment must look like to be recorded in the audit trail as the key an action concerns.
pub fn is_key_id(s: &str) -> bool {
    s.strip_prefix("key_").is_some_and(|h| {
        h.len() == 24
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// What a key may do. Every merchant route requires exactly one (`src/http/auth/scopes.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "tokens:write")]
    TokensWrite,
    #[serde(rename = "tokens:read")]
    TokensRead,
    #[serde(rename = "cryptograms")]
    Cryptograms,
    /// Reading a token's card number back: opt-in, never granted by default.
    #[serde(rename = "card:reveal")]
    CardReveal,
    #[serde(rename = "webhooks")]
    Webhooks,
    /// Creating, listing and revoking API keys.
    #[serde(rename = "keys")]
    Keys,
    #[serde(rename = "audit:read")]
    AuditRead,
    /// Issuer keys only (see [`TenantKind`]): the issuer's cards at D1.
    #[serde(rename = "issuer:cards")]
    IssuerCards,
    /// Issuer keys: Click to Pay enrolment, update, opt-out and profiles (masked).
    #[serde(rename = "issuer:click-to-pay")]
    IssuerClickToPay,
    /// Issuer keys: personal data (names, email, phone, address) in Click to Pay profiles.
    /// Opt-in, never granted by default.
    #[serde(rename = "issuer:click-to-pay:pii")]
    IssuerClickToPayPii,
    /// Issuer keys: physical card orders and their production status.
    #[serde(rename = "issuer:orders")]
    IssuerOrders,
    /// Issuer keys: the issuer's asynchronous D1 operations, and its webhooks.
    #[serde(rename = "issuer:operations")]
    IssuerOperations,
}

/// Which kind of tenant an API key belongs to. Both kinds share one key store and one scope
/// table; a key only ever holds scopes of its own kind, and a route only accepts its own kind
/// (a merchant key gets 403 on issuer routes and the reverse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantKind {
    #[default]
    Merchant,
    Issuer,
}

impl TenantKind {
    pub fn is_merchant(&self) -> bool {
        *self == TenantKind::Merchant
    }
}

impl Scope {
    pub const ALL: [Scope; 12] = [
        Scope::TokensWrite,
        Scope::TokensRead,
        Scope::Cryptograms,
        Scope::CardReveal,
        Scope::Webhooks,
        Scope::Keys,
        Scope::AuditRead,
        Scope::IssuerCards,
        Scope::IssuerClickToPay,
        Scope::IssuerClickToPayPii,
        Scope::IssuerOrders,
        Scope::IssuerOperations,
    ];

    /// The kind of tenant whose keys may hold this scope.
    pub fn tenant(self) -> TenantKind {
        match self {
            Scope::IssuerCards
            | Scope::IssuerClickToPay
            | Scope::IssuerClickToPayPii
            | Scope::IssuerOrders
            | Scope::IssuerOperations => TenantKind::Issuer,
            _ => TenantKind::Merchant,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::TokensWrite => "tokens:write",
            Scope::TokensRead => "tokens:read",
            Scope::Cryptograms => "cryptograms",
            Scope::CardReveal => "card:reveal",
            Scope::Webhooks => "webhooks",
            Scope::Keys => "keys",
            Scope::AuditRead => "audit:read",
            Scope::IssuerCards => "issuer:cards",
            Scope::IssuerClickToPay => "issuer:click-to-pay",
            Scope::IssuerClickToPayPii => "issuer:click-to-pay:pii",
            Scope::IssuerOrders => "issuer:orders",
            Scope::IssuerOperations => "issuer:operations",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of scopes. Stored and served as a list of scope names.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u16);

impl Scopes {
    /// The scopes of the key issued with a merchant (and of keys stored before scopes existed):
    /// everything except `card:reveal`, which must be granted deliberately.
    pub fn default_for_merchant_key() -> Scopes {
        Scope::ALL
            .into_iter()
            .filter(|s| *s != Scope::CardReveal && s.tenant() == TenantKind::Merchant)
            .collect()
    }

    /// The scopes of the key issued with an issuer: every issuer scope except
    /// `issuer:click-to-pay:pii`, which must be granted deliberately.
    pub fn default_for_issuer_key() -> Scopes {
        Scope::ALL
            .into_iter()
            .filter(|s| *s != Scope::IssuerClickToPayPii && s.tenant() == TenantKind::Issuer)
            .collect()
    }

    pub fn contains(self, s: Scope) -> bool {
        self.0 & s.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(it: I) -> Scopes {
        Scopes(it.into_iter().fold(0, |acc, s| acc | s.bit()))
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Scopes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Scopes, D::Error> {
        Ok(Vec::<Scope>::deserialize(d)?.into_iter().collect())
    }
}

/// A stored API key (never its secret; the hash lives in the store's hash index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyRecord {
    pub id: String,
    /// The tenant the key belongs to: a merchant id (`mer_`), or an issuer's id as a tenant id
    /// (`iss_`, `IssuerId::tenant`); [`ApiKeyRecord::tenant`] tells which.
    pub merchant_id: MerchantId,
    pub name: String,
    pub scopes: Scopes,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Filled in by listings from the store's separate last-used index; not stored here.
    #[serde(skip)]
    pub last_used_at: Option<OffsetDateTime>,
}

impl ApiKeyRecord {
    /// The kind of tenant the key belongs to, carried by its tenant id's prefix (ids are
    /// parsed, so the prefix cannot lie, and records written before issuers existed are all
    /// merchants').
    pub fn tenant(&self) -> TenantKind {
        if self.merchant_id.is_issuer() {
            TenantKind::Issuer
        } else {
            TenantKind::Merchant
        }
    }
}

/// An authenticated request's caller: the merchant, and the key that authenticated it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Shared with the API-key cache: a cached key's request does not copy the merchant.
    pub merchant: std::sync::Arc<Merchant>,
    pub key_id: String,
    pub scopes: Scopes,
}

/// An issuer's authenticated caller.
#[derive(Debug, Clone)]
pub struct IssuerCaller {
    pub issuer: super::issuer::Issuer,
    pub key_id: String,
    pub scopes: Scopes,
}

/// Whoever an API key authenticates: a merchant or an issuer.
#[derive(Debug, Clone)]
pub enum Principal {
    Merchant(Caller),
    Issuer(IssuerCaller),
}

impl Principal {
    /// The tenant id the key is filed under, and the key's id.
    pub fn tenant_and_key(&self) -> (MerchantId, &str) {
        match self {
            Principal::Merchant(c) => (c.merchant.id.clone(), &c.key_id),
            Principal::Issuer(c) => (c.issuer.id.tenant(), &c.key_id),
        }
    }

    pub fn key_id(&self) -> &str {
        match self {
            Principal::Merchant(c) => &c.key_id,
            Principal::Issuer(c) => &c.key_id,
        }
    }
}

/// `lastUsedAt` is written at most this often per key and instance: a store write per request
/// would double the cost of reads for a value that only needs to be roughly right.
pub const LAST_USED_EVERY: Duration = Duration::from_secs(60);

/// Active (unrevoked) keys per merchant.
pub const MAX_KEYS: usize = 100;
/// Key records per merchant, revoked ones included: revoked records are kept (they name the
/// keys in the audit trail), so this bounds what one merchant can store by issuing and revoking.
pub const MAX_KEY_RECORDS: usize = 1000;

pub(crate) fn validate_name(name: &str) -> Result<String, DomainError> {
    let name = name.trim();
    // Names are listed back in clear: a card number in one is refused.
    if name.is_empty()
        || name.chars().count() > 100
        || name.chars().any(char::is_control)
        || tokengate_cards::contains_pan(name)
    {
        return Err(DomainError::Validation {
            code: "invalid_key_name",
            detail: "name must be 1 to 100 printable characters, without a card number".into(),
        });
    }
    Ok(name.to_owned())
}

/// Parses the scope names of a merchant key; unknown, issuer or no scopes are refused.
pub fn parse_scopes(names: &[String]) -> Result<Scopes, DomainError> {
    parse_scopes_for(names, TenantKind::Merchant)
}

/// Parses scope names for a key of `tenant`; unknown scopes, scopes of the other tenant kind
/// and an empty list are refused.
pub fn parse_scopes_for(names: &[String], tenant: TenantKind) -> Result<Scopes, DomainError> {
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        out.push(
            Scope::parse(n)
                .filter(|s| s.tenant() == tenant)
                .ok_or_else(|| DomainError::Validation {
                    code: "invalid_scopes",
                    detail: format!(
                        "unknown scope; valid scopes are {}",
                        Scope::ALL
                            .into_iter()
                            .filter(|s| s.tenant() == tenant)
                            .map(Scope::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })?,
        );
    }
    let scopes: Scopes = out.into_iter().collect();
    if scopes.is_empty() {
        return Err(DomainError::Validation {
            code: "invalid_scopes",
            detail: "give at least one scope".into(),
        });
    }
    Ok(scopes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test should stop loudly")]
mod tests {
    use super::*;
    use crate::domain::merchant::NewApiKey;

    #[test]
    fn default_scopes_exclude_card_reveal() {
        let d = Scopes::default_for_merchant_key();
        assert!(!d.contains(Scope::CardReveal));
        for s in Scope::ALL.into_iter().filter(|s| *s != Scope::CardReveal) {
            assert_eq!(d.contains(s), s.tenant() == TenantKind::Merchant, "{s}");
        }
        let i = Scopes::default_for_issuer_key();
        assert!(!i.contains(Scope::IssuerClickToPayPii));
        assert!(i.contains(Scope::IssuerOperations) && !i.contains(Scope::TokensRead));
    }

    #[test]
    fn keys_hold_scopes_of_their_own_tenant_kind_only() {
        assert!(parse_scopes(&["issuer:orders".into()]).is_err());
        assert!(parse_scopes_for(&["issuer:orders".into()], TenantKind::Issuer).is_ok());
        assert!(parse_scopes_for(&["tokens:read".into()], TenantKind::Issuer).is_err());
    }

    #[test]
    fn scopes_round_trip_as_names() {
        let s: Scopes = [Scope::Cryptograms, Scope::CardReveal]
            .into_iter()
            .collect();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, r#"["cryptograms","card:reveal"]"#);
        assert_eq!(serde_json::from_str::<Scopes>(&j).unwrap(), s);
        for sc in Scope::ALL {
            assert_eq!(Scope::parse(sc.as_str()), Some(sc));
        }
    }

    #[test]
    fn parse_scopes_refuses_unknown_and_empty() {
        assert!(parse_scopes(&["tokens:read".into()]).is_ok());
        assert!(parse_scopes(&["tokens:admin".into()]).is_err());
        assert!(parse_scopes(&[]).is_err());
    }

    #[test]
    fn key_ids_are_stable_and_short() {
        let h = ApiKeyHash::of("tgk_x");
        assert_eq!(key_id(&h), key_id(&h));
        assert_eq!(key_id(&h).len(), 28);
        assert!(is_key_id(&key_id(&h)));
        assert!(is_key_id(&key_id(&NewApiKey::generate().hash)));
        for bad in [
            "",
            "key_",
            "key_unknown",
            "key_0123456789abcdef0123456",
            "key_0123456789abcdef012345678",
            "key_0123456789ABCDEF01234567",
            "tok_0123456789abcdef01234567",
            "key_0123456789abcdef0123456g",
        ] {
            assert!(!is_key_id(bad), "{bad}");
        }
    }
}
