//! The merchant's webhook receiver of a chaos run: a hyper server on a fixed loopback port that
//! checks every delivery's signature, records it, and answers 204. It can be taken down (the
//! listener and every open connection closed: the gateway sees connection refused) and brought
//! back on the same port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::BoxError;

/// One delivery as received (the list keeps them in arrival order).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event_id: String,
    pub event_type: String,
    pub token_id: String,
    pub status: String,
    pub updated_at: String,
}

#[derive(Default)]
struct State {
    secret: Mutex<String>,
    deliveries: Mutex<Vec<Delivery>>,
    /// Deliveries whose signature did not verify, or whose body was not an event.
    rejected: AtomicU64,
}

pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Receiver {
    /// Binds a free loopback port and serves.
    pub async fn start() -> Result<Receiver, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut r = Receiver {
            addr,
            state: Arc::default(),
            task: None,
        };
        r.serve(listener);
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// The endpoint's signing secret (known once the endpoint is registered).
    pub fn set_secret(&self, secret: &str) {
        *lock(&self.state.secret) = secret.to_owned();
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = self.state.clone();
        self.task = Some(tokio::spawn(async move {
            // Owned by this task: aborting the task drops the set, which aborts every open
            // connection, so "down" really is down.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let state = state.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                // Reap finished connections as we go.
                while conns.try_join_next().is_some() {}
            }
        }));
    }

    /// Closes the listener and every connection: the gateway's attempts fail to connect.
    pub async fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same port.
    pub async fn up(&mut self) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    self.serve(l);
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        lock(&self.state.deliveries).clone()
    }

    pub fn rejected(&self) -> u64 {
        self.state.rejected.load(Ordering::Relaxed)
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let sig = req
        .headers()
        .get("tokengate-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    };
    let secret = lock(&state.secret).clone();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let signed = !secret.is_empty()
        && tokengate::domain::webhooks::verify_signature(
            secret.as_bytes(),
            &sig,
            &body,
            now,
            Duration::from_secs(300),
        );
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let token = &event["data"]["token"];
    let field = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    if !signed || event["id"].as_str().is_none() {
        state.rejected.fetch_add(1, Ordering::Relaxed);
        return Ok(status(StatusCode::BAD_REQUEST));
    }
    lock(&state.deliveries).push(Delivery {
        event_id: field(&event["id"]),
        event_type: field(&event["type"]),
        token_id: field(&token["id"]),
        status: field(&token["status"]),
        updated_at: field(&token["updatedAt"]),
    });
    Ok(status(StatusCode::NO_CONTENT))
}

fn status(s: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = s;
    r
}
