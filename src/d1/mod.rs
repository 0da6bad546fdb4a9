//! Client for Thales D1 eCom Enablement: OAuth2 (ES256 assertions), mTLS, JWE, resilience.
//!
//! - [`client`]: [`D1Client`], the [`crate::domain::provider::NetworkTokenProvider`] over the
//!   protocol in `docs/d1-protocol.md`, and its configuration [`D1Config`].
//! - [`keyfiles`]: the client's key material, from `d1.keys_dir` or from sandbox material.
//! - [`resilience`]: circuit breaker, backoff and `Retry-After` handling.
//! - [`production`]: physical card orders (the domain's `ProductionProvider`), through the
//!   client's one request path.
//!
//! The wire model, JOSE and the path templates live in `crates/d1-protocol`, shared with the
//! simulator; they are re-exported here for the client's users.

pub mod client;
pub mod issuer;
pub mod keyfiles;
pub mod production;
pub mod resilience;

pub use client::{D1Client, D1Config, D1Error};
pub use issuer::D1IssuerClient;
pub use keyfiles::D1KeyMaterial;
pub use production::D1ProductionClient;
pub use tokengate_d1_protocol::paths::D1Paths;
pub use tokengate_d1_protocol::{jose, model};
