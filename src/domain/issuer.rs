//! Issuers: the second kind of tenant. A bank or issuer processor that runs D1's issuer-side
//! flows (Click to Pay, physical card orders) through this gateway, with its own API keys and
//! scopes, isolated from merchants and from other issuers exactly as merchants are.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::DomainError;
use super::token::{MerchantId, id_type, random_id, valid_id};

id_type!(
    /// Our id of an issuer (tenant).
    IssuerId, "iss_", 12, 16
);

impl IssuerId {
    /// The tenant id its API keys and webhook endpoints are filed under in the shared key and
    /// webhook stores (`MerchantId::of_issuer`).
    pub fn tenant(&self) -> MerchantId {
        MerchantId::of_issuer(self.as_str())
    }

    /// The issuer a tenant id names, if it names one.
    pub fn from_tenant(t: &MerchantId) -> Option<IssuerId> {
        IssuerId::parse(t.as_str())
    }
}

/// An issuer onboarded by the operator of this gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Issuer {
    pub id: IssuerId,
    pub name: String,
    /// D1's id of the issuer: exactly 10 characters (D1-NOTES A2); part of every D1 path.
    pub d1_issuer_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// D1's issuer id: exactly 10 characters. We also require them to be `[A-Za-z0-9_-]`, since the
/// id becomes a path segment (ours and D1's) and part of storage keys.
pub fn check_d1_issuer_id(s: &str) -> Result<(), DomainError> {
    if s.len() == 10
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(DomainError::Validation {
            code: "invalid_d1_issuer_id",
            detail: "d1IssuerId must be exactly 10 characters of A-Z, a-z, 0-9, `-`, `_`".into(),
        })
    }
}

/// An issuer's display name: 1 to 200 printable characters.
pub fn check_issuer_name(name: &str) -> Result<String, DomainError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(DomainError::Validation {
            code: "invalid_issuer_name",
            detail: "name must be 1 to 200 printable characters".into(),
        });
    }
    Ok(name.to_owned())
}

/// D1's `cardId` pattern, `^[A-Za-z0-9_-]{1,48}$`, checked before anything reaches D1.
pub fn valid_card_id(s: &str) -> bool {
    (1..=48).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// D1's `consumerId` (not documented; we accept the `operationId` pattern,
/// `^[A-Za-z0-9_-]{1,64}$`, our inference in docs/d1-protocol.md).
pub fn valid_consumer_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test should stop loudly")]
mod tests {
    use super::*;

    #[test]
    fn d1_issuer_ids_are_exactly_ten_safe_characters() {
        assert!(check_d1_issuer_id("ISSUER0001").is_ok());
        for bad in [
            "",
            "ISSUER001",
            "ISSUER00011",
            "ISSUER 001",
            "ISSUER/001",
            "ÉSSUER0001",
        ] {
            assert!(check_d1_issuer_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn issuer_ids_round_trip_and_map_to_a_tenant() {
        let id = IssuerId::generate();
        assert_eq!(IssuerId::parse(id.as_str()), Some(id.clone()));
        let t = id.tenant();
        assert!(t.is_issuer());
        assert_eq!(MerchantId::parse_tenant(t.as_str()), Some(t.clone()));
        assert_eq!(IssuerId::from_tenant(&t), Some(id));
        assert!(MerchantId::parse(t.as_str()).is_none());
    }

    #[test]
    fn card_ids_follow_d1s_pattern() {
        assert!(valid_card_id("271b-6e47-8ec3-7f3f"));
        assert!(valid_card_id(&"a".repeat(48)));
        assert!(!valid_card_id(&"a".repeat(49)));
        assert!(!valid_card_id("a b"));
        assert!(!valid_card_id(""));
    }
}
