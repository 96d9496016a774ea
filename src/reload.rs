//! Hot reload: the main config, every rule file and every hosts file are watched (and SIGHUP
//! reloads too). A reload builds and validates the whole new policy off the request path, then
//! swaps it in atomically; on any error the running policy stays and the error is logged with
//! its `path:line:column`. With `revoke_on_reload`, open tunnels the new policy denies are
//! closed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, Config, Loaded};
use crate::proxy::Proxy;
use crate::resolve::Resolver;
use crate::state::State;

/// Events closer together than this are one change (editors and sync jobs write in bursts).
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Everything a reload touches.
pub struct Reloader {
    pub path: PathBuf,
    pub state: Arc<State>,
    pub resolver: Arc<Resolver>,
    pub proxy: Arc<Proxy>,
}

/// How a reload ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Swapped in as this generation.
    Applied(u64),
    /// Every file is byte-for-byte what is running: nothing to do.
    Unchanged,
    /// Refused; the running policy stays.
    Failed,
}

/// Settings that only take effect on restart.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.proxy.listen != new.proxy.listen
        || old.proxy.transparent_http != new.proxy.transparent_http
        || old.proxy.transparent_tls != new.proxy.transparent_tls
    {
        out.push("proxy listeners");
    }
    if old.proxy.max_connections != new.proxy.max_connections {
        out.push("proxy.max_connections");
    }
    if old.dns.listen != new.dns.listen {
        out.push("dns.listen");
    }
    if old.dns.upstreams != new.dns.upstreams || old.dns.upstream_timeout != new.dns.upstream_timeout {
        out.push("dns.upstreams");
    }
    if old.dns.cache_entries != new.dns.cache_entries || old.dns.tunneling != new.dns.tunneling {
        out.push("dns cache and tunneling settings");
    }
    if old.admin.listen != new.admin.listen {
        out.push("admin.listen");
    }
    if old.limits != new.limits {
        out.push("[limits] upload budgets");
    }
    out
}

fn fingerprint(sources: &[config::SourceFile]) -> Vec<(PathBuf, String)> {
    sources.iter().map(|s| (s.path.clone(), s.sha256.clone())).collect()
}

impl Reloader {
    /// Loads the config again and swaps it in if it is valid and differs from what runs.
    pub fn reload(&self, trigger: &str) -> Outcome {
        let loaded: Loaded = match config::load(&self.path) {
            Ok(l) => l,
            Err(e) => {
                crate::telemetry::record_reload_failure();
                let generation = self.state.snapshot().generation;
                for d in &e.0 {
                    tracing::error!(event = "reload", result = "failure", trigger, error = %d, "Reload failed; keeping generation {generation}");
                }
                return Outcome::Failed;
            }
        };
        let current = self.state.snapshot();
        if fingerprint(&current.sources) == fingerprint(&loaded.sources) {
            tracing::debug!(trigger, "Reload: no file changed");
            return Outcome::Unchanged;
        }
        for what in restart_only_changes(&current.config, &loaded.config) {
            tracing::warn!(event = "reload", setting = what, "Changed setting takes effect only after a restart");
        }
        drop(current);
        self.resolver.set_hosts(loaded.config.hosts.clone());
        let generation = self.state.replace(loaded);
        let snap = self.state.snapshot();
        self.proxy.pool.clear();
        let revoked =
            if snap.config.policy.revoke_on_reload { self.proxy.tunnels.revoke_denied(&snap.policy) } else { 0 };
        tracing::info!(
            event = "reload",
            result = "success",
            trigger,
            generation,
            rules = snap.policy.rules().len(),
            names = snap.policy.names().len(),
            revoked,
            "Policy reloaded"
        );
        Outcome::Applied(generation)
    }

    /// Directories to watch: those holding each source file and each `policy.files` glob's
    /// directory (so new rule files are noticed). Directories, not files, because sync jobs
    /// and editors replace files by rename.
    fn watch_dirs(&self) -> BTreeSet<PathBuf> {
        let snap = self.state.snapshot();
        let mut dirs = BTreeSet::new();
        let base = self.path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        dirs.insert(base.clone());
        for s in &snap.sources {
            if let Some(p) = s.path.parent() {
                dirs.insert(p.to_path_buf());
            }
        }
        for pattern in &snap.config.policy.files {
            let full = base.join(pattern);
            let dir: PathBuf =
                full.components().take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '['])).collect();
            let dir = if dir == full { dir.parent().map(Path::to_path_buf).unwrap_or(dir) } else { dir };
            dirs.insert(dir);
        }
        dirs.into_iter().map(|d| if d.as_os_str().is_empty() { PathBuf::from(".") } else { d }).collect()
    }
}

/// Watches the files and SIGHUP, reloading on each (debounced) change, until the task ends.
pub async fn run(reloader: Arc<Reloader>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let fs_tx = tx.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
        Ok(event) if matters(&event.kind) => {
            let _ = fs_tx.send(());
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "File watcher error"),
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(error = %e, "Cannot watch config files; reload with SIGHUP");
            None
        }
    };
    let mut watched = BTreeSet::new();
    let rewatch = |watcher: &mut Option<notify::RecommendedWatcher>, watched: &mut BTreeSet<PathBuf>| {
        let Some(w) = watcher.as_mut() else { return };
        for dir in reloader.watch_dirs() {
            if watched.contains(&dir) {
                continue;
            }
            match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir);
                }
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "Cannot watch directory"),
            }
        }
    };
    rewatch(&mut watcher, &mut watched);
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "Cannot handle SIGHUP");
            None
        }
    };
    loop {
        let trigger = tokio::select! {
            Some(()) = rx.recv() => "file",
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "sighup",
        };
        if trigger == "file" {
            // Let the burst finish: wait until no event for DEBOUNCE.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
        }
        let r = reloader.clone();
        let outcome = tokio::task::spawn_blocking(move || r.reload(trigger)).await;
        if matches!(outcome, Ok(Outcome::Applied(_))) {
            rewatch(&mut watcher, &mut watched);
        }
    }
}

/// File events that can change what a reload reads (not reads or metadata-only changes).
fn matters(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any => true,
        EventKind::Modify(m) => !matches!(m, notify::event::ModifyKind::Metadata(_)),
        EventKind::Access(a) => matches!(a, notify::event::AccessKind::Close(notify::event::AccessMode::Write)),
        EventKind::Other => false,
    }
}
