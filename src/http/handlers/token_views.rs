//! The JSON of a token view, kept with the record it was written from: a GET or a dedup hit
//! answers with a record shared from the store's token cache (the same `Arc` until that record
//! is invalidated), so its view is written once instead of on every hit.
//!
//! # Why it is coherent
//!
//! An entry is keyed by the address of the record's allocation and holds a `Weak` to it. A
//! `Weak` keeps the allocation (not the value) alive, so no other record can be allocated at that
//! address while the entry exists; a caller holding the record (`Arc`) and finding an entry for
//! its address therefore has the very record the entry was written from. A record behind an
//! `Arc` never changes (no interior mutability; `Arc::get_mut` fails while a `Weak` exists and
//! `Arc::make_mut` moves the value out instead): an update is a new record, with a new address.
//! The view depends on nothing but the record ([`TokenView::from`]): not on the caller, its
//! merchant (the store read is already per merchant) or its scopes. It holds what the view
//! shows, never more: `bin` and `last4`, never the PAN (which the record only holds sealed).

use std::sync::{Arc, LazyLock, Weak};

use bytes::Bytes;
use dashmap::DashMap;

use crate::domain::token::TokenRecord;
use crate::http::dto::TokenView;
use crate::http::idempotency::to_json;

/// About the token cache's default size (`storage.redis_token_cache_entries`): room for the
/// views of the records it holds.
const MAX_ENTRIES: usize = 50_000;

type Entries = DashMap<usize, (Weak<TokenRecord>, Bytes)>;

/// One per process: entries are keyed by allocation, so records of several stores (tests run
/// several gateways in one process) cannot collide.
static VIEWS: LazyLock<Entries> = LazyLock::new(DashMap::new);

/// The JSON of [`TokenView::from`]`(rec)`.
pub fn token_json(rec: &Arc<TokenRecord>) -> Bytes {
    let addr = Arc::as_ptr(rec) as usize;
    if let Some(e) = VIEWS.get(&addr) {
        return e.1.clone();
    }
    let json = Bytes::from(to_json(&TokenView::from(&**rec)));
    // Only a record someone else holds (the store's cache) is worth a view kept: a record read
    // without a cache is a new allocation per request, whose entry would never be hit.
    if Arc::strong_count(rec) > 1 {
        if VIEWS.len() >= MAX_ENTRIES {
            // Views of records no longer held anywhere are dead weight; if the live ones alone
            // fill the map, start over (amortised: the map refills over `MAX_ENTRIES` misses).
            VIEWS.retain(|_, (w, _)| w.strong_count() > 0);
            if VIEWS.len() >= MAX_ENTRIES {
                VIEWS.clear();
            }
        }
        VIEWS.insert(addr, (Arc::downgrade(rec), json.clone()));
    }
    json
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::token::{
        CardMeta, Fingerprints, MerchantId, SealedPan, TokenId, TokenStatus, Usage,
    };
    use tokengate_cards::{Brand, Expiry};

    fn record() -> TokenRecord {
        let now = time::OffsetDateTime::now_utc();
        TokenRecord {
            id: TokenId::generate(),
            merchant_id: MerchantId::generate(),
            usage: Usage::CardOnFile,
            status: TokenStatus::Active,
            card: CardMeta {
                brand: Brand::Visa,
                bin: "411111".into(),
                last4: "1111".into(),
                expiry: Expiry {
                    month: 12,
                    year: 2030,
                },
            },
            network_token: None,
            customer_reference: None,
            sealed_pan: SealedPan {
                key_id: "k".into(),
                blob: vec![],
            },
            fingerprints: Fingerprints {
                pan: "fp".into(),
                pan_expiry: "fpe".into(),
                previous: Vec::new(),
            },
            created_at: now,
            updated_at: now,
            last_event_at: None,
            recurring_agreement: None,
            version: 1,
        }
    }

    #[test]
    fn a_kept_view_is_only_ever_the_view_of_the_same_record() {
        let held = Arc::new(record());
        let cache = held.clone();
        let first = token_json(&held);
        assert_eq!(first, to_json(&TokenView::from(&*held)));
        assert!(VIEWS.contains_key(&(Arc::as_ptr(&held) as usize)));
        assert_eq!(token_json(&held), first);
        // An update is a new record (a new allocation): its own view, while the old one lives.
        let mut changed = (*held).clone();
        changed.status = TokenStatus::Suspended;
        let changed = Arc::new(changed);
        let changed_cache = changed.clone();
        let second = token_json(&changed);
        assert_eq!(second, to_json(&TokenView::from(&*changed)));
        assert_ne!(second, first);
        drop((cache, changed_cache));
        // A record nobody else holds (no cache): written, not kept.
        let alone = Arc::new(record());
        assert_eq!(token_json(&alone), to_json(&TokenView::from(&*alone)));
        assert!(!VIEWS.contains_key(&(Arc::as_ptr(&alone) as usize)));
    }
}
