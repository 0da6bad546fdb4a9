//! Domain: cards, tokens and merchants, and the use cases that sequence vault, store and D1.
//!
//! Nothing here knows hyper, axum or Redis; storage and the network-token provider are traits.

pub mod apikeys;
pub mod audit;
pub mod client_certs;
pub mod error;
pub mod fp_reindex;
pub mod issuer;
pub mod issuer_cards;
pub mod issuer_ops;
pub mod issuer_provider;
pub mod issuer_service;
pub mod leased_walk;
pub mod lifecycle;
pub mod merchant;
pub mod notify_auth;
pub mod ports;
pub mod production_orders;
pub mod production_service;
pub mod provider;
pub mod ratelimit;
pub mod reconcile;
pub mod recurring;
pub mod rekey;
pub mod reveal;
pub mod schedule;
pub mod service;
pub mod token;
pub mod token_counts;
pub mod wallet;
pub mod wallet_index;
pub mod webhooks;

pub use error::{DomainError, ProviderError};
