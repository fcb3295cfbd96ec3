//! The etcd v3 gRPC services, served from the traits `etcd-client` generates from etcd's own
//! protos, so the wire format cannot drift from what clients speak.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::proto::*;
use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use certs::ClusterName;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::access::Role;
use super::applier::{Applier, Shared, Writer};
use super::cluster::RaftHandle;
use super::mvcc::{KeyRange, KvError, WriteRequest, WriteResponse, check_txn, txn_writes};
use super::storage::hash_history;

/// etcd's `AlarmRequest.AlarmAction.GET`.
const ALARM_GET: i32 = 0;

/// What every service needs: the shared state, the write path and the limits.
#[derive(Clone, Debug)]
pub struct Services {
    pub(crate) shared: Arc<Shared>,
    pub(crate) writer: Writer,
    /// For images of the store (`Maintenance.Snapshot`).
    pub(crate) applier: Applier,
    pub(crate) max_request_bytes: usize,
    pub(crate) progress_interval: Duration,
    pub(crate) cancel: CancellationToken,
    pub(crate) version: &'static str,
    /// Our cluster when access rules are on; `None` gives every client full rights.
    pub(crate) access: Option<ClusterName>,
    /// This member's name and client URLs, for `MemberList`.
    pub(crate) name: String,
    pub(crate) client_urls: Vec<String>,
}

/// etcd's answer to a request the user's role does not allow.
pub const PERMISSION_DENIED: &str = "etcdserver: permission denied";

fn denied() -> Status {
    Status::permission_denied(PERMISSION_DENIED)
}

fn require(allowed: bool) -> Result<(), Status> {
    if allowed { Ok(()) } else { Err(denied()) }
}

/// Reads of every compare and every op in both branches, nested ones too: a branch that will
/// not run must still be allowed, or a txn could probe what it may not touch.
fn txn_allowed(role: &Role, txn: &PbTxnRequest) -> bool {
    txn.compare
        .iter()
        .all(|c| role.can_read(&KeyRange::new(&c.key, &c.range_end)))
        && txn
            .success
            .iter()
            .chain(&txn.failure)
            .all(|op| match &op.request {
                Some(PbTxnOpRequest::RequestRange(r)) => {
                    role.can_read(&KeyRange::new(&r.key, &r.range_end))
                }
                Some(PbTxnOpRequest::RequestPut(p)) => {
                    role.can_write(&KeyRange::Single(p.key.clone()))
                }
                Some(PbTxnOpRequest::RequestDeleteRange(d)) => {
                    role.can_write(&KeyRange::new(&d.key, &d.range_end))
                }
                Some(PbTxnOpRequest::RequestTxn(nested)) => txn_allowed(role, nested),
                None => true,
            })
}

impl From<KvError> for Status {
    fn from(error: KvError) -> Self {
        let message = error.to_string();
        match error {
            KvError::EmptyKey
            | KvError::KeyNotFound
            | KvError::ValueProvided
            | KvError::LeaseProvided
            | KvError::TooManyOps
            | KvError::DuplicateKey
            | KvError::RequestTooLarge => Status::invalid_argument(message),
            KvError::Compacted | KvError::FutureRevision | KvError::LeaseTtlTooLarge => {
                Status::out_of_range(message)
            }
            KvError::LeaseNotFound => Status::not_found(message),
            KvError::LeaseExists => Status::failed_precondition(message),
            KvError::Stopped | KvError::Storage(_) | KvError::NoLeader | KvError::Timeout => {
                Status::unavailable(message)
            }
            KvError::Malformed(_) => Status::internal(message),
            KvError::Corrupt => Status::data_loss(message),
        }
    }
}

impl Services {
    /// The caller's rights, from the certificate it presented on this connection.
    fn role<T>(&self, request: &Request<T>) -> Role {
        let Some(us) = &self.access else {
            return Role::Admin;
        };
        let leaf = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        match leaf.as_ref().and_then(|chain| chain.first()) {
            Some(cert) => {
                certs::User::from_certificate(cert).map_or(Role::Nobody, |user| Role::of(&user, us))
            }
            None => Role::Nobody,
        }
    }

    fn check_size(&self, request: &impl Message) -> Result<(), Status> {
        if request.encoded_len() > self.max_request_bytes {
            return Err(KvError::RequestTooLarge.into());
        }
        Ok(())
    }

    async fn write(&self, request: WriteRequest) -> Result<WriteResponse, Status> {
        Ok(self.writer.submit(request).await?)
    }

    fn raft(&self) -> Option<&Arc<RaftHandle>> {
        match &self.writer {
            Writer::Replicated(raft) => Some(raft),
            Writer::Local(_) => None,
        }
    }

    /// Makes the next read linearizable: on a replicated store, waits until this member has
    /// applied everything committed before the request (a single member always has).
    async fn linearize(&self) -> Result<(), Status> {
        match self.raft() {
            Some(raft) => Ok(raft.read_barrier().await?),
            None => Ok(()),
        }
    }

    fn header(&self) -> PbResponseHeader {
        self.shared.read().header(self.shared.visible())
    }

    /// The CRC-32 of every stored record with a revision up to `through`, in revision order,
    /// read off the async threads (it reads the whole history).
    async fn hash_through(&self, through: i64) -> Result<u32, Status> {
        let storage = self.shared.storage().clone();
        tokio::task::spawn_blocking(move || hash_history(storage.as_ref(), through))
            .await
            .map_err(|e| Status::internal(format!("hashing stopped: {e}")))?
            .map_err(|e| Status::internal(format!("hashing the store: {e}")))
    }
}

/// Bytes per message of a snapshot stream (etcd sends 32 KiB).
const SNAPSHOT_CHUNK: usize = 32 * 1024;

fn unexpected(response: WriteResponse) -> Status {
    Status::internal(format!(
        "applier answered with the wrong kind: {response:?}"
    ))
}

#[tonic::async_trait]
impl PbKvService for Services {
    type RangeStreamStream = BoxStream<PbRangeStreamResponse>;

    async fn range_stream(
        &self,
        _: Request<PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        unimplemented("RangeStream")
    }

    async fn range(
        &self,
        request: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        let role = self.role(&request);
        let request = request.into_inner();
        require(role.can_read(&KeyRange::new(&request.key, &request.range_end)))?;
        if !request.serializable {
            self.linearize().await?;
        }
        let visible = self.shared.visible();
        let state = self.shared.read();
        state.check_healthy()?;
        Ok(Response::new(state.range(&request, visible)?))
    }

    async fn put(&self, request: Request<PbPutRequest>) -> Result<Response<PbPutResponse>, Status> {
        let role = self.role(&request);
        let request = request.into_inner();
        require(role.can_write(&KeyRange::Single(request.key.clone())))?;
        self.check_size(&request)?;
        match self.write(WriteRequest::Put(request)).await? {
            WriteResponse::Put(r) => Ok(Response::new(r)),
            other => Err(unexpected(other)),
        }
    }

    async fn delete_range(
        &self,
        request: Request<PbDeleteRequest>,
    ) -> Result<Response<PbDeleteResponse>, Status> {
        let role = self.role(&request);
        let request = request.into_inner();
        require(role.can_write(&KeyRange::new(&request.key, &request.range_end)))?;
        self.check_size(&request)?;
        match self.write(WriteRequest::Delete(request)).await? {
            WriteResponse::Delete(r) => Ok(Response::new(r)),
            other => Err(unexpected(other)),
        }
    }

    async fn txn(&self, request: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        let role = self.role(&request);
        let request = request.into_inner();
        require(txn_allowed(&role, &request))?;
        self.check_size(&request)?;
        if !txn_writes(&request) {
            check_txn(&request)?;
            self.linearize().await?;
            let visible = self.shared.visible();
            let state = self.shared.read();
            state.check_healthy()?;
            return Ok(Response::new(state.read_txn(&request, visible)?));
        }
        match self.write(WriteRequest::Txn(request)).await? {
            WriteResponse::Txn(r) => Ok(Response::new(r)),
            other => Err(unexpected(other)),
        }
    }

    async fn compact(
        &self,
        request: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        require(self.role(&request).is_admin())?;
        match self
            .write(WriteRequest::Compact(request.into_inner().revision))
            .await?
        {
            WriteResponse::Compact(r) => Ok(Response::new(r)),
            other => Err(unexpected(other)),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl PbWatchService for Services {
    type WatchStream = BoxStream<PbWatchResponse>;

    async fn watch(
        &self,
        request: Request<Streaming<PbWatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let role = self.role(&request);
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(super::watch::serve(
            self.shared.clone(),
            role,
            request.into_inner(),
            tx,
            self.progress_interval,
            self.cancel.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl PbLeaseService for Services {
    type LeaseKeepAliveStream = BoxStream<PbLeaseKeepAliveResponse>;

    async fn lease_grant(
        &self,
        request: Request<PbLeaseGrantRequest>,
    ) -> Result<Response<PbLeaseGrantResponse>, Status> {
        require(self.role(&request).is_admin())?;
        let request = request.into_inner();
        let grant = WriteRequest::LeaseGrant {
            id: request.id,
            ttl: request.ttl,
        };
        match self.write(grant).await? {
            WriteResponse::LeaseGrant(r) => Ok(Response::new(r)),
            other => Err(unexpected(other)),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<PbLeaseRevokeRequest>,
    ) -> Result<Response<PbLeaseRevokeResponse>, Status> {
        require(self.role(&request).is_admin())?;
        match self
            .write(WriteRequest::LeaseRevoke(request.into_inner().id))
            .await?
        {
            WriteResponse::LeaseRevoke(r) => Ok(Response::new(r)),
            other => Err(unexpected(other)),
        }
    }

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<PbLeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        require(self.role(&request).is_admin())?;
        let mut requests = request.into_inner();
        let shared = self.shared.clone();
        let raft = self.raft().cloned();
        let cancel = self.cancel.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = cancel.cancelled() => return,
                    next = requests.next() => next,
                };
                let Some(Ok(request)) = next else { return };
                // An unknown lease is answered with TTL 0, as etcd does, not with an error.
                let ttl = match &raft {
                    Some(raft) if !shared.is_leader() => {
                        match raft
                            .outbox()
                            .lease(shared.leader(), request.id, true, false)
                            .await
                        {
                            Ok(reply) => reply.ttl.max(0),
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        }
                    }
                    _ => shared.write().lease_keep_alive(request.id).unwrap_or(0),
                };
                let response = PbLeaseKeepAliveResponse {
                    header: Some(shared.read().header(shared.visible())),
                    id: request.id,
                    ttl,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<PbLeaseTimeToLiveRequest>,
    ) -> Result<Response<PbLeaseTimeToLiveResponse>, Status> {
        require(self.role(&request).is_admin())?;
        let request = request.into_inner();
        let ttl = match self.raft() {
            // Only the leader's clocks are right.
            Some(raft) if !self.shared.is_leader() => {
                let reply = raft
                    .outbox()
                    .lease(self.shared.leader(), request.id, false, request.keys)
                    .await?;
                reply.found.then_some(super::mvcc::LeaseTtl {
                    remaining: reply.ttl,
                    granted: reply.granted_ttl,
                    keys: reply.keys,
                })
            }
            _ => self.shared.read().lease_ttl(request.id, request.keys),
        };
        let response = match ttl {
            Some(ttl) => PbLeaseTimeToLiveResponse {
                header: Some(self.header()),
                id: request.id,
                ttl: ttl.remaining,
                granted_ttl: ttl.granted,
                keys: ttl.keys,
            },
            // etcd answers an unknown lease with TTL -1 rather than an error.
            None => PbLeaseTimeToLiveResponse {
                header: Some(self.header()),
                id: request.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        };
        Ok(Response::new(response))
    }

    async fn lease_leases(
        &self,
        request: Request<PbLeaseLeasesRequest>,
    ) -> Result<Response<PbLeaseLeasesResponse>, Status> {
        require(self.role(&request).is_admin())?;
        let leases = self
            .shared
            .read()
            .lease_ids()
            .into_iter()
            .map(|id| PbLeaseStatus { id })
            .collect();
        Ok(Response::new(PbLeaseLeasesResponse {
            header: Some(self.header()),
            leases,
        }))
    }
}

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not implemented by the embedded store"
    )))
}

#[tonic::async_trait]
impl PbMaintenanceService for Services {
    type SnapshotStream = BoxStream<PbSnapshotResponse>;

    async fn alarm(
        &self,
        request: Request<PbAlarmRequest>,
    ) -> Result<Response<PbAlarmResponse>, Status> {
        let role = self.role(&request);
        let request = request.into_inner();
        // Listing is for anyone known (etcdctl's health check lists); changing is for admins,
        // through the log like any write so every member holds the same alarms.
        if request.action == ALARM_GET {
            require(role.is_known())?;
            return Ok(Response::new(PbAlarmResponse {
                header: Some(self.header()),
                alarms: self.shared.read().alarms(),
            }));
        }
        require(role.is_admin())?;
        match self.write(WriteRequest::Alarm(request)).await? {
            WriteResponse::Alarm(r) => Ok(Response::new(r)),
            other => Err(unexpected(other)),
        }
    }

    async fn status(
        &self,
        request: Request<PbStatusRequest>,
    ) -> Result<Response<PbStatusResponse>, Status> {
        require(self.role(&request).is_known())?;
        let header = self.header();
        let db_size = self.shared.storage().size_on_disk() as i64;
        let (leader, raft_index, raft_applied_index) = match self.raft() {
            Some(raft) => {
                let status = raft.status();
                (status.leader, status.index, self.shared.applied())
            }
            // Without raft, every write is one "entry": the revision counts them.
            None => (
                header.member_id,
                header.revision as u64,
                header.revision as u64,
            ),
        };
        Ok(Response::new(PbStatusResponse {
            version: self.version.to_string(),
            db_size,
            db_size_in_use: db_size,
            leader,
            raft_index,
            raft_term: header.raft_term,
            raft_applied_index,
            header: Some(header),
            ..PbStatusResponse::default()
        }))
    }

    async fn defragment(
        &self,
        _: Request<PbDefragmentRequest>,
    ) -> Result<Response<PbDefragmentResponse>, Status> {
        unimplemented("Defragment")
    }

    /// The hash of every record the store holds, at its current revision: what two members
    /// holding the same history answer alike.
    async fn hash(
        &self,
        request: Request<PbHashRequest>,
    ) -> Result<Response<PbHashResponse>, Status> {
        require(self.role(&request).is_admin())?;
        let header = self.header();
        let hash = self.hash_through(header.revision).await?;
        Ok(Response::new(PbHashResponse {
            header: Some(header),
            hash,
        }))
    }

    /// The hash of the key-value history up to a revision (0: the current one), as etcd's
    /// corruption check compares between members; a compacted or future revision is refused
    /// as a range at it would be.
    async fn hash_kv(
        &self,
        request: Request<PbHashKvRequest>,
    ) -> Result<Response<PbHashKvResponse>, Status> {
        require(self.role(&request).is_admin())?;
        let header = self.header();
        let compact_revision = self.shared.read().compact_revision();
        let revision = match request.get_ref().revision {
            0 => header.revision,
            r if r < compact_revision => {
                return Err(Status::out_of_range(
                    "etcdserver: mvcc: required revision has been compacted",
                ));
            }
            r if r > header.revision => {
                return Err(Status::out_of_range(
                    "etcdserver: mvcc: required revision is a future revision",
                ));
            }
            r => r,
        };
        let hash = self.hash_through(revision).await?;
        Ok(Response::new(PbHashKvResponse {
            header: Some(header),
            hash,
            compact_revision,
            hash_revision: revision,
        }))
    }

    /// An image of the whole store (data, history, leases) as of the request, streamed in
    /// chunks: `etcdctl snapshot save` writes it to a file, `kvstore restore` makes a new
    /// store or cluster from it.
    async fn snapshot(
        &self,
        request: Request<PbSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        require(self.role(&request).is_admin())?;
        self.linearize().await?;
        let header = self.header();
        let image = self
            .applier
            .dump()
            .await
            .map(super::storage::image_with_checksum)
            .map_err(|e| Status::unavailable(format!("etcdserver: snapshot: {e}")))?;
        let total = image.len();
        let version = self.version.to_string();
        let chunks: Vec<Result<PbSnapshotResponse, Status>> = image
            .chunks(SNAPSHOT_CHUNK)
            .scan(total, |remaining, chunk| {
                *remaining -= chunk.len();
                Some(Ok(PbSnapshotResponse {
                    header: Some(header),
                    remaining_bytes: *remaining as u64,
                    blob: chunk.to_vec(),
                    version: version.clone(),
                }))
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn move_leader(
        &self,
        _: Request<PbMoveLeaderRequest>,
    ) -> Result<Response<PbMoveLeaderResponse>, Status> {
        unimplemented("MoveLeader")
    }

    async fn downgrade(
        &self,
        _: Request<PbDowngradeRequest>,
    ) -> Result<Response<PbDowngradeResponse>, Status> {
        unimplemented("Downgrade")
    }
}

/// `MemberList` answers with every member `--initial-cluster` named (or this one alone), so
/// `etcdctl member list` and `endpoint status --cluster` work; changing membership is refused,
/// saying why.
#[tonic::async_trait]
impl PbClusterService for Services {
    async fn member_add(
        &self,
        _: Request<PbMemberAddRequest>,
    ) -> Result<Response<PbMemberAddResponse>, Status> {
        single_member("MemberAdd")
    }

    async fn member_remove(
        &self,
        _: Request<PbMemberRemoveRequest>,
    ) -> Result<Response<PbMemberRemoveResponse>, Status> {
        single_member("MemberRemove")
    }

    async fn member_update(
        &self,
        _: Request<PbMemberUpdateRequest>,
    ) -> Result<Response<PbMemberUpdateResponse>, Status> {
        single_member("MemberUpdate")
    }

    async fn member_list(
        &self,
        request: Request<PbMemberListRequest>,
    ) -> Result<Response<PbMemberListResponse>, Status> {
        require(self.role(&request).is_known())?;
        let header = self.header();
        let Some(raft) = self.raft() else {
            return Ok(Response::new(PbMemberListResponse {
                members: vec![PbMember {
                    id: header.member_id,
                    name: self.name.clone(),
                    peer_ur_ls: Vec::new(),
                    client_ur_ls: self.client_urls.clone(),
                    is_learner: false,
                }],
                header: Some(header),
            }));
        };
        // Other members describe themselves; one that does not answer is listed as etcd
        // lists a member that has not started: no name, no client URLs.
        let members = raft.config().members.clone();
        let described = futures::future::join_all(members.iter().map(|m| async move {
            if m.id == header.member_id {
                Some((self.name.clone(), self.client_urls.clone()))
            } else {
                let info = raft.outbox().describe(m.id).await?;
                Some((info.name, info.client_urls))
            }
        }))
        .await;
        let members = members
            .into_iter()
            .zip(described)
            .map(|(member, described)| {
                let (name, client_urls) = described.unwrap_or_default();
                PbMember {
                    id: member.id,
                    name,
                    peer_ur_ls: member.peer_urls,
                    client_ur_ls: client_urls,
                    is_learner: false,
                }
            })
            .collect();
        Ok(Response::new(PbMemberListResponse {
            members,
            header: Some(header),
        }))
    }

    async fn member_promote(
        &self,
        _: Request<PbMemberPromoteRequest>,
    ) -> Result<Response<PbMemberPromoteResponse>, Status> {
        single_member("MemberPromote")
    }
}

fn single_member<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::failed_precondition(format!(
        "{what}: membership changes are not supported; members are fixed by --initial-cluster"
    )))
}
