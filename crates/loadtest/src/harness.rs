//! `loadtest`: the whole measurement in one command (`bash scripts/loadtest.sh` builds the release
//! binary, raises the descriptor limit and runs this).
//!
//! One run, on one machine, with the same settings throughout:
//! 1. the bare hyper server ([`super::bare`]): `wrk` peak, open-loop p99 at half that peak,
//!    memory idle and with many idle keep-alive connections;
//! 2. a `redis-server` on a free port (or a three-primary Cluster) and the gateway in sandbox mode
//!    against it (in-process D1 simulator at zero latency) in the shipped configuration: the
//!    defaults of `config/default.toml`, logging included (INFO, an access-log line per request,
//!    JSON lines to a file), except the per-key and per-merchant rate limits, which are off
//!    because one key drives all the load; a merchant is created and cards tokenized through the API;
//! 3. per scenario: `wrk` closed loop for peak throughput and its latency at saturation, then the
//!    open-loop generator ([`super::loadgen`]) at half that peak for the p99 a client sees at a
//!    sustainable load;
//! 4. the bare hyper server again, so drift during the run shows; every gateway figure is stated
//!    as a ratio of the mean of the two bare figures;
//! 5. and, because the host moves throughput by up to a quarter within minutes, a **paired**
//!    ratio: a second bare hyper server stays up (idle) while the gateway runs, and each gateway
//!    `wrk` run is bracketed by a bare `wrk` run of the same length just before and just after
//!    it; each gateway run's ratio is to the mean of its two brackets, and the report gives the
//!    median of those ratios with their spread. Drift slower than a run cancels out of it; a
//!    shift within a pair does not, so the log lists the brackets too.
//!
//! `--scale` runs the vault-size step instead: the vault is filled directly ([`super::fill`]) to
//! each size, and GET throughput and latency, memory and gateway start-up time are measured at
//! each.
//!
//! `--io-floor` runs the I/O-floor step instead ([`io_floor_run`]): `bench-hyper` taking the
//! shape of a new card's I/O (Redis round trips, one HTTP/2 call upstream) without its work, so
//! the CPU that I/O alone costs a server is measured next to the bare ceiling.
//!
//! `--d1-latency` runs the D1-at-real-latency step instead ([`d1_latency_run`]): the simulator in
//! a process of its own answers every call after `--d1-latency-ms`, and new cards and
//! cryptograms are offered open loop at fixed rates; served share, p99, CPU per request on each
//! side and resident memory are reported per rate.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::{Method, StatusCode};
use tokengate::domain::token::MerchantId;
use tokengate::storage::redis::RedisConfig;

use super::loadgen::{self, OpenLoop, Scenario, Workload, ms, tokenize_body};
use super::ports::{free_addr, wait_listening};
use super::{BoxError, client, fill, parse_duration};

#[derive(clap::Args)]
pub struct Args {
    /// Length of each `wrk` run and of each open-loop run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 2)]
    wrk_threads: usize,
    #[arg(long, default_value_t = 64)]
    wrk_connections: usize,
    /// Connections of the open-loop generator.
    #[arg(long, default_value_t = 32)]
    loadgen_connections: usize,
    /// `wrk` runs per scenario; the median (by throughput) is reported, with the spread. On a
    /// machine shared with other work, more runs make the figure steadier.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Do not bracket each gateway `wrk` run with bare hyper runs (the paired ratio): halves the
    /// time of a run, leaves only the before/after ratio.
    #[arg(long)]
    unpaired: bool,
    /// Share of the `wrk` peak the open-loop run is scheduled at.
    #[arg(long, default_value_t = 0.5)]
    open_loop_share: f64,
    /// More open-loop runs per scenario at these shares of its peak (e.g. `0.1,0.25`): latency
    /// against offered load.
    #[arg(long, value_delimiter = ',')]
    curve: Vec<f64>,
    /// Idle keep-alive connections for the memory figure (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Cards tokenized through the API before the runs (targets of GET and cryptogram, and the
    /// known cards of the dedup scenario).
    #[arg(long, default_value_t = 2_000)]
    setup_tokens: usize,
    /// Gateway scenarios to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// Also run the gateway scenarios against a three-primary Redis Cluster.
    #[arg(long)]
    cluster: bool,
    /// Also run them with the D1 simulator in a process of its own (`tokengate d1-sim`), so the
    /// gateway's CPU per request is measured without the simulator's share.
    #[arg(long)]
    external_sim: bool,
    /// Run the vault-size step (GET, memory and start-up at each of `--scale-sizes`) instead.
    #[arg(long)]
    scale: bool,
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    scale_sizes: Vec<u64>,
    /// Run the I/O-floor step instead: bare hyper plain, then with Redis round trips and an
    /// HTTP/2 call upstream per request (the I/O shape of a new card), CPU per request of each.
    #[arg(long)]
    io_floor: bool,
    /// Run the D1-at-real-latency step instead: simulator in its own process with
    /// `--d1-latency-ms` on every call, open-loop new cards and cryptograms at fixed rates
    /// (`--duration` each), Redis standalone.
    #[arg(long)]
    d1_latency: bool,
    #[arg(long, default_value_t = 150)]
    d1_latency_ms: u64,
    /// Open-loop rates (per second) of new cards for `--d1-latency`, each a run of its own
    /// (0 skips the scenario).
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    d1_new_rates: Vec<f64>,
    /// Open-loop rates (per second) of cryptograms for `--d1-latency` (0 skips the scenario).
    #[arg(long, value_delimiter = ',', default_value = "3000")]
    d1_cryptogram_rates: Vec<f64>,
    /// Gateway start-ups timed at each vault size.
    #[arg(long, default_value_t = 3)]
    startups: usize,
    /// Directory of the `wrk` scripts.
    #[arg(long)]
    scripts_dir: Option<PathBuf>,
    /// Logs, data files and raw outputs (default: target/loadtest/<unix time>).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also write the report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Extra gateway settings, `TOKENGATE__SECTION__KEY=value`, applied after the harness's own
    /// (e.g. to measure rate limits, which the harness turns off): repeatable.
    #[arg(long = "gateway-env", value_parser = parse_env_pair)]
    gateway_env: Vec<(String, String)>,
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if k.starts_with("TOKENGATE") => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}`: expected TOKENGATE__SECTION__KEY=value")),
    }
}

const DEFAULT_SCENARIOS: [Scenario; 5] = [
    Scenario::Get,
    Scenario::TokenizeKnown,
    Scenario::Cryptogram,
    Scenario::TokenizeNew,
    Scenario::TokenizeNewIdem,
];

// --- processes -----------------------------------------------------------------------------------

/// A child process, killed when dropped (so an error anywhere leaves nothing running).
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory and its peak, KiB, from `/proc/<pid>/status`.
    fn rss_kib(&self) -> Option<Rss> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let field = |name: &str| -> Option<u64> {
            s.lines()
                .find(|l| l.starts_with(name))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        Some(Rss {
            now: field("VmRSS:")?,
            peak: field("VmHWM:")?,
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy)]
struct Rss {
    now: u64,
    peak: u64,
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn free_port() -> Result<u16, BoxError> {
    Ok(free_addr()?.port())
}

fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

// --- redis -----------------------------------------------------------------------------------------

/// Redis as the gateway will use it: one server, or three cluster primaries.
struct Redis {
    nodes: Vec<(Proc, u16)>,
    cluster: bool,
}

impl Redis {
    fn spawn_node(dir: &Path, extra: &[String]) -> Result<(Proc, u16), BoxError> {
        for _ in 0..5 {
            let port = free_port()?;
            let node_dir = dir.join(format!("redis-{port}"));
            std::fs::create_dir_all(&node_dir)?;
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start redis-server (is it installed?): {e}"))?;
            let mut p = Proc {
                name: format!("redis-server :{port}"),
                child,
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if wait_listening(&[addr], Duration::from_secs(5), &mut p.child) {
                return Ok((p, port));
            }
        }
        Err("redis-server did not start".into())
    }

    fn standalone(dir: &Path) -> Result<Redis, BoxError> {
        Ok(Redis {
            nodes: vec![Self::spawn_node(dir, &[])?],
            cluster: false,
        })
    }

    /// Three primaries joined with `redis-cli --cluster create`, no replicas (as the
    /// integration tests' `RedisCluster` helper does).
    fn cluster(dir: &Path) -> Result<Redis, BoxError> {
        for _ in 0..3 {
            let mut nodes = Vec::new();
            for _ in 0..3 {
                // An explicit bus port: the default (port + 10000) can exceed 65535.
                let bus = free_port()?.to_string();
                let extra: Vec<String> = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "5000",
                ]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
                nodes.push(Self::spawn_node(dir, &extra)?);
            }
            let r = Redis {
                nodes,
                cluster: true,
            };
            let ok = Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(r.addrs())
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if r.nodes.iter().all(|(_, p)| {
                    redis_cli(*p, &["cluster", "info"])
                        .is_some_and(|s| s.contains("cluster_state:ok"))
                }) {
                    return Ok(r);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Err("could not start a redis cluster".into())
    }

    fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(_, p)| format!("127.0.0.1:{p}"))
            .collect()
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.nodes[0].1)
    }

    /// The gateway's storage settings for this Redis.
    fn gateway_env(&self) -> Vec<(String, String)> {
        if self.cluster {
            let list: Vec<String> = self.addrs().iter().map(|a| format!("\"{a}\"")).collect();
            vec![(
                "TOKENGATE__STORAGE__REDIS_CLUSTER_NODES".into(),
                format!("[{}]", list.join(",")),
            )]
        } else {
            vec![("TOKENGATE__STORAGE__REDIS_URL".into(), self.url())]
        }
    }

    fn store_config(&self) -> RedisConfig {
        let nodes = if self.cluster {
            self.addrs()
        } else {
            Vec::new()
        };
        fill::redis_config(&self.url(), &nodes, "tg")
    }

    /// `used_memory` summed over the nodes, and the number of keys.
    fn memory_and_keys(&self) -> (u64, u64) {
        let mut mem = 0;
        let mut keys = 0;
        for (_, p) in &self.nodes {
            if let Some(info) = redis_cli(*p, &["info", "memory"]) {
                mem += info_field(&info, "used_memory").unwrap_or(0);
            }
            if let Some(n) = redis_cli(*p, &["dbsize"]) {
                keys += n.trim().parse::<u64>().unwrap_or(0);
            }
        }
        (mem, keys)
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|(p, _)| p.pid()).collect()
    }

    fn label(&self) -> &'static str {
        if self.cluster {
            "Redis Cluster (3 primaries)"
        } else {
            "standalone Redis"
        }
    }
}

// --- the run -----------------------------------------------------------------------------------------

struct Ctx {
    args: Args,
    exe: PathBuf,
    /// The `tokengate` binary (gateway and `d1-sim`).
    gateway_exe: PathBuf,
    scripts: PathBuf,
    work: PathBuf,
    /// Files the `wrk` scripts read.
    api_key: String,
    ids_file: PathBuf,
    pans_file: PathBuf,
    /// Notes for the report (warnings about the run itself).
    notes: Vec<String>,
    gateways_started: usize,
    /// Whose CPU time [`Ctx::measure`] charges to the requests.
    watch: Vec<Watched>,
}

/// The D1 simulator in a process of its own.
struct ExternalSim {
    proc: Proc,
    base_url: String,
    keys_dir: PathBuf,
    /// Its control API (plain HTTP): `/sim/faults`.
    control: SocketAddr,
}

/// A running gateway.
struct Gateway {
    proc: Proc,
    addr: SocketAddr,
    startup: Duration,
}

/// Peak throughput and latency at saturation, from `wrk`.
#[derive(Debug, Clone, Default)]
struct Wrk {
    requests: u64,
    rps: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    non2xx: u64,
    socket_errors: u64,
}

/// One line of the table.
struct Row {
    label: String,
    /// The median `wrk` run, and the lowest and highest throughput of all runs.
    wrk: Wrk,
    spread: Option<(f64, f64)>,
    /// Each `wrk` run's throughput over the mean of the bare hyper runs just before and just
    /// after it (empty when the run was not paired), in run order.
    paired: Vec<f64>,
    open: Option<OpenLoop>,
    /// The `--curve` runs: (share of the peak, result).
    curve: Vec<(f64, OpenLoop)>,
    /// CPU per request during the `wrk` run and during the open-loop run.
    cpu_peak: CpuUse,
    cpu_half: Option<CpuUse>,
}

/// Processes whose CPU time is charged per request: the server, and Redis.
struct Watched {
    role: &'static str,
    pids: Vec<u32>,
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU ticks a process used so far (all its threads).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Busy and total ticks of the whole machine, from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

struct CpuSnapshot {
    per_role: Vec<u64>,
    machine: Option<(u64, u64)>,
}

/// CPU microseconds per request by role, and how busy the machine was.
#[derive(Debug, Clone, Default)]
struct CpuUse {
    per_request_us: Vec<(&'static str, f64)>,
    machine_busy: Option<f64>,
}

impl CpuSnapshot {
    fn take(watch: &[Watched]) -> CpuSnapshot {
        CpuSnapshot {
            per_role: watch
                .iter()
                .map(|w| w.pids.iter().filter_map(|p| cpu_ticks(*p)).sum())
                .collect(),
            machine: machine_ticks(),
        }
    }

    fn since(&self, watch: &[Watched], requests: u64) -> CpuUse {
        let now = CpuSnapshot::take(watch);
        let tck = clock_ticks();
        let per_request_us = watch
            .iter()
            .zip(self.per_role.iter().zip(&now.per_role))
            .map(|(w, (a, b))| {
                let secs = b.saturating_sub(*a) as f64 / tck;
                (w.role, secs * 1e6 / requests.max(1) as f64)
            })
            .collect();
        let machine_busy = match (self.machine, now.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some(b1.saturating_sub(b0) as f64 / (t1 - t0) as f64)
            }
            _ => None,
        };
        CpuUse {
            per_request_us,
            machine_busy,
        }
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .per_request_us
            .iter()
            .map(|(role, us)| format!("{role} {us:.0} us"))
            .collect();
        write!(f, "{}", parts.join(" / "))?;
        if let Some(b) = self.machine_busy {
            write!(f, " (machine {:.0}% busy)", b * 100.0)?;
        }
        Ok(())
    }
}

fn us(v: &str) -> Duration {
    Duration::from_micros(v.parse::<f64>().unwrap_or(0.0) as u64)
}

impl Ctx {
    fn new(args: Args) -> Result<Ctx, BoxError> {
        let exe = std::env::current_exe()?;
        // The gateway is the `tokengate` binary built next to this one (same target directory).
        let gateway_exe = exe.with_file_name(format!("tokengate{}", std::env::consts::EXE_SUFFIX));
        if !gateway_exe.exists() {
            return Err(format!(
                "{} not found: build it first (cargo build --release --bin tokengate)",
                gateway_exe.display()
            )
            .into());
        }
        // The repository root: this crate lives in crates/loadtest.
        let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
        let scripts = args
            .scripts_dir
            .clone()
            .unwrap_or_else(|| root.join("loadtest"));
        if !scripts.join("common.lua").exists() {
            return Err(format!(
                "wrk scripts not found in {} (--scripts-dir)",
                scripts.display()
            )
            .into());
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let work = args
            .work_dir
            .clone()
            .unwrap_or_else(|| root.join("target/loadtest").join(stamp.to_string()));
        std::fs::create_dir_all(&work)?;
        Ok(Ctx {
            ids_file: work.join("ids.txt"),
            pans_file: work.join("pans.txt"),
            args,
            exe,
            gateway_exe,
            scripts,
            work,
            api_key: String::new(),
            notes: Vec::new(),
            gateways_started: 0,
            watch: Vec::new(),
        })
    }

    fn say(&self, msg: impl std::fmt::Display) {
        eprintln!("[loadtest] {msg}");
    }

    fn start_bare(&self) -> Result<(Proc, SocketAddr), BoxError> {
        self.start_bench_hyper(&[])
    }

    /// `bench-hyper` with extra arguments (its I/O shape: see [`super::bare`]). Its stderr,
    /// where a shaped server notes why a request failed, is kept as
    /// [`Ctx::bench_hyper_log`].
    fn start_bench_hyper(&self, extra: &[String]) -> Result<(Proc, SocketAddr), BoxError> {
        let addr = free_addr()?;
        let log = std::fs::File::create(self.bench_hyper_log(addr))?;
        let child = Command::new(&self.exe)
            .arg("bench-hyper")
            .arg("--listen")
            .arg(addr.to_string())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let mut p = Proc {
            name: "bench-hyper".into(),
            child,
        };
        if !wait_listening(&[addr], Duration::from_secs(10), &mut p.child) {
            return Err("bench-hyper did not start".into());
        }
        Ok((p, addr))
    }

    /// Where the stderr of the `bench-hyper` listening on `addr` goes.
    fn bench_hyper_log(&self, addr: SocketAddr) -> PathBuf {
        self.work.join(format!("bench-hyper-{}.log", addr.port()))
    }

    /// Starts the gateway against `redis` and waits for `/readyz` 200; the start-up time runs
    /// from the spawn to that answer.
    async fn start_gateway(&mut self, redis: &Redis) -> Result<Gateway, BoxError> {
        self.start_gateway_with(redis, None).await
    }

    /// Starts `tokengate d1-sim` on free ports; its development keys are written to
    /// `<work>/sim/sim-keys`, where the gateway reads its half (`d1.keys_dir`).
    fn start_external_sim(&self) -> Result<ExternalSim, BoxError> {
        let sim = super::ports::start_d1_sim(
            &self.gateway_exe,
            &self.work.join("sim"),
            &self.work.join("d1-sim.log"),
        )?;
        Ok(ExternalSim {
            proc: Proc {
                name: "tokengate d1-sim".into(),
                child: sim.child,
            },
            base_url: format!("https://{}/authz/v1", sim.api),
            keys_dir: sim.keys_dir,
            control: sim.control,
        })
    }

    async fn start_gateway_with(
        &mut self,
        redis: &Redis,
        sim: Option<&ExternalSim>,
    ) -> Result<Gateway, BoxError> {
        let addr = free_addr()?;
        self.gateways_started += 1;
        let log = std::fs::File::create(
            self.work
                .join(format!("gateway-{}.log", self.gateways_started)),
        )?;
        // Stdout as shipped: a file, so `log.format = "auto"` writes JSON lines, through the
        // background writer, with every access-log line (a discarded stdout or a higher log
        // level would measure a configuration nobody runs; docs/performance.md).
        let access_log = std::fs::File::create(
            self.work
                .join(format!("gateway-{}.stdout.jsonl", self.gateways_started)),
        )?;
        let mut cmd = Command::new(&self.gateway_exe);
        cmd.arg("serve")
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .env("TOKENGATE__SERVER__LISTEN", addr.to_string())
            .env("TOKENGATE__SIM__LISTEN", free_addr()?.to_string())
            .env("TOKENGATE__SIM__CONTROL_LISTEN", free_addr()?.to_string())
            // One merchant key drives all the load: per-key limits would measure the limiter.
            .env("TOKENGATE__RATE_LIMIT__PER_KEY_PER_S", "0")
            .env("TOKENGATE__RATE_LIMIT__PER_MERCHANT_PER_S", "0")
            .env("TOKENGATE__STORAGE__DATA_DIR", self.work.join("data"))
            .envs(redis.gateway_env())
            .envs(self.args.gateway_env.iter().cloned())
            .stdout(access_log)
            .stderr(log);
        if let Some(sim) = sim {
            cmd.env("TOKENGATE__D1__BASE_URL", &sim.base_url)
                .env("TOKENGATE__D1__KEYS_DIR", &sim.keys_dir);
        }
        let started = Instant::now();
        let child = cmd.spawn()?;
        let mut proc = Proc {
            name: "tokengate serve".into(),
            child,
        };
        let deadline = started + Duration::from_secs(60);
        loop {
            if let Ok((StatusCode::OK, _)) =
                client::once(addr, Method::GET, "/readyz", None, None).await
            {
                break;
            }
            if !proc.alive() || Instant::now() > deadline {
                return Err(format!(
                    "the gateway did not become ready; see {}",
                    self.work
                        .join(format!("gateway-{}.log", self.gateways_started))
                        .display()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let startup = started.elapsed();
        Ok(Gateway {
            proc,
            addr,
            startup,
        })
    }

    /// Creates a merchant; returns its id and API key.
    async fn create_merchant(&mut self, gw: &Gateway) -> Result<MerchantId, BoxError> {
        let (status, body) = client::once(
            gw.addr,
            Method::POST,
            "/v1/merchants",
            Some(tokengate::config::SANDBOX_ADMIN_TOKEN),
            Some(bytes::Bytes::from_static(br#"{"name":"loadtest"}"#)),
        )
        .await?;
        if status != StatusCode::CREATED {
            return Err(format!("creating the merchant: {status}").into());
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let id = v["id"].as_str().and_then(MerchantId::parse);
        let key = v["apiKey"].as_str();
        match (id, key) {
            (Some(id), Some(key)) => {
                self.api_key = key.to_owned();
                Ok(id)
            }
            _ => Err("merchant answer without id or apiKey".into()),
        }
    }

    /// Tokenizes `n` fresh cards through the API; writes the ids of the `ACTIVE` tokens and the
    /// cards to the files the scripts read.
    async fn tokenize_cards(&mut self, gw: &Gateway, n: usize) -> Result<(), BoxError> {
        let addr = gw.addr;
        let key = self.api_key.clone();
        let results: Vec<Result<(String, String, bool), BoxError>> = futures::stream::iter(0..n)
            .map(|_| {
                let key = key.clone();
                async move {
                    let pan = loadgen::random_pan();
                    let (status, body) = client::once(
                        addr,
                        Method::POST,
                        "/v1/tokens",
                        Some(&key),
                        Some(tokenize_body(&pan)),
                    )
                    .await?;
                    if status != StatusCode::CREATED {
                        return Err(BoxError::from(format!(
                            "tokenize during set-up: {status} {}",
                            String::from_utf8_lossy(&body)
                        )));
                    }
                    let v: serde_json::Value = serde_json::from_slice(&body)?;
                    let id = v["id"].as_str().unwrap_or_default().to_owned();
                    Ok((id, pan, v["status"] == "ACTIVE"))
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut ids = Vec::new();
        let mut pans = Vec::new();
        for r in results {
            let (id, pan, active) = r?;
            if active {
                ids.push(id);
            }
            pans.push(pan);
        }
        if ids.is_empty() {
            return Err("no token became ACTIVE during set-up".into());
        }
        if ids.len() < pans.len() {
            self.notes.push(format!(
                "set-up: {} of {} tokens were not ACTIVE and are not used as GET/cryptogram targets",
                pans.len() - ids.len(),
                pans.len()
            ));
        }
        std::fs::write(&self.ids_file, ids.join("\n") + "\n")?;
        std::fs::write(&self.pans_file, pans.join("\n") + "\n")?;
        Ok(())
    }

    fn workload(&self, scenario: Scenario) -> Result<Arc<Workload>, BoxError> {
        let read = |p: &Path| loadgen::read_lines(p).or_else(|_| Ok::<_, BoxError>(Vec::new()));
        Ok(Arc::new(Workload {
            scenario,
            api_key: Some(self.api_key.clone()),
            ids: read(&self.ids_file)?,
            pans: read(&self.pans_file)?,
        }))
    }

    /// Closed-loop peak with `wrk` and the scenario's script.
    async fn wrk(&self, addr: SocketAddr, scenario: Scenario, tag: &str) -> Result<Wrk, BoxError> {
        let secs = self.args.duration.as_secs().max(1);
        let script = self.scripts.join(scenario.wrk_script());
        let out = tokio::process::Command::new("wrk")
            .arg(format!("-t{}", self.args.wrk_threads))
            .arg(format!("-c{}", self.args.wrk_connections))
            .arg(format!("-d{secs}s"))
            .arg("--timeout")
            .arg("10s")
            .arg("-s")
            .arg(&script)
            .arg(format!("http://{addr}"))
            .env("TG_API_KEY", &self.api_key)
            .env("TG_IDS_FILE", &self.ids_file)
            .env("TG_PANS_FILE", &self.pans_file)
            .output()
            .await
            .map_err(|e| format!("cannot run wrk (is it installed?): {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let name = format!("wrk-{tag}-{:?}.txt", scenario).to_lowercase();
        std::fs::write(
            self.work.join(name),
            format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)),
        )?;
        let line = stdout
            .lines()
            .find(|l| l.starts_with("WRK_RESULT"))
            .ok_or_else(|| format!("wrk printed no result line: {stdout}"))?;
        let mut w = Wrk::default();
        for kv in line.split_whitespace().skip(1) {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            match k {
                "requests" => w.requests = v.parse().unwrap_or(0),
                "rps" => w.rps = v.parse().unwrap_or(0.0),
                "p50_us" => w.p50 = us(v),
                "p99_us" => w.p99 = us(v),
                "p999_us" => w.p999 = us(v),
                "non2xx" => w.non2xx = v.parse().unwrap_or(0),
                "connect_err" | "read_err" | "write_err" | "timeout_err" => {
                    w.socket_errors += v.parse::<u64>().unwrap_or(0)
                }
                _ => {}
            }
        }
        Ok(w)
    }

    /// One bare hyper `wrk` run of a pair: its throughput.
    async fn bracket(
        &self,
        bare: SocketAddr,
        tag: &str,
        scenario: Scenario,
        i: usize,
    ) -> Result<f64, BoxError> {
        // Named after the scenario it brackets, so the next scenario's brackets do not
        // overwrite its files.
        let name = format!("{tag}-{scenario:?}-bracket-{i}").to_lowercase();
        let w = self.wrk(bare, Scenario::Bare, &name).await?;
        if w.non2xx > 0 || w.socket_errors > 0 {
            return Err(format!(
                "bare hyper bracket run: {} non-2xx answers, {} socket errors",
                w.non2xx, w.socket_errors
            )
            .into());
        }
        Ok(w.rps)
    }

    /// `wrk` peak, then the open-loop run at a share of it. With `pair_with` (a bare hyper
    /// server), every `wrk` run is bracketed by a bare run just before and just after it, so
    /// its ratio to bare hyper is taken within seconds, not minutes (see the module docs).
    async fn measure(
        &mut self,
        addr: SocketAddr,
        scenario: Scenario,
        label: String,
        tag: &str,
        pair_with: Option<SocketAddr>,
    ) -> Result<Row, BoxError> {
        self.say(format!("{label}: wrk peak ..."));
        let mut runs = Vec::new();
        // Bare hyper's throughput at each bracket: one more than the gateway runs.
        let mut brackets: Vec<f64> = Vec::new();
        let repeats = self.args.repeats.max(1);
        for i in 0..repeats {
            if let Some(bare) = pair_with {
                brackets.push(self.bracket(bare, tag, scenario, i).await?);
            }
            let before = CpuSnapshot::take(&self.watch);
            let w = self.wrk(addr, scenario, &format!("{tag}-{i}")).await?;
            let cpu = before.since(&self.watch, w.requests);
            if self.args.repeats > 1 {
                self.say(format!("  run {}: {:.0} req/s", i + 1, w.rps));
            }
            runs.push((w, cpu));
        }
        let mut paired = Vec::new();
        if let Some(bare) = pair_with {
            brackets.push(self.bracket(bare, tag, scenario, repeats).await?);
            for (i, (w, _)) in runs.iter().enumerate() {
                let mean = (brackets[i] + brackets[i + 1]) / 2.0;
                if mean > 0.0 {
                    paired.push(w.rps / mean);
                }
            }
            self.say(format!(
                "  paired with bare hyper: {}",
                joined(&paired, |r| format!("{r:.3}x"))
            ));
            // The brackets themselves: a pair whose two bare runs differ by a fifth took its
            // gateway run across one of the host's throughput shifts (docs/performance.md,
            // "tenth session"), and its ratio says more about the host than the gateway.
            self.say(format!(
                "  bare hyper brackets (req/s): {}",
                joined(&brackets, |b| format!("{b:.0}"))
            ));
        }
        runs.sort_by(|a, b| a.0.rps.total_cmp(&b.0.rps));
        let spread = match (runs.first(), runs.last()) {
            (Some(lo), Some(hi)) if runs.len() > 1 => Some((lo.0.rps, hi.0.rps)),
            _ => None,
        };
        let (wrk, cpu_peak) = runs.swap_remove(runs.len() / 2);
        self.say(format!(
            "  {:.0} req/s, p50 {} p99 {} p99.9 {} (non-2xx {}, socket errors {})",
            wrk.rps,
            ms(wrk.p50),
            ms(wrk.p99),
            ms(wrk.p999),
            wrk.non2xx,
            wrk.socket_errors
        ));
        if wrk.non2xx > 0 || wrk.socket_errors > 0 {
            self.notes.push(format!(
                "{label}: wrk saw {} non-2xx answers and {} socket errors of {} requests",
                wrk.non2xx, wrk.socket_errors, wrk.requests
            ));
        }
        let mut cpu_half = None;
        let open = if self.args.open_loop_share > 0.0 && wrk.rps > 0.0 {
            let rate = wrk.rps * self.args.open_loop_share;
            self.say(format!("{label}: open loop at {rate:.0}/s ..."));
            // The generator runs in this process: its share of the cores shows next to the
            // server's.
            let watch: Vec<Watched> = self
                .watch
                .iter()
                .map(|w| Watched {
                    role: w.role,
                    pids: w.pids.clone(),
                })
                .chain(std::iter::once(Watched {
                    role: "generator",
                    pids: vec![std::process::id()],
                }))
                .collect();
            // As many runs as of wrk; the one with the median p99 is reported, so one run
            // disturbed by other work on the machine does not decide the figure.
            let mut runs = Vec::new();
            for _ in 0..self.args.repeats.max(1) {
                let before = CpuSnapshot::take(&watch);
                let o = loadgen::open_loop(
                    addr,
                    self.workload(scenario)?,
                    rate,
                    self.args.duration,
                    self.args.loadgen_connections,
                )
                .await?;
                let cpu = before.since(&watch, o.ok + o.unexpected);
                self.say(format!("  {o}"));
                runs.push((o, cpu));
            }
            runs.sort_by_key(|r| r.0.p99);
            let (o, cpu) = runs.swap_remove(runs.len() / 2);
            cpu_half = Some(cpu);
            if o.unexpected > 0 || o.failed > 0 {
                self.notes.push(format!(
                    "{label}: open loop got {} unexpected answers and {} failures of {} ({})",
                    o.unexpected,
                    o.failed,
                    o.scheduled,
                    o.first_unexpected.as_deref().unwrap_or("-")
                ));
            }
            Some(o)
        } else {
            None
        };
        let mut curve = Vec::new();
        for &share in &self.args.curve {
            if !(share > 0.0 && wrk.rps > 0.0) {
                continue;
            }
            let rate = wrk.rps * share;
            self.say(format!("{label}: open loop at {rate:.0}/s ..."));
            let o = loadgen::open_loop(
                addr,
                self.workload(scenario)?,
                rate,
                self.args.duration,
                self.args.loadgen_connections,
            )
            .await?;
            self.say(format!("  {o}"));
            curve.push((share, o));
        }
        self.say(format!("  CPU per request: {cpu_peak}"));
        Ok(Row {
            label,
            wrk,
            spread,
            paired,
            open,
            curve,
            cpu_peak,
            cpu_half,
        })
    }

    /// Opens the idle connections against `addr` and reads `proc`'s memory while they are open.
    async fn rss_with_idle_connections(
        &mut self,
        proc: &Proc,
        addr: SocketAddr,
        scenario: Scenario,
    ) -> Result<Option<(usize, Rss)>, BoxError> {
        let mut n = self.args.idle_connections;
        if n == 0 {
            return Ok(None);
        }
        if let Some(limit) = open_files_limit()
            && limit < (n as u64) + 200
        {
            let fit = limit.saturating_sub(200) as usize;
            self.notes.push(format!(
                "the descriptor limit ({limit}) allowed only {fit} of {n} idle connections; run through scripts/loadtest.sh, which raises it"
            ));
            n = fit;
        }
        self.say(format!("opening {n} idle keep-alive connections ..."));
        let (conns, failed) = loadgen::hold(addr, n, self.workload(scenario)?, 128).await;
        if failed > 0 {
            self.notes.push(format!(
                "{failed} of {n} idle connections could not be opened"
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = proc.rss_kib();
        let held = conns.len();
        drop(conns);
        // Let the server notice the closes before the next step.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(rss.map(|r| (held, r)))
    }
}

fn open_files_limit() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn machine_line() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| info_field(&s.replace(" kB", ""), "MemTotal"))
        .map(|k| format!(", {:.0} GiB RAM", k as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("nproc {cpus}, {model}, Linux {kernel}{mem}")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn tool_version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            s.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_else(|_| format!("{cmd}: not found"))
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn table_header(out: &mut String) {
    let _ = writeln!(
        out,
        "| scenario | req/s (wrk; median, min-max of runs) | x bare hyper (before/after mean) | x bare hyper, paired (median; min-max) | p50 | p99 | p99.9 | p99 at half peak (rate) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
}

fn table_row(out: &mut String, r: &Row, baseline: f64) {
    let half = r
        .open
        .as_ref()
        .map(|o| format!("{} ({}/s)", ms(o.p99), thousands(o.target_rate)))
        .unwrap_or_else(|| "-".into());
    let ratio = if baseline > 0.0 {
        format!("{:.3}", r.wrk.rps / baseline)
    } else {
        "-".into()
    };
    let rps = match r.spread {
        Some((lo, hi)) => format!(
            "{} ({}-{})",
            thousands(r.wrk.rps),
            thousands(lo),
            thousands(hi)
        ),
        None => thousands(r.wrk.rps),
    };
    let paired = paired_cell(&r.paired);
    let _ = writeln!(
        out,
        "| {} | {rps} | {ratio} | {paired} | {} | {} | {} | {half} |",
        r.label,
        ms(r.wrk.p50),
        ms(r.wrk.p99),
        ms(r.wrk.p999),
    );
}

/// `values`, each formatted by `fmt`, separated by commas (for the log).
fn joined(values: &[f64], fmt: impl Fn(&f64) -> String) -> String {
    values.iter().map(fmt).collect::<Vec<_>>().join(", ")
}

/// The paired ratios of a row: their median, and their spread when there are several.
fn paired_cell(ratios: &[f64]) -> String {
    let mut sorted = ratios.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.as_slice() {
        [] => "-".into(),
        [one] => format!("{one:.3}"),
        [lo, .., hi] => format!("{:.3} ({lo:.3}-{hi:.3})", median(&sorted)),
    }
}

/// The median of sorted values (the mean of the middle two for an even count).
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// CPU time per request by process, at peak and at half peak: the basis for sizing.
fn cpu_table(out: &mut String, rows: &[&Row]) {
    let _ = writeln!(
        out,
        "\nCPU time per request (microseconds of user + system CPU from /proc/<pid>/stat: server or gateway / Redis), and how busy the whole machine was (load generator included):\n"
    );
    let _ = writeln!(out, "| scenario | at wrk peak | at half peak (open loop) |");
    let _ = writeln!(out, "|---|---|---|");
    for r in rows {
        let half = r
            .cpu_half
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(out, "| {} | {} | {half} |", r.label, r.cpu_peak);
    }
}

fn open_loop_details(out: &mut String, rows: &[&Row], share: f64) {
    let _ = writeln!(
        out,
        "\nOpen-loop runs (latency from the scheduled send time):\n"
    );
    let _ = writeln!(
        out,
        "| scenario | share of peak | scheduled rate | achieved | p50 | p99 | p99.9 | max | unexpected / failed | scheduler lag p99 |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let mut runs: Vec<(f64, &OpenLoop)> = r.curve.iter().map(|(s, o)| (*s, o)).collect();
        if let Some(o) = &r.open {
            runs.push((share, o));
        }
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (share, o) in runs {
            let _ = writeln!(
                out,
                "| {} | {:.0}% | {}/s | {}/s | {} | {} | {} | {} | {} / {} | {} |",
                r.label,
                share * 100.0,
                thousands(o.target_rate),
                thousands(o.achieved_rate),
                ms(o.p50),
                ms(o.p99),
                ms(o.p999),
                ms(o.max),
                o.unexpected,
                o.failed,
                ms(o.lag_p99)
            );
        }
    }
}

pub async fn run(args: Args) -> Result<(), BoxError> {
    let mut ctx = Ctx::new(args)?;
    let report = if ctx.args.io_floor {
        io_floor_run(&mut ctx).await?
    } else if ctx.args.scale {
        scale_run(&mut ctx).await?
    } else if ctx.args.d1_latency {
        d1_latency_run(&mut ctx).await?
    } else {
        main_run(&mut ctx).await?
    };
    println!("{report}");
    let path = ctx
        .args
        .out
        .clone()
        .unwrap_or_else(|| ctx.work.join("report.md"));
    std::fs::write(&path, &report)?;
    ctx.say(format!(
        "report written to {}; logs and raw outputs in {}",
        path.display(),
        ctx.work.display()
    ));
    Ok(())
}

fn preamble(ctx: &Ctx, load_start: &str, title: &str) -> String {
    let mut out = String::new();
    let a = &ctx.args;
    let _ = writeln!(out, "## {title}\n");
    let _ = writeln!(out, "- machine: {}", machine_line());
    let _ = writeln!(
        out,
        "- load average (1/5/15 min) at start: {load_start}; at end: {}",
        loadavg()
    );
    let _ = writeln!(
        out,
        "- tools: {}; {}",
        tool_version("wrk", "-v"),
        tool_version("redis-server", "--version")
    );
    let _ = writeln!(
        out,
        "- peak: `wrk -t{} -c{} -d{}s`, {} run(s) per scenario, the median reported (closed loop; its p50/p99/p99.9 are latencies at saturation); half peak: open loop, {} connections, {:.0}% of that scenario's median wrk peak for {}s, as many runs, the one with the median p99 reported, latency from the scheduled send time",
        a.wrk_threads,
        a.wrk_connections,
        a.duration.as_secs(),
        a.repeats.max(1),
        a.loadgen_connections,
        a.open_loop_share * 100.0,
        a.duration.as_secs()
    );
    let _ = writeln!(
        out,
        "- gateway: release build, sandbox mode (in-process D1 simulator, zero latency), shipped defaults (log level info, access log on, JSON lines to a file, server.max_concurrency 1024) except rate limits off; load generators on the same cores"
    );
    out
}

async fn main_run(ctx: &mut Ctx) -> Result<String, BoxError> {
    let load_start = loadavg();
    let scenarios: Vec<Scenario> = if ctx.args.scenarios.is_empty() {
        DEFAULT_SCENARIOS.to_vec()
    } else {
        ctx.args.scenarios.clone()
    };
    let mut memory: Vec<String> = Vec::new();

    // 1. The ceiling, before.
    ctx.say("bare hyper (before) ...");
    let (bare, bare_addr) = ctx.start_bare()?;
    ctx.watch = vec![Watched {
        role: "server",
        pids: vec![bare.pid()],
    }];
    let bare_idle = bare.rss_kib();
    let bare_before = ctx
        .measure(
            bare_addr,
            Scenario::Bare,
            "bare hyper (before)".into(),
            "before",
            None,
        )
        .await?;
    let bare_conns = ctx
        .rss_with_idle_connections(&bare, bare_addr, Scenario::Bare)
        .await?;
    memory.push(memory_row(
        &bare.name,
        bare_idle,
        None,
        bare_conns,
        bare.rss_kib(),
    ));
    // The same server stays up (idle: no CPU) for the paired brackets of the gateway runs and
    // the "after" figure.
    let pair_with = (!ctx.args.unpaired).then_some(bare_addr);

    // 2. The gateway, per storage shape.
    // (cluster, simulator in its own process)
    let mut shapes = vec![(false, false)];
    if ctx.args.cluster {
        shapes.push((true, false));
    }
    if ctx.args.external_sim {
        shapes.push((false, true));
    }
    let mut sections: Vec<(String, Duration, Vec<Row>)> = Vec::new();
    for (cluster, external) in shapes {
        let redis = if cluster {
            Redis::cluster(&ctx.work)?
        } else {
            Redis::standalone(&ctx.work)?
        };
        let sim = if external {
            Some(ctx.start_external_sim()?)
        } else {
            None
        };
        let section = match &sim {
            Some(_) => format!("{}, D1 simulator in its own process", redis.label()),
            None => redis.label().to_owned(),
        };
        ctx.say(format!("gateway on {section} ..."));
        let gw = ctx.start_gateway_with(&redis, sim.as_ref()).await?;
        ctx.say(format!("  ready in {}", ms(gw.startup)));
        ctx.watch = vec![
            Watched {
                role: "gateway",
                pids: vec![gw.proc.pid()],
            },
            Watched {
                role: "Redis",
                pids: redis.pids(),
            },
        ];
        if let Some(sim) = &sim {
            ctx.watch.push(Watched {
                role: "D1 sim",
                pids: vec![sim.proc.pid()],
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = gw.proc.rss_kib();
        ctx.create_merchant(&gw).await?;
        ctx.say(format!(
            "tokenizing {} cards through the API ...",
            ctx.args.setup_tokens
        ));
        ctx.tokenize_cards(&gw, ctx.args.setup_tokens.max(1))
            .await?;
        let after_setup = gw.proc.rss_kib();
        let conns = ctx
            .rss_with_idle_connections(&gw.proc, gw.addr, Scenario::Get)
            .await?;
        let tag = match (cluster, external) {
            (true, _) => "cluster",
            (false, true) => "external-sim",
            (false, false) => "standalone",
        };
        let mut rows = Vec::new();
        for &s in &scenarios {
            let label = match (cluster, external) {
                (true, _) => format!("{} [cluster]", s.label()),
                (false, true) => format!("{} [sim in own process]", s.label()),
                (false, false) => s.label().to_owned(),
            };
            rows.push(ctx.measure(gw.addr, s, label, tag, pair_with).await?);
        }
        let after_load = gw.proc.rss_kib();
        memory.push(memory_row(
            &format!("gateway ({section})"),
            idle,
            after_setup,
            conns,
            after_load,
        ));
        sections.push((section, gw.startup, rows));
        drop(gw);
        drop(sim);
        drop(redis);
    }

    // 3. The ceiling, after (the same server: it has idled, or served the brackets, since).
    ctx.say("bare hyper (after) ...");
    ctx.watch = vec![Watched {
        role: "server",
        pids: vec![bare.pid()],
    }];
    let bare_after = ctx
        .measure(
            bare_addr,
            Scenario::Bare,
            "bare hyper (after)".into(),
            "after",
            None,
        )
        .await?;
    drop(bare);

    // Report.
    let baseline = (bare_before.wrk.rps + bare_after.wrk.rps) / 2.0;
    let mut out = preamble(ctx, &load_start, "tokengate load test");
    let _ = writeln!(
        out,
        "- bare hyper: {} req/s before the gateway runs, {} after; the first ratio column is of the mean, {} req/s",
        thousands(bare_before.wrk.rps),
        thousands(bare_after.wrk.rps),
        thousands(baseline)
    );
    let _ = writeln!(
        out,
        "- {}\n",
        if ctx.args.unpaired {
            "paired ratios: not taken (--unpaired)"
        } else {
            "paired ratios: each gateway wrk run over the mean of bare hyper wrk runs of the same length just before and just after it (the host's drift between minutes cancels); the median of the runs, with their spread"
        }
    );
    table_header(&mut out);
    table_row(&mut out, &bare_before, baseline);
    table_row(&mut out, &bare_after, baseline);
    let mut all_rows: Vec<&Row> = vec![&bare_before, &bare_after];
    for (_, _, rows) in &sections {
        for r in rows {
            table_row(&mut out, r, baseline);
            all_rows.push(r);
        }
    }
    open_loop_details(&mut out, &all_rows, ctx.args.open_loop_share);
    cpu_table(&mut out, &all_rows);
    let _ = writeln!(out, "\nGateway start-up (spawn to `/readyz` 200):");
    for (label, startup, _) in &sections {
        let _ = writeln!(out, "- {label}: {}", ms(*startup));
    }
    let _ = writeln!(out, "\nResident memory (VmRSS; peak VmHWM in brackets):\n");
    let _ = writeln!(
        out,
        "| process | idle | after set-up | with {} idle keep-alive connections | after the load runs |",
        thousands(ctx.args.idle_connections as f64)
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for m in &memory {
        let _ = writeln!(out, "{m}");
    }
    notes(ctx, &mut out);
    Ok(out)
}

fn memory_row(
    name: &str,
    idle: Option<Rss>,
    after_setup: Option<Rss>,
    conns: Option<(usize, Rss)>,
    after: Option<Rss>,
) -> String {
    let f = |r: Option<Rss>| {
        r.map(|r| format!("{} ({})", mib(r.now), mib(r.peak)))
            .unwrap_or_else(|| "-".into())
    };
    let c = conns
        .map(|(n, r)| {
            let per = idle
                .map(|i| {
                    format!(
                        "; {:.1} KiB per connection",
                        r.now.saturating_sub(after_setup.unwrap_or(i).now) as f64 / n.max(1) as f64
                    )
                })
                .unwrap_or_default();
            format!("{} ({} held{per})", mib(r.now), thousands(n as f64))
        })
        .unwrap_or_else(|| "-".into());
    format!(
        "| {name} | {} | {} | {c} | {} |",
        f(idle),
        f(after_setup),
        f(after)
    )
}

fn notes(ctx: &Ctx, out: &mut String) {
    if ctx.notes.is_empty() {
        let _ = writeln!(
            out,
            "\nNo errors: every wrk request got a 2xx answer and every open-loop request the scenario's expected status."
        );
    } else {
        let _ = writeln!(out, "\nNotes from the run:");
        for n in &ctx.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
}

/// One open-loop run of the D1-latency step.
struct D1Run {
    scenario: Scenario,
    connections: usize,
    open: OpenLoop,
    cpu: CpuUse,
    gateway_rss: Option<Rss>,
    sim_rss: Option<Rss>,
}

impl D1Run {
    fn served(&self) -> f64 {
        self.open.ok as f64 / self.open.scheduled.max(1) as f64
    }

    /// The issue 13 bar: at least 99% served, p99 at most 250 ms.
    fn meets(&self) -> bool {
        self.served() >= 0.99 && self.open.p99 <= Duration::from_millis(250)
    }
}

/// D1 at real latency: the simulator in its own process answers every call after
/// `--d1-latency-ms`, and each rate of `--d1-new-rates` and `--d1-cryptogram-rates` is offered
/// open loop for `--duration`. The gateway runs its shipped `[d1]` settings.
async fn d1_latency_run(ctx: &mut Ctx) -> Result<String, BoxError> {
    let load_start = loadavg();
    let latency = Duration::from_millis(ctx.args.d1_latency_ms);
    let redis = Redis::standalone(&ctx.work)?;
    let sim = ctx.start_external_sim()?;
    ctx.say("gateway, D1 simulator in its own process ...");
    let gw = ctx.start_gateway_with(&redis, Some(&sim)).await?;
    ctx.create_merchant(&gw).await?;
    ctx.say(format!(
        "tokenizing {} cards through the API (no latency yet) ...",
        ctx.args.setup_tokens
    ));
    ctx.tokenize_cards(&gw, ctx.args.setup_tokens.max(1))
        .await?;
    let faults = format!(r#"{{"latency":{{"fixedMs":{}}}}}"#, ctx.args.d1_latency_ms);
    let (status, body) = client::once(
        sim.control,
        Method::PUT,
        "/sim/faults",
        None,
        Some(bytes::Bytes::from(faults)),
    )
    .await?;
    if !status.is_success() {
        return Err(format!(
            "setting the simulator's latency: {status} {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    ctx.say(format!(
        "simulator latency set to {} ms",
        latency.as_millis()
    ));
    let watch = vec![
        Watched {
            role: "gateway",
            pids: vec![gw.proc.pid()],
        },
        Watched {
            role: "D1 sim",
            pids: vec![sim.proc.pid()],
        },
        Watched {
            role: "Redis",
            pids: redis.pids(),
        },
        Watched {
            role: "generator",
            pids: vec![std::process::id()],
        },
    ];
    let gateway_idle = gw.proc.rss_kib();
    let sim_idle = sim.proc.rss_kib();
    let mut runs = Vec::new();
    let plan: Vec<(Scenario, f64)> = ctx
        .args
        .d1_new_rates
        .iter()
        .map(|&r| (Scenario::TokenizeNew, r))
        .chain(
            ctx.args
                .d1_cryptogram_rates
                .iter()
                .map(|&r| (Scenario::Cryptogram, r)),
        )
        .filter(|(_, r)| *r > 0.0)
        .collect();
    for (scenario, rate) in plan {
        // One request at a time per HTTP/1.1 connection: enough connections for every request
        // in flight at a 300 ms latency, so the generator never queues what the gateway could
        // take.
        let connections = ((rate * 0.3).ceil() as usize).max(ctx.args.loadgen_connections);
        ctx.say(format!(
            "{}: open loop at {rate:.0}/s for {}s on {connections} connections ...",
            scenario.label(),
            ctx.args.duration.as_secs()
        ));
        let before = CpuSnapshot::take(&watch);
        let open = loadgen::open_loop(
            gw.addr,
            ctx.workload(scenario)?,
            rate,
            ctx.args.duration,
            connections,
        )
        .await?;
        let cpu = before.since(&watch, open.ok + open.unexpected);
        ctx.say(format!("  {open}"));
        ctx.say(format!("  CPU per request: {cpu}"));
        if open.unexpected > 0 || open.failed > 0 {
            ctx.notes.push(format!(
                "{} at {rate:.0}/s: {} unexpected answers and {} failures of {} ({})",
                scenario.label(),
                open.unexpected,
                open.failed,
                open.scheduled,
                open.first_unexpected.as_deref().unwrap_or("-")
            ));
        }
        runs.push(D1Run {
            scenario,
            connections,
            open,
            cpu,
            gateway_rss: gw.proc.rss_kib(),
            sim_rss: sim.proc.rss_kib(),
        });
        // Let in-flight work and connections settle between runs.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "## tokengate: D1 at real latency
"
    );
    let _ = writeln!(out, "- machine: {}", machine_line());
    let _ = writeln!(
        out,
        "- load average (1/5/15 min) at start: {load_start}; at end: {}",
        loadavg()
    );
    let _ = writeln!(
        out,
        "- D1 simulator (`tokengate d1-sim`) in its own process, {} ms added to every call (`PUT /sim/faults`), no fault injected; gateway release build, shipped `[d1]` settings, Redis standalone, log level warn; open loop for {}s per run, latency from the scheduled send time; generator on the same cores",
        latency.as_millis(),
        ctx.args.duration.as_secs()
    );
    let _ = writeln!(
        out,
        "- bar (issue 13): at least 99% served, p99 at most 250 ms
"
    );
    let _ = writeln!(
        out,
        "| scenario | offered/s | achieved/s | served | p50 | p99 | p99.9 | max | meets | connections |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|");
    for r in &runs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2}% | {} | {} | {} | {} | {} | {} |",
            r.scenario.label(),
            thousands(r.open.target_rate),
            thousands(r.open.achieved_rate),
            r.served() * 100.0,
            ms(r.open.p50),
            ms(r.open.p99),
            ms(r.open.p999),
            ms(r.open.max),
            if r.meets() { "yes" } else { "**no**" },
            r.connections
        );
    }
    let _ = writeln!(
        out,
        "
CPU per request (µs, from `/proc`) and memory (VmRSS, peak VmHWM in brackets) after each run:
"
    );
    let _ = writeln!(
        out,
        "| scenario | offered/s | gateway | D1 sim | Redis | generator | machine busy | gateway RSS | sim RSS |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let rss = |r: Option<Rss>| {
        r.map(|r| format!("{} ({})", mib(r.now), mib(r.peak)))
            .unwrap_or_else(|| "-".into())
    };
    for r in &runs {
        let role = |name: &str| {
            r.cpu
                .per_request_us
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, us)| format!("{us:.0}"))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario.label(),
            thousands(r.open.target_rate),
            role("gateway"),
            role("D1 sim"),
            role("Redis"),
            role("generator"),
            r.cpu
                .machine_busy
                .map(|b| format!("{:.0}%", b * 100.0))
                .unwrap_or_else(|| "-".into()),
            rss(r.gateway_rss),
            rss(r.sim_rss)
        );
    }
    let _ = writeln!(
        out,
        "
Idle before the runs: gateway {}, simulator {}.",
        rss(gateway_idle),
        rss(sim_idle)
    );
    notes(ctx, &mut out);
    drop(gw);
    drop(sim);
    drop(redis);
    Ok(out)
}

/// Vault-size step: GET, memory and start-up at each size.
/// The I/O floor: what Redis round trips and one HTTP/2 call per request cost a server that
/// does nothing else (`bench-hyper` shaped by its flags), next to the plain bare ceiling, CPU
/// per request from `/proc`. A new card makes four Redis round trips and one D1 call; whatever a
/// server doing that I/O spends per request, the gateway spends at least as much on top of a
/// new card's P-256 work (`cargo bench --bench jwe -- floor`).
async fn io_floor_run(ctx: &mut Ctx) -> Result<String, BoxError> {
    let load_start = loadavg();
    let redis = Redis::standalone(&ctx.work)?;
    let (upstream, up_addr) = ctx.start_bench_hyper(&["--http2".to_owned()])?;
    let up_uri = format!("http://{up_addr}/");
    let shapes: [(&str, u32, bool); 6] = [
        ("bare hyper", 0, false),
        ("+ 1 Redis round trip", 1, false),
        ("+ 4 Redis round trips", 4, false),
        ("+ 1 HTTP/2 call", 0, true),
        ("+ 1 Redis round trip + 1 HTTP/2 call", 1, true),
        (
            "+ 4 Redis round trips + 1 HTTP/2 call (a new card's I/O)",
            4,
            true,
        ),
    ];
    let mut rows = Vec::new();
    for (i, (label, trips, call)) in shapes.into_iter().enumerate() {
        let mut extra = Vec::new();
        if trips > 0 {
            extra.extend([
                "--redis-url".to_owned(),
                redis.url(),
                "--redis-round-trips".to_owned(),
                trips.to_string(),
            ]);
        }
        if call {
            extra.extend(["--upstream".to_owned(), up_uri.clone()]);
        }
        ctx.say(format!("{label} ..."));
        let (front, addr) = ctx.start_bench_hyper(&extra)?;
        ctx.watch = vec![
            Watched {
                role: "server",
                pids: vec![front.pid()],
            },
            Watched {
                role: "Redis",
                pids: redis.pids(),
            },
            Watched {
                role: "upstream",
                pids: vec![upstream.pid()],
            },
        ];
        let row = ctx
            .measure(
                addr,
                Scenario::Bare,
                label.to_owned(),
                &format!("io-floor-{i}"),
                None,
            )
            .await?;
        if row.wrk.non2xx > 0 || row.wrk.socket_errors > 0 {
            return Err(format!(
                "{label}: {} non-2xx answers and {} socket errors: the run does not measure the shape (why: {} and, for the upstream, {})",
                row.wrk.non2xx,
                row.wrk.socket_errors,
                ctx.bench_hyper_log(addr).display(),
                ctx.bench_hyper_log(up_addr).display()
            )
            .into());
        }
        rows.push(row);
        drop(front);
    }
    drop(upstream);
    drop(redis);

    let baseline = rows.first().map(|r| r.wrk.rps).unwrap_or(0.0);
    let mut out = preamble(ctx, &load_start, "tokengate I/O floor");
    let _ = writeln!(
        out,
        "- `bench-hyper` (HTTP/1.1 in, no work) with N sequential Redis round trips (`GET` of an absent key through a `ConnectionManager`) and/or one HTTP/2 POST of 1 KiB (cleartext, prior knowledge, answer read whole) to another `bench-hyper --http2` per request; ratios are to the plain row\n"
    );
    table_header(&mut out);
    for r in &rows {
        table_row(&mut out, r, baseline);
    }
    let refs: Vec<&Row> = rows.iter().collect();
    cpu_table(&mut out, &refs);
    let _ = writeln!(
        out,
        "\nA new card does this I/O (four Redis round trips, one D1 call, over TLS besides) and its P-256 work (`cargo bench --bench jwe -- floor`); the server CPU of the last row plus that floor is a lower bound for the gateway's CPU per new card."
    );
    notes(ctx, &mut out);
    Ok(out)
}

async fn scale_run(ctx: &mut Ctx) -> Result<String, BoxError> {
    let load_start = loadavg();
    let mut sizes = ctx.args.scale_sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();

    ctx.say("bare hyper (before) ...");
    let (bare, bare_addr) = ctx.start_bare()?;
    ctx.watch = vec![Watched {
        role: "server",
        pids: vec![bare.pid()],
    }];
    let bare_before = ctx
        .measure(
            bare_addr,
            Scenario::Bare,
            "bare hyper (before)".into(),
            "before",
            None,
        )
        .await?;
    drop(bare);

    let redis = if ctx.args.cluster {
        Redis::cluster(&ctx.work)?
    } else {
        Redis::standalone(&ctx.work)?
    };
    let gw = ctx.start_gateway(&redis).await?;
    let merchant = ctx.create_merchant(&gw).await?;
    drop(gw);
    let cfg = redis.store_config();

    struct Step {
        size: u64,
        fill_rate: f64,
        startups: Vec<Duration>,
        idle: Option<Rss>,
        after: Option<Rss>,
        row: Row,
        redis_mem: u64,
        redis_keys: u64,
    }
    let mut steps: Vec<Step> = Vec::new();
    let mut filled = 0u64;
    let mut sample: Vec<String> = Vec::new();
    let mut every = 1u64;
    for &size in &sizes {
        // Keep about 10,000 sampled ids spread over the whole vault.
        let new_every = (size / 10_000).max(1);
        if new_every > every {
            let k = (new_every / every).max(1) as usize;
            sample = sample.into_iter().step_by(k).collect();
        }
        every = new_every;
        let todo = size.saturating_sub(filled);
        ctx.say(format!("filling {todo} tokens (to {size}) ..."));
        let f = fill::fill(&cfg, &merchant, todo, every, 256).await?;
        if f.duplicates > 0 {
            ctx.notes.push(format!(
                "fill to {size}: {} random cards collided with earlier ones and were skipped",
                f.duplicates
            ));
        }
        filled += f.inserted;
        sample.extend(f.sample);
        std::fs::write(&ctx.ids_file, sample.join("\n") + "\n")?;
        let fill_rate = f.inserted as f64 / f.elapsed.as_secs_f64().max(1e-9);
        ctx.say(format!("  {fill_rate:.0} tokens/s"));

        let mut startups = Vec::new();
        let mut last = None;
        for _ in 0..ctx.args.startups.max(1) {
            // Stop the previous instance before timing the next.
            drop(last.take());
            let g = ctx.start_gateway(&redis).await?;
            ctx.say(format!("  start-up {}", ms(g.startup)));
            startups.push(g.startup);
            last = Some(g);
        }
        let gw = last.ok_or("no gateway started")?;
        ctx.watch = vec![
            Watched {
                role: "gateway",
                pids: vec![gw.proc.pid()],
            },
            Watched {
                role: "Redis",
                pids: redis.pids(),
            },
        ];
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = gw.proc.rss_kib();
        let label = format!("GET /v1/tokens/{{id}}, {} tokens", thousands(filled as f64));
        let row = ctx
            .measure(gw.addr, Scenario::Get, label, &format!("{filled}"), None)
            .await?;
        let after = gw.proc.rss_kib();
        let (redis_mem, redis_keys) = redis.memory_and_keys();
        steps.push(Step {
            size: filled,
            fill_rate,
            startups,
            idle,
            after,
            row,
            redis_mem,
            redis_keys,
        });
        drop(gw);
    }
    drop(redis);

    ctx.say("bare hyper (after) ...");
    let (bare, bare_addr) = ctx.start_bare()?;
    ctx.watch = vec![Watched {
        role: "server",
        pids: vec![bare.pid()],
    }];
    let bare_after = ctx
        .measure(
            bare_addr,
            Scenario::Bare,
            "bare hyper (after)".into(),
            "after",
            None,
        )
        .await?;
    drop(bare);
    let baseline = (bare_before.wrk.rps + bare_after.wrk.rps) / 2.0;

    let mut out = preamble(ctx, &load_start, "tokengate vault-size step");
    let _ = writeln!(
        out,
        "- storage: {}; tokens written directly (`bench-fill`, the gateway's own insert script), GET targets sampled evenly over the whole vault",
        if ctx.args.cluster {
            "Redis Cluster (3 primaries)"
        } else {
            "standalone Redis"
        }
    );
    let _ = writeln!(
        out,
        "- bare hyper: {} req/s before, {} after (mean {})\n",
        thousands(bare_before.wrk.rps),
        thousands(bare_after.wrk.rps),
        thousands(baseline)
    );
    table_header(&mut out);
    for s in &steps {
        table_row(&mut out, &s.row, baseline);
    }
    let rows: Vec<&Row> = steps.iter().map(|s| &s.row).collect();
    open_loop_details(&mut out, &rows, ctx.args.open_loop_share);
    cpu_table(&mut out, &rows);
    let _ = writeln!(
        out,
        "\n| tokens | start-up to /readyz (each run) | gateway RSS idle | gateway RSS after the GET runs | Redis used_memory | Redis keys | fill rate |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|");
    for s in &steps {
        let starts: Vec<String> = s.startups.iter().map(|d| ms(*d)).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {}/s |",
            thousands(s.size as f64),
            starts.join(", "),
            s.idle.map(|r| mib(r.now)).unwrap_or_else(|| "-".into()),
            s.after.map(|r| mib(r.now)).unwrap_or_else(|| "-".into()),
            mib(s.redis_mem / 1024),
            thousands(s.redis_keys as f64),
            thousands(s.fill_rate)
        );
    }
    if let (Some(first), Some(last)) = (steps.first(), steps.last())
        && steps.len() > 1
    {
        let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { 0.0 };
        let median = |v: &[Duration]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or_default()
        };
        let half_p99 = |s: &Step| {
            s.row
                .open
                .as_ref()
                .map(|o| o.p99.as_secs_f64())
                .unwrap_or(0.0)
        };
        let _ = writeln!(
            out,
            "\n{} vs {} tokens: throughput x{:.3}, wrk p99 x{:.3}, p99 at half peak x{:.3}, median start-up x{:.3}, gateway RSS after x{:.3}",
            thousands(last.size as f64),
            thousands(first.size as f64),
            ratio(first.row.wrk.rps, last.row.wrk.rps),
            ratio(
                first.row.wrk.p99.as_secs_f64(),
                last.row.wrk.p99.as_secs_f64()
            ),
            ratio(half_p99(first), half_p99(last)),
            ratio(
                median(&first.startups).as_secs_f64(),
                median(&last.startups).as_secs_f64()
            ),
            ratio(
                first.after.map(|r| r.now as f64).unwrap_or(0.0),
                last.after.map(|r| r.now as f64).unwrap_or(0.0)
            ),
        );
    }
    notes(ctx, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{median, paired_cell};

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[0.4]), 0.4);
        assert_eq!(median(&[0.3, 0.5, 0.9]), 0.5);
        assert!((median(&[0.3, 0.5, 0.6, 0.9]) - 0.55).abs() < 1e-12);
    }

    #[test]
    fn joined_formats_each_value() {
        assert_eq!(super::joined(&[], |v| format!("{v}")), "");
        assert_eq!(
            super::joined(&[0.5, 0.4567], |r| format!("{r:.3}x")),
            "0.500x, 0.457x"
        );
    }

    #[test]
    fn paired_cell_gives_median_and_spread() {
        assert_eq!(paired_cell(&[]), "-");
        assert_eq!(paired_cell(&[0.4567]), "0.457");
        assert_eq!(paired_cell(&[0.6, 0.4, 0.5]), "0.500 (0.400-0.600)");
    }
}
