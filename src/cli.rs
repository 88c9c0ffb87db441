//! Command-line entry points; `main` only dispatches here.

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::startup::{self as app, Application};
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
    /// Webhook helpers for operators.
    Webhook {
        #[command(subcommand)]
        command: WebhookCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum WebhookCommand {
    /// Print the headers and a ready `curl` line for a correctly signed test delivery.
    Sign {
        /// slack, github, pagerduty or incidentio.
        #[arg(long)]
        source: String,
        /// The signing secret; defaults to the source's variable (SLACK_SIGNING_SECRET, ...),
        /// which keeps it out of the shell history and the process list.
        #[arg(long)]
        secret: Option<String>,
        /// File with the exact body to send.
        #[arg(long)]
        body: std::path::PathBuf,
        /// Base URL of the orchestrator.
        #[arg(long, default_value = "http://127.0.0.1:8070")]
        url: String,
        /// Delivery id (GitHub, PagerDuty, Incident.io); a random one by default.
        #[arg(long)]
        delivery_id: Option<String>,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve().await,
        Command::Migrate => migrate().await,
        Command::CheckConfig => check_config(),
        Command::Healthcheck => healthcheck().await,
        Command::Webhook {
            command:
                WebhookCommand::Sign {
                    source,
                    secret,
                    body,
                    url,
                    delivery_id,
                },
        } => sign_webhook(&source, secret, &body, &url, delivery_id),
    }
}

fn load_config() -> anyhow::Result<Config> {
    Config::from_env().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
}

async fn serve() -> anyhow::Result<()> {
    let config = load_config()?;
    telemetry::init(&config.log_level, config.log_format);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
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
    let addr = std::env::var("ORCHESTRATOR_LISTEN_ADDR").unwrap_or_else(|_| "0.0.0.0:8070".into());
    let port = addr.rsplit(':').next().unwrap_or("8070");
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

fn sign_webhook(
    source: &str,
    secret: Option<String>,
    body_path: &std::path::Path,
    url: &str,
    delivery_id: Option<String>,
) -> anyhow::Result<()> {
    use crate::config::{Secret, SecretList};
    use crate::webhooks::signature::{self, Source};

    let source = Source::parse(source)
        .ok_or_else(|| anyhow::anyhow!("unknown source {source:?}: use slack, github, pagerduty or incidentio"))?;
    let variable = match source {
        Source::Slack => "SLACK_SIGNING_SECRET",
        Source::GitHub => "GITHUB_WEBHOOK_SECRET",
        Source::PagerDuty => "PAGERDUTY_WEBHOOK_SECRET",
        Source::IncidentIo => "INCIDENTIO_WEBHOOK_SECRET",
    };
    let secret = secret
        .or_else(|| {
            std::env::var(variable)
                .ok()
                .and_then(|v| v.split(',').next().map(|s| s.trim().to_string()))
        })
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow::anyhow!("no secret: pass --secret or set {variable}"))?;
    let body = std::fs::read(body_path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", body_path.display()))?;
    let delivery_id = delivery_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let secrets = SecretList::new(vec![Secret::new(secret)]);
    let headers = signature::signed_headers(source, &secrets, &body, chrono::Utc::now().timestamp(), &delivery_id)
        .map_err(|r| anyhow::anyhow!("cannot sign: {}", r.message()))?;
    let path = match source {
        Source::Slack => "/webhooks/slack/events",
        Source::GitHub => "/webhooks/github",
        Source::PagerDuty => "/webhooks/pagerduty",
        Source::IncidentIo => "/webhooks/incidentio",
    };
    let mut curl = format!(
        "curl -sS -X POST '{}{path}' -H 'Content-Type: application/json'",
        url.trim_end_matches('/')
    );
    for (name, value) in &headers {
        println!("{name}: {value}");
        curl.push_str(&format!(" -H '{name}: {value}'"));
    }
    if source == Source::GitHub {
        println!("x-github-event: <set the event type, e.g. pull_request>");
        curl.push_str(" -H 'X-GitHub-Event: pull_request'");
    }
    curl.push_str(&format!(" --data-binary @'{}'", body_path.display()));
    println!();
    println!("{curl}");
    if matches!(source, Source::Slack | Source::IncidentIo) {
        println!("# the signature includes the current time: send it within the replay window (5 minutes)");
    }
    Ok(())
}
