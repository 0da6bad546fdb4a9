//! The audit trail: an append-only record of who did what to which tenant's data, one trail per
//! tenant ([`AuditTenant`]: a merchant or an issuer), kept for `audit.retention_days` (older
//! events are trimmed as new ones are appended).
//!
//! Recorded for merchants: cryptograms, suspend/resume/delete, recurring agreements recorded and
//! ended, card reveals, API key creation and revocation (by the merchant, or by the admin for an
//! existing merchant), merchant creation and client certificates (admin). For issuers: issuer
//! creation, API keys and client certificates (admin), Click to Pay enrolment, update and
//! opt-out, physical card orders (one and batch), webhook endpoint changes, and reads of Click to
//! Pay profiles with personal data (`issuer:click-to-pay:pii`). Each event names the actor (the
//! API key id, or `admin`), what it acted on (a token, an API key, a card, a consumer, an
//! operation, an endpoint: ids only, never card numbers or personal data), the `x-request-id` of
//! the request and its outcome (`success` or the problem code answered), so refusals are on
//! record as well as successes. Storage: [`crate::domain::ports::audit::AuditStore`].

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::DomainError;
use super::issuer::IssuerId;
use super::token::MerchantId;
use crate::domain::ports::audit::AuditStore;

/// The actor of admin actions (merchant creation, a key issued for an existing merchant).
pub const ADMIN_ACTOR: &str = "admin";
/// The outcome of an action that succeeded; failures carry their problem code instead.
pub const SUCCESS: &str = "success";

/// What was done. Stored and served as its dotted name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditAction {
    #[serde(rename = "merchant.create")]
    MerchantCreate,
    #[serde(rename = "cryptogram.create")]
    CryptogramCreate,
    #[serde(rename = "token.suspend")]
    TokenSuspend,
    #[serde(rename = "token.resume")]
    TokenResume,
    #[serde(rename = "token.delete")]
    TokenDelete,
    #[serde(rename = "card.reveal")]
    CardReveal,
    #[serde(rename = "api_key.create")]
    ApiKeyCreate,
    #[serde(rename = "api_key.revoke")]
    ApiKeyRevoke,
    /// The admin set the merchant's client certificates (src/http/auth/client_cert.rs).
    #[serde(rename = "client_certs.update")]
    ClientCertsUpdate,
    /// A recurring agreement recorded (or replaced) on a token (`domain::recurring`).
    #[serde(rename = "recurring_agreement.record")]
    RecurringAgreementRecord,
    /// A token's recurring agreement ended.
    #[serde(rename = "recurring_agreement.end")]
    RecurringAgreementEnd,
    /// An issuer onboarded (admin).
    #[serde(rename = "issuer.create")]
    IssuerCreate,
    /// Click to Pay: a card enrolled (`cardId`, and the `operationId` started).
    #[serde(rename = "click_to_pay.enrol")]
    ClickToPayEnrol,
    /// Click to Pay: a card's or a consumer's data updated.
    #[serde(rename = "click_to_pay.update")]
    ClickToPayUpdate,
    /// Click to Pay: a card or a consumer opted out.
    #[serde(rename = "click_to_pay.opt_out")]
    ClickToPayOptOut,
    /// Click to Pay profiles read **with personal data** (a key holding
    /// `issuer:click-to-pay:pii`); reads without it are not sensitive and not recorded.
    #[serde(rename = "click_to_pay.profiles_read")]
    ClickToPayProfilesRead,
    /// A physical card order (`cardId`, `operationId`).
    #[serde(rename = "production_order.create")]
    ProductionOrderCreate,
    /// A batch of physical card orders (one event for the batch).
    #[serde(rename = "production_order.batch")]
    ProductionOrderBatch,
    /// A webhook endpoint registered (`endpointId`).
    #[serde(rename = "webhook_endpoint.create")]
    WebhookEndpointCreate,
    /// A webhook endpoint removed (`endpointId`).
    #[serde(rename = "webhook_endpoint.delete")]
    WebhookEndpointDelete,
}

/// Whose trail an event is in. Stored as the event's `merchantId` or `issuerId` field, so
/// merchant events keep the exact bytes (and keys) they always had.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuditTenant {
    #[serde(rename = "merchantId")]
    Merchant(MerchantId),
    #[serde(rename = "issuerId")]
    Issuer(IssuerId),
}

impl AuditTenant {
    /// The tenant's id (`mer_...` or `iss_...`: the prefixes keep the two apart in storage).
    pub fn as_str(&self) -> &str {
        match self {
            AuditTenant::Merchant(m) => m.as_str(),
            AuditTenant::Issuer(i) => i.as_str(),
        }
    }

    /// The trail of a tenant id as the key and webhook stores file it (`IssuerId::tenant`).
    pub fn of_tenant_id(t: &MerchantId) -> AuditTenant {
        match IssuerId::from_tenant(t) {
            Some(i) => AuditTenant::Issuer(i),
            None => AuditTenant::Merchant(t.clone()),
        }
    }
}

impl From<&MerchantId> for AuditTenant {
    fn from(m: &MerchantId) -> Self {
        AuditTenant::Merchant(m.clone())
    }
}

impl From<&IssuerId> for AuditTenant {
    fn from(i: &IssuerId) -> Self {
        AuditTenant::Issuer(i.clone())
    }
}

impl std::fmt::Display for AuditTenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event as appended (the store assigns the id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewAuditEvent {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// API key id (`key_...`) or [`ADMIN_ACTOR`].
    pub actor: String,
    /// The trail: `merchantId` or `issuerId` in the stored JSON.
    #[serde(flatten)]
    pub tenant: AuditTenant,
    pub action: AuditAction,
    /// The token the action concerns (token actions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// The API key the action concerns (`api_key.*`): the key created or revoked, which is not
    /// the actor (a key may create or revoke another). Absent from events stored before it
    /// existed, which therefore still decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Issuer actions: D1's card id (an opaque reference, never a card number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_id: Option<String>,
    /// Issuer actions: D1's consumer id (opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_id: Option<String>,
    /// Issuer actions: the operation started (`op_...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    /// Webhook endpoint actions: the endpoint (`we_...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_id: Option<String>,
    /// The request's `x-request-id`; `None` only if the request had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// [`SUCCESS`] or a problem code (`token_suspended`, `insufficient_scope`, ...).
    pub outcome: String,
}

/// A stored event: its id orders events of one tenant (a later event has a greater id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub id: AuditEventId,
    pub event: NewAuditEvent,
}

/// `aud_<unix ms>-<sequence>`: the append time and a counter within that millisecond, so ids
/// sort (numerically per part) in append order and double as pagination cursors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuditEventId {
    pub ms: u64,
    pub seq: u64,
}

impl AuditEventId {
    pub fn parse(s: &str) -> Option<AuditEventId> {
        let (ms, seq) = s.strip_prefix("aud_")?.split_once('-')?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(AuditEventId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for AuditEventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "aud_{}-{}", self.ms, self.seq)
    }
}

/// The audit trail of all tenants: the store and the retention it enforces.
pub struct AuditLog {
    store: Arc<dyn AuditStore>,
    retention: Duration,
}

impl AuditLog {
    pub fn new(store: Arc<dyn AuditStore>, retention_days: u64) -> AuditLog {
        AuditLog {
            store,
            retention: Duration::from_secs(retention_days.saturating_mul(86_400)),
        }
    }

    /// Appends one event (and trims its tenant's events past retention).
    pub async fn record(&self, event: &NewAuditEvent) -> Result<AuditEventId, DomainError> {
        Ok(self.store.append(event, self.retention).await?)
    }

    /// Up to `limit` events of `tenant`, newest first, strictly older than `before`; and the
    /// cursor of the next page when there may be one.
    pub async fn list(
        &self,
        tenant: &AuditTenant,
        before: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<AuditEvent>, Option<AuditEventId>), DomainError> {
        let before = match before {
            Some(c) => Some(
                AuditEventId::parse(c).ok_or_else(|| DomainError::Validation {
                    code: "invalid_cursor",
                    detail: "cursor must be a `nextCursor` value from a previous page".into(),
                })?,
            ),
            None => None,
        };
        let events = self.store.list(tenant, before, limit).await?;
        let next = (events.len() == limit)
            .then(|| events.last().map(|e| e.id))
            .flatten();
        Ok((events, next))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test should stop loudly")]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_order() {
        let a = AuditEventId {
            ms: 1_700_000_000_000,
            seq: 2,
        };
        assert_eq!(AuditEventId::parse(&a.to_string()), Some(a));
        assert!(
            a < AuditEventId {
                ms: 1_700_000_000_000,
                seq: 10
            }
        );
        assert!(
            a < AuditEventId {
                ms: 1_700_000_000_001,
                seq: 0
            }
        );
        for bad in [
            "",
            "aud_",
            "aud_1",
            "aud_1-",
            "aud_-1",
            "aud_x-1",
            "evt_1-2",
            "aud_1-2-3",
        ] {
            assert_eq!(AuditEventId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn events_stored_without_key_id_still_decode_and_absent_fields_are_not_written() {
        // The shape of events stored before `keyId` existed.
        let old = r#"{"at":"2026-01-02T03:04:05Z","actor":"key_0123456789abcdef01234567","merchantId":"mer_x","action":"api_key.revoke","requestId":"rid-1","outcome":"success"}"#;
        let e: NewAuditEvent = serde_json::from_str(old).unwrap();
        assert_eq!((e.token_id.as_deref(), e.key_id.as_deref()), (None, None));
        assert!(matches!(&e.tenant, AuditTenant::Merchant(m) if m.as_str() == "mer_x"));
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            old,
            "no null fields written"
        );
        let with = NewAuditEvent {
            key_id: Some("key_aaaaaaaaaaaaaaaaaaaaaaaa".into()),
            ..e
        };
        let j = serde_json::to_string(&with).unwrap();
        assert!(
            j.contains(r#""keyId":"key_aaaaaaaaaaaaaaaaaaaaaaaa""#),
            "{j}"
        );
        assert_eq!(serde_json::from_str::<NewAuditEvent>(&j).unwrap(), with);
    }

    #[test]
    fn issuer_events_name_the_issuer_and_merchant_events_stay_as_they_were() {
        let issuer = IssuerId::generate();
        let e = NewAuditEvent {
            at: time::macros::datetime!(2026-01-02 03:04:05 UTC),
            actor: "key_0123456789abcdef01234567".into(),
            tenant: AuditTenant::Issuer(issuer.clone()),
            action: AuditAction::ClickToPayEnrol,
            token_id: None,
            key_id: None,
            card_id: Some("card-1".into()),
            consumer_id: None,
            operation_id: Some("op_x".into()),
            endpoint_id: None,
            request_id: None,
            outcome: SUCCESS.into(),
        };
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(
            j,
            format!(
                r#"{{"at":"2026-01-02T03:04:05Z","actor":"key_0123456789abcdef01234567","issuerId":"{issuer}","action":"click_to_pay.enrol","cardId":"card-1","operationId":"op_x","outcome":"success"}}"#
            )
        );
        assert_eq!(serde_json::from_str::<NewAuditEvent>(&j).unwrap(), e);
        let t = issuer.tenant();
        assert_eq!(AuditTenant::of_tenant_id(&t), AuditTenant::Issuer(issuer));
        let m = MerchantId::generate();
        assert_eq!(AuditTenant::of_tenant_id(&m), AuditTenant::Merchant(m));
    }

    #[test]
    fn actions_serialize_as_dotted_names() {
        assert_eq!(
            serde_json::to_string(&AuditAction::CardReveal).unwrap(),
            "\"card.reveal\""
        );
    }
}
