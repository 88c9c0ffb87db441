//! Command-line entry points; `main` only dispatches here.

use clap::{Parser, Subcommand};

use crate::app::{self, Application};
use crate::config::Config;
use crate::{db, telemetry};

#[derive(Parser, Debug)]
#[command(
    name = "orchestrator",
    version,
    about = "Control plane of a multi-tenant AI SRE platform"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the HTTP API and run the background workers (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Validate the environment and print the effective configuration, secrets redacted.
    CheckConfig,
    /// Call the local /health endpoint; exit 0 when healthy (for container health checks).
    Healthcheck,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve().await,
        Command::Migrate => migrate().await,
        Command::CheckConfig => check_config(),
        Command::Healthcheck => healthcheck().await,
    }
}

fn load_config() -> anyhow::Result<Config> {
    Config::from_env().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
}

async fn serve() -> anyhow::Result<()> {
    let config = load_config()?;
    telemetry::init(&config.log_level, config.log_format);
    let app = Application::build(config).await?;
    tracing::info!(addr = %app.local_addr(), version = env!("CARGO_PKG_VERSION"), "serving");
    app.run_until(app::shutdown_signal()).await
}

async fn migrate() -> anyhow::Result<()> {
    let config = load_config()?;
    telemetry::init(&config.log_level, config.log_format);
    app::install_crypto_provider();
    let pool = db::request_pool(&config.database)?;
    db::migrate(&pool).await?;
    tracing::info!(version = db::latest_migration(), "migrations applied");
    Ok(())
}

fn check_config() -> anyhow::Result<()> {
    let config = load_config()?;
    println!("{}", serde_json::to_string_pretty(&config.redacted_json())?);
    Ok(())
}

/// Needs only the listen address, so it works even when the rest of the environment is absent.
async fn healthcheck() -> anyhow::Result<()> {
    let addr = std::env::var("ORCHESTRATOR_LISTEN_ADDR").unwrap_or_else(|_| "0.0.0.0:8080".into());
    let port = addr.rsplit(':').next().unwrap_or("8080");
    let url = format!("http://127.0.0.1:{port}/health");
    let response = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?
        .get(&url)
        .send()
        .await?;
    if response.status().is_success() {
        println!("healthy");
        Ok(())
    } else {
        anyhow::bail!("unhealthy: {} answered {}", url, response.status())
    }
}
