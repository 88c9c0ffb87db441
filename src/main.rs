#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = orchestrator::cli::Cli::parse();
    match orchestrator::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orchestrator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
