//! `tokengate import`: bulk migration of stored cards from an existing vault, as a client of a
//! running gateway's REST API (`POST /v1/tokens`), never of its store.
//!
//! The file is streamed (`input`), each card sent with bounded concurrency under a client-side
//! rate limit with retries (`client`), and each outcome appended to a mapping or errors file,
//! with a checkpoint from which a re-run of the same command resumes (`output`). Every line has
//! its own `Idempotency-Key`, an HMAC of its line number and reference under a random key kept
//! in the state file: a line that was in flight when a run stopped is resent with the same key
//! and replayed by the gateway, so no card is tokenized twice (and the gateway's own dedup by
//! card is a second net). docs/api.md, "Bulk import", is the user's side of this.

pub mod client;
pub mod input;
pub mod output;
pub mod progress;

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::SecretString;
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot, watch};
use zeroize::Zeroizing;

use client::{ApiClient, Outcome, RetryPolicy};
use input::{DoneLines, Format, Item};
use output::{ErrorRecord, MappingRecord, Paths, State, Writers};
use progress::{Counts, Progress, ProgressMode};

/// What to import, where to, and how fast.
pub struct Options {
    /// The gateway's base URL.
    pub api: String,
    pub api_key: SecretString,
    pub file: PathBuf,
    /// From the file's extension when `None`.
    pub format: Option<Format>,
    /// Directory of the mapping, errors and state files; the input's directory when `None`.
    pub out_dir: Option<PathBuf>,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Requests per second at most (client side); unlimited when `None`.
    pub rate: Option<f64>,
    /// `usage` of every token (`CARD_ON_FILE`, `RECURRING`, `ONE_OFF`).
    pub usage: String,
    /// Stop after this many lines handled (sent or refused) in this run.
    pub limit: Option<u64>,
    pub retry: RetryPolicy,
    pub progress: ProgressMode,
    /// Plain progress lines this often.
    pub progress_every: Duration,
    /// After a stop request, how long requests in flight may take before they are abandoned.
    pub grace: Duration,
}

impl Options {
    /// Defaults for everything but the API, key and file.
    pub fn new(api: impl Into<String>, api_key: SecretString, file: impl Into<PathBuf>) -> Self {
        Options {
            api: api.into(),
            api_key,
            file: file.into(),
            format: None,
            out_dir: None,
            concurrency: 16,
            rate: None,
            usage: "CARD_ON_FILE".to_owned(),
            limit: None,
            retry: RetryPolicy::default(),
            progress: ProgressMode::Auto,
            progress_every: Duration::from_secs(5),
            grace: Duration::from_secs(10),
        }
    }
}

/// Why a run ended before the end of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Ctrl-C (or SIGTERM).
    Interrupted,
    /// `--limit` lines were handled.
    Limit,
    /// An answer no line gets past (bad key, missing scope, not a gateway).
    Fatal(String),
    /// Many lines in a row failed after their retries: the gateway is down or overloaded.
    Unavailable(String),
    /// The input file could not be read further.
    Input(String),
}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub counts: Counts,
    pub elapsed: Duration,
    /// Lines per second while sending.
    pub rate: f64,
    /// Every line of the file is finished (mapped or refused for good).
    pub complete: bool,
    pub stopped: Option<Stop>,
    pub paths: Paths,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(
            f,
            "lines read {}, skipped (done before) {}, created {}, existing {}, errors {}, to retry {}",
            c.read, c.skipped, c.created, c.existing, c.errors, c.retryable
        )?;
        writeln!(
            f,
            "elapsed {}, {:.0} lines/s",
            progress::human_duration(self.elapsed),
            self.rate
        )?;
        writeln!(f, "mapping: {}", self.paths.mapping.display())?;
        writeln!(f, "errors:  {}", self.paths.errors.display())?;
        match &self.stopped {
            None if self.complete => write!(f, "import complete"),
            None => write!(
                f,
                "{} lines failed for a reason that may pass: run the same command again to retry them",
                c.retryable
            ),
            Some(Stop::Interrupted) => {
                write!(f, "interrupted: run the same command again to resume")
            }
            Some(Stop::Limit) => {
                write!(f, "stopped at --limit: run the same command again to go on")
            }
            Some(Stop::Fatal(m)) => write!(f, "stopped: {m}"),
            Some(Stop::Unavailable(m)) => write!(
                f,
                "stopped, the gateway keeps failing ({m}): run the same command again later to resume"
            ),
            Some(Stop::Input(m)) => write!(f, "stopped: {m}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |source| ImportError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Parses `--rate`: `200`, `200/s` or `0.5/s`.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.trim().trim_end_matches("/s").trim();
    match n.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err("expected requests per second, e.g. 200 or 200/s".to_owned()),
    }
}

/// Lines not finished: in flight, or failed for a reason that may pass. The checkpoint is the
/// line before the first of them, so it never passes a line without an outcome on disk.
struct Tracker {
    last_seen: u64,
    open: BTreeSet<u64>,
}

impl Tracker {
    fn checkpoint(&self) -> u64 {
        match self.open.first() {
            Some(l) => l.saturating_sub(1),
            None => self.last_seen,
        }
    }
}

/// The `Idempotency-Key` of a line: HMAC-SHA256 under the run key of the line number and the
/// reference (never the card), 128 bits in hex.
fn idempotency_key(mac: &Hmac<Sha256>, line: u64, reference: &str) -> String {
    let mut m = mac.clone();
    m.update(b"tokengate-import/v1\0");
    m.update(&line.to_be_bytes());
    m.update(reference.as_bytes());
    let tag = m.finalize().into_bytes();
    format!("imp_{}", hex::encode(&tag[..16]))
}

/// Runs an import. Each message on `signals` is a stop request: the first stops reading and
/// lets the requests in flight finish (up to `grace`), the second abandons them. Whatever
/// happens, the outputs and the checkpoint are flushed before this returns.
pub async fn run(
    opts: Options,
    mut signals: mpsc::UnboundedReceiver<()>,
) -> Result<Summary, ImportError> {
    let format = opts
        .format
        .or_else(|| Format::from_path(&opts.file))
        .ok_or_else(|| {
            ImportError::Setup(
                "cannot tell the format from the file name: use --format jsonl|csv".into(),
            )
        })?;
    if !opts.file.is_file() {
        return Err(ImportError::Setup(format!(
            "{} is not a file",
            opts.file.display()
        )));
    }
    if let Some(d) = &opts.out_dir {
        std::fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let paths = Paths::new(&opts.file, opts.out_dir.as_deref());
    let resume = output::load_resume(&paths).map_err(io_err(&paths.state))?;
    let mut state = match resume.state {
        Some(s) if s.format != format => {
            return Err(ImportError::Setup(format!(
                "{} belongs to a {:?} import of this file name; remove it (and the mapping and \
                 errors files) or use another --out to start over",
                paths.state.display(),
                s.format
            )));
        }
        Some(s) => s,
        None => {
            let mut key = Zeroizing::new([0u8; 32]);
            rand::fill(&mut key[..]);
            State {
                version: 1,
                run_key: hex::encode(&key[..]),
                format,
                checkpoint: 0,
                complete: false,
            }
        }
    };
    // Written before the first request: the keys it derives must survive any crash.
    output::write_state(&paths.state, &state).map_err(io_err(&paths.state))?;
    let run_key = Zeroizing::new(
        hex::decode(&state.run_key)
            .map_err(|_| ImportError::Setup(format!("{}: bad runKey", paths.state.display())))?,
    );
    let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&run_key)
        .map_err(|_| ImportError::Setup(format!("{}: bad runKey", paths.state.display())))?;

    let concurrency = opts.concurrency.max(1);
    let client = Arc::new(ApiClient::new(
        &opts.api,
        opts.api_key,
        opts.usage,
        opts.rate,
        concurrency as u32,
        opts.retry,
    )?);
    let mut writers = Writers::open(&paths).map_err(io_err(&paths.mapping))?;
    let mut progress = Progress::new(opts.progress).with_interval(opts.progress_every);
    if resume.done_above.is_empty() && state.checkpoint == 0 {
        progress.message(&format!("import: starting {}", opts.file.display()));
    } else {
        progress.message(&format!(
            "import: resuming {} after line {} ({} more lines already done)",
            opts.file.display(),
            state.checkpoint,
            resume.done_above.len()
        ));
    }

    // The total, for the ETA: a second streaming pass, beside the real one.
    let (total_tx, mut total_rx) = oneshot::channel::<u64>();
    let count_path = opts.file.clone();
    tokio::task::spawn_blocking(move || {
        if let Ok(n) = input::count_lines(&count_path) {
            let header = u64::from(format == Format::Csv);
            let _ = total_tx.send(n.saturating_sub(header));
        }
    });

    let (tx, mut rx) = mpsc::channel::<Item>((concurrency * 2).max(64));
    let done = DoneLines {
        checkpoint: state.checkpoint,
        above: resume.done_above,
    };
    let read_path = opts.file.clone();
    let reader = tokio::task::spawn_blocking(move || input::read(&read_path, format, &done, &tx));

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut inflight = FuturesUnordered::new();
    let mut tracker = Tracker {
        last_seen: state.checkpoint,
        open: BTreeSet::new(),
    };
    let mut counts = Counts::default();
    let mut reading = true;
    let mut stopped: Option<Stop> = None;
    let mut abort_at: Option<tokio::time::Instant> = None;
    let mut signals_open = true;
    let mut total_known = false;
    let mut handled = 0u64;
    let mut transient_in_a_row = 0usize;
    // Past this many lines in a row failing after their retries, the gateway is not coming
    // back soon: stop rather than fill the errors file.
    let unavailable_after = concurrency.max(10);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_checkpoint = Instant::now();

    loop {
        if !reading && inflight.is_empty() {
            break;
        }
        let abort = async {
            match abort_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            sig = signals.recv(), if signals_open => match sig {
                None => signals_open = false,
                Some(()) if stopped.is_none() || abort_at.is_none() => {
                    progress.message(
                        "import: stopping; finishing the requests in flight (again to abandon them)",
                    );
                    stopped = Some(Stop::Interrupted);
                    reading = false;
                    rx.close();
                    let _ = stop_tx.send(true);
                    abort_at = Some(tokio::time::Instant::now() + opts.grace);
                }
                Some(()) => break,
            },
            () = abort => break,
            Some((line, reference, outcome)) = inflight.next(), if !inflight.is_empty() => {
                let (line, reference): (u64, String) = (line, reference);
                match outcome {
                    Outcome::Token { created, id, status, last4 } => {
                        transient_in_a_row = 0;
                        tracker.open.remove(&line);
                        if created { counts.created += 1 } else { counts.existing += 1 }
                        counts.processed += 1;
                        writers.mapping(&MappingRecord {
                            line,
                            reference,
                            token_id: id,
                            status: if created { "created" } else { "existing" }.to_owned(),
                            token_status: status,
                            last4,
                        }).map_err(io_err(&paths.mapping))?;
                    }
                    Outcome::Refused { http_status, code, detail } => {
                        transient_in_a_row = 0;
                        tracker.open.remove(&line);
                        counts.errors += 1;
                        counts.processed += 1;
                        writers.error(&ErrorRecord {
                            line, reference, http_status: Some(http_status), code, detail,
                            retryable: false,
                        }).map_err(io_err(&paths.errors))?;
                    }
                    Outcome::Transient { http_status, code, detail } => {
                        // Left open: the checkpoint stays before it and the next run resends it.
                        counts.retryable += 1;
                        counts.processed += 1;
                        transient_in_a_row += 1;
                        let why = format!("{code}: {detail}");
                        writers.error(&ErrorRecord {
                            line, reference, http_status, code, detail, retryable: true,
                        }).map_err(io_err(&paths.errors))?;
                        if transient_in_a_row >= unavailable_after && abort_at.is_none() {
                            progress.message(&format!("import: stopping, the gateway keeps failing: {why}"));
                            stopped = Some(Stop::Unavailable(why));
                            reading = false;
                            rx.close();
                            let _ = stop_tx.send(true);
                            abort_at = Some(tokio::time::Instant::now() + opts.grace);
                        }
                    }
                    Outcome::Fatal { http_status, code, detail } => {
                        if abort_at.is_none() {
                            let status = http_status.map(|s| format!("HTTP {s} ")).unwrap_or_default();
                            let why = format!("{status}{code}: {detail}");
                            progress.message(&format!("import: stopping: {why}"));
                            stopped = Some(Stop::Fatal(why));
                            reading = false;
                            rx.close();
                            let _ = stop_tx.send(true);
                            abort_at = Some(tokio::time::Instant::now() + opts.grace);
                        }
                    }
                    Outcome::Abandoned => {}
                }
                progress.update(&counts);
            }
            item = rx.recv(), if reading && inflight.len() < concurrency => match item {
                None => reading = false,
                Some(Item::Skipped { line, earlier }) => {
                    tracker.last_seen = line;
                    counts.read += 1;
                    if earlier {
                        counts.skipped += 1;
                    }
                }
                Some(Item::Invalid { line, reference, error }) => {
                    tracker.last_seen = line;
                    counts.read += 1;
                    counts.errors += 1;
                    counts.processed += 1;
                    handled += 1;
                    writers.error(&ErrorRecord {
                        line,
                        reference,
                        http_status: None,
                        code: error.code.to_owned(),
                        detail: error.detail,
                        retryable: false,
                    }).map_err(io_err(&paths.errors))?;
                }
                Some(Item::Card(card)) => {
                    tracker.last_seen = card.line;
                    tracker.open.insert(card.line);
                    counts.read += 1;
                    handled += 1;
                    let key = idempotency_key(&mac, card.line, &card.reference);
                    let client = Arc::clone(&client);
                    let stop = stop_rx.clone();
                    inflight.push(async move {
                        let outcome = client.tokenize(&card, &key, stop).await;
                        // The rest of `card`, its number (wiped on drop) included, ends here.
                        (card.line, card.reference, outcome)
                    });
                }
            },
            total = &mut total_rx, if !total_known => {
                total_known = true;
                if let Ok(t) = total {
                    progress.set_total(t);
                }
            }
            _ = tick.tick() => {
                progress.update(&counts);
                if last_checkpoint.elapsed() >= Duration::from_secs(1) {
                    last_checkpoint = Instant::now();
                    writers.sync().map_err(io_err(&paths.mapping))?;
                    state.checkpoint = state.checkpoint.max(tracker.checkpoint());
                    output::write_state(&paths.state, &state).map_err(io_err(&paths.state))?;
                }
            }
        }
        if reading && opts.limit.is_some_and(|l| handled >= l) {
            reading = false;
            stopped = Some(Stop::Limit);
            rx.close();
        }
    }
    // Whatever is still in flight is abandoned: its lines stay open, resent by the next run.
    drop(inflight);
    let _ = stop_tx.send(true);
    rx.close();
    let eof = match reader.await {
        Ok(Ok(())) => stopped.is_none(),
        Ok(Err(e)) => {
            stopped.get_or_insert(Stop::Input(e.to_string()));
            false
        }
        Err(_) => {
            stopped.get_or_insert(Stop::Input("the reader stopped".to_owned()));
            false
        }
    };
    let complete = eof && tracker.open.is_empty();
    writers.sync().map_err(io_err(&paths.mapping))?;
    state.checkpoint = state.checkpoint.max(tracker.checkpoint());
    state.complete = complete;
    output::write_state(&paths.state, &state).map_err(io_err(&paths.state))?;
    progress.update(&counts);
    progress.finish();
    Ok(Summary {
        counts,
        elapsed: progress.elapsed(),
        rate: progress.rate(&counts),
        complete,
        stopped,
        paths,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn idempotency_keys_are_stable_distinct_and_valid() {
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&[7u8; 32]).unwrap();
        let a = idempotency_key(&mac, 1, "r1");
        assert_eq!(a, idempotency_key(&mac, 1, "r1"));
        assert_ne!(a, idempotency_key(&mac, 2, "r1"));
        assert_ne!(a, idempotency_key(&mac, 1, "r2"));
        let other = <Hmac<Sha256> as KeyInit>::new_from_slice(&[8u8; 32]).unwrap();
        assert_ne!(a, idempotency_key(&other, 1, "r1"));
        assert_eq!(a.len(), 36);
        assert!(a.bytes().all(|b| b.is_ascii_graphic()));
    }

    #[test]
    fn checkpoint_stops_before_the_first_open_line() {
        let mut t = Tracker {
            last_seen: 10,
            open: BTreeSet::new(),
        };
        assert_eq!(t.checkpoint(), 10);
        t.open.insert(7);
        t.open.insert(9);
        assert_eq!(t.checkpoint(), 6);
    }

    #[test]
    fn rate_parses_with_or_without_unit() {
        assert_eq!(parse_rate("200"), Ok(200.0));
        assert_eq!(parse_rate("0.5/s"), Ok(0.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
