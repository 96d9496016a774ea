//! The DNS firewall's listeners: UDP and TCP on each `dns.listen` address (the same port for
//! both), feeding every query to [`handler::Firewall`].
//!
//! UDP queries run concurrently up to a bound (excess packets are dropped, as a loaded
//! resolver would). TCP follows RFC 7766: length-prefixed messages, several per connection,
//! an idle timeout, and a connection cap that idle clients cannot exhaust — when full, the
//! connection idle the longest is closed to admit the new one.

pub mod handler;
pub mod tunneling;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, Semaphore};

use handler::{Firewall, Transport};

/// UDP queries handled at once; beyond this, packets are dropped.
const MAX_UDP_IN_FLIGHT: usize = 4096;
/// TCP connections held at once.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP connection with no complete query for this long is closed (RFC 7766 suggests seconds).
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// A bound listener pair: UDP and TCP on the same address and port.
pub struct Listener {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
}

impl Listener {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

/// Binds UDP then TCP on the same port; with port 0 the ephemeral UDP port is reused for TCP,
/// retrying a few times if another process holds it.
pub async fn bind(addr: SocketAddr) -> io::Result<Listener> {
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(addr).await?;
        let bound = udp.local_addr()?;
        match crate::net::listen(bound) {
            Ok(tcp) => return Ok(Listener { udp, tcp }),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("could not bind UDP and TCP on one port")))
}

/// Receive loops per UDP socket, at most: answering scales with the cores, but every loop is
/// woken for each packet (one wins it), so more loops cost more than they give.
const MAX_UDP_LOOPS: usize = 4;

/// Serves UDP queries on `sock` forever, with one receive loop per worker thread (up to
/// [`MAX_UDP_LOOPS`]) so that answering scales with the cores.
pub async fn serve_udp(fw: Arc<Firewall>, sock: UdpSocket) {
    let sock = Arc::new(sock);
    let slots = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
    let loops = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_UDP_LOOPS);
    let mut others = tokio::task::JoinSet::new();
    for _ in 1..loops {
        others.spawn(receive_loop(fw.clone(), sock.clone(), slots.clone()));
    }
    receive_loop(fw, sock, slots).await;
}

/// Receives queries and answers them. Most queries are answered without waiting for anything
/// (refused by the policy, `[hosts]`, cache hits): those are answered right here, which spares
/// each of them a task; a query that has to wait (for an upstream) continues as its own task.
async fn receive_loop(fw: Arc<Firewall>, sock: Arc<UdpSocket>, slots: Arc<Semaphore>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let packet = buf[..n].to_vec();
        let (fw, sock) = (fw.clone(), sock.clone());
        let mut answer = Box::pin(async move {
            if let Some(reply) = fw.handle(&packet, peer.ip().to_canonical(), Transport::Udp).await {
                let _ = sock.send_to(&reply, peer).await;
            }
            drop(permit);
        });
        let finished = std::future::poll_fn(|cx| std::task::Poll::Ready(answer.as_mut().poll(cx).is_ready())).await;
        if !finished {
            tokio::spawn(answer);
        }
    }
}

/// An open TCP connection: its last activity (ms since the listener's epoch) and its stop signal.
type TcpEntry = (Arc<AtomicU64>, Arc<Notify>);

/// Open TCP connections with their last activity, so the longest-idle can be evicted.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, TcpEntry>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, TcpEntry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves TCP connections on `listener` forever.
pub async fn serve_tcp(fw: Arc<Firewall>, listener: TcpListener) {
    let registry = Arc::new(Registry::default());
    let epoch = Instant::now();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "DNS TCP accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = registry.next.fetch_add(1, Ordering::Relaxed);
        let last = Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64));
        let stop = Arc::new(Notify::new());
        {
            let mut conns = registry.lock();
            if conns.len() >= MAX_TCP_CONNECTIONS {
                if let Some((&victim, _)) = conns.iter().min_by_key(|(_, (l, _))| l.load(Ordering::Relaxed)) {
                    if let Some((_, notify)) = conns.remove(&victim) {
                        notify.notify_one();
                    }
                }
            }
            conns.insert(id, (last.clone(), stop.clone()));
        }
        let (fw, registry) = (fw.clone(), registry.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tcp_conn(&fw, stream, peer, &last, epoch) => {}
                _ = stop.notified() => {}
            }
            registry.lock().remove(&id);
        });
    }
}

async fn tcp_conn(fw: &Firewall, mut stream: TcpStream, peer: SocketAddr, last: &AtomicU64, epoch: Instant) {
    let _ = stream.set_nodelay(true);
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let n = usize::from(u16::from_be_bytes(len));
        let mut msg = vec![0u8; n];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let Some(reply) = fw.handle(&msg, peer.ip().to_canonical(), Transport::Tcp).await else { continue };
        let Ok(rlen) = u16::try_from(reply.len()) else { return };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&rlen.to_be_bytes());
        out.extend_from_slice(&reply);
        if stream.write_all(&out).await.is_err() {
            return;
        }
        last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
