//! tokengate: a network-tokenization gateway for payment service providers.
//!
//! # Layout
//!
//! The crate is split into layers that only talk downwards, so each can be read and tested alone
//! (ARCHITECTURE.md is the map; `tests/it/architecture.rs` checks it):
//!
//! - [`http`]: the REST API (axum on hyper 1), the tower middleware stack, authentication, and
//!   [`http::problem`], the one place that maps errors to `application/problem+json` (every code
//!   declared once in [`http::problem::codes`]).
//! - [`domain`]: tokens, merchants and the use cases that sequence storage, crypto and D1 calls,
//!   and [`domain::ports`], the store traits in domain types. It knows neither hyper nor Redis.
//! - [`storage`]: the adapters of those ports, Redis (standalone or Cluster) and an embedded
//!   crash-safe file database (redb).
//! - [`crypto`]: the vault keyring (AES-256-GCM with AAD, key ids for rotation) and keyed HMAC
//!   fingerprints.
//! - [`d1`]: the client for Thales D1 eCom Enablement (OAuth2 with ES256 assertions, mTLS, JWE);
//!   the wire model it shares with the simulator is the `tokengate-d1-protocol` crate, the
//!   simulator is `tokengate-d1-sim`, card types are `tokengate-cards`.
//! - [`webhook_sender`]: outbound HTTP(S) for merchant webhooks (the domain's `WebhookSender`).
//! - [`egress`]: the SSRF guard: which addresses webhook URLs may reach, and name resolution.
//! - [`config`]: layered configuration (embedded defaults, optional file, environment).
//! - [`app`]: wiring, used by the binary and by the integration tests.
//! - [`import`]: `tokengate import`, bulk migration of stored cards through the REST API (a
//!   client of the gateway, not a layer of it).
//! - [`observability`]: Prometheus metrics (`GET /metrics`), with labels that never carry card
//!   data, ids or keys; [`telemetry`]: logging.

pub mod app;
pub mod config;
pub mod crypto;
pub mod d1;
pub mod domain;
pub mod egress;
pub mod http;
pub mod import;
pub mod observability;
pub mod storage;
pub mod telemetry;
pub mod webhook_sender;
