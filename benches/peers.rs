//! Load generator, origins and DNS upstream for the peer benchmarks (egressd vs Squid, tinyproxy,
//! dnsdist and Unbound). The harness is `benches/peers.sh`; `cargo bench --bench peers` runs it
//! with this binary as its load generator.
//!
//! Subcommands (every one prints `key=value` pairs on one line, for the harness to parse):
//! - `origins`: HTTP keep-alive origin, "hello" origin (reads a ClientHello, answers 64 bytes,
//!   closes), full-TLS origin (rustls, ECDSA P-256), bulk origin (reads a ClientHello, then
//!   streams until the client goes) and hold origin (reads a ClientHello, then holds the
//!   connection open) on 127.0.0.1.
//! - `dns-upstream`: a fast authoritative UDP responder: A 93.184.216.34 (TTL 3600) for any name.
//! - `hello-rate`: closed loop: new tunnel + ClientHello + 64-byte reply + close, as fast as it goes.
//! - `hello-lat`: the same at a fixed rate (open loop), latency percentiles.
//! - `tls-rate`: closed loop: new tunnel + full TLS 1.3 handshake + small reply + close.
//! - `bulk`: N concurrent tunnels streaming origin → client, MB/s.
//! - `idle`: opens idle tunnels in stages and reads the SUT's RSS after each stage.
//! - `http-fixed`: plain-HTTP keep-alive requests at a fixed rate; optionally triggers a reload
//!   mid-run and reports the latency before and during it.
//! - `cpu`: CPU time (utime+stime, µs) and RSS (KiB) of a process and its descendants.
//! - `gen-names`: writes N pseudo-random host names (the 1M-name policy).
//! - `free-ports`: N distinct loopback ports free for both TCP and UDP.
//! - `dns-probe`: waits until a DNS server on 127.0.0.1:PORT answers (exit 1 after 15 s).
//!
//! `--via direct` talks to the origin itself (the no-proxy baseline); `--via HOST:PORT` goes
//! through that proxy (absolute-form HTTP or CONNECT). `--sut-pid PID` makes the rate commands
//! report the CPU time per operation of that process tree over exactly the measured window.

mod common;
use common::name;

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The reply of the "hello" origin: small, like a ServerHello-sized first flight would be.
const HELLO_REPLY: [u8; 64] = [0x42; 64];
/// Body of the HTTP origin.
const HTTP_BODY: &[u8] = b"hello, world\n";
/// Body of the TLS origin.
const TLS_BODY: &[u8] = b"hello over tls\n";
/// Chunk the bulk origin writes.
const BULK_CHUNK: usize = 64 * 1024;

type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let Some(cmd) = args.first().cloned() else {
        run_harness();
        return;
    };
    let o = Opts::parse(&args[1..]);
    let result = match cmd.as_str() {
        "origins" => rt().block_on(origins(&o)),
        "dns-upstream" => dns_upstream(&o),
        "hello-rate" => rt().block_on(hello_rate(&o)),
        "hello-lat" => rt().block_on(hello_lat(&o)),
        "tls-rate" => rt().block_on(tls_rate(&o)),
        "bulk" => rt().block_on(bulk(&o)),
        "idle" => rt().block_on(idle(&o)),
        "http-fixed" => rt().block_on(http_fixed(&o)),
        "cpu" => cpu_cmd(&o),
        "gen-names" => gen_names(&o),
        "free-ports" => free_ports(&o),
        "dns-probe" => dns_probe(&o),
        other => Err(format!("unknown subcommand {other:?}").into()),
    };
    if let Err(e) = result {
        eprintln!("peers {cmd}: {e}");
        std::process::exit(1);
    }
}

/// `cargo bench --bench peers` with no subcommand: run the shell harness with this binary.
fn run_harness() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers.sh");
    let exe = std::env::current_exe().expect("current exe");
    // Cargo builds the package's binaries for benchmarks and says where: no nested cargo call.
    let status = std::process::Command::new("bash")
        .arg(&script)
        .env("PEERS_BIN", exe)
        .env("EGRESSD", env!("CARGO_BIN_EXE_egressd"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => std::process::exit(s.code().unwrap_or(1)),
        Err(e) => {
            eprintln!("cannot run {}: {e}", script.display());
            std::process::exit(1);
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// `--key value` pairs.
struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Self {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let key = k.trim_start_matches("--").to_string();
            let value = it.next().cloned().unwrap_or_default();
            map.insert(key, value);
        }
        Opts(map)
    }

    fn str(&self, key: &str) -> AnyResult<&str> {
        self.0.get(key).map(String::as_str).ok_or_else(|| format!("missing --{key}").into())
    }

    fn opt(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn num<T: FromStr>(&self, key: &str, default: T) -> AnyResult<T> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{key}: not a number: {v:?}").into()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Process accounting
// ---------------------------------------------------------------------------------------------

/// `pid` and every process below it.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some(fields) = stat_fields(p)
                && let Some(pp) = fields.get(1).and_then(|s| s.parse().ok())
            {
                parent.insert(p, pp);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parent.iter().filter(|&(_, &pp)| pp == cur).map(|(&c, _)| c));
        i += 1;
    }
    out
}

/// The fields of /proc/PID/stat after the command name (field 3, the state, is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of the tree, in microseconds (USER_HZ is 100 on Linux).
fn cpu_us(pids: &[u32]) -> u64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|&p| stat_fields(p))
        .map(|f| {
            f.get(11).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum();
    ticks * 10_000
}

/// VmRSS of the tree, KiB.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

/// (busy, total) jiffies of each CPU, from /proc/stat.
fn cpu_jiffies() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// How busy each core was between two [`cpu_jiffies`] readings, whoever used it — the machine
/// is shared, so this shows when a core other than the SUT's was the limit.
fn core_busy(before: &[(u64, u64)], after: &[(u64, u64)]) -> String {
    before
        .iter()
        .zip(after)
        .enumerate()
        .map(|(i, (b, a))| {
            let total = a.1.saturating_sub(b.1).max(1);
            format!("core{i}_busy_pct={:.0}", 100.0 * a.0.saturating_sub(b.0) as f64 / total as f64)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU accounting of the system under test over a measured window.
struct Sut {
    pids: Vec<u32>,
    start_us: u64,
}

impl Sut {
    fn new(o: &Opts) -> AnyResult<Option<Self>> {
        Ok(match o.opt("sut-pid") {
            None | Some("") | Some("0") => None,
            Some(p) => Some(Sut { pids: process_tree(p.parse()?), start_us: 0 }),
        })
    }

    fn start(&mut self) {
        self.start_us = cpu_us(&self.pids);
    }

    fn used_us(&self) -> u64 {
        cpu_us(&self.pids).saturating_sub(self.start_us)
    }
}

fn cpu_cmd(o: &Opts) -> AnyResult<()> {
    let pids = process_tree(o.str("pid")?.parse()?);
    println!("cpu_us={} rss_kib={} procs={}", cpu_us(&pids), rss_kib(&pids), pids.len());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Latency statistics
// ---------------------------------------------------------------------------------------------

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)]) / 1000.0
}

fn lat_summary(mut lat: Vec<u32>) -> String {
    lat.sort_unstable();
    format!(
        "p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3} samples={}",
        pct(&lat, 0.5),
        pct(&lat, 0.9),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        pct(&lat, 1.0),
        lat.len()
    )
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Tunnels
// ---------------------------------------------------------------------------------------------

/// Where a client connects and what it asks for.
#[derive(Clone)]
struct Route {
    /// The proxy, or the origin itself for `--via direct`.
    connect_to: SocketAddr,
    proxied: bool,
    host: String,
    port: u16,
}

impl Route {
    fn from_opts(o: &Opts) -> AnyResult<Self> {
        let target = o.str("target")?;
        let (host, port) = target.rsplit_once(':').ok_or("--target must be host:port")?;
        let port: u16 = port.parse()?;
        let via = o.opt("via").unwrap_or("direct");
        if via == "direct" {
            let ip = o.opt("origin-ip").unwrap_or("127.0.0.1");
            Ok(Route { connect_to: SocketAddr::new(ip.parse()?, port), proxied: false, host: host.to_string(), port })
        } else {
            Ok(Route { connect_to: via.parse()?, proxied: true, host: host.to_string(), port })
        }
    }

    /// A connection to the origin: direct, or through a CONNECT tunnel (200 read, nothing more).
    async fn open(&self) -> std::io::Result<TcpStream> {
        let mut s = TcpStream::connect(self.connect_to).await?;
        s.set_nodelay(true)?;
        if self.proxied {
            let req = format!("CONNECT {h}:{p} HTTP/1.1\r\nHost: {h}:{p}\r\n\r\n", h = self.host, p = self.port);
            s.write_all(req.as_bytes()).await?;
            let head = read_head(&mut s).await?;
            let ok = head.split(|&b| b == b' ').nth(1).is_some_and(|code| code == b"200");
            if !ok {
                let line = String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or_default()).into_owned();
                return Err(std::io::Error::other(format!("CONNECT refused: {line}")));
            }
        }
        Ok(s)
    }
}

/// Reads a CONNECT response head. The origin sends nothing before the client's first bytes, so
/// anything past the blank line would be a proxy bug; it is reported as an error.
async fn read_head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "proxy closed before answering"));
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find(&head, b"\r\n\r\n") {
            if end + 4 != head.len() {
                return Err(std::io::Error::other("bytes after the CONNECT response head"));
            }
            return Ok(head);
        }
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("response head too large"));
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config trusting `ca` (PEM), without session resumption: every handshake is full.
fn client_config(ca: Option<&Path>) -> AnyResult<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        let pem = std::fs::read_to_string(ca)?;
        roots.add(CertificateDer::from(pem_der(&pem)?))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The ClientHello a rustls client sends for `sni`, as it goes on the wire.
fn captured_hello(sni: &str) -> AnyResult<Arc<Vec<u8>>> {
    let name = ServerName::try_from(sni.to_string())?;
    let mut conn = rustls::ClientConnection::new(client_config(None)?, name)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(Arc::new(out))
}

/// Decodes the first PEM block (base64 between the armour lines).
fn pem_der(pem: &str) -> AnyResult<Vec<u8>> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut out = Vec::with_capacity(b64.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in b64.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |a, (i, &b)| a | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// One "CONNECT + ClientHello + small reply + close".
async fn hello_once(route: &Route, hello: &[u8]) -> std::io::Result<()> {
    let mut s = route.open().await?;
    s.write_all(hello).await?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got < HELLO_REPLY.len() {
        return Err(std::io::Error::other(format!("short reply: {got} bytes")));
    }
    Ok(())
}

/// One "CONNECT + full TLS handshake + small reply + close".
async fn tls_once(route: &Route, connector: &tokio_rustls::TlsConnector) -> std::io::Result<()> {
    let s = route.open().await?;
    let name = ServerName::try_from(route.host.clone()).map_err(std::io::Error::other)?;
    let mut tls = connector.connect(name, s).await?;
    let mut body = Vec::new();
    tls.read_to_end(&mut body).await?;
    if body != TLS_BODY {
        return Err(std::io::Error::other("unexpected TLS body"));
    }
    Ok(())
}

/// Runs `conc` workers calling `op` in a loop; counts operations completed inside the window
/// `[warm, warm + secs]`. Returns (ops, errors, latencies of the counted ops, SUT CPU µs, how
/// busy each core was).
async fn closed_loop<F, Fut>(
    conc: usize,
    warm: Duration,
    secs: Duration,
    sut: &mut Option<Sut>,
    op: F,
) -> (u64, u64, Vec<u32>, Option<u64>, String)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send,
{
    let t0 = Instant::now();
    let (win_start, win_end) = (t0 + warm, t0 + warm + secs);
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut tasks = Vec::with_capacity(conc);
    for _ in 0..conc {
        let (op, errors, first_error) = (op.clone(), errors.clone(), first_error.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let start = Instant::now();
                if start >= win_end {
                    break;
                }
                let r = op().await;
                let end = Instant::now();
                match r {
                    Ok(()) if end >= win_start && end <= win_end => lat.push(micros(end - start)),
                    Ok(()) => {}
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().expect("lock").get_or_insert_with(|| e.to_string());
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            lat
        }));
    }
    tokio::time::sleep_until(win_start.into()).await;
    if let Some(s) = sut.as_mut() {
        s.start();
    }
    let j0 = cpu_jiffies();
    tokio::time::sleep_until(win_end.into()).await;
    let cpu = sut.as_ref().map(Sut::used_us);
    let busy = core_busy(&j0, &cpu_jiffies());
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap_or_default());
    }
    if let Some(e) = first_error.lock().expect("lock").as_ref() {
        eprintln!("first error: {e}");
    }
    (lat.len() as u64, errors.load(Ordering::Relaxed), lat, cpu, busy)
}

fn window(o: &Opts) -> AnyResult<(Duration, Duration)> {
    Ok((Duration::from_secs_f64(o.num("warm", 0.5)?), Duration::from_secs_f64(o.num("secs", 4.0)?)))
}

fn rate_report(ops: u64, errors: u64, secs: Duration, lat: Vec<u32>, cpu: Option<u64>, busy: &str) -> String {
    let rate = ops as f64 / secs.as_secs_f64();
    let cpu_part = match cpu {
        Some(us) if ops > 0 => format!(" sut_cpu_us={us} cpu_us_per_op={:.2}", us as f64 / ops as f64),
        _ => String::new(),
    };
    format!("rate={rate:.1} ops={ops} errors={errors} {}{cpu_part} {busy}", lat_summary(lat))
}

async fn hello_rate(o: &Opts) -> AnyResult<()> {
    let route = Arc::new(Route::from_opts(o)?);
    let hello = captured_hello(&route.host)?;
    let (warm, secs) = window(o)?;
    let mut sut = Sut::new(o)?;
    let op = move || {
        let (route, hello) = (route.clone(), hello.clone());
        async move { hello_once(&route, &hello).await }
    };
    let (ops, errors, lat, cpu, busy) = closed_loop(o.num("conc", 32)?, warm, secs, &mut sut, op).await;
    println!("{}", rate_report(ops, errors, secs, lat, cpu, &busy));
    Ok(())
}

async fn tls_rate(o: &Opts) -> AnyResult<()> {
    let route = Arc::new(Route::from_opts(o)?);
    let connector = tokio_rustls::TlsConnector::from(client_config(Some(Path::new(o.str("ca")?)))?);
    let (warm, secs) = window(o)?;
    let mut sut = Sut::new(o)?;
    let op = move || {
        let (route, connector) = (route.clone(), connector.clone());
        async move { tls_once(&route, &connector).await }
    };
    let (ops, errors, lat, cpu, busy) = closed_loop(o.num("conc", 16)?, warm, secs, &mut sut, op).await;
    println!("{}", rate_report(ops, errors, secs, lat, cpu, &busy));
    Ok(())
}

/// Open loop: one new tunnel every 1/rate s, each on its own connection.
async fn hello_lat(o: &Opts) -> AnyResult<()> {
    let route = Arc::new(Route::from_opts(o)?);
    let hello = captured_hello(&route.host)?;
    let rate: f64 = o.num("rate", 1000.0)?;
    let (warm, secs) = window(o)?;
    let mut sut = Sut::new(o)?;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = ((warm + secs).as_secs_f64() * rate) as u64;
    let warm_n = (warm.as_secs_f64() * rate) as u64;
    let start = Instant::now() + Duration::from_millis(50);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let sched = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(sched.into()).await;
        if i == warm_n
            && let Some(s) = sut.as_mut()
        {
            s.start();
        }
        let (route, hello, errors) = (route.clone(), hello.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            // Each tunnel is its own connection, started on schedule whatever the others do, so
            // a stalled proxy cannot delay the next start (no coordinated omission); latency is
            // taken from the actual start, which keeps the timer's 1 ms granularity out of it.
            let started = Instant::now();
            match hello_once(&route, &hello).await {
                Ok(()) => Some(micros(started.elapsed())),
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        }));
    }
    let mut lat = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        if let Ok(Some(l)) = t.await
            && i as u64 >= warm_n
        {
            lat.push(l);
        }
    }
    let cpu = sut.as_ref().map(Sut::used_us);
    let ops = lat.len() as u64;
    let cpu_part = match cpu {
        Some(us) if ops > 0 => format!(" sut_cpu_us={us} cpu_us_per_op={:.2}", us as f64 / ops as f64),
        _ => String::new(),
    };
    println!("rate={rate} ops={ops} errors={} {}{cpu_part}", errors.load(Ordering::Relaxed), lat_summary(lat));
    Ok(())
}

async fn bulk(o: &Opts) -> AnyResult<()> {
    let route = Route::from_opts(o)?;
    let hello = captured_hello(&route.host)?;
    let streams: usize = o.num("streams", 1)?;
    let (warm, secs) = window(o)?;
    let mut sut = Sut::new(o)?;
    let bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut s = route.open().await?;
        s.write_all(&hello).await?;
        let bytes = bytes.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(warm).await;
    let b0 = bytes.load(Ordering::Relaxed);
    if let Some(s) = sut.as_mut() {
        s.start();
    }
    let t0 = Instant::now();
    let j0 = cpu_jiffies();
    tokio::time::sleep(secs).await;
    let moved = bytes.load(Ordering::Relaxed) - b0;
    let busy = core_busy(&j0, &cpu_jiffies());
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = sut.as_ref().map(Sut::used_us);
    for t in &tasks {
        t.abort();
    }
    let mbps = moved as f64 / elapsed / 1e6;
    let cpu_part = match cpu {
        Some(us) if moved > 0 => format!(" sut_cpu_us={us} cpu_us_per_mb={:.1}", us as f64 / (moved as f64 / 1e6)),
        _ => String::new(),
    };
    println!("streams={streams} mb_per_s={mbps:.1} bytes={moved}{cpu_part} {busy}");
    Ok(())
}

/// Opens idle tunnels (CONNECT + ClientHello, then silence) in stages, and after each stage
/// waits `--settle-ms` and reads the RSS of `--sut-pid`'s process tree.
async fn idle(o: &Opts) -> AnyResult<()> {
    let route = Arc::new(Route::from_opts(o)?);
    let hello = captured_hello(&route.host)?;
    let stages: Vec<usize> = o.str("stages")?.split(',').map(str::parse).collect::<Result<_, _>>()?;
    let pids = process_tree(o.str("sut-pid")?.parse()?);
    let settle = Duration::from_millis(o.num("settle-ms", 1000)?);
    let conc: usize = o.num("conc", 200)?;
    let mut open: Vec<TcpStream> = Vec::new();
    let mut errors = 0u64;
    let mut report = vec![format!("rss0_kib={}", rss_kib(&pids))];
    for want in stages {
        // A sliding window of `conc` opens in flight, so one slow handshake does not hold a batch.
        let mut set = tokio::task::JoinSet::new();
        let mut launched = open.len();
        let mut consecutive_failures = 0usize;
        while open.len() < want {
            while launched < want && set.len() < conc {
                let (route, hello) = (route.clone(), hello.clone());
                set.spawn(async move {
                    let mut s = route.open().await?;
                    s.write_all(&hello).await?;
                    Ok::<_, std::io::Error>(s)
                });
                launched += 1;
            }
            match set.join_next().await {
                Some(Ok(Ok(s))) => {
                    open.push(s);
                    consecutive_failures = 0;
                }
                Some(_) => {
                    errors += 1;
                    consecutive_failures += 1;
                    launched -= 1;
                    if consecutive_failures > conc * 4 {
                        report.push(format!("stalled_at={}", open.len()));
                        break;
                    }
                }
                None => break,
            }
        }
        set.abort_all();
        tokio::time::sleep(settle).await;
        // Every tunnel must still be open: a closed one would read EOF now.
        let mut alive = 0;
        let mut probe = [0u8; 1];
        for s in &open {
            match s.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => alive += 1,
                _ => {}
            }
        }
        report.push(format!("tunnels_{want}={alive} rss_{want}_kib={}", rss_kib(&pids)));
    }
    println!("{} errors={errors}", report.join(" "));
    Ok(())
}

/// Plain-HTTP GETs over `--conns` keep-alive connections at `--rate` in all (open loop, latency
/// from the scheduled send time). With `--reload-at S` it appends a line to `--touch` (or sends
/// SIGHUP to `--hup-pid`) S seconds in, then watches `--log` for a line containing
/// `--done-pattern`, and reports the p99 of requests scheduled before the trigger and of those
/// scheduled between the trigger and the done line.
async fn http_fixed(o: &Opts) -> AnyResult<()> {
    let via: SocketAddr = o.str("via")?.parse()?;
    let url = o.str("url")?.to_string();
    let authority = url.trim_start_matches("http://").split('/').next().unwrap_or_default().to_string();
    let request =
        Arc::new(format!("GET {url} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: peers-bench\r\n\r\n").into_bytes());
    let rate: f64 = o.num("rate", 2000.0)?;
    let conns: usize = o.num("conns", 8)?;
    let (warm, secs) = window(o)?;
    let per_conn = Duration::from_secs_f64(conns as f64 / rate);
    let per_conn_n = ((warm + secs).as_secs_f64() * rate / conns as f64) as u64;
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let request = request.clone();
        let offset = per_conn.mul_f64(c as f64 / conns as f64);
        let mut s = TcpStream::connect(via).await?;
        s.set_nodelay(true)?;
        tasks.push(tokio::spawn(async move {
            let mut samples: Vec<(u32, u32)> = Vec::with_capacity(per_conn_n as usize);
            let mut errors = 0u32;
            let mut buf = Vec::with_capacity(4096);
            for i in 0..per_conn_n {
                let sched = start + offset + per_conn.mul_f64(i as f64);
                tokio::time::sleep_until(sched.into()).await;
                let ok = async {
                    s.write_all(&request).await?;
                    read_http_response(&mut s, &mut buf).await
                }
                .await;
                match ok {
                    Ok(()) => samples.push((micros(sched - start), micros(sched.elapsed()))),
                    Err(_) => {
                        errors += 1;
                        if let Ok(n) = TcpStream::connect(via).await {
                            let _ = n.set_nodelay(true);
                            s = n;
                        }
                    }
                }
            }
            (samples, errors)
        }));
    }
    let mut reload: Option<(u32, u32)> = None;
    if let Some(at) = o.opt("reload-at") {
        let at = Duration::from_secs_f64(at.parse()?);
        let log = PathBuf::from(o.str("log")?);
        let pattern = o.str("done-pattern")?.to_string();
        tokio::time::sleep_until((start + at).into()).await;
        let from = std::fs::metadata(&log)?.len();
        let t0 = Instant::now();
        if let Some(path) = o.opt("touch") {
            let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
            writeln!(f, "reload-{}.bench-reload.example", std::process::id() ^ micros(t0.elapsed() + at))?;
        } else {
            let pid = o.str("hup-pid")?;
            std::process::Command::new("kill").args(["-HUP", pid]).status()?;
        }
        let deadline = t0 + Duration::from_secs(120);
        let mut pos = from;
        let mut carry = String::new();
        'watch: while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let mut f = std::fs::File::open(&log)?;
            f.seek(std::io::SeekFrom::Start(pos))?;
            let mut chunk = String::new();
            let n = f.read_to_string(&mut chunk).unwrap_or(0) as u64;
            pos += n;
            carry.push_str(&chunk);
            for line in carry.lines() {
                if line.contains(&pattern) {
                    let t1 = t0.elapsed();
                    reload = Some((micros(t0 - start), micros(t1)));
                    break 'watch;
                }
            }
            if let Some(i) = carry.rfind('\n') {
                carry.drain(..=i);
            }
        }
        if reload.is_none() {
            eprintln!("no line matching {pattern:?} in {} within 120 s", log.display());
        }
    }
    let mut samples = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (s, e) = t.await?;
        samples.extend(s);
        errors += e;
    }
    let warm_us = micros(warm);
    let steady: Vec<u32> = samples.iter().filter(|(at, _)| *at >= warm_us).map(|&(_, l)| l).collect();
    let mut out = format!("requests={} errors={errors} {}", steady.len(), lat_summary(steady));
    if let Some((t0, dur)) = reload {
        let before: Vec<u32> = samples.iter().filter(|(at, _)| *at >= warm_us && *at < t0).map(|&(_, l)| l).collect();
        let during: Vec<u32> = samples.iter().filter(|(at, _)| *at >= t0 && *at <= t0 + dur).map(|&(_, l)| l).collect();
        let mut b = before;
        b.sort_unstable();
        let mut d = during;
        d.sort_unstable();
        out.push_str(&format!(
            " reload_ms={:.1} before_p99_ms={:.3} during_p50_ms={:.3} during_p99_ms={:.3} during_max_ms={:.3} during_samples={}",
            f64::from(dur) / 1000.0,
            pct(&b, 0.99),
            pct(&d, 0.5),
            pct(&d, 0.99),
            pct(&d, 1.0),
            d.len()
        ));
    }
    println!("{out}");
    Ok(())
}

/// Reads one HTTP/1.1 response with a Content-Length body.
async fn read_http_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") && !head.starts_with("http/1.0 200") {
                return Err(std::io::Error::other(format!("status: {}", head.lines().next().unwrap_or_default())));
            }
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| std::io::Error::other("no content-length"))?;
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "eof in body"));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(());
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "eof in head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------------
// Origins
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    http_conns: AtomicU64,
    http_requests: AtomicU64,
    hello_conns: AtomicU64,
    tls_conns: AtomicU64,
    bulk_conns: AtomicU64,
    hold_conns: AtomicU64,
}

async fn origins(o: &Opts) -> AnyResult<()> {
    let name = o.opt("tls-name").unwrap_or("tls.bench.test").to_string();
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![name.clone()])?.self_signed(&key)?;
    std::fs::write(o.str("ca-out")?, pem_encode("CERTIFICATE", cert.der()))?;
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let counters = Arc::new(Counters::default());
    let bind = |port: &str| -> AnyResult<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(("127.0.0.1", o.str(port)?.parse::<u16>()?))?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let http = TcpListener::from_std(bind("http")?)?;
    let hello = TcpListener::from_std(bind("hello")?)?;
    let tls = TcpListener::from_std(bind("tls")?)?;
    let bulk = TcpListener::from_std(bind("bulk")?)?;
    let hold = TcpListener::from_std(bind("hold")?)?;
    println!("ready");
    let c = counters.clone();
    tokio::spawn(accept_loop(http, move |s| {
        c.http_conns.fetch_add(1, Ordering::Relaxed);
        serve_http(s, c.clone())
    }));
    let c = counters.clone();
    tokio::spawn(accept_loop(hello, move |mut s| {
        c.hello_conns.fetch_add(1, Ordering::Relaxed);
        async move {
            read_record(&mut s).await?;
            s.write_all(&HELLO_REPLY).await?;
            s.shutdown().await
        }
    }));
    let c = counters.clone();
    tokio::spawn(accept_loop(tls, move |s| {
        c.tls_conns.fetch_add(1, Ordering::Relaxed);
        let acceptor = acceptor.clone();
        async move {
            let mut t = acceptor.accept(s).await?;
            t.write_all(TLS_BODY).await?;
            t.shutdown().await
        }
    }));
    let c = counters.clone();
    let chunk = Arc::new(vec![0x5a_u8; BULK_CHUNK]);
    tokio::spawn(accept_loop(bulk, move |mut s| {
        c.bulk_conns.fetch_add(1, Ordering::Relaxed);
        let chunk = chunk.clone();
        async move {
            read_record(&mut s).await?;
            loop {
                s.write_all(&chunk).await?;
            }
        }
    }));
    let c = counters.clone();
    accept_loop(hold, move |mut s| {
        c.hold_conns.fetch_add(1, Ordering::Relaxed);
        async move {
            read_record(&mut s).await?;
            let mut buf = [0u8; 1024];
            while s.read(&mut buf).await? > 0 {}
            Ok(())
        }
    })
    .await;
    Ok(())
}

async fn accept_loop<F, Fut>(l: TcpListener, handler: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                let fut = handler(s);
                tokio::spawn(async move {
                    let _ = fut.await;
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Reads one complete TLS record (a ClientHello) and nothing more.
async fn read_record<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await?;
    if head[0] != 0x16 {
        return Err(std::io::Error::other("not a TLS handshake record"));
    }
    let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok(())
}

/// HTTP/1.1 keep-alive origin: a fixed 200 for every request head; `GET /__stats` answers the
/// connection and request counters. Closes after answering a request that asked for it.
async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, c: Arc<Counters>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    let ok = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: no-store\r\nContent-Length: {}\r\n\r\n",
        HTTP_BODY.len()
    );
    let mut ok = ok.into_bytes();
    ok.extend_from_slice(HTTP_BODY);
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        let mut close = false;
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            c.http_requests.fetch_add(1, Ordering::Relaxed);
            if head.contains("/__stats") {
                let body = format!(
                    "http_conns={} http_requests={} hello_conns={} tls_conns={} bulk_conns={} hold_conns={}\n",
                    c.http_conns.load(Ordering::Relaxed),
                    c.http_requests.load(Ordering::Relaxed),
                    c.hello_conns.load(Ordering::Relaxed),
                    c.tls_conns.load(Ordering::Relaxed),
                    c.bulk_conns.load(Ordering::Relaxed),
                    c.hold_conns.load(Ordering::Relaxed),
                );
                out.extend_from_slice(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
                );
            } else {
                out.extend_from_slice(&ok);
            }
            let first = head.lines().next().unwrap_or_default();
            if head.contains("connection: close") || (first.ends_with("http/1.0") && !head.contains("keep-alive")) {
                close = true;
                break;
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
        }
        if close {
            return s.shutdown().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DNS upstream
// ---------------------------------------------------------------------------------------------

/// A minimal authoritative responder on UDP: for a one-question query, A 93.184.216.34 (or AAAA
/// 2606:2800:220:1:248:1893:25c8:1946) with TTL 3600; other types get NODATA. Single thread,
/// blocking sockets: it does nothing but parse the question and write the answer.
fn dns_upstream(o: &Opts) -> AnyResult<()> {
    let sock = UdpSocket::bind(("127.0.0.1", o.str("port")?.parse::<u16>()?))?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut buf = [0u8; 1500];
    let mut out = [0u8; 1500];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else { continue };
        if let Some(len) = dns_answer(&buf[..n], &mut out) {
            let _ = sock.send_to(&out[..len], peer);
        }
    }
}

fn dns_answer(q: &[u8], out: &mut [u8]) -> Option<usize> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    loop {
        let l = usize::from(*q.get(i)?);
        if l == 0 {
            i += 1;
            break;
        }
        if l > 63 {
            return None;
        }
        i += 1 + l;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let qend = i + 4;
    if qend > q.len() || qend + 28 > out.len() {
        return None;
    }
    out[..qend].copy_from_slice(&q[..qend]);
    out[2] = 0x84 | (q[2] & 0x01); // QR AA, RD copied
    out[3] = 0x80; // RA, NOERROR
    out[8..12].fill(0); // NSCOUNT, ARCOUNT
    let rdata: &[u8] = match qtype {
        1 => &[93, 184, 216, 34],
        28 => &[0x26, 0x06, 0x28, 0x00, 0x02, 0x20, 0, 1, 0x02, 0x48, 0x18, 0x93, 0x25, 0xc8, 0x19, 0x46],
        _ => {
            out[6..8].fill(0);
            return Some(qend);
        }
    };
    out[6..8].copy_from_slice(&1u16.to_be_bytes());
    let mut j = qend;
    out[j..j + 2].copy_from_slice(&[0xc0, 0x0c]);
    out[j + 2..j + 4].copy_from_slice(&qtype.to_be_bytes());
    out[j + 4..j + 6].copy_from_slice(&1u16.to_be_bytes());
    out[j + 6..j + 10].copy_from_slice(&3600u32.to_be_bytes());
    out[j + 10..j + 12].copy_from_slice(&(rdata.len() as u16).to_be_bytes());
    j += 12;
    out[j..j + rdata.len()].copy_from_slice(rdata);
    Some(j + rdata.len())
}

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

fn gen_names(o: &Opts) -> AnyResult<()> {
    let n: usize = o.num("count", 1_000_000)?;
    let prefix = o.opt("prefix").unwrap_or("");
    let mut f = std::io::BufWriter::new(std::fs::File::create(o.str("out")?)?);
    for i in 0..n {
        writeln!(f, "{prefix}{}", name(i))?;
    }
    f.flush()?;
    println!("names={n}");
    Ok(())
}

/// `--count` distinct ports free on 127.0.0.1 for TCP and UDP both, held together while chosen.
fn free_ports(o: &Opts) -> AnyResult<()> {
    let n: usize = o.num("count", 1)?;
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let t = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = t.local_addr()?.port();
        if let Ok(u) = UdpSocket::bind(("127.0.0.1", port)) {
            held.push((t, u));
            ports.push(port.to_string());
        }
    }
    println!("{}", ports.join(" "));
    Ok(())
}

/// Sends `--name` A queries to 127.0.0.1:`--port` until one is answered (15 s at most).
fn dns_probe(o: &Opts) -> AnyResult<()> {
    let port: u16 = o.str("port")?.parse()?;
    let name = o.opt("name").unwrap_or("probe.bench.test");
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        sock.send_to(&q, ("127.0.0.1", port))?;
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && n >= 12
            && buf[..2] == q[..2]
        {
            println!("rcode={}", buf[3] & 0x0f);
            return Ok(());
        }
    }
    Err(format!("no DNS answer from 127.0.0.1:{port}").into())
}
