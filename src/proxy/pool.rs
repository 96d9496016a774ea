//! A bounded pool of idle upstream HTTP/1.1 connections, keyed by destination. A pooled
//! connection goes to an address that was checked when it was opened; the policy still decides
//! every request that reuses it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;

use super::ProxyBody;

/// Idle connections kept per destination: as many as the concurrent clients of one busy origin
/// need, so keep-alive clients do not churn upstream connections (8 made 29% of requests open
/// a new one with 32 clients; see BENCHMARKS.md).
const MAX_IDLE_PER_KEY: usize = 64;
/// Idle connections kept in all.
const MAX_IDLE_TOTAL: usize = 512;

/// A destination: normalised host and port.
pub type PoolKey = (String, u16);

struct Idle {
    sender: SendRequest<ProxyBody>,
    ip: IpAddr,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    idle: HashMap<PoolKey, Vec<Idle>>,
    total: usize,
}

/// The pool; cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Mutex<Inner>>,
    max_idle: Duration,
}

impl Pool {
    pub fn new(max_idle: Duration) -> Self {
        Self { inner: Arc::default(), max_idle }
    }

    /// An idle, ready connection for `key`, if any.
    pub fn checkout(&self, key: &PoolKey) -> Option<(SendRequest<ProxyBody>, IpAddr)> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let list = inner.idle.get_mut(key)?;
        let mut found = None;
        let mut taken = 0;
        while let Some(idle) = list.pop() {
            taken += 1;
            if idle.since.elapsed() < self.max_idle && idle.sender.is_ready() && !idle.sender.is_closed() {
                found = Some((idle.sender, idle.ip));
                break;
            }
        }
        if list.is_empty() {
            inner.idle.remove(key);
        }
        inner.total = inner.total.saturating_sub(taken);
        found
    }

    /// Returns a connection once it is ready for another request (its response fully read).
    pub fn checkin(&self, key: PoolKey, mut sender: SendRequest<ProxyBody>, ip: IpAddr) {
        if sender.is_ready() {
            self.put(key, sender, ip);
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            let ready = tokio::time::timeout(Duration::from_secs(5), sender.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                pool.put(key, sender, ip);
            }
        });
    }

    fn put(&self, key: PoolKey, sender: SendRequest<ProxyBody>, ip: IpAddr) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.total >= MAX_IDLE_TOTAL {
            return;
        }
        let list = inner.idle.entry(key).or_default();
        if list.len() >= MAX_IDLE_PER_KEY {
            return;
        }
        list.push(Idle { sender, ip, since: Instant::now() });
        inner.total += 1;
    }

    /// Drops every idle connection (on reload, so revoked destinations lose pooled sockets).
    pub fn clear(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.idle.clear();
        inner.total = 0;
    }
}
