//! Merchant webhooks: endpoints, the events a token change produces, their signatures, and the
//! worker that delivers them at least once through the durable outbox
//! ([`crate::domain::ports::outbox::OutboxStore`]).
//!
//! # How an event travels
//!
//! 1. Something changes a token and calls [`WebhookService::token_changed`] with the record
//!    before and after. The status transition names the event type; no type, no event.
//! 2. If at least one of the merchant's endpoints subscribes to that type, the event (its exact
//!    JSON body, frozen now) is stored with one `pending` delivery per endpoint, and one outbox
//!    job per delivery is queued, in one store operation.
//! 3. A worker on any gateway instance claims the job (a lease: a claimed job that is not
//!    finished within `claim_idle` is claimed again, by any instance), signs the body with the
//!    endpoint's secret and POSTs it. Any 2xx is delivered. Otherwise the job is re-queued after
//!    an exponential backoff, and after `max_attempts` attempts it is dead-lettered.
//!
//! Delivery is at least once: a gateway that dies after the receiver got the request but before
//! it recorded the outcome delivers again. Receivers dedupe on the event id. Events of one
//! subject (a token, an issuer operation: [`WebhookEvent::subject`]) reach each endpoint in the
//! order they were stored: the store keeps one chain per (endpoint, subject) and queues only its
//! head; a delivered or dead-lettered head releases the next
//! ([`crate::domain::ports::outbox`]). Events of different subjects are not ordered and do not
//! wait for each other. `docs/webhooks.md` is the merchant-facing description.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tokio::sync::Notify;
use zeroize::Zeroizing;

use super::error::DomainError;
use super::token::{MerchantId, TokenId, TokenRecord, TokenStatus};
use crate::crypto::Keyring;
use crate::domain::ports::StoreError;
use crate::domain::ports::outbox::{EventAppend, JobNext, OutboxJob, OutboxStore};
use crate::egress::{AddrClass, Egress, EgressError};

/// Endpoints one merchant may register: each token change fans out to all of them.
pub const MAX_ENDPOINTS_PER_MERCHANT: usize = 16;
/// Longest accepted endpoint URL.
pub const MAX_URL_LEN: usize = 2048;
/// Prefix of signing secrets, so secret scanners recognise a leaked one.
pub const SECRET_PREFIX: &str = "whsec_";
/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "tokengate-signature";
pub const EVENT_ID_HEADER: &str = "tokengate-event-id";
pub const EVENT_TYPE_HEADER: &str = "tokengate-event-type";
/// How old a signature timestamp a receiver should still accept (documented replay window).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(300);
/// Purpose label of sealed endpoint secrets (part of their AAD, see `docs/security.md`).
const SECRET_PURPOSE: &str = "webhook-secret";
/// Jobs claimed per worker round, and deliveries in flight at once per instance.
const BATCH: usize = 16;
/// Bound on resolving an endpoint's host at registration (the request waits for it).
const REGISTRATION_RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest overlap of a secret rotation: long enough to roll a receiver's configuration out,
/// short enough that a leaked old secret does not stay valid for long.
pub const MAX_ROTATION_OVERLAP: Duration = Duration::from_secs(7 * 24 * 3600);
/// Overlap of a rotation that names none.
pub const DEFAULT_ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 3600);
/// Read-modify-write rounds of an endpoint change before giving up on concurrent writers
/// (each round is a compare-and-set; losing it means someone else changed the endpoint).
const ENDPOINT_CAS_ROUNDS: usize = 5;

// --- identifiers -------------------------------------------------------------------------------

fn random_b64(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    URL_SAFE_NO_PAD.encode(&buf)
}

fn is_b64url(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A webhook endpoint id: `whe_` + 128 random bits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EndpointId(String);

impl EndpointId {
    pub const PREFIX: &'static str = "whe_";
    pub fn generate() -> EndpointId {
        EndpointId(format!("{}{}", Self::PREFIX, random_b64(16)))
    }
    /// Only well-formed ids: they become parts of storage keys.
    pub fn parse(s: &str) -> Option<EndpointId> {
        (s.len() == Self::PREFIX.len() + 22
            && s.starts_with(Self::PREFIX)
            && is_b64url(&s[Self::PREFIX.len()..]))
        .then(|| EndpointId(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event id: `evt_` + the creation time (12 hex digits of Unix milliseconds) + 128 random
/// bits. The time prefix makes ids sort by creation, which is what listing pages through and
/// what retention trims by, in both backends, without a second index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(String);

impl EventId {
    pub const PREFIX: &'static str = "evt_";
    const LEN: usize = 4 + 12 + 22;

    pub fn generate(at: OffsetDateTime) -> EventId {
        EventId(format!(
            "{}{:012x}{}",
            Self::PREFIX,
            unix_ms(at) & 0xffff_ffff_ffff,
            random_b64(16)
        ))
    }
    pub fn parse(s: &str) -> Option<EventId> {
        let ok = s.len() == Self::LEN
            && s.starts_with(Self::PREFIX)
            && s[4..16]
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && is_b64url(&s[16..]);
        ok.then(|| EventId(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The smallest possible id of an event created at `at` or later: every older id sorts
    /// below it.
    pub fn lower_bound(at: OffsetDateTime) -> String {
        format!("{}{:012x}", Self::PREFIX, unix_ms(at) & 0xffff_ffff_ffff)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn unix_ms(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

// --- event types -------------------------------------------------------------------------------

/// What happened to a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Activated,
    Suspended,
    Resumed,
    Updated,
    Deleted,
    /// Issuer events (endpoints of issuers only): an operation reached `SUCCESSFUL`.
    IssuerOperationSucceeded,
    IssuerOperationFailed,
    IssuerClickToPayEnrolled,
    IssuerClickToPayOptedOut,
    /// A physical card's production status (or its shipment tracking) changed.
    IssuerProductionStatusChanged,
}

impl EventType {
    pub const ALL: [EventType; 10] = [
        EventType::Activated,
        EventType::Suspended,
        EventType::Resumed,
        EventType::Updated,
        EventType::Deleted,
        EventType::IssuerOperationSucceeded,
        EventType::IssuerOperationFailed,
        EventType::IssuerClickToPayEnrolled,
        EventType::IssuerClickToPayOptedOut,
        EventType::IssuerProductionStatusChanged,
    ];

    /// Whether endpoints of issuers (`true`) or of merchants subscribe to this type.
    pub fn is_issuer_event(&self) -> bool {
        matches!(
            self,
            EventType::IssuerOperationSucceeded
                | EventType::IssuerOperationFailed
                | EventType::IssuerClickToPayEnrolled
                | EventType::IssuerClickToPayOptedOut
                | EventType::IssuerProductionStatusChanged
        )
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            EventType::Activated => "token.activated",
            EventType::Suspended => "token.suspended",
            EventType::Resumed => "token.resumed",
            EventType::Updated => "token.updated",
            EventType::Deleted => "token.deleted",
            EventType::IssuerOperationSucceeded => "issuer.operation.succeeded",
            EventType::IssuerOperationFailed => "issuer.operation.failed",
            EventType::IssuerClickToPayEnrolled => "issuer.click_to_pay.enrolled",
            EventType::IssuerClickToPayOptedOut => "issuer.click_to_pay.opted_out",
            EventType::IssuerProductionStatusChanged => "issuer.production.status_changed",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The event a change from `before` to `after` means, if any.
    ///
    /// A status change names the event; a status change the five types do not describe (e.g.
    /// to `EXPIRED`, or to a status D1 added later) is `token.updated`, so merchants still hear
    /// about it. Without a status change, a change of what merchants see about the card or the
    /// network token (expiry, last four, network token id, PAR) is `token.updated`; bookkeeping
    /// (version, timestamps) is not an event.
    pub fn of_change(before: &TokenRecord, after: &TokenRecord) -> Option<EventType> {
        use TokenStatus::{Active, Deleted, Suspended};
        if before.status != after.status {
            return Some(match (&before.status, &after.status) {
                (_, Deleted) => EventType::Deleted,
                (Suspended, Active) => EventType::Resumed,
                (_, Active) => EventType::Activated,
                (_, Suspended) => EventType::Suspended,
                _ => EventType::Updated,
            });
        }
        let visible_change = before.card.expiry != after.card.expiry
            || before.card.last4 != after.card.last4
            || before.network_token != after.network_token;
        visible_change.then_some(EventType::Updated)
    }
}

impl Serialize for EventType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        EventType::parse(&s).ok_or_else(|| serde::de::Error::custom("unknown event type"))
    }
}

// --- records -----------------------------------------------------------------------------------

/// An endpoint's signing secret, encrypted by the vault keyring (AES-256-GCM, AAD bound to the
/// merchant and endpoint, see `docs/security.md`). Only the worker opens it, per delivery.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    pub key_id: String,
    #[serde(with = "b64")]
    pub blob: Vec<u8>,
}

impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SealedSecret(key_id={}, {} bytes)",
            self.key_id,
            self.blob.len()
        )
    }
}

/// The secret an endpoint had before its last rotation: deliveries are signed with it too until
/// `expires_at`, so receivers can switch secrets without dropping a request. Sealed like the
/// current one (same purpose and binding: it is the same endpoint's secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousSecret {
    pub secret: SealedSecret,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// A merchant's registered receiver.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEndpoint {
    pub id: EndpointId,
    pub merchant_id: MerchantId,
    /// Never logged: merchants put credentials in query strings.
    pub url: String,
    pub events: Vec<EventType>,
    pub secret: SealedSecret,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The secret before the last rotation, while its overlap lasts. An expired one is ignored
    /// and dropped at the endpoint's next change. Absent in records from before rotation existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret: Option<PreviousSecret>,
    /// When the secret was last rotated (`None`: never). Tells an idempotent replay whether the
    /// secret it would show is still the one its request produced.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub secret_rotated_at: Option<OffsetDateTime>,
}

impl WebhookEndpoint {
    /// The previous secret if its overlap has not ended at `at`.
    pub fn live_previous_secret(&self, at: OffsetDateTime) -> Option<&PreviousSecret> {
        self.previous_secret.as_ref().filter(|p| p.expires_at > at)
    }
}

impl fmt::Debug for WebhookEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookEndpoint")
            .field("id", &self.id)
            .field("merchant_id", &self.merchant_id)
            .field("url", &"<redacted>")
            .field("events", &self.events)
            .field("secret", &self.secret)
            .field("previous_secret", &self.previous_secret)
            .field("secret_rotated_at", &self.secret_rotated_at)
            .finish()
    }
}

/// One event, as it will be delivered. `payload` is the exact body sent and signed: frozen at
/// creation, so every attempt (and a redelivery days later) carries the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEvent {
    pub id: EventId,
    pub merchant_id: MerchantId,
    pub event_type: EventType,
    /// The token a merchant event is about (`None` for issuer events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<TokenId>,
    /// The issuer operation an issuer event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub payload: String,
}

impl WebhookEvent {
    /// What the event is about, for ordering: events of one subject are delivered to each
    /// endpoint in the order they were stored (`docs/webhooks.md`, "Order per token"). `t:` +
    /// the token id for token events, `o:` + the operation id for issuer events that have one
    /// (hex-encoded as `x:` if it has characters other than those of ids); `None` for an event
    /// about neither, which is delivered without waiting for any other.
    pub fn subject(&self) -> Option<String> {
        if let Some(t) = &self.token_id {
            return Some(format!("t:{}", t.as_str()));
        }
        let op = self.operation_id.as_deref().filter(|o| !o.is_empty())?;
        let plain = op.len() <= 128
            && op
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        Some(if plain {
            format!("o:{op}")
        } else {
            // Bounded, and still one subject per operation id.
            let digest = <Sha256 as sha2::Digest>::digest(op.as_bytes());
            format!("x:{}", hex::encode(digest))
        })
    }
}

/// Where one event stands with one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Queued, not attempted yet in this round.
    Pending,
    /// A 2xx was received.
    Delivered,
    /// The last attempt failed; another is scheduled (`next_attempt_at`).
    Failed,
    /// `max_attempts` attempts failed (or the endpoint is gone): dead-lettered until redelivered.
    Dead,
}

impl DeliveryStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Dead => "dead",
        }
    }
}

/// Delivery state of one event to one endpoint. `last_error` is a short code (`http_500`,
/// `timeout`, `connect_failed`, ...): response bodies are never kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryState {
    pub endpoint_id: EndpointId,
    pub status: DeliveryStatus,
    /// Attempts in the current round (a redelivery starts a new round).
    pub attempts: u32,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_attempt_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub delivered_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// HTTP status of the last answer, if there was one.
    #[serde(default)]
    pub last_status: Option<u16>,
}

impl DeliveryState {
    pub fn pending(endpoint_id: EndpointId) -> DeliveryState {
        DeliveryState {
            endpoint_id,
            status: DeliveryStatus::Pending,
            attempts: 0,
            last_attempt_at: None,
            next_attempt_at: None,
            delivered_at: None,
            last_error: None,
            last_status: None,
        }
    }
}

/// An event with its deliveries, as the store returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub event: WebhookEvent,
    pub deliveries: Vec<DeliveryState>,
}

impl EventRecord {
    /// One status for the event: the most urgent of its deliveries (dead, then failed, then
    /// pending); delivered only when every delivery is.
    pub fn status(&self) -> DeliveryStatus {
        let has = |s| self.deliveries.iter().any(|d| d.status == s);
        if has(DeliveryStatus::Dead) {
            DeliveryStatus::Dead
        } else if has(DeliveryStatus::Failed) {
            DeliveryStatus::Failed
        } else if has(DeliveryStatus::Pending) {
            DeliveryStatus::Pending
        } else {
            DeliveryStatus::Delivered
        }
    }
}

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

// --- errors ------------------------------------------------------------------------------------

/// What the webhook use cases fail with; the HTTP layer turns it into responses.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{detail}")]
    Validation { code: &'static str, detail: String },
    /// The URL's host is, or resolves to, an address the SSRF guard refuses
    /// ([`crate::egress`]). Only the class is kept: the address may describe internal networks.
    #[error("webhook url refused: the host is or resolves to {}", .0.describe())]
    Forbidden(AddrClass),
    #[error("webhook endpoint not found")]
    EndpointNotFound,
    #[error("event not found")]
    EventNotFound,
    #[error("a merchant can have at most {MAX_ENDPOINTS_PER_MERCHANT} webhook endpoints")]
    TooManyEndpoints,
    /// Every delivery of the event is still queued or retrying, or its endpoints are gone.
    #[error("nothing to redeliver")]
    NotRedeliverable,
    #[error(transparent)]
    Domain(#[from] DomainError),
}

impl From<StoreError> for WebhookError {
    fn from(e: StoreError) -> Self {
        WebhookError::Domain(e.into())
    }
}

fn invalid(code: &'static str, detail: impl Into<String>) -> WebhookError {
    WebhookError::Validation {
        code,
        detail: detail.into(),
    }
}

// --- signing -----------------------------------------------------------------------------------

/// The `Tokengate-Signature` value for `body` sent at Unix time `t`.
pub fn signature_header(secret: &[u8], t: i64, body: &[u8]) -> String {
    signature_header_multi(&[secret], t, body)
}

/// The `Tokengate-Signature` value with one `v1` per secret, in the order given: during a
/// rotation's overlap `t=<t>,v1=<new>,v1=<old>`, so a receiver still holding the old secret
/// and one already holding the new one both find a match.
pub fn signature_header_multi(secrets: &[&[u8]], t: i64, body: &[u8]) -> String {
    let mut h = format!("t={t}");
    for secret in secrets {
        h.push_str(",v1=");
        h.push_str(&hex::encode(sign(secret, t, body)));
    }
    h
}

fn sign(secret: &[u8], t: i64, body: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; the error branch cannot happen.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret) else {
        return Vec::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// What a receiver does: true when one `v1` signature in `header` matches and `t` is within
/// `tolerance` of `now` (Unix seconds). Constant-time comparison. Used by the tests and shown in
/// `docs/webhooks.md`.
pub fn verify_signature(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> bool {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => sigs.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if (now - t).abs() > tolerance {
        return false;
    }
    let expected = sign(secret, t, body);
    sigs.iter()
        .any(|s| bool::from(s.as_slice().ct_eq(&expected)))
}

// --- URL validation ----------------------------------------------------------------------------

/// Host of an absolute `http(s)` URL, lower-cased, without brackets or port.
fn url_host(uri: &http::Uri) -> Option<String> {
    let host = uri.host()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks an endpoint URL: absolute `https://` (or `http://` to a loopback host, or anywhere when
/// `allow_http` - sandbox mode), at most [`MAX_URL_LEN`] characters, no credentials, no fragment,
/// no whitespace or control characters.
pub fn validate_url(url: &str, allow_http: bool) -> Result<(), WebhookError> {
    if url.is_empty() || url.len() > MAX_URL_LEN {
        return Err(invalid(
            "invalid_webhook_url",
            format!("url must be 1 to {MAX_URL_LEN} characters"),
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) || url.contains('#') {
        return Err(invalid(
            "invalid_webhook_url",
            "url must not contain whitespace, control characters or a fragment",
        ));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|_| invalid("invalid_webhook_url", "url must be an absolute http(s) URL"))?;
    let scheme = uri.scheme_str().map(str::to_ascii_lowercase);
    let Some(host) = url_host(&uri) else {
        return Err(invalid(
            "invalid_webhook_url",
            "url must be an absolute http(s) URL with a host",
        ));
    };
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(invalid(
            "invalid_webhook_url",
            "url must not carry credentials; authenticate with the signature instead",
        ));
    }
    match scheme.as_deref() {
        Some("https") => Ok(()),
        Some("http") if allow_http || is_loopback(&host) => Ok(()),
        Some("http") => Err(invalid(
            "insecure_webhook_url",
            "url must use https (plain http is accepted only for loopback hosts, or in sandbox mode)",
        )),
        _ => Err(invalid(
            "invalid_webhook_url",
            "url must be an absolute http(s) URL",
        )),
    }
}

/// The subscribed types of an endpoint: at least one, each known; duplicates collapse.
fn parse_event_types(events: &[String], issuer: bool) -> Result<Vec<EventType>, WebhookError> {
    if events.is_empty() || events.len() > EventType::ALL.len() * 4 {
        return Err(invalid(
            "invalid_event_types",
            "events must list at least one event type",
        ));
    }
    let mut types = Vec::new();
    for e in events {
        let t = EventType::parse(e)
            .filter(|t| t.is_issuer_event() == issuer)
            .ok_or_else(|| {
                let known: Vec<&str> = EventType::ALL
                    .iter()
                    .filter(|t| t.is_issuer_event() == issuer)
                    .map(|t| t.as_str())
                    .collect();
                invalid(
                    "invalid_event_types",
                    format!("unknown event type; known types are {}", known.join(", ")),
                )
            })?;
        if !types.contains(&t) {
            types.push(t);
        }
    }
    Ok(types)
}

/// Forgets a previous secret whose overlap is over, so it does not stay at rest longer than
/// needed (the worker already ignores it).
fn drop_expired_previous(ep: &mut WebhookEndpoint, at: OffsetDateTime) {
    if ep.live_previous_secret(at).is_none() {
        ep.previous_secret = None;
    }
}

/// Delay before attempt `n + 1` after `n` failed ones: `base * 2^(n-1)`, capped at `max`,
/// jittered down to between half and all of it so retries of many events spread out.
pub fn backoff(base: Duration, max: Duration, failed_attempts: u32) -> Duration {
    let base = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
    let cap = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    let exp = failed_attempts.saturating_sub(1).min(40);
    let ms = base.saturating_mul(1u64 << exp).min(cap).max(1);
    Duration::from_millis(rand::random_range(ms.div_ceil(2)..=ms))
}

// --- outbound HTTP -----------------------------------------------------------------------------

/// One signed delivery attempt.
pub struct OutboundRequest<'a> {
    pub url: &'a str,
    pub headers: Vec<(&'static str, String)>,
    pub body: &'a str,
}

/// Why an attempt got no HTTP answer. The codes are what `GET /v1/events` shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("could not connect")]
    Connect,
    #[error("request failed")]
    Request,
    #[error("invalid url")]
    InvalidUrl,
    /// The SSRF guard refused every way to the host (at delivery, on freshly resolved
    /// addresses): nothing was sent.
    #[error("destination refused: {}", .0.describe())]
    Forbidden(AddrClass),
}

impl SendError {
    pub fn code(&self) -> &'static str {
        match self {
            SendError::Connect => "connect_failed",
            SendError::Request => "request_failed",
            SendError::InvalidUrl => "invalid_url",
            SendError::Forbidden(class) => match class {
                AddrClass::Loopback => "forbidden_address_loopback",
                AddrClass::Private => "forbidden_address_private",
                AddrClass::LinkLocal => "forbidden_address_link_local",
                AddrClass::SharedCgnat => "forbidden_address_shared_cgnat",
                AddrClass::UniqueLocal => "forbidden_address_unique_local",
                AddrClass::Multicast => "forbidden_address_multicast",
                AddrClass::Broadcast => "forbidden_address_broadcast",
                AddrClass::Unspecified => "forbidden_address_unspecified",
                AddrClass::Documentation => "forbidden_address_documentation",
                AddrClass::Reserved => "forbidden_address_reserved",
                AddrClass::OwnListener => "forbidden_address_own_listener",
            },
        }
    }
}

/// Sends one webhook request and reports the HTTP status. The worker bounds each call with
/// `timeout`; implementations must not follow redirects, and must check the addresses they
/// connect to with the SSRF guard ([`crate::egress::Egress::resolve_checked`]).
#[async_trait]
pub trait WebhookSender: Send + Sync + 'static {
    async fn send(&self, req: OutboundRequest<'_>) -> Result<u16, SendError>;
}

// --- the service -------------------------------------------------------------------------------

/// Renders a token as the API shows it (`GET /v1/tokens/{id}`); given by the wiring so this
/// layer does not depend on the HTTP types.
pub type TokenRenderer = Arc<dyn Fn(&TokenRecord) -> serde_json::Value + Send + Sync>;
/// Renders an issuer operation for an issuer webhook payload, exactly as the API shows it.
pub type OperationRenderer =
    Arc<dyn Fn(&crate::domain::issuer_ops::IssuerOperation) -> serde_json::Value + Send + Sync>;

/// Delivery policy (config section `[webhooks]`).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub max_attempts: u32,
    /// Bound on one attempt: connect, TLS, request and response head.
    pub timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How often an idle worker looks for due jobs (jobs queued by this instance wake it at once).
    pub poll_interval: Duration,
    /// A claimed job not finished within this is claimed again (its worker is presumed dead).
    pub claim_idle: Duration,
    /// Events older than this are dropped from listing and storage.
    pub retention: Duration,
    /// Plain `http://` endpoints anywhere (sandbox mode); otherwise only on loopback hosts
    /// (which the SSRF guard then refuses unless `webhooks.allow_private_networks` opens them).
    pub allow_plain_http: bool,
}

/// Endpoints, events and delivery for merchant webhooks.
pub struct WebhookService {
    outbox: Arc<dyn OutboxStore>,
    keyring: Arc<Keyring>,
    render: TokenRenderer,
    render_operation: OperationRenderer,
    settings: WebhookSettings,
    /// The SSRF guard, for registration (the sender holds the same one for deliveries).
    egress: Arc<Egress>,
    /// Wakes this instance's worker when it queued something, so delivery does not wait a poll.
    wake: Notify,
    /// This instance's name among the workers sharing the outbox (Redis consumer name).
    consumer: String,
    /// Merchants whose last endpoint read here found at least one endpoint. Only a hint for
    /// which write to try first ([`Self::try_without_endpoint_read`]), never the decision:
    /// the store checks the endpoints in the write itself, so a stale entry costs at most one
    /// round trip. Bounded by [`ENDPOINT_HINTS_MAX`].
    with_endpoints: dashmap::DashSet<MerchantId>,
}

/// How many merchants [`WebhookService`] remembers as having endpoints; past it the set is
/// cleared (a forgotten merchant takes one extra round trip once, then is remembered again).
const ENDPOINT_HINTS_MAX: usize = 100_000;

impl fmt::Debug for WebhookService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookService")
            .field("settings", &self.settings)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl WebhookService {
    pub fn new(
        outbox: Arc<dyn OutboxStore>,
        keyring: Arc<Keyring>,
        render: TokenRenderer,
        settings: WebhookSettings,
        egress: Arc<Egress>,
    ) -> WebhookService {
        WebhookService {
            outbox,
            keyring,
            render,
            // Until the API layer installs its view: ids and status only, never call parameters.
            render_operation: Arc::new(|op| {
                serde_json::json!({
                    "id": op.id.as_str(),
                    "operation": op.kind.as_str(),
                    "status": op.status.as_str(),
                })
            }),
            settings,
            egress,
            wake: Notify::new(),
            consumer: format!("gw-{}", random_b64(9)),
            with_endpoints: dashmap::DashSet::new(),
        }
    }

    pub fn settings(&self) -> &WebhookSettings {
        &self.settings
    }

    /// Renders issuer operations in webhook payloads with `r` (the API's operation view).
    pub fn with_operation_renderer(mut self, r: OperationRenderer) -> WebhookService {
        self.render_operation = r;
        self
    }

    fn secret_binding<'a>(m: &'a MerchantId, id: &'a EndpointId) -> [&'a str; 2] {
        [m.as_str(), id.as_str()]
    }

    // --- endpoints ---------------------------------------------------------------------------

    /// Registers an endpoint and returns it with its signing secret (shown to the merchant once;
    /// stored only sealed).
    pub async fn create_endpoint(
        &self,
        merchant: &MerchantId,
        url: &str,
        events: &[String],
    ) -> Result<(WebhookEndpoint, Zeroizing<String>), WebhookError> {
        self.check_url(url).await?;
        let types = parse_event_types(events, merchant.is_issuer())?;
        let id = EndpointId::generate();
        let (secret, sealed) = self.new_secret(merchant, &id);
        let ep = WebhookEndpoint {
            id,
            merchant_id: merchant.clone(),
            url: url.to_owned(),
            events: types,
            secret: sealed,
            created_at: now(),
            previous_secret: None,
            secret_rotated_at: None,
        };
        if !self
            .outbox
            .insert_endpoint(&ep, MAX_ENDPOINTS_PER_MERCHANT)
            .await?
        {
            return Err(WebhookError::TooManyEndpoints);
        }
        Ok((ep, secret))
    }

    /// A fresh signing secret for the endpoint, and its sealed form (bound to merchant and
    /// endpoint, so a sealed secret copied to another endpoint does not open).
    fn new_secret(
        &self,
        merchant: &MerchantId,
        id: &EndpointId,
    ) -> (Zeroizing<String>, SealedSecret) {
        let secret = Zeroizing::new(format!("{SECRET_PREFIX}{}", random_b64(32)));
        let (key_id, blob) = self.keyring.seal_secret(
            SECRET_PURPOSE,
            &Self::secret_binding(merchant, id),
            secret.as_bytes(),
        );
        (secret, SealedSecret { key_id, blob })
    }

    /// The URL rules and the SSRF guard, the same at registration and at every change.
    async fn check_url(&self, url: &str) -> Result<(), WebhookError> {
        validate_url(url, self.settings.allow_plain_http)?;
        self.check_destination(url).await
    }

    /// Changes an endpoint's URL and/or subscribed event types (`None`: unchanged), with the
    /// checks of registration. The secret is untouched. Deliveries already queued go to the
    /// new URL from their next attempt on (the worker reads the endpoint per attempt).
    pub async fn update_endpoint(
        &self,
        merchant: &MerchantId,
        id: &str,
        url: Option<&str>,
        events: Option<&[String]>,
    ) -> Result<WebhookEndpoint, WebhookError> {
        let id = EndpointId::parse(id).ok_or(WebhookError::EndpointNotFound)?;
        // Validate before looking the endpoint up: a bad request is a bad request whether or
        // not the endpoint exists, and the (slow) SSRF resolution is not repeated per round.
        if let Some(url) = url {
            self.check_url(url).await?;
        }
        let types = events
            .map(|e| parse_event_types(e, merchant.is_issuer()))
            .transpose()?;
        self.change_endpoint(merchant, &id, |ep, at| {
            if let Some(url) = url {
                ep.url = url.to_owned();
            }
            if let Some(types) = &types {
                ep.events = types.clone();
            }
            drop_expired_previous(ep, at);
        })
        .await
    }

    /// Gives the endpoint a new signing secret and returns it (shown once, like at creation).
    /// For `overlap` the replaced secret keeps signing too (both signatures in the header);
    /// after it, only the new one. A rotation during an overlap replaces the previous secret:
    /// the one being replaced becomes the previous one, the one before it is dropped at once,
    /// so at most two secrets sign.
    pub async fn rotate_secret(
        &self,
        merchant: &MerchantId,
        id: &str,
        overlap: Duration,
    ) -> Result<(WebhookEndpoint, Zeroizing<String>), WebhookError> {
        if overlap > MAX_ROTATION_OVERLAP {
            return Err(invalid(
                "invalid_rotation_overlap",
                format!(
                    "overlapSeconds must be 0 to {}",
                    MAX_ROTATION_OVERLAP.as_secs()
                ),
            ));
        }
        let id = EndpointId::parse(id).ok_or(WebhookError::EndpointNotFound)?;
        let (secret, sealed) = self.new_secret(merchant, &id);
        let ep = self
            .change_endpoint(merchant, &id, |ep, at| {
                let old = std::mem::replace(&mut ep.secret, sealed.clone());
                ep.previous_secret = (!overlap.is_zero()).then(|| PreviousSecret {
                    secret: old,
                    expires_at: at + overlap,
                });
                ep.secret_rotated_at = Some(at);
            })
            .await?;
        tracing::info!(endpoint_id = %ep.id, overlap_s = overlap.as_secs(), "webhook endpoint secret rotated");
        Ok((ep, secret))
    }

    /// Read, change, compare-and-set, until the write lands on the version it read: an update
    /// and a rotation racing each other both take effect, neither overwrites the other.
    async fn change_endpoint(
        &self,
        merchant: &MerchantId,
        id: &EndpointId,
        change: impl Fn(&mut WebhookEndpoint, OffsetDateTime),
    ) -> Result<WebhookEndpoint, WebhookError> {
        for _ in 0..ENDPOINT_CAS_ROUNDS {
            let current = self
                .outbox
                .get_endpoint(merchant, id)
                .await?
                .ok_or(WebhookError::EndpointNotFound)?;
            let mut next = current.clone();
            change(&mut next, now());
            if next == current {
                return Ok(current);
            }
            if self.outbox.replace_endpoint(&current, &next).await? {
                return Ok(next);
            }
        }
        Err(WebhookError::Domain(DomainError::Conflict))
    }

    /// The SSRF guard at registration: refuses a URL whose host is, or now resolves to, a
    /// refused address, so the merchant hears about it at once. A host that does not resolve
    /// now (not in DNS yet, resolver trouble, slow) is accepted: the check that protects is the
    /// one every delivery makes on the addresses it connects to.
    async fn check_destination(&self, url: &str) -> Result<(), WebhookError> {
        // validate_url has accepted the URL, so these cannot fail; if they did, there would be
        // no host to reach and nothing to guard.
        let Ok(uri) = url.parse::<http::Uri>() else {
            return Ok(());
        };
        let Some(host) = uri.host() else {
            return Ok(());
        };
        let https = uri
            .scheme_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"));
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let checked = tokio::time::timeout(
            REGISTRATION_RESOLVE_TIMEOUT,
            self.egress.resolve_checked(host, port),
        )
        .await;
        match checked {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(EgressError::Forbidden(class))) => Err(WebhookError::Forbidden(class)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "webhook url host not resolvable at registration; checked at delivery");
                Ok(())
            }
            Err(_) => {
                tracing::debug!(
                    "webhook url host resolution timed out at registration; checked at delivery"
                );
                Ok(())
            }
        }
    }

    /// The endpoint's signing secret, opened from its sealed form.
    pub fn endpoint_secret(&self, ep: &WebhookEndpoint) -> Result<Zeroizing<String>, WebhookError> {
        self.open_secret(ep, &ep.secret)
    }

    /// Opens one of `ep`'s sealed secrets (the current or the previous one).
    fn open_secret(
        &self,
        ep: &WebhookEndpoint,
        sealed: &SealedSecret,
    ) -> Result<Zeroizing<String>, WebhookError> {
        let bytes = self
            .keyring
            .open_secret(
                SECRET_PURPOSE,
                &Self::secret_binding(&ep.merchant_id, &ep.id),
                &sealed.key_id,
                &sealed.blob,
            )
            .map_err(|e| {
                WebhookError::Domain(DomainError::Internal(format!(
                    "webhook secret of {} cannot be opened: {e}",
                    ep.id
                )))
            })?;
        let s = std::str::from_utf8(&bytes).map_err(|_| {
            WebhookError::Domain(DomainError::Internal("webhook secret is not text".into()))
        })?;
        Ok(Zeroizing::new(s.to_owned()))
    }

    pub async fn list_endpoints(
        &self,
        merchant: &MerchantId,
    ) -> Result<Vec<WebhookEndpoint>, WebhookError> {
        let mut eps = self.outbox.list_endpoints(merchant).await?;
        eps.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(eps)
    }

    pub async fn get_endpoint(
        &self,
        merchant: &MerchantId,
        id: &str,
    ) -> Result<WebhookEndpoint, WebhookError> {
        let id = EndpointId::parse(id).ok_or(WebhookError::EndpointNotFound)?;
        self.outbox
            .get_endpoint(merchant, &id)
            .await?
            .ok_or(WebhookError::EndpointNotFound)
    }

    /// Removes an endpoint. Queued deliveries to it are dead-lettered (`endpoint_deleted`) when
    /// their turn comes.
    pub async fn delete_endpoint(
        &self,
        merchant: &MerchantId,
        id: &str,
    ) -> Result<(), WebhookError> {
        let id = EndpointId::parse(id).ok_or(WebhookError::EndpointNotFound)?;
        if self.outbox.delete_endpoint(merchant, &id).await? {
            Ok(())
        } else {
            Err(WebhookError::EndpointNotFound)
        }
    }

    // --- events ------------------------------------------------------------------------------

    /// The issuer events of an operation change, built (bodies frozen now) but not stored:
    /// `issuer.operation.succeeded` / `.failed` when the operation just reached a final status
    /// (`before` is `None` or had another status), and `issuer.click_to_pay.enrolled` /
    /// `.opted_out` when it was a successful Click to Pay enrolment / opt-out. Only types an
    /// endpoint of the issuer subscribes to; empty when nobody listens.
    ///
    /// The caller hands them to the operation's own write (`update_operation_with`,
    /// `apply_notification_with`), which stores them in the same atomic step as the change,
    /// then calls [`Self::events_stored`]. A write retried after a conflict builds them again
    /// from the record it then writes.
    pub async fn issuer_events_for(
        &self,
        before: Option<&crate::domain::issuer_ops::IssuerOperation>,
        op: &crate::domain::issuer_ops::IssuerOperation,
    ) -> Result<Vec<EventAppend>, DomainError> {
        use crate::domain::issuer_ops::{OperationKind, OperationStatus};
        if before.is_some_and(|b| b.status == op.status) {
            return Ok(Vec::new());
        }
        let mut types = vec![match op.status {
            OperationStatus::Successful => EventType::IssuerOperationSucceeded,
            OperationStatus::Failed => EventType::IssuerOperationFailed,
            OperationStatus::Pending => return Ok(Vec::new()),
        }];
        if op.status == OperationStatus::Successful {
            match op.kind {
                OperationKind::ClickToPayEnrolment => {
                    types.push(EventType::IssuerClickToPayEnrolled)
                }
                OperationKind::ClickToPayOptOut => types.push(EventType::IssuerClickToPayOptedOut),
                _ => {}
            }
        }
        let tenant = op.issuer_id.tenant();
        let endpoints = self.outbox.list_endpoints(&tenant).await?;
        let data = serde_json::json!({ "operation": (self.render_operation)(op) });
        let mut out = Vec::new();
        for t in types {
            let subscribed: Vec<EndpointId> = endpoints
                .iter()
                .filter(|e| e.events.contains(&t))
                .map(|e| e.id.clone())
                .collect();
            if subscribed.is_empty() {
                continue;
            }
            out.push(self.build_append(
                &tenant,
                t,
                None,
                Some(op.id.as_str()),
                data.clone(),
                subscribed,
            )?);
        }
        Ok(out)
    }

    /// Tells the service that an operation write stored `events` (built by
    /// [`Self::issuer_events_for`]): wakes this instance's worker.
    pub fn events_stored(&self, events: &[EventAppend]) {
        for e in events {
            tracing::debug!(event_id = %e.event.id, event_type = e.event.event_type.as_str(), operation_id = ?e.event.operation_id, endpoints = e.endpoints.len(), "webhook event queued");
        }
        if !events.is_empty() {
            self.wake.notify_one();
        }
    }

    /// One event of `tenant` with its frozen body, for `endpoints`.
    fn build_append(
        &self,
        tenant: &MerchantId,
        event_type: EventType,
        token_id: Option<TokenId>,
        operation_id: Option<&str>,
        data: serde_json::Value,
        endpoints: Vec<EndpointId>,
    ) -> Result<EventAppend, DomainError> {
        let created_at = now();
        let id = EventId::generate(created_at);
        let payload = serde_json::json!({
            "id": id.as_str(),
            "type": event_type.as_str(),
            "createdAt": created_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            "data": data,
        });
        let payload = serde_json::to_string(&payload)
            .map_err(|_| DomainError::Internal("webhook payload does not serialize".into()))?;
        Ok(EventAppend {
            event: WebhookEvent {
                id,
                merchant_id: tenant.clone(),
                event_type,
                token_id,
                operation_id: operation_id.map(str::to_owned),
                created_at,
                payload,
            },
            endpoints,
            retention: self.settings.retention,
        })
    }

    /// Queues `issuer.click_to_pay.opted_out` for a card that left Click to Pay because of `op`
    /// (D1 deleted the card: `reason` `CARD_DELETED`). Same payload as an opt-out's, plus the
    /// card and the reason.
    pub async fn issuer_card_opted_out(
        &self,
        op: &crate::domain::issuer_ops::IssuerOperation,
        card_id: &str,
        reason: &str,
    ) -> Result<Option<EventId>, DomainError> {
        let data = serde_json::json!({
            "operation": (self.render_operation)(op),
            "cardId": card_id,
            "reason": reason,
        });
        self.enqueue(
            &op.issuer_id.tenant(),
            EventType::IssuerClickToPayOptedOut,
            None,
            Some(op.id.as_str()),
            data,
        )
        .await
    }

    /// Queues `issuer.production.status_changed` for an order whose production status (or
    /// shipment tracking) changed. The order carries no card data (masked PAN only).
    pub async fn issuer_production_status_changed(
        &self,
        order: &crate::domain::production_orders::ProductionOrder,
        previous: &crate::domain::production_orders::ProductionStage,
    ) -> Result<Option<EventId>, DomainError> {
        let Some(issuer) = crate::domain::issuer::IssuerId::parse(&order.issuer_id) else {
            return Ok(None);
        };
        let data = serde_json::json!({ "order": order, "previousStatus": previous.as_str() });
        self.enqueue(
            &issuer.tenant(),
            EventType::IssuerProductionStatusChanged,
            None,
            order.operation_id.as_deref(),
            data,
        )
        .await
    }

    /// Builds, freezes and queues one event of `tenant` for its endpoints subscribed to
    /// `event_type`; `None` when there are none.
    async fn enqueue(
        &self,
        tenant: &MerchantId,
        event_type: EventType,
        token_id: Option<TokenId>,
        operation_id: Option<&str>,
        data: serde_json::Value,
    ) -> Result<Option<EventId>, DomainError> {
        let endpoints: Vec<EndpointId> = self
            .outbox
            .list_endpoints(tenant)
            .await?
            .into_iter()
            .filter(|e| e.events.contains(&event_type))
            .map(|e| e.id)
            .collect();
        if endpoints.is_empty() {
            return Ok(None);
        }
        let append =
            self.build_append(tenant, event_type, token_id, operation_id, data, endpoints)?;
        self.outbox
            .enqueue_event(&append.event, &append.endpoints, append.retention)
            .await?;
        let (id, endpoints) = (append.event.id, append.endpoints);
        tracing::debug!(event_id = %id, event_type = event_type.as_str(), endpoints = endpoints.len(), "webhook event queued");
        self.wake.notify_one();
        Ok(Some(id))
    }

    /// The hook for every code path that changes a token: derives the event from the change
    /// and, when an endpoint of the token's merchant subscribes to it, builds it (its body
    /// frozen now) with its deliveries. `None` when the change is no event or nobody listens.
    ///
    /// Stores nothing: the caller hands the result to the token write itself
    /// (`TokenStore::update_token_with`, `LifecycleStore::apply_event_with`), which stores the
    /// event in the same atomic step as the change, then calls [`Self::event_stored`]. A change
    /// that is retried after a version conflict builds its event again from the record it then
    /// writes, so the event always describes the write that won.
    pub async fn event_for(
        &self,
        before: &TokenRecord,
        after: &TokenRecord,
    ) -> Result<Option<EventAppend>, DomainError> {
        let Some(event_type) = EventType::of_change(before, after) else {
            return Ok(None);
        };
        let all = self.outbox.list_endpoints(&after.merchant_id).await?;
        self.note_endpoints(&after.merchant_id, !all.is_empty());
        let endpoints: Vec<EndpointId> = all
            .into_iter()
            .filter(|e| e.events.contains(&event_type))
            .map(|e| e.id)
            .collect();
        if endpoints.is_empty() {
            return Ok(None);
        }
        let created_at = now();
        let id = EventId::generate(created_at);
        let payload = serde_json::json!({
            "id": id.as_str(),
            "type": event_type.as_str(),
            "createdAt": created_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            "data": { "token": (self.render)(after) },
        });
        let payload = serde_json::to_string(&payload)
            .map_err(|_| DomainError::Internal("webhook payload does not serialize".into()))?;
        Ok(Some(EventAppend {
            event: WebhookEvent {
                id,
                merchant_id: after.merchant_id.clone(),
                event_type,
                token_id: Some(after.id.clone()),
                operation_id: None,
                created_at,
                payload,
            },
            endpoints,
            retention: self.settings.retention,
        }))
    }

    /// Whether the write of the change from `before` to `after` should first be tried as
    /// `TokenStore::update_token_if_no_endpoints`, skipping the endpoint read of
    /// [`Self::event_for`]: the change is an event, and the last read of this merchant's
    /// endpoints here found none (or there was none yet). The store's answer decides; this
    /// only avoids a failed attempt for merchants known to have endpoints.
    pub fn try_without_endpoint_read(&self, before: &TokenRecord, after: &TokenRecord) -> bool {
        EventType::of_change(before, after).is_some()
            && !self.with_endpoints.contains(&after.merchant_id)
    }

    /// Records what an endpoint read (or a store's refusal to write without one) said about
    /// the merchant: the hint of [`Self::try_without_endpoint_read`].
    pub fn note_endpoints(&self, merchant: &MerchantId, any: bool) {
        if any {
            if self.with_endpoints.len() >= ENDPOINT_HINTS_MAX {
                self.with_endpoints.clear();
            }
            self.with_endpoints.insert(merchant.clone());
        } else {
            self.with_endpoints.remove(merchant);
        }
    }

    /// Tells the service that a token write stored `append` (built by [`Self::event_for`]):
    /// wakes this instance's worker so delivery does not wait for a poll.
    pub fn event_stored(&self, append: &EventAppend) {
        let event = &append.event;
        tracing::debug!(event_id = %event.id, event_type = event.event_type.as_str(), token_id = ?event.token_id, endpoints = append.endpoints.len(), "webhook event queued");
        self.wake.notify_one();
    }

    /// Builds and stores the event of a change on its own, after the change was stored: for
    /// callers that have no token write to attach it to (tests, tools). Token changes use
    /// [`Self::event_for`] with the write instead, so a crash cannot separate the two.
    pub async fn token_changed(
        &self,
        before: &TokenRecord,
        after: &TokenRecord,
    ) -> Result<Option<EventId>, DomainError> {
        let Some(append) = self.event_for(before, after).await? else {
            return Ok(None);
        };
        self.outbox
            .enqueue_event(&append.event, &append.endpoints, append.retention)
            .await?;
        self.event_stored(&append);
        Ok(Some(append.event.id))
    }

    /// A page of the merchant's events, newest first, strictly older than `cursor` (the last
    /// id of the previous page). The second value is the cursor of the next page, if any.
    pub async fn list_events(
        &self,
        merchant: &MerchantId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<EventRecord>, Option<EventId>), WebhookError> {
        let cursor = match cursor {
            Some(c) => Some(
                EventId::parse(c)
                    .ok_or_else(|| invalid("invalid_cursor", "cursor is not a valid event id"))?,
            ),
            None => None,
        };
        let limit = limit.clamp(1, 100);
        // One more than asked tells whether another page exists.
        let mut page = self
            .outbox
            .list_events(merchant, cursor.as_ref(), limit + 1)
            .await?;
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|r| r.event.id.clone())
        } else {
            None
        };
        Ok((page, next))
    }

    pub async fn get_event(
        &self,
        merchant: &MerchantId,
        id: &str,
    ) -> Result<EventRecord, WebhookError> {
        let id = EventId::parse(id).ok_or(WebhookError::EventNotFound)?;
        self.outbox
            .get_event(merchant, &id)
            .await?
            .ok_or(WebhookError::EventNotFound)
    }

    /// Queues the event again for each endpoint whose delivery is finished (delivered or dead)
    /// and which still exists: a new round of up to `max_attempts` attempts. Deliveries still
    /// queued or retrying are left alone, so a redelivery never races its own retries.
    pub async fn redeliver(
        &self,
        merchant: &MerchantId,
        id: &str,
    ) -> Result<EventRecord, WebhookError> {
        let rec = self.get_event(merchant, id).await?;
        let existing: Vec<EndpointId> = self
            .outbox
            .list_endpoints(merchant)
            .await?
            .into_iter()
            .map(|e| e.id)
            .collect();
        let targets: Vec<EndpointId> = rec
            .deliveries
            .iter()
            .filter(|d| matches!(d.status, DeliveryStatus::Delivered | DeliveryStatus::Dead))
            .filter(|d| existing.contains(&d.endpoint_id))
            .map(|d| d.endpoint_id.clone())
            .collect();
        if targets.is_empty() {
            return Err(WebhookError::NotRedeliverable);
        }
        self.outbox
            .redeliver(merchant, &rec.event.id, &targets)
            .await?;
        self.wake.notify_one();
        self.get_event(merchant, rec.event.id.as_str()).await
    }

    // --- delivery worker ---------------------------------------------------------------------

    /// Delivers queued events until `shutdown` resolves. Stopping abandons attempts in flight:
    /// their jobs stay claimed and are claimed again after `claim_idle`, by this or another
    /// instance (at-least-once).
    pub async fn run<F>(self: Arc<Self>, sender: Arc<dyn WebhookSender>, shutdown: F)
    where
        F: Future<Output = ()> + Send,
    {
        tracing::info!(consumer = %self.consumer, "webhook delivery worker started");
        let work = async {
            loop {
                self.drain(sender.as_ref()).await;
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                }
            }
        };
        tokio::select! {
            _ = shutdown => {}
            _ = work => {}
        }
        tracing::info!(consumer = %self.consumer, "webhook delivery worker stopped");
    }

    /// Claims and delivers jobs until none is due.
    async fn drain(&self, sender: &dyn WebhookSender) {
        loop {
            let jobs = match self
                .outbox
                .claim_jobs(&self.consumer, BATCH, self.settings.claim_idle)
                .await
            {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook outbox: could not claim jobs");
                    return;
                }
            };
            let n = jobs.len();
            futures::stream::iter(jobs)
                .for_each_concurrent(BATCH, |job| self.process(sender, job))
                .await;
            if n < BATCH {
                return;
            }
        }
    }

    /// Delay before the next attempt after `failed_attempts` failed ones (see [`backoff`]).
    pub fn backoff(&self, failed_attempts: u32) -> Duration {
        backoff(
            self.settings.backoff_base,
            self.settings.backoff_max,
            failed_attempts,
        )
    }

    async fn process(&self, sender: &dyn WebhookSender, job: OutboxJob) {
        let (state, next) = match self.attempt(sender, &job).await {
            Ok(Some(step)) => step,
            Ok(None) => {
                // The event expired (retention): nothing left to deliver.
                self.finish(&job, JobNext::Done).await;
                return;
            }
            Err(e) => {
                // Leave the job claimed: it is retried after `claim_idle`.
                tracing::warn!(event_id = %job.event, error = %e, "webhook delivery: store unavailable");
                return;
            }
        };
        if let Err(e) = self
            .outbox
            .put_delivery(&job.merchant, &job.event, &state)
            .await
        {
            tracing::warn!(event_id = %job.event, error = %e, "webhook delivery: could not record the outcome");
            return;
        }
        self.finish(&job, next).await;
    }

    async fn finish(&self, job: &OutboxJob, next: JobNext) {
        // A finished head releases the next event of its subject (the store queues it): drain
        // again at once rather than a poll later, so a token's backlog moves at delivery speed.
        let releases =
            job.subject.is_some() && matches!(next, JobNext::Done | JobNext::Dead { .. });
        let finished = self.outbox.finish_job(job, next).await;
        if releases {
            self.wake.notify_one();
        }
        match finished {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(event_id = %job.event, "webhook job was claimed by another worker meanwhile")
            }
            Err(e) => {
                tracing::warn!(event_id = %job.event, error = %e, "webhook outbox: could not finish a job")
            }
        }
    }

    /// One attempt: the new delivery state and what happens to the job next; `None` when the
    /// event no longer exists.
    async fn attempt(
        &self,
        sender: &dyn WebhookSender,
        job: &OutboxJob,
    ) -> Result<Option<(DeliveryState, JobNext)>, StoreError> {
        let Some(rec) = self.outbox.get_event(&job.merchant, &job.event).await? else {
            return Ok(None);
        };
        let mut state = rec
            .deliveries
            .iter()
            .find(|d| d.endpoint_id == job.endpoint)
            .cloned()
            .unwrap_or_else(|| DeliveryState::pending(job.endpoint.clone()));
        // A finished delivery (a redelivery resets it to pending with its job, atomically)
        // means this job is a stale copy: queued twice by a mover that died between its two
        // steps (Redis Cluster), or claimed again after its outcome was recorded. Not sent.
        if matches!(
            state.status,
            DeliveryStatus::Delivered | DeliveryStatus::Dead
        ) {
            tracing::debug!(event_id = %job.event, endpoint_id = %job.endpoint, "webhook job for a finished delivery; dropped");
            return Ok(None);
        }
        let attempt_no = job.attempts.saturating_add(1);
        let started = now();
        let dead = |mut state: DeliveryState, code: &str| {
            state.status = DeliveryStatus::Dead;
            state.last_error = Some(code.to_owned());
            state.next_attempt_at = None;
            (
                state,
                JobNext::Dead {
                    reason: code.to_owned(),
                },
            )
        };
        let Some(ep) = self
            .outbox
            .get_endpoint(&job.merchant, &job.endpoint)
            .await?
        else {
            return Ok(Some(dead(state, "endpoint_deleted")));
        };
        let secret = match self.endpoint_secret(&ep) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(endpoint_id = %ep.id, error = %e, "webhook delivery impossible");
                return Ok(Some(dead(state, "secret_unavailable")));
            }
        };
        // During a rotation's overlap the previous secret signs too. One that does not open
        // only costs the receivers still on it this attempt's match; the new one still signs.
        let previous = match ep.live_previous_secret(started) {
            Some(p) => match self.open_secret(&ep, &p.secret) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(endpoint_id = %ep.id, error = %e, "webhook previous secret unavailable; signing with the current one only");
                    None
                }
            },
            None => None,
        };
        let mut secrets: Vec<&[u8]> = vec![secret.as_bytes()];
        secrets.extend(previous.as_ref().map(|s| s.as_bytes()));
        let body = rec.event.payload.as_str();
        let req = OutboundRequest {
            url: &ep.url,
            headers: vec![
                (
                    SIGNATURE_HEADER,
                    signature_header_multi(&secrets, started.unix_timestamp(), body.as_bytes()),
                ),
                (EVENT_ID_HEADER, rec.event.id.as_str().to_owned()),
                (EVENT_TYPE_HEADER, rec.event.event_type.as_str().to_owned()),
            ],
            body,
        };
        let outcome = match tokio::time::timeout(self.settings.timeout, sender.send(req)).await {
            Err(_) => Err(("timeout".to_owned(), None)),
            Ok(Err(e @ SendError::Forbidden(_))) => {
                // Registered fine, refused now: the name changed its answer (or the policy
                // did). Worth an operator's look; the merchant sees the code on the event.
                tracing::warn!(event_id = %rec.event.id, endpoint_id = %ep.id, error = e.code(), "webhook delivery refused by the SSRF guard");
                Err((e.code().to_owned(), None))
            }
            Ok(Err(e)) => Err((e.code().to_owned(), None)),
            Ok(Ok(status)) if (200..300).contains(&status) => Ok(status),
            Ok(Ok(status)) => Err((format!("http_{status}"), Some(status))),
        };
        state.attempts = attempt_no;
        state.last_attempt_at = Some(started);
        let next = match outcome {
            Ok(status) => {
                state.status = DeliveryStatus::Delivered;
                state.delivered_at = Some(now());
                state.next_attempt_at = None;
                state.last_error = None;
                state.last_status = Some(status);
                tracing::debug!(event_id = %rec.event.id, endpoint_id = %ep.id, consumer = %self.consumer, attempt = attempt_no, status, "webhook delivered");
                JobNext::Done
            }
            Err((code, status)) => {
                state.last_status = status;
                tracing::info!(event_id = %rec.event.id, endpoint_id = %ep.id, consumer = %self.consumer, attempt = attempt_no, error = %code, "webhook attempt failed");
                if attempt_no >= self.settings.max_attempts {
                    let (s, next) = dead(state, &code);
                    state = s;
                    next
                } else {
                    let at = now() + self.backoff(attempt_no);
                    state.status = DeliveryStatus::Failed;
                    state.last_error = Some(code);
                    state.next_attempt_at = Some(at);
                    JobNext::Retry { at_ms: unix_ms(at) }
                }
            }
        };
        Ok(Some((state, next)))
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use super::*;
    use crate::domain::token::{CardMeta, Fingerprints, NetworkTokenMeta, SealedPan, Usage};
    use tokengate_cards::{Brand, Expiry};

    fn token(status: TokenStatus) -> TokenRecord {
        let t = now();
        TokenRecord {
            id: TokenId::generate(),
            merchant_id: MerchantId::generate(),
            usage: Usage::CardOnFile,
            status,
            card: CardMeta {
                brand: Brand::Visa,
                bin: "411111".into(),
                last4: "1111".into(),
                expiry: Expiry::trusted(12, 2030).unwrap(),
            },
            network_token: Some(NetworkTokenMeta {
                d1_token_id: "d1-1".into(),
                last4: Some("9999".into()),
                expiry: None,
                par: None,
            }),
            customer_reference: None,
            sealed_pan: SealedPan {
                key_id: "k".into(),
                blob: vec![0; 44],
            },
            fingerprints: Fingerprints {
                pan: "fp".into(),
                pan_expiry: "fpe".into(),
                previous: Vec::new(),
            },
            created_at: t,
            updated_at: t,
            last_event_at: None,
            recurring_agreement: None,
            version: 1,
        }
    }

    fn with(rec: &TokenRecord, f: impl FnOnce(&mut TokenRecord)) -> TokenRecord {
        let mut r = rec.clone();
        f(&mut r);
        r
    }

    #[test]
    fn event_type_follows_the_transition() {
        use TokenStatus::*;
        let cases = [
            (Pending, Active, Some(EventType::Activated)),
            (Active, Suspended, Some(EventType::Suspended)),
            (Suspended, Active, Some(EventType::Resumed)),
            (Active, Deleted, Some(EventType::Deleted)),
            (Suspended, Deleted, Some(EventType::Deleted)),
            (Pending, Deleted, Some(EventType::Deleted)),
            (Active, Expired, Some(EventType::Updated)),
            (Active, Unknown("FROZEN".into()), Some(EventType::Updated)),
            (Active, Active, None),
        ];
        for (from, to, want) in cases {
            let before = token(from.clone());
            let after = with(&before, |r| r.status = to.clone());
            assert_eq!(
                EventType::of_change(&before, &after),
                want,
                "{from:?} -> {to:?}"
            );
        }
    }

    #[test]
    fn metadata_changes_are_updates_and_bookkeeping_is_not() {
        let before = token(TokenStatus::Active);
        let after = with(&before, |r| {
            r.card.expiry = Expiry::trusted(1, 2033).unwrap()
        });
        assert_eq!(
            EventType::of_change(&before, &after),
            Some(EventType::Updated)
        );
        let after = with(&before, |r| {
            if let Some(nt) = r.network_token.as_mut() {
                nt.last4 = Some("0000".into());
            }
        });
        assert_eq!(
            EventType::of_change(&before, &after),
            Some(EventType::Updated)
        );
        let after = with(&before, |r| {
            r.version += 1;
            r.updated_at = now() + Duration::from_secs(5);
            r.last_event_at = Some(now());
        });
        assert_eq!(EventType::of_change(&before, &after), None);
    }

    #[test]
    fn event_types_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
            let j = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<EventType>(&j).unwrap(), t);
        }
        assert_eq!(EventType::parse("token.frozen"), None);
    }

    #[test]
    fn ids_parse_and_event_ids_sort_by_time() {
        let e = EndpointId::generate();
        assert!(e.as_str().starts_with("whe_") && e.as_str().len() == 26);
        assert_eq!(EndpointId::parse(e.as_str()), Some(e));
        assert_eq!(EndpointId::parse("whe_x"), None);
        assert_eq!(EndpointId::parse("whe_aaaaaaaaaaaaaaaaaaaa:}"), None);

        let t0 = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let a = EventId::generate(t0);
        let b = EventId::generate(t0 + Duration::from_millis(1));
        assert!(a < b, "{a} < {b}");
        assert_eq!(EventId::parse(a.as_str()), Some(a.clone()));
        assert_eq!(EventId::parse("evt_zz"), None);
        assert_eq!(EventId::parse(&a.as_str().replace('0', "g")), None);
        // Everything created before t1 sorts below the bound, everything at or after above.
        let bound = EventId::lower_bound(t0 + Duration::from_millis(1));
        assert!(a.as_str() < bound.as_str());
        assert!(b.as_str() > bound.as_str());
    }

    #[test]
    fn signatures_verify_and_reject_tampering_and_replays() {
        let secret = b"whsec_test";
        let body = br#"{"id":"evt_1"}"#;
        let h = signature_header(secret, 1_700_000_000, body);
        assert!(h.starts_with("t=1700000000,v1="), "{h}");
        assert_eq!(h.len(), "t=1700000000,v1=".len() + 64);
        let w = REPLAY_WINDOW;
        assert!(verify_signature(secret, &h, body, 1_700_000_100, w));
        assert!(!verify_signature(
            secret,
            &h,
            b"{\"id\":\"evt_2\"}",
            1_700_000_100,
            w
        ));
        assert!(!verify_signature(b"other", &h, body, 1_700_000_100, w));
        assert!(
            !verify_signature(secret, &h, body, 1_700_000_301, w),
            "replay"
        );
        assert!(!verify_signature(secret, "v1=00", body, 1_700_000_000, w));
        // Several v1 values (secret rotation on the receiver side): one match is enough.
        let both = format!("{h},v1={}", "00".repeat(32));
        assert!(verify_signature(secret, &both, body, 1_700_000_000, w));
        // A known vector, so the docs' snippets can be checked against it.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).unwrap();
        mac.update(b"1700000000.");
        mac.update(body);
        assert!(h.ends_with(&hex::encode(mac.finalize().into_bytes())));
    }

    #[test]
    fn during_an_overlap_both_secrets_sign_and_either_verifies() {
        let (new, old) = (b"whsec_new".as_slice(), b"whsec_old".as_slice());
        let body = br#"{"id":"evt_1"}"#;
        let h = signature_header_multi(&[new, old], 1_700_000_000, body);
        // New first, then old, each the single-secret signature.
        let single_new = signature_header(new, 1_700_000_000, body);
        let single_old = signature_header(old, 1_700_000_000, body);
        assert_eq!(
            h,
            format!(
                "{single_new},v1={}",
                &single_old["t=1700000000,v1=".len()..]
            )
        );
        assert_eq!(h.matches("v1=").count(), 2, "{h}");
        let w = REPLAY_WINDOW;
        assert!(verify_signature(new, &h, body, 1_700_000_000, w));
        assert!(verify_signature(old, &h, body, 1_700_000_000, w));
        assert!(!verify_signature(
            b"whsec_other",
            &h,
            body,
            1_700_000_000,
            w
        ));
        assert!(!verify_signature(old, &single_new, body, 1_700_000_000, w));
    }

    /// The vector in docs/webhooks.md (also checked there with openssl, Python and Node), and the
    /// Rust receiver snippet from that page, verbatim.
    #[test]
    fn documented_vector_and_rust_snippet() {
        const VECTOR: &str =
            "t=1700000000,v1=c89214b5b5da833daed6f0b8c5bb6bd58cea9022bd80ccc78230f3942d632925";
        let body = br#"{"id":"evt_1"}"#;
        assert_eq!(signature_header(b"whsec_test", 1_700_000_000, body), VECTOR);

        pub fn verify(secret: &str, header: &str, body: &[u8], now_unix: i64) -> bool {
            let (mut t, mut sigs) = (None, Vec::new());
            for part in header.split(',') {
                match part.trim().split_once('=') {
                    Some(("t", v)) => t = v.parse::<i64>().ok(),
                    Some(("v1", v)) => sigs.extend(hex::decode(v).ok()),
                    _ => {}
                }
            }
            let Some(t) = t else { return false };
            if (now_unix - t).abs() > 300 {
                return false;
            }
            sigs.iter().any(|sig| {
                let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
                else {
                    return false;
                };
                mac.update(format!("{t}.").as_bytes());
                mac.update(body);
                mac.verify_slice(sig).is_ok()
            })
        }
        assert!(verify("whsec_test", VECTOR, body, 1_700_000_100));
        assert!(!verify("whsec_test", VECTOR, b"{}", 1_700_000_100));
        assert!(!verify("whsec_test", VECTOR, body, 1_700_000_301));
    }

    #[test]
    fn backoff_doubles_jitters_and_caps() {
        let (base, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        for _ in 0..50 {
            let d1 = backoff(base, max, 1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= base, "{d1:?}");
            let d3 = backoff(base, max, 3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d9 = backoff(base, max, 9);
            assert!(d9 >= max / 2 && d9 <= max, "{d9:?}");
            assert!(backoff(base, max, u32::MAX) <= max);
        }
    }

    #[test]
    fn sealed_secrets_open_only_for_their_endpoint() {
        let ring = Keyring::new(&crate::crypto::dev::material()).unwrap();
        let (m, e) = (MerchantId::generate(), EndpointId::generate());
        let binding = [m.as_str(), e.as_str()];
        let (key_id, blob) = ring.seal_secret(SECRET_PURPOSE, &binding, b"whsec_abc");
        let (_, again) = ring.seal_secret(SECRET_PURPOSE, &binding, b"whsec_abc");
        assert_ne!(blob, again, "equal secrets encrypt differently");
        assert!(!blob.windows(9).any(|w| w == b"whsec_abc"));
        let opened = ring
            .open_secret(SECRET_PURPOSE, &binding, &key_id, &blob)
            .unwrap();
        assert_eq!(&opened[..], b"whsec_abc");
        let other = EndpointId::generate();
        for (purpose, binding) in [
            (SECRET_PURPOSE, [m.as_str(), other.as_str()]),
            ("pan", [m.as_str(), e.as_str()]),
            (SECRET_PURPOSE, [e.as_str(), m.as_str()]),
        ] {
            assert!(ring.open_secret(purpose, &binding, &key_id, &blob).is_err());
        }
        // Moving a part between purpose and binding does not produce the same AAD either.
        let shifted = ring.open_secret(
            "webhook-secretmer",
            &[&m.as_str()[3..], e.as_str()],
            &key_id,
            &blob,
        );
        assert!(shifted.is_err());
        let mut tampered = blob.clone();
        tampered[13] ^= 1;
        assert!(
            ring.open_secret(SECRET_PURPOSE, &binding, &key_id, &tampered)
                .is_err()
        );
    }

    #[test]
    fn url_rules() {
        for ok in [
            "https://example.com/hook",
            "https://example.com:8443/a/b?x=1",
            "http://127.0.0.1:9000/hook",
            "http://localhost/hook",
            "http://[::1]:8080/",
            "HTTPS://EXAMPLE.COM/",
        ] {
            validate_url(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, code) in [
            ("http://example.com/hook", "insecure_webhook_url"),
            ("http://10.0.0.1/hook", "insecure_webhook_url"),
            ("ftp://example.com/", "invalid_webhook_url"),
            ("example.com/hook", "invalid_webhook_url"),
            ("/relative", "invalid_webhook_url"),
            ("https://user:pw@example.com/", "invalid_webhook_url"),
            ("https://example.com/#frag", "invalid_webhook_url"),
            ("https://exa mple.com/", "invalid_webhook_url"),
            ("", "invalid_webhook_url"),
        ] {
            match validate_url(bad, false) {
                Err(WebhookError::Validation { code: c, .. }) => assert_eq!(c, code, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(validate_url(&long, false).is_err());
        // Sandbox mode: plain http anywhere.
        validate_url("http://example.com/hook", true).unwrap();
        assert!(validate_url("ftp://example.com/", true).is_err());
    }

    #[test]
    fn endpoint_debug_hides_url_and_secret() {
        let ep = WebhookEndpoint {
            id: EndpointId::generate(),
            merchant_id: MerchantId::generate(),
            url: "https://example.com/hook?token=s3cret".into(),
            events: vec![EventType::Suspended],
            secret: SealedSecret {
                key_id: "k1".into(),
                blob: vec![7; 60],
            },
            created_at: now(),
            previous_secret: None,
            secret_rotated_at: None,
        };
        let d = format!("{ep:?}");
        assert!(!d.contains("s3cret") && !d.contains("example.com"), "{d}");
        assert!(d.contains("60 bytes"), "{d}");
    }

    #[test]
    fn aggregate_status() {
        let ev = WebhookEvent {
            id: EventId::generate(now()),
            merchant_id: MerchantId::generate(),
            event_type: EventType::Suspended,
            token_id: Some(TokenId::generate()),
            operation_id: None,
            created_at: now(),
            payload: "{}".into(),
        };
        let d = |s| DeliveryState {
            status: s,
            ..DeliveryState::pending(EndpointId::generate())
        };
        let rec = |ds: Vec<DeliveryState>| EventRecord {
            event: ev.clone(),
            deliveries: ds,
        };
        use DeliveryStatus::*;
        assert_eq!(rec(vec![d(Delivered), d(Delivered)]).status(), Delivered);
        assert_eq!(rec(vec![d(Delivered), d(Pending)]).status(), Pending);
        assert_eq!(rec(vec![d(Failed), d(Pending)]).status(), Failed);
        assert_eq!(rec(vec![d(Failed), d(Dead)]).status(), Dead);
    }
}
