//! The port to D1's issuer-side API ("banking" base URL): what the issuer use cases need from
//! D1, in domain types. `src/d1/issuer.rs` implements it on the D1 client (mTLS, OAuth, the
//! one retrying request path and its circuit breaker).

use async_trait::async_trait;

use super::error::ProviderError;
use super::issuer_ops::{OperationCall, OperationKind, OperationTarget, RemoteOperation};

/// A call that starts an asynchronous D1 operation.
#[derive(Debug, Clone)]
pub struct StartOperation<'a> {
    pub d1_issuer_id: &'a str,
    pub kind: &'a OperationKind,
    pub target: &'a OperationTarget,
    /// Our idempotency anchor: D1 answers a repeated id with the operation it already has.
    pub issuer_request_id: &'a str,
    pub call: &'a OperationCall,
}

/// D1's synchronous answer to a call that starts an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationAck {
    pub d1_operation_id: String,
}

/// One Click to Pay profile, as D1 returns it (one per directory at most).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClickToPayProfile {
    pub directory: Option<String>,
    pub consumer_id: Option<String>,
    pub first_name: Option<String>,
    pub middle_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub language: Option<String>,
    /// First 6 and last 4 digits only; the full number never leaves the D1 client.
    pub masked_pan: Option<String>,
    pub expiry: Option<String>,
    pub cardholder_name: Option<String>,
    pub billing_address: Option<serde_json::Value>,
}

#[async_trait]
pub trait IssuerProvider: Send + Sync + 'static {
    /// Starts the operation `op.call` describes. `ProviderError::Rejected` for D1's 4xx (its
    /// `errorCode` kept); `Unavailable`, `Timeout` or `BadResponse` when the outcome is unknown.
    async fn start_operation(&self, op: &StartOperation<'_>)
    -> Result<OperationAck, ProviderError>;

    /// D1's get-operation.
    async fn get_operation(
        &self,
        d1_issuer_id: &str,
        d1_operation_id: &str,
    ) -> Result<RemoteOperation, ProviderError>;

    /// The Click to Pay profiles of a consumer or a card, aggregated over D1's directories.
    async fn click_to_pay_profiles(
        &self,
        d1_issuer_id: &str,
        target: &OperationTarget,
    ) -> Result<Vec<ClickToPayProfile>, ProviderError>;
}
