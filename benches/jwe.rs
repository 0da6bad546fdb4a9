//! Criterion benches of the D1 card-data encryption (JWE `ECDH-ES` + `A256GCM` on P-256), the
//! largest CPU cost of tokenizing a new card and of a cryptogram (docs/performance.md):
//! our `jwe_encrypt` (ephemeral key, one ECDH, Concat KDF, AES-GCM) and `jwe_decrypt`, the bare
//! P-256 operations of the RustCrypto `p256` crate they use, and ring's P-256 ECDH as the
//! ceiling (ring only offers ephemeral keys, so it can replace the encrypt side, not the decrypt).
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
use ring::agreement;
use tokengate_d1_protocol::jose::{jwe_decrypt, jwe_encrypt};

/// The card payload D1 receives: a small JSON object.
const CARD: &[u8] = br#"{"pan":"4111111111111111","exp":"1230","name":"A Cardholder","cvv":null}"#;

fn benches(c: &mut Criterion) {
    let recipient = SecretKey::try_generate().expect("key");
    let recipient_pub = recipient.public_key();
    let kid = "d1-jwe-1";
    let compact = jwe_encrypt(CARD, &recipient_pub, kid).expect("encrypt");
    let keys = |k: &str| (k == kid).then(|| recipient.clone());

    let mut g = c.benchmark_group("jwe");
    g.throughput(Throughput::Elements(1));
    g.bench_function("jwe_encrypt (gateway, tokenize)", |b| {
        b.iter(|| jwe_encrypt(black_box(CARD), &recipient_pub, kid).expect("encrypt"))
    });
    g.bench_function("jwe_decrypt (gateway, cryptogram)", |b| {
        b.iter(|| jwe_decrypt(black_box(&compact), &keys).expect("decrypt"))
    });

    // What those are made of, in the same crate.
    g.bench_function("p256 ephemeral key + public key", |b| {
        b.iter(|| {
            let e = SecretKey::try_generate().expect("key");
            black_box(e.public_key())
        })
    });
    g.bench_function("p256 ECDH (static key)", |b| {
        b.iter(|| {
            let shared = recipient.diffie_hellman(black_box(&recipient_pub));
            black_box(shared.raw_secret_bytes()[0])
        })
    });

    // The ceiling: ring's P-256, ephemeral key + ECDH with the same recipient.
    let rng = ring::rand::SystemRandom::new();
    let point = recipient_pub.to_uncompressed_point();
    let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, point.to_vec());
    g.bench_function("ring ephemeral key + public key + ECDH", |b| {
        b.iter(|| {
            let e =
                agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng).expect("key");
            let public = e.compute_public_key().expect("public key");
            let first = agreement::agree_ephemeral(e, &peer, |k| k[0]).expect("agree");
            (black_box(public), first)
        })
    });
    g.finish();

    // Keep the check honest: the PublicKey type round-trips what ring will be given.
    let again = PublicKey::from_sec1_bytes(&point).expect("point");
    assert_eq!(again, recipient_pub);
}

criterion_group!(jwe, benches);
criterion_main!(jwe);
