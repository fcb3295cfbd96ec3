//! The fault proxy between an etcd client and a real etcd: each fault does to requests what
//! it claims, and switching back to pass heals the link. Timing is only checked from below
//! (a delay at least as long as asked), so a slow machine cannot make these flaky.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use testkit::faultproxy::{Fault, FaultProxy, ProxyError};
use testkit::{Backend, StoreOptions, StoreProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a partitioned request is given before the client gives up.
const SHORT_TIMEOUT: Duration = Duration::from_millis(500);
/// A bound for things that must happen, so a bug fails the test instead of hanging it.
const EVENTUALLY: Duration = Duration::from_secs(10);

async fn etcd_behind_proxy() -> (StoreProcess, FaultProxy, SocketAddr) {
    let store = StoreProcess::start(Backend::Etcd, StoreOptions::default())
        .await
        .expect("start etcd");
    let upstream = SocketAddr::from(([127, 0, 0, 1], store.port()));
    let (proxy, addr) = FaultProxy::start(upstream).await.expect("start proxy");
    (store, proxy, addr)
}

async fn client(addr: SocketAddr, timeout: Duration) -> Client {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(timeout);
    Client::connect([format!("http://{addr}")], Some(opts))
        .await
        .expect("connect through the proxy")
}

#[tokio::test]
async fn pass_forwards_requests() {
    let (_store, proxy, addr) = etcd_behind_proxy().await;
    let mut c = client(addr, EVENTUALLY).await;
    c.put("k", "v", None).await.expect("put");
    let got = c.get("k", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"v");
    let stats = proxy.stats();
    assert!(stats.connections >= 1 && stats.open >= 1, "{stats:?}");
    assert!(stats.bytes_forwarded > 0, "{stats:?}");
    assert_eq!(stats.connections_dropped, 0);
}

#[tokio::test]
async fn blackhole_is_silence_and_heals() {
    let (_store, proxy, addr) = etcd_behind_proxy().await;
    let mut c = client(addr, EVENTUALLY).await;
    c.put("k", "before", None).await.expect("put while passing");

    proxy.set(Fault::Blackhole).expect("blackhole");
    let forwarded = proxy.stats().bytes_forwarded;
    // The client's short timeout: the abandoned request is cancelled, as a timeout does.
    let res = tokio::time::timeout(SHORT_TIMEOUT, c.get("k", None)).await;
    assert!(res.is_err(), "a partitioned request times out: {res:?}");
    let stats = proxy.stats();
    assert!(
        stats.open >= 1,
        "the connection is held, not closed: {stats:?}"
    );
    assert_eq!(stats.bytes_forwarded, forwarded, "nothing crossed");

    proxy.set(Fault::Pass).expect("pass");
    let got = c.get("k", None).await.expect("the healed link answers");
    assert_eq!(got.kvs()[0].value(), b"before");
}

#[tokio::test]
async fn delay_adds_latency() {
    let (_store, proxy, addr) = etcd_behind_proxy().await;
    let mut c = client(addr, EVENTUALLY).await;
    c.put("k", "v", None).await.expect("put");

    proxy.set(Fault::DEFAULT_DELAY).expect("delay");
    let Fault::Delay { mean, jitter } = Fault::DEFAULT_DELAY else {
        unreachable!("DEFAULT_DELAY is a delay")
    };
    let started = Instant::now();
    let got = c.get("k", None).await.expect("delayed get");
    let took = started.elapsed();
    assert_eq!(got.kvs()[0].value(), b"v");
    assert!(took >= mean - jitter, "took {took:?}");
    assert!(proxy.stats().chunks_delayed >= 2, "{:?}", proxy.stats());
}

#[tokio::test]
async fn drop_breaks_the_connection() {
    let (_store, proxy, addr) = etcd_behind_proxy().await;
    let mut c = client(addr, EVENTUALLY).await;
    c.put("k", "v", None).await.expect("put");

    proxy
        .set(Fault::Drop { probability: 1.0 })
        .expect("drop all");
    c.get("k", None)
        .await
        .expect_err("a reset connection fails the request");
    assert!(
        proxy.stats().connections_dropped >= 1,
        "{:?}",
        proxy.stats()
    );

    proxy
        .set(Fault::Drop { probability: 0.0 })
        .expect("drop none");
    let dropped = proxy.stats().connections_dropped;
    let mut fresh = client(addr, EVENTUALLY).await;
    for _ in 0..20 {
        fresh.get("k", None).await.expect("p = 0 passes");
    }
    assert_eq!(proxy.stats().connections_dropped, dropped);
}

#[tokio::test]
async fn invalid_faults_are_refused() {
    let upstream = SocketAddr::from(([127, 0, 0, 1], 9));
    let (proxy, _) = FaultProxy::start(upstream).await.expect("start proxy");
    for fault in [
        Fault::Drop { probability: 1.5 },
        Fault::Drop {
            probability: f64::NAN,
        },
        Fault::Delay {
            mean: Duration::from_millis(10),
            jitter: Duration::from_millis(20),
        },
    ] {
        let res = proxy.set(fault);
        assert!(
            matches!(res, Err(ProxyError::InvalidFault { .. })),
            "{res:?}"
        );
    }
    assert_eq!(
        proxy.fault(),
        Fault::Pass,
        "a refused fault changes nothing"
    );
}

/// An upstream that echoes every byte back.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn delay_keeps_byte_order() {
    let (proxy, addr) = FaultProxy::start(echo_server().await)
        .await
        .expect("start proxy");
    proxy
        .set(Fault::Delay {
            mean: Duration::from_millis(10),
            jitter: Duration::from_millis(10),
        })
        .expect("delay");
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = stream.into_split();
    let sent: Vec<u8> = (0..200u32).flat_map(|i| i.to_be_bytes()).collect();
    let to_send = sent.clone();
    let writer = tokio::spawn(async move {
        // Many small writes, so that many chunks get independent random delays.
        for word in to_send.chunks(4) {
            w.write_all(word).await.expect("write");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        w
    });
    let mut received = vec![0u8; sent.len()];
    tokio::time::timeout(EVENTUALLY, r.read_exact(&mut received))
        .await
        .expect("echo arrives")
        .expect("read");
    assert_eq!(received, sent, "bytes reordered");
    drop(writer.await.expect("writer"));
    assert!(proxy.stats().chunks_delayed > 1, "{:?}", proxy.stats());
}

/// Waits until the peer closes or resets `stream`.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(EVENTUALLY, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn stop_and_drop_close_connections() {
    let upstream = echo_server().await;
    for stop in [true, false] {
        let (proxy, addr) = FaultProxy::start(upstream).await.expect("start proxy");
        // Blackholed, so that only the proxy going away can end the connection.
        proxy.set(Fault::Blackhole).expect("blackhole");
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"held").await.expect("write");
        let deadline = Instant::now() + EVENTUALLY;
        while proxy.stats().open == 0 {
            assert!(Instant::now() < deadline, "connection never set up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if stop {
            proxy.stop().await;
        } else {
            drop(proxy);
        }
        assert!(closed(&mut stream).await, "stop: {stop}");
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }
}
