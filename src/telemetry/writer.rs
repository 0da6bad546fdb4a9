//! The log writer behind [`super::init`]: request threads append each formatted line to one
//! shared, bounded buffer; a background thread writes the buffer out in large batches.
//!
//! It replaces tracing-appender's non-blocking writer, whose channel carried one heap-allocated
//! line at a time and woke the writer thread for almost every line: at 25-35k access-log lines
//! per second that thread and its wake-ups (a futex system call on the request thread, a context
//! switch on the writer's side) were about 14% of the gateway's CPU per GET in a profile
//! (docs/performance.md, "GET path profile, round 2"). Here a line costs a lock, a copy and no
//! system call: the writer is woken only when it waits for an empty buffer, and after a wake-up
//! it lets lines gather for [`LINGER`] before writing, so a busy gateway wakes it a few hundred
//! times a second instead of once per line, and an idle one still writes a line within
//! [`LINGER`].
//!
//! Lossy like the writer it replaces: when the buffer holds [`MAX_BUFFERED`] bytes (stdout
//! stalled: a full pipe, a paused log shipper), new lines are dropped and counted rather than
//! blocking a tokio worker inside a request.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How long the writer lets lines gather after a wake-up before it writes them.
pub const LINGER: Duration = Duration::from_millis(5);

/// Bytes the writer may be behind before new lines are dropped: about 128k lines of ~250 bytes,
/// the bound tracing-appender had (in lines) before; only a stalled stdout fills it.
pub const MAX_BUFFERED: usize = 32 * 1024 * 1024;

/// The bytes not yet written and the hand-shake with the writer thread.
struct State {
    buf: Vec<u8>,
    /// The writer thread sleeps on the condition variable until a line arrives: only then
    /// does a writer of a line pay for a wake-up.
    idle: bool,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: AtomicU64,
    max_buffered: usize,
}

impl Shared {
    /// A poisoned lock only means a thread panicked while holding it; the buffer is still a
    /// sequence of whole lines (a line is appended with one `extend_from_slice`).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `MakeWriter` of the subscriber: cheap to clone, shared by every thread.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Lines dropped because the buffer was full, for `tokengate_log_dropped_lines_total`.
#[derive(Clone)]
pub struct DroppedLines(Arc<Shared>);

impl DroppedLines {
    pub fn get(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

/// Stops the writer thread when dropped, after it wrote what was buffered (waiting at most
/// about a second, so a stalled stdout cannot hold up the exit).
#[must_use = "dropping the guard stops the log writer thread"]
pub struct WriterGuard {
    shared: Arc<Shared>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.closed = true;
        }
        self.shared.wake.notify_one();
        let _ = self.done.recv_timeout(Duration::from_secs(1));
    }
}

/// Starts the writer thread over `out`.
pub fn spawn<W: Write + Send + 'static>(
    out: W,
    max_buffered: usize,
) -> std::io::Result<(BatchWriter, DroppedLines, WriterGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: Vec::with_capacity(64 * 1024),
            idle: false,
            closed: false,
        }),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
        max_buffered,
    });
    let (done_tx, done) = std::sync::mpsc::channel();
    let worker = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("tokengate-log".into())
        .spawn(move || {
            run(&worker, out);
            let _ = done_tx.send(());
        })?;
    Ok((
        BatchWriter {
            shared: Arc::clone(&shared),
        },
        DroppedLines(Arc::clone(&shared)),
        WriterGuard { shared, done },
    ))
}

/// The writer thread: wait for a line, let more gather, swap the buffer out, write it.
fn run<W: Write>(shared: &Shared, mut out: W) {
    // The buffer handed back and forth with the request threads, so neither side allocates
    // once both have grown to the usual batch size.
    let mut spare: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        let mut st = shared.lock();
        while st.buf.is_empty() && !st.closed {
            st.idle = true;
            st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.idle = false;
        let closing = st.closed;
        if !closing {
            drop(st);
            // Lines arriving meanwhile join this batch without waking anyone.
            std::thread::sleep(LINGER);
            st = shared.lock();
        }
        std::mem::swap(&mut st.buf, &mut spare);
        let closed = st.closed;
        drop(st);
        if !spare.is_empty() {
            // A failed write (stdout closed) loses this batch, as a failed write of a line
            // did before; there is nowhere else to report it.
            let _ = out.write_all(&spare);
            let _ = out.flush();
            spare.clear();
            // Do not keep a burst's worth of memory for good.
            if spare.capacity() > 1024 * 1024 {
                spare = Vec::with_capacity(64 * 1024);
            }
        }
        if closed {
            let st = shared.lock();
            if st.buf.is_empty() {
                return;
            }
        }
    }
}

impl std::io::Write for BatchWriter {
    /// tracing-subscriber formats an event into a buffer of its own and writes it with one
    /// `write_all`, so each call here is one whole line.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let wake = {
            let mut st = self.shared.lock();
            if st.buf.len() + line.len() > self.shared.max_buffered {
                drop(st);
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(line.len());
            }
            st.buf.extend_from_slice(line);
            std::mem::replace(&mut st.idle, false)
        };
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink that blocks until released: a stalled stdout.
    struct Stalled(Arc<(Mutex<bool>, Condvar)>, Sink);
    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (m, c) = &*self.0;
            let mut go = m.lock().unwrap();
            while !*go {
                go = c.wait(go).unwrap();
            }
            self.1.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_of_every_thread_is_written_whole_and_in_each_threads_order() {
        let sink = Sink::default();
        let (w, dropped, guard) = spawn(sink.clone(), MAX_BUFFERED).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        w.write_all(format!("t{t} line {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 20_000);
        for t in 0..4 {
            let mine: Vec<usize> = out
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("t{t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..5_000).collect::<Vec<_>>(), "thread {t}");
        }
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn an_idle_writer_writes_a_single_line_soon() {
        let sink = Sink::default();
        let (mut w, _dropped, _guard) = spawn(sink.clone(), MAX_BUFFERED).unwrap();
        // Let the writer reach its wait first, so the line has to wake it.
        std::thread::sleep(Duration::from_millis(20));
        w.write_all(b"alone\n").unwrap();
        // Bounded poll, not a timing assertion: the line must arrive without a guard drop.
        for _ in 0..1_000 {
            if !sink.0.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"alone\n");
    }

    #[test]
    fn a_stalled_output_drops_and_counts_lines_instead_of_blocking() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let (mut w, dropped, guard) = spawn(Stalled(Arc::clone(&gate), sink.clone()), 100).unwrap();
        // The first batch goes to the stalled writer; then the buffer (100 bytes) fills up.
        w.write_all(b"first line\n").unwrap();
        for _ in 0..1_000 {
            if w.shared.lock().buf.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for i in 0..50 {
            w.write_all(format!("line {i:04}\n").as_bytes()).unwrap();
        }
        // 10 lines of 10 bytes fit in 100 bytes; the other 40 were dropped, none blocked.
        assert_eq!(dropped.get(), 40);
        {
            let (m, c) = &*gate;
            *m.lock().unwrap() = true;
            c.notify_all();
        }
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 11, "{out}");
        assert!(out.ends_with("line 0009\n"), "{out}");
    }
}
