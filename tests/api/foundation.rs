//! The service foundation: health, readiness, request ids, the error shape, metrics, OpenAPI,
//! configuration errors at start-up, and the stand-ins' Kubernetes contract.

use std::process::Command;

use crate::helpers::*;

#[tokio::test]
async fn health_and_ready_answer_ok_with_a_migrated_database() {
    let app = TestApp::spawn().await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), 200);
    assert_eq!(json_of(response).await, serde_json::json!({"status": "ok"}));
    assert_eq!(app.get("/ready").await.status(), 200);
}

#[tokio::test]
async fn health_is_503_not_500_when_the_database_is_unreachable() {
    let app = TestApp::spawn_with(|env| {
        // Nothing listens on port 1.
        env.insert("DATABASE_URL".into(), "postgres://postgres@127.0.0.1:1/none".into());
        env.insert("ORCHESTRATOR_DB_ACQUIRE_TIMEOUT_SECONDS".into(), "1".into());
    })
    .await;
    for path in ["/health", "/ready"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 503, "{path}");
        let body = json_of(response).await;
        assert_eq!(body["code"], "database_unavailable", "{path}: {body}");
    }
}

#[tokio::test]
async fn ready_is_503_until_migrations_are_applied() {
    let app = TestApp::spawn().await;
    sqlx::query("DELETE FROM orchestrator_schema_migrations WHERE version = (SELECT max(version) FROM orchestrator_schema_migrations)")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let response = app.get("/ready").await;
    assert_eq!(response.status(), 503);
    assert_eq!(json_of(response).await["code"], "migrations_pending");
    assert_eq!(
        app.get("/health").await.status(),
        200,
        "liveness does not depend on migrations"
    );
}

#[tokio::test]
async fn request_id_is_echoed_or_generated_and_appears_in_errors() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .get(app.at("/no/such/route"))
        .header("X-Request-Id", "req-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");
    assert_eq!(response.status(), 404);
    let body = json_of(response).await;
    assert_eq!(body["request_id"], "req-abc-123");
    assert_eq!(body["code"], "not_found");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));

    let response = app.get("/health").await;
    let generated = response.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "generated id {generated:?}");
}

#[tokio::test]
async fn wrong_method_is_a_json_405() {
    let app = TestApp::spawn().await;
    let response = app.client.post(app.at("/health")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = json_of(response).await;
    assert_eq!(body["code"], "method_not_allowed");
    assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()));
}

#[tokio::test]
async fn unknown_paths_share_one_metrics_series() {
    let app = TestApp::spawn().await;
    let requests = (0..1000).map(|i| app.client.get(app.at(&format!("/unknown/{i}"))).send());
    for response in futures::future::join_all(requests).await {
        assert_eq!(response.unwrap().status(), 404);
    }
    app.get("/health").await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    // The existing service's metric names and label names (`path` holding the route template).
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("incidentfox_orchestrator_http_requests_total{"))
        .collect();
    assert!(
        series
            .iter()
            .any(|l| l.contains(r#"path="unmatched""#) && l.contains(r#"status_code="404""#) && l.ends_with(" 1000")),
        "{series:#?}"
    );
    assert!(series.iter().any(|l| l.contains(r#"path="/health""#)), "{series:#?}");
    assert!(series.len() < 10, "unknown paths must not create series: {series:#?}");
    assert!(metrics.contains(
        r#"incidentfox_orchestrator_http_request_duration_seconds_bucket{method="GET",path="/health",le="0.005"}"#
    ));
    assert!(metrics.contains("process_resident_memory_bytes"));
}

#[tokio::test]
async fn openapi_document_is_served_and_lists_every_endpoint() {
    let app = TestApp::spawn().await;
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    let doc = json_of(response).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
        "/api/v1/admin/provision/team",
        "/api/v1/admin/provision/runs",
        "/api/v1/admin/provision/runs/{id}",
        "/api/v1/admin/provision/runs/{id}/retry",
        "/api/v1/admin/audit",
        "/webhooks/slack/events",
        "/webhooks/slack/interactions",
        "/webhooks/github",
        "/webhooks/pagerduty",
        "/webhooks/incidentio",
        "/api/v1/admin/webhooks/events",
        "/api/v1/admin/webhooks/events/{id}",
        "/api/v1/admin/webhooks/events/{id}/replay",
        "/api/v1/admin/webhooks/replay",
        "/api/v1/internal/slack/trigger",
        "/api/v1/admin/agents/run",
    ] {
        assert!(paths.contains_key(path), "{path} missing from the OpenAPI document");
    }
}

#[tokio::test]
async fn check_config_names_the_bad_variable_and_hides_secrets() {
    let binary = env!("CARGO_BIN_EXE_orchestrator");
    let output = Command::new(binary)
        .arg("check-config")
        .env_clear()
        .env("DATABASE_URL", "postgres://u:topsecretpw@localhost/x")
        .env("CONFIG_SERVICE_URL", "http://config")
        .env("AGENT_API_URL", "not a url")
        .env("AI_PIPELINE_API_URL", "http://pipeline")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("AGENT_API_URL"), "{stderr}");

    let output = Command::new(binary)
        .arg("check-config")
        .env_clear()
        .env("DATABASE_URL", "postgres://u:topsecretpw@localhost/x")
        .env("CONFIG_SERVICE_URL", "http://config")
        .env("AGENT_API_URL", "http://agent")
        .env("AI_PIPELINE_API_URL", "http://pipeline")
        .env("GITHUB_WEBHOOK_SECRET", "gh-secret-value")
        .env("ORCHESTRATOR_INTERNAL_ADMIN_TOKEN", "admin-token-value")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(printed["kubernetes"]["namespace"], "incidentfox");
    for secret in ["topsecretpw", "gh-secret-value", "admin-token-value"] {
        assert!(!stdout.contains(secret), "{secret} printed");
    }
}

/// The chart's Role grants exactly the verbs the code uses (one shared list in the code).
#[test]
fn the_role_grants_exactly_the_verbs_the_code_uses() {
    let role = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/role.yaml")).unwrap();
    let mut granted = Vec::new();
    let mut group = String::new();
    let mut resource = String::new();
    for line in role.lines().map(str::trim) {
        let list = |l: &str| -> Vec<String> {
            let inner = l
                .split_once('[')
                .and_then(|(_, r)| r.split_once(']'))
                .map(|(i, _)| i)
                .unwrap_or("");
            inner
                .split(',')
                .map(|v| v.trim().trim_matches('"').to_string())
                .filter(|v| !v.is_empty() || inner.contains("\"\""))
                .collect()
        };
        if let Some(rest) = line.strip_prefix("- apiGroups:") {
            group = list(rest).first().cloned().unwrap_or_default();
        } else if let Some(rest) = line.strip_prefix("resources:") {
            resource = list(rest).join(",");
        } else if let Some(rest) = line.strip_prefix("verbs:") {
            granted.push((group.clone(), resource.clone(), list(rest)));
        }
    }
    let used: Vec<(String, String, Vec<String>)> = orchestrator::clients::kubernetes::RBAC_RULES
        .iter()
        .map(|(g, r, verbs)| {
            (
                g.to_string(),
                r.to_string(),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(
        granted, used,
        "deploy/kubernetes/role.yaml (rendered from the chart) must match RBAC_RULES"
    );
}

/// Every metric the Grafana dashboard queries exists in /metrics after a short exercise.
#[tokio::test]
async fn every_dashboard_metric_is_exported_after_a_short_exercise() {
    use orchestrator::config::{Secret, SecretList};
    use orchestrator::webhooks::signature::{signed_headers, Source};
    let app = TestApp::spawn().await;
    app.stack.config_service.state().set_team_config(
        "acme",
        "sre",
        serde_json::json!({"routing": {"github_repos": ["acme/api"]}}),
    );
    // A provisioning run, a failing one, a webhook accepted and one rejected, an agent run.
    let provision = |team: &str| {
        app.client
            .post(app.at("/api/v1/admin/provision/team"))
            .bearer_auth(SUPER_ADMIN)
            .json(&serde_json::json!({"org_id": "acme", "team_node_id": team, "create_pipeline_schedule": true}))
            .send()
    };
    assert_eq!(provision("dash").await.unwrap().status(), 200);
    let body = serde_json::json!({"action": "opened", "pull_request": {"number": 1, "title": "t"}, "repository": {"full_name": "acme/api"}, "sender": {"login": "a"}}).to_string();
    let secrets = SecretList::new(vec![Secret::new(GITHUB_SECRET)]);
    let mut request = app
        .client
        .post(app.at("/webhooks/github"))
        .header("X-GitHub-Event", "pull_request")
        .body(body.clone());
    for (name, value) in signed_headers(
        Source::GitHub,
        &secrets,
        body.as_bytes(),
        chrono::Utc::now().timestamp(),
        "dash-1",
    )
    .unwrap()
    {
        request = request.header(name, value);
    }
    assert_eq!(request.send().await.unwrap().status(), 200);
    app.client
        .post(app.at("/webhooks/github"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let metrics = eventually(30, "dispatch metrics", || async {
        let text = app.get("/metrics").await.text().await.unwrap();
        (text.contains("webhook_dispatch_latency_seconds_bucket") && text.contains("webhook_inbox_events"))
            .then_some(text)
    })
    .await;
    let wanted = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/METRICS.txt")).unwrap();
    let missing: Vec<&str> = wanted
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && *name != "up")
        .filter(|name| {
            !metrics
                .lines()
                .any(|line| line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} ")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the service does not export: {missing:?}"
    );
}

/// The document and the router come from one list of routes; this checks the promise from the
/// outside, the way a client generated from the document would: every documented operation is
/// served, and what it answers to requests that are wrong in each way the shared middleware
/// handles (no credentials, malformed JSON, another content type, a bad path or query parameter)
/// is a status the document lists for it.
#[tokio::test]
async fn the_openapi_document_matches_what_the_router_serves() {
    let app = TestApp::spawn().await;
    let doc = json_of(app.get("/openapi.json").await).await;
    let mut probed = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let documented: Vec<u16> = operation["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|s| s.parse().unwrap())
                .collect();
            let concrete = path.replace("{id}", "not-a-uuid");
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let admin = operation.get("security").is_some();
            let json_body = operation.pointer("/requestBody/content/application~1json").is_some();
            let has_query = operation["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"));
            let request = |authorised: bool| {
                let mut request = app.client.request(method.clone(), app.at(&concrete));
                if authorised {
                    let token = if path.starts_with("/api/v1/internal") {
                        INTERNAL_TOKEN
                    } else {
                        SUPER_ADMIN
                    };
                    request = request.bearer_auth(token);
                }
                request
            };
            let mut probes: Vec<(&str, reqwest::RequestBuilder)> = vec![("bare", request(false))];
            if admin || path.starts_with("/api/v1/internal") {
                if json_body {
                    probes.push((
                        "malformed json",
                        request(true).header("content-type", "application/json").body("{"),
                    ));
                    probes.push((
                        "another content type",
                        request(true).header("content-type", "text/plain").body("x"),
                    ));
                    probes.push(("an empty object", request(true).json(&serde_json::json!({}))));
                } else {
                    probes.push(("authorised", request(true)));
                }
                if has_query {
                    let with_query = app
                        .client
                        .request(method.clone(), app.at(&format!("{concrete}?limit=lots")))
                        .bearer_auth(SUPER_ADMIN);
                    probes.push(("a bad query parameter", with_query));
                }
            }
            for (probe, request) in probes {
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                assert!(
                    !(status == 404 && body["code"] == "not_found") && status != 405,
                    "{method} {path} is documented but not served ({probe}: {status} {body})"
                );
                assert!(
                    documented.contains(&status),
                    "{method} {path} answered {status} to {probe}, which its documentation does not list ({documented:?}): {body}"
                );
                if status >= 400 {
                    for field in ["detail", "code", "request_id"] {
                        assert!(
                            body[field].is_string(),
                            "{method} {path} {status}: the error envelope lacks {field}: {body}"
                        );
                    }
                }
                probed += 1;
            }
        }
    }
    assert!(probed >= 35, "only {probed} probes");
}
