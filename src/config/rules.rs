//! Rule files (`[[rule]]` tables) and the hosts files they name, compiled straight into a
//! [`PolicyBuilder`]: a million-line hosts file is streamed into the matcher, never held as a
//! list of strings.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::raw::{RawRule, RawRuleFile};
use super::validate::Check;
use super::{Config, Diagnostic, Diagnostics, Source, SourceFile, SourceKind, hex, sha256_hex, toml_diag};
use crate::policy::guard::{CidrSet, Guard};
use crate::policy::name::{Pattern, parse_pattern};
use crate::policy::{Action, Origin, Policy, PolicyBuilder, Rule, RuleId, SharedNames};

/// Errors reported per hosts file before the rest are summarised (a wrong file format would
/// otherwise print a million lines).
const MAX_ERRORS_PER_FILE: usize = 20;

pub(super) struct Built {
    pub policy: Policy,
    pub sources: Vec<SourceFile>,
    pub shared: SharedNames,
    pub notes: Vec<Diagnostic>,
}

/// Expands `policy.files` relative to the main config's directory; every glob must match.
fn rule_files(config: &Config, diags: &mut Diagnostics) -> Vec<PathBuf> {
    let base = config.path.parent().unwrap_or(Path::new("."));
    let mut out: Vec<PathBuf> = Vec::new();
    for pattern in &config.policy.files {
        let full = base.join(pattern);
        let full_str = full.to_string_lossy();
        let paths = match glob::glob(&full_str) {
            Ok(p) => p,
            Err(e) => {
                diags.file(&config.path, format!("policy.files: `{pattern}` is not a valid glob: {e}"));
                continue;
            }
        };
        let mut matched: Vec<PathBuf> = paths.filter_map(Result::ok).filter(|p| p.is_file()).collect();
        matched.sort();
        if matched.is_empty() {
            diags.file(&config.path, format!("policy.files: `{pattern}` matches no file (looked for {full_str})"));
        }
        for p in matched {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

pub(super) fn load_rules(config: &Config, diags: &mut Diagnostics) -> Option<Built> {
    let files = rule_files(config, diags);
    let mut builder = PolicyBuilder::new();
    let mut sources = Vec::new();
    let mut notes = Vec::new();
    let mut first_seen: HashMap<String, (PathBuf, usize)> = HashMap::new();
    for path in files {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                diags.file(&path, format!("cannot read rule file: {e}"));
                continue;
            }
        };
        let (bytes, sha256) = (text.len() as u64, sha256_hex(text.as_bytes()));
        sources.push(SourceFile { path: path.clone(), kind: SourceKind::Rules, bytes, sha256 });
        let src = Source::new(path.clone(), text);
        let file: RawRuleFile = match toml::from_str(&src.text) {
            Ok(f) => f,
            Err(e) => {
                diags.0.push(toml_diag(&src, &e));
                continue;
            }
        };
        if file.rule.is_empty() {
            notes.push(src.diag(0..0, "rule file has no [[rule]] tables"));
        }
        for raw in file.rule {
            let span = raw.span();
            let (line, _) = src.line_col(span.start);
            let raw = raw.into_inner();
            let name = raw.name.get_ref().clone();
            if let Some((p, l)) = first_seen.get(&name) {
                let msg = format!("duplicate rule name `{name}` (first declared at {}:{l})", p.display());
                diags.at(&src, raw.name.span(), "rule.name", msg);
                continue;
            }
            first_seen.insert(name, (path.clone(), line));
            let mut check = Check { src: &src, diags };
            compile_rule(&mut check, &mut builder, raw, line, &mut sources);
        }
    }
    if builder.rule_count() == 0 && diags.0.is_empty() {
        diags.file(&config.path, "policy.files: the rule files declare no rules; refusing an empty policy");
    }
    if !diags.0.is_empty() {
        return None;
    }
    let g = &config.guard;
    let guard = if g.special_purpose {
        let mut deny: Vec<_> = crate::policy::guard::special_purpose().iter().map(|r| r.net).collect();
        deny.extend(g.deny.iter().copied());
        Guard::new(deny, g.allow.clone())
    } else {
        Guard::new(g.deny.clone(), g.allow.clone())
    };
    let (policy, shared) = builder.build(guard, config.policy.default);
    Some(Built { policy, sources, shared, notes })
}

fn compile_rule(c: &mut Check<'_>, b: &mut PolicyBuilder, raw: RawRule, line: usize, sources: &mut Vec<SourceFile>) {
    let name = raw.name.get_ref().clone();
    let valid_name = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, b'-' | b'_' | b'.'));
    if !valid_name {
        c.err(
            raw.name.span(),
            "rule.name",
            format!("`{name}`: use 1-128 characters of letters, digits, '-', '_', '.'"),
        );
    }
    let action = c.choice(
        raw.action,
        "rule.action",
        &[("allow", Action::Allow), ("deny", Action::Deny), ("alert", Action::Alert)],
        Action::Allow,
    );
    let ports = match raw.ports {
        None if action == Action::Deny => None,
        None => Some(vec![80, 443].into_boxed_slice()),
        Some(list) => {
            if list.get_ref().is_empty() {
                c.err(list.span(), "rule.ports", "an empty list matches no port; omit the field for the default");
            }
            let mut ports = Vec::new();
            for p in list.get_ref() {
                match u16::try_from(*p.get_ref()) {
                    Ok(v) if v >= 1 => ports.push(v),
                    _ => c.err(p.span(), "rule.ports", format!("{} is not a port (1-65535)", p.get_ref())),
                }
            }
            Some(ports.into_boxed_slice())
        }
    };
    let methods = raw.methods.map(|list| {
        list.iter()
            .filter_map(|m| {
                let v = m.get_ref();
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphabetic()) {
                    c.err(m.span(), "rule.methods", format!("`{v}` is not an HTTP method"));
                    return None;
                }
                Some(v.to_ascii_uppercase().into_boxed_str())
            })
            .collect::<Box<[_]>>()
    });
    let (mut proxy, mut dns) = (true, true);
    if let Some(list) = raw.applies_to {
        (proxy, dns) = (false, false);
        if list.get_ref().is_empty() {
            c.err(list.span(), "rule.applies_to", "an empty list applies nowhere; omit it for both");
        }
        for s in list.get_ref() {
            match s.get_ref().as_str() {
                "proxy" => proxy = true,
                "dns" => dns = true,
                other => c.err(s.span(), "rule.applies_to", format!("`{other}` is not one of proxy | dns")),
            }
        }
    }
    let cidrs: Vec<_> = raw.cidrs.unwrap_or_default().iter().filter_map(|s| c.cidr(s, "rule.cidrs")).collect();
    let clients = CidrSet::new(c.cidrs(raw.clients, "rule.clients"));
    let max_request_body = c.size(raw.max_request_body, "rule.max_request_body");
    let max_upload_bytes = c.size(raw.max_upload_bytes, "rule.max_upload_bytes");

    let hosts = raw.hosts.unwrap_or_default();
    let hosts_files = raw.hosts_files.unwrap_or_default();
    if hosts.is_empty() && hosts_files.is_empty() && cidrs.is_empty() {
        c.err(
            raw.name.span(),
            "rule",
            format!("rule `{name}` lists no hosts, hosts_files or cidrs: it matches nothing"),
        );
    }
    let origin = Origin { file: c.src.path.display().to_string(), line };
    let id = b.add_rule(Rule {
        name: name.into_boxed_str(),
        action,
        ports,
        clients,
        methods,
        max_request_body,
        max_upload_bytes,
        proxy,
        dns,
        cidrs,
        origin,
        patterns: 0,
    });
    for h in &hosts {
        match parse_pattern(h.get_ref()) {
            Ok(p) => b.add_pattern(id, &p),
            Err(e) => c.err(h.span(), "rule.hosts", format!("`{}`: {e}", h.get_ref())),
        }
    }
    let base = c.src.path.parent().unwrap_or(Path::new(".")).to_path_buf();
    for f in &hosts_files {
        let path = base.join(f.get_ref());
        match load_hosts_file(&path, b, id, c.diags) {
            Ok((bytes, sha256)) => sources.push(SourceFile { path, kind: SourceKind::Hosts, bytes, sha256 }),
            Err(e) => c.err(f.span(), "rule.hosts_files", format!("`{}`: {e}", path.display())),
        }
    }
}

/// One name per line, or hosts-file lines (`0.0.0.0 name [name…]`); `#` starts a comment.
fn parse_hosts_line(line: &str) -> Result<Vec<Pattern>, String> {
    let line = line.split('#').next().unwrap_or("").trim();
    if line.is_empty() {
        return Ok(Vec::new());
    }
    let mut tokens = line.split_ascii_whitespace();
    let first = tokens.next().unwrap_or("");
    let names: Vec<&str> = if first.parse::<IpAddr>().is_ok() {
        let rest: Vec<&str> = tokens.collect();
        if rest.is_empty() {
            return Err(format!("`{first}` has no name after it"));
        }
        rest
    } else {
        if let Some(extra) = tokens.next() {
            return Err(format!("expected one name per line, found `{first}` then `{extra}`"));
        }
        vec![first]
    };
    names.into_iter().map(|n| parse_pattern(n).map_err(|e| format!("`{n}`: {e}"))).collect()
}

/// Streams a hosts file into the builder. Line errors are reported as diagnostics against the
/// file; an unreadable file is the caller's error. Returns the bytes read and their SHA-256.
fn load_hosts_file(
    path: &Path,
    b: &mut PolicyBuilder,
    id: RuleId,
    diags: &mut Diagnostics,
) -> Result<(u64, String), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read hosts file: {e}"))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut line = String::new();
    let (mut n, mut bytes, mut errors) = (0usize, 0u64, 0usize);
    let mut hasher = Sha256::new();
    loop {
        line.clear();
        let read = match reader.read_line(&mut line) {
            Ok(r) => r,
            Err(e) => {
                diags.0.push(Diagnostic {
                    path: path.to_path_buf(),
                    line: n + 1,
                    column: 1,
                    message: format!("unreadable: {e}"),
                });
                break;
            }
        };
        if read == 0 {
            break;
        }
        n += 1;
        bytes += read as u64;
        hasher.update(line.as_bytes());
        match parse_hosts_line(&line) {
            Ok(patterns) => patterns.iter().for_each(|p| b.add_pattern(id, p)),
            Err(e) => {
                errors += 1;
                if errors <= MAX_ERRORS_PER_FILE {
                    diags.0.push(Diagnostic { path: path.to_path_buf(), line: n, column: 1, message: e });
                }
            }
        }
    }
    if errors > MAX_ERRORS_PER_FILE {
        let more = errors - MAX_ERRORS_PER_FILE;
        diags.0.push(Diagnostic {
            path: path.to_path_buf(),
            line: n,
            column: 1,
            message: format!("{more} more bad lines"),
        });
    }
    Ok((bytes, hex(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lines() {
        assert!(parse_hosts_line("# comment").unwrap().is_empty());
        assert!(parse_hosts_line("   ").unwrap().is_empty());
        assert_eq!(parse_hosts_line("Example.ORG.").unwrap(), vec![parse_pattern("example.org").unwrap()]);
        assert_eq!(parse_hosts_line("*.example.org # ok").unwrap().len(), 1);
        assert_eq!(parse_hosts_line("0.0.0.0 a.example b.example").unwrap().len(), 2);
        assert_eq!(parse_hosts_line("::1\tlocalhost").unwrap().len(), 1);
        assert!(parse_hosts_line("0.0.0.0").is_err());
        assert!(parse_hosts_line("a.example b.example").is_err());
        assert!(parse_hosts_line("bad name!").is_err());
        assert!(parse_hosts_line("ex ample.org").is_err());
        assert!(parse_hosts_line("127.1").is_err());
    }
}
