//! The TLS ClientHello reader: this module owns turning the first bytes a client sends after a
//! CONNECT into the server name it asked for (SNI), whether it used Encrypted Client Hello, and
//! the ALPN protocols it offered, before any of those bytes is forwarded upstream. It reassembles
//! a ClientHello spread over several TLS records, is strict about the wire format (an attacker
//! controls every byte, so anything ambiguous is refused rather than guessed at), never panics,
//! and allocates only when the ClientHello spans records (plus the returned strings). It is
//! pure: no I/O; the caller buffers, calls [`parse`] again after each read, and replays
//! everything it buffered to the upstream once the policy allows it.
//!
//! Strictness beyond the letter of the RFCs, on purpose:
//! - `server_name` must hold exactly one entry, of type `host_name` (as OpenSSL requires): other
//!   name types, several entries and an empty list are refused, as is a second `server_name`
//!   extension or any other duplicated extension.
//! - The host name must be 1..=255 bytes of printable ASCII (`0x21..=0x7e`): non-ASCII bytes,
//!   spaces, NUL and other control characters are refused here, before any normaliser sees them.
//! - Every length must exactly fill its parent (record, handshake message, vector, extension).
//! - Errors are reported as soon as the bytes seen so far prove them, even while the rest of the
//!   ClientHello has not arrived yet; [`Parse::Incomplete`] means every byte so far is a valid
//!   prefix of some ClientHello.
//!
//! Size bound: [`Parse::Done`] only when the records carrying the ClientHello lie within the
//! first [`MAX_HELLO_BYTES`] bytes; [`HelloError::TooLarge`] as soon as the declared lengths
//! prove they cannot (a ClientHello handshake length above the bound is `TooLarge`, not
//! `Malformed`). So [`Parse::Incomplete`] is only ever returned for a buffer shorter than
//! [`MAX_HELLO_BYTES`], and a caller that buffers at most that much always gets a decision.
//! Each call costs O(`buf.len()`); call it once per read, not once per byte.

use std::borrow::Cow;

/// Upper bound on bytes buffered while waiting for a complete ClientHello (records may span; a
/// ClientHello may exceed 16 KiB with post-quantum key shares or padding).
pub const MAX_HELLO_BYTES: usize = 64 * 1024;

/// Most ALPN protocol names kept in [`ClientHello::alpn`]; the rest are validated but dropped.
const MAX_ALPN: usize = 8;
/// Largest plaintext record fragment (RFC 8446 §5.1, RFC 5246 §6.2.1: 2^14).
const MAX_FRAGMENT: usize = 1 << 14;
/// TLS record header: content type (1), version (2), length (2).
const RECORD_HEADER: usize = 5;
/// Handshake message header: msg_type (1), length (3).
const HANDSHAKE_HEADER: usize = 4;
/// The longest host_name accepted (a DNS name in text form is at most 253 bytes; 255 leaves room
/// for a trailing dot and matches what other implementations accept).
const MAX_HOST_NAME: usize = 255;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_ECH: u16 = 0xfe0d;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// What the ClientHello said that the proxy cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The server_name host_name, exactly as sent (not normalised; the caller normalises).
    pub sni: Option<String>,
    /// True when an encrypted_client_hello extension (0xfe0d) is present: the SNI above is the ECH outer name.
    pub ech: bool,
    /// ALPN protocol names offered, for logging.
    pub alpn: Vec<String>,
    /// Bytes of the input that made up the records carrying the ClientHello (the caller replays all buffered bytes anyway).
    pub record_bytes: usize,
}

/// Why the bytes are not an acceptable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The bytes are not a TLS handshake record at all (plain HTTP, SSH, SSLv2-format hello, random bytes).
    #[error("not a TLS ClientHello")]
    NotTls,
    /// A TLS record/handshake that violates the format (bad lengths, truncated fields, two server_name extensions, several host_name entries, duplicate extensions, a non-ClientHello first handshake message, interleaved non-handshake records, empty host_name, ...).
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// More than MAX_HELLO_BYTES without a complete ClientHello.
    #[error("ClientHello larger than {MAX_HELLO_BYTES} bytes")]
    TooLarge,
}

/// The outcome of [`parse`] when the bytes so far are acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// Need more bytes; call again with the longer buffer.
    Incomplete,
    Done(ClientHello),
}

/// Parses the start of a client's byte stream. Call with everything buffered so far (it is
/// re-parsed from the start each time; that's fine, it's small). Decides NotTls as early as the
/// first byte allows (first byte must be 0x16 handshake; record version major must be 3 and minor 0..=4 —
/// SSLv3 record versions 0x0300 accepted as a record version but the ClientHello's legacy_version must be >= 0x0301;
/// an SSLv2-compatible hello, first byte with high bit set, is NotTls).
pub fn parse(buf: &[u8]) -> Result<Parse, HelloError> {
    let framing = walk_records(buf, None)?;
    let Some(body_len) = framing.body_len else {
        return Ok(Parse::Incomplete);
    };
    // The body bytes available so far, in one slice: borrowed when they all sit in the first
    // record (the common case), gathered from the records otherwise.
    let body: Cow<'_, [u8]> = if framing.first_record_body.len() == framing.body_avail {
        Cow::Borrowed(framing.first_record_body)
    } else {
        let mut gathered = Vec::with_capacity(framing.body_avail);
        walk_records(buf, Some(&mut gathered))?;
        Cow::Owned(gathered)
    };
    let fields = match parse_body(&body, body_len) {
        Ok(fields) => fields,
        Err(Stop::Bad(what)) => return Err(HelloError::Malformed(what)),
        // Cannot happen once all body bytes are present (every read is bounded by body_len),
        // but never report a complete body as incomplete.
        Err(Stop::Short) if body.len() >= body_len => return Err(HelloError::Malformed("truncated ClientHello")),
        Err(Stop::Short) => return Ok(Parse::Incomplete),
    };
    let Some(record_bytes) = framing.record_end else {
        return Ok(Parse::Incomplete);
    };
    Ok(Parse::Done(ClientHello {
        sni: fields.sni.map(|name| String::from_utf8_lossy(name).into_owned()),
        ech: fields.ech,
        alpn: alpn_names(fields.alpn),
        record_bytes,
    }))
}

// ---------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------

/// How far the record layer got.
struct Framing<'a> {
    /// The ClientHello body length, once its handshake header has been seen.
    body_len: Option<usize>,
    /// ClientHello body bytes available so far (≤ `body_len`).
    body_avail: usize,
    /// The ClientHello body bytes available in the first record.
    first_record_body: &'a [u8],
    /// End offset of the record holding the last ClientHello byte, once that record is complete.
    record_end: Option<usize>,
}

/// Walks the handshake records at the start of `buf`, validating each header as far as the
/// bytes present allow, and the first handshake message's header. With `sink`, appends the
/// ClientHello body bytes seen (after the 4-byte handshake header, at most `body_len`) to it.
fn walk_records<'a>(buf: &'a [u8], mut sink: Option<&mut Vec<u8>>) -> Result<Framing<'a>, HelloError> {
    let mut framing = Framing { body_len: None, body_avail: 0, first_record_body: &[], record_end: None };
    let mut header = [0u8; HANDSHAKE_HEADER];
    let mut header_seen = 0;
    let mut pos = 0;
    loop {
        // Handshake bytes still needed: known once the header is, a lower bound before.
        let needed = match framing.body_len {
            Some(len) => len - framing.body_avail,
            None => HANDSHAKE_HEADER - header_seen,
        };
        let min_end = needed
            .div_ceil(MAX_FRAGMENT)
            .checked_mul(RECORD_HEADER)
            .and_then(|framing_bytes| framing_bytes.checked_add(needed))
            .and_then(|bytes| bytes.checked_add(pos));
        if min_end.is_none_or(|end| end > MAX_HELLO_BYTES) {
            return Err(HelloError::TooLarge);
        }

        let rest = buf.get(pos..).unwrap_or_default();
        let Some(fragment_len) = record_header(rest, pos == 0)? else {
            return Ok(framing);
        };
        let record_end = pos + RECORD_HEADER + fragment_len;
        if record_end > MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge);
        }
        let available = rest.len().saturating_sub(RECORD_HEADER).min(fragment_len);
        let mut fragment = rest.get(RECORD_HEADER..RECORD_HEADER + available).unwrap_or_default();
        let record_complete = available == fragment_len;

        // The handshake header, which may itself be split across records.
        while header_seen < HANDSHAKE_HEADER {
            let Some((&byte, tail)) = fragment.split_first() else { break };
            if header_seen == 0 && byte != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::Malformed("first handshake message is not a ClientHello"));
            }
            header[header_seen] = byte;
            header_seen += 1;
            fragment = tail;
            if header_seen == HANDSHAKE_HEADER {
                let len = (usize::from(header[1]) << 16) | (usize::from(header[2]) << 8) | usize::from(header[3]);
                // The body bytes this record cannot hold need at least this many more records.
                let beyond = len.saturating_sub(fragment_len - (available - fragment.len()));
                let min_end = record_end + beyond + beyond.div_ceil(MAX_FRAGMENT) * RECORD_HEADER;
                if len > MAX_HELLO_BYTES || min_end > MAX_HELLO_BYTES {
                    return Err(HelloError::TooLarge);
                }
                framing.body_len = Some(len);
            }
        }

        if let Some(body_len) = framing.body_len {
            // Bytes after the ClientHello in its last record belong to later handshake messages.
            let take = fragment.len().min(body_len - framing.body_avail);
            let body_part = fragment.get(..take).unwrap_or_default();
            if pos == 0 {
                framing.first_record_body = body_part;
            }
            if let Some(sink) = sink.as_deref_mut() {
                sink.extend_from_slice(body_part);
            }
            framing.body_avail += take;
            if framing.body_avail == body_len {
                if record_complete {
                    framing.record_end = Some(record_end);
                }
                return Ok(framing);
            }
        }
        if !record_complete {
            return Ok(framing);
        }
        pos = record_end;
    }
}

/// Checks the (possibly partial) record header at the start of `rest`; returns the fragment
/// length once all 5 header bytes are present. The first record decides TLS or not.
fn record_header(rest: &[u8], first: bool) -> Result<Option<usize>, HelloError> {
    let fail = |what: &'static str| if first { HelloError::NotTls } else { HelloError::Malformed(what) };
    if let Some(&content_type) = rest.first() {
        if content_type != CONTENT_HANDSHAKE {
            return Err(fail("non-handshake record before the ClientHello is complete"));
        }
    }
    if let Some(&major) = rest.get(1) {
        if major != 3 {
            return Err(fail("bad record version"));
        }
    }
    if let Some(&minor) = rest.get(2) {
        if minor > 4 {
            return Err(fail("bad record version"));
        }
    }
    let (Some(&hi), Some(&lo)) = (rest.get(3), rest.get(4)) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len == 0 {
        return Err(HelloError::Malformed("empty handshake record"));
    }
    if len > MAX_FRAGMENT {
        return Err(HelloError::Malformed("record longer than 2^14 bytes"));
    }
    Ok(Some(len))
}

// ---------------------------------------------------------------------------------------
// ClientHello body
// ---------------------------------------------------------------------------------------

/// Why body parsing stopped.
#[derive(Debug)]
enum Stop {
    /// The bytes so far are a valid prefix; more are needed.
    Short,
    /// The bytes so far already violate the format.
    Bad(&'static str),
}

/// A bounds-checked reader over the body bytes available so far. `end` is the declared end of
/// the current vector: reading past it is [`Stop::Bad`], reading past the available bytes (but
/// within `end`) is [`Stop::Short`].
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Cursor<'a> {
    fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    fn take(&mut self, n: usize, overrun: &'static str) -> Result<&'a [u8], Stop> {
        let new = self.pos.checked_add(n).filter(|&new| new <= self.end).ok_or(Stop::Bad(overrun))?;
        let bytes = self.data.get(self.pos..new).ok_or(Stop::Short)?;
        self.pos = new;
        Ok(bytes)
    }

    fn u8(&mut self, overrun: &'static str) -> Result<u8, Stop> {
        match self.take(1, overrun)? {
            &[b] => Ok(b),
            _ => Err(Stop::Bad(overrun)),
        }
    }

    fn u16(&mut self, overrun: &'static str) -> Result<u16, Stop> {
        match self.take(2, overrun)? {
            &[hi, lo] => Ok(u16::from_be_bytes([hi, lo])),
            _ => Err(Stop::Bad(overrun)),
        }
    }

    /// A vector with a `width`-byte (1 or 2) length prefix: returns a cursor over its contents and
    /// moves past it, even if its contents have not all arrived (later reads then stop Short).
    fn vector(&mut self, width: usize, overrun: &'static str) -> Result<Cursor<'a>, Stop> {
        let len = if width == 1 { usize::from(self.u8(overrun)?) } else { usize::from(self.u16(overrun)?) };
        let start = self.pos;
        let end = start.checked_add(len).filter(|&end| end <= self.end).ok_or(Stop::Bad(overrun))?;
        self.pos = end;
        Ok(Cursor { data: self.data, pos: start, end })
    }

    fn len(&self) -> usize {
        self.end.saturating_sub(self.pos)
    }
}

/// The extensions the proxy reads, borrowed from the body.
struct Fields<'a> {
    sni: Option<&'a [u8]>,
    ech: bool,
    /// The validated ProtocolNameList contents.
    alpn: Option<Cursor<'a>>,
}

/// Parses a ClientHello body of declared length `body_len` from the `data` available so far.
fn parse_body(data: &[u8], body_len: usize) -> Result<Fields<'_>, Stop> {
    let mut hello = Cursor { data, pos: 0, end: body_len };
    let legacy_version = hello.u16("truncated legacy_version")?;
    if !(0x0301..=0x03ff).contains(&legacy_version) {
        return Err(Stop::Bad("legacy_version is not TLS 1.0 or later"));
    }
    hello.take(32, "truncated random")?;
    let session_id = hello.vector(1, "session_id overruns the ClientHello")?;
    if session_id.len() > 32 {
        return Err(Stop::Bad("session_id longer than 32 bytes"));
    }
    let cipher_suites = hello.vector(2, "cipher_suites overrun the ClientHello")?;
    if cipher_suites.len() < 2 || cipher_suites.len() % 2 != 0 {
        return Err(Stop::Bad("cipher_suites length is zero or odd"));
    }
    let compression = hello.vector(1, "compression_methods overrun the ClientHello")?;
    if compression.is_empty() {
        return Err(Stop::Bad("no compression_methods"));
    }

    let mut fields = Fields { sni: None, ech: false, alpn: None };
    if hello.is_empty() {
        // No extensions block at all (pre-TLS 1.2 clients).
        return Ok(fields);
    }
    let mut extensions = hello.vector(2, "extensions overrun the ClientHello")?;
    if !hello.is_empty() {
        return Err(Stop::Bad("trailing bytes after the extensions"));
    }
    // One bit per extension type, for duplicate detection without allocating.
    let mut seen = [0u64; 1 << 10];
    while !extensions.is_empty() {
        let ext_type = extensions.u16("truncated extension header")?;
        let mut ext = extensions.vector(2, "extension overruns the extensions block")?;
        let (word, bit) = (usize::from(ext_type >> 6), 1u64 << (ext_type & 63));
        if let Some(slot) = seen.get_mut(word) {
            if *slot & bit != 0 {
                return Err(Stop::Bad("duplicate extension"));
            }
            *slot |= bit;
        }
        match ext_type {
            EXT_SERVER_NAME => fields.sni = Some(server_name(&mut ext)?),
            EXT_ALPN => fields.alpn = Some(alpn(&mut ext)?),
            EXT_ECH => fields.ech = true,
            _ => {}
        }
    }
    Ok(fields)
}

/// The server_name extension of a ClientHello: a ServerNameList holding exactly one host_name.
fn server_name<'a>(ext: &mut Cursor<'a>) -> Result<&'a [u8], Stop> {
    if ext.is_empty() {
        return Err(Stop::Bad("empty server_name extension"));
    }
    let mut list = ext.vector(2, "server_name list overruns the extension")?;
    if !ext.is_empty() {
        return Err(Stop::Bad("trailing bytes after the server_name list"));
    }
    if list.is_empty() {
        return Err(Stop::Bad("empty server_name list"));
    }
    let name_type = list.u8("truncated server_name entry")?;
    if name_type != NAME_TYPE_HOST_NAME {
        return Err(Stop::Bad("server_name entry is not a host_name"));
    }
    let mut name = list.vector(2, "host_name overruns the server_name list")?;
    if name.is_empty() {
        return Err(Stop::Bad("empty host_name"));
    }
    if name.len() > MAX_HOST_NAME {
        return Err(Stop::Bad("host_name longer than 255 bytes"));
    }
    if !list.is_empty() {
        return Err(Stop::Bad("more than one server_name entry"));
    }
    let len = name.len();
    let bytes = name.take(len, "truncated host_name")?;
    if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(Stop::Bad("host_name is not printable ASCII"));
    }
    Ok(bytes)
}

/// The ALPN extension: a non-empty ProtocolNameList of non-empty names, exactly filling it.
/// Returns a cursor over the list contents, decoded by [`alpn_names`] once the hello is done.
fn alpn<'a>(ext: &mut Cursor<'a>) -> Result<Cursor<'a>, Stop> {
    let list = ext.vector(2, "ALPN list overruns the extension")?;
    if !ext.is_empty() {
        return Err(Stop::Bad("trailing bytes after the ALPN list"));
    }
    if list.is_empty() {
        return Err(Stop::Bad("empty ALPN list"));
    }
    let mut names = Cursor { data: list.data, pos: list.pos, end: list.end };
    while !names.is_empty() {
        let mut name = names.vector(1, "ALPN protocol name overruns the list")?;
        if name.is_empty() {
            return Err(Stop::Bad("empty ALPN protocol name"));
        }
        let len = name.len();
        name.take(len, "truncated ALPN protocol name")?;
    }
    Ok(list)
}

/// Decodes a validated, complete ProtocolNameList: the first [`MAX_ALPN`] names, lossily.
fn alpn_names(list: Option<Cursor<'_>>) -> Vec<String> {
    let Some(mut list) = list else { return Vec::new() };
    let mut names = Vec::new();
    while names.len() < MAX_ALPN && !list.is_empty() {
        let Ok(mut name) = list.vector(1, "") else { break };
        let len = name.len();
        let Ok(bytes) = name.take(len, "") else { break };
        names.push(String::from_utf8_lossy(bytes).into_owned());
    }
    names
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use proptest::prelude::*;

    // --- Real ClientHellos from rustls --------------------------------------------------

    fn rustls_hello_with(name: &str, alpn: &[&str]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("server name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).expect("client connection");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("write_tls");
        }
        out
    }

    fn rustls_hello() -> Vec<u8> {
        rustls_hello_with("www.example.org", &[])
    }

    fn done(buf: &[u8]) -> ClientHello {
        match parse(buf) {
            Ok(Parse::Done(hello)) => hello,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn malformed(buf: &[u8]) {
        match parse(buf) {
            Err(HelloError::Malformed(_)) => {}
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    /// Splits the handshake bytes of `records` (which must be handshake records) and
    /// re-frames them into records whose fragments have the sizes `sizes` yields.
    fn reframe(records: &[u8], mut sizes: impl FnMut() -> usize) -> Vec<u8> {
        let mut handshake = Vec::new();
        let mut pos = 0;
        let version = [records[1], records[2]];
        while pos < records.len() {
            assert_eq!(records[pos], CONTENT_HANDSHAKE);
            let len = usize::from(u16::from_be_bytes([records[pos + 3], records[pos + 4]]));
            handshake.extend_from_slice(&records[pos + 5..pos + 5 + len]);
            pos += 5 + len;
        }
        frame(&handshake, version, &mut sizes)
    }

    fn frame(handshake: &[u8], version: [u8; 2], mut sizes: impl FnMut() -> usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = handshake;
        while !rest.is_empty() {
            let n = sizes().clamp(1, MAX_FRAGMENT).min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            out.push(CONTENT_HANDSHAKE);
            out.extend_from_slice(&version);
            out.extend_from_slice(&u16::try_from(n).expect("fragment fits u16").to_be_bytes());
            out.extend_from_slice(chunk);
            rest = tail;
        }
        out
    }

    #[test]
    fn rustls_hello_yields_sni() {
        let bytes = rustls_hello();
        let hello = done(&bytes);
        assert_eq!(hello.sni.as_deref(), Some("www.example.org"));
        assert!(!hello.ech);
        assert!(hello.alpn.is_empty());
        assert_eq!(hello.record_bytes, bytes.len());
    }

    #[test]
    fn rustls_hello_to_ip_address_has_no_sni() {
        let bytes = rustls_hello_with("192.0.2.1", &[]);
        let hello = done(&bytes);
        assert_eq!(hello.sni, None);
        let bytes = rustls_hello_with("2001:db8::1", &[]);
        assert_eq!(done(&bytes).sni, None);
    }

    #[test]
    fn rustls_hello_with_alpn() {
        let bytes = rustls_hello_with("www.example.org", &["h2", "http/1.1"]);
        let hello = done(&bytes);
        assert_eq!(hello.sni.as_deref(), Some("www.example.org"));
        assert_eq!(hello.alpn, ["h2", "http/1.1"]);
    }

    #[test]
    fn rustls_hello_byte_by_byte() {
        let bytes = rustls_hello();
        for end in 0..bytes.len() {
            assert_eq!(parse(&bytes[..end]), Ok(Parse::Incomplete), "prefix of {end} bytes");
        }
        assert_eq!(done(&bytes).sni.as_deref(), Some("www.example.org"));
    }

    #[test]
    fn bytes_after_the_hello_are_not_counted() {
        let mut bytes = rustls_hello();
        let len = bytes.len();
        bytes.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3]);
        let hello = done(&bytes);
        assert_eq!(hello.record_bytes, len);
        assert_eq!(hello.sni.as_deref(), Some("www.example.org"));
    }

    #[test]
    fn rustls_hello_split_across_tiny_records() {
        let bytes = rustls_hello();
        let mut next = 0;
        let reframed = reframe(&bytes, || {
            next = next % 7 + 1;
            next
        });
        assert!(reframed.len() > bytes.len() + 5 * 40, "many records");
        let hello = done(&reframed);
        assert_eq!(hello.sni.as_deref(), Some("www.example.org"));
        assert_eq!(hello.record_bytes, reframed.len());
        for end in 0..reframed.len() {
            assert_eq!(parse(&reframed[..end]), Ok(Parse::Incomplete), "prefix of {end} bytes");
        }
        // One byte per record, too.
        assert_eq!(done(&reframe(&bytes, || 1)).sni.as_deref(), Some("www.example.org"));
    }

    // --- Hand-built ClientHellos ----------------------------------------------------------

    /// Writes TLS vectors, remembering where each length prefix is (offset, width).
    #[derive(Default)]
    struct Writer {
        out: Vec<u8>,
        lengths: Vec<(usize, usize)>,
    }

    impl Writer {
        fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
            self.out.extend_from_slice(bytes);
            self
        }

        fn u16(&mut self, value: u16) -> &mut Self {
            self.bytes(&value.to_be_bytes())
        }

        /// A vector with a `width`-byte length prefix whose contents `f` writes.
        fn vector(&mut self, width: usize, f: impl FnOnce(&mut Self)) -> &mut Self {
            let at = self.out.len();
            self.lengths.push((at, width));
            self.out.extend(std::iter::repeat_n(0, width));
            f(self);
            let len = self.out.len() - at - width;
            let be = len.to_be_bytes();
            self.out[at..at + width].copy_from_slice(&be[be.len() - width..]);
            self
        }
    }

    #[derive(Clone, Debug)]
    struct Builder {
        record_version: u16,
        legacy_version: u16,
        session_id: Vec<u8>,
        cipher_suites: Vec<u8>,
        compression: Vec<u8>,
        /// None: no extensions block at all.
        extensions: Option<Vec<(u16, Vec<u8>)>>,
        max_fragment: usize,
    }

    impl Default for Builder {
        fn default() -> Self {
            Builder {
                record_version: 0x0301,
                legacy_version: 0x0303,
                session_id: vec![7; 32],
                cipher_suites: vec![0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f],
                compression: vec![0],
                extensions: Some(vec![
                    (EXT_SERVER_NAME, sni_ext(&[(0, b"www.example.org")])),
                    (EXT_ALPN, alpn_ext(&[b"h2", b"http/1.1"])),
                    (0x002b, vec![4, 0x03, 0x04, 0x03, 0x03]),
                ]),
                max_fragment: MAX_FRAGMENT,
            }
        }
    }

    impl Builder {
        fn ext(mut self, ext_type: u16, data: Vec<u8>) -> Self {
            self.extensions.get_or_insert_with(Vec::new).push((ext_type, data));
            self
        }

        fn without(mut self, ext_type: u16) -> Self {
            if let Some(exts) = &mut self.extensions {
                exts.retain(|(t, _)| *t != ext_type);
            }
            self
        }

        /// The records, plus the offsets of every length field in them (offset, width).
        fn build_with_lengths(&self) -> (Vec<u8>, Vec<(usize, usize)>) {
            let mut w = Writer::default();
            w.out.push(HANDSHAKE_CLIENT_HELLO);
            w.lengths.push((1, 3));
            w.out.extend_from_slice(&[0, 0, 0]);
            w.u16(self.legacy_version).bytes(&[0xaa; 32]);
            w.vector(1, |w| {
                w.bytes(&self.session_id);
            });
            w.vector(2, |w| {
                w.bytes(&self.cipher_suites);
            });
            w.vector(1, |w| {
                w.bytes(&self.compression);
            });
            if let Some(exts) = &self.extensions {
                w.vector(2, |w| {
                    for (ext_type, data) in exts {
                        w.u16(*ext_type).vector(2, |w| {
                            let at = w.out.len();
                            w.lengths.extend(inner_lengths(*ext_type, data).into_iter().map(|(o, n)| (at + o, n)));
                            w.bytes(data);
                        });
                    }
                });
            }
            let body_len = w.out.len() - 4;
            w.out[1..4].copy_from_slice(&u32::try_from(body_len).expect("fits").to_be_bytes()[1..]);
            let handshake = w.out;
            // Frame, shifting handshake offsets by the record headers before them.
            let records = frame(&handshake, self.record_version.to_be_bytes(), || self.max_fragment);
            let mut lengths = Vec::new();
            for (at, width) in w.lengths {
                // Length fields straddling two records are left out.
                let record = at / self.max_fragment;
                if (at + width - 1) / self.max_fragment == record {
                    lengths.push((at + 5 * (record + 1), width));
                }
            }
            let mut record_at = 0;
            while record_at < records.len() {
                lengths.push((record_at + 3, 2));
                let len = usize::from(u16::from_be_bytes([records[record_at + 3], records[record_at + 4]]));
                record_at += 5 + len;
            }
            (records, lengths)
        }

        fn build(&self) -> Vec<u8> {
            self.build_with_lengths().0
        }
    }

    /// The length fields inside well-formed server_name and ALPN extension data.
    fn inner_lengths(ext_type: u16, data: &[u8]) -> Vec<(usize, usize)> {
        let mut lengths = vec![(0, 2)];
        let mut pos = 2;
        match ext_type {
            EXT_SERVER_NAME if data.len() > 2 => {
                while pos + 3 <= data.len() {
                    lengths.push((pos + 1, 2));
                    pos += 3 + usize::from(u16::from_be_bytes([data[pos + 1], data[pos + 2]]));
                }
            }
            EXT_ALPN if data.len() > 2 => {
                while pos < data.len() {
                    lengths.push((pos, 1));
                    pos += 1 + usize::from(data[pos]);
                }
            }
            _ => lengths.clear(),
        }
        lengths
    }

    fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut w = Writer::default();
        w.vector(2, |w| {
            for (name_type, name) in entries {
                w.bytes(&[*name_type]).vector(2, |w| {
                    w.bytes(name);
                });
            }
        });
        w.out
    }

    fn alpn_ext(names: &[&[u8]]) -> Vec<u8> {
        let mut w = Writer::default();
        w.vector(2, |w| {
            for name in names {
                w.vector(1, |w| {
                    w.bytes(name);
                });
            }
        });
        w.out
    }

    #[test]
    fn built_hello_parses() {
        let bytes = Builder::default().build();
        let hello = done(&bytes);
        assert_eq!(hello.sni.as_deref(), Some("www.example.org"));
        assert_eq!(hello.alpn, ["h2", "http/1.1"]);
        assert!(!hello.ech);
        assert_eq!(hello.record_bytes, bytes.len());
    }

    #[test]
    fn hello_without_extensions_has_no_sni() {
        let hello = done(&Builder { extensions: None, ..Builder::default() }.build());
        assert_eq!(hello.sni, None);
        assert!(hello.alpn.is_empty());
        let hello = done(&Builder { extensions: Some(Vec::new()), ..Builder::default() }.build());
        assert_eq!(hello.sni, None);
    }

    #[test]
    fn hello_larger_than_one_record() {
        let builder = Builder::default().ext(21, vec![0; 20_000]);
        let bytes = builder.build();
        assert!(bytes.len() > MAX_FRAGMENT + 5);
        assert_eq!(bytes[MAX_FRAGMENT + 5], CONTENT_HANDSHAKE, "two records");
        let hello = done(&bytes);
        assert_eq!(hello.sni.as_deref(), Some("www.example.org"));
        assert_eq!(hello.record_bytes, bytes.len());
        for end in [0, 1, 5, 100, MAX_FRAGMENT + 4, MAX_FRAGMENT + 5, MAX_FRAGMENT + 10, bytes.len() - 1] {
            assert_eq!(parse(&bytes[..end]), Ok(Parse::Incomplete), "prefix of {end} bytes");
        }
    }

    #[test]
    fn hello_near_the_size_limit() {
        // The largest body that fits: 4 records' worth of framing within MAX_HELLO_BYTES.
        let base = Builder::default().ext(21, Vec::new()).build().len();
        let pad = MAX_HELLO_BYTES - base - 3 * RECORD_HEADER;
        let bytes = Builder::default().ext(21, vec![0; pad]).build();
        assert_eq!(bytes.len(), MAX_HELLO_BYTES);
        assert_eq!(done(&bytes).record_bytes, MAX_HELLO_BYTES);
        // One byte more cannot fit, which the first record header already proves.
        let bytes = Builder::default().ext(21, vec![0; pad + 1]).build();
        assert_eq!(parse(&bytes), Err(HelloError::TooLarge));
        assert_eq!(parse(&bytes[..9]), Err(HelloError::TooLarge));
        assert_eq!(parse(&bytes[..8]), Ok(Parse::Incomplete));
    }

    #[test]
    fn handshake_length_beyond_the_limit_is_too_large() {
        let mut bytes = Builder::default().build();
        let len = u32::try_from(MAX_HELLO_BYTES + 1).expect("fits").to_be_bytes();
        bytes[6..9].copy_from_slice(&len[1..]);
        assert_eq!(parse(&bytes), Err(HelloError::TooLarge));
        bytes[6..9].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert_eq!(parse(&bytes), Err(HelloError::TooLarge));
    }

    #[test]
    fn endless_tiny_records_are_too_large() {
        // A valid-looking stream of 1-byte records never completing the hello.
        let mut handshake = Builder::default().ext(21, vec![0; 20_000]).build();
        handshake.drain(..5);
        handshake.truncate(MAX_FRAGMENT);
        let bytes = frame(&handshake, [3, 1], || 1);
        assert_eq!(parse(&bytes[..30_000]), Ok(Parse::Incomplete));
        // Decided before the buffer reaches the limit: the remaining body cannot fit any more.
        let first_too_large = (30_000..MAX_HELLO_BYTES)
            .step_by(997)
            .find(|&end| parse(&bytes[..end]).is_err())
            .expect("decided before the limit");
        assert_eq!(parse(&bytes[..first_too_large]), Err(HelloError::TooLarge));
        assert_eq!(parse(&bytes[..MAX_HELLO_BYTES]), Err(HelloError::TooLarge));
        assert_eq!(parse(&bytes), Err(HelloError::TooLarge));
    }

    #[test]
    fn two_server_name_extensions_are_malformed() {
        let bytes = Builder::default().ext(EXT_SERVER_NAME, sni_ext(&[(0, b"evil.example")])).build();
        malformed(&bytes);
    }

    #[test]
    fn duplicate_extensions_are_malformed() {
        malformed(&Builder::default().ext(0x002b, vec![2, 3, 4]).build());
        malformed(&Builder::default().ext(0xffff, Vec::new()).ext(0xffff, Vec::new()).build());
    }

    #[test]
    fn two_host_names_are_malformed() {
        let sni = sni_ext(&[(0, b"www.example.org"), (0, b"evil.example")]);
        malformed(&Builder::default().without(EXT_SERVER_NAME).ext(EXT_SERVER_NAME, sni).build());
    }

    #[test]
    fn other_name_types_are_malformed() {
        let sni = sni_ext(&[(0, b"www.example.org"), (1, b"x")]);
        malformed(&Builder::default().without(EXT_SERVER_NAME).ext(EXT_SERVER_NAME, sni).build());
        let sni = sni_ext(&[(1, b"www.example.org")]);
        malformed(&Builder::default().without(EXT_SERVER_NAME).ext(EXT_SERVER_NAME, sni).build());
    }

    #[test]
    fn empty_server_name_forms_are_malformed() {
        for data in [Vec::new(), vec![0, 0], sni_ext(&[(0, b"")])] {
            malformed(&Builder::default().without(EXT_SERVER_NAME).ext(EXT_SERVER_NAME, data).build());
        }
    }

    #[test]
    fn host_name_bytes_are_checked() {
        for name in [&b"caf\xc3\xa9.example"[..], b"a\0.example", b"a b", b"tab\t", b"\x7f", &[0xff; 3]] {
            let sni = sni_ext(&[(0, name)]);
            malformed(&Builder::default().without(EXT_SERVER_NAME).ext(EXT_SERVER_NAME, sni).build());
        }
        let long = vec![b'a'; 256];
        let sni = sni_ext(&[(0, &long)]);
        malformed(&Builder::default().without(EXT_SERVER_NAME).ext(EXT_SERVER_NAME, sni).build());
        let longest = vec![b'a'; 255];
        let sni = sni_ext(&[(0, &longest)]);
        let hello = done(&Builder::default().without(EXT_SERVER_NAME).ext(EXT_SERVER_NAME, sni).build());
        assert_eq!(hello.sni.as_deref().map(str::len), Some(255));
        // Not normalised: case and a trailing dot are kept as sent.
        let sni = sni_ext(&[(0, b"WWW.Example.ORG.")]);
        let hello = done(&Builder::default().without(EXT_SERVER_NAME).ext(EXT_SERVER_NAME, sni).build());
        assert_eq!(hello.sni.as_deref(), Some("WWW.Example.ORG."));
    }

    #[test]
    fn server_name_trailing_bytes_are_malformed() {
        let mut sni = sni_ext(&[(0, b"www.example.org")]);
        sni.push(0);
        malformed(&Builder::default().without(EXT_SERVER_NAME).ext(EXT_SERVER_NAME, sni).build());
    }

    #[test]
    fn alpn_forms() {
        let names: Vec<Vec<u8>> = (0..12).map(|i| format!("p{i}").into_bytes()).collect();
        let refs: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
        let hello = done(&Builder::default().without(EXT_ALPN).ext(EXT_ALPN, alpn_ext(&refs)).build());
        assert_eq!(hello.alpn, ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]);
        let hello = done(&Builder::default().without(EXT_ALPN).ext(EXT_ALPN, alpn_ext(&[b"\xff\xfeh2"])).build());
        assert_eq!(hello.alpn, ["\u{fffd}\u{fffd}h2"]);
        for bad in [Vec::new(), vec![0, 0], alpn_ext(&[b"h2", b""]), vec![0, 3, 2, b'h', b'2', 0]] {
            malformed(&Builder::default().without(EXT_ALPN).ext(EXT_ALPN, bad).build());
        }
    }

    #[test]
    fn ech_is_reported_with_the_outer_name() {
        let hello = done(&Builder::default().ext(EXT_ECH, vec![0, 0, 1, 0, 1, 9, 0, 0, 0, 0]).build());
        assert!(hello.ech);
        assert_eq!(hello.sni.as_deref(), Some("www.example.org"));
    }

    #[test]
    fn session_id_of_33_is_malformed() {
        malformed(&Builder { session_id: vec![1; 33], ..Builder::default() }.build());
        done(&Builder { session_id: Vec::new(), ..Builder::default() }.build());
    }

    #[test]
    fn cipher_suites_and_compression_are_checked() {
        malformed(&Builder { cipher_suites: vec![0x13, 0x01, 0x13], ..Builder::default() }.build());
        malformed(&Builder { cipher_suites: Vec::new(), ..Builder::default() }.build());
        malformed(&Builder { compression: Vec::new(), ..Builder::default() }.build());
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        // A byte after the extensions block, inside the handshake body.
        let mut bytes = Builder::default().build();
        bytes.push(0);
        bytes[4] += 1;
        bytes[8] += 1;
        malformed(&bytes);
        // A byte inside the extensions block that is no whole extension.
        let builder = Builder::default();
        let (mut bytes, lengths) = builder.build_with_lengths();
        bytes.push(0);
        bytes[4] += 1;
        bytes[8] += 1;
        // Length fields in order: handshake, session_id, cipher_suites, compression, extensions.
        let (ext_block, width) = lengths[4];
        assert_eq!(width, 2);
        bytes[ext_block + 1] += 1;
        malformed(&bytes);
    }

    #[test]
    fn record_content_types() {
        let mut bytes = Builder::default().build();
        bytes[0] = 0x17;
        assert_eq!(parse(&bytes), Err(HelloError::NotTls));
        assert_eq!(parse(&[0x17]), Err(HelloError::NotTls));
        assert_eq!(parse(&[0x15, 3, 3, 0, 2, 2, 40]), Err(HelloError::NotTls));
        // After a first handshake fragment, another content type is Malformed.
        let bytes = Builder { max_fragment: 50, ..Builder::default() }.build();
        for content_type in [0x14, 0x15, 0x17, 0x18, 0x80] {
            let mut bad = bytes.clone();
            bad[55] = content_type;
            malformed(&bad);
            malformed(&bad[..56]);
        }
        assert_eq!(parse(&bytes[..55]), Ok(Parse::Incomplete));
    }

    #[test]
    fn non_tls_protocols() {
        let sslv2 = [0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10];
        assert_eq!(parse(&sslv2), Err(HelloError::NotTls));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HelloError::NotTls));
        assert_eq!(parse(b"CONNECT x:443 HTTP/1.1"), Err(HelloError::NotTls));
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.6\r\n"), Err(HelloError::NotTls));
        assert_eq!(parse(b"G"), Err(HelloError::NotTls));
        assert_eq!(parse(&[0x16, 2]), Err(HelloError::NotTls));
        assert_eq!(parse(&[0x16, 3, 5]), Err(HelloError::NotTls));
        assert_eq!(parse(&[0x16, 0x03, 0x01, 0x02]), Ok(Parse::Incomplete));
        assert_eq!(parse(&[]), Ok(Parse::Incomplete));
        assert_eq!(parse(&[0x16]), Ok(Parse::Incomplete));
    }

    #[test]
    fn record_versions() {
        for minor in 0..=4 {
            let record_version = 0x0300 | minor;
            let hello = done(&Builder { record_version, ..Builder::default() }.build());
            assert_eq!(hello.sni.as_deref(), Some("www.example.org"));
        }
        // An SSLv3 record version is fine, an SSLv3 ClientHello is not.
        malformed(&Builder { record_version: 0x0300, legacy_version: 0x0300, ..Builder::default() }.build());
        malformed(&Builder { legacy_version: 0x0200, ..Builder::default() }.build());
        malformed(&Builder { legacy_version: 0x0401, ..Builder::default() }.build());
        done(&Builder { legacy_version: 0x0301, ..Builder::default() }.build());
        // A later record with a bad version is Malformed, not NotTls.
        let mut bytes = Builder { max_fragment: 50, ..Builder::default() }.build();
        bytes[56] = 2;
        malformed(&bytes);
    }

    #[test]
    fn record_lengths() {
        let mut bytes = Builder::default().build();
        bytes[3..5].copy_from_slice(&16385u16.to_be_bytes());
        malformed(&bytes);
        malformed(&bytes[..5]);
        bytes[3..5].copy_from_slice(&0u16.to_be_bytes());
        malformed(&bytes[..5]);
        // A zero-length record after the first fragment.
        let mut bytes = Builder { max_fragment: 50, ..Builder::default() }.build();
        bytes[58..60].copy_from_slice(&[0, 0]);
        malformed(&bytes);
    }

    #[test]
    fn first_handshake_message_must_be_client_hello() {
        let mut bytes = Builder::default().build();
        bytes[5] = 2;
        malformed(&bytes);
        malformed(&bytes[..6]);
    }

    #[test]
    fn handshake_header_split_across_records() {
        let bytes = Builder::default().build();
        let mut sizes = [1, 1, 1, 2, 100, MAX_FRAGMENT].into_iter();
        let reframed = reframe(&bytes, || sizes.next().unwrap_or(MAX_FRAGMENT));
        assert_eq!(done(&reframed).sni.as_deref(), Some("www.example.org"));
    }

    #[test]
    fn data_after_the_hello_in_its_record_is_ignored() {
        let mut bytes = Builder::default().build();
        // A second handshake message in the same record (garbage, unparsed).
        bytes.extend_from_slice(&[0x14, 0, 0, 0]);
        let record_len = u16::from_be_bytes([bytes[3], bytes[4]]) + 4;
        bytes[3..5].copy_from_slice(&record_len.to_be_bytes());
        let hello = done(&bytes);
        assert_eq!(hello.record_bytes, bytes.len());
        // Until the record is complete, the hello is not done.
        assert_eq!(parse(&bytes[..bytes.len() - 1]), Ok(Parse::Incomplete));
    }

    /// Every length field in turn set shorter, longer, zero and maximal.
    #[test]
    fn wrong_lengths_at_every_field() {
        for builder in [Builder::default(), Builder { max_fragment: 64, ..Builder::default() }] {
            let (bytes, lengths) = builder.build_with_lengths();
            assert!(lengths.len() >= 14, "{lengths:?}");
            for &(at, width) in &lengths {
                let field = &bytes[at..at + width];
                let orig = field.iter().fold(0usize, |acc, &b| acc << 8 | usize::from(b));
                let max = (1usize << (8 * width)) - 1;
                for value in [0, orig.saturating_sub(1), orig + 1, orig + 100, max] {
                    if value == orig || value > max {
                        continue;
                    }
                    let mut bad = bytes.clone();
                    let be = value.to_be_bytes();
                    bad[at..at + width].copy_from_slice(&be[be.len() - width..]);
                    for end in [bad.len(), bad.len() - 1, at + width] {
                        match parse(&bad[..end]) {
                            Ok(Parse::Incomplete) | Err(HelloError::Malformed(_) | HelloError::TooLarge) => {}
                            other => panic!("length at {at} set to {value}, {end} bytes: {other:?}"),
                        }
                    }
                }
            }
        }
    }

    // --- Properties ---------------------------------------------------------------------

    fn host_name() -> impl Strategy<Value = String> {
        "[a-z0-9-]{1,20}(\\.[a-z0-9-]{1,20}){0,4}"
    }

    prop_compose! {
        fn arb_builder()(
            record_version in 0x0300u16..=0x0304,
            legacy_version in 0x0301u16..=0x0304,
            session_id in proptest::collection::vec(any::<u8>(), 0..=32),
            suites in proptest::collection::vec(any::<u16>(), 1..20),
            compression in proptest::collection::vec(any::<u8>(), 1..4),
            sni in proptest::option::of(host_name()),
            alpn in proptest::collection::vec("[a-z0-9/.]{1,10}", 0..10),
            ech in any::<bool>(),
            others in proptest::collection::btree_map(17u16..0xfe00, proptest::collection::vec(any::<u8>(), 0..40), 0..6),
            max_fragment in prop_oneof![Just(MAX_FRAGMENT), 1usize..300],
        ) -> (Builder, Option<String>, Vec<String>, bool) {
            let mut exts = Vec::new();
            if let Some(name) = &sni {
                exts.push((EXT_SERVER_NAME, sni_ext(&[(0, name.as_bytes())])));
            }
            if !alpn.is_empty() {
                let names: Vec<&[u8]> = alpn.iter().map(|s| s.as_bytes()).collect();
                exts.push((EXT_ALPN, alpn_ext(&names)));
            }
            if ech {
                exts.push((EXT_ECH, vec![1, 2, 3]));
            }
            exts.extend(others);
            let builder = Builder {
                record_version,
                legacy_version,
                session_id,
                cipher_suites: suites.iter().flat_map(|s| s.to_be_bytes()).collect(),
                compression,
                extensions: Some(exts),
                max_fragment,
            };
            let alpn = alpn.into_iter().take(MAX_ALPN).collect();
            (builder, sni, alpn, ech)
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn never_panics_behind_a_record_header(
            version in 0u8..=4,
            len in 0usize..600,
            rest in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut bytes = vec![CONTENT_HANDSHAKE, 3, version];
            bytes.extend_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
            bytes.push(HANDSHAKE_CLIENT_HELLO);
            bytes.extend_from_slice(&rest);
            if let Ok(Parse::Done(hello)) = parse(&bytes) {
                prop_assert!(hello.record_bytes <= bytes.len());
            }
        }

        #[test]
        fn generated_hellos_parse_and_prefixes_are_incomplete((builder, sni, alpn, ech) in arb_builder()) {
            let bytes = builder.build();
            let hello = match parse(&bytes) {
                Ok(Parse::Done(hello)) => hello,
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            prop_assert_eq!(hello.sni, sni);
            prop_assert_eq!(hello.alpn, alpn);
            prop_assert_eq!(hello.ech, ech);
            prop_assert_eq!(hello.record_bytes, bytes.len());
            for end in 0..bytes.len() {
                prop_assert_eq!(parse(&bytes[..end]), Ok(Parse::Incomplete));
            }
        }

        #[test]
        fn prefixes_of_a_real_hello_are_incomplete(end in 0usize..10_000, fragment in 1usize..64) {
            let bytes = reframe(&rustls_hello(), || fragment);
            let end = end % bytes.len();
            prop_assert_eq!(parse(&bytes[..end]), Ok(Parse::Incomplete));
            let hello = done(&bytes);
            prop_assert_eq!(hello.sni.as_deref(), Some("www.example.org"));
        }

        #[test]
        fn single_byte_mutations_never_panic(at in any::<prop::sample::Index>(), byte in any::<u8>(), fragment in prop_oneof![Just(MAX_FRAGMENT), 1usize..40]) {
            let mut bytes = reframe(&rustls_hello_with("www.example.org", &["h2"]), || fragment);
            let at = at.index(bytes.len());
            bytes[at] = byte;
            for end in [bytes.len(), at + 1] {
                if let Ok(Parse::Done(hello)) = parse(&bytes[..end]) {
                    prop_assert!(hello.record_bytes <= end);
                }
            }
        }

        #[test]
        fn mutated_generated_hellos_never_panic(
            (builder, _, _, _) in arb_builder(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = builder.build();
            let at = at.index(bytes.len());
            bytes[at] = byte;
            if let Ok(Parse::Done(hello)) = parse(&bytes) {
                prop_assert!(hello.record_bytes <= bytes.len());
            }
        }
    }
}
