//! The DNS answer cache shared by the DNS firewall and the proxy's resolver.
//!
//! Entries are keyed by [`CacheKey`] (lowercase query name, query type, DNSSEC-OK bit) and hold
//! one upstream response, stored only if RFC 2308 / RFC 2181 say it may be: NOERROR answers for
//! the smallest TTL of their answer section, NXDOMAIN and NODATA for the negative TTL of the
//! authority SOA (`min(SOA TTL, SOA MINIMUM)`, at most [`MAX_NEGATIVE_TTL`]), everything capped by
//! the configured maximum; never errors other than NXDOMAIN, truncated responses, responses with
//! TTL 0, or negative answers without an SOA. Reads count every record's TTL down by the whole
//! seconds spent in the cache; an entry whose TTL has run out is a miss.
//!
//! Design. The cache is split into up to [`MAX_SHARDS`] shards by key hash, each a
//! `std::sync::Mutex` that is held only for index work (never across an await, never while
//! decoding), so concurrent lookups rarely contend. A shard is a slab of entries plus a
//! `hashbrown::HashTable` index into it, evicted with CLOCK (second chance): a hit sets an entry's
//! reference bit; to make room the clock hand sweeps the slab, clearing set bits and taking the
//! first entry that is unreferenced or already expired. Unlike FIFO, a name that keeps being
//! asked survives a scan of one-off names; unlike strict LRU, a hit costs one bit write, not a
//! list splice. Memory is bounded twice: by the entry count (`capacity`) and by a byte budget of
//! [`BYTES_PER_ENTRY`] per entry of capacity, with no single response over [`MAX_ENTRY_BYTES`]
//! stored, so a flood of unique names — even ones whose answers are crafted to be large — cannot
//! grow the cache beyond its bounds. Keys are hashed with `SipHash` under a per-process random key
//! (std's `RandomState`): names come from clients and upstreams, so the hash must resist chosen
//! collisions, and its cost is small next to a decode.
//!
//! Entries are stored as DNS wire bytes (id 0, no OPT or TSIG record, AA cleared, record TTLs
//! clamped to the entry's TTL) and decoded on every hit. Measured on a typical CNAME + 4 A + 2 NS
//! response (200 wire bytes): cloning a stored `Message` costs ~0.35 µs but the `Message` itself
//! occupies ~2.3 KiB of heap; decoding the 200 bytes costs ~1.8 µs (a whole `get` hit ~1.3-2 µs).
//! At the configurable maximum of 100 000 entries that is ~230 MiB of `Message`s against ~20 MiB of
//! wire bytes, so the cache pays the decode: still cheap next to the socket work around every
//! answer, and the byte budget then counts exactly what is stored.
//!
//! Concurrent misses for one key are coalesced ([`Cache::get_or_fetch`]): the first caller
//! fetches, later callers wait on a `tokio::sync::watch` channel for its outcome. If the fetching
//! caller is cancelled (its future dropped) or panics, the channel closes and the waiters start
//! over, one of them becoming the new fetcher, so nobody waits for an answer that will never come.

use std::any::Any;
use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::sync::watch;

/// Longest time a negative answer (NXDOMAIN, NODATA) is cached, whatever its SOA says.
pub const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(300);
/// Largest response (in wire bytes, as stored) that is cached; larger ones are passed through.
pub const MAX_ENTRY_BYTES: usize = 4096;
/// Byte budget per entry of capacity: the cache holds at most `capacity * BYTES_PER_ENTRY` wire
/// bytes, evicting further entries when large responses would exceed it.
pub const BYTES_PER_ENTRY: usize = 1024;
/// Most shards (independent locks) a cache is split into.
pub const MAX_SHARDS: usize = 16;
/// Fewest entries per shard: small caches use fewer shards so CLOCK has room to work.
const MIN_SHARD_ENTRIES: usize = 64;

/// Cache key: lowercase query name, query type code, and the DNSSEC-OK bit of the query (answers
/// with and without RRSIGs differ).
///
/// `name` is the name's ASCII presentation form as [`CacheKey::new`] makes it (`Name::to_ascii`,
/// fully qualified names ending in `.`). The cache lowercases it again, so case never splits
/// entries, and [`Cache::insert`] only stores a response whose question matches the key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The query name, lowercase ASCII presentation form.
    pub name: String,
    /// The query type code.
    pub qtype: u16,
    /// The query's EDNS DO bit.
    pub dnssec_ok: bool,
}

impl CacheKey {
    /// The key for a question.
    pub fn new(name: &Name, qtype: RecordType, dnssec_ok: bool) -> Self {
        let mut name = name.to_ascii();
        name.make_ascii_lowercase();
        CacheKey { name, qtype: u16::from(qtype), dnssec_ok }
    }

    /// The key for a query message, or `None` if its answer must not be cached: not exactly one
    /// question, a class other than IN, or a zone transfer (AXFR, IXFR). The DNSSEC-OK bit comes
    /// from the query's EDNS record.
    pub fn for_query(query: &Message) -> Option<Self> {
        let [question] = query.queries.as_slice() else { return None };
        if question.query_class != DNSClass::IN || matches!(question.query_type, RecordType::AXFR | RecordType::IXFR) {
            return None;
        }
        let dnssec_ok = query.edns.as_ref().is_some_and(|edns| edns.flags().dnssec_ok);
        Some(CacheKey::new(&question.name, question.query_type, dnssec_ok))
    }

    /// The key with its name lowercased, borrowing when it already is.
    fn normalized(&self) -> Cow<'_, CacheKey> {
        if self.name.bytes().any(|b| b.is_ascii_uppercase()) {
            let mut key = self.clone();
            key.name.make_ascii_lowercase();
            Cow::Owned(key)
        } else {
            Cow::Borrowed(self)
        }
    }
}

/// The DNS answer cache. `Send + Sync`; share it behind an `Arc`.
pub struct Cache {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    capacity: usize,
    /// The configured maximum TTL in whole seconds.
    max_ttl: u32,
    /// Source of flight ids, so a finishing fetch removes its own in-flight marker only.
    next_flight: AtomicU64,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("capacity", &self.capacity)
            .field("shards", &self.shards.len())
            .field("max_ttl", &self.max_ttl)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// What a fetch produced, as seen by the callers waiting for it: `None` while it runs.
type Outcome<E> = Option<Result<Arc<Message>, E>>;

/// The next move of [`Cache::get_or_fetch`], decided under the shard lock.
enum Step<'a, E> {
    /// A live entry: its wire bytes and whole seconds spent in the cache.
    Hit(Arc<[u8]>, u32),
    /// Another caller is fetching this key.
    Wait(watch::Receiver<Outcome<E>>),
    /// Another caller is fetching this key with another error type: fetch without coalescing.
    Alone,
    /// This caller fetches; the guard unregisters the flight however the fetch ends.
    Lead(FlightGuard<'a, E>),
}

impl Cache {
    /// A cache of at most `capacity` entries (0 disables caching entirely), every TTL capped at
    /// `max_ttl` (whole seconds; under one second nothing is cached).
    pub fn new(capacity: usize, max_ttl: Duration) -> Self {
        let shard_count = (capacity / MIN_SHARD_ENTRIES).clamp(1, MAX_SHARDS);
        let base = capacity / shard_count;
        let extra = capacity % shard_count;
        let shards = (0..shard_count)
            .map(|i| {
                let entries = base + usize::from(i < extra);
                let bytes = entries.saturating_mul(BYTES_PER_ENTRY).max(MAX_ENTRY_BYTES);
                Mutex::new(Shard::new(entries, bytes))
            })
            .collect();
        Cache {
            shards,
            hasher: RandomState::new(),
            capacity,
            max_ttl: u32::try_from(max_ttl.as_secs()).unwrap_or(u32::MAX),
            next_flight: AtomicU64::new(0),
        }
    }

    /// A cached response with every record's TTL counted down by the whole seconds spent in the
    /// cache; an expired entry is a miss (and is dropped). The header id is 0 for the caller to
    /// set, there is no OPT record (the caller adds its own EDNS), AA is clear, and the question
    /// is the stored response's, in the case the upstream used: a caller answering a client
    /// copies in the client's question.
    pub fn get(&self, key: &CacheKey, now: Instant) -> Option<Message> {
        if self.capacity == 0 {
            return None;
        }
        let key = key.normalized();
        let hash = self.hasher.hash_one(&*key);
        let (wire, elapsed) = self.shard(hash).lookup(hash, &key, now)?;
        self.render(hash, &key, &wire, elapsed)
    }

    /// Stores an upstream response `response` to the question `key`, received at `now`, if it
    /// may be cached (RFC 2308, RFC 2181):
    ///
    /// - NOERROR with an answer of the asked type: for the smallest TTL in the answer section;
    /// - NXDOMAIN, or NOERROR without an answer of the asked type (NODATA, possibly after a
    ///   CNAME chain): for `min(SOA TTL, SOA MINIMUM)` of the authority SOA (and no longer than
    ///   any CNAME in the answer), at most [`MAX_NEGATIVE_TTL`]; without an SOA it is not cached;
    /// - everything is capped by `max_ttl`.
    ///
    /// Never stored: other response codes (SERVFAIL, REFUSED, FORMERR, ...), truncated (TC)
    /// responses, TTL 0, non-responses or non-QUERY opcodes, responses whose single question
    /// is not `key`'s (name compared case-insensitively, class IN), zone transfers, and
    /// responses over [`MAX_ENTRY_BYTES`]. Storing replaces an entry for the same key.
    pub fn insert(&self, key: CacheKey, response: &Message, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        let key = match key.normalized() {
            Cow::Borrowed(_) => key,
            Cow::Owned(lower) => lower,
        };
        let Some(ttl) = self.cacheable_ttl(&key, response) else { return };
        let hash = self.hasher.hash_one(&key);
        self.store(key, hash, response.clone(), ttl, now);
    }

    /// The cached answer for `key`, or else the result of `fetch`, which is then cached if it may
    /// be (as [`Cache::insert`], with `now` as its time of arrival, which errs on the side of
    /// expiring early). Concurrent misses are coalesced: the first caller for a key runs its
    /// `fetch`; callers arriving while it runs wait for its result instead of querying again.
    ///
    /// Returns the response and whether it came without this call's `fetch` running (a cache
    /// hit, or the result of another caller's fetch). Every response looks like [`Cache::get`]'s:
    /// id 0, no OPT or TSIG record, and if cacheable, AA clear and TTLs clamped to the entry's.
    /// If the fetch fails, its error goes to every waiting caller and nothing is cached. If the
    /// fetching caller is cancelled or panics, its waiters start over (one of them fetching).
    /// With capacity 0 this only calls `fetch`.
    ///
    /// # Errors
    ///
    /// The error of the `fetch` that ran for this call: its own, or the one it waited for.
    ///
    /// Waiting callers share the fetcher's error by downcasting, hence `E: Send + Sync + 'static`;
    /// a caller using another error type than the fetcher's simply fetches itself.
    pub async fn get_or_fetch<F, Fut, E>(&self, key: CacheKey, now: Instant, fetch: F) -> Result<(Message, bool), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Message, E>>,
        E: Clone + Send + Sync + 'static,
    {
        if self.capacity == 0 {
            return fetch().await.map(|response| (strip(response), false));
        }
        let mut key = key;
        key.name.make_ascii_lowercase();
        let hash = self.hasher.hash_one(&key);
        loop {
            let step = {
                let mut shard = self.shard(hash);
                if let Some((wire, elapsed)) = shard.lookup(hash, &key, now) {
                    Step::Hit(wire, elapsed)
                } else if let Some(flight) = shard.flights.find(hash, |f| f.key == key) {
                    match flight.outcome.downcast_ref::<watch::Receiver<Outcome<E>>>() {
                        Some(receiver) => Step::Wait(receiver.clone()),
                        None => Step::Alone,
                    }
                } else {
                    let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
                    let (sender, receiver) = watch::channel(None);
                    let flight = Flight { hash, key: key.clone(), id, outcome: Box::new(receiver) };
                    shard.flights.insert_unique(hash, flight, |f| f.hash);
                    Step::Lead(FlightGuard { cache: self, hash, id, sender })
                }
            };
            match step {
                Step::Hit(wire, elapsed) => {
                    if let Some(response) = self.render(hash, &key, &wire, elapsed) {
                        return Ok((response, true));
                    }
                    // Undecodable entry, now dropped: go round and fetch.
                }
                Step::Wait(mut receiver) => {
                    let outcome = match receiver.wait_for(Option::is_some).await {
                        Ok(outcome) => outcome.clone(),
                        Err(_) => None,
                    };
                    match outcome {
                        Some(Ok(response)) => return Ok((Message::clone(&response), true)),
                        Some(Err(e)) => return Err(e),
                        // The fetcher went away without a result: start over.
                        None => tracing::trace!(name = %key.name, "coalesced DNS fetch abandoned; retrying"),
                    }
                }
                Step::Alone => {
                    let response = fetch().await?;
                    return Ok((self.finish(key, hash, response, now), false));
                }
                Step::Lead(guard) => {
                    let result = fetch().await.map(|response| self.finish(key, hash, response, now));
                    let shared = match &result {
                        Ok(response) => Ok(Arc::new(response.clone())),
                        Err(e) => Err(e.clone()),
                    };
                    guard.sender.send_replace(Some(shared));
                    drop(guard);
                    return result.map(|response| (response, false));
                }
            }
        }
    }

    /// Number of stored entries (expired ones not yet evicted included).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).slots.len()).sum()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every entry. Fetches in flight still store their results when they finish.
    pub fn clear(&self) {
        for shard in &self.shards {
            lock(shard).clear();
        }
    }

    /// The configured capacity in entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        // High bits pick the shard; the table inside uses the low bits and the top 7.
        let index = (hash >> 32) as usize % self.shards.len();
        lock(&self.shards[index])
    }

    /// Decodes a stored entry and counts its TTLs down. An entry that does not decode (which
    /// encoding by hickory should rule out) is dropped and reported as a miss.
    fn render(&self, hash: u64, key: &CacheKey, wire: &Arc<[u8]>, elapsed: u32) -> Option<Message> {
        match Message::from_vec(wire) {
            Ok(mut response) => {
                for record in records_mut(&mut response) {
                    record.ttl = record.ttl.saturating_sub(elapsed);
                }
                Some(response)
            }
            Err(e) => {
                tracing::debug!(name = %key.name, error = %e, "dropping undecodable DNS cache entry");
                self.shard(hash).remove_entry(hash, key, wire);
                None
            }
        }
    }

    /// The fetched `response` as returned to callers, stored first if it may be cached.
    fn finish(&self, key: CacheKey, hash: u64, response: Message, now: Instant) -> Message {
        match self.cacheable_ttl(&key, &response) {
            Some(ttl) => self.store(key, hash, response, ttl, now),
            None => strip(response),
        }
    }

    /// How long `response` to `key` may be cached, in seconds (> 0), or `None` if not at all.
    fn cacheable_ttl(&self, key: &CacheKey, response: &Message) -> Option<u32> {
        let metadata = &response.metadata;
        if metadata.message_type != MessageType::Response || metadata.op_code != OpCode::Query || metadata.truncation {
            return None;
        }
        let negative = match metadata.response_code {
            ResponseCode::NoError => false,
            ResponseCode::NXDomain => true,
            _ => return None,
        };
        let [question] = response.queries.as_slice() else { return None };
        let qtype = question.query_type;
        if question.query_class != DNSClass::IN
            || u16::from(qtype) != key.qtype
            || matches!(qtype, RecordType::AXFR | RecordType::IXFR)
            || !same_name(&question.name, &key.name)
        {
            tracing::debug!(name = %key.name, qtype = key.qtype, "not caching a response to another question");
            return None;
        }
        let answers = &response.answers;
        let answer_ttl = answers.iter().map(|r| r.ttl).min();
        let answered = if qtype == RecordType::ANY {
            !answers.is_empty()
        } else {
            answers.iter().any(|r| r.record_type() == qtype)
        };
        let ttl = if !negative && answered {
            answer_ttl?
        } else {
            // RFC 2308 §5: the negative TTL comes from the SOA; without one, do not cache.
            let soa_ttl = response
                .authorities
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                    _ => None,
                })
                .min()?;
            let cap = u32::try_from(MAX_NEGATIVE_TTL.as_secs()).unwrap_or(u32::MAX);
            soa_ttl.min(answer_ttl.unwrap_or(u32::MAX)).min(cap)
        };
        let ttl = ttl.min(self.max_ttl);
        (ttl > 0).then_some(ttl)
    }

    /// Stores `response` for `ttl` seconds and returns it as stored (see [`Cache::get`]).
    fn store(&self, key: CacheKey, hash: u64, response: Message, ttl: u32, now: Instant) -> Message {
        let mut response = strip(response);
        response.metadata.authoritative = false;
        for record in records_mut(&mut response) {
            record.ttl = record.ttl.min(ttl);
        }
        match response.to_vec() {
            Ok(wire) if wire.len() <= MAX_ENTRY_BYTES => {
                let slot = Slot { hash, key, wire: Arc::from(wire), stored: now, ttl, referenced: false };
                self.shard(hash).store(slot, now);
            }
            Ok(wire) => {
                tracing::trace!(name = %key.name, bytes = wire.len(), "DNS response too large to cache");
            }
            Err(e) => tracing::debug!(name = %key.name, error = %e, "cannot encode DNS response for the cache"),
        }
        response
    }
}

/// Locks a shard. A panic while it was held (which the code under the lock does not do) would
/// leave consistent-enough state for a cache, so poisoning is ignored.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A response with the parts that belong to one transaction removed: id 0, no OPT, no TSIG.
/// (The full response code stays in the header; hickory moves its high bits into whatever OPT
/// record the caller adds.)
fn strip(mut response: Message) -> Message {
    response.metadata.id = 0;
    response.edns = None;
    response.signature = None;
    response
}

/// Every record of a message (the OPT and TSIG records are kept apart by hickory).
fn records_mut(message: &mut Message) -> impl Iterator<Item = &mut Record> {
    message.answers.iter_mut().chain(message.authorities.iter_mut()).chain(message.additionals.iter_mut())
}

/// Whether `name` is `key_name` (ASCII case-insensitively, a trailing dot on either ignored).
fn same_name(name: &Name, key_name: &str) -> bool {
    let name = name.to_ascii();
    let name = name.strip_suffix('.').unwrap_or(&name);
    let key_name = key_name.strip_suffix('.').unwrap_or(key_name);
    name.eq_ignore_ascii_case(key_name)
}

/// One cached response.
struct Slot {
    hash: u64,
    key: CacheKey,
    /// Wire form: id 0, no OPT, TTLs clamped to `ttl`.
    wire: Arc<[u8]>,
    stored: Instant,
    /// Seconds the entry lives.
    ttl: u32,
    /// CLOCK reference bit: set on a hit, cleared as the hand passes.
    referenced: bool,
}

impl Slot {
    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.stored) >= Duration::from_secs(u64::from(self.ttl))
    }
}

/// A fetch in progress: waiters subscribe to `outcome`, a `watch::Receiver<Outcome<E>>` whose
/// error type only the callers know.
struct Flight {
    hash: u64,
    key: CacheKey,
    id: u64,
    outcome: Box<dyn Any + Send + Sync>,
}

/// Held by the fetching caller. Dropping it — after publishing the outcome, or because the
/// fetching future was dropped or panicked — removes the flight; only then does `sender` drop,
/// so waiters woken by the closed channel find the key free to fetch.
struct FlightGuard<'a, E> {
    cache: &'a Cache,
    hash: u64,
    id: u64,
    sender: watch::Sender<Outcome<E>>,
}

impl<E> Drop for FlightGuard<'_, E> {
    fn drop(&mut self) {
        let mut shard = self.cache.shard(self.hash);
        if let Ok(entry) = shard.flights.find_entry(self.hash, |f| f.id == self.id) {
            entry.remove();
        }
    }
}

/// One lock's worth of the cache: a slab of slots, an index from key to slot, the CLOCK hand,
/// and the fetches in flight for its keys.
struct Shard {
    index: HashTable<usize>,
    slots: Vec<Slot>,
    hand: usize,
    /// Sum of the stored wire lengths.
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    flights: HashTable<Flight>,
}

impl Shard {
    fn new(max_entries: usize, max_bytes: usize) -> Self {
        Shard {
            index: HashTable::new(),
            slots: Vec::new(),
            hand: 0,
            bytes: 0,
            max_entries,
            max_bytes,
            flights: HashTable::new(),
        }
    }

    fn position(&self, hash: u64, key: &CacheKey) -> Option<usize> {
        let slots = &self.slots;
        self.index.find(hash, |&i| slots.get(i).is_some_and(|s| s.key == *key)).copied()
    }

    /// A live entry's wire bytes and whole seconds in the cache, marking it referenced; an
    /// expired entry is removed.
    fn lookup(&mut self, hash: u64, key: &CacheKey, now: Instant) -> Option<(Arc<[u8]>, u32)> {
        let i = self.position(hash, key)?;
        let slot = self.slots.get_mut(i)?;
        if slot.expired(now) {
            self.remove(i);
            return None;
        }
        slot.referenced = true;
        let elapsed = u32::try_from(now.saturating_duration_since(slot.stored).as_secs()).unwrap_or(u32::MAX);
        Some((Arc::clone(&slot.wire), elapsed))
    }

    /// Stores `slot`, replacing an entry with its key or evicting as needed to stay within both
    /// bounds.
    fn store(&mut self, slot: Slot, now: Instant) {
        let len = slot.wire.len();
        if self.max_entries == 0 || len > self.max_bytes {
            return;
        }
        if let Some(i) = self.position(slot.hash, &slot.key) {
            self.remove(i);
        }
        while !self.slots.is_empty() && self.bytes + len > self.max_bytes {
            let victim = self.victim(now);
            self.remove(victim);
        }
        self.bytes += len;
        let hash = slot.hash;
        let i = if self.slots.len() >= self.max_entries {
            // Classic CLOCK: the new entry takes the victim's place, just behind the hand.
            let victim = self.victim(now);
            self.unindex(victim);
            let old = std::mem::replace(&mut self.slots[victim], slot);
            self.bytes -= old.wire.len();
            victim
        } else {
            self.slots.push(slot);
            self.slots.len() - 1
        };
        let slots = &self.slots;
        self.index.insert_unique(hash, i, |&j| slots.get(j).map_or(0, |s| s.hash));
    }

    /// The slot to evict: the first, from the hand on, that is expired or unreferenced; the
    /// reference bits passed over are cleared. Ends within one revolution plus one step. The
    /// slab must not be empty.
    fn victim(&mut self, now: Instant) -> usize {
        let n = self.slots.len();
        for _ in 0..=n {
            let i = self.hand % n;
            self.hand = (i + 1) % n;
            let slot = &mut self.slots[i];
            if !slot.referenced || slot.expired(now) {
                return i;
            }
            slot.referenced = false;
        }
        self.hand % n
    }

    /// Removes slot `i` from the index only.
    fn unindex(&mut self, i: usize) {
        let Some(hash) = self.slots.get(i).map(|s| s.hash) else { return };
        if let Ok(entry) = self.index.find_entry(hash, |&j| j == i) {
            entry.remove();
        }
    }

    /// Removes slot `i`, moving the last slot into its place.
    fn remove(&mut self, i: usize) {
        if i >= self.slots.len() {
            return;
        }
        self.unindex(i);
        let removed = self.slots.swap_remove(i);
        self.bytes -= removed.wire.len();
        let moved_from = self.slots.len();
        if let Some(hash) = self.slots.get(i).map(|s| s.hash) {
            if let Some(index) = self.index.find_mut(hash, |&j| j == moved_from) {
                *index = i;
            }
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
    }

    /// Removes `key`'s entry if it still holds `wire`.
    fn remove_entry(&mut self, hash: u64, key: &CacheKey, wire: &Arc<[u8]>) {
        if let Some(i) = self.position(hash, key) {
            if self.slots.get(i).is_some_and(|s| Arc::ptr_eq(&s.wire, wire)) {
                self.remove(i);
            }
        }
    }

    fn clear(&mut self) {
        self.index = HashTable::new();
        self.slots = Vec::new();
        self.hand = 0;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::AtomicUsize;

    use hickory_proto::op::{Edns, Query};
    use hickory_proto::rr::rdata::{A, CNAME, NS, SOA, TXT};

    use super::*;

    const LONG: Duration = Duration::from_secs(86_400);
    const WAIT: Duration = Duration::from_secs(5);

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn key(qname: &str, qtype: RecordType) -> CacheKey {
        CacheKey::new(&name(qname), qtype, false)
    }

    fn response(qname: &str, qtype: RecordType, rcode: ResponseCode) -> Message {
        let mut m = Message::response(0x1234, OpCode::Query);
        m.metadata.response_code = rcode;
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.add_query(Query::query(name(qname), qtype));
        m
    }

    fn a(owner: &str, ttl: u32, last: u8) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::new(192, 0, 2, last))))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn soa(zone: &str, ttl: u32, minimum: u32) -> Record {
        let data = SOA::new(
            name(&format!("ns.{zone}")),
            name(&format!("hostmaster.{zone}")),
            1,
            7200,
            900,
            1_209_600,
            minimum,
        );
        Record::from_rdata(name(zone), ttl, RData::SOA(data))
    }

    /// A positive A answer for `qname` with one record of TTL `ttl`.
    fn positive(qname: &str, ttl: u32) -> Message {
        let mut m = response(qname, RecordType::A, ResponseCode::NoError);
        m.add_answer(a(qname, ttl, 1));
        m
    }

    fn ttls(records: &[Record]) -> Vec<u32> {
        records.iter().map(|r| r.ttl).collect()
    }

    fn after(t0: Instant, millis: u64) -> Instant {
        t0 + Duration::from_millis(millis)
    }

    #[test]
    fn positive_answer_cached_and_ttl_decremented() {
        let cache = Cache::new(100, LONG);
        let mut m = response("www.example.com.", RecordType::A, ResponseCode::NoError);
        m.metadata.authoritative = true;
        m.add_answer(cname("www.example.com.", 600, "cdn.example.net."));
        m.add_answer(a("cdn.example.net.", 300, 1));
        m.add_answer(a("cdn.example.net.", 400, 2));
        m.add_authority(Record::from_rdata(name("example.net."), 3600, RData::NS(NS(name("ns1.example.net.")))));
        m.add_additional(a("ns1.example.net.", 100, 53));
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        m.set_edns(edns);
        let t0 = Instant::now();
        cache.insert(key("www.example.com.", RecordType::A), &m, t0);
        assert_eq!(cache.len(), 1);

        let hit = cache.get(&key("www.example.com.", RecordType::A), t0).expect("cached");
        assert_eq!(hit.metadata.id, 0);
        assert!(hit.edns.is_none(), "OPT is not cached");
        assert!(!hit.metadata.authoritative, "a cached answer is not authoritative");
        assert!(hit.metadata.recursion_available);
        assert_eq!(hit.metadata.response_code, ResponseCode::NoError);
        assert_eq!(hit.queries, m.queries);
        // Entry TTL = smallest answer TTL (300); nothing is served beyond it.
        assert_eq!(ttls(&hit.answers), [300, 300, 300]);
        assert_eq!(ttls(&hit.authorities), [300]);
        assert_eq!(ttls(&hit.additionals), [100]);
        let data = |records: &[Record]| records.iter().map(|r| (r.name.clone(), r.data.clone())).collect::<Vec<_>>();
        assert_eq!(data(&hit.answers), data(&m.answers));
        assert_eq!(data(&hit.additionals), data(&m.additionals));

        // Whole seconds only: 10.9 s in the cache counts as 10.
        let hit = cache.get(&key("www.example.com.", RecordType::A), after(t0, 10_900)).expect("cached");
        assert_eq!(ttls(&hit.answers), [290, 290, 290]);
        assert_eq!(ttls(&hit.authorities), [290]);
        assert_eq!(ttls(&hit.additionals), [90]);

        // Records with less TTL than the entry count down to 0, never below.
        let hit = cache.get(&key("www.example.com.", RecordType::A), after(t0, 299_500)).expect("cached");
        assert_eq!(ttls(&hit.answers), [1, 1, 1]);
        assert_eq!(ttls(&hit.additionals), [0]);
        // A `now` earlier than the insertion counts as no time spent.
        if let Some(before) = t0.checked_sub(Duration::from_secs(5)) {
            let hit = cache.get(&key("www.example.com.", RecordType::A), before).expect("cached");
            assert_eq!(ttls(&hit.answers), [300, 300, 300]);
        }
    }

    #[test]
    fn ttl_capped_by_max_ttl() {
        let cache = Cache::new(100, Duration::from_secs(60));
        let t0 = Instant::now();
        cache.insert(key("a.example.", RecordType::A), &positive("a.example.", 3600), t0);
        let hit = cache.get(&key("a.example.", RecordType::A), t0).expect("cached");
        assert_eq!(ttls(&hit.answers), [60]);
        let hit = cache.get(&key("a.example.", RecordType::A), after(t0, 59_999)).expect("cached");
        assert_eq!(ttls(&hit.answers), [1]);
        assert!(cache.get(&key("a.example.", RecordType::A), after(t0, 60_000)).is_none());

        // Negative answers too.
        let mut nx = response("nx.example.", RecordType::A, ResponseCode::NXDomain);
        nx.add_authority(soa("example.", 3600, 3600));
        cache.insert(key("nx.example.", RecordType::A), &nx, t0);
        let hit = cache.get(&key("nx.example.", RecordType::A), t0).expect("cached");
        assert_eq!(ttls(&hit.authorities), [60]);

        // A maximum under one second caches nothing.
        let cache = Cache::new(100, Duration::from_millis(999));
        cache.insert(key("a.example.", RecordType::A), &positive("a.example.", 3600), t0);
        assert!(cache.is_empty());
    }

    #[test]
    fn nxdomain_cached_for_soa_minimum() {
        let cache = Cache::new(100, LONG);
        let t0 = Instant::now();
        let mut nx = response("nope.example.", RecordType::A, ResponseCode::NXDomain);
        nx.add_authority(soa("example.", 3600, 120));
        cache.insert(key("nope.example.", RecordType::A), &nx, t0);
        let hit = cache.get(&key("nope.example.", RecordType::A), after(t0, 119_000)).expect("cached");
        assert_eq!(hit.metadata.response_code, ResponseCode::NXDomain);
        assert!(hit.answers.is_empty());
        assert_eq!(ttls(&hit.authorities), [1], "the SOA's TTL is the negative TTL, counted down");
        assert!(cache.get(&key("nope.example.", RecordType::A), after(t0, 120_000)).is_none());

        // The SOA's own TTL when it is smaller than MINIMUM.
        let mut nx = response("nope2.example.", RecordType::A, ResponseCode::NXDomain);
        nx.add_authority(soa("example.", 30, 900));
        cache.insert(key("nope2.example.", RecordType::A), &nx, t0);
        assert!(cache.get(&key("nope2.example.", RecordType::A), after(t0, 29_999)).is_some());
        assert!(cache.get(&key("nope2.example.", RecordType::A), after(t0, 30_000)).is_none());

        // At most MAX_NEGATIVE_TTL, whatever the zone says.
        let mut nx = response("nope3.example.", RecordType::A, ResponseCode::NXDomain);
        nx.add_authority(soa("example.", 86_400, 86_400));
        cache.insert(key("nope3.example.", RecordType::A), &nx, t0);
        let cap = MAX_NEGATIVE_TTL.as_secs();
        let hit = cache.get(&key("nope3.example.", RecordType::A), t0).expect("cached");
        assert_eq!(u64::from(hit.authorities[0].ttl), cap);
        assert!(cache.get(&key("nope3.example.", RecordType::A), t0 + MAX_NEGATIVE_TTL).is_none());

        // NXDOMAIN at the end of a CNAME chain: no longer than the CNAME.
        let mut nx = response("alias.example.", RecordType::A, ResponseCode::NXDomain);
        nx.add_answer(cname("alias.example.", 20, "gone.example.org."));
        nx.add_authority(soa("example.org.", 3600, 600));
        cache.insert(key("alias.example.", RecordType::A), &nx, t0);
        assert!(cache.get(&key("alias.example.", RecordType::A), after(t0, 19_000)).is_some());
        assert!(cache.get(&key("alias.example.", RecordType::A), after(t0, 20_000)).is_none());
    }

    #[test]
    fn nodata_cached() {
        let cache = Cache::new(100, LONG);
        let t0 = Instant::now();
        let mut nodata = response("v4only.example.", RecordType::AAAA, ResponseCode::NoError);
        nodata.add_authority(soa("example.", 600, 60));
        cache.insert(key("v4only.example.", RecordType::AAAA), &nodata, t0);
        let hit = cache.get(&key("v4only.example.", RecordType::AAAA), after(t0, 59_000)).expect("cached");
        assert_eq!(hit.metadata.response_code, ResponseCode::NoError);
        assert!(hit.answers.is_empty());
        assert!(cache.get(&key("v4only.example.", RecordType::AAAA), after(t0, 60_000)).is_none());
        // The A entry is another key.
        assert!(cache.get(&key("v4only.example.", RecordType::A), t0).is_none());

        // A CNAME chain ending in NODATA is negative too: min(CNAME TTL, negative TTL).
        let mut chain = response("www.example.", RecordType::AAAA, ResponseCode::NoError);
        chain.add_answer(cname("www.example.", 3600, "v4only.example.net."));
        chain.add_authority(soa("example.net.", 600, 45));
        cache.insert(key("www.example.", RecordType::AAAA), &chain, t0);
        let hit = cache.get(&key("www.example.", RecordType::AAAA), t0).expect("cached");
        assert_eq!(ttls(&hit.answers), [45]);
        assert!(cache.get(&key("www.example.", RecordType::AAAA), after(t0, 45_000)).is_none());

        // ... but a CNAME is the answer to a CNAME query.
        let mut cn = response("www.example.", RecordType::CNAME, ResponseCode::NoError);
        cn.add_answer(cname("www.example.", 3600, "v4only.example.net."));
        cache.insert(key("www.example.", RecordType::CNAME), &cn, t0);
        let hit = cache.get(&key("www.example.", RecordType::CNAME), t0).expect("cached");
        assert_eq!(ttls(&hit.answers), [3600]);
    }

    #[test]
    fn negative_answer_without_soa_not_cached() {
        let cache = Cache::new(100, LONG);
        let t0 = Instant::now();
        let nx = response("nope.example.", RecordType::A, ResponseCode::NXDomain);
        cache.insert(key("nope.example.", RecordType::A), &nx, t0);
        let nodata = response("v4only.example.", RecordType::AAAA, ResponseCode::NoError);
        cache.insert(key("v4only.example.", RecordType::AAAA), &nodata, t0);
        let mut chain = response("www.example.", RecordType::AAAA, ResponseCode::NoError);
        chain.add_answer(cname("www.example.", 3600, "v4only.example.net."));
        cache.insert(key("www.example.", RecordType::AAAA), &chain, t0);
        assert!(cache.is_empty());
    }

    #[test]
    fn servfail_refused_formerr_truncated_and_ttl_zero_not_cached() {
        let cache = Cache::new(100, LONG);
        let t0 = Instant::now();
        for rcode in [ResponseCode::ServFail, ResponseCode::Refused, ResponseCode::FormErr, ResponseCode::NotImp] {
            let mut m = response("a.example.", RecordType::A, rcode);
            m.add_authority(soa("example.", 600, 60));
            cache.insert(key("a.example.", RecordType::A), &m, t0);
        }
        let mut tc = positive("a.example.", 300);
        tc.metadata.truncation = true;
        cache.insert(key("a.example.", RecordType::A), &tc, t0);
        let mut zero = positive("a.example.", 300);
        zero.add_answer(a("a.example.", 0, 2));
        cache.insert(key("a.example.", RecordType::A), &zero, t0);
        let mut zero_negative = response("b.example.", RecordType::A, ResponseCode::NXDomain);
        zero_negative.add_authority(soa("example.", 600, 0));
        cache.insert(key("b.example.", RecordType::A), &zero_negative, t0);
        let mut not_a_response = positive("a.example.", 300);
        not_a_response.metadata.message_type = MessageType::Query;
        cache.insert(key("a.example.", RecordType::A), &not_a_response, t0);
        let mut notify = positive("a.example.", 300);
        notify.metadata.op_code = OpCode::Notify;
        cache.insert(key("a.example.", RecordType::A), &notify, t0);
        assert!(cache.is_empty());
        assert!(cache.get(&key("a.example.", RecordType::A), t0).is_none());
    }

    #[test]
    fn response_to_another_question_not_cached() {
        let cache = Cache::new(100, LONG);
        let t0 = Instant::now();
        cache.insert(key("a.example.", RecordType::A), &positive("evil.example.", 300), t0);
        cache.insert(key("a.example.", RecordType::AAAA), &positive("a.example.", 300), t0);
        let mut chaos = positive("a.example.", 300);
        chaos.queries[0].set_query_class(DNSClass::CH);
        cache.insert(key("a.example.", RecordType::A), &chaos, t0);
        let mut two = positive("a.example.", 300);
        two.add_query(Query::query(name("b.example."), RecordType::A));
        cache.insert(key("a.example.", RecordType::A), &two, t0);
        let mut none = positive("a.example.", 300);
        none.queries.clear();
        cache.insert(key("a.example.", RecordType::A), &none, t0);
        assert!(cache.is_empty());

        // Case differences (0x20 randomisation) are the same question.
        cache.insert(key("a.example.", RecordType::A), &positive("A.ExAmPlE.", 300), t0);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn keys_ignore_case_but_separate_type_and_dnssec_ok() {
        let cache = Cache::new(100, LONG);
        let t0 = Instant::now();
        cache.insert(key("Mixed.Example.", RecordType::A), &positive("mixed.example.", 300), t0);
        let shouting = CacheKey { name: "MIXED.EXAMPLE.".to_owned(), qtype: 1, dnssec_ok: false };
        assert!(cache.get(&shouting, t0).is_some());
        cache.insert(shouting.clone(), &positive("mixed.example.", 100), t0);
        assert_eq!(cache.len(), 1, "the same key replaces its entry");
        assert_eq!(ttls(&cache.get(&key("mixed.example.", RecordType::A), t0).unwrap().answers), [100]);
        let with_do = CacheKey { dnssec_ok: true, ..shouting.clone() };
        assert!(cache.get(&with_do, t0).is_none());
        assert!(cache.get(&key("mixed.example.", RecordType::AAAA), t0).is_none());

        let mut q = Message::new(7, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(name("Mixed.Example."), RecordType::A));
        assert_eq!(CacheKey::for_query(&q), Some(key("mixed.example.", RecordType::A)));
        let mut edns = Edns::new();
        edns.flags_mut().dnssec_ok = true;
        q.set_edns(edns);
        assert_eq!(CacheKey::for_query(&q), Some(CacheKey::new(&name("mixed.example."), RecordType::A, true)));
        let mut axfr = Message::new(7, MessageType::Query, OpCode::Query);
        axfr.add_query(Query::query(name("example."), RecordType::AXFR));
        assert_eq!(CacheKey::for_query(&axfr), None);
        let mut chaos = Message::new(7, MessageType::Query, OpCode::Query);
        let mut question = Query::query(name("version.bind."), RecordType::TXT);
        question.set_query_class(DNSClass::CH);
        chaos.add_query(question);
        assert_eq!(CacheKey::for_query(&chaos), None);
        assert_eq!(CacheKey::for_query(&Message::new(7, MessageType::Query, OpCode::Query)), None);
    }

    #[test]
    fn expired_entry_is_a_miss() {
        let cache = Cache::new(100, LONG);
        let t0 = Instant::now();
        cache.insert(key("a.example.", RecordType::A), &positive("a.example.", 5), t0);
        assert!(cache.get(&key("a.example.", RecordType::A), after(t0, 4_999)).is_some());
        assert!(cache.get(&key("a.example.", RecordType::A), after(t0, 5_000)).is_none());
        assert!(cache.is_empty(), "an expired entry is dropped when found");
        assert!(cache.get(&key("a.example.", RecordType::A), after(t0, 1_000)).is_none());
    }

    #[test]
    fn capacity_bounds_len_under_unique_flood() {
        for capacity in [1, 10, 64, 100, 1000, 5000] {
            let cache = Cache::new(capacity, LONG);
            let t0 = Instant::now();
            for i in 0..capacity * 10 {
                let qname = format!("n{i}.flood.example.");
                cache.insert(key(&qname, RecordType::A), &positive(&qname, 300), t0);
                assert!(cache.len() <= capacity);
            }
            assert!(cache.len() <= capacity, "capacity {capacity}: len {}", cache.len());
            assert!(cache.len() * 10 >= capacity * 9, "capacity {capacity}: only {} entries kept", cache.len());
            // The slabs never grow past their share, with a bounded number of bytes.
            for shard in &cache.shards {
                let shard = lock(shard);
                assert!(shard.slots.len() <= shard.max_entries);
                assert!(shard.bytes <= shard.max_bytes);
                assert_eq!(shard.index.len(), shard.slots.len());
            }
        }
    }

    #[test]
    fn large_responses_bounded_by_bytes() {
        let cache = Cache::new(64, LONG);
        let t0 = Instant::now();
        let big = |qname: &str, chunks: usize| {
            let mut m = response(qname, RecordType::TXT, ResponseCode::NoError);
            m.add_answer(Record::from_rdata(name(qname), 300, RData::TXT(TXT::new(vec!["x".repeat(250); chunks]))));
            m
        };
        // Over MAX_ENTRY_BYTES: passed through, not stored.
        cache.insert(key("huge.example.", RecordType::TXT), &big("huge.example.", 20), t0);
        assert!(cache.is_empty());
        // ~3 KB each: the 64 KiB budget holds about 21 of them, not 64.
        for i in 0..640 {
            let qname = format!("t{i}.example.");
            cache.insert(key(&qname, RecordType::TXT), &big(&qname, 12), t0);
        }
        assert!(cache.len() <= 64 * BYTES_PER_ENTRY / 3000, "len {}", cache.len());
        assert!(cache.len() >= 10);
        let shard = lock(&cache.shards[0]);
        assert!(shard.bytes <= shard.max_bytes);
        assert_eq!(shard.bytes, shard.slots.iter().map(|s| s.wire.len()).sum::<usize>());
    }

    #[test]
    fn hot_key_survives_cold_scan_unlike_fifo() {
        // 64 entries: one shard, so the whole scan goes through one clock.
        let cache = Cache::new(64, LONG);
        let t0 = Instant::now();
        cache.insert(key("hot.example.", RecordType::A), &positive("hot.example.", 300), t0);
        cache.insert(key("peer.example.", RecordType::A), &positive("peer.example.", 300), t0);
        for i in 0..640 {
            let qname = format!("cold{i}.example.");
            cache.insert(key(&qname, RecordType::A), &positive(&qname, 300), t0);
            if i % 16 == 0 {
                assert!(cache.get(&key("hot.example.", RecordType::A), t0).is_some(), "hot key evicted after {i} cold");
            }
            assert!(cache.len() <= 64);
        }
        // FIFO would have evicted the hot key after 63 cold inserts; CLOCK kept it through ten
        // times the capacity. Its peer, inserted alongside but never read, went as FIFO would.
        assert!(cache.get(&key("hot.example.", RecordType::A), t0).is_some());
        assert!(cache.get(&key("peer.example.", RecordType::A), t0).is_none());
        // The most recent cold keys are there, the early ones are gone.
        assert!(cache.get(&key("cold639.example.", RecordType::A), t0).is_some());
        assert!(cache.get(&key("cold0.example.", RecordType::A), t0).is_none());
    }

    #[test]
    fn hot_keys_survive_across_shards() {
        let cache = Cache::new(1024, LONG);
        assert_eq!(cache.shards.len(), MAX_SHARDS);
        let t0 = Instant::now();
        let hot: Vec<String> = (0..32).map(|i| format!("hot{i}.example.")).collect();
        for h in &hot {
            cache.insert(key(h, RecordType::A), &positive(h, 300), t0);
        }
        for i in 0..10_240 {
            let qname = format!("cold{i}.example.");
            cache.insert(key(&qname, RecordType::A), &positive(&qname, 300), t0);
            if i % 8 == 0 {
                for h in &hot {
                    assert!(cache.get(&key(h, RecordType::A), t0).is_some(), "{h} evicted after {i} cold");
                }
            }
        }
        assert!(cache.len() <= 1024);
    }

    #[test]
    fn expired_entries_are_evicted_first() {
        let cache = Cache::new(64, LONG);
        let t0 = Instant::now();
        for i in 0..63 {
            let qname = format!("long{i}.example.");
            cache.insert(key(&qname, RecordType::A), &positive(&qname, 3600), t0);
        }
        cache.insert(key("short.example.", RecordType::A), &positive("short.example.", 10), t0);
        // Everything referenced: plain CLOCK would evict whatever the hand meets first.
        for i in 0..63 {
            assert!(cache.get(&key(&format!("long{i}.example."), RecordType::A), t0).is_some());
        }
        assert!(cache.get(&key("short.example.", RecordType::A), t0).is_some());
        let t1 = after(t0, 11_000);
        cache.insert(key("new.example.", RecordType::A), &positive("new.example.", 300), t1);
        assert_eq!(cache.len(), 64);
        for i in 0..63 {
            assert!(cache.get(&key(&format!("long{i}.example."), RecordType::A), t1).is_some(), "long{i} evicted");
        }
        assert!(cache.get(&key("new.example.", RecordType::A), t1).is_some());
    }

    #[test]
    fn clear_drops_everything() {
        let cache = Cache::new(100, LONG);
        let t0 = Instant::now();
        for i in 0..50 {
            let qname = format!("n{i}.example.");
            cache.insert(key(&qname, RecordType::A), &positive(&qname, 300), t0);
        }
        assert_eq!(cache.len(), 50);
        assert_eq!(cache.capacity(), 100);
        cache.clear();
        assert!(cache.is_empty());
        assert!(cache.get(&key("n1.example.", RecordType::A), t0).is_none());
        cache.insert(key("n1.example.", RecordType::A), &positive("n1.example.", 300), t0);
        assert_eq!(cache.len(), 1);
        assert!(format!("{cache:?}").contains("capacity: 100"));
    }

    #[test]
    fn zero_capacity_never_caches() {
        let cache = Cache::new(0, LONG);
        let t0 = Instant::now();
        cache.insert(key("a.example.", RecordType::A), &positive("a.example.", 300), t0);
        assert!(cache.is_empty());
        assert_eq!(cache.capacity(), 0);
        assert!(cache.get(&key("a.example.", RecordType::A), t0).is_none());

        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let calls = AtomicUsize::new(0);
        for _ in 0..3 {
            let (m, hit) = rt
                .block_on(cache.get_or_fetch(key("a.example.", RecordType::A), t0, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, String>(positive("a.example.", 300))
                }))
                .unwrap();
            assert!(!hit);
            assert_eq!(m.metadata.id, 0);
            assert_eq!(ttls(&m.answers), [300]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(cache.is_empty());
    }

    #[tokio::test]
    async fn get_or_fetch_caches_then_hits() {
        let cache = Cache::new(100, LONG);
        let t0 = Instant::now();
        let calls = AtomicUsize::new(0);
        let fetch = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut m = positive("a.example.", 300);
            m.set_edns(Edns::new());
            Ok::<_, String>(m)
        };
        let (m, hit) = cache.get_or_fetch(key("a.example.", RecordType::A), t0, fetch).await.unwrap();
        assert!(!hit);
        assert_eq!(m.metadata.id, 0);
        assert!(m.edns.is_none());
        let (m, hit) = cache.get_or_fetch(key("a.example.", RecordType::A), after(t0, 7_000), fetch).await.unwrap();
        assert!(hit);
        assert_eq!(ttls(&m.answers), [293]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Uncacheable answers are returned (normalised) and fetched every time.
        let servfail = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut m = response("b.example.", RecordType::A, ResponseCode::ServFail);
            m.set_edns(Edns::new());
            Ok::<_, String>(m)
        };
        for _ in 0..2 {
            let (m, hit) = cache.get_or_fetch(key("b.example.", RecordType::A), t0, servfail).await.unwrap();
            assert!(!hit);
            assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
            assert_eq!(m.metadata.id, 0);
            assert!(m.edns.is_none());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(cache.len(), 1);
        assert!(cache.shards.iter().all(|s| lock(s).flights.is_empty()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_misses_fetch_once() {
        let cache = Arc::new(Cache::new(100, LONG));
        let calls = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(tokio::sync::Barrier::new(50));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, calls, start) = (Arc::clone(&cache), Arc::clone(&calls), Arc::clone(&start));
                tokio::spawn(async move {
                    start.wait().await;
                    cache
                        .get_or_fetch(key("busy.example.", RecordType::A), t0, || async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            Ok::<_, String>(positive("busy.example.", 300))
                        })
                        .await
                })
            })
            .collect();
        let mut hits = 0;
        for task in tasks {
            let (m, hit) = tokio::time::timeout(WAIT, task).await.expect("no hang").unwrap().unwrap();
            assert_eq!(m.answers.len(), 1);
            assert_eq!(m.answers[0].data, RData::A(A(Ipv4Addr::new(192, 0, 2, 1))));
            hits += usize::from(hit);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(hits, 49, "all but the fetching caller got it without fetching");
        assert_eq!(cache.len(), 1);
        assert!(cache.shards.iter().all(|s| lock(s).flights.is_empty()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fetch_error_reaches_every_waiter_and_is_not_cached() {
        let cache = Arc::new(Cache::new(100, LONG));
        let calls = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(tokio::sync::Barrier::new(20));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (cache, calls, start) = (Arc::clone(&cache), Arc::clone(&calls), Arc::clone(&start));
                tokio::spawn(async move {
                    start.wait().await;
                    cache
                        .get_or_fetch(key("down.example.", RecordType::A), t0, || async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            Err::<Message, _>("upstream timeout".to_owned())
                        })
                        .await
                })
            })
            .collect();
        for task in tasks {
            let result = tokio::time::timeout(WAIT, task).await.expect("no hang").unwrap();
            assert_eq!(result.unwrap_err(), "upstream timeout");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(cache.is_empty());
        assert!(cache.shards.iter().all(|s| lock(s).flights.is_empty()));
        // The next caller fetches afresh.
        let (_, hit) = cache
            .get_or_fetch(key("down.example.", RecordType::A), t0, || async {
                Ok::<_, String>(positive("down.example.", 300))
            })
            .await
            .unwrap();
        assert!(!hit);
        assert_eq!(cache.len(), 1);
    }

    /// Starts a fetcher for `qname` that never finishes, then `waiters` callers that would
    /// answer; returns the fetcher's handle, the waiters' handles, and their fetch count.
    async fn stuck_fetcher_with_waiters(
        cache: &Arc<Cache>,
        qname: &'static str,
        waiters: usize,
        stuck: impl Future<Output = ()> + Send + 'static,
    ) -> (tokio::task::JoinHandle<()>, Vec<tokio::task::JoinHandle<Result<(Message, bool), String>>>, Arc<AtomicUsize>)
    {
        let t0 = Instant::now();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let fetcher = {
            let cache = Arc::clone(cache);
            tokio::spawn(async move {
                let _ = cache
                    .get_or_fetch(key(qname, RecordType::A), t0, || async move {
                        let _ = started_tx.send(());
                        stuck.await;
                        Err::<Message, String>("unreachable".to_owned())
                    })
                    .await;
            })
        };
        started_rx.await.unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let handles = (0..waiters)
            .map(|_| {
                let (cache, calls) = (Arc::clone(cache), Arc::clone(&calls));
                tokio::spawn(async move {
                    cache
                        .get_or_fetch(key(qname, RecordType::A), t0, || async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, String>(positive(qname, 300))
                        })
                        .await
                })
            })
            .collect();
        // Let the waiters find the flight and subscribe.
        tokio::time::sleep(Duration::from_millis(100)).await;
        (fetcher, handles, calls)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn cancelled_fetch_does_not_strand_waiters() {
        let cache = Arc::new(Cache::new(100, LONG));
        let (fetcher, waiters, calls) =
            stuck_fetcher_with_waiters(&cache, "stuck.example.", 10, std::future::pending()).await;
        assert_eq!(calls.load(Ordering::SeqCst), 0, "waiters wait for the fetcher");
        fetcher.abort();
        assert!(fetcher.await.unwrap_err().is_cancelled());
        for waiter in waiters {
            let (m, _) = tokio::time::timeout(WAIT, waiter).await.expect("waiter hung").unwrap().unwrap();
            assert_eq!(m.answers.len(), 1);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one waiter took over the fetch, the rest coalesced on it");
        assert_eq!(cache.len(), 1);
        assert!(cache.shards.iter().all(|s| lock(s).flights.is_empty()));

        // Cancellation by a caller's own timeout, the usual way, behaves the same.
        let t0 = Instant::now();
        let slow = cache.get_or_fetch(key("slow.example.", RecordType::A), t0, || async {
            std::future::pending::<()>().await;
            Ok::<_, String>(positive("slow.example.", 300))
        });
        assert!(tokio::time::timeout(Duration::from_millis(50), slow).await.is_err());
        let quick = cache.get_or_fetch(key("slow.example.", RecordType::A), t0, || async {
            Ok::<_, String>(positive("slow.example.", 300))
        });
        let (_, hit) = tokio::time::timeout(WAIT, quick).await.expect("no stale flight").unwrap();
        assert!(!hit);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn panicking_fetch_does_not_strand_waiters() {
        let cache = Arc::new(Cache::new(100, LONG));
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let (fetcher, waiters, calls) = stuck_fetcher_with_waiters(&cache, "boom.example.", 5, async move {
            let _ = release_rx.await;
            panic!("fetch panicked");
        })
        .await;
        release_tx.send(()).unwrap();
        assert!(fetcher.await.unwrap_err().is_panic());
        for waiter in waiters {
            let (m, _) = tokio::time::timeout(WAIT, waiter).await.expect("waiter hung").unwrap().unwrap();
            assert_eq!(m.answers.len(), 1);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn waiters_with_another_error_type_fetch_alone() {
        let cache = Arc::new(Cache::new(100, LONG));
        let t0 = Instant::now();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move {
                cache
                    .get_or_fetch(key("mixed.example.", RecordType::A), t0, || async move {
                        let _ = started_tx.send(());
                        let _ = release_rx.await;
                        Ok::<_, String>(positive("mixed.example.", 300))
                    })
                    .await
            })
        };
        started_rx.await.unwrap();
        let (m, hit) = cache
            .get_or_fetch(key("mixed.example.", RecordType::A), t0, || async {
                Ok::<_, std::io::ErrorKind>(positive("mixed.example.", 100))
            })
            .await
            .map_err(|_| ())
            .unwrap();
        assert!(!hit);
        assert_eq!(ttls(&m.answers), [100]);
        release_tx.send(()).unwrap();
        assert!(!first.await.unwrap().unwrap().1);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn cache_and_its_futures_are_send_and_sync() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: &T) {}
        let cache = Cache::new(10, LONG);
        send_sync(&cache);
        let future = cache.get_or_fetch(key("a.example.", RecordType::A), Instant::now(), || async {
            Ok::<_, String>(positive("a.example.", 1))
        });
        send(&future);
    }
}
