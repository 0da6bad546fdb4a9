//! Authentication of D1's calls to us: OAuth2 client credentials in, a stateless bearer token out.
//!
//! D1 first calls `POST /oauth2/token` with HTTP Basic `client_id:client_secret`, then sends the
//! access token on every `notify-update`. The token is not stored anywhere: it is
//! `tgn1.<expiry, Unix seconds>.<base64url HMAC-SHA256>` where the MAC covers the version, the
//! client id and the expiry, keyed by a key derived from the configured client secret. So:
//!
//! - any gateway instance with the same configuration verifies any instance's tokens, with no
//!   store round trip and nothing to replicate;
//! - changing the secret revokes every outstanding token at once (D1 fetches a new one after a
//!   401);
//! - a token cannot be forged or extended without the secret; it can be replayed until it expires
//!   by whoever intercepts it, like any bearer token, hence the short default lifetime and TLS.
//!
//! Secrets are compared in constant time, through fixed-length digests so that not even their
//! lengths leak through timing.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// Version tag of the token format (first segment), also bound into the MAC.
const TOKEN_VERSION: &str = "tgn1";
/// The one scope granted: calling `notify-update`.
pub const NOTIFY_SCOPE: &str = "notify";
/// Label of the key derivation, so this key can never equal another use of the same secret.
const KEY_LABEL: &[u8] = b"tokengate/notify-access-token/v1";

/// Client credentials D1 authenticates with. `Debug` shows the id only.
#[derive(Clone)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: SecretString,
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl ClientCredentials {
    /// Fresh random credentials (sandbox mode): a 256-bit secret, base64url, so it is also safe
    /// in HTTP Basic without any encoding.
    pub fn generate() -> ClientCredentials {
        let mut id = [0u8; 8];
        rand::fill(&mut id[..]);
        let mut secret = Zeroizing::new([0u8; 32]);
        rand::fill(&mut secret[..]);
        ClientCredentials {
            client_id: format!("sandbox-d1-{}", URL_SAFE_NO_PAD.encode(id)),
            client_secret: SecretString::from(URL_SAFE_NO_PAD.encode(&secret[..])),
        }
    }
}

/// An issued access token and what the token response says about it.
pub struct AccessToken {
    pub access_token: Zeroizing<String>,
    pub expires_in: u64,
    /// Unix seconds.
    pub expires_at: i64,
    pub scope: &'static str,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why a bearer token is not accepted (the HTTP layer words the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    #[error("no bearer token")]
    Missing,
    #[error("the bearer token is not valid or has expired")]
    Invalid,
}

struct Client {
    id: String,
    id_digest: [u8; 32],
    secret_digest: [u8; 32],
    /// Pre-keyed MAC (cloned per use).
    mac: Hmac<Sha256>,
}

/// Verifies client credentials, issues and verifies access tokens.
pub struct NotifyAuth {
    /// `None`: no credentials configured, so no token can be issued or accepted.
    client: Option<Client>,
    require_auth: bool,
    ttl: Duration,
}

impl fmt::Debug for NotifyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifyAuth")
            .field("client_id", &self.client.as_ref().map(|c| c.id.as_str()))
            .field("require_auth", &self.require_auth)
            .field("ttl", &self.ttl)
            .finish()
    }
}

fn digest(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

#[derive(Debug, thiserror::Error)]
#[error("the notify client secret cannot key a MAC")]
pub struct KeyError;

impl NotifyAuth {
    pub fn new(
        credentials: Option<&ClientCredentials>,
        ttl: Duration,
        require_auth: bool,
    ) -> Result<NotifyAuth, KeyError> {
        let client = match credentials {
            None => None,
            Some(c) => {
                let secret = c.client_secret.expose_secret().as_bytes();
                let mut kdf =
                    <Hmac<Sha256> as KeyInit>::new_from_slice(secret).map_err(|_| KeyError)?;
                kdf.update(KEY_LABEL);
                let key = Zeroizing::new(kdf.finalize().into_bytes().to_vec());
                Some(Client {
                    id: c.client_id.clone(),
                    id_digest: digest(c.client_id.as_bytes()),
                    secret_digest: digest(secret),
                    mac: <Hmac<Sha256> as KeyInit>::new_from_slice(&key).map_err(|_| KeyError)?,
                })
            }
        };
        Ok(NotifyAuth {
            client,
            require_auth,
            ttl,
        })
    }

    /// Whether `notify-update` must carry a valid bearer token.
    pub fn required(&self) -> bool {
        self.require_auth
    }

    /// Checks HTTP Basic credentials in constant time. Both comparisons always run.
    pub fn check_client(&self, client_id: &str, client_secret: &str) -> bool {
        let Some(c) = &self.client else {
            return false;
        };
        let id_ok = digest(client_id.as_bytes())[..].ct_eq(&c.id_digest[..]);
        let secret_ok = digest(client_secret.as_bytes())[..].ct_eq(&c.secret_digest[..]);
        bool::from(id_ok & secret_ok)
    }

    fn sign(&self, c: &Client, expires_at: i64) -> Hmac<Sha256> {
        let mut m = c.mac.clone();
        m.update(TOKEN_VERSION.as_bytes());
        m.update(&[0]);
        m.update(c.id.as_bytes());
        m.update(&[0]);
        m.update(expires_at.to_string().as_bytes());
        m
    }

    /// Issues a token valid from `now` for the configured lifetime; `None` without credentials.
    pub fn issue(&self, now: OffsetDateTime) -> Option<AccessToken> {
        let c = self.client.as_ref()?;
        let ttl = self.ttl.as_secs();
        let expires_at = now
            .unix_timestamp()
            .saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX));
        let tag = self.sign(c, expires_at).finalize().into_bytes();
        Some(AccessToken {
            access_token: Zeroizing::new(format!(
                "{TOKEN_VERSION}.{expires_at}.{}",
                URL_SAFE_NO_PAD.encode(tag)
            )),
            expires_in: ttl,
            expires_at,
            scope: NOTIFY_SCOPE,
        })
    }

    /// Verifies a bearer token at `now`: well formed, our MAC (compared in constant time), not
    /// expired.
    pub fn verify(&self, token: Option<&str>, now: OffsetDateTime) -> Result<(), BearerError> {
        let token = token.ok_or(BearerError::Missing)?;
        let c = self.client.as_ref().ok_or(BearerError::Invalid)?;
        let mut parts = token.split('.');
        let (Some(version), Some(exp), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BearerError::Invalid);
        };
        if version != TOKEN_VERSION || exp.is_empty() || !exp.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BearerError::Invalid);
        }
        let expires_at: i64 = exp.parse().map_err(|_| BearerError::Invalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| BearerError::Invalid)?;
        self.sign(c, expires_at)
            .verify_slice(&tag)
            .map_err(|_| BearerError::Invalid)?;
        if expires_at <= now.unix_timestamp() {
            return Err(BearerError::Invalid);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(secret: &str) -> ClientCredentials {
        ClientCredentials {
            client_id: "d1".into(),
            client_secret: SecretString::from(secret.to_owned()),
        }
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn auth(secret: &str) -> NotifyAuth {
        NotifyAuth::new(Some(&creds(secret)), Duration::from_secs(60), true).unwrap()
    }

    #[test]
    fn client_check_needs_both_parts() {
        let a = auth(SECRET);
        assert!(a.check_client("d1", SECRET));
        assert!(!a.check_client("d1", "0123456789abcdef0123456789abcdeX"));
        assert!(!a.check_client("d2", SECRET));
        assert!(!a.check_client("", ""));
        let none = NotifyAuth::new(None, Duration::from_secs(60), true).unwrap();
        assert!(!none.check_client("d1", SECRET));
        assert!(none.issue(OffsetDateTime::now_utc()).is_none());
    }

    #[test]
    fn tokens_verify_across_instances_and_expire() {
        let now = OffsetDateTime::now_utc();
        let a = auth(SECRET);
        let t = a.issue(now).unwrap();
        assert_eq!(t.expires_in, 60);
        assert_eq!(t.expires_at, now.unix_timestamp() + 60);
        // Another instance with the same configuration accepts it.
        let b = auth(SECRET);
        assert_eq!(b.verify(Some(&t.access_token), now), Ok(()));
        // Expired.
        let later = now + time::Duration::seconds(61);
        assert_eq!(
            b.verify(Some(&t.access_token), later),
            Err(BearerError::Invalid)
        );
        // Another secret (rotation) refuses it.
        let c = auth("ffffffffffffffffffffffffffffffff");
        assert_eq!(
            c.verify(Some(&t.access_token), now),
            Err(BearerError::Invalid)
        );
        assert_eq!(a.verify(None, now), Err(BearerError::Missing));
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let now = OffsetDateTime::now_utc();
        let a = auth(SECRET);
        let t = a.issue(now).unwrap();
        let tok = t.access_token.as_str();
        let parts: Vec<&str> = tok.split('.').collect();
        // Extending the expiry breaks the MAC.
        let extended = format!("{}.{}.{}", parts[0], t.expires_at + 3600, parts[2]);
        for bad in [
            extended.as_str(),
            "",
            "tgn1",
            "tgn1.1.",
            "tgn1.x.AAAA",
            "tgn2.1.AAAA",
            &format!("{tok}.x"),
            &format!("{}.{}.{}", parts[0], parts[1], "A".repeat(43)),
        ] {
            assert_eq!(a.verify(Some(bad), now), Err(BearerError::Invalid), "{bad}");
        }
    }

    #[test]
    fn generated_credentials_are_random_and_debug_hides_the_secret() {
        let a = ClientCredentials::generate();
        let b = ClientCredentials::generate();
        assert_ne!(a.client_id, b.client_id);
        assert!(a.client_secret.expose_secret().len() >= 43);
        let dbg = format!("{a:?}");
        assert!(!dbg.contains(a.client_secret.expose_secret()), "{dbg}");
        let auth = NotifyAuth::new(Some(&a), Duration::from_secs(1), true).unwrap();
        assert!(!format!("{auth:?}").contains(a.client_secret.expose_secret()));
        let t = auth.issue(OffsetDateTime::now_utc()).unwrap();
        assert!(!format!("{t:?}").contains(t.access_token.as_str()));
    }
}
