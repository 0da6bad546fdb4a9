//! The issuer side of the D1 client: [`D1IssuerClient`], the domain's [`IssuerProvider`] over
//! D1's "banking" API. It shares the eCom client's connection pool, access-token cache, limiter,
//! circuit breaker and its one request path ([`D1Client::execute`]), so every issuer call is
//! retried, timed, metered and logged exactly as the token calls are.
//!
//! Profiles come back with card numbers: they are masked here (first 6 / last 4) and the full
//! numbers are wiped with the wire objects; nothing above this module ever holds one.

use std::fmt;

use async_trait::async_trait;
use http::Method;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::client::{D1Client, Spec, decode, encode_component, encode_json};
use crate::domain::error::ProviderError;
use crate::domain::issuer_ops::{
    OperationCall, OperationKind, OperationStatus, OperationTarget, RemoteOperation, valid_d1_id,
};
use crate::domain::issuer_provider::{
    ClickToPayProfile, IssuerProvider, OperationAck, StartOperation,
};
use tokengate_d1_protocol::issuer::{
    CardDeleteRequest, ClickToPayEnrolmentRequest, ClickToPayOptOutRequest,
    ClickToPayProfilesResponse, ClickToPayUpdateRequest, OperationAccepted, OperationObject,
    mask_pan,
};
use tokengate_d1_protocol::paths::IssuerPaths;

/// The issuer-side client. Cheap to clone.
#[derive(Clone)]
pub struct D1IssuerClient {
    client: D1Client,
    /// Base URL of the banking API, without a trailing slash.
    base: String,
    paths: IssuerPaths,
}

impl fmt::Debug for D1IssuerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("D1IssuerClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl D1IssuerClient {
    /// The issuer API at `base_url`, through `client`'s connections and resilience.
    pub fn new(
        client: D1Client,
        base_url: &str,
        paths: IssuerPaths,
    ) -> Result<D1IssuerClient, String> {
        paths.validate()?;
        let base = base_url.trim_end_matches('/').to_owned();
        if !base.starts_with("https://") {
            return Err("d1.issuer_base_url must be an https:// URL".into());
        }
        Ok(D1IssuerClient {
            client,
            base,
            paths,
        })
    }

    /// Fills a template; every value is percent-encoded so none can add path segments.
    fn url(
        &self,
        template: &str,
        issuer: &str,
        target: Option<&OperationTarget>,
        op: Option<&str>,
    ) -> String {
        let mut path = template.replace("{issuerId}", &encode_component(issuer));
        match target {
            Some(OperationTarget::Card(c)) => path = path.replace("{cardId}", &encode_component(c)),
            Some(OperationTarget::Consumer(c)) => {
                path = path.replace("{consumerId}", &encode_component(c));
            }
            None => {}
        }
        if let Some(o) = op {
            path = path.replace("{operationId}", &encode_component(o));
        }
        format!("{}{}", self.base, path)
    }
}

fn time_of(s: Option<&str>) -> Option<OffsetDateTime> {
    s.and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
}

/// D1's operation object as the domain sees it.
pub fn remote_from_wire(o: OperationObject) -> RemoteOperation {
    RemoteOperation {
        d1_operation_id: o.operation_id,
        kind: OperationKind::parse(&o.operation),
        status: OperationStatus::parse(&o.status),
        start_time: time_of(o.start_time.as_deref()),
        end_time: time_of(o.end_time.as_deref()),
        card_id: o.card_id,
        consumer_id: o.consumer_id,
        issuer_request_id: o.issuer_request_id,
        error_code: o.error_code,
        error: o.error,
        details: o.details,
    }
}

#[async_trait]
impl IssuerProvider for D1IssuerClient {
    async fn start_operation(&self, s: &StartOperation<'_>) -> Result<OperationAck, ProviderError> {
        let p = &self.paths;
        let request_id = Some(s.issuer_request_id.to_owned());
        let (op, template, body) = match (s.call, s.target) {
            (
                OperationCall::ClickToPayEnrolment {
                    cardholder_name,
                    reason,
                    reason_code,
                },
                OperationTarget::Card(_),
            ) => {
                const OP: &str = "clickToPayEnrolment";
                let b = encode_json(
                    OP,
                    &ClickToPayEnrolmentRequest {
                        cardholder_name: cardholder_name.clone(),
                        reason: reason.clone(),
                        reason_code: reason_code.clone(),
                        issuer_request_id: request_id,
                    },
                )?;
                (OP, &p.card_click_to_pay_enrolment, b)
            }
            (
                OperationCall::ClickToPayUpdate {
                    cardholder_name,
                    reason,
                    reason_code,
                },
                t,
            ) => {
                const OP: &str = "clickToPayUpdate";
                let b = encode_json(
                    OP,
                    &ClickToPayUpdateRequest {
                        cardholder_name: cardholder_name.clone(),
                        reason: reason.clone(),
                        reason_code: reason_code.clone(),
                        issuer_request_id: request_id,
                    },
                )?;
                let template = match t {
                    OperationTarget::Card(_) => &p.card_click_to_pay_update,
                    OperationTarget::Consumer(_) => &p.consumer_click_to_pay_update,
                };
                (OP, template, b)
            }
            (
                OperationCall::ClickToPayOptOut {
                    reason,
                    reason_code,
                },
                t,
            ) => {
                const OP: &str = "clickToPayOptOut";
                let b = encode_json(
                    OP,
                    &ClickToPayOptOutRequest {
                        reason: reason.clone(),
                        reason_code: reason_code.clone(),
                        issuer_request_id: request_id,
                    },
                )?;
                let template = match t {
                    OperationTarget::Card(_) => &p.card_click_to_pay_opt_out,
                    OperationTarget::Consumer(_) => &p.consumer_click_to_pay_opt_out,
                };
                (OP, template, b)
            }
            (
                OperationCall::CardDelete {
                    reason,
                    reason_code,
                },
                OperationTarget::Card(_),
            ) => {
                const OP: &str = "cardDelete";
                let b = encode_json(
                    OP,
                    &CardDeleteRequest {
                        reason: reason.clone(),
                        reason_code: reason_code.clone(),
                        issuer_request_id: request_id,
                    },
                )?;
                (OP, &p.card_delete, b)
            }
            _ => {
                return Err(ProviderError::BadResponse(format!(
                    "{}: no D1 call for this operation and target",
                    s.kind.as_str()
                )));
            }
        };
        let reply = self
            .client
            .execute(Spec {
                op,
                method: Method::POST,
                url: self.url(template, s.d1_issuer_id, Some(s.target), None),
                body: Some(body),
                auth: true,
                // Not retried on 500 here: the worker re-drives with the same issuerRequestId.
                retry_500: false,
                not_found_is_rejection: true,
            })
            .await?;
        let ack: OperationAccepted = decode(op, &reply)?;
        if !valid_d1_id(&ack.operation_id) {
            return Err(ProviderError::BadResponse(format!(
                "{op}: operationId is malformed"
            )));
        }
        Ok(OperationAck {
            d1_operation_id: ack.operation_id,
        })
    }

    async fn get_operation(
        &self,
        d1_issuer_id: &str,
        d1_operation_id: &str,
    ) -> Result<RemoteOperation, ProviderError> {
        const OP: &str = "getOperation";
        let reply = self
            .client
            .execute(Spec {
                op: OP,
                method: Method::GET,
                url: self.url(
                    &self.paths.get_operation,
                    d1_issuer_id,
                    None,
                    Some(d1_operation_id),
                ),
                body: None,
                auth: true,
                retry_500: true,
                not_found_is_rejection: false,
            })
            .await?;
        let o: OperationObject = decode(OP, &reply)?;
        if o.operation_id != d1_operation_id {
            return Err(ProviderError::BadResponse(format!(
                "{OP}: answered another operation"
            )));
        }
        Ok(remote_from_wire(o))
    }

    async fn click_to_pay_profiles(
        &self,
        d1_issuer_id: &str,
        target: &OperationTarget,
    ) -> Result<Vec<ClickToPayProfile>, ProviderError> {
        const OP: &str = "clickToPayProfiles";
        let template = match target {
            OperationTarget::Card(_) => &self.paths.card_click_to_pay_profiles,
            OperationTarget::Consumer(_) => &self.paths.consumer_click_to_pay_profiles,
        };
        let reply = self
            .client
            .execute(Spec {
                op: OP,
                method: Method::GET,
                url: self.url(template, d1_issuer_id, Some(target), None),
                body: None,
                auth: true,
                retry_500: true,
                not_found_is_rejection: false,
            })
            .await?;
        let resp: ClickToPayProfilesResponse = decode(OP, &reply)?;
        let mut out = Vec::new();
        for p in resp.click_to_pay_profiles {
            let name = p.name.clone().unwrap_or_default();
            // A profile lists the consumer's cards; the card asked about (or the first).
            let card = match target {
                OperationTarget::Card(c) => p
                    .cards
                    .iter()
                    .find(|k| k.card_id.as_deref() == Some(c.as_str()))
                    .or(p.cards.first()),
                OperationTarget::Consumer(_) => p.cards.first(),
            };
            out.push(ClickToPayProfile {
                directory: p.directory.clone(),
                consumer_id: p.consumer_id.clone(),
                first_name: name.first_name,
                middle_name: name.middle_name,
                last_name: name.last_name,
                email: p.email.clone(),
                phone: p.phone.clone(),
                language: p.language.clone(),
                masked_pan: card.and_then(|k| k.pan.as_deref()).and_then(mask_pan),
                expiry: card.and_then(|k| k.expiry.clone()),
                cardholder_name: card.and_then(|k| k.cardholder_name.clone()),
                billing_address: card.and_then(|k| k.billing_address.clone()),
            });
        }
        Ok(out)
    }
}
