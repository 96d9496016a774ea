//! Byte relay between a client and an upstream, for CONNECT tunnels and upgraded HTTP
//! connections: counts bytes both ways, enforces the client→server cap, closes idle tunnels.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::Notify;

use super::budget::Budgets;
use crate::policy::Reason;
use std::net::IpAddr;

/// Why a relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed normally.
    Closed,
    /// The client sent more than the cap allows; nothing past the cap was forwarded.
    UploadLimit,
    /// Neither side sent anything for the idle timeout.
    Idle,
    /// A read or write failed (reset, broken pipe).
    Error,
    /// A reload's policy denies the destination (`revoke_on_reload`), or the process is stopping.
    Revoked,
    /// The client's upload budget (`[limits]`) ran out; nothing past it was forwarded.
    UploadBudget,
}

impl RelayEnd {
    /// The reason a relay that ended this way turns its decision into a deny, if it does.
    pub fn denial(self) -> Option<Reason> {
        match self {
            RelayEnd::UploadLimit => Some(Reason::UploadLimit),
            RelayEnd::UploadBudget => Some(Reason::UploadBudget),
            RelayEnd::Revoked => Some(Reason::Revoked),
            RelayEnd::Closed | RelayEnd::Idle | RelayEnd::Error => None,
        }
    }
}

/// Limits on client→server bytes: the rule's per-tunnel cap and the client's budget.
#[derive(Clone, Copy, Default)]
pub struct UploadLimits<'a> {
    pub cap: Option<u64>,
    pub budget: Option<(&'a Budgets, IpAddr)>,
}

impl UploadLimits<'_> {
    /// Admits `n` more client bytes after `sent`: checks the cap, then charges the budget.
    fn charge(&self, sent: u64, n: u64) -> Result<(), RelayEnd> {
        if self.cap.is_some_and(|cap| sent + n > cap) {
            return Err(RelayEnd::UploadLimit);
        }
        match self.budget {
            Some((budgets, client)) if !budgets.try_spend(client, n, Instant::now()) => Err(RelayEnd::UploadBudget),
            _ => Ok(()),
        }
    }
}

/// Forwards client bytes read before the relay starts (a buffered ClientHello, bytes hyper read
/// past a request head) under the same limits the relay applies; pass their length to
/// [`relay`] as `already_up`. `Err` names why they were not forwarded.
pub async fn forward_early(upstream: &mut TcpStream, bytes: &[u8], limits: UploadLimits<'_>) -> Result<(), Reason> {
    limits.charge(0, bytes.len() as u64).map_err(|end| end.denial().unwrap_or(Reason::Upstream))?;
    upstream.write_all(bytes).await.map_err(|_| Reason::Upstream)
}

/// Byte counts and how the relay ended.
#[derive(Clone, Copy, Debug)]
pub struct RelayOutcome {
    pub up: u64,
    pub down: u64,
    pub end: RelayEnd,
}

/// Read buffer of a busy direction. An idle direction holds none (see [`pump`]).
const BUF: usize = 32 * 1024;

struct Shared {
    start: Instant,
    /// Milliseconds since `start` of the last byte in either direction.
    last: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl Shared {
    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Copies one direction. `limits.cap` bounds the total including bytes sent before the relay
/// started; `limits.budget` is charged for every chunk before it is forwarded.
///
/// The read buffer exists only while bytes are flowing: the pump waits for readiness holding
/// none, and gives it back as soon as the socket is drained, so ten thousand idle tunnels cost
/// no relay buffers at all.
async fn pump(
    from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    counter: &AtomicU64,
    limits: UploadLimits<'_>,
    shared: &Shared,
    idle: Duration,
) -> RelayEnd {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if buf.capacity() == 0 {
            match tokio::time::timeout(idle, from.readable()).await {
                Err(_) if shared.idle_for() >= idle => return RelayEnd::Idle,
                Err(_) => continue,
                Ok(Err(_)) => return RelayEnd::Error,
                Ok(Ok(())) => buf.reserve_exact(BUF),
            }
        }
        buf.clear();
        let n = match from.try_read_buf(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown().await;
                return RelayEnd::Closed;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                buf = Vec::new();
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return RelayEnd::Error,
        };
        if let Err(end) = limits.charge(counter.load(Ordering::Relaxed), n as u64) {
            return end;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return RelayEnd::Error;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        shared.touch();
    }
}

/// Relays between two sockets until both directions close, the cap is hit, the tunnel idles
/// out, an error, or `cancel` is notified. `already_up` counts client bytes forwarded before the
/// relay (a replayed ClientHello).
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    already_up: u64,
    limits: UploadLimits<'_>,
    idle: Duration,
    cancel: &Notify,
) -> RelayOutcome {
    let shared = Shared {
        start: Instant::now(),
        last: AtomicU64::new(0),
        up: AtomicU64::new(already_up),
        down: AtomicU64::new(0),
    };
    let (cr, cw) = client.split();
    let (ur, uw) = upstream.split();
    let up = pump(cr, uw, &shared.up, limits, &shared, idle);
    let down = pump(ur, cw, &shared.down, UploadLimits::default(), &shared, idle);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let mut end = RelayEnd::Closed;
    while !(up_done && down_done) {
        let finished = tokio::select! {
            e = &mut up, if !up_done => { up_done = true; e }
            e = &mut down, if !down_done => { down_done = true; e }
            _ = cancel.notified() => RelayEnd::Revoked,
        };
        if finished != RelayEnd::Closed {
            end = finished;
            break;
        }
    }
    RelayOutcome { up: shared.up.load(Ordering::Relaxed), down: shared.down.load(Ordering::Relaxed), end }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A connected loopback pair: (the end egressd holds, the peer's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        (ours, peer)
    }

    #[tokio::test]
    async fn relays_both_ways_and_counts() {
        let (mut client, mut client_peer) = pair().await;
        let (mut upstream, mut upstream_peer) = pair().await;
        let task = tokio::spawn(async move {
            relay(&mut client, &mut upstream, 0, UploadLimits::default(), Duration::from_secs(5), &Notify::new()).await
        });
        client_peer.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        upstream_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        upstream_peer.write_all(b"world!").await.unwrap();
        let mut buf = [0u8; 6];
        client_peer.read_exact(&mut buf).await.unwrap();
        drop(client_peer);
        drop(upstream_peer);
        let out = task.await.unwrap();
        assert_eq!((out.up, out.down), (5, 6));
    }

    #[tokio::test]
    async fn cap_stops_before_forwarding_excess() {
        let (mut client, mut client_peer) = pair().await;
        let (mut upstream, mut upstream_peer) = pair().await;
        let task = tokio::spawn(async move {
            relay(
                &mut client,
                &mut upstream,
                10,
                UploadLimits { cap: Some(100), budget: None },
                Duration::from_secs(5),
                &Notify::new(),
            )
            .await
        });
        client_peer.write_all(&[1u8; 50]).await.unwrap();
        let mut got = vec![0u8; 50];
        upstream_peer.read_exact(&mut got).await.unwrap();
        client_peer.write_all(&[2u8; 60]).await.unwrap();
        let out = task.await.unwrap();
        assert_eq!(out.end, RelayEnd::UploadLimit);
        assert_eq!(out.up, 60, "10 replayed + 50 relayed; the crossing chunk was not forwarded");
        let mut rest = Vec::new();
        drop(client_peer);
        let _ = upstream_peer.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn budget_cuts_off_the_client() {
        let (mut client, mut client_peer) = pair().await;
        let (mut upstream, mut upstream_peer) = pair().await;
        let budgets = Budgets::new(Some(100), Duration::from_secs(60));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let task = tokio::spawn(async move {
            let limits = UploadLimits { cap: None, budget: Some((&budgets, ip)) };
            relay(&mut client, &mut upstream, 0, limits, Duration::from_secs(5), &Notify::new()).await
        });
        client_peer.write_all(&[1u8; 80]).await.unwrap();
        let mut got = vec![0u8; 80];
        upstream_peer.read_exact(&mut got).await.unwrap();
        client_peer.write_all(&[2u8; 40]).await.unwrap();
        let out = task.await.unwrap();
        assert_eq!((out.end, out.up), (RelayEnd::UploadBudget, 80));
    }

    #[tokio::test]
    async fn idle_tunnel_closes() {
        let (mut client, _client_peer) = pair().await;
        let (mut upstream, _upstream_peer) = pair().await;
        let out =
            relay(&mut client, &mut upstream, 0, UploadLimits::default(), Duration::from_millis(200), &Notify::new())
                .await;
        assert_eq!(out.end, RelayEnd::Idle);
    }

    #[tokio::test]
    async fn cancel_ends_the_relay() {
        let (mut client, _client_peer) = pair().await;
        let (mut upstream, _upstream_peer) = pair().await;
        let cancel = Notify::new();
        cancel.notify_one();
        let out = relay(&mut client, &mut upstream, 0, UploadLimits::default(), Duration::from_secs(5), &cancel).await;
        assert_eq!(out.end, RelayEnd::Revoked);
    }
}
