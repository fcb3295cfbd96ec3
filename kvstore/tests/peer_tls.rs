//! Mutual TLS between members (`--peer-cert/--peer-key/--peer-cacert`): two members with
//! certificates from the cluster's CA form the cluster and replicate over TLS; a third whose
//! certificate comes from a CA they do not trust is refused on both directions, each side
//! saying why in its log, and the two keep serving.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use testkit::{CertFiles, TestPki};

/// A member process, killed when dropped so a failing test leaves nothing running.
struct Member {
    child: Child,
    client_url: String,
    log: PathBuf,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Member {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn client(&self) -> Client {
        Client::connect([self.client_url.as_str()], None)
            .await
            .expect("connect")
    }
}

fn spawn(
    work: &Path,
    name: &str,
    ports: (u16, u16),
    initial_cluster: &str,
    certs: &CertFiles,
) -> Member {
    let client_url = format!("http://127.0.0.1:{}", ports.0);
    let peer_url = format!("https://127.0.0.1:{}", ports.1);
    let log = work.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .arg("serve")
        .arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(work.join(name))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", initial_cluster])
        .args(["--initial-cluster-token", "peer-tls"])
        .arg("--peer-cert")
        .arg(&certs.cert)
        .arg("--peer-key")
        .arg(&certs.key)
        .arg("--peer-cacert")
        .arg(&certs.ca)
        .env("RUST_LOG", "info")
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .expect("start kvstore");
    Member {
        child,
        client_url,
        log,
    }
}

/// Polls until `check` holds or 20 s pass; returns whether it held.
async fn eventually(mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test]
async fn a_member_with_a_certificate_from_an_unknown_ca_is_refused_and_the_others_serve() {
    let pki = TestPki::generate();
    let work = tempfile::tempdir().expect("temp dir");
    let ports = testkit::free_ports(6).expect("ports");
    let pair = |i: usize| (ports[2 * i], ports[2 * i + 1]);
    let initial_cluster = (0..3)
        .map(|i| format!("m{i}=https://127.0.0.1:{}", pair(i).1))
        .collect::<Vec<_>>()
        .join(",");
    let trusted = pki.peer();
    let members = [
        spawn(work.path(), "m0", pair(0), &initial_cluster, &trusted),
        spawn(work.path(), "m1", pair(1), &initial_cluster, &trusted),
        spawn(
            work.path(),
            "m2",
            pair(2),
            &initial_cluster,
            &pki.foreign_peer(),
        ),
    ];
    let logs = || {
        members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("--- m{i} ---\n{}", m.log()))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // m0 and m1 are a majority: they elect a leader over TLS and commit without m2.
    let mut c0 = members[0].client().await;
    let written = eventually(async || c0.put("over", "tls", None).await.is_ok()).await;
    assert!(written, "the trusted members did not commit:\n{}", logs());
    let mut c1 = members[1].client().await;
    let replicated = eventually(async || {
        c1.get("over", Some(GetOptions::new().with_serializable()))
            .await
            .is_ok_and(|r| r.kvs().first().map(|kv| kv.value()) == Some(b"tls".as_slice()))
    })
    .await;
    assert!(replicated, "m1 did not get the write:\n{}", logs());

    // Every side says why: m2 learns that its peers do not trust its certificate…
    let m2_says = eventually(async || {
        let log = members[2].log();
        log.contains("sending to peer failed")
            && log.contains("the peer does not trust this member's --peer-cert")
    })
    .await;
    // …the trusted members refuse it when m2 dials them…
    let m0_says = eventually(async || {
        let log = members[0].log();
        log.contains("TLS handshake refused") && log.contains("UnknownIssuer")
    })
    .await;
    // …and whichever of them dials m2 (the leader does) refuses m2's server certificate.
    let leader_says = eventually(async || {
        members[..2].iter().any(|m| {
            m.log()
                .contains("this member does not trust the peer's certificate")
        })
    })
    .await;
    assert!(
        m2_says && m0_says && leader_says,
        "each side should name the cause:\n{}",
        logs()
    );

    // m2 never hears a leader, so it has nothing; the others keep serving.
    let status = members[2]
        .client()
        .await
        .status()
        .await
        .expect("m2 answers status");
    assert_eq!(status.leader(), 0, "m2 should not know a leader");
    let stale = members[2]
        .client()
        .await
        .get("over", Some(GetOptions::new().with_serializable()))
        .await
        .expect("serializable get on m2");
    assert!(
        stale.kvs().is_empty(),
        "m2 has data it cannot have received"
    );
    c1.put("still", "serving", None)
        .await
        .expect("m1 takes writes");
    let read = c0.get("still", None).await.expect("linearizable get on m0");
    assert_eq!(read.kvs().len(), 1);
}
