//! Lints for `egressd check`: things that load fine but are probably not what the operator
//! meant, above all wildcards over namespaces where anyone can register a name.

use std::fmt;

use crate::config::Loaded;
use crate::policy::matcher::{Kind, pattern_of};
use crate::policy::{Action, Policy, Rule, RuleId, psl};

/// Printed lint findings per kind before the rest are counted.
const MAX_PER_KIND: usize = 25;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LintKind {
    /// An allow rule every one of whose patterns a deny rule also matches.
    Shadowed,
    /// A name listed by more than one rule.
    DuplicateName,
    /// A wildcard spanning a public suffix or a shared-tenant domain.
    SharedTenantWildcard,
    /// A very wide `cidrs` entry.
    WideCidr,
    /// Anything else worth a look (empty rule file, denylist mode).
    Note,
}

#[derive(Clone, Debug)]
pub struct Warning {
    pub kind: LintKind,
    /// `path:line` of the rule concerned, or of the file.
    pub at: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: warning: {}", self.at, self.message)
    }
}

/// Runs every lint over a loaded config. Findings beyond [`MAX_PER_KIND`] of a kind are
/// summarised in one line.
pub fn lint(loaded: &Loaded) -> Vec<Warning> {
    let policy = &loaded.policy;
    let mut out = Vec::new();
    for n in &loaded.notes {
        out.push(Warning {
            kind: LintKind::Note,
            at: format!("{}:{}", n.path.display(), n.line),
            message: n.message.clone(),
        });
    }
    if policy.default_action() != crate::policy::DefaultAction::Deny {
        out.push(Warning {
            kind: LintKind::Note,
            at: format!("{}:1", loaded.config.path.display()),
            message: format!(
                "policy.default = \"{}\": names no rule lists are let through; egressd is an allowlist appliance and \"deny\" is its safe default",
                policy.default_action().as_str()
            ),
        });
    }
    wildcards(policy, &mut out);
    shared(loaded, &mut out);
    shadowed(policy, &mut out);
    wide_cidrs(policy, &mut out);
    out
}

fn at(rule: &Rule) -> String {
    rule.origin.to_string()
}

fn capped(out: &mut Vec<Warning>, kind: LintKind, found: Vec<Warning>, what: &str) {
    let extra = found.len().saturating_sub(MAX_PER_KIND);
    let first_at = found.first().map(|w| w.at.clone());
    out.extend(found.into_iter().take(MAX_PER_KIND));
    if let (true, Some(at)) = (extra > 0, first_at) {
        out.push(Warning { kind, at, message: format!("… and {extra} more {what}") });
    }
}

fn wildcards(policy: &Policy, out: &mut Vec<Warning>) {
    let mut found = Vec::new();
    policy.names().for_each_pattern(|domain, id, kind| {
        let rule = policy.rule(id);
        if rule.action == Action::Deny || kind == Kind::Exact {
            return;
        }
        let (shown, base) = match (domain, kind) {
            ("*", _) => ("*".to_string(), ""),
            (d, Kind::ApexAndBelow) => (format!(".{d}"), d),
            (d, _) => (format!("*.{d}"), d),
        };
        if let Some(why) = psl::wildcard_risk(base) {
            found.push(Warning {
                kind: LintKind::SharedTenantWildcard,
                at: at(rule),
                message: format!("rule `{}`: wildcard `{shown}` is an exfiltration path: {why}", rule.name),
            });
        }
    });
    found.sort_by(|a, b| a.at.cmp(&b.at).then(a.message.cmp(&b.message)));
    capped(out, LintKind::SharedTenantWildcard, found, "wildcards over shared namespaces");
}

fn shared(loaded: &Loaded, out: &mut Vec<Warning>) {
    let policy = &loaded.policy;
    let s = &loaded.shared_names;
    let found: Vec<Warning> = s
        .examples
        .iter()
        .map(|(pattern, first, second)| {
            let (a, b) = (policy.rule(*first), policy.rule(*second));
            Warning {
                kind: LintKind::DuplicateName,
                at: at(b),
                message: format!("`{pattern}` is listed by rule `{}` and by rule `{}` ({})", a.name, b.name, a.origin),
            }
        })
        .collect();
    let listed = found.len();
    capped(out, LintKind::DuplicateName, found, "names listed by two rules");
    if s.count > listed {
        let at = out.last().map_or_else(String::new, |w| w.at.clone());
        out.push(Warning {
            kind: LintKind::DuplicateName,
            at,
            message: format!("{} names in all are listed by more than one rule", s.count),
        });
    }
}

/// A deny rule that applies unconditionally wherever `allow` does.
fn covers(deny: &Rule, allow: &Rule) -> bool {
    deny.action == Action::Deny
        && deny.clients.is_empty()
        && deny.ports.is_none()
        && (deny.proxy || !allow.proxy)
        && (deny.dns || !allow.dns)
}

fn shadowed(policy: &Policy, out: &mut Vec<Warning>) {
    let rules = policy.rules();
    if !rules.iter().any(|r| r.action == Action::Deny) {
        return;
    }
    let mut covered = vec![0usize; rules.len()];
    let mut by: Vec<Option<RuleId>> = vec![None; rules.len()];
    policy.names().for_each_pattern(|domain, id, kind| {
        let allow = policy.rule(id);
        if allow.action == Action::Deny || !allow.cidrs.is_empty() {
            return;
        }
        let Ok(pattern) = pattern_of(domain, kind) else { return };
        let mut hit = None;
        policy.names().covering(&pattern, |d| {
            if hit.is_none() && covers(policy.rule(d), allow) {
                hit = Some(d);
            }
        });
        if let Some(d) = hit {
            covered[id as usize] += 1;
            by[id as usize].get_or_insert(d);
        }
    });
    let found = rules
        .iter()
        .enumerate()
        .filter(|(i, r)| r.action != Action::Deny && r.patterns > 0 && covered[*i] == r.patterns)
        .map(|(i, r)| {
            let d = by[i].map(|d| policy.rule(d));
            let deny = d.map_or_else(String::new, |d| format!(" `{}` ({})", d.name, d.origin));
            Warning {
                kind: LintKind::Shadowed,
                at: at(r),
                message: format!(
                    "rule `{}` never allows anything: every name it lists is denied by rule{deny}",
                    r.name
                ),
            }
        })
        .collect();
    capped(out, LintKind::Shadowed, found, "shadowed rules");
}

fn wide_cidrs(policy: &Policy, out: &mut Vec<Warning>) {
    let mut found = Vec::new();
    for r in policy.rules().iter().filter(|r| r.action != Action::Deny) {
        for net in &r.cidrs {
            let wide = match net {
                ipnet::IpNet::V4(n) => n.prefix_len() < 8,
                ipnet::IpNet::V6(n) => n.prefix_len() < 32,
            };
            if wide {
                found.push(Warning {
                    kind: LintKind::WideCidr,
                    at: at(r),
                    message: format!(
                        "rule `{}`: cidrs entry {net} is very wide: any IP-literal destination in it is allowed (the guard still applies)",
                        r.name
                    ),
                });
            }
        }
    }
    capped(out, LintKind::WideCidr, found, "wide cidrs");
}
