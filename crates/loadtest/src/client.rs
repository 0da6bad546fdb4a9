//! A minimal HTTP/1.1 client on hyper's connection API and hyper-util's tokio glue: one
//! keep-alive connection per [`Conn`], requests sent one at a time, no pool. A load generator
//! wants exactly that: it decides how many connections exist and what each one carries.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::BoxError;

pub type ReqBody = Full<Bytes>;

/// One keep-alive connection.
pub struct Conn {
    sender: SendRequest<ReqBody>,
    host: HeaderValue,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Conn, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection task ends when the sender is dropped or the server closes.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: HeaderValue::from_str(&addr.to_string())?,
        })
    }

    /// Sends one request and reads the whole response: head and body.
    pub async fn send_full(
        &mut self,
        mut req: Request<ReqBody>,
    ) -> Result<(http::response::Parts, Bytes), BoxError> {
        req.headers_mut().insert(header::HOST, self.host.clone());
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts, body))
    }

    /// Sends one request and reads the whole response body.
    pub async fn send(
        &mut self,
        mut req: Request<ReqBody>,
    ) -> Result<(StatusCode, Bytes), BoxError> {
        req.headers_mut().insert(header::HOST, self.host.clone());
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Builds a request with an optional bearer token and JSON body.
pub fn build(
    method: Method,
    path: &str,
    bearer: Option<&str>,
    json: Option<Bytes>,
) -> Result<Request<ReqBody>, BoxError> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = bearer {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = match json {
        Some(j) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            Full::new(j)
        }
        None => Full::new(Bytes::new()),
    };
    Ok(b.body(body)?)
}

/// One request on a fresh connection (set-up and readiness probes, not load).
pub async fn once(
    addr: SocketAddr,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    json: Option<Bytes>,
) -> Result<(StatusCode, Bytes), BoxError> {
    let mut c = Conn::connect(addr).await?;
    c.send(build(method, path, bearer, json)?).await
}
