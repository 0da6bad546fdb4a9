//! HTTP layer: the REST API on axum/hyper 1, its middleware stack and the server lifecycle.
//!
//! [`serve`] takes a bound listener and a shutdown future (tests bind `127.0.0.1:0` and drop a
//! channel to stop it); in-flight requests finish before it returns.

pub mod audit;
pub mod auth;
pub mod dto;
pub mod extract;
pub mod handlers;
pub mod idempotency;
pub mod listener;
pub mod openapi;
pub mod params;
pub mod problem;
pub mod schemas;
pub mod stack;
pub mod state;
pub mod telemetry;

pub use stack::HttpSettings;
pub use state::{AppState, AppStateInner, NotifyState};

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use tokio::net::TcpListener;

use handlers::{
    audit_events, click_to_pay, client_certs, issuer_cards, issuer_notify, issuers, keys, notify,
    production_orders, recurring, reveal, tokens, wallets, webhooks,
};

/// The API routes with the middleware stack applied.
pub fn router(state: AppState, settings: &HttpSettings) -> Router {
    let api = Router::new()
        .route("/healthz", get(tokens::healthz))
        .route("/readyz", get(tokens::readyz))
        // Generated from the handlers (src/http/openapi.rs); Prometheus text (observability.rs).
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/metrics", get(telemetry::metrics))
        .route("/v1/merchants", post(tokens::create_merchant))
        // Client certificates bound to a merchant (admin; docs/api.md, "Client certificates").
        .route(
            "/v1/merchants/{id}/client-certs",
            get(client_certs::get_client_certs).put(client_certs::put_client_certs),
        )
        // Admin: a key for an existing merchant, e.g. one that revoked its last `keys` key.
        .route(
            "/v1/merchants/{id}/api-keys",
            post(keys::create_api_key_for_merchant),
        )
        // A customer's wallet: list, or delete all ("forget me"; docs/api.md, "Customer wallets").
        .route(
            "/v1/tokens",
            post(tokens::create_token)
                .get(wallets::list_customer_tokens)
                .delete(wallets::delete_customer_tokens),
        )
        .route(
            "/v1/tokens/{id}",
            get(tokens::get_token).delete(tokens::delete_token),
        )
        .route(
            "/v1/tokens/{id}/cryptograms",
            post(tokens::create_cryptogram),
        )
        .route("/v1/tokens/{id}/suspend", post(tokens::suspend_token))
        .route("/v1/tokens/{id}/resume", post(tokens::resume_token))
        // PAN fallback: the one route that answers a card number (docs/security.md).
        .route("/v1/tokens/{id}/reveal", post(reveal::reveal_card))
        // The network transaction id every later MIT cryptogram carries (docs/api.md).
        .route(
            "/v1/tokens/{id}/recurring-agreement",
            put(recurring::put_agreement)
                .get(recurring::get_agreement)
                .delete(recurring::end_agreement),
        )
        // A merchant's API keys and their scopes (docs/api.md, "API keys").
        .route(
            "/v1/api-keys",
            post(keys::create_api_key).get(keys::list_api_keys),
        )
        .route("/v1/api-keys/{id}", delete(keys::revoke_api_key))
        // Merchant webhooks (docs/webhooks.md).
        .route(
            "/v1/webhook-endpoints",
            post(webhooks::create_endpoint).get(webhooks::list_endpoints),
        )
        .route(
            "/v1/webhook-endpoints/{id}",
            get(webhooks::get_endpoint)
                .patch(webhooks::update_endpoint)
                .delete(webhooks::delete_endpoint),
        )
        .route(
            "/v1/webhook-endpoints/{id}/rotate-secret",
            post(webhooks::rotate_secret),
        )
        // The audit trail (docs/security.md, "Audit trail").
        .route("/v1/audit-events", get(audit_events::list_audit_events))
        .route("/v1/events", get(webhooks::list_events))
        .route("/v1/events/{id}", get(webhooks::get_event))
        .route("/v1/events/{id}/redeliver", post(webhooks::redeliver_event))
        // D1 -> gateway (docs/d1-protocol.md, "Notifications").
        .route("/oauth2/token", post(notify::oauth_token))
        .route(
            "/merchant-gateways/{merchant_gateway_id}/merchants/{merchant_id}/tokens/{token_id}/notify-update",
            post(notify::notify_update),
        )
        // Issuers: onboarding (admin) and the issuer side of D1 (docs/issuer.md).
        .route(
            "/v1/issuers",
            post(issuers::create_issuer).get(issuers::list_issuers),
        )
        .route("/v1/issuers/{id}", get(issuers::get_issuer))
        .route("/v1/issuers/{id}/api-keys", post(issuers::create_issuer_key))
        // Client certificates bound to an issuer (admin; docs/api.md, "Client certificates").
        .route(
            "/v1/issuers/{id}/client-certs",
            get(client_certs::get_issuer_client_certs).put(client_certs::put_issuer_client_certs),
        )
        .route("/v1/issuer/operations", get(issuers::list_operations))
        // The issuer's audit trail (docs/security.md, "Audit trail").
        .route(
            "/v1/issuer/audit-events",
            get(audit_events::list_issuer_audit_events),
        )
        .route(
            "/v1/issuer/operations/{operation_id}",
            get(issuers::get_operation),
        )
        // Issuer webhooks, through the same signed outbox as merchant webhooks.
        .route(
            "/v1/issuer/webhook-endpoints",
            post(webhooks::issuer_create_endpoint).get(webhooks::issuer_list_endpoints),
        )
        .route(
            "/v1/issuer/webhook-endpoints/{id}",
            delete(webhooks::issuer_delete_endpoint),
        )
        .route("/v1/issuer/events", get(webhooks::issuer_list_events))
        // The issuer's cards (docs/issuer.md, "Cards").
        .route(
            "/v1/issuer/cards/{card_id}",
            get(issuer_cards::get_card).delete(issuer_cards::delete_card),
        )
        // Click to Pay (docs/issuer.md).
        .route(
            "/v1/issuer/cards/{card_id}/click-to-pay/enrolment",
            post(click_to_pay::enrol),
        )
        .route(
            "/v1/issuer/cards/{card_id}/click-to-pay/update",
            post(click_to_pay::update_card),
        )
        .route(
            "/v1/issuer/consumers/{consumer_id}/click-to-pay/update",
            post(click_to_pay::update_consumer),
        )
        .route(
            "/v1/issuer/cards/{card_id}/click-to-pay/opt-out",
            post(click_to_pay::opt_out_card),
        )
        .route(
            "/v1/issuer/consumers/{consumer_id}/click-to-pay/opt-out",
            post(click_to_pay::opt_out_consumer),
        )
        .route(
            "/v1/issuer/cards/{card_id}/click-to-pay/profiles",
            get(click_to_pay::card_profiles),
        )
        .route(
            "/v1/issuer/consumers/{consumer_id}/click-to-pay/profiles",
            get(click_to_pay::consumer_profiles),
        )
        // Physical card orders (docs/issuer-orders.md).
        .route(
            "/v1/issuer/cards/{card_id}/production-orders",
            post(production_orders::order_card),
        )
        .route(
            "/v1/issuer/production-orders/batch",
            post(production_orders::order_batch),
        )
        .route(
            "/v1/issuer/cards/{card_id}/production-status",
            get(production_orders::production_status),
        )
        // D1 -> issuer side: card and consumer operation notifications.
        .route(
            "/notifications/d1/v2/issuers/{issuer_id}/cards",
            post(issuer_notify::notify_cards),
        )
        .route(
            "/notifications/d1/v2/issuers/{issuer_id}/consumers",
            post(issuer_notify::notify_consumers),
        )
        .fallback(tokens::not_found)
        .method_not_allowed_fallback(tokens::method_not_allowed)
        .layer(DefaultBodyLimit::max(settings.body_limit))
        .with_state(state);
    stack::apply(api, settings)
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets in-flight requests finish.
/// HTTPS with `tls` (src/http/listener.rs), plain HTTP without.
pub async fn serve<F>(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<listener::ReloadableTls>>,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    match tls {
        Some(tls) => listener::serve_tls(listener, router, tls, shutdown).await,
        None => listener::serve_plain(listener, router, shutdown).await,
    }
}
