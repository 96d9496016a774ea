//! The host-pattern matcher: every rule's names compiled into one hash table keyed by domain.
//!
//! A lookup costs one hash probe per label of the queried name (the name itself, then each
//! parent suffix), whatever the number of rules or names. Names live in one string arena and
//! the table stores `(offset, length, rule-set)` slots, so a million names cost tens of bytes
//! each rather than a `String` apiece. Rule sets are interned: a million names listed by one
//! rule share a single set.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use hashbrown::hash_map::HashMap;

use super::RuleId;
use super::name::{Name, Pattern};

/// How a stored domain matches a queried name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `example.org`: the name itself only.
    Exact,
    /// `.example.org`: the name and every name below it.
    ApexAndBelow,
    /// `*.example.org`: every name strictly below it.
    Below,
}

/// How specific a match is; larger is more specific. Exact beats any wildcard; among wildcards
/// the longer matched suffix wins (`.example.org` matching `example.org` itself counts as a
/// suffix of the whole name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    exact: bool,
    suffix_len: u16,
}

#[derive(Clone, Copy)]
struct Slot {
    offset: u32,
    len: u8,
    set: u32,
}

type RuleSet = Box<[(RuleId, Kind)]>;

/// The compiled matcher. Immutable once built; shared by every request through the policy.
pub struct NameMatcher {
    arena: String,
    table: HashTable<Slot>,
    sets: Vec<RuleSet>,
    /// Rules with the `*` pattern (every name), in declaration order.
    any: Vec<RuleId>,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for NameMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NameMatcher")
            .field("domains", &self.table.len())
            .field("rule_sets", &self.sets.len())
            .field("any", &self.any)
            .finish()
    }
}

/// Something worth telling the operator about an insertion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// The same pattern was already listed by the same rule.
    Repeat,
    /// The same domain is already listed by another rule (the first such rule).
    SharedWith(RuleId),
}

/// Builds a [`NameMatcher`]; names are added one at a time so a million-line hosts file never
/// has to be held as a list of strings.
pub struct NameMatcherBuilder {
    matcher: NameMatcher,
    set_ids: HashMap<RuleSet, u32>,
}

impl Default for NameMatcherBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl NameMatcherBuilder {
    pub fn new() -> Self {
        Self {
            matcher: NameMatcher {
                arena: String::new(),
                table: HashTable::new(),
                sets: Vec::new(),
                any: Vec::new(),
                hasher: foldhash::fast::RandomState::default(),
            },
            set_ids: HashMap::new(),
        }
    }

    /// Adds `pattern` for `rule`. Rules must be added in declaration order (ascending ids) for
    /// tie-breaking to follow declaration order; sets are kept sorted regardless.
    pub fn insert(&mut self, pattern: &Pattern, rule: RuleId) -> Inserted {
        let (domain, kind) = match pattern {
            Pattern::Any => {
                let m = &mut self.matcher;
                if m.any.contains(&rule) {
                    return Inserted::Repeat;
                }
                let other = m.any.first().copied();
                m.any.push(rule);
                m.any.sort_unstable();
                return other.map_or(Inserted::New, Inserted::SharedWith);
            }
            Pattern::Exact(n) => (n, Kind::Exact),
            Pattern::ApexAndBelow(n) => (n, Kind::ApexAndBelow),
            Pattern::Below(n) => (n, Kind::Below),
        };
        let domain = domain.as_str();
        let hash = self.matcher.hasher.hash_one(domain);
        let m = &mut self.matcher;
        let arena = &m.arena;
        let found = m.table.find_mut(hash, |s| slot_str(arena, s) == domain);
        let Some(slot) = found else {
            let set = intern(&mut self.set_ids, &mut m.sets, vec![(rule, kind)]);
            let offset = u32::try_from(m.arena.len()).expect("name arena exceeds 4 GiB");
            // Names are at most 253 octets (validated by the normaliser).
            let len = u8::try_from(domain.len()).expect("validated name longer than 255");
            m.arena.push_str(domain);
            let hasher = &m.hasher;
            let arena = &m.arena;
            m.table.insert_unique(hash, Slot { offset, len, set }, |s| hasher.hash_one(slot_str(arena, s)));
            return Inserted::New;
        };
        let current = &m.sets[slot.set as usize];
        if current.contains(&(rule, kind)) {
            return Inserted::Repeat;
        }
        let other = current.iter().map(|&(r, _)| r).find(|&r| r != rule);
        let mut merged = current.to_vec();
        merged.push((rule, kind));
        slot.set = intern(&mut self.set_ids, &mut m.sets, merged);
        other.map_or(Inserted::New, Inserted::SharedWith)
    }

    pub fn build(mut self) -> NameMatcher {
        self.matcher.arena.shrink_to_fit();
        self.matcher.sets.shrink_to_fit();
        let hasher = &self.matcher.hasher;
        let arena = &self.matcher.arena;
        self.matcher.table.shrink_to_fit(|s| hasher.hash_one(slot_str(arena, s)));
        self.matcher
    }
}

fn intern(ids: &mut HashMap<RuleSet, u32>, sets: &mut Vec<RuleSet>, mut set: Vec<(RuleId, Kind)>) -> u32 {
    set.sort_unstable();
    set.dedup();
    let set = set.into_boxed_slice();
    if let Some(&id) = ids.get(&set) {
        return id;
    }
    let id = u32::try_from(sets.len()).expect("more than 2^32 rule sets");
    sets.push(set.clone());
    ids.insert(set, id);
    id
}

fn slot_str<'a>(arena: &'a str, slot: &Slot) -> &'a str {
    let start = slot.offset as usize;
    &arena[start..start + slot.len as usize]
}

impl NameMatcher {
    /// Number of distinct domains stored, plus one if any rule has `*`.
    pub fn len(&self) -> usize {
        self.table.len() + usize::from(!self.any.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate heap bytes held (for `check` and benchmarks).
    pub fn heap_bytes(&self) -> usize {
        self.arena.capacity()
            + self.table.capacity() * (std::mem::size_of::<Slot>() + 1)
            + self.sets.iter().map(|s| s.len() * std::mem::size_of::<(RuleId, Kind)>()).sum::<usize>()
    }

    fn get(&self, domain: &str) -> Option<&[(RuleId, Kind)]> {
        let hash = self.hasher.hash_one(domain);
        self.table.find(hash, |s| slot_str(&self.arena, s) == domain).map(|s| &*self.sets[s.set as usize])
    }

    /// Calls `f` for every rule whose pattern matches `name`, most specific first; within one
    /// specificity, in declaration order. `f` may stop the walk by returning `false`.
    pub fn visit(&self, name: &str, mut f: impl FnMut(RuleId, Kind, Specificity) -> bool) {
        let full = u16::try_from(name.len()).unwrap_or(u16::MAX);
        if let Some(set) = self.get(name) {
            let exact = Specificity { exact: true, suffix_len: full };
            for &(rule, kind) in set.iter().filter(|(_, k)| *k == Kind::Exact) {
                if !f(rule, kind, exact) {
                    return;
                }
            }
            let apex = Specificity { exact: false, suffix_len: full };
            for &(rule, kind) in set.iter().filter(|(_, k)| *k == Kind::ApexAndBelow) {
                if !f(rule, kind, apex) {
                    return;
                }
            }
        }
        let mut rest = name;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            let Some(set) = self.get(rest) else { continue };
            let spec = Specificity { exact: false, suffix_len: u16::try_from(rest.len()).unwrap_or(u16::MAX) };
            for &(rule, kind) in set.iter().filter(|(_, k)| *k != Kind::Exact) {
                if !f(rule, kind, spec) {
                    return;
                }
            }
        }
        let any = Specificity { exact: false, suffix_len: 0 };
        for &rule in &self.any {
            if !f(rule, Kind::Below, any) {
                return;
            }
        }
    }

    /// Rules whose patterns cover every name `pattern` covers (for the shadowing lint).
    pub fn covering(&self, pattern: &Pattern, mut f: impl FnMut(RuleId)) {
        match pattern {
            Pattern::Any => self.any.iter().for_each(|&r| f(r)),
            Pattern::Exact(n) => self.visit(n.as_str(), |r, _, _| {
                f(r);
                true
            }),
            Pattern::ApexAndBelow(n) => self.visit(n.as_str(), |r, k, _| {
                if k != Kind::Exact {
                    f(r);
                }
                true
            }),
            Pattern::Below(n) => {
                if let Some(set) = self.get(n.as_str()) {
                    set.iter().filter(|(_, k)| *k == Kind::Below).for_each(|&(r, _)| f(r));
                }
                self.visit(n.as_str(), |r, k, _| {
                    if k != Kind::Exact {
                        f(r);
                    }
                    true
                });
            }
        }
    }

    /// Every stored pattern with the rules that list it (for lints and tests).
    pub fn for_each_pattern(&self, mut f: impl FnMut(&str, RuleId, Kind)) {
        for &rule in &self.any {
            f("*", rule, Kind::Below);
        }
        for slot in self.table.iter() {
            let domain = slot_str(&self.arena, slot);
            for &(rule, kind) in self.sets[slot.set as usize].iter() {
                f(domain, rule, kind);
            }
        }
    }
}

/// Rebuilds the pattern a stored `(domain, kind)` came from.
pub fn pattern_of(domain: &str, kind: Kind) -> Result<Pattern, super::name::NameError> {
    if domain == "*" {
        return Ok(Pattern::Any);
    }
    let name = super::name::normalize_name(domain)?;
    Ok(match kind {
        Kind::Exact => Pattern::Exact(name),
        Kind::ApexAndBelow => Pattern::ApexAndBelow(name),
        Kind::Below => Pattern::Below(name),
    })
}

/// Convenience for tests and callers holding a [`Name`].
impl NameMatcher {
    pub fn visit_name(&self, name: &Name, f: impl FnMut(RuleId, Kind, Specificity) -> bool) {
        self.visit(name.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::name::parse_pattern;

    fn build(rules: &[(&str, RuleId)]) -> NameMatcher {
        let mut b = NameMatcherBuilder::new();
        for (p, r) in rules {
            b.insert(&parse_pattern(p).unwrap(), *r);
        }
        b.build()
    }

    fn matches(m: &NameMatcher, name: &str) -> Vec<RuleId> {
        let mut out = Vec::new();
        m.visit(name, |r, _, _| {
            out.push(r);
            true
        });
        out
    }

    #[test]
    fn exact_matches_only_itself() {
        let m = build(&[("example.org", 0)]);
        assert_eq!(matches(&m, "example.org"), vec![0]);
        assert!(matches(&m, "www.example.org").is_empty());
        assert!(matches(&m, "badexample.org").is_empty());
    }

    #[test]
    fn wildcard_matches_below_not_apex() {
        let m = build(&[("*.example.org", 0)]);
        assert!(matches(&m, "example.org").is_empty());
        assert_eq!(matches(&m, "a.example.org"), vec![0]);
        assert_eq!(matches(&m, "a.b.c.example.org"), vec![0]);
        assert!(matches(&m, "badexample.org").is_empty());
        assert!(matches(&m, "example.org.evil.net").is_empty());
    }

    #[test]
    fn dot_form_matches_apex_and_below() {
        let m = build(&[(".example.org", 0)]);
        assert_eq!(matches(&m, "example.org"), vec![0]);
        assert_eq!(matches(&m, "x.example.org"), vec![0]);
        assert!(matches(&m, "xexample.org").is_empty());
    }

    #[test]
    fn most_specific_first_then_declaration_order() {
        let m = build(&[("*.org", 0), ("*.example.org", 1), ("api.example.org", 2), ("*", 3), (".example.org", 4)]);
        assert_eq!(matches(&m, "api.example.org"), vec![2, 1, 4, 0, 3]);
        assert_eq!(matches(&m, "example.org"), vec![4, 0, 3]);
    }

    #[test]
    fn shared_domain_reported() {
        let mut b = NameMatcherBuilder::new();
        let p = parse_pattern("example.org").unwrap();
        assert_eq!(b.insert(&p, 0), Inserted::New);
        assert_eq!(b.insert(&p, 0), Inserted::Repeat);
        assert_eq!(b.insert(&p, 1), Inserted::SharedWith(0));
        let m = b.build();
        assert_eq!(matches(&m, "example.org"), vec![0, 1]);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn covering_follows_pattern_semantics() {
        let m = build(&[("*.example.org", 0), ("example.org", 1), (".corp.net", 2)]);
        let cov = |p: &str| {
            let mut v = Vec::new();
            m.covering(&parse_pattern(p).unwrap(), |r| v.push(r));
            v.sort_unstable();
            v.dedup();
            v
        };
        assert_eq!(cov("a.example.org"), vec![0]);
        assert_eq!(cov("*.example.org"), vec![0]);
        assert_eq!(cov(".example.org"), Vec::<RuleId>::new(), "apex is only covered exactly");
        assert_eq!(cov("*.a.example.org"), vec![0]);
        assert_eq!(cov(".corp.net"), vec![2]);
        assert_eq!(cov("*.x.corp.net"), vec![2]);
    }
}
