//! Storage adapters: the domain's ports (`crate::domain::ports`) implemented on Redis
//! (standalone or Cluster) and on an embedded crash-safe file database (redb).
//!
//! - [`redis`]: [`redis::RedisStore`], one file per aggregate, each operation one Lua script.
//! - [`embedded`]: [`embedded::EmbeddedStore`], one file per aggregate, each operation one redb
//!   transaction.
//! - [`codec`]: the record encodings both adapters share, so the two read the same bytes.
//! - [`instrumented`]: a decorator timing every token-store call for the metrics.
//!
//! Both adapters pass one contract suite (`tests/it/store_contract.rs` and the other `*_store`
//! suites). The key layout of both backends is documented in `docs/storage.md`.

pub mod codec;
pub mod embedded;
pub mod instrumented;
pub mod redis;
