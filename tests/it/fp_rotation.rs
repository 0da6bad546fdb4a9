//! Integration tests: fingerprint-key rotation (`domain::fp_reindex`). Cards tokenized under
//! fingerprint key A are still deduplicated after B becomes active, before, during (with
//! concurrent tokenizations) and after the re-index; the re-index resumes from its saved
//! progress in a new job instance; the entries under A are gone once it completes; and the
//! store never holds a PAN or key bytes. On the embedded store, standalone Redis and a Cluster.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;
use tokengate::crypto::{IMPLICIT_FINGERPRINT_KEY_ID, Keyring, dev};
use tokengate::domain::fp_reindex::{FpReindexSettings, FpReindexer, JOB, Phase};
use tokengate::domain::ports::TokenStore;
use tokengate::domain::ports::lifecycle::LifecycleStore;
use tokengate::domain::service::{Services, TokenizeCommand, Tokenized};
use tokengate::domain::token::{TokenId, TokenRecord, Usage};
use tokengate::storage::embedded::EmbeddedStore;

use crate::store_contract::{contains, dump_node};
use crate::support::app::{Backend, TestApp};
use crate::support::redis_server::RedisServer;

/// Fingerprint key B (A is the development key under the implicit id).
const FP_B: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";
const PANS: [&str; 4] = [
    "4111111111111111",
    "5555555555554444",
    "4012888888881881",
    "378282246310005",
];
/// Cards first seen while the rotation runs.
const NEW_PANS: [&str; 2] = ["6011111111111117", "3530111333300000"];

/// The keyring of an instance: the dev data key, and these fingerprint keys (`fp0` is A).
fn keyring(fp_keys: &[(&str, &str)], active: &str) -> Arc<Keyring> {
    let mut m = dev::material();
    m.fingerprint_keys = fp_keys
        .iter()
        .map(|(id, k)| (id.to_string(), SecretString::from(k.to_string())))
        .collect();
    m.active_fingerprint_key_id = active.to_owned();
    Arc::new(Keyring::new(&m).unwrap())
}

fn only_a() -> Arc<Keyring> {
    keyring(&[("fp0", dev::DEV_FINGERPRINT_KEY_B64)], "fp0")
}

fn a_and_b() -> Arc<Keyring> {
    keyring(
        &[("fp0", dev::DEV_FINGERPRINT_KEY_B64), ("fp1", FP_B)],
        "fp1",
    )
}

fn only_b() -> Arc<Keyring> {
    keyring(&[("fp1", FP_B)], "fp1")
}

fn services<S: TokenStore>(store: &Arc<S>, keyring: Arc<Keyring>) -> Services {
    let store: Arc<dyn TokenStore> = store.clone();
    Services::new(store, keyring, None, Duration::from_secs(1))
}

fn job<S: LifecycleStore>(services: &Services, store: &Arc<S>, lease_ms: u64) -> FpReindexer {
    let leases: Arc<dyn LifecycleStore> = store.clone();
    FpReindexer::new(
        services.clone(),
        leases,
        FpReindexSettings {
            interval: Duration::from_millis(10),
            batch: 1,
            lease: Duration::from_millis(lease_ms),
        },
    )
}

async fn tokenize(
    s: &Services,
    merchant: &tokengate::domain::merchant::Merchant,
    pan: &str,
) -> Tokenized {
    s.tokenize(
        merchant,
        TokenizeCommand {
            pan: pan.parse().unwrap(),
            expiry_month: 12,
            expiry_year: 2031,
            usage: Usage::CardOnFile,
            customer_reference: None,
        },
    )
    .await
    .unwrap()
}

/// Tokenizes `PANS` again (one request each, concurrently): each must find its token.
async fn tokenize_known(
    s: &Services,
    merchant: &tokengate::domain::merchant::Merchant,
    ids: &[TokenId],
) {
    let calls = PANS.iter().zip(ids).map(|(pan, id)| async move {
        assert_eq!(&existing_id(tokenize(s, merchant, pan).await), id);
    });
    futures::future::join_all(calls).await;
}

fn created(t: Tokenized) -> TokenRecord {
    match t {
        Tokenized::Created(r) => *r,
        Tokenized::Existing(r) => panic!("expected a new token, got {}", r.id),
    }
}

fn existing_id(t: Tokenized) -> TokenId {
    match t {
        Tokenized::Existing(r) => r.id.clone(),
        Tokenized::Created(r) => panic!("card tokenized twice: new token {}", r.id),
    }
}

/// The whole rotation on one store; returns the merchant's tokens (for the raw-bytes checks).
async fn rotation<S: TokenStore + LifecycleStore>(store: Arc<S>) -> Vec<TokenRecord> {
    // Under A only: the store as it was before fingerprint keys had ids.
    let old = services(&store, only_a());
    let merchant = old.create_merchant("Acme").await.unwrap().0;
    let mut ids = Vec::new();
    for pan in PANS {
        let rec = created(tokenize(&old, &merchant, pan).await);
        assert!(
            !rec.fingerprints.pan.contains(':'),
            "the implicit key keeps the old layout"
        );
        ids.push(rec.id);
    }

    // B active, A still in the ring, before any re-index: every known card is found.
    let new = services(&store, a_and_b());
    for (pan, id) in PANS.iter().zip(&ids) {
        assert_eq!(&existing_id(tokenize(&new, &merchant, pan).await), id);
    }
    // A card first seen now is indexed under B and A; an instance still on A alone finds it.
    let fresh = created(tokenize(&new, &merchant, NEW_PANS[0]).await);
    assert!(fresh.fingerprints.pan.starts_with("fp1:"));
    assert_eq!(fresh.fingerprints.previous.len(), 1);
    assert_eq!(
        existing_id(tokenize(&old, &merchant, NEW_PANS[0]).await),
        fresh.id
    );
    let mut all_ids = ids.clone();
    all_ids.push(fresh.id.clone());

    // A first job instance does part of the pass, then "dies" holding its lease. Meanwhile
    // both kinds of instance tokenize the known cards concurrently.
    let first = job(&new, &store, 300);
    let mut saved = None;
    for _ in 0..50 {
        let (step, ..) = tokio::join!(
            first.step(),
            tokenize_known(&new, &merchant, &ids),
            tokenize_known(&old, &merchant, &ids)
        );
        assert_eq!(step.unwrap(), Some(Phase::Reindex));
        let p = first.load().await.unwrap().unwrap();
        if p.pass.scanned >= 2 {
            saved = Some(p);
            break;
        }
    }
    let saved = saved.expect("the walk advances");
    assert_eq!(saved.phase, Phase::Reindex);
    assert_eq!(saved.active, "fp1");
    assert!(saved.cursor.is_some(), "the walk is not over yet");
    let scanned_before = saved.pass.scanned;
    drop(first);
    // A second instance waits for the lease, then continues from the saved progress.
    let second = job(&new, &store, 300);
    assert_eq!(
        second.step().await.unwrap(),
        None,
        "the dead holder's lease still holds"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;

    // The rest of the re-index and the cleanup run while the rolled instances tokenize
    // concurrently: every known card is found. (An instance on A alone must be gone before the
    // cleanup: docs/security.md.)
    let runner = tokio::spawn(async move {
        let mut steps = 0;
        let mut continued = None;
        loop {
            let phase = second.step().await.unwrap();
            if continued.is_none() && phase.is_some() {
                continued = second.load().await.unwrap().map(|p| p.pass.scanned);
            }
            steps += 1;
            if phase == Some(Phase::Done) {
                return (steps, continued);
            }
            assert!(steps < 500, "the re-index did not complete");
            tokio::task::yield_now().await;
        }
    });
    let mut rounds = 0;
    while !runner.is_finished() || rounds < 2 {
        let a = new.clone();
        let b = new.clone();
        let (m1, m2) = (merchant.clone(), merchant.clone());
        let (i1, i2) = (ids.clone(), ids.clone());
        let (x, y) = tokio::join!(
            tokio::spawn(async move { tokenize_known(&a, &m1, &i1).await }),
            tokio::spawn(async move { tokenize_known(&b, &m2, &i2).await })
        );
        x.unwrap();
        y.unwrap();
        rounds += 1;
        assert!(rounds < 1000, "the re-index did not complete");
    }
    let (steps, continued) = runner.await.unwrap();
    assert!(steps > 1);
    assert!(
        continued.unwrap() >= scanned_before,
        "the second instance continued the first one's walk rather than restarting it"
    );
    // A new card raced by two requests: one token.
    let (x, y) = tokio::join!(
        tokenize(&new, &merchant, NEW_PANS[1]),
        tokenize(&new, &merchant, NEW_PANS[1])
    );
    let won = match (x, y) {
        (Tokenized::Created(a), Tokenized::Existing(b))
        | (Tokenized::Existing(b), Tokenized::Created(a)) => {
            assert_eq!(a.id, b.id);
            a
        }
        (a, b) => panic!("one card, two outcomes: {a:?} / {b:?}"),
    };
    all_ids.push(won.id.clone());

    // Done: every record is indexed under B alone, the entries under A are gone.
    let reader = services(&store, only_a());
    let mut records = Vec::new();
    for id in &all_ids {
        let rec = store.get_token(&merchant.id, id).await.unwrap().unwrap();
        assert!(
            rec.fingerprints.pan.starts_with("fp1:"),
            "{id} not re-indexed"
        );
        assert!(
            rec.fingerprints.previous.is_empty(),
            "{id} keeps old entries"
        );
        let pan = reader
            .keyring
            .open(&rec.sealed_pan, &rec.merchant_id, &rec.id)
            .unwrap();
        let under_a = reader.keyring.pan_fingerprint(&merchant.id, &pan);
        assert_eq!(
            store
                .find_by_fingerprint(&merchant.id, &under_a)
                .await
                .unwrap(),
            None,
            "an index entry under the retired key is left"
        );
        records.push(rec);
    }
    // A removed from the ring: every card still deduplicates, nothing is re-indexed.
    let after = services(&store, only_b());
    for (pan, id) in PANS.iter().zip(&ids) {
        assert_eq!(&existing_id(tokenize(&after, &merchant, pan).await), id);
    }
    assert_eq!(
        existing_id(tokenize(&after, &merchant, NEW_PANS[0]).await),
        fresh.id
    );
    let done = job(&after, &store, 300);
    assert_eq!(done.step().await.unwrap(), Some(Phase::Done));
    records
}

async fn rotates_with_dedup_throughout<S: TokenStore + LifecycleStore>(store: Arc<S>) {
    rotation(store).await;
}

/// A new rotation (B -> C) after a completed one starts over; an instance whose ring lacks the
/// key the saved progress is for leaves the job alone instead of restarting it.
async fn a_stale_instance_leaves_the_job_alone<S: TokenStore + LifecycleStore>(store: Arc<S>) {
    let new = services(&store, a_and_b());
    let merchant = new.create_merchant("Acme").await.unwrap().0;
    created(tokenize(&new, &merchant, PANS[0]).await);
    let j = job(&new, &store, 300);
    assert_eq!(j.step().await.unwrap(), Some(Phase::Reindex));
    // An instance on a configuration with A alone: the job is not its business.
    let stale = services(&store, only_a());
    let sj = job(&stale, &store, 300);
    assert_eq!(sj.step().await.unwrap(), None);
    let p = sj.load().await.unwrap().unwrap();
    assert_eq!(p.active, "fp1");
    assert_eq!(p.phase, Phase::Reindex);
    j.run_to_completion(200).await.unwrap();
    assert_eq!(
        store
            .load_job_state(JOB)
            .await
            .unwrap()
            .map(|s| s.contains("\"done\"")),
        Some(true)
    );
}

crate::store_tests!(by_arc: rotates_with_dedup_throughout, a_stale_instance_leaves_the_job_alone);

/// Nothing the rotation wrote holds a PAN or key material: the raw values of standalone Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_raw_bytes_after_rotation_hold_no_pan_or_key() {
    let server = RedisServer::start();
    let store = Arc::new(crate::support::cases::redis_store(&server).await);
    let records = rotation(store).await;
    let bytes = dump_node(&server.url()).await;
    assert_clean(&bytes, &records, "redis dump");
}

/// The same for the embedded store's file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_file_after_rotation_holds_no_pan_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let records = rotation(store.clone()).await;
    drop(store);
    let bytes = std::fs::read(dir.path().join("tokengate.redb")).unwrap();
    assert_clean(&bytes, &records, "tokengate.redb");
}

fn assert_clean(bytes: &[u8], records: &[TokenRecord], what: &str) {
    use base64::Engine;
    // Positive control: the records (and their new index entries) are in these bytes.
    for r in records {
        assert!(
            contains(bytes, r.id.as_str().as_bytes()),
            "{what}: blind check"
        );
        assert!(
            contains(bytes, r.fingerprints.pan.as_bytes()),
            "{what}: no index entry"
        );
    }
    for pan in PANS.iter().chain(&NEW_PANS) {
        assert!(!contains(bytes, pan.as_bytes()), "{what} holds a PAN");
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for key in [FP_B, dev::DEV_FINGERPRINT_KEY_B64, dev::DEV_DATA_KEY_B64] {
        assert!(
            !contains(bytes, key.as_bytes()),
            "{what} holds a key (base64)"
        );
        let raw = b64.decode(key).unwrap();
        assert!(!contains(bytes, &raw), "{what} holds a key (raw bytes)");
    }
    assert_eq!(IMPLICIT_FINGERPRINT_KEY_ID, "fp0");
}

/// Through the gateway and its configuration: tokens made under `vault.fingerprint_key` are
/// deduplicated after `vault.fingerprint_keys` / `vault.active_fingerprint_key_id` rotate to a
/// new key, the job (`[fp_reindex]`) completes, and then the old key can leave the config.
async fn gateway_rotation(backend: Backend) {
    let data_key = format!("{{ k1 = \"{}\" }}", dev::DEV_DATA_KEY_B64);
    let base = |b: crate::support::app::TestAppBuilder| {
        b.env("TOKENGATE__D1__ENABLED", "false")
            .env("TOKENGATE__VAULT__KEYS", &data_key)
            .env("TOKENGATE__VAULT__ACTIVE_KEY_ID", "k1")
            .env("TOKENGATE__FP_REINDEX__INTERVAL_MS", "20")
            .env("TOKENGATE__FP_REINDEX__LEASE_MS", "2000")
            .env("TOKENGATE__FP_REINDEX__BATCH", "2")
    };
    let with_a = |b| {
        base(b).env(
            "TOKENGATE__VAULT__FINGERPRINT_KEY",
            dev::DEV_FINGERPRINT_KEY_B64,
        )
    };
    let b_keys = format!("{{ fp1 = \"{FP_B}\" }}");
    let restart = |b: crate::support::app::TestAppBuilder,
                   dir: &std::path::Path,
                   redis: Option<RedisServer>| {
        let b = b.data_dir(dir.to_owned());
        match redis {
            Some(r) => b.redis_server(r),
            None => b,
        }
    };
    let app = with_a(TestApp::builder(backend)).start().await;
    let dir = app.data_dir.clone();
    let (_, key) = app.create_merchant("Acme").await;
    let mut ids = Vec::new();
    for pan in PANS {
        let r = app.tokenize(&key, pan).await;
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let (tmp, redis) = app.stop().await;

    // B active, A kept: known cards are found while the job runs.
    let app = restart(
        with_a(TestApp::builder(backend))
            .env("TOKENGATE__VAULT__FINGERPRINT_KEYS", &b_keys)
            .env("TOKENGATE__VAULT__ACTIVE_FINGERPRINT_KEY_ID", "fp1"),
        &dir,
        redis,
    )
    .start()
    .await;
    for (pan, id) in PANS.iter().zip(&ids) {
        let r = app.tokenize(&key, pan).await;
        assert_eq!(r.status(), 200, "a known card during the rotation");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["id"].as_str().unwrap(), id);
    }
    // 4 records, 2 a tick every 20 ms: a re-index walk and two cleanup walks.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, redis) = app.stop().await;
    let state = match &redis {
        Some(r) => {
            let store = tokengate::storage::redis::RedisStore::connect(
                &tokengate::storage::redis::RedisConfig {
                    url: r.url(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            store.load_job_state(JOB).await.unwrap()
        }
        None => {
            let mut opened = EmbeddedStore::open(&dir);
            for _ in 0..40 {
                if opened.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                opened = EmbeddedStore::open(&dir);
            }
            opened.unwrap().load_job_state(JOB).await.unwrap()
        }
    };
    let state: Value = serde_json::from_str(&state.expect("progress saved")).unwrap();
    assert_eq!(state["active"], "fp1");
    assert_eq!(state["phase"], "done");

    // A removed from the config: the cards are still recognised, under B alone.
    let app = restart(
        base(TestApp::builder(backend))
            .env("TOKENGATE__VAULT__FINGERPRINT_KEYS", &b_keys)
            .env("TOKENGATE__VAULT__ACTIVE_FINGERPRINT_KEY_ID", "fp1"),
        &dir,
        redis,
    )
    .start()
    .await;
    for (pan, id) in PANS.iter().zip(&ids) {
        let r = app.tokenize(&key, pan).await;
        assert_eq!(r.status(), 200, "a known card after the old key left");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["id"].as_str().unwrap(), id);
    }
    app.stop().await;
    drop(tmp);
}

/// The gateway-level case, beside the store-level ones (the macros each make a module per
/// backend).
mod gateway {
    use super::gateway_rotation;

    crate::backend_tests!(standalone: gateway_rotation);
}
