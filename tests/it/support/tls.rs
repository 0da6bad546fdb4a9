//! A gateway on its own HTTPS listener (`[server.tls]`) and the clients that talk to it, for
//! tests that need real TLS handshakes: the certificate files (replaced the way certificate
//! tooling does), the gateway started on them with or without client-certificate checks, and
//! clients trusting a given CA with or without a client certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Client, ClientBuilder};
use tokengate_d1_protocol::devkeys::DevMaterial;
use tokengate_d1_protocol::tls;

use super::app::{Backend, TestApp, TestAppBuilder};

/// The files of one certificate set. `cert.pem` holds the leaf then its CA (a chain).
pub struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    pub fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `m`'s server certificate and key; each file is replaced atomically (rename), as
    /// certificate tooling does.
    pub fn install_server(&self, m: &DevMaterial) {
        let chain = format!("{}{}", m.gateway_server_cert_pem, m.ca_cert_pem);
        replace(&self.path("cert.pem"), chain.as_bytes());
        replace(&self.path("key.pem"), m.gateway_server_key_pem.as_bytes());
    }

    pub fn install_client_ca(&self, ca_pem: &str) {
        replace(&self.path("client-ca.pem"), ca_pem.as_bytes());
    }

    /// `b` serving HTTPS with these files' certificate and key.
    pub fn serve(&self, b: TestAppBuilder) -> TestAppBuilder {
        b.env(
            "TOKENGATE__SERVER__TLS__CERT_FILE",
            self.path("cert.pem").to_str().unwrap(),
        )
        .env(
            "TOKENGATE__SERVER__TLS__KEY_FILE",
            self.path("key.pem").to_str().unwrap(),
        )
    }
}

/// Replaces `path` with `bytes` atomically (write beside it, then rename).
pub fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A vault-only gateway (D1 off) serving HTTPS from `files`, plus `env`.
pub async fn start(files: &Files, env: &[(&str, &str)]) -> TestApp {
    let mut b =
        files.serve(TestApp::builder(Backend::Embedded).env("TOKENGATE__D1__ENABLED", "false"));
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start().await
}

/// A vault-only gateway serving HTTPS with `m`'s server certificate, plus `env`. The files live
/// as long as the returned [`Files`] (a test replaces them through it).
pub async fn start_with(m: &DevMaterial, env: &[(&str, &str)]) -> (Files, TestApp) {
    let files = Files::new();
    files.install_server(m);
    let app = start(&files, env).await;
    (files, app)
}

/// How a gateway started by [`start_mtls`] treats client certificates.
#[derive(Clone, Copy, PartialEq)]
pub enum ClientCerts {
    /// Verified against the CA when presented; clients without one are served too.
    Optional,
    /// Required on every connection.
    Required,
}

/// A vault-only gateway serving HTTPS with `m`'s server certificate and verifying client
/// certificates against `m`'s CA. The files live as long as the returned [`Files`].
pub async fn start_mtls(m: &DevMaterial, mode: ClientCerts) -> (Files, TestApp) {
    let files = Files::new();
    files.install_server(m);
    files.install_client_ca(&m.ca_cert_pem);
    let ca = files.path("client-ca.pem");
    let ca = ca.to_str().unwrap();
    let mut env = vec![("TOKENGATE__SERVER__TLS__CLIENT_CA_FILE", ca)];
    if mode == ClientCerts::Required {
        env.push(("TOKENGATE__SERVER__TLS__REQUIRE_CLIENT_CERT", "true"));
    }
    let app = start(&files, &env).await;
    (files, app)
}

/// The URL of `path` on the gateway's HTTPS listener at `addr`.
pub fn https(addr: SocketAddr, path: &str) -> String {
    format!("https://127.0.0.1:{}{path}", addr.port())
}

/// `m`'s own client certificate and key, as a client identity.
pub fn gateway_identity(m: &DevMaterial) -> Option<(&str, &str)> {
    Some((
        m.gateway_client_cert_pem.as_str(),
        m.gateway_client_key_pem.as_str(),
    ))
}

/// A client trusting `ca_pem` only, presenting `identity` if given; no connection reuse, so
/// every request makes a fresh handshake.
pub fn client(ca_pem: &str, identity: Option<(&str, &str)>, http1_only: bool) -> Client {
    let mut cfg = tls::client_config(ca_pem, identity).unwrap();
    if http1_only {
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    let mut b = Client::builder()
        .tls_backend_preconfigured(cfg)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10));
    if http1_only {
        b = b.http1_only();
    }
    b.build().unwrap()
}

/// A client trusting `ca_pem` only, presenting `identity` if given, that keeps its connections
/// (requests after the first reuse one handshake); callers add timeouts.
pub fn keeping_client(ca_pem: &str, identity: Option<(&str, &str)>) -> ClientBuilder {
    Client::builder().tls_backend_preconfigured(tls::client_config(ca_pem, identity).unwrap())
}

pub async fn healthz(c: &Client, addr: SocketAddr) -> reqwest::Result<reqwest::Response> {
    c.get(https(addr, "/healthz")).send().await
}
