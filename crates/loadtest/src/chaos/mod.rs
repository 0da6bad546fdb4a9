//! `chaos`: the chaos suite of `scripts/chaos.sh` (docs/reliability.md). Starts `redis-server`
//! (AOF, `appendfsync always`), the D1 simulator in its own process, gateways (`tokengate serve`
//! with a generated config) and a webhook receiver, all on loopback; drives tokenization and
//! lifecycle load; injects faults (`kill -9` of the gateway and of Redis, D1 resets, timeouts and
//! 429/503 storms, a notification storm on two instances, a receiver outage); then checks what
//! was acknowledged against what is stored and what was announced.
//!
//! Prints one row per scenario (scenario, load, faults, acknowledged, lost, duplicated, out of
//! order, notes) and fails when any lost, duplicated or out-of-order count is not zero. Every process it starts is killed
//! when the run ends, whatever happens (`env::Proc` kills on drop).
//!
//! - [`env`]: the processes and the HTTP helper;
//! - [`receiver`]: the webhook receiver;
//! - [`scenarios`]: the scenarios and their checks.

mod env;
mod receiver;
mod scenarios;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::BoxError;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// The bounded CI variant (under about two minutes): shorter load phases and outages.
    #[arg(long)]
    pub short: bool,
    /// Scenarios to run, comma-separated (default: all): gateway-kill-embedded,
    /// gateway-kill-redis, redis-kill, d1-faults, lcm-storm, webhook-outage.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The `tokengate` binary (default: next to this one).
    #[arg(long)]
    pub gateway_exe: Option<PathBuf>,
    /// Working directory for configs, data and logs (default: target/chaos/<unix time>).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// One row of the report.
#[derive(Debug, Default, Clone)]
pub struct Row {
    pub scenario: String,
    pub load: String,
    pub faults: String,
    pub acknowledged: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Tokens whose events reached the receiver out of the order they were made in (first
    /// arrival of each event id), for the scenarios that check order; must be 0.
    pub out_of_order: Option<u64>,
    pub notes: Vec<String>,
}

pub const SCENARIOS: [&str; 6] = [
    "gateway-kill-embedded",
    "gateway-kill-redis",
    "redis-kill",
    "d1-faults",
    "lcm-storm",
    "webhook-outage",
];

/// Runs the suite, bounded in time and stopped by SIGTERM/Ctrl-C: either way the scenario in
/// progress is dropped, which kills every process it started.
pub async fn run(args: Args) -> Result<(), BoxError> {
    let bound = Duration::from_secs(if args.short { 240 } else { 780 });
    tokio::select! {
        r = tokio::time::timeout(bound, run_suite(args)) => {
            r.map_err(|_| BoxError::from(format!("chaos: not finished within {} s", bound.as_secs())))?
        }
        _ = tokengate::app::shutdown_signal() => Err("chaos: interrupted".into()),
    }
}

async fn run_suite(args: Args) -> Result<(), BoxError> {
    let exe = std::env::current_exe()?;
    let gateway_exe = match &args.gateway_exe {
        Some(p) => p.clone(),
        None => exe
            .parent()
            .map(|d| d.join("tokengate"))
            .ok_or("cannot locate the tokengate binary; pass --gateway-exe")?,
    };
    if !gateway_exe.exists() {
        return Err(format!(
            "{} not found: build it first (cargo build -p tokengate)",
            gateway_exe.display()
        )
        .into());
    }
    let work = match &args.work_dir {
        Some(d) => d.clone(),
        None => PathBuf::from("target/chaos").join(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                .to_string(),
        ),
    };
    std::fs::create_dir_all(&work)?;
    let work = std::fs::canonicalize(&work)?;
    let selected: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s))
        .collect();
    if selected.is_empty() {
        return Err(format!("--only: no such scenario; known: {}", SCENARIOS.join(", ")).into());
    }
    eprintln!(
        "chaos: {} run, work directory {}",
        if args.short { "short" } else { "full" },
        work.display()
    );
    let started = Instant::now();
    let ctx = scenarios::Ctx::new(gateway_exe, work.clone(), args.short)?;
    let mut rows = Vec::new();
    for name in selected {
        eprintln!("== {name}");
        let t = Instant::now();
        let row = match ctx.run(name).await {
            Ok(row) => row,
            // A scenario that could not run is a failure of the suite, not a silent skip.
            Err(e) => Row {
                scenario: name.to_owned(),
                lost: 1,
                notes: vec![format!("did not complete: {e}")],
                ..Row::default()
            },
        };
        eprintln!(
            "   {} s: acknowledged {}, lost {}, duplicated {}, out of order {}{}",
            t.elapsed().as_secs(),
            row.acknowledged,
            row.lost,
            row.duplicated,
            row.out_of_order
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            if row.notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", row.notes.join("; "))
            }
        );
        rows.push(row);
    }
    let table = render(&rows, started.elapsed(), args.short);
    println!("{table}");
    std::fs::write(work.join("report.md"), &table)?;
    let failed = rows
        .iter()
        .any(|r| r.lost > 0 || r.duplicated > 0 || r.out_of_order.is_some_and(|n| n > 0));
    if failed {
        return Err("chaos: lost, duplicated or out of order is not zero (see the table)".into());
    }
    Ok(())
}

fn render(rows: &[Row], took: Duration, short: bool) -> String {
    let mut out = format!(
        "chaos suite ({}, {} s, load average {})\n\n| scenario | load | faults | acknowledged | lost | duplicated | out of order | notes |\n|---|---|---|---:|---:|---:|---:|---|\n",
        if short { "--short" } else { "full" },
        took.as_secs(),
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_default()
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.load,
            r.faults,
            r.acknowledged,
            r.lost,
            r.duplicated,
            r.out_of_order
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            r.notes.join("; ")
        ));
    }
    out
}
