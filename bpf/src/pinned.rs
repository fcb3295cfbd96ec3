//! Reading what an agent programmed, from its pins alone: no object is loaded and nothing is
//! attached, so an operator's tool or a test can look at a running node's service map
//! without disturbing it.

use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError};

use crate::loader::{DatapathError, names};
use crate::maps::{Lb4Key, Lb4Slot, ip};
use crate::state::Frontend4;

/// The pinned `mesh_svc4` of one agent.
#[derive(Debug)]
pub struct PinnedServices {
    map: HashMap<MapData, [u8; 12], [u8; 8]>,
}

fn map_error(source: MapError) -> DatapathError {
    DatapathError::Map {
        map: names::SERVICES,
        source: Box::new(source),
    }
}

impl PinnedServices {
    /// Opens the service map pinned under `dir` (the agent's `<bpffs>/<bpf-root>`).
    pub fn open(dir: &Path) -> Result<PinnedServices, DatapathError> {
        let data = MapData::from_pin(dir.join(names::SERVICES)).map_err(map_error)?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(map_error)?;
        Ok(PinnedServices { map })
    }

    /// The backends the load balancer picks from for `frontend`, in slot order; `None` when
    /// the frontend is not programmed. A slot missing under the count (a writer mid-way)
    /// ends the list there, as the program would fail that pick.
    pub fn backends(
        &self,
        frontend: Frontend4,
    ) -> Result<Option<Vec<(Ipv4Addr, u16)>>, DatapathError> {
        let Some(count) = self.slot(frontend.key(0))?.map(|s| s.count) else {
            return Ok(None);
        };
        let mut backends = Vec::with_capacity(usize::from(count));
        for slot in 1..=count {
            match self.slot(frontend.key(slot))? {
                Some(s) => backends.push((ip(s.address), crate::maps::host_port(s.port))),
                None => break,
            }
        }
        Ok(Some(backends))
    }

    fn slot(&self, key: Lb4Key) -> Result<Option<Lb4Slot>, DatapathError> {
        match self.map.get(&key.encode(), 0) {
            Ok(value) => Ok(Some(Lb4Slot::decode(&value))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(error) => Err(map_error(error)),
        }
    }
}
