//! Recurring agreements (issue 14): the outcome of the initial customer-initiated authorization
//! (CIT) of a series of merchant-initiated payments (MIT), kept on the token.
//!
//! Why it lives here: the card schemes want the **network transaction id** of that initial CIT
//! on every later MIT, to link it to the customer's consent. The PSP learns it from the scheme
//! when the CIT is authorized and records it once; every later MIT cryptogram of the token then
//! hands it back (`Services::create_cryptogram`), so a billing engine needs nothing else.
//!
//! Rules:
//! - One agreement per token, replaced as a whole (a new initial CIT replaces the id).
//! - Stored on the token record ([`super::token::TokenRecord::recurring_agreement`]), so it
//!   follows the token's own compare-and-set, and needs no index of its own.
//! - Recorded only on an `ACTIVE` token (MIT cryptograms are only issued for those); ended on
//!   any token. It survives a D1 renewal (the network transaction id stays valid across card
//!   reissue) and goes with the token when the token is deleted.
//! - Never holds card data: ids, a reference, an amount, a frequency and times.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::error::DomainError;

/// Longest network transaction id accepted. Schemes use about 15 to 20 alphanumerics (Visa's
/// transaction id: 15 digits; Mastercard's trace id: up to 13 characters); the rest is headroom
/// for PSPs that prefix or pad them.
pub const MAX_NETWORK_TRANSACTION_ID: usize = 64;
/// Longest agreement reference accepted (characters).
pub const MAX_AGREEMENT_REFERENCE: usize = 64;
/// How far in the future `initialTransactionAt` may be: clock skew between the PSP and us.
const FUTURE_SKEW: time::Duration = time::Duration::minutes(5);

/// How often the merchant charges under the agreement (as the schemes' recurring indicators
/// distinguish them). `UNSCHEDULED`: card-on-file charges at no fixed interval (top-ups, usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Frequency {
    Daily,
    Weekly,
    Monthly,
    Quarterly,
    Yearly,
    Unscheduled,
}

impl Frequency {
    /// Every frequency; the `match` stops compiling when a variant is added, so lists built
    /// from this (the OpenAPI enum, parsing) cannot lag behind.
    pub fn all() -> [Frequency; 6] {
        let _exhaustive = |f: Frequency| match f {
            Frequency::Daily
            | Frequency::Weekly
            | Frequency::Monthly
            | Frequency::Quarterly
            | Frequency::Yearly
            | Frequency::Unscheduled => (),
        };
        [
            Frequency::Daily,
            Frequency::Weekly,
            Frequency::Monthly,
            Frequency::Quarterly,
            Frequency::Yearly,
            Frequency::Unscheduled,
        ]
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Frequency::Daily => "DAILY",
            Frequency::Weekly => "WEEKLY",
            Frequency::Monthly => "MONTHLY",
            Frequency::Quarterly => "QUARTERLY",
            Frequency::Yearly => "YEARLY",
            Frequency::Unscheduled => "UNSCHEDULED",
        }
    }

    pub fn parse(s: &str) -> Option<Frequency> {
        Frequency::all().into_iter().find(|f| f.as_str() == s)
    }
}

/// The agreed amount per charge, when the agreement has a fixed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgreementAmount {
    /// Minor units (cents), at least 1.
    pub value: u64,
    /// ISO 4217 alphabetic code.
    pub currency: String,
}

/// A recorded agreement, as stored on the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecurringAgreement {
    /// The scheme's id of the initial CIT, carried on every later MIT.
    pub network_transaction_id: String,
    /// The merchant's or PSP's own reference of the agreement (a subscription id).
    pub agreement_reference: String,
    #[serde(default)]
    pub amount: Option<AgreementAmount>,
    #[serde(default)]
    pub frequency: Option<Frequency>,
    /// When the initial CIT was authorized, as the PSP reports it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub initial_transaction_at: Option<OffsetDateTime>,
    /// When this agreement (with these values) was first recorded here.
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
}

impl RecurringAgreement {
    /// Whether `other` records the same agreement (the recording time aside): re-recording it
    /// changes nothing, so a repeated `PUT` answers exactly the same.
    pub fn same_terms(&self, other: &RecurringAgreement) -> bool {
        self.network_transaction_id == other.network_transaction_id
            && self.agreement_reference == other.agreement_reference
            && self.amount == other.amount
            && self.frequency == other.frequency
            && self.initial_transaction_at == other.initial_transaction_at
    }
}

/// An agreement as submitted, before validation. Values that would make a request unreadable
/// elsewhere (an unknown frequency, a malformed time) arrive here as text, so they are refused
/// with their own code (422) rather than as a malformed body.
#[derive(Debug, Clone)]
pub struct AgreementInput {
    pub network_transaction_id: String,
    pub agreement_reference: String,
    pub amount: Option<AgreementAmount>,
    pub frequency: Option<String>,
    pub initial_transaction_at: Option<String>,
}

fn invalid(code: &'static str, detail: &str) -> DomainError {
    DomainError::Validation {
        code,
        detail: detail.to_owned(),
    }
}

/// Letters, digits and `.`, `_`, `:`, `-`: what schemes and PSPs put in these ids, and nothing
/// that could be mistaken for structure wherever the id is copied (logs, CSV, ISO 8583 fields).
fn valid_network_transaction_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NETWORK_TRANSACTION_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn valid_agreement_reference(s: &str) -> bool {
    (1..=MAX_AGREEMENT_REFERENCE).contains(&s.chars().count())
        && !s.trim().is_empty()
        && !s.chars().any(char::is_control)
}

fn valid_currency(c: &str) -> bool {
    c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())
}

impl AgreementInput {
    /// Checks every field (the first wrong one is reported) and builds the agreement to store.
    /// Details name the field, never its value.
    pub fn validate(self, now: OffsetDateTime) -> Result<RecurringAgreement, DomainError> {
        if !valid_network_transaction_id(&self.network_transaction_id) {
            return Err(invalid(
                "invalid_network_transaction_id",
                "networkTransactionId must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'",
            ));
        }
        if !valid_agreement_reference(&self.agreement_reference) {
            return Err(invalid(
                "invalid_agreement_reference",
                "agreementReference must be 1 to 64 printable characters",
            ));
        }
        if let Some(a) = &self.amount
            && (a.value == 0 || !valid_currency(&a.currency))
        {
            return Err(invalid(
                "invalid_amount",
                "amount needs a value of at least 1 (minor units) and an ISO 4217 currency such as EUR",
            ));
        }
        let frequency = match self.frequency.as_deref() {
            None => None,
            Some(f) => Some(Frequency::parse(f).ok_or_else(|| {
                invalid(
                    "invalid_frequency",
                    "frequency must be one of DAILY, WEEKLY, MONTHLY, QUARTERLY, YEARLY, UNSCHEDULED",
                )
            })?),
        };
        let initial_transaction_at = match self.initial_transaction_at.as_deref() {
            None => None,
            Some(t) => {
                let refused = || {
                    invalid(
                        "invalid_initial_transaction_at",
                        "initialTransactionAt must be an RFC 3339 time from the year 2000 on, not in the future",
                    )
                };
                let at = OffsetDateTime::parse(t, &Rfc3339).map_err(|_| refused())?;
                if at.year() < 2000 || at > now + FUTURE_SKEW {
                    return Err(refused());
                }
                Some(at)
            }
        };
        Ok(RecurringAgreement {
            network_transaction_id: self.network_transaction_id,
            agreement_reference: self.agreement_reference,
            amount: self.amount,
            frequency,
            initial_transaction_at,
            recorded_at: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> AgreementInput {
        AgreementInput {
            network_transaction_id: "483299310332879".into(),
            agreement_reference: "sub_2024-0001".into(),
            amount: Some(AgreementAmount {
                value: 1999,
                currency: "EUR".into(),
            }),
            frequency: Some("MONTHLY".into()),
            initial_transaction_at: Some("2026-01-02T03:04:05Z".into()),
        }
    }

    fn code_of(r: Result<RecurringAgreement, DomainError>) -> &'static str {
        match r {
            Err(DomainError::Validation { code, .. }) => code,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn now() -> OffsetDateTime {
        time::macros::datetime!(2026-02-01 00:00 UTC)
    }

    #[test]
    fn a_full_agreement_validates() {
        let a = input().validate(now()).expect("valid");
        assert_eq!(a.frequency, Some(Frequency::Monthly));
        assert_eq!(a.recorded_at, now());
        assert_eq!(
            a.initial_transaction_at,
            Some(time::macros::datetime!(2026-01-02 03:04:05 UTC))
        );
        let minimal = AgreementInput {
            amount: None,
            frequency: None,
            initial_transaction_at: None,
            ..input()
        };
        assert!(minimal.validate(now()).is_ok());
    }

    #[test]
    fn every_field_is_checked() {
        let long = "A".repeat(65);
        for bad in ["", "abc def", "id/1", "ünïcode", long.as_str()] {
            let i = AgreementInput {
                network_transaction_id: bad.into(),
                ..input()
            };
            assert_eq!(
                code_of(i.validate(now())),
                "invalid_network_transaction_id",
                "{bad}"
            );
        }
        let max = "A".repeat(64);
        let i = AgreementInput {
            network_transaction_id: max,
            ..input()
        };
        assert!(i.validate(now()).is_ok());
        for bad in ["", "   ", "a\nb", &"é".repeat(65)] {
            let i = AgreementInput {
                agreement_reference: bad.into(),
                ..input()
            };
            assert_eq!(
                code_of(i.validate(now())),
                "invalid_agreement_reference",
                "{bad:?}"
            );
        }
        for (value, currency) in [(0, "EUR"), (1, "eur"), (1, "EURO"), (1, "")] {
            let i = AgreementInput {
                amount: Some(AgreementAmount {
                    value,
                    currency: currency.into(),
                }),
                ..input()
            };
            assert_eq!(code_of(i.validate(now())), "invalid_amount");
        }
        for bad in ["monthly", "BIMONTHLY", ""] {
            let i = AgreementInput {
                frequency: Some(bad.into()),
                ..input()
            };
            assert_eq!(code_of(i.validate(now())), "invalid_frequency", "{bad}");
        }
        for bad in [
            "yesterday",
            "2026-01-02",
            "1999-12-31T23:59:59Z",
            "2026-02-01T00:10:00Z",
        ] {
            let i = AgreementInput {
                initial_transaction_at: Some(bad.into()),
                ..input()
            };
            assert_eq!(
                code_of(i.validate(now())),
                "invalid_initial_transaction_at",
                "{bad}"
            );
        }
    }

    #[test]
    fn frequencies_round_trip() {
        for f in Frequency::all() {
            assert_eq!(Frequency::parse(f.as_str()), Some(f));
            assert_eq!(
                serde_json::to_value(f).ok(),
                Some(serde_json::Value::String(f.as_str().into()))
            );
        }
    }

    #[test]
    fn same_terms_ignore_the_recording_time() {
        let a = input().validate(now()).expect("valid");
        let b = input()
            .validate(now() + time::Duration::hours(1))
            .expect("valid");
        assert!(a.same_terms(&b));
        let c = AgreementInput {
            network_transaction_id: "other".into(),
            ..input()
        }
        .validate(now())
        .expect("valid");
        assert!(!a.same_terms(&c));
    }
}
