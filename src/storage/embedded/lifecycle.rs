//! [`LifecycleStore`] on the embedded redb file. Tables (see `docs/storage.md`, "Lifecycle"):
//!
//! - `lc_events` (merchant id, event id) -> expires at (ms), with `lc_events_expiry`
//!   (expires at, merchant id, event id) -> () to purge expired markers without a scan;
//! - `lc_schedule` (due at ms, merchant id, token id) -> (), with `lc_schedule_by_token`
//!   (merchant id, token id) -> due at, so rescheduling finds the old entry;
//! - `lc_leases` name -> (holder, expires at ms);
//! - `lc_jobs` name -> a maintenance job's saved progress.
//!
//! The tables are created by the first write that needs them; reads treat a missing table as
//! empty, so a file written before this module existed opens unchanged. Event markers commit
//! durably (with the token they belong to); schedule and lease writes do not wait for the disk,
//! since both are best-effort by contract and run on every tokenization and every tick.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError,
    WriteTransaction,
};

use super::{EmbeddedStore, begin_write, update_token_in};
use crate::domain::ports::lifecycle::{EventWrite, LifecycleStore, ScanPage};
use crate::domain::ports::outbox::EventAppend;
use crate::domain::ports::{CheckAt, StoreError};
use crate::domain::token::{MerchantId, TokenId, TokenRecord};
use crate::storage::codec::lifecycle::ttl_ms;

/// (merchant id, event id) -> marker expiry (Unix ms).
const EVENTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("lc_events");
/// (expiry, merchant id, event id) -> (): expired markers in time order.
const EVENTS_EXPIRY: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("lc_events_expiry");
/// (due at, merchant id, token id) -> (): the schedule in due order.
const SCHEDULE: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("lc_schedule");
/// (merchant id, token id) -> due at: where a token's schedule entry is.
const SCHEDULE_BY_TOKEN: TableDefinition<(&str, &str), u64> =
    TableDefinition::new("lc_schedule_by_token");
/// lease name -> (holder, expires at ms).
const LEASES: TableDefinition<&str, (&str, u64)> = TableDefinition::new("lc_leases");
/// job name -> saved progress (a scan cursor and counts).
const JOBS: TableDefinition<&str, &str> = TableDefinition::new("lc_jobs");

/// Expired markers removed per write: cleanup cost per event stays bounded.
const PURGE_BATCH: usize = 32;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A write transaction whose commit does not wait for the disk: for the schedule and leases,
/// which are best-effort by contract (a crash may lose the latest ones; the next durable commit
/// of any write persists them). Token writes and event markers stay durable.
fn begin_relaxed(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut txn = begin_write(db)?;
    // Refused only when persistent savepoints were touched (never here): then stay durable.
    let _ = txn.set_durability(Durability::None);
    Ok(txn)
}

/// A table that does not exist yet reads as empty (`Ok(None)`).
pub(super) fn missing_is_empty<T>(r: Result<T, TableError>) -> Result<Option<T>, StoreError> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// True when a live (unexpired) marker exists.
pub(super) fn marker_live(
    txn: &WriteTransaction,
    merchant: &str,
    event_id: &str,
    now: u64,
) -> Result<bool, StoreError> {
    let events = txn.open_table(EVENTS)?;
    let live = events
        .get((merchant, event_id))?
        .is_some_and(|g| g.value() > now);
    Ok(live)
}

/// Writes (or replaces) a marker, keeping the expiry index in step.
pub(super) fn put_marker(
    txn: &WriteTransaction,
    merchant: &str,
    event_id: &str,
    expires_at: u64,
) -> Result<(), StoreError> {
    let mut events = txn.open_table(EVENTS)?;
    let mut expiry = txn.open_table(EVENTS_EXPIRY)?;
    let old = events
        .insert((merchant, event_id), expires_at)?
        .map(|g| g.value());
    if let Some(old) = old {
        expiry.remove((old, merchant, event_id))?;
    }
    expiry.insert((expires_at, merchant, event_id), ())?;
    Ok(())
}

/// Writes a token's reconciliation check in `txn` as `check` says: the schedule calls below
/// and the token writes that carry their check (`insert_token_scheduled`,
/// `update_token_scheduled`) share it, so both keep the two tables in step.
pub(super) fn write_check_in(
    txn: &WriteTransaction,
    merchant: &str,
    token: &str,
    check: CheckAt,
) -> Result<(), StoreError> {
    let due_ms = match check {
        CheckAt::Unchanged => return Ok(()),
        CheckAt::At(due_ms) => Some(due_ms),
        CheckAt::Never => None,
    };
    let mut by_token = txn.open_table(SCHEDULE_BY_TOKEN)?;
    let old = match due_ms {
        Some(due) => by_token.insert((merchant, token), due)?,
        None => by_token.remove((merchant, token))?,
    }
    .map(|g| g.value());
    if old.is_none() && due_ms.is_none() {
        return Ok(());
    }
    let mut schedule = txn.open_table(SCHEDULE)?;
    if let Some(old) = old {
        schedule.remove((old, merchant, token))?;
    }
    if let Some(due) = due_ms {
        schedule.insert((due, merchant, token), ())?;
    }
    Ok(())
}

/// Removes up to [`PURGE_BATCH`] expired markers.
pub(super) fn purge_expired(txn: &WriteTransaction, now: u64) -> Result<(), StoreError> {
    let mut expiry = txn.open_table(EVENTS_EXPIRY)?;
    let mut events = txn.open_table(EVENTS)?;
    let mut due: Vec<(u64, String, String)> = Vec::new();
    for entry in expiry
        .range(..(now.saturating_add(1), "", ""))?
        .take(PURGE_BATCH)
    {
        let (k, _) = entry?;
        let (at, m, e) = k.value();
        due.push((at, m.to_owned(), e.to_owned()));
    }
    for (at, m, e) in due {
        expiry.remove((at, m.as_str(), e.as_str()))?;
        // Only the row this index entry was written for, not a newer one.
        let current = events.get((m.as_str(), e.as_str()))?.map(|g| g.value());
        if current == Some(at) {
            events.remove((m.as_str(), e.as_str()))?;
        }
    }
    Ok(())
}

#[async_trait]
impl LifecycleStore for EmbeddedStore {
    async fn scan_tokens(
        &self,
        cursor: Option<&str>,
        count: usize,
    ) -> Result<ScanPage, StoreError> {
        // The cursor is the last (merchant, token) key returned, joined by a space (ids
        // contain none); the next page starts strictly after it.
        let after: Option<(String, String)> = match cursor {
            None => None,
            Some(c) => {
                let (m, t) = c
                    .split_once(' ')
                    .ok_or_else(|| StoreError::Corrupt("malformed scan cursor".into()))?;
                Some((m.to_owned(), t.to_owned()))
            }
        };
        let count = count.max(1);
        self.run(move |db| {
            let txn = db.begin_read()?;
            let table = match txn.open_table(super::TOKENS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(ScanPage::default()),
                Err(e) => return Err(e.into()),
            };
            let range = match &after {
                Some((m, t)) => table.range((m.as_str(), t.as_str())..)?,
                None => table.range::<(&str, &str)>(..)?,
            };
            let mut items = Vec::with_capacity(count);
            let mut last: Option<String> = None;
            // Rows, not items: a row whose ids do not parse (only by tampering) still uses up a
            // place in the page, so it cannot end the walk early.
            let mut rows = 0;
            for entry in range {
                let (k, _) = entry?;
                let (m, t) = k.value();
                if after.as_ref().is_some_and(|(am, at)| am == m && at == t) {
                    continue;
                }
                if rows == count {
                    break;
                }
                rows += 1;
                if let (Some(mid), Some(tid)) = (MerchantId::parse(m), TokenId::parse(t)) {
                    items.push((mid, tid));
                }
                last = Some(format!("{m} {t}"));
            }
            let next = if rows == count { last } else { None };
            Ok(ScanPage { items, next })
        })
        .await
    }

    async fn event_seen(&self, merchant: &MerchantId, event_id: &str) -> Result<bool, StoreError> {
        let merchant = merchant.as_str().to_owned();
        let event_id = event_id.to_owned();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let Some(events) = missing_is_empty(txn.open_table(EVENTS))? else {
                return Ok(false);
            };
            let live = events
                .get((merchant.as_str(), event_id.as_str()))?
                .is_some_and(|g| g.value() > now_ms());
            Ok(live)
        })
        .await
    }

    async fn mark_event(
        &self,
        merchant: &MerchantId,
        event_id: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let merchant = merchant.as_str().to_owned();
        let event_id = event_id.to_owned();
        self.run(move |db| {
            let now = now_ms();
            let txn = begin_write(db)?;
            if marker_live(&txn, &merchant, &event_id, now)? {
                return Ok(false);
            }
            put_marker(&txn, &merchant, &event_id, now.saturating_add(ttl_ms(ttl)))?;
            purge_expired(&txn, now)?;
            txn.commit()?;
            Ok(true)
        })
        .await
    }

    async fn apply_event_with(
        &self,
        rec: &TokenRecord,
        event_id: &str,
        ttl: Duration,
        webhook: Option<&EventAppend>,
    ) -> Result<EventWrite, StoreError> {
        let rec = rec.clone();
        let event_id = event_id.to_owned();
        let webhook = webhook.cloned();
        self.run(move |db| {
            let now = now_ms();
            let txn = begin_write(db)?;
            let merchant = rec.merchant_id.as_str();
            if marker_live(&txn, merchant, &event_id, now)? {
                return Ok(EventWrite::Duplicate);
            }
            // An error drops the transaction uncommitted: neither token nor marker is written.
            update_token_in(&txn, &rec)?;
            put_marker(&txn, merchant, &event_id, now.saturating_add(ttl_ms(ttl)))?;
            if let Some(webhook) = &webhook {
                super::outbox::append_event_in(&txn, webhook)?;
            }
            purge_expired(&txn, now)?;
            txn.commit()?;
            Ok(EventWrite::Applied)
        })
        .await
    }

    async fn schedule_check(
        &self,
        merchant: &MerchantId,
        token: &TokenId,
        due_ms: u64,
    ) -> Result<(), StoreError> {
        let merchant = merchant.as_str().to_owned();
        let token = token.as_str().to_owned();
        self.run(move |db| {
            let txn = begin_relaxed(db)?;
            write_check_in(&txn, &merchant, &token, CheckAt::At(due_ms))?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn unschedule_check(
        &self,
        merchant: &MerchantId,
        token: &TokenId,
    ) -> Result<(), StoreError> {
        let merchant = merchant.as_str().to_owned();
        let token = token.as_str().to_owned();
        self.run(move |db| {
            let txn = begin_relaxed(db)?;
            write_check_in(&txn, &merchant, &token, CheckAt::Never)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn due_checks(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(MerchantId, TokenId)>, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read()?;
            let Some(schedule) = missing_is_empty(txn.open_table(SCHEDULE))? else {
                return Ok(Vec::new());
            };
            let mut due = Vec::new();
            let mut junk: Vec<(u64, String, String)> = Vec::new();
            for entry in schedule.range(..(now_ms.saturating_add(1), "", ""))? {
                if due.len() >= limit {
                    break;
                }
                let (k, _) = entry?;
                let (at, m, t) = k.value();
                match (MerchantId::parse(m), TokenId::parse(t)) {
                    (Some(m), Some(t)) => due.push((m, t)),
                    _ => junk.push((at, m.to_owned(), t.to_owned())),
                }
            }
            drop(schedule);
            drop(txn);
            if !junk.is_empty() {
                // Never returned, never retried: without removal they would fill every batch.
                let txn = begin_relaxed(db)?;
                {
                    let mut schedule = txn.open_table(SCHEDULE)?;
                    let mut by_token = txn.open_table(SCHEDULE_BY_TOKEN)?;
                    for (at, m, t) in &junk {
                        schedule.remove((*at, m.as_str(), t.as_str()))?;
                        by_token.remove((m.as_str(), t.as_str()))?;
                    }
                }
                txn.commit()?;
            }
            Ok(due)
        })
        .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let name = name.to_owned();
        let holder = holder.to_owned();
        self.run(move |db| {
            let now = now_ms();
            let txn = begin_relaxed(db)?;
            {
                let mut leases = txn.open_table(LEASES)?;
                let taken_by_other = leases.get(name.as_str())?.is_some_and(|g| {
                    let (h, expires) = g.value();
                    h != holder && expires > now
                });
                if taken_by_other {
                    return Ok(false);
                }
                leases.insert(
                    name.as_str(),
                    (holder.as_str(), now.saturating_add(ttl_ms(ttl))),
                )?;
            }
            txn.commit()?;
            Ok(true)
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let name = name.to_owned();
        let holder = holder.to_owned();
        self.run(move |db| {
            let txn = begin_relaxed(db)?;
            {
                let mut leases = txn.open_table(LEASES)?;
                let ours = leases
                    .get(name.as_str())?
                    .is_some_and(|g| g.value().0 == holder);
                if !ours {
                    return Ok(());
                }
                leases.remove(name.as_str())?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn load_job_state(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_owned();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let Some(jobs) = missing_is_empty(txn.open_table(JOBS))? else {
                return Ok(None);
            };
            let state = jobs.get(name.as_str())?.map(|g| g.value().to_owned());
            Ok(state)
        })
        .await
    }

    async fn save_job_state(&self, name: &str, state: Option<&str>) -> Result<(), StoreError> {
        let name = name.to_owned();
        let state = state.map(str::to_owned);
        self.run(move |db| {
            // Progress only: losing the latest one to a crash repeats a batch, harmlessly.
            let txn = begin_relaxed(db)?;
            {
                let mut jobs = txn.open_table(JOBS)?;
                match &state {
                    Some(v) => {
                        jobs.insert(name.as_str(), v.as_str())?;
                    }
                    None => {
                        jobs.remove(name.as_str())?;
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[tokio::test]
    async fn expired_markers_are_purged_and_no_longer_count() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(dir.path())?;
        let m = MerchantId::generate();
        assert!(store.mark_event(&m, "e1", Duration::from_millis(1)).await?);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(!store.event_seen(&m, "e1").await?);
        // Expired: marking again counts as the first time, and the old row was purged.
        assert!(store.mark_event(&m, "e1", Duration::from_secs(60)).await?);
        assert!(!store.mark_event(&m, "e1", Duration::from_secs(60)).await?);
        let db = store.clone();
        let rows = db
            .run(|db| {
                let txn = db.begin_read()?;
                Ok(txn.open_table(EVENTS_EXPIRY)?.len()?)
            })
            .await?;
        assert_eq!(rows, 1);
        Ok(())
    }

    #[tokio::test]
    async fn reads_before_any_write_see_empty_tables() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(dir.path())?;
        assert!(!store.event_seen(&MerchantId::generate(), "e").await?);
        assert!(store.due_checks(u64::MAX, 10).await?.is_empty());
        Ok(())
    }
}
