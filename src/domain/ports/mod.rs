//! Ports: the storage contracts the domain needs, in domain types only. The adapters
//! in `src/storage` (Redis, embedded redb) implement them; the domain never sees a backend type.
//!
//! Each method is one operation with one atomic effect; the domain sequences them. How the usual
//! non-success cases show up:
//!
//! - **miss**: `Ok(None)` from getters, [`StoreError::NotFound`] from updates of a missing record;
//! - **duplicate**: [`InsertOutcome::Existing`] carrying the record that won (dedup is not an
//!   error: it is the normal answer for a card the merchant already tokenized);
//! - **version conflict**: [`StoreError::Conflict`], nothing written; re-read and retry;
//! - **backend down or slow**: [`StoreError::Unavailable`] (the API answers 503), nothing
//!   half-written: every multi-key write is one transaction (Lua script or redb write txn).
//!
//! The key layout of both backends is documented in `docs/storage.md`.

pub mod apikeys;
pub mod audit;
pub mod client_certs;
pub mod counts;
pub mod issuer_cards;
pub mod issuer_operations;
pub mod issuers;
pub mod lifecycle;
pub mod outbox;
pub mod production_orders;
pub mod ratelimit;
pub mod tokens;

pub use tokens::{CheckAt, IdempotencyBegin, InsertOutcome, StoredResponse, TokenStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The record changed since it was read (optimistic concurrency).
    #[error("version conflict")]
    Conflict,
    /// The record to update does not exist.
    #[error("not found")]
    NotFound,
    /// A record could not be decoded: never silently skipped.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}
