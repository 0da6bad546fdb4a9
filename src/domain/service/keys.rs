//! The API-key use cases on [`Services`]: issue, list, revoke, and the scopes of a caller.

use std::time::Instant;

use time::OffsetDateTime;

use super::Services;
use crate::domain::apikeys::*;
use crate::domain::error::DomainError;
use crate::domain::merchant::NewApiKey;
use crate::domain::token::MerchantId;

impl Services {
    /// Issues a key for `merchant`; the secret is in the returned [`NewApiKey`], shown once.
    pub async fn create_api_key(
        &self,
        merchant: &MerchantId,
        name: &str,
        scopes: Scopes,
    ) -> Result<(ApiKeyRecord, NewApiKey), DomainError> {
        let keys = self.key_store()?;
        let name = validate_name(name)?;
        // Revoked keys do not count against the active limit: revoking is how a merchant (or
        // the admin, for a merchant locked out) makes room.
        let existing = keys.list_keys(merchant).await?;
        let active = existing.iter().filter(|k| k.revoked_at.is_none()).count();
        if active >= MAX_KEYS {
            return Err(DomainError::Validation {
                code: "too_many_api_keys",
                detail: format!(
                    "a merchant holds at most {MAX_KEYS} active keys; revoke one first"
                ),
            });
        }
        if existing.len() >= MAX_KEY_RECORDS {
            return Err(DomainError::Validation {
                code: "too_many_api_keys",
                detail: format!(
                    "a merchant has at most {MAX_KEY_RECORDS} key records, revoked ones included (they are kept for the audit trail)"
                ),
            });
        }
        let key = NewApiKey::generate();
        let rec = ApiKeyRecord {
            id: key_id(&key.hash),
            merchant_id: merchant.clone(),
            name,
            scopes,
            created_at: OffsetDateTime::now_utc(),
            revoked_at: None,
            last_used_at: None,
        };
        keys.insert_key(&rec, &key.hash).await?;
        Ok((rec, key))
    }

    /// Issues a key for an existing merchant on the admin's behalf: how a merchant that revoked
    /// its last `keys`-scoped key gets one again. [`DomainError::MerchantNotFound`] for an
    /// unknown merchant, checked before the scopes and name: an unknown merchant answers 404
    /// whatever the body, and only refusals for a merchant that exists reach its audit trail.
    pub async fn create_api_key_for_merchant(
        &self,
        merchant: &MerchantId,
        name: &str,
        scopes: &[String],
    ) -> Result<(ApiKeyRecord, NewApiKey), DomainError> {
        if self.store.get_merchant(merchant).await?.is_none() {
            return Err(DomainError::MerchantNotFound);
        }
        let scopes = parse_scopes(scopes)?;
        self.create_api_key(merchant, name, scopes).await
    }

    /// The merchant's keys (revoked ones included, marked), oldest first.
    pub async fn list_api_keys(
        &self,
        merchant: &MerchantId,
    ) -> Result<Vec<ApiKeyRecord>, DomainError> {
        let mut v = self.key_store()?.list_keys(merchant).await?;
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(v)
    }

    /// Revokes a key of the merchant; `Ok(None)` when it has no such key. Revoking a revoked key
    /// answers it unchanged. The caller may revoke the key it authenticated with, even its last
    /// `keys`-scoped one (then only the admin can help: docs/api.md).
    pub async fn revoke_api_key(
        &self,
        merchant: &MerchantId,
        id: &str,
    ) -> Result<Option<ApiKeyRecord>, DomainError> {
        let rec = self
            .key_store()?
            .revoke_key(merchant, id, OffsetDateTime::now_utc())
            .await?;
        if rec.is_some() {
            // Effective on this instance at once; elsewhere within the cache TTL.
            self.forget_cached_key(id);
        }
        Ok(rec)
    }

    fn key_store(
        &self,
    ) -> Result<&std::sync::Arc<dyn crate::domain::ports::apikeys::ApiKeyStore>, DomainError> {
        self.keys
            .as_ref()
            .ok_or_else(|| DomainError::Internal("no API key store configured".into()))
    }

    /// Best-effort `lastUsedAt`: at most one store write per key and [`LAST_USED_EVERY`] on
    /// this instance, made by the request that finds it due (awaited rather than spawned, so no
    /// detached task keeps the store open past shutdown); a failure is only logged.
    pub(crate) async fn note_key_used(&self, caller: &Principal) {
        let Some(keys) = &self.keys else { return };
        // The tenant id (an allocation) only when a touch is due: this runs on every request.
        let key_id = caller.key_id();
        let now = Instant::now();
        let due = match self.key_last_touch.get(key_id) {
            Some(t) => now.duration_since(*t) >= LAST_USED_EVERY,
            None => true,
        };
        if !due {
            return;
        }
        if self.key_last_touch.len() > 100_000 {
            self.key_last_touch.clear();
        }
        self.key_last_touch.insert(key_id.to_owned(), now);
        let (tenant, _) = caller.tenant_and_key();
        // Boxed: the once-a-minute write is not part of every request's future.
        if let Err(e) = Box::pin(keys.touch_key(&tenant, key_id, OffsetDateTime::now_utc())).await {
            tracing::debug!(key_id = %key_id, error = %e, "lastUsedAt not recorded");
        }
    }
}
