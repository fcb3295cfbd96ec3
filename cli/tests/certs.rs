//! Runs the built `clustermesh` binary and checks what it leaves on disk with the `certs`
//! crate (rustls' verifiers, no openssl).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use certs::rustls_pki_types::UnixTime;
use certs::{Ca, Identity, TrustBundle, User};

fn clustermesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clustermesh"))
        .args(args)
        .output()
        .expect("run clustermesh")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn generate_writes_a_verifiable_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let run = clustermesh(&[
        "certs",
        "generate",
        "--cluster",
        "a",
        "--out",
        s(&out),
        "--dns-name",
        "store.a.example",
        "--ip",
        "192.0.2.7",
        "--key-type",
        "ecdsa-p384",
        "--validity",
        "30d",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(String::from_utf8_lossy(&run.stdout).contains("created CA"));

    assert_eq!(mode_of(&out.join("ca/ca.key")), 0o600);
    assert_eq!(mode_of(&out.join("ca/ca.crt")), 0o644);
    for dir in ["server", "admin-a", "remote-a", "local-a"] {
        assert_eq!(mode_of(&out.join(dir).join("tls.key")), 0o600, "{dir}");
        assert_eq!(mode_of(&out.join(dir).join("tls.crt")), 0o644, "{dir}");
        assert_eq!(mode_of(&out.join(dir).join("ca.crt")), 0o644, "{dir}");
    }

    let ca = Ca::load(&out.join("ca")).unwrap();
    let trust = TrustBundle::load(&out.join("ca/ca.crt")).unwrap();
    let now = UnixTime::now();
    let server = Identity::load(&out.join("server")).unwrap();
    for name in [
        "a.mesh.local",
        "localhost",
        "127.0.0.1",
        "store.a.example",
        "192.0.2.7",
    ] {
        trust
            .verify_server(server.chain(), name, now)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(
        trust
            .verify_server(server.chain(), "b.mesh.local", now)
            .is_err()
    );
    for user in User::all(&"a".parse().unwrap()) {
        let id = Identity::load(&out.join(user.cn())).unwrap();
        assert_eq!(id.trust(), &ca.trust_bundle());
        assert_eq!(trust.verify_client(id.chain(), now).unwrap(), user);
    }
    // --validity reached the certificates: valid now, expired in 31 days.
    let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        now.as_secs() + 31 * 24 * 3600,
    ));
    let admin = Identity::load(&out.join("admin-a")).unwrap();
    assert!(trust.verify_client(admin.chain(), later).is_err());
}

#[test]
fn generate_refuses_to_overwrite_then_force_reuses_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = ["certs", "generate", "--cluster", "a", "--out", s(&out)];
    assert!(clustermesh(&args).status.success());
    let ca_before = fs::read(out.join("ca/ca.crt")).unwrap();
    let leaf_before = fs::read(out.join("admin-a/tls.crt")).unwrap();

    let again = clustermesh(&args);
    assert_eq!(again.status.code(), Some(64));
    let msg = stderr(&again);
    assert!(
        msg.contains("already exists") && msg.contains("--force"),
        "{msg}"
    );
    assert_eq!(fs::read(out.join("admin-a/tls.crt")).unwrap(), leaf_before);

    let mut forced = args.to_vec();
    forced.push("--force");
    let run = clustermesh(&forced);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(String::from_utf8_lossy(&run.stdout).contains("reused CA"));
    assert_eq!(fs::read(out.join("ca/ca.crt")).unwrap(), ca_before);
    assert_ne!(fs::read(out.join("admin-a/tls.crt")).unwrap(), leaf_before);
    assert_eq!(mode_of(&out.join("admin-a/tls.key")), 0o600);
}

#[test]
fn two_clusters_share_a_ca_dir_and_bundles_join_two_meshes() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("mesh-ca");
    for c in ["a", "b"] {
        let out = tmp.path().join(c);
        let run = clustermesh(&[
            "certs",
            "generate",
            "--cluster",
            c,
            "--out",
            s(&out),
            "--ca-dir",
            s(&ca_dir),
            "--key-type",
            "ed25519",
        ]);
        assert!(run.status.success(), "{}", stderr(&run));
    }
    assert!(!tmp.path().join("a/ca").exists());
    let shared = TrustBundle::load(&ca_dir).unwrap();
    let b_remote = Identity::load(&tmp.path().join("b/remote-b")).unwrap();
    assert_eq!(
        shared
            .verify_client(b_remote.chain(), UnixTime::now())
            .unwrap(),
        User::remote("b").unwrap()
    );

    // A third cluster with its own CA joins through a bundle.
    let c_out = tmp.path().join("c");
    assert!(
        clustermesh(&["certs", "generate", "--cluster", "c", "--out", s(&c_out)])
            .status
            .success()
    );
    let bundle = tmp.path().join("bundle.crt");
    let run = clustermesh(&[
        "certs",
        "bundle",
        "--out",
        s(&bundle),
        s(&ca_dir.join("ca.crt")),
        s(&c_out.join("ca")),
        s(&tmp.path().join("a/admin-a/ca.crt")),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(String::from_utf8_lossy(&run.stdout).contains("wrote 2 CA"));
    let joined = TrustBundle::load(&bundle).unwrap();
    assert_eq!(joined.len(), 2);
    for id in ["b/remote-b", "c/remote-c"] {
        let id = Identity::load(&tmp.path().join(id)).unwrap();
        joined.verify_client(id.chain(), UnixTime::now()).unwrap();
    }

    // Refuses to overwrite, then merges into itself with --force.
    let again = clustermesh(&["certs", "bundle", "--out", s(&bundle), s(&ca_dir)]);
    assert_eq!(again.status.code(), Some(64), "{}", stderr(&again));
    let run = clustermesh(&[
        "certs",
        "bundle",
        "--force",
        "--out",
        s(&bundle),
        s(&bundle),
        s(&ca_dir),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(TrustBundle::load(&bundle).unwrap(), joined);
}

#[test]
fn bad_input_exits_64_and_names_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "certs",
                "generate",
                "--cluster",
                "Bad_Name",
                "--out",
                s(&out),
            ],
            "Bad_Name",
        ),
        (
            vec![
                "certs",
                "generate",
                "--cluster",
                "a",
                "--out",
                s(&out),
                "--dns-name",
                "a..b",
            ],
            "a..b",
        ),
        (
            vec![
                "certs",
                "generate",
                "--cluster",
                "a",
                "--out",
                s(&out),
                "--validity",
                "5",
            ],
            "\"5\"",
        ),
        (
            vec![
                "certs",
                "generate",
                "--cluster",
                "a",
                "--out",
                s(&out),
                "--key-type",
                "rsa",
            ],
            "rsa",
        ),
        (vec!["certs", "generate", "--out", s(&out)], "--cluster"),
        (vec!["certs", "bundle", "--out", s(&out)], "CA"),
        (
            vec!["certs", "bundle", "--out", s(&out), "/nonexistent/ca.crt"],
            "/nonexistent/ca.crt",
        ),
    ];
    for (args, needle) in cases {
        let run = clustermesh(&args);
        assert_eq!(run.status.code(), Some(64), "{args:?}: {}", stderr(&run));
        assert!(stderr(&run).contains(needle), "{args:?}: {}", stderr(&run));
    }
    assert!(!out.exists(), "bad input must write nothing");

    // An unreadable (here: half-present) CA is named, and nothing is written.
    let ca_dir = tmp.path().join("ca");
    fs::create_dir(&ca_dir).unwrap();
    fs::write(ca_dir.join("ca.crt"), "garbage").unwrap();
    let run = clustermesh(&[
        "certs",
        "generate",
        "--cluster",
        "a",
        "--out",
        s(&out),
        "--ca-dir",
        s(&ca_dir),
    ]);
    assert_eq!(run.status.code(), Some(64));
    assert!(stderr(&run).contains("ca.key"), "{}", stderr(&run));
    fs::write(ca_dir.join("ca.key"), "garbage").unwrap();
    let run = clustermesh(&[
        "certs",
        "generate",
        "--cluster",
        "a",
        "--out",
        s(&out),
        "--ca-dir",
        s(&ca_dir),
    ]);
    assert_eq!(run.status.code(), Some(64));
    assert!(stderr(&run).contains("ca.crt"), "{}", stderr(&run));
    assert!(!out.exists());

    // A CA that would expire before the certificates is refused, not silently clamped.
    let run = clustermesh(&[
        "certs",
        "generate",
        "--cluster",
        "a",
        "--out",
        s(&out),
        "--ca-validity",
        "10d",
    ]);
    assert_eq!(run.status.code(), Some(64));
    assert!(stderr(&run).contains("after its CA"), "{}", stderr(&run));
}

#[test]
fn help_explains_every_file() {
    let run = clustermesh(&["certs", "generate", "--help"]);
    assert!(run.status.success());
    let help = String::from_utf8_lossy(&run.stdout);
    for needle in [
        "ca.crt",
        "ca.key",
        "tls.crt",
        "tls.key",
        "server/",
        "admin-<cluster>",
        "remote-<cluster>",
        "local-<cluster>",
        "0600",
        "--force",
        "64",
    ] {
        assert!(help.contains(needle), "help lacks {needle}:\n{help}");
    }
    assert!(clustermesh(&["--version"]).status.success());
}
