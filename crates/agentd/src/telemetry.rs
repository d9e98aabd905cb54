//! Log setup: human-readable text or one JSON object per line, to stderr. `RUST_LOG` filters (default `info`).
//!
//! The lines are written by a thread of their own (`agentd-log`), never by the thread that logs them: a stderr read
//! slowly, or for a while not at all (a log collector that stalls, a pipe nobody drains), holds up no request and no
//! run. Up to [`QUEUED_BYTES`] of lines wait for that thread; a line logged while that much waits is dropped and
//! counted (`agentd_log_lines_dropped_total`), and once the thread has written what waited it logs how many were
//! dropped. Before the process exits, [`flush`] waits, bounded, for the lines still queued.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// How many bytes of log lines may wait for the writer: about 15,000 lines of JSON, seconds of a busy replica's log.
const QUEUED_BYTES: usize = 4 * 1024 * 1024;
/// The writer writes what waits in one write up to about this size.
const WRITE_CHUNK: usize = 64 * 1024;

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
    let writer = match queue {
        Ok(queue) => {
            let _ = QUEUE.set(queue);
            Writer::Queued
        }
        Err(error) => {
            eprintln!(
                "cannot start the log writer thread ({error}); logging from each thread instead"
            );
            Writer::Direct
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || Line::new(writer))
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

#[derive(Debug, Clone, Copy)]
enum Writer {
    /// Through [`QUEUE`].
    Queued,
    /// To stderr from the thread that logs (the writer thread could not be started).
    Direct,
}

/// One log line as it is formatted; queued (or written) whole when the formatter drops it.
struct Line {
    bytes: Vec<u8>,
    writer: Writer,
}

impl Line {
    fn new(writer: Writer) -> Self {
        Self {
            bytes: Vec::new(),
            writer,
        }
    }
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
        let bytes = std::mem::take(&mut self.bytes);
        match (self.writer, QUEUE.get()) {
            (Writer::Queued, Some(queue)) => queue.push(bytes),
            _ => {
                let _ = io::stderr().write_all(&bytes);
            }
        }
    }
}

/// Lines waiting for a thread that writes them to a sink, bounded in bytes.
struct LogQueue {
    lines: Sender<Vec<u8>>,
    /// Bytes queued and not yet written: the bound, and what [`LogQueue::flush`] waits for.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    /// Every line dropped.
    dropped: Counter,
    /// Lines dropped since the writer last reported them.
    unreported: Arc<AtomicU64>,
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
        let (lines, received) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let unreported = Arc::new(AtomicU64::new(0));
        let (written, missed) = (Arc::clone(&queued), Arc::clone(&unreported));
        std::thread::Builder::new()
            .name("agentd-log".into())
            .spawn(move || write_lines(&received, sink, &written, &missed, report))?;
        Ok(Self {
            lines,
            queued,
            capacity,
            dropped,
            unreported,
        })
    }

    fn push(&self, line: Vec<u8>) {
        let len = line.len();
        let fits = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + len <= self.capacity).then_some(queued + len)
            })
            .is_ok();
        if !fits {
            self.dropped.inc();
            self.unreported.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Err(mpsc::SendError(line)) = self.lines.send(line) {
            // The writer thread is gone (it only ends with the process): write from here.
            self.queued.fetch_sub(len, Ordering::AcqRel);
            let _ = io::stderr().write_all(&line);
        }
    }

    fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.queued.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// The writer thread: writes each line and those waiting behind it together; once nothing waits, reports the lines
/// dropped meanwhile.
fn write_lines(
    lines: &Receiver<Vec<u8>>,
    mut sink: impl Write,
    queued: &AtomicUsize,
    unreported: &AtomicU64,
    report: impl Fn(u64),
) {
    let mut chunk = Vec::with_capacity(WRITE_CHUNK);
    while let Ok(line) = lines.recv() {
        chunk.extend_from_slice(&line);
        let mut taken = line.len();
        while chunk.len() < WRITE_CHUNK {
            let Ok(line) = lines.try_recv() else { break };
            chunk.extend_from_slice(&line);
            taken += line.len();
        }
        // A sink that fails (a closed stderr) loses the lines, as a direct write would.
        let _ = sink.write_all(&chunk).and_then(|()| sink.flush());
        chunk.clear();
        if chunk.capacity() > WRITE_CHUNK * 2 {
            chunk.shrink_to(WRITE_CHUNK);
        }
        let caught_up = queued.fetch_sub(taken, Ordering::AcqRel) == taken;
        if caught_up {
            let dropped = unreported.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                report(dropped);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc::SyncSender;

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
        queue.push(b"first\n".to_vec());
        writing.recv_timeout(wait).unwrap();
        let lines: Vec<String> = (0..40).map(|i| format!("line {i:02}\n")).collect();
        for line in &lines {
            queue.push(line.clone().into_bytes());
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

        queue.push(b"after\n".to_vec());
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
