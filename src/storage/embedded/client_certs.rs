//! Client certificate policies on the embedded store: `client_cert_policies` merchant id ->
//! policy JSON, `client_cert_index` fingerprint -> merchant id. A change is one redb write
//! transaction, so policy and index always agree here.

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::{EmbeddedStore, begin_write};
use crate::domain::client_certs::{CertFingerprint, ClientCertPolicy};
use crate::domain::ports::StoreError;
use crate::domain::ports::client_certs::{ClientCertStore, PutPolicy};
use crate::domain::token::MerchantId;
use crate::storage::codec::client_certs::{decode, encode, parse_merchant};

const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("client_cert_policies");
const INDEX: TableDefinition<&str, &str> = TableDefinition::new("client_cert_index");

/// `Ok(None)` for a table no write created yet (tables are made on first use).
fn missing_ok<T>(r: Result<T, TableError>) -> Result<Option<T>, StoreError> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[async_trait]
impl ClientCertStore for EmbeddedStore {
    async fn client_cert_policy(
        &self,
        merchant: &MerchantId,
    ) -> Result<Option<ClientCertPolicy>, StoreError> {
        let m = merchant.as_str().to_owned();
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(t) = missing_ok(txn.open_table(POLICIES))? else {
                return Ok(None);
            };
            t.get(m.as_str())?.map(|g| decode(g.value())).transpose()
        })
        .await
    }

    async fn merchant_by_client_cert(
        &self,
        fp: &CertFingerprint,
    ) -> Result<Option<MerchantId>, StoreError> {
        let fp = fp.as_str().to_owned();
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(t) = missing_ok(txn.open_table(INDEX))? else {
                return Ok(None);
            };
            t.get(fp.as_str())?
                .map(|g| parse_merchant(g.value()))
                .transpose()
        })
        .await
    }

    async fn put_client_cert_policy(
        &self,
        policy: &ClientCertPolicy,
    ) -> Result<PutPolicy, StoreError> {
        let json = encode(policy)?;
        let policy = policy.clone();
        self.run(move |db: &Database| {
            let m = policy.merchant_id.as_str();
            let txn = begin_write(db)?;
            {
                let mut policies = txn.open_table(POLICIES)?;
                let mut index = txn.open_table(INDEX)?;
                for c in &policy.certificates {
                    let fp = c.sha256.as_str();
                    let holder = index.get(fp)?.map(|g| g.value().to_owned());
                    if let Some(other) = holder.filter(|h| h != m) {
                        let live = policies
                            .get(other.as_str())?
                            .map(|g| decode(g.value()))
                            .transpose()?
                            .is_some_and(|p| p.cert(&c.sha256).is_some());
                        if live {
                            // Dropping the transaction aborts it: nothing is written.
                            return Ok(PutPolicy::Taken(c.sha256.clone()));
                        }
                    }
                    index.insert(fp, m)?;
                }
                let before = policies
                    .insert(m, json.as_slice())?
                    .map(|g| decode(g.value()))
                    .transpose()?;
                for old in before.iter().flat_map(|p| &p.certificates) {
                    let fp = old.sha256.as_str();
                    let ours = index.get(fp)?.is_some_and(|g| g.value() == m);
                    if ours && policy.cert(&old.sha256).is_none() {
                        index.remove(fp)?;
                    }
                }
            }
            txn.commit()?;
            Ok(PutPolicy::Stored)
        })
        .await
    }
}
