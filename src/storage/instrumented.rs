//! A [`TokenStore`] wrapper that times every operation and counts failures
//! (`tokengate_store_operation_duration_seconds`, `tokengate_store_errors_total`; see
//! src/observability.rs). It changes no behaviour: every call and every answer passes through.
//!
//! Wrapping the trait object (rather than instrumenting each backend) measures what the domain
//! sees, for Redis and the embedded store alike, in one place. Labels are the operation name
//! and the outcome only: never a key, an id or a value.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::domain::merchant::{ApiKeyHash, Merchant};
use crate::domain::ports::outbox::EventAppend;
use crate::domain::ports::{
    CheckAt, IdempotencyBegin, InsertOutcome, StoreError, StoredResponse, TokenStore,
};
use crate::domain::token::{MerchantId, TokenId, TokenRecord};
use crate::domain::wallet::{WalletKey, WalletPage};
use crate::observability::{StoreOpMetrics, StoreOutcome};

/// Times `inner`'s operations.
pub struct InstrumentedStore {
    inner: Arc<dyn TokenStore>,
}

impl InstrumentedStore {
    pub fn new(inner: Arc<dyn TokenStore>) -> InstrumentedStore {
        InstrumentedStore { inner }
    }
}

/// Runs `fut`, records its latency and outcome in `metrics`, and returns its result untouched.
async fn timed<T>(
    metrics: &'static StoreOpMetrics,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = fut.await;
    let elapsed: Duration = started.elapsed();
    metrics.record(outcome(result.as_ref().err()), elapsed);
    result
}

/// `timed!("op", fut)`: [`timed`] with the metric handles of operation `op`, kept in a `static`
/// of their own per call site (resolved once per outcome, not looked up per call).
macro_rules! timed {
    ($op:literal, $fut:expr $(,)?) => {{
        static METRICS: StoreOpMetrics = StoreOpMetrics::new($op);
        timed(&METRICS, $fut)
    }};
}

#[async_trait]
impl TokenStore for InstrumentedStore {
    async fn ping(&self) -> Result<(), StoreError> {
        timed!("ping", self.inner.ping()).await
    }

    async fn insert_merchant(&self, m: &Merchant, key: &ApiKeyHash) -> Result<(), StoreError> {
        timed!("insert_merchant", self.inner.insert_merchant(m, key)).await
    }

    async fn get_merchant(&self, id: &MerchantId) -> Result<Option<Merchant>, StoreError> {
        timed!("get_merchant", self.inner.get_merchant(id)).await
    }

    async fn merchant_by_api_key(&self, key: &ApiKeyHash) -> Result<Option<Merchant>, StoreError> {
        timed!("merchant_by_api_key", self.inner.merchant_by_api_key(key)).await
    }

    async fn merchant_by_d1_id(
        &self,
        d1_merchant_id: &str,
    ) -> Result<Option<Merchant>, StoreError> {
        timed!(
            "merchant_by_d1_id",
            self.inner.merchant_by_d1_id(d1_merchant_id),
        )
        .await
    }

    async fn insert_token_scheduled(
        &self,
        rec: &TokenRecord,
        check: CheckAt,
    ) -> Result<InsertOutcome, StoreError> {
        timed!(
            "insert_token",
            self.inner.insert_token_scheduled(rec, check),
        )
        .await
    }

    async fn get_token(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<Option<TokenRecord>, StoreError> {
        timed!("get_token", self.inner.get_token(merchant, id)).await
    }

    async fn read_token(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<Option<std::sync::Arc<TokenRecord>>, StoreError> {
        timed!("read_token", self.inner.read_token(merchant, id)).await
    }

    async fn read_by_fingerprint(
        &self,
        merchant: &MerchantId,
        pan_fingerprint: &str,
    ) -> Result<Option<std::sync::Arc<TokenRecord>>, StoreError> {
        timed!(
            "read_by_fingerprint",
            self.inner.read_by_fingerprint(merchant, pan_fingerprint),
        )
        .await
    }

    async fn update_token_scheduled(
        &self,
        rec: &TokenRecord,
        event: Option<&EventAppend>,
        check: CheckAt,
    ) -> Result<(), StoreError> {
        timed!(
            "update_token",
            self.inner.update_token_scheduled(rec, event, check),
        )
        .await
    }

    async fn update_token_if_no_endpoints(
        &self,
        rec: &TokenRecord,
        check: CheckAt,
    ) -> Result<bool, StoreError> {
        timed!(
            "update_token",
            self.inner.update_token_if_no_endpoints(rec, check),
        )
        .await
    }

    async fn remove_token(&self, merchant: &MerchantId, id: &TokenId) -> Result<(), StoreError> {
        timed!("remove_token", self.inner.remove_token(merchant, id)).await
    }

    async fn find_by_fingerprint(
        &self,
        merchant: &MerchantId,
        pan_fingerprint: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        timed!(
            "find_by_fingerprint",
            self.inner.find_by_fingerprint(merchant, pan_fingerprint),
        )
        .await
    }

    async fn find_by_d1_token(
        &self,
        merchant: &MerchantId,
        d1_token_id: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        timed!(
            "find_by_d1_token",
            self.inner.find_by_d1_token(merchant, d1_token_id),
        )
        .await
    }

    async fn list_customer_tokens(
        &self,
        merchant: &MerchantId,
        customer: &str,
        status: Option<&'static str>,
        after: Option<&WalletKey>,
        limit: usize,
    ) -> Result<WalletPage, StoreError> {
        timed!(
            "list_customer_tokens",
            self.inner
                .list_customer_tokens(merchant, customer, status, after, limit),
        )
        .await
    }

    async fn wallet_index_complete(&self) -> Result<bool, StoreError> {
        timed!("wallet_index_complete", self.inner.wallet_index_complete()).await
    }

    async fn backfill_wallet_index(&self, batch: usize) -> Result<bool, StoreError> {
        timed!(
            "backfill_wallet_index",
            self.inner.backfill_wallet_index(batch),
        )
        .await
    }

    async fn idempotency_begin(
        &self,
        scope: &str,
        key: &str,
        request_digest: &str,
        lock_ttl: Duration,
    ) -> Result<IdempotencyBegin, StoreError> {
        timed!(
            "idempotency_begin",
            self.inner
                .idempotency_begin(scope, key, request_digest, lock_ttl),
        )
        .await
    }

    async fn idempotency_complete(
        &self,
        scope: &str,
        key: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        timed!(
            "idempotency_complete",
            self.inner.idempotency_complete(scope, key, response, ttl),
        )
        .await
    }

    async fn idempotency_abort(&self, scope: &str, key: &str) -> Result<(), StoreError> {
        timed!(
            "idempotency_abort",
            self.inner.idempotency_abort(scope, key),
        )
        .await
    }
}

/// The `outcome` label of a store call. `Conflict` and `NotFound` are normal answers
/// (optimistic concurrency, idempotent removes) and only appear as outcomes.
fn outcome(err: Option<&StoreError>) -> StoreOutcome {
    match err {
        None => StoreOutcome::Ok,
        Some(StoreError::Conflict) => StoreOutcome::Conflict,
        Some(StoreError::NotFound) => StoreOutcome::NotFound,
        Some(StoreError::Unavailable(_)) => StoreOutcome::Unavailable,
        Some(StoreError::Corrupt(_)) => StoreOutcome::Corrupt,
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use super::*;
    use crate::storage::embedded::EmbeddedStore;

    #[tokio::test]
    async fn passes_calls_through_and_records_them() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn TokenStore> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let store = InstrumentedStore::new(inner);
        let handle = crate::observability::handle();
        store.ping().await.unwrap();
        let m = MerchantId::generate();
        let id = TokenId::generate();
        assert!(store.get_token(&m, &id).await.unwrap().is_none());
        let text = handle.render();
        assert!(
            text.contains(
                "tokengate_store_operation_duration_seconds_count{operation=\"get_token\",outcome=\"ok\"}"
            ),
            "{text}"
        );
        assert!(!text.contains(id.as_str()), "token id in a label");
    }
}
