//! `egressd run`: loads the config, binds every listener, logs the start line, serves until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::admin::{self, Admin, Readiness};
use crate::config::{self, ConfigError};
use crate::dns::{self, handler::Firewall, tunneling::Detector};
use crate::proxy::{self, Proxy};
use crate::reload::{self, Reloader};
use crate::resolve::{Cache, Resolver, upstream::Upstreams};
use crate::state::State;

/// Why `run` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid config:\n{0}")]
    Config(#[from] ConfigError),
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("DNS upstreams: {0}")]
    Upstreams(String),
    #[error(
        "dns.upstreams: {upstream} is egressd's own DNS listener {listener}: every query would be forwarded to itself"
    )]
    ForwardingLoop { upstream: SocketAddr, listener: SocketAddr },
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
}

async fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, AppError> {
    let mut out = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let l = crate::net::listen(addr).map_err(|source| AppError::Bind { addr, source })?;
        out.push(l);
    }
    Ok(out)
}

/// Transparent listeners: like [`bind_all`], with `IP_TRANSPARENT` when permitted (TPROXY).
fn bind_transparent(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, AppError> {
    addrs.iter().map(|&addr| proxy::transparent::bind(addr).map_err(|source| AppError::Bind { addr, source })).collect()
}

fn addr_list(listeners: &[TcpListener]) -> String {
    listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.to_string()).collect::<Vec<_>>().join(",")
}

/// Runs egressd with the config at `path` until SIGTERM or SIGINT, then drains: `/readyz`
/// turns 503, listeners stop accepting, idle keep-alive connections close, and requests and
/// tunnels in flight get up to `admin.shutdown_grace` to finish before the rest are closed.
pub async fn run(path: &Path) -> Result<(), AppError> {
    // Signal handlers first, so a SIGTERM during start-up is not fatal-by-default.
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(AppError::Signal)?;
    // The admin listener comes up first, from the main config alone, so `/readyz` answers 503
    // while the policy (possibly a million names) compiles and the listeners bind.
    let main = config::load_main(path)?;
    let readiness = Readiness::new();
    let admin = Admin::starting(main.admin.allow_clients.clone(), readiness.clone());
    let mut background = Vec::new();
    let mut admin_addr = None;
    if let Some(addr) = main.admin.listen {
        let l = crate::net::listen(addr).map_err(|source| AppError::Bind { addr, source })?;
        admin_addr = l.local_addr().ok().map(|a| a.to_string());
        tracing::info!(
            event = "admin",
            admin_listen = admin_addr.as_deref().unwrap_or(""),
            "Admin listening; loading policy"
        );
        background.push(tokio::spawn(admin::serve_admin(l, admin.clone())));
    }
    let loaded = config::load(path)?;
    let cfg = loaded.config.clone();
    let state = Arc::new(State::new(loaded));
    let upstreams =
        Upstreams::new(&cfg.dns.upstreams, cfg.dns.upstream_timeout).map_err(|e| AppError::Upstreams(e.to_string()))?;
    let cache = Cache::new(cfg.dns.cache_entries, cfg.dns.max_ttl);
    let resolver = Arc::new(Resolver::with_cache(cfg.hosts.clone(), upstreams, cache));
    let proxy_listeners = bind_all(&cfg.proxy.listen).await?;
    let transparent_tls = bind_transparent(&cfg.proxy.transparent_tls)?;
    let transparent_http = bind_transparent(&cfg.proxy.transparent_http)?;
    let mut dns_listeners = Vec::with_capacity(cfg.dns.listen.len());
    for &addr in &cfg.dns.listen {
        dns_listeners.push(dns::bind(addr).await.map_err(|source| AppError::Bind { addr, source })?);
    }
    let bound: Vec<SocketAddr> = dns_listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    if let Some((upstream, listener)) = config::forwarding_loop(resolver.upstreams().addrs(), &bound) {
        return Err(AppError::ForwardingLoop { upstream, listener });
    }
    let dns_addrs: Vec<String> = bound.iter().map(|a| a.to_string()).collect();
    let firewall = Arc::new(Firewall {
        state: state.clone(),
        resolver: resolver.clone(),
        detector: Arc::new(Detector::new(&cfg.dns.tunneling)),
    });
    let proxy = Proxy::new(state.clone(), resolver.clone());
    let proxy_addrs = addr_list(&proxy_listeners);
    let pac_proxy =
        cfg.admin.pac_proxy.clone().unwrap_or_else(|| proxy_addrs.split(',').next().unwrap_or_default().to_string());

    let mut listeners = Vec::new();
    admin.set_loaded(state.clone(), pac_proxy);
    let transparent_addrs = format!("{},{}", addr_list(&transparent_tls), addr_list(&transparent_http));
    for l in proxy_listeners {
        listeners.push(tokio::spawn(proxy::serve(proxy.clone(), l)));
    }
    for l in transparent_tls {
        listeners.push(tokio::spawn(proxy::transparent::serve_tls(proxy.clone(), l)));
    }
    for l in transparent_http {
        listeners.push(tokio::spawn(proxy::transparent::serve_http(proxy.clone(), l)));
    }
    for l in dns_listeners {
        listeners.push(tokio::spawn(dns::serve_udp(firewall.clone(), l.udp)));
        listeners.push(tokio::spawn(dns::serve_tcp(firewall.clone(), l.tcp)));
    }
    let reloader = Arc::new(Reloader {
        path: path.to_path_buf(),
        state: state.clone(),
        resolver: resolver.clone(),
        proxy: proxy.clone(),
    });
    background.push(tokio::spawn(reload::run(reloader)));
    readiness.set_ready();
    let snap = state.snapshot();
    tracing::info!(
        event = "start",
        generation = snap.generation,
        config = %path.display(),
        proxy_listen = %proxy_addrs,
        dns_listen = %dns_addrs.join(","),
        transparent_listen = %transparent_addrs.trim_matches(','),
        admin_listen = admin_addr.as_deref().unwrap_or(""),
        rules = snap.policy.rules().len(),
        names = snap.policy.names().len(),
        "egressd started"
    );
    drop(snap);

    let signal = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    };
    let grace = state.snapshot().config.admin.shutdown_grace;
    tracing::info!(
        event = "draining",
        signal,
        grace_s = grace.as_secs_f64(),
        active = proxy.active_connections(),
        "Draining"
    );
    readiness.set_draining();
    for t in &listeners {
        t.abort();
    }
    proxy.drain();
    let deadline = tokio::time::Instant::now() + grace;
    while proxy.active_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = proxy.active_connections();
    if left > 0 {
        proxy.tunnels.close_all();
    }
    for t in &background {
        t.abort();
    }
    tracing::info!(event = "shutdown", signal, closed_at_deadline = left, "egressd stopped");
    Ok(())
}
