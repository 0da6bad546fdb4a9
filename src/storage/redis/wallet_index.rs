//! The one-time backfill of the customer wallet index on Redis (`docs/storage.md`, "Customer
//! wallets"): tokens stored before the index existed have no `w` field in their hash and no
//! entry in their customer's sorted sets. The backfill walks every token (`scan_tokens`, which
//! visits every primary of a Cluster) and indexes each hash without `w` in a script that reads
//! the token in the same step ([`WALLET_INDEX_TOKEN`]): a token removed meanwhile is not indexed
//! again, and one written meanwhile (the token scripts index every write and set `w`) is left
//! alone, so each token ends up with exactly its two entries whatever runs concurrently.
//!
//! Progress is the job state `wallet-index-backfill` (`P:job:{...}`): `t <walk cursor>` while
//! walking, `done` once complete. It is saved after each page, so the next step, on this or any
//! instance, continues from there; a page indexed twice (a crash before the save) changes
//! nothing, since indexing is idempotent per token.

use std::sync::LazyLock;

use futures::future::try_join_all;
use redis::Script;

use super::{COUNT_FUNCTIONS, RedisStore, WALLET_FUNCTIONS, WALLET_INDEX_TOKEN, decode};
use crate::domain::ports::StoreError;
use crate::domain::ports::lifecycle::LifecycleStore;
use crate::domain::token::{MerchantId, TokenId, TokenRecord};
use crate::domain::wallet::{BACKFILL_JOB, WalletKey};

static WALLET_INDEX_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{COUNT_FUNCTIONS}{WALLET_FUNCTIONS}{WALLET_INDEX_TOKEN}"
    ))
});

/// Tokens indexed at once (one multiplexed connection; bounded so a large page does not queue
/// hundreds of requests in front of the API traffic).
const CONCURRENCY: usize = 64;
/// Reads of one token before giving up on this step, when each read is overtaken by a write of
/// an older build (which changes the record without indexing it). The step then fails and is
/// retried later from the same saved cursor.
const READ_ATTEMPTS: usize = 3;
/// Scan pages per step at most (each one `SCAN` on one node), however few tokens they hold.
const MAX_PAGES: usize = 8;
/// The saved progress once every token has been visited.
const DONE: &str = "done";

impl RedisStore {
    /// Whether the backfill has completed.
    pub(super) async fn wallet_backfill_done(&self) -> Result<bool, StoreError> {
        Ok(self.load_job_state(BACKFILL_JOB).await?.as_deref() == Some(DONE))
    }

    /// One page of the token walk, each token indexed unless it already is.
    pub(super) async fn wallet_backfill_step(&self, batch: usize) -> Result<bool, StoreError> {
        let state = self.load_job_state(BACKFILL_JOB).await?;
        // Not started, or unreadable progress: starting over is always safe (idempotent).
        let cursor = match state.as_deref() {
            Some(DONE) => return Ok(true),
            Some(s) => s.strip_prefix("t "),
            None => None,
        };
        let mut cursor = cursor.map(str::to_owned);
        let (mut visited, mut pages) = (0, 0);
        // Short pages (a node with few tokens, the end of a Cluster node's walk) do not end
        // the step: a step reads up to `batch` tokens over at most `MAX_PAGES` pages, so a
        // Cluster with little data completes in one step rather than one per primary.
        let next = loop {
            let page = self.scan_tokens(cursor.as_deref(), batch.max(1)).await?;
            for chunk in page.items.chunks(CONCURRENCY) {
                try_join_all(chunk.iter().map(|(m, t)| self.index_stored_token(m, t))).await?;
            }
            visited += page.items.len();
            pages += 1;
            match page.next {
                Some(c) if visited < batch && pages < MAX_PAGES => cursor = Some(c),
                other => break other,
            }
        };
        let next = next.map_or_else(|| DONE.to_owned(), |c| format!("t {c}"));
        self.save_job_state(BACKFILL_JOB, Some(&next)).await?;
        Ok(next == DONE)
    }

    /// Indexes one token if it has no `w` yet. The index key is a hash of the customer
    /// reference, which the script cannot compute (Redis Lua has no SHA-256), so the record is
    /// read here first and the script checks it is still the version read.
    async fn index_stored_token(&self, m: &MerchantId, t: &TokenId) -> Result<(), StoreError> {
        let key = self.token_key(m, t);
        for _ in 0..READ_ATTEMPTS {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&key).arg("v").arg("w").arg("d");
            let (version, indexed, json): (Option<String>, Option<String>, Option<String>) =
                self.query(cmd).await?;
            // Gone, or already indexed (by a write since the index exists, or an earlier step).
            let (Some(version), None, Some(json)) = (version, indexed, json) else {
                return Ok(());
            };
            let rec: TokenRecord = decode("token record", &json)?;
            // The merchant of the key, not of the JSON: the index must be in the token's slot.
            let index = rec
                .customer_reference
                .as_deref()
                .map_or_else(String::new, |c| self.wallet_key(m, c));
            let mut inv = WALLET_INDEX_SCRIPT.key(&key);
            inv.arg(&version)
                .arg(&index)
                .arg(WalletKey::of(&rec).as_str());
            match self.invoke::<i64>(inv).await? {
                2 => continue, // changed since read: read it again
                _ => return Ok(()),
            }
        }
        Err(StoreError::Conflict)
    }
}
