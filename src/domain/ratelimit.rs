//! Request rate limits per API key and per merchant: GCRA (the generic cell rate algorithm, a
//! leaky bucket kept as one timestamp per key).
//!
//! Limits are enforced **per gateway instance**, in memory. A shared limit in Redis would cost
//! a Redis round trip on every request (our GET path is one round trip in all; a second one
//! would roughly halve its throughput). With N instances behind a balancer, configure each
//! instance with the global limit divided by N; the balancer's spread makes that close to a
//! global limit, and an instance that dies takes its share of the budget with it.

use std::time::{Duration, Instant};

use dashmap::DashMap;

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
}

/// Entries are pruned when the map grows past this; bounds memory under key churn.
const PRUNE_ABOVE: usize = 100_000;

impl RateLimiter {
    pub fn new(per_key: Option<Limit>, per_merchant: Option<Limit>) -> RateLimiter {
        RateLimiter {
            per_key: per_key.filter(|l| l.per_second > 0.0),
            per_merchant: per_merchant.filter(|l| l.per_second > 0.0),
            state: DashMap::new(),
        }
    }

    /// Checks both limits for one request at `now`; consumes from both only if both allow it,
    /// so a refused request does not eat the other limit's budget.
    pub fn check(&self, key_id: &str, merchant_id: &str, now: Instant) -> Result<(), Exceeded> {
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
            rl.check("k1", "m1", t0).unwrap();
        }
        let e = rl.check("k1", "m1", t0).unwrap_err();
        assert_eq!(e.scope, Scope::ApiKey);
        assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_millis(100));
        // After one interval, one more request conforms.
        rl.check("k1", "m1", t0 + Duration::from_millis(100))
            .unwrap();
    }

    #[test]
    fn merchant_limit_spans_keys() {
        let rl = limiter(10.0, 2); // per merchant: burst 4
        let t0 = Instant::now();
        rl.check("a", "m", t0).unwrap();
        rl.check("a", "m", t0).unwrap();
        rl.check("b", "m", t0).unwrap();
        rl.check("b", "m", t0).unwrap();
        let e = rl.check("c", "m", t0).unwrap_err();
        assert_eq!(e.scope, Scope::Merchant);
        // Another merchant is unaffected.
        rl.check("d", "other", t0).unwrap();
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
        rl.check("a", "m", t0).unwrap();
        assert!(rl.check("a", "m", t0).is_err()); // key limit refuses; merchant budget kept
        rl.check("b", "m", t0).unwrap(); // so another key still gets the merchant's second slot
    }

    #[test]
    fn disabled_limits_allow_everything() {
        let rl = RateLimiter::new(None, None);
        let t0 = Instant::now();
        for _ in 0..1000 {
            rl.check("a", "m", t0).unwrap();
        }
    }
}
