//! Customer wallets: a merchant's tokens of one customer (`customerReference`), listed for a
//! checkout and deleted together on a "forget me" request. The stores keep an index per
//! (merchant, customer) and per (merchant, customer, status label), maintained in the same atomic
//! step as every token write (`docs/storage.md`, "Customer wallets"), so a wallet is read without
//! walking the merchant's tokens.
//!
//! Order: newest first (creation time), ties broken by token id, descending. Both backends keep
//! the index ordered by [`WalletKey`], which is also the pagination cursor.

use std::fmt;

use super::error::DomainError;
use super::token::{TokenId, TokenRecord};
use crate::domain::ports::counts::COUNT_LABELS;

/// Name of the one-time wallet index backfill (its lease and saved progress, `LifecycleStore`
/// job state): it indexes tokens stored before the wallet index existed
/// (`domain::wallet_index`, `docs/storage.md`, "Customer wallets").
pub const BACKFILL_JOB: &str = "wallet-index-backfill";

/// Lower-case hex digits of the creation time (Unix ms) in a [`WalletKey`]: fixed width, so the
/// byte order of keys is the order of (time, token id) until the year 10889. Hex rather than
/// decimal: a long run of decimal digits in an answer looks like a card number to data-loss
/// scanners (and to the OpenAPI document's own check).
const MS_DIGITS: usize = 12;

/// The customer reference rule, shared by tokenization and the wallet routes: 1 to 128
/// characters, no control characters.
pub fn check_customer_reference(r: &str) -> Result<(), DomainError> {
    if r.is_empty() || r.len() > 128 || r.chars().any(char::is_control) {
        return Err(DomainError::Validation {
            code: "invalid_customer_reference",
            detail: "customerReference must be 1 to 128 printable characters".into(),
        });
    }
    // Kept in clear and shown in every answer and webhook about the token: never a card number.
    if tokengate_cards::contains_pan(r) {
        return Err(DomainError::Validation {
            code: "invalid_customer_reference",
            detail: "customerReference must not contain a card number".into(),
        });
    }
    Ok(())
}

/// The status label a wallet filter names: the labels of the token counts (`PENDING`, `ACTIVE`,
/// `SUSPENDED`, `INACTIVE`, `EXPIRED`, `DELETED`, and `OTHER` for any status D1 added). `None`
/// for anything else.
pub fn status_label(s: &str) -> Option<&'static str> {
    COUNT_LABELS.iter().copied().find(|l| *l == s)
}

/// A token's position in its customer's wallet: `<creation Unix ms, 12 hex digits>-<token id>`.
/// Byte order is (creation time, token id), so listing in reverse order is newest first. It is
/// what the index stores (a Redis sorted-set member, a redb key part) and the page cursor.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalletKey(String);

impl WalletKey {
    /// The position of `rec` (creation times before 1970 sort as 0).
    pub fn of(rec: &TokenRecord) -> WalletKey {
        let ms = u64::try_from(rec.created_at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        WalletKey(format!("{ms:0MS_DIGITS$x}-{}", rec.id))
    }

    /// Accepts only what [`WalletKey::of`] produces, so a client cursor cannot carry range
    /// syntax or separators into a store query.
    pub fn parse(s: &str) -> Option<WalletKey> {
        let (ms, id) = s.split_at_checked(MS_DIGITS)?;
        let id = id.strip_prefix('-')?;
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        (ms.bytes().all(hex) && TokenId::parse(id).is_some()).then(|| WalletKey(s.to_owned()))
    }

    /// The token id part.
    pub fn token_id(&self) -> Option<TokenId> {
        TokenId::parse(self.0.get(MS_DIGITS + 1..)?)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WalletKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One page of a customer's wallet, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalletPage {
    /// The tokens of the page. May hold fewer than the page size even when more follow: an
    /// index entry whose record is gone (or no longer matches) is skipped, not replaced.
    pub tokens: Vec<TokenRecord>,
    /// Where the next page starts (exclusive); `None` on the last page.
    pub next: Option<WalletKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_time_then_id_and_round_trip() {
        let a = TokenId::generate();
        let k = WalletKey(format!("{:012x}-{a}", 1_767_225_600_000u64));
        assert_eq!(WalletKey::parse(k.as_str()), Some(k.clone()));
        assert_eq!(k.token_id(), Some(a));
        let later = WalletKey(format!(
            "{:012x}-tok_AAAAAAAAAAAAAAAAAAAAAA",
            1_767_225_600_001u64
        ));
        assert!(later > k);
        // Byte order is numeric order across the digit/letter boundary of hex.
        assert!(format!("{:012x}", 9u64) < format!("{:012x}", 10u64));
        assert!(format!("{:012x}", 0xfu64) < format!("{:012x}", 0x10u64));
        for bad in [
            "",
            "19b76daa800-tok_x",
            "019b76daa800+tok_AAAAAAAAAAAAAAAAAAAAAA",
            "019B76DAA800-tok_AAAAAAAAAAAAAAAAAAAAAA",
            "019b76daa80g-tok_AAAAAAAAAAAAAAAAAAAAAA",
            "019b76daa800-tok_AAAAAAAAAAAAAAAAAAAA}{",
            "(019b76daa800-tok_AAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(WalletKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn customer_references_and_status_labels() {
        assert!(check_customer_reference("cust-42").is_ok());
        assert!(check_customer_reference("").is_err());
        assert!(check_customer_reference(&"x".repeat(129)).is_err());
        assert!(check_customer_reference("a\nb").is_err());
        assert_eq!(status_label("ACTIVE"), Some("ACTIVE"));
        assert_eq!(status_label("OTHER"), Some("OTHER"));
        assert_eq!(status_label("active"), None);
    }
}
