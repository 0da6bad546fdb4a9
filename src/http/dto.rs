//! Wire types of the public REST API (camelCase JSON). Domain types are mapped here so the API
//! contract does not change when internals do.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::domain::card::{Brand, Pan};
use crate::domain::merchant::Merchant;
use crate::domain::provider::{Cryptogram, TransactionType};
use crate::domain::token::{TokenRecord, Usage};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateMerchantRequest {
    pub name: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MerchantCreated<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub api_key: &'a str,
    pub d1_merchant_id: Option<&'a str>,
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CardInput {
    pub number: Pan,
    pub expiry_month: u8,
    pub expiry_year: u16,
    /// Accepted for compatibility with checkout forms; not stored (not needed for tokenization).
    #[serde(default)]
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTokenRequest {
    pub card: CardInput,
    pub usage: Usage,
    #[serde(default)]
    pub customer_reference: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CardView<'a> {
    pub brand: Brand,
    pub bin: &'a str,
    pub last4: &'a str,
    pub expiry_month: u8,
    pub expiry_year: u16,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkTokenView<'a> {
    pub id: &'a str,
    pub last4: Option<&'a str>,
    pub expiry_month: Option<u8>,
    pub expiry_year: Option<u16>,
    pub par: Option<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenView<'a> {
    pub id: &'a str,
    pub status: &'a str,
    pub usage: Usage,
    pub card: CardView<'a>,
    pub network_token: Option<NetworkTokenView<'a>>,
    pub customer_reference: Option<&'a str>,
    pub created_at: String,
    pub updated_at: String,
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
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
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AmountInput {
    pub value: u64,
    pub currency: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateCryptogramRequest {
    pub transaction_type: TransactionType,
    #[serde(default)]
    pub amount: Option<AmountInput>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CryptogramView<'a> {
    pub token_number: &'a str,
    pub expiry_month: u8,
    pub expiry_year: u16,
    pub cryptogram: &'a str,
    pub eci: &'a str,
}

impl<'a> From<&'a Cryptogram> for CryptogramView<'a> {
    fn from(c: &'a Cryptogram) -> Self {
        CryptogramView {
            token_number: &c.token_number,
            expiry_month: c.expiry.month,
            expiry_year: c.expiry.year,
            cryptogram: &c.cryptogram,
            eci: &c.eci,
        }
    }
}
