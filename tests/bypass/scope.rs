//! Rule scope: a rule reaches exactly as far as written. Deny wins over a more specific allow,
//! an `applies_to = ["dns"]` rule opens nothing for the proxy (and the reverse), and a rule for
//! other `clients` opens nothing for this one, whatever headers claim about the client.

use crate::wire::{self, A, dns_query, labels};
use crate::{Expect, origins};

case!(deny_wins_over_more_specific_allow_proxy, |fx| {
    // `allow-inside-denied` names www.denied.test exactly; `.denied.test` denies it.
    let p = fx.port;
    let ex = fx.http(format!("GET http://www.denied.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    assert_eq!(ex.responses[0].deny_field("rule"), "denied", "{ex:?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(deny_wins_over_more_specific_allow_connect, |fx| {
    let t = fx.tunnel(&format!("www.denied.test:{}", fx.port), &[], std::time::Duration::ZERO).await;
    assert_eq!(t.status, Some(403), "{t:?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(deny_wins_over_more_specific_allow_dns, |fx| {
    // www.denied.test is in [hosts] (127.0.0.2): a wrong allow would answer it locally.
    let reply = fx.dns_udp(&dns_query(0x5151, &labels("www.denied.test"), A)).await.expect("reply");
    assert_eq!(wire::rcode(&reply), 3, "{reply:02x?}");
    assert!(wire::reply_addresses(&reply).is_empty(), "{reply:02x?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(dns_only_rule_opens_nothing_for_the_proxy, |fx| {
    // a.tunnel.test is allowed for DNS only; [hosts] points it at the denied origin.
    let p = fx.port;
    let ex = fx.http(format!("GET http://a.tunnel.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    fx.verdict(Expect::NOTHING).await;
});

case!(dns_only_rule_opens_nothing_for_connect, |fx| {
    let hello = crate::wire::Hello::new("a.tunnel.test").bytes();
    let t = fx.tunnel(&format!("a.tunnel.test:{}", fx.port), &[&hello], std::time::Duration::ZERO).await;
    assert_eq!(t.status, Some(403), "{t:?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(proxy_only_rule_opens_nothing_for_dns, |fx| {
    let reply = fx.dns_udp(&dns_query(0x5252, &labels("x.proxyonly.test"), A)).await.expect("reply");
    assert_eq!(wire::rcode(&reply), 3, "{reply:02x?}");
    fx.verdict(Expect::NOTHING).await;
});

case!(client_scoped_rule_opens_nothing_for_other_clients, |fx| {
    let p = fx.port;
    let ex = fx.http(format!("GET http://a.clientscoped.test:{p}/ HTTP/1.1\r\nHost: x\r\n\r\n"), 1).await;
    ex.assert_denied_at(fx.name, 0);
    fx.verdict(Expect::NOTHING).await;
});

case!(forwarded_headers_do_not_change_the_client, |fx| {
    // The client is the socket's peer; headers naming an address in `clients` change nothing.
    let p = fx.port;
    let req = format!(
        "GET http://a.clientscoped.test:{p}/ HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.9.0.1\r\n\
         Forwarded: for=10.9.0.1\r\nX-Real-IP: 10.9.0.1\r\nTrue-Client-IP: 10.9.0.1\r\n\r\n"
    );
    let ex = fx.http(req, 1).await;
    ex.assert_denied_at(fx.name, 0);
    assert!(!ex.raw.windows(origins::DENIED_BODY.len()).any(|w| w == origins::DENIED_BODY.as_bytes()));
    fx.verdict(Expect::NOTHING).await;
});

case!(client_scoped_rule_opens_nothing_in_dns, |fx| {
    let reply = fx.dns_udp(&dns_query(0x5353, &labels("b.clientscoped.test"), A)).await.expect("reply");
    assert_eq!(wire::rcode(&reply), 3, "{reply:02x?}");
    fx.verdict(Expect::NOTHING).await;
});
