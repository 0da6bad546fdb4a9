//! Integration tests: data-key rotation. Records written under an old key are re-sealed under
//! the new active key by the background job while the gateway serves; a record whose key was
//! retired too early is reported, never silently lost.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;
use tokengate::crypto::{KeyMaterial, Keyring, dev};
use tokengate::domain::ports::TokenStore;
use tokengate::domain::token::{MerchantId, TokenId};
use tokengate::storage::embedded::EmbeddedStore;
use tokengate::storage::redis::{RedisConfig, RedisStore};

use crate::support::app::{Backend, TestApp};
use crate::support::captured_logs;
use crate::support::redis_server::{RedisCluster, RedisServer};

const K1: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const K2: &str = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXowMTIzNDU=";
const K3: &str = "WllYV1ZVVFNSUVBPTk1MS0pJSEdGRURDQkE5ODc2NTQ=";
const PANS: [&str; 3] = ["4111111111111111", "5555555555554444", "4012888888881881"];

fn with_keys(
    b: crate::support::app::TestAppBuilder,
    keys: &str,
    active: &str,
    rekey: bool,
) -> crate::support::app::TestAppBuilder {
    b.env("TOKENGATE__D1__ENABLED", "false")
        .env("TOKENGATE__VAULT__KEYS", keys)
        .env("TOKENGATE__VAULT__ACTIVE_KEY_ID", active)
        .env(
            "TOKENGATE__VAULT__FINGERPRINT_KEY",
            dev::DEV_FINGERPRINT_KEY_B64,
        )
        .env(
            "TOKENGATE__REKEY__ENABLED",
            if rekey { "true" } else { "false" },
        )
        .env("TOKENGATE__REKEY__INTERVAL_MS", "50")
        .env("TOKENGATE__REKEY__BATCH", "2")
}

fn ring(keys: &[(&str, &str)], active: &str) -> Keyring {
    let (fingerprint_keys, active_fingerprint_key_id) =
        KeyMaterial::single_fingerprint_key(SecretString::from(dev::DEV_FINGERPRINT_KEY_B64));
    Keyring::new(&KeyMaterial {
        active_key_id: active.into(),
        data_keys: keys
            .iter()
            .map(|(id, k)| (id.to_string(), SecretString::from(k.to_string())))
            .collect(),
        fingerprint_keys,
        active_fingerprint_key_id,
    })
    .unwrap()
}

/// Tokenizes `PANS` on a gateway whose only key is k1; returns (merchant id, api key, token ids).
async fn seed(app: &TestApp) -> (String, String, Vec<String>) {
    let (mid, key) = app.create_merchant("Acme").await;
    let mut ids = Vec::new();
    for pan in PANS {
        let r = app.tokenize(&key, pan).await;
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    (mid, key, ids)
}

async fn check_resealed(store: Arc<dyn TokenStore>, mid: &str, ids: &[String]) {
    let only_k2 = ring(&[("k2", K2)], "k2");
    let merchant = MerchantId::parse(mid).unwrap();
    for (id, pan) in ids.iter().zip(PANS) {
        let rec = store
            .get_token(&merchant, &TokenId::parse(id).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.sealed_pan.key_id, "k2", "{id} not re-sealed");
        let opened = only_k2.open(&rec.sealed_pan, &merchant, &rec.id).unwrap();
        assert_eq!(opened.expose_digits(), pan);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reseals_old_records_embedded() {
    let app = with_keys(
        TestApp::builder(Backend::Embedded),
        &format!("{{ k1 = \"{K1}\" }}"),
        "k1",
        false,
    )
    .start()
    .await;
    let dir = app.data_dir.clone();
    let (mid, key, ids) = seed(&app).await;
    let (tmp, _) = app.stop().await;

    // New key active, old key still in the ring: the job re-seals while the API serves.
    let app = with_keys(
        TestApp::builder(Backend::Embedded).data_dir(dir.clone()),
        &format!("{{ k1 = \"{K1}\", k2 = \"{K2}\" }}"),
        "k2",
        true,
    )
    .start()
    .await;
    // Traffic during the rotation: dedup still recognises the cards.
    assert_eq!(app.tokenize(&key, PANS[0]).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    app.stop().await;

    // Background tasks release the database shortly after the server stops.
    let mut opened = EmbeddedStore::open(&dir);
    for _ in 0..40 {
        if opened.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        opened = EmbeddedStore::open(&dir);
    }
    let store: Arc<dyn TokenStore> = Arc::new(opened.unwrap());
    check_resealed(store, &mid, &ids).await;
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reseals_old_records_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let app = with_keys(
        TestApp::builder(Backend::Redis).redis_server(redis),
        &format!("{{ k1 = \"{K1}\" }}"),
        "k1",
        false,
    )
    .start()
    .await;
    let (mid, key, ids) = seed(&app).await;
    let (_, redis) = app.stop().await;
    let app = with_keys(
        TestApp::builder(Backend::Redis).redis_server(redis.unwrap()),
        &format!("{{ k1 = \"{K1}\", k2 = \"{K2}\" }}"),
        "k2",
        true,
    )
    .start()
    .await;
    assert_eq!(app.tokenize(&key, PANS[1]).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let store: Arc<dyn TokenStore> = Arc::new(
        RedisStore::connect(&RedisConfig {
            url,
            ..RedisConfig::default()
        })
        .await
        .unwrap(),
    );
    check_resealed(store, &mid, &ids).await;
    app.stop().await;
}

/// The same rotation on a three-primary Redis Cluster, with two instances running the job: the
/// walk visits every primary, so the records of merchants on every node are re-sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reseals_old_records_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let nodes: Vec<String> = cluster.addrs().iter().map(|a| format!("\"{a}\"")).collect();
    let nodes = format!("[{}]", nodes.join(","));
    let app = with_keys(
        TestApp::builder(Backend::Embedded).env("TOKENGATE__STORAGE__REDIS_CLUSTER_NODES", &nodes),
        &format!("{{ k1 = \"{K1}\" }}"),
        "k1",
        false,
    )
    .start()
    .await;
    // Several merchants: each merchant's keys share a slot, so this spreads them over nodes.
    let mut seeded = Vec::new();
    for _ in 0..4 {
        seeded.push(seed(&app).await);
    }
    app.stop().await;
    // Two instances with the job on: they share the walk through the lease and its saved
    // progress.
    let start = || {
        with_keys(
            TestApp::builder(Backend::Embedded)
                .env("TOKENGATE__STORAGE__REDIS_CLUSTER_NODES", &nodes),
            &format!("{{ k1 = \"{K1}\", k2 = \"{K2}\" }}"),
            "k2",
            true,
        )
        .start()
    };
    let app = start().await;
    let other = start().await;
    assert_eq!(app.tokenize(&seeded[0].1, PANS[2]).await.status(), 200);
    let store: Arc<dyn TokenStore> = Arc::new(
        RedisStore::connect(&RedisConfig {
            url: String::new(),
            cluster_nodes: cluster.addrs(),
            ..RedisConfig::default()
        })
        .await
        .unwrap(),
    );
    // Wait until every record is under k2 (a pass takes a few ticks of 2 keys per node).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    'wait: loop {
        assert!(
            std::time::Instant::now() < deadline,
            "not re-sealed in time"
        );
        for (mid, _, ids) in &seeded {
            let merchant = MerchantId::parse(mid).unwrap();
            for id in ids {
                let rec = store
                    .get_token(&merchant, &TokenId::parse(id).unwrap())
                    .await
                    .unwrap()
                    .unwrap();
                if rec.sealed_pan.key_id != "k2" {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'wait;
                }
            }
        }
        break;
    }
    for (mid, _, ids) in &seeded {
        check_resealed(store.clone(), mid, ids).await;
    }
    other.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_under_a_retired_key_is_reported() {
    let app = with_keys(
        TestApp::builder(Backend::Redis),
        &format!("{{ k1 = \"{K1}\" }}"),
        "k1",
        false,
    )
    .start()
    .await;
    let (_, key, ids) = seed(&app).await;
    let (_, redis) = app.stop().await;
    // k1 retired before its records were re-sealed: a misconfiguration the job must surface.
    let app = with_keys(
        TestApp::builder(Backend::Redis).redis_server(redis.unwrap()),
        &format!("{{ k2 = \"{K2}\", k3 = \"{K3}\" }}"),
        "k3",
        true,
    )
    .start()
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let logs = captured_logs();
    for id in &ids {
        assert!(
            logs.lines()
                .any(|l| l.contains("rekey: record cannot be re-sealed")
                    && l.contains(id.as_str())
                    && l.contains("k1")),
            "no report for {id}"
        );
    }
    // The tokens stay readable through the API (metadata needs no key).
    let r = app.get(&format!("/v1/tokens/{}", ids[0]), &key).await;
    assert_eq!(r.status(), 200);
    app.stop().await;
}
