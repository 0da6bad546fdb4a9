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
