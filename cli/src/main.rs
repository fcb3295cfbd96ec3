//! `clustermesh`: the operator's command. Parsing and messages live here; the work is done
//! by the library crates, so this file stays thin.

mod agent_cmd;
mod certs_cmd;
mod dev_cmd;
mod mesh_cmd;
mod store_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for bad usage or configuration (sysexits' EX_USAGE), so scripts can tell a
/// mistake in what they asked for from a failure while doing it (status 1).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "clustermesh",
    version,
    about = "Connect clusters into a mesh: certificates, stores, peers.",
    after_help = "Exit status: 0 on success, 64 for usage or configuration errors \
                  (bad names, unreadable inputs, files that already exist), 1 otherwise."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make and bundle the mesh's certificates.
    #[command(subcommand)]
    Certs(certs_cmd::CertsCommand),
    /// Operate on a cluster's store.
    #[command(subcommand)]
    Store(store_cmd::StoreCommand),
    /// Show a node agent's desired-state tables (from its local API).
    #[command(subcommand)]
    Agent(agent_cmd::AgentCommand),
    /// Make a cluster's certificates and trust bundle, ready for `connect`.
    Enable(mesh_cmd::EnableArgs),
    /// Let clusters read each other: exchange endpoints, CAs and client identities.
    Connect(mesh_cmd::ConnectArgs),
    /// Undo `connect` (also when the other side is dead).
    Disconnect(mesh_cmd::ConnectArgs),
    /// Show every cluster's daemons, peers and nodes, with causes and hints.
    Status(mesh_cmd::StatusArgs),
    /// Check certificates, peer stores, id conflicts and clock skew; say what to fix.
    Troubleshoot(mesh_cmd::TroubleshootArgs),
    /// Local clusters without Kubernetes (root): up, apply, exec, down.
    #[command(subcommand)]
    Dev(dev_cmd::DevCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors; print them and succeed.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Certs(cmd) => certs_cmd::run(cmd),
        Command::Store(cmd) => store_cmd::run(cmd),
        Command::Agent(cmd) => agent_cmd::run(cmd),
        Command::Enable(args) => mesh_cmd::enable(args),
        Command::Connect(args) => mesh_cmd::connect(args),
        Command::Disconnect(args) => mesh_cmd::disconnect(args),
        Command::Status(args) => mesh_cmd::status(args),
        Command::Troubleshoot(args) => mesh_cmd::troubleshoot(args),
        Command::Dev(cmd) => match dev_cmd::run(cmd) {
            Ok(code) => return code,
            Err(err) => Err(err),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("clustermesh: error: {err:#}");
            let usage = err
                .downcast_ref::<certs::Error>()
                .is_some_and(certs::Error::is_usage)
                || store_cmd::is_usage(&err)
                || mesh_cmd::is_usage(&err);
            ExitCode::from(if usage { EXIT_USAGE } else { 1 })
        }
    }
}
