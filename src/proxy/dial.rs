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

use crate::policy::name::{Host, normalize_name};
use crate::policy::{Facts, Policy, Reason, Surface};
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
    /// The name resolves through a CNAME the policy denies (`inspect_cnames`).
    #[error("the answer's CNAME chain passes through {alias}, which the policy denies")]
    Cname { alias: String, rule: Option<crate::policy::RuleId> },
}

impl DialError {
    /// The status the client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            DialError::Guard | DialError::Cname { .. } => StatusCode::FORBIDDEN,
            DialError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            DialError::Resolve(_) | DialError::Connect(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The audit reason.
    pub fn reason(&self) -> Reason {
        match self {
            DialError::Guard => Reason::Guard,
            DialError::Cname { .. } => Reason::Cname,
            _ => Reason::Upstream,
        }
    }
}

/// Who is asking, for the checks a resolved name must pass.
#[derive(Clone, Copy)]
pub struct Asker<'a> {
    pub policy: &'a Policy,
    pub client: IpAddr,
    /// Hold CNAME targets to the policy (`dns.inspect_cnames`), as the DNS firewall does.
    pub inspect_cnames: bool,
}

/// Addresses for `host` that the guard permits, in resolver order. With `inspect_cnames`,
/// every CNAME target the answer passed through must itself be allowed — the same cloaking
/// check the DNS firewall applies, so a name cannot lead the proxy where the policy denies.
pub async fn checked_addrs(resolver: &Resolver, asker: Asker<'_>, host: &Host) -> Result<Vec<IpAddr>, DialError> {
    let addrs = match host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => {
            let resolved = resolver.lookup(name).await?;
            if asker.inspect_cnames {
                for alias in &resolved.aliases {
                    let target = match normalize_name(alias) {
                        Ok(n) => Host::Name(n),
                        Err(_) => return Err(DialError::Cname { alias: alias.clone(), rule: None }),
                    };
                    let facts = Facts {
                        host: &target,
                        port: None,
                        client: Some(asker.client),
                        method: None,
                        body_len: None,
                        surface: Surface::Proxy,
                    };
                    let d = asker.policy.decide(&facts);
                    if !d.action.permits() {
                        return Err(DialError::Cname { alias: alias.clone(), rule: d.rule });
                    }
                }
            }
            resolved.addrs
        }
    };
    let guard = asker.policy.guard();
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
    asker: Asker<'_>,
    host: &Host,
    port: u16,
    timeout: Duration,
) -> Result<(TcpStream, IpAddr), DialError> {
    let started = Instant::now();
    let addrs =
        tokio::time::timeout(timeout, checked_addrs(resolver, asker, host)).await.map_err(|_| DialError::Timeout)??;
    connect_any(&addrs, port, timeout.saturating_sub(started.elapsed())).await
}
