//! The processes of a chaos run and how to talk to them: `redis-server` with an fsynced AOF,
//! `tokengate d1-sim`, `tokengate serve` with a generated config file, each restartable on the
//! same port and data so a `kill -9` can be followed by a restart; plus a small HTTP helper that
//! opens a fresh loopback connection per call (a killed gateway leaves no pooled connection to
//! trip over).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use serde_json::Value;

use crate::BoxError;
use crate::client::Conn;
use crate::ports::{self, free_addr, listening};

/// Client credentials the gateways accept on `POST /oauth2/token` (the driver plays D1 in the
/// notification storm).
pub const NOTIFY_CLIENT_ID: &str = "chaos-d1";
pub const NOTIFY_CLIENT_SECRET: &str = "chaos-notify-secret-0123456789abcdef";
/// The merchant gateway id of the simulator's generated key set.
pub const MERCHANT_GATEWAY_ID: &str = "tokengate-sandbox";

/// A child process, killed (SIGKILL) when dropped so an error anywhere leaves nothing running.
pub struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Result<Proc, BoxError> {
        Ok(Proc {
            child: cmd.spawn()?,
        })
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

// --- HTTP -----------------------------------------------------------------------------------------

/// One answer: status, whether it is `application/problem+json`, and the JSON body (`Null` when
/// there is none or it is not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub problem: bool,
    pub json: Value,
}

impl Answer {
    /// The problem `code`, when the answer is a problem document that has one.
    pub fn code(&self) -> Option<&str> {
        self.problem.then(|| self.json["code"].as_str()).flatten()
    }
}

/// Bound on one call, so a wedged server cannot hang the run.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// One request on a fresh connection. `auth` is the whole `Authorization` value.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Option<Bytes>,
    content_type: &str,
) -> Result<Answer, BoxError> {
    let fut = async {
        let mut conn = Conn::connect(addr).await?;
        let mut b = Request::builder().method(method).uri(path);
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        let body = match body {
            Some(j) => {
                b = b.header(header::CONTENT_TYPE, content_type);
                Full::new(j)
            }
            None => Full::new(Bytes::new()),
        };
        let (parts, bytes) = conn.send_full(b.body(body)?).await?;
        let problem = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/problem+json"));
        Ok::<_, BoxError>(Answer {
            status: parts.status.as_u16(),
            problem,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        })
    };
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .map_err(|_| BoxError::from("no answer within 15 s"))?
}

/// A JSON request with a bearer token.
pub async fn json(
    addr: SocketAddr,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> Result<Answer, BoxError> {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    call(
        addr,
        method,
        path,
        auth.as_deref(),
        body.map(|b| Bytes::from(b.to_string())),
        "application/json",
    )
    .await
}

// --- redis ----------------------------------------------------------------------------------------

/// One `redis-server` with `appendonly yes` and `appendfsync always`: every write it
/// acknowledged is on disk, so a `kill -9` loses nothing the gateway was told was stored.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Redis {
    pub fn start(dir: &Path) -> Result<Redis, BoxError> {
        let port = free_addr()?.port();
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir)?;
        let mut r = Redis {
            port,
            dir,
            proc: None,
        };
        r.restart()?;
        Ok(r)
    }

    /// Starts the server (again) on its port and directory; the AOF is replayed.
    pub fn restart(&mut self) -> Result<(), BoxError> {
        let port = self.port.to_string();
        let proc = Proc::spawn(
            Command::new("redis-server")
                .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .map_err(|e| format!("cannot start redis-server (is it installed?): {e}"))?;
        self.proc = Some(proc);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        // Loading the AOF takes a moment; PING answers LOADING until it is done.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if listening(addr)
                && Command::new("redis-cli")
                    .args(["-p", &port, "ping"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
            {
                return Ok(());
            }
            if self.proc.as_mut().is_some_and(|p| !p.alive()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("redis-server did not start".into())
    }

    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

// --- the D1 simulator -----------------------------------------------------------------------------

/// `tokengate d1-sim` in its own process; its key set (written at start) is where the gateways
/// read their half.
pub struct Sim {
    _proc: Proc,
    pub api: SocketAddr,
    pub control: SocketAddr,
    pub keys_dir: PathBuf,
}

impl Sim {
    pub fn start(exe: &Path, work: &Path) -> Result<Sim, BoxError> {
        let sim = ports::start_d1_sim(exe, &work.join("sim"), &work.join("d1-sim.log"))?;
        Ok(Sim {
            _proc: Proc { child: sim.child },
            api: sim.api,
            control: sim.control,
            keys_dir: sim.keys_dir,
        })
    }

    pub async fn stats(&self) -> Result<Value, BoxError> {
        Ok(json(self.control, Method::GET, "/sim/stats", None, None)
            .await?
            .json)
    }

    pub async fn tokens_created(&self) -> Result<u64, BoxError> {
        self.stats().await?["tokensCreated"]
            .as_u64()
            .ok_or_else(|| "sim stats without tokensCreated".into())
    }

    /// Replaces the fault document (`{}` heals).
    pub async fn faults(&self, faults: &Value) -> Result<(), BoxError> {
        let a = json(self.control, Method::PUT, "/sim/faults", None, Some(faults)).await?;
        if a.status != 200 {
            return Err(format!("PUT /sim/faults: {}", a.status).into());
        }
        Ok(())
    }
}

// --- the gateway ----------------------------------------------------------------------------------

/// Where a gateway keeps its data.
#[derive(Clone)]
pub enum Storage {
    Embedded(PathBuf),
    Redis(String),
}

/// One `tokengate serve` instance with a generated config file; `kill9` and `start` again keep
/// its address and data.
pub struct Gateway {
    pub name: String,
    pub addr: SocketAddr,
    config: PathBuf,
    exe: PathBuf,
    logs: PathBuf,
    starts: u32,
    proc: Option<Proc>,
}

impl Gateway {
    pub fn new(
        exe: &Path,
        work: &Path,
        name: &str,
        storage: &Storage,
        sim: &Sim,
    ) -> Result<Gateway, BoxError> {
        let addr = free_addr()?;
        let storage_toml = match storage {
            Storage::Embedded(dir) => format!("data_dir = {:?}", dir.display().to_string()),
            Storage::Redis(url) => format!(
                "redis_url = {url:?}\ndata_dir = {:?}",
                work.join(format!("{name}-unused")).display().to_string()
            ),
        };
        let config = format!(
            r#"# Generated by `tokengate-loadtest chaos` (scripts/chaos.sh, docs/reliability.md).
mode = "sandbox"

[server]
listen = "{addr}"
max_concurrency = 4096

[storage]
{storage_toml}

[rate_limit]
per_key_per_s = 0
per_merchant_per_s = 0

[d1]
base_url = "https://{api}/authz/v1"
keys_dir = {keys:?}
merchant_gateway_id = "{MERCHANT_GATEWAY_ID}"
# Short budgets, so injected timeouts resolve within the run.
call_timeout_ms = 1500
max_retries = 1
breaker_failure_threshold = 5
breaker_open_ms = 1000

[sim]
listen = "{sim_listen}"
control_listen = "{sim_control}"

[notify]
client_id = "{NOTIFY_CLIENT_ID}"
client_secret = "{NOTIFY_CLIENT_SECRET}"

[reconcile]
interval_ms = 500
pending_grace_s = 1

[webhooks]
# Fast retries, and enough of them to outlast the receiver's outage: a delivery that is
# dead-lettered here is a finding, not an expected outcome.
max_attempts = 1000
timeout_ms = 1000
backoff_base_ms = 100
backoff_max_ms = 1000
poll_interval_ms = 100
claim_idle_ms = 2000

[metrics]
token_counts_interval_ms = 500

[log]
format = "json"
level = "warn"
access = false
"#,
            api = sim.api,
            keys = sim.keys_dir.display().to_string(),
            sim_listen = free_addr()?,
            sim_control = free_addr()?,
        );
        let path = work.join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        Ok(Gateway {
            name: name.to_owned(),
            addr,
            config: path,
            exe: exe.to_owned(),
            logs: work.to_owned(),
            starts: 0,
            proc: None,
        })
    }

    /// Starts the process and waits for `/readyz` 200.
    pub async fn start(&mut self) -> Result<(), BoxError> {
        self.starts += 1;
        let log =
            std::fs::File::create(self.logs.join(format!("{}-{}.log", self.name, self.starts)))?;
        self.proc = Some(Proc::spawn(
            Command::new(&self.exe)
                .arg("serve")
                .arg("--config")
                .arg(&self.config)
                .env_remove("RUST_LOG")
                .stdout(log)
                .stderr(Stdio::null()),
        )?);
        if !self.wait_ready(Duration::from_secs(60)).await {
            return Err(format!(
                "gateway {} did not become ready; see {}-{}.log",
                self.name, self.name, self.starts
            )
            .into());
        }
        Ok(())
    }

    /// Whether `/readyz` answers 200 within `within`.
    pub async fn wait_ready(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(a) = json(self.addr, Method::GET, "/readyz", None, None).await
                && a.status == 200
            {
                return true;
            }
            if let Some(p) = &mut self.proc
                && !p.alive()
            {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// A sample of `/metrics`: the values of the series of `name` carrying every label of
    /// `labels`, summed; 0 when absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64, BoxError> {
        let mut conn = Conn::connect(self.addr).await?;
        let req = Request::builder()
            .method(Method::GET)
            .uri("/metrics")
            .body(Full::new(Bytes::new()))?;
        let (_, body) = conn.send_full(req).await?;
        let text = String::from_utf8_lossy(&body);
        Ok(text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                    && labels
                        .iter()
                        .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum())
    }
}
