//! The explicit forward proxy: accept loop, per-connection hyper HTTP/1.1 server, and the
//! dispatch of each request to plain-HTTP forwarding or a CONNECT tunnel.
//!
//! Every request is decided against the policy snapshot current when it arrived; every error
//! path ends in a denial or a closed connection.

pub mod budget;
mod connect;
pub mod dial;
mod http;
pub mod pool;
pub mod relay;
pub mod respond;
pub mod sni;
pub mod transparent;
pub mod tunnels;

/// The request-head handling the proxy does itself, for the fuzzers (`crate::fuzzing`).
#[doc(hidden)]
pub use http::strip_hop_by_hop;
pub(crate) use http::{head_size, host_header, target as absolute_target, transparent_target};

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::resolve::Resolver;
use crate::state::State;
use crate::telemetry::next_id;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of every request and response the proxy handles.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// What every proxy connection shares.
pub struct Proxy {
    pub state: Arc<State>,
    pub resolver: Arc<Resolver>,
    pub pool: pool::Pool,
    pub tunnels: Arc<tunnels::Tunnels>,
    /// Per-client upload budgets (`[limits]`), across every flow of a client.
    pub budgets: budget::Budgets,
    limit: Arc<Semaphore>,
    max_connections: usize,
    /// Flips to true when the process starts draining: idle keep-alive connections close.
    draining: watch::Sender<bool>,
}

impl Proxy {
    pub fn new(state: Arc<State>, resolver: Arc<Resolver>) -> Arc<Self> {
        let snap = state.snapshot();
        let cfg = &snap.config.proxy;
        let pool = pool::Pool::new(cfg.idle_timeout.min(Duration::from_secs(90)));
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        let (draining, _) = watch::channel(false);
        Arc::new(Self {
            state,
            resolver,
            pool,
            tunnels: Arc::default(),
            budgets: budget::Budgets::new(
                snap.config.limits.client_upload_budget,
                snap.config.limits.client_upload_window,
            ),
            limit,
            max_connections: cfg.max_connections,
            draining,
        })
    }

    /// Client connections open now (including tunnels).
    pub fn active_connections(&self) -> usize {
        self.max_connections.saturating_sub(self.limit.available_permits())
    }

    /// Starts draining: idle keep-alive connections are closed, in-flight requests and tunnels
    /// go on.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }
}

/// One client connection: its address, its upload total, its last activity, and its
/// connection-limit permit.
pub(crate) struct Conn {
    pub client: IpAddr,
    pub uploaded: AtomicU64,
    /// When a byte last moved on the client socket (for `idle_timeout`).
    pub activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
}

/// Accepts on `listener` until the task is dropped, handing each connection to `serve`.
/// Past `max_connections` the loop stops accepting (connections wait in the kernel backlog)
/// and resumes as others close; accept errors such as EMFILE are logged and retried after a
/// pause, never fatal.
pub(crate) async fn accept_loop<F, Fut>(proxy: Arc<Proxy>, listener: TcpListener, serve: F)
where
    F: Fn(Arc<Proxy>, TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let Ok(permit) = proxy.limit.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // An IPv4 client of a dual-stack `[::]` listener is `::ffff:a.b.c.d`: use its IPv4 form,
        // so client-scoped rules, budgets and the audit log see the same address either way.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        tokio::spawn(serve(proxy.clone(), stream, peer, permit));
    }
}

/// Serves the explicit proxy on `listener`.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    accept_loop(proxy, listener, |proxy, stream, peer, permit| {
        serve_conn(proxy, stream, peer, permit, ConnMode::Explicit)
    })
    .await;
}

/// What kind of listener a client connection arrived on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ConnMode {
    Explicit,
    TransparentHttp { orig: SocketAddr },
}

pub(crate) async fn serve_conn(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    mode: ConnMode,
) {
    let snap = proxy.state.snapshot();
    let cfg = snap.config.proxy.clone();
    drop(snap);
    let _active = matches!(mode, ConnMode::Explicit)
        .then(|| crate::telemetry::metrics().track_connection(crate::telemetry::Kind::Http));
    let activity = Arc::new(Activity::new());
    let conn =
        Arc::new(Conn { client: peer.ip(), uploaded: AtomicU64::new(0), activity: activity.clone(), _permit: permit });
    let io = TokioIo::new(Tracked { inner: stream, activity: activity.clone() });
    let svc_proxy = proxy.clone();
    let svc = service_fn(move |req| {
        let (proxy, conn) = (svc_proxy.clone(), conn.clone());
        async move {
            let id = next_id();
            let snap = proxy.state.snapshot();
            let resp = match (mode, req.method() == ::http::Method::CONNECT) {
                (ConnMode::Explicit, true) => connect::handle(proxy, conn, snap, id, req).await,
                (ConnMode::Explicit, false) => http::handle(proxy, conn, snap, id, req, http::Mode::Explicit).await,
                (ConnMode::TransparentHttp { .. }, true) => {
                    respond::deny(::http::StatusCode::BAD_REQUEST, "default", crate::policy::Reason::Malformed, &id)
                }
                (ConnMode::TransparentHttp { orig }, false) => {
                    http::handle(proxy, conn, snap, id, req, http::Mode::Transparent { orig }).await
                }
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    let served = builder.serve_connection(io, svc).with_upgrades();
    tokio::pin!(served);
    let tick = (cfg.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut draining = proxy.draining.subscribe();
    let mut shutting_down = *draining.borrow();
    let mut idle_shutdown = false;
    if shutting_down {
        served.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            _ = &mut served => break,
            _ = tokio::time::sleep(tick) => {
                if activity.idle_for() >= cfg.idle_timeout {
                    // A graceful shutdown waits for the exchange in flight; if no byte has
                    // moved since it was asked for, that exchange is stuck (a client that
                    // stopped reading, an upstream that stopped sending): close the connection,
                    // so it cannot hold its `max_connections` slot forever.
                    if idle_shutdown {
                        break;
                    }
                    idle_shutdown = true;
                    served.as_mut().graceful_shutdown();
                }
            }
            changed = draining.changed(), if !shutting_down => {
                shutting_down = true;
                if changed.is_ok() {
                    served.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Time of the last byte read or written on a client connection.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub(crate) fn idle_for(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Runs `fut` (waiting for an upstream) while the connection is not idle; `None` once no
    /// byte has moved on the client socket for `idle` (an upstream that accepts and never
    /// answers). Fires before `serve_conn` would close the connection as stuck, so the client
    /// gets an answer.
    pub(crate) async fn until_idle<F: std::future::Future>(&self, fut: F, idle: Duration) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            let left = idle.saturating_sub(self.idle_for());
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                _ = tokio::time::sleep(left) => {
                    if self.idle_for() >= idle {
                        return None;
                    }
                }
            }
        }
    }
}

/// A client socket that records activity, for the keep-alive idle timeout.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

/// The client's socket back out of a hyper upgrade (CONNECT, WebSocket), with the bytes hyper
/// had already read past the request head. `None` only if the upgrade is not over a client
/// connection served by [`serve_conn`], which cannot happen; callers refuse then.
pub(super) fn client_socket(upgraded: hyper::upgrade::Upgraded) -> Option<(TcpStream, bytes::Bytes)> {
    let parts = upgraded.downcast::<TokioIo<Tracked>>().ok()?;
    Some((parts.io.into_inner().inner, parts.read_buf))
}

/// The upstream's socket back out of a hyper client upgrade (WebSocket), with the bytes hyper
/// had already read past the response head.
pub(super) fn upstream_socket(upgraded: hyper::upgrade::Upgraded) -> Option<(TcpStream, bytes::Bytes)> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
