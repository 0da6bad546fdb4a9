//! Criterion benches of the per-PAN crypto: parsing, seal + fingerprint, open, and the bare
//! AES-256-GCM seal of the same bytes (RustCrypto and ring) as the ceiling to compare against.
//!
//! `cargo bench --bench crypto`

#![allow(
    clippy::expect_used,
    reason = "bench setup: failing loudly is the right outcome"
)]

use std::hint::black_box;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokengate::crypto::{Keyring, dev};
use tokengate::domain::token::{MerchantId, TokenId};
use tokengate_cards::{Expiry, Pan};

const PANS: [(&str, &str); 2] = [("16", "4111111111111111"), ("19", "6011000990139424000")];

fn pan_of(digits: &str) -> Pan {
    // A 19-digit test value may not be Luhn-valid; fix its check digit.
    for last in b'0'..=b'9' {
        let mut s = digits[..digits.len() - 1].to_owned();
        s.push(last as char);
        if let Ok(p) = s.parse::<Pan>() {
            return p;
        }
    }
    unreachable!("some check digit is valid")
}

fn benches(c: &mut Criterion) {
    let ring = Keyring::new(&dev::material()).expect("dev keys");
    let merchant = MerchantId::generate();
    let token = TokenId::generate();
    let expiry = Expiry::trusted(12, 2030).expect("expiry");

    let mut g = c.benchmark_group("pan");
    g.throughput(Throughput::Elements(1));
    for (len, digits) in PANS {
        let pan = pan_of(digits);
        let text = pan.expose_digits().to_owned();
        g.bench_function(format!("parse_luhn/{len}"), |b| {
            b.iter(|| black_box(&text).parse::<Pan>().map(|p| p.len()))
        });
        g.bench_function(format!("seal+fingerprints/{len}"), |b| {
            b.iter(|| {
                let s = ring.seal(black_box(&pan), &merchant, &token);
                let f = ring.fingerprints(&merchant, &pan, &expiry);
                (s, f)
            })
        });
        g.bench_function(format!("seal+pan_fingerprint/{len}"), |b| {
            b.iter(|| {
                let s = ring.seal(black_box(&pan), &merchant, &token);
                let f = ring.pan_fingerprint(&merchant, &pan);
                (s, f)
            })
        });
        let sealed = ring.seal(&pan, &merchant, &token);
        g.bench_function(format!("open/{len}"), |b| {
            b.iter(|| {
                ring.open(black_box(&sealed), &merchant, &token)
                    .map(|p| p.len())
            })
        });

        // Ceilings: the bare AEAD on the same bytes, with a fresh random nonce as we do.
        let key = [7u8; 32];
        let rc = Aes256Gcm::new_from_slice(&key).expect("key");
        let aad = [0u8; 60];
        g.bench_function(format!("bare_seal_rustcrypto/{len}"), |b| {
            b.iter(|| {
                let mut nonce = [0u8; 12];
                rand::fill(&mut nonce);
                let mut buf = pan.as_bytes().to_vec();
                let tag = rc
                    .encrypt_inout_detached(&Nonce::from(nonce), &aad, (&mut buf[..]).into())
                    .expect("seal");
                (buf, tag)
            })
        });
        let rk = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).expect("key"),
        );
        g.bench_function(format!("bare_seal_ring/{len}"), |b| {
            b.iter(|| {
                let mut nonce = [0u8; 12];
                rand::fill(&mut nonce);
                let mut buf = pan.as_bytes().to_vec();
                let tag = rk
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(nonce),
                        ring::aead::Aad::from(&aad[..]),
                        &mut buf,
                    )
                    .expect("seal");
                (buf, tag)
            })
        });
    }
    g.finish();

    // The bare AEADs on longer messages (16 to 64 bytes is the range of vault payloads), to
    // compare the two libraries beyond PAN sizes.
    let mut g = c.benchmark_group("bare_seal");
    let key = [7u8; 32];
    let aad = [0u8; 60];
    let rc = Aes256Gcm::new_from_slice(&key).expect("key");
    let rk = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).expect("key"),
    );
    for len in [32usize, 64] {
        let msg = vec![0x42u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("rustcrypto/{len}"), |b| {
            b.iter(|| {
                let mut nonce = [0u8; 12];
                rand::fill(&mut nonce);
                let mut buf = black_box(&msg).clone();
                let tag = rc
                    .encrypt_inout_detached(&Nonce::from(nonce), &aad, (&mut buf[..]).into())
                    .expect("seal");
                (buf, tag)
            })
        });
        g.bench_function(format!("ring/{len}"), |b| {
            b.iter(|| {
                let mut nonce = [0u8; 12];
                rand::fill(&mut nonce);
                let mut buf = black_box(&msg).clone();
                let tag = rk
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(nonce),
                        ring::aead::Aad::from(&aad[..]),
                        &mut buf,
                    )
                    .expect("seal");
                (buf, tag)
            })
        });
    }
    g.finish();
}

criterion_group!(crypto, benches);
criterion_main!(crypto);
