//! Production orders on Redis, every key of an issuer under the `{i:<issuer>}` hash tag (one
//! slot on Cluster, so a write touching two keys is one Lua script there too):
//! - `P:{i:I}:porder:<issuerRequestId>`, a hash: `v` the version, `j` the order JSON;
//! - `P:{i:I}:pcard:<cardId>`, a list: the card's issuerRequestIds, oldest first.
//!
//! The ids in key names match `^[A-Za-z0-9_-]+$` (checked before anything is stored), so they
//! cannot break the layout.

use std::sync::LazyLock;

use async_trait::async_trait;
use redis::Script;

use super::RedisStore;
use crate::domain::ports::StoreError;
use crate::domain::ports::production_orders::{
    MAX_CARD_ORDERS, PlaceOutcome, ProductionOrderStore,
};
use crate::domain::production_orders::ProductionOrder;
use crate::storage::codec::production_orders::{decode, encode};

/// Inserts an order unless its id is taken. KEYS: record, card list. ARGV: json, request id.
/// Returns `''` when inserted, else the existing order's JSON.
const INSERT: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'j')
if cur then return cur end
redis.call('HSET', KEYS[1], 'v', '0', 'j', ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[2])
return ''
"#;

/// Compare-and-set. KEYS: record. ARGV: expected version, new version, json.
/// Returns 1 (written), 0 (version changed), -1 (no such order).
const UPDATE: &str = r#"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'j', ARGV[3])
return 1
"#;

static INSERT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(INSERT));
static UPDATE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(UPDATE));

fn record_key(s: &RedisStore, issuer: &str, request_id: &str) -> String {
    s.global_key(&format!("{{i:{issuer}}}:porder:{request_id}"))
}

fn card_key(s: &RedisStore, issuer: &str, card_id: &str) -> String {
    s.global_key(&format!("{{i:{issuer}}}:pcard:{card_id}"))
}

#[async_trait]
impl ProductionOrderStore for RedisStore {
    async fn insert_production_order(
        &self,
        order: &ProductionOrder,
    ) -> Result<PlaceOutcome, StoreError> {
        let json = encode(order)?;
        let mut inv =
            INSERT_SCRIPT.key(record_key(self, &order.issuer_id, &order.issuer_request_id));
        inv.key(card_key(self, &order.issuer_id, &order.card_id));
        inv.arg(json).arg(&order.issuer_request_id);
        let existing: Vec<u8> = self.invoke_write(inv).await?;
        if existing.is_empty() {
            Ok(PlaceOutcome::Created)
        } else {
            Ok(PlaceOutcome::Existing(Box::new(decode(&existing)?)))
        }
    }

    async fn get_production_order(
        &self,
        issuer_id: &str,
        issuer_request_id: &str,
    ) -> Result<Option<ProductionOrder>, StoreError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(record_key(self, issuer_id, issuer_request_id))
            .arg("j");
        let json: Option<Vec<u8>> = self.query(cmd).await?;
        json.map(|j| decode(&j)).transpose()
    }

    async fn card_production_orders(
        &self,
        issuer_id: &str,
        card_id: &str,
        limit: usize,
    ) -> Result<Vec<ProductionOrder>, StoreError> {
        let limit = limit.clamp(1, MAX_CARD_ORDERS) as i64;
        let mut cmd = redis::cmd("LRANGE");
        cmd.arg(card_key(self, issuer_id, card_id))
            .arg(-limit)
            .arg(-1);
        let ids: Vec<String> = self.query(cmd).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids.iter().rev() {
            // The list is appended in the same script as the record is written, so every id
            // names a record; a missing one is corruption, not a miss.
            let order = self
                .get_production_order(issuer_id, id)
                .await?
                .ok_or_else(|| {
                    StoreError::Corrupt("card order list names a missing order".into())
                })?;
            out.push(order);
        }
        Ok(out)
    }

    async fn update_production_order(&self, order: &ProductionOrder) -> Result<(), StoreError> {
        let json = encode(order)?;
        // Version 0 cannot be an update of anything: "-1" never matches a stored version.
        let expected = order
            .version
            .checked_sub(1)
            .map_or_else(|| "-1".to_owned(), |v| v.to_string());
        let mut inv =
            UPDATE_SCRIPT.key(record_key(self, &order.issuer_id, &order.issuer_request_id));
        inv.arg(expected).arg(order.version.to_string()).arg(json);
        match self.invoke_write::<i64>(inv).await? {
            1 => Ok(()),
            0 => Err(StoreError::Conflict),
            _ => Err(StoreError::NotFound),
        }
    }
}
