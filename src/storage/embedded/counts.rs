//! [`TokenCountStore`] on the embedded redb file. Tables (see `docs/storage.md`, "Token counts"):
//!
//! - `token_counts` (merchant id, status label) -> number of the merchant's tokens in it,
//!   adjusted inside the write transaction of every token write (`embedded.rs`);
//! - `token_counts_progress` `"backfill"` -> (done, merchant id, token id): the backfill's
//!   watermark. Tokens whose key is at or before it are counted; writes to tokens after it
//!   leave the counts alone, and the backfill counts those tokens, at their status then, when
//!   it passes them. redb serializes write transactions, so this is exact.
//!
//! A file created empty is complete from the start; a file that already holds tokens when the
//! counts first appear starts with nothing counted (`open` checks that in O(1)).

use async_trait::async_trait;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{EmbeddedStore, TOKENS, begin_write};
use crate::domain::ports::StoreError;
use crate::domain::ports::counts::{TokenCountStore, TokenCounts, count_label};
use crate::domain::token::TokenRecord;

/// (merchant id, status label) -> tokens.
const COUNTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("token_counts");
/// `"backfill"` -> (complete, merchant id, token id of the last counted record).
const PROGRESS: TableDefinition<&str, (bool, &str, &str)> =
    TableDefinition::new("token_counts_progress");
const BACKFILL: &str = "backfill";

/// Creates the tables; on the first open with counts, records whether a backfill is needed.
/// Reads one row of `tokens` at most.
pub(crate) fn init_counts(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(COUNTS)?;
    let mut progress = txn.open_table(PROGRESS)?;
    if progress.get(BACKFILL)?.is_none() {
        let empty = txn.open_table(TOKENS)?.first()?.is_none();
        progress.insert(BACKFILL, (empty, "", ""))?;
    }
    Ok(())
}

/// Whether token (`merchant`, `token`) is included in the counts, so a write to it must adjust
/// them. Call with no `tokens` table handle needed.
pub(crate) fn is_counted(
    txn: &WriteTransaction,
    merchant: &str,
    token: &str,
) -> Result<bool, StoreError> {
    let progress = txn.open_table(PROGRESS)?;
    let Some(g) = progress.get(BACKFILL)? else {
        return Ok(true);
    };
    let (done, m, t) = g.value();
    Ok(done || (merchant, token) <= (m, t))
}

/// Adds `delta` to `merchant`'s count of `status` (by its label). A count at zero is removed.
pub(crate) fn adjust(
    txn: &WriteTransaction,
    merchant: &str,
    status: &str,
    delta: i64,
) -> Result<(), StoreError> {
    let label = count_label(status);
    let mut counts = txn.open_table(COUNTS)?;
    let cur = counts.get((merchant, label))?.map_or(0, |g| g.value());
    let next = cur.saturating_add_signed(delta);
    if next == 0 {
        counts.remove((merchant, label))?;
    } else {
        counts.insert((merchant, label), next)?;
    }
    Ok(())
}

/// Moves one counted token from `before` to `after` (`None`: not there).
pub(crate) fn moved(
    txn: &WriteTransaction,
    merchant: &str,
    token: &str,
    before: Option<&str>,
    after: Option<&str>,
) -> Result<(), StoreError> {
    if before.map(count_label) == after.map(count_label) || !is_counted(txn, merchant, token)? {
        return Ok(());
    }
    if let Some(b) = before {
        adjust(txn, merchant, b, -1)?;
    }
    if let Some(a) = after {
        adjust(txn, merchant, a, 1)?;
    }
    Ok(())
}

#[async_trait]
impl TokenCountStore for EmbeddedStore {
    async fn token_counts(&self) -> Result<TokenCounts, StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let complete = txn
                .open_table(PROGRESS)?
                .get(BACKFILL)?
                .is_none_or(|g| g.value().0);
            let mut counts = TokenCounts::zero(complete);
            for row in txn.open_table(COUNTS)?.iter()? {
                let (k, v) = row?;
                let (_, label) = k.value();
                counts.add(label, i64::try_from(v.value()).unwrap_or(i64::MAX));
            }
            Ok(counts)
        })
        .await
    }

    async fn backfill_token_counts(&self, batch: usize) -> Result<bool, StoreError> {
        let batch = batch.max(1);
        self.run(move |db| {
            let txn = begin_write(db)?;
            let (done, after_m, after_t) = match txn.open_table(PROGRESS)?.get(BACKFILL)? {
                Some(g) => {
                    let (d, m, t) = g.value();
                    (d, m.to_owned(), t.to_owned())
                }
                None => (true, String::new(), String::new()),
            };
            if done {
                return Ok(true);
            }
            // (merchant id, token id, status) of the next records after the watermark.
            let mut page: Vec<(String, String, String)> = Vec::with_capacity(batch);
            {
                let tokens = txn.open_table(TOKENS)?;
                for row in tokens.range((after_m.as_str(), after_t.as_str())..)? {
                    let (k, v) = row?;
                    let (m, t) = k.value();
                    if (m, t) == (after_m.as_str(), after_t.as_str()) {
                        continue;
                    }
                    if page.len() == batch {
                        break;
                    }
                    let rec: TokenRecord = serde_json::from_slice(v.value()).map_err(|e| {
                        StoreError::Corrupt(format!(
                            "token record is not valid JSON ({:?} error at line {}, column {})",
                            e.classify(),
                            e.line(),
                            e.column()
                        ))
                    })?;
                    page.push((m.to_owned(), t.to_owned(), rec.status.as_str().to_owned()));
                }
            }
            for (m, _, status) in &page {
                adjust(&txn, m, status, 1)?;
            }
            let complete = page.len() < batch;
            let (last_m, last_t) = page
                .last()
                .map_or((after_m.as_str(), after_t.as_str()), |(m, t, _)| {
                    (m.as_str(), t.as_str())
                });
            txn.open_table(PROGRESS)?
                .insert(BACKFILL, (complete, last_m, last_t))?;
            txn.commit()?;
            Ok(complete)
        })
        .await
    }
}
