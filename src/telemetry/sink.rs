//! Where every log line goes: one in-memory buffer that a writer thread drains to stdout.
//!
//! Writing each line with its own `write(2)` on the thread that made the decision cost a DNS
//! query more than a third of its CPU time (BENCHMARKS.md). Here a line is appended to a
//! shared buffer under a short lock, and a dedicated thread writes whatever has accumulated
//! in one call, so under load hundreds of lines share a system call. Lines keep the order in
//! which they were appended, audit lines and `tracing`'s alike.
//!
//! Nothing is dropped: when stdout does not keep up (a blocked pipe), appenders wait once
//! [`HIGH_WATER`] bytes are pending, as they would have waited in `write(2)` before. A line
//! reaches stdout at most [`GATHER`] after it was appended, and [`flush`] waits for everything
//! appended so far (egressd calls it before it exits; a `kill -9` loses at most that much).

use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Pending bytes at which appenders wait for the writer.
const HIGH_WATER: usize = 8 << 20;
/// Pending bytes written at once without waiting for more.
const BATCH: usize = 64 << 10;
/// How long the writer lets lines gather after the first one of a batch arrives. Every wake-up
/// of the writer costs tens of microseconds on a virtual machine; with this, it wakes at most
/// 200 times a second, or once per 64 KiB of lines when busy.
const GATHER: Duration = Duration::from_millis(5);

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// Bytes appended since start, and bytes written (or given up on) since start.
    appended: u64,
    written: u64,
    /// The writer is waiting for the first line of a batch.
    writer_idle: bool,
    /// The writer is waiting for a batch to fill (or [`GATHER`] to pass).
    writer_gathering: bool,
    /// Someone is waiting in [`flush`]: write without gathering.
    hurry: bool,
}

struct Sink {
    pending: Mutex<Pending>,
    /// Wakes the writer (a first line) and waiters (space freed, bytes written).
    writer: Condvar,
    progress: Condvar,
}

impl Sink {
    fn new() -> Self {
        Self { pending: Mutex::new(Pending::default()), writer: Condvar::new(), progress: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, lines: &[u8]) {
        let mut p = self.lock();
        while p.buf.len() >= HIGH_WATER {
            p = self.progress.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.buf.extend_from_slice(lines);
        p.appended += lines.len() as u64;
        if p.writer_idle || (p.writer_gathering && p.buf.len() >= BATCH) {
            p.writer_idle = false;
            p.writer_gathering = false;
            self.writer.notify_one();
        }
    }

    fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut p = self.lock();
        let target = p.appended;
        while p.written < target {
            p.hurry = true;
            if p.writer_gathering {
                p.writer_gathering = false;
                self.writer.notify_one();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            p = self.progress.wait_timeout(p, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }
}

fn sink() -> &'static Sink {
    static SINK: OnceLock<&'static Sink> = OnceLock::new();
    SINK.get_or_init(|| {
        let sink: &'static Sink = Box::leak(Box::new(Sink::new()));
        let started =
            std::thread::Builder::new().name("egressd-log".into()).spawn(move || write_loop(sink, std::io::stdout()));
        if started.is_err() {
            // No writer thread: lines are written by the appender itself (see `append`).
            eprintln!("egressd: could not start the log writer thread; writing lines directly");
            NO_WRITER.set(()).ok();
        }
        sink
    })
}

static NO_WRITER: OnceLock<()> = OnceLock::new();

fn write_loop(sink: &Sink, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut p = sink.lock();
        while p.buf.is_empty() {
            p.writer_idle = true;
            p = sink.writer.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.writer_idle = false;
        // Let the lines of a burst gather into one write.
        let deadline = Instant::now() + GATHER;
        while p.buf.len() < BATCH && !p.hurry {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            p.writer_gathering = true;
            p = sink.writer.wait_timeout(p, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        p.writer_gathering = false;
        p.hurry = false;
        std::mem::swap(&mut p.buf, &mut batch);
        drop(p);
        // A failed write (stdout closed) loses the batch, as a failed `write(2)` lost the line.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        let n = batch.len() as u64;
        batch.clear();
        if batch.capacity() > HIGH_WATER {
            batch = Vec::new();
        }
        sink.lock().written += n;
        sink.progress.notify_all();
    }
}

/// Appends complete lines (each ending in `\n`).
pub fn append(lines: &[u8]) {
    let sink = sink();
    if NO_WRITER.get().is_some() {
        let _ = std::io::stdout().lock().write_all(lines);
        return;
    }
    sink.append(lines);
}

/// Waits (at most `limit`) until every line appended before the call is written.
pub fn flush(limit: Duration) {
    let sink = sink();
    if NO_WRITER.get().is_none() {
        sink.flush(limit);
    }
}

/// `tracing_subscriber`'s writer: the formatter hands over one whole line per `write`.
#[derive(Clone, Copy, Default)]
pub struct SinkWriter;

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SinkWriter {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> Self::Writer {
        SinkWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// An output that records what the writer wrote, and can be made to block.
    #[derive(Clone, Default)]
    struct Recorder {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Recorder {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.bytes.lock().unwrap().extend_from_slice(b);
            *self.writes.lock().unwrap() += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn private_sink(out: Recorder) -> &'static Sink {
        let sink: &'static Sink = Box::leak(Box::new(Sink::new()));
        std::thread::spawn(move || write_loop(sink, out));
        sink
    }

    #[test]
    fn lines_come_out_whole_in_order_batched_and_flush_waits_for_them() {
        let out = Recorder::default();
        let sink = private_sink(out.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        sink.append(format!("thread={t} line={i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(sink.flush(Duration::from_secs(10)), "flush timed out");
        let text = String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8000, "every line written once");
        for t in 0..4 {
            let mine: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with(&format!("thread={t} "))).collect();
            let want: Vec<String> = (0..2000).map(|i| format!("thread={t} line={i}")).collect();
            assert_eq!(mine, want, "thread {t}'s lines whole and in order");
        }
        let writes = *out.writes.lock().unwrap();
        assert!(writes < 8000, "lines were batched: {writes} writes for 8000 lines");
    }

    #[test]
    fn appenders_wait_when_the_output_blocks_and_nothing_is_lost() {
        let out = Recorder::default();
        let sink = private_sink(out.clone());
        let gate = out.gate.lock().unwrap();
        // The writer takes the first batch and blocks in `write`; the next HIGH_WATER bytes
        // pend; the appender then has to wait.
        let line = vec![b'x'; 1023].into_iter().chain([b'\n']).collect::<Vec<u8>>();
        let total = 3 * HIGH_WATER / line.len();
        let appender = std::thread::spawn(move || {
            for _ in 0..total {
                sink.append(&line);
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!appender.is_finished(), "the appender waits for a blocked output");
        assert!(sink.lock().buf.len() <= HIGH_WATER + 1024, "pending bytes stay bounded");
        drop(gate);
        appender.join().unwrap();
        assert!(sink.flush(Duration::from_secs(10)));
        assert_eq!(out.bytes.lock().unwrap().len(), total * 1024, "nothing lost");
    }
}
