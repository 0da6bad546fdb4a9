//! The issuer's cards as the gateway knows them: `GET /v1/issuer/cards/{cardId}` and
//! `DELETE /v1/issuer/cards/{cardId}` (docs/issuer.md, "Cards").
//!
//! The gateway holds no card data; what it knows of a card comes from the operations it ran and
//! from D1's card-operation notifications, folded into one [`IssuerCard`] record by an
//! [`OperationHook`] on the issuer service:
//! - `DELETE` succeeded (the issuer's own delete, or the bank deleting the card through another
//!   D1 channel, which the issuer service adopts as an operation): the card is `DELETED`, and
//!   since D1 deleting a card also opts it out of Click to Pay (D1-NOTES A2), its Click to Pay
//!   state becomes `OPTED_OUT` (reason `CARD_DELETED`) and `issuer.click_to_pay.opted_out` is
//!   queued. Re-enrolment is refused while the card is deleted.
//! - `SUSPEND` / `RESUME` succeeded: `SUSPENDED` / `ACTIVE` (never after `DELETED`).
//! - a card's Click to Pay enrolment / opt-out succeeded: `ENROLLED` / `OPTED_OUT`.
//!
//! # Exactly once
//!
//! The hook runs only on the instance whose notification write was `Applied` (the issuer
//! service's dedup marker and compare-and-set), and only for the change of an operation to its
//! final status, which happens once. The record itself is written by compare-and-set, so two
//! changes of one card on two instances (a delete and a late enrolment) never lose one; the
//! opt-out event is queued only by the write that moved the card out of Click to Pay.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::DomainError;
use super::issuer::{Issuer, IssuerId, valid_card_id};
use super::issuer_ops::{
    IssuerOperation, OperationCall, OperationFilter, OperationId, OperationKind, OperationStatus,
    OperationTarget,
};
use super::issuer_service::{IssuerService, OperationHook};
use super::ports::StoreError;
use super::ports::issuer_cards::IssuerCardStore;
use super::ports::production_orders::ProductionOrderStore;
use super::production_orders::ProductionOrder;
use super::webhooks::WebhookService;

/// Compare-and-set attempts on a card record before giving up (logged; a redelivery of the
/// notification cannot help since it is marked processed, so attempts are generous).
const CAS_ATTEMPTS: usize = 8;
/// Operations shown with a card (newest first).
pub const LAST_OPERATIONS: usize = 5;

/// The card's lifecycle at D1, as D1's card-operation notifications told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CardLifecycle {
    Active,
    Suspended,
    Deleted,
}

/// The card's Click to Pay state, from the operations that finished on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClickToPayState {
    Enrolled,
    OptedOut,
}

/// Why a card left Click to Pay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OptOutReason {
    /// A Click to Pay opt-out of the card.
    OptOut,
    /// D1 deleted the card, which opts it out of Click to Pay.
    CardDeleted,
}

impl OptOutReason {
    pub fn as_str(self) -> &'static str {
        match self {
            OptOutReason::OptOut => "OPT_OUT",
            OptOutReason::CardDeleted => "CARD_DELETED",
        }
    }
}

/// What the gateway knows of one card of one issuer. No card data: ids and states only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuerCard {
    pub issuer_id: IssuerId,
    pub card_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<CardLifecycle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub click_to_pay: Option<ClickToPayState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opt_out_reason: Option<OptOutReason>,
    /// The Click to Pay consumer, when D1's profile of the card named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_id: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub deleted_at: Option<OffsetDateTime>,
    /// The operation whose outcome last changed this record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change_operation_id: Option<OperationId>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Compare-and-set version, 1 for a new record.
    pub version: u64,
}

impl IssuerCard {
    fn new(issuer_id: IssuerId, card_id: &str, now: OffsetDateTime) -> IssuerCard {
        IssuerCard {
            issuer_id,
            card_id: card_id.to_owned(),
            lifecycle: None,
            click_to_pay: None,
            opt_out_reason: None,
            consumer_id: None,
            deleted_at: None,
            last_change_operation_id: None,
            updated_at: now,
            version: 0,
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.lifecycle == Some(CardLifecycle::Deleted)
    }
}

/// What `op` (just finished `SUCCESSFUL`) does to `card`. `Some(reason)` when the card has
/// just left Click to Pay (the opt-out event to queue); `None` with `changed == false` when
/// nothing changes.
fn fold(
    card: &mut IssuerCard,
    op: &IssuerOperation,
    now: OffsetDateTime,
) -> (bool, Option<OptOutReason>) {
    let deleted = card.is_deleted();
    let mut left = None;
    let changed = match op.kind {
        OperationKind::Delete if !deleted => {
            card.lifecycle = Some(CardLifecycle::Deleted);
            card.deleted_at = Some(op.end_time.unwrap_or(now));
            if card.click_to_pay != Some(ClickToPayState::OptedOut) {
                left = Some(OptOutReason::CardDeleted);
            }
            card.click_to_pay = Some(ClickToPayState::OptedOut);
            card.opt_out_reason = Some(OptOutReason::CardDeleted);
            true
        }
        OperationKind::Suspend if !deleted => {
            card.lifecycle = Some(CardLifecycle::Suspended);
            true
        }
        OperationKind::Resume if !deleted => {
            card.lifecycle = Some(CardLifecycle::Active);
            true
        }
        // A late enrolment result never re-enrols a deleted card.
        OperationKind::ClickToPayEnrolment if !deleted => {
            card.click_to_pay = Some(ClickToPayState::Enrolled);
            card.opt_out_reason = None;
            true
        }
        OperationKind::ClickToPayOptOut if !deleted => {
            card.click_to_pay = Some(ClickToPayState::OptedOut);
            card.opt_out_reason = Some(OptOutReason::OptOut);
            true
        }
        _ => false,
    };
    if changed {
        card.last_change_operation_id = Some(op.id.clone());
        card.updated_at = now;
    }
    (changed, left)
}

/// A card as `GET /v1/issuer/cards/{cardId}` shows it.
#[derive(Debug, Clone)]
pub struct CardView {
    pub card_id: String,
    /// `None` when the gateway has not folded any change of the card yet.
    pub record: Option<IssuerCard>,
    /// The card's latest production order, if any (masked PAN only).
    pub production: Option<ProductionOrder>,
    /// The newest operations about the card, newest first.
    pub operations: Vec<IssuerOperation>,
}

/// The card use cases and the hook that keeps [`IssuerCard`] records.
pub struct IssuerCards {
    issuer: IssuerService,
    cards: Arc<dyn IssuerCardStore>,
    orders: Option<Arc<dyn ProductionOrderStore>>,
    webhooks: Option<Arc<WebhookService>>,
}

fn check_card_id(card_id: &str) -> Result<(), DomainError> {
    if valid_card_id(card_id) {
        Ok(())
    } else {
        Err(DomainError::Validation {
            code: "invalid_card_id",
            detail: "cardId must match ^[A-Za-z0-9_-]{1,48}$".into(),
        })
    }
}

impl IssuerCards {
    pub fn new(
        issuer: IssuerService,
        cards: Arc<dyn IssuerCardStore>,
        orders: Option<Arc<dyn ProductionOrderStore>>,
        webhooks: Option<Arc<WebhookService>>,
    ) -> IssuerCards {
        IssuerCards {
            issuer,
            cards,
            orders,
            webhooks,
        }
    }

    /// Registers the card hook for the operation kinds that change a card.
    pub fn register(self: &Arc<Self>) {
        let hook: Arc<dyn OperationHook> = Arc::new(CardHook(Arc::downgrade(self)));
        for kind in [
            OperationKind::Delete,
            OperationKind::Suspend,
            OperationKind::Resume,
            OperationKind::ClickToPayEnrolment,
            OperationKind::ClickToPayOptOut,
        ] {
            self.issuer.register_hook(&kind, hook.clone());
        }
    }

    /// What the gateway knows of the card; [`DomainError::IssuerCardNotFound`] when nothing
    /// (no record, no operation, no order) is known of it for this issuer.
    pub async fn get_card(
        &self,
        issuer: &IssuerId,
        card_id: &str,
    ) -> Result<CardView, DomainError> {
        check_card_id(card_id)?;
        let record = self.cards.get_card(issuer, card_id).await?;
        let operations = self
            .issuer
            .ops
            .list_operations(
                issuer,
                &OperationFilter {
                    card_id: Some(card_id.to_owned()),
                    status: None,
                },
                LAST_OPERATIONS,
                None,
            )
            .await?
            .items;
        let production = match &self.orders {
            Some(o) => o
                .card_production_orders(issuer.as_str(), card_id, 1)
                .await?
                .into_iter()
                .next(),
            None => None,
        };
        if record.is_none() && operations.is_empty() && production.is_none() {
            return Err(DomainError::IssuerCardNotFound);
        }
        Ok(CardView {
            card_id: card_id.to_owned(),
            record,
            production,
            operations,
        })
    }

    /// Refuses Click to Pay enrolment of a card the gateway knows is deleted (`409
    /// card_deleted`): D1 would refuse it too, and the issuer learns why without a D1 call.
    pub async fn ensure_not_deleted(
        &self,
        issuer: &IssuerId,
        card_id: &str,
    ) -> Result<(), DomainError> {
        if !valid_card_id(card_id) {
            return Ok(()); // the use case answers its own validation error
        }
        match self.cards.get_card(issuer, card_id).await? {
            Some(c) if c.is_deleted() => Err(DomainError::CardDeleted),
            _ => Ok(()),
        }
    }

    /// Deletes the card at D1 (`DELETE`, which also opts it out of Click to Pay): `202` with
    /// the operation, finished by D1's notification (or a poll); re-driven with the same
    /// `issuerRequestId` when D1's answer is lost. A card already known deleted: `409`.
    pub async fn delete_card(
        &self,
        issuer: &Issuer,
        card_id: &str,
    ) -> Result<IssuerOperation, DomainError> {
        check_card_id(card_id)?;
        self.ensure_not_deleted(&issuer.id, card_id).await?;
        self.issuer
            .start_operation(
                issuer,
                OperationKind::Delete,
                OperationTarget::Card(card_id.to_owned()),
                OperationCall::CardDelete {
                    reason: None,
                    reason_code: None,
                },
            )
            .await
    }

    /// Folds a finished operation into its card (see the module docs).
    async fn apply(&self, op: &IssuerOperation) -> Result<(), DomainError> {
        let Some(card_id) = op.card_id.as_deref() else {
            // Consumer-level operations name no card.
            return Ok(());
        };
        let consumer = if op.kind == OperationKind::ClickToPayEnrolment {
            self.consumer_of(&op.issuer_id, card_id).await
        } else {
            None
        };
        for _ in 0..CAS_ATTEMPTS {
            let now = OffsetDateTime::now_utc();
            let current = self.cards.get_card(&op.issuer_id, card_id).await?;
            let mut next = current
                .clone()
                .unwrap_or_else(|| IssuerCard::new(op.issuer_id.clone(), card_id, now));
            let (changed, left) = fold(&mut next, op, now);
            if !changed {
                return Ok(());
            }
            if consumer.is_some() {
                next.consumer_id.clone_from(&consumer);
            }
            next.version = current.as_ref().map_or(1, |c| c.version + 1);
            match self.cards.put_card(&next).await {
                Ok(()) => {
                    if let Some(reason) = left {
                        self.announce_opt_out(op, &next, reason).await;
                    }
                    return Ok(());
                }
                Err(StoreError::Conflict) | Err(StoreError::NotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(DomainError::Conflict)
    }

    /// The card's Click to Pay consumer, from D1's profile of the card (best effort: the card
    /// state is kept without it).
    async fn consumer_of(&self, issuer: &IssuerId, card_id: &str) -> Option<String> {
        let issuer = self.issuer.get_issuer(issuer).await.ok()?;
        let profiles = self
            .issuer
            .click_to_pay_profiles(&issuer, OperationTarget::Card(card_id.to_owned()))
            .await
            .ok()?;
        profiles.into_iter().find_map(|p| p.consumer_id)
    }

    async fn announce_opt_out(
        &self,
        op: &IssuerOperation,
        card: &IssuerCard,
        reason: OptOutReason,
    ) {
        if let Some(w) = &self.webhooks
            && let Err(e) = w
                .issuer_card_opted_out(op, &card.card_id, reason.as_str())
                .await
        {
            tracing::warn!(operation_id = %op.id, error = %e, "issuer opt-out event not recorded");
        }
    }
}

/// The hook the issuer service calls (weakly held: the service owns its hooks).
struct CardHook(Weak<IssuerCards>);

#[async_trait]
impl OperationHook for CardHook {
    async fn operation_changed(
        &self,
        before: &IssuerOperation,
        after: &IssuerOperation,
    ) -> Result<(), DomainError> {
        if before.status == after.status || after.status != OperationStatus::Successful {
            return Ok(());
        }
        match self.0.upgrade() {
            Some(cards) => cards.apply(after).await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test should stop loudly")]
mod tests {
    use super::*;
    use crate::domain::issuer_ops::new_request_id;

    fn done(kind: OperationKind) -> IssuerOperation {
        let mut op = IssuerOperation::new(
            IssuerId::generate(),
            kind,
            OperationTarget::Card("card-1".into()),
            new_request_id(),
            OperationCall::External,
            OffsetDateTime::now_utc(),
        );
        op.status = OperationStatus::Successful;
        op
    }

    #[test]
    fn delete_opts_out_once_and_is_final() {
        let now = OffsetDateTime::now_utc();
        let mut c = IssuerCard::new(IssuerId::generate(), "card-1", now);
        let (changed, left) = fold(&mut c, &done(OperationKind::ClickToPayEnrolment), now);
        assert!(changed && left.is_none());
        assert_eq!(c.click_to_pay, Some(ClickToPayState::Enrolled));
        let (changed, left) = fold(&mut c, &done(OperationKind::Delete), now);
        assert!(changed);
        assert_eq!(left, Some(OptOutReason::CardDeleted));
        assert!(c.is_deleted());
        assert_eq!(c.click_to_pay, Some(ClickToPayState::OptedOut));
        // A second delete, a late enrolment or a resume change nothing.
        for k in [
            OperationKind::Delete,
            OperationKind::ClickToPayEnrolment,
            OperationKind::Resume,
        ] {
            assert_eq!(fold(&mut c, &done(k), now), (false, None));
        }
        assert_eq!(c.opt_out_reason, Some(OptOutReason::CardDeleted));
    }

    #[test]
    fn an_opted_out_card_is_not_announced_again_when_deleted() {
        let now = OffsetDateTime::now_utc();
        let mut c = IssuerCard::new(IssuerId::generate(), "card-1", now);
        fold(&mut c, &done(OperationKind::ClickToPayOptOut), now);
        let (changed, left) = fold(&mut c, &done(OperationKind::Delete), now);
        assert!(changed && left.is_none());
        assert_eq!(c.opt_out_reason, Some(OptOutReason::CardDeleted));
    }
}
