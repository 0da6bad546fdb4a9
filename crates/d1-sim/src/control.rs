//! The control API (plain HTTP, loopback): lifecycle events, faults and counters, for tests and
//! demos. Not part of D1; errors use the same JSON shape as the D1 API for convenience.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::api::ApiError;
use super::context::Shared;
use super::faults::Faults;
use super::notify::EventType;
use super::state::Action;
use tokengate_cards::Expiry;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/sim/tokens/{token_id}/events", post(token_event))
        .route(
            "/sim/faults",
            get(get_faults).put(put_faults).delete(reset_faults),
        )
        .route("/sim/stats", get(stats))
        // The issuer side's card registry and settings (issuer.rs).
        .route(
            "/sim/issuers/{issuer_id}/cards/{card_id}",
            axum::routing::put(super::issuer::seed_card),
        )
        // The bank deletes a card through another D1 channel: D1 notifies `DELETE`.
        .route(
            "/sim/issuers/{issuer_id}/cards/{card_id}/delete",
            axum::routing::post(super::issuer::control_delete_card),
        )
        .route(
            "/sim/issuer-settings",
            get(super::issuer::get_settings).put(super::issuer::put_settings),
        )
        .merge(super::orders::control_routes())
        .fallback(|| async { ApiError::NotFound("no such control resource") })
        .with_state(shared)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum EventKind {
    Suspend,
    Resume,
    Delete,
    Renew,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventRequest {
    #[serde(rename = "type")]
    kind: EventKind,
    /// New card and token expiry (`MMYY`), for `RENEW` only.
    expiry: Option<String>,
    /// Passed on as the notification's `reason`.
    reason: Option<String>,
}

/// `POST /sim/tokens/{tokenId}/events`: as if the issuer or the network changed the token.
/// Answers the new token object; the notification follows asynchronously.
async fn token_event(
    State(shared): State<Arc<Shared>>,
    Path(token_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: EventRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::InvalidField(format!(
            "body must be {{\"type\": SUSPEND|RESUME|DELETE|RENEW, \"expiry\"?: MMYY, \"reason\"?}}: {e}"
        ))
    })?;
    let expiry = match (&req.kind, req.expiry.as_deref()) {
        (EventKind::Renew, Some(e)) => Some(
            Expiry::from_mmyy(e)
                .ok_or_else(|| ApiError::InvalidField("expiry must be MMYY".into()))?,
        ),
        (EventKind::Renew, None) => None,
        (_, Some(_)) => {
            return Err(ApiError::InvalidField(
                "expiry is only meaningful for RENEW".into(),
            ));
        }
        (_, None) => None,
    };
    let (action, event_type) = match req.kind {
        EventKind::Suspend => (Action::Suspend, EventType::StatusUpdate),
        EventKind::Resume => (Action::Resume, EventType::StatusUpdate),
        EventKind::Delete => (Action::Delete, EventType::StatusUpdate),
        EventKind::Renew => (Action::Renew(expiry), EventType::Renewal),
    };
    let merchant_id = shared
        .store
        .merchant_of(&token_id)
        .ok_or(ApiError::NotFound("unknown token"))?;
    let info = shared.store.apply(None, &token_id, &action)?;
    tracing::info!(token_id = %token_id, ?action, "control event");
    shared
        .notifier
        .emit(event_type, &merchant_id, &info, req.reason.as_deref());
    Ok((StatusCode::OK, axum::Json(info.to_json())).into_response())
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.faults()).into_response()
}

/// `PUT /sim/faults`: replaces the whole document (absent fields take their defaults).
async fn put_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let faults: Faults = serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidField(format!("faults: {e}")))?;
    faults.validate().map_err(ApiError::InvalidField)?;
    tracing::info!(?faults, "faults set");
    shared.set_faults(faults.clone());
    Ok(axum::Json(faults).into_response())
}

async fn reset_faults(State(shared): State<Arc<Shared>>) -> Response {
    shared.set_faults(Faults::default());
    axum::Json(Faults::default()).into_response()
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    let mut doc = shared.stats.to_json();
    doc["productionOrders"] = shared.orders.stats_json();
    axum::Json(json!(doc)).into_response()
}
