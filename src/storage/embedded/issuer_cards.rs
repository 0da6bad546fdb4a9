//! [`IssuerCardStore`] on the embedded redb file: `iss_cards` (issuer, cardId) -> record JSON,
//! each write one transaction with its compare-and-set (`docs/storage.md`, "Issuer cards").

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::lifecycle::missing_is_empty;
use super::{EmbeddedStore, begin_write};
use crate::domain::issuer::IssuerId;
use crate::domain::issuer_cards::IssuerCard;
use crate::domain::ports::StoreError;
use crate::domain::ports::issuer_cards::IssuerCardStore;
use crate::storage::codec::issuers::{decode, encode};

const CARDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("iss_cards");

#[async_trait]
impl IssuerCardStore for EmbeddedStore {
    async fn get_card(
        &self,
        issuer: &IssuerId,
        card_id: &str,
    ) -> Result<Option<IssuerCard>, StoreError> {
        let (issuer, card_id) = (issuer.as_str().to_owned(), card_id.to_owned());
        self.run(move |db: &Database| {
            let txn = db.begin_read()?;
            let Some(t) = missing_is_empty(txn.open_table(CARDS))? else {
                return Ok(None);
            };
            t.get((issuer.as_str(), card_id.as_str()))?
                .map(|g| decode("issuer card", g.value()))
                .transpose()
        })
        .await
    }

    async fn put_card(&self, card: &IssuerCard) -> Result<(), StoreError> {
        let card = card.clone();
        self.run(move |db: &Database| {
            let txn = begin_write(db)?;
            {
                let mut t = txn.open_table(CARDS)?;
                let key = (card.issuer_id.as_str(), card.card_id.as_str());
                let cur: Option<IssuerCard> = t
                    .get(key)?
                    .map(|g| decode("issuer card", g.value()))
                    .transpose()?;
                match (&cur, card.version) {
                    (Some(_), 1) => return Err(StoreError::Conflict),
                    (None, 1) => {}
                    (None, _) => return Err(StoreError::NotFound),
                    (Some(c), v) if c.version.saturating_add(1) != v => {
                        return Err(StoreError::Conflict);
                    }
                    (Some(_), _) => {}
                }
                let json = encode("issuer card", &card)?;
                t.insert(key, json.as_slice())?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }
}
