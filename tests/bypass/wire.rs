//! Exact bytes for hostile clients: DNS messages built label by label (so a label may hold a
//! dot, a NUL or 64 bytes) and TLS ClientHellos built field by field (several SNI entries,
//! record splits, SSLv2/SSLv3 versions, ECH, padding past 16 KiB).

pub const A: u16 = 1;
pub const NULL: u16 = 10;
pub const MX: u16 = 15;
pub const TXT: u16 = 16;
pub const AAAA: u16 = 28;
pub const CNAME: u16 = 5;
pub const HTTPS: u16 = 65;
pub const AXFR: u16 = 252;
pub const ANY: u16 = 255;
/// iodine's default query type (a private-use type).
pub const PRIVATE: u16 = 65399;

/// LDH plus `_`, 1..=63 bytes: what a label must be for egressd to forward it.
pub fn ldh(label: &[u8]) -> bool {
    (1..=63).contains(&label.len()) && label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `"a.b.c"` as labels.
pub fn labels(name: &str) -> Vec<&[u8]> {
    name.split('.').map(str::as_bytes).collect()
}

/// A 12-byte header.
pub fn header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    for v in [id, flags, qd, an, ns, ar] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h
}

/// A name in wire form from raw labels (no validation: any byte, any length byte).
pub fn qname(labels: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in labels {
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
    out
}

/// A recursive query (RD) with one question of class IN.
pub fn dns_query(id: u16, labels: &[&[u8]], qtype: u16) -> Vec<u8> {
    dns_query_flags(id, 0x0100, labels, qtype, 1)
}

/// A query with the given header flags, question type and class.
pub fn dns_query_flags(id: u16, flags: u16, labels: &[&[u8]], qtype: u16, qclass: u16) -> Vec<u8> {
    let mut p = header(id, flags, 1, 0, 0, 0);
    p.extend_from_slice(&qname(labels));
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&qclass.to_be_bytes());
    p
}

/// A query with an OPT record (EDNS, 1232 bytes, DO bit when `dnssec_ok`).
pub fn dns_query_edns(id: u16, labels: &[&[u8]], qtype: u16, dnssec_ok: bool) -> Vec<u8> {
    let mut p = header(id, 0x0100, 1, 0, 0, 1);
    p.extend_from_slice(&qname(labels));
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.push(0); // root
    p.extend_from_slice(&41u16.to_be_bytes());
    p.extend_from_slice(&1232u16.to_be_bytes());
    p.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0]);
    p.extend_from_slice(&0u16.to_be_bytes());
    p
}

/// The RCODE of a reply.
pub fn rcode(reply: &[u8]) -> u8 {
    reply.get(3).map_or(0xff, |b| b & 0x0f)
}

/// The answer count of a reply.
pub fn ancount(reply: &[u8]) -> u16 {
    match reply.get(6..8) {
        Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]),
        _ => 0,
    }
}

/// The first question's raw labels and type, following no compression pointer (a query egressd
/// forwards carries an uncompressed question). `None` if the bytes do not hold one.
pub fn first_question(packet: &[u8]) -> Option<(Vec<Vec<u8>>, u16)> {
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*packet.get(pos)?);
        if len == 0 {
            pos += 1;
            break;
        }
        if len > 63 {
            // A pointer or a reserved label type: keep the rest as one opaque label.
            labels.push(packet.get(pos..)?.to_vec());
            return Some((labels, 0));
        }
        labels.push(packet.get(pos + 1..pos + 1 + len)?.to_vec());
        pos += 1 + len;
    }
    let qtype = u16::from_be_bytes([*packet.get(pos)?, *packet.get(pos + 1)?]);
    Some((labels, qtype))
}

/// The addresses in a reply's answer and additional sections (parsed with hickory).
pub fn reply_addresses(reply: &[u8]) -> Vec<std::net::IpAddr> {
    use hickory_proto::rr::RData;
    let Ok(m) = hickory_proto::op::Message::from_vec(reply) else { return Vec::new() };
    let mut out = Vec::new();
    for r in m.answers.iter().chain(m.additionals.iter()) {
        match &r.data {
            RData::A(a) => out.push(std::net::IpAddr::V4(a.0)),
            RData::AAAA(a) => out.push(std::net::IpAddr::V6(a.0)),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// TLS ClientHello
// ---------------------------------------------------------------------------------------------

/// A ClientHello to build; [`Hello::new`] gives a plain TLS 1.2/1.3-style one.
#[derive(Clone, Debug)]
pub struct Hello {
    /// The record layer version (0x0301 usual; 0x0300 SSLv3).
    pub record_version: u16,
    /// ClientHello.legacy_version.
    pub legacy_version: u16,
    /// server_name extensions, each a list of (name_type, name) entries; empty: no SNI.
    pub server_names: Vec<Vec<(u8, Vec<u8>)>>,
    /// A padding extension of this many bytes, placed before server_name.
    pub padding: usize,
    /// An encrypted_client_hello extension (0xfe0d) with a dummy payload.
    pub ech: bool,
    /// Largest record fragment (16384 normally; 1 splits the hello into one-byte records).
    pub fragment: usize,
}

impl Hello {
    /// A hello with one host_name entry.
    pub fn new(sni: &str) -> Hello {
        Hello {
            record_version: 0x0301,
            legacy_version: 0x0303,
            server_names: vec![vec![(0, sni.as_bytes().to_vec())]],
            padding: 0,
            ech: false,
            fragment: 16384,
        }
    }

    /// A hello without a server_name extension.
    pub fn no_sni() -> Hello {
        Hello { server_names: Vec::new(), ..Hello::new("x") }
    }

    /// The handshake message (type, length, body) without record framing.
    pub fn handshake(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&self.legacy_version.to_be_bytes());
        body.extend_from_slice(&[0x42; 32]); // random
        body.push(32);
        body.extend_from_slice(&[0x17; 32]); // session id
        let suites: [u16; 4] = [0x1301, 0x1302, 0xc02f, 0xc030];
        body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
        for s in suites {
            body.extend_from_slice(&s.to_be_bytes());
        }
        body.extend_from_slice(&[1, 0]); // compression: null
        let mut exts = Vec::new();
        if self.padding > 0 {
            ext(&mut exts, 21, &vec![0u8; self.padding]);
        }
        for list in &self.server_names {
            let mut entries = Vec::new();
            for (kind, name) in list {
                entries.push(*kind);
                entries.extend_from_slice(&(name.len() as u16).to_be_bytes());
                entries.extend_from_slice(name);
            }
            let mut data = (entries.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&entries);
            ext(&mut exts, 0, &data);
        }
        // supported_versions: TLS 1.3, 1.2.
        ext(&mut exts, 43, &[4, 3, 4, 3, 3]);
        if self.ech {
            // outer ECH: type 0, kdf/aead ids, config id, enc (32 bytes), payload (64 bytes).
            let mut e = vec![0, 0, 1, 0, 1, 7];
            e.extend_from_slice(&32u16.to_be_bytes());
            e.extend_from_slice(&[0x11; 32]);
            e.extend_from_slice(&64u16.to_be_bytes());
            e.extend_from_slice(&[0x22; 64]);
            ext(&mut exts, 0xfe0d, &e);
        }
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        hs
    }

    /// The hello framed in handshake records of at most `fragment` bytes each.
    pub fn bytes(&self) -> Vec<u8> {
        let hs = self.handshake();
        let mut out = Vec::new();
        for chunk in hs.chunks(self.fragment.max(1)) {
            out.push(22);
            out.extend_from_slice(&self.record_version.to_be_bytes());
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }
}

fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// An SSLv2-format (RFC 6101 appendix E) ClientHello, as very old clients sent.
pub fn sslv2_hello() -> Vec<u8> {
    let mut body = vec![1, 0x03, 0x01]; // CLIENT-HELLO, version 3.1
    body.extend_from_slice(&3u16.to_be_bytes()); // cipher specs length
    body.extend_from_slice(&0u16.to_be_bytes()); // session id length
    body.extend_from_slice(&16u16.to_be_bytes()); // challenge length
    body.extend_from_slice(&[0x00, 0x00, 0x2f]);
    body.extend_from_slice(&[0x33; 16]);
    let mut out = vec![0x80 | ((body.len() >> 8) as u8), body.len() as u8];
    out.extend_from_slice(&body);
    out
}
