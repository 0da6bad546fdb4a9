//! Store-side token counts (`storage::counts`): after a mix of every kind of token write, the
//! counts equal a recount of the records, on standalone Redis, Redis Cluster and redb; records
//! written before the counts existed are counted exactly once by the backfill; and the
//! Cluster-aware token walk visits every primary and can be continued by another instance.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use time::macros::datetime;
use tokengate::domain::merchant::{ApiKeyHash, Merchant};
use tokengate::domain::ports::counts::{TokenCountStore, count_label};
use tokengate::domain::ports::lifecycle::{EventWrite, LifecycleStore};
use tokengate::domain::ports::{InsertOutcome, StoreError, TokenStore};
use tokengate::domain::token::{
    CardMeta, Fingerprints, MerchantId, NetworkTokenMeta, SealedPan, TokenId, TokenRecord,
    TokenStatus, Usage,
};
use tokengate::storage::embedded::EmbeddedStore;
use tokengate::storage::redis::RedisStore;
use tokengate_cards::{Brand, Expiry};

use crate::support::cases::redis_config;
use crate::support::redis_server::{RedisCluster, RedisServer};

trait Store: TokenStore + LifecycleStore + TokenCountStore {}
impl<T: TokenStore + LifecycleStore + TokenCountStore> Store for T {}

fn uid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn merchant() -> Merchant {
    Merchant {
        id: MerchantId::generate(),
        name: "Counts Shop".into(),
        d1_merchant_id: None,
        created_at: datetime!(2026-01-02 03:04:05 UTC),
    }
}

fn record(m: &MerchantId, status: TokenStatus) -> TokenRecord {
    let fp = uid();
    TokenRecord {
        id: TokenId::generate(),
        merchant_id: m.clone(),
        usage: Usage::CardOnFile,
        status,
        card: CardMeta {
            brand: Brand::Visa,
            bin: "411111".into(),
            last4: "1111".into(),
            expiry: Expiry::trusted(12, 2030).expect("valid expiry"),
        },
        network_token: None,
        customer_reference: None,
        sealed_pan: SealedPan {
            key_id: "k1".into(),
            blob: uid().into_bytes(),
        },
        fingerprints: Fingerprints {
            pan: fp.clone(),
            pan_expiry: format!("{fp}e"),
            previous: Vec::new(),
        },
        created_at: datetime!(2026-01-02 03:04:05 UTC),
        updated_at: datetime!(2026-01-02 03:04:05 UTC),
        last_event_at: None,
        recurring_agreement: None,
        version: 1,
    }
}

fn next(rec: &TokenRecord, status: TokenStatus) -> TokenRecord {
    let mut r = rec.clone();
    r.status = status;
    r.version += 1;
    r
}

async fn start_cluster() -> RedisCluster {
    tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("cluster start")
}

/// Every record of the store, tallied by count label (through the token walk and reads).
async fn recount(s: &dyn Store) -> BTreeMap<&'static str, u64> {
    let mut tally: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = s.scan_tokens(cursor.as_deref(), 7).await.unwrap();
        for (m, t) in page.items {
            if !seen.insert((m.to_string(), t.to_string())) {
                continue;
            }
            if let Some(rec) = s.get_token(&m, &t).await.unwrap() {
                *tally.entry(count_label(rec.status.as_str())).or_insert(0) += 1;
            }
        }
        cursor = page.next;
        if cursor.is_none() {
            break;
        }
    }
    tally
}

/// The store's counts, without the zero entries (to compare with [`recount`]).
async fn counts(s: &dyn Store) -> (BTreeMap<&'static str, u64>, bool) {
    let c = s.token_counts().await.unwrap();
    let nonzero = c.by_status.into_iter().filter(|(_, n)| *n > 0).collect();
    (nonzero, c.complete)
}

async fn backfill_to_completion(s: &dyn Store) {
    for _ in 0..1000 {
        if s.backfill_token_counts(3).await.unwrap() {
            return;
        }
    }
    panic!("backfill did not complete");
}

// --- counts follow every kind of write ---------------------------------------------------------

async fn counts_follow_every_token_write(s: &dyn Store) {
    backfill_to_completion(s).await;
    let (m1, m2) = (merchant(), merchant());
    s.insert_merchant(&m1, &ApiKeyHash(uid())).await.unwrap();
    s.insert_merchant(&m2, &ApiKeyHash(uid())).await.unwrap();
    let ttl = Duration::from_secs(60);

    // Reservations (PENDING), activated by D1's answer.
    let mut live = Vec::new();
    for m in [&m1.id, &m1.id, &m1.id, &m2.id, &m2.id] {
        let r = record(m, TokenStatus::Pending);
        assert!(matches!(
            s.insert_token(&r).await.unwrap(),
            InsertOutcome::Inserted
        ));
        let mut a = next(&r, TokenStatus::Active);
        a.network_token = Some(NetworkTokenMeta {
            d1_token_id: format!("d1-{}", uid()),
            last4: Some("9999".into()),
            expiry: Expiry::trusted(1, 2031),
            par: None,
        });
        s.update_token(&a).await.unwrap();
        live.push(a);
    }
    // A duplicate card: `Existing`, nothing counted.
    let mut dup = record(&m1.id, TokenStatus::Pending);
    dup.fingerprints = live[0].fingerprints.clone();
    assert!(matches!(
        s.insert_token(&dup).await.unwrap(),
        InsertOutcome::Existing(_)
    ));
    // A failed reservation, removed (twice: idempotent).
    let failed = record(&m2.id, TokenStatus::Pending);
    s.insert_token(&failed).await.unwrap();
    s.remove_token(&m2.id, &failed.id).await.unwrap();
    s.remove_token(&m2.id, &failed.id).await.unwrap();
    // A reservation left PENDING.
    s.insert_token(&record(&m2.id, TokenStatus::Pending))
        .await
        .unwrap();
    // Suspend, then a stale write (version conflict: nothing moves).
    let suspended = next(&live[0], TokenStatus::Suspended);
    s.update_token(&suspended).await.unwrap();
    assert!(matches!(
        s.update_token(&next(&live[0], TokenStatus::Deleted)).await,
        Err(StoreError::Conflict)
    ));
    // Resume and suspend again through D1 events (one delivered twice).
    let resumed = next(&suspended, TokenStatus::Active);
    assert_eq!(
        s.apply_event(&resumed, "evt-1", ttl).await.unwrap(),
        EventWrite::Applied
    );
    let again = next(&resumed, TokenStatus::Suspended);
    assert_eq!(
        s.apply_event(&again, "evt-2", ttl).await.unwrap(),
        EventWrite::Applied
    );
    assert_eq!(
        s.apply_event(&next(&again, TokenStatus::Deleted), "evt-2", ttl)
            .await
            .unwrap(),
        EventWrite::Duplicate
    );
    // Delete (a tombstone stays, counted as DELETED); a status D1 invented; an update of a
    // token that is gone.
    s.update_token(&next(&live[1], TokenStatus::Deleted))
        .await
        .unwrap();
    s.update_token(&next(&live[2], TokenStatus::Unknown("FROZEN".into())))
        .await
        .unwrap();
    assert!(matches!(
        s.update_token(&next(&failed, TokenStatus::Active)).await,
        Err(StoreError::NotFound)
    ));
    // A re-sealed record (same status): nothing moves.
    let mut resealed = next(&live[3], TokenStatus::Active);
    resealed.sealed_pan.key_id = "k2".into();
    s.update_token(&resealed).await.unwrap();
    // The deleted card tokenized again: a new token beside the tombstone.
    let mut again_card = record(&m1.id, TokenStatus::Pending);
    again_card.fingerprints = live[1].fingerprints.clone();
    assert!(matches!(
        s.insert_token(&again_card).await.unwrap(),
        InsertOutcome::Inserted
    ));

    let expected: BTreeMap<&'static str, u64> = [
        ("ACTIVE", 2),
        ("SUSPENDED", 1),
        ("DELETED", 1),
        ("OTHER", 1),
        ("PENDING", 2),
    ]
    .into_iter()
    .collect();
    let (got, complete) = counts(s).await;
    assert!(complete);
    assert_eq!(got, expected);
    assert_eq!(recount(s).await, expected);
    // The backfill, complete, changes nothing.
    assert!(s.backfill_token_counts(10).await.unwrap());
    assert_eq!(counts(s).await.0, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_follow_every_token_write_redis_standalone() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&redis_config(server.url(), Vec::new()))
        .await
        .unwrap();
    counts_follow_every_token_write(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_follow_every_token_write_redis_cluster() {
    let cluster = start_cluster().await;
    let store = RedisStore::connect(&redis_config(String::new(), cluster.addrs()))
        .await
        .unwrap();
    counts_follow_every_token_write(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_follow_every_token_write_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    counts_follow_every_token_write(&store).await;
}

// --- the backfill of records written before the counts ----------------------------------------

/// Writes a merchant and its tokens the way a build without counts did: raw keys, no `c` field
/// on the token hash, no merchant set entry. Returns the records.
fn write_legacy_redis(conn: &mut dyn redis::ConnectionLike, n: usize) -> Vec<TokenRecord> {
    let m = merchant();
    let mid = m.id.as_str().to_owned();
    redis::cmd("SET")
        .arg(format!("tgtest:merchant:{{{mid}}}"))
        .arg(serde_json::to_string(&m).unwrap())
        .exec(conn)
        .unwrap();
    let statuses = [
        TokenStatus::Active,
        TokenStatus::Suspended,
        TokenStatus::Deleted,
    ];
    (0..n)
        .map(|i| {
            let r = record(&m.id, statuses[i % statuses.len()].clone());
            redis::cmd("HSET")
                .arg(format!("tgtest:{{m:{mid}}}:tok:{}", r.id))
                .arg("v")
                .arg(r.version)
                .arg("s")
                .arg(r.status.as_str())
                .arg("f")
                .arg(&r.fingerprints.pan)
                .arg("n")
                .arg("")
                .arg("d")
                .arg(serde_json::to_string(&r).unwrap())
                .exec(conn)
                .unwrap();
            r
        })
        .collect()
}

/// Legacy records are left out until the backfill counts them, exactly once, while new writes
/// (including to legacy records) keep the counts exact meanwhile.
async fn backfill_counts_legacy_records(s: &dyn Store, legacy: &[TokenRecord]) {
    let (before, complete) = counts(s).await;
    assert!(!complete);
    assert!(before.is_empty(), "{before:?}");
    // A write to a legacy record before the backfill reached it: it is counted then.
    s.update_token(&next(&legacy[0], TokenStatus::Suspended))
        .await
        .unwrap();
    // A new token while the backfill is incomplete.
    let fresh = record(&legacy[1].merchant_id, TokenStatus::Pending);
    s.insert_token(&fresh).await.unwrap();
    backfill_to_completion(s).await;
    let (after, complete) = counts(s).await;
    assert!(complete);
    assert_eq!(after, recount(s).await);
    assert_eq!(after.values().sum::<u64>(), legacy.len() as u64 + 1);
    // Removing a legacy record now counted takes it out again.
    s.remove_token(&legacy[2].merchant_id, &legacy[2].id)
        .await
        .unwrap();
    assert_eq!(counts(s).await.0, recount(s).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_counts_legacy_records_redis_standalone() {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let legacy = write_legacy_redis(&mut conn, 10);
    let store = RedisStore::connect(&redis_config(server.url(), Vec::new()))
        .await
        .unwrap();
    backfill_counts_legacy_records(&store, &legacy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_counts_legacy_records_redis_cluster() {
    let cluster = start_cluster().await;
    let nodes: Vec<String> = cluster
        .addrs()
        .iter()
        .map(|a| format!("redis://{a}"))
        .collect();
    let legacy = tokio::task::spawn_blocking(move || {
        let client = redis::cluster::ClusterClient::new(nodes).unwrap();
        let mut conn = client.get_connection().unwrap();
        // Several merchants, so the records spread over the nodes.
        (0..6)
            .flat_map(|_| write_legacy_redis(&mut conn, 4))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let store = RedisStore::connect(&redis_config(String::new(), cluster.addrs()))
        .await
        .unwrap();
    backfill_counts_legacy_records(&store, &legacy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_counts_legacy_records_embedded() {
    let dir = tempfile::tempdir().unwrap();
    // A file written by a build without counts: the `tokens` table only.
    let m = MerchantId::generate();
    let statuses = [TokenStatus::Active, TokenStatus::Pending];
    let legacy: Vec<TokenRecord> = (0..9)
        .map(|i| record(&m, statuses[i % 2].clone()))
        .collect();
    {
        let db = redb::Database::create(dir.path().join("tokengate.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<(&str, &str), &[u8]> =
                redb::TableDefinition::new("tokens");
            let mut t = txn.open_table(def).unwrap();
            for r in &legacy {
                let json = serde_json::to_vec(r).unwrap();
                t.insert((m.as_str(), r.id.as_str()), json.as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    backfill_counts_legacy_records(&store, &legacy).await;
}

// --- the token walk on a Cluster -----------------------------------------------------------------

/// Many merchants (so their slots spread over the three primaries); the walk, paged small and
/// continued half-way by a second connection (another instance), returns every token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_walk_visits_every_primary_and_resumes_on_another_instance() {
    let cluster = start_cluster().await;
    let a = RedisStore::connect(&redis_config(String::new(), cluster.addrs()))
        .await
        .unwrap();
    let b = RedisStore::connect(&redis_config(String::new(), cluster.addrs()))
        .await
        .unwrap();
    let mut written = BTreeSet::new();
    for _ in 0..30 {
        let m = MerchantId::generate();
        for _ in 0..2 {
            let r = record(&m, TokenStatus::Active);
            a.insert_token(&r).await.unwrap();
            written.insert((m.to_string(), r.id.to_string()));
        }
    }
    // Each node holds some of them: a one-node SCAN would not see them all.
    let mut per_node = Vec::new();
    for addr in cluster.addrs() {
        let port = addr.rsplit_once(':').unwrap().1;
        let out = std::process::Command::new("redis-cli")
            .args(["-p", port, "--scan", "--pattern", "tgtest:{m:*}:tok:*"])
            .output()
            .unwrap();
        per_node.push(String::from_utf8_lossy(&out.stdout).lines().count());
    }
    assert!(
        per_node.iter().filter(|n| **n > 0).count() >= 2,
        "{per_node:?}"
    );

    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let store = if pages % 2 == 0 { &a } else { &b };
        let page = store.scan_tokens(cursor.as_deref(), 5).await.unwrap();
        seen.extend(
            page.items
                .iter()
                .map(|(m, t)| (m.to_string(), t.to_string())),
        );
        pages += 1;
        cursor = page.next;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen, written);

    // A cursor naming a node that is not in the cluster restarts the walk (nothing skipped).
    let page = a
        .scan_tokens(Some("10.255.255.1:1/12345"), 1000)
        .await
        .unwrap();
    let mut seen: BTreeSet<(String, String)> = page
        .items
        .iter()
        .map(|(m, t)| (m.to_string(), t.to_string()))
        .collect();
    let mut cursor = page.next;
    while let Some(c) = cursor {
        let page = a.scan_tokens(Some(&c), 1000).await.unwrap();
        seen.extend(
            page.items
                .iter()
                .map(|(m, t)| (m.to_string(), t.to_string())),
        );
        cursor = page.next;
    }
    assert_eq!(seen, written);
}

/// Job progress survives across instances (the rekey walk and the backfill keep theirs there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_state_is_shared_and_clearable() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisStore::connect(&redis_config(server.url(), Vec::new()))
        .await
        .unwrap();
    let embedded = EmbeddedStore::open(dir.path()).unwrap();
    for s in [&redis as &dyn LifecycleStore, &embedded] {
        assert_eq!(s.load_job_state("j").await.unwrap(), None);
        s.save_job_state("j", Some("c1")).await.unwrap();
        s.save_job_state("j", Some("c2")).await.unwrap();
        assert_eq!(s.load_job_state("j").await.unwrap().as_deref(), Some("c2"));
        s.save_job_state("j", None).await.unwrap();
        assert_eq!(s.load_job_state("j").await.unwrap(), None);
    }
}
