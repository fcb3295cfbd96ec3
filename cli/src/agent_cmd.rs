//! `clustermesh agent ...`: the node agent's desired-state tables, read from its local API.

use std::fmt::Write as _;
use std::net::SocketAddr;

use agent_api::{
    ANY_IDENTITY, ANY_PORT, AgentStatus, BackendState, DatapathStatus, DropView, IpcacheEntry,
    PolicyView, RouteEntry, ServiceEntry,
};
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use model::endpoint::EndpointRegistration;

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Services: each frontend and the backends it is balanced over, with their cluster.
    Services(ShowArgs),
    /// The ipcache: each IP (or prefix), its security identity and the cluster it is from.
    Ipcache(ShowArgs),
    /// Policy: the allow table (direction, local identity, peer identity, port, protocol)
    /// and the local identities under default-deny.
    Policy(ShowArgs),
    /// Routes to every remote node's pod CIDRs.
    Routes(ShowArgs),
    /// Peers: phase, connection, health and what came from each.
    Peers(ShowArgs),
    /// Recent packets the policy program dropped: who, to whom, why (oldest first).
    Drops(ShowArgs),
    /// Pod interfaces registered by clustermesh-cni.
    Endpoints(ShowArgs),
    /// The datapath: on or off (and why), map fills, forwarded/dropped counters, errors.
    Datapath(ShowArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns, for people.
    Table,
    /// The API's JSON, pretty-printed.
    Json,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The agent's API address.
    #[arg(
        long,
        value_name = "ADDR",
        env = "CLUSTERMESH_AGENT_API",
        default_value = "127.0.0.1:9890"
    )]
    api: SocketAddr,

    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub fn run(cmd: AgentCommand) -> anyhow::Result<()> {
    let (args, path) = match &cmd {
        AgentCommand::Services(a) => (a, "/v1/services"),
        AgentCommand::Ipcache(a) => (a, "/v1/ipcache"),
        AgentCommand::Policy(a) => (a, "/v1/policy"),
        AgentCommand::Routes(a) => (a, "/v1/routes"),
        AgentCommand::Peers(a) => (a, "/v1/peers"),
        AgentCommand::Drops(a) => (a, "/v1/drops"),
        AgentCommand::Endpoints(a) => (a, "/v1/endpoints"),
        AgentCommand::Datapath(a) => (a, "/v1/datapath"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let body = runtime.block_on(agent_api::get_raw(args.api, path))?;
    let text = match args.output {
        Output::Json => {
            let value: serde_json::Value =
                serde_json::from_slice(&body).context("the agent sent invalid JSON")?;
            serde_json::to_string_pretty(&value)? + "\n"
        }
        Output::Table => {
            let parse = || -> anyhow::Result<String> {
                Ok(match cmd {
                    AgentCommand::Services(_) => {
                        services(&serde_json::from_slice::<Vec<_>>(&body)?)
                    }
                    AgentCommand::Ipcache(_) => ipcache(&serde_json::from_slice::<Vec<_>>(&body)?),
                    AgentCommand::Policy(_) => policy(&serde_json::from_slice(&body)?),
                    AgentCommand::Routes(_) => routes(&serde_json::from_slice::<Vec<_>>(&body)?),
                    AgentCommand::Peers(_) => peers(&serde_json::from_slice(&body)?),
                    AgentCommand::Drops(_) => drops(&serde_json::from_slice::<Vec<_>>(&body)?),
                    AgentCommand::Endpoints(_) => {
                        endpoints(&serde_json::from_slice::<Vec<_>>(&body)?)
                    }
                    AgentCommand::Datapath(_) => datapath(&serde_json::from_slice(&body)?),
                })
            };
            parse().context("the agent sent unexpected JSON")?
        }
    };
    print!("{text}");
    Ok(())
}

/// Rows as aligned columns; the last column is not padded.
fn columns(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn drops(list: &[DropView]) -> String {
    let rows = list
        .iter()
        .map(|d| {
            let time = humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(d.time_ms),
            );
            vec![
                time.to_string(),
                d.endpoint.clone().unwrap_or_else(|| "-".to_owned()),
                d.direction.clone(),
                d.protocol.clone(),
                format!(
                    "{} (id {}, cluster {})",
                    d.src, d.src_identity, d.src_cluster
                ),
                format!(
                    "{} (id {}, cluster {})",
                    d.dst, d.dst_identity, d.dst_cluster
                ),
                d.reason.clone(),
            ]
        })
        .collect();
    columns(
        &[
            "TIME",
            "ENDPOINT",
            "DIRECTION",
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "REASON",
        ],
        rows,
    )
}

fn endpoints(list: &[EndpointRegistration]) -> String {
    let rows = list
        .iter()
        .map(|e| {
            vec![
                format!("{}/{}", e.namespace, e.pod),
                e.ip.to_string(),
                format!("{} ({})", e.host_ifname, e.host_ifindex),
                e.container_id.clone(),
            ]
        })
        .collect();
    columns(&["POD", "IP", "HOST INTERFACE", "CONTAINER"], rows)
}

fn datapath(status: &DatapathStatus) -> String {
    let mut out = format!("mode: {}\n", status.mode);
    if let Some(reason) = &status.off_reason {
        let _ = writeln!(out, "off because: {reason}");
    }
    if let Some(dir) = &status.pin_dir {
        let _ = writeln!(
            out,
            "pinned under: {dir} (bpftool map dump pinned {dir}/<map>)"
        );
    }
    if let Some(cgroup) = &status.cgroup {
        let _ = writeln!(out, "socket load balancer on: {cgroup}");
    }
    let _ = writeln!(out, "reconciles: {}", status.reconciles);
    if !status.maps.is_empty() {
        out.push('\n');
        out.push_str(&columns(
            &["MAP", "ENTRIES", "CAPACITY"],
            status
                .maps
                .iter()
                .map(|m| vec![m.map.clone(), m.entries.to_string(), m.capacity.to_string()])
                .collect(),
        ));
    }
    if !status.counters.is_empty() {
        out.push('\n');
        out.push_str(&columns(
            &["REASON", "DIRECTION", "PACKETS", "BYTES"],
            status
                .counters
                .iter()
                .map(|c| {
                    vec![
                        c.reason.clone(),
                        c.direction.clone(),
                        c.packets.to_string(),
                        c.bytes.to_string(),
                    ]
                })
                .collect(),
        ));
    }
    for (table, n) in &status.skipped {
        let _ = writeln!(
            out,
            "not programmable in the IPv4 datapath: {n} {table} entries"
        );
    }
    for error in &status.errors {
        let _ = writeln!(out, "error: {error}");
    }
    out
}

fn services(list: &[ServiceEntry]) -> String {
    let rows = list
        .iter()
        .map(|s| {
            let backends = if s.backends.is_empty() {
                "(none)".to_owned()
            } else {
                s.backends
                    .iter()
                    .map(|b| {
                        let addr = match b.ip {
                            std::net::IpAddr::V4(ip) => format!("{ip}:{}", b.port),
                            std::net::IpAddr::V6(ip) => format!("[{ip}]:{}", b.port),
                        };
                        match b.state {
                            BackendState::Active => format!("{addr} ({})", b.cluster),
                            state => format!("{addr} ({}, {state})", b.cluster),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            vec![
                s.frontend.to_string(),
                s.service.to_string(),
                if s.port_name.is_empty() {
                    "-".to_owned()
                } else {
                    s.port_name.clone()
                },
                if s.global { "yes" } else { "no" }.to_owned(),
                s.affinity.to_string(),
                backends,
            ]
        })
        .collect();
    columns(
        &[
            "FRONTEND", "SERVICE", "PORT", "GLOBAL", "AFFINITY", "BACKENDS",
        ],
        rows,
    )
}

fn ipcache(list: &[IpcacheEntry]) -> String {
    let rows = list
        .iter()
        .map(|e| {
            vec![
                e.prefix.to_string(),
                e.identity.to_string(),
                e.cluster.to_string(),
                e.host_ip
                    .map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
            ]
        })
        .collect();
    columns(&["PREFIX", "IDENTITY", "CLUSTER", "HOST"], rows)
}

fn policy(view: &PolicyView) -> String {
    let rows = view
        .allow
        .iter()
        .map(|e| {
            let peer = e.key.peer_identity.get();
            vec![
                e.key.direction.to_string(),
                e.key.local_identity.to_string(),
                if peer == ANY_IDENTITY {
                    "any".to_owned()
                } else {
                    peer.to_string()
                },
                if e.key.port == ANY_PORT {
                    "any".to_owned()
                } else {
                    e.key.port.to_string()
                },
                e.key.protocol.to_string(),
                e.policies.join(", "),
            ]
        })
        .collect();
    let mut out = columns(
        &["DIRECTION", "LOCAL", "PEER", "PORT", "PROTOCOL", "POLICIES"],
        rows,
    );
    out.push('\n');
    let enforced = view
        .enforcement
        .iter()
        .map(|e| vec![e.direction.to_string(), e.local_identity.to_string()])
        .collect();
    out.push_str(&columns(&["DEFAULT-DENY", "LOCAL"], enforced));
    out
}

fn routes(list: &[RouteEntry]) -> String {
    let rows = list
        .iter()
        .map(|r| {
            vec![
                r.prefix.to_string(),
                r.cluster.to_string(),
                r.node.to_string(),
                r.via.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
            ]
        })
        .collect();
    columns(&["PREFIX", "CLUSTER", "NODE", "VIA"], rows)
}

fn peers(status: &AgentStatus) -> String {
    let rows = status
        .peers
        .values()
        .map(|p| {
            let entries = |k: &str| p.entries.get(k).copied().unwrap_or(0).to_string();
            let health = serde_json::to_value(p.health)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let phase = serde_json::to_value(p.phase)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            vec![
                p.name.clone(),
                p.cluster_id
                    .map_or_else(|| "-".to_owned(), |id| id.to_string()),
                if p.restored {
                    format!("{phase} (restored)")
                } else {
                    phase
                },
                if p.connected { "yes" } else { "no" }.to_owned(),
                health,
                entries("nodes"),
                entries("services"),
                entries("identities"),
                entries("ips"),
                p.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = format!(
        "cluster {}: local {}, {} services ({} backends), {} ipcache, {} policy, {} routes\n\n",
        status.cluster,
        if status.local_restored {
            "restored"
        } else if status.local_synced {
            "synced"
        } else {
            "not synced"
        },
        status.counts.services,
        status.counts.backends,
        status.counts.ipcache,
        status.counts.policy,
        status.counts.routes,
    );
    out.push_str(&columns(
        &[
            "PEER",
            "ID",
            "PHASE",
            "CONNECTED",
            "HEALTH",
            "NODES",
            "SERVICES",
            "IDENTITIES",
            "IPS",
            "ERROR",
        ],
        rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn services_table() {
        let list: Vec<ServiceEntry> = serde_json::from_value(json!([{
            "frontend": {"ip": "10.96.0.10", "port": 80, "protocol": "TCP"},
            "service": {"namespace": "shop", "name": "web"},
            "port_name": "http", "global": true, "affinity": "local",
            "backends": [
                {"ip": "10.1.0.5", "port": 8080, "cluster": "a", "state": "active"},
                {"ip": "10.2.0.5", "port": 8080, "cluster": "b", "state": "stale"}
            ]
        }]))
        .unwrap();
        assert_eq!(
            services(&list),
            "FRONTEND           SERVICE   PORT  GLOBAL  AFFINITY  BACKENDS\n\
             10.96.0.10:80/TCP  shop/web  http  yes     local     10.1.0.5:8080 (a), 10.2.0.5:8080 (b, stale)\n"
        );
    }

    #[test]
    fn policy_table_names_wildcards() {
        let view: PolicyView = serde_json::from_value(json!({
            "allow": [{"direction": "ingress", "local_identity": 65792, "peer_identity": 0,
                       "port": 0, "protocol": "ANY", "policies": ["NetworkPolicy shop/p"]}],
            "enforcement": [{"direction": "ingress", "local_identity": 65792}]
        }))
        .unwrap();
        let text = policy(&view);
        assert!(
            text.contains("ingress    65792  any   any   ANY       NetworkPolicy shop/p"),
            "{text}"
        );
        assert!(
            text.contains("DEFAULT-DENY  LOCAL\ningress       65792"),
            "{text}"
        );
    }
}
