//! `egressd explain`: how the loaded policy decides one target, and why.
//!
//! TARGET is a URL (`http://host/path`, decided as a plain-HTTP proxy request), an authority
//! `host:port` (decided as a CONNECT), or `dns:NAME[/QTYPE]` (decided as a DNS query).
//! Names are never resolved here: the report says which guard ranges a resolved address must
//! avoid. IP literals are checked against the rules' `cidrs` and the guard.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use crate::config::{self, Loaded, qtype_name};
use crate::policy::guard::Verdict;
use crate::policy::name::{Host, normalize_name, parse_authority};
use crate::policy::{Decision, Facts, Reason, Surface, describe_verdict};

/// Exit code for a denied target.
pub const EXIT_DENY: i32 = 3;

/// What kind of request the target stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    Http,
    Connect,
    Dns,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Http => "http",
            TargetKind::Connect => "connect",
            TargetKind::Dns => "dns",
        }
    }
}

/// The explanation of one decision.
#[derive(Clone, Debug)]
pub struct Report {
    pub target: String,
    pub kind: TargetKind,
    /// The normalised host (empty when malformed).
    pub host: String,
    pub port: Option<u16>,
    pub qtype: Option<String>,
    pub decision: Decision,
    pub rule: String,
    /// `file:line` of the deciding rule.
    pub rule_origin: Option<String>,
    pub why: String,
    pub notes: Vec<String>,
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "target": self.target,
            "kind": self.kind.as_str(),
            "host": self.host,
            "port": self.port,
            "qtype": self.qtype,
            "action": self.decision.action.as_str(),
            "rule": self.rule,
            "rule_origin": self.rule_origin,
            "reason": self.decision.reason.as_str(),
            "why": self.why,
            "notes": self.notes,
        })
    }
}

struct Parsed {
    kind: TargetKind,
    host: Result<Host, String>,
    port: Option<u16>,
    qtype: Option<u16>,
}

fn parse_target(target: &str) -> Parsed {
    if let Some(rest) = target.strip_prefix("dns:") {
        let (name, qtype) = match rest.rsplit_once('/') {
            Some((n, q)) => (n, Some(q)),
            None => (rest, None),
        };
        let qtype = match qtype {
            None => Some(1),
            Some(q) => crate::config::parse_qtype(q),
        };
        let host = normalize_name(name).map(Host::Name).map_err(|e| e.to_string());
        let host = if qtype.is_none() { Err("unknown query type".to_string()) } else { host };
        return Parsed { kind: TargetKind::Dns, host, port: None, qtype };
    }
    if let Some((scheme, rest)) = target.split_once("://") {
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "http" => 80,
            "https" => 443,
            other => {
                let host = Err(format!("scheme `{other}` is not proxied (only http, and https via CONNECT)"));
                return Parsed { kind: TargetKind::Http, host, port: None, qtype: None };
            }
        };
        let kind = if default_port == 80 { TargetKind::Http } else { TargetKind::Connect };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        return match parse_authority(&rest[..end]) {
            Ok((host, port)) => Parsed { kind, host: Ok(host), port: Some(port.unwrap_or(default_port)), qtype: None },
            Err(e) => Parsed { kind, host: Err(e.to_string()), port: None, qtype: None },
        };
    }
    match parse_authority(target) {
        Ok((host, Some(port))) => Parsed { kind: TargetKind::Connect, host: Ok(host), port: Some(port), qtype: None },
        Ok((_, None)) => Parsed {
            kind: TargetKind::Connect,
            host: Err("a CONNECT target needs host:port".to_string()),
            port: None,
            qtype: None,
        },
        Err(e) => Parsed { kind: TargetKind::Connect, host: Err(e.to_string()), port: None, qtype: None },
    }
}

/// Decides `target` under the loaded config, as the proxy or DNS firewall would before any
/// network I/O.
pub fn explain(loaded: &Loaded, target: &str, client: Option<IpAddr>, method: &str) -> Report {
    let policy = &loaded.policy;
    let parsed = parse_target(target);
    let mut notes = Vec::new();
    let mut report = Report {
        target: target.to_string(),
        kind: parsed.kind,
        host: String::new(),
        port: parsed.port,
        qtype: parsed.qtype.map(qtype_name),
        decision: Decision::MALFORMED,
        rule: "default".to_string(),
        rule_origin: None,
        why: String::new(),
        notes: Vec::new(),
    };
    let host = match parsed.host {
        Ok(h) => h,
        Err(e) => {
            report.why = format!("malformed target: {e}");
            return report;
        }
    };
    report.host = host.to_string();
    let surface = if parsed.kind == TargetKind::Dns { Surface::Dns } else { Surface::Proxy };
    let facts = Facts {
        host: &host,
        port: parsed.port,
        client,
        method: (parsed.kind == TargetKind::Http).then_some(method),
        body_len: None,
        surface,
    };
    let mut decision = policy.decide(&facts);
    if let Some(q) = parsed.qtype {
        if decision.action.permits() && !loaded.config.dns.allowed_qtypes.contains(&q) {
            decision = decision.denied_for(Reason::Qtype);
        }
    }
    report.decision = decision;
    report.rule = policy.rule_name(decision.rule).to_string();
    report.rule_origin = decision.rule.map(|id| policy.rule(id).origin.to_string());
    report.why = why(loaded, &facts, &decision, parsed.qtype);
    if client.is_none() && policy.rules().iter().any(|r| !r.clients.is_empty()) {
        notes.push(
            "no --client given: client-scoped allow rules were not considered (client-scoped deny rules were)"
                .to_string(),
        );
    }
    match (&host, decision.action.permits()) {
        (Host::Name(_), true) if surface == Surface::Proxy => notes.push(guard_note(loaded, &host)),
        (Host::Name(_), true) => notes.push(
            "at run time the answer is inspected too: CNAME targets must be allowed, addresses must avoid the guard's ranges, and the tunneling heuristics apply".to_string(),
        ),
        _ => {}
    }
    report.notes = notes;
    report
}

fn why(loaded: &Loaded, facts: &Facts<'_>, d: &Decision, qtype: Option<u16>) -> String {
    let policy = &loaded.policy;
    let rule = d.rule.map(|id| policy.rule(id));
    let name = rule.map_or("default", |r| &r.name);
    match d.reason {
        Reason::Rule if d.action.permits() => format!("rule `{name}` matches the host"),
        Reason::Rule => format!("deny rule `{name}` matches the host; deny always wins"),
        Reason::Default => format!("no rule matches; policy.default is {}", policy.default_action().as_str()),
        Reason::Port => {
            let ports = rule.and_then(|r| r.ports.as_ref()).map(|p| format!("{p:?}")).unwrap_or_default();
            format!("rule `{name}` matches the host but allows only ports {ports}")
        }
        Reason::Method => format!("rule `{name}` matches the host but not method {}", facts.method.unwrap_or("")),
        Reason::Qtype => format!(
            "rule `{name}` allows the name but query type {} is not in dns.allowed_qtypes",
            qtype.map(qtype_name).unwrap_or_default()
        ),
        Reason::Guard => match facts.host {
            Host::Ip(ip) => format!(
                "{}; the guard applies even where a rule's cidrs cover the address",
                describe_verdict(&policy.guard().check(*ip))
            ),
            Host::Name(_) => "the guard refuses every address".to_string(),
        },
        other => other.as_str().to_string(),
    }
}

fn guard_note(loaded: &Loaded, host: &Host) -> String {
    let guard = loaded.policy.guard();
    let mut note = String::from("names are not resolved by explain: ");
    if let Host::Name(n) = host {
        if let Some((_, addrs)) = loaded.config.hosts.iter().find(|(h, _)| h == n) {
            let verdicts: Vec<String> = addrs
                .iter()
                .map(|a| match guard.check(*a) {
                    Verdict::Permitted => format!("{a} permitted"),
                    v => describe_verdict(&v),
                })
                .collect();
            note.push_str(&format!("[hosts] maps it to {}; ", verdicts.join(", ")));
        }
    }
    let deny = guard.deny_nets();
    let shown: Vec<String> = deny.iter().take(8).map(ToString::to_string).collect();
    note.push_str(&format!(
        "the proxy connects only to a resolved address outside the guard's {} deny ranges ({}{})",
        deny.len(),
        shown.join(", "),
        if deny.len() > 8 { ", …" } else { "" }
    ));
    if !guard.allow_nets().is_empty() {
        let holes: Vec<String> = guard.allow_nets().iter().map(ToString::to_string).collect();
        note.push_str(&format!(" except the holes {}", holes.join(", ")));
    }
    note
}

/// Runs `explain`; returns the exit code (0 allow/alert, 3 deny, 1 config error).
pub fn run(
    path: &Path,
    target: &str,
    client: Option<IpAddr>,
    method: &str,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let loaded = match config::load(path) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(err, "{e}");
            return 1;
        }
    };
    let r = explain(&loaded, target, client, method);
    let _ = if json { writeln!(out, "{}", r.to_json()) } else { print(&r, client, out) };
    if r.decision.action.permits() { 0 } else { EXIT_DENY }
}

fn print(r: &Report, client: Option<IpAddr>, out: &mut dyn Write) -> std::io::Result<()> {
    let client = client.map_or_else(|| "any".to_string(), |c| c.to_string());
    writeln!(out, "target:   {} ({}, client {client})", r.target, r.kind.as_str())?;
    if !r.host.is_empty() {
        let port = r.port.map_or_else(String::new, |p| format!(" port {p}"));
        let q = r.qtype.as_ref().map_or_else(String::new, |q| format!(" qtype {q}"));
        writeln!(out, "host:     {}{port}{q}", r.host)?;
    }
    writeln!(out, "decision: {}", r.decision.action)?;
    match &r.rule_origin {
        Some(o) => writeln!(out, "rule:     {} ({o})", r.rule)?,
        None => writeln!(out, "rule:     {}", r.rule)?,
    }
    writeln!(out, "reason:   {}", r.decision.reason)?;
    writeln!(out, "why:      {}", r.why)?;
    for n in &r.notes {
        writeln!(out, "note:     {n}")?;
    }
    Ok(())
}
