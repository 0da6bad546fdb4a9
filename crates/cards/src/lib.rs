//! Card data types: the primary account number ([`Pan`]), its brand and its expiry.
//!
//! A PAN is never a `String`. [`Pan`] is built only by parsing, prints masked, cannot be
//! serialized, compares in constant time and wipes its digits when dropped. Code that needs the
//! digits borrows them ([`Pan::expose_digits`]) for as short a time as possible.
//!
//! Input normalisation: a PAN may contain ASCII spaces or dashes between digits (what people
//! paste from a card or a form); they are removed. Any other character is rejected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};
use subtle::ConstantTimeEq;
use time::{Date, Month, OffsetDateTime};
use zeroize::{Zeroize, Zeroizing};

pub mod sad;
pub use sad::{Cvc, EmbossName, SadError, Track1, Track2};

/// Longest PAN defined by ISO/IEC 7812.
const MAX_PAN_LEN: usize = 19;
/// Shortest PAN we accept (some private-label schemes go down to 12).
const MIN_PAN_LEN: usize = 12;

/// Why a card field was refused. Messages never contain the rejected digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    #[error("card number must contain only digits (spaces and dashes are allowed as separators)")]
    PanCharacters,
    #[error("card number must have 12 to 19 digits")]
    PanLength,
    #[error("card number fails the Luhn check")]
    PanLuhn,
    #[error("expiry month must be between 1 and 12")]
    ExpiryMonth,
    #[error("expiry year is not a plausible year")]
    ExpiryYear,
    #[error("card is expired")]
    Expired,
    #[error("expiry date is too far in the future")]
    ExpiryTooFar,
}

impl CardError {
    /// Stable machine code for API clients.
    pub fn code(&self) -> &'static str {
        match self {
            CardError::PanCharacters | CardError::PanLength => "invalid_card_number",
            CardError::PanLuhn => "invalid_card_number_luhn",
            CardError::ExpiryMonth | CardError::ExpiryYear => "invalid_expiry",
            CardError::Expired => "card_expired",
            CardError::ExpiryTooFar => "invalid_expiry",
        }
    }
}

/// A validated primary account number.
///
/// The digits live in a boxed fixed-size buffer so that moving a `Pan` moves a pointer, not the
/// digits (a move of an inline array would leave an unzeroized copy behind on the stack).
pub struct Pan {
    digits: Box<[u8; MAX_PAN_LEN]>,
    len: u8,
}

impl Pan {
    /// The digits as ASCII text. Borrowed, so no copy escapes without the caller making one;
    /// callers that must copy (JWE plaintext, HMAC input) put the copy in a [`Zeroizing`] buffer.
    pub fn expose_digits(&self) -> &str {
        // The buffer holds only ASCII digits (checked in `parse`), so this cannot fail.
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    /// The digits as ASCII bytes (see [`Pan::expose_digits`]).
    pub fn as_bytes(&self) -> &[u8] {
        &self.digits[..self.len as usize]
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bank identification number: the first 6 digits (what PCI DSS allows to be shown).
    pub fn bin(&self) -> &str {
        &self.expose_digits()[..6]
    }

    pub fn last4(&self) -> &str {
        let d = self.expose_digits();
        &d[d.len() - 4..]
    }

    pub fn brand(&self) -> Brand {
        Brand::from_pan_digits(self.as_bytes())
    }

    /// A copy of the digits in a buffer that wipes itself when dropped.
    pub fn to_zeroizing(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.as_bytes().to_vec())
    }

    fn parse(input: &str) -> Result<Self, CardError> {
        let mut digits = Box::new([0u8; MAX_PAN_LEN]);
        let mut len = 0usize;
        for b in input.bytes() {
            match b {
                b'0'..=b'9' => {
                    if len == MAX_PAN_LEN {
                        digits.zeroize();
                        return Err(CardError::PanLength);
                    }
                    digits[len] = b;
                    len += 1;
                }
                b' ' | b'-' => {}
                _ => {
                    digits.zeroize();
                    return Err(CardError::PanCharacters);
                }
            }
        }
        if len < MIN_PAN_LEN {
            digits.zeroize();
            return Err(CardError::PanLength);
        }
        if !luhn_valid(&digits[..len]) {
            digits.zeroize();
            return Err(CardError::PanLuhn);
        }
        Ok(Pan {
            digits,
            len: len as u8,
        })
    }
}

impl FromStr for Pan {
    type Err = CardError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pan::parse(s)
    }
}

impl Drop for Pan {
    fn drop(&mut self) {
        self.digits.zeroize();
    }
}

impl Clone for Pan {
    fn clone(&self) -> Self {
        Pan {
            digits: self.digits.clone(),
            len: self.len,
        }
    }
}

impl PartialEq for Pan {
    /// Constant time in the digits, so timing does not reveal how much of two PANs match.
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && bool::from(self.as_bytes().ct_eq(other.as_bytes()))
    }
}
impl Eq for Pan {}

/// Masked: BIN and last four only, the most PCI DSS allows to display.
impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pan({})", self)
    }
}

impl fmt::Display for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = self.len() - 10;
        write!(f, "{}", self.bin())?;
        for _ in 0..hidden {
            f.write_str("*")?;
        }
        f.write_str(self.last4())
    }
}

impl<'de> Deserialize<'de> for Pan {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PanVisitor;
        impl serde::de::Visitor<'_> for PanVisitor {
            type Value = Pan;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a card number as a string of digits")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Pan, E> {
                Pan::parse(v).map_err(E::custom)
            }
            fn visit_string<E: serde::de::Error>(self, mut v: String) -> Result<Pan, E> {
                let r = Pan::parse(&v).map_err(E::custom);
                v.zeroize();
                r
            }
            // Numbers are refused without echoing them: serde's default message would quote the
            // value, and the value is a card number.
            fn visit_u64<E: serde::de::Error>(self, _v: u64) -> Result<Pan, E> {
                Err(E::custom("expected the card number as a JSON string"))
            }
            fn visit_i64<E: serde::de::Error>(self, _v: i64) -> Result<Pan, E> {
                Err(E::custom("expected the card number as a JSON string"))
            }
            fn visit_f64<E: serde::de::Error>(self, _v: f64) -> Result<Pan, E> {
                Err(E::custom("expected the card number as a JSON string"))
            }
        }
        // `deserialize_any`, not `deserialize_str`: for a non-string, serde_json's own type error
        // would quote the number (a card number); this way our visitor answers instead.
        deserializer.deserialize_any(PanVisitor)
    }
}

/// Whether free text (a merchant name, a customer reference) carries a card number: a run of
/// 12 to 19 digits, single spaces or dashes allowed between them (as [`Pan`] parses), that
/// passes the Luhn check. Such text must be refused, not stored: it would be kept in clear and
/// shown back in every answer and webhook that carries the field. Longer digit runs (order
/// numbers) are not card numbers and pass.
pub fn contains_pan(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut digits: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::with_capacity(MAX_PAN_LEN + 1));
    let mut i = 0;
    let mut found = false;
    while i <= bytes.len() {
        let b = bytes.get(i).copied();
        match b {
            Some(d @ b'0'..=b'9') => digits.push(d),
            // A separator continues a run only between two digits.
            Some(b' ' | b'-')
                if !digits.is_empty() && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {}
            _ => {
                if (MIN_PAN_LEN..=MAX_PAN_LEN).contains(&digits.len()) && luhn_valid(&digits) {
                    found = true;
                }
                digits.clear();
            }
        }
        i += 1;
    }
    found
}

/// The Luhn (mod 10) check over ASCII digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// Card scheme, derived from the BIN ranges the schemes publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Brand {
    Visa,
    Mastercard,
    Amex,
    Discover,
    Jcb,
    Unionpay,
    Diners,
    Unknown,
}

impl Brand {
    pub fn from_pan_digits(d: &[u8]) -> Brand {
        let prefix = |n: usize| -> u32 {
            d.iter()
                .take(n)
                .fold(0u32, |acc, b| acc * 10 + u32::from(b - b'0'))
        };
        let p1 = prefix(1);
        let p2 = prefix(2);
        let p3 = prefix(3);
        let p4 = prefix(4);
        match () {
            _ if p1 == 4 => Brand::Visa,
            _ if (51..=55).contains(&p2) || (2221..=2720).contains(&p4) => Brand::Mastercard,
            _ if p2 == 34 || p2 == 37 => Brand::Amex,
            _ if p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 => Brand::Discover,
            _ if (3528..=3589).contains(&p4) => Brand::Jcb,
            _ if p2 == 62 => Brand::Unionpay,
            _ if (300..=305).contains(&p3) || p4 == 3095 || p2 == 36 || p2 == 38 || p2 == 39 => {
                Brand::Diners
            }
            _ => Brand::Unknown,
        }
    }
}

/// Card expiry (month and four-digit year). Valid through the last day of the month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    pub month: u8,
    pub year: u16,
}

/// How far ahead an expiry may be; cards are issued for at most about 10 years, 20 leaves room.
const MAX_YEARS_AHEAD: i32 = 20;

impl Expiry {
    /// Validates month/year against `now`. Two-digit years are read as 20YY.
    pub fn new(month: u8, year: u16, now: OffsetDateTime) -> Result<Expiry, CardError> {
        if !(1..=12).contains(&month) {
            return Err(CardError::ExpiryMonth);
        }
        let year = if year < 100 { 2000 + year } else { year };
        if !(2000..=2099).contains(&year) {
            return Err(CardError::ExpiryYear);
        }
        let now_year = now.year();
        let now_month = u8::from(now.month());
        if (i32::from(year), month) < (now_year, now_month) {
            return Err(CardError::Expired);
        }
        if i32::from(year) > now_year + MAX_YEARS_AHEAD {
            return Err(CardError::ExpiryTooFar);
        }
        Ok(Expiry { month, year })
    }

    /// Builds an expiry without the "not in the past" check, for data that comes from a trusted
    /// source (D1 metadata, stored records).
    pub fn trusted(month: u8, year: u16) -> Option<Expiry> {
        ((1..=12).contains(&month) && (2000..=2099).contains(&year))
            .then_some(Expiry { month, year })
    }

    /// `MMYY`, the form D1 uses.
    pub fn mmyy(&self) -> String {
        format!("{:02}{:02}", self.month, self.year % 100)
    }

    /// Parses `MMYY`.
    pub fn from_mmyy(s: &str) -> Option<Expiry> {
        if s.len() != 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let month: u8 = s[..2].parse().ok()?;
        let yy: u16 = s[2..].parse().ok()?;
        Expiry::trusted(month, 2000 + yy)
    }

    /// Whether the card is still valid at `now` (valid through the end of its month).
    pub fn is_current(&self, now: OffsetDateTime) -> bool {
        let Ok(m) = Month::try_from(self.month) else {
            return false;
        };
        match Date::from_calendar_date(i32::from(self.year), m, 1) {
            Ok(first) => {
                (i32::from(self.year), self.month) >= (now.year(), u8::from(now.month()))
                    && first.year() >= 2000
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn card_numbers_in_free_text_are_found() {
        assert!(super::contains_pan("4111111111111111"));
        assert!(super::contains_pan("customer 4111 1111 1111 1111 paid"));
        assert!(super::contains_pan("ref:4111-1111-1111-1111"));
        assert!(!super::contains_pan("4111111111111112"), "Luhn fails");
        assert!(!super::contains_pan("cust-42 order 12345"));
        assert!(
            !super::contains_pan("41111111111111111111111"),
            "too long for a card"
        );
        assert!(
            !super::contains_pan("4111  1111 1111 1111"),
            "double space ends the run"
        );
        assert!(!super::contains_pan(""));
    }

    use time::macros::datetime;

    use super::*;

    const VISA: &str = "4111111111111111";

    #[test]
    fn parses_and_normalises_separators() {
        let p: Pan = "4111 1111-1111 1111".parse().unwrap();
        assert_eq!(p.expose_digits(), VISA);
        assert_eq!(p.bin(), "411111");
        assert_eq!(p.last4(), "1111");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!("4111111111111112".parse::<Pan>(), Err(CardError::PanLuhn));
        assert_eq!("41111111".parse::<Pan>(), Err(CardError::PanLength));
        assert_eq!(
            "41111111111111111111".parse::<Pan>(),
            Err(CardError::PanLength)
        );
        assert_eq!(
            "4111x11111111111".parse::<Pan>(),
            Err(CardError::PanCharacters)
        );
        assert_eq!("".parse::<Pan>(), Err(CardError::PanLength));
        assert_eq!(
            "４111111111111111".parse::<Pan>(),
            Err(CardError::PanCharacters)
        );
    }

    #[test]
    fn debug_and_display_are_masked() {
        let p: Pan = VISA.parse().unwrap();
        let dbg = format!("{p:?}");
        let disp = format!("{p}");
        assert!(!dbg.contains(VISA) && !disp.contains(VISA));
        assert_eq!(disp, "411111******1111");
        assert!(!dbg.contains("111111111111"));
    }

    #[test]
    fn equality() {
        let a: Pan = VISA.parse().unwrap();
        let b: Pan = "4111-1111-1111-1111".parse().unwrap();
        let c: Pan = "5555555555554444".parse().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn deserialize_refuses_numbers_without_echo() {
        #[derive(Deserialize)]
        struct W {
            #[allow(dead_code)]
            n: Pan,
        }
        let err = serde_json::from_str::<W>(r#"{"n": 4111111111111111}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains(VISA), "{err}");
        let err = serde_json::from_str::<W>(r#"{"n": "4111111111111112"}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("4111111111111112"), "{err}");
        assert!(serde_json::from_str::<W>(r#"{"n": "4111111111111111"}"#).is_ok());
    }

    #[test]
    fn brands() {
        let b = |s: &str| Brand::from_pan_digits(s.as_bytes());
        assert_eq!(b("4111111111111111"), Brand::Visa);
        assert_eq!(b("5555555555554444"), Brand::Mastercard);
        assert_eq!(b("2223000048400011"), Brand::Mastercard);
        assert_eq!(b("2720990000000000"), Brand::Mastercard);
        assert_eq!(b("2721000000000000"), Brand::Unknown);
        assert_eq!(b("378282246310005"), Brand::Amex);
        assert_eq!(b("6011111111111117"), Brand::Discover);
        assert_eq!(b("6445644564456445"), Brand::Discover);
        assert_eq!(b("3530111333300000"), Brand::Jcb);
        assert_eq!(b("6200000000000005"), Brand::Unionpay);
        assert_eq!(b("30569309025904"), Brand::Diners);
        assert_eq!(b("36227206271667"), Brand::Diners);
        assert_eq!(b("9999999999999995"), Brand::Unknown);
    }

    #[test]
    fn expiry_rules() {
        let now = datetime!(2026-11-23 12:00 UTC);
        assert!(Expiry::new(11, 2026, now).is_ok());
        assert_eq!(Expiry::new(10, 2026, now), Err(CardError::Expired));
        assert_eq!(Expiry::new(13, 2027, now), Err(CardError::ExpiryMonth));
        assert_eq!(Expiry::new(0, 2027, now), Err(CardError::ExpiryMonth));
        assert_eq!(Expiry::new(1, 2060, now), Err(CardError::ExpiryTooFar));
        assert_eq!(Expiry::new(1, 1999, now), Err(CardError::ExpiryYear));
        assert_eq!(Expiry::new(1, 28, now).unwrap().year, 2028);
        assert_eq!(Expiry::new(3, 2028, now).unwrap().mmyy(), "0328");
        assert_eq!(Expiry::from_mmyy("0328"), Expiry::trusted(3, 2028));
        assert_eq!(Expiry::from_mmyy("1328"), None);
    }
}
