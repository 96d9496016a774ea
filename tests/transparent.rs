//! Transparent mode and per-client upload budgets, end to end.
//!
//! The transparent tests build a small routed network out of network namespaces, so nothing
//! touches the host's own interfaces, addresses, routes or firewall:
//!
//! ```text
//!   client ns                    router ns (egressd)                     origin ns
//!   eth0 10.231.1.2/30 ─── veth ─── rc 10.231.1.1/30
//!                                   ro 10.231.2.1/29 ─── veth ─── eth0 10.231.2.2/29 (right)
//!                                                                      10.231.2.3/29 (wrong)
//! ```
//!
//! The router forwards (`ip_forward` inside its namespace only) and redirects the client's
//! TCP 443 and 80 to egressd's transparent listeners with the operator scripts in
//! `deploy/transparent/` (REDIRECT with iptables, REDIRECT with nftables, TPROXY with
//! nftables). egressd runs in the router namespace (`ip netns exec`); the origins (rustls and
//! hyper servers from the harness) listen on sockets made inside the origin namespace; the
//! clients are curl (`ip netns exec`) and rustls over sockets made inside the client
//! namespace. The namespaces are named after the test process and removed on drop, panics
//! included. These tests skip, saying why, only when not root or when `ip netns` is
//! unavailable; a missing iptables, nft or curl is a skip with an install hint, and a failure
//! under `CI=true` (.ci/run installs them).
//!
//! The budget test runs on loopback: clients 127.0.0.2 and 127.0.0.3 share one egressd.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn has(v: &Value, field: &str, want: &str) -> bool {
    s(v, field) == want
}

fn transparent(v: &Value) -> bool {
    is_decision(v) && has(v, "kind", "transparent")
}

// ---------------------------------------------------------------------------------------------
// Commands and namespaces
// ---------------------------------------------------------------------------------------------

/// Transparent listener ports inside the router namespace (private to it: fixed is fine).
const TLS_LISTEN: u16 = 15443;
const HTTP_LISTEN: u16 = 15080;
const CLIENT_IP: &str = "10.231.1.2";
const RIGHT: &str = "10.231.2.2";
const WRONG: &str = "10.231.2.3";
/// A name on the harness's TLS certificate.
const TLS_NAME: &str = "tls.allowed.test";
const HTTP_NAME: &str = "allowed.test";
/// Prefix of every namespace these tests create: `egressd-t<pid>-<tag>-<role>`.
const NS_PREFIX: &str = "egressd-t";

fn output(program: &str, args: &[&str]) -> std::io::Result<Output> {
    Command::new(program).args(args).stdin(Stdio::null()).output()
}

/// Runs a command that must succeed; panics with its output otherwise.
fn must(program: &str, args: &[&str]) -> String {
    let out = output(program, args).unwrap_or_else(|e| panic!("cannot run {program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn is_root() -> bool {
    output("id", &["-u"]).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn have(program: &str) -> bool {
    output(program, &["--version"]).is_ok_and(|o| o.status.success())
}

/// Why this machine cannot run the namespace tests, if it cannot. A missing tool under
/// `CI=true` is a failure, not a skip: .ci/run installs them.
fn skip_reason(tools: &[(&str, &str)]) -> Option<String> {
    if !is_root() {
        return Some("transparent-mode namespace test needs root (network namespaces, iptables)".into());
    }
    if output("ip", &["-V"]).is_err() {
        let msg = "`ip` not found: apt-get install -y iproute2".to_string();
        assert!(!in_ci(), "CI=true but {msg}");
        return Some(msg);
    }
    if !output("ip", &["netns", "list"]).is_ok_and(|o| o.status.success()) {
        return Some("`ip netns` is unavailable here".into());
    }
    for (tool, package) in tools {
        if !have(tool) {
            let msg = format!("`{tool}` not found: apt-get install -y {package}");
            assert!(!in_ci(), "CI=true but {msg}");
            return Some(msg);
        }
    }
    None
}

/// A network namespace, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn add(name: String) -> Result<Netns, String> {
        let out = output("ip", &["netns", "add", &name]).map_err(|e| format!("ip netns add: {e}"))?;
        if !out.status.success() {
            return Err(format!("ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Netns { name })
    }

    /// `ip -n NAME args...`, which must succeed.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        must("ip", &all);
    }

    /// `ip netns exec NAME program args...`, its output whatever the exit status.
    fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        output("ip", &all).unwrap_or_else(|e| panic!("ip netns exec {} {program}: {e}", self.name))
    }

    /// `ip netns exec NAME program args...`, which must succeed; its stdout.
    fn must(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        must("ip", &all)
    }

    fn path(&self) -> PathBuf {
        ["/run/netns", "/var/run/netns"]
            .iter()
            .map(|d| Path::new(d).join(&self.name))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no /run/netns/{}", self.name))
    }

    /// Runs `f` on a fresh thread inside this namespace (see [`enter`]).
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        enter(self.path(), f)
    }

    /// A listener bound inside this namespace.
    fn listen(&self, addr: SocketAddr) -> tokio::net::TcpListener {
        let l = self.enter(move || std::net::TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        l.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(l).unwrap()
    }

    /// A TCP connection made from inside this namespace.
    async fn connect(&self, addr: SocketAddr) -> TcpStream {
        let path = self.path();
        let s = tokio::task::spawn_blocking(move || {
            enter(path, move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("connect to {addr} from the client namespace: {e}"));
        s.set_nonblocking(true).unwrap();
        TcpStream::from_std(s).unwrap()
    }
}

/// Runs `f` on a fresh thread inside the network namespace at `path`: sockets it creates
/// belong to that namespace for their whole life, whichever thread uses them later.
fn enter<T: Send + 'static>(path: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
        f()
    })
    .join()
    .expect("thread inside the namespace panicked")
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = output("ip", &["netns", "del", &self.name]);
    }
}

/// Deletes namespaces left by earlier runs of these tests that were killed (their pid is gone).
fn remove_stale_namespaces() {
    let Ok(out) = output("ip", &["netns", "list"]) else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = output("ip", &["netns", "del", name]);
        }
    }
}

/// The three namespaces and their links.
struct Lab {
    client: Netns,
    router: Netns,
    origin: Netns,
}

impl Lab {
    /// Builds the topology; `Err` (a skip reason) only when namespaces cannot be created.
    fn build(tag: &str) -> Result<Lab, String> {
        remove_stale_namespaces();
        let name = |role: &str| format!("{NS_PREFIX}{}-{tag}-{role}", std::process::id());
        let client = Netns::add(name("c"))?;
        let router = Netns::add(name("r"))?;
        let origin = Netns::add(name("o"))?;
        // Both veth pairs are created inside the router namespace, their peers moved straight
        // into the client and origin namespaces: nothing appears in the host namespace.
        router.ip(&["link", "add", "rc", "type", "veth", "peer", "name", "eth0", "netns", &client.name]);
        router.ip(&["link", "add", "ro", "type", "veth", "peer", "name", "eth0", "netns", &origin.name]);
        for ns in [&client, &router, &origin] {
            ns.ip(&["link", "set", "lo", "up"]);
        }
        client.ip(&["addr", "add", "10.231.1.2/30", "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        client.ip(&["route", "add", "default", "via", "10.231.1.1"]);
        router.ip(&["addr", "add", "10.231.1.1/30", "dev", "rc"]);
        router.ip(&["addr", "add", "10.231.2.1/29", "dev", "ro"]);
        router.ip(&["link", "set", "rc", "up"]);
        router.ip(&["link", "set", "ro", "up"]);
        origin.ip(&["addr", "add", "10.231.2.2/29", "dev", "eth0"]);
        origin.ip(&["addr", "add", "10.231.2.3/29", "dev", "eth0"]);
        origin.ip(&["link", "set", "eth0", "up"]);
        origin.ip(&["route", "add", "default", "via", "10.231.2.1"]);
        router.must("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
        Ok(Lab { client, router, origin })
    }
}

// ---------------------------------------------------------------------------------------------
// The operator scripts
// ---------------------------------------------------------------------------------------------

/// Whether the kernel has what TPROXY needs (nft `socket` and `tproxy`), probed with a scratch
/// table in the router namespace: a failure of the script itself must not pass for that.
fn tproxy_unsupported(router: &Netns) -> Option<String> {
    let steps: [&[&str]; 4] = [
        &["add", "table", "inet", "egressd_probe"],
        &["add", "chain", "inet", "egressd_probe", "p", "{ type filter hook prerouting priority mangle; }"],
        &[
            "add",
            "rule",
            "inet",
            "egressd_probe",
            "p",
            "meta",
            "l4proto",
            "tcp",
            "socket",
            "transparent",
            "1",
            "accept",
        ],
        &[
            "add",
            "rule",
            "inet",
            "egressd_probe",
            "p",
            "meta",
            "nfproto",
            "ipv4",
            "tcp",
            "dport",
            "1",
            "tproxy",
            "ip",
            "to",
            ":1",
        ],
    ];
    let mut failure = None;
    for args in steps {
        let out = router.exec("nft", args);
        if !out.status.success() {
            failure = Some(format!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
            break;
        }
    }
    router.exec("nft", &["delete", "table", "inet", "egressd_probe"]);
    failure
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Firewall {
    Iptables,
    Nftables,
}

impl Firewall {
    fn script(self) -> String {
        let file = match self {
            Firewall::Iptables => "iptables.sh",
            Firewall::Nftables => "nftables.sh",
        };
        format!("{}/deploy/transparent/{file}", env!("CARGO_MANIFEST_DIR"))
    }

    fn tools(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Firewall::Iptables => &[("iptables", "iptables"), ("curl", "curl")],
            Firewall::Nftables => &[("nft", "nftables"), ("curl", "curl")],
        }
    }

    /// The redirection state as the firewall lists it (no counters), for idempotence checks.
    fn dump(self, router: &Netns) -> String {
        match self {
            Firewall::Iptables => {
                router.must("iptables", &["-w", "-t", "nat", "-S"])
                    + &router.must("iptables", &["-w", "-t", "mangle", "-S"])
            }
            Firewall::Nftables => router.must("nft", &["list", "ruleset"]),
        }
    }

    /// Runs the script in the router namespace; its exit code and output.
    fn run(self, router: &Netns, args: &[&str]) -> (i32, String) {
        let script = self.script();
        let mut all = vec![script.as_str()];
        all.extend_from_slice(args);
        let out = router.exec("bash", &all);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

struct CurlOut {
    code: i32,
    stdout: String,
    stderr: String,
}

impl CurlOut {
    /// With `-i`: the status code of the (last) response.
    fn status(&self) -> u16 {
        self.stdout
            .lines()
            .rfind(|l| l.starts_with("HTTP/"))
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in curl output: {self:?}"))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.stdout.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn body(&self) -> &str {
        self.stdout.split_once("\r\n\r\n").map_or(self.stdout.as_str(), |(_, b)| b)
    }
}

impl std::fmt::Debug for CurlOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "curl exit {}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// curl inside the client namespace (off the async runtime: the origins run on it).
async fn curl(client: &Netns, args: &[&str]) -> CurlOut {
    let mut all: Vec<String> = ["netns", "exec", &client.name, "curl", "-sS", "--noproxy", "*", "--max-time", "10"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    all.extend(args.iter().map(|s| s.to_string()));
    let out = tokio::task::spawn_blocking(move || Command::new("ip").args(&all).stdin(Stdio::null()).output())
        .await
        .unwrap()
        .expect("run curl");
    CurlOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A TLS handshake from the client namespace to `dst` with `server_name` as SNI (an IP
/// address: no SNI at all). `Err` carries the I/O error kind the client saw.
async fn tls_from(client: &Netns, dst: SocketAddr, server_name: &str) -> Result<(), std::io::ErrorKind> {
    let tcp = client.connect(dst).await;
    match tokio::time::timeout(Duration::from_secs(5), tls_connect(tcp, server_name)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.kind()),
        Err(_) => Err(std::io::ErrorKind::TimedOut),
    }
}

/// The audit line of the next matching decision at or after line `from`.
async fn audit_from(e: &Egressd, from: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    match e.wait_for_log_from(from, |v| is_decision(v) && pred(v), Duration::from_secs(5)).await {
        Some((_, v)) => v,
        None => panic!("no audit line {what} within 5 s; egressd output:\n{}", e.dump()),
    }
}

// ---------------------------------------------------------------------------------------------
// The namespace scenario
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Setup {
    firewall: Firewall,
    tproxy: bool,
    /// Listen on `[::]` (dual stack) rather than `0.0.0.0`.
    dual_stack: bool,
}

async fn transparent_scenario(tag: &str, setup: Setup) {
    if let Some(why) = skip_reason(setup.firewall.tools()) {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = match Lab::build(tag) {
        Ok(lab) => lab,
        Err(why) => {
            eprintln!("skipped: `ip netns` is unavailable here: {why}");
            return;
        }
    };
    if setup.tproxy {
        if let Some(why) = tproxy_unsupported(&lab.router) {
            eprintln!("skipped: this kernel cannot TPROXY ({why}); REDIRECT is tested separately");
            return;
        }
    }
    let Lab { client, router, origin } = &lab;

    // Origins: the same servers on the right and on the wrong address.
    let at = |ip: &str, port: u16| SocketAddr::new(ip.parse().unwrap(), port);
    let right_tls = TlsOrigin::start_on(origin.listen(at(RIGHT, 443)), TlsMode::Http);
    let wrong_tls = TlsOrigin::start_on(origin.listen(at(WRONG, 443)), TlsMode::Http);
    let right_http = HttpOrigin::start_on(origin.listen(at(RIGHT, 80)));
    let wrong_http = HttpOrigin::start_on(origin.listen(at(WRONG, 80)));

    let wildcard = if setup.dual_stack { "[::]" } else { "0.0.0.0" };
    let proxy_extra =
        format!("transparent_tls = [\"{wildcard}:{TLS_LISTEN}\"]\ntransparent_http = [\"{wildcard}:{HTTP_LISTEN}\"]\n");
    let e = Egressd::start_opts(Opts {
        rules: "[[rule]]\nname = \"web\"\nhosts = [\"tls.allowed.test\", \"allowed.test\", \"meta.allowed.test\"]\n\
                ports = [80, 443]\n\n\
                [[rule]]\nname = \"blocked\"\naction = \"deny\"\nhosts = [\"blocked.test\"]\n",
        proxy_extra: &proxy_extra,
        no_default_hosts: true,
        hosts: &[
            (TLS_NAME, RIGHT),
            (HTTP_NAME, RIGHT),
            ("denied.test", RIGHT),
            ("blocked.test", RIGHT),
            ("meta.allowed.test", "169.254.169.254"),
        ],
        guard_allow_cidrs: &["10.231.0.0/16"],
        netns: Some(&router.name),
        ..Default::default()
    })
    .await;
    let start = e.lines().into_iter().find(|v| v["event"] == "start").unwrap();
    assert_eq!(
        s(&start, "transparent_listen"),
        format!("{wildcard}:{TLS_LISTEN},{wildcard}:{HTTP_LISTEN}"),
        "start line: {start}"
    );

    // The redirection, installed twice: one set of rules.
    let fw = setup.firewall;
    let tls_port = TLS_LISTEN.to_string();
    let http_port = HTTP_LISTEN.to_string();
    let mut args = vec!["setup", "--tls-port", &tls_port, "--http-port", &http_port];
    // iptables selects the client interface, nftables the client subnet.
    match fw {
        Firewall::Iptables => args.extend(["--iface", "rc"]),
        Firewall::Nftables => args.extend(["--source", "10.231.1.0/30"]),
    }
    if setup.tproxy {
        args.extend(["--mode", "tproxy"]);
    }
    let (code, out) = fw.run(router, &args);
    assert_eq!(code, 0, "{args:?}:\n{out}");
    let once = fw.dump(router);
    let (code, out) = fw.run(router, &args);
    assert_eq!(code, 0, "{args:?} again:\n{out}");
    let twice = fw.dump(router);
    assert_eq!(once, twice, "running setup twice changed the rules");
    match fw {
        Firewall::Iptables => assert_eq!(twice.matches("-j EGRESSD_TRANSPARENT").count(), 1, "{twice}"),
        Firewall::Nftables => assert_eq!(twice.matches("table inet egressd").count(), 1, "{twice}"),
    }
    let (code, out) = fw.run(router, &["status"]);
    assert_eq!(code, 0, "status after setup:\n{out}");

    let ca = e.dir().join("ca.pem");
    std::fs::write(&ca, test_cert_pem()).unwrap();
    let ca = ca.to_str().unwrap().to_string();
    let resolve = |name: &str, port: u16, ip: &str| format!("{name}:{port}:{ip}");

    // 1. Allowed SNI to the right address: a real TLS handshake, relayed to the origin.
    let from = e.line_count();
    let r = curl(client, &["--cacert", &ca, "--resolve", &resolve(TLS_NAME, 443, RIGHT), "https://tls.allowed.test/"])
        .await;
    assert_eq!(r.code, 0, "allowed SNI to the right address: {r:?}\negressd:\n{}", e.dump());
    assert_eq!(r.stdout, TLS_BODY, "{r:?}");
    let v = audit_from(&e, from, "allow for the right address", |v| transparent(v) && has(v, "host", TLS_NAME)).await;
    assert_eq!(s(&v, "action"), "allow", "{v}");
    assert_eq!(s(&v, "reason"), "rule", "{v}");
    assert_eq!(s(&v, "rule"), "web", "{v}");
    assert_eq!(n(&v, "port"), Some(443), "{v}");
    assert_eq!(s(&v, "client"), CLIENT_IP, "{v}");
    assert_eq!(s(&v, "upstream_ip"), RIGHT, "{v}");
    assert!(n(&v, "bytes_up").unwrap_or(0) > 0 && n(&v, "bytes_down").unwrap_or(0) > 0, "{v}");
    assert_eq!(right_tls.counters.handshakes.load(Ordering::SeqCst), 1);
    assert_eq!(right_tls.counters.answered.load(Ordering::SeqCst), 1);

    // 2. Allowed SNI to an address the name does not resolve to: dst_mismatch, never dialled.
    let from = e.line_count();
    let r = curl(client, &["--cacert", &ca, "--resolve", &resolve(TLS_NAME, 443, WRONG), "https://tls.allowed.test/"])
        .await;
    assert_ne!(r.code, 0, "allowed SNI to the wrong address must fail: {r:?}");
    let v = audit_from(&e, from, "dst_mismatch", |v| transparent(v) && has(v, "host", TLS_NAME)).await;
    assert_eq!(
        (s(&v, "action"), s(&v, "reason"), s(&v, "rule")),
        ("deny".into(), "dst_mismatch".into(), "web".into()),
        "{v}"
    );
    assert_eq!(wrong_tls.counters.tcp_accepted.load(Ordering::SeqCst), 0, "egressd dialled the wrong address");

    // 3. Denied SNI: reset, for a name no rule allows (default) and one a deny rule names.
    let from = e.line_count();
    let r = curl(client, &["--cacert", &ca, "--resolve", &resolve("denied.test", 443, RIGHT), "https://denied.test/"])
        .await;
    assert_ne!(r.code, 0, "denied SNI must fail: {r:?}");
    let v = audit_from(&e, from, "denied SNI", |v| transparent(v) && has(v, "host", "denied.test")).await;
    assert_eq!(
        (s(&v, "action"), s(&v, "reason"), s(&v, "rule")),
        ("deny".into(), "default".into(), "default".into()),
        "{v}"
    );
    let from = e.line_count();
    let got = tls_from(client, at(RIGHT, 443), "blocked.test").await;
    assert_eq!(got, Err(std::io::ErrorKind::ConnectionReset), "a denied SNI is answered with a TCP reset");
    let v = audit_from(&e, from, "deny rule", |v| transparent(v) && has(v, "host", "blocked.test")).await;
    assert_eq!(
        (s(&v, "action"), s(&v, "reason"), s(&v, "rule")),
        ("deny".into(), "rule".into(), "blocked".into()),
        "{v}"
    );

    // 4. No SNI (an IP-address URL): denied, reset.
    let from = e.line_count();
    let r = curl(client, &["--insecure", &format!("https://{RIGHT}/")]).await;
    assert_ne!(r.code, 0, "a ClientHello without SNI must be refused: {r:?}");
    let v = audit_from(&e, from, "missing SNI", |v| transparent(v) && has(v, "host", RIGHT)).await;
    assert_eq!((s(&v, "action"), s(&v, "reason")), ("deny".into(), "malformed".into()), "{v}");
    let got = tls_from(client, at(RIGHT, 443), RIGHT).await;
    assert_eq!(got, Err(std::io::ErrorKind::ConnectionReset), "no SNI is answered with a TCP reset");
    assert_eq!(right_tls.counters.tcp_accepted.load(Ordering::SeqCst), 1, "a denied flow reached the origin");

    // 5. An allowed name whose address the guard refuses: never dialled, reason guard.
    let from = e.line_count();
    let r = curl(
        client,
        &["--cacert", &ca, "--resolve", "meta.allowed.test:443:169.254.169.254", "https://meta.allowed.test/"],
    )
    .await;
    assert_ne!(r.code, 0, "{r:?}");
    let v = audit_from(&e, from, "guard", |v| transparent(v) && has(v, "host", "meta.allowed.test")).await;
    assert_eq!((s(&v, "action"), s(&v, "reason")), ("deny".into(), "guard".into()), "{v}");

    // 6. Plain HTTP with an allowed Host passes to the original destination.
    let from = e.line_count();
    let r = curl(client, &["-i", "--resolve", &resolve(HTTP_NAME, 80, RIGHT), "http://allowed.test/x?y=1"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.status(), 200, "{r:?}");
    assert_eq!(r.body(), ORIGIN_BODY, "{r:?}");
    let seen = right_http.recorded();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].uri, "/x?y=1");
    assert_eq!(seen[0].header("host"), Some(HTTP_NAME), "{:?}", seen[0]);
    let v = audit_from(&e, from, "http allow", |v| transparent(v) && has(v, "host", HTTP_NAME)).await;
    assert_eq!((s(&v, "action"), s(&v, "rule")), ("allow".into(), "web".into()), "{v}");
    assert_eq!((n(&v, "port"), s(&v, "upstream_ip")), (Some(80), RIGHT.to_string()), "{v}");

    // 7. Plain HTTP with a denied Host: 403 with the deny header, nothing reaches the origin.
    let from = e.line_count();
    let r = curl(client, &["-i", "--resolve", &resolve("denied.test", 80, RIGHT), "http://denied.test/"]).await;
    assert_eq!(r.status(), 403, "{r:?}");
    let deny = r.header("x-egressd-deny").unwrap_or_else(|| panic!("no X-Egressd-Deny: {r:?}"));
    assert!(deny.contains("reason=default"), "{deny}");
    let v = audit_from(&e, from, "http deny", |v| transparent(v) && has(v, "host", "denied.test")).await;
    assert_eq!((s(&v, "action"), s(&v, "reason")), ("deny".into(), "default".into()), "{v}");
    assert_eq!(right_http.recorded().len(), 1, "a denied request reached the origin");

    // 8. Plain HTTP, allowed Host, wrong address: 403 dst_mismatch, never dialled.
    let from = e.line_count();
    let r = curl(client, &["-i", "--resolve", &resolve(HTTP_NAME, 80, WRONG), "http://allowed.test/"]).await;
    assert_eq!(r.status(), 403, "{r:?}");
    let deny = r.header("x-egressd-deny").unwrap_or_else(|| panic!("no X-Egressd-Deny: {r:?}"));
    assert!(deny.contains("reason=dst_mismatch"), "{deny}");
    let v = audit_from(&e, from, "http dst_mismatch", |v| {
        transparent(v) && has(v, "reason", "dst_mismatch") && n(v, "port") == Some(80)
    })
    .await;
    assert_eq!(s(&v, "host"), HTTP_NAME, "{v}");
    assert_eq!(wrong_http.connections.load(Ordering::SeqCst), 0, "egressd dialled the wrong address");

    // Teardown: no rules left, and twice is fine. Traffic is then merely routed: it reaches
    // the origin without egressd seeing it.
    for _ in 0..2 {
        let (code, out) = fw.run(router, &["teardown"]);
        assert_eq!(code, 0, "teardown:\n{out}");
    }
    let left = fw.dump(router);
    assert!(!left.contains("EGRESSD") && !left.contains("egressd"), "rules left after teardown:\n{left}");
    let (code, out) = fw.run(router, &["status"]);
    assert_eq!(code, 3, "status after teardown:\n{out}");
    let from = e.line_count();
    let r = curl(client, &["-i", "--resolve", &resolve("denied.test", 80, RIGHT), "http://denied.test/"]).await;
    assert_eq!(r.status(), 200, "after teardown the router forwards without redirecting: {r:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(e.lines_from(from, transparent).is_empty(), "egressd saw traffic after teardown");
    drop(e);
}

#[tokio::test(flavor = "multi_thread")]
async fn transparent_redirect_iptables() {
    bounded(
        Duration::from_secs(120),
        transparent_scenario("ipt", Setup { firewall: Firewall::Iptables, tproxy: false, dual_stack: false }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn transparent_redirect_nftables_dual_stack_listener() {
    bounded(
        Duration::from_secs(120),
        transparent_scenario("nft", Setup { firewall: Firewall::Nftables, tproxy: false, dual_stack: true }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn transparent_tproxy_nftables() {
    bounded(
        Duration::from_secs(120),
        transparent_scenario("tpx", Setup { firewall: Firewall::Nftables, tproxy: true, dual_stack: false }),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Loopback: no namespaces needed
// ---------------------------------------------------------------------------------------------

/// A connection made straight to a transparent listener (not redirected) has no original
/// destination to go to: reset, audited as malformed.
#[tokio::test(flavor = "multi_thread")]
async fn direct_connection_to_transparent_listener_is_reset() {
    bounded(TEST_TIMEOUT, async {
        let e = Egressd::start_opts(Opts {
            rules: "[[rule]]\nname = \"web\"\nhosts = [\"tls.allowed.test\"]\n",
            proxy_extra: "transparent_tls = [\"127.0.0.1:0\"]\n",
            ..Default::default()
        })
        .await;
        let start = e.lines().into_iter().find(|v| v["event"] == "start").unwrap();
        let addr: SocketAddr = s(&start, "transparent_listen").parse().unwrap_or_else(|_| panic!("{start}"));
        let from = e.line_count();
        // The reset can come before the connect has even returned.
        let got = match TcpStream::connect(addr).await {
            Ok(tcp) => tls_connect(tcp, TLS_NAME).await.map(|_| ()).map_err(|e| e.kind()),
            Err(e) => Err(e.kind()),
        };
        assert_eq!(got, Err(std::io::ErrorKind::ConnectionReset));
        let v = audit_from(&e, from, "direct connection", transparent).await;
        assert_eq!((s(&v, "action"), s(&v, "reason")), ("deny".into(), "malformed".into()), "{v}");
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Per-client upload budgets
// ---------------------------------------------------------------------------------------------

const CLIENT_A: &str = "127.0.0.2";
const CLIENT_B: &str = "127.0.0.3";

/// A POST with `len` body bytes from `source` through the explicit proxy.
async fn post_from(proxy: SocketAddr, source: IpAddr, port: u16, len: usize) -> Resp {
    let mut s = dial_from(proxy, source).await;
    let head = format!(
        "POST http://allowed.test:{port}/up HTTP/1.1\r\nHost: allowed.test:{port}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(&vec![b'p'; len]).await;
    read_response(&mut s, false).await.expect("response to POST")
}

async fn get_from(proxy: SocketAddr, source: IpAddr, port: u16) -> Resp {
    let mut s = dial_from(proxy, source).await;
    let req =
        format!("GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    read_response(&mut s, false).await.expect("response to GET")
}

/// Client A pushes 200 KiB through a tunnel against a 64 KiB budget: the tunnel is closed
/// once it goes over, and A's new uploads are refused with `upload_budget`; client B, on the
/// same egressd at the same time, is unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn client_over_upload_budget_is_cut_off_other_client_is_not() {
    bounded(Duration::from_secs(30), async {
        const BUDGET: u64 = 64 * 1024;
        const PUSH: usize = 200 * 1024;
        let tls = TlsOrigin::start(TlsMode::Echo).await;
        let http = HttpOrigin::start().await;
        let (tp, hp) = (tls.port(), http.port());
        let e = Egressd::start_opts(Opts {
            rules: &format!(
                "[[rule]]\nname = \"up\"\nhosts = [\"tls.allowed.test\", \"allowed.test\"]\nports = [{tp}, {hp}]\n"
            ),
            extra: "[limits]\nclient_upload_budget = \"64KiB\"\nclient_upload_window = \"1h\"\n",
            ..Default::default()
        })
        .await;
        let (a, b): (IpAddr, IpAddr) = (CLIENT_A.parse().unwrap(), CLIENT_B.parse().unwrap());
        let target = format!("tls.allowed.test:{tp}");

        // A: 200 KiB up a tunnel to an echo origin.
        let (s0, r) = connect_from(e.proxy, a, &target).await;
        assert_eq!(r.status, 200, "{r:?}");
        let tunnel = tls_connect(s0, "tls.allowed.test").await.expect("TLS handshake");
        let (mut rd, mut wr) = tokio::io::split(tunnel);
        let writer = tokio::spawn(async move {
            let chunk = vec![b'a'; 16 * 1024];
            let mut sent = 0;
            while sent < PUSH {
                if wr.write_all(&chunk).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        });
        let (echoed, _) = tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut rd))
            .await
            .expect("the tunnel was not closed after the client went over its budget");
        let sent = writer.await.unwrap();
        eprintln!("budget: A wrote {sent} bytes, {} came back", echoed.len());
        assert!(echoed.len() < PUSH, "all {PUSH} bytes made the round trip against a 64 KiB budget");
        let v = e
            .audit("tunnel cut by the budget", |v| has(v, "reason", "upload_budget") && has(v, "kind", "connect"))
            .await;
        assert_eq!(
            (s(&v, "client"), s(&v, "action"), s(&v, "rule")),
            (CLIENT_A.into(), "deny".into(), "up".into()),
            "{v}"
        );
        let up = n(&v, "bytes_up").unwrap_or(u64::MAX);
        assert!(up <= BUDGET, "{up} bytes went up against a {BUDGET}-byte budget: {v}");
        let raw = tls.counters.raw_bytes.load(Ordering::SeqCst);
        assert!(raw <= BUDGET, "the origin received {raw} bytes from a client with a {BUDGET}-byte budget");

        // A's new uploads are refused: a tunnel, and a request with a body. A request without
        // a body still passes (the budget limits uploads, not access).
        let (_s, r) = connect_from(e.proxy, a, &target).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.deny_field("reason"), "upload_budget", "{r:?}");
        let r = post_from(e.proxy, a, hp, 1024).await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.deny_field("reason"), "upload_budget", "{r:?}");
        assert!(http.recorded().is_empty(), "a request over budget reached the origin");
        assert_eq!(get_from(e.proxy, a, hp).await.status, 200);

        // B is unaffected: a tunnel with a 32 KiB round trip, and a POST.
        let (s0, r) = connect_from(e.proxy, b, &target).await;
        assert_eq!(r.status, 200, "{r:?}");
        let mut tunnel = tls_connect(s0, "tls.allowed.test").await.expect("TLS handshake for B");
        tunnel.write_all(&vec![b'b'; 32 * 1024]).await.unwrap();
        let mut back = vec![0u8; 32 * 1024];
        tunnel.read_exact(&mut back).await.expect("B's echo");
        assert!(back.iter().all(|&x| x == b'b'));
        drop(tunnel);
        let r = post_from(e.proxy, b, hp, 1024).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(http.body_bytes(), 1024);
        let v = e
            .audit("B's tunnel", |v| {
                has(v, "client", CLIENT_B) && has(v, "kind", "connect") && has(v, "action", "allow")
            })
            .await;
        assert!(n(&v, "bytes_up").unwrap_or(0) >= 32 * 1024, "{v}");
        assert!(e.decisions().iter().all(|v| !(has(v, "client", CLIENT_B) && has(v, "reason", "upload_budget"))));

        // Metrics: uploaded bytes per rule, and the upload_budget denials.
        let m = e.admin_get("/metrics").await.expect("/metrics").text();
        let rule_bytes: u64 = m
            .lines()
            .find(|l| l.starts_with("egressd_proxy_rule_upload_bytes_total{") && l.contains("rule=\"up\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|x| x.parse::<f64>().ok())
            .map(|x| x as u64)
            .unwrap_or_else(|| panic!("no egressd_proxy_rule_upload_bytes_total{{rule=\"up\"}}:\n{m}"));
        assert!(rule_bytes >= 32 * 1024 + 1024, "rule upload bytes {rule_bytes}");
        assert!(
            m.lines().any(|l| l.starts_with("egressd_proxy_requests_total{") && l.contains("reason=\"upload_budget\"")),
            "no upload_budget denials in egressd_proxy_requests_total:\n{m}"
        );
    })
    .await
}
