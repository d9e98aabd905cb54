//! Log setup: human-readable text or one JSON object per line, to stderr. `RUST_LOG` filters (default `info`).
//!
//! The lines are written by a thread of their own (`agentd-log`), never by the thread that logs them: a stderr read
//! slowly, or for a while not at all (a log collector that stalls, a pipe nobody drains), holds up no request and no
//! run. Up to [`QUEUED_BYTES`] of lines wait for that thread; a line logged while that much waits is dropped and
//! counted (`agentd_log_lines_dropped_total`), and once the thread has written what waited it logs how many were
//! dropped. Before the process exits, [`flush`] waits, bounded, for the lines still queued.

use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// How many bytes of log lines may wait for the writer: about 15,000 lines of JSON, seconds of a busy replica's log.
const QUEUED_BYTES: usize = 4 * 1024 * 1024;
/// The room each of the writer's two buffers keeps once written out (more only while the lines waiting need it).
const KEPT_BUFFER: usize = 64 * 1024;

/// The process's log queue, once [`init`] started it.
static QUEUE: OnceLock<LogQueue> = OnceLock::new();
/// Lines dropped because [`QUEUED_BYTES`] waited, since the process started.
static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

pub fn init(format: LogFormat) {
    let stderr = io::stderr();
    let ansi = stderr.is_terminal();
    let queue = LogQueue::start(QUEUED_BYTES, stderr, DROPPED.clone(), |dropped| {
        tracing::warn!(
            dropped,
            "log lines dropped: stderr was not taking them as fast as they came"
        );
    });
    match queue {
        Ok(queue) => {
            let _ = QUEUE.set(queue);
        }
        Err(error) => {
            eprintln!(
                "cannot start the log writer thread ({error}); logging from each thread instead"
            );
        }
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Line::default)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Lines dropped because too many waited for the writer (see the module doc), for the metrics.
pub fn dropped_lines() -> Counter {
    DROPPED.clone()
}

/// Waits up to `timeout` for the lines logged so far to be written; whether they were. For the end of the process.
pub fn flush(timeout: Duration) -> bool {
    QUEUE.get().is_none_or(|queue| queue.flush(timeout))
}

/// One log line as it is formatted; queued whole when the formatter drops it, or written to stderr from the thread
/// that logs if the writer thread could not be started.
#[derive(Default)]
struct Line {
    bytes: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.bytes.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.bytes.is_empty() {
            return;
        }
        match QUEUE.get() {
            Some(queue) => queue.push(&self.bytes),
            None => {
                let _ = io::stderr().write_all(&self.bytes);
            }
        }
    }
}

/// Lines waiting for a thread that writes them to a sink, bounded in bytes. They are copied into one buffer, which the
/// writer swaps for its own empty one: the writer allocates and frees nothing while the buffers keep their room, and
/// a line's own bytes are freed by the thread that formatted them (a thread freeing blocks other threads allocated
/// keeps them in its allocator cache: with a line handed over as a block of its own, the process held about 0.2 MiB
/// more after 1,000 runs).
struct LogQueue {
    shared: Arc<Shared>,
    capacity: usize,
    /// Every line dropped.
    dropped: Counter,
}

struct Shared {
    state: Mutex<State>,
    /// Told when lines are added to an empty buffer.
    added: Condvar,
    /// Told when the writer has written what it took.
    written: Condvar,
}

#[derive(Default)]
struct State {
    /// The lines waiting, whole, in the order they were logged.
    waiting: Vec<u8>,
    /// The bytes the writer took and is writing: they count against the bound until written.
    writing: usize,
    /// Lines dropped since the writer last reported them.
    unreported: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LogQueue {
    /// Starts the thread that writes the queued lines to `sink`; once it has written every line that waited, it calls
    /// `report` with the number of lines dropped since it last did, if any were.
    fn start(
        capacity: usize,
        sink: impl Write + Send + 'static,
        dropped: Counter,
        report: impl Fn(u64) + Send + 'static,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            added: Condvar::new(),
            written: Condvar::new(),
        });
        let writer = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("agentd-log".into())
            .spawn(move || write_lines(&writer, sink, report))?;
        Ok(Self {
            shared,
            capacity,
            dropped,
        })
    }

    fn push(&self, line: &[u8]) {
        let mut state = self.shared.lock();
        if state.waiting.len() + state.writing + line.len() > self.capacity {
            state.unreported += 1;
            drop(state);
            self.dropped.inc();
            return;
        }
        let was_empty = state.waiting.is_empty();
        state.waiting.extend_from_slice(line);
        drop(state);
        if was_empty {
            self.shared.added.notify_one();
        }
    }

    fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while !state.waiting.is_empty() || state.writing > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            state = self
                .shared
                .written
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// The writer thread: takes every line waiting and writes them in one go; once nothing waits, reports the lines
/// dropped meanwhile.
fn write_lines(shared: &Shared, mut sink: impl Write, report: impl Fn(u64)) {
    let mut taken = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.waiting.is_empty() {
            state = shared
                .added
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        std::mem::swap(&mut state.waiting, &mut taken);
        state.writing = taken.len();
        drop(state);
        // A sink that fails (a closed stderr) loses the lines, as a direct write would.
        let _ = sink.write_all(&taken).and_then(|()| sink.flush());
        taken.clear();
        // The two buffers take turns: each keeps at most this much room once a stall's lines are written.
        taken.shrink_to(KEPT_BUFFER);
        let mut state = shared.lock();
        state.writing = 0;
        let dropped = if state.waiting.is_empty() {
            std::mem::take(&mut state.unreported)
        } else {
            0
        };
        drop(state);
        shared.written.notify_all();
        if dropped > 0 {
            report(dropped);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{self, Receiver, SyncSender};

    use super::*;

    /// What the first write holds: the sender that says it began, the receiver it waits on.
    type FirstWrite = (SyncSender<()>, Receiver<()>);

    /// A sink whose first write says it began, then waits until the test lets it go; it keeps what it is given.
    #[derive(Clone)]
    struct Stalled {
        first: Arc<Mutex<Option<FirstWrite>>>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Stalled {
        /// The sink, a receiver told when its first write began, and the sender that lets that write go on.
        fn new() -> (Self, Receiver<()>, SyncSender<()>) {
            let (began, writing) = mpsc::sync_channel(1);
            let (go, wait) = mpsc::sync_channel(1);
            let sink = Self {
                first: Arc::new(Mutex::new(Some((began, wait)))),
                written: Arc::default(),
            };
            (sink, writing, go)
        }

        fn text(&self) -> String {
            String::from_utf8(self.written.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for Stalled {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let first = self.first.lock().unwrap().take();
            if let Some((began, wait)) = first {
                began.send(()).unwrap();
                wait.recv().unwrap();
            }
            self.written.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_holds_up_no_caller_and_what_does_not_fit_is_dropped_counted_and_reported() {
        let wait = Duration::from_secs(30);
        let (sink, writing, go) = Stalled::new();
        let dropped = Counter::default();
        let (reported_tx, reported) = mpsc::channel();
        let queue = LogQueue::start(100, sink.clone(), dropped.clone(), move |n| {
            reported_tx.send(n).unwrap();
        })
        .unwrap();
        // The writer takes the first line and waits in the sink; the line counts as queued until it is written.
        queue.push(b"first\n");
        writing.recv_timeout(wait).unwrap();
        let lines: Vec<String> = (0..40).map(|i| format!("line {i:02}\n")).collect();
        for line in &lines {
            queue.push(line.as_bytes());
        }
        assert!(
            !queue.flush(Duration::from_millis(20)),
            "nothing written yet"
        );
        // 100 bytes, 6 of them the first line's: 11 of the 8-byte lines fit.
        assert_eq!(dropped.get(), 29);
        assert!(
            reported.try_recv().is_err(),
            "nothing reported before the writer caught up"
        );

        go.send(()).unwrap();
        assert_eq!(
            reported.recv_timeout(wait).unwrap(),
            29,
            "the lines dropped, reported once"
        );
        assert_eq!(
            sink.text(),
            format!("first\n{}", lines[..11].concat()),
            "reported once the lines kept are written, whole and in order"
        );
        assert!(queue.flush(wait));

        queue.push(b"after\n");
        assert!(queue.flush(wait));
        assert!(
            sink.text().ends_with("line 10\nafter\n"),
            "a line that fits is written again"
        );
        assert_eq!(dropped.get(), 29);
        assert!(
            reported.try_recv().is_err(),
            "nothing more dropped, nothing more reported"
        );
    }
}
