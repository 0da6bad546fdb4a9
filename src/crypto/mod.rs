//! Vault cryptography: AES-256-GCM sealing of PANs under a rotating keyring, and keyed
//! HMAC-SHA256 fingerprints for deduplication.
//!
//! Ciphertext format (see `docs/security.md`): `blob = nonce (12 bytes) || ciphertext || tag
//! (16 bytes)`, stored next to the id of the key that sealed it. The AAD binds the ciphertext to
//! its record so a blob copied into another record (another token, another merchant, or relabelled
//! with another key id) fails to open:
//! `AAD = "tokengate/pan/v1" || 0x00 || key_id || 0x00 || merchant_id || 0x00 || token_id`.
//!
//! Fingerprints are keyed by a ring of their own (`vault.fingerprint_keys`, one active): a
//! fingerprint names the key that made it (`<key id>:<hex>`), except under the implicit key id
//! [`IMPLICIT_FINGERPRINT_KEY_ID`] (the one-key form `vault.fingerprint_key`), whose fingerprints
//! stay bare hex so stores written before the ring existed keep deduplicating.
//!
//! Nonces are 96 random bits from a user-space CSPRNG seeded by the OS (`rand::rng()`, ChaCha12):
//! a system call per nonce would cost more than the encryption itself. With random nonces one key
//! should seal fewer than 2^32 messages; rotate keys well before that (`docs/security.md`).

use std::collections::HashMap;
use std::fmt;

use hmac::{Hmac, KeyInit as HmacKeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use zeroize::Zeroizing;

use serde::{Deserialize, Serialize};
use tokengate_cards::{Expiry, Pan};

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const AAD_LABEL: &[u8] = b"tokengate/pan/v1";

/// A PAN encrypted by the vault. Opaque outside this module: only a [`Keyring`] can open it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedPan {
    /// Id of the data-encryption key that sealed it (keys rotate).
    pub key_id: String,
    /// `nonce (12) || ciphertext || tag (16)`, see docs/security.md.
    #[serde(with = "b64")]
    pub blob: Vec<u8>,
}

impl fmt::Debug for SealedPan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SealedPan(key_id={}, {} bytes)",
            self.key_id,
            self.blob.len()
        )
    }
}

/// Keyed fingerprints of the card, used only for deduplication (never reversible without the key).
///
/// Each is `<key id>:<hex HMAC>`, or bare hex under [`IMPLICIT_FINGERPRINT_KEY_ID`]
/// ([`fingerprint_key_id`] reads either).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprints {
    /// HMAC of merchant + PAN: the same card even after reissue with a new expiry. The record's
    /// dedup index entry.
    pub pan: String,
    /// HMAC of merchant + PAN + expiry: exactly this card instance.
    pub pan_expiry: String,
    /// PAN fingerprints of this card under other fingerprint keys that also index the record
    /// while a fingerprint-key rotation is under way (`domain::fp_reindex`): instances that
    /// still compute them keep finding the card. Dropped once the re-index pass completes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<String>,
}

impl Fingerprints {
    /// Every dedup index entry of the record: `pan`, then `previous`.
    pub fn index_entries(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.pan.as_str()).chain(self.previous.iter().map(String::as_str))
    }

    /// Keeps `old`'s index entries (made under other keys) as `previous` entries of these, so
    /// replacing a record's fingerprints never drops an index entry a rotation still needs.
    pub fn carry_over(&mut self, old: &Fingerprints) {
        for fp in old.index_entries() {
            if fp != self.pan && !self.previous.iter().any(|p| p == fp) {
                self.previous.push(fp.to_owned());
            }
        }
    }
}

/// Id of the fingerprint key of `vault.fingerprint_key` (the one-key form). Its fingerprints
/// are bare hex, as they were before fingerprint keys had ids.
pub const IMPLICIT_FINGERPRINT_KEY_ID: &str = "fp0";

/// The id of the key that made a fingerprint (`<key id>:<hex>`, or bare hex: the implicit id).
pub fn fingerprint_key_id(fp: &str) -> &str {
    fp.split_once(':')
        .map_or(IMPLICIT_FINGERPRINT_KEY_ID, |(id, _)| id)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("key `{0}` is not in the keyring")]
    UnknownKey(String),
    #[error("ciphertext failed authentication")]
    Authentication,
    #[error("invalid key material for `{0}`: {1}")]
    BadKey(String, &'static str),
    #[error("decrypted data is not a valid card number")]
    BadPlaintext,
}

/// Data-encryption keys by id, plus the active one used for new writes; fingerprint keys the same.
pub struct Keyring {
    active: String,
    keys: HashMap<String, DataKey>,
    /// The active fingerprint key (index 0) then the others, sorted by id.
    fingerprint: Vec<FingerprintKey>,
}

/// One fingerprint key: two HMAC keys derived from the configured secret.
struct FingerprintKey {
    id: String,
    /// Pre-keyed HMAC; cloning it per use skips the key schedule (see PERF-NOTES).
    fingerprint: Hmac<Sha256>,
    /// Separate key for digests of idempotent requests, so they cannot be matched with
    /// fingerprints.
    request_digest: Hmac<Sha256>,
}

impl FingerprintKey {
    fn new(id: &str, b64: &SecretString) -> Result<FingerprintKey, CryptoError> {
        if !valid_key_id(id) {
            return Err(CryptoError::BadKey(
                id.to_owned(),
                "key id must be 1-32 characters of [A-Za-z0-9_-]",
            ));
        }
        let fp = decode_key(id, b64)?;
        // Derive two independent HMAC keys from the one configured secret.
        let derive = |label: &[u8]| -> Result<Hmac<Sha256>, CryptoError> {
            let mut m = <Hmac<Sha256> as HmacKeyInit>::new_from_slice(&fp)
                .map_err(|_| CryptoError::BadKey(id.to_owned(), "bad length"))?;
            m.update(label);
            let derived = Zeroizing::new(m.finalize().into_bytes().to_vec());
            <Hmac<Sha256> as HmacKeyInit>::new_from_slice(&derived)
                .map_err(|_| CryptoError::BadKey(id.to_owned(), "bad length"))
        };
        Ok(FingerprintKey {
            id: id.to_owned(),
            fingerprint: derive(b"tokengate/fingerprint/v1")?,
            request_digest: derive(b"tokengate/request-digest/v1")?,
        })
    }

    /// `hex`, named by the key id unless it is the implicit one.
    fn name(&self, hex: String) -> String {
        if self.id == IMPLICIT_FINGERPRINT_KEY_ID {
            hex
        } else {
            format!("{}:{hex}", self.id)
        }
    }

    fn fingerprints(&self, merchant: &str, pan: &Pan, expiry: &Expiry) -> Fingerprints {
        let mut m = self.fingerprint.clone();
        m.update(merchant.as_bytes());
        m.update(&[0]);
        m.update(pan.as_bytes());
        let pan_only = m.clone().finalize().into_bytes();
        m.update(&[0, expiry.month, (expiry.year >> 8) as u8, expiry.year as u8]);
        let with_expiry = m.finalize().into_bytes();
        Fingerprints {
            pan: self.name(hex_lower(&pan_only[..])),
            pan_expiry: self.name(hex_lower(&with_expiry[..])),
            previous: Vec::new(),
        }
    }

    fn pan_fingerprint(&self, merchant: &str, pan: &Pan) -> String {
        let mut m = self.fingerprint.clone();
        m.update(merchant.as_bytes());
        m.update(&[0]);
        m.update(pan.as_bytes());
        self.name(hex_lower(&m.finalize().into_bytes()[..]))
    }

    fn request_digest(&self, parts: &[&[u8]]) -> String {
        let mut m = self.request_digest.clone();
        for p in parts {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        hex_lower(&m.finalize().into_bytes()[..])
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        let fp_ids: Vec<&str> = self.fingerprint.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("key_ids", &ids)
            .field("fingerprint_key_ids", &fp_ids)
            .finish_non_exhaustive()
    }
}

/// One AES-256-GCM data key, on ring's implementation.
///
/// ring was chosen over RustCrypto's `aes-gcm` after the criterion run in `benches/crypto.rs`
/// (group `bare_seal`): for the 16-64-byte messages the vault seals, ring's AES-NI/CLMUL code is
/// faster (docs/performance.md has the figures). The byte format is plain AES-256-GCM, so data
/// sealed by either implementation opens with the other.
struct DataKey(ring::aead::LessSafeKey);

impl DataKey {
    fn new(bytes: &[u8]) -> Option<DataKey> {
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, bytes).ok()?;
        Some(DataKey(ring::aead::LessSafeKey::new(key)))
    }

    /// Encrypts `buf` in place and returns the tag. `LessSafeKey` only because the nonce comes
    /// from our CSPRNG per message (module docs), not from a counter ring would manage.
    fn seal(&self, nonce: [u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        let mut out = [0u8; TAG_LEN];
        // AES-GCM only fails for messages over 64 GiB; a failure leaves a zero tag, which can
        // never open, rather than a panic.
        if let Ok(tag) = self.0.seal_in_place_separate_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(aad),
            buf,
        ) {
            out.copy_from_slice(tag.as_ref());
        }
        out
    }

    /// Opens `nonce || ciphertext || tag`; the plaintext is zeroized when dropped.
    fn open(&self, blob: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if blob.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Authentication);
        }
        let (nonce, rest) = blob.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Authentication)?;
        let mut buf = Zeroizing::new(rest.to_vec());
        let len = self
            .0
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(aad),
                &mut buf[..],
            )
            .map_err(|_| CryptoError::Authentication)?
            .len();
        // Truncate drops the tag bytes; they are public, and the Vec is zeroized on drop anyway.
        buf.truncate(len);
        Ok(buf)
    }
}

/// Key material as configured: base64 of 32 random bytes per key.
pub struct KeyMaterial {
    pub active_key_id: String,
    pub data_keys: Vec<(String, SecretString)>,
    /// Fingerprint keys by id (`vault.fingerprint_key` is [`IMPLICIT_FINGERPRINT_KEY_ID`]).
    pub fingerprint_keys: Vec<(String, SecretString)>,
    /// The one that fingerprints new records; the others are still looked up during a rotation.
    pub active_fingerprint_key_id: String,
}

impl KeyMaterial {
    /// The one-key form: `key` is the fingerprint key under the implicit id.
    pub fn single_fingerprint_key(key: SecretString) -> (Vec<(String, SecretString)>, String) {
        (
            vec![(IMPLICIT_FINGERPRINT_KEY_ID.to_owned(), key)],
            IMPLICIT_FINGERPRINT_KEY_ID.to_owned(),
        )
    }
}

fn decode_key(id: &str, b64: &SecretString) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    use base64::Engine;
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b64.expose_secret().trim())
            .map_err(|_| CryptoError::BadKey(id.to_owned(), "not valid base64"))?,
    );
    if bytes.len() != 32 {
        return Err(CryptoError::BadKey(
            id.to_owned(),
            "must be 32 bytes (base64 of 32 random bytes)",
        ));
    }
    Ok(bytes)
}

/// Key ids end up in stored records and AAD, so keep them short and plain.
pub fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Keyring {
    pub fn new(material: &KeyMaterial) -> Result<Keyring, CryptoError> {
        let mut keys = HashMap::new();
        for (id, b64) in &material.data_keys {
            if !valid_key_id(id) {
                return Err(CryptoError::BadKey(
                    id.clone(),
                    "key id must be 1-32 characters of [A-Za-z0-9_-]",
                ));
            }
            let bytes = decode_key(id, b64)?;
            let cipher = DataKey::new(&bytes)
                .ok_or_else(|| CryptoError::BadKey(id.clone(), "bad length"))?;
            keys.insert(id.clone(), cipher);
        }
        if !keys.contains_key(&material.active_key_id) {
            return Err(CryptoError::UnknownKey(material.active_key_id.clone()));
        }
        let mut fingerprint = Vec::with_capacity(material.fingerprint_keys.len());
        for (id, b64) in &material.fingerprint_keys {
            if fingerprint.iter().any(|k: &FingerprintKey| &k.id == id) {
                return Err(CryptoError::BadKey(
                    id.clone(),
                    "fingerprint key listed twice",
                ));
            }
            fingerprint.push(FingerprintKey::new(id, b64)?);
        }
        // Active first (every tokenization uses it), the others in a stable order.
        fingerprint.sort_by(|a, b| {
            (a.id != material.active_fingerprint_key_id, &a.id)
                .cmp(&(b.id != material.active_fingerprint_key_id, &b.id))
        });
        if fingerprint.first().map(|k| k.id.as_str())
            != Some(material.active_fingerprint_key_id.as_str())
        {
            return Err(CryptoError::UnknownKey(
                material.active_fingerprint_key_id.clone(),
            ));
        }
        Ok(Keyring {
            active: material.active_key_id.clone(),
            keys,
            fingerprint,
        })
    }

    /// The active fingerprint key (the constructor guarantees one).
    fn fp_active(&self) -> &FingerprintKey {
        &self.fingerprint[0]
    }

    /// The id of the fingerprint key new records are indexed under.
    pub fn active_fingerprint_key_id(&self) -> &str {
        &self.fp_active().id
    }

    /// The ids of the other fingerprint keys (a rotation's previous keys), sorted.
    pub fn previous_fingerprint_key_ids(&self) -> impl Iterator<Item = &str> {
        self.fingerprint[1..].iter().map(|k| k.id.as_str())
    }

    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    fn aad(key_id: &str, merchant: &str, token: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(AAD_LABEL.len() + key_id.len() + 48);
        aad.extend_from_slice(AAD_LABEL);
        for part in [key_id, merchant, token] {
            aad.push(0);
            aad.extend_from_slice(part.as_bytes());
        }
        aad
    }

    /// Encrypts a PAN under the active key, bound to its token and merchant.
    ///
    /// `merchant` and `token` are the record's ids (the domain's `MerchantId` and `TokenId`).
    pub fn seal(
        &self,
        pan: &Pan,
        merchant: &impl AsRef<str>,
        token: &impl AsRef<str>,
    ) -> SealedPan {
        let key_id = &self.active;
        let cipher = &self.keys[key_id];
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let mut blob = Vec::with_capacity(NONCE_LEN + pan.len() + TAG_LEN);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(pan.as_bytes());
        let aad = Self::aad(key_id, merchant.as_ref(), token.as_ref());
        let tag = cipher.seal(nonce, &aad, &mut blob[NONCE_LEN..]);
        blob.extend_from_slice(&tag);
        SealedPan {
            key_id: key_id.clone(),
            blob,
        }
    }

    /// Decrypts a sealed PAN. Fails if the blob was tampered with or belongs to another record.
    pub fn open(
        &self,
        sealed: &SealedPan,
        merchant: &impl AsRef<str>,
        token: &impl AsRef<str>,
    ) -> Result<Pan, CryptoError> {
        let cipher = self
            .keys
            .get(&sealed.key_id)
            .ok_or_else(|| CryptoError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.blob.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Authentication);
        }
        let aad = Self::aad(&sealed.key_id, merchant.as_ref(), token.as_ref());
        let buf = cipher.open(&sealed.blob, &aad)?;
        let s = std::str::from_utf8(&buf).map_err(|_| CryptoError::BadPlaintext)?;
        s.parse::<Pan>().map_err(|_| CryptoError::BadPlaintext)
    }

    /// Keyed fingerprints of a card for one merchant. Including the merchant id means the same
    /// card at two merchants has unrelated fingerprints, so the store cannot link tenants.
    ///
    /// Under the active fingerprint key, with no `previous` entries.
    pub fn fingerprints(
        &self,
        merchant: &impl AsRef<str>,
        pan: &Pan,
        expiry: &Expiry,
    ) -> Fingerprints {
        self.fp_active()
            .fingerprints(merchant.as_ref(), pan, expiry)
    }

    /// PAN-only fingerprint under the active key (what dedup looks up first).
    pub fn pan_fingerprint(&self, merchant: &impl AsRef<str>, pan: &Pan) -> String {
        self.fp_active().pan_fingerprint(merchant.as_ref(), pan)
    }

    /// PAN-only fingerprints under the previous fingerprint keys (what dedup also looks up
    /// while a rotation's re-index pass is incomplete), in the order of
    /// [`Self::previous_fingerprint_key_ids`].
    pub fn previous_pan_fingerprints(&self, merchant: &impl AsRef<str>, pan: &Pan) -> Vec<String> {
        self.fingerprint[1..]
            .iter()
            .map(|k| k.pan_fingerprint(merchant.as_ref(), pan))
            .collect()
    }

    /// Keyed digest of a request, for idempotency comparisons. Keyed because request bodies
    /// contain card numbers, and an unkeyed hash of a PAN can be brute-forced. Under the
    /// active fingerprint key's derived digest key.
    pub fn request_digest(&self, parts: &[&[u8]]) -> String {
        self.fp_active().request_digest(parts)
    }

    /// Whether `stored` is the digest of `parts` under any fingerprint key of the ring: an
    /// idempotency record written before a fingerprint-key rotation (or by an instance that has
    /// not rolled yet) still matches its retry.
    pub fn request_digest_matches(&self, stored: &str, parts: &[&[u8]]) -> bool {
        self.fingerprint
            .iter()
            .any(|k| k.request_digest(parts) == stored)
    }
}

/// Lowercase hex, as `hex::encode` writes it. `hex::encode` builds its string one `char` at a
/// time through an iterator, which took more time than the HMAC it encodes (docs/performance.md);
/// this writes into a string of the right capacity.
pub fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// First part of the AAD of sealed secrets other than PANs (see [`Keyring::seal_secret`]).
const SECRET_AAD_LABEL: &[u8] = b"tokengate/secret/v1";

impl Keyring {
    /// AAD of a sealed secret: the label, then `purpose`, the key id and each binding part,
    /// each length-prefixed (u32 big-endian) so no choice of parts can collide with another.
    fn secret_aad(purpose: &str, key_id: &str, binding: &[&str]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(SECRET_AAD_LABEL.len() + 64);
        aad.extend_from_slice(SECRET_AAD_LABEL);
        for part in [purpose, key_id].iter().chain(binding) {
            aad.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
        aad
    }

    /// Encrypts a secret that is not a PAN (a webhook signing secret, ...) under the active key,
    /// bound to `purpose` and to the record it belongs to (`binding`, e.g. merchant and endpoint
    /// id): it opens only with the same ones. Returns the key id and `nonce || ciphertext || tag`.
    pub fn seal_secret(
        &self,
        purpose: &str,
        binding: &[&str],
        plaintext: &[u8],
    ) -> (String, Vec<u8>) {
        let key_id = &self.active;
        let cipher = &self.keys[key_id];
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let mut blob = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(plaintext);
        let aad = Self::secret_aad(purpose, key_id, binding);
        let tag = cipher.seal(nonce, &aad, &mut blob[NONCE_LEN..]);
        blob.extend_from_slice(&tag);
        (key_id.clone(), blob)
    }

    /// Decrypts what [`Keyring::seal_secret`] sealed with the same `purpose` and `binding`.
    pub fn open_secret(
        &self,
        purpose: &str,
        binding: &[&str],
        key_id: &str,
        blob: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let cipher = self
            .keys
            .get(key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        if blob.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Authentication);
        }
        let aad = Self::secret_aad(purpose, key_id, binding);
        cipher.open(blob, &aad)
    }
}

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// A key set for tests and sandbox mode only. Loudly marked; production mode refuses it.
pub mod dev {
    use secrecy::SecretString;

    use super::KeyMaterial;

    pub const DEV_KEY_ID: &str = "dev-insecure-1";
    /// 32 bytes "tokengate-DEVELOPMENT-key-NOTSAF" in base64. NOT SECRET.
    pub const DEV_DATA_KEY_B64: &str = "dG9rZW5nYXRlLURFVkVMT1BNRU5ULWtleS1OT1RTQUY=";
    /// 32 bytes "tokengate-DEV-fingerprint-NOSAFE" in base64. NOT SECRET.
    pub const DEV_FINGERPRINT_KEY_B64: &str = "dG9rZW5nYXRlLURFVi1maW5nZXJwcmludC1OT1NBRkU=";

    pub fn material() -> KeyMaterial {
        let (fingerprint_keys, active_fingerprint_key_id) =
            KeyMaterial::single_fingerprint_key(SecretString::from(DEV_FINGERPRINT_KEY_B64));
        KeyMaterial {
            active_key_id: DEV_KEY_ID.into(),
            data_keys: vec![(DEV_KEY_ID.into(), SecretString::from(DEV_DATA_KEY_B64))],
            fingerprint_keys,
            active_fingerprint_key_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;

    fn ring() -> Keyring {
        Keyring::new(&dev::material()).unwrap()
    }

    /// A fresh random id: the vault binds to ids as opaque strings.
    fn id(prefix: &str) -> String {
        format!("{prefix}{:032x}", rand::random::<u128>())
    }

    fn ids() -> (String, String) {
        (id("mer_"), id("tok_"))
    }

    const PAN: &str = "4111111111111111";

    /// Records sealed before the switch to ring (RustCrypto `aes-gcm`) must still open, and the
    /// other way round: the stored format is plain AES-256-GCM either way.
    #[test]
    fn ring_and_rustcrypto_blobs_are_interchangeable() {
        use aes_gcm::aead::{AeadInOut, KeyInit, Tag};
        use aes_gcm::{Aes256Gcm, Nonce};
        use base64::Engine;
        let k = ring();
        let (m, t) = ids();
        let key = base64::engine::general_purpose::STANDARD
            .decode(dev::DEV_DATA_KEY_B64)
            .unwrap();
        let rc = Aes256Gcm::new_from_slice(&key).unwrap();
        let aad = Keyring::aad(k.active_key_id(), &m, &t);

        // RustCrypto seals, the keyring (ring) opens.
        let nonce = [9u8; NONCE_LEN];
        let mut buf = PAN.as_bytes().to_vec();
        let tag = rc
            .encrypt_inout_detached(&Nonce::from(nonce), &aad, (&mut buf[..]).into())
            .unwrap();
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&buf);
        blob.extend_from_slice(&tag);
        let sealed = SealedPan {
            key_id: k.active_key_id().to_owned(),
            blob,
        };
        assert_eq!(k.open(&sealed, &m, &t).unwrap().as_bytes(), PAN.as_bytes());

        // The keyring seals, RustCrypto opens.
        let pan: Pan = PAN.parse().unwrap();
        let sealed = k.seal(&pan, &m, &t);
        let (n, rest) = sealed.blob.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = ct.to_vec();
        let n: [u8; NONCE_LEN] = n.try_into().unwrap();
        let tag: [u8; TAG_LEN] = tag.try_into().unwrap();
        rc.decrypt_inout_detached(
            &Nonce::from(n),
            &aad,
            (&mut buf[..]).into(),
            &Tag::<Aes256Gcm>::from(tag),
        )
        .unwrap();
        assert_eq!(buf, PAN.as_bytes());
    }

    #[test]
    fn seal_open_round_trip_and_randomised() {
        let k = ring();
        let (m, t) = ids();
        let pan: Pan = PAN.parse().unwrap();
        let a = k.seal(&pan, &m, &t);
        let b = k.seal(&pan, &m, &t);
        assert_ne!(a.blob, b.blob, "equal inputs must encrypt differently");
        assert_eq!(a.blob.len(), 12 + 16 + 16);
        assert!(!a.blob.windows(4).any(|w| w == b"1111"));
        assert_eq!(k.open(&a, &m, &t).unwrap(), pan);
    }

    #[test]
    fn aad_binds_record() {
        let k = ring();
        let (m, t) = ids();
        let pan: Pan = PAN.parse().unwrap();
        let s = k.seal(&pan, &m, &t);
        assert_eq!(
            k.open(&s, &id("mer_"), &t),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            k.open(&s, &m, &id("tok_")),
            Err(CryptoError::Authentication)
        );
        let mut tampered = s.clone();
        tampered.blob[14] ^= 1;
        assert_eq!(k.open(&tampered, &m, &t), Err(CryptoError::Authentication));
    }

    #[test]
    fn rotation_keeps_old_records_readable() {
        let old = ring();
        let (m, t) = ids();
        let pan: Pan = PAN.parse().unwrap();
        let sealed_old = old.seal(&pan, &m, &t);
        let mut material = dev::material();
        material.data_keys.push((
            "k2".into(),
            SecretString::from("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="),
        ));
        material.active_key_id = "k2".into();
        let new = Keyring::new(&material).unwrap();
        let sealed_new = new.seal(&pan, &m, &t);
        assert_eq!(sealed_new.key_id, "k2");
        assert_eq!(new.open(&sealed_old, &m, &t).unwrap(), pan);
        assert_eq!(new.open(&sealed_new, &m, &t).unwrap(), pan);
        // Relabelling a blob with another key id fails (the key id is in the AAD).
        let mut relabelled = sealed_old.clone();
        relabelled.key_id = "k2".into();
        assert_eq!(
            new.open(&relabelled, &m, &t),
            Err(CryptoError::Authentication)
        );
        assert!(matches!(
            old.open(&sealed_new, &m, &t),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn hex_lower_matches_hex_encode() {
        assert_eq!(hex_lower(&[]), "");
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_lower(&all), hex::encode(&all));
        for _ in 0..100 {
            let mut b = [0u8; 32];
            rand::fill(&mut b[..]);
            assert_eq!(hex_lower(&b), hex::encode(b));
        }
    }

    #[test]
    fn fingerprints_are_keyed_per_merchant_and_expiry() {
        let k = ring();
        let m = id("mer_");
        let pan: Pan = PAN.parse().unwrap();
        let e1 = Expiry::trusted(1, 2030).unwrap();
        let e2 = Expiry::trusted(2, 2031).unwrap();
        let f1 = k.fingerprints(&m, &pan, &e1);
        let f2 = k.fingerprints(&m, &pan, &e2);
        assert_eq!(
            f1.pan, f2.pan,
            "reissued card must match on the PAN fingerprint"
        );
        assert_ne!(f1.pan_expiry, f2.pan_expiry);
        assert_eq!(f1.pan, k.pan_fingerprint(&m, &pan));
        let other = k.fingerprints(&id("mer_"), &pan, &e1);
        assert_ne!(other.pan, f1.pan);
    }

    /// The implicit key id keeps the layout stores were written with before key ids: bare hex
    /// of HMAC(HMAC(key, label), merchant 0x00 PAN). Any other id names itself.
    #[test]
    fn fingerprint_ring_keeps_the_old_layout_and_names_new_keys() {
        use base64::Engine;
        let m = id("mer_");
        let pan: Pan = PAN.parse().unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(dev::DEV_FINGERPRINT_KEY_B64)
            .unwrap();
        let mut d = <Hmac<Sha256> as HmacKeyInit>::new_from_slice(&raw).unwrap();
        d.update(b"tokengate/fingerprint/v1");
        let derived = d.finalize().into_bytes();
        let mut h = <Hmac<Sha256> as HmacKeyInit>::new_from_slice(&derived).unwrap();
        h.update(m.as_bytes());
        h.update(&[0]);
        h.update(PAN.as_bytes());
        let legacy = hex::encode(h.finalize().into_bytes());
        let old = ring();
        assert_eq!(old.active_fingerprint_key_id(), IMPLICIT_FINGERPRINT_KEY_ID);
        assert_eq!(old.pan_fingerprint(&m, &pan), legacy);
        assert_eq!(fingerprint_key_id(&legacy), IMPLICIT_FINGERPRINT_KEY_ID);

        let mut material = dev::material();
        material.fingerprint_keys.push((
            "fp1".into(),
            SecretString::from("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="),
        ));
        material.active_fingerprint_key_id = "fp1".into();
        let new = Keyring::new(&material).unwrap();
        let fps = new.fingerprints(&m, &pan, &Expiry::trusted(1, 2030).unwrap());
        assert!(fps.pan.starts_with("fp1:") && fps.pan_expiry.starts_with("fp1:"));
        assert_eq!(fingerprint_key_id(&fps.pan), "fp1");
        assert_ne!(fps.pan, legacy);
        assert_eq!(
            new.previous_pan_fingerprints(&m, &pan),
            vec![legacy.clone()]
        );
        assert_eq!(
            new.previous_fingerprint_key_ids().collect::<Vec<_>>(),
            ["fp0"]
        );
        // Re-indexing keeps the old entry until it is dropped on purpose.
        let mut re = fps.clone();
        re.carry_over(&old.fingerprints(&m, &pan, &Expiry::trusted(1, 2030).unwrap()));
        assert_eq!(
            re.index_entries().collect::<Vec<_>>(),
            [fps.pan.as_str(), &legacy]
        );
        re.carry_over(&re.clone());
        assert_eq!(re.previous.len(), 1, "carry_over adds each entry once");

        // A digest made under the old key still matches under the new ring.
        let parts: [&[u8]; 2] = [b"POST /v1/tokens", b"{}"];
        let stored = old.request_digest(&parts);
        assert_ne!(new.request_digest(&parts), stored);
        assert!(new.request_digest_matches(&stored, &parts));
        assert!(!new.request_digest_matches(&stored, &[b"other"]));

        // The active id must be configured; an id may appear once.
        material.active_fingerprint_key_id = "fp9".into();
        assert!(matches!(
            Keyring::new(&material),
            Err(CryptoError::UnknownKey(_))
        ));
        material.active_fingerprint_key_id = "fp1".into();
        material.fingerprint_keys.push((
            "fp1".into(),
            SecretString::from(dev::DEV_FINGERPRINT_KEY_B64),
        ));
        assert!(Keyring::new(&material).is_err());
        let dbg = format!("{new:?}");
        assert!(dbg.contains("fp1") && !dbg.contains("MDEyMzQ1"));
    }

    #[test]
    fn bad_keys_are_named_without_material() {
        let mut material = dev::material();
        material.data_keys[0].1 = SecretString::from("c2hvcnQ=");
        let err = Keyring::new(&material).unwrap_err().to_string();
        assert!(err.contains("dev-insecure-1") && !err.contains("c2hvcnQ"));
        let mut material = dev::material();
        material.active_key_id = "missing".into();
        assert!(matches!(
            Keyring::new(&material),
            Err(CryptoError::UnknownKey(_))
        ));
        let dbg = format!("{:?}", ring());
        assert!(!dbg.contains(dev::DEV_DATA_KEY_B64));
    }
}
