//! Encoding of production order records, shared by the Redis and embedded adapters so both
//! backends read and write the same bytes.

use crate::domain::ports::StoreError;
use crate::domain::production_orders::ProductionOrder;

pub(crate) fn encode(o: &ProductionOrder) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(o).map_err(|_| StoreError::Corrupt("production order not encodable".into()))
}

pub(crate) fn decode(b: &[u8]) -> Result<ProductionOrder, StoreError> {
    serde_json::from_slice(b).map_err(|e| {
        StoreError::Corrupt(format!(
            "production order is not valid JSON ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}
