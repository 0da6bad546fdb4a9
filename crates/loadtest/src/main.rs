//! `tokengate-loadtest`: the load harness, a binary of its own so the product binary carries none
//! of it. `bash scripts/loadtest.sh` drives it; `docs/performance.md` explains the method and
//! holds the figures.
//!
//! # Layout
//!
//! - [`bare`]: `bench-hyper`, a bare hyper 1 server answering a small JSON body: the ceiling every
//!   gateway figure is stated against, measured in the same run.
//! - [`client`]: a minimal HTTP/1.1 client on hyper's connection API (one keep-alive connection
//!   per worker, no pool), shared by the tools below.
//! - [`loadgen`]: `loadgen`, an open-loop generator at a fixed request rate whose latencies are
//!   measured from each request's *scheduled* send time (no coordinated omission), and
//!   `hold-conns`, which opens many idle keep-alive connections for the memory figure.
//! - [`fill`]: `bench-fill`, which writes sealed, fingerprinted token records straight into Redis
//!   through [`tokengate::storage::redis::RedisStore`], for the vault-size flatness step.
//! - [`harness`]: `loadtest`, which starts Redis (standalone or Cluster), the bare server and the
//!   gateway, runs `wrk` (closed loop, peak throughput) and the open-loop generator per scenario,
//!   reads memory from `/proc`, and prints the Markdown report.
//! - [`ports`]: free loopback ports, waiting for a child to listen, and starting the simulator
//!   with retries; shared by the harness and the chaos suite.
//! - [`chaos`]: `chaos`, the chaos suite (`scripts/chaos.sh`, `docs/reliability.md`): kills the
//!   gateway and Redis under load, injects D1 faults, storms two instances with notifications,
//!   takes the webhook receiver down, and checks nothing acknowledged was lost or duplicated.

mod bare;
mod chaos;
mod client;
mod fill;
mod harness;
mod loadgen;
mod ports;

use clap::{Parser, Subcommand};

/// The same allocator as the gateway binary, so the bare hyper baseline is measured on equal
/// terms.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tokengate-loadtest",
    about = "tokengate's load harness (scripts/loadtest.sh, docs/performance.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: PerfCommand,
}

#[derive(Subcommand)]
pub enum PerfCommand {
    /// A bare hyper 1 HTTP/1.1 server answering `{"status":"ok"}` on every path.
    #[command(name = "bench-hyper")]
    BenchHyper(bare::Args),
    /// Open-loop load at a fixed rate; latency from the scheduled send time.
    Loadgen(loadgen::Args),
    /// Opens N keep-alive connections, sends one request on each, keeps them idle.
    #[command(name = "hold-conns")]
    HoldConns(loadgen::HoldArgs),
    /// Writes N token records for one merchant straight into Redis.
    #[command(name = "bench-fill")]
    BenchFill(fill::Args),
    /// The whole load test: see `docs/performance.md`.
    Loadtest(harness::Args),
    /// The chaos suite: see `docs/reliability.md` (`scripts/chaos.sh`).
    Chaos(chaos::Args),
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    run(Cli::parse().command).await
}

async fn run(cmd: PerfCommand) -> Result<(), BoxError> {
    match cmd {
        PerfCommand::BenchHyper(a) => bare::run(a).await,
        PerfCommand::Loadgen(a) => loadgen::run(a).await,
        PerfCommand::HoldConns(a) => loadgen::run_hold(a).await,
        PerfCommand::BenchFill(a) => fill::run(a).await,
        PerfCommand::Loadtest(a) => harness::run(a).await,
        PerfCommand::Chaos(a) => chaos::run(a).await,
    }
}

/// Parses `10s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 10s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{s}`: unit must be ms, s or m")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("`{s}` must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
