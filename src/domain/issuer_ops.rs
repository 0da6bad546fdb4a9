//! Asynchronous D1 issuer operations as resources: what the gateway asked D1 to do for an
//! issuer (Click to Pay enrolment, update, opt-out, a card production order, ...), kept true by
//! D1's card-operation notifications and, when none comes, by polling D1's get-operation.
//!
//! The rules that keep a stored operation truthful live here, so both stores and every caller
//! apply the same ones:
//! - a final status (`SUCCESSFUL`, `FAILED`) never goes back to `PENDING`, and the first final
//!   status wins ([`IssuerOperation::apply_remote`]);
//! - `issuerRequestId` is unique per issuer: it is the idempotency anchor D1 dedups on, so a
//!   re-drive with it can never create a second D1 operation.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;

use super::issuer::IssuerId;
use super::token::{id_type, random_id, valid_id};

id_type!(
    /// Our id of an issuer operation.
    OperationId, "op_", 16, 22
);

/// What an operation does, as D1 names it in `operation`. D1 may add kinds (its compatibility
/// rules): an unknown one is kept verbatim, never a decoding failure.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OperationKind {
    ClickToPayEnrolment,
    ClickToPayUpdate,
    ClickToPayOptOut,
    Produce,
    StandaloneTracking,
    Create,
    Register,
    Activate,
    Suspend,
    Resume,
    Delete,
    Digitize,
    Renew,
    Replace,
    Unknown(String),
}

impl OperationKind {
    const KNOWN: [OperationKind; 14] = [
        OperationKind::ClickToPayEnrolment,
        OperationKind::ClickToPayUpdate,
        OperationKind::ClickToPayOptOut,
        OperationKind::Produce,
        OperationKind::StandaloneTracking,
        OperationKind::Create,
        OperationKind::Register,
        OperationKind::Activate,
        OperationKind::Suspend,
        OperationKind::Resume,
        OperationKind::Delete,
        OperationKind::Digitize,
        OperationKind::Renew,
        OperationKind::Replace,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            OperationKind::ClickToPayEnrolment => "CLICK_TO_PAY_ENROLMENT",
            OperationKind::ClickToPayUpdate => "CLICK_TO_PAY_UPDATE",
            OperationKind::ClickToPayOptOut => "CLICK_TO_PAY_OPT_OUT",
            OperationKind::Produce => "PRODUCE",
            OperationKind::StandaloneTracking => "STANDALONE_TRACKING",
            OperationKind::Create => "CREATE",
            OperationKind::Register => "REGISTER",
            OperationKind::Activate => "ACTIVATE",
            OperationKind::Suspend => "SUSPEND",
            OperationKind::Resume => "RESUME",
            OperationKind::Delete => "DELETE",
            OperationKind::Digitize => "DIGITIZE",
            OperationKind::Renew => "RENEW",
            OperationKind::Replace => "REPLACE",
            OperationKind::Unknown(s) => s,
        }
    }

    pub fn parse(s: &str) -> OperationKind {
        Self::KNOWN
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or_else(|| OperationKind::Unknown(s.to_owned()))
    }
}

impl Serialize for OperationKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for OperationKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(OperationKind::parse(&String::deserialize(d)?))
    }
}

/// Where an operation stands. D1 documents these three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OperationStatus {
    Pending,
    Successful,
    Failed,
}

impl OperationStatus {
    pub const ALL: [OperationStatus; 3] = [
        OperationStatus::Pending,
        OperationStatus::Successful,
        OperationStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OperationStatus::Pending => "PENDING",
            OperationStatus::Successful => "SUCCESSFUL",
            OperationStatus::Failed => "FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<OperationStatus> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        self != OperationStatus::Pending
    }
}

/// Who told us about a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ChangeSource {
    /// The gateway itself (creation, D1's synchronous answer or refusal).
    Gateway,
    /// A D1 card/consumer-operation notification.
    Notification,
    /// D1's get-operation, asked by the polling fallback.
    Poll,
}

/// One entry of an operation's history: every status change, and every change of
/// `details.status` (production tracking moves there while the operation stays `PENDING`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusChange {
    pub status: OperationStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details_status: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub source: ChangeSource,
}

/// The card or consumer an operation is about (exactly one of them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OperationTarget {
    Card(String),
    Consumer(String),
}

/// The parameters of the D1 call an operation stands for, kept so a call whose outcome is
/// unknown (5xx, timeout) can be re-driven with the same `issuerRequestId`. Never card data:
/// operations that carry card data (production orders) are re-driven by their caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "camelCase")]
pub enum OperationCall {
    #[serde(rename_all = "camelCase")]
    ClickToPayEnrolment {
        cardholder_name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason_code: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    ClickToPayUpdate {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cardholder_name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason_code: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    ClickToPayOptOut {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason_code: Option<String>,
    },
    /// Deletes the card at D1 (which also opts it out of Click to Pay).
    #[serde(rename_all = "camelCase")]
    CardDelete {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason_code: Option<String>,
    },
    /// Submitted by its caller (part 2: production orders); the worker only polls it.
    External,
}

/// An asynchronous D1 operation of one issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuerOperation {
    pub id: OperationId,
    pub issuer_id: IssuerId,
    pub kind: OperationKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_id: Option<String>,
    /// Unique per issuer; sent to D1 with the call and with every re-drive of it.
    pub issuer_request_id: String,
    /// D1's `operationId`, once D1 answered (or a notification named it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d1_operation_id: Option<String>,
    pub status: OperationStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub start_time: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub end_time: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// D1's `details` (e.g. production tracking `{status, shipment}`), as D1 sent it last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    pub history: Vec<StatusChange>,
    pub call: OperationCall,
    /// Whether D1 acknowledged the call (it has the operation). `false`: the call's outcome is
    /// unknown and the worker re-drives it.
    pub submitted: bool,
    /// Re-drives and polls made so far.
    pub attempts: u32,
    /// When the worker should next look at this operation (re-drive or poll) while `PENDING`.
    #[serde(with = "time::serde::rfc3339")]
    pub next_check_at: OffsetDateTime,
    /// Compare-and-set version, 1 for a new record.
    pub version: u64,
}

/// The longest `issuerRequestId` accepted (D1's id pattern `^[A-Za-z0-9_-]{1,64}$`).
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// Whether `s` has D1's id shape (`^[A-Za-z0-9_-]{1,64}$`): issuer request ids and D1 operation
/// ids become parts of storage keys, so anything else is refused before it reaches a store.
pub fn valid_d1_id(s: &str) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh `issuerRequestId`: 128 random bits, D1's id alphabet.
pub fn new_request_id() -> String {
    random_id("req_", 16)
}

/// What D1 says an operation is at (a notification item or a get-operation answer).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteOperation {
    pub d1_operation_id: String,
    pub kind: OperationKind,
    /// `None`: a status this version does not know (kept out of the record, never guessed).
    pub status: Option<OperationStatus>,
    pub start_time: Option<OffsetDateTime>,
    pub end_time: Option<OffsetDateTime>,
    pub card_id: Option<String>,
    pub consumer_id: Option<String>,
    pub issuer_request_id: Option<String>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub details: Option<serde_json::Value>,
}

impl RemoteOperation {
    /// `details.status` (production tracking), when it is a string.
    pub fn details_status(&self) -> Option<&str> {
        self.details.as_ref()?.get("status")?.as_str()
    }
}

impl IssuerOperation {
    /// A new `PENDING` operation, to be stored before D1 is called.
    pub fn new(
        issuer_id: IssuerId,
        kind: OperationKind,
        target: OperationTarget,
        issuer_request_id: String,
        call: OperationCall,
        now: OffsetDateTime,
    ) -> IssuerOperation {
        let (card_id, consumer_id) = match target {
            OperationTarget::Card(c) => (Some(c), None),
            OperationTarget::Consumer(c) => (None, Some(c)),
        };
        IssuerOperation {
            id: OperationId::generate(),
            issuer_id,
            kind,
            card_id,
            consumer_id,
            issuer_request_id,
            d1_operation_id: None,
            status: OperationStatus::Pending,
            start_time: now,
            end_time: None,
            error_code: None,
            error: None,
            details: None,
            history: vec![StatusChange {
                status: OperationStatus::Pending,
                details_status: None,
                at: now,
                source: ChangeSource::Gateway,
            }],
            call,
            submitted: false,
            attempts: 0,
            next_check_at: now,
            version: 1,
        }
    }

    /// The sort key of the operation in its list indexes: creation time (ms, fixed width) then
    /// id, so lists are newest first and stable, and a cursor is the last key of a page.
    pub fn sort_key(&self) -> String {
        let ms = self.start_time.unix_timestamp_nanos() / 1_000_000;
        format!("{ms:013}:{}", self.id)
    }

    /// Folds what D1 says into the record. Returns the changed record (version + 1) or `None`
    /// when it changes nothing we keep: a `PENDING` after a final status, a second final status,
    /// an unknown status, or a repetition of what is stored.
    pub fn apply_remote(
        &self,
        r: &RemoteOperation,
        source: ChangeSource,
        now: OffsetDateTime,
    ) -> Option<IssuerOperation> {
        let mut next = self.clone();
        let mut changed = false;
        if next.d1_operation_id.is_none() {
            next.d1_operation_id = Some(r.d1_operation_id.clone());
            next.submitted = true;
            changed = true;
        }
        let Some(status) = r.status else {
            return changed.then(|| next.bumped());
        };
        if self.status.is_final() {
            // Final is final: neither a late PENDING nor a different final status changes it.
            return changed.then(|| next.bumped());
        }
        let old_details_status = self
            .details
            .as_ref()
            .and_then(|d| d.get("status"))
            .and_then(|s| s.as_str());
        let details_moved = r.details.is_some() && r.details != self.details;
        if status == self.status && !details_moved {
            return changed.then(|| next.bumped());
        }
        if details_moved {
            next.details = r.details.clone();
        }
        if status != self.status || r.details_status() != old_details_status {
            next.history.push(StatusChange {
                status,
                details_status: r.details_status().map(str::to_owned),
                at: now,
                source,
            });
        }
        next.status = status;
        next.submitted = true;
        if status.is_final() {
            next.end_time = Some(r.end_time.unwrap_or(now));
            next.error_code = r.error_code.clone();
            next.error = r.error.clone();
        }
        Some(next.bumped())
    }

    fn bumped(mut self) -> IssuerOperation {
        self.version += 1;
        self
    }

    /// Records D1's refusal (a 4xx): the operation failed at the gateway, D1's code kept.
    pub fn rejected(&self, code: &str, now: OffsetDateTime) -> IssuerOperation {
        let mut next = self.clone();
        next.status = OperationStatus::Failed;
        next.end_time = Some(now);
        next.error_code = Some(code.to_owned());
        next.error = Some("D1 refused the request".to_owned());
        next.history.push(StatusChange {
            status: OperationStatus::Failed,
            details_status: None,
            at: now,
            source: ChangeSource::Gateway,
        });
        next.bumped()
    }

    /// Notes another re-drive or poll attempt and when to look again.
    pub fn rescheduled(&self, next_check_at: OffsetDateTime) -> IssuerOperation {
        let mut next = self.clone();
        next.attempts = next.attempts.saturating_add(1);
        next.next_check_at = next_check_at;
        next.bumped()
    }

    /// D1 acknowledged the call with its operation id.
    pub fn acknowledged(
        &self,
        d1_operation_id: &str,
        next_check_at: OffsetDateTime,
    ) -> IssuerOperation {
        let mut next = self.clone();
        next.submitted = true;
        if next.d1_operation_id.is_none() {
            next.d1_operation_id = Some(d1_operation_id.to_owned());
        }
        next.next_check_at = next_check_at;
        next.bumped()
    }
}

/// Filters of the operation list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperationFilter {
    pub card_id: Option<String>,
    pub status: Option<OperationStatus>,
}

/// A cursor of the operation list: a sort key ([`IssuerOperation::sort_key`]).
pub fn valid_cursor(c: &str) -> bool {
    c.len() == 14 + OperationId::PREFIX.len() + 22
        && c.as_bytes().get(13) == Some(&b':')
        && c[..13].bytes().all(|b| b.is_ascii_digit())
        && OperationId::parse(&c[14..]).is_some()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test should stop loudly")]
mod tests {
    use super::*;

    fn op() -> IssuerOperation {
        IssuerOperation::new(
            IssuerId::generate(),
            OperationKind::Produce,
            OperationTarget::Card("card-1".into()),
            new_request_id(),
            OperationCall::External,
            OffsetDateTime::now_utc(),
        )
    }

    fn remote(status: Option<OperationStatus>, details: Option<&str>) -> RemoteOperation {
        RemoteOperation {
            d1_operation_id: "d1op".into(),
            kind: OperationKind::Produce,
            status,
            start_time: None,
            end_time: None,
            card_id: Some("card-1".into()),
            consumer_id: None,
            issuer_request_id: None,
            error_code: None,
            error: None,
            details: details.map(|s| serde_json::json!({ "status": s })),
        }
    }

    #[test]
    fn unknown_kinds_are_kept_verbatim() {
        assert_eq!(OperationKind::parse("PRODUCE"), OperationKind::Produce);
        let k = OperationKind::parse("TELEPORT");
        assert_eq!(k.as_str(), "TELEPORT");
        let j = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<OperationKind>(&j).unwrap(), k);
    }

    #[test]
    fn a_final_status_never_regresses() {
        let now = OffsetDateTime::now_utc();
        let o = op();
        let done = o
            .apply_remote(
                &remote(Some(OperationStatus::Successful), None),
                ChangeSource::Notification,
                now,
            )
            .unwrap();
        assert_eq!(done.status, OperationStatus::Successful);
        assert_eq!(done.history.len(), 2);
        assert!(
            done.apply_remote(
                &remote(Some(OperationStatus::Pending), None),
                ChangeSource::Notification,
                now
            )
            .is_none()
        );
        assert!(
            done.apply_remote(
                &remote(Some(OperationStatus::Failed), None),
                ChangeSource::Notification,
                now
            )
            .is_none()
        );
        assert!(
            done.apply_remote(&remote(None, None), ChangeSource::Notification, now)
                .is_none()
        );
    }

    #[test]
    fn details_moves_are_history_while_pending() {
        let now = OffsetDateTime::now_utc();
        let a = op()
            .apply_remote(
                &remote(Some(OperationStatus::Pending), Some("CARD_PROD_REQUESTED")),
                ChangeSource::Notification,
                now,
            )
            .unwrap();
        let b = a
            .apply_remote(
                &remote(Some(OperationStatus::Pending), Some("CARD_PROD_READY")),
                ChangeSource::Notification,
                now,
            )
            .unwrap();
        assert_eq!(b.history.len(), 3);
        assert_eq!(
            b.history[2].details_status.as_deref(),
            Some("CARD_PROD_READY")
        );
        assert!(
            b.apply_remote(
                &remote(Some(OperationStatus::Pending), Some("CARD_PROD_READY")),
                ChangeSource::Notification,
                now
            )
            .is_none()
        );
        assert_eq!(b.version, 3);
    }

    #[test]
    fn cursors_are_sort_keys() {
        let o = op();
        assert!(valid_cursor(&o.sort_key()));
        assert!(!valid_cursor("x"));
        assert!(!valid_cursor(&format!("{}x", o.sort_key())));
    }
}
