//! The Thales D1 protocol as both sides speak it: shared by tokengate's D1 client (`src/d1`) and
//! the simulator (`crates/d1-sim`), so the two cannot drift.
//!
//! - [`model`]: the wire DTOs, decoded forward-compatibly (D1's compatibility rules).
//! - [`paths`]: the path templates of the D1 endpoints, configuration on the client side.
//! - [`issuer_orders`]: physical card orders (production, batch, production status).
//! - [`jose`]: ES256 client assertions and ECDH-ES/A256GCM compact JWE.
//! - [`tls`]: the one rustls policy (TLS 1.2/1.3, ring, PEM loading, client-certificate checks).
//! - [`devkeys`]: a development PKI and key set for the simulator and a gateway pointed at it.

pub mod devkeys;
pub mod issuer;
pub mod issuer_orders;
pub mod jose;
pub mod model;
pub mod paths;
pub mod tls;
