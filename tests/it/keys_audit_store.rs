//! Storage contract of the API key store and the audit store: one suite of cases, run against
//! every backend (standalone Redis, a 3-master Redis Cluster, embedded redb) with the backend
//! setup of `store_contract.rs`, so the backends cannot drift apart. The raw-bytes checks (no
//! API key secret anywhere in the store, only hashes) follow the shared cases.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use time::macros::datetime;
use tokengate::crypto::Keyring;
use tokengate::domain::apikeys::{ApiKeyRecord, Scope, Scopes, key_id};
use tokengate::domain::audit::{
    AuditAction, AuditEvent, AuditEventId, AuditLog, AuditTenant, NewAuditEvent, SUCCESS,
};
use tokengate::domain::issuer::IssuerId;
use tokengate::domain::merchant::{Merchant, NewApiKey};
use tokengate::domain::ports::TokenStore;
use tokengate::domain::ports::apikeys::ApiKeyStore;
use tokengate::domain::ports::audit::AuditStore;
use tokengate::domain::service::Services;
use tokengate::domain::token::MerchantId;
use tokengate::storage::codec::audit::TRIM_BATCH;
use tokengate::storage::embedded::EmbeddedStore;

use crate::store_contract::{contains, dump_node};
use crate::support::cases::{cluster_store, redis_store};
use crate::support::redis_server::{RedisCluster, RedisServer};

/// What every backend implements: the three stores on one handle, clones sharing it.
trait Backend: TokenStore + ApiKeyStore + AuditStore + Clone {}
impl<S: TokenStore + ApiKeyStore + AuditStore + Clone> Backend for S {}

// --- fixtures ----------------------------------------------------------------------------------

const T0: OffsetDateTime = datetime!(2026-01-02 03:04:05.123456789 UTC);
/// Whole milliseconds: last use is stored as Unix ms.
const T1: OffsetDateTime = datetime!(2026-02-03 04:05:06.789 UTC);
const T2: OffsetDateTime = datetime!(2026-03-04 05:06:07.001 UTC);
const T3: OffsetDateTime = datetime!(2026-04-05 06:07:08.002 UTC);
const DAY: Duration = Duration::from_secs(86_400);
/// How old events are made (by sleeping) before an append with a shorter retention.
const AGED: Duration = Duration::from_millis(1200);

/// A key record as the domain writes it, and its key (secret and hash).
fn key_record(m: &MerchantId, name: &str, scopes: &[Scope]) -> (ApiKeyRecord, NewApiKey) {
    let key = NewApiKey::generate();
    let rec = ApiKeyRecord {
        id: key_id(&key.hash),
        merchant_id: m.clone(),
        name: name.to_owned(),
        scopes: scopes.iter().copied().collect(),
        created_at: T0,
        revoked_at: None,
        last_used_at: None,
    };
    (rec, key)
}

/// A merchant's trail.
fn t(m: &MerchantId) -> AuditTenant {
    AuditTenant::Merchant(m.clone())
}

fn by_id(mut v: Vec<ApiKeyRecord>) -> Vec<ApiKeyRecord> {
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

fn event(m: &MerchantId, i: usize) -> NewAuditEvent {
    // Both optional subjects, each on some events, so both round-trip through every backend.
    let (action, token_id, key_id) = match i % 3 {
        0 => (AuditAction::CardReveal, Some(format!("tok_{i:0>22}")), None),
        1 => (
            AuditAction::ApiKeyRevoke,
            None,
            Some(format!("key_{i:0>24}")),
        ),
        _ => (AuditAction::MerchantCreate, None, None),
    };
    NewAuditEvent {
        at: OffsetDateTime::now_utc(),
        actor: "key_0123456789abcdef01234567".into(),
        tenant: AuditTenant::Merchant(m.clone()),
        action,
        token_id,
        key_id,
        card_id: None,
        consumer_id: None,
        operation_id: None,
        endpoint_id: None,
        request_id: Some(format!("rid-{i}")),
        outcome: if i.is_multiple_of(2) {
            SUCCESS.into()
        } else {
            "insufficient_scope".into()
        },
    }
}

/// Appends `n` events for `m` (kept a day); returns them with their ids, in append order.
async fn append_n(s: &impl AuditStore, m: &MerchantId, n: usize) -> Vec<AuditEvent> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let e = event(m, i);
        let id = s.append(&e, DAY).await.unwrap();
        out.push(AuditEvent { id, event: e });
    }
    out
}

fn ids(v: &[AuditEvent]) -> Vec<AuditEventId> {
    v.iter().map(|e| e.id).collect()
}

fn newest_first(mut v: Vec<AuditEvent>) -> Vec<AuditEvent> {
    v.reverse();
    v
}

/// Services over one backend (no D1, no cache: every `authenticate` reads the store).
fn services<S: Backend>(s: &S) -> Services {
    let keyring = Keyring::new(&tokengate::crypto::dev::material()).unwrap();
    Services::new(Arc::new(s.clone()), Arc::new(keyring), None, Duration::ZERO)
        .with_keys(Arc::new(s.clone()))
}

crate::store_tests!(by_ref:
    api_keys_insert_find_and_list,
    api_key_revocation_is_kept_and_scoped_to_its_merchant,
    api_key_last_use_is_recorded_apart_from_the_record,
    revoked_keys_no_longer_authenticate,
    api_keys_of_two_merchants_are_isolated,
    audit_lists_newest_first_per_merchant,
    audit_cursor_pages_cover_the_trail_once,
    audit_retention_trims_expired_events_on_append,
    audit_trails_of_issuers_and_merchants_are_apart,
);

// --- API keys ----------------------------------------------------------------------------------

async fn api_keys_insert_find_and_list<S: Backend>(s: &S) {
    let m = MerchantId::generate();
    assert!(s.list_keys(&m).await.unwrap().is_empty(), "no keys yet");
    assert_eq!(
        s.key_by_hash(&NewApiKey::generate().hash).await.unwrap(),
        None
    );

    let (a, ka) = key_record(&m, "billing-engine", &[Scope::Cryptograms]);
    let (b, kb) = key_record(
        &m,
        "ops",
        &[Scope::Keys, Scope::AuditRead, Scope::CardReveal],
    );
    assert!(s.insert_key(&a, &ka.hash).await.unwrap());
    assert!(s.insert_key(&b, &kb.hash).await.unwrap());
    assert_eq!(s.key_by_hash(&ka.hash).await.unwrap(), Some(a.clone()));
    assert_eq!(s.key_by_hash(&kb.hash).await.unwrap(), Some(b.clone()));
    assert_eq!(
        by_id(s.list_keys(&m).await.unwrap()),
        by_id(vec![a.clone(), b.clone()])
    );

    // A record with an id the merchant already has is not written again: the first one stays.
    let mut dup = a.clone();
    dup.name = "impostor".into();
    dup.scopes = Scopes::default_for_merchant_key();
    assert!(!s.insert_key(&dup, &ka.hash).await.unwrap());
    assert_eq!(s.key_by_hash(&ka.hash).await.unwrap(), Some(a.clone()));
    assert_eq!(s.list_keys(&m).await.unwrap().len(), 2);
}

async fn api_key_revocation_is_kept_and_scoped_to_its_merchant<S: Backend>(s: &S) {
    let m = MerchantId::generate();
    let other = MerchantId::generate();
    let (a, ka) = key_record(&m, "a", &[Scope::TokensRead]);
    let (b, kb) = key_record(&m, "b", &[Scope::TokensRead]);
    s.insert_key(&a, &ka.hash).await.unwrap();
    s.insert_key(&b, &kb.hash).await.unwrap();

    // Unknown key, or the key of another merchant: nothing to revoke, nothing changed.
    assert_eq!(
        s.revoke_key(&m, "key_000000000000000000000000", T1)
            .await
            .unwrap(),
        None
    );
    assert_eq!(s.revoke_key(&other, &a.id, T1).await.unwrap(), None);
    assert_eq!(
        s.key_by_hash(&ka.hash).await.unwrap().unwrap().revoked_at,
        None
    );

    let revoked = s.revoke_key(&m, &a.id, T1).await.unwrap().unwrap();
    assert_eq!(
        revoked,
        ApiKeyRecord {
            revoked_at: Some(T1),
            ..a.clone()
        }
    );
    // Revoking again answers the record unchanged: the first revocation time is kept.
    assert_eq!(
        s.revoke_key(&m, &a.id, T2).await.unwrap(),
        Some(revoked.clone())
    );
    assert_eq!(
        s.key_by_hash(&ka.hash).await.unwrap(),
        Some(revoked.clone())
    );
    let listed = by_id(s.list_keys(&m).await.unwrap());
    assert_eq!(listed, by_id(vec![revoked, b.clone()]));
    // The other key of the merchant is untouched.
    assert_eq!(s.key_by_hash(&kb.hash).await.unwrap(), Some(b));
}

async fn api_key_last_use_is_recorded_apart_from_the_record<S: Backend>(s: &S) {
    let m = MerchantId::generate();
    let (a, ka) = key_record(&m, "a", &[Scope::TokensRead]);
    let (b, kb) = key_record(&m, "b", &[Scope::TokensRead]);
    s.insert_key(&a, &ka.hash).await.unwrap();
    s.insert_key(&b, &kb.hash).await.unwrap();
    let last_used = |v: Vec<ApiKeyRecord>, id: &str| {
        v.into_iter()
            .find(|r| r.id == id)
            .expect("listed")
            .last_used_at
    };
    assert_eq!(last_used(s.list_keys(&m).await.unwrap(), &a.id), None);

    s.touch_key(&m, &a.id, T1).await.unwrap();
    assert_eq!(last_used(s.list_keys(&m).await.unwrap(), &a.id), Some(T1));
    assert_eq!(last_used(s.list_keys(&m).await.unwrap(), &b.id), None);
    // Last write wins (the domain writes it at most once a minute).
    s.touch_key(&m, &a.id, T2).await.unwrap();
    assert_eq!(last_used(s.list_keys(&m).await.unwrap(), &a.id), Some(T2));

    // A use recorded after the revocation (a request that was already in flight) does not undo
    // it, and the revocation does not lose the last use.
    s.revoke_key(&m, &a.id, T2).await.unwrap().unwrap();
    s.touch_key(&m, &a.id, T3).await.unwrap();
    let rec = s
        .list_keys(&m)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == a.id)
        .unwrap();
    assert_eq!((rec.revoked_at, rec.last_used_at), (Some(T2), Some(T3)));
    assert_eq!(
        s.key_by_hash(&ka.hash).await.unwrap().unwrap().revoked_at,
        Some(T2)
    );
}

/// Through the domain, as every request authenticates: a revoked key stops working whichever
/// way it was issued (with the merchant, by the merchant, or before key records existed).
async fn revoked_keys_no_longer_authenticate<S: Backend>(s: &S) {
    let svc = services(s);
    assert!(
        svc.authenticate(NewApiKey::generate().secret.as_str())
            .await
            .unwrap()
            .is_none()
    );

    // The key issued with the merchant: default scopes.
    let (merchant, first) = svc.create_merchant("Shop").await.unwrap();
    let c = svc.authenticate(&first.secret).await.unwrap().unwrap();
    assert_eq!(*c.merchant, merchant);
    assert_eq!(c.key_id, key_id(&first.hash));
    assert_eq!(c.scopes, Scopes::default_for_merchant_key());

    // A key the merchant issued: its own scopes.
    let scopes: Scopes = [Scope::TokensRead].into_iter().collect();
    let (rec, reader) = svc
        .create_api_key(&merchant.id, "reader", scopes)
        .await
        .unwrap();
    let c = svc.authenticate(&reader.secret).await.unwrap().unwrap();
    assert_eq!((c.key_id.as_str(), c.scopes), (rec.id.as_str(), scopes));

    assert!(
        svc.revoke_api_key(&merchant.id, &rec.id)
            .await
            .unwrap()
            .is_some()
    );
    assert!(svc.authenticate(&reader.secret).await.unwrap().is_none());
    // The first key too, although the core index still maps its hash to the merchant.
    svc.revoke_api_key(&merchant.id, &key_id(&first.hash))
        .await
        .unwrap()
        .unwrap();
    assert!(svc.authenticate(&first.secret).await.unwrap().is_none());
    assert_eq!(
        s.merchant_by_api_key(&first.hash).await.unwrap(),
        Some(merchant.clone())
    );

    // A key from before key records: authenticates with default scopes, gets a record on
    // first use, and is then revocable like any other.
    let legacy = NewApiKey::generate();
    let old = Merchant {
        id: MerchantId::generate(),
        name: "Old Shop".into(),
        d1_merchant_id: None,
        created_at: T0,
    };
    s.insert_merchant(&old, &legacy.hash).await.unwrap();
    assert_eq!(s.key_by_hash(&legacy.hash).await.unwrap(), None);
    let c = svc.authenticate(&legacy.secret).await.unwrap().unwrap();
    assert_eq!(c.scopes, Scopes::default_for_merchant_key());
    let migrated = s.key_by_hash(&legacy.hash).await.unwrap().unwrap();
    assert_eq!(
        (migrated.id.as_str(), migrated.revoked_at),
        (c.key_id.as_str(), None)
    );
    svc.revoke_api_key(&old.id, &c.key_id)
        .await
        .unwrap()
        .unwrap();
    assert!(svc.authenticate(&legacy.secret).await.unwrap().is_none());
    // A new key of that merchant works: revocation is per key.
    let (_, still) = svc.create_api_key(&old.id, "new", scopes).await.unwrap();
    assert!(svc.authenticate(&still.secret).await.unwrap().is_some());
}

async fn api_keys_of_two_merchants_are_isolated<S: Backend>(s: &S) {
    let a = MerchantId::generate();
    let b = MerchantId::generate();
    let (ra, ka) = key_record(&a, "shared-name", &[Scope::Keys]);
    let (rb, kb) = key_record(&b, "shared-name", &[Scope::Keys]);
    s.insert_key(&ra, &ka.hash).await.unwrap();
    s.insert_key(&rb, &kb.hash).await.unwrap();

    assert_eq!(s.list_keys(&a).await.unwrap(), vec![ra.clone()]);
    assert_eq!(s.list_keys(&b).await.unwrap(), vec![rb.clone()]);
    assert_eq!(
        s.key_by_hash(&kb.hash)
            .await
            .unwrap()
            .map(|r| r.merchant_id),
        Some(b.clone())
    );
    // Merchant A acting on B's key id reaches nothing of B's.
    assert_eq!(s.revoke_key(&a, &rb.id, T1).await.unwrap(), None);
    s.touch_key(&a, &rb.id, T1).await.unwrap();
    assert_eq!(s.list_keys(&b).await.unwrap(), vec![rb.clone()]);
    assert_eq!(s.list_keys(&a).await.unwrap(), vec![ra.clone()]);
    assert_eq!(s.key_by_hash(&kb.hash).await.unwrap(), Some(rb));
    // Even an identical key id under another merchant is another record.
    let mut twin = ra.clone();
    twin.merchant_id = b.clone();
    assert!(
        s.insert_key(&twin, &NewApiKey::generate().hash)
            .await
            .unwrap()
    );
    s.revoke_key(&b, &twin.id, T1).await.unwrap().unwrap();
    assert_eq!(s.key_by_hash(&ka.hash).await.unwrap(), Some(ra));
}

// --- audit trail -------------------------------------------------------------------------------

async fn audit_lists_newest_first_per_merchant<S: Backend>(s: &S) {
    let a = MerchantId::generate();
    let b = MerchantId::generate();
    assert!(
        s.list(&t(&a), None, 10).await.unwrap().is_empty(),
        "empty trail"
    );

    // Interleaved appends of two merchants.
    let mut mine = Vec::new();
    let mut theirs = Vec::new();
    for i in 0..6 {
        let e = event(&a, i);
        mine.push(AuditEvent {
            id: s.append(&e, DAY).await.unwrap(),
            event: e,
        });
        if i.is_multiple_of(2) {
            let e = event(&b, i);
            theirs.push(AuditEvent {
                id: s.append(&e, DAY).await.unwrap(),
                event: e,
            });
        }
    }
    // Ids grow with every append, also within one millisecond.
    assert!(
        ids(&mine).windows(2).all(|w| w[0] < w[1]),
        "{:?}",
        ids(&mine)
    );
    let burst = append_n(s, &a, 20).await;
    assert!(ids(&burst).windows(2).all(|w| w[0] < w[1]));
    assert!(mine.last().unwrap().id < burst[0].id);

    let mut all = mine.clone();
    all.extend(burst);
    // Every field round-trips (tokenId and keyId included), newest first, only A's events.
    assert_eq!(
        s.list(&t(&a), None, 100).await.unwrap(),
        newest_first(all.clone())
    );
    assert_eq!(
        s.list(&t(&b), None, 100).await.unwrap(),
        newest_first(theirs)
    );
    assert_eq!(
        s.list(&t(&a), None, 3).await.unwrap(),
        newest_first(all.clone())[..3].to_vec()
    );
    assert!(
        s.list(&t(&MerchantId::generate()), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn audit_cursor_pages_cover_the_trail_once<S: Backend>(s: &S) {
    let m = MerchantId::generate();
    let other = MerchantId::generate();
    let appended = append_n(s, &m, 7).await;
    append_n(s, &other, 2).await;
    let full = newest_first(appended);

    // The store: `before` is exclusive.
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = s.list(&t(&m), before, 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        before = Some(page.last().unwrap().id);
        pages.push(page);
        assert!(pages.len() <= 3, "pagination does not end");
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(pages.concat(), full);
    assert_eq!(
        s.list(&t(&m), Some(full[2].id), 100).await.unwrap(),
        full[3..].to_vec()
    );
    // The extreme cursors: before everything, after everything.
    assert!(
        s.list(&t(&m), Some(AuditEventId { ms: 0, seq: 0 }), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.list(&t(&m), Some(AuditEventId { ms: 0, seq: 1 }), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let top = AuditEventId {
        ms: u64::MAX,
        seq: u64::MAX,
    };
    assert_eq!(s.list(&t(&m), Some(top), 100).await.unwrap(), full);

    // The domain's cursor: `nextCursor` while a page is full, as the API serves it.
    let log = AuditLog::new(Arc::new(s.clone()), 365);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let (page, next) = log.list(&t(&m), cursor.as_deref(), 4).await.unwrap();
        seen.extend(page);
        match next {
            Some(n) => cursor = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, full);
    assert!(
        log.list(&t(&m), Some("aud_x"), 4).await.is_err(),
        "bad cursor"
    );
}

async fn audit_retention_trims_expired_events_on_append<S: Backend>(s: &S) {
    let m = MerchantId::generate();
    let other = MerchantId::generate();
    append_n(s, &m, 5).await;
    let kept = append_n(s, &other, 2).await;
    tokio::time::sleep(AGED).await;

    // Appending under a retention shorter than the events' age removes them. (Wide margins:
    // `fresh` must still be within `short` when `second` is appended, on a loaded machine.)
    let short = AGED / 2;
    let fresh = event(&m, 100);
    let id = s.append(&fresh, short).await.unwrap();
    let fresh = AuditEvent { id, event: fresh };
    assert_eq!(
        s.list(&t(&m), None, 100).await.unwrap(),
        vec![fresh.clone()]
    );
    // Only that merchant's trail is trimmed.
    assert_eq!(
        s.list(&t(&other), None, 100).await.unwrap(),
        newest_first(kept)
    );
    // Events within retention stay.
    let second = event(&m, 101);
    let id = s.append(&second, short).await.unwrap();
    assert_eq!(
        s.list(&t(&m), None, 100).await.unwrap(),
        vec![AuditEvent { id, event: second }, fresh]
    );

    // More expired events than one append trims on the embedded store (TRIM_BATCH): two
    // appends remove them all on every backend.
    let m = MerchantId::generate();
    append_n(s, &m, TRIM_BATCH + 6).await;
    tokio::time::sleep(AGED).await;
    s.append(&event(&m, 200), short).await.unwrap();
    s.append(&event(&m, 201), short).await.unwrap();
    let left = s.list(&t(&m), None, 200).await.unwrap();
    let rids: Vec<_> = left
        .iter()
        .map(|e| e.event.request_id.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(rids, ["rid-201", "rid-200"]);
}

/// An issuer's event: ids of the card, consumer or operation it concerns, never card data.
fn issuer_event(i: &IssuerId, n: usize) -> NewAuditEvent {
    NewAuditEvent {
        at: OffsetDateTime::now_utc(),
        actor: "key_0123456789abcdef01234567".into(),
        tenant: AuditTenant::Issuer(i.clone()),
        action: if n.is_multiple_of(2) {
            AuditAction::ClickToPayEnrol
        } else {
            AuditAction::ClickToPayProfilesRead
        },
        token_id: None,
        key_id: None,
        card_id: Some(format!("card-{n}")),
        consumer_id: n.is_multiple_of(3).then(|| format!("cons-{n}")),
        operation_id: n.is_multiple_of(2).then(|| format!("op_{n:0>22}")),
        endpoint_id: None,
        request_id: Some(format!("rid-i{n}")),
        outcome: SUCCESS.into(),
    }
}

/// Trails are per tenant: an issuer's events are its own (every field round-trips), a
/// merchant's stay in the merchant's, and neither sees the other's.
async fn audit_trails_of_issuers_and_merchants_are_apart<S: Backend>(s: &S) {
    let i = IssuerId::generate();
    let m = MerchantId::generate();
    let mut theirs = Vec::new();
    for n in 0..4 {
        let e = issuer_event(&i, n);
        theirs.push(AuditEvent {
            id: s.append(&e, DAY).await.unwrap(),
            event: e,
        });
    }
    let mine = append_n(s, &m, 3).await;
    let it = AuditTenant::Issuer(i.clone());
    assert_eq!(
        s.list(&it, None, 100).await.unwrap(),
        newest_first(theirs.clone())
    );
    assert_eq!(s.list(&t(&m), None, 100).await.unwrap(), newest_first(mine));
    assert!(
        s.list(&AuditTenant::Issuer(IssuerId::generate()), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Cursors work on an issuer's trail as on a merchant's.
    let page = s.list(&it, Some(theirs[2].id), 10).await.unwrap();
    assert_eq!(page, newest_first(theirs[..2].to_vec()));
}

/// The stored layout of merchant events did not move: an event written as before issuer
/// trails existed (raw, at `P:{m:M}:audit`, `merchantId` in its JSON) reads back, and an
/// issuer's event goes to `P:{i:I}:audit` with `issuerId`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_merchant_trail_keeps_its_key_and_bytes() {
    let server = RedisServer::start();
    let s = redis_store(&server).await;
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let m = MerchantId::generate();
    let old = format!(
        r#"{{"at":"2026-01-02T03:04:05Z","actor":"key_0123456789abcdef01234567","merchantId":"{m}","action":"api_key.revoke","keyId":"key_aaaaaaaaaaaaaaaaaaaaaaaa","requestId":"rid-1","outcome":"success"}}"#
    );
    let id: String = redis::cmd("XADD")
        .arg(format!("tgtest:{{m:{m}}}:audit"))
        .arg("*")
        .arg("e")
        .arg(&old)
        .query_async(&mut conn)
        .await
        .unwrap();
    let listed = s.list(&t(&m), None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id.to_string(), format!("aud_{id}"));
    assert_eq!(listed[0].event.tenant, t(&m));
    assert_eq!(listed[0].event.action, AuditAction::ApiKeyRevoke);
    assert_eq!(serde_json::to_string(&listed[0].event).unwrap(), old);

    // A new merchant event: same key, same shape.
    s.append(&event(&m, 2), DAY).await.unwrap();
    let n: i64 = redis::cmd("XLEN")
        .arg(format!("tgtest:{{m:{m}}}:audit"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 2);

    let i = IssuerId::generate();
    s.append(&issuer_event(&i, 0), DAY).await.unwrap();
    let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(format!("tgtest:{{i:{i}}}:audit"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(raw.len(), 1);
    let json = &raw[0].1[1];
    assert!(json.contains(&format!(r#""issuerId":"{i}""#)), "{json}");
    assert!(!json.contains("merchantId"), "{json}");
}

// --- raw bytes: API key secrets are never stored, only their hashes ----------------------------

/// What the store was given: secrets that must not be in it, hashes and ids that must.
struct Issued {
    secrets: Vec<String>,
    hashes: Vec<String>,
    ids: Vec<String>,
}

/// Issues keys the way the service does (with a merchant, by the merchant), uses, revokes and
/// audits them.
async fn issue_use_and_revoke<S: Backend>(s: &S) -> Issued {
    let svc = services(s);
    let log = AuditLog::new(Arc::new(s.clone()), 365);
    let (merchant, first) = svc.create_merchant("Hygiene").await.unwrap();
    let scopes: Scopes = [Scope::Cryptograms].into_iter().collect();
    let (a, ka) = svc.create_api_key(&merchant.id, "a", scopes).await.unwrap();
    let (_, kb) = svc.create_api_key(&merchant.id, "b", scopes).await.unwrap();
    for k in [&first, &ka, &kb] {
        // Authenticates, and records the key's last use.
        svc.authenticate(&k.secret).await.unwrap().unwrap();
    }
    svc.revoke_api_key(&merchant.id, &a.id)
        .await
        .unwrap()
        .unwrap();
    let mut out = Issued {
        secrets: Vec::new(),
        hashes: Vec::new(),
        ids: Vec::new(),
    };
    for k in [&first, &ka, &kb] {
        let id = key_id(&k.hash);
        let mut e = event(&merchant.id, 1);
        e.action = AuditAction::ApiKeyCreate;
        e.key_id = Some(id.clone());
        log.record(&e).await.unwrap();
        out.secrets.push(k.secret.to_string());
        out.hashes.push(k.hash.0.clone());
        out.ids.push(id);
    }
    out
}

fn assert_no_secret(bytes: &[u8], issued: &Issued, what: &str) {
    // Positive control: the keys really are in these bytes, by hash and by id.
    for h in &issued.hashes {
        assert!(
            contains(bytes, h.as_bytes()),
            "{what}: key hash not found, the check would be blind"
        );
    }
    for id in &issued.ids {
        assert!(
            contains(bytes, id.as_bytes()),
            "{what}: key id {id} not found"
        );
    }
    for secret in &issued.secrets {
        let body = secret.strip_prefix("tgk_").unwrap();
        assert!(
            !contains(bytes, body.as_bytes()),
            "{what} contains an API key secret"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_raw_values_hold_no_api_key_secret() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let issued = issue_use_and_revoke(&store).await;
    let bytes = dump_node(&server.url()).await;
    assert_no_secret(&bytes, &issued, "redis dump");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_raw_values_hold_no_api_key_secret() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let store = cluster_store(&cluster).await;
    let issued = issue_use_and_revoke(&store).await;
    let bytes = crate::store_contract::dump_cluster(&cluster).await;
    assert_no_secret(&bytes, &issued, "redis cluster dump");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_file_holds_no_api_key_secret() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let issued = issue_use_and_revoke(&store).await;
    drop(store);
    let bytes = std::fs::read(dir.path().join("tokengate.redb")).unwrap();
    assert_no_secret(&bytes, &issued, "tokengate.redb");
}
