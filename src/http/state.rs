//! The state every handler reaches ([`AppState`]) and the middleware settings.

use std::sync::Arc;

use secrecy::SecretString;

use crate::domain::lifecycle::Lifecycle;
use crate::domain::notify_auth::NotifyAuth;
use crate::domain::service::Services;

/// What every handler can reach, behind one `Arc`: axum clones the state for every request
/// (and for each extractor that takes it), and a profile of `GET /v1/tokens/{id}` showed the
/// clone and drop of the whole struct (a dozen reference counts) at about 2% of gateway CPU.
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

impl AppState {
    pub fn new(inner: AppStateInner) -> AppState {
        AppState(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateInner;
    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

/// The handles and settings of [`AppState`].
pub struct AppStateInner {
    pub services: Services,
    pub admin_token: Arc<SecretString>,
    pub body_limit: usize,
    pub idempotency_ttl_s: u64,
    pub idempotency_lock_ttl_s: u64,
    /// D1's calls to us: OAuth client credentials and lifecycle notifications.
    pub notify: Arc<NotifyState>,
    /// Per-key and per-merchant request limits (per instance).
    pub rate_limiter: Arc<crate::domain::ratelimit::RateLimiter>,
    /// Client certificates bound to merchants (mutual TLS; src/http/auth/client_cert.rs).
    pub client_certs: Arc<crate::domain::client_certs::ClientCerts>,
    /// The issuer side of D1 (docs/issuer.md).
    pub issuers: Arc<crate::domain::issuer_service::IssuerService>,
    /// Physical card orders (docs/issuer-orders.md).
    pub production: Arc<crate::domain::production_service::ProductionService>,
    /// The issuer's cards (docs/issuer.md, "Cards").
    pub cards: Arc<crate::domain::issuer_cards::IssuerCards>,
}

/// What D1's calls to us (`handlers::notify`) need. Built once by `app.rs`.
pub struct NotifyState {
    pub auth: NotifyAuth,
    pub lifecycle: Lifecycle,
    /// Our `merchantGatewayId` at D1: notifications for any other are refused (404).
    pub merchant_gateway_id: String,
}
