//! D1 physical card orders (central issuance) on the wire: the production order, the batch
//! order, the production status and the path templates, shared by the gateway's D1 client and
//! the simulator so the two cannot drift.
//!
//! What is from D1's pages (seed `central-issuance-card-order`, docs/d1-protocol.md): the
//! endpoints `POST /issuers/{issuerId}/physicalCards/{cardId}/operations:production` (202
//! `{operationId}`) and `GET .../productionStatus`; the body "by `distributionChannel`"
//! (THALES | INSTANT | CENTRAL) with `issuerRequestId`, `services`, `encryptedData`,
//! `shipment` and `paymentApplication`; batches of 1 to 1,000 cards; `details.status` values and
//! `details.shipment {carrier, trackingNumber, status, message, trackingUrl}`.
//!
//! What is our inference (the pages name these objects but not their fields): the fields inside
//! `services`, `shipment` and `paymentApplication`, the plaintext of `encryptedData`
//! ([`ProductionCardData`]), the batch path and body, and the status response envelope. They
//! are kept minimal and decoded forward compatibly (unknown fields ignored, unknown statuses
//! kept verbatim), and the paths are configuration on the client side.
//!
//! The card data (PAN, expiry, CVC, track data, cardholder name) only exists in
//! [`ProductionCardData`], which wipes itself, prints redacted and is only ever serialized into
//! a wiping buffer that becomes the JWE plaintext.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// Default path of a production order under the issuer API base (from D1's pages).
pub const PRODUCTION_PATH: &str =
    "/issuers/{issuerId}/physicalCards/{cardId}/operations:production";
/// Default path of the production status of a card (from D1's pages).
pub const PRODUCTION_STATUS_PATH: &str =
    "/issuers/{issuerId}/physicalCards/{cardId}/productionStatus";
/// Default path of a batch order (our inference: D1 documents batches of 1..1000 cards, not
/// their path).
pub const PRODUCTION_BATCH_PATH: &str = "/issuers/{issuerId}/physicalCards/operations:production";

/// The order path templates under the issuer ("banking") base URL, with `{issuerId}` and
/// `{cardId}` placeholders: configuration on the client side, since the batch path is our
/// inference and the others may be corrected without code changes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProductionPaths {
    pub production: String,
    pub production_batch: String,
    pub production_status: String,
}

impl Default for ProductionPaths {
    fn default() -> Self {
        ProductionPaths {
            production: PRODUCTION_PATH.into(),
            production_batch: PRODUCTION_BATCH_PATH.into(),
            production_status: PRODUCTION_STATUS_PATH.into(),
        }
    }
}

impl ProductionPaths {
    /// Checks every template starts with `/` and uses only `{issuerId}` and `{cardId}` (the
    /// batch path only `{issuerId}`); the error names the bad key.
    pub fn validate(&self) -> Result<(), String> {
        for (name, t, card) in [
            ("production", &self.production, true),
            ("production_batch", &self.production_batch, false),
            ("production_status", &self.production_status, true),
        ] {
            if !t.starts_with('/') {
                return Err(format!("production_paths.{name} must start with '/'"));
            }
            let mut rest = t.replace("{issuerId}", "");
            if card {
                rest = rest.replace("{cardId}", "");
            }
            if rest.contains('{') || rest.contains('}') || rest.contains('?') {
                return Err(format!(
                    "production_paths.{name} has an unknown placeholder or a query string"
                ));
            }
        }
        Ok(())
    }
}

/// Most cards in one batch order (D1's pages).
pub const MAX_BATCH: usize = 1000;
/// Longest cardholder name that can be embossed (D1's limit for cardholder names).
pub const MAX_CARDHOLDER_NAME: usize = 26;

/// How the card reaches the cardholder. From D1's pages; the per-channel rules in
/// [`ProductionOrderRequest::validate`] are ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DistributionChannel {
    /// Produced and shipped by Thales' personalisation centre.
    Thales,
    /// Printed on the spot (branch or kiosk printer): nothing is shipped.
    Instant,
    /// Central issuance: produced centrally, shipped to the cardholder or in bulk to a branch.
    Central,
}

impl DistributionChannel {
    pub fn as_str(self) -> &'static str {
        match self {
            DistributionChannel::Thales => "THALES",
            DistributionChannel::Instant => "INSTANT",
            DistributionChannel::Central => "CENTRAL",
        }
    }
}

/// Production options chosen by the issuer (card product, packaging, carrier letter,
/// instant-issuance location). Field names are our inference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Services {
    /// The card product (plastic, personalisation profile) configured at onboarding.
    pub product_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packaging: Option<String>,
    /// Carrier letter template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_carrier: Option<String>,
    /// INSTANT only: the branch or kiosk whose printer produces the card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuance_location: Option<String>,
}

/// A postal address (personal data, not card data). Field names are our inference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    pub line1: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
}

/// Where and how a produced card travels. Field names are our inference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shipment {
    /// `CARDHOLDER` (to `address`) or `BULK` (to the branch or hub `bulkDestinationId`).
    pub delivery_type: String,
    /// e.g. `STANDARD`, `EXPRESS`, `COURIER` (configured per program).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk_destination_id: Option<String>,
}

/// The chip application to personalise. Field names are our inference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentApplication {
    /// Chip personalisation profile configured at onboarding.
    pub profile_id: String,
    /// EMV application identifier, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aid: Option<String>,
}

/// Body of `operations:production`. `encryptedData` is a compact JWE of
/// [`ProductionCardData`] to D1's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductionOrderRequest {
    pub issuer_request_id: String,
    pub distribution_channel: DistributionChannel,
    pub services: Services,
    pub encrypted_data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipment: Option<Shipment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_application: Option<PaymentApplication>,
}

/// Why an order is refused before (client) or at (simulator) D1. `field` is a JSON path of the
/// request; neither part ever quotes a value, so no card or personal data can be echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct OrderFieldError {
    pub field: &'static str,
    pub reason: &'static str,
    /// `true`: the field is absent (D1 `MISSING_FIELD`); `false`: present but invalid.
    pub missing: bool,
}

fn invalid(field: &'static str, reason: &'static str) -> OrderFieldError {
    OrderFieldError {
        field,
        reason,
        missing: false,
    }
}

fn missing(field: &'static str) -> OrderFieldError {
    OrderFieldError {
        field,
        reason: "is required",
        missing: true,
    }
}

/// `^[A-Za-z0-9_-]{1,max}$`: D1's id pattern (48 for card ids, 64 for the others).
pub fn valid_id(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A short configured reference (product, packaging, location, ...): 1 to 64 printable ASCII
/// characters.
fn valid_ref(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

fn check_ref(v: &str, field: &'static str) -> Result<(), OrderFieldError> {
    if valid_ref(v) {
        Ok(())
    } else {
        Err(invalid(field, "must be 1 to 64 printable characters"))
    }
}

fn check_opt_ref(v: Option<&str>, field: &'static str) -> Result<(), OrderFieldError> {
    v.map_or(Ok(()), |v| check_ref(v, field))
}

/// The order's options without its card data: everything of the body but `encryptedData`,
/// checked by both sides with the same rules.
#[derive(Debug, Clone, Copy)]
pub struct OrderOptions<'a> {
    pub issuer_request_id: &'a str,
    pub distribution_channel: DistributionChannel,
    pub services: &'a Services,
    pub shipment: Option<&'a Shipment>,
    pub payment_application: Option<&'a PaymentApplication>,
}

impl OrderOptions<'_> {
    /// The per-channel rules (ours; D1 only says the body depends on the channel):
    /// THALES and CENTRAL ship, so they need a `shipment`; a `CARDHOLDER` delivery needs an
    /// address, a `BULK` one (CENTRAL only) a destination id; INSTANT prints on the spot, so it
    /// takes no shipment and needs `services.issuanceLocation`.
    pub fn validate(&self) -> Result<(), OrderFieldError> {
        if !valid_id(self.issuer_request_id, 64) {
            return Err(invalid(
                "issuerRequestId",
                "must match ^[A-Za-z0-9_-]{1,64}$",
            ));
        }
        check_ref(&self.services.product_id, "services.productId")?;
        check_opt_ref(self.services.packaging.as_deref(), "services.packaging")?;
        check_opt_ref(
            self.services.card_carrier.as_deref(),
            "services.cardCarrier",
        )?;
        check_opt_ref(
            self.services.issuance_location.as_deref(),
            "services.issuanceLocation",
        )?;
        if let Some(app) = self.payment_application {
            check_ref(&app.profile_id, "paymentApplication.profileId")?;
            if let Some(aid) = &app.aid
                && !((10..=32).contains(&aid.len())
                    && aid.len() % 2 == 0
                    && aid.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(invalid(
                    "paymentApplication.aid",
                    "must be 10 to 32 hexadecimal digits",
                ));
            }
        }
        match (self.distribution_channel, self.shipment) {
            (DistributionChannel::Instant, Some(_)) => Err(invalid(
                "shipment",
                "must be absent for INSTANT (the card is printed on the spot)",
            )),
            (DistributionChannel::Instant, None) => {
                if self.services.issuance_location.is_none() {
                    return Err(missing("services.issuanceLocation"));
                }
                Ok(())
            }
            (_, None) => Err(missing("shipment")),
            (channel, Some(s)) => {
                if self.services.issuance_location.is_some() {
                    return Err(invalid(
                        "services.issuanceLocation",
                        "is only for INSTANT orders",
                    ));
                }
                check_shipment(channel, s)
            }
        }
    }
}

fn check_shipment(channel: DistributionChannel, s: &Shipment) -> Result<(), OrderFieldError> {
    check_opt_ref(s.method.as_deref(), "shipment.method")?;
    if let Some(name) = &s.recipient_name
        && !(1..=64).contains(&name.chars().count())
    {
        return Err(invalid(
            "shipment.recipientName",
            "must have 1 to 64 characters",
        ));
    }
    match s.delivery_type.as_str() {
        "CARDHOLDER" => {
            let a = s.address.as_ref().ok_or(missing("shipment.address"))?;
            let line = |v: &str| (1..=128).contains(&v.chars().count());
            if !line(&a.line1) {
                return Err(invalid(
                    "shipment.address.line1",
                    "must have 1 to 128 characters",
                ));
            }
            if a.line2.as_deref().is_some_and(|l| !line(l)) {
                return Err(invalid(
                    "shipment.address.line2",
                    "must have 1 to 128 characters",
                ));
            }
            if !line(&a.city) {
                return Err(invalid(
                    "shipment.address.city",
                    "must have 1 to 128 characters",
                ));
            }
            if !(1..=16).contains(&a.postal_code.len()) {
                return Err(invalid(
                    "shipment.address.postalCode",
                    "must have 1 to 16 characters",
                ));
            }
            if !(a.country.len() == 2 && a.country.bytes().all(|b| b.is_ascii_uppercase())) {
                return Err(invalid(
                    "shipment.address.country",
                    "must be an ISO 3166-1 alpha-2 code",
                ));
            }
            if s.bulk_destination_id.is_some() {
                return Err(invalid(
                    "shipment.bulkDestinationId",
                    "is only for BULK deliveries",
                ));
            }
            Ok(())
        }
        "BULK" => {
            if channel != DistributionChannel::Central {
                return Err(invalid(
                    "shipment.deliveryType",
                    "BULK is only for CENTRAL orders",
                ));
            }
            let id = s
                .bulk_destination_id
                .as_deref()
                .ok_or(missing("shipment.bulkDestinationId"))?;
            check_ref(id, "shipment.bulkDestinationId")
        }
        _ => Err(invalid(
            "shipment.deliveryType",
            "must be CARDHOLDER or BULK",
        )),
    }
}

impl ProductionOrderRequest {
    pub fn options(&self) -> OrderOptions<'_> {
        OrderOptions {
            issuer_request_id: &self.issuer_request_id,
            distribution_channel: self.distribution_channel,
            services: &self.services,
            shipment: self.shipment.as_ref(),
            payment_application: self.payment_application.as_ref(),
        }
    }

    /// The rules of [`OrderOptions::validate`] plus a non-empty `encryptedData`.
    pub fn validate(&self) -> Result<(), OrderFieldError> {
        self.options().validate()?;
        if self.encrypted_data.is_empty() {
            return Err(missing("encryptedData"));
        }
        Ok(())
    }
}

/// 202 answer of a production order: D1's operation id (D1 may add a `status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductionOrderResponse {
    pub operation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// The card data to personalise, the plaintext of `encryptedData` (our inference of its
/// fields, after the merchant-side `{pan, exp}`): PAN, expiry `MMYY`, the card security code,
/// the magnetic-stripe tracks (without sentinels) and the name to emboss.
///
/// Every field is wiped on drop; `Debug` is redacted; it is serialized only through
/// [`ProductionCardData::to_zeroizing_json`].
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductionCardData {
    pub pan: String,
    pub exp: String,
    pub cvc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track2: Option<String>,
    pub cardholder_name: String,
}

impl ProductionCardData {
    /// Serializes into a wiping buffer allocated once at its final size, so no reallocation
    /// leaves a copy of the card data behind in freed memory.
    pub fn to_zeroizing_json(&self) -> Result<Zeroizing<Vec<u8>>, serde_json::Error> {
        // Field names, quotes and separators, plus room for escapes in the free-text fields.
        let fixed =
            r#"{"pan":"","exp":"","cvc":"","track1":"","track2":"","cardholderName":""}"#.len();
        let text = self.pan.len()
            + self.exp.len()
            + self.cvc.len()
            + self.track1.as_ref().map_or(0, String::len)
            + self.track2.as_ref().map_or(0, String::len)
            + self.cardholder_name.len();
        // A JSON escape is at most 6 bytes per input byte (`\u00XX`).
        let mut buf = Zeroizing::new(Vec::with_capacity(fixed + 6 * text));
        serde_json::to_writer(&mut *buf, self)?;
        Ok(buf)
    }

    /// Checks the shapes (the PAN's digits and Luhn are checked by whoever parses it into a
    /// `Pan`): expiry `MMYY`, CVC 3 or 4 digits, tracks within the ISO 7813 lengths and
    /// alphabets, a cardholder name of 2 to 26 printable ASCII characters (embossing).
    pub fn validate_shape(&self) -> Result<(), OrderFieldError> {
        let exp = self.exp.as_bytes();
        if !(exp.len() == 4
            && exp.iter().all(u8::is_ascii_digit)
            && (b"01".as_slice()..=b"12".as_slice()).contains(&&exp[..2]))
        {
            return Err(invalid("exp", "must be MMYY"));
        }
        if !((3..=4).contains(&self.cvc.len()) && self.cvc.bytes().all(|b| b.is_ascii_digit())) {
            return Err(invalid("cvc", "must be 3 or 4 digits"));
        }
        if let Some(t1) = &self.track1
            && !((2..=76).contains(&t1.len())
                && t1.starts_with('B')
                && t1
                    .bytes()
                    .all(|b| (0x20..=0x5f).contains(&b) && b != b'%' && b != b'?'))
        {
            return Err(invalid(
                "track1",
                "must be ISO 7813 track 1 data without sentinels (format B, at most 76 characters)",
            ));
        }
        if let Some(t2) = &self.track2
            && !((2..=37).contains(&t2.len())
                && t2
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b'=' || b == b'D'))
        {
            return Err(invalid(
                "track2",
                "must be ISO 7813 track 2 data without sentinels (digits and '=', at most 37)",
            ));
        }
        let n = &self.cardholder_name;
        if !((2..=MAX_CARDHOLDER_NAME).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b" .'-/".contains(&b)))
        {
            return Err(invalid(
                "cardholderName",
                "must be 2 to 26 letters, digits, spaces or . ' - /",
            ));
        }
        Ok(())
    }
}

impl Drop for ProductionCardData {
    fn drop(&mut self) {
        self.pan.zeroize();
        self.exp.zeroize();
        self.cvc.zeroize();
        self.track1.zeroize();
        self.track2.zeroize();
        self.cardholder_name.zeroize();
    }
}

impl fmt::Debug for ProductionCardData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProductionCardData(<redacted>)")
    }
}

/// One card of a batch order: the card id and the body of a single order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchOrderItem {
    pub card_id: String,
    #[serde(flatten)]
    pub order: ProductionOrderRequest,
}

/// Body of a batch order (our inference of the path and envelope): 1 to [`MAX_BATCH`] cards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchOrderRequest {
    pub orders: Vec<BatchOrderItem>,
}

/// The outcome of one card of a batch: an operation id, or D1's error code for that card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchItemResult {
    pub card_id: String,
    pub issuer_request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// For humans; never acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Answer of a batch order: one result per card, in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchOrderResponse {
    pub results: Vec<BatchItemResult>,
}

/// A production stage, `details.status` (from D1's pages). Unknown values are kept verbatim
/// ([`ProductionStage::Other`]), as D1's compatibility rules ask.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProductionStage {
    Requested,
    Ready,
    Done,
    DataException,
    ProdException,
    Canceled,
    Shipped,
    Other(String),
}

impl ProductionStage {
    pub const KNOWN: [ProductionStage; 7] = [
        ProductionStage::Requested,
        ProductionStage::Ready,
        ProductionStage::Done,
        ProductionStage::DataException,
        ProductionStage::ProdException,
        ProductionStage::Canceled,
        ProductionStage::Shipped,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            ProductionStage::Requested => "CARD_PROD_REQUESTED",
            ProductionStage::Ready => "CARD_PROD_READY",
            ProductionStage::Done => "CARD_PROD_DONE",
            ProductionStage::DataException => "DATA_EXCEPTION",
            ProductionStage::ProdException => "CARD_PROD_EXCEPTION",
            ProductionStage::Canceled => "CARD_PROD_CANCELED",
            ProductionStage::Shipped => "CARD_SHIPPED",
            ProductionStage::Other(s) => s,
        }
    }

    pub fn parse(s: &str) -> ProductionStage {
        Self::KNOWN
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or_else(|| ProductionStage::Other(s.to_owned()))
    }

    /// No further production step follows (an exception, a cancellation, or shipped).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ProductionStage::DataException
                | ProductionStage::ProdException
                | ProductionStage::Canceled
                | ProductionStage::Shipped
        )
    }
}

impl Serialize for ProductionStage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ProductionStage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ProductionStage::parse(&s))
    }
}

/// Shipment tracking of a shipped card (from D1's pages).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShipmentTracking {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_url: Option<String>,
}

/// `details` of a PRODUCE operation and of the production status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductionDetails {
    pub status: ProductionStage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipment: Option<ShipmentTracking>,
}

/// `GET .../productionStatus` answer (envelope our inference; `details` from D1's pages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductionStatusResponse {
    pub card_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_request_id: Option<String>,
    pub details: ProductionDetails,
    /// RFC 3339 time of the last change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use serde_json::json;

    use super::*;

    fn services() -> Services {
        Services {
            product_id: "VISA_CLASSIC_01".into(),
            ..Default::default()
        }
    }

    fn to_cardholder() -> Shipment {
        Shipment {
            delivery_type: "CARDHOLDER".into(),
            method: Some("STANDARD".into()),
            recipient_name: Some("Jane Doe".into()),
            address: Some(Address {
                line1: "1 Rue de la Paix".into(),
                line2: None,
                city: "Paris".into(),
                postal_code: "75002".into(),
                country: "FR".into(),
            }),
            bulk_destination_id: None,
        }
    }

    fn order(channel: DistributionChannel, shipment: Option<Shipment>) -> ProductionOrderRequest {
        ProductionOrderRequest {
            issuer_request_id: "req-1".into(),
            distribution_channel: channel,
            services: services(),
            encrypted_data: "jwe".into(),
            shipment,
            payment_application: Some(PaymentApplication {
                profile_id: "EMV_PROFILE_A".into(),
                aid: Some("A0000000031010".into()),
            }),
        }
    }

    #[test]
    fn order_serializes_to_the_documented_shape() {
        let v = serde_json::to_value(order(DistributionChannel::Thales, Some(to_cardholder())))
            .unwrap();
        assert_eq!(v["issuerRequestId"], "req-1");
        assert_eq!(v["distributionChannel"], "THALES");
        assert_eq!(v["encryptedData"], "jwe");
        assert_eq!(v["services"]["productId"], "VISA_CLASSIC_01");
        assert_eq!(v["shipment"]["address"]["postalCode"], "75002");
        assert_eq!(v["paymentApplication"]["profileId"], "EMV_PROFILE_A");
        // Forward compatible: unknown fields are ignored.
        let mut with_extra = v.clone();
        with_extra["futureField"] = json!({"a": 1});
        let back: ProductionOrderRequest = serde_json::from_value(with_extra).unwrap();
        assert_eq!(
            back,
            order(DistributionChannel::Thales, Some(to_cardholder()))
        );
    }

    #[test]
    fn channel_rules() {
        assert!(
            order(DistributionChannel::Thales, Some(to_cardholder()))
                .validate()
                .is_ok()
        );
        let e = order(DistributionChannel::Thales, None)
            .validate()
            .unwrap_err();
        assert_eq!((e.field, e.missing), ("shipment", true));
        let mut instant = order(DistributionChannel::Instant, Some(to_cardholder()));
        assert_eq!(instant.validate().unwrap_err().field, "shipment");
        instant.shipment = None;
        assert_eq!(
            instant.validate().unwrap_err().field,
            "services.issuanceLocation"
        );
        instant.services.issuance_location = Some("BRANCH-042".into());
        assert!(instant.validate().is_ok());
        let bulk = Shipment {
            delivery_type: "BULK".into(),
            bulk_destination_id: Some("HUB-7".into()),
            ..Default::default()
        };
        assert!(
            order(DistributionChannel::Central, Some(bulk.clone()))
                .validate()
                .is_ok()
        );
        assert_eq!(
            order(DistributionChannel::Thales, Some(bulk))
                .validate()
                .unwrap_err()
                .field,
            "shipment.deliveryType"
        );
        let mut bad_id = order(DistributionChannel::Thales, Some(to_cardholder()));
        bad_id.issuer_request_id = "has space".into();
        assert_eq!(bad_id.validate().unwrap_err().field, "issuerRequestId");
        let mut bad_country = to_cardholder();
        if let Some(a) = bad_country.address.as_mut() {
            a.country = "France".into();
        }
        assert_eq!(
            order(DistributionChannel::Central, Some(bad_country))
                .validate()
                .unwrap_err()
                .field,
            "shipment.address.country"
        );
    }

    fn card() -> ProductionCardData {
        ProductionCardData {
            pan: "4111111111111111".into(),
            exp: "1230".into(),
            cvc: "737".into(),
            track1: Some("B4111111111111111^DOE/JANE^30121010000000000000".into()),
            track2: Some("4111111111111111=30121010000000000".into()),
            cardholder_name: "JANE DOE".into(),
        }
    }

    #[test]
    fn card_data_is_redacted_and_fits_its_buffer() {
        let c = card();
        assert!(c.validate_shape().is_ok());
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("4111") && !dbg.contains("737") && !dbg.contains("DOE"));
        let buf = c.to_zeroizing_json().unwrap();
        assert!(buf.len() <= buf.capacity());
        let back: ProductionCardData = serde_json::from_slice(&buf).unwrap();
        assert_eq!(back.cvc, "737");
        assert_eq!(back.cardholder_name, "JANE DOE");
    }

    #[test]
    fn card_shapes_are_checked() {
        let mut c = card();
        c.cvc = "73".into();
        assert_eq!(c.validate_shape().unwrap_err().field, "cvc");
        let mut c = card();
        c.exp = "1330".into();
        assert_eq!(c.validate_shape().unwrap_err().field, "exp");
        let mut c = card();
        c.cardholder_name = "A NAME LONGER THAN TWENTY SIX".into();
        assert_eq!(c.validate_shape().unwrap_err().field, "cardholderName");
        let mut c = card();
        c.track2 = Some("4111;".into());
        assert_eq!(c.validate_shape().unwrap_err().field, "track2");
        // The error text names the field, never the value.
        assert!(!c.validate_shape().unwrap_err().to_string().contains("4111"));
    }

    #[test]
    fn stages_round_trip_and_keep_unknown_values() {
        for k in ProductionStage::KNOWN {
            let v = serde_json::to_value(&k).unwrap();
            assert_eq!(serde_json::from_value::<ProductionStage>(v).unwrap(), k);
        }
        let d: ProductionDetails = serde_json::from_value(json!({
            "status": "CARD_SHIPPED",
            "shipment": {"carrier": "DHL", "trackingNumber": "JD0123", "status": "IN_TRANSIT",
                          "message": "left hub", "trackingUrl": "https://t.example/JD0123", "eta": 1}
        }))
        .unwrap();
        assert_eq!(d.status, ProductionStage::Shipped);
        assert_eq!(
            d.shipment.unwrap().tracking_number.as_deref(),
            Some("JD0123")
        );
        let other: ProductionStage = serde_json::from_value(json!("CARD_PROD_QA")).unwrap();
        assert_eq!(other, ProductionStage::Other("CARD_PROD_QA".into()));
        assert!(!other.is_final());
        assert!(ProductionStage::Shipped.is_final());
    }

    #[test]
    fn default_paths_are_valid_and_bad_ones_refused() {
        assert!(ProductionPaths::default().validate().is_ok());
        let bad = ProductionPaths {
            production_batch: "/issuers/{issuerId}/physicalCards/{cardId}".into(),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("production_batch"));
        let bad = ProductionPaths {
            production: "issuers".into(),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn batch_items_flatten_the_order() {
        let item = BatchOrderItem {
            card_id: "card-1".into(),
            order: order(DistributionChannel::Thales, Some(to_cardholder())),
        };
        let v = serde_json::to_value(BatchOrderRequest {
            orders: vec![item.clone()],
        })
        .unwrap();
        assert_eq!(v["orders"][0]["cardId"], "card-1");
        assert_eq!(v["orders"][0]["issuerRequestId"], "req-1");
        let back: BatchOrderRequest = serde_json::from_value(v).unwrap();
        assert_eq!(back.orders[0], item);
        assert!(valid_id("card_1-A", 48));
        assert!(!valid_id(&"a".repeat(49), 48));
    }
}
