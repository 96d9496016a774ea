//! The upstream DNS client: the single path from egressd to the network for DNS.
//!
//! This module owns the list of configured upstreams (with `system` expanded from
//! /etc/resolv.conf once, at construction) and [`Upstreams::exchange`], which sends one complete
//! DNS message and returns one validated response. Plain upstreams get UDP first (one fresh
//! ephemeral, `connect()`ed socket per attempt, so the OS randomises the source port and filters
//! other sources) with a retry over TCP when the answer is truncated; `tls://` upstreams get
//! DNS-over-TLS (rustls, webpki roots, the configured server name). Upstreams are tried in order
//! within one overall deadline, each getting a fair share of the time left. Every packet from the
//! network is untrusted: a response is used only if it comes from the address queried, carries the
//! fresh random id of that attempt, has QR set, the query's opcode, and exactly the query's
//! question (name compared case-insensitively, type, class). Anything else — spoofed, mismatched,
//! short or unparsable — is ignored (UDP keeps waiting until the attempt's deadline) or fails the
//! attempt (TCP/TLS). Nothing here panics on network data.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;

use crate::config::Upstream;

/// Port of plain DNS (UDP and TCP); `system` nameservers always use it.
pub const DNS_PORT: u16 = 53;
/// EDNS0 UDP payload size advertised when the query carries no OPT record of its own.
pub const EDNS_UDP_PAYLOAD: u16 = 1232;
/// Where `Upstream::System` is read from by [`Upstreams::new`].
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Receive buffer for one UDP datagram: the largest possible UDP payload, so an upstream that
/// ignores the advertised size is never silently cut (a cut packet would fail to parse anyway).
const UDP_BUFFER: usize = 65_535;
/// Smallest possible DNS message: the 12-octet header.
const HEADER_LEN: usize = 12;

/// Why no usable answer came back, or why the upstream list could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No valid answer before the deadline.
    #[error("DNS upstreams did not answer in time")]
    Timeout,
    /// The configured list is empty.
    #[error("no DNS upstreams configured")]
    NoUpstreams,
    /// `system` was configured but resolv.conf is unreadable or names no usable nameserver.
    #[error("system DNS configuration: {0}")]
    SystemConfig(String),
    /// A `tls://` upstream's server name is not a valid DNS name or IP address.
    #[error("invalid DNS-over-TLS server name {0:?}")]
    TlsName(String),
    /// The TLS client configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The query cannot be sent (no single question, or not encodable).
    #[error("DNS query cannot be sent: {0}")]
    BadQuery(String),
    /// Socket, connection or TLS handshake failure.
    #[error("DNS upstream I/O error: {0}")]
    Io(String),
    /// A stream (TCP/TLS) upstream sent a response that failed validation.
    #[error("malformed or mismatched response from DNS upstream: {0}")]
    Malformed(String),
    /// Every upstream that answered refused (REFUSED); none gave a usable answer.
    #[error("DNS upstreams refused the query")]
    Refused,
    /// Every upstream that answered failed (SERVFAIL); none gave a usable answer.
    #[error("DNS upstreams failed to answer (SERVFAIL)")]
    ServFail,
    /// An upstream answered with another error code (FORMERR, NOTIMP, ...). Not produced by
    /// [`Upstreams::exchange`], which returns such answers as they are; callers that need a
    /// positive answer (the proxy's resolver) report them with this.
    #[error("DNS upstream answered {0}")]
    Rcode(ResponseCode),
}

impl From<std::io::Error> for UpstreamError {
    fn from(e: std::io::Error) -> Self {
        UpstreamError::Io(e.to_string())
    }
}

impl UpstreamError {
    /// How informative an error is when every upstream failed: an actual DNS answer (SERVFAIL,
    /// REFUSED) beats a transport failure, which beats silence.
    fn rank(&self) -> u8 {
        match self {
            UpstreamError::ServFail | UpstreamError::Refused => 2,
            UpstreamError::Timeout => 0,
            _ => 1,
        }
    }
}

/// How one upstream is spoken to.
#[derive(Clone, Debug)]
enum Transport {
    /// UDP, retried over TCP on truncation.
    Plain,
    /// DNS-over-TLS; `name` is verified against the certificate and sent as SNI.
    Tls { name: ServerName<'static>, label: String },
}

/// One resolved upstream.
#[derive(Clone, Debug)]
struct Server {
    addr: SocketAddr,
    transport: Transport,
}

impl Server {
    fn same_as(&self, other: &Server) -> bool {
        self.addr == other.addr
            && match (&self.transport, &other.transport) {
                (Transport::Plain, Transport::Plain) => true,
                (Transport::Tls { label: a, .. }, Transport::Tls { label: b, .. }) => a == b,
                _ => false,
            }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Plain => write!(f, "{} (udp+tcp)", self.addr),
            Transport::Tls { label, .. } => write!(f, "tls://{}#{label}", self.addr),
        }
    }
}

/// The configured DNS upstreams, tried in order. Cheap to share behind an `Arc`; holds no
/// connections between exchanges.
pub struct Upstreams {
    servers: Vec<Server>,
    timeout: Duration,
    /// Present iff at least one upstream is `tls://`.
    tls: Option<TlsConnector>,
}

impl fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstreams").field("servers", &self.describe()).field("timeout", &self.timeout).finish()
    }
}

impl Upstreams {
    /// Builds the list. `System` expands to the nameservers of /etc/resolv.conf (port 53,
    /// UDP+TCP), read once here; an unreadable resolv.conf, or one naming no nameserver, is an
    /// error. `tls://` upstreams are verified against the webpki (Mozilla) roots.
    pub fn new(list: &[Upstream], timeout: Duration) -> Result<Self, UpstreamError> {
        Self::build(list, timeout, read_system_resolv_conf, webpki_roots)
    }

    /// Like [`Upstreams::new`], with `resolv_conf` as the text of resolv.conf (for tests and
    /// for callers that read it themselves).
    pub fn with_resolv_conf(list: &[Upstream], timeout: Duration, resolv_conf: &str) -> Result<Self, UpstreamError> {
        Self::build(list, timeout, || Ok(resolv_conf.as_bytes().to_vec()), webpki_roots)
    }

    /// Like [`Upstreams::new`], but `tls://` upstreams are verified against `roots` instead of
    /// the webpki roots (a private DoT server, or a test CA).
    pub fn with_tls_roots(list: &[Upstream], timeout: Duration, roots: RootCertStore) -> Result<Self, UpstreamError> {
        Self::build(list, timeout, read_system_resolv_conf, move || roots)
    }

    fn build(
        list: &[Upstream],
        timeout: Duration,
        resolv_conf: impl FnOnce() -> Result<Vec<u8>, UpstreamError>,
        roots: impl FnOnce() -> RootCertStore,
    ) -> Result<Self, UpstreamError> {
        let mut resolv_conf = Some(resolv_conf);
        let mut servers: Vec<Server> = Vec::new();
        let mut push = |s: Server| {
            if !servers.iter().any(|known| known.same_as(&s)) {
                servers.push(s);
            }
        };
        for upstream in list {
            match upstream {
                Upstream::System => {
                    // A second `system` entry would add nothing new.
                    let Some(read) = resolv_conf.take() else { continue };
                    for addr in system_nameservers(&read()?)? {
                        push(Server { addr, transport: Transport::Plain });
                    }
                }
                Upstream::Plain(addr) => push(Server { addr: *addr, transport: Transport::Plain }),
                Upstream::Tls { addr, name } => {
                    let server_name =
                        ServerName::try_from(name.clone()).map_err(|_| UpstreamError::TlsName(name.clone()))?;
                    push(Server { addr: *addr, transport: Transport::Tls { name: server_name, label: name.clone() } });
                }
            }
        }
        if servers.is_empty() {
            return Err(UpstreamError::NoUpstreams);
        }
        let tls = if servers.iter().any(|s| matches!(s.transport, Transport::Tls { .. })) {
            Some(tls_connector(roots())?)
        } else {
            None
        };
        Ok(Upstreams { servers, timeout, tls })
    }

    /// The overall deadline of one [`Upstreams::exchange`].
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The upstreams' addresses, in the order they are tried.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.servers.iter().map(|s| s.addr)
    }

    /// One line per upstream, in the order they are tried, e.g. `127.0.0.1:53 (udp+tcp)` or
    /// `tls://9.9.9.9:853#dns.quad9.net`.
    pub fn describe(&self) -> Vec<String> {
        self.servers.iter().map(ToString::to_string).collect()
    }

    /// Sends `query` (a complete DNS message with exactly one question) and returns the first
    /// usable response, with the caller's id restored. Each attempt uses a fresh random id.
    /// Plain upstreams: UDP first (EDNS0 with a 1232-octet payload is added when the query has
    /// no OPT record — and removed from the response again), TCP when the answer has TC set.
    /// `tls://` upstreams: DNS-over-TLS. Upstreams are tried in order, moving on after a
    /// timeout, an error, SERVFAIL or REFUSED; other answers (NOERROR, NXDOMAIN, FORMERR, ...)
    /// are returned as they are. The whole exchange is bounded by the configured timeout; each
    /// upstream gets an equal share of the time still left, so one dead upstream cannot starve
    /// the rest.
    pub async fn exchange(&self, query: &Message) -> Result<Message, UpstreamError> {
        let question = match query.queries.as_slice() {
            [q] => q,
            qs => return Err(UpstreamError::BadQuery(format!("{} questions, expected exactly 1", qs.len()))),
        };
        let mut outgoing = query.clone();
        outgoing.metadata.message_type = MessageType::Query;
        let added_edns = outgoing.edns.is_none();
        if added_edns {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_UDP_PAYLOAD);
            outgoing.set_edns(edns);
        }
        let wire = outgoing.to_vec().map_err(|e| UpstreamError::BadQuery(e.to_string()))?;
        if wire.len() < HEADER_LEN || u16::try_from(wire.len()).is_err() {
            return Err(UpstreamError::BadQuery(format!("encoded query is {} octets", wire.len())));
        }
        let expect = Expect { question, op_code: query.op_code };

        let deadline = Instant::now() + self.timeout;
        let mut failure: Option<UpstreamError> = None;
        let count = self.servers.len();
        for (i, server) in self.servers.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let left = u32::try_from(count - i).unwrap_or(u32::MAX);
            let attempt_deadline = now + (deadline - now) / left;
            let result =
                match timeout_at(attempt_deadline, self.attempt(server, &wire, &expect, attempt_deadline)).await {
                    Ok(result) => result,
                    Err(_) => Err(UpstreamError::Timeout),
                };
            let error = match result {
                Ok(response) if response.response_code == ResponseCode::ServFail => UpstreamError::ServFail,
                Ok(response) if response.response_code == ResponseCode::Refused => UpstreamError::Refused,
                Ok(mut response) => {
                    response.metadata.id = query.id;
                    if added_edns {
                        response.edns = None;
                    }
                    return Ok(response);
                }
                Err(e) => e,
            };
            tracing::debug!(upstream = %server, error = %error, "DNS upstream attempt failed");
            if failure.as_ref().is_none_or(|f| error.rank() >= f.rank()) {
                failure = Some(error);
            }
        }
        Err(failure.unwrap_or(UpstreamError::Timeout))
    }

    /// One exchange with one upstream (including the TCP retry after a truncated UDP answer).
    async fn attempt(
        &self,
        server: &Server,
        wire: &[u8],
        expect: &Expect<'_>,
        deadline: Instant,
    ) -> Result<Message, UpstreamError> {
        match &server.transport {
            Transport::Plain => {
                let (id, packet) = with_fresh_id(wire);
                let response = udp_exchange(server.addr, &packet, id, expect, deadline).await?;
                if response.truncation {
                    let (id, packet) = with_fresh_id(wire);
                    let mut stream = tcp_connect(server.addr).await?;
                    return stream_exchange(&mut stream, &packet, id, expect).await;
                }
                Ok(response)
            }
            Transport::Tls { name, .. } => {
                let connector = self.tls.as_ref().ok_or_else(|| UpstreamError::Tls("no TLS client".into()))?;
                let tcp = tcp_connect(server.addr).await?;
                let mut stream = connector.connect(name.clone(), tcp).await?;
                let (id, packet) = with_fresh_id(wire);
                stream_exchange(&mut stream, &packet, id, expect).await
            }
        }
    }
}

/// What a response must echo.
struct Expect<'a> {
    question: &'a Query,
    op_code: OpCode,
}

/// The verdict on one received packet.
enum Received {
    /// Valid and complete.
    Answer(Message),
    /// Valid header and question with TC set, but the body did not parse (some servers cut
    /// truncated answers mid-record): retry over TCP all the same.
    TruncatedUnparsable,
    /// Not an answer to this attempt.
    Invalid(String),
}

/// Validates `packet` against the attempt's `id` and the query.
fn check_response(packet: &[u8], id: u16, expect: &Expect<'_>) -> Received {
    // Cheap pre-check before a full parse: most spoofing attempts die here.
    match packet {
        [hi, lo, ..] if packet.len() >= HEADER_LEN && u16::from_be_bytes([*hi, *lo]) == id => {}
        _ => return Received::Invalid("short packet or wrong id".into()),
    }
    let message = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(e) => {
            return if truncated_header_matches(packet, id, expect) {
                Received::TruncatedUnparsable
            } else {
                Received::Invalid(format!("unparsable: {e}"))
            };
        }
    };
    if message.id != id {
        return Received::Invalid("wrong id".into());
    }
    if message.message_type != MessageType::Response {
        return Received::Invalid("QR not set".into());
    }
    if message.op_code != expect.op_code {
        return Received::Invalid("wrong opcode".into());
    }
    match message.queries.as_slice() {
        [q] if same_question(q, expect.question) => Received::Answer(message),
        _ => Received::Invalid("question section differs from the query".into()),
    }
}

/// For a packet whose body failed to parse: does its header and question say "truncated answer
/// to this very query"?
fn truncated_header_matches(packet: &[u8], id: u16, expect: &Expect<'_>) -> bool {
    let mut decoder = BinDecoder::new(packet);
    let Ok(header) = Header::read(&mut decoder) else { return false };
    if header.id != id
        || header.message_type != MessageType::Response
        || header.op_code != expect.op_code
        || !header.truncation
        || header.counts.queries != 1
    {
        return false;
    }
    Query::read(&mut decoder).is_ok_and(|q| same_question(&q, expect.question))
}

/// Question equality: name case-insensitively (and regardless of the trailing dot), type, class.
fn same_question(a: &Query, b: &Query) -> bool {
    a.query_type() == b.query_type() && a.query_class() == b.query_class() && a.name().eq_ignore_root(b.name())
}

/// A copy of the encoded query with a fresh random id in its first two octets.
fn with_fresh_id(wire: &[u8]) -> (u16, Vec<u8>) {
    let id = random_id();
    let mut packet = wire.to_vec();
    if let Some(head) = packet.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
    (id, packet)
}

/// A 16-bit id that an off-path attacker cannot predict.
///
/// No RNG crate: `RandomState::new()` is SipHash keyed from the OS's random source once per
/// thread (and varied per call), so hashing a process-wide counter and the time through it
/// gives unpredictable output without a new dependency. This is not a general-purpose CSPRNG,
/// but DNS ids are 16 bits anyway; the bulk of the anti-spoofing entropy is the OS-chosen
/// source port of the fresh socket each UDP attempt binds.
fn random_id() -> u16 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut hasher);
    if let Ok(since) = SystemTime::now().duration_since(UNIX_EPOCH) {
        since.as_nanos().hash(&mut hasher);
    }
    let [a, b, ..] = hasher.finish().to_le_bytes();
    u16::from_le_bytes([a, b])
}

/// Sends `packet` over a fresh connected UDP socket and waits for a valid answer, ignoring
/// anything invalid. The datagram is sent once more halfway to the deadline if nothing valid
/// has arrived (same socket, same id), to survive one lost packet. Returns on the first valid
/// answer; the caller's timeout bounds the wait.
async fn udp_exchange(
    addr: SocketAddr,
    packet: &[u8],
    id: u16,
    expect: &Expect<'_>,
    deadline: Instant,
) -> Result<Message, UpstreamError> {
    let local: SocketAddr =
        if addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(addr).await?;
    socket.send(packet).await?;
    let now = Instant::now();
    let mut resend_at = Some(now + deadline.saturating_duration_since(now) / 2);
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let received = match resend_at {
            Some(at) => match timeout_at(at, socket.recv_from(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    resend_at = None;
                    socket.send(packet).await?;
                    continue;
                }
            },
            None => socket.recv_from(&mut buf).await,
        };
        // An error here is typically ICMP port unreachable reported on the connected socket:
        // the upstream is down, move on without waiting out the deadline.
        let (len, from) = received?;
        if from.ip() != addr.ip() || from.port() != addr.port() {
            tracing::debug!(upstream = %addr, %from, "ignoring DNS datagram from an unexpected source");
            continue;
        }
        let Some(datagram) = buf.get(..len) else { continue };
        match check_response(datagram, id, expect) {
            Received::Answer(message) => return Ok(message),
            Received::TruncatedUnparsable => {
                // Only the TC flag matters to the caller: hand back an empty truncated answer.
                let mut message = Message::response(id, expect.op_code);
                message.metadata.truncation = true;
                return Ok(message);
            }
            Received::Invalid(why) => {
                tracing::debug!(upstream = %addr, reason = %why, "ignoring invalid DNS datagram");
            }
        }
    }
}

async fn tcp_connect(addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One query and one response over a stream (TCP or TLS), each with its 2-octet length
/// prefix. A response that fails validation fails the attempt.
async fn stream_exchange<S>(
    stream: &mut S,
    packet: &[u8],
    id: u16,
    expect: &Expect<'_>,
) -> Result<Message, UpstreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let len = u16::try_from(packet.len())
        .map_err(|_| UpstreamError::BadQuery(format!("query of {} octets is too long for TCP", packet.len())))?;
    let mut framed = Vec::with_capacity(packet.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(packet);
    stream.write_all(&framed).await?;
    stream.flush().await?;

    let mut prefix = [0u8; 2];
    stream.read_exact(&mut prefix).await?;
    let len = usize::from(u16::from_be_bytes(prefix));
    let mut response = vec![0u8; len];
    stream.read_exact(&mut response).await?;
    match check_response(&response, id, expect) {
        Received::Answer(message) => Ok(message),
        Received::TruncatedUnparsable => Err(UpstreamError::Malformed("unparsable truncated answer".into())),
        Received::Invalid(why) => Err(UpstreamError::Malformed(why)),
    }
}

fn read_system_resolv_conf() -> Result<Vec<u8>, UpstreamError> {
    std::fs::read(RESOLV_CONF).map_err(|e| UpstreamError::SystemConfig(format!("cannot read {RESOLV_CONF}: {e}")))
}

/// The nameservers of a resolv.conf text, port 53. Lines resolv-conf cannot parse are logged
/// and skipped (as the C library does); no nameserver at all is an error.
fn system_nameservers(text: &[u8]) -> Result<Vec<SocketAddr>, UpstreamError> {
    let (config, errors) = resolv_conf::Config::parse_with_errors(text);
    for e in &errors {
        tracing::warn!(error = %e, "ignoring unparsable line in resolv.conf");
    }
    let mut out = Vec::new();
    for ns in &config.nameservers {
        match ns {
            resolv_conf::ScopedIp::V4(ip) => out.push(SocketAddr::new(IpAddr::V4(*ip), DNS_PORT)),
            resolv_conf::ScopedIp::V6(ip, None) => out.push(SocketAddr::new(IpAddr::V6(*ip), DNS_PORT)),
            resolv_conf::ScopedIp::V6(ip, Some(scope)) => match scope_id(scope) {
                Some(id) => out.push(SocketAddr::V6(SocketAddrV6::new(*ip, DNS_PORT, 0, id))),
                None => tracing::warn!(nameserver = %ns, "ignoring nameserver with an unknown IPv6 scope"),
            },
        }
    }
    if out.is_empty() {
        return Err(UpstreamError::SystemConfig("resolv.conf names no usable nameserver".into()));
    }
    Ok(out)
}

/// An IPv6 scope: a number, or an interface name looked up in sysfs (Linux).
fn scope_id(scope: &str) -> Option<u32> {
    if let Ok(n) = scope.parse::<u32>() {
        return Some(n);
    }
    let sane = !scope.is_empty()
        && scope.len() <= 15
        && scope != "."
        && scope != ".."
        && scope.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !sane {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{scope}/ifindex")).ok()?.trim().parse().ok()
}

fn webpki_roots() -> RootCertStore {
    webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect()
}

/// The DoT client: ring provider, TLS 1.2 and 1.3, the given roots, no client certificate.
fn tls_connector(roots: RootCertStore) -> Result<TlsConnector, UpstreamError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A scriptable DNS server on 127.0.0.1 for the tests of this module and of the resolver.
#[cfg(test)]
pub(crate) mod test_server {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hickory_proto::op::{Message, OpCode, ResponseCode};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Name, RData, Record};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, UdpSocket};
    use tokio::task::JoinHandle;

    /// Which transport a query arrived on.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Via {
        Udp,
        Tcp,
    }

    /// What the server sends back for one query, in order.
    pub(crate) enum Reply {
        Msg(Message),
        Raw(Vec<u8>),
    }

    pub(crate) type Handler = Arc<dyn Fn(&Message, Via) -> Vec<Reply> + Send + Sync>;

    /// UDP and TCP on the same 127.0.0.1 port; tasks end when the server is dropped.
    pub(crate) struct TestServer {
        pub(crate) addr: SocketAddr,
        queries: Arc<AtomicUsize>,
        tasks: Vec<JoinHandle<()>>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    impl TestServer {
        /// Queries received so far (UDP and TCP).
        pub(crate) fn queries(&self) -> usize {
            self.queries.load(Ordering::SeqCst)
        }

        pub(crate) async fn start(handler: impl Fn(&Message, Via) -> Vec<Reply> + Send + Sync + 'static) -> Self {
            let handler: Handler = Arc::new(handler);
            let (udp, tcp) = bind_pair().await;
            let addr = udp.local_addr().expect("udp addr");
            let queries = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            {
                let handler = handler.clone();
                let queries = queries.clone();
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_535];
                    loop {
                        let Ok((len, from)) = udp.recv_from(&mut buf).await else { return };
                        let Ok(query) = Message::from_vec(&buf[..len]) else { continue };
                        queries.fetch_add(1, Ordering::SeqCst);
                        for reply in handler(&query, Via::Udp) {
                            let _ = udp.send_to(&encode(reply), from).await;
                        }
                    }
                }));
            }
            let counter = queries.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = tcp.accept().await else { return };
                    let handler = handler.clone();
                    let queries = counter.clone();
                    tokio::spawn(async move {
                        let mut prefix = [0u8; 2];
                        if stream.read_exact(&mut prefix).await.is_err() {
                            return;
                        }
                        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
                        if stream.read_exact(&mut buf).await.is_err() {
                            return;
                        }
                        let Ok(query) = Message::from_vec(&buf) else { return };
                        queries.fetch_add(1, Ordering::SeqCst);
                        for reply in handler(&query, Via::Tcp) {
                            let bytes = encode(reply);
                            let len = u16::try_from(bytes.len()).expect("reply fits");
                            let _ = stream.write_all(&len.to_be_bytes()).await;
                            let _ = stream.write_all(&bytes).await;
                        }
                        let _ = stream.flush().await;
                    });
                }
            }));
            TestServer { addr, queries, tasks }
        }

        /// A server that reads and counts queries but never answers.
        pub(crate) async fn silent() -> Self {
            Self::start(|_, _| Vec::new()).await
        }
    }

    async fn bind_pair() -> (UdpSocket, TcpListener) {
        for _ in 0..50 {
            let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind udp");
            let port = udp.local_addr().expect("udp addr").port();
            if let Ok(tcp) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
                return (udp, tcp);
            }
        }
        panic!("no free port for UDP+TCP on 127.0.0.1");
    }

    fn encode(reply: Reply) -> Vec<u8> {
        match reply {
            Reply::Msg(m) => m.to_vec().expect("encode reply"),
            Reply::Raw(bytes) => bytes,
        }
    }

    pub(crate) fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("test name")
    }

    pub(crate) fn a(owner: &str, ip: Ipv4Addr) -> Record {
        Record::from_rdata(name(owner), 60, RData::A(A(ip)))
    }

    pub(crate) fn aaaa(owner: &str, ip: Ipv6Addr) -> Record {
        Record::from_rdata(name(owner), 60, RData::AAAA(AAAA(ip)))
    }

    pub(crate) fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(name(owner), 60, RData::CNAME(CNAME(name(target))))
    }

    /// A response to `query` echoing its id and question, with `code` and `answers`.
    pub(crate) fn respond(query: &Message, code: ResponseCode, answers: Vec<Record>) -> Message {
        let mut m = Message::response(query.id, OpCode::Query);
        m.metadata.recursion_desired = query.recursion_desired;
        m.metadata.recursion_available = true;
        m.metadata.response_code = code;
        m.add_queries(query.queries.iter().cloned());
        m.add_answers(answers);
        m
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
    use std::time::{Duration, Instant};

    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{DNSClass, RecordType};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::test_server::{Reply, TestServer, Via, a, aaaa, name, respond};
    use super::*;

    const T: Duration = Duration::from_secs(2);

    fn query(qname: &str, rtype: RecordType) -> Message {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(qname), rtype));
        m
    }

    fn plain(addr: SocketAddr) -> Upstream {
        Upstream::Plain(addr)
    }

    fn ips(m: &Message) -> Vec<IpAddr> {
        m.answers.iter().filter_map(|r| r.data.ip_addr()).collect()
    }

    const IP1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const IP2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

    #[tokio::test]
    async fn answer_is_returned_with_original_id_and_without_added_edns() {
        let server = TestServer::start(|q, _| {
            // The upstream sees an EDNS0 OPT advertising 1232 that the caller did not send.
            assert_eq!(q.edns.as_ref().map(|e| e.max_payload()), Some(EDNS_UDP_PAYLOAD));
            vec![Reply::Msg(respond(q, ResponseCode::NoError, vec![a("www.example.com.", IP1)]))]
        })
        .await;
        let up = Upstreams::new(&[plain(server.addr)], T).expect("upstreams");
        let resp = up.exchange(&query("www.example.com.", RecordType::A)).await.expect("answer");
        assert_eq!(resp.id, 4242);
        assert_eq!(resp.message_type, MessageType::Response);
        assert!(resp.edns.is_none(), "OPT added by egressd is stripped again");
        assert_eq!(ips(&resp), vec![IpAddr::V4(IP1)]);
    }

    #[tokio::test]
    async fn query_with_own_opt_is_forwarded_unchanged() {
        let server = TestServer::start(|q, _| {
            assert_eq!(q.edns.as_ref().map(|e| e.max_payload()), Some(1232));
            let mut r = respond(q, ResponseCode::NoError, vec![]);
            r.set_edns(q.edns.clone().unwrap_or_default());
            vec![Reply::Msg(r)]
        })
        .await;
        let up = Upstreams::new(&[plain(server.addr)], T).expect("upstreams");
        let mut q = query("example.com.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        q.set_edns(edns);
        let resp = up.exchange(&q).await.expect("answer");
        assert!(resp.edns.is_some(), "the client's own OPT exchange is preserved");
    }

    #[tokio::test]
    async fn fresh_random_id_per_attempt() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let server = TestServer::start(move |q, _| {
            s.lock().expect("lock").push(q.id);
            vec![Reply::Msg(respond(q, ResponseCode::NoError, vec![]))]
        })
        .await;
        let up = Upstreams::new(&[plain(server.addr)], T).expect("upstreams");
        for _ in 0..8 {
            up.exchange(&query("example.com.", RecordType::A)).await.expect("answer");
        }
        let mut ids = seen.lock().expect("lock").clone();
        ids.sort_unstable();
        ids.dedup();
        assert!(ids.len() >= 7, "ids should vary: {ids:?}");
    }

    #[tokio::test]
    async fn silent_server_times_out_within_the_deadline() {
        let server = TestServer::silent().await;
        let timeout = Duration::from_millis(300);
        let up = Upstreams::new(&[plain(server.addr)], timeout).expect("upstreams");
        let start = Instant::now();
        let err = up.exchange(&query("example.com.", RecordType::A)).await.expect_err("no answer");
        let elapsed = start.elapsed();
        assert_eq!(err, UpstreamError::Timeout);
        assert!(elapsed >= Duration::from_millis(250), "gave up too early: {elapsed:?}");
        assert!(elapsed < timeout + Duration::from_millis(500), "took {elapsed:?}");
        // The one resend halfway through.
        assert_eq!(server.queries(), 2);
    }

    #[tokio::test]
    async fn invalid_answers_are_ignored_until_the_right_one() {
        let server = TestServer::start(|q, _| {
            let mut wrong_id = respond(q, ResponseCode::NoError, vec![a("example.com.", IP2)]);
            wrong_id.metadata.id = q.id.wrapping_add(1);
            let mut wrong_question = Message::response(q.id, OpCode::Query);
            wrong_question.add_query(Query::query(name("evil.example."), RecordType::A));
            wrong_question.add_answer(a("evil.example.", IP2));
            let mut not_response = respond(q, ResponseCode::NoError, vec![a("example.com.", IP2)]);
            not_response.metadata.message_type = MessageType::Query;
            let mut wrong_type = respond(q, ResponseCode::NoError, vec![]);
            wrong_type.queries[0].set_query_type(RecordType::AAAA);
            let mut wrong_class = respond(q, ResponseCode::NoError, vec![]);
            wrong_class.queries[0].set_query_class(DNSClass::CH);
            let mut garbage = respond(q, ResponseCode::NoError, vec![a("example.com.", IP2)]).to_vec().expect("enc");
            garbage.truncate(garbage.len() - 3);
            // The right answer, with the name in another case (0x20-style): still the same question.
            let mut right = respond(q, ResponseCode::NoError, vec![a("example.com.", IP1)]);
            right.queries[0].set_name(name("ExAmPlE.CoM."));
            vec![
                Reply::Msg(wrong_id),
                Reply::Msg(wrong_question),
                Reply::Msg(not_response),
                Reply::Msg(wrong_type),
                Reply::Msg(wrong_class),
                Reply::Raw(garbage),
                Reply::Raw(vec![0u8; 5]),
                Reply::Msg(right),
            ]
        })
        .await;
        let up = Upstreams::new(&[plain(server.addr)], T).expect("upstreams");
        let resp = up.exchange(&query("example.com.", RecordType::A)).await.expect("answer");
        assert_eq!(ips(&resp), vec![IpAddr::V4(IP1)]);
    }

    #[tokio::test]
    async fn only_invalid_answers_mean_timeout() {
        let server = TestServer::start(|q, _| {
            let mut wrong_id = respond(q, ResponseCode::NoError, vec![a("example.com.", IP2)]);
            wrong_id.metadata.id = q.id ^ 0x8000;
            vec![Reply::Msg(wrong_id)]
        })
        .await;
        let up = Upstreams::new(&[plain(server.addr)], Duration::from_millis(300)).expect("upstreams");
        let err = up.exchange(&query("example.com.", RecordType::A)).await.expect_err("spoof rejected");
        assert_eq!(err, UpstreamError::Timeout);
    }

    #[tokio::test]
    async fn truncated_udp_answer_is_retried_over_tcp() {
        let server = TestServer::start(|q, via| match via {
            Via::Udp => {
                let mut r = respond(q, ResponseCode::NoError, vec![a("big.example.", IP1)]);
                r.metadata.truncation = true;
                vec![Reply::Msg(r)]
            }
            Via::Tcp => vec![Reply::Msg(respond(
                q,
                ResponseCode::NoError,
                vec![a("big.example.", IP1), a("big.example.", IP2)],
            ))],
        })
        .await;
        let up = Upstreams::new(&[plain(server.addr)], T).expect("upstreams");
        let resp = up.exchange(&query("big.example.", RecordType::A)).await.expect("answer");
        assert!(!resp.truncation);
        assert_eq!(ips(&resp), vec![IpAddr::V4(IP1), IpAddr::V4(IP2)]);
        assert_eq!(server.queries(), 2);
    }

    #[tokio::test]
    async fn truncated_answer_cut_mid_record_is_retried_over_tcp() {
        let server = TestServer::start(|q, via| match via {
            Via::Udp => {
                let mut r = respond(q, ResponseCode::NoError, vec![a("big.example.", IP1)]);
                r.metadata.truncation = true;
                let mut bytes = r.to_vec().expect("enc");
                bytes.truncate(bytes.len() - 2);
                vec![Reply::Raw(bytes)]
            }
            Via::Tcp => vec![Reply::Msg(respond(q, ResponseCode::NoError, vec![a("big.example.", IP2)]))],
        })
        .await;
        let up = Upstreams::new(&[plain(server.addr)], T).expect("upstreams");
        let resp = up.exchange(&query("big.example.", RecordType::A)).await.expect("answer");
        assert_eq!(ips(&resp), vec![IpAddr::V4(IP2)]);
    }

    #[tokio::test]
    async fn mismatched_tcp_answer_fails_the_attempt() {
        let server = TestServer::start(|q, via| {
            let mut r = respond(q, ResponseCode::NoError, vec![]);
            match via {
                Via::Udp => r.metadata.truncation = true,
                Via::Tcp => r.metadata.id = q.id.wrapping_add(7),
            }
            vec![Reply::Msg(r)]
        })
        .await;
        let up = Upstreams::new(&[plain(server.addr)], T).expect("upstreams");
        let err = up.exchange(&query("example.com.", RecordType::A)).await.expect_err("bad tcp answer");
        assert!(matches!(err, UpstreamError::Malformed(_)), "{err:?}");
    }

    #[tokio::test]
    async fn dead_first_upstream_falls_through_to_the_second() {
        let dead = TestServer::silent().await;
        let alive =
            TestServer::start(|q, _| vec![Reply::Msg(respond(q, ResponseCode::NoError, vec![a("x.example.", IP1)]))])
                .await;
        let up =
            Upstreams::new(&[plain(dead.addr), plain(alive.addr)], Duration::from_millis(1000)).expect("upstreams");
        let start = Instant::now();
        let resp = up.exchange(&query("x.example.", RecordType::A)).await.expect("answer from the second");
        assert_eq!(ips(&resp), vec![IpAddr::V4(IP1)]);
        assert!(dead.queries() >= 1);
        assert!(start.elapsed() < Duration::from_millis(1000) + Duration::from_millis(300));
    }

    #[tokio::test]
    async fn servfail_and_refused_move_on() {
        let servfail = TestServer::start(|q, _| vec![Reply::Msg(respond(q, ResponseCode::ServFail, vec![]))]).await;
        let refused = TestServer::start(|q, _| vec![Reply::Msg(respond(q, ResponseCode::Refused, vec![]))]).await;
        let good =
            TestServer::start(|q, _| vec![Reply::Msg(respond(q, ResponseCode::NoError, vec![a("x.example.", IP2)]))])
                .await;
        let up = Upstreams::new(&[plain(servfail.addr), plain(refused.addr), plain(good.addr)], T).expect("upstreams");
        let resp = up.exchange(&query("x.example.", RecordType::A)).await.expect("answer from the third");
        assert_eq!(ips(&resp), vec![IpAddr::V4(IP2)]);
        assert_eq!((servfail.queries(), refused.queries(), good.queries()), (1, 1, 1));
    }

    #[tokio::test]
    async fn all_failing_reports_the_most_informative_error() {
        let servfail = TestServer::start(|q, _| vec![Reply::Msg(respond(q, ResponseCode::ServFail, vec![]))]).await;
        let silent = TestServer::silent().await;
        let up =
            Upstreams::new(&[plain(servfail.addr), plain(silent.addr)], Duration::from_millis(400)).expect("upstreams");
        let err = up.exchange(&query("x.example.", RecordType::A)).await.expect_err("all fail");
        assert_eq!(err, UpstreamError::ServFail);
    }

    #[tokio::test]
    async fn nxdomain_is_an_answer_not_a_failure() {
        let first = TestServer::start(|q, _| vec![Reply::Msg(respond(q, ResponseCode::NXDomain, vec![]))]).await;
        let second = TestServer::start(|q, _| vec![Reply::Msg(respond(q, ResponseCode::NoError, vec![]))]).await;
        let up = Upstreams::new(&[plain(first.addr), plain(second.addr)], T).expect("upstreams");
        let resp = up.exchange(&query("nope.example.", RecordType::A)).await.expect("answer");
        assert_eq!(resp.response_code, ResponseCode::NXDomain);
        assert_eq!(second.queries(), 0);
    }

    #[tokio::test]
    async fn closed_port_fails_fast() {
        // Bind then drop to get a port with (very likely) nothing behind it: the ICMP port
        // unreachable ends the attempt long before the deadline.
        let port = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind").local_addr().expect("addr");
        let alive = TestServer::start(|q, _| vec![Reply::Msg(respond(q, ResponseCode::NoError, vec![]))]).await;
        let up = Upstreams::new(&[plain(port), plain(alive.addr)], Duration::from_secs(10)).expect("upstreams");
        let start = Instant::now();
        up.exchange(&query("x.example.", RecordType::A)).await.expect("answer from the second");
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    }

    #[tokio::test]
    async fn query_without_exactly_one_question_is_refused_locally() {
        let server = TestServer::silent().await;
        let up = Upstreams::new(&[plain(server.addr)], T).expect("upstreams");
        let empty = Message::new(1, MessageType::Query, OpCode::Query);
        assert!(matches!(up.exchange(&empty).await, Err(UpstreamError::BadQuery(_))));
        let mut two = query("a.example.", RecordType::A);
        two.add_query(Query::query(name("b.example."), RecordType::A));
        assert!(matches!(up.exchange(&two).await, Err(UpstreamError::BadQuery(_))));
        assert_eq!(server.queries(), 0);
    }

    #[test]
    fn resolv_conf_system_expansion() {
        let conf = "# generated\nnameserver 127.0.0.1\nnameserver ::1\nsearch example.com\noptions ndots:2\n\
                    nameserver 127.0.0.1\nbogus line here\nnameserver fe80::1%7\n";
        let up = Upstreams::with_resolv_conf(
            &[Upstream::System, Upstream::Plain("127.0.0.2:5353".parse().expect("addr")), Upstream::System],
            T,
            conf,
        )
        .expect("upstreams");
        assert_eq!(
            up.describe(),
            vec![
                "127.0.0.1:53 (udp+tcp)",
                "[::1]:53 (udp+tcp)",
                "[fe80::1%7]:53 (udp+tcp)",
                "127.0.0.2:5353 (udp+tcp)"
            ]
        );
    }

    #[test]
    fn empty_resolv_conf_is_an_error() {
        for conf in ["", "# nothing\nsearch example.com\n", "nameserver fe80::1%no/such\n"] {
            let err = Upstreams::with_resolv_conf(&[Upstream::System], T, conf).expect_err("no nameserver");
            assert!(matches!(err, UpstreamError::SystemConfig(_)), "{conf:?}: {err:?}");
        }
        // Not needed when `system` is not configured.
        let addr: SocketAddr = "127.0.0.1:53".parse().expect("addr");
        assert!(Upstreams::with_resolv_conf(&[Upstream::Plain(addr)], T, "").is_ok());
    }

    #[test]
    fn empty_list_and_bad_tls_name_are_errors() {
        assert_eq!(Upstreams::with_resolv_conf(&[], T, "").expect_err("empty"), UpstreamError::NoUpstreams);
        let addr: SocketAddr = "127.0.0.1:853".parse().expect("addr");
        let err = Upstreams::new(&[Upstream::Tls { addr, name: "not a name!".into() }], T).expect_err("bad name");
        assert!(matches!(err, UpstreamError::TlsName(_)));
    }

    #[test]
    fn describe_formats() {
        let plain: SocketAddr = "127.0.0.1:53".parse().expect("addr");
        let tls: SocketAddr = "127.0.0.1:853".parse().expect("addr");
        let up = Upstreams::new(&[Upstream::Plain(plain), Upstream::Tls { addr: tls, name: "dns.test".into() }], T)
            .expect("upstreams");
        assert_eq!(up.describe(), vec!["127.0.0.1:53 (udp+tcp)", "tls://127.0.0.1:853#dns.test"]);
        assert!(format!("{up:?}").contains("dns.test"));
    }

    #[test]
    fn random_ids_vary() {
        let mut ids: Vec<u16> = (0..64).map(|_| random_id()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert!(ids.len() > 50, "{} distinct of 64", ids.len());
    }

    #[test]
    fn check_response_rejects_short_and_garbage_packets() {
        let q = query("example.com.", RecordType::A);
        let expect = Expect { question: &q.queries[0], op_code: OpCode::Query };
        for packet in [&[][..], &[0x10][..], &[0x10, 0x92, 0x81, 0x80][..], &[0xff; 40][..]] {
            assert!(matches!(check_response(packet, 0x1092, &expect), Received::Invalid(_)));
        }
    }

    /// A DoT server on 127.0.0.1 with a certificate for `dns.test` issued by a fresh CA.
    struct DotServer {
        addr: SocketAddr,
        roots: RootCertStore,
        queries: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for DotServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn dot_server() -> DotServer {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "egressd test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let leaf = rcgen::CertificateParams::new(vec!["dns.test".to_string()])
            .expect("leaf params")
            .signed_by(&leaf_key, &ca)
            .expect("leaf");
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).expect("add root");

        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let queries = Arc::new(AtomicUsize::new(0));
        let counter = queries.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut prefix = [0u8; 2];
                    if tls.read_exact(&mut prefix).await.is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
                    if tls.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    let Ok(q) = Message::from_vec(&buf) else { return };
                    counter.fetch_add(1, AtomicOrdering::SeqCst);
                    let r = respond(&q, ResponseCode::NoError, vec![aaaa("secure.example.", Ipv6Addr::LOCALHOST)]);
                    let bytes = r.to_vec().expect("enc");
                    let len = u16::try_from(bytes.len()).expect("len");
                    let _ = tls.write_all(&len.to_be_bytes()).await;
                    let _ = tls.write_all(&bytes).await;
                    let _ = tls.flush().await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        DotServer { addr, roots, queries, task }
    }

    #[tokio::test]
    async fn dns_over_tls_with_trusted_certificate() {
        let dot = dot_server().await;
        let list = [Upstream::Tls { addr: dot.addr, name: "dns.test".into() }];
        let up = Upstreams::with_tls_roots(&list, T, dot.roots.clone()).expect("upstreams");
        let resp = up.exchange(&query("secure.example.", RecordType::AAAA)).await.expect("DoT answer");
        assert_eq!(resp.id, 4242);
        assert_eq!(ips(&resp), vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]);
        assert_eq!(dot.queries.load(AtomicOrdering::SeqCst), 1);
    }

    #[tokio::test]
    async fn dns_over_tls_rejects_wrong_name_and_untrusted_certificate() {
        let dot = dot_server().await;
        let wrong_name = [Upstream::Tls { addr: dot.addr, name: "other.test".into() }];
        let up = Upstreams::with_tls_roots(&wrong_name, T, dot.roots.clone()).expect("upstreams");
        let err = up.exchange(&query("secure.example.", RecordType::AAAA)).await.expect_err("name mismatch");
        assert!(matches!(err, UpstreamError::Io(_)), "{err:?}");

        let right_name = [Upstream::Tls { addr: dot.addr, name: "dns.test".into() }];
        let up = Upstreams::new(&right_name, T).expect("upstreams with webpki roots");
        let err = up.exchange(&query("secure.example.", RecordType::AAAA)).await.expect_err("untrusted CA");
        assert!(matches!(err, UpstreamError::Io(_)), "{err:?}");
        assert_eq!(dot.queries.load(AtomicOrdering::SeqCst), 0, "no query is sent before verification");
    }
}
