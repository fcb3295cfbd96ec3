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

/// An error and every source behind it, joined with `: `, for logs and status fields: the
/// `Display` of a wrapping error alone hides the cause (a "permission denied" behind
/// "rejected lease_grant"). A source whose text the chain already holds is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let next = inner.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = inner.source();
    }
    text
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("rejected lease_grant")]
        Rejected(#[source] std::io::Error),
        #[error("store: {0}")]
        Repeats(#[source] std::io::Error),
    }

    #[test]
    fn the_chain_names_every_cause_once() {
        let denied =
            || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        assert_eq!(
            error_chain(&Outer::Rejected(denied())),
            "rejected lease_grant: permission denied"
        );
        assert_eq!(
            error_chain(&Outer::Repeats(denied())),
            "store: permission denied"
        );
    }
}
