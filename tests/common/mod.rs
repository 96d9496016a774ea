//! End-to-end harness: the built `egressd run` binary as a child process, loopback origins
//! (plain HTTP with hyper, TLS with tokio-rustls and an rcgen certificate), raw HTTP/1.1 client
//! helpers and access to the JSON lines egressd prints on stdout (audit log + events).
//!
//! Everything here binds and dials 127.0.0.1 only.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Default bound for one test body.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `f` and fails the test if it does not finish within `limit`.
pub async fn bounded<F: Future>(limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("test body did not finish within {limit:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// egressd child process
// ---------------------------------------------------------------------------------------------

/// Static names every test config carries. All but the metadata one point at loopback.
pub const HOSTS: &[(&str, &str)] = &[
    ("allowed.test", "127.0.0.1"),
    ("tls.allowed.test", "127.0.0.1"),
    ("other.allowed.test", "127.0.0.1"),
    ("denied.test", "127.0.0.1"),
    ("meta.allowed.test", "169.254.169.254"),
];

/// Set once egressd has rejected `:0` listeners: later starts pick free ports themselves.
static PORT_ZERO_REJECTED: AtomicBool = AtomicBool::new(false);

pub struct Egressd {
    child: Child,
    /// The first bound explicit-proxy address.
    pub proxy: SocketAddr,
    /// The first bound DNS address (UDP and TCP share it), from the start line's `dns_listen`.
    pub dns: Option<SocketAddr>,
    /// The admin listener, from the start line's `admin_listen`.
    pub admin: Option<SocketAddr>,
    /// Every stdout line that parsed as JSON, in order.
    lines: Arc<Mutex<Vec<Value>>>,
    /// Every stdout and stderr line as text (for failure dumps).
    raw: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

/// Options for one egressd instance.
#[derive(Default)]
pub struct Opts<'a> {
    /// Rule file body (`[[rule]]` tables), written to `rules/test.toml`.
    pub rules: &'a str,
    /// Extra lines appended to the `[proxy]` table.
    pub proxy_extra: &'a str,
    /// Extra `[hosts]` entries.
    pub hosts: &'a [(&'a str, &'a str)],
    /// `dns.upstreams`; empty: the default `["127.0.0.1:9"]` (nothing answers there).
    pub dns_upstreams: &'a [SocketAddr],
    /// Extra lines appended to the `[dns]` table; may end with a `[dns.tunneling]` table.
    pub dns_extra: &'a str,
    /// Leave out [`HOSTS`] (only `hosts` is written to `[hosts]`).
    pub no_default_hosts: bool,
    /// Extra lines appended to the `[admin]` table (e.g. `shutdown_grace = "3s"`).
    pub admin_extra: &'a str,
    /// Extra lines appended to the `[policy]` table (e.g. `revoke_on_reload = false`).
    pub policy_extra: &'a str,
    /// `proxy.header_timeout`; empty: `"1s"`.
    pub header_timeout: &'a str,
    /// Start egressd with this `ulimit -n` (through `bash -c 'ulimit -n N; exec egressd ...'`).
    pub nofile: Option<u64>,
    /// `guard.allow_cidrs` entries (e.g. `"127.0.0.1/32"`); empty: `["127.0.0.0/8"]`.
    pub guard_allow_cidrs: &'a [&'a str],
    /// Extra top-level tables appended after `[hosts]` (e.g. `"[limits]\nclient_upload_budget = \"64KiB\"\n"`).
    pub extra: &'a str,
    /// Run egressd inside this network namespace (`ip netns exec NAME egressd run ...`); its
    /// listeners and the addresses it dials are then that namespace's.
    pub netns: Option<&'a str>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Egressd {
    /// Starts egressd with the given rule file and the default config.
    pub async fn start(rules: &str) -> Egressd {
        Self::start_opts(Opts { rules, ..Default::default() }).await
    }

    pub async fn start_opts(opts: Opts<'_>) -> Egressd {
        let mut last = String::new();
        for _attempt in 0..4 {
            let zero = !PORT_ZERO_REJECTED.load(Ordering::SeqCst);
            let ports = if zero { [0, 0, 0] } else { [free_port(), free_port(), free_port()] };
            match Self::try_start(&opts, ports).await {
                Ok(e) => return e,
                Err(out) => {
                    if zero && out.contains("port 0") {
                        PORT_ZERO_REJECTED.store(true, Ordering::SeqCst);
                    }
                    last = out;
                }
            }
        }
        panic!("egressd did not start; its output:\n{last}");
    }

    async fn try_start(opts: &Opts<'_>, [proxy_port, dns_port, admin_port]: [u16; 3]) -> Result<Egressd, String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        let mut hosts = String::new();
        let defaults: &[(&str, &str)] = if opts.no_default_hosts { &[] } else { HOSTS };
        for (name, ip) in defaults.iter().chain(opts.hosts.iter()) {
            hosts.push_str(&format!("\"{name}\" = [\"{ip}\"]\n"));
        }
        let upstreams = if opts.dns_upstreams.is_empty() {
            "\"127.0.0.1:9\"".to_string()
        } else {
            opts.dns_upstreams.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ")
        };
        let main = format!(
            r#"[proxy]
listen = ["127.0.0.1:{proxy_port}"]
connect_timeout = "2s"
header_timeout = "{header_timeout}"
{proxy_extra}

[dns]
listen = ["127.0.0.1:{dns_port}"]
upstreams = [{upstreams}]
{dns_extra}

[admin]
listen = "127.0.0.1:{admin_port}"
{admin_extra}

[guard]
allow_cidrs = [{guard_allow}]

[policy]
files = ["rules/*.toml"]
{policy_extra}

[hosts]
{hosts}
{extra}"#,
            proxy_extra = opts.proxy_extra,
            dns_extra = opts.dns_extra,
            admin_extra = opts.admin_extra,
            policy_extra = opts.policy_extra,
            extra = opts.extra,
            header_timeout = if opts.header_timeout.is_empty() { "1s" } else { opts.header_timeout },
            guard_allow = if opts.guard_allow_cidrs.is_empty() {
                "\"127.0.0.0/8\"".to_string()
            } else {
                opts.guard_allow_cidrs.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ")
            },
        );
        std::fs::write(dir.path().join("egressd.toml"), main).unwrap();
        std::fs::write(dir.path().join("rules/test.toml"), opts.rules).unwrap();

        let mut command = match (opts.nofile, opts.netns) {
            (None, None) => Command::new(env!("CARGO_BIN_EXE_egressd")),
            (None, Some(ns)) => {
                // `ip netns exec` execs the program: the child's pid is egressd's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_egressd")]);
                c
            }
            (Some(_), Some(_)) => panic!("Opts::nofile and Opts::netns cannot be combined"),
            (Some(limit), None) => {
                // `exec` keeps the pid: `pid()` and the kill on drop reach egressd itself.
                let mut c = Command::new("bash");
                c.arg("-c").arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\"")).arg(env!("CARGO_BIN_EXE_egressd"));
                c
            }
        };
        let mut child = command
            .args(["run", "--config"])
            .arg(dir.path().join("egressd.toml"))
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn egressd");

        let lines = Arc::new(Mutex::new(Vec::<Value>::new()));
        let raw = Arc::new(Mutex::new(Vec::<String>::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        {
            let (lines, raw) = (lines.clone(), raw.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        lines.lock().unwrap().push(v);
                    }
                    raw.lock().unwrap().push(line);
                }
            });
        }
        {
            let raw = raw.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    raw.lock().unwrap().push(format!("[stderr] {line}"));
                }
            });
        }

        let mut e = Egressd { child, proxy: "127.0.0.1:1".parse().unwrap(), dns: None, admin: None, lines, raw, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let start = e.lines.lock().unwrap().iter().find(|v| v["event"] == "start").cloned();
            if let Some(start) = start {
                let listed = start["proxy_listen"].as_str().unwrap_or_default();
                let bound = listed.split(',').filter_map(|s| s.trim().parse::<SocketAddr>().ok()).next();
                e.proxy = match bound {
                    Some(a) => a,
                    None if proxy_port != 0 => SocketAddr::from(([127, 0, 0, 1], proxy_port)),
                    None => panic!("start line without a usable proxy_listen: {start}"),
                };
                let dns_listed = start["dns_listen"].as_str().unwrap_or_default();
                e.dns = dns_listed
                    .split(',')
                    .filter_map(|s| s.trim().parse::<SocketAddr>().ok())
                    .next()
                    .or_else(|| (dns_port != 0).then(|| SocketAddr::from(([127, 0, 0, 1], dns_port))));
                e.admin = start["admin_listen"]
                    .as_str()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|s| s.trim().parse::<SocketAddr>().ok())
                    .next()
                    .or_else(|| (admin_port != 0).then(|| SocketAddr::from(([127, 0, 0, 1], admin_port))));
                return Ok(e);
            }
            if let Ok(Some(status)) = e.child.try_wait() {
                // Let the reader threads drain what the process printed.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(format!("exited with {status}\n{}", e.dump()));
            }
            if Instant::now() > deadline {
                panic!("no {{\"event\":\"start\"}} line within 10 s; output:\n{}", e.dump());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The DNS listener (UDP and TCP); panics when the start line named none.
    pub fn dns_addr(&self) -> SocketAddr {
        match self.dns {
            Some(a) => a,
            None => panic!("egressd's start line has no usable dns_listen; output:\n{}", self.dump()),
        }
    }

    /// The admin listener; panics when the start line named none.
    pub fn admin_addr(&self) -> SocketAddr {
        match self.admin {
            Some(a) => a,
            None => panic!("egressd's start line has no usable admin_listen; output:\n{}", self.dump()),
        }
    }

    /// `GET path` on the admin listener (fresh connection, `Connection: close`).
    pub async fn admin_get(&self, path: &str) -> std::io::Result<Resp> {
        admin_get(self.admin_addr(), path).await
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`"HUP"`, `"TERM"`, ...) with `kill(1)`.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().expect("run kill(1)");
        assert!(st.success(), "kill -{sig} {} failed: {st}", self.pid());
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many JSON lines have been read so far.
    pub fn line_count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// The JSON lines from index `from` on that match `pred` (no copy of the rest).
    pub fn lines_from(&self, from: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let lines = self.lines.lock().unwrap();
        lines.iter().skip(from).filter(|v| pred(v)).cloned().collect()
    }

    /// Waits up to `timeout` for a line at index `from` or later matching `pred`; returns its
    /// index and the line.
    pub async fn wait_for_log_from(
        &self,
        from: usize,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<(usize, Value)> {
        let deadline = Instant::now() + timeout;
        let mut seen = from;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                if let Some(i) = (seen..lines.len()).find(|&i| pred(&lines[i])) {
                    return Some((i, lines[i].clone()));
                }
                seen = seen.max(lines.len());
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// All output so far (the last 200 lines), for failure messages.
    pub fn dump(&self) -> String {
        let raw = self.raw.lock().unwrap();
        let skip = raw.len().saturating_sub(200);
        raw[skip..].join("\n")
    }

    /// Every JSON line so far.
    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Audit lines (`"message":"decision"`) so far.
    pub fn decisions(&self) -> Vec<Value> {
        self.lines().into_iter().filter(is_decision).collect()
    }

    /// Waits for a JSON line matching `pred`.
    pub async fn try_wait_for_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.lines.lock().unwrap().iter().find(|v| pred(v)).cloned() {
                return Some(v);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a JSON line matching `pred`; panics with the output on timeout.
    pub async fn wait_for_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        match self.try_wait_for_log(pred, timeout).await {
            Some(v) => v,
            None => panic!("no matching log line within {timeout:?}; egressd output:\n{}", self.dump()),
        }
    }

    /// Waits (≤ 5 s) for an audit line matching `pred`.
    pub async fn audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        match self.try_wait_for_log(|v| is_decision(v) && pred(v), Duration::from_secs(5)).await {
            Some(v) => v,
            None => panic!("no audit line {what} within 5 s; egressd output:\n{}", self.dump()),
        }
    }
}

impl Egressd {
    /// Waits (≤ 5 s) until at least `count` audit lines match `pred`.
    pub async fn audit_count(&self, what: &str, count: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found: Vec<Value> = self.decisions().into_iter().filter(|v| pred(v)).collect();
            if found.len() >= count {
                return found;
            }
            if Instant::now() > deadline {
                panic!("{} audit line(s) {what}, expected {count}; egressd output:\n{}", found.len(), self.dump());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Egressd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- egressd output ----\n{}\n------------------------", self.dump());
        }
    }
}

pub fn is_decision(v: &Value) -> bool {
    v["message"] == "decision"
}

/// A field as a string: strings as-is, numbers and bools in their JSON spelling.
pub fn s(v: &Value, field: &str) -> String {
    match &v[field] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A numeric field (a JSON number, or a string of digits).
pub fn n(v: &Value, field: &str) -> Option<u64> {
    match &v[field] {
        Value::Number(x) => x.as_u64().or_else(|| x.as_f64().map(|f| f as u64)),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP origin
// ---------------------------------------------------------------------------------------------

pub const ORIGIN_BODY: &str = "hello from origin";

/// One request as the origin received it. `body` grows as frames arrive.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub complete: bool,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub struct HttpOrigin {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl HttpOrigin {
    pub async fn start() -> HttpOrigin {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// Serves on a listener bound elsewhere (e.g. inside a network namespace).
    pub fn start_on(listener: TcpListener) -> HttpOrigin {
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::<Recorded>::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (reqs, conns) = (requests.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                conns.fetch_add(1, Ordering::SeqCst);
                let reqs = reqs.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let reqs = reqs.clone();
                        // `/delay/<ms>...`: answer only after <ms> milliseconds (a slow origin).
                        let delay = req
                            .uri()
                            .path()
                            .strip_prefix("/delay/")
                            .and_then(|rest| rest.split('/').next())
                            .and_then(|ms| ms.parse::<u64>().ok());
                        async move {
                            let idx = {
                                let mut r = reqs.lock().unwrap();
                                r.push(Recorded {
                                    method: req.method().to_string(),
                                    uri: req.uri().to_string(),
                                    headers: req
                                        .headers()
                                        .iter()
                                        .map(|(k, v)| {
                                            (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())
                                        })
                                        .collect(),
                                    ..Default::default()
                                });
                                r.len() - 1
                            };
                            let mut body = req.into_body();
                            let mut ok = true;
                            while let Some(frame) = body.frame().await {
                                match frame {
                                    Ok(f) => {
                                        if let Some(d) = f.data_ref() {
                                            reqs.lock().unwrap()[idx].body.extend_from_slice(d);
                                        }
                                    }
                                    Err(_) => {
                                        ok = false;
                                        break;
                                    }
                                }
                            }
                            reqs.lock().unwrap()[idx].complete = ok;
                            if let Some(ms) = delay {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(ORIGIN_BODY.as_bytes()))))
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        HttpOrigin { addr, requests, connections, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn body_bytes(&self) -> usize {
        self.requests.lock().unwrap().iter().map(|r| r.body.len()).sum()
    }
}

impl Drop for HttpOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback port nothing listens on.
pub fn closed_port() -> u16 {
    free_port()
}

// ---------------------------------------------------------------------------------------------
// TLS origin
// ---------------------------------------------------------------------------------------------

pub const TLS_BODY: &str = "hello over tls";
pub const TLS_NAMES: &[&str] = &["tls.allowed.test", "other.allowed.test"];

struct TestCert {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
    pem: String,
}

fn test_cert() -> &'static TestCert {
    static CERT: OnceLock<TestCert> = OnceLock::new();
    CERT.get_or_init(|| {
        let names: Vec<String> = TLS_NAMES.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
        TestCert { cert: ck.cert.der().clone(), key: ck.signing_key.serialize_der(), pem: ck.cert.pem() }
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The test certificate (self-signed, for [`TLS_NAMES`]) in PEM, for real clients
/// (`curl --cacert`).
pub fn test_cert_pem() -> String {
    test_cert().pem.clone()
}

/// Client config trusting only the test certificate.
pub fn tls_client_config() -> Arc<rustls::ClientConfig> {
    static CFG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(test_cert().cert.clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    })
    .clone()
}

fn tls_server_config() -> Arc<rustls::ServerConfig> {
    let c = test_cert();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.clone()));
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![c.cert.clone()], key)
            .unwrap(),
    )
}

/// TLS handshake with `server_name` as SNI over an established stream (e.g. a CONNECT tunnel).
pub async fn tls_connect<S>(stream: S, server_name: &str) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(tls_client_config()).connect(name, stream).await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Read one HTTP/1.1 request head, answer 200 with [`TLS_BODY`], close.
    Http,
    /// Echo every application byte back.
    Echo,
    /// Read and count, never answer.
    Sink,
}

#[derive(Default)]
pub struct TlsCounters {
    /// TCP connections accepted.
    pub tcp_accepted: AtomicUsize,
    /// TLS handshakes completed.
    pub handshakes: AtomicUsize,
    /// Bytes received on the TCP level (handshake included).
    pub raw_bytes: AtomicU64,
    /// Decrypted application bytes received.
    pub app_bytes: AtomicU64,
    /// HTTP requests answered (Http mode).
    pub answered: AtomicUsize,
}

pub struct TlsOrigin {
    pub addr: SocketAddr,
    pub counters: Arc<TlsCounters>,
    task: JoinHandle<()>,
}

/// A TcpStream that counts the bytes read from it.
struct Counting {
    inner: TcpStream,
    counters: Arc<TlsCounters>,
}

impl AsyncRead for Counting {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        self.counters.raw_bytes.fetch_add(got as u64, Ordering::SeqCst);
        r
    }
}

impl AsyncWrite for Counting {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl TlsOrigin {
    pub async fn start(mode: TlsMode) -> TlsOrigin {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), mode)
    }

    /// Serves on a listener bound elsewhere (e.g. inside a network namespace).
    pub fn start_on(listener: TcpListener, mode: TlsMode) -> TlsOrigin {
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(TlsCounters::default());
        let acceptor = tokio_rustls::TlsAcceptor::from(tls_server_config());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                c.tcp_accepted.fetch_add(1, Ordering::SeqCst);
                let (acceptor, c) = (acceptor.clone(), c.clone());
                tokio::spawn(async move {
                    let counting = Counting { inner: stream, counters: c.clone() };
                    let Ok(mut tls) = acceptor.accept(counting).await else { return };
                    c.handshakes.fetch_add(1, Ordering::SeqCst);
                    let mut buf = vec![0u8; 64 * 1024];
                    match mode {
                        TlsMode::Http => {
                            let mut head = Vec::new();
                            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                                match tls.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(k) => {
                                        c.app_bytes.fetch_add(k as u64, Ordering::SeqCst);
                                        head.extend_from_slice(&buf[..k]);
                                    }
                                }
                            }
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{TLS_BODY}",
                                TLS_BODY.len()
                            );
                            if tls.write_all(resp.as_bytes()).await.is_ok() {
                                c.answered.fetch_add(1, Ordering::SeqCst);
                            }
                            let _ = tls.shutdown().await;
                        }
                        TlsMode::Echo | TlsMode::Sink => loop {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => {
                                    c.app_bytes.fetch_add(k as u64, Ordering::SeqCst);
                                    if mode == TlsMode::Echo && tls.write_all(&buf[..k]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        },
                    }
                });
            }
        });
        TlsOrigin { addr, counters, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `X-Egressd-Deny: rule=NAME; reason=REASON; id=ID` as key/value pairs.
    pub fn deny(&self) -> Vec<(String, String)> {
        let h = self.header("x-egressd-deny").unwrap_or_else(|| panic!("no X-Egressd-Deny header in {self:?}"));
        h.split(';')
            .filter_map(|kv| kv.trim().split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    pub fn deny_field(&self, key: &str) -> String {
        self.deny().into_iter().find(|(k, _)| k == key).map(|(_, v)| v).unwrap_or_default()
    }
}

/// Reads a response head (status line + headers) one byte at a time, so nothing after the head
/// is consumed (a CONNECT tunnel starts right after it).
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("EOF inside response head after {:?}", String::from_utf8_lossy(&head)),
            ));
        }
        head.push(b[0]);
        if head.len() > 64 * 1024 {
            return Err(std::io::Error::other("response head too large"));
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}

async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if s.read(&mut b).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        line.push(b[0]);
    }
    line.truncate(line.len() - 2);
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Reads one full response (Content-Length, chunked, or to EOF).
pub async fn read_response<S: AsyncRead + Unpin>(s: &mut S, head_only_request: bool) -> std::io::Result<Resp> {
    let (status, headers) = read_head(s).await?;
    let mut resp = Resp { status, headers, body: Vec::new() };
    if head_only_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(resp);
    }
    let chunked = resp.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let size_line = read_line(s).await?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size_line:?}")))?;
            if size == 0 {
                // trailers until an empty line
                while !read_line(s).await?.is_empty() {}
                break;
            }
            let mut chunk = vec![0u8; size];
            s.read_exact(&mut chunk).await?;
            resp.body.extend_from_slice(&chunk);
            read_line(s).await?;
        }
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().map_err(|_| std::io::Error::other("bad content-length"))?;
        resp.body = vec![0u8; len];
        s.read_exact(&mut resp.body).await?;
    } else {
        s.read_to_end(&mut resp.body).await?;
    }
    Ok(resp)
}

pub async fn dial(proxy: SocketAddr) -> TcpStream {
    TcpStream::connect(proxy).await.expect("connect to egressd")
}

/// Connects to egressd from the local address `source` (e.g. `127.0.0.2`: another client).
pub async fn dial_from(proxy: SocketAddr, source: std::net::IpAddr) -> TcpStream {
    let socket = if source.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .expect("socket");
    socket.bind(SocketAddr::new(source, 0)).unwrap_or_else(|e| panic!("bind {source}: {e}"));
    socket.connect(proxy).await.unwrap_or_else(|e| panic!("connect to egressd from {source}: {e}"))
}

/// One raw request on a fresh connection; returns the response.
pub async fn raw_request(proxy: SocketAddr, request: &[u8]) -> Resp {
    let mut s = dial(proxy).await;
    s.write_all(request).await.unwrap();
    read_response(&mut s, false)
        .await
        .unwrap_or_else(|e| panic!("reading the response to {:?}: {e}", String::from_utf8_lossy(request)))
}

/// `GET http://host:port/path` through the proxy on a fresh connection.
pub async fn get(proxy: SocketAddr, host: &str, port: u16, path: &str) -> Resp {
    let req = format!("GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n");
    raw_request(proxy, req.as_bytes()).await
}

/// Sends `CONNECT target` and reads the response head (and body when not 2xx).
pub async fn connect(proxy: SocketAddr, target: &str) -> (TcpStream, Resp) {
    connect_over(dial(proxy).await, target).await
}

/// [`connect`] from the local address `source`.
pub async fn connect_from(proxy: SocketAddr, source: std::net::IpAddr, target: &str) -> (TcpStream, Resp) {
    connect_over(dial_from(proxy, source).await, target).await
}

/// Sends `CONNECT target` on an open connection and reads the response head (and body when not 2xx).
pub async fn connect_over(mut s: TcpStream, target: &str) -> (TcpStream, Resp) {
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, headers) = read_head(&mut s).await.unwrap_or_else(|e| panic!("CONNECT {target}: {e}"));
    let mut resp = Resp { status, headers, body: Vec::new() };
    if !(200..300).contains(&status) {
        if let Some(len) = resp.header("content-length").and_then(|l| l.parse::<usize>().ok()) {
            let mut body = vec![0u8; len];
            if s.read_exact(&mut body).await.is_ok() {
                resp.body = body;
            }
        }
    }
    (s, resp)
}

/// Reads until EOF or error and returns what arrived and whether it ended in an error.
pub async fn read_until_closed<S: AsyncRead + Unpin>(s: &mut S) -> (Vec<u8>, Option<std::io::Error>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (out, None),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// `GET path` on an admin listener over a fresh connection with `Connection: close`.
pub async fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    read_response(&mut s, false).await
}
