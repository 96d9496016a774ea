//! URL confusion: two parsers reading one request target (or its `Host`) differently. Each
//! case names the host a confused parser would pick; egressd must refuse, or (where the
//! contract says the request is well-formed) send it only to the host the URI's authority
//! names. `{p}` is the origin port.

use crate::Expect;

// ----- userinfo -------------------------------------------------------------------------------

// RFC 3986 host: denied.test; a parser that stops at the first ':' or '@' sees allowed.test.
refused!(
    userinfo_allowed_at_denied,
    "GET http://allowed.test:{p}@denied.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n"
);
refused!(
    userinfo_no_port_allowed_at_denied,
    "GET http://allowed.test@denied.test:{p}/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
);
refused!(userinfo_with_password, "GET http://allowed.test:secret@denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
// WHATWG treats '\' as '/', so its host is denied.test; an RFC parser sees userinfo.
refused!(
    backslash_userinfo_denied_first,
    "GET http://denied.test:{p}\\@allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n"
);
refused!(backslash_slashes, "GET http:\\\\denied.test:{p}\\ HTTP/1.1\r\nHost: denied.test\r\n\r\n");
refused!(backslash_inside_host, "GET http://allowed.test\\.denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

// ----- fragments and '#@' ---------------------------------------------------------------------

case!(fragment_at_allowed_first, |fx| {
    // RFC 3986 and WHATWG agree: the authority ends at '#', the host is allowed.test. A parser
    // that searched for the last '@' would pick denied.test. egressd's HTTP stack (the `http`
    // crate) drops a fragment from a request target; what matters here is that the request can
    // only go to allowed.test and that the fragment never reaches it.
    let p = fx.port;
    let ex = fx.http(format!("GET http://allowed.test:{p}#@denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    assert!(ex.statuses() == vec![200] || ex.statuses() == vec![400], "{ex:?}");
    for r in fx.allowed.seen().requests {
        assert!(!r.uri.contains('#') && !r.uri.contains("denied"), "[{}] the fragment was forwarded: {r:?}", fx.name);
    }
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});
refused!(fragment_at_denied_first, "GET http://denied.test:{p}#@allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(fragment_after_path, "GET http://denied.test:{p}/#http://allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

case!(query_with_at_sign_goes_to_the_authority_host, |fx| {
    // `?@denied...` is a query: the target is allowed.test, and only it may see the request.
    let p = fx.port;
    let ex = fx.http(format!("GET http://allowed.test:{p}/?@denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    assert_eq!(ex.statuses(), vec![200], "{ex:?}");
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

// ----- percent-encoding and NUL ---------------------------------------------------------------

refused!(percent_encoded_host_letter, "GET http://%64enied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(percent_encoded_dot, "GET http://denied%2etest:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(percent_encoded_at, "GET http://allowed.test%40denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(percent_encoded_nul_in_host, "GET http://denied.test%00.allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(percent_encoded_colon_port, "GET http://denied.test%3a{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(raw_nul_in_host, b"GET http://denied.test\0.allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(raw_nul_after_target, b"GET http://denied.test:{p}/\0 HTTP/1.1\r\nHost: x\r\n\r\n");

// ----- whitespace and control characters in the request line ----------------------------------

refused!(tab_separated_request_line, "GET\thttp://denied.test:{p}/\tHTTP/1.1\r\nHost: x\r\n\r\n");
refused!(
    two_targets_in_request_line,
    "GET http://allowed.test:{p}/ http://denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"
);
refused!(space_inside_authority, "GET http://allowed.test :{p}@denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(
    lone_cr_in_request_line,
    "GET http://allowed.test:{p}/\rGET http://denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"
);
refused!(vertical_tab_in_host, "GET http://denied.test\x0b.allowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(leading_space_before_method, " GET http://denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(encoded_crlf_in_host, "GET http://allowed.test%0d%0aHost:denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

// ----- Host header against the absolute URI ---------------------------------------------------

case!(absolute_allowed_with_denied_host_header, |fx| {
    // Routing follows the URI; the origin gets `Host` rewritten to the URI's authority.
    let p = fx.port;
    let ex = fx.http(format!("GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: denied.test:{p}\r\n\r\n"), 1).await;
    assert_eq!(ex.statuses(), vec![200], "{ex:?}");
    let seen = fx.allowed.seen();
    assert_eq!(seen.requests.len(), 1, "{seen:?}");
    assert_eq!(seen.requests[0].host, format!("allowed.test:{p}"), "{seen:?}");
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

case!(absolute_denied_with_allowed_host_header, |fx| {
    let p = fx.port;
    let ex = fx.http(format!("GET http://denied.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    fx.verdict(Expect::NOTHING).await;
});

case!(two_host_headers_second_denied, |fx| {
    // Whatever egressd answers, the origin must never see the denied name as Host.
    let p = fx.port;
    let req =
        format!("GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\nHost: denied.test:{p}\r\n\r\n");
    let ex = fx.http(req, 1).await;
    assert!(ex.statuses().iter().all(|s| *s == 200 || *s == 400), "{ex:?}");
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

case!(control_bytes_in_host_header, |fx| {
    let p = fx.port;
    let req = format!("GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test\x01denied.test\r\n\r\n");
    let ex = fx.http(req, 1).await;
    assert!(ex.statuses().iter().all(|s| *s == 200 || *s == 400), "{ex:?}");
    fx.verdict(Expect::ALLOWED_TRAFFIC).await;
});

refused!(origin_form_with_denied_host, "GET / HTTP/1.1\r\nHost: denied.test:{p}\r\n\r\n");
refused!(origin_form_with_allowed_host, "GET / HTTP/1.1\r\nHost: allowed.test:{p}\r\n\r\n");
refused!(asterisk_form_options, "OPTIONS * HTTP/1.1\r\nHost: denied.test:{p}\r\n\r\n");

// ----- schemes other than http ----------------------------------------------------------------

refused!(scheme_https_absolute_form, "GET https://denied.test:{p}/ HTTP/1.1\r\nHost: denied.test\r\n\r\n");
refused!(scheme_https_allowed_host, "GET https://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
refused!(scheme_ftp, "GET ftp://denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(
    scheme_ws,
    "GET ws://denied.test:{p}/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
);
refused!(scheme_file, "GET file://denied.test/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(scheme_gopher, "GET gopher://denied.test:{p}/_GET%20/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(scheme_uppercase_denied, "GET HTTP://DENIED.TEST:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(scheme_relative_target, "GET //denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(scheme_without_slashes, "GET http:denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(empty_host, "GET http://:{p}/ HTTP/1.1\r\nHost: denied.test\r\n\r\n");

// ----- IPv6 zone ids --------------------------------------------------------------------------

refused!(zone_id_loopback_v6, "GET http://[::1%25lo]:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(zone_id_raw_percent, "GET http://[::1%lo]:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(zone_id_mapped_guarded, "GET http://[::ffff:127.0.0.3%25lo]:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(zone_id_link_local, "GET http://[fe80::1%25lo]:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

// ----- name spellings of the denied host ------------------------------------------------------

case!(denied_name_trailing_dot, |fx| {
    let p = fx.port;
    let ex = fx.http(format!("GET http://denied.test.:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    fx.verdict(Expect::NOTHING).await;
});

case!(denied_name_mixed_case, |fx| {
    let p = fx.port;
    let ex = fx.http(format!("GET http://DeNiEd.TeSt:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    fx.verdict(Expect::NOTHING).await;
});

refused!(denied_name_two_trailing_dots, "GET http://denied.test..:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(denied_name_leading_dot, "GET http://.denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(suffix_lookalike_not_below_allowed, "GET http://notallowed.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(allowed_name_as_prefix_of_denied, "GET http://allowed.test.denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(
    fullwidth_letters_denied,
    "GET http://\u{ff44}\u{ff45}\u{ff4e}\u{ff49}\u{ff45}\u{ff44}.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"
);
refused!(ideographic_full_stop, "GET http://denied\u{3002}test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
// `xn--allowed-` decodes to `allowed`: a normaliser that accepted it would decide on allowed.test
// and send a name that is no allowed name to the upstream.
refused!(noncanonical_ace_label, "GET http://xn--allowed-.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

// ----- ports ----------------------------------------------------------------------------------

refused!(port_leading_zero, "GET http://allowed.test:0{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");
refused!(port_twice, "GET http://allowed.test:{p}:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n");

case!(port_wrapping_past_65535, |fx| {
    // P + 65536 truncated to 16 bits is P, the allowed port: it must not be read that way.
    let wrapped = u32::from(fx.port) + 65536;
    fx.refuses(format!("GET http://allowed.test:{wrapped}/ HTTP/1.1\r\nHost: x\r\n\r\n")).await;
});
