//! The issuer's cards as the gateway knows them ([`IssuerCardStore`], `domain::issuer_cards`):
//! one record per (issuer, D1 card id), kept from D1's card-operation notifications. Implemented
//! by `storage/redis/issuer_cards.rs` (the key under the issuer's hash tag `{i:<issuer id>}`) and
//! `storage/embedded/issuer_cards.rs` (one redb transaction); layout in `docs/storage.md`,
//! "Issuer cards".
//!
//! How the usual cases show up:
//! - **miss**: `Ok(None)`;
//! - **version conflict** (someone else wrote first, or a version-1 record already exists):
//!   [`StoreError::Conflict`], nothing written: re-read and retry;
//! - **update of a missing record**: [`StoreError::NotFound`].

use async_trait::async_trait;

use super::StoreError;
use crate::domain::issuer::IssuerId;
use crate::domain::issuer_cards::IssuerCard;

#[async_trait]
pub trait IssuerCardStore: Send + Sync + 'static {
    async fn get_card(
        &self,
        issuer: &IssuerId,
        card_id: &str,
    ) -> Result<Option<IssuerCard>, StoreError>;

    /// Compare-and-set: `card.version == 1` creates the record (a conflict if one exists);
    /// otherwise it replaces the record whose stored version is `card.version - 1`.
    async fn put_card(&self, card: &IssuerCard) -> Result<(), StoreError>;
}
