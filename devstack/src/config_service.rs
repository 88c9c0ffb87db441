//! Config service stand-in: org/team nodes with deep-merged JSON config, admin and team
//! credentials, routing lookup, feedback and the unified audit of agent runs.
//!
//! It writes values the way the real (Python, FastAPI) service does: timestamps in ISO 8601
//! without an offset (naive UTC, microseconds), more fields than the contract lists, errors as
//! `{"detail": "..."}`, and validation failures as 422 `{"detail": [{"type", "loc", "msg"}]}`.
//! Every exchange of `exchanges.md` is pinned by `tests/contract.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::Utc;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::json::{merge_patch, naive_utc, now_naive, parse_body, random_base62, random_hex};
use crate::seed::{object_or_empty, Seed};

/// Header the internal endpoints require, and the only caller they accept.
const INTERNAL_SERVICE_HEADER: &str = "x-internal-service";
const INTERNAL_SERVICE: &str = "orchestrator";
const TEAM_TOKEN_HEADER: &str = "x-incidentfox-team-token";

/// Routing keys in the order they are tried: the most specific identifiers first, the workspace
/// (which spans many teams) last. Unknown keys are tried after these, alphabetically.
const ROUTING_KEYS: &[&str] = &[
    "slack_channel_id",
    "github_repo",
    "pagerduty_service_id",
    "incidentio_alert_source_id",
    "incidentio_team_id",
    "teams_channel_id",
    "google_chat_space_id",
    "coralogix_team_name",
    "service",
    "slack_workspace_id",
];

/// How long an impersonation token lives (the real service: 5 minutes).
const IMPERSONATION_TTL_SECONDS: i64 = 300;

/// The platform audit's run statuses a close may set (its pydantic pattern).
const AUDIT_CLOSE_STATUSES: &[&str] = &["completed", "failed", "timeout"];
/// Who may open a platform-audit run.
const AUDIT_TRIGGER_SOURCES: &[&str] = &["slack", "api", "web_ui"];

/// A team token as listed by the admin API (the secret is never stored here).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TeamTokenRecord {
    pub token_id: String,
    /// Naive UTC, as the Python service writes it.
    pub issued_at: String,
    /// Naive UTC; set once revoked.
    pub revoked_at: Option<String>,
    /// Subject of the admin who issued it.
    pub issued_by: String,
}

/// State of the config service stand-in. Cheap to clone; clones share the state.
#[derive(Clone, Default)]
pub struct ConfigService {
    inner: Arc<Mutex<ConfigState>>,
}

#[derive(Default)]
struct ConfigState {
    /// Keyed by (org_id, node_id); the org itself is the node (org, org).
    nodes: BTreeMap<(String, String), Node>,
    /// Static tokens → principal JSON.
    static_tokens: HashMap<String, Value>,
    team_tokens: Vec<IssuedTeamToken>,
    impersonation_tokens: HashMap<String, Impersonation>,
    feedback: Vec<Value>,
    /// In creation order.
    audit_runs: Vec<AuditRun>,
    /// Where each (org, run id) is in `audit_runs`: a benchmark records hundreds of thousands,
    /// and a scan per call made the stand-in's CPU grow with its history (at 20,000 runs it
    /// was a quarter of the machine's, competing with the service measured).
    audit_run_index: HashMap<(String, String), usize>,
}

struct Node {
    node_id: String,
    node_type: String,
    name: String,
    parent_id: Option<String>,
    config: Value,
}

struct IssuedTeamToken {
    org: String,
    team: String,
    secret: String,
    record: TeamTokenRecord,
}

struct Impersonation {
    org: String,
    team: String,
    expires_at: chrono::DateTime<Utc>,
}

struct AuditRun {
    started: chrono::DateTime<Utc>,
    record: Value,
}

/// Who a bearer token belongs to.
enum Principal {
    Admin(Value),
    Team { org: String, team: String, json: Value },
}

impl ConfigService {
    pub(crate) fn from_seed(seed: &Seed) -> ConfigService {
        let service = ConfigService::default();
        {
            let mut state = service.inner.lock().unwrap();
            for org in &seed.orgs {
                state.ensure_org(&org.org_id);
                if let Some(node) = state.nodes.get_mut(&key(&org.org_id, &org.org_id)) {
                    node.name = org.name.clone().unwrap_or_else(|| org.org_id.clone());
                    node.config = object_or_empty(org.config.clone());
                }
            }
            for team in &seed.teams {
                state.upsert_team(&team.org_id, &team.team_node_id, team.config.clone());
                if let (Some(name), Some(node)) =
                    (&team.name, state.nodes.get_mut(&key(&team.org_id, &team.team_node_id)))
                {
                    node.name = name.clone();
                }
            }
            state.static_tokens = seed
                .tokens
                .iter()
                .map(|(token, principal)| (token.clone(), principal.clone()))
                .collect();
        }
        service
    }

    /// The stored (not effective) config of a node.
    pub fn node_config(&self, org: &str, node: &str) -> Option<Value> {
        let state = self.inner.lock().unwrap();
        state.nodes.get(&key(org, node)).map(|n| n.config.clone())
    }

    pub fn node_exists(&self, org: &str, node: &str) -> bool {
        self.inner.lock().unwrap().nodes.contains_key(&key(org, node))
    }

    /// The effective config of a node (defaults, then ancestors, then the node), if it exists.
    pub fn effective_config(&self, org: &str, node: &str) -> Option<Value> {
        let state = self.inner.lock().unwrap();
        state
            .nodes
            .contains_key(&key(org, node))
            .then(|| state.effective_config(org, node))
    }

    /// Every token issued for the team, revoked ones included, in issue order.
    pub fn team_tokens(&self, org: &str, team: &str) -> Vec<TeamTokenRecord> {
        let state = self.inner.lock().unwrap();
        state
            .team_tokens
            .iter()
            .filter(|t| t.org == org && t.team == team)
            .map(|t| t.record.clone())
            .collect()
    }

    /// How many tokens were ever issued for the team.
    pub fn issued_token_count(&self, org: &str, team: &str) -> usize {
        self.team_tokens(org, team).len()
    }

    /// How many impersonation tokens were issued for the team.
    pub fn impersonation_token_count(&self, org: &str, team: &str) -> usize {
        let state = self.inner.lock().unwrap();
        state
            .impersonation_tokens
            .values()
            .filter(|i| i.org == org && i.team == team)
            .count()
    }

    /// Unified-audit agent runs as stored and answered (`status` `running` until closed).
    pub fn audit_runs(&self) -> Vec<Value> {
        let state = self.inner.lock().unwrap();
        state.audit_runs.iter().map(|r| r.record.clone()).collect()
    }

    /// Feedback bodies received, in order.
    pub fn feedback(&self) -> Vec<Value> {
        self.inner.lock().unwrap().feedback.clone()
    }

    /// Register (or replace) a static bearer token. `role: "team"` makes it a team credential.
    pub fn add_admin_token(&self, token: &str, principal: Value) {
        self.inner
            .lock()
            .unwrap()
            .static_tokens
            .insert(token.to_owned(), principal);
    }

    /// Replace a team's config, creating the team (and its org) node if missing.
    pub fn set_team_config(&self, org: &str, team: &str, config: Value) {
        self.inner.lock().unwrap().upsert_team(org, team, config);
    }

    fn principal(&self, token: &str) -> Option<Principal> {
        let state = self.inner.lock().unwrap();
        if let Some(json) = state.static_tokens.get(token) {
            if json["role"] == "team" {
                return Some(Principal::Team {
                    org: json["org_id"].as_str().unwrap_or_default().to_owned(),
                    team: json["team_node_id"].as_str().unwrap_or_default().to_owned(),
                    json: json.clone(),
                });
            }
            return Some(Principal::Admin(json.clone()));
        }
        if let Some(imp) = state.impersonation_tokens.get(token) {
            return (imp.expires_at > Utc::now()).then(|| team_principal(&imp.org, &imp.team, "impersonation_token"));
        }
        let (token_id, secret) = token.split_once('.')?;
        state
            .team_tokens
            .iter()
            .find(|t| t.record.token_id == token_id && t.secret == secret && t.record.revoked_at.is_none())
            .map(|t| team_principal(&t.org, &t.team, "team_token"))
    }

    /// The admin principal allowed to act on `org`: 401 without a valid token, 403 for a team
    /// credential or an admin of another org.
    fn authorize_admin(&self, headers: &HeaderMap, org: &str) -> Result<Value, ApiError> {
        let token = bearer(headers).ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        match self.principal(token) {
            None => Err(ApiError::unauthorized("invalid or expired token")),
            Some(Principal::Team { .. }) => Err(ApiError::forbidden("admin token required")),
            Some(Principal::Admin(principal)) => match principal["org_id"].as_str() {
                Some(own) if own != org => Err(ApiError::forbidden(format!(
                    "token is scoped to org {own} and cannot act on org {org}"
                ))),
                _ => Ok(principal),
            },
        }
    }

    fn require_team(&self, org: &str, team: &str) -> Result<(), ApiError> {
        let state = self.inner.lock().unwrap();
        match state.nodes.get(&key(org, team)) {
            Some(node) if node.node_type == "team" => Ok(()),
            _ => Err(ApiError::not_found("team not found")),
        }
    }
}

impl ConfigState {
    fn ensure_org(&mut self, org: &str) {
        self.nodes.entry(key(org, org)).or_insert_with(|| Node {
            node_id: org.to_owned(),
            node_type: "org".to_owned(),
            name: org.to_owned(),
            parent_id: None,
            config: json!({}),
        });
    }

    fn upsert_team(&mut self, org: &str, team: &str, config: Value) {
        self.ensure_org(org);
        let node = self.nodes.entry(key(org, team)).or_insert_with(|| Node {
            node_id: team.to_owned(),
            node_type: "team".to_owned(),
            name: team.to_owned(),
            parent_id: Some(org.to_owned()),
            config: json!({}),
        });
        node.config = object_or_empty(config);
    }

    /// Defaults, then each ancestor from the root down, then the node itself. A node that does not
    /// exist contributes nothing (so a seeded team token without a node sees the defaults).
    fn effective_config(&self, org: &str, node_id: &str) -> Value {
        let mut chain = Vec::new();
        let mut current = Some(node_id.to_owned());
        // The depth bound protects against a parent cycle created through the API.
        while let Some(id) = current.take().filter(|_| chain.len() < 32) {
            if let Some(node) = self.nodes.get(&key(org, &id)) {
                current = node.parent_id.clone().filter(|parent| *parent != id);
                chain.push(node);
            }
        }
        let mut effective = json!({ "entrance_agent": "planner" });
        for node in chain.iter().rev() {
            merge_patch(&mut effective, &node.config);
        }
        effective
    }

    /// First team whose `routing.<key>s` list (or `routing.<key>` scalar) holds the value.
    fn route(&self, key: &str, value: &Value) -> Option<(String, String)> {
        let plural = format!("{key}s");
        self.nodes
            .iter()
            .filter(|(_, node)| node.node_type == "team")
            .find(|(_, node)| {
                let routing = &node.config["routing"];
                let in_list = routing[&plural]
                    .as_array()
                    .is_some_and(|values| values.iter().any(|v| same_identifier(v, value)));
                in_list || same_identifier(&routing[key], value)
            })
            .map(|((org, team), _)| (org.clone(), team.clone()))
    }
}

fn key(org: &str, node: &str) -> (String, String) {
    (org.to_owned(), node.to_owned())
}

/// Identifiers compare as strings so that `123` and `"123"` match, as they would in a form field.
fn same_identifier(candidate: &Value, wanted: &Value) -> bool {
    fn text(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    matches!((text(candidate), text(wanted)), (Some(a), Some(b)) if a == b)
}

fn team_principal(org: &str, team: &str, auth_kind: &str) -> Principal {
    Principal::Team {
        org: org.to_owned(),
        team: team.to_owned(),
        json: json!({
            "role": "team",
            "auth_kind": auth_kind,
            "org_id": org,
            "team_node_id": team,
            "subject": format!("team:{org}/{team}"),
            "email": null,
            "can_write": false,
            "permissions": [],
        }),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn is_internal_caller(headers: &HeaderMap) -> bool {
    headers
        .get(INTERNAL_SERVICE_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == INTERNAL_SERVICE)
}

/// A FastAPI-style error answer: `{"detail": "text"}`, or for a 422 the list of problems.
struct ApiError {
    status: StatusCode,
    detail: Value,
}

impl ApiError {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: Value::String(detail.into()),
        }
    }
    /// FastAPI's request validation failure.
    fn invalid(problems: Vec<Value>) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            detail: Value::Array(problems),
        }
    }
    fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, detail)
    }
    fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, detail)
    }
    fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }
}

/// One problem of a 422, pydantic style: `loc` is `["body", field]`.
fn problem(kind: &str, field: &str, msg: &str) -> Value {
    json!({"type": kind, "loc": ["body", field], "msg": msg})
}

fn missing(field: &str) -> Value {
    problem("missing", field, "Field required")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "detail": self.detail }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

/// The body as a JSON object, as FastAPI validates one (a missing body is an empty object here;
/// the required fields then report what is missing).
fn json_object(bytes: &Bytes) -> Result<Map<String, Value>, ApiError> {
    match parse_body(bytes) {
        Ok(None) => Ok(Map::new()),
        Ok(Some(Value::Object(map))) => Ok(map),
        Ok(Some(_)) => Err(ApiError::invalid(vec![json!({
            "type": "model_attributes_type", "loc": ["body"], "msg": "Input should be a valid dictionary or object to extract fields from",
        })])),
        Err(_) => Err(ApiError::invalid(vec![json!({
            "type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error",
        })])),
    }
}

fn required_str(body: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Err(ApiError::invalid(vec![missing(field)])),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::invalid(vec![problem(
            "string_type",
            field,
            "Input should be a valid string",
        )])),
    }
}

/// Checks an optional field's JSON type the way pydantic would; `kind` names the expected type.
fn optional_of(body: &Map<String, Value>, field: &str, kind: &str, problems: &mut Vec<Value>) {
    let Some(value) = body.get(field).filter(|v| !v.is_null()) else {
        return;
    };
    let (ok, pydantic, msg) = match kind {
        "string" => (value.is_string(), "string_type", "Input should be a valid string"),
        "int" => (
            value.is_i64() || value.is_u64(),
            "int_type",
            "Input should be a valid integer",
        ),
        "number" => (value.is_number(), "float_type", "Input should be a valid number"),
        "object" => (value.is_object(), "dict_type", "Input should be a valid dictionary"),
        _ => (true, "", ""),
    };
    if !ok {
        problems.push(problem(pydantic, field, msg));
    }
}

pub(crate) fn router(service: ConfigService) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/api/v1/auth/me", get(auth_me))
        .route("/api/v1/admin/orgs/{org}/nodes", post(create_node))
        .route("/api/v1/admin/orgs/{org}/nodes/{node}/config", put(patch_node_config))
        .route(
            "/api/v1/config/orgs/{org}/nodes/{node}/effective",
            get(effective_config),
        )
        .route(
            "/api/v1/admin/orgs/{org}/teams/{team}/tokens",
            get(list_team_tokens).post(issue_team_token),
        )
        .route(
            "/api/v1/admin/orgs/{org}/teams/{team}/tokens/{token_id}",
            delete(revoke_team_token),
        )
        .route(
            "/api/v1/admin/orgs/{org}/teams/{team}/impersonation-token",
            post(impersonation_token),
        )
        .route("/api/v1/internal/routing/lookup", post(routing_lookup))
        .route("/api/v1/config/me", get(config_me))
        .route("/api/v1/internal/feedback", post(record_feedback))
        .route(
            "/api/v1/admin/orgs/{org}/unified-audit/agent-runs",
            post(create_audit_run),
        )
        .route(
            "/api/v1/admin/orgs/{org}/unified-audit/agent-runs/{run_id}",
            patch(update_audit_run),
        )
        .route("/__devstack/state", get(state_dump))
        .fallback(|| async { ApiError::not_found("Not Found") })
        .with_state(service)
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn auth_me(State(svc): State<ConfigService>, headers: HeaderMap) -> ApiResult {
    let token = bearer(&headers).ok_or_else(|| ApiError::unauthorized("Missing token"))?;
    match svc.principal(token) {
        Some(Principal::Admin(mut json) | Principal::Team { mut json, .. }) => {
            // The real principal carries fields beyond the contract's.
            if let Value::Object(fields) = &mut json {
                fields.entry("visitor_session_id").or_insert(Value::Null);
            }
            Ok(Json(json).into_response())
        }
        None => Err(ApiError::unauthorized("Invalid token")),
    }
}

async fn create_node(
    State(svc): State<ConfigService>,
    UrlPath(org): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    svc.authorize_admin(&headers, &org)?;
    let body = json_object(&body)?;
    let node_id = required_str(&body, "node_id")?;
    let node_type = required_str(&body, "node_type")?;
    let name = body.get("name").and_then(Value::as_str).unwrap_or(&node_id).to_owned();
    let mut state = svc.inner.lock().unwrap();
    if state.nodes.contains_key(&key(&org, &node_id)) {
        return Err(ApiError::new(StatusCode::CONFLICT, "node already exists"));
    }
    let parent_id = match node_type.as_str() {
        "org" if node_id != org => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "an org node's node_id must be the org id",
            ));
        }
        "org" => None,
        "team" => {
            if !state.nodes.contains_key(&key(&org, &org)) {
                return Err(ApiError::not_found("org not found"));
            }
            let parent = body.get("parent_id").and_then(Value::as_str).unwrap_or(&org).to_owned();
            if !state.nodes.contains_key(&key(&org, &parent)) {
                return Err(ApiError::not_found("parent node not found"));
            }
            Some(parent)
        }
        _ => {
            return Err(ApiError::invalid(vec![problem(
                "string_pattern_mismatch",
                "node_type",
                "String should match pattern '^(org|team)$'",
            )]));
        }
    };
    let node = Node {
        node_id: node_id.clone(),
        node_type,
        name,
        parent_id,
        config: json!({}),
    };
    let answer = json!({
        "org_id": org,
        "node_id": node.node_id,
        "parent_id": node.parent_id,
        "node_type": node.node_type,
        "name": node.name,
        "template_applied": false,
    });
    state.nodes.insert(key(&org, &node_id), node);
    Ok(Json(answer).into_response())
}

fn node_json(org: &str, node: &Node) -> Value {
    json!({
        "org_id": org,
        "node_id": node.node_id,
        "node_type": node.node_type,
        "name": node.name,
        "parent_id": node.parent_id,
        "config": node.config,
    })
}

async fn patch_node_config(
    State(svc): State<ConfigService>,
    UrlPath((org, node)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    svc.authorize_admin(&headers, &org)?;
    let body = json_object(&body)?;
    let patch = match body.get("patch") {
        Some(patch @ Value::Object(_)) => patch,
        None => return Err(ApiError::invalid(vec![missing("patch")])),
        Some(_) => {
            return Err(ApiError::invalid(vec![problem(
                "value_error",
                "patch",
                "Input should be a valid dictionary",
            )]))
        }
    };
    let mut state = svc.inner.lock().unwrap();
    let node = state
        .nodes
        .get_mut(&key(&org, &node))
        .ok_or_else(|| ApiError::not_found("node not found"))?;
    merge_patch(&mut node.config, patch);
    Ok(Json(json!({ "config": node.config })).into_response())
}

async fn effective_config(
    State(svc): State<ConfigService>,
    UrlPath((org, node)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    svc.authorize_admin(&headers, &org)?;
    let effective = svc
        .effective_config(&org, &node)
        .ok_or_else(|| ApiError::not_found("node not found"))?;
    Ok(Json(json!({ "effective_config": effective })).into_response())
}

async fn list_team_tokens(
    State(svc): State<ConfigService>,
    UrlPath((org, team)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    svc.authorize_admin(&headers, &org)?;
    svc.require_team(&org, &team)?;
    Ok(Json(svc.team_tokens(&org, &team)).into_response())
}

async fn issue_team_token(
    State(svc): State<ConfigService>,
    UrlPath((org, team)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let admin = svc.authorize_admin(&headers, &org)?;
    svc.require_team(&org, &team)?;
    let record = TeamTokenRecord {
        token_id: random_hex(16),
        issued_at: now_naive(),
        revoked_at: None,
        issued_by: admin["subject"].as_str().unwrap_or("unknown").to_owned(),
    };
    let secret = random_base62(32);
    let answer = json!({
        "token": format!("{}.{secret}", record.token_id),
        "issued_at": record.issued_at,
    });
    svc.inner.lock().unwrap().team_tokens.push(IssuedTeamToken {
        org,
        team,
        secret,
        record,
    });
    Ok(Json(answer).into_response())
}

async fn revoke_team_token(
    State(svc): State<ConfigService>,
    UrlPath((org, team, token_id)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    svc.authorize_admin(&headers, &org)?;
    svc.require_team(&org, &team)?;
    let mut state = svc.inner.lock().unwrap();
    let token = state
        .team_tokens
        .iter_mut()
        .find(|t| t.org == org && t.team == team && t.record.token_id == token_id)
        .ok_or_else(|| ApiError::not_found("token not found"))?;
    // Revoking twice keeps the first revocation time, like an idempotent UPDATE … WHERE revoked_at IS NULL.
    token.record.revoked_at.get_or_insert_with(now_naive);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn impersonation_token(
    State(svc): State<ConfigService>,
    UrlPath((org, team)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let admin = svc.authorize_admin(&headers, &org)?;
    svc.require_team(&org, &team)?;
    // The real service signs whole seconds, and writes expires_at from the `exp` claim.
    let issued = Utc::now().timestamp();
    let expires = issued + IMPERSONATION_TTL_SECONDS;
    let expires_at = chrono::DateTime::from_timestamp(expires, 0).unwrap_or_else(Utc::now);
    let header = json!({ "alg": "HS256", "typ": "JWT" });
    let claims = json!({
        "iss": "standin-config-service",
        "aud": "incidentfox-agent-runtime",
        "sub": format!("team:{org}/{team}"),
        "org_id": org,
        "team_node_id": team,
        "actor_subject": admin["subject"],
        "actor_email": admin["email"],
        "iat": issued,
        "exp": expires,
        "jti": random_hex(32),
    });
    // Shaped like the real JWT; the signature is random because only this stand-in verifies it
    // (by lookup).
    let token = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(random_hex(32)),
    );
    svc.inner
        .lock()
        .unwrap()
        .impersonation_tokens
        .insert(token.clone(), Impersonation { org, team, expires_at });
    Ok(Json(json!({ "token": token, "expires_at": naive_utc(expires_at) })).into_response())
}

async fn routing_lookup(State(svc): State<ConfigService>, headers: HeaderMap, body: Bytes) -> ApiResult {
    if !is_internal_caller(&headers) {
        return Err(ApiError::forbidden("internal service header required"));
    }
    let body = json_object(&body)?;
    let identifiers = match body.get("identifiers") {
        Some(Value::Object(ids)) => ids,
        None => return Err(ApiError::invalid(vec![missing("identifiers")])),
        Some(_) => {
            return Err(ApiError::invalid(vec![problem(
                "dict_type",
                "identifiers",
                "Input should be a valid dictionary",
            )]))
        }
    };
    let mut keys: Vec<&str> = ROUTING_KEYS
        .iter()
        .copied()
        .filter(|k| identifiers.contains_key(*k))
        .collect();
    keys.extend(
        identifiers
            .keys()
            .map(String::as_str)
            .filter(|k| !ROUTING_KEYS.contains(k)),
    );

    let state = svc.inner.lock().unwrap();
    let mut tried = Vec::new();
    for key in keys {
        let value = &identifiers[key];
        if value.is_null() || value.as_str() == Some("") {
            continue;
        }
        tried.push(key);
        if let Some((org, team)) = state.route(key, value) {
            return Ok(Json(json!({
                "found": true,
                "org_id": org,
                "team_node_id": team,
                "team_token": null,
                "matched_by": key,
                "matched_value": value,
                "tried": tried,
            }))
            .into_response());
        }
    }
    Ok(Json(json!({
        "found": false,
        "org_id": null,
        "team_node_id": null,
        "team_token": null,
        "matched_by": null,
        "matched_value": null,
        "tried": tried,
    }))
    .into_response())
}

async fn config_me(State(svc): State<ConfigService>, headers: HeaderMap) -> ApiResult {
    let token = headers
        .get(TEAM_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .or_else(|| bearer(&headers))
        .ok_or_else(|| ApiError::unauthorized("missing team token"))?;
    match svc.principal(token) {
        None => Err(ApiError::unauthorized("invalid or expired token")),
        Some(Principal::Admin(_)) => Err(ApiError::forbidden("team token required")),
        Some(Principal::Team { org, team, .. }) => {
            let effective = svc.inner.lock().unwrap().effective_config(&org, &team);
            Ok(Json(json!({
                "org_id": org,
                "team_node_id": team,
                "effective_config": effective,
                "computed_at": now_naive(),
            }))
            .into_response())
        }
    }
}

async fn record_feedback(State(svc): State<ConfigService>, headers: HeaderMap, body: Bytes) -> ApiResult {
    if !is_internal_caller(&headers) {
        return Err(ApiError::forbidden("internal service header required"));
    }
    let body = json_object(&body)?;
    svc.inner.lock().unwrap().feedback.push(Value::Object(body));
    Ok((StatusCode::ACCEPTED, Json(json!({ "status": "accepted" }))).into_response())
}

async fn create_audit_run(
    State(svc): State<ConfigService>,
    UrlPath(org): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    svc.authorize_admin(&headers, &org)?;
    let body = json_object(&body)?;
    let mut problems = Vec::new();
    for field in ["run_id", "trigger_source", "agent_name"] {
        if body.get(field).is_none_or(Value::is_null) {
            problems.push(missing(field));
        }
    }
    for field in [
        "run_id",
        "org_id",
        "team_node_id",
        "correlation_id",
        "trigger_source",
        "trigger_actor",
        "trigger_message",
        "trigger_channel_id",
        "agent_name",
    ] {
        optional_of(&body, field, "string", &mut problems);
    }
    optional_of(&body, "metadata", "object", &mut problems);
    if let Some(source) = body.get("trigger_source").and_then(Value::as_str) {
        if !AUDIT_TRIGGER_SOURCES.contains(&source) {
            problems.push(problem(
                "string_pattern_mismatch",
                "trigger_source",
                "String should match pattern '^(slack|api|web_ui)$'",
            ));
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems));
    }
    let run_id = required_str(&body, "run_id")?;
    let field = |name: &str| body.get(name).cloned().unwrap_or(Value::Null);
    let started = Utc::now();
    let record = json!({
        "id": run_id,
        "org_id": body.get("org_id").cloned().unwrap_or_else(|| json!(org)),
        "team_node_id": field("team_node_id"),
        "correlation_id": field("correlation_id"),
        "trigger_source": field("trigger_source"),
        "trigger_actor": field("trigger_actor"),
        "trigger_message": field("trigger_message"),
        "trigger_channel_id": field("trigger_channel_id"),
        "agent_name": field("agent_name"),
        "metadata": body.get("metadata").filter(|m| !m.is_null()).cloned().unwrap_or_else(|| json!({})),
        "status": "running",
        "started_at": naive_utc(started),
        "completed_at": null,
        "tool_calls_count": 0,
        "output_summary": null,
        "output_json": null,
        "confidence": null,
        "duration_seconds": null,
        "error_message": null,
    });
    let mut state = svc.inner.lock().unwrap();
    let position = state.audit_runs.len();
    match state.audit_run_index.entry((org.clone(), run_id.clone())) {
        std::collections::hash_map::Entry::Occupied(_) => {
            return Err(ApiError::new(StatusCode::CONFLICT, "Agent run already exists"));
        }
        std::collections::hash_map::Entry::Vacant(slot) => {
            slot.insert(position);
        }
    }
    state.audit_runs.push(AuditRun {
        started,
        record: record.clone(),
    });
    Ok(Json(record).into_response())
}

async fn update_audit_run(
    State(svc): State<ConfigService>,
    UrlPath((org, run_id)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    svc.authorize_admin(&headers, &org)?;
    let body = json_object(&body)?;
    let mut problems = Vec::new();
    for field in ["run_id", "status"] {
        if body.get(field).is_none_or(Value::is_null) {
            problems.push(missing(field));
        }
    }
    for field in ["run_id", "status", "output_summary", "error_message"] {
        optional_of(&body, field, "string", &mut problems);
    }
    optional_of(&body, "tool_calls_count", "int", &mut problems);
    optional_of(&body, "confidence", "number", &mut problems);
    optional_of(&body, "output_json", "object", &mut problems);
    if let Some(status) = body.get("status").and_then(Value::as_str) {
        if !AUDIT_CLOSE_STATUSES.contains(&status) {
            problems.push(problem(
                "value_error",
                "status",
                "String should match pattern '^(completed|failed|timeout)$'",
            ));
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems));
    }
    let mut state = svc.inner.lock().unwrap();
    let position = state
        .audit_run_index
        .get(&(org, run_id))
        .copied()
        .ok_or_else(|| ApiError::not_found("Agent run not found"))?;
    let run = &mut state.audit_runs[position];
    let now = Utc::now();
    let record = &mut run.record;
    record["status"] = body["status"].clone();
    record["completed_at"] = json!(naive_utc(now));
    let elapsed_ms = (now - run.started).num_milliseconds().max(0);
    record["duration_seconds"] = json!(elapsed_ms as f64 / 1000.0);
    for field in [
        "tool_calls_count",
        "output_summary",
        "output_json",
        "error_message",
        "confidence",
    ] {
        if let Some(value) = body.get(field) {
            if !(field == "tool_calls_count" && value.is_null()) {
                record[field] = value.clone();
            }
        }
    }
    Ok(Json(record.clone()).into_response())
}

/// Debug view for the dev script: everything but secrets.
async fn state_dump(State(svc): State<ConfigService>) -> Json<Value> {
    let state = svc.inner.lock().unwrap();
    let nodes: Vec<Value> = state
        .nodes
        .iter()
        .map(|((org, _), node)| node_json(org, node))
        .collect();
    let tokens: Vec<Value> = state
        .team_tokens
        .iter()
        .map(|t| json!({ "org_id": t.org, "team_node_id": t.team, "record": t.record }))
        .collect();
    let audit: Vec<&Value> = state.audit_runs.iter().map(|r| &r.record).collect();
    Json(json!({
        "nodes": nodes,
        "team_tokens": tokens,
        "audit_runs": audit,
        "feedback": state.feedback,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_file_fields_default_individually() {
        let seed: Seed = serde_json::from_str(
            r#"{"teams": [{"org_id": "initech", "team_node_id": "sre", "config": {"routing": {"services": ["api"]}}}],
                "orgs": ["acme", {"org_id": "globex", "name": "Globex"}]}"#,
        )
        .unwrap();
        assert!(seed.tokens.contains_key("dev-super-admin"));
        let svc = ConfigService::from_seed(&seed);
        assert!(svc.node_exists("initech", "initech"));
        assert!(svc.node_exists("initech", "sre"));
        assert_eq!(
            svc.effective_config("initech", "sre").unwrap(),
            json!({"entrance_agent": "planner", "routing": {"services": ["api"]}})
        );
    }

    #[test]
    fn example_seed_file_loads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/seed.example.json");
        let seed = Seed::from_file(path).unwrap();
        // Tokens in the file come on top of the default dev tokens.
        assert!(seed.tokens.contains_key("dev-org-admin-initech"));
        assert!(seed.tokens.contains_key("dev-super-admin"));
        let svc = ConfigService::from_seed(&seed);
        assert!(svc.node_exists("acme", "sre"));
        assert_eq!(svc.node_config("initech", "initech").unwrap()["agent"]["max_turns"], 30);
    }

    #[test]
    fn effective_config_inherits_from_the_org() {
        let svc = ConfigService::from_seed(&Seed::default());
        svc.set_team_config("acme", "t1", json!({"agent": {"max_turns": 5}}));
        svc.inner
            .lock()
            .unwrap()
            .nodes
            .get_mut(&key("acme", "acme"))
            .unwrap()
            .config = json!({"agent": {"max_turns": 9, "model": "m"}, "entrance_agent": "triage"});
        assert_eq!(
            svc.effective_config("acme", "t1").unwrap(),
            json!({"entrance_agent": "triage", "agent": {"max_turns": 5, "model": "m"}})
        );
    }
}
