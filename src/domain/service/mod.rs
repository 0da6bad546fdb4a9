//! Use cases: onboard merchants, authenticate API keys, tokenize cards, read tokens, create
//! cryptograms and drive the token lifecycle. Sequences the vault, the store and D1.
//!
//! Failure rules that keep the store truthful:
//! - A token is reserved (`PENDING`, with its dedup index) before D1 is called, so two
//!   concurrent requests for the same card produce one D1 call and one token.
//! - If D1 definitely did not create a token (4xx, 429/503, circuit open), the reservation is
//!   removed: nothing half-written remains.
//! - If the outcome is unknown (timeout, 5xx), the `PENDING` reservation stays. A retry of the same
//!   card finds it and re-drives D1 with the **same** request id, which D1 treats as the same
//!   tokenization, so a retry never yields a second network token.

mod keys;
mod wallets;
use std::sync::Arc;
use std::time::{Duration, Instant};
pub use wallets::{CustomerDeletion, MAX_DELETES_PER_CALL};

use dashmap::DashMap;
use time::OffsetDateTime;

use super::apikeys::{ApiKeyRecord, Caller, IssuerCaller, Principal, Scopes, TenantKind, key_id};
use super::error::{DomainError, ProviderError};
use super::merchant::{ApiKeyHash, Merchant, NewApiKey};
use super::provider::{
    Amount, Cryptogram, LifecycleAction, NetworkTokenProvider, ProviderToken, TransactionType,
};
use super::recurring::{AgreementInput, RecurringAgreement};
use super::token::{
    CardMeta, MerchantId, NetworkTokenMeta, TokenId, TokenRecord, TokenStatus, Usage,
};
use crate::crypto::Keyring;
use crate::domain::ports::apikeys::ApiKeyStore;
use crate::domain::ports::outbox::EventAppend;
use crate::domain::ports::{CheckAt, InsertOutcome, StoreError, TokenStore};
use tokengate_cards::{Expiry, Pan};

impl From<StoreError> for DomainError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "store unavailable");
                DomainError::StoreUnavailable
            }
            StoreError::Conflict => DomainError::Conflict,
            StoreError::NotFound => DomainError::TokenNotFound,
            StoreError::Corrupt(msg) => DomainError::Internal(format!("corrupt record: {msg}")),
        }
    }
}

/// Shared handles the use cases need.
#[derive(Clone)]
pub struct Services {
    pub store: Arc<dyn TokenStore>,
    pub keyring: Arc<Keyring>,
    pub provider: Option<Arc<dyn NetworkTokenProvider>>,
    api_key_cache: Arc<DashMap<ApiKeyHash, (Principal, Instant)>>,
    api_key_cache_ttl: Duration,
    /// Reconciliation schedule kept in step with token writes (`None`: reconciliation off).
    schedule: Option<super::schedule::Schedule>,
    /// Merchant webhooks, told about every token change made here (`None`: no webhooks).
    pub webhooks: Option<Arc<super::webhooks::WebhookService>>,
    /// The audit trail (`None` only in setups that build services without one).
    pub audit: Option<Arc<super::audit::AuditLog>>,
    /// API key records: names, scopes, revocation (`None`: every key has the default scopes
    /// and keys cannot be managed).
    pub keys: Option<Arc<dyn ApiKeyStore>>,
    /// Issuer records, for keys of issuers (`None`: issuer keys do not authenticate).
    pub issuers: Option<Arc<dyn crate::domain::ports::issuers::IssuerStore>>,
    /// When each key's `lastUsedAt` was last written from this instance (`domain::apikeys`).
    pub(crate) key_last_touch: Arc<DashMap<String, Instant>>,
    /// Set once the store said its wallet index is complete (it never becomes incomplete
    /// again), so wallet requests stop asking the store (`wallets.rs`).
    pub(crate) wallet_index_ready: Arc<std::sync::atomic::AtomicBool>,
    /// The phase of the fingerprint re-index as this instance last read it
    /// (`domain::fp_reindex`): whether tokenize still indexes new records under the previous
    /// fingerprint keys, and still looks cards up under them.
    pub fp_reindex_phase: Arc<super::fp_reindex::PhaseFlag>,
}

/// A card as submitted for tokenization.
pub struct TokenizeCommand {
    pub pan: Pan,
    pub expiry_month: u8,
    pub expiry_year: u16,
    pub usage: Usage,
    pub customer_reference: Option<String>,
}

/// A cryptogram as issued, with the recurring agreement it is for: an `MIT` of a token with a
/// recorded agreement carries its network transaction id (`domain::recurring`); a `CIT` never.
#[derive(Debug)]
pub struct IssuedCryptogram {
    pub cryptogram: Cryptogram,
    pub agreement: Option<RecurringAgreement>,
}

/// Whether tokenization created a token or found the merchant's existing one for this card.
#[derive(Debug)]
pub enum Tokenized {
    /// Boxed: the dedup hit's `Result<Tokenized, _>` stays pointer-sized.
    Created(Box<TokenRecord>),
    /// Shared with the store's coherent cache on a dedup hit: the caller only reads it, so the
    /// record is not copied (docs/performance.md, GET and dedup round 4).
    Existing(Arc<TokenRecord>),
}

/// How many times a read-modify-write is retried on a version conflict before giving up.
const CAS_ATTEMPTS: usize = 5;
/// A `PENDING` token with no D1 answer younger than this is assumed to be in flight elsewhere.
const REDRIVE_AFTER: Duration = Duration::from_secs(2);

impl Services {
    pub fn new(
        store: Arc<dyn TokenStore>,
        keyring: Arc<Keyring>,
        provider: Option<Arc<dyn NetworkTokenProvider>>,
        api_key_cache_ttl: Duration,
    ) -> Services {
        Services {
            store,
            keyring,
            provider,
            api_key_cache: Arc::new(DashMap::new()),
            api_key_cache_ttl,
            schedule: None,
            webhooks: None,
            audit: None,
            keys: None,
            issuers: None,
            key_last_touch: Arc::new(DashMap::new()),
            wallet_index_ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            fp_reindex_phase: Arc::new(super::fp_reindex::PhaseFlag::default()),
        }
    }

    /// Keeps API key records (scopes, revocation) in `keys`.
    pub fn with_keys(mut self, keys: Arc<dyn ApiKeyStore>) -> Services {
        self.keys = Some(keys);
        self
    }

    /// Authenticates issuer keys against the issuer records in `issuers`.
    pub fn with_issuers(
        mut self,
        issuers: Arc<dyn crate::domain::ports::issuers::IssuerStore>,
    ) -> Services {
        self.issuers = Some(issuers);
        self
    }

    /// Drops the cached authentication of the key `key_id` (it was just revoked).
    pub(crate) fn forget_cached_key(&self, key_id: &str) {
        self.api_key_cache.retain(|_, (c, _)| c.key_id() != key_id);
    }

    /// Records audited actions in `audit`.
    pub fn with_audit(mut self, audit: Arc<super::audit::AuditLog>) -> Services {
        self.audit = Some(audit);
        self
    }

    /// Emits merchant webhook events for the token changes made by these services.
    pub fn with_webhooks(mut self, webhooks: Arc<super::webhooks::WebhookService>) -> Services {
        self.webhooks = Some(webhooks);
        self
    }

    /// The merchant webhook event of a change from `before` to `after`, to be stored by the
    /// write of `after` itself (`update_token_with` / `apply_event_with`), so the change and
    /// its event are one atomic step. `None`: no webhooks configured, no event for this change,
    /// or no endpoint listens. An error (the endpoints could not be read) fails the change
    /// before anything is written: the caller answers 503 and a retry does it all again.
    pub(crate) async fn webhook_event(
        &self,
        before: &TokenRecord,
        after: &TokenRecord,
    ) -> Result<Option<EventAppend>, DomainError> {
        match &self.webhooks {
            Some(w) => w.event_for(before, after).await,
            None => Ok(None),
        }
    }

    /// After a write stored `event`: wakes the delivery worker.
    pub(crate) fn webhook_stored(&self, event: Option<&EventAppend>) {
        if let (Some(w), Some(e)) = (&self.webhooks, event) {
            w.event_stored(e);
        }
    }

    /// Keeps `schedule` (reconciliation, `domain::reconcile`) in step with token writes.
    pub fn with_schedule(mut self, schedule: super::schedule::Schedule) -> Services {
        self.schedule = Some(schedule);
        self
    }

    /// The check a write of `rec` carries (`Schedule::check_for`); `Unchanged` when
    /// reconciliation is off.
    fn check_for(&self, rec: &TokenRecord) -> CheckAt {
        self.schedule
            .as_ref()
            .map_or(CheckAt::Unchanged, |s| s.check_for(rec))
    }

    /// Best-effort: a failed schedule write is logged by the schedule, never fails the request.
    async fn note_schedule(&self, rec: &TokenRecord) {
        if let Some(s) = &self.schedule {
            s.note(rec).await;
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn provider(&self) -> Result<&Arc<dyn NetworkTokenProvider>, DomainError> {
        self.provider
            .as_ref()
            .ok_or(DomainError::Upstream(ProviderError::NotConfigured))
    }

    // --- merchants ------------------------------------------------------------------------

    /// Onboards a merchant (at D1 too, when configured) and issues its first API key.
    pub async fn create_merchant(&self, name: &str) -> Result<(Merchant, NewApiKey), DomainError> {
        let name = name.trim();
        // A card number in the name would be stored in clear and shown back: refused too.
        if name.is_empty()
            || name.chars().count() > 200
            || name.chars().any(char::is_control)
            || tokengate_cards::contains_pan(name)
        {
            return Err(DomainError::Validation {
                code: "invalid_merchant_name",
                detail: "name must be 1 to 200 printable characters, without a card number".into(),
            });
        }
        let d1_merchant_id = match &self.provider {
            Some(p) => Some(p.onboard_merchant(name).await?),
            None => None,
        };
        let merchant = Merchant {
            id: MerchantId::generate(),
            name: name.to_owned(),
            d1_merchant_id,
            created_at: Self::now(),
        };
        let key = NewApiKey::generate();
        self.store.insert_merchant(&merchant, &key.hash).await?;
        if let Some(keys) = &self.keys {
            let rec = ApiKeyRecord {
                id: key_id(&key.hash),
                merchant_id: merchant.id.clone(),
                name: "default".to_owned(),
                scopes: Scopes::default_for_merchant_key(),
                created_at: merchant.created_at,
                revoked_at: None,
                last_used_at: None,
            };
            // Without it the key still works: its record is written on first use (below).
            if let Err(e) = keys.insert_key(&rec, &key.hash).await {
                tracing::warn!(merchant_id = %merchant.id, error = %e, "first key record not stored");
            }
        }
        Ok((merchant, key))
    }

    /// The caller `api_key` authenticates (merchant, key id, scopes), or `None` for an unknown
    /// or revoked key. Cached for `auth.api_key_cache_ttl_ms`: every request authenticates, and
    /// a store round trip per request for a mapping that rarely changes is waste (it is also
    /// how long a revocation takes to reach other instances).
    pub async fn authenticate(&self, api_key: &str) -> Result<Option<Caller>, DomainError> {
        Ok(match self.authenticate_any(api_key).await? {
            Some(Principal::Merchant(c)) => Some(c),
            _ => None,
        })
    }

    /// [`Services::authenticate`] for either kind of tenant: a merchant's key or an issuer's.
    pub async fn authenticate_any(&self, api_key: &str) -> Result<Option<Principal>, DomainError> {
        let hash = ApiKeyHash::of(api_key);
        if let Some(entry) = self.api_key_cache.get(&hash)
            && entry.1.elapsed() < self.api_key_cache_ttl
        {
            let caller = entry.0.clone();
            drop(entry);
            self.note_key_used(&caller).await;
            return Ok(Some(caller));
        }
        // Boxed: the store lookups of a cache miss are not part of every request's future.
        let found = Box::pin(self.lookup_key(&hash)).await?;
        match &found {
            Some(c) => {
                // Bound the cache: a flood of distinct valid keys cannot grow it without limit.
                if self.api_key_cache.len() > 100_000 {
                    self.api_key_cache.clear();
                }
                self.api_key_cache.insert(hash, (c.clone(), Instant::now()));
                self.note_key_used(c).await;
            }
            None => {
                self.api_key_cache.remove(&hash);
            }
        }
        Ok(found)
    }

    /// The key's record decides (revoked: `None`); a key without one is a key issued before
    /// records existed: it gets the default scopes, and a record so it can be listed and
    /// revoked (best-effort, and never over a record written meanwhile).
    async fn lookup_key(&self, hash: &ApiKeyHash) -> Result<Option<Principal>, DomainError> {
        if let Some(keys) = &self.keys
            && let Some(rec) = keys.key_by_hash(hash).await?
        {
            if rec.revoked_at.is_some() {
                return Ok(None);
            }
            if rec.tenant() == TenantKind::Issuer {
                let (Some(issuers), Some(id)) = (
                    &self.issuers,
                    crate::domain::issuer::IssuerId::from_tenant(&rec.merchant_id),
                ) else {
                    return Ok(None);
                };
                let Some(issuer) = issuers.get_issuer(&id).await? else {
                    return Ok(None);
                };
                return Ok(Some(Principal::Issuer(IssuerCaller {
                    issuer,
                    key_id: rec.id,
                    scopes: rec.scopes,
                })));
            }
            let Some(merchant) = self.store.get_merchant(&rec.merchant_id).await? else {
                return Ok(None);
            };
            return Ok(Some(Principal::Merchant(Caller {
                merchant: Arc::new(merchant),
                key_id: rec.id,
                scopes: rec.scopes,
            })));
        }
        let Some(merchant) = self.store.merchant_by_api_key(hash).await? else {
            return Ok(None);
        };
        let caller = Caller {
            key_id: key_id(hash),
            scopes: Scopes::default_for_merchant_key(),
            merchant: Arc::new(merchant),
        };
        if let Some(keys) = &self.keys {
            let rec = ApiKeyRecord {
                id: caller.key_id.clone(),
                merchant_id: caller.merchant.id.clone(),
                name: "default".to_owned(),
                scopes: caller.scopes,
                created_at: caller.merchant.created_at,
                revoked_at: None,
                last_used_at: None,
            };
            match keys.insert_key(&rec, hash).await {
                Ok(true) => {}
                // A record with this id exists (written meanwhile, or its hash index entry is
                // missing): it decides.
                Ok(false) => {
                    let rec = keys
                        .list_keys(&caller.merchant.id)
                        .await?
                        .into_iter()
                        .find(|r| r.id == caller.key_id);
                    return Ok(match rec {
                        Some(r) if r.revoked_at.is_none() => Some(Principal::Merchant(Caller {
                            scopes: r.scopes,
                            ..caller
                        })),
                        _ => None,
                    });
                }
                Err(e) => {
                    tracing::warn!(key_id = %rec.id, error = %e, "legacy key record not stored")
                }
            }
        }
        Ok(Some(Principal::Merchant(caller)))
    }

    // --- tokens -----------------------------------------------------------------------------

    pub async fn tokenize(
        &self,
        merchant: &Merchant,
        cmd: TokenizeCommand,
    ) -> Result<Tokenized, DomainError> {
        let now = Self::now();
        let expiry = Expiry::new(cmd.expiry_month, cmd.expiry_year, now)?;
        if let Some(r) = &cmd.customer_reference {
            // The same rule as the wallet routes, which look tokens up by it.
            super::wallet::check_customer_reference(r)?;
        }
        // Dedup looks up the PAN-only fingerprint: the one HMAC a dedup hit needs (a new card
        // computes both, in `tokenize_new`; its `pan` entry is this same value).
        let pan_fp = self.keyring.pan_fingerprint(&merchant.id, &cmd.pan);

        // Dedup hit: the common case for returning customers, one store read (often none: the
        // store's coherent cache, `TokenStore::read_by_fingerprint`).
        if let Some(existing) = self
            .store
            .read_by_fingerprint(&merchant.id, &pan_fp)
            .await?
        {
            return self.on_existing(merchant, existing, &cmd.pan, expiry).await;
        }
        // Not known under the current key: the cold path (a new card, or a rotation), boxed so
        // a dedup hit's future does not carry its state (D1 call, sealing, writes).
        Box::pin(self.tokenize_new(merchant, cmd, expiry, now)).await
    }

    /// [`Services::tokenize`] for a card not indexed under the current fingerprint key.
    async fn tokenize_new(
        &self,
        merchant: &Merchant,
        cmd: TokenizeCommand,
        expiry: Expiry,
        now: OffsetDateTime,
    ) -> Result<Tokenized, DomainError> {
        let mut fps = self.keyring.fingerprints(&merchant.id, &cmd.pan, &expiry);
        // A fingerprint-key rotation whose re-index is not known to be complete: the card may
        // be indexed under a previous key only, so look there too. Until the re-index cleans
        // up, a new record is indexed under those keys as well, so the reservation below
        // checks them all atomically and instances still on a previous key find it.
        let phase = &self.fp_reindex_phase;
        if phase.lookup_previous() && self.keyring.previous_fingerprint_key_ids().next().is_some() {
            let previous = self
                .keyring
                .previous_pan_fingerprints(&merchant.id, &cmd.pan);
            for fp in &previous {
                if let Some(existing) = self.store.read_by_fingerprint(&merchant.id, fp).await? {
                    return self.on_existing(merchant, existing, &cmd.pan, expiry).await;
                }
            }
            if phase.index_previous() {
                fps.previous = previous;
            }
        }

        let id = TokenId::generate();
        let mut rec = TokenRecord {
            sealed_pan: self.keyring.seal(&cmd.pan, &merchant.id, &id),
            id,
            merchant_id: merchant.id.clone(),
            usage: cmd.usage,
            status: TokenStatus::Pending,
            card: CardMeta {
                brand: cmd.pan.brand(),
                bin: cmd.pan.bin().to_owned(),
                last4: cmd.pan.last4().to_owned(),
                expiry,
            },
            network_token: None,
            customer_reference: cmd.customer_reference,
            fingerprints: fps,
            created_at: now,
            updated_at: now,
            last_event_at: None,
            recurring_agreement: None,
            version: 1,
        };
        // Scheduled with the reservation itself, before D1 is called: if we die mid-call,
        // reconciliation finds the reservation and asks D1 what became of it. (Without D1 there
        // is nothing to reconcile.)
        let check = match self.provider {
            Some(_) => self.check_for(&rec),
            None => CheckAt::Unchanged,
        };
        if let InsertOutcome::Existing(existing) =
            self.store.insert_token_scheduled(&rec, check).await?
        {
            // Lost a race with a concurrent request for the same card.
            return self
                .on_existing(merchant, Arc::new(*existing), &cmd.pan, expiry)
                .await;
        }
        crate::observability::token_transition(None, Some(rec.status.label()));
        if self.provider.is_none() {
            return Ok(Tokenized::Created(Box::new(rec)));
        }
        match self.drive_create(merchant, &rec, &cmd.pan, &expiry).await {
            Ok(pt) => {
                let reserved = rec.clone();
                apply_provider_token(&mut rec, &pt, Self::now());
                let rec = self.save_after_create(&reserved, rec).await?;
                Ok(Tokenized::Created(Box::new(rec)))
            }
            Err(e) => {
                if definitely_not_created(&e) {
                    match self.store.remove_token(&merchant.id, &rec.id).await {
                        Ok(()) => {
                            crate::observability::token_transition(Some(rec.status.label()), None)
                        }
                        Err(se) => {
                            tracing::warn!(token_id = %rec.id, error = %se, "could not remove failed reservation")
                        }
                    }
                } else {
                    tracing::warn!(token_id = %rec.id, error = %e, "D1 outcome unknown; token left PENDING for retry or reconciliation");
                }
                Err(e.into())
            }
        }
    }

    async fn drive_create(
        &self,
        merchant: &Merchant,
        rec: &TokenRecord,
        pan: &Pan,
        expiry: &Expiry,
    ) -> Result<ProviderToken, ProviderError> {
        let provider = self.provider.as_ref().ok_or(ProviderError::NotConfigured)?;
        let d1_merchant =
            merchant
                .d1_merchant_id
                .as_deref()
                .ok_or_else(|| ProviderError::Rejected {
                    status: 409,
                    code: "MERCHANT_NOT_ONBOARDED".into(),
                })?;
        // Our token id is the D1 request id: stable across every retry of this tokenization.
        provider
            .create_token(d1_merchant, pan, expiry, rec.usage, rec.id.as_str())
            .await
    }

    /// Writes the D1 result onto the reserved record (`reserved`, as stored), with the
    /// `token.activated` event in the same atomic write; if a notification got there first
    /// (version conflict), merges onto the newer record instead of overwriting it (that
    /// notification's write carried its own event). Whichever path moves the reservation out of
    /// `PENDING` (this one, a retry's re-drive, a notification, reconciliation) is one
    /// compare-and-set, so the event is stored exactly once; a failed write (503) stores
    /// neither, and the path that later wins stores both. The token's next reconciliation
    /// check goes in that same write; after a conflict it is noted for the newer record.
    async fn save_after_create(
        &self,
        reserved: &TokenRecord,
        mut rec: TokenRecord,
    ) -> Result<TokenRecord, DomainError> {
        rec.version += 1;
        let check = self.check_for(&rec);
        // A merchant without webhook endpoints (the usual case) needs no endpoint read: the
        // store writes only if there is still no endpoint, checked in the write itself, so
        // the answer is the one a read just before the write would give. If it finds one,
        // nothing was written and the general path below reads them and builds the event.
        let written = match &self.webhooks {
            Some(w) if w.try_without_endpoint_read(reserved, &rec) => {
                match self.store.update_token_if_no_endpoints(&rec, check).await {
                    Ok(written) => written,
                    Err(e) => return self.after_create_conflict(&rec, e).await,
                }
            }
            _ => false,
        };
        if written {
            crate::observability::token_transition(
                Some(TokenStatus::Pending.label()),
                Some(rec.status.label()),
            );
            return Ok(rec);
        }
        let event = self.webhook_event(reserved, &rec).await?;
        match self
            .store
            .update_token_scheduled(&rec, event.as_ref(), check)
            .await
        {
            Ok(()) => {
                self.webhook_stored(event.as_ref());
                // The CAS replaced the version we reserved (or re-drove): a PENDING record.
                crate::observability::token_transition(
                    Some(TokenStatus::Pending.label()),
                    Some(rec.status.label()),
                );
                Ok(rec)
            }
            Err(e) => self.after_create_conflict(&rec, e).await,
        }
    }

    /// [`Services::save_after_create`]'s failed write: on a version conflict (a notification
    /// got there first) the newer record, with its check noted; any other error as is.
    async fn after_create_conflict(
        &self,
        rec: &TokenRecord,
        e: StoreError,
    ) -> Result<TokenRecord, DomainError> {
        match e {
            StoreError::Conflict => {
                let newer = self
                    .get_token(&rec.merchant_id, &rec.id)
                    .await?
                    .ok_or(DomainError::TokenNotFound)?;
                self.note_schedule(&newer).await;
                Ok(newer)
            }
            e => Err(e.into()),
        }
    }

    /// The merchant's existing token for the card. The usual answer is the record as read
    /// (shared, not copied); a reissued card or a stale reservation takes the boxed cold path.
    async fn on_existing(
        &self,
        merchant: &Merchant,
        existing: Arc<TokenRecord>,
        pan: &Pan,
        expiry: Expiry,
    ) -> Result<Tokenized, DomainError> {
        let reissued = existing.card.expiry != expiry && !existing.status.is_terminal();
        // Checked again after the expiry refresh below (which does not change these fields,
        // except by re-reading a newer record on a conflict).
        let maybe_stale = existing.status == TokenStatus::Pending
            && existing.network_token.is_none()
            && self.provider.is_some();
        if !reissued && !maybe_stale {
            return Ok(Tokenized::Existing(existing));
        }
        let rec =
            Box::pin(self.refresh_existing(merchant, Arc::unwrap_or_clone(existing), pan, expiry))
                .await?;
        Ok(Tokenized::Existing(Arc::new(rec)))
    }

    /// [`Services::on_existing`]'s writes: a reissued card's new expiry, a stale reservation's
    /// re-drive.
    async fn refresh_existing(
        &self,
        merchant: &Merchant,
        mut existing: TokenRecord,
        pan: &Pan,
        expiry: Expiry,
    ) -> Result<TokenRecord, DomainError> {
        // A reissued card (same PAN, new expiry) is the same card: keep the token, refresh expiry.
        if existing.card.expiry != expiry && !existing.status.is_terminal() {
            let mut fps = self.keyring.fingerprints(&merchant.id, pan, &expiry);
            // Index entries under other fingerprint keys stay until the re-index completes.
            fps.carry_over(&existing.fingerprints);
            existing.card.expiry = expiry;
            existing.fingerprints = fps;
            existing.updated_at = Self::now();
            existing.version += 1;
            match self.store.update_token(&existing).await {
                Ok(()) => {}
                Err(StoreError::Conflict) => {
                    existing = self
                        .store
                        .get_token(&merchant.id, &existing.id)
                        .await?
                        .ok_or(DomainError::TokenNotFound)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // A reservation whose D1 call ended in an unknown outcome: re-drive it with the same
        // request id (D1 answers with the token it already made, or makes the one it didn't).
        let stale_pending = existing.status == TokenStatus::Pending
            && existing.network_token.is_none()
            && (Self::now() - existing.created_at) > REDRIVE_AFTER;
        if stale_pending && self.provider.is_some() {
            let pt = self.drive_create(merchant, &existing, pan, &expiry).await?;
            let reserved = existing.clone();
            apply_provider_token(&mut existing, &pt, Self::now());
            existing = self.save_after_create(&reserved, existing).await?;
        }
        Ok(existing)
    }

    pub async fn get_token(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<Option<TokenRecord>, DomainError> {
        Ok(self.store.get_token(merchant, id).await?)
    }

    /// A token as a client reads it (`GET /v1/tokens/{id}`): may come from the store's coherent
    /// cache ([`TokenStore::read_token`]). Not for a read that a write follows.
    pub async fn read_token(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<Option<Arc<TokenRecord>>, DomainError> {
        Ok(self.store.read_token(merchant, id).await?)
    }

    async fn require_token(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<TokenRecord, DomainError> {
        self.get_token(merchant, id)
            .await?
            .ok_or(DomainError::TokenNotFound)
    }

    /// Token credentials and a fresh cryptogram for one card-not-present authorization.
    pub async fn create_cryptogram(
        &self,
        merchant: &Merchant,
        id: &TokenId,
        transaction_type: TransactionType,
        amount: Option<Amount>,
    ) -> Result<IssuedCryptogram, DomainError> {
        if let Some(a) = &amount
            && (a.currency.len() != 3 || !a.currency.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(DomainError::Validation {
                code: "invalid_amount",
                detail: "amount.currency must be an ISO 4217 code such as EUR".into(),
            });
        }
        let rec = self.require_token(&merchant.id, id).await?;
        if rec.status != TokenStatus::Active {
            return Err(DomainError::TokenState(rec.status));
        }
        let nt = rec
            .network_token
            .as_ref()
            .ok_or_else(|| DomainError::TokenState(rec.status.clone()))?;
        let d1_merchant = merchant
            .d1_merchant_id
            .as_deref()
            .ok_or_else(|| DomainError::Internal("merchant has no D1 id".into()))?;
        let cryptogram = self
            .provider()?
            .create_cryptogram(
                d1_merchant,
                &nt.d1_token_id,
                transaction_type,
                amount.as_ref(),
            )
            .await?;
        // The scheme wants the initial CIT's id on MITs only; a CIT starts its own chain.
        let agreement = match transaction_type {
            TransactionType::Mit => rec.recurring_agreement,
            TransactionType::Cit => None,
        };
        Ok(IssuedCryptogram {
            cryptogram,
            agreement,
        })
    }

    // --- recurring agreements (domain::recurring) -------------------------------------------

    /// Records (or replaces) the token's recurring agreement. Every field is validated before
    /// the token is read; only an `ACTIVE` token takes one. Recording the same terms again
    /// writes nothing and answers the agreement as first recorded, so a repeated `PUT` is a
    /// no-op with the same answer.
    pub async fn record_agreement(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
        input: AgreementInput,
    ) -> Result<RecurringAgreement, DomainError> {
        let agreement = input.validate(Self::now())?;
        let mut refused: Option<TokenStatus> = None;
        let rec = self
            .update_token(merchant, id, |r| {
                if r.status != TokenStatus::Active {
                    refused = Some(r.status.clone());
                    return false;
                }
                refused = None;
                if r.recurring_agreement
                    .as_ref()
                    .is_some_and(|a| a.same_terms(&agreement))
                {
                    return false;
                }
                r.recurring_agreement = Some(agreement.clone());
                true
            })
            .await?;
        if let Some(status) = refused {
            return Err(DomainError::TokenState(status));
        }
        rec.recurring_agreement
            .ok_or_else(|| DomainError::Internal("agreement missing after its write".into()))
    }

    /// The token's recurring agreement, if one is recorded (any status).
    pub async fn get_agreement(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<Option<RecurringAgreement>, DomainError> {
        Ok(self.require_token(merchant, id).await?.recurring_agreement)
    }

    /// Ends the token's recurring agreement, whatever the token's status (a customer may cancel
    /// while the card is suspended). Without one, nothing is written: ending is idempotent.
    pub async fn end_agreement(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<(), DomainError> {
        self.update_token(merchant, id, |r| r.recurring_agreement.take().is_some())
            .await?;
        Ok(())
    }

    /// Suspends, resumes or deletes a token at D1, then records the new status.
    pub async fn lifecycle(
        &self,
        merchant: &Merchant,
        id: &TokenId,
        action: LifecycleAction,
    ) -> Result<TokenRecord, DomainError> {
        let rec = self.require_token(&merchant.id, id).await?;
        let target = match action {
            LifecycleAction::Suspend => TokenStatus::Suspended,
            LifecycleAction::Resume => TokenStatus::Active,
            LifecycleAction::Delete => TokenStatus::Deleted,
        };
        if rec.status == target {
            return Ok(rec); // already there: idempotent
        }
        if rec.status.is_terminal() {
            return Err(DomainError::TokenState(rec.status));
        }
        let allowed = match action {
            LifecycleAction::Suspend => rec.status == TokenStatus::Active,
            LifecycleAction::Resume => rec.status == TokenStatus::Suspended,
            LifecycleAction::Delete => true,
        };
        if !allowed {
            return Err(DomainError::TokenState(rec.status));
        }
        let upstream = match (&rec.network_token, &merchant.d1_merchant_id, &self.provider) {
            (Some(nt), Some(d1m), Some(p)) => Some(p.lifecycle(d1m, &nt.d1_token_id, action).await),
            _ => None,
        };
        let pt = match upstream {
            Some(Ok(pt)) => Some(pt),
            // D1 no longer knows the token: for a delete that is the goal reached.
            Some(Err(ProviderError::NotFound)) if action == LifecycleAction::Delete => None,
            Some(Err(e)) => return Err(e.into()),
            None if action == LifecycleAction::Delete => None,
            None => return Err(DomainError::TokenState(rec.status)),
        };
        // `update_token` stores the change's webhook event with the write that wins.
        let rec = self
            .update_token(&merchant.id, id, |r| {
                match &pt {
                    Some(pt) => apply_provider_token(r, pt, Self::now()),
                    None => r.status = target.clone(),
                }
                // The agreement goes with a deleted token: nothing can be charged on it again.
                if r.status.is_terminal() {
                    r.recurring_agreement = None;
                }
                true
            })
            .await?;
        self.note_schedule(&rec).await;
        Ok(rec)
    }

    /// Read-modify-write with optimistic concurrency; `f` returns false to skip writing. The
    /// change's merchant webhook event, if it has one, is stored by the same atomic write.
    pub async fn update_token<F>(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
        mut f: F,
    ) -> Result<TokenRecord, DomainError>
    where
        F: FnMut(&mut TokenRecord) -> bool + Send,
    {
        for _ in 0..CAS_ATTEMPTS {
            let mut rec = self.require_token(merchant, id).await?;
            let original = self.webhooks.is_some().then(|| rec.clone());
            let before = rec.status.clone();
            if !f(&mut rec) {
                return Ok(rec);
            }
            rec.version += 1;
            rec.updated_at = Self::now();
            let event = match &original {
                Some(original) => self.webhook_event(original, &rec).await?,
                None => None,
            };
            match self.store.update_token_with(&rec, event.as_ref()).await {
                Ok(()) => {
                    self.webhook_stored(event.as_ref());
                    crate::observability::token_transition(
                        Some(before.label()),
                        Some(rec.status.label()),
                    );
                    return Ok(rec);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(DomainError::Conflict)
    }
}

/// True when D1 certainly did not create a token, so the reservation can be dropped.
fn definitely_not_created(e: &ProviderError) -> bool {
    matches!(
        e,
        ProviderError::Rejected { .. }
            | ProviderError::Unavailable { .. }
            | ProviderError::NotConfigured
            | ProviderError::NotFound
    )
}

/// Copies what D1 says about a token onto our record. `DELETED` stays terminal.
pub fn apply_provider_token(rec: &mut TokenRecord, pt: &ProviderToken, now: OffsetDateTime) {
    if !rec.status.is_terminal() {
        rec.status = pt.status.clone();
    }
    let prev = rec.network_token.take();
    rec.network_token = Some(NetworkTokenMeta {
        d1_token_id: pt.d1_token_id.clone(),
        last4: pt
            .last4
            .clone()
            .or_else(|| prev.as_ref().and_then(|p| p.last4.clone())),
        expiry: pt.expiry.or_else(|| prev.as_ref().and_then(|p| p.expiry)),
        par: pt
            .par
            .clone()
            .or_else(|| prev.as_ref().and_then(|p| p.par.clone())),
    });
    rec.updated_at = now;
}
