//! Watches of several prefixes merged into one stream of whole revisions, in order.
//!
//! A follower that lists several prefixes at one revision must watch them from the next one
//! and apply each store transaction as a whole, in revision order, even when it spans
//! prefixes: a canary deleted with its entries in one revision must not be seen before them.
//! Each prefix has its own watch, so [`MergedWatch`] holds a revision back until every watch
//! is known to have delivered everything up to it (by its own events or a progress
//! notification). Waiting for the other watches costs up to the progress interval, so writes
//! that ordering cannot hurt (`early` keys: the caller says which) go out at once unless a
//! change of the same key is queued ahead of them.
//!
//! The merge works on any [`RevisionStream`], so it is unit-tested with scripted streams.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures::Stream;
use tokio_stream::{StreamExt, StreamMap};

use super::TypedClient;
use super::codec::RawCodec;
use super::error::Error;
use super::watch::{WatchConfig, WatchEvent, WatchStream};

/// One change of a key, without its revision (changes are handed out per revision).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyChange {
    /// The key.
    pub key: String,
    /// The new value; `None` for a deletion (or a value that could not be read).
    pub value: Option<Vec<u8>>,
}

/// A watch stream that knows the revision to resume from after what it yielded.
pub trait RevisionStream: Stream<Item = WatchEvent<Vec<u8>>> + Unpin {
    /// The revision to watch from to continue exactly after the events yielded so far.
    fn resume_revision(&self) -> i64;
}

impl RevisionStream for WatchStream<Vec<u8>> {
    fn resume_revision(&self) -> i64 {
        WatchStream::resume_revision(self)
    }
}

/// Why a merged watch stopped.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The revision to continue from is compacted, or the store is behind what was seen
    /// (it was replaced): list everything again.
    #[error("list again: {0}")]
    Relist(#[source] Error),
    /// A watch broke: resume from [`MergedWatch::resume_point`].
    #[error("watch broken: {0}")]
    Broken(#[source] Error),
    /// Every watch stream ended.
    #[error("every watch stream ended")]
    Ended,
}

/// Several prefix watches handed out as one stream of whole revisions, in order.
pub struct MergedWatch<S> {
    streams: StreamMap<usize, S>,
    frontiers: Vec<i64>,
    pending: BTreeMap<i64, Vec<KeyChange>>,
    ready: VecDeque<(i64, Vec<KeyChange>)>,
    early: fn(&str) -> bool,
}

impl<S> std::fmt::Debug for MergedWatch<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergedWatch")
            .field("frontiers", &self.frontiers)
            .field("pending", &self.pending.len())
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

impl MergedWatch<WatchStream<Vec<u8>>> {
    /// Watches `prefixes` from revision `from`, asking for progress after `progress` of
    /// silence; writes of keys for which `early` holds may be handed out ahead of the other
    /// watches' progress.
    pub async fn open(
        client: &TypedClient<RawCodec>,
        prefixes: &[String],
        from: i64,
        progress: Duration,
        early: fn(&str) -> bool,
    ) -> Result<Self, Error> {
        let config = WatchConfig {
            progress_request_interval: Some(progress),
            buffer: 64,
        };
        let mut streams = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            streams.push(client.watch_prefix_with(prefix, from, &config).await?);
        }
        Ok(MergedWatch::new(streams, from, early))
    }
}

impl<S: RevisionStream> MergedWatch<S> {
    /// Merges `streams`, each watching from revision `from`.
    pub fn new(streams: Vec<S>, from: i64, early: fn(&str) -> bool) -> Self {
        let frontiers = vec![from; streams.len()];
        let mut map = StreamMap::new();
        for (i, stream) in streams.into_iter().enumerate() {
            map.insert(i, stream);
        }
        MergedWatch {
            streams: map,
            frontiers,
            pending: BTreeMap::new(),
            ready: VecDeque::new(),
            early,
        }
    }

    /// The revision to watch from to continue exactly after what was handed out.
    pub fn resume_point(&self) -> i64 {
        let floor = self.frontiers.iter().copied().min().unwrap_or(0);
        self.pending.keys().next().map_or(floor, |r| floor.min(*r))
    }

    /// The next whole revision: its number and its changes.
    pub async fn next(&mut self) -> Result<(i64, Vec<KeyChange>), MergeError> {
        loop {
            let floor = self.frontiers.iter().copied().min().unwrap_or(0);
            // Whatever can go out, in revision order (a write handed out early never
            // overtakes a change of its own key: it was only taken while none was queued).
            let ready = self.ready.front().map(|(r, _)| *r);
            let due = self.pending.keys().next().copied().filter(|r| *r < floor);
            match (ready, due) {
                (Some(r), Some(d)) if d < r => {
                    return Ok(self.pending.pop_first().unwrap_or_default());
                }
                (Some(_), _) => return Ok(self.ready.pop_front().unwrap_or_default()),
                (None, Some(_)) => return Ok(self.pending.pop_first().unwrap_or_default()),
                (None, None) => {}
            }
            let Some((i, event)) = self.streams.next().await else {
                return Err(MergeError::Ended);
            };
            let resume = self
                .streams
                .iter()
                .find(|(k, _)| *k == i)
                .map(|(_, s)| s.resume_revision());
            match event {
                WatchEvent::Put {
                    key,
                    value,
                    mod_revision,
                    ..
                } => {
                    let change = KeyChange {
                        key,
                        value: Some(value),
                    };
                    // Only a queued change of the same key must stay ahead of it.
                    let queued = || self.pending.values().flatten().any(|e| e.key == change.key);
                    if (self.early)(&change.key) && !queued() {
                        match self.ready.back_mut() {
                            Some((r, batch)) if *r == mod_revision => batch.push(change),
                            _ => self.ready.push_back((mod_revision, vec![change])),
                        }
                    } else {
                        self.pending.entry(mod_revision).or_default().push(change);
                    }
                }
                WatchEvent::Delete { key, mod_revision }
                | WatchEvent::Invalid {
                    key, mod_revision, ..
                } => self
                    .pending
                    .entry(mod_revision)
                    .or_default()
                    .push(KeyChange { key, value: None }),
                WatchEvent::Progress { .. } => {}
                WatchEvent::Compacted { compact_revision } => {
                    return Err(MergeError::Relist(Error::Compacted {
                        op: "watch",
                        revision: compact_revision,
                    }));
                }
                WatchEvent::Broken { error, .. } => {
                    // The store is behind us: it was replaced.
                    if matches!(error, Error::FutureRevision { .. }) {
                        return Err(MergeError::Relist(error));
                    }
                    return Err(MergeError::Broken(error));
                }
            }
            if let Some(resume) = resume {
                self.frontiers[i] = self.frontiers[i].max(resume);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A scripted watch: each event with the resume revision the real stream would report
    /// after yielding it; then it waits forever.
    struct Script {
        events: VecDeque<(WatchEvent<Vec<u8>>, i64)>,
        resume: i64,
    }

    impl Script {
        fn new(from: i64, events: Vec<(WatchEvent<Vec<u8>>, i64)>) -> Self {
            Script {
                events: events.into(),
                resume: from,
            }
        }
    }

    impl Stream for Script {
        type Item = WatchEvent<Vec<u8>>;
        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            match self.events.pop_front() {
                Some((event, resume)) => {
                    self.resume = resume;
                    Poll::Ready(Some(event))
                }
                None => Poll::Pending,
            }
        }
    }

    impl RevisionStream for Script {
        fn resume_revision(&self) -> i64 {
            self.resume
        }
    }

    fn put(key: &str, rev: i64) -> (WatchEvent<Vec<u8>>, i64) {
        (
            WatchEvent::Put {
                key: key.to_owned(),
                value: key.as_bytes().to_vec(),
                mod_revision: rev,
                create_revision: rev,
            },
            rev + 1,
        )
    }

    fn del(key: &str, rev: i64) -> (WatchEvent<Vec<u8>>, i64) {
        (
            WatchEvent::Delete {
                key: key.to_owned(),
                mod_revision: rev,
            },
            rev + 1,
        )
    }

    fn progress(next: i64) -> (WatchEvent<Vec<u8>>, i64) {
        (WatchEvent::Progress { revision: next - 1 }, next)
    }

    fn keys(changes: &[KeyChange]) -> Vec<(&str, bool)> {
        changes
            .iter()
            .map(|c| (c.key.as_str(), c.value.is_some()))
            .collect()
    }

    fn never(_: &str) -> bool {
        false
    }

    fn entries_early(key: &str) -> bool {
        key.starts_with("entry/")
    }

    /// Polls `next` once with a no-op waker: `None` while it waits for the streams.
    fn try_next(
        watch: &mut MergedWatch<Script>,
    ) -> Option<Result<(i64, Vec<KeyChange>), MergeError>> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let fut = watch.next();
        futures::pin_mut!(fut);
        match fut.poll(&mut cx) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    #[test]
    fn a_revision_spanning_prefixes_comes_out_whole() {
        let a = Script::new(5, vec![del("canary/a", 5), progress(7)]);
        let b = Script::new(5, vec![del("state/x", 5), progress(7)]);
        let mut w = MergedWatch::new(vec![a, b], 5, never);
        let (rev, changes) = try_next(&mut w).unwrap().unwrap();
        assert_eq!(rev, 5);
        let mut got = keys(&changes);
        got.sort();
        assert_eq!(got, vec![("canary/a", false), ("state/x", false)]);
        // Nothing more: both watches are past 6.
        assert!(try_next(&mut w).is_none());
        assert_eq!(w.resume_point(), 7);
    }

    #[test]
    fn a_revision_waits_for_the_slower_watch() {
        let a = Script::new(5, vec![put("x", 5), put("y", 6)]);
        let b = Script::new(5, vec![]);
        let mut w = MergedWatch::new(vec![a, b], 5, never);
        // b has said nothing: 5 may still have changes under b's prefix.
        assert!(try_next(&mut w).is_none());
        assert_eq!(w.resume_point(), 5);
        w.streams
            .iter_mut()
            .find(|(k, _)| *k == 1)
            .unwrap()
            .1
            .events
            .push_back(progress(6));
        assert_eq!(try_next(&mut w).unwrap().unwrap().0, 5);
        // 6 waits until b has passed it too.
        assert!(try_next(&mut w).is_none());
        assert_eq!(w.resume_point(), 6);
    }

    #[test]
    fn early_writes_go_out_at_once_but_never_overtake_their_own_key() {
        let a = Script::new(
            5,
            vec![put("entry/1", 5), del("entry/2", 6), put("entry/2", 7)],
        );
        let b = Script::new(5, vec![]);
        let mut w = MergedWatch::new(vec![a, b], 5, entries_early);
        // entry/1 is early and nothing of its key is queued: out before b's progress.
        let (rev, changes) = try_next(&mut w).unwrap().unwrap();
        assert_eq!((rev, keys(&changes)), (5, vec![("entry/1", true)]));
        // entry/2's deletion (6) is queued, so its write (7) must wait behind it.
        assert!(try_next(&mut w).is_none());
        w.streams
            .iter_mut()
            .find(|(k, _)| *k == 1)
            .unwrap()
            .1
            .events
            .push_back(progress(8));
        let (rev, changes) = try_next(&mut w).unwrap().unwrap();
        assert_eq!((rev, keys(&changes)), (6, vec![("entry/2", false)]));
        let (rev, changes) = try_next(&mut w).unwrap().unwrap();
        assert_eq!((rev, keys(&changes)), (7, vec![("entry/2", true)]));
    }

    #[test]
    fn compaction_and_a_store_behind_us_mean_list_again_other_breaks_resume() {
        let compacted = Script::new(
            5,
            vec![(
                WatchEvent::Compacted {
                    compact_revision: 9,
                },
                5,
            )],
        );
        let mut w = MergedWatch::new(vec![compacted], 5, never);
        assert!(matches!(
            try_next(&mut w),
            Some(Err(MergeError::Relist(Error::Compacted {
                revision: 9,
                ..
            })))
        ));

        let future = Script::new(
            5,
            vec![(
                WatchEvent::Broken {
                    error: Error::FutureRevision {
                        op: "watch",
                        revision: 5,
                    },
                    resume_from: 5,
                },
                5,
            )],
        );
        let mut w = MergedWatch::new(vec![future], 5, never);
        assert!(matches!(try_next(&mut w), Some(Err(MergeError::Relist(_)))));

        let broken = Script::new(
            5,
            vec![
                put("x", 5),
                (
                    WatchEvent::Broken {
                        error: Error::Protocol {
                            op: "watch",
                            detail: "gone".to_owned(),
                        },
                        resume_from: 6,
                    },
                    6,
                ),
            ],
        );
        let mut w = MergedWatch::new(vec![broken], 5, never);
        assert_eq!(try_next(&mut w).unwrap().unwrap().0, 5);
        assert!(matches!(try_next(&mut w), Some(Err(MergeError::Broken(_)))));
        assert_eq!(w.resume_point(), 6);
    }
}
