//! What every daemon binary of the mesh shares, so each `main.rs` only parses its flags into
//! a configuration and starts its library: logging to stderr (`RUST_LOG`, default `info`),
//! exit code 64 for a command line or configuration that cannot work, a multi-threaded
//! runtime, one cancellation token that SIGTERM or Ctrl-C fires, the [`health`] endpoints
//! and the [`cluster`] flags.

pub mod cluster;
pub mod health;

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// Exit code for a command line or configuration that cannot work (sysexits' EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// Runs a daemon: parses `A` from the command line, turns it into a configuration with
/// `config` (an error there names the flag and exits 64 before anything starts), then runs
/// `serve` until it returns; the token it gets is cancelled on SIGTERM or Ctrl-C.
pub fn main<A, C, Fut>(
    name: &'static str,
    config: impl FnOnce(A) -> anyhow::Result<C>,
    serve: impl FnOnce(C, CancellationToken) -> Fut,
) -> ExitCode
where
    A: clap::Parser,
    Fut: Future<Output = anyhow::Result<()>>,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = match A::try_parse() {
        Ok(args) => args,
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = match config(args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        let signals = cancel.clone();
        tokio::spawn(async move {
            shutdown_signal(name).await;
            tracing::info!("{name} shutting down");
            signals.cancel();
        });
        serve(config, cancel).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its sources as one line; the one implementation lives in [`model`], which
/// libraries that are not daemons use too.
pub use model::error_chain;

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal(name: &str) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops {name}");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
