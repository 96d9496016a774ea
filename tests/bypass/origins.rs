//! The far side of egressd in the bypass corpus: the allowed origin (HTTP, or TLS when the
//! first byte is a handshake record), raw recorders standing for denied destinations, and a
//! DNS upstream that records every query (raw bytes and labels) before it even parses it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamKey, SvcParamValue};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS, SVCB};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// What the allowed origin answers.
pub const ALLOWED_BODY: &str = "allowed origin";
/// What a recorder answers to anything that looks like an HTTP request head.
pub const DENIED_BODY: &str = "DENIED ORIGIN REACHED";

/// Binds the allowed origin on `127.0.0.1:P` and recorders on `127.0.0.2:P`, `127.0.0.3:P` and
/// `[::1]:P`, for one port P free on all four.
pub async fn bind_same_port() -> (AllowedOrigin, Recorder, Recorder, Recorder) {
    for _ in 0..64 {
        let first = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let port = first.local_addr().unwrap().port();
        let others: Vec<_> = ["127.0.0.2", "127.0.0.3", "::1"]
            .iter()
            .map(|ip| std::net::TcpListener::bind(SocketAddr::new(ip.parse().unwrap(), port)))
            .collect();
        if others.iter().any(|l| l.is_err()) {
            continue;
        }
        let mut others = others.into_iter().map(|l| {
            let l = l.unwrap();
            l.set_nonblocking(true).unwrap();
            TcpListener::from_std(l).unwrap()
        });
        let allowed = AllowedOrigin::serve(first);
        let denied = Recorder::serve(others.next().unwrap());
        let guarded = Recorder::serve(others.next().unwrap());
        let loop6 = Recorder::serve(others.next().unwrap());
        return (allowed, denied, guarded, loop6);
    }
    panic!("no port free on 127.0.0.1, 127.0.0.2, 127.0.0.3 and ::1 after 64 tries");
}

// ---------------------------------------------------------------------------------------------
// Recorder
// ---------------------------------------------------------------------------------------------

/// Accepts, records every byte, answers an HTTP-looking head with [`DENIED_BODY`].
pub struct Recorder {
    pub addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    bytes: Arc<Mutex<Vec<u8>>>,
    task: JoinHandle<()>,
}

impl Recorder {
    fn serve(listener: TcpListener) -> Recorder {
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let (c, b) = (conns.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut answered = false;
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        b.lock().unwrap().extend_from_slice(&buf[..n]);
                        seen.extend_from_slice(&buf[..n]);
                        if !answered && seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            answered = true;
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{DENIED_BODY}",
                                DENIED_BODY.len()
                            );
                            let _ = s.write_all(resp.as_bytes()).await;
                            let _ = s.shutdown().await;
                        }
                    }
                });
            }
        });
        Recorder { addr, conns, bytes, task }
    }

    /// Connections accepted and every byte received so far.
    pub fn seen(&self) -> (usize, Vec<u8>) {
        (self.conns.load(Ordering::SeqCst), self.bytes.lock().unwrap().clone())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Allowed origin
// ---------------------------------------------------------------------------------------------

/// One request the allowed origin served.
#[derive(Clone, Debug)]
pub struct Served {
    pub method: String,
    pub uri: String,
    pub host: String,
    pub body: Vec<u8>,
}

/// What the allowed origin saw.
#[derive(Clone, Debug, Default)]
pub struct AllowedSeen {
    pub connections: usize,
    pub raw_bytes: usize,
    pub requests: Vec<Served>,
    /// The SNI of every TLS handshake that got far enough for rustls to read it.
    pub snis: Vec<String>,
}

#[derive(Default)]
struct AllowedState {
    connections: AtomicUsize,
    raw: Mutex<Vec<u8>>,
    requests: Mutex<Vec<Served>>,
    snis: Mutex<Vec<String>>,
}

pub struct AllowedOrigin {
    pub addr: SocketAddr,
    state: Arc<AllowedState>,
    task: JoinHandle<()>,
}

impl AllowedOrigin {
    fn serve(listener: TcpListener) -> AllowedOrigin {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(AllowedState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                st.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_conn(stream, st.clone()));
            }
        });
        AllowedOrigin { addr, state, task }
    }

    pub fn seen(&self) -> AllowedSeen {
        AllowedSeen {
            connections: self.state.connections.load(Ordering::SeqCst),
            raw_bytes: self.state.raw.lock().unwrap().len(),
            requests: self.state.requests.lock().unwrap().clone(),
            snis: self.state.snis.lock().unwrap().clone(),
        }
    }

    /// Every byte received on the TCP level.
    pub fn raw(&self) -> Vec<u8> {
        self.state.raw.lock().unwrap().clone()
    }
}

impl Drop for AllowedOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_conn(stream: TcpStream, st: Arc<AllowedState>) {
    let mut first = [0u8; 1];
    let tls = matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16);
    let io = Recording { inner: stream, st: st.clone() };
    if tls {
        let Ok(tls) = tokio_rustls::TlsAcceptor::from(server_config()).accept(io).await else { return };
        if let Some(sni) = tls.get_ref().1.server_name() {
            st.snis.lock().unwrap().push(sni.to_string());
        }
        serve_http(tls, st).await;
    } else {
        serve_http(io, st).await;
    }
}

async fn serve_http<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: S, st: Arc<AllowedState>) {
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let st = st.clone();
        async move {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let host = req.headers().get("host").map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
            let body = req.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
            st.requests.lock().unwrap().push(Served { method, uri, host: host.unwrap_or_default(), body });
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(ALLOWED_BODY.as_bytes()))))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), svc).with_upgrades().await;
}

/// A stream that appends every byte read to the origin's raw record.
struct Recording {
    inner: TcpStream,
    st: Arc<AllowedState>,
}

impl AsyncRead for Recording {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let got = &buf.filled()[before..];
        if !got.is_empty() {
            self.st.raw.lock().unwrap().extend_from_slice(got);
        }
        r
    }
}

impl AsyncWrite for Recording {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Names on the allowed origin's certificate.
pub const TLS_NAMES: &[&str] = &["allowed.test", "tls.allowed.test"];

struct Cert {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

fn cert() -> &'static Cert {
    static CERT: OnceLock<Cert> = OnceLock::new();
    CERT.get_or_init(|| {
        let ck = rcgen::generate_simple_self_signed(TLS_NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("rcgen");
        Cert { cert: ck.cert.der().clone(), key: ck.signing_key.serialize_der() }
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config() -> Arc<rustls::ServerConfig> {
    static CFG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        let c = cert();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.clone()));
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![c.cert.clone()], key)
                .unwrap(),
        )
    })
    .clone()
}

/// A client config trusting only the allowed origin's certificate.
pub fn client_config() -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert().cert.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

// ---------------------------------------------------------------------------------------------
// DNS upstream
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Rr {
    A(std::net::Ipv4Addr),
    Aaaa(std::net::Ipv6Addr),
    Cname(String),
    HttpsHint(std::net::Ipv4Addr),
    /// HTTPS in AliasMode (priority 0) pointing at another name.
    HttpsAlias(String),
}

/// Name → records; `*.suffix` keys answer every name below `suffix` without its own entry.
#[derive(Clone, Default)]
pub struct Zone {
    records: HashMap<String, Vec<Rr>>,
}

impl Zone {
    pub fn a(mut self, name: &str, ip: &str) -> Zone {
        self.records.entry(name.into()).or_default().push(Rr::A(ip.parse().unwrap()));
        self
    }
    pub fn aaaa(mut self, name: &str, ip: &str) -> Zone {
        self.records.entry(name.into()).or_default().push(Rr::Aaaa(ip.parse().unwrap()));
        self
    }
    pub fn cname(mut self, name: &str, target: &str) -> Zone {
        self.records.entry(name.into()).or_default().push(Rr::Cname(target.into()));
        self
    }
    /// An HTTPS record (priority 1, target ".") with an ipv4hint.
    pub fn https_hint(mut self, name: &str, ip: &str) -> Zone {
        self.records.entry(name.into()).or_default().push(Rr::HttpsHint(ip.parse().unwrap()));
        self
    }

    /// An HTTPS record in AliasMode (priority 0) naming `target`.
    pub fn https_alias(mut self, name: &str, target: &str) -> Zone {
        self.records.entry(name.into()).or_default().push(Rr::HttpsAlias(target.into()));
        self
    }

    fn lookup(&self, name: &str) -> Option<&Vec<Rr>> {
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

/// One query as the upstream received it.
#[derive(Clone, Debug)]
pub struct SeenQuery {
    /// The question's labels, lowercased and joined with dots (lossy for non-UTF-8 bytes).
    pub name: String,
    /// The raw labels of the question name (uncompressed, as egressd must send them).
    pub labels: Vec<Vec<u8>>,
    pub qtype: u16,
    pub tcp: bool,
    pub raw: Vec<u8>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenQuery>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn fqdn(name: &str) -> Name {
    Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).unwrap_or_else(|e| panic!("name {name}: {e}"))
}

/// Records `packet` (whatever it holds) and returns it parsed, if it parses.
fn record(seen: &Mutex<Vec<SeenQuery>>, packet: &[u8], tcp: bool) -> Option<Message> {
    let (labels, qtype) = crate::wire::first_question(packet).unwrap_or_default();
    let name = labels.iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect::<Vec<_>>().join(".");
    seen.lock().unwrap().push(SeenQuery { name, labels, qtype, tcp, raw: packet.to_vec() });
    Message::from_vec(packet).ok()
}

fn answer(zone: &Zone, query: &Message) -> Message {
    let mut resp = Message::response(query.metadata.id, OpCode::Query);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_queries(query.queries.iter().cloned());
    let Some(q) = query.queries.first() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp;
    };
    let qtype = q.query_type();
    let mut name = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    for _ in 0..32 {
        let Some(records) = zone.lookup(&name) else {
            resp.metadata.response_code = ResponseCode::NXDomain;
            break;
        };
        let owner = fqdn(&name);
        let cname = records.iter().find_map(|r| if let Rr::Cname(t) = r { Some(t.clone()) } else { None });
        if let Some(target) = cname {
            resp.add_answer(Record::from_rdata(owner, 60, RData::CNAME(CNAME(fqdn(&target)))));
            name = target;
            continue;
        }
        for r in records {
            let rdata = match (r, qtype) {
                (Rr::A(ip), RecordType::A) => RData::A(A(*ip)),
                (Rr::Aaaa(ip), RecordType::AAAA) => RData::AAAA(AAAA(*ip)),
                (Rr::HttpsHint(ip), RecordType::HTTPS) => {
                    let params = vec![(SvcParamKey::Ipv4Hint, SvcParamValue::Ipv4Hint(IpHint(vec![A(*ip)])))];
                    RData::HTTPS(HTTPS(SVCB::new(1, Name::root(), params)))
                }
                (Rr::HttpsAlias(target), RecordType::HTTPS) => RData::HTTPS(HTTPS(SVCB::new(0, fqdn(target), vec![]))),
                _ => continue,
            };
            resp.add_answer(Record::from_rdata(owner.clone(), 60, rdata));
        }
        break;
    }
    resp
}

impl Upstream {
    pub async fn start(zone: Zone) -> Upstream {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let zone = Arc::new(zone);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let udp_task = {
            let (zone, seen) = (zone.clone(), seen.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65535];
                loop {
                    let Ok((n, peer)) = udp.recv_from(&mut buf).await else { continue };
                    let Some(query) = record(&seen, &buf[..n], false) else { continue };
                    let resp = answer(&zone, &query);
                    let mut bytes = resp.to_vec().unwrap();
                    if bytes.len() > 512 && query.edns.is_none() {
                        bytes = resp.truncate().to_vec().unwrap();
                    }
                    let _ = udp.send_to(&bytes, peer).await;
                }
            })
        };
        let tcp_task = {
            let (zone, seen) = (zone.clone(), seen.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = tcp.accept().await else { continue };
                    let (zone, seen) = (zone.clone(), seen.clone());
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
                            let Some(query) = record(&seen, &msg, true) else { return };
                            let bytes = answer(&zone, &query).to_vec().unwrap();
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
        Upstream { addr, seen, tasks: vec![udp_task, tcp_task] }
    }

    pub fn seen(&self) -> Vec<SeenQuery> {
        self.seen.lock().unwrap().clone()
    }

    /// The names asked so far, in order (with repeats).
    pub fn names(&self) -> Vec<String> {
        self.seen().into_iter().map(|q| q.name).collect()
    }
}
