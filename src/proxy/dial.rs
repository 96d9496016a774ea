//! Resolve, guard, connect: the only way the proxy opens an upstream connection.
//!
//! A name is resolved once (`[hosts]` first); every address inside the guard's denied ranges is
//! dropped; the connection goes to a remaining address — the one checked, never a second
//! lookup, so a DNS-rebinding answer cannot slip in between check and connect. Addresses are
//! tried in order within one overall `connect_timeout`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::net::TcpStream;

use crate::policy::Reason;
use crate::policy::guard::Guard;
use crate::policy::name::Host;
use crate::resolve::{ResolveError, Resolver};

/// Why no upstream connection was made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("every resolved address is inside the guard's denied ranges")]
    Guard,
    #[error("name did not resolve: {0}")]
    Resolve(#[from] ResolveError),
    #[error("connection refused or failed: {0}")]
    Connect(io::Error),
    #[error("connect timed out")]
    Timeout,
}

impl DialError {
    /// The status the client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            DialError::Guard => StatusCode::FORBIDDEN,
            DialError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            DialError::Resolve(_) | DialError::Connect(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The audit reason.
    pub fn reason(&self) -> Reason {
        match self {
            DialError::Guard => Reason::Guard,
            _ => Reason::Upstream,
        }
    }
}

/// Addresses for `host` that the guard permits, in resolver order.
pub async fn checked_addrs(resolver: &Resolver, guard: &Guard, host: &Host) -> Result<Vec<IpAddr>, DialError> {
    let addrs = match host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => resolver.lookup_ip(name).await?,
    };
    let permitted: Vec<IpAddr> = addrs.into_iter().filter(|a| guard.permits(*a)).collect();
    if permitted.is_empty() {
        return Err(DialError::Guard);
    }
    Ok(permitted)
}

/// Connects to the first address that accepts within `timeout` overall.
pub async fn connect_any(addrs: &[IpAddr], port: u16, timeout: Duration) -> Result<(TcpStream, IpAddr), DialError> {
    let started = Instant::now();
    let result = connect_first(addrs, port, timeout).await;
    crate::telemetry::metrics().proxy_upstream_connect_seconds.observe(started.elapsed().as_secs_f64());
    result
}

async fn connect_first(addrs: &[IpAddr], port: u16, timeout: Duration) -> Result<(TcpStream, IpAddr), DialError> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    for &ip in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DialError::Timeout);
        }
        match tokio::time::timeout(left, TcpStream::connect(SocketAddr::new(ip, port))).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, ip));
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => return Err(DialError::Timeout),
        }
    }
    Err(last.map_or(DialError::Timeout, DialError::Connect))
}

/// Resolves, guards and connects.
pub async fn dial(
    resolver: &Resolver,
    guard: &Guard,
    host: &Host,
    port: u16,
    timeout: Duration,
) -> Result<(TcpStream, IpAddr), DialError> {
    let started = Instant::now();
    let addrs =
        tokio::time::timeout(timeout, checked_addrs(resolver, guard, host)).await.map_err(|_| DialError::Timeout)??;
    connect_any(&addrs, port, timeout.saturating_sub(started.elapsed())).await
}
