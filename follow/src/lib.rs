//! Following peer clusters' stores: what kvstoremesh (which mirrors each peer into the local
//! store's cache) and the agent's direct mode (which reads each peer's store itself) must do
//! the same way, so they cannot disagree about which peers exist, when a peer is refused,
//! when a store was replaced, or how fast to reconnect.
//!
//! - [`directory`]: the peers directory, polled into added/changed/removed peers;
//! - [`fleet`]: one follower per peer of the directory, restarted and stopped with its file;
//! - [`gate`]: the one check before anything of a peer is used: its cluster config;
//! - [`claims`]: one cluster id per peer across every peer followed;
//! - [`witness`]: whether a store is still the one a resume point belongs to;
//! - [`probe`]: the periodic look at a peer's store (identity, config, heartbeat);
//! - [`backoff`]: reconnect delays;
//! - [`tracker`]: one peer's state machine (signals in, updates out), no I/O;
//! - [`session`]: the driver of a tracker against a store, handing updates to a [`Sink`].

pub mod backoff;
pub mod claims;
pub mod directory;
pub mod fleet;
pub mod gate;
pub mod probe;
pub mod session;
pub mod tracker;
pub mod witness;

pub use backoff::{Backoff, HEALTHY_SESSION};
pub use claims::Claims;
pub use directory::{DirChange, PeerDirectory, Scan};
pub use fleet::{FleetTiming, Roster, run_fleet};
pub use gate::{ConfigGate, ConfigRefusal, Verdict};
pub use probe::{Heartbeat, Probe, probe};
pub use session::{Sink, SinkClosed, follow_peer};
pub use tracker::{
    EntryChange, Layout, LinkError, ListReason, Part, PeerTracker, PeerUpdate, Signal,
};
pub use witness::{KeyVersion, StoreWitness};
