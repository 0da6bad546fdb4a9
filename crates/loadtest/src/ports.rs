//! Loopback ports and child start-up shared by the load harness and the chaos suite: picking a free
//! port, waiting until a child listens on it (without being fooled by a TCP self-connect), and
//! starting `tokengate d1-sim` so that a lost port race is retried instead of failing the run.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BoxError;

/// A loopback address whose port was free a moment ago, for a child to listen on.
///
/// Chosen below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`) when there is
/// room: ports there are never handed out as the source port of an outgoing connection, so
/// neither a probe connecting to itself nor another process's client socket can take the port
/// between this pick and the child's `bind`. Where the range leaves no room, the kernel picks (a
/// port in the ephemeral range; callers still check that the child is alive and retry).
pub fn free_addr() -> Result<SocketAddr, BoxError> {
    if let Some((low, high)) = below_ephemeral() {
        for _ in 0..200 {
            let port = rand::random_range(low..high);
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                return Ok(l.local_addr()?);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Ports from 10000 up to the start of the ephemeral range, if that leaves at least 1,000.
fn below_ephemeral() -> Option<(u16, u16)> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u16 = range.split_whitespace().next()?.parse().ok()?;
    (low >= 11_000).then_some((10_000, low))
}

/// Whether something listens on `addr`.
///
/// A connect to a loopback port nobody listens on can pick that same port as its own source port
/// and connect to itself (TCP simultaneous open): the probe then "succeeds", and for a moment the
/// probe's socket holds the port, so the child's own `bind` fails with `EADDRINUSE`. Polling a
/// port every 10 ms while a debug-build child starts repeats that rare chance many times (it is
/// one of the two explanations of a CI run's "the D1 simulator did not start"), so a
/// self-connected probe counts as "not listening".
pub fn listening(addr: SocketAddr) -> bool {
    match TcpStream::connect(addr) {
        Ok(s) => s.local_addr().ok() != s.peer_addr().ok(),
        Err(_) => false,
    }
}

/// Polls until every address in `addrs` is listening (true), or `child` has exited or `within`
/// has passed (false).
pub fn wait_listening(addrs: &[SocketAddr], within: Duration, child: &mut Child) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        if addrs.iter().all(|a| listening(*a)) {
            // Listening, and still alive: a child that lost its second bind exits right after
            // the first one succeeded.
            return matches!(child.try_wait(), Ok(None));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The last `n` lines of a log file, for an error message (the simulator's and the gateway's
/// logs carry no card data: they never log a PAN, CVC or key).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `tokengate d1-sim` running on loopback: its child process and where it listens.
pub struct StartedSim {
    pub child: Child,
    pub api: SocketAddr,
    pub control: SocketAddr,
    /// Its development key set, where a gateway reads its half (`d1.keys_dir`).
    pub keys_dir: PathBuf,
}

/// Starts `exe d1-sim` with its working directory `dir` (the key set is generated into
/// `dir/sim-keys`) and its log in `log`. Tries up to three times on fresh ports; the error carries
/// the log's tail.
pub fn start_d1_sim(exe: &Path, dir: &Path, log: &Path) -> Result<StartedSim, BoxError> {
    std::fs::create_dir_all(dir)?;
    for _ in 0..3 {
        let api = free_addr()?;
        let control = free_addr()?;
        if api == control {
            continue;
        }
        let mut child = Command::new(exe)
            .arg("d1-sim")
            .arg("--listen")
            .arg(api.to_string())
            .arg("--control-listen")
            .arg(control.to_string())
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        if wait_listening(&[api, control], Duration::from_secs(60), &mut child) {
            return Ok(StartedSim {
                child,
                api,
                control,
                keys_dir: dir.join("sim-keys"),
            });
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    Err(format!(
        "the D1 simulator did not start in three tries; the end of {}:\n{}",
        log.display(),
        log_tail(log, 20)
    )
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_is_not_listening_and_an_open_one_is() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap();
        assert!(listening(open));
        drop(l);
        // Many probes of the closed port: none may report it listening (a self-connect would).
        assert!((0..200).all(|_| !listening(open)));
    }

    #[test]
    fn free_ports_are_outside_the_ephemeral_range_when_it_leaves_room() {
        let addr = free_addr().unwrap();
        assert!(addr.ip().is_loopback());
        if let Some((low, high)) = below_ephemeral() {
            assert!((low..high).contains(&addr.port()), "{addr}");
        }
        // Free: a listener can take it.
        TcpListener::bind(addr).unwrap();
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("tg-ports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.log");
        std::fs::write(&f, "a\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&f, 2), "c\nd");
        assert_eq!(log_tail(&f, 10), "a\nb\nc\nd");
        assert_eq!(log_tail(&dir.join("missing"), 3), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
