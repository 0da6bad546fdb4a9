//! [`IssuerOperationStore`] on Redis. Every key of one issuer shares the hash tag
//! `{i:<issuer id>}`, so each script below touches a single Cluster slot (`docs/storage.md`,
//! "Issuer operations"):
//!
//! - `P:{i:I}:op:<operation id>`: the record (JSON);
//! - `P:{i:I}:req:<issuerRequestId>`: -> operation id (unique per issuer: the insert checks it);
//! - `P:{i:I}:d1op:<D1 operationId>`: -> operation id;
//! - `P:{i:I}:ops`, `P:{i:I}:ops:card:<cardId>`, `P:{i:I}:ops:status:<STATUS>`: list indexes,
//!   sorted sets of score 0 whose members are sort keys (`<created ms, 13 digits>:<op id>`),
//!   read newest first with `ZREVRANGEBYLEX` from the cursor (the last key of a page);
//! - `P:{i:I}:due`: `PENDING` operations by next check time (score, Unix ms): the worker's list;
//! - `P:{i:I}:nevt:<digest>`: processed-notification marker, `PX` ttl;
//! - `P:{i:I}:whq` (Cluster): the issuer's outbox shard, webhook events written with an
//!   operation change in its slot, waiting to move to the tenant's outbox (`redis/outbox.rs`).
//!
//! A change that carries webhook events (`update_operation_with`, `apply_notification_with`)
//! runs the same compare-and-set with the outbox write after it in one script, so the events
//! exist exactly when the change does.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::RedisStore;
use super::outbox::{ISSUER_EVENT_FUNCTIONS, OUTBOX_FUNCTIONS};
use crate::domain::issuer::IssuerId;
use crate::domain::issuer_ops::{IssuerOperation, OperationFilter, OperationId, OperationStatus};
use crate::domain::ports::StoreError;
use crate::domain::ports::issuer_operations::{
    IssuerOperationStore, NotificationWrite, OperationInsert, OperationPage,
};
use crate::domain::ports::outbox::EventAppend;
use crate::storage::codec::issuers::{decode, encode, unix_ms};

/// Inserts an operation unless its request id is taken. KEYS: req, op, ops, status(PENDING),
/// due, card index. ARGV: op id, JSON, sort key, due ms, has card ("1"/"0"), op key prefix.
/// Returns `{1, ""}` inserted or `{0, <stored JSON>}`.
static INSERT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local existing = redis.call('GET', KEYS[1])
if existing then
  local cur = redis.call('GET', ARGV[6] .. existing)
  return {0, cur or ''}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[3])
redis.call('ZADD', KEYS[4], 0, ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
if ARGV[5] == '1' then redis.call('ZADD', KEYS[6], 0, ARGV[3]) end
return {1, ''}
"#,
    )
});

/// The compare-and-set both writes share. KEYS: op, status(PENDING), status(SUCCESSFUL),
/// status(FAILED), due, d1 index. ARGV: expected version, JSON, sort key, op id, new status,
/// due ms, has d1 id. Returns 0 written, 1 missing, 2 version conflict.
const UPDATE_BODY: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 1 end
local c = cjson.decode(cur)
if tonumber(c.version) ~= tonumber(ARGV[1]) then return 2 end
local idx = {PENDING = KEYS[2], SUCCESSFUL = KEYS[3], FAILED = KEYS[4]}
if c.status ~= ARGV[5] then
  if idx[c.status] then redis.call('ZREM', idx[c.status], ARGV[3]) end
  redis.call('ZADD', idx[ARGV[5]], 0, ARGV[3])
end
if ARGV[5] == 'PENDING' then
  redis.call('ZADD', KEYS[5], ARGV[6], ARGV[4])
else
  redis.call('ZREM', KEYS[5], ARGV[4])
end
if ARGV[7] == '1' then redis.call('SET', KEYS[6], ARGV[4]) end
redis.call('SET', KEYS[1], ARGV[2])
return 0
"#;

static UPDATE: LazyLock<Script> = LazyLock::new(|| Script::new(UPDATE_BODY));

/// [`UPDATE_BODY`] behind a processed-notification marker, written with the update in the same
/// atomic step. ARGV 8: marker key (same tag), ARGV 9: marker ttl ms. Returns 3 when marked.
static APPLY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
if redis.call('EXISTS', ARGV[8]) == 1 then return 3 end
local function cas()
{UPDATE_BODY}
end
local r = cas()
if r == 0 then redis.call('SET', ARGV[8], '1', 'PX', ARGV[9]) end
return r
"#
    ))
});

/// [`UPDATE`], then, only if it wrote, the change's webhook events (`issuer_events(8)`,
/// `redis/outbox.rs`): one script. KEYS and ARGV 1-7 as [`UPDATE`].
static UPDATE_WITH_EVENTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
{OUTBOX_FUNCTIONS}
{ISSUER_EVENT_FUNCTIONS}
local function cas()
{UPDATE_BODY}
end
local r = cas()
if r == 0 then issuer_events(8) end
return r
"#
    ))
});

/// [`APPLY`] with the change's webhook events after the marker (`issuer_events(10)`): a
/// duplicate or a conflict writes none of them. KEYS and ARGV 1-9 as [`APPLY`].
static APPLY_WITH_EVENTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
{OUTBOX_FUNCTIONS}
{ISSUER_EVENT_FUNCTIONS}
if redis.call('EXISTS', ARGV[8]) == 1 then return 3 end
local function cas()
{UPDATE_BODY}
end
local r = cas()
if r == 0 then
  redis.call('SET', ARGV[8], '1', 'PX', ARGV[9])
  issuer_events(10)
end
return r
"#
    ))
});

/// Pages through an index at most this many times to fill one filtered page.
const MAX_ROUNDS: usize = 20;

impl RedisStore {
    fn iss(&self, issuer: &IssuerId) -> String {
        self.issuer_key_start(issuer)
    }

    /// `P:{i:I}:`, the start of every key of the issuer (one Cluster slot).
    pub(crate) fn issuer_key_start(&self, issuer: &IssuerId) -> String {
        self.global_key(&format!("{{i:{issuer}}}:"))
    }

    fn status_key(&self, issuer: &IssuerId, s: OperationStatus) -> String {
        format!("{}ops:status:{}", self.iss(issuer), s.as_str())
    }

    async fn op_by_index(
        &self,
        issuer: &IssuerId,
        key: String,
    ) -> Result<Option<IssuerOperation>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        let id: Option<String> = self.query(cmd).await?;
        match id.as_deref().and_then(OperationId::parse) {
            Some(id) => self.get_operation(issuer, &id).await,
            None => Ok(None),
        }
    }

    fn update_invocation_op<'a>(
        &self,
        script: &'a Script,
        op: &IssuerOperation,
    ) -> Result<redis::ScriptInvocation<'a>, StoreError> {
        let p = self.iss(&op.issuer_id);
        let mut inv = script.key(format!("{p}op:{}", op.id));
        for s in OperationStatus::ALL {
            inv.key(self.status_key(&op.issuer_id, s));
        }
        inv.key(format!("{p}due"));
        inv.key(format!(
            "{p}d1op:{}",
            op.d1_operation_id.as_deref().unwrap_or("")
        ));
        inv.arg(op.version.saturating_sub(1))
            .arg(encode("issuer operation", op)?)
            .arg(op.sort_key())
            .arg(op.id.as_str())
            .arg(op.status.as_str())
            .arg(unix_ms(op.next_check_at))
            .arg(if op.d1_operation_id.is_some() {
                "1"
            } else {
                "0"
            });
        Ok(inv)
    }
}

fn cas_result(r: i64) -> Result<(), StoreError> {
    match r {
        0 => Ok(()),
        1 => Err(StoreError::NotFound),
        _ => Err(StoreError::Conflict),
    }
}

#[async_trait]
impl IssuerOperationStore for RedisStore {
    async fn insert_operation(&self, op: &IssuerOperation) -> Result<OperationInsert, StoreError> {
        let p = self.iss(&op.issuer_id);
        let mut inv = INSERT.key(format!("{p}req:{}", op.issuer_request_id));
        inv.key(format!("{p}op:{}", op.id))
            .key(format!("{p}ops"))
            .key(self.status_key(&op.issuer_id, op.status))
            .key(format!("{p}due"))
            .key(format!(
                "{p}ops:card:{}",
                op.card_id.as_deref().unwrap_or("")
            ));
        inv.arg(op.id.as_str())
            .arg(encode("issuer operation", op)?)
            .arg(op.sort_key())
            .arg(unix_ms(op.next_check_at))
            .arg(if op.card_id.is_some() { "1" } else { "0" })
            .arg(format!("{p}op:"));
        let (inserted, json): (i64, Vec<u8>) = self.invoke_write(inv).await?;
        if inserted == 1 {
            Ok(OperationInsert::Inserted)
        } else {
            Ok(OperationInsert::Existing(Box::new(decode(
                "issuer operation",
                &json,
            )?)))
        }
    }

    async fn get_operation(
        &self,
        issuer: &IssuerId,
        id: &OperationId,
    ) -> Result<Option<IssuerOperation>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(format!("{}op:{id}", self.iss(issuer)));
        let json: Option<Vec<u8>> = self.query(cmd).await?;
        json.map(|j| decode("issuer operation", &j)).transpose()
    }

    async fn operation_by_request_id(
        &self,
        issuer: &IssuerId,
        issuer_request_id: &str,
    ) -> Result<Option<IssuerOperation>, StoreError> {
        let key = format!("{}req:{issuer_request_id}", self.iss(issuer));
        self.op_by_index(issuer, key).await
    }

    async fn operation_by_d1_id(
        &self,
        issuer: &IssuerId,
        d1_operation_id: &str,
    ) -> Result<Option<IssuerOperation>, StoreError> {
        let key = format!("{}d1op:{d1_operation_id}", self.iss(issuer));
        self.op_by_index(issuer, key).await
    }

    async fn update_operation_with(
        &self,
        op: &IssuerOperation,
        events: &[EventAppend],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            let inv = self.update_invocation_op(&UPDATE, op)?;
            return cas_result(self.invoke_write(inv).await?);
        }
        self.register_issuer_outbox_shard(&op.issuer_id).await?;
        let mut inv = self.update_invocation_op(&UPDATE_WITH_EVENTS, op)?;
        let moved = self.issuer_event_args(&mut inv, &op.issuer_id, events)?;
        cas_result(self.invoke_write(inv).await?)?;
        self.move_issuer_events(&op.issuer_id, &moved).await;
        Ok(())
    }

    async fn apply_notification_with(
        &self,
        op: &IssuerOperation,
        dedup_key: &str,
        ttl: Duration,
        events: &[EventAppend],
    ) -> Result<NotificationWrite, StoreError> {
        let script: &Script = if events.is_empty() {
            &APPLY
        } else {
            self.register_issuer_outbox_shard(&op.issuer_id).await?;
            &APPLY_WITH_EVENTS
        };
        let mut inv = self.update_invocation_op(script, op)?;
        inv.arg(format!("{}nevt:{dedup_key}", self.iss(&op.issuer_id)))
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        let moved = if events.is_empty() {
            Vec::new()
        } else {
            self.issuer_event_args(&mut inv, &op.issuer_id, events)?
        };
        let r: i64 = self.invoke_write(inv).await?;
        if r == 3 {
            return Ok(NotificationWrite::Duplicate);
        }
        cas_result(r)?;
        self.move_issuer_events(&op.issuer_id, &moved).await;
        Ok(NotificationWrite::Applied)
    }

    async fn list_operations(
        &self,
        issuer: &IssuerId,
        filter: &OperationFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<OperationPage, StoreError> {
        let p = self.iss(issuer);
        let (index, post_status) = match (&filter.card_id, filter.status) {
            (Some(c), s) => (format!("{p}ops:card:{c}"), s),
            (None, Some(s)) => (self.status_key(issuer, s), None),
            (None, None) => (format!("{p}ops"), None),
        };
        let mut items = Vec::new();
        let mut from = cursor.map(|c| format!("({c}"));
        let mut exhausted = false;
        for _ in 0..MAX_ROUNDS {
            // One more than needed: it tells whether a next page exists.
            let want = limit + 1 - items.len();
            let mut cmd = redis::cmd("ZREVRANGEBYLEX");
            cmd.arg(&index)
                .arg(from.as_deref().unwrap_or("+"))
                .arg("-")
                .arg("LIMIT")
                .arg(0)
                .arg(want);
            let keys: Vec<String> = self.query(cmd).await?;
            exhausted = keys.len() < want;
            if let Some(last) = keys.last() {
                from = Some(format!("({last}"));
            }
            if !keys.is_empty() {
                let mut cmd = redis::cmd("MGET");
                for k in &keys {
                    let id = k.split_once(':').map_or("", |(_, id)| id);
                    cmd.arg(format!("{p}op:{id}"));
                }
                let recs: Vec<Option<Vec<u8>>> = self.query(cmd).await?;
                for json in recs.into_iter().flatten() {
                    let op: IssuerOperation = decode("issuer operation", &json)?;
                    if post_status.is_none_or(|s| s == op.status) {
                        items.push(op);
                    }
                }
            }
            if items.len() > limit || exhausted {
                break;
            }
        }
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(IssuerOperation::sort_key)
        } else if !exhausted {
            // Out of rounds on a sparse filter: continue from the last key looked at.
            from.map(|f| f.trim_start_matches('(').to_owned())
        } else {
            None
        };
        Ok(OperationPage { items, next })
    }

    async fn due_operations(
        &self,
        issuer: &IssuerId,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<OperationId>, StoreError> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(format!("{}due", self.iss(issuer)))
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit);
        let ids: Vec<String> = self.query(cmd).await?;
        Ok(ids.iter().filter_map(|i| OperationId::parse(i)).collect())
    }
}
