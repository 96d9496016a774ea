//! One DNS query, start to finish: wire checks, the policy, the query type, tunneling, then
//! `[hosts]`, the cache or the upstream, then inspection of the answer before it is returned.
//!
//! A blocked name never reaches an upstream: policy, query type and tunneling are all decided
//! on the query alone, before anything is forwarded. Answers are inspected after the cache, so a
//! reloaded policy applies to cached answers too.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::rdata::svcb::SvcParamValue;
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name as DnsName, RData, Record, RecordType};

use super::tunneling::Detector;
use crate::config::{BlockedResponse, TunnelingAction, qtype_name};
use crate::policy::name::{Host, Name, NameError, normalize_name, wire_label_ok};
use crate::policy::{Action, Decision, Facts, Policy, Reason, Surface};
use crate::resolve::Resolver;
use crate::state::{Snapshot, State};
use crate::telemetry::{DecisionEvent, Kind};

/// How the query arrived; UDP answers must fit the client's advertised size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Largest UDP answer we send, whatever the client advertises (DNS Flag Day 2020).
const MAX_UDP: usize = 1232;
/// UDP answer size without EDNS (RFC 1035).
const PLAIN_UDP: usize = 512;
/// TTL of answers egressd makes itself (`[hosts]`, sinkhole).
const LOCAL_TTL: u32 = 60;
/// RFC 8914 Extended DNS Error codes.
const EDE_BLOCKED: u16 = 15;
const EDE_FILTERED: u16 = 17;
/// EDNS option code of Extended DNS Errors.
const EDE_OPTION: u16 = 15;

/// The DNS firewall: shared by every listener.
pub struct Firewall {
    pub state: Arc<State>,
    pub resolver: Arc<Resolver>,
    pub detector: Arc<Detector>,
}

/// What to answer and how to log it.
struct Outcome {
    decision: Decision,
    /// The rule named in the log (may differ from `decision.rule` for a CNAME target's rule).
    rule_name: String,
    response: Message,
}

impl Firewall {
    /// Answers one DNS message; `None` means no reply (not a query, or too broken to answer).
    pub async fn handle(&self, packet: &[u8], client: IpAddr, transport: Transport) -> Option<Vec<u8>> {
        let started = Instant::now();
        let (query, limit, raw_name, name) = match check_query(packet, transport) {
            Precheck::Reply(reply) => return reply,
            Precheck::Query { query, limit, raw_name, name } => (query, limit, raw_name, name),
        };
        let snap = self.state.snapshot();
        let qtype = qtype_name(u16::from(query.queries[0].query_type()));
        let (outcome, logged_name) = match name {
            Err(_) => (blocked(&snap, &query, Decision::MALFORMED, "default", EDE_BLOCKED), raw_name.clone()),
            Ok(name) => (self.decide_and_answer(&snap, &query, &name, client).await, name.to_string()),
        };
        DecisionEvent {
            id: &crate::telemetry::next_id(),
            kind: Kind::Dns,
            client,
            host: logged_name.trim_end_matches('.'),
            port: None,
            qtype: Some(&qtype),
            action: outcome.decision.action,
            rule: &outcome.rule_name,
            reason: outcome.decision.reason,
            upstream_ip: None,
            bytes_up: 0,
            bytes_down: 0,
            duration: started.elapsed(),
        }
        .emit();
        encode(outcome.response, limit)
    }

    async fn decide_and_answer(&self, snap: &Snapshot, query: &Message, name: &Name, client: IpAddr) -> Outcome {
        let policy = &snap.policy;
        let dns = &snap.config.dns;
        let qtype = query.queries[0].query_type();
        let host = Host::Name(name.clone());
        let facts = Facts {
            host: &host,
            port: None,
            client: Some(client),
            method: None,
            body_len: None,
            surface: Surface::Dns,
        };
        let mut decision = policy.decide(&facts);
        let rule = policy.rule_name(decision.rule).to_string();
        if decision.action == Action::Deny {
            return blocked(snap, query, decision, &rule, EDE_BLOCKED);
        }
        if !dns.allowed_qtypes.contains(&u16::from(qtype)) {
            return blocked(snap, query, decision.denied_for(Reason::Qtype), &rule, EDE_BLOCKED);
        }
        if let Some(finding) = self.detector.check(client, name.as_str(), Instant::now()) {
            crate::telemetry::metrics().count_tunneling(dns.tunneling.action);
            match dns.tunneling.action {
                TunnelingAction::Block => {
                    tracing::debug!(name = %name, detail = %finding.detail, "Tunneling suspected; blocked");
                    return blocked(snap, query, decision.denied_for(Reason::Tunneling), &rule, EDE_BLOCKED);
                }
                TunnelingAction::Alert => {
                    tracing::warn!(name = %name, detail = %finding.detail, "Tunneling suspected; alert only");
                    decision = Decision { action: Action::Alert, rule: decision.rule, reason: Reason::Tunneling };
                }
                TunnelingAction::Off => {}
            }
        }
        let mut response = base_response(query);
        if let Some(addrs) = self.resolver.static_hosts(name) {
            response.metadata.authoritative = true;
            response.add_answers(static_answer(&query.queries[0], &addrs));
        } else {
            let dnssec_ok = query.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
            match self.resolver.query(name, qtype, dnssec_ok).await {
                Ok((upstream, hit)) => {
                    let m = crate::telemetry::metrics();
                    if hit {
                        m.dns_cache_hits.inc()
                    } else {
                        m.dns_cache_misses.inc()
                    }
                    copy_answer(&mut response, upstream, dns.max_ttl)
                }
                Err(e) => {
                    tracing::debug!(name = %name, error = %e, "Upstream failed; SERVFAIL");
                    response.metadata.response_code = ResponseCode::ServFail;
                    return Outcome { decision: decision.denied_for(Reason::Upstream), rule_name: rule, response };
                }
            }
        }
        if let Some((reason, by)) = inspect(policy, &response, client, dns.inspect_cnames) {
            let by_name = by.unwrap_or_else(|| rule.clone());
            return blocked(snap, query, decision.denied_for(reason), &by_name, EDE_FILTERED);
        }
        Outcome { decision, rule_name: rule, response }
    }
}

/// The outcome of the pure first stage of [`Firewall::handle`].
#[doc(hidden)]
#[derive(Debug)]
pub enum Precheck {
    /// Answer with these bytes (FORMERR, NOTIMP, REFUSED), or send nothing (`None`).
    Reply(Option<Vec<u8>>),
    /// A single-question query that passed the wire checks; answers must fit in `limit` bytes.
    /// `name` is the question's name normalised (an error is answered as malformed).
    Query { query: Message, limit: usize, raw_name: String, name: Result<Name, NameError> },
}

/// The part of [`Firewall::handle`] that needs no state: parse, drop what is not a query,
/// answer wire-format errors, and normalise the question's name. Public for the fuzzers.
#[doc(hidden)]
pub fn check_query(packet: &[u8], transport: Transport) -> Precheck {
    let Ok(query) = Message::from_vec(packet) else {
        return Precheck::Reply(formerr_from_header(packet));
    };
    if query.metadata.message_type != MessageType::Query {
        return Precheck::Reply(None);
    }
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => {
            query.edns.as_ref().map_or(PLAIN_UDP, |e| usize::from(e.max_payload()).clamp(PLAIN_UDP, MAX_UDP))
        }
    };
    if let Some(code) = wire_error(&query) {
        let mut resp = base_response(&query);
        resp.metadata.response_code = code;
        return Precheck::Reply(encode(resp, limit));
    }
    let raw_name = query.queries[0].name().to_ascii();
    let name = normalize_name(raw_name.trim_end_matches('.'));
    Precheck::Query { query, limit, raw_name, name }
}

/// The wire-form checks that come before any name handling.
fn wire_error(query: &Message) -> Option<ResponseCode> {
    if query.metadata.op_code != OpCode::Query {
        return Some(ResponseCode::NotImp);
    }
    let [q] = query.queries.as_slice() else {
        return Some(ResponseCode::FormErr);
    };
    if !query.answers.is_empty() || !query.authorities.is_empty() {
        return Some(ResponseCode::FormErr);
    }
    match q.query_class() {
        DNSClass::IN => {}
        // CHAOS (`version.bind`, `hostname.bind`): never disclose anything.
        DNSClass::CH => return Some(ResponseCode::Refused),
        _ => return Some(ResponseCode::FormErr),
    }
    // A dot, NUL, space or high byte inside a label is malformed, not a different name.
    if !q.name().iter().all(wire_label_ok) {
        return Some(ResponseCode::FormErr);
    }
    None
}

/// A FORMERR for a message too broken to parse, when at least its header is a query's.
fn formerr_from_header(packet: &[u8]) -> Option<Vec<u8>> {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        return None;
    }
    let opcode_bits = packet[2] & 0x78;
    let rd = packet[2] & 0x01;
    let mut out = vec![0u8; 12];
    out[0] = packet[0];
    out[1] = packet[1];
    out[2] = 0x80 | opcode_bits | rd;
    out[3] = 0x80 | ResponseCode::FormErr.low();
    Some(out)
}

/// A response skeleton: id, question, RD echoed, RA set, and EDNS when the client used it.
/// The question is echoed only when there is exactly one: the FORMERR for a message with many
/// questions must not echo them all (it would outgrow the UDP limit even when truncated).
pub(crate) fn base_response(query: &Message) -> Message {
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.checking_disabled = query.metadata.checking_disabled;
    if let [q] = query.queries.as_slice() {
        resp.add_query(q.clone());
    }
    if let Some(q) = &query.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP as u16);
        edns.set_dnssec_ok(q.flags().dnssec_ok);
        resp.set_edns(edns);
    }
    resp
}

/// The configured blocked response, with an Extended DNS Error naming the rule.
fn blocked(snap: &Snapshot, query: &Message, decision: Decision, rule: &str, ede: u16) -> Outcome {
    let dns = &snap.config.dns;
    let mut resp = base_response(query);
    let q = &query.queries[0];
    match dns.blocked_response {
        BlockedResponse::NxDomain => resp.metadata.response_code = ResponseCode::NXDomain,
        BlockedResponse::NoData => {}
        BlockedResponse::Refused => resp.metadata.response_code = ResponseCode::Refused,
        BlockedResponse::Sinkhole if decision.reason == Reason::Malformed => {
            resp.metadata.response_code = ResponseCode::NXDomain;
        }
        BlockedResponse::Sinkhole => {
            let addr = match q.query_type() {
                RecordType::A => Some(RData::A(A(dns.sinkhole_ipv4))),
                RecordType::AAAA => Some(RData::AAAA(AAAA(dns.sinkhole_ipv6))),
                _ => None,
            };
            if let Some(rdata) = addr {
                resp.add_answer(Record::from_rdata(q.name().clone(), LOCAL_TTL, rdata));
            }
        }
    }
    if let Some(edns) = resp.edns.as_mut() {
        let text = format!("egressd: rule={rule}; reason={}", decision.reason);
        let mut data = ede.to_be_bytes().to_vec();
        data.extend_from_slice(text.as_bytes());
        edns.options_mut().insert(EdnsOption::Unknown(EDE_OPTION, data));
    }
    Outcome { decision, rule_name: rule.to_string(), response: resp }
}

/// `[hosts]` answers: A or AAAA from the table; other types get NODATA.
fn static_answer(q: &Query, addrs: &[IpAddr]) -> Vec<Record> {
    addrs
        .iter()
        .filter_map(|ip| match (q.query_type(), ip) {
            (RecordType::A, IpAddr::V4(v4)) => Some(RData::A(A(*v4))),
            (RecordType::AAAA, IpAddr::V6(v6)) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .map(|rdata| Record::from_rdata(q.name().clone(), LOCAL_TTL, rdata))
        .collect()
}

/// Copies the upstream's rcode and sections into our response, TTLs capped at `max_ttl`.
pub(crate) fn copy_answer(resp: &mut Message, mut upstream: Message, max_ttl: Duration) {
    let cap = u32::try_from(max_ttl.as_secs()).unwrap_or(u32::MAX);
    resp.metadata.response_code = upstream.metadata.response_code;
    resp.metadata.authentic_data = upstream.metadata.authentic_data;
    let capped = |mut r: Record| {
        r.ttl = r.ttl.min(cap);
        r
    };
    resp.add_answers(std::mem::take(&mut upstream.answers).into_iter().map(capped));
    resp.add_authorities(std::mem::take(&mut upstream.authorities).into_iter().map(capped));
    resp.add_additionals(
        std::mem::take(&mut upstream.additionals)
            .into_iter()
            .filter(|r| r.record_type() != RecordType::OPT)
            .map(capped),
    );
}

/// A name in an answer, normalised; `None` when it is not a valid name at all.
fn answer_name(name: &DnsName) -> Option<Name> {
    if !name.iter().all(wire_label_ok) {
        return None;
    }
    normalize_name(name.to_ascii().trim_end_matches('.')).ok()
}

/// Checks an answer: every CNAME/DNAME/SVCB target must itself be allowed (with
/// `inspect_cnames`), and no address may fall in the guard's denied ranges. Returns the reason
/// and, for a refused target name, the name of the rule (or `default`) that refused it; `None`
/// when the answer may be returned.
pub(crate) fn inspect(
    policy: &Policy,
    resp: &Message,
    client: IpAddr,
    inspect_cnames: bool,
) -> Option<(Reason, Option<String>)> {
    let allowed = |target: &DnsName| -> Result<(), String> {
        let Some(name) = answer_name(target) else { return Err("default".to_string()) };
        let host = Host::Name(name);
        let facts = Facts {
            host: &host,
            port: None,
            client: Some(client),
            method: None,
            body_len: None,
            surface: Surface::Dns,
        };
        let d = policy.decide(&facts);
        if d.action.permits() { Ok(()) } else { Err(policy.rule_name(d.rule).to_string()) }
    };
    let guard = policy.guard();
    for record in resp.answers.iter().chain(resp.additionals.iter()) {
        match &record.data {
            RData::A(a) if !guard.permits(IpAddr::V4(a.0)) => return Some((Reason::AnswerIp, None)),
            RData::AAAA(a) if !guard.permits(IpAddr::V6(a.0)) => return Some((Reason::AnswerIp, None)),
            RData::CNAME(c) if inspect_cnames => {
                if let Err(rule) = allowed(&c.0) {
                    return Some((Reason::Cname, Some(rule)));
                }
            }
            RData::HTTPS(h) => {
                if let Some(found) = inspect_svcb(&h.0, &allowed, guard, inspect_cnames) {
                    return Some(found);
                }
            }
            RData::SVCB(s) => {
                if let Some(found) = inspect_svcb(s, &allowed, guard, inspect_cnames) {
                    return Some(found);
                }
            }
            _ => {}
        }
    }
    None
}

fn inspect_svcb(
    svcb: &hickory_proto::rr::rdata::SVCB,
    allowed: &dyn Fn(&DnsName) -> Result<(), String>,
    guard: &crate::policy::guard::Guard,
    inspect_cnames: bool,
) -> Option<(Reason, Option<String>)> {
    if inspect_cnames && !svcb.target_name.is_root() {
        if let Err(rule) = allowed(&svcb.target_name) {
            return Some((Reason::Cname, Some(rule)));
        }
    }
    for (_, value) in &svcb.svc_params {
        let refused = match value {
            SvcParamValue::Ipv4Hint(h) => h.0.iter().any(|a| !guard.permits(IpAddr::V4(a.0))),
            SvcParamValue::Ipv6Hint(h) => h.0.iter().any(|a| !guard.permits(IpAddr::V6(a.0))),
            _ => false,
        };
        if refused {
            return Some((Reason::AnswerIp, None));
        }
    }
    None
}

/// Encodes a response within `limit` bytes: additional records go first, then everything but
/// the question, with TC set so the client retries over TCP.
pub(crate) fn encode(mut resp: Message, limit: usize) -> Option<Vec<u8>> {
    let wire = resp.to_vec().ok()?;
    if wire.len() <= limit {
        return Some(wire);
    }
    resp.additionals.clear();
    if let Ok(wire) = resp.to_vec() {
        if wire.len() <= limit {
            return Some(wire);
        }
    }
    let mut truncated = resp.truncate();
    let wire = truncated.to_vec().ok()?;
    if wire.len() <= limit {
        return Some(wire);
    }
    // Even the question section does not fit (several long questions in a refused query):
    // the header alone, with TC, so the client retries over TCP.
    truncated.queries.clear();
    truncated.edns = None;
    truncated.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formerr_for_many_questions_fits_udp() {
        // Found by the dns_message fuzzer: 32 questions echoed in a FORMERR made a 1241-byte
        // UDP reply even after truncation.
        let mut query = Message::query();
        query.metadata.id = 7;
        for i in 0..40 {
            let name = DnsName::from_ascii(format!("{}.example.org.", "a".repeat(20 + i))).unwrap();
            query.add_query(Query::query(name, RecordType::A));
        }
        let packet = query.to_vec().unwrap();
        let Precheck::Reply(Some(reply)) = check_query(&packet, Transport::Udp) else { panic!("no FORMERR") };
        assert!(reply.len() <= PLAIN_UDP, "{} bytes", reply.len());
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!((reply.metadata.id, reply.metadata.response_code), (7, ResponseCode::FormErr));
        assert!(reply.queries.is_empty());
    }

    #[test]
    fn formerr_from_header_only_for_queries() {
        assert_eq!(formerr_from_header(&[0x12, 0x34, 0x01, 0, 0, 1]), None, "short");
        let q = [0x12, 0x34, 0x01, 0x00, 0, 2, 0, 0, 0, 0, 0, 0, 0xff];
        let r = formerr_from_header(&q).unwrap();
        assert_eq!(&r[..4], &[0x12, 0x34, 0x81, 0x81]);
        let resp = [0x12, 0x34, 0x81, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(formerr_from_header(&resp), None, "never answer a response");
    }
}
