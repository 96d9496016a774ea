//! DNS-tunneling detection: flags query names that carry data to a zone an attacker runs
//! (iodine, dnscat2, DNSExfiltrator and home-made exfiltrators), including names that an
//! allowed wildcard covers. Two stateless checks look at one name: its length and the
//! entropy of its long label runs. Two stateful checks count, per client address and
//! registrable domain (Public Suffix List), the unique subdomains in a sliding minute and
//! the bytes of unique subdomains in a day (the bound of Paxson et al.). The detector only
//! reports a [`Finding`]; the caller applies `dns.tunneling.action`. Time is injected
//! (`now`), memory is bounded whatever clients send, and in the common case (a client and
//! domain already tracked, a name seen before) [`Detector::check`] allocates nothing and
//! takes about 100 ns.
//!
//! # Why these signals
//!
//! A tunnel has to put its data in the query name, and every name must be new: a name
//! asked before comes back from a resolver's cache and never reaches the attacker's
//! authoritative server. So a tunnel shows as long names, random-looking labels, many
//! unique subdomains under one domain, and many bytes of them. The thresholds come from
//! published tools and measurements:
//!
//! * iodine (Ekman and Andersson) packs upstream data into 63-character labels, sizes
//!   hostnames by its `-M` option ("~100-255, default: 255"), and encodes in Base32 (its
//!   alphabet `a-z0-5`), Base64, Base64u or Base128. DNSExfiltrator (Arno0x) sends
//!   zipped, RC4-encrypted files in base64url or base32, with 63-character labels and
//!   255-byte requests by default. dnscat2 (Bowes) hex-encodes its packets into the name.
//!   All three send names of 200 or more characters unless told otherwise;
//!   ordinary names stay well under 120 (see the calibration tests).
//! * Published detection work (for example Born and Gustafson, "Detecting DNS Tunnels
//!   Using Character Frequency Analysis", 2010; Farnham, "Detecting DNS Tunneling", SANS
//!   Institute, 2013) looks at name length and at character statistics, and rules in
//!   common use flag subdomains above roughly 4 bits/character of Shannon entropy or
//!   names longer than about 100 characters. [`label_entropy`] is that measure, corrected
//!   for the length of the label (0.9 corresponds to 3.9 bits at 33 characters and to
//!   4.3 bits at 63).
//! * Paxson, Christodorescu, Javed, Rao, Sailer, Schales, Stoecklin, Thomas, Venema and
//!   Weaver, "Practical Comprehensive Bounds on Surreptitious Communication Over DNS",
//!   USENIX Security 2013: bound the information that each client can send under each
//!   registered domain, per day; 4 KB/day gave an alert volume a large site could work
//!   through. They measure information by compressing the names; this module counts the
//!   raw bytes of first-seen subdomains, which can only over-estimate that information
//!   (a compressible name such as `host-0042` counts in full), so it alerts no later than
//!   their bound and sometimes on names their measure would pass.
//!
//! # What each signal misses
//!
//! * **NameLength** misses every tunnel configured for shorter names (`iodine -M 100`,
//!   DNSExfiltrator `r=100`): that costs them throughput, and the budgets still see them.
//! * **LabelEntropy** measures only separator-free runs of 33 or more characters that mix
//!   letters and digits ([`MIN_ENTROPY_RUN`], [`MIN_CLASS_SWITCHES`]), and never hex. So it
//!   misses hex encodings (dnscat2), data split into labels of 32 characters or fewer,
//!   base64url data whose `-` and `_` break it into short runs, letters-only encodings
//!   and dictionary encodings, and catches only 76–89% of random Base32 runs of 33–40
//!   characters (99.5% at 63). It fires on genuine random identifiers longer than 32
//!   characters, such as IPFS CIDs in subdomain-gateway names (59 characters of base32).
//!   Punycode labels (`xn--`) are skipped: long non-Latin labels encode to random-looking
//!   Punycode, and the name normaliser admits only valid Punycode there.
//! * **UniqueSubdomains** misses any tunnel slower than the threshold (300 a minute is
//!   5 a second), which is left to the day budget. It fires on legitimate data-over-DNS
//!   lookups: DNS blocklists (`4.3.2.1.zen.spamhaus.org` for each mail connection),
//!   anti-virus reputation lookups of file hashes, and busy sharded services.
//! * **InfoBudget** lets a patient attacker move up to the budget per client and
//!   registrable domain per day (4 KiB is enough for a private key). Using many registered
//!   domains, or a wildcard over a public suffix where every label is its own registrable
//!   domain (`*.s3.amazonaws.com`, flagged by the config lint), multiplies it. The day is
//!   a fixed 24 hours from the first counted subdomain, so a burst across its end can send
//!   up to twice the budget in a short time.
//! * Both budgets forget a (client, domain) pair when more than the tracked-pair cap of
//!   other pairs has been seen since (least recently seen first, per shard), so a client
//!   that can make ~[`DEFAULT_MAX_TRACKED`] new pairs can reset its own counts.
//! * Nothing here looks at answers: data sent down to the client in TXT or NULL records
//!   is limited by the query-type allow-list, not by this module. Names arrive lowercased,
//!   so base64's case carries data that the entropy measure does not see (the bytes still
//!   count toward the budgets).
//!
//! # Memory
//!
//! At most `max_tracked` (client, registrable domain) pairs are kept, in 16 shards (one
//! below 4096 pairs), each evicting its least recently seen pair. Per pair: a 96-byte
//! slot and its index entry; the minute window as 32-bit entries (a 28-bit fingerprint of the
//! subdomain and its 10-second bucket), at most `max_unique_subdomains + 1` of them since
//! one more already decides; and the day set, exact 64-bit hashes for the first 16
//! subdomains, then a Bloom filter of `info_budget` bits rounded up to a power of two in
//! 1024..=65536 (512 bytes at 4 KiB). Bytes are only added while under the budget. A
//! Bloom false positive takes a new subdomain for a repeat and under-counts it (it never
//! counts a repeat twice): with 3 hashes and 4096 bits, under 0.1% for the ~100 names
//! of 40 bytes that fill 4 KiB, ~3% at the 512 names of 8 bytes, and ~40% for 1–2
//! byte names, which carry little each. A HyperLogLog sketch would be smaller still but
//! cannot answer "is this a repeat?" (it counts distinct items, not their bytes), and
//! exact hashes would need up to ~2000 × 8 bytes per pair at a 4 KiB budget. At the
//! defaults the worst case is about 1.8 KB per pair, 183 MB for 100 000 pairs, reached
//! only if every pair receives 301 unique names within a minute; a pair with a few names
//! holds about 200 bytes. [`Detector::heap_bound`] computes the bound for a configuration
//! and [`Detector::heap_bytes`] measures the state.

use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use foldhash::quality::SeedableRandomState;
use hashbrown::HashTable;

use crate::config::{TunnelingAction, TunnelingConfig};
use crate::policy::psl::registrable_domain;

/// The signal a finding comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// The query name is longer than `max_name_length`.
    NameLength,
    /// A long label run is as varied as random data ([`label_entropy`] above `max_label_entropy`).
    LabelEntropy,
    /// More than `max_unique_subdomains` unique subdomains of one registrable domain from one
    /// client within a minute.
    UniqueSubdomains,
    /// More than `info_budget` bytes of unique subdomains of one registrable domain from one
    /// client within a day.
    InfoBudget,
}

impl Signal {
    /// A stable snake_case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::NameLength => "name_length",
            Signal::LabelEntropy => "label_entropy",
            Signal::UniqueSubdomains => "unique_subdomains",
            Signal::InfoBudget => "info_budget",
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One detection: the signal and a human explanation with the measured value and the threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub signal: Signal,
    pub detail: String,
}

/// Default bound on tracked (client, registrable domain) pairs.
pub const DEFAULT_MAX_TRACKED: usize = 100_000;

/// Shortest separator-free run of a label whose entropy is measured.
///
/// Random identifiers that clouds put in names go up to 32 characters: Lambda function URL
/// ids and Amazon SES DKIM tokens (32 of `[a-z0-9]`), ACM validation labels (`_` and 32
/// hex), EKS endpoints and Kubernetes-made load balancers (32 hex); API Gateway ids are 10,
/// AppSync and OpenSearch ids 26. No character statistic tells those from encoded data,
/// so they must stay below the minimum: `a1b2c3d4e5f6g7h8i9j0` (20 distinct characters)
/// has the highest entropy a 20-character string can have and passes only because it is
/// short. Tunnel tools fill labels to 63 characters.
pub const MIN_ENTROPY_RUN: usize = 33;

/// Fewest letter/digit alternations a run needs before its entropy counts.
///
/// Shannon entropy over characters cannot tell words run together from encoded data at
/// these lengths: `thisisaverylongbutperfectlyordinaryhostname` scores 0.91, and numbers
/// push words higher (`mystorageaccountprod0001backups2024archive` scores 0.96). Encoded
/// data scatters digits among letters: a random 40-character iodine Base32 run alternates
/// about 12 times on average, a 63-character one about 19, while words alternate twice per
/// number. Eight asks for the equivalent of four numbers inside one run. What it costs is
/// in [`label_entropy`]'s calibration table and the module notes.
pub const MIN_CLASS_SWITCHES: usize = 8;

/// Size of the alphabet of normalised labels: `a-z`, `0-9`, `-`, `_`.
const ALPHABET: f64 = 38.0;
/// Lengths the entropy tables cover; longer inputs (not valid labels) use the limit.
const TABLE_LEN: usize = 256;
/// Width of one bucket of the minute window, in seconds.
const BUCKET_SECS: u64 = 10;
/// Buckets in the window: the current one and the five before it (50 to 60 seconds).
const WINDOW_BUCKETS: u64 = 6;
/// Low bits of a window entry that hold its bucket number (modulo 16).
const TAG_MASK: u32 = 0xF;
/// Most window entries a pair keeps, whatever `max_unique_subdomains` says; a larger
/// threshold can never be exceeded and so disables the signal.
const MAX_WINDOW_ENTRIES: usize = 1 << 16;
/// Window vectors with more room than this are released when the window empties.
const RELEASE_ABOVE: usize = 16;
/// Length of the daily budget, in seconds.
const DAY_SECS: u64 = 86_400;
/// Subdomains kept as exact hashes before a pair's day set becomes a Bloom filter.
const SMALL_DAY: usize = 16;
/// Bloom filter size bounds, in bits (powers of two).
const BLOOM_MIN_BITS: u64 = 1024;
const BLOOM_MAX_BITS: u64 = 65_536;
/// Bit positions set per subdomain in the Bloom filter.
const BLOOM_HASHES: u64 = 3;
/// Shards of the pair table (when it is large enough to split).
const SHARDS: usize = 16;
/// Below this many tracked pairs one shard is used, so LRU order is exact.
const SHARD_MIN_TRACKED: usize = 4096;
/// "No slot" in the LRU list.
const NIL: u32 = u32::MAX;
/// Longest quotation of a domain in a finding, in characters.
const SNIPPET_CHARS: usize = 64;

/// Precomputed values for [`label_entropy`].
struct Tables {
    /// `expected[n]`: expected Shannon entropy, in bits per character, of `n` independent
    /// uniform draws from the 38-symbol alphabet.
    expected: [f64; TABLE_LEN],
    /// `clogc[c] = c · log2 c`.
    clogc: [f64; TABLE_LEN],
}

static TABLES: LazyLock<Tables> = LazyLock::new(Tables::compute);

impl Tables {
    fn compute() -> Self {
        let mut clogc = [0.0; TABLE_LEN];
        for (c, v) in (0u16..).zip(clogc.iter_mut()).skip(1) {
            let c = f64::from(c);
            *v = c * c.log2();
        }
        // Each symbol's count is Binomial(n, p); by linearity of expectation
        // E[H] = -38 · Σ_k P(count = k) · (k/n) · log2(k/n).
        let p = 1.0 / ALPHABET;
        let q = 1.0 - p;
        let mut expected = [0.0; TABLE_LEN];
        for (n, e) in (0u16..).zip(expected.iter_mut()).skip(2) {
            let nf = f64::from(n);
            let mut pmf = q.powi(i32::from(n));
            let mut sum = 0.0;
            for k in 1..=n {
                let kf = f64::from(k);
                pmf *= (nf - kf + 1.0) / kf * (p / q);
                let share = kf / nf;
                sum -= pmf * share * share.log2();
            }
            *e = ALPHABET * sum;
        }
        Tables { expected, clogc }
    }
}

/// Normalised Shannon entropy of a label (or any string), in `0.0..=1.0`.
///
/// ```text
/// H(s)  = -Σ_c (n_c / n) · log2(n_c / n)     bits per character; n = bytes in s,
///                                            n_c = occurrences of byte c
/// E(n)  = expected H of n bytes drawn uniformly at random from the 38 characters of a
///         normalised label (a-z 0-9 - _), computed exactly: each character's count is
///         Binomial(n, 1/38), so E(n) = -38 · Σ_k P(k) · (k/n) · log2(k/n)
/// value = min(1, H(s) / E(n));  0 for fewer than 2 bytes
/// ```
///
/// Dividing by `E(n)` rather than by `log2 38` corrects for length: a short string cannot
/// show its alphabet's entropy (20 random characters average 3.87 bits, not 5.25), so
/// `1.0` means "at least as varied as a typical random string of this length" and a
/// threshold of 1.0 never fires. `E(33) = 4.33` and `E(63) = 4.76` bits, so the default
/// 0.9 is 3.9 to 4.3 bits per character, the "about 4 bits" of published rules.
///
/// On its own the value separates too little: random iodine Base32 (`a-z0-5`) scores
/// 0.97 at 63 characters, but hyphenated words score 0.77–0.88, words run together
/// 0.81–0.91, names with numbers up to 1.0 (`my-load-balancer-1234567890`,
/// `k8s-default-myingres-0123456789-1234567890`), and hex never more than 4 bits (0.84 at
/// 63 characters, 0.93 at 32). So [`Detector`] measures
/// only runs between `-`/`_` of at least [`MIN_ENTROPY_RUN`] characters that are not all
/// hex and alternate letters and digits at least [`MIN_CLASS_SWITCHES`] times. Share of
/// 10 000 random runs per cell that the whole check flags at 0.9 (the
/// `calibration_rates` test re-measures the rows):
///
/// ```text
/// run length                                   33      40      50      63
/// iodine Base32 (a-z0-5)                      76%     89%     97%   99.5%
/// base36 (a-z0-9)                             96%     99%   99.9%    100%
/// base64url, lowercased (split at - and _)    23%     34%     47%     60%
/// hex                                           0       0       0       0
/// words, run together or hyphenated             0       0       0       0
/// words run together, a number < 10000
///   after one word in four                      0    0.1%    1.7%    6.7%
/// words run together, a digit after one in 3  1.3%    2.9%    4.5%    3.4%
/// any random run of 32 characters or fewer      0       0       0       0
/// ```
///
/// The last two rows are deliberately dense synthetic names; real hostnames rarely put
/// four numbers into one run of words without a hyphen.
pub fn label_entropy(label: &str) -> f64 {
    let bytes = label.as_bytes();
    let n = bytes.len();
    if n < 2 {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    let mut distinct = [0u8; 256];
    let mut kinds = 0usize;
    for &b in bytes {
        let c = &mut counts[usize::from(b)];
        if *c == 0 {
            if let Some(slot) = distinct.get_mut(kinds) {
                *slot = b;
            }
            kinds += 1;
        }
        *c = c.saturating_add(1);
    }
    let tables = &*TABLES;
    let mut sum = 0.0;
    for &b in distinct.iter().take(kinds) {
        let c = counts[usize::from(b)];
        sum += usize::try_from(c).ok().and_then(|i| tables.clogc.get(i)).copied().unwrap_or_else(|| {
            let c = f64::from(c);
            c * c.log2()
        });
    }
    let nf = n as f64;
    let h = nf.log2() - sum / nf;
    let expected = tables.expected.get(n).copied().unwrap_or(ALPHABET.log2());
    let value = h / expected;
    if value.is_finite() { value.clamp(0.0, 1.0) } else { 0.0 }
}

/// Whether a separator-free run is shaped like encoded data: not all hex digits, and
/// alternating letters and digits at least [`MIN_CLASS_SWITCHES`] times.
fn data_shaped(run: &[u8]) -> bool {
    let mut all_hex = true;
    let mut switches = 0usize;
    let mut prev: Option<bool> = None;
    for &b in run {
        all_hex &= b.is_ascii_hexdigit();
        let digit = if b.is_ascii_digit() {
            Some(true)
        } else if b.is_ascii_alphabetic() {
            Some(false)
        } else {
            None
        };
        if let (Some(p), Some(d)) = (prev, digit) {
            switches += usize::from(p != d);
        }
        prev = digit;
    }
    !all_hex && switches >= MIN_CLASS_SWITCHES
}

/// True for a Punycode (IDNA A-label) label.
fn is_punycode(label: &str) -> bool {
    label.as_bytes().get(..4).is_some_and(|p| p.eq_ignore_ascii_case(b"xn--"))
}

/// The labels left of `domain` (a tail of `name`), without the joining dot; `None` when
/// there are none.
fn subdomain<'a>(name: &'a str, domain: &str) -> Option<&'a str> {
    if domain.is_empty() {
        return None;
    }
    let dot = name.len().checked_sub(domain.len())?.checked_sub(1)?;
    let sub = name.get(..dot)?;
    (name.as_bytes().get(dot) == Some(&b'.') && !sub.is_empty()).then_some(sub)
}

/// At most [`SNIPPET_CHARS`] characters of `s`.
fn snippet(s: &str) -> &str {
    match s.char_indices().nth(SNIPPET_CHARS) {
        Some((i, _)) => s.get(..i).unwrap_or(s),
        None => s,
    }
}

/// Pushes onto a vector that must never hold more than `cap` items, growing its
/// allocation by doubling but never past `cap`. The caller checks `v.len() < cap`.
fn push_bounded<T>(v: &mut Vec<T>, x: T, cap: usize) {
    if v.len() == v.capacity() {
        let target = v.capacity().saturating_mul(2).max(4).min(cap).max(v.len().saturating_add(1));
        v.reserve_exact(target - v.len());
    }
    v.push(x);
}

/// Per-pair limits derived from the configuration.
#[derive(Clone, Copy, Debug)]
struct Limits {
    max_unique: usize,
    /// Window entries kept: `max_unique + 1`, capped at [`MAX_WINDOW_ENTRIES`].
    window_cap: usize,
    info_budget: u64,
    /// Bloom filter size in 64-bit words.
    bloom_words: usize,
}

/// The state of one (client, registrable domain) pair.
#[derive(Debug)]
struct Pair {
    /// Bucket number (seconds / 10) at which the window was last brought up to date.
    win_bucket: u64,
    /// Unique subdomains seen in the window: a fingerprint of the subdomain hash in the
    /// high 28 bits, the bucket it was last seen in (modulo 16) in the low 4.
    window: Vec<u32>,
    /// Start of the current day, in seconds since the detector's origin.
    day_start: u64,
    /// Bytes of unique subdomains counted in the current day.
    day_bytes: u64,
    /// Subdomain hashes seen today: exact while `!bloom`, else Bloom filter words.
    day: Vec<u64>,
    bloom: bool,
}

impl Pair {
    fn new(secs: u64) -> Self {
        Pair {
            win_bucket: secs / BUCKET_SECS,
            window: Vec::new(),
            day_start: secs,
            day_bytes: 0,
            day: Vec::new(),
            bloom: false,
        }
    }

    fn heap_bytes(&self) -> usize {
        self.window.capacity() * size_of::<u32>() + self.day.capacity() * size_of::<u64>()
    }

    /// Records subdomain hash `h` (of `len` bytes) at `secs`; returns the first budget
    /// exceeded with its measured value.
    fn observe(&mut self, h: u64, len: usize, secs: u64, lim: &Limits) -> Option<(Signal, u64)> {
        // The minute window. Time that goes backwards (tasks racing) counts as the latest.
        let bucket = (secs / BUCKET_SECS).max(self.win_bucket);
        if bucket != self.win_bucket {
            if bucket - self.win_bucket >= WINDOW_BUCKETS {
                if self.window.capacity() > RELEASE_ABOVE {
                    self.window = Vec::new();
                } else {
                    self.window.clear();
                }
            } else {
                // Entries were at most 5 buckets older than `win_bucket`, so their true age
                // is below 11 and the 4-bit tag tells it exactly.
                self.window.retain(|&e| u64::from(bucket_age(bucket, e)) < WINDOW_BUCKETS);
            }
            self.win_bucket = bucket;
        }
        let tag = (bucket & u64::from(TAG_MASK)) as u32;
        let fp = fingerprint(h);
        if let Some(e) = self.window.iter_mut().find(|e| **e & !TAG_MASK == fp) {
            *e = fp | tag;
        } else if self.window.len() < lim.window_cap {
            push_bounded(&mut self.window, fp | tag, lim.window_cap);
        }
        let unique = self.window.len();

        // The day budget.
        if secs.saturating_sub(self.day_start) >= DAY_SECS {
            self.day_start = secs;
            self.day_bytes = 0;
            self.day = Vec::new();
            self.bloom = false;
        }
        if self.day_bytes <= lim.info_budget && !self.day_contains(h) {
            self.day_insert(h, lim.bloom_words);
            self.day_bytes = self.day_bytes.saturating_add(len as u64);
        }

        if unique > lim.max_unique {
            Some((Signal::UniqueSubdomains, unique as u64))
        } else if self.day_bytes > lim.info_budget {
            Some((Signal::InfoBudget, self.day_bytes))
        } else {
            None
        }
    }

    fn day_contains(&self, h: u64) -> bool {
        if self.bloom {
            bloom_positions(h, self.day.len()).all(|(w, bit)| bit_set(&self.day, w, bit))
        } else {
            self.day.contains(&h)
        }
    }

    fn day_insert(&mut self, h: u64, bloom_words: usize) {
        if self.bloom {
            bloom_add(&mut self.day, h);
        } else if self.day.len() < SMALL_DAY {
            push_bounded(&mut self.day, h, SMALL_DAY);
        } else {
            let mut words = vec![0u64; bloom_words.max(1)];
            for &old in &self.day {
                bloom_add(&mut words, old);
            }
            bloom_add(&mut words, h);
            self.day = words;
            self.bloom = true;
        }
    }
}

/// Buckets between `bucket` and the one tagged in window entry `e`, modulo 16.
fn bucket_age(bucket: u64, e: u32) -> u32 {
    ((bucket as u32).wrapping_sub(e & TAG_MASK)) & TAG_MASK
}

/// The window fingerprint of a subdomain hash: its high 28 bits, in place.
fn fingerprint(h: u64) -> u32 {
    ((h >> 32) as u32) & !TAG_MASK
}

/// The Bloom filter positions of `h` as (word, bit), for a filter of `words` 64-bit words
/// (a power of two), by double hashing.
fn bloom_positions(h: u64, words: usize) -> impl Iterator<Item = (usize, u32)> {
    let mask = (words as u64).saturating_mul(64).saturating_sub(1);
    let h2 = (h >> 32) | 1;
    (0..BLOOM_HASHES).map(move |i| {
        let pos = h.wrapping_add(i.wrapping_mul(h2)) & mask;
        ((pos / 64) as usize, (pos % 64) as u32)
    })
}

fn bit_set(words: &[u64], w: usize, bit: u32) -> bool {
    words.get(w).is_some_and(|x| x >> bit & 1 == 1)
}

fn bloom_add(words: &mut [u64], h: u64) {
    for (w, bit) in bloom_positions(h, words.len()) {
        if let Some(x) = words.get_mut(w) {
            *x |= 1 << bit;
        }
    }
}

/// A pair in a shard's slab, linked into its LRU list.
#[derive(Debug)]
struct Slot {
    key: u64,
    prev: u32,
    next: u32,
    pair: Pair,
}

/// A share of the pair table: a slab of slots with an index by key and an LRU list
/// (head = most recently seen). Slots are never freed, only reused for a new pair.
#[derive(Debug)]
struct Shard {
    index: HashTable<u32>,
    slots: Vec<Slot>,
    head: u32,
    tail: u32,
    cap: usize,
}

impl Shard {
    fn new(cap: usize) -> Self {
        Shard { index: HashTable::new(), slots: Vec::new(), head: NIL, tail: NIL, cap }
    }

    fn slot_key(slots: &[Slot], i: u32) -> Option<u64> {
        slots.get(i as usize).map(|s| s.key)
    }

    /// The pair for `key`, made most recently seen; created (evicting the least recently
    /// seen when full) if absent. `None` only for a shard of capacity 0.
    fn pair(&mut self, key: u64, secs: u64) -> Option<&mut Pair> {
        let found = self.index.find(key, |&i| Self::slot_key(&self.slots, i) == Some(key)).copied();
        let idx = match found {
            Some(i) => {
                if self.head != i {
                    self.unlink(i);
                    self.link_front(i);
                }
                i
            }
            None => self.admit(key, secs)?,
        };
        self.slots.get_mut(idx as usize).map(|s| &mut s.pair)
    }

    fn admit(&mut self, key: u64, secs: u64) -> Option<u32> {
        if self.cap == 0 {
            return None;
        }
        let fresh = Slot { key, prev: NIL, next: NIL, pair: Pair::new(secs) };
        let idx = if self.slots.len() < self.cap {
            let idx = u32::try_from(self.slots.len()).ok().filter(|&i| i != NIL)?;
            push_bounded(&mut self.slots, fresh, self.cap);
            idx
        } else {
            let victim = self.tail;
            self.unlink(victim);
            let slot = self.slots.get_mut(victim as usize)?;
            let old_key = slot.key;
            *slot = fresh;
            if let Ok(entry) = self.index.find_entry(old_key, |&i| i == victim) {
                entry.remove();
            }
            victim
        };
        let slots = &self.slots;
        self.index.insert_unique(key, idx, |&i| Self::slot_key(slots, i).unwrap_or(0));
        self.link_front(idx);
        Some(idx)
    }

    /// Takes a linked slot out of the LRU list.
    fn unlink(&mut self, i: u32) {
        let Some(s) = self.slots.get_mut(i as usize) else { return };
        let (prev, next) = (s.prev, s.next);
        s.prev = NIL;
        s.next = NIL;
        match self.slots.get_mut(prev as usize) {
            Some(p) => p.next = next,
            None => self.head = next,
        }
        match self.slots.get_mut(next as usize) {
            Some(n) => n.prev = prev,
            None => self.tail = prev,
        }
    }

    /// Puts an unlinked slot at the head of the LRU list.
    fn link_front(&mut self, i: u32) {
        let head = self.head;
        let Some(s) = self.slots.get_mut(i as usize) else { return };
        s.prev = NIL;
        s.next = head;
        match self.slots.get_mut(head as usize) {
            Some(h) => h.prev = i,
            None => self.tail = i,
        }
        self.head = i;
    }

    fn heap_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Slot>()
            + self.index.allocation_size()
            + self.slots.iter().map(|s| s.pair.heap_bytes()).sum::<usize>()
    }

    #[cfg(test)]
    fn contains(&self, key: u64) -> bool {
        self.index.find(key, |&i| Self::slot_key(&self.slots, i) == Some(key)).is_some()
    }
}

/// The tunneling detector: cheap stateless checks plus bounded per-(client, domain) state.
/// `Send + Sync`; share it behind an `Arc` and call [`Detector::check`] from any task.
pub struct Detector {
    action: TunnelingAction,
    max_name_length: usize,
    max_label_entropy: f64,
    limits: Limits,
    max_tracked: usize,
    /// Instants are measured from here; earlier ones count as this one.
    origin: Instant,
    hasher: SeedableRandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl fmt::Debug for Detector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Detector")
            .field("action", &self.action)
            .field("max_name_length", &self.max_name_length)
            .field("max_label_entropy", &self.max_label_entropy)
            .field("max_unique_subdomains", &self.limits.max_unique)
            .field("info_budget", &self.limits.info_budget)
            .field("max_tracked", &self.max_tracked)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl Detector {
    /// A detector tracking up to [`DEFAULT_MAX_TRACKED`] (client, domain) pairs.
    pub fn new(cfg: &TunnelingConfig) -> Self {
        Self::with_capacity(cfg, DEFAULT_MAX_TRACKED)
    }

    /// With an explicit bound on tracked (client, registrable-domain) pairs. With 0 nothing
    /// is tracked and only the stateless checks run.
    pub fn with_capacity(cfg: &TunnelingConfig, max_tracked: usize) -> Self {
        Self::build(cfg, max_tracked, SeedableRandomState::random())
    }

    fn build(cfg: &TunnelingConfig, max_tracked: usize, hasher: SeedableRandomState) -> Self {
        let n = if max_tracked >= SHARD_MIN_TRACKED { SHARDS } else { 1 };
        let per_shard_max = (NIL - 1) as usize;
        let caps: Vec<usize> =
            (0..n).map(|i| (max_tracked / n + usize::from(i < max_tracked % n)).min(per_shard_max)).collect();
        let bloom_bits = cfg.info_budget.clamp(BLOOM_MIN_BITS, BLOOM_MAX_BITS).next_power_of_two();
        Detector {
            action: cfg.action,
            max_name_length: cfg.max_name_length,
            max_label_entropy: cfg.max_label_entropy,
            limits: Limits {
                max_unique: cfg.max_unique_subdomains,
                window_cap: cfg.max_unique_subdomains.saturating_add(1).min(MAX_WINDOW_ENTRIES),
                info_budget: cfg.info_budget,
                bloom_words: (bloom_bits / 64) as usize,
            },
            max_tracked: caps.iter().sum(),
            origin: Instant::now(),
            hasher,
            shards: caps.into_iter().map(|c| Mutex::new(Shard::new(c))).collect(),
        }
    }

    /// Checks one query name (normalised: lowercase A-labels, no trailing dot; one trailing
    /// dot is tolerated) from `client` at `now`.
    ///
    /// Stateless checks first (name length, entropy of long label runs), then the stateful
    /// ones (unique subdomains in the sliding minute, bytes of unique subdomains in the
    /// day). The query is recorded either way, so that a client cannot stay under the
    /// rates by mixing in names the stateless checks catch. Returns the first finding, or
    /// `None`. With action `off` it returns `None` and records nothing. Names with no label
    /// left of their registrable domain are not recorded. Once a pair is over a budget,
    /// each of its queries (repeats included) is reported until the minute window drains
    /// below the threshold or the day ends. Instants before the detector was made count as
    /// the moment it was made, and an instant earlier than one already seen for a pair
    /// counts as that one (tasks race).
    pub fn check(&self, client: IpAddr, name: &str, now: Instant) -> Option<Finding> {
        if self.action == TunnelingAction::Off {
            return None;
        }
        let name = name.strip_suffix('.').unwrap_or(name);
        let stateless = self.stateless(name);
        let stateful = self.record(client, name, now);
        if stateless.is_some() {
            return stateless;
        }
        let (signal, measured, domain) = stateful?;
        let domain = snippet(domain);
        let detail = match signal {
            Signal::UniqueSubdomains => format!(
                "{measured} unique subdomains of {domain:?} from this client within a minute (max {}; counting \
                 stops there)",
                self.limits.max_unique
            ),
            _ => format!(
                "{measured} bytes of unique subdomains of {domain:?} from this client today (budget {} bytes)",
                self.limits.info_budget
            ),
        };
        Some(Finding { signal, detail })
    }

    /// Name length, then the entropy of each long, data-shaped run of each label.
    fn stateless(&self, name: &str) -> Option<Finding> {
        if name.len() > self.max_name_length {
            return Some(Finding {
                signal: Signal::NameLength,
                detail: format!("query name is {} characters long (max {})", name.len(), self.max_name_length),
            });
        }
        for label in name.split('.') {
            if label.len() < MIN_ENTROPY_RUN || is_punycode(label) {
                continue;
            }
            for run in label.split(['-', '_']) {
                if run.len() < MIN_ENTROPY_RUN || !data_shaped(run.as_bytes()) {
                    continue;
                }
                let e = label_entropy(run);
                if e > self.max_label_entropy {
                    return Some(Finding {
                        signal: Signal::LabelEntropy,
                        detail: format!(
                            "a {}-character label run has normalised entropy {e:.3} (max {:.3})",
                            run.len(),
                            self.max_label_entropy
                        ),
                    });
                }
            }
        }
        None
    }

    /// Records the subdomain part of `name` for (client, registrable domain); returns the
    /// budget exceeded, its measured value and the registrable domain.
    fn record<'a>(&self, client: IpAddr, name: &'a str, now: Instant) -> Option<(Signal, u64, &'a str)> {
        if self.max_tracked == 0 {
            return None;
        }
        let domain = registrable_domain(name);
        let sub = subdomain(name, domain)?;
        let key = self.hasher.hash_one((client, domain));
        let h = self.hasher.hash_one(sub);
        let secs = now.saturating_duration_since(self.origin).as_secs();
        let shard = self.shards.get((key >> 32) as usize % self.shards.len())?;
        let mut shard = lock(shard);
        let pair = shard.pair(key, secs)?;
        pair.observe(h, sub.len(), secs, &self.limits).map(|(signal, measured)| (signal, measured, domain))
    }

    /// Number of (client, registrable domain) pairs tracked.
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| lock(s).slots.len()).sum()
    }

    /// Estimate of the heap bytes held by the state (slots, indexes, windows, day sets).
    /// Walks every pair: meant for tests and periodic metrics, not for the query path.
    pub fn heap_bytes(&self) -> usize {
        self.shards.iter().map(|s| lock(s).heap_bytes()).sum()
    }

    /// The bound [`Detector::heap_bytes`] stays under, whatever clients send:
    ///
    /// ```text
    /// Σ_shards (cap · size_of(Slot) + index bytes for cap entries)
    ///   + max_tracked · (4 · min(max_unique_subdomains + 1, 65536)
    ///                    + 8 · max(16, bloom_bits / 64))
    /// ```
    ///
    /// where the index of a shard of `cap` entries has at most the next power of two above
    /// 16/7 · cap buckets of 5 bytes, plus 16 control bytes (hashbrown may double a table
    /// that eviction filled with tombstones). At the defaults (300 a minute, 4 KiB, 100 000
    /// pairs) that is about 1.8 KB a pair, 183 MB; typical use is a small fraction of it (a
    /// pair with a few names holds about 200 bytes, slot and index included).
    pub fn heap_bound(&self) -> usize {
        let per_pair = size_of::<u32>() * self.limits.window_cap
            + size_of::<u64>() * SMALL_DAY.max(self.limits.bloom_words)
            + size_of::<Slot>();
        let index: usize = self
            .shards
            .iter()
            .map(|s| {
                let cap = lock(s).cap;
                // Eviction leaves tombstones, and hashbrown may then grow the table once more
                // (to at most twice the capacity it needs), so allow for 2 · cap.
                let buckets = (cap.saturating_mul(16) / 7 + 1).next_power_of_two();
                buckets * (size_of::<u32>() + 1) + 16 + 64
            })
            .sum();
        self.max_tracked.saturating_mul(per_pair).saturating_add(index)
    }

    /// The shard and key a (client, domain) pair lives under.
    #[cfg(test)]
    fn tracks(&self, client: IpAddr, domain: &str) -> bool {
        let key = self.hasher.hash_one((client, domain));
        self.shards.get((key >> 32) as usize % self.shards.len()).is_some_and(|s| lock(s).contains(key))
    }
}

/// Locks a shard; a poisoned lock is still used (no code under it panics, and its state is
/// only counters).
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::Arc;
    use std::time::Duration;

    fn cfg() -> TunnelingConfig {
        TunnelingConfig {
            action: TunnelingAction::Block,
            max_name_length: 120,
            max_label_entropy: 0.9,
            max_unique_subdomains: 300,
            info_budget: 4096,
        }
    }

    /// A detector with a fixed hash seed, so every run sees the same fingerprints.
    fn detector(cfg: &TunnelingConfig, cap: usize) -> Detector {
        Detector::build(cfg, cap, SeedableRandomState::with_seed(7, foldhash::SharedSeed::global_fixed()))
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n))
    }

    /// splitmix64: a small deterministic generator for test data.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn string(&mut self, alphabet: &[u8], len: usize) -> String {
            (0..len).map(|_| char::from(alphabet[self.below(alphabet.len())])).collect()
        }
    }

    const IODINE32: &[u8] = b"abcdefghijklmnopqrstuvwxyz012345";
    const BASE32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    const BASE36: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    const HEX: &[u8] = b"0123456789abcdef";
    /// base64url after the resolver path lowercased it.
    const B64URL_LC: &[u8] = b"abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz0123456789-_";

    /// Splits `data` into labels of at most `size` characters.
    fn labels(data: &str, size: usize) -> String {
        data.as_bytes().chunks(size).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(".")
    }

    /// Ordinary long names, from clouds, CDNs, certificates, mail and people.
    const ORDINARY: &[&str] = &[
        "d1a2b3c4d5e6f7.cloudfront.net",
        "my-load-balancer-1234567890.us-east-1.elb.amazonaws.com",
        "internal-my-internal-alb-1234567890.eu-west-1.elb.amazonaws.com",
        "k8s-default-myingres-0123456789-1234567890.us-east-1.elb.amazonaws.com",
        "a3f1c2d4e5b6a7c8d9e0f1a2b3c4d5e6-1234567890.us-east-1.elb.amazonaws.com",
        "ec2-203-0-113-25.compute-1.amazonaws.com",
        "ip-10-0-1-23.ec2.internal",
        "r3---sn-5hne6nzk.googlevideo.com",
        "rr5---sn-q4fl6nsr.googlevideo.com",
        "e12345.dscb.akamaiedge.net",
        "a1b2c3d4e5f6g7h8i9j0.execute-api.us-east-1.amazonaws.com",
        "abc123defg.execute-api.us-east-1.amazonaws.com",
        "ta2ewvmvkbeddcnfhnxqqrvzgq0cvxfe.lambda-url.us-east-1.on.aws",
        "x4rjkgqtbhhzwghs7ctazk4fxeprcdtg._domainkey.example.com",
        "x4rjkgqtbhhzwghs7ctazk4fxeprcdtg.dkim.amazonses.com",
        "search-my-domain-4kyrgtn4a3jx3ehbpzjbj6ue2u.us-east-1.es.amazonaws.com",
        "abcdefghijklmnopqrstuvwxyz.appsync-api.us-east-1.amazonaws.com",
        "0123456789abcdef0123456789abcdef.gr7.us-east-1.eks.amazonaws.com",
        "vpce-0123456789abcdef0-abcdefgh.s3.us-east-1.vpce.amazonaws.com",
        "_acme-challenge.www.example.org",
        "_3639ac514e785e898d2646601fa951d5.example.com",
        "_98d2646601fa951d53639ac514e785e8.mzlfeqexyx.acm-validations.aws",
        "selector1._domainkey.example.com",
        "selector1-contoso-com._domainkey.contoso.onmicrosoft.com",
        "_dmarc.example.com",
        "_ldap._tcp.dc._msdcs.corp.example.com",
        "xn--bcher-kva.example",
        "xn--80akhbyknj4f.xn--p1ai",
        "this-is-a-very-long-but-perfectly-ordinary-hostname.example.com",
        "thisisaverylongbutperfectlyordinaryhostname.example.com",
        "mycompanyproductiondatabackupsbucket.s3.amazonaws.com",
        "mystorageaccountprod0001backups2024archive.blob.core.windows.net",
        "my-org-data-lake-raw-zone-us-east-1-123456789012.s3.us-east-1.amazonaws.com",
        "customer-facing-api-gateway-production-eu-west-1.example.com",
        "gke-cluster-1-default-pool-1a2b3c4d-wxyz.c.my-project.internal",
        "myapp-prod-eastus2-01.azurewebsites.net",
        "123e4567-e89b-12d3-a456-426614174000.ods.opinsights.azure.com",
        "s3.dualstack.us-east-1.amazonaws.com",
        "25.113.0.203.in-addr.arpa",
        "b.a.9.8.7.6.5.4.3.2.1.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
        // 100 characters.
        "customer-portal.payments-api.eu-central-1.production.internal-services.platform.eng.corp.example.com",
    ];

    #[test]
    fn ordinary_names_pass_the_stateless_checks() {
        let d = detector(&cfg(), 16);
        for name in ORDINARY {
            assert_eq!(d.stateless(name), None, "{name}");
        }
        let hundred = ORDINARY.last().copied().unwrap_or_default();
        assert_eq!(hundred.len(), 100);
    }

    #[test]
    fn ordinary_names_pass_check() {
        let d = detector(&cfg(), 1024);
        let t0 = Instant::now();
        for (i, name) in ORDINARY.iter().enumerate() {
            for repeat in 0..50u64 {
                let now = t0 + Duration::from_secs(repeat * 7);
                assert_eq!(d.check(ip(i as u32 % 3), name, now), None, "{name}");
            }
        }
    }

    #[test]
    fn documented_false_positive_ipfs_cid() {
        // A CIDv1 in base32 is a random 59-character label: flagged, as the module says.
        let f = detector(&cfg(), 16)
            .stateless("bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi.ipfs.dweb.link");
        assert_eq!(f.map(|f| f.signal), Some(Signal::LabelEntropy));
    }

    #[test]
    fn iodine_like_names_are_caught() {
        let d = detector(&cfg(), 1024);
        let mut rng = Rng(1);
        let t0 = Instant::now();
        for i in 0..200u64 {
            // One command character, then Base32 data filling 63-character labels.
            let data = format!("p{}", rng.string(IODINE32, 180));
            let name = format!("{}.t.attacker.example", labels(&data, 63));
            assert!(name.len() >= 200, "{name}");
            let f = d.check(ip(1), &name, t0 + Duration::from_millis(i * 50));
            assert_eq!(f.map(|f| f.signal), Some(Signal::NameLength), "{name}");
        }
    }

    #[test]
    fn iodine_with_short_names_is_caught_by_entropy() {
        // `iodine -M 100`: one 63-character label per query, 81-character names.
        let d = detector(&cfg(), 1024);
        let mut rng = Rng(2);
        let t0 = Instant::now();
        let mut entropy = 0;
        for i in 0..100u64 {
            let name = format!("{}.t.attacker.example", rng.string(IODINE32, 63));
            assert!(name.len() < 120);
            match d.check(ip(2), &name, t0 + Duration::from_secs(i)).map(|f| f.signal) {
                Some(Signal::LabelEntropy) => entropy += 1,
                Some(Signal::InfoBudget) => {}
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(entropy >= 98, "{entropy}");
    }

    #[test]
    fn dnscat2_like_names_are_caught() {
        let d = detector(&cfg(), 1024);
        let mut rng = Rng(3);
        let t0 = Instant::now();
        for i in 0..100u64 {
            let len = 63 + 63 + 10 + rng.below(53);
            let data = rng.string(HEX, len);
            let name = format!("{}.attacker.example", labels(&data, 63));
            assert!(name.len() > 120);
            let f = d.check(ip(3), &name, t0 + Duration::from_millis(i * 100));
            assert_eq!(f.map(|f| f.signal), Some(Signal::NameLength), "{name}");
        }
    }

    #[test]
    fn dnscat2_with_short_names_is_caught_by_the_budget() {
        // Hex is never entropy-flagged; at 101 bytes a query the day budget fills at the 41st.
        let d = detector(&cfg(), 1024);
        let mut rng = Rng(4);
        let t0 = Instant::now();
        let mut first = None;
        for i in 0..60u64 {
            let name = format!("{}.{}.attacker.example", rng.string(HEX, 50), rng.string(HEX, 50));
            assert!(name.len() < 120);
            if let Some(f) = d.check(ip(4), &name, t0 + Duration::from_secs(i * 5)) {
                assert_eq!(f.signal, Signal::InfoBudget);
                first.get_or_insert(i);
            }
        }
        assert_eq!(first, Some(40));
    }

    #[test]
    fn dnsexfiltrator_like_names_are_caught() {
        let d = detector(&cfg(), 1024);
        let mut rng = Rng(5);
        let t0 = Instant::now();
        for chunk in 0..100u64 {
            let len = 63 * 3 + 10 + rng.below(20);
            let data = rng.string(B64URL_LC, len);
            let name = format!("{chunk}.{}.attacker.example", labels(&data, 63));
            assert!(name.len() > 210, "{name}");
            let f = d.check(ip(5), &name, t0 + Duration::from_millis(chunk * 300));
            assert_eq!(f.map(|f| f.signal), Some(Signal::NameLength), "{name}");
        }
    }

    #[test]
    fn low_and_slow_is_caught_by_unique_subdomains() {
        // 43-character names, 12 Base32 characters (60 bits) each, 400 in a minute.
        let d = detector(&cfg(), 1024);
        let mut rng = Rng(6);
        let t0 = Instant::now();
        for i in 0..400u64 {
            let name = format!("{}.attacker-telemetry-cdn.example", rng.string(BASE32, 12));
            assert_eq!(name.len(), 43);
            let f = d.check(ip(6), &name, t0 + Duration::from_millis(i * 150));
            if i < 300 {
                assert_eq!(f, None, "query {i}");
            } else {
                assert_eq!(f.map(|f| f.signal), Some(Signal::UniqueSubdomains), "query {i}");
            }
        }
    }

    #[test]
    fn slow_exfiltration_is_caught_by_the_info_budget() {
        // 40-byte subdomains (two labels under the entropy minimum), one every 30 seconds.
        let d = detector(&cfg(), 1024);
        let mut rng = Rng(7);
        let t0 = Instant::now();
        for i in 0..110u64 {
            let sub = format!("{}.{}", rng.string(BASE32, 19), rng.string(BASE32, 20));
            assert_eq!(sub.len(), 40);
            let name = format!("{sub}.attacker.example");
            let f = d.check(ip(7), &name, t0 + Duration::from_secs(i * 30));
            // 102 · 40 = 4080 bytes fit in 4096; the 103rd query (i = 102) passes the budget.
            if i < 102 {
                assert_eq!(f, None, "query {i}");
            } else {
                assert_eq!(f.map(|f| f.signal), Some(Signal::InfoBudget), "query {i}");
            }
        }
    }

    #[test]
    fn sliding_window_counts_unique_subdomains_in_a_minute() {
        let d = detector(&cfg(), 16);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 300 unique within 57 seconds: fine.
        for i in 0..300u64 {
            assert_eq!(d.check(ip(1), &format!("h{i}.example.com"), at(i * 190)), None, "{i}");
        }
        // The 301st is flagged, as is anything else while the window holds more than 300.
        let f = d.check(ip(1), "h300.example.com", at(58_000));
        assert_eq!(f.as_ref().map(|f| f.signal), Some(Signal::UniqueSubdomains));
        let detail = f.map(|f| f.detail).unwrap_or_default();
        assert!(detail.contains("301") && detail.contains("max 300") && detail.contains("example.com"), "{detail}");
        assert!(d.check(ip(1), "h5.example.com", at(58_500)).is_some());
        // After 60 seconds of quiet the window is empty again.
        assert_eq!(d.check(ip(1), "fresh.example.com", at(58_000 + 60_000)), None);
        for i in 0..299u64 {
            assert_eq!(d.check(ip(1), &format!("n{i}.example.com"), at(120_000 + i)), None, "{i}");
        }
    }

    #[test]
    fn sliding_window_forgets_old_buckets_one_by_one() {
        let d = detector(&cfg(), 16);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        for i in 0..200u64 {
            assert_eq!(d.check(ip(1), &format!("a{i}.example.com"), at(0)), None);
        }
        for i in 0..100u64 {
            assert_eq!(d.check(ip(1), &format!("b{i}.example.com"), at(30)), None);
        }
        // 300 in the window; at 61 s the first 200 have left it, the other 100 remain.
        for i in 0..200u64 {
            assert_eq!(d.check(ip(1), &format!("c{i}.example.com"), at(61)), None, "{i}");
        }
        assert!(d.check(ip(1), "one-too-many.example.com", at(61)).is_some());
    }

    #[test]
    fn repeats_of_a_subdomain_do_not_count() {
        let d = detector(&cfg(), 16);
        let t0 = Instant::now();
        // Five 60-byte subdomains, asked every second for two days: never over either budget.
        let subs: Vec<String> = (0..5).map(|i| format!("{i}{}.{}", "a".repeat(29), "b".repeat(29))).collect();
        for s in 0..2 * 86_400u64 {
            let name = format!("{}.example.com", subs[(s % 5) as usize]);
            assert_eq!(d.check(ip(1), &name, t0 + Duration::from_secs(s)), None, "{s}");
        }
        // A burst of the same name within one second.
        for _ in 0..10_000 {
            assert_eq!(d.check(ip(2), "www.example.com", t0), None);
        }
    }

    #[test]
    fn apex_names_do_not_count_and_www_does() {
        let d = detector(&cfg(), 16);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            assert_eq!(d.check(ip(1), "example.com", t0), None);
            assert_eq!(d.check(ip(1), &format!("domain{i}.com"), t0), None);
            assert_eq!(d.check(ip(1), "example.co.uk.", t0), None);
            assert_eq!(d.check(ip(1), "com", t0), None);
            assert_eq!(d.check(ip(1), "", t0), None);
        }
        assert_eq!(d.tracked(), 0);
        assert_eq!(d.check(ip(1), "www.example.com", t0), None);
        assert_eq!(d.tracked(), 1);
        assert!(d.tracks(ip(1), "example.com"));
        // A name under a public suffix counts under its registrable domain.
        assert_eq!(d.check(ip(1), "assets.my-bucket.s3.amazonaws.com", t0), None);
        assert!(d.tracks(ip(1), "my-bucket.s3.amazonaws.com"));
    }

    #[test]
    fn www_is_one_unique_subdomain() {
        let c = TunnelingConfig { max_unique_subdomains: 1, ..cfg() };
        let d = detector(&c, 16);
        let t0 = Instant::now();
        assert_eq!(d.check(ip(1), "www.example.com", t0), None);
        assert_eq!(d.check(ip(1), "www.example.com", t0), None);
        let f = d.check(ip(1), "api.example.com", t0);
        assert_eq!(f.map(|f| f.signal), Some(Signal::UniqueSubdomains));
    }

    /// Floods `domain` from `client` until flagged; returns the finding.
    fn flood(d: &Detector, client: IpAddr, domain: &str, now: Instant) -> Option<Finding> {
        (0..400).find_map(|i| d.check(client, &format!("x{i}.{domain}"), now))
    }

    #[test]
    fn clients_are_isolated() {
        let d = detector(&cfg(), 1024);
        let t0 = Instant::now();
        let a = ip(1);
        let b = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(flood(&d, a, "attacker.example", t0).map(|f| f.signal), Some(Signal::UniqueSubdomains));
        assert!(d.check(a, "y.attacker.example", t0).is_some());
        for i in 0..300 {
            assert_eq!(d.check(b, &format!("x{i}.attacker.example"), t0), None, "{i}");
        }
    }

    #[test]
    fn domains_are_isolated() {
        let d = detector(&cfg(), 1024);
        let t0 = Instant::now();
        assert!(flood(&d, ip(1), "attacker.example", t0).is_some());
        assert_eq!(d.check(ip(1), "www.example.com", t0), None);
        assert_eq!(d.check(ip(1), "a.b.c.example.org", t0), None);
        // Different names under one registrable domain share its budget.
        assert!(d.check(ip(1), "deep.sub.attacker.example", t0).is_some());
        // Under a public suffix every registrable domain is its own.
        for i in 0..300 {
            assert_eq!(d.check(ip(1), &format!("x.bucket{i}.s3.amazonaws.com"), t0), None);
        }
    }

    #[test]
    fn info_budget_resets_after_a_day() {
        let d = detector(&cfg(), 16);
        let t0 = Instant::now();
        let day = Duration::from_secs(86_400);
        let mut rng = Rng(8);
        let mut sub = || format!("{}.{}", rng.string(BASE32, 19), rng.string(BASE32, 20));
        // One every 10 minutes: 103 queries take about 17 hours.
        let mut flagged_at = None;
        for i in 0..120u64 {
            let f = d.check(ip(1), &format!("{}.attacker.example", sub()), t0 + Duration::from_secs(i * 600));
            if let Some(f) = f {
                assert_eq!(f.signal, Signal::InfoBudget);
                assert!(f.detail.contains("4120 bytes") && f.detail.contains("budget 4096"), "{}", f.detail);
                flagged_at = Some(i);
                break;
            }
        }
        assert_eq!(flagged_at, Some(102));
        // Still over the budget, even for a name already seen, until the day ends.
        assert!(d.check(ip(1), &format!("{}.attacker.example", sub()), t0 + Duration::from_secs(86_399)).is_some());
        // The day began with the first query; a day later the count starts again.
        for i in 0..102u64 {
            let now = t0 + day + Duration::from_secs(i * 60);
            assert_eq!(d.check(ip(1), &format!("{}.attacker.example", sub()), now), None, "{i}");
        }
        let now = t0 + day + Duration::from_secs(102 * 60);
        let f = d.check(ip(1), &format!("{}.attacker.example", sub()), now);
        assert_eq!(f.map(|f| f.signal), Some(Signal::InfoBudget));
    }

    #[test]
    fn action_off_never_flags_or_records() {
        let c = TunnelingConfig { action: TunnelingAction::Off, ..cfg() };
        let d = detector(&c, 1024);
        let t0 = Instant::now();
        let long = format!("{}.t.attacker.example", labels(&"q".repeat(200), 63));
        assert_eq!(d.check(ip(1), &long, t0), None);
        assert_eq!(flood(&d, ip(1), "attacker.example", t0), None);
        assert_eq!(d.tracked(), 0);
        assert_eq!(d.heap_bytes(), 0);
    }

    #[test]
    fn action_alert_reports_like_block() {
        let c = TunnelingConfig { action: TunnelingAction::Alert, ..cfg() };
        let d = detector(&c, 1024);
        let t0 = Instant::now();
        assert_eq!(flood(&d, ip(1), "attacker.example", t0).map(|f| f.signal), Some(Signal::UniqueSubdomains));
    }

    #[test]
    fn stateless_findings_are_recorded_too() {
        let d = detector(&cfg(), 16);
        let t0 = Instant::now();
        for i in 0..299 {
            assert_eq!(d.check(ip(1), &format!("s{i}.attacker.example"), t0), None);
        }
        // Two names too long to pass: reported as such, and counted in the window.
        for i in 0..2 {
            let long = format!("{}{i}.attacker.example", "z".repeat(120));
            let f = d.check(ip(1), &long, t0);
            assert_eq!(f.as_ref().map(|f| f.signal), Some(Signal::NameLength));
            let detail = f.map(|f| f.detail).unwrap_or_default();
            assert!(detail.contains("138") && detail.contains("max 120"), "{detail}");
        }
        let f = d.check(ip(1), "short.attacker.example", t0);
        assert_eq!(f.map(|f| f.signal), Some(Signal::UniqueSubdomains));
    }

    #[test]
    fn least_recently_seen_pair_is_evicted() {
        let d = detector(&cfg(), 2);
        let t0 = Instant::now();
        let _ = d.check(ip(1), "www.a.example", t0);
        let _ = d.check(ip(2), "www.b.example", t0);
        let _ = d.check(ip(1), "api.a.example", t0);
        let _ = d.check(ip(3), "www.c.example", t0);
        assert_eq!(d.tracked(), 2);
        assert!(d.tracks(ip(1), "a.example"));
        assert!(!d.tracks(ip(2), "b.example"));
        assert!(d.tracks(ip(3), "c.example"));
        // Evicting forgets the pair's counts.
        let _ = d.check(ip(2), "www.b.example", t0);
        assert!(!d.tracks(ip(1), "a.example"));
    }

    #[test]
    fn zero_capacity_tracks_nothing() {
        let d = detector(&cfg(), 0);
        let t0 = Instant::now();
        assert_eq!(flood(&d, ip(1), "attacker.example", t0), None);
        assert_eq!(d.tracked(), 0);
        let long = "a.".repeat(70) + "example";
        assert_eq!(d.check(ip(1), &long, t0).map(|f| f.signal), Some(Signal::NameLength));
    }

    #[test]
    fn instants_out_of_order_are_tolerated() {
        let t_early = Instant::now();
        let d = detector(&cfg(), 16);
        let t0 = Instant::now() + Duration::from_secs(100);
        assert_eq!(d.check(ip(1), "a.example.com", t0), None);
        // Earlier than the last query, and earlier than the detector itself.
        assert_eq!(d.check(ip(1), "b.example.com", t0 - Duration::from_secs(30)), None);
        assert_eq!(d.check(ip(1), "c.example.com", t_early), None);
        // All three are in the window still.
        let c = TunnelingConfig { max_unique_subdomains: 3, ..cfg() };
        let d = detector(&c, 16);
        for (i, t) in [t0, t0 - Duration::from_secs(30), t_early].into_iter().enumerate() {
            assert_eq!(d.check(ip(1), &format!("s{i}.example.com"), t), None);
        }
        assert!(d.check(ip(1), "s3.example.com", t0).is_some());
    }

    #[test]
    fn label_entropy_edge_cases() {
        assert_eq!(label_entropy(""), 0.0);
        assert_eq!(label_entropy("a"), 0.0);
        assert_eq!(label_entropy(&"a".repeat(63)), 0.0);
        assert_eq!(label_entropy(&"z".repeat(5000)), 0.0);
        // Two distinct characters in two: as varied as random can be.
        assert_eq!(label_entropy("ab"), 1.0);
        // One bit per character out of ~4.76 expected.
        let ab = label_entropy(&"ab".repeat(31));
        assert!((0.2..0.22).contains(&ab), "{ab}");
        // Sixteen symbols exactly four times each: 4 bits.
        let hex = label_entropy(&"0123456789abcdef".repeat(4));
        assert!((0.83..0.85).contains(&hex), "{hex}");
        // Longer than a label, and non-ASCII: defined and in range.
        let all: String = (0u8..=127).map(char::from).collect::<String>().repeat(3);
        assert_eq!(label_entropy(&all), 1.0);
        for s in ["ü", "ñandú-ñandú", "\u{0}\u{0}", "日本語のラベル", "a\u{10ffff}b"] {
            let e = label_entropy(s);
            assert!((0.0..=1.0).contains(&e), "{s}: {e}");
        }
    }

    #[test]
    fn expected_entropy_matches_the_formula() {
        let t = &*TABLES;
        for (n, want) in [(2usize, 0.974), (20, 3.867), (33, 4.327), (40, 4.474), (63, 4.757)] {
            assert!((t.expected[n] - want).abs() < 0.002, "E({n}) = {}", t.expected[n]);
        }
        assert!(t.expected.windows(2).skip(1).all(|w| w[0] < w[1]), "E(n) increases");
        assert!(t.expected[TABLE_LEN - 1] < ALPHABET.log2());
        // The mean entropy of random 63-character strings is E(63): the table is a calibration,
        // not an estimate of it.
        let mut rng = Rng(9);
        let alphabet: Vec<u8> = (b'a'..=b'z').chain(b'0'..=b'9').chain([b'-', b'_']).collect();
        let mean: f64 = (0..4000).map(|_| label_entropy(&rng.string(&alphabet, 63)) * t.expected[63]).sum::<f64>();
        // Clamping at 1 trims the upper half, so the mean sits a little under E(63).
        let mean = mean / 4000.0;
        assert!((4.70..4.76).contains(&mean), "{mean}");
    }

    /// Fraction of `count` strings from `make` that the entropy check flags.
    fn rate(d: &Detector, count: usize, mut make: impl FnMut() -> String) -> f64 {
        let flagged = (0..count).filter(|_| d.stateless(&format!("{}.example.com", make())).is_some()).count();
        flagged as f64 / count as f64
    }

    /// Words that hostnames are made of.
    const WORDS: &str = "\
        app api web prod production staging dev test data backup backups bucket storage account logs archive \
         service server client gateway proxy cache cluster node worker queue stream events analytics metrics \
         monitor customer orders payment billing invoice user auth login identity portal admin dashboard \
         internal external public private east west north south central europe asia pacific primary secondary \
         replica master company corp enterprise global regional mobile desktop frontend backend platform cloud \
         network security firewall images static assets content media video upload download files documents \
         reports search index team project application database warehouse lake raw processed curated export \
         import sync batch realtime";

    /// Words run together (or joined by `-`), with a number after one word in `every`
    /// (below `max`), cut to `len` characters.
    fn words(rng: &mut Rng, len: usize, sep: &str, every: usize, max: usize) -> String {
        let words: Vec<&str> = WORDS.split_whitespace().collect();
        let mut s = String::new();
        while s.len() < len {
            if !s.is_empty() {
                s.push_str(sep);
            }
            s.push_str(words[rng.below(words.len())]);
            if every > 0 && rng.below(every) == 0 {
                s.push_str(&rng.below(max).to_string());
            }
        }
        s.truncate(len);
        s
    }

    /// Re-measures the calibration table of [`label_entropy`]'s documentation (with fewer
    /// samples, so with some slack).
    #[test]
    fn calibration_rates() {
        let d = detector(&cfg(), 16);
        let mut rng = Rng(10);
        let mut r = |make: &mut dyn FnMut(&mut Rng) -> String| rate(&d, 2000, || make(&mut rng));
        // Random data of 50 characters or more is flagged.
        assert!(r(&mut |g| g.string(IODINE32, 63)) >= 0.98);
        assert!(r(&mut |g| g.string(IODINE32, 50)) >= 0.94);
        assert!(r(&mut |g| g.string(BASE32, 63)) >= 0.98);
        assert!(r(&mut |g| g.string(BASE36, 40)) >= 0.97);
        assert!(r(&mut |g| g.string(BASE36, 63)) >= 0.99);
        // Never: hex, random runs of 32, words with or without hyphens.
        for len in [33, 40, 50, 63] {
            assert_eq!(r(&mut |g| g.string(HEX, len)), 0.0, "hex {len}");
            assert_eq!(r(&mut |g| words(g, len, "", 0, 1)), 0.0, "words {len}");
            assert_eq!(r(&mut |g| words(g, len, "-", 4, 10_000)), 0.0, "hyphenated words {len}");
        }
        assert_eq!(r(&mut |g| g.string(BASE36, 32)), 0.0);
        // Words run together with many numbers: a few percent, as documented.
        for len in [40, 63] {
            let numbers = r(&mut |g| words(g, len, "", 4, 10_000));
            let digits = r(&mut |g| words(g, len, "", 3, 10));
            assert!(numbers < 0.1 && digits < 0.1, "{len}: {numbers} {digits}");
        }
    }

    #[test]
    fn details_name_the_measure_and_the_threshold() {
        let d = detector(&cfg(), 16);
        let f = d.stateless(&format!("{}.t.attacker.example", "k3xq9mz2vb7p4nw8rt5y6hj0cd1fg".repeat(2)));
        let f = f.unwrap_or_else(|| Finding { signal: Signal::NameLength, detail: String::new() });
        assert_eq!(f.signal, Signal::LabelEntropy);
        assert!(f.detail.contains("58-character") && f.detail.contains("(max 0.900)"), "{}", f.detail);
        assert_eq!(Signal::InfoBudget.to_string(), "info_budget");
        assert_eq!(Signal::UniqueSubdomains.as_str(), "unique_subdomains");
    }

    #[test]
    fn detector_is_send_and_sync_and_works_concurrently() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Detector>();
        let d = Arc::new(detector(&cfg(), 10_000));
        let t0 = Instant::now();
        let handles: Vec<_> = (0..8u32)
            .map(|t| {
                let d = Arc::clone(&d);
                std::thread::spawn(move || {
                    let mut flagged = 0;
                    for i in 0..5000u32 {
                        let name = format!("n{}.domain{}.example", i % 400, i % 7);
                        flagged += usize::from(d.check(ip(t), &name, t0).is_some());
                    }
                    flagged
                })
            })
            .collect();
        for h in handles {
            // 400 unique names per domain: the last 100 of each of the seven domains exceed 300.
            assert!(h.join().unwrap_or(0) > 0);
        }
        assert_eq!(d.tracked(), 8 * 7);
        assert!(format!("{d:?}").contains("max_tracked: 10000"));
    }

    #[test]
    fn memory_is_bounded_under_a_flood() {
        // 1 000 000 names from 10 000 clients: half under random registrable domains, half
        // random subdomains of a few domains (filling windows and day sets).
        let d = detector(&cfg(), DEFAULT_MAX_TRACKED);
        let t0 = Instant::now();
        let mut rng = Rng(11);
        let mut name = String::with_capacity(64);
        for i in 0..1_000_000u64 {
            let client = ip(rng.below(10_000) as u32);
            name.clear();
            let len = 8 + rng.below(12);
            name.push_str(&rng.string(BASE36, len));
            name.push('.');
            if i % 2 == 0 {
                name.push_str(&rng.string(BASE36, 10));
                name.push_str(".com");
            } else {
                name.push_str(["attacker.example", "example.com", "example.org"][rng.below(3)]);
            }
            let _ = d.check(client, &name, t0 + Duration::from_millis(i / 10));
        }
        let (tracked, heap, bound) = (d.tracked(), d.heap_bytes(), d.heap_bound());
        assert!(tracked <= DEFAULT_MAX_TRACKED, "{tracked}");
        assert!(heap <= bound, "{heap} > {bound}");
        // The documented default bound, and the documented typical cost per pair.
        assert!(bound < 200_000_000, "{bound}");
        assert!(heap / tracked < 400, "{heap} / {tracked}");
    }

    #[test]
    fn memory_bound_holds_for_full_pairs() {
        // Every pair filled to its caps: the window at max + 1 and the Bloom filter built.
        let c = TunnelingConfig { max_unique_subdomains: 50, info_budget: 100_000, ..cfg() };
        let d = detector(&c, 40);
        let t0 = Instant::now();
        for client in 0..40u32 {
            for i in 0..500u32 {
                let _ = d.check(ip(client), &format!("{i}-{}.attacker.example", "x".repeat(30)), t0);
            }
        }
        assert_eq!(d.tracked(), 40);
        let (heap, bound) = (d.heap_bytes(), d.heap_bound());
        assert!(heap <= bound, "{heap} > {bound}");
        assert!(heap > bound / 2, "{heap} vs {bound}: the bound should be tight");
    }

    proptest! {
        #[test]
        fn memory_bounded_under_random_traffic(
            ops in proptest::collection::vec((0u32..50, 0usize..6, "[a-z0-9]{1,12}", 0u64..200_000), 1..400),
            cap in 0usize..40,
            max_unique in 1usize..20,
            budget in 1u64..5000,
        ) {
            let c = TunnelingConfig { max_unique_subdomains: max_unique, info_budget: budget, ..cfg() };
            let d = Detector::with_capacity(&c, cap);
            let t0 = Instant::now();
            let domains = ["a.example", "b.example", "c.co.uk", "d.s3.amazonaws.com", "e.github.io", "f.test"];
            for (client, dom, sub, ms) in ops {
                let name = format!("{sub}.{}", domains[dom]);
                let _ = d.check(ip(client), &name, t0 + Duration::from_millis(ms * 100));
                prop_assert!(d.tracked() <= cap);
                prop_assert!(d.heap_bytes() <= d.heap_bound());
            }
        }

        #[test]
        fn never_panics(name in "\\PC{0,300}|[a-z0-9._-]{0,300}|([a-z0-9]{1,63}\\.){0,6}[a-z]{2,6}\\.?", secs in 0u64..10_000_000) {
            let d = detector(&cfg(), 64);
            let now = Instant::now() + Duration::from_secs(secs);
            let _ = d.check(ip(1), &name, now);
            let _ = d.check(IpAddr::V6(Ipv6Addr::UNSPECIFIED), &name, now.checked_sub(Duration::from_secs(1)).unwrap_or(now));
            let e = label_entropy(&name);
            prop_assert!((0.0..=1.0).contains(&e));
            prop_assert!(d.heap_bytes() <= d.heap_bound());
        }
    }
}
