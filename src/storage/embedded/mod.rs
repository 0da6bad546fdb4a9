//! Embedded implementation of the token store on redb, a crash-safe single-file database.
//!
//! The tables mirror the Redis key layout (`docs/storage.md`): records keyed by merchant and id,
//! and index tables from fingerprint, D1 token id, API key hash and D1 merchant id. Each writing
//! method is one redb write transaction, so it is atomic and durable once it returns. redb is
//! synchronous: every operation runs on tokio's blocking pool.
//!
//! Write transactions use redb's quick-repair mode: each commit also saves the allocator state,
//! so opening the file after a crash does not walk the whole database. Start-up time therefore
//! does not grow with the number of tokens, at the price of a slower commit.
//!
//! # Layout
//!
//! This file holds the database, its tables and the token, merchant and idempotency operations;
//! the other aggregates have a file each: [`apikeys`], [`audit`], [`client_certs`], [`counts`],
//! [`lifecycle`], [`outbox`], and the wallet index backfill [`wallet_index`].

mod apikeys;
mod audit;
mod client_certs;
mod counts;
mod issuer_cards;
mod issuer_operations;
mod issuers;
mod lifecycle;
mod outbox;
mod production_orders;
mod wallet_index;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{
    Database, ReadableDatabase, ReadableTable, TableDefinition, TableError, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use self::counts::moved;
use crate::domain::merchant::{ApiKeyHash, Merchant};
use crate::domain::ports::outbox::EventAppend;
use crate::domain::ports::{
    CheckAt, IdempotencyBegin, InsertOutcome, StoreError, StoredResponse, TokenStore,
};
use crate::domain::token::{MerchantId, TokenId, TokenRecord, TokenStatus};
use crate::domain::wallet::{WalletKey, WalletPage};

/// File name inside the configured directory.
pub const FILE_NAME: &str = "tokengate.redb";

/// (merchant id, token id) -> token record JSON.
pub(crate) const TOKENS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tokens");
/// (merchant id, PAN fingerprint) -> token id of the live token.
const FINGERPRINTS: TableDefinition<(&str, &str), &str> = TableDefinition::new("fp_index");
/// (merchant id, D1 token id) -> token id.
const D1_TOKENS: TableDefinition<(&str, &str), &str> = TableDefinition::new("d1_index");
/// merchant id -> merchant record JSON.
const MERCHANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("merchants");
/// API key hash -> merchant id.
const API_KEYS: TableDefinition<&str, &str> = TableDefinition::new("api_keys");
/// D1 merchant id -> merchant id.
const D1_MERCHANTS: TableDefinition<&str, &str> = TableDefinition::new("d1_merchants");
/// (scope, key) -> idempotency row JSON (with its expiry time).
const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency");
/// (expires at ms, scope, key) -> (): finds expired idempotency rows without a scan.
const IDEMPOTENCY_EXPIRY: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("idempotency_expiry");

/// (merchant id, customer reference, status label or [`WALLET_ALL`], [`WalletKey`]) -> (): the
/// customer wallet index (`docs/storage.md`, "Customer wallets"), written in the transaction of
/// every token write.
const WALLET: TableDefinition<(&str, &str, &str, &str), ()> = TableDefinition::new("wallet_index");
/// The status part of the wallet rows that list every status (labels are upper-case words).
const WALLET_ALL: &str = "*";
/// Above every [`WalletKey`] (they are digits, `-` and id characters): the open end of a range.
const WALLET_END: &str = "~";

/// Expired idempotency rows removed per write, so cleanup cost per request stays bounded.
const PURGE_BATCH: usize = 32;

/// Value of an idempotency row. Redis expires keys itself; here the expiry is part of the value
/// and checked on every read.
#[derive(Debug, Serialize, Deserialize)]
struct IdemRow {
    expires_at_ms: u64,
    entry: IdemEntry,
}

/// Same states as the Redis backend's; each backend owns its own stored format.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
enum IdemEntry {
    Inflight { digest: String },
    Completed { response: StoredResponse },
}

/// Token store in one redb file. Clones share the open database.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

// --- error mapping -----------------------------------------------------------------------------

fn storage_err(e: redb::StorageError) -> StoreError {
    match e {
        redb::StorageError::Corrupted(_) => {
            StoreError::Corrupt("embedded database file is corrupted".into())
        }
        redb::StorageError::ValueTooLarge(_) => {
            StoreError::Unavailable("embedded store: value too large".into())
        }
        redb::StorageError::Io(e) => {
            StoreError::Unavailable(format!("embedded store I/O error ({:?})", e.kind()))
        }
        _ => StoreError::Unavailable("embedded store storage error".into()),
    }
}

impl From<redb::StorageError> for StoreError {
    fn from(e: redb::StorageError) -> Self {
        storage_err(e)
    }
}

impl From<redb::TransactionError> for StoreError {
    fn from(e: redb::TransactionError) -> Self {
        match e {
            redb::TransactionError::Storage(s) => storage_err(s),
            _ => StoreError::Unavailable("embedded store transaction error".into()),
        }
    }
}

impl From<redb::TableError> for StoreError {
    fn from(e: redb::TableError) -> Self {
        match e {
            TableError::Storage(s) => storage_err(s),
            _ => StoreError::Corrupt("embedded database table has an unexpected type".into()),
        }
    }
}

impl From<redb::CommitError> for StoreError {
    fn from(e: redb::CommitError) -> Self {
        match e {
            redb::CommitError::Storage(s) => storage_err(s),
            _ => StoreError::Unavailable("embedded store commit failed".into()),
        }
    }
}

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::Storage(s) => storage_err(s),
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::Unavailable("embedded database is already open elsewhere".into())
            }
            redb::DatabaseError::UpgradeRequired(_) => {
                StoreError::Unavailable("embedded database file needs a format upgrade".into())
            }
            _ => StoreError::Unavailable("embedded database could not be opened".into()),
        }
    }
}

/// serde_json messages can quote the offending value; keep only kind and position.
fn corrupt(what: &str, e: &serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!(
        "{what} is not valid JSON ({:?} error at line {}, column {})",
        e.classify(),
        e.line(),
        e.column()
    ))
}

fn encode<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| corrupt(what, &e))
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| corrupt(what, &e))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn expiry_after(ttl: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn begin_write(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut txn = db.begin_write()?;
    // See the module docs: bounded recovery time after a crash.
    txn.set_quick_repair(true);
    Ok(txn)
}

// --- idempotency helpers (inside a write transaction) ------------------------------------------

/// Writes (or replaces) an idempotency row, keeping the expiry index in step.
fn put_idem(
    txn: &WriteTransaction,
    scope: &str,
    key: &str,
    row: &IdemRow,
) -> Result<(), StoreError> {
    let bytes = encode("idempotency row", row)?;
    let mut idem = txn.open_table(IDEMPOTENCY)?;
    let mut expiry = txn.open_table(IDEMPOTENCY_EXPIRY)?;
    let old = idem
        .insert((scope, key), bytes.as_slice())?
        .map(|g| decode::<IdemRow>("idempotency row", g.value()));
    if let Some(Ok(old)) = old {
        expiry.remove((old.expires_at_ms, scope, key))?;
    }
    expiry.insert((row.expires_at_ms, scope, key), ())?;
    Ok(())
}

/// Deletes an idempotency row and its expiry index entry.
fn delete_idem(
    txn: &WriteTransaction,
    scope: &str,
    key: &str,
    expires_at_ms: u64,
) -> Result<(), StoreError> {
    txn.open_table(IDEMPOTENCY)?.remove((scope, key))?;
    txn.open_table(IDEMPOTENCY_EXPIRY)?
        .remove((expires_at_ms, scope, key))?;
    Ok(())
}

/// Removes up to [`PURGE_BATCH`] expired rows: cleanup rides on writes that happen anyway, and
/// its cost per request stays bounded however many rows expired.
fn purge_expired(txn: &WriteTransaction, now: u64) -> Result<(), StoreError> {
    let mut expiry = txn.open_table(IDEMPOTENCY_EXPIRY)?;
    let mut idem = txn.open_table(IDEMPOTENCY)?;
    let mut due: Vec<(u64, String, String)> = Vec::new();
    for entry in expiry
        .range(..(now.saturating_add(1), "", ""))?
        .take(PURGE_BATCH)
    {
        let (k, _) = entry?;
        let (at, scope, key) = k.value();
        due.push((at, scope.to_owned(), key.to_owned()));
    }
    for (at, scope, key) in due {
        expiry.remove((at, scope.as_str(), key.as_str()))?;
        // Only delete the row this index entry was written for, not a newer one.
        let matches = match idem.get((scope.as_str(), key.as_str()))? {
            Some(g) => decode::<IdemRow>("idempotency row", g.value())
                .map(|r| r.expires_at_ms == at)
                .unwrap_or(true),
            None => false,
        };
        if matches {
            idem.remove((scope.as_str(), key.as_str()))?;
        }
    }
    Ok(())
}

// --- store -------------------------------------------------------------------------------------

impl EmbeddedStore {
    /// Opens (or creates) `<dir>/tokengate.redb`, creating `dir` if needed. Does no work
    /// proportional to the data: tables are created if missing, nothing is scanned.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create the embedded store directory ({:?})",
                e.kind()
            ))
        })?;
        let db = Database::create(dir.join(FILE_NAME))?;
        // Creating the tables up front lets read transactions open them without a missing-table
        // case.
        let txn = begin_write(&db)?;
        txn.open_table(TOKENS)?;
        txn.open_table(FINGERPRINTS)?;
        txn.open_table(D1_TOKENS)?;
        txn.open_table(MERCHANTS)?;
        txn.open_table(API_KEYS)?;
        txn.open_table(D1_MERCHANTS)?;
        txn.open_table(IDEMPOTENCY)?;
        txn.open_table(IDEMPOTENCY_EXPIRY)?;
        txn.open_table(WALLET)?;
        counts::init_counts(&txn)?;
        wallet_index::init_wallet_index(&txn)?;
        txn.commit()?;
        Ok(EmbeddedStore { db: Arc::new(db) })
    }

    /// Runs a synchronous database operation on the blocking pool.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|_| StoreError::Unavailable("embedded store task failed".into()))?
    }

    /// Reads a merchant through one of the id index tables.
    async fn merchant_via(
        &self,
        index: TableDefinition<'static, &'static str, &'static str>,
        key: String,
    ) -> Result<Option<Merchant>, StoreError> {
        self.run(move |db| {
            let txn = db.begin_read()?;
            let Some(id) = txn
                .open_table(index)?
                .get(key.as_str())?
                .map(|g| g.value().to_owned())
            else {
                return Ok(None);
            };
            let merchants = txn.open_table(MERCHANTS)?;
            let found = merchants.get(id.as_str())?;
            found
                .map(|g| decode("merchant record", g.value()))
                .transpose()
        })
        .await
    }

    /// Reads the token an index entry points at; a dangling entry reads as `None`.
    async fn token_via(
        &self,
        index: TableDefinition<'static, (&'static str, &'static str), &'static str>,
        merchant: &MerchantId,
        key: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let merchant = merchant.as_str().to_owned();
        let key = key.to_owned();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let Some(id) = txn
                .open_table(index)?
                .get((merchant.as_str(), key.as_str()))?
                .map(|g| g.value().to_owned())
            else {
                return Ok(None);
            };
            let tokens = txn.open_table(TOKENS)?;
            let found = tokens.get((merchant.as_str(), id.as_str()))?;
            found.map(|g| decode("token record", g.value())).transpose()
        })
        .await
    }
}

fn d1_id(rec: &TokenRecord) -> Option<&str> {
    rec.network_token.as_ref().map(|n| n.d1_token_id.as_str())
}

/// Adds (`present`) or removes `rec`'s rows in the wallet index; a record without a customer
/// has none. Every token write removes the old record's rows and adds the new one's, in its
/// own transaction, so the index always matches the records.
fn wallet_rows(txn: &WriteTransaction, rec: &TokenRecord, present: bool) -> Result<(), StoreError> {
    let Some(customer) = rec.customer_reference.as_deref() else {
        return Ok(());
    };
    let m = rec.merchant_id.as_str();
    let pos = WalletKey::of(rec);
    let mut wallet = txn.open_table(WALLET)?;
    for status in [WALLET_ALL, rec.status.label()] {
        let key = (m, customer, status, pos.as_str());
        if present {
            wallet.insert(key, ())?;
        } else {
            wallet.remove(key)?;
        }
    }
    Ok(())
}

/// The `update_token` compare-and-set inside a caller's write transaction, so a sibling module
/// (`embedded_lifecycle`) can commit it together with other writes. On `Err` the caller drops
/// the transaction: nothing is written.
pub(crate) fn update_token_in(txn: &WriteTransaction, rec: &TokenRecord) -> Result<(), StoreError> {
    let json = encode("token record", rec)?;
    let m = rec.merchant_id.as_str();
    let id = rec.id.as_str();
    let mut tokens = txn.open_table(TOKENS)?;
    let Some(old) = tokens
        .get((m, id))?
        .map(|g| decode::<TokenRecord>("token record", g.value()))
        .transpose()?
    else {
        return Err(StoreError::NotFound);
    };
    if rec.version.checked_sub(1) != Some(old.version) {
        return Err(StoreError::Conflict);
    }
    // The token counts move in the same transaction (src/storage/embedded/counts.rs).
    moved(
        txn,
        m,
        id,
        Some(old.status.as_str()),
        Some(rec.status.as_str()),
    )?;
    let mut d1s = txn.open_table(D1_TOKENS)?;
    let new_d1 = d1_id(rec);
    if let Some(old_d1) = d1_id(&old)
        && Some(old_d1) != new_d1
    {
        let points_here = d1s.get((m, old_d1))?.is_some_and(|g| g.value() == id);
        if points_here {
            d1s.remove((m, old_d1))?;
        }
    }
    if let Some(d1) = new_d1 {
        d1s.insert((m, d1), id)?;
    }
    wallet_rows(txn, &old, false)?;
    wallet_rows(txn, rec, true)?;
    // The dedup index follows the record's entries: one it no longer lists goes (if it still
    // points here), a new one (a fingerprint-key re-index) is claimed unless a live token
    // holds it; a tombstone keeps none.
    let had: Vec<&str> = old.fingerprints.index_entries().collect();
    let new: Vec<&str> = rec.fingerprints.index_entries().collect();
    let keep: &[&str] = if rec.status == TokenStatus::Deleted {
        &[]
    } else {
        &new
    };
    let mut fps = txn.open_table(FINGERPRINTS)?;
    for fp in had.iter().chain(&new) {
        if !keep.contains(fp) && fps.get((m, *fp))?.is_some_and(|g| g.value() == id) {
            fps.remove((m, *fp))?;
        }
    }
    for fp in keep.iter().filter(|fp| !had.contains(fp)) {
        let holder = fps.get((m, *fp))?.map(|g| g.value().to_owned());
        let held_by_live = match holder {
            Some(h) if h != id => tokens
                .get((m, h.as_str()))?
                .map(|g| decode::<TokenRecord>("token record", g.value()))
                .transpose()?
                .is_some_and(|r| r.status != TokenStatus::Deleted),
            _ => false,
        };
        if !held_by_live {
            fps.insert((m, *fp), id)?;
        }
    }
    tokens.insert((m, id), json.as_slice())?;
    Ok(())
}

#[async_trait]
impl TokenStore for EmbeddedStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            txn.open_table(MERCHANTS)?;
            Ok(())
        })
        .await
    }

    async fn insert_merchant(&self, m: &Merchant, key: &ApiKeyHash) -> Result<(), StoreError> {
        let json = encode("merchant record", m)?;
        let m = m.clone();
        let key = key.0.clone();
        self.run(move |db| {
            let txn = begin_write(db)?;
            {
                let id = m.id.as_str();
                txn.open_table(MERCHANTS)?.insert(id, json.as_slice())?;
                if let Some(d1) = &m.d1_merchant_id {
                    txn.open_table(D1_MERCHANTS)?.insert(d1.as_str(), id)?;
                }
                txn.open_table(API_KEYS)?.insert(key.as_str(), id)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_merchant(&self, id: &MerchantId) -> Result<Option<Merchant>, StoreError> {
        let id = id.as_str().to_owned();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let merchants = txn.open_table(MERCHANTS)?;
            let found = merchants.get(id.as_str())?;
            found
                .map(|g| decode("merchant record", g.value()))
                .transpose()
        })
        .await
    }

    async fn merchant_by_api_key(&self, key: &ApiKeyHash) -> Result<Option<Merchant>, StoreError> {
        self.merchant_via(API_KEYS, key.0.clone()).await
    }

    async fn merchant_by_d1_id(
        &self,
        d1_merchant_id: &str,
    ) -> Result<Option<Merchant>, StoreError> {
        self.merchant_via(D1_MERCHANTS, d1_merchant_id.to_owned())
            .await
    }

    async fn insert_token_scheduled(
        &self,
        rec: &TokenRecord,
        check: CheckAt,
    ) -> Result<InsertOutcome, StoreError> {
        let json = encode("token record", rec)?;
        let rec = rec.clone();
        self.run(move |db| {
            let txn = begin_write(db)?;
            let m = rec.merchant_id.as_str();
            let id = rec.id.as_str();
            {
                let mut fps = txn.open_table(FINGERPRINTS)?;
                let mut tokens = txn.open_table(TOKENS)?;
                // Every entry is checked: during a fingerprint-key rotation the card may be
                // indexed under another key only.
                for fp in rec.fingerprints.index_entries() {
                    let current = fps.get((m, fp))?.map(|g| g.value().to_owned());
                    if let Some(cur) = current {
                        let existing = tokens
                            .get((m, cur.as_str()))?
                            .map(|g| decode::<TokenRecord>("token record", g.value()))
                            .transpose()?;
                        if let Some(ex) = existing
                            && ex.status != TokenStatus::Deleted
                        {
                            // Dropping the transaction without commit writes nothing.
                            return Ok(InsertOutcome::Existing(Box::new(ex)));
                        }
                    }
                }
                let replaced = tokens
                    .insert((m, id), json.as_slice())?
                    .map(|g| decode::<TokenRecord>("token record", g.value()))
                    .transpose()?;
                for fp in rec.fingerprints.index_entries() {
                    fps.insert((m, fp), id)?;
                }
                if let Some(d1) = d1_id(&rec) {
                    txn.open_table(D1_TOKENS)?.insert((m, d1), id)?;
                }
                // Same transaction: the counts never disagree with the records.
                moved(
                    &txn,
                    m,
                    id,
                    replaced.as_ref().map(|r| r.status.as_str()),
                    Some(rec.status.as_str()),
                )?;
                if let Some(old) = &replaced {
                    wallet_rows(&txn, old, false)?;
                }
                wallet_rows(&txn, &rec, true)?;
            }
            // Same transaction: the reservation never exists without its check.
            lifecycle::write_check_in(&txn, m, id, check)?;
            txn.commit()?;
            Ok(InsertOutcome::Inserted)
        })
        .await
    }

    async fn get_token(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let merchant = merchant.as_str().to_owned();
        let id = id.as_str().to_owned();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let tokens = txn.open_table(TOKENS)?;
            let found = tokens.get((merchant.as_str(), id.as_str()))?;
            found.map(|g| decode("token record", g.value())).transpose()
        })
        .await
    }

    async fn update_token_scheduled(
        &self,
        rec: &TokenRecord,
        event: Option<&EventAppend>,
        check: CheckAt,
    ) -> Result<(), StoreError> {
        let rec = rec.clone();
        let event = event.cloned();
        self.run(move |db| {
            let txn = begin_write(db)?;
            update_token_in(&txn, &rec)?;
            // Same transaction: an error above drops it uncommitted, event and check included.
            if let Some(event) = &event {
                outbox::append_event_in(&txn, event)?;
            }
            lifecycle::write_check_in(&txn, rec.merchant_id.as_str(), rec.id.as_str(), check)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn update_token_if_no_endpoints(
        &self,
        rec: &TokenRecord,
        check: CheckAt,
    ) -> Result<bool, StoreError> {
        let rec = rec.clone();
        self.run(move |db| {
            let txn = begin_write(db)?;
            // The endpoints are read in the write transaction itself: redb serialises writers,
            // so no endpoint can be registered between this read and the commit.
            if outbox::has_endpoints_in(&txn, rec.merchant_id.as_str())? {
                return Ok(false);
            }
            update_token_in(&txn, &rec)?;
            lifecycle::write_check_in(&txn, rec.merchant_id.as_str(), rec.id.as_str(), check)?;
            txn.commit()?;
            Ok(true)
        })
        .await
    }

    async fn remove_token(&self, merchant: &MerchantId, id: &TokenId) -> Result<(), StoreError> {
        let merchant = merchant.as_str().to_owned();
        let id = id.as_str().to_owned();
        self.run(move |db| {
            let txn = begin_write(db)?;
            let m = merchant.as_str();
            let id = id.as_str();
            {
                let mut tokens = txn.open_table(TOKENS)?;
                let Some(old) = tokens
                    .remove((m, id))?
                    .map(|g| decode::<TokenRecord>("token record", g.value()))
                    .transpose()?
                else {
                    // Already gone: nothing to do, nothing to commit.
                    return Ok(());
                };
                let mut fps = txn.open_table(FINGERPRINTS)?;
                for fp in old.fingerprints.index_entries() {
                    if fps.get((m, fp))?.is_some_and(|g| g.value() == id) {
                        fps.remove((m, fp))?;
                    }
                }
                if let Some(d1) = d1_id(&old) {
                    let mut d1s = txn.open_table(D1_TOKENS)?;
                    if d1s.get((m, d1))?.is_some_and(|g| g.value() == id) {
                        d1s.remove((m, d1))?;
                    }
                }
                moved(&txn, m, id, Some(old.status.as_str()), None)?;
                wallet_rows(&txn, &old, false)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn find_by_fingerprint(
        &self,
        merchant: &MerchantId,
        pan_fingerprint: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let rec = self
            .token_via(FINGERPRINTS, merchant, pan_fingerprint)
            .await?;
        // A tombstone is never the live token for its card.
        Ok(rec.filter(|r| r.status != TokenStatus::Deleted))
    }

    async fn find_by_d1_token(
        &self,
        merchant: &MerchantId,
        d1_token_id: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        self.token_via(D1_TOKENS, merchant, d1_token_id).await
    }

    async fn list_customer_tokens(
        &self,
        merchant: &MerchantId,
        customer: &str,
        status: Option<&'static str>,
        after: Option<&WalletKey>,
        limit: usize,
    ) -> Result<WalletPage, StoreError> {
        let merchant = merchant.clone();
        let customer = customer.to_owned();
        let after = after.cloned();
        let limit = limit.max(1);
        self.run(move |db| {
            let txn = db.begin_read()?;
            let wallet = txn.open_table(WALLET)?;
            let tokens = txn.open_table(TOKENS)?;
            let (m, c) = (merchant.as_str(), customer.as_str());
            let s = status.unwrap_or(WALLET_ALL);
            let end = after.as_ref().map_or(WALLET_END, |a| a.as_str());
            let mut page = WalletPage::default();
            // One more than a page: whether it exists says whether a next page does.
            let mut rows = wallet.range((m, c, s, "")..(m, c, s, end))?.rev();
            for row in rows.by_ref().take(limit) {
                let (k, _) = row?;
                let pos = k.value().3.to_owned();
                page.next = WalletKey::parse(&pos);
                let Some(id) = page.next.as_ref().and_then(WalletKey::token_id) else {
                    continue;
                };
                let Some(rec) = tokens
                    .get((m, id.as_str()))?
                    .map(|g| decode::<TokenRecord>("token record", g.value()))
                    .transpose()?
                else {
                    continue; // the record is gone: a dangling row reads as a miss
                };
                if rec.customer_reference.as_deref() == Some(c)
                    && status.is_none_or(|s| rec.status.label() == s)
                {
                    page.tokens.push(rec);
                }
            }
            if rows.next().is_none() {
                page.next = None;
            }
            Ok(page)
        })
        .await
    }

    async fn wallet_index_complete(&self) -> Result<bool, StoreError> {
        self.wallet_backfill_done().await
    }

    async fn backfill_wallet_index(&self, batch: usize) -> Result<bool, StoreError> {
        self.wallet_backfill_step(batch).await
    }

    async fn idempotency_begin(
        &self,
        scope: &str,
        key: &str,
        request_digest: &str,
        lock_ttl: Duration,
    ) -> Result<IdempotencyBegin, StoreError> {
        let scope = scope.to_owned();
        let key = key.to_owned();
        let digest = request_digest.to_owned();
        self.run(move |db| {
            let now = now_ms();
            let txn = begin_write(db)?;
            let current = txn
                .open_table(IDEMPOTENCY)?
                .get((scope.as_str(), key.as_str()))?
                .map(|g| decode::<IdemRow>("idempotency row", g.value()))
                .transpose()?;
            let outcome = match current {
                Some(row) if row.expires_at_ms > now => match row.entry {
                    IdemEntry::Inflight { digest: d } => IdempotencyBegin::InFlight {
                        same_request: d == digest,
                    },
                    IdemEntry::Completed { response } => IdempotencyBegin::Completed(response),
                },
                _ => {
                    let row = IdemRow {
                        expires_at_ms: expiry_after(lock_ttl),
                        entry: IdemEntry::Inflight { digest },
                    };
                    put_idem(&txn, &scope, &key, &row)?;
                    IdempotencyBegin::Started
                }
            };
            purge_expired(&txn, now)?;
            txn.commit()?;
            Ok(outcome)
        })
        .await
    }

    async fn idempotency_complete(
        &self,
        scope: &str,
        key: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let scope = scope.to_owned();
        let key = key.to_owned();
        let row = IdemRow {
            expires_at_ms: expiry_after(ttl),
            entry: IdemEntry::Completed {
                response: response.clone(),
            },
        };
        self.run(move |db| {
            let txn = begin_write(db)?;
            put_idem(&txn, &scope, &key, &row)?;
            purge_expired(&txn, now_ms())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn idempotency_abort(&self, scope: &str, key: &str) -> Result<(), StoreError> {
        let scope = scope.to_owned();
        let key = key.to_owned();
        self.run(move |db| {
            let txn = begin_write(db)?;
            let current = txn
                .open_table(IDEMPOTENCY)?
                .get((scope.as_str(), key.as_str()))?
                .map(|g| decode::<IdemRow>("idempotency row", g.value()))
                .transpose()?;
            // A completed response stays: aborting must never erase what a replay should get.
            if let Some(row) = current
                && matches!(row.entry, IdemEntry::Inflight { .. })
            {
                delete_idem(&txn, &scope, &key, row.expires_at_ms)?;
                txn.commit()?;
            }
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

    fn count(db: &Database, t: TableDefinition<(u64, &str, &str), ()>) -> Result<u64, StoreError> {
        let txn = db.begin_read()?;
        Ok(txn.open_table(t)?.len()?)
    }

    #[tokio::test]
    async fn expired_idempotency_rows_are_purged_in_bounded_batches() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(dir.path())?;
        let n = PURGE_BATCH + 8;
        let txn = begin_write(&store.db)?;
        for i in 0..n {
            let row = IdemRow {
                expires_at_ms: 1_000 + i as u64,
                entry: IdemEntry::Inflight { digest: "d".into() },
            };
            put_idem(&txn, "admin", &format!("k{i}"), &row)?;
        }
        txn.commit()?;
        assert_eq!(count(&store.db, IDEMPOTENCY_EXPIRY)?, n as u64);

        // One write purges one batch (and adds its own row).
        let r = store
            .idempotency_begin("admin", "fresh", "d", Duration::from_secs(60))
            .await?;
        assert_eq!(r, IdempotencyBegin::Started);
        assert_eq!(
            count(&store.db, IDEMPOTENCY_EXPIRY)?,
            (n - PURGE_BATCH + 1) as u64
        );

        // The next write clears the rest; replacing "fresh" keeps exactly one index entry for it.
        let resp = StoredResponse {
            request_digest: "d".into(),
            status: 200,
            body: String::new(),
        };
        store
            .idempotency_complete("admin", "fresh", &resp, Duration::from_secs(60))
            .await?;
        assert_eq!(count(&store.db, IDEMPOTENCY_EXPIRY)?, 1);
        {
            let txn = store.db.begin_read()?;
            assert_eq!(txn.open_table(IDEMPOTENCY)?.len()?, 1);
        }
        let r = store
            .idempotency_begin("admin", "fresh", "other", Duration::from_secs(60))
            .await?;
        assert_eq!(r, IdempotencyBegin::Completed(resp));
        Ok(())
    }

    #[tokio::test]
    async fn open_creates_directory_and_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let nested = dir.path().join("a/b");
        let store = EmbeddedStore::open(&nested)?;
        store.ping().await?;
        assert!(nested.join(FILE_NAME).is_file());
        Ok(())
    }

    #[test]
    fn second_open_of_the_same_file_is_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        let _first = EmbeddedStore::open(dir.path())?;
        let second = EmbeddedStore::open(dir.path());
        assert!(
            matches!(second, Err(StoreError::Unavailable(_))),
            "{second:?}"
        );
        Ok(())
    }

    fn record(m: &MerchantId, fp: &str, d1: Option<&str>) -> TokenRecord {
        use crate::domain::token::{CardMeta, Fingerprints, NetworkTokenMeta, SealedPan, Usage};
        use tokengate_cards::{Brand, Expiry};
        let t = time::OffsetDateTime::UNIX_EPOCH;
        TokenRecord {
            id: TokenId::generate(),
            merchant_id: m.clone(),
            usage: Usage::OneOff,
            status: TokenStatus::Active,
            card: CardMeta {
                brand: Brand::Visa,
                bin: "411111".into(),
                last4: "1111".into(),
                expiry: Expiry {
                    month: 1,
                    year: 2030,
                },
            },
            network_token: d1.map(|d| NetworkTokenMeta {
                d1_token_id: d.into(),
                last4: None,
                expiry: None,
                par: None,
            }),
            customer_reference: None,
            sealed_pan: SealedPan {
                key_id: "k".into(),
                blob: vec![1, 2, 3],
            },
            fingerprints: Fingerprints {
                pan: fp.into(),
                pan_expiry: format!("{fp}e"),
                previous: Vec::new(),
            },
            created_at: t,
            updated_at: t,
            last_event_at: None,
            recurring_agreement: None,
            version: 1,
        }
    }

    fn rows(db: &Database) -> Result<[u64; 3], StoreError> {
        let txn = db.begin_read()?;
        Ok([
            txn.open_table(TOKENS)?.len()?,
            txn.open_table(FINGERPRINTS)?.len()?,
            txn.open_table(D1_TOKENS)?.len()?,
        ])
    }

    /// The finders ignore tombstones and dangling entries anyway, so only the raw tables show
    /// that index rows are really deleted.
    #[tokio::test]
    async fn index_rows_are_deleted_not_left_dangling() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(dir.path())?;
        let m = MerchantId::generate();
        let r = record(&m, "fp1", Some("d1-a"));
        assert!(matches!(
            store.insert_token(&r).await?,
            InsertOutcome::Inserted
        ));
        assert_eq!(rows(&store.db)?, [1, 1, 1]);

        let mut tomb = r.clone();
        tomb.version = 2;
        tomb.status = TokenStatus::Deleted;
        store.update_token(&tomb).await?;
        assert_eq!(
            rows(&store.db)?,
            [1, 0, 1],
            "tombstone keeps no fingerprint row"
        );

        store.remove_token(&m, &r.id).await?;
        assert_eq!(rows(&store.db)?, [0, 0, 0]);
        Ok(())
    }

    /// An index row whose record is gone (e.g. a restore of a partial copy) reads as a miss and
    /// does not block a new insert of the same card.
    #[tokio::test]
    async fn dangling_index_rows_read_as_none() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(dir.path())?;
        let m = MerchantId::generate();
        let r = record(&m, "fp1", Some("d1-a"));
        store.insert_token(&r).await?;
        let txn = begin_write(&store.db)?;
        txn.open_table(TOKENS)?
            .remove((m.as_str(), r.id.as_str()))?;
        txn.commit()?;

        assert_eq!(store.find_by_fingerprint(&m, "fp1").await?, None);
        assert_eq!(store.find_by_d1_token(&m, "d1-a").await?, None);
        let again = record(&m, "fp1", None);
        assert!(matches!(
            store.insert_token(&again).await?,
            InsertOutcome::Inserted
        ));
        assert_eq!(store.find_by_fingerprint(&m, "fp1").await?, Some(again));
        Ok(())
    }
}
