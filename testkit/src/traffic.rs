//! The workload half of a robustness test: concurrent clients issuing random puts, gets and
//! deletes against an etcd-compatible store, recorded into a [`Recorder`], and prefix
//! watchers that reopen their watch after the revision they last saw whenever it breaks, so
//! one [`WatchRecord`] spans every reconnect (which is what "resumable" means to a checker).
//! The faults are the test's business; nothing here retries a request, since a request whose
//! answer was lost is an [`Outcome::Unknown`](crate::history::Outcome) the checker must see.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, WatchOptions};
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::history::{ClientId, History, Op, OpResult, Pending, Recorder, WatchEvent, WatchRecord};

/// What the clients do.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The keys written and read (a handful, so that operations collide).
    pub keys: Vec<String>,
    /// Out of 10 operations, how many are puts and how many gets (the rest are deletes).
    pub puts_gets: (u32, u32),
    /// A request not answered within this is abandoned as an unknown outcome.
    pub request_timeout: Duration,
    /// Pause between a client's operations (zero: as fast as the store answers).
    pub think: Duration,
}

impl Workload {
    /// `keys` with 4 puts, 4 gets and 2 deletes in 10, a 2 s request timeout, no pause.
    pub fn new(keys: &[&str]) -> Self {
        Workload {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            puts_gets: (4, 4),
            request_timeout: Duration::from_secs(2),
            think: Duration::ZERO,
        }
    }
}

/// Runs client `id` against `endpoints` until `until`, recording every operation. Values
/// are unique per client and operation, so the checker can tell writes apart. The client
/// connects lazily and keeps trying through faults; a refused or failed request is recorded
/// as an unknown outcome (it may have been applied before the answer was lost).
pub async fn run_client(
    endpoints: Vec<String>,
    options: ConnectOptions,
    id: ClientId,
    workload: Workload,
    recorder: Recorder,
    until: Instant,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(id));
    let mut client: Option<Client> = None;
    let mut i = 0u64;
    while Instant::now() < until {
        if client.is_none() {
            client = Client::connect(endpoints.clone(), Some(options.clone()))
                .await
                .ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let Some(c) = client.as_mut() else {
            continue;
        };
        let key = workload.keys[rng.random_range(0..workload.keys.len())].clone();
        let roll = rng.random_range(0..10);
        let (puts, gets) = workload.puts_gets;
        let timeout = workload.request_timeout;
        let failed = if roll < puts {
            let value = format!("c{id}-{i}");
            let pending = recorder.begin(id, Op::put(key.as_str(), value.as_str()));
            finish(pending, timeout, c.put(key, value, None), |r| {
                OpResult::Put {
                    revision: r.header().map_or(0, |h| h.revision()),
                }
            })
            .await
        } else if roll < puts + gets {
            let pending = recorder.begin(id, Op::get(key.as_str()));
            finish(pending, timeout, c.get(key, None), |r| OpResult::Get {
                value: r.kvs().first().map(|kv| kv.value().to_vec()),
                revision: r.header().map_or(0, |h| h.revision()),
            })
            .await
        } else {
            let pending = recorder.begin(id, Op::delete(key.as_str()));
            finish(pending, timeout, c.delete(key, None), |r| {
                OpResult::Delete {
                    deleted: r.deleted(),
                    revision: r.header().map_or(0, |h| h.revision()),
                }
            })
            .await
        };
        if failed {
            // A fresh connection, as a client library does after a broken one.
            client = None;
        }
        i += 1;
        if !workload.think.is_zero() {
            tokio::time::sleep(workload.think).await;
        }
    }
}

/// Awaits `request` for at most `timeout` and records its outcome on `pending`: the answer
/// as `to` reads it, or unknown. Says whether the request failed.
async fn finish<T>(
    pending: Pending,
    timeout: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
    to: impl FnOnce(&T) -> OpResult,
) -> bool {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(answer)) => {
            pending.ok(to(&answer));
            false
        }
        _ => {
            pending.unknown();
            true
        }
    }
}

/// A watcher of one prefix, collecting events until [`Watcher::finish`].
#[derive(Debug)]
pub struct Watcher {
    name: String,
    prefix: String,
    start: i64,
    events: Arc<Mutex<Vec<WatchEvent>>>,
    reopened: Arc<Mutex<u32>>,
    task: JoinHandle<()>,
}

impl Watcher {
    /// Watches `prefix` from revision `start` on `endpoints`; when the stream breaks (or the
    /// store goes away), the watch is opened again after the last revision received.
    pub fn start(
        endpoints: Vec<String>,
        options: ConnectOptions,
        name: &str,
        prefix: &str,
        start: i64,
    ) -> Watcher {
        let events = Arc::new(Mutex::new(Vec::<WatchEvent>::new()));
        let reopened = Arc::new(Mutex::new(0u32));
        let (sink, count, watched) = (events.clone(), reopened.clone(), prefix.to_owned());
        let task = tokio::spawn(async move {
            let mut first = true;
            loop {
                let from = lock(&sink).last().map_or(start, |e| e.revision + 1);
                if !first {
                    *lock(&count) += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                first = false;
                let Ok(mut client) =
                    Client::connect(endpoints.clone(), Some(options.clone())).await
                else {
                    continue;
                };
                let opts = WatchOptions::new().with_prefix().with_start_revision(from);
                let Ok(mut stream) = client.watch(watched.as_str(), Some(opts)).await else {
                    continue;
                };
                while let Ok(Some(resp)) = stream.message().await {
                    let mut sink = lock(&sink);
                    for event in resp.events() {
                        let Some(kv) = event.kv() else { continue };
                        sink.push(match event.event_type() {
                            EventType::Put => {
                                WatchEvent::put(kv.mod_revision(), kv.key(), kv.value())
                            }
                            EventType::Delete => WatchEvent::delete(kv.mod_revision(), kv.key()),
                        });
                    }
                }
            }
        });
        Watcher {
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            start,
            events,
            reopened,
            task,
        }
    }

    /// The prefix watched.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many times the watch was opened again after a break.
    pub fn reopened(&self) -> u32 {
        *lock(&self.reopened)
    }

    /// Waits (at most `patience`) until the watcher has received revision `until` or later,
    /// then stops it and returns everything it received; `Err` with what it has if it did
    /// not catch up.
    pub async fn finish(self, until: i64, patience: Duration) -> Result<WatchRecord, WatchRecord> {
        let deadline = Instant::now() + patience;
        let caught_up = loop {
            let last = lock(&self.events).last().map(|e| e.revision);
            if until < self.start || last.is_some_and(|r| r >= until) {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.task.abort();
        let record = WatchRecord {
            watcher: self.name,
            prefix: self.prefix.into_bytes(),
            start_revision: self.start,
            events: lock(&self.events).clone(),
        };
        if caught_up { Ok(record) } else { Err(record) }
    }
}

/// The highest acknowledged write revision under `prefix`: what a complete watcher of it
/// must have reached.
pub fn last_write(history: &History, prefix: &str) -> i64 {
    history
        .operations()
        .iter()
        .filter(|o| o.op.key().starts_with(prefix.as_bytes()))
        .filter_map(|o| o.write_revision())
        .max()
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
