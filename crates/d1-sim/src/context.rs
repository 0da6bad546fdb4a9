//! What every simulator task shares: configuration-derived keys, the store, faults, counters
//! and the notifier.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use p256::PublicKey;
use serde_json::{Map, Value, json};
use tokengate_d1_protocol::jose;

use super::faults::{Faults, Op};
use super::notify::Notifier;
use super::orders::OrderBook;
use super::state::{Store, lock};

/// Keys parsed once at start. Private keys wipe themselves on drop.
pub struct Keys {
    /// ES256 assertion keys registered for our merchant gateway, by `kid`.
    pub es256: HashMap<String, PublicKey>,
    /// D1's card-data decryption keys, by `kid`.
    pub jwe: HashMap<String, jose::JweDecryptionKey>,
    /// The gateway's key that cryptogram responses are encrypted to.
    pub gateway_jwe: PublicKey,
    pub gateway_jwe_kid: String,
}

/// Counters behind `GET /sim/stats`. Atomics, so counting never contends with the store lock.
#[derive(Default)]
pub struct Stats {
    requests: [AtomicU64; Op::ALL.len()],
    pub oauth_tokens_issued: AtomicU64,
    pub tokens_created: AtomicU64,
    pub notifications_delivered: AtomicU64,
    pub notification_attempts: AtomicU64,
    /// Issuer operations D1 created (a re-driven call with a known `issuerRequestId` creates
    /// none).
    pub issuer_operations_created: AtomicU64,
}

impl Stats {
    pub fn count_request(&self, op: Op) {
        if let Some(i) = Op::ALL.iter().position(|o| *o == op) {
            self.requests[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The `/sim/stats` document; every operation is listed, with 0 when it was never called.
    pub fn to_json(&self) -> Value {
        let requests: Map<String, Value> = Op::ALL
            .iter()
            .zip(&self.requests)
            .map(|(op, n)| (op.as_str().to_owned(), json!(n.load(Ordering::Relaxed))))
            .collect();
        json!({
            "oauthTokensIssued": self.oauth_tokens_issued.load(Ordering::Relaxed),
            "tokensCreated": self.tokens_created.load(Ordering::Relaxed),
            "requests": requests,
            "notificationsDelivered": self.notifications_delivered.load(Ordering::Relaxed),
            "notificationAttempts": self.notification_attempts.load(Ordering::Relaxed),
            "issuerOperationsCreated": self.issuer_operations_created.load(Ordering::Relaxed),
        })
    }
}

/// The simulator's shared state, one `Arc` per simulator.
pub struct Shared {
    pub merchant_gateway_id: String,
    pub keys: Keys,
    pub store: Store,
    pub faults: Mutex<Faults>,
    pub stats: Stats,
    pub notifier: Notifier,
    /// The issuer side: cards, consumers, operations (`issuer.rs`).
    pub issuer: super::issuer::IssuerState,
    /// Physical card orders (`orders.rs`).
    pub orders: OrderBook,
}

impl Shared {
    /// A snapshot of the faults, so no lock is held while a fault plays out.
    pub fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    /// Replaces the faults; held reordered notifications are released when reordering stops,
    /// so switching the fault off never strands an event.
    pub fn set_faults(&self, faults: Faults) {
        let reorder = faults.reorder_notifications;
        *lock(&self.faults) = faults;
        if !reorder {
            self.notifier.flush_held();
        }
    }
}
