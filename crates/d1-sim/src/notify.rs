//! Notifications from "D1" to the gateway: event bodies, delivery with redelivery, the
//! optional client-credentials token, and the duplicate/reorder faults.
//!
//! # Ordering
//!
//! One dispatcher task makes the *first* delivery attempt of every event, in the order the
//! events happened, so a test sees SUSPEND before RESUME unless it asked for reordering.
//! Redeliveries run in their own tasks, so one failing event never holds up the others (the
//! gateway orders by `timestamp`, which is strictly increasing per simulator).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::format_description;
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use super::NotifyTarget;
use super::context::{Shared, Stats};
use super::state::{TokenInfo, lock, random_id};
use super::wait_shutdown;
use tokengate_d1_protocol::tls;

/// First redelivery delay; doubles per attempt.
const BACKOFF_START: Duration = Duration::from_millis(200);
/// Longest wait between two attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Attempts per event, the first one included.
const MAX_ATTEMPTS: u32 = 20;
/// Budget of one attempt (connect, token fetch, request, response head).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `reorderNotifications` holds an event when no later event for the same token
/// comes: the event is then delivered late rather than lost.
const REORDER_HOLD: Duration = Duration::from_secs(5);
/// Largest response body read from the gateway (token responses are tiny).
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// What happened to a token, as `eventType` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    StatusUpdate,
    Renewal,
    TokenCreated,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::StatusUpdate => "STATUS_UPDATE",
            EventType::Renewal => "RENEWAL",
            EventType::TokenCreated => "TOKEN_CREATED",
        }
    }
}

/// One notification, body already serialized (a redelivery sends the same bytes).
#[derive(Debug, Clone)]
pub struct Event {
    event_id: String,
    /// What reordering is keyed on: the token, or the operation of an issuer notification.
    token_id: String,
    merchant_id: String,
    body: Bytes,
    /// The path on the gateway for issuer notifications; `None`: the token's `notify-update`.
    path: Option<String>,
}

pub enum Msg {
    Event(Event),
    /// The reorder hold of this event ran out.
    Flush {
        token_id: String,
        event_id: String,
    },
    /// Reordering was switched off: release everything held.
    FlushAll,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A configured receiver: the gateway's base URL and how to reach it.
struct Target {
    base_url: String,
    client: HttpClient,
    oauth: Option<(String, SecretString)>,
    /// The gateway's access token and when to stop using it.
    token: Mutex<Option<(String, Instant)>>,
}

/// Accepts events from the API and control handlers and hands them to the dispatcher.
pub struct Notifier {
    tx: mpsc::UnboundedSender<Msg>,
    target: Mutex<Option<Arc<Target>>>,
    /// Last `timestamp` handed out, so timestamps strictly increase even within one
    /// millisecond (the gateway discards events not newer than what it has).
    last_timestamp: Mutex<OffsetDateTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("notify target base URL must start with http:// or https://")]
    Scheme,
    #[error("notify target TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("notify target TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

impl Notifier {
    pub fn new() -> (Notifier, mpsc::UnboundedReceiver<Msg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let n = Notifier {
            tx,
            target: Mutex::new(None),
            last_timestamp: Mutex::new(OffsetDateTime::UNIX_EPOCH),
        };
        (n, rx)
    }

    /// Replaces the receiver. Events already being redelivered switch to the new one at their
    /// next attempt.
    pub fn set_target(&self, t: Option<NotifyTarget>) -> Result<(), TargetError> {
        let target = t.map(Target::build).transpose()?.map(Arc::new);
        *lock(&self.target) = target;
        Ok(())
    }

    /// A sender into the dispatcher's queue (the dispatcher schedules its own flushes).
    pub fn sender(&self) -> mpsc::UnboundedSender<Msg> {
        self.tx.clone()
    }

    fn target(&self) -> Option<Arc<Target>> {
        lock(&self.target).clone()
    }

    /// Queues a notification about `info` for delivery.
    pub fn emit(
        &self,
        event_type: EventType,
        merchant_id: &str,
        info: &TokenInfo,
        reason: Option<&str>,
    ) {
        let event_id = random_id("evt_", 16);
        let mut body = json!({
            "eventId": event_id,
            "eventType": event_type.as_str(),
            "timestamp": self.next_timestamp(),
            "tokenId": info.token_id,
            "requestId": info.request_id,
            "status": info.status,
            "tokenLastDigits": info.token_last_digits,
            "tokenExpiryDate": info.token_expiry_date,
            "cardLastDigits": info.card_last_digits,
            "cardExpiryDate": info.card_expiry_date,
            "par": info.par,
        });
        if let (Some(reason), Value::Object(map)) = (reason, &mut body) {
            map.insert("reason".into(), json!(reason));
        }
        let event = Event {
            event_id,
            token_id: info.token_id.clone(),
            merchant_id: merchant_id.to_owned(),
            body: Bytes::from(body.to_string()),
            path: None,
        };
        tracing::debug!(event_id = %event.event_id, token_id = %event.token_id,
            event_type = event_type.as_str(), "notification queued");
        // Fails only when the dispatcher is gone, i.e. the simulator is shutting down.
        let _ = self.tx.send(Msg::Event(event));
    }

    /// Queues an issuer notification: `body` posted to `path` on the gateway, with the same
    /// redelivery, duplicate and reorder behaviour as token notifications (`order_key` is what
    /// reordering holds back per: the operation).
    pub fn emit_to(&self, path: String, order_key: &str, body: &Value) {
        let event = Event {
            event_id: random_id("evt_", 16),
            token_id: order_key.to_owned(),
            merchant_id: String::new(),
            body: Bytes::from(body.to_string()),
            path: Some(path),
        };
        tracing::debug!(event_id = %event.event_id, order_key, "issuer notification queued");
        let _ = self.tx.send(Msg::Event(event));
    }

    /// Releases events held by `reorderNotifications`.
    pub fn flush_held(&self) {
        let _ = self.tx.send(Msg::FlushAll);
    }

    fn next_timestamp(&self) -> String {
        let mut last = lock(&self.last_timestamp);
        let now = OffsetDateTime::now_utc();
        let ts = if now > *last + time::Duration::milliseconds(1) {
            now
        } else {
            *last + time::Duration::milliseconds(1)
        };
        *last = ts;
        format_timestamp(ts)
    }
}

/// `2026-11-23T12:00:00.123Z`: RFC 3339, UTC, milliseconds.
pub fn format_timestamp(ts: OffsetDateTime) -> String {
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    ts.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_default()
}

impl Target {
    fn build(t: NotifyTarget) -> Result<Target, TargetError> {
        let https = t.base_url.starts_with("https://");
        if !https && !t.base_url.starts_with("http://") {
            return Err(TargetError::Scheme);
        }
        let mut config = match &t.ca_pem {
            Some(ca) => {
                let identity = t
                    .client_identity
                    .as_ref()
                    .map(|(cert, key)| (cert.as_str(), key.as_str()));
                tls::client_config(ca, identity)?
            }
            // Plain HTTP needs no trust anchors; an https target without a CA then fails
            // every attempt with an unknown-issuer error, which the logs show.
            None => rustls::ClientConfig::builder_with_provider(tls::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        };
        // hyper-rustls sets ALPN itself from the enabled HTTP versions.
        config.alpn_protocols.clear();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Target {
            base_url: t.base_url.trim_end_matches('/').to_owned(),
            client,
            oauth: t.oauth,
            token: Mutex::new(None),
        })
    }

    /// The bearer token for the gateway, fetched with client credentials and cached until
    /// shortly before it expires. `None` when the target needs no token.
    async fn bearer(&self) -> Result<Option<String>, String> {
        let Some((client_id, secret)) = &self.oauth else {
            return Ok(None);
        };
        if let Some((token, until)) = lock(&self.token).as_ref()
            && *until > Instant::now()
        {
            return Ok(Some(token.clone()));
        }
        let credentials = Zeroizing::new(format!("{client_id}:{}", secret.expose_secret()));
        let basic = Zeroizing::new(format!("Basic {}", STANDARD.encode(credentials.as_bytes())));
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/oauth2/token", self.base_url))
            .header(header::AUTHORIZATION, basic.as_str())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from_static(
                b"grant_type=client_credentials",
            )))
            .map_err(|e| format!("token request: {e}"))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("token request: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BODY)
            .collect()
            .await
            .map_err(|e| format!("token response: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("token endpoint answered {status}"));
        }
        let v: Value =
            serde_json::from_slice(&body).map_err(|_| "token response is not JSON".to_owned())?;
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or("token response has no access_token")?
            .to_owned();
        let ttl = v.get("expires_in").and_then(Value::as_u64).unwrap_or(300);
        // Refresh a little early so a token never expires in flight.
        let usable = Duration::from_secs(ttl.saturating_sub((ttl / 10).clamp(1, 60)));
        *lock(&self.token) = Some((token.clone(), Instant::now() + usable));
        Ok(Some(token))
    }

    fn forget_token(&self) {
        *lock(&self.token) = None;
    }
}

enum Outcome {
    Delivered,
    Failed(String),
    /// Nowhere to send it; the event is dropped (there is no gateway to retry against).
    NoTarget,
}

/// One delivery attempt of `event`.
async fn attempt(shared: &Shared, event: &Event) -> Outcome {
    let Some(target) = shared.notifier.target() else {
        return Outcome::NoTarget;
    };
    Stats::bump(&shared.stats.notification_attempts);
    let result = tokio::time::timeout(ATTEMPT_TIMEOUT, send(shared, &target, event)).await;
    match result {
        Ok(Ok(())) => {
            Stats::bump(&shared.stats.notifications_delivered);
            Outcome::Delivered
        }
        Ok(Err(reason)) => Outcome::Failed(reason),
        Err(_) => Outcome::Failed("no answer in time".to_owned()),
    }
}

async fn send(shared: &Shared, target: &Target, event: &Event) -> Result<(), String> {
    let bearer = target.bearer().await?;
    let uri = match &event.path {
        Some(p) => format!("{}{p}", target.base_url),
        None => format!(
            "{}/merchant-gateways/{}/merchants/{}/tokens/{}/notify-update",
            target.base_url, shared.merchant_gateway_id, event.merchant_id, event.token_id
        ),
    };
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            "x-correlation-id",
            uuid::Uuid::new_v4().simple().to_string(),
        );
    if let Some(token) = bearer {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(event.body.clone()))
        .map_err(|e| format!("request: {e}"))?;
    let resp = target
        .client
        .request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    // Read the body so the connection can go back to the pool.
    let _ = Limited::new(resp.into_body(), MAX_RESPONSE_BODY)
        .collect()
        .await;
    if status == StatusCode::UNAUTHORIZED {
        target.forget_token();
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("gateway answered {status}"))
    }
}

/// Delay before attempt `n + 1` after `n` failed attempts: 0.2 s, 0.4 s, ... capped at 30 s.
fn backoff(failed: u32) -> Duration {
    let factor = 1u32 << failed.saturating_sub(1).min(16);
    BACKOFF_START.saturating_mul(factor).min(BACKOFF_CAP)
}

/// First attempt now; on failure, redeliveries in a task of their own.
async fn deliver(shared: &Arc<Shared>, event: Event, shutdown: &watch::Receiver<bool>) {
    match attempt(shared, &event).await {
        Outcome::Delivered => {
            tracing::debug!(event_id = %event.event_id, "notification delivered");
        }
        Outcome::NoTarget => {
            tracing::warn!(event_id = %event.event_id, "no notification target set; event dropped");
        }
        Outcome::Failed(reason) => {
            tracing::info!(event_id = %event.event_id, %reason, "notification failed; will redeliver");
            let shared = shared.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = redeliver(&shared, &event) => {}
                    () = wait_shutdown(shutdown) => {}
                }
            });
        }
    }
}

async fn redeliver(shared: &Shared, event: &Event) {
    for n in 2..=MAX_ATTEMPTS {
        tokio::time::sleep(backoff(n - 1)).await;
        match attempt(shared, event).await {
            Outcome::Delivered => {
                tracing::debug!(event_id = %event.event_id, attempt = n, "notification delivered");
                return;
            }
            Outcome::NoTarget => {
                tracing::warn!(event_id = %event.event_id, "notification target removed; event dropped");
                return;
            }
            Outcome::Failed(reason) => {
                tracing::info!(event_id = %event.event_id, attempt = n, %reason, "notification failed");
            }
        }
    }
    tracing::warn!(event_id = %event.event_id, "notification given up after {MAX_ATTEMPTS} attempts");
}

/// Delivers `event`, twice when `duplicateNotifications` is on.
async fn deliver_maybe_twice(shared: &Arc<Shared>, event: Event, shutdown: &watch::Receiver<bool>) {
    if shared.faults().duplicate_notifications {
        deliver(shared, event.clone(), shutdown).await;
    }
    deliver(shared, event, shutdown).await;
}

/// The dispatcher: first attempts in event order, reordering when asked to.
pub async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    tx: mpsc::UnboundedSender<Msg>,
    shutdown: watch::Receiver<bool>,
) {
    // Events held back by `reorderNotifications`, one per token at most.
    let mut held: HashMap<String, Event> = HashMap::new();
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            () = wait_shutdown(shutdown.clone()) => None,
        };
        let Some(msg) = msg else { break };
        match msg {
            Msg::Event(event) => {
                if !shared.faults().reorder_notifications {
                    deliver_maybe_twice(&shared, event, &shutdown).await;
                } else if let Some(older) = held.remove(&event.token_id) {
                    deliver_maybe_twice(&shared, event, &shutdown).await;
                    deliver_maybe_twice(&shared, older, &shutdown).await;
                } else {
                    let (token_id, event_id) = (event.token_id.clone(), event.event_id.clone());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(REORDER_HOLD).await;
                        let _ = tx.send(Msg::Flush { token_id, event_id });
                    });
                    held.insert(event.token_id.clone(), event);
                }
            }
            Msg::Flush { token_id, event_id } => {
                if held.get(&token_id).is_some_and(|e| e.event_id == event_id)
                    && let Some(event) = held.remove(&token_id)
                {
                    deliver_maybe_twice(&shared, event, &shutdown).await;
                }
            }
            Msg::FlushAll => {
                let events: Vec<Event> = held.drain().map(|(_, e)| e).collect();
                for event in events {
                    deliver_maybe_twice(&shared, event, &shutdown).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(2), Duration::from_millis(400));
        assert_eq!(backoff(3), Duration::from_millis(800));
        assert_eq!(backoff(8), Duration::from_millis(25_600));
        assert_eq!(backoff(9), BACKOFF_CAP);
        assert_eq!(backoff(19), BACKOFF_CAP);
    }

    #[test]
    fn timestamps_strictly_increase() {
        let (n, _rx) = Notifier::new();
        let a = n.next_timestamp();
        let b = n.next_timestamp();
        let c = n.next_timestamp();
        assert!(a < b && b < c, "{a} {b} {c}");
        assert!(a.ends_with('Z') && a.len() == "2026-11-23T12:00:00.123Z".len());
    }
}
