//! Redis implementation of the token store (standalone or Cluster).
//!
//! Every token operation is one Lua script (one round trip, atomic on the server), sent as
//! `EVALSHA` with an automatic `SCRIPT LOAD` fallback when the server lost its script cache.
//! All keys of one merchant share the hash tag `{m:<merchant id>}`, so each script touches a
//! single Cluster slot; merchant-level indexes are global keys with a slot each. The full layout is
//! in `docs/storage.md`.
//!
//! Scripts read index entries and then the record they point at by building its key from a
//! prefix passed in `ARGV`. Those keys are not declared in `KEYS`, which Redis tolerates as long as
//! they hash to the slot of the declared keys: the shared hash tag guarantees exactly that.
//!
//! # Layout
//!
//! This file holds the connection (standalone or Cluster), the script runner and the token,
//! merchant and idempotency operations; the other aggregates have a file each: [`apikeys`],
//! [`audit`], [`client_certs`], [`counts`], [`lifecycle`], [`outbox`], and the wallet index
//! backfill [`wallet_index`]. [`durability`] confirms writes on replicas (`WAIT` / `WAITAOF`).
//!
//! # Reads and writes
//!
//! Writes the API acknowledges go through [`RedisStore::writer`] and [`RedisStore::run_write`]
//! (or [`RedisStore::query_write`] / [`RedisStore::invoke_write`]), the one place where
//! `storage.redis_durability` applies; everything else (reads, background bookkeeping such as
//! schedules, leases, `last used` stamps and the wallet index backfill) uses the shared
//! connection and never waits.

mod apikeys;
mod audit;
mod client_certs;
mod counts;
mod durability;
mod issuer_cards;
mod issuer_operations;
mod issuers;
mod lifecycle;
mod outbox;
mod production_orders;
mod ratelimit;
mod token_cache;
mod wallet_index;

pub use durability::Durability;
use lifecycle::CHECK_FUNCTIONS;
use outbox::OUTBOX_FUNCTIONS;
pub use token_cache::TokenCacheStats;
use token_cache::{Cached, Lookup};

use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Script, ServerErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::domain::merchant::{ApiKeyHash, Merchant};
use crate::domain::ports::outbox::EventAppend;
use crate::domain::ports::{
    CheckAt, IdempotencyBegin, InsertOutcome, StoreError, StoredResponse, TokenStore,
};
use crate::domain::token::{MerchantId, TokenId, TokenRecord, TokenStatus};
use crate::domain::wallet::{WalletKey, WalletPage};

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/[db]`, used when `cluster_nodes` is empty.
    /// (`rediss://` needs the redis crate's TLS feature, see `docs/storage.md`.)
    pub url: String,
    /// Seed nodes (`host:port` or URLs). Non-empty selects Redis Cluster mode.
    pub cluster_nodes: Vec<String>,
    /// First component of every key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Bound on each TCP connect (and on the initial connection as a whole).
    pub connect_timeout: Duration,
    /// Bound on each operation, retries included: past it the store answers `Unavailable`
    /// rather than letting API requests pile up behind a dead server.
    pub response_timeout: Duration,
    /// What an acknowledged write must reach (`storage.redis_durability`); writes that wait get
    /// `response_timeout` plus the durability timeout.
    pub durability: Durability,
    /// Bound of the in-process token cache (`storage.redis_token_cache_entries`, records); 0
    /// turns it off. Standalone Redis only: ignored on Cluster (see `token_cache`).
    pub token_cache_entries: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".into(),
            cluster_nodes: Vec::new(),
            key_prefix: "tg".into(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(1),
            durability: Durability::None,
            // Off for a store built in code; the gateway's configuration turns it on.
            token_cache_entries: 0,
        }
    }
}

/// URLs may carry a password: print only what follows the credentials.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self.cluster_nodes.iter().map(|n| redact_url(n)).collect();
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("cluster_nodes", &nodes)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("durability", &self.durability)
            .field("token_cache_entries", &self.token_cache_entries)
            .finish()
    }
}

/// The prefix becomes part of every key: braces would move the hash tag, separators and spaces
/// would make keys ambiguous.
fn valid_prefix(p: &str) -> bool {
    (1..=32).contains(&p.len())
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

// --- connection --------------------------------------------------------------------------------

/// One handle over both deployment shapes; both are cheap to clone (shared multiplexed
/// connections inside).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Maps a client error to the store's vocabulary. Only the error category goes into the text:
/// server replies can echo arguments, and arguments carry records.
fn map_err(e: &RedisError) -> StoreError {
    if e.code() == Some(durability::NOT_DURABLE) {
        // Our own error (`durability`): the detail holds counts only.
        return StoreError::Unavailable(format!(
            "write applied on the primary but not confirmed durable: {}",
            e.detail().unwrap_or("no detail")
        ));
    }
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ResponseError) if e.code() == Some("WRONGTYPE") => {
            StoreError::Corrupt("a key holds a value of an unexpected Redis type".into())
        }
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            StoreError::Corrupt(format!("unexpected reply from redis ({})", e.category()))
        }
        _ if e.is_timeout() => StoreError::Unavailable("redis did not answer in time".into()),
        _ if e.is_connection_refusal() => {
            StoreError::Unavailable("redis refused the connection".into())
        }
        ErrorKind::Io => StoreError::Unavailable("redis connection failed".into()),
        ErrorKind::Server(ServerErrorKind::BusyLoading) => {
            StoreError::Unavailable("redis is loading its dataset".into())
        }
        ErrorKind::Server(ServerErrorKind::ClusterDown)
        | ErrorKind::Server(ServerErrorKind::MasterDown)
        | ErrorKind::Server(ServerErrorKind::TryAgain)
        | ErrorKind::ClusterConnectionNotFound => {
            StoreError::Unavailable(format!("redis cluster not serving ({})", e.category()))
        }
        _ => StoreError::Unavailable(format!("redis error ({})", e.category())),
    }
}

/// Error text of serde_json names the kind and position of a problem; its message can quote the
/// offending value, so only the kind and position are kept.
fn corrupt(what: &str, e: &serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!(
        "{what} is not valid JSON ({:?} error at line {}, column {})",
        e.classify(),
        e.line(),
        e.column()
    ))
}

fn encode<T: Serialize>(what: &str, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| corrupt(what, &e))
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| corrupt(what, &e))
}

/// [`decode`] straight from a reply's bytes (no `String` copy, no UTF-8 pass of its own).
fn decode_bytes<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| corrupt(what, &e))
}

// --- key layout --------------------------------------------------------------------------------

/// Builds every key; the one place that knows the layout (mirrored in `docs/storage.md`).
struct Keys {
    prefix: String,
}

impl Keys {
    /// Common start of a merchant's keys: the hash tag puts all of them in one slot.
    fn merchant_scope(&self, scope: &str) -> String {
        format!("{}:{{m:{scope}}}:", self.prefix)
    }
    /// `merchant_scope(m) + kind + rest` in one allocation of the right size. The keys of a
    /// GET and a dedup are built per request; nested `format!`s cost three allocations and
    /// their growth each (about 1-2% of a request's CPU in the round 3 profile).
    fn merchant_key(&self, m: &MerchantId, kind: &str, rest: &str) -> String {
        let scope = m.as_str();
        let mut k = String::with_capacity(
            self.prefix.len() + scope.len() + kind.len() + rest.len() + ":{m:}:".len(),
        );
        k.push_str(&self.prefix);
        k.push_str(":{m:");
        k.push_str(scope);
        k.push_str("}:");
        k.push_str(kind);
        k.push_str(rest);
        k
    }
    fn token_prefix(&self, m: &MerchantId) -> String {
        self.merchant_key(m, "tok:", "")
    }
    fn fp_prefix(&self, m: &MerchantId) -> String {
        self.merchant_key(m, "fp:", "")
    }
    fn d1_prefix(&self, m: &MerchantId) -> String {
        self.merchant_key(m, "d1:", "")
    }
    fn token(&self, m: &MerchantId, id: &TokenId) -> String {
        self.merchant_key(m, "tok:", id.as_str())
    }
    fn fingerprint(&self, m: &MerchantId, fp: &str) -> String {
        self.merchant_key(m, "fp:", fp)
    }
    fn d1_token(&self, m: &MerchantId, d1: &str) -> String {
        self.merchant_key(m, "d1:", d1)
    }
    fn idempotency(&self, scope: &str, key: &str) -> String {
        format!("{}idem:{key}", self.merchant_scope(scope))
    }
    /// Start of a merchant record key; the id and closing brace follow.
    fn merchant_open(&self) -> String {
        format!("{}:merchant:{{", self.prefix)
    }
    fn merchant(&self, id: &str) -> String {
        format!("{}{id}}}", self.merchant_open())
    }
    fn api_key(&self, hash: &ApiKeyHash) -> String {
        format!("{}:apikey:{{{}}}", self.prefix, hash.0)
    }
    fn d1_merchant(&self, d1_id: &str) -> String {
        format!("{}:d1m:{{{d1_id}}}", self.prefix)
    }
    /// The merchant's token counts by status (in the merchant's slot, so every token script
    /// adjusts them in its own atomic step).
    fn token_counts(&self, m: &MerchantId) -> String {
        format!("{}stats", self.merchant_scope(m.as_str()))
    }
    /// Every merchant id, for summing the per-merchant counts (its own slot on Cluster).
    fn merchant_set(&self) -> String {
        format!("{}:{{merchants}}:ids", self.prefix)
    }
    /// The wallet index of one customer of `m`, every status (`P:{m:M}:cust:<sha256 hex>`); the
    /// per-status indexes append `:<status label>`. The reference is hashed: it is free text
    /// (`:` in it would make keys ambiguous) and has no business in key names.
    fn wallet(&self, m: &MerchantId, customer: &str) -> String {
        use sha2::{Digest, Sha256};
        let digest = hex::encode(Sha256::digest(customer.as_bytes()));
        format!("{}cust:{digest}", self.merchant_scope(m.as_str()))
    }
    /// The wallet index of `rec`'s customer, or `""` when it has none (the scripts' "no index").
    fn wallet_of(&self, rec: &TokenRecord) -> String {
        rec.customer_reference
            .as_deref()
            .map_or_else(String::new, |c| self.wallet(&rec.merchant_id, c))
    }
}

// --- scripts -----------------------------------------------------------------------------------

/// Shared by the token scripts: the per-merchant counts by status (`P:{m:M}:stats`, see
/// `docs/storage.md`). A token hash carries `c = '1'` once it is included in the counts; a
/// record written before counting existed has no `c` and is ignored until the one-time backfill
/// (`COUNT_TOKEN`) or its next update counts it. Statuses outside the known set are counted as
/// `OTHER`, so a status D1 invents cannot grow the hash without bound (same labels as
/// `TokenStatus::label`).
pub(crate) const COUNT_FUNCTIONS: &str = r#"
local KNOWN = {PENDING = true, ACTIVE = true, SUSPENDED = true, INACTIVE = true, EXPIRED = true, DELETED = true}
local function count_label(s)
  if KNOWN[s] then return s end
  return 'OTHER'
end
local function bump(key, status, n)
  local field = count_label(status)
  if redis.call('HINCRBY', key, field, n) == 0 then
    redis.call('HDEL', key, field)
  end
end
"#;

/// Shared by the token scripts (after [`COUNT_FUNCTIONS`], whose `count_label` it uses): the
/// customer wallet indexes (`docs/storage.md`, "Customer wallets"). A token hash records its
/// wallet index key in `w` (`''`: no customer) and its position in `o` (`WalletKey`), so a
/// later write or removal finds the entries to move without parsing the record. Sorted sets
/// with every score 0, ordered by member: `w` holds every status, `w .. ':' .. label` one.
/// A hash without `w` was written before the index existed: nothing to remove.
pub(crate) const WALLET_FUNCTIONS: &str = r#"
local function wallet_drop(base, status, pos)
  if base and base ~= '' and pos and pos ~= '' then
    redis.call('ZREM', base, pos)
    if status then
      redis.call('ZREM', base .. ':' .. count_label(status), pos)
    end
  end
end
local function wallet_add(base, status, pos)
  if base ~= '' then
    redis.call('ZADD', base, 0, pos)
    redis.call('ZADD', base .. ':' .. count_label(status), 0, pos)
  end
end
"#;

/// Inserts a token unless a live token holds one of its fingerprints; returns the winner's JSON
/// or nil. KEYS: token, fingerprint index of `fingerprints.pan`[, d1 index]. ARGV: id, version,
/// status, the record's dedup index entries separated by spaces (`pan` first, then `previous`,
/// kept in field `f`), d1 id or '', record JSON, token key prefix, counts key, wallet index or
/// '', wallet position, fingerprint key prefix, then the four `check_write` arguments
/// (`lifecycle::CHECK_FUNCTIONS`: the reservation's reconciliation check, written only when the
/// token is). Follows [`COUNT_FUNCTIONS`], [`WALLET_FUNCTIONS`] and `CHECK_FUNCTIONS`.
const INSERT_TOKEN: &str = r#"
for fp in string.gmatch(ARGV[4], '%S+') do
  local cur = redis.call('GET', ARGV[11] .. fp)
  if cur then
    local ex = redis.call('HMGET', ARGV[7] .. cur, 's', 'd')
    if ex[2] and ex[1] ~= 'DELETED' then
      return ex[2]
    end
  end
end
local prev = redis.call('HMGET', KEYS[1], 's', 'c', 'w', 'o')
if prev[1] and prev[2] == '1' then
  bump(ARGV[8], prev[1], -1)
end
wallet_drop(prev[3], prev[1], prev[4])
redis.call('HSET', KEYS[1], 'v', ARGV[2], 's', ARGV[3], 'f', ARGV[4], 'n', ARGV[5], 'd', ARGV[6], 'c', '1', 'w', ARGV[9], 'o', ARGV[10])
bump(ARGV[8], ARGV[3], 1)
wallet_add(ARGV[9], ARGV[3], ARGV[10])
for fp in string.gmatch(ARGV[4], '%S+') do
  redis.call('SET', ARGV[11] .. fp, ARGV[1])
end
if KEYS[3] then
  redis.call('SET', KEYS[3], ARGV[1])
end
check_write(12)
return false
"#;

/// Compare-and-set on the version. Returns 0 written, 1 missing, 2 version conflict.
/// KEYS: token, fingerprint index of `fingerprints.pan`[, new d1 index]. ARGV: expected version,
/// new version, status, dedup index entries separated by spaces (as `INSERT_TOKEN`), d1 id or
/// '', record JSON, token id, d1 key prefix, counts key, wallet index or '', wallet position.
/// Needs [`COUNT_FUNCTIONS`] and [`WALLET_FUNCTIONS`] before it. (`redis_lifecycle` and
/// `redis_outbox` wrap this script, ARGV 12 on being theirs: so the fingerprint and token key
/// prefixes are taken from KEYS 2 and 1, which end with the first entry and the token id.)
///
/// The index follows the record's entries: one the record no longer lists is removed (if it
/// still points here), a new one is claimed unless a live token holds it (a fingerprint-key
/// re-index, `domain::fp_reindex`); a tombstone (`DELETED`) keeps none.
pub(crate) const UPDATE_TOKEN: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'v', 'n', 's', 'c', 'w', 'o', 'f')
if not cur[1] then
  return 1
end
if cur[1] ~= ARGV[1] then
  return 2
end
local fp_prefix = string.sub(KEYS[2], 1, #KEYS[2] - #(string.match(ARGV[4], '%S+') or ''))
local tok_prefix = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[7])
local had, keep = {}, {}
for fp in string.gmatch(cur[7] or '', '%S+') do
  had[fp] = true
end
if ARGV[3] ~= 'DELETED' then
  for fp in string.gmatch(ARGV[4], '%S+') do
    keep[fp] = true
  end
end
local function fp_drop(fp)
  local k = fp_prefix .. fp
  if redis.call('GET', k) == ARGV[7] then
    redis.call('DEL', k)
  end
end
for fp in pairs(had) do
  if not keep[fp] then
    fp_drop(fp)
  end
end
for fp in string.gmatch(ARGV[4], '%S+') do
  if not keep[fp] then
    fp_drop(fp)
  elseif not had[fp] then
    local k = fp_prefix .. fp
    local holder = redis.call('GET', k)
    local live = holder and holder ~= ARGV[7] and redis.call('HGET', tok_prefix .. holder, 's')
    if not live or live == 'DELETED' then
      redis.call('SET', k, ARGV[7])
    end
  end
end
local old = cur[2]
if old and old ~= '' and old ~= ARGV[5] then
  local k = ARGV[8] .. old
  if redis.call('GET', k) == ARGV[7] then
    redis.call('DEL', k)
  end
end
if KEYS[3] then
  redis.call('SET', KEYS[3], ARGV[7])
end
if cur[4] == '1' then
  if cur[3] ~= ARGV[3] then
    bump(ARGV[9], cur[3], -1)
    bump(ARGV[9], ARGV[3], 1)
  end
else
  bump(ARGV[9], ARGV[3], 1)
end
wallet_drop(cur[5], cur[3], cur[6])
wallet_add(ARGV[10], ARGV[3], ARGV[11])
redis.call('HSET', KEYS[1], 'v', ARGV[2], 's', ARGV[3], 'f', ARGV[4], 'n', ARGV[5], 'd', ARGV[6], 'c', '1', 'w', ARGV[10], 'o', ARGV[11])
return 0
"#;

/// Deletes a token and the index entries that still point at it (every dedup entry in `f`,
/// wallet entries included). KEYS: token. ARGV: token id, fingerprint key prefix, d1 key prefix,
/// counts key.
const REMOVE_TOKEN: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'f', 'n', 's', 'c', 'w', 'o')
if cur[3] and cur[4] == '1' then
  bump(ARGV[4], cur[3], -1)
end
wallet_drop(cur[5], cur[3], cur[6])
for fp in string.gmatch(cur[1] or '', '%S+') do
  local k = ARGV[2] .. fp
  if redis.call('GET', k) == ARGV[1] then
    redis.call('DEL', k)
  end
end
if cur[2] and cur[2] ~= '' then
  local k = ARGV[3] .. cur[2]
  if redis.call('GET', k) == ARGV[1] then
    redis.call('DEL', k)
  end
end
redis.call('DEL', KEYS[1])
return 0
"#;

/// The backfill of the counts for one token written before they existed: counts it (once) at
/// its current status. KEYS: token. ARGV: counts key. Returns 1 when it counted the token.
pub(crate) const COUNT_TOKEN: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 's', 'c')
if cur[1] and cur[2] ~= '1' then
  bump(ARGV[1], cur[1], 1)
  redis.call('HSET', KEYS[1], 'c', '1')
  return 1
end
return 0
"#;

/// The wallet index backfill for one token stored before the index existed (no `w`): adds its
/// entries at its current status and records `w` / `o`, as `insert_token` would have. Reads the
/// token in the same step, so a token removed meanwhile is not indexed again (no entry without
/// a record) and one written meanwhile (it has `w`: the write indexed it) is left alone.
/// KEYS: token. ARGV: the version the caller read the record at, wallet index or '' (no
/// customer), wallet position. Returns 1 indexed, 0 nothing to do, 2 the record changed since
/// it was read (an instance of an older build wrote it; read it again). Follows
/// [`COUNT_FUNCTIONS`] and [`WALLET_FUNCTIONS`].
pub(crate) const WALLET_INDEX_TOKEN: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'v', 's', 'w')
if not cur[1] or cur[3] then
  return 0
end
if cur[1] ~= ARGV[1] then
  return 2
end
wallet_add(ARGV[2], cur[2] or '', ARGV[3])
redis.call('HSET', KEYS[1], 'w', ARGV[2], 'o', ARGV[3])
return 1
"#;

/// One page of a wallet index, newest first, with each entry's record (`''` if it is gone).
/// KEYS: wallet index (every status, or one). ARGV: `+` or `(<position>` (exclusive start),
/// entries wanted, token key prefix. Returns position, record, position, record, ...
const WALLET_PAGE: &str = r#"
local pos = redis.call('ZREVRANGEBYLEX', KEYS[1], ARGV[1], '-', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, p in ipairs(pos) do
  local id = string.sub(p, string.find(p, '-', 1, true) + 1)
  out[#out + 1] = p
  out[#out + 1] = redis.call('HGET', ARGV[3] .. id, 'd') or ''
end
return out
"#;

/// Index lookup then record read. KEYS: index. ARGV: token key prefix, '1' to skip tombstones.
const FIND_TOKEN: &str = r#"
local id = redis.call('GET', KEYS[1])
if not id then
  return false
end
local r = redis.call('HMGET', ARGV[1] .. id, 's', 'd')
if not r[2] then
  return false
end
if ARGV[2] == '1' and r[1] == 'DELETED' then
  return false
end
return r[2]
"#;

/// Claims an idempotency key or returns what holds it. KEYS: key. ARGV: in-flight JSON, ttl ms.
const IDEM_BEGIN: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  return cur
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"#;

/// Deletes an idempotency key only while it is an in-flight claim. KEYS: key.
const IDEM_ABORT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then
  return 0
end
local ok, v = pcall(cjson.decode, cur)
if ok and type(v) == 'table' and v['state'] == 'inflight' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// Index then record, for standalone Redis only: the record key is in another slot, which a
/// Cluster would refuse. KEYS: index. ARGV: merchant key start.
const MERCHANT_BY_INDEX: &str = r#"
local id = redis.call('GET', KEYS[1])
if not id then
  return false
end
return redis.call('GET', ARGV[1] .. id .. '}')
"#;

/// A merchant's record and index keys, then its id into the merchant set, in one atomic step
/// (standalone only: the keys are in different slots). KEYS: record, [d1 index,] API key index,
/// merchant set. ARGV: one value per key, same order. A script rather than `MULTI`: a
/// confirmed write (`durability`) cannot be a transaction.
const INSERT_MERCHANT: &str = r#"
for i = 1, #KEYS - 1 do
  redis.call('SET', KEYS[i], ARGV[i])
end
redis.call('SADD', KEYS[#KEYS], ARGV[#KEYS])
return 0
"#;

/// [`UPDATE_TOKEN`] with the token's reconciliation check (ARGV 12-15, `check_write`) and,
/// when ARGV 16 is given, the change's webhook event (`outbox_append(16)`), both written only
/// when the compare-and-set succeeds: the activation of a new card, its `token.activated`
/// event and its next check are one atomic step. Returns as `UPDATE_TOKEN`.
static UPDATE_TOKEN_CHECKED: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(&format!(
        r#"
{COUNT_FUNCTIONS}
{WALLET_FUNCTIONS}
{OUTBOX_FUNCTIONS}
{CHECK_FUNCTIONS}
local function cas()
{UPDATE_TOKEN}
end
local r = cas()
if r == 0 then
  check_write(12)
  if ARGV[16] then
    outbox_append(16)
  end
end
return r
"#
    ))
});

/// [`UPDATE_TOKEN`] with the token's reconciliation check (ARGV 12-15, `check_write`) and no
/// event, run only if the merchant's webhook endpoints hash (ARGV 16, in the merchant's slot)
/// is empty: the endpoint read of a change with an event and its write in one step
/// (`TokenStore::update_token_if_no_endpoints`). Returns as `UPDATE_TOKEN`, or 3 (an endpoint
/// exists, nothing written).
static UPDATE_TOKEN_IF_NO_ENDPOINTS: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(&format!(
        r#"
{COUNT_FUNCTIONS}
{WALLET_FUNCTIONS}
{CHECK_FUNCTIONS}
if redis.call('EXISTS', ARGV[16]) == 1 then
  return 3
end
local function cas()
{UPDATE_TOKEN}
end
local r = cas()
if r == 0 then
  check_write(12)
end
return r
"#
    ))
});

struct Scripts {
    insert_merchant: Script,
    insert_token: Script,
    update_token: Script,
    remove_token: Script,
    find_token: Script,
    idem_begin: Script,
    idem_abort: Script,
    merchant_by_index: Script,
    wallet_page: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            insert_merchant: Script::new(INSERT_MERCHANT),
            insert_token: Script::new(&format!(
                "{COUNT_FUNCTIONS}{WALLET_FUNCTIONS}{CHECK_FUNCTIONS}{INSERT_TOKEN}"
            )),
            update_token: Script::new(&format!(
                "{COUNT_FUNCTIONS}{WALLET_FUNCTIONS}{UPDATE_TOKEN}"
            )),
            remove_token: Script::new(&format!(
                "{COUNT_FUNCTIONS}{WALLET_FUNCTIONS}{REMOVE_TOKEN}"
            )),
            find_token: Script::new(FIND_TOKEN),
            idem_begin: Script::new(IDEM_BEGIN),
            idem_abort: Script::new(IDEM_ABORT),
            merchant_by_index: Script::new(MERCHANT_BY_INDEX),
            wallet_page: Script::new(WALLET_PAGE),
        }
    }

    fn all(&self) -> [&Script; 9] {
        [
            &self.insert_merchant,
            &self.insert_token,
            &self.update_token,
            &self.remove_token,
            &self.find_token,
            &self.idem_begin,
            &self.idem_abort,
            &self.merchant_by_index,
            &self.wallet_page,
        ]
    }
}

/// Value of an idempotency key. The tag comes first in the JSON, which the abort script reads.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
enum IdemEntry {
    Inflight { digest: String },
    Completed { response: StoredResponse },
}

/// Redis refuses `PX 0`; a sub-millisecond ttl is rounded up rather than failing.
fn ttl_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

// --- store -------------------------------------------------------------------------------------

struct Inner {
    conn: Conn,
    /// Connections of confirmed writes (empty without durability): a `WAIT` blocks its
    /// connection on the server, and reads must not queue behind it.
    writers: Vec<Conn>,
    next_writer: std::sync::atomic::AtomicUsize,
    durability: Durability,
    cluster: bool,
    keys: Keys,
    scripts: Scripts,
    op_timeout: Duration,
    /// When this process last swept the merchants' outbox shards (Unix ms; Cluster only,
    /// `redis_outbox.rs`): at most once per claim lease.
    outbox_swept_ms: std::sync::atomic::AtomicU64,
    /// Records for [`TokenStore::read_token`], coherent through RESP3 tracking (`None`: off,
    /// or Cluster).
    token_cache: Option<token_cache::TokenCache>,
}

/// Token store on Redis. Clones share one connection (multiplexed), so clone freely.
#[derive(Clone)]
pub struct RedisStore {
    inner: std::sync::Arc<Inner>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.inner.cluster)
            .field("prefix", &self.inner.keys.prefix)
            .field("durability", &self.inner.durability.label())
            .finish_non_exhaustive()
    }
}

fn node_url(n: &str) -> String {
    if n.contains("://") {
        n.to_owned()
    } else {
        format!("redis://{n}")
    }
}

/// Opens one connection handle (standalone: a `ConnectionManager`; Cluster: a connection to
/// every node). `response_timeout` is the client's own bound on one reply; writers that wait
/// for confirmations get the durability timeout on top.
async fn open(
    cfg: &RedisConfig,
    cluster: bool,
    response_timeout: Duration,
    bad_url: &impl Fn(RedisError) -> StoreError,
) -> Result<Conn, StoreError> {
    if cluster {
        let nodes: Vec<String> = cfg.cluster_nodes.iter().map(|n| node_url(n)).collect();
        let client = ClusterClient::builder(nodes)
            .connection_timeout(cfg.connect_timeout)
            .response_timeout(response_timeout)
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(200)
            .build()
            .map_err(bad_url)?;
        Ok(Conn::Cluster(
            client
                .get_async_connection()
                .await
                .map_err(|e| map_err(&e))?,
        ))
    } else {
        let client = redis::Client::open(cfg.url.as_str()).map_err(bad_url)?;
        // Few, short reconnect attempts: an operation waits on a reconnect in progress, and our
        // per-operation deadline answers `Unavailable` meanwhile anyway.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        Ok(Conn::Single(
            client
                .get_connection_manager_with_config(config)
                .await
                .map_err(|e| map_err(&e))?,
        ))
    }
}

impl RedisStore {
    /// Connects (standalone or Cluster) and loads the scripts, within `connect_timeout`.
    pub async fn connect(cfg: &RedisConfig) -> Result<RedisStore, StoreError> {
        if !valid_prefix(&cfg.key_prefix) {
            return Err(StoreError::Unavailable(
                "invalid redis key prefix: 1-32 characters of [A-Za-z0-9._-]".into(),
            ));
        }
        let tls = cfg.url.starts_with("rediss://")
            || cfg.cluster_nodes.iter().any(|u| u.starts_with("rediss://"));
        let cluster = !cfg.cluster_nodes.is_empty();
        let bad_url = |e: RedisError| {
            // The URL may hold a password: name the problem, not the URL.
            let hint = if tls {
                "; rediss:// needs the redis crate's `tokio-rustls-comp` feature"
            } else {
                ""
            };
            StoreError::Unavailable(format!(
                "invalid redis configuration ({}){hint}",
                e.category()
            ))
        };
        let connecting = async {
            let conn = open(cfg, cluster, cfg.response_timeout, &bad_url).await?;
            // Each writer is a connection of its own (see `Inner::writers`).
            let mut writers = Vec::new();
            if cfg.durability != Durability::None {
                for _ in 0..durability::WRITE_CONNECTIONS {
                    let timeout = cfg.response_timeout + cfg.durability.timeout();
                    writers.push(open(cfg, cluster, timeout, &bad_url).await?);
                }
            }
            Ok::<(Conn, Vec<Conn>), StoreError>((conn, writers))
        };
        let (conn, writers) = tokio::time::timeout(cfg.connect_timeout, connecting)
            .await
            .map_err(|_| StoreError::Unavailable("redis connection timed out".into()))??;
        // Its own connection, opened in the background: start-up does not wait for it, and reads
        // go uncached until it is up (`token_cache`).
        let token_cache = if !cluster && cfg.token_cache_entries > 0 {
            let client = redis::Client::open(cfg.url.as_str()).map_err(bad_url)?;
            Some(token_cache::TokenCache::start(
                &client,
                cfg.token_cache_entries,
                cfg.connect_timeout,
                cfg.response_timeout,
            ))
        } else {
            None
        };
        let store = RedisStore {
            inner: std::sync::Arc::new(Inner {
                conn,
                writers,
                next_writer: std::sync::atomic::AtomicUsize::new(0),
                durability: cfg.durability,
                cluster,
                keys: Keys {
                    prefix: cfg.key_prefix.clone(),
                },
                scripts: Scripts::new(),
                op_timeout: cfg.response_timeout,
                outbox_swept_ms: std::sync::atomic::AtomicU64::new(0),
                token_cache,
            }),
        };
        // Loading up front makes the first calls one round trip too, and surfaces a script the
        // server refuses at start-up rather than on the first request. (On Cluster the load goes
        // to every primary.)
        for script in store.inner.scripts.all() {
            let mut conn = store.inner.conn.clone();
            store
                .run(async move { script.load_async(&mut conn).await })
                .await?;
        }
        store.probe_durability().await?;
        Ok(store)
    }

    /// The token cache's counters (`None`: no cache, as on Cluster or with
    /// `storage.redis_token_cache_entries = 0`).
    pub fn token_cache_stats(&self) -> Option<TokenCacheStats> {
        self.inner.token_cache.as_ref().map(|c| c.stats())
    }

    /// Waits up to `within` for the token cache's tracking connection (tests, benches); `false`
    /// without a cache or when it did not come up.
    pub async fn wait_token_cache(&self, within: Duration) -> bool {
        match &self.inner.token_cache {
            Some(c) => c.wait_tracking(within).await,
            None => false,
        }
    }

    /// Refuses to start when the server cannot confirm writes as configured (`WAITAOF` before
    /// Redis 7.2, or `durability_local` without `appendonly yes`), rather than failing every
    /// write later. Confirms nothing: this connection wrote nothing yet, so it returns at once.
    async fn probe_durability(&self) -> Result<(), StoreError> {
        let Some(cmd) = self.inner.durability.command() else {
            return Ok(());
        };
        let mut conn = self
            .inner
            .writers
            .first()
            .unwrap_or(&self.inner.conn)
            .clone();
        self.run(async move { cmd.query_async::<Value>(&mut conn).await })
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "storage.redis_durability = {}: the server refused {} ({e}); WAITAOF needs Redis >= 7.2, and appendonly yes when storage.redis_durability_local > 0",
                    self.inner.durability.label(),
                    self.inner.durability.label().to_uppercase()
                ))
            })?;
        Ok(())
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.cluster
    }

    /// Runs one operation under the response deadline, mapping errors. The deadline covers a
    /// reconnect in progress too, so a dead server gives `Unavailable` promptly, never a hang.
    ///
    /// A write that times out may still have been applied (atomically) by the server.
    async fn run<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.inner.op_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_err(&e)),
            Err(_) => Err(StoreError::Unavailable(
                "redis did not answer in time".into(),
            )),
        }
    }

    fn conn(&self) -> Conn {
        self.inner.conn.clone()
    }

    /// The connection for a write the API acknowledges: with `storage.redis_durability` set,
    /// one of the writer connections, whose every command is confirmed (`durability`). Run it
    /// under [`RedisStore::run_write`].
    fn writer(&self) -> durability::Acked {
        let writers = &self.inner.writers;
        let conn = if writers.is_empty() {
            self.conn()
        } else {
            let i = self
                .inner
                .next_writer
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            writers[i % writers.len()].clone()
        };
        durability::Acked::new(conn, self.inner.durability)
    }

    /// [`RedisStore::run`] for writes on [`RedisStore::writer`]: the deadline adds the time a
    /// confirmation may take. A write that fails here (deadline, not confirmed) may have been
    /// applied on the primary: callers must treat it like any `Unavailable` (nothing undone).
    pub(crate) async fn run_write<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let deadline = self.inner.op_timeout + self.inner.durability.timeout();
        match tokio::time::timeout(deadline, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_err(&e)),
            Err(_) => Err(StoreError::Unavailable(
                "redis did not answer in time".into(),
            )),
        }
    }

    /// One write command, confirmed per `storage.redis_durability`.
    pub(crate) async fn query_write<T: redis::FromRedisValue>(
        &self,
        cmd: Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = self.writer();
        self.run_write(async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// One write script, confirmed per `storage.redis_durability`.
    pub(crate) async fn invoke_write<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.writer();
        self.run_write(async move { inv.invoke_async(&mut conn).await })
            .await
    }

    fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    // --- for sibling modules (`redis_lifecycle`): the layout and the deadline stay here --------

    /// Start of every key of `merchant` (`P:{m:M}:`): keys built on it share the merchant's slot.
    pub(crate) fn merchant_key_start(&self, merchant: &MerchantId) -> String {
        self.keys().merchant_scope(merchant.as_str())
    }

    /// `P:` followed by `rest`, for keys that belong to no merchant (`rest` carries its own tag).
    pub(crate) fn global_key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.keys().prefix)
    }

    /// The counts key of `merchant` (`P:{m:M}:stats`).
    pub(crate) fn counts_key(&self, merchant: &MerchantId) -> String {
        self.keys().token_counts(merchant)
    }

    /// The record key of a token.
    pub(crate) fn token_key(&self, merchant: &MerchantId, id: &TokenId) -> String {
        self.keys().token(merchant, id)
    }

    /// The wallet index of `customer` at `merchant` (every status; `:<label>` appended per
    /// status).
    pub(crate) fn wallet_key(&self, merchant: &MerchantId, customer: &str) -> String {
        self.keys().wallet(merchant, customer)
    }

    /// The set of every merchant id (`P:{merchants}:ids`).
    pub(crate) fn merchant_set_key(&self) -> String {
        self.keys().merchant_set()
    }

    /// Start of a merchant record key (`P:merchant:{`); the id and `}` follow.
    pub(crate) fn merchant_key_open(&self) -> String {
        self.keys().merchant_open()
    }

    /// The primaries of the Cluster as `(lowest slot served, host, port)`, ordered by slot, so
    /// every instance lists them in the same order (from `CLUSTER SLOTS`, the same source the
    /// client builds its routing table from, so the addresses match its connections).
    pub(crate) async fn cluster_primaries(&self) -> Result<Vec<(u16, String, u16)>, StoreError> {
        let Conn::Cluster(mut conn) = self.conn() else {
            return Err(StoreError::Unavailable("not a redis cluster".into()));
        };
        let reply = self
            .run(async move {
                conn.route_command(
                    redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
                )
                .await
            })
            .await?;
        parse_cluster_slots(reply)
    }

    /// Runs one command on the node at `host:port` (which must be a node the client knows),
    /// under the response deadline.
    pub(crate) async fn query_node<T: redis::FromRedisValue>(
        &self,
        cmd: Cmd,
        host: &str,
        port: u16,
    ) -> Result<T, StoreError> {
        let Conn::Cluster(mut conn) = self.conn() else {
            return Err(StoreError::Unavailable("not a redis cluster".into()));
        };
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.to_owned(),
            port,
        });
        let reply = self
            .run(async move { conn.route_command(cmd, routing).await })
            .await?;
        redis::from_redis_value(reply)
            .map_err(|_| StoreError::Corrupt("unexpected reply from redis (node command)".into()))
    }

    /// Runs one command under the response deadline.
    pub(crate) async fn query<T: redis::FromRedisValue>(&self, cmd: Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn();
        self.run(async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Runs one script under the response deadline (`SCRIPT LOAD` fallback included).
    pub(crate) async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        self.run(async move { inv.invoke_async(&mut conn).await })
            .await
    }

    /// The keys and arguments of the [`UPDATE_TOKEN`] compare-and-set for `rec`, bound to
    /// `script` (that script or one that wraps it and takes extra arguments after these).
    pub(crate) fn update_invocation<'a>(
        &self,
        script: &'a Script,
        rec: &TokenRecord,
    ) -> Result<redis::ScriptInvocation<'a>, StoreError> {
        let json = encode("token record", rec)?;
        let k = self.keys();
        let m = &rec.merchant_id;
        // Version 0 cannot be an update of anything: "-1" never matches a stored version.
        let expected = rec
            .version
            .checked_sub(1)
            .map_or_else(|| "-1".to_owned(), |v| v.to_string());
        let mut inv = script.key(k.token(m, &rec.id));
        inv.key(k.fingerprint(m, &rec.fingerprints.pan));
        let d1 = d1_id(rec);
        if !d1.is_empty() {
            inv.key(k.d1_token(m, d1));
        }
        inv.arg(expected)
            .arg(rec.version)
            .arg(rec.status.as_str())
            .arg(index_entries(rec))
            .arg(d1)
            .arg(&json)
            .arg(rec.id.as_str())
            .arg(k.d1_prefix(m))
            .arg(k.token_counts(m))
            .arg(k.wallet_of(rec))
            .arg(WalletKey::of(rec).as_str());
        Ok(inv)
    }

    async fn get_string(&self, key: String) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn();
        self.run(async move { redis::cmd("GET").arg(&key).query_async(&mut conn).await })
            .await
    }

    /// Looks a merchant up through a global index key (API key or D1 id).
    async fn merchant_by_index(&self, index_key: String) -> Result<Option<Merchant>, StoreError> {
        let json: Option<String> = if self.inner.cluster {
            // Index and record live in different slots: two round trips.
            match self.get_string(index_key).await? {
                None => None,
                Some(id) => self.get_string(self.keys().merchant(&id)).await?,
            }
        } else {
            let mut conn = self.conn();
            let open = self.keys().merchant_open();
            let script = &self.inner.scripts.merchant_by_index;
            self.run(async move {
                script
                    .key(&index_key)
                    .arg(&open)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?
        };
        json.map(|j| decode("merchant record", &j)).transpose()
    }

    async fn find_token(
        &self,
        index_key: String,
        merchant: &MerchantId,
        skip_deleted: bool,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let mut conn = self.conn();
        let prefix = self.keys().token_prefix(merchant);
        let script = &self.inner.scripts.find_token;
        let json: Option<String> = self
            .run(async move {
                script
                    .key(&index_key)
                    .arg(&prefix)
                    .arg(if skip_deleted { "1" } else { "0" })
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        json.map(|j| decode("token record", &j)).transpose()
    }

    /// [`TokenStore::read_token`] once its read barrier is passed ([`token_cache::TokenCache::sync`]
    /// returned `true` after the caller's request began): the cache, else Redis on the tracking
    /// connection, else Redis without the cache. `read_by_fingerprint` calls it for the record
    /// its index entry names, behind the one barrier it passed for the index: a second barrier
    /// would cost a second round trip and order nothing more (any change acknowledged before the
    /// request began is already applied to the cache by the first one).
    async fn read_token_past_barrier(
        &self,
        cache: &token_cache::TokenCache,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<Option<std::sync::Arc<TokenRecord>>, StoreError> {
        let key = self.keys().token(merchant, id);
        match cache.lookup(&key) {
            Lookup::Hit(Cached::Record(rec)) => return Ok(Some(rec)),
            Lookup::Miss(ticket) => {
                let mut cmd = redis::cmd("HGET");
                cmd.arg(&key).arg("d");
                let reply = cache
                    .read(&ticket, &cmd, self.inner.op_timeout)
                    .await
                    .map_err(|e| map_err(&e))?;
                match reply {
                    Some(Value::Nil) => return Ok(None),
                    Some(Value::BulkString(json)) => {
                        let rec: std::sync::Arc<TokenRecord> =
                            std::sync::Arc::new(decode_bytes("token record", &json)?);
                        cache.insert(ticket, &key, Cached::Record(rec.clone()));
                        return Ok(Some(rec));
                    }
                    Some(_) => {
                        return Err(StoreError::Corrupt(
                            "unexpected reply from redis (token record)".into(),
                        ));
                    }
                    // The tracking connection failed: read without the cache.
                    None => {}
                }
            }
            Lookup::Hit(Cached::Index(_)) | Lookup::Off => {}
        }
        Ok(self.get_token(merchant, id).await?.map(std::sync::Arc::new))
    }
}

/// `CLUSTER SLOTS` reply -> primaries as `(lowest slot, host, port)`, ordered by slot. Each
/// entry is `[start, end, [host, port, id, ...], replicas...]`; the first node is the primary.
fn parse_cluster_slots(reply: Value) -> Result<Vec<(u16, String, u16)>, StoreError> {
    let bad = || StoreError::Corrupt("unexpected CLUSTER SLOTS reply".into());
    let Value::Array(ranges) = reply else {
        return Err(bad());
    };
    let mut primaries: Vec<(u16, String, u16)> = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else {
            return Err(bad());
        };
        let (Some(Value::Int(start)), Some(Value::Array(node))) = (items.first(), items.get(2))
        else {
            return Err(bad());
        };
        let (Some(host), Some(Value::Int(port))) = (node.first(), node.get(1)) else {
            return Err(bad());
        };
        let host = match host {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => return Err(bad()),
        };
        let start = u16::try_from(*start).map_err(|_| bad())?;
        let port = u16::try_from(*port).map_err(|_| bad())?;
        match primaries
            .iter_mut()
            .find(|(_, h, p)| *h == host && *p == port)
        {
            Some(entry) => entry.0 = entry.0.min(start),
            None => primaries.push((start, host, port)),
        }
    }
    primaries.sort();
    Ok(primaries)
}

/// Belt and braces over the index: a listed record must be the merchant's, the customer's and
/// (with a filter) in that status.
fn wallet_matches(
    rec: &TokenRecord,
    merchant: &MerchantId,
    customer: &str,
    status: Option<&str>,
) -> bool {
    rec.merchant_id == *merchant
        && rec.customer_reference.as_deref() == Some(customer)
        && status.is_none_or(|s| rec.status.label() == s)
}

/// The answer of the [`UPDATE_TOKEN`] compare-and-set (and of scripts wrapping it).
pub(crate) fn update_result(code: i64) -> Result<(), StoreError> {
    match code {
        0 => Ok(()),
        1 => Err(StoreError::NotFound),
        2 => Err(StoreError::Conflict),
        _ => Err(StoreError::Corrupt(
            "unexpected update script result".into(),
        )),
    }
}

/// The record's dedup index entries as the token scripts take them (field `f`): separated by
/// spaces, which neither form of fingerprint (`hex`, `<key id>:hex`) contains.
fn index_entries(rec: &TokenRecord) -> String {
    rec.fingerprints
        .index_entries()
        .collect::<Vec<_>>()
        .join(" ")
}

fn d1_id(rec: &TokenRecord) -> &str {
    rec.network_token
        .as_ref()
        .map(|n| n.d1_token_id.as_str())
        .unwrap_or("")
}

#[async_trait]
impl TokenStore for RedisStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        self.run(async move {
            redis::cmd("PING")
                .query_async::<Value>(&mut conn)
                .await
                .map(|_| ())
        })
        .await
    }

    async fn insert_merchant(&self, m: &Merchant, key: &ApiKeyHash) -> Result<(), StoreError> {
        let json = encode("merchant record", m)?;
        let k = self.keys();
        // Record first, API key index last: a key never resolves to a missing merchant.
        let mut writes = vec![(k.merchant(m.id.as_str()), json)];
        if let Some(d1) = &m.d1_merchant_id {
            writes.push((k.d1_merchant(d1), m.id.as_str().to_owned()));
        }
        writes.push((k.api_key(key), m.id.as_str().to_owned()));
        let set = k.merchant_set();
        if self.inner.cluster {
            // Each key has its own slot, so no transaction can span them: write in order. The
            // merchant set (for the token counts) right after the record, before the API key,
            // so a merchant that can tokenize is always summed.
            let mut cmds = Vec::with_capacity(writes.len() + 1);
            for (i, (key, value)) in writes.iter().enumerate() {
                let mut cmd = redis::cmd("SET");
                cmd.arg(key).arg(value);
                cmds.push(cmd);
                if i == 0 {
                    let mut sadd = redis::cmd("SADD");
                    sadd.arg(&set).arg(m.id.as_str());
                    cmds.push(sadd);
                }
            }
            for cmd in cmds {
                self.query_write::<redis::Value>(cmd).await?;
            }
        } else {
            let mut inv = self.inner.scripts.insert_merchant.prepare_invoke();
            for (key, value) in &writes {
                inv.key(key).arg(value);
            }
            inv.key(&set).arg(m.id.as_str());
            self.invoke_write::<i64>(inv).await?;
        }
        Ok(())
    }

    async fn get_merchant(&self, id: &MerchantId) -> Result<Option<Merchant>, StoreError> {
        self.get_string(self.keys().merchant(id.as_str()))
            .await?
            .map(|j| decode("merchant record", &j))
            .transpose()
    }

    async fn merchant_by_api_key(&self, key: &ApiKeyHash) -> Result<Option<Merchant>, StoreError> {
        self.merchant_by_index(self.keys().api_key(key)).await
    }

    async fn merchant_by_d1_id(
        &self,
        d1_merchant_id: &str,
    ) -> Result<Option<Merchant>, StoreError> {
        self.merchant_by_index(self.keys().d1_merchant(d1_merchant_id))
            .await
    }

    async fn insert_token_scheduled(
        &self,
        rec: &TokenRecord,
        check: CheckAt,
    ) -> Result<InsertOutcome, StoreError> {
        let json = encode("token record", rec)?;
        let k = self.keys();
        let m = &rec.merchant_id;
        let mut inv = self.inner.scripts.insert_token.key(k.token(m, &rec.id));
        inv.key(k.fingerprint(m, &rec.fingerprints.pan));
        let d1 = d1_id(rec);
        if !d1.is_empty() {
            inv.key(k.d1_token(m, d1));
        }
        inv.arg(rec.id.as_str())
            .arg(rec.version)
            .arg(rec.status.as_str())
            .arg(index_entries(rec))
            .arg(d1)
            .arg(&json)
            .arg(k.token_prefix(m))
            .arg(k.token_counts(m))
            .arg(k.wallet_of(rec))
            .arg(WalletKey::of(rec).as_str())
            .arg(k.fp_prefix(m));
        self.check_args(&mut inv, m, &rec.id, check);
        let existing: Option<String> = self.invoke_write(inv).await?;
        match existing {
            None => {
                self.check_after(m, &rec.id, check).await;
                Ok(InsertOutcome::Inserted)
            }
            Some(j) => Ok(InsertOutcome::Existing(Box::new(decode(
                "token record",
                &j,
            )?))),
        }
    }

    async fn get_token(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let key = self.keys().token(merchant, id);
        let mut conn = self.conn();
        let json: Option<String> = self
            .run(async move {
                redis::cmd("HGET")
                    .arg(&key)
                    .arg("d")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        json.map(|j| decode("token record", &j)).transpose()
    }

    async fn read_token(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<Option<std::sync::Arc<TokenRecord>>, StoreError> {
        let Some(cache) = &self.inner.token_cache else {
            return Ok(self.get_token(merchant, id).await?.map(std::sync::Arc::new));
        };
        if !cache.sync(self.inner.op_timeout).await {
            return Ok(self.get_token(merchant, id).await?.map(std::sync::Arc::new));
        }
        self.read_token_past_barrier(cache, merchant, id).await
    }

    async fn read_by_fingerprint(
        &self,
        merchant: &MerchantId,
        pan_fingerprint: &str,
    ) -> Result<Option<std::sync::Arc<TokenRecord>>, StoreError> {
        let Some(cache) = &self.inner.token_cache else {
            return Ok(self
                .find_by_fingerprint(merchant, pan_fingerprint)
                .await?
                .map(std::sync::Arc::new));
        };
        // Index then record, each through the cache. Two steps instead of `FIND_TOKEN`'s one
        // atomic script: both keys are tracked, and a dedup answer is only ever a read (a new
        // card is inserted by `insert_token`, which checks the index atomically again).
        let key = self.keys().fingerprint(merchant, pan_fingerprint);
        // The barrier here covers the record read below too.
        let id = if !cache.sync(self.inner.op_timeout).await {
            None
        } else {
            match cache.lookup(&key) {
                Lookup::Hit(Cached::Index(id)) => Some(id),
                Lookup::Miss(ticket) => {
                    let mut cmd = redis::cmd("GET");
                    cmd.arg(&key);
                    let reply = cache
                        .read(&ticket, &cmd, self.inner.op_timeout)
                        .await
                        .map_err(|e| map_err(&e))?;
                    match reply {
                        Some(Value::Nil) => return Ok(None),
                        Some(Value::BulkString(id)) => {
                            let id = std::str::from_utf8(&id)
                                .ok()
                                .and_then(TokenId::parse)
                                .ok_or_else(|| {
                                    StoreError::Corrupt(
                                        "a fingerprint index entry is not a token id".into(),
                                    )
                                })?;
                            cache.insert(ticket, &key, Cached::Index(id.clone()));
                            Some(id)
                        }
                        Some(_) => {
                            return Err(StoreError::Corrupt(
                                "unexpected reply from redis (fingerprint index)".into(),
                            ));
                        }
                        None => None,
                    }
                }
                Lookup::Hit(Cached::Record(_)) | Lookup::Off => None,
            }
        };
        let Some(id) = id else {
            // No tracking connection: the one-script lookup.
            return Ok(self
                .find_by_fingerprint(merchant, pan_fingerprint)
                .await?
                .map(std::sync::Arc::new));
        };
        // Behind the barrier passed above (see `read_token_past_barrier`).
        let rec = self.read_token_past_barrier(cache, merchant, &id).await?;
        // As `FIND_TOKEN`: a tombstone is no dedup target.
        Ok(rec.filter(|r| r.status != TokenStatus::Deleted))
    }

    async fn update_token_scheduled(
        &self,
        rec: &TokenRecord,
        event: Option<&EventAppend>,
        check: CheckAt,
    ) -> Result<(), StoreError> {
        if check != CheckAt::Unchanged {
            // The compare-and-set, the check and the event (if any) in one script, in the
            // merchant's slot (the check only on standalone Redis: `check_args`).
            if event.is_some() {
                self.register_outbox_shard(&rec.merchant_id).await?;
            }
            let mut inv = self.update_invocation(&UPDATE_TOKEN_CHECKED, rec)?;
            self.check_args(&mut inv, &rec.merchant_id, &rec.id, check);
            let jobs = match event {
                Some(event) => self.append_args(&mut inv, event)?,
                None => Vec::new(),
            };
            let code: i64 = self.invoke_write(inv).await?;
            update_result(code)?;
            self.move_appended_jobs(&rec.merchant_id, &jobs).await;
            self.check_after(&rec.merchant_id, &rec.id, check).await;
            return Ok(());
        }
        let Some(event) = event else {
            let inv = self.update_invocation(&self.inner.scripts.update_token, rec)?;
            let code: i64 = self.invoke_write(inv).await?;
            return update_result(code);
        };
        // The token script with the outbox append after a successful compare-and-set: one
        // script in the merchant's slot (`redis_outbox.rs`).
        self.register_outbox_shard(&rec.merchant_id).await?;
        let mut inv = self.update_invocation(&outbox::UPDATE_TOKEN_WITH_EVENT, rec)?;
        let jobs = self.append_args(&mut inv, event)?;
        let code: i64 = self.invoke_write(inv).await?;
        update_result(code)?;
        self.move_appended_jobs(&rec.merchant_id, &jobs).await;
        Ok(())
    }

    async fn update_token_if_no_endpoints(
        &self,
        rec: &TokenRecord,
        check: CheckAt,
    ) -> Result<bool, StoreError> {
        let mut inv = self.update_invocation(&UPDATE_TOKEN_IF_NO_ENDPOINTS, rec)?;
        self.check_args(&mut inv, &rec.merchant_id, &rec.id, check);
        inv.arg(self.outbox_endpoints_key(&rec.merchant_id));
        let code: i64 = self.invoke_write(inv).await?;
        if code == 3 {
            return Ok(false);
        }
        update_result(code)?;
        self.check_after(&rec.merchant_id, &rec.id, check).await;
        Ok(true)
    }

    async fn remove_token(&self, merchant: &MerchantId, id: &TokenId) -> Result<(), StoreError> {
        let k = self.keys();
        let mut inv = self.inner.scripts.remove_token.key(k.token(merchant, id));
        inv.arg(id.as_str())
            .arg(k.fp_prefix(merchant))
            .arg(k.d1_prefix(merchant))
            .arg(k.token_counts(merchant));
        self.invoke_write::<i64>(inv).await?;
        Ok(())
    }

    async fn find_by_fingerprint(
        &self,
        merchant: &MerchantId,
        pan_fingerprint: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let key = self.keys().fingerprint(merchant, pan_fingerprint);
        let rec = self.find_token(key, merchant, true).await?;
        // Belt and braces: the script already skips tombstones.
        Ok(rec.filter(|r| r.status != TokenStatus::Deleted))
    }

    async fn find_by_d1_token(
        &self,
        merchant: &MerchantId,
        d1_token_id: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let key = self.keys().d1_token(merchant, d1_token_id);
        self.find_token(key, merchant, false).await
    }

    async fn list_customer_tokens(
        &self,
        merchant: &MerchantId,
        customer: &str,
        status: Option<&'static str>,
        after: Option<&WalletKey>,
        limit: usize,
    ) -> Result<WalletPage, StoreError> {
        let k = self.keys();
        let mut index = k.wallet(merchant, customer);
        if let Some(label) = status {
            index = format!("{index}:{label}");
        }
        let start = after.map_or_else(|| "+".to_owned(), |a| format!("({a}"));
        let limit = limit.max(1);
        let mut inv = self.inner.scripts.wallet_page.key(&index);
        // One more than a page: whether it comes back says whether a next page exists.
        inv.arg(&start).arg(limit + 1).arg(k.token_prefix(merchant));
        let flat: Vec<String> = self.invoke(inv).await?;
        let mut page = WalletPage::default();
        let mut entries = flat.chunks_exact(2);
        for pair in entries.by_ref().take(limit) {
            let (pos, json) = (&pair[0], &pair[1]);
            page.next = WalletKey::parse(pos);
            if json.is_empty() {
                continue; // the record is gone: a dangling entry reads as a miss
            }
            let rec: TokenRecord = decode("token record", json)?;
            if wallet_matches(&rec, merchant, customer, status) {
                page.tokens.push(rec);
            }
        }
        if entries.next().is_none() {
            page.next = None;
        }
        Ok(page)
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
        let marker = encode(
            "idempotency entry",
            &IdemEntry::Inflight {
                digest: request_digest.to_owned(),
            },
        )?;
        let mut inv = self
            .inner
            .scripts
            .idem_begin
            .key(self.keys().idempotency(scope, key));
        inv.arg(&marker).arg(ttl_ms(lock_ttl));
        let mut conn = self.conn();
        let cur: Option<String> = self
            .run(async move { inv.invoke_async(&mut conn).await })
            .await?;
        match cur {
            None => Ok(IdempotencyBegin::Started),
            Some(j) => match decode::<IdemEntry>("idempotency entry", &j)? {
                IdemEntry::Inflight { digest } => Ok(IdempotencyBegin::InFlight {
                    same_request: digest == request_digest,
                }),
                IdemEntry::Completed { response } => Ok(IdempotencyBegin::Completed(response)),
            },
        }
    }

    async fn idempotency_complete(
        &self,
        scope: &str,
        key: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let json = encode(
            "idempotency entry",
            &IdemEntry::Completed {
                response: response.clone(),
            },
        )?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.keys().idempotency(scope, key))
            .arg(&json)
            .arg("PX")
            .arg(ttl_ms(ttl));
        self.query_write::<()>(cmd).await
    }

    async fn idempotency_abort(&self, scope: &str, key: &str) -> Result<(), StoreError> {
        let inv = self
            .inner
            .scripts
            .idem_abort
            .key(self.keys().idempotency(scope, key));
        let mut conn = self.conn();
        self.run(async move { inv.invoke_async::<i64>(&mut conn).await })
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a key Redis Cluster hashes: the first `{...}` with a non-empty body.
    fn hash_tag(key: &str) -> &str {
        if let Some(open) = key.find('{')
            && let Some(len) = key[open + 1..].find('}')
            && len > 0
        {
            return &key[open + 1..open + 1 + len];
        }
        key
    }

    fn keys() -> Keys {
        Keys {
            prefix: "tg".into(),
        }
    }

    #[test]
    fn merchant_keys_share_one_hash_tag() {
        let k = keys();
        let m = MerchantId::generate();
        let t = TokenId::generate();
        let tag = format!("m:{m}");
        for key in [
            k.token(&m, &t),
            k.fingerprint(&m, "ab12"),
            k.d1_token(&m, "d1-weird}{id"),
            k.idempotency(m.as_str(), "key-1"),
            format!("{}{}", k.token_prefix(&m), t),
            format!("{}x", k.fp_prefix(&m)),
            format!("{}x", k.d1_prefix(&m)),
        ] {
            assert_eq!(hash_tag(&key), tag, "{key}");
        }
        assert_eq!(k.token(&m, &t), format!("tg:{{m:{m}}}:tok:{t}"));
        assert_eq!(k.fingerprint(&m, "ab12"), format!("tg:{{m:{m}}}:fp:ab12"));
        assert_eq!(k.d1_token(&m, "D1"), format!("tg:{{m:{m}}}:d1:D1"));
        assert_eq!(k.token_prefix(&m), format!("tg:{{m:{m}}}:tok:"));
        assert_eq!(k.fp_prefix(&m), format!("tg:{{m:{m}}}:fp:"));
        assert_eq!(k.d1_prefix(&m), format!("tg:{{m:{m}}}:d1:"));
        assert_eq!(hash_tag(&k.idempotency("admin", "k")), "m:admin");
    }

    #[test]
    fn merchant_level_keys_are_tagged_by_their_own_id() {
        let k = keys();
        assert_eq!(k.merchant("mer_x"), "tg:merchant:{mer_x}");
        assert_eq!(format!("{}mer_x}}", k.merchant_open()), k.merchant("mer_x"));
        assert_eq!(hash_tag(&k.api_key(&ApiKeyHash("abc".into()))), "abc");
        assert_eq!(hash_tag(&k.d1_merchant("D1M")), "D1M");
    }

    #[test]
    fn cluster_slots_give_primaries_by_lowest_slot() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"node-id".to_vec()),
            ])
        };
        let range = |start: i64, end: i64, primary: Value, replica: Option<Value>| {
            let mut v = vec![Value::Int(start), Value::Int(end), primary];
            v.extend(replica);
            Value::Array(v)
        };
        let reply = Value::Array(vec![
            range(10923, 16383, node("10.0.0.3", 7002), None),
            range(
                0,
                5460,
                node("10.0.0.1", 7000),
                Some(node("10.0.0.9", 7009)),
            ),
            range(5461, 10922, node("10.0.0.2", 7001), None),
            // A second range of the first primary: still one entry, at its lowest slot.
            range(16000, 16001, node("10.0.0.1", 7000), None),
        ]);
        let primaries = parse_cluster_slots(reply).unwrap_or_default();
        assert_eq!(
            primaries,
            vec![
                (0, "10.0.0.1".to_owned(), 7000),
                (5461, "10.0.0.2".to_owned(), 7001),
                (10923, "10.0.0.3".to_owned(), 7002),
            ]
        );
        assert!(parse_cluster_slots(Value::Int(1)).is_err());
    }

    #[test]
    fn prefix_is_validated() {
        assert!(valid_prefix("tg"));
        assert!(valid_prefix("tg-prod.eu_1"));
        assert!(!valid_prefix(""));
        assert!(!valid_prefix("t{g}"));
        assert!(!valid_prefix("a:b"));
        assert!(!valid_prefix(&"x".repeat(33)));
    }

    #[test]
    fn config_debug_hides_password() {
        let cfg = RedisConfig {
            url: "redis://user:s3cret@db:6379/0".into(),
            cluster_nodes: vec!["rediss://:pw2@n1:7000".into(), "n2:7001".into()],
            ..RedisConfig::default()
        };
        let s = format!("{cfg:?}");
        assert!(!s.contains("s3cret") && !s.contains("pw2"), "{s}");
        assert!(s.contains("db:6379/0") && s.contains("n2:7001"), "{s}");
    }

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn idempotency_entries_have_the_documented_shape() -> TestResult {
        let j = serde_json::to_string(&IdemEntry::Inflight {
            digest: "d1".into(),
        })?;
        assert_eq!(j, r#"{"state":"inflight","digest":"d1"}"#);
        let r = StoredResponse {
            request_digest: "d1".into(),
            status: 201,
            body: "{}".into(),
        };
        let j = serde_json::to_string(&IdemEntry::Completed { response: r })?;
        assert!(j.starts_with(r#"{"state":"completed","response":{"#), "{j}");
        Ok(())
    }

    #[test]
    fn errors_never_quote_values() {
        let res = serde_json::from_str::<TokenRecord>(r#"{"id": 4111111111111111}"#);
        assert!(res.is_err());
        if let Err(e) = res {
            // serde_json itself quotes the value; the store's message must not.
            assert!(e.to_string().contains("4111111111111111"));
            let mapped = corrupt("token record", &e);
            assert!(matches!(&mapped, StoreError::Corrupt(_)));
            assert!(!mapped.to_string().contains("4111111111111111"), "{mapped}");
        }
    }

    #[test]
    fn error_mapping() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(map_err(&io), StoreError::Unavailable(_)));
        let down = RedisError::from((ErrorKind::Server(ServerErrorKind::ClusterDown), "down"));
        assert!(matches!(map_err(&down), StoreError::Unavailable(_)));
        let parse = RedisError::from((ErrorKind::UnexpectedReturnType, "bad"));
        assert!(matches!(map_err(&parse), StoreError::Corrupt(_)));
        assert_eq!(ttl_ms(Duration::from_micros(10)), 1);
        assert_eq!(ttl_ms(Duration::from_millis(1500)), 1500);
    }
}
