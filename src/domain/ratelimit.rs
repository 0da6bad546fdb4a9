//! Request rate limits per API key and per merchant: GCRA (the generic cell rate algorithm, a
//! leaky bucket kept as one timestamp per key).
//!
//! By default limits are enforced **per gateway instance**, in memory: with N instances behind
//! a balancer, configure each instance with the global limit divided by N.
//!
//! **Shared mode** (`rate_limit.shared`, Redis only) makes the limits fleet-wide without a
//! store round trip per request: an instance leases a batch of cells of a bucket from the store
//! ([`RateLeaseStore::lease`], one Lua call running GCRA on Redis' clock for the whole batch) and
//! spends them locally. A request costs a store call only when its bucket's local allowance is
//! empty, so about 1/batch of the requests pay one. Cells leased and not used within the lease
//! lifetime are dropped: they stay spent, so the fleet never exceeds the limit; it may fall
//! short of it by up to one batch per instance and lease lifetime. A refusal from the store is
//! remembered locally until its retry time, so a client over its limit does not turn into a
//! store call per request. If the store cannot be reached, the instance falls back to its own
//! in-memory limit for that request (the API is then failing anyway; limits must not add to it).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::ports::ratelimit::RateLeaseStore;

/// One limit: a sustained rate and a burst on top of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub per_second: f64,
    pub burst: u32,
}

/// Why a request was refused: which limit, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub retry_after: Duration,
    pub scope: Scope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    ApiKey,
    Merchant,
}

/// Keyed GCRA state; the value is the theoretical arrival time (TAT) of the next request.
pub struct RateLimiter {
    per_key: Option<Limit>,
    per_merchant: Option<Limit>,
    state: DashMap<String, Instant>,
    /// Shared mode: cells leased from the store.
    shared: Option<Shared>,
}

/// How shared mode leases: batch size and how long leased cells stay usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedSettings {
    pub batch: u32,
    pub lease_ttl: Duration,
}

struct Shared {
    store: Arc<dyn RateLeaseStore>,
    settings: SharedSettings,
    buckets: DashMap<String, Arc<Bucket>>,
}

/// One bucket's local allowance. `state` is only locked briefly (never across a store call);
/// `refill` makes one request per bucket at a time go to the store while the others wait for
/// its answer instead of calling the store too.
#[derive(Default)]
struct Bucket {
    state: Mutex<Allowance>,
    refill: tokio::sync::Mutex<()>,
}

#[derive(Default, Clone, Copy)]
struct Allowance {
    /// Leased cells not spent yet, usable until `expires`.
    left: u32,
    expires: Option<Instant>,
    /// The store refused: no cell before this instant.
    blocked_until: Option<Instant>,
    /// A lease is on its way in the background (at most one per bucket).
    prefetching: bool,
}

enum Take {
    Taken,
    /// Taken, and the allowance fell to its low-water mark: lease the next batch now, in the
    /// background, so requests do not wait for the store when the allowance runs out.
    TakenPrefetch,
    Refused(Duration),
    Empty,
}

impl Allowance {
    fn take(&mut self, now: Instant, low_water: u32) -> Take {
        if self.left > 0 && self.expires.is_some_and(|e| now < e) {
            self.left -= 1;
            // Not while a refusal holds: the store said no, asking again now is wasted.
            let refused = self.blocked_until.is_some_and(|b| now < b);
            if self.left <= low_water && !self.prefetching && !refused {
                self.prefetching = true;
                return Take::TakenPrefetch;
            }
            return Take::Taken;
        }
        match self.blocked_until {
            Some(b) if now < b => Take::Refused(b - now),
            _ => Take::Empty,
        }
    }
}

/// Entries are pruned when the map grows past this; bounds memory under key churn.
const PRUNE_ABOVE: usize = 100_000;

impl RateLimiter {
    pub fn new(per_key: Option<Limit>, per_merchant: Option<Limit>) -> RateLimiter {
        RateLimiter {
            per_key: per_key.filter(|l| l.per_second > 0.0),
            per_merchant: per_merchant.filter(|l| l.per_second > 0.0),
            state: DashMap::new(),
            shared: None,
        }
    }

    /// The same limits, fleet-wide: cells are leased from `store` in batches (module docs).
    pub fn shared(
        per_key: Option<Limit>,
        per_merchant: Option<Limit>,
        store: Arc<dyn RateLeaseStore>,
        settings: SharedSettings,
    ) -> RateLimiter {
        let mut rl = RateLimiter::new(per_key, per_merchant);
        rl.shared = Some(Shared {
            store,
            settings: SharedSettings {
                batch: settings.batch.max(1),
                lease_ttl: settings.lease_ttl,
            },
            buckets: DashMap::new(),
        });
        rl
    }

    /// Checks both limits for one request; in shared mode against the fleet's budget, else
    /// this instance's ([`RateLimiter::check_local`]).
    pub async fn check(&self, key_id: &str, merchant_id: &str) -> Result<(), Exceeded> {
        let now = Instant::now();
        let Some(shared) = &self.shared else {
            return self.check_local(key_id, merchant_id, now);
        };
        let mut fallback = false;
        let mut key_cell = None;
        if let Some(l) = self.per_key {
            match shared.take(Scope::ApiKey, key_id, l, now).await {
                Ok(Some(bucket)) => key_cell = Some(bucket),
                Ok(None) => fallback = true,
                Err(retry_after) => {
                    return Err(Exceeded {
                        retry_after,
                        scope: Scope::ApiKey,
                    });
                }
            }
        }
        if let Some(l) = self.per_merchant {
            match shared.take(Scope::Merchant, merchant_id, l, now).await {
                Ok(Some(_)) => {}
                Ok(None) => fallback = true,
                Err(retry_after) => {
                    // A refused request consumes nothing: the key's cell goes back.
                    if let Some(bucket) = key_cell {
                        bucket.give_back();
                    }
                    return Err(Exceeded {
                        retry_after,
                        scope: Scope::Merchant,
                    });
                }
            }
        }
        if fallback {
            return self.check_local(key_id, merchant_id, now);
        }
        Ok(())
    }

    /// Checks both limits for one request at `now` against this instance's own state;
    /// consumes from both only if both allow it, so a refused request does not eat the other
    /// limit's budget.
    pub fn check_local(
        &self,
        key_id: &str,
        merchant_id: &str,
        now: Instant,
    ) -> Result<(), Exceeded> {
        let key_slot = self
            .per_key
            .map(|l| (format!("k:{key_id}"), l, Scope::ApiKey));
        let merchant_slot = self
            .per_merchant
            .map(|l| (format!("m:{merchant_id}"), l, Scope::Merchant));
        let slots: Vec<_> = key_slot.into_iter().chain(merchant_slot).collect();
        let mut updates = Vec::with_capacity(slots.len());
        for (k, limit, scope) in &slots {
            let tat = self.state.get(k).map(|t| *t).unwrap_or(now);
            match gcra(tat, now, *limit) {
                Ok(new_tat) => updates.push((k.clone(), new_tat)),
                Err(retry_after) => {
                    return Err(Exceeded {
                        retry_after,
                        scope: *scope,
                    });
                }
            }
        }
        for (k, tat) in updates {
            self.state.insert(k, tat);
        }
        if self.state.len() > PRUNE_ABOVE {
            // A TAT in the past means a full bucket: the same as no entry.
            self.state.retain(|_, tat| *tat > now);
        }
        Ok(())
    }
}

impl Shared {
    /// Takes one cell of `(scope, id)`. `Ok(Some(bucket))`: taken from the bucket's allowance;
    /// `Ok(None)`: the store could not be asked (the caller falls back to the local limit);
    /// `Err`: refused, with the retry delay.
    async fn take(
        &self,
        scope: Scope,
        id: &str,
        limit: Limit,
        now: Instant,
    ) -> Result<Option<Arc<Bucket>>, Duration> {
        let name = match scope {
            Scope::ApiKey => format!("k:{id}"),
            Scope::Merchant => format!("m:{id}"),
        };
        let bucket = match self.buckets.get(&name) {
            Some(b) => b.clone(),
            None => self.buckets.entry(name).or_default().clone(),
        };
        // More than the burst could never be granted at once.
        let want = self.settings.batch.min(limit.burst.max(1));
        let low_water = want / 2;
        let took = bucket.lock().take(now, low_water);
        match took {
            Take::Taken => return Ok(Some(bucket)),
            Take::TakenPrefetch => {
                self.prefetch(bucket.clone(), scope, id.to_owned(), limit, want);
                return Ok(Some(bucket));
            }
            Take::Refused(d) => return Err(d),
            Take::Empty => {}
        }
        let held = bucket.clone();
        let _refilling = held.refill.lock().await;
        // Another request may have refilled (or been refused) while this one waited.
        let now = Instant::now();
        // No prefetch from here: this request leases itself if the allowance is still empty.
        let took = bucket.lock().take(now, 0);
        match took {
            Take::Taken | Take::TakenPrefetch => return Ok(Some(bucket)),
            Take::Refused(d) => return Err(d),
            Take::Empty => {}
        }
        let lease = match self.store.lease(scope, id, limit, want).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "shared rate limit: store unavailable, this request is limited locally");
                return Ok(None);
            }
        };
        let now = Instant::now();
        let mut a = bucket.lock();
        if lease.granted == 0 {
            let retry = lease.retry_after.max(Duration::from_millis(1));
            a.blocked_until = Some(now + retry);
            return Err(retry);
        }
        a.left = lease.granted - 1;
        a.expires = Some(now + self.settings.lease_ttl);
        a.blocked_until = None;
        drop(a);
        if self.buckets.len() > PRUNE_ABOVE {
            self.buckets.retain(|_, b| {
                let a = *b.lock();
                a.expires.is_some_and(|e| e > now) || a.blocked_until.is_some_and(|u| u > now)
            });
        }
        Ok(Some(bucket))
    }

    /// Leases the next batch in the background and adds it to the allowance. Holds the bucket's
    /// refill lock, so a request that finds the allowance empty meanwhile waits for this lease
    /// instead of making another.
    fn prefetch(&self, bucket: Arc<Bucket>, scope: Scope, id: String, limit: Limit, want: u32) {
        let store = self.store.clone();
        let ttl = self.settings.lease_ttl;
        tokio::spawn(async move {
            let _refilling = bucket.refill.lock().await;
            let lease = store.lease(scope, &id, limit, want).await;
            let now = Instant::now();
            let mut a = bucket.lock();
            a.prefetching = false;
            match lease {
                Ok(l) if l.granted > 0 => {
                    a.left += l.granted;
                    a.expires = Some(now + ttl);
                    a.blocked_until = None;
                }
                // Refused: the cells left are spent first, then requests wait out the delay.
                Ok(l) => a.blocked_until = Some(now + l.retry_after.max(Duration::from_millis(1))),
                Err(e) => {
                    tracing::warn!(error = %e, "shared rate limit: store unavailable, lease not renewed")
                }
            }
        });
    }
}

impl Bucket {
    fn lock(&self) -> std::sync::MutexGuard<'_, Allowance> {
        // The allowance is a plain value, valid whatever a panicking holder left: recover.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn give_back(&self) {
        let mut a = self.lock();
        if a.expires.is_some_and(|e| Instant::now() < e) {
            a.left += 1;
        }
    }
}

/// One GCRA step: the new TAT if the request conforms, else how long until it would.
fn gcra(tat: Instant, now: Instant, limit: Limit) -> Result<Instant, Duration> {
    let interval = Duration::from_secs_f64(1.0 / limit.per_second);
    // A full bucket lets `burst` requests through at once.
    let tolerance = interval * limit.burst.max(1);
    let base = tat.max(now);
    let new_tat = base + interval;
    let ahead = new_tat.saturating_duration_since(now);
    if ahead > tolerance {
        Err(ahead - tolerance)
    } else {
        Ok(new_tat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(
            Some(Limit {
                per_second: rate,
                burst,
            }),
            Some(Limit {
                per_second: rate * 2.0,
                burst: burst * 2,
            }),
        )
    }

    #[test]
    fn burst_then_refuse_then_recover() {
        let rl = limiter(10.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            rl.check_local("k1", "m1", t0).unwrap();
        }
        let e = rl.check_local("k1", "m1", t0).unwrap_err();
        assert_eq!(e.scope, Scope::ApiKey);
        assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_millis(100));
        // After one interval, one more request conforms.
        rl.check_local("k1", "m1", t0 + Duration::from_millis(100))
            .unwrap();
    }

    #[test]
    fn merchant_limit_spans_keys() {
        let rl = limiter(10.0, 2); // per merchant: burst 4
        let t0 = Instant::now();
        rl.check_local("a", "m", t0).unwrap();
        rl.check_local("a", "m", t0).unwrap();
        rl.check_local("b", "m", t0).unwrap();
        rl.check_local("b", "m", t0).unwrap();
        let e = rl.check_local("c", "m", t0).unwrap_err();
        assert_eq!(e.scope, Scope::Merchant);
        // Another merchant is unaffected.
        rl.check_local("d", "other", t0).unwrap();
    }

    #[test]
    fn refused_request_consumes_nothing() {
        let rl = RateLimiter::new(
            Some(Limit {
                per_second: 1.0,
                burst: 1,
            }),
            Some(Limit {
                per_second: 1.0,
                burst: 2,
            }),
        );
        let t0 = Instant::now();
        rl.check_local("a", "m", t0).unwrap();
        assert!(rl.check_local("a", "m", t0).is_err()); // key limit refuses; merchant budget kept
        rl.check_local("b", "m", t0).unwrap(); // so another key still gets the merchant's second slot
    }

    #[test]
    fn disabled_limits_allow_everything() {
        let rl = RateLimiter::new(None, None);
        let t0 = Instant::now();
        for _ in 0..1000 {
            rl.check_local("a", "m", t0).unwrap();
        }
    }

    /// The lease side of shared mode, in memory: GCRA per bucket on a fixed clock, counting
    /// calls. (The Redis script is exercised by tests/it/rate_limit_shared.rs.)
    struct CountingStore {
        calls: std::sync::atomic::AtomicU32,
        fail: bool,
        budget: Mutex<std::collections::HashMap<String, u32>>,
    }

    #[async_trait::async_trait]
    impl RateLeaseStore for CountingStore {
        async fn lease(
            &self,
            scope: Scope,
            id: &str,
            limit: Limit,
            want: u32,
        ) -> Result<crate::domain::ports::ratelimit::Lease, crate::domain::ports::StoreError>
        {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.fail {
                return Err(crate::domain::ports::StoreError::Unavailable("down".into()));
            }
            let mut b = self.budget.lock().unwrap();
            let left = b.entry(format!("{scope:?}{id}")).or_insert(limit.burst);
            let granted = want.min(*left);
            *left -= granted;
            Ok(crate::domain::ports::ratelimit::Lease {
                granted,
                retry_after: Duration::from_millis(if granted == 0 { 500 } else { 0 }),
            })
        }
    }

    fn shared(burst: u32, batch: u32, fail: bool) -> (RateLimiter, Arc<CountingStore>) {
        let store = Arc::new(CountingStore {
            calls: Default::default(),
            fail,
            budget: Mutex::default(),
        });
        let rl = RateLimiter::shared(
            Some(Limit {
                per_second: 1.0,
                burst,
            }),
            None,
            store.clone(),
            SharedSettings {
                batch,
                lease_ttl: Duration::from_secs(60),
            },
        );
        (rl, store)
    }

    #[tokio::test]
    async fn shared_mode_leases_in_batches_and_remembers_refusals() {
        let (rl, store) = shared(30, 10, false);
        let calls = || store.calls.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..30 {
            rl.check("k", "m").await.unwrap();
            tokio::task::yield_now().await;
        }
        // 30 requests, batches of 10: three leases that grant cells, and at most one more
        // (a prefetch refused at the end of the budget).
        assert!((3..=4).contains(&calls()), "{}", calls());
        let e = rl.check("k", "m").await.unwrap_err();
        assert_eq!(e.scope, Scope::ApiKey);
        assert!(e.retry_after > Duration::ZERO);
        // The refusal is remembered: no store call per refused request.
        let after_refusal = calls();
        for _ in 0..20 {
            assert!(rl.check("k", "m").await.is_err());
        }
        assert_eq!(calls(), after_refusal);
    }

    #[tokio::test]
    async fn shared_mode_batch_never_exceeds_the_burst() {
        let (rl, store) = shared(3, 50, false);
        for _ in 0..3 {
            rl.check("k", "m").await.unwrap();
        }
        assert!(rl.check("k", "m").await.is_err());
        // Never more than the burst was granted, whatever the batch size.
        assert!(store.calls.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    }

    #[tokio::test]
    async fn shared_mode_falls_back_to_the_local_limit_when_the_store_fails() {
        let (rl, _) = shared(2, 10, true);
        rl.check("k", "m").await.unwrap();
        rl.check("k", "m").await.unwrap();
        // The local GCRA (burst 2 at 1/s) refuses the third.
        assert!(rl.check("k", "m").await.is_err());
    }
}
