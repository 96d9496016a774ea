//! Logging setup and the one canonical decision event: every allow, deny and alert is emitted
//! through [`DecisionEvent::emit`], so the audit line carries the same fields everywhere.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::policy::{Action, Reason};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Installs the global subscriber: JSON lines on stdout with the fields at the top level, or
/// human-readable text. The filter follows `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
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
    /// Writes the audit line.
    pub fn emit(&self) {
        let ts = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let duration_ms = self.duration.as_secs_f64() * 1000.0;
        // Every contract field is always present; absent values are empty strings / 0.
        let upstream_ip = self.upstream_ip.map(|ip| ip.to_string()).unwrap_or_default();
        tracing::info!(
            target: "egressd::audit",
            ts = %ts,
            id = self.id,
            kind = self.kind.as_str(),
            client = %self.client,
            host = self.host,
            port = self.port.unwrap_or(0),
            qtype = self.qtype.unwrap_or(""),
            action = self.action.as_str(),
            rule = self.rule,
            reason = self.reason.as_str(),
            upstream_ip = upstream_ip.as_str(),
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = (duration_ms * 1000.0).round() / 1000.0,
            "decision"
        );
    }
}
