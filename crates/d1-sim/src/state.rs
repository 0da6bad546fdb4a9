//! In-memory simulator state: merchants, tokens, access tokens and the lifecycle rules.
//!
//! Everything sits behind one `std::sync::Mutex` that is never held across an `.await`: each
//! operation is a short critical section, and one lock makes "check the requestId, then insert"
//! atomic without a second index lock.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::Sha256;
use time::OffsetDateTime;
use tokengate_d1_protocol::model;
use zeroize::Zeroizing;

use tokengate_cards::{Expiry, Pan, luhn_valid};

/// Lifetime of the access tokens the OAuth endpoint issues (D1 documents 900 s).
pub const ACCESS_TOKEN_TTL: Duration = Duration::from_secs(900);

/// Length of the token PANs the simulator mints (the common Visa/Mastercard length).
const TOKEN_PAN_LEN: usize = 16;

/// Locks a mutex, recovering from poisoning: the state stays consistent because every critical
/// section either completes or changes nothing before it could panic.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Token status as the simulator drives it. The client must also cope with values it does not
/// know; the simulator itself only ever produces these four.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Pending,
    Active,
    Suspended,
    Deleted,
}

impl Status {
    /// The wire value (what `Serialize` writes), without a trip through `serde_json::Value`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Active => "ACTIVE",
            Status::Suspended => "SUSPENDED",
            Status::Deleted => "DELETED",
        }
    }
}

/// Everything about a token that may be shown to the gateway. The token PAN is deliberately not
/// here: it only ever leaves the simulator inside a JWE.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub token_id: String,
    pub request_id: String,
    pub status: Status,
    pub card_bin: String,
    pub card_last_digits: String,
    pub card_expiry_date: String,
    pub token_last_digits: String,
    pub token_expiry_date: String,
    pub par: String,
}

impl TokenInfo {
    /// The token object of the protocol. While `PENDING` only `tokenId` and `status` are given,
    /// as a real asynchronous tokenization would not know the rest yet.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.to_object()).unwrap_or_else(|_| json!({"tokenId": self.token_id}))
    }

    /// The shared wire type (`tokengate-d1-protocol`), so the simulator writes exactly what the
    /// client reads.
    pub fn to_object(&self) -> model::TokenObject {
        let status = self.status.as_str().to_owned();
        if self.status == Status::Pending {
            return model::TokenObject {
                token_id: self.token_id.clone(),
                status,
                ..Default::default()
            };
        }
        model::TokenObject {
            token_id: self.token_id.clone(),
            request_id: Some(self.request_id.clone()),
            status,
            card_bin: Some(self.card_bin.clone()),
            card_last_digits: Some(self.card_last_digits.clone()),
            card_expiry_date: Some(self.card_expiry_date.clone()),
            token_last_digits: Some(self.token_last_digits.clone()),
            token_expiry_date: Some(self.token_expiry_date.clone()),
            par: Some(self.par.clone()),
        }
    }
}

/// A stored token: its public view plus what only the simulator knows.
pub struct TokenRecord {
    pub info: TokenInfo,
    pub merchant_id: String,
    /// The token PAN, wiped when the record is dropped.
    pub token_number: Zeroizing<String>,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("info", &self.info)
            .field("merchant_id", &self.merchant_id)
            .field("token_number", &"<redacted>")
            .finish()
    }
}

/// A lifecycle action, from the D1 API (suspend/resume/delete) or the control API (all four).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Suspend,
    Resume,
    Delete,
    /// Card renewal: new card and token expiry (given, or three years past the current card
    /// expiry) and a new token PAN, hence new token last digits.
    Renew(Option<Expiry>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("unknown merchant")]
    MerchantNotFound,
    #[error("unknown token")]
    TokenNotFound,
    #[error("token is {0:?}; this operation needs another status")]
    InvalidState(Status),
}

/// Result of a create: a new token, or the one an earlier request with the same `requestId`
/// made (idempotency).
#[derive(Debug)]
pub enum Created {
    New(TokenInfo),
    Existing(TokenInfo),
}

/// The card as decrypted from `encryptedData`.
pub struct CardInput {
    pub pan: Pan,
    pub expiry: Expiry,
}

#[derive(Default)]
struct Inner {
    merchants: HashMap<String, String>,
    tokens: HashMap<String, TokenRecord>,
    /// (merchantId, requestId) -> tokenId: the idempotency index.
    by_request: HashMap<(String, String), String>,
    /// Token PANs in use, so two tokens never share a number.
    token_numbers: HashSet<String>,
    access_tokens: HashMap<String, Instant>,
}

/// The simulator's data.
pub struct Store {
    inner: Mutex<Inner>,
    token_bin_prefix: String,
    /// Key for deriving PARs from PANs: a PAR is stable per card (like the real one) without
    /// the simulator keeping a PAN-keyed table, and cannot be brute-forced back to the PAN.
    par_key: Zeroizing<[u8; 32]>,
}

impl Store {
    pub fn new(token_bin_prefix: String) -> Store {
        let mut par_key = Zeroizing::new([0u8; 32]);
        rand::fill(&mut par_key[..]);
        Store {
            inner: Mutex::new(Inner::default()),
            token_bin_prefix,
            par_key,
        }
    }

    /// Checks that a token BIN prefix leaves room for random digits and a check digit.
    pub fn valid_prefix(prefix: &str) -> bool {
        (1..=TOKEN_PAN_LEN - 4).contains(&prefix.len())
            && prefix.bytes().all(|b| b.is_ascii_digit())
    }

    pub fn add_merchant(&self, name: &str) -> String {
        let id = random_id("mer_", 12);
        lock(&self.inner)
            .merchants
            .insert(id.clone(), name.to_owned());
        id
    }

    pub fn has_merchant(&self, merchant_id: &str) -> bool {
        lock(&self.inner).merchants.contains_key(merchant_id)
    }

    /// An opaque access token valid for [`ACCESS_TOKEN_TTL`].
    pub fn issue_access_token(&self) -> String {
        let token = random_id("at_", 32);
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        // Expired tokens are purged here, so a long benchmark run does not grow the map.
        inner.access_tokens.retain(|_, exp| *exp > now);
        inner
            .access_tokens
            .insert(token.clone(), now + ACCESS_TOKEN_TTL);
        token
    }

    pub fn access_token_valid(&self, token: &str) -> bool {
        lock(&self.inner)
            .access_tokens
            .get(token)
            .is_some_and(|exp| *exp > Instant::now())
    }

    /// The token created for `request_id` under `merchant_id`, if any.
    pub fn find_by_request(&self, merchant_id: &str, request_id: &str) -> Option<TokenInfo> {
        let inner = lock(&self.inner);
        let id = inner
            .by_request
            .get(&(merchant_id.to_owned(), request_id.to_owned()))?;
        inner.tokens.get(id).map(|t| t.info.clone())
    }

    /// A token of `merchant_id` (`None`: any merchant, for the control API).
    pub fn get(&self, merchant_id: Option<&str>, token_id: &str) -> Option<TokenInfo> {
        let inner = lock(&self.inner);
        let t = inner.tokens.get(token_id)?;
        owned_by(t, merchant_id).then(|| t.info.clone())
    }

    /// The merchant that owns `token_id` (notifications are addressed by merchant).
    pub fn merchant_of(&self, token_id: &str) -> Option<String> {
        lock(&self.inner)
            .tokens
            .get(token_id)
            .map(|t| t.merchant_id.clone())
    }

    /// Creates a token for the card, or returns the existing one for this `requestId`.
    /// `pending` creates it in `PENDING` (asynchronous tokenization).
    pub fn create_token(
        &self,
        merchant_id: &str,
        request_id: &str,
        card: &CardInput,
        pending: bool,
    ) -> Result<Created, StateError> {
        let now = OffsetDateTime::now_utc();
        let par = self.par_for(&card.pan);
        let mut inner = lock(&self.inner);
        if !inner.merchants.contains_key(merchant_id) {
            return Err(StateError::MerchantNotFound);
        }
        let key = (merchant_id.to_owned(), request_id.to_owned());
        if let Some(existing) = inner
            .by_request
            .get(&key)
            .and_then(|id| inner.tokens.get(id))
        {
            return Ok(Created::Existing(existing.info.clone()));
        }
        let token_number = self.new_token_number(&inner.token_numbers);
        let token_id = random_id("d1t_", 18);
        let info = TokenInfo {
            token_id: token_id.clone(),
            request_id: request_id.to_owned(),
            status: if pending {
                Status::Pending
            } else {
                Status::Active
            },
            card_bin: card.pan.bin().to_owned(),
            card_last_digits: card.pan.last4().to_owned(),
            card_expiry_date: card.expiry.mmyy(),
            token_last_digits: last4(&token_number),
            token_expiry_date: years_ahead(now, 3),
            par,
        };
        inner.token_numbers.insert((*token_number).clone());
        inner.by_request.insert(key, token_id.clone());
        inner.tokens.insert(
            token_id,
            TokenRecord {
                info: info.clone(),
                merchant_id: merchant_id.to_owned(),
                token_number,
            },
        );
        Ok(Created::New(info))
    }

    /// Completes an asynchronous tokenization: `PENDING` becomes `ACTIVE`. `None` when the
    /// token is gone or no longer pending (deleted meanwhile), so nothing is to be notified.
    pub fn complete_pending(&self, token_id: &str) -> Option<TokenInfo> {
        let mut inner = lock(&self.inner);
        let t = inner.tokens.get_mut(token_id)?;
        if t.info.status != Status::Pending {
            return None;
        }
        t.info.status = Status::Active;
        Some(t.info.clone())
    }

    /// Applies a lifecycle action under the state rules: `DELETED` is terminal (suspend,
    /// resume and renew are refused; a repeated delete succeeds), `PENDING` can only be deleted,
    /// suspending a suspended token or resuming an active one is a no-op success.
    pub fn apply(
        &self,
        merchant_id: Option<&str>,
        token_id: &str,
        action: &Action,
    ) -> Result<TokenInfo, StateError> {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let t = inner
            .tokens
            .get_mut(token_id)
            .filter(|t| owned_by(t, merchant_id))
            .ok_or(StateError::TokenNotFound)?;
        let status = t.info.status;
        match action {
            Action::Delete => t.info.status = Status::Deleted,
            _ if matches!(status, Status::Deleted | Status::Pending) => {
                return Err(StateError::InvalidState(status));
            }
            Action::Suspend => t.info.status = Status::Suspended,
            Action::Resume => t.info.status = Status::Active,
            Action::Renew(expiry) => {
                let new_expiry = match expiry {
                    Some(e) => e.mmyy(),
                    None => Expiry::from_mmyy(&t.info.card_expiry_date)
                        .and_then(|e| Expiry::trusted(e.month, e.year.saturating_add(3)))
                        .map(|e| e.mmyy())
                        .unwrap_or_else(|| years_ahead(OffsetDateTime::now_utc(), 3)),
                };
                let number = self.new_token_number(&inner.token_numbers);
                inner.token_numbers.remove(t.token_number.as_str());
                inner.token_numbers.insert((*number).clone());
                t.info.token_last_digits = last4(&number);
                t.token_number = number;
                t.info.card_expiry_date = new_expiry.clone();
                t.info.token_expiry_date = new_expiry;
            }
        }
        Ok(t.info.clone())
    }

    /// The token PAN and expiry for a cryptogram, if the token is `ACTIVE`.
    pub fn credentials(
        &self,
        merchant_id: &str,
        token_id: &str,
    ) -> Result<(Zeroizing<String>, String), StateError> {
        let inner = lock(&self.inner);
        let t = inner
            .tokens
            .get(token_id)
            .filter(|t| owned_by(t, Some(merchant_id)))
            .ok_or(StateError::TokenNotFound)?;
        if t.info.status != Status::Active {
            return Err(StateError::InvalidState(t.info.status));
        }
        Ok((t.token_number.clone(), t.info.token_expiry_date.clone()))
    }

    /// A Luhn-valid 16-digit number under the configured prefix, not yet in use.
    fn new_token_number(&self, in_use: &HashSet<String>) -> Zeroizing<String> {
        loop {
            let number = token_number(&self.token_bin_prefix);
            if !in_use.contains(number.as_str()) {
                return number;
            }
        }
    }

    /// `V001` followed by 25 characters derived from the PAN: 29 characters like a real PAR,
    /// and the same card always gets the same PAR.
    fn par_for(&self, pan: &Pan) -> String {
        const ALPHABET: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.par_key[..]).map(|mut m| {
            m.update(pan.as_bytes());
            m.finalize().into_bytes()
        });
        let digest = match mac {
            Ok(d) => d.to_vec(),
            // HMAC takes keys of any length, so this branch is unreachable; a random PAR keeps
            // the simulator running rather than failing a request over it.
            Err(_) => {
                let mut r = vec![0u8; 32];
                rand::fill(&mut r[..]);
                r
            }
        };
        let mut par = String::from("V001");
        par.extend(
            digest
                .iter()
                .take(25)
                .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()])),
        );
        par
    }
}

fn owned_by(t: &TokenRecord, merchant_id: Option<&str>) -> bool {
    merchant_id.is_none_or(|m| t.merchant_id == m)
}

fn last4(number: &str) -> String {
    number[number.len().saturating_sub(4)..].to_owned()
}

/// `MMYY` of the month `years` years after `now`.
fn years_ahead(now: OffsetDateTime, years: i32) -> String {
    format!(
        "{:02}{:02}",
        u8::from(now.month()),
        (now.year() + years).rem_euclid(100)
    )
}

/// `prefix` + random digits + Luhn check digit, [`TOKEN_PAN_LEN`] digits in all.
pub fn token_number(prefix: &str) -> Zeroizing<String> {
    let mut digits = Zeroizing::new(Vec::with_capacity(TOKEN_PAN_LEN));
    digits.extend_from_slice(prefix.as_bytes());
    while digits.len() < TOKEN_PAN_LEN - 1 {
        digits.push(b'0' + rand::random_range(0..10u8));
    }
    digits.push(b'0');
    // Exactly one check digit makes the number Luhn-valid; trying all ten is the simplest
    // obviously-correct way to find it.
    for check in b'0'..=b'9' {
        if let Some(last) = digits.last_mut() {
            *last = check;
        }
        if luhn_valid(&digits) {
            break;
        }
    }
    Zeroizing::new(String::from_utf8_lossy(&digits).into_owned())
}

/// A random opaque id: prefix + base64url of `bytes` random bytes.
pub fn random_id(prefix: &str, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(&buf))
}

#[cfg(test)]
mod tests {
    use anyhow::{Context, bail};

    use super::*;

    /// `Status::as_str` (what token objects carry) is what `Serialize` writes (what
    /// notifications and the control API carry).
    #[test]
    fn status_wire_names_match_serde() -> anyhow::Result<()> {
        for s in [
            Status::Pending,
            Status::Active,
            Status::Suspended,
            Status::Deleted,
        ] {
            anyhow::ensure!(serde_json::to_value(s)? == s.as_str(), "{s:?}");
        }
        Ok(())
    }

    fn card() -> anyhow::Result<CardInput> {
        Ok(CardInput {
            pan: "4111111111111111".parse()?,
            expiry: Expiry::trusted(12, 2099).context("expiry")?,
        })
    }

    fn new_token(s: &Store, m: &str, request_id: &str, pending: bool) -> anyhow::Result<TokenInfo> {
        match s.create_token(m, request_id, &card()?, pending)? {
            Created::New(t) => Ok(t),
            Created::Existing(_) => bail!("expected a new token"),
        }
    }

    #[test]
    fn token_numbers_are_luhn_valid_under_the_prefix() {
        for _ in 0..200 {
            let n = token_number("489537");
            assert_eq!(n.len(), 16);
            assert!(n.starts_with("489537"));
            assert!(luhn_valid(n.as_bytes()));
        }
    }

    #[test]
    fn create_is_idempotent_on_request_id() -> anyhow::Result<()> {
        let s = Store::new("489537".into());
        let m = s.add_merchant("Acme");
        let a = new_token(&s, &m, "tok_1", false)?;
        let Created::Existing(b) = s.create_token(&m, "tok_1", &card()?, false)? else {
            bail!("repeat must return the existing token");
        };
        assert_eq!(a.token_id, b.token_id);
        assert_eq!(a.par.len(), 29);
        assert_eq!(a.card_bin, "411111");
        assert_eq!(a.card_last_digits, "1111");
        assert_eq!(a.card_expiry_date, "1299");
        // Same card, other request: a new token with the same PAR.
        let c = new_token(&s, &m, "tok_2", false)?;
        assert_ne!(c.token_id, a.token_id);
        assert_eq!(c.par, a.par);
        assert_eq!(
            s.create_token("mer_unknown", "tok_3", &card()?, false)
                .err(),
            Some(StateError::MerchantNotFound)
        );
        Ok(())
    }

    #[test]
    fn lifecycle_rules() -> anyhow::Result<()> {
        let s = Store::new("489537".into());
        let m = s.add_merchant("Acme");
        let t = new_token(&s, &m, "tok_1", false)?;
        let id = t.token_id.as_str();
        assert_eq!(
            s.apply(Some(&m), id, &Action::Suspend)?.status,
            Status::Suspended
        );
        assert_eq!(
            s.credentials(&m, id).err(),
            Some(StateError::InvalidState(Status::Suspended))
        );
        assert_eq!(
            s.apply(Some(&m), id, &Action::Resume)?.status,
            Status::Active
        );
        let (before, _) = s.credentials(&m, id)?;
        assert_eq!(
            s.apply(Some("mer_other"), id, &Action::Suspend).err(),
            Some(StateError::TokenNotFound)
        );
        let renewed = s.apply(None, id, &Action::Renew(Expiry::from_mmyy("0931")))?;
        assert_eq!(renewed.token_expiry_date, "0931");
        assert_eq!(renewed.card_expiry_date, "0931");
        assert_eq!(renewed.status, Status::Active);
        let (after, _) = s.credentials(&m, id)?;
        assert_ne!(*before, *after);
        assert_eq!(renewed.token_last_digits, after[12..]);
        assert_eq!(
            s.apply(Some(&m), id, &Action::Delete)?.status,
            Status::Deleted
        );
        assert_eq!(
            s.apply(Some(&m), id, &Action::Delete)?.status,
            Status::Deleted
        );
        assert_eq!(
            s.apply(Some(&m), id, &Action::Resume).err(),
            Some(StateError::InvalidState(Status::Deleted))
        );
        Ok(())
    }

    #[test]
    fn pending_tokens_show_only_id_and_status() -> anyhow::Result<()> {
        let s = Store::new("489537".into());
        let m = s.add_merchant("Acme");
        let t = new_token(&s, &m, "tok_1", true)?;
        assert_eq!(
            t.to_json(),
            json!({"tokenId": t.token_id, "status": "PENDING"})
        );
        assert_eq!(
            s.apply(Some(&m), &t.token_id, &Action::Suspend).err(),
            Some(StateError::InvalidState(Status::Pending))
        );
        let done = s.complete_pending(&t.token_id).context("pending")?;
        assert_eq!(done.status, Status::Active);
        assert!(s.complete_pending(&t.token_id).is_none());
        assert!(done.to_json().get("par").is_some());
        Ok(())
    }

    #[test]
    fn debug_never_shows_the_token_number() -> anyhow::Result<()> {
        let s = Store::new("489537".into());
        let m = s.add_merchant("Acme");
        let t = new_token(&s, &m, "tok_1", false)?;
        let (number, _) = s.credentials(&m, &t.token_id)?;
        let inner = lock(&s.inner);
        let record = inner.tokens.get(&t.token_id).context("record")?;
        assert!(!format!("{record:?}").contains(number.as_str()));
        Ok(())
    }
}
