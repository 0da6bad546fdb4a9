//! [`RateLeaseStore`] on Redis: one key per bucket holding its GCRA theoretical arrival time
//! (microseconds, Redis' own clock, so instances with skewed clocks share one budget):
//! `P:rl:{k:<key id>}` per API key, `P:rl:{m:<merchant id>}` per merchant (each its own hash
//! tag: a lease touches one key). One script call leases a whole batch.
//!
//! The key expires when its bucket would be full again, so idle buckets cost no memory.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::RedisStore;
use crate::domain::ports::StoreError;
use crate::domain::ports::ratelimit::{Lease, RateLeaseStore};
use crate::domain::ratelimit::{Limit, Scope};

/// GCRA for `want` cells at once. KEYS: bucket. ARGV: emission interval (µs), tolerance (µs:
/// burst x interval), cells wanted. Returns `{granted, retry_after_us}`.
///
/// The TAT is stored with `%.0f`: `tostring` would print a 16-digit number in exponent form
/// and lose precision. Microseconds since the epoch stay well below 2^53, exact in a Lua number.
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local n = math.floor((tolerance - (tat - now)) / interval)
if n > want then n = want end
if n <= 0 then
  return {0, math.max(1, tat + interval - tolerance - now)}
end
tat = tat + n * interval
local ttl_ms = math.ceil((tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', ttl_ms)
return {n, 0}
"#,
    )
});

impl RedisStore {
    fn rate_bucket_key(&self, scope: Scope, id: &str) -> String {
        let tag = match scope {
            Scope::ApiKey => "k",
            Scope::Merchant => "m",
        };
        self.global_key(&format!("rl:{{{tag}:{id}}}"))
    }
}

#[async_trait]
impl RateLeaseStore for RedisStore {
    async fn lease(
        &self,
        scope: Scope,
        id: &str,
        limit: Limit,
        want: u32,
    ) -> Result<Lease, StoreError> {
        // At least 1 µs: a rate above a million per second is "no limit" for any real use.
        let interval_us = (1_000_000.0 / limit.per_second).max(1.0).round() as u64;
        let tolerance_us = interval_us.saturating_mul(u64::from(limit.burst.max(1)));
        let mut inv = LEASE.key(self.rate_bucket_key(scope, id));
        inv.arg(interval_us).arg(tolerance_us).arg(want.max(1));
        // Not `invoke_write`: a lease is no acknowledged data; replicas need not confirm it.
        let (granted, retry_us): (i64, i64) = self.invoke(inv).await?;
        Ok(Lease {
            granted: u32::try_from(granted.max(0)).unwrap_or(0),
            retry_after: Duration::from_micros(u64::try_from(retry_us.max(0)).unwrap_or(0)),
        })
    }
}
