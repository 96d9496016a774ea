//! Configuration: one `load()` shared by `run`, `check`, `explain` and reload.
//!
//! Loading is two-stage: `raw.rs` deserialises exactly what was written (unknown fields are
//! errors, spans kept), then `validate.rs` and `rules.rs` turn it into validated types and a
//! compiled [`Policy`], collecting *every* error with `path:line:column` rather than stopping
//! at the first.

pub mod raw;
mod rules;
pub mod units;
mod validate;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::policy::name::Name;
use crate::policy::{DefaultAction, Policy, SharedNames};

pub use validate::{forwarding_loop, parse_cidr, parse_qtype, qtype_name};

/// The default config path, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/egressd.toml";

/// One problem found in a config or rule file, printed as `path:line:column: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.path.display(), self.line, self.column, self.message)
    }
}

/// Every error found while loading; a config with any of them is refused whole.
#[derive(Clone, Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<Diagnostic>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// A file's text with its line starts, to turn byte spans into line and column.
pub(crate) struct Source {
    pub path: PathBuf,
    pub text: String,
    line_starts: Vec<usize>,
}

impl Source {
    pub fn new(path: PathBuf, text: String) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { path, text, line_starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        let column = self.text.get(start..offset).map_or(1, |s| s.chars().count() + 1);
        (line, column)
    }

    pub fn diag(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        let (line, column) = self.line_col(span.start);
        Diagnostic { path: self.path.clone(), line, column, message: message.into() }
    }
}

/// Collects diagnostics across files.
#[derive(Default)]
pub(crate) struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn at(&mut self, src: &Source, span: Range<usize>, field: &str, message: impl fmt::Display) {
        self.0.push(src.diag(span, format!("{field}: {message}")));
    }

    pub fn file(&mut self, path: &Path, message: impl fmt::Display) {
        self.0.push(Diagnostic { path: path.to_path_buf(), line: 1, column: 1, message: message.to_string() });
    }
}

/// What a file is to egressd (all of them are watched for reload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Main,
    Rules,
    Hosts,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Main => "config",
            SourceKind::Rules => "rules",
            SourceKind::Hosts => "hosts",
        }
    }
}

/// A file that went into the policy.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub kind: SourceKind,
    pub bytes: u64,
    /// SHA-256 of the bytes read, lowercase hex: which version of the file is in force.
    pub sha256: String,
}

/// Lowercase hex of a digest.
pub(crate) fn hex(digest: &[u8]) -> String {
    use std::fmt::Write as _;
    digest.iter().fold(String::with_capacity(digest.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 of `data`, lowercase hex.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(data))
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    pub listen: Vec<SocketAddr>,
    pub transparent_http: Vec<SocketAddr>,
    pub transparent_tls: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub tunnel_non_tls: bool,
    pub require_sni_match: bool,
}

/// A DNS upstream as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// The nameservers of /etc/resolv.conf.
    System,
    /// Plain DNS over UDP with TCP fallback.
    Plain(SocketAddr),
    /// DNS over TLS to `addr`, verifying the certificate for `name`.
    Tls { addr: SocketAddr, name: String },
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::System => f.write_str("system"),
            Upstream::Plain(a) => write!(f, "{a}"),
            Upstream::Tls { addr, name } => write!(f, "tls://{addr}#{name}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockedResponse {
    NxDomain,
    NoData,
    Refused,
    Sinkhole,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelingAction {
    Block,
    Alert,
    Off,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TunnelingConfig {
    pub action: TunnelingAction,
    pub max_name_length: usize,
    pub max_label_entropy: f64,
    pub max_unique_subdomains: usize,
    pub info_budget: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DnsConfig {
    pub listen: Vec<SocketAddr>,
    pub upstreams: Vec<Upstream>,
    pub blocked_response: BlockedResponse,
    pub sinkhole_ipv4: Ipv4Addr,
    pub sinkhole_ipv6: Ipv6Addr,
    /// Allowed query types as RR type codes.
    pub allowed_qtypes: Vec<u16>,
    pub cache_entries: usize,
    pub max_ttl: Duration,
    pub upstream_timeout: Duration,
    pub inspect_cnames: bool,
    pub tunneling: TunnelingConfig,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    pub allow_clients: Vec<IpNet>,
    /// The proxy address the PAC file names; default: the first `proxy.listen` address.
    pub pac_proxy: Option<String>,
    pub shutdown_grace: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GuardConfig {
    /// True when the deny list includes the special-purpose table.
    pub special_purpose: bool,
    /// Extra deny ranges beyond the table (or the whole list when `special_purpose` is false).
    pub deny: Vec<IpNet>,
    pub allow: Vec<IpNet>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PolicySettings {
    pub default: DefaultAction,
    pub files: Vec<String>,
    pub revoke_on_reload: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LimitsConfig {
    pub client_upload_budget: Option<u64>,
    pub client_upload_window: Duration,
}

/// The validated main config.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub proxy: ProxyConfig,
    pub dns: DnsConfig,
    pub admin: AdminConfig,
    pub guard: GuardConfig,
    pub policy: PolicySettings,
    /// Static name → addresses, in file order.
    pub hosts: Vec<(Name, Vec<IpAddr>)>,
    pub limits: LimitsConfig,
}

/// Everything `load()` produced: the config, the compiled policy and what went into it.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub policy: Policy,
    pub sources: Vec<SourceFile>,
    pub shared_names: SharedNames,
    /// Problems that do not stop loading (for example a rule file with no rules).
    pub notes: Vec<Diagnostic>,
}

/// Loads and validates the main config at `path`, every rule file and every hosts file, and
/// compiles the policy. Any error refuses the whole config.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let mut diags = Diagnostics::default();
    let (src, config) = read_main(path, &mut diags)?;
    let mut sources = vec![SourceFile {
        path: path.to_path_buf(),
        kind: SourceKind::Main,
        bytes: src.text.len() as u64,
        sha256: sha256_hex(src.text.as_bytes()),
    }];
    let Some(config) = config else {
        return Err(ConfigError(diags.0));
    };
    let built = rules::load_rules(&config, &mut diags);
    if !diags.0.is_empty() {
        return Err(ConfigError(diags.0));
    }
    let built = built.ok_or_else(|| ConfigError(Vec::new()))?;
    sources.extend(built.sources);
    Ok(Loaded { config, policy: built.policy, sources, shared_names: built.shared, notes: built.notes })
}

/// Reads and validates the main config file alone (no rule files): `run` uses it to bring up
/// the admin listener — answering `/readyz` with 503 — before the policy is compiled.
pub fn load_main(path: &Path) -> Result<Config, ConfigError> {
    let mut diags = Diagnostics::default();
    match read_main(path, &mut diags)? {
        (_, Some(config)) if diags.0.is_empty() => Ok(config),
        _ => Err(ConfigError(diags.0)),
    }
}

fn read_main(path: &Path, diags: &mut Diagnostics) -> Result<(Source, Option<Config>), ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            diags.file(path, format!("cannot read config: {e}"));
            return Err(ConfigError(std::mem::take(&mut diags.0)));
        }
    };
    let src = Source::new(path.to_path_buf(), text);
    let raw: raw::RawConfig = match toml::from_str(&src.text) {
        Ok(r) => r,
        Err(e) => {
            diags.0.push(toml_diag(&src, &e));
            return Err(ConfigError(std::mem::take(&mut diags.0)));
        }
    };
    let config = validate::config(&src, raw, diags);
    Ok((src, config))
}

/// A TOML syntax or shape error as a diagnostic, naming the key where the parser knows it.
pub(crate) fn toml_diag(src: &Source, e: &toml::de::Error) -> Diagnostic {
    let span = e.span().unwrap_or(0..0);
    let message = e.message().trim().replace('\n', " ");
    let key = src.text.get(span.clone()).filter(|k| !k.is_empty() && k.len() < 80 && !k.contains('\n'));
    let message = match key {
        Some(k) if !message.contains(k) => format!("{message} (at `{k}`)"),
        _ => message,
    };
    src.diag(span, message)
}
