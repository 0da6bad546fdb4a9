//! Integration tests, compiled as one binary: real sockets, a real `redis-server` per test on a
//! free port, the real D1 simulator.

// Test code states its expectations with unwrap/expect/panic; the product-code lints do not apply.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod access_log;
mod api;
mod architecture;
mod audit;
mod client_certs_store;
mod crash;
mod d1_client;
mod d1_production;
mod durability;
mod fp_rotation;
mod gateway_d1;
mod import;
mod issuer_api;
mod issuer_audit;
mod issuer_cards;
mod issuer_orders;
mod issuer_store;
mod keys_audit_store;
mod lifecycle;
mod metrics;
mod no_endpoint_write;
mod openapi;
mod outbox_atomic;
mod outbox_issuer_atomic;
mod production_orders_store;
mod props;
mod rate_limit_shared;
mod recurring;
mod rekey;
mod schedule_atomic;
mod sim;
mod sim_orders;
mod store_contract;
mod tls;
mod token_cache;
mod token_counts;
mod wallets;
mod webhook_endpoint_store;
mod webhook_order;
mod webhooks;
