//! [`TokenCountStore`] on Redis. Keys (see `docs/storage.md`, "Token counts"):
//!
//! - `P:{m:M}:stats`: hash, status label -> number of the merchant's tokens in it, adjusted by
//!   the token scripts of `redis.rs` in the same step as the token write;
//! - field `c = '1'` of a token hash: the token is included in those counts;
//! - `P:{merchants}:ids`: set of every merchant id, so the counts can be summed without a scan;
//! - the backfill's progress: job state `token-counts-backfill` (`P:job:{...}`).
//!
//! The backfill first walks the merchant records (adding merchants onboarded before the set
//! existed), then every token, counting each one that has no `c` yet (`COUNT_TOKEN`: once,
//! atomically). Both walks use the Cluster-aware `scan_keys`.

use std::sync::LazyLock;

use async_trait::async_trait;
use futures::future::try_join_all;
use redis::Script;

use super::{COUNT_FUNCTIONS, COUNT_TOKEN, RedisStore};
use crate::domain::ports::StoreError;
use crate::domain::ports::counts::{BACKFILL_JOB, TokenCountStore, TokenCounts};
use crate::domain::ports::lifecycle::LifecycleStore;
use crate::domain::token::MerchantId;

static COUNT_TOKEN_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{COUNT_FUNCTIONS}{COUNT_TOKEN}")));

/// Reads of the counts hashes in flight at once (one multiplexed connection; bounded so a large
/// merchant base does not queue thousands of requests at once).
const READ_CONCURRENCY: usize = 64;

/// Backfill progress: `m <cursor>` walking merchants, `t` / `t <cursor>` walking tokens, `done`.
const DONE: &str = "done";

impl RedisStore {
    async fn merchant_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        let mut cursor = "0".to_owned();
        loop {
            let mut cmd = redis::cmd("SSCAN");
            cmd.arg(self.merchant_set_key())
                .arg(&cursor)
                .arg("COUNT")
                .arg(1000);
            let (next, page): (String, Vec<String>) = self.query(cmd).await?;
            ids.extend(page);
            if next == "0" {
                return Ok(ids);
            }
            cursor = next;
        }
    }

    /// Adds the merchants of one page of merchant records to the set.
    async fn backfill_merchants(
        &self,
        cursor: Option<&str>,
        batch: usize,
    ) -> Result<Option<String>, StoreError> {
        let open = self.merchant_key_open();
        let (keys, next) = self.scan_keys(&format!("{open}*}}"), cursor, batch).await?;
        let ids: Vec<&str> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&open)?.strip_suffix('}'))
            .filter(|id| MerchantId::parse(id).is_some())
            .collect();
        if !ids.is_empty() {
            let mut cmd = redis::cmd("SADD");
            cmd.arg(self.merchant_set_key()).arg(ids);
            self.query::<i64>(cmd).await?;
        }
        Ok(next)
    }

    /// Counts the not-yet-counted tokens of one page of the token walk.
    async fn backfill_tokens(
        &self,
        cursor: Option<&str>,
        batch: usize,
    ) -> Result<Option<String>, StoreError> {
        let page = self.scan_tokens(cursor, batch).await?;
        for chunk in page.items.chunks(READ_CONCURRENCY) {
            try_join_all(chunk.iter().map(|(m, t)| {
                let mut inv = COUNT_TOKEN_SCRIPT.key(self.token_key(m, t));
                inv.arg(self.counts_key(m));
                self.invoke::<i64>(inv)
            }))
            .await?;
        }
        Ok(page.next)
    }
}

#[async_trait]
impl TokenCountStore for RedisStore {
    async fn token_counts(&self) -> Result<TokenCounts, StoreError> {
        let complete = self.load_job_state(BACKFILL_JOB).await?.as_deref() == Some(DONE);
        let mut counts = TokenCounts::zero(complete);
        let ids = self.merchant_ids().await?;
        for chunk in ids.chunks(READ_CONCURRENCY) {
            let hashes = try_join_all(chunk.iter().filter_map(|id| {
                let m = MerchantId::parse(id)?;
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(self.counts_key(&m));
                Some(self.query::<Vec<(String, i64)>>(cmd))
            }))
            .await?;
            for (status, n) in hashes.into_iter().flatten() {
                counts.add(&status, n);
            }
        }
        Ok(counts)
    }

    async fn backfill_token_counts(&self, batch: usize) -> Result<bool, StoreError> {
        let state = self.load_job_state(BACKFILL_JOB).await?;
        let next_state = match state.as_deref() {
            Some(DONE) => return Ok(true),
            Some(s) if s == "t" || s.starts_with("t ") => {
                let cursor = s.strip_prefix("t ");
                match self.backfill_tokens(cursor, batch).await? {
                    Some(c) => format!("t {c}"),
                    None => DONE.to_owned(),
                }
            }
            // Not started (or unreadable progress: starting over is always safe).
            other => {
                let cursor = other.and_then(|s| s.strip_prefix("m "));
                match self.backfill_merchants(cursor, batch).await? {
                    Some(c) => format!("m {c}"),
                    None => "t".to_owned(),
                }
            }
        };
        self.save_job_state(BACKFILL_JOB, Some(&next_state)).await?;
        Ok(next_state == DONE)
    }
}
