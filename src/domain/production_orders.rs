//! Physical card production orders (issue 11, central issuance): what the gateway keeps of an
//! order placed with D1 and the history of its production status, kept true by D1's PRODUCE
//! notifications and status polls.
//!
//! Rules:
//! - An order is identified by `(issuer, issuerRequestId)`: the same id on a retry is the same
//!   order (the store's insert returns the existing one), never a second card.
//! - **No card data is kept.** The PAN, expiry, CVC, track data and cardholder name of the
//!   request travel to D1 in a JWE and are wiped when the request ends (PCI DSS 3.3); the order
//!   keeps only the masked PAN (first 6 / last 4), which PCI DSS allows to display.
//! - The status history keeps every distinct step once, in time order. A step that arrives late
//!   (a reordered notification) is recorded in the history but never moves the current stage
//!   back: the current stage is the furthest normal step, or the failure once one is known
//!   (failures are final). A repeated step (a redelivery, a poll that saw the same state) changes
//!   nothing; a new shipment tracking state of a shipped card is a new step.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokengate_cards::{Cvc, EmbossName, Expiry, Pan, Track1, Track2};

use super::error::{DomainError, ProviderError};

/// How the card reaches the cardholder (D1's `distributionChannel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DistributionChannel {
    /// Produced and shipped by Thales' personalisation centre.
    Thales,
    /// Printed on the spot at a branch or kiosk: nothing is shipped.
    Instant,
    /// Produced centrally, shipped to the cardholder or in bulk to a branch or hub.
    Central,
}

impl DistributionChannel {
    pub fn all() -> [DistributionChannel; 3] {
        [
            DistributionChannel::Thales,
            DistributionChannel::Instant,
            DistributionChannel::Central,
        ]
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DistributionChannel::Thales => "THALES",
            DistributionChannel::Instant => "INSTANT",
            DistributionChannel::Central => "CENTRAL",
        }
    }

    pub fn parse(s: &str) -> Option<DistributionChannel> {
        Self::all().into_iter().find(|c| c.as_str() == s)
    }
}

/// A production step (D1's `details.status`). Values D1 adds later are kept verbatim.
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
    pub fn known() -> [ProductionStage; 7] {
        [
            ProductionStage::Requested,
            ProductionStage::Ready,
            ProductionStage::Done,
            ProductionStage::DataException,
            ProductionStage::ProdException,
            ProductionStage::Canceled,
            ProductionStage::Shipped,
        ]
    }

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
        Self::known()
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or_else(|| ProductionStage::Other(s.to_owned()))
    }

    /// Production ended without a card.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            ProductionStage::DataException
                | ProductionStage::ProdException
                | ProductionStage::Canceled
        )
    }

    /// Order of the normal steps; failures and unknown values have none.
    fn rank(&self) -> Option<u8> {
        match self {
            ProductionStage::Requested => Some(0),
            ProductionStage::Ready => Some(1),
            ProductionStage::Done => Some(2),
            ProductionStage::Shipped => Some(3),
            _ => None,
        }
    }
}

impl Serialize for ProductionStage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ProductionStage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ProductionStage::parse(&String::deserialize(d)?))
    }
}

/// Shipment tracking of a shipped card, as D1 reports it.
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

/// One step of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductionEvent {
    pub status: ProductionStage,
    /// When D1 says it happened (or when we learnt it, if D1 gave no time).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipment: Option<ShipmentTracking>,
    /// D1's `errorCode` of a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
}

impl ProductionEvent {
    /// Two reports of the same step: same stage, same tracking state.
    fn same_step(&self, other: &ProductionEvent) -> bool {
        self.status == other.status
            && self.shipment.as_ref().map(|s| &s.status)
                == other.shipment.as_ref().map(|s| &s.status)
    }
}

/// What [`ProductionOrder::record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A step already in the history: nothing changed.
    Duplicate,
    /// A late step: added to the history, the current stage stays.
    History,
    /// The current stage or the shipment tracking changed.
    Changed,
}

/// A production order and its status history. Never holds card data (module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductionOrder {
    /// The issuer tenant (our id).
    pub issuer_id: String,
    pub card_id: String,
    pub issuer_request_id: String,
    /// Our operation resource (`op_...`), once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    pub distribution_channel: DistributionChannel,
    /// First 6 and last 4 digits of the PAN, the rest masked.
    pub masked_pan: String,
    pub status: ProductionStage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipment: Option<ShipmentTracking>,
    /// Every distinct step, oldest first.
    pub history: Vec<ProductionEvent>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Compare-and-set version: 0 when created, +1 per stored update.
    pub version: u64,
}

impl ProductionOrder {
    /// A new order, `CARD_PROD_REQUESTED` as of `now`.
    pub fn new(
        issuer_id: &str,
        card_id: &str,
        issuer_request_id: &str,
        channel: DistributionChannel,
        masked_pan: String,
        now: OffsetDateTime,
    ) -> ProductionOrder {
        ProductionOrder {
            issuer_id: issuer_id.to_owned(),
            card_id: card_id.to_owned(),
            issuer_request_id: issuer_request_id.to_owned(),
            operation_id: None,
            distribution_channel: channel,
            masked_pan,
            status: ProductionStage::Requested,
            shipment: None,
            history: vec![ProductionEvent {
                status: ProductionStage::Requested,
                at: now,
                shipment: None,
                error_code: None,
            }],
            created_at: now,
            updated_at: now,
            version: 0,
        }
    }

    /// Records a step under the module's rules. The caller stores the order (compare-and-set)
    /// unless [`Recorded::Duplicate`].
    pub fn record(&mut self, ev: ProductionEvent, now: OffsetDateTime) -> Recorded {
        if self.history.iter().any(|h| h.same_step(&ev)) {
            return Recorded::Duplicate;
        }
        // Stable insert by time: equal times keep arrival order.
        let pos = self.history.partition_point(|h| h.at <= ev.at);
        self.history.insert(pos, ev.clone());
        self.updated_at = now;
        let advances = match (self.status.is_failure(), ev.status.is_failure()) {
            // Failures are final; a second, different failure report is history only.
            (true, _) => false,
            (false, true) => true,
            (false, false) => match (self.status.rank(), ev.status.rank()) {
                (Some(cur), Some(new)) => new > cur,
                // An unknown current stage (D1 invented one) yields to any known step.
                (None, Some(_)) => true,
                _ => false,
            },
        };
        if advances {
            self.status = ev.status;
            if ev.shipment.is_some() {
                self.shipment = ev.shipment;
            }
            return Recorded::Changed;
        }
        // A newer tracking state of the shipped card updates the tracking.
        if self.status == ProductionStage::Shipped
            && ev.status == ProductionStage::Shipped
            && ev.shipment.is_some()
            && self.history.last().is_some_and(|h| h.same_step(&ev))
        {
            self.shipment = ev.shipment;
            return Recorded::Changed;
        }
        Recorded::History
    }
}

/// Production options (card product, packaging, carrier letter, instant-issuance location).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderServices {
    pub product_id: String,
    pub packaging: Option<String>,
    pub card_carrier: Option<String>,
    /// INSTANT only: the branch or kiosk whose printer produces the card.
    pub issuance_location: Option<String>,
}

/// A postal address (personal data, not card data; never stored by the gateway).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostalAddress {
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
}

/// Where a produced card goes: to the cardholder, or in bulk to a branch or hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Cardholder(PostalAddress),
    Bulk { destination_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderShipment {
    pub delivery: Delivery,
    pub method: Option<String>,
    pub recipient_name: Option<String>,
}

/// The chip application to personalise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PaymentApplication {
    pub profile_id: String,
    /// EMV application identifier, hex.
    pub aid: Option<String>,
}

/// Everything of an order but the card data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderSpec {
    pub channel: DistributionChannel,
    pub services: OrderServices,
    pub shipment: Option<OrderShipment>,
    pub payment_application: Option<PaymentApplication>,
}

fn bad_order(detail: &str) -> DomainError {
    DomainError::Validation {
        code: "invalid_production_order",
        detail: detail.to_owned(),
    }
}

/// A configured reference (product, packaging, location, ...): 1 to 64 printable ASCII.
fn check_ref(v: &str, field: &str) -> Result<(), DomainError> {
    if (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        Ok(())
    } else {
        Err(bad_order(&format!(
            "{field} must be 1 to 64 printable characters"
        )))
    }
}

fn check_text(v: &str, max: usize, field: &str) -> Result<(), DomainError> {
    let n = v.chars().count();
    if (1..=max).contains(&n) && !v.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(bad_order(&format!(
            "{field} must have 1 to {max} characters"
        )))
    }
}

impl OrderSpec {
    /// The per-channel rules (docs/issuer-orders.md; the simulator applies the same ones as
    /// D1): THALES and CENTRAL ship, so they need a shipment; a BULK delivery is CENTRAL only;
    /// INSTANT prints on the spot, so it takes no shipment and needs an issuance location.
    pub fn validate(&self) -> Result<(), DomainError> {
        let s = &self.services;
        check_ref(&s.product_id, "services.productId")?;
        for (v, f) in [
            (&s.packaging, "services.packaging"),
            (&s.card_carrier, "services.cardCarrier"),
            (&s.issuance_location, "services.issuanceLocation"),
        ] {
            if let Some(v) = v {
                check_ref(v, f)?;
            }
        }
        if let Some(app) = &self.payment_application {
            check_ref(&app.profile_id, "paymentApplication.profileId")?;
            if let Some(aid) = &app.aid
                && !((10..=32).contains(&aid.len())
                    && aid.len() % 2 == 0
                    && aid.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(bad_order(
                    "paymentApplication.aid must be 10 to 32 hexadecimal digits",
                ));
            }
        }
        match (self.channel, &self.shipment) {
            (DistributionChannel::Instant, Some(_)) => Err(bad_order(
                "shipment must be absent for INSTANT orders (the card is printed on the spot)",
            )),
            (DistributionChannel::Instant, None) if s.issuance_location.is_none() => Err(
                bad_order("services.issuanceLocation is required for INSTANT orders"),
            ),
            (DistributionChannel::Instant, None) => Ok(()),
            (channel, None) => Err(bad_order(&format!(
                "shipment is required for {} orders",
                channel.as_str()
            ))),
            (channel, Some(sh)) => {
                if s.issuance_location.is_some() {
                    return Err(bad_order(
                        "services.issuanceLocation is only for INSTANT orders",
                    ));
                }
                if let Some(m) = &sh.method {
                    check_ref(m, "shipment.method")?;
                }
                if let Some(n) = &sh.recipient_name {
                    check_text(n, 64, "shipment.recipientName")?;
                }
                match &sh.delivery {
                    Delivery::Cardholder(a) => {
                        check_text(&a.line1, 128, "shipment.address.line1")?;
                        if let Some(l) = &a.line2 {
                            check_text(l, 128, "shipment.address.line2")?;
                        }
                        check_text(&a.city, 128, "shipment.address.city")?;
                        if !(1..=16).contains(&a.postal_code.len()) {
                            return Err(bad_order(
                                "shipment.address.postalCode must have 1 to 16 characters",
                            ));
                        }
                        if !(a.country.len() == 2
                            && a.country.bytes().all(|b| b.is_ascii_uppercase()))
                        {
                            return Err(bad_order(
                                "shipment.address.country must be an ISO 3166-1 alpha-2 code",
                            ));
                        }
                        Ok(())
                    }
                    Delivery::Bulk { destination_id } => {
                        if channel != DistributionChannel::Central {
                            return Err(bad_order(
                                "shipment.deliveryType BULK is only for CENTRAL orders",
                            ));
                        }
                        check_ref(destination_id, "shipment.bulkDestinationId")
                    }
                }
            }
        }
    }
}

/// The card data of an order, every part in a type that prints redacted (or masked) and wipes
/// itself: it exists for the length of the request, then is gone (module docs).
#[derive(Debug)]
pub struct ProductionCard {
    pub pan: Pan,
    pub expiry: Expiry,
    pub cvc: Cvc,
    pub track1: Option<Track1>,
    pub track2: Option<Track2>,
    pub cardholder_name: EmbossName,
}

impl ProductionCard {
    /// What the order keeps of the card.
    pub fn masked_pan(&self) -> String {
        // `Pan`'s Display is the PCI DSS mask (first 6, `*`, last 4).
        self.pan.to_string()
    }
}

/// D1's synchronous acceptance of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductionAck {
    pub d1_operation_id: String,
}

/// One card of a batch order for [`ProductionProvider::order_production_batch`].
#[derive(Debug)]
pub struct BatchOrder<'a> {
    pub card_id: &'a str,
    pub issuer_request_id: &'a str,
    pub spec: &'a OrderSpec,
    pub card: &'a ProductionCard,
}

/// D1's production status of a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteProductionStatus {
    pub d1_operation_id: Option<String>,
    pub issuer_request_id: Option<String>,
    pub status: ProductionStage,
    pub shipment: Option<ShipmentTracking>,
    pub updated_at: Option<OffsetDateTime>,
}

/// The port to D1's physical card order API (`src/d1/production.rs` implements it).
#[async_trait]
pub trait ProductionProvider: Send + Sync + 'static {
    /// Orders one card. The card data is encrypted to D1 for this call and every retry of it
    /// sends the same bytes with the same `issuer_request_id`. `Rejected` for D1's 4xx;
    /// `Unavailable`, `Timeout` or `BadResponse` when the outcome is unknown.
    async fn order_production(
        &self,
        d1_issuer_id: &str,
        card_id: &str,
        issuer_request_id: &str,
        spec: &OrderSpec,
        card: &ProductionCard,
    ) -> Result<ProductionAck, ProviderError>;

    /// Orders 1 to 1,000 cards in one call: one result per item, in order. `Err` when the
    /// whole call failed (outcome unknown for every item, or refused as a whole).
    async fn order_production_batch(
        &self,
        d1_issuer_id: &str,
        items: &[BatchOrder<'_>],
    ) -> Result<Vec<Result<ProductionAck, ProviderError>>, ProviderError>;

    /// The production status of a card's latest order.
    async fn production_status(
        &self,
        d1_issuer_id: &str,
        card_id: &str,
    ) -> Result<RemoteProductionStatus, ProviderError>;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test should stop loudly")]
mod tests {
    use super::*;

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_767_000_000 + s).unwrap()
    }

    fn ev(stage: ProductionStage, at: i64) -> ProductionEvent {
        ProductionEvent {
            status: stage,
            at: t(at),
            shipment: None,
            error_code: None,
        }
    }

    fn order() -> ProductionOrder {
        ProductionOrder::new(
            "iss_1",
            "card-1",
            "req-1",
            DistributionChannel::Thales,
            "411111******1111".into(),
            t(0),
        )
    }

    #[test]
    fn steps_advance_and_repeats_change_nothing() {
        let mut o = order();
        assert_eq!(
            o.record(ev(ProductionStage::Ready, 1), t(1)),
            Recorded::Changed
        );
        assert_eq!(
            o.record(ev(ProductionStage::Ready, 1), t(2)),
            Recorded::Duplicate
        );
        assert_eq!(
            o.record(ev(ProductionStage::Requested, 0), t(2)),
            Recorded::Duplicate
        );
        assert_eq!(
            o.record(ev(ProductionStage::Done, 2), t(2)),
            Recorded::Changed
        );
        assert_eq!(o.status, ProductionStage::Done);
        assert_eq!(o.history.len(), 3);
    }

    #[test]
    fn late_steps_go_into_history_without_moving_back() {
        let mut o = order();
        assert_eq!(
            o.record(ev(ProductionStage::Done, 2), t(3)),
            Recorded::Changed
        );
        assert_eq!(
            o.record(ev(ProductionStage::Ready, 1), t(4)),
            Recorded::History
        );
        assert_eq!(o.status, ProductionStage::Done);
        let stages: Vec<_> = o.history.iter().map(|h| h.status.clone()).collect();
        assert_eq!(
            stages,
            vec![
                ProductionStage::Requested,
                ProductionStage::Ready,
                ProductionStage::Done
            ]
        );
    }

    #[test]
    fn failures_are_final_and_tracking_updates() {
        let mut o = order();
        o.record(ev(ProductionStage::ProdException, 2), t(2));
        assert_eq!(
            o.record(ev(ProductionStage::Done, 3), t(3)),
            Recorded::History
        );
        assert_eq!(o.status, ProductionStage::ProdException);

        let mut o = order();
        let shipped = |status: &str, at| ProductionEvent {
            shipment: Some(ShipmentTracking {
                carrier: Some("DHL".into()),
                tracking_number: Some("JD1".into()),
                status: Some(status.into()),
                ..Default::default()
            }),
            ..ev(ProductionStage::Shipped, at)
        };
        assert_eq!(o.record(shipped("IN_TRANSIT", 5), t(5)), Recorded::Changed);
        assert_eq!(o.record(shipped("DELIVERED", 9), t(9)), Recorded::Changed);
        assert_eq!(
            o.shipment.as_ref().unwrap().status.as_deref(),
            Some("DELIVERED")
        );
        // The older tracking state redelivered: a duplicate.
        assert_eq!(
            o.record(shipped("IN_TRANSIT", 5), t(10)),
            Recorded::Duplicate
        );
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["status"], "CARD_SHIPPED");
        let back: ProductionOrder = serde_json::from_value(json).unwrap();
        assert_eq!(back, o);
    }

    #[test]
    fn masking() {
        assert_eq!(
            ProductionStage::parse("CARD_PROD_QA"),
            ProductionStage::Other("CARD_PROD_QA".into())
        );
    }
}
