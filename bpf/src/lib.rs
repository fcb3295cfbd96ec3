//! The mesh's eBPF datapath.
//!
//! - `c/mesh.bpf.c`: the programs (socket load balancer on a cgroup, identity policy on pod
//!   interfaces), `c/mesh.h`: their map layouts; the compiled `c/mesh.bpf.o` is committed so
//!   building needs no clang (`bpf/build.sh` rebuilds it, CI checks it is current).
//! - [`maps`]: those layouts as `#[repr(C)]` Rust types, checked against the object's BTF.
//! - [`state`]: what the reconciled maps hold as plain data, and a diff that never leaves a
//!   hole while it is applied.
//! - [`loader`]: loading, pinning, attaching, reading and writing the maps (aya).
//! - [`pinned`]: reading a running agent's service map from its pins alone.

pub mod loader;
pub mod maps;
pub mod pinned;
pub mod state;

pub use loader::{
    Counter, Datapath, DatapathConfig, DatapathError, DropEvent, DropReader, MapSizes,
};
pub use pinned::PinnedServices;
pub use state::{Frontend4, MapOp, MapState, diff};
