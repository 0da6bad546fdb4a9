//! Resilience building blocks for the D1 client: circuit breaker, backoff, `Retry-After`.
//!
//! The breaker exists so that a D1 outage costs callers nothing: after `threshold` consecutive
//! failed calls (5xx, timeouts, connection failures; 4xx means D1 is up and answering) it
//! opens and every call fails at once with `Unavailable { retry_after }` instead of waiting out
//! its timeout. After `open_for` it lets exactly one probe call through (half-open); the probe's
//! outcome closes it again or reopens it for another `open_for`. Its state is the gauge
//! `tokengate_d1_circuit_open` (1 from opening until a probe closes it).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::domain::error::ProviderError;

/// First retry delay; doubled per attempt, then jittered.
pub const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Upper bound of a single backoff delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Delay before retry number `attempt` (0-based): `min(cap, base * 2^attempt)`, then uniformly
/// jittered over its upper half so that clients that failed together do not retry together.
pub fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX));
    let ceiling = exp.min(BACKOFF_CAP);
    let ms = u64::try_from(ceiling.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_millis(rand::random_range(ms.div_ceil(2)..=ms))
}

/// `Retry-After` in its delta-seconds form. The HTTP-date form is ignored (D1 documents
/// seconds), and so is anything unparsable: the caller falls back to backoff.
pub fn parse_retry_after(value: Option<&http::HeaderValue>) -> Option<Duration> {
    let s = value?.to_str().ok()?.trim();
    s.parse::<u64>().ok().map(Duration::from_secs)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Consecutive-failure circuit breaker with a single half-open probe.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    state: Mutex<State>,
}

/// Permission to make one call. Must be finished with [`Admission::record`]; if it is dropped
/// unrecorded (the caller's future was cancelled), a probe slot is handed back so the breaker
/// never stays half-open with nobody probing.
#[derive(Debug)]
pub struct Admission<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Breaker {
        crate::observability::d1_circuit_open(false);
        Breaker {
            threshold: threshold.max(1),
            open_for,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // The state is a plain value that is always valid, so a panic elsewhere while the lock
        // was held cannot leave it inconsistent: recover from poisoning.
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Admits a call, or refuses it at once while open (with the time left) or while a
    /// half-open probe is in flight.
    pub fn admit(&self) -> Result<Admission<'_>, ProviderError> {
        let now = Instant::now();
        let probe = self.with_state(|s| match *s {
            State::Closed { .. } => Ok(false),
            State::Open { until } if now < until => Err(ProviderError::Unavailable {
                retry_after: Some(until - now),
            }),
            State::Open { .. } | State::HalfOpen { probing: false } => {
                *s = State::HalfOpen { probing: true };
                Ok(true)
            }
            State::HalfOpen { probing: true } => Err(ProviderError::Unavailable {
                retry_after: Some(self.open_for),
            }),
        })?;
        Ok(Admission {
            breaker: self,
            probe,
            recorded: false,
        })
    }

    /// Whether calls are currently refused outright (for metrics and tests).
    pub fn is_open(&self) -> bool {
        let now = Instant::now();
        self.with_state(|s| matches!(*s, State::Open { until } if now < until))
    }
}

impl Admission<'_> {
    /// Records the call's outcome: `failure` for 5xx, timeouts and connection failures.
    pub fn record(mut self, failure: bool) {
        self.recorded = true;
        let b = self.breaker;
        let now = Instant::now();
        let (was_closed, is_closed) = b.with_state(|s| {
            let was_closed = matches!(*s, State::Closed { .. });
            b.transition(s, self.probe, failure, now);
            (was_closed, matches!(*s, State::Closed { .. }))
        });
        if was_closed != is_closed {
            crate::observability::d1_circuit_open(!is_closed);
        }
    }
}

impl Breaker {
    /// The state after one recorded outcome.
    fn transition(&self, s: &mut State, probe: bool, failure: bool, now: Instant) {
        let b = self;
        match (*s, probe, failure) {
            (_, true, false) => *s = State::Closed { failures: 0 },
            (_, true, true) => {
                *s = State::Open {
                    until: now + b.open_for,
                }
            }
            (State::Closed { .. }, false, false) => *s = State::Closed { failures: 0 },
            (State::Closed { failures }, false, true) => {
                let failures = failures.saturating_add(1);
                *s = if failures >= b.threshold {
                    State::Open {
                        until: now + b.open_for,
                    }
                } else {
                    State::Closed { failures }
                };
            }
            // A call admitted before the breaker opened finished late: the probe decides.
            (State::Open { .. } | State::HalfOpen { .. }, false, _) => {}
        }
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.breaker.with_state(|s| {
                if *s == (State::HalfOpen { probing: true }) {
                    *s = State::HalfOpen { probing: false };
                }
            });
        }
    }
}

#[cfg(test)]
// `allow`, not `expect`: whether clippy flags unwraps in tests depends on crate-level settings.
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use super::*;

    fn unavailable_for(r: Result<Admission<'_>, ProviderError>) -> Option<Duration> {
        match r {
            Err(ProviderError::Unavailable { retry_after }) => retry_after,
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    // Real (short) time: the crate does not enable tokio's `test-util` clock control.
    const OPEN_FOR: Duration = Duration::from_millis(200);

    #[test]
    fn opens_after_threshold_then_probes_once() {
        let b = Breaker::new(3, OPEN_FOR);
        for _ in 0..2 {
            b.admit().unwrap().record(true);
        }
        // A success (or a 4xx, which is recorded as no failure) resets the count.
        b.admit().unwrap().record(false);
        for _ in 0..2 {
            b.admit().unwrap().record(true);
        }
        assert!(!b.is_open());
        // The third consecutive failure opens it.
        b.admit().unwrap().record(true);
        assert!(b.is_open());
        let left = unavailable_for(b.admit()).unwrap();
        assert!(left <= OPEN_FOR && left > OPEN_FOR / 2);

        std::thread::sleep(OPEN_FOR);
        let probe = b.admit().unwrap();
        // Only one probe at a time.
        assert!(unavailable_for(b.admit()).is_some());
        probe.record(true);
        assert!(b.is_open());

        std::thread::sleep(OPEN_FOR);
        let probe = b.admit().unwrap();
        probe.record(false);
        assert!(!b.is_open());
        b.admit().unwrap().record(false);
        b.admit().unwrap().record(false);
    }

    #[test]
    fn a_cancelled_probe_frees_the_slot() {
        let b = Breaker::new(1, OPEN_FOR);
        b.admit().unwrap().record(true);
        assert!(b.is_open());
        std::thread::sleep(OPEN_FOR);
        drop(b.admit().unwrap());
        b.admit().unwrap().record(false);
        assert!(!b.is_open());
    }

    #[test]
    fn backoff_grows_jittered_and_capped() {
        for _ in 0..50 {
            let d0 = backoff(0);
            assert!(d0 >= Duration::from_millis(25) && d0 <= Duration::from_millis(50));
            let d3 = backoff(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            assert!(backoff(30) <= BACKOFF_CAP);
            assert!(backoff(u32::MAX) >= BACKOFF_CAP / 2);
        }
    }

    #[test]
    fn retry_after_seconds_only() {
        let h = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert_eq!(
            parse_retry_after(Some(&h("3"))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(parse_retry_after(Some(&h(" 0 "))), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(Some(&h("Wed, 21 Oct 2015 07:28:00 GMT"))),
            None
        );
        assert_eq!(parse_retry_after(Some(&h("-1"))), None);
        assert_eq!(parse_retry_after(None), None);
    }
}
