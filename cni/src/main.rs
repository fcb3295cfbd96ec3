//! The `clustermesh-cni` binary: what a container runtime executes.

use std::process::ExitCode;

fn main() -> ExitCode {
    match clustermesh_cni::run(
        |name| std::env::var(name).ok(),
        &mut std::io::stdin().lock(),
    ) {
        Ok(output) => {
            if let Some(output) = output {
                println!("{output}");
            }
            ExitCode::SUCCESS
        }
        Err(reply) => {
            println!("{}", reply.to_json());
            ExitCode::FAILURE
        }
    }
}
