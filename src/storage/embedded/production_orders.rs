//! Production orders on the embedded store: `production_orders` (issuer, issuerRequestId) ->
//! order JSON, and `production_orders_by_card` (issuer, cardId, created at ms, issuerRequestId)
//! -> (), the card's orders in creation order. An insert or a compare-and-set is one redb write
//! transaction.

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::{EmbeddedStore, begin_write};
use crate::domain::ports::StoreError;
use crate::domain::ports::production_orders::{
    MAX_CARD_ORDERS, PlaceOutcome, ProductionOrderStore,
};
use crate::domain::production_orders::ProductionOrder;
use crate::storage::codec::production_orders::{decode, encode};

const ORDERS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("production_orders");
const BY_CARD: TableDefinition<(&str, &str, u64, &str), ()> =
    TableDefinition::new("production_orders_by_card");

/// Sorts after every id character (`[A-Za-z0-9_-]`): the upper bound of a card's range.
const AFTER_IDS: &str = "~";

/// `Ok(None)` for a table no write created yet (tables are made on first use).
fn missing_ok<T>(r: Result<T, TableError>) -> Result<Option<T>, StoreError> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn created_ms(o: &ProductionOrder) -> u64 {
    u64::try_from(o.created_at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

#[async_trait]
impl ProductionOrderStore for EmbeddedStore {
    async fn insert_production_order(
        &self,
        order: &ProductionOrder,
    ) -> Result<PlaceOutcome, StoreError> {
        let json = encode(order)?;
        let order = order.clone();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            {
                let mut orders = txn.open_table(ORDERS)?;
                let key = (order.issuer_id.as_str(), order.issuer_request_id.as_str());
                if let Some(existing) = orders.get(key)? {
                    return Ok(PlaceOutcome::Existing(Box::new(decode(existing.value())?)));
                }
                orders.insert(key, json.as_slice())?;
                let mut by_card = txn.open_table(BY_CARD)?;
                by_card.insert(
                    (
                        order.issuer_id.as_str(),
                        order.card_id.as_str(),
                        created_ms(&order),
                        order.issuer_request_id.as_str(),
                    ),
                    (),
                )?;
            }
            txn.commit()?;
            Ok(PlaceOutcome::Created)
        })
        .await
    }

    async fn get_production_order(
        &self,
        issuer_id: &str,
        issuer_request_id: &str,
    ) -> Result<Option<ProductionOrder>, StoreError> {
        let (issuer, req) = (issuer_id.to_owned(), issuer_request_id.to_owned());
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(t) = missing_ok(txn.open_table(ORDERS))? else {
                return Ok(None);
            };
            t.get((issuer.as_str(), req.as_str()))?
                .map(|g| decode(g.value()))
                .transpose()
        })
        .await
    }

    async fn card_production_orders(
        &self,
        issuer_id: &str,
        card_id: &str,
        limit: usize,
    ) -> Result<Vec<ProductionOrder>, StoreError> {
        let limit = limit.clamp(1, MAX_CARD_ORDERS);
        let (issuer, card) = (issuer_id.to_owned(), card_id.to_owned());
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let (Some(by_card), Some(orders)) = (
                missing_ok(txn.open_table(BY_CARD))?,
                missing_ok(txn.open_table(ORDERS))?,
            ) else {
                return Ok(Vec::new());
            };
            let (i, c) = (issuer.as_str(), card.as_str());
            let mut out = Vec::new();
            for row in by_card
                .range((i, c, 0u64, "")..=(i, c, u64::MAX, AFTER_IDS))?
                .rev()
            {
                if out.len() == limit {
                    break;
                }
                let row = row?;
                let (_, _, _, req) = row.0.value();
                let json = orders.get((i, req))?.ok_or_else(|| {
                    StoreError::Corrupt("card order index names a missing order".into())
                })?;
                out.push(decode(json.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn update_production_order(&self, order: &ProductionOrder) -> Result<(), StoreError> {
        let json = encode(order)?;
        let order = order.clone();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            {
                let mut orders = txn.open_table(ORDERS)?;
                let key = (order.issuer_id.as_str(), order.issuer_request_id.as_str());
                let stored = orders
                    .get(key)?
                    .map(|g| decode(g.value()))
                    .transpose()?
                    .ok_or(StoreError::NotFound)?;
                if order.version.checked_sub(1) != Some(stored.version) {
                    return Err(StoreError::Conflict);
                }
                orders.insert(key, json.as_slice())?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }
}
