//! The DNS firewall end to end: `egressd run` as a child process (tests/common), a test upstream
//! made here, and raw UDP/TCP DNS clients. Every test checks what the client sees on the wire
//! (rcode, flags, answers, the EDE option) and, where it matters, the audit line and whether the
//! name ever reached the upstream.
//!
//! The upstream is a hand-written authoritative responder built on hickory-proto messages (not a
//! hickory-server authority): UDP and TCP on one loopback port, answering from a [`Zone`] table
//! (A/AAAA with TTLs, CNAME chains followed like an authoritative server, `*.` wildcards,
//! NXDOMAIN for unknown names), truncating UDP answers larger than the asker's EDNS size (or 512)
//! with TC, and a "silent" switch. It records every query it receives.
//!
//! Only 127.0.0.1 is ever bound or dialled.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamKey, SvcParamValue};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS, SVCB};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

// =============================================================================================
// Test upstream
// =============================================================================================

#[derive(Clone, Debug)]
enum Rr {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    /// HTTPS/SVCB: priority, target ("." for the owner), ipv4hint, ipv6hint.
    Svcb(u16, String, Vec<Ipv4Addr>, Vec<Ipv6Addr>),
}

/// Name → records (with TTL). Keys are lowercase without the trailing dot; `*.suffix` keys are
/// wildcards matching every name below `suffix` that has no exact entry.
#[derive(Clone, Default)]
struct Zone {
    records: HashMap<String, Vec<(Rr, u32)>>,
}

impl Zone {
    fn new() -> Zone {
        Zone::default()
    }
    fn a(mut self, name: &str, ip: &str, ttl: u32) -> Zone {
        self.records.entry(name.to_string()).or_default().push((Rr::A(ip.parse().unwrap()), ttl));
        self
    }
    fn aaaa(mut self, name: &str, ip: &str, ttl: u32) -> Zone {
        self.records.entry(name.to_string()).or_default().push((Rr::Aaaa(ip.parse().unwrap()), ttl));
        self
    }
    fn cname(mut self, name: &str, target: &str, ttl: u32) -> Zone {
        self.records.entry(name.to_string()).or_default().push((Rr::Cname(target.to_string()), ttl));
        self
    }

    fn svcb(mut self, name: &str, priority: u16, target: &str, v4: &[&str], v6: &[&str], ttl: u32) -> Zone {
        let v4 = v4.iter().map(|a| a.parse().unwrap()).collect();
        let v6 = v6.iter().map(|a| a.parse().unwrap()).collect();
        self.records.entry(name.to_string()).or_default().push((Rr::Svcb(priority, target.to_string(), v4, v6), ttl));
        self
    }

    fn lookup(&self, name: &str) -> Option<&Vec<(Rr, u32)>> {
        if let Some(r) = self.records.get(name) {
            return Some(r);
        }
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(r) = self.records.get(&format!("*.{parent}")) {
                return Some(r);
            }
            rest = parent;
        }
        None
    }
}

fn fqdn(name: &str) -> Name {
    Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).unwrap_or_else(|e| panic!("name {name}: {e}"))
}

fn key(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

/// What the upstream received (all fields show in failure messages).
#[allow(dead_code)]
#[derive(Clone, Debug)]
struct Seen {
    name: String,
    qtype: RecordType,
    tcp: bool,
}

struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    silent: Arc<AtomicBool>,
    /// Answer with the query's id XOR 1 (a spoofed or stray reply).
    wrong_id: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The authoritative answer to `query` from `zone` (CNAME chains followed inside the zone).
fn answer(zone: &Zone, query: &Message) -> Message {
    let mut resp = Message::response(query.metadata.id, OpCode::Query);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    resp.add_queries(query.queries.iter().cloned());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        resp.set_edns(edns);
    }
    let Some(q) = query.queries.first() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp;
    };
    let qtype = q.query_type();
    let mut name = key(q.name());
    for _ in 0..32 {
        let Some(records) = zone.lookup(&name) else {
            resp.metadata.response_code = ResponseCode::NXDomain;
            break;
        };
        let owner = fqdn(&name);
        let cname = records.iter().find_map(|(r, ttl)| match r {
            Rr::Cname(t) => Some((t.clone(), *ttl)),
            _ => None,
        });
        if let Some((target, ttl)) = cname {
            if qtype != RecordType::CNAME {
                resp.add_answer(Record::from_rdata(owner, ttl, RData::CNAME(CNAME(fqdn(&target)))));
                name = target;
                continue;
            }
        }
        for (r, ttl) in records {
            let rdata = match (r, qtype) {
                (Rr::A(ip), RecordType::A) => RData::A(A(*ip)),
                (Rr::Aaaa(ip), RecordType::AAAA) => RData::AAAA(AAAA(*ip)),
                (Rr::Cname(t), RecordType::CNAME) => RData::CNAME(CNAME(fqdn(t))),
                (Rr::Svcb(prio, target, v4, v6), RecordType::HTTPS | RecordType::SVCB) => {
                    let target = if target == "." { Name::root() } else { fqdn(target) };
                    let mut params = Vec::new();
                    if !v4.is_empty() {
                        params.push((
                            SvcParamKey::Ipv4Hint,
                            SvcParamValue::Ipv4Hint(IpHint(v4.iter().map(|a| A(*a)).collect())),
                        ));
                    }
                    if !v6.is_empty() {
                        params.push((
                            SvcParamKey::Ipv6Hint,
                            SvcParamValue::Ipv6Hint(IpHint(v6.iter().map(|a| AAAA(*a)).collect())),
                        ));
                    }
                    let svcb = SVCB::new(*prio, target, params);
                    if qtype == RecordType::HTTPS { RData::HTTPS(HTTPS(svcb)) } else { RData::SVCB(svcb) }
                }
                _ => continue,
            };
            resp.add_answer(Record::from_rdata(owner.clone(), *ttl, rdata));
        }
        break;
    }
    resp
}

fn record_seen(seen: &Mutex<Vec<Seen>>, query: &Message, tcp: bool) {
    for q in &query.queries {
        seen.lock().unwrap().push(Seen { name: key(q.name()), qtype: q.query_type(), tcp });
    }
}

impl Upstream {
    async fn start(zone: Zone) -> Upstream {
        // UDP and TCP on the same ephemeral port.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = TcpListener::bind(addr).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let zone = Arc::new(zone);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let silent = Arc::new(AtomicBool::new(false));
        let wrong_id = Arc::new(AtomicBool::new(false));

        let udp_task = {
            let (zone, seen, silent, wrong_id) = (zone.clone(), seen.clone(), silent.clone(), wrong_id.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65535];
                loop {
                    let Ok((n, peer)) = udp.recv_from(&mut buf).await else { continue };
                    let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                    record_seen(&seen, &query, false);
                    if silent.load(Ordering::SeqCst) {
                        continue;
                    }
                    let mut resp = answer(&zone, &query);
                    if wrong_id.load(Ordering::SeqCst) {
                        resp.metadata.id ^= 1;
                    }
                    let mut bytes = resp.to_vec().unwrap();
                    let limit = query.edns.as_ref().map(|e| usize::from(e.max_payload().max(512))).unwrap_or(512);
                    if bytes.len() > limit {
                        bytes = resp.truncate().to_vec().unwrap();
                    }
                    let _ = udp.send_to(&bytes, peer).await;
                }
            })
        };
        let tcp_task = {
            let (zone, seen, silent, wrong_id) = (zone.clone(), seen.clone(), silent.clone(), wrong_id.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = tcp.accept().await else { continue };
                    let (zone, seen, silent, wrong_id) = (zone.clone(), seen.clone(), silent.clone(), wrong_id.clone());
                    tokio::spawn(async move {
                        loop {
                            let mut len = [0u8; 2];
                            if stream.read_exact(&mut len).await.is_err() {
                                return;
                            }
                            let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                            if stream.read_exact(&mut msg).await.is_err() {
                                return;
                            }
                            let Ok(query) = Message::from_vec(&msg) else { return };
                            record_seen(&seen, &query, true);
                            if silent.load(Ordering::SeqCst) {
                                continue;
                            }
                            let mut resp = answer(&zone, &query);
                            if wrong_id.load(Ordering::SeqCst) {
                                resp.metadata.id ^= 1;
                            }
                            let bytes = resp.to_vec().unwrap();
                            let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
                            out.extend_from_slice(&bytes);
                            if stream.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            })
        };
        Upstream { addr, seen, silent, wrong_id, tasks: vec![udp_task, tcp_task] }
    }

    fn set_silent(&self, on: bool) {
        self.silent.store(on, Ordering::SeqCst);
    }

    fn set_wrong_id(&self, on: bool) {
        self.wrong_id.store(on, Ordering::SeqCst);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// How many queries for `name` (any type, any transport) the upstream received.
    fn saw(&self, name: &str) -> usize {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.seen().iter().filter(|s| s.name == name).count()
    }

    fn assert_never_saw(&self, name: &str) {
        let n = self.saw(name);
        assert_eq!(n, 0, "the upstream received {n} quer(y/ies) for {name}: {:?}", self.seen());
    }
}

// =============================================================================================
// egressd with a DNS config
// =============================================================================================

const RULES: &str = r#"
[[rule]]
name = "dns-allowed"
hosts = ["allowed.test", "*.allowed.test"]

[[rule]]
name = "evil"
action = "deny"
hosts = ["evil.allowed.test"]

[[rule]]
name = "tunnel"
hosts = ["*.tunnel.test", "*.iodine.test", "*.count.test"]
"#;

/// egressd with [`RULES`], `up` as its only upstream, `upstream_timeout = "1s"`, `extra` lines in
/// `[dns]` and only the given `[hosts]`.
async fn start_fw(up: &Upstream, extra: &str, hosts: &[(&str, &str)]) -> Egressd {
    let upstreams = [up.addr];
    let dns_extra = format!("upstream_timeout = \"1s\"\n{extra}");
    Egressd::start_opts(Opts {
        rules: RULES,
        hosts,
        dns_upstreams: &upstreams,
        dns_extra: &dns_extra,
        no_default_hosts: true,
        ..Default::default()
    })
    .await
}

// =============================================================================================
// Clients
// =============================================================================================

static NEXT_ID: AtomicU16 = AtomicU16::new(0x1a2b);

fn next_id() -> u16 {
    NEXT_ID.fetch_add(0x0101, Ordering::Relaxed)
}

/// A recursive query (RD=1) for `name`/`qtype`, with an OPT record advertising `edns` when given.
fn query_msg(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::new(next_id(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(fqdn(name), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

/// Sends one datagram and returns the first reply within `wait`.
async fn udp_raw(server: SocketAddr, packet: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

fn parse(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).unwrap_or_else(|e| panic!("unparsable reply {bytes:02x?}: {e}"))
}

/// One query over UDP; panics without a reply within 5 s. Returns the reply and its size.
async fn ask_udp_sized(server: SocketAddr, q: &Message) -> (Message, usize) {
    let bytes = q.to_vec().unwrap();
    let reply = udp_raw(server, &bytes, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no UDP reply within 5 s to {:?}", q.queries));
    (parse(&reply), reply.len())
}

async fn ask_udp(server: SocketAddr, q: &Message) -> Message {
    ask_udp_sized(server, q).await.0
}

/// One query over UDP with EDNS (so a blocked answer carries the EDE option).
async fn ask(server: SocketAddr, name: &str, qtype: RecordType) -> (Message, Message) {
    let q = query_msg(name, qtype, Some(1232));
    let r = ask_udp(server, &q).await;
    (q, r)
}

async fn tcp_send(stream: &mut TcpStream, msg: &[u8]) {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    stream.write_all(&out).await.unwrap();
}

async fn tcp_recv(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

/// One query over a fresh TCP connection; panics without a reply within 5 s.
async fn ask_tcp(server: SocketAddr, q: &Message) -> Message {
    let mut s = TcpStream::connect(server).await.expect("TCP connect to egressd");
    tcp_send(&mut s, &q.to_vec().unwrap()).await;
    let reply = tokio::time::timeout(Duration::from_secs(5), tcp_recv(&mut s))
        .await
        .unwrap_or_else(|_| panic!("no TCP reply within 5 s to {:?}", q.queries))
        .unwrap_or_else(|e| panic!("TCP reply to {:?}: {e}", q.queries));
    parse(&reply)
}

// =============================================================================================
// Assertions
// =============================================================================================

/// Echoed id and question, QR set, RD copied, RA set.
fn check_echo(q: &Message, r: &Message) {
    assert_eq!(r.metadata.id, q.metadata.id, "reply id differs from the query's: {r:?}");
    assert_eq!(r.metadata.message_type, MessageType::Response, "QR not set: {r:?}");
    assert_eq!(r.queries, q.queries, "question not echoed: {r:?}");
    assert_eq!(
        r.queries[0].name().to_ascii(),
        q.queries[0].name().to_ascii(),
        "question name not echoed byte for byte (case): {r:?}"
    );
    if q.edns.is_some() {
        assert!(r.edns.is_some(), "query had EDNS, the reply has no OPT record (RFC 6891 6.1.1): {r:?}");
    }
    assert_eq!(r.metadata.recursion_desired, q.metadata.recursion_desired, "RD not copied: {r:?}");
    assert!(r.metadata.recursion_available, "RA not set: {r:?}");
}

/// The EDE option (RFC 8914, option code 15): INFO-CODE and EXTRA-TEXT.
fn ede(r: &Message) -> Option<(u16, String)> {
    let edns = r.edns.as_ref()?;
    edns.options().options.iter().find_map(|(code, opt)| {
        if u16::from(*code) != 15 {
            return None;
        }
        let data: Vec<u8> = match opt {
            EdnsOption::Unknown(_, d) => d.clone(),
            other => Vec::<u8>::try_from(other).ok()?,
        };
        if data.len() < 2 {
            return Some((u16::MAX, String::new()));
        }
        Some((u16::from_be_bytes([data[0], data[1]]), String::from_utf8_lossy(&data[2..]).into_owned()))
    })
}

fn addrs_v4(r: &Message) -> Vec<Ipv4Addr> {
    r.answers
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn addrs_v6(r: &Message) -> Vec<Ipv6Addr> {
    r.answers
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::AAAA(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// A blocked answer with the default `blocked_response = "nxdomain"`: NXDOMAIN, no answers, EDE
/// with `info` (15 Blocked / 17 Filtered) and `reason=REASON` in its text. Returns the EDE text.
fn assert_blocked(q: &Message, r: &Message, info: u16, reason: &str) -> String {
    check_echo(q, r);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "expected NXDOMAIN ({reason}): {r:?}");
    assert!(r.answers.is_empty(), "a blocked answer carries records: {r:?}");
    let (code, text) = ede(r).unwrap_or_else(|| panic!("no EDE option in the blocked answer ({reason}): {r:?}"));
    assert_eq!(code, info, "EDE INFO-CODE (text {text:?}) for reason {reason}");
    assert!(text.contains(&format!("reason={reason}")), "EDE text {text:?} lacks reason={reason}");
    assert!(text.contains("rule="), "EDE text {text:?} lacks rule=");
    assert!(text.starts_with("egressd: "), "EDE text {text:?} does not start with 'egressd: '");
    text
}

fn assert_answered(q: &Message, r: &Message) {
    check_echo(q, r);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError, "expected NOERROR: {r:?}");
    assert!(ede(r).is_none(), "an allowed answer carries an EDE option: {r:?}");
}

fn is_dns(v: &Value, host: &str) -> bool {
    s(v, "kind") == "dns" && s(v, "host").trim_end_matches('.').eq_ignore_ascii_case(host)
}

// =============================================================================================
// Tests
// =============================================================================================

// 1 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn allowed_a_answered_then_cached_with_decremented_ttl() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("www.allowed.test", "93.184.216.34", 300)).await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        let (q, r) = ask(dns, "www.allowed.test", RecordType::A).await;
        assert_answered(&q, &r);
        assert_eq!(addrs_v4(&r), vec![Ipv4Addr::new(93, 184, 216, 34)], "{r:?}");
        let ttl1 = r.answers[0].ttl;
        assert!(ttl1 == 300 || ttl1 == 299, "first answer TTL {ttl1}, expected 300 or 299");

        tokio::time::sleep(Duration::from_millis(1600)).await;

        // RD=0 this time: the reply must copy it.
        let mut q2 = query_msg("www.allowed.test", RecordType::A, Some(1232));
        q2.metadata.recursion_desired = false;
        let r2 = ask_udp(dns, &q2).await;
        assert_answered(&q2, &r2);
        assert_eq!(addrs_v4(&r2), vec![Ipv4Addr::new(93, 184, 216, 34)], "{r2:?}");
        let ttl2 = r2.answers[0].ttl;
        assert!(ttl2 < ttl1, "cached TTL did not count down: first {ttl1}, 1.6 s later {ttl2}");
        assert!(ttl2 >= 295, "cached TTL fell too fast: {ttl2}");
        assert_eq!(up.saw("www.allowed.test"), 1, "the second answer was not served from the cache: {:?}", up.seen());

        // An allowed name the upstream does not know: its NXDOMAIN passes through, without EDE.
        let (q3, r3) = ask(dns, "nosuch.allowed.test", RecordType::A).await;
        check_echo(&q3, &r3);
        assert_eq!(r3.metadata.response_code, ResponseCode::NXDomain, "{r3:?}");
        assert!(ede(&r3).is_none(), "upstream NXDOMAIN carries a 'blocked' EDE: {r3:?}");
        assert_eq!(up.saw("nosuch.allowed.test"), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_capped_by_max_ttl() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("long.allowed.test", "93.184.216.34", 86400)).await;
        let e = start_fw(&up, "max_ttl = \"60s\"", &[]).await;
        let (q, r) = ask(e.dns_addr(), "long.allowed.test", RecordType::A).await;
        assert_answered(&q, &r);
        assert_eq!(r.answers.len(), 1, "{r:?}");
        assert!(r.answers[0].ttl <= 60, "TTL {} above max_ttl 60 s", r.answers[0].ttl);
    })
    .await
}

// 2 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn unlisted_name_gets_nxdomain_with_ede() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("unlisted.test", "93.184.216.34", 300)).await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        let (q, r) = ask(dns, "unlisted.test", RecordType::A).await;
        let text = assert_blocked(&q, &r, 15, "default");
        assert!(text.contains("rule=default; reason=default"), "EDE text {text:?}");

        // Without EDNS: still NXDOMAIN, and no OPT record is invented.
        let q2 = query_msg("www.unlisted.test", RecordType::AAAA, None);
        let r2 = ask_udp(dns, &q2).await;
        check_echo(&q2, &r2);
        assert_eq!(r2.metadata.response_code, ResponseCode::NXDomain, "{r2:?}");
        assert!(r2.edns.is_none(), "OPT record in the reply to a query without EDNS: {r2:?}");

        // A denied name (deny rule inside the allowed wildcard): rule=evil, reason=rule.
        let (q3, r3) = ask(dns, "evil.allowed.test", RecordType::A).await;
        let text = assert_blocked(&q3, &r3, 15, "rule");
        assert!(text.contains("rule=evil"), "EDE text {text:?}");

        e.audit("deny for unlisted.test", |v| is_dns(v, "unlisted.test") && s(v, "reason") == "default").await;
        for name in ["unlisted.test", "www.unlisted.test", "evil.allowed.test"] {
            up.assert_never_saw(name);
        }
    })
    .await
}

// 3 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn blocked_response_variants() {
    bounded(Duration::from_secs(40), async {
        let up = Upstream::start(Zone::new()).await;

        {
            let e = start_fw(&up, "blocked_response = \"nodata\"", &[]).await;
            for qtype in [RecordType::A, RecordType::AAAA] {
                let (q, r) = ask(e.dns_addr(), "unlisted.test", qtype).await;
                check_echo(&q, &r);
                assert_eq!(r.metadata.response_code, ResponseCode::NoError, "nodata {qtype}: {r:?}");
                assert!(r.answers.is_empty(), "nodata {qtype} carries answers: {r:?}");
                let (code, _) = ede(&r).unwrap_or_else(|| panic!("nodata {qtype}: no EDE: {r:?}"));
                assert_eq!(code, 15, "nodata {qtype}");
            }
        }
        {
            let e = start_fw(&up, "blocked_response = \"refused\"", &[]).await;
            let (q, r) = ask(e.dns_addr(), "unlisted.test", RecordType::A).await;
            assert_eq!(r.metadata.id, q.metadata.id);
            assert_eq!(r.metadata.response_code, ResponseCode::Refused, "refused: {r:?}");
            assert!(r.answers.is_empty(), "{r:?}");
            let (code, _) = ede(&r).unwrap_or_else(|| panic!("refused: no EDE: {r:?}"));
            assert_eq!(code, 15, "refused");
        }
        {
            let e = start_fw(&up, "blocked_response = \"sinkhole\"", &[]).await;
            let (q, r) = ask(e.dns_addr(), "unlisted.test", RecordType::A).await;
            check_echo(&q, &r);
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "sinkhole A: {r:?}");
            assert_eq!(addrs_v4(&r), vec![Ipv4Addr::UNSPECIFIED], "sinkhole A: {r:?}");
            let (q, r) = ask(e.dns_addr(), "unlisted.test", RecordType::AAAA).await;
            check_echo(&q, &r);
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "sinkhole AAAA: {r:?}");
            assert_eq!(addrs_v6(&r), vec![Ipv6Addr::UNSPECIFIED], "sinkhole AAAA: {r:?}");
        }
        {
            let extra = "blocked_response = \"sinkhole\"\nsinkhole_ipv4 = \"127.0.0.9\"\nsinkhole_ipv6 = \"::1\"";
            let e = start_fw(&up, extra, &[]).await;
            let (q, r) = ask(e.dns_addr(), "unlisted.test", RecordType::A).await;
            check_echo(&q, &r);
            assert_eq!(addrs_v4(&r), vec![Ipv4Addr::new(127, 0, 0, 9)], "sinkhole_ipv4: {r:?}");
            let (q, r) = ask(e.dns_addr(), "unlisted.test", RecordType::AAAA).await;
            check_echo(&q, &r);
            assert_eq!(addrs_v6(&r), vec![Ipv6Addr::LOCALHOST], "sinkhole_ipv6: {r:?}");
        }
        up.assert_never_saw("unlisted.test");
    })
    .await
}

// 4 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn txt_not_allowed_is_blocked_qtype() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("www.allowed.test", "93.184.216.34", 300)).await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        for qtype in [RecordType::TXT, RecordType::MX, RecordType::NULL, RecordType::ANY] {
            let (q, r) = ask(dns, "www.allowed.test", qtype).await;
            let text = assert_blocked(&q, &r, 15, "qtype");
            assert!(text.contains("rule=dns-allowed"), "{qtype}: EDE text {text:?}");
        }
        let v = e.audit("qtype TXT blocked", |v| is_dns(v, "www.allowed.test") && s(v, "qtype") == "TXT").await;
        assert_eq!(s(&v, "reason"), "qtype", "{v}");
        assert_ne!(s(&v, "action"), "allow", "{v}");
        up.assert_never_saw("www.allowed.test");

        // The same name with an allowed qtype is answered.
        let (q, r) = ask(dns, "www.allowed.test", RecordType::A).await;
        assert_answered(&q, &r);
    })
    .await
}

// 5 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn cname_to_unlisted_is_blocked_cname() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(
            Zone::new()
                .cname("alias.allowed.test", "target.unlisted.test", 300)
                .a("target.unlisted.test", "93.184.216.34", 300)
                .cname("good.allowed.test", "cdn.allowed.test", 300)
                .a("cdn.allowed.test", "93.184.216.35", 300),
        )
        .await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        let (q, r) = ask(dns, "alias.allowed.test", RecordType::A).await;
        assert_blocked(&q, &r, 17, "cname");
        let v = e.audit("cname block", |v| is_dns(v, "alias.allowed.test") && s(v, "reason") == "cname").await;
        assert_ne!(s(&v, "action"), "allow", "{v}");

        // Cached or not, a repeat is blocked too.
        let (q, r) = ask(dns, "alias.allowed.test", RecordType::A).await;
        assert_blocked(&q, &r, 17, "cname");

        // A CNAME to an allowed name is answered with the chain.
        let (q, r) = ask(dns, "good.allowed.test", RecordType::A).await;
        assert_answered(&q, &r);
        assert_eq!(addrs_v4(&r), vec![Ipv4Addr::new(93, 184, 216, 35)], "{r:?}");
        assert!(r.answers.iter().any(|a| matches!(a.data, RData::CNAME(_))), "{r:?}");
    })
    .await
}

// 6 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn cname_chain_of_ten_to_denied_is_blocked() {
    bounded(TEST_TIMEOUT, async {
        let mut zone = Zone::new();
        // bad: c0 -> c1 -> ... -> c9 -> evil.allowed.test (deny rule); 10 CNAMEs
        // good: g0 -> ... -> g9 -> end.chain.allowed.test
        for i in 0..9 {
            zone = zone
                .cname(&format!("c{i}.chain.allowed.test"), &format!("c{}.chain.allowed.test", i + 1), 300)
                .cname(&format!("g{i}.chain.allowed.test"), &format!("g{}.chain.allowed.test", i + 1), 300);
        }
        zone = zone
            .cname("c9.chain.allowed.test", "evil.allowed.test", 300)
            .a("evil.allowed.test", "93.184.216.34", 300)
            .cname("g9.chain.allowed.test", "end.chain.allowed.test", 300)
            .a("end.chain.allowed.test", "93.184.216.36", 300);
        let up = Upstream::start(zone).await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        let (q, r) = ask(dns, "c0.chain.allowed.test", RecordType::A).await;
        assert_blocked(&q, &r, 17, "cname");
        e.audit("cname chain block", |v| is_dns(v, "c0.chain.allowed.test") && s(v, "reason") == "cname").await;

        let (q, r) = ask(dns, "g0.chain.allowed.test", RecordType::A).await;
        assert_answered(&q, &r);
        assert_eq!(addrs_v4(&r), vec![Ipv4Addr::new(93, 184, 216, 36)], "allowed chain of 10: {r:?}");
    })
    .await
}

// 7 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn private_answer_ip_blocked() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(
            Zone::new()
                .a("ten.allowed.test", "10.0.0.1", 300)
                .a("meta.allowed.test", "169.254.169.254", 300)
                .a("mixed.allowed.test", "93.184.216.34", 300)
                .a("mixed.allowed.test", "192.168.1.1", 300)
                .aaaa("meta6.allowed.test", "fd00:ec2::254", 300)
                .a("lo.allowed.test", "127.0.0.1", 300)
                .cname("via.allowed.test", "ten.allowed.test", 300),
        )
        .await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        for (name, qtype) in [
            ("ten.allowed.test", RecordType::A),
            ("meta.allowed.test", RecordType::A),
            ("mixed.allowed.test", RecordType::A),
            ("meta6.allowed.test", RecordType::AAAA),
            ("via.allowed.test", RecordType::A),
        ] {
            let (q, r) = ask(dns, name, qtype).await;
            assert_blocked(&q, &r, 17, "answer_ip");
            e.audit(&format!("answer_ip for {name}"), |v| is_dns(v, name) && s(v, "reason") == "answer_ip").await;
        }

        // 127.0.0.0/8 is an allow_cidrs hole.
        let (q, r) = ask(dns, "lo.allowed.test", RecordType::A).await;
        assert_answered(&q, &r);
        assert_eq!(addrs_v4(&r), vec![Ipv4Addr::LOCALHOST], "{r:?}");
    })
    .await
}

// 8 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn hosts_answered_without_upstream() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("static.allowed.test", "93.184.216.34", 300)).await;
        let e =
            start_fw(&up, "", &[("static.allowed.test", "127.0.0.1"), ("intranet.unlisted.test", "127.0.0.1")]).await;
        let dns = e.dns_addr();

        let (q, r) = ask(dns, "static.allowed.test", RecordType::A).await;
        assert_answered(&q, &r);
        assert!(r.metadata.authoritative, "hosts answer without AA: {r:?}");
        assert_eq!(addrs_v4(&r), vec![Ipv4Addr::LOCALHOST], "{r:?}");

        let (q, r) = ask(dns, "static.allowed.test", RecordType::AAAA).await;
        assert_answered(&q, &r);
        assert!(r.answers.is_empty(), "AAAA for a v4-only hosts entry must be NODATA: {r:?}");

        // Over TCP too.
        let q = query_msg("static.allowed.test", RecordType::A, None);
        let r = ask_tcp(dns, &q).await;
        assert_answered(&q, &r);
        assert_eq!(addrs_v4(&r), vec![Ipv4Addr::LOCALHOST], "{r:?}");

        up.assert_never_saw("static.allowed.test");

        // A hosts entry does not bypass the policy.
        let (q, r) = ask(dns, "intranet.unlisted.test", RecordType::A).await;
        assert_blocked(&q, &r, 15, "default");
        up.assert_never_saw("intranet.unlisted.test");
    })
    .await
}

// 9 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn upstream_down_servfail_within_timeout() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("slow.allowed.test", "93.184.216.34", 300)).await;
        up.set_silent(true);
        let e = start_fw(&up, "", &[]).await;

        let q = query_msg("slow.allowed.test", RecordType::A, Some(1232));
        let started = Instant::now();
        let reply = udp_raw(e.dns_addr(), &q.to_vec().unwrap(), Duration::from_secs(6)).await;
        let took = started.elapsed();
        let r = parse(&reply.unwrap_or_else(|| panic!("no reply within 6 s with a silent upstream")));
        check_echo(&q, &r);
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail, "{r:?}");
        assert!(r.answers.is_empty(), "{r:?}");
        assert!(took <= Duration::from_millis(2500), "SERVFAIL after {took:?}; upstream_timeout is 1 s (+1.5 s slack)");
        assert!(up.saw("slow.allowed.test") >= 1, "egressd never asked the upstream");

        let v = e.audit("upstream failure", |v| is_dns(v, "slow.allowed.test")).await;
        assert_eq!(s(&v, "reason"), "upstream", "audit line for an upstream timeout: {v}");
    })
    .await
}

// 10 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn large_answer_tc_over_udp_full_over_tcp() {
    bounded(TEST_TIMEOUT, async {
        let mut zone = Zone::new();
        for i in 1..=80u32 {
            zone = zone.a("big.allowed.test", &format!("11.0.{}.{}", i / 256, i % 256), 300);
        }
        // 32 records: 546 bytes compressed, 1058 uncompressed: over 512, under 1232.
        for i in 1..=32u32 {
            zone = zone.a("mid.allowed.test", &format!("11.1.0.{i}"), 300);
        }
        let up = Upstream::start(zone).await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        for edns in [None, Some(1232), Some(4096)] {
            let q = query_msg("big.allowed.test", RecordType::A, edns);
            let (r, size) = ask_udp_sized(dns, &q).await;
            check_echo(&q, &r);
            assert!(r.metadata.truncation, "80 A records over UDP (EDNS {edns:?}) without TC ({size} bytes): {r:?}");
            assert!(r.answers.is_empty(), "a TC answer must be emptied (EDNS {edns:?}): {} answers", r.answers.len());
            let limit = edns.map(|s| usize::from(s.min(1232))).unwrap_or(512);
            assert!(size <= limit, "UDP reply of {size} bytes exceeds {limit} (EDNS {edns:?})");
        }

        let q = query_msg("big.allowed.test", RecordType::A, Some(1232));
        let r = ask_tcp(dns, &q).await;
        assert_answered(&q, &r);
        assert!(!r.metadata.truncation, "TC over TCP: {r:?}");
        assert_eq!(addrs_v4(&r).len(), 80, "TCP answer has {} of 80 A records", addrs_v4(&r).len());

        // Between 512 and 1232: truncated without EDNS, whole with EDNS 1232.
        let q = query_msg("mid.allowed.test", RecordType::A, None);
        let (r, size) = ask_udp_sized(dns, &q).await;
        assert!(
            r.metadata.truncation && size <= 512,
            "32 A records without EDNS: TC={} size={size}",
            r.metadata.truncation
        );
        let q = query_msg("mid.allowed.test", RecordType::A, Some(1232));
        let (r, size) = ask_udp_sized(dns, &q).await;
        assert_answered(&q, &r);
        assert!(!r.metadata.truncation, "32 A records ({size} bytes) with EDNS 1232 truncated");
        assert_eq!(addrs_v4(&r).len(), 32, "{r:?}");
    })
    .await
}

// 11 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn tcp_several_queries_one_connection() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("a.allowed.test", "93.184.216.1", 300).a(
            "b.allowed.test",
            "93.184.216.2",
            300,
        ))
        .await;
        let e = start_fw(&up, "", &[]).await;
        let mut s = TcpStream::connect(e.dns_addr()).await.unwrap();

        // One at a time.
        for (name, ip) in [("a.allowed.test", [93, 184, 216, 1]), ("b.allowed.test", [93, 184, 216, 2])] {
            let q = query_msg(name, RecordType::A, None);
            tcp_send(&mut s, &q.to_vec().unwrap()).await;
            let r = parse(&tokio::time::timeout(Duration::from_secs(5), tcp_recv(&mut s)).await.unwrap().unwrap());
            assert_answered(&q, &r);
            assert_eq!(addrs_v4(&r), vec![Ipv4Addr::from(ip)], "{r:?}");
        }
        // A blocked one on the same connection.
        let q = query_msg("unlisted.test", RecordType::A, Some(1232));
        tcp_send(&mut s, &q.to_vec().unwrap()).await;
        let r = parse(&tokio::time::timeout(Duration::from_secs(5), tcp_recv(&mut s)).await.unwrap().unwrap());
        assert_blocked(&q, &r, 15, "default");

        // Pipelined: three queries in one write, three replies (any order).
        let qs: Vec<Message> = ["a.allowed.test", "b.allowed.test", "a.allowed.test"]
            .iter()
            .map(|n| query_msg(n, RecordType::A, None))
            .collect();
        let mut out = Vec::new();
        for q in &qs {
            let b = q.to_vec().unwrap();
            out.extend_from_slice(&(b.len() as u16).to_be_bytes());
            out.extend_from_slice(&b);
        }
        s.write_all(&out).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let r = parse(&tokio::time::timeout(Duration::from_secs(5), tcp_recv(&mut s)).await.unwrap().unwrap());
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{r:?}");
            ids.push(r.metadata.id);
        }
        let mut want: Vec<u16> = qs.iter().map(|q| q.metadata.id).collect();
        want.sort();
        ids.sort();
        assert_eq!(ids, want, "pipelined replies do not match the queries");
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn hundred_idle_tcp_clients_do_not_block_the_next() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("www.allowed.test", "93.184.216.34", 300)).await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        let mut idle = Vec::new();
        for _ in 0..100 {
            idle.push(TcpStream::connect(dns).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;

        let q = query_msg("www.allowed.test", RecordType::A, None);
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(1), ask_tcp(dns, &q))
            .await
            .unwrap_or_else(|_| panic!("the 101st TCP client got no answer within 1 s"));
        assert_answered(&q, &r);
        eprintln!("101st TCP client answered in {:?}", started.elapsed());

        // UDP is unaffected.
        let r = tokio::time::timeout(Duration::from_secs(1), ask_udp(dns, &q)).await.expect("UDP answer within 1 s");
        assert_answered(&q, &r);
        drop(idle);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_connection_cap_evicts_longest_idle() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("www.allowed.test", "93.184.216.34", 300)).await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        // The oldest idle connection, then enough to fill the cap of 256.
        let mut oldest = TcpStream::connect(dns).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut idle = Vec::new();
        for _ in 0..259 {
            idle.push(TcpStream::connect(dns).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        let q = query_msg("www.allowed.test", RecordType::A, None);
        let r = tokio::time::timeout(Duration::from_secs(1), ask_tcp(dns, &q))
            .await
            .unwrap_or_else(|_| panic!("a new TCP client beyond the cap got no answer within 1 s"));
        assert_answered(&q, &r);

        // The longest-idle connection was closed to make room.
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(2), oldest.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(_)) => panic!("unexpected bytes on an idle connection"),
            Err(_) => panic!("with {} connections open, the longest-idle one was not closed", idle.len() + 2),
        }
        drop(idle);
    })
    .await
}

// 12 ------------------------------------------------------------------------------------------

/// xorshift64*: random-looking labels without a rand dependency.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn base32(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
        (0..len).map(|_| ALPHABET[(self.next() % 32) as usize] as char).collect()
    }
}

fn is_blocked_reply(r: &Message) -> bool {
    r.metadata.response_code != ResponseCode::NoError || ede(r).is_some()
}

#[tokio::test(flavor = "multi_thread")]
async fn tunneling_high_entropy_subdomains_blocked() {
    bounded(Duration::from_secs(40), async {
        let up = Upstream::start(Zone::new().a("*.tunnel.test", "93.184.216.34", 300).a(
            "*.iodine.test",
            "93.184.216.34",
            300,
        ))
        .await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();
        let mut rng = Rng::new();

        // A single iodine-like name of 200+ characters: blocked on its first appearance.
        let long = format!("{}.{}.{}.{}.iodine.test", rng.base32(50), rng.base32(50), rng.base32(50), rng.base32(40));
        assert!(long.len() > 200);
        let (q, r) = ask(dns, &long, RecordType::A).await;
        assert_blocked(&q, &r, 15, "tunneling");
        up.assert_never_saw(&long);
        let v = e.audit("tunneling for the long name", |v| is_dns(v, &long)).await;
        assert_eq!(s(&v, "reason"), "tunneling", "{v}");

        // 350 distinct random 30-character base32 labels under one registrable domain.
        let started = Instant::now();
        let mut first_blocked = None;
        let mut answered = 0usize;
        let mut late_allowed = Vec::new();
        let mut blocked_names = Vec::new();
        for i in 0..350 {
            let name = format!("{}.tunnel.test", rng.base32(30));
            let (q, r) = ask(dns, &name, RecordType::A).await;
            check_echo(&q, &r);
            if is_blocked_reply(&r) {
                let (code, text) = ede(&r).unwrap_or_else(|| panic!("query #{i} blocked without EDE: {r:?}"));
                assert_eq!(code, 15, "query #{i}: {text}");
                assert!(text.contains("reason=tunneling"), "query #{i} blocked for another reason: {text}");
                first_blocked.get_or_insert(i);
                blocked_names.push(name);
            } else {
                answered += 1;
                if i >= 300 {
                    late_allowed.push(i);
                }
            }
        }
        eprintln!(
            "350 random subdomains in {:?}: {answered} answered, first blocked at #{first_blocked:?}",
            started.elapsed()
        );
        assert!(late_allowed.is_empty(), "queries beyond #300 were answered: {late_allowed:?}");
        assert!(answered <= 300, "{answered} unique subdomains answered (max_unique_subdomains 300)");
        for name in &blocked_names {
            up.assert_never_saw(name);
        }
        e.audit("tunneling audit", |v| {
            s(v, "kind") == "dns" && s(v, "host").ends_with(".tunnel.test") && s(v, "reason") == "tunneling"
        })
        .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn tunneling_unique_subdomain_limit_counts_to_300() {
    bounded(Duration::from_secs(40), async {
        let up = Upstream::start(Zone::new().a("*.count.test", "93.184.216.34", 300)).await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        // Short low-entropy labels: 300 × ~5 bytes stays far below the 4 KiB info budget.
        let mut verdicts = Vec::new();
        for i in 0..320 {
            let name = format!("h{i}.count.test");
            let (q, r) = ask(dns, &name, RecordType::A).await;
            check_echo(&q, &r);
            verdicts.push(is_blocked_reply(&r));
        }
        let blocked_early: Vec<usize> = (0..300).filter(|&i| verdicts[i]).collect();
        let allowed_late: Vec<usize> = (300..320).filter(|&i| !verdicts[i]).collect();
        assert!(blocked_early.is_empty(), "among the first 300 unique subdomains, blocked: {blocked_early:?}");
        assert!(allowed_late.is_empty(), "beyond 300 unique subdomains, answered: {allowed_late:?}");
        for i in 300..320 {
            up.assert_never_saw(&format!("h{i}.count.test"));
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn tunneling_alert_answers_but_logs() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("*.iodine.test", "93.184.216.34", 300)).await;
        let e = start_fw(&up, "[dns.tunneling]\naction = \"alert\"", &[]).await;
        let mut rng = Rng::new();
        let long = format!("{}.{}.{}.{}.iodine.test", rng.base32(50), rng.base32(50), rng.base32(50), rng.base32(40));
        let (q, r) = ask(e.dns_addr(), &long, RecordType::A).await;
        assert_answered(&q, &r);
        assert_eq!(addrs_v4(&r), vec![Ipv4Addr::new(93, 184, 216, 34)], "{r:?}");
        assert_eq!(up.saw(&long), 1);
        let v = e.audit("alert for the long name", |v| is_dns(v, &long)).await;
        assert_eq!(s(&v, "action"), "alert", "{v}");
        assert_eq!(s(&v, "reason"), "tunneling", "{v}");
    })
    .await
}

// 13 ------------------------------------------------------------------------------------------

fn raw_header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [id, flags, qd, an, ns, ar] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

fn raw_name(labels: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for l in labels {
        v.push(l.len() as u8);
        v.extend_from_slice(l);
    }
    v.push(0);
    v
}

/// A query (RD=1) with one question of `labels`, type A, class IN.
fn raw_query(id: u16, labels: &[&[u8]]) -> Vec<u8> {
    let mut v = raw_header(id, 0x0100, 1, 0, 0, 0);
    v.extend(raw_name(labels));
    v.extend_from_slice(&[0, 1, 0, 1]);
    v
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// A FORMERR reply echoing the id.
    FormErr,
    /// A NOTIMP reply echoing the id.
    NotImp,
    /// No reply at all.
    Nothing,
    /// No reply, or a FORMERR reply.
    FormErrOrNothing,
}

async fn assert_alive(dns: SocketAddr, after: &str) {
    let q = query_msg("www.allowed.test", RecordType::A, None);
    let bytes = q.to_vec().unwrap();
    let reply = udp_raw(dns, &bytes, Duration::from_secs(3)).await;
    let reply = reply.unwrap_or_else(|| panic!("egressd does not answer a normal query after {after}"));
    let r = parse(&reply);
    assert_answered(&q, &r);
}

fn rcode_of(reply: &[u8]) -> u8 {
    reply[3] & 0x0f
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_packets_never_crash_and_get_formerr_or_nothing() {
    bounded(Duration::from_secs(60), async {
        let up = Upstream::start(Zone::new().a("www.allowed.test", "93.184.216.34", 300).a(
            "allowed.test",
            "93.184.216.34",
            300,
        ))
        .await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        let mut cases: Vec<(&str, Vec<u8>, Expect)> = Vec::new();
        cases.push(("empty datagram", Vec::new(), Expect::Nothing));
        cases.push(("truncated header (5 bytes)", vec![0x12, 0x34, 0x01, 0x00, 0x00], Expect::FormErrOrNothing));
        cases.push(("QDCOUNT 0", raw_header(0x1001, 0x0100, 0, 0, 0, 0), Expect::FormErr));
        {
            let mut v = raw_header(0x1002, 0x0100, 2, 0, 0, 0);
            for _ in 0..2 {
                v.extend(raw_name(&[b"www", b"allowed", b"test"]));
                v.extend_from_slice(&[0, 1, 0, 1]);
            }
            cases.push(("two questions", v, Expect::FormErr));
        }
        {
            let mut v = raw_header(0x1003, 0x0100, 1, 0, 0, 0);
            v.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
            cases.push(("compression pointer to itself", v, Expect::FormErr));
        }
        {
            // offset 12: "a" + pointer to 16; offset 16: "b" + pointer to 12.
            let mut v = raw_header(0x1004, 0x0100, 1, 0, 0, 0);
            v.extend_from_slice(&[1, b'a', 0xc0, 16, 1, b'b', 0xc0, 12, 0, 1, 0, 1]);
            cases.push(("two-pointer compression loop", v, Expect::FormErr));
        }
        {
            let mut v = raw_header(0x1005, 0x0100, 1, 0, 0, 0);
            v.extend_from_slice(&[0xc0, 0xff, 0, 1, 0, 1]);
            cases.push(("compression pointer past the end", v, Expect::FormErr));
        }
        cases.push(("label with an embedded dot", raw_query(0x1006, &[b"allowed.test"]), Expect::FormErr));
        cases.push((
            "label with an embedded dot under an allowed name",
            raw_query(0x1007, &[b"x.y", b"allowed", b"test"]),
            Expect::FormErr,
        ));
        cases.push(("NUL inside a label", raw_query(0x1008, &[b"www\0", b"allowed", b"test"]), Expect::FormErr));
        cases.push(("space inside a label", raw_query(0x1009, &[b"w w", b"allowed", b"test"]), Expect::FormErr));
        cases.push(("backslash inside a label", raw_query(0x100a, &[b"w\\w", b"allowed", b"test"]), Expect::FormErr));
        cases.push(("byte 0x80 inside a label", raw_query(0x100b, &[b"w\x80w", b"allowed", b"test"]), Expect::FormErr));
        {
            let mut v = raw_header(0x100c, 0x0100, 1, 0, 0, 0);
            v.extend_from_slice(&[3, b'w', b'w', b'w', 7, b'a', b'l']);
            cases.push(("question cut inside the name", v, Expect::FormErr));
        }
        {
            let mut v = raw_header(0x100d, 0x0100, 1, 0, 0, 0);
            v.extend(raw_name(&[b"www", b"allowed", b"test"]));
            v.extend_from_slice(&[0, 1]);
            cases.push(("question without a class", v, Expect::FormErr));
        }
        {
            let mut v = raw_header(0x100e, 0x0100, 1, 0, 0, 0);
            v.extend_from_slice(&[0x41, b'x', 0, 0, 1, 0, 1]);
            cases.push(("reserved label type 0x40", v, Expect::FormErr));
        }
        {
            let mut v = raw_query(0x100f, &[b"www", b"allowed", b"test"]);
            v[2] |= 0x80; // QR=1
            cases.push(("a response (QR=1)", v, Expect::Nothing));
        }
        {
            let mut v = raw_query(0x1010, &[b"www", b"allowed", b"test"]);
            v[2] = (v[2] & 0x87) | (4 << 3); // opcode NOTIFY
            cases.push(("opcode NOTIFY", v, Expect::NotImp));
        }
        {
            let mut v = raw_query(0x1011, &[b"www", b"allowed", b"test"]);
            v[2] = (v[2] & 0x87) | (2 << 3); // opcode STATUS
            cases.push(("opcode STATUS", v, Expect::NotImp));
        }
        {
            let mut v = raw_header(0x1012, 0x0100, 1, 0, 0, 0);
            v.extend(std::iter::repeat_n(63u8, 1).chain(std::iter::repeat_n(b'a', 63)).cycle().take(64 * 5));
            v.extend_from_slice(&[0, 0, 1, 0, 1]);
            cases.push(("name longer than 255 octets", v, Expect::FormErr));
        }
        {
            let mut v = raw_header(0x1013, 0x0100, 1, 0, 0, 0);
            let mut rng = Rng::new();
            v.extend((0..200).map(|_| rng.next() as u8));
            cases.push(("random bytes after a query header", v, Expect::FormErrOrNothing));
        }

        let mut failures = Vec::new();
        for (what, packet, expect) in &cases {
            let reply = udp_raw(dns, packet, Duration::from_millis(1500)).await;
            let outcome = match (&reply, expect) {
                (None, Expect::Nothing | Expect::FormErrOrNothing) => Ok(()),
                (None, _) => Err(format!("no reply, expected {expect:?}")),
                (Some(r), _) if r.len() < 12 => Err(format!("a reply of {} bytes: {r:02x?}", r.len())),
                (Some(r), Expect::Nothing) => Err(format!("expected no reply, got rcode {} ({r:02x?})", rcode_of(r))),
                (Some(r), _) => {
                    let want = if *expect == Expect::NotImp { 4 } else { 1 };
                    if packet.len() >= 2 && r[..2] != packet[..2] {
                        Err(format!("reply id {:02x?} differs from the query's", &r[..2]))
                    } else if r[2] & 0x80 == 0 {
                        Err("reply without QR".to_string())
                    } else if rcode_of(r) != want {
                        Err(format!("rcode {} instead of {want} ({expect:?})", rcode_of(r)))
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(msg) = outcome {
                failures.push(format!("{what}: {msg}"));
            }
            assert_alive(dns, what).await;
        }

        // Over TCP: two questions → FORMERR, and the server stays up.
        {
            let mut v = raw_header(0x2001, 0x0100, 2, 0, 0, 0);
            for _ in 0..2 {
                v.extend(raw_name(&[b"www", b"allowed", b"test"]));
                v.extend_from_slice(&[0, 1, 0, 1]);
            }
            let mut s = TcpStream::connect(dns).await.unwrap();
            tcp_send(&mut s, &v).await;
            match tokio::time::timeout(Duration::from_secs(2), tcp_recv(&mut s)).await {
                Ok(Ok(r)) if r.len() >= 12 && rcode_of(&r) == 1 && r[..2] == v[..2] => {}
                Ok(Ok(r)) => failures.push(format!("TCP two questions: reply {r:02x?}")),
                Ok(Err(_)) => failures.push("TCP two questions: connection closed without FORMERR".into()),
                Err(_) => failures.push("TCP two questions: no reply".into()),
            }
            // A zero-length TCP message.
            let mut s = TcpStream::connect(dns).await.unwrap();
            s.write_all(&[0, 0]).await.unwrap();
            let _ = tokio::time::timeout(Duration::from_millis(500), tcp_recv(&mut s)).await;
            assert_alive(dns, "TCP malformed messages").await;
        }

        // None of the malformed names reached the upstream.
        let seen = up.seen();
        let leaked: Vec<&Seen> = seen.iter().filter(|s| s.name != "www.allowed.test").collect();
        assert!(leaked.is_empty(), "malformed queries reached the upstream: {leaked:?}");

        assert!(failures.is_empty(), "malformed packets handled wrongly:\n  {}", failures.join("\n  "));
    })
    .await
}

// 14 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn chaos_version_bind_refused() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new()).await;
        let e = start_fw(&up, "", &[]).await;
        for name in ["version.bind", "hostname.bind", "id.server"] {
            let mut q = Message::new(next_id(), MessageType::Query, OpCode::Query);
            q.metadata.recursion_desired = true;
            let mut question = Query::query(fqdn(name), RecordType::TXT);
            question.set_query_class(DNSClass::CH);
            q.add_query(question);
            let r = ask_udp(e.dns_addr(), &q).await;
            assert_eq!(r.metadata.id, q.metadata.id, "{r:?}");
            assert_eq!(r.metadata.response_code, ResponseCode::Refused, "CH TXT {name}: {r:?}");
            assert!(r.answers.is_empty(), "CH TXT {name} answered: {r:?}");
            assert!(r.additionals.is_empty() && r.authorities.is_empty(), "CH TXT {name}: {r:?}");
            up.assert_never_saw(name);
        }
    })
    .await
}

// 15 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn audit_line_for_dns() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("www.allowed.test", "93.184.216.34", 300).aaaa(
            "www.allowed.test",
            "2606:2800::1",
            300,
        ))
        .await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        let (q, r) = ask(dns, "www.allowed.test", RecordType::A).await;
        assert_answered(&q, &r);
        let (q, r) = ask(dns, "www.allowed.test", RecordType::AAAA).await;
        assert_answered(&q, &r);
        assert_eq!(addrs_v6(&r), vec!["2606:2800::1".parse::<Ipv6Addr>().unwrap()], "{r:?}");
        let (q, r) = ask(dns, "unlisted.test", RecordType::A).await;
        assert_blocked(&q, &r, 15, "default");

        let a = e.audit("allow A", |v| is_dns(v, "www.allowed.test") && s(v, "qtype") == "A").await;
        assert_eq!(s(&a, "host"), "www.allowed.test", "{a}");
        assert_eq!(s(&a, "action"), "allow", "{a}");
        assert_eq!(s(&a, "rule"), "dns-allowed", "{a}");
        assert_eq!(s(&a, "reason"), "rule", "{a}");
        assert_eq!(s(&a, "client"), "127.0.0.1", "{a}");

        let aaaa = e.audit("allow AAAA", |v| is_dns(v, "www.allowed.test") && s(v, "qtype") == "AAAA").await;
        assert_eq!(s(&aaaa, "action"), "allow", "{aaaa}");

        let d = e.audit("deny", |v| is_dns(v, "unlisted.test")).await;
        assert_eq!(s(&d, "qtype"), "A", "{d}");
        assert_eq!(s(&d, "action"), "deny", "{d}");
        assert_eq!(s(&d, "rule"), "default", "{d}");
        assert_eq!(s(&d, "reason"), "default", "{d}");

        for v in [&a, &aaaa, &d] {
            assert!(!s(v, "ts").is_empty() || !s(v, "timestamp").is_empty(), "no timestamp: {v}");
        }
        // One audit line per query.
        let n = e.decisions().iter().filter(|v| s(v, "kind") == "dns").count();
        assert_eq!(n, 3, "expected 3 dns audit lines: {:?}", e.decisions());
    })
    .await
}

/// The audit `host` of a DNS query is the normalised name (lowercase, no trailing dot), as the
/// proxy's audit line is and as the policy matched it; a mixed-case query must not split one
/// name into many in the log.
#[tokio::test(flavor = "multi_thread")]
async fn dns_audit_host_is_the_normalised_name() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("www.allowed.test", "93.184.216.34", 300)).await;
        let e = start_fw(&up, "", &[]).await;
        let (q, r) = ask(e.dns_addr(), "WWW.Allowed.Test", RecordType::A).await;
        assert_answered(&q, &r);
        let (q, r) = ask(e.dns_addr(), "Www.UNLISTED.test", RecordType::A).await;
        assert_blocked(&q, &r, 15, "default");
        let a = e.audit("allow", |v| is_dns(v, "www.allowed.test")).await;
        let d = e.audit("deny", |v| is_dns(v, "www.unlisted.test")).await;
        assert_eq!(s(&a, "host"), "www.allowed.test", "audit host is not the normalised name: {a}");
        assert_eq!(s(&d, "host"), "www.unlisted.test", "audit host is not the normalised name: {d}");
    })
    .await
}

// Extras ---------------------------------------------------------------------------------------

/// HTTPS/SVCB answers: the TargetName must be allowed (reason cname) and ipv4hint/ipv6hint
/// addresses must avoid the guard's denied ranges (reason answer_ip).
#[tokio::test(flavor = "multi_thread")]
async fn https_svcb_target_and_hints_inspected() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(
            Zone::new()
                .svcb("svc1.allowed.test", 1, "cdn.unlisted.test", &[], &[], 300)
                .svcb("svc2.allowed.test", 1, ".", &["10.0.0.1"], &[], 300)
                .svcb("svc3.allowed.test", 1, ".", &[], &["fd00:ec2::254"], 300)
                .svcb("svc4.allowed.test", 1, "cdn.allowed.test", &["93.184.216.34"], &["2606:2800::1"], 300)
                .svcb("svc5.allowed.test", 1, "cdn.unlisted.test", &[], &[], 300),
        )
        .await;
        let e = start_fw(&up, "", &[]).await;
        let dns = e.dns_addr();

        let (q, r) = ask(dns, "svc1.allowed.test", RecordType::HTTPS).await;
        assert_blocked(&q, &r, 17, "cname");
        let (q, r) = ask(dns, "svc2.allowed.test", RecordType::HTTPS).await;
        assert_blocked(&q, &r, 17, "answer_ip");
        let (q, r) = ask(dns, "svc3.allowed.test", RecordType::HTTPS).await;
        assert_blocked(&q, &r, 17, "answer_ip");
        let (q, r) = ask(dns, "svc5.allowed.test", RecordType::SVCB).await;
        assert_blocked(&q, &r, 17, "cname");

        let (q, r) = ask(dns, "svc4.allowed.test", RecordType::HTTPS).await;
        assert_answered(&q, &r);
        assert!(r.answers.iter().any(|a| matches!(a.data, RData::HTTPS(_))), "{r:?}");
    })
    .await
}

/// An upstream reply whose id does not match the query is not accepted (no spoofed answer ever
/// reaches the client); with nothing else arriving, the client gets SERVFAIL.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_reply_with_wrong_id_is_ignored() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("spoof.allowed.test", "93.184.216.34", 300)).await;
        up.set_wrong_id(true);
        let e = start_fw(&up, "", &[]).await;
        let q = query_msg("spoof.allowed.test", RecordType::A, Some(1232));
        let started = Instant::now();
        let reply = udp_raw(e.dns_addr(), &q.to_vec().unwrap(), Duration::from_secs(6)).await;
        let r = parse(&reply.unwrap_or_else(|| panic!("no reply within 6 s")));
        check_echo(&q, &r);
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail, "a mismatched upstream reply was accepted: {r:?}");
        assert!(r.answers.is_empty(), "{r:?}");
        assert!(started.elapsed() <= Duration::from_millis(2500), "SERVFAIL after {:?}", started.elapsed());
    })
    .await
}

/// RFC 7766 idle timeout: a TCP connection without a query is closed after about 10 s.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_idle_connection_closed_after_10s() {
    bounded(TEST_TIMEOUT, async {
        let up = Upstream::start(Zone::new().a("www.allowed.test", "93.184.216.34", 300)).await;
        let e = start_fw(&up, "", &[]).await;
        let mut s = TcpStream::connect(e.dns_addr()).await.unwrap();
        // One query first: the timeout counts from the last activity.
        let q = query_msg("www.allowed.test", RecordType::A, None);
        tcp_send(&mut s, &q.to_vec().unwrap()).await;
        let r = parse(&tcp_recv(&mut s).await.unwrap());
        assert_answered(&q, &r);
        let started = Instant::now();
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(15), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(_)) => panic!("unexpected bytes on an idle connection"),
            Err(_) => panic!("idle TCP connection still open after 15 s"),
        }
        let idle = started.elapsed();
        assert!(idle >= Duration::from_secs(8), "idle connection closed after only {idle:?}");
        assert!(idle <= Duration::from_millis(12500), "idle connection closed after {idle:?} (10 s expected)");
    })
    .await
}
