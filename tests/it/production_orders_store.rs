//! Production orders in the store (`ProductionOrderStore`), on every backend (standalone
//! Redis, Redis Cluster, embedded): an `issuerRequestId` places one order only, the card's list
//! is newest first, updates are compare-and-set, and issuers do not see each other's orders.

use time::OffsetDateTime;
use tokengate::domain::ports::StoreError;
use tokengate::domain::ports::production_orders::{PlaceOutcome, ProductionOrderStore};
use tokengate::domain::production_orders::{
    DistributionChannel, ProductionEvent, ProductionOrder, ProductionStage, Recorded,
    ShipmentTracking,
};

fn at(s: i64) -> OffsetDateTime {
    // Whole seconds: RFC 3339 round trips keep them exactly.
    OffsetDateTime::from_unix_timestamp(1_767_000_000 + s).unwrap()
}

fn issuer() -> String {
    format!("iss_{}", uuid::Uuid::new_v4().simple())
}

fn order(issuer: &str, card: &str, req: &str, t: i64) -> ProductionOrder {
    ProductionOrder::new(
        issuer,
        card,
        req,
        DistributionChannel::Central,
        "411111******1111".into(),
        at(t),
    )
}

async fn place_once_per_request_id(s: &(impl ProductionOrderStore + ?Sized)) {
    let i = issuer();
    let first = order(&i, "card-1", "req-1", 0);
    assert_eq!(
        s.insert_production_order(&first).await.unwrap(),
        PlaceOutcome::Created
    );
    // A retry (even one that carries other options) finds the first order.
    let mut retry = order(&i, "card-1", "req-1", 5);
    retry.distribution_channel = DistributionChannel::Thales;
    assert_eq!(
        s.insert_production_order(&retry).await.unwrap(),
        PlaceOutcome::Existing(Box::new(first.clone()))
    );
    assert_eq!(
        s.get_production_order(&i, "req-1").await.unwrap(),
        Some(first.clone())
    );
    // One entry in the card's list, not two.
    assert_eq!(
        s.card_production_orders(&i, "card-1", 10).await.unwrap(),
        vec![first.clone()]
    );
    assert_eq!(s.get_production_order(&i, "req-2").await.unwrap(), None);

    // Another issuer with the same ids is another order.
    let j = issuer();
    assert_eq!(s.get_production_order(&j, "req-1").await.unwrap(), None);
    assert!(
        s.card_production_orders(&j, "card-1", 10)
            .await
            .unwrap()
            .is_empty()
    );
    let theirs = order(&j, "card-1", "req-1", 1);
    assert_eq!(
        s.insert_production_order(&theirs).await.unwrap(),
        PlaceOutcome::Created
    );
    assert_eq!(
        s.get_production_order(&i, "req-1").await.unwrap(),
        Some(first)
    );
}

async fn card_list_is_newest_first(s: &(impl ProductionOrderStore + ?Sized)) {
    let i = issuer();
    for (n, req) in ["r-a", "r-b", "r-c"].iter().enumerate() {
        let o = order(&i, "card-7", req, n as i64 * 10);
        assert_eq!(
            s.insert_production_order(&o).await.unwrap(),
            PlaceOutcome::Created
        );
    }
    s.insert_production_order(&order(&i, "card-8", "r-d", 100))
        .await
        .unwrap();
    let ids = |v: Vec<ProductionOrder>| {
        v.into_iter()
            .map(|o| o.issuer_request_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(s.card_production_orders(&i, "card-7", 10).await.unwrap()),
        ["r-c", "r-b", "r-a"]
    );
    assert_eq!(
        ids(s.card_production_orders(&i, "card-7", 2).await.unwrap()),
        ["r-c", "r-b"]
    );
    assert_eq!(
        ids(s.card_production_orders(&i, "card-8", 10).await.unwrap()),
        ["r-d"]
    );
    assert!(
        s.card_production_orders(&i, "card-9", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn updates_are_compare_and_set(s: &(impl ProductionOrderStore + ?Sized)) {
    let i = issuer();
    let o = order(&i, "card-1", "req-1", 0);
    s.insert_production_order(&o).await.unwrap();

    let mut v1 = o.clone();
    assert_eq!(
        v1.record(
            ProductionEvent {
                status: ProductionStage::Shipped,
                at: at(30),
                shipment: Some(ShipmentTracking {
                    carrier: Some("DHL".into()),
                    tracking_number: Some("JD014600".into()),
                    status: Some("IN_TRANSIT".into()),
                    ..Default::default()
                }),
                error_code: None,
            },
            at(31),
        ),
        Recorded::Changed
    );
    v1.operation_id = Some("op_123".into());
    v1.version = 1;
    s.update_production_order(&v1).await.unwrap();
    assert_eq!(
        s.get_production_order(&i, "req-1").await.unwrap(),
        Some(v1.clone())
    );
    // The card's list reads the updated record.
    assert_eq!(
        s.card_production_orders(&i, "card-1", 1).await.unwrap(),
        vec![v1.clone()]
    );

    // A writer that read version 0 loses.
    let mut stale = o.clone();
    stale.version = 1;
    assert!(matches!(
        s.update_production_order(&stale).await,
        Err(StoreError::Conflict)
    ));
    // Version 0 is never an update.
    assert!(matches!(
        s.update_production_order(&o).await,
        Err(StoreError::Conflict)
    ));
    let mut missing = order(&i, "card-1", "req-404", 0);
    missing.version = 1;
    assert!(matches!(
        s.update_production_order(&missing).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.get_production_order(&i, "req-1").await.unwrap(), Some(v1));
}

crate::store_tests!(
    by_ref: place_once_per_request_id,
    card_list_is_newest_first,
    updates_are_compare_and_set
);
