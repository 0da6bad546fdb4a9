//! D1's issuer-side API ("banking" base URL) as both sides speak it: Click to Pay enrolment,
//! update, opt-out and profiles, get-operation, and the card/consumer-operation notifications
//! D1 sends to the issuer (docs/d1-protocol.md, "Issuer side", says which shapes are from D1's
//! pages and which are our inference).
//!
//! Decoding is forward compatible: unknown fields are ignored, `operation` and `status` are
//! strings (new values are kept, never a decoding failure), optional fields may be absent.
//! Types that may carry a card number have a redacted `Debug` and wipe themselves.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// `reasonCode` when none is given (D1's default).
pub const DEFAULT_REASON_CODE: &str = "ISSUER_DECISION";

/// Body of `operations:clickToPayEnrolment` (on a card).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClickToPayEnrolmentRequest {
    /// At most 26 characters (Visa).
    pub cardholder_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    /// Our idempotency anchor (inferred: D1 documents it for card orders; we send it on every
    /// operation so a re-driven call is recognised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_request_id: Option<String>,
}

/// Body of `operations:clickToPayUpdate` (on a card or a consumer).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClickToPayUpdateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cardholder_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_request_id: Option<String>,
}

/// Body of `operations:clickToPayOptOut` (on a card or a consumer).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClickToPayOptOutRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_request_id: Option<String>,
}

/// Body of `operations:delete` on a card (the path and body are our inference: D1's pages name
/// the `DELETE` card operation and its notification, not the call). D1 deletes the card, which
/// also opts it out of Click to Pay (D1-NOTES A2), and notifies `operation: DELETE`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CardDeleteRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_request_id: Option<String>,
}

/// D1's synchronous answer to a call that starts an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationAccepted {
    pub operation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// One operation as D1 describes it: an item of a notification batch, and the answer of
/// get-operation (`GET /issuers/{issuerId}/operations/{operationId}`, our inference).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationObject {
    pub operation_id: String,
    /// `CLICK_TO_PAY_ENROLMENT`, `PRODUCE`, ...: new values may appear.
    pub operation: String,
    /// `PENDING`, `SUCCESSFUL`, `FAILED`.
    pub status: String,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_id: Option<String>,
    /// Consumer-operation notifications (consumer opt-out, consumer update) name the consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_request_id: Option<String>,
}

/// The body of "notify card operations" / "notify consumer operations".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationsNotification {
    pub operations: Vec<OperationObject>,
}

/// D1's 500 body on the issuer API: `{"error": "..."}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InternalErrorBody {
    #[serde(default)]
    pub error: Option<String>,
}

/// `GET .../clickToPayProfiles`: at most one profile per Click to Pay directory.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClickToPayProfilesResponse {
    #[serde(default)]
    pub click_to_pay_profiles: Vec<ClickToPayProfileObject>,
}

/// A name in a profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileName {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub middle_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
}

/// A card in a profile. The PAN is the card's full number as D1 returns it: the client masks
/// it at once (first 6 / last 4) and never passes it on.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileCard {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pan: Option<String>,
    /// `MMYY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cardholder_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing_address: Option<serde_json::Value>,
}

impl fmt::Debug for ProfileCard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProfileCard")
            .field("card_id", &self.card_id)
            .finish_non_exhaustive()
    }
}

impl Drop for ProfileCard {
    fn drop(&mut self) {
        if let Some(p) = &mut self.pan {
            p.zeroize();
        }
    }
}

/// One Click to Pay profile (one directory).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClickToPayProfileObject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<ProfileName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default)]
    pub cards: Vec<ProfileCard>,
}

/// Masks a card number to its first 6 and last 4 digits (`411111******1111`); anything that is
/// not 12 to 19 digits masks to `None`.
pub fn mask_pan(pan: &str) -> Option<String> {
    let n = pan.len();
    if !(12..=19).contains(&n) || !pan.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!(
        "{}{}{}",
        &pan[..6],
        "*".repeat(n - 10),
        &pan[n - 4..]
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test should stop loudly")]
mod tests {
    use super::*;

    #[test]
    fn notification_items_decode_forward_compatibly() {
        let j = r#"{"operations":[{"operationId":"01c5a05e-1","operation":"PRODUCE","status":"PENDING","startTime":"2025-01-17T06:28:02.492Z","cardId":"271b-6e47-8ec3-7f3f","details":{"status":"CARD_PROD_REQUESTED"},"futureField":{"x":1}}]}"#;
        let n: OperationsNotification = serde_json::from_str(j).unwrap();
        assert_eq!(n.operations[0].operation, "PRODUCE");
        assert_eq!(
            n.operations[0].details.as_ref().unwrap()["status"],
            "CARD_PROD_REQUESTED"
        );
    }

    #[test]
    fn pans_mask_to_six_and_four() {
        assert_eq!(
            mask_pan("4111111111111111").as_deref(),
            Some("411111******1111")
        );
        assert_eq!(mask_pan("411111"), None);
        assert_eq!(mask_pan("4111x11111111111"), None);
        let mut c = ProfileCard::default();
        c.pan = Some("4111111111111111".into());
        assert!(!format!("{c:?}").contains("4111"));
    }
}
