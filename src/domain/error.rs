//! Domain errors: what can go wrong in a use case, independent of HTTP and of the store.
//!
//! the HTTP layer's problem mapping is the one place that turns these into HTTP responses.

use std::time::Duration;

use super::token::TokenStatus;
use tokengate_cards::CardError;

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("{0}")]
    InvalidCard(#[from] CardError),
    #[error("{detail}")]
    Validation { code: &'static str, detail: String },
    #[error("token not found")]
    TokenNotFound,
    #[error("merchant not found")]
    MerchantNotFound,
    #[error("issuer not found")]
    IssuerNotFound,
    #[error("operation not found")]
    OperationNotFound,
    /// A card that was never ordered (physical card orders).
    #[error("no production order for this card")]
    ProductionOrderNotFound,
    /// A card the gateway knows nothing of for this issuer (`GET /v1/issuer/cards/{id}`).
    #[error("no such card for this issuer")]
    IssuerCardNotFound,
    /// The card is deleted at D1: nothing more can be done with it.
    #[error("the card is deleted")]
    CardDeleted,
    /// A unique value is already taken (409): `problem` is the catalogue's code.
    #[error("{detail}")]
    Duplicate {
        problem: &'static str,
        detail: String,
    },
    #[error("token is {0:?}; this operation needs another status")]
    TokenState(TokenStatus),
    #[error("the record was changed concurrently; retry")]
    Conflict,
    #[error("the storage backend is unavailable")]
    StoreUnavailable,
    /// The customer wallet index is still being backfilled (`domain::wallet_index`): a
    /// delete-all now could miss a customer's older tokens, so it is refused until complete.
    #[error("the customer wallet index is still being built")]
    WalletIndexBuilding,
    #[error("network token service: {0}")]
    Upstream(#[from] ProviderError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a network-token provider (D1) call can fail with, as far as the domain cares.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// Overloaded, rate limited, circuit open, or down: try later.
    #[error("unavailable")]
    Unavailable { retry_after: Option<Duration> },
    /// No answer within the time budget; the outcome upstream is unknown.
    #[error("timed out")]
    Timeout,
    /// The provider refused the request (a 4xx). `code` is its machine error code.
    #[error("rejected the request ({code})")]
    Rejected { status: u16, code: String },
    /// The provider does not know the resource.
    #[error("resource not found upstream")]
    NotFound,
    /// The provider answered something we cannot use (5xx, bad JSON, bad crypto).
    #[error("bad response: {0}")]
    BadResponse(String),
    /// Not configured (no D1 in this deployment).
    #[error("not configured")]
    NotConfigured,
}
