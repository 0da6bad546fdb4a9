//! Store contract of changing a webhook endpoint (`OutboxStore::replace_endpoint`, used by the
//! endpoint update and the secret rotation) on Redis, Redis Cluster and the embedded store: a
//! compare-and-set that keeps the rotation fields, loses no concurrent change, crosses no
//! merchant and brings no deleted endpoint back.

use tokengate::domain::ports::outbox::OutboxStore;
use tokengate::domain::token::MerchantId;
use tokengate::domain::webhooks::{
    EndpointId, EventType, PreviousSecret, SealedSecret, WebhookEndpoint,
};

crate::store_tests!(by_ref: replace_endpoint_is_a_compare_and_set);

fn endpoint(m: &MerchantId) -> WebhookEndpoint {
    WebhookEndpoint {
        id: EndpointId::generate(),
        merchant_id: m.clone(),
        url: "https://example.com/hook".into(),
        events: vec![EventType::Suspended],
        secret: SealedSecret {
            key_id: "k1".into(),
            blob: vec![1; 60],
        },
        created_at: time::OffsetDateTime::now_utc(),
        previous_secret: None,
        secret_rotated_at: None,
    }
}

async fn replace_endpoint_is_a_compare_and_set(store: &dyn OutboxStore) {
    let m = MerchantId::generate();
    let e = endpoint(&m);
    assert!(store.insert_endpoint(&e, 16).await.unwrap());

    // An update and a rotation, each on what it read: both fields round-trip.
    let now = time::OffsetDateTime::now_utc();
    let rotated = WebhookEndpoint {
        url: "https://example.com/other?x=1".into(),
        events: vec![EventType::Resumed, EventType::Deleted],
        secret: SealedSecret {
            key_id: "k2".into(),
            blob: vec![2; 60],
        },
        previous_secret: Some(PreviousSecret {
            secret: e.secret.clone(),
            expires_at: now + time::Duration::hours(24),
        }),
        secret_rotated_at: Some(now),
        ..e.clone()
    };
    assert!(store.replace_endpoint(&e, &rotated).await.unwrap());
    assert_eq!(
        store.get_endpoint(&m, &e.id).await.unwrap(),
        Some(rotated.clone())
    );

    // A writer that read before that change loses, and writes nothing.
    let stale = WebhookEndpoint {
        url: "https://example.com/stale".into(),
        ..e.clone()
    };
    assert!(!store.replace_endpoint(&e, &stale).await.unwrap());
    assert_eq!(
        store.get_endpoint(&m, &e.id).await.unwrap(),
        Some(rotated.clone())
    );

    // The rotation fields are part of the comparison: dropping an expired previous secret is a
    // change like any other.
    let dropped = WebhookEndpoint {
        previous_secret: None,
        ..rotated.clone()
    };
    let mut wrong_expiry = rotated.clone();
    if let Some(p) = wrong_expiry.previous_secret.as_mut() {
        p.expires_at += time::Duration::seconds(1);
    }
    assert!(
        !store
            .replace_endpoint(&wrong_expiry, &dropped)
            .await
            .unwrap()
    );
    assert!(store.replace_endpoint(&rotated, &dropped).await.unwrap());
    assert_eq!(
        store.get_endpoint(&m, &e.id).await.unwrap(),
        Some(dropped.clone())
    );

    // Neither another merchant's copy nor another id is replaced through it.
    let other = MerchantId::generate();
    let theirs = WebhookEndpoint {
        merchant_id: other.clone(),
        ..dropped.clone()
    };
    assert!(!store.replace_endpoint(&theirs, &theirs).await.unwrap());
    assert_eq!(store.get_endpoint(&other, &e.id).await.unwrap(), None);
    let moved = WebhookEndpoint {
        id: EndpointId::generate(),
        ..dropped.clone()
    };
    assert!(!store.replace_endpoint(&dropped, &moved).await.unwrap());
    assert_eq!(store.get_endpoint(&m, &moved.id).await.unwrap(), None);
    assert_eq!(
        store.list_endpoints(&m).await.unwrap(),
        vec![dropped.clone()]
    );

    // An unknown endpoint, or one deleted meanwhile, is not (re)created.
    let unknown = endpoint(&m);
    assert!(!store.replace_endpoint(&unknown, &unknown).await.unwrap());
    assert!(store.delete_endpoint(&m, &e.id).await.unwrap());
    assert!(!store.replace_endpoint(&dropped, &rotated).await.unwrap());
    assert_eq!(store.get_endpoint(&m, &e.id).await.unwrap(), None);
    assert!(store.list_endpoints(&m).await.unwrap().is_empty());
}
