//! Fault injection: the `/sim/faults` document and the per-request decision it leads to.
//!
//! Faults model what goes wrong between a gateway and a real D1 (slow answers, throttling,
//! outages, lost connections, a newer D1 version), so the client's resilience can be tested
//! against real sockets instead of mocks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The D1 operations the simulator serves; used to count requests and to scope faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Op {
    Oauth,
    OnboardMerchant,
    CreateToken,
    GetToken,
    FindToken,
    CreateTransaction,
    Suspend,
    Resume,
    Delete,
    /// Issuer side (`/banking/v1`, `crates/d1-sim/src/issuer.rs`).
    ClickToPayEnrolment,
    ClickToPayUpdate,
    ClickToPayOptOut,
    ClickToPayProfiles,
    GetOperation,
    /// Deleting a card (`operations:delete`, our inference).
    CardDelete,
    /// Physical card orders (`orders.rs`).
    Production,
    ProductionBatch,
    ProductionStatus,
}

impl Op {
    pub const ALL: [Op; 18] = [
        Op::Oauth,
        Op::OnboardMerchant,
        Op::CreateToken,
        Op::GetToken,
        Op::FindToken,
        Op::CreateTransaction,
        Op::Suspend,
        Op::Resume,
        Op::Delete,
        Op::ClickToPayEnrolment,
        Op::ClickToPayUpdate,
        Op::ClickToPayOptOut,
        Op::ClickToPayProfiles,
        Op::GetOperation,
        Op::CardDelete,
        Op::Production,
        Op::ProductionBatch,
        Op::ProductionStatus,
    ];

    /// The name used in `/sim/faults` `operations` and in `/sim/stats` `requests`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Oauth => "oauth",
            Op::OnboardMerchant => "onboardMerchant",
            Op::CreateToken => "createToken",
            Op::GetToken => "getToken",
            Op::FindToken => "findToken",
            Op::CreateTransaction => "createTransaction",
            Op::Suspend => "suspend",
            Op::Resume => "resume",
            Op::Delete => "delete",
            Op::ClickToPayEnrolment => "clickToPayEnrolment",
            Op::ClickToPayUpdate => "clickToPayUpdate",
            Op::ClickToPayOptOut => "clickToPayOptOut",
            Op::ClickToPayProfiles => "clickToPayProfiles",
            Op::GetOperation => "getOperation",
            Op::CardDelete => "cardDelete",
            Op::Production => "production",
            Op::ProductionBatch => "productionBatch",
            Op::ProductionStatus => "productionStatus",
        }
    }
}

/// Added delay before each answer: `{"fixedMs": n}` or `{"uniformMs": [lo, hi]}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Latency {
    FixedMs(u64),
    UniformMs([u64; 2]),
}

impl Default for Latency {
    fn default() -> Self {
        Latency::FixedMs(0)
    }
}

/// Probability (0.0..=1.0) that a request is answered with that status instead of served.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ErrorRates {
    #[serde(rename = "429")]
    pub too_many_requests: f64,
    #[serde(rename = "500")]
    pub internal_error: f64,
    #[serde(rename = "503")]
    pub service_unavailable: f64,
}

/// The whole fault document of `PUT /sim/faults`. Every field is optional; absent ones take
/// the "healthy D1" default, so `{}` resets everything (as `DELETE /sim/faults` does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Faults {
    pub latency: Latency,
    pub error_rates: ErrorRates,
    /// `Retry-After` value on injected 429 and 503 answers.
    pub retry_after_seconds: u64,
    /// Probability that a request is held for [`TIMEOUT_HOLD`] and then dropped unanswered.
    pub timeout_rate: f64,
    /// Probability that the connection is closed without any HTTP response.
    pub reset_rate: f64,
    /// Operations the faults above (and `noise`) apply to; empty means all.
    pub operations: Vec<Op>,
    /// Token creation answers 202 `PENDING` and completes ~100 ms later with a notification.
    pub async_tokenization: bool,
    /// Every notification is delivered twice (same `eventId`).
    pub duplicate_notifications: bool,
    /// A notification is held back and delivered after the next one for the same token.
    pub reorder_notifications: bool,
    /// Responses carry fields and enum values this protocol version does not define.
    pub noise: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency: Latency::default(),
            error_rates: ErrorRates::default(),
            retry_after_seconds: 1,
            timeout_rate: 0.0,
            reset_rate: 0.0,
            operations: Vec::new(),
            async_tokenization: false,
            duplicate_notifications: false,
            reorder_notifications: false,
            noise: false,
        }
    }
}

/// How long a "timeout" fault holds a request before dropping the connection: longer than any
/// sane client timeout, so the client's own deadline is what fires.
pub const TIMEOUT_HOLD: Duration = Duration::from_secs(30);

/// Upper bound for injected latency and `Retry-After`, so a typo cannot wedge a test run.
const MAX_LATENCY_MS: u64 = 60_000;
const MAX_RETRY_AFTER_S: u64 = 3_600;

/// What the fault roll decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Serve the request normally.
    Serve,
    /// Close the connection without a response.
    Reset,
    /// Hold the request for [`TIMEOUT_HOLD`], then close the connection.
    Timeout,
    /// Answer with this error status (429, 500 or 503).
    Status(u16),
}

impl Faults {
    /// Checks ranges; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let rates = [
            ("errorRates.429", self.error_rates.too_many_requests),
            ("errorRates.500", self.error_rates.internal_error),
            ("errorRates.503", self.error_rates.service_unavailable),
            ("timeoutRate", self.timeout_rate),
            ("resetRate", self.reset_rate),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0.0 and 1.0"));
            }
        }
        match self.latency {
            Latency::FixedMs(ms) if ms > MAX_LATENCY_MS => {
                return Err(format!("latency.fixedMs must be at most {MAX_LATENCY_MS}"));
            }
            Latency::UniformMs([lo, hi]) if lo > hi || hi > MAX_LATENCY_MS => {
                return Err(format!(
                    "latency.uniformMs must be [lo, hi] with lo <= hi <= {MAX_LATENCY_MS}"
                ));
            }
            _ => {}
        }
        if self.retry_after_seconds > MAX_RETRY_AFTER_S {
            return Err(format!(
                "retryAfterSeconds must be at most {MAX_RETRY_AFTER_S}"
            ));
        }
        Ok(())
    }

    /// Whether the per-request faults (latency, errors, timeout, reset, noise) apply to `op`.
    pub fn applies_to(&self, op: Op) -> bool {
        self.operations.is_empty() || self.operations.contains(&op)
    }

    /// The delay to add before answering a request of `op`.
    pub fn latency_for(&self, op: Op) -> Duration {
        if !self.applies_to(op) {
            return Duration::ZERO;
        }
        let ms = match self.latency {
            Latency::FixedMs(ms) => ms,
            Latency::UniformMs([lo, hi]) if lo < hi => rand::random_range(lo..=hi),
            Latency::UniformMs([lo, _]) => lo,
        };
        Duration::from_millis(ms)
    }

    /// Rolls the dice for one request of `op`. Each fault is an independent draw, checked from
    /// the most to the least disruptive, so a rate of 1.0 always wins over lower ones.
    pub fn roll(&self, op: Op) -> Injected {
        if !self.applies_to(op) {
            return Injected::Serve;
        }
        let hit = |rate: f64| rate > 0.0 && rand::random::<f64>() < rate;
        if hit(self.reset_rate) {
            Injected::Reset
        } else if hit(self.timeout_rate) {
            Injected::Timeout
        } else if hit(self.error_rates.service_unavailable) {
            Injected::Status(503)
        } else if hit(self.error_rates.too_many_requests) {
            Injected::Status(429)
        } else if hit(self.error_rates.internal_error) {
            Injected::Status(500)
        } else {
            Injected::Serve
        }
    }

    /// Whether responses to `op` get unknown fields.
    pub fn noise_for(&self, op: Op) -> bool {
        self.noise && self.applies_to(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_shape() -> anyhow::Result<()> {
        let f: Faults = serde_json::from_value(serde_json::json!({
            "latency": {"uniformMs": [5, 50]},
            "errorRates": {"429": 0.0, "500": 0.1, "503": 1.0},
            "retryAfterSeconds": 2,
            "timeoutRate": 0.0, "resetRate": 0.0,
            "operations": ["createToken", "oauth"],
            "asyncTokenization": true,
            "duplicateNotifications": false, "reorderNotifications": true,
            "noise": true
        }))?;
        assert_eq!(f.latency, Latency::UniformMs([5, 50]));
        assert_eq!(f.error_rates.service_unavailable, 1.0);
        assert_eq!(f.operations, vec![Op::CreateToken, Op::Oauth]);
        assert!(f.validate().is_ok());
        assert_eq!(f.roll(Op::CreateToken), Injected::Status(503));
        assert_eq!(f.roll(Op::GetToken), Injected::Serve);
        assert_eq!(f.latency_for(Op::GetToken), Duration::ZERO);
        let l = f.latency_for(Op::Oauth);
        assert!(l >= Duration::from_millis(5) && l <= Duration::from_millis(50));
        Ok(())
    }

    #[test]
    fn empty_document_is_healthy() -> anyhow::Result<()> {
        let f: Faults = serde_json::from_str("{}")?;
        assert_eq!(f, Faults::default());
        for op in Op::ALL {
            assert_eq!(f.roll(op), Injected::Serve);
            assert_eq!(f.latency_for(op), Duration::ZERO);
            assert!(!f.noise_for(op));
        }
        Ok(())
    }

    #[test]
    fn rejects_unknown_fields_and_bad_ranges() -> anyhow::Result<()> {
        assert!(serde_json::from_str::<Faults>(r#"{"errorRate": {}}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"errorRates": {"418": 1.0}}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"operations": ["fly"]}"#).is_err());
        let f: Faults = serde_json::from_str(r#"{"resetRate": 1.5}"#)?;
        assert!(f.validate().err().is_some_and(|e| e.contains("resetRate")));
        let f: Faults = serde_json::from_str(r#"{"latency": {"uniformMs": [9, 3]}}"#)?;
        assert!(f.validate().is_err());
        Ok(())
    }

    #[test]
    fn most_disruptive_fault_wins() {
        let f = Faults {
            reset_rate: 1.0,
            timeout_rate: 1.0,
            error_rates: ErrorRates {
                too_many_requests: 1.0,
                internal_error: 1.0,
                service_unavailable: 1.0,
            },
            ..Faults::default()
        };
        assert_eq!(f.roll(Op::Delete), Injected::Reset);
    }
}
