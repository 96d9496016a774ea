//! Listening sockets. Every TCP listener egressd opens (proxy, transparent, DNS over TCP,
//! admin) listens with the same backlog.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Listen backlog of every TCP listener. Past `max_connections` new connections wait in it,
/// and a burst of connects (slowloris reconnecting, a client fleet after a failover, a DNS
/// client falling back to TCP) must not overflow it: the std/mio default of 128 makes the
/// kernel drop SYNs, and every client then waits out a 1 s, 3 s, 7 s ... retransmit. The
/// kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 1024;

/// A socket for `addr`'s family with `SO_REUSEADDR` (as `TcpListener::bind` sets), not bound.
pub fn socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

/// Binds `addr` and listens with [`LISTEN_BACKLOG`].
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket(addr)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listens_on_the_address_given() {
        let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        l.accept().await.unwrap();
        assert!(listen(addr).is_err(), "the port is taken");
    }
}
