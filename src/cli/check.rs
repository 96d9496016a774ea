//! `egressd check`: load everything, print a summary and the lints; exit 1 on any error.

use std::io::Write;
use std::path::Path;

use super::lint::{Warning, lint};
use crate::config::{self, Loaded, SourceKind};
use crate::policy::Action;
use crate::policy::matcher::Kind;

/// Counts shown in the summary.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub rule_files: usize,
    pub hosts_files: usize,
    pub rules: usize,
    pub allow: usize,
    pub deny: usize,
    pub alert: usize,
    pub names: usize,
    pub wildcards: usize,
    pub cidrs: usize,
    pub static_hosts: usize,
}

pub fn summarize(loaded: &Loaded) -> Summary {
    let p = &loaded.policy;
    let mut s = Summary {
        rule_files: loaded.sources.iter().filter(|f| f.kind == SourceKind::Rules).count(),
        hosts_files: loaded.sources.iter().filter(|f| f.kind == SourceKind::Hosts).count(),
        rules: p.rules().len(),
        names: p.names().len(),
        cidrs: p.rules().iter().map(|r| r.cidrs.len()).sum(),
        static_hosts: loaded.config.hosts.len(),
        ..Summary::default()
    };
    for r in p.rules() {
        match r.action {
            Action::Allow => s.allow += 1,
            Action::Deny => s.deny += 1,
            Action::Alert => s.alert += 1,
        }
    }
    p.names().for_each_pattern(|_, _, k| s.wildcards += usize::from(k != Kind::Exact));
    s
}

/// Runs `check` for the config at `path`, writing to `out`; returns the process exit code.
pub fn run(path: &Path, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let loaded = match config::load(path) {
        Ok(l) => l,
        Err(e) => {
            for d in &e.0 {
                let _ = writeln!(err, "{d}");
            }
            let _ = writeln!(err, "{}: config has {} error(s); nothing was loaded", path.display(), e.0.len());
            return 1;
        }
    };
    let warnings = lint(&loaded);
    let _ = print_summary(&loaded, &warnings, out);
    0
}

fn print_summary(loaded: &Loaded, warnings: &[Warning], out: &mut dyn Write) -> std::io::Result<()> {
    let s = summarize(loaded);
    let c = &loaded.config;
    let g = c.guard.clone();
    writeln!(out, "{}: ok", c.path.display())?;
    writeln!(out, "  files:    {} rule file(s), {} hosts file(s)", s.rule_files, s.hosts_files)?;
    for f in loaded.sources.iter().filter(|f| f.kind != SourceKind::Main) {
        writeln!(out, "            {:<5} {} ({} bytes)", f.kind.as_str(), f.path.display(), f.bytes)?;
    }
    writeln!(out, "  rules:    {} ({} allow, {} deny, {} alert)", s.rules, s.allow, s.deny, s.alert)?;
    writeln!(out, "  names:    {} ({} wildcard)", s.names, s.wildcards)?;
    writeln!(out, "  cidrs:    {}", s.cidrs)?;
    writeln!(out, "  hosts:    {} static name(s)", s.static_hosts)?;
    let deny = if g.special_purpose {
        format!(
            "special-purpose ({} ranges) + {} configured",
            loaded.policy.guard().deny_nets().len().saturating_sub(g.deny.len()),
            g.deny.len()
        )
    } else {
        format!("{} configured range(s)", g.deny.len())
    };
    writeln!(out, "  guard:    deny {deny}; {} allow hole(s)", g.allow.len())?;
    writeln!(out, "  default:  {}", c.policy.default.as_str())?;
    writeln!(out, "  proxy:    {}", list(&c.proxy.listen))?;
    writeln!(out, "  dns:      {} → {}", list(&c.dns.listen), list(&c.dns.upstreams))?;
    if let Some(a) = c.admin.listen {
        writeln!(out, "  admin:    {a}")?;
    }
    writeln!(out, "  warnings: {}", warnings.len())?;
    for w in warnings {
        writeln!(out, "{w}")?;
    }
    Ok(())
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "(none)".to_string();
    }
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
