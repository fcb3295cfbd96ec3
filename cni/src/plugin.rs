//! The four commands, end to end.

use std::io::Read;
use std::path::Path;

use model::endpoint::EndpointRegistration;

use crate::agent::AgentClient;
use crate::config::{CniVersion, NetConf};
use crate::env::{self, PodRef, Request};
use crate::error::{Error, ErrorReply, describe};
use crate::ipam::{Allocator, Owner};
use crate::link::{self, Plan};
use crate::result::{AddResult, VersionResult};

/// Runs one invocation: the `CNI_*` variables through `var`, the network config on `stdin`.
/// Returns what to print on stdout (nothing for DEL and CHECK), or the error to print before
/// exiting non-zero.
pub fn run(
    var: impl Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
) -> Result<Option<String>, ErrorReply> {
    // Read even for VERSION, so a runtime writing its `{"cniVersion":..}` never hits a closed
    // pipe.
    let mut input = Vec::new();
    stdin
        .read_to_end(&mut input)
        .map_err(|e| Error::Stdin(e).reply(CniVersion::V1_0_0))?;
    let version = CniVersion::requested(&input);
    Request::from_env(var)
        .map_err(Error::from)
        .and_then(|request| execute(request, &input))
        .map_err(|e| e.reply(version))
}

fn execute(request: Request, input: &[u8]) -> Result<Option<String>, Error> {
    let conf = || NetConf::parse(input);
    match request {
        Request::Version => Ok(Some(to_json(&VersionResult::current()))),
        Request::Add { owner, netns, pod } => add(&conf()?, &owner, &netns, &pod).map(Some),
        Request::Check { owner, netns } => check(&conf()?, &owner, &netns).map(|()| None),
        Request::Del { owner } => del(&conf()?, &owner).map(|()| None),
    }
}

fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("results always serialize")
}

fn allocator(conf: &NetConf) -> Allocator {
    Allocator::new(&conf.data_dir, &conf.name, conf.pod_cidr)
}

/// Allocates, builds the pair, registers with the agent; a failure undoes every earlier step
/// this invocation took (an address it found already held stays held).
fn add(conf: &NetConf, owner: &Owner, netns_path: &Path, pod: &PodRef) -> Result<String, Error> {
    let netns = env::open_netns(netns_path)?;
    let allocator = allocator(conf);
    let (ip, fresh) = allocator.allocate(owner)?;
    let release = || {
        if fresh && let Err(e) = allocator.release(owner) {
            eprintln!(
                "clustermesh-cni: releasing {ip} after a failed ADD: {}",
                describe(&e)
            );
        }
    };
    let gateway = conf.pod_cidr.gateway();
    let plan = Plan {
        owner,
        netns: &netns,
        netns_path,
        ip,
        gateway,
        mtu: conf.mtu,
    };
    let attached = link::attach(&plan).inspect_err(|_| release())?;
    let netns_text = netns_path.display().to_string();
    let registration = EndpointRegistration {
        container_id: owner.container_id.clone(),
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        ifname: owner.ifname.clone(),
        host_ifname: attached.host.name.clone(),
        host_ifindex: attached.host.index,
        ip,
        netns: netns_text.clone(),
    };
    let registered = registration
        .validate()
        .map_err(Error::Registration)
        .and_then(|()| Ok(AgentClient::new(conf.agent).register(&registration)?));
    if let Err(e) = registered {
        if let Err(undo) = link::detach(owner) {
            eprintln!(
                "clustermesh-cni: removing {} after a failed ADD: {}",
                attached.host.name,
                describe(&undo)
            );
        }
        release();
        return Err(e);
    }
    Ok(to_json(&AddResult::new(
        conf.cni_version,
        &attached,
        &netns_text,
        ip,
        gateway,
    )))
}

/// The allocation, then the host side, then the pod side.
fn check(conf: &NetConf, owner: &Owner, netns_path: &Path) -> Result<(), Error> {
    let netns = env::open_netns(netns_path)?;
    let ip = allocator(conf).lookup(owner)?;
    link::check(owner, &netns, netns_path, ip)?;
    Ok(())
}

/// Idempotent: what is already gone is fine. An unreachable agent is only reported: it
/// forgets endpoints whose interface is gone.
fn del(conf: &NetConf, owner: &Owner) -> Result<(), Error> {
    link::detach(owner)?;
    allocator(conf).release(owner)?;
    if let Err(e) = AgentClient::new(conf.agent).deregister(&owner.container_id) {
        eprintln!(
            "clustermesh-cni: DEL of {} succeeded without the agent: {}",
            owner.container_id,
            describe(&e)
        );
    }
    Ok(())
}
