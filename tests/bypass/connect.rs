//! CONNECT: bad authorities and ports, SNI against the CONNECT host both ways, missing and
//! doubled SNI, ClientHellos split into many writes or records, larger than 16 KiB (and than
//! egressd's 64 KiB bound), SSLv2/SSLv3 versions, ECH (the outer, cleartext SNI is the name
//! checked), and things that are not TLS at all. Per the contract egressd may dial the
//! allowed upstream before it reads the ClientHello, but no client byte may reach it until
//! the check passes: refused openings use [`Expect::DIAL_ONLY`].

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::{Hello, sslv2_hello};
use crate::{Expect, Fixture, fill};

const NO_GAP: Duration = Duration::ZERO;

/// `CONNECT allowed.test:P`, then `opening` in one write: it must be refused with no byte
/// reaching the allowed origin.
async fn opening_refused(fx: &mut Fixture, opening: &[u8]) {
    let t = fx.tunnel(&format!("allowed.test:{}", fx.port), &[opening], NO_GAP).await;
    assert_eq!(t.status, Some(200), "[{}] {t:?}", fx.name);
    t.assert_refused(fx.name);
    fx.verdict(Expect::DIAL_ONLY).await;
}

/// `CONNECT allowed.test:P`, then `chunks`: the allowed origin must receive all of them.
async fn opening_forwarded(fx: &mut Fixture, chunks: &[&[u8]], gap: Duration) {
    let t = fx.tunnel(&format!("allowed.test:{}", fx.port), chunks, gap).await;
    assert_eq!(t.status, Some(200), "[{}] {t:?}", fx.name);
    let want: Vec<u8> = chunks.concat();
    let raw = fx.allowed.raw();
    assert!(raw.starts_with(&want), "[{}] the allowed origin got {} of {} bytes", fx.name, raw.len(), want.len());
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
}

// ----- authority and port ---------------------------------------------------------------------

refused!(connect_missing_port, "CONNECT allowed.test HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
refused!(connect_missing_port_denied, "CONNECT denied.test HTTP/1.1\r\nHost: denied.test\r\n\r\n");
refused!(connect_port_zero, "CONNECT allowed.test:0 HTTP/1.1\r\nHost: allowed.test:0\r\n\r\n");
refused!(connect_port_65536, "CONNECT allowed.test:65536 HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
refused!(connect_port_negative, "CONNECT allowed.test:-1 HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
refused!(connect_port_plus_sign, "CONNECT allowed.test:+{p} HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
refused!(connect_port_empty, "CONNECT allowed.test: HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
refused!(connect_userinfo, "CONNECT allowed.test:{p}@denied.test:{p} HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
refused!(connect_absolute_uri, "CONNECT http://denied.test:{p}/ HTTP/1.1\r\nHost: denied.test\r\n\r\n");
refused!(connect_zone_id, "CONNECT [::1%lo]:{p} HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(connect_lowercase_method, "connect denied.test:{p} HTTP/1.1\r\nHost: denied.test:{p}\r\n\r\n");

case!(connect_port_wrapping_past_65535, |fx| {
    let wrapped = u32::from(fx.port) + 65536;
    fx.refuses(format!("CONNECT allowed.test:{wrapped} HTTP/1.1\r\nHost: allowed.test\r\n\r\n")).await;
});

case!(connect_guarded_name, |fx| {
    let t = fx.tunnel(&format!("guarded.allowed.test:{}", fx.port), &[], NO_GAP).await;
    assert_eq!(t.status, Some(403), "{t:?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(connect_name_resolving_to_guarded, |fx| {
    let t = fx.tunnel(&format!("rebind.allowed.test:{}", fx.port), &[], NO_GAP).await;
    assert_eq!(t.status, Some(403), "{t:?}");
    fx.verdict(Expect::upstream(&["rebind.allowed.test"])).await;
});

// ----- SNI against the CONNECT host -----------------------------------------------------------

case!(connect_denied_with_allowed_sni, |fx| {
    let hello = Hello::new("allowed.test").bytes();
    let t = fx.tunnel(&format!("denied.test:{}", fx.port), &[&hello], NO_GAP).await;
    assert_eq!(t.status, Some(403), "{t:?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(connect_denied_with_allowed_host_header_and_hello_pipelined, |fx| {
    let p = fx.port;
    let mut req = format!("CONNECT denied.test:{p} HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n").into_bytes();
    req.extend_from_slice(&Hello::new("allowed.test").bytes());
    let ex = fx.http(req, 2).await;
    ex.assert_refused(fx.name);
    assert_eq!(ex.statuses().first(), Some(&403), "{ex:?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(connect_allowed_with_denied_sni_in_the_connect_write, |fx| {
    // The ClientHello arrives in the same segment as the CONNECT head, so the HTTP parser
    // reads it first: it must still be checked, not forwarded as already-read bytes.
    let p = fx.port;
    let mut req = format!("CONNECT allowed.test:{p} HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n").into_bytes();
    req.extend_from_slice(&Hello::new("denied.test").bytes());
    let t = fx.tunnel_raw(&req, &[], NO_GAP).await;
    assert_eq!(t.status, Some(200), "{t:?}");
    t.assert_refused(fx.name);
    fx.verdict(Expect::DIAL_ONLY).await;
});

case!(connect_allowed_with_allowed_sni_in_the_connect_write, |fx| {
    // The same with the right SNI: the early bytes are the tunnel's first bytes. (The origin,
    // a plain HTTP server, closes on a ClientHello, so nothing is sent after it.)
    let p = fx.port;
    let hello = Hello::new("allowed.test").bytes();
    let mut req = format!("CONNECT allowed.test:{p} HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n").into_bytes();
    req.extend_from_slice(&hello);
    let t = fx.tunnel_raw(&req, &[], NO_GAP).await;
    assert_eq!(t.status, Some(200), "{t:?}");
    let want = hello;
    // The relay may still be copying the last chunk when the client side returns.
    let mut raw = fx.allowed.raw();
    for _ in 0..100 {
        if raw.len() >= want.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        raw = fx.allowed.raw();
    }
    assert!(raw.starts_with(&want), "[{}] the allowed origin got {} of {} bytes", fx.name, raw.len(), want.len());
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

case!(connect_allowed_with_denied_sni, |fx| {
    opening_refused(&mut fx, &Hello::new("denied.test").bytes()).await;
});

case!(connect_allowed_with_sibling_sni, |fx| {
    // tls.allowed.test is allowed too, but it is not the CONNECT host (domain fronting).
    opening_refused(&mut fx, &Hello::new("tls.allowed.test").bytes()).await;
});

case!(connect_allowed_with_ip_sni, |fx| {
    opening_refused(&mut fx, &Hello::new("127.0.0.3").bytes()).await;
});

case!(connect_ip_literal_with_denied_sni, |fx| {
    let t = fx.tunnel(&format!("127.0.0.1:{}", fx.port), &[&Hello::new("denied.test").bytes()], NO_GAP).await;
    assert_eq!(t.status, Some(200), "{t:?}");
    t.assert_refused(fx.name);
    fx.verdict(Expect::DIAL_ONLY).await;
});

case!(connect_no_sni, |fx| {
    opening_refused(&mut fx, &Hello::no_sni().bytes()).await;
});

case!(connect_two_sni_entries_allowed_first, |fx| {
    let mut h = Hello::new("allowed.test");
    h.server_names = vec![vec![(0, b"allowed.test".to_vec()), (0, b"denied.test".to_vec())]];
    opening_refused(&mut fx, &h.bytes()).await;
});

case!(connect_two_sni_entries_denied_first, |fx| {
    let mut h = Hello::new("allowed.test");
    h.server_names = vec![vec![(0, b"denied.test".to_vec()), (0, b"allowed.test".to_vec())]];
    opening_refused(&mut fx, &h.bytes()).await;
});

case!(connect_two_server_name_extensions, |fx| {
    let mut h = Hello::new("allowed.test");
    h.server_names = vec![vec![(0, b"allowed.test".to_vec())], vec![(0, b"denied.test".to_vec())]];
    opening_refused(&mut fx, &h.bytes()).await;
});

case!(connect_sni_name_type_not_host_name, |fx| {
    let mut h = Hello::new("allowed.test");
    h.server_names = vec![vec![(1, b"allowed.test".to_vec())]];
    opening_refused(&mut fx, &h.bytes()).await;
});

case!(connect_sni_with_nul, |fx| {
    opening_refused(&mut fx, &Hello::new("allowed.test\0.denied.test").bytes()).await;
});

case!(connect_sni_two_trailing_dots, |fx| {
    opening_refused(&mut fx, &Hello::new("allowed.test..").bytes()).await;
});

case!(connect_sni_noncanonical_ace_label, |fx| {
    // `xn--allowed-` decodes to `allowed`; it is no spelling of allowed.test.
    let t = fx.tunnel(&format!("allowed.test:{}", fx.port), &[&Hello::new("xn--allowed-.test").bytes()], NO_GAP).await;
    t.assert_refused(fx.name);
    fx.verdict(Expect::DIAL_ONLY).await;
});

case!(connect_sni_trailing_dot_is_the_same_name, |fx| {
    // Contract: equal means identical after normalisation (one trailing dot removed).
    let hello = Hello::new("ALLOWED.test.").bytes();
    opening_forwarded(&mut fx, &[&hello], NO_GAP).await;
});

// ----- ClientHello framing --------------------------------------------------------------------

case!(connect_hello_in_tiny_writes_denied_sni, |fx| {
    let hello = Hello::new("denied.test").bytes();
    let chunks: Vec<&[u8]> = hello.chunks(3).collect();
    let t = fx.tunnel(&format!("allowed.test:{}", fx.port), &chunks, Duration::from_millis(2)).await;
    assert_eq!(t.status, Some(200), "{t:?}");
    t.assert_refused(fx.name);
    fx.verdict(Expect::DIAL_ONLY).await;
});

case!(connect_hello_in_tiny_writes_allowed_sni_forwarded, |fx| {
    // Control for the case above: the same framing with the right SNI goes through whole.
    let hello = Hello::new("allowed.test").bytes();
    let chunks: Vec<&[u8]> = hello.chunks(3).collect();
    opening_forwarded(&mut fx, &chunks, Duration::from_millis(2)).await;
});

case!(connect_hello_in_one_byte_records_denied_sni, |fx| {
    let mut h = Hello::new("denied.test");
    h.fragment = 1;
    opening_refused(&mut fx, &h.bytes()).await;
});

case!(connect_hello_split_mid_record_header, |fx| {
    let hello = Hello::new("denied.test").bytes();
    let t = fx
        .tunnel(
            &format!("allowed.test:{}", fx.port),
            &[&hello[..2], &hello[2..4], &hello[4..]],
            Duration::from_millis(30),
        )
        .await;
    t.assert_refused(fx.name);
    fx.verdict(Expect::DIAL_ONLY).await;
});

case!(connect_hello_over_16k_denied_sni_in_second_record, |fx| {
    let mut h = Hello::new("denied.test");
    h.padding = 20_000;
    let bytes = h.bytes();
    assert!(bytes.len() > 16 * 1024 + 5);
    opening_refused(&mut fx, &bytes).await;
});

case!(connect_hello_over_16k_allowed_sni_forwarded, |fx| {
    let mut h = Hello::new("allowed.test");
    h.padding = 20_000;
    let bytes = h.bytes();
    opening_forwarded(&mut fx, &[&bytes], NO_GAP).await;
});

case!(connect_hello_over_64k, |fx| {
    // A matching SNI behind 65 500 bytes of padding: past egressd's 64 KiB buffering bound, so
    // refused however well-formed (fail closed, memory bounded).
    let mut h = Hello::new("allowed.test");
    h.padding = 65_500;
    let bytes = h.bytes();
    assert!(bytes.len() > 64 * 1024);
    opening_refused(&mut fx, &bytes).await;
});

case!(connect_record_version_sslv3_denied_sni, |fx| {
    let mut h = Hello::new("denied.test");
    h.record_version = 0x0300;
    opening_refused(&mut fx, &h.bytes()).await;
});

case!(connect_hello_version_sslv3, |fx| {
    let mut h = Hello::new("allowed.test");
    h.record_version = 0x0300;
    h.legacy_version = 0x0300;
    opening_refused(&mut fx, &h.bytes()).await;
});

case!(connect_sslv2_hello, |fx| {
    opening_refused(&mut fx, &sslv2_hello()).await;
});

case!(connect_record_version_major_2, |fx| {
    let mut h = Hello::new("allowed.test");
    h.record_version = 0x0203;
    opening_refused(&mut fx, &h.bytes()).await;
});

case!(connect_change_cipher_spec_inside_hello, |fx| {
    // First half of the hello, a ChangeCipherSpec record, then the rest.
    let mut h = Hello::new("denied.test");
    h.fragment = 40;
    let bytes = h.bytes();
    let mut mixed = bytes[..45].to_vec();
    mixed.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
    mixed.extend_from_slice(&bytes[45..]);
    opening_refused(&mut fx, &mixed).await;
});

// ----- ECH ------------------------------------------------------------------------------------

case!(connect_ech_outer_sni_denied, |fx| {
    let mut h = Hello::new("denied.test");
    h.ech = true;
    opening_refused(&mut fx, &h.bytes()).await;
});

case!(connect_ech_outer_sni_is_the_name_checked, |fx| {
    // The outer (cleartext) SNI decides; the inner name is invisible without inspection.
    let mut h = Hello::new("allowed.test");
    h.ech = true;
    let bytes = h.bytes();
    opening_forwarded(&mut fx, &[&bytes], NO_GAP).await;
});

case!(connect_ech_allowed_outer_on_denied_connect, |fx| {
    let mut h = Hello::new("allowed.test");
    h.ech = true;
    let t = fx.tunnel(&format!("denied.test:{}", fx.port), &[&h.bytes()], NO_GAP).await;
    assert_eq!(t.status, Some(403), "{t:?}");
    fx.verdict(Expect::NOTHING).await;
});

// ----- not TLS --------------------------------------------------------------------------------

case!(connect_http_inside_tunnel, |fx| {
    let req = fill(b"GET http://denied.test:{p}/ HTTP/1.1\r\nHost: denied.test:{p}\r\n\r\n", fx.port);
    opening_refused(&mut fx, &req).await;
});

case!(connect_ssh_banner, |fx| {
    opening_refused(&mut fx, b"SSH-2.0-OpenSSH_9.6\r\n").await;
});

case!(connect_handshake_record_not_client_hello, |fx| {
    // A handshake record holding a ServerHello (type 2).
    opening_refused(&mut fx, &[22, 3, 1, 0, 8, 2, 0, 0, 4, 3, 3, 0, 0]).await;
});

case!(connect_client_sends_nothing_and_closes, |fx| {
    let p = fx.port;
    let mut s = TcpStream::connect(fx.proxy()).await.unwrap();
    s.write_all(format!("CONNECT allowed.test:{p} HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, _) = crate::common::read_head(&mut s).await.unwrap();
    assert_eq!(status, 200);
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{rest:?}");
    fx.verdict(Expect::DIAL_ONLY).await;
});

case!(connect_partial_hello_then_silence, |fx| {
    // Half a hello, then nothing until egressd's header_timeout (1 s) ends the tunnel.
    let hello = Hello::new("allowed.test").bytes();
    let half = &hello[..hello.len() / 2];
    let p = fx.port;
    let mut s = TcpStream::connect(fx.proxy()).await.unwrap();
    s.write_all(format!("CONNECT allowed.test:{p} HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, _) = crate::common::read_head(&mut s).await.unwrap();
    assert_eq!(status, 200);
    s.write_all(half).await.unwrap();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(4), s.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "[{}] tunnel with half a ClientHello still open after 4 s", fx.name);
    fx.verdict(Expect::DIAL_ONLY).await;
});

// ----- real TLS -------------------------------------------------------------------------------

case!(connect_real_tls_with_other_name_fails_closed, |fx| {
    // rustls sends SNI tls.allowed.test (on the certificate) through CONNECT allowed.test.
    let p = fx.port;
    let mut s = TcpStream::connect(fx.proxy()).await.unwrap();
    s.write_all(format!("CONNECT allowed.test:{p} HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, _) = crate::common::read_head(&mut s).await.unwrap();
    assert_eq!(status, 200);
    let name = rustls::pki_types::ServerName::try_from("tls.allowed.test").unwrap();
    let connector = tokio_rustls::TlsConnector::from(crate::origins::client_config());
    let r = tokio::time::timeout(Duration::from_secs(3), connector.connect(name, s)).await;
    assert!(matches!(r, Ok(Err(_))), "[{}] handshake with a mismatched SNI completed", fx.name);
    fx.verdict(Expect::DIAL_ONLY).await;
});

case!(connect_real_tls_matching_name_control, |fx| {
    let p = fx.port;
    let mut s = TcpStream::connect(fx.proxy()).await.unwrap();
    s.write_all(format!("CONNECT tls.allowed.test:{p} HTTP/1.1\r\nHost: tls.allowed.test:{p}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, _) = crate::common::read_head(&mut s).await.unwrap();
    assert_eq!(status, 200);
    let name = rustls::pki_types::ServerName::try_from("tls.allowed.test").unwrap();
    let connector = tokio_rustls::TlsConnector::from(crate::origins::client_config());
    let mut tls = connector.connect(name, s).await.expect("TLS through an allowed tunnel");
    tls.write_all(b"GET /tls HTTP/1.1\r\nHost: tls.allowed.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), tls.read_to_end(&mut body)).await;
    assert!(String::from_utf8_lossy(&body).ends_with(crate::origins::ALLOWED_BODY), "{body:?}");
    assert_eq!(fx.allowed.seen().snis, vec!["tls.allowed.test".to_string()]);
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});
