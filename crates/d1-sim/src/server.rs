//! The TLS listener of the simulated D1 API: accept, TLS (mutual when configured), HTTP/1.1 or
//! h2 by ALPN, one axum router shared by all connections, graceful shutdown.
//!
//! It is a hand-written accept loop rather than `axum::serve` because two faults need the
//! connection itself: a "reset" closes the TCP connection without any HTTP answer, and a
//! "timeout" must not hold up shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::api::ResetConnection;
use super::wait_shutdown;

/// A client that does not finish the TLS handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight requests before closing connections anyway (held
/// "timeout" requests would otherwise keep it waiting for 30 s).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The error a connection's service returns to make hyper drop the connection.
#[derive(Debug, thiserror::Error)]
#[error("connection reset by fault injection")]
struct Reset;

/// Serves `router` on `listener` until `shutdown` turns true.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            () = wait_shutdown(shutdown.clone()) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let watcher = graceful.watcher();
                    let (acceptor, router, builder) = (acceptor.clone(), router.clone(), builder.clone());
                    connections.spawn(async move {
                        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                        serve_connection(tls, router, builder, watcher).await;
                    });
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Stop accepting, let in-flight requests finish, then cut whatever is left.
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("shutdown grace elapsed; closing remaining connections");
    }
    connections.shutdown().await;
}

async fn serve_connection<IO>(
    io: IO,
    router: Router,
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Set by a request that must reset the connection; racing it against the connection
    // future and dropping the latter closes the socket mid-exchange, for HTTP/1.1 and h2 alike.
    let reset = Arc::new(Notify::new());
    let service_reset = reset.clone();
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let router = router.clone();
        let reset = service_reset.clone();
        async move {
            let Ok(resp) = router.oneshot(req).await;
            if resp.extensions().get::<ResetConnection>().is_some() {
                // Drop the whole connection with this request unanswered, and never answer it
                // with a stream reset first: on HTTP/2 a reset arrives before the socket closes,
                // so the client could send its next request on a connection about to vanish
                // (a flaky "connection closed" on a call no fault was meant for).
                reset.notify_one();
                std::future::pending::<()>().await;
                return Err(Reset);
            }
            Ok::<_, Reset>(resp)
        }
    });
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    let conn = watcher.watch(conn);
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        () = reset.notified() => {
            tracing::debug!("connection reset by fault injection");
        }
    }
}
