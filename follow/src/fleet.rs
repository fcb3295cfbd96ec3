//! The peers directory's followers: one task per peer file, started when the file appears,
//! restarted when it changes, stopped when it goes; what a follower is and what else happens
//! on each change is the daemon's [`Roster`]. kvstoremesh and the agent's direct mode run the
//! same loop, so a changed file cannot mean a reconnect to one and nothing to the other.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use model::ClusterName;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::{Claims, DirChange, PeerDirectory};

/// What a daemon does with its peers as the directory changes.
pub trait Roster: Send {
    /// Starts following `peer`, whose file at `path` (in `dir`) holds `bytes`, until
    /// `cancel`; `None` when the file cannot be used (the roster reports why).
    fn start(
        &mut self,
        peer: &ClusterName,
        path: &Path,
        bytes: &[u8],
        dir: &Path,
        cancel: CancellationToken,
    ) -> Option<JoinHandle<()>>;

    /// A peer file appeared (its follower starts next).
    fn added(&mut self, peer: &ClusterName) -> impl Future<Output = ()> + Send;

    /// A peer file is gone; its follower has stopped and its cluster id is free.
    fn removed(&mut self, peer: &ClusterName) -> impl Future<Output = ()> + Send;

    /// After each reading of the directory, with the number of peers followed; `false`
    /// stops the fleet (whoever listened is gone).
    fn polled(&mut self, followed: usize) -> impl Future<Output = bool> + Send;
}

/// How often the directory is read and how long a stopping follower may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetTiming {
    /// How often the peers directory is read.
    pub poll_interval: Duration,
    /// How long a follower may take to stop before it is aborted.
    pub stop_grace: Duration,
}

/// One follower per peer of the directory `dir` (the `local` cluster's own file is not a
/// peer), until `cancel`; then every follower is stopped within the grace period.
pub async fn run_fleet<R: Roster>(
    dir: PathBuf,
    local: ClusterName,
    claims: Arc<Claims>,
    timing: FleetTiming,
    mut roster: R,
    cancel: CancellationToken,
) {
    let mut directory = PeerDirectory::new(dir, local);
    let mut running: BTreeMap<ClusterName, Follower> = BTreeMap::new();
    let stop = |peer: ClusterName, follower: Option<Follower>| {
        let claims = claims.clone();
        async move {
            if let Some(follower) = follower {
                follower.cancel.cancel();
                stop_within(follower.task, timing.stop_grace).await;
            }
            // Also when the task was aborted before it could give its claim up.
            claims.release(&peer);
        }
    };
    let mut tick = tokio::time::interval(timing.poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        for change in directory.poll().await {
            let (peer, path, bytes) = match change {
                DirChange::Removed { peer } => {
                    tracing::info!(%peer, "peer file removed");
                    stop(peer.clone(), running.remove(&peer)).await;
                    roster.removed(&peer).await;
                    continue;
                }
                DirChange::Changed { peer, path, bytes } => {
                    tracing::info!(%peer, "peer file changed: following it with the new configuration");
                    stop(peer.clone(), running.remove(&peer)).await;
                    (peer, path, bytes)
                }
                DirChange::Added { peer, path, bytes } => {
                    tracing::info!(%peer, file = %path.display(), "peer added");
                    roster.added(&peer).await;
                    (peer, path, bytes)
                }
            };
            let cancel = cancel.child_token();
            let task = roster.start(&peer, &path, &bytes, directory.dir(), cancel.clone());
            running.insert(peer, Follower { cancel, task });
        }
        if !roster.polled(running.len()).await {
            break;
        }
    }
    let stops = running
        .into_iter()
        .map(|(peer, follower)| stop(peer, Some(follower)));
    futures::future::join_all(stops).await;
}

/// A running follower.
struct Follower {
    cancel: CancellationToken,
    /// `None`: its file could not be used, nothing runs.
    task: Option<JoinHandle<()>>,
}

/// Waits for a cancelled follower, aborting it after `grace`.
async fn stop_within(task: Option<JoinHandle<()>>, grace: Duration) {
    let Some(task) = task else {
        return;
    };
    let abort = task.abort_handle();
    if tokio::time::timeout(grace, task).await.is_err() {
        tracing::warn!(
            ?grace,
            "a peer follower did not stop within the grace period; aborting it"
        );
        abort.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what the fleet asked for; each follower runs until cancelled and then notes
    /// that it stopped.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<String>>>);

    impl Log {
        fn push(&self, line: String) {
            self.0.lock().unwrap().push(line);
        }
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl Roster for Log {
        fn start(
            &mut self,
            peer: &ClusterName,
            _path: &Path,
            bytes: &[u8],
            _dir: &Path,
            cancel: CancellationToken,
        ) -> Option<JoinHandle<()>> {
            let text = String::from_utf8_lossy(bytes).into_owned();
            self.push(format!("start {peer} {text}"));
            if text == "unusable" {
                return None;
            }
            let log = self.clone();
            let peer = peer.clone();
            Some(tokio::spawn(async move {
                cancel.cancelled().await;
                log.push(format!("stopped {peer} {text}"));
            }))
        }
        async fn added(&mut self, peer: &ClusterName) {
            self.push(format!("added {peer}"));
        }
        async fn removed(&mut self, peer: &ClusterName) {
            self.push(format!("removed {peer}"));
        }
        async fn polled(&mut self, _followed: usize) -> bool {
            true
        }
    }

    async fn settle(log: &Log, lines: usize) -> Vec<String> {
        for _ in 0..200 {
            if log.0.lock().unwrap().len() >= lines {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut got = log.take();
        got.sort();
        got
    }

    #[tokio::test]
    async fn followers_follow_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let cancel = CancellationToken::new();
        let timing = FleetTiming {
            poll_interval: Duration::from_millis(20),
            stop_grace: Duration::from_secs(1),
        };
        std::fs::write(dir.path().join("b"), "one").unwrap();
        std::fs::write(dir.path().join("a"), "own").unwrap();
        let fleet = tokio::spawn(run_fleet(
            dir.path().to_owned(),
            ClusterName::new("a").unwrap(),
            Arc::new(Claims::default()),
            timing,
            log.clone(),
            cancel.clone(),
        ));
        assert_eq!(
            settle(&log, 2).await,
            ["added b", "start b one"],
            "not a's own file"
        );
        std::fs::write(dir.path().join("b"), "two").unwrap();
        assert_eq!(
            settle(&log, 2).await,
            ["start b two", "stopped b one"],
            "a changed file restarts its follower"
        );
        std::fs::write(dir.path().join("c"), "unusable").unwrap();
        assert_eq!(settle(&log, 2).await, ["added c", "start c unusable"]);
        std::fs::remove_file(dir.path().join("b")).unwrap();
        std::fs::remove_file(dir.path().join("c")).unwrap();
        assert_eq!(
            settle(&log, 3).await,
            ["removed b", "removed c", "stopped b two"]
        );
        std::fs::write(dir.path().join("d"), "three").unwrap();
        assert_eq!(settle(&log, 2).await, ["added d", "start d three"]);
        cancel.cancel();
        fleet.await.unwrap();
        assert_eq!(log.take(), ["stopped d three"], "stopped on shutdown");
    }
}
