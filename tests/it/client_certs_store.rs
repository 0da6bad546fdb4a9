//! Client certificate bindings in the store (`storage::client_certs`), on every backend
//! (standalone Redis, Redis Cluster, embedded): a policy replaces the previous one and moves
//! the fingerprint index along, a certificate binds to one merchant only, and an index entry
//! its merchant's policy no longer lists (an interrupted change) binds nothing and can be taken
//! over. Issuers bind under their tenant id in the same index (one tenant per certificate).

use time::OffsetDateTime;
use tokengate::domain::apikeys::Scopes;
use tokengate::domain::client_certs::{BoundCert, CertAuthMode, CertFingerprint, ClientCertPolicy};
use tokengate::domain::ports::client_certs::{ClientCertStore, PutPolicy};
use tokengate::domain::token::MerchantId;
use tokengate::storage::embedded::EmbeddedStore;
use tokengate::storage::redis::RedisStore;

use crate::support::cases::redis_config;
use crate::support::redis_server::{RedisCluster, RedisServer};

fn cert(seed: &str) -> BoundCert {
    BoundCert {
        sha256: CertFingerprint::of_der(format!("{seed}-{}", uuid::Uuid::new_v4()).as_bytes()),
        name: seed.to_owned(),
        scopes: Scopes::default_for_merchant_key(),
    }
}

fn policy(m: &MerchantId, mode: CertAuthMode, certs: &[&BoundCert]) -> ClientCertPolicy {
    ClientCertPolicy {
        merchant_id: m.clone(),
        mode,
        certificates: certs.iter().map(|c| (*c).clone()).collect(),
        // Whole seconds: RFC 3339 round trips keep them exactly.
        updated_at: OffsetDateTime::from_unix_timestamp(1_767_000_000).unwrap(),
    }
}

async fn bound_to(s: &dyn ClientCertStore, c: &BoundCert) -> Option<MerchantId> {
    // As readers do: the index names a merchant whose policy lists the certificate.
    let m = s.merchant_by_client_cert(&c.sha256).await.unwrap()?;
    let p = s.client_cert_policy(&m).await.unwrap()?;
    p.cert(&c.sha256).map(|_| m)
}

async fn contract(s: &dyn ClientCertStore) {
    let a = MerchantId::generate();
    let b = MerchantId::generate();
    assert_eq!(s.client_cert_policy(&a).await.unwrap(), None);
    let (c1, c2, c3) = (cert("one"), cert("two"), cert("three"));
    assert_eq!(s.merchant_by_client_cert(&c1.sha256).await.unwrap(), None);

    let pa = policy(&a, CertAuthMode::ApiKeyAndCert, &[&c1, &c2]);
    assert_eq!(
        s.put_client_cert_policy(&pa).await.unwrap(),
        PutPolicy::Stored
    );
    assert_eq!(s.client_cert_policy(&a).await.unwrap(), Some(pa.clone()));
    assert_eq!(bound_to(s, &c1).await, Some(a.clone()));
    assert_eq!(bound_to(s, &c2).await, Some(a.clone()));
    // Storing the same policy again is a no-op.
    assert_eq!(
        s.put_client_cert_policy(&pa).await.unwrap(),
        PutPolicy::Stored
    );

    // B cannot take A's certificate; nothing of B's change is kept.
    let pb = policy(&b, CertAuthMode::Cert, &[&c3, &c2]);
    assert_eq!(
        s.put_client_cert_policy(&pb).await.unwrap(),
        PutPolicy::Taken(c2.sha256.clone())
    );
    assert_eq!(s.client_cert_policy(&b).await.unwrap(), None);
    assert_eq!(bound_to(s, &c3).await, None);
    assert_eq!(bound_to(s, &c2).await, Some(a.clone()));

    // A drops c2 and adds c3: c2's index entry goes, c3's comes.
    let pa2 = policy(&a, CertAuthMode::Cert, &[&c1, &c3]);
    assert_eq!(
        s.put_client_cert_policy(&pa2).await.unwrap(),
        PutPolicy::Stored
    );
    assert_eq!(s.merchant_by_client_cert(&c2.sha256).await.unwrap(), None);
    assert_eq!(bound_to(s, &c3).await, Some(a.clone()));
    // Now B may bind c2.
    let pb2 = policy(&b, CertAuthMode::ApiKey, &[&c2]);
    assert_eq!(
        s.put_client_cert_policy(&pb2).await.unwrap(),
        PutPolicy::Stored
    );
    assert_eq!(bound_to(s, &c2).await, Some(b.clone()));
    assert_eq!(bound_to(s, &c1).await, Some(a.clone()));

    // Unbinding everything clears the index of A's certificates.
    let empty = policy(&a, CertAuthMode::ApiKey, &[]);
    assert_eq!(
        s.put_client_cert_policy(&empty).await.unwrap(),
        PutPolicy::Stored
    );
    assert_eq!(s.merchant_by_client_cert(&c1.sha256).await.unwrap(), None);
    assert_eq!(s.merchant_by_client_cert(&c3.sha256).await.unwrap(), None);
    assert_eq!(s.client_cert_policy(&a).await.unwrap(), Some(empty));

    // An issuer binds under its tenant id, in the same index: its certificate is found as the
    // issuer's, and a merchant cannot take it (nor the issuer a merchant's).
    let issuer = tokengate::domain::issuer::IssuerId::generate().tenant();
    let ci = cert("issuer");
    let pi = policy(&issuer, CertAuthMode::ApiKeyAndCert, &[&ci]);
    assert_eq!(
        s.put_client_cert_policy(&pi).await.unwrap(),
        PutPolicy::Stored
    );
    assert_eq!(bound_to(s, &ci).await, Some(issuer.clone()));
    assert_eq!(
        s.put_client_cert_policy(&policy(&b, CertAuthMode::ApiKey, &[&c2, &ci]))
            .await
            .unwrap(),
        PutPolicy::Taken(ci.sha256.clone())
    );
    assert_eq!(
        s.put_client_cert_policy(&policy(&issuer, CertAuthMode::ApiKey, &[&ci, &c2]))
            .await
            .unwrap(),
        PutPolicy::Taken(c2.sha256.clone())
    );
    assert_eq!(bound_to(s, &ci).await, Some(issuer.clone()));
    assert_eq!(bound_to(s, &c2).await, Some(b.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_bindings_on_redis() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&redis_config(server.url(), Vec::new()))
        .await
        .unwrap();
    contract(&store).await;

    // An index entry left by an interrupted change (claimed, policy never written) binds
    // nothing and does not block another merchant.
    let ghost = MerchantId::generate();
    let c = cert("ghost");
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("tgtest:{{cc:{}}}:merchant", c.sha256))
        .arg(ghost.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        store.merchant_by_client_cert(&c.sha256).await.unwrap(),
        Some(ghost.clone())
    );
    assert_eq!(bound_to(&store, &c).await, None);
    let m = MerchantId::generate();
    let p = policy(&m, CertAuthMode::Cert, &[&c]);
    assert_eq!(
        store.put_client_cert_policy(&p).await.unwrap(),
        PutPolicy::Stored
    );
    assert_eq!(bound_to(&store, &c).await, Some(m));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_bindings_on_redis_cluster() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&redis_config(String::new(), cluster.addrs()))
        .await
        .unwrap();
    assert!(store.is_cluster());
    contract(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_bindings_on_embedded_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    contract(&store).await;
    let m = MerchantId::generate();
    let c = cert("kept");
    let p = policy(&m, CertAuthMode::ApiKeyAndCert, &[&c]);
    assert_eq!(
        store.put_client_cert_policy(&p).await.unwrap(),
        PutPolicy::Stored
    );
    drop(store);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.client_cert_policy(&m).await.unwrap(), Some(p));
    assert_eq!(bound_to(&store, &c).await, Some(m));
}
