//! Plain-HTTP proxy requests (absolute-form): decide on the URI's authority before anything
//! else, then forward to the checked address with hop-by-hop and `Proxy-*` headers removed and
//! `Host` rewritten to the authority. WebSocket/Upgrade is relayed only for allowed hosts.

use std::error::Error as StdError;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::pool::PoolKey;
use super::respond::{self, status_for};
use super::{BoxError, Conn, Proxy, ProxyBody, dial};
use crate::policy::name::{Host, parse_authority};
use crate::policy::{Action, Decision, Facts, Reason, Surface};
use crate::state::Snapshot;
use crate::telemetry::{DecisionEvent, Kind};

/// A request body cut off at a limit.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the {0} limit")]
pub struct BodyTooLarge(pub Reason);

/// The client's request body could not be read (bad chunk framing, cut short): the client's
/// fault, answered `400` with reason `malformed`, not a `502` blamed on the upstream.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct ClientBodyError(hyper::Error);

/// Where a request came from: the explicit proxy (absolute-form, routed by the URI) or a
/// transparent listener (origin-form, decided on `Host`, sent to the original destination).
#[derive(Clone, Copy, Debug)]
pub(super) enum Mode {
    Explicit,
    Transparent { orig: std::net::SocketAddr },
}

/// Everything logged about one request, emitted once when the exchange ends.
struct Audit {
    kind: Kind,
    id: String,
    client: IpAddr,
    host: String,
    port: u16,
    decision: Decision,
    rule: String,
    upstream_ip: Option<IpAddr>,
    bytes_up: u64,
    started: Instant,
}

impl Audit {
    fn emit(&self, bytes_down: u64) {
        DecisionEvent {
            id: &self.id,
            kind: self.kind,
            client: self.client,
            host: &self.host,
            port: Some(self.port),
            qtype: None,
            action: self.decision.action,
            rule: &self.rule,
            reason: self.decision.reason,
            upstream_ip: self.upstream_ip,
            bytes_up: self.bytes_up,
            bytes_down,
            duration: self.started.elapsed(),
        }
        .emit();
    }

    fn deny(mut self, decision: Decision, rule: &str, status: StatusCode) -> Response<ProxyBody> {
        self.decision = decision;
        self.rule = rule.to_string();
        self.emit(0);
        respond::deny(status, &self.rule, decision.reason, &self.id)
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies must not forward.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, every header named in `Connection`, and every `Proxy-*`
/// header. Returns the `Upgrade` value when the message asks for one (kept only if `keep_upgrade`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE).cloned();
    let wants_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let proxy_headers: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
    for name in proxy_headers {
        headers.remove(name);
    }
    let upgrade = upgrade.filter(|_| wants_upgrade);
    if let (true, Some(u)) = (keep_upgrade, &upgrade) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u.clone());
    }
    upgrade
}

/// The authority to send as `Host`: the normalised host, and the port when not 80.
pub(crate) fn host_header(host: &Host, port: u16) -> String {
    let h = match host {
        Host::Ip(IpAddr::V6(v6)) => format!("[{v6}]"),
        other => other.to_string(),
    };
    if port == 80 { h } else { format!("{h}:{port}") }
}

/// Request line + headers, approximately as they were on the wire.
pub(crate) fn head_size<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    line + req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>()
}

pub(super) async fn handle(
    proxy: Arc<Proxy>,
    conn: Arc<Conn>,
    snap: Arc<Snapshot>,
    id: String,
    mut req: Request<Incoming>,
    mode: Mode,
) -> Response<ProxyBody> {
    let policy = &snap.policy;
    let mut audit = Audit {
        kind: if matches!(mode, Mode::Explicit) { Kind::Http } else { Kind::Transparent },
        id,
        client: conn.client,
        host: String::new(),
        port: 0,
        decision: Decision::MALFORMED,
        rule: "default".into(),
        upstream_ip: None,
        bytes_up: 0,
        started: Instant::now(),
    };
    if head_size(&req) > snap.config.proxy.max_header_bytes {
        return audit.deny(Decision::MALFORMED, "default", StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    // Both framings at once is the classic request-smuggling setup (RFC 9112 §6.3): refuse.
    if req.headers().contains_key(header::TRANSFER_ENCODING) && req.headers().contains_key(header::CONTENT_LENGTH) {
        return audit.deny(Decision::MALFORMED, "default", StatusCode::BAD_REQUEST);
    }
    let uri = req.uri().clone();
    let target = match mode {
        Mode::Explicit => target(&uri),
        Mode::Transparent { orig } => transparent_target(&req, orig),
    };
    let (host, port) = match target {
        Ok(t) => t,
        Err(status) => {
            audit.host = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default();
            return audit.deny(Decision::MALFORMED, "default", status);
        }
    };
    audit.host = host.to_string();
    audit.port = port;
    let body_len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let facts = Facts {
        host: &host,
        port: Some(port),
        client: Some(conn.client),
        method: Some(req.method().as_str()),
        body_len,
        surface: Surface::Proxy,
    };
    let decision = policy.decide(&facts);
    let rule = policy.rule_name(decision.rule).to_string();
    if decision.action == Action::Deny {
        return audit.deny(decision, &rule, status_for(decision.reason));
    }
    audit.decision = decision;
    audit.rule = rule.clone();
    let limits = policy.limits(&decision);
    let uploaded = conn.uploaded.load(Ordering::Relaxed);
    let upload_left = limits.max_upload_bytes.map(|m| m.saturating_sub(uploaded));
    if let (Some(left), Some(len)) = (upload_left, body_len) {
        if len > left {
            return audit.deny(decision.denied_for(Reason::UploadLimit), &rule, StatusCode::PAYLOAD_TOO_LARGE);
        }
    }

    let has_body = body_len.is_some_and(|n| n > 0) || req.headers().contains_key(header::TRANSFER_ENCODING);
    if has_body && proxy.budgets.exhausted(conn.client, Instant::now()) {
        return audit.deny(decision.denied_for(Reason::UploadBudget), &rule, StatusCode::FORBIDDEN);
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let upgrade = strip_hop_by_hop(&mut parts.headers, true);
    let Ok(host_value) = HeaderValue::from_str(&host_header(&host, port)) else {
        return audit.deny(Decision::MALFORMED, "default", StatusCode::BAD_REQUEST);
    };
    parts.headers.insert(header::HOST, host_value);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match Uri::try_from(if path.is_empty() { "/" } else { path }) {
        Ok(u) => u,
        Err(_) => return audit.deny(Decision::MALFORMED, "default", StatusCode::BAD_REQUEST),
    };
    parts.version = http::Version::HTTP_11;
    let limited = LimitedBody {
        inner: body,
        conn: conn.clone(),
        proxy: proxy.clone(),
        sent: 0,
        body_limit: limits.max_request_body,
        upload_left,
    };
    let outgoing = Request::from_parts(parts, limited.boxed());

    let key: PoolKey = (host.to_string(), port);
    let cfg = &snap.config.proxy;
    let pooled = match mode {
        Mode::Explicit if upgrade.is_none() => proxy.pool.checkout(&key),
        _ => None,
    };
    let (mut sender, ip) = match pooled {
        Some(p) => p,
        None => {
            let dialed = match mode {
                Mode::Explicit => {
                    dial::dial(
                        &proxy.resolver,
                        dial::Asker { policy, client: conn.client, inspect_cnames: snap.config.dns.inspect_cnames },
                        &host,
                        port,
                        cfg.connect_timeout,
                    )
                    .await
                }
                Mode::Transparent { orig } => {
                    if let Err(reason) =
                        super::transparent::verify_destination(&proxy, &snap, &decision, &host, orig).await
                    {
                        return audit.deny(decision.denied_for(reason), &rule, status_for(reason));
                    }
                    dial::connect_any(&[orig.ip()], orig.port(), cfg.connect_timeout).await
                }
            };
            let (stream, ip) = match dialed {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, host = %host, "Upstream dial failed");
                    let status = e.status();
                    return audit.deny(decision.denied_for(e.reason()), &rule, status);
                }
            };
            match hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream)).await {
                Ok((sender, connection)) => {
                    tokio::spawn(async move {
                        let _ = connection.with_upgrades().await;
                    });
                    (sender, ip)
                }
                Err(_) => return audit.deny(decision.denied_for(Reason::Upstream), &rule, StatusCode::BAD_GATEWAY),
            }
        }
    };
    audit.upstream_ip = Some(ip);
    let sent_before = conn.uploaded.load(Ordering::Relaxed);
    let result = conn.activity.until_idle(sender.send_request(outgoing), cfg.idle_timeout).await;
    audit.bytes_up = conn.uploaded.load(Ordering::Relaxed).saturating_sub(sent_before);
    let Some(result) = result else {
        tracing::debug!(host = %host, "No response from the upstream within idle_timeout");
        return audit.deny(decision.denied_for(Reason::Upstream), &rule, StatusCode::GATEWAY_TIMEOUT);
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if let Some(BodyTooLarge(reason)) = find_cause::<BodyTooLarge>(&e) {
                let reason = *reason;
                return audit.deny(decision.denied_for(reason), &rule, StatusCode::PAYLOAD_TOO_LARGE);
            }
            if find_cause::<ClientBodyError>(&e).is_some() {
                tracing::debug!(error = %e, "Client request body malformed");
                return audit.deny(decision.denied_for(Reason::Malformed), &rule, StatusCode::BAD_REQUEST);
            }
            tracing::debug!(error = %e, "Upstream request failed");
            return audit.deny(decision.denied_for(Reason::Upstream), &rule, StatusCode::BAD_GATEWAY);
        }
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS && upgrade.is_some() {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let idle = cfg.idle_timeout;
        let upload_cap = upload_left;
        let audit_conn = conn.clone();
        let registration = proxy.tunnels.register(host.clone(), port, conn.client);
        let relay_proxy = proxy.clone();
        tokio::spawn(async move {
            let sockets = match (client_upgrade.await, upstream_upgrade.await) {
                (Ok(c), Ok(u)) => super::client_socket(c).zip(super::upstream_socket(u)),
                _ => None,
            };
            let Some(((mut client, client_early), (mut upstream, upstream_early))) = sockets else {
                audit.emit(0);
                return;
            };
            let budget = Some((&relay_proxy.budgets, audit.client));
            let upload = super::relay::UploadLimits { cap: upload_cap, budget };
            // Bytes hyper read past each head go first, the client's under the relay's limits.
            match super::relay::forward_early(&mut upstream, &client_early, upload).await {
                Ok(()) => {}
                Err(Reason::Upstream) => return audit.emit(0),
                Err(reason) => {
                    audit.decision = audit.decision.denied_for(reason);
                    return audit.emit(0);
                }
            }
            use tokio::io::AsyncWriteExt;
            if client.write_all(&upstream_early).await.is_err() {
                return audit.emit(0);
            }
            let (early_up, early_down) = (client_early.len() as u64, upstream_early.len() as u64);
            drop((client_early, upstream_early));
            let mut out =
                super::relay::relay(&mut client, &mut upstream, early_up, upload, idle, &registration.cancel).await;
            out.down += early_down;
            audit_conn.uploaded.fetch_add(out.up, Ordering::Relaxed);
            audit.bytes_up += out.up;
            if let Some(reason) = out.end.denial() {
                audit.decision = audit.decision.denied_for(reason);
            }
            audit.emit(out.down);
        });
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        return Response::from_parts(parts, respond::empty());
    }

    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let keep = !parts.headers.contains_key(header::CONNECTION);
    let tracked = TrackedBody {
        inner: body,
        bytes: 0,
        audit: Some(audit),
        ret: (keep && matches!(mode, Mode::Explicit)).then(|| (proxy.pool.clone(), key, sender, ip)),
    };
    Response::from_parts(parts, tracked.boxed())
}

/// The destination of an absolute-form request; `Err(status)` for anything else.
pub(crate) fn target(uri: &Uri) -> Result<(Host, u16), StatusCode> {
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        // Origin-form (`GET /x`) is a request to a server, not to a proxy.
        return Err(StatusCode::BAD_REQUEST);
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(StatusCode::BAD_REQUEST);
    }
    match parse_authority(authority.as_str()) {
        Ok((host, port)) => Ok((host, port.unwrap_or(80))),
        Err(_) => Err(StatusCode::FORBIDDEN),
    }
}

/// The destination of a transparently redirected request: the `Host` header, on the original
/// destination's port (a `Host` naming another port is refused: the connection goes to `orig`).
pub(crate) fn transparent_target<B>(req: &Request<B>, orig: std::net::SocketAddr) -> Result<(Host, u16), StatusCode> {
    if req.uri().authority().is_some() {
        // Absolute-form to a transparent port: decide on nothing the client did not route.
        return Err(StatusCode::BAD_REQUEST);
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let (Some(value), None) = (hosts.next(), hosts.next()) else { return Err(StatusCode::BAD_REQUEST) };
    let value = value.to_str().map_err(|_| StatusCode::BAD_REQUEST)?;
    match parse_authority(value) {
        Ok((host, None)) => Ok((host, orig.port())),
        Ok((host, Some(p))) if p == orig.port() => Ok((host, p)),
        _ => Err(StatusCode::FORBIDDEN),
    }
}

fn find_cause<'a, T: StdError + 'static>(e: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// The client's request body, counted into the connection's upload total and cut off at
/// the rule's body and upload limits.
struct LimitedBody {
    inner: Incoming,
    conn: Arc<Conn>,
    proxy: Arc<Proxy>,
    sent: u64,
    body_limit: Option<u64>,
    upload_left: Option<u64>,
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                let total = this.sent + n;
                if this.body_limit.is_some_and(|m| total > m) {
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge(Reason::BodyLimit)))));
                }
                if this.upload_left.is_some_and(|m| total > m) {
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge(Reason::UploadLimit)))));
                }
                if !this.proxy.budgets.try_spend(this.conn.client, n, Instant::now()) {
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge(Reason::UploadBudget)))));
                }
                this.sent = total;
                this.conn.uploaded.fetch_add(n, Ordering::Relaxed);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(ClientBodyError(e))))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream's response body: counts bytes, returns the connection to the pool when the
/// body ended cleanly, and writes the audit line when done (or dropped mid-way).
struct TrackedBody {
    inner: Incoming,
    bytes: u64,
    audit: Option<Audit>,
    ret: Option<(super::pool::Pool, PoolKey, hyper::client::conn::http1::SendRequest<ProxyBody>, IpAddr)>,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.ret = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                if let Some((pool, key, sender, ip)) = this.ret.take() {
                    pool.checkin(key, sender, ip);
                }
                if let Some(a) = this.audit.take() {
                    a.emit(this.bytes);
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // An empty body is never polled; its connection is still reusable.
        if let (true, Some((pool, key, sender, ip))) = (self.inner.is_end_stream(), self.ret.take()) {
            pool.checkin(key, sender, ip);
        }
        if let Some(a) = self.audit.take() {
            a.emit(self.bytes);
        }
    }
}
