//! The bypass corpus (issue 6, part 1): hostile spellings of forbidden destinations sent to a
//! running `egressd run`, one named test per case, grouped by module:
//!
//! - [`url`]: URL confusion in the request target and `Host`.
//! - [`address`]: IP-literal spellings, embedded-IPv4 forms, names that resolve to loopback.
//! - [`smuggling`]: framing disagreements, pipelining and keep-alive reuse.
//! - [`connect`]: CONNECT authorities and hostile ClientHellos.
//! - [`dns`]: wire-form tricks, query types, answers and tunnel-shaped query streams.
//! - [`scope`]: rules that must not reach further than written (deny wins, `applies_to`,
//!   `clients`).
//!
//! Every case runs against its own [`Fixture`]: egressd, an allowed origin on `127.0.0.1:P`
//! (plain HTTP, or TLS when the first byte is a handshake record), a recorder standing for the
//! denied name on `127.0.0.2:P` (`denied.test` in `[hosts]`), a recorder on a guard-denied
//! address `127.0.0.3:P` (the config's `guard.allow_cidrs` holds only 127.0.0.1/32 and
//! 127.0.0.2/32), one on `[::1]:P`, and a DNS upstream that records every query it receives. All
//! origins share the port P, so a request that egressd sends to the wrong host lands on a
//! recorder instead of a closed port.
//!
//! The oracle of every case is [`Fixture::verdict`]: after a short settle, the denied
//! recorders accepted no connection, the allowed origin got no request or SNI naming a denied
//! host (and, unless the case allows it, no connection or byte at all), the upstream saw no
//! name outside the case's list and no label outside LDH+`_`, and egressd is alive and still
//! serves an allowed request and an allowed DNS query. What the client was told (403, 400,
//! FORMERR) is checked too, but only as a second opinion.
//!
//! Only loopback is bound. Embedded-IPv4 forms outside loopback (NAT64, 6to4, Teredo) are sent
//! only where the contract says egressd refuses them before connecting; those cases also
//! check `egressd explain` and that the answer is a 403, not a 502/504 from a dial attempt.

#[path = "../common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Egressd, Opts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use client::{Exchange, Tunnel, fill};
use client::{dns_udp, exchange};
use origins::{AllowedOrigin, Recorder, Upstream, Zone};

/// Bound on one case, fixture start and liveness probe included.
pub const CASE_LIMIT: Duration = Duration::from_secs(20);
/// How long to wait after a case before reading the recorders (anything egressd was going to
/// send has been sent by then: every case first waits for its answer or for the close).
pub const SETTLE: Duration = Duration::from_millis(200);
/// How long a client waits for egressd's answer.
pub const ANSWER_WAIT: Duration = Duration::from_secs(3);

/// One named case: a `#[tokio::test]` with a fresh [`Fixture`] bound to `$fx`, bounded in time.
macro_rules! case {
    ($(#[$attr:meta])* $name:ident, |$fx:ident| $body:block) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread")]
        async fn $name() {
            $crate::common::bounded($crate::CASE_LIMIT, async {
                #[allow(unused_mut)]
                let mut $fx = $crate::Fixture::start(stringify!($name)).await;
                $body
            })
            .await
        }
    };
}

/// A case sending one request template (`{p}`: the origin port) that must be refused with
/// nothing reaching any origin or the upstream.
macro_rules! refused {
    ($name:ident, $template:expr) => {
        case!($name, |fx| {
            fx.refuses($template).await;
        });
    };
}

// Declared after the macros so that every group sees them.
mod address;
mod client;
mod connect;
mod dns;
mod origins;
mod scope;
mod smuggling;
mod url;
mod wire;

/// What a case allows to happen besides its refusal.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    /// The allowed origin may accept TCP connections (a CONNECT to an allowed host is dialled
    /// before its ClientHello is checked).
    pub allowed_connect: bool,
    /// The allowed origin may receive bytes (an allowed request of the case).
    pub allowed_bytes: bool,
    /// Names the upstream may be asked (lowercase, no trailing dot); any other name fails.
    pub upstream: &'a [&'a str],
}

impl Expect<'static> {
    /// Nothing reaches any origin or the upstream.
    pub const NOTHING: Expect<'static> = Expect { allowed_connect: false, allowed_bytes: false, upstream: &[] };
    /// The allowed origin may get a connection but not one byte (CONNECT refused after dialling).
    pub const DIAL_ONLY: Expect<'static> = Expect { allowed_connect: true, allowed_bytes: false, upstream: &[] };
    /// The allowed origin may serve requests naming allowed hosts.
    pub const ALLOWED_TRAFFIC: Expect<'static> = Expect { allowed_connect: true, allowed_bytes: true, upstream: &[] };
}

impl<'a> Expect<'a> {
    /// Nothing reaches any origin; the upstream may see `names`.
    pub fn upstream(names: &'a [&'a str]) -> Expect<'a> {
        Expect { upstream: names, ..Expect::NOTHING }
    }
}

/// The rules every case runs under; `{P}` is the shared origin port.
const RULES: &str = r#"
[[rule]]
name = "allowed"
hosts = ["allowed.test", "*.allowed.test"]
ports = [{P}]

[[rule]]
name = "denied"
action = "deny"
hosts = [".denied.test"]

# Every literal spelling of a guard-denied address is covered here, so that only the guard
# stands between a client and it (and a 502/504 would betray a dial attempt).
[[rule]]
name = "literal"
cidrs = [
  "127.0.0.1/32", "127.0.0.3/32", "0.0.0.0/32", "::1/128",
  "::ffff:127.0.0.0/104", "::ffff:0:7f00:0/104", "::7f00:0/104",
  "64:ff9b::7f00:0/104", "64:ff9b::a9fe:a9fe/128", "64:ff9b:1::/48",
  "2002:7f00::/24", "2001::/32",
]
ports = [{P}]

[[rule]]
name = "tunnel-zone"
hosts = ["*.tunnel.test"]
applies_to = ["dns"]

[[rule]]
name = "proxy-only"
hosts = ["*.proxyonly.test"]
applies_to = ["proxy"]
ports = [{P}]

[[rule]]
name = "other-clients"
hosts = ["*.clientscoped.test"]
clients = ["10.9.0.0/16"]
ports = [{P}]

[[rule]]
name = "allow-inside-denied"
hosts = ["www.denied.test"]
ports = [{P}]
"#;

/// `[hosts]`: allowed names on the allowed origin, denied names on the denied recorder, an
/// allowed name on the guard-denied address and one on `::1`.
const HOSTS: &[(&str, &str)] = &[
    ("allowed.test", "127.0.0.1"),
    ("tls.allowed.test", "127.0.0.1"),
    ("denied.test", "127.0.0.2"),
    ("www.denied.test", "127.0.0.2"),
    ("unlisted.test", "127.0.0.2"),
    ("guarded.allowed.test", "127.0.0.3"),
    ("loop6.allowed.test", "::1"),
    ("a.tunnel.test", "127.0.0.2"),
    ("a.clientscoped.test", "127.0.0.2"),
];

/// What the upstream answers: every name here is reachable only through it.
pub fn zone() -> Zone {
    let mut z = Zone::default()
        .a("up.allowed.test", "127.0.0.1")
        .a("rebind.allowed.test", "127.0.0.3")
        .a("mixed.allowed.test", "127.0.0.3")
        .a("mixed.allowed.test", "127.0.0.1")
        .a("zero.allowed.test", "0.0.0.0")
        .aaaa("v6loop.allowed.test", "::1")
        .aaaa("mapped.allowed.test", "::ffff:127.0.0.3")
        .aaaa("compat.allowed.test", "::7f00:3")
        .aaaa("nat64.allowed.test", "64:ff9b::7f00:3")
        .aaaa("sixtofour.allowed.test", "2002:7f00:3::1")
        .aaaa("teredo.allowed.test", "2001:0:4136:e378:8000:63bf:80ff:fffc")
        .a("private.allowed.test", "10.0.0.5")
        .a("meta.allowed.test", "169.254.169.254")
        .aaaa("ula.allowed.test", "fd00:ec2::254")
        .aaaa("nat64meta.allowed.test", "64:ff9b::a9fe:a9fe")
        .https_hint("hint.allowed.test", "127.0.0.3")
        .https_alias("alias.allowed.test", "www.denied.test")
        .a("_acme-challenge.allowed.test", "93.184.216.34")
        .a("xn--bcher-kva.allowed.test", "93.184.216.34")
        .a("*.tunnel.test", "93.184.216.34")
        .a("www.denied.test", "127.0.0.2")
        .a("x.denied.test", "127.0.0.2")
        .a("x.proxyonly.test", "93.184.216.34")
        .a("b.clientscoped.test", "93.184.216.34");
    // chain0 -> chain1 -> ... -> chain9 -> www.denied.test: ten CNAMEs from allowed to denied.
    for i in 0..9 {
        z = z.cname(&format!("chain{i}.allowed.test"), &format!("chain{}.allowed.test", i + 1));
    }
    z.cname("chain9.allowed.test", "www.denied.test")
}

/// egressd and everything around it for one case.
pub struct Fixture {
    pub name: &'static str,
    pub e: Egressd,
    /// The port every origin listens on.
    pub port: u16,
    pub allowed: AllowedOrigin,
    /// `127.0.0.2:P`: stands for `denied.test` (and `unlisted.test`).
    pub denied: Recorder,
    /// `127.0.0.3:P`: an address the guard denies.
    pub guarded: Recorder,
    /// `[::1]:P`: loopback over IPv6, guard-denied.
    pub loop6: Recorder,
    pub up: Upstream,
}

impl Fixture {
    pub async fn start(name: &'static str) -> Fixture {
        Self::start_with(name, "").await
    }

    /// As [`Fixture::start`], with extra lines in egressd's `[dns]` table.
    pub async fn start_with(name: &'static str, dns_extra: &str) -> Fixture {
        let (allowed, denied, guarded, loop6) = origins::bind_same_port().await;
        let port = allowed.addr.port();
        let up = Upstream::start(zone()).await;
        let rules = RULES.replace("{P}", &port.to_string());
        let upstreams = [up.addr];
        let dns_extra = format!("upstream_timeout = \"1s\"\n{dns_extra}");
        let e = Egressd::start_opts(Opts {
            rules: &rules,
            hosts: HOSTS,
            dns_upstreams: &upstreams,
            dns_extra: &dns_extra,
            no_default_hosts: true,
            guard_allow_cidrs: &["127.0.0.1/32", "127.0.0.2/32"],
            ..Default::default()
        })
        .await;
        Fixture { name, e, port, allowed, denied, guarded, loop6, up }
    }

    pub fn proxy(&self) -> SocketAddr {
        self.e.proxy
    }

    pub fn dns_addr(&self) -> SocketAddr {
        self.e.dns_addr()
    }

    /// Sends `bytes` on a fresh proxy connection and collects up to `want` final responses.
    pub async fn http(&self, bytes: impl AsRef<[u8]>, want: usize) -> Exchange {
        exchange(self.proxy(), &[bytes.as_ref()], Duration::ZERO, want).await
    }

    /// As [`Fixture::http`], writing `chunks` one by one with `gap` between them.
    pub async fn http_chunks(&self, chunks: &[&[u8]], gap: Duration, want: usize) -> Exchange {
        exchange(self.proxy(), chunks, gap, want).await
    }

    /// `CONNECT target`, then (on 200) `chunks` into the tunnel with `gap` between them.
    pub async fn tunnel(&self, target: &str, chunks: &[&[u8]], gap: Duration) -> Tunnel {
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        self.tunnel_raw(req.as_bytes(), chunks, gap).await
    }

    /// As [`Fixture::tunnel`] with the whole CONNECT request given.
    pub async fn tunnel_raw(&self, request: &[u8], chunks: &[&[u8]], gap: Duration) -> Tunnel {
        let mut s = TcpStream::connect(self.proxy()).await.expect("connect to egressd");
        let _ = s.set_nodelay(true);
        s.write_all(request).await.expect("write CONNECT");
        let status = match tokio::time::timeout(ANSWER_WAIT, common::read_head(&mut s)).await {
            Ok(Ok((status, _))) => Some(status),
            _ => None,
        };
        let mut t = Tunnel { status, received: Vec::new(), closed: false };
        if status != Some(200) {
            return t;
        }
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            if s.write_all(chunk).await.is_err() {
                break;
            }
        }
        // A refused tunnel is closed by egressd; an accepted one stays open: wait a bounded time.
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    t.closed = true;
                    break;
                }
                Ok(Ok(n)) => t.received.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        t
    }

    /// One DNS message over UDP; the reply, if any arrives within 2 s.
    pub async fn dns_udp(&self, packet: &[u8]) -> Option<Vec<u8>> {
        dns_udp(self.dns_addr(), packet, Duration::from_secs(2)).await
    }

    /// One DNS message over TCP (length-prefixed); the reply, if any arrives within 2 s.
    pub async fn dns_tcp(&self, packet: &[u8]) -> Option<Vec<u8>> {
        let mut s = TcpStream::connect(self.dns_addr()).await.ok()?;
        let mut out = (packet.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(packet);
        s.write_all(&out).await.ok()?;
        let read = async {
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.ok()?;
            let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut msg).await.ok()?;
            Some(msg)
        };
        tokio::time::timeout(Duration::from_secs(2), read).await.ok().flatten()
    }

    /// `egressd explain TARGET` against this fixture's config: exit code and output.
    pub fn explain(&self, target: &str) -> (i32, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_egressd"))
            .args(["explain", "--config"])
            .arg(self.e.dir().join("egressd.toml"))
            .arg(target)
            .output()
            .expect("run egressd explain");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }

    /// `explain` must say deny (exit 3).
    pub fn assert_explain_denies(&self, target: &str) {
        let (code, text) = self.explain(target);
        assert_eq!(code, 3, "[{}] egressd explain {target} did not deny (exit {code}):\n{text}", self.name);
    }

    /// The oracle: see the module docs. Panics naming the case and what leaked.
    pub async fn verdict(&mut self, expect: Expect<'_>) {
        tokio::time::sleep(SETTLE).await;
        let case = self.name;
        for (what, r) in [
            ("denied origin 127.0.0.2", &self.denied),
            ("guard-denied 127.0.0.3", &self.guarded),
            ("[::1]", &self.loop6),
        ] {
            let (conns, bytes) = r.seen();
            assert!(
                conns == 0 && bytes.is_empty(),
                "[{case}] BYPASS: the {what} recorder accepted {conns} connection(s) and got {} byte(s): {:?}",
                bytes.len(),
                String::from_utf8_lossy(&bytes[..bytes.len().min(400)])
            );
        }
        let seen = self.allowed.seen();
        if !expect.allowed_connect {
            assert_eq!(seen.connections, 0, "[{case}] the allowed origin accepted a connection: {seen:?}");
        }
        if !expect.allowed_bytes {
            assert_eq!(seen.raw_bytes, 0, "[{case}] bytes reached the allowed origin: {seen:?}");
        }
        for r in &seen.requests {
            let host = r.host.to_ascii_lowercase();
            // An absolute-form target overrides Host at the origin (RFC 9112 §3.2.2).
            let authority = r.uri.split_once("://").map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""));
            assert!(
                !host.contains("denied") && !authority.to_ascii_lowercase().contains("denied"),
                "[{case}] BYPASS: the allowed origin served a request naming a denied host: {r:?}"
            );
            assert!(
                host.starts_with("allowed.test") || host.contains(".allowed.test") || host.starts_with("127.0.0.1"),
                "[{case}] the allowed origin got an unexpected Host: {r:?}"
            );
        }
        for sni in &seen.snis {
            assert!(
                !sni.to_ascii_lowercase().contains("denied"),
                "[{case}] BYPASS: TLS with SNI {sni:?} reached the allowed origin"
            );
        }
        for q in self.up.seen() {
            assert!(
                q.labels.iter().all(|l| wire::ldh(l)),
                "[{case}] BYPASS: the upstream got a name with a non-LDH label: {q:?}"
            );
            assert!(
                expect.upstream.contains(&q.name.as_str()),
                "[{case}] BYPASS: the upstream was asked {:?} (type {}); allowed here: {:?}",
                q.name,
                q.qtype,
                expect.upstream
            );
        }
        self.assert_alive().await;
    }

    /// Sends `template` (with `{p}` standing for the origin port) on a fresh connection: it
    /// must be refused, and nothing may reach any origin or the upstream.
    pub async fn refuses(&mut self, template: impl AsRef<[u8]>) -> Exchange {
        let ex = self.http(fill(template.as_ref(), self.port), 1).await;
        ex.assert_refused(self.name);
        self.verdict(Expect::NOTHING).await;
        ex
    }

    /// egressd runs, forwards an allowed request and answers an allowed DNS query.
    pub async fn assert_alive(&mut self) {
        let case = self.name;
        assert!(self.e.try_wait().is_none(), "[{case}] egressd exited; output:\n{}", self.e.dump());
        let p = self.port;
        let req = format!(
            "GET http://allowed.test:{p}/alive HTTP/1.1\r\nHost: allowed.test:{p}\r\nConnection: close\r\n\r\n"
        );
        let ex = self.http(req, 1).await;
        assert!(
            ex.responses.first().is_some_and(|r| r.status == 200 && r.text() == origins::ALLOWED_BODY),
            "[{case}] egressd no longer forwards an allowed request: {ex:?}\n{}",
            self.e.dump()
        );
        let q = wire::dns_query(0x4242, &wire::labels("allowed.test"), wire::A);
        let reply = self.dns_udp(&q).await.unwrap_or_else(|| panic!("[{case}] egressd no longer answers DNS"));
        assert_eq!(wire::rcode(&reply), 0, "[{case}] allowed.test/A after the case: {reply:02x?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The harness checks itself: each recorder does catch what reaches it.
// ---------------------------------------------------------------------------------------------

case!(harness_recorders_catch_direct_traffic, |fx| {
    for addr in [fx.denied.addr, fx.guarded.addr, fx.loop6.addr] {
        let mut s = TcpStream::connect(addr).await.expect("dial recorder");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
        assert!(String::from_utf8_lossy(&buf).contains(origins::DENIED_BODY), "{buf:?}");
    }
    tokio::time::sleep(SETTLE).await;
    for r in [&fx.denied, &fx.guarded, &fx.loop6] {
        assert_eq!(r.seen().0, 1, "recorder {} missed a connection", r.addr);
    }
    fx.assert_alive().await;
});

case!(harness_allowed_traffic_reaches_allowed_origin, |fx| {
    let p = fx.port;
    let ex = fx.http(format!("GET http://allowed.test:{p}/x HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n"), 1).await;
    assert_eq!(ex.statuses(), vec![200], "{ex:?}");
    // Through the upstream: up.allowed.test is answered with 127.0.0.1.
    let ex = fx.http(format!("GET http://up.allowed.test:{p}/y HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    assert_eq!(ex.statuses(), vec![200], "{ex:?}");
    let seen = fx.allowed.seen();
    assert_eq!(seen.requests.len(), 2, "{seen:?}");
    assert_eq!(seen.requests[1].host, format!("up.allowed.test:{p}"));
    fx.verdict(Expect { upstream: &["up.allowed.test"], ..Expect::ALLOWED_TRAFFIC }).await;
});

case!(harness_upstream_records_forwarded_names, |fx| {
    let q = wire::dns_query(7, &wire::labels("abc.tunnel.test"), wire::A);
    let reply = fx.dns_udp(&q).await.expect("reply");
    assert_eq!(wire::rcode(&reply), 0);
    tokio::time::sleep(SETTLE).await;
    assert_eq!(fx.up.names(), vec!["abc.tunnel.test".to_string()]);
    fx.verdict(Expect::upstream(&["abc.tunnel.test"])).await;
});
