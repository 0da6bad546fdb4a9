//! D1 simulator: the D1 API as documented in docs/d1-protocol.md, with a control API for faults and lifecycle events.
//!
//! Tests, benchmarks and sandbox mode run the real D1 client against it over real sockets:
//! mutual TLS, ES256 client assertions, JWE card data and cryptograms, notifications back to
//! the gateway, and injected faults.
//!
//! # Layout
//!
//! - [`server`]: the TLS accept loop (HTTP/1.1 and h2, connection resets, graceful shutdown).
//! - [`api`]: the D1 routes, the one middleware that applies faults/auth/noise, the error shape.
//! - [`control`]: the plain-HTTP control API (`/sim/...`).
//! - [`state`]: merchants, tokens and access tokens in memory; the lifecycle rules.
//! - [`notify`]: notification delivery with redelivery, OAuth towards the gateway, and the
//!   duplicate/reorder faults.
//! - [`faults`]: the fault document and the per-request dice roll.
//! - `issuer`: the issuer side (`/banking/v1`): a card registry seeded from the control API,
//!   Click to Pay operations completing asynchronously with batched notifications,
//!   get-operation, dedup by `issuerRequestId`, D1's validation and error shapes.
//! - [`orders`]: physical card orders (production, batch, production status, progression).
//!
//! # Choices the protocol leaves open
//!
//! - Token PANs are 16 digits, Luhn-valid, under [`DEFAULT_TOKEN_BIN_PREFIX`] (`489537`) unless
//!   configured otherwise: a range reserved for simulator tokens, so a token number can never be
//!   mistaken for a test card PAN (`4111...`, `5555...`). Token expiry is three years ahead.
//! - A PAR is `V001` + 25 characters derived (keyed HMAC) from the PAN: stable per card.
//! - ECI is `05` for CIT and `07` for MIT; a cryptogram is 20 random bytes, valid 15 minutes.
//! - The assertion's `aud` must be a URL whose path is `/authz/v1` (the host is not compared).
//!   `jti` replay is not tracked.
//! - A path `merchantGatewayId` other than ours is `404 NOT_FOUND`.
//! - Control event `RENEW` gives the token a new token PAN (new last digits) and sets both the
//!   card and the token expiry to `expiry` (default: card expiry + 3 years).
//! - Notifications only follow control-API events and asynchronous completions, not the
//!   gateway's own suspend/resume/delete calls. Without a notify target they are dropped.

mod api;
mod context;
mod control;
pub mod faults;
mod issuer;
mod notify;
pub mod orders;
mod server;
mod state;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub use faults::{ErrorRates, Faults, Latency, Op};

use context::{Keys, Shared, Stats};
use notify::Notifier;
use orders::OrderBook;
use state::Store;
use tokengate_d1_protocol::devkeys::{DevKeysError, DevMaterial};
use tokengate_d1_protocol::jose;
use tokengate_d1_protocol::tls;

/// Default token BIN prefix: the simulator's reserved range for token PANs.
pub const DEFAULT_TOKEN_BIN_PREFIX: &str = "489537";

/// Everything the simulator needs; see [`SimConfig::from_dev_material`] for the usual source.
pub struct SimConfig {
    /// The only merchant gateway this D1 knows.
    pub merchant_gateway_id: String,
    pub server_cert_pem: String,
    pub server_key_pem: SecretString,
    /// `Some`: clients must present a certificate issued by this CA (mutual TLS).
    pub client_ca_pem: Option<String>,
    /// ES256 assertion keys registered for `merchant_gateway_id`: (kid, SPKI PEM public key).
    pub es256_keys: Vec<(String, String)>,
    /// D1's card-data decryption keys: (kid, PKCS#8 PEM private key).
    pub jwe_keys: Vec<(String, SecretString)>,
    /// The gateway's key cryptogram responses are encrypted to, and its kid.
    pub gateway_jwe_public_pem: String,
    pub gateway_jwe_kid: String,
    /// Where notifications go; can also be set after start ([`SimHandle::set_notify_target`]).
    pub notify: Option<NotifyTarget>,
    /// Leading digits of minted token PANs (1 to 12 digits); see [`DEFAULT_TOKEN_BIN_PREFIX`].
    pub token_bin_prefix: String,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("merchant_gateway_id", &self.merchant_gateway_id)
            .field("mtls", &self.client_ca_pem.is_some())
            .field(
                "es256_kids",
                &self.es256_keys.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field(
                "jwe_kids",
                &self.jwe_keys.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("gateway_jwe_kid", &self.gateway_jwe_kid)
            .field("notify", &self.notify)
            .field("token_bin_prefix", &self.token_bin_prefix)
            .finish_non_exhaustive()
    }
}

/// The gateway endpoint notifications are posted to.
#[derive(Clone)]
pub struct NotifyTarget {
    /// `http://` or `https://` base of the gateway; `/merchant-gateways/...` is appended.
    pub base_url: String,
    /// CA to verify an https gateway with.
    pub ca_pem: Option<String>,
    /// Certificate chain and key (PEM) D1 presents to the gateway.
    pub client_identity: Option<(String, String)>,
    /// Client credentials for the gateway's `/oauth2/token`; without them no token is sent.
    pub oauth: Option<(String, SecretString)>,
}

impl std::fmt::Debug for NotifyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyTarget")
            .field("base_url", &self.base_url)
            .field("ca", &self.ca_pem.is_some())
            .field("client_identity", &self.client_identity.is_some())
            .field("oauth_client_id", &self.oauth.as_ref().map(|(id, _)| id))
            .finish()
    }
}

impl NotifyTarget {
    /// A plain-HTTP target without authentication (the sandbox gateway's default).
    pub fn http(base_url: impl Into<String>) -> NotifyTarget {
        NotifyTarget {
            base_url: base_url.into(),
            ca_pem: None,
            client_identity: None,
            oauth: None,
        }
    }
}

impl SimConfig {
    /// The simulator side of a development key set: D1's server certificate, mTLS against the
    /// development CA, the gateway's ES256 public key, D1's JWE key, the gateway's JWE public
    /// key. No notify target yet (the gateway's address is usually not known at this point).
    pub fn from_dev_material(m: &DevMaterial, merchant_gateway_id: &str) -> SimConfig {
        SimConfig {
            merchant_gateway_id: merchant_gateway_id.to_owned(),
            server_cert_pem: m.d1_server_cert_pem.clone(),
            server_key_pem: SecretString::from(m.d1_server_key_pem.clone()),
            client_ca_pem: Some(m.ca_cert_pem.clone()),
            es256_keys: vec![(m.es256_kid.clone(), m.gateway_es256_pub_pem.clone())],
            jwe_keys: vec![(
                m.d1_jwe_kid.clone(),
                SecretString::from(m.d1_jwe_key_pem.clone()),
            )],
            gateway_jwe_public_pem: m.gateway_jwe_pub_pem.clone(),
            gateway_jwe_kid: m.gateway_jwe_kid.clone(),
            notify: None,
            token_bin_prefix: DEFAULT_TOKEN_BIN_PREFIX.to_owned(),
        }
    }
}

/// Why the simulator could not start. Messages name the bad input, never key material.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulator configuration: {0}")]
    Config(String),
    #[error("simulator key {what}: {source}")]
    Key {
        what: String,
        #[source]
        source: jose::JoseError,
    },
    #[error("simulator TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("simulator listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("simulator: {0}")]
    Notify(#[from] notify::TargetError),
    #[error("simulator keys: {0}")]
    DevKeys(#[from] DevKeysError),
}

/// The simulator; see [`Simulator::start`].
pub struct Simulator;

impl Simulator {
    /// Starts the D1 API on `api` (TLS) and the control API on `control` (plain HTTP). Binds
    /// nothing itself: tests bind `127.0.0.1:0` and read the ports from the handle. Runs until
    /// [`SimHandle::shutdown`] or until the handle is dropped.
    pub async fn start(
        cfg: SimConfig,
        api: TcpListener,
        control: TcpListener,
    ) -> Result<SimHandle, SimError> {
        if cfg.merchant_gateway_id.is_empty() {
            return Err(SimError::Config("merchant_gateway_id is empty".into()));
        }
        if !Store::valid_prefix(&cfg.token_bin_prefix) {
            return Err(SimError::Config(
                "token_bin_prefix must be 1 to 12 digits".into(),
            ));
        }
        let keys = parse_keys(&cfg)?;
        let server_config = tls::server_config(
            &cfg.server_cert_pem,
            cfg.server_key_pem.expose_secret(),
            cfg.client_ca_pem.as_deref(),
            true,
        )?;
        let acceptor = TlsAcceptor::from(Arc::new(server_config));
        let api_addr = api.local_addr()?;
        let control_addr = control.local_addr()?;

        let (notifier, notify_rx) = Notifier::new();
        notifier.set_target(cfg.notify)?;
        let notify_tx = notifier.sender();
        let shared = Arc::new(Shared {
            merchant_gateway_id: cfg.merchant_gateway_id,
            keys,
            store: Store::new(cfg.token_bin_prefix),
            faults: Mutex::new(Faults::default()),
            stats: Stats::default(),
            notifier,
            issuer: issuer::IssuerState::default(),
            orders: OrderBook::default(),
        });

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(server::serve_tls(
                api,
                acceptor,
                api::router(shared.clone()),
                shutdown_rx.clone(),
            )),
            tokio::spawn({
                let router = control::router(shared.clone());
                let shutdown = wait_shutdown(shutdown_rx.clone());
                async move {
                    if let Err(e) = axum::serve(control, router)
                        .with_graceful_shutdown(shutdown)
                        .await
                    {
                        tracing::error!(error = %e, "control API stopped");
                    }
                }
            }),
            tokio::spawn(notify::run(
                shared.clone(),
                notify_rx,
                notify_tx,
                shutdown_rx,
            )),
        ];
        tracing::info!(%api_addr, %control_addr, "D1 simulator started");
        Ok(SimHandle {
            api_addr,
            control_addr,
            shared,
            shutdown_tx,
            tasks,
        })
    }
}

fn parse_keys(cfg: &SimConfig) -> Result<Keys, SimError> {
    let key_err = |what: String| move |source| SimError::Key { what, source };
    let es256 = cfg
        .es256_keys
        .iter()
        .map(|(kid, pem)| {
            jose::public_key_from_pem(pem)
                .map(|k| (kid.clone(), k))
                .map_err(key_err(format!("es256 {kid}")))
        })
        .collect::<Result<_, _>>()?;
    let jwe = cfg
        .jwe_keys
        .iter()
        .map(|(kid, pem)| {
            jose::JweDecryptionKey::from_pem(pem.expose_secret())
                .map(|k| (kid.clone(), k))
                .map_err(key_err(format!("jwe {kid}")))
        })
        .collect::<Result<_, _>>()?;
    let gateway_jwe = jose::public_key_from_pem(&cfg.gateway_jwe_public_pem)
        .map_err(key_err("gateway jwe public key".into()))?;
    Ok(Keys {
        es256,
        jwe,
        gateway_jwe,
        gateway_jwe_kid: cfg.gateway_jwe_kid.clone(),
    })
}

/// A running simulator. Dropping it stops the simulator in the background;
/// [`SimHandle::shutdown`] stops it and waits.
pub struct SimHandle {
    pub api_addr: SocketAddr,
    pub control_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("api_addr", &self.api_addr)
            .field("control_addr", &self.control_addr)
            .finish_non_exhaustive()
    }
}

/// A listener bound to `0.0.0.0` is reached at `127.0.0.1` (the development certificate is
/// issued for `localhost` and `127.0.0.1`).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

impl SimHandle {
    /// The D1 API base, e.g. `https://127.0.0.1:8765/authz/v1`.
    pub fn base_url(&self) -> String {
        format!("https://{}{}", reachable(self.api_addr), api::BASE_PATH)
    }

    /// The control API base, e.g. `http://127.0.0.1:8766` (paths start with `/sim/`).
    pub fn control_url(&self) -> String {
        format!("http://{}", reachable(self.control_addr))
    }

    /// Sets where notifications go. A target that cannot be built (an unreadable CA or client
    /// certificate, a URL that is neither http nor https) is logged and leaves no target, so
    /// events are dropped; use [`SimHandle::try_set_notify_target`] to get the error.
    pub fn set_notify_target(&self, t: NotifyTarget) {
        if let Err(e) = self.try_set_notify_target(t) {
            tracing::error!(error = %e, "notify target not usable; notifications are dropped");
            // Reachable only with a target that failed to build; clearing cannot fail.
            let _ = self.shared.notifier.set_target(None);
        }
    }

    /// Like [`SimHandle::set_notify_target`], reporting a target that cannot be built.
    pub fn try_set_notify_target(&self, t: NotifyTarget) -> Result<(), SimError> {
        Ok(self.shared.notifier.set_target(Some(t))?)
    }

    /// The current fault document.
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Replaces the faults in-process (the same as `PUT /sim/faults`).
    pub fn set_faults(&self, faults: Faults) -> Result<(), SimError> {
        faults.validate().map_err(SimError::Config)?;
        self.shared.set_faults(faults);
        Ok(())
    }

    /// The `/sim/stats` document.
    pub fn stats(&self) -> serde_json::Value {
        let mut doc = self.shared.stats.to_json();
        doc["productionOrders"] = self.shared.orders.stats_json();
        doc
    }

    /// Where PRODUCE operations (one per production step) are handed for notification.
    pub fn set_produce_sink(&self, sink: Option<orders::ProduceSink>) {
        self.shared.orders.set_sink(sink);
    }

    /// Replaces how production behaves (the same as `PUT /sim/orders/config`).
    pub fn set_order_config(&self, config: orders::OrderConfig) -> Result<(), SimError> {
        self.shared
            .orders
            .set_config(config)
            .map_err(SimError::Config)
    }

    /// Stops accepting, lets in-flight requests finish (briefly), stops redeliveries, and
    /// waits for every task.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        for task in std::mem::take(&mut self.tasks) {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "simulator task failed");
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
    }
}

/// Resolves once shutdown is requested (or the handle and its sender are gone).
pub(crate) async fn wait_shutdown(mut rx: watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// `tokengate d1-sim` arguments (the binary maps its command line onto this).
#[derive(Debug, Clone)]
pub struct SimCliArgs {
    /// D1 API listener (TLS).
    pub listen: SocketAddr,
    /// Control API listener (plain HTTP; keep it on loopback).
    pub control_listen: SocketAddr,
    /// Development key set to load. Without it, `./sim-keys` is loaded if it holds one, or a
    /// fresh set is generated and written there, so the gateway can be pointed at it.
    pub keys_dir: Option<PathBuf>,
    /// Gateway base URL notifications are posted to (`http://` or `https://`; an https gateway
    /// is verified against the key set's CA).
    pub notify_url: Option<String>,
    /// Merchant gateway id for a newly generated key set (a loaded set keeps its own);
    /// default `tokengate-sandbox`.
    pub merchant_gateway_id: Option<String>,
}

/// Where `d1-sim` keeps generated keys when no `--keys-dir` is given.
const DEFAULT_KEYS_DIR: &str = "sim-keys";
const DEFAULT_MERCHANT_GATEWAY_ID: &str = "tokengate-sandbox";

/// Runs the simulator as a process until Ctrl-C.
pub async fn run_cli(args: SimCliArgs) -> anyhow::Result<()> {
    let (material, dir) = load_or_generate_keys(&args)?;
    let mgid = material.merchant_gateway_id.clone();
    let mut cfg = SimConfig::from_dev_material(&material, &mgid);
    if let Some(url) = &args.notify_url {
        cfg.notify = Some(NotifyTarget {
            base_url: url.clone(),
            ca_pem: url
                .starts_with("https://")
                .then(|| material.ca_cert_pem.clone()),
            client_identity: None,
            oauth: None,
        });
    }
    let api = TcpListener::bind(args.listen).await?;
    let control = TcpListener::bind(args.control_listen).await?;
    let handle = Simulator::start(cfg, api, control).await?;
    println!("D1 simulator running (development keys, not for production)");
    println!("  D1 API base:          {} (mutual TLS)", handle.base_url());
    println!("  control API:          {}/sim/", handle.control_url());
    println!("  keys directory:       {}", dir.display());
    println!("  merchant gateway id:  {mgid}");
    println!(
        "  notifications to:     {}",
        args.notify_url.as_deref().unwrap_or("(none)")
    );
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    handle.shutdown().await;
    Ok(())
}

fn load_or_generate_keys(args: &SimCliArgs) -> anyhow::Result<(DevMaterial, PathBuf)> {
    if let Some(dir) = &args.keys_dir {
        return Ok((DevMaterial::load_from(dir)?, dir.clone()));
    }
    let dir = PathBuf::from(DEFAULT_KEYS_DIR);
    // Reusing an existing set keeps a gateway that was pointed at it working across restarts.
    if dir.join("ids.json").exists() {
        return Ok((DevMaterial::load_from(&dir)?, dir));
    }
    let mgid = args
        .merchant_gateway_id
        .as_deref()
        .unwrap_or(DEFAULT_MERCHANT_GATEWAY_ID);
    let material = DevMaterial::generate(mgid)?;
    material.write_to(&dir)?;
    Ok((material, dir))
}
