//! `devstack`: runs the four stand-ins as a process, for local development of the orchestrator.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use devstack::{Devstack, Ports, Seed};
use tracing_subscriber::EnvFilter;

/// In-memory config service, AI pipeline, agent service and Kubernetes API for local development.
#[derive(Debug, Parser)]
#[command(name = "devstack", version)]
struct Args {
    /// JSON seed for the config service (orgs, teams, tokens); missing fields keep the defaults.
    #[arg(long)]
    seed: Option<PathBuf>,
    /// Port of the config service stand-in (0 = random).
    #[arg(long, default_value_t = 18081)]
    config_port: u16,
    /// Port of the AI pipeline stand-in (0 = random).
    #[arg(long, default_value_t = 18082)]
    ai_pipeline_port: u16,
    /// Port of the agent service stand-in (0 = random).
    #[arg(long, default_value_t = 18083)]
    agent_port: u16,
    /// Port of the Kubernetes API stand-in (0 = random).
    #[arg(long, default_value_t = 18084)]
    kubernetes_port: u16,
    /// Write CONFIG_SERVICE_URL, AI_PIPELINE_API_URL, AGENT_API_URL, KUBECONFIG and K8S_NAMESPACE
    /// to this env file.
    #[arg(long)]
    write_env: Option<PathBuf>,
    /// Where to write the kubeconfig [default: next to the env file, else target/devstack/kubeconfig].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Default namespace of the kubeconfig context.
    #[arg(long, default_value = "incidentfox")]
    namespace: String,
    /// How long an agent run takes before answering, in milliseconds.
    #[arg(long, default_value_t = 0)]
    agent_delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let args = Args::parse();

    let seed = match &args.seed {
        Some(path) => Seed::from_file(path)?,
        None => Seed::default(),
    };
    let ports = Ports {
        config_service: args.config_port,
        ai_pipeline: args.ai_pipeline_port,
        agent: args.agent_port,
        kubernetes: args.kubernetes_port,
    };
    let stack = Devstack::start_with(seed.clone(), ports).await?;
    stack
        .agent
        .state()
        .set_delay(Duration::from_millis(args.agent_delay_ms));

    let kubeconfig_path = args.kubeconfig.clone().unwrap_or_else(|| {
        args.write_env
            .as_deref()
            .and_then(Path::parent)
            .map(|dir| dir.join("kubeconfig"))
            .unwrap_or_else(|| PathBuf::from("target/devstack/kubeconfig"))
    });
    write_file(&kubeconfig_path, &stack.kubeconfig_json(&args.namespace))?;
    if let Some(env_path) = &args.write_env {
        let kubeconfig_abs = std::path::absolute(&kubeconfig_path).unwrap_or_else(|_| kubeconfig_path.clone());
        let mut env = String::new();
        for (name, value) in stack.env_vars() {
            env.push_str(&format!("{name}={value}\n"));
        }
        env.push_str(&format!("KUBECONFIG={}\n", kubeconfig_abs.display()));
        env.push_str(&format!("K8S_NAMESPACE={}\n", args.namespace));
        write_file(env_path, &env)?;
    }

    let admin_tokens: Vec<&str> = seed.admin_tokens().into_iter().map(|(token, _)| token).collect();
    println!(
        "config service  {}  admin tokens: {}",
        stack.config_service.url(),
        admin_tokens.join(", ")
    );
    println!("ai pipeline     {}", stack.ai_pipeline.url());
    println!(
        "agent service   {}  (delay {} ms)",
        stack.agent.url(),
        args.agent_delay_ms
    );
    println!(
        "kubernetes API  {}  kubeconfig: {}",
        stack.kubernetes.url(),
        kubeconfig_path.display()
    );
    if let Some(env_path) = &args.write_env {
        println!("env file        {}", env_path.display());
    }

    wait_for_signal().await?;
    tracing::info!("shutting down");
    stack.shutdown().await;
    Ok(())
}

fn write_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// Ctrl-C, or SIGTERM when run under a process supervisor or `kill`.
async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
