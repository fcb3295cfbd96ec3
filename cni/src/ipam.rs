//! Host-local address allocation: one file per allocated address in `dataDir/<network>/`,
//! named by the address and holding its owner, changed only under an exclusive lock on
//! `dataDir/<network>/lock` so concurrent invocations never hand out one address twice.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::config::PodCidr;
use crate::error::Code;

/// Who holds an address: one interface of one container.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

impl Owner {
    fn record(&self) -> String {
        format!("{}\n{}\n", self.container_id, self.ifname)
    }
}

/// An allocation that could not be made or undone.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every pod address of the CIDR is held.
    #[error("no free address left in {cidr}")]
    Exhausted {
        /// The node's pod CIDR.
        cidr: PodCidr,
    },
    /// The owner holds no address (CHECK of a container ADD never attached).
    #[error("no address is allocated to container {} interface {} in {}", owner.container_id, owner.ifname, dir.display())]
    NotAllocated {
        /// Who was asked about.
        owner: Owner,
        /// The network's allocation directory.
        dir: PathBuf,
    },
    /// The allocation directory could not be read or written.
    #[error("allocation store {}", path.display())]
    Io {
        /// The file or directory at fault.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl IpamError {
    /// The CNI code for this error.
    pub fn code(&self) -> Code {
        match self {
            IpamError::Exhausted { .. } => Code::RangeExhausted,
            IpamError::NotAllocated { .. } => Code::UnknownContainer,
            IpamError::Io { .. } => Code::Io,
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The allocations of one network on this node.
#[derive(Clone, Debug)]
pub struct Allocator {
    dir: PathBuf,
    cidr: PodCidr,
}

impl Allocator {
    /// Allocations of network `network` live in `data_dir/network/`.
    pub fn new(data_dir: &Path, network: &str, cidr: PodCidr) -> Self {
        Allocator {
            dir: data_dir.join(network),
            cidr,
        }
    }

    /// The owner's address: the one it already holds in the CIDR, else the lowest free one.
    /// The flag says whether it is new, so a failed ADD releases only what it allocated.
    pub fn allocate(&self, owner: &Owner) -> Result<(Ipv4Addr, bool), IpamError> {
        let _lock = self.lock()?;
        let records = self.records()?;
        if let Some((ip, _)) = records
            .iter()
            .find(|(ip, holder)| holder == owner && self.cidr.contains(*ip))
        {
            return Ok((*ip, false));
        }
        let taken: BTreeSet<Ipv4Addr> = records.into_iter().map(|(ip, _)| ip).collect();
        let ip = self
            .cidr
            .pod_addresses()
            .find(|ip| !taken.contains(ip))
            .ok_or(IpamError::Exhausted { cidr: self.cidr })?;
        // Written aside and renamed, so a crash leaves either no record or a whole one.
        let path = self.dir.join(ip.to_string());
        let temp = self.dir.join(format!(".{ip}.tmp"));
        let mut file = File::create(&temp).map_err(io_error(&temp))?;
        file.write_all(owner.record().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_error(&temp))?;
        fs::rename(&temp, &path).map_err(io_error(&path))?;
        Ok((ip, true))
    }

    /// The address the owner holds.
    pub fn lookup(&self, owner: &Owner) -> Result<Ipv4Addr, IpamError> {
        let _lock = self.lock()?;
        self.records()?
            .into_iter()
            .find(|(_, holder)| holder == owner)
            .map(|(ip, _)| ip)
            .ok_or_else(|| IpamError::NotAllocated {
                owner: owner.clone(),
                dir: self.dir.clone(),
            })
    }

    /// Frees every address the owner holds; returns the first, or `None` when it held none.
    pub fn release(&self, owner: &Owner) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        let mut released = None;
        for (ip, holder) in self.records()? {
            if holder == *owner {
                let path = self.dir.join(ip.to_string());
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(&path)(e)),
                }
                released.get_or_insert(ip);
            }
        }
        Ok(released)
    }

    /// Takes the network's lock, creating its directory on first use; released on drop.
    fn lock(&self) -> Result<File, IpamError> {
        fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        file.lock().map_err(io_error(&path))?;
        Ok(file)
    }

    /// Every allocation record; files not named by an address (the lock, temporaries) are
    /// not records.
    fn records(&self) -> Result<Vec<(Ipv4Addr, Owner)>, IpamError> {
        let mut records = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let text = fs::read_to_string(&path).map_err(io_error(&path))?;
            let mut lines = text.lines();
            let owner = Owner {
                container_id: lines.next().unwrap_or_default().to_owned(),
                ifname: lines.next().unwrap_or_default().to_owned(),
            };
            records.push((ip, owner));
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn owner(n: u8) -> Owner {
        Owner {
            container_id: format!("c{}", n / 2),
            ifname: format!("eth{}", n % 2),
        }
    }

    fn cidr(text: &str) -> PodCidr {
        PodCidr::parse(text).unwrap()
    }

    #[test]
    fn hands_out_lowest_free_and_skips_network_gateway_broadcast() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = Allocator::new(dir.path(), "net", cidr("10.0.0.0/29"));
        let ips: Vec<_> = (0..5).map(|n| alloc.allocate(&owner(n)).unwrap()).collect();
        let expected: Vec<_> = (2..=6)
            .map(|last| (Ipv4Addr::new(10, 0, 0, last), true))
            .collect();
        assert_eq!(ips, expected);
        let err = alloc.allocate(&owner(5)).unwrap_err();
        assert_eq!(err.code(), Code::RangeExhausted);
        assert!(err.to_string().contains("10.0.0.0/29"), "{err}");
        assert_eq!(
            alloc.release(&owner(1)).unwrap(),
            Some(Ipv4Addr::new(10, 0, 0, 3))
        );
        assert_eq!(alloc.release(&owner(1)).unwrap(), None);
        assert_eq!(
            alloc.allocate(&owner(5)).unwrap(),
            (Ipv4Addr::new(10, 0, 0, 3), true)
        );
    }

    #[test]
    fn a_record_holds_container_and_ifname() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = Allocator::new(dir.path(), "net", cidr("10.0.0.0/24"));
        let (ip, _) = alloc.allocate(&owner(3)).unwrap();
        let text = fs::read_to_string(dir.path().join("net").join(ip.to_string())).unwrap();
        assert_eq!(text, "c1\neth1\n");
        assert_eq!(alloc.lookup(&owner(3)).unwrap(), ip);
        let err = alloc.lookup(&owner(4)).unwrap_err();
        assert_eq!(err.code(), Code::UnknownContainer);
        assert!(
            err.to_string().contains("container c2 interface eth0"),
            "{err}"
        );
    }

    #[test]
    fn concurrent_allocators_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let ips: Vec<Ipv4Addr> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..16u8)
                .map(|n| {
                    let path = dir.path();
                    scope.spawn(move || {
                        let alloc = Allocator::new(path, "net", cidr("10.0.0.0/24"));
                        alloc.allocate(&owner(n)).unwrap().0
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let distinct: BTreeSet<_> = ips.iter().collect();
        assert_eq!(distinct.len(), ips.len(), "{ips:?}");
    }

    #[derive(Clone, Debug)]
    enum Op {
        Allocate(u8),
        Release(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..24).prop_map(Op::Allocate),
            2 => (0u8..24).prop_map(Op::Release),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Against a model (owner -> address): no overlap, never network/gateway/broadcast,
        /// idempotent per owner, released addresses reusable, state survives a new allocator.
        #[test]
        fn allocations_match_the_model(ops in proptest::collection::vec(op(), 1..80)) {
            let dir = tempfile::tempdir().unwrap();
            let range = cidr("10.9.0.16/28");
            let mut alloc = Allocator::new(dir.path(), "net", range);
            let mut model: BTreeMap<u8, Ipv4Addr> = BTreeMap::new();
            let reserved = [
                Ipv4Addr::new(10, 9, 0, 16),
                Ipv4Addr::new(10, 9, 0, 17),
                Ipv4Addr::new(10, 9, 0, 31),
            ];
            for op in ops {
                match op {
                    Op::Allocate(n) => {
                        let free = range.pod_addresses().find(|ip| !model.values().any(|held| held == ip));
                        match (model.get(&n).copied(), alloc.allocate(&owner(n))) {
                            (Some(held), Ok((ip, fresh))) => {
                                prop_assert_eq!(ip, held);
                                prop_assert!(!fresh);
                            }
                            (None, Ok((ip, fresh))) => {
                                prop_assert!(fresh);
                                prop_assert_eq!(Some(ip), free);
                                prop_assert!(!reserved.contains(&ip));
                                prop_assert!(range.contains(ip));
                                model.insert(n, ip);
                            }
                            (None, Err(IpamError::Exhausted { .. })) => prop_assert_eq!(free, None),
                            (held, Err(e)) => prop_assert!(false, "{n} (holding {held:?}): {e}"),
                        }
                    }
                    Op::Release(n) => {
                        prop_assert_eq!(alloc.release(&owner(n)).unwrap(), model.remove(&n));
                    }
                    Op::Reopen => alloc = Allocator::new(dir.path(), "net", range),
                }
                let lock = alloc.lock().unwrap();
                let on_disk: Vec<_> = alloc.records().unwrap().into_iter().map(|(ip, _)| ip).collect();
                let held: BTreeSet<_> = model.values().copied().collect();
                prop_assert_eq!(held.len(), model.len(), "two owners share an address");
                prop_assert_eq!(on_disk.iter().copied().collect::<BTreeSet<_>>(), held);
                prop_assert_eq!(on_disk.len(), model.len(), "an address recorded twice");
                drop(lock);
                for (n, ip) in &model {
                    prop_assert_eq!(alloc.lookup(&owner(*n)).unwrap(), *ip);
                }
            }
        }
    }
}
