//! The one validated configuration of the service, read from the environment.
//!
//! Every variable is documented in `.env.example`. Loading never mutates the process environment;
//! it reads through a lookup function so tests can feed a plain map.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use serde::Serialize;
use url::Url;

use crate::domain::DriftPolicy;

/// A value that must never reach a log, an error or a response.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// Several secrets accepted at once, so a webhook secret can be rotated without downtime.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretList(Vec<Secret>);

impl SecretList {
    pub fn new(values: Vec<Secret>) -> Self {
        Self(values)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Secret> {
        self.0.iter()
    }
}

impl fmt::Debug for SecretList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} redacted]", self.0.len())
    }
}

impl Serialize for SecretList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("[{} redacted]", self.0.len()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Which of the agent service's two wire dialects to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentDialect {
    /// `POST /agents/{name}/run`, JSON in and out.
    Run,
    /// `POST /investigate`, answered with server-sent events.
    Investigate,
}

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub request_timeout: Duration,
    pub body_limit_bytes: usize,
    pub shutdown_grace: Duration,
    pub log_level: String,
    pub log_format: LogFormat,

    pub database: DatabaseConfig,
    pub neighbours: NeighbourConfig,
    pub kubernetes: KubernetesConfig,
    pub auth: AuthConfig,
    pub provisioning: ProvisioningConfig,
    pub reconcile: ReconcileConfig,
    pub webhooks: WebhookConfig,
    pub agent_runs: AgentRunConfig,

    pub internal_admin_token: Option<Secret>,
    pub internal_token: Option<Secret>,
    /// AES-256-GCM key that seals one-time team tokens at rest until they are handed out.
    pub secrets_key: Option<SecretKey>,
    /// The Slack bot token for answers of teams whose config has none (`SLACK_BOT_TOKEN`, as the
    /// existing service reads it).
    pub slack_bot_token: Option<Secret>,
    /// Things about the environment worth a warning at start-up (never a secret).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Variables the existing service read for features this one does not have: set, they are
/// reported at start-up rather than silently ignored.
const UNSUPPORTED_VARIABLES: &[(&str, &str)] = &[
    ("TELEMETRY_COLLECTOR_URL", "license quota checks are not implemented"),
    ("CORRELATION_SERVICE_URL", "alert correlation is not implemented"),
    ("CIRCLEBACK_SIGNING_SECRET", "Circleback webhooks are not accepted"),
    (
        "ORCHESTRATOR_DISABLE_ADVISORY_LOCKS",
        "the per-team lock is what keeps two replicas off one team; it cannot be disabled",
    ),
];

#[derive(Clone, Serialize)]
pub struct SecretKey(#[serde(skip)] pub [u8; 32]);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct DatabaseConfig {
    /// The connection URL with any password replaced, safe to print.
    pub display_url: String,
    #[serde(skip)]
    pub url: Secret,
    pub pool_size: u32,
    pub acquire_timeout: Duration,
    /// Connections reserved for advisory locks, outside the request pool's budget.
    pub lock_pool_size: u32,
    pub auto_migrate: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct NeighbourConfig {
    pub config_service_url: Url,
    pub agent_api_url: Url,
    pub ai_pipeline_api_url: Url,
    pub timeout: Duration,
    pub agent_dialect: AgentDialect,
    pub investigate_auth_token: Option<Secret>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KubernetesConfig {
    pub namespace: String,
    pub ai_pipeline_image: String,
    pub ai_pipeline_service_account: String,
    pub dependency_service_image: String,
    pub dependency_service_account: String,
    pub agent_image: String,
    pub agent_service_account: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuthConfig {
    pub cache_ttl: Duration,
    pub cache_capacity: usize,
    pub require_admin_star: bool,
    pub permissions: RequiredPermissions,
}

/// The permission each admin capability needs when `admin:*` is not required.
#[derive(Clone, Debug, Serialize)]
pub struct RequiredPermissions {
    pub provision: String,
    pub provision_read: String,
    pub deprovision: String,
    pub agent_run: String,
    pub webhooks_read: String,
    pub webhooks_replay: String,
    pub audit_read: String,
    pub deployment_read: String,
    pub pipeline_read: String,
    pub pipeline_trigger: String,
    pub cronjobs_sync: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProvisioningConfig {
    pub lock_timeout: Duration,
    pub wait: Duration,
    pub step_max_attempts: u32,
    pub step_max_elapsed: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub resume_interval: Duration,
    /// A run stops as `timed_out` at its first step boundary past this.
    pub run_deadline: Duration,
}

/// The reconciler that keeps every team's Kubernetes objects as they should be.
#[derive(Clone, Debug, Serialize)]
pub struct ReconcileConfig {
    pub enabled: bool,
    /// A full resync (one list per kind) at least this often: the bound on finding drift when
    /// watches are refused or failing.
    pub interval: Duration,
    /// For teams without a policy of their own, and for objects of unknown teams.
    pub default_policy: DriftPolicy,
}

#[derive(Clone, Debug, Serialize)]
pub struct SourceConfig {
    pub secrets: SecretList,
    pub body_limit_bytes: usize,
    pub rate_limit_per_minute: u32,
    pub rate_limit_burst: u32,
    pub agent_timeout: Duration,
    pub agent_max_turns: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct WebhookConfig {
    pub slack: SourceConfig,
    pub github: SourceConfig,
    pub pagerduty: SourceConfig,
    pub incidentio: SourceConfig,
    pub replay_window: Duration,
    /// A delivery not stored within this answers 503 (the sender retries; a retry of one stored
    /// after all is a duplicate): senders give up after 3 s (Slack) or 5 s (PagerDuty).
    pub store_timeout: Duration,
    /// Deliveries being received at once, across sources: bodies are buffered before they can be
    /// verified, so this bounds the memory unauthenticated senders can hold.
    pub max_in_flight: usize,
    pub dispatch_workers: usize,
    /// How much lower than request handling the dispatch threads run (a nice increment, 0 to 19).
    pub dispatch_nice: u32,
    pub dispatch_max_attempts: u32,
    pub dispatch_max_age: Duration,
    pub dispatch_lease: Duration,
    pub dispatch_poll_interval: Duration,
    /// Claim each sender's events in turn ([`crate::webhooks::fairness`]); off, oldest first.
    pub dispatch_fair_shares: bool,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub retention_days: u32,
    pub dedupe_days: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentRunConfig {
    pub max_timeout: Duration,
    pub default_timeout: Duration,
    pub max_turns: u32,
    pub default_max_turns: u32,
}

/// Why the environment was refused; always names the variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{var} is required: {hint}")]
    Missing { var: String, hint: &'static str },
    #[error("{var} is invalid: {reason}")]
    Invalid { var: String, reason: String },
}

fn invalid(var: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var: var.into(),
        reason: reason.into(),
    }
}

/// Reads variables through a lookup so tests never touch the process environment.
struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    /// What an operator should know about the environment that is not an error.
    warnings: std::cell::RefCell<Vec<String>>,
}

impl Env<'_> {
    /// The variable to read among names for one setting, the first one set winning: the
    /// existing deployment's name comes first, so its configuration keeps working unchanged. A
    /// second name set to another value is a warning, never a silent choice.
    fn pick(&self, names: &[&str]) -> String {
        let set: Vec<(&str, String)> = names
            .iter()
            .filter_map(|name| self.raw(name).map(|value| (*name, value)))
            .collect();
        let Some((winner, value)) = set.first() else {
            return names[0].to_string();
        };
        for (other, other_value) in &set[1..] {
            if other_value != value {
                self.warnings.borrow_mut().push(format!(
                    "{winner} and {other} are both set and differ; {winner} is used"
                ));
            }
        }
        winner.to_string()
    }

    fn raw(&self, var: &str) -> Option<String> {
        (self.lookup)(var)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.raw(var).unwrap_or_else(|| default.to_string())
    }

    fn parse<T: FromStr>(&self, var: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|e: T::Err| invalid(var, format!("cannot parse {v:?}: {e}"))),
        }
    }

    fn bounded_u64(&self, var: &str, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
        let value = self.parse(var, default)?;
        if !(min..=max).contains(&value) {
            return Err(invalid(var, format!("must be between {min} and {max}, got {value}")));
        }
        Ok(value)
    }

    fn seconds(&self, var: &str, default: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
        self.bounded_u64(var, default, min, max).map(Duration::from_secs)
    }

    fn millis(&self, var: &str, default: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
        self.bounded_u64(var, default, min, max).map(Duration::from_millis)
    }

    fn count(&self, var: &str, default: u64, min: u64, max: u64) -> Result<u32, ConfigError> {
        // max is always well inside u32 at the call sites.
        self.bounded_u64(var, default, min, max).map(|v| v as u32)
    }

    fn bool(&self, var: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(var).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(invalid(var, format!("expected true/false or 1/0, got {v:?}"))),
            },
        }
    }

    fn secret(&self, var: &str) -> Option<Secret> {
        self.raw(var).map(Secret::new)
    }

    fn secret_list(&self, var: &str) -> SecretList {
        SecretList::new(
            self.raw(var)
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .collect(),
        )
    }

    fn url(&self, var: &str) -> Result<Url, ConfigError> {
        let raw = self.raw(var).ok_or_else(|| ConfigError::Missing {
            var: var.to_string(),
            hint: "set it to the neighbour's base URL, e.g. http://config-service:8080",
        })?;
        let url = Url::parse(&raw).map_err(|e| invalid(var, format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(var, "must be an http(s) URL with a host"));
        }
        Ok(url)
    }
}

const MIB: u64 = 1024 * 1024;

impl Config {
    /// Loads from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_lookup(&|k| vars.get(k).cloned())
    }

    /// Loads from a map; the test-friendly entry point.
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_lookup(&|k| vars.get(k).cloned())
    }

    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env {
            lookup,
            warnings: Default::default(),
        };

        // 8070: the port the existing service listens on, so Services and probes keep working.
        let listen_addr = env.parse("ORCHESTRATOR_LISTEN_ADDR", SocketAddr::from(([0, 0, 0, 0], 8070)))?;
        let log_format = match env.string("LOG_FORMAT", "text").to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("LOG_FORMAT", format!("expected text or json, got {other:?}"))),
        };

        let database = database_config(&env)?;
        let neighbours = NeighbourConfig {
            config_service_url: env.url(&env.pick(&["CONFIG_SERVICE_URL", "CONFIG_BASE_URL"]))?,
            agent_api_url: env.url("AGENT_API_URL")?,
            ai_pipeline_api_url: env.url("AI_PIPELINE_API_URL")?,
            timeout: env.seconds("ORCHESTRATOR_NEIGHBOUR_TIMEOUT_SECONDS", 10, 1, 300)?,
            agent_dialect: match env
                .string("ORCHESTRATOR_AGENT_DIALECT", "run")
                .to_ascii_lowercase()
                .as_str()
            {
                "run" => AgentDialect::Run,
                "investigate" => AgentDialect::Investigate,
                other => {
                    return Err(invalid(
                        "ORCHESTRATOR_AGENT_DIALECT",
                        format!("expected run or investigate, got {other:?}"),
                    ))
                }
            },
            investigate_auth_token: env.secret("INVESTIGATE_AUTH_TOKEN"),
        };

        let namespace = env.string("K8S_NAMESPACE", "incidentfox");
        if !is_dns_label(&namespace) {
            return Err(invalid(
                "K8S_NAMESPACE",
                "must be a DNS-1123 label (lower case, digits, '-', at most 63)",
            ));
        }
        let kubernetes = KubernetesConfig {
            namespace,
            ai_pipeline_image: env.string("AI_PIPELINE_IMAGE", "incidentfox/ai-pipeline:latest"),
            ai_pipeline_service_account: env.string("AI_PIPELINE_SERVICE_ACCOUNT", "ai-pipeline"),
            dependency_service_image: env.string("DEPENDENCY_SERVICE_IMAGE", "incidentfox/dependency-service:latest"),
            dependency_service_account: env.string("DEPENDENCY_SERVICE_ACCOUNT", "dependency-discovery"),
            agent_image: env.string("AGENT_IMAGE", "incidentfox/agent:latest"),
            agent_service_account: env.string("AGENT_SERVICE_ACCOUNT", "incidentfox-agent"),
        };

        let permission = |var: &str, default: &str| env.string(var, default);
        let auth = AuthConfig {
            cache_ttl: env.seconds("ORCHESTRATOR_ADMIN_AUTH_CACHE_TTL_SECONDS", 15, 0, 3600)?,
            cache_capacity: env.bounded_u64("ORCHESTRATOR_ADMIN_AUTH_CACHE_SIZE", 10_000, 1, 1_000_000)? as usize,
            require_admin_star: env.bool("ORCHESTRATOR_REQUIRE_ADMIN_STAR", true)?,
            permissions: RequiredPermissions {
                provision: permission(
                    &env.pick(&[
                        "ORCHESTRATOR_REQUIRED_PERMISSION_PROVISION_TEAM",
                        "ORCHESTRATOR_REQUIRED_PERMISSION_PROVISION",
                    ]),
                    "admin:provision",
                ),
                provision_read: permission(
                    "ORCHESTRATOR_REQUIRED_PERMISSION_PROVISION_READ",
                    "admin:provision:read",
                ),
                deprovision: permission("ORCHESTRATOR_REQUIRED_PERMISSION_DEPROVISION", "admin:deprovision"),
                agent_run: permission("ORCHESTRATOR_REQUIRED_PERMISSION_AGENT_RUN", "admin:agent:run"),
                webhooks_read: permission("ORCHESTRATOR_REQUIRED_PERMISSION_WEBHOOKS_READ", "admin:webhooks:read"),
                webhooks_replay: permission(
                    "ORCHESTRATOR_REQUIRED_PERMISSION_WEBHOOKS_REPLAY",
                    "admin:webhooks:replay",
                ),
                audit_read: permission("ORCHESTRATOR_REQUIRED_PERMISSION_AUDIT_READ", "admin:audit:read"),
                deployment_read: permission(
                    "ORCHESTRATOR_REQUIRED_PERMISSION_DEPLOYMENT_READ",
                    "admin:deployment:read",
                ),
                pipeline_read: permission("ORCHESTRATOR_REQUIRED_PERMISSION_PIPELINE_READ", "admin:pipeline:read"),
                pipeline_trigger: permission(
                    "ORCHESTRATOR_REQUIRED_PERMISSION_PIPELINE_TRIGGER",
                    "admin:pipeline:trigger",
                ),
                cronjobs_sync: permission("ORCHESTRATOR_REQUIRED_PERMISSION_CRONJOBS_SYNC", "admin:cronjobs:sync"),
            },
        };

        let provisioning = ProvisioningConfig {
            lock_timeout: env.seconds("ORCHESTRATOR_PROVISION_LOCK_TIMEOUT_SECONDS", 10, 0, 300)?,
            wait: env.seconds("ORCHESTRATOR_PROVISION_WAIT_SECONDS", 30, 0, 300)?,
            step_max_attempts: env.count("ORCHESTRATOR_PROVISION_STEP_MAX_ATTEMPTS", 5, 1, 50)?,
            step_max_elapsed: env.seconds("ORCHESTRATOR_PROVISION_STEP_MAX_ELAPSED_SECONDS", 60, 1, 3600)?,
            retry_initial: env.millis("ORCHESTRATOR_PROVISION_RETRY_INITIAL_MS", 200, 1, 60_000)?,
            retry_max: env.millis("ORCHESTRATOR_PROVISION_RETRY_MAX_MS", 5_000, 1, 600_000)?,
            resume_interval: env.millis("ORCHESTRATOR_PROVISION_RESUME_INTERVAL_MS", 5_000, 50, 600_000)?,
            // 30 minutes: ten times what a run takes when every neighbour retries to its limit.
            run_deadline: env.seconds("ORCHESTRATOR_RUN_DEADLINE_SECONDS", 1800, 1, 7 * 86_400)?,
        };

        let reconcile = ReconcileConfig {
            enabled: env.bool("ORCHESTRATOR_RECONCILE_ENABLED", true)?,
            // 30 s: drift is found within 60 s even when a resync starts just before it happens
            // and watches are down, for 3 list calls per replica every 30 s.
            interval: env.seconds("ORCHESTRATOR_RECONCILE_INTERVAL_SECONDS", 30, 1, 3600)?,
            default_policy: env.parse("ORCHESTRATOR_DRIFT_POLICY", DriftPolicy::Repair)?,
        };

        // Timeouts and turn limits default to the existing service's: 180 s and 30 turns for
        // GitHub, 300 s and 50 turns for the others.
        let source = |name: &str,
                      secret_var: &str,
                      body_default: u64,
                      timeout_default: u64,
                      turns_default: u64|
         -> Result<SourceConfig, ConfigError> {
            let upper = name.to_ascii_uppercase();
            Ok(SourceConfig {
                secrets: env.secret_list(secret_var),
                body_limit_bytes: env.bounded_u64(
                    &format!("ORCHESTRATOR_{upper}_BODY_LIMIT_BYTES"),
                    body_default,
                    1024,
                    64 * MIB,
                )? as usize,
                rate_limit_per_minute: env.count(
                    &format!("ORCHESTRATOR_{upper}_RATE_LIMIT_PER_MINUTE"),
                    600,
                    1,
                    1_000_000,
                )?,
                rate_limit_burst: env.count(&format!("ORCHESTRATOR_{upper}_RATE_LIMIT_BURST"), 60, 1, 1_000_000)?,
                agent_timeout: env.seconds(
                    &format!("ORCHESTRATOR_{upper}_AGENT_TIMEOUT_SECONDS"),
                    timeout_default,
                    1,
                    3600,
                )?,
                agent_max_turns: env.count(
                    &env.pick(&[
                        &format!("ORCHESTRATOR_{upper}_AGENT_MAX_TURNS"),
                        &format!("ORCHESTRATOR_{upper}_MAX_TURNS"),
                    ]),
                    turns_default,
                    1,
                    1000,
                )?,
            })
        };
        let webhooks = WebhookConfig {
            slack: source("slack", "SLACK_SIGNING_SECRET", MIB, 300, 50)?,
            // GitHub documents payloads up to 25 MB.
            github: source("github", "GITHUB_WEBHOOK_SECRET", 25 * MIB, 180, 30)?,
            pagerduty: source("pagerduty", "PAGERDUTY_WEBHOOK_SECRET", MIB, 300, 50)?,
            incidentio: source("incidentio", "INCIDENTIO_WEBHOOK_SECRET", MIB, 300, 50)?,
            replay_window: env.seconds("ORCHESTRATOR_WEBHOOK_REPLAY_WINDOW_SECONDS", 300, 1, 3600)?,
            // 1.5 s: a sender sees 503 well inside Slack's 3 s while the database is away; a
            // commit takes about 10 ms at the 99th percentile under the ingest bench's load.
            store_timeout: env.millis("ORCHESTRATOR_WEBHOOK_STORE_TIMEOUT_MS", 1_500, 100, 60_000)?,
            max_in_flight: env.bounded_u64("ORCHESTRATOR_WEBHOOK_MAX_IN_FLIGHT", 256, 1, 100_000)? as usize,
            dispatch_workers: env.bounded_u64("ORCHESTRATOR_DISPATCH_WORKERS", 32, 1, 256)? as usize,
            dispatch_nice: env.count("ORCHESTRATOR_DISPATCH_NICE", 10, 0, 19)?,
            dispatch_max_attempts: env.count("ORCHESTRATOR_DISPATCH_MAX_ATTEMPTS", 8, 1, 100)?,
            dispatch_max_age: env.seconds("ORCHESTRATOR_DISPATCH_MAX_AGE_SECONDS", 86_400, 60, 30 * 86_400)?,
            // 6 s: a dead replica's events are taken over within about 6 s; renewals (all of a
            // replica's leases in one statement every 2 s) keep long agent runs alive.
            dispatch_lease: env.seconds("ORCHESTRATOR_DISPATCH_LEASE_SECONDS", 6, 3, 3600)?,
            dispatch_poll_interval: env.millis("ORCHESTRATOR_DISPATCH_POLL_INTERVAL_MS", 2_000, 10, 600_000)?,
            dispatch_fair_shares: env.bool("ORCHESTRATOR_DISPATCH_FAIR_SHARES", true)?,
            retry_initial: env.millis("ORCHESTRATOR_DISPATCH_RETRY_INITIAL_MS", 1_000, 1, 3_600_000)?,
            retry_max: env.millis("ORCHESTRATOR_DISPATCH_RETRY_MAX_MS", 300_000, 1, 86_400_000)?,
            retention_days: env.count("ORCHESTRATOR_WEBHOOK_RETENTION_DAYS", 14, 1, 3650)?,
            dedupe_days: env.count("ORCHESTRATOR_WEBHOOK_DEDUPE_DAYS", 7, 7, 3650)?,
        };

        use crate::webhooks::signature::{secret_is_usable, Source};
        for (source, secrets, var) in [
            (Source::Slack, &webhooks.slack.secrets, "SLACK_SIGNING_SECRET"),
            (Source::GitHub, &webhooks.github.secrets, "GITHUB_WEBHOOK_SECRET"),
            (
                Source::PagerDuty,
                &webhooks.pagerduty.secrets,
                "PAGERDUTY_WEBHOOK_SECRET",
            ),
            (
                Source::IncidentIo,
                &webhooks.incidentio.secrets,
                "INCIDENTIO_WEBHOOK_SECRET",
            ),
        ] {
            if secrets.iter().any(|secret| !secret_is_usable(source, secret)) {
                return Err(invalid(
                    var,
                    "a value cannot be used as a signing key (Incident.io secrets are whsec_ + base64)",
                ));
            }
        }

        let agent_runs = AgentRunConfig {
            max_timeout: env.seconds("ORCHESTRATOR_AGENT_RUN_MAX_TIMEOUT_SECONDS", 900, 1, 3600)?,
            default_timeout: env.seconds("ORCHESTRATOR_AGENT_RUN_DEFAULT_TIMEOUT_SECONDS", 300, 1, 3600)?,
            max_turns: env.count("ORCHESTRATOR_AGENT_RUN_MAX_TURNS", 100, 1, 1000)?,
            default_max_turns: env.count("ORCHESTRATOR_AGENT_RUN_DEFAULT_MAX_TURNS", 30, 1, 1000)?,
        };
        if agent_runs.default_timeout > agent_runs.max_timeout {
            return Err(invalid(
                "ORCHESTRATOR_AGENT_RUN_DEFAULT_TIMEOUT_SECONDS",
                "must not exceed ORCHESTRATOR_AGENT_RUN_MAX_TIMEOUT_SECONDS",
            ));
        }

        let secrets_key = match env.raw("ORCHESTRATOR_SECRETS_KEY") {
            None => None,
            Some(raw) => Some(parse_secrets_key(&raw)?),
        };

        Ok(Config {
            listen_addr,
            request_timeout: env.seconds("ORCHESTRATOR_REQUEST_TIMEOUT_SECONDS", 60, 1, 3600)?,
            body_limit_bytes: env.bounded_u64("ORCHESTRATOR_BODY_LIMIT_BYTES", MIB, 1024, 64 * MIB)? as usize,
            shutdown_grace: env.seconds("ORCHESTRATOR_SHUTDOWN_GRACE_SECONDS", 20, 0, 600)?,
            log_level: env
                .raw("RUST_LOG")
                .or_else(|| env.raw("LOG_LEVEL"))
                .unwrap_or_else(|| "info".into()),
            log_format,
            database,
            neighbours,
            kubernetes,
            auth,
            provisioning,
            reconcile,
            webhooks,
            agent_runs,
            internal_admin_token: env.secret("ORCHESTRATOR_INTERNAL_ADMIN_TOKEN"),
            internal_token: env.secret("ORCHESTRATOR_INTERNAL_TOKEN"),
            secrets_key,
            slack_bot_token: env.secret("SLACK_BOT_TOKEN"),
            warnings: {
                let mut warnings = env.warnings.take();
                for (var, why) in UNSUPPORTED_VARIABLES {
                    if env.raw(var).is_some() {
                        warnings.push(format!("{var} is set but not used: {why}"));
                    }
                }
                warnings
            },
        })
    }

    /// The effective configuration as JSON with every secret redacted, for `check-config`.
    pub fn redacted_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}))
    }
}

fn parse_secrets_key(raw: &str) -> Result<SecretKey, ConfigError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(raw).map_err(|_| {
        invalid(
            "ORCHESTRATOR_SECRETS_KEY",
            "must be base64 of 32 random bytes (openssl rand -base64 32)",
        )
    })?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| invalid("ORCHESTRATOR_SECRETS_KEY", "must decode to exactly 32 bytes"))?;
    Ok(SecretKey(key))
}

fn database_config(env: &Env<'_>) -> Result<DatabaseConfig, ConfigError> {
    let url = match env.raw("DATABASE_URL") {
        Some(url) => url,
        None => {
            let host = env.raw("DB_HOST").ok_or_else(|| ConfigError::Missing {
                var: "DATABASE_URL".into(),
                hint: "set DATABASE_URL, or DB_HOST with DB_PORT/DB_NAME/DB_USERNAME/DB_PASSWORD",
            })?;
            let port: u16 = env.parse("DB_PORT", 5432)?;
            let name = env.string("DB_NAME", "orchestrator");
            // DB_USERNAME first, as the existing service (and the config service) read it.
            let user = env.string(&env.pick(&["DB_USERNAME", "DB_USER"]), "postgres");
            let mut url = Url::parse("postgres://localhost/").map_err(|e| invalid("DB_HOST", e.to_string()))?;
            url.set_host(Some(&host))
                .map_err(|e| invalid("DB_HOST", e.to_string()))?;
            let _ = url.set_port(Some(port));
            url.set_path(&name);
            let _ = url.set_username(&user);
            if let Some(password) = env.raw("DB_PASSWORD") {
                let _ = url.set_password(Some(&password));
            }
            url.to_string()
        }
    };
    let parsed = Url::parse(&url).map_err(|_| invalid("DATABASE_URL", "not a valid URL"))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(invalid("DATABASE_URL", "must start with postgres:// or postgresql://"));
    }
    let mut display = parsed.clone();
    if display.password().is_some() {
        let _ = display.set_password(Some("redacted"));
    }
    // Parameters may carry a password too (`?password=`): never print them.
    if display.query().is_some() {
        display.set_query(Some("redacted"));
    }
    Ok(DatabaseConfig {
        display_url: display.to_string(),
        url: Secret::new(url),
        pool_size: env.count("ORCHESTRATOR_DB_POOL_SIZE", 10, 1, 500)?,
        acquire_timeout: env.seconds("ORCHESTRATOR_DB_ACQUIRE_TIMEOUT_SECONDS", 5, 1, 300)?,
        lock_pool_size: env.count("ORCHESTRATOR_LOCK_POOL_SIZE", 16, 1, 500)?,
        auto_migrate: env.bool("ORCHESTRATOR_AUTO_CREATE_TABLES", false)?,
    })
}

/// DNS-1123 label: what Kubernetes accepts for namespaces and Service names.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HashMap<String, String> {
        [
            ("DATABASE_URL", "postgres://u:hunter2@localhost:5432/orch"),
            ("CONFIG_SERVICE_URL", "http://config:8080"),
            ("AGENT_API_URL", "http://agent:8000"),
            ("AI_PIPELINE_API_URL", "http://pipeline:8000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn defaults_load_and_secrets_never_print() {
        let mut vars = base();
        vars.insert("SLACK_SIGNING_SECRET".into(), "s3cret-one, s3cret-two".into());
        vars.insert("ORCHESTRATOR_INTERNAL_TOKEN".into(), "internal-s3cret".into());
        let config = Config::from_map(&vars).unwrap();
        assert_eq!(config.kubernetes.namespace, "incidentfox");
        assert_eq!(config.webhooks.slack.secrets.iter().count(), 2);
        let printed = format!("{config:?} {}", config.redacted_json());
        for secret in ["hunter2", "s3cret-one", "s3cret-two", "internal-s3cret"] {
            assert!(!printed.contains(secret), "{secret} leaked: {printed}");
        }
    }

    #[test]
    fn missing_and_malformed_values_name_the_variable() {
        let mut vars = base();
        vars.remove("CONFIG_SERVICE_URL");
        let err = Config::from_map(&vars).unwrap_err().to_string();
        assert!(err.contains("CONFIG_SERVICE_URL"), "{err}");

        let mut vars = base();
        vars.insert("ORCHESTRATOR_DB_POOL_SIZE".into(), "lots".into());
        let err = Config::from_map(&vars).unwrap_err().to_string();
        assert!(err.contains("ORCHESTRATOR_DB_POOL_SIZE"), "{err}");

        let mut vars = base();
        vars.insert("ORCHESTRATOR_SECRETS_KEY".into(), "c2hvcnQ=".into());
        let err = Config::from_map(&vars).unwrap_err().to_string();
        assert!(
            err.contains("ORCHESTRATOR_SECRETS_KEY") && !err.contains("c2hvcnQ"),
            "{err}"
        );
    }

    #[test]
    fn the_existing_deployments_variables_work_unchanged() {
        let mut vars = base();
        vars.remove("CONFIG_SERVICE_URL");
        vars.remove("DATABASE_URL");
        for (k, v) in [
            ("CONFIG_BASE_URL", "http://config-legacy:8080"),
            ("DB_HOST", "db"),
            ("DB_NAME", "platform"),
            ("DB_USERNAME", "orch"),
            ("ORCHESTRATOR_SLACK_AGENT_MAX_TURNS", "12"),
            ("ORCHESTRATOR_GITHUB_AGENT_TIMEOUT_SECONDS", "90"),
            ("ORCHESTRATOR_REQUIRED_PERMISSION_PROVISION_TEAM", "admin:team:create"),
            ("AGENT_SERVICE_ACCOUNT", "agents"),
            ("SLACK_BOT_TOKEN", "xoxb-platform"),
        ] {
            vars.insert(k.into(), v.into());
        }
        let config = Config::from_map(&vars).unwrap();
        assert_eq!(config.listen_addr.port(), 8070, "the existing service's port");
        assert_eq!(
            config.neighbours.config_service_url.as_str(),
            "http://config-legacy:8080/"
        );
        assert!(config
            .database
            .url
            .expose()
            .starts_with("postgres://orch@db:5432/platform"));
        assert_eq!(config.webhooks.slack.agent_max_turns, 12);
        assert_eq!(config.webhooks.github.agent_timeout, Duration::from_secs(90));
        assert_eq!(config.auth.permissions.provision, "admin:team:create");
        assert_eq!(config.kubernetes.agent_service_account, "agents");
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        assert!(!format!("{config:?} {}", config.redacted_json()).contains("xoxb-platform"));
        // The existing service's defaults: 180 s and 30 turns for GitHub, 300 s and 50 turns else.
        let defaults = Config::from_map(&base()).unwrap().webhooks;
        assert_eq!(
            (defaults.github.agent_timeout.as_secs(), defaults.github.agent_max_turns),
            (180, 30)
        );
        assert_eq!(
            (
                defaults.pagerduty.agent_timeout.as_secs(),
                defaults.pagerduty.agent_max_turns
            ),
            (300, 50)
        );
    }

    #[test]
    fn when_both_names_are_set_the_existing_one_wins_and_an_operator_hears_of_it() {
        let mut vars = base();
        vars.insert("ORCHESTRATOR_SLACK_AGENT_MAX_TURNS".into(), "12".into());
        vars.insert("ORCHESTRATOR_SLACK_MAX_TURNS".into(), "40".into());
        vars.insert("CORRELATION_SERVICE_URL".into(), "http://correlation".into());
        let config = Config::from_map(&vars).unwrap();
        assert_eq!(config.webhooks.slack.agent_max_turns, 12);
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.contains("ORCHESTRATOR_SLACK_AGENT_MAX_TURNS and ORCHESTRATOR_SLACK_MAX_TURNS")),
            "{:?}",
            config.warnings
        );
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.starts_with("CORRELATION_SERVICE_URL is set but not used")),
            "{:?}",
            config.warnings
        );
    }

    #[test]
    fn database_url_is_built_from_parts() {
        let mut vars = base();
        vars.remove("DATABASE_URL");
        vars.insert("DB_HOST".into(), "db.internal".into());
        vars.insert("DB_PASSWORD".into(), "p@ss/word".into());
        let config = Config::from_map(&vars).unwrap();
        assert!(config
            .database
            .url
            .expose()
            .starts_with("postgres://postgres:p%40ss%2Fword@db.internal:5432/orchestrator"));
        assert!(!config.database.display_url.contains("p%40ss"));
    }
}
