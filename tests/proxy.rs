//! The explicit forward proxy end to end: `egressd run` as a child process, loopback origins,
//! raw HTTP/1.1 and TLS clients; every test checks what the client sees and the audit line.
//! Only 127.0.0.1 is ever dialled by these tests; where a target maps elsewhere (cloud metadata)
//! the test is that egressd refuses before connecting.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn has(v: &Value, field: &str, want: &str) -> bool {
    s(v, field) == want
}

/// Asserts a denial as the contract spells it: 403 + `X-Egressd-Deny: rule=..; reason=..; id=..`.
fn assert_denied(r: &Resp, reason: &str) {
    assert_eq!(r.status, 403, "expected 403 ({reason}), got {r:?}");
    assert_eq!(r.deny_field("reason"), reason, "{r:?}");
    assert!(!r.deny_field("id").is_empty(), "deny header has no id: {r:?}");
    assert!(!r.deny_field("rule").is_empty(), "deny header has no rule: {r:?}");
}

/// A malformed target: 400, or 403 with reason=malformed.
fn assert_malformed(r: &Resp, what: &str) {
    match r.status {
        400 => {}
        403 => assert_eq!(r.deny_field("reason"), "malformed", "{what}: {r:?}"),
        _ => panic!("{what}: expected 400 or 403 reason=malformed, got {r:?}"),
    }
}

// 1 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn allowed_get_passes_with_body_and_host_rewritten() {
    bounded(TEST_TIMEOUT, async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let e =
            Egressd::start(&format!("[[rule]]\nname = \"web\"\nhosts = [\"allowed.test\"]\nports = [{port}]\n")).await;

        let req = format!(
            "GET http://allowed.test:{port}/path?q=1 HTTP/1.1\r\n\
             Host: something-else.test\r\n\
             Proxy-Authorization: x\r\n\
             Proxy-Connection: keep-alive\r\n\
             Connection: close, X-Hop\r\n\
             X-Hop: 1\r\n\
             X-End-To-End: kept\r\n\r\n"
        );
        let r = raw_request(e.proxy, req.as_bytes()).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), ORIGIN_BODY);

        let seen = origin.recorded();
        assert_eq!(seen.len(), 1, "{seen:?}");
        let o = &seen[0];
        assert_eq!(o.method, "GET");
        assert_eq!(o.uri, "/path?q=1", "origin must receive origin-form");
        assert_eq!(o.header("host"), Some(format!("allowed.test:{port}").as_str()), "{o:?}");
        for h in ["proxy-authorization", "proxy-connection", "x-hop"] {
            assert!(o.header(h).is_none(), "hop-by-hop header {h} reached the origin: {o:?}");
        }
        assert!(!o.headers.iter().any(|(k, _)| k.to_ascii_lowercase().starts_with("proxy-")), "{o:?}");
        if let Some(c) = o.header("connection") {
            assert!(!c.to_ascii_lowercase().contains("x-hop"), "client's Connection header forwarded: {o:?}");
        }
        assert_eq!(o.header("x-end-to-end"), Some("kept"), "end-to-end header dropped: {o:?}");

        e.audit("allow for allowed.test", |v| has(v, "host", "allowed.test") && has(v, "action", "allow")).await;
    })
    .await
}

// 2 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn denied_host_403_with_deny_header() {
    bounded(TEST_TIMEOUT, async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let e =
            Egressd::start(&format!("[[rule]]\nname = \"web\"\nhosts = [\"allowed.test\"]\nports = [{port}]\n")).await;

        let r = get(e.proxy, "denied.test", port, "/").await;
        assert_eq!(r.status, 403, "{r:?}");
        let h = r.header("x-egressd-deny").expect("X-Egressd-Deny").to_string();
        assert!(h.contains("rule=default; reason=default; id="), "{h}");
        let id = r.deny_field("id");
        assert!(!id.is_empty(), "{h}");
        assert!(!r.body.is_empty(), "a short text body is expected");

        let v = e.audit("deny for denied.test", |v| has(v, "host", "denied.test")).await;
        assert_eq!(s(&v, "action"), "deny", "{v}");
        assert_eq!(s(&v, "kind"), "http", "{v}");
        assert_eq!(s(&v, "rule"), "default", "{v}");
        assert_eq!(s(&v, "reason"), "default", "{v}");
        assert_eq!(s(&v, "id"), id, "the header's id must be the audit line's id: {v}");

        assert!(origin.recorded().is_empty(), "origin saw a denied request");
        assert_eq!(origin.connections.load(Ordering::SeqCst), 0, "egressd dialled a denied destination");
    })
    .await
}

// 3 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn origin_form_is_400() {
    bounded(TEST_TIMEOUT, async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let e =
            Egressd::start(&format!("[[rule]]\nname = \"web\"\nhosts = [\"allowed.test\"]\nports = [{port}]\n")).await;

        let r = raw_request(
            e.proxy,
            format!("GET /x HTTP/1.1\r\nHost: allowed.test:{port}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 400, "{r:?}");
        assert!(origin.recorded().is_empty());
        assert_eq!(origin.connections.load(Ordering::SeqCst), 0);
    })
    .await
}

// 4 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn host_header_ignored_for_routing() {
    bounded(TEST_TIMEOUT, async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let e =
            Egressd::start(&format!("[[rule]]\nname = \"web\"\nhosts = [\"allowed.test\"]\nports = [{port}]\n")).await;

        // Allowed URI, denied Host: the URI decides and the Host is rewritten.
        let r = raw_request(
            e.proxy,
            format!("GET http://allowed.test:{port}/a HTTP/1.1\r\nHost: denied.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
        let seen = origin.recorded();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].header("host"), Some(format!("allowed.test:{port}").as_str()), "{:?}", seen[0]);

        // Denied URI, allowed Host: still denied.
        let r = raw_request(
            e.proxy,
            format!(
                "GET http://denied.test:{port}/b HTTP/1.1\r\nHost: allowed.test:{port}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(origin.recorded().len(), 1, "the denied request reached the origin");
    })
    .await
}

// 5 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn port_not_in_ports_403() {
    bounded(TEST_TIMEOUT, async {
        let origin = HttpOrigin::start().await;
        let other = HttpOrigin::start().await;
        let port = origin.port();
        let e =
            Egressd::start(&format!("[[rule]]\nname = \"web\"\nhosts = [\"allowed.test\"]\nports = [{port}]\n")).await;

        let r = get(e.proxy, "allowed.test", other.port(), "/").await;
        assert_denied(&r, "port");
        assert_eq!(r.deny_field("rule"), "web", "{r:?}");
        let v = e.audit("port deny", |v| n(v, "port") == Some(u64::from(other.port()))).await;
        assert_eq!(s(&v, "action"), "deny", "{v}");
        assert_eq!(s(&v, "reason"), "port", "{v}");
        assert_eq!(s(&v, "rule"), "web", "{v}");
        assert!(other.recorded().is_empty());
        assert_eq!(other.connections.load(Ordering::SeqCst), 0);

        // The allowed port still works.
        assert_eq!(get(e.proxy, "allowed.test", port, "/").await.status, 200);
    })
    .await
}

// 6 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn method_not_allowed_403() {
    bounded(TEST_TIMEOUT, async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let e = Egressd::start(&format!(
            "[[rule]]\nname = \"read-only\"\nhosts = [\"allowed.test\"]\nports = [{port}]\nmethods = [\"GET\"]\n"
        ))
        .await;

        let r = raw_request(
            e.proxy,
            format!(
                "POST http://allowed.test:{port}/submit HTTP/1.1\r\nHost: allowed.test:{port}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
            )
            .as_bytes(),
        )
        .await;
        assert_denied(&r, "method");
        assert_eq!(r.deny_field("rule"), "read-only");
        let v = e.audit("method deny", |v| has(v, "reason", "method")).await;
        assert_eq!(s(&v, "action"), "deny", "{v}");
        assert_eq!(s(&v, "rule"), "read-only", "{v}");
        assert!(origin.recorded().is_empty(), "{:?}", origin.recorded());
        assert_eq!(origin.connections.load(Ordering::SeqCst), 0);

        assert_eq!(get(e.proxy, "allowed.test", port, "/").await.status, 200);
    })
    .await
}

// 7 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn body_over_limit_413() {
    bounded(TEST_TIMEOUT, async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let e = Egressd::start(&format!(
            "[[rule]]\nname = \"small-posts\"\nhosts = [\"allowed.test\"]\nports = [{port}]\nmax_request_body = \"1KiB\"\n"
        ))
        .await;

        // Content-Length over the limit.
        let mut req = format!(
            "POST http://allowed.test:{port}/up HTTP/1.1\r\nHost: allowed.test:{port}\r\nContent-Length: 2048\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        req.extend(std::iter::repeat_n(b'a', 2048));
        let r = raw_request(e.proxy, &req).await;
        assert_eq!(r.status, 413, "{r:?}");
        assert_eq!(r.deny_field("reason"), "body_limit", "{r:?}");
        assert_eq!(r.deny_field("rule"), "small-posts", "{r:?}");
        assert!(!r.deny_field("id").is_empty(), "{r:?}");
        let v = e.audit("body_limit deny", |v| has(v, "reason", "body_limit")).await;
        assert_eq!(s(&v, "action"), "deny", "{v}");
        assert_eq!(origin.body_bytes(), 0, "origin received body bytes: {:?}", origin.recorded());

        // A small body passes.
        let mut req = format!(
            "POST http://allowed.test:{port}/up HTTP/1.1\r\nHost: allowed.test:{port}\r\nContent-Length: 100\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        req.extend(std::iter::repeat_n(b'b', 100));
        assert_eq!(raw_request(e.proxy, &req).await.status, 200);
        let before = origin.body_bytes();
        assert_eq!(before, 100);

        // Chunked body over the limit: 8 chunks of 512 bytes, sent with small pauses.
        let mut c = dial(e.proxy).await;
        let head = format!(
            "POST http://allowed.test:{port}/chunked HTTP/1.1\r\nHost: allowed.test:{port}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        c.write_all(head.as_bytes()).await.unwrap();
        let (mut rd, mut wr) = c.into_split();
        let writer = tokio::spawn(async move {
            let chunk = format!("200\r\n{}\r\n", "c".repeat(512));
            for _ in 0..8 {
                if wr.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            let _ = wr.write_all(b"0\r\n\r\n").await;
        });
        let outcome = tokio::time::timeout(Duration::from_secs(5), read_response(&mut rd, false)).await;
        let _ = writer.await;
        match outcome {
            Err(_) => panic!("chunked body over the limit: neither a response nor a close within 5 s"),
            Ok(Err(_)) => {} // closed / reset: acceptable
            Ok(Ok(r)) => {
                assert_eq!(r.status, 413, "chunked body over the limit: {r:?}");
                assert_eq!(r.deny_field("reason"), "body_limit", "{r:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let chunked_bytes = origin.body_bytes() - before;
        assert!(chunked_bytes <= 1024, "origin received {chunked_bytes} bytes of a body capped at 1 KiB");
        e.audit_count("body_limit (Content-Length and chunked)", 2, |v| has(v, "reason", "body_limit")).await;
    })
    .await
}

// 8 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn connect_allowed_real_tls_handshake() {
    bounded(TEST_TIMEOUT, async {
        let origin = TlsOrigin::start(TlsMode::Http).await;
        let port = origin.port();
        let e =
            Egressd::start(&format!("[[rule]]\nname = \"tls\"\nhosts = [\"tls.allowed.test\"]\nports = [{port}]\n"))
                .await;

        let (s0, r) = connect(e.proxy, &format!("tls.allowed.test:{port}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        let mut tls = tls_connect(s0, "tls.allowed.test").await.expect("TLS handshake through the tunnel");
        tls.write_all(b"GET / HTTP/1.1\r\nHost: tls.allowed.test\r\nConnection: close\r\n\r\n").await.unwrap();
        let resp = read_response(&mut tls, false).await.expect("response over TLS");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), TLS_BODY);
        drop(tls);

        let v = e
            .audit("connect allow with bytes", |v| {
                has(v, "kind", "connect") && n(v, "bytes_up").unwrap_or(0) > 0 && n(v, "bytes_down").unwrap_or(0) > 0
            })
            .await;
        assert_eq!(s(&v, "action"), "allow", "{v}");
        assert_eq!(s(&v, "reason"), "rule", "{v}");
        assert_eq!(s(&v, "rule"), "tls", "{v}");
        assert_eq!(s(&v, "host"), "tls.allowed.test", "{v}");
        assert_eq!(n(&v, "port"), Some(u64::from(port)), "{v}");
        assert_eq!(origin.counters.handshakes.load(Ordering::SeqCst), 1);
    })
    .await
}

// 9 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn connect_sni_mismatch_closed() {
    bounded(TEST_TIMEOUT, async {
        let origin = TlsOrigin::start(TlsMode::Http).await;
        let port = origin.port();
        let e = Egressd::start(&format!(
            "[[rule]]\nname = \"tls\"\nhosts = [\"tls.allowed.test\", \"other.allowed.test\"]\nports = [{port}]\n"
        ))
        .await;

        let (s0, r) = connect(e.proxy, &format!("tls.allowed.test:{port}")).await;
        // The decision may come only after the ClientHello (200 first), or never open (403).
        if r.status == 200 {
            let hs = tokio::time::timeout(Duration::from_secs(5), tls_connect(s0, "other.allowed.test")).await;
            match hs {
                Err(_) => panic!("SNI mismatch: the tunnel was neither closed nor completed within 5 s"),
                Ok(Ok(_)) => {
                    panic!("TLS handshake with SNI other.allowed.test succeeded through a tunnel to tls.allowed.test")
                }
                Ok(Err(_)) => {}
            }
        } else {
            panic!("CONNECT to an allowed host must be accepted before the ClientHello is seen: {r:?}");
        }
        let v = e.audit("sni_mismatch", |v| has(v, "reason", "sni_mismatch")).await;
        assert_eq!(s(&v, "action"), "deny", "{v}");
        assert_eq!(s(&v, "kind"), "connect", "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(origin.counters.handshakes.load(Ordering::SeqCst), 0, "origin completed a handshake");
        assert_eq!(
            origin.counters.raw_bytes.load(Ordering::SeqCst),
            0,
            "client bytes reached the origin before the SNI check"
        );
    })
    .await
}

// 10 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn connect_plain_bytes_not_tls() {
    bounded(TEST_TIMEOUT, async {
        let origin = TlsOrigin::start(TlsMode::Http).await;
        let port = origin.port();
        let e =
            Egressd::start(&format!("[[rule]]\nname = \"tls\"\nhosts = [\"tls.allowed.test\"]\nports = [{port}]\n"))
                .await;

        let (mut s0, r) = connect(e.proxy, &format!("tls.allowed.test:{port}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        s0.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (got, _err) = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut s0))
            .await
            .expect("plain bytes in a CONNECT tunnel: connection not closed within 5 s");
        assert!(got.is_empty(), "received {:?} on a tunnel that must be closed", String::from_utf8_lossy(&got));
        let v = e.audit("not_tls", |v| has(v, "reason", "not_tls")).await;
        assert_eq!(s(&v, "action"), "deny", "{v}");
        assert_eq!(s(&v, "kind"), "connect", "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(origin.counters.raw_bytes.load(Ordering::SeqCst), 0, "plain client bytes reached the origin");
    })
    .await
}

// 11 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn connect_decimal_ip_403() {
    bounded(TEST_TIMEOUT, async {
        // A rule covering 127.0.0.0/8: were 2130706433 read as 127.0.0.1, it would be allowed.
        let e = Egressd::start("[[rule]]\nname = \"loop\"\ncidrs = [\"127.0.0.0/8\"]\nports = [443]\n").await;
        let (_s, r) = connect(e.proxy, "2130706433:443").await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.deny_field("reason"), "malformed", "{r:?}");
        let v = e.audit("malformed", |v| has(v, "reason", "malformed")).await;
        assert_eq!(s(&v, "action"), "deny", "{v}");
        assert_eq!(s(&v, "kind"), "connect", "{v}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_mapped_metadata_403() {
    bounded(TEST_TIMEOUT, async {
        // Even a rule that names the metadata address cannot open the guard.
        let e = Egressd::start(
            "[[rule]]\nname = \"meta\"\ncidrs = [\"169.254.169.254/32\", \"::ffff:a9fe:a9fe/128\"]\nports = [443]\n",
        )
        .await;
        let (_s, r) = connect(e.proxy, "[::ffff:a9fe:a9fe]:443").await;
        assert_eq!(r.status, 403, "{r:?}");
        let reason = r.deny_field("reason");
        assert!(reason == "malformed" || reason == "guard", "{r:?}");
        let v = e.audit("mapped metadata deny", |v| has(v, "kind", "connect")).await;
        assert_eq!(s(&v, "action"), "deny", "{v}");
        assert_eq!(s(&v, "reason"), reason, "{v}");
    })
    .await
}

// 12 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn hosts_maps_to_metadata_403_guard() {
    bounded(TEST_TIMEOUT, async {
        let e = Egressd::start("[[rule]]\nname = \"meta\"\nhosts = [\"meta.allowed.test\"]\nports = [80, 443]\n").await;
        let (_s, r) = connect(e.proxy, "meta.allowed.test:443").await;
        assert_denied(&r, "guard");
        let v =
            e.audit("guard deny (connect)", |v| has(v, "kind", "connect") && has(v, "host", "meta.allowed.test")).await;
        assert_eq!(s(&v, "action"), "deny", "{v}");
        assert_eq!(s(&v, "reason"), "guard", "{v}");

        let r = get(e.proxy, "meta.allowed.test", 80, "/latest/meta-data/").await;
        assert_denied(&r, "guard");
        let v = e.audit("guard deny (http)", |v| has(v, "kind", "http") && has(v, "host", "meta.allowed.test")).await;
        assert_eq!(s(&v, "reason"), "guard", "{v}");
    })
    .await
}

// 13 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn upload_cap_closes_tunnel() {
    bounded(TEST_TIMEOUT, async {
        const CAP: u64 = 64 * 1024;
        const TOTAL: usize = 1024 * 1024;
        let origin = TlsOrigin::start(TlsMode::Echo).await;
        let port = origin.port();
        let e = Egressd::start(&format!(
            "[[rule]]\nname = \"capped\"\nhosts = [\"tls.allowed.test\"]\nports = [{port}]\nmax_upload_bytes = \"64KiB\"\n"
        ))
        .await;

        // Under the cap: 32 KiB go up and come back intact.
        let (s0, r) = connect(e.proxy, &format!("tls.allowed.test:{port}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        let mut tls = tls_connect(s0, "tls.allowed.test").await.expect("TLS handshake");
        tls.write_all(&vec![b'k'; 32 * 1024]).await.expect("an upload under the cap");
        let mut back = vec![0u8; 32 * 1024];
        tls.read_exact(&mut back).await.expect("echo of an upload under the cap");
        assert!(back.iter().all(|&b| b == b'k'));
        drop(tls);
        let before = origin.counters.app_bytes.load(Ordering::SeqCst);
        assert_eq!(before, 32 * 1024);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let raw_before = origin.counters.raw_bytes.load(Ordering::SeqCst);

        // Over the cap: 1 MiB.
        let (s0, r) = connect(e.proxy, &format!("tls.allowed.test:{port}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        let tls = tls_connect(s0, "tls.allowed.test").await.expect("TLS handshake");
        let (mut rd, mut wr) = tokio::io::split(tls);
        let writer = tokio::spawn(async move {
            let chunk = vec![b'u'; 16 * 1024];
            let mut sent = 0usize;
            while sent < TOTAL {
                if wr.write_all(&chunk).await.is_err() || wr.flush().await.is_err() {
                    return (sent, true);
                }
                sent += chunk.len();
            }
            (sent, false)
        });
        let (echoed, _err) = tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut rd))
            .await
            .expect("the tunnel was not closed after the upload cap (reader still open after 10 s)");
        let (sent, write_failed) = writer.await.unwrap();
        eprintln!("upload cap: sent {sent} (write failed: {write_failed}), echoed {}", echoed.len());
        assert!(
            echoed.len() < TOTAL,
            "all {TOTAL} bytes made the round trip through a tunnel capped at 64 KiB (sent {sent}, write failed: {write_failed})"
        );

        let v = e.audit("upload_limit", |v| has(v, "reason", "upload_limit")).await;
        assert_eq!(s(&v, "kind"), "connect", "{v}");
        assert_eq!(s(&v, "rule"), "capped", "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let app = origin.counters.app_bytes.load(Ordering::SeqCst) - before;
        let raw = origin.counters.raw_bytes.load(Ordering::SeqCst) - raw_before;
        eprintln!("upload cap: origin decrypted {app} bytes, received {raw} raw bytes; audit {v}");
        // One TLS record (16 KiB + overhead) of slack over the cap.
        assert!(app < CAP + 16 * 1024 + 512, "origin decrypted {app} bytes through a 64 KiB cap");
        assert!(raw < CAP + 16 * 1024 + 512, "origin received {raw} raw bytes through a 64 KiB cap");
    })
    .await
}

// 14 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn upstream_refuses_502() {
    bounded(TEST_TIMEOUT, async {
        let closed = closed_port();
        let e = Egressd::start(&format!(
            "[[rule]]\nname = \"closed\"\nhosts = [\"allowed.test\", \"tls.allowed.test\"]\nports = [{closed}]\n"
        ))
        .await;
        let r = get(e.proxy, "allowed.test", closed, "/").await;
        assert_eq!(r.status, 502, "{r:?}");
        let (_s, r) = connect(e.proxy, &format!("tls.allowed.test:{closed}")).await;
        assert_eq!(r.status, 502, "{r:?}");
        e.audit("for the refused http request", |v| has(v, "kind", "http") && n(v, "port") == Some(u64::from(closed)))
            .await;
        e.audit("for the refused connect", |v| has(v, "kind", "connect") && n(v, "port") == Some(u64::from(closed)))
            .await;
    })
    .await
}

// 15 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_closed_after_header_timeout() {
    bounded(TEST_TIMEOUT, async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let e =
            Egressd::start(&format!("[[rule]]\nname = \"web\"\nhosts = [\"allowed.test\"]\nports = [{port}]\n")).await;

        let mut c = dial(e.proxy).await;
        c.write_all(format!("GET http://allowed.test:{port}/ HTTP/1.1\r\nHos").as_bytes()).await.unwrap();
        let t0 = Instant::now();
        let (got, _err) = tokio::time::timeout(Duration::from_secs(3), read_until_closed(&mut c))
            .await
            .expect("slow-header client still connected 3 s after the last byte (header_timeout = 1s)");
        let took = t0.elapsed();
        let text = String::from_utf8_lossy(&got);
        assert!(got.is_empty() || text.starts_with("HTTP/1.1 408"), "unexpected answer {text:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(origin.recorded().is_empty());
    })
    .await
}

// 16 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_tunnels() {
    bounded(Duration::from_secs(45), async {
        let origin = TlsOrigin::start(TlsMode::Http).await;
        let port = origin.port();
        let e =
            Egressd::start(&format!("[[rule]]\nname = \"tls\"\nhosts = [\"tls.allowed.test\"]\nports = [{port}]\n"))
                .await;
        let proxy = e.proxy;
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                tokio::spawn(async move {
                    let (s0, r) = connect(proxy, &format!("tls.allowed.test:{port}")).await;
                    if r.status != 200 {
                        return Err(format!("#{i}: CONNECT -> {}", r.status));
                    }
                    let mut tls =
                        tls_connect(s0, "tls.allowed.test").await.map_err(|e| format!("#{i}: handshake: {e}"))?;
                    tls.write_all(b"GET / HTTP/1.1\r\nHost: tls.allowed.test\r\nConnection: close\r\n\r\n")
                        .await
                        .map_err(|e| format!("#{i}: write: {e}"))?;
                    let resp = read_response(&mut tls, false).await.map_err(|e| format!("#{i}: read: {e}"))?;
                    if resp.status != 200 || resp.text() != TLS_BODY {
                        return Err(format!("#{i}: {resp:?}"));
                    }
                    Ok(())
                })
            })
            .collect();
        let all = tokio::time::timeout(Duration::from_secs(30), async {
            let mut errors = Vec::new();
            for t in tasks {
                if let Err(err) = t.await.unwrap() {
                    errors.push(err);
                }
            }
            errors
        })
        .await
        .expect("200 concurrent tunnels did not finish within 30 s");
        assert!(all.is_empty(), "{} of 200 tunnels failed: {:?}", all.len(), &all[..all.len().min(10)]);
        assert_eq!(origin.counters.answered.load(Ordering::SeqCst), 200);
        eprintln!("200 tunnels in {:?}", t0.elapsed());
    })
    .await
}

// 17 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn connect_missing_port_and_bad_ports() {
    bounded(TEST_TIMEOUT, async {
        // Watch 127.0.0.1:443 when we may bind it: a wrapped port (4294967739 = 2^32 + 443) would land there.
        let watch443 = tokio::net::TcpListener::bind("127.0.0.1:443").await.ok();
        eprintln!("watching 127.0.0.1:443: {}", watch443.is_some());
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        if let Some(l) = watch443 {
            let hits = hits.clone();
            tokio::spawn(async move {
                while l.accept().await.is_ok() {
                    hits.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let origin = HttpOrigin::start().await;
        let e = Egressd::start(&format!(
            "[[rule]]\nname = \"web\"\nhosts = [\"allowed.test\"]\nports = [80, 443, {}]\n",
            origin.port()
        ))
        .await;

        for target in [
            "allowed.test",
            "allowed.test:",
            "allowed.test:0",
            "allowed.test:65536",
            "allowed.test:4294967739",
            "allowed.test:+443",
            "allowed.test:443x",
        ] {
            let (_s, r) = connect(e.proxy, target).await;
            assert_malformed(&r, &format!("CONNECT {target}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(hits.load(Ordering::SeqCst), 0, "egressd connected to 127.0.0.1:443 for a malformed port");
        assert_eq!(origin.connections.load(Ordering::SeqCst), 0);
        for v in e.decisions() {
            assert_ne!(s(&v, "action"), "allow", "a malformed CONNECT was allowed: {v}");
        }
    })
    .await
}

// 18 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn keepalive_reuse_decides_each_request() {
    bounded(TEST_TIMEOUT, async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let e =
            Egressd::start(&format!("[[rule]]\nname = \"web\"\nhosts = [\"allowed.test\"]\nports = [{port}]\n")).await;

        let mut c = dial(e.proxy).await;
        for (i, (host, want)) in
            [("allowed.test", 200), ("denied.test", 403), ("allowed.test", 200)].into_iter().enumerate()
        {
            c.write_all(format!("GET http://{host}:{port}/r{i} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes())
                .await
                .unwrap_or_else(|err| panic!("request #{i} ({host}) on the kept-alive connection: {err}"));
            let r = tokio::time::timeout(Duration::from_secs(5), read_response(&mut c, false))
                .await
                .unwrap_or_else(|_| panic!("request #{i} ({host}): no response within 5 s"))
                .unwrap_or_else(|err| panic!("request #{i} ({host}) on the kept-alive connection: {err}"));
            assert_eq!(r.status, want, "request #{i} ({host}): {r:?}");
        }
        let seen: Vec<String> = origin.recorded().into_iter().map(|r| r.uri).collect();
        assert_eq!(seen, vec!["/r0".to_string(), "/r2".to_string()]);
        e.audit_count("a deny for denied.test", 1, |v| has(v, "host", "denied.test") && has(v, "action", "deny")).await;
        // wait for the two allows (a kept-alive request may be logged when it completes)
        e.audit_count("two allows for allowed.test", 2, |v| {
            has(v, "host", "allowed.test") && has(v, "action", "allow")
        })
        .await;
    })
    .await
}

// 19 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn audit_line_fields() {
    bounded(TEST_TIMEOUT, async {
        let origin = HttpOrigin::start().await;
        let port = origin.port();
        let e =
            Egressd::start(&format!("[[rule]]\nname = \"org-web\"\nhosts = [\"allowed.test\"]\nports = [{port}]\n"))
                .await;
        let r = get(e.proxy, "allowed.test", port, "/fields").await;
        assert_eq!(r.status, 200);

        let v = e.audit("for the allowed GET", |v| has(v, "host", "allowed.test")).await;
        for f in [
            "ts",
            "id",
            "kind",
            "client",
            "host",
            "port",
            "action",
            "rule",
            "reason",
            "upstream_ip",
            "bytes_up",
            "bytes_down",
            "duration_ms",
        ] {
            assert!(!v[f].is_null(), "audit line lacks `{f}`: {v}");
        }
        assert!(v["ts"].is_string(), "{v}");
        assert!(!s(&v, "ts").is_empty(), "{v}");
        assert!(!s(&v, "id").is_empty(), "{v}");
        assert_eq!(s(&v, "kind"), "http", "{v}");
        assert_eq!(s(&v, "client"), "127.0.0.1", "{v}");
        assert_eq!(s(&v, "host"), "allowed.test", "{v}");
        assert!(v["port"].is_number(), "{v}");
        assert_eq!(n(&v, "port"), Some(u64::from(port)), "{v}");
        assert_eq!(s(&v, "action"), "allow", "{v}");
        assert_eq!(s(&v, "rule"), "org-web", "{v}");
        assert_eq!(s(&v, "reason"), "rule", "{v}");
        assert_eq!(s(&v, "upstream_ip"), "127.0.0.1", "{v}");
        for f in ["bytes_up", "bytes_down", "duration_ms"] {
            assert!(v[f].is_number(), "`{f}` is not a number: {v}");
        }
        assert!(n(&v, "bytes_down").unwrap() > 0, "bytes_down is 0 after a 200 with a body: {v}");
    })
    .await
}
