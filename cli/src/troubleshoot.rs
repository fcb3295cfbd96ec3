//! `clustermesh troubleshoot`: checks what `status` cannot see from the daemons' reports —
//! the certificates (expiry, CN, CA chain, names the server is reached by), whether each
//! peer store is reachable with the files this cluster's peer file names, id conflicts
//! (in the contexts and in what peers publish), and clock skew from the heartbeats — and
//! says what to fix.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use certs::rustls_pki_types::pem::PemObject;
use certs::rustls_pki_types::{CertificateDer, UnixTime};
use certs::{Issued, TrustBundle, User};
use kvstore::client::StoreClient;
use model::keys::{HEARTBEAT_KEY, cluster_config_key};
use model::{Capabilities, ClusterConfig, ClusterContext, ClusterName, PeerFile, StoreValue};
use serde::Serialize;

use crate::enable::endpoint_host;
use crate::layout::{CertsLayout, PeerFiles};
use crate::mesh::{self, Mesh};
use crate::probe::{self, Cause};

/// A certificate that expires sooner than this is reported.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);
/// A heartbeat further in the future than this means the writer's clock is ahead.
pub const SKEW_TOLERANCE: Duration = Duration::from_secs(2);
/// A heartbeat older than this means the writer stopped, or its clock is behind (the
/// apiserver writes one every 5 s by default).
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(20);

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The cluster checked.
    pub cluster: String,
    /// What was checked.
    pub check: String,
    /// It passed.
    pub ok: bool,
    /// What was found.
    pub message: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// What to fix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<&'static str>,
}

struct Findings<'a> {
    cluster: &'a str,
    out: Vec<Finding>,
}

impl Findings<'_> {
    fn ok(&mut self, check: impl Into<String>, message: impl Into<String>) {
        self.out.push(Finding {
            cluster: self.cluster.to_owned(),
            check: check.into(),
            ok: true,
            message: message.into(),
            cause: None,
            fix: None,
        });
    }

    fn fail(&mut self, check: impl Into<String>, cause: Cause, message: impl Into<String>) {
        self.out.push(Finding {
            cluster: self.cluster.to_owned(),
            check: check.into(),
            ok: false,
            message: message.into(),
            cause: Some(cause),
            fix: Some(cause.hint()),
        });
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The leaf's expiry and subject.
fn leaf_info(leaf: &CertificateDer<'_>) -> Result<(SystemTime, String), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let not_after = cert.validity().not_after.timestamp();
    let time = if not_after >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH
    };
    Ok((time, cert.subject().to_string()))
}

/// Checks every identity of the cluster's certs-dir at time `now`.
fn check_certificates(context: &ClusterContext, now: SystemTime, f: &mut Findings<'_>) {
    let layout = CertsLayout::new(context.name.clone(), &context.certs_dir);
    let hosts: Vec<&str> = context
        .store
        .endpoints
        .iter()
        .chain(&context.peer_endpoints)
        .filter_map(|e| endpoint_host(e))
        .collect();
    let unix_now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    for (user, dir) in layout.identities() {
        let check = format!(
            "certificate {}",
            user.as_ref().map_or("server".to_owned(), User::cn)
        );
        let [cert_path, _, _] = Issued::paths(&dir);
        let chain: Result<Vec<CertificateDer<'static>>, _> =
            CertificateDer::pem_file_iter(&cert_path).and_then(|it| it.collect());
        let chain = match chain {
            Ok(chain) if !chain.is_empty() => chain,
            Ok(_) => {
                f.fail(
                    &check,
                    Cause::FileMissing,
                    format!("{} holds no certificate", cert_path.display()),
                );
                continue;
            }
            Err(e) => {
                f.fail(
                    &check,
                    Cause::FileMissing,
                    format!(
                        "cannot read {}: {e}; was `clustermesh enable` run?",
                        cert_path.display()
                    ),
                );
                continue;
            }
        };
        let (not_after, subject) = match leaf_info(&chain[0]) {
            Ok(info) => info,
            Err(e) => {
                f.fail(
                    &check,
                    Cause::CertificateChain,
                    format!("{}: {e}", cert_path.display()),
                );
                continue;
            }
        };
        if not_after <= now {
            f.fail(
                &check,
                Cause::CertificateExpiry,
                format!("{subject} expired at {}", rfc3339(not_after)),
            );
            continue;
        }
        let bundle = match TrustBundle::load(&dir) {
            Ok(bundle) => bundle,
            Err(e) => {
                f.fail(&check, Cause::FileMissing, e.report());
                continue;
            }
        };
        let verified = match &user {
            Some(expected) => match bundle.verify_client(&chain, unix_now) {
                Ok(found) if &found == expected => Ok(()),
                Ok(found) => Err((
                    Cause::CertificateChain,
                    format!("names {found}, expected {expected}"),
                )),
                Err(e) => Err((Cause::CertificateChain, e.report())),
            },
            None => hosts
                .iter()
                .try_for_each(|host| {
                    bundle
                        .verify_server(&chain, host, unix_now)
                        .map_err(|e| format!("not valid for {host}: {}", e.report()))
                })
                .map_err(|m| (Cause::Tls, m)),
        };
        if let Err((cause, message)) = verified {
            f.fail(&check, cause, format!("{subject}: {message}"));
            continue;
        }
        let left = not_after.duration_since(now).unwrap_or_default();
        let days = left.as_secs() / 86_400;
        if left < EXPIRY_WARNING {
            f.fail(
                &check,
                Cause::CertificateExpiry,
                format!("{subject} expires in {days} days ({})", rfc3339(not_after)),
            );
        } else {
            let names = if user.is_none() && !hosts.is_empty() {
                format!(", valid for {}", hosts.join(", "))
            } else {
                String::new()
            };
            f.ok(
                &check,
                format!(
                    "{subject}, chains to its CA, valid until {} ({days} days){names}",
                    rfc3339(not_after)
                ),
            );
        }
    }
}

/// Checks a heartbeat's time against ours.
fn check_heartbeat(check: &str, value: &[u8], now: SystemTime, f: &mut Findings<'_>) {
    let text = String::from_utf8_lossy(value);
    let Ok(beat) = humantime::parse_rfc3339_weak(text.trim()) else {
        f.fail(
            check,
            Cause::BadAnswer,
            format!("heartbeat {text:?} is not an RFC 3339 time"),
        );
        return;
    };
    match beat.duration_since(now) {
        Ok(ahead) if ahead > SKEW_TOLERANCE => f.fail(
            check,
            Cause::ClockSkew,
            format!(
                "heartbeat {text} is {:.1} s in our future: that clock is ahead",
                ahead.as_secs_f64()
            ),
        ),
        Ok(ahead) => f.ok(
            check,
            format!("heartbeat {text}, {:.1} s ahead of us", ahead.as_secs_f64()),
        ),
        Err(behind) => {
            let age = behind.duration();
            if age > HEARTBEAT_STALE {
                f.fail(
                    check,
                    Cause::ClockSkew,
                    format!(
                        "heartbeat {text} is {:.0} s old: its apiserver stopped writing it, or its \
                         clock is behind",
                        age.as_secs_f64()
                    ),
                );
            } else {
                f.ok(
                    check,
                    format!("heartbeat {text}, {:.1} s old", age.as_secs_f64()),
                );
            }
        }
    }
}

async fn read_key(client: &StoreClient, key: &str) -> Result<Option<Vec<u8>>, String> {
    client
        .raw()
        .get(key)
        .await
        .map(|e| e.map(|e| e.value))
        .map_err(|e| model::error_chain(&e))
}

/// Checks each configured peer's store, as this cluster's kvstoremesh would reach it.
async fn check_peers(
    context: &ClusterContext,
    mesh: &Mesh,
    timeout: Duration,
    f: &mut Findings<'_>,
) {
    let peers = match mesh::configured_peers(&context.peers_dir, &context.name) {
        Ok(peers) => peers,
        Err(e) => {
            f.fail("peers", Cause::FileMissing, model::error_chain(&e));
            return;
        }
    };
    if peers.is_empty() {
        f.ok(
            "peers",
            format!("no peer files in {}", context.peers_dir.display()),
        );
    }
    let own = ClusterConfig::new(
        context.name.clone(),
        context.id,
        context.max_connected_clusters,
        Capabilities {
            sync_canaries: true,
            cached: false,
            service_exports: false,
        },
    );
    let mut published_ids: BTreeMap<u16, ClusterName> = BTreeMap::new();
    for peer in peers {
        let check = format!("peer {peer}");
        let path = PeerFiles::new(&context.peers_dir, &peer).peer_file;
        let file = match std::fs::read(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|b| PeerFile::parse(&b).map_err(|e| format!("{}: {e}", path.display())))
        {
            Ok(file) => file.resolve(&context.peers_dir),
            Err(e) => {
                f.fail(&check, Cause::of_text(&e), e);
                continue;
            }
        };
        if let Some(missing) = probe::missing_files(&file).first() {
            f.fail(
                &check,
                Cause::FileMissing,
                format!(
                    "{} names {}, which does not exist",
                    path.display(),
                    missing.display()
                ),
            );
            continue;
        }
        let (client, reached) = probe::store_status(&file, timeout).await;
        let (Some(client), Some(status)) = (client, reached.status) else {
            let (cause, text) = reached
                .error
                .unwrap_or((Cause::Other, "no answer".to_owned()));
            f.fail(
                &check,
                cause,
                format!(
                    "store at {} not reachable: {text}",
                    file.endpoints.join(",")
                ),
            );
            continue;
        };
        f.ok(
            &check,
            format!(
                "store at {} reachable with our remote certificate (version {}, revision {})",
                client.endpoints(),
                status.version,
                status.revision
            ),
        );
        let config_check = format!("peer {peer} id");
        match read_key(&client, &cluster_config_key(&peer)).await {
            Err(e) => f.fail(&config_check, Cause::of_text(&e), e),
            Ok(None) => f.fail(
                &config_check,
                Cause::ConfigMissing,
                format!("{peer} has not published {}", cluster_config_key(&peer)),
            ),
            Ok(Some(bytes)) => match ClusterConfig::decode(&bytes) {
                Err(e) => f.fail(&config_check, Cause::BadAnswer, model::error_chain(&e)),
                Ok(config) => {
                    let verdict = match &own {
                        Ok(own) => own.check_peer(&config).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let in_context = mesh
                        .clusters
                        .iter()
                        .find(|c| c.name == peer)
                        .filter(|c| c.id != config.id);
                    let other = published_ids.insert(config.id.get(), peer.clone());
                    if let Err(e) = verdict {
                        f.fail(&config_check, Cause::IdClash, e);
                    } else if let Some(other) = other {
                        f.fail(
                            &config_check,
                            Cause::IdClash,
                            format!(
                                "{peer} publishes id {}, which {other} publishes too",
                                config.id
                            ),
                        );
                    } else if let Some(c) = in_context {
                        f.fail(
                            &config_check,
                            Cause::IdClash,
                            format!(
                                "{peer} publishes id {}, but its context says {}",
                                config.id, c.id
                            ),
                        );
                    } else {
                        f.ok(
                            &config_check,
                            format!(
                                "id {}, max-connected-clusters {}: compatible",
                                config.id, config.max_connected_clusters
                            ),
                        );
                    }
                }
            },
        }
        let clock_check = format!("peer {peer} clock");
        match read_key(&client, HEARTBEAT_KEY).await {
            Err(e) => f.fail(&clock_check, Cause::of_text(&e), e),
            Ok(None) => f.fail(
                &clock_check,
                Cause::ConfigMissing,
                format!("{peer} has no {HEARTBEAT_KEY}: its apiserver is not publishing"),
            ),
            Ok(Some(value)) => check_heartbeat(&clock_check, &value, SystemTime::now(), f),
        }
    }
}

/// Runs every check on the selected clusters.
pub async fn troubleshoot(
    mesh: &Mesh,
    only: Option<&ClusterName>,
    timeout: Duration,
) -> Result<Vec<Finding>, mesh::MeshError> {
    let mut out = Vec::new();
    for context in mesh.select(only)? {
        let mut f = Findings {
            cluster: context.name.as_str(),
            out: Vec::new(),
        };
        for clash in mesh::id_clashes(&mesh.clusters) {
            if clash.clusters.contains(&context.name) {
                let names: Vec<&str> = clash.clusters.iter().map(ClusterName::as_str).collect();
                f.fail(
                    "ids",
                    Cause::IdClash,
                    format!("cluster id {} is used by {}", clash.id, names.join(" and ")),
                );
            }
        }
        check_certificates(context, SystemTime::now(), &mut f);
        let (client, store) = probe::store_status(&context.store, timeout).await;
        match (client, store.status) {
            (Some(client), Some(status)) => {
                f.ok(
                    "store",
                    format!(
                        "reachable as admin at {} (version {}, revision {})",
                        client.endpoints(),
                        status.version,
                        status.revision
                    ),
                );
                match read_key(&client, HEARTBEAT_KEY).await {
                    Ok(Some(value)) => check_heartbeat("clock", &value, SystemTime::now(), &mut f),
                    Ok(None) => f.fail(
                        "clock",
                        Cause::ConfigMissing,
                        format!("no {HEARTBEAT_KEY} in our store: is the apiserver running?"),
                    ),
                    Err(e) => f.fail("clock", Cause::of_text(&e), e),
                }
            }
            _ => {
                let (cause, text) = store
                    .error
                    .unwrap_or((Cause::Other, "no answer".to_owned()));
                f.fail("store", cause, text);
            }
        }
        check_peers(context, mesh, timeout, &mut f).await;
        out.extend(f.out);
    }
    Ok(out)
}

/// The human-readable findings, failures with what to fix.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    let mut cluster = "";
    for finding in findings {
        if finding.cluster != cluster {
            cluster = &finding.cluster;
            let _ = writeln!(out, "cluster {cluster}");
        }
        let mark = if finding.ok { "✓" } else { "✗" };
        let _ = writeln!(out, "  {mark} {}: {}", finding.check, finding.message);
        if let Some(fix) = finding.fix {
            let _ = writeln!(out, "      fix: {fix}");
        }
    }
    let failed = findings.iter().filter(|f| !f.ok).count();
    let _ = writeln!(
        out,
        "{failed} problem(s) found in {} check(s)",
        findings.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings(run: impl FnOnce(&mut Findings<'_>)) -> Vec<Finding> {
        let mut f = Findings {
            cluster: "a",
            out: Vec::new(),
        };
        run(&mut f);
        f.out
    }

    #[test]
    fn heartbeats_tell_skew_from_staleness() {
        let now = humantime::parse_rfc3339("2026-01-01T00:00:10Z").unwrap();
        let out = findings(|f| {
            check_heartbeat("c", b"2026-01-01T00:00:08Z", now, f);
            check_heartbeat("c", b"2026-01-01T00:00:20Z", now, f);
            check_heartbeat("c", b"2025-12-31T23:59:00Z", now, f);
            check_heartbeat("c", b"yesterday", now, f);
        });
        assert!(out[0].ok, "{:?}", out[0]);
        assert_eq!(out[1].cause, Some(Cause::ClockSkew));
        assert!(
            out[1].message.contains("10.0 s in our future"),
            "{}",
            out[1].message
        );
        assert!(out[2].message.contains("70 s old"), "{}", out[2].message);
        assert_eq!(out[3].cause, Some(Cause::BadAnswer));
    }

    #[test]
    fn certificates_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let yaml =
            crate::mesh::tests::context_yaml("a", 1, "peer-endpoints: [https://b.example:1]\n");
        let context = ClusterContext::parse(yaml.as_bytes())
            .unwrap()
            .resolve(dir.path());
        let out = findings(|f| check_certificates(&context, SystemTime::now(), f));
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|f| f.cause == Some(Cause::FileMissing)));

        crate::enable::enable(&context, &crate::enable::EnableOptions::default()).unwrap();
        let out = findings(|f| check_certificates(&context, SystemTime::now(), f));
        assert!(out.iter().all(|f| f.ok), "{out:#?}");
        assert!(
            out[0].message.contains("valid for 127.0.0.1, b.example"),
            "{}",
            out[0].message
        );

        let later = SystemTime::now() + Duration::from_secs(340 * 86_400);
        let out = findings(|f| check_certificates(&context, later, f));
        assert!(
            out.iter()
                .all(|f| f.cause == Some(Cause::CertificateExpiry)),
            "{out:#?}"
        );
        let much_later = SystemTime::now() + Duration::from_secs(400 * 86_400);
        let out = findings(|f| check_certificates(&context, much_later, f));
        assert!(out[0].message.contains("expired at"), "{}", out[0].message);

        // Another cluster's identity in a's admin directory.
        let other = tempfile::tempdir().unwrap();
        let b = ClusterContext::parse(crate::mesh::tests::context_yaml("b", 2, "").as_bytes())
            .unwrap()
            .resolve(other.path());
        crate::enable::enable(&b, &crate::enable::EnableOptions::default()).unwrap();
        for file in ["tls.crt", "tls.key", "ca.crt"] {
            std::fs::copy(
                b.certs_dir.join("admin-b").join(file),
                context.certs_dir.join("admin-a").join(file),
            )
            .unwrap();
        }
        let out = findings(|f| check_certificates(&context, SystemTime::now(), f));
        let admin = out
            .iter()
            .find(|f| f.check == "certificate admin-a")
            .unwrap();
        assert_eq!(admin.cause, Some(Cause::CertificateChain));
        assert!(
            admin.message.contains("names admin-b, expected admin-a"),
            "{}",
            admin.message
        );
    }
}
