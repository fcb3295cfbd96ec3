//! The pod's veth pair, over rtnetlink: made, removed and checked.
//!
//! The node side runs on the calling thread, which stays in the node's namespace. The pod side
//! runs on a dedicated thread that enters the pod's namespace with `setns` and opens its own
//! netlink socket there (a socket belongs to the namespace it was created in), so the
//! process's other threads never leave the node.

use std::fs::{self, File};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::error::{Code, describe};
use crate::ipam::Owner;

/// Where the node's forwarding switch lives (per network namespace).
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// One end of the pair, as the result reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    /// The interface name.
    pub name: String,
    /// The interface index in its namespace.
    pub index: u32,
    /// The MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// What ADD builds.
#[derive(Clone, Copy, Debug)]
pub struct Plan<'a> {
    /// The container and its interface name.
    pub owner: &'a Owner,
    /// The pod's namespace, open.
    pub netns: &'a File,
    /// Its path, for messages.
    pub netns_path: &'a Path,
    /// The pod's address (/32).
    pub ip: Ipv4Addr,
    /// The pod CIDR's first address, carried by the host side.
    pub gateway: Ipv4Addr,
    /// Both ends' MTU, if set.
    pub mtu: Option<u32>,
}

/// The pair ADD built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// The node side.
    pub host: Iface,
    /// The pod side.
    pub pod: Iface,
}

/// A failure while making, removing or checking the pair.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The kernel refused a netlink request.
    #[error("{step}")]
    Netlink {
        /// What we were doing.
        step: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// The host side's name is taken: this container and interface are attached already (or
    /// a DEL is owed).
    #[error("host interface {name} already exists: the container's interface is attached already")]
    Exists {
        /// The host side's name.
        name: String,
    },
    /// An interface that should be there is not.
    #[error("interface {name} does not exist in {place}")]
    Missing {
        /// The interface.
        name: String,
        /// "the node's namespace" or the pod's netns path.
        place: String,
    },
    /// CHECK found an interface not as ADD left it.
    #[error("{0}")]
    Mismatch(String),
    /// The pod's namespace could not be entered (not a network namespace, or no permission).
    #[error("CNI_NETNS {}: cannot enter the network namespace", path.display())]
    Setns {
        /// The netns path.
        path: PathBuf,
        /// Why.
        #[source]
        source: Errno,
    },
    /// No netlink socket (or no runtime to drive it) could be made.
    #[error("opening a netlink socket")]
    Socket(#[source] io::Error),
    /// The node's IPv4 forwarding could not be turned on.
    #[error("enabling IPv4 forwarding ({IP_FORWARD})")]
    Forwarding(#[source] io::Error),
}

impl NetError {
    /// The CNI code for this error.
    pub fn code(&self) -> Code {
        match self {
            NetError::Netlink { .. } | NetError::Exists { .. } => Code::Netlink,
            NetError::Missing { .. } | NetError::Mismatch(_) => Code::CheckFailed,
            NetError::Setns { .. } => Code::InvalidEnvironment,
            NetError::Socket(_) | NetError::Forwarding(_) => Code::Io,
        }
    }
}

fn step(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let step = what.into();
    move |source| NetError::Netlink { step, source }
}

/// Whether a netlink request failed with `errno`.
fn is_errno(error: &rtnetlink::Error, errno: Errno) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -(errno as i32))
}

/// The host side's name: `cm` and 13 hex digits of a stable hash (FNV-1a 64) of container id
/// and interface name, so DEL finds it from the same two variables after any restart or
/// upgrade, and it fits the kernel's 15 bytes.
pub fn host_ifname(owner: &Owner) -> String {
    format!("cm{}", digest(owner))
}

/// The pod side's name until it is inside the pod and renamed: unique in the node too.
fn peer_ifname(owner: &Owner) -> String {
    format!("cp{}", digest(owner))
}

fn digest(owner: &Owner) -> String {
    let bytes = owner
        .container_id
        .bytes()
        .chain([0])
        .chain(owner.ifname.bytes());
    let hash = bytes.fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")[..13].to_owned()
}

/// Runs `work` with a netlink handle opened in the calling thread's namespace.
fn with_netlink<T, Fut>(work: impl FnOnce(Handle) -> Fut) -> Result<T, NetError>
where
    Fut: Future<Output = Result<T, NetError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(NetError::Socket)?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
        tokio::spawn(connection);
        work(handle).await
    })
}

/// Runs `work` with a netlink handle opened inside the pod's namespace, on a thread of its own.
fn in_netns<T, Fut>(
    netns: &File,
    path: &Path,
    work: impl FnOnce(Handle) -> Fut + Send,
) -> Result<T, NetError>
where
    T: Send,
    Fut: Future<Output = Result<T, NetError>>,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(netns, CloneFlags::CLONE_NEWNET).map_err(|source| NetError::Setns {
                    path: path.to_owned(),
                    source,
                })?;
                with_netlink(work)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetError> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if is_errno(&e, Errno::ENODEV) => Ok(None),
        Err(e) => Err(step(format!("looking up interface {name}"))(e)),
    }
}

fn iface(link: &LinkMessage, name: &str) -> Iface {
    let mac = link
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Address(bytes) => Some(
                bytes
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default();
    Iface {
        name: name.to_owned(),
        index: link.header.index,
        mac,
    }
}

fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

/// Builds the pair; on any failure removes what it made, so nothing half-made stays.
pub fn attach(plan: &Plan<'_>) -> Result<Attached, NetError> {
    let host = create_veth(plan)?;
    match finish(plan, &host) {
        Ok(pod) => Ok(Attached { host, pod }),
        Err(e) => {
            if let Err(undo) = detach(plan.owner) {
                eprintln!(
                    "clustermesh-cni: removing {} after a failed ADD: {}",
                    host.name,
                    describe(&undo)
                );
            }
            Err(e)
        }
    }
}

/// Creates the pair in the node's namespace, both ends down.
fn create_veth(plan: &Plan<'_>) -> Result<Iface, NetError> {
    let host_name = host_ifname(plan.owner);
    let peer_name = peer_ifname(plan.owner);
    with_netlink(|handle| async move {
        let mut veth = LinkVeth::new(&host_name, &peer_name);
        if let Some(mtu) = plan.mtu {
            veth = veth.mtu(mtu);
        }
        handle
            .link()
            .add(veth.build())
            .execute()
            .await
            .map_err(|e| {
                if is_errno(&e, Errno::EEXIST) {
                    NetError::Exists {
                        name: host_name.clone(),
                    }
                } else {
                    step(format!("creating veth pair {host_name}/{peer_name}"))(e)
                }
            })?;
        let link = link_by_name(&handle, &host_name)
            .await?
            .ok_or_else(|| NetError::Missing {
                name: host_name.clone(),
                place: "the node's namespace".to_owned(),
            })?;
        Ok(iface(&link, &host_name))
    })
}

/// Moves the peer into the pod and configures both ends; returns the pod side.
fn finish(plan: &Plan<'_>, host: &Iface) -> Result<Iface, NetError> {
    let peer_name = &peer_ifname(plan.owner);
    with_netlink(|handle| async move {
        let peer = link_by_name(&handle, peer_name)
            .await?
            .ok_or_else(|| NetError::Missing {
                name: peer_name.to_owned(),
                place: "the node's namespace".to_owned(),
            })?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(peer.header.index)
                    .setns_by_fd(plan.netns.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(step(format!(
                "moving {peer_name} into {}",
                plan.netns_path.display()
            )))
    })?;
    let pod = in_netns(plan.netns, plan.netns_path, |handle| {
        configure_pod(handle, plan, peer_name)
    })?;
    with_netlink(|handle| configure_host(handle, plan, host))?;
    fs::write(IP_FORWARD, "1").map_err(NetError::Forwarding)?;
    Ok(pod)
}

/// In the pod: rename the peer, bring it and `lo` up, give it the /32 address, a link route
/// to the gateway and the default route through it.
async fn configure_pod(
    handle: Handle,
    plan: &Plan<'_>,
    peer_name: &str,
) -> Result<Iface, NetError> {
    let ifname = &plan.owner.ifname;
    let place = plan.netns_path.display().to_string();
    let peer = link_by_name(&handle, peer_name)
        .await?
        .ok_or_else(|| NetError::Missing {
            name: peer_name.to_owned(),
            place: place.clone(),
        })?;
    let index = peer.header.index;
    let mut rename = LinkUnspec::new_with_index(index).name(ifname.clone());
    if let Some(mtu) = plan.mtu {
        rename = rename.mtu(mtu);
    }
    handle
        .link()
        .set(rename.build())
        .execute()
        .await
        .map_err(step(format!("renaming {peer_name} to {ifname} in {place}")))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(step(format!("bringing {ifname} up in {place}")))?;
    let lo = link_by_name(&handle, "lo")
        .await?
        .ok_or_else(|| NetError::Missing {
            name: "lo".to_owned(),
            place: place.clone(),
        })?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(lo.header.index).up().build())
        .execute()
        .await
        .map_err(step(format!("bringing lo up in {place}")))?;
    handle
        .address()
        .add(index, IpAddr::V4(plan.ip), 32)
        .execute()
        .await
        .map_err(step(format!(
            "adding {}/32 to {ifname} in {place}",
            plan.ip
        )))?;
    let gateway = plan.gateway;
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(gateway, 32)
                .output_interface(index)
                .scope(RouteScope::Link)
                .build(),
        )
        .execute()
        .await
        .map_err(step(format!("adding the route to {gateway} in {place}")))?;
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway)
                .output_interface(index)
                .build(),
        )
        .execute()
        .await
        .map_err(step(format!(
            "adding the default route via {gateway} in {place}"
        )))?;
    Ok(iface(&peer, ifname))
}

/// On the node: bring the host side up with the gateway /32 (every host side carries it, as
/// the ptp plugin does) and route the pod's /32 to it.
async fn configure_host(handle: Handle, plan: &Plan<'_>, host: &Iface) -> Result<(), NetError> {
    let name = &host.name;
    handle
        .link()
        .set(LinkUnspec::new_with_index(host.index).up().build())
        .execute()
        .await
        .map_err(step(format!("bringing {name} up")))?;
    handle
        .address()
        .add(host.index, IpAddr::V4(plan.gateway), 32)
        .execute()
        .await
        .map_err(step(format!("adding {}/32 to {name}", plan.gateway)))?;
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(plan.ip, 32)
                .output_interface(host.index)
                .scope(RouteScope::Link)
                .build(),
        )
        .execute()
        .await
        .map_err(step(format!("adding the route to {} via {name}", plan.ip)))
}

/// Removes the pair (deleting the host side deletes the pod side too, wherever it is);
/// returns whether there was one.
pub fn detach(owner: &Owner) -> Result<bool, NetError> {
    let name = host_ifname(owner);
    with_netlink(|handle| async move {
        let Some(link) = link_by_name(&handle, &name).await? else {
            return Ok(false);
        };
        match handle.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::ENODEV) => Ok(false),
            Err(e) => Err(step(format!("deleting {name}"))(e)),
        }
    })
}

/// Verifies the pair as ADD left it: the host side up, the pod side up with its /32.
pub fn check(owner: &Owner, netns: &File, netns_path: &Path, ip: Ipv4Addr) -> Result<(), NetError> {
    let host_name = host_ifname(owner);
    with_netlink(|handle| async move {
        let link = link_by_name(&handle, &host_name)
            .await?
            .ok_or_else(|| NetError::Missing {
                name: host_name.clone(),
                place: "the node's namespace".to_owned(),
            })?;
        if !is_up(&link) {
            return Err(NetError::Mismatch(format!(
                "host interface {host_name} is down"
            )));
        }
        Ok(())
    })?;
    let ifname = &owner.ifname;
    let place = netns_path.display().to_string();
    in_netns(netns, netns_path, |handle| async move {
        let link = link_by_name(&handle, ifname)
            .await?
            .ok_or_else(|| NetError::Missing {
                name: ifname.clone(),
                place: place.clone(),
            })?;
        if !is_up(&link) {
            return Err(NetError::Mismatch(format!(
                "interface {ifname} in {place} is down"
            )));
        }
        let addresses: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(link.header.index)
            .execute()
            .try_collect()
            .await
            .map_err(step(format!(
                "listing the addresses of {ifname} in {place}"
            )))?;
        let carried = addresses.iter().any(|address| {
            address.header.index == link.header.index
                && address.header.prefix_len == 32
                && address
                    .attributes
                    .contains(&AddressAttribute::Address(IpAddr::V4(ip)))
        });
        if !carried {
            return Err(NetError::Mismatch(format!(
                "interface {ifname} in {place} does not carry {ip}/32"
            )));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let owner = |id: &str, ifname: &str| Owner {
            container_id: id.to_owned(),
            ifname: ifname.to_owned(),
        };
        // Pinned: DEL after an upgrade must find the name an older ADD chose.
        assert_eq!(host_ifname(&owner("abc", "eth0")), "cm540c4ae81be81");
        let names = [
            host_ifname(&owner("abc", "eth0")),
            host_ifname(&owner("abc", "eth1")),
            host_ifname(&owner("abd", "eth0")),
            host_ifname(&owner("abceth", "0")),
        ];
        for name in &names {
            assert_eq!(name.len(), 15, "{name}");
            assert!(model::endpoint::valid_ifname(name), "{name}");
        }
        let distinct: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(distinct.len(), names.len());
        assert_ne!(peer_ifname(&owner("abc", "eth0")), names[0]);
    }
}
