//! Client for Thales D1 eCom Enablement: OAuth2 (ES256 assertions), mTLS, JWE, resilience.
//!
//! - [`client`]: [`D1Client`], the [`crate::domain::provider::NetworkTokenProvider`] over the
//!   protocol in `docs/d1-protocol.md`, and its configuration [`D1Config`].
//! - [`jose`]: ES256 client assertions and ECDH-ES/A256GCM compact JWE (shared with the
//!   simulator, which verifies and decrypts what the client produces).
//! - [`keyfiles`]: the client's key material, from `d1.keys_dir` or from sandbox material.
//! - [`model`]: the wire DTOs, decoded forward-compatibly.
//! - [`resilience`]: circuit breaker, backoff and `Retry-After` handling.

pub mod client;
pub mod jose;
pub mod keyfiles;
pub mod model;
pub mod resilience;

pub use client::{D1Client, D1Config, D1Error, D1Paths};
pub use keyfiles::D1KeyMaterial;
