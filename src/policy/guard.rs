//! Destination-address guard: the addresses the proxy never connects to. This module
//! owns the default deny table (`[guard] deny_cidrs = "special-purpose"`: the IANA IPv4
//! and IPv6 Special-Purpose Address Registries in full, cloud metadata endpoints,
//! multicast, reserved and deprecated ranges), the `allow_cidrs` holes punched into it,
//! the extraction of IPv4 addresses embedded in IPv6 addresses (mapped, compatible,
//! SIIT-translated, NAT64, 6to4, Teredo), and [`CidrSet`], the sorted-and-merged range
//! set that makes every check O(log n). It is pure: no I/O, no DNS, no allocation on the
//! check path.
//!
//! The rule: an address is refused iff one of its *forms* (the address itself, or an
//! IPv4 address embedded in it) lies inside a deny range and outside every allow range
//! of that form's family. Allow holes apply per form, so `allow_cidrs = ["127.0.0.0/8"]`
//! permits `127.0.0.1` while `::ffff:127.0.0.1` stays refused by the `::ffff:0:0/96`
//! deny range: the conservative reading.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

// ---------------------------------------------------------------------------------------
// CidrSet
// ---------------------------------------------------------------------------------------

/// A set of CIDRs with fast containment (sorted, merged ranges per family, binary search).
///
/// Nets are stored with their host bits cleared (`10.0.0.1/8` is kept as `10.0.0.0/8`),
/// deduplicated, in the order first given. Containment uses merged inclusive ranges
/// (overlapping and adjacent nets coalesce) and one binary search; [`CidrSet::find`]
/// does one binary search per distinct prefix length present, most specific first.
#[derive(Clone, Debug, Default)]
pub struct CidrSet {
    nets: Vec<IpNet>,
    v4: Family,
    v6: Family,
}

/// One address family of a [`CidrSet`], with addresses widened to `u128`.
#[derive(Clone, Debug, Default)]
struct Family {
    /// Merged, sorted, non-overlapping, non-adjacent inclusive ranges.
    ranges: Vec<(u128, u128)>,
    /// Per prefix length (longest first): sorted `(network, index into nets)`.
    by_len: Vec<(u8, Vec<(u128, usize)>)>,
}

/// The netmask of a `len`-bit prefix in a `bits`-bit address family, as a `u128`.
fn prefix_mask(len: u8, bits: u8) -> u128 {
    let bits = bits.min(128);
    let len = len.min(bits);
    let family = 1u128.checked_shl(u32::from(bits)).map_or(u128::MAX, |v| v - 1);
    let host = 1u128.checked_shl(u32::from(bits - len)).map_or(u128::MAX, |v| v - 1);
    family & !host
}

impl Family {
    fn build(entries: &[(u128, u8, usize)], bits: u8) -> Self {
        let mut ranges: Vec<(u128, u128)> = entries
            .iter()
            .map(|&(net, len, _)| (net, net | (!prefix_mask(len, bits) & prefix_mask(bits, bits))))
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        let mut groups: HashMap<u8, Vec<(u128, usize)>> = HashMap::new();
        for &(net, len, idx) in entries {
            groups.entry(len).or_default().push((net, idx));
        }
        let mut by_len: Vec<(u8, Vec<(u128, usize)>)> = groups.into_iter().collect();
        for (_, list) in &mut by_len {
            list.sort_unstable();
        }
        by_len.sort_unstable_by_key(|(len, _)| std::cmp::Reverse(*len));
        Self { ranges: merged, by_len }
    }

    fn contains(&self, x: u128) -> bool {
        let idx = self.ranges.partition_point(|&(start, _)| start <= x);
        idx.checked_sub(1).and_then(|i| self.ranges.get(i)).is_some_and(|&(_, end)| x <= end)
    }

    fn find(&self, x: u128, bits: u8) -> Option<usize> {
        self.by_len.iter().find_map(|(len, list)| {
            let key = x & prefix_mask(*len, bits);
            list.binary_search_by_key(&key, |&(net, _)| net).ok().and_then(|i| list.get(i)).map(|&(_, idx)| idx)
        })
    }
}

impl CidrSet {
    /// Builds the set; duplicates (after clearing host bits) are dropped.
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let mut seen = HashSet::new();
        let mut kept = Vec::new();
        for net in nets {
            let net = net.trunc();
            if seen.insert(net) {
                kept.push(net);
            }
        }
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (idx, net) in kept.iter().enumerate() {
            match net {
                IpNet::V4(n) => v4.push((u128::from(u32::from(n.network())), n.prefix_len(), idx)),
                IpNet::V6(n) => v6.push((u128::from(n.network()), n.prefix_len(), idx)),
            }
        }
        Self { v4: Family::build(&v4, 32), v6: Family::build(&v6, 128), nets: kept }
    }

    /// Whether `ip` lies in any net of the set. O(log n).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.contains(u128::from(u32::from(a))),
            IpAddr::V6(a) => self.v6.contains(u128::from(a)),
        }
    }

    /// True if the set holds no net.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// The number of distinct nets given.
    pub fn len(&self) -> usize {
        self.nets.len()
    }

    /// The most specific given net containing `ip` (for explanations).
    pub fn find(&self, ip: IpAddr) -> Option<IpNet> {
        self.find_index(ip).and_then(|i| self.nets.get(i).copied())
    }

    /// The nets as given (host bits cleared, duplicates dropped), for printing.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    fn find_index(&self, ip: IpAddr) -> Option<usize> {
        match ip {
            IpAddr::V4(a) => self.v4.find(u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => self.v6.find(u128::from(a), 128),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The special-purpose table
// ---------------------------------------------------------------------------------------

/// One entry of the special-purpose table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialRange {
    /// The range.
    pub net: IpNet,
    /// What it is, for explanations ("loopback", "cloud metadata (AWS IMDS)", …).
    pub what: &'static str,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8, what: &'static str) -> SpecialRange {
    // Evaluated at compile time only (the table is a `static`): an invalid prefix length
    // is a build error, never a run-time panic.
    SpecialRange { net: IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)), what }
}

const fn v6(s: [u16; 8], len: u8, what: &'static str) -> SpecialRange {
    SpecialRange {
        net: IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]), len)),
        what,
    }
}

/// The default deny table: the IANA IPv4 and IPv6 Special-Purpose Address Registries in
/// full (including the entries the registry marks globally reachable, such as the AS112
/// and anycast ones: the proxy has no business connecting to them), cloud metadata and
/// platform endpoints, multicast, reserved and deprecated ranges.
///
/// Deliberately *absent*: `64:ff9b::/96` (RFC 6052 NAT64 well-known prefix). It is
/// globally reachable, and the IPv4 address it embeds is checked on its own, so
/// `64:ff9b::808:808` is permitted while `64:ff9b::a9fe:a9fe` is refused.
static SPECIAL_PURPOSE: &[SpecialRange] = &[
    // ----- IANA IPv4 Special-Purpose Address Registry -----
    // RFC 791 §3.2: "this network"; Linux connects 0.0.0.0 to the local host.
    v4(0, 0, 0, 0, 8, "\"this network\""),
    // RFC 1122 §3.2.1.3: "this host on this network".
    v4(0, 0, 0, 0, 32, "\"this host\" (unspecified)"),
    // RFC 1918: private-use.
    v4(10, 0, 0, 0, 8, "private-use"),
    // RFC 6598: shared address space (carrier-grade NAT).
    v4(100, 64, 0, 0, 10, "shared address space (CGNAT)"),
    // RFC 1122 §3.2.1.3: loopback.
    v4(127, 0, 0, 0, 8, "loopback"),
    // RFC 3927: link-local (cloud metadata, DNS and time services live here).
    v4(169, 254, 0, 0, 16, "link-local"),
    // RFC 1918: private-use.
    v4(172, 16, 0, 0, 12, "private-use"),
    // RFC 6890 §2.1: IETF protocol assignments.
    v4(192, 0, 0, 0, 24, "IETF protocol assignments"),
    // RFC 7335: IPv4 service continuity prefix (DS-Lite B4/AFTR).
    v4(192, 0, 0, 0, 29, "IPv4 service continuity prefix"),
    // RFC 7600: IPv4 dummy address.
    v4(192, 0, 0, 8, 32, "IPv4 dummy address"),
    // RFC 7723: Port Control Protocol anycast.
    v4(192, 0, 0, 9, 32, "PCP anycast"),
    // RFC 8155: TURN anycast.
    v4(192, 0, 0, 10, 32, "TURN anycast"),
    // RFC 7050 / RFC 8880: NAT64/DNS64 discovery (ipv4only.arpa).
    v4(192, 0, 0, 170, 32, "NAT64/DNS64 discovery"),
    // RFC 7050 / RFC 8880: NAT64/DNS64 discovery (ipv4only.arpa).
    v4(192, 0, 0, 171, 32, "NAT64/DNS64 discovery"),
    // RFC 5737: documentation (TEST-NET-1).
    v4(192, 0, 2, 0, 24, "documentation (TEST-NET-1)"),
    // RFC 7535: AS112-v4 (DNS sink for private reverse zones).
    v4(192, 31, 196, 0, 24, "AS112-v4"),
    // RFC 7450: Automatic Multicast Tunneling relay anycast.
    v4(192, 52, 193, 0, 24, "AMT"),
    // RFC 7526: deprecated 6to4 relay anycast.
    v4(192, 88, 99, 0, 24, "deprecated (6to4 relay anycast)"),
    // RFC 6751: 6a44 relay anycast address.
    v4(192, 88, 99, 2, 32, "6a44 relay anycast"),
    // RFC 1918: private-use.
    v4(192, 168, 0, 0, 16, "private-use"),
    // RFC 7534: direct delegation AS112 service.
    v4(192, 175, 48, 0, 24, "direct delegation AS112 service"),
    // RFC 2544: benchmarking.
    v4(198, 18, 0, 0, 15, "benchmarking"),
    // RFC 5737: documentation (TEST-NET-2).
    v4(198, 51, 100, 0, 24, "documentation (TEST-NET-2)"),
    // RFC 5737: documentation (TEST-NET-3).
    v4(203, 0, 113, 0, 24, "documentation (TEST-NET-3)"),
    // RFC 1112 §4: reserved for future use (class E).
    v4(240, 0, 0, 0, 4, "reserved (class E)"),
    // RFC 8190 / RFC 919 §7: limited broadcast.
    v4(255, 255, 255, 255, 32, "limited broadcast"),
    // ----- IPv4 extras -----
    // RFC 5771: multicast (class D); not unicast destinations.
    v4(224, 0, 0, 0, 4, "multicast"),
    // AWS IMDS; also the GCP, Azure, OCI, OpenStack and DigitalOcean metadata service.
    v4(169, 254, 169, 254, 32, "cloud metadata (AWS IMDS)"),
    // Azure WireServer / platform DNS and health endpoint (a public address!).
    v4(168, 63, 129, 16, 32, "cloud platform endpoint (Azure WireServer)"),
    // Alibaba Cloud ECS metadata (inside 100.64.0.0/10 anyway).
    v4(100, 100, 100, 200, 32, "cloud metadata (Alibaba Cloud)"),
    // Oracle Cloud legacy metadata/iSCSI endpoint (inside 192.0.0.0/24 anyway).
    v4(192, 0, 0, 192, 32, "cloud metadata (Oracle Cloud)"),
    // ----- IANA IPv6 Special-Purpose Address Registry -----
    // RFC 4291: loopback.
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback"),
    // RFC 4291: unspecified.
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified"),
    // RFC 4291 §2.5.5.2: IPv4-mapped.
    v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, "IPv4-mapped"),
    // RFC 8215: local-use IPv4/IPv6 translation (operator NAT64 prefixes).
    v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, "local-use IPv4/IPv6 translation"),
    // RFC 6666: discard-only.
    v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only"),
    // RFC 9780: dummy IPv6 prefix.
    v6([0x100, 0, 0, 1, 0, 0, 0, 0], 64, "dummy IPv6 prefix"),
    // RFC 2928: IETF protocol assignments.
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, "IETF protocol assignments"),
    // RFC 4380 / RFC 8190: Teredo.
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo"),
    // RFC 7723: Port Control Protocol anycast.
    v6([0x2001, 1, 0, 0, 0, 0, 0, 1], 128, "PCP anycast"),
    // RFC 8155: TURN anycast.
    v6([0x2001, 1, 0, 0, 0, 0, 0, 2], 128, "TURN anycast"),
    // RFC 9665: DNS-SD service registration protocol anycast.
    v6([0x2001, 1, 0, 0, 0, 0, 0, 3], 128, "DNS-SD SRP anycast"),
    // RFC 5180 (and errata 1752): benchmarking.
    v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48, "benchmarking"),
    // RFC 7450: Automatic Multicast Tunneling.
    v6([0x2001, 3, 0, 0, 0, 0, 0, 0], 32, "AMT"),
    // RFC 7535: AS112-v6.
    v6([0x2001, 4, 0x112, 0, 0, 0, 0, 0], 48, "AS112-v6"),
    // RFC 4843: deprecated (previously ORCHID).
    v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0], 28, "deprecated (ORCHID)"),
    // RFC 7343: ORCHIDv2.
    v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28, "ORCHIDv2"),
    // RFC 9374: drone remote ID protocol entity tags (DETs).
    v6([0x2001, 0x30, 0, 0, 0, 0, 0, 0], 28, "drone remote ID (DET) prefix"),
    // RFC 3849: documentation.
    v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation"),
    // RFC 3056 / RFC 7526: 6to4 (deprecated; the whole range, not just bad embeddings).
    v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, "6to4 (deprecated)"),
    // RFC 7534: direct delegation AS112 service.
    v6([0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0], 48, "direct delegation AS112 service"),
    // RFC 9637: documentation.
    v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation"),
    // RFC 9602: segment routing (SRv6) SIDs.
    v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, "segment routing (SRv6) SIDs"),
    // RFC 4193 / RFC 8190: unique-local.
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique-local"),
    // RFC 4291: link-local unicast.
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
    // ----- IPv6 extras -----
    // RFC 4291 §2.5.5.1: IPv4-compatible (deprecated); also covers :: and ::1.
    v6([0, 0, 0, 0, 0, 0, 0, 0], 96, "IPv4-compatible (deprecated)"),
    // RFC 2765 §2.1: IPv4-translated (SIIT, obsoleted by RFC 6145): ::ffff:0:a.b.c.d.
    v6([0, 0, 0, 0, 0xffff, 0, 0, 0], 96, "IPv4-translated (SIIT)"),
    // RFC 3879: site-local (deprecated).
    v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local (deprecated)"),
    // RFC 4291 §2.7: multicast.
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
    // AWS IMDS over IPv6 (Nitro instances; inside fc00::/7 anyway).
    v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128, "cloud metadata (AWS IMDS, IPv6)"),
    // GCP metadata server over IPv6 (inside fc00::/7 anyway).
    v6([0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254], 128, "cloud metadata (GCP, IPv6)"),
];

/// The default deny table (IANA special-purpose + metadata + extras), one entry per range,
/// no two entries with the same net.
pub fn special_purpose() -> &'static [SpecialRange] {
    SPECIAL_PURPOSE
}

/// The label of a special-purpose range equal to `net` (host bits ignored), if any.
fn special_label(net: IpNet) -> Option<&'static str> {
    let net = net.trunc();
    SPECIAL_PURPOSE.iter().find(|r| r.net == net).map(|r| r.what)
}

// ---------------------------------------------------------------------------------------
// Embedded IPv4
// ---------------------------------------------------------------------------------------

/// `len` bits of `x` starting at bit `start` (bit 0 is the most significant), as a `u32`.
fn bits(x: u128, start: u32, len: u32) -> u32 {
    let shift = 128u32.saturating_sub(start.saturating_add(len));
    let mask = 1u128.checked_shl(len).map_or(u128::MAX, |v| v - 1);
    // Truncation intended: callers ask for at most 32 bits.
    (x.checked_shr(shift).unwrap_or(0) & mask) as u32
}

/// IPv4 addresses embedded in an IPv6 address by the mapped (`::ffff:a.b.c.d`),
/// compatible (`::a.b.c.d`, so `::1` yields `0.0.0.1`), SIIT-translated
/// (`::ffff:0:a.b.c.d`), NAT64 well-known-prefix (`64:ff9b::/96`), local-use NAT64
/// (`64:ff9b:1::/48`, every RFC 6052 layout a prefix inside it can use: /48, /56, /64,
/// /96), 6to4 (`2002:AABB:CCDD::/48`) and Teredo (`2001:0::/32`: the server in bits
/// 32..63 and the client, de-obfuscated by XOR `0xffffffff`, in the last 32 bits) forms.
///
/// At most four addresses; none for any other IPv6 address. Never allocates.
pub fn embedded_ipv4(ip: Ipv6Addr) -> impl Iterator<Item = Ipv4Addr> + Clone {
    let x = u128::from(ip);
    let low = bits(x, 96, 32);
    let mut out: [Option<u32>; 4] = [None; 4];
    let top96 = x >> 32;
    if top96 == 0 // ::a.b.c.d (compatible)
        || top96 == 0xffff // ::ffff:a.b.c.d (mapped)
        || top96 == 0xffff_0000 // ::ffff:0:a.b.c.d (SIIT translated)
        || top96 == 0x0064_ff9b_0000_0000_0000_0000
    // 64:ff9b::a.b.c.d (NAT64 well-known prefix)
    {
        out[0] = Some(low);
    } else if x >> 80 == 0x0064_ff9b_0001 {
        // RFC 6052 §2.2 layouts; bits 64..71 are the "u" octet, skipped.
        out[0] = Some((bits(x, 48, 16) << 16) | bits(x, 72, 16)); // /48
        out[1] = Some((bits(x, 56, 8) << 24) | bits(x, 72, 24)); // /56
        out[2] = Some(bits(x, 72, 32)); // /64
        out[3] = Some(low); // /96
    } else if x >> 112 == 0x2002 {
        out[0] = Some(bits(x, 16, 32)); // 6to4
    } else if x >> 96 == 0x2001_0000 {
        out[0] = Some(bits(x, 32, 32)); // Teredo server
        out[1] = Some(!low); // Teredo client, obfuscated
    }
    out.into_iter().flatten().map(Ipv4Addr::from)
}

// ---------------------------------------------------------------------------------------
// Guard
// ---------------------------------------------------------------------------------------

const CONFIGURED: &str = "configured deny_cidrs";

/// The destination guard: deny ranges with allow holes, checked per address form.
#[derive(Clone, Debug)]
pub struct Guard {
    deny: CidrSet,
    allow: CidrSet,
    /// Parallel to `deny.nets()`: the label of each deny range.
    deny_what: Vec<&'static str>,
}

/// The outcome of [`Guard::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No form of the address is refused.
    Permitted,
    /// `addr` is the form that was refused (the address itself or an embedded IPv4),
    /// `range` the most specific deny range containing it, `what` its label
    /// ("loopback", "cloud metadata (AWS IMDS)", …; "configured deny_cidrs" for user
    /// ranges that are not special-purpose ranges).
    Refused {
        /// The refused form: the address itself or an IPv4 address embedded in it.
        addr: IpAddr,
        /// The most specific deny range containing `addr`.
        range: IpNet,
        /// The label of `range`.
        what: &'static str,
    },
}

impl Default for Guard {
    /// The special-purpose table with no holes.
    fn default() -> Self {
        Self::special_purpose(Vec::new())
    }
}

impl Guard {
    /// A guard over user-given deny ranges with allow holes. A deny range equal to a
    /// special-purpose range (host bits ignored) keeps that range's label; any other is
    /// labelled "configured deny_cidrs".
    pub fn new(deny: Vec<IpNet>, allow: Vec<IpNet>) -> Self {
        let deny = CidrSet::new(deny);
        let deny_what = deny.nets().iter().map(|n| special_label(*n).unwrap_or(CONFIGURED)).collect();
        Self { deny, allow: CidrSet::new(allow), deny_what }
    }

    /// The default table ([`special_purpose`]) with `allow` holes.
    pub fn special_purpose(allow: Vec<IpNet>) -> Self {
        let deny = CidrSet::new(SPECIAL_PURPOSE.iter().map(|r| r.net));
        let deny_what = deny.nets().iter().map(|n| special_label(*n).unwrap_or(CONFIGURED)).collect();
        Self { deny, allow: CidrSet::new(allow), deny_what }
    }

    /// Whether this one form is refused: in a deny range and in no allow range.
    fn refuses_form(&self, ip: IpAddr) -> bool {
        self.deny.contains(ip) && !self.allow.contains(ip)
    }

    /// The first refused form of `ip`: the address itself, then its embedded IPv4s.
    fn refused_form(&self, ip: IpAddr) -> Option<IpAddr> {
        if self.refuses_form(ip) {
            return Some(ip);
        }
        match ip {
            IpAddr::V4(_) => None,
            IpAddr::V6(a) => embedded_ipv4(a).map(IpAddr::V4).find(|&e| self.refuses_form(e)),
        }
    }

    /// The verdict for `ip`, with the refused form and range for explanations.
    pub fn check(&self, ip: IpAddr) -> Verdict {
        let Some(addr) = self.refused_form(ip) else {
            return Verdict::Permitted;
        };
        match self.deny.find_index(addr) {
            Some(i) => Verdict::Refused {
                addr,
                range: self.deny.nets().get(i).copied().unwrap_or(IpNet::from(addr)),
                what: self.deny_what.get(i).copied().unwrap_or(CONFIGURED),
            },
            // Unreachable (find agrees with contains); still refuse, never panic.
            None => Verdict::Refused { addr, range: IpNet::from(addr), what: CONFIGURED },
        }
    }

    /// `check(ip) == Verdict::Permitted`, without building the explanation.
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.refused_form(ip).is_none()
    }

    /// The deny ranges (host bits cleared, deduplicated), for printing.
    pub fn deny_nets(&self) -> &[IpNet] {
        self.deny.nets()
    }

    /// The allow holes (host bits cleared, deduplicated), for printing.
    pub fn allow_nets(&self) -> &[IpNet] {
        self.allow.nets()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test net")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| net(s)).collect()
    }

    fn refused_what(g: &Guard, a: &str) -> &'static str {
        match g.check(ip(a)) {
            Verdict::Refused { what, .. } => what,
            Verdict::Permitted => panic!("{a} should be refused"),
        }
    }

    // ----- named cases, default table -----

    const REFUSED: &[&str] = &[
        "169.254.169.254",
        "fd00:ec2::254",
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "127.0.0.1",
        "127.255.255.254",
        "0.0.0.0",
        "0.1.2.3",
        "100.64.0.1",
        "100.100.100.200",
        "168.63.129.16",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.0.192",
        "192.0.2.1",
        "198.18.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd20:ce::254",
        "fec0::1",
        "ff02::1",
        "::ffff:169.254.169.254",
        "::ffff:127.0.0.1",
        "::169.254.169.254",
        "::ffff:0:a9fe:a9fe",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::7f00:1",
        "64:ff9b::a00:1",
        "64:ff9b:1::808:808",
        "2001:db8::1",
        "3fff::1",
        "2002:808:808::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "100::1",
        "5f00::1",
        "2620:4f:8000::1",
        "2001:4:112::1",
    ];

    const PERMITTED: &[&str] = &[
        "64:ff9b::808:808",
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "172.15.255.255",
        "172.32.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "11.0.0.0",
        "9.255.255.255",
        "223.255.255.255",
        "2000::1",
        "2001:200::1",
        "2003::1",
    ];

    #[test]
    fn named_refusals_default_table() {
        let g = Guard::default();
        for a in REFUSED {
            assert!(!g.permits(ip(a)), "{a} should be refused");
            assert!(matches!(g.check(ip(a)), Verdict::Refused { .. }), "{a}");
        }
    }

    #[test]
    fn named_permits_default_table() {
        let g = Guard::default();
        for a in PERMITTED {
            assert!(g.permits(ip(a)), "{a} should be permitted");
            assert_eq!(g.check(ip(a)), Verdict::Permitted, "{a}");
        }
    }

    #[test]
    fn labels_are_most_specific() {
        let g = Guard::default();
        assert_eq!(refused_what(&g, "169.254.169.254"), "cloud metadata (AWS IMDS)");
        assert_eq!(refused_what(&g, "169.254.1.1"), "link-local");
        assert_eq!(refused_what(&g, "127.0.0.1"), "loopback");
        assert_eq!(refused_what(&g, "::1"), "loopback");
        assert_eq!(refused_what(&g, "::"), "unspecified");
        assert_eq!(refused_what(&g, "0.0.0.0"), "\"this host\" (unspecified)");
        assert_eq!(refused_what(&g, "fd00:ec2::254"), "cloud metadata (AWS IMDS, IPv6)");
        assert_eq!(refused_what(&g, "2001::1"), "Teredo");
        assert_eq!(refused_what(&g, "2001:1::1"), "PCP anycast");
        assert_eq!(refused_what(&g, "192.0.0.192"), "cloud metadata (Oracle Cloud)");
    }

    #[test]
    fn nat64_refusal_names_the_embedded_form() {
        let g = Guard::default();
        assert_eq!(
            g.check(ip("64:ff9b::a9fe:a9fe")),
            Verdict::Refused {
                addr: ip("169.254.169.254"),
                range: net("169.254.169.254/32"),
                what: "cloud metadata (AWS IMDS)",
            }
        );
        // The mapped form is refused as IPv6 first (::ffff:0:0/96).
        assert_eq!(
            g.check(ip("::ffff:169.254.169.254")),
            Verdict::Refused { addr: ip("::ffff:169.254.169.254"), range: net("::ffff:0:0/96"), what: "IPv4-mapped" }
        );
    }

    #[test]
    fn table_has_no_duplicate_nets_and_is_truncated() {
        let table = special_purpose();
        let mut seen = HashSet::new();
        for r in table {
            assert_eq!(r.net, r.net.trunc(), "{} has host bits", r.net);
            assert!(seen.insert(r.net), "duplicate {}", r.net);
            assert!(!r.what.is_empty());
        }
        let g = Guard::default();
        assert_eq!(g.deny_nets().len(), table.len());
        assert!(g.allow_nets().is_empty());
        // 64:ff9b::/96 must stay out of the deny table.
        assert!(!g.deny_nets().contains(&net("64:ff9b::/96")));
    }

    // ----- custom deny lists: embedded forms matter -----

    #[test]
    fn embedded_forms_refused_with_custom_deny_list() {
        let g = Guard::new(nets(&["169.254.0.0/16"]), vec![]);
        for a in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "::ffff:0:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::",
            "2002:a9fe:a9fe:1234:5678::1",
            // Teredo, server 169.254.169.254, client 1.2.3.4 (obfuscated fefd:fcfb).
            "2001:0:a9fe:a9fe::fefd:fcfb",
            // Teredo, server 65.54.227.120, client 169.254.169.254 (obfuscated 5601:5601).
            "2001:0:4136:e378:8000:63bf:5601:5601",
            // Local-use NAT64, /96 and /64 layouts.
            "64:ff9b:1::a9fe:a9fe",
            "64:ff9b:1:0:a9:fea9:fe00:0",
        ] {
            let v = g.check(ip(a));
            assert!(
                matches!(
                    v,
                    Verdict::Refused { addr: IpAddr::V4(_), what: "link-local", .. }
                        | Verdict::Refused { addr: IpAddr::V6(_), .. }
                ),
                "{a}: {v:?}"
            );
            assert!(!g.permits(ip(a)), "{a}");
        }
        for a in
            ["8.8.8.8", "::1", "2002:808:808::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "64:ff9b::808:808", "fe80::1"]
        {
            assert!(g.permits(ip(a)), "{a}");
        }
        assert_eq!(
            g.check(ip("2002:a9fe:a9fe::")),
            Verdict::Refused { addr: ip("169.254.169.254"), range: net("169.254.0.0/16"), what: "link-local" }
        );
    }

    #[test]
    fn user_ranges_are_labelled() {
        let g = Guard::new(nets(&["203.0.113.0/24", "198.51.100.7/25", "9.9.9.0/24"]), vec![]);
        assert_eq!(refused_what(&g, "203.0.113.9"), "documentation (TEST-NET-3)");
        assert_eq!(refused_what(&g, "198.51.100.1"), "configured deny_cidrs");
        assert_eq!(refused_what(&g, "9.9.9.9"), "configured deny_cidrs");
        assert_eq!(g.deny_nets()[1], net("198.51.100.0/25"));
    }

    // ----- allow holes -----

    #[test]
    fn allow_hole_is_exact() {
        let g = Guard::special_purpose(nets(&["10.0.64.0/24"]));
        assert!(g.permits(ip("10.0.64.5")));
        assert!(g.permits(ip("10.0.64.0")));
        assert!(g.permits(ip("10.0.64.255")));
        assert!(!g.permits(ip("10.0.65.5")));
        assert!(!g.permits(ip("10.0.63.255")));
        assert_eq!(g.check(ip("10.0.64.5")), Verdict::Permitted);
        assert_eq!(g.allow_nets(), &[net("10.0.64.0/24")][..]);
    }

    #[test]
    fn allow_hole_applies_per_form() {
        let g = Guard::special_purpose(nets(&["127.0.0.0/8"]));
        assert!(g.permits(ip("127.0.0.1")));
        assert!(!g.permits(ip("::ffff:127.0.0.1")));
        // 64:ff9b::/96 is not denied and 127.0.0.1 is allowed: the NAT64 form passes.
        assert!(g.permits(ip("64:ff9b::7f00:1")));
        // An IPv6 hole does not open the embedded IPv4 form.
        let g = Guard::special_purpose(nets(&["::ffff:0:0/96"]));
        assert!(!g.permits(ip("::ffff:169.254.169.254")));
        assert!(g.permits(ip("::ffff:8.8.8.8")));
        assert_eq!(
            g.check(ip("::ffff:169.254.169.254")),
            Verdict::Refused {
                addr: ip("169.254.169.254"),
                range: net("169.254.169.254/32"),
                what: "cloud metadata (AWS IMDS)",
            }
        );
    }

    #[test]
    fn empty_guard_permits_everything() {
        let g = Guard::new(vec![], vec![]);
        assert!(g.permits(ip("127.0.0.1")));
        assert!(g.permits(ip("::1")));
        assert!(g.deny_nets().is_empty());
    }

    // ----- embedded_ipv4 -----

    fn emb(a: &str) -> Vec<Ipv4Addr> {
        match ip(a) {
            IpAddr::V6(v) => embedded_ipv4(v).collect(),
            IpAddr::V4(_) => panic!("not v6"),
        }
    }

    fn v4a(s: &str) -> Ipv4Addr {
        s.parse().expect("v4")
    }

    #[test]
    fn embedded_forms() {
        assert_eq!(emb("::ffff:1.2.3.4"), [v4a("1.2.3.4")]);
        assert_eq!(emb("::1.2.3.4"), [v4a("1.2.3.4")]);
        assert_eq!(emb("::1"), [v4a("0.0.0.1")]);
        assert_eq!(emb("::"), [v4a("0.0.0.0")]);
        assert_eq!(emb("::ffff:0:1.2.3.4"), [v4a("1.2.3.4")]);
        assert_eq!(emb("64:ff9b::1.2.3.4"), [v4a("1.2.3.4")]);
        assert_eq!(emb("2002:102:304::"), [v4a("1.2.3.4")]);
        assert_eq!(emb("2002:102:304:ffff:ffff:ffff:ffff:ffff"), [v4a("1.2.3.4")]);
        // RFC 4380 §4 example: server 65.54.227.120, client 192.0.2.45.
        assert_eq!(emb("2001:0:4136:e378:8000:63bf:3fff:fdd2"), [v4a("65.54.227.120"), v4a("192.0.2.45")]);
        // RFC 6052 §2.4 examples, with the /48, /56, /64 layouts under 64:ff9b:1::/48.
        assert!(emb("64:ff9b:1:c000:2:2100::").contains(&v4a("192.0.2.33"))); // /48
        assert!(emb("64:ff9b:1:c0:0:221::").contains(&v4a("192.0.2.33"))); // /56
        assert!(emb("64:ff9b:1:0:c0:2:2100:0").contains(&v4a("192.0.2.33"))); // /64
        assert!(emb("64:ff9b:1::c000:221").contains(&v4a("192.0.2.33"))); // /96
        assert!(emb("2606:4700::1111").is_empty());
        assert!(emb("64:ff9b:2::1").is_empty());
        assert!(emb("2001:1::1").is_empty());
        assert!(emb("fe80::1").is_empty());
    }

    // ----- CidrSet edge cases -----

    #[test]
    fn cidrset_first_and_last_address() {
        let s = CidrSet::new(nets(&["10.0.0.0/8", "2001:db8::/32"]));
        assert!(s.contains(ip("10.0.0.0")));
        assert!(s.contains(ip("10.255.255.255")));
        assert!(!s.contains(ip("9.255.255.255")));
        assert!(!s.contains(ip("11.0.0.0")));
        assert!(s.contains(ip("2001:db8::")));
        assert!(s.contains(ip("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!s.contains(ip("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!s.contains(ip("2001:db9::")));
        // Families never mix: ::a00:1 is not 10.0.0.1.
        assert!(!s.contains(ip("::a00:1")));
        assert!(!s.contains(ip("::ffff:10.0.0.1")));
    }

    #[test]
    fn cidrset_merging_overlap_and_adjacency() {
        let s = CidrSet::new(nets(&["10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "10.0.3.0/24", "10.0.0.0/24"]));
        assert_eq!(s.len(), 4);
        assert_eq!(s.v4.ranges.len(), 2, "adjacent /24s merge, 10.0.3.0/24 stays apart");
        assert!(s.contains(ip("10.0.1.255")));
        assert!(!s.contains(ip("10.0.2.0")));
        assert!(s.contains(ip("10.0.3.0")));
        assert_eq!(s.find(ip("10.0.0.200")), Some(net("10.0.0.128/25")));
        assert_eq!(s.find(ip("10.0.0.1")), Some(net("10.0.0.0/24")));
        assert_eq!(s.find(ip("10.0.2.1")), None);
    }

    #[test]
    fn cidrset_extremes() {
        let all4 = CidrSet::new(nets(&["0.0.0.0/0"]));
        assert!(all4.contains(ip("0.0.0.0")));
        assert!(all4.contains(ip("255.255.255.255")));
        assert!(!all4.contains(ip("::")));
        let all6 = CidrSet::new(nets(&["::/0"]));
        assert!(all6.contains(ip("::")));
        assert!(all6.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!all6.contains(ip("0.0.0.0")));
        let hosts = CidrSet::new(nets(&["1.2.3.4/32", "::1/128", "255.255.255.255/32"]));
        assert!(hosts.contains(ip("1.2.3.4")));
        assert!(!hosts.contains(ip("1.2.3.5")));
        assert!(!hosts.contains(ip("1.2.3.3")));
        assert!(hosts.contains(ip("::1")));
        assert!(!hosts.contains(ip("::2")));
        assert!(!hosts.contains(ip("::")));
        assert!(hosts.contains(ip("255.255.255.255")));
        assert_eq!(hosts.find(ip("::1")), Some(net("::1/128")));
        let top = CidrSet::new(nets(&["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "ff00::/8"]));
        assert!(top.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert_eq!(top.v6.ranges.len(), 1);
        let empty = CidrSet::default();
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        assert!(!empty.contains(ip("1.1.1.1")));
        assert_eq!(empty.find(ip("1.1.1.1")), None);
        // Host bits are cleared and duplicates dropped.
        let s = CidrSet::new(nets(&["10.1.2.3/8", "10.0.0.0/8"]));
        assert_eq!(s.nets(), &[net("10.0.0.0/8")][..]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn prefix_mask_edges() {
        assert_eq!(prefix_mask(0, 32), 0);
        assert_eq!(prefix_mask(32, 32), 0xffff_ffff);
        assert_eq!(prefix_mask(8, 32), 0xff00_0000);
        assert_eq!(prefix_mask(0, 128), 0);
        assert_eq!(prefix_mask(128, 128), u128::MAX);
        assert_eq!(prefix_mask(1, 128), 1 << 127);
    }

    // ----- properties -----

    fn v4_net() -> impl Strategy<Value = IpNet> {
        (any::<u32>(), 0u8..=32).prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).expect("len")))
    }

    fn v6_net() -> impl Strategy<Value = IpNet> {
        (any::<u128>(), 0u8..=128).prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).expect("len")))
    }

    /// Nets of both families, biased towards long prefixes so that probes near them hit
    /// both inside and outside.
    fn net_list() -> impl Strategy<Value = Vec<IpNet>> {
        prop::collection::vec(prop_oneof![v4_net(), v6_net()], 0..24)
    }

    /// A probe: random, or a net's network/broadcast address nudged by a small delta.
    fn probes(nets: &[IpNet], raw: &[(u128, usize, i8, bool)]) -> Vec<IpAddr> {
        raw.iter()
            .map(|&(r, i, delta, edge)| {
                let Some(n) = (!nets.is_empty()).then(|| nets[i % nets.len()]) else {
                    return IpAddr::V6(Ipv6Addr::from(r));
                };
                match n {
                    IpNet::V4(n) => {
                        let base = if edge { n.broadcast() } else { n.network() };
                        let a = u32::from(base).wrapping_add_signed(i32::from(delta));
                        IpAddr::V4(Ipv4Addr::from(if delta == i8::MIN { r as u32 } else { a }))
                    }
                    IpNet::V6(n) => {
                        let base = if edge { n.broadcast() } else { n.network() };
                        let a = u128::from(base).wrapping_add_signed(i128::from(delta));
                        IpAddr::V6(Ipv6Addr::from(if delta == i8::MIN { r } else { a }))
                    }
                }
            })
            .collect()
    }

    fn raw_probes() -> impl Strategy<Value = Vec<(u128, usize, i8, bool)>> {
        prop::collection::vec((any::<u128>(), any::<usize>(), any::<i8>(), any::<bool>()), 1..32)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn contains_agrees_with_naive(list in net_list(), raw in raw_probes()) {
            let set = CidrSet::new(list.clone());
            for a in probes(&list, &raw) {
                let naive = list.iter().any(|n| n.contains(&a));
                prop_assert_eq!(set.contains(a), naive, "{}", a);
            }
        }

        #[test]
        fn find_is_most_specific(list in net_list(), raw in raw_probes()) {
            let set = CidrSet::new(list.clone());
            for a in probes(&list, &raw) {
                let naive = list
                    .iter()
                    .filter(|n| n.contains(&a))
                    .map(|n| n.trunc())
                    .max_by_key(|n| n.prefix_len());
                prop_assert_eq!(set.find(a), naive, "{}", a);
                prop_assert_eq!(set.find(a).is_some(), set.contains(a));
            }
        }

        #[test]
        fn permits_agrees_with_check(
            deny in net_list(),
            allow in net_list(),
            raw in raw_probes(),
        ) {
            let g = Guard::new(deny.clone(), allow);
            let d = Guard::default();
            for a in probes(&deny, &raw) {
                prop_assert_eq!(g.permits(a), g.check(a) == Verdict::Permitted);
                prop_assert_eq!(d.permits(a), d.check(a) == Verdict::Permitted);
                if let Verdict::Refused { addr, range, .. } = g.check(a) {
                    prop_assert!(range.contains(&addr));
                }
            }
        }

        #[test]
        fn v6_refused_if_any_embedded_form_refused(a in any::<u128>()) {
            let g = Guard::new(vec![net("0.0.0.0/1")], vec![]);
            let v6a = Ipv6Addr::from(a);
            let any_bad = embedded_ipv4(v6a).any(|e| u32::from(e) < 0x8000_0000);
            prop_assert_eq!(g.permits(IpAddr::V6(v6a)), !any_bad);
        }

        #[test]
        fn sixto4_and_teredo_roundtrip(v in any::<u32>(), s in any::<u32>(), rest in any::<u64>()) {
            let sixto4 = Ipv6Addr::from((0x2002u128 << 112) | (u128::from(v) << 80) | u128::from(rest));
            prop_assert_eq!(embedded_ipv4(sixto4).collect::<Vec<_>>(), vec![Ipv4Addr::from(v)]);
            let teredo = Ipv6Addr::from(
                (0x2001_0000u128 << 96)
                    | (u128::from(s) << 64)
                    | (u128::from((rest >> 32) as u32) << 32)
                    | u128::from(!v),
            );
            prop_assert_eq!(
                embedded_ipv4(teredo).collect::<Vec<_>>(),
                vec![Ipv4Addr::from(s), Ipv4Addr::from(v)]
            );
        }
    }
}
