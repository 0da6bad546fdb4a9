//! [`IssuerStore`] on Redis. Keys (`docs/storage.md`, "Issuers"):
//!
//! - `P:issuer:{<issuer id>}`: the record (JSON), a slot of its own;
//! - `P:{d1i:<d1 issuer id>}:issuer`: the D1 issuer id -> issuer id index (`SET NX` claims it);
//! - `P:{issuers}:ids`: the set of every issuer id (the worker walks it; issuers are few).
//!
//! The three keys are in different slots, so an insert is three steps in an order that fails
//! safe: the D1 id is claimed first (so two issuers can never share it), then the record, then
//! the set. A claim whose record never landed (a crash between the steps) is taken over by the
//! next insert with that D1 id.

use async_trait::async_trait;

use super::RedisStore;
use crate::domain::issuer::{Issuer, IssuerId};
use crate::domain::ports::StoreError;
use crate::domain::ports::issuers::IssuerStore;
use crate::storage::codec::issuers::{decode, encode};

impl RedisStore {
    fn issuer_key(&self, id: &str) -> String {
        self.global_key(&format!("issuer:{{{id}}}"))
    }
    fn issuer_d1_key(&self, d1: &str) -> String {
        self.global_key(&format!("{{d1i:{d1}}}:issuer"))
    }
    fn issuer_set_key(&self) -> String {
        self.global_key("{issuers}:ids")
    }
}

#[async_trait]
impl IssuerStore for RedisStore {
    async fn insert_issuer(&self, issuer: &Issuer) -> Result<bool, StoreError> {
        let d1_key = self.issuer_d1_key(&issuer.d1_issuer_id);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&d1_key).arg(issuer.id.as_str()).arg("NX");
        let claimed: Option<String> = self.query_write(cmd).await?;
        if claimed.is_none() {
            // Taken: by a live issuer (refuse), or by an insert that died before its record.
            let mut cmd = redis::cmd("GET");
            cmd.arg(&d1_key);
            let holder: Option<String> = self.query(cmd).await?;
            let live = match holder.as_deref().and_then(IssuerId::parse) {
                Some(h) => self.get_issuer(&h).await?.is_some(),
                None => false,
            };
            if live {
                return Ok(false);
            }
            let mut cmd = redis::cmd("SET");
            cmd.arg(&d1_key).arg(issuer.id.as_str());
            let _: () = self.query_write(cmd).await?;
        }
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.issuer_key(issuer.id.as_str()))
            .arg(encode("issuer", issuer)?);
        let _: () = self.query_write(cmd).await?;
        let mut cmd = redis::cmd("SADD");
        cmd.arg(self.issuer_set_key()).arg(issuer.id.as_str());
        let _: i64 = self.query_write(cmd).await?;
        Ok(true)
    }

    async fn get_issuer(&self, id: &IssuerId) -> Result<Option<Issuer>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.issuer_key(id.as_str()));
        let json: Option<Vec<u8>> = self.query(cmd).await?;
        json.map(|j| decode("issuer", &j)).transpose()
    }

    async fn issuer_by_d1_id(&self, d1_issuer_id: &str) -> Result<Option<Issuer>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.issuer_d1_key(d1_issuer_id));
        let id: Option<String> = self.query(cmd).await?;
        match id.as_deref().and_then(IssuerId::parse) {
            Some(id) => Ok(self
                .get_issuer(&id)
                .await?
                .filter(|i| i.d1_issuer_id == d1_issuer_id)),
            None => Ok(None),
        }
    }

    async fn list_issuers(&self) -> Result<Vec<Issuer>, StoreError> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(self.issuer_set_key());
        let ids: Vec<String> = self.query(cmd).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids.iter().filter_map(|i| IssuerId::parse(i)) {
            if let Some(i) = self.get_issuer(&id).await? {
                out.push(i);
            }
        }
        Ok(out)
    }
}
