//! Client certificates (mutual TLS) mapped to tenants (merchants, and issuers), and how they
//! combine with API keys.
//!
//! Issuers bind certificates exactly as merchants do, under their tenant id
//! (`IssuerId::tenant`, the id their API keys are filed under): one policy per tenant, one
//! index of certificates for all tenants, so a certificate is bound to one merchant **or** one
//! issuer and never acts for another tenant of either kind. Issuers have the `API_KEY` and
//! `API_KEY_AND_CERT` modes: an issuer request always carries an issuer API key, so `CERT`
//! (a certificate alone) is refused for them ([`ClientCerts::put_for_issuer`]).
//!
//! A merchant's [`ClientCertPolicy`] lists the certificates bound to it (by the SHA-256 of the
//! certificate's DER, the usual "fingerprint") and its [`CertAuthMode`]:
//! - [`CertAuthMode::ApiKey`] (the default): the API key authenticates; a certificate is not
//!   needed;
//! - [`CertAuthMode::ApiKeyAndCert`]: every request needs an API key of the merchant **and** a
//!   connection made with one of its certificates;
//! - [`CertAuthMode::Cert`]: the certificate authenticates alone (no `Authorization` header),
//!   with the scopes set on the certificate's binding; a request that also sends an API key must
//!   send one of the same merchant (its key's scopes then apply). An API key alone is refused.
//!
//! One rule holds in every mode and fails closed: a certificate bound to merchant A never acts
//! for merchant B. A request made with A's certificate and B's key is refused, whatever B's mode.
//! A certificate binds to at most one merchant (the store refuses a second binding).
//!
//! The fingerprint only means something because the listener verified the chain against
//! `server.tls.client_ca_file` and the client proved it holds the key (the TLS handshake); the
//! gateway never takes a certificate from a request header.
//!
//! Each instance caches policies and certificate lookups for `auth.api_key_cache_ttl_ms`, as it
//! caches API keys: a change made through this instance applies at once, on other instances
//! within that time.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::apikeys::{Caller, Scopes};
use super::error::DomainError;
use super::issuer::Issuer;
use super::merchant::Merchant;
use super::token::MerchantId;
use crate::domain::ports::TokenStore;
use crate::domain::ports::client_certs::{ClientCertStore, PutPolicy};

/// Certificates one merchant can bind: enough for an overlap during rotation on several hosts.
pub const MAX_CERTS_PER_MERCHANT: usize = 20;

/// SHA-256 of a certificate's DER encoding, as 64 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CertFingerprint(String);

impl CertFingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_der(der: &[u8]) -> CertFingerprint {
        CertFingerprint(hex::encode(Sha256::digest(der)))
    }

    /// Parses 64 hex digits, in either case, optionally separated by `:` (as `openssl x509
    /// -fingerprint -sha256` prints them).
    pub fn parse(s: &str) -> Option<CertFingerprint> {
        let hex: String = s.trim().chars().filter(|c| *c != ':').collect();
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| CertFingerprint(hex.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The caller id of requests the certificate authenticates alone (audit actor, rate-limit
    /// key): `cert_` and the first 24 hex digits, as API key ids are built.
    pub fn caller_id(&self) -> String {
        format!("cert_{}", self.0.get(..24).unwrap_or(&self.0))
    }
}

impl fmt::Debug for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertFingerprint({})", self.0)
    }
}

impl fmt::Display for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for CertFingerprint {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        CertFingerprint::parse(&s).ok_or_else(|| "not a SHA-256 fingerprint".to_owned())
    }
}

impl From<CertFingerprint> for String {
    fn from(f: CertFingerprint) -> String {
        f.0
    }
}

/// How a merchant's requests authenticate (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertAuthMode {
    #[default]
    ApiKey,
    ApiKeyAndCert,
    Cert,
}

impl CertAuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CertAuthMode::ApiKey => "API_KEY",
            CertAuthMode::ApiKeyAndCert => "API_KEY_AND_CERT",
            CertAuthMode::Cert => "CERT",
        }
    }
}

/// A certificate bound to a merchant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BoundCert {
    pub sha256: CertFingerprint,
    /// For people: which host or system holds it.
    pub name: String,
    /// What a request the certificate authenticates alone ([`CertAuthMode::Cert`]) may do.
    pub scopes: Scopes,
}

/// A merchant's certificates and authentication mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertPolicy {
    pub merchant_id: MerchantId,
    pub mode: CertAuthMode,
    pub certificates: Vec<BoundCert>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl ClientCertPolicy {
    /// What a merchant without a stored policy has: API keys only, no certificate.
    pub fn default_for(merchant_id: MerchantId) -> ClientCertPolicy {
        ClientCertPolicy {
            merchant_id,
            mode: CertAuthMode::ApiKey,
            certificates: Vec::new(),
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    pub fn cert(&self, fp: &CertFingerprint) -> Option<&BoundCert> {
        self.certificates.iter().find(|c| &c.sha256 == fp)
    }
}

/// Why a policy could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ClientCertError {
    #[error("{detail}")]
    Validation { code: &'static str, detail: String },
    /// The certificate is bound to another merchant (which one is not told).
    #[error("a certificate is already bound to another merchant")]
    InUse(CertFingerprint),
    #[error(transparent)]
    Domain(#[from] DomainError),
}

fn invalid(code: &'static str, detail: impl Into<String>) -> ClientCertError {
    ClientCertError::Validation {
        code,
        detail: detail.into(),
    }
}

/// Checks a policy before it is stored: names, duplicates, the bound, and that a mode needing
/// a certificate has one (otherwise every request of the merchant would be refused).
pub fn validate(policy: &ClientCertPolicy) -> Result<(), ClientCertError> {
    if policy.certificates.len() > MAX_CERTS_PER_MERCHANT {
        return Err(invalid(
            "too_many_client_certs",
            format!("a merchant can have at most {MAX_CERTS_PER_MERCHANT} client certificates"),
        ));
    }
    if policy.mode != CertAuthMode::ApiKey && policy.certificates.is_empty() {
        return Err(invalid(
            "client_cert_needed",
            format!(
                "authMode {} needs at least one certificate",
                policy.mode.as_str()
            ),
        ));
    }
    for (i, c) in policy.certificates.iter().enumerate() {
        let name = c.name.trim();
        if name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(invalid(
                "invalid_client_cert_name",
                format!("`certificates[{i}].name`: at most 100 printable characters"),
            ));
        }
        if c.scopes.is_empty() {
            return Err(invalid(
                "invalid_scopes",
                format!("`certificates[{i}].scopes`: give at least one scope"),
            ));
        }
        if policy.certificates[..i]
            .iter()
            .any(|p| p.sha256 == c.sha256)
        {
            return Err(invalid(
                "duplicate_client_cert",
                format!("`certificates[{i}]`: the same certificate is listed twice"),
            ));
        }
    }
    Ok(())
}

/// Why a request's credentials were refused because of its client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRefusal {
    /// The connection's certificate is bound to another merchant than the API key's.
    Mismatch,
    /// The key's merchant requires one of its certificates, and the connection has none of them.
    Required,
}

/// The certificate a connection presented, as far as authentication cares: the merchant it is
/// bound to (after checking that merchant's policy still lists it), or `None` when unbound.
#[derive(Debug, Clone)]
pub struct CertBinding {
    pub policy: Arc<ClientCertPolicy>,
    pub cert: BoundCert,
}

/// Decides a request that sent an API key of `key_merchant` (whose mode is `key_mode`) over a
/// connection whose certificate is bound to `cert_merchant` (`None`: no certificate, or one
/// bound to nobody).
pub fn check_key(
    key_merchant: &MerchantId,
    key_mode: CertAuthMode,
    cert_merchant: Option<&MerchantId>,
) -> Result<(), CertRefusal> {
    match cert_merchant {
        Some(m) if m != key_merchant => Err(CertRefusal::Mismatch),
        Some(_) => Ok(()),
        None if key_mode == CertAuthMode::ApiKey => Ok(()),
        None => Err(CertRefusal::Required),
    }
}

/// Policies and certificate bindings, cached per instance (see the module docs).
pub struct ClientCerts {
    store: Arc<dyn ClientCertStore>,
    merchants: Arc<dyn TokenStore>,
    ttl: Duration,
    policies: DashMap<MerchantId, (Arc<ClientCertPolicy>, Instant)>,
    /// Fingerprint -> the merchant the store's index names (`None`: bound to nobody).
    by_cert: DashMap<CertFingerprint, (Option<MerchantId>, Instant)>,
    /// Merchant records for certificate-only callers ([`ClientCerts::caller_for`]).
    merchant_records: DashMap<MerchantId, (Merchant, Instant)>,
}

/// Bound on each cache: a flood of distinct certificates or merchants cannot grow it without
/// limit (as the API key cache).
const CACHE_MAX: usize = 100_000;

fn fresh<T>(entry: &(T, Instant), ttl: Duration) -> bool {
    entry.1.elapsed() < ttl
}

impl ClientCerts {
    pub fn new(
        store: Arc<dyn ClientCertStore>,
        merchants: Arc<dyn TokenStore>,
        ttl: Duration,
    ) -> ClientCerts {
        ClientCerts {
            store,
            merchants,
            ttl,
            policies: DashMap::new(),
            by_cert: DashMap::new(),
            merchant_records: DashMap::new(),
        }
    }

    /// The merchant's policy (the default one when none is stored). Cached.
    pub async fn policy(
        &self,
        merchant: &MerchantId,
    ) -> Result<Arc<ClientCertPolicy>, DomainError> {
        if let Some(e) = self.policies.get(merchant)
            && fresh(&e, self.ttl)
        {
            return Ok(e.0.clone());
        }
        let p = Arc::new(
            self.store
                .client_cert_policy(merchant)
                .await?
                .unwrap_or_else(|| ClientCertPolicy::default_for(merchant.clone())),
        );
        if self.policies.len() > CACHE_MAX {
            self.policies.clear();
        }
        self.policies
            .insert(merchant.clone(), (p.clone(), Instant::now()));
        Ok(p)
    }

    /// The binding of a presented certificate: the store's index names a merchant, and that
    /// merchant's policy lists the certificate (an index entry left over by an interrupted
    /// change binds nothing). Cached.
    pub async fn binding(&self, fp: &CertFingerprint) -> Result<Option<CertBinding>, DomainError> {
        let indexed = match self.by_cert.get(fp) {
            Some(e) if fresh(&e, self.ttl) => e.0.clone(),
            _ => {
                let m = self.store.merchant_by_client_cert(fp).await?;
                if self.by_cert.len() > CACHE_MAX {
                    self.by_cert.clear();
                }
                self.by_cert.insert(fp.clone(), (m.clone(), Instant::now()));
                m
            }
        };
        let Some(merchant) = indexed else {
            return Ok(None);
        };
        let policy = self.policy(&merchant).await?;
        Ok(policy.cert(fp).cloned().map(|cert| CertBinding {
            policy: policy.clone(),
            cert,
        }))
    }

    /// Checks a request authenticated by an API key of `key_merchant` against the connection's
    /// certificate `presented`.
    pub async fn check_key(
        &self,
        key_merchant: &MerchantId,
        presented: Option<&CertFingerprint>,
    ) -> Result<Result<(), CertRefusal>, DomainError> {
        let bound = match presented {
            Some(fp) => self.binding(fp).await?,
            None => None,
        };
        let cert_merchant = bound.as_ref().map(|b| &b.policy.merchant_id);
        // The key's merchant's mode matters only when the certificate does not settle it.
        let mode = match cert_merchant {
            Some(_) => CertAuthMode::ApiKey,
            None => self.policy(key_merchant).await?.mode,
        };
        Ok(check_key(key_merchant, mode, cert_merchant))
    }

    /// The caller a certificate authenticates alone: only when it is bound to a merchant in
    /// [`CertAuthMode::Cert`]; with the scopes of its binding.
    pub async fn caller_for(&self, fp: &CertFingerprint) -> Result<Option<Caller>, DomainError> {
        let Some(b) = self.binding(fp).await? else {
            return Ok(None);
        };
        if b.policy.mode != CertAuthMode::Cert {
            return Ok(None);
        }
        let id = &b.policy.merchant_id;
        let merchant = match self.merchant_records.get(id) {
            Some(e) if fresh(&e, self.ttl) => e.0.clone(),
            _ => {
                // A policy outliving its merchant authenticates nothing.
                let Some(m) = self.merchants.get_merchant(id).await? else {
                    return Ok(None);
                };
                if self.merchant_records.len() > CACHE_MAX {
                    self.merchant_records.clear();
                }
                self.merchant_records
                    .insert(id.clone(), (m.clone(), Instant::now()));
                m
            }
        };
        Ok(Some(Caller {
            merchant: std::sync::Arc::new(merchant),
            key_id: fp.caller_id(),
            scopes: b.cert.scopes,
        }))
    }

    /// Replaces the merchant's policy. The merchant must exist; every certificate must be bound
    /// to nobody else. Applies on this instance at once.
    pub async fn put(&self, policy: ClientCertPolicy) -> Result<ClientCertPolicy, ClientCertError> {
        validate(&policy)?;
        if policy.merchant_id.is_issuer()
            || self
                .merchants
                .get_merchant(&policy.merchant_id)
                .await
                .map_err(DomainError::from)?
                .is_none()
        {
            return Err(DomainError::MerchantNotFound.into());
        }
        self.store(policy).await
    }

    /// Replaces an issuer's policy (filed under its tenant id, whatever `policy.merchant_id`
    /// says). The caller found the issuer; the rules are the merchants' but `CERT`, which is
    /// refused (`invalid_auth_mode`): issuer routes always take an issuer API key.
    pub async fn put_for_issuer(
        &self,
        issuer: &Issuer,
        mut policy: ClientCertPolicy,
    ) -> Result<ClientCertPolicy, ClientCertError> {
        if policy.mode == CertAuthMode::Cert {
            return Err(invalid(
                "invalid_auth_mode",
                "authMode CERT is for merchants; an issuer's requests always carry an issuer API key (API_KEY or API_KEY_AND_CERT)",
            ));
        }
        policy.merchant_id = issuer.id.tenant();
        validate(&policy)?;
        self.store(policy).await
    }

    /// An issuer's policy, for the admin API (the caller found the issuer).
    pub async fn get_for_issuer(&self, issuer: &Issuer) -> Result<ClientCertPolicy, DomainError> {
        let tenant = issuer.id.tenant();
        Ok(self
            .store
            .client_cert_policy(&tenant)
            .await?
            .unwrap_or_else(|| ClientCertPolicy::default_for(tenant)))
    }

    /// Stores a validated policy of an existing tenant and refreshes this instance's caches.
    async fn store(&self, policy: ClientCertPolicy) -> Result<ClientCertPolicy, ClientCertError> {
        let before = self.policy(&policy.merchant_id).await?;
        match self
            .store
            .put_client_cert_policy(&policy)
            .await
            .map_err(DomainError::from)?
        {
            PutPolicy::Stored => {}
            PutPolicy::Taken(fp) => return Err(ClientCertError::InUse(fp)),
        }
        for c in before.certificates.iter().chain(&policy.certificates) {
            self.by_cert.remove(&c.sha256);
        }
        self.policies.insert(
            policy.merchant_id.clone(),
            (Arc::new(policy.clone()), Instant::now()),
        );
        Ok(policy)
    }

    /// The merchant's policy, for the admin API: `MerchantNotFound` for an unknown merchant.
    pub async fn get(&self, merchant: &MerchantId) -> Result<ClientCertPolicy, DomainError> {
        if merchant.is_issuer() || self.merchants.get_merchant(merchant).await?.is_none() {
            return Err(DomainError::MerchantNotFound);
        }
        // Not from the cache: an admin reading back wants what is stored.
        Ok(self
            .store
            .client_cert_policy(merchant)
            .await?
            .unwrap_or_else(|| ClientCertPolicy::default_for(merchant.clone())))
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

    #[test]
    fn fingerprints_parse_in_openssl_and_plain_form() {
        let der = b"not really a certificate";
        let fp = CertFingerprint::of_der(der);
        assert_eq!(fp.as_str().len(), 64);
        let upper_colons = fp
            .as_str()
            .to_ascii_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(CertFingerprint::parse(&upper_colons), Some(fp.clone()));
        assert_eq!(CertFingerprint::parse(fp.as_str()), Some(fp.clone()));
        assert_eq!(CertFingerprint::parse(&fp.as_str()[1..]), None);
        assert_eq!(CertFingerprint::parse(&"g".repeat(64)), None);
        assert_eq!(CertFingerprint::parse(""), None);
        assert!(fp.caller_id().starts_with("cert_"));
        assert_eq!(fp.caller_id().len(), "cert_".len() + 24);
    }

    #[test]
    fn a_certificate_never_acts_for_another_merchant() {
        let a = MerchantId::generate();
        let b = MerchantId::generate();
        for mode in [
            CertAuthMode::ApiKey,
            CertAuthMode::ApiKeyAndCert,
            CertAuthMode::Cert,
        ] {
            // A's certificate with B's key: refused whatever B's mode.
            assert_eq!(check_key(&b, mode, Some(&a)), Err(CertRefusal::Mismatch));
            // A's certificate with A's key: fine in every mode.
            assert_eq!(check_key(&a, mode, Some(&a)), Ok(()));
        }
        // No (bound) certificate: only the default mode accepts the key alone.
        assert_eq!(check_key(&a, CertAuthMode::ApiKey, None), Ok(()));
        assert_eq!(
            check_key(&a, CertAuthMode::ApiKeyAndCert, None),
            Err(CertRefusal::Required)
        );
        assert_eq!(
            check_key(&a, CertAuthMode::Cert, None),
            Err(CertRefusal::Required)
        );
    }

    fn bound(n: u8) -> BoundCert {
        BoundCert {
            sha256: CertFingerprint::of_der(&[n]),
            name: format!("host-{n}"),
            scopes: Scopes::default_for_merchant_key(),
        }
    }

    #[test]
    fn policies_are_validated() {
        let m = MerchantId::generate();
        let mut p = ClientCertPolicy::default_for(m);
        validate(&p).unwrap();
        p.mode = CertAuthMode::Cert;
        assert!(matches!(
            validate(&p),
            Err(ClientCertError::Validation {
                code: "client_cert_needed",
                ..
            })
        ));
        p.certificates = vec![bound(1), bound(2)];
        validate(&p).unwrap();
        p.certificates.push(bound(1));
        assert!(matches!(
            validate(&p),
            Err(ClientCertError::Validation {
                code: "duplicate_client_cert",
                ..
            })
        ));
        p.certificates = vec![BoundCert {
            scopes: Scopes::default(),
            ..bound(3)
        }];
        assert!(matches!(
            validate(&p),
            Err(ClientCertError::Validation {
                code: "invalid_scopes",
                ..
            })
        ));
        p.certificates = (0..=MAX_CERTS_PER_MERCHANT as u8).map(bound).collect();
        assert!(matches!(
            validate(&p),
            Err(ClientCertError::Validation {
                code: "too_many_client_certs",
                ..
            })
        ));
        // Stored as JSON and read back unchanged.
        p.certificates = vec![bound(4)];
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("\"mode\":\"CERT\""), "{json}");
        assert_eq!(serde_json::from_str::<ClientCertPolicy>(&json).unwrap(), p);
    }
}
