//! `bench-hyper`: the ceiling. A hyper 1 HTTP/1.1 server (hyper-util's tokio glue, no axum, no
//! tower) that answers every request with a small JSON body, on the same multi-threaded tokio
//! runtime the gateway uses. Whatever the gateway reaches is stated as a ratio of this, measured
//! in the same run on the same cores.
//!
//! It can also take the **shape** of a new card's I/O without any of its work (`--io-floor` of
//! the harness): `--redis-round-trips N` makes N sequential Redis round trips per request (a
//! `GET` of one absent key, through the same `ConnectionManager` the gateway uses), and
//! `--upstream` one HTTP/2 POST per request to another `bench-hyper --http2` (the D1 call's
//! shape, without TLS). The CPU such a server spends per request is a lower bound for any
//! server that does that I/O: the I/O floor a new card pays on top of its P-256 floor.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::BoxError;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Serve HTTP/2 with prior knowledge (cleartext) instead of HTTP/1.1: the upstream of an
    /// I/O-floor run.
    #[arg(long)]
    http2: bool,
    /// Redis for `--redis-round-trips`.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Sequential Redis round trips per request before answering (0: none, Redis unused).
    #[arg(long, default_value_t = 0)]
    redis_round_trips: u32,
    /// An HTTP/2 upstream (`http://host:port/`, prior knowledge) each request POSTs to once
    /// before answering, reading the whole answer.
    #[arg(long)]
    upstream: Option<Uri>,
    /// Body size of the upstream POST (a new card's JWE-bearing D1 request is about this size).
    #[arg(long, default_value_t = 1024)]
    upstream_body_bytes: usize,
}

const BODY: &[u8] = br#"{"status":"ok"}"#;

/// Failures written to stderr (the harness keeps it as `bench-hyper-<port>.log`): enough to
/// say why a shaped run answered 502, without flooding the log when a dependency is down.
const NOTED_FAILURES: u32 = 20;
static FAILURES: AtomicU32 = AtomicU32::new(0);

/// Writes `what` failed, with the error's whole source chain, for the first few failures.
fn note_failure(what: &str, e: &dyn std::error::Error) {
    let n = FAILURES.fetch_add(1, Ordering::Relaxed);
    if n >= NOTED_FAILURES {
        return;
    }
    let mut line = failure_line(what, e);
    if n + 1 == NOTED_FAILURES {
        line.push_str(" (later failures are not written)");
    }
    eprintln!("{line}");
}

/// A connection closed before it sent anything: the harness's start-up probe (or a client gone
/// at connect), not a failure of the shape.
fn closed_before_any_frame(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// `what` failed, and why: the error and each of its sources, outermost first.
fn failure_line(what: &str, e: &dyn std::error::Error) -> String {
    let mut line = format!("bench-hyper: {what} failed: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    line
}

/// The I/O a request makes before its answer.
struct Shape {
    redis: Option<(redis::aio::ConnectionManager, u32)>,
    upstream: Option<(Client<HttpConnector, Full<Bytes>>, Uri, Bytes)>,
}

fn answer(status: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(answer(StatusCode::OK))
}

/// The shaped handler: its I/O, then the same answer; a failed round trip answers 502, so
/// `wrk` counts it and the harness refuses the run.
async fn handle_shaped(shape: Arc<Shape>) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some((conn, n)) = &shape.redis {
        let mut conn = conn.clone();
        for _ in 0..*n {
            let got: Result<Option<Vec<u8>>, _> = redis::cmd("GET")
                .arg("io-floor:absent")
                .query_async(&mut conn)
                .await;
            if let Err(e) = got {
                note_failure("a Redis round trip", &e);
                return Ok(answer(StatusCode::BAD_GATEWAY));
            }
        }
    }
    if let Some((client, uri, body)) = &shape.upstream {
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()));
        let req = match req {
            Ok(req) => req,
            Err(e) => {
                note_failure("building the upstream request", &e);
                return Ok(answer(StatusCode::BAD_GATEWAY));
            }
        };
        let failure: Option<Box<dyn std::error::Error>> = match client.request(req).await {
            Ok(resp) if !resp.status().is_success() => {
                Some(format!("answer {}", resp.status()).into())
            }
            Ok(resp) => resp.into_body().collect().await.err().map(Into::into),
            Err(e) => Some(e.into()),
        };
        if let Some(e) = failure {
            note_failure("the upstream HTTP/2 call", e.as_ref());
            return Ok(answer(StatusCode::BAD_GATEWAY));
        }
    }
    Ok(answer(StatusCode::OK))
}

/// Serves until the process is killed.
pub async fn run(args: Args) -> Result<(), BoxError> {
    let listener = TcpListener::bind(args.listen).await?;
    if args.http2 {
        return serve_h2(listener).await;
    }
    if args.redis_round_trips == 0 && args.upstream.is_none() {
        return serve(listener).await;
    }
    let redis = if args.redis_round_trips > 0 {
        let client = redis::Client::open(args.redis_url.as_str())?;
        Some((
            client.get_connection_manager().await?,
            args.redis_round_trips,
        ))
    } else {
        None
    };
    let upstream = args.upstream.map(|uri| {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        (
            client,
            uri,
            Bytes::from(vec![b'x'; args.upstream_body_bytes]),
        )
    });
    let shape = Arc::new(Shape { redis, upstream });
    accept_loop(listener, move |stream| {
        let shape = shape.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<Incoming>| handle_shaped(shape.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    })
    .await
}

pub async fn serve(listener: TcpListener) -> Result<(), BoxError> {
    accept_loop(listener, |stream| {
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    })
    .await
}

async fn serve_h2(listener: TcpListener) -> Result<(), BoxError> {
    accept_loop(listener, |stream| {
        tokio::spawn(async move {
            // The request body is read to its end, as a D1 endpoint reads the JWE it is sent.
            let svc = service_fn(|req: Request<Incoming>| async move {
                let _ = req.into_body().collect().await;
                Ok::<_, Infallible>(answer(StatusCode::OK))
            });
            // The reset-stream allowance: when a wrk run ends, its connections close and the
            // front cancels every upstream call in flight at once, dozens of RST_STREAMs. At
            // h2's default (20 reset streams not yet accepted) this server answered that with
            // GOAWAY `too_many_resets`, and a call or two of the next run failed on the dying
            // connection (a refused I/O-floor run). That burst is the harness stopping, not the
            // shape under measurement. A connection that still ends in an error is written
            // down, since the front's calls on it fail.
            if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_pending_accept_reset_streams(100_000)
                .serve_connection(TokioIo::new(stream), svc)
                .await
                && !closed_before_any_frame(&e)
            {
                note_failure("an upstream HTTP/2 connection", &e);
            }
        });
    })
    .await
}

async fn accept_loop(
    listener: TcpListener,
    mut on_conn: impl FnMut(tokio::net::TcpStream),
) -> Result<(), BoxError> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // Out of descriptors or a connection reset before accept: keep serving the others.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        on_conn(stream);
    }
}

#[cfg(test)]
mod tests {
    use super::{closed_before_any_frame, failure_line};

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connection lost")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_failure_line_names_every_cause() {
        let outer = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset by peer",
        ));
        assert_eq!(
            failure_line("the upstream HTTP/2 call", &outer),
            "bench-hyper: the upstream HTTP/2 call failed: connection lost: reset by peer"
        );
        let plain = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
        assert_eq!(
            failure_line("a Redis round trip", &plain),
            "bench-hyper: a Redis round trip failed: timed out"
        );
    }

    #[test]
    fn only_an_early_end_of_stream_counts_as_a_probe() {
        let probe = Outer(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before reading preface",
        ));
        assert!(closed_before_any_frame(&probe));
        let reset = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset by peer",
        ));
        assert!(!closed_before_any_frame(&reset));
    }
}
