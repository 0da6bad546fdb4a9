//! [`LifecycleStore`] on Redis. Keys (see `docs/storage.md`, "Lifecycle"):
//!
//! - `P:{m:M}:evt:<event id>`: processed-event marker, `PX` ttl, in the merchant's slot so the
//!   apply script can write it with the token in one atomic step;
//! - `P:{lc}:recon`: the reconciliation schedule, one sorted set for the whole deployment
//!   (score = due time in Unix ms, member = `"<merchant id> <token id>"`);
//! - `P:lease:{<name>}`: a lease, value = holder id, `PX` ttl;
//! - `P:job:{<name>}`: a maintenance job's saved progress (no ttl).
//!
//! `scan_tokens` walks every primary of a Cluster in turn: its cursor names the node
//! (`host:port`) and the `SCAN` cursor on it, so any instance can continue a walk another one
//! started (see [`RedisStore::scan_keys`]).

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::outbox::OUTBOX_FUNCTIONS;
use super::{COUNT_FUNCTIONS, RedisStore, UPDATE_TOKEN, WALLET_FUNCTIONS};
use crate::domain::ports::lifecycle::{EventWrite, LifecycleStore, ScanPage};
use crate::domain::ports::outbox::EventAppend;
use crate::domain::ports::{CheckAt, StoreError};
use crate::domain::token::{MerchantId, TokenId, TokenRecord};
use crate::storage::codec::lifecycle::{parse_schedule_member, schedule_member, ttl_ms};

/// The token compare-and-set of `redis.rs`, unchanged, wrapped by a marker check before and the
/// marker write after: the whole script runs atomically, so an event is applied at most once
/// however many instances receive it. Returns 0 applied, 1 missing token, 2 version conflict,
/// 3 already processed. Keys and ARGV 1-11 as `UPDATE_TOKEN` (so the token counts and the
/// wallet index move in the same step); ARGV 12 marker key (same hash tag as the token), ARGV 13
/// marker ttl in ms; then, when the change has a merchant webhook event, its `outbox_append`
/// arguments from ARGV 14 (`redis_outbox.rs`): written in the same step, only when applied.
static APPLY_EVENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
{COUNT_FUNCTIONS}
{WALLET_FUNCTIONS}
{OUTBOX_FUNCTIONS}
if redis.call('EXISTS', ARGV[12]) == 1 then
  return 3
end
local function cas()
{UPDATE_TOKEN}
end
local r = cas()
if r == 0 then
  redis.call('SET', ARGV[12], '1', 'PX', ARGV[13])
  if ARGV[14] then
    outbox_append(14)
  end
end
return r
"#
    ))
});

/// The reconciliation check a token script writes with its token (`CheckAt`), so a token and
/// its check are one atomic step. `check_write(a)` reads ARGV from index `a`: operation (`at`,
/// `never`, or `''`: leave the schedule alone, which is also what a Cluster passes: the
/// schedule is in another slot there, see [`RedisStore::check_after`]), schedule key, due time
/// (Unix ms), member.
pub(crate) const CHECK_FUNCTIONS: &str = r#"
local function check_write(a)
  local op = ARGV[a]
  if op == 'at' then
    redis.call('ZADD', ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
  elseif op == 'never' then
    redis.call('ZREM', ARGV[a + 1], ARGV[a + 3])
  end
end
"#;

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

    /// Appends the four `check_write` arguments of `check` for the token to `inv`. On a
    /// Cluster (the schedule's slot is not the token's) and for `Unchanged` the operation is
    /// `''`: the script leaves the schedule alone, and [`Self::check_after`] writes it.
    pub(crate) fn check_args(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
        merchant: &MerchantId,
        token: &TokenId,
        check: CheckAt,
    ) {
        let (op, due) = match check {
            _ if self.is_cluster() => ("", 0),
            CheckAt::Unchanged => ("", 0),
            CheckAt::At(due) => ("at", due),
            CheckAt::Never => ("never", 0),
        };
        if op.is_empty() {
            inv.arg("").arg("").arg("").arg("");
        } else {
            inv.arg(op)
                .arg(self.schedule_key())
                .arg(due)
                .arg(schedule_member(merchant, token));
        }
    }

    /// Cluster only, after a token script succeeded: writes the check the script could not
    /// (another slot) as its own command. Best-effort, as the schedule was before it moved
    /// into the token scripts: the token is stored, a failure is logged and the token's next
    /// write puts it back on the schedule (`domain::reconcile`).
    pub(crate) async fn check_after(&self, merchant: &MerchantId, token: &TokenId, check: CheckAt) {
        if !self.is_cluster() {
            return;
        }
        let res = match check {
            CheckAt::Unchanged => return,
            CheckAt::At(due) => self.schedule_check(merchant, token, due).await,
            CheckAt::Never => self.unschedule_check(merchant, token).await,
        };
        if let Err(e) = res {
            tracing::warn!(token_id = %token, error = %e, "could not update the reconciliation schedule");
        }
    }

    fn lease_key(&self, name: &str) -> String {
        self.global_key(&format!("lease:{{{name}}}"))
    }

    fn job_key(&self, name: &str) -> String {
        self.global_key(&format!("job:{{{name}}}"))
    }

    /// One page of a `SCAN ... MATCH pattern` over the whole deployment. On standalone Redis
    /// the cursor is Redis's own. On a Cluster it is `<host>:<port>/<node cursor>`: the walk
    /// visits the primaries in the order of the slots they serve (the same order on every
    /// instance), one `SCAN` on one node per page, and moves to the next primary when a node's
    /// cursor comes back to 0. A cursor that names no current primary (a node left, failed over
    /// or changed address) or does not parse restarts the walk from the first primary: keys may
    /// then be seen twice, never skipped. Keys that migrate between nodes during a walk (slot
    /// resharding) may be missed by that walk; the next one sees them.
    pub(crate) async fn scan_keys(
        &self,
        pattern: &str,
        cursor: Option<&str>,
        count: usize,
    ) -> Result<(Vec<String>, Option<String>), StoreError> {
        let scan = |node_cursor: &str| {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(node_cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(count.max(1));
            cmd
        };
        if !self.is_cluster() {
            let (next, keys): (String, Vec<String>) =
                self.query(scan(cursor.unwrap_or("0"))).await?;
            return Ok((keys, (next != "0").then_some(next)));
        }
        let primaries = self.cluster_primaries().await?;
        if primaries.is_empty() {
            return Err(StoreError::Unavailable(
                "redis cluster lists no primaries".into(),
            ));
        }
        let (index, node_cursor) = cursor
            .and_then(parse_cluster_cursor)
            .and_then(|(host, port, c)| {
                let i = primaries
                    .iter()
                    .position(|(_, h, p)| h == host && *p == port)?;
                Some((i, c.to_owned()))
            })
            .unwrap_or((0, "0".to_owned()));
        let (_, host, port) = &primaries[index];
        let (next, keys): (String, Vec<String>) =
            self.query_node(scan(&node_cursor), host, *port).await?;
        let next = if next != "0" {
            Some(cluster_cursor(host, *port, &next))
        } else {
            primaries
                .get(index + 1)
                .map(|(_, h, p)| cluster_cursor(h, *p, "0"))
        };
        Ok((keys, next))
    }
}

fn cluster_cursor(host: &str, port: u16, node_cursor: &str) -> String {
    format!("{host}:{port}/{node_cursor}")
}

/// `<host>:<port>/<node cursor>` -> parts (`host` may itself hold `:`, as an IPv6 address does).
fn parse_cluster_cursor(c: &str) -> Option<(&str, u16, &str)> {
    let (addr, node_cursor) = c.rsplit_once('/')?;
    let (host, port) = addr.rsplit_once(':')?;
    if host.is_empty() || node_cursor.is_empty() || !node_cursor.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((host, port.parse().ok()?, node_cursor))
}

#[async_trait]
impl LifecycleStore for RedisStore {
    async fn scan_tokens(
        &self,
        cursor: Option<&str>,
        count: usize,
    ) -> Result<ScanPage, StoreError> {
        let start = self.global_key("{m:");
        let (keys, next) = self
            .scan_keys(&format!("{start}*}}:tok:*"), cursor, count)
            .await?;
        let items = keys
            .iter()
            .filter_map(|k| {
                let rest = k.strip_prefix(&start)?;
                let (merchant, token) = rest.split_once("}:tok:")?;
                Some((MerchantId::parse(merchant)?, TokenId::parse(token)?))
            })
            .collect();
        Ok(ScanPage { items, next })
    }

    async fn load_job_state(&self, name: &str) -> Result<Option<String>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.job_key(name));
        self.query(cmd).await
    }

    async fn save_job_state(&self, name: &str, state: Option<&str>) -> Result<(), StoreError> {
        let cmd = match state {
            Some(v) => {
                let mut c = redis::cmd("SET");
                c.arg(self.job_key(name)).arg(v);
                c
            }
            None => {
                let mut c = redis::cmd("DEL");
                c.arg(self.job_key(name));
                c
            }
        };
        self.query::<redis::Value>(cmd).await?;
        Ok(())
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
        let reply: Option<String> = self.query_write(cmd).await?;
        Ok(reply.is_some())
    }

    async fn apply_event_with(
        &self,
        rec: &TokenRecord,
        event_id: &str,
        ttl: Duration,
        webhook: Option<&EventAppend>,
    ) -> Result<EventWrite, StoreError> {
        if webhook.is_some() {
            self.register_outbox_shard(&rec.merchant_id).await?;
        }
        let mut inv = self.update_invocation(&APPLY_EVENT, rec)?;
        inv.arg(self.event_key(&rec.merchant_id, event_id))
            .arg(ttl_ms(ttl));
        let jobs = match webhook {
            Some(w) => self.append_args(&mut inv, w)?,
            None => Vec::new(),
        };
        let code: i64 = self.invoke_write(inv).await?;
        if code == 0 {
            self.move_appended_jobs(&rec.merchant_id, &jobs).await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_cursors_round_trip_and_reject_junk() {
        let c = cluster_cursor("127.0.0.1", 7001, "1234");
        assert_eq!(c, "127.0.0.1:7001/1234");
        assert_eq!(parse_cluster_cursor(&c), Some(("127.0.0.1", 7001, "1234")));
        assert_eq!(parse_cluster_cursor("::1:7001/0"), Some(("::1", 7001, "0")));
        for junk in ["0", "1234", "h:p/1", "h:1/", ":1/0", "h:1/x", "h:70000/0"] {
            assert_eq!(parse_cluster_cursor(junk), None, "{junk}");
        }
    }
}
