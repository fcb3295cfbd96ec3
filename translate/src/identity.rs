//! Numeric identities for this cluster's security label sets.
//!
//! [`IdentityAllocator`] hands out identities inside the cluster's [`IdentityRange`] and keeps
//! them stable, because peers' ipcaches and policies refer to them by number: an identity that
//! changed number on a restart would make every peer drop and re-learn it.
//!
//! # What stays stable, exactly
//!
//! 1. **While in use.** A label set the allocator holds keeps its identity for as long as
//!    [`IdentityAllocator::allocate`] keeps being asked for it (every translation of a
//!    snapshot in which some pod has the label set).
//! 2. **Across restarts with the store.** [`IdentityAllocator::seed`] (or
//!    [`seed_from_store`](IdentityAllocator::seed_from_store)) loads the identities already
//!    published; every label set found there keeps the identity it had, after the conflicts
//!    described there are resolved.
//! 3. **Across restarts without the store, when nothing collides.** A label set the allocator
//!    does not hold gets its *home* identity, `first + fnv1a64(labels) % len` (the labels in
//!    canonical order, joined by newlines), or, when that is taken, the next free identity
//!    counting upwards and wrapping around at the end of the range. So when no two label sets
//!    in use share a home, every label set gets its home, whatever the order or history, and
//!    two allocators (or one before and after a restart with an empty store) agree. When
//!    homes collide, the identity also depends on which ones were taken at the time; the
//!    translation allocates new label sets in sorted order, so the same seed and the same
//!    pods still give the same identities.
//!
//! Identities are released once no pod uses them ([`IdentityAllocator::release_unused`]), so
//! the publisher deletes their keys. A released identity may later be given to another label
//! set; the translation avoids reusing one in the same pass that released it unless the range
//! is otherwise full.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use model::keys::Kind;
use model::{ClusterConfig, Entry, Identity, IdentityError, IdentityRange, Label, NumericIdentity};
use model::{StoreValue, validate_entry};

use crate::Warning;

/// The security labels an identity stands for, in canonical order.
pub type LabelSet = BTreeSet<Label>;

/// No free identity is left in the cluster's range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every identity of the range is held by a label set in use.
    #[error("identity range {range} is exhausted ({used} identities in use)")]
    Exhausted {
        /// The cluster's range.
        range: IdentityRange,
        /// How many identities are held.
        used: usize,
    },
}

/// Allocates this cluster's identities; see the [module docs](self) for what stays stable.
#[derive(Clone, Debug)]
pub struct IdentityAllocator {
    config: ClusterConfig,
    range: IdentityRange,
    /// How many identities from the start of the range may be used; the range's length,
    /// smaller only in tests that need to fill it.
    slots: u32,
    by_labels: BTreeMap<LabelSet, NumericIdentity>,
    by_id: BTreeMap<NumericIdentity, LabelSet>,
}

impl IdentityAllocator {
    /// An empty allocator for the cluster `config` describes; fails when its id does not fit
    /// its max-connected-clusters, since it then has no range.
    pub fn new(config: &ClusterConfig) -> Result<Self, IdentityError> {
        let range = config.identity_range()?;
        Ok(IdentityAllocator {
            config: config.clone(),
            range,
            slots: range.len(),
            by_labels: BTreeMap::new(),
            by_id: BTreeMap::new(),
        })
    }

    /// An allocator that uses only the first `slots` identities of the range, so tests can
    /// exhaust it.
    #[cfg(test)]
    pub(crate) fn with_slots(config: &ClusterConfig, slots: u32) -> Self {
        let mut allocator = IdentityAllocator::new(config).expect("valid test config");
        allocator.slots = slots.clamp(1, allocator.range.len());
        allocator
    }

    /// The identities this allocator hands out.
    pub fn range(&self) -> IdentityRange {
        self.range
    }

    /// How many identities are held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no identity is held.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The identity held for `labels`, if any.
    pub fn get(&self, labels: &LabelSet) -> Option<NumericIdentity> {
        self.by_labels.get(labels).copied()
    }

    /// The labels `id` stands for, if it is held.
    pub fn labels(&self, id: NumericIdentity) -> Option<&LabelSet> {
        self.by_id.get(&id)
    }

    /// Every held identity with its labels, in identity order.
    pub fn iter(&self) -> impl Iterator<Item = (NumericIdentity, &LabelSet)> {
        self.by_id.iter().map(|(id, labels)| (*id, labels))
    }

    /// Where probing for `labels` starts: the identity it gets when nothing collides.
    pub fn home(&self, labels: &LabelSet) -> NumericIdentity {
        let offset = fnv1a64(canonical_text(labels).as_bytes()) % u64::from(self.slots);
        // `offset` < `slots` ≤ the range's length, so the sum stays inside the range.
        self.id_at(u32::try_from(offset).expect("below a u32 slot count"))
    }

    /// The identity of `labels`: the one held, or a new one (see the [module docs](self)).
    pub fn allocate(&mut self, labels: &LabelSet) -> Result<NumericIdentity, AllocError> {
        if let Some(id) = self.get(labels) {
            return Ok(id);
        }
        let home = self.home(labels).get() - self.range.first().get();
        let free = (0..self.slots)
            .map(|step| self.id_at((home + step) % self.slots))
            .find(|id| !self.by_id.contains_key(id))
            .ok_or(AllocError::Exhausted {
                range: self.range,
                used: self.by_id.len(),
            })?;
        self.insert(free, labels.clone());
        Ok(free)
    }

    /// Releases every identity whose labels are not in `in_use`; returns what was released,
    /// in identity order.
    pub fn release_unused(
        &mut self,
        in_use: &BTreeSet<&LabelSet>,
    ) -> Vec<(NumericIdentity, LabelSet)> {
        let mut released = Vec::new();
        self.by_id.retain(|id, labels| {
            let keep = in_use.contains(labels);
            if !keep {
                released.push((*id, labels.clone()));
            }
            keep
        });
        for (_, labels) in &released {
            self.by_labels.remove(labels);
        }
        released
    }

    /// Loads identities already published (read back from the store at startup), so that
    /// their label sets keep their numbers. Call it before the first translation.
    ///
    /// Identities this cluster may not publish are skipped with a warning: invalid ones, ones
    /// whose cluster label names another cluster, ones outside the range. Conflicts are
    /// resolved the same way whatever the input order, each with a warning: an identity
    /// claimed for several label sets keeps the smallest label set (in label order); a label
    /// set claimed by several identities keeps the lowest identity; an identity or label set
    /// the allocator already holds keeps what it holds.
    pub fn seed(&mut self, existing: impl IntoIterator<Item = Identity>) -> Vec<Warning> {
        let mut warnings = Vec::new();
        let mut candidates = BTreeSet::new();
        for identity in existing {
            let object = identity_object(identity.id);
            match self.check_seed(&identity) {
                Ok(()) => {
                    candidates.insert((identity.id, identity.labels.into_iter().collect()));
                }
                Err(message) => warnings.push(Warning::new(object, message)),
            }
        }
        self.seed_checked(candidates, &mut warnings);
        warnings
    }

    /// [`seed`](Self::seed) from raw store entries (`cilium/state/identities/v1/id/<id>` and
    /// their bytes), checked as a peer would check them, so a corrupt or foreign entry is
    /// reported instead of silently dropped.
    pub fn seed_from_store<K: AsRef<str>, V: AsRef<[u8]>>(
        &mut self,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Vec<Warning> {
        let mut warnings = Vec::new();
        let mut identities = Vec::new();
        for (key, value) in entries {
            let key = key.as_ref();
            match validate_entry(Kind::Identities, key, value.as_ref(), &self.config) {
                Ok(Entry::Identity(identity)) => identities.push(identity),
                Ok(_) => unreachable!("validate_entry decodes identities as identities"),
                Err(error) => warnings.push(Warning::new(
                    key,
                    format!("stored identity ignored: {error}"),
                )),
            }
        }
        warnings.extend(self.seed(identities));
        warnings
    }

    fn check_seed(&self, identity: &Identity) -> Result<(), String> {
        identity
            .validate()
            .map_err(|e| format!("stored identity ignored: {e}"))?;
        let cluster = identity
            .cluster()
            .map_err(|e| format!("stored identity ignored: {e}"))?;
        if cluster != self.config.name {
            return Err(format!(
                "stored identity ignored: it belongs to cluster {cluster}, not {}",
                self.config.name
            ));
        }
        if !self.usable(identity.id) {
            return Err(format!(
                "stored identity ignored: it lies outside this cluster's range {}",
                self.range
            ));
        }
        Ok(())
    }

    /// Applies sorted, valid candidates; see [`seed`](Self::seed) for the rules.
    fn seed_checked(
        &mut self,
        candidates: BTreeSet<(NumericIdentity, LabelSet)>,
        warnings: &mut Vec<Warning>,
    ) {
        // One identity, several label sets: the first (smallest) label set wins.
        let mut by_id: BTreeMap<NumericIdentity, LabelSet> = BTreeMap::new();
        for (id, labels) in candidates {
            match by_id.get(&id) {
                Some(kept) => warnings.push(Warning::new(
                    identity_object(id),
                    format!(
                        "stored identity is claimed by two label sets, [{}] and [{}]; \
                         keeping the first",
                        canonical_list(kept),
                        canonical_list(&labels)
                    ),
                )),
                None => {
                    by_id.insert(id, labels);
                }
            }
        }
        // One label set, several identities: the lowest identity wins (ids iterate in order).
        let mut by_labels: BTreeMap<LabelSet, NumericIdentity> = BTreeMap::new();
        for (id, labels) in by_id {
            if let Some(kept) = by_labels.get(&labels) {
                warnings.push(Warning::new(
                    identity_object(id),
                    format!(
                        "stored identity duplicates identity {kept} (labels [{}]); keeping {kept}",
                        canonical_list(&labels)
                    ),
                ));
                continue;
            }
            by_labels.insert(labels, id);
        }
        let mut ordered: Vec<(NumericIdentity, LabelSet)> = by_labels
            .into_iter()
            .map(|(labels, id)| (id, labels))
            .collect();
        ordered.sort();
        for (id, labels) in ordered {
            if let Some(held) = self.by_id.get(&id) {
                if *held != labels {
                    warnings.push(Warning::new(
                        identity_object(id),
                        format!(
                            "stored identity conflicts with the held identity for [{}]; \
                             keeping the held one",
                            canonical_list(held)
                        ),
                    ));
                }
                continue;
            }
            if let Some(held) = self.by_labels.get(&labels) {
                warnings.push(Warning::new(
                    identity_object(id),
                    format!("stored identity duplicates the held identity {held}; keeping {held}"),
                ));
                continue;
            }
            self.insert(id, labels);
        }
    }

    fn insert(&mut self, id: NumericIdentity, labels: LabelSet) {
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(id, labels);
    }

    /// The identity `offset` places from the start of the range; `offset` < `slots`.
    fn id_at(&self, offset: u32) -> NumericIdentity {
        NumericIdentity::new(self.range.first().get() + offset).expect("inside the range")
    }

    fn usable(&self, id: NumericIdentity) -> bool {
        self.range.contains(id) && id.get() - self.range.first().get() < self.slots
    }
}

/// How warnings name an identity.
pub fn identity_object(id: NumericIdentity) -> String {
    format!("Identity {id}")
}

/// The labels as hashed: canonical order, one per line (labels hold no control characters,
/// so the text is unambiguous).
fn canonical_text(labels: &LabelSet) -> String {
    let mut text = String::new();
    for (i, label) in labels.iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        let _ = write!(text, "{label}");
    }
    text
}

fn canonical_list(labels: &LabelSet) -> String {
    canonical_text(labels).replace('\n', ", ")
}

/// FNV-1a, 64 bits: fixed by its specification, so homes never change between builds or
/// platforms (std's hashers promise no such thing).
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{Capabilities, ClusterId, ClusterName, MaxConnectedClusters};
    use proptest::prelude::*;

    pub(crate) fn config(name: &str, id: u16, max: MaxConnectedClusters) -> ClusterConfig {
        ClusterConfig::new(
            ClusterName::new(name).unwrap(),
            ClusterId::try_from(id).unwrap(),
            max,
            Capabilities::default(),
        )
        .unwrap()
    }

    fn set(cluster: &str, labels: &[&str]) -> LabelSet {
        let mut set: LabelSet = labels.iter().map(|l| l.parse().unwrap()).collect();
        set.insert(Label::cluster(&ClusterName::new(cluster).unwrap()));
        set
    }

    fn identity(id: u32, labels: &LabelSet) -> Identity {
        Identity::new(NumericIdentity::new(id).unwrap(), labels.iter().cloned())
    }

    #[test]
    fn fnv_known_values() {
        // Published test vectors of FNV-1a 64.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Homes are part of the stability promise: changing them moves every identity of a
    /// cluster restarted without its store, so they are pinned here.
    #[test]
    fn homes_are_pinned() {
        let a = IdentityAllocator::new(&config("eu-1", 2, MaxConnectedClusters::Max255)).unwrap();
        let labels = set(
            "eu-1",
            &["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"],
        );
        let text = canonical_text(&labels);
        assert_eq!(
            text,
            "k8s:app=web\nk8s:io.cilium.k8s.policy.cluster=eu-1\nk8s:io.kubernetes.pod.namespace=shop"
        );
        let expected = a.range().first().get() + (fnv1a64(text.as_bytes()) % 65280) as u32;
        assert_eq!(a.home(&labels).get(), expected);
        assert_eq!(a.home(&labels).get(), 131328 + 3688);
    }

    #[test]
    fn allocate_probe_release() {
        let cfg = config("a", 1, MaxConnectedClusters::Max255);
        let mut a = IdentityAllocator::with_slots(&cfg, 3);
        let sets: Vec<LabelSet> = (0..4).map(|i| set("a", &[&format!("k8s:n={i}")])).collect();
        let ids: Vec<NumericIdentity> = sets[..3].iter().map(|s| a.allocate(s).unwrap()).collect();
        assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 3);
        assert_eq!(
            a.allocate(&sets[0]).unwrap(),
            ids[0],
            "held ids are returned again"
        );
        let err = a.allocate(&sets[3]).unwrap_err();
        assert!(
            err.to_string().contains("exhausted (3 identities in use)"),
            "{err}"
        );
        let released = a.release_unused(&sets[1..3].iter().collect());
        assert_eq!(released, vec![(ids[0], sets[0].clone())]);
        assert_eq!(a.allocate(&sets[3]).unwrap(), ids[0], "the only free id");
        assert_eq!(a.len(), 3);
        assert_eq!(a.labels(ids[0]), Some(&sets[3]));
    }

    #[test]
    fn seed_keeps_stored_ids() {
        let cfg = config("a", 1, MaxConnectedClusters::Max255);
        let mut a = IdentityAllocator::new(&cfg).unwrap();
        let web = set("a", &["k8s:app=web"]);
        let first = a.range().first().get();
        let warnings = a.seed([identity(first + 7, &web)]);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(a.allocate(&web).unwrap().get(), first + 7);
    }

    #[test]
    fn seed_refusals_and_conflicts() {
        let cfg = config("a", 1, MaxConnectedClusters::Max255);
        let first = IdentityRange::for_cluster(cfg.id, cfg.max_connected_clusters)
            .unwrap()
            .first()
            .get();
        let web = set("a", &["k8s:app=web"]);
        let db = set("a", &["k8s:app=db"]);
        let other = set("b", &["k8s:app=web"]);
        let input = vec![
            // web under two ids, and id first+5 claimed by web and db.
            identity(first + 9, &web),
            identity(first + 5, &web),
            identity(first + 5, &db),
            // Another cluster's label; outside the range.
            identity(first + 20, &other),
            identity(first - 1, &web),
        ];
        let run = |input: Vec<Identity>| {
            let mut a = IdentityAllocator::new(&cfg).unwrap();
            let warnings = a.seed(input);
            (
                a.iter().map(|(id, l)| (id, l.clone())).collect::<Vec<_>>(),
                warnings,
            )
        };
        let (held, warnings) = run(input.clone());
        // db sorts before web, so id first+5 keeps db; web then keeps its other id, first+9.
        assert_eq!(
            held,
            vec![
                (NumericIdentity::new(first + 5).unwrap(), db.clone()),
                (NumericIdentity::new(first + 9).unwrap(), web.clone()),
            ]
        );
        let text: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 3, "{text:#?}");
        assert!(
            text.iter().any(|w| w.contains("belongs to cluster b")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|w| w.contains("outside this cluster's range")),
            "{text:#?}"
        );
        assert!(
            text.iter().any(|w| w.contains("claimed by two label sets")),
            "{text:#?}"
        );
        // The same outcome whatever the order.
        let mut reversed = input;
        reversed.reverse();
        assert_eq!(run(reversed).0, held);

        // One label set under two ids: the lowest id is kept.
        let mut a = IdentityAllocator::new(&cfg).unwrap();
        let warnings = a.seed([identity(first + 30, &web), identity(first + 3, &web)]);
        assert_eq!(a.get(&web).unwrap().get(), first + 3);
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].object, format!("Identity {}", first + 30));
        assert!(
            warnings[0].message.contains("duplicates identity"),
            "{warnings:?}"
        );

        // Held entries win over a late seed.
        let warnings = a.seed([identity(first + 3, &db), identity(first + 4, &web)]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn seed_from_store_checks_entries() {
        let cfg = config("a", 1, MaxConnectedClusters::Max255);
        let first = cfg.identity_range().unwrap().first().get();
        let good = identity(first, &set("a", &["k8s:app=web"]));
        let entries = vec![
            (good.key().to_string(), good.encode()),
            (
                format!("cilium/state/identities/v1/id/{}", first + 1),
                b"{not json".to_vec(),
            ),
            (
                format!("cilium/state/identities/v1/id/{}", first + 2),
                good.encode(),
            ),
        ];
        let mut a = IdentityAllocator::new(&cfg).unwrap();
        let warnings = a.seed_from_store(entries);
        assert_eq!(a.len(), 1);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings
                .iter()
                .all(|w| w.object.starts_with("cilium/state/identities/v1/id/"))
        );
    }

    fn label_sets() -> impl Strategy<Value = Vec<LabelSet>> {
        prop::collection::btree_set(prop::collection::btree_set("[a-c]{1,2}=[x-z]", 0..3), 1..12)
            .prop_map(|sets| {
                sets.into_iter()
                    .map(|labels| {
                        let labels: Vec<String> =
                            labels.into_iter().map(|l| format!("k8s:{l}")).collect();
                        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                        set("a", &refs)
                    })
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            })
    }

    fn max() -> impl Strategy<Value = MaxConnectedClusters> {
        prop_oneof![
            Just(MaxConnectedClusters::Max255),
            Just(MaxConnectedClusters::Max511)
        ]
    }

    proptest! {
        /// Without collisions, the order of allocation does not matter: every set gets its home.
        #[test]
        fn order_independent_without_collisions(
            sets in label_sets(),
            seed in any::<u64>(),
            max in max(),
        ) {
            let cfg = config("a", 7, max);
            let mut one = IdentityAllocator::new(&cfg).unwrap();
            let homes: BTreeSet<_> = sets.iter().map(|s| one.home(s)).collect();
            prop_assume!(homes.len() == sets.len());
            let mut shuffled = sets.clone();
            // A deterministic shuffle from the seed.
            shuffled.sort_by_key(|s| fnv1a64(format!("{seed}{}", canonical_text(s)).as_bytes()));
            let mut two = IdentityAllocator::new(&cfg).unwrap();
            for s in &sets {
                one.allocate(s).unwrap();
            }
            for s in &shuffled {
                two.allocate(s).unwrap();
            }
            for s in &sets {
                prop_assert_eq!(one.get(s), Some(one.home(s)));
                prop_assert_eq!(one.get(s), two.get(s));
            }
        }

        /// With a tiny range, collisions happen; ids stay unique and in range, and exhaustion
        /// is reported exactly when the range is full.
        #[test]
        fn crowded_ranges(sets in label_sets(), slots in 1u32..8, max in max()) {
            let cfg = config("a", 3, max);
            let mut a = IdentityAllocator::with_slots(&cfg, slots);
            let mut seen = BTreeSet::new();
            for s in &sets {
                match a.allocate(s) {
                    Ok(id) => {
                        prop_assert!(a.range().contains(id));
                        prop_assert!(id.get() < a.range().first().get() + slots);
                        prop_assert!(seen.insert(id));
                    }
                    Err(AllocError::Exhausted { used, .. }) => prop_assert_eq!(used, slots as usize),
                }
            }
            prop_assert_eq!(a.len(), sets.len().min(slots as usize));
        }

        /// Seeding with what an allocator holds reproduces it exactly.
        #[test]
        fn seed_round_trip(sets in label_sets(), slots in 1u32..40) {
            let cfg = config("a", 1, MaxConnectedClusters::Max255);
            let mut a = IdentityAllocator::with_slots(&cfg, slots);
            for s in &sets {
                let _ = a.allocate(s);
            }
            let stored: Vec<Identity> = a.iter().map(|(id, l)| identity(id.get(), l)).collect();
            let mut b = IdentityAllocator::with_slots(&cfg, slots);
            prop_assert!(b.seed(stored).is_empty());
            prop_assert_eq!(
                a.iter().collect::<Vec<_>>(),
                b.iter().collect::<Vec<_>>()
            );
        }
    }
}
