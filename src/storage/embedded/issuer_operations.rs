//! [`IssuerOperationStore`] on the embedded redb file, each operation one write transaction
//! (`docs/storage.md`, "Issuer operations"):
//!
//! - `iss_ops` (issuer, op id) -> record JSON;
//! - `iss_ops_req` (issuer, issuerRequestId) -> op id; `iss_ops_d1` (issuer, D1 op id) -> op id;
//! - `iss_ops_idx` (issuer, index, sort key) -> (): the list indexes, `index` being `all`,
//!   `card:<cardId>` or `status:<STATUS>`, read newest first from the cursor;
//! - `iss_ops_due` (issuer, due ms, op id) -> (): `PENDING` operations by next check time;
//! - processed-notification markers in the lifecycle marker table (`lc_events`), scoped by the
//!   issuer id and prefixed `iop:` (the same expiry and purge as token event markers);
//! - the webhook events of a change (`update_operation_with`, `apply_notification_with`) go to
//!   the outbox tables in the same transaction (`embedded/outbox.rs`, `append_event_in`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::lifecycle::{marker_live, missing_is_empty, purge_expired, put_marker};
use super::outbox::append_event_in;
use super::{EmbeddedStore, begin_write};
use crate::domain::issuer::IssuerId;
use crate::domain::issuer_ops::{IssuerOperation, OperationFilter, OperationId};
use crate::domain::ports::StoreError;
use crate::domain::ports::issuer_operations::{
    IssuerOperationStore, NotificationWrite, OperationInsert, OperationPage,
};
use crate::domain::ports::outbox::EventAppend;
use crate::storage::codec::issuers::{decode, encode, unix_ms};

const OPS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("iss_ops");
const BY_REQ: TableDefinition<(&str, &str), &str> = TableDefinition::new("iss_ops_req");
const BY_D1: TableDefinition<(&str, &str), &str> = TableDefinition::new("iss_ops_d1");
const IDX: TableDefinition<(&str, &str, &str), ()> = TableDefinition::new("iss_ops_idx");
const DUE: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("iss_ops_due");

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn status_index(op: &IssuerOperation) -> String {
    format!("status:{}", op.status.as_str())
}

/// The compare-and-set of an update, inside `txn`, indexes kept in step.
fn update_in(txn: &WriteTransaction, op: &IssuerOperation) -> Result<(), StoreError> {
    let issuer = op.issuer_id.as_str();
    let id = op.id.as_str();
    let mut ops = txn.open_table(OPS)?;
    let cur: IssuerOperation = match ops.get((issuer, id))? {
        Some(g) => decode("issuer operation", g.value())?,
        None => return Err(StoreError::NotFound),
    };
    if cur.version.saturating_add(1) != op.version {
        return Err(StoreError::Conflict);
    }
    let key = op.sort_key();
    let mut idx = txn.open_table(IDX)?;
    if cur.status != op.status {
        idx.remove((issuer, status_index(&cur).as_str(), key.as_str()))?;
        idx.insert((issuer, status_index(op).as_str(), key.as_str()), ())?;
    }
    let mut due = txn.open_table(DUE)?;
    // Only a PENDING operation is in the due list.
    if !cur.status.is_final() {
        due.remove((issuer, unix_ms(cur.next_check_at), id))?;
    }
    if !op.status.is_final() {
        due.insert((issuer, unix_ms(op.next_check_at), id), ())?;
    }
    if let Some(d1) = &op.d1_operation_id {
        txn.open_table(BY_D1)?.insert((issuer, d1.as_str()), id)?;
    }
    let json = encode("issuer operation", op)?;
    ops.insert((issuer, id), json.as_slice())?;
    Ok(())
}

#[async_trait]
impl IssuerOperationStore for EmbeddedStore {
    async fn insert_operation(&self, op: &IssuerOperation) -> Result<OperationInsert, StoreError> {
        let op = op.clone();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            let issuer = op.issuer_id.as_str();
            {
                let mut by_req = txn.open_table(BY_REQ)?;
                let existing = by_req
                    .get((issuer, op.issuer_request_id.as_str()))?
                    .map(|g| g.value().to_owned());
                if let Some(existing) = existing {
                    let ops = txn.open_table(OPS)?;
                    let cur = ops.get((issuer, existing.as_str()))?.ok_or_else(|| {
                        StoreError::Corrupt("request index names no operation".into())
                    })?;
                    return Ok(OperationInsert::Existing(Box::new(decode(
                        "issuer operation",
                        cur.value(),
                    )?)));
                }
                by_req.insert((issuer, op.issuer_request_id.as_str()), op.id.as_str())?;
                let json = encode("issuer operation", &op)?;
                txn.open_table(OPS)?
                    .insert((issuer, op.id.as_str()), json.as_slice())?;
                let key = op.sort_key();
                let mut idx = txn.open_table(IDX)?;
                idx.insert((issuer, "all", key.as_str()), ())?;
                idx.insert((issuer, status_index(&op).as_str(), key.as_str()), ())?;
                if let Some(c) = &op.card_id {
                    idx.insert((issuer, format!("card:{c}").as_str(), key.as_str()), ())?;
                }
                if !op.status.is_final() {
                    txn.open_table(DUE)?
                        .insert((issuer, unix_ms(op.next_check_at), op.id.as_str()), ())?;
                }
            }
            txn.commit()?;
            Ok(OperationInsert::Inserted)
        })
        .await
    }

    async fn get_operation(
        &self,
        issuer: &IssuerId,
        id: &OperationId,
    ) -> Result<Option<IssuerOperation>, StoreError> {
        let (issuer, id) = (issuer.as_str().to_owned(), id.as_str().to_owned());
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(ops) = missing_is_empty(txn.open_table(OPS))? else {
                return Ok(None);
            };
            ops.get((issuer.as_str(), id.as_str()))?
                .map(|g| decode("issuer operation", g.value()))
                .transpose()
        })
        .await
    }

    async fn operation_by_request_id(
        &self,
        issuer: &IssuerId,
        issuer_request_id: &str,
    ) -> Result<Option<IssuerOperation>, StoreError> {
        self.op_via(BY_REQ, issuer, issuer_request_id).await
    }

    async fn operation_by_d1_id(
        &self,
        issuer: &IssuerId,
        d1_operation_id: &str,
    ) -> Result<Option<IssuerOperation>, StoreError> {
        self.op_via(BY_D1, issuer, d1_operation_id).await
    }

    async fn update_operation_with(
        &self,
        op: &IssuerOperation,
        events: &[EventAppend],
    ) -> Result<(), StoreError> {
        let op = op.clone();
        let events = events.to_vec();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            // An error drops the transaction uncommitted: neither change nor event is written.
            update_in(&txn, &op)?;
            for e in &events {
                append_event_in(&txn, e)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn apply_notification_with(
        &self,
        op: &IssuerOperation,
        dedup_key: &str,
        ttl: Duration,
        events: &[EventAppend],
    ) -> Result<NotificationWrite, StoreError> {
        let op = op.clone();
        let events = events.to_vec();
        let marker = format!("iop:{dedup_key}");
        self.run(move |db: &Database| {
            let now = now_ms();
            let txn = begin_write(db)?;
            let issuer = op.issuer_id.as_str();
            if marker_live(&txn, issuer, &marker, now)? {
                return Ok(NotificationWrite::Duplicate);
            }
            update_in(&txn, &op)?;
            for e in &events {
                append_event_in(&txn, e)?;
            }
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            put_marker(&txn, issuer, &marker, now.saturating_add(ttl_ms))?;
            purge_expired(&txn, now)?;
            txn.commit()?;
            Ok(NotificationWrite::Applied)
        })
        .await
    }

    async fn list_operations(
        &self,
        issuer: &IssuerId,
        filter: &OperationFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<OperationPage, StoreError> {
        let issuer = issuer.as_str().to_owned();
        let filter = filter.clone();
        let cursor = cursor.map(str::to_owned);
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let (Some(idx), Some(ops)) = (
                missing_is_empty(txn.open_table(IDX))?,
                missing_is_empty(txn.open_table(OPS))?,
            ) else {
                return Ok(OperationPage::default());
            };
            let (index, post_status) = match (&filter.card_id, filter.status) {
                (Some(c), s) => (format!("card:{c}"), s),
                (None, Some(s)) => (format!("status:{}", s.as_str()), None),
                (None, None) => ("all".to_owned(), None),
            };
            let i = issuer.as_str();
            let ix = index.as_str();
            let upper = cursor.clone().unwrap_or_else(|| "~".to_owned());
            let mut items = Vec::new();
            for entry in idx.range((i, ix, "")..(i, ix, upper.as_str()))?.rev() {
                let (k, _) = entry?;
                let (_, _, key) = k.value();
                let Some((_, id)) = key.split_once(':') else {
                    continue;
                };
                let Some(g) = ops.get((i, id))? else { continue };
                let op: IssuerOperation = decode("issuer operation", g.value())?;
                if post_status.is_none_or(|s| s == op.status) {
                    items.push(op);
                    if items.len() > limit {
                        break;
                    }
                }
            }
            let next = if items.len() > limit {
                items.truncate(limit);
                items.last().map(IssuerOperation::sort_key)
            } else {
                None
            };
            Ok(OperationPage { items, next })
        })
        .await
    }

    async fn due_operations(
        &self,
        issuer: &IssuerId,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<OperationId>, StoreError> {
        let issuer = issuer.as_str().to_owned();
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(due) = missing_is_empty(txn.open_table(DUE))? else {
                return Ok(Vec::new());
            };
            let i = issuer.as_str();
            let mut out = Vec::new();
            for entry in due.range((i, 0u64, "")..=(i, now_ms, "~"))?.take(limit) {
                let (k, _) = entry?;
                if let Some(id) = OperationId::parse(k.value().2) {
                    out.push(id);
                }
            }
            Ok(out)
        })
        .await
    }
}

impl EmbeddedStore {
    async fn op_via(
        &self,
        index: TableDefinition<'static, (&'static str, &'static str), &'static str>,
        issuer: &IssuerId,
        key: &str,
    ) -> Result<Option<IssuerOperation>, StoreError> {
        let (issuer, key) = (issuer.as_str().to_owned(), key.to_owned());
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(idx) = missing_is_empty(txn.open_table(index))? else {
                return Ok(None);
            };
            let Some(id) = idx
                .get((issuer.as_str(), key.as_str()))?
                .map(|g| g.value().to_owned())
            else {
                return Ok(None);
            };
            let Some(ops) = missing_is_empty(txn.open_table(OPS))? else {
                return Ok(None);
            };
            ops.get((issuer.as_str(), id.as_str()))?
                .map(|g| decode("issuer operation", g.value()))
                .transpose()
        })
        .await
    }
}
