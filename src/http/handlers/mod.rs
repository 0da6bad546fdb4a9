//! Route handlers: thin adapters from HTTP to the domain services, one file per resource. They
//! sit above extraction and authentication (`extract`, `auth`, `idempotency`) and below the
//! router and the OpenAPI document, which list them.

pub mod audit_events;
pub mod click_to_pay;
pub mod client_certs;
pub mod issuer_cards;
pub mod issuer_notify;
pub mod issuers;
pub mod keys;
pub mod notify;
pub mod production_orders;
pub mod recurring;
pub mod reveal;
pub mod token_views;
pub mod tokens;
pub mod wallets;
pub mod webhooks;
