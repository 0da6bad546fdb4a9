//! Starts a throwaway `redis-server` on a free port; killed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Child,
    pub port: u16,
    /// The server binary: `redis-server`, or another Redis-compatible server for a feature this
    /// machine's Redis lacks (`start_program`).
    program: String,
    _dir: tempfile::TempDir,
}

/// Whether something listens on the loopback `port`. A probe of a port nobody listens on can
/// connect to itself (TCP simultaneous open, source port = destination port); that is not a
/// listening server, and for a moment the probe holds the port the server is about to bind.
fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port))
        .is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts with extra arguments (e.g. cluster mode).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_program("redis-server", extra)
    }

    /// Starts `program` (a Redis-compatible server binary) with extra arguments: the WAITAOF
    /// test runs Valkey where the system's redis-server is older than 7.2.
    pub fn start_program(program: &str, extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        // A cluster node also listens on its bus port, port + 10000: above 55535 that is no
        // port at all, and redis-server exits (the ephemeral range here reaches 60999).
        let cluster = extra.iter().any(|a| a.contains("cluster-enabled"));
        // A port can be taken between probing and binding; retry.
        for _ in 0..20 {
            let port = free_port();
            if cluster && (port > 55535 || TcpListener::bind(("127.0.0.1", port + 10000)).is_err())
            {
                continue;
            }
            let mut cmd = Command::new(program);
            cmd.arg("--port")
                .arg(port.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--save")
                .arg("")
                .arg("--appendonly")
                .arg("no")
                .arg("--dir")
                .arg(dir.path())
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut child = cmd
                .spawn()
                .expect("redis-server must be installed (bash .ci/run installs it)");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: port clash, retry
                }
                if listening(port) {
                    return RedisServer {
                        child,
                        port,
                        program: program.to_owned(),
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start {program}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Stops the server (to test outages). Dropping also stops it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl RedisServer {
    /// Starts the server again on the same port and directory after [`RedisServer::stop`]
    /// (standalone servers only: cluster options are not repeated), to test recovery.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let mut child = Command::new(&self.program)
                .arg("--port")
                .arg(self.port.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--save")
                .arg("")
                .arg("--appendonly")
                .arg("no")
                .arg("--dir")
                .arg(self._dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed");
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(2) {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port is not free yet: retry
                }
                if listening(self.port) {
                    self.child = child;
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("could not restart redis-server on port {}", self.port);
    }
}

/// A three-primary Redis Cluster on free ports (no replicas); every node is killed when dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them with `redis-cli --cluster create` and
    /// waits until every node reports `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        for _ in 0..3 {
            if let Some(c) = Self::try_start() {
                return c;
            }
        }
        panic!("could not start a redis cluster");
    }

    fn try_start() -> Option<RedisCluster> {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                // The bus port is chosen explicitly: the default (port + 10000) may exceed 65535
                // for an ephemeral port.
                let bus = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let cluster = RedisCluster { nodes };
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.addrs())
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli must be installed");
        if !status.success() {
            return None;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if cluster.nodes.iter().all(|n| cluster_ok(n.port)) {
                return Some(cluster);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// `127.0.0.1:<port>` of every node.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// Stops every node (to test outages).
    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            n.stop();
        }
    }
}

fn cluster_ok(port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "info"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        .unwrap_or(false)
}

impl RedisServer {
    /// Suspends the server process (SIGSTOP): connections stay open but nothing answers, as
    /// with a stalled or overloaded server.
    pub fn freeze(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// Resumes a server suspended by [`RedisServer::freeze`].
    pub fn thaw(&self) {
        signal(self.child.id(), "-CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill must be available");
    assert!(status.success(), "kill {sig} {pid} failed");
}
