//! The segment rule over bytes: which keys name an adapter tensor. No Python types here.
//!
//! A key is a dotted path (`root.model.layers.0.q_proj.lora_A.default.weight`). It matches when
//! one of its segments *starts with* a prefix (or *equals* an exact name) and the very next
//! segment is one of the adapter names. Two refinements make PEFT's shared tensors come out right:
//! a `shared` segment below the model level (the first segment, or the second after a leading
//! `root`, the model root segment the caller names) is a reference to a model-level tensor (never
//! saved, harmless when missing), and `ignore` expressions drop keys the caller does not care
//! about. Every name, the root's included, is data: this module holds none of PEFT's.
//!
//! Keys are bytes, not `str`: Python strings with lone surrogates reach us encoded with
//! `surrogatepass` (WTF-8), and every comparison here is a byte comparison, which gives the same
//! answer as comparing code points because UTF-8 is prefix-free and `.` never occurs inside a
//! multi-byte sequence.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::RegexSet;

/// A reason a matcher could not be built. The Python layer validates first and gives friendlier
/// messages; these guard the core when it is used on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    /// A prefix, exact name, shared name, adapter name or the root that is empty or holds a dot.
    BadName { what: &'static str, name: String },
    /// An ignore expression the `regex` crate rejects.
    BadIgnore { pattern: String, reason: String },
    /// The automaton could not be built (e.g. it would be too large).
    Automaton(String),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::BadName { what, name } if name.is_empty() => {
                write!(f, "{what}: names must not be empty")
            }
            BuildError::BadName { what, name } => {
                write!(
                    f,
                    "{what}: {name:?} contains a dot; a name must lie within one segment"
                )
            }
            BuildError::BadIgnore { pattern, reason } => {
                write!(
                    f,
                    "ignore: {pattern:?} is not a valid regular expression: {reason}"
                )
            }
            BuildError::Automaton(reason) => write!(f, "cannot build the key automaton: {reason}"),
        }
    }
}

impl std::error::Error for BuildError {}

/// What the segment after a match must be.
enum Adapters {
    /// Any segment (the key must still have one after the match).
    Any,
    /// One of these names; the value is the name's index in the order given.
    Named(HashMap<Box<[u8]>, usize, BuildHasherDefault<WordHash>>),
}

/// A word-at-a-time multiplicative hash (as rustc's FxHash): adapter names are short keys of
/// our own table, looked up once per key. SipHash cost 4% of the group benchmark and byte-wise
/// FNV more (perf); this reads eight bytes per multiply.
#[derive(Default)]
struct WordHash(u64);

impl WordHash {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for WordHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(head(chunk));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            self.add(head(rest));
        }
    }

    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }
}

/// How a key is searched. Both find the same match, the rightmost; they differ in which
/// half of a match they look for first, so that the rare half rejects most keys in one
/// SIMD-accelerated search.
enum Strategy {
    /// Few adapter names: find `.name` (leftmost-longest, so `.default_1` is preferred to
    /// `.default` where both start), then check the segment before it.
    NameFirst(Needles),
    /// Many names, or any name: walk the segments from the right, and where one qualifies read
    /// the next. (An Aho-Corasick search for the prefixes was slower here: its prefilter picks a
    /// "rare" byte such as `_` that every key is full of; 333 against 67 ns per key on the group
    /// benchmark, measured with perf.)
    PrefixFirst(Adapters),
}

/// The `.name` needles of the name-first strategy, with each needle's adapter index. One needle
/// is searched with `memmem` directly: the automaton would delegate to the same SIMD searcher,
/// but its per-search setup costs a fifth of the time per key (measured with perf).
enum Needles {
    One(Box<memchr::memmem::Finder<'static>>, usize),
    Many(AhoCorasick, Vec<usize>),
}

/// With up to this many adapter names, searching for the names first is faster: the
/// automaton's SIMD prefilter handles a few needles, and a name is rarer than a prefix.
const NAME_FIRST_LIMIT: usize = 8;

/// The result of classifying one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'k> {
    /// No adapter tensor is named by this key.
    Miss,
    /// The key names a tensor of the adapter at this index (in the order given to the matcher).
    Named(usize),
    /// Any adapter name accepted: the key names a tensor of the adapter with this name.
    Any(&'k [u8]),
}

/// Where a match lies in a key: the qualifying segment, the adapter-name segment after it, and
/// the adapter's index (None when any name is accepted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub segment: std::ops::Range<usize>,
    pub adapter: std::ops::Range<usize>,
    pub index: Option<usize>,
}

/// The prefixes and exact names, bucketed by their first byte: whether one segment qualifies is
/// a handful of integer comparisons. (An anchored Aho-Corasick search did the same in a fifth of
/// the time per key of the dense benchmark, measured with perf: its per-search setup dominates
/// on segments this short; a `memcmp` call per candidate was a tenth of the group benchmark.)
struct SegmentPatterns {
    buckets: Vec<Vec<SegmentPattern>>,
}

/// A pattern as its first eight bytes (little-endian, masked) and the rest.
struct SegmentPattern {
    head: u64,
    mask: u64,
    len: usize,
    rest: Box<[u8]>,
    exact: bool,
}

/// The first eight bytes of `bytes`, zero-padded, as one integer.
#[inline]
fn head(bytes: &[u8]) -> u64 {
    if let Some(Ok(eight)) = bytes.get(..8).map(<[u8; 8]>::try_from) {
        return u64::from_le_bytes(eight);
    }
    bytes
        .iter()
        .rev()
        .fold(0u64, |value, &byte| (value << 8) | u64::from(byte))
}

impl SegmentPatterns {
    fn new(prefixes: &[Box<[u8]>], exact: &[Box<[u8]>]) -> Self {
        let mut buckets: Vec<Vec<SegmentPattern>> = (0..256).map(|_| Vec::new()).collect();
        let tagged = prefixes
            .iter()
            .map(|p| (p, false))
            .chain(exact.iter().map(|e| (e, true)));
        for (pattern, exact) in tagged {
            // Names are never empty (checked by `check_names`).
            let Some(&first) = pattern.first() else {
                continue;
            };
            let used = pattern.len().min(8);
            let mask = if used == 8 {
                u64::MAX
            } else {
                (1u64 << (8 * used)) - 1
            };
            buckets[usize::from(first)].push(SegmentPattern {
                head: head(pattern),
                mask,
                len: pattern.len(),
                rest: Box::from(&pattern[used..]),
                exact,
            });
        }
        SegmentPatterns { buckets }
    }

    fn qualifies(&self, segment: &[u8]) -> bool {
        let Some(&first) = segment.first() else {
            return false;
        };
        let bucket = &self.buckets[usize::from(first)];
        if bucket.is_empty() {
            return false;
        }
        let segment_head = head(segment);
        bucket.iter().any(|pattern| {
            let fits = if pattern.exact {
                segment.len() == pattern.len
            } else {
                segment.len() >= pattern.len
            };
            fits && segment_head & pattern.mask == pattern.head
                && (pattern.rest.is_empty() || segment[8..pattern.len] == *pattern.rest)
        })
    }
}

pub struct Matcher {
    segment: SegmentPatterns,
    strategy: Strategy,
    shared: Vec<Box<[u8]>>,
    /// The model root segment and its dot (`root.`): a shared segment right after it is at the
    /// model level.
    root_dot: Box<[u8]>,
    ignore: Option<RegexSet>,
}

pub(crate) fn check_names<'a>(
    what: &'static str,
    names: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<Box<[u8]>>, BuildError> {
    names
        .into_iter()
        .map(|name| {
            if name.is_empty() || name.contains(&b'.') {
                Err(BuildError::BadName {
                    what,
                    name: String::from_utf8_lossy(name).into_owned(),
                })
            } else {
                Ok(Box::from(name))
            }
        })
        .collect()
}

fn dotted(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 1);
    out.push(b'.');
    out.extend_from_slice(name);
    out
}

fn segment_end(key: &[u8], from: usize) -> usize {
    memchr::memchr(b'.', &key[from..]).map_or(key.len(), |offset| from + offset)
}

impl Matcher {
    /// Builds a matcher. `adapter_names` of `None` accepts any next segment. `root` is the
    /// segment a model's keys start with (a shared segment right after it is at the model level).
    /// All names are raw bytes (UTF-8, or WTF-8 for strings with lone surrogates); `ignore` holds
    /// expressions of the `regex` crate, searched anywhere in a key. The root is checked first.
    pub fn new<'a>(
        prefixes: impl IntoIterator<Item = &'a [u8]>,
        exact: impl IntoIterator<Item = &'a [u8]>,
        adapter_names: Option<Vec<&'a [u8]>>,
        shared: impl IntoIterator<Item = &'a [u8]>,
        root: &'a [u8],
        ignore: &[&str],
    ) -> Result<Self, BuildError> {
        check_names("root", [root])?;
        let root_dot = Box::from([root, b"."].concat());
        let prefixes = check_names("prefixes", prefixes)?;
        let exact = check_names("exact", exact)?;
        let shared = check_names("shared", shared)?;
        let segment = SegmentPatterns::new(&prefixes, &exact);
        let strategy = match adapter_names {
            Some(names) if names.len() <= NAME_FIRST_LIMIT => {
                let names = check_names("adapter_names", names)?;
                let mut index = Vec::with_capacity(names.len());
                let mut needles: Vec<Vec<u8>> = Vec::with_capacity(names.len());
                for (position, name) in names.iter().enumerate() {
                    // A repeated name keeps the index of its first occurrence.
                    if !names[..position].contains(name) {
                        needles.push(dotted(name));
                        index.push(position);
                    }
                }
                let needles = match (needles.as_slice(), index.as_slice()) {
                    ([needle], [position]) => Needles::One(
                        Box::new(memchr::memmem::Finder::new(needle).into_owned()),
                        *position,
                    ),
                    _ => Needles::Many(
                        AhoCorasickBuilder::new()
                            .match_kind(MatchKind::LeftmostLongest)
                            .build(&needles)
                            .map_err(|e| BuildError::Automaton(e.to_string()))?,
                        index,
                    ),
                };
                Strategy::NameFirst(needles)
            }
            adapter_names => {
                let adapters = match adapter_names {
                    None => Adapters::Any,
                    Some(names) => {
                        let names = check_names("adapter_names", names)?;
                        let mut map = HashMap::with_capacity_and_hasher(
                            names.len(),
                            BuildHasherDefault::default(),
                        );
                        for (position, name) in names.into_iter().enumerate() {
                            map.entry(name).or_insert(position);
                        }
                        Adapters::Named(map)
                    }
                };
                Strategy::PrefixFirst(adapters)
            }
        };
        let ignore = if ignore.is_empty() {
            None
        } else {
            Some(RegexSet::new(ignore).map_err(|error| {
                // Name the culprit: compile one by one, on this error path only.
                let culprit = ignore
                    .iter()
                    .find_map(|pattern| regex::Regex::new(pattern).err().map(|e| (pattern, e)));
                match culprit {
                    Some((pattern, e)) => BuildError::BadIgnore {
                        pattern: (*pattern).to_owned(),
                        reason: e.to_string(),
                    },
                    None => BuildError::BadIgnore {
                        pattern: ignore.join(" | "),
                        reason: error.to_string(),
                    },
                }
            })?)
        };
        Ok(Matcher {
            segment,
            strategy,
            shared,
            root_dot,
            ignore,
        })
    }

    /// Classifies one key. `text` is the key as a Unicode string for the ignore expressions;
    /// it is only asked for when the key matched and ignore expressions exist.
    pub fn classify<'k, F>(&self, key: &'k [u8], text: F) -> Verdict<'k>
    where
        F: FnOnce() -> Option<std::borrow::Cow<'k, str>>,
    {
        let Some(hit) = self.find(key) else {
            return Verdict::Miss;
        };
        if let Some(set) = &self.ignore {
            if text().is_some_and(|text| set.is_match(&text)) {
                return Verdict::Miss;
            }
        }
        match hit.index {
            Some(index) => Verdict::Named(index),
            None => Verdict::Any(&key[hit.adapter.clone()]),
        }
    }

    /// The last match in a key (the rightmost: adapter tensors end their keys): where its
    /// qualifying segment and the adapter name after it lie. Ignore expressions are not consulted.
    pub fn find(&self, key: &[u8]) -> Option<Hit> {
        match &self.strategy {
            Strategy::NameFirst(needles) => self.name_first(key, needles),
            Strategy::PrefixFirst(adapters) => self.prefix_first(key, adapters),
        }
    }

    fn name_first(&self, key: &[u8], needles: &Needles) -> Option<Hit> {
        match needles {
            Needles::One(finder, index) => {
                let width = finder.needle().len();
                // Most keys hold no `.name` at all: one SIMD search and out.
                let mut dot = finder.find(key)?;
                let mut last = None;
                loop {
                    if let Some(hit) = self.name_hit(key, dot, dot + width, *index) {
                        last = Some(hit);
                    }
                    match finder.find(&key[dot + width..]) {
                        Some(next) => dot += width + next,
                        None => return last,
                    }
                }
            }
            Needles::Many(names, index) => {
                let mut hits = names.find_iter(key).filter_map(|found| {
                    self.name_hit(
                        key,
                        found.start(),
                        found.end(),
                        index[found.pattern().as_usize()],
                    )
                });
                let first = hits.next()?;
                Some(hits.last().unwrap_or(first))
            }
        }
    }

    /// `.name` found at `dot..end`: a hit when it is a whole segment after a qualifying one.
    fn name_hit(&self, key: &[u8], dot: usize, end: usize, index: usize) -> Option<Hit> {
        if end != key.len() && key[end] != b'.' {
            return None; // `.default` inside `.default_10`
        }
        let start = memchr::memrchr(b'.', &key[..dot]).map_or(0, |p| p + 1);
        (self.segment_qualifies(key, start, dot) && !self.is_layer_copy(key, start, dot)).then_some(
            Hit {
                segment: start..dot,
                adapter: dot + 1..end,
                index: Some(index),
            },
        )
    }

    fn prefix_first(&self, key: &[u8], adapters: &Adapters) -> Option<Hit> {
        // From the right: adapter tensors sit at the end of their keys, so the walk usually stops
        // after two or three segments (a left-to-right walk measured 101 ns per key on the group
        // benchmark). Only segments followed by a dot can be followed by an adapter name.
        let mut dots = memchr::memrchr_iter(b'.', key).peekable();
        while let Some(dot) = dots.next() {
            let start = dots.peek().map_or(0, |&before| before + 1);
            if self.segment.qualifies(&key[start..dot]) {
                if let Some(hit) = self.adapter_after(key, start, dot, adapters) {
                    return Some(hit);
                }
            }
        }
        None
    }

    /// For a qualifying segment `start..end`: the hit, when the segment after it names an adapter.
    fn adapter_after(
        &self,
        key: &[u8],
        start: usize,
        end: usize,
        adapters: &Adapters,
    ) -> Option<Hit> {
        if end == key.len() || self.is_layer_copy(key, start, end) {
            return None;
        }
        let adapter = end + 1..segment_end(key, end + 1);
        let index = match adapters {
            Adapters::Any => None,
            Adapters::Named(map) => Some(*map.get(&key[adapter.clone()])?),
        };
        Some(Hit {
            segment: start..end,
            adapter,
            index,
        })
    }

    /// Whether the segment `start..end` starts with a prefix or is an exact name.
    pub fn segment_qualifies(&self, key: &[u8], start: usize, end: usize) -> bool {
        self.segment.qualifies(&key[start..end])
    }

    /// A shared segment below the model level (neither the first segment nor right after a
    /// leading root) is a layer's reference to a model-level tensor.
    fn is_layer_copy(&self, key: &[u8], start: usize, end: usize) -> bool {
        if start == 0 || self.shared.is_empty() {
            return false;
        }
        let segment = &key[start..end];
        if !self.shared.iter().any(|name| **name == *segment) {
            return false;
        }
        !(start == self.root_dot.len() && key.starts_with(&self.root_dot))
    }
}

/// Decodes WTF-8 (UTF-8 that may hold encoded lone surrogates, as Python's `surrogatepass`
/// writes them) for the ignore expressions: each surrogate becomes one U+FFFD, so that `.` and
/// negated classes see one character where Python's `re` sees one.
pub fn wtf8_lossy(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                text.push_str(valid);
                return text;
            }
            Err(error) => {
                let (valid, after) = rest.split_at(error.valid_up_to());
                // `valid` is valid UTF-8 by construction of `valid_up_to`.
                text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                text.push(char::REPLACEMENT_CHARACTER);
                let skip = if after.first() == Some(&0xED) && after.len() >= 3 {
                    3
                } else {
                    error.error_len().unwrap_or(after.len()).max(1)
                };
                rest = &after[skip.min(after.len())..];
            }
        }
    }
}

#[cfg(test)]
mod tests;
