//! The customer-wallet use cases on [`Services`] (`domain::wallet`): list a customer's tokens,
//! and delete all of them (a "forget me" request), each through the single-token delete path.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use futures::stream::{self, StreamExt};

use super::Services;
use crate::domain::error::DomainError;
use crate::domain::merchant::Merchant;
use crate::domain::ports::counts::COUNT_LABELS;
use crate::domain::provider::LifecycleAction;
use crate::domain::token::{MerchantId, TokenId, TokenStatus};
use crate::domain::wallet::{WalletKey, WalletPage, check_customer_reference};

/// Tokens one delete-all call deletes at most: each is a D1 call, and the request has a time
/// budget (`server.request_timeout_ms`). More are left for the next call (`complete: false`).
pub const MAX_DELETES_PER_CALL: usize = 50;
/// D1 deletes in flight at once for one call: quicker than one by one, without letting one
/// customer's request take the whole D1 concurrency budget.
const DELETE_CONCURRENCY: usize = 4;
/// Index page size while collecting the tokens to delete.
const COLLECT_PAGE: usize = 100;

/// What a delete-all call did.
#[derive(Debug, Default)]
pub struct CustomerDeletion {
    /// Tokens this call deleted (they are `DELETED` now), newest first.
    pub deleted: Vec<TokenId>,
    /// Tokens it could not delete, with the reason; they stay listed and a next call retries
    /// them.
    pub failed: Vec<(TokenId, DomainError)>,
    /// False when the customer had more live tokens than one call deletes.
    pub complete: bool,
}

impl Services {
    /// Whether the wallet index holds every token (its backfill, `domain::wallet_index`, has
    /// completed). Asks the store until it says yes, then never again: completion is final.
    pub async fn wallet_index_complete(&self) -> Result<bool, DomainError> {
        if self.wallet_index_ready.load(Ordering::Acquire) {
            return Ok(true);
        }
        let complete = self.store.wallet_index_complete().await?;
        if complete {
            self.wallet_index_ready.store(true, Ordering::Release);
        }
        Ok(complete)
    }

    /// One page of `customer`'s tokens at `merchant`, newest first (`status`: a status label,
    /// see `domain::wallet::status_label`), and whether the wallet index was complete when it
    /// was read (false: tokens stored before the index existed may be missing).
    pub async fn list_customer_tokens(
        &self,
        merchant: &MerchantId,
        customer: &str,
        status: Option<&'static str>,
        after: Option<&WalletKey>,
        limit: usize,
    ) -> Result<(WalletPage, bool), DomainError> {
        check_customer_reference(customer)?;
        // Before the page: a backfill that completes between the two reads then reports
        // incomplete, never a page read before completion as complete.
        let complete = self.wallet_index_complete().await?;
        let page = self
            .store
            .list_customer_tokens(merchant, customer, status, after, limit)
            .await?;
        Ok((page, complete))
    }

    /// Deletes every live (not yet `DELETED`) token of `customer`, up to
    /// [`MAX_DELETES_PER_CALL`], each exactly as `DELETE /v1/tokens/{id}` does (D1 first, then
    /// the record becomes a `DELETED` tombstone, with its webhook event). Failures are reported
    /// per token, never abort the others. Idempotent: tombstones are not live, so a repeat finds
    /// only what is left (nothing, once everything is deleted).
    ///
    /// Refused with [`DomainError::WalletIndexBuilding`], deleting nothing, while the wallet
    /// index is incomplete: the index may not list the customer's older tokens yet, and a
    /// "forget me" that reported success without them would be wrong where it matters most.
    /// The caller retries later (the backfill takes minutes), and then deletes everything.
    pub async fn delete_customer_tokens(
        &self,
        merchant: &Merchant,
        customer: &str,
    ) -> Result<CustomerDeletion, DomainError> {
        check_customer_reference(customer)?;
        if !self.wallet_index_complete().await? {
            return Err(DomainError::WalletIndexBuilding);
        }
        // The live tokens, from the per-status indexes (tombstones are never read).
        let mut live: Vec<WalletKey> = Vec::new();
        let mut seen: HashSet<TokenId> = HashSet::new();
        let mut complete = true;
        'statuses: for label in COUNT_LABELS
            .iter()
            .copied()
            .filter(|l| *l != TokenStatus::Deleted.label())
        {
            let mut after: Option<WalletKey> = None;
            loop {
                let page = self
                    .store
                    .list_customer_tokens(
                        &merchant.id,
                        customer,
                        Some(label),
                        after.as_ref(),
                        COLLECT_PAGE,
                    )
                    .await?;
                for rec in page.tokens {
                    if seen.insert(rec.id.clone()) {
                        live.push(WalletKey::of(&rec));
                    }
                }
                if live.len() > MAX_DELETES_PER_CALL {
                    complete = false;
                    break 'statuses;
                }
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        // Newest first, whatever status each is in. Beyond one call's worth, the rest (not all
        // collected) wait for the next call.
        live.sort_unstable_by(|a, b| b.cmp(a));
        live.truncate(MAX_DELETES_PER_CALL);
        let ids: Vec<TokenId> = live.iter().filter_map(WalletKey::token_id).collect();
        let results: Vec<(TokenId, Result<(), DomainError>)> = stream::iter(ids)
            .map(|id| async move {
                let r = self.lifecycle(merchant, &id, LifecycleAction::Delete).await;
                (id, r.map(|_| ()))
            })
            .buffered(DELETE_CONCURRENCY)
            .collect()
            .await;
        let mut out = CustomerDeletion {
            complete,
            ..CustomerDeletion::default()
        };
        for (id, r) in results {
            match r {
                Ok(()) => out.deleted.push(id),
                // Removed meanwhile (a failed reservation undone): nothing left to delete.
                Err(DomainError::TokenNotFound) => {}
                Err(e) => out.failed.push((id, e)),
            }
        }
        Ok(out)
    }
}
