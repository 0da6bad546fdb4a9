//! The gateway's own HTTPS listener (`[server.tls]`): rustls (TLS 1.2 and 1.3 only, ALPN `h2`
//! and `http/1.1`, the policy of [`tokengate_d1_protocol::tls`]) over tokio-rustls, HTTP/1.1 and HTTP/2 served by
//! hyper-util's auto builder, graceful shutdown, and certificates reloaded without a restart.
//! A client's verified certificate goes into every request of its connection as a
//! [`ClientCert`] extension (merchant authentication: src/http/auth/client_cert.rs).
//!
//! # Reloading
//!
//! [`ReloadableTls`] holds the current `rustls::ServerConfig` behind a lock; every accepted
//! connection takes the config current at that moment, so a swap affects new handshakes only
//! and never an established connection. A reload re-reads the three files (certificate chain,
//! key, client CA) and rebuilds the whole config, so a renewed client CA is picked up the same
//! way as a renewed server certificate. It runs:
//! - on SIGHUP, always;
//! - every `reload_interval_ms`, when the files' content changed. Content (a SHA-256 over the
//!   three files) rather than mtimes: a rewrite within the filesystem's timestamp granularity,
//!   or a Kubernetes secret's symlink swap, is still seen; the files are a few KB.
//!
//! A reload that fails (a half-written file, a key that does not match the certificate) is
//! logged and the previous config keeps serving: a bad renewal never takes the listener down.
//! The same content is not retried until it changes again (or SIGHUP), so a broken file logs
//! once, not every interval.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use zeroize::Zeroizing;

use super::auth::client_cert::ClientCert;
use crate::config::ServerTlsConfig;
use tokengate_d1_protocol::tls::{ClientAuth, TlsError, server_config_with_client_auth};

/// A TLS handshake must finish within this; a client that connects and stalls holds no task
/// longer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TLS files could not be turned into a server config. Names files and keys, never
/// their content.
#[derive(Debug, thiserror::Error)]
pub enum TlsLoadError {
    #[error("server.tls.{key}: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("server.tls.{key}: {path} is not a UTF-8 PEM file")]
    NotPem { key: &'static str, path: PathBuf },
    #[error("server.tls: {0}")]
    Tls(#[from] TlsError),
}

/// The listener's rustls config, swappable at run time (see the module docs).
pub struct ReloadableTls {
    files: ServerTlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// Digest of the file contents last tried (applied, or refused as invalid).
    last_seen: Mutex<[u8; 32]>,
}

/// The three files, read once.
struct Material {
    cert: Zeroizing<String>,
    key: Zeroizing<String>,
    client_ca: Option<String>,
}

impl Material {
    fn read(files: &ServerTlsConfig) -> Result<Material, TlsLoadError> {
        let read = |key: &'static str, path: &Path| -> Result<Zeroizing<String>, TlsLoadError> {
            let bytes =
                Zeroizing::new(std::fs::read(path).map_err(|source| TlsLoadError::Read {
                    key,
                    path: path.to_owned(),
                    source,
                })?);
            match std::str::from_utf8(&bytes) {
                Ok(s) => Ok(Zeroizing::new(s.to_owned())),
                Err(_) => Err(TlsLoadError::NotPem {
                    key,
                    path: path.to_owned(),
                }),
            }
        };
        Ok(Material {
            cert: read("cert_file", &files.cert_file)?,
            key: read("key_file", &files.key_file)?,
            client_ca: match &files.client_ca_file {
                Some(p) => Some(read("client_ca_file", p)?.to_string()),
                None => None,
            },
        })
    }

    /// Length-prefixed parts, so moving bytes between files changes the digest.
    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [
            self.cert.as_bytes(),
            self.key.as_bytes(),
            self.client_ca.as_deref().unwrap_or("").as_bytes(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.finalize().into()
    }

    fn server_config(&self, require_client_cert: bool) -> Result<ServerConfig, TlsError> {
        let client_auth = match (&self.client_ca, require_client_cert) {
            (Some(ca), true) => ClientAuth::Required(ca),
            (Some(ca), false) => ClientAuth::Optional(ca),
            // Refused by `Config::validate`; without a CA nothing could be verified anyway.
            (None, _) => ClientAuth::None,
        };
        server_config_with_client_auth(&self.cert, &self.key, client_auth, true)
    }
}

impl ReloadableTls {
    /// Reads the files and builds the first config. Any error here stops start-up.
    pub fn load(files: &ServerTlsConfig) -> Result<Arc<ReloadableTls>, TlsLoadError> {
        let m = Material::read(files)?;
        let config = m.server_config(files.require_client_cert)?;
        Ok(Arc::new(ReloadableTls {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
            last_seen: Mutex::new(m.digest()),
        }))
    }

    /// The config for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the files and swaps the config in. `force` rebuilds even when the content did
    /// not change (SIGHUP). `Ok(true)`: a new config serves from now on; `Ok(false)`: nothing
    /// to do. On error the previous config stays.
    pub fn reload(&self, force: bool) -> Result<bool, TlsLoadError> {
        let m = Material::read(&self.files)?;
        let digest = m.digest();
        {
            let mut seen = self
                .last_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !force && *seen == digest {
                return Ok(false);
            }
            *seen = digest;
        }
        let config = m.server_config(self.files.require_client_cert)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        Ok(true)
    }

    fn reload_and_log(&self, force: bool, why: &'static str) {
        match self.reload(force) {
            Ok(true) => tracing::info!(trigger = why, "TLS certificate reloaded"),
            Ok(false) => {}
            Err(e) => tracing::error!(
                trigger = why,
                error = %e,
                "TLS reload failed; still serving the previous certificate"
            ),
        }
    }

    /// Reloads on SIGHUP and on file changes until `stop` resolves.
    ///
    /// The SIGHUP handler is registered by this call, before the returned future first runs,
    /// so once it returned a SIGHUP reloads instead of terminating the process.
    pub fn watch<F>(self: Arc<Self>, stop: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut hangup = Hangup::register();
        let interval = Duration::from_millis(self.files.reload_interval_ms);
        async move {
            tokio::pin!(stop);
            let mut tick = (!interval.is_zero()).then(|| {
                let start = tokio::time::Instant::now() + interval;
                let mut t = tokio::time::interval_at(start, interval);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            loop {
                let ticked = async {
                    match tick.as_mut() {
                        Some(t) => {
                            t.tick().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = &mut stop => return,
                    _ = ticked => self.reload_and_log(false, "file change"),
                    _ = hangup.recv() => self.reload_and_log(true, "SIGHUP"),
                }
            }
        }
    }
}

/// SIGHUP, where there is such a thing.
struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    fn register() -> Hangup {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS reloads on file changes only");
                })
                .ok();
            Hangup { signal }
        }
        #[cfg(not(unix))]
        Hangup {}
    }

    /// Resolves on the next SIGHUP; never when there is none to wait for.
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = self.signal.as_mut() {
            if s.recv().await.is_some() {
                return;
            }
            // The signal driver is gone (runtime shutting down): wait no more on it.
            self.signal = None;
        }
        std::future::pending::<()>().await
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish (connections get HTTP/2 GOAWAY or `Connection: close`, idle ones close).
pub async fn serve_tls<F>(
    listener: TcpListener,
    router: Router,
    tls: Arc<ReloadableTls>,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut builder = Builder::new(TokioExecutor::new());
    // A timer lets hyper enforce its HTTP/1 header-read timeout on slow clients.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let (h1, h2) = protocol_builders();
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    while let Some((tcp, peer)) = next_connection(&listener, shutdown.as_mut()).await {
        let acceptor = TlsAcceptor::from(tls.current());
        let router = router.clone();
        let (builder, h1, h2) = (builder.clone(), h1.clone(), h2.clone());
        // Taken before the handshake, so shutdown also waits for connections still handshaking.
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %peer, "TLS handshake timed out");
                    return;
                }
            };
            // The client's verified certificate, for every request of this connection
            // (merchant authentication by certificate: src/http/auth/client_cert.rs).
            let client_cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| ClientCert::from_der(leaf.as_ref()));
            let service = TowerToHyperService::new(tower::util::MapRequest::new(
                router,
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    if let Some(c) = &client_cert {
                        req.extensions_mut().insert(c.clone());
                    }
                    req
                },
            ));
            // The protocol ALPN settled on picks hyper's HTTP/1 or HTTP/2 connection alone,
            // boxed (as for plain HTTP, see `serve_plain`: hyper-util's automatic connection is
            // a future sized for HTTP/2 on every connection). Without ALPN the automatic
            // connection still tells the two apart from the first bytes.
            let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            let io = TokioIo::new(stream);
            type ConnError = Box<dyn std::error::Error + Send + Sync>;
            let result: Result<(), ConnError> = match alpn.as_deref() {
                Some(b"h2") => Box::pin(watcher.watch(h2.serve_connection(io, service)))
                    .await
                    .map_err(Into::into),
                Some(b"http/1.1") => Box::pin(watcher.watch(h1.serve_connection(io, service)))
                    .await
                    .map_err(Into::into),
                _ => {
                    let conn = builder
                        .serve_connection_with_upgrades(io, service)
                        .into_owned();
                    Box::pin(watcher.watch(conn)).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// As axum's own loop: per-connection errors are ignored; anything else (e.g. out of file
/// descriptors) is logged and accepting pauses for a second.
/// hyper's HTTP/1 and HTTP/2 connection builders as both listeners use them. The timer lets
/// hyper enforce its HTTP/1 header-read timeout on slow clients.
fn protocol_builders() -> (
    hyper::server::conn::http1::Builder,
    hyper::server::conn::http2::Builder<TokioExecutor>,
) {
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new());
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new());
    (h1, h2)
}

/// The next accepted connection (with `TCP_NODELAY`), or `None` once `shutdown` resolves.
/// Accept errors are handled (`handle_accept_error`) and the loop goes on.
async fn next_connection<F: Future<Output = ()>>(
    listener: &TcpListener,
    mut shutdown: std::pin::Pin<&mut F>,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, peer));
                }
                Err(e) => handle_accept_error(e).await,
            },
            _ = &mut shutdown => return None,
        }
    }
}

/// The client preface of HTTP/2 with prior knowledge (RFC 9113 §3.4), for plain-text HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a plain-text connection speaks HTTP/2 (prior knowledge) or HTTP/1, from its first
/// bytes, peeked (left in the socket for hyper). `None`: the client closed or sent nothing in
/// time. HTTP/1 methods never start with `PRI `, so a few bytes decide.
async fn sniff_h2(tcp: &tokio::net::TcpStream) -> Option<bool> {
    let mut buf = [0u8; 4];
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == buf.len() {
            return Some(true);
        }
        // A prefix of the preface split across packets (rare): `peek` returns at once while
        // those bytes wait, so pause briefly instead of spinning.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves `router` over plain HTTP until `shutdown` resolves, then lets in-flight requests
/// finish, like [`serve_tls`].
///
/// Each connection is served by hyper's HTTP/1 or HTTP/2 connection alone, chosen from its first
/// bytes, and boxed. hyper-util's automatic connection (what `axum::serve` uses) is one future
/// sized for its largest variant, the HTTP/2 state, on every HTTP/1 connection too: about 10 KiB
/// more per idle keep-alive connection in the 10,000-connection measurement
/// (docs/performance.md).
pub async fn serve_plain<F>(listener: TcpListener, router: Router, shutdown: F) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (h1, h2) = protocol_builders();
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    while let Some((tcp, peer)) = next_connection(&listener, shutdown.as_mut()).await {
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let (h1, h2) = (h1.clone(), h2.clone());
        tokio::spawn(async move {
            let Some(is_h2) = sniff_h2(&tcp).await else {
                return;
            };
            let io = TokioIo::new(tcp);
            let result = if is_h2 {
                Box::pin(watcher.watch(h2.serve_connection(io, service))).await
            } else {
                Box::pin(watcher.watch(h1.serve_connection(io, service))).await
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn handle_accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
