//! Raw main config → validated [`Config`], applying the contract's defaults explicitly and
//! collecting every error with its position.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use super::raw::{self, RawCidrList, RawSize, S};
use super::units::{parse_duration, parse_size};
use super::{
    AdminConfig, BlockedResponse, Config, Diagnostics, DnsConfig, GuardConfig, LimitsConfig, PolicySettings,
    ProxyConfig, Source, TunnelingAction, TunnelingConfig, Upstream,
};
use crate::policy::DefaultAction;
use crate::policy::name::{normalize_name, parse_ipv4_strict, parse_ipv6_strict};

/// Field-checking helpers bound to one source file.
pub(super) struct Check<'a> {
    pub src: &'a Source,
    pub diags: &'a mut Diagnostics,
}

impl Check<'_> {
    pub fn err(&mut self, span: std::ops::Range<usize>, field: &str, msg: impl std::fmt::Display) {
        self.diags.at(self.src, span, field, msg);
    }

    pub fn duration(&mut self, v: Option<S<String>>, field: &str, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.err(v.span(), field, "must be greater than zero");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(v.span(), field, e);
                default
            }
        }
    }

    pub fn size(&mut self, v: Option<S<RawSize>>, field: &str) -> Option<u64> {
        let v = v?;
        let parsed = match v.get_ref() {
            RawSize::Bytes(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
            RawSize::Text(t) => parse_size(t),
        };
        match parsed {
            Ok(n) => Some(n),
            Err(e) => {
                self.err(v.span(), field, e);
                None
            }
        }
    }

    pub fn count(&mut self, v: Option<S<i64>>, field: &str, min: i64, default: usize) -> usize {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        match usize::try_from(n) {
            Ok(u) if n >= min => u,
            _ => {
                self.err(v.span(), field, format!("{n} is out of range (at least {min})"));
                default
            }
        }
    }

    /// Listener addresses; port 0 binds an ephemeral port (tests use it).
    pub fn sockets(&mut self, v: Option<Vec<S<String>>>, field: &str, default: &[&str]) -> Vec<SocketAddr> {
        match v {
            None => default.iter().filter_map(|s| s.parse().ok()).collect(),
            Some(list) => list.into_iter().filter_map(|s| self.socket(&s, field, true)).collect(),
        }
    }

    pub fn socket(&mut self, s: &S<String>, field: &str, listener: bool) -> Option<SocketAddr> {
        match SocketAddr::from_str(s.get_ref()) {
            Ok(a) if a.port() != 0 || listener => Some(a),
            Ok(_) => {
                self.err(s.span(), field, "port 0 is not allowed");
                None
            }
            Err(_) => {
                self.err(s.span(), field, format!("`{}` is not an address:port (use [v6]:port for IPv6)", s.get_ref()));
                None
            }
        }
    }

    pub fn cidrs(&mut self, v: Option<Vec<S<String>>>, field: &str) -> Vec<IpNet> {
        v.unwrap_or_default().iter().filter_map(|s| self.cidr(s, field)).collect()
    }

    pub fn cidr(&mut self, s: &S<String>, field: &str) -> Option<IpNet> {
        match parse_cidr(s.get_ref()) {
            Ok(n) => Some(n),
            Err(e) => {
                self.err(s.span(), field, e);
                None
            }
        }
    }

    pub fn choice<T: Copy>(&mut self, v: Option<S<String>>, field: &str, options: &[(&str, T)], default: T) -> T {
        let Some(v) = v else { return default };
        match options.iter().find(|(name, _)| *name == v.get_ref()) {
            Some(&(_, t)) => t,
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.err(v.span(), field, format!("`{}` is not one of {}", v.get_ref(), names.join(" | ")));
                default
            }
        }
    }
}

/// Parses a CIDR or a bare address (as a /32 or /128). The address part must be canonical and
/// the prefix must not have host bits set, so a typo cannot silently widen a range.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = parse_ipv4_strict(addr)
        .map(IpAddr::V4)
        .or_else(|| parse_ipv6_strict(addr).map(IpAddr::V6))
        .ok_or_else(|| format!("`{s}` is not a CIDR (canonical address, optional /prefix)"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => {
            l.parse::<u8>().map_err(|_| format!("`{s}`: bad prefix length"))?
        }
        Some(_) => return Err(format!("`{s}`: bad prefix length")),
    };
    let net = IpNet::new(ip, len).map_err(|_| format!("`{s}`: prefix length exceeds {max}"))?;
    if net.network() != ip {
        return Err(format!("`{s}` has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// DNS RR type names egressd knows, with their codes. `TYPEnnn` is accepted too.
const QTYPES: &[(&str, u16)] = &[
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("NULL", 10),
    ("PTR", 12),
    ("HINFO", 13),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("SRV", 33),
    ("NAPTR", 35),
    ("DS", 43),
    ("RRSIG", 46),
    ("NSEC", 47),
    ("DNSKEY", 48),
    ("NSEC3", 50),
    ("TLSA", 52),
    ("SVCB", 64),
    ("HTTPS", 65),
    ("ANY", 255),
    ("CAA", 257),
];

/// The mnemonic of an RR type code (`TYPEnnn` when unknown).
pub fn qtype_name(code: u16) -> String {
    QTYPES.iter().find(|(_, c)| *c == code).map_or_else(|| format!("TYPE{code}"), |(n, _)| (*n).to_string())
}

pub fn parse_qtype(s: &str) -> Option<u16> {
    let up = s.to_ascii_uppercase();
    if let Some(&(_, c)) = QTYPES.iter().find(|(n, _)| *n == up) {
        return Some(c);
    }
    up.strip_prefix("TYPE").and_then(|n| n.parse::<u16>().ok())
}

fn upstream(c: &mut Check<'_>, s: &S<String>) -> Option<Upstream> {
    let v = s.get_ref().as_str();
    if v == "system" {
        return Some(Upstream::System);
    }
    if let Some(rest) = v.strip_prefix("tls://") {
        let parsed = rest.split_once('#').and_then(|(a, n)| {
            let addr = SocketAddr::from_str(a).ok().filter(|a| a.port() != 0)?;
            let name = normalize_name(n).ok()?;
            Some(Upstream::Tls { addr, name: name.to_string() })
        });
        if parsed.is_none() {
            c.err(s.span(), "dns.upstreams", format!("`{v}`: expected tls://ip:port#server-name"));
        }
        return parsed;
    }
    match SocketAddr::from_str(v) {
        Ok(a) if a.port() != 0 => Some(Upstream::Plain(a)),
        _ => {
            c.err(
                s.span(),
                "dns.upstreams",
                format!("`{v}`: expected \"system\", \"ip:port\" or \"tls://ip:853#name\""),
            );
            None
        }
    }
}

fn proxy(c: &mut Check<'_>, p: raw::RawProxy) -> ProxyConfig {
    let max_header_bytes = c.size(p.max_header_bytes, "proxy.max_header_bytes").unwrap_or(32768);
    ProxyConfig {
        listen: c.sockets(p.listen, "proxy.listen", &["127.0.0.1:3128"]),
        transparent_http: c.sockets(p.transparent_http, "proxy.transparent_http", &[]),
        transparent_tls: c.sockets(p.transparent_tls, "proxy.transparent_tls", &[]),
        connect_timeout: c.duration(p.connect_timeout, "proxy.connect_timeout", Duration::from_secs(5)),
        header_timeout: c.duration(p.header_timeout, "proxy.header_timeout", Duration::from_secs(10)),
        idle_timeout: c.duration(p.idle_timeout, "proxy.idle_timeout", Duration::from_secs(300)),
        max_connections: c.count(p.max_connections, "proxy.max_connections", 1, 20000),
        max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
        tunnel_non_tls: p.tunnel_non_tls.unwrap_or(false),
        require_sni_match: p.require_sni_match.unwrap_or(true),
    }
}

/// An upstream that is one of egressd's own DNS listeners (`system` naming 127.0.0.1 while
/// egressd listens on 127.0.0.1:53, say): each query would come back as a new query, until
/// every in-flight slot is taken by the loop. `check` finds it for listed addresses, `run` also
/// for the nameservers `system` reads at start-up.
pub fn forwarding_loop(
    upstreams: impl Iterator<Item = SocketAddr>,
    listeners: &[SocketAddr],
) -> Option<(SocketAddr, SocketAddr)> {
    for upstream in upstreams {
        let ip = upstream.ip().to_canonical();
        for &listener in listeners {
            let own = listener.ip().to_canonical();
            let reaches = ip == own || (own.is_unspecified() && (ip.is_loopback() || ip.is_unspecified()));
            if upstream.port() == listener.port() && reaches {
                return Some((upstream, listener));
            }
        }
    }
    None
}

fn dns(c: &mut Check<'_>, d: raw::RawDns) -> DnsConfig {
    let listen = c.sockets(d.listen, "dns.listen", &["127.0.0.1:8053"]);
    let upstreams = match d.upstreams {
        None => vec![Upstream::System],
        Some(list) => {
            if list.get_ref().is_empty() {
                c.err(list.span(), "dns.upstreams", "at least one upstream is required");
            }
            let mut out = Vec::new();
            for s in list.get_ref() {
                let Some(u) = upstream(c, s) else { continue };
                if let Upstream::Plain(addr) = u {
                    if let Some((_, own)) = forwarding_loop(std::iter::once(addr), &listen) {
                        let msg = format!("`{addr}` is egressd's own DNS listener {own}: a forwarding loop");
                        c.err(s.span(), "dns.upstreams", msg);
                    }
                }
                out.push(u);
            }
            out
        }
    };
    let blocked_response = c.choice(
        d.blocked_response,
        "dns.blocked_response",
        &[
            ("nxdomain", BlockedResponse::NxDomain),
            ("nodata", BlockedResponse::NoData),
            ("refused", BlockedResponse::Refused),
            ("sinkhole", BlockedResponse::Sinkhole),
        ],
        BlockedResponse::NxDomain,
    );
    let sinkhole_ipv4 = match d.sinkhole_ipv4 {
        None => Ipv4Addr::UNSPECIFIED,
        Some(s) => parse_ipv4_strict(s.get_ref()).unwrap_or_else(|| {
            c.err(s.span(), "dns.sinkhole_ipv4", format!("`{}` is not an IPv4 address", s.get_ref()));
            Ipv4Addr::UNSPECIFIED
        }),
    };
    let sinkhole_ipv6 = match d.sinkhole_ipv6 {
        None => Ipv6Addr::UNSPECIFIED,
        Some(s) => parse_ipv6_strict(s.get_ref()).unwrap_or_else(|| {
            c.err(s.span(), "dns.sinkhole_ipv6", format!("`{}` is not an IPv6 address", s.get_ref()));
            Ipv6Addr::UNSPECIFIED
        }),
    };
    let allowed_qtypes = match d.allowed_qtypes {
        None => vec![1, 28, 5, 65, 64],
        Some(list) => list
            .iter()
            .filter_map(|s| {
                let q = parse_qtype(s.get_ref());
                if q.is_none() {
                    c.err(s.span(), "dns.allowed_qtypes", format!("`{}` is not a DNS record type", s.get_ref()));
                }
                q
            })
            .collect(),
    };
    let t = d.tunneling.unwrap_or_default();
    let tunneling = TunnelingConfig {
        action: c.choice(
            t.action,
            "dns.tunneling.action",
            &[("block", TunnelingAction::Block), ("alert", TunnelingAction::Alert), ("off", TunnelingAction::Off)],
            TunnelingAction::Block,
        ),
        max_name_length: c.count(t.max_name_length, "dns.tunneling.max_name_length", 1, 120),
        max_label_entropy: match t.max_label_entropy {
            None => 0.9,
            Some(v) if (0.0..=1.0).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                c.err(v.span(), "dns.tunneling.max_label_entropy", "must be between 0.0 and 1.0 (normalised entropy)");
                0.9
            }
        },
        max_unique_subdomains: c.count(t.max_unique_subdomains, "dns.tunneling.max_unique_subdomains", 1, 300),
        info_budget: c.size(t.info_budget, "dns.tunneling.info_budget").unwrap_or(4096),
    };
    DnsConfig {
        listen,
        upstreams,
        blocked_response,
        sinkhole_ipv4,
        sinkhole_ipv6,
        allowed_qtypes,
        cache_entries: c.count(d.cache_entries, "dns.cache_entries", 0, 100_000),
        max_ttl: c.duration(d.max_ttl, "dns.max_ttl", Duration::from_secs(3600)),
        upstream_timeout: c.duration(d.upstream_timeout, "dns.upstream_timeout", Duration::from_secs(3)),
        inspect_cnames: d.inspect_cnames.unwrap_or(true),
        tunneling,
    }
}

fn admin(c: &mut Check<'_>, a: raw::RawAdmin) -> AdminConfig {
    let listen = match a.listen {
        None => "127.0.0.1:9180".parse().ok(),
        Some(s) if s.get_ref().is_empty() => None,
        Some(s) => c.socket(&s, "admin.listen", true),
    };
    let allow_clients = match a.allow_clients {
        None => vec!["127.0.0.0/8".parse().expect("literal"), "::1/128".parse().expect("literal")],
        Some(list) => c.cidrs(Some(list), "admin.allow_clients"),
    };
    AdminConfig {
        listen,
        allow_clients,
        pac_proxy: a.pac_proxy.map(|s| s.into_inner()),
        shutdown_grace: c.duration(a.shutdown_grace, "admin.shutdown_grace", Duration::from_secs(30)),
    }
}

fn guard(c: &mut Check<'_>, g: raw::RawGuard) -> GuardConfig {
    let (special_purpose, deny) = match g.deny_cidrs {
        None => (true, Vec::new()),
        Some(v) => {
            let span = v.span();
            match v.into_inner() {
                RawCidrList::One(s) if s == "special-purpose" => (true, Vec::new()),
                RawCidrList::One(s) => {
                    c.err(span, "guard.deny_cidrs", format!("`{s}`: expected \"special-purpose\" or a list of CIDRs"));
                    (true, Vec::new())
                }
                RawCidrList::Many(list) => {
                    let special = list.iter().any(|s| s.get_ref() == "special-purpose");
                    let nets = list
                        .iter()
                        .filter(|s| s.get_ref() != "special-purpose")
                        .filter_map(|s| c.cidr(s, "guard.deny_cidrs"))
                        .collect();
                    (special, nets)
                }
            }
        }
    };
    GuardConfig { special_purpose, deny, allow: c.cidrs(g.allow_cidrs, "guard.allow_cidrs") }
}

fn policy(c: &mut Check<'_>, p: Option<S<raw::RawPolicy>>) -> Option<PolicySettings> {
    let Some(p) = p else {
        c.err(0..0, "policy.files", "missing [policy] table: name the rule files with files = [\"allowlists/*.toml\"]");
        return None;
    };
    let span = p.span();
    let p = p.into_inner();
    let default = c.choice(
        p.default,
        "policy.default",
        &[("deny", DefaultAction::Deny), ("allow", DefaultAction::Allow), ("alert", DefaultAction::Alert)],
        DefaultAction::Deny,
    );
    let files = match p.files {
        None => {
            c.err(span, "policy.files", "no rule files named: set files = [\"allowlists/*.toml\"]");
            Vec::new()
        }
        Some(f) => {
            if f.get_ref().is_empty() {
                c.err(f.span(), "policy.files", "no rule files named: an empty list would be an empty policy");
            }
            f.into_inner().into_iter().map(S::into_inner).collect()
        }
    };
    Some(PolicySettings { default, files, revoke_on_reload: p.revoke_on_reload.unwrap_or(true) })
}

fn limits(c: &mut Check<'_>, l: raw::RawLimits) -> LimitsConfig {
    LimitsConfig {
        client_upload_budget: c.size(l.client_upload_budget, "limits.client_upload_budget"),
        client_upload_window: c.duration(
            l.client_upload_window,
            "limits.client_upload_window",
            Duration::from_secs(3600),
        ),
    }
}

/// Validates the main config; `None` when something essential is missing (errors recorded).
pub(super) fn config(src: &Source, raw: raw::RawConfig, diags: &mut Diagnostics) -> Option<Config> {
    let mut c = Check { src, diags };
    let proxy = proxy(&mut c, raw.proxy.unwrap_or_default());
    let dns = dns(&mut c, raw.dns.unwrap_or_default());
    let admin = admin(&mut c, raw.admin.unwrap_or_default());
    let guard = guard(&mut c, raw.guard.unwrap_or_default());
    let policy = policy(&mut c, raw.policy);
    let limits = limits(&mut c, raw.limits.unwrap_or_default());
    let mut hosts = Vec::new();
    for (name, addrs) in raw.hosts.unwrap_or_default() {
        let span = addrs.span();
        let name = match normalize_name(&name) {
            Ok(n) => n,
            Err(e) => {
                c.err(span, &format!("hosts.\"{name}\""), e);
                continue;
            }
        };
        let field = format!("hosts.\"{name}\"");
        let list: Vec<IpAddr> = addrs
            .into_inner()
            .iter()
            .filter_map(|a| {
                let ip = parse_ipv4_strict(a.get_ref())
                    .map(IpAddr::V4)
                    .or_else(|| parse_ipv6_strict(a.get_ref()).map(IpAddr::V6));
                if ip.is_none() {
                    c.err(a.span(), &field, format!("`{}` is not a canonical IP address", a.get_ref()));
                }
                ip
            })
            .collect();
        if list.is_empty() {
            c.err(span, &field, "needs at least one address");
        }
        hosts.push((name, list));
    }
    let policy = policy?;
    Some(Config { path: src.path.clone(), proxy, dns, admin, guard, policy, hosts, limits })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_that_is_our_own_listener_is_a_loop() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let found = |ups: &[&str], listeners: &[&str]| {
            let listeners: Vec<SocketAddr> = listeners.iter().map(|s| a(s)).collect();
            forwarding_loop(ups.iter().map(|s| a(s)), &listeners).is_some()
        };
        assert!(found(&["127.0.0.1:53"], &["127.0.0.1:53"]));
        assert!(found(&["10.0.0.2:53", "127.0.0.1:53"], &["0.0.0.0:53"]), "a wildcard listener answers loopback");
        assert!(found(&["[::ffff:127.0.0.1]:8053"], &["127.0.0.1:8053"]), "mapped spelling");
        assert!(found(&["[::1]:53"], &["[::]:53"]));
        assert!(!found(&["127.0.0.1:5353"], &["127.0.0.1:53"]), "another port");
        assert!(!found(&["127.0.0.53:53"], &["127.0.0.1:53"]), "another loopback address (systemd-resolved)");
        assert!(!found(&["10.0.0.2:53"], &["127.0.0.1:53"]));
    }

    #[test]
    fn cidrs_are_strict() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("10.0.64.1").unwrap().to_string(), "10.0.64.1/32");
        assert_eq!(parse_cidr("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert!(parse_cidr("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.0/").is_err());
        assert!(parse_cidr("10.0.0.0/+8").is_err());
        assert!(parse_cidr("010.0.0.0/8").is_err());
        assert!(parse_cidr("10.0/8").is_err());
        assert!(parse_cidr("not-an-ip").is_err());
    }

    #[test]
    fn qtypes() {
        assert_eq!(parse_qtype("https"), Some(65));
        assert_eq!(parse_qtype("TYPE65"), Some(65));
        assert_eq!(parse_qtype("bogus"), None);
        assert_eq!(qtype_name(16), "TXT");
        assert_eq!(qtype_name(999), "TYPE999");
    }
}
