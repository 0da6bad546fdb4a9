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
use crate::domain::provider::NetworkTokenProvider;
use crate::domain::service::Services;
use crate::http::{AppState, HttpSettings};
use crate::storage::TokenStore;
use crate::storage::embedded::EmbeddedStore;
use crate::storage::redis::{RedisConfig, RedisStore};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("vault keys: {0}")]
    Keys(#[from] crate::crypto::CryptoError),
    #[error("store: {0}")]
    Store(#[from] crate::storage::StoreError),
    #[error("D1: {0}")]
    D1(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything a running gateway holds, besides the listener.
pub struct Gateway {
    pub state: AppState,
    pub settings: HttpSettings,
    /// Keeps the in-process simulator (sandbox mode) alive as long as the gateway.
    pub sandbox: Option<crate::sim::SimHandle>,
    /// How long in-flight requests may run after the shutdown signal.
    pub grace: Duration,
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
            fingerprint_key: cfg
                .vault
                .fingerprint_key
                .clone()
                .unwrap_or_else(|| SecretString::from("")),
        },
        None => {
            tracing::warn!(
                "!!! SANDBOX MODE: using the built-in DEVELOPMENT vault keys. Card data stored now is NOT protected. Never use this with real cards. !!!"
            );
            crate::crypto::dev::material()
        }
    }
}

pub async fn open_store(cfg: &Config) -> Result<Arc<dyn TokenStore>, AppError> {
    let s = &cfg.storage;
    if s.redis_url.is_some() || !s.redis_cluster_nodes.is_empty() {
        let rc = RedisConfig {
            url: s.redis_url.clone().unwrap_or_default(),
            cluster_nodes: s.redis_cluster_nodes.clone(),
            key_prefix: s.key_prefix.clone(),
            connect_timeout: Duration::from_millis(s.connect_timeout_ms),
            response_timeout: Duration::from_millis(s.response_timeout_ms),
        };
        Ok(Arc::new(RedisStore::connect(&rc).await?))
    } else {
        let dir: PathBuf = s.data_dir.clone();
        Ok(Arc::new(EmbeddedStore::open(&dir)?))
    }
}

impl Gateway {
    /// Builds the gateway. `public_addr` is where it will listen (for the sandbox simulator's
    /// notifications).
    pub async fn build(cfg: &Config, public_addr: SocketAddr) -> Result<Gateway, AppError> {
        cfg.validate()?;
        let keyring = Arc::new(Keyring::new(&key_material(cfg))?);
        let store = open_store(cfg).await?;
        let (provider, sandbox) = d1_provider(cfg, public_addr).await?;
        let provider: Option<Arc<dyn NetworkTokenProvider>> = provider;
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
        let services = Services::new(
            store,
            keyring,
            provider,
            Duration::from_millis(cfg.auth.api_key_cache_ttl_ms),
        );
        let settings = HttpSettings {
            request_timeout: cfg.request_timeout(),
            max_concurrency: cfg.server.max_concurrency,
            body_limit: cfg.server.body_limit_bytes,
        };
        let state = AppState {
            services,
            admin_token: Arc::new(admin_token),
            body_limit: cfg.server.body_limit_bytes,
            idempotency_ttl_s: cfg.idempotency.ttl_s,
            idempotency_lock_ttl_s: cfg.idempotency.lock_ttl_s,
        };
        Ok(Gateway {
            state,
            settings,
            sandbox,
            grace: Duration::from_millis(cfg.server.shutdown_grace_ms),
        })
    }

    /// Serves until `shutdown` resolves; in-flight requests finish first.
    pub async fn run<F>(self, listener: TcpListener, shutdown: F) -> Result<(), AppError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let router = crate::http::router(self.state.clone(), &self.settings);
        // The signal is shared: the server stops accepting on it, and the grace timer starts
        // from it, so a stuck request cannot hold the process forever.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut serve_rx = stop_rx.clone();
        let serve = crate::http::serve(listener, router, async move {
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
        if let Some(sim) = self.sandbox {
            sim.shutdown().await;
        }
        Ok(())
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
    Option<crate::sim::SimHandle>,
);

/// Builds the D1 provider: the real D1 when `d1.base_url` is set; in sandbox mode without it,
/// the simulator started in-process on `sim.listen` and used over real sockets with mTLS, OAuth
/// and JWE exactly as D1 would be.
async fn d1_provider(cfg: &Config, public_addr: SocketAddr) -> Result<ProviderSetup, AppError> {
    use crate::d1::{D1Client, D1Config};
    use crate::devkeys::DevMaterial;
    use crate::sim::{NotifyTarget, SimConfig, Simulator};

    if !cfg.d1.enabled {
        return Ok((None, None));
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
            sim_cfg.notify = Some(NotifyTarget::http(format!("http://{target}")));
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
    let client_cfg = D1Config::from_parts(base_url, d1, material);
    let client = D1Client::new(client_cfg).map_err(|e| AppError::D1(e.to_string()))?;
    Ok((Some(Arc::new(client)), sim))
}
