//! Gives a real etcd cluster the access rules the embedded store enforces itself.
//!
//! The embedded store (`kvstore serve --cluster-name <us>`) maps each client certificate's CN
//! to a role. etcd does the same with its own auth: when auth is enabled and etcd runs with
//! `--client-cert-auth`, the CN of the client certificate is the user name. [`provision`]
//! makes etcd's users and roles say what [`access`](crate::access) says, from the same
//! [`Permission`] lists:
//!
//! | etcd user | etcd role | rights |
//! |---|---|---|
//! | `root` | `root` | everything (etcd refuses to enable auth without it) |
//! | `admin-<us>` | `root` | everything |
//! | `local-<us>` | [`LOCAL_ROLE`] | [`local_permissions`] |
//! | `remote-<peer>` | [`REMOTE_ROLE`] | [`remote_permissions`]`(us)` |
//!
//! Users have no password (etcd 3.4's `--no-password`): they can only authenticate with a
//! client certificate. Provisioning is idempotent and converges: what exists and is right is
//! kept, what is missing is added, and the two mesh roles and the mesh users are brought to
//! exactly the rights above (extra grants on them are revoked). Run it connected with the
//! certificate of `admin-<us>`: before auth is on any certificate may change users and roles,
//! afterwards only a `root` user may, and `admin-<us>` is one.
//!
//! # What etcd 3.4 (3.4.23, checked by `kvstore/tests/access.rs`) does not enforce
//!
//! - **Nested transactions are not checked at all**: a read-only user writes or reads any
//!   key through a txn inside a txn (GHSA-rfx7-8w68-q57q). A `remote-<peer>` can therefore
//!   write into this cluster's store. Use an etcd release with that fix, or the embedded store.
//! - **A from-key watch is checked on its start key only**: a watch from inside an allowed
//!   prefix with range end `"\0"` streams every later key of the store (GHSA-xg4h-6gfc-h4m8).
//! - Leases, compaction and status are not restricted: any authenticated user may grant
//!   leases, keep them alive, read their TTL, list them, revoke one with no keys attached,
//!   compact the store and read its status. The embedded store gives leases and compaction to
//!   the admin only.
//! - etcd knows only provisioned peers, and its `root` user (which etcd requires) is
//!   all-powerful for any certificate with CN `root` from a trusted CA; the embedded store
//!   lets any `remote-<x>` (`x != us`) of a trusted CA read, and knows no `root`.
//!
//! Flat ranges, puts, deletes, top-level txn compares and ops (both branches) and bounded
//! watches are checked the same way by both.

use std::collections::BTreeSet;
use std::fmt;

use certs::{ClusterName, User};
use etcd_client::{PermissionType, RoleRevokePermissionOptions, UserAddOptions};
use tonic::Code;

use super::{Error, StoreClient};
use crate::access::{Permission, local_permissions, remote_permissions};

/// The etcd role of the peers' `remote-<peer>` users.
pub const REMOTE_ROLE: &str = "mesh-remote";
/// The etcd role of the cluster's own `local-<us>` user (its node agents).
pub const LOCAL_ROLE: &str = "mesh-local";
/// etcd's built-in all-powerful role, and the user etcd requires before it enables auth.
pub const ROOT: &str = "root";

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    /// A peer named is the cluster itself: a cluster never reads its own store as a peer, and
    /// the embedded store gives `remote-<us>` no rights.
    #[error("peer {peer} is the cluster itself; a cluster is never its own peer")]
    PeerIsUs {
        /// The offending peer name.
        peer: ClusterName,
    },

    /// The same peer is both to be added and to be removed.
    #[error("peer {peer} is both added and removed")]
    PeerAddedAndRemoved {
        /// The offending peer name.
        peer: ClusterName,
    },

    /// The store does not implement etcd's auth API (the embedded store enforces the rules
    /// itself when started with `--cluster-name`).
    #[error(
        "the store at {endpoints} does not implement the etcd auth API; the embedded store \
         needs no provisioning (start it with --cluster-name instead)"
    )]
    NoAuthApi {
        /// The endpoints the client was configured with.
        endpoints: String,
    },

    /// etcd refused to list or change users or roles: auth is already enabled and the
    /// client certificate's CN is no user with the `root` role (or no user at all).
    #[error(
        "the store at {endpoints} refused to manage users and roles during {step}: auth is \
         enabled and the client certificate's CN is not a root user; connect with the \
         certificate of admin-{us}"
    )]
    NotRoot {
        /// The cluster whose admin certificate is needed.
        us: ClusterName,
        /// What was being done.
        step: String,
        /// The endpoints the client was configured with.
        endpoints: String,
        /// What etcd said.
        #[source]
        source: Box<Error>,
    },

    /// Any other failure of a request to the store.
    #[error("{step} failed")]
    Store {
        /// What was being done.
        step: String,
        /// The client layer's error.
        #[source]
        source: Box<Error>,
    },
}

impl ProvisionError {
    /// Whether the caller asked for something impossible (rather than the store failing).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ProvisionError::PeerIsUs { .. } | ProvisionError::PeerAddedAndRemoved { .. }
        )
    }
}

/// What a [`provision`] or [`remove_peers`] call changed. Empty lists mean everything was
/// already in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProvisionReport {
    /// Roles created.
    pub roles_created: Vec<String>,
    /// Permissions granted, by role.
    pub permissions_granted: Vec<(String, Permission)>,
    /// Permissions revoked from a mesh role because the rules do not grant them.
    pub permissions_revoked: Vec<(String, Permission)>,
    /// Users created (without password).
    pub users_created: Vec<String>,
    /// Roles granted, as `(user, role)`.
    pub roles_granted: Vec<(String, String)>,
    /// Roles revoked from a mesh user because the rules do not give them, as `(user, role)`.
    pub roles_revoked: Vec<(String, String)>,
    /// Users deleted (removed peers).
    pub users_deleted: Vec<String>,
    /// Whether auth was enabled by this call (it may have been on already: etcd 3.4 cannot
    /// say, so this is true whenever the enable request succeeded).
    pub auth_enabled: bool,
}

impl ProvisionReport {
    /// Whether nothing was created, granted, revoked or deleted.
    pub fn is_unchanged(&self) -> bool {
        self.roles_created.is_empty()
            && self.permissions_granted.is_empty()
            && self.permissions_revoked.is_empty()
            && self.users_created.is_empty()
            && self.roles_granted.is_empty()
            && self.roles_revoked.is_empty()
            && self.users_deleted.is_empty()
    }
}

impl fmt::Display for ProvisionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for role in &self.roles_created {
            writeln!(f, "created role {role}")?;
        }
        for (role, perm) in &self.permissions_granted {
            writeln!(f, "granted {} to role {role}", describe(perm))?;
        }
        for (role, perm) in &self.permissions_revoked {
            writeln!(f, "revoked {} from role {role}", describe(perm))?;
        }
        for user in &self.users_created {
            writeln!(
                f,
                "created user {user} (no password: client certificate only)"
            )?;
        }
        for (user, role) in &self.roles_granted {
            writeln!(f, "granted role {role} to user {user}")?;
        }
        for (user, role) in &self.roles_revoked {
            writeln!(f, "revoked role {role} from user {user}")?;
        }
        for user in &self.users_deleted {
            writeln!(f, "deleted user {user}")?;
        }
        if self.is_unchanged() {
            writeln!(f, "users and roles were already in place")?;
        }
        if self.auth_enabled {
            writeln!(f, "auth is enabled")?;
        }
        Ok(())
    }
}

/// `READ [key, end)` in words, with keys escaped.
fn describe(perm: &Permission) -> String {
    let kind = if perm.write { "READWRITE" } else { "READ" };
    let key = escape(&perm.key);
    if perm.range_end.is_empty() {
        format!("{kind} {key}")
    } else {
        format!("{kind} [{key}, {})", escape(&perm.range_end))
    }
}

fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// The users a store of `us` serves, with the one etcd role each must hold.
fn desired_users(us: &ClusterName, peers: &BTreeSet<ClusterName>) -> Vec<(String, &'static str)> {
    let mut users = vec![
        (ROOT.to_owned(), ROOT),
        (User::Admin(us.clone()).cn(), ROOT),
        (User::Local(us.clone()).cn(), LOCAL_ROLE),
    ];
    users.extend(
        peers
            .iter()
            .map(|peer| (User::Remote(peer.clone()).cn(), REMOTE_ROLE)),
    );
    users
}

/// The same permission in etcd's type.
fn to_etcd(perm: &Permission) -> etcd_client::Permission {
    let kind = if perm.write {
        PermissionType::Readwrite
    } else {
        PermissionType::Read
    };
    etcd_client::Permission::new(kind, perm.key.clone()).with_range_end(perm.range_end.clone())
}

/// An etcd permission in the rules' type; `WRITE`-only grants (which the rules never make)
/// count as write.
fn from_etcd(perm: &etcd_client::Permission) -> Permission {
    Permission {
        key: perm.key().to_vec(),
        range_end: perm.range_end().to_vec(),
        write: perm.get_type() != PermissionType::Read as i32,
    }
}

/// Whether an error is etcd saying the thing to create already exists (a concurrent
/// provisioner won the race).
fn already_exists(err: &Error) -> bool {
    err.grpc_code() == Some(Code::FailedPrecondition) && model::error_chain(err).contains("already")
}

/// Runs the auth requests of one provisioning call and sorts their errors.
struct Provisioner<'a> {
    client: &'a StoreClient,
    auth: etcd_client::AuthClient,
    us: &'a ClusterName,
    report: ProvisionReport,
}

impl<'a> Provisioner<'a> {
    fn new(client: &'a StoreClient, us: &'a ClusterName) -> Self {
        Provisioner {
            client,
            auth: client.etcd().auth_client(),
            us,
            report: ProvisionReport::default(),
        }
    }

    /// Sorts the error of a request that names no user: there, "user name not found" means
    /// the caller's own CN is no etcd user.
    fn fail_as_caller(&self, step: String, source: Error) -> ProvisionError {
        if source.grpc_code() == Some(Code::FailedPrecondition)
            && model::error_chain(&source).contains("user name not found")
        {
            return ProvisionError::NotRoot {
                us: self.us.clone(),
                step,
                endpoints: self.client.endpoints().to_owned(),
                source: Box::new(source),
            };
        }
        self.fail(step, source)
    }

    fn fail(&self, step: String, source: Error) -> ProvisionError {
        match source.grpc_code() {
            Some(Code::Unimplemented) => ProvisionError::NoAuthApi {
                endpoints: self.client.endpoints().to_owned(),
            },
            Some(Code::PermissionDenied) => ProvisionError::NotRoot {
                us: self.us.clone(),
                step,
                endpoints: self.client.endpoints().to_owned(),
                source: Box::new(source),
            },
            _ => ProvisionError::Store {
                step,
                source: Box::new(source),
            },
        }
    }

    async fn role_names(&mut self) -> Result<BTreeSet<String>, ProvisionError> {
        let mut auth = self.auth.clone();
        match self
            .client
            .call("role_list", None, None, auth.role_list())
            .await
        {
            Ok(resp) => Ok(resp.roles().iter().cloned().collect()),
            Err(err) => Err(self.fail_as_caller("listing roles".to_owned(), err)),
        }
    }

    async fn user_names(&mut self) -> Result<BTreeSet<String>, ProvisionError> {
        let mut auth = self.auth.clone();
        match self
            .client
            .call("user_list", None, None, auth.user_list())
            .await
        {
            Ok(resp) => Ok(resp.users().iter().cloned().collect()),
            Err(err) => Err(self.fail_as_caller("listing users".to_owned(), err)),
        }
    }

    /// Creates `role` if needed and makes its permissions exactly `want`.
    async fn ensure_role(
        &mut self,
        existing: &BTreeSet<String>,
        role: &str,
        want: &[Permission],
    ) -> Result<(), ProvisionError> {
        let mut auth = self.auth.clone();
        let mut have = Vec::new();
        let mut created = false;
        if !existing.contains(role) {
            match self
                .client
                .call("role_add", None, None, auth.role_add(role))
                .await
            {
                Ok(_) => {
                    created = true;
                    self.report.roles_created.push(role.to_owned());
                }
                Err(err) if already_exists(&err) => {}
                Err(err) => return Err(self.fail(format!("creating role {role}"), err)),
            }
        }
        if !created {
            match self
                .client
                .call("role_get", None, None, auth.role_get(role))
                .await
            {
                Ok(resp) => have = resp.permissions().iter().map(from_etcd).collect(),
                Err(err) => return Err(self.fail(format!("reading role {role}"), err)),
            }
        }
        // etcd keys a role's permissions by their range: granting a range again replaces
        // its type, so grant what is missing or different, then revoke ranges not wanted.
        for perm in want {
            if have.contains(perm) {
                continue;
            }
            if let Err(err) = self
                .client
                .call(
                    "role_grant_permission",
                    None,
                    None,
                    auth.role_grant_permission(role, to_etcd(perm)),
                )
                .await
            {
                return Err(self.fail(format!("granting {} to role {role}", describe(perm)), err));
            }
            self.report
                .permissions_granted
                .push((role.to_owned(), perm.clone()));
        }
        for perm in &have {
            let wanted_range = want
                .iter()
                .any(|w| w.key == perm.key && w.range_end == perm.range_end);
            if wanted_range {
                continue;
            }
            let options = RoleRevokePermissionOptions::new().with_range_end(perm.range_end.clone());
            if let Err(err) = self
                .client
                .call(
                    "role_revoke_permission",
                    None,
                    None,
                    auth.role_revoke_permission(role, perm.key.clone(), Some(options)),
                )
                .await
            {
                return Err(self.fail(format!("revoking {} from role {role}", describe(perm)), err));
            }
            self.report
                .permissions_revoked
                .push((role.to_owned(), perm.clone()));
        }
        Ok(())
    }

    /// Creates `user` (without password) if needed and makes its roles exactly `[role]`.
    async fn ensure_user(
        &mut self,
        existing: &BTreeSet<String>,
        user: &str,
        role: &str,
    ) -> Result<(), ProvisionError> {
        let mut auth = self.auth.clone();
        let mut roles = Vec::new();
        let mut created = false;
        if !existing.contains(user) {
            let options = UserAddOptions::new().with_no_pwd();
            match self
                .client
                .call(
                    "user_add",
                    None,
                    None,
                    auth.user_add(user, "", Some(options)),
                )
                .await
            {
                Ok(_) => {
                    created = true;
                    self.report.users_created.push(user.to_owned());
                }
                Err(err) if already_exists(&err) => {}
                Err(err) => return Err(self.fail(format!("creating user {user}"), err)),
            }
        }
        if !created {
            match self
                .client
                .call("user_get", None, None, auth.user_get(user))
                .await
            {
                Ok(resp) => roles = resp.roles().to_vec(),
                Err(err) => return Err(self.fail(format!("reading user {user}"), err)),
            }
        }
        if !roles.iter().any(|r| r == role) {
            if let Err(err) = self
                .client
                .call(
                    "user_grant_role",
                    None,
                    None,
                    auth.user_grant_role(user, role),
                )
                .await
            {
                return Err(self.fail(format!("granting role {role} to user {user}"), err));
            }
            self.report
                .roles_granted
                .push((user.to_owned(), role.to_owned()));
        }
        for extra in roles.iter().filter(|r| *r != role) {
            if let Err(err) = self
                .client
                .call(
                    "user_revoke_role",
                    None,
                    None,
                    auth.user_revoke_role(user, extra.as_str()),
                )
                .await
            {
                return Err(self.fail(format!("revoking role {extra} from user {user}"), err));
            }
            self.report
                .roles_revoked
                .push((user.to_owned(), extra.clone()));
        }
        Ok(())
    }

    async fn delete_user(
        &mut self,
        existing: &BTreeSet<String>,
        user: &str,
    ) -> Result<(), ProvisionError> {
        if !existing.contains(user) {
            return Ok(());
        }
        let mut auth = self.auth.clone();
        match self
            .client
            .call("user_delete", None, None, auth.user_delete(user))
            .await
        {
            Ok(_) => {
                self.report.users_deleted.push(user.to_owned());
                Ok(())
            }
            // Deleted concurrently: the goal is reached.
            Err(err)
                if err.grpc_code() == Some(Code::FailedPrecondition)
                    && model::error_chain(&err).contains("not found") =>
            {
                Ok(())
            }
            Err(err) => Err(self.fail(format!("deleting user {user}"), err)),
        }
    }

    async fn enable_auth(&mut self) -> Result<(), ProvisionError> {
        let mut auth = self.auth.clone();
        match self
            .client
            .call("auth_enable", None, None, auth.auth_enable())
            .await
        {
            Ok(_) => {
                self.report.auth_enabled = true;
                Ok(())
            }
            Err(err) => Err(self.fail("enabling auth".to_owned(), err)),
        }
    }
}

/// Makes etcd enforce the store rules of cluster `us` for its own users and for `peers`, then
/// enables auth. Idempotent: run it again with more peers to add them; nothing is removed but
/// grants the rules do not make on the mesh's own roles and users. See the module docs.
///
/// The client must present the certificate of `admin-<us>` (or `root`) so it keeps the right
/// to manage users once auth is on.
pub async fn provision(
    client: &StoreClient,
    us: &ClusterName,
    peers: &[ClusterName],
) -> Result<ProvisionReport, ProvisionError> {
    let peers = check_peers(us, peers)?;
    let mut p = Provisioner::new(client, us);
    let roles = p.role_names().await?;
    p.ensure_role(&roles, REMOTE_ROLE, &remote_permissions(us))
        .await?;
    p.ensure_role(&roles, LOCAL_ROLE, &local_permissions())
        .await?;
    let users = p.user_names().await?;
    for (user, role) in desired_users(us, &peers) {
        p.ensure_user(&users, &user, role).await?;
    }
    p.enable_auth().await?;
    tracing::info!(us = %us, peers = peers.len(), "etcd auth provisioned");
    Ok(p.report)
}

/// Deletes the `remote-<peer>` users of `peers`, so they lose every right on the store of
/// `us` (connections they hold are checked on every request, so they lose them at once).
/// Peers that have no user are skipped.
pub async fn remove_peers(
    client: &StoreClient,
    us: &ClusterName,
    peers: &[ClusterName],
) -> Result<ProvisionReport, ProvisionError> {
    let peers = check_peers(us, peers)?;
    let mut p = Provisioner::new(client, us);
    let users = p.user_names().await?;
    for peer in &peers {
        p.delete_user(&users, &User::Remote(peer.clone()).cn())
            .await?;
    }
    Ok(p.report)
}

/// [`remove_peers`] for one peer; says whether its user existed.
pub async fn remove_peer(
    client: &StoreClient,
    us: &ClusterName,
    peer: &ClusterName,
) -> Result<bool, ProvisionError> {
    let report = remove_peers(client, us, std::slice::from_ref(peer)).await?;
    Ok(!report.users_deleted.is_empty())
}

/// Checks that no peer is the cluster itself; drops duplicates.
fn check_peers(
    us: &ClusterName,
    peers: &[ClusterName],
) -> Result<BTreeSet<ClusterName>, ProvisionError> {
    if let Some(peer) = peers.iter().find(|p| *p == us) {
        return Err(ProvisionError::PeerIsUs { peer: peer.clone() });
    }
    Ok(peers.iter().cloned().collect())
}

/// Checks a provisioning request that adds `add` and removes `remove`: no peer is the cluster
/// itself, and none is in both lists.
pub fn check_peer_changes(
    us: &ClusterName,
    add: &[ClusterName],
    remove: &[ClusterName],
) -> Result<(), ProvisionError> {
    check_peers(us, add)?;
    check_peers(us, remove)?;
    if let Some(peer) = add.iter().find(|p| remove.contains(p)) {
        return Err(ProvisionError::PeerAddedAndRemoved { peer: peer.clone() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    #[test]
    fn users_and_roles_follow_the_rules() {
        let peers: BTreeSet<_> = [name("c"), name("b"), name("b")].into_iter().collect();
        let users = desired_users(&name("a"), &peers);
        assert_eq!(
            users,
            vec![
                ("root".to_owned(), ROOT),
                ("admin-a".to_owned(), ROOT),
                ("local-a".to_owned(), LOCAL_ROLE),
                ("remote-b".to_owned(), REMOTE_ROLE),
                ("remote-c".to_owned(), REMOTE_ROLE),
            ]
        );
    }

    #[test]
    fn permissions_map_to_etcd_ranges() {
        for perm in remote_permissions(&name("a"))
            .into_iter()
            .chain(local_permissions())
        {
            let etcd = to_etcd(&perm);
            assert_eq!(etcd.key(), perm.key.as_slice());
            assert_eq!(etcd.range_end(), perm.range_end.as_slice());
            assert_eq!(etcd.get_type(), PermissionType::Read as i32);
            assert_eq!(from_etcd(&etcd), perm);
        }
        let write = Permission {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            write: true,
        };
        assert_eq!(to_etcd(&write).get_type(), PermissionType::Readwrite as i32);
        assert_eq!(from_etcd(&to_etcd(&write)), write);
    }

    #[test]
    fn a_cluster_is_not_its_own_peer() {
        let err = check_peers(&name("a"), &[name("b"), name("a")]).unwrap_err();
        assert!(matches!(err, ProvisionError::PeerIsUs { .. }), "{err}");
        assert!(err.is_usage());
        let err = check_peer_changes(&name("a"), &[name("b")], &[name("b")]).unwrap_err();
        assert!(
            matches!(err, ProvisionError::PeerAddedAndRemoved { .. }),
            "{err}"
        );
        check_peer_changes(&name("a"), &[name("b")], &[name("c")]).unwrap();
    }

    #[test]
    fn report_says_what_changed() {
        let report = ProvisionReport::default();
        assert!(report.is_unchanged());
        assert!(report.to_string().contains("already in place"));
        let report = ProvisionReport {
            roles_created: vec![REMOTE_ROLE.to_owned()],
            permissions_granted: vec![(
                REMOTE_ROLE.to_owned(),
                remote_permissions(&name("a")).remove(0),
            )],
            users_created: vec!["remote-b".to_owned()],
            auth_enabled: true,
            ..ProvisionReport::default()
        };
        let text = report.to_string();
        assert!(text.contains("created role mesh-remote"), "{text}");
        assert!(
            text.contains("granted READ [cilium/state/, cilium/state0) to role mesh-remote"),
            "{text}"
        );
        assert!(text.contains("created user remote-b"), "{text}");
        assert!(text.contains("auth is enabled"), "{text}");
    }
}
