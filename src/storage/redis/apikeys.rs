//! API key records on Redis:
//! - `P:{m:M}:keys`, a hash: key id -> record JSON (the merchant's keys, listed by `HGETALL`);
//! - `P:{m:M}:keys_used`, a hash: key id -> last use (Unix ms), apart from the record so a
//!   last-use write can never undo a revocation;
//! - `P:{kh:<hash>}:key`, a string: `<merchant id> <key id>`, the hash index authentication
//!   reads (tagged by the hash, like the core `api_key` index, so it lives in its own slot).
//!
//! An insert writes the record (`HSETNX`) and then the index: a failure between the two leaves
//! a listed key that does not authenticate, never the reverse.

use std::sync::LazyLock;

use async_trait::async_trait;
use redis::Script;
use time::OffsetDateTime;

use super::RedisStore;
use crate::domain::apikeys::ApiKeyRecord;
use crate::domain::merchant::ApiKeyHash;
use crate::domain::ports::StoreError;
use crate::domain::ports::apikeys::ApiKeyStore;
use crate::domain::token::MerchantId;
use crate::storage::codec::apikeys::{decode, encode, from_unix_ms, revoked, unix_ms};

/// Marks a record revoked, atomically. KEYS: keys hash. ARGV: key id, revoked record JSON.
/// Returns the stored JSON after the call, or nil when there is no such key.
const REVOKE: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return false end
if string.find(cur, '"revokedAt":"', 1, true) then return cur end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return ARGV[2]
"#;

static REVOKE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REVOKE));

fn records(s: &RedisStore, m: &MerchantId) -> String {
    format!("{}keys", s.merchant_key_start(m))
}

fn used(s: &RedisStore, m: &MerchantId) -> String {
    format!("{}keys_used", s.merchant_key_start(m))
}

fn index(s: &RedisStore, h: &ApiKeyHash) -> String {
    s.global_key(&format!("{{kh:{}}}:key", h.0))
}

#[async_trait]
impl ApiKeyStore for RedisStore {
    async fn insert_key(&self, rec: &ApiKeyRecord, hash: &ApiKeyHash) -> Result<bool, StoreError> {
        let json = encode(rec)?;
        let mut cmd = redis::cmd("HSETNX");
        cmd.arg(records(self, &rec.merchant_id))
            .arg(&rec.id)
            .arg(json);
        let added: i64 = self.query_write(cmd).await?;
        if added == 0 {
            return Ok(false);
        }
        let mut cmd = redis::cmd("SET");
        cmd.arg(index(self, hash))
            .arg(format!("{} {}", rec.merchant_id, rec.id));
        let _: () = self.query_write(cmd).await?;
        Ok(true)
    }

    async fn key_by_hash(&self, hash: &ApiKeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(index(self, hash));
        let ptr: Option<String> = self.query(cmd).await?;
        let Some(ptr) = ptr else { return Ok(None) };
        let (m, id) = ptr
            .split_once(' ')
            .ok_or_else(|| StoreError::Corrupt("API key index entry is malformed".into()))?;
        let m = MerchantId::parse_tenant(m)
            .ok_or_else(|| StoreError::Corrupt("API key index names a bad merchant".into()))?;
        let mut cmd = redis::cmd("HGET");
        cmd.arg(records(self, &m)).arg(id);
        let json: Option<Vec<u8>> = self.query(cmd).await?;
        json.map(|j| decode(&j)).transpose()
    }

    async fn list_keys(&self, merchant: &MerchantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(records(self, merchant));
        let all: Vec<(String, Vec<u8>)> = self.query(cmd).await?;
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(used(self, merchant));
        let used: std::collections::HashMap<String, u64> = self.query(cmd).await?;
        let mut out = Vec::with_capacity(all.len());
        for (id, json) in all {
            let mut rec = decode(&json)?;
            rec.last_used_at = used.get(&id).and_then(|ms| from_unix_ms(*ms));
            out.push(rec);
        }
        Ok(out)
    }

    async fn revoke_key(
        &self,
        merchant: &MerchantId,
        id: &str,
        at: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let key = records(self, merchant);
        let mut cmd = redis::cmd("HGET");
        cmd.arg(&key).arg(id);
        let cur: Option<Vec<u8>> = self.query(cmd).await?;
        let Some(cur) = cur else { return Ok(None) };
        let json = encode(&revoked(decode(&cur)?, at))?;
        let mut inv = REVOKE_SCRIPT.key(&key);
        inv.arg(id).arg(json);
        let stored: Option<Vec<u8>> = self.invoke_write(inv).await?;
        stored.map(|j| decode(&j)).transpose()
    }

    async fn touch_key(
        &self,
        merchant: &MerchantId,
        id: &str,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(used(self, merchant)).arg(id).arg(unix_ms(at));
        let _: i64 = self.query(cmd).await?;
        Ok(())
    }
}
