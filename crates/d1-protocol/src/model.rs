//! D1 wire DTOs (docs/d1-protocol.md): what goes over HTTP, separate from domain types.
//!
//! Decoding is forward compatible, as D1's compatibility rules ask: unknown fields are ignored
//! (no `deny_unknown_fields`), unknown `status` values are kept verbatim
//! (`status` is a string), and optional fields may be absent. Types that carry sensitive
//! values (card data, token numbers, cryptograms) have redacted `Debug` and wipe themselves.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// RFC 7523 grant type for JWT-bearer client assertions.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// `POST /oauth2/token` body. Field names are OAuth's snake_case, not D1's camelCase.
#[derive(Serialize)]
pub struct OAuthTokenRequest<'a> {
    pub grant_type: &'a str,
    pub assertion: &'a str,
}

#[derive(Serialize, Deserialize)]
pub struct OAuthTokenResponse {
    pub access_token: String,
    pub expires_in: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
}

impl fmt::Debug for OAuthTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthTokenResponse")
            .field("expires_in", &self.expires_in)
            .field("token_type", &self.token_type)
            .finish_non_exhaustive()
    }
}

impl Drop for OAuthTokenResponse {
    fn drop(&mut self) {
        self.access_token.zeroize();
    }
}

/// Error body on every 4xx/5xx. Only `errorCode` is acted on: D1 asks clients never to parse
/// messages.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// For humans; never acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OnboardMerchantRequest<'a> {
    pub merchant_name: &'a str,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OnboardMerchantResponse {
    pub merchant_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateTokenRequest<'a> {
    pub request_id: &'a str,
    pub usage: &'a str,
    /// Compact JWE of [`CardPlaintext`] to D1's encryption key.
    pub encrypted_data: &'a str,
}

/// Card data plaintext for the create-token JWE: `{"pan": "...", "exp": "MMYY"}`.
#[derive(Serialize)]
pub struct CardPlaintext<'a> {
    pub pan: &'a str,
    pub exp: &'a str,
}

impl CardPlaintext<'_> {
    /// Serializes into a wiping buffer allocated once at its final size, so no reallocation
    /// leaves a copy of the digits behind in freed memory.
    pub fn to_zeroizing_json(&self) -> Result<Zeroizing<Vec<u8>>, serde_json::Error> {
        // `{"pan":"","exp":""}` is 20 bytes; digits need no escaping.
        let mut buf = Zeroizing::new(Vec::with_capacity(32 + self.pan.len() + self.exp.len()));
        serde_json::to_writer(&mut *buf, self)?;
        Ok(buf)
    }
}

impl fmt::Debug for CardPlaintext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CardPlaintext(<redacted>)")
    }
}

/// The token object D1 returns from every token endpoint. While a tokenization is `PENDING` only
/// `tokenId` and `status` are known; absent fields are left out when it is written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenObject {
    pub token_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Kept verbatim: new values must not fail decoding (the client maps it to its own status).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_bin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_last_digits: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_expiry_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_last_digits: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expiry_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub par: Option<String>,
}

/// Optional body of suspend/resume.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AmountDto<'a> {
    pub value: u64,
    pub currency: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionRequest<'a> {
    /// `CIT` or `MIT`.
    pub transaction_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<AmountDto<'a>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionResponse {
    /// Compact JWE of [`CryptogramPlaintext`] to the gateway's key.
    pub encrypted_data: String,
    pub eci: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cryptogram_expiry_date: Option<String>,
}

/// Decrypted cryptogram payload. Wiped on drop; `Debug` is redacted.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CryptogramPlaintext {
    pub token_number: String,
    pub token_expiry_date: String,
    pub cryptogram: String,
}

impl CryptogramPlaintext {
    /// Serializes into a wiping buffer allocated once at its final size (the token number and
    /// the cryptogram must not be left behind in freed memory by a reallocation).
    pub fn to_zeroizing_json(&self) -> Result<Zeroizing<Vec<u8>>, serde_json::Error> {
        let fixed = r#"{"tokenNumber":"","tokenExpiryDate":"","cryptogram":""}"#.len();
        let mut buf = Zeroizing::new(Vec::with_capacity(
            fixed + self.token_number.len() + self.token_expiry_date.len() + self.cryptogram.len(),
        ));
        serde_json::to_writer(&mut *buf, self)?;
        Ok(buf)
    }

    /// Moves the secrets out into wiping containers (a move, not a copy of the heap data).
    pub fn into_parts(mut self) -> (Zeroizing<String>, String, Zeroizing<String>) {
        (
            Zeroizing::new(std::mem::take(&mut self.token_number)),
            std::mem::take(&mut self.token_expiry_date),
            Zeroizing::new(std::mem::take(&mut self.cryptogram)),
        )
    }
}

impl Drop for CryptogramPlaintext {
    fn drop(&mut self) {
        self.token_number.zeroize();
        self.cryptogram.zeroize();
    }
}

impl fmt::Debug for CryptogramPlaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CryptogramPlaintext(<redacted>)")
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

    #[test]
    fn token_object_ignores_unknown_fields_and_keeps_unknown_status() {
        let json = r#"{"tokenId":"t1","requestId":"tok_x","status":"FROZEN_BY_ISSUER",
            "tokenLastDigits":"4321","tokenExpiryDate":"0329","par":"V001","newField":{"a":[1]},
            "cardBin":"411111"}"#;
        let t: TokenObject = serde_json::from_str(json).unwrap();
        assert_eq!(t.status, "FROZEN_BY_ISSUER");
        assert_eq!(t.card_bin.as_deref(), Some("411111"));
    }

    #[test]
    fn requests_serialize_to_the_documented_shape() {
        let v = serde_json::to_value(CreateTokenRequest {
            request_id: "tok_a",
            usage: "CARD_ON_FILE",
            encrypted_data: "jwe",
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"requestId":"tok_a","usage":"CARD_ON_FILE","encryptedData":"jwe"})
        );
        let v = serde_json::to_value(TransactionRequest {
            transaction_type: "MIT",
            amount: Some(AmountDto {
                value: 1299,
                currency: "EUR",
            }),
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"transactionType":"MIT","amount":{"value":1299,"currency":"EUR"}})
        );
        let v = serde_json::to_value(TransactionRequest {
            transaction_type: "CIT",
            amount: None,
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({"transactionType":"CIT"}));
        let v = serde_json::to_value(OAuthTokenRequest {
            grant_type: JWT_BEARER_GRANT,
            assertion: "a.b.c",
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"grant_type":JWT_BEARER_GRANT,"assertion":"a.b.c"})
        );
        assert_eq!(
            serde_json::to_string(&LifecycleRequest::default()).unwrap(),
            "{}"
        );
    }

    #[test]
    fn card_plaintext_is_exact_and_fits_its_buffer() {
        let c = CardPlaintext {
            pan: "4111111111111111111",
            exp: "1230",
        };
        let buf = c.to_zeroizing_json().unwrap();
        assert_eq!(
            std::str::from_utf8(&buf).unwrap(),
            r#"{"pan":"4111111111111111111","exp":"1230"}"#
        );
        assert!(buf.len() <= 32 + 19 + 4);
        assert!(!format!("{c:?}").contains("4111"));
    }

    #[test]
    fn cryptogram_payload_is_redacted() {
        let p: CryptogramPlaintext = serde_json::from_str(
            r#"{"tokenNumber":"4895370012345678","tokenExpiryDate":"0329","cryptogram":"AAEC","extra":1}"#,
        )
        .unwrap();
        assert!(!format!("{p:?}").contains("4895"));
        let (num, exp, cry) = p.into_parts();
        assert_eq!(num.as_str(), "4895370012345678");
        assert_eq!(exp, "0329");
        assert_eq!(cry.as_str(), "AAEC");
        let e: ErrorBody =
            serde_json::from_str(r#"{"errorCode":"INVALID_FIELD","errorMessage":"x","more":true}"#)
                .unwrap();
        assert_eq!(e.error_code.as_deref(), Some("INVALID_FIELD"));
    }
}
