//! Finding our store's binary from a test or bench of another crate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::Error;

/// Our `kvstore` binary: `$KVSTORE_BIN` if set, else `kvstore` built (once per process) into
/// the target dir and profile of the running test or bench.
///
/// Crates other than `kvstore` get no `CARGO_BIN_EXE_kvstore`, and `cargo test -p <crate>`
/// does not build other crates' binaries, so this builds it rather than assume a previous
/// workspace build left one behind. A failed build falls back to a binary already there.
pub fn kvstore_bin() -> Result<PathBuf, Error> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("KVSTORE_BIN") {
            return Ok(bin.into());
        }
        build_kvstore().map_err(|e| e.to_string())
    })
    .clone()
    .map_err(Error::Build)
}

fn build_kvstore() -> Result<PathBuf, Error> {
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
    let bin = profile_dir.join("kvstore");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "--quiet", "-p", "kvstore", "--bin", "kvstore"])
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        command.arg("--release");
    }
    match command.status() {
        Ok(status) if status.success() => Ok(bin),
        other if bin.is_file() => {
            eprintln!(
                "warning: building kvstore failed ({other:?}); using the existing {}",
                bin.display()
            );
            Ok(bin)
        }
        other => Err(Error::Build(format!(
            "cannot build the kvstore binary ({other:?}); set KVSTORE_BIN"
        ))),
    }
}
