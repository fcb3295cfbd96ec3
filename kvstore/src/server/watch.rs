//! Watch streams: one task per gRPC stream serves all of its watchers.
//!
//! A stream subscribes to the committed-events feed *before* it reads anything, so a watcher
//! that starts in the past catches up from storage up to some durable revision and then takes
//! the rest from the feed: no gap, and revisions it already has are skipped by number. A stream
//! that falls behind the feed catches up from storage the same way, so a slow client costs
//! memory in no one else's process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::proto::{PbEvent, PbWatchRequest, PbWatchRequestUnion, PbWatchResponse};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::access::Role;
use super::applier::{Committed, Shared};
use super::mvcc::{EVENT_DELETE, EVENT_PUT, KeyRange, KvError};
use super::storage::Revision;

/// etcd puts the whole gRPC error text of a permission denial into the cancel reason.
const WATCH_PERMISSION_DENIED: &str =
    "rpc error: code = PermissionDenied desc = etcdserver: permission denied";
const FILTER_NOPUT: i32 = 0;
const FILTER_NODELETE: i32 = 1;
/// Catch-up responses hold about this many events, never splitting one revision.
const CATCH_UP_EVENTS: usize = 1000;
const SCAN_CHUNK: usize = 4096;

type Reply = Result<PbWatchResponse, Status>;

#[derive(Debug)]
struct Watcher {
    range: KeyRange,
    /// The next revision this watcher has not been given.
    next_rev: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    /// Events went out since the last progress tick, which makes a notification redundant.
    sent_since_tick: bool,
}

impl Watcher {
    fn wants(&self, event: &PbEvent) -> bool {
        let Some(kv) = &event.kv else { return false };
        if (event.r#type == EVENT_PUT && self.no_put)
            || (event.r#type == EVENT_DELETE && self.no_delete)
        {
            return false;
        }
        self.range.contains(&kv.key)
    }

    fn shape(&self, event: &PbEvent) -> PbEvent {
        PbEvent {
            r#type: event.r#type,
            kv: event.kv.clone(),
            prev_kv: if self.prev_kv {
                event.prev_kv.clone()
            } else {
                None
            },
        }
    }
}

/// Why a stream stopped serving.
enum Stop {
    /// The client went away (its response stream was dropped).
    ClientGone,
}

/// Serves one Watch RPC until the client goes away or the server shuts down.
pub async fn serve(
    shared: Arc<Shared>,
    role: Role,
    mut requests: Streaming<PbWatchRequest>,
    tx: mpsc::Sender<Reply>,
    progress_interval: Duration,
    cancel: CancellationToken,
) {
    let live = shared.subscribe();
    let mut stream = WatchStream {
        shared,
        role,
        tx,
        watchers: BTreeMap::new(),
        next_id: 0,
    };
    let mut live = live;
    let mut requests_open = true;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + progress_interval,
        progress_interval,
    );
    let outcome: Result<(), Stop> = async {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = stream.tx.closed() => return Err(Stop::ClientGone),
                request = requests.next(), if requests_open => match request {
                    Some(Ok(request)) => stream.handle(request, &mut live).await?,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "watch request stream failed");
                        requests_open = false;
                    }
                    // A half-closed stream keeps delivering events, as etcd's does.
                    None => requests_open = false,
                },
                committed = live.recv() => match committed {
                    Ok(committed) => stream.deliver(&committed).await?,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "watch stream fell behind; catching up from storage");
                        stream.catch_up_all().await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = tick.tick() => {
                    stream.drain(&mut live).await?;
                    stream.progress_tick().await?;
                }
            }
        }
    }
    .await;
    if let Err(Stop::ClientGone) = outcome {
        tracing::debug!("watch client went away");
    }
}

struct WatchStream {
    shared: Arc<Shared>,
    /// What the client's certificate allows; checked on every watch it creates.
    role: Role,
    tx: mpsc::Sender<Reply>,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
}

impl WatchStream {
    async fn send(&self, response: PbWatchResponse) -> Result<(), Stop> {
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| Stop::ClientGone)
    }

    fn header_at(&self, revision: i64) -> PbWatchResponse {
        PbWatchResponse {
            header: Some(self.shared.read().header(revision)),
            ..PbWatchResponse::default()
        }
    }

    async fn handle(
        &mut self,
        request: PbWatchRequest,
        live: &mut broadcast::Receiver<Arc<Committed>>,
    ) -> Result<(), Stop> {
        match request.request_union {
            Some(PbWatchRequestUnion::CreateRequest(create)) => {
                let visible = self.shared.visible();
                let id = if create.watch_id != 0 {
                    create.watch_id
                } else {
                    while self.watchers.contains_key(&self.next_id) {
                        self.next_id += 1;
                    }
                    self.next_id
                };
                if self.watchers.contains_key(&id) || id < 0 {
                    return self
                        .send(PbWatchResponse {
                            watch_id: -1,
                            created: true,
                            canceled: true,
                            cancel_reason: "mvcc: duplicate watch ID provided on the WatchStream"
                                .into(),
                            ..self.header_at(visible)
                        })
                        .await;
                }
                let key = if create.key.is_empty() {
                    vec![0]
                } else {
                    create.key
                };
                let range = KeyRange::new(&key, &create.range_end);
                if !self.role.can_read(&range) {
                    return self
                        .send(PbWatchResponse {
                            watch_id: create.watch_id,
                            created: true,
                            canceled: true,
                            cancel_reason: WATCH_PERMISSION_DENIED.into(),
                            ..self.header_at(visible)
                        })
                        .await;
                }
                if let KeyRange::Interval {
                    start,
                    end: Some(end),
                } = &range
                    && start >= end
                {
                    return self
                        .send(PbWatchResponse {
                            watch_id: -1,
                            created: true,
                            canceled: true,
                            cancel_reason: "mvcc: watcher range is empty".into(),
                            ..self.header_at(visible)
                        })
                        .await;
                }
                let watcher = Watcher {
                    range,
                    next_rev: if create.start_revision > 0 {
                        create.start_revision
                    } else {
                        visible + 1
                    },
                    prev_kv: create.prev_kv,
                    no_put: create.filters.contains(&FILTER_NOPUT),
                    no_delete: create.filters.contains(&FILTER_NODELETE),
                    progress_notify: create.progress_notify,
                    sent_since_tick: false,
                };
                self.send(PbWatchResponse {
                    watch_id: id,
                    created: true,
                    ..self.header_at(visible)
                })
                .await?;
                let compacted = self.shared.read().compact_revision();
                if watcher.next_rev < compacted {
                    return self.send_compacted(id, compacted).await;
                }
                self.watchers.insert(id, watcher);
                self.catch_up(id).await
            }
            Some(PbWatchRequestUnion::CancelRequest(cancel)) => {
                if self.watchers.remove(&cancel.watch_id).is_some() {
                    let response = PbWatchResponse {
                        watch_id: cancel.watch_id,
                        canceled: true,
                        ..self.header_at(self.shared.visible())
                    };
                    self.send(response).await?;
                }
                Ok(())
            }
            Some(PbWatchRequestUnion::ProgressRequest(_)) => {
                self.drain(live).await?;
                let visible = self.shared.visible();
                let revision = self
                    .watchers
                    .values()
                    .map(|w| w.next_rev - 1)
                    .min()
                    .map_or(visible, |r| r.min(visible));
                let response = PbWatchResponse {
                    watch_id: -1,
                    ..self.header_at(revision)
                };
                self.send(response).await
            }
            None => Ok(()),
        }
    }

    async fn send_compacted(&self, id: i64, compacted: i64) -> Result<(), Stop> {
        let response = PbWatchResponse {
            watch_id: id,
            compact_revision: compacted,
            canceled: true,
            ..self.header_at(self.shared.visible())
        };
        self.send(response).await
    }

    /// Processes whatever the feed already holds, so a reported revision covers it.
    async fn drain(&mut self, live: &mut broadcast::Receiver<Arc<Committed>>) -> Result<(), Stop> {
        loop {
            match live.try_recv() {
                Ok(committed) => self.deliver(&committed).await?,
                Err(broadcast::error::TryRecvError::Lagged(_)) => self.catch_up_all().await?,
                Err(_) => return Ok(()),
            }
        }
    }

    async fn deliver(&mut self, committed: &Committed) -> Result<(), Stop> {
        // A stream behind what this commit starts from (a restored image skipped revisions
        // past it) reads them from storage first.
        let behind: Vec<i64> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.next_rev < committed.from)
            .map(|(id, _)| *id)
            .collect();
        for id in behind {
            self.catch_up(id).await?;
        }
        let header = self.shared.read().header(committed.revision);
        let mut out = Vec::new();
        for (id, watcher) in &mut self.watchers {
            if watcher.next_rev > committed.revision {
                continue;
            }
            let events: Vec<PbEvent> = committed
                .events
                .iter()
                .filter(|e| {
                    e.kv.as_ref()
                        .is_some_and(|kv| kv.mod_revision >= watcher.next_rev)
                })
                .filter(|e| watcher.wants(e))
                .map(|e| watcher.shape(e))
                .collect();
            watcher.next_rev = committed.revision + 1;
            if !events.is_empty() {
                watcher.sent_since_tick = true;
                out.push(PbWatchResponse {
                    header: Some(header),
                    watch_id: *id,
                    events,
                    ..PbWatchResponse::default()
                });
            }
        }
        for response in out {
            self.send(response).await?;
        }
        Ok(())
    }

    async fn catch_up_all(&mut self) -> Result<(), Stop> {
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            self.catch_up(id).await?;
        }
        Ok(())
    }

    /// Replays a watcher's history from storage up to the current durable revision.
    async fn catch_up(&mut self, id: i64) -> Result<(), Stop> {
        let visible = self.shared.visible();
        let Some(watcher) = self.watchers.get(&id) else {
            return Ok(());
        };
        if watcher.next_rev > visible {
            return Ok(());
        }
        let mut from = Revision::new(watcher.next_rev, 0);
        let mut pending: Vec<PbEvent> = Vec::new();
        loop {
            let records = match self.shared.storage().scan(from, visible, SCAN_CHUNK) {
                Ok(records) => records,
                Err(error) => return self.fail(id, &error.into()).await,
            };
            let done = records.len() < SCAN_CHUNK;
            for (rev, record) in records {
                from = Revision::new(rev.main, rev.sub + 1);
                let watcher = &self.watchers[&id];
                if !watcher.range.contains(&record.key) {
                    continue;
                }
                let (kind, kv) = if record.tombstone {
                    let kv = etcd_client::proto::PbKeyValue {
                        key: record.key,
                        mod_revision: rev.main,
                        ..Default::default()
                    };
                    (EVENT_DELETE, kv)
                } else {
                    let kv = etcd_client::proto::PbKeyValue {
                        key: record.key,
                        create_revision: record.create_revision,
                        mod_revision: rev.main,
                        version: record.version,
                        value: record.value,
                        lease: record.lease,
                    };
                    (EVENT_PUT, kv)
                };
                let mut event = PbEvent {
                    r#type: kind,
                    kv: Some(kv),
                    prev_kv: None,
                };
                if !watcher.wants(&event) {
                    continue;
                }
                if watcher.prev_kv {
                    let key = &event.kv.as_ref().expect("set above").key;
                    let prev = self.shared.read().prev_kv(key, rev);
                    match prev {
                        Ok(prev) => event.prev_kv = prev,
                        Err(error) => return self.fail(id, &error).await,
                    }
                }
                let starts_new_revision = pending
                    .last()
                    .and_then(|e| e.kv.as_ref())
                    .is_some_and(|kv| kv.mod_revision != rev.main);
                if pending.len() >= CATCH_UP_EVENTS && starts_new_revision {
                    self.send_events(id, std::mem::take(&mut pending)).await?;
                }
                pending.push(event);
            }
            if done {
                break;
            }
        }
        // Compaction may have removed part of what was just scanned.
        let compacted = self.shared.read().compact_revision();
        let watcher_next = self.watchers[&id].next_rev;
        if watcher_next < compacted {
            self.watchers.remove(&id);
            return self.send_compacted(id, compacted).await;
        }
        if !pending.is_empty() {
            self.send_events(id, pending).await?;
        }
        if let Some(w) = self.watchers.get_mut(&id) {
            w.next_rev = visible + 1;
        }
        Ok(())
    }

    async fn send_events(&mut self, id: i64, events: Vec<PbEvent>) -> Result<(), Stop> {
        let revision = events
            .last()
            .and_then(|e| e.kv.as_ref())
            .map_or(0, |kv| kv.mod_revision);
        if let Some(w) = self.watchers.get_mut(&id) {
            w.sent_since_tick = true;
        }
        let response = PbWatchResponse {
            watch_id: id,
            events,
            ..self.header_at(revision.max(self.shared.visible()))
        };
        self.send(response).await
    }

    /// Ends a watcher whose history could not be read, telling the client why.
    async fn fail(&mut self, id: i64, error: &KvError) -> Result<(), Stop> {
        tracing::warn!(watch_id = id, %error, "watch catch-up failed");
        self.watchers.remove(&id);
        let response = PbWatchResponse {
            watch_id: id,
            canceled: true,
            cancel_reason: error.to_string(),
            ..self.header_at(self.shared.visible())
        };
        self.send(response).await
    }

    async fn progress_tick(&mut self) -> Result<(), Stop> {
        let visible = self.shared.visible();
        let mut out = Vec::new();
        for (id, watcher) in &mut self.watchers {
            if watcher.progress_notify && !watcher.sent_since_tick && watcher.next_rev > visible {
                out.push((*id, visible));
            }
            watcher.sent_since_tick = false;
        }
        for (id, revision) in out {
            let response = PbWatchResponse {
                watch_id: id,
                ..self.header_at(revision)
            };
            self.send(response).await?;
        }
        Ok(())
    }
}
