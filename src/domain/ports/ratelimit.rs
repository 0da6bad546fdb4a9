//! The shared rate-limit budget (`rate_limit.shared`): a store that hands out request cells of
//! a limit in batches, so that every gateway instance draws from one budget per API key and
//! per merchant while paying one store call per batch, not one per request
//! (`domain::ratelimit` keeps the leased cells in memory).

use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;
use crate::domain::ratelimit::{Limit, Scope};

/// What a lease call granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Cells granted now, between 0 and the number asked for.
    pub granted: u32,
    /// With `granted == 0`: how long until one cell conforms again.
    pub retry_after: Duration,
}

/// One budget per (scope, id), shared by every instance of the gateway.
#[async_trait]
pub trait RateLeaseStore: Send + Sync {
    /// Takes up to `want` cells of the bucket `(scope, id)` under `limit` (GCRA with the store's
    /// clock, atomically): as many as conform now, at least none. Cells taken are spent for
    /// the whole fleet, used or not.
    async fn lease(
        &self,
        scope: Scope,
        id: &str,
        limit: Limit,
        want: u32,
    ) -> Result<Lease, StoreError>;
}
