//! Client certificates bound to merchants: [`ClientCertStore`], each merchant's policy (its
//! certificates and authentication mode, `domain::client_certs`) and an index fingerprint ->
//! merchant. Implemented for Redis (`redis_client_certs.rs`) and the embedded store
//! (`embedded_client_certs.rs`); layout in `docs/storage.md`.
//!
//! The policy is the truth; the index only finds it. Readers check that the merchant the index
//! names still lists the certificate, so an index entry left behind by an interrupted change
//! (Redis Cluster keeps the two in different slots) binds nothing, and a later binding of that
//! certificate to another merchant may take the entry over.

use async_trait::async_trait;

use super::StoreError;
use crate::domain::client_certs::{CertFingerprint, ClientCertPolicy};
use crate::domain::token::MerchantId;

/// Result of [`ClientCertStore::put_client_cert_policy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutPolicy {
    Stored,
    /// This certificate is bound to another merchant; nothing was changed.
    Taken(CertFingerprint),
}

#[async_trait]
pub trait ClientCertStore: Send + Sync + 'static {
    /// The merchant's stored policy; `None` when none was ever stored.
    async fn client_cert_policy(
        &self,
        merchant: &MerchantId,
    ) -> Result<Option<ClientCertPolicy>, StoreError>;

    /// The merchant the index names for this certificate. The caller must check that merchant's
    /// policy lists it (see the module docs).
    async fn merchant_by_client_cert(
        &self,
        fp: &CertFingerprint,
    ) -> Result<Option<MerchantId>, StoreError>;

    /// Replaces the merchant's policy and moves the index along: entries for its new
    /// certificates are claimed (refused with [`PutPolicy::Taken`] when another merchant's
    /// policy lists one), entries for certificates it no longer lists are dropped.
    async fn put_client_cert_policy(
        &self,
        policy: &ClientCertPolicy,
    ) -> Result<PutPolicy, StoreError>;
}
