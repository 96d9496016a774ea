//! Where every log line goes: stdout, written by whoever appends, batched when appenders
//! collide.
//!
//! A line is written by the thread that logs it, before it goes on (so an audit line is on
//! stdout before the response it records is sent), unless another thread is writing at that
//! moment: then the line joins a shared buffer, and the writing thread writes that buffer too
//! before it lets go, in one call. Under load, many lines share a `write(2)`; when quiet, each
//! line is written at once. No thread waits for a writer to wake up, and there is no log thread.
//!
//! Nothing is dropped: when stdout does not keep up (a blocked pipe), appenders wait once
//! [`HIGH_WATER`] bytes are pending, as they would have waited in `write(2)`. Lines keep the
//! order in which they were appended, audit lines and `tracing`'s alike.

use std::io::Write;
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Pending bytes at which appenders wait for the writer.
const HIGH_WATER: usize = 8 << 20;

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// A thread is writing (outside the lock); it will also write what is in `buf`.
    writing: bool,
    /// A cleared buffer kept for reuse, so batching does not allocate.
    spare: Vec<u8>,
}

struct Sink<W> {
    pending: Mutex<Pending>,
    /// Signalled whenever the writer finishes a write.
    progress: Condvar,
    /// Only the thread holding the writer role locks it, so it is never contended.
    out: Mutex<W>,
}

impl<W: Write> Sink<W> {
    fn new(out: W) -> Self {
        Self { pending: Mutex::new(Pending::default()), progress: Condvar::new(), out: Mutex::new(out) }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, lines: &[u8]) {
        let mut p = self.lock();
        while p.writing && p.buf.len() >= HIGH_WATER {
            p = self.progress.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.buf.extend_from_slice(lines);
        if p.writing {
            // The writer writes it before it lets go.
            return;
        }
        p.writing = true;
        let mut batch = std::mem::take(&mut p.spare);
        std::mem::swap(&mut p.buf, &mut batch);
        drop(p);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // A failed write (stdout closed) loses the batch, as a failed `write(2)` lost the line.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            let mut p = self.lock();
            if p.buf.is_empty() {
                p.writing = false;
                if batch.capacity() <= HIGH_WATER {
                    p.spare = batch;
                }
                drop(p);
                self.progress.notify_all();
                return;
            }
            std::mem::swap(&mut p.buf, &mut batch);
            drop(p);
            self.progress.notify_all();
        }
    }

    /// Waits (at most `limit`) until nothing is pending; true if it got there.
    fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut p = self.lock();
        while p.writing || !p.buf.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            p = self.progress.wait_timeout(p, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }
}

static STDOUT: LazyLock<Sink<std::io::Stdout>> = LazyLock::new(|| Sink::new(std::io::stdout()));

/// Appends complete lines (each ending in `\n`).
pub fn append(lines: &[u8]) {
    STDOUT.append(lines);
}

/// Waits (at most `limit`) until every line appended so far is written.
pub fn flush(limit: Duration) {
    STDOUT.flush(limit);
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

    /// An output that records what was written, can be slowed down, and can be made to block.
    #[derive(Clone, Default)]
    struct Recorder {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
        gate: Arc<Mutex<()>>,
        delay: Duration,
    }

    impl Write for Recorder {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            std::thread::sleep(self.delay);
            self.bytes.lock().unwrap().extend_from_slice(b);
            *self.writes.lock().unwrap() += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn sink(out: Recorder) -> &'static Sink<Recorder> {
        Box::leak(Box::new(Sink::new(out)))
    }

    #[test]
    fn a_line_is_written_before_append_returns() {
        let out = Recorder::default();
        let sink = sink(out.clone());
        sink.append(b"first\n");
        assert_eq!(out.bytes.lock().unwrap().as_slice(), b"first\n");
        sink.append(b"second\n");
        assert_eq!(out.bytes.lock().unwrap().as_slice(), b"first\nsecond\n");
        assert_eq!(*out.writes.lock().unwrap(), 2);
    }

    #[test]
    fn colliding_lines_come_out_whole_in_order_and_batched() {
        let out = Recorder { delay: Duration::from_micros(200), ..Recorder::default() };
        let sink = sink(out.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..500 {
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
        assert_eq!(lines.len(), 2000, "every line written once");
        for t in 0..4 {
            let mine: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with(&format!("thread={t} "))).collect();
            let want: Vec<String> = (0..500).map(|i| format!("thread={t} line={i}")).collect();
            assert_eq!(mine, want, "thread {t}'s lines whole and in order");
        }
        let writes = *out.writes.lock().unwrap();
        assert!(writes < 2000, "colliding lines were batched: {writes} writes for 2000 lines");
    }

    #[test]
    fn appenders_wait_when_the_output_blocks_and_nothing_is_lost() {
        let out = Recorder::default();
        let sink = sink(out.clone());
        let gate = out.gate.lock().unwrap();
        // The first appender becomes the writer and blocks in `write`; the others pend lines
        // until HIGH_WATER, then wait.
        let line = vec![b'x'; 1023].into_iter().chain([b'\n']).collect::<Vec<u8>>();
        let per_thread = 2 * HIGH_WATER / line.len();
        let appenders: Vec<_> = (0..2)
            .map(|_| {
                let line = line.clone();
                std::thread::spawn(move || {
                    for _ in 0..per_thread {
                        sink.append(&line);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        assert!(appenders.iter().all(|a| !a.is_finished()), "appenders wait for a blocked output");
        assert!(sink.lock().buf.len() <= HIGH_WATER + 1024, "pending bytes stay bounded");
        assert!(!sink.flush(Duration::from_millis(50)), "flush cannot finish while the output blocks");
        drop(gate);
        for a in appenders {
            a.join().unwrap();
        }
        assert!(sink.flush(Duration::from_secs(10)));
        assert_eq!(out.bytes.lock().unwrap().len(), 2 * per_thread * 1024, "nothing lost");
    }
}
