//! Per-client upload budgets: bytes a client sends upstream, counted across all of its plain
//! requests, tunnels and transparent flows over a sliding window (`[limits]
//! client_upload_budget` per `client_upload_window`).
//!
//! The window is kept as 60 buckets per client, so it slides in steps of 1/60 of the window.
//! Memory is bounded: at most [`MAX_CLIENTS`] clients are tracked; past that the client seen
//! least recently is forgotten (its budget starts afresh — the trade-off is stated in the
//! docs; a client would need tens of thousands of source addresses to profit from it).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets per window.
const BUCKETS: usize = 60;
/// Clients tracked at most.
pub const MAX_CLIENTS: usize = 65_536;

struct Window {
    /// Bytes per bucket; `stamps[i]` is the bucket index (since `epoch`) that `bytes[i]` counts.
    bytes: [u64; BUCKETS],
    stamps: [u64; BUCKETS],
    last_seen: u64,
}

impl Window {
    fn new() -> Self {
        Self { bytes: [0; BUCKETS], stamps: [u64::MAX; BUCKETS], last_seen: 0 }
    }

    fn total(&self, now_bucket: u64) -> u64 {
        let oldest = now_bucket.saturating_sub(BUCKETS as u64 - 1);
        self.bytes.iter().zip(&self.stamps).filter(|(_, s)| **s != u64::MAX && **s >= oldest).map(|(b, _)| *b).sum()
    }

    fn add(&mut self, now_bucket: u64, n: u64) {
        let i = (now_bucket % BUCKETS as u64) as usize;
        if self.stamps[i] != now_bucket {
            self.stamps[i] = now_bucket;
            self.bytes[i] = 0;
        }
        self.bytes[i] = self.bytes[i].saturating_add(n);
        self.last_seen = now_bucket;
    }
}

/// The budgets of every client; shared by every flow.
pub struct Budgets {
    limit: Option<u64>,
    bucket: Duration,
    epoch: Instant,
    clients: Mutex<HashMap<IpAddr, Window>>,
}

impl Budgets {
    /// `limit` bytes per `window`; `None` disables budgets.
    pub fn new(limit: Option<u64>, window: Duration) -> Self {
        let bucket = (window / BUCKETS as u32).max(Duration::from_millis(10));
        Self { limit, bucket, epoch: Instant::now(), clients: Mutex::new(HashMap::new()) }
    }

    pub fn enabled(&self) -> bool {
        self.limit.is_some()
    }

    fn bucket_of(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_nanos() / self.bucket.as_nanos().max(1)) as u64
    }

    /// Bytes `client` may still send now (`None`: unlimited).
    pub fn remaining(&self, client: IpAddr, now: Instant) -> Option<u64> {
        let limit = self.limit?;
        let b = self.bucket_of(now);
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let used = clients.get(&client).map_or(0, |w| w.total(b));
        Some(limit.saturating_sub(used))
    }

    /// True once `client` has used its whole budget.
    pub fn exhausted(&self, client: IpAddr, now: Instant) -> bool {
        self.remaining(client, now) == Some(0)
    }

    /// Records `n` bytes if they fit in what is left. If they would exceed the budget, returns
    /// false and counts the client's window as full: a client that tried to go over is over
    /// budget (its new uploads are refused) until bytes slide out of the window, rather than
    /// keeping a remainder smaller than the chunk that was refused.
    pub fn try_spend(&self, client: IpAddr, n: u64, now: Instant) -> bool {
        let Some(limit) = self.limit else { return true };
        let b = self.bucket_of(now);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if !clients.contains_key(&client) && clients.len() >= MAX_CLIENTS {
            if let Some(oldest) = clients.iter().min_by_key(|(_, w)| w.last_seen).map(|(ip, _)| *ip) {
                clients.remove(&oldest);
            }
        }
        let w = clients.entry(client).or_insert_with(Window::new);
        let used = w.total(b);
        if used.saturating_add(n) > limit {
            w.add(b, limit.saturating_sub(used));
            return false;
        }
        w.add(b, n);
        true
    }

    pub fn tracked(&self) -> usize {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn spends_until_the_budget_then_refuses_per_client() {
        let b = Budgets::new(Some(1000), Duration::from_secs(3600));
        let t = Instant::now();
        assert!(b.try_spend(A, 600, t));
        assert!(b.try_spend(A, 300, t));
        assert_eq!(b.remaining(A, t), Some(100));
        assert!(!b.try_spend(A, 500, t), "would exceed");
        assert!(b.exhausted(A, t), "a refused spend leaves the client over budget");
        assert!(!b.try_spend(A, 1, t));
        assert_eq!(b.remaining(B, t), Some(1000), "another client is unaffected");
        assert!(b.try_spend(B, 1000, t));
    }

    #[test]
    fn window_slides() {
        let b = Budgets::new(Some(1000), Duration::from_secs(60));
        let t = Instant::now();
        assert!(b.try_spend(A, 1000, t));
        assert!(!b.try_spend(A, 1, t + Duration::from_secs(30)));
        assert!(b.exhausted(A, t + Duration::from_secs(30)));
        assert!(b.try_spend(A, 1000, t + Duration::from_secs(61)), "the old bytes left the window");
    }

    #[test]
    fn disabled_budget_is_unlimited() {
        let b = Budgets::new(None, Duration::from_secs(60));
        assert!(b.try_spend(A, u64::MAX, Instant::now()));
        assert_eq!(b.remaining(A, Instant::now()), None);
        assert_eq!(b.tracked(), 0);
    }

    #[test]
    fn memory_is_bounded() {
        let b = Budgets::new(Some(10), Duration::from_secs(60));
        let t = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 + 100) {
            b.try_spend(IpAddr::V4(std::net::Ipv4Addr::from(i)), 1, t);
        }
        assert!(b.tracked() <= MAX_CLIENTS);
    }
}
