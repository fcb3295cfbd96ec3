//! Prefix watches as a stream of typed events, with compaction, breakage and progress
//! surfaced as events so callers know when to relist or resume.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::proto::{PbEvent, PbKeyValue};
use etcd_client::{WatchOptions, WatchResponse};
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

use super::codec::Codec;
use super::error::{Error, Result, classify};
use super::{Members, StoreClient, prefix_range_end};

/// How a watch behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchConfig {
    /// When no response arrived for this long, ask the store for a progress notification,
    /// so an idle watcher still learns the current revision (surfaced as
    /// [`WatchEvent::Progress`]). `None` relies on the store's own periodic notifications
    /// (etcd: every 10 minutes by default).
    pub progress_request_interval: Option<Duration>,
    /// How many store responses may wait for the consumer before the watch stops reading
    /// from the store (back-pressure).
    pub buffer: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            progress_request_interval: Some(Duration::from_secs(5)),
            buffer: 64,
        }
    }
}

/// One item of a watch stream. After [`WatchEvent::Compacted`] or [`WatchEvent::Broken`] the
/// stream ends.
#[derive(Debug)]
pub enum WatchEvent<V> {
    /// `key` was created or updated.
    Put {
        /// The key.
        key: String,
        /// The decoded new value.
        value: V,
        /// The revision of this change.
        mod_revision: i64,
        /// The revision at which the key was (last) created; equal to `mod_revision` for a
        /// creation.
        create_revision: i64,
    },
    /// `key` was deleted (or its lease expired).
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        mod_revision: i64,
    },
    /// `key` was written with a value (or key) the codec cannot decode. Treat it like a
    /// deletion of what was known for the key, and report the error.
    Invalid {
        /// The key, lossily converted if it is not UTF-8.
        key: String,
        /// The revision of this change.
        mod_revision: i64,
        /// The decode error, naming the key.
        error: Error,
    },
    /// No event is missing up to `revision`: the watcher is current as of it.
    Progress {
        /// The store revision the watcher has caught up with.
        revision: i64,
    },
    /// The requested start revision (or a revision the watcher still had to deliver) was
    /// compacted: events were lost. The caller must list again and watch from the listed
    /// revision + 1. Terminal.
    Compacted {
        /// The store's compaction revision; revisions at or below it are gone.
        compact_revision: i64,
    },
    /// The watch stream failed (connection lost, store restarted, canceled by the store).
    /// Every event before `resume_from` was delivered: watch again from `resume_from`.
    /// Terminal.
    Broken {
        /// The revision to resume from.
        resume_from: i64,
        /// Why the stream failed.
        error: Error,
    },
}

impl<V> WatchEvent<V> {
    /// The revision of a change event (`Put`, `Delete`, `Invalid`), or the revision of a
    /// progress notification.
    pub fn revision(&self) -> Option<i64> {
        match self {
            WatchEvent::Put { mod_revision, .. }
            | WatchEvent::Delete { mod_revision, .. }
            | WatchEvent::Invalid { mod_revision, .. } => Some(*mod_revision),
            WatchEvent::Progress { revision } => Some(*revision),
            WatchEvent::Compacted { .. } | WatchEvent::Broken { .. } => None,
        }
    }

    /// Whether the stream ends after this event.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            WatchEvent::Compacted { .. } | WatchEvent::Broken { .. }
        )
    }
}

/// A live prefix watch. Dropping it cancels the watch on the store.
#[derive(Debug)]
pub struct WatchStream<V> {
    receiver: mpsc::Receiver<Vec<WatchEvent<V>>>,
    buffer: VecDeque<WatchEvent<V>>,
    resume_from: i64,
    finished: bool,
}

impl<V> WatchStream<V> {
    /// The revision to watch from to continue exactly after the events yielded so far.
    pub fn resume_revision(&self) -> i64 {
        self.resume_from
    }

    fn note_yielded(&mut self, event: &WatchEvent<V>) {
        match event {
            WatchEvent::Put { mod_revision, .. }
            | WatchEvent::Delete { mod_revision, .. }
            | WatchEvent::Invalid { mod_revision, .. } => {
                // A revision's events arrive in one response: only move past the revision
                // once its last event was yielded.
                let more_of_same = self
                    .buffer
                    .front()
                    .and_then(WatchEvent::revision)
                    .is_some_and(|next| next == *mod_revision);
                let next = if more_of_same {
                    *mod_revision
                } else {
                    *mod_revision + 1
                };
                self.resume_from = self.resume_from.max(next);
            }
            WatchEvent::Progress { revision } => {
                self.resume_from = self.resume_from.max(revision + 1);
            }
            WatchEvent::Broken { resume_from, .. } => {
                self.resume_from = self.resume_from.max(*resume_from);
                self.finished = true;
            }
            WatchEvent::Compacted { .. } => self.finished = true,
        }
    }
}

// The stream never pins its events: they are moved out of the buffer by value.
impl<V> Unpin for WatchStream<V> {}

impl<V> Stream for WatchStream<V> {
    type Item = WatchEvent<V>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.buffer.pop_front() {
                this.note_yielded(&event);
                return Poll::Ready(Some(event));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match this.receiver.poll_recv(cx) {
                Poll::Ready(Some(batch)) => this.buffer.extend(batch),
                Poll::Ready(None) => {
                    this.finished = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Converts one store event into a typed event.
fn convert_event<C: Codec>(codec: &C, event: PbEvent) -> Option<WatchEvent<C::Value>> {
    let PbKeyValue {
        key,
        value,
        create_revision,
        mod_revision,
        ..
    } = event.kv?;
    let key = match String::from_utf8(key) {
        Ok(key) => key,
        Err(err) => {
            let lossy = String::from_utf8_lossy(err.as_bytes()).into_owned();
            return Some(WatchEvent::Invalid {
                key: lossy.clone(),
                mod_revision,
                error: Error::Decode {
                    key: lossy,
                    source: Box::new(err.utf8_error()),
                },
            });
        }
    };
    // 0 = PUT, 1 = DELETE in etcd's mvccpb.
    Some(match event.r#type {
        0 => match codec.decode(value) {
            Ok(value) => WatchEvent::Put {
                key,
                value,
                mod_revision,
                create_revision,
            },
            Err(err) => WatchEvent::Invalid {
                key: key.clone(),
                mod_revision,
                error: Error::Decode {
                    key,
                    source: Box::new(err),
                },
            },
        },
        1 => WatchEvent::Delete { key, mod_revision },
        other => WatchEvent::Invalid {
            key: key.clone(),
            mod_revision,
            error: Error::Protocol {
                op: "watch",
                detail: format!("unknown event type {other} for key {key:?}"),
            },
        },
    })
}

/// What one store response means for the stream.
enum Step<V> {
    /// Send these events and keep going.
    Events(Vec<WatchEvent<V>>, i64),
    /// Nothing to tell the consumer.
    Nothing,
    /// Send this terminal event and stop.
    End(WatchEvent<V>),
}

/// Interprets one watch response. `next` is the revision the stream would resume from.
fn interpret<C: Codec>(
    codec: &C,
    endpoints: &str,
    resp: WatchResponse,
    next: i64,
) -> Step<C::Value> {
    if resp.compact_revision() > 0 {
        return Step::End(WatchEvent::Compacted {
            compact_revision: resp.compact_revision(),
        });
    }
    if resp.canceled() {
        let reason = resp.cancel_reason().to_owned();
        let error = if reason.contains("future revision") {
            Error::FutureRevision {
                op: "watch",
                revision: next,
            }
        } else if reason.contains("no leader") || reason.is_empty() {
            Error::Unavailable {
                op: "watch",
                endpoints: endpoints.to_owned(),
                source: etcd_client::Error::WatchError(if reason.is_empty() {
                    "watch canceled by the store".to_owned()
                } else {
                    reason
                }),
            }
        } else {
            Error::Rejected {
                op: "watch",
                endpoints: endpoints.to_owned(),
                source: etcd_client::Error::WatchError(reason),
            }
        };
        return Step::End(WatchEvent::Broken {
            resume_from: next,
            error,
        });
    }
    let header_revision = resp.header().map(|h| h.revision()).unwrap_or_default();
    let created = resp.created();
    let events = resp.0.events;
    if events.is_empty() {
        if created || header_revision <= 0 {
            return Step::Nothing;
        }
        // A progress notification: everything up to the header revision was delivered.
        // Never report going backwards (a notification can lag behind delivered events).
        let revision = header_revision.max(next - 1);
        return Step::Events(vec![WatchEvent::Progress { revision }], revision + 1);
    }
    let mut max_revision = next - 1;
    let converted: Vec<_> = events
        .into_iter()
        .filter_map(|event| convert_event(codec, event))
        .inspect(|event| {
            if let Some(revision) = event.revision() {
                max_revision = max_revision.max(revision);
            }
        })
        .collect();
    Step::Events(converted, max_revision + 1)
}

/// Opens a prefix watch. `from_revision` 0 means "from now".
pub(crate) async fn watch_prefix<C: Codec>(
    client: &StoreClient,
    codec: C,
    prefix: &str,
    from_revision: i64,
    config: &WatchConfig,
) -> Result<WatchStream<C::Value>> {
    let timeout = client.request_timeout();
    let mut options = WatchOptions::new()
        .with_range(prefix_range_end(prefix.as_bytes()))
        .with_progress_notify();
    if from_revision > 0 {
        options = options.with_start_revision(from_revision);
    }
    let key = if prefix.is_empty() {
        vec![0]
    } else {
        prefix.as_bytes().to_vec()
    };
    // Opened on the pinned member; one that fails moves the pin and the next one is tried.
    let members = client.members().clone();
    let mut tries = members.len();
    let (on, endpoints, stream, first) = loop {
        let (index, pinned) = members.pinned();
        let endpoints = members.endpoint(index).to_owned();
        let mut watch_client = StoreClient::watch_client_of(&pinned);
        let open = async {
            let mut stream = watch_client
                .watch(key.clone(), Some(options.clone()))
                .await?;
            let first = stream.message().await?;
            Ok::<_, etcd_client::Error>((stream, first))
        };
        let error = match tokio::time::timeout(timeout, open).await {
            Ok(Ok((stream, first))) => break (index, endpoints, stream, first),
            Ok(Err(err)) => classify("watch", &endpoints, Some(from_revision), None, err),
            Err(_) => Error::Timeout {
                op: "watch",
                endpoints,
                after: timeout,
            },
        };
        tries -= 1;
        if !error.is_retryable() {
            return Err(error);
        }
        members.fail_over(index, &error);
        if tries == 0 {
            return Err(error);
        }
    };
    let Some(first) = first else {
        return Err(Error::Protocol {
            op: "watch",
            detail: "the store closed the watch stream before confirming it".to_owned(),
        });
    };
    if !first.created() {
        return Err(Error::Protocol {
            op: "watch",
            detail: "the first watch response is not a creation confirmation".to_owned(),
        });
    }
    let mut next = if from_revision > 0 {
        from_revision
    } else {
        first.header().map(|h| h.revision()).unwrap_or_default() + 1
    };
    let resume_from = next;
    let (sender, receiver) = mpsc::channel(config.buffer.max(1));
    let mut initial = Vec::new();
    let mut ended = false;
    match interpret(&codec, &endpoints, first, next) {
        Step::Events(events, new_next) => {
            next = new_next;
            initial = events;
        }
        Step::Nothing => {}
        Step::End(event) => {
            initial.push(event);
            ended = true;
        }
    }
    let watch = WatchStream {
        receiver,
        buffer: initial.into(),
        resume_from,
        finished: ended,
    };
    if !ended {
        let span = tracing::debug_span!("watch", endpoints = %endpoints, prefix, from_revision);
        tokio::spawn(
            run(
                codec,
                (members, on),
                endpoints,
                stream,
                sender,
                next,
                config.progress_request_interval,
            )
            .instrument(span),
        );
    }
    Ok(watch)
}

/// The task that reads one store watch stream and feeds the consumer.
/// Pumps one watch stream; `on` is the member it runs on, so a break that is the member's
/// fault moves the client's pin and the caller's next watch opens elsewhere.
async fn run<C: Codec>(
    codec: C,
    on: (Arc<Members>, usize),
    endpoints: String,
    mut stream: etcd_client::WatchStream,
    sender: mpsc::Sender<Vec<WatchEvent<C::Value>>>,
    mut next: i64,
    progress_interval: Option<Duration>,
) {
    let period = progress_interval.unwrap_or(Duration::from_secs(3600));
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            biased;
            _ = sender.closed() => {
                tracing::debug!("watch consumer gone, canceling");
                return;
            }
            message = stream.message() => message,
            _ = ticker.tick(), if progress_interval.is_some() => {
                if let Err(err) = stream.request_progress().await {
                    tracing::debug!(error = %err, "progress request failed");
                }
                continue;
            }
        };
        ticker.reset();
        let step = match message {
            Ok(Some(resp)) => interpret(&codec, &endpoints, resp, next),
            Ok(None) => Step::End(WatchEvent::Broken {
                resume_from: next,
                error: Error::Unavailable {
                    op: "watch",
                    endpoints: endpoints.clone(),
                    source: etcd_client::Error::WatchError(
                        "the store closed the watch stream".to_owned(),
                    ),
                },
            }),
            Err(err) => Step::End(WatchEvent::Broken {
                resume_from: next,
                error: classify("watch", &endpoints, Some(next), None, err),
            }),
        };
        match step {
            Step::Nothing => {}
            Step::Events(events, new_next) => {
                next = new_next;
                if events.is_empty() {
                    continue;
                }
                if sender.send(events).await.is_err() {
                    return;
                }
            }
            Step::End(event) => {
                if let WatchEvent::Broken { error, .. } = &event {
                    tracing::info!(error = %error, resume_from = next, "watch broken");
                    if error.is_retryable() {
                        on.0.fail_over(on.1, error);
                    }
                }
                let _ = sender.send(vec![event]).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::codec::StringCodec;

    fn stream_of(events: Vec<WatchEvent<String>>) -> WatchStream<String> {
        let (_sender, receiver) = mpsc::channel(1);
        WatchStream {
            receiver,
            buffer: events.into(),
            resume_from: 5,
            finished: true,
        }
    }

    fn put(key: &str, revision: i64) -> WatchEvent<String> {
        WatchEvent::Put {
            key: key.to_owned(),
            value: String::new(),
            mod_revision: revision,
            create_revision: revision,
        }
    }

    #[tokio::test]
    async fn resume_revision_waits_for_the_whole_revision() {
        use futures::StreamExt;
        let mut stream = stream_of(vec![
            put("a", 7),
            put("b", 7),
            WatchEvent::Delete {
                key: "c".into(),
                mod_revision: 9,
            },
            WatchEvent::Progress { revision: 12 },
        ]);
        assert_eq!(stream.resume_revision(), 5);
        stream.next().await.unwrap();
        assert_eq!(stream.resume_revision(), 7, "b at revision 7 still pending");
        stream.next().await.unwrap();
        assert_eq!(stream.resume_revision(), 8);
        stream.next().await.unwrap();
        assert_eq!(stream.resume_revision(), 10);
        stream.next().await.unwrap();
        assert_eq!(stream.resume_revision(), 13);
        assert!(stream.next().await.is_none());
    }

    #[test]
    fn undecodable_value_becomes_invalid_naming_the_key() {
        let event = PbEvent {
            r#type: 0,
            kv: Some(PbKeyValue {
                key: b"cilium/state/x".to_vec(),
                value: vec![0xff, 0xfe],
                create_revision: 3,
                mod_revision: 4,
                version: 2,
                lease: 0,
            }),
            prev_kv: None,
        };
        match convert_event(&StringCodec, event) {
            Some(WatchEvent::Invalid {
                key,
                mod_revision: 4,
                error: Error::Decode { key: error_key, .. },
            }) => {
                assert_eq!(key, "cilium/state/x");
                assert_eq!(error_key, "cilium/state/x");
            }
            other => panic!("{other:?}"),
        }
    }
}
