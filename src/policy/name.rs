//! Name normalisation and strict IP-literal parsing.
//!
//! This module owns the single definition of "which host is this" used everywhere else in
//! egressd: DNS names are lowercased, one trailing dot is removed, IDNA (UTS #46) maps them
//! to canonical A-labels, and the result must be labels of `[a-z0-9_-]`, 1–63 octets each,
//! at most 253 in all. IP literals are accepted only in canonical form (strict dotted quad,
//! RFC 5952 / std-`Display` IPv6, `[v6]` in authority context); anything that merely looks
//! like a number (WHATWG "ends in a number") but is not canonical is refused. It also parses
//! `host:port` authorities, rule host patterns (`*.x`, `.x`, `*`) and validates raw DNS wire
//! labels. Every input is attacker-controlled: nothing here panics, and errors echo input
//! only in escaped (`{:?}`) and truncated form.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use idna::AsciiDenyList;
use idna::uts46::{DnsLength, Hyphens, Uts46};

/// Longest name in octets, without the trailing dot.
pub const MAX_NAME_LEN: usize = 253;
/// Longest label in octets.
pub const MAX_LABEL_LEN: usize = 63;
/// Inputs longer than this are refused before IDNA runs. UTS #46 can shrink input (ignored
/// code points, 3-byte full-width characters), so this is looser than [`MAX_NAME_LEN`] but
/// bounds the work one string can cause.
pub const MAX_INPUT_LEN: usize = 1024;
/// How much of an offending input an error message keeps.
const SNIPPET_CHARS: usize = 64;

/// A normalised DNS name: lowercase A-labels, no trailing dot, validated syntax.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Box<str>);

impl Name {
    /// The normalised text, e.g. `xn--bcher-kva.example`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Labels from the right: "a.b.c" -> ["c","b","a"].
    pub fn labels_rev(&self) -> impl Iterator<Item = &str> {
        self.0.rsplit('.')
    }

    /// Number of labels (a valid name has at least one).
    pub fn label_count(&self) -> usize {
        self.0.bytes().filter(|&b| b == b'.').count() + 1
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A normalised destination host.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Name(Name),
    /// IPv4-mapped IPv6 addresses stay `V6`; unmapping is the policy's decision.
    Ip(IpAddr),
}

impl fmt::Display for Host {
    /// IPv6 is shown without brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n.as_str()),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Why a name, host, authority or pattern was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name too long: {len} octets (at most 253, or 1024 octets of input)")]
    TooLong { len: usize },
    #[error("empty label (leading dot, \"..\" or more than one trailing dot)")]
    EmptyLabel,
    #[error("label {label:?} is {} octets long (at most 63)", .label.len())]
    LabelTooLong { label: String },
    #[error("character {ch:?} is not allowed in a name (letters, digits, '-', '_' only)")]
    BadChar { ch: char },
    #[error("IDNA (UTS #46) processing failed: invalid internationalised name or xn-- label")]
    Idna,
    #[error("{input:?} looks like an IP address but is not a canonical IP literal")]
    NonCanonicalIp { input: String },
    #[error("IPv6 zone identifiers ('%') are not allowed")]
    ZoneId,
    #[error("an IPv6 literal in an authority must be bracketed, e.g. [::1]:443")]
    UnbracketedIpv6,
    #[error("unbalanced or misplaced '[' / ']'")]
    BadBracket,
    #[error("userinfo ('@') is not allowed in an authority")]
    UserInfo,
    #[error("port must be 1-65535 in plain decimal digits without leading zeros")]
    BadPort,
    #[error("port is missing")]
    MissingPort,
    #[error("'*' is only allowed alone or as the whole leftmost label (\"*.example.org\")")]
    BadWildcard,
    #[error("IP literals are not valid host patterns")]
    PatternIsIp,
}

/// Normalise a DNS name (rule patterns' base, DNS queries, SNI). IP-looking names
/// (ends-in-a-number) are rejected with NonCanonicalIp.
pub fn normalize_name(input: &str) -> Result<Name, NameError> {
    let out = to_ascii_lower(input)?;
    if ends_in_number(&out) {
        return Err(NameError::NonCanonicalIp { input: snippet(input) });
    }
    check_syntax(&out)?;
    Ok(Name(out.into_boxed_str()))
}

/// Normalise a destination host as it appears in a URL, a CONNECT authority, a Host header or SNI:
/// `[v6]` → Ip (canonical only), canonical dotted quad → Ip, an unbracketed canonical IPv6 also → Ip,
/// an ends-in-a-number host that is not a canonical quad → NonCanonicalIp, otherwise normalize_name.
/// IP literals are recognised on the raw input only: full-width digits that UTS #46 maps to an
/// IPv4-looking name are refused, never turned into an address.
pub fn normalize_host(input: &str) -> Result<Host, NameError> {
    if input.is_empty() {
        return Err(NameError::Empty);
    }
    if let Some(rest) = input.strip_prefix('[') {
        let inner = rest.strip_suffix(']').ok_or(NameError::BadBracket)?;
        return match v6_literal(inner, input) {
            Ok(a) => Ok(Host::Ip(IpAddr::V6(a))),
            Err(NameError::BadChar { .. }) => Err(NameError::NonCanonicalIp { input: snippet(input) }),
            Err(e) => Err(e),
        };
    }
    if input.contains(['[', ']']) {
        return Err(NameError::BadBracket);
    }
    if input.contains(':') {
        return v6_literal(input, input).map(|a| Host::Ip(IpAddr::V6(a)));
    }
    if let Some(a) = parse_ipv4_strict(input) {
        return Ok(Host::Ip(IpAddr::V4(a)));
    }
    if input.len() <= MAX_INPUT_LEN && ends_in_number(input) {
        return Err(NameError::NonCanonicalIp { input: snippet(input) });
    }
    normalize_name(input).map(Host::Name)
}

/// Strict dotted quad: exactly 4 parts of 1–3 ASCII digits, 0–255, no leading zeros.
pub fn parse_ipv4_strict(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let p = parts.next()?.as_bytes();
        if p.is_empty() || p.len() > 3 || (p.len() > 1 && p.first() == Some(&b'0')) {
            return None;
        }
        let mut v: u16 = 0;
        for &b in p {
            if !b.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u16::from(b - b'0');
        }
        *octet = u8::try_from(v).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// Strict IPv6: `s` must parse with std and equal either std's `Display` output (which uses
/// dotted notation for IPv4-mapped addresses) or the pure-hex RFC 5952 rendering.
pub fn parse_ipv6_strict(s: &str) -> Option<Ipv6Addr> {
    if s.len() > 45 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b':' | b'.')) {
        return None;
    }
    let addr: Ipv6Addr = s.parse().ok()?;
    (addr.to_string() == s || rfc5952_hex(&addr) == s).then_some(addr)
}

/// Split and normalise an authority `host:port` or `[v6]:port` (no userinfo: '@' is malformed).
/// Ports with leading zeros (`0443`) are refused: only one spelling of each port is accepted.
/// Any unbracketed host with more than one ':' (`::1`, `::1:443`) is refused as UnbracketedIpv6.
pub fn parse_authority(input: &str) -> Result<(Host, Option<u16>), NameError> {
    if input.is_empty() {
        return Err(NameError::Empty);
    }
    if input.contains('@') {
        return Err(NameError::UserInfo);
    }
    let (host, port) = if input.starts_with('[') {
        let close = input.find(']').ok_or(NameError::BadBracket)?;
        let (h, after) = input.split_at(close + 1);
        if after.is_empty() { (h, None) } else { (h, Some(after.strip_prefix(':').ok_or(NameError::BadBracket)?)) }
    } else {
        match input.split_once(':') {
            None => (input, None),
            Some((_, p)) if p.contains(':') => return Err(NameError::UnbracketedIpv6),
            Some((h, p)) => (h, Some(p)),
        }
    };
    let host = normalize_host(host)?;
    let port = port.map(parse_port).transpose()?;
    Ok((host, port))
}

/// A rule's host pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// `example.org`: that name only.
    Exact(Name),
    /// `*.example.org`: every name strictly below, at any depth; not the apex.
    Below(Name),
    /// `.example.org`: the apex and every name below.
    ApexAndBelow(Name),
    /// `*`: every name.
    Any,
}

impl Pattern {
    /// The naive reference matcher (label-boundary correct).
    pub fn matches(&self, name: &Name) -> bool {
        match self {
            Pattern::Exact(n) => name == n,
            Pattern::Below(n) => strictly_below(name, n),
            Pattern::ApexAndBelow(n) => name == n || strictly_below(name, n),
            Pattern::Any => true,
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(n) => write!(f, "{n}"),
            Pattern::Below(n) => write!(f, "*.{n}"),
            Pattern::ApexAndBelow(n) => write!(f, ".{n}"),
            Pattern::Any => f.write_str("*"),
        }
    }
}

/// Parse a rule's host pattern; the part after `*.` / `.` is normalised like a name.
pub fn parse_pattern(input: &str) -> Result<Pattern, NameError> {
    if input == "*" {
        return Ok(Pattern::Any);
    }
    let (make, rest): (fn(Name) -> Pattern, &str) = if let Some(r) = input.strip_prefix("*.") {
        (Pattern::Below, r)
    } else if let Some(r) = input.strip_prefix('.') {
        (Pattern::ApexAndBelow, r)
    } else {
        (Pattern::Exact, input)
    };
    if rest.contains('*') {
        return Err(NameError::BadWildcard);
    }
    let zone_free = rest.split('%').next().unwrap_or(rest);
    if rest.starts_with('[')
        || matches!(normalize_host(rest), Ok(Host::Ip(_)))
        || (rest.contains(':') && zone_free.parse::<Ipv6Addr>().is_ok())
    {
        return Err(NameError::PatternIsIp);
    }
    match normalize_name(rest) {
        Ok(n) => Ok(make(n)),
        // A '*' produced by UTS #46 mapping (e.g. full-width asterisk).
        Err(NameError::BadChar { ch: '*' }) => Err(NameError::BadWildcard),
        Err(e) => Err(e),
    }
}

/// DNS wire labels: true if a raw label (bytes from a DNS message) is valid syntax for a name label:
/// 1..=63 bytes of [A-Za-z0-9_-] only (a '.', NUL, space, '\\' or any byte >= 0x80 inside a label is malformed).
pub fn wire_label_ok(label: &[u8]) -> bool {
    (1..=MAX_LABEL_LEN).contains(&label.len())
        && label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

// ---------------------------------------------------------------------------------------------

/// Lowercase A-label form of `input` with one trailing dot removed (syntax not yet checked).
fn to_ascii_lower(input: &str) -> Result<String, NameError> {
    if input.is_empty() {
        return Err(NameError::Empty);
    }
    if input.len() > MAX_INPUT_LEN {
        return Err(NameError::TooLong { len: input.len() });
    }
    if input.is_ascii() && !has_ace_label(input) {
        // Fast path: for ASCII without xn-- labels, UTS #46 ToASCII is exactly ASCII lowercasing.
        return Ok(input.strip_suffix('.').unwrap_or(input).to_ascii_lowercase());
    }
    let uts46 = Uts46::new();
    let mut out = uts46
        .to_ascii(input.as_bytes(), AsciiDenyList::URL, Hyphens::Allow, DnsLength::Ignore)
        .map_err(|_| NameError::Idna)?
        .into_owned();
    if out.ends_with('.') {
        out.pop();
    }
    if has_ace_label(&out) {
        // Refuse A-labels that are not the canonical encoding of their U-label (so two spellings
        // can never name one host): decode and re-encode must give back the same text.
        let (unicode, res) = uts46.to_unicode(out.as_bytes(), AsciiDenyList::URL, Hyphens::Allow);
        res.map_err(|_| NameError::Idna)?;
        let again = uts46
            .to_ascii(unicode.as_bytes(), AsciiDenyList::URL, Hyphens::Allow, DnsLength::Ignore)
            .map_err(|_| NameError::Idna)?;
        if again != out.as_str() {
            return Err(NameError::Idna);
        }
    }
    Ok(out)
}

/// True if any label starts with `xn--` (ASCII case-insensitive).
fn has_ace_label(s: &str) -> bool {
    s.split('.').any(|l| l.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("xn--")))
}

/// WHATWG URL "ends in a number": the last label (after removing one trailing dot) is all
/// ASCII digits, or `0x`/`0X` followed by zero or more hex digits.
fn ends_in_number(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    let last = s.rsplit('.').next().unwrap_or(s).as_bytes();
    match last {
        [] => false,
        [b'0', b'x' | b'X', hex @ ..] => hex.iter().all(u8::is_ascii_hexdigit),
        digits => digits.iter().all(u8::is_ascii_digit),
    }
}

/// The post-normalisation syntax check: LDH plus `_`, lowercase, label and name lengths.
fn check_syntax(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        let bad = label.chars().find(|&c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '_'));
        if let Some(ch) = bad {
            return Err(NameError::BadChar { ch });
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong { label: label.to_owned() });
        }
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: s.len() });
    }
    Ok(())
}

/// An IPv6 literal (without brackets): canonical → address; zone id → ZoneId; parseable but
/// non-canonical → NonCanonicalIp; not IPv6 at all → BadChar(':').
fn v6_literal(s: &str, orig: &str) -> Result<Ipv6Addr, NameError> {
    if let Some(a) = parse_ipv6_strict(s) {
        return Ok(a);
    }
    if s.split_once('%').is_some_and(|(addr, _zone)| addr.parse::<Ipv6Addr>().is_ok()) {
        return Err(NameError::ZoneId);
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        return Err(NameError::NonCanonicalIp { input: snippet(orig) });
    }
    Err(NameError::BadChar { ch: ':' })
}

/// RFC 5952 text form in pure hex: lowercase, no leading zeros, the longest (leftmost on tie)
/// run of two or more zero groups compressed to `::`.
fn rfc5952_hex(addr: &Ipv6Addr) -> String {
    let seg = addr.segments();
    let (mut best, mut best_len, mut i) = (0, 0, 0);
    while i < seg.len() {
        let start = i;
        while i < seg.len() && seg[i] == 0 {
            i += 1;
        }
        if i - start > best_len {
            (best, best_len) = (start, i - start);
        }
        i += 1;
    }
    let mut out = String::with_capacity(39);
    let hex = |out: &mut String, groups: &[u16]| {
        for (k, g) in groups.iter().enumerate() {
            let sep = if k == 0 { "" } else { ":" };
            let _ = write!(out, "{sep}{g:x}");
        }
    };
    if best_len >= 2 {
        hex(&mut out, &seg[..best]);
        out.push_str("::");
        hex(&mut out, &seg[best + best_len..]);
    } else {
        hex(&mut out, &seg);
    }
    out
}

/// Port: 1..=65535, 1–5 ASCII digits, no sign, no leading zero.
fn parse_port(p: &str) -> Result<u16, NameError> {
    let b = p.as_bytes();
    if b.len() > 5 || b.first().is_none_or(|&d| d == b'0') || !b.iter().all(u8::is_ascii_digit) {
        return Err(NameError::BadPort);
    }
    let v = b.iter().fold(0u32, |v, &d| v * 10 + u32::from(d - b'0'));
    u16::try_from(v).map_err(|_| NameError::BadPort)
}

/// `name` is `base` with one or more labels prepended.
fn strictly_below(name: &Name, base: &Name) -> bool {
    name.as_str().strip_suffix(base.as_str()).is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.'))
}

/// A short prefix of attacker input for error messages (always shown with `{:?}`).
fn snippet(s: &str) -> String {
    s.chars().take(SNIPPET_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use NameError::*;
    use proptest::prelude::*;

    fn name(s: &str) -> Name {
        match normalize_name(s) {
            Ok(n) => n,
            Err(e) => panic!("{s:?} should normalise: {e}"),
        }
    }

    fn lbl(c: char, n: usize) -> String {
        std::iter::repeat_n(c, n).collect()
    }

    fn v6(s: &str) -> Host {
        Host::Ip(IpAddr::V6(s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED)))
    }

    fn nci(s: &str) -> NameError {
        NonCanonicalIp { input: s.into() }
    }

    /// Independent re-statement of the output syntax rules.
    fn syntax_ok(s: &str) -> bool {
        let last = s.rsplit('.').next().unwrap_or("");
        let hex = last.strip_prefix("0x").map(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        let ldh = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
        !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| (1..=63).contains(&l.len()) && l.bytes().all(ldh))
            && !last.bytes().all(|b| b.is_ascii_digit())
            && hex != Some(true)
    }

    #[test]
    fn names_accepted() {
        let l63 = lbl('a', 63);
        let n253 = format!("{l63}.{l63}.{l63}.{}", lbl('b', 61));
        let cases: &[(&str, &str)] = &[
            ("Example.ORG", "example.org"),
            ("example.org.", "example.org"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("BÜCHER.example.", "xn--bcher-kva.example"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("XN--BCHER-KVA.Example", "xn--bcher-kva.example"),
            ("ｅｘａｍｐｌｅ．ｏｒｇ", "example.org"),
            ("example。org", "example.org"),
            ("_acme-challenge.example.org", "_acme-challenge.example.org"),
            ("r3---sn-abc.googlevideo.com", "r3---sn-abc.googlevideo.com"),
            ("example.0xg", "example.0xg"),
            ("1.2.3.4.in-addr.arpa", "1.2.3.4.in-addr.arpa"),
            ("localhost", "localhost"),
            ("123abc", "123abc"),
            (&l63, &l63),
            (&n253, &n253),
        ];
        for (input, want) in cases {
            let got = normalize_name(input).map(|n| n.to_string());
            assert_eq!(got.as_deref(), Ok(*want), "{input:?}");
        }
    }

    #[test]
    fn names_refused() {
        let (l63, l64) = (lbl('a', 63), lbl('a', 64));
        let n254 = format!("{l63}.{l63}.{l63}.{}", lbl('b', 62));
        let huge = lbl('a', 5000);
        let bad = |ch| Some(BadChar { ch });
        let cases: &[(&str, Option<NameError>)] = &[
            ("", Some(Empty)),
            (".", Some(Empty)),
            ("example.org..", Some(EmptyLabel)),
            ("a..b", Some(EmptyLabel)),
            (".a", Some(EmptyLabel)),
            ("a b.org", bad(' ')),
            ("a%.org", bad('%')),
            ("a%2e.org", bad('%')),
            ("a\\.org", bad('\\')),
            ("user@example.org", bad('@')),
            ("a\0.org", bad('\0')),
            ("a\t.org", bad('\t')),
            ("a\n.org", bad('\n')),
            ("*.example.org", bad('*')),
            ("ex*ample.org", bad('*')),
            ("a/b.org", bad('/')),
            ("a:b", bad(':')),
            ("[::1]", bad('[')),
            (&l64, Some(LabelTooLong { label: l64.clone() })),
            (&n254, Some(TooLong { len: 254 })),
            (&huge, Some(TooLong { len: 5000 })),
            ("xn--.example", Some(Idna)),
            ("xn--zz-.example", Some(Idna)),
            ("xn--a.example", Some(Idna)),
            ("xn--abc.example", Some(Idna)),
            ("xn--bcher-kva-.example", Some(Idna)),
            ("1.2.3.4", Some(nci("1.2.3.4"))),
            ("example.123", Some(nci("example.123"))),
            ("foo.0x1", Some(nci("foo.0x1"))),
            ("foo.0X", Some(nci("foo.0X"))),
            ("2130706433", Some(nci("2130706433"))),
            ("１２７.０.０.１", Some(nci("１２７.０.０.１"))),
            ("bücher example", None),
            ("a\u{FF0A}.org", None),
            ("\u{200B}", None),
            ("a\u{FF0F}b.org", None),
        ];
        for (input, want) in cases {
            let got = normalize_name(input);
            match want {
                Some(w) => assert_eq!(got.as_ref(), Err(w), "{input:?}"),
                None => assert!(got.is_err(), "{input:?} accepted as {got:?}"),
            }
        }
    }

    #[test]
    fn name_accessors() {
        let n = name("a.B.c.");
        assert_eq!(n.labels_rev().collect::<Vec<_>>(), ["c", "b", "a"]);
        assert_eq!((n.label_count(), name("org").label_count()), (3, 1));
        assert_eq!(n.as_ref(), "a.b.c");
    }

    #[test]
    fn ipv4_strict() {
        for s in "127.0.0.1 0.0.0.0 255.255.255.255 10.20.30.40".split(' ') {
            let want = s.parse::<Ipv4Addr>().ok();
            assert_eq!((parse_ipv4_strict(s), want.is_some()), (want, true), "{s:?}");
            assert_eq!(normalize_host(s), Ok(Host::Ip(IpAddr::V4(want.unwrap_or(Ipv4Addr::BROADCAST)))));
        }
        let malformed = "2130706433 0177.0.0.1 0x7f.1 0x7f000001 127.1 127.0.1 1.2.3.4.5 127.0.0.1. \
                         01.2.3.4 1.2.3.00 256.1.1.1 1.2.3.1000 +1.2.3.4 -1.2.3.4 ١.2.3.4 0X7F.1";
        let spaced = [" 1.2.3.4", "1.2.3.4 ", "1..3.4", "", "１.2.3.4", "1.2.3.4\0"];
        for s in malformed.split_whitespace().chain(spaced) {
            assert_eq!(parse_ipv4_strict(s), None, "{s:?}");
            let host = normalize_host(s);
            assert!(!matches!(host, Ok(Host::Ip(_))), "{s:?} -> {host:?}");
        }
        for s in malformed.split_whitespace().chain([" 1.2.3.4"]) {
            assert_eq!(normalize_host(s), Err(nci(s)), "{s:?}");
        }
    }

    #[test]
    fn ipv6_strict() {
        let ok = "::1 :: 2001:db8::1 fe80::1 2001:db8:0:1:1:1:1:1 1:: 2001:db8::1:0:0:1 \
                  ::ffff:a9fe:a9fe ::ffff:169.254.169.254";
        for s in ok.split_whitespace() {
            assert!(parse_ipv6_strict(s).is_some(), "{s:?}");
        }
        let mapped = parse_ipv6_strict("::ffff:a9fe:a9fe");
        assert_eq!(mapped, parse_ipv6_strict("::ffff:169.254.169.254"));
        let bad = "0:0:0:0:0:0:0:1 ::FFFF:1.2.3.4 ::ffff:A9FE:a9fe fe80::1%eth0 fe80::1%25eth0 \
                   2001:db8::0:1 2001:0db8::1 2001:db8:0:0:1:0:0:1 2001:db8::1:0:0:0:1 [::1] \
                   2001:db8:0:1:1:1:1:: :::1 1.2.3.4 ::ffff:01.2.3.4 ::0.0.0.1";
        for s in bad.split_whitespace().chain([" ::1", "::1 ", ""]) {
            assert_eq!(parse_ipv6_strict(s), None, "{s:?}");
        }
    }

    #[test]
    fn hosts() {
        let cases: &[(&str, Result<Host, NameError>)] = &[
            ("[::1]", Ok(v6("::1"))),
            ("::1", Ok(v6("::1"))),
            ("[::ffff:169.254.169.254]", Ok(v6("::ffff:a9fe:a9fe"))),
            ("[::ffff:a9fe:a9fe]", Ok(v6("::ffff:a9fe:a9fe"))),
            ("Bücher.Example.", Ok(Host::Name(name("xn--bcher-kva.example")))),
            ("fe80::1%eth0", Err(ZoneId)),
            ("[fe80::1%25eth0]", Err(ZoneId)),
            ("[0:0:0:0:0:0:0:1]", Err(nci("[0:0:0:0:0:0:0:1]"))),
            ("0:0:0:0:0:0:0:1", Err(nci("0:0:0:0:0:0:0:1"))),
            ("[::FFFF:1.2.3.4]", Err(nci("[::FFFF:1.2.3.4]"))),
            ("[1.2.3.4]", Err(nci("[1.2.3.4]"))),
            ("[example.org]", Err(nci("[example.org]"))),
            ("[::1", Err(BadBracket)),
            ("::1]", Err(BadBracket)),
            ("example.org:443", Err(BadChar { ch: ':' })),
            ("", Err(Empty)),
        ];
        for (input, want) in cases {
            assert_eq!(&normalize_host(input), want, "{input:?}");
        }
        assert_eq!(v6("::1").to_string(), "::1");
        assert_eq!(Host::Name(name("a.b")).to_string(), "a.b");
    }

    #[test]
    fn authorities() {
        let ex = || Host::Name(name("example.org"));
        type Auth = Result<(Host, Option<u16>), NameError>;
        let cases: Vec<(&str, Auth)> = vec![
            ("example.org:443", Ok((ex(), Some(443)))),
            ("EXAMPLE.org.:8080", Ok((ex(), Some(8080)))),
            ("example.org", Ok((ex(), None))),
            ("example.org:65535", Ok((ex(), Some(65535)))),
            ("example.org:1", Ok((ex(), Some(1)))),
            ("[::1]:443", Ok((v6("::1"), Some(443)))),
            ("[::1]", Ok((v6("::1"), None))),
            ("1.2.3.4:80", Ok((Host::Ip(IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4))), Some(80)))),
            ("::1:443", Err(UnbracketedIpv6)),
            ("::1", Err(UnbracketedIpv6)),
            ("example.org:443:443", Err(UnbracketedIpv6)),
            ("user@example.org:443", Err(UserInfo)),
            ("[::1]x", Err(BadBracket)),
            ("[::1]]:443", Err(BadBracket)),
            ("[::1:443", Err(BadBracket)),
            ("[fe80::1%25eth0]:443", Err(ZoneId)),
            ("[0:0:0:0:0:0:0:1]:443", Err(nci("[0:0:0:0:0:0:0:1]"))),
            ("127.1:80", Err(nci("127.1"))),
            (":443", Err(Empty)),
            ("", Err(Empty)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_authority(input), want, "{input:?}");
        }
        let bad_ports = ":0 :65536 :4294967739 :99999999999 : :+443 :-443 :0443 :00 :٤٤٣ :https :0x1bb";
        for p in bad_ports.split(' ').chain([": 443", ":443 "]) {
            for host in ["example.org", "[::1]"] {
                let a = format!("{host}{p}");
                assert_eq!(parse_authority(&a), Err(BadPort), "{a:?}");
            }
        }
    }

    #[test]
    fn patterns() {
        let ok: &[(&str, Pattern, &str)] = &[
            ("example.org", Pattern::Exact(name("example.org")), "example.org"),
            ("Example.ORG.", Pattern::Exact(name("example.org")), "example.org"),
            ("*.example.org", Pattern::Below(name("example.org")), "*.example.org"),
            (".example.org", Pattern::ApexAndBelow(name("example.org")), ".example.org"),
            ("*", Pattern::Any, "*"),
            ("*.bücher.example", Pattern::Below(name("xn--bcher-kva.example")), "*.xn--bcher-kva.example"),
        ];
        for (input, want, shown) in ok {
            assert_eq!(parse_pattern(input).as_ref(), Ok(want), "{input:?}");
            assert_eq!(want.to_string(), *shown);
            assert_eq!(parse_pattern(shown).as_ref(), Ok(want), "{shown:?}");
        }
        let wild = "*example.org f*.example.org a.*.example.org *.*.example.org **.x ** .* *.example.* \
                    *.\u{FF0A}.org example.org* *.*";
        let ips = "1.2.3.4 *.1.2.3.4 .1.2.3.4 ::1 [::1] *.[::1] 0:0::1 fe80::1%eth0 [fe80::1%25eth0]";
        let cases = wild.split(' ').map(|s| (s, BadWildcard));
        let cases = cases.chain(ips.split(' ').map(|s| (s, PatternIsIp)));
        let more = [("", Empty), ("*.", Empty), (".", Empty), ("..example.org", EmptyLabel)];
        let more = more.into_iter().chain([(" example.org", BadChar { ch: ' ' }), ("127.1", nci("127.1"))]);
        for (input, want) in cases.chain(more) {
            assert_eq!(parse_pattern(input), Err(want), "{input:?}");
        }
    }

    #[test]
    fn pattern_matching() {
        let table: &[(&str, &str, bool)] = &[
            ("example.org", "example.org", true),
            ("example.org", "www.example.org", false),
            ("*.example.org", "www.example.org", true),
            ("*.example.org", "a.b.c.example.org", true),
            ("*.example.org", "example.org", false),
            ("*.example.org", "badexample.org", false),
            ("*.example.org", "example.org.evil", false),
            (".example.org", "example.org", true),
            (".example.org", "a.example.org", true),
            (".example.org", "badexample.org", false),
            (".example.org", "org", false),
            ("*", "anything.at.all", true),
        ];
        for (pat, n, want) in table {
            let p = parse_pattern(pat).unwrap_or(Pattern::Exact(name("never.invalid")));
            assert_eq!(p.matches(&name(n)), *want, "{pat} vs {n}");
        }
    }

    #[test]
    fn wire_labels() {
        let (l63, l64) = (lbl('a', 63), lbl('a', 64));
        for ok in [b"a".as_slice(), b"A-z_0", l63.as_bytes(), b"xn--bcher-kva"] {
            assert!(wire_label_ok(ok), "{ok:?}");
        }
        let bad = [b"".as_slice(), l64.as_bytes(), b"a.b", b"a\0", b"a b", b"a\\b", b"\xc3\xbc", b"a*"];
        for b in bad {
            assert!(!wire_label_ok(b), "{b:?}");
        }
    }

    #[test]
    fn error_messages_escape_input() {
        let msg = normalize_host("127.1\n\u{1b}\u{7}x.1").err().map(|e| e.to_string());
        let msg = msg.unwrap_or_default();
        assert!(msg.contains("127.1") && !msg.contains(['\n', '\u{1b}']), "{msg}");
    }

    fn hostish() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-zA-Z0-9_.\\-*:%@\\[\\] ]{0,40}",
            "\\[?[0-9a-fA-FxX.:%]{0,45}\\]?(:[0-9]{0,6})?",
            "[a-zß-ü．。ｘｎ０-９\u{AD}\u{200D}\u{FF0A}.\\-]{0,30}",
            "\\*?\\.?(xn--[a-z0-9\\-]{0,12}\\.){1,3}[a-z]{2,4}\\.?",
        ]
    }

    proptest! {
        #[test]
        fn never_panics_and_ips_are_canonical(s in hostish()) {
            let _ = (parse_pattern(&s), wire_label_ok(s.as_bytes()));
            if let Ok((Host::Ip(ip), _)) = parse_authority(&s) {
                let host = s.rsplit_once(':').filter(|_| s.starts_with('[')).map_or(&*s, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let canonical = ip.to_string() == host
                    || matches!(ip, IpAddr::V6(a) if rfc5952_hex(&a) == host);
                prop_assert!(canonical, "{:?} -> {:?}", s, ip);
            }
            if let Ok(Host::Ip(ip)) = normalize_host(&s) {
                let t = s.trim_start_matches('[').trim_end_matches(']');
                let canonical = ip.to_string() == t || matches!(ip, IpAddr::V6(a) if rfc5952_hex(&a) == t);
                prop_assert!(canonical, "{:?} -> {:?}", s, ip);
            }
        }

        #[test]
        fn normalize_name_idempotent_and_valid(s in hostish()) {
            if let Ok(n) = normalize_name(&s) {
                prop_assert!(syntax_ok(n.as_str()), "{:?} -> {:?}", s, n);
                prop_assert_eq!(normalize_name(n.as_str()), Ok(n.clone()));
                prop_assert_eq!(normalize_host(n.as_str()), Ok(Host::Name(n)));
            }
        }

        #[test]
        fn pattern_display_round_trips(s in hostish()) {
            if let Ok(p) = parse_pattern(&s) {
                prop_assert_eq!(parse_pattern(&p.to_string()), Ok(p));
            }
        }

        #[test]
        fn canonical_ips_round_trip(v4 in any::<u32>(), v6 in any::<u128>()) {
            let a4 = Ipv4Addr::from(v4);
            prop_assert_eq!(parse_ipv4_strict(&a4.to_string()), Some(a4));
            let a6 = Ipv6Addr::from(v6);
            prop_assert_eq!(parse_ipv6_strict(&a6.to_string()), Some(a6));
            prop_assert_eq!(parse_ipv6_strict(&rfc5952_hex(&a6)), Some(a6));
            let auth = parse_authority(&format!("[{a6}]:443"));
            prop_assert_eq!(auth, Ok((Host::Ip(IpAddr::V6(a6)), Some(443))));
        }

        #[test]
        fn ports_never_wrap(p in prop_oneof![any::<u64>(), 0u64..70000]) {
            let got = parse_authority(&format!("example.org:{p}")).map(|(_, port)| port);
            let want = u16::try_from(p).ok().filter(|&v| v != 0).map(Some).ok_or(BadPort);
            prop_assert_eq!(got, want);
        }
    }
}
