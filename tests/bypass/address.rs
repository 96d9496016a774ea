//! Address spellings: non-canonical IPv4 literals (decimal, octal, hex, short, mixed,
//! trailing dot), IPv4 embedded in IPv6 (mapped, compatible, NAT64, 6to4, Teredo), and names
//! that resolve to loopback through `[hosts]` or the upstream. `127.0.0.2` stands for the
//! denied name (no rule covers it), `127.0.0.3` is covered by the `literal` rule but not by
//! `guard.allow_cidrs`, so only the guard stands between a client and it.
//!
//! Forms that embed an address outside loopback (NAT64, 6to4, Teredo) are sent only because
//! egressd must refuse them before dialling: those cases require a 403 (a 502/504 would mean
//! a dial was attempted) and `egressd explain` to say deny.
//!
//! The proxy holds CNAME targets to the policy as the DNS firewall does (`inspect_cnames`), so a
//! chain from an allowed name to a denied one is refused with reason `cname`.

use crate::Expect;

/// Sends `GET http://{host}:P/` (an address the `literal` rule covers) and requires the
/// guard's 403 (a 502/504 would mean a dial was attempted) with nothing reaching anything;
/// `explain` must agree.
async fn denied_without_dial(fx: &mut crate::Fixture, host: &str) {
    let p = fx.port;
    let ex = fx.http(format!("GET http://{host}:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    assert_eq!(ex.responses[0].deny_field("reason"), "guard", "[{}] {ex:?}", fx.name);
    fx.assert_explain_denies(&format!("http://{host}:{p}/"));
    fx.verdict(Expect::NOTHING).await;
}

// ----- non-canonical IPv4 for the guard-denied 127.0.0.3 ---------------------------------------

refused!(decimal_guarded, "GET http://2130706435:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(octal_guarded, "GET http://0177.0.0.3:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(hex_octets_guarded, "GET http://0x7f.0x0.0x0.0x3:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(hex_whole_guarded, "GET http://0x7f000003:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(short_two_parts_guarded, "GET http://127.3:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(short_three_parts_guarded, "GET http://127.0.3:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(mixed_radix_guarded, "GET http://0177.0x0.03:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(trailing_dot_guarded, "GET http://127.0.0.3.:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(leading_zeros_guarded, "GET http://127.000.000.003:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(bracketed_ipv4_guarded, "GET http://[127.0.0.3]:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

// ----- non-canonical IPv4 for 127.0.0.2 (the denied origin; no rule covers it) -----------------

refused!(decimal_denied_origin, "GET http://2130706434:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(octal_denied_origin, "GET http://0177.0.0.02:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(trailing_dot_denied_origin, "GET http://127.0.0.2.:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

// ----- canonical literals ---------------------------------------------------------------------

case!(canonical_guarded_literal_refused_by_guard, |fx| {
    // The `literal` rule covers 127.0.0.3; the guard still applies (contract step 5).
    let p = fx.port;
    let ex = fx.http(format!("GET http://127.0.0.3:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    assert_eq!(ex.responses[0].deny_field("reason"), "guard", "{ex:?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(canonical_denied_origin_literal, |fx| {
    let p = fx.port;
    let ex = fx.http(format!("GET http://127.0.0.2:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    fx.verdict(Expect::NOTHING).await;
});

case!(zero_address_reaches_nothing, |fx| {
    // Linux connects 0.0.0.0 to the local host.
    denied_without_dial(&mut fx, "0.0.0.0").await;
});

refused!(decimal_zero_address, "GET http://0:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

// ----- IPv4 embedded in IPv6 ------------------------------------------------------------------

case!(mapped_guarded, |fx| {
    denied_without_dial(&mut fx, "[::ffff:127.0.0.3]").await;
});

case!(mapped_hex_guarded, |fx| {
    denied_without_dial(&mut fx, "[::ffff:7f00:3]").await;
});

case!(mapped_denied_origin, |fx| {
    // 127.0.0.2 is an allow hole of the guard; its mapped form must not slip past the policy.
    denied_without_dial(&mut fx, "[::ffff:127.0.0.2]").await;
});

case!(compatible_guarded, |fx| {
    denied_without_dial(&mut fx, "[::7f00:3]").await;
});

// Not the canonical (RFC 5952 / std) spelling of ::7f00:3: malformed.
refused!(compatible_dotted_guarded, "GET http://[::127.0.0.3]:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

case!(siit_translated_guarded, |fx| {
    denied_without_dial(&mut fx, "[::ffff:0:7f00:3]").await;
});

case!(nat64_guarded, |fx| {
    denied_without_dial(&mut fx, "[64:ff9b::7f00:3]").await;
});

case!(nat64_metadata, |fx| {
    denied_without_dial(&mut fx, "[64:ff9b::a9fe:a9fe]").await;
});

case!(nat64_local_use_guarded, |fx| {
    denied_without_dial(&mut fx, "[64:ff9b:1::7f00:3]").await;
});

case!(sixtofour_guarded, |fx| {
    denied_without_dial(&mut fx, "[2002:7f00:3::1]").await;
});

case!(teredo_client_guarded, |fx| {
    // Teredo: client 127.0.0.3 stored as its complement in the last 32 bits.
    denied_without_dial(&mut fx, "[2001:0:4136:e378:8000:63bf:80ff:fffc]").await;
});

case!(ipv6_loopback_literal, |fx| {
    // `::1` is covered by the `literal` rule; the guard refuses it (recorder on [::1]:P).
    let p = fx.port;
    let ex = fx.http(format!("GET http://[::1]:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    fx.verdict(Expect::NOTHING).await;
});

refused!(ipv6_loopback_uncompressed, "GET http://[0:0:0:0:0:0:0:1]:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(ipv6_unbracketed, "GET http://::1:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

case!(connect_mapped_guarded, |fx| {
    let t = fx.tunnel(&format!("[::ffff:127.0.0.3]:{}", fx.port), &[], std::time::Duration::ZERO).await;
    assert_eq!(t.status, Some(403), "{t:?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(connect_decimal_guarded, |fx| {
    let t = fx.tunnel(&format!("2130706435:{}", fx.port), &[], std::time::Duration::ZERO).await;
    t.assert_refused(fx.name);
    fx.verdict(Expect::NOTHING).await;
});

// ----- localhost and names that resolve to loopback -------------------------------------------

refused!(localhost_name, "GET http://localhost:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(localhost_trailing_dot_upper, "GET http://LOCALHOST.:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(localhost_subdomain, "GET http://denied.localhost:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

case!(hosts_entry_on_guarded_address, |fx| {
    // An allowed name that [hosts] maps to 127.0.0.3.
    let p = fx.port;
    let ex = fx.http(format!("GET http://guarded.allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    assert_eq!(ex.responses[0].deny_field("reason"), "guard", "{ex:?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(hosts_entry_on_ipv6_loopback, |fx| {
    let p = fx.port;
    let ex = fx.http(format!("GET http://loop6.allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    fx.verdict(Expect::NOTHING).await;
});

case!(upstream_answers_guarded_address, |fx| {
    // DNS rebinding to loopback: the allowed name's A record is 127.0.0.3.
    let p = fx.port;
    let ex = fx.http(format!("GET http://rebind.allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    fx.verdict(Expect::upstream(&["rebind.allowed.test"])).await;
});

case!(upstream_answers_ipv6_loopback, |fx| {
    let p = fx.port;
    let ex = fx.http(format!("GET http://v6loop.allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    fx.verdict(Expect::upstream(&["v6loop.allowed.test"])).await;
});

case!(upstream_answers_zero_address, |fx| {
    let p = fx.port;
    let ex = fx.http(format!("GET http://zero.allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    fx.verdict(Expect::upstream(&["zero.allowed.test"])).await;
});

/// An allowed name whose only address (from the upstream) embeds 127.0.0.3.
async fn embedded_answer(fx: &mut crate::Fixture, name: &'static str) {
    let p = fx.port;
    let ex = fx.http(format!("GET http://{name}:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    assert_eq!(ex.responses[0].deny_field("reason"), "guard", "[{}] {ex:?}", fx.name);
    fx.verdict(Expect::upstream(&[name])).await;
}

case!(upstream_answers_mapped_guarded, |fx| {
    embedded_answer(&mut fx, "mapped.allowed.test").await;
});

case!(upstream_answers_compatible_guarded, |fx| {
    embedded_answer(&mut fx, "compat.allowed.test").await;
});

case!(upstream_answers_nat64_guarded, |fx| {
    embedded_answer(&mut fx, "nat64.allowed.test").await;
});

case!(upstream_answers_sixtofour_guarded, |fx| {
    embedded_answer(&mut fx, "sixtofour.allowed.test").await;
});

case!(upstream_answers_teredo_guarded, |fx| {
    embedded_answer(&mut fx, "teredo.allowed.test").await;
});

case!(upstream_answers_metadata_address, |fx| {
    embedded_answer(&mut fx, "meta.allowed.test").await;
});

case!(upstream_answers_allowed_and_guarded, |fx| {
    // One address passes the guard, one does not: only the one that passed may be dialled.
    let p = fx.port;
    let ex = fx.http(format!("GET http://mixed.allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    assert_eq!(ex.statuses(), vec![200], "{ex:?}");
    fx.verdict(Expect { upstream: &["mixed.allowed.test"], ..Expect::ALLOWED_TRAFFIC }).await;
});

case!(proxy_cname_chain_to_denied_name, |fx| {
    // chain0.allowed.test -> ... -> chain9.allowed.test -> www.denied.test (A 127.0.0.2). The DNS
    // firewall blocks this name (dns::dns_cname_chain_of_ten_to_denied); the proxy should too.
    let p = fx.port;
    let ex = fx.http(format!("GET http://chain0.allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_refused(fx.name);
    fx.verdict(Expect::upstream(&["chain0.allowed.test"])).await;
});
