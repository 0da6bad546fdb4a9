//! The one-time backfill of the customer wallet index on the embedded redb file
//! (`docs/storage.md`, "Customer wallets"): tokens stored before the `wallet_index` table existed
//! have no rows in it.
//!
//! `wallet_index_progress` `"backfill"` -> (complete, merchant id, token id): a watermark over
//! the `tokens` table. Each step, one write transaction, reads the next tokens after it and adds
//! their rows at their status then, and moves it. Every token write since the index exists
//! removes the old record's rows and adds the new one's (`wallet_rows`), whether or not the
//! backfill has passed the token, and redb serializes write transactions, so adding the rows of
//! a token that a write already indexed inserts the same keys again (no duplicate), and a token
//! removed before the step reaches it is simply not there to index.
//!
//! A file that holds no token when the index first appears is complete from the start (`open`
//! checks one row).

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{EmbeddedStore, TOKENS, begin_write, decode, wallet_rows};
use crate::domain::ports::StoreError;
use crate::domain::token::TokenRecord;

/// `"backfill"` -> (complete, merchant id, token id of the last indexed record).
const PROGRESS: TableDefinition<&str, (bool, &str, &str)> =
    TableDefinition::new("wallet_index_progress");
const BACKFILL: &str = "backfill";

/// Creates the progress table; on the first open with it, records whether a backfill is needed.
/// Reads one row of `tokens` at most.
pub(crate) fn init_wallet_index(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut progress = txn.open_table(PROGRESS)?;
    if progress.get(BACKFILL)?.is_none() {
        let empty = txn.open_table(TOKENS)?.first()?.is_none();
        progress.insert(BACKFILL, (empty, "", ""))?;
    }
    Ok(())
}

impl EmbeddedStore {
    /// Whether the backfill has completed (a missing row: the table predates nothing, complete).
    pub(super) async fn wallet_backfill_done(&self) -> Result<bool, StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            Ok(txn
                .open_table(PROGRESS)?
                .get(BACKFILL)?
                .is_none_or(|g| g.value().0))
        })
        .await
    }

    /// Indexes the next `batch` tokens after the watermark, in one write transaction.
    pub(super) async fn wallet_backfill_step(&self, batch: usize) -> Result<bool, StoreError> {
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
            // (merchant id, token id) of the key, and the record.
            let mut page: Vec<(String, String, TokenRecord)> = Vec::with_capacity(batch);
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
                    let rec = decode("token record", v.value())?;
                    page.push((m.to_owned(), t.to_owned(), rec));
                }
            }
            for (_, _, rec) in &page {
                wallet_rows(&txn, rec, true)?;
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
