//! The proxy's resolver: which addresses a destination name stands for.
//!
//! This module owns name-to-address resolution for outgoing proxy connections. The `[hosts]`
//! table is consulted first and answers without touching the network; every other name is
//! resolved by querying A and AAAA concurrently through [`Upstreams::exchange`] (the single
//! path to the network, see [`upstream`]) and taking the addresses from the answer section —
//! only records owned by the name itself or by a CNAME target reached from it within the same
//! answer, so an upstream cannot slip in addresses for unrelated owners. IPv4 addresses come
//! first, then IPv6, each in upstream order.

pub mod cache;
pub mod upstream;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name as DnsName, RData, RecordType};

use crate::policy::name::Name;

pub use cache::{Cache, CacheKey};
pub use upstream::{DNS_PORT, EDNS_UDP_PAYLOAD, RESOLV_CONF, UpstreamError, Upstreams};

/// Most CNAME links followed from the queried name within one answer.
pub const MAX_CNAME_HOPS: usize = 16;

/// Why a name has no addresses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The name does not exist (NXDOMAIN) or has no A/AAAA records.
    #[error("no such host (NXDOMAIN, or no A/AAAA records)")]
    NotFound,
    /// The upstreams could not give an answer.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// `[hosts]` plus the upstreams. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Resolver {
    hosts: ArcSwap<HashMap<Name, Arc<[IpAddr]>>>,
    upstreams: Upstreams,
    cache: Cache,
}

/// What one A or AAAA query established.
enum Outcome {
    /// Addresses, and the CNAME targets the answer went through to reach them.
    Addresses(Vec<IpAddr>, Vec<String>),
    /// NOERROR without addresses of this type.
    NoData,
    NxDomain,
}

impl Resolver {
    /// `hosts` is the `[hosts]` table: checked first, answered without any upstream query. If a
    /// name appears twice, the first entry wins.
    pub fn new(hosts: Vec<(Name, Vec<IpAddr>)>, upstreams: Upstreams) -> Self {
        Self::with_cache(hosts, upstreams, Cache::new(0, std::time::Duration::ZERO))
    }

    /// As [`Resolver::new`], with the answer cache shared by the proxy and the DNS firewall.
    pub fn with_cache(hosts: Vec<(Name, Vec<IpAddr>)>, upstreams: Upstreams, cache: Cache) -> Self {
        Resolver { hosts: ArcSwap::from_pointee(hosts_table(hosts)), upstreams, cache }
    }

    /// Replaces the `[hosts]` table (on reload).
    pub fn set_hosts(&self, hosts: Vec<(Name, Vec<IpAddr>)>) {
        self.hosts.store(Arc::new(hosts_table(hosts)));
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// One query for `name`/`qtype` through the cache: concurrent misses for the same key
    /// coalesce into one upstream exchange. Returns the response (id 0, no OPT) and whether it
    /// came without an exchange of this caller's own.
    pub async fn query(
        &self,
        name: &Name,
        qtype: RecordType,
        dnssec_ok: bool,
    ) -> Result<(Message, bool), UpstreamError> {
        let qname = dns_name(name)?;
        let key = CacheKey::new(&qname, qtype, dnssec_ok);
        self.cache
            .get_or_fetch(key, Instant::now(), || async {
                let mut message = Message::new(0, MessageType::Query, OpCode::Query);
                message.metadata.recursion_desired = true;
                message.add_query(Query::query(qname.clone(), qtype));
                if dnssec_ok {
                    let mut edns = Edns::new();
                    edns.set_max_payload(EDNS_UDP_PAYLOAD);
                    edns.set_dnssec_ok(true);
                    message.set_edns(edns);
                }
                let started = Instant::now();
                let result = self.upstreams.exchange(&message).await;
                crate::telemetry::metrics().dns_upstream_seconds.observe(started.elapsed().as_secs_f64());
                result
            })
            .await
    }

    /// The upstreams behind this resolver (for `describe()` and, later, the DNS listener).
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// The `[hosts]` entry for `name`, if any.
    pub fn static_hosts(&self, name: &Name) -> Option<Arc<[IpAddr]>> {
        self.hosts.load().get(name).cloned()
    }

    /// Addresses for `name`: from `[hosts]` if listed there; otherwise A and AAAA are queried
    /// concurrently and the addresses of both answers returned, IPv4 first. NXDOMAIN, or no
    /// addresses in either answer, is [`ResolveError::NotFound`]. If one query fails and the
    /// other gives addresses, those are returned; if neither gives addresses and at least one
    /// failed (and none said NXDOMAIN), the failure is returned — the name may well have
    /// addresses we could not learn.
    pub async fn lookup_ip(&self, name: &Name) -> Result<Vec<IpAddr>, ResolveError> {
        self.lookup(name).await.map(|r| r.addrs)
    }

    /// As [`Resolver::lookup_ip`], with the CNAME targets (lowercase, no trailing dot) that
    /// the answers passed through, so the proxy can hold them to the policy as the DNS
    /// firewall does.
    pub async fn lookup(&self, name: &Name) -> Result<Resolved, ResolveError> {
        if let Some(addrs) = self.static_hosts(name) {
            return if addrs.is_empty() {
                Err(ResolveError::NotFound)
            } else {
                Ok(Resolved { addrs: addrs.to_vec(), aliases: Vec::new() })
            };
        }
        let qname = dns_name(name)?;
        let (v4, v6) = tokio::join!(
            self.lookup_type(name, &qname, RecordType::A),
            self.lookup_type(name, &qname, RecordType::AAAA)
        );
        combine(v4, v6)
    }

    async fn lookup_type(&self, name: &Name, qname: &DnsName, rtype: RecordType) -> Result<Outcome, UpstreamError> {
        let (response, _) = self.query(name, rtype, false).await?;
        match response.response_code {
            ResponseCode::NoError => {
                let addrs = answer_addresses(&response, qname, rtype);
                let aliases = cname_chain(&response.answers, qname)
                    .iter()
                    .skip(1)
                    .map(|n| n.to_ascii().trim_end_matches('.').to_ascii_lowercase())
                    .collect();
                Ok(if addrs.is_empty() { Outcome::NoData } else { Outcome::Addresses(addrs, aliases) })
            }
            ResponseCode::NXDomain => Ok(Outcome::NxDomain),
            other => Err(UpstreamError::Rcode(other)),
        }
    }
}

/// The `[hosts]` table; if a name appears twice, the first entry wins.
fn hosts_table(hosts: Vec<(Name, Vec<IpAddr>)>) -> HashMap<Name, Arc<[IpAddr]>> {
    let mut table = HashMap::with_capacity(hosts.len());
    for (name, addrs) in hosts {
        table.entry(name).or_insert_with(|| Arc::from(addrs));
    }
    table
}

/// A name's addresses and the CNAME targets passed through to reach them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub addrs: Vec<IpAddr>,
    pub aliases: Vec<String>,
}

/// The A and AAAA outcomes as one result (see [`Resolver::lookup_ip`]).
fn combine(v4: Result<Outcome, UpstreamError>, v6: Result<Outcome, UpstreamError>) -> Result<Resolved, ResolveError> {
    let mut out = Resolved::default();
    for outcome in [&v4, &v6] {
        if let Ok(Outcome::Addresses(a, aliases)) = outcome {
            out.addrs.extend_from_slice(a);
            for alias in aliases {
                if !out.aliases.contains(alias) {
                    out.aliases.push(alias.clone());
                }
            }
        }
    }
    if !out.addrs.is_empty() {
        return Ok(out);
    }
    match (v4, v6) {
        (Ok(Outcome::NxDomain), _) | (_, Ok(Outcome::NxDomain)) => Err(ResolveError::NotFound),
        (Ok(_), Ok(_)) => Err(ResolveError::NotFound),
        (Err(e), _) | (_, Err(e)) => Err(ResolveError::Upstream(e)),
    }
}

/// The wire form of a normalised name (always absolute).
fn dns_name(name: &Name) -> Result<DnsName, UpstreamError> {
    DnsName::from_labels(name.as_str().split('.').map(str::as_bytes))
        .map_err(|e| UpstreamError::BadQuery(format!("name {:?}: {e}", name.as_str())))
}

/// The `rtype` addresses of `response`'s answer section for `qname`: records owned by `qname`
/// or by a name reached from it through CNAMEs in the same answer (at most
/// [`MAX_CNAME_HOPS`] links, loops cut), class IN, in answer order, duplicates dropped.
/// Records for any other owner are ignored however the upstream labelled them.
fn answer_addresses(response: &Message, qname: &DnsName, rtype: RecordType) -> Vec<IpAddr> {
    let answers = &response.answers;
    let chain = cname_chain(answers, qname);

    let mut out: Vec<IpAddr> = Vec::new();
    for record in answers {
        if record.dns_class != DNSClass::IN || !chain.iter().any(|n| n.eq_ignore_root(&record.name)) {
            continue;
        }
        let ip = match (&record.data, rtype) {
            (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
            (RData::AAAA(aaaa), RecordType::AAAA) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// `qname` and the names its CNAMEs lead to within `answers` (at most [`MAX_CNAME_HOPS`]
/// links, loops cut), in order.
fn cname_chain<'a>(answers: &'a [hickory_proto::rr::Record], qname: &'a DnsName) -> Vec<&'a DnsName> {
    let mut chain: Vec<&DnsName> = vec![qname];
    let mut current = qname;
    for _ in 0..MAX_CNAME_HOPS {
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.dns_class == DNSClass::IN && r.name.eq_ignore_root(current) => Some(&target.0),
            _ => None,
        });
        match next {
            Some(target) if !chain.iter().any(|n| n.eq_ignore_root(target)) => {
                chain.push(target);
                current = target;
            }
            _ => break,
        }
    }
    chain
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::{Duration, Instant};

    use crate::config::Upstream;
    use crate::policy::name::normalize_name;

    use super::upstream::test_server::{Reply, TestServer, a, aaaa, cname, respond};
    use super::*;

    const T: Duration = Duration::from_secs(2);
    const V4A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const V4B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
    const V6A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    const V6B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

    fn n(s: &str) -> Name {
        normalize_name(s).expect("valid name")
    }

    fn resolver(server: &TestServer, hosts: Vec<(Name, Vec<IpAddr>)>, timeout: Duration) -> Resolver {
        let upstreams = Upstreams::new(&[Upstream::Plain(server.addr)], timeout).expect("upstreams");
        Resolver::new(hosts, upstreams)
    }

    fn qtype(q: &Message) -> RecordType {
        q.queries.first().map(|q| q.query_type()).unwrap_or(RecordType::NULL)
    }

    #[tokio::test]
    async fn a_and_aaaa_in_order() {
        let server = TestServer::start(|q, _| {
            let answers = match qtype(q) {
                RecordType::A => vec![a("www.example.com.", V4B), a("www.example.com.", V4A)],
                RecordType::AAAA => vec![aaaa("www.example.com.", V6B), aaaa("www.example.com.", V6A)],
                _ => vec![],
            };
            vec![Reply::Msg(respond(q, ResponseCode::NoError, answers))]
        })
        .await;
        let r = resolver(&server, vec![], T);
        let addrs = r.lookup_ip(&n("WWW.Example.com")).await.expect("addresses");
        assert_eq!(addrs, vec![IpAddr::V4(V4B), IpAddr::V4(V4A), IpAddr::V6(V6B), IpAddr::V6(V6A)]);
        assert_eq!(server.queries(), 2);
    }

    #[tokio::test]
    async fn hosts_never_reach_the_upstream() {
        let server = TestServer::start(|q, _| vec![Reply::Msg(respond(q, ResponseCode::NoError, vec![]))]).await;
        let hosts = vec![
            (n("internal.example"), vec![IpAddr::V4(V4A), IpAddr::V6(V6A)]),
            (n("internal.example"), vec![IpAddr::V4(V4B)]),
            (n("empty.example"), vec![]),
        ];
        let r = resolver(&server, hosts, T);
        assert_eq!(r.static_hosts(&n("internal.example")).as_deref(), Some(&[IpAddr::V4(V4A), IpAddr::V6(V6A)][..]));
        assert_eq!(r.static_hosts(&n("other.example")), None);
        let addrs = r.lookup_ip(&n("Internal.Example.")).await.expect("hosts entry");
        assert_eq!(addrs, vec![IpAddr::V4(V4A), IpAddr::V6(V6A)]);
        assert_eq!(r.lookup_ip(&n("empty.example")).await, Err(ResolveError::NotFound));
        assert_eq!(server.queries(), 0);
        // A name that is not listed does go upstream.
        let _ = r.lookup_ip(&n("other.example")).await;
        assert_eq!(server.queries(), 2);
        assert_eq!(r.upstreams().describe(), vec![format!("{} (udp+tcp)", server.addr)]);
    }

    #[tokio::test]
    async fn cname_chain_is_followed_and_unrelated_owners_ignored() {
        let server = TestServer::start(|q, _| {
            let answers = match qtype(q) {
                RecordType::A => vec![
                    // Injected records for owners outside the chain: must be ignored.
                    a("evil.example.", Ipv4Addr::new(203, 0, 113, 66)),
                    a("cdn.example.net.", Ipv4Addr::new(203, 0, 113, 67)),
                    cname("www.example.com.", "edge.example.net."),
                    cname("EDGE.example.net.", "host.example.org."),
                    a("Host.Example.Org.", V4A),
                    // A CNAME from an unrelated owner does not extend the chain.
                    cname("evil.example.", "evil2.example."),
                    a("evil2.example.", Ipv4Addr::new(203, 0, 113, 68)),
                    // Wrong type for this question.
                    aaaa("host.example.org.", V6B),
                ],
                RecordType::AAAA => {
                    vec![cname("www.example.com.", "edge.example.net."), aaaa("edge.example.net.", V6A)]
                }
                _ => vec![],
            };
            vec![Reply::Msg(respond(q, ResponseCode::NoError, answers))]
        })
        .await;
        let r = resolver(&server, vec![], T);
        let addrs = r.lookup_ip(&n("www.example.com")).await.expect("addresses");
        assert_eq!(addrs, vec![IpAddr::V4(V4A), IpAddr::V6(V6A)]);
    }

    #[test]
    fn cname_loops_and_long_chains_are_bounded() {
        let qname = dns_name(&n("l0.example")).expect("name");
        let mut query = Message::new(1, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(qname.clone(), RecordType::A));

        // A loop l0 -> l1 -> l0 with an address on l1.
        let looped = respond(
            &query,
            ResponseCode::NoError,
            vec![cname("l0.example.", "l1.example."), cname("l1.example.", "l0.example."), a("l1.example.", V4A)],
        );
        assert_eq!(answer_addresses(&looped, &qname, RecordType::A), vec![IpAddr::V4(V4A)]);

        // A chain of exactly MAX_CNAME_HOPS links is followed; one more link is not.
        let chain = |links: usize| {
            let mut answers: Vec<_> =
                (0..links).map(|i| cname(&format!("l{i}.example."), &format!("l{}.example.", i + 1))).collect();
            answers.push(a(&format!("l{links}.example."), V4B));
            respond(&query, ResponseCode::NoError, answers)
        };
        assert_eq!(answer_addresses(&chain(MAX_CNAME_HOPS), &qname, RecordType::A), vec![IpAddr::V4(V4B)]);
        assert!(answer_addresses(&chain(MAX_CNAME_HOPS + 1), &qname, RecordType::A).is_empty());
    }

    #[tokio::test]
    async fn nxdomain_is_not_found() {
        let server = TestServer::start(|q, _| vec![Reply::Msg(respond(q, ResponseCode::NXDomain, vec![]))]).await;
        let r = resolver(&server, vec![], T);
        assert_eq!(r.lookup_ip(&n("nope.example")).await, Err(ResolveError::NotFound));
    }

    #[tokio::test]
    async fn no_addresses_is_not_found() {
        let server = TestServer::start(|q, _| {
            // Only an unrelated owner's address: nothing for the name itself.
            vec![Reply::Msg(respond(q, ResponseCode::NoError, vec![a("other.example.", V4A)]))]
        })
        .await;
        let r = resolver(&server, vec![], T);
        assert_eq!(r.lookup_ip(&n("empty.example")).await, Err(ResolveError::NotFound));
    }

    #[tokio::test]
    async fn one_query_failing_still_gives_the_other_addresses() {
        let server = TestServer::start(|q, _| match qtype(q) {
            RecordType::A => vec![Reply::Msg(respond(q, ResponseCode::NoError, vec![a("half.example.", V4A)]))],
            _ => vec![Reply::Msg(respond(q, ResponseCode::ServFail, vec![]))],
        })
        .await;
        let r = resolver(&server, vec![], T);
        assert_eq!(r.lookup_ip(&n("half.example")).await, Ok(vec![IpAddr::V4(V4A)]));
    }

    #[tokio::test]
    async fn failure_plus_nodata_is_an_upstream_error() {
        let server = TestServer::start(|q, _| match qtype(q) {
            RecordType::A => vec![Reply::Msg(respond(q, ResponseCode::NoError, vec![]))],
            _ => vec![Reply::Msg(respond(q, ResponseCode::ServFail, vec![]))],
        })
        .await;
        let r = resolver(&server, vec![], T);
        assert_eq!(r.lookup_ip(&n("half.example")).await, Err(ResolveError::Upstream(UpstreamError::ServFail)));
    }

    #[tokio::test]
    async fn other_rcodes_are_reported() {
        let server = TestServer::start(|q, _| vec![Reply::Msg(respond(q, ResponseCode::FormErr, vec![]))]).await;
        let r = resolver(&server, vec![], T);
        assert_eq!(
            r.lookup_ip(&n("x.example")).await,
            Err(ResolveError::Upstream(UpstreamError::Rcode(ResponseCode::FormErr)))
        );
    }

    #[tokio::test]
    async fn silent_upstream_times_out() {
        let server = TestServer::silent().await;
        let timeout = Duration::from_millis(300);
        let r = resolver(&server, vec![], timeout);
        let start = Instant::now();
        assert_eq!(r.lookup_ip(&n("x.example")).await, Err(ResolveError::Upstream(UpstreamError::Timeout)));
        // A and AAAA run concurrently: one timeout, not two.
        assert!(start.elapsed() < timeout + Duration::from_millis(500), "took {:?}", start.elapsed());
    }
}
