//! Token records: what the vault keeps per tokenized card, and the identifiers around them.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;

use tokengate_cards::{Brand, Expiry};

/// The vault's output types live with the vault; records hold them.
pub use crate::crypto::{Fingerprints, SealedPan};

/// Random identifier with a type prefix: `tok_` + 128 random bits, base64url (22 characters).
pub(crate) fn random_id(prefix: &str, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(&buf))
}

/// Checks the shape of an id received from a client before it reaches storage keys.
pub(crate) fn valid_id(s: &str, prefix: &str, body_len: usize) -> bool {
    s.len() == prefix.len() + body_len
        && s.starts_with(prefix)
        && s[prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident, $prefix:literal, $bytes:literal, $chars:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;
            pub fn generate() -> Self {
                $name(random_id($prefix, $bytes))
            }
            /// Accepts only well-formed ids, so a client cannot smuggle key separators or
            /// arbitrary text into storage keys.
            pub fn parse(s: &str) -> Option<Self> {
                valid_id(s, $prefix, $chars).then(|| $name(s.to_owned()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        /// The vault binds ciphertexts to ids as strings (it knows no domain types).
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// Our token id, handed to merchants instead of the PAN.
    TokenId, "tok_", 16, 22
);
pub(crate) use id_type;

id_type!(
    /// A merchant (tenant) id.
    MerchantId, "mer_", 12, 16
);

impl MerchantId {
    /// The id an issuer's API keys and webhook endpoints are filed under: the key and webhook
    /// stores file records by tenant id, and an issuer's id (`iss_`, same length) is one. Only
    /// built from a parsed `IssuerId`, so it cannot carry separators into storage keys.
    pub(crate) fn of_issuer(issuer_id: &str) -> MerchantId {
        MerchantId(issuer_id.to_owned())
    }

    /// [`MerchantId::parse`], or an issuer's id (see [`MerchantId::of_issuer`]): what a key
    /// store index entry may name.
    pub fn parse_tenant(s: &str) -> Option<MerchantId> {
        MerchantId::parse(s).or_else(|| valid_id(s, "iss_", 16).then(|| MerchantId(s.to_owned())))
    }

    /// Whether this tenant id names an issuer rather than a merchant.
    pub fn is_issuer(&self) -> bool {
        self.0.starts_with("iss_")
    }
}

/// What the merchant will use the token for (it decides the transaction type D1 expects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Usage {
    CardOnFile,
    OneOff,
    Recurring,
}

impl Usage {
    pub fn as_str(&self) -> &'static str {
        match self {
            Usage::CardOnFile => "CARD_ON_FILE",
            Usage::OneOff => "ONE_OFF",
            Usage::Recurring => "RECURRING",
        }
    }
}

/// Token status. D1 and the networks may add values; unknown ones are kept verbatim rather than
/// failing, so a new upstream status never breaks decoding of a stored record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenStatus {
    Pending,
    Active,
    Suspended,
    Inactive,
    Expired,
    Deleted,
    Unknown(String),
}

impl TokenStatus {
    /// The bounded label metrics and store counts use: the known statuses, `OTHER` for whatever
    /// else D1 sends (so a new upstream status cannot grow a label set without bound).
    pub fn label(&self) -> &'static str {
        crate::domain::ports::counts::count_label(self.as_str())
    }

    pub fn as_str(&self) -> &str {
        match self {
            TokenStatus::Pending => "PENDING",
            TokenStatus::Active => "ACTIVE",
            TokenStatus::Suspended => "SUSPENDED",
            TokenStatus::Inactive => "INACTIVE",
            TokenStatus::Expired => "EXPIRED",
            TokenStatus::Deleted => "DELETED",
            TokenStatus::Unknown(s) => s,
        }
    }

    pub fn parse(s: &str) -> TokenStatus {
        match s {
            "PENDING" => TokenStatus::Pending,
            "ACTIVE" => TokenStatus::Active,
            "SUSPENDED" => TokenStatus::Suspended,
            "INACTIVE" => TokenStatus::Inactive,
            "EXPIRED" => TokenStatus::Expired,
            "DELETED" => TokenStatus::Deleted,
            other => TokenStatus::Unknown(other.to_owned()),
        }
    }

    /// `DELETED` is terminal: nothing moves a token out of it.
    pub fn is_terminal(&self) -> bool {
        matches!(self, TokenStatus::Deleted)
    }
}

impl Serialize for TokenStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TokenStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(TokenStatus::parse(&s))
    }
}

/// Card metadata that may be shown (PCI DSS allows BIN + last four; expiry is not secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardMeta {
    pub brand: Brand,
    pub bin: String,
    pub last4: String,
    pub expiry: Expiry,
}

/// What D1 told us about the network token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkTokenMeta {
    /// D1's token id (opaque to us).
    pub d1_token_id: String,
    pub last4: Option<String>,
    pub expiry: Option<Expiry>,
    /// Payment account reference: links tokens of the same card across merchants.
    pub par: Option<String>,
}

/// One tokenized card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: TokenId,
    pub merchant_id: MerchantId,
    pub usage: Usage,
    pub status: TokenStatus,
    pub card: CardMeta,
    pub network_token: Option<NetworkTokenMeta>,
    pub customer_reference: Option<String>,
    pub sealed_pan: SealedPan,
    pub fingerprints: Fingerprints,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Time of the newest upstream (D1) event applied, to ignore stale ones.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_event_at: Option<OffsetDateTime>,
    /// The recurring agreement recorded for merchant-initiated payments (`domain::recurring`).
    /// `default`: records written before agreements existed decode without one.
    #[serde(default)]
    pub recurring_agreement: Option<crate::domain::recurring::RecurringAgreement>,
    /// Incremented on every update; storage refuses an update made against an older version.
    pub version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_bounded() {
        assert_eq!(TokenStatus::Active.label(), "ACTIVE");
        assert_eq!(TokenStatus::Unknown("tok_secret".into()).label(), "OTHER");
    }

    #[test]
    fn ids_have_128_bits_and_parse() {
        let t = TokenId::generate();
        assert!(t.as_str().starts_with("tok_"));
        assert_eq!(t.as_str().len(), 26);
        assert_eq!(TokenId::parse(t.as_str()), Some(t.clone()));
        assert_ne!(TokenId::generate(), t);
        assert_eq!(TokenId::parse("tok_short"), None);
        assert_eq!(TokenId::parse("tok_aaaaaaaaaaaaaaaaaaaa:x"), None);
        assert_eq!(TokenId::parse("tok_aaaaaaaaaaaaaaaaaa}{"), None);
        let m = MerchantId::generate();
        assert_eq!(MerchantId::parse(m.as_str()), Some(m));
    }

    #[test]
    fn records_written_before_recurring_agreements_still_decode() {
        // A record as stored before the field existed (no `recurring_agreement` key).
        let old = r#"{"id":"tok_d7XXXyQu2WZRKlyWvsMJRA","merchant_id":"mer_NJayePY2ypiUCAIv",
            "usage":"RECURRING","status":"ACTIVE",
            "card":{"brand":"VISA","bin":"411111","last4":"1111","expiry":{"month":12,"year":2030}},
            "network_token":null,"customer_reference":null,
            "sealed_pan":{"key_id":"k1","blob":"AQID"},
            "fingerprints":{"pan":"fp","pan_expiry":"fpe"},
            "created_at":"2026-01-02T03:04:05Z","updated_at":"2026-01-02T03:04:05Z",
            "version":2}"#;
        let rec: TokenRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.recurring_agreement, None);
        assert_eq!(rec.version, 2);
    }

    #[test]
    fn unknown_status_round_trips() {
        let s: TokenStatus = serde_json::from_str("\"FROZEN\"").unwrap();
        assert_eq!(s, TokenStatus::Unknown("FROZEN".into()));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"FROZEN\"");
        assert!(TokenStatus::Deleted.is_terminal());
    }
}
