//! Client for the AI pipeline: a team's first ingestion, and an on-demand run.

use serde_json::{json, Value};
use url::Url;

use super::{endpoint, NeighbourError, Transport};
use crate::config::Secret;

const NEIGHBOUR: &str = "ai_pipeline";

#[derive(Clone)]
pub struct AiPipelineClient {
    transport: Transport,
    base: Url,
}

impl AiPipelineClient {
    pub fn new(transport: Transport, base: Url) -> Self {
        Self { transport, base }
    }

    /// Starts the first ingestion. `idempotency_key` is derived from the run and step, so a
    /// retried step is recognised as the same request.
    pub async fn bootstrap(&self, token: &Secret, team: &str, idempotency_key: &str) -> Result<Value, NeighbourError> {
        let request = self
            .transport
            .http
            .post(endpoint(&self.base, &["api", "v1", "teams", team, "bootstrap"]))
            .bearer_auth(token.expose())
            .header("Idempotency-Key", idempotency_key);
        let response = self.transport.send(NEIGHBOUR, request).await?;
        let bytes = super::read_limited(NEIGHBOUR, response).await.unwrap_or_default();
        Ok(serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({})))
    }

    /// Starts an on-demand pipeline run (`{org_id, team_id}`); the answer names its job or run.
    pub async fn run(&self, token: &Secret, org: &str, team: &str) -> Result<Value, NeighbourError> {
        let request = self
            .transport
            .http
            .post(endpoint(&self.base, &["api", "v1", "teams", team, "run"]))
            .bearer_auth(token.expose())
            .json(&json!({"org_id": org, "team_id": team}));
        self.transport.json(NEIGHBOUR, request).await
    }
}
