//! Routes to remote nodes' pod CIDRs, programmed over netlink and reconciled by diff.
//!
//! Every route the agent makes carries its own routing protocol number
//! ([`ROUTE_PROTOCOL`], shown as `proto 196` by `ip route`), so the actual state is exactly
//! the routes with that number and routes anyone else made are never touched.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::convert::Routes;

/// The routing protocol number of the agent's routes.
pub const ROUTE_PROTOCOL: u8 = 196;

/// A netlink connection in the calling thread's network namespace.
#[derive(Debug)]
pub struct RouteSync {
    handle: Handle,
    runtime: tokio::runtime::Runtime,
}

fn message(dst: Ipv4Addr, len: u8, via: Option<Ipv4Addr>) -> RouteMessage {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, len)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
    if let Some(via) = via {
        builder = builder.gateway(via);
    }
    builder.build()
}

impl RouteSync {
    /// Opens the connection (on a runtime of its own: the datapath owner is a plain thread).
    pub fn new() -> std::io::Result<RouteSync> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            Ok::<_, std::io::Error>(handle)
        })?;
        Ok(RouteSync { handle, runtime })
    }

    /// The agent's routes in the main table now.
    pub fn actual(&self) -> Result<Routes, String> {
        self.runtime.block_on(async {
            let mut stream = self
                .handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute();
            let mut routes = Routes::new();
            while let Some(route) = stream
                .try_next()
                .await
                .map_err(|e| format!("listing routes: {e}"))?
            {
                if route.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
                    || route.header.table != RouteHeader::RT_TABLE_MAIN
                {
                    continue;
                }
                let mut dst = Ipv4Addr::UNSPECIFIED;
                let mut via = None;
                for attribute in &route.attributes {
                    match attribute {
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = Some(*a),
                        _ => {}
                    }
                }
                if let Some(via) = via {
                    routes.insert((dst, route.header.destination_prefix_length), via);
                }
            }
            Ok(routes)
        })
    }

    /// Makes the routes `desired`, recording what succeeded in `actual`; one error per route
    /// that could not be written or removed.
    pub fn apply(&self, desired: &Routes, actual: &mut Routes) -> Vec<String> {
        let mut errors = Vec::new();
        self.runtime.block_on(async {
            for (&(dst, len), &via) in desired {
                if actual.get(&(dst, len)) == Some(&via) {
                    continue;
                }
                let request = self.handle.route().add(message(dst, len, Some(via)));
                match request.replace().execute().await {
                    Ok(()) => {
                        actual.insert((dst, len), via);
                    }
                    Err(e) => errors.push(format!("route {dst}/{len} via {via}: {e}")),
                }
            }
            let stale: Vec<_> = actual
                .keys()
                .filter(|k| !desired.contains_key(k))
                .copied()
                .collect();
            for (dst, len) in stale {
                let via = actual.get(&(dst, len)).copied();
                match self
                    .handle
                    .route()
                    .del(message(dst, len, via))
                    .execute()
                    .await
                {
                    Ok(()) => {
                        actual.remove(&(dst, len));
                    }
                    Err(e) => errors.push(format!("removing route {dst}/{len}: {e}")),
                }
            }
        });
        errors
    }
}
