//! [`LifecycleStore`] on Redis. Keys (see `docs/storage.md`, "Lifecycle"):
//!
//! - `P:{m:M}:evt:<event id>`: processed-event marker, `PX` ttl, in the merchant's slot so the
//!   apply script can write it with the token in one atomic step;
//! - `P:{lc}:recon`: the reconciliation schedule, one sorted set for the whole deployment
//!   (score = due time in Unix ms, member = `"<merchant id> <token id>"`);
//! - `P:lease:{<name>}`: a lease, value = holder id, `PX` ttl.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::StoreError;
use super::lifecycle::{
    EventWrite, LifecycleStore, ScanPage, parse_schedule_member, schedule_member, ttl_ms,
};
use super::redis::{RedisStore, UPDATE_TOKEN};
use crate::domain::token::{MerchantId, TokenId, TokenRecord};

/// The token compare-and-set of `redis.rs`, unchanged, wrapped by a marker check before and the
/// marker write after: the whole script runs atomically, so an event is applied at most once
/// however many instances receive it. Returns 0 applied, 1 missing token, 2 version conflict,
/// 3 already processed. Keys and ARGV 1-8 as `UPDATE_TOKEN`; ARGV 9 marker key (same hash tag
/// as the token), ARGV 10 marker ttl in ms.
static APPLY_EVENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
if redis.call('EXISTS', ARGV[9]) == 1 then
  return 3
end
local function cas()
{UPDATE_TOKEN}
end
local r = cas()
if r == 0 then
  redis.call('SET', ARGV[9], '1', 'PX', ARGV[10])
end
return r
"#
    ))
});

/// Takes or extends a lease. KEYS: lease. ARGV: holder, ttl ms. Returns 1 when held.
static ACQUIRE_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// Deletes a lease only if `holder` holds it. KEYS: lease. ARGV: holder.
static RELEASE_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
});

impl RedisStore {
    fn event_key(&self, merchant: &MerchantId, event_id: &str) -> String {
        format!("{}evt:{event_id}", self.merchant_key_start(merchant))
    }

    fn schedule_key(&self) -> String {
        self.global_key("{lc}:recon")
    }

    fn lease_key(&self, name: &str) -> String {
        self.global_key(&format!("lease:{{{name}}}"))
    }
}

#[async_trait]
impl LifecycleStore for RedisStore {
    async fn scan_tokens(
        &self,
        cursor: Option<&str>,
        count: usize,
    ) -> Result<ScanPage, StoreError> {
        if self.is_cluster() {
            // SCAN walks one node; a cluster walk has to visit every master, which this
            // build does not do yet (docs/security.md, key rotation).
            return Err(StoreError::Unavailable(
                "token scan is not supported on Redis Cluster yet".into(),
            ));
        }
        let start = self.global_key("{m:");
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor.unwrap_or("0"))
            .arg("MATCH")
            .arg(format!("{start}*}}:tok:*"))
            .arg("COUNT")
            .arg(count.max(1));
        let (next, keys): (String, Vec<String>) = self.query(cmd).await?;
        let items = keys
            .iter()
            .filter_map(|k| {
                let rest = k.strip_prefix(&start)?;
                let (merchant, token) = rest.split_once("}:tok:")?;
                Some((MerchantId::parse(merchant)?, TokenId::parse(token)?))
            })
            .collect();
        Ok(ScanPage {
            items,
            next: (next != "0").then_some(next),
        })
    }

    async fn event_seen(&self, merchant: &MerchantId, event_id: &str) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(self.event_key(merchant, event_id));
        let n: i64 = self.query(cmd).await?;
        Ok(n > 0)
    }

    async fn mark_event(
        &self,
        merchant: &MerchantId,
        event_id: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.event_key(merchant, event_id))
            .arg("1")
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms(ttl));
        // `SET NX` answers OK when it wrote and nil when the key existed.
        let reply: Option<String> = self.query(cmd).await?;
        Ok(reply.is_some())
    }

    async fn apply_event(
        &self,
        rec: &TokenRecord,
        event_id: &str,
        ttl: Duration,
    ) -> Result<EventWrite, StoreError> {
        let mut inv = self.update_invocation(&APPLY_EVENT, rec)?;
        inv.arg(self.event_key(&rec.merchant_id, event_id))
            .arg(ttl_ms(ttl));
        let code: i64 = self.invoke(inv).await?;
        match code {
            0 => Ok(EventWrite::Applied),
            1 => Err(StoreError::NotFound),
            2 => Err(StoreError::Conflict),
            3 => Ok(EventWrite::Duplicate),
            _ => Err(StoreError::Corrupt(
                "unexpected apply-event script result".into(),
            )),
        }
    }

    async fn schedule_check(
        &self,
        merchant: &MerchantId,
        token: &TokenId,
        due_ms: u64,
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(self.schedule_key())
            .arg(due_ms)
            .arg(schedule_member(merchant, token));
        self.query::<i64>(cmd).await?;
        Ok(())
    }

    async fn unschedule_check(
        &self,
        merchant: &MerchantId,
        token: &TokenId,
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(self.schedule_key())
            .arg(schedule_member(merchant, token));
        self.query::<i64>(cmd).await?;
        Ok(())
    }

    async fn due_checks(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(MerchantId, TokenId)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(self.schedule_key())
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit);
        let members: Vec<String> = self.query(cmd).await?;
        let mut due = Vec::with_capacity(members.len());
        let mut junk = Vec::new();
        for m in members {
            match parse_schedule_member(&m) {
                Some(pair) => due.push(pair),
                None => junk.push(m),
            }
        }
        if !junk.is_empty() {
            // Never returned, never retried: without removal they would fill every batch.
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(self.schedule_key()).arg(junk);
            self.query::<i64>(cmd).await?;
        }
        Ok(due)
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut inv = ACQUIRE_LEASE.key(self.lease_key(name));
        inv.arg(holder).arg(ttl_ms(ttl));
        let held: i64 = self.invoke(inv).await?;
        Ok(held == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let mut inv = RELEASE_LEASE.key(self.lease_key(name));
        inv.arg(holder);
        self.invoke::<i64>(inv).await?;
        Ok(())
    }
}
