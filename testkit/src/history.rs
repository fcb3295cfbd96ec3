//! A recorded client history of a key-value store, and checkers that judge it.
//!
//! A robustness test of a replicated store runs traffic while faults happen, then asks whether
//! one correct copy of the store could have produced what the clients saw. Clients record each
//! request with its invocation and return times through a [`Recorder`].
//! [`History::check_linearizable`] looks for an order of the operations that respects real time
//! and the semantics of one register per key (the Wing–Gong search with Lowe's memoisation of
//! visited configurations, as in porcupine), and checks etcd's revisions against real time.
//! [`History::check_watch`] and [`check_watch_resume`] judge what watchers received against the
//! acknowledged writes.
//!
//! Times are nanoseconds since the recorder's epoch: plain numbers keep hand-written histories
//! in tests readable and make "returned before invoked" a comparison of integers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Which client issued an operation.
pub type ClientId = u32;

/// Nanoseconds since the [`Recorder`]'s epoch.
pub type Nanos = u64;

/// How many search steps [`History::check_linearizable`] may spend on one key before it gives
/// up with [`CheckError::Inconclusive`]. A few thousand operations with modest concurrency
/// need far fewer; the bound is there for histories full of unknown outcomes, whose search
/// is exponential.
pub const DEFAULT_STEP_BUDGET: u64 = 2_000_000;

/// A request as an etcd client issues it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// Sets `key` to `value`.
    Put {
        /// The key written.
        key: Vec<u8>,
        /// The value written.
        value: Vec<u8>,
    },
    /// Reads `key`.
    Get {
        /// The key read.
        key: Vec<u8>,
    },
    /// Deletes `key` (a single key, not a range).
    Delete {
        /// The key deleted.
        key: Vec<u8>,
    },
}

impl Op {
    /// `Put { key, value }`.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    /// `Get { key }`.
    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        Op::Get { key: key.into() }
    }

    /// `Delete { key }`.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete { key: key.into() }
    }

    /// The key the operation touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Get { key } | Op::Delete { key } => key,
        }
    }
}

/// What the store answered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OpResult {
    /// The put was applied at `revision`.
    Put {
        /// The response header's revision: the revision the put created.
        revision: i64,
    },
    /// The get saw `value` (`None`: no such key) as of the header's `revision`.
    Get {
        /// The value read, if the key existed.
        value: Option<Vec<u8>>,
        /// The response header's revision.
        revision: i64,
    },
    /// The delete removed `deleted` keys (0 or 1 for one key).
    Delete {
        /// How many keys were deleted.
        deleted: i64,
        /// The response header's revision: the one the delete created when it deleted a key,
        /// the current one when it did not (etcd creates no revision for a no-op delete).
        revision: i64,
    },
}

impl OpResult {
    /// The response header's revision.
    pub fn revision(&self) -> i64 {
        match self {
            OpResult::Put { revision }
            | OpResult::Get { revision, .. }
            | OpResult::Delete { revision, .. } => *revision,
        }
    }
}

/// How an operation ended, as far as the client knows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The store answered.
    Ok(OpResult),
    /// Timeout or lost connection: a write may or may not have taken effect, at any time after
    /// its invocation; a read tells nothing.
    Unknown,
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Operation {
    /// The client that issued it. A client issues one operation at a time.
    pub client: ClientId,
    /// The request.
    pub op: Op,
    /// When the request was sent.
    pub invoked: Nanos,
    /// When the answer arrived, or when the client gave up ([`Outcome::Unknown`]; the checker
    /// then treats the return as never happening).
    pub returned: Nanos,
    /// The answer.
    pub outcome: Outcome,
}

impl Operation {
    /// The revision an acknowledged write created: a put's, or a delete's that deleted a key.
    pub fn write_revision(&self) -> Option<i64> {
        match (&self.op, &self.outcome) {
            (Op::Put { .. }, Outcome::Ok(r)) => Some(r.revision()),
            (Op::Delete { .. }, Outcome::Ok(OpResult::Delete { deleted, revision }))
                if *deleted > 0 =>
            {
                Some(*revision)
            }
            _ => None,
        }
    }

    /// Whether the operation may change the store (a put or a delete, acknowledged or not).
    pub fn is_write(&self) -> bool {
        matches!(self.op, Op::Put { .. } | Op::Delete { .. })
    }

    fn revision(&self) -> Option<i64> {
        match &self.outcome {
            Outcome::Ok(r) => Some(r.revision()),
            Outcome::Unknown => None,
        }
    }

    /// Why the record cannot be checked, if it cannot.
    fn malformed(&self) -> Option<&'static str> {
        if self.returned < self.invoked {
            return Some("it returned before it was invoked");
        }
        match (&self.op, &self.outcome) {
            (_, Outcome::Unknown)
            | (Op::Put { .. }, Outcome::Ok(OpResult::Put { .. }))
            | (Op::Get { .. }, Outcome::Ok(OpResult::Get { .. })) => None,
            (Op::Delete { .. }, Outcome::Ok(OpResult::Delete { deleted, .. })) => (!(0..=1)
                .contains(deleted))
            .then_some("a single-key delete deleted neither 0 nor 1 keys"),
            _ => Some("its result is of another kind than its request"),
        }
    }
}

/// Bytes as a quoted string, lossily, for messages.
fn show(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

fn millis(t: Nanos) -> String {
    if t == Nanos::MAX {
        return "at an unknown time".to_owned();
    }
    format!("{:.3}ms", t as f64 / 1e6)
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Put { key, value } => write!(f, "put {}={}", show(key), show(value)),
            Op::Get { key } => write!(f, "get {}", show(key)),
            Op::Delete { key } => write!(f, "delete {}", show(key)),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Unknown => write!(f, "unknown"),
            Outcome::Ok(OpResult::Put { revision }) => write!(f, "rev {revision}"),
            Outcome::Ok(OpResult::Get { value, revision }) => match value {
                Some(v) => write!(f, "{} @rev {revision}", show(v)),
                None => write!(f, "none @rev {revision}"),
            },
            Outcome::Ok(OpResult::Delete { deleted, revision }) => {
                write!(f, "deleted {deleted} @rev {revision}")
            }
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = match self.outcome {
            Outcome::Unknown => format!("gave up {}", millis(self.returned)),
            Outcome::Ok(_) => millis(self.returned),
        };
        write!(
            f,
            "client {}: {} -> {} [{}, {end}]",
            self.client,
            self.op,
            self.outcome,
            millis(self.invoked)
        )
    }
}

/// Operations one per line, for error messages.
fn list(ops: &[Operation]) -> String {
    if ops.is_empty() {
        return " none".to_owned();
    }
    ops.iter().map(|o| format!("\n    {o}")).collect()
}

/// Why a history is not linearizable, or could not be judged.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// An operation's record makes no sense on its own (a bug of the recording test, not of
    /// the store), so nothing built on it would mean anything.
    #[error("malformed history: {op}: {reason}")]
    Malformed {
        /// The operation.
        op: Box<Operation>,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// Two acknowledged writes got the same revision: one of them was lost or reordered
    /// behind the client's back.
    #[error("revision {revision} returned to two writes:\n    {first}\n    {second}")]
    RevisionReused {
        /// The revision.
        revision: i64,
        /// The write recorded first.
        first: Box<Operation>,
        /// The other.
        second: Box<Operation>,
    },

    /// A write started after another operation had finished, yet its revision is not above
    /// the revision that operation saw: revisions went backwards in real time.
    #[error("revision not increasing in real time: {later}\n  started after\n    {earlier}")]
    RevisionNotIncreasing {
        /// The operation that finished first.
        earlier: Box<Operation>,
        /// The write that started after it.
        later: Box<Operation>,
    },

    /// A read started after an operation had finished, yet its header revision is older than
    /// that operation's: the read was served by a stale copy.
    #[error("stale revision: {later}\n  started after\n    {earlier}")]
    StaleRevision {
        /// The operation that finished first.
        earlier: Box<Operation>,
        /// The read that started after it.
        later: Box<Operation>,
    },

    /// No order of the operations on `key` respects real time and register semantics. The
    /// search got furthest with `linearized` operations placed (the last of them in `last`);
    /// then `stuck` had to take effect and could not, for `reason`, whichever of `pending`
    /// went first.
    #[error(
        "key {key} is not linearizable: after {linearized} operations in a valid order \
         (last:{}), the key holds {state}, and\n    {stuck}\n  cannot take effect: {reason}; \
         operations that could have gone before it:{}",
        list(.last),
        list(.pending)
    )]
    NotLinearizable {
        /// The key, quoted.
        key: String,
        /// The operation that could not be placed.
        stuck: Box<Operation>,
        /// Why not.
        reason: String,
        /// The register's value and revision at that point.
        state: String,
        /// How many operations had been placed.
        linearized: usize,
        /// The last few placed, in order.
        last: Box<[Operation]>,
        /// Operations not yet placed that were invoked before `stuck` returned.
        pending: Box<[Operation]>,
    },

    /// The search for `key` ran out of its step budget. Not a pass: the history may or may
    /// not be linearizable.
    #[error(
        "key {key}: inconclusive, the search spent its budget of {budget} steps over {operations} operations"
    )]
    Inconclusive {
        /// The key, quoted.
        key: String,
        /// The operations on it.
        operations: usize,
        /// The budget.
        budget: u64,
    },
}

/// What a successful check covered, for test output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linearizable {
    /// Keys checked.
    pub keys: usize,
    /// Operations checked (gets with unknown outcome are not: they tell nothing).
    pub operations: usize,
    /// Search steps spent, over all keys.
    pub steps: u64,
}

/// A client history: operations in any order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    ops: Vec<Operation>,
}

impl From<Vec<Operation>> for History {
    fn from(ops: Vec<Operation>) -> Self {
        History { ops }
    }
}

impl FromIterator<Operation> for History {
    fn from_iter<I: IntoIterator<Item = Operation>>(iter: I) -> Self {
        History {
            ops: iter.into_iter().collect(),
        }
    }
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an operation.
    pub fn push(&mut self, op: Operation) {
        self.ops.push(op);
    }

    /// The operations, in the order they were added.
    pub fn operations(&self) -> &[Operation] {
        &self.ops
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The history with every unknown-outcome write under `record`'s prefix settled by what
    /// the watcher received, since unknown writes make the search exponential and a run
    /// with many faults is only checkable this way (etcd's robustness suite does the same):
    /// - a put whose (key, value) the stream delivered happened, at that revision, before the
    ///   first answer that carried that revision or a later one; one the stream did not
    ///   deliver never happened;
    /// - a delete event that no acknowledged delete explains goes to an unknown delete of
    ///   that key (events in revision order to deletes in invocation order, the earliest
    ///   being the least constrained); unknown deletes left over are dropped: whether they
    ///   never ran or found nothing to delete, they changed nothing.
    ///
    /// Sound when every put wrote a value of its own and `record` holds every write under its
    /// prefix up to the run's last revision, which [`History::check_watch`] verifies of it.
    pub fn settle_unknown_writes(&self, record: &WatchRecord) -> History {
        // A settled write took effect before any answer carrying its revision (or a later
        // one) was sent: the earliest such answer bounds its return, which keeps the search
        // from trying it everywhere after its invocation.
        let mut answered: Vec<(i64, Nanos)> = self
            .ops
            .iter()
            .filter_map(|o| o.revision().map(|r| (r, o.returned)))
            .collect();
        answered.sort_unstable();
        let mut earliest_from = vec![Nanos::MAX; answered.len() + 1];
        for i in (0..answered.len()).rev() {
            earliest_from[i] = earliest_from[i + 1].min(answered[i].1);
        }
        let settled = |op: &Operation, result: OpResult| {
            let first = answered.partition_point(|(r, _)| *r < result.revision());
            let bound = earliest_from[first];
            Operation {
                returned: if bound >= op.invoked {
                    bound
                } else {
                    Nanos::MAX
                },
                outcome: Outcome::Ok(result),
                ..op.clone()
            }
        };
        let mut puts: HashMap<(&[u8], &[u8]), i64> = HashMap::new();
        let mut deletes: BTreeMap<&[u8], Vec<i64>> = BTreeMap::new();
        for event in &record.events {
            match &event.kind {
                EventKind::Put { value } => {
                    puts.insert((event.key.as_slice(), value.as_slice()), event.revision);
                }
                EventKind::Delete => deletes
                    .entry(event.key.as_slice())
                    .or_default()
                    .push(event.revision),
            }
        }
        let acknowledged: HashSet<i64> = self
            .ops
            .iter()
            .filter_map(Operation::write_revision)
            .collect();
        let mut unknown_deletes: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
        for (i, op) in self.ops.iter().enumerate() {
            if let (Op::Delete { key }, Outcome::Unknown) = (&op.op, &op.outcome)
                && key.starts_with(&record.prefix)
            {
                unknown_deletes.entry(key.as_slice()).or_default().push(i);
            }
        }
        let mut delete_revision: HashMap<usize, i64> = HashMap::new();
        for (key, mut candidates) in unknown_deletes {
            candidates.sort_by_key(|i| self.ops[*i].invoked);
            let mut revisions: Vec<i64> = deletes
                .get(key)
                .into_iter()
                .flatten()
                .copied()
                .filter(|r| !acknowledged.contains(r))
                .collect();
            revisions.sort_unstable();
            delete_revision.extend(candidates.into_iter().zip(revisions));
        }
        self.ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match (&op.op, &op.outcome) {
                (Op::Put { key, value }, Outcome::Unknown) if key.starts_with(&record.prefix) => {
                    let revision = puts.get(&(key.as_slice(), value.as_slice()))?;
                    Some(settled(
                        op,
                        OpResult::Put {
                            revision: *revision,
                        },
                    ))
                }
                (Op::Delete { key }, Outcome::Unknown) if key.starts_with(&record.prefix) => {
                    let revision = delete_revision.get(&i)?;
                    Some(settled(
                        op,
                        OpResult::Delete {
                            deleted: 1,
                            revision: *revision,
                        },
                    ))
                }
                _ => Some(op.clone()),
            })
            .collect()
    }

    /// [`History::check_linearizable_within`] with [`DEFAULT_STEP_BUDGET`].
    pub fn check_linearizable(&self) -> Result<Linearizable, CheckError> {
        self.check_linearizable_within(DEFAULT_STEP_BUDGET)
    }

    /// Checks that the history is linearizable, allowing `budget` search steps per key.
    ///
    /// First the revisions, over all keys: each acknowledged write's revision is unique; an
    /// operation that starts after another finished has a revision at least as high, strictly
    /// higher if it is a write. Then each key on its own (registers of distinct keys are
    /// independent, so the search stays small): some order of its operations, consistent with
    /// real time, in which every get returns the register's value, a delete deletes one key
    /// exactly when there is one, and revisions on the key increase with each write and never
    /// fall below what a get saw. Operations with unknown outcome may take effect at any time
    /// after their invocation, or never.
    pub fn check_linearizable_within(&self, budget: u64) -> Result<Linearizable, CheckError> {
        for op in &self.ops {
            if let Some(reason) = op.malformed() {
                return Err(CheckError::Malformed {
                    op: Box::new(op.clone()),
                    reason,
                });
            }
        }
        self.check_revisions()?;
        let mut by_key: BTreeMap<&[u8], Vec<&Operation>> = BTreeMap::new();
        for op in &self.ops {
            if matches!(op.op, Op::Get { .. }) && op.outcome == Outcome::Unknown {
                continue;
            }
            by_key.entry(op.op.key()).or_default().push(op);
        }
        let mut summary = Linearizable {
            keys: by_key.len(),
            operations: 0,
            steps: 0,
        };
        for (key, ops) in by_key {
            summary.operations += ops.len();
            summary.steps += Search::new(key, &ops).run(budget)?;
        }
        Ok(summary)
    }

    fn check_revisions(&self) -> Result<(), CheckError> {
        let mut writes: HashMap<i64, &Operation> = HashMap::new();
        for op in &self.ops {
            if let Some(rev) = op.write_revision()
                && let Some(first) = writes.insert(rev, op)
            {
                return Err(CheckError::RevisionReused {
                    revision: rev,
                    first: Box::new(first.clone()),
                    second: Box::new(op.clone()),
                });
            }
        }
        // Sweep operations by invocation, keeping the highest revision of those that returned
        // strictly before: O(n log n) instead of comparing every pair.
        let answered: Vec<&Operation> =
            self.ops.iter().filter(|o| o.revision().is_some()).collect();
        let mut by_return = answered.clone();
        by_return.sort_by_key(|o| o.returned);
        let mut by_invoke = answered;
        by_invoke.sort_by_key(|o| o.invoked);
        let mut returned = by_return.iter().peekable();
        let mut highest: Option<(i64, &Operation)> = None;
        for later in by_invoke {
            while let Some(earlier) = returned.next_if(|o| o.returned < later.invoked) {
                if let Some(rev) = earlier.revision()
                    && highest.is_none_or(|(h, _)| rev > h)
                {
                    highest = Some((rev, earlier));
                }
            }
            let (Some((floor, earlier)), Some(rev)) = (highest, later.revision()) else {
                continue;
            };
            let boxed = || (Box::new(earlier.clone()), Box::new(later.clone()));
            if later.write_revision().is_some() && rev <= floor {
                let (earlier, later) = boxed();
                return Err(CheckError::RevisionNotIncreasing { earlier, later });
            }
            if rev < floor {
                let (earlier, later) = boxed();
                return Err(CheckError::StaleRevision { earlier, later });
            }
        }
        Ok(())
    }
}

/// An operation on one key, reduced to what the register model needs. Values are interned
/// (0 is "no value") so that a search configuration is a few machine words.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// A put; `revision` is `None` when its outcome is unknown.
    Put { value: u32, revision: Option<i64> },
    /// A get, or a delete that deleted nothing: saw `value` as of header `revision`.
    Read { value: u32, revision: i64 },
    /// A delete that deleted the key (`revision` known) or may have (`None`).
    Delete { revision: Option<i64> },
}

/// The model of one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Register {
    /// Interned value, 0 when the key does not exist.
    value: u32,
    /// Revision of the write that set `value`, as far as known (writes with unknown outcome
    /// leave it, which only makes the model more permissive).
    revision: i64,
    /// A write placed from now on must have a revision above this: the last write's, or a
    /// later get's header revision.
    floor: i64,
}

impl Register {
    /// The register after `step`, or why `step` cannot happen now.
    fn apply(self, step: Step) -> Result<Register, Refusal> {
        match step {
            Step::Put { value, revision } => self.write(value, revision),
            Step::Read { value, revision } => {
                if value != self.value {
                    Err(Refusal::Value { saw: value })
                } else if self.revision > revision {
                    Err(Refusal::ReadBeforeWrite { revision })
                } else {
                    Ok(Register {
                        floor: self.floor.max(revision),
                        ..self
                    })
                }
            }
            Step::Delete { revision: Some(_) } if self.value == 0 => Err(Refusal::NothingToDelete),
            Step::Delete { revision } => self.write(0, revision),
        }
    }

    fn write(self, value: u32, revision: Option<i64>) -> Result<Register, Refusal> {
        match revision {
            None => Ok(Register { value, ..self }),
            Some(r) if r <= self.floor => Err(Refusal::RevisionTooLow { revision: r }),
            Some(r) => Ok(Register {
                value,
                revision: r,
                floor: r,
            }),
        }
    }
}

/// Why an operation cannot take effect on a register, for the failure report.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Value { saw: u32 },
    ReadBeforeWrite { revision: i64 },
    NothingToDelete,
    RevisionTooLow { revision: i64 },
}

/// The linearizability search over one key's operations.
///
/// Calls and returns sit in one doubly linked list sorted by time. Walking from the head, the
/// search places (lifts out of the list) a call whose operation the register accepts, and
/// starts over; meeting a return means that operation should have been placed already, so it
/// backtracks. A configuration (set of placed operations, register) seen before is not
/// explored again. Unknown outcomes return at "infinity": meeting one means every acknowledged
/// operation is placed, and the unplaced unknown ones are taken never to have happened.
struct Search<'a> {
    key: &'a [u8],
    ops: &'a [&'a Operation],
    steps: Vec<Step>,
    values: Vec<&'a [u8]>,
    /// Node 0 is the head; node `2i + 1` is the call of operation `i`, `2i + 2` its return.
    next: Vec<usize>,
    prev: Vec<usize>,
}

const NIL: usize = usize::MAX;
const HEAD: usize = 0;

fn call(op: usize) -> usize {
    2 * op + 1
}

fn ret(op: usize) -> usize {
    2 * op + 2
}

/// The furthest point the search reached, kept for the failure report.
struct Furthest {
    placed: Vec<usize>,
    stuck: usize,
    register: Register,
    pending: Vec<usize>,
}

impl<'a> Search<'a> {
    fn new(key: &'a [u8], ops: &'a [&'a Operation]) -> Self {
        let mut values: Vec<&[u8]> = vec![&[]];
        let mut ids: HashMap<&[u8], u32> = HashMap::new();
        let mut intern = |v: &'a [u8]| {
            *ids.entry(v).or_insert_with(|| {
                values.push(v);
                // Fewer than u32::MAX distinct values fit in memory anyway.
                u32::try_from(values.len() - 1).unwrap_or(u32::MAX)
            })
        };
        let steps = ops
            .iter()
            .map(|&o| match (&o.op, &o.outcome) {
                (Op::Put { value, .. }, _) => Step::Put {
                    value: intern(value),
                    revision: o.revision(),
                },
                (Op::Get { .. }, Outcome::Ok(OpResult::Get { value, revision })) => Step::Read {
                    value: value.as_deref().map_or(0, &mut intern),
                    revision: *revision,
                },
                (
                    Op::Delete { .. },
                    Outcome::Ok(OpResult::Delete {
                        deleted: 0,
                        revision,
                    }),
                ) => Step::Read {
                    value: 0,
                    revision: *revision,
                },
                // Validated and filtered before: a delete that deleted one key, or a write
                // with unknown outcome.
                _ => Step::Delete {
                    revision: o.write_revision(),
                },
            })
            .collect();

        let mut events: Vec<(Nanos, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, o) in ops.iter().enumerate() {
            events.push((o.invoked, false, call(i)));
            let end = match o.outcome {
                Outcome::Ok(_) => o.returned,
                Outcome::Unknown => Nanos::MAX,
            };
            // `true` sorts returns after calls at the same instant: touching intervals count
            // as concurrent, the permissive reading of a clock's resolution.
            events.push((end, true, ret(i)));
        }
        events.sort_unstable();
        let nodes = 2 * ops.len() + 1;
        let mut next = vec![NIL; nodes];
        let mut prev = vec![NIL; nodes];
        let mut last = HEAD;
        for &(_, _, node) in &events {
            next[last] = node;
            prev[node] = last;
            last = node;
        }
        Search {
            key,
            ops,
            steps,
            values,
            next,
            prev,
        }
    }

    fn unlink(&mut self, n: usize) {
        let (p, x) = (self.prev[n], self.next[n]);
        self.next[p] = x;
        if x != NIL {
            self.prev[x] = p;
        }
    }

    fn relink(&mut self, n: usize) {
        let (p, x) = (self.prev[n], self.next[n]);
        self.next[p] = n;
        if x != NIL {
            self.prev[x] = n;
        }
    }

    /// Searches; returns the steps spent.
    fn run(mut self, budget: u64) -> Result<u64, CheckError> {
        let words = self.ops.len().div_ceil(64);
        let mut placed = vec![0u64; words];
        let mut seen: HashSet<(Box<[u64]>, Register)> = HashSet::new();
        let mut stack: Vec<(usize, Register)> = Vec::new();
        let mut register = Register::default();
        let mut furthest: Option<Furthest> = None;
        let mut spent = 0u64;
        let mut node = self.next[HEAD];
        loop {
            if node == NIL {
                return Ok(spent);
            }
            let op = (node - 1) / 2;
            if node == call(op) {
                spent += 1;
                if spent > budget {
                    return Err(CheckError::Inconclusive {
                        key: show(self.key),
                        operations: self.ops.len(),
                        budget,
                    });
                }
                if let Ok(after) = register.apply(self.steps[op]) {
                    placed[op / 64] |= 1 << (op % 64);
                    if seen.insert((placed.clone().into_boxed_slice(), after)) {
                        stack.push((op, register));
                        register = after;
                        self.unlink(call(op));
                        self.unlink(ret(op));
                        node = self.next[HEAD];
                        continue;
                    }
                    placed[op / 64] &= !(1 << (op % 64));
                }
                node = self.next[node];
            } else {
                if self.ops[op].outcome == Outcome::Unknown {
                    return Ok(spent);
                }
                if furthest
                    .as_ref()
                    .is_none_or(|f| stack.len() > f.placed.len())
                {
                    furthest = Some(self.snapshot(&stack, op, register, node));
                }
                let Some((undo, before)) = stack.pop() else {
                    let f = furthest.unwrap_or_else(|| self.snapshot(&stack, op, register, node));
                    return Err(self.report(f));
                };
                register = before;
                placed[undo / 64] &= !(1 << (undo % 64));
                self.relink(ret(undo));
                self.relink(call(undo));
                node = self.next[call(undo)];
            }
        }
    }

    /// The search's position when it has to backtrack at the return `node` of `stuck`. The
    /// calls before `node` in the list are the operations invoked and not placed.
    fn snapshot(
        &self,
        stack: &[(usize, Register)],
        stuck: usize,
        register: Register,
        node: usize,
    ) -> Furthest {
        const SHOWN: usize = 8;
        let mut pending = Vec::new();
        let mut n = self.next[HEAD];
        while n != node && n != NIL && pending.len() < SHOWN {
            let op = (n - 1) / 2;
            if op != stuck {
                pending.push(op);
            }
            n = self.next[n];
        }
        Furthest {
            placed: stack.iter().map(|&(o, _)| o).collect(),
            stuck,
            register,
            pending,
        }
    }

    fn value(&self, id: u32) -> String {
        match id {
            0 => "no value".to_owned(),
            _ => self
                .values
                .get(id as usize)
                .map_or_else(|| format!("value #{id}"), |v| show(v)),
        }
    }

    fn report(&self, f: Furthest) -> CheckError {
        const SHOWN: usize = 4;
        let reg = f.register;
        let reason = match reg.apply(self.steps[f.stuck]) {
            Err(Refusal::Value { saw }) => {
                format!(
                    "it saw {} but the key holds {}",
                    self.value(saw),
                    self.value(reg.value)
                )
            }
            Err(Refusal::ReadBeforeWrite { revision }) => format!(
                "its revision {revision} is older than the write (revision {}) it would follow",
                reg.revision
            ),
            Err(Refusal::NothingToDelete) => "it deleted a key that does not exist".to_owned(),
            Err(Refusal::RevisionTooLow { revision }) => format!(
                "its revision {revision} is not above revision {} already seen on the key",
                reg.floor
            ),
            // It fitted the register, but only in a configuration explored before, which
            // had failed.
            Ok(_) => "every order placing it here was already explored and failed".to_owned(),
        };
        let state = if reg.value == 0 {
            format!("no value (revision {})", reg.revision)
        } else {
            format!("{} (revision {})", self.value(reg.value), reg.revision)
        };
        let ops = |idx: &[usize]| idx.iter().map(|&i| self.ops[i].clone()).collect();
        CheckError::NotLinearizable {
            key: show(self.key),
            stuck: Box::new(self.ops[f.stuck].clone()),
            reason,
            state,
            linearized: f.placed.len(),
            last: ops(&f.placed[f.placed.len().saturating_sub(SHOWN)..]),
            pending: ops(&f.pending),
        }
    }
}

/// Records a history from concurrent client tasks. Clones share one history; recording takes
/// a short lock.
#[derive(Debug, Clone)]
pub struct Recorder {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    epoch: Instant,
    ops: Mutex<Vec<Operation>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// A recorder whose epoch is now.
    pub fn new() -> Self {
        Recorder {
            inner: Arc::new(Shared {
                epoch: Instant::now(),
                ops: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Nanoseconds since the epoch.
    pub fn now(&self) -> Nanos {
        // u64 nanoseconds last 584 years.
        u64::try_from(self.inner.epoch.elapsed().as_nanos()).unwrap_or(Nanos::MAX)
    }

    /// Notes that `client` sends `op` now. Call just before sending, and finish the returned
    /// [`Pending`] as soon as the answer (or the error) arrives.
    pub fn begin(&self, client: ClientId, op: Op) -> Pending {
        Pending {
            recorder: self.clone(),
            client,
            op: Some(op),
            invoked: self.now(),
        }
    }

    /// The operations finished so far.
    pub fn history(&self) -> History {
        History::from(self.lock().clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Operation>> {
        // A panicking client task cannot leave a half-pushed Vec behind.
        self.inner.ops.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An operation in flight. Dropping it unfinished (a cancelled client task) records it as
/// [`Outcome::Unknown`], since the request may have reached the store.
#[derive(Debug)]
#[must_use = "finish with ok() or unknown()"]
pub struct Pending {
    recorder: Recorder,
    client: ClientId,
    op: Option<Op>,
    invoked: Nanos,
}

impl Pending {
    /// The store answered with `result`.
    pub fn ok(mut self, result: OpResult) {
        self.finish(Outcome::Ok(result));
    }

    /// The client does not know whether the operation took effect (timeout, lost connection).
    pub fn unknown(mut self) {
        self.finish(Outcome::Unknown);
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(op) = self.op.take() {
            let returned = self.recorder.now();
            self.recorder.lock().push(Operation {
                client: self.client,
                op,
                invoked: self.invoked,
                returned,
                outcome,
            });
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish(Outcome::Unknown);
    }
}

/// What a watch event did to its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The key was set to `value`.
    Put {
        /// The value.
        value: Vec<u8>,
    },
    /// The key was deleted.
    Delete,
}

/// One event as a watcher received it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchEvent {
    /// The event's revision (the key's mod revision).
    pub revision: i64,
    /// The key.
    pub key: Vec<u8>,
    /// What happened.
    pub kind: EventKind,
}

impl WatchEvent {
    /// A put event.
    pub fn put(revision: i64, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        WatchEvent {
            revision,
            key: key.into(),
            kind: EventKind::Put {
                value: value.into(),
            },
        }
    }

    /// A delete event.
    pub fn delete(revision: i64, key: impl Into<Vec<u8>>) -> Self {
        WatchEvent {
            revision,
            key: key.into(),
            kind: EventKind::Delete,
        }
    }

    /// Whether `op` (a write) would produce this event.
    fn matches(&self, op: &Operation) -> bool {
        match (&op.op, &self.kind) {
            (Op::Put { key, value }, EventKind::Put { value: v }) => key == &self.key && value == v,
            (Op::Delete { key }, EventKind::Delete) => key == &self.key,
            _ => false,
        }
    }
}

impl fmt::Display for WatchEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            EventKind::Put { value } => {
                write!(
                    f,
                    "rev {} put {}={}",
                    self.revision,
                    show(&self.key),
                    show(value)
                )
            }
            EventKind::Delete => write!(f, "rev {} delete {}", self.revision, show(&self.key)),
        }
    }
}

/// Everything one watcher received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRecord {
    /// A name for messages.
    pub watcher: String,
    /// The watched prefix.
    pub prefix: Vec<u8>,
    /// The revision the watch was opened from.
    pub start_revision: i64,
    /// The events, in the order received.
    pub events: Vec<WatchEvent>,
}

impl WatchRecord {
    /// The highest revision it has certainly seen everything up to: its last event's, or just
    /// before its start if it saw none.
    fn last_revision(&self) -> i64 {
        self.events
            .last()
            .map_or(self.start_revision - 1, |e| e.revision)
    }
}

/// What is wrong with what a watcher received.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// An event's key is outside the watched prefix.
    #[error("watcher {watcher}: {event} is outside its prefix {prefix}")]
    OutsidePrefix {
        /// The watcher.
        watcher: String,
        /// The event.
        event: WatchEvent,
        /// The prefix, quoted.
        prefix: String,
    },

    /// An event is older than the revision the watch was opened from.
    #[error("watcher {watcher}: {event} precedes its start revision {start}")]
    BeforeStart {
        /// The watcher.
        watcher: String,
        /// The event.
        event: WatchEvent,
        /// The start revision.
        start: i64,
    },

    /// The same (revision, key) arrived twice.
    #[error("watcher {watcher}: {event} delivered twice")]
    Duplicate {
        /// The watcher.
        watcher: String,
        /// The event.
        event: WatchEvent,
    },

    /// An event came after one of a higher revision.
    #[error("watcher {watcher}: {event} arrived after revision {after}")]
    OutOfOrder {
        /// The watcher.
        watcher: String,
        /// The late event.
        event: WatchEvent,
        /// The revision seen before it.
        after: i64,
    },

    /// An event's revision belongs to acknowledged writes, none of which it describes.
    #[error("watcher {watcher}: {event} does not match the write(s) acknowledged at its revision:{}", list(.writes))]
    Mismatch {
        /// The watcher.
        watcher: String,
        /// The event.
        event: WatchEvent,
        /// The writes acknowledged at that revision.
        writes: Vec<Operation>,
    },

    /// An event matches no acknowledged write and no write with unknown outcome: the store
    /// invented it.
    #[error("watcher {watcher}: {event} matches no write of the history")]
    Unexpected {
        /// The watcher.
        watcher: String,
        /// The event.
        event: WatchEvent,
    },

    /// The watcher saw part of a revision's events but not all of those under its prefix.
    #[error("watcher {watcher}: saw part of revision {revision} but not\n    {missing}")]
    NotAtomic {
        /// The watcher.
        watcher: String,
        /// The revision.
        revision: i64,
        /// The write whose event is missing.
        missing: Box<Operation>,
    },

    /// An acknowledged write under the prefix, between the start and the last event seen,
    /// was never delivered.
    #[error("watcher {watcher}: gap at revision {revision}, never delivered\n    {missing}")]
    Gap {
        /// The watcher.
        watcher: String,
        /// The revision.
        revision: i64,
        /// The write whose event is missing.
        missing: Box<Operation>,
    },

    /// Two watches cannot be compared: they watch different prefixes.
    #[error("watchers {first} and {second} watch different prefixes")]
    PrefixMismatch {
        /// One watcher.
        first: String,
        /// The other.
        second: String,
    },

    /// Two watches of one prefix disagree on the revisions both covered.
    #[error(
        "watchers {first} and {second} disagree at revision {revision}: {first} got {}, {second} got {}",
        .first_event.as_ref().map_or("nothing".to_owned(), ToString::to_string),
        .second_event.as_ref().map_or("nothing".to_owned(), ToString::to_string)
    )]
    ResumeMismatch {
        /// One watcher.
        first: String,
        /// The other.
        second: String,
        /// The first revision where they differ.
        revision: i64,
        /// What the first got there.
        first_event: Option<Box<WatchEvent>>,
        /// What the second got there.
        second_event: Option<Box<WatchEvent>>,
    },
}

impl History {
    /// Checks one watcher's events against the acknowledged writes of this history: under
    /// its prefix, from its start revision, ordered by revision, no (revision, key) twice,
    /// each event describing the write acknowledged at its revision (or a write with unknown
    /// outcome, which may have happened), and every acknowledged write with a revision from
    /// the start up to the last event seen delivered — no gap, and no revision half delivered.
    ///
    /// The history's writes are single-key, so a revision holds one event; the order within
    /// a multi-event revision is left to [`check_watch_resume`], which compares streams event
    /// by event.
    pub fn check_watch(&self, record: &WatchRecord) -> Result<(), WatchError> {
        let watcher = || record.watcher.clone();
        let mut acknowledged: HashMap<i64, Vec<&Operation>> = HashMap::new();
        for op in &self.ops {
            if let Some(rev) = op.write_revision() {
                acknowledged.entry(rev).or_default().push(op);
            }
        }
        let unknown: Vec<&Operation> = self
            .ops
            .iter()
            .filter(|o| o.is_write() && o.outcome == Outcome::Unknown)
            .collect();
        let mut seen: HashSet<(i64, &[u8])> = HashSet::new();
        let mut last: Option<i64> = None;
        for event in &record.events {
            if !event.key.starts_with(&record.prefix) {
                return Err(WatchError::OutsidePrefix {
                    watcher: watcher(),
                    event: event.clone(),
                    prefix: show(&record.prefix),
                });
            }
            if event.revision < record.start_revision {
                return Err(WatchError::BeforeStart {
                    watcher: watcher(),
                    event: event.clone(),
                    start: record.start_revision,
                });
            }
            if !seen.insert((event.revision, &event.key)) {
                return Err(WatchError::Duplicate {
                    watcher: watcher(),
                    event: event.clone(),
                });
            }
            if let Some(after) = last
                && event.revision < after
            {
                return Err(WatchError::OutOfOrder {
                    watcher: watcher(),
                    event: event.clone(),
                    after,
                });
            }
            last = Some(event.revision);
            match acknowledged.get(&event.revision) {
                Some(writes) if !writes.iter().any(|w| event.matches(w)) => {
                    return Err(WatchError::Mismatch {
                        watcher: watcher(),
                        event: event.clone(),
                        writes: writes.iter().map(|&w| w.clone()).collect(),
                    });
                }
                Some(_) => {}
                None if unknown.iter().any(|w| event.matches(w)) => {}
                None => {
                    return Err(WatchError::Unexpected {
                        watcher: watcher(),
                        event: event.clone(),
                    });
                }
            }
        }
        let mut expected: Vec<(i64, &Operation)> = acknowledged
            .iter()
            .filter(|(rev, _)| (record.start_revision..=record.last_revision()).contains(*rev))
            .flat_map(|(&rev, ws)| ws.iter().map(move |&w| (rev, w)))
            .filter(|(_, w)| w.op.key().starts_with(&record.prefix))
            .collect();
        expected.sort_by_key(|&(rev, _)| rev);
        for (revision, write) in expected {
            if seen.contains(&(revision, write.op.key())) {
                continue;
            }
            let missing = Box::new(write.clone());
            return Err(if seen.iter().any(|&(r, _)| r == revision) {
                WatchError::NotAtomic {
                    watcher: watcher(),
                    revision,
                    missing,
                }
            } else {
                WatchError::Gap {
                    watcher: watcher(),
                    revision,
                    missing,
                }
            });
        }
        Ok(())
    }
}

/// Checks that two watches of one prefix, opened from different revisions, received the same
/// events, in the same order, over the revisions both covered (from the later start to the
/// earlier last event): a watch resumed from revision r yields exactly the events from r on.
pub fn check_watch_resume(first: &WatchRecord, second: &WatchRecord) -> Result<(), WatchError> {
    if first.prefix != second.prefix {
        return Err(WatchError::PrefixMismatch {
            first: first.watcher.clone(),
            second: second.watcher.clone(),
        });
    }
    let from = first.start_revision.max(second.start_revision);
    let to = first.last_revision().min(second.last_revision());
    let overlap = |r: &WatchRecord| {
        r.events
            .iter()
            .filter(|e| (from..=to).contains(&e.revision))
            .cloned()
            .collect::<Vec<_>>()
    };
    let (a, b) = (overlap(first), overlap(second));
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i), b.get(i));
        if x != y {
            let revision = [x, y]
                .into_iter()
                .flatten()
                .map(|e| e.revision)
                .min()
                .unwrap_or(from);
            return Err(WatchError::ResumeMismatch {
                first: first.watcher.clone(),
                second: second.watcher.clone(),
                revision,
                first_event: x.cloned().map(Box::new),
                second_event: y.cloned().map(Box::new),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn ok(client: ClientId, op: Op, t: (Nanos, Nanos), result: OpResult) -> Operation {
        Operation {
            client,
            op,
            invoked: t.0,
            returned: t.1,
            outcome: Outcome::Ok(result),
        }
    }

    fn put(c: ClientId, key: &str, value: &str, t: (Nanos, Nanos), revision: i64) -> Operation {
        ok(c, Op::put(key, value), t, OpResult::Put { revision })
    }

    fn get(c: ClientId, key: &str, value: Option<&str>, t: (Nanos, Nanos), rev: i64) -> Operation {
        let value = value.map(|v| v.as_bytes().to_vec());
        ok(
            c,
            Op::get(key),
            t,
            OpResult::Get {
                value,
                revision: rev,
            },
        )
    }

    fn del(c: ClientId, key: &str, deleted: i64, t: (Nanos, Nanos), revision: i64) -> Operation {
        let result = OpResult::Delete { deleted, revision };
        ok(c, Op::delete(key), t, result)
    }

    fn unknown(client: ClientId, op: Op, t: (Nanos, Nanos)) -> Operation {
        Operation {
            client,
            op,
            invoked: t.0,
            returned: t.1,
            outcome: Outcome::Unknown,
        }
    }

    fn check(ops: Vec<Operation>) -> Result<Linearizable, CheckError> {
        History::from(ops).check_linearizable()
    }

    /// The error must be `NotLinearizable` on `key`, stuck at `stuck`.
    fn assert_not_linearizable(
        res: Result<Linearizable, CheckError>,
        key: &str,
        stuck: &Operation,
    ) {
        match res {
            Err(
                ref e @ CheckError::NotLinearizable {
                    key: ref k,
                    stuck: ref s,
                    ..
                },
            ) => {
                assert_eq!(k, &show(key.as_bytes()), "{e}");
                assert_eq!(**s, *stuck, "{e}");
                let msg = e.to_string();
                assert!(msg.contains(&format!("client {}", stuck.client)), "{msg}");
            }
            other => panic!("expected not linearizable on {key}, got {other:?}"),
        }
    }

    #[test]
    fn sequential_history_passes() {
        let summary = check(vec![
            get(1, "k", None, (0, 5), 1),
            put(1, "k", "a", (10, 20), 2),
            get(2, "k", Some("a"), (30, 40), 2),
            put(2, "j", "x", (45, 48), 3),
            del(1, "k", 1, (50, 60), 4),
            del(2, "k", 0, (70, 80), 4),
            get(1, "k", None, (90, 95), 4),
        ])
        .expect("linearizable");
        assert_eq!(summary.keys, 2);
        assert_eq!(summary.operations, 7);
    }

    #[test]
    fn stale_read_fails() {
        let stale = get(3, "k", Some("a"), (40, 50), 3);
        let res = check(vec![
            put(1, "k", "a", (0, 10), 2),
            put(2, "k", "b", (20, 30), 3),
            stale.clone(),
        ]);
        assert_not_linearizable(res, "k", &stale);

        // The same stale value with the stale header revision it came with.
        let res = check(vec![
            put(1, "k", "a", (0, 10), 2),
            put(2, "k", "b", (20, 30), 3),
            get(3, "k", Some("a"), (40, 50), 2),
        ]);
        assert!(
            matches!(res, Err(CheckError::StaleRevision { .. })),
            "{res:?}"
        );
    }

    #[test]
    fn lost_acknowledged_write_fails() {
        let read = get(2, "k", None, (20, 30), 2);
        let res = check(vec![put(1, "k", "x", (0, 10), 2), read.clone()]);
        assert_not_linearizable(res, "k", &read);
        let msg = check(vec![put(1, "k", "x", (0, 10), 2), read])
            .expect_err("lost write")
            .to_string();
        assert!(msg.contains("key \"k\""), "{msg}");
        assert!(
            msg.contains("it saw no value but the key holds \"x\""),
            "{msg}"
        );

        // A delete concurrent with the read explains it.
        check(vec![
            put(1, "k", "x", (0, 10), 2),
            del(3, "k", 1, (15, 35), 3),
            get(2, "k", None, (20, 30), 3),
        ])
        .expect("explained by the delete");
    }

    #[test]
    fn reused_revision_fails() {
        let res = check(vec![
            put(1, "a", "x", (0, 10), 5),
            put(2, "b", "y", (5, 15), 5),
        ]);
        match res {
            Err(CheckError::RevisionReused { revision: 5, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn revision_going_back_in_real_time_fails() {
        let res = check(vec![
            put(1, "a", "x", (0, 10), 5),
            put(2, "b", "y", (20, 30), 4),
        ]);
        assert!(
            matches!(res, Err(CheckError::RevisionNotIncreasing { .. })),
            "{res:?}"
        );
        let res = check(vec![
            put(1, "a", "x", (0, 10), 5),
            get(2, "b", None, (20, 30), 4),
        ]);
        assert!(
            matches!(res, Err(CheckError::StaleRevision { .. })),
            "{res:?}"
        );
    }

    #[test]
    fn concurrent_writes_order_by_revision() {
        // b's revision puts it first, so a concurrent read may see b only before a lands,
        // i.e. with a header revision below a's.
        let base = || vec![put(1, "k", "a", (0, 100), 3), put(2, "k", "b", (10, 90), 2)];
        let mut ops = base();
        ops.push(get(3, "k", Some("a"), (95, 110), 3));
        check(ops).expect("b then a, read after a");
        let mut ops = base();
        ops.push(get(3, "k", Some("b"), (95, 110), 2));
        check(ops).expect("b, read, then a");
        let mut ops = base();
        let late = get(3, "k", Some("b"), (95, 110), 3);
        ops.push(late.clone());
        assert_not_linearizable(check(ops), "k", &late);
        // Once a has returned, b is gone for good.
        let mut ops = base();
        let after = get(3, "k", Some("b"), (105, 110), 3);
        ops.push(after.clone());
        assert_not_linearizable(check(ops), "k", &after);
    }

    #[test]
    fn only_some_interleavings_work() {
        // Reads concurrent with both writes see b then a: only the order b, read, a, read fits.
        check(vec![
            put(1, "k", "a", (0, 100), 3),
            put(2, "k", "b", (0, 100), 2),
            get(3, "k", Some("b"), (0, 50), 2),
            get(3, "k", Some("a"), (60, 100), 3),
        ])
        .expect("linearizable");
        // Seeing a first and b afterwards contradicts the revisions.
        let second = get(3, "k", Some("b"), (60, 100), 3);
        let res = check(vec![
            put(1, "k", "a", (0, 100), 3),
            put(2, "k", "b", (0, 100), 2),
            get(3, "k", Some("a"), (0, 50), 3),
            second.clone(),
        ]);
        assert_not_linearizable(res, "k", &second);
    }

    #[test]
    fn unknown_writes_may_or_may_not_happen() {
        let maybe = || unknown(1, Op::put("k", "x"), (0, 10));
        check(vec![maybe(), get(2, "k", Some("x"), (20, 30), 2)]).expect("it happened");
        check(vec![maybe(), get(2, "k", None, (20, 30), 1)]).expect("it did not");
        check(vec![
            maybe(),
            get(2, "k", None, (20, 30), 1),
            get(2, "k", Some("x"), (40, 50), 2),
        ])
        .expect("it happened late, after the client gave up");
        // Not before it was invoked.
        let early = get(2, "k", Some("x"), (0, 5), 2);
        let res = check(vec![unknown(1, Op::put("k", "x"), (10, 20)), early.clone()]);
        assert_not_linearizable(res, "k", &early);
        // Not twice: once gone, the value cannot come back from the same put.
        let back = get(2, "k", Some("x"), (60, 70), 3);
        let res = check(vec![
            maybe(),
            get(2, "k", Some("x"), (20, 30), 1),
            del(3, "k", 1, (40, 50), 3),
            back.clone(),
        ]);
        assert_not_linearizable(res, "k", &back);
        // An unknown delete, an unknown get (ignored).
        check(vec![
            put(1, "k", "x", (0, 10), 2),
            unknown(2, Op::delete("k"), (20, 30)),
            unknown(3, Op::get("k"), (20, 30)),
            get(1, "k", Some("x"), (40, 50), 2),
            get(1, "k", None, (60, 70), 3),
        ])
        .expect("the delete happened between the reads");
    }

    #[test]
    fn delete_count_must_match_the_register() {
        let bad = del(2, "k", 1, (20, 30), 2);
        assert_not_linearizable(
            check(vec![get(1, "k", None, (0, 10), 1), bad.clone()]),
            "k",
            &bad,
        );
        let bad = del(2, "k", 0, (20, 30), 2);
        assert_not_linearizable(
            check(vec![put(1, "k", "x", (0, 10), 2), bad.clone()]),
            "k",
            &bad,
        );
    }

    #[test]
    fn malformed_records_are_reported() {
        let res = check(vec![ok(
            1,
            Op::get("k"),
            (0, 10),
            OpResult::Put { revision: 2 },
        )]);
        assert!(matches!(res, Err(CheckError::Malformed { .. })), "{res:?}");
        let res = check(vec![put(1, "k", "x", (10, 5), 2)]);
        assert!(matches!(res, Err(CheckError::Malformed { .. })), "{res:?}");
        let res = check(vec![del(1, "k", 2, (0, 5), 2)]);
        assert!(matches!(res, Err(CheckError::Malformed { .. })), "{res:?}");
    }

    #[test]
    fn exhausted_budget_is_inconclusive_not_a_pass() {
        // Twelve concurrent puts of unknown outcome, then a read of a value none wrote: every
        // subset of the puts must be tried before the search can say no.
        let mut ops: Vec<Operation> = (0..12)
            .map(|i| unknown(i, Op::put("k", format!("v{i}")), (i as u64, 1000)))
            .collect();
        ops.push(get(99, "k", Some("never"), (2000, 2010), 1));
        let history = History::from(ops);
        match history.check_linearizable_within(1000) {
            Err(CheckError::Inconclusive { budget: 1000, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            history.check_linearizable(),
            Err(CheckError::NotLinearizable { .. })
        ));
    }

    #[test]
    fn recorder_records_concurrent_clients() {
        let recorder = Recorder::new();
        let threads: Vec<_> = (0..4)
            .map(|c| {
                let r = recorder.clone();
                std::thread::spawn(move || {
                    r.begin(c, Op::put("k", "v"))
                        .ok(OpResult::Put { revision: 2 });
                    r.begin(c, Op::get("k")).unknown();
                    // Dropped unfinished, like a cancelled task.
                    drop(r.begin(c, Op::delete("k")));
                })
            })
            .collect();
        for t in threads {
            t.join().expect("client thread");
        }
        let history = recorder.history();
        assert_eq!(history.len(), 12);
        for op in history.operations() {
            assert!(op.invoked <= op.returned, "{op}");
            let expect_ok = matches!(op.op, Op::Put { .. });
            assert_eq!(matches!(op.outcome, Outcome::Ok(_)), expect_ok, "{op}");
        }
    }

    // ---- watches

    fn writes() -> History {
        History::from(vec![
            put(1, "/p/a", "1", (0, 10), 2),
            put(1, "/q/x", "1", (20, 30), 3),
            put(2, "/p/b", "2", (40, 50), 4),
            del(1, "/p/a", 1, (60, 70), 5),
            unknown(2, Op::put("/p/c", "3"), (80, 90)),
            put(1, "/p/b", "3", (100, 110), 7),
        ])
    }

    fn record(name: &str, start: i64, events: Vec<WatchEvent>) -> WatchRecord {
        WatchRecord {
            watcher: name.to_owned(),
            prefix: b"/p/".to_vec(),
            start_revision: start,
            events,
        }
    }

    fn full() -> Vec<WatchEvent> {
        vec![
            WatchEvent::put(2, "/p/a", "1"),
            WatchEvent::put(4, "/p/b", "2"),
            WatchEvent::delete(5, "/p/a"),
            // The unknown put happened, at revision 6.
            WatchEvent::put(6, "/p/c", "3"),
            WatchEvent::put(7, "/p/b", "3"),
        ]
    }

    #[test]
    fn complete_watch_passes() {
        writes()
            .check_watch(&record("w", 1, full()))
            .expect("complete");
        let mut without_unknown = full();
        without_unknown.remove(3);
        writes()
            .check_watch(&record("w", 1, without_unknown))
            .expect("the unknown put need not have happened");
        writes()
            .check_watch(&record("w", 4, full()[1..3].to_vec()))
            .expect("a prefix of the stream, from a later start");
    }

    #[test]
    fn watch_gap_fails() {
        let mut events = full();
        events.remove(1);
        match writes().check_watch(&record("w", 1, events)) {
            Err(e @ WatchError::Gap { revision: 4, .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("watcher w") && msg.contains("/p/b"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn duplicated_watch_event_fails() {
        let mut events = full();
        events.insert(2, events[1].clone());
        match writes().check_watch(&record("w", 1, events)) {
            Err(WatchError::Duplicate { watcher, event }) => {
                assert_eq!(watcher, "w");
                assert_eq!(event.revision, 4);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reordered_watch_event_fails() {
        let mut events = full();
        events.swap(1, 2);
        match writes().check_watch(&record("w", 1, events)) {
            Err(WatchError::OutOfOrder {
                event, after: 5, ..
            }) => assert_eq!(event.revision, 4),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_or_invented_watch_events_fail() {
        let mut events = full();
        events[1] = WatchEvent::put(4, "/p/b", "wrong");
        let res = writes().check_watch(&record("w", 1, events));
        assert!(matches!(res, Err(WatchError::Mismatch { .. })), "{res:?}");
        let mut events = full();
        events.push(WatchEvent::put(8, "/p/z", "ghost"));
        let res = writes().check_watch(&record("w", 1, events));
        assert!(matches!(res, Err(WatchError::Unexpected { .. })), "{res:?}");
        let res = writes().check_watch(&record("w", 1, vec![WatchEvent::put(3, "/q/x", "1")]));
        assert!(
            matches!(res, Err(WatchError::OutsidePrefix { .. })),
            "{res:?}"
        );
        let res = writes().check_watch(&record("w", 5, full()));
        assert!(
            matches!(res, Err(WatchError::BeforeStart { .. })),
            "{res:?}"
        );
    }

    #[test]
    fn half_delivered_revision_fails() {
        // Two writes of one transaction share revision 2.
        let history = History::from(vec![
            put(1, "/p/a", "1", (0, 10), 2),
            put(1, "/p/b", "1", (0, 10), 2),
        ]);
        let res = history.check_watch(&record("w", 1, vec![WatchEvent::put(2, "/p/a", "1")]));
        assert!(
            matches!(res, Err(WatchError::NotAtomic { revision: 2, .. })),
            "{res:?}"
        );
    }

    #[test]
    fn resumed_watch_must_agree_on_the_overlap() {
        let whole = record("from-1", 1, full());
        let resumed = record("from-5", 5, full()[2..].to_vec());
        check_watch_resume(&whole, &resumed).expect("same events from 5 on");
        let shorter = record("from-4", 4, full()[1..3].to_vec());
        check_watch_resume(&whole, &shorter).expect("overlap is 4..=5");
        let mut skipped = full()[2..].to_vec();
        skipped.remove(1);
        let res = check_watch_resume(&whole, &record("from-5", 5, skipped));
        match res {
            Err(WatchError::ResumeMismatch { revision: 6, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    // ---- generated histories

    /// One operation to generate: which client, key, kind and value, and its timing relative
    /// to the client's previous operation; `fate` 0 and 1 make the outcome unknown (0: it
    /// never took effect, 1: it did).
    #[derive(Debug, Clone)]
    struct Spec {
        client: u32,
        key: u8,
        kind: u8,
        value: u8,
        gap: u64,
        before: u64,
        after: u64,
        fate: u8,
    }

    /// Runs the specs through a sequential in-memory store at random points inside their
    /// intervals, so the history is linearizable by construction.
    fn simulate(specs: &[Spec]) -> History {
        let mut clock: HashMap<u32, Nanos> = HashMap::new();
        let mut planned: Vec<(Nanos, Operation, u8)> = Vec::new();
        for s in specs {
            let invoked = clock.get(&s.client).copied().unwrap_or(0) + s.gap;
            let point = invoked + s.before;
            let returned = point + s.after;
            clock.insert(s.client, returned + 1);
            let key = format!("k{}", s.key);
            let op = match s.kind {
                0 => Op::put(key, format!("v{}", s.value)),
                1 => Op::get(key),
                _ => Op::delete(key),
            };
            let operation = Operation {
                client: s.client,
                op,
                invoked,
                returned,
                outcome: Outcome::Unknown,
            };
            planned.push((point, operation, s.fate));
        }
        planned.sort_by_key(|(point, _, _)| *point);
        let mut store: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut revision = 1;
        let mut ops = Vec::new();
        for (_, mut o, fate) in planned {
            if fate != 0 {
                let result = match &o.op {
                    Op::Put { key, value } => {
                        revision += 1;
                        store.insert(key.clone(), value.clone());
                        OpResult::Put { revision }
                    }
                    Op::Get { key } => OpResult::Get {
                        value: store.get(key).cloned(),
                        revision,
                    },
                    Op::Delete { key } => {
                        let deleted = i64::from(store.remove(key).is_some());
                        revision += deleted;
                        OpResult::Delete { deleted, revision }
                    }
                };
                if fate != 1 {
                    o.outcome = Outcome::Ok(result);
                }
            }
            ops.push(o);
        }
        History::from(ops)
    }

    fn spec(clients: u32, keys: u8) -> impl Strategy<Value = Spec> {
        (
            0..clients,
            0..keys,
            0..3u8,
            0..4u8,
            0..20u64,
            0..40u64,
            0..40u64,
            0..20u8,
        )
            .prop_map(
                |(client, key, kind, value, gap, before, after, fate)| Spec {
                    client,
                    key,
                    kind,
                    value,
                    gap,
                    before,
                    after,
                    fate,
                },
            )
    }

    proptest! {
        #[test]
        fn generated_histories_pass(specs in prop::collection::vec(spec(4, 3), 1..150)) {
            let history = simulate(&specs);
            if let Err(e) = history.check_linearizable() {
                return Err(TestCaseError::fail(e.to_string()));
            }
        }

        #[test]
        fn a_corrupted_read_fails(
            specs in prop::collection::vec(spec(4, 3), 1..150),
            pick in any::<prop::sample::Index>(),
        ) {
            let mut history = simulate(&specs);
            let reads: Vec<usize> = history
                .operations()
                .iter()
                .enumerate()
                .filter(|(_, o)| matches!(o.outcome, Outcome::Ok(OpResult::Get { .. })))
                .map(|(i, _)| i)
                .collect();
            prop_assume!(!reads.is_empty());
            let victim = reads[pick.index(reads.len())];
            if let Outcome::Ok(OpResult::Get { value, .. }) = &mut history.ops[victim].outcome {
                // No put writes this value, so no order can explain it.
                *value = Some(b"corrupt".to_vec());
            }
            let stuck = history.ops[victim].clone();
            match history.check_linearizable() {
                Err(CheckError::NotLinearizable { key, .. }) => {
                    prop_assert_eq!(key, show(stuck.op.key()));
                }
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            }
        }
    }

    #[test]
    fn thousands_of_operations_check_quickly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let specs: Vec<Spec> = (0..4000)
            .map(|_| Spec {
                client: rng.random_range(0..8),
                key: rng.random_range(0..20),
                kind: rng.random_range(0..3),
                value: rng.random_range(0..8),
                gap: rng.random_range(0..2_000),
                before: rng.random_range(0..5_000),
                after: rng.random_range(0..5_000),
                // 1 in 50 unknown.
                fate: rng.random_range(0..100),
            })
            .collect();
        let history = simulate(&specs);
        let summary = history.check_linearizable().expect("linearizable");
        assert_eq!(summary.keys, 20);
        assert!(summary.operations > 3900, "{summary:?}");
    }

    #[test]
    fn unknown_writes_are_settled_by_a_complete_watch() {
        let ops = vec![
            put(1, "k", "seen", (0, 10), 2),
            Operation {
                outcome: Outcome::Unknown,
                ..put(2, "k", "landed", (5, 15), 0)
            },
            Operation {
                outcome: Outcome::Unknown,
                ..put(3, "k", "lost", (6, 16), 0)
            },
            get(1, "k", Some("landed"), (20, 30), 3),
        ];
        let history = History::from(ops);
        let record = WatchRecord {
            watcher: "w".into(),
            prefix: b"k".to_vec(),
            start_revision: 1,
            events: vec![
                WatchEvent::put(2, "k", "seen"),
                WatchEvent::put(3, "k", "landed"),
            ],
        };
        let settled = history.settle_unknown_writes(&record);
        assert_eq!(settled.len(), 3, "the undelivered put is gone");
        let landed = &settled.operations()[1];
        assert_eq!(landed.write_revision(), Some(3));
        assert_eq!(
            landed.returned, 30,
            "bounded by the read that saw revision 3"
        );
        settled
            .check_linearizable()
            .expect("the read saw the settled put");
        // A watch that missed the put would settle it as never written: the read then fails.
        let missed = WatchRecord {
            events: vec![WatchEvent::put(2, "k", "seen")],
            ..record
        };
        assert!(
            history
                .settle_unknown_writes(&missed)
                .check_linearizable()
                .is_err()
        );

        // Two unknown deletes, one delete event: the earlier delete takes it, the other
        // changed nothing and goes.
        let ops = vec![
            put(1, "k", "x", (0, 10), 2),
            unknown(2, Op::delete("k"), (20, 30)),
            unknown(3, Op::delete("k"), (25, 35)),
            get(1, "k", None, (40, 50), 3),
            del(1, "k", 0, (60, 70), 3),
        ];
        let record = WatchRecord {
            watcher: "w".into(),
            prefix: b"k".to_vec(),
            start_revision: 1,
            events: vec![WatchEvent::put(2, "k", "x"), WatchEvent::delete(3, "k")],
        };
        let settled = History::from(ops).settle_unknown_writes(&record);
        assert_eq!(settled.len(), 4);
        assert_eq!(settled.operations()[1].write_revision(), Some(3));
        settled
            .check_linearizable()
            .expect("the delete happened at 3");
    }
}
