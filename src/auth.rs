//! Admin authentication and authorization.
//!
//! Tokens are verified by the config service (`GET /api/v1/auth/me`); successful admin
//! principals are cached briefly, keyed by a hash of the token so the cache never holds a
//! credential. Org scope is enforced here for every admin endpoint.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::cache::TtlCache;
use crate::clients::config_service::{ConfigServiceClient, Principal};
use crate::clients::NeighbourError;
use crate::config::{AuthConfig, Secret};
use crate::domain::OrgId;
use crate::error::ApiError;
use crate::state::AppState;

/// The capabilities an admin endpoint can require; each maps to a configurable permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    Provision,
    ProvisionRead,
    Deprovision,
    AgentRun,
    WebhooksRead,
    WebhooksReplay,
    AuditRead,
    DeploymentRead,
    PipelineRead,
    PipelineTrigger,
    CronJobsSync,
}

const ADMIN_STAR: &str = "admin:*";

/// A verified admin, with the token it presented (to act with the caller's own authority).
#[derive(Clone, Debug)]
pub struct Admin {
    pub principal: Principal,
    pub token: Secret,
    /// What a cache of something minted with this admin's authority is keyed by.
    pub token_key: TokenKey,
}

impl Admin {
    pub fn subject(&self) -> &str {
        self.principal.subject.as_deref().unwrap_or("unknown")
    }

    pub fn email(&self) -> Option<&str> {
        self.principal.email.as_deref()
    }

    /// The org this admin is confined to; `None` for a platform admin.
    pub fn org_scope(&self) -> Option<&str> {
        self.principal.org_id.as_deref()
    }

    pub fn has(&self, config: &AuthConfig, capability: Capability) -> bool {
        let permissions = &self.principal.permissions;
        if permissions.iter().any(|p| p == ADMIN_STAR) {
            return true;
        }
        if config.require_admin_star {
            return false;
        }
        let needed = required_permission(config, capability);
        permissions.iter().any(|p| p == needed)
    }

    /// 403 unless the admin holds `capability`.
    pub fn require(&self, config: &AuthConfig, capability: Capability) -> Result<(), ApiError> {
        if self.has(config, capability) {
            return Ok(());
        }
        let needed = if config.require_admin_star {
            ADMIN_STAR
        } else {
            required_permission(config, capability)
        };
        Err(ApiError::forbidden(
            "missing_permission",
            format!("this action requires the {needed} permission"),
        )
        .with("required_permission", needed))
    }

    /// 403 unless the admin may act on `org`.
    pub fn require_org(&self, org: &str) -> Result<(), ApiError> {
        match self.org_scope() {
            Some(own) if own != org => Err(ApiError::forbidden(
                "org_forbidden",
                "this admin may act on its own org only",
            )),
            _ => Ok(()),
        }
    }

    /// Both checks at once: the common case for an endpoint that acts on one org.
    pub fn authorize(&self, config: &AuthConfig, capability: Capability, org: &str) -> Result<(), ApiError> {
        self.require(config, capability)?;
        self.require_org(org)
    }

    /// For list endpoints: the org to filter on. An org admin is always confined to its org;
    /// asking for another is 403.
    pub fn scope_filter(&self, requested: Option<OrgId>) -> Result<Option<String>, ApiError> {
        match (self.org_scope(), requested) {
            (Some(own), Some(asked)) if own != asked.as_str() => Err(ApiError::forbidden(
                "org_forbidden",
                "this admin may read its own org only",
            )),
            (Some(own), _) => Ok(Some(own.to_string())),
            (None, asked) => Ok(asked.map(String::from)),
        }
    }
}

fn required_permission(config: &AuthConfig, capability: Capability) -> &str {
    let p = &config.permissions;
    match capability {
        Capability::Provision => &p.provision,
        Capability::ProvisionRead => &p.provision_read,
        Capability::Deprovision => &p.deprovision,
        Capability::AgentRun => &p.agent_run,
        Capability::WebhooksRead => &p.webhooks_read,
        Capability::WebhooksReplay => &p.webhooks_replay,
        Capability::AuditRead => &p.audit_read,
        Capability::DeploymentRead => &p.deployment_read,
        Capability::PipelineRead => &p.pipeline_read,
        Capability::PipelineTrigger => &p.pipeline_trigger,
        Capability::CronJobsSync => &p.cronjobs_sync,
    }
}

/// Verifies admin tokens, with a small bounded cache of successful verifications, keyed by the
/// token's SHA-256.
#[derive(Clone)]
pub struct AdminVerifier {
    client: ConfigServiceClient,
    cache: TtlCache<TokenKey, Principal>,
}

/// SHA-256 of an admin token: what caches key on, so none holds a credential.
pub type TokenKey = [u8; 32];

impl AdminVerifier {
    pub fn new(client: ConfigServiceClient, config: &AuthConfig) -> Self {
        Self {
            client,
            cache: TtlCache::new(config.cache_ttl, config.cache_capacity),
        }
    }

    pub async fn verify(&self, token: Secret) -> Result<Admin, ApiError> {
        let token_key: TokenKey = Sha256::digest(token.expose().as_bytes()).into();
        if let Some(principal) = self.cache.get(&token_key) {
            return Ok(Admin {
                principal,
                token,
                token_key,
            });
        }
        let principal = match self.client.auth_me(&token).await {
            Ok(principal) => principal,
            Err(NeighbourError::Status { status: 401 | 403, .. }) => {
                return Err(ApiError::unauthorized(
                    "invalid_token",
                    "the admin token is invalid or expired",
                ))
            }
            Err(e) if e.is_transient() || matches!(e, NeighbourError::Status { .. }) => {
                tracing::warn!(error = %e, "config service cannot verify an admin token");
                return Err(ApiError::unavailable(
                    "config_service_unavailable",
                    "the config service cannot verify the token right now; retry later",
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "config service answered auth/me with something unreadable");
                return Err(ApiError::unavailable(
                    "config_service_unavailable",
                    "the config service answered unexpectedly",
                ));
            }
        };
        if principal.role != "admin" {
            return Err(ApiError::forbidden(
                "not_admin",
                "this token does not belong to an admin",
            ));
        }
        self.cache.insert(token_key, principal.clone());
        Ok(Admin {
            principal,
            token,
            token_key,
        })
    }
}

/// The credential a request presents: `Authorization: Bearer <token>` (the scheme in any case),
/// else the named header (`X-Admin-Token`, `X-Internal-Token`, ...). The one parser of tokens.
pub fn presented_token(headers: &HeaderMap, other_header: &str) -> Option<Secret> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    bearer
        .or_else(|| headers.get(other_header).and_then(|v| v.to_str().ok()).map(str::trim))
        .filter(|t| !t.is_empty())
        .map(Secret::new)
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = presented_token(&parts.headers, "x-admin-token").ok_or_else(|| {
            ApiError::unauthorized(
                "missing_token",
                "an admin token is required (Authorization: Bearer or X-Admin-Token)",
            )
        })?;
        state.admin_verifier.verify(token).await
    }
}
