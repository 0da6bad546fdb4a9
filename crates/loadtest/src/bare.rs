//! `bench-hyper`: the ceiling. A hyper 1 HTTP/1.1 server (hyper-util's tokio glue, no axum, no
//! tower) that answers every request with a small JSON body, on the same multi-threaded tokio
//! runtime the gateway uses. Whatever the gateway reaches is stated as a ratio of this, measured
//! in the same run on the same cores.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::BoxError;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
}

const BODY: &[u8] = br#"{"status":"ok"}"#;

async fn handle(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Serves until the process is killed.
pub async fn run(args: Args) -> Result<(), BoxError> {
    let listener = TcpListener::bind(args.listen).await?;
    serve(listener).await
}

pub async fn serve(listener: TcpListener) -> Result<(), BoxError> {
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
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}
