//! [`IssuerCardStore`] on Redis: `P:{i:<issuer id>}:card:<cardId>`, the record (JSON), under the
//! issuer's hash tag like its operations (`docs/storage.md`, "Issuer cards"). One key, written
//! by a compare-and-set script so two instances applying card changes cannot lose one.

use std::sync::LazyLock;

use async_trait::async_trait;
use redis::Script;

use super::RedisStore;
use crate::domain::issuer::IssuerId;
use crate::domain::issuer_cards::IssuerCard;
use crate::domain::ports::StoreError;
use crate::domain::ports::issuer_cards::IssuerCardStore;
use crate::storage::codec::issuers::{decode, encode};

/// KEYS: the card. ARGV: expected stored version (0: must not exist), JSON.
/// Returns 0 written, 1 missing, 2 conflict.
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '0' then
  if cur then return 2 end
else
  if not cur then return 1 end
  local c = cjson.decode(cur)
  if tonumber(c.version) ~= tonumber(ARGV[1]) then return 2 end
end
redis.call('SET', KEYS[1], ARGV[2])
return 0
"#,
    )
});

impl RedisStore {
    fn card_key(&self, issuer: &IssuerId, card_id: &str) -> String {
        self.global_key(&format!("{{i:{issuer}}}:card:{card_id}"))
    }
}

#[async_trait]
impl IssuerCardStore for RedisStore {
    async fn get_card(
        &self,
        issuer: &IssuerId,
        card_id: &str,
    ) -> Result<Option<IssuerCard>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.card_key(issuer, card_id));
        let json: Option<Vec<u8>> = self.query(cmd).await?;
        json.map(|j| decode("issuer card", &j)).transpose()
    }

    async fn put_card(&self, card: &IssuerCard) -> Result<(), StoreError> {
        let mut inv = PUT.key(self.card_key(&card.issuer_id, &card.card_id));
        inv.arg(card.version.saturating_sub(1))
            .arg(encode("issuer card", card)?);
        let r: i64 = self.invoke_write(inv).await?;
        match r {
            0 => Ok(()),
            1 => Err(StoreError::NotFound),
            _ => Err(StoreError::Conflict),
        }
    }
}
