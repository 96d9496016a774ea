//! CONNECT tunnels: decide on the authority, resolve, guard and connect, answer 200, then read
//! the client's ClientHello and check its SNI before a single client byte reaches the
//! upstream. The buffered bytes are replayed and the tunnel relayed with the rule's upload cap.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::budget::Budgets;
use super::relay::{UploadLimits, forward_early, relay};
use super::respond::{self, status_for};
use super::sni::{self, HelloError, Parse};
use super::{Conn, Proxy, ProxyBody, dial};
use crate::policy::name::{Host, normalize_name, parse_authority};
use crate::policy::{Action, Decision, Facts, Reason, Surface};
use crate::state::Snapshot;
use crate::telemetry::{DecisionEvent, Kind};

struct Tunnel {
    id: String,
    client: IpAddr,
    host: Host,
    port: u16,
    decision: Decision,
    rule: String,
    upstream_ip: Option<IpAddr>,
    started: Instant,
}

impl Tunnel {
    fn emit(&self, decision: Decision, bytes_up: u64, bytes_down: u64) {
        let host = self.host.to_string();
        DecisionEvent {
            id: &self.id,
            kind: Kind::Connect,
            client: self.client,
            host: &host,
            port: Some(self.port),
            qtype: None,
            action: decision.action,
            rule: &self.rule,
            reason: decision.reason,
            upstream_ip: self.upstream_ip,
            bytes_up,
            bytes_down,
            duration: self.started.elapsed(),
        }
        .emit();
    }
}

fn refuse(
    id: &str,
    client: IpAddr,
    (raw, port): (&str, Option<u16>),
    status: StatusCode,
    rule: &str,
    decision: Decision,
) -> Response<ProxyBody> {
    DecisionEvent {
        id,
        kind: Kind::Connect,
        client,
        host: raw,
        port,
        qtype: None,
        action: Action::Deny,
        rule,
        reason: decision.reason,
        upstream_ip: None,
        bytes_up: 0,
        bytes_down: 0,
        duration: std::time::Duration::ZERO,
    }
    .emit();
    respond::deny(status, rule, decision.reason, id)
}

pub(super) async fn handle(
    proxy: Arc<Proxy>,
    conn: Arc<Conn>,
    snap: Arc<Snapshot>,
    id: String,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let raw = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_else(|| req.uri().to_string());
    let (host, port) = match req.uri().authority().map(|a| parse_authority(a.as_str())) {
        Some(Ok((host, Some(port)))) => (host, port),
        // No authority, or no port: not a valid CONNECT request.
        None | Some(Ok((_, None))) => {
            return refuse(&id, conn.client, (&raw, None), StatusCode::BAD_REQUEST, "default", Decision::MALFORMED);
        }
        Some(Err(_)) => {
            return refuse(&id, conn.client, (&raw, None), StatusCode::FORBIDDEN, "default", Decision::MALFORMED);
        }
    };
    let policy = &snap.policy;
    let facts = Facts {
        host: &host,
        port: Some(port),
        client: Some(conn.client),
        method: None,
        body_len: None,
        surface: Surface::Proxy,
    };
    let decision = policy.decide(&facts);
    let rule = policy.rule_name(decision.rule).to_string();
    let host_str = host.to_string();
    if decision.action == Action::Deny {
        return refuse(&id, conn.client, (&host_str, Some(port)), status_for(decision.reason), &rule, decision);
    }
    if proxy.budgets.exhausted(conn.client, Instant::now()) {
        let d = decision.denied_for(Reason::UploadBudget);
        return refuse(&id, conn.client, (&host_str, Some(port)), status_for(d.reason), &rule, d);
    }
    let cfg = &snap.config.proxy;
    let (upstream, ip) = match dial::dial(
        &proxy.resolver,
        dial::Asker { policy, client: conn.client, inspect_cnames: snap.config.dns.inspect_cnames },
        &host,
        port,
        cfg.connect_timeout,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, host = %host_str, "Upstream dial failed");
            return refuse(
                &id,
                conn.client,
                (&host_str, Some(port)),
                e.status(),
                &rule,
                decision.denied_for(e.reason()),
            );
        }
    };
    let registration = proxy.tunnels.register(host.clone(), port, conn.client);
    let tunnel = Tunnel { id, client: conn.client, host, port, decision, rule, upstream_ip: Some(ip), started };
    let on_upgrade = hyper::upgrade::on(req);
    let limit = policy.limits(&decision).max_upload_bytes;
    let (header_timeout, idle) = (cfg.header_timeout, cfg.idle_timeout);
    let (require_sni, non_tls_ok) = (cfg.require_sni_match, cfg.tunnel_non_tls);
    tokio::spawn(async move {
        // Holding `conn` keeps its connection-limit permit for the tunnel's life.
        let _conn = conn;
        let _active = crate::telemetry::metrics().track_connection(crate::telemetry::Kind::Connect);
        let upgraded = match on_upgrade.await {
            Ok(u) => super::client_socket(u),
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                None
            }
        };
        let Some((client, early)) = upgraded else {
            tunnel.emit(tunnel.decision.denied_for(Reason::Malformed), 0, 0);
            return;
        };
        let limits = TunnelLimits { header_timeout, idle, upload: limit, require_sni, non_tls_ok };
        run_tunnel(tunnel, (client, early), upstream, limits, &proxy.budgets, &registration.cancel).await;
    });
    let mut resp = Response::new(respond::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// What the first client bytes of a tunnel turned out to be.
pub(super) enum Opening {
    Hello(Option<String>),
    NotTls,
    Bad,
}

/// Reads until the buffered bytes hold a complete ClientHello, or show they are not one. The
/// bytes are read straight into `buf`, so nothing of this stays in a tunnel's task afterwards.
pub(super) async fn read_opening<R: AsyncRead + Unpin>(client: &mut R, buf: &mut Vec<u8>) -> Opening {
    loop {
        match sni::parse(buf) {
            Ok(Parse::Done(hello)) => return Opening::Hello(hello.sni),
            Ok(Parse::Incomplete) => {}
            Err(HelloError::NotTls) => return Opening::NotTls,
            Err(_) => return Opening::Bad,
        }
        buf.reserve(4096);
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => return Opening::Bad,
            Ok(_) => {}
        }
    }
}

/// True when the SNI names the CONNECT host (identical after normalisation). An IP-literal
/// CONNECT must carry no SNI (TLS clients send none for addresses).
fn sni_matches(host: &Host, sni: Option<&str>) -> bool {
    match (host, sni) {
        (Host::Name(name), Some(s)) => normalize_name(s).is_ok_and(|n| n == *name),
        (Host::Name(_), None) => false,
        (Host::Ip(_), None) => true,
        (Host::Ip(ip), Some(s)) => s == ip.to_string(),
    }
}

/// The settings a tunnel runs under, taken from the snapshot it was decided with.
struct TunnelLimits {
    header_timeout: std::time::Duration,
    idle: std::time::Duration,
    upload: Option<u64>,
    require_sni: bool,
    non_tls_ok: bool,
}

/// Runs an accepted tunnel: `early` holds client bytes that arrived with the CONNECT request.
async fn run_tunnel(
    tunnel: Tunnel,
    (mut client, early): (TcpStream, bytes::Bytes),
    mut upstream: TcpStream,
    limits: TunnelLimits,
    budgets: &Budgets,
    cancel: &Notify,
) {
    let TunnelLimits { header_timeout, idle, upload: limit, require_sni, non_tls_ok } = limits;
    let mut buf = Vec::with_capacity(early.len().max(2048));
    buf.extend_from_slice(&early);
    drop(early);
    let opening = tokio::time::timeout(header_timeout, read_opening(&mut client, &mut buf)).await;
    let refused = match opening {
        Err(_) | Ok(Opening::Bad) => Some(Reason::NotTls),
        Ok(Opening::NotTls) if !non_tls_ok => Some(Reason::NotTls),
        Ok(Opening::NotTls) => None,
        Ok(Opening::Hello(sni)) if require_sni && !sni_matches(&tunnel.host, sni.as_deref()) => {
            Some(Reason::SniMismatch)
        }
        Ok(Opening::Hello(_)) => None,
    };
    if let Some(reason) = refused {
        let _ = client.shutdown().await;
        tunnel.emit(tunnel.decision.denied_for(reason), 0, 0);
        return;
    }
    let upload = UploadLimits { cap: limit, budget: Some((budgets, tunnel.client)) };
    if let Err(reason) = forward_early(&mut upstream, &buf, upload).await {
        tunnel.emit(tunnel.decision.denied_for(reason), 0, 0);
        return;
    }
    let replayed = buf.len() as u64;
    drop(buf);
    let out = relay(&mut client, &mut upstream, replayed, upload, idle, cancel).await;
    let decision = out.end.denial().map_or(tunnel.decision, |r| tunnel.decision.denied_for(r));
    tunnel.emit(decision, out.up, out.down);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_must_equal_connect_host_after_normalisation() {
        let h = |s: &str| crate::policy::name::normalize_host(s).unwrap();
        assert!(sni_matches(&h("www.example.org"), Some("WWW.Example.org")));
        assert!(sni_matches(&h("www.example.org"), Some("www.example.org.")));
        assert!(!sni_matches(&h("www.example.org"), Some("example.org")));
        assert!(!sni_matches(&h("example.org"), Some("www.example.org")));
        assert!(!sni_matches(&h("www.example.org"), None));
        assert!(!sni_matches(&h("www.example.org"), Some("www.example.org\0")));
        assert!(sni_matches(&h("52.94.1.7"), None));
        assert!(!sni_matches(&h("52.94.1.7"), Some("www.example.org")));
    }
}
