//! The DNS firewall: wire-form tricks (dots and NULs inside labels, 0x20 case, over-long names
//! and labels, compression pointers, several questions), query types (ANY, TXT, NULL, iodine's
//! private type), `_acme` and `xn--` labels, answers that lead somewhere forbidden (a chain of
//! ten CNAMEs from an allowed name to a denied one, private and loopback addresses in every
//! IPv6 embedding), and tunnel-shaped query streams under the allowed wildcard
//! `*.tunnel.test` (iodine, dnscat2 and DNSExfiltrator shapes, generated here). A forbidden
//! name must never reach the upstream; a forbidden answer must never reach the client.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::wire::{self, A, AAAA, ANY, AXFR, CNAME, HTTPS, MX, NULL, PRIVATE, TXT, dns_query, header, labels};
use crate::{Expect, Fixture};

const NXDOMAIN: u8 = 3;
const FORMERR: u8 = 1;

/// Sends `packet` over UDP; there must be no reply or a non-NOERROR one without answers.
async fn refused_packet(fx: &mut Fixture, packet: &[u8]) {
    if let Some(reply) = fx.dns_udp(packet).await {
        assert!(
            wire::rcode(&reply) != 0 || wire::ancount(&reply) == 0,
            "[{}] a forbidden query was answered: {reply:02x?}",
            fx.name
        );
        assert!(wire::reply_addresses(&reply).is_empty(), "[{}] {reply:02x?}", fx.name);
    }
    fx.verdict(Expect::NOTHING).await;
}

/// `name`/`qtype` must get the blocked response (NXDOMAIN) and never reach the upstream.
async fn blocked_name(fx: &mut Fixture, name: &str, qtype: u16) {
    let reply = fx.dns_udp(&dns_query(0x1111, &labels(name), qtype)).await;
    let reply = reply.unwrap_or_else(|| panic!("[{}] no reply for {name}", fx.name));
    assert_eq!(wire::rcode(&reply), NXDOMAIN, "[{}] {name}/{qtype}: {reply:02x?}", fx.name);
    fx.verdict(Expect::NOTHING).await;
}

/// An allowed name whose answer holds a forbidden address: blocked, the address withheld.
async fn answer_withheld(fx: &mut Fixture, name: &'static str, qtype: u16, addr: &str) {
    let reply = fx.dns_udp(&wire::dns_query_edns(0x2222, &labels(name), qtype, false)).await;
    let reply = reply.unwrap_or_else(|| panic!("[{}] no reply for {name}", fx.name));
    let forbidden: IpAddr = addr.parse().unwrap();
    assert!(!wire::reply_addresses(&reply).contains(&forbidden), "[{}] {addr} reached the client", fx.name);
    assert_eq!(wire::rcode(&reply), NXDOMAIN, "[{}] {name}: {reply:02x?}", fx.name);
    fx.verdict(Expect::upstream(&[name])).await;
}

// ----- names: case, NUL, dots and bytes inside labels ------------------------------------------

case!(dns_denied_name_never_forwarded, |fx| {
    blocked_name(&mut fx, "x.denied.test", A).await;
});

case!(dns_unlisted_name_never_forwarded, |fx| {
    blocked_name(&mut fx, "exfil.test", A).await;
});

case!(dns_localhost_never_forwarded, |fx| {
    blocked_name(&mut fx, "localhost", A).await;
});

case!(dns_root_name, |fx| {
    refused_packet(&mut fx, &dns_query(0x0101, &[], A)).await;
});

case!(dns_0x20_mixed_case_denied, |fx| {
    blocked_name(&mut fx, "X.DeNiEd.TeSt", A).await;
});

case!(dns_0x20_mixed_case_allowed_is_one_name, |fx| {
    // Contract: names are lowercased before matching; the answer is the allowed name's.
    let reply = fx.dns_udp(&dns_query(0x3333, &labels("Up.AlLoWeD.tEsT"), A)).await.expect("reply");
    assert_eq!(wire::rcode(&reply), 0, "{reply:02x?}");
    assert_eq!(wire::reply_addresses(&reply), vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
    fx.verdict(Expect::upstream(&["up.allowed.test"])).await;
});

case!(dns_nul_inside_label, |fx| {
    // `x.allowed.test\000.exfil.net`: a C string ends at the NUL, the wire name does not.
    let l: [&[u8]; 5] = [b"x", b"allowed", b"test\0", b"exfil", b"net"];
    refused_packet(&mut fx, &dns_query(1, &l, A)).await;
});

case!(dns_escaped_dot_inside_label, |fx| {
    // `exfil\.allowed.test`: one label "exfil.allowed" under the TLD "test".
    let l: [&[u8]; 2] = [b"exfil.allowed", b"test"];
    refused_packet(&mut fx, &dns_query(2, &l, A)).await;
});

case!(dns_dot_inside_label_below_allowed, |fx| {
    let l: [&[u8]; 3] = [b"secret.denied", b"allowed", b"test"];
    refused_packet(&mut fx, &dns_query(3, &l, A)).await;
});

case!(dns_backslash_inside_label, |fx| {
    let l: [&[u8]; 3] = [b"x\\", b"allowed", b"test"];
    refused_packet(&mut fx, &dns_query(4, &l, A)).await;
});

case!(dns_space_inside_label, |fx| {
    let l: [&[u8]; 3] = [b"x denied", b"allowed", b"test"];
    refused_packet(&mut fx, &dns_query(5, &l, A)).await;
});

case!(dns_high_bytes_inside_label, |fx| {
    let l: [&[u8]; 3] = ["d\u{e9}nied".as_bytes(), b"allowed", b"test"];
    refused_packet(&mut fx, &dns_query(6, &l, A)).await;
});

// ----- lengths --------------------------------------------------------------------------------

case!(dns_name_over_255_octets, |fx| {
    let long = [b'a'; 63];
    let l: [&[u8]; 6] = [&long, &long, &long, &long, b"allowed", b"test"];
    refused_packet(&mut fx, &dns_query(7, &l, A)).await;
});

case!(dns_name_of_253_below_allowed_wildcard, |fx| {
    // Valid syntax (253 octets), but a tunnel's length: blocked before the upstream.
    let (a, b, c, d) = ([b'a'; 63], [b'b'; 63], [b'c'; 63], [b'd'; 48]);
    let l: [&[u8]; 6] = [&a, &b, &c, &d, b"allowed", b"test"];
    let name_len: usize = l.iter().map(|x| x.len()).sum::<usize>() + l.len() - 1;
    assert_eq!(name_len, 253);
    let reply = fx.dns_udp(&dns_query(8, &l, A)).await.expect("reply");
    assert_ne!(wire::rcode(&reply), 0, "{reply:02x?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(dns_label_of_64_octets, |fx| {
    let long = [b'a'; 64];
    let l: [&[u8]; 3] = [&long, b"allowed", b"test"];
    refused_packet(&mut fx, &dns_query(9, &l, A)).await;
});

case!(dns_reserved_label_type, |fx| {
    // Length byte 0x80 (reserved label type) in front of a denied name.
    let mut p = header(10, 0x0100, 1, 0, 0, 0);
    p.extend_from_slice(&[0x80, b'x']);
    p.extend_from_slice(&wire::qname(&labels("denied.test")));
    p.extend_from_slice(&[0, 1, 0, 1]);
    refused_packet(&mut fx, &p).await;
});

// ----- compression pointers and sections -------------------------------------------------------

case!(dns_compression_pointer_to_itself, |fx| {
    let mut p = header(11, 0x0100, 1, 0, 0, 0);
    p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    refused_packet(&mut fx, &p).await;
});

case!(dns_compression_pointer_loop_of_two, |fx| {
    let mut p = header(12, 0x0100, 1, 0, 0, 0);
    // offset 12: "x" then a pointer to 16; offset 16: "y" then a pointer back to 12.
    p.extend_from_slice(&[1, b'x', 0xc0, 16, 1, b'y', 0xc0, 12, 0, 1, 0, 1]);
    refused_packet(&mut fx, &p).await;
});

case!(dns_compression_pointer_beyond_packet, |fx| {
    let mut p = header(13, 0x0100, 1, 0, 0, 0);
    p.extend_from_slice(&[5, b'e', b'x', b'f', b'i', b'l', 0xc3, 0xff, 0, 1, 0, 1]);
    refused_packet(&mut fx, &p).await;
});

case!(dns_compression_pointer_into_header, |fx| {
    let mut p = header(0x0464, 0x0100, 1, 0, 0, 0); // id bytes 0x04 'd'
    p.extend_from_slice(&[0xc0, 0, 0, 1, 0, 1]);
    refused_packet(&mut fx, &p).await;
});

case!(dns_compression_forward_pointer_to_denied, |fx| {
    // The question is "x" + a pointer to "denied.test" placed after the question.
    let mut p = header(14, 0x0100, 1, 0, 0, 0);
    let target = 12 + 4 + 4;
    p.extend_from_slice(&[1, b'x', 0xc0, target as u8, 0, 1, 0, 1]);
    p.extend_from_slice(&wire::qname(&labels("denied.test")));
    refused_packet(&mut fx, &p).await;
});

case!(dns_two_questions_allowed_and_denied, |fx| {
    let mut p = header(15, 0x0100, 2, 0, 0, 0);
    for name in ["up.allowed.test", "x.denied.test"] {
        p.extend_from_slice(&wire::qname(&labels(name)));
        p.extend_from_slice(&[0, 1, 0, 1]);
    }
    let reply = fx.dns_udp(&p).await;
    if let Some(r) = &reply {
        assert_eq!(wire::rcode(r), FORMERR, "{r:02x?}");
    }
    fx.verdict(Expect::NOTHING).await;
});

case!(dns_second_question_behind_qdcount_one, |fx| {
    // QDCOUNT says one; a second (denied) question trails it.
    let mut p = dns_query(16, &labels("up.allowed.test"), A);
    p.extend_from_slice(&wire::qname(&labels("x.denied.test")));
    p.extend_from_slice(&[0, 1, 0, 1]);
    let _ = fx.dns_udp(&p).await;
    fx.verdict(Expect::upstream(&["up.allowed.test"])).await;
});

case!(dns_zero_questions, |fx| {
    let p = header(17, 0x0100, 0, 0, 0, 0);
    refused_packet(&mut fx, &p).await;
});

case!(dns_query_carrying_an_answer_record, |fx| {
    // An answer section naming the denied host rides along with an allowed question.
    let mut p = header(18, 0x0100, 1, 1, 0, 0);
    p.extend_from_slice(&wire::qname(&labels("up.allowed.test")));
    p.extend_from_slice(&[0, 1, 0, 1]);
    p.extend_from_slice(&wire::qname(&labels("x.denied.test")));
    p.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 2]);
    refused_packet(&mut fx, &p).await;
});

case!(dns_truncated_question, |fx| {
    let mut p = header(19, 0x0100, 1, 0, 0, 0);
    p.extend_from_slice(&wire::qname(&labels("x.denied.test")));
    p.push(0); // half a qtype
    refused_packet(&mut fx, &p).await;
});

case!(dns_response_bit_set, |fx| {
    let p = wire::dns_query_flags(20, 0x8100, &labels("x.denied.test"), A, 1);
    let reply = fx.dns_udp(&p).await;
    assert!(reply.is_none(), "[{}] a response was answered: {reply:02x?}", fx.name);
    fx.verdict(Expect::NOTHING).await;
});

case!(dns_opcode_update, |fx| {
    refused_packet(&mut fx, &wire::dns_query_flags(21, 0x2800, &labels("x.denied.test"), A, 1)).await;
});

case!(dns_opcode_notify_allowed_name, |fx| {
    refused_packet(&mut fx, &wire::dns_query_flags(22, 0x2000, &labels("up.allowed.test"), A, 1)).await;
});

case!(dns_class_chaos, |fx| {
    refused_packet(&mut fx, &wire::dns_query_flags(23, 0x0100, &labels("version.bind"), TXT, 3)).await;
});

case!(dns_class_any_allowed_name, |fx| {
    refused_packet(&mut fx, &wire::dns_query_flags(24, 0x0100, &labels("up.allowed.test"), A, 255)).await;
});

case!(dns_tcp_denied_name, |fx| {
    let reply = fx.dns_tcp(&dns_query(25, &labels("x.denied.test"), A)).await.expect("TCP reply");
    assert_eq!(wire::rcode(&reply), NXDOMAIN);
    fx.verdict(Expect::NOTHING).await;
});

case!(dns_tcp_allowed_then_denied_in_one_segment, |fx| {
    // Two length-prefixed messages in one write: each is decided on its own.
    let mut out = Vec::new();
    for (id, name) in [(40u16, "up.allowed.test"), (41, "x.denied.test")] {
        let q = dns_query(id, &labels(name), A);
        out.extend_from_slice(&(q.len() as u16).to_be_bytes());
        out.extend_from_slice(&q);
    }
    let mut s = tokio::net::TcpStream::connect(fx.dns_addr()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, &out).await.unwrap();
    let mut replies = Vec::new();
    for _ in 0..2 {
        let read = async {
            let mut len = [0u8; 2];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut len).await.ok()?;
            let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut msg).await.ok()?;
            Some(msg)
        };
        if let Ok(Some(m)) = tokio::time::timeout(std::time::Duration::from_secs(2), read).await {
            replies.push(m);
        }
    }
    let denied = replies.iter().find(|r| r[..2] == 41u16.to_be_bytes()).expect("a reply to the denied query");
    assert_eq!(wire::rcode(denied), NXDOMAIN, "{denied:02x?}");
    fx.verdict(Expect::upstream(&["up.allowed.test"])).await;
});

case!(dns_edns_do_bit_denied_name, |fx| {
    let reply = fx.dns_udp(&wire::dns_query_edns(26, &labels("x.denied.test"), A, true)).await.expect("reply");
    assert_eq!(wire::rcode(&reply), NXDOMAIN);
    fx.verdict(Expect::NOTHING).await;
});

// ----- query types ----------------------------------------------------------------------------

case!(dns_qtype_any, |fx| {
    blocked_name(&mut fx, "up.allowed.test", ANY).await;
});

case!(dns_qtype_txt, |fx| {
    blocked_name(&mut fx, "up.allowed.test", TXT).await;
});

case!(dns_qtype_null, |fx| {
    blocked_name(&mut fx, "up.allowed.test", NULL).await;
});

case!(dns_qtype_private_iodine, |fx| {
    blocked_name(&mut fx, "t.tunnel.test", PRIVATE).await;
});

case!(dns_qtype_mx, |fx| {
    blocked_name(&mut fx, "up.allowed.test", MX).await;
});

case!(dns_qtype_axfr_over_tcp, |fx| {
    let reply = fx.dns_tcp(&dns_query(27, &labels("allowed.test"), AXFR)).await;
    if let Some(r) = &reply {
        assert!(wire::rcode(r) != 0 || wire::ancount(r) == 0, "{r:02x?}");
    }
    fx.verdict(Expect::NOTHING).await;
});

// ----- _acme and xn-- labels ------------------------------------------------------------------

case!(dns_acme_challenge_txt, |fx| {
    blocked_name(&mut fx, "_acme-challenge.allowed.test", TXT).await;
});

case!(dns_acme_challenge_on_denied_name, |fx| {
    blocked_name(&mut fx, "_acme-challenge.x.denied.test", A).await;
});

case!(dns_acme_challenge_address_is_a_name, |fx| {
    // Contract: `_` is a name character (SRV, ACME, DKIM); below the allowed wildcard it passes.
    let reply = fx.dns_udp(&dns_query(28, &labels("_acme-challenge.allowed.test"), A)).await.expect("reply");
    assert_eq!(wire::rcode(&reply), 0, "{reply:02x?}");
    fx.verdict(Expect::upstream(&["_acme-challenge.allowed.test"])).await;
});

case!(dns_noncanonical_ace_label, |fx| {
    // `xn--allowed-` decodes to `allowed`: not the canonical spelling of any name.
    let l: [&[u8]; 2] = [b"xn--allowed-", b"test"];
    refused_packet(&mut fx, &dns_query(29, &l, A)).await;
});

case!(dns_invalid_ace_label_below_allowed, |fx| {
    let l: [&[u8]; 3] = [b"xn--zz-not-punycode-99999", b"allowed", b"test"];
    refused_packet(&mut fx, &dns_query(30, &l, A)).await;
});

case!(dns_ace_label_below_denied, |fx| {
    blocked_name(&mut fx, "xn--bcher-kva.denied.test", A).await;
});

case!(dns_valid_ace_label_below_allowed, |fx| {
    // Contract: IDNA A-labels are names; bücher.allowed.test passes.
    let reply = fx.dns_udp(&dns_query(31, &labels("XN--BCHER-KVA.allowed.test"), A)).await.expect("reply");
    assert_eq!(wire::rcode(&reply), 0, "{reply:02x?}");
    fx.verdict(Expect::upstream(&["xn--bcher-kva.allowed.test"])).await;
});

// ----- answers --------------------------------------------------------------------------------

case!(dns_cname_chain_of_ten_to_denied, |fx| {
    let reply = fx.dns_udp(&wire::dns_query_edns(32, &labels("chain0.allowed.test"), A, false)).await.expect("reply");
    assert_eq!(wire::rcode(&reply), NXDOMAIN, "{reply:02x?}");
    assert!(wire::reply_addresses(&reply).is_empty(), "{reply:02x?}");
    let text = String::from_utf8_lossy(&reply).to_ascii_lowercase();
    assert!(!text.contains("\u{6}denied"), "the denied target reached the client: {reply:02x?}");
    fx.verdict(Expect::upstream(&["chain0.allowed.test"])).await;
});

case!(dns_qtype_cname_answer_naming_denied, |fx| {
    // The last link of the chain asked for directly: the CNAME record itself names denied.
    let reply =
        fx.dns_udp(&wire::dns_query_edns(35, &labels("chain9.allowed.test"), CNAME, false)).await.expect("reply");
    assert_eq!(wire::rcode(&reply), NXDOMAIN, "{reply:02x?}");
    assert!(
        !String::from_utf8_lossy(&reply).contains("\u{6}denied"),
        "the denied target reached the client: {reply:02x?}"
    );
    fx.verdict(Expect::upstream(&["chain9.allowed.test"])).await;
});

case!(dns_https_alias_to_denied, |fx| {
    // An HTTPS record in AliasMode whose target is the denied name.
    let reply =
        fx.dns_udp(&wire::dns_query_edns(36, &labels("alias.allowed.test"), HTTPS, false)).await.expect("reply");
    assert_eq!(wire::rcode(&reply), NXDOMAIN, "{reply:02x?}");
    assert!(
        !String::from_utf8_lossy(&reply).contains("\u{6}denied"),
        "the denied target reached the client: {reply:02x?}"
    );
    fx.verdict(Expect::upstream(&["alias.allowed.test"])).await;
});

case!(dns_answer_private_ipv4, |fx| {
    answer_withheld(&mut fx, "private.allowed.test", A, "10.0.0.5").await;
});

case!(dns_answer_loopback_ipv4, |fx| {
    answer_withheld(&mut fx, "rebind.allowed.test", A, "127.0.0.3").await;
});

case!(dns_answer_metadata_ipv4, |fx| {
    answer_withheld(&mut fx, "meta.allowed.test", A, "169.254.169.254").await;
});

case!(dns_answer_ipv6_loopback, |fx| {
    answer_withheld(&mut fx, "v6loop.allowed.test", AAAA, "::1").await;
});

case!(dns_answer_ipv6_metadata, |fx| {
    answer_withheld(&mut fx, "ula.allowed.test", AAAA, "fd00:ec2::254").await;
});

case!(dns_answer_mapped_loopback, |fx| {
    answer_withheld(&mut fx, "mapped.allowed.test", AAAA, "::ffff:127.0.0.3").await;
});

case!(dns_answer_nat64_metadata, |fx| {
    answer_withheld(&mut fx, "nat64meta.allowed.test", AAAA, "64:ff9b::a9fe:a9fe").await;
});

case!(dns_answer_sixtofour_loopback, |fx| {
    answer_withheld(&mut fx, "sixtofour.allowed.test", AAAA, "2002:7f00:3::1").await;
});

case!(dns_answer_teredo_loopback, |fx| {
    answer_withheld(&mut fx, "teredo.allowed.test", AAAA, "2001:0:4136:e378:8000:63bf:80ff:fffc").await;
});

case!(dns_answer_https_ipv4hint_loopback, |fx| {
    let reply = fx.dns_udp(&wire::dns_query_edns(33, &labels("hint.allowed.test"), HTTPS, false)).await.expect("reply");
    assert_eq!(wire::rcode(&reply), NXDOMAIN, "{reply:02x?}");
    assert!(!reply.windows(4).any(|w| w == [127, 0, 0, 3]), "the hint reached the client: {reply:02x?}");
    fx.verdict(Expect::upstream(&["hint.allowed.test"])).await;
});

case!(dns_hosts_entry_on_guarded_address, |fx| {
    let reply = fx.dns_udp(&dns_query(34, &labels("guarded.allowed.test"), A)).await.expect("reply");
    assert!(!wire::reply_addresses(&reply).contains(&"127.0.0.3".parse().unwrap()), "{reply:02x?}");
    fx.verdict(Expect::NOTHING).await;
});

// ----- tunnel-shaped streams under the allowed wildcard *.tunnel.test --------------------------

/// A small deterministic generator (xorshift64*), so every run sends the same stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn string(&mut self, alphabet: &[u8], len: usize) -> String {
        (0..len).map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize] as char).collect()
    }
}

const BASE32: &[u8] = b"abcdefghijklmnopqrstuvwxyz012345";
const HEX: &[u8] = b"0123456789abcdef";
const BASE64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Sends every (name, qtype) in order over one UDP socket and checks what reached the upstream:
/// no name longer than `max_name_length` (120), at most `info_budget` (4 KiB) of unique
/// subdomain bytes and at most `max_unique_subdomains` (300) unique subdomains of
/// `tunnel.test`, and only the query types the contract allows.
async fn stream(fx: &mut Fixture, queries: &[(String, u16)]) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 4096];
    for (i, (name, qtype)) in queries.iter().enumerate() {
        let q = dns_query(i as u16, &labels(name), *qtype);
        sock.send_to(&q, fx.dns_addr()).await.unwrap();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), sock.recv_from(&mut buf)).await;
    }
    tokio::time::sleep(crate::SETTLE).await;
    let seen = fx.up.seen();
    let mut unique = HashSet::new();
    let mut bytes = 0usize;
    for q in &seen {
        assert!(
            q.name.len() <= 120,
            "[{}] a {}-character name reached the upstream: {}",
            fx.name,
            q.name.len(),
            q.name
        );
        assert!(
            [wire::A, AAAA, CNAME, HTTPS, 64].contains(&q.qtype),
            "[{}] qtype {} reached the upstream",
            fx.name,
            q.qtype
        );
        let sub = q
            .name
            .strip_suffix(".tunnel.test")
            .unwrap_or_else(|| panic!("[{}] {:?} reached the upstream", fx.name, q.name));
        if unique.insert(sub.to_string()) {
            bytes += sub.len();
        }
    }
    assert!(bytes <= 4096, "[{}] {bytes} bytes of unique subdomains reached the upstream (budget 4096)", fx.name);
    assert!(unique.len() <= 300, "[{}] {} unique subdomains in under a minute", fx.name, unique.len());
    eprintln!(
        "[{}] {} of {} queries forwarded, {} unique, {bytes} bytes",
        fx.name,
        seen.len(),
        queries.len(),
        unique.len()
    );
    let names: Vec<String> = seen.into_iter().map(|q| q.name).collect();
    let allowed: Vec<&str> = names.iter().map(String::as_str).collect();
    fx.verdict(Expect::upstream(&allowed)).await;
}

case!(dns_tunnel_iodine_shaped, |fx| {
    // iodine: Base32 (a-z0-5) in 63-character labels, names near 255, NULL/PRIVATE first and
    // other types on fallback; the handshake ("v" + version) comes first.
    let mut rng = Rng(0x10d1e);
    let mut qs = vec![("vaaaakarmaa.t.tunnel.test".to_string(), NULL)];
    for i in 0..120 {
        let data: Vec<String> = (0..3).map(|_| rng.string(BASE32, 63)).collect();
        let qtype = [NULL, PRIVATE, TXT, CNAME, A][i % 5];
        qs.push((format!("{}.t.tunnel.test", data.join(".")), qtype));
    }
    stream(&mut fx, &qs).await;
});

case!(dns_tunnel_iodine_short_names, |fx| {
    // iodine -M 100: one 63-character Base32 label and a short one, names under 120.
    let mut rng = Rng(0x5eed);
    let qs: Vec<(String, u16)> = (0..200)
        .map(|i| {
            (
                format!("{}.{}.t.tunnel.test", rng.string(BASE32, 63), rng.string(BASE32, 20)),
                if i % 2 == 0 { A } else { CNAME },
            )
        })
        .collect();
    stream(&mut fx, &qs).await;
});

case!(dns_tunnel_dnscat2_shaped, |fx| {
    // dnscat2: hex-encoded packets split into labels, TXT/CNAME/MX queries; kept under 120
    // characters so that only the budgets can stop it (hex never trips the entropy check).
    let mut rng = Rng(0xdca7);
    let qs: Vec<(String, u16)> = (0..300)
        .map(|i| {
            let a = rng.string(HEX, 50);
            let b = rng.string(HEX, 40);
            (format!("{a}.{b}.tunnel.test"), [TXT, CNAME, MX][i % 3])
        })
        .collect();
    stream(&mut fx, &qs).await;
});

case!(dns_tunnel_dnsexfiltrator_shaped, |fx| {
    // DNSExfiltrator: an init query, then numbered base64url chunks in 63-character labels
    // (lowercased by egressd's normaliser), TXT by default; here half are sent as A too.
    let mut rng = Rng(0xe4f1);
    let mut qs = vec![(format!("init.{}.base64.tunnel.test", rng.string(BASE32, 40)), TXT)];
    for i in 0..150 {
        let labels: Vec<String> = (0..3).map(|_| rng.string(BASE64URL, 63)).collect();
        qs.push((format!("{i}.{}.tunnel.test", labels.join(".")), if i % 2 == 0 { TXT } else { A }));
        qs.push((format!("{i}.{}.tunnel.test", rng.string(BASE64URL, 60)), A));
    }
    stream(&mut fx, &qs).await;
});

case!(dns_tunnel_random_subdomain_flood, |fx| {
    // Many short unique names fast: the per-minute unique-subdomain bound.
    let mut rng = Rng(0xf100d);
    let qs: Vec<(String, u16)> = (0..400).map(|_| (format!("{}.tunnel.test", rng.string(HEX, 4)), A)).collect();
    stream(&mut fx, &qs).await;
});
