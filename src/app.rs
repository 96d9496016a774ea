//! `egressd run`: loads the config, binds every listener, logs the start line, serves until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{self, ConfigError};
use crate::proxy::{self, Proxy};
use crate::resolve::{Resolver, upstream::Upstreams};
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
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
}

async fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, AppError> {
    let mut out = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let l = TcpListener::bind(addr).await.map_err(|source| AppError::Bind { addr, source })?;
        out.push(l);
    }
    Ok(out)
}

fn addr_list(listeners: &[TcpListener]) -> String {
    listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.to_string()).collect::<Vec<_>>().join(",")
}

/// Runs egressd with the config at `path` until a shutdown signal.
pub async fn run(path: &Path) -> Result<(), AppError> {
    let loaded = config::load(path)?;
    let cfg = loaded.config.clone();
    let upstreams =
        Upstreams::new(&cfg.dns.upstreams, cfg.dns.upstream_timeout).map_err(|e| AppError::Upstreams(e.to_string()))?;
    let resolver = Arc::new(Resolver::new(cfg.hosts.clone(), upstreams));
    let state = Arc::new(State::new(loaded));
    let proxy_listeners = bind_all(&cfg.proxy.listen).await?;
    let proxy = Proxy::new(state.clone(), resolver.clone());
    let snap = state.snapshot();
    tracing::info!(
        event = "start",
        generation = snap.generation,
        config = %path.display(),
        proxy_listen = %addr_list(&proxy_listeners),
        rules = snap.policy.rules().len(),
        names = snap.policy.names().len(),
        "egressd started"
    );
    drop(snap);
    let mut tasks = Vec::new();
    for l in proxy_listeners {
        tasks.push(tokio::spawn(proxy::serve(proxy.clone(), l)));
    }
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(AppError::Signal)?;
    let signal = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    };
    for t in &tasks {
        t.abort();
    }
    tracing::info!(event = "shutdown", signal, "egressd stopping");
    Ok(())
}
