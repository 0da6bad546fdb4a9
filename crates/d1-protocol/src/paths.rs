//! The path templates of D1's endpoints, under the API base URL.
//!
//! The client reads them from configuration (`[d1.paths]`), because the eCom token paths are not
//! public and are our inference (docs/d1-protocol.md); the simulator serves the defaults.

/// Path templates under the base URL, with `{mgid}`, `{merchantId}` and `{tokenId}`
/// placeholders. Defaults follow docs/d1-protocol.md; they are configuration so the eCom token
/// paths (not public, our inference) can be corrected without code changes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct D1Paths {
    pub oauth_token: String,
    pub merchants: String,
    /// Create (POST) and find by `?requestId=` (GET).
    pub tokens: String,
    /// Get (GET) and delete (DELETE).
    pub token: String,
    pub suspend: String,
    pub resume: String,
    pub transactions: String,
}

impl Default for D1Paths {
    fn default() -> Self {
        let token = "/merchant-gateways/{mgid}/merchants/{merchantId}/tokens/{tokenId}";
        D1Paths {
            oauth_token: "/oauth2/token".into(),
            merchants: "/merchant-gateways/{mgid}/merchants".into(),
            tokens: "/merchant-gateways/{mgid}/merchants/{merchantId}/tokens".into(),
            token: token.into(),
            suspend: format!("{token}/suspend"),
            resume: format!("{token}/resume"),
            transactions: format!("{token}/transactions"),
        }
    }
}

impl D1Paths {
    pub fn all(&self) -> [(&'static str, &str); 7] {
        [
            ("oauth_token", &self.oauth_token),
            ("merchants", &self.merchants),
            ("tokens", &self.tokens),
            ("token", &self.token),
            ("suspend", &self.suspend),
            ("resume", &self.resume),
            ("transactions", &self.transactions),
        ]
    }

    /// Checks every template starts with `/` and uses only the known placeholders; the error
    /// names the bad key (`paths.<name>`).
    pub fn validate(&self) -> Result<(), String> {
        for (name, t) in self.all() {
            if !t.starts_with('/') {
                return Err(format!("paths.{name} must start with '/'"));
            }
            let rest = t
                .replace("{mgid}", "")
                .replace("{merchantId}", "")
                .replace("{tokenId}", "");
            if rest.contains('{') || rest.contains('}') || rest.contains('?') {
                return Err(format!(
                    "paths.{name} has an unknown placeholder or a query string"
                ));
            }
        }
        Ok(())
    }
}

/// Path templates of D1's issuer-side API, under its "banking" base URL, with `{issuerId}`,
/// `{cardId}`, `{consumerId}` and `{operationId}` placeholders. Configuration like
/// [`D1Paths`] (`[d1.issuer_paths]`), because the opt-out, profiles and get-operation paths are
/// our inference (docs/d1-protocol.md, "Issuer side").
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IssuerPaths {
    pub card_click_to_pay_enrolment: String,
    pub card_click_to_pay_update: String,
    pub consumer_click_to_pay_update: String,
    pub card_click_to_pay_opt_out: String,
    pub consumer_click_to_pay_opt_out: String,
    pub card_click_to_pay_profiles: String,
    pub consumer_click_to_pay_profiles: String,
    pub get_operation: String,
    /// Deleting a card at D1 (`operation: DELETE`): our inference, in D1's `operations:` style.
    pub card_delete: String,
}

impl Default for IssuerPaths {
    fn default() -> Self {
        let card = "/issuers/{issuerId}/cards/{cardId}";
        let consumer = "/issuers/{issuerId}/consumers/{consumerId}";
        IssuerPaths {
            card_click_to_pay_enrolment: format!("{card}/operations:clickToPayEnrolment"),
            card_click_to_pay_update: format!("{card}/operations:clickToPayUpdate"),
            consumer_click_to_pay_update: format!("{consumer}/operations:clickToPayUpdate"),
            card_click_to_pay_opt_out: format!("{card}/operations:clickToPayOptOut"),
            consumer_click_to_pay_opt_out: format!("{consumer}/operations:clickToPayOptOut"),
            card_click_to_pay_profiles: format!("{card}/clickToPayProfiles"),
            consumer_click_to_pay_profiles: format!("{consumer}/clickToPayProfiles"),
            get_operation: "/issuers/{issuerId}/operations/{operationId}".into(),
            card_delete: format!("{card}/operations:delete"),
        }
    }
}

impl IssuerPaths {
    pub fn all(&self) -> [(&'static str, &str); 9] {
        [
            (
                "card_click_to_pay_enrolment",
                &self.card_click_to_pay_enrolment,
            ),
            ("card_click_to_pay_update", &self.card_click_to_pay_update),
            (
                "consumer_click_to_pay_update",
                &self.consumer_click_to_pay_update,
            ),
            ("card_click_to_pay_opt_out", &self.card_click_to_pay_opt_out),
            (
                "consumer_click_to_pay_opt_out",
                &self.consumer_click_to_pay_opt_out,
            ),
            (
                "card_click_to_pay_profiles",
                &self.card_click_to_pay_profiles,
            ),
            (
                "consumer_click_to_pay_profiles",
                &self.consumer_click_to_pay_profiles,
            ),
            ("get_operation", &self.get_operation),
            ("card_delete", &self.card_delete),
        ]
    }

    /// Checks every template starts with `/` and uses only the known placeholders; the error
    /// names the bad key (`issuer_paths.<name>`).
    pub fn validate(&self) -> Result<(), String> {
        for (name, t) in self.all() {
            if !t.starts_with('/') {
                return Err(format!("issuer_paths.{name} must start with '/'"));
            }
            let rest = t
                .replace("{issuerId}", "")
                .replace("{cardId}", "")
                .replace("{consumerId}", "")
                .replace("{operationId}", "");
            if rest.contains('{') || rest.contains('}') || rest.contains('?') {
                return Err(format!(
                    "issuer_paths.{name} has an unknown placeholder or a query string"
                ));
            }
        }
        Ok(())
    }
}

/// The issuer API's base URL when none is configured: the eCom base with its `/authz/v1`
/// replaced by `/banking/v1` (D1's two bases differ only there), else the eCom base itself.
pub fn default_issuer_base(ecom_base: &str) -> String {
    let b = ecom_base.trim_end_matches('/');
    match b.strip_suffix("/authz/v1") {
        Some(host) => format!("{host}/banking/v1"),
        None => b.to_owned(),
    }
}
