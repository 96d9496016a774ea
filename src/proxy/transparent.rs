//! Transparent listeners: connections redirected by iptables/nftables (REDIRECT or TPROXY),
//! decided on the TLS SNI (`transparent_tls`) or the HTTP `Host` (`transparent_http`).
//!
//! The name alone proves nothing — a client can send an allowed SNI to an attacker's address
//! (the SNI-spoofing bypass of SNI-only firewalls) — so after the policy allows the name, the
//! original destination must be one of the addresses the resolver gives for that name, or
//! inside the deciding rule's `cidrs`; otherwise the flow is denied with `dst_mismatch`. The
//! guard applies to the original destination too. The connection then goes to the original
//! destination, with the same byte accounting, caps and budgets as CONNECT tunnels.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use tokio::net::{TcpListener, TcpStream};

use super::relay::{UploadLimits, forward_early, relay};
use super::{Proxy, dial};
use crate::policy::name::{Host, normalize_host};
use crate::policy::{Action, Decision, Facts, Reason, Surface};
use crate::state::Snapshot;
use crate::telemetry::{DecisionEvent, Kind, metrics, next_id};

/// The address the client originally dialled. REDIRECT/DNAT record it for `SO_ORIGINAL_DST`;
/// under TPROXY the accepted socket's local address is the original destination.
pub fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    let v4 = |sa: nix::libc::sockaddr_in| {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))), u16::from_be(sa.sin_port))
    };
    let nat = match local {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst).map(v4),
        // An IPv4 flow accepted on a dual-stack `[::]` listener: its NAT entry is IPv4's.
        SocketAddr::V6(l) if l.ip().to_ipv4_mapped().is_some() => getsockopt(stream, sockopt::OriginalDst).map(v4),
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst)
            .map(|sa| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)), u16::from_be(sa.sin6_port))),
    };
    Ok(nat.unwrap_or(local))
}

/// True when a connection reached the listener `own` without being redirected: its "original
/// destination" is the listener itself (same address as the accepted socket's, on the
/// listener's port). A wildcard listener (`0.0.0.0:port`) never equals a concrete address, so
/// the comparison is on the port and the accepted socket's own address.
fn not_redirected(orig: SocketAddr, local: Option<SocketAddr>, own: Option<SocketAddr>) -> bool {
    match own {
        Some(own) => orig.port() == own.port() && local.is_none_or(|l| l == orig),
        None => true,
    }
}

/// Binds a transparent listener, with `IP_TRANSPARENT` when the process may set it
/// (`CAP_NET_ADMIN`): TPROXY delivers connections only to such sockets. REDIRECT needs nothing,
/// so not being allowed to set it is not an error.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = crate::net::socket(addr)?;
    if let Err(e) = setsockopt(&socket, sockopt::IpTransparent, &true) {
        tracing::debug!(%addr, error = %e, "IP_TRANSPARENT not set: TPROXY cannot deliver to this listener (REDIRECT can)");
    }
    socket.bind(addr)?;
    socket.listen(crate::net::LISTEN_BACKLOG)
}

/// Checks that `orig` is where `host` really is: inside the guard's permitted addresses, and
/// either inside the deciding rule's `cidrs` or among the resolver's addresses for the name.
/// Resolution failure is a mismatch (fail closed).
pub async fn verify_destination(
    proxy: &Proxy,
    snap: &Snapshot,
    decision: &Decision,
    host: &Host,
    orig: SocketAddr,
) -> Result<(), Reason> {
    let ip = canonical(orig.ip());
    if !snap.policy.guard().permits(ip) {
        return Err(Reason::Guard);
    }
    if let Some(id) = decision.rule {
        if snap.policy.rule(id).cidrs.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
    }
    match host {
        Host::Ip(literal) if canonical(*literal) == ip => Ok(()),
        Host::Ip(_) => Err(Reason::DstMismatch),
        Host::Name(name) => match proxy.resolver.lookup_ip(name).await {
            Ok(addrs) if addrs.iter().any(|a| canonical(*a) == ip) => Ok(()),
            _ => Err(Reason::DstMismatch),
        },
    }
}

/// IPv4-mapped IPv6 addresses compare as their IPv4 form.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Accepts redirected TLS connections on `listener`.
pub async fn serve_tls(proxy: Arc<Proxy>, listener: TcpListener) {
    let own = listener.local_addr().ok();
    super::accept_loop(proxy, listener, move |proxy, stream, peer, permit| async move {
        let _permit = permit;
        let _active = metrics().track_connection(Kind::Transparent);
        tls_flow(proxy, stream, peer, own).await;
    })
    .await;
}

/// Accepts redirected plain-HTTP connections on `listener`; each request is decided on `Host`.
pub async fn serve_http(proxy: Arc<Proxy>, listener: TcpListener) {
    let own = listener.local_addr().ok();
    super::accept_loop(proxy, listener, move |proxy, stream, peer, permit| async move {
        let orig = match original_destination(&stream) {
            Ok(o) if !not_redirected(o, stream.local_addr().ok(), own) => o,
            // Not redirected (a direct connection to the listener): nowhere legitimate to go.
            _ => return refuse_early(stream, peer, Reason::Malformed, None),
        };
        let _active = metrics().track_connection(Kind::Transparent);
        super::serve_conn(proxy, stream, peer, permit, super::ConnMode::TransparentHttp { orig }).await;
    })
    .await;
}

/// Logs a flow refused before any name was known, and resets the connection.
fn refuse_early(stream: TcpStream, peer: SocketAddr, reason: Reason, orig: Option<SocketAddr>) {
    let host = orig.map(|o| o.ip().to_string()).unwrap_or_default();
    DecisionEvent {
        id: &next_id(),
        kind: Kind::Transparent,
        client: peer.ip(),
        host: &host,
        port: orig.map(|o| o.port()),
        qtype: None,
        action: Action::Deny,
        rule: "default",
        reason,
        upstream_ip: None,
        bytes_up: 0,
        bytes_down: 0,
        duration: Duration::ZERO,
    }
    .emit();
    reset(stream);
}

/// Closes with a TCP reset rather than a FIN, so clients fail fast and visibly.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn tls_flow(proxy: Arc<Proxy>, mut stream: TcpStream, peer: SocketAddr, own: Option<SocketAddr>) {
    let started = Instant::now();
    let orig = match original_destination(&stream) {
        Ok(o) if !not_redirected(o, stream.local_addr().ok(), own) => o,
        _ => return refuse_early(stream, peer, Reason::Malformed, None),
    };
    let snap = proxy.state.snapshot();
    let cfg = snap.config.proxy.clone();
    let mut buf = Vec::with_capacity(2048);
    let opening = tokio::time::timeout(cfg.header_timeout, super::connect::read_opening(&mut stream, &mut buf)).await;
    let sni = match opening {
        Ok(super::connect::Opening::Hello(Some(sni))) => sni,
        // No SNI: nothing to decide on. Not TLS, or too slow: refused likewise.
        Ok(super::connect::Opening::Hello(None)) => return refuse_early(stream, peer, Reason::Malformed, Some(orig)),
        _ => return refuse_early(stream, peer, Reason::NotTls, Some(orig)),
    };
    let host = match normalize_host(&sni) {
        Ok(h @ Host::Name(_)) => h,
        _ => return refuse_early(stream, peer, Reason::Malformed, Some(orig)),
    };
    let policy = &snap.policy;
    let facts = Facts {
        host: &host,
        port: Some(orig.port()),
        client: Some(peer.ip()),
        method: None,
        body_len: None,
        surface: Surface::Proxy,
    };
    let decision = policy.decide(&facts);
    let rule = policy.rule_name(decision.rule).to_string();
    let host_str = host.to_string();
    let emit = |d: Decision, up: u64, down: u64, upstream: Option<IpAddr>| {
        DecisionEvent {
            id: &next_id(),
            kind: Kind::Transparent,
            client: peer.ip(),
            host: &host_str,
            port: Some(orig.port()),
            qtype: None,
            action: d.action,
            rule: &rule,
            reason: d.reason,
            upstream_ip: upstream,
            bytes_up: up,
            bytes_down: down,
            duration: started.elapsed(),
        }
        .emit();
    };
    let refused = if decision.action == Action::Deny {
        Some(decision)
    } else if proxy.budgets.exhausted(peer.ip(), Instant::now()) {
        Some(decision.denied_for(Reason::UploadBudget))
    } else if let Err(reason) = verify_destination(&proxy, &snap, &decision, &host, orig).await {
        Some(decision.denied_for(reason))
    } else {
        None
    };
    if let Some(d) = refused {
        emit(d, 0, 0, None);
        return reset(stream);
    }
    let (mut upstream, ip) = match dial::connect_any(&[orig.ip()], orig.port(), cfg.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            emit(decision.denied_for(e.reason()), 0, 0, None);
            return reset(stream);
        }
    };
    let upload =
        UploadLimits { cap: policy.limits(&decision).max_upload_bytes, budget: Some((&proxy.budgets, peer.ip())) };
    if let Err(reason) = forward_early(&mut upstream, &buf, upload).await {
        emit(decision.denied_for(reason), 0, 0, Some(ip));
        return reset(stream);
    }
    let replayed = buf.len() as u64;
    drop(buf);
    let registration = proxy.tunnels.register(host.clone(), orig.port(), peer.ip());
    let out = relay(&mut stream, &mut upstream, replayed, upload, cfg.idle_timeout, &registration.cancel).await;
    let d = out.end.denial().map_or(decision, |r| decision.denied_for(r));
    emit(d, out.up, out.down, Some(ip));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unredirected_connection_reports_its_local_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(original_destination(&server).unwrap(), addr, "no NAT entry: the local address");
    }

    #[test]
    fn direct_connections_are_told_from_redirected_ones() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Direct, to a concrete and to a wildcard listener.
        assert!(not_redirected(a("10.0.0.1:15443"), Some(a("10.0.0.1:15443")), Some(a("10.0.0.1:15443"))));
        assert!(not_redirected(a("10.0.0.1:15443"), Some(a("10.0.0.1:15443")), Some(a("0.0.0.0:15443"))));
        // REDIRECT: the original destination differs from the accepted socket's address.
        assert!(!not_redirected(a("192.0.2.7:443"), Some(a("10.0.0.1:15443")), Some(a("0.0.0.0:15443"))));
        // TPROXY: the accepted socket's address is the original destination, on another port.
        assert!(!not_redirected(a("192.0.2.7:443"), Some(a("192.0.2.7:443")), Some(a("0.0.0.0:15443"))));
    }

    #[tokio::test]
    async fn bind_listens_with_or_without_ip_transparent() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        l.accept().await.unwrap();
    }

    #[test]
    fn mapped_addresses_compare_as_ipv4() {
        assert_eq!(canonical("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(canonical("2001:db8::1".parse().unwrap()), "2001:db8::1".parse::<IpAddr>().unwrap());
    }
}
