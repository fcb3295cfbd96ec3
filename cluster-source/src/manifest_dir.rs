//! The manifest-directory source: a directory of Kubernetes manifests, watched for changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::objects::{AnyObject, ClusterObjects, NamespacedName, ObjectKind, Problem};
use crate::parse::{ManifestFormat, parse_manifests};
use crate::{ClusterSource, SnapshotSender, SourceError};

/// A directory of Kubernetes manifests as a cluster source.
///
/// Every `*.yaml`, `*.yml` and `*.json` file under the directory (recursively; entries
/// whose name starts with `.` are skipped, symbolic links are followed) is read as
/// manifests: YAML files may hold several `---`-separated documents, and `List` documents
/// contribute their `items` (see [`parse_manifests`]). Objects of other kinds are ignored.
///
/// Changes are picked up from file-system notifications (inotify), debounced, and, as a
/// fallback for lost notifications, by a periodic rescan that compares file metadata.
///
/// - A file that fails to read or parse is reported as a [`Problem`] naming the file and
///   line; its previous good objects stay in the snapshot until it is fixed or deleted.
/// - A file still open for writing (written in place) is read once its writer closes it,
///   or after [`write_wait`](Self::write_wait) without further writes. Editors'
///   write-to-temporary-then-rename is seen as one change of the target.
/// - The same object (kind, namespace, name) in two files is a problem naming both; the
///   file first in path order wins.
/// - If the directory itself disappears, that is a problem and every object is kept.
///
/// Writers that want no transient problem at all should write a temporary file whose name
/// starts with `.` (or does not end in a manifest extension) and rename it into place.
#[derive(Debug, Clone)]
pub struct ManifestDir {
    root: PathBuf,
    debounce: Duration,
    max_delay: Duration,
    rescan_interval: Duration,
    write_wait: Duration,
}

impl ManifestDir {
    /// A source reading the directory `root`, with the default timings: 25 ms debounce,
    /// 5 s rescan, 1 s write wait.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            debounce: Duration::from_millis(25),
            max_delay: Duration::from_millis(250),
            rescan_interval: Duration::from_secs(5),
            write_wait: Duration::from_secs(1),
        }
    }

    /// How long the directory must be quiet after a change before it is read (events keep
    /// postponing the read by this much, for at most 10 times as long).
    #[must_use]
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self.max_delay = debounce * 10;
        self
    }

    /// How often the whole directory is rescanned in case notifications were lost.
    #[must_use]
    pub fn rescan_interval(mut self, interval: Duration) -> Self {
        self.rescan_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How long a file written in place, and not yet closed, is left alone after its last
    /// write before it is read anyway.
    #[must_use]
    pub fn write_wait(mut self, wait: Duration) -> Self {
        self.write_wait = wait;
        self
    }

    /// The directory read.
    pub fn root(&self) -> &Path {
        &self.root
    }

    async fn run_inner(
        self,
        out: SnapshotSender,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        check_root(&self.root)?;
        let root_name = self.root.display().to_string();
        let (tx, mut events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })
        .map_err(|source| SourceError::Watch {
            path: root_name.clone(),
            source,
        })?;
        watcher
            .watch(&self.root, RecursiveMode::Recursive)
            .map_err(|source| SourceError::Watch {
                path: root_name.clone(),
                source,
            })?;
        info!(root = %root_name, "reading cluster state from a manifest directory");

        let mut state = DirState::new(self.root.clone());
        let mut pending = Pending {
            force_all: true,
            ..Pending::default()
        };
        // The identity of the directory watched: a directory removed and made again (even
        // between two scans) needs a new watch.
        let mut watched = root_id(&self.root);
        let mut watch_lost = false;
        let mut rescan = tokio::time::interval(self.rescan_interval);
        rescan.set_missed_tick_behavior(MissedTickBehavior::Delay);
        rescan.reset();
        let mut flush_now = true;

        loop {
            if flush_now {
                flush_now = false;
                let now = Instant::now();
                let skip = pending.still_writing(now, self.write_wait);
                let force = std::mem::take(&mut pending.dirty);
                let force_all = std::mem::take(&mut pending.force_all);
                pending.dirty = force
                    .iter()
                    .filter(|p| skip.contains(*p))
                    .cloned()
                    .collect();
                pending.first_event = None;
                pending.last_event = None;
                let started = std::time::Instant::now();
                let first = !out.borrow().synced;
                let (next, snapshot) = tokio::task::spawn_blocking(move || {
                    // Most scans (the periodic rescan above all) find nothing new: building
                    // and comparing a snapshot of every object would then be wasted work.
                    let changed = state.scan(&force, &skip, force_all);
                    let snapshot = (changed || first).then(|| state.snapshot());
                    (state, snapshot)
                })
                .await
                .map_err(SourceError::Task)?;
                state = next;
                debug!(elapsed = ?started.elapsed(), changed = snapshot.is_some(), "manifest directory scanned");
                if let Some(snapshot) = snapshot {
                    publish(&out, snapshot);
                }
                // Re-establish the watch if the directory was removed and came back.
                watch_lost |= std::mem::take(&mut pending.root_event) || state.root_id.is_none();
                if state.root_id.is_some() && (watch_lost || state.root_id != watched) {
                    let _ = watcher.unwatch(&self.root);
                    match watcher.watch(&self.root, RecursiveMode::Recursive) {
                        Ok(()) => {
                            info!(root = %root_name, "manifest directory replaced, watching it again");
                            watched = state.root_id;
                            watch_lost = false;
                            // Read everything again: changes made before the new watch.
                            pending.force_all = true;
                            flush_now = true;
                            continue;
                        }
                        Err(err) => {
                            warn!(root = %root_name, %err, "cannot watch manifest directory again");
                        }
                    }
                }
            }
            let deadline = pending.deadline(self.debounce, self.max_delay, self.write_wait);
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = out.closed() => {
                    debug!(root = %root_name, "no one reads the manifest directory any more, stopping");
                    return Ok(());
                }
                event = events.recv() => match event {
                    Some(event) => pending.on_event(&self.root, event, Instant::now()),
                    None => return Ok(()),
                },
                () = sleep_until(deadline), if deadline.is_some() => flush_now = true,
                _ = rescan.tick() => flush_now = true,
            }
        }
    }
}

impl ClusterSource for ManifestDir {
    fn run(
        self: Box<Self>,
        out: SnapshotSender,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.run_inner(out, cancel))
    }
}

/// Reads a manifest directory once, as [`ManifestDir`] would at start, and returns the
/// (synced) snapshot. This blocks: call it outside async code or in `spawn_blocking`.
pub fn load_dir(root: impl AsRef<Path>) -> Result<ClusterObjects, SourceError> {
    let root = root.as_ref();
    check_root(root)?;
    let mut state = DirState::new(root.to_path_buf());
    state.scan(&BTreeSet::new(), &BTreeSet::new(), true);
    Ok(state.snapshot())
}

fn check_root(root: &Path) -> Result<(), SourceError> {
    let error = |source| SourceError::ManifestDir {
        path: root.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(root).map_err(error)?;
    if meta.is_dir() {
        Ok(())
    } else {
        Err(error(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )))
    }
}

fn root_id(root: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(root).ok().map(|m| (m.dev(), m.ino()))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Publishes `snapshot` if it differs from the current one, logging new problems.
fn publish(out: &SnapshotSender, snapshot: ClusterObjects) {
    out.send_if_modified(|current| {
        if **current == snapshot {
            return false;
        }
        let old: HashSet<&Problem> = current.problems.iter().collect();
        for problem in snapshot.problems.iter().filter(|p| !old.contains(p)) {
            warn!(%problem, "manifest problem");
        }
        if current.problems.len() > snapshot.problems.len() || !old.is_empty() {
            let new: HashSet<&Problem> = snapshot.problems.iter().collect();
            for problem in current.problems.iter().filter(|p| !new.contains(p)) {
                info!(%problem, "manifest problem resolved");
            }
        }
        *current = Arc::new(snapshot);
        true
    });
}

/// Events seen since the last scan.
#[derive(Debug, Default)]
struct Pending {
    /// Paths named by events: read again even if their metadata looks unchanged.
    dirty: BTreeSet<PathBuf>,
    /// Read every file again (notifications were lost).
    force_all: bool,
    /// The directory itself was removed or renamed: its watch is gone.
    root_event: bool,
    /// Files written in place and not closed yet, with the time of their last write.
    writing: HashMap<PathBuf, Instant>,
    first_event: Option<Instant>,
    last_event: Option<Instant>,
}

impl Pending {
    fn on_event(&mut self, root: &Path, event: notify::Result<notify::Event>, now: Instant) {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                warn!(%err, "manifest directory watch error, rescanning");
                self.force_all = true;
                self.touch(now);
                return;
            }
        };
        if event.need_rescan() {
            debug!("manifest directory notifications overflowed, rescanning");
            self.force_all = true;
        }
        match event.kind {
            // Our own reads open and close files: only a writer's close matters.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                for path in &event.paths {
                    self.writing.remove(path);
                }
            }
            EventKind::Access(_) => return,
            EventKind::Create(CreateKind::File) | EventKind::Modify(ModifyKind::Data(_)) => {
                for path in &event.paths {
                    // A new symbolic link is complete when created; a file is written to
                    // until its writer closes it.
                    let is_link =
                        std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
                    if !is_link {
                        self.writing.insert(path.clone(), now);
                    }
                }
            }
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => {
                for path in &event.paths {
                    self.writing.remove(path);
                    self.root_event |= path == root;
                }
            }
            _ => {}
        }
        self.dirty.extend(event.paths);
        self.touch(now);
    }

    fn touch(&mut self, now: Instant) {
        self.first_event.get_or_insert(now);
        self.last_event = Some(now);
    }

    /// Files still being written (and not for too long), to leave alone in this scan.
    fn still_writing(&mut self, now: Instant, write_wait: Duration) -> BTreeSet<PathBuf> {
        self.writing.retain(|_, last| *last + write_wait > now);
        self.writing.keys().cloned().collect()
    }

    /// When to scan next, if anything is pending.
    fn deadline(
        &self,
        debounce: Duration,
        max_delay: Duration,
        write_wait: Duration,
    ) -> Option<Instant> {
        let settled = match (self.first_event, self.last_event) {
            (Some(first), Some(last)) => Some((last + debounce).min(first + max_delay)),
            _ => None,
        };
        let writer_gone = self.writing.values().map(|last| *last + write_wait).min();
        match (settled, writer_gone) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What identifies a version of a file cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    dev: u64,
    ino: u64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            changed: (meta.ctime(), meta.ctime_nsec()),
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// One manifest file as last read.
#[derive(Debug, Default)]
struct FileEntry {
    /// The metadata when last read; `None` forces a read at the next scan.
    fingerprint: Option<Fingerprint>,
    /// The hash of the content last read, good or bad.
    content: Option<u64>,
    /// The objects of the last version that parsed, with their snapshot keys.
    objects: Vec<(NamespacedName, AnyObject)>,
    /// What is wrong with the current version.
    problems: Vec<Problem>,
}

/// Everything known about the directory.
#[derive(Debug)]
struct DirState {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    /// Problems of the walk itself (unreadable directories, the root gone).
    walk_problems: Vec<Problem>,
    /// The directory's (device, inode) at the last scan; `None` if it could not be read.
    root_id: Option<(u64, u64)>,
}

impl DirState {
    fn new(root: PathBuf) -> Self {
        Self {
            root,
            files: BTreeMap::new(),
            walk_problems: Vec::new(),
            root_id: None,
        }
    }

    /// Walks the directory and reads every file that is new, changed, in `force` (or every
    /// file if `force_all`), except those in `skip`; forgets files that are gone. Returns
    /// whether any object or problem changed.
    fn scan(
        &mut self,
        force: &BTreeSet<PathBuf>,
        skip: &BTreeSet<PathBuf>,
        force_all: bool,
    ) -> bool {
        let mut walk = Walk::default();
        walk.dir(&self.root, true);
        let mut changed = self.walk_problems != walk.problems;
        self.walk_problems = walk.problems;
        self.root_id = if walk.root_missing {
            None
        } else {
            root_id(&self.root)
        };
        if walk.root_missing {
            return changed; // keep everything
        }
        // Forget files that are gone, except under directories we could not read.
        let known = self.files.len();
        self.files.retain(|path, _| {
            walk.found.contains_key(path) || walk.unreadable.iter().any(|dir| path.starts_with(dir))
        });
        changed |= self.files.len() != known;
        for (path, found) in walk.found {
            if skip.contains(&path) {
                continue;
            }
            let entry = self.files.entry(path.clone()).or_default();
            let fingerprint = match found {
                Ok(fingerprint) => fingerprint,
                Err(problem) => {
                    let problems = vec![problem];
                    changed |= entry.problems != problems;
                    entry.problems = problems;
                    entry.fingerprint = None;
                    continue;
                }
            };
            if !force_all && !force.contains(&path) && entry.fingerprint == Some(fingerprint) {
                continue;
            }
            changed |= read_file(&path, entry, fingerprint);
            if entry.fingerprint.is_none() && entry.content.is_none() && entry.problems.is_empty() {
                // It vanished between the walk and the read.
                self.files.remove(&path);
            }
        }
        changed
    }

    /// The snapshot of every file's last good objects, with every current problem.
    fn snapshot(&self) -> ClusterObjects {
        let files: Vec<(&PathBuf, &FileEntry)> = self.files.iter().collect();
        let mut problems = self.walk_problems.clone();
        // Every object with its key and file, sorted so that the copies of one object are
        // next to each other, the one in the first file (path order) first.
        let mut all: Vec<(ObjectKind, &NamespacedName, usize, &AnyObject)> = Vec::new();
        for (index, (_, entry)) in files.iter().enumerate() {
            all.extend(
                entry
                    .objects
                    .iter()
                    .map(|(key, object)| (object.kind(), key, index, object)),
            );
            problems.extend(entry.problems.iter().cloned());
        }
        // Stable: within one file, the first document wins too.
        all.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        let mut kept: Vec<(NamespacedName, AnyObject)> = Vec::with_capacity(all.len());
        let mut first_file = 0;
        for (i, (kind, key, file, object)) in all.iter().enumerate() {
            let repeated = i > 0 && all[i - 1].0 == *kind && all[i - 1].1 == *key;
            if !repeated {
                first_file = *file;
                kept.push(((*key).clone(), (*object).clone()));
                continue;
            }
            problems.push(Problem {
                source: files[*file].0.display().to_string(),
                line: None,
                object: Some(object.object_ref().to_string()),
                message: format!(
                    "also defined in {first}; the one there is used",
                    first = files[first_file].0.display()
                ),
            });
        }
        problems.sort();
        problems.dedup();
        let mut out = ClusterObjects::from_sorted(kept);
        out.synced = true;
        out.problems = problems;
        out
    }
}

/// Reads and parses one file into its entry; returns whether its objects or problems
/// changed.
fn read_file(path: &Path, entry: &mut FileEntry, fingerprint: Fingerprint) -> bool {
    let source = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            *entry = FileEntry::default();
            return true;
        }
        Err(err) => {
            entry.fingerprint = None;
            entry.content = None;
            return set_problems(
                entry,
                vec![Problem {
                    source,
                    line: None,
                    object: None,
                    message: format!("cannot read: {err}"),
                }],
            );
        }
    };
    entry.fingerprint = Some(fingerprint);
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    let content = hasher.finish();
    if entry.content == Some(content) {
        return false; // same text, same result
    }
    entry.content = Some(content);
    let Some(format) = ManifestFormat::for_path(path) else {
        return false;
    };
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            return set_problems(
                entry,
                vec![Problem {
                    source,
                    line: None,
                    object: None,
                    message: format!("not UTF-8: {err}"),
                }],
            );
        }
    };
    match parse_manifests(&source, &text, format) {
        Ok(objects) => {
            debug!(file = %source, objects = objects.len(), "manifest file read");
            entry.objects = objects
                .into_iter()
                .map(|mut object| (object.key(), object))
                .collect();
            entry.problems.clear();
            true
        }
        Err(problems) => {
            debug!(file = %source, problems = problems.len(), "manifest file has problems, keeping its last good objects");
            set_problems(entry, problems)
        }
    }
}

/// Replaces the entry's problems; returns whether they changed.
fn set_problems(entry: &mut FileEntry, problems: Vec<Problem>) -> bool {
    let changed = entry.problems != problems;
    entry.problems = problems;
    changed
}

/// One walk of the directory tree.
#[derive(Debug, Default)]
struct Walk {
    /// Manifest files found, with their metadata or why it could not be read.
    found: BTreeMap<PathBuf, Result<Fingerprint, Problem>>,
    /// Directories that could not be listed: files under them are kept as they were.
    unreadable: Vec<PathBuf>,
    problems: Vec<Problem>,
    root_missing: bool,
    /// Directories seen, against symbolic-link loops.
    visited: HashSet<(u64, u64)>,
}

impl Walk {
    fn dir(&mut self, dir: &Path, is_root: bool) {
        let problem = |message: String| Problem {
            source: dir.display().to_string(),
            line: None,
            object: None,
            message,
        };
        if let Ok(meta) = std::fs::metadata(dir)
            && !self.visited.insert((meta.dev(), meta.ino()))
        {
            return;
        }
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) => {
                if is_root {
                    self.root_missing = true;
                    self.problems.push(problem(format!(
                        "cannot read the manifest directory, keeping the last objects read: {err}"
                    )));
                } else {
                    self.unreadable.push(dir.to_path_buf());
                    self.problems
                        .push(problem(format!("cannot read directory: {err}")));
                }
                return;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) => {
                    self.unreadable.push(dir.to_path_buf());
                    self.problems
                        .push(problem(format!("cannot list directory: {err}")));
                    continue;
                }
            };
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let path = entry.path();
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => self.dir(&path, false),
                Ok(meta) => {
                    if ManifestFormat::for_path(&path).is_some() {
                        self.found.insert(path, Ok(Fingerprint::of(&meta)));
                    }
                }
                // A dangling symbolic link, or a file removed since listed: not there.
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    if ManifestFormat::for_path(&path).is_some() {
                        let message = format!("cannot read: {err}");
                        let source = path.display().to_string();
                        self.found.insert(
                            path,
                            Err(Problem {
                                source,
                                line: None,
                                object: None,
                                message,
                            }),
                        );
                    }
                }
            }
        }
    }
}
