//! The token store: merchants, tokens with their dedup index, and idempotency records.

use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;
use super::outbox::EventAppend;
use crate::domain::merchant::{ApiKeyHash, Merchant};
use crate::domain::token::{MerchantId, TokenId, TokenRecord};
use crate::domain::wallet::{WalletKey, WalletPage};

/// Result of [`TokenStore::insert_token`].
#[derive(Debug)]
pub enum InsertOutcome {
    Inserted,
    /// A live token already exists for this merchant and PAN fingerprint; nothing was written.
    Existing(Box<TokenRecord>),
}

/// What a token write does to the token's reconciliation check (`domain::schedule`), in the
/// same atomic step as the write itself. The domain decides the time; the store only writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckAt {
    /// The schedule is not touched (callers that keep it in step themselves, or not at all).
    Unchanged,
    /// The token is (re)scheduled for a check at this Unix time in milliseconds.
    At(u64),
    /// The token is taken off the schedule (a terminal status).
    Never,
}

/// Result of [`TokenStore::idempotency_begin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// No record: the caller owns the key and must complete or abort it.
    Started,
    /// Another request with this key is being processed.
    InFlight { same_request: bool },
    /// A request with this key completed; its response is stored.
    Completed(StoredResponse),
}

/// A response kept for idempotent replay. Bodies never contain card numbers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredResponse {
    /// Keyed digest of the request (method, path, body) that produced it.
    pub request_digest: String,
    pub status: u16,
    pub body: String,
}

/// The persistence contract of the gateway.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Checks the backend answers (readiness probe).
    async fn ping(&self) -> Result<(), StoreError>;

    // --- merchants --------------------------------------------------------------------------

    /// Stores a merchant and its first API key hash. Ids are random, so there is no duplicate case.
    async fn insert_merchant(&self, m: &Merchant, key: &ApiKeyHash) -> Result<(), StoreError>;
    async fn get_merchant(&self, id: &MerchantId) -> Result<Option<Merchant>, StoreError>;
    /// The merchant an API key belongs to, `None` for an unknown key.
    async fn merchant_by_api_key(&self, key: &ApiKeyHash) -> Result<Option<Merchant>, StoreError>;
    /// The merchant onboarded at D1 under `d1_merchant_id`.
    async fn merchant_by_d1_id(&self, d1_merchant_id: &str)
    -> Result<Option<Merchant>, StoreError>;

    // --- tokens -----------------------------------------------------------------------------

    /// Inserts a token and indexes its PAN fingerprint, unless the merchant already has a live
    /// token with that fingerprint (then returns it and writes nothing). Atomic.
    async fn insert_token(&self, rec: &TokenRecord) -> Result<InsertOutcome, StoreError> {
        self.insert_token_scheduled(rec, CheckAt::Unchanged).await
    }

    /// [`Self::insert_token`], and when it inserts, the token's reconciliation check written as
    /// `check` says **in the same atomic step** (one script on standalone Redis, one redb
    /// transaction), so a reservation is never stored without its check. On a Redis Cluster
    /// the schedule is in another slot: the check is written right after the token, as a
    /// separate command whose failure is logged, not returned (the token is stored).
    async fn insert_token_scheduled(
        &self,
        rec: &TokenRecord,
        check: CheckAt,
    ) -> Result<InsertOutcome, StoreError>;

    async fn get_token(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<Option<TokenRecord>, StoreError>;

    /// [`TokenStore::get_token`] for a read that only answers a client (`GET /v1/tokens/{id}`):
    /// a store may serve it from a cache it keeps coherent with every writer (the Redis store's
    /// tracking cache, `docs/storage.md`). Never the read of a read-modify-write: those use
    /// `get_token`, which always asks the store.
    async fn read_token(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<Option<std::sync::Arc<TokenRecord>>, StoreError> {
        Ok(self.get_token(merchant, id).await?.map(std::sync::Arc::new))
    }

    /// Replaces a token if its stored version is `rec.version - 1`. Keeps the D1 token index in
    /// step with `rec.network_token`, and drops the fingerprint index when the status becomes
    /// `DELETED` (a deleted token is a tombstone: readable, but not a dedup target).
    async fn update_token(&self, rec: &TokenRecord) -> Result<(), StoreError> {
        self.update_token_with(rec, None).await
    }

    /// [`Self::update_token`], and when `event` is given, the webhook event of the change
    /// appended to the outbox **in the same atomic step** (one script on Redis, in the
    /// merchant's slot; one redb transaction): either both are stored or neither is.
    async fn update_token_with(
        &self,
        rec: &TokenRecord,
        event: Option<&EventAppend>,
    ) -> Result<(), StoreError> {
        self.update_token_scheduled(rec, event, CheckAt::Unchanged)
            .await
    }

    /// [`Self::update_token_with`], and when the compare-and-set succeeds, the token's
    /// reconciliation check written as `check` says in the same atomic step (as
    /// [`Self::insert_token_scheduled`], Cluster included). Nothing of it is written on a
    /// conflict or a missing token.
    async fn update_token_scheduled(
        &self,
        rec: &TokenRecord,
        event: Option<&EventAppend>,
        check: CheckAt,
    ) -> Result<(), StoreError>;

    /// [`Self::update_token_scheduled`] without an event, done only if the merchant has no
    /// webhook endpoint at all, checked **in the same atomic step** as the compare-and-set (the
    /// endpoints are in the merchant's slot; one redb transaction). `Ok(true)`: written, and no
    /// endpoint existed at that instant, so the change has no event. `Ok(false)`: nothing
    /// written, because an endpoint exists: the caller then reads the endpoints, builds the
    /// event and writes with `update_token_scheduled`. Saves the endpoint read on the write path
    /// of merchants without webhooks (the new-card activation, issue 13) with today's
    /// semantics: an endpoint registered anywhere before the write is seen by it. Errors as
    /// `update_token_scheduled` (`Conflict`, `NotFound`). No default: a store (or a wrapper
    /// such as the metrics one) that did not implement it would silently never take this path.
    async fn update_token_if_no_endpoints(
        &self,
        rec: &TokenRecord,
        check: CheckAt,
    ) -> Result<bool, StoreError>;

    /// Removes a token and its index entries entirely. Used to undo a reservation when the
    /// upstream tokenization failed, so a failed call leaves nothing behind. Idempotent.
    async fn remove_token(&self, merchant: &MerchantId, id: &TokenId) -> Result<(), StoreError>;

    /// [`TokenStore::find_by_fingerprint`] for the dedup answer of a tokenization: may be served
    /// from the store's coherent cache, as [`TokenStore::read_token`]. A write that follows must
    /// still be atomic in the store (`insert_token` checks the index again; updates are
    /// compare-and-set).
    async fn read_by_fingerprint(
        &self,
        merchant: &MerchantId,
        pan_fingerprint: &str,
    ) -> Result<Option<std::sync::Arc<TokenRecord>>, StoreError> {
        Ok(self
            .find_by_fingerprint(merchant, pan_fingerprint)
            .await?
            .map(std::sync::Arc::new))
    }

    /// The live token for a PAN fingerprint, if any.
    async fn find_by_fingerprint(
        &self,
        merchant: &MerchantId,
        pan_fingerprint: &str,
    ) -> Result<Option<TokenRecord>, StoreError>;

    /// The token that D1 knows as `d1_token_id`.
    async fn find_by_d1_token(
        &self,
        merchant: &MerchantId,
        d1_token_id: &str,
    ) -> Result<Option<TokenRecord>, StoreError>;

    // --- customer wallets (`domain::wallet`) -------------------------------------------------

    /// One page of the merchant's tokens whose `customer_reference` is `customer`, newest first
    /// (see [`WalletKey`]), starting after `after` (exclusive; `None`: the newest). `status` is a
    /// status label (`TokenStatus::label`: `OTHER` matches every status D1 added) or `None` for
    /// every status, tombstones (`DELETED`) included. Reads the wallet index, never the
    /// merchant's other tokens. An unknown customer, or a cursor past the end, is an empty page
    /// (`next: None`), not an error. Index entries are written by `insert_token`,
    /// `update_token` (and `apply_event`) and removed by `remove_token` in the same atomic step,
    /// so a listed token is always in the listed status as of that write; an entry whose record
    /// is gone is skipped.
    async fn list_customer_tokens(
        &self,
        merchant: &MerchantId,
        customer: &str,
        status: Option<&'static str>,
        after: Option<&WalletKey>,
        limit: usize,
    ) -> Result<WalletPage, StoreError>;

    /// Whether every token is in the wallet index: true once the one-time backfill
    /// ([`Self::backfill_wallet_index`]) has indexed the tokens stored before the index existed
    /// (and at once on a store that had none). While false, [`Self::list_customer_tokens`] may
    /// miss a customer's older tokens. Once true it stays true.
    async fn wallet_index_complete(&self) -> Result<bool, StoreError>;

    /// One bounded step (at most about `batch` tokens) of the one-time backfill that indexes
    /// tokens stored before the wallet index existed, each at its status at that moment.
    /// `Ok(true)` once it is complete (then it does nothing). Idempotent per token (an entry is
    /// added at most once, and a token removed meanwhile is not indexed again), so safe on
    /// several instances at once, though callers hold the `domain::wallet::BACKFILL_JOB` lease
    /// to avoid the wasted work; progress is kept in the store, so a step continues where the
    /// last one, on any instance, stopped.
    async fn backfill_wallet_index(&self, batch: usize) -> Result<bool, StoreError>;

    // --- idempotency ------------------------------------------------------------------------

    /// Claims `key` in `scope` for a request, or reports what is already there.
    /// The in-flight claim expires after `lock_ttl` so a crashed request frees its key.
    async fn idempotency_begin(
        &self,
        scope: &str,
        key: &str,
        request_digest: &str,
        lock_ttl: Duration,
    ) -> Result<IdempotencyBegin, StoreError>;

    /// Stores the final response for `key`, kept for `ttl`.
    async fn idempotency_complete(
        &self,
        scope: &str,
        key: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Releases an in-flight claim without storing a response (the request failed in a way a
    /// retry may fix).
    async fn idempotency_abort(&self, scope: &str, key: &str) -> Result<(), StoreError>;
}
