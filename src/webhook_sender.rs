//! Outbound HTTP for merchant webhooks: one pooled hyper client for `http://` and `https://`
//! (rustls with the ring provider; the system's trust roots plus an optional extra CA bundle),
//! implementing the domain's [`WebhookSender`].
//!
//! Redirects are not followed (a 3xx is a failed attempt): the signature covers a body meant
//! for the registered URL, and following redirects would let a receiver bounce deliveries
//! anywhere. Response bodies are not read: only the status matters, and nothing a receiver
//! says is stored.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::{ClientConfig, RootCertStore};

use crate::domain::webhooks::{OutboundRequest, SendError, WebhookSender};
use tokengate_d1_protocol::tls::{self, TlsError};

/// Idle pooled connections to receivers are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(30);
const USER_AGENT: &str = concat!("tokengate-webhooks/", env!("CARGO_PKG_VERSION"));

/// Webhook client over hyper-util's pooled client.
#[derive(Clone)]
pub struct HyperWebhookSender {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for HyperWebhookSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperWebhookSender").finish_non_exhaustive()
    }
}

/// The system's trust roots, plus every certificate of `extra_ca_pem` (a private CA, or a test
/// CA). Certificates the system store holds but rustls cannot parse are skipped.
fn roots(extra_ca_pem: Option<&str>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(pem) = extra_ca_pem {
        for cert in tls::certs_from_pem(pem, "webhooks.ca_file")? {
            roots
                .add(cert)
                .map_err(|e| TlsError::Rustls("webhooks.ca_file", e))?;
        }
    }
    if roots.is_empty() {
        tracing::warn!("no trusted CA certificates found: https webhook deliveries will fail");
    } else {
        tracing::debug!(
            system_roots = added,
            total = roots.len(),
            "webhook trust roots loaded"
        );
    }
    Ok(roots)
}

impl HyperWebhookSender {
    /// `connect_timeout` bounds TCP connects (the worker bounds whole attempts).
    pub fn new(
        connect_timeout: Duration,
        extra_ca_pem: Option<&str>,
    ) -> Result<HyperWebhookSender, TlsError> {
        let config = ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls("protocol versions", e))?
            .with_root_certificates(roots(extra_ca_pem)?)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Ok(HyperWebhookSender { client })
    }
}

#[async_trait]
impl WebhookSender for HyperWebhookSender {
    async fn send(&self, req: OutboundRequest<'_>) -> Result<u16, SendError> {
        let uri: http::Uri = req.url.parse().map_err(|_| SendError::InvalidUrl)?;
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, USER_AGENT);
        for (name, value) in req.headers {
            builder = builder.header(name, value);
        }
        let request = builder
            .body(Full::new(Bytes::from(req.body.to_owned())))
            .map_err(|_| SendError::InvalidUrl)?;
        match self.client.request(request).await {
            Ok(resp) => Ok(resp.status().as_u16()),
            Err(e) if e.is_connect() => Err(SendError::Connect),
            Err(_) => Err(SendError::Request),
        }
    }
}
