//! Which peer uses which cluster id. Two peers with one id would put their identities and
//! addresses in one range, so the second one to claim an id is refused until the first
//! gives it up.

use std::collections::HashMap;
use std::sync::Mutex;

use model::{ClusterId, ClusterName};

/// The id claims of every followed peer; shared by the tasks that follow them.
#[derive(Debug, Default)]
pub struct Claims(Mutex<HashMap<ClusterName, ClusterId>>);

impl Claims {
    /// Claims `id` for `peer` (dropping any id it held before), or names the peer that
    /// already holds `id`.
    pub fn claim(&self, peer: &ClusterName, id: ClusterId) -> Result<(), ClusterName> {
        let mut claims = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((other, _)) = claims
            .iter()
            .find(|(name, claimed)| *name != peer && **claimed == id)
        {
            return Err(other.clone());
        }
        claims.insert(peer.clone(), id);
        Ok(())
    }

    /// Gives up `peer`'s id (the peer is refused, removed or stopped).
    pub fn release(&self, peer: &ClusterName) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_unique() {
        let claims = Claims::default();
        let (b, c) = (
            ClusterName::new("b").unwrap(),
            ClusterName::new("c").unwrap(),
        );
        let two = ClusterId::try_from(2).unwrap();
        let three = ClusterId::try_from(3).unwrap();
        claims.claim(&b, two).unwrap();
        claims.claim(&b, two).unwrap();
        assert_eq!(claims.claim(&c, two).unwrap_err(), b);
        claims.claim(&c, three).unwrap();
        // b moves to 3: refused while c holds it; c leaves, then b may.
        assert_eq!(claims.claim(&b, three).unwrap_err(), c);
        claims.release(&c);
        claims.claim(&b, three).unwrap();
        // b's old id is free again.
        claims.claim(&c, two).unwrap();
    }
}
