//! Physical card orders on the D1 client: [`D1ProductionClient`], the domain's
//! [`ProductionProvider`] over D1's `operations:production`, batch order and
//! `productionStatus` (path templates: `ProductionPaths`, defaults from D1's pages). It goes
//! through the eCom client's one request path ([`D1Client::execute`]: limiter, breaker, time
//! budget, retries of what is safe to retry, metrics and logs).
//!
//! The card data becomes a JWE here, from a wiping buffer, and exists nowhere else on the way:
//! the plaintext JSON is written into a [`zeroize::Zeroizing`] buffer allocated at its final
//! size, encrypted to D1's key, and wiped when this call returns. An order is not retried on a
//! 500 (the outcome is unknown): the caller re-sends it with the same `issuerRequestId`, which
//! D1 answers with the order it already has.

use std::fmt;

use async_trait::async_trait;
use http::Method;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::client::{D1Client, Spec, decode, encode_component, encode_json};
use crate::domain::error::ProviderError;
use crate::domain::production_orders::{
    BatchOrder, Delivery, DistributionChannel as Channel, OrderSpec, ProductionAck, ProductionCard,
    ProductionProvider, ProductionStage, RemoteProductionStatus, ShipmentTracking,
};
use tokengate_d1_protocol::issuer_orders as wire;
use tokengate_d1_protocol::issuer_orders::ProductionPaths;

/// The production-order client. Cheap to clone.
#[derive(Clone)]
pub struct D1ProductionClient {
    client: D1Client,
    base: String,
    paths: ProductionPaths,
}

impl fmt::Debug for D1ProductionClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("D1ProductionClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn channel(c: Channel) -> wire::DistributionChannel {
    match c {
        Channel::Thales => wire::DistributionChannel::Thales,
        Channel::Instant => wire::DistributionChannel::Instant,
        Channel::Central => wire::DistributionChannel::Central,
    }
}

fn order_body(
    issuer_request_id: &str,
    spec: &OrderSpec,
    encrypted: String,
) -> wire::ProductionOrderRequest {
    let s = &spec.services;
    wire::ProductionOrderRequest {
        issuer_request_id: issuer_request_id.to_owned(),
        distribution_channel: channel(spec.channel),
        services: wire::Services {
            product_id: s.product_id.clone(),
            packaging: s.packaging.clone(),
            card_carrier: s.card_carrier.clone(),
            issuance_location: s.issuance_location.clone(),
        },
        encrypted_data: encrypted,
        shipment: spec.shipment.as_ref().map(|sh| {
            let (delivery_type, address, bulk) = match &sh.delivery {
                Delivery::Cardholder(a) => (
                    "CARDHOLDER",
                    Some(wire::Address {
                        line1: a.line1.clone(),
                        line2: a.line2.clone(),
                        city: a.city.clone(),
                        postal_code: a.postal_code.clone(),
                        country: a.country.clone(),
                    }),
                    None,
                ),
                Delivery::Bulk { destination_id } => ("BULK", None, Some(destination_id.clone())),
            };
            wire::Shipment {
                delivery_type: delivery_type.to_owned(),
                method: sh.method.clone(),
                recipient_name: sh.recipient_name.clone(),
                address,
                bulk_destination_id: bulk,
            }
        }),
        payment_application: spec
            .payment_application
            .as_ref()
            .map(|a| wire::PaymentApplication {
                profile_id: a.profile_id.clone(),
                aid: a.aid.clone(),
            }),
    }
}

fn ack(op: &str, id: String) -> Result<ProductionAck, ProviderError> {
    // D1's operation id pattern; it is used in our paths and keys.
    if wire::valid_id(&id, 64) {
        Ok(ProductionAck {
            d1_operation_id: id,
        })
    } else {
        Err(ProviderError::BadResponse(format!(
            "{op}: operationId is malformed"
        )))
    }
}

fn tracking(t: wire::ShipmentTracking) -> ShipmentTracking {
    ShipmentTracking {
        carrier: t.carrier,
        tracking_number: t.tracking_number,
        status: t.status,
        message: t.message,
        tracking_url: t.tracking_url,
    }
}

impl D1ProductionClient {
    /// Orders through `client`, at the issuer API `base_url` (the same base and paths as the
    /// other issuer calls).
    pub fn new(
        client: D1Client,
        base_url: &str,
        paths: ProductionPaths,
    ) -> Result<D1ProductionClient, String> {
        paths.validate()?;
        let base = base_url.trim_end_matches('/').to_owned();
        if !base.starts_with("https://") {
            return Err("d1.issuer_base_url must be an https:// URL".into());
        }
        Ok(D1ProductionClient {
            client,
            base,
            paths,
        })
    }

    fn url(&self, template: &str, issuer: &str, card: Option<&str>) -> String {
        let mut path = template.replace("{issuerId}", &encode_component(issuer));
        if let Some(c) = card {
            path = path.replace("{cardId}", &encode_component(c));
        }
        format!("{}{}", self.base, path)
    }

    /// The card data as a JWE to D1's key (see the module docs).
    fn card_jwe(&self, op: &str, card: &ProductionCard) -> Result<String, ProviderError> {
        let exp = card.expiry.mmyy();
        let plain = wire::ProductionCardData {
            pan: card.pan.expose_digits().to_owned(),
            exp,
            cvc: card.cvc.expose().to_owned(),
            track1: card.track1.as_ref().map(|t| t.expose().to_owned()),
            track2: card.track2.as_ref().map(|t| t.expose().to_owned()),
            cardholder_name: card.cardholder_name.expose().to_owned(),
        };
        // `plain` wipes its copies when dropped at the end of this function.
        let json = plain
            .to_zeroizing_json()
            .map_err(|_| ProviderError::BadResponse(format!("{op}: could not encode card data")))?;
        self.client.encrypt_for_d1(op, &json)
    }
}

#[async_trait]
impl ProductionProvider for D1ProductionClient {
    async fn order_production(
        &self,
        d1_issuer_id: &str,
        card_id: &str,
        issuer_request_id: &str,
        spec: &OrderSpec,
        card: &ProductionCard,
    ) -> Result<ProductionAck, ProviderError> {
        const OP: &str = "production";
        let body = order_body(issuer_request_id, spec, self.card_jwe(OP, card)?);
        let body = encode_json(OP, &body)?;
        let reply = self
            .client
            .execute(Spec {
                op: OP,
                method: Method::POST,
                url: self.url(&self.paths.production, d1_issuer_id, Some(card_id)),
                body: Some(body),
                auth: true,
                retry_500: false,
                // The issuer API answers an unknown issuer or card with a 404 and its code.
                not_found_is_rejection: true,
            })
            .await?;
        let resp: wire::ProductionOrderResponse = decode(OP, &reply)?;
        ack(OP, resp.operation_id)
    }

    async fn order_production_batch(
        &self,
        d1_issuer_id: &str,
        items: &[BatchOrder<'_>],
    ) -> Result<Vec<Result<ProductionAck, ProviderError>>, ProviderError> {
        const OP: &str = "productionBatch";
        let mut orders = Vec::with_capacity(items.len());
        for it in items {
            orders.push(wire::BatchOrderItem {
                card_id: it.card_id.to_owned(),
                order: order_body(it.issuer_request_id, it.spec, self.card_jwe(OP, it.card)?),
            });
        }
        let body = encode_json(OP, &wire::BatchOrderRequest { orders })?;
        let reply = self
            .client
            .execute(Spec {
                op: OP,
                method: Method::POST,
                url: self.url(&self.paths.production_batch, d1_issuer_id, None),
                body: Some(body),
                auth: true,
                retry_500: false,
                not_found_is_rejection: true,
            })
            .await?;
        let resp: wire::BatchOrderResponse = decode(OP, &reply)?;
        if resp.results.len() != items.len() {
            return Err(ProviderError::BadResponse(format!(
                "{OP}: {} results for {} orders",
                resp.results.len(),
                items.len()
            )));
        }
        Ok(items
            .iter()
            .zip(resp.results)
            .map(|(it, r)| {
                if r.issuer_request_id != it.issuer_request_id {
                    return Err(ProviderError::BadResponse(format!(
                        "{OP}: results out of order"
                    )));
                }
                match (r.operation_id, r.error_code) {
                    (Some(id), None) => ack(OP, id),
                    (_, Some(code)) => Err(ProviderError::Rejected {
                        status: 400,
                        code: if (1..=64).contains(&code.len())
                            && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                        {
                            code
                        } else {
                            "INVALID_ITEM".into()
                        },
                    }),
                    (None, None) => Err(ProviderError::BadResponse(format!(
                        "{OP}: a result without operationId or errorCode"
                    ))),
                }
            })
            .collect())
    }

    async fn production_status(
        &self,
        d1_issuer_id: &str,
        card_id: &str,
    ) -> Result<RemoteProductionStatus, ProviderError> {
        const OP: &str = "productionStatus";
        let reply = self
            .client
            .execute(Spec {
                op: OP,
                method: Method::GET,
                url: self.url(&self.paths.production_status, d1_issuer_id, Some(card_id)),
                body: None,
                auth: true,
                retry_500: true,
                // A card never ordered: no production status.
                not_found_is_rejection: false,
            })
            .await?;
        let s: wire::ProductionStatusResponse = decode(OP, &reply)?;
        Ok(RemoteProductionStatus {
            d1_operation_id: s.operation_id,
            issuer_request_id: s.issuer_request_id,
            status: ProductionStage::parse(s.details.status.as_str()),
            shipment: s.details.shipment.map(tracking),
            updated_at: s
                .updated_at
                .as_deref()
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()),
        })
    }
}
