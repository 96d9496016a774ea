//! Request smuggling: framings two parsers read differently (Content-Length with
//! Transfer-Encoding, duplicated or obfuscated headers, bad chunk sizes, bare LF), pipelines
//! and keep-alive reuse whose later request targets a denied host, `Expect: 100-continue`,
//! upgrades. Whatever egressd makes of the bytes, every request it forwards must name an
//! allowed host, and nothing may reach a denied one. `{p}` is the origin port.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Expect, Fixture, fill};

/// A request to the denied host, as smuggled bytes.
const DENIED_GET: &str = "GET http://denied.test:{p}/smuggled HTTP/1.1\r\nHost: denied.test:{p}\r\n\r\n";

/// Sends `template` + [`DENIED_GET`]; every response must be a refusal except that an
/// allowed request may be served (by the allowed origin, naming only allowed hosts).
async fn smuggle(fx: &mut Fixture, template: &str) {
    let bytes = fill(format!("{template}{DENIED_GET}").as_bytes(), fx.port);
    let ex = fx.http(bytes, 2).await;
    for r in &ex.responses {
        assert!(
            r.status == 200 && r.text() == crate::origins::ALLOWED_BODY || (400..500).contains(&r.status),
            "[{}] unexpected response {} {:?}; all: {:?}",
            fx.name,
            r.status,
            r.text(),
            ex.statuses()
        );
    }
    assert!(ex.responses.len() <= 2, "[{}] more responses than requests: {:?}", fx.name, ex.statuses());
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
}

/// The body a POST needs so that its length covers exactly [`DENIED_GET`] (port filled in).
fn denied_get_len(port: u16) -> usize {
    fill(DENIED_GET.as_bytes(), port).len()
}

// ----- Content-Length and Transfer-Encoding ---------------------------------------------------

/// Content-Length together with Transfer-Encoding: chunked, then a pipelined denied request.
/// RFC 9112 §6.1 lets a server either refuse (400) or process the request by its
/// Transfer-Encoding alone, and then it MUST close the connection. egressd's HTTP layer (hyper)
/// does the latter before egressd sees the request (it drops the Content-Length), so either is
/// accepted here; what is checked is that the Content-Length framing is never used, nothing
/// after the request is read, and the denied request reaches no one.
async fn cl_with_te(fx: &mut Fixture, template: &str) {
    let bytes = fill(format!("{template}{DENIED_GET}").as_bytes(), fx.port);
    let ex = fx.http(bytes, 2).await;
    match ex.statuses().as_slice() {
        [400] => {}
        [200] => {
            assert!(ex.closed, "[{}] connection kept open after a CL+TE request: {ex:?}", fx.name);
            let seen = fx.allowed.seen();
            assert_eq!(seen.requests.len(), 1, "[{}] {seen:?}", fx.name);
            assert!(seen.requests[0].body.is_empty(), "[{}] Content-Length framing was used: {seen:?}", fx.name);
        }
        other => panic!("[{}] CL+TE answered {other:?}: {ex:?}", fx.name),
    }
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
}

case!(cl_and_te_never_frames_by_length, |fx| {
    cl_with_te(
        &mut fx,
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
});

case!(te_and_cl_reversed_never_frames_by_length, |fx| {
    // With Content-Length framing, the denied request would be this request's body.
    cl_with_te(
        &mut fx,
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 60\r\nHost: allowed.test\r\n\r\n0\r\n\r\n",
    )
    .await;
});

case!(two_content_lengths_differ, |fx| {
    let t = "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 70\r\n\r\n";
    let bytes = fill(format!("{t}{DENIED_GET}").as_bytes(), fx.port);
    let ex = fx.http(bytes, 2).await;
    ex.assert_refused(fx.name);
    fx.verdict(Expect::NOTHING).await;
});

case!(two_content_lengths_equal_body_is_a_request, |fx| {
    let n = denied_get_len(fx.port);
    smuggle(
        &mut fx,
        &format!(
            "POST http://allowed.test:{{p}}/ HTTP/1.1\r\nHost: a\r\nContent-Length: {n}\r\nContent-Length: {n}\r\n\r\n"
        ),
    )
    .await;
});

case!(content_length_with_plus_sign, |fx| {
    let n = denied_get_len(fx.port);
    smuggle(&mut fx, &format!("POST http://allowed.test:{{p}}/ HTTP/1.1\r\nHost: a\r\nContent-Length: +{n}\r\n\r\n"))
        .await;
});

case!(content_length_comma_list, |fx| {
    let n = denied_get_len(fx.port);
    smuggle(&mut fx, &format!("POST http://allowed.test:{{p}}/ HTTP/1.1\r\nHost: a\r\nContent-Length: 0, {n}\r\n\r\n"))
        .await;
});

case!(te_chunked_trailing_comma, |fx| {
    smuggle(
        &mut fx,
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked ,\r\n\r\n0\r\n\r\n",
    )
    .await;
});

case!(te_tab_before_chunked, |fx| {
    smuggle(
        &mut fx,
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
    )
    .await;
});

case!(te_xchunked, |fx| {
    smuggle(
        &mut fx,
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    )
    .await;
});

case!(te_identity_header_after_chunked, |fx| {
    smuggle(
        &mut fx,
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    )
    .await;
});

case!(te_space_before_colon, |fx| {
    smuggle(
        &mut fx,
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
});

case!(te_obs_fold, |fx| {
    smuggle(
        &mut fx,
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
});

// ----- bad chunk sizes ------------------------------------------------------------------------

case!(chunk_size_negative, |fx| {
    smuggle(
        &mut fx,
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n",
    )
    .await;
});

case!(chunk_size_hex_prefix, |fx| {
    smuggle(&mut fx, "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n").await;
});

case!(chunk_size_overflow, |fx| {
    smuggle(
        &mut fx,
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000003\r\nabc\r\n0\r\n\r\n",
    )
    .await;
});

case!(chunk_data_longer_than_size, |fx| {
    smuggle(&mut fx, "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n").await;
});

case!(chunk_size_bare_lf, |fx| {
    smuggle(
        &mut fx,
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
    )
    .await;
});

// ----- bare LF and odd line endings -----------------------------------------------------------

case!(bare_lf_pipeline, |fx| {
    let bytes = fill(
        b"GET http://allowed.test:{p}/ HTTP/1.1\nHost: a\n\nGET http://denied.test:{p}/ HTTP/1.1\nHost: denied.test\n\n",
        fx.port,
    );
    let ex = fx.http(bytes, 2).await;
    for (i, r) in ex.responses.iter().enumerate() {
        assert!(i == 0 && r.status == 200 || (400..500).contains(&r.status), "[{}] {ex:?}", fx.name);
    }
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

case!(bare_lf_header_smuggles_host, |fx| {
    smuggle(&mut fx, "GET http://allowed.test:{p}/ HTTP/1.1\r\nX-A: 1\nHost: denied.test:{p}\r\n\r\n").await;
});

case!(lone_cr_header_separator, |fx| {
    smuggle(&mut fx, "GET http://allowed.test:{p}/ HTTP/1.1\r\nX-A: 1\rHost: denied.test:{p}\r\n\r\n").await;
});

case!(nul_inside_header_value, |fx| {
    smuggle(&mut fx, "GET http://allowed.test:{p}/ HTTP/1.1\r\nX-A: 1\0Host: denied.test:{p}\r\n\r\n").await;
});

// ----- pipelining -----------------------------------------------------------------------------

case!(pipelined_allowed_then_denied, |fx| {
    let bytes =
        fill(format!("GET http://allowed.test:{{p}}/one HTTP/1.1\r\nHost: a\r\n\r\n{DENIED_GET}").as_bytes(), fx.port);
    let ex = fx.http(bytes, 2).await;
    assert_eq!(ex.statuses(), vec![200, 403], "[{}] {ex:?}", fx.name);
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

case!(pipelined_denied_then_allowed, |fx| {
    let bytes =
        fill(format!("{DENIED_GET}GET http://allowed.test:{{p}}/two HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(), fx.port);
    let ex = fx.http(bytes, 2).await;
    assert_eq!(ex.statuses(), vec![403, 200], "[{}] {ex:?}", fx.name);
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

case!(pipelined_allowed_then_connect_denied, |fx| {
    let bytes = fill(
        b"GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\n\r\nCONNECT denied.test:{p} HTTP/1.1\r\nHost: denied.test:{p}\r\n\r\n",
        fx.port,
    );
    let ex = fx.http(bytes, 2).await;
    assert_eq!(ex.statuses(), vec![200, 403], "[{}] {ex:?}", fx.name);
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

case!(post_body_holding_a_denied_request, |fx| {
    // The body is data for the allowed origin, never a request of its own.
    let n = denied_get_len(fx.port);
    let t = format!("POST http://allowed.test:{{p}}/ HTTP/1.1\r\nHost: a\r\nContent-Length: {n}\r\n\r\n");
    let bytes = fill(format!("{t}{DENIED_GET}").as_bytes(), fx.port);
    let ex = fx.http(bytes, 1).await;
    assert_eq!(ex.statuses(), vec![200], "[{}] {ex:?}", fx.name);
    let seen = fx.allowed.seen();
    assert_eq!(seen.requests.len(), 1, "[{}] {seen:?}", fx.name);
    assert_eq!(seen.requests[0].body.len(), n, "[{}] {seen:?}", fx.name);
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

// ----- Expect: 100-continue -------------------------------------------------------------------

/// Reads what arrives within `wait`.
async fn read_for(s: &mut TcpStream, wait: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

case!(expect_continue_then_denied_on_same_connection, |fx| {
    let p = fx.port;
    let mut s = TcpStream::connect(fx.proxy()).await.unwrap();
    let head = format!(
        "POST http://allowed.test:{p}/up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let first = read_for(&mut s, Duration::from_millis(500)).await;
    let mut rest = b"hello".to_vec();
    rest.extend_from_slice(&fill(DENIED_GET.as_bytes(), p));
    s.write_all(&rest).await.unwrap();
    let more = read_for(&mut s, Duration::from_millis(1500)).await;
    let all = String::from_utf8_lossy(&[first, more].concat()).into_owned();
    assert!(all.contains(" 403 "), "[{}] the denied request was not refused: {all:?}", fx.name);
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

case!(expect_continue_denied_then_body_is_a_request, |fx| {
    // A denied request with Expect: the "body" the client then sends is a second denied request.
    let p = fx.port;
    let n = denied_get_len(p);
    let mut s = TcpStream::connect(fx.proxy()).await.unwrap();
    let head = format!(
        "POST http://denied.test:{p}/ HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: {n}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let first = read_for(&mut s, Duration::from_millis(500)).await;
    let _ = s.write_all(&fill(DENIED_GET.as_bytes(), p)).await;
    let more = read_for(&mut s, Duration::from_millis(1000)).await;
    let all = String::from_utf8_lossy(&[first, more].concat()).into_owned();
    assert!(all.starts_with("HTTP/1.1 403"), "[{}] {all:?}", fx.name);
    assert!(!all.contains(" 100 ") && !all.contains(" 200 "), "[{}] {all:?}", fx.name);
    fx.verdict(Expect::NOTHING).await;
});

case!(expect_continue_body_withheld_request_sent_instead, |fx| {
    // The allowed request's body never comes; a denied request arrives where it should be.
    let p = fx.port;
    let mut s = TcpStream::connect(fx.proxy()).await.unwrap();
    let n = denied_get_len(p);
    let head = format!(
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: {n}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&fill(DENIED_GET.as_bytes(), p)).await.unwrap();
    let all = read_for(&mut s, Duration::from_millis(1500)).await;
    let text = String::from_utf8_lossy(&all);
    assert!(!text.contains(crate::origins::DENIED_BODY), "[{}] {text:?}", fx.name);
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

// ----- keep-alive reuse -----------------------------------------------------------------------

case!(http10_keepalive_reuse_to_denied, |fx| {
    let bytes = fill(
        b"GET http://allowed.test:{p}/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET http://denied.test:{p}/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        fx.port,
    );
    let ex = fx.http(bytes, 2).await;
    assert_eq!(ex.statuses().first(), Some(&200), "[{}] {ex:?}", fx.name);
    assert!(ex.statuses().iter().skip(1).all(|s| *s == 403), "[{}] {ex:?}", fx.name);
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

case!(keepalive_reuse_to_guarded_name, |fx| {
    let bytes = fill(
        b"GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\n\r\nGET http://guarded.allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\n\r\n",
        fx.port,
    );
    let ex = fx.http(bytes, 2).await;
    assert_eq!(ex.statuses(), vec![200, 403], "[{}] {ex:?}", fx.name);
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

case!(keepalive_reuse_literal_to_guarded_literal, |fx| {
    let bytes = fill(
        b"GET http://127.0.0.1:{p}/ HTTP/1.1\r\nHost: a\r\n\r\nGET http://127.0.0.3:{p}/ HTTP/1.1\r\nHost: a\r\n\r\n",
        fx.port,
    );
    let ex = fx.http(bytes, 2).await;
    assert_eq!(ex.statuses(), vec![200, 403], "[{}] {ex:?}", fx.name);
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

case!(pooled_upstream_reuse_with_denied_host_header, |fx| {
    // The second request rides egressd's pooled upstream connection; its Host is rewritten.
    let bytes = fill(
        b"GET http://allowed.test:{p}/1 HTTP/1.1\r\nHost: a\r\n\r\nGET http://allowed.test:{p}/2 HTTP/1.1\r\nHost: denied.test:{p}\r\n\r\n",
        fx.port,
    );
    let ex = fx.http(bytes, 2).await;
    assert_eq!(ex.statuses(), vec![200, 200], "[{}] {ex:?}", fx.name);
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

// ----- upgrades and other protocols -----------------------------------------------------------

case!(upgrade_not_accepted_then_denied, |fx| {
    // The origin does not switch protocols: the bytes after must still be HTTP, decided anew.
    smuggle(
        &mut fx,
        "GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
});

case!(h2c_upgrade_then_denied, |fx| {
    smuggle(
        &mut fx,
        "GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
});

refused!(http2_preface_to_proxy, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET http://denied.test:{p}/ HTTP/1.1\r\n\r\n");
refused!(http09_request_line, "GET http://denied.test:{p}/\r\n\r\n");
refused!(lowercase_method_denied, "get http://denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
