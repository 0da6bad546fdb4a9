//! [`IssuerStore`] on the embedded redb file, each operation one transaction: `issuers`
//! issuer id -> record JSON, `issuers_by_d1` D1 issuer id -> issuer id (`docs/storage.md`,
//! "Issuers"). Tables are created by the first write; reads treat a missing table as empty.

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::lifecycle::missing_is_empty;
use super::{EmbeddedStore, begin_write};
use crate::domain::issuer::{Issuer, IssuerId};
use crate::domain::ports::StoreError;
use crate::domain::ports::issuers::IssuerStore;
use crate::storage::codec::issuers::{decode, encode};

const ISSUERS: TableDefinition<&str, &[u8]> = TableDefinition::new("issuers");
const BY_D1: TableDefinition<&str, &str> = TableDefinition::new("issuers_by_d1");

#[async_trait]
impl IssuerStore for EmbeddedStore {
    async fn insert_issuer(&self, issuer: &Issuer) -> Result<bool, StoreError> {
        let json = encode("issuer", issuer)?;
        let id = issuer.id.as_str().to_owned();
        let d1 = issuer.d1_issuer_id.clone();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            {
                let mut by_d1 = txn.open_table(BY_D1)?;
                if by_d1.get(d1.as_str())?.is_some() {
                    return Ok(false);
                }
                by_d1.insert(d1.as_str(), id.as_str())?;
                txn.open_table(ISSUERS)?
                    .insert(id.as_str(), json.as_slice())?;
            }
            txn.commit()?;
            Ok(true)
        })
        .await
    }

    async fn get_issuer(&self, id: &IssuerId) -> Result<Option<Issuer>, StoreError> {
        let id = id.as_str().to_owned();
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(t) = missing_is_empty(txn.open_table(ISSUERS))? else {
                return Ok(None);
            };
            t.get(id.as_str())?
                .map(|g| decode("issuer", g.value()))
                .transpose()
        })
        .await
    }

    async fn issuer_by_d1_id(&self, d1_issuer_id: &str) -> Result<Option<Issuer>, StoreError> {
        let d1 = d1_issuer_id.to_owned();
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(by_d1) = missing_is_empty(txn.open_table(BY_D1))? else {
                return Ok(None);
            };
            let Some(id) = by_d1.get(d1.as_str())?.map(|g| g.value().to_owned()) else {
                return Ok(None);
            };
            let Some(t) = missing_is_empty(txn.open_table(ISSUERS))? else {
                return Ok(None);
            };
            t.get(id.as_str())?
                .map(|g| decode("issuer", g.value()))
                .transpose()
        })
        .await
    }

    async fn list_issuers(&self) -> Result<Vec<Issuer>, StoreError> {
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(t) = missing_is_empty(txn.open_table(ISSUERS))? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for entry in t.iter()? {
                let (_, v) = entry?;
                out.push(decode("issuer", v.value())?);
            }
            Ok(out)
        })
        .await
    }
}
