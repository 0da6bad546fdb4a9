//! `TestApp`: the real gateway on 127.0.0.1:0 with a real store (embedded on a temp dir, or a
//! real `redis-server`), configured through the same layered config as production.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use reqwest::{Client, Response};
use serde_json::{Value, json};
use tokengate::app::Gateway;
use tokengate::config::Config;
use tokengate::egress::Resolve;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::redis_server::{RedisCluster, RedisServer};

pub const ADMIN: &str = "test-admin-token";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Redis,
    /// A three-primary Redis Cluster started for the test (kept until the `TestApp` drops).
    RedisCluster,
}

pub struct TestAppBuilder {
    backend: Backend,
    env: Vec<(String, String)>,
    data_dir: Option<PathBuf>,
    redis: Option<RedisServer>,
    /// Resolver of webhook URL hosts; the system's when unset.
    resolver: Option<Arc<dyn Resolve>>,
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub client: Client,
    pub data_dir: PathBuf,
    pub redis: Option<RedisServer>,
    /// The Redis Cluster of [`Backend::RedisCluster`].
    pub cluster: Option<RedisCluster>,
    /// Control API of the in-process D1 simulator (sandbox mode), e.g. `http://127.0.0.1:p`.
    pub sim_control: Option<String>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

pub fn client() -> Client {
    super::install_crypto_provider();
    Client::builder()
        .pool_max_idle_per_host(8)
        .build()
        .expect("client")
}

impl TestAppBuilder {
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }
    pub fn data_dir(mut self, d: PathBuf) -> Self {
        self.data_dir = Some(d);
        self
    }
    /// Webhook URL hosts resolve through `r` (the SSRF guard's tests).
    pub fn resolver(mut self, r: Arc<dyn Resolve>) -> Self {
        self.resolver = Some(r);
        self
    }
    pub fn redis_server(mut self, r: RedisServer) -> Self {
        self.redis = Some(r);
        self.backend = Backend::Redis;
        self
    }

    pub async fn start(self) -> TestApp {
        super::init_logs();
        let (tmp, data_dir) = match self.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let redis = match (self.backend, self.redis) {
            (Backend::Redis, Some(r)) => Some(r),
            (Backend::Redis, None) => Some(RedisServer::start()),
            _ => None,
        };
        let mut env: Vec<(String, String)> = vec![
            ("TOKENGATE__SERVER__LISTEN".into(), "127.0.0.1:0".into()),
            ("TOKENGATE__SIM__LISTEN".into(), "127.0.0.1:0".into()),
            (
                "TOKENGATE__SIM__CONTROL_LISTEN".into(),
                "127.0.0.1:0".into(),
            ),
            ("TOKENGATE__LOG__LEVEL".into(), "debug".into()),
            ("TOKENGATE_ADMIN_TOKEN".into(), ADMIN.into()),
            (
                "TOKENGATE__STORAGE__DATA_DIR".into(),
                data_dir.display().to_string(),
            ),
        ];
        if let Some(r) = &redis {
            env.push(("TOKENGATE__STORAGE__REDIS_URL".into(), r.url()));
        }
        let cluster = if self.backend == Backend::RedisCluster {
            let c = tokio::task::spawn_blocking(RedisCluster::start)
                .await
                .expect("cluster start");
            let list: Vec<String> = c.addrs().iter().map(|a| format!("\"{a}\"")).collect();
            env.push((
                "TOKENGATE__STORAGE__REDIS_CLUSTER_NODES".into(),
                format!("[{}]", list.join(",")),
            ));
            Some(c)
        } else {
            None
        };
        env.extend(self.env);
        let cfg = Config::load_with_env(None, &env).expect("config");
        let listener = tokio::net::TcpListener::bind(cfg.server.listen)
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let gw = match self.resolver {
            Some(r) => Gateway::build_with_resolver(&cfg, addr, r).await,
            None => Gateway::build(&cfg, addr).await,
        }
        .expect("gateway builds");
        let sim_control = gw.sandbox.as_ref().map(|s| s.control_url());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            gw.run(listener, async {
                let _ = rx.await;
            })
            .await
            .expect("gateway runs");
        });
        TestApp {
            addr,
            base: format!("http://{addr}"),
            client: client(),
            data_dir,
            redis,
            cluster,
            sim_control,
            shutdown: Some(tx),
            handle: Some(handle),
            _tmp: tmp,
        }
    }
}

impl TestApp {
    pub fn builder(backend: Backend) -> TestAppBuilder {
        TestAppBuilder {
            backend,
            env: Vec::new(),
            data_dir: None,
            redis: None,
            resolver: None,
        }
    }

    pub async fn start(backend: Backend) -> TestApp {
        Self::builder(backend).start().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Stops the gateway gracefully and waits for it; returns the temp dir (if owned) and Redis
    /// so a test can restart on the same data.
    pub async fn stop(mut self) -> (Option<tempfile::TempDir>, Option<RedisServer>) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
        (self._tmp.take(), self.redis.take())
    }

    /// Sets the simulator's faults (see docs/d1-protocol.md).
    pub async fn sim_faults(&self, faults: Value) {
        let url = format!(
            "{}/sim/faults",
            self.sim_control.as_ref().expect("sandbox sim")
        );
        let r = self
            .client
            .put(url)
            .json(&faults)
            .send()
            .await
            .expect("send");
        assert!(r.status().is_success(), "set faults: {}", r.status());
    }

    pub async fn sim_stats(&self) -> Value {
        let url = format!(
            "{}/sim/stats",
            self.sim_control.as_ref().expect("sandbox sim")
        );
        self.client
            .get(url)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json")
    }

    /// Triggers a lifecycle event on a D1 token in the simulator.
    pub async fn sim_event(&self, d1_token_id: &str, event: Value) -> reqwest::StatusCode {
        let url = format!(
            "{}/sim/tokens/{d1_token_id}/events",
            self.sim_control.as_ref().expect("sandbox sim")
        );
        self.client
            .post(url)
            .json(&event)
            .send()
            .await
            .expect("send")
            .status()
    }

    pub async fn create_merchant(&self, name: &str) -> (String, String) {
        let r = self
            .client
            .post(self.url("/v1/merchants"))
            .bearer_auth(ADMIN)
            .json(&json!({ "name": name }))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 201, "create merchant");
        let v: Value = r.json().await.expect("json");
        (
            v["id"].as_str().expect("id").to_owned(),
            v["apiKey"].as_str().expect("apiKey").to_owned(),
        )
    }

    pub async fn post(&self, path: &str, key: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("send")
    }

    pub async fn get(&self, path: &str, key: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("send")
    }

    pub async fn tokenize(&self, key: &str, pan: &str) -> Response {
        self.post("/v1/tokens", key, &card_body(pan, 12, 2030))
            .await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn card_body(pan: &str, month: u8, year: u16) -> Value {
    json!({
        "card": {"number": pan, "expiryMonth": month, "expiryYear": year, "holderName": "Ada Lovelace"},
        "usage": "CARD_ON_FILE",
        "customerReference": "cust-42"
    })
}

/// Asserts a problem response and returns its body.
pub async fn expect_problem(r: Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "status for {code}");
    let url = r.url().clone();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(ct, "application/problem+json", "content type for {code}");
    let v: Value = r.json().await.expect("problem json");
    assert_eq!(v["code"], code, "problem {v}");
    assert_eq!(v["status"], status);
    assert!(v["type"].is_string() && v["title"].is_string() && v["detail"].is_string());
    assert_documented(url.path(), status, code);
    v
}

/// Asserts that the route serving `path` documents `code` for `status` (the `x-problem-codes`
/// the catalogue derives, src/http/problem/codes.rs): every problem a test provokes through
/// [`expect_problem`] is also a check of the OpenAPI document. The router's own fallbacks
/// (`route_not_found`, `method_not_allowed`) belong to no route.
pub fn assert_documented(path: &str, status: u16, code: &str) {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    if matches!(code, "route_not_found" | "method_not_allowed") {
        return;
    }
    let doc = DOC.get_or_init(|| {
        serde_json::from_str(tokengate::http::openapi::document()).expect("openapi document")
    });
    let matches = |template: &str| {
        let (t, p): (Vec<&str>, Vec<&str>) =
            (template.split('/').collect(), path.split('/').collect());
        t.len() == p.len()
            && t.iter()
                .zip(&p)
                .all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}')))
    };
    let paths = doc["paths"].as_object().expect("paths");
    let Some((template, item)) = paths.iter().find(|(t, _)| matches(t)) else {
        panic!("{path}: no documented route answers {status} {code}");
    };
    let documented = item.as_object().expect("path item").values().any(|op| {
        op["responses"][status.to_string()]["x-problem-codes"]
            .as_array()
            .is_some_and(|c| c.iter().any(|x| x == code))
    });
    assert!(
        documented,
        "{template}: {status} {code} is answered but not documented for this route"
    );
}
