//! The network-token provider port: what the domain needs from Thales D1, in domain types.
//!
//! `crate::d1::D1Client` implements it over the real protocol; the domain never sees HTTP,
//! OAuth or JWE.

use async_trait::async_trait;
use zeroize::Zeroizing;

use super::error::ProviderError;
use super::token::{TokenStatus, Usage};
use tokengate_cards::{Expiry, Pan};

/// A network token as the provider describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderToken {
    pub d1_token_id: String,
    pub status: TokenStatus,
    pub last4: Option<String>,
    pub expiry: Option<Expiry>,
    pub par: Option<String>,
}

/// Customer-initiated or merchant-initiated transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TransactionType {
    #[serde(rename = "CIT")]
    Cit,
    #[serde(rename = "MIT")]
    Mit,
}

impl TransactionType {
    /// The wire value (`CIT` / `MIT`).
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionType::Cit => "CIT",
            TransactionType::Mit => "MIT",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Amount {
    /// Minor units (cents).
    pub value: u64,
    /// ISO 4217 alphabetic code.
    pub currency: String,
}

/// Token credentials for one card-not-present authorization. Never stored, never logged.
pub struct Cryptogram {
    pub token_number: Zeroizing<String>,
    pub expiry: Expiry,
    pub cryptogram: Zeroizing<String>,
    pub eci: String,
}

impl std::fmt::Debug for Cryptogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cryptogram(<redacted>)")
    }
}

/// Lifecycle actions the gateway can ask the provider for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleAction {
    Suspend,
    Resume,
    Delete,
}

#[async_trait]
pub trait NetworkTokenProvider: Send + Sync + 'static {
    /// Onboards a merchant under our merchant gateway; returns the provider's merchant id.
    async fn onboard_merchant(&self, name: &str) -> Result<String, ProviderError>;

    /// Requests a network token. `request_id` is stable across retries of the same
    /// tokenization, so the provider can recognise a retry and never mint a second token.
    async fn create_token(
        &self,
        d1_merchant_id: &str,
        pan: &Pan,
        expiry: &Expiry,
        usage: Usage,
        request_id: &str,
    ) -> Result<ProviderToken, ProviderError>;

    async fn get_token(
        &self,
        d1_merchant_id: &str,
        d1_token_id: &str,
    ) -> Result<ProviderToken, ProviderError>;

    /// Looks a tokenization up by the `request_id` given to [`Self::create_token`]; `NotFound`
    /// when the provider never received it. Used to repair after a crash or timeout.
    async fn find_token_by_request(
        &self,
        d1_merchant_id: &str,
        request_id: &str,
    ) -> Result<ProviderToken, ProviderError>;

    async fn create_cryptogram(
        &self,
        d1_merchant_id: &str,
        d1_token_id: &str,
        transaction_type: TransactionType,
        amount: Option<&Amount>,
    ) -> Result<Cryptogram, ProviderError>;

    /// Suspends, resumes or deletes the token upstream; returns its new state.
    async fn lifecycle(
        &self,
        d1_merchant_id: &str,
        d1_token_id: &str,
        action: LifecycleAction,
    ) -> Result<ProviderToken, ProviderError>;
}
