//! The admin HTTP server on `admin.listen`: `/metrics`, `/healthz`, `/readyz`, `/policy` and
//! `/proxy.pac`, GET and HEAD only.
//!
//! Only clients inside `admin.allow_clients` (read from the snapshot in force, so a reload
//! applies) are served; every other client gets `403` to every request and nothing else.
//! Nothing here reveals a secret or a rule's contents: `/policy` names the files in force with
//! their sizes and SHA-256, and counts rules and names.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue, X_CONTENT_TYPE_OPTIONS};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::policy::guard::CidrSet;
use crate::state::State;
use crate::telemetry::{Metrics, metrics};

/// Content type of the Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const PAC_CONTENT_TYPE: &str = "application/x-ns-proxy-autoconfig";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";
const JSON_CONTENT_TYPE: &str = "application/json";
/// Admin connections served at once; past this, new connections are closed at once, so a
/// flood cannot hold the accept loop (scrapers and probes reconnect).
const MAX_CONNECTIONS: usize = 256;
/// A client must send its request head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one admin connection (keep-alive included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// Whether egressd should receive traffic: set once every listener is bound and a policy is
/// loaded, and cleared for good when draining starts. Clones share the flags.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    inner: Arc<Flags>,
}

#[derive(Debug, Default)]
struct Flags {
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every listener is bound and a policy is loaded.
    pub fn set_ready(&self) {
        self.inner.ready.store(true, Ordering::SeqCst);
    }

    /// Shutdown has begun: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// What `/readyz` reports: ready and not draining.
    pub fn ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst) && !self.draining()
    }

    /// Same as [`Readiness::ready`].
    pub fn is_ready(&self) -> bool {
        self.ready()
    }

    pub fn draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }
}

/// What every admin connection shares.
pub struct Admin {
    /// The policy state, once loaded (the admin server comes up before it, answering 503).
    state: OnceLock<Arc<State>>,
    /// `admin.allow_clients` of the main config, used until the state is loaded.
    initial_allow: Vec<ipnet::IpNet>,
    readiness: Readiness,
    /// The `host:port` the PAC file names, once the proxy listeners are bound.
    pac_proxy: OnceLock<String>,
    metrics: &'static Metrics,
    limit: Arc<Semaphore>,
}

type AdminResponse = Response<Full<Bytes>>;

impl Admin {
    /// `pac_proxy` is `admin.pac_proxy` if set, else the first bound proxy listener address.
    pub fn new(state: Arc<State>, readiness: Readiness, pac_proxy: String) -> Arc<Self> {
        Self::with_metrics(state, readiness, pac_proxy, metrics())
    }

    fn with_metrics(
        state: Arc<State>,
        readiness: Readiness,
        pac_proxy: String,
        metrics: &'static Metrics,
    ) -> Arc<Self> {
        let admin = Self::starting_with(Vec::new(), readiness, metrics);
        admin.set_loaded(state, pac_proxy);
        admin
    }

    /// An admin server for a process still loading its policy: `/readyz` is 503, `/policy`
    /// and `/proxy.pac` are 503 until [`Admin::set_loaded`].
    pub fn starting(allow_clients: Vec<ipnet::IpNet>, readiness: Readiness) -> Arc<Self> {
        Self::starting_with(allow_clients, readiness, metrics())
    }

    fn starting_with(initial_allow: Vec<ipnet::IpNet>, readiness: Readiness, metrics: &'static Metrics) -> Arc<Self> {
        Arc::new(Self {
            state: OnceLock::new(),
            initial_allow,
            readiness,
            pac_proxy: OnceLock::new(),
            metrics,
            limit: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        })
    }

    /// The policy is loaded and the proxy bound: serve `/policy` and `/proxy.pac`.
    pub fn set_loaded(&self, state: Arc<State>, pac_proxy: String) {
        let _ = self.state.set(state);
        let _ = self.pac_proxy.set(pac_proxy);
    }

    /// True when `client` is inside `admin.allow_clients` of the snapshot in force.
    fn allows(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        match self.state.get() {
            Some(state) => CidrSet::new(state.snapshot().config.admin.allow_clients.iter().copied()).contains(client),
            None => CidrSet::new(self.initial_allow.iter().copied()).contains(client),
        }
    }

    /// Answers one request from an allowed client.
    fn route(&self, method: &Method, path: &str) -> AdminResponse {
        if *method != Method::GET && *method != Method::HEAD {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            resp.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        match path {
            "/metrics" => respond(StatusCode::OK, METRICS_CONTENT_TYPE, self.metrics.encode()),
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if self.readiness.ready() => text(StatusCode::OK, "ready\n"),
            "/readyz" if self.readiness.draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/policy" | "/proxy.pac" if self.state.get().is_none() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "policy not loaded yet\n")
            }
            "/policy" => respond(StatusCode::OK, JSON_CONTENT_TYPE, self.policy_json()),
            "/proxy.pac" => self.pac(),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// A summary of the policy in force: no rule contents, no secrets.
    fn policy_json(&self) -> String {
        let Some(state) = self.state.get() else { return "{}\n".to_string() };
        let snap = state.snapshot();
        let files: Vec<serde_json::Value> = snap
            .sources
            .iter()
            .map(|f| {
                serde_json::json!({
                    "path": f.path.display().to_string(),
                    "kind": f.kind.as_str(),
                    "bytes": f.bytes,
                    "sha256": f.sha256,
                })
            })
            .collect();
        let body = serde_json::json!({
            "generation": snap.generation,
            "loaded_at": humantime::format_rfc3339_millis(snap.loaded_at).to_string(),
            "default": snap.policy.default_action().as_str(),
            "rules": snap.policy.rules().len(),
            "names": snap.policy.names().len(),
            "files": files,
        });
        let mut out = body.to_string();
        out.push('\n');
        out
    }

    /// A PAC file that sends everything through the proxy. It never answers `DIRECT`: with no
    /// usable proxy address it is a 500, not a PAC that lets the browser go around the proxy.
    fn pac(&self) -> AdminResponse {
        let addr = self.pac_proxy.get().map_or("", String::as_str);
        let usable = !addr.is_empty()
            && addr.len() <= 262
            && addr.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'-' | b'_' | b'[' | b']'));
        if !usable {
            tracing::warn!(pac_proxy = addr, "No usable proxy address for /proxy.pac");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "no proxy address configured for the PAC file\n");
        }
        let body = format!("function FindProxyForURL(url, host) {{ return \"PROXY {addr}\"; }}\n");
        respond(StatusCode::OK, PAC_CONTENT_TYPE, body)
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> AdminResponse {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    respond(status, TEXT_CONTENT_TYPE, body)
}

/// Serves the admin endpoints on `listener` until the task is dropped. `pac_proxy` is the
/// address `/proxy.pac` names. Accept errors are logged and retried, never fatal.
pub async fn serve(listener: TcpListener, state: Arc<State>, readiness: Readiness, pac_proxy: String) {
    serve_admin(listener, Admin::new(state, readiness, pac_proxy)).await;
}

pub async fn serve_admin(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Admin accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = admin.limit.clone().try_acquire_owned() else {
            tracing::debug!(client.addr = %peer, "Admin connection limit reached; closing");
            continue;
        };
        tokio::spawn(serve_conn(admin.clone(), stream, peer, permit));
    }
}

async fn serve_conn(admin: Arc<Admin>, stream: TcpStream, peer: SocketAddr, _permit: OwnedSemaphorePermit) {
    let allowed = admin.allows(peer.ip());
    if !allowed {
        tracing::debug!(client.addr = %peer, "Admin client outside admin.allow_clients; answering 403");
    }
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let admin = admin.clone();
        async move {
            let resp = if allowed {
                admin.route(req.method(), req.uri().path())
            } else {
                text(StatusCode::FORBIDDEN, "forbidden\n")
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).keep_alive(allowed);
    let served = builder.serve_connection(TokioIo::new(stream), svc);
    // A connection past its lifetime is simply dropped; the client reconnects.
    if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, served).await {
        tracing::debug!(client.addr = %peer, error = %e, "Admin connection error");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::policy::{Action, Reason};
    use crate::telemetry::{DecisionEvent, Kind};

    const RULES: &str = "[[rule]]\nname = \"org-web\"\nhosts = [\"example.org\", \"*.example.org\"]\n\
                         hosts_files = [\"org.txt\"]\n";
    const HOSTS_FILE: &str = "a.example.net\nb.example.net # comment\n";

    /// A loaded state from a scratch config whose `admin.allow_clients` is `allow`.
    fn state(allow: &str) -> (tempfile::TempDir, Arc<State>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let main = format!(
            "[proxy]\nlisten = [\"127.0.0.1:3128\"]\n[admin]\nallow_clients = [{allow}]\n\
             [policy]\nfiles = [\"rules/*.toml\"]\n"
        );
        std::fs::create_dir(dir.path().join("rules")).expect("mkdir");
        std::fs::write(dir.path().join("egressd.toml"), main).expect("write config");
        std::fs::write(dir.path().join("rules/test.toml"), RULES).expect("write rules");
        std::fs::write(dir.path().join("rules/org.txt"), HOSTS_FILE).expect("write hosts");
        let loaded = crate::config::load(&dir.path().join("egressd.toml")).expect("config loads");
        (dir, Arc::new(State::new(loaded)))
    }

    struct Server {
        addr: SocketAddr,
        readiness: Readiness,
        _dir: tempfile::TempDir,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Starts the admin server on 127.0.0.1:0; `metrics` None serves the process-wide ones.
    async fn start(allow: &str, metrics: Option<&'static Metrics>) -> Server {
        let (dir, state) = state(allow);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let readiness = Readiness::new();
        let pac = "127.0.0.1:3128".to_string();
        let task = match metrics {
            None => tokio::spawn(serve(listener, state, readiness.clone(), pac)),
            Some(m) => tokio::spawn(serve_admin(listener, Admin::with_metrics(state, readiness.clone(), pac, m))),
        };
        Server { addr, readiness, _dir: dir, task }
    }

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
        }
    }

    /// One HTTP/1.1 request over a fresh connection, read until the server closes it.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("reply in time")
            .expect("read");
        let raw = String::from_utf8(raw).expect("utf-8 reply");
        let (head, body) = raw.split_once("\r\n\r\n").expect("complete head");
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
        Reply { status, head: head.to_string(), body: body.to_string() }
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        request(addr, "GET", path).await
    }

    fn event(kind: Kind) -> DecisionEvent<'static> {
        DecisionEvent {
            id: "admin-test",
            kind,
            client: IpAddr::from([127, 0, 0, 1]),
            host: "never-a-label.example",
            port: Some(80),
            qtype: (kind == Kind::Dns).then_some("A"),
            action: Action::Deny,
            rule: "default",
            reason: Reason::Default,
            upstream_ip: None,
            bytes_up: 1,
            bytes_down: 2,
            duration: Duration::ZERO,
        }
    }

    /// One sample line of the text format: name, labels, value.
    fn parse_sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
        let (series, value) = line.rsplit_once(' ')?;
        let value = value.parse().ok()?;
        let Some((name, rest)) = series.split_once('{') else { return Some((series, BTreeMap::new(), value)) };
        let mut labels = BTreeMap::new();
        let mut chars = rest.strip_suffix('}')?.chars();
        loop {
            let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
            if key.is_empty() {
                return Some((name, labels, value));
            }
            if chars.next()? != '"' {
                return None;
            }
            let mut val = String::new();
            loop {
                match chars.next()? {
                    '\\' => val.push(chars.next()?),
                    '"' => break,
                    c => val.push(c),
                }
            }
            labels.insert(key.trim_start_matches(',').to_string(), val);
        }
    }

    /// The value of the series `name{labels}` (labels in any order) in a scrape; absent is 0.
    fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels.iter().map(|&(k, v)| (k.to_string(), v.to_string())).collect();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(parse_sample)
            .find(|(n, l, _)| *n == name && *l == want)
            .map_or(0.0, |(_, _, v)| v)
    }

    #[test]
    fn sample_parser() {
        let text = "# TYPE a counter\na{x=\"1\",y=\"q\\\"z\"} 3\nb 4.5\n";
        assert_eq!(sample(text, "a", &[("y", "q\"z"), ("x", "1")]), 3.0);
        assert_eq!(sample(text, "a", &[("x", "1")]), 0.0);
        assert_eq!(sample(text, "b", &[]), 4.5);
    }

    #[tokio::test]
    async fn healthz_and_readiness() {
        let srv = start("\"127.0.0.0/8\"", None).await;
        let r = get(srv.addr, "/healthz").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        assert_eq!(get(srv.addr, "/readyz").await.status, 503);
        srv.readiness.set_ready();
        assert!(srv.readiness.is_ready());
        assert_eq!(get(srv.addr, "/readyz").await.status, 200);
        srv.readiness.set_draining();
        assert!(!srv.readiness.ready() && srv.readiness.draining());
        let r = get(srv.addr, "/readyz").await;
        assert_eq!((r.status, r.body.as_str()), (503, "draining\n"));
        // Healthy while the process runs, draining or not.
        assert_eq!(get(srv.addr, "/healthz").await.status, 200);
    }

    #[tokio::test]
    async fn clients_outside_allow_clients_get_403_only() {
        let srv = start("\"10.0.0.0/8\", \"::1/128\"", None).await;
        srv.readiness.set_ready();
        for (method, path) in
            [("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/policy"), ("GET", "/nope"), ("POST", "/metrics")]
        {
            let r = request(srv.addr, method, path).await;
            assert_eq!(r.status, 403, "{method} {path}");
            assert_eq!(r.body, "forbidden\n");
        }
    }

    #[tokio::test]
    async fn methods_and_unknown_paths() {
        let srv = start("\"127.0.0.1/32\"", None).await;
        let r = request(srv.addr, "POST", "/healthz").await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
        assert_eq!(request(srv.addr, "DELETE", "/policy").await.status, 405);
        assert_eq!(get(srv.addr, "/").await.status, 404);
        assert_eq!(get(srv.addr, "/metrics/extra").await.status, 404);
        // HEAD: same status and headers, no body.
        let r = request(srv.addr, "HEAD", "/healthz").await;
        assert_eq!((r.status, r.body.as_str()), (200, ""));
        assert_eq!(r.header("content-length"), Some("3"));
        // A query string does not change the route.
        assert_eq!(get(srv.addr, "/healthz?verbose=1").await.status, 200);
    }

    #[tokio::test]
    async fn policy_summary() {
        let srv = start("\"127.0.0.0/8\"", None).await;
        let r = get(srv.addr, "/policy").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(JSON_CONTENT_TYPE));
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON body");
        assert_eq!(v["generation"], 1);
        assert_eq!(v["default"], "deny");
        assert_eq!(v["rules"], 1);
        assert!(v["names"].as_u64().is_some_and(|n| n >= 3), "example.org, *.example.org and the hosts file");
        let loaded_at = v["loaded_at"].as_str().expect("loaded_at");
        let t = humantime::parse_rfc3339(loaded_at).expect("RFC 3339");
        assert!(t <= SystemTime::now());
        let files = v["files"].as_array().expect("files");
        let kinds: Vec<&str> = files.iter().filter_map(|f| f["kind"].as_str()).collect();
        assert_eq!(kinds, ["config", "rules", "hosts"]);
        let hosts = &files[2];
        assert!(hosts["path"].as_str().is_some_and(|p| p.ends_with("org.txt")));
        assert_eq!(hosts["bytes"], HOSTS_FILE.len());
        assert_eq!(hosts["sha256"], crate::config::sha256_hex(HOSTS_FILE.as_bytes()));
        assert_eq!(files[1]["sha256"], crate::config::sha256_hex(RULES.as_bytes()));
        for f in files {
            let sha = f["sha256"].as_str().expect("sha256");
            assert!(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert_eq!(f.as_object().map(|o| o.len()), Some(4), "only path, kind, bytes, sha256");
        }
        // No rule contents.
        assert!(!r.body.contains("example.org") && !r.body.contains("org-web"));
    }

    #[test]
    fn sha256_hex_known_answer() {
        assert_eq!(
            crate::config::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn proxy_pac() {
        let srv = start("\"127.0.0.0/8\"", None).await;
        let r = get(srv.addr, "/proxy.pac").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(PAC_CONTENT_TYPE));
        assert_eq!(r.body, "function FindProxyForURL(url, host) { return \"PROXY 127.0.0.1:3128\"; }\n");
        assert!(!r.body.contains("DIRECT"));
    }

    #[tokio::test]
    async fn pac_without_a_usable_address_is_an_error_not_direct() {
        let (_dir, state) = state("\"127.0.0.0/8\"");
        for bad in ["", "x\"; return \"DIRECT"] {
            let admin = Admin::new(state.clone(), Readiness::new(), bad.to_string());
            let r = admin.route(&Method::GET, "/proxy.pac");
            assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
        let admin = Admin::new(state, Readiness::new(), "[2001:db8::1]:3128".to_string());
        assert_eq!(admin.route(&Method::GET, "/proxy.pac").status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_has_every_contract_name() {
        let srv = start("\"127.0.0.0/8\"", None).await;
        for kind in [Kind::Http, Kind::Connect, Kind::Transparent, Kind::Dns] {
            event(kind).emit();
        }
        let r = get(srv.addr, "/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(METRICS_CONTENT_TYPE));
        for (name, kind) in [
            ("egressd_proxy_requests_total", "counter"),
            ("egressd_proxy_active_connections", "gauge"),
            ("egressd_proxy_bytes_total", "counter"),
            ("egressd_proxy_upstream_connect_seconds", "histogram"),
            ("egressd_dns_queries_total", "counter"),
            ("egressd_dns_cache_hits_total", "counter"),
            ("egressd_dns_cache_misses_total", "counter"),
            ("egressd_dns_upstream_seconds", "histogram"),
            ("egressd_config_reloads_total", "counter"),
            ("egressd_config_generation", "gauge"),
            ("egressd_config_last_reload_success_timestamp_seconds", "gauge"),
            ("egressd_policy_rules", "gauge"),
            ("egressd_policy_names", "gauge"),
            ("egressd_dns_tunneling_detections_total", "counter"),
            ("egressd_build_info", "gauge"),
        ] {
            assert!(r.body.contains(&format!("\n# TYPE {name} {kind}\n")), "no {kind} {name} in\n{}", r.body);
        }
        for kind in ["http", "connect", "transparent"] {
            let labels = [("kind", kind), ("action", "deny"), ("reason", "default"), ("rule", "default")];
            assert!(sample(&r.body, "egressd_proxy_requests_total", &labels) >= 1.0, "{kind}");
        }
        let labels = [("action", "deny"), ("reason", "default"), ("rule", "default")];
        assert!(sample(&r.body, "egressd_dns_queries_total", &labels) >= 1.0);
        assert!(r.body.contains("egressd_config_reloads_total{result=\"success\"}"));
        assert!(r.body.contains("egressd_config_reloads_total{result=\"failure\"}"));
        assert!(!r.body.contains("never-a-label"), "host names never become label values");
        // HEAD /metrics: headers only.
        let h = request(srv.addr, "HEAD", "/metrics").await;
        assert_eq!((h.status, h.body.as_str()), (200, ""));
    }

    /// `egressd_proxy_requests_total{kind="http",action="deny",reason="default",rule="default"}`.
    fn http_deny_default(text: &str) -> f64 {
        let labels = [("kind", "http"), ("action", "deny"), ("reason", "default"), ("rule", "default")];
        sample(text, "egressd_proxy_requests_total", &labels)
    }

    #[tokio::test]
    async fn scraped_counter_rises_by_exactly_the_events_counted() {
        // An isolated registry: other tests in this process count into the global one.
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let srv = start("\"127.0.0.0/8\"", Some(m)).await;
        let before = get(srv.addr, "/metrics").await.body;
        const N: u64 = 7;
        for _ in 0..N {
            event(Kind::Http).count(m);
        }
        let after = get(srv.addr, "/metrics").await.body;
        assert_eq!(http_deny_default(&after) - http_deny_default(&before), N as f64);
        let bytes = |text: &str, dir: &str| sample(text, "egressd_proxy_bytes_total", &[("direction", dir)]);
        assert_eq!(bytes(&after, "upload") - bytes(&before, "upload"), N as f64);
        assert_eq!(bytes(&after, "download") - bytes(&before, "download"), 2.0 * N as f64);
    }

    #[tokio::test]
    async fn emitted_events_reach_the_served_metrics() {
        let srv = start("\"127.0.0.0/8\"", None).await;
        let before = get(srv.addr, "/metrics").await.body;
        const N: u64 = 5;
        for _ in 0..N {
            event(Kind::Http).emit();
        }
        let after = get(srv.addr, "/metrics").await.body;
        // At least N: other tests in this process may emit the same series concurrently.
        assert!(http_deny_default(&after) - http_deny_default(&before) >= N as f64);
    }
}
