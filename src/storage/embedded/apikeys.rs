//! API key records on the embedded store, each operation one redb transaction:
//! `api_key_records` (merchant id, key id) -> record JSON, `api_key_index` key hash ->
//! `<merchant id> <key id>`, `api_key_used` (merchant id, key id) -> last use (Unix ms).

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};
use time::OffsetDateTime;

use super::{EmbeddedStore, begin_write};
use crate::domain::apikeys::ApiKeyRecord;
use crate::domain::merchant::ApiKeyHash;
use crate::domain::ports::StoreError;
use crate::domain::ports::apikeys::ApiKeyStore;
use crate::domain::token::MerchantId;
use crate::storage::codec::apikeys::{decode, encode, from_unix_ms, revoked, unix_ms};

const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("api_key_records");
const INDEX: TableDefinition<&str, &str> = TableDefinition::new("api_key_index");
const USED: TableDefinition<(&str, &str), u64> = TableDefinition::new("api_key_used");
/// Upper bound for ids in a range: every id character sorts below `~`.
const ID_MAX: &str = "~";

/// `Ok(None)` for a table no write created yet (tables are made on first use).
fn missing_ok<T>(r: Result<T, TableError>) -> Result<Option<T>, StoreError> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[async_trait]
impl ApiKeyStore for EmbeddedStore {
    async fn insert_key(&self, rec: &ApiKeyRecord, hash: &ApiKeyHash) -> Result<bool, StoreError> {
        let json = encode(rec)?;
        let m = rec.merchant_id.as_str().to_owned();
        let id = rec.id.clone();
        let h = hash.0.clone();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            {
                let mut records = txn.open_table(RECORDS)?;
                if records.get((m.as_str(), id.as_str()))?.is_some() {
                    return Ok(false);
                }
                records.insert((m.as_str(), id.as_str()), json.as_slice())?;
                let ptr = format!("{m} {id}");
                txn.open_table(INDEX)?.insert(h.as_str(), ptr.as_str())?;
            }
            txn.commit()?;
            Ok(true)
        })
        .await
    }

    async fn key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        let h = hash.0.clone();
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(index) = missing_ok(txn.open_table(INDEX))? else {
                return Ok(None);
            };
            let Some(ptr) = index.get(h.as_str())?.map(|g| g.value().to_owned()) else {
                return Ok(None);
            };
            let (m, id) = ptr
                .split_once(' ')
                .ok_or_else(|| StoreError::Corrupt("API key index entry is malformed".into()))?;
            let Some(records) = missing_ok(txn.open_table(RECORDS))? else {
                return Ok(None);
            };
            records.get((m, id))?.map(|g| decode(g.value())).transpose()
        })
        .await
    }

    async fn list_keys(&self, merchant: &MerchantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let m = merchant.as_str().to_owned();
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(records) = missing_ok(txn.open_table(RECORDS))? else {
                return Ok(Vec::new());
            };
            let used = missing_ok(txn.open_table(USED))?;
            let mut out = Vec::new();
            for entry in records.range((m.as_str(), "")..(m.as_str(), ID_MAX))? {
                let (_, v) = entry?;
                let mut rec = decode(v.value())?;
                if let Some(u) = &used {
                    rec.last_used_at = u
                        .get((m.as_str(), rec.id.as_str()))?
                        .and_then(|g| from_unix_ms(g.value()));
                }
                out.push(rec);
            }
            Ok(out)
        })
        .await
    }

    async fn revoke_key(
        &self,
        merchant: &MerchantId,
        id: &str,
        at: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let m = merchant.as_str().to_owned();
        let id = id.to_owned();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            let rec = {
                let mut records = txn.open_table(RECORDS)?;
                let cur = records
                    .get((m.as_str(), id.as_str()))?
                    .map(|g| decode(g.value()))
                    .transpose()?;
                let Some(cur) = cur else { return Ok(None) };
                let rec = revoked(cur, at);
                let json = encode(&rec)?;
                records.insert((m.as_str(), id.as_str()), json.as_slice())?;
                rec
            };
            txn.commit()?;
            Ok(Some(rec))
        })
        .await
    }

    async fn touch_key(
        &self,
        merchant: &MerchantId,
        id: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let m = merchant.as_str().to_owned();
        let id = id.to_owned();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            txn.open_table(USED)?
                .insert((m.as_str(), id.as_str()), unix_ms(at))?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}
