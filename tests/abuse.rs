//! Abuse and fault tests (issue 6, part 3): hostile clients, broken upstreams and a hostile
//! environment against the built `egressd run` binary. Each test bounds its own run time, checks
//! that egressd stays up and fails closed, and where memory is the question reads the VmRSS of
//! the egressd process from /proc.
//!
//! The tests of this file run one at a time (a process-wide lock): several load the machine on
//! purpose, and the timing bounds of the others must not depend on that. The whole file takes
//! about two minutes.
//!
//! Every socket is bound or dialled on 127.0.0.0/8.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

const MIB: u64 = 1024 * 1024;

// =============================================================================================
// Helpers
// =============================================================================================

/// One test at a time (see the module docs). Taken outside `bounded`, so waiting for the lock
/// does not count against a test's time bound.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Resident set size of a process, from `/proc/PID/status` (`VmRSS`).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("egressd (pid {pid}) is gone: /proc/{pid}/status: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Samples the RSS of `pid` every 20 ms until dropped; `max()` is the largest sample so far.
struct RssWatch {
    max: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let max = Arc::new(AtomicU64::new(rss_bytes(pid)));
        let m = max.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kib) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    {
                        m.fetch_max(kib * 1024, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        RssWatch { max, task }
    }

    fn max(&self) -> u64 {
        self.max.load(Ordering::SeqCst)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Panics with egressd's output if the process has exited.
fn assert_alive(e: &mut Egressd) {
    if let Some(status) = e.try_wait() {
        panic!("egressd exited ({status}); output:\n{}", e.dump());
    }
}

/// An allow rule for `allowed.test` and every name below it on `ports`.
fn web_rules(ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "[[rule]]\nname = \"web\"\nhosts = [\"allowed.test\", \"*.allowed.test\"]\nports = [{}]\n",
        ports.join(", ")
    )
}

/// A GET through the proxy that must be answered within `limit`.
async fn get_within(proxy: SocketAddr, host: &str, port: u16, path: &str, limit: Duration) -> Resp {
    match tokio::time::timeout(limit, get(proxy, host, port, path)).await {
        Ok(r) => r,
        Err(_) => panic!("GET http://{host}:{port}{path} not answered within {limit:?}"),
    }
}

/// Proof that egressd serves again: a GET to the allowed origin answered 200 within `limit`
/// (retried while connections still drain).
async fn serves_again(e: &mut Egressd, port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        assert_alive(e);
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut s = TcpStream::connect(e.proxy).await.ok()?;
            let req = format!(
                "GET http://allowed.test:{port}/again HTTP/1.1\r\nHost: allowed.test:{port}\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.ok()?;
            read_response(&mut s, false).await.ok()
        })
        .await;
        if let Ok(Some(r)) = attempt {
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.text(), ORIGIN_BODY);
            return;
        }
        if Instant::now() > deadline {
            panic!("egressd did not serve again within {limit:?}; output:\n{}", e.dump());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of one Prometheus sample (`name{labels}` with every given label), if present.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        if !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return None;
        }
        value.parse().ok()
    })
}

/// Reads a request head (up to the blank line) from an origin-side socket.
async fn read_request_head(s: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return false;
        }
    }
    true
}

/// Counters of a [`RawOrigin`].
#[derive(Default)]
struct RawCounters {
    accepted: AtomicUsize,
    /// Response bytes written (head and body).
    written: AtomicU64,
    /// Connections whose handler returned (the peer closed, or a write failed).
    finished: AtomicUsize,
}

/// A hand-written HTTP/1.1 origin on 127.0.0.1 whose every connection runs `handler` (after the
/// request head was read, when `read_head`).
struct RawOrigin {
    addr: SocketAddr,
    counters: Arc<RawCounters>,
    task: JoinHandle<()>,
}

impl RawOrigin {
    async fn start<F, Fut>(read_head: bool, handler: F) -> RawOrigin
    where
        F: Fn(TcpStream, Arc<RawCounters>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(RawCounters::default());
        let c = counters.clone();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                c.accepted.fetch_add(1, Ordering::SeqCst);
                let (c, handler) = (c.clone(), handler.clone());
                tokio::spawn(async move {
                    if !read_head || read_request_head(&mut s).await {
                        handler(s, c.clone()).await;
                    }
                    c.finished.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        RawOrigin { addr, counters, task }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `data` and counts it.
async fn send(s: &mut TcpStream, c: &RawCounters, data: &[u8]) -> bool {
    if s.write_all(data).await.is_err() {
        return false;
    }
    c.written.fetch_add(data.len() as u64, Ordering::SeqCst);
    true
}

/// Closes `s` with a TCP reset (SO_LINGER 0).
fn reset(s: TcpStream) {
    s.set_zero_linger().unwrap();
    drop(s);
}

fn is_http_audit(v: &Value, host: &str) -> bool {
    is_decision(v) && s(v, "kind") == "http" && s(v, "host") == host
}

// =============================================================================================
// 1. Slowloris
// =============================================================================================

/// 1,000 connections dribble a request head one byte at a time (and one in ten sends nothing at
/// all), reconnecting whenever egressd cuts them, for 12 s. With `header_timeout = "2s"` (the
/// attack scaled from "a byte every few seconds" against the default 10 s), every such connection
/// is closed within the header timeout however steadily it trickles, and a normal client sending
/// whole requests is served throughout with bounded latency. Afterwards egressd's descriptors
/// return to their baseline.
#[tokio::test(flavor = "multi_thread")]
async fn slowloris_1000_connections_while_a_normal_client_is_served() {
    let _serial = serial().await;
    bounded(Duration::from_secs(45), async {
        const ATTACKERS: usize = 1000;
        const ATTACK: Duration = Duration::from_secs(12);
        const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
        const BYTE_EVERY: Duration = Duration::from_millis(700);

        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let mut e =
            Egressd::start_opts(Opts { rules: &web_rules(&[port]), header_timeout: "2s", ..Default::default() }).await;
        let proxy = e.proxy;
        let pid = e.pid();
        let baseline_fds = open_fds(pid);

        let stop = Arc::new(AtomicBool::new(false));
        let longest_ms = Arc::new(AtomicU64::new(0));
        let cuts = Arc::new(AtomicUsize::new(0));
        let bytes_sent = Arc::new(AtomicU64::new(0));
        let head: Arc<[u8]> = format!(
            "GET http://allowed.test:{port}/slow HTTP/1.1\r\nHost: allowed.test:{port}\r\nX-Slow: {}",
            "a".repeat(4096)
        )
        .into_bytes()
        .into();
        let mut attackers = Vec::with_capacity(ATTACKERS);
        for i in 0..ATTACKERS {
            let (stop, longest_ms, cuts, bytes_sent, head) =
                (stop.clone(), longest_ms.clone(), cuts.clone(), bytes_sent.clone(), head.clone());
            attackers.push(tokio::spawn(async move {
                let silent = i % 10 == 0;
                // Spread the first byte of each connection over the period.
                let offset = BYTE_EVERY * (i as u32 % 100) / 100;
                while !stop.load(Ordering::SeqCst) {
                    let Ok(mut s) = TcpStream::connect(proxy).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let opened = Instant::now();
                    let mut wait = offset;
                    let mut k = 0;
                    let mut buf = [0u8; 1024];
                    let cut = loop {
                        match tokio::time::timeout(wait, s.read(&mut buf)).await {
                            // Closed by egressd (or an error response, then closed).
                            Ok(Ok(0)) | Ok(Err(_)) => break true,
                            Ok(Ok(_)) => continue,
                            Err(_) => {}
                        }
                        wait = BYTE_EVERY;
                        if stop.load(Ordering::SeqCst) {
                            break false;
                        }
                        if !silent {
                            if s.write_all(&head[k..=k]).await.is_err() {
                                break true;
                            }
                            bytes_sent.fetch_add(1, Ordering::Relaxed);
                            k = (k + 1) % head.len();
                        }
                    };
                    if cut {
                        cuts.fetch_add(1, Ordering::SeqCst);
                        longest_ms.fetch_max(opened.elapsed().as_millis() as u64, Ordering::SeqCst);
                    }
                }
            }));
        }

        // The normal client: a whole request every 250 ms, each on a fresh connection.
        let started = Instant::now();
        let mut served = 0;
        let mut slowest = Duration::ZERO;
        while started.elapsed() < ATTACK {
            let t = Instant::now();
            let r = get_within(proxy, "allowed.test", port, "/normal", Duration::from_secs(3)).await;
            assert_eq!(r.status, 200, "normal client during slowloris: {r:?}");
            assert_eq!(r.text(), ORIGIN_BODY);
            slowest = slowest.max(t.elapsed());
            served += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_alive(&mut e);
        stop.store(true, Ordering::SeqCst);
        for a in attackers {
            a.await.unwrap();
        }

        let cuts = cuts.load(Ordering::SeqCst);
        let longest = Duration::from_millis(longest_ms.load(Ordering::SeqCst));
        eprintln!(
            "slowloris: {cuts} attacker connections cut, longest held {longest:?}, {} bytes dribbled; \
             normal client served {served} times, slowest {slowest:?}",
            bytes_sent.load(Ordering::Relaxed)
        );
        assert!(served >= 20, "the normal client was served only {served} times in {ATTACK:?}");
        // One second is the first SYN retransmit: slower means the listen backlog overflowed
        // and the kernel dropped the normal client's SYN.
        assert!(slowest < Duration::from_secs(1), "a normal request took {slowest:?} during the attack");
        // Each attacker was cut at least ~5 times in 12 s with a 2 s header timeout.
        assert!(cuts >= 3 * ATTACKERS, "only {cuts} attacker connections were cut by egressd");
        assert!(
            longest <= HEADER_TIMEOUT + Duration::from_millis(1000),
            "an attacker held a connection for {longest:?} (header_timeout {HEADER_TIMEOUT:?})"
        );
        assert!(origin.recorded().iter().all(|r| r.uri != "/slow"), "a dribbled request head reached the origin");

        // Every attacker socket is released.
        let deadline = Instant::now() + Duration::from_secs(5);
        while open_fds(pid) > baseline_fds + 10 {
            assert!(
                Instant::now() < deadline,
                "egressd holds {} descriptors 5 s after the attack (baseline {baseline_fds})",
                open_fds(pid)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        serves_again(&mut e, port, Duration::from_secs(5)).await;
    })
    .await
}

// =============================================================================================
// 2. Connection flood past max_connections
// =============================================================================================

/// `max_connections = 50`: 50 connections hold slow requests, 150 more connect and sit idle.
/// egressd serves at most 50 at once (the gauge and the origin agree), queues the rest in the
/// kernel backlog — all of them: the listen backlog is 1024, so no SYN is dropped — (a fresh
/// client is not served while the slots are taken), does not crash, and serves again once the
/// flood is closed.
#[tokio::test(flavor = "multi_thread")]
async fn connection_flood_past_max_connections_is_queued_and_service_resumes() {
    let _serial = serial().await;
    bounded(Duration::from_secs(40), async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let mut e = Egressd::start_opts(Opts {
            rules: &web_rules(&[port]),
            proxy_extra: "max_connections = 50",
            header_timeout: "10s",
            ..Default::default()
        })
        .await;
        let proxy = e.proxy;

        // 50 holders: each request takes the origin 4 s to answer.
        let mut holders = Vec::new();
        for i in 0..50 {
            let mut s = dial(proxy).await;
            let req =
                format!("GET http://allowed.test:{port}/delay/4000/{i} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            holders.push(s);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while origin.recorded().len() < 50 {
            assert!(
                Instant::now() < deadline,
                "only {} of 50 held requests reached the origin",
                origin.recorded().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // 150 more: queued in the backlog (a refusal or a dropped SYN counts as not queued).
        let mut flood = Vec::new();
        let mut refused = 0;
        for _ in 0..150 {
            match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(proxy)).await {
                Ok(Ok(s)) => flood.push(s),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                Ok(Err(e)) => panic!("connect during the flood: {e}"),
                Err(_) => refused += 1,
            }
        }
        // A fresh client with a whole request: queued behind the flood, not served now.
        let mut probe = dial(proxy).await;
        probe
            .write_all(
                format!("GET http://allowed.test:{port}/probe HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut b = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(1500), probe.read(&mut b)).await;
        assert!(early.is_err(), "a client past max_connections was answered at once: {early:?}");

        let metrics = e.admin_get("/metrics").await.expect("/metrics during the flood");
        let active = metric(&metrics.text(), "egressd_proxy_active_connections", &[("kind", "http")])
            .unwrap_or_else(|| panic!("no egressd_proxy_active_connections{{kind=\"http\"}} in:\n{}", metrics.text()));
        eprintln!("flood: {} queued, {refused} refused, active gauge {active}", flood.len());
        // The listen backlog (1024) holds them all: none has its SYN dropped.
        assert_eq!(refused, 0, "{refused} of 150 connections past max_connections were not queued");
        assert!(active <= 50.0, "{active} connections served at once with max_connections = 50");
        assert!(origin.recorded().len() <= 50, "{} requests reached the origin", origin.recorded().len());
        assert!(origin.recorded().iter().all(|r| r.uri != "/probe"), "the queued probe was served past the limit");
        assert_alive(&mut e);

        drop(holders);
        drop(flood);
        drop(probe);
        serves_again(&mut e, port, Duration::from_secs(15)).await;
        let metrics = e.admin_get("/metrics").await.expect("/metrics after the flood");
        let active = metric(&metrics.text(), "egressd_proxy_active_connections", &[("kind", "http")]).unwrap();
        assert!(active <= 1.0, "{active} connections still counted after the flood closed");
    })
    .await
}

// =============================================================================================
// 3. A 10 MB header line
// =============================================================================================

/// 16 clients at once send a request whose head never ends within 10 MB: half one 10 MB header
/// line, half 100,000 header lines of 100 bytes. Each gets `431` or a closed connection (never a
/// forwarded request), egressd's RSS stays below 100 MiB throughout, and it serves again.
#[tokio::test(flavor = "multi_thread")]
async fn ten_megabyte_header_line_gets_431_or_close_with_bounded_memory() {
    let _serial = serial().await;
    bounded(Duration::from_secs(40), async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let mut e = Egressd::start_opts(Opts { rules: &web_rules(&[port]), ..Default::default() }).await;
        let proxy = e.proxy;
        let watch = RssWatch::start(e.pid());
        let before = rss_bytes(e.pid());

        let mut clients = Vec::new();
        for i in 0..16 {
            clients.push(tokio::spawn(async move {
                let s = dial(proxy).await;
                let (mut rd, mut wr) = s.into_split();
                let writer = tokio::spawn(async move {
                    let head = format!("GET http://allowed.test:{port}/big HTTP/1.1\r\nHost: allowed.test:{port}\r\n");
                    if wr.write_all(head.as_bytes()).await.is_err() {
                        return 0u64;
                    }
                    let mut sent = 0u64;
                    let chunk: Vec<u8> = if i % 2 == 0 {
                        // One header line of 10 MB.
                        let _ = wr.write_all(b"X-Big: ").await;
                        vec![b'a'; 64 * 1024]
                    } else {
                        // Many 100-byte header lines.
                        let line = format!("X-Many: {}\r\n", "b".repeat(90));
                        line.repeat(640).into_bytes()
                    };
                    while sent < 10 * MIB {
                        if wr.write_all(&chunk).await.is_err() {
                            return sent;
                        }
                        sent += chunk.len() as u64;
                    }
                    let _ = wr.write_all(b"\r\n\r\n").await;
                    sent
                });
                let read = tokio::time::timeout(Duration::from_secs(15), read_until_closed(&mut rd)).await;
                writer.abort();
                let (got, _) = read.unwrap_or_else(|_| panic!("client {i}: connection neither answered nor closed"));
                got
            }));
        }
        for (i, c) in clients.into_iter().enumerate() {
            let got = c.await.unwrap();
            let text = String::from_utf8_lossy(&got[..got.len().min(200)]).into_owned();
            assert!(
                got.is_empty() || text.starts_with("HTTP/1.1 431"),
                "client {i}: expected 431 or a closed connection, got {text:?}"
            );
        }
        let peak = watch.max();
        eprintln!("huge heads: RSS before {} KiB, peak {} KiB", before / 1024, peak / 1024);
        assert!(peak < 100 * MIB, "egressd RSS peaked at {} MiB", peak / MIB);
        assert!(origin.recorded().iter().all(|r| r.uri != "/big"), "an oversized head was forwarded");
        serves_again(&mut e, port, Duration::from_secs(5)).await;
    })
    .await
}

// =============================================================================================
// 4. A client that never reads
// =============================================================================================

/// Four clients download a 1 GiB response through the proxy and never read a byte. Back-pressure
/// stops the origin after a bounded amount (socket buffers), egressd's RSS stays below 100 MiB,
/// and when the clients go away the upstream connections are released.
#[tokio::test(flavor = "multi_thread")]
async fn client_that_never_reads_gets_back_pressure_and_bounded_memory() {
    let _serial = serial().await;
    bounded(Duration::from_secs(40), async {
        let big = RawOrigin::start(true, |mut s, c| async move {
            let total: u64 = 1 << 30;
            if !send(&mut s, &c, format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n").as_bytes()).await {
                return;
            }
            let chunk = vec![b'z'; 64 * 1024];
            let mut sent = 0;
            while sent < total {
                if !send(&mut s, &c, &chunk).await {
                    return;
                }
                sent += chunk.len() as u64;
            }
        })
        .await;
        let origin = HttpOrigin::start().await;
        let (bp, op) = (big.port(), origin.port());
        let mut e = Egressd::start_opts(Opts { rules: &web_rules(&[bp, op]), ..Default::default() }).await;
        let watch = RssWatch::start(e.pid());
        let before = rss_bytes(e.pid());

        let mut clients = Vec::new();
        for i in 0..4 {
            let mut s = dial(e.proxy).await;
            s.write_all(
                format!("GET http://allowed.test:{bp}/huge/{i} HTTP/1.1\r\nHost: allowed.test:{bp}\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            clients.push(s);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let w1 = big.counters.written.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let w2 = big.counters.written.load(Ordering::SeqCst);
        let peak = watch.max();
        eprintln!(
            "never-reading clients: origin wrote {} MiB, then {} KiB more in 2 s; RSS before {} KiB, peak {} KiB",
            w1 / MIB,
            (w2 - w1) / 1024,
            before / 1024,
            peak / 1024
        );
        assert_eq!(big.counters.accepted.load(Ordering::SeqCst), 4);
        assert!(w1 > 0, "nothing was sent");
        assert!(w2 - w1 < 2 * MIB, "the origin kept writing ({} KiB in 2 s): no back-pressure", (w2 - w1) / 1024);
        assert!(w2 < 4 * 64 * MIB, "{} MiB buffered for 4 clients that read nothing", w2 / MIB);
        assert!(peak < 100 * MIB, "egressd RSS peaked at {} MiB", peak / MIB);
        assert_alive(&mut e);

        // The clients leave: egressd drops the upstream connections too.
        drop(clients);
        let deadline = Instant::now() + Duration::from_secs(5);
        while big.counters.finished.load(Ordering::SeqCst) < 4 {
            assert!(
                Instant::now() < deadline,
                "{} of 4 upstream connections released 5 s after their clients left",
                big.counters.finished.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        serves_again(&mut e, op, Duration::from_secs(5)).await;
    })
    .await
}

/// A client that stops reading and leaves its connection open is not a slot held forever: with
/// no byte moving either way for `idle_timeout`, egressd closes the connection and releases the
/// upstream.
#[tokio::test(flavor = "multi_thread")]
async fn client_that_never_reads_is_cut_after_idle_timeout() {
    let _serial = serial().await;
    bounded(Duration::from_secs(30), async {
        let big = RawOrigin::start(true, |mut s, c| async move {
            if !send(&mut s, &c, b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n").await {
                return;
            }
            let chunk = vec![b'z'; 64 * 1024];
            while send(&mut s, &c, &chunk).await {}
        })
        .await;
        let bp = big.port();
        let mut e = Egressd::start_opts(Opts {
            rules: &web_rules(&[bp]),
            proxy_extra: "idle_timeout = \"2s\"",
            ..Default::default()
        })
        .await;
        let mut client = dial(e.proxy).await;
        client
            .write_all(
                format!("GET http://allowed.test:{bp}/huge HTTP/1.1\r\nHost: allowed.test:{bp}\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_secs(8);
        while big.counters.finished.load(Ordering::SeqCst) < 1 {
            assert!(Instant::now() < deadline, "the upstream of a client that reads nothing is held after 8 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let held = started.elapsed();
        assert!(held >= Duration::from_millis(1800), "cut after {held:?}, before idle_timeout");
        // The client's side is closed too: what arrived ends before the declared length.
        let (got, _) = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut client))
            .await
            .expect("client connection still open after the cut");
        assert!((got.len() as u64) < (1 << 30), "{} bytes", got.len());
        assert_alive(&mut e);
        e.audit("for the cut download", |v| is_http_audit(v, "allowed.test")).await;
    })
    .await
}

// =============================================================================================
// 5. Upstreams that never answer, reset mid-body, trickle
// =============================================================================================

/// An upstream that accepts and never answers: the client gets `504` (reason `upstream`) once
/// nothing has moved for `idle_timeout`, and the connection to the upstream is closed. An
/// upstream whose accept queue is full (the connect itself never completes) gets `504` within
/// `connect_timeout`. A CONNECT tunnel to the silent upstream is closed after `idle_timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_that_accepts_and_never_answers_gets_504() {
    let _serial = serial().await;
    bounded(Duration::from_secs(40), async {
        // Accepts, reads whatever comes, never writes.
        let silent = RawOrigin::start(false, |mut s, _| async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        })
        .await;
        // A listener that never accepts, its backlog filled: SYNs to it go unanswered.
        let full = TcpSocket::new_v4().unwrap();
        full.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let full_port = full.local_addr().unwrap().port();
        let full = full.listen(1).unwrap();
        let mut fillers = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(("127.0.0.1", full_port))).await {
                Ok(Ok(s)) => fillers.push(s),
                _ => break,
            }
        }
        let sp = silent.port();
        let mut e = Egressd::start_opts(Opts {
            rules: &web_rules(&[sp, full_port]),
            proxy_extra: "idle_timeout = \"3s\"",
            ..Default::default()
        })
        .await;

        // Accepted, never answered.
        let started = Instant::now();
        let r = get_within(e.proxy, "allowed.test", sp, "/silent", Duration::from_secs(8)).await;
        let took = started.elapsed();
        assert_eq!(r.status, 504, "{r:?}");
        assert_eq!(r.deny_field("reason"), "upstream", "{r:?}");
        assert!(took >= Duration::from_millis(2800), "504 after {took:?}, before idle_timeout (3 s)");
        assert!(took <= Duration::from_secs(5), "504 after {took:?} (idle_timeout 3 s)");
        let deadline = Instant::now() + Duration::from_secs(3);
        while silent.counters.finished.load(Ordering::SeqCst) < 1 {
            assert!(Instant::now() < deadline, "the connection to the silent upstream is still open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let a = e
            .audit("504 for the silent upstream", |v| is_http_audit(v, "allowed.test") && s(v, "reason") == "upstream")
            .await;
        assert_eq!(s(&a, "action"), "deny", "{a}");

        // Connect never completes: connect_timeout (2 s in the test config).
        let started = Instant::now();
        let r = get_within(e.proxy, "allowed.test", full_port, "/blackhole", Duration::from_secs(6)).await;
        let took = started.elapsed();
        assert_eq!(r.status, 504, "blackholed connect: {r:?}");
        assert!(took <= Duration::from_secs(4), "504 after {took:?} (connect_timeout 2 s)");

        // A tunnel to the silent upstream: the TLS handshake never completes, the tunnel idles out.
        let (tunnel, resp) = connect(e.proxy, &format!("tls.allowed.test:{sp}")).await;
        assert_eq!(resp.status, 200, "{resp:?}");
        let started = Instant::now();
        let hs = tokio::time::timeout(Duration::from_secs(8), tls_connect(tunnel, "tls.allowed.test")).await;
        let took = started.elapsed();
        assert!(matches!(hs, Ok(Err(_))), "handshake through a silent upstream: {:?}", hs.map(|r| r.is_ok()));
        assert!(took >= Duration::from_millis(2800) && took <= Duration::from_secs(5), "tunnel closed after {took:?}");
        assert_alive(&mut e);
        drop(full);
    })
    .await
}

/// An upstream that resets the connection in the middle of the body, once with `Content-Length`
/// and once chunked: the client receives the part that arrived and then a closed connection — a
/// body visibly shorter than declared, or a chunked body without its last chunk, never a response
/// that looks complete. egressd stays up, logs the exchange with the bytes relayed, and serves
/// again.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_reset_mid_body_truncates_and_is_logged() {
    let _serial = serial().await;
    bounded(Duration::from_secs(30), async {
        const DECLARED: usize = 1_000_000;
        const SENT: usize = 100_000;
        let cl = RawOrigin::start(true, |mut s, c| async move {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {DECLARED}\r\n\r\n");
            if send(&mut s, &c, head.as_bytes()).await && send(&mut s, &c, &vec![b'c'; SENT]).await {
                tokio::time::sleep(Duration::from_millis(200)).await;
                reset(s);
            }
        })
        .await;
        let chunked = RawOrigin::start(true, |mut s, c| async move {
            let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..10 {
                out.extend_from_slice(format!("{:x}\r\n", 10_000).as_bytes());
                out.extend_from_slice(&[b'k'; 10_000]);
                out.extend_from_slice(b"\r\n");
            }
            // Half a chunk, then the reset.
            out.extend_from_slice(format!("{:x}\r\n", 10_000).as_bytes());
            out.extend_from_slice(&[b'k'; 5_000]);
            if send(&mut s, &c, &out).await {
                tokio::time::sleep(Duration::from_millis(200)).await;
                reset(s);
            }
        })
        .await;
        let origin = HttpOrigin::start().await;
        let (cp, kp, op) = (cl.port(), chunked.port(), origin.port());
        let mut e = Egressd::start_opts(Opts { rules: &web_rules(&[cp, kp, op]), ..Default::default() }).await;

        // Content-Length: fewer bytes than declared, then EOF/reset.
        let mut s = dial(e.proxy).await;
        s.write_all(format!("GET http://allowed.test:{cp}/cl HTTP/1.1\r\nHost: allowed.test:{cp}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (status, headers) = read_head(&mut s).await.expect("response head");
        assert_eq!(status, 200);
        let declared = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.clone());
        let (body, _) = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut s))
            .await
            .expect("connection not closed 5 s after the upstream reset");
        eprintln!("reset mid-body: declared {declared:?}, client got {} bytes", body.len());
        assert!(!body.is_empty() && body.len() < DECLARED, "client got {} of {DECLARED} bytes", body.len());
        if let Some(d) = &declared {
            assert_eq!(d, &DECLARED.to_string(), "Content-Length changed in transit");
        }

        // Chunked: the last chunk never arrives.
        let mut s = dial(e.proxy).await;
        s.write_all(format!("GET http://allowed.test:{kp}/ch HTTP/1.1\r\nHost: allowed.test:{kp}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (status, headers) = read_head(&mut s).await.expect("response head");
        assert_eq!(status, 200);
        let (body, _) = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut s))
            .await
            .expect("connection not closed 5 s after the upstream reset");
        let chunked_out =
            headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
        let content_length = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length"));
        assert!(chunked_out || content_length.is_some(), "a close-delimited body cannot show truncation: {headers:?}");
        if chunked_out {
            assert!(!body.ends_with(b"0\r\n\r\n"), "a truncated upstream body was completed with a last chunk");
        }
        assert!(!body.is_empty() && body.len() < 110_000, "client got {} bytes", body.len());

        assert_alive(&mut e);
        for port in [cp, kp] {
            let a = e
                .audit("for the reset exchange", |v| {
                    is_http_audit(v, "allowed.test") && n(v, "port") == Some(port as u64)
                })
                .await;
            let down = n(&a, "bytes_down").unwrap_or(0);
            assert!(down > 0 && down < DECLARED as u64, "bytes_down {down} for port {port}: {a}");
        }
        serves_again(&mut e, op, Duration::from_secs(5)).await;
    })
    .await
}

/// An upstream that trickles its body. The contract's `idle_timeout` closes what is idle: a byte
/// every 250 ms with `idle_timeout = "2s"` is relayed in full however long it takes; a gap longer
/// than `idle_timeout` cuts the exchange (the client sees a truncated body, the upstream connection
/// is closed).
#[tokio::test(flavor = "multi_thread")]
async fn upstream_that_trickles_is_relayed_until_idle_timeout() {
    let _serial = serial().await;
    bounded(Duration::from_secs(30), async {
        const BYTES: usize = 16;
        let steady = RawOrigin::start(true, |mut s, c| async move {
            if !send(&mut s, &c, format!("HTTP/1.1 200 OK\r\nContent-Length: {BYTES}\r\n\r\n").as_bytes()).await {
                return;
            }
            for _ in 0..BYTES {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if !send(&mut s, &c, b"t").await {
                    return;
                }
            }
            let mut b = [0u8; 1];
            let _ = s.read(&mut b).await;
        })
        .await;
        let stalling = RawOrigin::start(true, |mut s, c| async move {
            if !send(&mut s, &c, format!("HTTP/1.1 200 OK\r\nContent-Length: {BYTES}\r\n\r\nabc").as_bytes()).await {
                return;
            }
            // 4 s of silence, longer than idle_timeout, then the rest.
            tokio::time::sleep(Duration::from_secs(4)).await;
            if send(&mut s, &c, &[b't'; BYTES - 3]).await {
                let mut b = [0u8; 1];
                let _ = s.read(&mut b).await;
            }
        })
        .await;
        let (sp, tp) = (steady.port(), stalling.port());
        let mut e = Egressd::start_opts(Opts {
            rules: &web_rules(&[sp, tp]),
            proxy_extra: "idle_timeout = \"2s\"",
            ..Default::default()
        })
        .await;

        let started = Instant::now();
        let r = get_within(e.proxy, "allowed.test", sp, "/steady", Duration::from_secs(10)).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, vec![b't'; BYTES], "trickled body not relayed in full");
        assert!(started.elapsed() >= Duration::from_secs(3), "took {:?}", started.elapsed());

        let mut s = dial(e.proxy).await;
        s.write_all(
            format!("GET http://allowed.test:{tp}/stall HTTP/1.1\r\nHost: allowed.test:{tp}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let started = Instant::now();
        let (status, _) = read_head(&mut s).await.expect("response head");
        assert_eq!(status, 200);
        let (body, _) = tokio::time::timeout(Duration::from_secs(8), read_until_closed(&mut s))
            .await
            .expect("a stalled body is still open after 8 s");
        let took = started.elapsed();
        assert_eq!(body, b"abc", "a body stalled past idle_timeout was relayed in full (after {took:?})");
        assert!(took >= Duration::from_millis(1800) && took < Duration::from_millis(3900), "cut after {took:?}");
        let deadline = Instant::now() + Duration::from_secs(3);
        while stalling.counters.finished.load(Ordering::SeqCst) < 1 {
            assert!(Instant::now() < deadline, "the stalled upstream connection is still open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_alive(&mut e);
    })
    .await
}

// =============================================================================================
// 6. DNS upstream answers that must be ignored
// =============================================================================================

const DNS_GOOD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const DNS_POISON: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 66);

/// How the test upstream answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// The right answer (A 127.0.0.1).
    Good = 0,
    /// The poisoned answer with the query's id changed.
    WrongId = 1,
    /// The right id, but the question (and the poisoned answer) for another name.
    WrongQuestion = 2,
    /// The right id and question, the poisoned answer cut off mid-record (TC clear).
    Truncated = 3,
    /// Like `Truncated`, with TC set (egressd retries over TCP; nothing listens there).
    TruncatedTc = 4,
    /// All four bad packets, then the right answer, to the same query.
    BadThenGood = 5,
    /// Silence.
    Silent = 6,
    /// NXDOMAIN without SOA (not cacheable), at once.
    NxDomain = 7,
}

/// A UDP-only DNS upstream on 127.0.0.1 whose behaviour is switched between queries.
struct BadUpstream {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    queries: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for BadUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn a_answer(query: &Message, qname: &Name, ip: Ipv4Addr) -> Message {
    let mut resp = Message::response(query.metadata.id, OpCode::Query);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_query(Query::query(qname.clone(), RecordType::A));
    resp.add_answer(Record::from_rdata(qname.clone(), 300, RData::A(A(ip))));
    resp
}

impl BadUpstream {
    async fn start() -> BadUpstream {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Good as u8));
        let queries = Arc::new(AtomicUsize::new(0));
        let (m, q) = (mode.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let Ok((len, peer)) = sock.recv_from(&mut buf).await else { continue };
                let Ok(query) = Message::from_vec(&buf[..len]) else { continue };
                q.fetch_add(1, Ordering::SeqCst);
                let Some(question) = query.queries.first() else { continue };
                let qname = question.name().clone();
                let good = || {
                    if question.query_type() == RecordType::A {
                        a_answer(&query, &qname, DNS_GOOD).to_vec().unwrap()
                    } else {
                        let mut r = Message::response(query.metadata.id, OpCode::Query);
                        r.add_query(question.clone());
                        r.to_vec().unwrap()
                    }
                };
                let wrong_id = || {
                    let mut r = a_answer(&query, &qname, DNS_POISON);
                    r.metadata.id ^= 0x5a5a;
                    r.to_vec().unwrap()
                };
                let wrong_question = || {
                    let other = Name::from_ascii("poison.allowed.test.").unwrap();
                    a_answer(&query, &other, DNS_POISON).to_vec().unwrap()
                };
                let truncated = |tc: bool| {
                    let mut r = a_answer(&query, &qname, DNS_POISON);
                    r.metadata.truncation = tc;
                    let wire = r.to_vec().unwrap();
                    // Header, question and half of the answer record.
                    wire[..wire.len() - 5].to_vec()
                };
                let packets: Vec<Vec<u8>> = match Mode::from(m.load(Ordering::SeqCst)) {
                    Mode::Good => vec![good()],
                    Mode::WrongId => vec![wrong_id()],
                    Mode::WrongQuestion => vec![wrong_question()],
                    Mode::Truncated => vec![truncated(false)],
                    Mode::TruncatedTc => vec![truncated(true)],
                    Mode::BadThenGood => vec![wrong_id(), wrong_question(), truncated(false), good()],
                    Mode::Silent => vec![],
                    Mode::NxDomain => {
                        let mut r = Message::response(query.metadata.id, OpCode::Query);
                        r.metadata.recursion_available = true;
                        r.metadata.response_code = ResponseCode::NXDomain;
                        r.add_query(question.clone());
                        vec![r.to_vec().unwrap()]
                    }
                };
                for p in packets {
                    let _ = sock.send_to(&p, peer).await;
                }
            }
        });
        BadUpstream { addr, mode, queries, task }
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl From<u8> for Mode {
    fn from(v: u8) -> Mode {
        match v {
            0 => Mode::Good,
            1 => Mode::WrongId,
            2 => Mode::WrongQuestion,
            3 => Mode::Truncated,
            4 => Mode::TruncatedTc,
            5 => Mode::BadThenGood,
            6 => Mode::Silent,
            _ => Mode::NxDomain,
        }
    }
}

static DNS_ID: AtomicU64 = AtomicU64::new(0x3c00);

/// One A query over UDP from `from`; the reply, or `None` after `wait`.
async fn dns_a(server: SocketAddr, from: IpAddr, name: &str, wait: Duration) -> Option<Message> {
    let id = (DNS_ID.fetch_add(1, Ordering::Relaxed) & 0xffff) as u16;
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(format!("{name}.")).unwrap(), RecordType::A));
    let sock = UdpSocket::bind(SocketAddr::new(from, 0)).await.unwrap();
    sock.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (len, _) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await.ok()?.ok()?;
    let r = Message::from_vec(&buf[..len]).expect("parsable reply");
    assert_eq!(r.metadata.id, id, "reply id");
    Some(r)
}

fn a_records(r: &Message) -> Vec<Ipv4Addr> {
    r.answers
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// A DNS upstream that answers with the wrong id, the wrong question, or a truncated packet (with
/// and without TC): each is ignored, the client gets SERVFAIL (never the poisoned address), and
/// nothing is cached — the next correct upstream answer is what clients get, and it took a fresh
/// upstream query. The bad packets followed by the right one in the same exchange: the right one
/// is used. The proxy's resolver shares the path: during the bad answers a request to the name is
/// refused with 502 (fail closed) and the poisoned address is never dialled; afterwards it reaches
/// the real origin.
#[tokio::test(flavor = "multi_thread")]
async fn dns_upstream_wrong_id_question_or_truncated_is_ignored_never_cached() {
    let _serial = serial().await;
    bounded(Duration::from_secs(60), async {
        let up = BadUpstream::start().await;
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        // Stands for the poisoned address: any connection here is a failure.
        let poisoned = TcpListener::bind(SocketAddr::new(IpAddr::V4(DNS_POISON), port)).await.unwrap();
        let poisoned_hits = Arc::new(AtomicUsize::new(0));
        let ph = poisoned_hits.clone();
        let poisoned_task = tokio::spawn(async move {
            while poisoned.accept().await.is_ok() {
                ph.fetch_add(1, Ordering::SeqCst);
            }
        });
        let upstreams = [up.addr];
        let mut e = Egressd::start_opts(Opts {
            rules: &web_rules(&[port]),
            dns_upstreams: &upstreams,
            dns_extra: "upstream_timeout = \"1s\"",
            no_default_hosts: true,
            ..Default::default()
        })
        .await;
        let dns = e.dns_addr();
        let me = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let wait = Duration::from_secs(5);

        for mode in [Mode::WrongId, Mode::WrongQuestion, Mode::Truncated, Mode::TruncatedTc] {
            up.set(mode);
            for attempt in 0..2 {
                let before = up.queries();
                let started = Instant::now();
                let r =
                    dns_a(dns, me, "victim.allowed.test", wait).await.unwrap_or_else(|| panic!("{mode:?}: no reply"));
                assert_eq!(r.metadata.response_code, ResponseCode::ServFail, "{mode:?} #{attempt}: {r:?}");
                assert!(a_records(&r).is_empty(), "{mode:?} #{attempt}: answer records in {r:?}");
                assert!(up.queries() > before, "{mode:?} #{attempt}: SERVFAIL without asking the upstream");
                assert!(started.elapsed() < Duration::from_secs(3), "{mode:?}: SERVFAIL after {:?}", started.elapsed());
            }
            // The proxy path: resolution fails, the request is refused, nothing is dialled.
            let r = get_within(e.proxy, "web.allowed.test", port, "/", Duration::from_secs(6)).await;
            assert_eq!(r.status, 502, "{mode:?}: proxy request while the upstream misbehaves: {r:?}");
            assert_eq!(r.deny_field("reason"), "upstream", "{r:?}");
        }

        up.set(Mode::Good);
        for name in ["victim.allowed.test", "poison.allowed.test"] {
            let before = up.queries();
            let r = dns_a(dns, me, name, wait).await.expect("reply");
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}: {r:?}");
            assert_eq!(a_records(&r), vec![DNS_GOOD], "{name}: {r:?}");
            assert!(up.queries() > before, "{name}: answered from a cache the bad packets filled");
        }
        let r = get_within(e.proxy, "web.allowed.test", port, "/", Duration::from_secs(6)).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), ORIGIN_BODY);

        up.set(Mode::BadThenGood);
        let r = dns_a(dns, me, "mixed.allowed.test", wait).await.expect("reply");
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{r:?}");
        assert_eq!(a_records(&r), vec![DNS_GOOD], "{r:?}");

        assert_eq!(poisoned_hits.load(Ordering::SeqCst), 0, "egressd dialled the poisoned address");
        let poisoned_answers =
            e.lines().iter().filter(|v| v.to_string().contains(&DNS_POISON.to_string())).cloned().collect::<Vec<_>>();
        assert!(poisoned_answers.is_empty(), "the poisoned address appears in egressd's log: {poisoned_answers:?}");
        assert_alive(&mut e);
        poisoned_task.abort();
    })
    .await
}

// =============================================================================================
// 7. Query flood of random subdomains
// =============================================================================================

/// Small deterministic PRNG (xorshift64*) for the flood's names.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn label(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        (0..len).map(|_| ALPHABET[(self.next() % ALPHABET.len() as u64) as usize] as char).collect()
    }
}

/// 200,000 queries from four client addresses (127.0.0.2-5): half random subdomains of one
/// allowed domain (the tunneling shape, blocked after `max_unique_subdomains`), half random
/// subdomains of random registrable domains under an allowed `*.test`, each a new (client,
/// domain) pair for the tunneling budgets (one in five an ordinary name that is forwarded, the
/// rest over `max_name_length`, blocked without an upstream query but recorded all the same).
/// egressd answers throughout, the tunneling signal fires, and its RSS grows by less than
/// 64 MiB: the per-pair state is capped (there is no metric of that map, so RSS is the measure).
#[tokio::test(flavor = "multi_thread")]
async fn query_flood_of_random_subdomains_keeps_memory_bounded() {
    let _serial = serial().await;
    bounded(Duration::from_secs(100), async {
        const QUERIES: usize = 200_000;
        const CLIENTS: u8 = 4;
        const WINDOW: usize = 64;
        let up = BadUpstream::start().await;
        up.set(Mode::NxDomain);
        let upstreams = [up.addr];
        let rules = "[[rule]]\nname = \"flood\"\nhosts = [\"*.flood.test\"]\n\n\
                     [[rule]]\nname = \"anything-test\"\nhosts = [\"*.test\"]\n";
        let mut e = Egressd::start_opts(Opts {
            rules,
            dns_upstreams: &upstreams,
            dns_extra: "upstream_timeout = \"1s\"",
            no_default_hosts: true,
            ..Default::default()
        })
        .await;
        let dns = e.dns_addr();
        let pid = e.pid();
        // Warm up (runtime threads, first allocations), then take the baseline.
        for i in 0..200 {
            dns_a(dns, IpAddr::V4(Ipv4Addr::LOCALHOST), &format!("warm{i}.flood.test"), Duration::from_secs(2)).await;
        }
        let before = rss_bytes(pid);
        let watch = RssWatch::start(pid);
        let started = Instant::now();

        let answered = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let answered = answered.clone();
            tasks.push(tokio::spawn(async move {
                let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + c));
                let sock = UdpSocket::bind(SocketAddr::new(from, 0)).await.unwrap();
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(c + 1));
                let mut buf = vec![0u8; 4096];
                let per_client = QUERIES / usize::from(CLIENTS);
                let mut sent = 0;
                let mut id: u16 = 0;
                while sent < per_client {
                    let batch = WINDOW.min(per_client - sent);
                    for _ in 0..batch {
                        let name = match sent % 10 {
                            // An ordinary-looking name in a new registrable domain: forwarded.
                            0 => format!("{}.{}.test.", rng.label(8), rng.label(10)),
                            // A random subdomain of one domain: the tunnel shape.
                            1..=5 => format!("{}.flood.test.", rng.label(12)),
                            // A long random name in a new registrable domain: blocked on its
                            // length, and still recorded for its (client, domain) pair.
                            _ => format!(
                                "{}.{}.{}.{}.test.",
                                rng.label(40),
                                rng.label(40),
                                rng.label(40),
                                rng.label(10)
                            ),
                        };
                        id = id.wrapping_add(1);
                        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
                        m.metadata.recursion_desired = true;
                        m.add_query(Query::query(Name::from_ascii(&name).unwrap(), RecordType::A));
                        sock.send_to(&m.to_vec().unwrap(), dns).await.unwrap();
                        sent += 1;
                    }
                    let mut got = 0;
                    while got < batch {
                        match tokio::time::timeout(Duration::from_millis(1500), sock.recv_from(&mut buf)).await {
                            Ok(Ok((len, _))) => {
                                got += 1;
                                if Message::from_vec(&buf[..len]).is_ok() {
                                    answered.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            _ => break,
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let took = started.elapsed();
        let after = rss_bytes(pid);
        let peak = watch.max();
        let answered = answered.load(Ordering::Relaxed);
        let metrics = e.admin_get("/metrics").await.expect("/metrics").text();
        let tunneling = metric(&metrics, "egressd_dns_tunneling_detections_total", &[("action", "block")]).unwrap_or(0.0);
        eprintln!(
            "flood: {QUERIES} queries in {took:?}, {answered} answered, {tunneling} tunneling blocks, {} upstream queries; \
             RSS {} KiB -> {} KiB (peak {} KiB)",
            up.queries(),
            before / 1024,
            after / 1024,
            peak / 1024
        );
        assert!(answered >= QUERIES * 9 / 10, "only {answered} of {QUERIES} queries answered");
        assert!(tunneling >= 1000.0, "the random-subdomain flood was not flagged ({tunneling} blocks)");
        assert!(peak.saturating_sub(before) < 64 * MIB, "RSS grew by {} MiB", (peak - before) / MIB);
        assert_alive(&mut e);
        let r = dns_a(dns, IpAddr::V4(Ipv4Addr::LOCALHOST), "after.other.test", Duration::from_secs(3)).await;
        assert!(r.is_some(), "no answer after the flood");
    })
    .await
}

// =============================================================================================
// 8. File descriptor exhaustion
// =============================================================================================

/// egressd runs under `ulimit -n 64` and 100 clients connect at once: accept fails with EMFILE,
/// which is logged and retried — egressd keeps running and serves again once the clients leave.
#[tokio::test(flavor = "multi_thread")]
async fn file_descriptor_exhaustion_is_logged_and_survived() {
    let _serial = serial().await;
    bounded(Duration::from_secs(40), async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let mut e = Egressd::start_opts(Opts {
            rules: &web_rules(&[port]),
            header_timeout: "5s",
            nofile: Some(64),
            ..Default::default()
        })
        .await;
        let pid = e.pid();
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let nofile = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default().to_string();
        assert!(nofile.split_whitespace().nth(3) == Some("64"), "limit not applied: {nofile:?}");
        let baseline = open_fds(pid);
        eprintln!("fd exhaustion: {baseline} descriptors open at start, limit 64");
        serves_again(&mut e, port, Duration::from_secs(5)).await;

        let from = e.line_count();
        let mut clients = Vec::new();
        for _ in 0..100 {
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(e.proxy)).await {
                Ok(Ok(s)) => clients.push(s),
                _ => break,
            }
        }
        assert!(clients.len() >= 64, "only {} client connections were made", clients.len());
        // Under exhaustion: a request may fail or wait, but egressd must not exit.
        let during =
            tokio::time::timeout(Duration::from_secs(2), get(e.proxy, "allowed.test", port, "/during")).await.ok();
        let emfile = e
            .wait_for_log_from(
                from,
                |v| {
                    let t = v.to_string();
                    t.contains("Too many open files") || t.contains("os error 24")
                },
                Duration::from_secs(5),
            )
            .await;
        assert!(emfile.is_some(), "EMFILE was not logged; output:\n{}", e.dump());
        assert_alive(&mut e);
        if let Some(r) = &during {
            assert!(r.status == 200 || r.status == 502 || r.status == 503, "during exhaustion: {r:?}");
        }

        drop(clients);
        serves_again(&mut e, port, Duration::from_secs(10)).await;
        let deadline = Instant::now() + Duration::from_secs(8);
        while open_fds(pid) > baseline + 4 {
            assert!(Instant::now() < deadline, "{} descriptors open after the clients left", open_fds(pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_alive(&mut e);
    })
    .await
}

// =============================================================================================
// 9. A half-written rule file during reload
// =============================================================================================

/// The rule file is rewritten in place and the watcher reloads while it is only half written
/// (cut inside a string, inside a table header, and as a dangling key). Each time the reload fails
/// with the error logged, the generation stays, and the previous policy keeps deciding: the
/// allowed name stays allowed, the name only the new file would allow stays denied. Once the file
/// is complete the new policy applies.
#[tokio::test(flavor = "multi_thread")]
async fn half_written_rule_file_keeps_previous_policy() {
    let _serial = serial().await;
    bounded(Duration::from_secs(40), async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let initial = format!("[[rule]]\nname = \"web\"\nhosts = [\"allowed.test\"]\nports = [{port}]\n");
        let mut e = Egressd::start_opts(Opts { rules: &initial, ..Default::default() }).await;
        let path = e.dir().join("rules/test.toml");
        let full = format!(
            "[[rule]]\nname = \"web\"\nhosts = [\"allowed.test\", \"other.allowed.test\"]\nports = [{port}]\n\n\
             [[rule]]\nname = \"block-denied\"\naction = \"deny\"\nhosts = [\"denied.test\"]\n"
        );
        let cuts = [full.find("other.allowed").unwrap() + 5, full.find("[[rule]]\nname = \"block").unwrap() + 4];
        let dangling = format!("{initial}\n[[rule]]\nname = \"web2\"\nhosts =");

        let generation = |e: &Egressd| -> u64 {
            e.lines().iter().filter(|v| v["event"] == "reload" && s(v, "result") == "success").count() as u64
        };
        for (i, half) in [full[..cuts[0]].to_string(), full[..cuts[1]].to_string(), dangling].into_iter().enumerate() {
            let from = e.line_count();
            let applied_before = generation(&e);
            std::fs::write(&path, &half).unwrap();
            let failed = e
                .wait_for_log_from(
                    from,
                    |v| v["event"] == "reload" && s(v, "result") == "failure",
                    Duration::from_secs(5),
                )
                .await;
            assert!(failed.is_some(), "cut #{i}: no failed reload logged; output:\n{}", e.dump());
            let (_, line) = failed.unwrap();
            assert!(s(&line, "error").contains("test.toml"), "cut #{i}: error does not name the file: {line}");
            // Give a wrong swap every chance to show.
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(generation(&e), applied_before, "cut #{i}: a half-written file was applied");
            let r = get_within(e.proxy, "allowed.test", port, "/", Duration::from_secs(3)).await;
            assert_eq!(r.status, 200, "cut #{i}: allowed.test under the previous policy: {r:?}");
            let r = get_within(e.proxy, "other.allowed.test", port, "/", Duration::from_secs(3)).await;
            assert_eq!(r.status, 403, "cut #{i}: other.allowed.test under the previous policy: {r:?}");
            let metrics = e.admin_get("/metrics").await.expect("/metrics").text();
            let failures = metric(&metrics, "egressd_config_reloads_total", &[("result", "failure")]).unwrap_or(0.0);
            assert!(failures >= (i + 1) as f64, "cut #{i}: {failures} failed reloads counted");
        }

        // Completed: applied.
        let from = e.line_count();
        std::fs::write(&path, &full).unwrap();
        let ok = e
            .wait_for_log_from(from, |v| v["event"] == "reload" && s(v, "result") == "success", Duration::from_secs(5))
            .await;
        assert!(ok.is_some(), "the completed file was not applied; output:\n{}", e.dump());
        let r = get_within(e.proxy, "other.allowed.test", port, "/", Duration::from_secs(3)).await;
        assert_eq!(r.status, 200, "{r:?}");
        let r = get_within(e.proxy, "denied.test", port, "/", Duration::from_secs(3)).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.deny_field("rule"), "block-denied", "{r:?}");

        // Half-written again: the new policy (not the initial one) stays.
        let from = e.line_count();
        std::fs::write(&path, &full[..cuts[0]]).unwrap();
        let failed = e
            .wait_for_log_from(from, |v| v["event"] == "reload" && s(v, "result") == "failure", Duration::from_secs(5))
            .await;
        assert!(failed.is_some(), "no failed reload logged; output:\n{}", e.dump());
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = get_within(e.proxy, "other.allowed.test", port, "/", Duration::from_secs(3)).await;
        assert_eq!(r.status, 200, "{r:?}");
        let r = get_within(e.proxy, "denied.test", port, "/", Duration::from_secs(3)).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_alive(&mut e);
    })
    .await
}
