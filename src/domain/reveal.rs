//! Card reveal: the PAN of a token, for PAN-fallback authorization when a network token cannot
//! be used. Only for keys with the `card:reveal` scope (checked at the HTTP edge), audited,
//! never cached or stored (docs/security.md).

use super::error::DomainError;
use super::service::Services;
use super::token::{MerchantId, TokenId, TokenStatus};
use tokengate_cards::{Expiry, Pan};

impl Services {
    /// The card behind a token of `merchant`. A `DELETED` token's card is not revealed (the
    /// merchant asked for it to be gone); other statuses are.
    pub async fn reveal_card(
        &self,
        merchant: &MerchantId,
        id: &TokenId,
    ) -> Result<(Pan, Expiry), DomainError> {
        let rec = self
            .get_token(merchant, id)
            .await?
            .ok_or(DomainError::TokenNotFound)?;
        if rec.status == TokenStatus::Deleted {
            return Err(DomainError::TokenState(rec.status));
        }
        let pan = self
            .keyring
            .open(&rec.sealed_pan, merchant, id)
            .map_err(|e| DomainError::Internal(format!("stored card cannot be opened: {e}")))?;
        Ok((pan, rec.card.expiry))
    }
}
