//! Criterion benches of the D1 card-data encryption (JWE `ECDH-ES` + `A256GCM` on P-256), the
//! largest CPU cost of tokenizing a new card and of a cryptogram (docs/performance.md).
//!
//! - `floor/*`: the **new-card floor**, exactly the public-key and symmetric work one new card
//!   needs and nothing else (no JSON, no base64, no allocation beyond ring's): an ephemeral
//!   P-256 key and its public point (ring), one ECDH with D1's key (ring), the Concat KDF (one
//!   SHA-256 block), AES-256-GCM (ring) of the `{pan, exp}` plaintext with a JWE-header-sized
//!   AAD. `floor/+vault` adds the vault's share of a new card, the AES-256-GCM seal of the PAN
//!   and the two HMAC fingerprints (`Keyring::seal` + `Keyring::fingerprints`), so the gateway's
//!   CPU per new card can be stated against either.
//! - `jwe/*`: our `jwe_encrypt` (the gateway's new-card side) and the two decryptions: the p256
//!   path `jwe_decrypt` and the prepared-key path `jwe_decrypt_with` (aws-lc-rs static ECDH)
//!   used by the gateway (cryptograms) and the simulator (new cards).
//! - `ecdh/*`: the bare key agreements side by side in one run: ring's ephemeral ECDH (key
//!   generation, and generation + agreement, so the agreement alone is the difference), the
//!   static-key ECDH on aws-lc-rs and on p256.
//!
//! `cargo bench --bench jwe`
#![expect(
    clippy::expect_used,
    reason = "a bench with broken fixed inputs has nothing to measure"
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use p256::elliptic_curve::Generate;
use p256::elliptic_curve::sec1::ToSec1Point;
use p256::{PublicKey, SecretKey};
use ring::{aead, agreement};
use sha2::{Digest, Sha256};
use tokengate::crypto::{Keyring, dev};
use tokengate::domain::token::{MerchantId, TokenId};
use tokengate_cards::{Expiry, Pan};
use tokengate_d1_protocol::jose::{JweDecryptionKey, jwe_decrypt, jwe_decrypt_with, jwe_encrypt};

/// The card payload D1 receives, as the client encodes it (`CardPlaintext`).
const CARD: &[u8] = br#"{"pan":"4111111111111111","exp":"1230"}"#;
/// The size of the base64url protected header a JWE carries (the AES-GCM AAD).
const HEADER_LEN: usize = 220;

/// The floor: ephemeral key + public point, ECDH, Concat KDF, AES-256-GCM; returns the tag's
/// first byte so nothing is optimised away.
fn floor(rng: &ring::rand::SystemRandom, peer: &[u8], aad: &[u8]) -> u8 {
    let e = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, rng).expect("key");
    let public = e.compute_public_key().expect("public key");
    let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, peer);
    let cek = agreement::agree_ephemeral(e, &peer, |z| {
        // RFC 7518 Concat KDF for A256GCM: one SHA-256 block.
        let mut h = Sha256::new();
        h.update(1u32.to_be_bytes());
        h.update(z);
        h.update(7u32.to_be_bytes());
        h.update(b"A256GCM");
        h.update(0u32.to_be_bytes());
        h.update(0u32.to_be_bytes());
        h.update(256u32.to_be_bytes());
        h.finalize()
    })
    .expect("agree");
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, &cek).expect("cek length"),
    );
    let mut buf = [0u8; CARD.len()];
    buf.copy_from_slice(CARD);
    let mut iv = [0u8; 12];
    rand::fill(&mut iv);
    let tag = key
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(iv),
            aead::Aad::from(aad),
            &mut buf,
        )
        .expect("seal");
    black_box(public);
    tag.as_ref()[0] ^ buf[0]
}

fn benches(c: &mut Criterion) {
    let recipient = SecretKey::try_generate().expect("key");
    let recipient_pub = recipient.public_key();
    let prepared = JweDecryptionKey::new(&recipient).expect("prepared key");
    let kid = "d1-jwe-1";
    let compact = jwe_encrypt(CARD, &recipient_pub, kid).expect("encrypt");
    let keys = |k: &str| (k == kid).then(|| recipient.clone());
    let prepared_keys = |k: &str| (k == kid).then_some(&prepared);
    let rng = ring::rand::SystemRandom::new();
    let point = recipient_pub.to_uncompressed_point();
    let aad = [b'e'; HEADER_LEN];

    let vault = Keyring::new(&dev::material()).expect("dev keys");
    let merchant = MerchantId::generate();
    let token = TokenId::generate();
    let pan: Pan = "4111111111111111".parse().expect("pan");
    let expiry = Expiry::trusted(12, 2030).expect("expiry");

    let mut g = c.benchmark_group("floor");
    g.throughput(Throughput::Elements(1));
    g.bench_function("new card: ephemeral key + ECDH + KDF + AES-GCM", |b| {
        b.iter(|| floor(&rng, black_box(&point), &aad))
    });
    g.bench_function("new card +vault: + seal + 2 fingerprints", |b| {
        b.iter(|| {
            let f = floor(&rng, black_box(&point), &aad);
            let s = vault.seal(black_box(&pan), &merchant, &token);
            let fp = vault.fingerprints(&merchant, &pan, &expiry);
            (f, s, fp)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("jwe");
    g.throughput(Throughput::Elements(1));
    g.bench_function("jwe_encrypt (gateway, new card)", |b| {
        b.iter(|| jwe_encrypt(black_box(CARD), &recipient_pub, kid).expect("encrypt"))
    });
    g.bench_function(
        "jwe_decrypt_with, aws-lc-rs (gateway cryptogram, sim new card)",
        |b| b.iter(|| jwe_decrypt_with(black_box(&compact), &prepared_keys).expect("decrypt")),
    );
    g.bench_function("jwe_decrypt, p256", |b| {
        b.iter(|| jwe_decrypt(black_box(&compact), &keys).expect("decrypt"))
    });
    g.finish();

    let mut g = c.benchmark_group("ecdh");
    g.throughput(Throughput::Elements(1));
    let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, point.to_vec());
    g.bench_function("ring ephemeral: key generation", |b| {
        b.iter(|| {
            agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng).expect("key")
        })
    });
    g.bench_function("ring ephemeral: key generation + ECDH", |b| {
        b.iter(|| {
            let e =
                agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng).expect("key");
            agreement::agree_ephemeral(e, &peer, |k| k[0]).expect("agree")
        })
    });
    // A peer point as the decrypting side sees it: a fresh ephemeral key's.
    let sender = SecretKey::try_generate().expect("key").public_key();
    let sender_point = sender.to_uncompressed_point();
    let aws_key = aws_lc_rs::agreement::PrivateKey::from_private_key(
        &aws_lc_rs::agreement::ECDH_P256,
        &recipient.to_bytes()[..],
    )
    .expect("aws-lc key");
    g.bench_function("aws-lc-rs static-key ECDH", |b| {
        b.iter(|| {
            let peer = aws_lc_rs::agreement::UnparsedPublicKey::new(
                &aws_lc_rs::agreement::ECDH_P256,
                black_box(&sender_point[..]),
            );
            aws_lc_rs::agreement::agree(&aws_key, peer, (), |z| Ok(z[0])).expect("agree")
        })
    });
    g.bench_function("p256 static-key ECDH", |b| {
        b.iter(|| {
            let shared = recipient.diffie_hellman(black_box(&sender));
            shared.raw_secret_bytes()[0]
        })
    });
    g.finish();

    // Keep the check honest: the PublicKey type round-trips what ring is given.
    let again = PublicKey::from_sec1_bytes(&point).expect("point");
    assert_eq!(again, recipient_pub);
}

criterion_group!(jwe, benches);
criterion_main!(jwe);
