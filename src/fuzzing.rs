//! Property checks shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) and by
//! `tests/fuzz_corpora.rs`, which replays every corpus file and every saved crash input on
//! stable Rust so a fixed bug never returns.
//!
//! Each function takes arbitrary bytes and must return normally: a panic is either a crash in
//! egressd or a failed property (an `assert!` here), and both are findings. Nothing here is
//! used by the appliance itself.

use std::cmp::Reverse;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::policy::guard::{CidrSet, Guard};
use crate::policy::matcher::Kind;
use crate::policy::name::{
    Host, Name, Pattern, normalize_host, normalize_name, parse_authority, parse_ipv4_strict, parse_ipv6_strict,
    parse_pattern, wire_label_ok,
};
use crate::policy::{
    Action, Decision, DefaultAction, Facts, Origin, Policy, PolicyBuilder, Reason, Rule, RuleId, Surface,
};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// Independent re-statement of a normalised name's syntax: labels of `[a-z0-9_-]`, 1–63 octets,
/// at most 253 in all, and a last label that WHATWG URL parsers would not read as a number.
fn name_syntax_ok(s: &str) -> bool {
    let last = s.rsplit('.').next().unwrap_or("");
    let hex = last.strip_prefix("0x").is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    let ldh = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| (1..=63).contains(&l.len()) && l.bytes().all(ldh))
        && !last.bytes().all(|b| b.is_ascii_digit())
        && !hex
}

/// RFC 5952 pure-hex text of an IPv6 address, written independently of `policy::name`.
fn rfc5952(addr: &Ipv6Addr) -> String {
    let seg = addr.segments();
    // Longest run of two or more zero groups; the leftmost on a tie.
    let (mut best_at, mut best_len) = (usize::MAX, 1);
    for start in 0..8 {
        let len = seg[start..].iter().take_while(|&&g| g == 0).count();
        if len > best_len {
            (best_at, best_len) = (start, len);
        }
    }
    let hex = |gs: &[u16]| gs.iter().map(|g| format!("{g:x}")).collect::<Vec<_>>().join(":");
    if best_at == usize::MAX {
        return hex(&seg);
    }
    format!("{}::{}", hex(&seg[..best_at]), hex(&seg[best_at + best_len..]))
}

/// The one or two spellings of `ip` egressd accepts.
fn canonical_ip(ip: IpAddr, text: &str) -> bool {
    match ip {
        IpAddr::V4(a) => a.to_string() == text,
        IpAddr::V6(a) => a.to_string() == text || rfc5952(&a) == text,
    }
}

/// How an accepted host is written back into an authority (`[v6]`, `1.2.3.4`, `name`).
fn authority_host(host: &Host) -> String {
    match host {
        Host::Ip(IpAddr::V6(a)) => format!("[{a}]"),
        other => other.to_string(),
    }
}

/// Properties of every name `normalize_name` accepts.
fn check_name(input: &str, n: &Name) {
    let s = n.as_str();
    assert!(name_syntax_ok(s), "{input:?} normalised to invalid {s:?}");
    assert_eq!(normalize_name(s).as_ref(), Ok(n), "normalize_name not idempotent on {input:?}");
    assert_eq!(normalize_host(s), Ok(Host::Name(n.clone())), "{s:?} is a name but not a host name");
    assert!(s.parse::<IpAddr>().is_err(), "{input:?} normalised to an IP-looking name {s:?}");
}

/// Properties of every host `normalize_host` accepts.
fn check_host(input: &str, host: &Host) {
    match host {
        Host::Name(n) => check_name(input, n),
        Host::Ip(ip) => {
            let bare = input.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(input);
            assert!(canonical_ip(*ip, bare), "{input:?} accepted as non-canonical {ip}");
            assert!(!input.starts_with('[') || ip.is_ipv6(), "{input:?}: bracketed IPv4");
        }
    }
}

/// Properties of every authority `parse_authority` accepts; also checks the host part.
fn check_authority(input: &str) -> Option<(Host, Option<u16>)> {
    let parsed = parse_authority(input);
    if input.contains('@') {
        assert!(parsed.is_err(), "{input:?}: userinfo accepted");
    }
    let (host, port) = parsed.ok()?;
    assert_ne!(port, Some(0), "{input:?}: port 0 accepted");
    let again = match port {
        Some(p) => format!("{}:{p}", authority_host(&host)),
        None => authority_host(&host),
    };
    assert_eq!(parse_authority(&again), Ok((host.clone(), port)), "{input:?} does not round-trip via {again:?}");
    // Bytes of the host part, as written.
    let host_part = match port {
        Some(_) => input.rsplit_once(':').map_or(input, |(h, _)| h),
        None => input,
    };
    assert_eq!(normalize_host(host_part).as_ref(), Ok(&host), "{input:?}: host part {host_part:?} differs");
    check_host(host_part, &host);
    Some((host, port))
}

/// Splits `data` at `\n`, giving each line's first byte and the rest as text.
fn lines(data: &[u8]) -> impl Iterator<Item = (u8, String)> + '_ {
    data.split(|&b| b == b'\n')
        .filter_map(|l| l.split_first())
        .map(|(&c, rest)| (c, String::from_utf8_lossy(rest).into_owned()))
}

// ---------------------------------------------------------------------------------------------
// name_matcher: the compiled matcher and `Policy::decide` against a naive walk of every rule
// ---------------------------------------------------------------------------------------------

/// A rule as the harness declared it, with its patterns kept in a plain list.
struct RefRule {
    rule: Rule,
    patterns: Vec<Pattern>,
}

const MAX_RULES: usize = 24;
const MAX_QUERIES: usize = 24;
const MAX_PATTERNS: usize = 64;

/// How specific a pattern's match of `name` is (as the contract orders them): exact beats any
/// wildcard; among wildcards the longer matched suffix wins; `*` matches with length 0.
fn specificity(p: &Pattern, name: &Name) -> Option<(bool, usize)> {
    if !p.matches(name) {
        return None;
    }
    Some(match p {
        Pattern::Exact(_) => (true, name.as_str().len()),
        Pattern::ApexAndBelow(n) if n == name => (false, name.as_str().len()),
        Pattern::ApexAndBelow(n) | Pattern::Below(n) => (false, n.as_str().len()),
        Pattern::Any => (false, 0),
    })
}

fn kind_of(p: &Pattern) -> Kind {
    match p {
        Pattern::Exact(_) => Kind::Exact,
        Pattern::ApexAndBelow(_) => Kind::ApexAndBelow,
        Pattern::Below(_) | Pattern::Any => Kind::Below,
    }
}

/// How strongly rule `r` matches the host: `None` when it does not.
fn ref_match(r: &RefRule, host: &Host) -> Option<(bool, usize)> {
    match host {
        Host::Name(n) => r.patterns.iter().filter_map(|p| specificity(p, n)).max(),
        Host::Ip(ip) => {
            r.rule.cidrs.iter().filter(|net| net.contains(ip)).map(|net| (false, usize::from(net.prefix_len()))).max()
        }
    }
}

/// The contract's decision order, walking every rule: deny wins (the most specific deny whose
/// ports include the request's), the guard refuses IP literals, then the most specific
/// allow/alert rule (exact, then longest suffix, ties to the first declared) and its limits.
fn ref_decide(rules: &[RefRule], guard: &Guard, default: DefaultAction, f: &Facts<'_>) -> Decision {
    let eligible = |r: &Rule| {
        let surface = match f.surface {
            Surface::Proxy => r.proxy,
            Surface::Dns => r.dns,
        };
        let client = r.clients.is_empty()
            || match f.client {
                Some(ip) => r.clients.contains(ip),
                None => r.action == Action::Deny,
            };
        surface && client
    };
    let port_ok = |r: &Rule| match (&r.ports, f.port) {
        (Some(ports), Some(p)) => ports.contains(&p),
        _ => true,
    };
    let best = |deny: bool| {
        rules
            .iter()
            .enumerate()
            .filter(|(_, r)| (r.rule.action == Action::Deny) == deny && eligible(&r.rule))
            .filter(|(_, r)| !deny || port_ok(&r.rule))
            .filter_map(|(id, r)| ref_match(r, f.host).map(|m| (m, Reverse(id))))
            .max()
            .map(|(_, Reverse(id))| id as RuleId)
    };
    if let Some(id) = best(true) {
        return Decision::deny(Some(id), Reason::Rule);
    }
    let allow = best(false);
    if let Host::Ip(ip) = f.host {
        if !guard.permits(*ip) {
            return Decision::deny(allow, Reason::Guard);
        }
    }
    let Some(id) = allow else {
        let action = match default {
            DefaultAction::Deny => Action::Deny,
            DefaultAction::Allow => Action::Allow,
            DefaultAction::Alert => Action::Alert,
        };
        return Decision { action, rule: None, reason: Reason::Default };
    };
    let r = &rules[id as usize].rule;
    if !port_ok(r) {
        return Decision::deny(Some(id), Reason::Port);
    }
    if let (Some(methods), Some(m)) = (&r.methods, f.method) {
        if !methods.iter().any(|x| x.eq_ignore_ascii_case(m)) {
            return Decision::deny(Some(id), Reason::Method);
        }
    }
    if let (Some(max), Some(len)) = (r.max_request_body, f.body_len) {
        if len > max {
            return Decision::deny(Some(id), Reason::BodyLimit);
        }
    }
    Decision { action: r.action, rule: Some(id), reason: Reason::Rule }
}

/// A rule from a control byte: bits 0-1 action, bit 2 `ports = [443]`, bits 3-4 `applies_to`,
/// bit 5 `clients = ["10.0.0.0/8"]`, bit 6 `methods = ["GET"]` and a 100-byte body limit.
fn ref_rule(ctl: u8, id: usize) -> Rule {
    let action = match ctl & 3 {
        0 => Action::Allow,
        2 => Action::Alert,
        _ => Action::Deny,
    };
    let ports = match (ctl & 4 != 0, action) {
        (true, _) => Some(vec![443].into_boxed_slice()),
        (false, Action::Deny) => None,
        (false, _) => Some(vec![80, 443].into_boxed_slice()),
    };
    let (proxy, dns) = match (ctl >> 3) & 3 {
        1 => (true, false),
        2 => (false, true),
        _ => (true, true),
    };
    let ten = IpNet::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8).ok().filter(|_| ctl & 0x20 != 0);
    let get = ctl & 0x40 != 0;
    Rule {
        name: format!("r{id}").into_boxed_str(),
        action,
        ports,
        clients: CidrSet::new(ten),
        methods: get.then(|| vec![Box::<str>::from("GET")].into_boxed_slice()),
        max_request_body: get.then_some(100),
        max_upload_bytes: None,
        proxy,
        dns,
        cidrs: Vec::new(),
        origin: Origin::default(),
        patterns: 0,
    }
}

/// Request facts from a control byte: bits 0-1 port, 2-3 client, 4-5 method (and a body), 6 surface.
fn ref_facts(ctl: u8, host: &Host) -> Facts<'_> {
    let port = [None, Some(80), Some(443), Some(8080)][usize::from(ctl & 3)];
    let client =
        [None, Some([10, 1, 2, 3]), Some([192, 168, 1, 1]), Some([10, 255, 0, 1])][usize::from((ctl >> 2) & 3)];
    let (method, body_len) = [(None, None), (Some("GET"), None), (Some("POST"), Some(50)), (Some("get"), Some(500))]
        [usize::from((ctl >> 4) & 3)];
    Facts {
        host,
        port,
        client: client.map(|c| IpAddr::V4(Ipv4Addr::from(c))),
        method,
        body_len,
        surface: if ctl & 0x40 != 0 { Surface::Dns } else { Surface::Proxy },
    }
}

/// Differential: the compiled [`Policy`] (hash-table matcher) against [`ref_decide`].
///
/// Input: lines; a line whose first byte has the high bit clear declares a rule (the byte as in
/// [`ref_rule`], then patterns and `cidr:` entries separated by spaces or commas), any other
/// line is a query (the byte as in [`ref_facts`], then a host). Besides the given queries,
/// every pattern's base name, its parent and two names below it are asked too.
pub fn name_matcher(data: &[u8]) {
    let mut rules: Vec<RefRule> = Vec::new();
    let mut queries: Vec<(u8, Host)> = Vec::new();
    let mut n_patterns = 0;
    for (ctl, text) in lines(data) {
        if ctl & 0x80 == 0 {
            if rules.len() >= MAX_RULES {
                continue;
            }
            let mut rule = ref_rule(ctl, rules.len());
            let mut patterns = Vec::new();
            for token in text.split([' ', ',']).filter(|t| !t.is_empty()) {
                if let Some(cidr) = token.strip_prefix("cidr:") {
                    if let Ok(net) = crate::config::parse_cidr(cidr) {
                        rule.cidrs.push(net);
                    }
                    continue;
                }
                let parsed = parse_pattern(token);
                if let Ok(p) = &parsed {
                    assert_eq!(parse_pattern(&p.to_string()).as_ref(), Ok(p), "pattern {token:?} does not round-trip");
                    if let Pattern::Exact(n) | Pattern::Below(n) | Pattern::ApexAndBelow(n) = p {
                        check_name(token, n);
                    }
                }
                if let (Ok(p), true) = (parsed, n_patterns < MAX_PATTERNS) {
                    n_patterns += 1;
                    patterns.push(p);
                }
            }
            rules.push(RefRule { rule, patterns });
        } else if queries.len() < MAX_QUERIES {
            match normalize_host(&text) {
                Ok(host) => {
                    check_host(&text, &host);
                    queries.push((ctl, host));
                }
                Err(_) => {
                    if let Ok(n) = normalize_name(&text) {
                        check_name(&text, &n);
                    }
                }
            }
        }
    }
    // Names around every pattern, and the edges of every CIDR.
    let mut derived: Vec<Host> = Vec::new();
    for r in &rules {
        for p in &r.patterns {
            let (Pattern::Exact(n) | Pattern::Below(n) | Pattern::ApexAndBelow(n)) = p else { continue };
            let s = n.as_str();
            let around = [
                Some(s.to_string()),
                s.split_once('.').map(|(_, parent)| parent.to_string()),
                Some(format!("a.{s}")),
                Some(format!("b-.c.{s}")),
            ];
            derived.extend(around.into_iter().flatten().filter_map(|t| normalize_name(&t).ok()).map(Host::Name));
        }
        for net in &r.rule.cidrs {
            derived.extend([net.network(), net.broadcast()].map(Host::Ip));
        }
    }
    let all: Vec<(u8, &Host)> = queries
        .iter()
        .map(|(c, h)| (*c, h))
        .chain(derived.iter().enumerate().map(|(i, h)| ((i as u8).wrapping_mul(37), h)))
        .collect();

    let mut b = PolicyBuilder::new();
    for r in &rules {
        let mut rule = r.rule.clone();
        rule.patterns = 0;
        let id = b.add_rule(rule);
        for p in &r.patterns {
            b.add_pattern(id, p);
        }
    }
    static GUARD: std::sync::OnceLock<Guard> = std::sync::OnceLock::new();
    let guard = GUARD.get_or_init(|| Guard::special_purpose(Vec::new()));
    let default = [DefaultAction::Deny, DefaultAction::Allow, DefaultAction::Alert][data.len() % 3];
    let (policy, _) = b.build(guard.clone(), default);

    for (ctl, host) in all {
        if let Host::Name(n) = host {
            check_visit(&policy, &rules, n);
        }
        for flip in [0u8, 0x40] {
            let facts = ref_facts(ctl ^ flip, host);
            let got = policy.decide(&facts);
            let want = ref_decide(&rules, guard, default, &facts);
            assert_eq!(got, want, "decision differs for {host} ({facts:?})");
        }
    }
}

/// The matcher's walk lists exactly the (rule, kind) pairs whose patterns match, most specific
/// first and, within one specificity, in declaration order.
fn check_visit(policy: &Policy, rules: &[RefRule], name: &Name) {
    let mut got: Vec<(RuleId, Kind)> = Vec::new();
    let mut specs = Vec::new();
    policy.names().visit_name(name, |id, kind, spec| {
        got.push((id, kind));
        specs.push(spec);
        true
    });
    assert!(specs.windows(2).all(|w| w[0] >= w[1]), "{name}: visit not most specific first");
    let mut want: Vec<((bool, usize), RuleId, Kind)> = Vec::new();
    for (id, r) in rules.iter().enumerate() {
        for p in &r.patterns {
            if let Some(s) = specificity(p, name) {
                want.push((s, id as RuleId, kind_of(p)));
            }
        }
    }
    want.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    want.dedup();
    let want: Vec<(RuleId, Kind)> = want.into_iter().map(|(_, id, k)| (id, k)).collect();
    assert_eq!(got, want, "{name}: matcher walk differs from the naive walk");
}

// ---------------------------------------------------------------------------------------------
// ip_literal
// ---------------------------------------------------------------------------------------------

/// IP-literal parsing: strict IPv4/IPv6 agree with std and accept only canonical spellings;
/// hosts and authorities accepted round-trip and are canonical.
pub fn ip_literal(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;
    let v4 = parse_ipv4_strict(s);
    if let Some(a) = v4 {
        assert_eq!(a.to_string(), s, "parse_ipv4_strict accepted a non-canonical spelling");
    }
    // std's parser also refuses leading zeros and short forms: the two must agree exactly.
    assert_eq!(v4, s.parse::<Ipv4Addr>().ok(), "parse_ipv4_strict and std disagree on {s:?}");
    if let Some(a) = parse_ipv6_strict(s) {
        assert_eq!(s.parse::<Ipv6Addr>().ok(), Some(a), "parse_ipv6_strict and std disagree on {s:?}");
        assert!(canonical_ip(IpAddr::V6(a), s), "parse_ipv6_strict accepted non-canonical {s:?}");
        assert_eq!(parse_ipv6_strict(&a.to_string()), Some(a));
        assert_eq!(parse_ipv6_strict(&rfc5952(&a)), Some(a));
    } else if let Ok(a) = s.parse::<Ipv6Addr>() {
        assert!(!canonical_ip(IpAddr::V6(a), s), "parse_ipv6_strict refused canonical {s:?}");
    }
    match normalize_host(s) {
        Ok(host) => check_host(s, &host),
        Err(_) => {
            if let Ok(ip) = s.parse::<IpAddr>() {
                // A canonical address is always a host; only other spellings are refused.
                assert!(!canonical_ip(ip, s), "normalize_host refused canonical {s:?}");
            }
        }
    }
    if let Ok(n) = normalize_name(s) {
        check_name(s, &n);
    }
    check_authority(s);
    // The same text in brackets and with a port.
    check_authority(&format!("[{s}]:443"));
    check_authority(&format!("{s}:8080"));
}

// ---------------------------------------------------------------------------------------------
// config
// ---------------------------------------------------------------------------------------------

const MAIN_FIXED: &str =
    "[policy]\ndefault = \"deny\"\nfiles = [\"rules/*.toml\"]\n\n[hosts]\n\"intranet.example.org\" = [\"10.0.8.20\"]\n";
const RULES_FIXED: &str = "[[rule]]\nname = \"fixed\"\naction = \"allow\"\nhosts = [\"example.org\", \"*.example.org\"]\nhosts_files = [\"list.txt\"]\n\n[[rule]]\nname = \"deny\"\naction = \"deny\"\nhosts = [\".evil.test\"]\ncidrs = [\"192.0.2.0/24\"]\n";
const LIST_FIXED: &str = "# names\nexample.com\n0.0.0.0 a.example.net b.example.net\n";

/// A scratch directory for this thread, removed when the thread ends.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

thread_local! {
    static SCRATCH: ScratchDir = {
        let tid = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
        let dir = std::env::temp_dir().join(format!("egressd-fuzz-{}-{tid}", std::process::id()));
        let _ = std::fs::create_dir_all(dir.join("rules"));
        ScratchDir(dir)
    };
}

/// True when any string value in a TOML document could name a path outside the scratch
/// directory (or a device): the harness skips those, so the fuzzer never reads `/dev/zero`
/// or walks the file system. Documents that do not parse are loaded as they are.
fn escapes_dir(text: &[u8]) -> bool {
    fn walk(v: &toml::Value) -> bool {
        match v {
            toml::Value::String(s) => s.contains(['/', '\\']) || s.starts_with('~'),
            toml::Value::Array(a) => a.iter().any(walk),
            toml::Value::Table(t) => t.values().any(walk),
            _ => false,
        }
    }
    let Ok(text) = std::str::from_utf8(text) else { return false };
    match toml::from_str::<toml::Table>(text) {
        Ok(t) => t.values().any(walk),
        Err(_) => false,
    }
}

/// Config loading: the fuzzer's bytes become the rule file (first byte % 3 == 0), the main
/// config (1) or a hosts file (2) next to fixed, valid other files, then `config::load` runs.
/// It must return (never panic); errors must carry positions in the files written; a config
/// that loads must lint, summarise, explain and re-parse its own patterns.
pub fn config(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else { return };
    let mode = mode % 3;
    if mode != 2 && escapes_dir(body) {
        return;
    }
    SCRATCH.with(|dir| {
        let dir = &dir.0;
        let _ = std::fs::create_dir_all(dir.join("rules"));
        let (main, rules, list): (&[u8], &[u8], &[u8]) = match mode {
            0 => (MAIN_FIXED.as_bytes(), body, LIST_FIXED.as_bytes()),
            1 => (body, RULES_FIXED.as_bytes(), LIST_FIXED.as_bytes()),
            _ => (MAIN_FIXED.as_bytes(), RULES_FIXED.as_bytes(), body),
        };
        let main_path = dir.join("egressd.toml");
        for (path, bytes) in
            [(&main_path, main), (&dir.join("rules/r.toml"), rules), (&dir.join("rules/list.txt"), list)]
        {
            if std::fs::write(path, bytes).is_err() {
                return;
            }
        }
        check_load(&main_path, dir);
    });
}

fn check_load(main_path: &Path, dir: &Path) {
    match crate::config::load(main_path) {
        Err(e) => {
            for d in &e.0 {
                assert!(d.line >= 1 && d.column >= 1, "diagnostic without a position: {d}");
                assert!(d.path.starts_with(dir), "diagnostic about a file outside the config: {d}");
                assert!(!d.message.is_empty());
            }
            let _ = e.to_string();
        }
        Ok(loaded) => {
            let _ = crate::cli::lint::lint(&loaded);
            let _ = crate::cli::check::summarize(&loaded);
            let mut names = Vec::new();
            loaded.policy.names().for_each_pattern(|domain, rule, kind| {
                let p = crate::policy::matcher::pattern_of(domain, kind);
                assert!(p.is_ok(), "stored pattern {domain:?} ({kind:?}) of rule {rule} does not re-parse");
                if names.len() < 8 {
                    names.push(domain.to_string());
                }
            });
            for n in names.iter().map(String::as_str).chain(["example.org", "http://a.example.org/", "192.0.2.1:443"]) {
                let _ = crate::cli::explain::explain(&loaded, n, None, "GET");
            }
            for r in loaded.policy.rules() {
                assert!(r.ports.as_ref().is_none_or(|p| !p.contains(&0)), "rule {} allows port 0", r.name);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// client_hello
// ---------------------------------------------------------------------------------------------

/// The ClientHello reader: never panics; `Done` covers at most the input and is decided by the
/// bytes it covers alone; feeding the same bytes split (at the point the first two bytes of the
/// input choose) or in chunks never gives another answer than feeding them whole.
pub fn client_hello(data: &[u8]) {
    use crate::proxy::sni::{HelloError, MAX_HELLO_BYTES, Parse, parse};
    let (sel, stream) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), rest),
        _ => (0, data),
    };
    let whole = parse(stream);
    match &whole {
        Ok(Parse::Done(h)) => {
            assert!(h.record_bytes <= stream.len(), "record_bytes {} > input {}", h.record_bytes, stream.len());
            assert!(h.record_bytes >= 9, "a ClientHello needs a record and a handshake header");
            if let Some(sni) = &h.sni {
                assert!((1..=255).contains(&sni.len()), "SNI length {}", sni.len());
                assert!(sni.bytes().all(|b| (0x21..=0x7e).contains(&b)), "SNI {sni:?} not printable ASCII");
            }
            let own = parse(&stream[..h.record_bytes]);
            assert_eq!(own.as_ref(), Ok(&Parse::Done(h.clone())), "bytes past record_bytes changed the result");
        }
        Ok(Parse::Incomplete) => assert!(stream.len() < MAX_HELLO_BYTES, "Incomplete at {} bytes", stream.len()),
        Err(_) => {}
    }
    // What the tunnel acts on (`connect::read_opening`): a finished ClientHello (all of it),
    // "not TLS" (which `tunnel_non_tls` may let through), or refused (malformed or too large).
    // Which violation a refused stream is reported for may depend on how much of it has
    // arrived (each is reported as soon as the bytes prove it: the record layer is walked
    // before the body is read); whether it is refused may not.
    let class = |r: Result<Parse, HelloError>| {
        r.map_err(|e| match e {
            HelloError::NotTls => HelloError::NotTls,
            HelloError::Malformed(_) | HelloError::TooLarge => HelloError::Malformed("refused"),
        })
    };
    let whole = class(whole);
    // One split point.
    let split = sel % (stream.len() + 1);
    let first = class(parse(&stream[..split]));
    if first != Ok(Parse::Incomplete) {
        assert_eq!(first, whole, "split at {split} of {} gave another result", stream.len());
    }
    // Read-by-read, as the tunnel does: the first decided result must be the whole's.
    let chunk = (stream.len() / (1 + sel % 16)).max(1);
    let mut end = 0;
    let mut decided = Ok(Parse::Incomplete);
    while end < stream.len() {
        end = (end + chunk).min(stream.len());
        decided = class(parse(&stream[..end]));
        if decided != Ok(Parse::Incomplete) {
            break;
        }
    }
    if !stream.is_empty() {
        assert_eq!(decided, whole, "reading in {chunk}-byte chunks gave another result");
    }
}

// ---------------------------------------------------------------------------------------------
// http_head
// ---------------------------------------------------------------------------------------------

/// Headers the proxy must never forward (besides `proxy-*` and those named in `Connection`).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// What the proxy does with one request head before dialing, with its properties checked.
fn check_request_head(parts: &::http::request::Parts) {
    use ::http::{HeaderMap, HeaderValue, Method, Uri, header};

    let _ = crate::proxy::head_size(&::http::Request::from_parts(parts.clone(), ()));
    if parts.method == Method::CONNECT {
        // connect::handle: the authority, with a port, is the destination.
        if let Some(a) = parts.uri.authority() {
            check_authority(a.as_str());
        }
        return;
    }
    // A transparent listener decides on the one `Host` header, on the original port only.
    let req = ::http::Request::from_parts(parts.clone(), ());
    for orig in [SocketAddr::from(([203, 0, 113, 5], 80)), SocketAddr::from(([203, 0, 113, 5], 8443))] {
        if let Ok((host, port)) = crate::proxy::transparent_target(&req, orig) {
            assert_eq!(port, orig.port(), "transparent request sent to another port");
            assert!(parts.uri.authority().is_none());
            assert_eq!(parts.headers.get_all(::http::header::HOST).iter().count(), 1);
            let value = parts.headers.get(::http::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let Some((named, _)) = check_authority(value) else { panic!("transparent target from Host {value:?}") };
            assert_eq!(named, host, "transparent target is not the Host header's host");
        }
    }
    let Ok((host, port)) = crate::proxy::absolute_target(&parts.uri) else { return };
    let authority = parts.uri.authority().map(|a| a.as_str()).unwrap_or_default();
    assert!(!authority.contains('@'), "userinfo accepted in {authority:?}");
    assert!(parts.uri.scheme_str().is_some_and(|s| s.eq_ignore_ascii_case("http")));
    assert_eq!(normalize_host(&authority_host(&host)).as_ref(), Ok(&host));
    // The Host header sent upstream names exactly the destination decided on.
    let host_value = crate::proxy::host_header(&host, port);
    assert!(HeaderValue::from_str(&host_value).is_ok(), "Host header {host_value:?} not a header value");
    let want_port = (port != 80).then_some(port);
    assert_eq!(parse_authority(&host_value), Ok((host.clone(), want_port)), "Host {host_value:?} names another target");
    // The request line sent upstream is origin-form: no second authority to route by.
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if let Ok(u) = Uri::try_from(if path.is_empty() { "/" } else { path }) {
        assert!(u.authority().is_none() && u.scheme().is_none(), "origin-form {path:?} parsed with an authority");
    }
    // Hop-by-hop stripping, both ways.
    for keep_upgrade in [false, true] {
        let mut headers: HeaderMap = parts.headers.clone();
        let named: Vec<String> = parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect();
        let upgrade = crate::proxy::strip_hop_by_hop(&mut headers, keep_upgrade);
        let wanted = named.iter().any(|t| t == "upgrade");
        assert_eq!(upgrade.is_some(), wanted && parts.headers.contains_key(header::UPGRADE));
        for (k, v) in &headers {
            let k = k.as_str();
            assert!(!k.starts_with("proxy-"), "{k} forwarded");
            let kept_upgrade = keep_upgrade && upgrade.is_some() && (k == "upgrade" || k == "connection");
            if kept_upgrade {
                assert!(k != "connection" || v == "upgrade");
                continue;
            }
            assert!(!HOP_BY_HOP.contains(&k), "hop-by-hop {k} forwarded");
            assert!(!named.iter().any(|t| t == k), "{k} named in Connection but forwarded");
        }
    }
}

/// Drives hyper's HTTP/1.1 server, configured as the proxy configures it, over an in-memory
/// stream carrying `data`, and checks every request head it produces.
fn serve_bytes(data: &[u8]) {
    use http_body_util::{BodyExt, Empty, Limited};
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    thread_local! {
        static RT: Option<tokio::runtime::Runtime> =
            tokio::runtime::Builder::new_current_thread().enable_all().build().ok();
    }
    RT.with(|rt| {
        let Some(rt) = rt else { return };
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let svc = service_fn(|req: ::http::Request<hyper::body::Incoming>| async move {
                let (parts, body) = req.into_parts();
                check_request_head(&parts);
                let _ = Limited::new(body, 1 << 20).collect().await;
                Ok::<_, std::convert::Infallible>(::http::Response::new(Empty::<bytes::Bytes>::new()))
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(32768)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(server), svc).with_upgrades();
            let feed = async {
                let _ = client.write_all(data).await;
                let _ = client.shutdown().await;
                let mut sink = Vec::new();
                let _ = client.read_to_end(&mut sink).await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(conn, feed) }).await;
        });
    });
}

/// The request-head handling the proxy does itself. First byte even: the rest is an authority
/// and a request target (`parse_authority`, absolute-form target extraction, `Host` rewriting).
/// Odd: the rest is the raw bytes of a client connection, parsed by hyper as the proxy does, and
/// every request head is checked (target, `Host`, origin-form rewrite, hop-by-hop stripping).
pub fn http_head(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 1 {
        serve_bytes(rest);
        return;
    }
    let text = String::from_utf8_lossy(rest);
    check_authority(&text);
    for uri in [text.to_string(), format!("http://{text}"), format!("http://{text}/")] {
        if let Ok(u) = ::http::Uri::try_from(uri.as_str()) {
            let parts = ::http::Request::get(u).body(()).map(|r| r.into_parts().0);
            if let Ok(parts) = parts {
                check_request_head(&parts);
            }
        }
    }
    if let Ok(req) = ::http::Request::builder().method(::http::Method::CONNECT).uri(text.as_ref()).body(()) {
        check_request_head(&req.into_parts().0);
    }
}

// ---------------------------------------------------------------------------------------------
// dns_message
// ---------------------------------------------------------------------------------------------

fn dns_policy() -> &'static Policy {
    static POLICY: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        let mut b = PolicyBuilder::new();
        let mut add = |ctl: u8, pats: &[&str]| {
            let id = b.add_rule(ref_rule(ctl, b.rule_count()));
            for p in pats {
                if let Ok(p) = parse_pattern(p) {
                    b.add_pattern(id, &p);
                }
            }
        };
        add(0, &["example.org", "*.example.org", ".example.com"]);
        add(1, &["*.evil.test", "bad.example.org"]);
        b.build(Guard::special_purpose(Vec::new()), DefaultAction::Deny).0
    })
}

/// DNS message handling without a running firewall: the query path of `Firewall::handle`
/// (parse, wire checks, name normalisation, a blocked answer encoded within the size limit)
/// on the bytes as a query, and the answer path (copy, inspection, encoding) on them as an
/// upstream's response.
pub fn dns_message(data: &[u8]) {
    use crate::dns::handler::{Precheck, Transport, base_response, check_query, copy_answer, encode, inspect};
    use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, AAAA};
    use hickory_proto::rr::{Name as DnsName, RData, Record, RecordType};

    for transport in [Transport::Udp, Transport::Tcp] {
        match check_query(data, transport) {
            Precheck::Reply(None) => {}
            Precheck::Reply(Some(reply)) => {
                let parsed = Message::from_vec(&reply);
                let Ok(m) = parsed else { panic!("our own reply does not parse: {parsed:?}") };
                assert_eq!(m.metadata.message_type, MessageType::Response);
                assert!(data.len() >= 2 && m.metadata.id == u16::from_be_bytes([data[0], data[1]]), "reply id differs");
                let code = m.metadata.response_code;
                assert!(
                    matches!(code, ResponseCode::FormErr | ResponseCode::NotImp | ResponseCode::Refused),
                    "wire-error reply with {code:?}"
                );
                if transport == Transport::Udp {
                    // The client's EDNS size clamped to 512..=1232, or 512 without EDNS.
                    let asked = Message::from_vec(data).ok().and_then(|m| m.edns.map(|e| e.max_payload()));
                    let limit = asked.map_or(512, |p| usize::from(p).clamp(512, 1232));
                    assert!(reply.len() <= limit, "UDP reply of {} bytes over the {limit}-byte limit", reply.len());
                }
            }
            Precheck::Query { query, limit, raw_name, name } => {
                assert_eq!(query.queries.len(), 1);
                let q = &query.queries[0];
                assert!(q.name().iter().all(wire_label_ok), "a malformed label passed the wire checks");
                if let Ok(n) = &name {
                    check_name(&raw_name, n);
                    // The name decided on is the name asked, up to case: nothing is dropped,
                    // unescaped or re-interpreted on the way.
                    let asked = raw_name.strip_suffix('.').unwrap_or(&raw_name).to_ascii_lowercase();
                    assert_eq!(n.as_str(), asked, "decided on another name than asked");
                }
                // A blocked answer (sinkhole record, EDE text) must fit the client's limit.
                let mut resp = base_response(&query);
                resp.metadata.response_code = ResponseCode::NXDomain;
                let rdata = match q.query_type() {
                    RecordType::AAAA => Some(RData::AAAA(AAAA(Ipv6Addr::UNSPECIFIED))),
                    RecordType::A => Some(RData::A(A(Ipv4Addr::UNSPECIFIED))),
                    _ => None,
                };
                if let Some(rdata) = rdata {
                    resp.add_answer(Record::from_rdata(q.name().clone(), 60, rdata));
                }
                if let Some(edns) = resp.edns.as_mut() {
                    let mut ede = 15u16.to_be_bytes().to_vec();
                    ede.extend_from_slice(format!("egressd: rule={}; reason=rule", "r".repeat(128)).as_bytes());
                    edns.options_mut().insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(15, ede));
                }
                if let Some(wire) = encode(resp, limit) {
                    assert!(wire.len() <= limit, "answer of {} bytes over the {limit}-byte limit", wire.len());
                    let back = Message::from_vec(&wire);
                    let Ok(back) = back else { panic!("our own answer does not parse: {back:?}") };
                    assert_eq!(back.metadata.id, query.metadata.id);
                    assert_eq!(back.queries.len(), 1);
                }
            }
        }
    }

    // The bytes as an upstream's answer to `www.example.org. A`.
    let Ok(upstream) = Message::from_vec(data) else { return };
    let refused_ip = upstream.answers.iter().chain(upstream.additionals.iter()).any(|r| match &r.data {
        RData::A(a) => !dns_policy().guard().permits(IpAddr::V4(a.0)),
        RData::AAAA(a) => !dns_policy().guard().permits(IpAddr::V6(a.0)),
        _ => false,
    });
    let mut query = Message::query();
    query.metadata.id = 0x1234;
    let Ok(qname) = DnsName::from_ascii("www.example.org.") else { return };
    query.add_query(Query::query(qname, RecordType::A));
    query.set_edns(Edns::new());
    let mut resp = base_response(&query);
    copy_answer(&mut resp, upstream, Duration::from_secs(3600));
    for client in [IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), IpAddr::V4(Ipv4Addr::LOCALHOST)] {
        for inspect_cnames in [true, false] {
            let found = inspect(dns_policy(), &resp, client, inspect_cnames);
            if refused_ip {
                assert!(found.is_some(), "an answer with a guard-refused address passed inspection");
            }
        }
    }
    if let Some(wire) = encode(resp, 1232) {
        assert!(wire.len() <= 1232, "answer of {} bytes over the UDP limit", wire.len());
    }
}
