//! Logging setup, the Prometheus metrics registry, and the one canonical decision event: every
//! allow, deny and alert is emitted through [`DecisionEvent::emit`], which writes the audit line
//! and counts the decision from the same values, so logs and metrics can never disagree.
//!
//! Metric names and labels are the contract's (DESIGN.md, "Metrics"). Label values come from
//! closed sets (kinds, actions, reasons, directions) or rule names; host names never do.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::TunnelingAction;
use crate::policy::{Action, Reason};

pub mod sink;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// The format [`init`] chose; audit lines are formatted by [`DecisionEvent`] itself.
static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Installs the global subscriber: JSON lines on stdout with the fields at the top level, or
/// human-readable text. The filter follows `RUST_LOG` (default `info`). Lines go through
/// [`sink`]; call [`sink::flush`] before the process exits.
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(sink::SinkWriter);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// What kind of traffic a decision is about (the audit line's `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Http,
    Connect,
    Transparent,
    Dns,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Connect => "connect",
            Kind::Transparent => "transparent",
            Kind::Dns => "dns",
        }
    }
}

static ID_PREFIX: LazyLock<u32> = LazyLock::new(|| {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    h.finish() as u32
});
static ID_COUNTER: AtomicU64 = AtomicU64::new(1);

/// A request id unique within the process and unlikely to repeat across restarts and
/// instances: a random per-process prefix and a counter.
pub fn next_id() -> String {
    let n = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}{:08x}", *ID_PREFIX, n)
}

/// The audit record of one decision. Field names are the contract's.
#[derive(Clone, Debug)]
pub struct DecisionEvent<'a> {
    pub id: &'a str,
    pub kind: Kind,
    pub client: IpAddr,
    pub host: &'a str,
    pub port: Option<u16>,
    pub qtype: Option<&'a str>,
    pub action: Action,
    pub rule: &'a str,
    pub reason: Reason,
    pub upstream_ip: Option<IpAddr>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration: Duration,
}

impl DecisionEvent<'_> {
    /// Writes the audit line and counts the decision in [`metrics()`].
    pub fn emit(&self) {
        self.log();
        self.count(metrics());
    }

    /// Counts the decision: `dns` in `egressd_dns_queries_total`, every other kind in
    /// `egressd_proxy_requests_total` with its bytes in `egressd_proxy_bytes_total`.
    pub fn count(&self, m: &Metrics) {
        let (action, reason) = (self.action.as_str(), self.reason.as_str());
        if self.kind == Kind::Dns {
            m.dns_queries.with_label_values(&[action, reason, self.rule]).inc();
            return;
        }
        m.proxy_requests.with_label_values(&[self.kind.as_str(), action, reason, self.rule]).inc();
        m.proxy_bytes_upload.inc_by(self.bytes_up);
        m.proxy_bytes_download.inc_by(self.bytes_down);
        if self.bytes_up > 0 {
            m.proxy_rule_upload_bytes.with_label_values(&[self.rule]).inc_by(self.bytes_up);
        }
    }

    /// Writes the audit line, if `RUST_LOG` lets `egressd::audit` through at INFO. It is the
    /// line `tracing`'s JSON formatter would write for the event (same keys, same order, same
    /// number formats), built here without the per-field dispatch, which cost more than the
    /// decision itself.
    fn log(&self) {
        if !tracing::enabled!(target: "egressd::audit", tracing::Level::INFO) {
            return;
        }
        thread_local! {
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            self.format(&mut line, FORMAT.get().copied().unwrap_or(LogFormat::Json), SystemTime::now());
            sink::append(&line);
            if line.capacity() > 64 * 1024 {
                *line = Vec::new();
            }
        });
    }

    /// The audit line, ending in a newline.
    pub fn format(&self, out: &mut Vec<u8>, format: LogFormat, now: SystemTime) {
        use std::io::Write;
        /// A field's value, written as `tracing` writes it.
        enum V<'a> {
            Str(&'a str),
            Int(u64),
            Float(f64),
        }
        // Short values are formatted on the stack: this runs once per decision.
        let (mut micros_buf, mut ts_buf, mut client_buf, mut upstream_buf) = ([0; 64], [0; 64], [0; 64], [0; 64]);
        // "2026-12-04T19:58:18.579236Z"; `ts` is the same instant to the millisecond.
        let micros = display_into(&mut micros_buf, humantime::format_rfc3339_micros(now));
        let ts = display_into(&mut ts_buf, format_args!("{}Z", &micros[..micros.len().saturating_sub(4)]));
        let client = display_into(&mut client_buf, self.client);
        let upstream_ip = match self.upstream_ip {
            Some(ip) => display_into(&mut upstream_buf, ip),
            None => "",
        };
        let fields = [
            ("ts", V::Str(ts)),
            ("id", V::Str(self.id)),
            ("kind", V::Str(self.kind.as_str())),
            ("client", V::Str(client)),
            ("host", V::Str(self.host)),
            ("port", V::Int(self.port.unwrap_or(0).into())),
            ("qtype", V::Str(self.qtype.unwrap_or(""))),
            ("action", V::Str(self.action.as_str())),
            ("rule", V::Str(self.rule)),
            ("reason", V::Str(self.reason.as_str())),
            ("upstream_ip", V::Str(upstream_ip)),
            ("bytes_up", V::Int(self.bytes_up)),
            ("bytes_down", V::Int(self.bytes_down)),
            ("duration_ms", V::Float((self.duration.as_secs_f64() * 1_000_000.0).round() / 1000.0)),
        ];
        // Writing into a Vec cannot fail.
        match format {
            LogFormat::Json => {
                out.extend_from_slice(b"{\"timestamp\":\"");
                out.extend_from_slice(micros.as_bytes());
                out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"decision\"");
                for (key, value) in fields {
                    out.extend_from_slice(b",\"");
                    out.extend_from_slice(key.as_bytes());
                    out.extend_from_slice(b"\":");
                    let _ = match value {
                        V::Str(s) => serde_json::to_writer(&mut *out, s),
                        V::Int(n) => serde_json::to_writer(&mut *out, &n),
                        V::Float(f) => serde_json::to_writer(&mut *out, &f),
                    };
                }
                out.extend_from_slice(b",\"target\":\"egressd::audit\"}\n");
            }
            LogFormat::Text => {
                let _ = write!(out, "{micros}  INFO egressd::audit: decision");
                for (key, value) in fields {
                    let _ = match value {
                        V::Str(s) => write!(out, " {key}={s:?}"),
                        V::Int(n) => write!(out, " {key}={n}"),
                        V::Float(f) => write!(out, " {key}={f}"),
                    };
                }
                out.push(b'\n');
            }
        }
    }
}

/// Formats `value` into `buf`, as much of it as fits (every value given here fits).
fn display_into(buf: &mut [u8; 64], value: impl std::fmt::Display) -> &str {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{value}");
    let len = cursor.position() as usize;
    // A cut could only fall inside a multi-byte character; keep the valid prefix.
    match std::str::from_utf8(&buf[..len]) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&buf[..e.valid_up_to()]).unwrap_or_default(),
    }
}

/// Upper bounds (seconds) of the latency histograms: 1 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every egressd metric, registered in one registry. Series with a closed label set are
/// created at zero up front so that `rate()` and `increase()` see them from the first scrape.
pub struct Metrics {
    registry: Registry,
    /// `egressd_proxy_requests_total{kind, action, reason, rule}`; counted by [`DecisionEvent::emit`].
    pub proxy_requests: IntCounterVec,
    /// `egressd_proxy_active_connections{kind}`; see [`Metrics::track_connection`].
    pub proxy_active_connections: IntGaugeVec,
    /// `egressd_proxy_bytes_total{direction="upload"}`.
    pub proxy_bytes_upload: IntCounter,
    /// egressd_proxy_rule_upload_bytes_total{rule} (extension): client-to-server bytes per deciding rule.
    pub proxy_rule_upload_bytes: IntCounterVec,
    /// `egressd_proxy_bytes_total{direction="download"}`.
    pub proxy_bytes_download: IntCounter,
    /// `egressd_proxy_upstream_connect_seconds`.
    pub proxy_upstream_connect_seconds: Histogram,
    /// `egressd_dns_queries_total{action, reason, rule}`; counted by [`DecisionEvent::emit`].
    pub dns_queries: IntCounterVec,
    /// `egressd_dns_cache_hits_total`.
    pub dns_cache_hits: IntCounter,
    /// `egressd_dns_cache_misses_total`.
    pub dns_cache_misses: IntCounter,
    /// `egressd_dns_upstream_seconds`.
    pub dns_upstream_seconds: Histogram,
    /// `egressd_dns_tunneling_detections_total{action="block"}`.
    pub dns_tunneling_blocked: IntCounter,
    /// `egressd_dns_tunneling_detections_total{action="alert"}`.
    pub dns_tunneling_alerted: IntCounter,
    /// `egressd_config_reloads_total{result="success"}`.
    pub config_reloads_success: IntCounter,
    /// `egressd_config_reloads_total{result="failure"}`.
    pub config_reloads_failure: IntCounter,
    /// `egressd_config_generation`.
    pub config_generation: IntGauge,
    /// `egressd_config_last_reload_success_timestamp_seconds` (the initial load counts).
    pub config_last_reload_success: Gauge,
    /// `egressd_policy_rules`.
    pub policy_rules: IntGauge,
    /// `egressd_policy_names`.
    pub policy_names: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero. The process uses [`metrics()`]; tests may
    /// build their own to count in isolation.
    pub fn new() -> Self {
        let registry = Registry::new();
        // Registration only fails on a duplicate or malformed name; the names below are fixed
        // literals, covered by the tests.
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(v.clone())).expect("unique metric");
            v
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let h = Histogram::with_opts(opts).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };

        let proxy_requests = counter_vec(
            "egressd_proxy_requests_total",
            "Proxy decisions (http, connect, transparent) by action, reason and rule.",
            &["kind", "action", "reason", "rule"],
        );
        let proxy_active_connections = IntGaugeVec::new(
            Opts::new("egressd_proxy_active_connections", "Open proxy client connections by kind."),
            &["kind"],
        )
        .expect("valid metric");
        registry.register(Box::new(proxy_active_connections.clone())).expect("unique metric");
        for kind in [Kind::Http, Kind::Connect, Kind::Transparent] {
            proxy_active_connections.with_label_values(&[kind.as_str()]).set(0);
        }
        let bytes = counter_vec(
            "egressd_proxy_bytes_total",
            "Bytes relayed by the proxy: upload is client to server, download server to client.",
            &["direction"],
        );
        let proxy_rule_upload_bytes = counter_vec(
            "egressd_proxy_rule_upload_bytes_total",
            "Client-to-server bytes by the rule that allowed the flow (exfiltration budgets).",
            &["rule"],
        );
        let dns_queries = counter_vec(
            "egressd_dns_queries_total",
            "DNS firewall decisions by action, reason and rule.",
            &["action", "reason", "rule"],
        );
        let tunneling = counter_vec(
            "egressd_dns_tunneling_detections_total",
            "DNS queries flagged by the tunneling heuristics, by the configured action.",
            &["action"],
        );
        let reloads = counter_vec("egressd_config_reloads_total", "Config reload attempts by result.", &["result"]);
        let build_info = IntGaugeVec::new(
            Opts::new("egressd_build_info", "Always 1; the label carries the egressd version."),
            &["version"],
        )
        .expect("valid metric");
        registry.register(Box::new(build_info.clone())).expect("unique metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        let last_success = Gauge::new(
            "egressd_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load (the initial one included).",
        )
        .expect("valid metric");
        registry.register(Box::new(last_success.clone())).expect("unique metric");

        Self {
            proxy_requests,
            proxy_active_connections,
            proxy_bytes_upload: bytes.with_label_values(&["upload"]),
            proxy_bytes_download: bytes.with_label_values(&["download"]),
            proxy_rule_upload_bytes,
            proxy_upstream_connect_seconds: histogram(
                "egressd_proxy_upstream_connect_seconds",
                "Time to open the TCP connection to the upstream (resolution excluded).",
            ),
            dns_queries,
            dns_cache_hits: counter("egressd_dns_cache_hits_total", "DNS answers served from the cache."),
            dns_cache_misses: counter("egressd_dns_cache_misses_total", "DNS lookups the cache could not answer."),
            dns_upstream_seconds: histogram("egressd_dns_upstream_seconds", "Time for a DNS upstream to answer."),
            dns_tunneling_blocked: tunneling.with_label_values(&["block"]),
            dns_tunneling_alerted: tunneling.with_label_values(&["alert"]),
            config_reloads_success: reloads.with_label_values(&["success"]),
            config_reloads_failure: reloads.with_label_values(&["failure"]),
            config_generation: gauge("egressd_config_generation", "Generation of the policy in force (1 at start)."),
            config_last_reload_success: last_success,
            policy_rules: gauge("egressd_policy_rules", "Rules in the policy in force."),
            policy_names: gauge("egressd_policy_names", "Distinct host names and wildcards in the policy in force."),
            registry,
        }
    }

    /// Counts an open proxy connection of `kind` until the returned guard is dropped.
    pub fn track_connection(&self, kind: Kind) -> ConnectionGuard {
        let gauge = self.proxy_active_connections.with_label_values(&[kind.as_str()]);
        gauge.inc();
        ConnectionGuard { gauge }
    }

    /// Counts a query flagged by the tunneling heuristics (`Off` counts nothing).
    pub fn count_tunneling(&self, action: TunnelingAction) {
        match action {
            TunnelingAction::Block => self.dns_tunneling_blocked.inc(),
            TunnelingAction::Alert => self.dns_tunneling_alerted.inc(),
            TunnelingAction::Off => {}
        }
    }

    /// Records a policy that just came into force.
    pub fn set_policy(&self, generation: u64, rules: usize, names: usize, loaded_at: SystemTime) {
        self.config_generation.set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.policy_rules.set(i64::try_from(rules).unwrap_or(i64::MAX));
        self.policy_names.set(i64::try_from(names).unwrap_or(i64::MAX));
        let ts = loaded_at.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.config_last_reload_success.set(ts);
    }

    /// The registry in the Prometheus text format (0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "Encoding metrics failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements `egressd_proxy_active_connections{kind}` when dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    gauge: IntGauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The process-wide metrics in the Prometheus text format, for `GET /metrics`.
pub fn encode_metrics() -> String {
    metrics().encode()
}

/// Counts a reload that was refused (the running policy stays). Success is counted by
/// [`crate::state::State::replace`].
pub fn record_reload_failure() {
    metrics().config_reloads_failure.inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line `tracing`'s JSON formatter wrote for the audit event before egressd formatted
    /// it itself: the contract's consumers parse that shape.
    fn tracing_line(e: &DecisionEvent<'_>, ts: &str) -> serde_json::Value {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(move || writer.clone())
            .finish();
        let duration_ms = e.duration.as_secs_f64() * 1000.0;
        let upstream_ip = e.upstream_ip.map(|ip| ip.to_string()).unwrap_or_default();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                target: "egressd::audit",
                ts = %ts,
                id = e.id,
                kind = e.kind.as_str(),
                client = %e.client,
                host = e.host,
                port = e.port.unwrap_or(0),
                qtype = e.qtype.unwrap_or(""),
                action = e.action.as_str(),
                rule = e.rule,
                reason = e.reason.as_str(),
                upstream_ip = upstream_ip.as_str(),
                bytes_up = e.bytes_up,
                bytes_down = e.bytes_down,
                duration_ms = (duration_ms * 1000.0).round() / 1000.0,
                "decision"
            );
        });
        let bytes = buf.0.lock().unwrap().clone();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn audit_line_is_the_line_tracing_wrote() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_000_000_123_456);
        let mut cases = vec![
            event(Kind::Dns, Action::Allow, Reason::Rule, "corp"),
            event(Kind::Connect, Action::Deny, Reason::SniMismatch, "default"),
        ];
        cases[0].qtype = Some("AAAA");
        cases[0].duration = Duration::from_nanos(341_999);
        cases[1].host = "we\"ird\\host\u{1}\n.example";
        cases[1].rule = "rule \"quoted\" ünïcode";
        cases[1].port = Some(443);
        cases[1].client = "2001:db8::1".parse().unwrap();
        cases[1].upstream_ip = Some("192.0.2.7".parse().unwrap());
        cases[1].bytes_up = u64::MAX;
        cases[1].bytes_down = 12345;
        cases[1].duration = Duration::from_secs(2890) + Duration::from_micros(374_400);
        for e in &cases {
            let mut line = Vec::new();
            e.format(&mut line, LogFormat::Json, now);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            let ours: serde_json::Value = serde_json::from_slice(&line).unwrap();
            let mut theirs = tracing_line(e, "2026-11-30T00:53:20.123Z");
            // The formatter's own timestamp is the wall clock; ours is `now`.
            theirs["timestamp"] = serde_json::Value::from("2026-11-30T00:53:20.123456Z");
            assert_eq!(ours, theirs);
            let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
            let order: Vec<String> = {
                let text = String::from_utf8(line.clone()).unwrap();
                let mut found: Vec<(usize, String)> =
                    keys(&ours).into_iter().map(|k| (text.find(&format!("\"{k}\":")).unwrap(), k)).collect();
                found.sort();
                found.into_iter().map(|(_, k)| k).collect()
            };
            assert_eq!(
                order,
                [
                    "timestamp",
                    "level",
                    "message",
                    "ts",
                    "id",
                    "kind",
                    "client",
                    "host",
                    "port",
                    "qtype",
                    "action",
                    "rule",
                    "reason",
                    "upstream_ip",
                    "bytes_up",
                    "bytes_down",
                    "duration_ms",
                    "target"
                ]
            );
        }
    }

    #[test]
    fn text_audit_line_is_one_readable_line() {
        let mut e = event(Kind::Http, Action::Deny, Reason::Default, "default");
        e.host = "evil\nhost";
        let mut line = Vec::new();
        e.format(&mut line, LogFormat::Text, SystemTime::UNIX_EPOCH);
        let text = String::from_utf8(line).unwrap();
        assert!(
            text.starts_with(
                "1970-01-01T00:00:00.000000Z  INFO egressd::audit: decision ts=\"1970-01-01T00:00:00.000Z\""
            )
        );
        assert!(text.contains(r#" host="evil\nhost" "#), "{text}");
        assert!(text.contains(" action=\"deny\" "), "{text}");
        assert_eq!(text.matches('\n').count(), 1, "{text}");
    }

    fn event(kind: Kind, action: Action, reason: Reason, rule: &str) -> DecisionEvent<'_> {
        DecisionEvent {
            id: "t",
            kind,
            client: IpAddr::from([127, 0, 0, 1]),
            host: "secret-host.example",
            port: Some(443),
            qtype: None,
            action,
            rule,
            reason,
            upstream_ip: None,
            bytes_up: 10,
            bytes_down: 20,
            duration: Duration::ZERO,
        }
    }

    #[test]
    fn closed_label_sets_start_at_zero() {
        let text = Metrics::new().encode();
        for line in [
            "egressd_proxy_bytes_total{direction=\"upload\"} 0",
            "egressd_proxy_bytes_total{direction=\"download\"} 0",
            "egressd_config_reloads_total{result=\"success\"} 0",
            "egressd_config_reloads_total{result=\"failure\"} 0",
            "egressd_dns_tunneling_detections_total{action=\"block\"} 0",
            "egressd_proxy_active_connections{kind=\"connect\"} 0",
            "egressd_dns_cache_hits_total 0",
            "egressd_config_generation 0",
            "egressd_proxy_upstream_connect_seconds_count 0",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
        assert!(text.contains(&format!("egressd_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));
    }

    #[test]
    fn decisions_are_counted_by_kind() {
        let m = Metrics::new();
        event(Kind::Http, Action::Deny, Reason::Default, "default").count(&m);
        event(Kind::Connect, Action::Allow, Reason::Rule, "org-web").count(&m);
        event(Kind::Dns, Action::Deny, Reason::Tunneling, "org-web").count(&m);
        assert_eq!(m.proxy_requests.with_label_values(&["http", "deny", "default", "default"]).get(), 1);
        assert_eq!(m.proxy_requests.with_label_values(&["connect", "allow", "rule", "org-web"]).get(), 1);
        assert_eq!(m.dns_queries.with_label_values(&["deny", "tunneling", "org-web"]).get(), 1);
        // DNS decisions carry no proxy bytes.
        assert_eq!((m.proxy_bytes_upload.get(), m.proxy_bytes_download.get()), (20, 40));
        assert!(!m.encode().contains("secret-host"), "host names never become label values");
    }

    #[test]
    fn connection_guard_and_policy_gauges() {
        let m = Metrics::new();
        let g = m.track_connection(Kind::Transparent);
        assert_eq!(m.proxy_active_connections.with_label_values(&["transparent"]).get(), 1);
        drop(g);
        assert_eq!(m.proxy_active_connections.with_label_values(&["transparent"]).get(), 0);
        m.set_policy(7, 3, 1000, SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let text = m.encode();
        assert!(text.contains("egressd_config_generation 7"));
        assert!(text.contains("egressd_policy_rules 3"));
        assert!(text.contains("egressd_policy_names 1000"));
        assert!(text.contains("egressd_config_last_reload_success_timestamp_seconds 1700000000"));
        m.count_tunneling(TunnelingAction::Alert);
        m.count_tunneling(TunnelingAction::Off);
        assert_eq!((m.dns_tunneling_blocked.get(), m.dns_tunneling_alerted.get()), (0, 1));
    }
}
