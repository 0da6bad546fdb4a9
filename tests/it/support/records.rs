//! Stored-record fixtures for the store-contract tests that write tokens and webhook endpoints
//! directly (no HTTP): a pending token with random fingerprints, its next version, an endpoint
//! that takes every event.

use time::OffsetDateTime;
use tokengate::domain::token::{
    CardMeta, Fingerprints, MerchantId, NetworkTokenMeta, SealedPan, TokenId, TokenRecord,
    TokenStatus, Usage,
};
use tokengate::domain::webhooks::{EndpointId, EventType, SealedSecret, WebhookEndpoint};
use tokengate_cards::{Brand, Expiry};

/// A pending card-on-file token of merchant `m`, with fresh random fingerprints.
pub fn token(m: &MerchantId) -> TokenRecord {
    let now = OffsetDateTime::now_utc();
    TokenRecord {
        id: TokenId::generate(),
        merchant_id: m.clone(),
        usage: Usage::CardOnFile,
        status: TokenStatus::Pending,
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
            blob: vec![7; 44],
        },
        fingerprints: Fingerprints {
            pan: uuid::Uuid::new_v4().simple().to_string(),
            pan_expiry: uuid::Uuid::new_v4().simple().to_string(),
            previous: Vec::new(),
        },
        created_at: now,
        updated_at: now,
        last_event_at: None,
        recurring_agreement: None,
        version: 1,
    }
}

/// `rec` moved to `status`, one version on, holding a network token.
pub fn next(rec: &TokenRecord, status: TokenStatus) -> TokenRecord {
    let mut r = rec.clone();
    r.status = status;
    r.version += 1;
    r.network_token.get_or_insert_with(|| NetworkTokenMeta {
        d1_token_id: format!("d1-{}", r.id),
        last4: Some("4821".into()),
        expiry: None,
        par: None,
    });
    r
}

/// An endpoint of `m` subscribed to every event type.
pub fn endpoint(m: &MerchantId) -> WebhookEndpoint {
    WebhookEndpoint {
        id: EndpointId::generate(),
        merchant_id: m.clone(),
        url: "https://example.com/hook".into(),
        events: EventType::ALL.to_vec(),
        secret: SealedSecret {
            key_id: "k1".into(),
            blob: vec![1; 60],
        },
        created_at: OffsetDateTime::now_utc(),
        previous_secret: None,
        secret_rotated_at: None,
    }
}
