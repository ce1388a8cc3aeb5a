//! Load-balancing algorithms for [`Policy::pick`](crate::Policy::pick).
//!
//! Instances are pooled and interchangeable, so everything here that is
//! derived from a candidate set is deterministic: any instance builds the
//! same table from the same set, and the state that must be shared (the
//! rotation counter, the load) lives in the host. Tables are cached per
//! instance under [`Candidates::fingerprint`] in a [`FingerprintCache`].
//!
//! The cores are plain functions over slices ([`round_robin`], [`WeightedRotation`],
//! [`WeightedIndex`], [`least_request`], [`p2c_ewma`], [`Maglev`]), so they
//! can be unit-tested natively; [`Balancer`] wires them to the host's
//! [`Upstream`] and [`Candidates`]:
//!
//! ```no_run
//! use sluice_sdk::balance::{Algorithm, Balancer};
//! use sluice_sdk::{Candidates, Policy, Request, Upstream};
//!
//! struct Weighted(Balancer);
//!
//! impl Policy for Weighted {
//!     fn init(_config: &str) -> Result<Self, String> {
//!         Ok(Weighted(Balancer::new(Algorithm::Weighted)))
//!     }
//!
//!     fn pick(&self, _req: &Request, upstream: &Upstream, candidates: &Candidates) -> Option<u32> {
//!         self.0.pick(upstream, candidates)
//!     }
//! }
//!
//! sluice_sdk::export_balancer!(Weighted);
//! ```
//!
//! Weights are at least 1 (the gateway refuses 0); a weight of 0 reaching
//! these functions counts as 1.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::fmt;
use std::rc::Rc;

use crate::{Candidate, Candidates, Request, Upstream};

/// A stable, well-mixed 64-bit hash of `bytes`: FNV-1a followed by
/// MurmurHash3's `fmix64` finaliser.
///
/// The same on every build and platform, so it may be used in cookies and
/// tables shared by instances. Not cryptographic.
///
/// ```
/// # use sluice_sdk::balance::hash64;
/// assert_eq!(hash64(b"10.0.0.1:80"), hash64(b"10.0.0.1:80"));
/// assert_ne!(hash64(b"10.0.0.1:80"), hash64(b"10.0.0.2:80"));
/// ```
pub fn hash64(bytes: &[u8]) -> u64 {
    seeded_hash(FNV_OFFSET, bytes)
}

/// FNV-1a's 64-bit offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a's 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a from `seed`, then `fmix64`.
fn seeded_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut hash = seed;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    fmix64(hash)
}

/// MurmurHash3's 64-bit finaliser: every input bit affects every output bit.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// `value` scaled into `0..n` (Lemire's multiply-shift: uses the high bits).
fn below(value: u64, n: u64) -> u64 {
    ((u128::from(value) * u128::from(n)) >> 64) as u64
}

/// A weight as used by the algorithms: 0 counts as 1.
fn weight_of(weight: u32) -> u64 {
    u64::from(weight.max(1))
}

/// How many tables a [`FingerprintCache`] keeps: one plugin may balance
/// several upstreams, each with its own candidate set.
pub const CACHE_ENTRIES: usize = 8;

/// A per-instance cache of tables derived from candidate sets, keyed by
/// [`Candidates::fingerprint`]; it keeps the [`CACHE_ENTRIES`] most recently
/// used.
///
/// Hold it in the policy value: an instance runs one call at a time, and the
/// tables are deterministic, so every instance builds the same ones.
pub struct FingerprintCache<T> {
    /// Most recently used first.
    entries: RefCell<Vec<(u64, Rc<T>)>>,
}

impl<T> FingerprintCache<T> {
    /// An empty cache.
    pub const fn new() -> Self {
        FingerprintCache {
            entries: RefCell::new(Vec::new()),
        }
    }

    /// The table for `fingerprint`, built with `build` when it is not cached
    /// (evicting the least recently used when the cache is full).
    pub fn get_or_build(&self, fingerprint: u64, build: impl FnOnce() -> T) -> Rc<T> {
        if let Some(found) = self.lookup(fingerprint) {
            return found;
        }
        // Built outside the borrow, so `build` may use other caches freely.
        let table = Rc::new(build());
        let mut entries = self.entries.borrow_mut();
        entries.truncate(CACHE_ENTRIES - 1);
        entries.insert(0, (fingerprint, Rc::clone(&table)));
        table
    }

    /// The cached table for `fingerprint`, moved to the front.
    fn lookup(&self, fingerprint: u64) -> Option<Rc<T>> {
        let mut entries = self.entries.borrow_mut();
        let index = entries.iter().position(|(fp, _)| *fp == fingerprint)?;
        let entry = entries.remove(index);
        let table = Rc::clone(&entry.1);
        entries.insert(0, entry);
        Some(table)
    }
}

impl<T> Default for FingerprintCache<T> {
    fn default() -> Self {
        FingerprintCache::new()
    }
}

impl<T> fmt::Debug for FingerprintCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fingerprints: Vec<u64> = self.entries.borrow().iter().map(|(fp, _)| *fp).collect();
        f.debug_struct("FingerprintCache")
            .field("fingerprints", &fingerprints)
            .finish()
    }
}

/// Plain round-robin: the position for the `turn`-th pick (`turn % len`),
/// ignoring weights; `None` when `len` is 0.
///
/// ```
/// # use sluice_sdk::balance::round_robin;
/// let picks: Vec<_> = (0..4).filter_map(|turn| round_robin(turn, 3)).collect();
/// assert_eq!(picks, [0, 1, 2, 0]);
/// ```
pub fn round_robin(turn: u64, len: u32) -> Option<u32> {
    (len > 0).then(|| (turn % u64::from(len)) as u32)
}

/// Smooth weighted round-robin, as nginx does it, precomputed as one cycle.
///
/// Each step adds every candidate's weight to its `current`, picks the
/// largest `current` (the first on a tie) and subtracts the total from it:
/// weights 5, 1, 1 give `a a b a c a a`. Heavier candidates get
/// proportionally more turns, spread out rather than in a burst: a candidate
/// never gets more than its weight in a row.
///
/// Weights are divided by their greatest common divisor; if their total still
/// exceeds [`WeightedRotation::MAX_CYCLE`] they are scaled down to fit (each
/// kept at least 1), so the cycle is at most `MAX_CYCLE` or the number of
/// candidates long. Building costs O(cycle × candidates), once per set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedRotation {
    /// Positions, in pick order.
    cycle: Vec<u32>,
}

impl WeightedRotation {
    /// The longest cycle built for weights that do not reduce further.
    pub const MAX_CYCLE: u64 = 10_000;

    /// The rotation for candidates with `weights`, by position.
    pub fn new(weights: &[u32]) -> Self {
        let weights = reduce_weights(weights, Self::MAX_CYCLE);
        let total: i64 = weights.iter().map(|&w| w as i64).sum();
        let mut current = vec![0i64; weights.len()];
        let mut cycle = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            let mut best = 0;
            for (position, &weight) in weights.iter().enumerate() {
                current[position] += weight as i64;
                if current[position] > current[best] {
                    best = position;
                }
            }
            current[best] -= total;
            cycle.push(u32::try_from(best).unwrap_or(u32::MAX));
        }
        WeightedRotation { cycle }
    }

    /// The position for the `turn`-th pick (`cycle[turn % len]`); `None`
    /// when there are no candidates.
    pub fn at(&self, turn: u64) -> Option<u32> {
        let len = self.cycle.len() as u64;
        if len == 0 {
            return None;
        }
        self.cycle.get(usize::try_from(turn % len).ok()?).copied()
    }

    /// One cycle of positions, in pick order.
    pub fn cycle(&self) -> &[u32] {
        &self.cycle
    }
}

/// `weights` (0 as 1) divided by their GCD, then scaled down so that their
/// total is at most `cap` or the number of weights, whichever is larger.
fn reduce_weights(weights: &[u32], cap: u64) -> Vec<u64> {
    let mut weights: Vec<u64> = weights.iter().map(|&w| weight_of(w)).collect();
    let divisor = weights.iter().copied().fold(0, gcd);
    if divisor > 1 {
        weights.iter_mut().for_each(|w| *w /= divisor);
    }
    let total: u64 = weights.iter().sum();
    if total > cap {
        // Each term is at most w·cap/total (≥ 1), so the new total is at
        // most cap + len.
        for w in &mut weights {
            *w = ((u128::from(*w) * u128::from(cap) / u128::from(total)) as u64).max(1);
        }
    }
    weights
}

/// The greatest common divisor (`gcd(0, n) = n`).
fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Weighted selection by cumulative weights: `index_for(value)` picks each
/// position with probability weight / total when `value` is uniform.
///
/// Used for weighted random picks (a random `value`) and for hashing a key
/// onto the candidates (a hash as `value`: stable while the set is, but not
/// consistent — see [`Maglev`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedIndex {
    /// `cumulative[i]` = sum of the weights of positions `0..=i`.
    cumulative: Vec<u64>,
}

impl WeightedIndex {
    /// The index for candidates with `weights`, by position.
    pub fn new(weights: &[u32]) -> Self {
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += weight_of(w);
                Some(*sum)
            })
            .collect();
        WeightedIndex { cumulative }
    }

    /// The sum of the weights.
    pub fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The position whose weight range holds `value`, mapped onto
    /// `0..total` by its high bits (so any `u64` works: a random value, a
    /// hash); `None` when there are no candidates.
    pub fn index_for(&self, value: u64) -> Option<u32> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let target = below(value, total);
        // The first position whose cumulative weight exceeds `target`.
        let position = self.cumulative.partition_point(|&sum| sum <= target);
        u32::try_from(position).ok()
    }
}

/// Least request, as nginx's `least_conn`: the position with the fewest
/// requests in flight per unit of weight (`in_flight / weight`, compared
/// exactly). Ties are spread: the `random % ties`-th of the tied positions
/// wins. `None` when there are no candidates.
///
/// `in_flight` and `weights` are by position; a position missing from
/// `weights` has weight 1.
pub fn least_request(in_flight: &[u32], weights: &[u32], random: u64) -> Option<u32> {
    let weight = |position: usize| weight_of(weights.get(position).copied().unwrap_or(1));
    // Compares a/wa with b/wb as a·wb with b·wa (no overflow in u64).
    let compare = |a: usize, b: usize| {
        (u64::from(in_flight[a]) * weight(b)).cmp(&(u64::from(in_flight[b]) * weight(a)))
    };
    let mut best = 0;
    let mut ties = 0u64;
    for position in 0..in_flight.len() {
        match compare(position, best) {
            Ordering::Less => {
                best = position;
                ties = 1;
            }
            Ordering::Equal => ties += 1,
            Ordering::Greater => {}
        }
    }
    if ties == 0 {
        return None;
    }
    let mut wanted = below(random, ties);
    for position in best..in_flight.len() {
        if compare(position, best) == Ordering::Equal {
            if wanted == 0 {
                return u32::try_from(position).ok();
            }
            wanted -= 1;
        }
    }
    u32::try_from(best).ok()
}

/// Two distinct positions out of `len`, drawn from `random` (the same
/// position twice only when `len` is 1); `None` when `len` is 0.
pub fn two_positions(len: u32, random: u64) -> Option<(u32, u32)> {
    match len {
        0 => None,
        1 => Some((0, 0)),
        _ => {
            let len = u64::from(len);
            let first = below(random, len);
            let mut second = below(fmix64(random ^ 0x9e37_79b9_7f4a_7c15), len - 1);
            if second >= first {
                second += 1;
            }
            Some((first as u32, second as u32))
        }
    }
}

/// Compares two candidates' load as Finagle's and linkerd's peak-EWMA
/// balancers do: `latency_ewma_us × (in_flight + 1) / weight`, exactly (no
/// floating point). A candidate without latency data (`0`) costs 0, so new
/// and recovered endpoints get probed. Equal costs compare by
/// `in_flight / weight`.
pub fn compare_ewma_cost(a: &Candidate, b: &Candidate) -> Ordering {
    let cost = |c: &Candidate, other: &Candidate| {
        u128::from(c.latency_ewma_us)
            * (u128::from(c.in_flight) + 1)
            * u128::from(weight_of(other.weight))
    };
    let load = |c: &Candidate, other: &Candidate| u64::from(c.in_flight) * weight_of(other.weight);
    cost(a, b)
        .cmp(&cost(b, a))
        .then_with(|| load(a, b).cmp(&load(b, a)))
}

/// Power of two choices over peak-EWMA cost: of the two candidates at
/// positions `a` and `b`, the position of the cheaper by
/// [`compare_ewma_cost`]; on a full tie, bit 0 of `random` decides.
pub fn p2c_ewma(a: (u32, &Candidate), b: (u32, &Candidate), random: u64) -> u32 {
    match compare_ewma_cost(a.1, b.1) {
        Ordering::Less => a.0,
        Ordering::Greater => b.0,
        Ordering::Equal if random & 1 == 0 => a.0,
        Ordering::Equal => b.0,
    }
}

/// Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
///
/// Each candidate gets a permutation of the table's slots from two hashes of
/// its *address*, and the candidates take turns claiming their next free
/// slot until the table is full. A candidate of weight `w` takes a turn in
/// `w / max_weight` of the rounds (Envoy's weighted Maglev), so its share of
/// the table is proportional to its weight. Because permutations depend on
/// addresses only, removing one of N candidates moves about 1/N of the keys.
///
/// The table size is a prime at least 100 times the number of candidates
/// (up to [`Maglev::MAX_TABLE`]), so shares are even to about 1%.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    /// Slot → position.
    table: Vec<u32>,
}

/// The table sizes Maglev chooses from: primes, roughly doubling.
const MAGLEV_PRIMES: [u64; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

impl Maglev {
    /// The largest table: for more than 655 candidates it is less than 100
    /// slots per candidate.
    pub const MAX_TABLE: u64 = 65521;

    /// The table for candidates given as `(address, weight)` by position.
    pub fn new<A: AsRef<[u8]>>(candidates: &[(A, u32)]) -> Self {
        if candidates.is_empty() {
            return Maglev { table: Vec::new() };
        }
        let wanted = candidates.len() as u64 * 100;
        let size = MAGLEV_PRIMES
            .iter()
            .copied()
            .find(|&p| p >= wanted)
            .unwrap_or(Self::MAX_TABLE);

        struct Entry {
            offset: u64,
            skip: u64,
            /// How far along its permutation the candidate is.
            next: u64,
            weight: u64,
            /// The round from which it may take its next turn, × max weight.
            target: u64,
        }
        let weights = reduce_weights(
            &candidates.iter().map(|(_, w)| *w).collect::<Vec<_>>(),
            u64::MAX,
        );
        let max_weight = weights.iter().copied().max().unwrap_or(1);
        let mut entries: Vec<Entry> = candidates
            .iter()
            .zip(&weights)
            .map(|((address, _), &weight)| {
                let address = address.as_ref();
                Entry {
                    offset: seeded_hash(FNV_OFFSET, address) % size,
                    skip: seeded_hash(FNV_OFFSET ^ 0x5bd1_e995_7f4a_7c15, address) % (size - 1) + 1,
                    next: 0,
                    weight,
                    target: 0,
                }
            })
            .collect();

        const EMPTY: u32 = u32::MAX;
        let mut table = vec![EMPTY; size as usize];
        let mut filled = 0u64;
        let mut round = 1u64;
        while filled < size {
            for (position, entry) in entries.iter_mut().enumerate() {
                if filled == size {
                    break;
                }
                if round * entry.weight < entry.target {
                    continue;
                }
                entry.target += max_weight;
                loop {
                    let slot = ((entry.offset + entry.next * entry.skip) % size) as usize;
                    entry.next += 1;
                    if table[slot] == EMPTY {
                        table[slot] = position as u32;
                        break;
                    }
                }
                filled += 1;
            }
            round += 1;
        }
        Maglev { table }
    }

    /// The position `key_hash` maps to (use [`hash64`] of the key); `None`
    /// when there are no candidates.
    pub fn lookup(&self, key_hash: u64) -> Option<u32> {
        let size = self.table.len() as u64;
        if size == 0 {
            return None;
        }
        self.table
            .get(usize::try_from(key_hash % size).ok()?)
            .copied()
    }

    /// The number of slots.
    pub fn table_size(&self) -> usize {
        self.table.len()
    }
}

/// The algorithms a [`Balancer`] runs, by their names in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// `round-robin`: candidates in turn, ignoring weights (`turn % len`).
    RoundRobin,
    /// `weighted`: smooth weighted round-robin ([`WeightedRotation`]).
    Weighted,
    /// `least-request`: fewest in flight per weight ([`least_request`]).
    LeastRequest,
    /// `p2c-ewma`: power of two choices over peak-EWMA latency ([`p2c_ewma`]).
    P2cEwma,
    /// `random`: weighted random ([`WeightedIndex`]).
    Random,
}

impl Algorithm {
    /// Every algorithm, in the order of [`Algorithm::NAMES`].
    pub const ALL: [Algorithm; 5] = [
        Algorithm::RoundRobin,
        Algorithm::Weighted,
        Algorithm::LeastRequest,
        Algorithm::P2cEwma,
        Algorithm::Random,
    ];

    /// The names [`Algorithm::parse`] accepts.
    pub const NAMES: [&'static str; 5] = [
        "round-robin",
        "weighted",
        "least-request",
        "p2c-ewma",
        "random",
    ];

    /// The algorithm called `name`; the error lists the names accepted.
    pub fn parse(name: &str) -> Result<Algorithm, String> {
        Self::NAMES
            .iter()
            .position(|&n| n == name)
            .map(|i| Self::ALL[i])
            .ok_or_else(|| {
                format!(
                    "{name:?} is not a balancing algorithm (expected one of {})",
                    Self::NAMES.join(", ")
                )
            })
    }

    /// The algorithm's name in configs.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An [`Algorithm`] with the tables it caches per candidate set: the whole
/// of a simple balancer's `pick`, or the fallback of a smarter one.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    rotations: FingerprintCache<WeightedRotation>,
    indexes: FingerprintCache<WeightedIndex>,
    weights: FingerprintCache<Vec<u32>>,
}

impl Balancer {
    /// A balancer running `algorithm`, with empty caches.
    pub const fn new(algorithm: Algorithm) -> Self {
        Balancer {
            algorithm,
            rotations: FingerprintCache::new(),
            indexes: FingerprintCache::new(),
            weights: FingerprintCache::new(),
        }
    }

    /// The algorithm it runs.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Picks a position in `candidates`; `None` only when there are none.
    ///
    /// Host calls per pick: `round-robin` and `weighted` one `turn`;
    /// `least-request` the `in_flight` list; `p2c-ewma` two `get`s; `random`
    /// one random number (plus, for tables not cached yet, the weights).
    pub fn pick(&self, upstream: &Upstream, candidates: &Candidates) -> Option<u32> {
        let len = candidates.len();
        if len == 0 {
            return None;
        }
        let picked = match self.algorithm {
            Algorithm::RoundRobin => round_robin(upstream.turn(), len),
            Algorithm::Weighted => self
                .rotations
                .get_or_build(candidates.fingerprint(), || {
                    WeightedRotation::new(&candidates.weights())
                })
                .at(upstream.turn()),
            Algorithm::LeastRequest => {
                let weights = self
                    .weights
                    .get_or_build(candidates.fingerprint(), || candidates.weights());
                least_request(&candidates.in_flight(), &weights, crate::random::next_u64())
            }
            Algorithm::P2cEwma => {
                let random = crate::random::next_u64();
                let (a, b) = two_positions(len, random)?;
                match (candidates.get(a), candidates.get(b)) {
                    (Some(ca), Some(cb)) => Some(p2c_ewma((a, &ca), (b, &cb), random >> 1)),
                    _ => Some(a),
                }
            }
            Algorithm::Random => self
                .indexes
                .get_or_build(candidates.fingerprint(), || {
                    WeightedIndex::new(&candidates.weights())
                })
                .index_for(crate::random::next_u64()),
        };
        // A table built for the same fingerprint always fits, but never hand
        // the host an out-of-range position.
        Some(picked.filter(|&p| p < len).unwrap_or(0))
    }
}

/// The value of cookie `name` in the request's `cookie` headers (every
/// value, `;`-separated `name=value` pairs, trimmed), if present.
pub fn cookie(req: &Request, name: &str) -> Option<String> {
    let headers = req.header_all("cookie");
    cookie_in(headers.iter().map(String::as_str), name).map(str::to_string)
}

/// The value of cookie `name` in `cookie` header values: the first
/// `name=value` pair, split on `;`, trimmed, surrounding double quotes
/// removed.
///
/// ```
/// # use sluice_sdk::balance::cookie_in;
/// let headers = ["theme=dark; sid=abc", "lang=en"];
/// assert_eq!(cookie_in(headers, "sid"), Some("abc"));
/// assert_eq!(cookie_in(headers, "lang"), Some("en"));
/// assert_eq!(cookie_in(headers, "id"), None);
/// ```
pub fn cookie_in<'a>(headers: impl IntoIterator<Item = &'a str>, name: &str) -> Option<&'a str> {
    headers
        .into_iter()
        .flat_map(|header| header.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key.trim() == name).then(|| {
                let value = value.trim();
                value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(value)
            })
        })
}

/// Checks the config of a plugin that takes none: only an empty JSON object
/// (`{}`, as the gateway sends when the manifest has no `config`) passes.
/// The error names the first key found, like `"mode": unknown key (weighted
/// takes no configuration)`.
///
/// ```
/// # use sluice_sdk::balance::no_config;
/// assert!(no_config(" { } ", "weighted").is_ok());
/// let err = no_config(r#"{"mode": "fast"}"#, "weighted").unwrap_err();
/// assert!(err.starts_with("\"mode\": unknown key"));
/// assert!(no_config("[]", "weighted").is_err());
/// ```
pub fn no_config(config: &str, plugin: &str) -> Result<(), String> {
    let inner = config
        .trim()
        .strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
        .map(str::trim)
        .ok_or_else(|| format!("config must be a JSON object ({plugin} takes no configuration)"))?;
    if inner.is_empty() {
        return Ok(());
    }
    let key = inner
        .strip_prefix('"')
        .and_then(|rest| rest.split('"').next())
        .unwrap_or(inner);
    Err(format!(
        "\"{key}\": unknown key ({plugin} takes no configuration)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for tests (splitmix64).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            fmix64(self.0)
        }
    }

    fn candidate(in_flight: u32, weight: u32, latency_ewma_us: u32) -> Candidate {
        Candidate {
            id: 0,
            weight,
            in_flight,
            latency_ewma_us,
            backup: false,
        }
    }

    #[test]
    fn hash_is_stable_and_mixed() {
        // Pinned: cookies and tables depend on it across builds.
        assert_eq!(hash64(b""), fmix64(FNV_OFFSET));
        assert_eq!(hash64(b"127.0.0.1:9101"), hash64(b"127.0.0.1:9101"));
        // Neighbouring inputs differ in about half their bits.
        let a = hash64(b"127.0.0.1:9101");
        let b = hash64(b"127.0.0.1:9102");
        let differing = (a ^ b).count_ones();
        assert!((16..=48).contains(&differing), "{differing}");
    }

    #[test]
    fn hash_pinned_value() {
        // FNV-1a("a") = 0xaf63dc4c8601ec8c, then fmix64.
        assert_eq!(hash64(b"a"), fmix64(0xaf63_dc4c_8601_ec8c));
        // Computed independently (and shown in sticky-cookie's README).
        assert_eq!(hash64(b"127.0.0.1:9101"), 0x78d8_6a42_5522_5be8);
    }

    #[test]
    fn cache_builds_once_and_evicts_least_recent() {
        let cache = FingerprintCache::new();
        let builds = std::cell::Cell::new(0);
        let build = |v: u64| {
            builds.set(builds.get() + 1);
            v
        };
        assert_eq!(*cache.get_or_build(1, || build(10)), 10);
        assert_eq!(*cache.get_or_build(1, || build(11)), 10);
        assert_eq!(builds.get(), 1);
        for fp in 2..=CACHE_ENTRIES as u64 {
            cache.get_or_build(fp, || build(fp));
        }
        // Touch 1 so that 2 is the least recently used, then overflow.
        cache.get_or_build(1, || build(0));
        cache.get_or_build(100, || build(100));
        assert_eq!(builds.get(), CACHE_ENTRIES + 1);
        assert_eq!(*cache.get_or_build(1, || build(0)), 10);
        assert_eq!(*cache.get_or_build(2, || build(20)), 20);
        assert_eq!(builds.get(), CACHE_ENTRIES + 2);
        assert_eq!(cache.entries.borrow().len(), CACHE_ENTRIES);
    }

    #[test]
    fn rotation_matches_nginx() {
        let rotation = WeightedRotation::new(&[5, 1, 1]);
        assert_eq!(rotation.cycle(), [0, 0, 1, 0, 2, 0, 0]);
        let picks: Vec<u32> = (0..9).filter_map(|t| rotation.at(t)).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0, 0, 0]);
        assert_eq!(WeightedRotation::new(&[1, 1, 1]).cycle(), [0, 1, 2]);
        assert_eq!(WeightedRotation::new(&[]).at(3), None);
    }

    #[test]
    fn rotation_reduces_and_caps() {
        assert_eq!(
            WeightedRotation::new(&[100, 200]).cycle(),
            WeightedRotation::new(&[1, 2]).cycle()
        );
        let capped = WeightedRotation::new(&[1_000_000, 1, 999_999]);
        let len = capped.cycle().len() as u64;
        assert!(len <= WeightedRotation::MAX_CYCLE + 3, "{len}");
        // Every candidate keeps a turn.
        for position in 0..3 {
            assert!(capped.cycle().contains(&position));
        }
        assert_eq!(WeightedRotation::new(&[0, 0]).cycle(), [0, 1]);
    }

    #[test]
    fn rotation_shares_and_runs() {
        let mut rng = Rng(7);
        for _ in 0..200 {
            let n = 1 + (rng.next() % 8) as usize;
            let weights: Vec<u32> = (0..n).map(|_| 1 + (rng.next() % 20) as u32).collect();
            let rotation = WeightedRotation::new(&weights);
            let cycle = rotation.cycle();
            let divisor = weights.iter().map(|&w| u64::from(w)).fold(0, gcd);
            for (position, &weight) in weights.iter().enumerate() {
                let share = cycle.iter().filter(|&&p| p == position as u32).count() as u64;
                assert_eq!(share, u64::from(weight) / divisor, "{weights:?}");
            }
            if n == 1 {
                continue;
            }
            // Runs, across the wrap-around too, never exceed the weight.
            let doubled: Vec<u32> = cycle.iter().chain(cycle).copied().collect();
            let mut run = 0;
            for i in 0..doubled.len() {
                run = if i > 0 && doubled[i] == doubled[i - 1] {
                    run + 1
                } else {
                    1
                };
                let weight = u64::from(weights[doubled[i] as usize]) / divisor;
                assert!(run <= weight, "{weights:?}: {cycle:?}");
            }
        }
    }

    #[test]
    fn weighted_index_shares() {
        let index = WeightedIndex::new(&[1, 3]);
        assert_eq!(index.total(), 4);
        assert_eq!(index.index_for(0), Some(0));
        assert_eq!(index.index_for(u64::MAX / 4 - 1), Some(0));
        assert_eq!(index.index_for(u64::MAX / 4 + 1), Some(1));
        assert_eq!(index.index_for(u64::MAX), Some(1));
        assert_eq!(WeightedIndex::new(&[]).index_for(5), None);

        let index = WeightedIndex::new(&[2, 1, 1]);
        let mut counts = [0u32; 3];
        let mut rng = Rng(1);
        for _ in 0..40_000 {
            counts[index.index_for(rng.next()).unwrap() as usize] += 1;
        }
        assert!((19_000..21_000).contains(&counts[0]), "{counts:?}");
        assert!((9_000..11_000).contains(&counts[1]), "{counts:?}");
        assert!((9_000..11_000).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn least_request_weighs_and_spreads_ties() {
        assert_eq!(least_request(&[], &[], 0), None);
        assert_eq!(least_request(&[3, 1, 2], &[1, 1, 1], 0), Some(1));
        // 4/4 = 1 beats 2/1 = 2.
        assert_eq!(least_request(&[2, 4], &[1, 4], 0), Some(1));
        // Missing weights count as 1.
        assert_eq!(least_request(&[2, 1], &[], 0), Some(1));
        // Ties at 0 among positions 0, 2 and 3: each gets picked.
        let mut seen = [0u32; 4];
        let mut rng = Rng(3);
        for _ in 0..3_000 {
            seen[least_request(&[0, 5, 0, 0], &[1, 1, 1, 1], rng.next()).unwrap() as usize] += 1;
        }
        assert_eq!(seen[1], 0);
        for position in [0, 2, 3] {
            assert!((800..1200).contains(&seen[position]), "{seen:?}");
        }
    }

    #[test]
    fn two_distinct_positions() {
        assert_eq!(two_positions(0, 1), None);
        assert_eq!(two_positions(1, 1), Some((0, 0)));
        let mut rng = Rng(9);
        let mut seen = [0u32; 5];
        for _ in 0..5_000 {
            let (a, b) = two_positions(5, rng.next()).unwrap();
            assert_ne!(a, b);
            assert!(a < 5 && b < 5);
            seen[a as usize] += 1;
            seen[b as usize] += 1;
        }
        for count in seen {
            assert!((1_800..2_200).contains(&count), "{seen:?}");
        }
    }

    #[test]
    fn ewma_cost() {
        // 0 latency: probed first.
        let fresh = candidate(3, 1, 0);
        let slow = candidate(0, 1, 5_000);
        assert_eq!(p2c_ewma((0, &fresh), (1, &slow), 0), 0);
        // 100 µs × 5 = 500 beats 200 µs × 3 = 600.
        assert_eq!(
            p2c_ewma((0, &candidate(4, 1, 100)), (1, &candidate(2, 1, 200)), 0),
            0
        );
        // Weight divides: 200 µs × 3 / 2 = 300 beats 500.
        assert_eq!(
            p2c_ewma((0, &candidate(4, 1, 100)), (1, &candidate(2, 2, 200)), 0),
            1
        );
        // Same cost: fewer in flight wins; then the random bit.
        assert_eq!(
            p2c_ewma((0, &candidate(2, 1, 0)), (1, &candidate(1, 1, 0)), 0),
            1
        );
        let same = candidate(1, 1, 100);
        assert_eq!(p2c_ewma((0, &same), (1, &same), 0), 0);
        assert_eq!(p2c_ewma((0, &same), (1, &same), 1), 1);
        // No overflow at the extremes.
        let huge = candidate(u32::MAX, 1, u32::MAX);
        assert_eq!(compare_ewma_cost(&huge, &huge), Ordering::Equal);
    }

    fn addresses(ports: impl Iterator<Item = u16>) -> Vec<(String, u32)> {
        ports
            .map(|port| (format!("10.0.0.{port}:8080"), 1))
            .collect()
    }

    #[test]
    fn maglev_is_even_and_minimally_disrupted() {
        let before = addresses(1..=10);
        let table = Maglev::new(&before);
        assert_eq!(table.table_size(), 1021);
        let keys: Vec<u64> = (0..10_000u32).map(|k| hash64(&k.to_le_bytes())).collect();
        let owner = |maglev: &Maglev, backends: &[(String, u32)], key: u64| {
            backends[maglev.lookup(key).unwrap() as usize].0.clone()
        };

        let mut counts = vec![0u32; 10];
        for &key in &keys {
            counts[table.lookup(key).unwrap() as usize] += 1;
        }
        for &count in &counts {
            assert!((800..1200).contains(&count), "{counts:?}");
        }

        // Remove the fourth endpoint: its keys move, few others do.
        let mut after = before.clone();
        after.remove(3);
        let smaller = Maglev::new(&after);
        let moved = keys
            .iter()
            .filter(|&&k| owner(&table, &before, k) != owner(&smaller, &after, k))
            .count();
        assert!(moved <= 1_500, "{moved} of 10000 keys moved");
        assert!(moved >= counts[3] as usize);
    }

    #[test]
    fn maglev_honours_weights() {
        let backends = vec![("a:1", 1), ("b:1", 3), ("c:1", 1)];
        let maglev = Maglev::new(&backends);
        let mut counts = [0u32; 3];
        for slot in &maglev.table {
            counts[*slot as usize] += 1;
        }
        let size = maglev.table_size() as u32;
        assert_eq!(counts.iter().sum::<u32>(), size);
        // 1/5, 3/5, 1/5 of the table, to within a slot or two.
        assert!(counts[1].abs_diff(size * 3 / 5) <= 2, "{counts:?}");
        assert!(counts[0].abs_diff(size / 5) <= 2, "{counts:?}");
        assert_eq!(Maglev::new::<&str>(&[]).lookup(1), None);
        assert_eq!(Maglev::new(&[("only", 7)]).lookup(12345), Some(0));
    }

    #[test]
    fn maglev_table_sizes() {
        assert_eq!(Maglev::new(&addresses(1..=2)).table_size(), 251);
        assert_eq!(Maglev::new(&addresses(1..=3)).table_size(), 509);
        let many: Vec<(String, u32)> = (0..1000).map(|i| (format!("h{i}"), 1)).collect();
        assert_eq!(Maglev::new(&many).table_size() as u64, Maglev::MAX_TABLE);
    }

    #[test]
    fn algorithm_names_round_trip() {
        for algorithm in Algorithm::ALL {
            assert_eq!(Algorithm::parse(algorithm.name()), Ok(algorithm));
        }
        let err = Algorithm::parse("fastest").unwrap_err();
        assert!(
            err.contains("\"fastest\"") && err.contains("p2c-ewma"),
            "{err}"
        );
    }

    #[test]
    fn cookies() {
        let headers = [" a=1 ;b = 2", "c=\"3\"; d=x=y", "noequals; e="];
        assert_eq!(cookie_in(headers, "a"), Some("1"));
        assert_eq!(cookie_in(headers, "b"), Some("2"));
        assert_eq!(cookie_in(headers, "c"), Some("3"));
        assert_eq!(cookie_in(headers, "d"), Some("x=y"));
        assert_eq!(cookie_in(headers, "e"), Some(""));
        assert_eq!(cookie_in(headers, "noequals"), None);
        assert_eq!(cookie_in([], "a"), None);
        // The first occurrence wins, as in browsers' ordering (most specific path first).
        assert_eq!(cookie_in(["a=1; a=2"], "a"), Some("1"));
    }
}
