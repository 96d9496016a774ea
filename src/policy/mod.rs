//! The policy engine: a pure function of (policy, request facts) → decision.
//!
//! Nothing here touches a socket, a file or a clock. The proxy and the DNS firewall normalise
//! what they saw into [`Facts`], ask [`Policy::decide`], and act on the [`Decision`]. The same
//! code serves `egressd explain`, the benchmarks and the fuzzers.

pub mod guard;
pub mod matcher;
pub mod name;
pub mod psl;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use guard::{CidrSet, Guard, Verdict};
use matcher::{NameMatcher, NameMatcherBuilder};
use name::{Host, Pattern};

/// Index of a rule in declaration order (files in load order, rules in file order).
pub type RuleId = u32;

/// What happens to the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// Allowed, but logged and counted as an alert (a rule's `alert` action, or
    /// `policy.default = "alert"` during a rollout).
    Alert,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Alert => "alert",
        }
    }

    /// True when the traffic may pass (allow or alert).
    pub fn permits(self) -> bool {
        !matches!(self, Action::Deny)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a decision came out as it did. The spellings are the contract's `reason` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Rule,
    Default,
    Malformed,
    Guard,
    Port,
    Method,
    BodyLimit,
    UploadLimit,
    SniMismatch,
    NotTls,
    Qtype,
    Cname,
    AnswerIp,
    Tunneling,
    Upstream,
    Revoked,
    DstMismatch,
    UploadBudget,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rule => "rule",
            Reason::Default => "default",
            Reason::Malformed => "malformed",
            Reason::Guard => "guard",
            Reason::Port => "port",
            Reason::Method => "method",
            Reason::BodyLimit => "body_limit",
            Reason::UploadLimit => "upload_limit",
            Reason::SniMismatch => "sni_mismatch",
            Reason::NotTls => "not_tls",
            Reason::Qtype => "qtype",
            Reason::Cname => "cname",
            Reason::AnswerIp => "answer_ip",
            Reason::Tunneling => "tunneling",
            Reason::Upstream => "upstream",
            Reason::Revoked => "revoked",
            Reason::DstMismatch => "dst_mismatch",
            Reason::UploadBudget => "upload_budget",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The enforcement point asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Surface {
    Proxy,
    Dns,
}

/// `policy.default`: what happens when no rule matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultAction {
    Deny,
    Allow,
    Alert,
}

impl DefaultAction {
    fn action(self) -> Action {
        match self {
            DefaultAction::Deny => Action::Deny,
            DefaultAction::Allow => Action::Allow,
            DefaultAction::Alert => Action::Alert,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.action().as_str()
    }
}

/// Where a rule was declared, for explanations and lints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A compiled rule. Its host patterns live in the policy's matcher.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: Box<str>,
    pub action: Action,
    /// `None`: every port. Allow rules default to `[80, 443]`; deny rules to every port, so a
    /// deny can never be sidestepped by choosing an unusual port.
    pub ports: Option<Box<[u16]>>,
    /// Empty: every client.
    pub clients: CidrSet,
    /// Upper-case method names; `None`: every method.
    pub methods: Option<Box<[Box<str>]>>,
    pub max_request_body: Option<u64>,
    pub max_upload_bytes: Option<u64>,
    pub proxy: bool,
    pub dns: bool,
    pub cidrs: Vec<IpNet>,
    pub origin: Origin,
    /// Distinct host patterns this rule lists.
    pub patterns: usize,
}

impl Rule {
    fn applies(&self, surface: Surface) -> bool {
        match surface {
            Surface::Proxy => self.proxy,
            Surface::Dns => self.dns,
        }
    }

    /// Allow rules scoped to clients never match an unknown client; deny rules do.
    fn client_matches(&self, client: Option<IpAddr>) -> bool {
        if self.clients.is_empty() {
            return true;
        }
        match client {
            // An IPv4 client seen through a dual-stack socket is still that IPv4 client.
            Some(ip) => self.clients.contains(ip.to_canonical()),
            None => self.action == Action::Deny,
        }
    }

    fn port_allowed(&self, port: Option<u16>) -> bool {
        match (&self.ports, port) {
            (Some(ports), Some(p)) => ports.contains(&p),
            _ => true,
        }
    }

    fn method_allowed(&self, method: Option<&str>) -> bool {
        match (&self.methods, method) {
            (Some(methods), Some(m)) => methods.iter().any(|x| x.eq_ignore_ascii_case(m)),
            _ => true,
        }
    }
}

/// What the enforcement point saw, normalised.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub host: &'a Host,
    /// Destination port; `None` for DNS.
    pub port: Option<u16>,
    /// Source address; `None` when unknown (`explain` without `--client`).
    pub client: Option<IpAddr>,
    /// Plain-HTTP method; `None` for CONNECT, TLS and DNS.
    pub method: Option<&'a str>,
    /// Declared request body length, when known up front.
    pub body_len: Option<u64>,
    pub surface: Surface,
}

/// The outcome: action, deciding rule (`None` = `default`) and reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub rule: Option<RuleId>,
    pub reason: Reason,
}

impl Decision {
    pub const MALFORMED: Decision = Decision::deny(None, Reason::Malformed);

    pub const fn deny(rule: Option<RuleId>, reason: Reason) -> Self {
        Decision { action: Action::Deny, rule, reason }
    }

    /// This decision turned into a deny for `reason`, keeping the deciding rule.
    pub const fn denied_for(self, reason: Reason) -> Self {
        Decision::deny(self.rule, reason)
    }
}

/// Limits the enforcement point applies after an allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_request_body: Option<u64>,
    pub max_upload_bytes: Option<u64>,
}

/// A compiled, immutable policy snapshot.
#[derive(Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    names: NameMatcher,
    /// `(net, rule)` for every rule's `cidrs`, most specific prefix first, then declaration order.
    cidr_rules: Vec<(IpNet, RuleId)>,
    guard: Guard,
    default: DefaultAction,
}

impl Policy {
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn rule(&self, id: RuleId) -> &Rule {
        &self.rules[id as usize]
    }

    /// The contract's `rule` field: the rule's name or `default`.
    pub fn rule_name(&self, id: Option<RuleId>) -> &str {
        id.map_or("default", |id| &self.rules[id as usize].name)
    }

    pub fn names(&self) -> &NameMatcher {
        &self.names
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    pub fn default_action(&self) -> DefaultAction {
        self.default
    }

    /// Limits of the rule that allowed `decision` (none for `default`).
    pub fn limits(&self, decision: &Decision) -> Limits {
        match decision.rule {
            Some(id) if decision.action.permits() => {
                let r = &self.rules[id as usize];
                Limits { max_request_body: r.max_request_body, max_upload_bytes: r.max_upload_bytes }
            }
            _ => Limits::default(),
        }
    }

    /// Decides steps 2–4 of the contract's decision order. For an IP literal the guard is
    /// checked right after deny rules, so a refused literal reports `guard`.
    /// Normalisation (step 1) is the caller's: a malformed target is [`Decision::MALFORMED`].
    pub fn decide(&self, facts: &Facts<'_>) -> Decision {
        let (deny, allow) = match facts.host {
            Host::Name(name) => self.match_name(name.as_str(), facts),
            Host::Ip(ip) => self.match_ip(*ip, facts),
        };
        if let Some(rule) = deny {
            return Decision::deny(Some(rule), Reason::Rule);
        }
        // An IP literal the guard refuses is refused whatever rule would allow it.
        if let Host::Ip(ip) = facts.host {
            if !self.guard.permits(*ip) {
                return Decision::deny(allow, Reason::Guard);
            }
        }
        match allow {
            Some(id) => {
                let rule = &self.rules[id as usize];
                if !rule.port_allowed(facts.port) {
                    return Decision::deny(Some(id), Reason::Port);
                }
                if !rule.method_allowed(facts.method) {
                    return Decision::deny(Some(id), Reason::Method);
                }
                if let (Some(max), Some(len)) = (rule.max_request_body, facts.body_len) {
                    if len > max {
                        return Decision::deny(Some(id), Reason::BodyLimit);
                    }
                }
                Decision { action: rule.action, rule: Some(id), reason: Reason::Rule }
            }
            None => Decision { action: self.default.action(), rule: None, reason: Reason::Default },
        }
    }

    /// `(first matching deny rule, most specific applicable allow/alert rule)` for a name.
    fn match_name(&self, name: &str, facts: &Facts<'_>) -> (Option<RuleId>, Option<RuleId>) {
        let mut deny = None;
        let mut allow = None;
        self.names.visit(name, |id, _, _| {
            let rule = &self.rules[id as usize];
            if !rule.applies(facts.surface) || !rule.client_matches(facts.client) {
                return true;
            }
            if rule.action == Action::Deny {
                if rule.port_allowed(facts.port) {
                    deny = Some(id);
                    return false;
                }
            } else if allow.is_none() {
                allow = Some(id);
            }
            true
        });
        (deny, allow)
    }

    fn match_ip(&self, ip: IpAddr, facts: &Facts<'_>) -> (Option<RuleId>, Option<RuleId>) {
        let mut deny = None;
        let mut allow = None;
        for &(net, id) in &self.cidr_rules {
            if !net.contains(&ip) {
                continue;
            }
            let rule = &self.rules[id as usize];
            if !rule.applies(facts.surface) || !rule.client_matches(facts.client) {
                continue;
            }
            if rule.action == Action::Deny {
                if rule.port_allowed(facts.port) {
                    deny = Some(id);
                    break;
                }
            } else if allow.is_none() {
                allow = Some(id);
            }
        }
        (deny, allow)
    }
}

/// Assembles a [`Policy`]; the config loader feeds it rules and patterns as it reads them.
pub struct PolicyBuilder {
    rules: Vec<Rule>,
    names: NameMatcherBuilder,
    shared: Vec<(String, RuleId, RuleId)>,
    shared_count: usize,
}

impl Default for PolicyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// How many shared-name examples a build keeps for the lint.
const SHARED_EXAMPLES: usize = 20;

impl PolicyBuilder {
    pub fn new() -> Self {
        Self { rules: Vec::new(), names: NameMatcherBuilder::new(), shared: Vec::new(), shared_count: 0 }
    }

    /// Adds a rule (without patterns); returns its id.
    pub fn add_rule(&mut self, rule: Rule) -> RuleId {
        let id = RuleId::try_from(self.rules.len()).expect("more than 2^32 rules");
        self.rules.push(rule);
        id
    }

    /// Adds a host pattern to rule `id`.
    pub fn add_pattern(&mut self, id: RuleId, pattern: &Pattern) {
        match self.names.insert(pattern, id) {
            matcher::Inserted::New => self.rules[id as usize].patterns += 1,
            matcher::Inserted::Repeat => {}
            matcher::Inserted::SharedWith(other) => {
                self.rules[id as usize].patterns += 1;
                self.shared_count += 1;
                if self.shared.len() < SHARED_EXAMPLES {
                    self.shared.push((pattern.to_string(), other, id));
                }
            }
        }
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub fn build(self, guard: Guard, default: DefaultAction) -> (Policy, SharedNames) {
        let mut cidr_rules: Vec<(IpNet, RuleId)> =
            self.rules.iter().enumerate().flat_map(|(i, r)| r.cidrs.iter().map(move |n| (*n, i as RuleId))).collect();
        cidr_rules.sort_by(|a, b| b.0.prefix_len().cmp(&a.0.prefix_len()).then(a.1.cmp(&b.1)));
        let policy = Policy { rules: self.rules, names: self.names.build(), cidr_rules, guard, default };
        (policy, SharedNames { examples: self.shared, count: self.shared_count })
    }
}

/// Patterns listed by more than one rule (examples, and the total count).
#[derive(Clone, Debug, Default)]
pub struct SharedNames {
    pub examples: Vec<(String, RuleId, RuleId)>,
    pub count: usize,
}

/// Explains a guard verdict for humans.
pub fn describe_verdict(v: &Verdict) -> String {
    match v {
        Verdict::Permitted => "permitted by the guard".to_string(),
        Verdict::Refused { addr, range, what } => {
            format!("{addr} is inside guard range {range} ({what})")
        }
    }
}

#[cfg(test)]
mod tests;
