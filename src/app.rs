//! Wiring: builds the store, the vault, the D1 provider and the HTTP router from a [`Config`],
//! and runs them. Used by `tokengate serve` and by the integration tests.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use tokio::net::TcpListener;

use crate::config::{Config, Mode, SANDBOX_ADMIN_TOKEN};
use crate::crypto::{KeyMaterial, Keyring};
use crate::domain::audit::AuditLog;
use crate::domain::issuer_service::{IssuerService, IssuerSettings};
use crate::domain::lifecycle::Lifecycle;
use crate::domain::notify_auth::{ClientCredentials, NotifyAuth};
use crate::domain::ports::TokenStore;
use crate::domain::ports::apikeys::ApiKeyStore;
use crate::domain::ports::audit::AuditStore;
use crate::domain::ports::issuer_operations::IssuerOperationStore;
use crate::domain::ports::issuers::IssuerStore;
use crate::domain::ports::lifecycle::LifecycleStore;
use crate::domain::ports::outbox::OutboxStore;
use crate::domain::provider::NetworkTokenProvider;
use crate::domain::reconcile::{ReconcileSettings, Reconciler};
use crate::domain::rekey::{RekeySettings, Rekeyer};
use crate::domain::schedule::Schedule;
use crate::domain::service::Services;
use crate::domain::token::TokenRecord;
use crate::domain::webhooks::{TokenRenderer, WebhookSender, WebhookService, WebhookSettings};
use crate::egress::{Egress, EgressPolicy, Resolve, SystemResolver};
use crate::http::NotifyState;
use crate::http::{AppState, HttpSettings};
use crate::storage::embedded::EmbeddedStore;
use crate::storage::redis::{Durability, RedisConfig, RedisStore};
use crate::webhook_sender::HyperWebhookSender;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("vault keys: {0}")]
    Keys(#[from] crate::crypto::CryptoError),
    #[error("store: {0}")]
    Store(#[from] crate::domain::ports::StoreError),
    #[error("D1: {0}")]
    D1(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::http::listener::TlsLoadError),
}

/// Everything a running gateway holds, besides the listener.
pub struct Gateway {
    pub state: AppState,
    pub settings: HttpSettings,
    /// Keeps the in-process simulator (sandbox mode) alive as long as the gateway.
    pub sandbox: Option<tokengate_d1_sim::SimHandle>,
    /// How long in-flight requests may run after the shutdown signal.
    pub grace: Duration,
    /// Background reconciliation with D1 (`None` without D1 or with `reconcile.enabled = false`).
    pub reconciler: Option<Reconciler>,
    /// Background re-encryption of records under older data keys (`[rekey]`).
    pub rekeyer: Option<Rekeyer>,
    /// Background re-index of dedup fingerprints after a fingerprint-key rotation
    /// (`[fp_reindex]`).
    pub fp_reindexer: Option<crate::domain::fp_reindex::FpReindexer>,
    /// The `tokengate_tokens` gauge from the store's counts, and their one-time backfill.
    pub token_counts: crate::domain::token_counts::TokenCountReporter,
    /// Indexes tokens stored before customer wallets existed (ends once complete).
    pub wallet_index: crate::domain::wallet_index::WalletIndexBackfill,
    /// Merchant webhook delivery, run in the background by [`Gateway::run`].
    pub webhooks: WebhookWorker,
    /// The listener's TLS (`[server.tls]`), reloaded by [`Gateway::run`]; `None`: plain HTTP.
    pub tls: Option<Arc<crate::http::listener::ReloadableTls>>,
    /// The issuer side (docs/issuer.md); its re-drive and polling worker runs in [`Gateway::run`].
    pub issuers: Arc<IssuerService>,
    /// Where the issuer worker takes its lease.
    issuer_lifecycle: Arc<dyn LifecycleStore>,
}

/// The webhook service and the HTTP client its delivery worker sends with.
pub struct WebhookWorker {
    pub service: Arc<WebhookService>,
    pub sender: Arc<dyn WebhookSender>,
}

/// The SSRF guard of webhook URLs: the configured allow-list, loopback open in sandbox mode
/// (receivers next to a developer's gateway), and the gateway's own listeners (`own`) refused.
fn webhook_egress(
    cfg: &Config,
    own: Vec<SocketAddr>,
    resolver: Arc<dyn Resolve>,
) -> Result<Arc<Egress>, AppError> {
    let allow = cfg.webhooks.allowed_networks()?;
    if !allow.is_empty() {
        tracing::info!(networks = ?allow, "webhook receivers allowed in webhooks.allow_private_networks");
    }
    let policy = EgressPolicy::new(allow, cfg.mode == Mode::Sandbox).with_own_listeners(own);
    Ok(Arc::new(Egress::new(policy, resolver)))
}

/// Builds the webhook service (on the store's outbox) and its outbound client, both behind
/// the same SSRF guard.
fn webhook_worker(
    cfg: &Config,
    outbox: Arc<dyn OutboxStore>,
    keyring: Arc<Keyring>,
    egress: Arc<Egress>,
) -> Result<WebhookWorker, AppError> {
    let w = &cfg.webhooks;
    let bad_ca = |msg: String| {
        AppError::Config(crate::config::ConfigError::Invalid {
            key: "webhooks.ca_file",
            msg,
        })
    };
    let ca_pem = match &w.ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| bad_ca(format!("cannot read {} ({:?})", path.display(), e.kind())))?,
        ),
        None => None,
    };
    let timeout = Duration::from_millis(w.timeout_ms);
    let sender = HyperWebhookSender::new(timeout, ca_pem.as_deref(), egress.clone())
        .map_err(|e| bad_ca(e.to_string()))?;
    // Webhook payloads carry the token exactly as `GET /v1/tokens/{id}` shows it.
    let render: TokenRenderer = Arc::new(|r: &TokenRecord| {
        serde_json::to_value(crate::http::dto::TokenView::from(r))
            .unwrap_or(serde_json::Value::Null)
    });
    let settings = WebhookSettings {
        max_attempts: w.max_attempts,
        timeout,
        backoff_base: Duration::from_millis(w.backoff_base_ms),
        backoff_max: Duration::from_millis(w.backoff_max_ms),
        poll_interval: Duration::from_millis(w.poll_interval_ms),
        claim_idle: Duration::from_millis(w.claim_idle_ms),
        retention: Duration::from_secs(w.retention_hours.saturating_mul(3600)),
        allow_plain_http: cfg.mode == Mode::Sandbox,
    };
    Ok(WebhookWorker {
        service: Arc::new(
            WebhookService::new(outbox, keyring, render, settings, egress)
                // Issuer events carry the operation exactly as `GET /v1/issuer/operations/{id}`.
                .with_operation_renderer(Arc::new(|op| {
                    serde_json::to_value(crate::http::handlers::issuers::OperationView::from(op))
                        .unwrap_or(serde_json::Value::Null)
                })),
        ),
        sender: Arc::new(sender),
    })
}

fn key_material(cfg: &Config) -> KeyMaterial {
    match &cfg.vault.active_key_id {
        Some(active) => KeyMaterial {
            active_key_id: active.clone(),
            data_keys: cfg
                .vault
                .keys
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            fingerprint_keys: cfg.vault.fingerprint_ring(),
            active_fingerprint_key_id: cfg.vault.active_fingerprint_key(),
        },
        None => {
            tracing::warn!(
                "!!! SANDBOX MODE: using the built-in DEVELOPMENT vault keys. Card data stored now is NOT protected. Never use this with real cards. !!!"
            );
            crate::crypto::dev::material()
        }
    }
}

/// The listener's TLS from `[server.tls]`; without it plain HTTP, loudly refused as a
/// default outside sandbox mode (card data and API keys would cross the network in clear
/// unless TLS is terminated in front of the gateway).
fn listener_tls(
    cfg: &Config,
) -> Result<Option<Arc<crate::http::listener::ReloadableTls>>, AppError> {
    match &cfg.server.tls {
        Some(t) => {
            let tls = crate::http::listener::ReloadableTls::load(t)?;
            tracing::info!(
                mutual_tls = t.require_client_cert,
                client_ca = t.client_ca_file.is_some(),
                "HTTPS listener (TLS 1.2/1.3, h2 and http/1.1)"
            );
            Ok(Some(tls))
        }
        None => {
            if cfg.mode != Mode::Sandbox {
                tracing::warn!(
                    "!!! PLAIN HTTP LISTENER: [server.tls] is not configured. API keys and card numbers cross the network in clear unless TLS is terminated in front of this gateway. !!!"
                );
            }
            Ok(None)
        }
    }
}

/// The issuer records and the issuer operations, on the same backend as everything else.
pub type IssuerStores = (
    Arc<dyn IssuerStore>,
    Arc<dyn IssuerOperationStore>,
    Arc<dyn crate::domain::ports::production_orders::ProductionOrderStore>,
    Arc<dyn crate::domain::ports::issuer_cards::IssuerCardStore>,
);

pub async fn open_store(cfg: &Config) -> Result<Arc<dyn TokenStore>, AppError> {
    Ok(open_stores(cfg).await?.0)
}

/// The token store, the lifecycle store, the webhook outbox and the audit trail: one backend
/// (one connection or file) behind all four.
pub async fn open_stores(
    cfg: &Config,
) -> Result<
    (
        Arc<dyn TokenStore>,
        Arc<dyn LifecycleStore>,
        Arc<dyn OutboxStore>,
        Arc<dyn AuditStore>,
        Arc<dyn ApiKeyStore>,
        Arc<dyn crate::domain::ports::client_certs::ClientCertStore>,
        Arc<dyn crate::domain::ports::counts::TokenCountStore>,
        IssuerStores,
    ),
    AppError,
> {
    let s = &cfg.storage;
    if s.redis_url.is_some() || !s.redis_cluster_nodes.is_empty() {
        let rc = RedisConfig {
            url: s.redis_url.clone().unwrap_or_default(),
            cluster_nodes: s.redis_cluster_nodes.clone(),
            key_prefix: s.key_prefix.clone(),
            connect_timeout: Duration::from_millis(s.connect_timeout_ms),
            response_timeout: Duration::from_millis(s.response_timeout_ms),
            durability: redis_durability(s),
            token_cache_entries: s.redis_token_cache_entries,
        };
        let store = Arc::new(RedisStore::connect(&rc).await?);
        Ok((
            store.clone(),
            store.clone(),
            store.clone(),
            store.clone(),
            store.clone(),
            store.clone(),
            store.clone(),
            (store.clone(), store.clone(), store.clone(), store),
        ))
    } else {
        let dir: PathBuf = s.data_dir.clone();
        let store = Arc::new(EmbeddedStore::open(&dir)?);
        Ok((
            store.clone(),
            store.clone(),
            store.clone(),
            store.clone(),
            store.clone(),
            store.clone(),
            store.clone(),
            (store.clone(), store.clone(), store.clone(), store),
        ))
    }
}

/// Client credentials D1 uses for `notify-update`: configured ones; in sandbox mode without
/// them (and with `notify.require_auth`), fresh random ones, handed to the in-process simulator
/// so sandbox notifications are authenticated end to end.
/// `storage.redis_durability*` as the store's setting (`Config::validate` checked the values).
fn redis_durability(s: &crate::config::StorageConfig) -> Durability {
    let timeout = Duration::from_millis(s.redis_durability_timeout_ms);
    match s.redis_durability.as_str() {
        "wait" => Durability::Wait {
            replicas: s.redis_durability_replicas,
            timeout,
        },
        "waitaof" => Durability::WaitAof {
            local: s.redis_durability_local,
            replicas: s.redis_durability_replicas,
            timeout,
        },
        _ => Durability::None,
    }
}

fn notify_credentials(cfg: &Config) -> Option<ClientCredentials> {
    let n = &cfg.notify;
    match (&n.client_id, &n.client_secret) {
        (Some(id), Some(secret)) => Some(ClientCredentials {
            client_id: id.clone(),
            client_secret: secret.clone(),
        }),
        _ if cfg.mode == Mode::Sandbox && n.require_auth => {
            let c = ClientCredentials::generate();
            tracing::info!(client_id = %c.client_id,
                "SANDBOX MODE: generated notify client credentials for the in-process D1 simulator");
            Some(c)
        }
        _ => {
            if !n.require_auth {
                tracing::warn!(
                    "notify.require_auth is off: notify-update accepts unauthenticated calls"
                );
            }
            None
        }
    }
}

impl Gateway {
    /// Builds the gateway. `public_addr` is where it will listen (for the sandbox simulator's
    /// notifications).
    pub async fn build(cfg: &Config, public_addr: SocketAddr) -> Result<Gateway, AppError> {
        Self::build_with_resolver(cfg, public_addr, Arc::new(SystemResolver)).await
    }

    /// [`Gateway::build`] with the name resolver webhook URLs are checked and delivered
    /// through (tests make names resolve to private addresses, or change their answer).
    pub async fn build_with_resolver(
        cfg: &Config,
        public_addr: SocketAddr,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Gateway, AppError> {
        cfg.validate()?;
        // Before anything records a metric (once per process; see src/observability.rs).
        crate::observability::init();
        // Certificates first: a bad file should stop start-up before anything is opened.
        let tls = listener_tls(cfg)?;
        let keyring = Arc::new(Keyring::new(&key_material(cfg))?);
        let (
            store,
            lifecycle_store,
            outbox_store,
            audit_store,
            key_store,
            cert_store,
            count_store,
            (issuer_store, issuer_op_store, production_store, card_store),
        ) = open_stores(cfg).await?;
        // Every token-store call the domain makes is timed (src/storage/instrumented.rs).
        let store: Arc<dyn TokenStore> =
            Arc::new(crate::storage::instrumented::InstrumentedStore::new(store));
        let credentials = notify_credentials(cfg);
        let (provider, issuer_provider, sandbox, production_provider) =
            d1_provider(cfg, public_addr, credentials.as_ref()).await?;
        let provider: Option<Arc<dyn NetworkTokenProvider>> = provider;
        let notify_auth = NotifyAuth::new(
            credentials.as_ref(),
            Duration::from_secs(cfg.notify.token_ttl_s),
            cfg.notify.require_auth,
        )
        .map_err(|e| {
            AppError::Config(crate::config::ConfigError::Invalid {
                key: "notify.client_secret",
                msg: e.to_string(),
            })
        })?;
        drop(credentials);
        let admin_token = match &cfg.admin.token {
            Some(t) => t.clone(),
            None => {
                if cfg.mode == Mode::Sandbox {
                    tracing::warn!(
                        "SANDBOX MODE: admin token is the development value `{SANDBOX_ADMIN_TOKEN}`; set TOKENGATE_ADMIN_TOKEN"
                    );
                }
                SecretString::from(SANDBOX_ADMIN_TOKEN)
            }
        };
        let mut services = Services::new(
            store,
            keyring.clone(),
            provider.clone(),
            Duration::from_millis(cfg.auth.api_key_cache_ttl_ms),
        );
        // Before anything clones the services: every token change they make emits webhooks.
        let mut own = vec![public_addr];
        if let Some(sim) = &sandbox {
            own.extend([sim.api_addr, sim.control_addr]);
        }
        let egress = webhook_egress(cfg, own, resolver)?;
        let webhooks = webhook_worker(cfg, outbox_store, keyring.clone(), egress)?;
        services = services.with_webhooks(webhooks.service.clone());
        services = services.with_audit(Arc::new(AuditLog::new(
            audit_store,
            cfg.audit.retention_days,
        )));
        services = services.with_keys(key_store);
        services = services.with_issuers(issuer_store.clone());
        // Reconciliation needs D1 to ask; without it there is no schedule to keep either.
        let rc = &cfg.reconcile;
        let schedule = (rc.enabled && provider.is_some()).then(|| {
            Schedule::new(
                lifecycle_store.clone(),
                Duration::from_secs(rc.pending_grace_s),
                Duration::from_secs(rc.stale_after_s),
            )
        });
        if let Some(s) = &schedule {
            services = services.with_schedule(s.clone());
        }
        let lifecycle = Lifecycle::new(
            services.clone(),
            lifecycle_store.clone(),
            schedule.clone(),
            Duration::from_secs(cfg.notify.event_ttl_s),
        );
        // Data-key rotation: re-seal records under older keys (every backend; on Cluster the
        // walk visits every primary).
        let rk = &cfg.rekey;
        let rekeyer = rk.enabled.then(|| {
            Rekeyer::new(
                services.clone(),
                lifecycle_store.clone(),
                RekeySettings {
                    interval: Duration::from_millis(rk.interval_ms),
                    batch: rk.batch,
                    lease: Duration::from_millis(rk.lease_ms),
                },
            )
        });
        // Fingerprint-key rotation: re-index the dedup fingerprints under the active
        // fingerprint key, then drop the entries under the others (every backend).
        let fr = &cfg.fp_reindex;
        let fp_reindexer = fr.enabled.then(|| {
            crate::domain::fp_reindex::FpReindexer::new(
                services.clone(),
                lifecycle_store.clone(),
                crate::domain::fp_reindex::FpReindexSettings {
                    interval: Duration::from_millis(fr.interval_ms),
                    batch: fr.batch,
                    lease: Duration::from_millis(fr.lease_ms),
                },
            )
        });
        let token_counts = crate::domain::token_counts::TokenCountReporter::new(
            count_store,
            lifecycle_store.clone(),
            Duration::from_millis(cfg.metrics.token_counts_interval_ms),
        );
        // Next to the counts backfill: same lease-and-steps pattern, its own job.
        let wallet_index = crate::domain::wallet_index::WalletIndexBackfill::new(
            services.store.clone(),
            lifecycle_store.clone(),
        );
        let lifecycle_for_issuers = lifecycle_store.clone();
        let reconciler = match (schedule, provider) {
            (Some(schedule), Some(provider)) => Some(Reconciler::new(
                lifecycle.clone(),
                lifecycle_store,
                schedule,
                provider,
                ReconcileSettings {
                    interval: Duration::from_millis(rc.interval_ms),
                    batch: rc.batch,
                    lease_ttl: Duration::from_millis(rc.lease_ms),
                },
            )),
            _ => None,
        };
        let is = &cfg.issuer;
        let issuers = Arc::new(IssuerService::new(
            issuer_store,
            issuer_op_store,
            issuer_provider,
            services.clone(),
            IssuerSettings {
                worker_interval: Duration::from_millis(is.worker_interval_ms),
                redrive_after: Duration::from_millis(is.redrive_after_ms),
                poll_after: Duration::from_millis(is.poll_after_ms),
                max_backoff: Duration::from_millis(is.max_backoff_ms),
                batch: is.batch,
                notification_ttl: Duration::from_secs(is.notification_ttl_s),
                lease: Duration::from_millis(is.worker_interval_ms.saturating_mul(10).max(5000)),
            },
        ));
        // Physical card orders follow production through the issuer service's PRODUCE hook.
        let production = Arc::new(crate::domain::production_service::ProductionService::new(
            (*issuers).clone(),
            production_store.clone(),
            production_provider,
            services.webhooks.clone(),
        ));
        production.register();
        // The issuer's cards follow DELETE / SUSPEND / RESUME and Click to Pay outcomes through
        // hooks on the same service (domain::issuer_cards).
        let cards = Arc::new(crate::domain::issuer_cards::IssuerCards::new(
            (*issuers).clone(),
            card_store,
            Some(production_store),
            services.webhooks.clone(),
        ));
        cards.register();
        let notify = Arc::new(NotifyState {
            auth: notify_auth,
            lifecycle,
            merchant_gateway_id: cfg.d1.merchant_gateway_id.clone(),
        });
        let settings = HttpSettings {
            request_timeout: cfg.request_timeout(),
            max_concurrency: cfg.server.max_concurrency,
            body_limit: cfg.server.body_limit_bytes,
            access_log: crate::http::telemetry::AccessLog {
                enabled: cfg.log.access,
                sample: cfg.log.access_sample,
            },
        };
        // Cached as long as API keys are (docs/security.md, "Client certificates").
        let client_certs = Arc::new(crate::domain::client_certs::ClientCerts::new(
            cert_store,
            services.store.clone(),
            Duration::from_millis(cfg.auth.api_key_cache_ttl_ms),
        ));
        let state = AppState::new(crate::http::AppStateInner {
            services,
            admin_token: Arc::new(admin_token),
            body_limit: cfg.server.body_limit_bytes,
            idempotency_ttl_s: cfg.idempotency.ttl_s,
            idempotency_lock_ttl_s: cfg.idempotency.lock_ttl_s,
            notify,
            rate_limiter: Arc::new(rate_limiter(cfg).await?),
            client_certs,
            issuers: issuers.clone(),
            production,
            cards,
        });
        Ok(Gateway {
            state,
            settings,
            sandbox,
            grace: Duration::from_millis(cfg.server.shutdown_grace_ms),
            reconciler,
            rekeyer,
            fp_reindexer,
            token_counts,
            wallet_index,
            webhooks,
            tls,
            issuers,
            issuer_lifecycle: lifecycle_for_issuers,
        })
    }

    /// Serves until `shutdown` resolves; in-flight requests finish first.
    pub async fn run<F>(self, listener: TcpListener, shutdown: F) -> Result<(), AppError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let router = crate::http::router(self.state.clone(), &self.settings);
        // Drains metric histograms (we run no exporter task; see src/observability.rs).
        let _upkeep = AbortOnDrop(Some(tokio::spawn(async {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                crate::observability::run_upkeep();
            }
        })));
        // The signal is shared: the server stops accepting on it, and the grace timer starts
        // from it, so a stuck request cannot hold the process forever.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        // Reconciliation stops on the same signal; the guard also stops it if serving fails.
        let mut reconciling = self
            .reconciler
            .map(|r| AbortOnDrop(Some(tokio::spawn(r.run(stop_rx.clone())))));
        let mut rekeying = self
            .rekeyer
            .map(|r| AbortOnDrop(Some(tokio::spawn(r.run(stop_rx.clone())))));
        let mut fp_reindexing = self
            .fp_reindexer
            .map(|r| AbortOnDrop(Some(tokio::spawn(r.run(stop_rx.clone())))));
        let mut counting = AbortOnDrop(Some(tokio::spawn(self.token_counts.run(stop_rx.clone()))));
        let mut indexing = AbortOnDrop(Some(tokio::spawn(self.wallet_index.run(stop_rx.clone()))));
        // Re-drives issuer calls whose outcome is unknown and polls operations no notification
        // finished (domain::issuer_service).
        let mut issuer_worker = AbortOnDrop(Some(tokio::spawn(
            (*self.issuers)
                .clone()
                .run(self.issuer_lifecycle.clone(), stop_rx.clone()),
        )));
        // Webhook delivery stops on the signal too, abandoning attempts in flight (their jobs
        // are claimed again after `webhooks.claim_idle_ms`, by this or another instance).
        let mut delivering = {
            let mut rx = stop_rx.clone();
            let stopped = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            let hooks = &self.webhooks;
            let worker = hooks.service.clone().run(hooks.sender.clone(), stopped);
            AbortOnDrop(Some(tokio::spawn(worker)))
        };
        // Certificate reloads (SIGHUP, file changes) until the signal; registered before serving
        // so a SIGHUP that reaches a serving gateway always reloads.
        let _reloading = self.tls.clone().map(|tls| {
            let mut rx = stop_rx.clone();
            AbortOnDrop(Some(tokio::spawn(tls.watch(async move {
                let _ = rx.wait_for(|s| *s).await;
            }))))
        });
        let mut serve_rx = stop_rx.clone();
        let serve = crate::http::serve(listener, router, self.tls.clone(), async move {
            let _ = serve_rx.wait_for(|s| *s).await;
        });
        let grace = self.grace;
        let mut grace_rx = stop_rx;
        let deadline = async move {
            let _ = grace_rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            r = serve => r?,
            _ = deadline => {
                tracing::warn!(grace_ms = grace.as_millis() as u64, "shutdown grace period over; abandoning in-flight requests");
            }
        }
        // The signal was given: it finishes at once (and releases its lease).
        if let Some(handle) = reconciling.as_mut().and_then(|g| g.0.take()) {
            let _ = handle.await;
        }
        // Waiting releases the worker's hold on the store (the embedded file) before returning.
        if let Some(handle) = delivering.0.take() {
            let _ = handle.await;
        }
        if let Some(handle) = counting.0.take() {
            let _ = handle.await;
        }
        if let Some(handle) = indexing.0.take() {
            let _ = handle.await;
        }
        if let Some(handle) = issuer_worker.0.take() {
            let _ = handle.await;
        }
        // The same for re-encryption: an aborted task is dropped later, on the runtime's
        // schedule, and until then it holds the store (a test reopening the embedded file
        // right after shutdown saw "already open").
        if let Some(handle) = rekeying.as_mut().and_then(|g| g.0.take()) {
            let _ = handle.await;
        }
        if let Some(handle) = fp_reindexing.as_mut().and_then(|g| g.0.take()) {
            let _ = handle.await;
        }
        if let Some(sim) = self.sandbox {
            sim.shutdown().await;
        }
        Ok(())
    }
}

/// Aborts a background task when dropped, so an early return cannot leave it running.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}

type ProviderSetup = (
    Option<Arc<dyn NetworkTokenProvider>>,
    Option<Arc<dyn crate::domain::issuer_provider::IssuerProvider>>,
    Option<tokengate_d1_sim::SimHandle>,
    Option<Arc<dyn crate::domain::production_orders::ProductionProvider>>,
);

/// Builds the D1 provider: the real D1 when `d1.base_url` is set; in sandbox mode without it,
/// the simulator started in-process on `sim.listen` and used over real sockets with mTLS, OAuth
/// and JWE exactly as D1 would be.
/// `notify` are the client credentials the sandbox simulator uses to call us back.
async fn d1_provider(
    cfg: &Config,
    public_addr: SocketAddr,
    notify: Option<&ClientCredentials>,
) -> Result<ProviderSetup, AppError> {
    use crate::d1::{D1Client, D1Config};
    use tokengate_d1_protocol::devkeys::DevMaterial;
    use tokengate_d1_sim::{NotifyTarget, SimConfig, Simulator};

    if !cfg.d1.enabled {
        return Ok((None, None, None, None));
    }
    let d1 = &cfg.d1;
    let (material, base_url, sim) = match &d1.base_url {
        Some(url) => {
            let dir = d1
                .keys_dir
                .as_ref()
                .ok_or_else(|| AppError::D1("d1.keys_dir is required with d1.base_url".into()))?;
            let m = crate::d1::keyfiles::load(dir, d1)?;
            (m, url.clone(), None)
        }
        None => {
            let m = DevMaterial::generate(&d1.merchant_gateway_id)
                .map_err(|e| AppError::D1(e.to_string()))?;
            let mut sim_cfg = SimConfig::from_dev_material(&m, &d1.merchant_gateway_id);
            // Notifications come back to this gateway; a wildcard listen address is reached
            // over loopback.
            let mut target = public_addr;
            if target.ip().is_unspecified() {
                target.set_ip(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
            }
            let mut notify_target = NotifyTarget::http(format!("http://{target}"));
            // An HTTPS gateway: the simulator trusts the certificates of `cert_file` (put the
            // issuing CA in the chain file, or use a self-signed certificate). It presents no
            // client certificate, so with `require_client_cert` its notifications are refused.
            if let Some(t) = &cfg.server.tls {
                notify_target.base_url = format!("https://{target}");
                notify_target.ca_pem = std::fs::read_to_string(&t.cert_file).ok();
            }
            notify_target.oauth = notify.map(|c| (c.client_id.clone(), c.client_secret.clone()));
            sim_cfg.notify = Some(notify_target);
            let api = TcpListener::bind(cfg.sim.listen).await?;
            let control = TcpListener::bind(cfg.sim.control_listen).await?;
            let handle = Simulator::start(sim_cfg, api, control)
                .await
                .map_err(|e| AppError::D1(e.to_string()))?;
            tracing::warn!(
                d1 = %handle.base_url(),
                control = %handle.control_url(),
                "SANDBOX MODE: using the in-process D1 simulator with freshly generated development keys"
            );
            let url = handle.base_url();
            (m.into(), url, Some(handle))
        }
    };
    let issuer_base = d1
        .issuer_base_url
        .clone()
        .unwrap_or_else(|| tokengate_d1_protocol::paths::default_issuer_base(&base_url));
    let client_cfg = D1Config::from_parts(base_url, d1, material);
    let client = D1Client::new(client_cfg).map_err(|e| AppError::D1(e.to_string()))?;
    // The issuer side shares the client's pool, token cache and breaker.
    let issuer =
        crate::d1::D1IssuerClient::new(client.clone(), &issuer_base, d1.issuer_paths.clone())
            .map_err(AppError::D1)?;
    // Physical card orders: the same base, pool, token cache and breaker.
    let production = crate::d1::D1ProductionClient::new(
        client.clone(),
        &issuer_base,
        d1.production_paths.clone(),
    )
    .map_err(AppError::D1)?;
    Ok((
        Some(Arc::new(client)),
        Some(Arc::new(issuer)),
        sim,
        Some(Arc::new(production)),
    ))
}

/// The request rate limiter: per instance, or shared through Redis (`rate_limit.shared`, which
/// `Config::validate` allows with Redis only). Shared mode leases on a connection of its own,
/// so a lease never queues behind token writes.
async fn rate_limiter(cfg: &Config) -> Result<crate::domain::ratelimit::RateLimiter, AppError> {
    use crate::domain::ratelimit::{Limit, RateLimiter, SharedSettings};
    let c = &cfg.rate_limit;
    let per_key = Some(Limit {
        per_second: c.per_key_per_s,
        burst: c.per_key_burst,
    });
    let per_merchant = Some(Limit {
        per_second: c.per_merchant_per_s,
        burst: c.per_merchant_burst,
    });
    if !c.shared {
        return Ok(RateLimiter::new(per_key, per_merchant));
    }
    let s = &cfg.storage;
    let rc = RedisConfig {
        url: s.redis_url.clone().unwrap_or_default(),
        cluster_nodes: s.redis_cluster_nodes.clone(),
        key_prefix: s.key_prefix.clone(),
        connect_timeout: Duration::from_millis(s.connect_timeout_ms),
        response_timeout: Duration::from_millis(s.response_timeout_ms),
        // Leases are no acknowledged data: never wait for replicas.
        durability: Durability::None,
        // The limiter reads no tokens.
        token_cache_entries: 0,
    };
    let store = Arc::new(RedisStore::connect(&rc).await?);
    Ok(RateLimiter::shared(
        per_key,
        per_merchant,
        store,
        SharedSettings {
            batch: c.shared_batch,
            lease_ttl: Duration::from_millis(c.shared_lease_ms),
        },
    ))
}
