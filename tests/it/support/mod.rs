//! Test support: real servers started per test, and a log capture for secret-hygiene checks.
#![allow(dead_code)]

pub mod app;
pub mod cases;
pub mod issuer;
pub mod records;
pub mod redis_server;
pub mod tls;

use std::io::Write;
use std::sync::{Mutex, Once};

/// Every log line written by the process during the test run (all tests share one subscriber).
pub static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;
impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut l) = LOGS.lock() {
            l.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs a process-wide subscriber at debug level capturing into [`LOGS`].
pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,hyper=info,h2=info,rustls=info,redis=info")
            .with_writer(|| Capture)
            .with_ansi(false)
            .try_init();
    });
}

pub fn captured_logs() -> String {
    LOGS.lock()
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .unwrap_or_default()
}

pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
