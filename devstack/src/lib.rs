//! In-memory stand-ins for the orchestrator's neighbours: the config service, the AI pipeline,
//! the agent service and the Kubernetes API server.
//!
//! Each stand-in is a real HTTP server on 127.0.0.1, so the orchestrator talks to it exactly as
//! it would talk to the real service. Integration tests start them in-process on random ports
//! ([`Devstack::start`]); the `devstack` binary runs them as a process for local development.
//!
//! Every stand-in records the requests it receives ([`StandIn::calls`]) and can be told to fail,
//! drop or delay requests ([`StandIn::faults`]), in Rust or over HTTP:
//!
//! * `GET /__devstack/calls` (JSON array), `DELETE /__devstack/calls`
//! * `POST /__devstack/faults` `{"fail_next": n, "status": 503, "drop_next": n, "latency_ms": n,
//!   "method": "POST", "path_contains": "..."}` (all optional)
//! * `POST /__devstack/reset` (faults and calls)
//!
//! plus stand-in specific ones: `GET /__devstack/state` (config service, AI pipeline) and
//! `GET|POST /__devstack/agent` (agent delay, error mode, investigate token).

#![forbid(unsafe_code)]

mod agent;
mod ai_pipeline;
mod config_service;
mod json;
mod kubernetes;
mod seed;
mod server;

pub use agent::Agent;
pub use ai_pipeline::{AiPipeline, Bootstrap, PipelineRun};
pub use config_service::{ConfigService, TeamTokenRecord};
pub use kubernetes::Kubernetes;
pub use seed::{Seed, SeedOrg, SeedTeam};
pub use server::{Faults, RecordedCall, StandIn};

use serde_json::json;

/// Ports to listen on; 0 picks a free port. The default is all 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ports {
    pub config_service: u16,
    pub ai_pipeline: u16,
    pub agent: u16,
    pub kubernetes: u16,
}

/// The four stand-ins, running.
#[derive(Clone, Debug)]
pub struct Devstack {
    pub config_service: StandIn<ConfigService>,
    pub ai_pipeline: StandIn<AiPipeline>,
    pub agent: StandIn<Agent>,
    pub kubernetes: StandIn<Kubernetes>,
}

impl Devstack {
    /// All stand-ins on random ports, seeded with [`Seed::default`].
    pub async fn start() -> anyhow::Result<Devstack> {
        Devstack::start_with(Seed::default(), Ports::default()).await
    }

    pub async fn start_with(seed: Seed, ports: Ports) -> anyhow::Result<Devstack> {
        let config = ConfigService::from_seed(&seed);
        let config_service = server::spawn(
            "config-service",
            ports.config_service,
            config.clone(),
            config_service::router(config),
            server::detail_fault_body,
        )
        .await?;

        let pipeline = AiPipeline::default();
        let ai_pipeline = server::spawn(
            "ai-pipeline",
            ports.ai_pipeline,
            pipeline.clone(),
            ai_pipeline::router(pipeline),
            server::detail_fault_body,
        )
        .await?;

        let agent_state = Agent::default();
        let agent = server::spawn(
            "agent",
            ports.agent,
            agent_state.clone(),
            agent::router(agent_state),
            server::detail_fault_body,
        )
        .await?;

        let kube = Kubernetes::default();
        let kubernetes = server::spawn(
            "kubernetes",
            ports.kubernetes,
            kube.clone(),
            kubernetes::router(kube),
            kubernetes::fault_body,
        )
        .await?;

        Ok(Devstack {
            config_service,
            ai_pipeline,
            agent,
            kubernetes,
        })
    }

    /// A kubeconfig (JSON, hence also valid YAML) whose current context points at the Kubernetes
    /// stand-in over plain HTTP, with `namespace` as the default namespace and no credentials.
    pub fn kubeconfig_json(&self, namespace: &str) -> String {
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "devstack",
                "cluster": { "server": self.kubernetes.url() },
            }],
            "users": [{ "name": "devstack", "user": {} }],
            "contexts": [{
                "name": "devstack",
                "context": { "cluster": "devstack", "user": "devstack", "namespace": namespace },
            }],
            "current-context": "devstack",
            "preferences": {},
        });
        // Serializing a `Value` cannot fail; pretty-printed so that a human can read the file.
        serde_json::to_string_pretty(&kubeconfig).unwrap_or_else(|_| kubeconfig.to_string())
    }

    /// The environment the orchestrator reads to find its neighbours (`KUBECONFIG` excluded: it
    /// is a file path, see [`Devstack::kubeconfig_json`]).
    pub fn env_vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CONFIG_SERVICE_URL", self.config_service.url()),
            ("AI_PIPELINE_API_URL", self.ai_pipeline.url()),
            ("AGENT_API_URL", self.agent.url()),
        ]
    }

    /// Stop all four servers.
    pub async fn shutdown(self) {
        self.config_service.shutdown().await;
        self.ai_pipeline.shutdown().await;
        self.agent.shutdown().await;
        self.kubernetes.shutdown().await;
    }
}
