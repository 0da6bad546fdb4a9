//! Configuration: embedded `config/default.toml`, then an optional file, then environment
//! variables `TOKENGATE__SECTION__KEY`; then [`Config::validate`] for cross-field rules.
//!
//! Errors name the offending key's path. Secrets are `SecretString`: they never print.

pub mod rotate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use secrecy::SecretString;
use serde::Deserialize;

/// The embedded defaults, so `tokengate serve` runs with no file at all.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Development admin token, accepted only in sandbox mode.
pub const SANDBOX_ADMIN_TOKEN: &str = "sandbox-admin-token";

/// Shortest accepted `notify.client_secret` (it keys the access-token MAC).
pub const MIN_NOTIFY_SECRET_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Sandbox,
    Production,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub mode: Mode,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub storage: StorageConfig,
    pub vault: VaultConfig,
    pub auth: AuthConfig,
    pub idempotency: IdempotencyConfig,
    pub d1: D1Section,
    pub sim: SimSection,
    pub log: LogConfig,
    pub notify: NotifySection,
    pub webhooks: WebhooksSection,
    pub reconcile: ReconcileSection,
    pub rate_limit: RateLimitSection,
    pub rekey: RekeySection,
    /// Optional in a config file: the defaults apply when the section is absent.
    #[serde(default)]
    pub fp_reindex: FpReindexSection,
    /// Optional in a config file: the defaults apply when the section is absent.
    #[serde(default)]
    pub audit: AuditSection,
    /// Optional in a config file: the defaults apply when the section is absent.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Optional in a config file: the defaults apply when the section is absent.
    #[serde(default)]
    pub issuer: IssuerSection,
}

/// The audit trail (`docs/security.md`, "Audit trail").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// Events older than this are trimmed as new events are appended (so a merchant with no
    /// new activity keeps older events until its next audited action).
    pub retention_days: u64,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            retention_days: 365,
        }
    }
}

/// Metrics (`src/observability.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// How often the `tokengate_tokens` gauge is refreshed from the store's token counts (one
    /// small read per merchant per refresh; scrapes never read the store).
    pub token_counts_interval_ms: u64,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            token_counts_interval_ms: 15_000,
        }
    }
}

/// Merchant webhooks: delivery policy of the outbox worker (`docs/webhooks.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksSection {
    /// Attempts per event and endpoint before the delivery is dead-lettered.
    pub max_attempts: u32,
    /// Bound on one attempt (connect, TLS, request, response head).
    pub timeout_ms: u64,
    /// First retry delay; doubles per failed attempt (jittered), up to `backoff_max_ms`.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// How often an idle worker looks for due jobs queued by other instances.
    pub poll_interval_ms: u64,
    /// A claimed delivery not finished within this is taken over by another worker (its
    /// gateway is presumed dead). Must exceed `timeout_ms` comfortably.
    pub claim_idle_ms: u64,
    /// Events are kept (listable, redeliverable) this long.
    pub retention_hours: u64,
    /// Extra CA certificates (PEM) trusted for https receivers, besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// CIDR networks webhook receivers may be in although the SSRF guard refuses them by
    /// default (private, loopback, CGNAT...; `src/egress.rs`), for deployments with internal
    /// receivers. Parsed by [`WebhooksSection::allowed_networks`].
    #[serde(default)]
    pub allow_private_networks: Vec<String>,
}

impl WebhooksSection {
    /// `allow_private_networks` as networks. Strict on purpose: a bare address, bits set after
    /// the prefix (`10.20.1.0/16`, likely a typo) and `/0` (which would switch the guard off)
    /// are errors naming the key, not silently widened or narrowed.
    pub fn allowed_networks(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        const KEY: &str = "webhooks.allow_private_networks";
        let invalid = |msg: String| ConfigError::Invalid { key: KEY, msg };
        let mut nets = Vec::with_capacity(self.allow_private_networks.len());
        for (i, entry) in self.allow_private_networks.iter().enumerate() {
            let net: ipnet::IpNet = entry.trim().parse().map_err(|_| {
                invalid(format!(
                    "entry {i} (`{entry}`) is not a CIDR network such as 10.20.0.0/16 or fd00:1::/48 (a single address is 10.20.0.5/32)"
                ))
            })?;
            if net.trunc() != net {
                return Err(invalid(format!(
                    "entry {i} (`{entry}`) has bits set after the prefix length; the network is {}",
                    net.trunc()
                )));
            }
            if net.prefix_len() == 0 {
                return Err(invalid(format!(
                    "entry {i} (`{entry}`) allows every address and would switch the SSRF guard off; list the internal networks instead"
                )));
            }
            nets.push(net);
        }
        Ok(nets)
    }
}

/// D1's calls to us (`notify-update`) and the OAuth client credentials that protect them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySection {
    /// Client id D1 sends to `POST /oauth2/token` (HTTP Basic). Unset in sandbox mode: random
    /// credentials are generated at start-up and given to the in-process simulator.
    pub client_id: Option<String>,
    /// The matching secret; it also keys the access tokens (HMAC), so every instance with the
    /// same secret accepts every instance's tokens, and changing it revokes them all.
    pub client_secret: Option<SecretString>,
    /// Lifetime of an access token.
    pub token_ttl_s: u64,
    /// Whether `notify-update` requires a bearer token. Only turn off behind another
    /// authenticated channel (e.g. mTLS terminated in front of the gateway).
    pub require_auth: bool,
    /// How long a processed event id is remembered: redeliveries within it are recognised.
    pub event_ttl_s: u64,
}

/// The background job that asks D1 about tokens we have not heard about (lost notifications).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSection {
    pub enabled: bool,
    /// Pause between two ticks.
    pub interval_ms: u64,
    /// Most tokens checked per tick (bounds D1 calls per interval).
    pub batch: usize,
    /// A `PENDING` token is checked this long after it was created.
    pub pending_grace_s: u64,
    /// Any other live token is checked when nothing was heard about it for this long.
    pub stale_after_s: u64,
    /// Lease so one instance at a time runs a tick; a crashed holder frees it after this.
    pub lease_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub request_timeout_ms: u64,
    pub body_limit_bytes: usize,
    pub max_concurrency: usize,
    pub shutdown_grace_ms: u64,
    /// HTTPS on the listener. Absent (the default): plain HTTP, with a loud warning outside
    /// sandbox mode.
    #[serde(default)]
    pub tls: Option<ServerTlsConfig>,
}

/// `[server.tls]`: the gateway's own TLS (rustls, TLS 1.2 and 1.3, ALPN h2 and http/1.1).
/// The files are re-read on SIGHUP and whenever their content changes (checked every
/// `reload_interval_ms`), so a renewed certificate needs no restart.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1) of the leaf.
    pub key_file: PathBuf,
    /// PEM CA bundle for client certificates (mutual TLS with PSP clients).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate chaining to `client_ca_file`. With a CA and this
    /// off, a certificate is asked for and verified when presented, but not required.
    #[serde(default)]
    pub require_client_cert: bool,
    /// How often the files are checked for changes; 0 = only on SIGHUP.
    #[serde(default = "default_tls_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

fn default_tls_reload_interval_ms() -> u64 {
    5000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub token: Option<SecretString>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub redis_url: Option<String>,
    pub redis_cluster_nodes: Vec<String>,
    pub data_dir: PathBuf,
    pub key_prefix: String,
    pub connect_timeout_ms: u64,
    pub response_timeout_ms: u64,
    /// `none`, `wait` or `waitaof` (`docs/storage.md`, "Durable acknowledgement").
    pub redis_durability: String,
    /// Replicas that must confirm each write (`wait`, `waitaof`).
    pub redis_durability_replicas: u32,
    /// `waitaof` only: 1 = also fsynced to the primary's own AOF, 0 = not required.
    pub redis_durability_local: u32,
    /// How long a write may wait for its confirmation before it fails as unavailable.
    pub redis_durability_timeout_ms: u64,
    /// Token records kept in memory for `GET /v1/tokens/{id}` on standalone Redis, coherent
    /// through RESP3 client tracking (`docs/storage.md`, "Token cache"); 0 turns it off.
    pub redis_token_cache_entries: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    pub active_key_id: Option<String>,
    pub keys: BTreeMap<String, SecretString>,
    /// The one-key form of the fingerprint ring: the key with the implicit id
    /// (`crypto::IMPLICIT_FINGERPRINT_KEY_ID`), whose fingerprints are bare hex as before ids.
    pub fingerprint_key: Option<SecretString>,
    /// More fingerprint keys by id (a rotation: docs/security.md, "Fingerprints").
    #[serde(default)]
    pub fingerprint_keys: BTreeMap<String, SecretString>,
    /// The fingerprint key new records are indexed under; required with `fingerprint_keys`.
    #[serde(default)]
    pub active_fingerprint_key_id: Option<String>,
}

impl VaultConfig {
    /// Every configured fingerprint key by id, the one-key form under the implicit id.
    pub fn fingerprint_ring(&self) -> Vec<(String, SecretString)> {
        let implicit = self.fingerprint_key.as_ref().map(|k| {
            (
                crate::crypto::IMPLICIT_FINGERPRINT_KEY_ID.to_owned(),
                k.clone(),
            )
        });
        implicit
            .into_iter()
            .chain(
                self.fingerprint_keys
                    .iter()
                    .map(|(id, k)| (id.clone(), k.clone())),
            )
            .collect()
    }

    /// The active fingerprint key id: as configured, or the implicit one in the one-key form.
    pub fn active_fingerprint_key(&self) -> String {
        self.active_fingerprint_key_id
            .clone()
            .unwrap_or_else(|| crate::crypto::IMPLICIT_FINGERPRINT_KEY_ID.to_owned())
    }
}

/// Background re-indexing of the dedup fingerprints under the active fingerprint key
/// (`domain::fp_reindex`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FpReindexSection {
    pub enabled: bool,
    pub interval_ms: u64,
    pub batch: usize,
    pub lease_ms: u64,
}

impl Default for FpReindexSection {
    fn default() -> Self {
        FpReindexSection {
            enabled: true,
            interval_ms: 1000,
            batch: 200,
            lease_ms: 30000,
        }
    }
}

/// Background re-encryption under the active data key (`domain::rekey`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RekeySection {
    pub enabled: bool,
    pub interval_ms: u64,
    pub batch: usize,
    pub lease_ms: u64,
}

/// Request rate limits (`domain::ratelimit`); a rate of 0 disables a limit. Per instance,
/// or fleet-wide with `shared` (Redis only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    pub per_key_per_s: f64,
    pub per_key_burst: u32,
    pub per_merchant_per_s: f64,
    pub per_merchant_burst: u32,
    /// Limits shared by every instance on the same Redis, leased in batches.
    #[serde(default)]
    pub shared: bool,
    /// Cells leased per store call in shared mode.
    #[serde(default = "default_shared_batch")]
    pub shared_batch: u32,
    /// How long leased cells stay usable before they are dropped.
    #[serde(default = "default_shared_lease_ms")]
    pub shared_lease_ms: u64,
}

/// Whether a configured key is base64 of 32 bytes (the decoded bytes are wiped on drop).
fn is_32_byte_base64(key: &SecretString) -> bool {
    use base64::Engine;
    use secrecy::ExposeSecret;
    base64::engine::general_purpose::STANDARD
        .decode(key.expose_secret().trim())
        .map(zeroize::Zeroizing::new)
        .is_ok_and(|b| b.len() == 32)
}

fn default_shared_batch() -> u32 {
    50
}

fn default_shared_lease_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub api_key_cache_ttl_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    pub ttl_s: u64,
    pub lock_ttl_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct D1Section {
    pub enabled: bool,
    pub base_url: Option<String>,
    pub merchant_gateway_id: String,
    pub keys_dir: Option<PathBuf>,
    pub es256_kid: String,
    pub d1_jwe_kid: String,
    pub gateway_jwe_kid: String,
    pub call_timeout_ms: u64,
    pub max_retries: u32,
    pub max_concurrency: usize,
    /// Connection lanes to D1 (`src/d1/client.rs`, 1..=64).
    pub connections: usize,
    pub breaker_failure_threshold: u32,
    pub breaker_open_ms: u64,
    /// Path templates of the D1 API (`[d1.paths]`); defaults in docs/d1-protocol.md.
    #[serde(default)]
    pub paths: tokengate_d1_protocol::paths::D1Paths,
    /// Base URL of D1's issuer-side ("banking") API; unset: `base_url` with `/authz/v1`
    /// replaced by `/banking/v1` (docs/issuer.md).
    #[serde(default)]
    pub issuer_base_url: Option<String>,
    /// Path templates of the issuer-side API (`[d1.issuer_paths]`).
    #[serde(default)]
    pub issuer_paths: tokengate_d1_protocol::paths::IssuerPaths,
    /// Path templates of physical card orders under the issuer API (`[d1.production_paths]`):
    /// configuration like the others, because the batch path is our inference.
    #[serde(default)]
    pub production_paths: tokengate_d1_protocol::issuer_orders::ProductionPaths,
}

/// The issuer side's background worker (`[issuer]`, `domain::issuer_service`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuerSection {
    /// How often the worker looks for operations to re-drive or poll.
    pub worker_interval_ms: u64,
    /// Delay before the first re-drive of a D1 call whose outcome is unknown (doubles per
    /// attempt, up to `max_backoff_ms`).
    pub redrive_after_ms: u64,
    /// How long an operation D1 accepted waits for its notification before it is polled with
    /// D1's get-operation (doubles per poll, up to `max_backoff_ms`).
    pub poll_after_ms: u64,
    pub max_backoff_ms: u64,
    /// Operations looked at per issuer and tick.
    pub batch: usize,
    /// How long a processed notification item is remembered (redeliveries within it are no-ops).
    pub notification_ttl_s: u64,
}

impl Default for IssuerSection {
    fn default() -> Self {
        IssuerSection {
            worker_interval_ms: 1000,
            redrive_after_ms: 2000,
            poll_after_ms: 60_000,
            max_backoff_ms: 600_000,
            batch: 100,
            notification_ttl_s: 7 * 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimSection {
    pub listen: SocketAddr,
    pub control_listen: SocketAddr,
}

/// `log.format`. `auto` picks per process from where stdout goes (`telemetry::resolve_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human text on a terminal, JSON lines otherwise (a file, a pipe, a log collector).
    Auto,
    Text,
    Json,
}

/// `[log]` (src/telemetry.rs, and the access log in src/http/telemetry.rs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// tracing-subscriber `EnvFilter` directives; `RUST_LOG` wins when set.
    pub level: String,
    /// One access-log line per answered request (method, route template, status, latency,
    /// request id).
    pub access: bool,
    /// Fraction (0 to 1) of requests answered below 400 that get an access-log line; 4xx and
    /// 5xx are always logged while `access` is on.
    pub access_sample: f64,
}

impl LogConfig {
    /// Defaults for commands that have no config file (`tokengate d1-sim`).
    pub fn standalone() -> LogConfig {
        LogConfig {
            format: LogFormat::Auto,
            level: "info".into(),
            access: true,
            access_sample: 1.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Figment's message names the key path and the source (file or env var).
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration: {key}: {msg}")]
    Invalid { key: &'static str, msg: String },
}

/// Command-line values that override the layered config.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub redis_url: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub sim_listen: Option<SocketAddr>,
}

impl Config {
    /// Loads defaults, then `file`, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(file, &env)
    }

    /// Like [`Config::load`] with an explicit environment, so tests never touch the real one.
    pub fn load_with_env(
        file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    f.display()
                )));
            }
            fig = fig.merge(Toml::file(f));
        }
        // Env values become a TOML snippet (typed like figment's own Env provider), taken from
        // the given list rather than the process environment so tests can inject it.
        let mut toml_env = String::new();
        for (k, v) in env {
            if let Some(rest) = k.strip_prefix("TOKENGATE__") {
                let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
                let value = toml_value_for_env(v);
                toml_env.push_str(&nested_toml_line(&path, &value));
            }
        }
        fig = fig.merge(Toml::string(&toml_env));
        let mut cfg: Config = fig
            .extract()
            .map_err(|e| ConfigError::Load(describe_figment_error(e)))?;
        if let Some((_, tok)) = env.iter().find(|(k, _)| k == "TOKENGATE_ADMIN_TOKEN") {
            cfg.admin.token = Some(SecretString::from(tok.clone()));
        }
        Ok(cfg)
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(l) = o.listen {
            self.server.listen = l;
        }
        if let Some(u) = &o.redis_url {
            self.storage.redis_url = Some(u.clone());
        }
        if let Some(d) = &o.data_dir {
            self.storage.data_dir = d.clone();
        }
        if let Some(s) = o.sim_listen {
            self.sim.listen = s;
        }
    }

    /// Cross-field rules that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, msg: &str| ConfigError::Invalid {
            key,
            msg: msg.to_owned(),
        };
        if self.server.body_limit_bytes < 256 {
            return Err(invalid("server.body_limit_bytes", "must be at least 256"));
        }
        if self.server.max_concurrency == 0 {
            return Err(invalid("server.max_concurrency", "must be at least 1"));
        }
        if self.server.request_timeout_ms == 0 {
            return Err(invalid("server.request_timeout_ms", "must be positive"));
        }
        if let Err(msg) = self.d1.issuer_paths.validate() {
            return Err(ConfigError::Invalid {
                key: "d1.issuer_paths",
                msg,
            });
        }
        if let Err(msg) = self.d1.production_paths.validate() {
            return Err(ConfigError::Invalid {
                key: "d1.production_paths",
                msg,
            });
        }
        if self.issuer.worker_interval_ms < 10 || self.issuer.batch == 0 {
            return Err(invalid(
                "issuer.worker_interval_ms",
                "must be at least 10 (and issuer.batch at least 1)",
            ));
        }
        if self.metrics.token_counts_interval_ms < 100 {
            return Err(invalid(
                "metrics.token_counts_interval_ms",
                "must be at least 100",
            ));
        }
        if let Some(t) = &self.server.tls
            && t.require_client_cert
            && t.client_ca_file.is_none()
        {
            return Err(invalid(
                "server.tls.client_ca_file",
                "needed with server.tls.require_client_cert = true",
            ));
        }
        if let Some(u) = &self.storage.redis_url
            && !(u.starts_with("redis://") || u.starts_with("rediss://"))
        {
            return Err(invalid(
                "storage.redis_url",
                "must start with redis:// or rediss://",
            ));
        }
        self.validate_durability()?;
        let rl = &self.rate_limit;
        if rl.shared {
            if self.storage.redis_url.is_none() && self.storage.redis_cluster_nodes.is_empty() {
                return Err(invalid(
                    "rate_limit.shared",
                    "needs Redis (storage.redis_url or storage.redis_cluster_nodes): the embedded store serves one instance",
                ));
            }
            if rl.shared_batch == 0 {
                return Err(invalid("rate_limit.shared_batch", "must be at least 1"));
            }
            if rl.shared_lease_ms < 10 {
                return Err(invalid("rate_limit.shared_lease_ms", "must be at least 10"));
            }
        }
        let has_keys = !self.vault.keys.is_empty();
        let has_fp_keys =
            self.vault.fingerprint_key.is_some() || !self.vault.fingerprint_keys.is_empty();
        if has_keys != self.vault.active_key_id.is_some() || has_keys != has_fp_keys {
            return Err(invalid(
                "vault",
                "set all of vault.active_key_id, vault.keys and vault.fingerprint_key (or vault.fingerprint_keys), or none",
            ));
        }
        self.validate_fingerprint_keys()?;
        let fr = &self.fp_reindex;
        if fr.batch == 0 {
            return Err(invalid("fp_reindex.batch", "must be at least 1"));
        }
        if fr.interval_ms == 0 || fr.lease_ms <= fr.interval_ms {
            return Err(invalid(
                "fp_reindex.lease_ms",
                "must be longer than fp_reindex.interval_ms (which must be positive)",
            ));
        }
        if let Some(active) = &self.vault.active_key_id
            && !self.vault.keys.contains_key(active)
        {
            return Err(invalid(
                "vault.active_key_id",
                "names a key that is not in vault.keys",
            ));
        }
        if self.mode == Mode::Production {
            if !has_keys {
                return Err(invalid(
                    "vault",
                    "production mode needs real keys (vault.active_key_id, vault.keys, vault.fingerprint_key); the development key set is refused",
                ));
            }
            if self.vault.keys.contains_key(crate::crypto::dev::DEV_KEY_ID) {
                return Err(invalid(
                    "vault.keys",
                    "the development key id is refused in production mode",
                ));
            }
            if self.admin.token.is_none() {
                return Err(invalid(
                    "admin.token",
                    "production mode needs an admin token (TOKENGATE_ADMIN_TOKEN)",
                ));
            }
            if self.d1.enabled && self.d1.base_url.is_none() {
                return Err(invalid(
                    "d1.base_url",
                    "production mode needs the real D1 URL; the simulator is for sandbox mode",
                ));
            }
        }
        if self.d1.enabled && self.d1.base_url.is_some() && self.d1.keys_dir.is_none() {
            return Err(invalid(
                "d1.keys_dir",
                "needed with d1.base_url (client certificate, ES256 and JWE keys)",
            ));
        }
        if !(1..=64).contains(&self.d1.connections) {
            return Err(invalid("d1.connections", "must be between 1 and 64"));
        }
        self.validate_notify()?;
        Ok(())
    }

    /// Rules of the fingerprint ring (`vault.fingerprint_key`, `vault.fingerprint_keys`,
    /// `vault.active_fingerprint_key_id`). Messages name keys and ids, never key material.
    fn validate_fingerprint_keys(&self) -> Result<(), ConfigError> {
        use crate::crypto::{IMPLICIT_FINGERPRINT_KEY_ID, valid_key_id};
        let invalid = |key, msg: String| ConfigError::Invalid { key, msg };
        let v = &self.vault;
        for (id, key) in &v.fingerprint_keys {
            if !valid_key_id(id) {
                return Err(invalid(
                    "vault.fingerprint_keys",
                    format!(
                        "key id `{}` is not 1-32 characters of [A-Za-z0-9_-]",
                        id.escape_debug()
                    ),
                ));
            }
            if id == IMPLICIT_FINGERPRINT_KEY_ID && v.fingerprint_key.is_some() {
                return Err(invalid(
                    "vault.fingerprint_keys",
                    format!(
                        "`{IMPLICIT_FINGERPRINT_KEY_ID}` is the id of vault.fingerprint_key; give that key once"
                    ),
                ));
            }
            if !is_32_byte_base64(key) {
                return Err(invalid(
                    "vault.fingerprint_keys",
                    format!("key `{id}` must be base64 of 32 random bytes (`tokengate keys new`)"),
                ));
            }
        }
        if let Some(key) = &v.fingerprint_key
            && !is_32_byte_base64(key)
        {
            return Err(invalid(
                "vault.fingerprint_key",
                "must be base64 of 32 random bytes (`tokengate keys new`)".to_owned(),
            ));
        }
        match &v.active_fingerprint_key_id {
            None if !v.fingerprint_keys.is_empty() => Err(invalid(
                "vault.active_fingerprint_key_id",
                "required with vault.fingerprint_keys: the id of the key that indexes new records"
                    .to_owned(),
            )),
            Some(active) if !v.fingerprint_ring().iter().any(|(id, _)| id == active) => {
                Err(invalid(
                    "vault.active_fingerprint_key_id",
                    format!(
                        "names a key that is neither in vault.fingerprint_keys nor vault.fingerprint_key (`{IMPLICIT_FINGERPRINT_KEY_ID}`)"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Rules of the `storage.redis_durability*` keys (`app` maps valid ones onto the store's
    /// `Durability`).
    fn validate_durability(&self) -> Result<(), ConfigError> {
        let invalid = |key, msg: &str| ConfigError::Invalid {
            key,
            msg: msg.to_owned(),
        };
        let s = &self.storage;
        let mode = s.redis_durability.as_str();
        if !matches!(mode, "none" | "wait" | "waitaof") {
            return Err(invalid(
                "storage.redis_durability",
                "must be none, wait or waitaof",
            ));
        }
        if mode == "none" {
            return Ok(());
        }
        if s.redis_durability_timeout_ms == 0 {
            // 0 would make WAIT block forever.
            return Err(invalid(
                "storage.redis_durability_timeout_ms",
                "must be positive with storage.redis_durability = wait or waitaof",
            ));
        }
        if s.redis_durability_local > 1 {
            return Err(invalid(
                "storage.redis_durability_local",
                "must be 0 or 1 (the primary's own AOF)",
            ));
        }
        if mode == "wait" && s.redis_durability_replicas == 0 {
            return Err(invalid(
                "storage.redis_durability_replicas",
                "must be at least 1 with storage.redis_durability = wait",
            ));
        }
        if mode == "waitaof" && s.redis_durability_replicas == 0 && s.redis_durability_local == 0 {
            return Err(invalid(
                "storage.redis_durability_replicas",
                "waitaof needs storage.redis_durability_local = 1 or at least 1 replica",
            ));
        }
        Ok(())
    }

    /// Rules of `[notify]` and `[reconcile]`.
    fn validate_notify(&self) -> Result<(), ConfigError> {
        use secrecy::ExposeSecret;
        let invalid = |key, msg: &str| ConfigError::Invalid {
            key,
            msg: msg.to_owned(),
        };
        let n = &self.notify;
        match (&n.client_id, &n.client_secret) {
            (Some(id), Some(secret)) => {
                // HTTP Basic splits at the first colon, so an id cannot contain one.
                if id.is_empty()
                    || id.len() > 128
                    || id.contains(':')
                    || !id.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(invalid(
                        "notify.client_id",
                        "1 to 128 printable ASCII characters without `:`",
                    ));
                }
                // The secret keys the access-token MAC: a short one would be guessable offline.
                let s = secret.expose_secret();
                if s.len() < MIN_NOTIFY_SECRET_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        "notify.client_secret",
                        "at least 32 printable ASCII characters",
                    ));
                }
            }
            (None, None) => {
                if self.mode == Mode::Production && n.require_auth {
                    return Err(invalid(
                        "notify.client_id",
                        "production mode with notify.require_auth needs notify.client_id and notify.client_secret",
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    "notify",
                    "set both notify.client_id and notify.client_secret, or neither",
                ));
            }
        }
        if !(1..=86_400).contains(&n.token_ttl_s) {
            return Err(invalid("notify.token_ttl_s", "1 to 86400 seconds"));
        }
        if n.event_ttl_s == 0 {
            return Err(invalid("notify.event_ttl_s", "must be positive"));
        }
        let r = &self.reconcile;
        if r.interval_ms < 10 {
            return Err(invalid("reconcile.interval_ms", "at least 10"));
        }
        if !(1..=10_000).contains(&r.batch) {
            return Err(invalid("reconcile.batch", "1 to 10000"));
        }
        if r.lease_ms < 100 {
            return Err(invalid("reconcile.lease_ms", "at least 100"));
        }
        let w = &self.webhooks;
        if w.max_attempts == 0 {
            return Err(invalid("webhooks.max_attempts", "must be at least 1"));
        }
        if w.timeout_ms == 0 || w.backoff_base_ms == 0 || w.poll_interval_ms == 0 {
            return Err(invalid(
                "webhooks",
                "timeout_ms, backoff_base_ms and poll_interval_ms must be positive",
            ));
        }
        if w.backoff_max_ms < w.backoff_base_ms {
            return Err(invalid(
                "webhooks.backoff_max_ms",
                "must be at least webhooks.backoff_base_ms",
            ));
        }
        // A lease shorter than an attempt would hand a live delivery to a second worker.
        if w.claim_idle_ms < w.timeout_ms.saturating_add(500) {
            return Err(invalid(
                "webhooks.claim_idle_ms",
                "must exceed webhooks.timeout_ms by at least 500",
            ));
        }
        if w.retention_hours == 0 {
            return Err(invalid("webhooks.retention_hours", "must be at least 1"));
        }
        w.allowed_networks()?;
        if self.audit.retention_days == 0 {
            return Err(invalid("audit.retention_days", "must be at least 1"));
        }
        // Checked here rather than at logging setup, where a typo used to fall back to `info`
        // silently.
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::Invalid {
                key: "log.level",
                msg: format!("not a valid filter ({e})"),
            });
        }
        // `!(0..=1).contains` is also true for NaN.
        if !(0.0..=1.0).contains(&self.log.access_sample) {
            return Err(invalid(
                "log.access_sample",
                "must be a fraction from 0.0 to 1.0",
            ));
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }
}

/// Env values are strings; numbers, booleans and inline arrays/tables are typed by TOML rules so
/// `TOKENGATE__SERVER__MAX_CONCURRENCY=64` is a number, anything else a string.
fn toml_value_for_env(v: &str) -> String {
    let trimmed = v.trim();
    let typed = trimmed.parse::<i64>().is_ok()
        || trimmed.parse::<f64>().is_ok()
        || trimmed == "true"
        || trimmed == "false"
        || (trimmed.starts_with('[') && trimmed.ends_with(']'))
        || (trimmed.starts_with('{') && trimmed.ends_with('}'));
    if typed {
        trimmed.to_owned()
    } else {
        toml_string(v)
    }
}

fn toml_string(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            c if c.is_control() => s.push_str(&format!("\\u{:04x}", c as u32)),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

fn nested_toml_line(path: &[String], value: &str) -> String {
    // Dotted keys with quoted segments: `"server"."listen" = ...`.
    let key: Vec<String> = path.iter().map(|p| toml_string(p)).collect();
    format!("{} = {}\n", key.join("."), value)
}

fn describe_figment_error(e: figment::Error) -> String {
    let mut out = Vec::new();
    for err in e {
        let path = err.path.join(".");
        // Never echo values: a secret may be the bad value.
        let kind = match &err.kind {
            figment::error::Kind::InvalidType(_, expected) => {
                format!("wrong type, expected {expected}")
            }
            figment::error::Kind::InvalidValue(_, expected) => {
                format!("invalid value, expected {expected}")
            }
            other => other.to_string(),
        };
        if path.is_empty() {
            out.push(kind);
        } else {
            out.push(format!("key `{path}`: {kind}"));
        }
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn dev_kids_match_the_default_configuration() {
        let d1 = Config::load_with_env(None, &[]).unwrap().d1;
        assert_eq!(d1.es256_kid, tokengate_d1_protocol::devkeys::DEV_ES256_KID);
        assert_eq!(
            d1.d1_jwe_kid,
            tokengate_d1_protocol::devkeys::DEV_D1_JWE_KID
        );
        assert_eq!(
            d1.gateway_jwe_kid,
            tokengate_d1_protocol::devkeys::DEV_GATEWAY_JWE_KID
        );
    }

    /// The fingerprint ring: the one-key form is `fp0`; a rotation adds keys by id and names
    /// the active one; mistakes are refused naming the setting, never echoing a key.
    #[test]
    fn fingerprint_key_ring_rules() {
        const K: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
        const K2: &str = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXowMTIzNDU=";
        let load = |extra: &[(&str, &str)]| {
            let mut pairs = vec![
                (
                    "TOKENGATE__VAULT__KEYS",
                    "{ k1 = \"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\" }",
                ),
                ("TOKENGATE__VAULT__ACTIVE_KEY_ID", "k1"),
            ];
            pairs.extend_from_slice(extra);
            Config::load_with_env(None, &env(&pairs)).and_then(|c| c.validate().map(|()| c))
        };
        let c = load(&[("TOKENGATE__VAULT__FINGERPRINT_KEY", K)]).unwrap();
        assert_eq!(c.vault.active_fingerprint_key(), "fp0");
        assert_eq!(c.vault.fingerprint_ring().len(), 1);
        let ring = format!("{{ fp1 = \"{K2}\" }}");
        let c = load(&[
            ("TOKENGATE__VAULT__FINGERPRINT_KEY", K),
            ("TOKENGATE__VAULT__FINGERPRINT_KEYS", &ring),
            ("TOKENGATE__VAULT__ACTIVE_FINGERPRINT_KEY_ID", "fp1"),
        ])
        .unwrap();
        assert_eq!(c.vault.active_fingerprint_key(), "fp1");
        let ids: Vec<String> = c
            .vault
            .fingerprint_ring()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["fp0", "fp1"]);
        // The old key removed after the re-index: the map form alone.
        load(&[
            ("TOKENGATE__VAULT__FINGERPRINT_KEYS", &ring),
            ("TOKENGATE__VAULT__ACTIVE_FINGERPRINT_KEY_ID", "fp1"),
        ])
        .unwrap();
        let refused = |extra: &[(&str, &str)], key: &str| {
            let e = load(extra).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
            assert!(
                !e.contains(K) && !e.contains(K2) && !e.contains("c2hvcnQ"),
                "{e}"
            );
        };
        // The map form needs its active id, which must be configured.
        refused(
            &[("TOKENGATE__VAULT__FINGERPRINT_KEYS", &ring)],
            "vault.active_fingerprint_key_id",
        );
        refused(
            &[
                ("TOKENGATE__VAULT__FINGERPRINT_KEYS", &ring),
                ("TOKENGATE__VAULT__ACTIVE_FINGERPRINT_KEY_ID", "fp9"),
            ],
            "vault.active_fingerprint_key_id",
        );
        refused(
            &[
                ("TOKENGATE__VAULT__FINGERPRINT_KEY", K),
                (
                    "TOKENGATE__VAULT__FINGERPRINT_KEYS",
                    &format!("{{ fp0 = \"{K2}\" }}"),
                ),
                ("TOKENGATE__VAULT__ACTIVE_FINGERPRINT_KEY_ID", "fp0"),
            ],
            "vault.fingerprint_keys",
        );
        refused(
            &[
                (
                    "TOKENGATE__VAULT__FINGERPRINT_KEYS",
                    "{ fp1 = \"c2hvcnQ=\" }",
                ),
                ("TOKENGATE__VAULT__ACTIVE_FINGERPRINT_KEY_ID", "fp1"),
            ],
            "vault.fingerprint_keys",
        );
        refused(
            &[("TOKENGATE__VAULT__FINGERPRINT_KEY", "c2hvcnQ=")],
            "vault.fingerprint_key",
        );
        refused(&[], "vault");
    }

    #[test]
    fn defaults_load_and_validate() {
        let c = Config::load_with_env(None, &[]).unwrap();
        assert_eq!(c.mode, Mode::Sandbox);
        assert_eq!(c.server.listen.port(), 8080);
        assert!(c.storage.redis_url.is_none());
        c.validate().unwrap();
    }

    #[test]
    fn production_paths_are_configuration_and_validated() {
        use tokengate_d1_protocol::issuer_orders::ProductionPaths;
        let c = Config::load_with_env(None, &[]).unwrap();
        assert_eq!(c.d1.production_paths, ProductionPaths::default());
        let c = Config::load_with_env(
            None,
            &env(&[(
                "TOKENGATE__D1__PRODUCTION_PATHS__PRODUCTION_BATCH",
                "/issuers/{issuerId}/cardOrders",
            )]),
        )
        .unwrap();
        assert_eq!(
            c.d1.production_paths.production_batch,
            "/issuers/{issuerId}/cardOrders"
        );
        assert_eq!(
            c.d1.production_paths.production,
            ProductionPaths::default().production
        );
        c.validate().unwrap();
        let c = Config::load_with_env(
            None,
            &env(&[(
                "TOKENGATE__D1__PRODUCTION_PATHS__PRODUCTION_STATUS",
                "/issuers/{issuerId}/physicalCards/{bogus}/productionStatus",
            )]),
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("d1.production_paths"), "{e}");
        let e = Config::load_with_env(
            None,
            &env(&[("TOKENGATE__D1__PRODUCTION_PATHS__NOPE", "/x")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn env_overrides_with_types() {
        let c = Config::load_with_env(
            None,
            &env(&[
                ("TOKENGATE__SERVER__MAX_CONCURRENCY", "64"),
                ("TOKENGATE__STORAGE__REDIS_URL", "redis://127.0.0.1:7000/"),
                ("TOKENGATE_ADMIN_TOKEN", "s3cret"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.max_concurrency, 64);
        assert_eq!(
            c.storage.redis_url.as_deref(),
            Some("redis://127.0.0.1:7000/")
        );
        assert!(c.admin.token.is_some());
    }

    #[test]
    fn bad_key_or_value_names_its_path() {
        let e = Config::load_with_env(None, &env(&[("TOKENGATE__SERVER__LISTEN", "nope")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.listen"), "{e}");
        let e = Config::load_with_env(None, &env(&[("TOKENGATE__SERVER__BOGUS", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::load_with_env(None, &env(&[("TOKENGATE__SERVER__MAX_CONCURRENCY", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.max_concurrency"), "{e}");
    }

    #[test]
    fn server_tls_from_env_and_its_rules() {
        let c = Config::load_with_env(None, &[]).unwrap();
        assert!(c.server.tls.is_none(), "plain HTTP by default");
        let c = Config::load_with_env(
            None,
            &env(&[
                ("TOKENGATE__SERVER__TLS__CERT_FILE", "/etc/tg/cert.pem"),
                ("TOKENGATE__SERVER__TLS__KEY_FILE", "/etc/tg/key.pem"),
            ]),
        )
        .unwrap();
        let t = c.server.tls.as_ref().unwrap();
        assert_eq!(t.cert_file, PathBuf::from("/etc/tg/cert.pem"));
        assert!(!t.require_client_cert && t.client_ca_file.is_none());
        assert_eq!(t.reload_interval_ms, 5000);
        c.validate().unwrap();
        let c = Config::load_with_env(
            None,
            &env(&[
                ("TOKENGATE__SERVER__TLS__CERT_FILE", "c"),
                ("TOKENGATE__SERVER__TLS__KEY_FILE", "k"),
                ("TOKENGATE__SERVER__TLS__REQUIRE_CLIENT_CERT", "true"),
            ]),
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("server.tls.client_ca_file"), "{e}");
        let e = Config::load_with_env(None, &env(&[("TOKENGATE__SERVER__TLS__CERT_FILE", "c")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_file"), "{e}");
    }

    #[test]
    fn redis_durability_keys_are_validated_naming_the_key() {
        let c = Config::load_with_env(None, &[]).unwrap();
        assert_eq!(c.storage.redis_durability, "none");
        assert_eq!(c.storage.redis_durability_replicas, 1);
        c.validate().unwrap();
        let ok = [
            vec![("TOKENGATE__STORAGE__REDIS_DURABILITY", "wait")],
            vec![("TOKENGATE__STORAGE__REDIS_DURABILITY", "waitaof")],
            vec![
                ("TOKENGATE__STORAGE__REDIS_DURABILITY", "waitaof"),
                ("TOKENGATE__STORAGE__REDIS_DURABILITY_REPLICAS", "0"),
            ],
            // Unused with `none`: not checked.
            vec![("TOKENGATE__STORAGE__REDIS_DURABILITY_TIMEOUT_MS", "0")],
        ];
        for vars in ok {
            let c = Config::load_with_env(None, &env(&vars)).unwrap();
            c.validate().unwrap();
        }
        let bad = [
            (
                vec![("TOKENGATE__STORAGE__REDIS_DURABILITY", "sync")],
                "storage.redis_durability:",
            ),
            (
                vec![
                    ("TOKENGATE__STORAGE__REDIS_DURABILITY", "wait"),
                    ("TOKENGATE__STORAGE__REDIS_DURABILITY_REPLICAS", "0"),
                ],
                "storage.redis_durability_replicas",
            ),
            (
                vec![
                    ("TOKENGATE__STORAGE__REDIS_DURABILITY", "wait"),
                    ("TOKENGATE__STORAGE__REDIS_DURABILITY_TIMEOUT_MS", "0"),
                ],
                "storage.redis_durability_timeout_ms",
            ),
            (
                vec![
                    ("TOKENGATE__STORAGE__REDIS_DURABILITY", "waitaof"),
                    ("TOKENGATE__STORAGE__REDIS_DURABILITY_LOCAL", "2"),
                ],
                "storage.redis_durability_local",
            ),
            (
                vec![
                    ("TOKENGATE__STORAGE__REDIS_DURABILITY", "waitaof"),
                    ("TOKENGATE__STORAGE__REDIS_DURABILITY_LOCAL", "0"),
                    ("TOKENGATE__STORAGE__REDIS_DURABILITY_REPLICAS", "0"),
                ],
                "storage.redis_durability_replicas",
            ),
        ];
        for (vars, key) in bad {
            let c = Config::load_with_env(None, &env(&vars)).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{vars:?}: {e}");
        }
    }

    #[test]
    fn production_refuses_dev_keys() {
        let c = Config::load_with_env(None, &env(&[("TOKENGATE__MODE", "production")])).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("vault"), "{e}");
    }

    #[test]
    fn webhook_allow_list_is_validated_naming_the_key() {
        let c = Config::load_with_env(None, &[]).unwrap();
        assert!(c.webhooks.allowed_networks().unwrap().is_empty());
        let c = Config::load_with_env(
            None,
            &env(&[(
                "TOKENGATE__WEBHOOKS__ALLOW_PRIVATE_NETWORKS",
                r#"["10.20.0.0/16", "fd00:1::/48", "127.0.0.1/32"]"#,
            )]),
        )
        .unwrap();
        c.validate().unwrap();
        let nets = c.webhooks.allowed_networks().unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets[0].contains(&"10.20.9.9".parse::<std::net::IpAddr>().unwrap()));
        for (bad, hint) in [
            ("10.20.0.0", "not a CIDR"),
            ("10.20.0.0/33", "not a CIDR"),
            ("intranet", "not a CIDR"),
            ("10.20.1.0/16", "10.20.0.0/16"),
            ("0.0.0.0/0", "switch the SSRF guard off"),
            ("::/0", "switch the SSRF guard off"),
        ] {
            let c = Config::load_with_env(
                None,
                &env(&[(
                    "TOKENGATE__WEBHOOKS__ALLOW_PRIVATE_NETWORKS",
                    &format!(r#"["192.168.0.0/24", "{bad}"]"#),
                )]),
            )
            .unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("webhooks.allow_private_networks"), "{bad}: {e}");
            assert!(e.contains("entry 1") && e.contains(hint), "{bad}: {e}");
        }
    }

    #[test]
    fn log_keys_defaults_env_and_rules() {
        let c = Config::load_with_env(None, &[]).unwrap();
        assert_eq!(c.log.format, LogFormat::Auto);
        assert!(c.log.access);
        assert!((c.log.access_sample - 1.0).abs() < f64::EPSILON);
        let c = Config::load_with_env(
            None,
            &env(&[
                ("TOKENGATE__LOG__FORMAT", "json"),
                ("TOKENGATE__LOG__ACCESS", "false"),
                ("TOKENGATE__LOG__ACCESS_SAMPLE", "0.25"),
            ]),
        )
        .unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(!c.log.access);
        assert!((c.log.access_sample - 0.25).abs() < f64::EPSILON);
        c.validate().unwrap();
        // An integer is a fraction too (`TOKENGATE__LOG__ACCESS_SAMPLE=0`).
        let c =
            Config::load_with_env(None, &env(&[("TOKENGATE__LOG__ACCESS_SAMPLE", "0")])).unwrap();
        c.validate().unwrap();
        for bad in ["1.5", "-0.1", "nan"] {
            let c = Config::load_with_env(None, &env(&[("TOKENGATE__LOG__ACCESS_SAMPLE", bad)]))
                .unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("log.access_sample"), "{bad}: {e}");
        }
        let e = Config::load_with_env(None, &env(&[("TOKENGATE__LOG__FORMAT", "xml")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("log.format"), "{e}");
        let e = Config::load_with_env(None, &env(&[("TOKENGATE__LOG__ACCESS", "yes")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("log.access"), "{e}");
        let c = Config::load_with_env(
            None,
            &env(&[("TOKENGATE__LOG__LEVEL", "info,tokengate=loud")]),
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("log.level"), "{e}");
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::load_with_env(
            None,
            &env(&[("TOKENGATE__VAULT__FINGERPRINT_KEY", "very-secret-value")]),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("very-secret-value"));
    }
}
