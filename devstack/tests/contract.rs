//! The stand-ins speak the wire contract of /work/shared/contracts.md, checked over real HTTP.

use std::time::{Duration, Instant};

use devstack::Devstack;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

const SUPER: &str = "dev-super-admin";
const ACME_ADMIN: &str = "dev-org-admin-acme";
const GLOBEX_ADMIN: &str = "dev-org-admin-globex";

/// A small JSON-over-HTTP helper: every call answers (status, parsed body or Null).
struct Http {
    client: Client,
}

impl Http {
    fn new() -> Http {
        Http { client: http_client() }
    }

    async fn call(
        &self,
        method: Method,
        url: String,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, url);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request failed");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    async fn get(&self, url: String, token: Option<&str>) -> (StatusCode, Value) {
        self.call(Method::GET, url, token, &[], None).await
    }

    async fn post(&self, url: String, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, url, token, &[], Some(body)).await
    }

    async fn put(&self, url: String, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, url, token, &[], Some(body)).await
    }
}

async fn create_team(http: &Http, stack: &Devstack, org: &str, team: &str) {
    let url = format!("{}/api/v1/admin/orgs/{org}/nodes", stack.config_service.url());
    let (status, _) = http
        .post(
            url,
            Some(SUPER),
            json!({"node_id": team, "node_type": "team", "name": team, "parent_id": org}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn auth_me_answers_principals_and_401() {
    let stack = Devstack::start().await.unwrap();
    let http = Http::new();
    let url = || format!("{}/api/v1/auth/me", stack.config_service.url());

    let (status, me) = http.get(url(), Some(ACME_ADMIN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["role"], "admin");
    assert_eq!(me["org_id"], "acme");
    assert_eq!(me["permissions"], json!(["admin:*"]));

    let (_, me) = http.get(url(), Some(SUPER)).await;
    assert_eq!(me["org_id"], Value::Null);
    assert_eq!(me["subject"], "super-admin");
    assert_eq!(me["can_write"], true);

    let (_, me) = http.get(url(), Some("dev-readonly-acme")).await;
    assert_eq!(me["can_write"], false);
    assert_eq!(me["permissions"], json!(["admin:provision:read"]));

    let (_, me) = http.get(url(), Some("dev-team-token")).await;
    assert_eq!(me["role"], "team");
    assert_eq!(me["team_node_id"], "team-seeded");

    let (status, body) = http.get(url(), Some("nope")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["detail"].is_string());
    let (status, _) = http.get(url(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn nodes_config_patch_and_effective_config() {
    let stack = Devstack::start().await.unwrap();
    let http = Http::new();
    let base = stack.config_service.url();
    let config_url = format!("{base}/api/v1/admin/orgs/acme/nodes/sre/config");

    // Patching a node that does not exist yet is a 404 (the orchestrator then creates it).
    let (status, body) = http
        .put(config_url.clone(), Some(ACME_ADMIN), json!({"patch": {"a": 1}}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({"detail": "node not found"}));

    create_team(&http, &stack, "acme", "sre").await;
    // Creating it twice conflicts.
    let (status, _) = http
        .post(
            format!("{base}/api/v1/admin/orgs/acme/nodes"),
            Some(ACME_ADMIN),
            json!({"node_id": "sre", "node_type": "team", "name": "SRE", "parent_id": "acme"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    // A team needs its org node.
    let (status, _) = http
        .post(
            format!("{base}/api/v1/admin/orgs/initech/nodes"),
            Some(SUPER),
            json!({"node_id": "t", "node_type": "team", "name": "t", "parent_id": "initech"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = http
        .put(
            config_url.clone(),
            Some(ACME_ADMIN),
            json!({"patch": {"routing": {"slack_channel_ids": ["C1", "C2"]}, "agent": {"max_turns": 5, "model": "m"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["config"]["agent"]["max_turns"], 5);

    // Objects merge recursively, arrays are replaced, null deletes.
    let (_, body) = http
        .put(
            config_url,
            Some(ACME_ADMIN),
            json!({"patch": {"routing": {"slack_channel_ids": ["C3"], "github_repos": ["acme/api"]}, "agent": {"model": null}}}),
        )
        .await;
    let expected = json!({
        "routing": {"slack_channel_ids": ["C3"], "github_repos": ["acme/api"]},
        "agent": {"max_turns": 5},
    });
    assert_eq!(body["config"], expected);
    assert_eq!(stack.config_service.state().node_config("acme", "sre"), Some(expected));

    let (status, body) = http
        .get(
            format!("{base}/api/v1/config/orgs/acme/nodes/sre/effective"),
            Some(ACME_ADMIN),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["effective_config"]["entrance_agent"], "planner");
    assert_eq!(body["effective_config"]["agent"]["max_turns"], 5);
}

#[tokio::test]
async fn org_scope_and_team_tokens_are_enforced_on_admin_endpoints() {
    let stack = Devstack::start().await.unwrap();
    let http = Http::new();
    let base = stack.config_service.url();
    create_team(&http, &stack, "acme", "sre").await;

    // An org admin of another org, a team credential, and no credential at all.
    let url = format!("{base}/api/v1/admin/orgs/acme/teams/sre/tokens");
    assert_eq!(http.get(url.clone(), Some(GLOBEX_ADMIN)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        http.get(url.clone(), Some("dev-team-token")).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(http.get(url.clone(), Some("bogus")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(http.get(url.clone(), None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(http.get(url, Some(ACME_ADMIN)).await.0, StatusCode::OK);
}

#[tokio::test]
async fn team_tokens_issue_list_revoke() {
    let stack = Devstack::start().await.unwrap();
    let http = Http::new();
    let base = stack.config_service.url();
    let tokens_url = format!("{base}/api/v1/admin/orgs/acme/teams/sre/tokens");

    // The team must exist.
    let (status, _) = http.post(tokens_url.clone(), Some(ACME_ADMIN), Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    create_team(&http, &stack, "acme", "sre").await;

    let (status, issued) = http
        .call(Method::POST, tokens_url.clone(), Some(ACME_ADMIN), &[], None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let token = issued["token"].as_str().unwrap().to_owned();
    let (token_id, secret) = token.split_once('.').unwrap();
    assert!(!secret.is_empty() && issued["issued_at"].is_string());

    let (status, list) = http.get(tokens_url.clone(), Some(ACME_ADMIN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["token_id"], token_id);
    assert_eq!(list[0]["revoked_at"], Value::Null);
    assert_eq!(list[0]["issued_by"], "acme-admin");
    assert!(list[0].get("token").is_none());

    // The issued token is a team credential.
    let (status, me) = http.get(format!("{base}/api/v1/auth/me"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["role"], "team");
    assert_eq!(me["team_node_id"], "sre");
    let (status, cfg) = http
        .call(
            Method::GET,
            format!("{base}/api/v1/config/me"),
            None,
            &[("X-IncidentFox-Team-Token", &token)],
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cfg["effective_config"]["entrance_agent"], "planner");

    let revoke_url = format!("{tokens_url}/{token_id}");
    let (status, _) = http.call(Method::DELETE, revoke_url, Some(ACME_ADMIN), &[], None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = http
        .call(
            Method::DELETE,
            format!("{tokens_url}/unknown"),
            Some(ACME_ADMIN),
            &[],
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let records = stack.config_service.state().team_tokens("acme", "sre");
    assert_eq!(records.len(), 1);
    assert!(records[0].revoked_at.is_some());
    assert_eq!(stack.config_service.state().issued_token_count("acme", "sre"), 1);
    let (status, _) = http.get(format!("{base}/api/v1/auth/me"), Some(&token)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn impersonation_tokens_and_config_me() {
    let stack = Devstack::start().await.unwrap();
    let http = Http::new();
    let base = stack.config_service.url();
    let url = |org: &str, team: &str| format!("{base}/api/v1/admin/orgs/{org}/teams/{team}/impersonation-token");
    stack.config_service.state().set_team_config(
        "acme",
        "sre",
        json!({"agent": {"dedicated_service_url": "http://agent-dedicated-acme-sre.incidentfox.svc.cluster.local:8000"}}),
    );

    assert_eq!(
        http.post(url("acme", "missing"), Some(ACME_ADMIN), Value::Null).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        http.post(url("acme", "sre"), Some(GLOBEX_ADMIN), Value::Null).await.0,
        StatusCode::FORBIDDEN
    );
    let (status, body) = http.post(url("acme", "sre"), Some(ACME_ADMIN), Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    let token = body["token"].as_str().unwrap().to_owned();
    assert_eq!(token.split('.').count(), 3);
    // Naive UTC, five minutes ahead, as the real service writes it.
    let expires_at =
        chrono::NaiveDateTime::parse_from_str(body["expires_at"].as_str().unwrap(), "%Y-%m-%dT%H:%M:%S%.6f")
            .unwrap()
            .and_utc();
    let ahead = expires_at - chrono::Utc::now();
    assert!(
        ahead > chrono::Duration::minutes(4) && ahead <= chrono::Duration::minutes(5),
        "{ahead}"
    );

    let (status, me) = http.get(format!("{base}/api/v1/auth/me"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["role"], "team");
    assert_eq!(me["org_id"], "acme");

    let (status, cfg) = http.get(format!("{base}/api/v1/config/me"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        cfg["effective_config"]["agent"]["dedicated_service_url"],
        "http://agent-dedicated-acme-sre.incidentfox.svc.cluster.local:8000"
    );
    assert_eq!(cfg["effective_config"]["entrance_agent"], "planner");
    // Admin tokens are not team credentials.
    let (status, _) = http.get(format!("{base}/api/v1/config/me"), Some(SUPER)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn routing_lookup_finds_teams_by_plural_lists() {
    let stack = Devstack::start().await.unwrap();
    let http = Http::new();
    let url = format!("{}/api/v1/internal/routing/lookup", stack.config_service.url());
    let state = stack.config_service.state();
    state.set_team_config(
        "acme",
        "sre",
        json!({"routing": {"slack_channel_ids": ["C1"], "github_repos": ["acme/api"]}}),
    );
    state.set_team_config(
        "globex",
        "ops",
        json!({"routing": {"pagerduty_service_ids": ["P9"], "incidentio_alert_source_ids": ["A1"]}}),
    );
    let internal = [("X-Internal-Service", "orchestrator")];

    let (status, _) = http
        .post(url.clone(), None, json!({"identifiers": {"slack_channel_id": "C1"}}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, found) = http
        .call(
            Method::POST,
            url.clone(),
            None,
            &internal,
            Some(json!({"identifiers": {"slack_channel_id": "C-unknown", "github_repo": "acme/api"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        found,
        json!({
            "found": true, "org_id": "acme", "team_node_id": "sre", "team_token": null,
            "matched_by": "github_repo", "matched_value": "acme/api",
            "tried": ["slack_channel_id", "github_repo"],
        })
    );

    let (_, found) = http
        .call(
            Method::POST,
            url.clone(),
            None,
            &internal,
            Some(json!({"identifiers": {"incidentio_alert_source_id": "A1"}})),
        )
        .await;
    assert_eq!(found["team_node_id"], "ops");
    assert_eq!(found["org_id"], "globex");

    let (_, missing) = http
        .call(
            Method::POST,
            url,
            None,
            &internal,
            Some(json!({"identifiers": {"pagerduty_service_id": "nope"}})),
        )
        .await;
    assert_eq!(
        missing,
        json!({
            "found": false, "org_id": null, "team_node_id": null, "team_token": null,
            "matched_by": null, "matched_value": null, "tried": ["pagerduty_service_id"],
        })
    );
}

#[tokio::test]
async fn feedback_and_unified_audit_runs() {
    let stack = Devstack::start().await.unwrap();
    let http = Http::new();
    let base = stack.config_service.url();

    let feedback =
        json!({"run_id": "r1", "correlation_id": "c1", "feedback": "positive", "user_id": "U1", "source": "slack"});
    let (status, _) = http
        .post(format!("{base}/api/v1/internal/feedback"), None, feedback.clone())
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = http
        .call(
            Method::POST,
            format!("{base}/api/v1/internal/feedback"),
            None,
            &[("X-Internal-Service", "orchestrator")],
            Some(feedback.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(stack.config_service.state().feedback(), vec![feedback]);

    let runs = format!("{base}/api/v1/admin/orgs/acme/unified-audit/agent-runs");
    let open = json!({"run_id": "run-1", "org_id": "acme", "team_node_id": "sre", "correlation_id": "c-1",
        "trigger_source": "api", "trigger_actor": "admin@acme", "trigger_message": "hello",
        "trigger_channel_id": null, "agent_name": "planner", "metadata": {"context": {}}});
    let (status, _) = http.post(runs.clone(), Some("dev-internal-admin"), open.clone()).await;
    assert_eq!(status, StatusCode::OK);
    // A second open of the same run id conflicts.
    let (status, _) = http.post(runs.clone(), Some("dev-internal-admin"), open).await;
    assert_eq!(status, StatusCode::CONFLICT);
    // Only slack, api and web_ui may open a run.
    let (status, body) = http
        .post(
            runs.clone(),
            Some("dev-internal-admin"),
            json!({"run_id": "run-x", "trigger_source": "admin", "agent_name": "planner"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"][0]["loc"], json!(["body", "trigger_source"]));
    let (status, _) = http
        .call(
            Method::PATCH,
            format!("{runs}/run-2"),
            Some("dev-internal-admin"),
            &[],
            Some(json!({"run_id": "run-2", "status": "completed"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let stored = stack.config_service.state().audit_runs();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (stored[0]["id"].as_str(), stored[0]["status"].as_str()),
        (Some("run-1"), Some("running"))
    );
}

#[tokio::test]
async fn ai_pipeline_bootstrap_is_idempotent() {
    let stack = Devstack::start().await.unwrap();
    let http = Http::new();
    let url = format!("{}/api/v1/teams/sre/bootstrap", stack.ai_pipeline.url());

    let (status, _) = http.call(Method::POST, url.clone(), None, &[], None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let key = [("Idempotency-Key", "provision-1")];
    let (status, first) = http.call(Method::POST, url.clone(), Some(SUPER), &key, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["status"], "queued");
    assert_eq!(first["team_id"], "sre");
    let (status, again) = http.call(Method::POST, url.clone(), Some(SUPER), &key, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["run_id"], first["run_id"]);

    let (_, other) = http
        .call(
            Method::POST,
            url,
            Some(SUPER),
            &[("Idempotency-Key", "provision-2")],
            None,
        )
        .await;
    assert_ne!(other["run_id"], first["run_id"]);
    let bootstraps = stack.ai_pipeline.state().bootstraps();
    assert_eq!(bootstraps.len(), 2);
    assert_eq!(bootstraps[0].idempotency_key.as_deref(), Some("provision-1"));
    assert_eq!(bootstraps[0].team, "sre");

    let (status, run) = http
        .post(
            format!("{}/api/v1/teams/sre/run", stack.ai_pipeline.url()),
            Some(SUPER),
            json!({"org_id": "acme", "team_id": "sre"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(run["job_name"].is_string() && run["run_id"].is_string());
}

#[tokio::test]
async fn agent_run_echoes_the_message() {
    let stack = Devstack::start().await.unwrap();
    let http = Http::new();
    let url = format!("{}/agents/planner/run", stack.agent.url());
    let body = json!({"message": "why is api down?", "context": {}, "timeout": 300, "max_turns": 20, "output_destinations": [], "trigger_source": "slack"});

    let (status, _) = http.post(url.clone(), None, body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    stack.agent.state().set_delay(Duration::from_millis(5));
    let headers = [("X-IncidentFox-Team-Token", "tok"), ("X-Correlation-ID", "corr-1")];
    let (status, answer) = http
        .call(Method::POST, url.clone(), None, &headers, Some(body.clone()))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        answer,
        json!({"success": true, "output": "echo: why is api down?", "agent_name": "planner", "correlation_id": "corr-1"})
    );

    stack.agent.state().set_error_mode(Some("model unavailable".into()));
    let (status, answer) = http.call(Method::POST, url, None, &headers[..1], Some(body)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["success"], false);
    assert_eq!(answer["error"], "model unavailable");
    assert_eq!(answer["correlation_id"], Value::Null);

    let agent = stack.agent.state();
    assert_eq!((agent.runs_started(), agent.runs_completed()), (2, 2));
    assert_eq!(agent.in_flight(), 0);
}

/// Parse `data: {...}` lines of a server-sent-events body.
fn sse_events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|frame| frame.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

#[tokio::test]
async fn investigate_streams_events_in_order() {
    let stack = Devstack::start().await.unwrap();
    let agent = stack.agent.state();
    agent.set_delay(Duration::from_millis(6));
    agent.set_investigate_token(Some("inv-secret".into()));
    let client = http_client();
    let url = format!("{}/investigate", stack.agent.url());
    let body =
        json!({"prompt": "check db", "team_token": "t", "thread_id": "th", "tenant_id": "acme", "team_id": "sre"});

    let resp = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let resp = client
        .post(&url)
        .bearer_auth("inv-secret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_events(&resp.text().await.unwrap());
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["thought", "tool_start", "tool_end", "result"]);
    assert_eq!(events[3]["data"], json!({"text": "echo: check db", "success": true}));

    agent.set_error_mode(Some("boom".into()));
    let text = client
        .post(&url)
        .bearer_auth("inv-secret")
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = sse_events(&text);
    assert_eq!(
        events.last().unwrap(),
        &json!({"type": "error", "data": {"message": "boom"}})
    );
    assert_eq!(agent.runs_completed(), 2);
}

#[tokio::test]
async fn investigate_counts_a_client_that_hangs_up_as_cancelled() {
    let stack = Devstack::start().await.unwrap();
    let agent = stack.agent.state();
    // Long enough never to finish within the test: the client leaves after the first event.
    agent.set_delay(Duration::from_secs(30));
    let mut resp = http_client()
        .post(format!("{}/investigate", stack.agent.url()))
        .json(&json!({"prompt": "p"}))
        .send()
        .await
        .unwrap();
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("\"thought\""));
    assert_eq!(agent.in_flight(), 1);
    drop(resp);

    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.runs_cancelled() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(agent.runs_cancelled(), 1);
    assert_eq!(agent.in_flight(), 0);
    assert_eq!(agent.runs_completed(), 0);
}

#[tokio::test]
async fn faults_fail_drop_and_delay_requests() {
    let stack = Devstack::start().await.unwrap();
    let http = Http::new();
    let cs = &stack.config_service;
    let me = || format!("{}/api/v1/auth/me", cs.url());

    cs.faults().fail_next(1, 503);
    let (status, body) = http.get(me(), Some(SUPER)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["detail"].is_string());
    assert_eq!(http.get(me(), Some(SUPER)).await.0, StatusCode::OK);

    // Matching faults only hit matching requests.
    cs.faults().fail_next_matching(Some("POST"), "/routing/", 1, 500);
    assert_eq!(http.get(me(), Some(SUPER)).await.0, StatusCode::OK);

    cs.faults().drop_next(1);
    let dropped = http_client().get(me()).bearer_auth(SUPER).send().await;
    assert!(dropped.is_err(), "a dropped request must not get an answer");
    assert_eq!(http.get(me(), Some(SUPER)).await.0, StatusCode::OK);

    cs.faults().set_latency(Duration::from_millis(40));
    let started = Instant::now();
    assert_eq!(http.get(me(), Some(SUPER)).await.0, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(40));
    cs.faults().reset();

    let faults: Vec<Option<String>> = cs.calls().into_iter().map(|c| c.fault).collect();
    assert_eq!(
        faults,
        [
            Some("status 503".to_owned()),
            None,
            None,
            Some("dropped".to_owned()),
            None,
            None
        ]
    );
    let call = &cs.calls_to("get", "/auth/me")[0];
    assert_eq!(call.header("authorization"), Some("Bearer dev-super-admin"));
    assert_eq!(call.body, Value::Null);
    assert_eq!(cs.calls_to("POST", "/auth/me").len(), 0);
}

#[tokio::test]
async fn control_endpoints_over_http() {
    let stack = Devstack::start().await.unwrap();
    let http = Http::new();
    let base = stack.ai_pipeline.url();
    let bootstrap = || format!("{base}/api/v1/teams/x/bootstrap");

    let (status, _) = http
        .post(
            format!("{base}/__devstack/faults"),
            None,
            json!({"fail_next": 1, "status": 502, "method": "POST", "path_contains": "/bootstrap"}),
        )
        .await;
    assert!(status.is_success());
    assert_eq!(
        http.post(bootstrap(), Some(SUPER), Value::Null).await.0,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(http.post(bootstrap(), Some(SUPER), Value::Null).await.0, StatusCode::OK);

    let (_, calls) = http.get(format!("{base}/__devstack/calls"), None).await;
    let calls = calls.as_array().unwrap();
    assert_eq!(calls.len(), 2, "control requests are not recorded");
    assert_eq!(calls[0]["fault"], "status 502");
    assert_eq!(calls[1]["path"], "/api/v1/teams/x/bootstrap");

    http.post(format!("{base}/__devstack/reset"), None, Value::Null).await;
    assert!(stack.ai_pipeline.calls().is_empty());
}

mod kubernetes_api {
    use super::*;

    fn cronjob(name: &str, labels: Value) -> Value {
        json!({
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": name, "labels": labels},
            "spec": {"schedule": "0 2 * * *", "jobTemplate": {"spec": {"template": {"spec": {"containers": [], "restartPolicy": "Never"}}}}},
        })
    }

    #[tokio::test]
    async fn cronjob_lifecycle_over_http() {
        let stack = Devstack::start().await.unwrap();
        let http = Http::new();
        let coll = format!(
            "{}/apis/batch/v1/namespaces/incidentfox/cronjobs",
            stack.kubernetes.url()
        );
        let item = |name: &str| format!("{coll}/{name}");

        let (status, created) = http
            .post(
                coll.clone(),
                None,
                cronjob("ai-pipeline-acme-sre", json!({"team": "sre", "app": "ai"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        let uid = created["metadata"]["uid"].as_str().unwrap().to_owned();
        let rv = created["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
        assert_eq!(created["metadata"]["namespace"], "incidentfox");
        assert!(created["metadata"]["creationTimestamp"].is_string());

        let (status, conflict) = http
            .post(coll.clone(), None, cronjob("ai-pipeline-acme-sre", json!({})))
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(conflict["reason"], "AlreadyExists");
        http.post(coll.clone(), None, cronjob("other", json!({"team": "ops"})))
            .await;

        // Lists honour label selectors.
        let (_, list) = http.get(format!("{coll}?labelSelector=team%3Dsre,app"), None).await;
        assert_eq!(list["kind"], "CronJobList");
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        assert_eq!(list["items"][0]["metadata"]["name"], "ai-pipeline-acme-sre");
        let (_, list) = http.get(coll.clone(), None).await;
        assert_eq!(list["items"].as_array().unwrap().len(), 2);

        // Replace with a stale resourceVersion conflicts; with the current one it succeeds.
        let mut replacement = created.clone();
        replacement["spec"]["schedule"] = json!("0 3 * * *");
        replacement["metadata"]["resourceVersion"] = json!("1234");
        let (status, body) = http.put(item("ai-pipeline-acme-sre"), None, replacement.clone()).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body["reason"], "Conflict");
        replacement["metadata"]["resourceVersion"] = json!(rv);
        let (status, replaced) = http.put(item("ai-pipeline-acme-sre"), None, replacement).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(replaced["metadata"]["uid"], uid.as_str());
        assert_ne!(replaced["metadata"]["resourceVersion"], rv.as_str());

        // Server-side apply needs a field manager; applying the same object twice is one write.
        let applied = cronjob("ai-pipeline-acme-sre", json!({"extra": "yes"}));
        let apply = |query: &'static str| {
            let url = format!("{}{query}", item("ai-pipeline-acme-sre"));
            let body = applied.clone();
            async move {
                let resp = http_client()
                    .patch(url)
                    .header("content-type", "application/apply-patch+yaml")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                (resp.status(), resp.json::<Value>().await.unwrap())
            }
        };
        let (status, body) = apply("").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["reason"], "Invalid");
        let (status, first) = apply("?fieldManager=orchestrator&force=true").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(first["spec"]["schedule"], "0 2 * * *");
        assert_eq!(
            first["metadata"]["labels"],
            json!({"team": "sre", "app": "ai", "extra": "yes"})
        );
        let (_, second) = apply("?fieldManager=orchestrator&force=true").await;
        assert_eq!(
            second["metadata"]["resourceVersion"],
            first["metadata"]["resourceVersion"]
        );
        assert_eq!(
            stack.kubernetes.state().write_count("cronjobs", "ai-pipeline-acme-sre"),
            3
        );

        // Names longer than 52 characters are rejected for CronJobs.
        let long = "a".repeat(53);
        let (status, invalid) = http.post(coll.clone(), None, cronjob(&long, json!({}))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(invalid["reason"], "Invalid");
        assert_eq!(invalid["details"]["causes"][0]["field"], "metadata.name");

        let (status, deleted) = http
            .call(Method::DELETE, item("ai-pipeline-acme-sre"), None, &[], None)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(deleted["metadata"]["uid"], uid.as_str());
        let (status, missing) = http.get(item("ai-pipeline-acme-sre"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            missing,
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "cronjobs.batch \"ai-pipeline-acme-sre\" not found", "reason": "NotFound",
                "details": {"name": "ai-pipeline-acme-sre", "group": "batch", "kind": "cronjobs"},
                "code": 404,
            })
        );
        let (status, _) = http
            .call(Method::DELETE, item("ai-pipeline-acme-sre"), None, &[], None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn works_with_the_kube_client() {
        use k8s_openapi::api::apps::v1::Deployment;
        use k8s_openapi::api::batch::v1::CronJob;
        use k8s_openapi::api::core::v1::Service;
        use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

        let stack = Devstack::start().await.unwrap();
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&stack.kubeconfig_json("incidentfox")).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        assert_eq!(config.default_namespace, "incidentfox");
        let client = kube::Client::try_from(config).unwrap();

        let cronjobs: Api<CronJob> = Api::default_namespaced(client.clone());
        let cj: CronJob = serde_json::from_value(cronjob(
            "dep-discovery-acme-sre",
            json!({"app.kubernetes.io/managed-by": "incidentfox-orchestrator"}),
        ))
        .unwrap();
        let created = cronjobs.create(&PostParams::default(), &cj).await.unwrap();
        assert!(created.metadata.uid.is_some());
        let listed = cronjobs
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=incidentfox-orchestrator"))
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 1);
        let applied = cronjobs
            .patch(
                "dep-discovery-acme-sre",
                &PatchParams::apply("orchestrator").force(),
                &Patch::Apply(&cj),
            )
            .await
            .unwrap();
        assert_eq!(applied.metadata.resource_version, created.metadata.resource_version);
        let err = cronjobs.get("nope").await.unwrap_err();
        assert!(matches!(err, kube::Error::Api(ref s) if s.code == 404), "{err:?}");
        assert!(cronjobs.get_opt("nope").await.unwrap().is_none());
        let err = cronjobs.create(&PostParams::default(), &cj).await.unwrap_err();
        assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"));
        let mut stale = created.clone();
        stale.metadata.resource_version = Some("999".into());
        stale.spec.as_mut().unwrap().schedule = "5 * * * *".into();
        let err = cronjobs
            .replace("dep-discovery-acme-sre", &PostParams::default(), &stale)
            .await
            .unwrap_err();
        assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"));
        stale.metadata.resource_version = created.metadata.resource_version.clone();
        let replaced = cronjobs
            .replace("dep-discovery-acme-sre", &PostParams::default(), &stale)
            .await
            .unwrap();
        assert_eq!(replaced.spec.unwrap().schedule, "5 * * * *");
        cronjobs
            .delete("dep-discovery-acme-sre", &DeleteParams::default())
            .await
            .unwrap();

        let deployments: Api<Deployment> = Api::namespaced(client.clone(), "incidentfox");
        let deployment: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "agent-dedicated-acme-sre"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "a"}}, "template": {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "agent", "image": "agent:1"}]}}},
        }))
        .unwrap();
        let patched = deployments
            .patch(
                "agent-dedicated-acme-sre",
                &PatchParams::apply("orchestrator"),
                &Patch::Apply(&deployment),
            )
            .await
            .unwrap();
        assert_eq!(patched.status.unwrap().ready_replicas, Some(1));

        let services: Api<Service> = Api::namespaced(client, "incidentfox");
        let service: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "agent-dedicated-acme-sre"},
            "spec": {"selector": {"app": "a"}, "ports": [{"name": "http", "port": 8000}]},
        }))
        .unwrap();
        let svc = services.create(&PostParams::default(), &service).await.unwrap();
        assert!(svc.spec.unwrap().cluster_ip.is_some());
        assert_eq!(stack.kubernetes.state().objects("services").len(), 1);
        assert!(stack
            .kubernetes
            .state()
            .get("deployments", "incidentfox", "agent-dedicated-acme-sre")
            .is_some());
    }
    /// What the real API server does that a client can trip over: a Deployment's selector never
    /// changes, server-side apply merges maps and leaves fields it was not given, a manager that
    /// stops applying a field gives it up, and a delete with a stale uid precondition is refused.
    #[tokio::test]
    async fn apply_semantics_that_matter_to_a_client() {
        use k8s_openapi::api::apps::v1::Deployment;
        use k8s_openapi::api::batch::v1::CronJob;
        use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};

        let stack = Devstack::start().await.unwrap();
        let client = kube::Client::try_from(kube::Config::new(stack.kubernetes.url().parse().unwrap())).unwrap();
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), "incidentfox");
        let deployment = |app: &str, image: &str| -> Deployment {
            serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "agent"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": app}},
                    "template": {"metadata": {"labels": {"app": app}}, "spec": {"containers": [{"name": "agent", "image": image}]}}},
            }))
            .unwrap()
        };
        let params = PatchParams::apply("orchestrator").force();
        deployments
            .patch("agent", &params, &Patch::Apply(deployment("a", "agent:1")))
            .await
            .unwrap();
        let refused = deployments
            .patch("agent", &params, &Patch::Apply(deployment("b", "agent:2")))
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, kube::Error::Api(s) if s.code == 422 && s.message.contains("spec.selector") && s.message.contains("field is immutable")),
            "{refused:?}"
        );

        // A CronJob created by someone else keeps what an apply does not set; the applier's own
        // fields replace theirs, and a field it stops applying is gone.
        let cronjobs: Api<CronJob> = Api::namespaced(client, "incidentfox");
        let created = stack
            .kubernetes
            .state()
            .insert(
                "cronjobs",
                json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "job", "namespace": "incidentfox"},
                    "spec": {"schedule": "0 2 * * *", "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "i", "command": ["run"], "args": ["--x"]}]}}}}}}),
            )
            .unwrap();
        let applied = |extra: Value| -> CronJob {
            let mut spec = json!({"schedule": "0 3 * * *"});
            if let (Value::Object(spec), Value::Object(extra)) = (&mut spec, extra) {
                spec.extend(extra);
            }
            serde_json::from_value(
                json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "job"},
                "spec": spec}),
            )
            .unwrap()
        };
        let merged = serde_json::to_value(
            cronjobs
                .patch("job", &params, &Patch::Apply(applied(json!({"suspend": true}))))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(merged["spec"]["schedule"], "0 3 * * *");
        assert_eq!(merged["spec"]["suspend"], true);
        assert_eq!(
            merged["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"],
            json!(["--x"]),
            "fields the apply did not set stay"
        );
        let given_up = serde_json::to_value(
            cronjobs
                .patch("job", &params, &Patch::Apply(applied(json!({}))))
                .await
                .unwrap(),
        )
        .unwrap();
        assert!(given_up["spec"].get("suspend").is_none(), "{given_up}");

        let stale = DeleteParams::default().preconditions(Preconditions {
            uid: Some("not-its-uid".into()),
            resource_version: None,
        });
        let refused = cronjobs.delete("job", &stale).await.unwrap_err();
        assert!(matches!(&refused, kube::Error::Api(s) if s.code == 409), "{refused:?}");
        let current = DeleteParams::default().preconditions(Preconditions {
            uid: created["metadata"]["uid"].as_str().map(str::to_string),
            resource_version: None,
        });
        cronjobs.delete("job", &current).await.unwrap();
        assert!(stack.kubernetes.state().objects("cronjobs").is_empty());
    }

    /// Watches as a client sees them: from a list's resource version on, every change (an edit
    /// or a deletion behind the client's back included) as ADDED, MODIFIED or DELETED with the
    /// object, filtered by label; refused with 403 when RBAC would refuse them.
    #[tokio::test]
    async fn watches_send_every_change_from_a_resource_version() {
        use futures::{StreamExt, TryStreamExt};
        use k8s_openapi::api::batch::v1::CronJob;
        use kube::api::{Api, ListParams, WatchEvent, WatchParams};

        let stack = Devstack::start().await.unwrap();
        let client = kube::Client::try_from(kube::Config::new(stack.kubernetes.url().parse().unwrap())).unwrap();
        let cronjobs: Api<CronJob> = Api::namespaced(client, "incidentfox");
        let listed = cronjobs.list(&ListParams::default()).await.unwrap();
        let from = listed.metadata.resource_version.unwrap();
        let cronjob = |name: &str, managed: bool| {
            let labels = if managed {
                json!({"app.kubernetes.io/managed-by": "incidentfox-orchestrator"})
            } else {
                json!({})
            };
            json!({"apiVersion": "batch/v1", "kind": "CronJob",
                "metadata": {"name": name, "namespace": "incidentfox", "labels": labels},
                "spec": {"schedule": "0 2 * * *", "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "i"}]}}}}}})
        };
        let state = stack.kubernetes.state();
        state.insert("cronjobs", cronjob("ours", true)).unwrap();
        state.insert("cronjobs", cronjob("theirs", false)).unwrap();
        assert!(
            state.edit_behind("cronjobs", "incidentfox", "ours", |o| o["spec"]["schedule"] =
                json!("*/5 * * * *"))
        );
        assert!(state.delete_behind("cronjobs", "incidentfox", "ours"));
        // An object that stops matching the selector is DELETED for the watch.
        state.insert("cronjobs", cronjob("leaving", true)).unwrap();
        assert!(state.edit_behind("cronjobs", "incidentfox", "leaving", |o| {
            o["metadata"]["labels"] = json!({});
            o["spec"]["schedule"] = json!("0 4 * * *");
        }));

        let params = WatchParams::default()
            .labels("app.kubernetes.io/managed-by=incidentfox-orchestrator")
            .timeout(5);
        let events: Vec<WatchEvent<CronJob>> = cronjobs
            .watch(&params, &from)
            .await
            .unwrap()
            .take(5)
            .try_collect()
            .await
            .unwrap();
        let seen: Vec<(String, String)> = events
            .iter()
            .map(|event| match event {
                WatchEvent::Added(o) => ("ADDED".into(), o.spec.as_ref().unwrap().schedule.clone()),
                WatchEvent::Modified(o) => ("MODIFIED".into(), o.spec.as_ref().unwrap().schedule.clone()),
                WatchEvent::Deleted(o) => ("DELETED".into(), o.spec.as_ref().unwrap().schedule.clone()),
                other => (format!("{other:?}"), String::new()),
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("ADDED".to_string(), "0 2 * * *".to_string()),
                ("MODIFIED".to_string(), "*/5 * * * *".to_string()),
                ("DELETED".to_string(), "*/5 * * * *".to_string()),
                ("ADDED".to_string(), "0 2 * * *".to_string()),
                ("DELETED".to_string(), "0 4 * * *".to_string()),
            ]
        );

        state.refuse_watches(true);
        let refused = cronjobs.watch(&params, "0").await.err().or(None);
        let refused = match refused {
            Some(e) => e,
            None => cronjobs
                .watch(&params, "0")
                .await
                .unwrap()
                .try_collect::<Vec<_>>()
                .await
                .unwrap_err(),
        };
        assert!(matches!(&refused, kube::Error::Api(s) if s.code == 403), "{refused:?}");
    }
}

/// A plain HTTP client; installs the TLS provider reqwest needs when its features are unified
/// with the orchestrator's in a workspace build.
fn http_client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new()
}

/// Every exchange recorded in `shared/exchanges.md` (real services' answers), replayed against the
/// stand-ins. An answer must have exactly the recorded keys at every level, the recorded JSON
/// types, and the recorded values except where a value varies between runs: those are written
/// here as a marker of what they must look like.
mod recorded_exchanges {
    use super::*;

    /// `"<naive>"`: ISO 8601 with microseconds and no offset, as Python's `isoformat()` writes UTC.
    fn is_naive_timestamp(s: &str) -> bool {
        chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.6f").is_ok()
            && s.len() == "2026-12-06T16:20:27.562895".len()
    }

    fn is_team_token(s: &str) -> bool {
        matches!(s.split_once('.'), Some((id, secret))
            if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
                && secret.len() == 32 && secret.bytes().all(|b| b.is_ascii_alphanumeric()))
    }

    fn is_jwt(s: &str) -> bool {
        let parts: Vec<&str> = s.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    }

    /// Matches `actual` against a recording; panics naming the first difference.
    fn assert_recorded(recorded: &Value, actual: &Value) {
        if let Err(problem) = matches(recorded, actual, "$") {
            panic!("{problem}\nrecorded: {recorded}\nactual:   {actual}");
        }
    }

    fn matches(recorded: &Value, actual: &Value, at: &str) -> Result<(), String> {
        match (recorded, actual) {
            (Value::Object(want), Value::Object(got)) => {
                let mut want_keys: Vec<&String> = want.keys().collect();
                let mut got_keys: Vec<&String> = got.keys().collect();
                want_keys.sort();
                got_keys.sort();
                if want_keys != got_keys {
                    return Err(format!("{at}: keys {got_keys:?}, recorded {want_keys:?}"));
                }
                for (key, value) in want {
                    matches(value, &got[key], &format!("{at}.{key}"))?;
                }
                Ok(())
            }
            (Value::Array(want), Value::Array(got)) => {
                if want.len() != got.len() {
                    return Err(format!("{at}: {} items, recorded {}", got.len(), want.len()));
                }
                for (i, (w, g)) in want.iter().zip(got).enumerate() {
                    matches(w, g, &format!("{at}[{i}]"))?;
                }
                Ok(())
            }
            (Value::String(marker), Value::String(got)) if marker.starts_with('<') && marker.ends_with('>') => {
                let ok = match marker.as_str() {
                    "<naive>" => is_naive_timestamp(got),
                    "<team-token>" => is_team_token(got),
                    "<jwt>" => is_jwt(got),
                    "<hex16>" => got.len() == 16 && got.bytes().all(|b| b.is_ascii_hexdigit()),
                    "<bootstrap-run>" => got.strip_prefix("bootstrap-").is_some_and(|id| id.len() == 12),
                    "<any>" => true,
                    other => return Err(format!("{at}: unknown marker {other}")),
                };
                if ok {
                    Ok(())
                } else {
                    Err(format!("{at}: {got:?} is not {marker}"))
                }
            }
            (Value::String(marker), got) if marker == "<number>" => {
                if got.is_number() {
                    Ok(())
                } else {
                    Err(format!("{at}: {got} is not a number"))
                }
            }
            (want, got) if want == got => Ok(()),
            (want, got) => Err(format!("{at}: {got}, recorded {want}")),
        }
    }

    async fn stack_with_team() -> (Devstack, Http, String) {
        let stack = Devstack::start().await.unwrap();
        let http = Http::new();
        let base = stack.config_service.url();
        (stack, http, base)
    }

    #[tokio::test]
    async fn auth_me_of_a_platform_admin() {
        let (_stack, http, base) = stack_with_team().await;
        let (status, body) = http.get(format!("{base}/api/v1/auth/me"), Some(SUPER)).await;
        assert_eq!(status, StatusCode::OK);
        assert_recorded(
            &json!({"role": "admin", "auth_kind": "admin_token", "org_id": null, "team_node_id": null,
                "subject": "super-admin", "email": "<any>", "can_write": true, "permissions": ["admin:*"],
                "visitor_session_id": null}),
            &body,
        );
    }

    #[tokio::test]
    async fn auth_me_of_an_org_admin_with_scoped_permissions() {
        let (_stack, http, base) = stack_with_team().await;
        let (status, body) = http
            .get(format!("{base}/api/v1/auth/me"), Some("dev-readonly-acme"))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_recorded(
            &json!({"role": "admin", "auth_kind": "admin_token", "org_id": "acme", "team_node_id": null,
                "subject": "<any>", "email": "<any>", "can_write": false, "permissions": ["admin:provision:read"],
                "visitor_session_id": null}),
            &body,
        );
    }

    #[tokio::test]
    async fn auth_me_with_a_bad_token() {
        let (_stack, http, base) = stack_with_team().await;
        let (status, body) = http.get(format!("{base}/api/v1/auth/me"), Some("unknown")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_recorded(&json!({"detail": "Invalid token"}), &body);
    }

    #[tokio::test]
    async fn create_a_team_node_then_patch_its_config() {
        let (_stack, http, base) = stack_with_team().await;
        let (status, body) = http
            .post(
                format!("{base}/api/v1/admin/orgs/acme/nodes"),
                Some(SUPER),
                json!({"node_id": "sre", "node_type": "team", "name": "sre", "parent_id": "acme"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_recorded(
            &json!({"org_id": "acme", "node_id": "sre", "parent_id": "acme", "node_type": "team", "name": "sre",
                "template_applied": false}),
            &body,
        );

        let config = format!("{base}/api/v1/admin/orgs/acme/nodes/sre/config");
        let (status, body) = http
            .put(
                config.clone(),
                Some(SUPER),
                json!({"patch": {"routing": {"slack_channel_ids": ["C0123"]}}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_recorded(&json!({"config": {"routing": {"slack_channel_ids": ["C0123"]}}}), &body);

        let (status, body) = http.put(config, Some(SUPER), json!({"patch": 5})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_recorded(
            &json!({"detail": [{"type": "value_error", "loc": ["body", "patch"], "msg": "Input should be a valid dictionary"}]}),
            &body,
        );
    }

    #[tokio::test]
    async fn team_tokens_are_listed_issued_and_listed_again() {
        let (stack, http, base) = stack_with_team().await;
        create_team(&http, &stack, "acme", "sre").await;
        let tokens = format!("{base}/api/v1/admin/orgs/acme/teams/sre/tokens");
        let (status, body) = http.get(tokens.clone(), Some(SUPER)).await;
        assert_eq!(status, StatusCode::OK);
        assert_recorded(&json!([]), &body);

        let (status, issued) = http.call(Method::POST, tokens.clone(), Some(SUPER), &[], None).await;
        assert_eq!(status, StatusCode::OK);
        assert_recorded(&json!({"token": "<team-token>", "issued_at": "<naive>"}), &issued);

        let (status, body) = http.get(tokens, Some(SUPER)).await;
        assert_eq!(status, StatusCode::OK);
        assert_recorded(
            &json!([{"token_id": "<hex16>", "issued_at": "<naive>", "revoked_at": null, "issued_by": "super-admin"}]),
            &body,
        );
        let token_id = issued["token"].as_str().unwrap().split('.').next().unwrap();
        assert_eq!(body[0]["token_id"], token_id);
        assert_eq!(body[0]["issued_at"], issued["issued_at"]);
    }

    #[tokio::test]
    async fn an_impersonation_token_is_minted() {
        let (stack, http, base) = stack_with_team().await;
        create_team(&http, &stack, "acme", "sre").await;
        let (status, body) = http
            .post(
                format!("{base}/api/v1/admin/orgs/acme/teams/sre/impersonation-token"),
                Some(SUPER),
                Value::Null,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_recorded(&json!({"token": "<jwt>", "expires_at": "<naive>"}), &body);
        // Whole seconds: the real service writes `exp` back as the expiry.
        assert!(body["expires_at"].as_str().unwrap().ends_with(".000000"));
    }

    #[tokio::test]
    async fn routing_lookup_found_and_not_found() {
        let (stack, http, base) = stack_with_team().await;
        stack.config_service.state().set_team_config(
            "acme",
            "sre",
            json!({"routing": {"slack_channel_ids": ["C0123"]}}),
        );
        let url = format!("{base}/api/v1/internal/routing/lookup");
        let internal = [("X-Internal-Service", "orchestrator")];
        let (status, body) = http
            .call(
                Method::POST,
                url.clone(),
                None,
                &internal,
                Some(json!({"identifiers": {"slack_channel_id": "C0123"}})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_recorded(
            &json!({"found": true, "org_id": "acme", "team_node_id": "sre", "team_token": null,
                "matched_by": "slack_channel_id", "matched_value": "C0123", "tried": ["slack_channel_id"]}),
            &body,
        );
        let (status, body) = http
            .call(
                Method::POST,
                url,
                None,
                &internal,
                Some(json!({"identifiers": {"github_repo": "acme/none"}})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_recorded(
            &json!({"found": false, "org_id": null, "team_node_id": null, "team_token": null,
                "matched_by": null, "matched_value": null, "tried": ["github_repo"]}),
            &body,
        );
    }

    #[tokio::test]
    async fn a_platform_audit_run_is_opened_and_closed() {
        let (_stack, http, base) = stack_with_team().await;
        let runs = format!("{base}/api/v1/admin/orgs/acme/unified-audit/agent-runs");
        let (status, opened) = http
            .post(
                runs.clone(),
                Some("dev-internal-admin"),
                json!({"run_id": "r-1", "org_id": "acme", "team_node_id": "sre", "correlation_id": "c-1",
                    "trigger_source": "api", "trigger_actor": "admin@acme", "trigger_message": "hello",
                    "trigger_channel_id": null, "agent_name": "planner", "metadata": {"context": {}}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let run = json!({"id": "r-1", "org_id": "acme", "team_node_id": "sre", "correlation_id": "c-1",
            "trigger_source": "api", "trigger_actor": "admin@acme", "trigger_message": "hello",
            "trigger_channel_id": null, "agent_name": "planner", "metadata": {"context": {}},
            "status": "running", "started_at": "<naive>", "completed_at": null, "tool_calls_count": 0,
            "output_summary": null, "output_json": null, "confidence": null, "duration_seconds": null,
            "error_message": null});
        assert_recorded(&run, &opened);

        let close = |body: Value| {
            http.call(
                Method::PATCH,
                format!("{runs}/r-1"),
                Some("dev-internal-admin"),
                &[],
                Some(body),
            )
        };
        let (status, body) = close(json!({"run_id": "r-1", "status": "succeeded"})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_recorded(
            &json!({"detail": [{"type": "value_error", "loc": ["body", "status"],
                "msg": "String should match pattern '^(completed|failed|timeout)$'"}]}),
            &body,
        );
        // A close without the run id is refused too.
        let (status, body) = close(json!({"status": "completed"})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["detail"][0]["loc"], json!(["body", "run_id"]));

        let (status, closed) = close(json!({"run_id": "r-1", "status": "completed", "tool_calls_count": 3,
            "output_summary": "done", "output_json": {"summary": "done"}, "error_message": null, "confidence": 0.8}))
        .await;
        assert_eq!(status, StatusCode::OK);
        let mut done = run;
        for (field, value) in [
            ("status", json!("completed")),
            ("completed_at", json!("<naive>")),
            ("tool_calls_count", json!(3)),
            ("output_summary", json!("done")),
            ("output_json", json!({"summary": "done"})),
            ("confidence", json!(0.8)),
            ("duration_seconds", json!("<number>")),
        ] {
            done[field] = value;
        }
        assert_recorded(&done, &closed);
    }

    #[tokio::test]
    async fn a_team_pipeline_is_bootstrapped() {
        let stack = Devstack::start().await.unwrap();
        let http = Http::new();
        let (status, body) = http
            .call(
                Method::POST,
                format!("{}/api/v1/teams/sre/bootstrap", stack.ai_pipeline.url()),
                Some(SUPER),
                &[],
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_recorded(
            &json!({"run_id": "<bootstrap-run>", "status": "queued", "team_id": "sre", "kind": "bootstrap",
                "created_at": "<naive>"}),
            &body,
        );
    }
}
