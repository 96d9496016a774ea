//! Table-driven tests of the decision order (DESIGN.md "Names" and "Decision order").

use std::net::IpAddr;

use super::guard::{CidrSet, Guard};
use super::name::{Host, normalize_host, parse_pattern};
use super::*;

/// A rule for tests: `hosts` patterns plus optional settings.
struct R {
    name: &'static str,
    action: Action,
    hosts: &'static [&'static str],
    ports: Option<&'static [u16]>,
    clients: &'static [&'static str],
    methods: Option<&'static [&'static str]>,
    cidrs: &'static [&'static str],
    body: Option<u64>,
    dns: bool,
    proxy: bool,
}

const fn r(name: &'static str, action: Action, hosts: &'static [&'static str]) -> R {
    R { name, action, hosts, ports: None, clients: &[], methods: None, cidrs: &[], body: None, dns: true, proxy: true }
}

fn build(rules: Vec<R>, default: DefaultAction) -> Policy {
    let mut b = PolicyBuilder::new();
    for x in rules {
        let ports = match (x.ports, x.action) {
            (Some(p), _) => Some(p.to_vec().into_boxed_slice()),
            (None, Action::Deny) => None,
            (None, _) => Some(vec![80, 443].into_boxed_slice()),
        };
        let id = b.add_rule(Rule {
            name: x.name.into(),
            action: x.action,
            ports,
            clients: CidrSet::new(x.clients.iter().map(|c| c.parse().unwrap())),
            methods: x.methods.map(|m| m.iter().map(|s| Box::<str>::from(*s)).collect()),
            max_request_body: x.body,
            max_upload_bytes: None,
            proxy: x.proxy,
            dns: x.dns,
            cidrs: x.cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            origin: Origin::default(),
            patterns: 0,
        });
        for h in x.hosts {
            b.add_pattern(id, &parse_pattern(h).unwrap());
        }
    }
    let guard = Guard::special_purpose(Vec::new());
    b.build(guard, default).0
}

/// Decides a raw host the way an enforcement point does: normalise, then decide.
fn decide(
    p: &Policy,
    raw: &str,
    port: Option<u16>,
    client: Option<&str>,
    method: Option<&str>,
) -> (Action, String, Reason) {
    let Ok(host) = normalize_host(raw) else {
        return (Action::Deny, "default".into(), Reason::Malformed);
    };
    let client: Option<IpAddr> = client.map(|c| c.parse().unwrap());
    let d = p.decide(&Facts { host: &host, port, client, method, body_len: None, surface: Surface::Proxy });
    (d.action, p.rule_name(d.rule).to_string(), d.reason)
}

fn demo() -> Policy {
    build(
        vec![
            r("org-apex", Action::Allow, &["example.org"]),
            r("org-wild", Action::Allow, &["*.example.org"]),
            r("api-exact", Action::Allow, &["api.svc.example.org"]),
            R { ports: Some(&[443]), ..r("svc-tls", Action::Allow, &["*.svc.example.org"]) },
            r("dot-form", Action::Allow, &[".corp.example.net"]),
            r("paste", Action::Deny, &["*.paste.example.org", "paste.example.org"]),
            R { methods: Some(&["GET", "HEAD"]), ..r("ro", Action::Allow, &["ro.example.com"]) },
            R { clients: &["10.1.0.0/16"], ..r("lab-only", Action::Allow, &["lab.example.com"]) },
            r("watch", Action::Alert, &["watched.example.com"]),
            R {
                cidrs: &["52.94.0.0/16", "169.254.169.254/32", "8.8.8.0/24", "64:ff9b::/96"],
                ..r("ip-rule", Action::Allow, &[])
            },
            r("idn", Action::Allow, &["bücher.example"]),
        ],
        DefaultAction::Deny,
    )
}

macro_rules! cases {
    ($($name:ident: $host:expr, $port:expr, $client:expr, $method:expr => ($action:ident, $rule:expr, $reason:ident);)*) => {
        $(
            #[test]
            fn $name() {
                let p = demo();
                let got = decide(&p, $host, $port, $client, $method);
                assert_eq!(got, (Action::$action, $rule.to_string(), Reason::$reason), "host {:?}", $host);
            }
        )*
    };
}

cases! {
    exact_apex_allowed: "example.org", Some(443), None, None => (Allow, "org-apex", Rule);
    wildcard_allows_subdomain: "www.example.org", Some(443), None, None => (Allow, "org-wild", Rule);
    wildcard_allows_any_depth: "a.b.c.example.org", Some(80), None, None => (Allow, "org-wild", Rule);
    wildcard_does_not_cover_lookalike: "badexample.org", Some(443), None, None => (Deny, "default", Default);
    wildcard_does_not_cover_suffix_attack: "example.org.evil.net", Some(443), None, None => (Deny, "default", Default);
    trailing_dot_is_the_same_name: "www.example.org.", Some(443), None, None => (Allow, "org-wild", Rule);
    two_trailing_dots_malformed: "www.example.org..", Some(443), None, None => (Deny, "default", Malformed);
    mixed_case_is_the_same_name: "WwW.ExAmPlE.OrG", Some(443), None, None => (Allow, "org-wild", Rule);
    idn_pattern_and_ulabel_query: "bücher.example", Some(443), None, None => (Allow, "idn", Rule);
    idn_alabel_query: "xn--bcher-kva.example", Some(443), None, None => (Allow, "idn", Rule);
    fullwidth_dot_maps_or_refuses: "ｅｘａｍｐｌｅ．ｏｒｇ", Some(443), None, None => (Allow, "org-apex", Rule);
    exact_beats_wildcard: "api.svc.example.org", Some(80), None, None => (Allow, "api-exact", Rule);
    longest_wildcard_wins: "x.svc.example.org", Some(443), None, None => (Allow, "svc-tls", Rule);
    longest_wildcard_port_applies: "x.svc.example.org", Some(80), None, None => (Deny, "svc-tls", Port);
    dot_form_matches_apex: "corp.example.net", Some(443), None, None => (Allow, "dot-form", Rule);
    dot_form_matches_below: "a.corp.example.net", Some(443), None, None => (Allow, "dot-form", Rule);
    dot_form_not_lookalike: "xcorp.example.net", Some(443), None, None => (Deny, "default", Default);
    deny_wins_over_wildcard_allow: "paste.example.org", Some(443), None, None => (Deny, "paste", Rule);
    deny_wins_below: "x.paste.example.org", Some(443), None, None => (Deny, "paste", Rule);
    deny_applies_on_every_port: "paste.example.org", Some(8443), None, None => (Deny, "paste", Rule);
    port_outside_default_ports: "www.example.org", Some(8080), None, None => (Deny, "org-wild", Port);
    method_allowed: "ro.example.com", Some(80), None, Some("GET") => (Allow, "ro", Rule);
    method_refused: "ro.example.com", Some(80), None, Some("POST") => (Deny, "ro", Method);
    method_case_insensitive: "ro.example.com", Some(80), None, Some("head") => (Allow, "ro", Rule);
    client_scoped_rule_for_its_client: "lab.example.com", Some(443), Some("10.1.2.3"), None => (Allow, "lab-only", Rule);
    client_scoped_rule_mapped_client: "lab.example.com", Some(443), Some("::ffff:10.1.2.3"), None => (Allow, "lab-only", Rule);
    client_scoped_rule_other_client: "lab.example.com", Some(443), Some("10.2.0.1"), None => (Deny, "default", Default);
    client_scoped_rule_unknown_client: "lab.example.com", Some(443), None, None => (Deny, "default", Default);
    alert_rule_permits_and_flags: "watched.example.com", Some(443), None, None => (Alert, "watch", Rule);
    unknown_name_default_deny: "unknown.example.com", Some(443), None, None => (Deny, "default", Default);
    ip_literal_via_cidrs: "52.94.1.7", Some(443), None, None => (Allow, "ip-rule", Rule);
    ip_literal_without_cidrs: "198.51.99.1", Some(443), None, None => (Deny, "default", Default);
    ip_literal_guard_beats_cidrs: "169.254.169.254", Some(80), None, None => (Deny, "ip-rule", Guard);
    ip_literal_decimal_malformed: "2130706433", Some(443), None, None => (Deny, "default", Malformed);
    ip_literal_octal_malformed: "0177.0.0.1", Some(443), None, None => (Deny, "default", Malformed);
    ip_literal_hex_malformed: "0x7f.1", Some(443), None, None => (Deny, "default", Malformed);
    ip_literal_short_malformed: "127.1", Some(443), None, None => (Deny, "default", Malformed);
    ip_literal_five_parts_malformed: "1.2.3.4.5", Some(443), None, None => (Deny, "default", Malformed);
    ip_literal_leading_zero_malformed: "8.8.8.08", Some(443), None, None => (Deny, "default", Malformed);
    mapped_ipv6_of_metadata_refused: "[::ffff:169.254.169.254]", Some(80), None, None => (Deny, "default", Guard);
    mapped_ipv6_hex_of_metadata_refused: "[::ffff:a9fe:a9fe]", Some(80), None, None => (Deny, "default", Guard);
    loopback_literal_refused_by_guard: "127.0.0.1", Some(80), None, None => (Deny, "default", Guard);
    nat64_of_public_via_cidrs: "[64:ff9b::808:808]", Some(443), None, None => (Allow, "ip-rule", Rule);
    nat64_of_metadata_refused: "[64:ff9b::a9fe:a9fe]", Some(80), None, None => (Deny, "ip-rule", Guard);
    empty_label_malformed: "www..example.org", Some(443), None, None => (Deny, "default", Malformed);
    space_malformed: "www.example.org ", Some(443), None, None => (Deny, "default", Malformed);
    percent_malformed: "www%2eexample.org", Some(443), None, None => (Deny, "default", Malformed);
    backslash_malformed: "evil.net\\.example.org", Some(443), None, None => (Deny, "default", Malformed);
    at_sign_malformed: "example.org@evil.net", Some(443), None, None => (Deny, "default", Malformed);
    nul_malformed: "example.org\0.evil.net", Some(443), None, None => (Deny, "default", Malformed);
    zone_id_malformed: "[fe80::1%25eth0]", Some(443), None, None => (Deny, "default", Malformed);
}

#[test]
fn ties_go_to_the_rule_declared_first() {
    let p = build(
        vec![
            r("first", Action::Allow, &["*.example.org"]),
            R { ports: Some(&[8443]), ..r("second", Action::Allow, &["*.example.org"]) },
        ],
        DefaultAction::Deny,
    );
    assert_eq!(decide(&p, "a.example.org", Some(443), None, None), (Action::Allow, "first".into(), Reason::Rule));
}

#[test]
fn most_specific_allow_decides_even_if_less_specific_would_permit_port() {
    let p = build(
        vec![
            r("broad", Action::Allow, &["*.example.org"]),
            R { ports: Some(&[443]), ..r("narrow", Action::Allow, &["x.example.org"]) },
        ],
        DefaultAction::Deny,
    );
    assert_eq!(decide(&p, "x.example.org", Some(80), None, None), (Action::Deny, "narrow".into(), Reason::Port));
}

#[test]
fn client_scoped_deny_applies_only_to_its_clients() {
    let p = build(
        vec![
            r("all", Action::Allow, &["*.example.org"]),
            R { clients: &["10.9.0.0/16"], ..r("block-lab", Action::Deny, &["x.example.org"]) },
        ],
        DefaultAction::Deny,
    );
    assert_eq!(
        decide(&p, "x.example.org", Some(443), Some("10.9.1.1"), None),
        (Action::Deny, "block-lab".into(), Reason::Rule)
    );
    assert_eq!(
        decide(&p, "x.example.org", Some(443), Some("10.8.1.1"), None),
        (Action::Allow, "all".into(), Reason::Rule)
    );
    // Unknown client: conservative, the deny applies.
    assert_eq!(decide(&p, "x.example.org", Some(443), None, None), (Action::Deny, "block-lab".into(), Reason::Rule));
}

#[test]
fn deny_rule_with_explicit_ports_only_denies_those() {
    let p =
        build(vec![R { ports: Some(&[80]), ..r("no-http", Action::Deny, &["x.example.org"]) }], DefaultAction::Allow);
    assert_eq!(decide(&p, "x.example.org", Some(80), None, None), (Action::Deny, "no-http".into(), Reason::Rule));
    assert_eq!(decide(&p, "x.example.org", Some(443), None, None), (Action::Allow, "default".into(), Reason::Default));
}

#[test]
fn default_allow_and_alert_modes() {
    let p = build(vec![r("paste", Action::Deny, &["paste.example"])], DefaultAction::Allow);
    assert_eq!(decide(&p, "other.example", Some(443), None, None), (Action::Allow, "default".into(), Reason::Default));
    assert_eq!(decide(&p, "paste.example", Some(443), None, None), (Action::Deny, "paste".into(), Reason::Rule));
    // Denylist mode still refuses guard addresses given as literals.
    assert_eq!(decide(&p, "127.0.0.1", Some(80), None, None), (Action::Deny, "default".into(), Reason::Guard));
    let p = build(vec![r("x", Action::Allow, &["x.example"])], DefaultAction::Alert);
    assert_eq!(decide(&p, "other.example", Some(443), None, None), (Action::Alert, "default".into(), Reason::Default));
}

#[test]
fn any_pattern_matches_every_name_least_specifically() {
    let p = build(
        vec![
            R { clients: &["10.0.0.5/32"], ..r("admin-any", Action::Allow, &["*"]) },
            R { ports: Some(&[443]), ..r("org", Action::Allow, &["*.example.org"]) },
        ],
        DefaultAction::Deny,
    );
    assert_eq!(
        decide(&p, "anything.net", Some(443), Some("10.0.0.5"), None),
        (Action::Allow, "admin-any".into(), Reason::Rule)
    );
    assert_eq!(
        decide(&p, "a.example.org", Some(80), Some("10.0.0.5"), None),
        (Action::Deny, "org".into(), Reason::Port)
    );
    assert_eq!(
        decide(&p, "anything.net", Some(443), Some("10.0.0.6"), None),
        (Action::Deny, "default".into(), Reason::Default)
    );
}

#[test]
fn applies_to_limits_the_surface() {
    let p = build(vec![R { dns: false, ..r("proxy-only", Action::Allow, &["p.example"]) }], DefaultAction::Deny);
    let host = Host::Name(name::normalize_name("p.example").unwrap());
    let facts = |surface| Facts { host: &host, port: None, client: None, method: None, body_len: None, surface };
    assert_eq!(p.decide(&facts(Surface::Proxy)).action, Action::Allow);
    assert_eq!(p.decide(&facts(Surface::Dns)), Decision::deny(None, Reason::Default));
}

#[test]
fn body_limit_from_declared_length() {
    let p = build(vec![R { body: Some(100), ..r("small", Action::Allow, &["up.example"]) }], DefaultAction::Deny);
    let host = normalize_host("up.example").unwrap();
    let mut f = Facts {
        host: &host,
        port: Some(80),
        client: None,
        method: Some("POST"),
        body_len: Some(100),
        surface: Surface::Proxy,
    };
    assert_eq!(p.decide(&f).action, Action::Allow);
    f.body_len = Some(101);
    let d = p.decide(&f);
    assert_eq!((d.action, p.rule_name(d.rule), d.reason), (Action::Deny, "small", Reason::BodyLimit));
    assert_eq!(p.limits(&p.decide(&Facts { body_len: None, ..f })).max_request_body, Some(100));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decide_never_panics(host in ".{0,80}", port in proptest::option::of(any::<u16>()), client in proptest::option::of(any::<u32>()), method in proptest::option::of("[A-Za-z]{0,8}")) {
            let p = demo();
            let client = client.map(|c| IpAddr::from(c.to_be_bytes()));
            if let Ok(h) = normalize_host(&host) {
                let _ = p.decide(&Facts { host: &h, port, client, method: method.as_deref(), body_len: None, surface: Surface::Proxy });
                let _ = p.decide(&Facts { host: &h, port: None, client, method: None, body_len: None, surface: Surface::Dns });
            }
        }

        #[test]
        fn matcher_agrees_with_naive_reference(labels in proptest::collection::vec("[a-c]{1,2}", 1..5)) {
            // Rules over a tiny alphabet so random names often hit them.
            let pats = ["a.b", "*.b", ".c.a", "*.a.a", "b", "*"];
            let p = build(pats.iter().enumerate().map(|(i, s)| {
                let name: &'static str = Box::leak(format!("r{i}").into_boxed_str());
                let hosts: &'static [&'static str] = Box::leak(vec![*s].into_boxed_slice());
                r(name, Action::Allow, hosts)
            }).collect(), DefaultAction::Deny);
            let name = labels.join(".");
            let n = name::normalize_name(&name).unwrap();
            let mut got = Vec::new();
            p.names().visit(n.as_str(), |id, _, _| { got.push(id); true });
            got.sort_unstable();
            let want: Vec<RuleId> = pats.iter().enumerate()
                .filter(|(_, s)| parse_pattern(s).unwrap().matches(&n))
                .map(|(i, _)| i as RuleId).collect();
            prop_assert_eq!(got, want);
        }
    }
}
