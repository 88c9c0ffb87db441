//! Acting for a team towards the agent service, the one way both callers do it: the proxy (with
//! the admin's own authority) and webhook dispatch (with the orchestrator's). A short-lived team
//! credential is minted, the team's config read with it, and the run's outcome measured alike.

use std::future::Future;
use std::hash::Hash;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use url::Url;

use crate::cache::TtlCache;
use crate::clients::agent::{AgentAnswer, AgentClient, AgentError, AgentRequest};
use crate::clients::config_service::ConfigServiceClient;
use crate::clients::NeighbourError;
use crate::config::Secret;
use crate::domain::AgentName;
use crate::metrics::Metrics;

/// How long an impersonation token without a readable `expires_at` is trusted.
const ASSUMED_TOKEN_LIFETIME: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// A team's short-lived credential and what its config says about its agent.
#[derive(Clone)]
pub struct TeamAgent {
    pub token: Secret,
    pub token_expires: DateTime<Utc>,
    /// The team's effective config, as read with its own credential.
    pub config: Value,
    /// The team's own dedicated agent, when it has one (and the config names exactly it).
    pub dedicated: Option<Url>,
}

#[derive(Debug, thiserror::Error)]
pub enum TeamAgentError {
    #[error("impersonation token: {0}")]
    Impersonation(NeighbourError),
    #[error("team config: {0}")]
    Config(NeighbourError),
}

impl TeamAgentError {
    pub fn neighbour(&self) -> &NeighbourError {
        match self {
            Self::Impersonation(e) | Self::Config(e) => e,
        }
    }
}

impl TeamAgent {
    /// Mints an impersonation token for the team with `credential` (an admin's token: the config
    /// service's scope rules apply to it) and reads the team's config with it.
    pub async fn mint(
        config_service: &ConfigServiceClient,
        credential: &Secret,
        org: &str,
        team: &str,
        namespace: &str,
    ) -> Result<Self, TeamAgentError> {
        let minted = config_service
            .impersonation_token(credential, org, team)
            .await
            .map_err(TeamAgentError::Impersonation)?;
        let config = config_service
            .config_me(&minted.token)
            .await
            .map_err(TeamAgentError::Config)?;
        let dedicated = crate::provisioning::objects::trusted_dedicated_url(
            config.pointer("/agent/dedicated_service_url").and_then(Value::as_str),
            org,
            team,
            namespace,
        );
        Ok(Self {
            token: minted.token,
            token_expires: minted.expires_at.unwrap_or_else(|| Utc::now() + ASSUMED_TOKEN_LIFETIME),
            config,
            dedicated,
        })
    }

    /// The agent a webhook runs: the config's `entrance_agent`, else `planner`.
    pub fn entrance_agent(&self) -> AgentName {
        let configured = self.config.get("entrance_agent").and_then(Value::as_str);
        match configured.map(AgentName::parse) {
            Some(Ok(name)) => name,
            Some(Err(_)) => {
                tracing::warn!("the team's entrance_agent is not a valid agent name; using the default");
                AgentName::planner()
            }
            None => AgentName::planner(),
        }
    }
}

/// A cached impersonation token is renewed this long before it expires.
const TOKEN_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Minted team credentials with their config, each kept for the cache's lifetime while its token
/// has more than a minute left.
#[derive(Clone)]
pub struct TeamAgents<K>(TtlCache<K, TeamAgent>);

impl<K: Hash + Eq + Clone> TeamAgents<K> {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self(TtlCache::new(ttl, capacity))
    }

    /// The cached team under `key`, else what `mint` gives (kept for next time when it succeeds).
    pub async fn get_or_mint<E>(
        &self,
        key: &K,
        mint: impl Future<Output = Result<TeamAgent, E>>,
    ) -> Result<TeamAgent, E> {
        if let Some(team) = self
            .0
            .get_if(key, |team| team.token_expires - TOKEN_MARGIN > Utc::now())
        {
            return Ok(team);
        }
        let team = mint.await?;
        self.0.insert(key.clone(), team.clone());
        Ok(team)
    }

    /// After the agent refused a call: if it refused the credential (revoked before it expired),
    /// the next call mints a new one.
    pub fn forget_if_refused(&self, key: &K, error: &AgentError) {
        if matches!(error, AgentError::Upstream(n) if matches!(n.status(), Some(401 | 403))) {
            self.0.remove(key);
        }
    }
}

/// The outcome label of an agent call in the metrics.
pub fn outcome_label(result: &Result<AgentAnswer, AgentError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => error_label(e),
    }
}

pub fn error_label(e: &AgentError) -> &'static str {
    match e {
        AgentError::Timeout(_) => "timeout",
        AgentError::Failed(_) => "failed",
        AgentError::Upstream(_) => "upstream_error",
    }
}

/// Records one agent run's duration and outcome under its trigger `source`.
pub fn observe(metrics: &Metrics, source: &str, started: Instant, outcome: &str) {
    metrics
        .agent_run_duration_seconds
        .with_label_values(&[source])
        .observe(started.elapsed().as_secs_f64());
    metrics.agent_runs_total.with_label_values(&[source, outcome]).inc();
}

/// Runs the agent to completion and records the run under `source`.
pub async fn run(
    agent: &AgentClient,
    metrics: &Metrics,
    source: &str,
    request: &AgentRequest<'_>,
) -> Result<AgentAnswer, AgentError> {
    let started = Instant::now();
    let result = agent.run(request).await;
    observe(metrics, source, started, outcome_label(&result));
    result
}
