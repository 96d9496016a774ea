//! Clients of the bypass corpus: raw HTTP/1.1 exchanges (exact bytes in, every response
//! parsed out), CONNECT attempts and a UDP DNS round trip.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::{ANSWER_WAIT, common, origins};

/// What a proxy client saw on one connection.
#[derive(Debug, Default)]
pub struct Exchange {
    /// Final (non-1xx) responses, in order.
    pub responses: Vec<common::Resp>,
    /// Interim (1xx) status codes.
    pub interim: Vec<u16>,
    pub raw: Vec<u8>,
    /// egressd closed the connection.
    pub closed: bool,
}

impl Exchange {
    pub fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(|r| r.status).collect()
    }

    /// No response is a success or a gateway error (a 502/504 means egressd tried to dial).
    pub fn assert_refused(&self, case: &str) {
        for r in &self.responses {
            assert!(
                (400..500).contains(&r.status) || r.status == 501 || r.status == 505,
                "[{case}] expected a refusal, got {} {:?}; all: {:?}",
                r.status,
                r.text(),
                self.statuses()
            );
        }
        assert!(
            !self.raw.windows(origins::DENIED_BODY.len()).any(|w| w == origins::DENIED_BODY.as_bytes()),
            "[{case}] BYPASS: a denied origin's answer reached the client"
        );
    }

    /// The response at `i` is egressd's 403 with its deny header.
    pub fn assert_denied_at(&self, case: &str, i: usize) {
        let r = self.responses.get(i).unwrap_or_else(|| panic!("[{case}] no response #{i}: {self:?}"));
        assert_eq!(r.status, 403, "[{case}] response #{i}: {r:?}");
        assert!(r.header("x-egressd-deny").is_some(), "[{case}] 403 without X-Egressd-Deny: {r:?}");
    }
}

/// A CONNECT attempt.
#[derive(Debug)]
pub struct Tunnel {
    /// The CONNECT response status; `None` if none came.
    pub status: Option<u16>,
    /// Bytes that came back through the tunnel.
    pub received: Vec<u8>,
    /// egressd closed the tunnel.
    pub closed: bool,
}

impl Tunnel {
    /// Refused before or after the 200: no success status, or closed without a byte back.
    pub fn assert_refused(&self, case: &str) {
        match self.status {
            Some(200) => assert!(
                self.closed && self.received.is_empty(),
                "[{case}] the tunnel stayed open or answered after a forbidden opening: {self:?}"
            ),
            Some(s) => assert!((400..500).contains(&s), "[{case}] CONNECT answered {s}: {self:?}"),
            None => {}
        }
    }
}

/// `template` with every `{p}` replaced by `port`.
pub fn fill(template: &[u8], port: u16) -> Vec<u8> {
    let port = port.to_string();
    let mut out = Vec::with_capacity(template.len());
    let mut i = 0;
    while i < template.len() {
        if template[i..].starts_with(b"{p}") {
            out.extend_from_slice(port.as_bytes());
            i += 3;
        } else {
            out.push(template[i]);
            i += 1;
        }
    }
    out
}

pub async fn exchange(proxy: SocketAddr, chunks: &[&[u8]], gap: Duration, want: usize) -> Exchange {
    let mut s = TcpStream::connect(proxy).await.expect("connect to egressd");
    let _ = s.set_nodelay(true);
    let mut ex = Exchange::default();
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 && !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        if s.write_all(chunk).await.is_err() {
            break;
        }
    }
    let deadline = Instant::now() + ANSWER_WAIT;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let (finals, interim) = parse_responses(&ex.raw);
        if finals.len() >= want && want > 0 {
            ex.responses = finals;
            ex.interim = interim;
            return ex;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                ex.closed = true;
                break;
            }
            Ok(Ok(n)) => ex.raw.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let (finals, interim) = parse_responses_eof(&ex.raw, ex.closed);
    ex.responses = finals;
    ex.interim = interim;
    ex
}

fn parse_responses(raw: &[u8]) -> (Vec<common::Resp>, Vec<u16>) {
    parse_responses_eof(raw, false)
}

/// Complete responses in `raw` (a body without a length runs to EOF, so counts only at EOF).
fn parse_responses_eof(raw: &[u8], eof: bool) -> (Vec<common::Resp>, Vec<u16>) {
    let mut finals = Vec::new();
    let mut interim = Vec::new();
    let mut rest = raw;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let body_start = end + 4;
        if (100..200).contains(&status) {
            interim.push(status);
            rest = &rest[body_start..];
            continue;
        }
        let mut resp = common::Resp { status, headers, body: Vec::new() };
        let len = resp.header("content-length").and_then(|l| l.parse::<usize>().ok());
        let body_len = match len {
            Some(n) => n,
            None if status == 204 || status == 304 => 0,
            None if eof => rest.len() - body_start,
            None => break,
        };
        if rest.len() < body_start + body_len {
            break;
        }
        resp.body = rest[body_start..body_start + body_len].to_vec();
        finals.push(resp);
        rest = &rest[body_start + body_len..];
    }
    (finals, interim)
}

pub async fn dns_udp(server: SocketAddr, packet: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    sock.send_to(packet, server).await.ok()?;
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}
