//! Production orders of physical cards ([`ProductionOrderStore`]): the order record by
//! `(issuer, issuerRequestId)` and, per card, the list of its orders. Implemented for Redis
//! (`storage/redis/production_orders.rs`, the issuer's keys under one `{i:<issuer>}` hash tag so
//! the multi-key writes are one Lua script on Cluster too) and the embedded store
//! (`storage/embedded/production_orders.rs`, one redb transaction); layout in `docs/storage.md`.
//!
//! Records hold no card data (`domain::production_orders`): the contract suite reads the raw
//! bytes of every backend to check it.

use async_trait::async_trait;

use super::StoreError;
use crate::domain::production_orders::ProductionOrder;

/// Result of [`ProductionOrderStore::insert_production_order`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaceOutcome {
    Created,
    /// An order with this `(issuer, issuerRequestId)` exists: it is returned, nothing written.
    Existing(Box<ProductionOrder>),
}

/// Most orders [`ProductionOrderStore::card_production_orders`] returns.
pub const MAX_CARD_ORDERS: usize = 50;

#[async_trait]
pub trait ProductionOrderStore: Send + Sync + 'static {
    /// Stores a new order (version 0) and appends it to its card's list, atomically; a second
    /// insert with the same `(issuer, issuerRequestId)` returns the first order.
    async fn insert_production_order(
        &self,
        order: &ProductionOrder,
    ) -> Result<PlaceOutcome, StoreError>;

    /// The order of `(issuer, issuerRequestId)`; `None` when there is none.
    async fn get_production_order(
        &self,
        issuer_id: &str,
        issuer_request_id: &str,
    ) -> Result<Option<ProductionOrder>, StoreError>;

    /// The card's orders, newest first, at most `limit` (capped at [`MAX_CARD_ORDERS`]).
    async fn card_production_orders(
        &self,
        issuer_id: &str,
        card_id: &str,
        limit: usize,
    ) -> Result<Vec<ProductionOrder>, StoreError>;

    /// Replaces the order if the stored version is `order.version - 1` (compare-and-set);
    /// [`StoreError::Conflict`] otherwise (re-read and retry), [`StoreError::NotFound`] when
    /// there is no such order.
    async fn update_production_order(&self, order: &ProductionOrder) -> Result<(), StoreError>;
}
