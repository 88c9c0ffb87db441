//! Client for the config service: admin principals, team config and nodes, team and
//! impersonation tokens, routing lookup, feedback and the platform audit.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use url::Url;

use super::{endpoint, wire, NeighbourError, Transport};
use crate::config::Secret;

const NEIGHBOUR: &str = "config_service";

#[derive(Clone)]
pub struct ConfigServiceClient {
    transport: Transport,
    base: Url,
}

/// The principal behind a token, as `GET /api/v1/auth/me` describes it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Principal {
    pub role: String,
    #[serde(default)]
    pub auth_kind: Option<String>,
    #[serde(default)]
    pub org_id: Option<String>,
    #[serde(default)]
    pub team_node_id: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub can_write: Option<bool>,
    #[serde(default, deserialize_with = "permissions")]
    pub permissions: Vec<String>,
}

/// The contract allows a list or a single string (comma or space separated).
fn permissions<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        One(String),
        None(()),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(list) => list,
        Either::One(s) => s
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
        Either::None(()) => Vec::new(),
    })
}

/// A team token as the config service lists it. Only the id and whether it is revoked decide
/// anything; the times are kept for the record and read leniently ([`wire::timestamp`]).
#[derive(Clone, Debug, Deserialize)]
pub struct TeamTokenInfo {
    pub token_id: String,
    #[serde(default, deserialize_with = "wire::timestamp")]
    pub issued_at: Option<DateTime<Utc>>,
    /// `revoked_at` is set (whatever the format of its time).
    #[serde(default, rename = "revoked_at", deserialize_with = "wire::is_set")]
    pub revoked: bool,
    #[serde(default)]
    pub issued_by: Option<String>,
}

#[derive(Debug)]
pub struct IssuedToken {
    pub token_id: String,
    pub token: Secret,
    pub issued_at: Option<DateTime<Utc>>,
}

#[derive(Debug)]
pub struct ImpersonationToken {
    pub token: Secret,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct RoutingMatch {
    pub found: bool,
    #[serde(default)]
    pub org_id: Option<String>,
    #[serde(default)]
    pub team_node_id: Option<String>,
    #[serde(default)]
    pub matched_by: Option<String>,
    #[serde(default)]
    pub matched_value: Option<String>,
    #[serde(default)]
    pub tried: Vec<String>,
}

impl ConfigServiceClient {
    pub fn new(transport: Transport, base: Url) -> Self {
        Self { transport, base }
    }

    fn url(&self, segments: &[&str]) -> Url {
        endpoint(&self.base, segments)
    }

    fn admin_path(org: &str, rest: &[&str]) -> Vec<String> {
        let mut path: Vec<String> = ["api", "v1", "admin", "orgs", org]
            .iter()
            .map(|s| s.to_string())
            .collect();
        path.extend(rest.iter().map(|s| s.to_string()));
        path
    }

    fn admin_url(&self, org: &str, rest: &[&str]) -> Url {
        let path = Self::admin_path(org, rest);
        let refs: Vec<&str> = path.iter().map(String::as_str).collect();
        self.url(&refs)
    }

    pub async fn auth_me(&self, token: &Secret) -> Result<Principal, NeighbourError> {
        let request = self
            .transport
            .http
            .get(self.url(&["api", "v1", "auth", "me"]))
            .bearer_auth(token.expose());
        self.transport.json(NEIGHBOUR, request).await
    }

    /// Deep-merges `patch` into the node's config.
    pub async fn patch_node_config(
        &self,
        token: &Secret,
        org: &str,
        node: &str,
        patch: &Value,
    ) -> Result<Value, NeighbourError> {
        let request = self
            .transport
            .http
            .put(self.admin_url(org, &["nodes", node, "config"]))
            .bearer_auth(token.expose())
            .json(&json!({ "patch": patch }));
        let body: Value = self.transport.json(NEIGHBOUR, request).await?;
        Ok(body.get("config").cloned().unwrap_or(body))
    }

    /// Creates a team node under its org; "already exists" (400 or 409) counts as success.
    pub async fn create_team_node(&self, token: &Secret, org: &str, node: &str) -> Result<(), NeighbourError> {
        let request = self
            .transport
            .http
            .post(self.admin_url(org, &["nodes"]))
            .bearer_auth(token.expose())
            .json(&json!({"node_id": node, "node_type": "team", "name": node, "parent_id": org}));
        match self.transport.send(NEIGHBOUR, request).await {
            Ok(_) => Ok(()),
            Err(NeighbourError::Status { status: 400 | 409, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn effective_config(&self, token: &Secret, org: &str, node: &str) -> Result<Value, NeighbourError> {
        let request = self
            .transport
            .http
            .get(self.url(&["api", "v1", "config", "orgs", org, "nodes", node, "effective"]))
            .bearer_auth(token.expose());
        let body: Value = self.transport.json(NEIGHBOUR, request).await?;
        Ok(unwrap_effective(body))
    }

    pub async fn list_team_tokens(
        &self,
        token: &Secret,
        org: &str,
        team: &str,
    ) -> Result<Vec<TeamTokenInfo>, NeighbourError> {
        let request = self
            .transport
            .http
            .get(self.admin_url(org, &["teams", team, "tokens"]))
            .bearer_auth(token.expose());
        let body: Value = self.transport.json(NEIGHBOUR, request).await?;
        // Accept a bare list or one wrapped in {"tokens": [...]}.
        let list = match body {
            Value::Object(mut map) => map.remove("tokens").unwrap_or(Value::Array(Vec::new())),
            other => other,
        };
        serde_json::from_value(list).map_err(|e| NeighbourError::Decode {
            neighbour: NEIGHBOUR,
            message: e.to_string(),
        })
    }

    pub async fn issue_team_token(&self, token: &Secret, org: &str, team: &str) -> Result<IssuedToken, NeighbourError> {
        #[derive(Deserialize)]
        struct Issued {
            token: String,
            #[serde(default, deserialize_with = "wire::timestamp")]
            issued_at: Option<DateTime<Utc>>,
        }
        let request = self
            .transport
            .http
            .post(self.admin_url(org, &["teams", team, "tokens"]))
            .bearer_auth(token.expose());
        let issued: Issued = self.transport.json(NEIGHBOUR, request).await?;
        // The token is "<id>.<secret>": the id is what we may record; the whole is the secret.
        let token_id = issued
            .token
            .split_once('.')
            .map(|(id, _)| id.to_string())
            .ok_or(NeighbourError::Decode {
                neighbour: NEIGHBOUR,
                message: "issued token is not of the form <id>.<secret>".into(),
            })?;
        Ok(IssuedToken {
            token_id,
            token: Secret::new(issued.token),
            issued_at: issued.issued_at,
        })
    }

    pub async fn revoke_team_token(
        &self,
        token: &Secret,
        org: &str,
        team: &str,
        token_id: &str,
    ) -> Result<(), NeighbourError> {
        let request = self
            .transport
            .http
            .delete(self.admin_url(org, &["teams", team, "tokens", token_id]))
            .bearer_auth(token.expose());
        match self.transport.send(NEIGHBOUR, request).await {
            Ok(_) | Err(NeighbourError::Status { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn impersonation_token(
        &self,
        token: &Secret,
        org: &str,
        team: &str,
    ) -> Result<ImpersonationToken, NeighbourError> {
        #[derive(Deserialize)]
        struct Minted {
            token: String,
            #[serde(default, deserialize_with = "wire::timestamp")]
            expires_at: Option<DateTime<Utc>>,
        }
        let request = self
            .transport
            .http
            .post(self.admin_url(org, &["teams", team, "impersonation-token"]))
            .bearer_auth(token.expose());
        let minted: Minted = self.transport.json(NEIGHBOUR, request).await?;
        Ok(ImpersonationToken {
            token: Secret::new(minted.token),
            expires_at: minted.expires_at,
        })
    }

    pub async fn routing_lookup(
        &self,
        identifiers: &serde_json::Map<String, Value>,
    ) -> Result<RoutingMatch, NeighbourError> {
        let request = self
            .transport
            .http
            .post(self.url(&["api", "v1", "internal", "routing", "lookup"]))
            .header("X-Internal-Service", "orchestrator")
            .json(&json!({ "identifiers": identifiers }));
        self.transport.json(NEIGHBOUR, request).await
    }

    /// The team's own effective config, read with a team or impersonation token.
    pub async fn config_me(&self, team_token: &Secret) -> Result<Value, NeighbourError> {
        let request = self
            .transport
            .http
            .get(self.url(&["api", "v1", "config", "me"]))
            .bearer_auth(team_token.expose());
        let body: Value = self.transport.json(NEIGHBOUR, request).await?;
        Ok(unwrap_effective(body))
    }

    pub async fn feedback(&self, body: &Value) -> Result<(), NeighbourError> {
        let request = self
            .transport
            .http
            .post(self.url(&["api", "v1", "internal", "feedback"]))
            .header("X-Internal-Service", "orchestrator")
            .json(body);
        self.transport.send(NEIGHBOUR, request).await.map(|_| ())
    }

    pub async fn audit_agent_run_start(&self, token: &Secret, org: &str, body: &Value) -> Result<(), NeighbourError> {
        let request = self
            .transport
            .http
            .post(self.admin_url(org, &["unified-audit", "agent-runs"]))
            .bearer_auth(token.expose())
            .json(body);
        self.transport.send(NEIGHBOUR, request).await.map(|_| ())
    }

    pub async fn audit_agent_run_update(
        &self,
        token: &Secret,
        org: &str,
        run_id: &str,
        body: &Value,
    ) -> Result<(), NeighbourError> {
        let request = self
            .transport
            .http
            .patch(self.admin_url(org, &["unified-audit", "agent-runs", run_id]))
            .bearer_auth(token.expose())
            .json(body);
        self.transport.send(NEIGHBOUR, request).await.map(|_| ())
    }
}

/// The contract allows `{"effective_config": {...}}` or the config object itself.
fn unwrap_effective(body: Value) -> Value {
    match body {
        Value::Object(mut map) if map.contains_key("effective_config") => {
            map.remove("effective_config").unwrap_or_default()
        }
        other => other,
    }
}
