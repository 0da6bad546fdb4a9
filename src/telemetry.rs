//! Logging setup: text or JSON lines (`log.format`, `auto` by default), filtered by `log.level`
//! (or `RUST_LOG`), written to stdout by a background thread.
//!
//! Log lines inside a request carry its request id and route template (the request context of
//! `telemetry/context.rs`, set by src/http/stack.rs; src/http/telemetry.rs writes the access
//! log). Card data never reaches a log line:
//! PANs are a masked type, paths are logged as route templates, and bodies and headers are never
//! logged.

mod clock;
pub mod context;
mod json;
mod text;
mod writer;

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing::Dispatch;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};

/// Target of the access-log events (src/http/telemetry.rs), so a filter can single them out
/// (`log.level = "info,tokengate::access=off"`) and the JSON format can write them directly.
pub const ACCESS_TARGET: &str = "tokengate::access";

/// Lines dropped so far because the buffer was full, for `tokengate_log_dropped_lines_total`.
static DROPPED: OnceLock<writer::DroppedLines> = OnceLock::new();

/// What `log.format` resolves to for one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Text,
    Json,
}

/// `auto` is text for a person at a terminal and JSON lines for everything else (files, pipes,
/// container log collectors), where lines are parsed rather than read.
pub fn resolve_format(format: LogFormat, terminal: bool) -> Resolved {
    match format {
        LogFormat::Text => Resolved::Text,
        LogFormat::Json => Resolved::Json,
        LogFormat::Auto if terminal => Resolved::Text,
        LogFormat::Auto => Resolved::Json,
    }
}

/// Colour codes only for a terminal: in a file they are noise that breaks grep and parsers.
/// `NO_COLOR` (no-color.org), when set and not empty, turns them off on a terminal too.
pub fn use_ansi(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Keeps the background writer alive; dropping it writes out the lines still buffered (waiting
/// at most about a second). Hold it until the process is about to exit.
#[must_use = "dropping the guard stops the log writer thread"]
pub struct LogGuard {
    _worker: Option<writer::WriterGuard>,
}

/// Installs the global subscriber writing to stdout through a background thread. Safe to call
/// more than once (later calls do not replace the first subscriber).
pub fn init(cfg: &LogConfig) -> LogGuard {
    let stdout = std::io::stdout();
    let terminal = stdout.is_terminal();
    let no_color = std::env::var_os("NO_COLOR");
    let ansi = use_ansi(terminal, no_color.as_deref());
    // Lossy (src/telemetry/writer.rs): when the writer thread is 32 MiB behind, a new line is
    // dropped (and counted) instead of blocking. Blocking would park a tokio worker thread
    // inside a request whenever stdout stalls (a full pipe, a paused log shipper), turning a
    // logging problem into an outage of the payment API; losing access-log lines under that
    // condition is the lesser harm, and the loss is visible as
    // tokengate_log_dropped_lines_total. The thread writes whole batches of lines per system
    // call, and a request thread never makes one for a log line.
    match writer::spawn(stdout, writer::MAX_BUFFERED) {
        Ok((w, dropped, guard)) => {
            let _ = DROPPED.set(dropped);
            let _ = dispatch(cfg, w, terminal, ansi).try_init();
            LogGuard {
                _worker: Some(guard),
            }
        }
        // No thread could be started (resource limits): log synchronously rather than not at
        // all.
        Err(_) => {
            let _ = dispatch(cfg, std::io::stdout, terminal, ansi).try_init();
            LogGuard { _worker: None }
        }
    }
}

/// The subscriber [`init`] installs, writing to `writer`: the injection point for tests, which
/// capture into a buffer and install it with `tracing::dispatcher::set_default`.
pub fn dispatch<W>(cfg: &LogConfig, writer: W, terminal: bool, ansi: bool) -> Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(cfg))
        .with_writer(writer);
    match resolve_format(cfg.format, terminal) {
        // The event's fields at the top level; of the spans only the innermost (else the
        // request context, written as the `request` span it replaces: telemetry/context.rs),
        // not the list of all of them. The access-log line takes a direct path with the same
        // output (src/telemetry/json.rs).
        Resolved::Json => Dispatch::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .event_format(json::JsonLines::new())
                // The same stored span fields as the stock `JsonFields`, written directly.
                .fmt_fields(json::SpanFields)
                .finish(),
        ),
        // The stock text format with the request context where its span was
        // (src/telemetry/text.rs).
        Resolved::Text => Dispatch::new(
            builder
                .with_ansi(ansi)
                .event_format(text::TextLines::new())
                .finish(),
        ),
    }
}

/// `RUST_LOG` when set and valid, else `log.level` (checked by `Config::validate`).
fn filter(cfg: &LogConfig) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Log lines dropped because the writer thread was too far behind (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, writer::DroppedLines::get)
}

/// The in-memory log output the format tests of this module and of `json.rs` / `text.rs` write to.
#[cfg(test)]
pub(crate) mod test_buf {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub(crate) struct Buf(pub(crate) Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::test_buf::Buf;
    use super::*;

    #[test]
    fn auto_is_text_on_a_terminal_and_json_elsewhere() {
        assert_eq!(resolve_format(LogFormat::Auto, true), Resolved::Text);
        assert_eq!(resolve_format(LogFormat::Auto, false), Resolved::Json);
        for terminal in [true, false] {
            assert_eq!(resolve_format(LogFormat::Text, terminal), Resolved::Text);
            assert_eq!(resolve_format(LogFormat::Json, terminal), Resolved::Json);
        }
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_ansi(true, None));
        assert!(!use_ansi(false, None));
        assert!(!use_ansi(true, Some(OsStr::new("1"))));
        assert!(use_ansi(true, Some(OsStr::new(""))));
    }

    fn capture(format: LogFormat, terminal: bool) -> String {
        let buf = Buf::default();
        let w = buf.clone();
        let cfg = LogConfig {
            format,
            ..LogConfig::standalone()
        };
        let d = dispatch(&cfg, move || w.clone(), terminal, use_ansi(terminal, None));
        tracing::dispatcher::with_default(&d, || {
            tracing::info!(target: "tokengate::access", status = 200u64, "request");
        });
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn auto_writes_json_lines_off_a_terminal_and_plain_text_on_one() {
        let json = capture(LogFormat::Auto, false);
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["target"], "tokengate::access");
        assert!(!json.contains('\x1b'));
        let text = capture(LogFormat::Text, false);
        assert!(
            text.contains("status=200") && !text.contains('\x1b'),
            "{text}"
        );
        let colour = capture(LogFormat::Auto, true);
        assert!(colour.contains('\x1b'), "{colour}");
    }
}
