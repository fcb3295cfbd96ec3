//! Finding a workspace binary (our store, the echo server, …) from a test or bench of
//! another crate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::Error;

/// Our `kvstore` binary: `$KVSTORE_BIN` if set, else built as [`workspace_bin`] does.
pub fn kvstore_bin() -> Result<PathBuf, Error> {
    if let Some(bin) = std::env::var_os("KVSTORE_BIN") {
        return Ok(bin.into());
    }
    workspace_bin("kvstore", "kvstore")
}

/// The binary `bin` of workspace package `package`, built (once per process) into the target
/// dir and profile of the running test or bench.
///
/// Crates other than `package` get no `CARGO_BIN_EXE_<bin>`, and `cargo test -p <crate>`
/// does not build other crates' binaries, so this builds it rather than assume a previous
/// workspace build left one behind. A failed build falls back to a binary already there.
pub fn workspace_bin(package: &str, bin: &str) -> Result<PathBuf, Error> {
    static BUILT: Mutex<Option<HashMap<String, Result<PathBuf, String>>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    built
        .get_or_insert_with(HashMap::new)
        .entry(format!("{package}/{bin}"))
        .or_insert_with(|| build(package, bin).map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::Build)
}

fn build(package: &str, bin_name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        context: "locating the running test binary".to_owned(),
        source,
    })?;
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| Error::Build(format!("{} has no profile dir", exe.display())))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| Error::Build(format!("{} has no target dir", exe.display())))?;
    let bin = profile_dir.join(bin_name);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "--quiet", "-p", package, "--bin", bin_name])
        .arg("--target-dir")
        .arg(target_dir);
    // Not the variables cargo set for this test's own package: build scripts that watch
    // them (ring's watches CARGO_MANIFEST_DIR) would rerun, and everything above them would
    // be rebuilt here and again by the next `cargo test`.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key == "CARGO_MANIFEST_DIR"
            || key == "CARGO_MANIFEST_PATH"
            || key == "CARGO_CRATE_NAME"
            || key == "CARGO_PRIMARY_PACKAGE"
            || key == "CARGO_TARGET_TMPDIR"
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
        {
            command.env_remove(key.as_ref());
        }
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        command.arg("--release");
    }
    match command.status() {
        Ok(status) if status.success() => Ok(bin),
        other if bin.is_file() => {
            eprintln!(
                "warning: building {bin_name} failed ({other:?}); using the existing {}",
                bin.display()
            );
            Ok(bin)
        }
        other => Err(Error::Build(format!(
            "cannot build the {bin_name} binary of {package} ({other:?})"
        ))),
    }
}
