//! Batched writes: operations grouped into transactions that the store accepts.

use std::collections::HashSet;
use std::ops::Range;

use super::LeaseId;
use super::config::Limits;

/// One write in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<V> {
    /// Store `value` under `key`, attached to `lease` if given.
    Put {
        /// The key.
        key: String,
        /// The typed value.
        value: V,
        /// The lease the key is attached to; `None` for a key that never expires.
        lease: Option<LeaseId>,
    },
    /// Delete `key` (nothing happens if it is absent).
    Delete {
        /// The key.
        key: String,
    },
}

impl<V> Op<V> {
    /// A put without lease.
    pub fn put(key: impl Into<String>, value: V) -> Self {
        Op::Put {
            key: key.into(),
            value,
            lease: None,
        }
    }

    /// A put attached to a lease.
    pub fn put_leased(key: impl Into<String>, value: V, lease: LeaseId) -> Self {
        Op::Put {
            key: key.into(),
            value,
            lease: Some(lease),
        }
    }

    /// A delete.
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    /// The key the operation writes.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// What an applied batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// How many operations were applied.
    pub ops: usize,
    /// How many transactions were sent.
    pub txns: usize,
    /// The store revision after the last transaction (0 for an empty batch).
    pub revision: i64,
}

/// Per-operation overhead counted on top of key and value bytes (protobuf framing, lease).
const OP_OVERHEAD_BYTES: usize = 16;

/// Splits operations, given as `(key, value length)`, into consecutive ranges that each fit
/// in one transaction: at most `txn_max_ops` operations, at most `txn_max_bytes` bytes
/// (a single larger operation gets a range of its own), and no key twice (etcd refuses a
/// transaction that writes the same key twice). Order is kept, so applying the ranges in
/// order has the same final effect as applying the operations one by one.
pub(crate) fn plan<'a>(
    ops: impl IntoIterator<Item = (&'a str, usize)>,
    limits: &Limits,
) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0usize;
    let mut bytes = 0usize;
    let mut keys: HashSet<&str> = HashSet::new();
    let mut index = 0usize;
    for (key, value_len) in ops {
        let size = key.len() + value_len + OP_OVERHEAD_BYTES;
        let count = index - start;
        let full = count >= limits.txn_max_ops
            || (count > 0 && bytes + size > limits.txn_max_bytes)
            || keys.contains(key);
        if full {
            ranges.push(start..index);
            start = index;
            bytes = 0;
            keys.clear();
        }
        bytes += size;
        keys.insert(key);
        index += 1;
    }
    if index > start {
        ranges.push(start..index);
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(ops: usize, bytes: usize) -> Limits {
        Limits {
            list_page_size: 1000,
            txn_max_ops: ops,
            txn_max_bytes: bytes,
        }
    }

    #[test]
    fn empty_batch_has_no_txn() {
        assert!(plan(std::iter::empty(), &Limits::default()).is_empty());
    }

    #[test]
    fn splits_by_op_count() {
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i:04}")).collect();
        let ranges = plan(keys.iter().map(|k| (k.as_str(), 10)), &Limits::default());
        assert_eq!(ranges.len(), 8); // 7 * 128 + 104
        assert!(ranges.iter().all(|r| r.len() <= 128));
        assert_eq!(ranges[0], 0..128);
        assert_eq!(ranges[7], 896..1000);
    }

    #[test]
    fn splits_by_bytes_and_keeps_big_ops_alone() {
        let keys = ["a", "b", "c", "d"];
        // Each op: 1 + 100 + 16 = 117 bytes; 2 fit in 250.
        let ranges = plan(keys.iter().map(|k| (*k, 100)), &limits(128, 250));
        assert_eq!(ranges, vec![0..2, 2..4]);
        let sizes = [10, 1000, 10];
        let ranges = plan(
            keys.iter().zip(sizes).map(|(k, s)| (*k, s)),
            &limits(128, 250),
        );
        assert_eq!(ranges, vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn repeated_key_starts_a_new_txn() {
        let keys = ["a", "b", "a", "c", "b"];
        let ranges = plan(keys.iter().map(|k| (*k, 1)), &Limits::default());
        assert_eq!(ranges, vec![0..2, 2..5]);
        let ranges = plan(["a", "a", "a"].iter().map(|k| (*k, 1)), &Limits::default());
        assert_eq!(ranges, vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn plan_covers_every_op_once_in_order() {
        // A small deterministic pseudo-random sweep over shapes.
        let mut seed = 0x2545_f491_u64;
        for _ in 0..200 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = (seed % 600) as usize;
            let max_ops = 1 + (seed >> 10) as usize % 130;
            let max_bytes = 50 + (seed >> 20) as usize % 5000;
            let keys: Vec<String> = (0..n).map(|i| format!("k{}", (i * 7) % 97)).collect();
            let lens: Vec<usize> = (0..n).map(|i| (i * 31 + seed as usize) % 300).collect();
            let l = limits(max_ops, max_bytes);
            let ranges = plan(
                keys.iter().map(String::as_str).zip(lens.iter().copied()),
                &l,
            );
            let mut next = 0;
            for r in &ranges {
                assert_eq!(r.start, next);
                assert!(!r.is_empty() && r.len() <= max_ops);
                let mut seen = HashSet::new();
                assert!(keys[r.clone()].iter().all(|k| seen.insert(k)));
                let bytes: usize = r
                    .clone()
                    .map(|i| keys[i].len() + lens[i] + OP_OVERHEAD_BYTES)
                    .sum();
                assert!(r.len() == 1 || bytes <= max_bytes);
                next = r.end;
            }
            assert_eq!(next, n);
        }
    }
}
