//! Outbound HTTP for merchant webhooks: one pooled hyper client for `http://` and `https://`
//! (rustls with the ring provider; the system's trust roots plus an optional extra CA bundle),
//! implementing the domain's [`WebhookSender`].
//!
//! Redirects are not followed (a 3xx is a failed attempt): the signature covers a body meant
//! for the registered URL, and following redirects would let a receiver bounce deliveries
//! anywhere. Response bodies are not read: only the status matters, and nothing a receiver
//! says is stored.
//!
//! TCP connections are made by [`GuardedConnector`], not hyper-util's `HttpConnector`: it
//! resolves the host through the SSRF guard ([`crate::egress`]) and connects to exactly the
//! addresses the guard checked, so a name cannot answer differently to the check and to the
//! connection (DNS rebinding). TLS on top still verifies the certificate against, and sends SNI
//! for, the host name of the URL.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;

use crate::domain::webhooks::{OutboundRequest, SendError, WebhookSender};
use tokengate_d1_protocol::tls::{self, TlsError};

use crate::egress::{Egress, EgressError};

/// Idle pooled connections to receivers are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(30);
const USER_AGENT: &str = concat!("tokengate-webhooks/", env!("CARGO_PKG_VERSION"));

/// Webhook client over hyper-util's pooled client.
#[derive(Clone)]
pub struct HyperWebhookSender {
    client: Client<HttpsConnector<GuardedConnector>, Full<Bytes>>,
}

/// Why [`GuardedConnector`] made no connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The SSRF guard refused the host (or could not resolve it).
    #[error(transparent)]
    Egress(#[from] EgressError),
    #[error("the url has no host")]
    NoHost,
    #[error("connect failed")]
    Io(#[source] std::io::Error),
    #[error("connect timed out")]
    Timeout,
}

/// The TCP connector under TLS: resolves through the SSRF guard and connects to the checked
/// addresses, in the resolver's order, each bounded by the connect timeout. (No Happy Eyeballs:
/// the attempt as a whole is bounded by `webhooks.timeout_ms` anyway.)
#[derive(Clone)]
pub struct GuardedConnector {
    egress: Arc<Egress>,
    connect_timeout: Duration,
}

impl GuardedConnector {
    pub fn new(egress: Arc<Egress>, connect_timeout: Duration) -> GuardedConnector {
        GuardedConnector {
            egress,
            connect_timeout,
        }
    }

    async fn connect(self, uri: http::Uri) -> Result<TokioIo<TcpStream>, ConnectError> {
        let host = uri.host().ok_or(ConnectError::NoHost)?;
        let https = uri
            .scheme_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"));
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addrs = self.egress.resolve_checked(host, port).await?;
        let mut last = ConnectError::Timeout;
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    // Small requests; waiting for more to send gains nothing.
                    let _ = stream.set_nodelay(true);
                    return Ok(TokioIo::new(stream));
                }
                Ok(Err(e)) => last = ConnectError::Io(e),
                Err(_) => last = ConnectError::Timeout,
            }
        }
        Err(last)
    }
}

impl tower::Service<http::Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// The SSRF guard's refusal inside a client error, if that is why the request failed (hyper
/// and hyper-rustls wrap connector errors; the chain of sources still holds ours).
fn refusal(e: &(dyn StdError + 'static)) -> Option<crate::egress::AddrClass> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(ConnectError::Egress(EgressError::Forbidden(class))) =
            err.downcast_ref::<ConnectError>()
        {
            return Some(*class);
        }
        cur = err.source();
    }
    None
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
    /// `connect_timeout` bounds TCP connects (the worker bounds whole attempts); `egress` is
    /// the SSRF guard every connection goes through.
    pub fn new(
        connect_timeout: Duration,
        extra_ca_pem: Option<&str>,
        egress: Arc<Egress>,
    ) -> Result<HyperWebhookSender, TlsError> {
        let config = ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls("protocol versions", e))?
            .with_root_certificates(roots(extra_ca_pem)?)
            .with_no_client_auth();
        let http = GuardedConnector::new(egress, connect_timeout);
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
            Err(e) => Err(match refusal(&e) {
                Some(class) => SendError::Forbidden(class),
                None if e.is_connect() => SendError::Connect,
                None => SendError::Request,
            }),
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failing test should stop loudly"
)]
mod tests {
    use std::net::{IpAddr, SocketAddr};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::routing::post;

    use super::*;
    use crate::egress::testing::StaticResolver;
    use crate::egress::{AddrClass, EgressPolicy};

    /// An HTTP receiver on 127.0.0.1 answering 204 and counting requests.
    async fn receiver() -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { http::StatusCode::NO_CONTENT }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (port, hits)
    }

    async fn post_to(
        policy: EgressPolicy,
        dns: Arc<StaticResolver>,
        url: &str,
    ) -> Result<u16, SendError> {
        let egress = Arc::new(Egress::new(policy, dns));
        let sender = HyperWebhookSender::new(Duration::from_secs(2), None, egress).unwrap();
        sender
            .send(OutboundRequest {
                url,
                headers: Vec::new(),
                body: "{}",
            })
            .await
    }

    /// Production policy (no loopback exception): a name resolving to loopback is refused
    /// before anything is sent; listed in the allow-list, the same name is delivered to, at
    /// the address the test resolver gave (the name is in no real DNS, so no other resolution
    /// happened); rebound to a private address, refused again.
    #[tokio::test]
    async fn connects_only_to_checked_addresses() {
        let (port, hits) = receiver().await;
        let dns = Arc::new(StaticResolver::new());
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        dns.set("hooks.internal.test", &[loopback]);
        let url = format!("http://hooks.internal.test:{port}/hook");
        let production = || EgressPolicy::new(Vec::new(), false);
        let listed = || EgressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], false);

        let r = post_to(production(), dns.clone(), &url).await;
        assert_eq!(r, Err(SendError::Forbidden(AddrClass::Loopback)));
        assert_eq!(r.unwrap_err().code(), "forbidden_address_loopback");
        assert_eq!(hits.load(Ordering::SeqCst), 0);

        assert_eq!(post_to(listed(), dns.clone(), &url).await, Ok(204));
        assert_eq!(hits.load(Ordering::SeqCst), 1);

        dns.set("hooks.internal.test", &["10.0.0.9".parse().unwrap()]);
        let r = post_to(listed(), dns.clone(), &url).await;
        assert_eq!(r, Err(SendError::Forbidden(AddrClass::Private)));

        // Literals are checked too, in their IPv4-mapped form as well.
        let mapped = format!("http://[::ffff:127.0.0.1]:{port}/hook");
        let r = post_to(production(), dns.clone(), &mapped).await;
        assert_eq!(r, Err(SendError::Forbidden(AddrClass::Loopback)));

        // Sandbox opens loopback, but never the gateway's own listener.
        let own: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let sandbox = EgressPolicy::new(Vec::new(), true).with_own_listeners([own]);
        let r = post_to(
            sandbox,
            dns.clone(),
            &format!("http://localhost:{port}/hook"),
        )
        .await;
        assert_eq!(r, Err(SendError::Forbidden(AddrClass::OwnListener)));
        assert_eq!(hits.load(Ordering::SeqCst), 1);

        // A name that does not resolve is an ordinary failed attempt.
        let r = post_to(production(), dns, "https://nowhere.test/hook").await;
        assert_eq!(r, Err(SendError::Connect));
    }
}
