//! Integration tests, compiled as one binary: real sockets, a real `redis-server` per test on a
//! free port, the real D1 simulator.

mod support;

mod api;
mod d1_client;
mod gateway_d1;
mod lifecycle;
mod metrics;
mod openapi;
mod sim;
mod store_contract;
