//! JOSE for D1: ES256 client assertions (JWS) and compact JWE with ECDH-ES + A256GCM.
//!
//! # ES256 assertions
//!
//! Signing and verification go through `jsonwebtoken` (with its pure-Rust `rust_crypto`
//! backend): it is a widely used, maintained crate that parses PKCS#8 PEM keys, builds the
//! compact serialization and checks `exp` for us, so we do not hand-roll a JWS. We still parse
//! the protected header ourselves first, so that anything but `alg: ES256` with a `kid` is
//! refused before any key is looked up, and we add the checks D1 specifies that a generic JWT
//! library does not know: the lifetime limit (`exp` at most 15 minutes ahead, with clock skew).
//!
//! # JWE (RFC 7516 compact serialization, RFC 7518 §4.6 key agreement)
//!
//! No maintained pure-Rust JOSE crate implements `ECDH-ES` + `A256GCM` without OpenSSL
//! (`josekit` links OpenSSL, which this project keeps out of its dependency tree to stay with one
//! TLS/crypto stack), so the construction is implemented here from its parts, each a
//! RustCrypto primitive: P-256 ECDH (`p256`), the Concat KDF of NIST SP 800-56A with SHA-256
//! (`sha2`, [`concat_kdf`], checked against the RFC 7518 Appendix C vector), and AES-256-GCM
//! (`aes-gcm`). The two P-256 key agreements run on faster, well-kept implementations than
//! pure-Rust `p256`, which stays for key parsing, point validation and the test vectors: the
//! ephemeral side of [`jwe_encrypt`] on `ring`, and the static-key side of [`jwe_decrypt`] on
//! `aws-lc-rs` ([`JweDecryptionKey`]), since `ring` offers no static-key ECDH
//! (docs/performance.md). The format is:
//!
//! `BASE64URL(header) || '.' || '' || '.' || BASE64URL(iv) || '.' || BASE64URL(ciphertext) || '.' || BASE64URL(tag)`
//!
//! with header `{"alg":"ECDH-ES","enc":"A256GCM","kid":..,"epk":{"kty":"EC","crv":"P-256","x":..,"y":..}}`,
//! an empty encrypted-key part (direct key agreement), a 96-bit random IV, and the ASCII of the
//! encoded header as AAD. A fresh ephemeral key per message means the content key is never
//! reused, so a random IV is safe.
//!
//! Errors never carry key material, plaintext, or attacker-supplied header text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{AeadInOut, KeyInit, Tag};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use p256::elliptic_curve::sec1::ToSec1Point;
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey};
use p256::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Allowed difference between our clock and the peer's, for `exp`/`iat` checks.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

const JWE_ALG: &str = "ECDH-ES";
const JWE_ENC: &str = "A256GCM";
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// P-256 field element / coordinate length.
const COORD_LEN: usize = 32;

/// What can go wrong with a JWS or JWE. Messages are safe to log: they never contain key
/// material, plaintext, or text taken from the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoseError {
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("unsupported algorithm: {0}")]
    UnsupportedAlgorithm(&'static str),
    #[error("unknown key id")]
    UnknownKid,
    #[error("signature verification failed")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token lifetime exceeds the allowed maximum")]
    LifetimeTooLong,
    #[error("token issued in the future")]
    IssuedInFuture,
    #[error("decryption failed")]
    Decryption,
    #[error("crypto failure: {0}")]
    Internal(&'static str),
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn b64d(part: &str, what: &'static str) -> Result<Vec<u8>, JoseError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JoseError::Malformed(what))
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// Parses a P-256 public key from SPKI PEM (`-----BEGIN PUBLIC KEY-----`).
pub fn public_key_from_pem(pem: &str) -> Result<PublicKey, JoseError> {
    PublicKey::from_public_key_pem(pem.trim())
        .map_err(|_| JoseError::InvalidKey("not a P-256 SPKI PEM public key"))
}

/// Parses a P-256 private key from PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`); SEC1
/// (`-----BEGIN EC PRIVATE KEY-----`) is accepted too, as OpenSSL tools produce it.
pub fn secret_key_from_pem(pem: &str) -> Result<SecretKey, JoseError> {
    let pem = pem.trim();
    SecretKey::from_pkcs8_pem(pem)
        .or_else(|_| SecretKey::from_pem(pem))
        .map_err(|_| JoseError::InvalidKey("not a P-256 PKCS#8 or SEC1 PEM private key"))
}

// ---------------------------------------------------------------------------------------------
// ES256 assertions
// ---------------------------------------------------------------------------------------------

/// Claims of a JWT-bearer client assertion (RFC 7523) as D1 expects them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

/// Signs ES256 client assertions with one P-256 key, identified to the verifier by `kid`.
///
/// Holds a `jsonwebtoken::EncodingKey`, which keeps the PKCS#8 DER and wipes it on drop.
pub struct Es256Signer {
    key: EncodingKey,
    kid: String,
}

impl std::fmt::Debug for Es256Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Es256Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Es256Signer {
    /// Loads a PKCS#8 PEM P-256 private key. Other curves are refused here rather than at the
    /// first signature.
    pub fn from_pkcs8_pem(pem: &str, kid: &str) -> Result<Self, JoseError> {
        let pem = pem.trim();
        // jsonwebtoken accepts any EC curve; checking with p256 first makes a P-384 key a
        // configuration error instead of a failure at the first token request.
        SecretKey::from_pkcs8_pem(pem)
            .map_err(|_| JoseError::InvalidKey("not a P-256 PKCS#8 PEM private key"))?;
        let key = EncodingKey::from_ec_pem(pem.as_bytes())
            .map_err(|_| JoseError::InvalidKey("not a P-256 PKCS#8 PEM private key"))?;
        if kid.is_empty() {
            return Err(JoseError::InvalidKey("empty key id"));
        }
        Ok(Es256Signer {
            key,
            kid: kid.to_owned(),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A signed assertion `{iss, sub: iss, aud, iat: now, exp: now + lifetime, jti: random}`.
    pub fn sign_assertion(
        &self,
        iss: &str,
        aud: &str,
        lifetime: Duration,
    ) -> Result<String, JoseError> {
        let iat = now_unix();
        let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
        let claims = AssertionClaims {
            iss: iss.to_owned(),
            sub: iss.to_owned(),
            aud: aud.to_owned(),
            iat,
            exp: iat.saturating_add(lifetime),
            jti: uuid::Uuid::new_v4().simple().to_string(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("JWT".to_owned());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|_| JoseError::Internal("ES256 signing failed"))
    }
}

/// The part of a JWS header we decide on before verifying anything.
#[derive(Deserialize)]
struct JwsHeader {
    alg: String,
    kid: Option<String>,
}

/// Verifies an ES256 JWT: header `alg` must be ES256 and `kid` must resolve through `keys`;
/// then the signature, `exp` in the future, and `exp - now` (and `exp - iat`) at most
/// `max_lifetime`, each with [`CLOCK_SKEW`] of tolerance.
///
/// `iss`, `sub` and `aud` are returned, not checked: the caller knows which issuer the key
/// belongs to and which audience it is.
pub fn verify_assertion(
    jwt: &str,
    keys: &dyn Fn(&str) -> Option<PublicKey>,
    max_lifetime: Duration,
) -> Result<AssertionClaims, JoseError> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JoseError::Malformed("a JWS has three parts"));
    };
    let header: JwsHeader = serde_json::from_slice(&b64d(h, "header is not base64url")?)
        .map_err(|_| JoseError::Malformed("header is not a JSON object with alg"))?;
    if header.alg != "ES256" {
        return Err(JoseError::UnsupportedAlgorithm("only ES256 is accepted"));
    }
    let kid = header
        .kid
        .ok_or(JoseError::Malformed("header has no kid"))?;
    let public = keys(&kid).ok_or(JoseError::UnknownKid)?;
    let key = DecodingKey::from_ec_der(&public.to_uncompressed_point());

    let mut validation = Validation::new(Algorithm::ES256);
    validation.leeway = CLOCK_SKEW.as_secs();
    validation.validate_exp = true;
    // The caller checks the audience against its own base URL (see the doc comment).
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);

    let data = jsonwebtoken::decode::<AssertionClaims>(jwt, &key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        match e.kind() {
            ErrorKind::InvalidSignature => JoseError::BadSignature,
            ErrorKind::ExpiredSignature => JoseError::Expired,
            ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
                JoseError::UnsupportedAlgorithm("only ES256 is accepted")
            }
            ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidKeyFormat => {
                JoseError::InvalidKey("verification key is not usable")
            }
            _ => JoseError::Malformed("claims are missing or malformed"),
        }
    })?;
    let claims = data.claims;

    let now = now_unix();
    let skew = i64::try_from(CLOCK_SKEW.as_secs()).unwrap_or(0);
    let max = i64::try_from(max_lifetime.as_secs()).unwrap_or(i64::MAX);
    // jsonwebtoken already checked this; repeated so the rule does not depend on its defaults.
    if claims.exp.saturating_add(skew) <= now {
        return Err(JoseError::Expired);
    }
    if claims.iat > now.saturating_add(skew) {
        return Err(JoseError::IssuedInFuture);
    }
    let limit = max.saturating_add(skew);
    if claims.exp.saturating_sub(now) > limit || claims.exp.saturating_sub(claims.iat) > limit {
        return Err(JoseError::LifetimeTooLong);
    }
    Ok(claims)
}

// ---------------------------------------------------------------------------------------------
// JWE: ECDH-ES + A256GCM
// ---------------------------------------------------------------------------------------------

/// Concat KDF (NIST SP 800-56A §5.8.1, single-step, SHA-256) as RFC 7518 §4.6.2 profiles it:
/// `OtherInfo = AlgorithmID || PartyUInfo || PartyVInfo || SuppPubInfo`, each of the first
/// three as a 32-bit big-endian length followed by the bytes, `SuppPubInfo` = keydatalen in
/// bits as 32-bit big-endian. `keydata_bits` must be a multiple of 8.
pub fn concat_kdf(
    z: &[u8],
    algorithm_id: &str,
    apu: &[u8],
    apv: &[u8],
    keydata_bits: u32,
) -> Result<Zeroizing<Vec<u8>>, JoseError> {
    if keydata_bits == 0 || !keydata_bits.is_multiple_of(8) {
        return Err(JoseError::Internal(
            "key length must be a positive multiple of 8 bits",
        ));
    }
    let len_prefixed = |v: &[u8]| -> Result<Vec<u8>, JoseError> {
        let n = u32::try_from(v.len()).map_err(|_| JoseError::Internal("KDF input too long"))?;
        let mut out = Vec::with_capacity(4 + v.len());
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(v);
        Ok(out)
    };
    let mut other_info = Vec::new();
    other_info.extend(len_prefixed(algorithm_id.as_bytes())?);
    other_info.extend(len_prefixed(apu)?);
    other_info.extend(len_prefixed(apv)?);
    other_info.extend_from_slice(&keydata_bits.to_be_bytes());

    let want = (keydata_bits / 8) as usize;
    let mut out = Zeroizing::new(Vec::with_capacity(want + 32));
    let mut counter: u32 = 1;
    while out.len() < want {
        let mut h = Sha256::new();
        h.update(counter.to_be_bytes());
        h.update(z);
        h.update(&other_info);
        let block = Zeroizing::new(h.finalize());
        out.extend_from_slice(&block[..]);
        counter = counter
            .checked_add(1)
            .ok_or(JoseError::Internal("KDF counter overflow"))?;
    }
    out.truncate(want);
    Ok(out)
}

#[derive(Serialize, Deserialize)]
struct Epk {
    kty: String,
    crv: String,
    x: String,
    y: String,
}

/// [`Epk`] as written: borrowed, so the header of every JWE costs no owned strings.
#[derive(Serialize)]
struct EpkOut<'a> {
    kty: &'static str,
    crv: &'static str,
    x: &'a str,
    y: &'a str,
}

#[derive(Serialize)]
struct JweHeaderOut<'a> {
    alg: &'static str,
    enc: &'static str,
    kid: &'a str,
    epk: EpkOut<'a>,
}

/// Length of a 32-byte coordinate in unpadded base64url.
const COORD_B64_LEN: usize = (COORD_LEN * 4).div_ceil(3);

/// `bytes` (one coordinate) in unpadded base64url, on the stack.
fn coord_b64<'a>(bytes: &[u8], out: &'a mut [u8; COORD_B64_LEN]) -> Result<&'a str, JoseError> {
    let n = URL_SAFE_NO_PAD
        .encode_slice(bytes, out)
        .map_err(|_| JoseError::Internal("ephemeral public key length"))?;
    std::str::from_utf8(&out[..n]).map_err(|_| JoseError::Internal("ephemeral public key"))
}

/// The protected header as received. Only what we act on is typed; `apu`/`apv` are honoured
/// because RFC 7518 puts them into the KDF; `crit` and `zip` are refused because we implement
/// no extension and no compression.
#[derive(Deserialize)]
struct JweHeaderIn {
    alg: String,
    enc: String,
    kid: Option<String>,
    epk: Option<Epk>,
    apu: Option<String>,
    apv: Option<String>,
    crit: Option<serde_json::Value>,
    zip: Option<serde_json::Value>,
}

fn aes_key(cek: &[u8]) -> Result<Aes256Gcm, JoseError> {
    Aes256Gcm::new_from_slice(cek).map_err(|_| JoseError::Internal("bad content key length"))
}

/// Encrypts `plaintext` to `recipient` as a compact JWE (`ECDH-ES`, `A256GCM`, `kid` in the
/// protected header; see the module docs).
pub fn jwe_encrypt(
    plaintext: &[u8],
    recipient: &PublicKey,
    kid: &str,
) -> Result<String, JoseError> {
    // The ephemeral key agreement runs on ring: a profile of new-card tokenization showed the
    // pure-Rust p256 arithmetic (key generation + ECDH, two scalar multiplications) as most of
    // the request's CPU; ring's P-256 is several times faster (docs/performance.md). ring has
    // no static-key ECDH: the decrypting side uses aws-lc-rs (`JweDecryptionKey`).
    use ring::agreement;
    let rng = ring::rand::SystemRandom::new();
    let ephemeral = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng)
        .map_err(|_| JoseError::Internal("system random generator failed"))?;
    let epk = ephemeral
        .compute_public_key()
        .map_err(|_| JoseError::Internal("ephemeral public key"))?;
    let epk_point = epk.as_ref();
    if epk_point.len() != 1 + 2 * COORD_LEN {
        return Err(JoseError::Internal("ephemeral public key length"));
    }
    let (mut xb, mut yb) = ([0u8; COORD_B64_LEN], [0u8; COORD_B64_LEN]);
    let header = JweHeaderOut {
        alg: JWE_ALG,
        enc: JWE_ENC,
        kid,
        epk: EpkOut {
            kty: "EC",
            crv: "P-256",
            x: coord_b64(&epk_point[1..1 + COORD_LEN], &mut xb)?,
            y: coord_b64(&epk_point[1 + COORD_LEN..], &mut yb)?,
        },
    };
    // Sized once: the header (fixed fields, two coordinates, the kid), then the compact
    // serialisation in one string, so no buffer grows (and copies) on the new-card path.
    let mut header_json = Vec::with_capacity(128 + 2 * COORD_B64_LEN + kid.len());
    serde_json::to_writer(&mut header_json, &header)
        .map_err(|_| JoseError::Internal("header encoding"))?;
    let b64_len = |n: usize| (n * 4).div_ceil(3);
    let mut out = String::with_capacity(
        b64_len(header_json.len())
            + 4
            + b64_len(IV_LEN)
            + b64_len(plaintext.len())
            + b64_len(TAG_LEN),
    );
    URL_SAFE_NO_PAD.encode_string(&header_json, &mut out);
    let header_b64_len = out.len();

    let recipient_point = recipient.to_uncompressed_point();
    let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, &recipient_point[..]);
    let cek =
        agreement::agree_ephemeral(ephemeral, &peer, |z| concat_kdf(z, JWE_ENC, &[], &[], 256))
            .map_err(|_| JoseError::Internal("ECDH key agreement failed"))??;
    let cipher = aes_key(&cek)?;

    let mut iv = [0u8; IV_LEN];
    rand::fill(&mut iv);
    let mut buf = Zeroizing::new(plaintext.to_vec());
    let tag = cipher
        .encrypt_inout_detached(
            &Nonce::from(iv),
            &out.as_bytes()[..header_b64_len],
            (&mut buf[..]).into(),
        )
        .map_err(|_| JoseError::Internal("AES-GCM encryption failed"))?;

    out.push_str("..");
    URL_SAFE_NO_PAD.encode_string(iv, &mut out);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(&buf[..], &mut out);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(tag, &mut out);
    Ok(out)
}

/// Our static P-256 JWE key, prepared once for the static-key ECDH of [`jwe_decrypt_with`].
///
/// The agreement runs on `aws-lc-rs`: `ring` (our ephemeral side) has no static-key ECDH, and
/// the pure-Rust `p256` scalar multiplication cost ~250 us per call, most of a cryptogram's
/// CPU in the gateway and of a new card's in the simulator. AWS-LC's P-256 (the assembly
/// nistz256 code `ring` also descends from) is within a small factor of `ring`'s ephemeral
/// ECDH (docs/performance.md, `cargo bench --bench jwe`). The key itself is held by AWS-LC
/// (freed, and cleansed, by `EVP_PKEY_free`); the bytes it was made from are wiped here.
pub struct JweDecryptionKey {
    key: aws_lc_rs::agreement::PrivateKey,
}

impl std::fmt::Debug for JweDecryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JweDecryptionKey").finish_non_exhaustive()
    }
}

impl JweDecryptionKey {
    /// Prepares `secret` (a P-256 scalar) for decryption.
    pub fn new(secret: &SecretKey) -> Result<JweDecryptionKey, JoseError> {
        let mut bytes = secret.to_bytes();
        let mut scalar = Zeroizing::new([0u8; COORD_LEN]);
        scalar.copy_from_slice(&bytes);
        zeroize::Zeroize::zeroize(&mut bytes[..]);
        let key = aws_lc_rs::agreement::PrivateKey::from_private_key(
            &aws_lc_rs::agreement::ECDH_P256,
            &scalar[..],
        )
        .map_err(|_| JoseError::InvalidKey("not a usable P-256 private key"))?;
        Ok(JweDecryptionKey { key })
    }

    /// Parses a PKCS#8 or SEC1 PEM private key ([`secret_key_from_pem`]) and prepares it.
    pub fn from_pem(pem: &str) -> Result<JweDecryptionKey, JoseError> {
        JweDecryptionKey::new(&secret_key_from_pem(pem)?)
    }

    /// Z of ECDH with `peer` (an uncompressed SEC1 point already checked to be on P-256), fed
    /// to the Concat KDF.
    fn derive_cek(
        &self,
        peer: &[u8],
        apu: &[u8],
        apv: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, JoseError> {
        use aws_lc_rs::agreement;
        let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, peer);
        agreement::agree(
            &self.key,
            peer,
            JoseError::Malformed("epk is not a point on P-256"),
            |z| concat_kdf(z, JWE_ENC, apu, apv, 256),
        )
    }
}

/// A compact JWE taken apart and checked, everything but the key agreement and the tag.
struct ParsedJwe<'a> {
    header_b64: &'a str,
    kid: String,
    /// The sender's ephemeral key, uncompressed SEC1, validated on P-256.
    epk: PublicKey,
    apu: Option<Vec<u8>>,
    apv: Option<Vec<u8>>,
    iv: [u8; IV_LEN],
    tag: [u8; TAG_LEN],
    ciphertext: Zeroizing<Vec<u8>>,
}

fn parse_jwe(compact: &str) -> Result<ParsedJwe<'_>, JoseError> {
    let parts: Vec<&str> = compact.trim().split('.').collect();
    let [header_b64, encrypted_key, iv_b64, ct_b64, tag_b64] = parts[..] else {
        return Err(JoseError::Malformed("a compact JWE has five parts"));
    };
    let header: JweHeaderIn = serde_json::from_slice(&b64d(header_b64, "header is not base64url")?)
        .map_err(|_| JoseError::Malformed("header is not a JSON object with alg and enc"))?;
    if header.alg != JWE_ALG {
        return Err(JoseError::UnsupportedAlgorithm("alg must be ECDH-ES"));
    }
    if header.enc != JWE_ENC {
        return Err(JoseError::UnsupportedAlgorithm("enc must be A256GCM"));
    }
    if header.crit.is_some() {
        return Err(JoseError::UnsupportedAlgorithm(
            "no critical extensions are supported",
        ));
    }
    if header.zip.is_some() {
        return Err(JoseError::UnsupportedAlgorithm(
            "compression is not supported",
        ));
    }
    if !encrypted_key.is_empty() {
        return Err(JoseError::Malformed("ECDH-ES has an empty encrypted key"));
    }
    let kid = header
        .kid
        .ok_or(JoseError::Malformed("header has no kid"))?;
    let epk = header
        .epk
        .ok_or(JoseError::Malformed("header has no epk"))?;
    if epk.kty != "EC" || epk.crv != "P-256" {
        return Err(JoseError::UnsupportedAlgorithm(
            "epk must be an EC P-256 key",
        ));
    }
    let x = b64d(&epk.x, "epk.x is not base64url")?;
    let y = b64d(&epk.y, "epk.y is not base64url")?;
    if x.len() != COORD_LEN || y.len() != COORD_LEN {
        return Err(JoseError::Malformed("epk coordinates must be 32 bytes"));
    }
    let mut sec1 = Vec::with_capacity(1 + 2 * COORD_LEN);
    sec1.push(0x04);
    sec1.extend_from_slice(&x);
    sec1.extend_from_slice(&y);
    // Rejects points not on the curve, which would otherwise leak the private key
    // (invalid-curve attack). Checked here, before the key is looked up, whichever
    // implementation then does the agreement.
    let epk = PublicKey::from_sec1_bytes(&sec1)
        .map_err(|_| JoseError::Malformed("epk is not a point on P-256"))?;
    let apu = header
        .apu
        .map(|v| b64d(&v, "apu is not base64url"))
        .transpose()?;
    let apv = header
        .apv
        .map(|v| b64d(&v, "apv is not base64url"))
        .transpose()?;

    let iv: [u8; IV_LEN] = b64d(iv_b64, "iv is not base64url")?
        .try_into()
        .map_err(|_| JoseError::Malformed("iv must be 96 bits"))?;
    let tag: [u8; TAG_LEN] = b64d(tag_b64, "tag is not base64url")?
        .try_into()
        .map_err(|_| JoseError::Malformed("tag must be 128 bits"))?;
    let ciphertext = Zeroizing::new(b64d(ct_b64, "ciphertext is not base64url")?);
    Ok(ParsedJwe {
        header_b64,
        kid,
        epk,
        apu,
        apv,
        iv,
        tag,
        ciphertext,
    })
}

impl ParsedJwe<'_> {
    /// Opens the content with `cek`; returns `(kid, plaintext)`.
    fn open(self, cek: &[u8]) -> Result<(String, Zeroizing<Vec<u8>>), JoseError> {
        let mut buf = self.ciphertext;
        aes_key(cek)?
            .decrypt_inout_detached(
                &Nonce::from(self.iv),
                self.header_b64.as_bytes(),
                (&mut buf[..]).into(),
                &Tag::<Aes256Gcm>::from(self.tag),
            )
            .map_err(|_| JoseError::Decryption)?;
        Ok((self.kid, buf))
    }
}

/// Decrypts a compact JWE made by [`jwe_encrypt`] (or any RFC-conformant `ECDH-ES`/`A256GCM`
/// producer). `keys` maps the header `kid` to our private key. Returns `(kid, plaintext)`.
///
/// The key agreement is `p256`'s; callers on a hot path hold a [`JweDecryptionKey`] and call
/// [`jwe_decrypt_with`] instead, which accepts and refuses exactly the same tokens.
pub fn jwe_decrypt(
    compact: &str,
    keys: &dyn Fn(&str) -> Option<SecretKey>,
) -> Result<(String, Zeroizing<Vec<u8>>), JoseError> {
    let jwe = parse_jwe(compact)?;
    let secret = keys(&jwe.kid).ok_or(JoseError::UnknownKid)?;
    let shared = secret.diffie_hellman(&jwe.epk);
    let cek = concat_kdf(
        shared.raw_secret_bytes(),
        JWE_ENC,
        jwe.apu.as_deref().unwrap_or_default(),
        jwe.apv.as_deref().unwrap_or_default(),
        256,
    )?;
    jwe.open(&cek)
}

/// [`jwe_decrypt`] with prepared keys: the static-key ECDH runs on `aws-lc-rs`
/// ([`JweDecryptionKey`]). Same checks, same errors, in the same order.
pub fn jwe_decrypt_with<'k>(
    compact: &str,
    keys: &dyn Fn(&str) -> Option<&'k JweDecryptionKey>,
) -> Result<(String, Zeroizing<Vec<u8>>), JoseError> {
    let jwe = parse_jwe(compact)?;
    let key = keys(&jwe.kid).ok_or(JoseError::UnknownKid)?;
    let cek = key.derive_cek(
        &jwe.epk.to_uncompressed_point(),
        jwe.apu.as_deref().unwrap_or_default(),
        jwe.apv.as_deref().unwrap_or_default(),
    )?;
    jwe.open(&cek)
}

#[cfg(test)]
// `allow`, not `expect`: whether clippy flags unwraps in tests depends on crate-level settings.
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

    use super::*;
    use p256::elliptic_curve::Generate;

    const MINUTES_15: Duration = Duration::from_secs(900);

    fn new_key() -> SecretKey {
        SecretKey::try_generate().unwrap()
    }

    fn pkcs8_pem(k: &SecretKey) -> String {
        k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string()
    }

    fn spki_pem(k: &PublicKey) -> String {
        k.to_public_key_pem(LineEnding::LF).unwrap()
    }

    /// Signs arbitrary claims with an arbitrary header, to build tokens our signer would not.
    fn sign_raw(k: &SecretKey, header: &Header, claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_ec_pem(pkcs8_pem(k).as_bytes()).unwrap();
        jsonwebtoken::encode(header, claims, &key).unwrap()
    }

    fn es256_header(kid: &str) -> Header {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        h
    }

    #[test]
    fn pem_round_trips() {
        let k = new_key();
        let back = secret_key_from_pem(&pkcs8_pem(&k)).unwrap();
        assert_eq!(back, k);
        let sec1 = k.to_sec1_pem(LineEnding::LF).unwrap();
        assert_eq!(secret_key_from_pem(&sec1).unwrap(), k);
        let p = public_key_from_pem(&spki_pem(&k.public_key())).unwrap();
        assert_eq!(p, k.public_key());
        assert!(public_key_from_pem("garbage").is_err());
        assert!(secret_key_from_pem(&spki_pem(&k.public_key())).is_err());
        assert!(Es256Signer::from_pkcs8_pem("not a key", "k").is_err());
        assert!(Es256Signer::from_pkcs8_pem(&pkcs8_pem(&k), "").is_err());
    }

    #[test]
    fn assertion_round_trip() {
        let k = new_key();
        let signer = Es256Signer::from_pkcs8_pem(&pkcs8_pem(&k), "es-1").unwrap();
        assert_eq!(signer.kid(), "es-1");
        let jwt = signer
            .sign_assertion("mgid-1", "https://d1.example/authz/v1", MINUTES_15)
            .unwrap();
        let public = k.public_key();
        let keys = |kid: &str| (kid == "es-1").then_some(public);
        let claims = verify_assertion(&jwt, &keys, MINUTES_15).unwrap();
        assert_eq!(claims.iss, "mgid-1");
        assert_eq!(claims.sub, "mgid-1");
        assert_eq!(claims.aud, "https://d1.example/authz/v1");
        assert_eq!(claims.exp - claims.iat, 900);
        assert_eq!(claims.jti.len(), 32);
        // The header carries typ and kid as the protocol asks.
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.kid.as_deref(), Some("es-1"));
        // Two assertions differ in jti.
        let jwt2 = signer.sign_assertion("mgid-1", "aud", MINUTES_15).unwrap();
        let c2 = verify_assertion(&jwt2, &keys, MINUTES_15).unwrap();
        assert_ne!(c2.jti, claims.jti);
    }

    #[test]
    fn assertion_wrong_key_or_kid_fails() {
        let k = new_key();
        let other = new_key().public_key();
        let signer = Es256Signer::from_pkcs8_pem(&pkcs8_pem(&k), "es-1").unwrap();
        let jwt = signer.sign_assertion("m", "a", MINUTES_15).unwrap();
        let wrong = |_: &str| Some(other);
        assert_eq!(
            verify_assertion(&jwt, &wrong, MINUTES_15),
            Err(JoseError::BadSignature)
        );
        let none = |_: &str| None;
        assert_eq!(
            verify_assertion(&jwt, &none, MINUTES_15),
            Err(JoseError::UnknownKid)
        );
        // A flipped payload byte breaks the signature.
        let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
        let mut payload = URL_SAFE_NO_PAD.decode(&parts[1]).unwrap();
        let pos = payload.iter().position(|&b| b == b'm').unwrap();
        payload[pos] = b'n';
        parts[1] = URL_SAFE_NO_PAD.encode(&payload);
        let public = k.public_key();
        let right = |_: &str| Some(public);
        assert_eq!(
            verify_assertion(&parts.join("."), &right, MINUTES_15),
            Err(JoseError::BadSignature)
        );
        assert!(matches!(
            verify_assertion("a.b", &right, MINUTES_15),
            Err(JoseError::Malformed(_))
        ));
    }

    #[test]
    fn assertion_refuses_other_algorithms() {
        let k = new_key();
        let public = k.public_key();
        let keys = |_: &str| Some(public);
        let now = now_unix();
        let claims = serde_json::json!({"iss": "m", "sub": "m", "aud": "a", "iat": now, "exp": now + 60, "jti": "j"});
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("es-1".into());
        let hs = jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(b"secret")).unwrap();
        assert!(matches!(
            verify_assertion(&hs, &keys, MINUTES_15),
            Err(JoseError::UnsupportedAlgorithm(_))
        ));
        // alg "none", hand-built: refused before any key lookup.
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"es-1"}"#);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let unsigned = format!("{none_header}.{body}.");
        let panicky = |_: &str| -> Option<PublicKey> { unreachable!("key looked up for alg none") };
        assert!(matches!(
            verify_assertion(&unsigned, &panicky, MINUTES_15),
            Err(JoseError::UnsupportedAlgorithm(_))
        ));
        // No kid.
        let no_kid = sign_raw(&k, &Header::new(Algorithm::ES256), &claims);
        assert!(matches!(
            verify_assertion(&no_kid, &keys, MINUTES_15),
            Err(JoseError::Malformed(_))
        ));
    }

    #[test]
    fn assertion_time_rules() {
        let k = new_key();
        let public = k.public_key();
        let keys = |_: &str| Some(public);
        let now = now_unix();
        let with = |iat: i64, exp: i64| {
            sign_raw(
                &k,
                &es256_header("es-1"),
                &serde_json::json!({"iss": "m", "sub": "m", "aud": "a", "iat": iat, "exp": exp, "jti": "j"}),
            )
        };
        assert!(verify_assertion(&with(now, now + 900), &keys, MINUTES_15).is_ok());
        // Within the 30 s skew.
        assert!(verify_assertion(&with(now, now + 920), &keys, MINUTES_15).is_ok());
        assert_eq!(
            verify_assertion(&with(now, now + 1000), &keys, MINUTES_15),
            Err(JoseError::LifetimeTooLong)
        );
        // exp close to now but iat long before: the token lived too long.
        assert_eq!(
            verify_assertion(&with(now - 3600, now + 60), &keys, MINUTES_15),
            Err(JoseError::LifetimeTooLong)
        );
        assert_eq!(
            verify_assertion(&with(now - 1000, now - 100), &keys, MINUTES_15),
            Err(JoseError::Expired)
        );
        assert_eq!(
            verify_assertion(&with(now + 300, now + 600), &keys, MINUTES_15),
            Err(JoseError::IssuedInFuture)
        );
        // Missing claims are refused.
        let partial = sign_raw(
            &k,
            &es256_header("es-1"),
            &serde_json::json!({"iss": "m", "exp": now + 60}),
        );
        assert!(matches!(
            verify_assertion(&partial, &keys, MINUTES_15),
            Err(JoseError::Malformed(_))
        ));
    }

    #[test]
    fn jwe_round_trip_and_header() {
        let k = new_key();
        let msg = br#"{"pan": "4111111111111111", "exp": "1230"}"#;
        let jwe = jwe_encrypt(msg, &k.public_key(), "d1-enc-1").unwrap();
        let parts: Vec<&str> = jwe.split('.').collect();
        assert_eq!(parts.len(), 5);
        assert!(parts[1].is_empty());
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 12);
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[4]).unwrap().len(), 16);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ECDH-ES");
        assert_eq!(header["enc"], "A256GCM");
        assert_eq!(header["kid"], "d1-enc-1");
        assert_eq!(header["epk"]["kty"], "EC");
        assert_eq!(header["epk"]["crv"], "P-256");
        // The plaintext is not visible in the token.
        assert!(!jwe.contains("4111111111111111"));
        assert!(
            !String::from_utf8_lossy(&URL_SAFE_NO_PAD.decode(parts[3]).unwrap()).contains("4111")
        );

        let keys = |kid: &str| (kid == "d1-enc-1").then(|| k.clone());
        let (kid, plain) = jwe_decrypt(&jwe, &keys).unwrap();
        assert_eq!(kid, "d1-enc-1");
        assert_eq!(&plain[..], msg);
        // Same input encrypts differently each time (fresh epk and IV).
        let again = jwe_encrypt(msg, &k.public_key(), "d1-enc-1").unwrap();
        assert_ne!(again, jwe);
    }

    #[test]
    fn jwe_wrong_key_unknown_kid_and_tampering_fail() {
        let k = new_key();
        let jwe = jwe_encrypt(b"secret data", &k.public_key(), "kid-1").unwrap();
        let other = new_key();
        let wrong = |_: &str| Some(other.clone());
        assert_eq!(jwe_decrypt(&jwe, &wrong), Err(JoseError::Decryption));
        let none = |_: &str| None;
        assert_eq!(jwe_decrypt(&jwe, &none), Err(JoseError::UnknownKid));

        let right = |_: &str| Some(k.clone());
        let parts: Vec<String> = jwe.split('.').map(str::to_owned).collect();
        let tamper = |idx: usize| {
            let mut p = parts.clone();
            let mut bytes = URL_SAFE_NO_PAD.decode(&p[idx]).unwrap();
            bytes[0] ^= 1;
            p[idx] = URL_SAFE_NO_PAD.encode(&bytes);
            p.join(".")
        };
        assert_eq!(jwe_decrypt(&tamper(3), &right), Err(JoseError::Decryption));
        assert_eq!(jwe_decrypt(&tamper(4), &right), Err(JoseError::Decryption));
        assert_eq!(jwe_decrypt(&tamper(2), &right), Err(JoseError::Decryption));
        // The header is authenticated (it is the AAD): re-encoding it with another kid fails.
        let mut header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[0]).unwrap()).unwrap();
        header["kid"] = "kid-2".into();
        let mut p = parts.clone();
        p[0] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap());
        assert_eq!(
            jwe_decrypt(&p.join("."), &right),
            Err(JoseError::Decryption)
        );
        // Wrong algorithms are refused.
        header["kid"] = "kid-1".into();
        header["enc"] = "A128GCM".into();
        p[0] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap());
        assert!(matches!(
            jwe_decrypt(&p.join("."), &right),
            Err(JoseError::UnsupportedAlgorithm(_))
        ));
        header["enc"] = "A256GCM".into();
        header["alg"] = "RSA-OAEP".into();
        p[0] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap());
        assert!(matches!(
            jwe_decrypt(&p.join("."), &right),
            Err(JoseError::UnsupportedAlgorithm(_))
        ));
        // An epk off the curve is refused before any ECDH.
        header["alg"] = "ECDH-ES".into();
        header["epk"]["y"] = URL_SAFE_NO_PAD.encode([7u8; 32]).into();
        p[0] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap());
        assert!(matches!(
            jwe_decrypt(&p.join("."), &right),
            Err(JoseError::Malformed(_))
        ));
        assert!(matches!(
            jwe_decrypt("a.b.c", &right),
            Err(JoseError::Malformed(_))
        ));
        // A non-empty encrypted key part is refused.
        let mut p = parts.clone();
        p[1] = "AAAA".into();
        assert!(matches!(
            jwe_decrypt(&p.join("."), &right),
            Err(JoseError::Malformed(_))
        ));
    }

    #[test]
    fn errors_do_not_echo_input() {
        let k = new_key();
        let evil_kid = "4111111111111111";
        let jwe = jwe_encrypt(b"x", &k.public_key(), evil_kid).unwrap();
        let err = jwe_decrypt(&jwe, &|_: &str| None).unwrap_err();
        assert!(!err.to_string().contains(evil_kid));
        assert!(!format!("{err:?}").contains(evil_kid));
    }

    /// The aws-lc-rs path accepts and refuses exactly what the p256 path does, with the same
    /// errors: a round trip, a wrong key, an unknown kid, and every tampering case above.
    #[test]
    fn prepared_key_path_matches_the_p256_path() {
        let k = new_key();
        let prepared = JweDecryptionKey::new(&k).unwrap();
        let other = new_key();
        let other_prepared = JweDecryptionKey::from_pem(&pkcs8_pem(&other)).unwrap();
        let msg = br#"{"pan": "4111111111111111", "exp": "1230"}"#;
        let jwe = jwe_encrypt(msg, &k.public_key(), "kid-1").unwrap();

        let (kid, plain) =
            jwe_decrypt_with(&jwe, &|kid| (kid == "kid-1").then_some(&prepared)).unwrap();
        assert_eq!(kid, "kid-1");
        assert_eq!(&plain[..], msg);

        let mut header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(jwe.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        let parts: Vec<String> = jwe.split('.').map(str::to_owned).collect();
        let with_header = |h: &serde_json::Value| {
            let mut p = parts.clone();
            p[0] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(h).unwrap());
            p.join(".")
        };
        let flip = |idx: usize| {
            let mut p = parts.clone();
            let mut bytes = URL_SAFE_NO_PAD.decode(&p[idx]).unwrap();
            bytes[0] ^= 1;
            p[idx] = URL_SAFE_NO_PAD.encode(&bytes);
            p.join(".")
        };
        let mut cases = vec![jwe.clone(), flip(2), flip(3), flip(4), "a.b.c".to_owned()];
        header["kid"] = "kid-2".into();
        cases.push(with_header(&header));
        header["kid"] = "kid-1".into();
        header["enc"] = "A128GCM".into();
        cases.push(with_header(&header));
        header["enc"] = "A256GCM".into();
        header["epk"]["y"] = URL_SAFE_NO_PAD.encode([7u8; 32]).into();
        cases.push(with_header(&header));
        let mut p = parts.clone();
        p[1] = "AAAA".into();
        cases.push(p.join("."));

        for case in &cases {
            let reference = jwe_decrypt(case, &|_: &str| Some(k.clone()));
            let prepared_result = jwe_decrypt_with(case, &|_: &str| Some(&prepared));
            assert_eq!(
                reference.as_ref().map(|(kid, p)| (kid, &p[..])),
                prepared_result.as_ref().map(|(kid, p)| (kid, &p[..]))
            );
            // Wrong key and unknown kid: the same outcome on both paths.
            assert_eq!(
                jwe_decrypt(case, &|_: &str| Some(other.clone())).map(|(k, _)| k),
                jwe_decrypt_with(case, &|_: &str| Some(&other_prepared)).map(|(k, _)| k)
            );
            assert_eq!(
                jwe_decrypt(case, &|_: &str| None).map(|(k, _)| k),
                jwe_decrypt_with(case, &|_: &str| None).map(|(k, _)| k)
            );
        }
        assert_eq!(
            jwe_decrypt_with(&jwe, &|_: &str| Some(&other_prepared)).map(|(k, _)| k),
            Err(JoseError::Decryption)
        );
        // Debug shows no key material.
        assert_eq!(format!("{prepared:?}"), "JweDecryptionKey { .. }");
    }

    /// RFC 7518 Appendix C: ECDH-ES key agreement with A128GCM, apu "Alice", apv "Bob".
    #[test]
    fn concat_kdf_matches_rfc7518_appendix_c() {
        let d = |s: &str| URL_SAFE_NO_PAD.decode(s).unwrap();
        let alice_d = d("0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo");
        let bob_x = d("weNJy2HscCSM6AEDTDg04biOvhFhyyWvOHQfeF_PxMQ");
        let bob_y = d("e8lnCO-AlStT-NJVX-crhB7QRYhiix03illJOVAOyck");
        let bob_d = d("VEmDZpDXXK8p8N0Cndsxs924q6nS1RXFASRl6BfUqdw");
        let alice_x = d("gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0");
        let alice_y = d("SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps");
        let point = |x: &[u8], y: &[u8]| {
            let mut v = vec![4u8];
            v.extend_from_slice(x);
            v.extend_from_slice(y);
            PublicKey::from_sec1_bytes(&v).unwrap()
        };
        let alice = SecretKey::from_slice(&alice_d).unwrap();
        let bob = SecretKey::from_slice(&bob_d).unwrap();
        assert_eq!(alice.public_key(), point(&alice_x, &alice_y));
        let z = alice.diffie_hellman(&point(&bob_x, &bob_y));
        // Z as printed in the RFC.
        let expected_z: [u8; 32] = [
            158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
            110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
        ];
        assert_eq!(z.raw_secret_bytes().as_slice(), &expected_z);
        // Both sides agree.
        let z_bob = bob.diffie_hellman(&point(&alice_x, &alice_y));
        assert_eq!(z_bob.raw_secret_bytes(), z.raw_secret_bytes());

        let key = concat_kdf(&expected_z, "A128GCM", b"Alice", b"Bob", 128).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.encode(&key[..]), "VqqN6vgjbSBcIijNcacQGg");
        // Multi-block output is the concatenation of counter blocks.
        let long = concat_kdf(&expected_z, "X", &[], &[], 512).unwrap();
        assert_eq!(long.len(), 64);
        assert_ne!(long[..32], long[32..]);
        assert!(concat_kdf(&expected_z, "X", &[], &[], 12).is_err());
    }
}
