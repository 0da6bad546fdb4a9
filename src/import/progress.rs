//! Progress of an import on stderr: a bar with rate and ETA on a terminal, a plain line every
//! few seconds otherwise (a log file or CI), and nothing when asked.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, plain lines otherwise.
    Auto,
    Bar,
    Plain,
    Off,
}

/// Counts of this run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Lines read from the file this run (skipped and blank ones included).
    pub read: u64,
    /// Lines read and handled this run (sent, or refused as unreadable).
    pub processed: u64,
    /// Lines finished by an earlier run, skipped.
    pub skipped: u64,
    pub created: u64,
    pub existing: u64,
    /// Lines refused (by the gateway or as unreadable): in the errors file for good.
    pub errors: u64,
    /// Lines that failed for a reason that may pass: a re-run resends them.
    pub retryable: u64,
}

pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    every: Duration,
    started: Instant,
    last_plain: Instant,
    total: Option<u64>,
    /// Lines handled when the rate's clock started (skipped lines do not count as speed).
    sending_since: Option<(Instant, u64)>,
}

impl Progress {
    pub fn new(mode: ProgressMode) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let (bar, plain) = match mode {
            ProgressMode::Off => (false, false),
            ProgressMode::Bar => (true, false),
            ProgressMode::Plain => (false, true),
            ProgressMode::Auto => (terminal, !terminal),
        };
        let bar = bar.then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style);
            b
        });
        let now = Instant::now();
        Progress {
            bar,
            plain,
            every: Duration::from_secs(5),
            started: now,
            last_plain: now,
            total: None,
            sending_since: None,
        }
    }

    /// Plain lines every `every` instead of every 5 s.
    pub fn with_interval(mut self, every: Duration) -> Progress {
        self.every = every;
        self
    }

    /// The number of lines in the file, once counted.
    pub fn set_total(&mut self, total: u64) {
        self.total = Some(total);
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
    }

    /// Called after each change of the counts; `line` is the last line handed out.
    pub fn update(&mut self, c: &Counts) {
        let pos = c.processed + c.skipped;
        if self.sending_since.is_none() && c.processed > 0 {
            // Skipping the finished part of the file is fast: time the rest from here, or
            // the ETA of a resumed run would be wildly optimistic.
            self.sending_since = Some((Instant::now(), c.processed));
            if let Some(b) = &self.bar {
                b.reset_eta();
            }
        }
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.set_message(format!(
                "{:.0} lines/s, created {} existing {} errors {}",
                self.rate(c),
                c.created,
                c.existing,
                c.errors + c.retryable
            ));
        }
        if self.plain && self.last_plain.elapsed() >= self.every {
            self.last_plain = Instant::now();
            eprintln!("{}", self.line(c));
        }
    }

    /// Lines per second since sending started.
    pub fn rate(&self, c: &Counts) -> f64 {
        match self.sending_since {
            Some((t, base)) => {
                let s = t.elapsed().as_secs_f64();
                if s > 0.0 {
                    (c.processed - base) as f64 / s
                } else {
                    0.0
                }
            }
            None => 0.0,
        }
    }

    fn line(&self, c: &Counts) -> String {
        let pos = c.processed + c.skipped;
        let rate = self.rate(c);
        let mut s = match self.total {
            Some(t) if t > 0 => format!(
                "import: {pos}/{t} lines ({:.1}%)",
                pos as f64 * 100.0 / t as f64
            ),
            _ => format!("import: {pos} lines"),
        };
        s.push_str(&format!(
            ", {rate:.0} lines/s, created {}, existing {}, errors {}",
            c.created, c.existing, c.errors
        ));
        if c.retryable > 0 {
            s.push_str(&format!(", to retry {}", c.retryable));
        }
        if c.skipped > 0 {
            s.push_str(&format!(", skipped (done before) {}", c.skipped));
        }
        if let Some(t) = self.total
            && rate > 0.0
            && t > pos
        {
            s.push_str(&format!(
                ", ETA {}",
                human_duration(Duration::from_secs_f64((t - pos) as f64 / rate))
            ));
        }
        s
    }

    /// Prints a message without tearing the bar.
    pub fn message(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{msg}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// `1h02m03s`, `4m05s`, `6s`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}
