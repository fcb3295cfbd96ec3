//! The mesh's own gRPC services, generated from `proto/*.proto` at build time.

/// The store members' peer protocol (`proto/peer.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod peer {
    tonic::include_proto!("kvstore.peer.v1");
}
