//! Record encodings shared by the Redis and embedded adapters, one file per aggregate.

pub mod apikeys;
pub mod audit;
pub mod client_certs;
pub mod issuers;
pub mod lifecycle;
pub mod outbox;
pub mod production_orders;
