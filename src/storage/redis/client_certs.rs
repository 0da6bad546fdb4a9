//! Client certificate policies on Redis:
//! - `P:{m:M}:client_certs`, a string: the merchant's policy JSON;
//! - `P:{cc:<sha256>}:merchant`, a string: the merchant id a certificate is bound to (tagged by
//!   the fingerprint, like the API key index, so it lives in its own slot).
//!
//! A change claims the index entries of the new certificates first (one single-key script
//! each), then writes the policy, then drops the entries of the certificates no longer listed.
//! Every step touches one key, so this works on Cluster; an interruption leaves at worst an
//! index entry that its merchant's policy does not list, which binds nothing (readers check the
//! policy) and which another merchant's binding may take over.

use std::collections::HashSet;
use std::sync::LazyLock;

use async_trait::async_trait;
use redis::Script;

use super::RedisStore;
use crate::domain::client_certs::{CertFingerprint, ClientCertPolicy};
use crate::domain::ports::StoreError;
use crate::domain::ports::client_certs::{ClientCertStore, PutPolicy};
use crate::domain::token::MerchantId;
use crate::storage::codec::client_certs::{decode, encode, parse_merchant};

/// Claims an index entry. KEYS: entry. ARGV: merchant id. Returns `+new` (claimed now), `+own`
/// (already this merchant's) or the id of the merchant holding it.
const CLAIM: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1])
  return '+new'
end
if cur == ARGV[1] then return '+own' end
return cur
"#;

/// Compare-and-set of an index entry. KEYS: entry. ARGV: expected holder, new holder.
const TAKE_OVER: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Deletes an index entry if it still names this merchant. KEYS: entry. ARGV: merchant id.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM));
static TAKE_OVER_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(TAKE_OVER));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));

fn policy_key(s: &RedisStore, m: &MerchantId) -> String {
    format!("{}client_certs", s.merchant_key_start(m))
}

fn index_key(s: &RedisStore, fp: &CertFingerprint) -> String {
    s.global_key(&format!("{{cc:{}}}:merchant", fp.as_str()))
}

impl RedisStore {
    async fn release_cert(&self, fp: &CertFingerprint, m: &MerchantId) -> Result<(), StoreError> {
        let key = index_key(self, fp);
        let mut inv = RELEASE_SCRIPT.key(&key);
        inv.arg(m.as_str());
        let _: i64 = self.invoke(inv).await?;
        Ok(())
    }

    /// Undoes the claims of a refused change. Best-effort: a leftover entry binds nothing.
    async fn release_all(&self, fps: &[CertFingerprint], m: &MerchantId) {
        for fp in fps {
            if let Err(e) = self.release_cert(fp, m).await {
                tracing::warn!(error = %e, "client certificate index entry not released");
            }
        }
    }
}

#[async_trait]
impl ClientCertStore for RedisStore {
    async fn client_cert_policy(
        &self,
        merchant: &MerchantId,
    ) -> Result<Option<ClientCertPolicy>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(policy_key(self, merchant));
        let json: Option<Vec<u8>> = self.query(cmd).await?;
        json.map(|j| decode(&j)).transpose()
    }

    async fn merchant_by_client_cert(
        &self,
        fp: &CertFingerprint,
    ) -> Result<Option<MerchantId>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(index_key(self, fp));
        let m: Option<String> = self.query(cmd).await?;
        m.map(|m| parse_merchant(&m)).transpose()
    }

    async fn put_client_cert_policy(
        &self,
        policy: &ClientCertPolicy,
    ) -> Result<PutPolicy, StoreError> {
        let m = &policy.merchant_id;
        let json = encode(policy)?;
        let before = self.client_cert_policy(m).await?;
        let mut claimed: Vec<CertFingerprint> = Vec::new();
        for c in &policy.certificates {
            let key = index_key(self, &c.sha256);
            let mut inv = CLAIM_SCRIPT.key(&key);
            inv.arg(m.as_str());
            let holder: String = match self.invoke_write(inv).await {
                Ok(h) => h,
                Err(e) => {
                    self.release_all(&claimed, m).await;
                    return Err(e);
                }
            };
            match holder.as_str() {
                "+new" => claimed.push(c.sha256.clone()),
                "+own" => {}
                other => {
                    // Bound elsewhere, unless that merchant's policy no longer lists it.
                    let other_m = parse_merchant(other)?;
                    let live = match self.client_cert_policy(&other_m).await {
                        Ok(p) => p.is_some_and(|p| p.cert(&c.sha256).is_some()),
                        Err(e) => {
                            self.release_all(&claimed, m).await;
                            return Err(e);
                        }
                    };
                    let taken = !live && {
                        let mut inv = TAKE_OVER_SCRIPT.key(&key);
                        inv.arg(other_m.as_str()).arg(m.as_str());
                        let swapped: Result<i64, _> = self.invoke_write(inv).await;
                        swapped? == 1
                    };
                    if !taken {
                        self.release_all(&claimed, m).await;
                        return Ok(PutPolicy::Taken(c.sha256.clone()));
                    }
                    claimed.push(c.sha256.clone());
                }
            }
        }
        let mut cmd = redis::cmd("SET");
        cmd.arg(policy_key(self, m)).arg(json);
        if let Err(e) = self.query_write::<()>(cmd).await {
            self.release_all(&claimed, m).await;
            return Err(e);
        }
        let kept: HashSet<&CertFingerprint> =
            policy.certificates.iter().map(|c| &c.sha256).collect();
        for old in before.iter().flat_map(|p| &p.certificates) {
            if !kept.contains(&old.sha256) {
                // A failure leaves an entry the policy no longer lists: it binds nothing.
                if let Err(e) = self.release_cert(&old.sha256, m).await {
                    tracing::warn!(error = %e, "dropped client certificate left in the index");
                }
            }
        }
        Ok(PutPolicy::Stored)
    }
}
