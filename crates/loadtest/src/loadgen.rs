//! Open-loop load: requests are *scheduled* at a fixed rate, whatever the server does, and each
//! latency runs from the request's scheduled send time to the end of its response. A server that
//! stalls therefore shows the stall in every request scheduled behind it, instead of silently
//! slowing the generator down (coordinated omission, which closed-loop tools such as `wrk` suffer).
//!
//! The schedule is kept by a plain OS thread sleeping with `nanosleep` (tokio's timer ticks in
//! whole milliseconds, which would add up to a millisecond of generator-made latency); it hands
//! the requests due within the next 200 us to a shared queue that `connections` keep-alive
//! connections, on a one-thread runtime, drain. A request that goes out late is timed from its
//! scheduled time; one that goes out early (by less than the quantum) from its actual send, so a
//! latency is never shorter than the server took. How late the scheduler itself ran is reported
//! (`lag p99`) so the measurement floor is visible.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Method, Request, StatusCode};
use tokio::sync::{Mutex, mpsc};

use super::client::{self, Conn, ReqBody};
use super::{BoxError, parse_duration};

/// Requests due within this long are handed to the connections together (see [`open_loop`]).
const DISPATCH_QUANTUM: Duration = Duration::from_micros(200);

/// What one request of a scenario is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// `GET /` on the bare hyper server.
    Bare,
    /// `GET /healthz` (no authentication, no store): the HTTP stack alone.
    Health,
    /// `GET /v1/tokens/{id}` of a known token.
    Get,
    /// `POST /v1/tokens` with a fresh random Luhn-valid PAN: 201.
    TokenizeNew,
    /// The same with a fresh `Idempotency-Key` on each request (two more Redis round trips).
    TokenizeNewIdem,
    /// `POST /v1/tokens` with a card the merchant already tokenized (dedup hit): 200.
    TokenizeKnown,
    /// `POST /v1/tokens/{id}/cryptograms` on a known active token: 201.
    Cryptogram,
}

impl Scenario {
    pub fn label(self) -> &'static str {
        match self {
            Scenario::Bare => "bare hyper, small JSON",
            Scenario::Health => "GET /healthz",
            Scenario::Get => "GET /v1/tokens/{id}",
            Scenario::TokenizeNew => "tokenize a new card (201)",
            Scenario::TokenizeNewIdem => "tokenize a new card + Idempotency-Key (201)",
            Scenario::TokenizeKnown => "tokenize a known card, dedup (200)",
            Scenario::Cryptogram => "create a cryptogram (201)",
        }
    }

    pub fn expected(self) -> StatusCode {
        match self {
            Scenario::Bare | Scenario::Health | Scenario::Get | Scenario::TokenizeKnown => {
                StatusCode::OK
            }
            Scenario::TokenizeNew | Scenario::TokenizeNewIdem | Scenario::Cryptogram => {
                StatusCode::CREATED
            }
        }
    }

    /// The `wrk` script under `loadtest/` that sends the same requests.
    pub fn wrk_script(self) -> &'static str {
        match self {
            Scenario::Bare => "bare.lua",
            Scenario::Health => "health.lua",
            Scenario::Get => "get.lua",
            Scenario::TokenizeNew => "tokenize_new.lua",
            Scenario::TokenizeNewIdem => "tokenize_new_idem.lua",
            Scenario::TokenizeKnown => "tokenize_known.lua",
            Scenario::Cryptogram => "cryptogram.lua",
        }
    }
}

/// Expiry sent with every generated card: valid, and within the 20-year window.
pub const EXPIRY_MONTH: u8 = 12;
pub const EXPIRY_YEAR: u16 = 2030;

/// A random 16-digit Visa-range PAN with a correct Luhn check digit.
pub fn random_pan() -> String {
    let mut digits = [0u8; 16];
    digits[0] = 4;
    for d in digits.iter_mut().take(15).skip(1) {
        *d = rand::random_range(0..10u8);
    }
    digits[15] = luhn_check_digit(&digits[..15]);
    digits.iter().map(|d| char::from(b'0' + d)).collect()
}

/// The digit that makes `payload` followed by it pass the Luhn check.
fn luhn_check_digit(payload: &[u8]) -> u8 {
    let n = payload.len();
    let sum: u32 = payload
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            // Position from the right once the check digit is appended: odd positions double.
            let d = u32::from(d);
            if (n - i) % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

pub fn tokenize_body(pan: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"card":{{"number":"{pan}","expiryMonth":{EXPIRY_MONTH},"expiryYear":{EXPIRY_YEAR}}},"usage":"CARD_ON_FILE"}}"#
    ))
}

pub const CRYPTOGRAM_BODY: &str =
    r#"{"transactionType":"CIT","amount":{"value":1299,"currency":"EUR"}}"#;

/// A scenario with the data its requests draw from.
pub struct Workload {
    pub scenario: Scenario,
    pub api_key: Option<String>,
    /// Token ids to read or create cryptograms for.
    pub ids: Vec<String>,
    /// Cards the merchant already tokenized.
    pub pans: Vec<String>,
}

fn pick(v: &[String]) -> Result<&str, BoxError> {
    if v.is_empty() {
        return Err("this scenario needs token ids (--ids-file) or cards (--pans-file)".into());
    }
    Ok(&v[rand::random_range(0..v.len())])
}

impl Workload {
    pub fn request(&self) -> Result<Request<ReqBody>, BoxError> {
        let key = self.api_key.as_deref();
        match self.scenario {
            Scenario::Bare => client::build(Method::GET, "/", None, None),
            Scenario::Health => client::build(Method::GET, "/healthz", None, None),
            Scenario::Get => {
                let path = format!("/v1/tokens/{}", pick(&self.ids)?);
                client::build(Method::GET, &path, key, None)
            }
            Scenario::TokenizeNew => client::build(
                Method::POST,
                "/v1/tokens",
                key,
                Some(tokenize_body(&random_pan())),
            ),
            Scenario::TokenizeNewIdem => {
                let mut req = client::build(
                    Method::POST,
                    "/v1/tokens",
                    key,
                    Some(tokenize_body(&random_pan())),
                )?;
                let idem = format!("lt-{:032x}", rand::random::<u128>());
                req.headers_mut()
                    .insert("idempotency-key", HeaderValue::from_str(&idem)?);
                Ok(req)
            }
            Scenario::TokenizeKnown => client::build(
                Method::POST,
                "/v1/tokens",
                key,
                Some(tokenize_body(pick(&self.pans)?)),
            ),
            Scenario::Cryptogram => {
                let path = format!("/v1/tokens/{}/cryptograms", pick(&self.ids)?);
                client::build(
                    Method::POST,
                    &path,
                    key,
                    Some(Bytes::from_static(CRYPTOGRAM_BODY.as_bytes())),
                )
            }
        }
    }
}

/// What one open-loop run measured.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    pub target_rate: f64,
    /// Requests scheduled.
    pub scheduled: u64,
    /// Responses with the scenario's expected status.
    pub ok: u64,
    /// Responses with another status.
    pub unexpected: u64,
    /// Requests without a response (connection errors, or still queued at the drain deadline).
    pub failed: u64,
    pub achieved_rate: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
    /// How late the scheduler handed requests out (p99): the floor of these latencies.
    pub lag_p99: Duration,
    /// First unexpected answer, for diagnosis (status and the start of the body).
    pub first_unexpected: Option<String>,
}

impl std::fmt::Display for OpenLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "target {:.0}/s achieved {:.0}/s: ok {} unexpected {} failed {}; p50 {} p99 {} p99.9 {} max {} (scheduler lag p99 {})",
            self.target_rate,
            self.achieved_rate,
            self.ok,
            self.unexpected,
            self.failed,
            ms(self.p50),
            ms(self.p99),
            ms(self.p999),
            ms(self.max),
            ms(self.lag_p99),
        )?;
        if let Some(u) = &self.first_unexpected {
            write!(f, "; first unexpected: {u}")?;
        }
        Ok(())
    }
}

/// Milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// The `q`-quantile (0..1) of sorted values, nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Default)]
struct WorkerResult {
    latencies: Vec<Duration>,
    ok: u64,
    unexpected: u64,
    failed: u64,
    last_done: Option<Instant>,
    first_unexpected: Option<String>,
}

/// Runs `workload` against `addr` at `rate` requests per second for `duration`.
///
/// The connections run on a runtime of their own, one thread: the generator then costs as
/// little CPU as it can on cores it shares with the server, and never hands a request from one
/// thread to another (a wake-up on another core adds latency the server did not cause).
pub async fn open_loop(
    addr: SocketAddr,
    workload: Arc<Workload>,
    rate: f64,
    duration: Duration,
    connections: usize,
) -> Result<OpenLoop, BoxError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("loadgen".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(BoxError::from)
                .and_then(|rt| {
                    rt.block_on(open_loop_here(addr, workload, rate, duration, connections))
                });
            let _ = tx.send(result);
        })?;
    rx.await.map_err(|_| "the load generator thread died")?
}

async fn open_loop_here(
    addr: SocketAddr,
    workload: Arc<Workload>,
    rate: f64,
    duration: Duration,
    connections: usize,
) -> Result<OpenLoop, BoxError> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err("rate must be positive".into());
    }
    workload.request()?; // fail early on a workload without data
    let connections = connections.max(1);
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::connect(addr).await?);
    }
    let scheduled = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let (tx, rx) = mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(Mutex::new(rx));
    let start = Instant::now() + Duration::from_millis(20);
    // Requests still queued this long after the schedule ends are given up on.
    let drain_deadline = start + duration + Duration::from_secs(15);

    let scheduler = std::thread::spawn(move || {
        let mut lag = Vec::with_capacity(scheduled as usize);
        for k in 0..scheduled {
            let at = start + Duration::from_secs_f64(k as f64 / rate);
            // Hand out everything due within the next quantum in one wake-up: a sleep and a
            // cross-thread wake per request would cost the generator more CPU than the
            // server's work on the same cores. A request sent early is timed from its send.
            let now = Instant::now();
            if at > now + DISPATCH_QUANTUM {
                std::thread::sleep(at - now - DISPATCH_QUANTUM);
            }
            if tx.send(at).is_err() {
                break;
            }
            lag.push(Instant::now().saturating_duration_since(at));
        }
        lag
    });

    let mut workers = Vec::with_capacity(connections);
    for conn in conns {
        let rx = Arc::clone(&rx);
        let wl = Arc::clone(&workload);
        workers.push(tokio::spawn(worker(addr, conn, rx, wl, drain_deadline)));
    }
    let mut all = WorkerResult::default();
    for w in workers {
        let r = w.await?;
        all.latencies.extend(r.latencies);
        all.ok += r.ok;
        all.unexpected += r.unexpected;
        all.failed += r.failed;
        all.last_done = all.last_done.max(r.last_done);
        if all.first_unexpected.is_none() {
            all.first_unexpected = r.first_unexpected;
        }
    }
    let mut lag = tokio::task::spawn_blocking(move || scheduler.join())
        .await?
        .map_err(|_| "the scheduler thread panicked")?;
    // Requests the workers never took (drain deadline passed).
    let answered = all.ok + all.unexpected + all.failed;
    all.failed += scheduled.saturating_sub(answered);
    all.latencies.sort_unstable();
    lag.sort_unstable();
    let elapsed = all
        .last_done
        .map(|t| t.saturating_duration_since(start))
        .unwrap_or(duration)
        .max(Duration::from_millis(1));
    Ok(OpenLoop {
        target_rate: rate,
        scheduled,
        ok: all.ok,
        unexpected: all.unexpected,
        failed: all.failed,
        achieved_rate: (all.ok + all.unexpected) as f64 / elapsed.as_secs_f64(),
        p50: quantile(&all.latencies, 0.50),
        p99: quantile(&all.latencies, 0.99),
        p999: quantile(&all.latencies, 0.999),
        max: all.latencies.last().copied().unwrap_or_default(),
        lag_p99: quantile(&lag, 0.99),
        first_unexpected: all.first_unexpected,
    })
}

async fn worker(
    addr: SocketAddr,
    conn: Conn,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>,
    workload: Arc<Workload>,
    drain_deadline: Instant,
) -> WorkerResult {
    let mut r = WorkerResult::default();
    let mut conn = Some(conn);
    loop {
        let at = {
            let mut q = rx.lock().await;
            match q.recv().await {
                Some(at) => at,
                None => break,
            }
        };
        if Instant::now() > drain_deadline {
            r.failed += 1;
            continue;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(addr).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    r.failed += 1;
                    continue;
                }
            },
        };
        // Late (queued behind a slow answer): timed from the schedule, which is the point of
        // an open loop. Early (within the dispatch quantum): timed from the actual send.
        let from = at.min(Instant::now());
        let sent = match workload.request() {
            Ok(req) => c.send(req).await,
            Err(e) => Err(e),
        };
        let done = Instant::now();
        match sent {
            Ok((status, body)) => {
                r.latencies.push(done.saturating_duration_since(from));
                r.last_done = Some(done);
                if status == workload.scenario.expected() {
                    r.ok += 1;
                } else {
                    r.unexpected += 1;
                    if r.first_unexpected.is_none() {
                        let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
                        r.first_unexpected = Some(format!("{status} {text}"));
                    }
                }
            }
            Err(_) => {
                r.failed += 1;
                conn = None;
            }
        }
    }
    r
}

/// Opens `n` keep-alive connections (`parallel` at a time), sends one request of `workload` on
/// each and keeps them open. Returns the open connections and how many could not be opened.
pub async fn hold(
    addr: SocketAddr,
    n: usize,
    workload: Arc<Workload>,
    parallel: usize,
) -> (Vec<Conn>, usize) {
    let results: Vec<Result<Conn, BoxError>> = futures::stream::iter(0..n)
        .map(|_| {
            let wl = Arc::clone(&workload);
            async move {
                let mut c = Conn::connect(addr).await?;
                let (status, _) = c.send(wl.request()?).await?;
                if !status.is_success() {
                    return Err(BoxError::from(format!("status {status}")));
                }
                Ok(c)
            }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0;
    for r in results {
        match r {
            Ok(c) => conns.push(c),
            Err(_) => failed += 1,
        }
    }
    (conns, failed)
}

/// `http://host:port[/...]` or `host:port` to a socket address.
pub fn parse_addr(url: &str) -> Result<SocketAddr, BoxError> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let mut addrs = std::net::ToSocketAddrs::to_socket_addrs(hostport)?;
    addrs
        .next()
        .ok_or_else(|| format!("{url} resolves to no address").into())
}

/// Non-empty lines of a file.
pub fn read_lines(path: &Path) -> Result<Vec<String>, BoxError> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

#[derive(clap::Args)]
pub struct WorkloadArgs {
    /// Base URL of the server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Merchant API key (or TG_API_KEY).
    #[arg(long, env = "TG_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Token ids, one a line (get, cryptogram).
    #[arg(long)]
    ids_file: Option<PathBuf>,
    /// Already tokenized cards, one a line (tokenize-known).
    #[arg(long)]
    pans_file: Option<PathBuf>,
}

impl WorkloadArgs {
    fn workload(&self) -> Result<(SocketAddr, Arc<Workload>), BoxError> {
        let read = |p: &Option<PathBuf>| p.as_deref().map(read_lines).transpose();
        Ok((
            parse_addr(&self.url)?,
            Arc::new(Workload {
                scenario: self.scenario,
                api_key: self.api_key.clone(),
                ids: read(&self.ids_file)?.unwrap_or_default(),
                pans: read(&self.pans_file)?.unwrap_or_default(),
            }),
        ))
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Requests per second, scheduled whatever the server does.
    #[arg(long)]
    rate: f64,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Keep-alive connections draining the schedule.
    #[arg(long, default_value_t = 32)]
    connections: usize,
}

pub async fn run(args: Args) -> Result<(), BoxError> {
    let (addr, wl) = args.workload.workload()?;
    let r = open_loop(addr, wl, args.rate, args.duration, args.connections).await?;
    println!("{}: {r}", args.workload.scenario.label());
    Ok(())
}

#[derive(clap::Args)]
pub struct HoldArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// How long to keep them open.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    hold: Duration,
}

pub async fn run_hold(args: HoldArgs) -> Result<(), BoxError> {
    let (addr, wl) = args.workload.workload()?;
    let (conns, failed) = hold(addr, args.connections, wl, 256).await;
    println!(
        "holding {} idle keep-alive connections ({failed} failed) for {:?}",
        conns.len(),
        args.hold
    );
    tokio::time::sleep(args.hold).await;
    drop(conns);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_pans_pass_luhn() {
        for _ in 0..1000 {
            let p = random_pan();
            assert_eq!(p.len(), 16);
            assert!(tokengate_cards::luhn_valid(p.as_bytes()), "{p}");
            assert!(p.parse::<tokengate_cards::Pan>().is_ok());
        }
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_micros(500));
        assert_eq!(quantile(&v, 0.99), Duration::from_micros(990));
        assert_eq!(quantile(&v, 0.999), Duration::from_micros(999));
        assert_eq!(quantile(&[], 0.99), Duration::ZERO);
    }
}
