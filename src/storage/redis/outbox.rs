//! The webhook outbox on Redis: endpoint and event records under the merchant's hash tag, and
//! the shared job queue as a stream with a consumer group (every gateway instance is one
//! consumer), a sorted set of due retries and a capped dead-letter stream, all under the tag
//! `{wh}` so the queue scripts touch one Cluster slot. Layout in `docs/storage.md`.
//!
//! The queue, in Redis terms:
//! - **enqueue**: `XADD outbox * j <job>`.
//! - **claim** (one script): move due retries from the sorted set into the stream, `XAUTOCLAIM`
//!   entries idle longer than the lease (their consumer died or stopped mid-attempt), then
//!   `XREADGROUP ... >` for new entries. Nothing blocks: the connection is shared with API
//!   traffic, so workers poll (and are woken locally when their own instance enqueues).
//! - **finish** (one script): `XACK` + `XDEL`, and if the ack found the entry pending, `ZADD`
//!   the retry or `XADD` the dead letter. An ack that finds nothing (another consumer took the
//!   entry over) schedules nothing, so a job never forks into two retry chains.
//! - **order per subject**: the append pushes each job of an event with a subject onto the
//!   (endpoint, subject) chain, a list under the merchant's tag, and queues it only if it is
//!   the chain's only entry; a `Done`/`Dead` finish first runs the advance script on the chain
//!   (pop the head if it is this job's event, queue the new head), then the finish script.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::Script;
use time::OffsetDateTime;

use super::{COUNT_FUNCTIONS, RedisStore, UPDATE_TOKEN, WALLET_FUNCTIONS};
use crate::domain::issuer::IssuerId;
use crate::domain::ports::StoreError;
use crate::domain::ports::outbox::{DEAD_LETTER_MAX, EventAppend, JobNext, OutboxJob, OutboxStore};
use crate::domain::token::MerchantId;
use crate::domain::webhooks::{
    DeliveryState, EndpointId, EventId, EventRecord, WebhookEndpoint, WebhookEvent, unix_ms,
};
use crate::storage::codec::outbox::{chain_entry, decode_job, encode_job, next_attempt};

/// The consumer group every gateway instance joins.
pub const GROUP: &str = "webhook-workers";

/// Inserts an endpoint unless the merchant has `max` already.
/// KEYS: endpoints hash. ARGV: endpoint id, JSON, max.
const INSERT_ENDPOINT: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
   and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

/// Replaces an endpoint only if its stored JSON is still the one read (compare-and-set; a
/// deleted endpoint is not brought back).
/// KEYS: endpoints hash. ARGV: endpoint id, JSON read, new JSON.
const REPLACE_ENDPOINT: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"#;

/// Writes a delivery state only while the event exists, so a late write never resurrects an
/// expired event as a hash without TTL.
/// KEYS: event hash. ARGV: field, JSON.
const PUT_DELIVERY: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"#;

/// The outbox append, a Lua function shared by every script that stores an event: the plain
/// enqueue below and the token scripts that append the event of their change in the same step
/// ([`UPDATE_TOKEN_WITH_EVENT`], `redis_lifecycle.rs`). Keys travel in ARGV (like the token
/// scripts' index keys): they all carry the merchant's hash tag, except the queue on
/// standalone Redis, where slots do not exist.
///
/// `outbox_append(a)` reads ARGV from index `a`: event hash, events index, queue key, queue
/// kind (`stream`: the shared stream, standalone; `shard`: the merchant's shard sorted set,
/// Cluster), event id, event JSON, event expiry (Unix ms), index expiry (Unix ms), retention
/// cutoff id, now (Unix ms, the shard score), n, then n delivery fields, n delivery states, n
/// jobs, n chain keys (`''` when the event has no subject). It stores the event and its
/// pending deliveries, trims the merchant's index past retention, appends each job to its
/// (endpoint, subject) chain and queues it only when it is the chain's head (the chain was
/// empty); a job without a chain is queued at once.
pub(crate) const OUTBOX_FUNCTIONS: &str = r#"
local function outbox_queue(key, kind, now, job)
  if kind == 'stream' then
    redis.call('XADD', key, '*', 'j', job)
  else
    redis.call('ZADD', key, now, job)
  end
end
local function outbox_append(a)
  local ev = ARGV[a]
  local n = tonumber(ARGV[a + 10])
  redis.call('HSET', ev, 'd', ARGV[a + 5])
  for i = 1, n do
    redis.call('HSET', ev, ARGV[a + 10 + i], ARGV[a + 10 + n + i])
  end
  redis.call('PEXPIREAT', ev, ARGV[a + 6])
  redis.call('ZADD', ARGV[a + 1], 0, ARGV[a + 4])
  redis.call('ZREMRANGEBYLEX', ARGV[a + 1], '-', '(' .. ARGV[a + 8])
  redis.call('PEXPIREAT', ARGV[a + 1], ARGV[a + 7])
  for i = 1, n do
    local job = ARGV[a + 10 + 2 * n + i]
    local chain = ARGV[a + 10 + 3 * n + i]
    if chain == nil or chain == '' or redis.call('RPUSH', chain, job) == 1 then
      outbox_queue(ARGV[a + 2], ARGV[a + 3], ARGV[a + 9], job)
    end
  end
end
"#;

/// Releases a chain after its head finished (delivered or dead): pops the head if it is the
/// finished job's chain entry, and queues the new head (stream or shard, as `outbox_queue`).
/// Idempotent: a second call for the same job finds another head, or none, and does nothing.
/// Returns the job it queued, or nil. KEYS: chain. ARGV: the finished job's chain entry, queue
/// key, queue kind, now ms.
static ADVANCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
{OUTBOX_FUNCTIONS}
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[1] then return false end
redis.call('LPOP', KEYS[1])
local head = redis.call('LINDEX', KEYS[1], 0)
if not head then return false end
outbox_queue(ARGV[2], ARGV[3], ARGV[4], head)
return head
"#
    ))
});

/// How long a shard job's move marker lives ([`TAKE_SHARD_JOBS`]): longer than a move takes,
/// short enough that the sweep soon retries a move whose mover died.
const MOVE_MARKER_MS: u64 = 10_000;

/// Cluster: takes the right to move shard jobs to the shared stream. Returns the jobs of ARGV
/// 3.. that are still in the shard and whose marker (ARGV 1 .. sha1 of the job, in the
/// merchant's slot) this call set; a job another mover holds, or already moved, is left out.
/// KEYS: the merchant's shard. ARGV: marker key prefix, marker ttl ms, jobs.
static TAKE_SHARD_JOBS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for i = 3, #ARGV do
  local job = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], job)
     and redis.call('SET', ARGV[1] .. redis.sha1hex(job), '1', 'NX', 'PX', ARGV[2]) then
    table.insert(out, job)
  end
end
return out
"#,
    )
});

/// The webhook events of an issuer operation change, written by the operation scripts
/// (`redis/issuer_operations.rs`) after their compare-and-set succeeded. `issuer_events(a)`
/// reads ARGV from index `a`: mode, n, then
/// - mode `append` (standalone Redis, no slots): n `outbox_append` blocks, one after the other:
///   the events go straight to the tenant's outbox and the shared stream;
/// - mode `shard` (Cluster: the tenant's outbox is in another slot): the issuer's outbox shard
///   key (`P:{i:I}:whq`, the operation's slot), now (Unix ms, the score), n pending events (JSON,
///   [`PendingIssuerEvent`]), moved to the tenant's outbox right after the script
///   ([`RedisStore::move_issuer_events`]) or by the sweep if the writer died in between.
pub(crate) const ISSUER_EVENT_FUNCTIONS: &str = r#"
local function issuer_events(a)
  local mode = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  if mode == 'shard' then
    for i = 1, n do
      redis.call('ZADD', ARGV[a + 2], ARGV[a + 3], ARGV[a + 3 + i])
    end
  else
    local b = a + 2
    for i = 1, n do
      outbox_append(b)
      b = b + 11 + 4 * tonumber(ARGV[b + 10])
    end
  end
end
"#;

/// Cluster: the enqueue of an event an issuer operation script left in the issuer's shard,
/// skipped if the event is already stored (a mover that died after this script and before
/// removing the shard entry must not reset its deliveries when the sweep moves it again).
/// KEYS: event hash. ARGV: as `outbox_append(1)`. Returns 1 stored, 0 already there.
static ENQUEUE_ONCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{OUTBOX_FUNCTIONS}\nif redis.call('EXISTS', KEYS[1]) == 1 then return 0 end\noutbox_append(1)\nreturn 1\n"
    ))
});

/// An issuer operation's event waiting in the issuer's outbox shard (Cluster): what
/// [`EventAppend`] says, as JSON (the event id makes each member unique).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PendingIssuerEvent {
    event: WebhookEvent,
    endpoints: Vec<EndpointId>,
    retention_ms: u64,
}

/// A plain enqueue. KEYS: event hash (routes the script to the merchant's slot). ARGV: as
/// `outbox_append(1)`.
static ENQUEUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{OUTBOX_FUNCTIONS}\noutbox_append(1)\nreturn 1\n")));

/// The token compare-and-set of `redis.rs` (`UPDATE_TOKEN`, unchanged), then, only if it wrote,
/// the outbox append of the change's event: one script, so the event exists exactly when the
/// change does. Returns as `UPDATE_TOKEN`. KEYS and ARGV 1-11 as `UPDATE_TOKEN`; ARGV 12 on as
/// `outbox_append(12)`.
pub(crate) static UPDATE_TOKEN_WITH_EVENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
{COUNT_FUNCTIONS}
{WALLET_FUNCTIONS}
{OUTBOX_FUNCTIONS}
local function cas()
{UPDATE_TOKEN}
end
local r = cas()
if r == 0 then
  outbox_append(12)
end
return r
"#
    ))
});

/// Resets deliveries to pending and queues their jobs (stream or shard, as `outbox_queue`), if
/// the event still exists. KEYS: event hash. ARGV: queue key, queue kind, now ms, n, then n
/// delivery fields, n delivery states, n jobs.
static REDELIVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
{OUTBOX_FUNCTIONS}
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[4])
for i = 1, n do
  redis.call('HSET', KEYS[1], ARGV[4 + i], ARGV[4 + n + i])
end
for i = 1, n do
  outbox_queue(ARGV[1], ARGV[2], ARGV[3], ARGV[4 + 2 * n + i])
end
return 1
"#
    ))
});

/// Returns `[entry id, job, entry id, job, ...]` claimed for the consumer.
/// KEYS: outbox stream, retry zset. ARGV: group, consumer, now ms, lease ms, count.
const CLAIM: &str = r#"
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'LIMIT', 0, 256)
for _, job in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'j', job)
  redis.call('ZREM', KEYS[2], job)
end
local out = {}
local function take(entries)
  for _, e in ipairs(entries) do
    if type(e) == 'table' and type(e[2]) == 'table' then
      local job = ''
      for i = 1, #e[2], 2 do
        if e[2][i] == 'j' then job = e[2][i + 1] end
      end
      table.insert(out, e[1])
      table.insert(out, job)
    end
  end
end
local n = tonumber(ARGV[5])
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], '0-0', 'COUNT', n)
take(claimed[2])
local left = n - #out / 2
if left > 0 then
  local fresh = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left,
    'STREAMS', KEYS[1], '>')
  if fresh then take(fresh[1][2]) end
end
return out
"#;

/// Ends a claim. KEYS: outbox stream, retry zset, dead stream.
/// ARGV: group, entry id, 'done' | 'retry' | 'dead', job, retry due ms | dead reason, dead cap.
const FINISH: &str = r#"
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if acked == 0 then return 0 end
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
elseif ARGV[3] == 'dead' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'j', ARGV[4], 'r', ARGV[5])
end
return 1
"#;

struct Scripts {
    insert_endpoint: Script,
    replace_endpoint: Script,
    put_delivery: Script,
    claim: Script,
    finish: Script,
}

/// Script objects only hold the source and its SHA1; `invoke_async` loads them on `NOSCRIPT`.
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    insert_endpoint: Script::new(INSERT_ENDPOINT),
    replace_endpoint: Script::new(REPLACE_ENDPOINT),
    put_delivery: Script::new(PUT_DELIVERY),
    claim: Script::new(CLAIM),
    finish: Script::new(FINISH),
});

/// The outbox's keys (mirrored in `docs/storage.md`), built on the store's own layout: records
/// under the merchant's `P:{m:M}:` start, the queue under `P:{wh}:`.
struct Keys<'a> {
    store: &'a RedisStore,
}

impl Keys<'_> {
    fn endpoints(&self, m: &MerchantId) -> String {
        format!("{}whe", self.store.merchant_key_start(m))
    }
    fn event(&self, m: &MerchantId, e: &EventId) -> String {
        format!("{}evt:{e}", self.store.merchant_key_start(m))
    }
    fn events(&self, m: &MerchantId) -> String {
        format!("{}evts", self.store.merchant_key_start(m))
    }
    fn outbox(&self) -> String {
        self.store.global_key("{wh}:outbox")
    }
    fn retry(&self) -> String {
        self.store.global_key("{wh}:retry")
    }
    fn dead(&self) -> String {
        self.store.global_key("{wh}:dead")
    }
    /// The merchant's outbox shard (Cluster): jobs written with their event, in its slot,
    /// waiting to move to the shared stream.
    fn shard(&self, m: &MerchantId) -> String {
        format!("{}whq", self.store.merchant_key_start(m))
    }
    /// The chain of one (endpoint, subject): the jobs of its events in append order, the head
    /// first; only the head is queued. In the merchant's slot, so the token script appends to
    /// it in the same step as the change.
    fn chain(&self, m: &MerchantId, ep: &EndpointId, subject: &str) -> String {
        format!("{}whc:{ep}:{subject}", self.store.merchant_key_start(m))
    }
    /// The merchants that may have shard entries: what the sweep walks.
    fn shards(&self) -> String {
        self.store.global_key("{wh}:shards")
    }
    /// An issuer's outbox shard (Cluster): events written with an operation change, in the
    /// operation's slot, waiting to move to the issuer tenant's outbox.
    fn issuer_shard(&self, i: &IssuerId) -> String {
        format!("{}whq", self.store.issuer_key_start(i))
    }
    /// The issuers that may have shard entries: what the sweep walks too.
    fn issuer_shards(&self) -> String {
        self.store.global_key("{wh}:ishards")
    }
    /// Deployment-wide lease of the sweep, so instances do not sweep (and duplicate) at once.
    fn sweep_lease(&self) -> String {
        self.store.global_key("{wh}:sweep")
    }
}

/// Field of an event hash holding the delivery state for one endpoint.
fn delivery_field(e: &EndpointId) -> String {
    format!("s:{e}")
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// serde_json messages can quote values; keep only the kind and position.
fn corrupt(what: &str, e: &serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!(
        "{what} is not valid JSON ({:?} error at line {}, column {})",
        e.classify(),
        e.line(),
        e.column()
    ))
}

fn encode<T: serde::Serialize>(what: &str, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| corrupt(what, &e))
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| corrupt(what, &e))
}

/// Builds an event record from its hash (`d` and `s:<endpoint>` fields); `None` for a missing
/// (expired) hash.
fn event_from_hash(h: HashMap<String, String>) -> Result<Option<EventRecord>, StoreError> {
    let Some(d) = h.get("d") else {
        return Ok(None);
    };
    let event: WebhookEvent = decode("webhook event", d)?;
    let mut deliveries = Vec::new();
    for (k, v) in &h {
        if k.starts_with("s:") {
            deliveries.push(decode::<DeliveryState>("webhook delivery state", v)?);
        }
    }
    deliveries.sort_by(|a, b| a.endpoint_id.cmp(&b.endpoint_id));
    Ok(Some(EventRecord { event, deliveries }))
}

impl RedisStore {
    fn outbox_keys(&self) -> Keys<'_> {
        Keys { store: self }
    }

    /// The merchant's webhook endpoints hash, for the token script that writes only while it is
    /// empty (`UPDATE_TOKEN_IF_NO_ENDPOINTS`, same slot as the merchant's tokens).
    pub(crate) fn outbox_endpoints_key(&self, m: &MerchantId) -> String {
        self.outbox_keys().endpoints(m)
    }

    async fn hgetall(&self, key: String) -> Result<HashMap<String, String>, StoreError> {
        let mut c = redis::cmd("HGETALL");
        c.arg(key);
        self.query(c).await
    }

    /// Where a script queues jobs: the shared stream on standalone Redis (one script does it
    /// all), the merchant's shard on Cluster (the stream is in another slot).
    fn queue_target(&self, m: &MerchantId) -> (String, &'static str) {
        let k = self.outbox_keys();
        if self.is_cluster() {
            (k.shard(m), "shard")
        } else {
            (k.outbox(), "stream")
        }
    }

    /// Appends the `outbox_append` arguments of `append` to `inv`; returns the jobs it queues
    /// (for [`Self::move_appended_jobs`]).
    pub(crate) fn append_args(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
        append: &EventAppend,
    ) -> Result<Vec<String>, StoreError> {
        let k = self.outbox_keys();
        let event = &append.event;
        let m = &event.merchant_id;
        let subject = event.subject();
        let PendingArgs {
            fields,
            states,
            jobs,
        } = PendingArgs::new(m, &event.id, &append.endpoints, subject.as_deref())?;
        let chains: Vec<String> = append
            .endpoints
            .iter()
            .map(|ep| {
                subject
                    .as_deref()
                    .map_or_else(String::new, |s| k.chain(m, ep, s))
            })
            .collect();
        // Ids sort by creation time: everything below the bound is past retention.
        let cutoff = EventId::lower_bound(OffsetDateTime::now_utc() - append.retention);
        let keep = ms(append.retention);
        let (queue, kind) = self.queue_target(m);
        inv.arg(k.event(m, &event.id))
            .arg(k.events(m))
            .arg(queue)
            .arg(kind)
            .arg(event.id.as_str())
            .arg(encode("webhook event", event)?)
            .arg(unix_ms(event.created_at).saturating_add(keep))
            .arg(now_ms().saturating_add(keep))
            .arg(cutoff)
            .arg(now_ms())
            .arg(append.endpoints.len())
            .arg(&fields)
            .arg(&states)
            .arg(&jobs)
            .arg(&chains);
        Ok(jobs)
    }

    /// Cluster: notes that `m` may have shard entries, **before** any script can write one, so
    /// the sweep finds every shard a crashed writer left behind. Idempotent; nothing on
    /// standalone Redis.
    pub(crate) async fn register_outbox_shard(&self, m: &MerchantId) -> Result<(), StoreError> {
        if !self.is_cluster() {
            return Ok(());
        }
        let mut c = redis::cmd("SADD");
        c.arg(self.outbox_keys().shards()).arg(m.as_str());
        self.query_write::<i64>(c).await?;
        Ok(())
    }

    /// Cluster: moves jobs a script just put in `m`'s shard to the shared stream, then removes
    /// them from the shard. Only the jobs that are in the shard: a job that waits in its chain
    /// behind an earlier event of its subject was not queued. The event is already stored with
    /// them, so a failure here loses nothing: it is logged, and the sweep moves them after a
    /// lease. (A crash between the two steps queues a job twice; the worker skips a delivery
    /// already finished.)
    pub(crate) async fn move_appended_jobs(&self, m: &MerchantId, jobs: &[String]) {
        if !self.is_cluster() || jobs.is_empty() {
            return;
        }
        let moved = async {
            let mut c = redis::cmd("ZMSCORE");
            c.arg(self.outbox_keys().shard(m)).arg(jobs);
            let scores: Vec<Option<f64>> = self.query(c).await?;
            let queued: Vec<String> = jobs
                .iter()
                .zip(scores)
                .filter(|(_, score)| score.is_some())
                .map(|(j, _)| j.clone())
                .collect();
            if queued.is_empty() {
                return Ok(());
            }
            self.move_shard_jobs(m, &queued).await
        };
        if let Err(e) = moved.await {
            tracing::warn!(merchant_id = %m, error = %e,
                "webhook outbox: jobs left in the merchant shard; the sweep will queue them");
        }
    }

    async fn move_shard_jobs(&self, m: &MerchantId, jobs: &[String]) -> Result<(), StoreError> {
        let k = self.outbox_keys();
        // One mover per job: a chain's next head can be moved by the finisher that released it
        // and, at the same moment, by the appender whose script put it in the chain (its
        // ZMSCORE check sees it in the shard too). The stream is in another slot, so the move
        // itself cannot be atomic; taking a short-lived marker in the merchant's slot first
        // leaves one of them to move it. A mover that dies after taking the marker leaves the
        // job in the shard, and the sweep moves it once the marker has expired.
        let mut take = TAKE_SHARD_JOBS.key(k.shard(m));
        take.arg(format!("{}whmv:", self.merchant_key_start(m)))
            .arg(MOVE_MARKER_MS)
            .arg(jobs);
        let jobs: Vec<String> = self.invoke_write(take).await?;
        if jobs.is_empty() {
            return Ok(());
        }
        let jobs = &jobs[..];
        let mut p = redis::pipe();
        for job in jobs {
            p.cmd("XADD").arg(k.outbox()).arg("*").arg("j").arg(job);
        }
        let mut conn = self.writer();
        self.run_write(async move { p.query_async::<redis::Value>(&mut conn).await })
            .await?;
        let mut c = redis::cmd("ZREM");
        c.arg(k.shard(m)).arg(jobs);
        self.query_write::<i64>(c).await?;
        Ok(())
    }

    /// Cluster: at most once per `lease` in this process, and under a deployment-wide lease,
    /// queues the shard jobs older than `lease` (their writer died before moving them).
    async fn sweep_shards(&self, lease: Duration) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let now = now_ms();
        let every = ms(lease);
        let last = self.inner.outbox_swept_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < every
            || self
                .inner
                .outbox_swept_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Ok(());
        }
        let k = self.outbox_keys();
        let mut c = redis::cmd("SET");
        c.arg(k.sweep_lease())
            .arg(now)
            .arg("NX")
            .arg("PX")
            .arg(every);
        if self.query::<Option<String>>(c).await?.is_none() {
            return Ok(());
        }
        let mut c = redis::cmd("SMEMBERS");
        c.arg(k.shards());
        let merchants: Vec<String> = self.query(c).await?;
        let older_than = now.saturating_sub(every);
        for m in merchants.iter().filter_map(|m| MerchantId::parse(m)) {
            let mut c = redis::cmd("ZRANGEBYSCORE");
            c.arg(k.shard(&m))
                .arg("-inf")
                .arg(older_than)
                .arg("LIMIT")
                .arg(0)
                .arg(256);
            let jobs: Vec<String> = self.query(c).await?;
            if !jobs.is_empty() {
                tracing::info!(merchant_id = %m, jobs = jobs.len(),
                    "webhook outbox: queueing jobs left in a merchant shard");
                self.move_shard_jobs(&m, &jobs).await?;
            }
        }
        let mut c = redis::cmd("SMEMBERS");
        c.arg(k.issuer_shards());
        let issuers: Vec<String> = self.query(c).await?;
        for i in issuers.iter().filter_map(|i| IssuerId::parse(i)) {
            let mut c = redis::cmd("ZRANGEBYSCORE");
            c.arg(k.issuer_shard(&i))
                .arg("-inf")
                .arg(older_than)
                .arg("LIMIT")
                .arg(0)
                .arg(256);
            let pending: Vec<String> = self.query(c).await?;
            if !pending.is_empty() {
                tracing::info!(issuer_id = %i, events = pending.len(),
                    "webhook outbox: storing events left in an issuer shard");
                self.move_issuer_shard_events(&i, &pending).await?;
            }
        }
        Ok(())
    }

    /// The `issuer_events` arguments for `events` of an operation change of `issuer` (see
    /// [`ISSUER_EVENT_FUNCTIONS`]); returns the shard members written on Cluster (for
    /// [`Self::move_issuer_events`]), nothing on standalone Redis (the script stored the events
    /// and queued their jobs itself).
    pub(crate) fn issuer_event_args(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
        issuer: &IssuerId,
        events: &[EventAppend],
    ) -> Result<Vec<String>, StoreError> {
        if self.is_cluster() {
            let mut members = Vec::with_capacity(events.len());
            for e in events {
                members.push(encode(
                    "pending issuer event",
                    &PendingIssuerEvent {
                        event: e.event.clone(),
                        endpoints: e.endpoints.clone(),
                        retention_ms: ms(e.retention),
                    },
                )?);
            }
            inv.arg("shard")
                .arg(events.len())
                .arg(self.outbox_keys().issuer_shard(issuer))
                .arg(now_ms())
                .arg(&members);
            Ok(members)
        } else {
            inv.arg("append").arg(events.len());
            for e in events {
                self.append_args(inv, e)?;
            }
            Ok(Vec::new())
        }
    }

    /// Cluster: notes that `issuer` may have shard entries **before** a script can write one,
    /// so the sweep finds every shard a crashed writer left behind. Nothing on standalone.
    pub(crate) async fn register_issuer_outbox_shard(
        &self,
        issuer: &IssuerId,
    ) -> Result<(), StoreError> {
        if !self.is_cluster() {
            return Ok(());
        }
        let mut c = redis::cmd("SADD");
        c.arg(self.outbox_keys().issuer_shards())
            .arg(issuer.as_str());
        self.query_write::<i64>(c).await?;
        Ok(())
    }

    /// Cluster: stores the events an operation script just left in `issuer`'s shard in the
    /// tenant's outbox (event, deliveries, jobs), then removes them from the shard. The events
    /// are durable in the shard already, so a failure here loses nothing: it is logged, and the
    /// sweep moves them after a lease.
    pub(crate) async fn move_issuer_events(&self, issuer: &IssuerId, members: &[String]) {
        if !self.is_cluster() || members.is_empty() {
            return;
        }
        if let Err(e) = self.move_issuer_shard_events(issuer, members).await {
            tracing::warn!(issuer_id = %issuer, error = %e,
                "webhook outbox: events left in the issuer shard; the sweep will store them");
        }
    }

    async fn move_issuer_shard_events(
        &self,
        issuer: &IssuerId,
        members: &[String],
    ) -> Result<(), StoreError> {
        let k = self.outbox_keys();
        for member in members {
            let pending: PendingIssuerEvent = decode("pending issuer event", member)?;
            let tenant = pending.event.merchant_id.clone();
            let append = EventAppend {
                event: pending.event,
                endpoints: pending.endpoints,
                retention: Duration::from_millis(pending.retention_ms),
            };
            self.register_outbox_shard(&tenant).await?;
            let mut inv = ENQUEUE_ONCE.key(k.event(&tenant, &append.event.id));
            let jobs = self.append_args(&mut inv, &append)?;
            if self.invoke_write::<i64>(inv).await? == 1 {
                self.move_appended_jobs(&tenant, &jobs).await;
            }
            let mut c = redis::cmd("ZREM");
            c.arg(k.issuer_shard(issuer)).arg(member);
            self.query_write::<i64>(c).await?;
        }
        Ok(())
    }
}

/// Script arguments for pending deliveries of one event: per endpoint, the hash field, the
/// `pending` state and a job with 0 attempts (same order in all three).
struct PendingArgs {
    fields: Vec<String>,
    states: Vec<String>,
    jobs: Vec<String>,
}

impl PendingArgs {
    fn new(
        merchant: &MerchantId,
        event: &EventId,
        endpoints: &[EndpointId],
        subject: Option<&str>,
    ) -> Result<PendingArgs, StoreError> {
        let mut a = PendingArgs {
            fields: Vec::with_capacity(endpoints.len()),
            states: Vec::with_capacity(endpoints.len()),
            jobs: Vec::with_capacity(endpoints.len()),
        };
        for ep in endpoints {
            a.fields.push(delivery_field(ep));
            a.states.push(encode(
                "webhook delivery state",
                &DeliveryState::pending(ep.clone()),
            )?);
            a.jobs.push(encode_job(merchant, event, ep, 0, subject));
        }
        Ok(a)
    }
}

#[async_trait]
impl OutboxStore for RedisStore {
    async fn insert_endpoint(&self, ep: &WebhookEndpoint, max: usize) -> Result<bool, StoreError> {
        let json = encode("webhook endpoint", ep)?;
        let mut inv = SCRIPTS
            .insert_endpoint
            .key(self.outbox_keys().endpoints(&ep.merchant_id));
        inv.arg(ep.id.as_str()).arg(json).arg(max);
        Ok(self.invoke_write::<i64>(inv).await? == 1)
    }

    async fn list_endpoints(
        &self,
        merchant: &MerchantId,
    ) -> Result<Vec<WebhookEndpoint>, StoreError> {
        let mut c = redis::cmd("HVALS");
        c.arg(self.outbox_keys().endpoints(merchant));
        let vals: Vec<String> = self.query(c).await?;
        vals.iter().map(|v| decode("webhook endpoint", v)).collect()
    }

    async fn get_endpoint(
        &self,
        merchant: &MerchantId,
        id: &EndpointId,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        let mut c = redis::cmd("HGET");
        c.arg(self.outbox_keys().endpoints(merchant))
            .arg(id.as_str());
        let v: Option<String> = self.query(c).await?;
        v.map(|v| decode("webhook endpoint", &v)).transpose()
    }

    async fn replace_endpoint(
        &self,
        expected: &WebhookEndpoint,
        new: &WebhookEndpoint,
    ) -> Result<bool, StoreError> {
        if expected.merchant_id != new.merchant_id || expected.id != new.id {
            return Ok(false);
        }
        let key = self.outbox_keys().endpoints(&expected.merchant_id);
        // Compared decoded in Rust (a record written before a field existed encodes
        // differently but is the same endpoint), then the exact bytes read are the script's
        // compare-and-set condition.
        let mut c = redis::cmd("HGET");
        c.arg(&key).arg(expected.id.as_str());
        let Some(raw) = self.query::<Option<String>>(c).await? else {
            return Ok(false);
        };
        if decode::<WebhookEndpoint>("webhook endpoint", &raw)? != *expected {
            return Ok(false);
        }
        let json = encode("webhook endpoint", new)?;
        let mut inv = SCRIPTS.replace_endpoint.key(key);
        inv.arg(expected.id.as_str()).arg(raw).arg(json);
        Ok(self.invoke::<i64>(inv).await? == 1)
    }

    async fn delete_endpoint(
        &self,
        merchant: &MerchantId,
        id: &EndpointId,
    ) -> Result<bool, StoreError> {
        let mut c = redis::cmd("HDEL");
        c.arg(self.outbox_keys().endpoints(merchant))
            .arg(id.as_str());
        Ok(self.query_write::<i64>(c).await? == 1)
    }

    async fn enqueue_event(
        &self,
        event: &WebhookEvent,
        endpoints: &[EndpointId],
        retention: Duration,
    ) -> Result<(), StoreError> {
        let m = &event.merchant_id;
        let append = EventAppend {
            event: event.clone(),
            endpoints: endpoints.to_vec(),
            retention,
        };
        self.register_outbox_shard(m).await?;
        let mut inv = ENQUEUE.key(self.outbox_keys().event(m, &event.id));
        let jobs = self.append_args(&mut inv, &append)?;
        self.invoke_write::<i64>(inv).await?;
        self.move_appended_jobs(m, &jobs).await;
        Ok(())
    }

    async fn get_event(
        &self,
        merchant: &MerchantId,
        id: &EventId,
    ) -> Result<Option<EventRecord>, StoreError> {
        let h = self.hgetall(self.outbox_keys().event(merchant, id)).await?;
        event_from_hash(h)
    }

    async fn list_events(
        &self,
        merchant: &MerchantId,
        before: Option<&EventId>,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let k = self.outbox_keys();
        let max = before.map_or_else(|| "+".to_owned(), |b| format!("({b}"));
        let mut c = redis::cmd("ZREVRANGEBYLEX");
        c.arg(k.events(merchant))
            .arg(max)
            .arg("-")
            .arg("LIMIT")
            .arg(0)
            .arg(limit);
        let ids: Vec<String> = self.query(c).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(id) = EventId::parse(&id) else {
                continue;
            };
            // An index entry whose event expired is skipped; the next enqueue trims it.
            if let Some(rec) = event_from_hash(self.hgetall(k.event(merchant, &id)).await?)? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    async fn put_delivery(
        &self,
        merchant: &MerchantId,
        event: &EventId,
        state: &DeliveryState,
    ) -> Result<(), StoreError> {
        let mut inv = SCRIPTS
            .put_delivery
            .key(self.outbox_keys().event(merchant, event));
        inv.arg(delivery_field(&state.endpoint_id))
            .arg(encode("webhook delivery state", state)?);
        self.invoke::<i64>(inv).await?;
        Ok(())
    }

    async fn redeliver(
        &self,
        merchant: &MerchantId,
        event: &EventId,
        endpoints: &[EndpointId],
    ) -> Result<(), StoreError> {
        if endpoints.is_empty() {
            return Ok(());
        }
        let k = self.outbox_keys();
        // A redelivery is sent out of band: no chain (it neither waits for the subject's
        // other events nor holds them up).
        let PendingArgs {
            fields,
            states,
            jobs,
        } = PendingArgs::new(merchant, event, endpoints, None)?;
        self.register_outbox_shard(merchant).await?;
        let (queue, kind) = self.queue_target(merchant);
        let mut inv = REDELIVER.key(k.event(merchant, event));
        inv.arg(queue)
            .arg(kind)
            .arg(now_ms())
            .arg(endpoints.len())
            .arg(&fields)
            .arg(&states)
            .arg(&jobs);
        if self.invoke_write::<i64>(inv).await? == 1 {
            self.move_appended_jobs(merchant, &jobs).await;
        }
        Ok(())
    }

    async fn claim_jobs(
        &self,
        consumer: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxJob>, StoreError> {
        if self.is_cluster()
            && let Err(e) = self.sweep_shards(lease).await
        {
            tracing::warn!(error = %e, "webhook outbox: shard sweep failed; retried next lease");
        }
        let k = self.outbox_keys();
        let mut inv = SCRIPTS.claim.key(k.outbox());
        inv.key(k.retry())
            .arg(GROUP)
            .arg(consumer)
            .arg(now_ms())
            .arg(ms(lease))
            .arg(max.max(1));
        let flat: Vec<String> = self.invoke(inv).await?;
        let mut jobs = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            let [entry, job] = pair else { continue };
            match decode_job(job, entry.clone()) {
                Some(j) => jobs.push(j),
                None => {
                    // Not ours to interpret: drop it rather than claim it forever.
                    tracing::warn!(entry = %entry, "webhook outbox: dropping an unreadable job");
                    self.finish_entry(entry, "done", String::new(), String::new())
                        .await?;
                }
            }
        }
        Ok(jobs)
    }

    async fn finish_job(&self, job: &OutboxJob, next: JobNext) -> Result<bool, StoreError> {
        if matches!(next, JobNext::Done | JobNext::Dead { .. }) {
            // Before the ack: once acked, nothing would bring this job back to release its
            // chain if the process died now; unacked, whoever takes it over releases it.
            self.advance_chain(job).await?;
        }
        match next {
            JobNext::Done => {
                self.finish_entry(&job.handle, "done", String::new(), String::new())
                    .await
            }
            JobNext::Retry { at_ms } => {
                self.finish_entry(&job.handle, "retry", next_attempt(job), at_ms.to_string())
                    .await
            }
            JobNext::Dead { reason } => {
                self.finish_entry(&job.handle, "dead", next_attempt(job), reason)
                    .await
            }
        }
    }
}

impl RedisStore {
    /// Releases the chain of a finished job (see [`ADVANCE`]); on Cluster the new head lands
    /// in the merchant's shard and is moved to the stream like an appended job.
    async fn advance_chain(&self, job: &OutboxJob) -> Result<(), StoreError> {
        let (Some(subject), Some(entry)) = (job.subject.as_deref(), chain_entry(job)) else {
            return Ok(());
        };
        let k = self.outbox_keys();
        let (queue, kind) = self.queue_target(&job.merchant);
        let mut inv = ADVANCE.key(k.chain(&job.merchant, &job.endpoint, subject));
        inv.arg(entry).arg(queue).arg(kind).arg(now_ms());
        let queued: Option<String> = self.invoke_write(inv).await?;
        if let Some(head) = queued {
            self.move_appended_jobs(&job.merchant, std::slice::from_ref(&head))
                .await;
        }
        Ok(())
    }

    /// Runs the finish script on one stream entry: `action` with the job string to schedule and
    /// the retry due time or dead-letter reason.
    async fn finish_entry(
        &self,
        entry: &str,
        action: &str,
        job: String,
        arg: String,
    ) -> Result<bool, StoreError> {
        let k = self.outbox_keys();
        let mut inv = SCRIPTS.finish.key(k.outbox());
        inv.key(k.retry())
            .key(k.dead())
            .arg(GROUP)
            .arg(entry)
            .arg(action)
            .arg(job)
            .arg(arg)
            .arg(DEAD_LETTER_MAX);
        Ok(self.invoke::<i64>(inv).await? == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_event_hash_is_corrupt_and_missing_is_none() {
        assert!(matches!(event_from_hash(HashMap::new()), Ok(None)));
        let mut h = HashMap::new();
        h.insert("d".to_owned(), "{not json".to_owned());
        assert!(matches!(event_from_hash(h), Err(StoreError::Corrupt(_))));
    }
}
