//! Chains checked the way the store and its clients will check them: rustls' webpki verifiers.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustls_pki_types::{CertificateDer, UnixTime};
use time::{Duration, OffsetDateTime};

use crate::*;

fn ca(key_type: KeyType) -> Ca {
    Ca::generate(&CaParams {
        key_type,
        ..CaParams::default()
    })
    .unwrap()
}

fn chain(issued: &Issued) -> Vec<CertificateDer<'static>> {
    vec![issued.cert_der().clone()]
}

fn now() -> UnixTime {
    UnixTime::now()
}

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn cluster(name: &str) -> ClusterName {
    ClusterName::new(name).unwrap()
}

#[test]
fn client_certs_verify_and_name_their_user_for_every_key_type() {
    for key_type in KeyType::ALL {
        let ca = ca(key_type);
        let bundle = ca.trust_bundle();
        for user in User::all(&cluster("eu-west")) {
            let mut params = ClientParams::new(user.clone());
            params.key_type = key_type;
            let cert = ca.issue_client_with(&params).unwrap();
            let got = bundle.verify_client(&chain(&cert), now()).unwrap();
            assert_eq!(got, user, "{key_type}");
        }
    }
}

#[test]
fn cert_from_another_ca_is_refused() {
    let ours = ca(KeyType::EcdsaP256);
    // Same subject name as ours, so only the signature tells them apart.
    let theirs = ca(KeyType::EcdsaP256);
    let cert = theirs.issue_client(&User::admin("a").unwrap()).unwrap();
    let err = ours
        .trust_bundle()
        .verify_client(&chain(&cert), now())
        .unwrap_err();
    assert!(matches!(err, Error::Untrusted(_)), "{err}");
    let server = theirs
        .issue_server(&ServerParams::new(cluster("a")))
        .unwrap();
    assert!(
        ours.trust_bundle()
            .verify_server(&chain(&server), "a.mesh.local", now())
            .is_err()
    );
}

#[test]
fn expired_and_not_yet_valid_certs_are_refused() {
    let ca = ca(KeyType::EcdsaP256);
    let t = OffsetDateTime::now_utc();
    for (from, to) in [
        (t - Duration::days(2), t - Duration::days(1)),
        (t + Duration::days(1), t + Duration::days(2)),
    ] {
        let mut params = ClientParams::new(User::local("a").unwrap());
        params.validity = Validity::new(from, to).unwrap();
        let cert = ca.issue_client_with(&params).unwrap();
        let err = ca
            .trust_bundle()
            .verify_client(&chain(&cert), now())
            .unwrap_err();
        assert!(matches!(err, Error::Untrusted(_)), "{err}");
    }
}

#[test]
fn server_cert_matches_its_sans_and_nothing_else() {
    let ca = ca(KeyType::EcdsaP384);
    let mut params = ServerParams::new(cluster("a"));
    params.dns_names = vec!["Store.Example.com".into(), "*.a.internal".into()];
    params.ips = vec!["10.1.2.3".parse().unwrap(), "fd00::7".parse().unwrap()];
    let cert = ca.issue_server(&params).unwrap();
    let bundle = ca.trust_bundle();
    for name in [
        "a.mesh.local",
        "localhost",
        "127.0.0.1",
        "::1",
        "store.example.com",
        "x.a.internal",
        "10.1.2.3",
        "fd00::7",
    ] {
        bundle
            .verify_server(&chain(&cert), name, now())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for name in ["b.mesh.local", "mesh.local", "10.1.2.4", "y.x.a.internal"] {
        assert!(
            bundle.verify_server(&chain(&cert), name, now()).is_err(),
            "{name} must not match"
        );
    }
}

#[test]
fn roles_are_not_interchangeable() {
    let ca = ca(KeyType::Ed25519);
    let bundle = ca.trust_bundle();
    // A client certificate lacks serverAuth: it cannot pose as a store.
    let client = ca.issue_client(&User::admin("a").unwrap()).unwrap();
    assert!(
        bundle
            .verify_server(&chain(&client), "localhost", now())
            .is_err()
    );
    // A server certificate is a valid TLS client, but names no user, so gets no rights.
    let server = ca.issue_server(&ServerParams::new(cluster("a"))).unwrap();
    let err = bundle.verify_client(&chain(&server), now()).unwrap_err();
    assert!(matches!(err, Error::InvalidUser { .. }), "{err}");
}

#[test]
fn bad_server_names_are_refused_with_the_value() {
    let ca = ca(KeyType::EcdsaP256);
    for bad in ["", "a..b", "-a.b", "a_b.c", "1.2.3.4", "a.b.", "é.com"] {
        let mut params = ServerParams::new(cluster("a"));
        params.dns_names = vec![bad.into()];
        let err = ca.issue_server(&params).unwrap_err();
        assert!(
            matches!(err, Error::InvalidDnsName { ref name, .. } if name == bad),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn leaves_may_not_outlive_the_ca_and_expired_cas_do_not_sign() {
    let t = OffsetDateTime::now_utc();
    let short = Ca::generate(&CaParams {
        validity: Validity::new(t, t + Duration::days(30)).unwrap(),
        ..CaParams::default()
    })
    .unwrap();
    let err = short.issue_client(&User::admin("a").unwrap()).unwrap_err();
    assert!(matches!(err, Error::OutlivesCa { .. }), "{err}");

    let expired = Ca::generate(&CaParams {
        validity: Validity::new(t - Duration::days(10), t - Duration::days(1)).unwrap(),
        ..CaParams::default()
    })
    .unwrap();
    let err = expired
        .issue_client(&User::admin("a").unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::CaExpired { .. }), "{err}");
}

#[test]
fn ca_round_trips_through_disk_and_keys_are_0600() {
    let dir = tempfile::tempdir().unwrap();
    let original = ca(KeyType::Ed25519);
    let written = original.write(dir.path(), WriteMode::CreateNew).unwrap();
    assert_eq!(written.len(), 2);
    assert_eq!(mode_of(&dir.path().join("ca.key")), 0o600);
    assert_eq!(mode_of(&dir.path().join("ca.crt")), 0o644);

    let loaded = Ca::load(dir.path()).unwrap();
    assert_eq!(loaded.cert_der(), original.cert_der());
    assert_eq!(loaded.not_after(), original.not_after());
    let cert = loaded.issue_client(&User::remote("b").unwrap()).unwrap();
    assert_eq!(
        original
            .trust_bundle()
            .verify_client(&chain(&cert), now())
            .unwrap(),
        User::remote("b").unwrap()
    );

    let err = original
        .write(dir.path(), WriteMode::CreateNew)
        .unwrap_err();
    assert!(matches!(err, Error::Exists { .. }), "{err}");
}

#[test]
fn ca_load_names_the_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Ca::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("ca.crt"), "{err}");
    assert!(!Ca::exists_in(dir.path()).unwrap());

    // Key of another CA beside our certificate.
    let a = ca(KeyType::EcdsaP256);
    let b = ca(KeyType::EcdsaP256);
    fs::write(dir.path().join("ca.crt"), a.cert_pem()).unwrap();
    let err = Ca::exists_in(dir.path()).unwrap_err();
    assert!(matches!(err, Error::IncompleteCa { .. }), "{err}");
    fs::write(dir.path().join("ca.key"), b.key_pem()).unwrap();
    let err = Ca::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::File { error, .. } if matches!(**error, Error::KeyMismatch)),
        "{err}"
    );

    // A leaf is no CA, and a garbage key says which file it is.
    let leaf = a.issue_client(&User::admin("a").unwrap()).unwrap();
    fs::write(dir.path().join("ca.crt"), leaf.cert_pem()).unwrap();
    fs::write(dir.path().join("ca.key"), leaf.key_pem()).unwrap();
    let err = Ca::load(dir.path()).unwrap_err();
    assert!(err.report().contains("not a CA"), "{}", err.report());
    fs::write(dir.path().join("ca.key"), "not a key").unwrap();
    let err = Ca::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("ca.key"), "{err}");
}

#[test]
fn bundles_merge_dedupe_and_trust_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let old = ca(KeyType::EcdsaP256);
    let new = ca(KeyType::EcdsaP384);
    let mut both = old.trust_bundle();
    assert_eq!(both.merge(&new.trust_bundle()), 1);
    assert_eq!(both.merge(&old.trust_bundle()), 0);
    assert_eq!(
        TrustBundle::merged([&both, &new.trust_bundle(), &old.trust_bundle()]).len(),
        2
    );

    let path = dir.path().join("bundle.crt");
    both.write(&path, WriteMode::CreateNew).unwrap();
    assert_eq!(mode_of(&path), 0o644);
    let loaded = TrustBundle::load(&path).unwrap();
    assert_eq!(loaded, both);

    // Leaves of either CA verify against the joined bundle: mesh join and CA rotation.
    for ca in [&old, &new] {
        let cert = ca.issue_client(&User::admin("a").unwrap()).unwrap();
        loaded.verify_client(&chain(&cert), now()).unwrap();
    }

    // Concatenating the same CA twice still loads as one.
    let doubled = format!("{}{}", old.cert_pem(), old.cert_pem());
    assert_eq!(TrustBundle::from_pem(doubled.as_bytes()).unwrap().len(), 1);
}

#[test]
fn bundles_refuse_keys_leaves_and_emptiness() {
    let ca = ca(KeyType::EcdsaP256);
    let with_key = format!("{}{}", ca.cert_pem(), ca.key_pem());
    let err = TrustBundle::from_pem(with_key.as_bytes()).unwrap_err();
    assert!(
        matches!(err, Error::UnexpectedPem(ref t) if t == "PRIVATE KEY"),
        "{err}"
    );

    let leaf = ca.issue_client(&User::admin("a").unwrap()).unwrap();
    let err = TrustBundle::from_pem(leaf.cert_pem().as_bytes()).unwrap_err();
    assert!(matches!(err, Error::NotACa { .. }), "{err}");

    assert!(matches!(
        TrustBundle::from_pem(b"").unwrap_err(),
        Error::NoCertificate
    ));
    assert!(matches!(
        TrustBundle::new().verify_client(&chain(&leaf), now()),
        Err(Error::EmptyBundle)
    ));
}

#[test]
fn issued_identity_is_written_like_a_tls_secret_and_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(KeyType::EcdsaP256);
    let cert = ca.issue_client(&User::local("a").unwrap()).unwrap();
    let id_dir = dir.path().join("local-a");
    cert.write(&id_dir, WriteMode::CreateNew).unwrap();
    assert_eq!(mode_of(&id_dir.join("tls.key")), 0o600);
    assert_eq!(mode_of(&id_dir.join("tls.crt")), 0o644);
    assert_eq!(mode_of(&id_dir.join("ca.crt")), 0o644);

    let id = Identity::load(&id_dir).unwrap();
    assert_eq!(id.user().unwrap(), User::local("a").unwrap());
    assert_eq!(
        id.trust().verify_client(id.chain(), now()).unwrap(),
        id.user().unwrap()
    );

    // A key from another issuance beside the certificate is caught at load time.
    let other = ca.issue_client(&User::local("a").unwrap()).unwrap();
    fs::write(id_dir.join("tls.key"), other.key_pem()).unwrap();
    let err = Identity::load(&id_dir).unwrap_err();
    assert!(err.report().contains("does not match"), "{}", err.report());

    // Replacing writes the new pair; refusing leaves the old one.
    assert!(matches!(
        other.write(&id_dir, WriteMode::CreateNew),
        Err(Error::Exists { .. })
    ));
    other.write(&id_dir, WriteMode::Replace).unwrap();
    assert_eq!(mode_of(&id_dir.join("tls.key")), 0o600);
    Identity::load(&id_dir).unwrap();
}

#[test]
fn cluster_layout_is_complete_refuses_overwrite_and_reuses_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mut params = ClusterCertsParams::new(cluster("a"), dir.path());
    params.dns_names = vec!["store.a.example".into()];
    params.ips = vec![IpAddr::from([192, 0, 2, 10])];
    let first = generate_cluster_certs(&params).unwrap();
    assert!(first.ca_created);
    assert_eq!(first.files.len(), 2 + 4 * 3);
    for f in &first.files {
        let expect = if f.ends_with("tls.key") || f.ends_with("ca.key") {
            0o600
        } else {
            0o644
        };
        assert_eq!(mode_of(f), expect, "{}", f.display());
    }

    let ca = Ca::load(&dir.path().join("ca")).unwrap();
    let server = Identity::load(&dir.path().join("server")).unwrap();
    for name in ["a.mesh.local", "store.a.example", "192.0.2.10", "127.0.0.1"] {
        ca.trust_bundle()
            .verify_server(server.chain(), name, now())
            .unwrap();
    }
    for user in User::all(&cluster("a")) {
        let id = Identity::load(&dir.path().join(user.cn())).unwrap();
        assert_eq!(
            ca.trust_bundle().verify_client(id.chain(), now()).unwrap(),
            user
        );
    }

    // Again without Replace: refused before anything changes.
    let before = fs::read(dir.path().join("admin-a/tls.crt")).unwrap();
    let err = generate_cluster_certs(&params).unwrap_err();
    assert!(matches!(err, Error::Exists { .. }), "{err}");
    assert_eq!(
        fs::read(dir.path().join("admin-a/tls.crt")).unwrap(),
        before
    );

    // With Replace: new leaves, same CA.
    params.mode = WriteMode::Replace;
    let second = generate_cluster_certs(&params).unwrap();
    assert!(!second.ca_created);
    assert_eq!(second.files.len(), 4 * 3);
    assert_ne!(
        fs::read(dir.path().join("admin-a/tls.crt")).unwrap(),
        before
    );
    assert_eq!(
        Ca::load(&dir.path().join("ca")).unwrap().cert_der(),
        ca.cert_der()
    );

    // A second cluster shares the CA through ca_dir, in its own output directory.
    let mut b = ClusterCertsParams::new(cluster("b"), dir.path().join("b"));
    b.ca_dir = Some(dir.path().join("ca"));
    b.key_type = KeyType::Ed25519;
    let made = generate_cluster_certs(&b).unwrap();
    assert!(!made.ca_created);
    let id = Identity::load(&dir.path().join("b/remote-b")).unwrap();
    assert_eq!(
        ca.trust_bundle().verify_client(id.chain(), now()).unwrap(),
        User::remote("b").unwrap()
    );
}

#[test]
fn bundle_files_merges_into_one_of_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let a = ca(KeyType::EcdsaP256);
    let b = ca(KeyType::EcdsaP256);
    a.write(&dir.path().join("a"), WriteMode::CreateNew)
        .unwrap();
    b.write(&dir.path().join("b"), WriteMode::CreateNew)
        .unwrap();
    let out = dir.path().join("bundle.crt");
    let inputs = vec![dir.path().join("a"), dir.path().join("b/ca.crt")];
    assert_eq!(
        bundle_files(&inputs, &out, WriteMode::CreateNew).unwrap(),
        2
    );
    assert!(matches!(
        bundle_files(&inputs, &out, WriteMode::CreateNew),
        Err(Error::Exists { .. })
    ));
    let again = vec![out.clone(), dir.path().join("a")];
    assert_eq!(bundle_files(&again, &out, WriteMode::Replace).unwrap(), 2);
}
