//! Storage contract: one suite of cases, run against every backend (standalone Redis, Redis
//! Cluster, embedded redb), so the backends cannot drift apart. Backend-specific checks (outage,
//! reopen, raw bytes of the store) follow the shared cases.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test that fails must fail loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use time::macros::datetime;
use tokengate::crypto::Keyring;
use tokengate::domain::merchant::{ApiKeyHash, Merchant, NewApiKey};
use tokengate::domain::ports::lifecycle::{EventWrite, LifecycleStore};
use tokengate::domain::ports::{
    IdempotencyBegin, InsertOutcome, StoreError, StoredResponse, TokenStore,
};
use tokengate::domain::recurring::{AgreementAmount, Frequency, RecurringAgreement};
use tokengate::domain::token::{
    CardMeta, Fingerprints, MerchantId, NetworkTokenMeta, SealedPan, TokenId, TokenRecord,
    TokenStatus, Usage,
};
use tokengate::domain::wallet::{WalletKey, WalletPage};
use tokengate::storage::embedded::EmbeddedStore;
use tokengate::storage::redis::{RedisConfig, RedisStore};
use tokengate_cards::{Brand, Expiry, Pan};

use crate::support::cases::{cluster_store, redis_config, redis_store};
use crate::support::redis_server::{RedisCluster, RedisServer};

// --- fixtures ----------------------------------------------------------------------------------

const T0: OffsetDateTime = datetime!(2026-01-02 03:04:05.123456789 UTC);

fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn merchant(d1: Option<&str>) -> Merchant {
    Merchant {
        id: MerchantId::generate(),
        name: "Test Shop".into(),
        d1_merchant_id: d1.map(str::to_owned),
        created_at: T0,
    }
}

/// A token record with a fake sealed PAN (the vault's real sealing is used in the raw-bytes case).
fn record(m: &MerchantId, fingerprint: &str) -> TokenRecord {
    TokenRecord {
        id: TokenId::generate(),
        merchant_id: m.clone(),
        usage: Usage::CardOnFile,
        status: TokenStatus::Active,
        card: CardMeta {
            brand: Brand::Visa,
            bin: "411111".into(),
            last4: "1111".into(),
            expiry: Expiry::trusted(12, 2030).expect("valid expiry"),
        },
        network_token: None,
        customer_reference: Some("customer-42".into()),
        sealed_pan: SealedPan {
            key_id: "k1".into(),
            blob: random_hex().into_bytes(),
        },
        fingerprints: Fingerprints {
            pan: fingerprint.to_owned(),
            pan_expiry: format!("{fingerprint}e"),
            previous: Vec::new(),
        },
        created_at: T0,
        updated_at: T0,
        last_event_at: None,
        recurring_agreement: None,
        version: 1,
    }
}

fn network(d1: &str) -> Option<NetworkTokenMeta> {
    Some(NetworkTokenMeta {
        d1_token_id: d1.to_owned(),
        last4: Some("9999".into()),
        expiry: Expiry::trusted(1, 2031),
        par: Some("PAR123".into()),
    })
}

/// The next version of a record, as the domain would write it.
fn next(r: &TokenRecord) -> TokenRecord {
    let mut n = r.clone();
    n.version += 1;
    n.updated_at = T0 + Duration::from_secs(n.version);
    n
}

fn existing(o: InsertOutcome) -> TokenRecord {
    match o {
        InsertOutcome::Existing(r) => *r,
        InsertOutcome::Inserted => panic!("expected Existing, got Inserted"),
    }
}

fn assert_inserted(o: InsertOutcome) {
    assert!(
        matches!(o, InsertOutcome::Inserted),
        "expected Inserted, got {o:?}"
    );
}

fn response(digest: &str) -> StoredResponse {
    StoredResponse {
        request_digest: digest.to_owned(),
        status: 201,
        body: r#"{"id":"tok_x"}"#.into(),
    }
}

// --- backends ----------------------------------------------------------------------------------

crate::store_tests!(by_ref:
    ping_answers,
    merchants_by_id_api_key_and_d1_id,
    token_insert_and_get,
    duplicate_fingerprint_returns_existing_and_writes_nothing,
    fingerprint_is_scoped_per_merchant,
    versioned_update,
    deleted_status_frees_the_fingerprint,
    d1_index_follows_network_token,
    remove_token_is_idempotent_and_clears_indexes,
    remove_leaves_another_tokens_index_alone,
    idempotency_lifecycle,
    idempotency_entries_expire,
    concurrent_inserts_of_one_card_yield_one_token,
    recurring_agreement_round_trips,
    wallet_pages_cover_each_token_once_newest_first,
    wallet_is_isolated_across_merchants_and_customers,
    wallet_index_follows_status_changes_and_removals,
    wallet_index_follows_applied_events,
    wallet_backfill_leaves_an_indexed_store_as_it_was,
);

// --- the cases ---------------------------------------------------------------------------------

async fn ping_answers(s: &dyn TokenStore) {
    s.ping().await.unwrap();
}

async fn merchants_by_id_api_key_and_d1_id(s: &dyn TokenStore) {
    let d1 = format!("D1M-{}", random_hex());
    let m = merchant(Some(&d1));
    let key = NewApiKey::generate();
    s.insert_merchant(&m, &key.hash).await.unwrap();

    assert_eq!(s.get_merchant(&m.id).await.unwrap(), Some(m.clone()));
    assert_eq!(
        s.merchant_by_api_key(&key.hash).await.unwrap(),
        Some(m.clone())
    );
    assert_eq!(s.merchant_by_d1_id(&d1).await.unwrap(), Some(m.clone()));

    // A merchant not onboarded at D1 yet has no D1 index entry.
    let plain = merchant(None);
    let plain_key = NewApiKey::generate();
    s.insert_merchant(&plain, &plain_key.hash).await.unwrap();
    assert_eq!(
        s.merchant_by_api_key(&plain_key.hash).await.unwrap(),
        Some(plain.clone())
    );
    assert_eq!(s.get_merchant(&plain.id).await.unwrap(), Some(plain));

    // Unknown everything: None, not an error.
    assert_eq!(s.get_merchant(&MerchantId::generate()).await.unwrap(), None);
    let unknown = ApiKeyHash::of("tgk_not-a-key");
    assert_eq!(s.merchant_by_api_key(&unknown).await.unwrap(), None);
    assert_eq!(s.merchant_by_d1_id("D1M-unknown").await.unwrap(), None);
}

async fn token_insert_and_get(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let mut r = record(&m, &random_hex());
    r.last_event_at = Some(T0);
    assert_inserted(s.insert_token(&r).await.unwrap());
    assert_eq!(s.get_token(&m, &r.id).await.unwrap(), Some(r.clone()));
    assert_eq!(
        s.find_by_fingerprint(&m, &r.fingerprints.pan)
            .await
            .unwrap(),
        Some(r.clone())
    );
    // Other id, other merchant: a miss.
    assert_eq!(s.get_token(&m, &TokenId::generate()).await.unwrap(), None);
    let other = MerchantId::generate();
    assert_eq!(s.get_token(&other, &r.id).await.unwrap(), None);
    assert_eq!(
        s.find_by_fingerprint(&other, &r.fingerprints.pan)
            .await
            .unwrap(),
        None
    );
    assert_eq!(s.find_by_fingerprint(&m, "0000").await.unwrap(), None);
    assert_eq!(s.find_by_d1_token(&m, "nope").await.unwrap(), None);
}

async fn duplicate_fingerprint_returns_existing_and_writes_nothing(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let fp = random_hex();
    let first = record(&m, &fp);
    assert_inserted(s.insert_token(&first).await.unwrap());

    let mut dup = record(&m, &fp);
    dup.network_token = network("D1-dup");
    let won = existing(s.insert_token(&dup).await.unwrap());
    assert_eq!(won, first);
    // Nothing of the loser was written: no record, no D1 index, fingerprint still on the winner.
    assert_eq!(s.get_token(&m, &dup.id).await.unwrap(), None);
    assert_eq!(s.find_by_d1_token(&m, "D1-dup").await.unwrap(), None);
    assert_eq!(
        s.find_by_fingerprint(&m, &fp).await.unwrap().map(|r| r.id),
        Some(first.id.clone())
    );
    // Any number of retries give the same answer.
    let again = existing(s.insert_token(&record(&m, &fp)).await.unwrap());
    assert_eq!(again.id, first.id);
}

async fn fingerprint_is_scoped_per_merchant(s: &dyn TokenStore) {
    let fp = random_hex();
    let (m1, m2) = (MerchantId::generate(), MerchantId::generate());
    let r1 = record(&m1, &fp);
    let r2 = record(&m2, &fp);
    assert_inserted(s.insert_token(&r1).await.unwrap());
    assert_inserted(s.insert_token(&r2).await.unwrap());
    assert_eq!(
        s.find_by_fingerprint(&m1, &fp).await.unwrap(),
        Some(r1.clone())
    );
    assert_eq!(
        s.find_by_fingerprint(&m2, &fp).await.unwrap(),
        Some(r2.clone())
    );
    assert_eq!(s.get_token(&m1, &r2.id).await.unwrap(), None);
}

async fn versioned_update(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let r1 = record(&m, &random_hex());
    assert_inserted(s.insert_token(&r1).await.unwrap());

    let mut r2 = next(&r1);
    r2.status = TokenStatus::Suspended;
    r2.last_event_at = Some(T0 + Duration::from_secs(60));
    s.update_token(&r2).await.unwrap();
    assert_eq!(s.get_token(&m, &r1.id).await.unwrap(), Some(r2.clone()));

    // A writer that read version 1 and writes version 2 again lost the race.
    let mut stale = next(&r1);
    stale.status = TokenStatus::Inactive;
    assert!(matches!(
        s.update_token(&stale).await,
        Err(StoreError::Conflict)
    ));
    // A version from the future is a conflict too, and version 0 can never be an update.
    let mut ahead = next(&r2);
    ahead.version += 5;
    assert!(matches!(
        s.update_token(&ahead).await,
        Err(StoreError::Conflict)
    ));
    let mut zero = r2.clone();
    zero.version = 0;
    assert!(matches!(
        s.update_token(&zero).await,
        Err(StoreError::Conflict)
    ));
    // Nothing was written by the refused updates.
    assert_eq!(s.get_token(&m, &r1.id).await.unwrap(), Some(r2.clone()));

    let r3 = next(&r2);
    s.update_token(&r3).await.unwrap();
    assert_eq!(
        s.get_token(&m, &r1.id).await.unwrap().map(|r| r.version),
        Some(3)
    );

    let missing = next(&record(&m, &random_hex()));
    assert!(matches!(
        s.update_token(&missing).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.get_token(&m, &missing.id).await.unwrap(), None);
}

/// The recurring agreement rides on the token record (issue 14): every field, sub-second times
/// included, comes back as written, through insert and versioned update, and ending it sticks.
async fn recurring_agreement_round_trips(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let mut r1 = record(&m, &random_hex());
    r1.network_token = network(&format!("d1-{}", random_hex()));
    r1.recurring_agreement = Some(RecurringAgreement {
        network_transaction_id: "MCC123ABC0115".into(),
        agreement_reference: "sub_8812 (Ünïcode ok)".into(),
        amount: Some(AgreementAmount {
            value: 1999,
            currency: "EUR".into(),
        }),
        frequency: Some(Frequency::Monthly),
        initial_transaction_at: Some(T0 - Duration::from_secs(86_400)),
        recorded_at: T0,
    });
    assert_inserted(s.insert_token(&r1).await.unwrap());
    assert_eq!(s.get_token(&m, &r1.id).await.unwrap(), Some(r1.clone()));

    let mut r2 = next(&r1);
    r2.recurring_agreement = Some(RecurringAgreement {
        network_transaction_id: "483299310332879".into(),
        agreement_reference: "sub_8813".into(),
        amount: None,
        frequency: None,
        initial_transaction_at: None,
        recorded_at: T0 + Duration::from_secs(5),
    });
    s.update_token(&r2).await.unwrap();
    assert_eq!(s.get_token(&m, &r1.id).await.unwrap(), Some(r2.clone()));
    // Found the same way through the indexes the lifecycle uses.
    let d1 = r2.network_token.as_ref().unwrap().d1_token_id.clone();
    assert_eq!(s.find_by_d1_token(&m, &d1).await.unwrap(), Some(r2.clone()));

    let mut r3 = next(&r2);
    r3.recurring_agreement = None;
    s.update_token(&r3).await.unwrap();
    assert_eq!(
        s.get_token(&m, &r1.id)
            .await
            .unwrap()
            .and_then(|r| r.recurring_agreement),
        None
    );
}

async fn deleted_status_frees_the_fingerprint(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let fp = random_hex();
    let old = record(&m, &fp);
    assert_inserted(s.insert_token(&old).await.unwrap());

    let mut tomb = next(&old);
    tomb.status = TokenStatus::Deleted;
    s.update_token(&tomb).await.unwrap();
    // The tombstone stays readable but is no dedup target.
    assert_eq!(s.get_token(&m, &old.id).await.unwrap(), Some(tomb.clone()));
    assert_eq!(s.find_by_fingerprint(&m, &fp).await.unwrap(), None);

    let fresh = record(&m, &fp);
    assert_inserted(s.insert_token(&fresh).await.unwrap());
    assert_eq!(
        s.find_by_fingerprint(&m, &fp).await.unwrap(),
        Some(fresh.clone())
    );

    // Touching the tombstone again must not unhook the new token's fingerprint.
    let tomb2 = next(&tomb);
    s.update_token(&tomb2).await.unwrap();
    assert_eq!(
        s.find_by_fingerprint(&m, &fp).await.unwrap().map(|r| r.id),
        Some(fresh.id.clone())
    );
    assert_eq!(
        existing(s.insert_token(&record(&m, &fp)).await.unwrap()).id,
        fresh.id
    );
}

async fn d1_index_follows_network_token(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let r1 = record(&m, &random_hex());
    assert_inserted(s.insert_token(&r1).await.unwrap());
    let (a, b) = (
        format!("D1A-{}", random_hex()),
        format!("D1B-{}", random_hex()),
    );
    assert_eq!(s.find_by_d1_token(&m, &a).await.unwrap(), None);

    let mut r2 = next(&r1);
    r2.network_token = network(&a);
    s.update_token(&r2).await.unwrap();
    assert_eq!(s.find_by_d1_token(&m, &a).await.unwrap(), Some(r2.clone()));
    // The index is per merchant.
    assert_eq!(
        s.find_by_d1_token(&MerchantId::generate(), &a)
            .await
            .unwrap(),
        None
    );

    let mut r3 = next(&r2);
    r3.network_token = network(&b);
    s.update_token(&r3).await.unwrap();
    assert_eq!(s.find_by_d1_token(&m, &a).await.unwrap(), None);
    assert_eq!(s.find_by_d1_token(&m, &b).await.unwrap(), Some(r3.clone()));

    // A deleted token stays findable by its D1 id (late D1 events still resolve).
    let mut r4 = next(&r3);
    r4.status = TokenStatus::Deleted;
    s.update_token(&r4).await.unwrap();
    assert_eq!(s.find_by_d1_token(&m, &b).await.unwrap(), Some(r4.clone()));

    let mut r5 = next(&r4);
    r5.network_token = None;
    s.update_token(&r5).await.unwrap();
    assert_eq!(s.find_by_d1_token(&m, &b).await.unwrap(), None);

    // Inserted with a network token: indexed at once.
    let mut with = record(&m, &random_hex());
    let c = format!("D1C-{}", random_hex());
    with.network_token = network(&c);
    assert_inserted(s.insert_token(&with).await.unwrap());
    assert_eq!(s.find_by_d1_token(&m, &c).await.unwrap(), Some(with));
}

async fn remove_token_is_idempotent_and_clears_indexes(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let fp = random_hex();
    let d1 = format!("D1-{}", random_hex());
    let mut r = record(&m, &fp);
    r.network_token = network(&d1);
    assert_inserted(s.insert_token(&r).await.unwrap());

    s.remove_token(&m, &r.id).await.unwrap();
    assert_eq!(s.get_token(&m, &r.id).await.unwrap(), None);
    assert_eq!(s.find_by_fingerprint(&m, &fp).await.unwrap(), None);
    assert_eq!(s.find_by_d1_token(&m, &d1).await.unwrap(), None);
    s.remove_token(&m, &r.id).await.unwrap();
    s.remove_token(&m, &TokenId::generate()).await.unwrap();

    // The card can be tokenized again.
    let again = record(&m, &fp);
    assert_inserted(s.insert_token(&again).await.unwrap());
    assert_eq!(s.find_by_fingerprint(&m, &fp).await.unwrap(), Some(again));
}

async fn remove_leaves_another_tokens_index_alone(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let fp = random_hex();
    let old = record(&m, &fp);
    assert_inserted(s.insert_token(&old).await.unwrap());
    let mut tomb = next(&old);
    tomb.status = TokenStatus::Deleted;
    s.update_token(&tomb).await.unwrap();
    let fresh = record(&m, &fp);
    assert_inserted(s.insert_token(&fresh).await.unwrap());

    s.remove_token(&m, &old.id).await.unwrap();
    assert_eq!(s.get_token(&m, &old.id).await.unwrap(), None);
    assert_eq!(s.find_by_fingerprint(&m, &fp).await.unwrap(), Some(fresh));
}

async fn idempotency_lifecycle(s: &dyn TokenStore) {
    let scope = MerchantId::generate().to_string();
    let ttl = Duration::from_secs(60);
    let key = format!("order-{}", random_hex());

    assert_eq!(
        s.idempotency_begin(&scope, &key, "digest-a", ttl)
            .await
            .unwrap(),
        IdempotencyBegin::Started
    );
    assert_eq!(
        s.idempotency_begin(&scope, &key, "digest-a", ttl)
            .await
            .unwrap(),
        IdempotencyBegin::InFlight { same_request: true }
    );
    assert_eq!(
        s.idempotency_begin(&scope, &key, "digest-b", ttl)
            .await
            .unwrap(),
        IdempotencyBegin::InFlight {
            same_request: false
        }
    );
    // Same key in another scope is another key.
    assert_eq!(
        s.idempotency_begin("admin", &key, "digest-a", ttl)
            .await
            .unwrap(),
        IdempotencyBegin::Started
    );

    let resp = response("digest-a");
    s.idempotency_complete(&scope, &key, &resp, ttl)
        .await
        .unwrap();
    assert_eq!(
        s.idempotency_begin(&scope, &key, "digest-a", ttl)
            .await
            .unwrap(),
        IdempotencyBegin::Completed(resp.clone())
    );
    // The stored digest lets the caller tell a replay from a conflicting reuse.
    assert_eq!(
        s.idempotency_begin(&scope, &key, "digest-b", ttl)
            .await
            .unwrap(),
        IdempotencyBegin::Completed(resp.clone())
    );
    // Abort never erases a completed response.
    s.idempotency_abort(&scope, &key).await.unwrap();
    assert_eq!(
        s.idempotency_begin(&scope, &key, "digest-a", ttl)
            .await
            .unwrap(),
        IdempotencyBegin::Completed(resp)
    );

    // Abort frees an in-flight claim; aborting nothing is fine.
    let k2 = format!("order-{}", random_hex());
    assert_eq!(
        s.idempotency_begin(&scope, &k2, "d", ttl).await.unwrap(),
        IdempotencyBegin::Started
    );
    s.idempotency_abort(&scope, &k2).await.unwrap();
    assert_eq!(
        s.idempotency_begin(&scope, &k2, "d2", ttl).await.unwrap(),
        IdempotencyBegin::Started
    );
    s.idempotency_abort(&scope, "never-used").await.unwrap();

    // Printable ASCII keys of the maximum length are fine.
    let long: String = (0..255)
        .map(|i| char::from(b'!' + (i % 94) as u8))
        .collect();
    assert_eq!(
        s.idempotency_begin(&scope, &long, "d", ttl).await.unwrap(),
        IdempotencyBegin::Started
    );
    assert_eq!(
        s.idempotency_begin(&scope, &long, "d", ttl).await.unwrap(),
        IdempotencyBegin::InFlight { same_request: true }
    );
}

async fn idempotency_entries_expire(s: &dyn TokenStore) {
    let scope = "admin";
    let short = Duration::from_millis(200);
    let lock = format!("lock-{}", random_hex());
    let done = format!("done-{}", random_hex());

    assert_eq!(
        s.idempotency_begin(scope, &lock, "d", short).await.unwrap(),
        IdempotencyBegin::Started
    );
    assert_eq!(
        s.idempotency_begin(scope, &done, "d", Duration::from_secs(60))
            .await
            .unwrap(),
        IdempotencyBegin::Started
    );
    s.idempotency_complete(scope, &done, &response("d"), short)
        .await
        .unwrap();
    assert_eq!(
        s.idempotency_begin(scope, &done, "d", short).await.unwrap(),
        IdempotencyBegin::Completed(response("d"))
    );

    tokio::time::sleep(Duration::from_millis(350)).await;
    // A crashed request's claim lapsed, and an old response is forgotten.
    assert_eq!(
        s.idempotency_begin(scope, &lock, "d2", short)
            .await
            .unwrap(),
        IdempotencyBegin::Started
    );
    assert_eq!(
        s.idempotency_begin(scope, &done, "d2", short)
            .await
            .unwrap(),
        IdempotencyBegin::Started
    );
}

async fn concurrent_inserts_of_one_card_yield_one_token(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let fp = random_hex();
    let records: Vec<TokenRecord> = (0..20).map(|_| record(&m, &fp)).collect();
    let outcomes = futures::future::join_all(records.iter().map(|r| s.insert_token(r))).await;

    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for (r, o) in records.iter().zip(outcomes) {
        match o.unwrap() {
            InsertOutcome::Inserted => winners.push(r.id.clone()),
            InsertOutcome::Existing(ex) => losers.push((r.id.clone(), ex.id)),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one insert wins");
    let winner = &winners[0];
    assert_eq!(losers.len(), 19);
    for (loser, reported) in &losers {
        assert_eq!(reported, winner);
        assert_eq!(s.get_token(&m, loser).await.unwrap(), None);
    }
    assert_eq!(
        s.find_by_fingerprint(&m, &fp).await.unwrap().map(|r| r.id),
        Some(winner.clone())
    );
}

// --- backend-specific cases --------------------------------------------------------------------

/// Operations against a dead Redis must fail fast with `Unavailable`, never hang or panic.
async fn assert_unavailable_promptly(s: &dyn TokenStore, timeout: Duration) {
    let m = MerchantId::generate();
    let r = record(&m, &random_hex());
    // Slack for scheduling on a loaded 2-core machine.
    let limit = timeout + Duration::from_millis(750);
    for round in 0..3 {
        let ops: Vec<(&str, Result<(), StoreError>)> = vec![
            ("ping", timed(limit, s.ping()).await),
            (
                "get_token",
                timed(limit, s.get_token(&m, &r.id)).await.map(drop),
            ),
            (
                "insert_token",
                timed(limit, s.insert_token(&r)).await.map(drop),
            ),
            (
                "update_token",
                timed(limit, s.update_token(&next(&r))).await,
            ),
            (
                "merchant_by_api_key",
                timed(limit, s.merchant_by_api_key(&ApiKeyHash::of("x")))
                    .await
                    .map(drop),
            ),
            (
                "idempotency_begin",
                timed(limit, s.idempotency_begin("admin", "k", "d", timeout))
                    .await
                    .map(drop),
            ),
        ];
        for (name, res) in ops {
            assert!(
                matches!(res, Err(StoreError::Unavailable(_))),
                "round {round}, {name}: expected Unavailable, got {res:?}"
            );
        }
    }
}

/// Awaits `fut`, failing the test if it takes longer than `limit`.
async fn timed<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let res = tokio::time::timeout(limit * 4, fut)
        .await
        .expect("store operation hung");
    let took = started.elapsed();
    assert!(took <= limit, "store took {took:?} (limit {limit:?})");
    res
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_unavailable_promptly_and_recovers() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(500);
    let store = RedisStore::connect(&RedisConfig {
        response_timeout: timeout,
        ..redis_config(server.url(), Vec::new())
    })
    .await
    .unwrap();
    let m = MerchantId::generate();
    let r = record(&m, &random_hex());
    assert_inserted(store.insert_token(&r).await.unwrap());

    server.stop();
    assert_unavailable_promptly(&store, timeout).await;

    // Same port, empty dataset (no persistence): the store reconnects on its own and the
    // scripts are reloaded on demand (EVALSHA falls back after NOSCRIPT).
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "store did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_inserted(store.insert_token(&r).await.unwrap());
    assert_eq!(store.get_token(&m, &r.id).await.unwrap(), Some(r.clone()));
    assert_eq!(
        store
            .find_by_fingerprint(&m, &r.fingerprints.pan)
            .await
            .unwrap(),
        Some(r)
    );
}

/// A server that accepts but never answers (stalled, swapping, frozen): only the response
/// deadline can turn that into `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stall_is_unavailable_within_the_response_timeout() {
    let server = RedisServer::start();
    let timeout = Duration::from_millis(500);
    let store = RedisStore::connect(&RedisConfig {
        response_timeout: timeout,
        ..redis_config(server.url(), Vec::new())
    })
    .await
    .unwrap();
    let m = MerchantId::generate();
    let r = record(&m, &random_hex());
    assert_inserted(store.insert_token(&r).await.unwrap());

    server.freeze();
    assert_unavailable_promptly(&store, timeout).await;
    server.thaw();

    let deadline = Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "store did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.get_token(&m, &r.id).await.unwrap(), Some(r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_outage_is_unavailable_promptly() {
    let mut cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let timeout = Duration::from_millis(500);
    let store = RedisStore::connect(&RedisConfig {
        response_timeout: timeout,
        ..redis_config(String::new(), cluster.addrs())
    })
    .await
    .unwrap();
    store.ping().await.unwrap();
    cluster.stop();
    assert_unavailable_promptly(&store, timeout).await;
}

#[tokio::test]
async fn redis_connect_to_nothing_is_unavailable() {
    let port = crate::support::redis_server::free_port();
    let cfg = RedisConfig {
        connect_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_millis(500),
        ..redis_config(format!("redis://127.0.0.1:{port}/"), Vec::new())
    };
    let started = Instant::now();
    let res = RedisStore::connect(&cfg).await;
    assert!(matches!(res, Err(StoreError::Unavailable(_))), "{res:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    let bad_prefix = RedisConfig {
        key_prefix: "a{b}".into(),
        ..cfg
    };
    assert!(matches!(
        RedisStore::connect(&bad_prefix).await,
        Err(StoreError::Unavailable(_))
    ));
}

/// Index entries whose record vanished (e.g. a partial restore) read as misses and do not block
/// a new insert of the same card.
#[tokio::test]
async fn redis_dangling_index_reads_as_none() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let m = MerchantId::generate();
    let fp = random_hex();
    let mut r = record(&m, &fp);
    r.network_token = network("D1-dangling");
    assert_inserted(store.insert_token(&r).await.unwrap());

    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let token_key = format!("tgtest:{{m:{m}}}:tok:{}", r.id);
    let deleted: i64 = redis::cmd("DEL")
        .arg(&token_key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the documented key layout changed");

    assert_eq!(store.find_by_fingerprint(&m, &fp).await.unwrap(), None);
    assert_eq!(
        store.find_by_d1_token(&m, "D1-dangling").await.unwrap(),
        None
    );
    let again = record(&m, &fp);
    assert_inserted(store.insert_token(&again).await.unwrap());
    assert_eq!(
        store.find_by_fingerprint(&m, &fp).await.unwrap(),
        Some(again)
    );
}

/// Every key of one merchant on a standalone server, sorted.
async fn keys_of_merchant(
    con: &mut redis::aio::MultiplexedConnection,
    m: &MerchantId,
) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("tgtest:{{m:{m}}}:*"))
        .query_async(con)
        .await
        .unwrap();
    keys.sort();
    keys
}

/// Index entries are deleted, not just ignored: the finders skip tombstones and dangling
/// entries anyway, so only the raw keys show that nothing is left behind.
#[tokio::test]
async fn redis_index_keys_are_deleted_not_left_dangling() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let m = MerchantId::generate();

    let fp = random_hex();
    let d1 = format!("D1-{}", random_hex());
    let mut r = record(&m, &fp);
    r.network_token = network(&d1);
    assert_inserted(store.insert_token(&r).await.unwrap());
    let token_key = format!("tgtest:{{m:{m}}}:tok:{}", r.id);
    let fp_key = format!("tgtest:{{m:{m}}}:fp:{fp}");
    let d1_key = format!("tgtest:{{m:{m}}}:d1:{d1}");
    // The merchant's token counts live beside its tokens (emptied, and so gone, at the end).
    let counts_key = format!("tgtest:{{m:{m}}}:stats");
    // The customer's wallet index: every status, and the token's status.
    let wallet_key = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(b"customer-42");
        format!("tgtest:{{m:{m}}}:cust:{}", hex::encode(digest))
    };
    let mut all = vec![
        token_key.clone(),
        fp_key.clone(),
        d1_key.clone(),
        counts_key.clone(),
        wallet_key.clone(),
        format!("{wallet_key}:ACTIVE"),
    ];
    all.sort();
    assert_eq!(keys_of_merchant(&mut con, &m).await, all);

    let mut tomb = next(&r);
    tomb.status = TokenStatus::Deleted;
    store.update_token(&tomb).await.unwrap();
    let mut left = vec![
        token_key,
        d1_key,
        counts_key,
        format!("{wallet_key}:DELETED"),
        wallet_key,
    ];
    left.sort();
    assert_eq!(
        keys_of_merchant(&mut con, &m).await,
        left,
        "tombstone keeps no fingerprint entry"
    );

    store.remove_token(&m, &r.id).await.unwrap();
    assert_eq!(keys_of_merchant(&mut con, &m).await, Vec::<String>::new());
}

#[tokio::test]
async fn embedded_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let d1 = format!("D1M-{}", random_hex());
    let merchant = merchant(Some(&d1));
    let key = NewApiKey::generate();
    let fp = random_hex();
    let mut rec = record(&merchant.id, &fp);
    rec.network_token = network("D1-reopen");
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.insert_merchant(&merchant, &key.hash).await.unwrap();
        assert_inserted(store.insert_token(&rec).await.unwrap());
        let mut v2 = next(&rec);
        v2.status = TokenStatus::Suspended;
        store.update_token(&v2).await.unwrap();
        rec = v2;
        store
            .idempotency_complete("admin", "k1", &response("d"), Duration::from_secs(60))
            .await
            .unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(
        store.get_merchant(&merchant.id).await.unwrap(),
        Some(merchant.clone())
    );
    assert_eq!(
        store.merchant_by_api_key(&key.hash).await.unwrap(),
        Some(merchant.clone())
    );
    assert_eq!(
        store.merchant_by_d1_id(&d1).await.unwrap(),
        Some(merchant.clone())
    );
    assert_eq!(
        store.get_token(&merchant.id, &rec.id).await.unwrap(),
        Some(rec.clone())
    );
    assert_eq!(
        store.find_by_fingerprint(&merchant.id, &fp).await.unwrap(),
        Some(rec.clone())
    );
    assert_eq!(
        store
            .find_by_d1_token(&merchant.id, "D1-reopen")
            .await
            .unwrap(),
        Some(rec.clone())
    );
    assert_eq!(
        store
            .idempotency_begin("admin", "k1", "d", Duration::from_secs(60))
            .await
            .unwrap(),
        IdempotencyBegin::Completed(response("d"))
    );
    // Still a dedup target, and still versioned where it was.
    assert_eq!(
        existing(
            store
                .insert_token(&record(&merchant.id, &fp))
                .await
                .unwrap()
        )
        .id,
        rec.id
    );
    let stale = next(&record(&merchant.id, &fp));
    assert!(matches!(
        store.update_token(&stale).await,
        Err(StoreError::NotFound)
    ));
    store.update_token(&next(&rec)).await.unwrap();
}

// --- customer wallets --------------------------------------------------------------------------

/// Every page of `customer`'s wallet (optionally one status), walked with `limit`.
async fn wallet_walk(
    s: &dyn TokenStore,
    m: &MerchantId,
    customer: &str,
    status: Option<&'static str>,
    limit: usize,
) -> Vec<TokenRecord> {
    let mut out = Vec::new();
    let mut after: Option<WalletKey> = None;
    for _ in 0..1000 {
        let WalletPage { tokens, next } = s
            .list_customer_tokens(m, customer, status, after.as_ref(), limit)
            .await
            .unwrap();
        assert!(tokens.len() <= limit);
        out.extend(tokens);
        match next {
            Some(n) => after = Some(n),
            None => return out,
        }
    }
    panic!("the wallet walk does not end");
}

fn ids(records: &[TokenRecord]) -> Vec<TokenId> {
    records.iter().map(|r| r.id.clone()).collect()
}

/// A token of `customer` created `secs` after T0.
fn customer_record(m: &MerchantId, customer: Option<&str>, secs: u64) -> TokenRecord {
    let mut r = record(m, &random_hex());
    r.customer_reference = customer.map(str::to_owned);
    r.created_at = T0 + Duration::from_secs(secs);
    r
}

async fn wallet_pages_cover_each_token_once_newest_first(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let mut mine = Vec::new();
    // Seven tokens, two of them created in the same millisecond (ordered by id then).
    for secs in [5, 1, 3, 3, 7, 2, 9] {
        let r = customer_record(&m, Some("cust-a"), secs);
        assert_inserted(s.insert_token(&r).await.unwrap());
        mine.push(r);
    }
    // Newest first, ties by token id (descending): the order of the positions.
    mine.sort_by_key(|r| std::cmp::Reverse(WalletKey::of(r)));
    for limit in [1, 2, 3, 7, 100] {
        let got = wallet_walk(s, &m, "cust-a", None, limit).await;
        assert_eq!(ids(&got), ids(&mine), "limit {limit}");
        assert_eq!(got, mine, "the records as stored");
    }
    // Exactly one page: no next cursor.
    let page = s
        .list_customer_tokens(&m, "cust-a", None, None, 7)
        .await
        .unwrap();
    assert_eq!(page.tokens.len(), 7);
    assert_eq!(page.next, None);
    // A cursor past the oldest entry: an empty last page.
    let oldest = WalletKey::of(&mine[6]);
    let page = s
        .list_customer_tokens(&m, "cust-a", None, Some(&oldest), 5)
        .await
        .unwrap();
    assert_eq!(page, WalletPage::default());
}

async fn wallet_is_isolated_across_merchants_and_customers(s: &dyn TokenStore) {
    let (m1, m2) = (MerchantId::generate(), MerchantId::generate());
    let a1 = customer_record(&m1, Some("cust-a"), 1);
    let b1 = customer_record(&m1, Some("cust-b"), 2);
    // A customer reference that extends another's, and one with key separators in it.
    let ab1 = customer_record(&m1, Some("cust-a:ACTIVE"), 3);
    let brace = customer_record(&m1, Some("{m:x} cust a"), 4);
    let none = customer_record(&m1, None, 5);
    let a2 = customer_record(&m2, Some("cust-a"), 6);
    for r in [&a1, &b1, &ab1, &brace, &none, &a2] {
        assert_inserted(s.insert_token(r).await.unwrap());
    }
    assert_eq!(
        ids(&wallet_walk(s, &m1, "cust-a", None, 10).await),
        vec![a1.id.clone()]
    );
    assert_eq!(
        ids(&wallet_walk(s, &m1, "cust-a", Some("ACTIVE"), 10).await),
        vec![a1.id.clone()]
    );
    assert_eq!(
        ids(&wallet_walk(s, &m1, "cust-b", None, 10).await),
        vec![b1.id.clone()]
    );
    assert_eq!(
        ids(&wallet_walk(s, &m1, "cust-a:ACTIVE", None, 10).await),
        vec![ab1.id.clone()]
    );
    assert_eq!(
        ids(&wallet_walk(s, &m1, "{m:x} cust a", None, 10).await),
        vec![brace.id.clone()]
    );
    assert_eq!(
        ids(&wallet_walk(s, &m2, "cust-a", None, 10).await),
        vec![a2.id.clone()]
    );
    // Unknown customer or merchant: empty, not an error.
    assert!(wallet_walk(s, &m1, "cust-z", None, 10).await.is_empty());
    assert!(
        wallet_walk(s, &MerchantId::generate(), "cust-a", None, 10)
            .await
            .is_empty()
    );
    assert!(
        wallet_walk(s, &m1, "cust-a", Some("DELETED"), 10)
            .await
            .is_empty()
    );
}

async fn wallet_index_follows_status_changes_and_removals(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let a = customer_record(&m, Some("cust-a"), 1);
    let b = customer_record(&m, Some("cust-a"), 2);
    let c = customer_record(&m, Some("cust-a"), 3);
    for r in [&a, &b, &c] {
        assert_inserted(s.insert_token(r).await.unwrap());
    }
    let by = |status| wallet_walk(s, &m, "cust-a", Some(status), 10);
    assert_eq!(
        ids(&by("ACTIVE").await),
        [c.id.clone(), b.id.clone(), a.id.clone()]
    );

    // Suspend b: it moves from ACTIVE to SUSPENDED, and reads back in its new status.
    let mut b2 = next(&b);
    b2.status = TokenStatus::Suspended;
    s.update_token(&b2).await.unwrap();
    assert_eq!(ids(&by("ACTIVE").await), [c.id.clone(), a.id.clone()]);
    assert_eq!(by("SUSPENDED").await, [b2.clone()]);
    // A refused update (stale version) moves nothing.
    let mut stale = next(&b);
    stale.status = TokenStatus::Deleted;
    assert!(matches!(
        s.update_token(&stale).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(by("SUSPENDED").await, [b2.clone()]);
    assert!(by("DELETED").await.is_empty());

    // Delete a: a tombstone stays listed, under DELETED.
    let mut a2 = next(&a);
    a2.status = TokenStatus::Deleted;
    s.update_token(&a2).await.unwrap();
    assert_eq!(by("DELETED").await, [a2.clone()]);
    // A status D1 invented is listed under OTHER.
    let mut c2 = next(&c);
    c2.status = TokenStatus::Unknown("FROZEN".into());
    s.update_token(&c2).await.unwrap();
    assert_eq!(by("OTHER").await, [c2.clone()]);
    assert!(by("ACTIVE").await.is_empty());
    assert_eq!(
        wallet_walk(s, &m, "cust-a", None, 2).await,
        [c2.clone(), b2.clone(), a2.clone()]
    );

    // Removal takes the token out of every index; removing again is a no-op.
    s.remove_token(&m, &b.id).await.unwrap();
    s.remove_token(&m, &b.id).await.unwrap();
    assert!(by("SUSPENDED").await.is_empty());
    assert_eq!(
        ids(&wallet_walk(s, &m, "cust-a", None, 10).await),
        [c.id.clone(), a.id.clone()]
    );
    // A failed reservation removed and the card tokenized again: listed once.
    s.remove_token(&m, &a.id).await.unwrap();
    let again = customer_record(&m, Some("cust-a"), 4);
    assert_inserted(s.insert_token(&again).await.unwrap());
    assert_eq!(
        ids(&wallet_walk(s, &m, "cust-a", None, 1).await),
        [again.id.clone(), c.id.clone()]
    );
}

async fn wallet_index_follows_applied_events<S: TokenStore + LifecycleStore>(s: &S) {
    let m = MerchantId::generate();
    let a = customer_record(&m, Some("cust-a"), 1);
    assert_inserted(s.insert_token(&a).await.unwrap());
    let mut a2 = next(&a);
    a2.status = TokenStatus::Suspended;
    assert_eq!(
        s.apply_event(&a2, "evt-1", Duration::from_secs(60))
            .await
            .unwrap(),
        EventWrite::Applied
    );
    let suspended = wallet_walk(s, &m, "cust-a", Some("SUSPENDED"), 10).await;
    assert_eq!(suspended, [a2.clone()]);
    assert!(
        wallet_walk(s, &m, "cust-a", Some("ACTIVE"), 10)
            .await
            .is_empty()
    );
    // A duplicate event moves nothing.
    let mut a3 = next(&a2);
    a3.status = TokenStatus::Active;
    assert_eq!(
        s.apply_event(&a3, "evt-1", Duration::from_secs(60))
            .await
            .unwrap(),
        EventWrite::Duplicate
    );
    assert_eq!(wallet_walk(s, &m, "cust-a", None, 10).await, [a2]);
}

// --- raw bytes hygiene -------------------------------------------------------------------------

const PANS: [&str; 2] = ["4111111111111111", "5555555555554444"];

/// Inserts one token per test PAN sealed by the real vault, the way the service does.
async fn insert_sealed_cards(s: &dyn TokenStore) -> Vec<TokenRecord> {
    let keyring = Keyring::new(&tokengate::crypto::dev::material()).unwrap();
    let m = merchant(Some("D1M-hygiene"));
    s.insert_merchant(&m, &NewApiKey::generate().hash)
        .await
        .unwrap();
    let mut out = Vec::new();
    for digits in PANS {
        let pan: Pan = digits.parse().unwrap();
        let expiry = Expiry::trusted(12, 2030).unwrap();
        let id = TokenId::generate();
        let mut r = record(&m.id, "placeholder");
        r.id = id.clone();
        r.card = CardMeta {
            brand: pan.brand(),
            bin: pan.bin().to_owned(),
            last4: pan.last4().to_owned(),
            expiry,
        };
        r.sealed_pan = keyring.seal(&pan, &m.id, &id);
        r.fingerprints = keyring.fingerprints(&m.id, &pan, &expiry);
        r.network_token = network(&format!("D1-{}", random_hex()));
        assert_inserted(s.insert_token(&r).await.unwrap());
        // An update writes the record again (and a tombstone keeps it).
        let mut v2 = next(&r);
        v2.status = TokenStatus::Deleted;
        s.update_token(&v2).await.unwrap();
        out.push(v2);
    }
    out
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn assert_no_pan(bytes: &[u8], records: &[TokenRecord], what: &str) {
    // Positive control: the records are really in these bytes, uncompressed.
    for r in records {
        assert!(
            contains(bytes, r.id.as_str().as_bytes()),
            "{what}: token {} not found in the dump, the check would be blind",
            r.id
        );
        let blob = base64_of(&r.sealed_pan.blob);
        assert!(
            contains(bytes, blob.as_bytes()),
            "{what}: sealed blob not found"
        );
    }
    for pan in PANS {
        assert!(
            !contains(bytes, pan.as_bytes()),
            "{what} contains a PAN in clear"
        );
    }
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// [`dump_node`] of every node of a cluster, concatenated.
pub(crate) async fn dump_cluster(cluster: &RedisCluster) -> Vec<u8> {
    let mut out = Vec::new();
    for addr in cluster.addrs() {
        out.extend(dump_node(&format!("redis://{addr}/")).await);
    }
    out
}

/// Every value of every key on one Redis node, in its plain form (GET/HGETALL/XRANGE) and as
/// `DUMP`.
pub(crate) async fn dump_node(url: &str) -> Vec<u8> {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    let mut out = Vec::new();
    for key in keys {
        out.extend_from_slice(key.as_bytes());
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        match kind.as_str() {
            "string" => {
                let v: Vec<u8> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut con)
                    .await
                    .unwrap();
                out.extend_from_slice(&v);
            }
            "hash" => {
                let v: Vec<Vec<u8>> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut con)
                    .await
                    .unwrap();
                v.iter().for_each(|f| out.extend_from_slice(f));
            }
            "set" => {
                let v: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
                    .arg(&key)
                    .query_async(&mut con)
                    .await
                    .unwrap();
                v.iter().for_each(|f| out.extend_from_slice(f));
            }
            "stream" => {
                let v: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut con)
                    .await
                    .unwrap();
                for (id, fields) in v {
                    out.extend_from_slice(id.as_bytes());
                    fields.iter().for_each(|f| out.extend_from_slice(f));
                }
            }
            "zset" => {
                let v: Vec<Vec<u8>> = redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut con)
                    .await
                    .unwrap();
                v.iter().for_each(|f| out.extend_from_slice(f));
            }
            // Deleted between `KEYS` and `TYPE` (a webhook delivery or a lease ending while the
            // node is read): it holds no bytes any more, so there is nothing to look at.
            "none" => continue,
            other => panic!("unexpected Redis type {other} at {key}"),
        }
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        out.extend_from_slice(&dump);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_raw_values_never_hold_a_pan() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let records = insert_sealed_cards(&store).await;
    let bytes = dump_node(&server.url()).await;
    assert_no_pan(&bytes, &records, "redis dump");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_raw_values_never_hold_a_pan() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let store = cluster_store(&cluster).await;
    let records = insert_sealed_cards(&store).await;
    let bytes = dump_cluster(&cluster).await;
    assert_no_pan(&bytes, &records, "redis cluster dump");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_file_never_holds_a_pan() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let records = insert_sealed_cards(&store).await;
    drop(store);
    let bytes = std::fs::read(dir.path().join("tokengate.redb")).unwrap();
    assert_no_pan(&bytes, &records, "tokengate.redb");
}

/// The wallet index holds positions and token ids only: dumped with everything else, and the
/// customer reference itself is not a key part on Redis (hashed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_index_never_holds_a_pan() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let records = insert_sealed_cards(&store).await;
    let m = &records[0].merchant_id;
    let listed = wallet_walk(&store, m, "customer-42", None, 10).await;
    assert_eq!(listed.len(), PANS.len(), "the index is there to dump");
    let bytes = dump_node(&server.url()).await;
    assert!(contains(&bytes, b":cust:"), "no wallet key in the dump");
    assert!(contains(
        &bytes,
        WalletKey::of(&records[0]).as_str().as_bytes()
    ));
    assert_no_pan(&bytes, &records, "redis dump with wallet index");

    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let records = insert_sealed_cards(&store).await;
    let m = &records[0].merchant_id;
    assert_eq!(
        wallet_walk(&store, m, "customer-42", None, 10).await.len(),
        PANS.len()
    );
    drop(store);
    let bytes = std::fs::read(dir.path().join("tokengate.redb")).unwrap();
    assert!(contains(
        &bytes,
        WalletKey::of(&records[0]).as_str().as_bytes()
    ));
    assert_no_pan(&bytes, &records, "tokengate.redb with wallet index");
}

/// The store hands out one shared handle: clones work concurrently on the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_are_shareable_across_tasks() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<Arc<dyn TokenStore>> = vec![
        Arc::new(redis_store(&server).await),
        Arc::new(EmbeddedStore::open(dir.path()).unwrap()),
    ];
    for store in stores {
        let m = MerchantId::generate();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (store, m) = (Arc::clone(&store), m.clone());
                tokio::spawn(async move {
                    let r = record(&m, &random_hex());
                    store.insert_token(&r).await.unwrap();
                    r.id
                })
            })
            .collect();
        for t in tasks {
            let id = t.await.unwrap();
            assert!(store.get_token(&m, &id).await.unwrap().is_some());
        }
    }
}

// --- the wallet index backfill (tokens stored before the index existed) -------------------------

/// The customer of the backfill cases.
const LEGACY_CUSTOMER: &str = "cust legacy:{m:x}";

/// Token ids, sorted (a duplicate stays visible).
fn sorted_ids(records: &[TokenRecord]) -> Vec<String> {
    let mut v: Vec<String> = records.iter().map(|r| r.id.to_string()).collect();
    v.sort();
    v
}

/// Steps the backfill with small batches, round robin over `stores` (instances sharing one
/// backend), calling `between(step)` after each step; returns the number of steps.
async fn backfill_wallets<F, Fut>(stores: &[&dyn TokenStore], mut between: F) -> usize
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for step in 0..2000 {
        let done = stores[step % stores.len()]
            .backfill_wallet_index(2)
            .await
            .unwrap();
        between(step).await;
        if done {
            return step + 1;
        }
    }
    panic!("the wallet index backfill does not complete");
}

/// On a store whose tokens were all written with the index, the backfill completes and changes
/// nothing: each token listed once, as before.
async fn wallet_backfill_leaves_an_indexed_store_as_it_was(s: &dyn TokenStore) {
    let m = MerchantId::generate();
    let mut mine = Vec::new();
    for i in 0..5 {
        let r = customer_record(&m, Some(LEGACY_CUSTOMER), i);
        assert_inserted(s.insert_token(&r).await.unwrap());
        mine.push(r);
    }
    s.insert_token(&customer_record(&m, None, 9)).await.unwrap();
    let before = ids(&wallet_walk(s, &m, LEGACY_CUSTOMER, None, 2).await);
    backfill_wallets(&[s], |_| async {}).await;
    assert!(s.wallet_index_complete().await.unwrap());
    assert!(s.backfill_wallet_index(10).await.unwrap(), "stays complete");
    assert_eq!(wallet_walk(s, &m, LEGACY_CUSTOMER, None, 2).await.len(), 5);
    assert_eq!(
        ids(&wallet_walk(s, &m, LEGACY_CUSTOMER, None, 2).await),
        before
    );
    let active = wallet_walk(s, &m, LEGACY_CUSTOMER, Some("ACTIVE"), 3).await;
    assert_eq!(active.len(), 5);
}

/// Tokens as a build before the wallet index wrote them (the caller strips their index
/// entries afterwards): eight of [`LEGACY_CUSTOMER`] in several statuses, two of another
/// customer, two without one. Written through the store, so every other index is as usual.
async fn write_legacy_tokens(s: &dyn TokenStore, m: &MerchantId) -> Vec<TokenRecord> {
    let statuses = [
        TokenStatus::Active,
        TokenStatus::Suspended,
        TokenStatus::Active,
        TokenStatus::Deleted,
        TokenStatus::Pending,
        TokenStatus::Unknown("FROZEN".into()),
    ];
    let mut out = Vec::new();
    for i in 0..12u64 {
        let customer = match i {
            0..8 => Some(LEGACY_CUSTOMER),
            8..10 => Some("cust-other"),
            _ => None,
        };
        let r = customer_record(m, customer, i);
        assert_inserted(s.insert_token(&r).await.unwrap());
        let mut u = next(&r);
        u.status = statuses[i as usize % statuses.len()].clone();
        s.update_token(&u).await.unwrap();
        out.push(u);
    }
    out
}

/// Makes `legacy` look as a build before the wallet index left them on Redis: no `w` / `o` in
/// the token hashes, no wallet sorted sets, no backfill progress.
fn strip_redis_wallet_index(conn: &mut dyn redis::ConnectionLike, legacy: &[TokenRecord]) {
    use sha2::{Digest, Sha256};
    for r in legacy {
        let m = r.merchant_id.as_str();
        redis::cmd("HDEL")
            .arg(format!("tgtest:{{m:{m}}}:tok:{}", r.id))
            .arg("w")
            .arg("o")
            .exec(conn)
            .unwrap();
        if let Some(c) = &r.customer_reference {
            let base = format!(
                "tgtest:{{m:{m}}}:cust:{}",
                hex::encode(Sha256::digest(c.as_bytes()))
            );
            for label in [
                "",
                ":PENDING",
                ":ACTIVE",
                ":SUSPENDED",
                ":DELETED",
                ":OTHER",
            ] {
                redis::cmd("DEL")
                    .arg(format!("{base}{label}"))
                    .exec(conn)
                    .unwrap();
            }
        }
    }
    redis::cmd("DEL")
        .arg("tgtest:job:{wallet-index-backfill}")
        .exec(conn)
        .unwrap();
}

/// The backfill of `legacy` (stored without index entries), on `stores` (instances of one
/// backend, used in turn): meanwhile a legacy token is updated, one removed, new tokens
/// inserted. Afterwards every token is listed exactly once, in its status, and the removed one
/// nowhere.
async fn wallet_backfill_indexes_legacy_tokens(stores: &[&dyn TokenStore], legacy: &[TokenRecord]) {
    let s = stores[0];
    let m = legacy[0].merchant_id.clone();
    for st in stores {
        assert!(!st.wallet_index_complete().await.unwrap());
    }
    assert!(
        wallet_walk(s, &m, LEGACY_CUSTOMER, None, 5)
            .await
            .is_empty()
    );
    // A new token before the backfill: indexed by its own insert.
    let fresh = customer_record(&m, Some(LEGACY_CUSTOMER), 100);
    assert_inserted(s.insert_token(&fresh).await.unwrap());
    let updated = {
        let mut u = next(&legacy[0]);
        u.status = TokenStatus::Suspended;
        u
    };
    let removed = legacy[1].clone();
    let later = customer_record(&m, Some(LEGACY_CUSTOMER), 200);
    let steps = backfill_wallets(stores, |step| {
        let (updated, removed, later) = (updated.clone(), removed.clone(), later.clone());
        async move {
            match step {
                0 => s.update_token(&updated).await.unwrap(),
                1 => s
                    .remove_token(&removed.merchant_id, &removed.id)
                    .await
                    .unwrap(),
                2 => assert_inserted(s.insert_token(&later).await.unwrap()),
                _ => {}
            }
        }
    })
    .await;
    assert!(steps > 3, "several small steps ({steps})");
    for st in stores {
        assert!(st.wallet_index_complete().await.unwrap());
    }

    // Each token of the customer exactly once (a Vec: a duplicate would show), in its status.
    let mut expected: Vec<TokenRecord> = legacy[..8]
        .iter()
        .filter(|r| r.id != removed.id)
        .map(|r| {
            if r.id == updated.id {
                updated.clone()
            } else {
                r.clone()
            }
        })
        .collect();
    expected.push(fresh.clone());
    expected.push(later.clone());
    let want = sorted_ids(&expected);
    let got = sorted_ids(&wallet_walk(s, &m, LEGACY_CUSTOMER, None, 3).await);
    assert_eq!(got, want);
    for label in ["PENDING", "ACTIVE", "SUSPENDED", "DELETED", "OTHER"] {
        let in_label: Vec<TokenRecord> = expected
            .iter()
            .filter(|r| r.status.label() == label)
            .cloned()
            .collect();
        let got = sorted_ids(&wallet_walk(s, &m, LEGACY_CUSTOMER, Some(label), 2).await);
        assert_eq!(got, sorted_ids(&in_label), "{label}");
    }
    // The other customer's tokens are theirs; tokens without a customer are in no wallet.
    assert_eq!(
        sorted_ids(&wallet_walk(s, &m, "cust-other", None, 5).await),
        sorted_ids(&legacy[8..10])
    );
    // Complete: further steps change nothing.
    assert!(s.backfill_wallet_index(5).await.unwrap());
    assert_eq!(
        wallet_walk(s, &m, LEGACY_CUSTOMER, None, 50).await.len(),
        want.len()
    );
    // The legacy tokens behave as indexed ones now: a removal takes them out.
    let gone = &legacy[2];
    s.remove_token(&gone.merchant_id, &gone.id).await.unwrap();
    let after = ids(&wallet_walk(s, &m, LEGACY_CUSTOMER, None, 50).await);
    assert_eq!(after.len(), want.len() - 1);
    assert!(!after.contains(&gone.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_backfill_indexes_legacy_tokens_redis_standalone() {
    let server = RedisServer::start();
    let a = redis_store(&server).await;
    let b = redis_store(&server).await;
    let legacy = write_legacy_tokens(&a, &MerchantId::generate()).await;
    let client = redis::Client::open(server.url()).unwrap();
    strip_redis_wallet_index(&mut client.get_connection().unwrap(), &legacy);
    wallet_backfill_indexes_legacy_tokens(&[&a, &b], &legacy).await;
}

/// Two instances on a Cluster take turns: the walk over every primary continues from the
/// progress the other saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_backfill_indexes_legacy_tokens_redis_cluster_on_two_instances() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("cluster start");
    let a = cluster_store(&cluster).await;
    let b = cluster_store(&cluster).await;
    // Other merchants' tokens on every node, so the walk has several primaries to visit.
    for _ in 0..10 {
        let m = MerchantId::generate();
        a.insert_token(&customer_record(&m, Some("x"), 1))
            .await
            .unwrap();
    }
    let legacy = write_legacy_tokens(&a, &MerchantId::generate()).await;
    let nodes: Vec<String> = cluster
        .addrs()
        .iter()
        .map(|n| format!("redis://{n}"))
        .collect();
    let stripped = legacy.clone();
    tokio::task::spawn_blocking(move || {
        let client = redis::cluster::ClusterClient::new(nodes).unwrap();
        strip_redis_wallet_index(&mut client.get_connection().unwrap(), &stripped);
    })
    .await
    .unwrap();
    wallet_backfill_indexes_legacy_tokens(&[&a, &b], &legacy).await;
}

/// Deletes the wallet index rows and the backfill progress of a closed embedded file, as a
/// build before the index left it.
fn strip_embedded_wallet_index(dir: &std::path::Path) {
    let db = redb::Database::create(dir.join("tokengate.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    let wallet: redb::TableDefinition<(&str, &str, &str, &str), ()> =
        redb::TableDefinition::new("wallet_index");
    let progress: redb::TableDefinition<&str, (bool, &str, &str)> =
        redb::TableDefinition::new("wallet_index_progress");
    txn.delete_table(wallet).unwrap();
    txn.delete_table(progress).unwrap();
    txn.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_backfill_indexes_legacy_tokens_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        write_legacy_tokens(&s, &MerchantId::generate()).await
    };
    strip_embedded_wallet_index(dir.path());
    let s = EmbeddedStore::open(dir.path()).unwrap();
    wallet_backfill_indexes_legacy_tokens(&[&s], &legacy).await;
}

/// The embedded backfill continues after a restart from its saved watermark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_backfill_resumes_after_a_restart_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        write_legacy_tokens(&s, &MerchantId::generate()).await
    };
    strip_embedded_wallet_index(dir.path());
    let m = legacy[0].merchant_id.clone();
    {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert!(!s.backfill_wallet_index(3).await.unwrap());
        assert!(!s.backfill_wallet_index(3).await.unwrap());
        let partial = wallet_walk(&s, &m, LEGACY_CUSTOMER, None, 50).await.len();
        assert!(partial < 8, "{partial}");
    }
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert!(!s.wallet_index_complete().await.unwrap());
    backfill_wallets(&[&s], |_| async {}).await;
    assert_eq!(wallet_walk(&s, &m, LEGACY_CUSTOMER, None, 3).await.len(), 8);
}
