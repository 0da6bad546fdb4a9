//! The physical card order use cases (issue 11, central issuance): placing an order (one card
//! or a batch), the production status of a card, and following production through D1's
//! PRODUCE notifications (an [`OperationHook`] of the issuer service).
//!
//! # One order per `issuerRequestId`
//!
//! The issuer's `issuerRequestId` is the anchor: it is the operation's `issuerRequestId` (unique
//! per issuer in the operation store) and the key of the production order. A request that
//! repeats it finds the order it made:
//! - if D1 acknowledged that order, nothing is sent again and the same operation is answered;
//! - if D1's answer was lost (5xx, timeout), the operation is `PENDING` and not `submitted`:
//!   the repeated request re-sends the order to D1 **with the same `issuerRequestId`**, which D1
//!   answers with the order it already has (never a second card).
//!
//! The card data cannot be re-sent by a background worker: it is not stored anywhere (PCI DSS
//! 3.3). So the operation is created with [`OperationCall::External`]: the issuer service's
//! worker polls it once D1 knows it, and only the issuer's own retry re-sends it; the answer's
//! operation shows `submitted: false` until then.
//!
//! # What is kept
//!
//! The order record (`domain::production_orders`) keeps the masked PAN and the production
//! history; the card data lives in [`ProductionCard`] for the length of the request.

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::error::{DomainError, ProviderError};
use super::issuer::{Issuer, valid_card_id};
use super::issuer_ops::{
    IssuerOperation, OperationCall, OperationKind, OperationStatus, OperationTarget, valid_d1_id,
};
use super::issuer_service::{IssuerService, OperationHook};
use super::production_orders::{
    BatchOrder, OrderSpec, ProductionAck, ProductionCard, ProductionEvent, ProductionOrder,
    ProductionProvider, ProductionStage, Recorded, ShipmentTracking,
};
use super::webhooks::WebhookService;
use crate::domain::ports::StoreError;
use crate::domain::ports::issuer_operations::OperationInsert;
use crate::domain::ports::production_orders::{
    MAX_CARD_ORDERS, PlaceOutcome, ProductionOrderStore,
};

/// Most cards in one batch order (D1's limit).
pub const MAX_BATCH: usize = 1000;
/// Version conflicts retried before answering "try again".
const CAS_ATTEMPTS: usize = 5;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// One card of a batch, as the HTTP layer parsed it (`Err`: the item's own validation failed).
pub struct BatchItem {
    pub card_id: String,
    pub issuer_request_id: String,
    pub spec: OrderSpec,
    pub card: ProductionCard,
}

/// An order as placed: its operation and its production record.
#[derive(Debug, Clone)]
pub struct Placed {
    pub operation: IssuerOperation,
    pub order: ProductionOrder,
}

/// The production state of a card: its latest order, with its full history, and the earlier
/// orders of the card (newest first).
#[derive(Debug, Clone)]
pub struct CardProduction {
    pub latest: ProductionOrder,
    pub earlier: Vec<ProductionOrder>,
}

#[derive(Clone)]
pub struct ProductionService {
    issuer: IssuerService,
    orders: Arc<dyn ProductionOrderStore>,
    provider: Option<Arc<dyn ProductionProvider>>,
    webhooks: Option<Arc<WebhookService>>,
}

fn check_ids(card_id: &str, issuer_request_id: &str) -> Result<(), DomainError> {
    if !valid_card_id(card_id) {
        return Err(DomainError::Validation {
            code: "invalid_card_id",
            detail: "cardId must match ^[A-Za-z0-9_-]{1,48}$".into(),
        });
    }
    if !valid_d1_id(issuer_request_id) {
        return Err(DomainError::Validation {
            code: "invalid_issuer_request_id",
            detail: "issuerRequestId must match ^[A-Za-z0-9_-]{1,64}$".into(),
        });
    }
    Ok(())
}

fn conflict_other_card() -> DomainError {
    DomainError::Duplicate {
        problem: "issuer_request_id_in_use",
        detail: "issuerRequestId was already used for another card or operation".into(),
    }
}

impl ProductionService {
    pub fn new(
        issuer: IssuerService,
        orders: Arc<dyn ProductionOrderStore>,
        provider: Option<Arc<dyn ProductionProvider>>,
        webhooks: Option<Arc<WebhookService>>,
    ) -> ProductionService {
        ProductionService {
            issuer,
            orders,
            provider,
            webhooks,
        }
    }

    /// Registers the PRODUCE hook with the issuer service, so notifications and polls update
    /// the production history. The hook holds this service weakly: the issuer service keeps
    /// its hooks and this service holds the issuer service, so a strong hook would be a cycle
    /// that never drops (and would keep the embedded database open after a shutdown).
    pub fn register(self: &Arc<Self>) {
        self.issuer.register_hook(
            &OperationKind::Produce,
            Arc::new(ProduceHook(Arc::downgrade(self))),
        );
    }

    fn provider(&self) -> Result<&Arc<dyn ProductionProvider>, DomainError> {
        self.provider
            .as_ref()
            .ok_or(DomainError::Upstream(ProviderError::NotConfigured))
    }

    /// The operation and order of `issuer_request_id`, created when new. `Ok((placed, true))`
    /// when D1 still has to be called (new, or a lost answer being retried).
    async fn reserve(
        &self,
        issuer: &Issuer,
        card_id: &str,
        issuer_request_id: &str,
        spec: &OrderSpec,
        card: &ProductionCard,
    ) -> Result<(Placed, bool), DomainError> {
        let at = now();
        let op = IssuerOperation::new(
            issuer.id.clone(),
            OperationKind::Produce,
            OperationTarget::Card(card_id.to_owned()),
            issuer_request_id.to_owned(),
            OperationCall::External,
            at,
        );
        let op = match self.issuer.ops.insert_operation(&op).await? {
            OperationInsert::Inserted => op,
            OperationInsert::Existing(existing) => {
                if existing.kind != OperationKind::Produce
                    || existing.card_id.as_deref() != Some(card_id)
                {
                    return Err(conflict_other_card());
                }
                *existing
            }
        };
        let mut order = ProductionOrder::new(
            issuer.id.as_str(),
            card_id,
            issuer_request_id,
            spec.channel,
            card.masked_pan(),
            op.start_time,
        );
        order.operation_id = Some(op.id.to_string());
        let order = match self.orders.insert_production_order(&order).await? {
            PlaceOutcome::Created => order,
            PlaceOutcome::Existing(o) => {
                if o.card_id != card_id {
                    return Err(conflict_other_card());
                }
                *o
            }
        };
        let to_send = !op.submitted && op.status == OperationStatus::Pending;
        Ok((
            Placed {
                operation: op,
                order,
            },
            to_send,
        ))
    }

    /// Places one order (module docs): validation before anything is stored or sent, the
    /// operation and the order stored `PENDING`, then D1. A D1 refusal is an error carrying
    /// D1's code (the operation is kept, `FAILED`); an unknown outcome answers the `PENDING`
    /// operation (re-sent by the issuer's retry with the same `issuerRequestId`).
    pub async fn place_order(
        &self,
        issuer: &Issuer,
        card_id: &str,
        issuer_request_id: &str,
        spec: &OrderSpec,
        card: ProductionCard,
    ) -> Result<Placed, DomainError> {
        check_ids(card_id, issuer_request_id)?;
        spec.validate()?;
        let provider = self.provider()?.clone();
        let (placed, to_send) = self
            .reserve(issuer, card_id, issuer_request_id, spec, &card)
            .await?;
        if !to_send {
            return Ok(placed);
        }
        let result = provider
            .order_production(
                &issuer.d1_issuer_id,
                card_id,
                issuer_request_id,
                spec,
                &card,
            )
            .await;
        drop(card);
        self.settle(placed, result).await
    }

    /// Stores what D1 answered for an order.
    async fn settle(
        &self,
        placed: Placed,
        result: Result<ProductionAck, ProviderError>,
    ) -> Result<Placed, DomainError> {
        let Placed {
            operation: op,
            order,
        } = placed;
        let settings = self.issuer.settings().clone();
        match result {
            Ok(ack) => {
                // A PRODUCE notification may have changed the operation meanwhile: the
                // acknowledgement is applied to the stored record, retried on conflicts.
                let mut cur = op;
                for _ in 0..CAS_ATTEMPTS {
                    if cur.d1_operation_id.is_some() && cur.submitted {
                        break;
                    }
                    let next = cur.acknowledged(&ack.d1_operation_id, after(settings.poll_after));
                    match self.issuer.ops.update_operation(&next).await {
                        Ok(()) => {
                            cur = next;
                            break;
                        }
                        Err(StoreError::Conflict) => {
                            match self
                                .issuer
                                .ops
                                .get_operation(&cur.issuer_id, &cur.id)
                                .await?
                            {
                                Some(stored) => cur = stored,
                                None => break,
                            }
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(Placed {
                    operation: cur,
                    order,
                })
            }
            Err(ProviderError::Rejected { status, code }) => {
                // Its webhook events are written with the change (IssuerService::store_update).
                let next = op.rejected(&code, now());
                self.store_op(op, next).await;
                Err(DomainError::Upstream(ProviderError::Rejected {
                    status,
                    code,
                }))
            }
            Err(ProviderError::NotConfigured) => {
                Err(DomainError::Upstream(ProviderError::NotConfigured))
            }
            Err(e) => {
                tracing::info!(operation_id = %op.id, error = %e,
                    "D1 outcome of a production order unknown; a retry with the same issuerRequestId re-sends it");
                let next = op.rescheduled(after(settings.redrive_after));
                let operation = self.store_op(op, next).await;
                Ok(Placed { operation, order })
            }
        }
    }

    /// Writes `next` over `prev` with its webhook events; on a conflict (a notification won the
    /// race) the stored record is answered: it is at least as recent as ours.
    async fn store_op(&self, prev: IssuerOperation, next: IssuerOperation) -> IssuerOperation {
        self.issuer.store_update(prev, next).await
    }

    /// Places a batch: every item validated and reserved, one D1 call for those to send, a
    /// result per item in request order. An item's failure does not fail the others.
    pub async fn place_batch(
        &self,
        issuer: &Issuer,
        items: Vec<Result<BatchItem, DomainError>>,
    ) -> Result<Vec<Result<Placed, DomainError>>, DomainError> {
        if items.is_empty() || items.len() > MAX_BATCH {
            return Err(DomainError::Validation {
                code: "invalid_batch_size",
                detail: format!("orders must have 1 to {MAX_BATCH} items"),
            });
        }
        let provider = self.provider()?.clone();
        let mut results: Vec<Result<Placed, DomainError>> = Vec::with_capacity(items.len());
        // (index in results, item) of what D1 must get.
        let mut to_send: Vec<(usize, BatchItem)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for item in items {
            let r = match item {
                Err(e) => Err(e),
                Ok(it) => {
                    let checked = check_ids(&it.card_id, &it.issuer_request_id)
                        .and_then(|()| it.spec.validate())
                        .and_then(|()| {
                            if seen.insert(it.issuer_request_id.clone()) {
                                Ok(())
                            } else {
                                Err(DomainError::Validation {
                                    code: "duplicate_issuer_request_id",
                                    detail: "issuerRequestId appears twice in the batch".into(),
                                })
                            }
                        });
                    match checked {
                        Err(e) => Err(e),
                        Ok(()) => match self
                            .reserve(
                                issuer,
                                &it.card_id,
                                &it.issuer_request_id,
                                &it.spec,
                                &it.card,
                            )
                            .await
                        {
                            Err(e) => Err(e),
                            Ok((placed, send)) => {
                                if send {
                                    to_send.push((results.len(), it));
                                }
                                Ok(placed)
                            }
                        },
                    }
                }
            };
            results.push(r);
        }
        if to_send.is_empty() {
            return Ok(results);
        }
        let orders: Vec<BatchOrder<'_>> = to_send
            .iter()
            .map(|(_, it)| BatchOrder {
                card_id: &it.card_id,
                issuer_request_id: &it.issuer_request_id,
                spec: &it.spec,
                card: &it.card,
            })
            .collect();
        let answer = provider
            .order_production_batch(&issuer.d1_issuer_id, &orders)
            .await;
        drop(orders);
        let per_item: Vec<Result<ProductionAck, ProviderError>> = match answer {
            Ok(v) => v,
            // The whole call failed: every item gets that outcome.
            Err(e) => to_send.iter().map(|_| Err(e.clone())).collect(),
        };
        for ((idx, item), outcome) in to_send.into_iter().zip(per_item) {
            drop(item);
            let Some(slot) = results.get_mut(idx) else {
                continue;
            };
            // Reserved items are `Ok`; the placeholder is replaced right below.
            let placed = match std::mem::replace(slot, Err(DomainError::Conflict)) {
                Ok(p) => p,
                Err(e) => {
                    *slot = Err(e);
                    continue;
                }
            };
            *slot = self.settle(placed, outcome).await;
        }
        Ok(results)
    }

    /// The production state of a card (404 when it was never ordered).
    pub async fn card_production(
        &self,
        issuer: &Issuer,
        card_id: &str,
    ) -> Result<CardProduction, DomainError> {
        if !valid_card_id(card_id) {
            return Err(DomainError::Validation {
                code: "invalid_card_id",
                detail: "cardId must match ^[A-Za-z0-9_-]{1,48}$".into(),
            });
        }
        let mut orders = self
            .orders
            .card_production_orders(issuer.id.as_str(), card_id, MAX_CARD_ORDERS)
            .await?;
        if orders.is_empty() {
            return Err(DomainError::ProductionOrderNotFound);
        }
        let latest = orders.remove(0);
        Ok(CardProduction {
            latest,
            earlier: orders,
        })
    }

    /// Records a production step on the order of `issuer_request_id` (compare-and-set, retried
    /// on conflicts) and announces a change. `Ok(None)`: no such order, or nothing new.
    pub async fn record_step(
        &self,
        issuer_id: &str,
        issuer_request_id: &str,
        ev: ProductionEvent,
    ) -> Result<Option<ProductionOrder>, DomainError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(mut order) = self
                .orders
                .get_production_order(issuer_id, issuer_request_id)
                .await?
            else {
                return Ok(None);
            };
            let before = order.status.clone();
            match order.record(ev.clone(), now()) {
                Recorded::Duplicate => return Ok(None),
                r => {
                    order.version += 1;
                    match self.orders.update_production_order(&order).await {
                        Ok(()) => {
                            if r == Recorded::Changed {
                                self.announce(&before, &order).await;
                            }
                            return Ok(Some(order));
                        }
                        Err(StoreError::Conflict) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(DomainError::Conflict)
    }

    async fn announce(&self, before: &ProductionStage, order: &ProductionOrder) {
        if let Some(w) = &self.webhooks
            && let Err(e) = w.issuer_production_status_changed(order, before).await
        {
            tracing::warn!(issuer_request_id = %order.issuer_request_id, error = %e,
                "production webhook event not recorded");
        }
    }
}

fn after(d: std::time::Duration) -> OffsetDateTime {
    now() + time::Duration::try_from(d).unwrap_or(time::Duration::ZERO)
}

/// `details` of a PRODUCE operation: `{status, shipment?}`.
fn step_of(op: &IssuerOperation) -> Option<ProductionEvent> {
    let d = op.details.as_ref()?;
    let status = ProductionStage::parse(d.get("status")?.as_str()?);
    let shipment = d
        .get("shipment")
        .and_then(|s| serde_json::from_value::<ShipmentTracking>(s.clone()).ok());
    let at = op.history.last().map_or_else(now, |h| h.at);
    Some(ProductionEvent {
        error_code: status.is_failure().then(|| op.error_code.clone()).flatten(),
        status,
        at,
        shipment,
    })
}

/// The PRODUCE hook: a weak handle on the production service (see [`ProductionService::register`]).
struct ProduceHook(std::sync::Weak<ProductionService>);

#[async_trait]
impl OperationHook for ProduceHook {
    async fn operation_changed(
        &self,
        before: &IssuerOperation,
        after: &IssuerOperation,
    ) -> Result<(), DomainError> {
        // The gateway holds the service until its issuer worker has stopped (app.rs), so this
        // is only reached by a hook called after the gateway is gone.
        let Some(service) = self.0.upgrade() else {
            return Ok(());
        };
        service.operation_changed(before, after).await
    }
}

#[async_trait]
impl OperationHook for ProductionService {
    async fn operation_changed(
        &self,
        before: &IssuerOperation,
        after: &IssuerOperation,
    ) -> Result<(), DomainError> {
        if before.details == after.details {
            return Ok(());
        }
        let Some(ev) = step_of(after) else {
            return Ok(());
        };
        self.record_step(after.issuer_id.as_str(), &after.issuer_request_id, ev)
            .await
            .map(|_| ())
    }
}
