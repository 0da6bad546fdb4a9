//! Wire types of the public REST API (camelCase JSON). Domain types are mapped here so the API
//! contract does not change when internals do.
//!
//! Every type here derives `utoipa::ToSchema`: `GET /openapi.json` (src/http/openapi.rs) is
//! generated from these definitions, and tests/it/openapi.rs validates real responses against
//! it. Domain types used in fields (`Usage`, `Brand`, `TransactionType`, `Frequency`) get their
//! schemas in src/http/openapi.rs, so the domain itself knows nothing of OpenAPI.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;

use crate::domain::merchant::Merchant;
use crate::domain::provider::{Cryptogram, TransactionType};
use crate::domain::recurring::{AgreementAmount, Frequency, RecurringAgreement};
use crate::domain::service::IssuedCryptogram;
use crate::domain::token::{TokenRecord, Usage};
use tokengate_cards::{Brand, Pan};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMerchantRequest {
    /// 1 to 200 printable characters.
    #[schema(example = "Acme", min_length = 1)]
    pub name: String,
}

/// A new merchant. The API key is shown here once; only its hash is stored.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MerchantCreated<'a> {
    #[schema(example = "mer_NJayePY2ypiUCAIv")]
    pub id: &'a str,
    pub name: &'a str,
    /// The merchant's API key (`Authorization: Bearer <apiKey>`). Shown once.
    #[schema(example = "tgk_...")]
    pub api_key: &'a str,
    /// The merchant's id at D1; `null` when D1 is disabled.
    pub d1_merchant_id: Option<&'a str>,
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl<'a> MerchantCreated<'a> {
    pub fn new(m: &'a Merchant, api_key: &'a str) -> Self {
        MerchantCreated {
            id: m.id.as_str(),
            name: &m.name,
            api_key,
            d1_merchant_id: m.d1_merchant_id.as_deref(),
            created_at: rfc3339(m.created_at),
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CardInput {
    /// 12-19 digits, Luhn-valid; spaces and dashes between digits are accepted and removed.
    /// Never echoed back.
    #[schema(value_type = String, example = "4111111111111111", pattern = "^[0-9 -]+$")]
    pub number: Pan,
    #[schema(minimum = 1, maximum = 12, example = 12)]
    pub expiry_month: u8,
    /// Four digits (two digits are read as 20YY).
    #[schema(example = 2030)]
    pub expiry_year: u16,
    /// Accepted for compatibility with checkout forms; not stored (not needed for tokenization).
    #[serde(default)]
    #[schema(value_type = Option<String>, max_length = 64)]
    pub holder_name: Option<HolderName>,
}

/// Cardholder name: validated, never echoed or stored.
pub struct HolderName;

impl<'de> Deserialize<'de> for HolderName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.chars().count() > 64 || s.chars().any(char::is_control) {
            return Err(serde::de::Error::custom(
                "holderName must be at most 64 printable characters",
            ));
        }
        Ok(HolderName)
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTokenRequest {
    pub card: CardInput,
    pub usage: Usage,
    /// The merchant's own reference, 1 to 128 printable characters.
    #[serde(default)]
    #[schema(example = "cust-42")]
    pub customer_reference: Option<String>,
}

/// What is kept in clear about the card: never the full number.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Card)]
pub struct CardView<'a> {
    #[schema(value_type = crate::http::schemas::BrandSchema)]
    pub brand: Brand,
    #[schema(example = "411111")]
    pub bin: &'a str,
    #[schema(example = "1111")]
    pub last4: &'a str,
    pub expiry_month: u8,
    pub expiry_year: u16,
}

/// The network token D1 issued for the card (its number is only ever in a cryptogram response).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = NetworkToken)]
pub struct NetworkTokenView<'a> {
    /// D1's token id.
    pub id: &'a str,
    pub last4: Option<&'a str>,
    pub expiry_month: Option<u8>,
    pub expiry_year: Option<u16>,
    /// Payment Account Reference.
    pub par: Option<&'a str>,
}

/// A token: what the gateway knows about a tokenized card.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Token)]
pub struct TokenView<'a> {
    #[schema(example = "tok_d7XXXyQu2WZRKlyWvsMJRA")]
    pub id: &'a str,
    /// `PENDING`, `ACTIVE`, `SUSPENDED`, `INACTIVE`, `EXPIRED`, `DELETED`, or a value D1 adds
    /// later (passed through verbatim, so this is not a closed enum).
    #[schema(example = "ACTIVE")]
    pub status: &'a str,
    pub usage: Usage,
    pub card: CardView<'a>,
    pub network_token: Option<NetworkTokenView<'a>>,
    pub customer_reference: Option<&'a str>,
    /// The recurring agreement recorded for merchant-initiated payments, if any
    /// (`PUT /v1/tokens/{id}/recurring-agreement`).
    pub recurring_agreement: Option<RecurringAgreementView<'a>>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Rfc3339Time,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Rfc3339Time,
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// A timestamp that serialises as [`rfc3339`] does, formatted on the stack: a token view is
/// written on every GET and dedup hit, and two `String`s per view showed in their profile.
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339Time(pub OffsetDateTime);

impl Serialize for Rfc3339Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The longest RFC 3339 form `time` writes (nanoseconds, an offset) is 35 bytes.
        let mut buf = [0u8; 64];
        let mut out = &mut buf[..];
        // The length is what the writer consumed: the count `format_into` returns does not
        // include every part (the fraction of a second was missing from it).
        let n = match self.0.format_into(&mut out, &Rfc3339) {
            Ok(_) => 64 - out.len(),
            // A year `time` cannot write as RFC 3339: "", as [`rfc3339`] gives.
            Err(_) => 0,
        };
        s.serialize_str(std::str::from_utf8(&buf[..n]).unwrap_or_default())
    }
}

impl<'a> From<&'a TokenRecord> for TokenView<'a> {
    fn from(r: &'a TokenRecord) -> Self {
        TokenView {
            id: r.id.as_str(),
            status: r.status.as_str(),
            usage: r.usage,
            card: CardView {
                brand: r.card.brand,
                bin: &r.card.bin,
                last4: &r.card.last4,
                expiry_month: r.card.expiry.month,
                expiry_year: r.card.expiry.year,
            },
            network_token: r.network_token.as_ref().map(|n| NetworkTokenView {
                id: &n.d1_token_id,
                last4: n.last4.as_deref(),
                expiry_month: n.expiry.map(|e| e.month),
                expiry_year: n.expiry.map(|e| e.year),
                par: n.par.as_deref(),
            }),
            customer_reference: r.customer_reference.as_deref(),
            recurring_agreement: r
                .recurring_agreement
                .as_ref()
                .map(RecurringAgreementView::from),
            created_at: Rfc3339Time(r.created_at),
            updated_at: Rfc3339Time(r.updated_at),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = Amount)]
pub struct AmountInput {
    /// Minor units (cents).
    #[schema(example = 1299)]
    pub value: u64,
    /// ISO 4217 alphabetic code.
    #[schema(example = "EUR", min_length = 3, max_length = 3)]
    pub currency: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateCryptogramRequest {
    pub transaction_type: TransactionType,
    #[serde(default)]
    pub amount: Option<AmountInput>,
}

/// Token credentials and a cryptogram for one card-not-present authorization. Never stored.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Cryptogram)]
pub struct CryptogramView<'a> {
    /// The network token number (not the card number).
    pub token_number: &'a str,
    pub expiry_month: u8,
    pub expiry_year: u16,
    #[schema(example = "URkiExOo/1Z9Fblq657nvhbj0lg=")]
    pub cryptogram: &'a str,
    /// Electronic Commerce Indicator.
    #[schema(example = "05")]
    pub eci: &'a str,
    /// `MIT` of a token with a recurring agreement only: the network transaction id of the
    /// initial customer-initiated authorization, to send with this authorization. Absent on
    /// `CIT`, and on an `MIT` of a token without an agreement.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "MCC123ABC0115")]
    pub network_transaction_id: Option<&'a str>,
    /// With `networkTransactionId`: the agreement's reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement_reference: Option<&'a str>,
}

/// `GET /healthz` and `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Health)]
pub struct HealthView {
    /// `ok` (process alive) or `ready` (store reachable).
    #[schema(example = "ok")]
    pub status: &'static str,
}

impl<'a> From<&'a Cryptogram> for CryptogramView<'a> {
    fn from(c: &'a Cryptogram) -> Self {
        CryptogramView {
            token_number: &c.token_number,
            expiry_month: c.expiry.month,
            expiry_year: c.expiry.year,
            cryptogram: &c.cryptogram,
            eci: &c.eci,
            network_transaction_id: None,
            agreement_reference: None,
        }
    }
}

impl<'a> From<&'a IssuedCryptogram> for CryptogramView<'a> {
    fn from(c: &'a IssuedCryptogram) -> Self {
        let a = c.agreement.as_ref();
        CryptogramView {
            network_transaction_id: a.map(|a| a.network_transaction_id.as_str()),
            agreement_reference: a.map(|a| a.agreement_reference.as_str()),
            ..CryptogramView::from(&c.cryptogram)
        }
    }
}

/// `PUT /v1/tokens/{id}/recurring-agreement`: the outcome of the initial customer-initiated
/// authorization of a recurring series. Values are checked by the domain (`domain::recurring`),
/// so a wrong one is a 422 with its own code; `frequency` and `initialTransactionAt` are read
/// as text for that reason.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PutRecurringAgreementRequest {
    /// The scheme's id of the initial CIT (Visa transaction id, Mastercard trace id, ...):
    /// 1 to 64 characters of `A-Z`, `a-z`, `0-9`, `.`, `_`, `:`, `-`.
    #[schema(
        example = "MCC123ABC0115",
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9._:-]+$"
    )]
    pub network_transaction_id: String,
    /// The merchant's or PSP's reference of the agreement, 1 to 64 printable characters.
    #[schema(example = "sub_8812", min_length = 1, max_length = 64)]
    pub agreement_reference: String,
    /// The fixed amount per charge, if the agreement has one (`value` at least 1).
    #[serde(default)]
    pub amount: Option<AmountInput>,
    #[serde(default)]
    #[schema(value_type = Option<Frequency>)]
    pub frequency: Option<String>,
    /// When the initial CIT was authorized (RFC 3339), not in the future.
    #[serde(default)]
    #[schema(format = DateTime)]
    pub initial_transaction_at: Option<String>,
}

/// An agreed amount per charge.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = AgreementAmount)]
pub struct AgreementAmountView<'a> {
    /// Minor units (cents).
    #[schema(example = 1999)]
    pub value: u64,
    /// ISO 4217 alphabetic code.
    #[schema(example = "EUR")]
    pub currency: &'a str,
}

/// A token's recurring agreement: what every `MIT` cryptogram of the token carries. No card
/// data.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = RecurringAgreement)]
pub struct RecurringAgreementView<'a> {
    #[schema(example = "MCC123ABC0115")]
    pub network_transaction_id: &'a str,
    #[schema(example = "sub_8812")]
    pub agreement_reference: &'a str,
    pub amount: Option<AgreementAmountView<'a>>,
    pub frequency: Option<Frequency>,
    #[schema(format = DateTime)]
    pub initial_transaction_at: Option<String>,
    /// When these terms were first recorded (recording the same terms again keeps it).
    #[schema(format = DateTime)]
    pub recorded_at: String,
}

impl<'a> From<&'a RecurringAgreement> for RecurringAgreementView<'a> {
    fn from(a: &'a RecurringAgreement) -> Self {
        RecurringAgreementView {
            network_transaction_id: &a.network_transaction_id,
            agreement_reference: &a.agreement_reference,
            amount: a
                .amount
                .as_ref()
                .map(|m: &'a AgreementAmount| AgreementAmountView {
                    value: m.value,
                    currency: &m.currency,
                }),
            frequency: a.frequency,
            initial_transaction_at: a.initial_transaction_at.map(rfc3339),
            recorded_at: rfc3339(a.recorded_at),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test should stop loudly")]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_time_serialises_as_rfc3339_does() {
        let base = time::macros::datetime!(2026-12-06 00:43:49 UTC);
        for t in [
            base,
            base + time::Duration::nanoseconds(700_000_000),
            base + time::Duration::nanoseconds(123_456_789),
            base + time::Duration::nanoseconds(1),
            base.to_offset(time::macros::offset!(+05:30)),
            OffsetDateTime::now_utc(),
        ] {
            let json = serde_json::to_string(&Rfc3339Time(t)).unwrap();
            assert_eq!(json, format!("\"{}\"", rfc3339(t)));
        }
    }
}
