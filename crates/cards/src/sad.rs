//! Sensitive authentication data and embossing text for physical card orders: the card
//! security code ([`Cvc`]), the magnetic-stripe tracks ([`Track1`], [`Track2`]) and the
//! cardholder name to emboss ([`EmbossName`]).
//!
//! Like [`crate::Pan`], each is built only by parsing, prints redacted, has no `Serialize`,
//! and wipes its bytes when dropped. PCI DSS 3.3 forbids keeping the CVC and track data after
//! the request they came in: these types exist so that they cannot leak on the way (a log line,
//! an error message, a debug print) and are gone from memory when the request ends.
//!
//! Shapes (ISO/IEC 7813, without start/end sentinels and LRC): track 1 is format code `B`
//! then at most 75 characters of the 6-bit alphabet (space to `_`, minus the sentinels `%` and
//! `?`); track 2 is digits and the field separator `=` (or `D`), at most 37 characters.

use std::fmt;

use serde::{Deserialize, Deserializer};
use zeroize::Zeroize;

/// Why a value was refused. Messages never contain the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SadError {
    #[error("card security code must be 3 or 4 digits")]
    Cvc,
    #[error("track 1 must be ISO 7813 format B data without sentinels (at most 76 characters)")]
    Track1,
    #[error("track 2 must be digits and '=' without sentinels (at most 37 characters)")]
    Track2,
    #[error("cardholder name must be 2 to 26 letters, digits, spaces or . ' - /")]
    EmbossName,
}

/// Longest name that can be embossed on a card (and D1's limit for cardholder names).
pub const MAX_EMBOSS_NAME: usize = 26;

macro_rules! secret_text {
    ($(#[$doc:meta])* $name:ident, $check:expr, $err:expr, $label:literal) => {
        $(#[$doc])*
        pub struct $name(String);

        impl $name {
            /// Parses `s` (the input is not kept on failure).
            pub fn parse(s: &str) -> Result<$name, SadError> {
                let check: fn(&str) -> bool = $check;
                if check(s) {
                    Ok($name(s.to_owned()))
                } else {
                    Err($err)
                }
            }

            /// The text, borrowed for as short a time as possible (into a JWE plaintext).
            pub fn expose(&self) -> &str {
                &self.0
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                self.0.zeroize();
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!($label, "(<redacted>)"))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(SecretVisitor(|s: &str| {
                    $name::parse(s).map_err(|e| e.to_string())
                }))
            }
        }
    };
}

/// Reads a secret string without ever quoting the input in an error: for a number (a CVC sent
/// unquoted), serde_json's own type error would print it, so every other type is answered
/// here with a fixed text.
struct SecretVisitor<F>(F);

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> serde::de::Visitor<'de> for SecretVisitor<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
    fn visit_string<E: serde::de::Error>(self, mut v: String) -> Result<T, E> {
        let r = (self.0)(&v).map_err(E::custom);
        v.zeroize();
        r
    }
    fn visit_u64<E: serde::de::Error>(self, _v: u64) -> Result<T, E> {
        Err(E::custom("expected a JSON string"))
    }
    fn visit_i64<E: serde::de::Error>(self, _v: i64) -> Result<T, E> {
        Err(E::custom("expected a JSON string"))
    }
    fn visit_f64<E: serde::de::Error>(self, _v: f64) -> Result<T, E> {
        Err(E::custom("expected a JSON string"))
    }
}

secret_text!(
    /// A card security code (CVC2/CVV2/CID): 3 or 4 digits.
    Cvc,
    |s| (3..=4).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()),
    SadError::Cvc,
    "Cvc"
);

secret_text!(
    /// Magnetic-stripe track 1 data, without sentinels.
    Track1,
    |s| (2..=76).contains(&s.len())
        && s.starts_with('B')
        && s.bytes().all(|b| (0x20..=0x5f).contains(&b) && b != b'%' && b != b'?'),
    SadError::Track1,
    "Track1"
);

secret_text!(
    /// Magnetic-stripe track 2 data, without sentinels.
    Track2,
    |s| (2..=37).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit() || b == b'=' || b == b'D'),
    SadError::Track2,
    "Track2"
);

secret_text!(
    /// The cardholder name to emboss: 2 to 26 characters of the embossing alphabet.
    EmbossName,
    |s| (2..=MAX_EMBOSS_NAME).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b" .'-/".contains(&b)),
    SadError::EmbossName,
    "EmbossName"
);

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test should stop loudly")]
mod tests {
    use super::*;

    #[test]
    fn parse_and_redact() {
        let c = Cvc::parse("737").unwrap();
        assert_eq!(c.expose(), "737");
        assert_eq!(format!("{c:?}"), "Cvc(<redacted>)");
        assert_eq!(Cvc::parse("73").err(), Some(SadError::Cvc));
        assert_eq!(Cvc::parse("73a").err(), Some(SadError::Cvc));
        assert!(Track1::parse("B4111111111111111^DOE/JANE^30121010000000000000").is_ok());
        assert_eq!(Track1::parse("%B41^X?").err(), Some(SadError::Track1));
        assert!(Track2::parse("4111111111111111=30121010000000000").is_ok());
        assert_eq!(Track2::parse(";4111=3012?").err(), Some(SadError::Track2));
        assert!(EmbossName::parse("JANE O'DOE").is_ok());
        assert!(EmbossName::parse("A NAME LONGER THAN TWENTY SIX").is_err());
        assert!(!SadError::Track2.to_string().contains("4111"));
    }

    #[test]
    fn deserialize_never_echoes_the_value() {
        let e = serde_json::from_str::<Cvc>(r#""12345""#).unwrap_err();
        assert!(!e.to_string().contains("12345"));
        let e = serde_json::from_str::<Cvc>("737").unwrap_err();
        assert!(!e.to_string().contains("737"));
        let t: Track2 = serde_json::from_str(r#""4111111111111111=3012""#).unwrap();
        assert!(!format!("{t:?}").contains("4111"));
    }
}
