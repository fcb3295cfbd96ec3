//! Raft messages between members, over our own gRPC service (`proto/peer.proto`).
//!
//! Each peer has one sender task that drains its queue into one `Send` call at a time (raft
//! tolerates lost messages, so a full queue drops rather than blocks raft's thread). Every
//! call names the cluster: a member of another cluster is refused with a clear error and
//! nothing of what it sent reaches raft.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::peer::peer_client::PeerClient;
use proto::peer::peer_server::{Peer, PeerServer};
use proto::peer::{
    DescribeRequest, HashKvReply, HashKvRequest, LeaseCall, LeaseReply, MemberInfo, MessageBatch,
    SendReply,
};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::ClusterConfig;
use super::node::Command;
use crate::server::applier::Shared;
use crate::server::tls::{self, TlsError, TlsFiles};

/// How long a member may take to hash its whole history.
const HASH_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages queued per peer before new ones are dropped (raft sends them again).
const QUEUE: usize = 4096;
/// Messages sent in one call.
const MAX_BATCH: usize = 256;
/// A call not answered by then counts as a failure (the peer is down or partitioned).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call carrying a snapshot may take.
const SNAPSHOT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Refusals of a foreign peer are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// Errors setting up the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer TLS material does not load.
    #[error("peer TLS: {0}")]
    Tls(#[from] TlsError),
    /// A peer URL tonic cannot use.
    #[error("peer URL {url}: {source}")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The peer port could not be bound.
    #[error("listen for peers on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A peer file could not be read.
    #[error("{path}: {source}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where raft's outgoing messages go; cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    queues: Arc<HashMap<u64, mpsc::Sender<Message>>>,
    clients: Arc<HashMap<u64, PeerClient<Channel>>>,
    cluster_id: u64,
}

impl Outbox {
    /// Starts one sender task per peer; connections are made when first used.
    pub fn start(
        config: &ClusterConfig,
        node: std_mpsc::Sender<Command>,
        cancel: &CancellationToken,
    ) -> Result<Self, TransportError> {
        let tls = config.peer_tls.as_ref().map(client_tls).transpose()?;
        let mut queues = HashMap::new();
        let mut clients = HashMap::new();
        for peer in config.peers() {
            let url = peer.peer_urls[0].clone();
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|source| TransportError::Url {
                    url: url.clone(),
                    source,
                })?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2));
            if let Some(tls) = &tls {
                endpoint =
                    endpoint
                        .tls_config(tls.clone())
                        .map_err(|source| TransportError::Url {
                            url: url.clone(),
                            source,
                        })?;
            }
            let client = PeerClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            let (tx, rx) = mpsc::channel(QUEUE);
            let span =
                tracing::info_span!("peer", name = %peer.name, id = format_args!("{:x}", peer.id));
            tokio::spawn(
                send_loop(
                    Target {
                        id: peer.id,
                        from: config.id,
                        cluster_id: config.cluster_id,
                    },
                    client.clone(),
                    rx,
                    node.clone(),
                    cancel.clone(),
                )
                .instrument(span),
            );
            queues.insert(peer.id, tx);
            clients.insert(peer.id, client);
        }
        Ok(Self {
            queues: Arc::new(queues),
            clients: Arc::new(clients),
            cluster_id: config.cluster_id,
        })
    }

    /// Queues raft's messages for their members, and returns the members whose snapshot was
    /// dropped: raft must hear of it, or it waits for that snapshot forever.
    pub fn send(&self, messages: Vec<Message>) -> Vec<u64> {
        let mut lost_snapshots = Vec::new();
        for message in messages {
            if let Some(queue) = self.queues.get(&message.to) {
                // Full: the peer is far behind or gone; raft resends what matters.
                if let Err(refused) = queue.try_send(message) {
                    let message = refused.into_inner();
                    if message.get_msg_type() == MessageType::MsgSnapshot {
                        lost_snapshots.push(message.to);
                    }
                }
            }
        }
        lost_snapshots
    }

    /// A lease call answered by `leader`.
    pub async fn lease(
        &self,
        leader: u64,
        id: i64,
        keep_alive: bool,
        keys: bool,
    ) -> Result<LeaseReply, Status> {
        let mut client = self
            .clients
            .get(&leader)
            .cloned()
            .ok_or_else(|| Status::unavailable("etcdserver: no leader"))?;
        let call = LeaseCall {
            cluster_id: self.cluster_id,
            id,
            keep_alive,
            keys,
        };
        tokio::time::timeout(SEND_TIMEOUT, client.lease(call))
            .await
            .map_err(|_| Status::unavailable("etcdserver: request timed out"))?
            .map(Response::into_inner)
    }

    /// Another member's hash of its history up to `revision`, if it answers soon.
    pub async fn hash_kv(&self, member: u64, revision: i64) -> Result<HashKvReply, Status> {
        let mut client = self
            .clients
            .get(&member)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("member {member:x} is not a peer")))?;
        let request = HashKvRequest {
            cluster_id: self.cluster_id,
            revision,
        };
        tokio::time::timeout(HASH_TIMEOUT, client.hash_kv(request))
            .await
            .map_err(|_| Status::deadline_exceeded("the member did not answer in time"))?
            .map(Response::into_inner)
    }

    /// What another member says of itself, if it answers soon.
    pub async fn describe(&self, member: u64) -> Option<MemberInfo> {
        let mut client = self.clients.get(&member).cloned()?;
        let request = DescribeRequest {
            cluster_id: self.cluster_id,
        };
        tokio::time::timeout(Duration::from_secs(1), client.describe(request))
            .await
            .ok()?
            .ok()
            .map(Response::into_inner)
    }
}

fn client_tls(files: &TlsFiles) -> Result<ClientTlsConfig, TransportError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| TransportError::File {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut config =
        ClientTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        config = config.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}

struct Target {
    id: u64,
    from: u64,
    cluster_id: u64,
}

async fn send_loop(
    target: Target,
    mut client: PeerClient<Channel>,
    mut rx: mpsc::Receiver<Message>,
    node: std_mpsc::Sender<Command>,
    cancel: CancellationToken,
) {
    // What was last said about a failing peer: said again only when it changes, and a vague
    // cause (a connection cut short) never replaces a precise one.
    let mut reported: Option<String> = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            next = rx.recv() => match next {
                Some(message) => message,
                None => return,
            },
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(message) => batch.push(message),
                Err(_) => break,
            }
        }
        let snapshots = batch
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .count();
        let request = MessageBatch {
            cluster_id: target.cluster_id,
            from: target.from,
            to: target.id,
            messages: batch
                .drain(..)
                .map(|m| m.write_to_bytes().unwrap_or_default())
                .collect(),
        };
        // A snapshot is the whole store: give it time to cross.
        let timeout = if snapshots > 0 {
            SNAPSHOT_SEND_TIMEOUT
        } else {
            SEND_TIMEOUT
        };
        let outcome = tokio::time::timeout(timeout, client.send(request)).await;
        let delivered = matches!(outcome, Ok(Ok(_)));
        for _ in 0..snapshots {
            let _ = node.send(Command::SnapshotSent {
                to: target.id,
                ok: delivered,
            });
        }
        let failure = match outcome {
            Ok(Ok(_)) => {
                if reported.take().is_some() {
                    tracing::info!("peer reachable again");
                }
                continue;
            }
            Ok(Err(status)) => describe_failure(&status),
            Err(_) => (
                format!("the peer does not answer within {timeout:?}"),
                false,
            ),
        };
        let (text, vague) = failure;
        if reported.as_deref() != Some(text.as_str()) && !(vague && reported.is_some()) {
            tracing::warn!(error = %text, "sending to peer failed");
            reported = Some(text);
        }
        unreachable(&mut rx, &node, target.id);
    }
}

/// A failed call's cause in words, and whether it is vague (a connection cut short without a
/// reason). A TLS refusal is named for what to fix, since the alert alone reads as noise.
fn describe_failure(status: &Status) -> (String, bool) {
    let mut text = status.message().to_owned();
    if let Some(source) = std::error::Error::source(status) {
        let chain = model::error_chain(source);
        if !text.contains(&chain) {
            text = format!("{text}: {chain}");
        }
    }
    const REFUSED_BY_PEER: [&str; 3] = ["UnknownCA", "BadCertificate", "CertificateUnknown"];
    if REFUSED_BY_PEER.iter().any(|alert| text.contains(alert)) {
        text.push_str(
            " (the peer does not trust this member's --peer-cert: is it signed by the CA in the peer's --peer-cacert?)",
        );
    } else if text.contains("UnknownIssuer") {
        text.push_str(
            " (this member does not trust the peer's certificate: is it signed by the CA in --peer-cacert?)",
        );
    }
    (text, status.code() == tonic::Code::Cancelled)
}

/// After a failed call: what was queued meanwhile is stale (raft probes the peer again and
/// sends what it then needs, a snapshot if the log moved on), so it is dropped.
fn unreachable(rx: &mut mpsc::Receiver<Message>, node: &std_mpsc::Sender<Command>, peer: u64) {
    while let Ok(message) = rx.try_recv() {
        // A dropped snapshot is a failed one: raft sends no appends to a member while it
        // believes a snapshot is on its way there.
        if message.get_msg_type() == MessageType::MsgSnapshot {
            let _ = node.send(Command::SnapshotSent {
                to: peer,
                ok: false,
            });
        }
    }
    let _ = node.send(Command::Unreachable(peer));
}

/// The peer service: raft messages in, lease calls for the leader, this member's description.
#[derive(Debug)]
pub struct PeerService {
    config: Arc<ClusterConfig>,
    node: std_mpsc::Sender<Command>,
    shared: Arc<Shared>,
    name: String,
    client_urls: Vec<String>,
    last_warning: Mutex<Option<Instant>>,
}

impl PeerService {
    fn check_cluster(&self, cluster_id: u64, from: Option<u64>) -> Result<(), Status> {
        let refusal = if cluster_id != self.config.cluster_id {
            Some(format!(
                "cluster ID mismatch: this member belongs to cluster {:x}, the sender to {cluster_id:x}",
                self.config.cluster_id
            ))
        } else {
            from.filter(|from| self.config.member(*from).is_none())
                .map(|from| format!("member {from:x} is not in this cluster"))
        };
        let Some(refusal) = refusal else {
            return Ok(());
        };
        let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            tracing::warn!(%refusal, "refused a peer");
            *last = Some(Instant::now());
        }
        Err(Status::failed_precondition(refusal))
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn send(&self, request: Request<MessageBatch>) -> Result<Response<SendReply>, Status> {
        let batch = request.into_inner();
        self.check_cluster(batch.cluster_id, Some(batch.from))?;
        if batch.to != self.config.id {
            return Err(Status::failed_precondition(format!(
                "sent to member {:x}, but this is member {:x}",
                batch.to, self.config.id
            )));
        }
        for bytes in batch.messages {
            let message = Message::parse_from_bytes(&bytes)
                .map_err(|e| Status::invalid_argument(format!("raft message: {e}")))?;
            if message.from != batch.from {
                return Err(Status::invalid_argument(format!(
                    "a message from {:x} in a batch from {:x}",
                    message.from, batch.from
                )));
            }
            self.node
                .send(Command::Step(Box::new(message)))
                .map_err(|_| Status::unavailable("etcdserver: server stopped"))?;
        }
        Ok(Response::new(SendReply {}))
    }

    async fn lease(&self, request: Request<LeaseCall>) -> Result<Response<LeaseReply>, Status> {
        let call = request.into_inner();
        self.check_cluster(call.cluster_id, None)?;
        if !self.shared.is_leader() {
            return Err(Status::unavailable("etcdserver: not the leader"));
        }
        let mut state = self.shared.write();
        // A keepalive is answered with the granted TTL, as etcd does; TimeToLive with what
        // is left.
        let renewed = call
            .keep_alive
            .then(|| state.lease_keep_alive(call.id))
            .flatten();
        let reply = match state.lease_ttl(call.id, call.keys) {
            Some(ttl) => LeaseReply {
                found: true,
                ttl: renewed.unwrap_or(ttl.remaining),
                granted_ttl: ttl.granted,
                keys: ttl.keys,
            },
            None => LeaseReply::default(),
        };
        Ok(Response::new(reply))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(request.cluster_id, None)?;
        super::corrupt::local_hash(&self.shared, request.revision)
            .await
            .map(Response::new)
            .map_err(|e| Status::internal(e.to_string()))
    }

    async fn describe(
        &self,
        request: Request<DescribeRequest>,
    ) -> Result<Response<MemberInfo>, Status> {
        self.check_cluster(request.into_inner().cluster_id, None)?;
        Ok(Response::new(MemberInfo {
            id: self.config.id,
            name: self.name.clone(),
            client_urls: self.client_urls.clone(),
        }))
    }
}

/// Serves the peer service on `--listen-peer-urls` until `cancel` fires.
pub async fn serve(
    config: Arc<ClusterConfig>,
    node: std_mpsc::Sender<Command>,
    shared: Arc<Shared>,
    name: String,
    client_urls: Vec<String>,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, TransportError> {
    let addr = config.listen_peer;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| TransportError::Bind { addr, source })?;
    let tls = config
        .peer_tls
        .as_ref()
        .map(|files| files.server_config().map(|c| (files.clone(), c)))
        .transpose()?;
    let service = PeerService {
        config,
        node,
        shared,
        name,
        client_urls,
        last_warning: Mutex::new(None),
    };
    let router = tonic::transport::Server::builder().add_service(
        PeerServer::new(service)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX),
    );
    Ok(tokio::spawn(async move {
        let shutdown = cancel.clone().cancelled_owned();
        let result = match tls {
            Some((files, server_config)) => {
                let incoming = tls::accept_loop(listener, files, server_config, cancel.clone());
                router
                    .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown)
                    .await
            }
            None => {
                let incoming = crate::server::plain_accept_loop(listener, cancel.clone());
                router
                    .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown)
                    .await
            }
        };
        if let Err(error) = result {
            tracing::error!(%error, "peer server stopped");
        }
    }))
}
