//! The Kubernetes API source: one `kube` watcher per kind, buffered like a reflector.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cilium::CiliumNetworkPolicy;
use crate::objects::{ClusterObjects, DEFAULT_NAMESPACE, NamespacedName, ObjectKind, Problem};
use crate::{ClusterSource, SnapshotSender, SourceError};

/// How long a problem from the watch phase (not the list) stays reported after it last
/// happened: a resumed watch emits nothing, so its recovery cannot be seen directly. The
/// watcher's backoff retries failures at least every 30 s, so a lasting failure stays
/// reported.
const WATCH_PROBLEM_TTL: Duration = Duration::from_secs(60);

/// The most events applied before a snapshot is published.
const MAX_BATCH: usize = 1024;

/// The Kubernetes API as a cluster source.
///
/// One `kube::runtime::watcher` per kind, across all namespaces, with the watcher's default
/// backoff on errors. Like a reflector, each (re-)list is buffered and swapped in whole
/// when complete, so a snapshot never shows a half-listed kind; the snapshot is `synced`
/// once every kind has been listed.
///
/// Errors never stop the source; they are [`Problem`]s whose `source` is the API kind
/// (`v1/Pod`), and the kind keeps its last listed objects:
/// - a kind whose list is forbidden (RBAC, 403) or not found (404: the
///   `CiliumNetworkPolicy` CRD is not installed) counts as listed and empty for `synced`,
///   and is listed again with backoff;
/// - a `CiliumNetworkPolicy` that does not decode is a problem naming it, and its last good
///   version is kept.
///
/// Tested against a mocked API (a `tower::Service` answering list and watch requests); no
/// real API server runs in this project's tests.
#[derive(Clone)]
pub struct KubeApi {
    client: Client,
    config: watcher::Config,
}

impl fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeApi")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KubeApi {
    /// A source watching every kind, in every namespace, through `client`.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            config: watcher::Config::default(),
        }
    }

    /// Uses `config` for every watcher (label selectors, page size, timeouts...).
    #[must_use]
    pub fn with_watcher_config(mut self, config: watcher::Config) -> Self {
        self.config = config;
        self
    }

    async fn run_inner(
        self,
        out: SnapshotSender,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let client = self.client;
        let config = self.config;
        let cnp = ApiResource::erase::<CiliumNetworkPolicy>(&());
        let streams: Vec<BoxStream<'static, Update>> = vec![
            typed_stream::<Namespace>(&client, &config, Update::Namespace),
            typed_stream::<Node>(&client, &config, Update::Node),
            typed_stream::<Service>(&client, &config, Update::Service),
            typed_stream::<EndpointSlice>(&client, &config, Update::EndpointSlice),
            typed_stream::<Pod>(&client, &config, Update::Pod),
            typed_stream::<NetworkPolicy>(&client, &config, Update::NetworkPolicy),
            watcher::watcher(
                Api::<DynamicObject>::all_with(client.clone(), &cnp),
                config.clone(),
            )
            .default_backoff()
            .map(Update::CiliumNetworkPolicy)
            .boxed(),
        ];
        let mut updates = futures::stream::select_all(streams);
        let mut state = ApiState::default();
        info!("reading cluster state from the Kubernetes API");
        loop {
            let expiry = state.next_expiry();
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = out.closed() => {
                    debug!("no one reads the Kubernetes API source any more, stopping");
                    return Ok(());
                }
                update = updates.next() => {
                    let Some(update) = update else { return Ok(()) };
                    state.apply(update);
                    let mut applied = 1;
                    while applied < MAX_BATCH {
                        match updates.next().now_or_never() {
                            Some(Some(update)) => state.apply(update),
                            _ => break,
                        }
                        applied += 1;
                    }
                }
                () = sleep_until(expiry), if expiry.is_some() => state.expire(Instant::now()),
            }
            let was_synced = out.borrow().synced;
            let snapshot = state.snapshot();
            if snapshot.synced && !was_synced {
                info!(
                    objects = snapshot.len(),
                    problems = snapshot.problems.len(),
                    "Kubernetes API source synced"
                );
            }
            out.send_if_modified(|current| {
                if **current == snapshot {
                    false
                } else {
                    *current = Arc::new(snapshot);
                    true
                }
            });
        }
    }
}

impl ClusterSource for KubeApi {
    fn run(
        self: Box<Self>,
        out: SnapshotSender,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.run_inner(out, cancel))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn typed_stream<K>(
    client: &Client,
    config: &watcher::Config,
    wrap: fn(watcher::Result<Event<K>>) -> Update,
) -> BoxStream<'static, Update>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + fmt::Debug + Send + 'static,
{
    watcher::watcher(Api::<K>::all(client.clone()), config.clone())
        .default_backoff()
        .map(wrap)
        .boxed()
}

/// One watcher event of some kind.
#[expect(
    clippy::large_enum_variant,
    reason = "transient: applied as soon as received"
)]
enum Update {
    Namespace(watcher::Result<Event<Namespace>>),
    Node(watcher::Result<Event<Node>>),
    Service(watcher::Result<Event<Service>>),
    EndpointSlice(watcher::Result<Event<EndpointSlice>>),
    Pod(watcher::Result<Event<Pod>>),
    NetworkPolicy(watcher::Result<Event<NetworkPolicy>>),
    CiliumNetworkPolicy(watcher::Result<Event<DynamicObject>>),
}

/// A map key built from object metadata.
trait Key: Ord + Clone {
    fn of(meta: &ObjectMeta) -> Self;
    fn describe(&self) -> String;
}

impl Key for String {
    fn of(meta: &ObjectMeta) -> Self {
        meta.name.clone().unwrap_or_default()
    }

    fn describe(&self) -> String {
        self.clone()
    }
}

impl Key for NamespacedName {
    fn of(meta: &ObjectMeta) -> Self {
        let namespace = meta
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE);
        NamespacedName::new(namespace, meta.name.clone().unwrap_or_default())
    }

    fn describe(&self) -> String {
        self.to_string()
    }
}

/// Reflector state of one kind.
struct KindState<Q, K> {
    kind: ObjectKind,
    /// The objects of a (re-)list in progress, swapped in at its end.
    buffer: Option<BTreeMap<Q, K>>,
    /// Objects that would not decode during the list in progress.
    bad_buffer: BTreeMap<Q, Problem>,
    /// Objects whose current version would not decode (their last good version is kept).
    bad: BTreeMap<Q, Problem>,
    /// Listed at least once (or known to be unlistable: forbidden, not found).
    settled: bool,
    /// The last error of the watcher, and when it stops being reported (`None`: until the
    /// next event).
    error: Option<(Problem, Option<Instant>)>,
}

impl<Q: Key, K: Clone> KindState<Q, K> {
    fn new(kind: ObjectKind) -> Self {
        Self {
            kind,
            buffer: None,
            bad_buffer: BTreeMap::new(),
            bad: BTreeMap::new(),
            settled: false,
            error: None,
        }
    }

    fn source(&self) -> String {
        format!("{}/{}", self.kind.api_version(), self.kind.kind())
    }

    fn problem(&self, object: Option<String>, message: String) -> Problem {
        Problem {
            source: self.source(),
            line: None,
            object,
            message,
        }
    }

    /// Applies one watcher event to `live` (the kind's map in the working snapshot).
    fn apply<W: Resource>(
        &mut self,
        live: &mut BTreeMap<Q, K>,
        event: watcher::Result<Event<W>>,
        convert: impl Fn(W) -> Result<K, String>,
    ) {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                self.on_error(&err);
                return;
            }
        };
        if !matches!(event, Event::Init) {
            self.error = None;
        }
        match event {
            Event::Init => {
                self.buffer = Some(BTreeMap::new());
                self.bad_buffer.clear();
            }
            Event::InitApply(wire) => {
                let key = Q::of(wire.meta());
                let buffer = self.buffer.get_or_insert_with(BTreeMap::new);
                match convert(wire) {
                    Ok(object) => {
                        buffer.insert(key, object);
                    }
                    Err(message) => {
                        if let Some(old) = live.get(&key) {
                            buffer.insert(key.clone(), old.clone());
                        }
                        let problem = self.problem(Some(self.describe(&key)), message);
                        self.bad_buffer.insert(key, problem);
                    }
                }
            }
            Event::InitDone => {
                if let Some(buffer) = self.buffer.take() {
                    *live = buffer;
                }
                self.bad = std::mem::take(&mut self.bad_buffer);
                if !self.settled {
                    debug!(kind = %self.kind, objects = live.len(), "kind listed");
                }
                self.settled = true;
            }
            Event::Apply(wire) => {
                let key = Q::of(wire.meta());
                match convert(wire) {
                    Ok(object) => {
                        self.bad.remove(&key);
                        live.insert(key, object);
                    }
                    Err(message) => {
                        let problem = self.problem(Some(self.describe(&key)), message);
                        self.bad.insert(key, problem);
                    }
                }
            }
            Event::Delete(wire) => {
                let key = Q::of(wire.meta());
                self.bad.remove(&key);
                live.remove(&key);
            }
        }
    }

    fn describe(&self, key: &Q) -> String {
        format!("{} {}", self.kind, key.describe())
    }

    fn on_error(&mut self, err: &watcher::Error) {
        let status = match err {
            watcher::Error::InitialListFailed(kube::Error::Api(status))
            | watcher::Error::WatchStartFailed(kube::Error::Api(status))
            | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.as_ref()),
            watcher::Error::WatchError(status) => Some(status.as_ref()),
            _ => None,
        };
        if status.is_some_and(|s| s.code == 410) {
            debug!(kind = %self.kind, %err, "watch expired, the watcher lists again");
            return;
        }
        let listing = matches!(err, watcher::Error::InitialListFailed(_));
        let message = match status {
            Some(s) if s.is_not_found() && self.kind == ObjectKind::CiliumNetworkPolicy => format!(
                "the CiliumNetworkPolicy CRD is not installed (404 not found): {}",
                s.message
            ),
            Some(s) if s.is_not_found() => format!("not found (404): {}", s.message),
            Some(s) if s.is_forbidden() => format!("forbidden (403), check RBAC: {}", s.message),
            _ => err.to_string(),
        };
        if listing && status.is_some_and(|s| s.is_forbidden() || s.is_not_found()) && !self.settled
        {
            // Nothing to wait for: count the kind as listed (empty) so the snapshot syncs.
            self.settled = true;
        }
        let problem = self.problem(None, message);
        if self.error.as_ref().is_none_or(|(old, _)| *old != problem) {
            warn!(%problem, "Kubernetes API problem");
        }
        let expires = (!listing).then(|| Instant::now() + WATCH_PROBLEM_TTL);
        self.error = Some((problem, expires));
    }

    fn problems(&self, out: &mut Vec<Problem>) {
        out.extend(self.error.iter().map(|(p, _)| p.clone()));
        out.extend(self.bad.values().cloned());
        out.extend(
            self.bad_buffer
                .values()
                .filter(|_| self.buffer.is_some())
                .cloned(),
        );
    }

    fn expiry(&self) -> Option<Instant> {
        self.error.as_ref().and_then(|(_, expires)| *expires)
    }

    fn expire(&mut self, now: Instant) {
        if self.expiry().is_some_and(|at| at <= now) {
            self.error = None;
        }
    }
}

/// Everything known from the API.
struct ApiState {
    objects: ClusterObjects,
    namespaces: KindState<String, Arc<Namespace>>,
    nodes: KindState<String, Arc<Node>>,
    services: KindState<NamespacedName, Arc<Service>>,
    endpoint_slices: KindState<NamespacedName, Arc<EndpointSlice>>,
    pods: KindState<NamespacedName, Arc<Pod>>,
    network_policies: KindState<NamespacedName, Arc<NetworkPolicy>>,
    cilium_network_policies: KindState<NamespacedName, Arc<CiliumNetworkPolicy>>,
}

impl Default for ApiState {
    fn default() -> Self {
        Self {
            objects: ClusterObjects::default(),
            namespaces: KindState::new(ObjectKind::Namespace),
            nodes: KindState::new(ObjectKind::Node),
            services: KindState::new(ObjectKind::Service),
            endpoint_slices: KindState::new(ObjectKind::EndpointSlice),
            pods: KindState::new(ObjectKind::Pod),
            network_policies: KindState::new(ObjectKind::NetworkPolicy),
            cilium_network_policies: KindState::new(ObjectKind::CiliumNetworkPolicy),
        }
    }
}

fn same<K>(object: K) -> Result<Arc<K>, String> {
    Ok(Arc::new(object))
}

fn cnp_from_dynamic(object: DynamicObject) -> Result<Arc<CiliumNetworkPolicy>, String> {
    serde_json::to_value(&object)
        .and_then(serde_json::from_value)
        .map(Arc::new)
        .map_err(|err| format!("cannot decode: {err}"))
}

impl ApiState {
    fn apply(&mut self, update: Update) {
        let o = &mut self.objects;
        match update {
            Update::Namespace(e) => self.namespaces.apply(&mut o.namespaces, e, same),
            Update::Node(e) => self.nodes.apply(&mut o.nodes, e, same),
            Update::Service(e) => self.services.apply(&mut o.services, e, same),
            Update::EndpointSlice(e) => self.endpoint_slices.apply(&mut o.endpoint_slices, e, same),
            Update::Pod(e) => self.pods.apply(&mut o.pods, e, same),
            Update::NetworkPolicy(e) => {
                self.network_policies
                    .apply(&mut o.network_policies, e, same)
            }
            Update::CiliumNetworkPolicy(e) => {
                self.cilium_network_policies.apply(
                    &mut o.cilium_network_policies,
                    e,
                    cnp_from_dynamic,
                );
            }
        }
    }

    fn synced(&self) -> bool {
        self.namespaces.settled
            && self.nodes.settled
            && self.services.settled
            && self.endpoint_slices.settled
            && self.pods.settled
            && self.network_policies.settled
            && self.cilium_network_policies.settled
    }

    fn snapshot(&self) -> ClusterObjects {
        let mut problems = Vec::new();
        self.namespaces.problems(&mut problems);
        self.nodes.problems(&mut problems);
        self.services.problems(&mut problems);
        self.endpoint_slices.problems(&mut problems);
        self.pods.problems(&mut problems);
        self.network_policies.problems(&mut problems);
        self.cilium_network_policies.problems(&mut problems);
        problems.sort();
        problems.dedup();
        let mut snapshot = self.objects.clone();
        snapshot.synced = self.synced();
        snapshot.problems = problems;
        snapshot
    }

    fn next_expiry(&self) -> Option<Instant> {
        [
            self.namespaces.expiry(),
            self.nodes.expiry(),
            self.services.expiry(),
            self.endpoint_slices.expiry(),
            self.pods.expiry(),
            self.network_policies.expiry(),
            self.cilium_network_policies.expiry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn expire(&mut self, now: Instant) {
        self.namespaces.expire(now);
        self.nodes.expire(now);
        self.services.expire(now);
        self.endpoint_slices.expire(now);
        self.pods.expire(now);
        self.network_policies.expire(now);
        self.cilium_network_policies.expire(now);
    }
}
