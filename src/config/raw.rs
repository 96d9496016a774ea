//! Serde types mirroring the TOML files exactly as written.
//!
//! Every table denies unknown fields (a typo must never silently weaken policy) and every
//! value that still needs checking keeps its span, so validation can say `path:line:column`.
//! Defaults are not applied here: `validate.rs` applies them explicitly.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub type S<T> = Spanned<T>;

/// A size as written: an integer byte count or a string such as `"10MiB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(i64),
    Text(String),
}

/// `guard.deny_cidrs`: the keyword `"special-purpose"` or a list of CIDRs (which may include
/// the keyword to extend the default table).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawCidrList {
    One(String),
    Many(Vec<S<String>>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub proxy: Option<RawProxy>,
    pub dns: Option<RawDns>,
    pub admin: Option<RawAdmin>,
    pub guard: Option<RawGuard>,
    pub policy: Option<S<RawPolicy>>,
    pub hosts: Option<BTreeMap<String, S<Vec<S<String>>>>>,
    pub limits: Option<RawLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub listen: Option<Vec<S<String>>>,
    pub transparent_http: Option<Vec<S<String>>>,
    pub transparent_tls: Option<Vec<S<String>>>,
    pub connect_timeout: Option<S<String>>,
    pub header_timeout: Option<S<String>>,
    pub idle_timeout: Option<S<String>>,
    pub max_connections: Option<S<i64>>,
    pub max_header_bytes: Option<S<RawSize>>,
    pub tunnel_non_tls: Option<bool>,
    pub require_sni_match: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub listen: Option<Vec<S<String>>>,
    pub upstreams: Option<S<Vec<S<String>>>>,
    pub blocked_response: Option<S<String>>,
    pub sinkhole_ipv4: Option<S<String>>,
    pub sinkhole_ipv6: Option<S<String>>,
    pub allowed_qtypes: Option<Vec<S<String>>>,
    pub cache_entries: Option<S<i64>>,
    pub max_ttl: Option<S<String>>,
    pub upstream_timeout: Option<S<String>>,
    pub inspect_cnames: Option<bool>,
    pub tunneling: Option<RawTunneling>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTunneling {
    pub action: Option<S<String>>,
    pub max_name_length: Option<S<i64>>,
    pub max_label_entropy: Option<S<f64>>,
    pub max_unique_subdomains: Option<S<i64>>,
    pub info_budget: Option<S<RawSize>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<S<String>>,
    pub allow_clients: Option<Vec<S<String>>>,
    pub pac_proxy: Option<S<String>>,
    pub shutdown_grace: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuard {
    pub deny_cidrs: Option<S<RawCidrList>>,
    pub allow_cidrs: Option<Vec<S<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub default: Option<S<String>>,
    pub files: Option<S<Vec<S<String>>>>,
    pub revoke_on_reload: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub client_upload_budget: Option<S<RawSize>>,
    pub client_upload_window: Option<S<String>>,
}

/// One rule file: `[[rule]]` tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuleFile {
    #[serde(default)]
    pub rule: Vec<S<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: S<String>,
    pub action: Option<S<String>>,
    pub hosts: Option<Vec<S<String>>>,
    pub hosts_files: Option<Vec<S<String>>>,
    pub cidrs: Option<Vec<S<String>>>,
    pub ports: Option<S<Vec<S<i64>>>>,
    pub clients: Option<Vec<S<String>>>,
    pub methods: Option<Vec<S<String>>>,
    pub max_request_body: Option<S<RawSize>>,
    pub max_upload_bytes: Option<S<RawSize>>,
    pub applies_to: Option<S<Vec<S<String>>>>,
}
