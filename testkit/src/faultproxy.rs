//! A TCP proxy that injects link faults between a client and a store (later: between raft
//! members), switchable at runtime.
//!
//! Faults act on the chunks the proxy reads from one side and writes to the other:
//!
//! - [`Fault::Blackhole`] stops moving bytes in both directions, and accepts new connections
//!   without moving theirs either. Nothing is closed or refused: a partition looks like
//!   silence. Bytes are held back, not thrown away: unread, they wait in socket buffers
//!   (the senders see a full window, as behind a real partition) and flow again once the
//!   fault is lifted, as TCP's retransmissions deliver them after a partition heals.
//!   Discarding them would leave a hole in a byte stream, which no network does to TCP; the
//!   stream would carry garbage instead of looking partitioned.
//! - [`Fault::Delay`] delays each chunk by a random duration, keeping the byte order of each
//!   direction: a chunk is never written before the one read ahead of it.
//! - [`Fault::Drop`] resets the connection (both sides) with a probability per chunk. TCP
//!   cannot lose bytes without corrupting its stream, so a lossy link breaks a long-lived
//!   stream instead, which is what the client of a lossy link ends up seeing.
//!
//! Each connection runs one task per direction; all of them end, and every connection is
//! closed, when the proxy is stopped or dropped.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Bytes read per chunk.
const CHUNK: usize = 16 * 1024;
/// Bytes a direction may hold in its delay queue before it stops reading (then the sender
/// waits, as on a slow link).
const MAX_QUEUED: usize = 1 << 20;
/// How long connecting to the upstream may take before the client's connection is closed.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the link does to the traffic.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Forward everything at once.
    Pass,
    /// Move no bytes, close nothing (see the module doc).
    Blackhole,
    /// Delay each chunk by a random duration in `[mean - jitter, mean + jitter]`.
    Delay {
        /// The mean delay.
        mean: Duration,
        /// The largest deviation from the mean; at most `mean`.
        jitter: Duration,
    },
    /// Reset the connection with this probability per chunk, instead of forwarding it.
    Drop {
        /// Between 0 and 1.
        probability: f64,
    },
}

impl Fault {
    /// The delay of a link across regions: 75 ms ± 50 ms per chunk.
    pub const DEFAULT_DELAY: Fault = Fault::Delay {
        mean: Duration::from_millis(75),
        jitter: Duration::from_millis(50),
    };

    fn validate(&self) -> Result<(), ProxyError> {
        let reason = match self {
            Fault::Delay { mean, jitter } if jitter > mean => "jitter exceeds the mean delay",
            Fault::Drop { probability } if !(0.0..=1.0).contains(probability) => {
                "probability outside [0, 1]"
            }
            _ => return Ok(()),
        };
        Err(ProxyError::InvalidFault {
            fault: self.clone(),
            reason,
        })
    }
}

/// Why the proxy could not start or take a fault.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The loopback listener could not be bound or queried.
    #[error("fault proxy listener: {0}")]
    Listen(#[source] std::io::Error),

    /// A fault's parameters are out of range; the proxy keeps its previous fault.
    #[error("invalid fault {fault:?}: {reason}")]
    InvalidFault {
        /// The fault refused.
        fault: Fault,
        /// What is out of range.
        reason: &'static str,
    },
}

/// Counters, for tests to see that a fault did act.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections still open (at least one direction running).
    pub open: u64,
    /// Bytes written to either side.
    pub bytes_forwarded: u64,
    /// Chunks given a non-zero delay.
    pub chunks_delayed: u64,
    /// Connections reset by [`Fault::Drop`].
    pub connections_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    open: AtomicU64,
    bytes_forwarded: AtomicU64,
    chunks_delayed: AtomicU64,
    connections_dropped: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A running proxy on `127.0.0.1`. Dropping it aborts every connection's tasks, which closes
/// the connections as soon as the runtime gets to them; [`FaultProxy::stop`] waits for that.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    counters: Arc<Counters>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`, passing
    /// everything until told otherwise. Returns the proxy and the address to connect to.
    pub async fn start(upstream: SocketAddr) -> Result<(Self, SocketAddr), ProxyError> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(ProxyError::Listen)?;
        let addr = listener.local_addr().map_err(ProxyError::Listen)?;
        let (fault, faults) = watch::channel(Fault::Pass);
        let counters = Arc::new(Counters::default());
        let (shutdown, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, upstream, faults, counters.clone(), stopped));
        let proxy = FaultProxy {
            addr,
            fault,
            counters,
            shutdown: Some(shutdown),
            task: Some(task),
        };
        Ok((proxy, addr))
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the fault, for open connections (from their next chunk) and new ones.
    pub fn set(&self, fault: Fault) -> Result<(), ProxyError> {
        fault.validate()?;
        self.fault.send_replace(fault);
        Ok(())
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        self.fault.borrow().clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            connections: get(&c.connections),
            open: get(&c.open),
            bytes_forwarded: get(&c.bytes_forwarded),
            chunks_delayed: get(&c.chunks_delayed),
            connections_dropped: get(&c.connections_dropped),
        }
    }

    /// Stops listening and closes every connection, returning once they are closed.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // An error means the accept task is gone already.
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            // A join error is a panic of the accept task, whose connections are gone with it.
            let _ = task.await;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A task of the accept loop: connecting to the upstream hands the pair back for its two
/// direction tasks; a direction task hands back nothing.
type Connected = Option<(TcpStream, TcpStream)>;

async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: watch::Receiver<Fault>,
    counters: Arc<Counters>,
    mut stopped: oneshot::Receiver<()>,
) {
    // Owning every task here means stopping (or aborting) this one ends them all.
    let mut tasks: JoinSet<Connected> = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    Counters::add(&counters.connections, 1);
                    tasks.spawn(async move {
                        let connect = TcpStream::connect(upstream);
                        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, connect).await {
                            Ok(Ok(server)) => Some((client, server)),
                            // Closing the client's connection is all a failed upstream can
                            // turn into.
                            _ => None,
                        }
                    });
                }
                // Out of descriptors, most likely: let some connections end first.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(done) = tasks.join_next() => {
                if let Ok(Some((client, server))) = done {
                    spawn_connection(&mut tasks, client, server, &faults, &counters);
                }
            }
        }
    }
    tasks.shutdown().await;
}

fn spawn_connection(
    tasks: &mut JoinSet<Connected>,
    client: TcpStream,
    server: TcpStream,
    faults: &watch::Receiver<Fault>,
    counters: &Arc<Counters>,
) {
    // Small request/response messages must not wait for Nagle on top of the fault. Failure
    // only costs latency.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    Counters::add(&counters.open, 1);
    let conn = Arc::new(Conn {
        killed: watch::channel(false).0,
        counters: counters.clone(),
    });
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, faults.clone(), conn.clone());
    let down = pump(server_read, client_write, faults.clone(), conn);
    tasks.spawn(async move {
        up.await;
        None
    });
    tasks.spawn(async move {
        down.await;
        None
    });
}

/// What the two directions of a connection share. The last direction to end drops it, and
/// with it the connection's place in [`Stats::open`].
struct Conn {
    killed: watch::Sender<bool>,
    counters: Arc<Counters>,
}

impl Conn {
    /// Ends the other direction too.
    fn kill(&self) {
        self.killed.send_replace(true);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Moves bytes from `from` to `to` under the current fault until either side ends, the
/// connection is killed or the proxy goes away.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut faults: watch::Receiver<Fault>,
    conn: Arc<Conn>,
) {
    let mut killed = conn.killed.subscribe();
    // Chunks read and not yet written, with when each is due; due times never decrease, so
    // the order of the byte stream is kept under any mix of faults.
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut queued = 0;
    let mut last_due = Instant::now();
    let mut eof = false;
    let mut buf = vec![0u8; CHUNK];
    loop {
        if *killed.borrow_and_update() {
            return;
        }
        if eof && queue.is_empty() {
            // Half-close, so the other side sees the end of this direction. It may be gone.
            let _ = to.shutdown().await;
            return;
        }
        let fault = faults.borrow_and_update().clone();
        let held = fault == Fault::Blackhole;
        let due = queue.front().map(|(due, _)| *due);
        tokio::select! {
            _ = killed.changed() => return,
            changed = faults.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(due.unwrap_or(last_due)), if due.is_some() && !held => {
                if let Some((_, chunk)) = queue.pop_front() {
                    queued -= chunk.len();
                    if to.write_all(&chunk).await.is_err() {
                        conn.kill();
                        return;
                    }
                    Counters::add(&conn.counters.bytes_forwarded, chunk.len() as u64);
                }
            }
            read = from.read(&mut buf), if !held && !eof && queued < MAX_QUEUED => match read {
                Ok(0) => eof = true,
                Ok(n) => {
                    let delay = match fault {
                        Fault::Delay { mean, jitter } => {
                            rand::random_range(mean.saturating_sub(jitter)..=mean + jitter)
                        }
                        Fault::Drop { probability } if rand::random_bool(probability) => {
                            // Zero linger turns the close into a reset, on both sockets.
                            let _ = from.as_ref().set_zero_linger();
                            let _ = to.as_ref().set_zero_linger();
                            Counters::add(&conn.counters.connections_dropped, 1);
                            conn.kill();
                            return;
                        }
                        _ => Duration::ZERO,
                    };
                    if !delay.is_zero() {
                        Counters::add(&conn.counters.chunks_delayed, 1);
                    }
                    last_due = last_due.max(Instant::now() + delay);
                    queue.push_back((last_due, buf[..n].to_vec()));
                    queued += n;
                }
                Err(_) => {
                    conn.kill();
                    return;
                }
            }
        }
    }
}
