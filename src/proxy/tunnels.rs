//! The registry of open tunnels (CONNECT and upgraded connections), so a reload can close the
//! ones its new policy denies (`revoke_on_reload`) and shutdown can close what is left.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::policy::name::Host;
use crate::policy::{Facts, Policy, Surface};

struct Entry {
    host: Host,
    port: u16,
    client: IpAddr,
    cancel: Arc<Notify>,
}

/// Open tunnels by id.
#[derive(Default)]
pub struct Tunnels {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

/// Keeps a tunnel registered while alive; its `cancel` is notified to end the relay.
pub struct Registration {
    tunnels: Arc<Tunnels>,
    id: u64,
    pub cancel: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tunnels.lock().remove(&self.id);
    }
}

impl Tunnels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(self: &Arc<Self>, host: Host, port: u16, client: IpAddr) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(Notify::new());
        self.lock().insert(id, Entry { host, port, client, cancel: cancel.clone() });
        Registration { tunnels: self.clone(), id, cancel }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every tunnel `policy` no longer allows; returns how many.
    pub fn revoke_denied(&self, policy: &Policy) -> usize {
        let open = self.lock();
        let mut n = 0;
        for e in open.values() {
            let facts = Facts {
                host: &e.host,
                port: Some(e.port),
                client: Some(e.client),
                method: None,
                body_len: None,
                surface: Surface::Proxy,
            };
            if !policy.decide(&facts).action.permits() {
                e.cancel.notify_one();
                n += 1;
            }
        }
        n
    }

    /// Closes every tunnel (end of the shutdown grace period).
    pub fn close_all(&self) {
        for e in self.lock().values() {
            e.cancel.notify_one();
        }
    }
}
