//! `clustermesh status`: per cluster, the apiserver and store, kvstoremesh and each peer it
//! mirrors, the agents' view ("N/N nodes connected to all clusters"), and every problem with
//! its cause and a hint. The JSON form ([`MeshReport`]) is stable (`schema: 1`) and holds
//! no key material: only names, counts, states, URLs and messages.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use agent_api::status::{AgentStatus, Phase};
use model::keys::Kind;
use model::{ClusterContext, ClusterName, KindStatus, PeerFile, PeerStatus};
use serde::{Deserialize, Serialize};

use crate::layout::PeerFiles;
use crate::mesh::{self, Mesh};
use crate::probe::{self, Cause, HttpAnswer, HttpError};

/// The JSON schema version of [`MeshReport`].
pub const SCHEMA: u32 = 1;

/// Something not as it should be, why, and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// `apiserver`, `store`, `kvstoremesh`, `peer <name>`, `node <name>`, `nodes`, `context`.
    pub component: String,
    /// The cause.
    pub cause: Cause,
    /// What was observed, with the error text.
    pub message: String,
    /// What to do.
    pub hint: &'static str,
}

impl Problem {
    fn new(component: impl Into<String>, cause: Cause, message: impl Into<String>) -> Self {
        Problem {
            component: component.into(),
            cause,
            message: message.into(),
            hint: cause.hint(),
        }
    }
}

/// A daemon's health server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DaemonReport {
    /// Its URL.
    pub url: String,
    /// It answered.
    pub reachable: bool,
    /// It answered ready.
    pub ready: bool,
}

/// kvstoremesh, when the cluster runs one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KvstoremeshReport {
    /// The context names a kvstoremesh (else agents follow peers directly).
    pub enabled: bool,
    /// Its health server, when enabled.
    #[serde(flatten)]
    pub daemon: DaemonReport,
}

/// The cluster's store, as its admin sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreReport {
    /// The endpoints.
    pub endpoints: Vec<String>,
    /// It answered a status request.
    pub reachable: bool,
    /// The server's version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

/// Min, average and max of peers synced per reachable node.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Spread {
    /// The fewest.
    pub min: usize,
    /// The mean.
    pub avg: f64,
    /// The most.
    pub max: usize,
}

/// The agents' view.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodesReport {
    /// Agents in the context.
    pub total: usize,
    /// Agents that answered.
    pub reachable: usize,
    /// Agents with every configured peer synced.
    pub connected_to_all: usize,
    /// Peers synced per reachable node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers_synced: Option<Spread>,
}

/// One peer of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeerReport {
    /// The peer.
    pub name: String,
    /// A peer file for it is in the peers-dir.
    pub configured: bool,
    /// Followed now (by kvstoremesh, or by every agent without one).
    pub connected: bool,
    /// Its full state is mirrored.
    pub synced: bool,
    /// Its config was refused.
    pub refused: bool,
    /// Its id, once accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<u16>,
    /// Mirrored entries.
    pub entries: u64,
    /// Per kind.
    pub kinds: BTreeMap<String, KindStatus>,
    /// The last error reported for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClusterReport {
    /// The cluster.
    pub name: String,
    /// Its id.
    pub id: u16,
    /// Nothing below is wrong.
    pub ready: bool,
    /// The apiserver.
    pub apiserver: DaemonReport,
    /// The store.
    pub store: StoreReport,
    /// kvstoremesh.
    pub kvstoremesh: KvstoremeshReport,
    /// The agents.
    pub nodes: NodesReport,
    /// Peers: configured ones, and ones still drained.
    pub peers: Vec<PeerReport>,
    /// Global services this cluster publishes (when the store answered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_services: Option<u64>,
    /// Everything wrong.
    pub problems: Vec<Problem>,
}

/// Every cluster of the context.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MeshReport {
    /// [`SCHEMA`].
    pub schema: u32,
    /// The mesh context.
    pub context: String,
    /// Every cluster is ready.
    pub ready: bool,
    /// The clusters, by name.
    pub clusters: Vec<ClusterReport>,
}

impl MeshReport {
    /// One line per problem: `<cluster>: <component>: <message>`.
    pub fn missing(&self) -> Vec<String> {
        self.clusters
            .iter()
            .flat_map(|c| {
                c.problems
                    .iter()
                    .map(move |p| format!("{}: {}: {}", c.name, p.component, p.message))
            })
            .collect()
    }

    /// The stable JSON form.
    pub fn to_json(&self) -> String {
        // Plain data: serializing cannot fail.
        serde_json::to_string_pretty(self).expect("status reports always serialize")
    }
}

/// kvstoremesh's `/readyz` body, as far as status reads it (readiness is the HTTP status).
#[derive(Debug, Deserialize)]
struct MeshView {
    #[serde(default)]
    local_lease: bool,
    #[serde(default)]
    peers: BTreeMap<String, PeerStatus>,
}

/// Probes one daemon's `/readyz`.
async fn readyz(
    url: &str,
    what: &str,
    timeout: Duration,
    problems: &mut Vec<Problem>,
) -> (DaemonReport, Option<HttpAnswer>) {
    let mut report = DaemonReport {
        url: url.to_owned(),
        ..DaemonReport::default()
    };
    match probe::http_get(url, "/readyz", timeout).await {
        Ok(answer) => {
            report.reachable = true;
            report.ready = answer.status == 200;
            if !report.ready {
                let body = String::from_utf8_lossy(&answer.body);
                problems.push(Problem::new(
                    what,
                    Cause::NotReady,
                    format!("not ready (HTTP {}): {}", answer.status, body.trim()),
                ));
            }
            (report, Some(answer))
        }
        Err(e) => {
            problems.push(http_problem(what, &e));
            (report, None)
        }
    }
}

fn http_problem(what: &str, e: &HttpError) -> Problem {
    Problem::new(what, e.cause(), model::error_chain(e))
}

/// Gathers the status of one cluster. Every request is bounded by `timeout`.
pub async fn cluster_status(context: &ClusterContext, timeout: Duration) -> ClusterReport {
    let mut problems = Vec::new();
    let (apiserver, _) = readyz(&context.apiserver, "apiserver", timeout, &mut problems).await;

    let (client, store_probe) = probe::store_status(&context.store, timeout).await;
    let mut store = StoreReport {
        endpoints: context.store.endpoints.clone(),
        ..StoreReport::default()
    };
    if let Some(status) = &store_probe.status {
        store.reachable = true;
        store.version = Some(status.version.clone());
        store.revision = Some(status.revision);
    }
    if let Some((cause, text)) = store_probe.error {
        problems.push(Problem::new("store", cause, text));
    }
    let mut global_services = None;
    if let Some(client) = &client {
        let prefix = format!("{}{}/", Kind::Services.state_prefix(), context.name);
        match client.raw().list_prefix(&prefix).await {
            Ok(listing) => global_services = Some(listing.entries.len() as u64),
            Err(e) => {
                let text = model::error_chain(&e);
                problems.push(Problem::new("store", Cause::of_text(&text), text));
            }
        }
    }

    let configured = match mesh::configured_peers(&context.peers_dir, &context.name) {
        Ok(peers) => peers,
        Err(e) => {
            problems.push(Problem::new(
                "context",
                Cause::FileMissing,
                model::error_chain(&e),
            ));
            Vec::new()
        }
    };
    for peer in &configured {
        check_peer_file(context, peer, &mut problems);
    }

    let mut kvstoremesh = KvstoremeshReport::default();
    let mut view = None;
    if let Some(url) = &context.kvstoremesh {
        kvstoremesh.enabled = true;
        let (daemon, answer) = readyz(url, "kvstoremesh", timeout, &mut problems).await;
        kvstoremesh.daemon = daemon;
        if let Some(answer) = answer {
            match serde_json::from_slice::<MeshView>(&answer.body) {
                Ok(v) => view = Some(v),
                Err(e) => problems.push(Problem::new(
                    "kvstoremesh",
                    Cause::BadAnswer,
                    format!("unexpected /readyz body: {e}"),
                )),
            }
        }
    }
    let agents = agents_status(context, timeout, &mut problems).await;
    let mut peers = Vec::new();
    for peer in &configured {
        let report = match &view {
            Some(v) => peer_from_kvstoremesh(peer, v.peers.get(peer.as_str()), &mut problems),
            None if !kvstoremesh.enabled => peer_from_agents(peer, &agents),
            None => PeerReport {
                name: peer.to_string(),
                configured: true,
                ..PeerReport::default()
            },
        };
        peers.push(report);
    }
    if let Some(v) = &view {
        for (name, status) in &v.peers {
            if !configured.iter().any(|c| c.as_str() == name) {
                let mut report = peer_report(status);
                report.configured = false;
                peers.push(report);
            }
        }
    }
    let nodes = nodes_report(context, &configured, &agents, &mut problems);
    if let Some(v) = &view {
        // Say why kvstoremesh is not ready instead of repeating its /readyz body: no lease
        // yet, or the peers' own problems listed above.
        let peer_problem = problems.iter().any(|p| p.component.starts_with("peer "));
        if !v.local_lease || peer_problem {
            problems.retain(|p| !(p.component == "kvstoremesh" && p.cause == Cause::NotReady));
        }
        if !v.local_lease {
            problems.push(Problem::new(
                "kvstoremesh",
                Cause::NotReady,
                "kvstoremesh holds no lease in the local store yet",
            ));
        }
    }

    ClusterReport {
        name: context.name.to_string(),
        id: context.id.get(),
        ready: problems.is_empty(),
        apiserver,
        store,
        kvstoremesh,
        nodes,
        peers,
        global_services,
        problems,
    }
}

/// A configured peer file that kvstoremesh could not use: unparsable, or naming a missing file.
fn check_peer_file(context: &ClusterContext, peer: &ClusterName, problems: &mut Vec<Problem>) {
    let path = PeerFiles::new(&context.peers_dir, peer).peer_file;
    let component = format!("peer {peer}");
    match std::fs::read(&path) {
        Err(e) => problems.push(Problem::new(
            component,
            Cause::FileMissing,
            format!("cannot read {}: {e}", path.display()),
        )),
        Ok(bytes) => match PeerFile::parse(&bytes) {
            Err(e) => problems.push(Problem::new(
                component,
                Cause::Other,
                format!("{}: {}", path.display(), model::error_chain(&e)),
            )),
            Ok(file) => {
                let missing = probe::missing_files(&file.resolve(&context.peers_dir));
                if let Some(first) = missing.first() {
                    problems.push(Problem::new(
                        component,
                        Cause::FileMissing,
                        format!(
                            "{} names {}, which does not exist",
                            path.display(),
                            first.display()
                        ),
                    ));
                }
            }
        },
    }
}

fn peer_report(status: &PeerStatus) -> PeerReport {
    PeerReport {
        name: status.peer.to_string(),
        configured: true,
        connected: status.connected,
        synced: status.synced,
        refused: status.refused,
        cluster_id: status.cluster_id,
        entries: status.entries,
        kinds: status.kinds.clone(),
        last_error: status.last_error.clone(),
    }
}

fn peer_from_kvstoremesh(
    peer: &ClusterName,
    status: Option<&PeerStatus>,
    problems: &mut Vec<Problem>,
) -> PeerReport {
    let component = format!("peer {peer}");
    let Some(status) = status else {
        problems.push(Problem::new(
            component,
            Cause::NotPickedUp,
            "a peer file exists but kvstoremesh does not report this peer",
        ));
        return PeerReport {
            name: peer.to_string(),
            configured: true,
            ..PeerReport::default()
        };
    };
    let error = status.last_error.clone().unwrap_or_default();
    if status.refused {
        problems.push(Problem::new(
            component,
            Cause::IdClash,
            format!("refused by kvstoremesh: {error}"),
        ));
    } else if !status.connected {
        let cause = if error.is_empty() {
            Cause::Unreachable
        } else {
            Cause::of_text(&error)
        };
        let message = if error.is_empty() {
            "not connected yet".to_owned()
        } else {
            format!("not connected: {error}")
        };
        problems.push(Problem::new(component, cause, message));
    } else if !status.synced {
        let waiting: Vec<&str> = status
            .kinds
            .iter()
            .filter(|(_, k)| !k.synced)
            .map(|(name, _)| name.as_str())
            .collect();
        problems.push(Problem::new(
            component,
            Cause::SyncInProgress,
            format!(
                "connected, first sync in progress (waiting for {})",
                waiting.join(", ")
            ),
        ));
    }
    peer_report(status)
}

/// Without kvstoremesh: a peer is connected and synced when every agent says so.
fn peer_from_agents(peer: &ClusterName, agents: &[(String, Option<AgentStatus>)]) -> PeerReport {
    let views: Vec<_> = agents
        .iter()
        .filter_map(|(_, s)| s.as_ref())
        .map(|s| s.peers.get(peer.as_str()))
        .collect();
    let all = |f: &dyn Fn(&agent_api::status::PeerView) -> bool| {
        !views.is_empty() && views.iter().all(|v| v.is_some_and(f))
    };
    let first = views.iter().flatten().next();
    PeerReport {
        name: peer.to_string(),
        configured: true,
        connected: all(&|v| v.connected),
        synced: all(&|v| v.phase == Phase::Synced),
        refused: views.iter().flatten().any(|v| v.phase == Phase::Refused),
        cluster_id: first.and_then(|v| v.cluster_id),
        entries: first.map_or(0, |v| v.entries.values().sum::<usize>() as u64),
        kinds: BTreeMap::new(),
        last_error: views.iter().flatten().find_map(|v| v.last_error.clone()),
    }
}

async fn agents_status(
    context: &ClusterContext,
    timeout: Duration,
    problems: &mut Vec<Problem>,
) -> Vec<(String, Option<AgentStatus>)> {
    let mut out = Vec::new();
    for agent in &context.agents {
        let component = format!("node {}", agent.node);
        let status = match probe::http_get(&agent.api, "/v1/peers", timeout).await {
            Ok(answer) if answer.status == 200 => {
                match serde_json::from_slice::<AgentStatus>(&answer.body) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        problems.push(Problem::new(
                            component,
                            Cause::BadAnswer,
                            format!("unexpected /v1/peers body: {e}"),
                        ));
                        None
                    }
                }
            }
            Ok(answer) => {
                problems.push(Problem::new(
                    component,
                    Cause::NotReady,
                    format!("agent answered HTTP {} to /v1/peers", answer.status),
                ));
                None
            }
            Err(e) => {
                problems.push(http_problem(&component, &e));
                None
            }
        };
        out.push((agent.node.to_string(), status));
    }
    out
}

fn nodes_report(
    context: &ClusterContext,
    configured: &[ClusterName],
    agents: &[(String, Option<AgentStatus>)],
    problems: &mut Vec<Problem>,
) -> NodesReport {
    let mut report = NodesReport {
        total: context.agents.len(),
        ..NodesReport::default()
    };
    let mut synced_counts = Vec::new();
    let mut lagging = Vec::new();
    for (node, status) in agents {
        let Some(status) = status else { continue };
        report.reachable += 1;
        let synced: Vec<&ClusterName> = configured
            .iter()
            .filter(|p| {
                status
                    .peers
                    .get(p.as_str())
                    .is_some_and(|v| v.phase == Phase::Synced && v.connected)
            })
            .collect();
        if synced.len() == configured.len() {
            report.connected_to_all += 1;
        } else {
            let missing: Vec<&str> = configured
                .iter()
                .filter(|p| !synced.contains(p))
                .map(ClusterName::as_str)
                .collect();
            lagging.push(format!("{node} misses {}", missing.join(", ")));
        }
        synced_counts.push(synced.len());
    }
    if let (Some(min), Some(max)) = (synced_counts.iter().min(), synced_counts.iter().max()) {
        report.peers_synced = Some(Spread {
            min: *min,
            avg: synced_counts.iter().sum::<usize>() as f64 / synced_counts.len() as f64,
            max: *max,
        });
    }
    if !lagging.is_empty() {
        problems.push(Problem::new(
            "nodes",
            Cause::NodesNotConnected,
            format!(
                "{}/{} nodes connected to all clusters: {}",
                report.connected_to_all,
                report.total,
                lagging.join("; ")
            ),
        ));
    }
    report
}

/// Gathers every selected cluster's status concurrently.
pub async fn mesh_status(mesh: &Mesh, only: Option<&ClusterName>, timeout: Duration) -> MeshReport {
    let selected: Vec<ClusterContext> = match only {
        Some(name) => mesh.cluster(name).into_iter().cloned().collect(),
        None => mesh.clusters.clone(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, context) in selected.into_iter().enumerate() {
        tasks.spawn(async move { (i, cluster_status(&context, timeout).await) });
    }
    let mut clusters = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(pair) => clusters.push(pair),
            Err(e) => clusters.push((
                usize::MAX,
                ClusterReport {
                    name: "?".into(),
                    problems: vec![Problem::new("status", Cause::Other, e.to_string())],
                    ..ClusterReport::default()
                },
            )),
        }
    }
    clusters.sort_by_key(|(i, _)| *i);
    let clusters: Vec<ClusterReport> = clusters.into_iter().map(|(_, c)| c).collect();
    let mut report = MeshReport {
        schema: SCHEMA,
        context: mesh.name.clone(),
        ready: clusters.iter().all(|c| c.ready),
        clusters,
    };
    for clash in mesh::id_clashes(&mesh.clusters) {
        for cluster in report.clusters.iter_mut() {
            if clash.clusters.iter().any(|c| c.as_str() == cluster.name) {
                let others: Vec<&str> = clash
                    .clusters
                    .iter()
                    .map(ClusterName::as_str)
                    .filter(|c| *c != cluster.name)
                    .collect();
                cluster.problems.push(Problem::new(
                    "context",
                    Cause::IdClash,
                    format!(
                        "cluster id {} is also used by {}",
                        clash.id,
                        others.join(", ")
                    ),
                ));
                cluster.ready = false;
                report.ready = false;
            }
        }
    }
    report
}

/// Polls until every cluster is ready or `deadline` passes; `progress` sees each round that
/// is not ready yet. Returns the last report either way.
pub async fn wait_ready(
    mesh: &Mesh,
    only: Option<&ClusterName>,
    timeout: Duration,
    deadline: Duration,
    interval: Duration,
    mut progress: impl FnMut(&MeshReport, Duration),
) -> MeshReport {
    let start = Instant::now();
    loop {
        let report = mesh_status(mesh, only, timeout).await;
        if report.ready || start.elapsed() >= deadline {
            return report;
        }
        progress(&report, start.elapsed());
        let left = deadline.saturating_sub(start.elapsed());
        tokio::time::sleep(interval.min(left)).await;
    }
}

fn yes(b: bool, yes: &str, no: &str) -> String {
    if b { yes.to_owned() } else { no.to_owned() }
}

/// The human-readable report.
pub fn render(report: &MeshReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "context {}", report.context);
    for c in &report.clusters {
        let _ = writeln!(
            out,
            "\ncluster {} (id {}): {}",
            c.name,
            c.id,
            yes(c.ready, "ready", "NOT READY")
        );
        let daemon = |d: &DaemonReport| {
            if d.ready {
                "ready".to_owned()
            } else if d.reachable {
                "not ready".to_owned()
            } else {
                "unreachable".to_owned()
            }
        };
        let _ = writeln!(
            out,
            "  apiserver:       {} ({})",
            daemon(&c.apiserver),
            c.apiserver.url
        );
        let store = match (&c.store.version, c.store.revision) {
            (Some(v), Some(r)) => format!("ready, version {v}, revision {r}"),
            _ => "unreachable".to_owned(),
        };
        let _ = writeln!(
            out,
            "  store:           {store} ({})",
            c.store.endpoints.join(",")
        );
        let mesh = if c.kvstoremesh.enabled {
            let connected = c
                .peers
                .iter()
                .filter(|p| p.configured && p.connected)
                .count();
            let configured = c.peers.iter().filter(|p| p.configured).count();
            format!(
                "{}, {connected}/{configured} peers connected ({})",
                daemon(&c.kvstoremesh.daemon),
                c.kvstoremesh.daemon.url
            )
        } else {
            "off (agents follow peers directly)".to_owned()
        };
        let _ = writeln!(out, "  kvstoremesh:     {mesh}");
        let nodes = if c.nodes.total == 0 {
            "no agents in the context".to_owned()
        } else {
            let spread = c.nodes.peers_synced.as_ref().map_or(String::new(), |s| {
                format!(
                    " [peers synced per node: min {} / avg {:.1} / max {}]",
                    s.min, s.avg, s.max
                )
            });
            format!(
                "{}/{} nodes connected to all clusters{spread}",
                c.nodes.connected_to_all, c.nodes.total
            )
        };
        let _ = writeln!(out, "  nodes:           {nodes}");
        if let Some(n) = c.global_services {
            let _ = writeln!(out, "  global services: {n}");
        }
        if c.peers.is_empty() {
            let _ = writeln!(out, "  peers:           none configured");
        } else {
            let _ = writeln!(out, "  peers:");
        }
        for p in &c.peers {
            let state = if p.refused {
                "refused".to_owned()
            } else {
                format!(
                    "{}, {}",
                    yes(p.connected, "connected", "not connected"),
                    yes(p.synced, "synced", "not synced")
                )
            };
            let kinds: Vec<String> = p
                .kinds
                .iter()
                .filter(|(_, k)| k.entries > 0)
                .map(|(name, k)| format!("{name} {}", k.entries))
                .collect();
            let kinds = if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({})", kinds.join(", "))
            };
            let _ = writeln!(
                out,
                "    {}: {}, {state}, {} entries{kinds}",
                p.name,
                yes(p.configured, "configured", "removed, draining"),
                p.entries
            );
        }
        for p in &c.problems {
            let _ = writeln!(
                out,
                "  ✗ {}: {} [{}]",
                p.component,
                p.message,
                p.cause.name()
            );
            let _ = writeln!(out, "    hint: {}", p.hint);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_api::status::PeerView;

    fn n(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn status(peer: &str) -> PeerStatus {
        PeerStatus::new(n(peer), "2026-01-01T00:00:00Z".into())
    }

    #[test]
    fn each_peer_state_has_its_own_cause() {
        let mut problems = Vec::new();
        peer_from_kvstoremesh(&n("b"), None, &mut problems);
        let mut refused = status("b");
        refused.refused = true;
        refused.last_error =
            Some("peer refused: peer b uses cluster id 1, which is a's own".into());
        peer_from_kvstoremesh(&n("b"), Some(&refused), &mut problems);
        let mut tls = status("b");
        tls.last_error = Some("transport error: invalid peer certificate: UnknownIssuer".into());
        peer_from_kvstoremesh(&n("b"), Some(&tls), &mut problems);
        let mut down = status("b");
        down.last_error = Some("tcp connect error: Connection refused (os error 111)".into());
        peer_from_kvstoremesh(&n("b"), Some(&down), &mut problems);
        let mut missing = status("b");
        missing.last_error = Some("peer b has not published cilium/cluster-config/b".into());
        peer_from_kvstoremesh(&n("b"), Some(&missing), &mut problems);
        let mut syncing = status("b");
        syncing.connected = true;
        peer_from_kvstoremesh(&n("b"), Some(&syncing), &mut problems);
        let mut fine = status("b");
        fine.connected = true;
        fine.synced = true;
        let report = peer_from_kvstoremesh(&n("b"), Some(&fine), &mut problems);
        assert!(report.synced);
        let causes: Vec<Cause> = problems.iter().map(|p| p.cause).collect();
        assert_eq!(
            causes,
            [
                Cause::NotPickedUp,
                Cause::IdClash,
                Cause::Tls,
                Cause::ConnectionRefused,
                Cause::ConfigMissing,
                Cause::SyncInProgress
            ]
        );
        assert!(problems[5].message.contains("waiting for identities, ip"));
    }

    #[test]
    fn nodes_connected_to_all() {
        let context = ClusterContext::parse(
            crate::mesh::tests::context_yaml(
                "a",
                1,
                "agents:\n- {node: n1, api: 'http://127.0.0.1:1'}\n- {node: n2, api: \
                 'http://127.0.0.1:2'}\n- {node: n3, api: 'http://127.0.0.1:3'}\n",
            )
            .as_bytes(),
        )
        .unwrap();
        let view = |synced: bool| PeerView {
            name: "b".into(),
            configured: true,
            phase: if synced {
                Phase::Synced
            } else {
                Phase::Listing
            },
            connected: true,
            ..PeerView::default()
        };
        let agent = |synced: bool| AgentStatus {
            cluster: "a".into(),
            peers: BTreeMap::from([("b".to_owned(), view(synced))]),
            ..AgentStatus::default()
        };
        let agents = vec![
            ("n1".to_owned(), Some(agent(true))),
            ("n2".to_owned(), Some(agent(false))),
            ("n3".to_owned(), None),
        ];
        let mut problems = Vec::new();
        let report = nodes_report(&context, &[n("b")], &agents, &mut problems);
        assert_eq!(
            (report.total, report.reachable, report.connected_to_all),
            (3, 2, 1)
        );
        let spread = report.peers_synced.unwrap();
        assert_eq!((spread.min, spread.max), (0, 1));
        assert!((spread.avg - 0.5).abs() < 1e-9);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .message
                .starts_with("1/3 nodes connected to all clusters: n2 misses b")
        );

        let direct = peer_from_agents(&n("b"), &agents);
        assert!(direct.connected && !direct.synced);
    }

    #[test]
    fn rendering_and_json() {
        let report = MeshReport {
            schema: SCHEMA,
            context: "dev".into(),
            ready: false,
            clusters: vec![ClusterReport {
                name: "a".into(),
                id: 1,
                peers: vec![PeerReport {
                    name: "b".into(),
                    configured: true,
                    connected: true,
                    synced: true,
                    entries: 3,
                    kinds: BTreeMap::from([(
                        "nodes".to_owned(),
                        KindStatus {
                            synced: true,
                            entries: 3,
                        },
                    )]),
                    ..PeerReport::default()
                }],
                problems: vec![Problem::new("store", Cause::Tls, "handshake failed")],
                ..ClusterReport::default()
            }],
        };
        let text = render(&report);
        assert!(
            text.contains("b: configured, connected, synced, 3 entries (nodes 3)"),
            "{text}"
        );
        assert!(text.contains("✗ store: handshake failed [tls]"), "{text}");
        assert!(text.contains("hint: the TLS handshake failed"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["schema"], 1);
        assert_eq!(json["clusters"][0]["problems"][0]["cause"], "tls");
        assert_eq!(json["clusters"][0]["kvstoremesh"]["enabled"], false);
        assert_eq!(report.missing(), ["a: store: handshake failed"]);
    }
}
