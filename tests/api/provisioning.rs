//! Team provisioning end to end against real Postgres and the stand-ins.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

pub(crate) const ORG: &str = "acme";

pub(crate) async fn provision(app: &TestApp, token: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.at("/api/v1/admin/provision/team"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Starts a run without waiting for it (`Prefer: respond-async`).
pub(crate) async fn provision_async(app: &TestApp, body: Value) -> reqwest::Response {
    app.client
        .post(app.at("/api/v1/admin/provision/team"))
        .bearer_auth(SUPER_ADMIN)
        .header("Prefer", "respond-async")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A step's detail (status, attempts, result, error) from a run's `step_details`.
pub(crate) fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["step_details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()
}

/// Reads a run as the super admin (who would take a held token).
pub(crate) async fn run_status(app: &TestApp, run_id: &str) -> Value {
    run_status_as(app, run_id, SUPER_ADMIN).await
}

pub(crate) async fn run_status_as(app: &TestApp, run_id: &str, token: &str) -> Value {
    json_of(
        app.client
            .get(app.at(&format!("/api/v1/admin/provision/runs/{run_id}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await
}

pub(crate) async fn wait_for_status(app: &TestApp, run_id: &str, status: &str) -> Value {
    wait_for_status_as(app, run_id, status, SUPER_ADMIN).await
}

pub(crate) async fn wait_for_status_as(app: &TestApp, run_id: &str, status: &str, token: &str) -> Value {
    eventually(30, &format!("run {run_id} to be {status}"), || async {
        let run = run_status_as(app, run_id, token).await;
        (run["status"] == status).then_some(run)
    })
    .await
}

#[tokio::test]
async fn provisions_a_shared_team_and_returns_the_token_once() {
    let app = TestApp::spawn().await;
    let response = provision(&app, SUPER_ADMIN, json!({"org_id": ORG, "team_node_id": "sre", "slack_channel_ids": ["C1"], "routing": {"github_repos": ["acme/api"]}})).await;
    assert_eq!(response.status(), 200);
    let run_id = response.headers()["x-incidentfox-provisioning-run-id"]
        .to_str()
        .unwrap()
        .to_string();
    let run = json_of(response).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["provisioning_run_id"], run_id);
    assert_eq!(run["team_id"], "sre");
    let token = run["team_token"].as_str().expect("token in the response");
    assert!(token.contains('.'));
    assert!(run["pipeline_bootstrap"]["run_id"].is_string(), "{run:#}");
    assert!(run["pipeline_cronjob"].is_null() && run["dedicated_deployment"].is_null());
    // The existing service's shape: steps keyed by name with `ok` and the step's output, `error`
    // a string (null here).
    assert_eq!(run["error"], Value::Null);
    assert_eq!(run["steps"]["config_patch"]["ok"], true);
    assert_eq!(
        run["steps"]["slack_channel_map"],
        json!({"ok": true, "count": 1, "source": "config_service"})
    );
    assert_eq!(run["steps"]["team_token"]["created"], true);
    assert_eq!(run["steps"]["bootstrap"]["run"], run["pipeline_bootstrap"]);
    assert!(
        run["steps"].get("pipeline_cronjob").is_none(),
        "a skipped step is not listed"
    );
    for name in ["config_patch", "team_token", "bootstrap"] {
        assert_eq!(step(&run, name)["status"], "succeeded", "{name}");
        assert_eq!(step(&run, name)["attempts"], 1, "{name}");
    }
    assert_eq!(step(&run, "pipeline_cronjob")["status"], "skipped");

    let config = app
        .stack
        .config_service
        .state()
        .node_config(ORG, "sre")
        .expect("team node created");
    assert_eq!(config["routing"]["slack_channel_ids"], json!(["C1"]));
    assert_eq!(config["routing"]["github_repos"], json!(["acme/api"]));
    assert_eq!(config["ai_pipeline"]["team_id"], "sre");
    assert_eq!(app.stack.config_service.state().issued_token_count(ORG, "sre"), 1);
    let bootstraps = app.stack.ai_pipeline.state().bootstraps();
    assert_eq!(bootstraps.len(), 1);
    assert_eq!(
        bootstraps[0].idempotency_key.as_deref(),
        Some(format!("{run_id}:bootstrap").as_str())
    );
    assert!(app.stack.kubernetes.state().objects("cronjobs").is_empty());

    // The caller got the secret; nobody gets it again, and it is not stored in plaintext.
    let again = run_status(&app, &run_id).await;
    assert!(again["team_token"].is_null() && again["team_token_held"] == false);
    let stored: Option<Vec<u8>> = sqlx::query_scalar("SELECT sealed_team_token FROM orchestrator_provisioning_runs")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(stored.is_none());
    let dump: String = sqlx::query_scalar("SELECT string_agg(t::text, ' ') FROM (SELECT r::text AS t FROM orchestrator_provisioning_runs r UNION ALL SELECT s::text FROM orchestrator_provisioning_steps s UNION ALL SELECT a::text FROM orchestrator_audit_events a) x")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(!dump.contains(token), "the token leaked into the database");
    assert!(!dump.contains(SUPER_ADMIN), "the admin token leaked into the database");
}

#[tokio::test]
async fn provisions_a_dedicated_team_with_a_schedule() {
    let app = TestApp::spawn().await;
    let response = provision(&app, SUPER_ADMIN, json!({"org_id": ORG, "team_node_id": "Big_Team.1", "pipeline_schedule": "*/30 * * * *", "deployment_mode": "dedicated"})).await;
    let run = json_of(response).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");

    let k8s = app.stack.kubernetes.state();
    let cronjob = k8s
        .get("cronjobs", "incidentfox", "ai-pipeline-acme-big-team-1")
        .expect("cronjob");
    assert_eq!(cronjob["spec"]["schedule"], "*/30 * * * *");
    assert_eq!(
        cronjob["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "incidentfox-orchestrator"
    );
    assert_eq!(
        cronjob["metadata"]["labels"]["incidentfox.io/team-node-id"],
        "big-team-1"
    );
    assert_eq!(cronjob["spec"]["concurrencyPolicy"], "Forbid");
    assert_eq!(run["pipeline_cronjob"]["name"], "ai-pipeline-acme-big-team-1");

    let deployment = k8s
        .get("deployments", "incidentfox", "agent-dedicated-acme-big-team-1")
        .expect("deployment");
    assert_eq!(
        deployment["metadata"]["labels"]["incidentfox.io/deployment-mode"],
        "dedicated"
    );
    assert!(k8s
        .get("services", "incidentfox", "agent-dedicated-acme-big-team-1")
        .is_some());
    let url = "http://agent-dedicated-acme-big-team-1.incidentfox.svc.cluster.local:8000";
    assert_eq!(run["dedicated_deployment"]["service_url"], url);
    let config = app.stack.config_service.state().node_config(ORG, "Big_Team.1").unwrap();
    assert_eq!(config["agent"]["dedicated_service_url"], url);
}

#[tokio::test]
async fn uses_the_team_config_schedule_and_keeps_long_names_within_52_characters() {
    let app = TestApp::spawn().await;
    let team = "a-very-long-team-name-that-would-overflow-the-limit";
    app.stack
        .config_service
        .state()
        .set_team_config(ORG, team, json!({"ai_pipeline": {"schedule": "15 4 * * *"}}));
    let run = json_of(
        provision(
            &app,
            SUPER_ADMIN,
            json!({"org_id": ORG, "team_node_id": team, "create_pipeline_schedule": true}),
        )
        .await,
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let name = run["pipeline_cronjob"]["name"].as_str().unwrap();
    assert!(name.len() <= 52, "{name}");
    assert_eq!(run["pipeline_cronjob"]["schedule"], "15 4 * * *");
    // An existing active token is kept, not duplicated.
    assert_eq!(app.stack.config_service.state().issued_token_count(ORG, team), 1);
    let again = json_of(
        provision(
            &app,
            SUPER_ADMIN,
            json!({"org_id": ORG, "team_node_id": team, "create_pipeline_schedule": true}),
        )
        .await,
    )
    .await;
    assert_eq!(again["status"], "succeeded");
    assert!(again["team_token"].is_null());
    assert_eq!(app.stack.config_service.state().issued_token_count(ORG, team), 1);
    assert_eq!(app.stack.kubernetes.state().objects("cronjobs").len(), 1);
}

#[tokio::test]
async fn transient_failures_are_retried_inside_each_step() {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_PROVISION_RETRY_INITIAL_MS".into(), "5".into());
        env.insert("ORCHESTRATOR_PROVISION_RETRY_MAX_MS".into(), "20".into());
    })
    .await;
    let stack = &app.stack;
    stack
        .config_service
        .faults()
        .fail_next_matching(Some("PUT"), "/config", 2, 503);
    stack
        .config_service
        .faults()
        .fail_next_matching(Some("POST"), "/tokens", 1, 429);
    stack.ai_pipeline.faults().drop_next(1);
    stack
        .kubernetes
        .faults()
        .fail_next_matching(Some("PATCH"), "/cronjobs", 2, 500);
    let run = json_of(
        provision(
            &app,
            SUPER_ADMIN,
            json!({"org_id": ORG, "team_node_id": "flaky", "create_pipeline_schedule": true}),
        )
        .await,
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(step(&run, "config_patch")["attempts"], 3);
    assert_eq!(step(&run, "team_token")["attempts"], 2);
    assert_eq!(step(&run, "bootstrap")["attempts"], 2);
    assert_eq!(step(&run, "pipeline_cronjob")["attempts"], 3);
    // Every failed attempt's error is kept, oldest first.
    let history = step(&run, "pipeline_cronjob")["attempt_errors"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(history.len(), 2, "{run:#}");
    assert!(
        history.iter().all(|e| e["code"] == "kubernetes_unavailable"),
        "{history:#?}"
    );
    let stored = run_status(&app, run["provisioning_run_id"].as_str().unwrap()).await;
    assert_eq!(step(&stored, "pipeline_cronjob")["attempt_errors"], json!(history));
    assert_eq!(
        step(&stored, "config_patch")["attempt_errors"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(stack.config_service.state().issued_token_count(ORG, "flaky"), 1);
    assert_eq!(stack.ai_pipeline.state().bootstraps().len(), 1);
}

#[tokio::test]
async fn a_permanent_failure_fails_the_run_and_retry_resumes_from_the_failed_step() {
    let app = TestApp::spawn().await;
    app.stack.ai_pipeline.faults().fail_next(1, 400);
    let response = provision(
        &app,
        SUPER_ADMIN,
        json!({"org_id": ORG, "team_node_id": "ops", "create_pipeline_schedule": true}),
    )
    .await;
    // A neighbour failed the run: 502, as the existing service answered, with its body.
    assert_eq!(response.status(), 502);
    let run = json_of(response).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["error_detail"]["step"], "bootstrap");
    assert_eq!(run["error_detail"]["code"], "neighbour_rejected");
    let error = run["error"].as_str().expect("the error is one line of text");
    assert!(error.starts_with("bootstrap: ai_pipeline answered 400"), "{error}");
    assert_eq!(run["steps"]["bootstrap"]["ok"], false);
    assert_eq!(run["steps"]["team_token"]["ok"], true);
    assert_eq!(run["steps"]["team_token"]["created"], true);
    assert!(
        run["steps"].get("pipeline_cronjob").is_none(),
        "a step that never ran is not listed"
    );
    assert_eq!(step(&run, "bootstrap")["attempts"], 1, "a 4xx is not retried");
    assert_eq!(step(&run, "pipeline_cronjob")["status"], "pending");
    let token = run["team_token"]
        .as_str()
        .expect("the token issued before the failure is still handed out")
        .to_string();
    let run_id = run["provisioning_run_id"].as_str().unwrap().to_string();

    let retried = app
        .client
        .post(app.at(&format!("/api/v1/admin/provision/runs/{run_id}/retry")))
        .bearer_auth(SUPER_ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    let retried = json_of(retried).await;
    assert_eq!(retried["status"], "succeeded", "{retried:#}");
    assert_eq!(retried["executions"], 2);
    assert_eq!(
        step(&retried, "team_token")["attempts"],
        1,
        "completed steps are not repeated"
    );
    assert_eq!(step(&retried, "bootstrap")["attempts"], 2);
    assert!(retried["team_token"].is_null());
    assert_eq!(app.stack.config_service.state().issued_token_count(ORG, "ops"), 1);
    assert_eq!(app.stack.kubernetes.state().objects("cronjobs").len(), 1);
    assert!(!token.is_empty());

    let again = app
        .client
        .post(app.at(&format!("/api/v1/admin/provision/runs/{run_id}/retry")))
        .bearer_auth(SUPER_ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    assert_eq!(json_of(again).await["code"], "run_not_failed");
}

#[tokio::test]
async fn rollback_undoes_completed_steps_in_reverse() {
    let app = TestApp::spawn().await;
    app.stack
        .kubernetes
        .faults()
        .fail_next_matching(Some("PATCH"), "/deployments", 1, 403);
    let run = json_of(
        provision(&app, SUPER_ADMIN, json!({"org_id": ORG, "team_node_id": "doomed", "create_pipeline_schedule": true, "deployment_mode": "dedicated", "rollback_on_failure": true})).await,
    )
    .await;
    assert_eq!(run["status"], "rolled_back", "{run:#}");
    assert_eq!(run["error_detail"]["step"], "dedicated_deployment");
    assert_eq!(step(&run, "pipeline_cronjob")["status"], "rolled_back");
    assert_eq!(step(&run, "team_token")["status"], "rolled_back");
    assert!(
        app.stack.kubernetes.state().objects("cronjobs").is_empty(),
        "the CronJob was deleted"
    );
    let tokens = app.stack.config_service.state().team_tokens(ORG, "doomed");
    assert_eq!(tokens.len(), 1);
    assert!(tokens[0].revoked_at.is_some(), "the issued token was revoked");
    assert!(run["team_token"].is_null(), "a revoked token is not handed out");
}

#[tokio::test]
async fn idempotent_replay_returns_the_same_run_and_key_reuse_is_refused() {
    let app = TestApp::spawn().await;
    let body = json!({"org_id": ORG, "team_node_id": "idem", "idempotency_key": "k-1"});
    let first = json_of(provision(&app, SUPER_ADMIN, body.clone()).await).await;
    assert_eq!(first["status"], "succeeded");
    let replay = provision(&app, SUPER_ADMIN, body.clone()).await;
    assert_eq!(replay.status(), 200);
    let replay = json_of(replay).await;
    assert_eq!(replay["provisioning_run_id"], first["provisioning_run_id"]);
    assert!(replay["team_token"].is_null(), "the secret is shown once");
    assert_eq!(app.stack.config_service.state().issued_token_count(ORG, "idem"), 1);
    assert_eq!(app.stack.ai_pipeline.state().bootstraps().len(), 1);

    let reused = provision(
        &app,
        SUPER_ADMIN,
        json!({"org_id": ORG, "team_node_id": "idem", "idempotency_key": "k-1", "deployment_mode": "dedicated"}),
    )
    .await;
    assert_eq!(reused.status(), 422);
    assert_eq!(json_of(reused).await["code"], "idempotency_key_reused");

    // Keys are scoped to the team: the same key for another team is a new run.
    let other = json_of(
        provision(
            &app,
            SUPER_ADMIN,
            json!({"org_id": ORG, "team_node_id": "idem-2", "idempotency_key": "k-1"}),
        )
        .await,
    )
    .await;
    assert_ne!(other["provisioning_run_id"], first["provisioning_run_id"]);
}

#[tokio::test]
async fn replay_while_running_returns_the_running_run_without_repeating_it() {
    let app = TestApp::spawn().await;
    app.stack.ai_pipeline.faults().set_latency(Duration::from_millis(800));
    let body = json!({"org_id": ORG, "team_node_id": "slow", "idempotency_key": "k-slow"});
    let first = provision_async(&app, body.clone()).await;
    assert_eq!(first.status(), 202);
    assert!(first.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/api/v1/admin/provision/runs/"));
    let first = json_of(first).await;
    let replay = provision_async(&app, body.clone()).await;
    assert_eq!(replay.status(), 202);
    assert_eq!(
        json_of(replay).await["provisioning_run_id"],
        first["provisioning_run_id"]
    );
    let done = json_of(provision(&app, SUPER_ADMIN, body).await).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(app.stack.ai_pipeline.state().bootstraps().len(), 1);
}

#[tokio::test]
async fn the_one_time_token_is_handed_out_by_the_runs_endpoint_when_the_caller_did_not_wait() {
    // Scoped permissions, so the read-only admin may read runs.
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_REQUIRE_ADMIN_STAR".into(), "0".into());
    })
    .await;
    app.stack.ai_pipeline.faults().set_latency(Duration::from_millis(300));
    let response = provision_async(&app, json!({"org_id": ORG, "team_node_id": "later"})).await;
    assert_eq!(response.status(), 202);
    let run_id = json_of(response).await["provisioning_run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let run = wait_for_status_as(&app, &run_id, "succeeded", "dev-readonly-acme").await;
    // The read-only admin polled it: it sees that a token is held but never the secret.
    assert!(run["team_token"].is_null());
    assert_eq!(run["team_token_held"], true);

    let get = |token: &'static str| {
        let app = &app;
        let run_id = run_id.clone();
        async move {
            json_of(
                app.client
                    .get(app.at(&format!("/api/v1/admin/provision/runs/{run_id}")))
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let first = get("dev-org-admin-acme").await;
    assert!(
        first["team_token"].as_str().is_some_and(|t| t.contains('.')),
        "{first:#}"
    );
    let second = get("dev-org-admin-acme").await;
    assert!(second["team_token"].is_null());
    assert_eq!(second["team_token_held"], false);
}

#[tokio::test]
async fn a_crashed_run_is_resumed_by_another_instance_without_repeating_side_effects() {
    let fast_resume = |env: &mut std::collections::HashMap<String, String>| {
        env.insert("ORCHESTRATOR_PROVISION_RESUME_INTERVAL_MS".into(), "200".into());
    };
    // Crash while each of three different steps is in flight.
    for (crash_in, team) in [
        ("team_token", "crash-a"),
        ("bootstrap", "crash-b"),
        ("pipeline_cronjob", "crash-c"),
    ] {
        let app = TestApp::spawn_with(fast_resume).await;
        let slow = Duration::from_millis(1500);
        match crash_in {
            "team_token" => app.stack.config_service.faults().set_latency(slow),
            "bootstrap" => app.stack.ai_pipeline.faults().set_latency(slow),
            _ => app.stack.kubernetes.faults().set_latency(slow),
        }
        let response = provision_async(
            &app,
            json!({"org_id": ORG, "team_node_id": team, "create_pipeline_schedule": true}),
        )
        .await;
        let run_id = json_of(response).await["provisioning_run_id"]
            .as_str()
            .unwrap()
            .to_string();
        // The step's call has reached its neighbour (and is held there): the crash comes while
        // it is in flight.
        eventually(30, "the step's call to be in flight", || async {
            let calls = match crash_in {
                "team_token" => app.stack.config_service.calls_to("POST", "/tokens"),
                "bootstrap" => app.stack.ai_pipeline.calls_to("POST", "/bootstrap"),
                _ => app.stack.kubernetes.calls_to("*", "/cronjobs"),
            };
            (!calls.is_empty()).then_some(())
        })
        .await;
        let successor = app.another(fast_resume).await;
        app.stack.config_service.faults().reset();
        app.stack.ai_pipeline.faults().reset();
        app.stack.kubernetes.faults().reset();
        app.crash();

        let run = wait_for_status(&successor, &run_id, "succeeded").await;
        assert!(run["executions"].as_i64().unwrap() >= 2, "{run:#}");
        assert_eq!(
            successor.stack.config_service.state().issued_token_count(ORG, team),
            1,
            "{crash_in}: one token"
        );
        assert_eq!(
            successor.stack.ai_pipeline.state().bootstraps().len(),
            1,
            "{crash_in}: one bootstrap per key"
        );
        assert_eq!(
            successor.stack.kubernetes.state().objects("cronjobs").len(),
            1,
            "{crash_in}: one CronJob"
        );
        successor.stop().await;
    }
}

#[tokio::test]
async fn two_instances_and_fifty_concurrent_requests_for_one_team_all_get_a_correct_answer() {
    let first = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_PROVISION_LOCK_TIMEOUT_SECONDS".into(), "2".into());
    })
    .await;
    let second = first
        .another(|env| {
            env.insert("ORCHESTRATOR_PROVISION_LOCK_TIMEOUT_SECONDS".into(), "2".into());
        })
        .await;
    first.stack.ai_pipeline.faults().set_latency(Duration::from_millis(20));
    let requests = (0..50).map(|i| {
        let app = if i % 2 == 0 { &first } else { &second };
        provision(app, SUPER_ADMIN, json!({"org_id": ORG, "team_node_id": "contended"}))
    });
    let mut ok = 0;
    let mut busy = 0;
    for response in futures::future::join_all(requests).await {
        let status = response.status().as_u16();
        let body = json_of(response).await;
        match status {
            200 => {
                assert_eq!(body["status"], "succeeded", "{body:#}");
                ok += 1;
            }
            409 => {
                assert_eq!(body["code"], "team_busy", "{body:#}");
                busy += 1;
            }
            other => panic!("unexpected {other}: {body:#}"),
        }
    }
    assert_eq!(ok + busy, 50);
    assert!(ok >= 1);
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orchestrator_provisioning_runs WHERE status = 'running'")
            .fetch_one(&first.db.pool)
            .await
            .unwrap();
    assert_eq!(running, 0, "no run left running");
    assert_eq!(
        first.stack.config_service.state().issued_token_count(ORG, "contended"),
        1
    );
    assert_eq!(first.get("/health").await.status(), 200, "the pool survived");
}

#[tokio::test]
async fn a_busy_team_answers_409_with_the_run_in_progress() {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_PROVISION_LOCK_TIMEOUT_SECONDS".into(), "0".into());
    })
    .await;
    app.stack.ai_pipeline.faults().set_latency(Duration::from_millis(1500));
    let first = provision_async(&app, json!({"org_id": ORG, "team_node_id": "busy"})).await;
    let run_id = json_of(first).await["provisioning_run_id"].clone();
    let second = provision(&app, SUPER_ADMIN, json!({"org_id": ORG, "team_node_id": "busy"})).await;
    assert_eq!(second.status(), 409);
    assert_eq!(
        second.headers()["x-incidentfox-provisioning-run-id"].to_str().unwrap(),
        run_id.as_str().unwrap()
    );
    let body = json_of(second).await;
    assert_eq!(body["code"], "team_busy");
    assert_eq!(body["provisioning_run_id"], run_id);
}

#[tokio::test]
async fn authorization_matrix() {
    let app = TestApp::spawn().await;
    let body = |org: &str| json!({"org_id": org, "team_node_id": "authz"});
    let anonymous = app
        .client
        .post(app.at("/api/v1/admin/provision/team"))
        .json(&body(ORG))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(json_of(anonymous).await["code"], "missing_token");
    let bad = provision(&app, "not-a-token", body(ORG)).await;
    assert_eq!(bad.status(), 401);
    assert_eq!(json_of(bad).await["code"], "invalid_token");
    let team = provision(&app, "dev-team-token", body(ORG)).await;
    assert_eq!(team.status(), 403);
    assert_eq!(json_of(team).await["code"], "not_admin");
    let other_org = provision(&app, "dev-org-admin-globex", body(ORG)).await;
    assert_eq!(other_org.status(), 403);
    assert_eq!(json_of(other_org).await["code"], "org_forbidden");
    let readonly = provision(&app, "dev-readonly-acme", body(ORG)).await;
    assert_eq!(readonly.status(), 403);
    assert_eq!(json_of(readonly).await["code"], "missing_permission");
    let scoped_strict = provision(&app, "dev-scoped-acme", body(ORG)).await;
    assert_eq!(scoped_strict.status(), 403, "admin:* is required by default");

    let via_header = app
        .client
        .post(app.at("/api/v1/admin/provision/team"))
        .header("X-Admin-Token", "dev-org-admin-acme")
        .json(&body(ORG))
        .send()
        .await
        .unwrap();
    assert_eq!(via_header.status(), 200);
    let run_id = json_of(via_header).await["provisioning_run_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Another org's run does not exist for an org admin; lists are confined to the own org.
    let foreign = app
        .client
        .get(app.at(&format!("/api/v1/admin/provision/runs/{run_id}")))
        .bearer_auth("dev-org-admin-globex")
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 404);
    let list = json_of(
        app.client
            .get(app.at("/api/v1/admin/provision/runs"))
            .bearer_auth("dev-org-admin-globex")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    let asked = app
        .client
        .get(app.at("/api/v1/admin/provision/runs?org_id=acme"))
        .bearer_auth("dev-org-admin-globex")
        .send()
        .await
        .unwrap();
    assert_eq!(asked.status(), 403);
    let malformed = app
        .client
        .get(app.at("/api/v1/admin/provision/runs/not-a-uuid"))
        .bearer_auth(SUPER_ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);

    let relaxed = app
        .another(|env| {
            env.insert("ORCHESTRATOR_REQUIRE_ADMIN_STAR".into(), "0".into());
        })
        .await;
    // The config service down is 503, never a 500 or a 401. (A fresh instance: nothing cached.)
    app.stack
        .config_service
        .faults()
        .fail_next_matching(None, "/auth/me", 1, 503);
    let down = provision(&relaxed, "dev-org-admin-globex", body("globex")).await;
    assert_eq!(down.status(), 503);
    assert_eq!(json_of(down).await["code"], "config_service_unavailable");

    let scoped = provision(
        &relaxed,
        "dev-scoped-acme",
        json!({"org_id": ORG, "team_node_id": "authz-2"}),
    )
    .await;
    assert_eq!(scoped.status(), 200);
    let readonly_list = relaxed
        .client
        .get(relaxed.at("/api/v1/admin/provision/runs"))
        .bearer_auth("dev-readonly-acme")
        .send()
        .await
        .unwrap();
    assert_eq!(readonly_list.status(), 200);
    assert_eq!(json_of(readonly_list).await["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn runs_list_paginates_and_audit_records_every_run() {
    let app = TestApp::spawn().await;
    for i in 0..5 {
        let response = provision(
            &app,
            SUPER_ADMIN,
            json!({"org_id": ORG, "team_node_id": format!("page-{i}")}),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/admin/provision/runs?limit=2&cursor={c}"),
            None => "/api/v1/admin/provision/runs?limit=2".into(),
        };
        let page = app.admin_json(&path).await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["team_node_id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, vec!["page-4", "page-3", "page-2", "page-1", "page-0"]);

    let audit = app.admin_json("/api/v1/admin/audit?org_id=acme&limit=100").await;
    let items = audit["items"].as_array().unwrap();
    assert_eq!(items.iter().filter(|e| e["action"] == "provision.requested").count(), 5);
    assert_eq!(
        items
            .iter()
            .filter(|e| e["action"] == "provision.completed" && e["outcome"] == "succeeded")
            .count(),
        5
    );
    assert!(items.iter().all(|e| e["actor_subject"] == "super-admin"));
    let foreign = json_of(
        app.client
            .get(app.at("/api/v1/admin/audit"))
            .bearer_auth("dev-org-admin-globex")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(foreign["items"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn bad_bodies_get_the_json_error_shape() {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_BODY_LIMIT_BYTES".into(), "2048".into());
    })
    .await;
    let url = app.at("/api/v1/admin/provision/team");
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            app.client
                .post(&url)
                .bearer_auth(SUPER_ADMIN)
                .header("content-type", "application/json")
                .body("{not json"),
            400,
            "malformed_json",
        ),
        (
            app.client
                .post(&url)
                .bearer_auth(SUPER_ADMIN)
                .header("content-type", "text/plain")
                .body("{}"),
            415,
            "unsupported_media_type",
        ),
        (
            app.client
                .post(&url)
                .bearer_auth(SUPER_ADMIN)
                .json(&json!({"org_id": ORG, "team_node_id": "bad team"})),
            422,
            "invalid_field",
        ),
        (
            app.client
                .post(&url)
                .bearer_auth(SUPER_ADMIN)
                .json(&json!({"org_id": ORG, "team_node_id": "x", "pad": "y".repeat(4096)})),
            413,
            "payload_too_large",
        ),
    ];
    for (request, status, code) in cases {
        let response = request.header("X-Request-Id", "shape-1").send().await.unwrap();
        assert_eq!(response.status(), status, "{code}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = json_of(response).await;
        assert_eq!(body["code"], code, "{body}");
        assert_eq!(body["request_id"], "shape-1");
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let invalid = json_of(
        app.client
            .post(&url)
            .bearer_auth(SUPER_ADMIN)
            .json(&json!({"org_id": ORG, "team_node_id": "ok", "pipeline_schedule": "every day"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(invalid["field"], "pipeline_schedule");
}

#[tokio::test]
async fn graceful_shutdown_finishes_an_in_flight_request() {
    let mut app = TestApp::spawn().await;
    app.stack.ai_pipeline.faults().set_latency(Duration::from_millis(700));
    let client = app.client.clone();
    let url = app.at("/api/v1/admin/provision/team");
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .bearer_auth(SUPER_ADMIN)
            .json(&json!({"org_id": ORG, "team_node_id": "drain"}))
            .send()
            .await
    });
    eventually(10, "the bootstrap call to start", || async {
        (!app.stack.ai_pipeline.calls_to("POST", "/bootstrap").is_empty()).then_some(())
    })
    .await;
    let stopped = app.signal_stop();
    let response = in_flight.await.unwrap().expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
    assert_eq!(json_of(response).await["status"], "succeeded");
    stopped.await.unwrap();
    let refused = app.client.get(app.at("/health")).send().await;
    assert!(refused.is_err(), "no longer accepting");
}

#[tokio::test]
async fn a_token_issued_by_an_attempt_that_died_before_sealing_it_is_replaced() {
    use orchestrator::provisioning::request::{ProvisionRequest, TeamSpec};
    use orchestrator::provisioning::store;
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_PROVISION_RESUME_INTERVAL_MS".into(), "200".into());
    })
    .await;
    let team = "orphaned";
    app.stack.config_service.state().set_team_config(ORG, team, json!({}));
    // The crashed attempt: it recorded that the team had no tokens, then the config service
    // issued one, and the process died before sealing the secret.
    let issued = app
        .client
        .post(format!(
            "{}/api/v1/admin/orgs/{ORG}/teams/{team}/tokens",
            app.stack.config_service.url()
        ))
        .bearer_auth(SUPER_ADMIN)
        .send()
        .await
        .unwrap();
    assert!(issued.status().is_success());
    let lost_id = app.stack.config_service.state().team_tokens(ORG, team)[0]
        .token_id
        .clone();
    let request = ProvisionRequest::parse(&json!({"org_id": ORG, "team_node_id": team})).unwrap();
    let run_id = uuid::Uuid::now_v7();
    let mut conn = app.db.pool.acquire().await.unwrap();
    let spec = TeamSpec::resolve(None, &request);
    store::insert_run(
        &mut conn,
        store::NewRun::provision(run_id, &request, &spec, "super-admin", 3600.0),
    )
    .await
    .unwrap();
    sqlx::query("UPDATE orchestrator_provisioning_steps SET status = 'succeeded' WHERE run_id = $1 AND position = 0")
        .bind(run_id)
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("UPDATE orchestrator_provisioning_steps SET status = 'running', attempts = 1, result = $2 WHERE run_id = $1 AND position = 1")
        .bind(run_id)
        .bind(json!({"issuing": true, "known_token_ids": []}))
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("UPDATE orchestrator_provisioning_runs SET updated_at = now() - interval '1 minute' WHERE id = $1")
        .bind(run_id)
        .execute(&mut *conn)
        .await
        .unwrap();

    eventually(30, "the resumed run to finish", || async {
        let status: String = sqlx::query_scalar("SELECT status FROM orchestrator_provisioning_runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        (status == "succeeded").then_some(())
    })
    .await;
    let tokens = app.stack.config_service.state().team_tokens(ORG, team);
    assert_eq!(tokens.len(), 2, "the orphan was replaced by one new token");
    let lost = tokens.iter().find(|t| t.token_id == lost_id).unwrap();
    assert!(
        lost.revoked_at.is_some(),
        "the token whose secret nobody holds was revoked"
    );
    let fresh = tokens.iter().find(|t| t.token_id != lost_id).unwrap();
    assert!(fresh.revoked_at.is_none());
    let run = run_status(&app, &run_id.to_string()).await;
    let token = run["team_token"].as_str().expect("the new token is handed out once");
    assert!(token.starts_with(&format!("{}.", fresh.token_id)));
    assert_eq!(step(&run, "team_token")["result"]["revoked_orphans"], json!([lost_id]));
}

#[tokio::test]
async fn a_permanent_failure_of_any_step_fails_the_run_at_that_step_without_retrying() {
    let cases: [(&str, &str, Option<&str>, &str, u16); 5] = [
        ("config_patch", "config", Some("PUT"), "/config", 400),
        ("team_token", "config", Some("POST"), "/tokens", 400),
        ("bootstrap", "pipeline", Some("POST"), "/bootstrap", 400),
        ("pipeline_cronjob", "kubernetes", Some("PATCH"), "/cronjobs", 422),
        ("dedicated_deployment", "kubernetes", Some("PATCH"), "/services", 403),
    ];
    let app = TestApp::spawn().await;
    for (i, (step_name, stand_in, method, path, status)) in cases.into_iter().enumerate() {
        let faults = match stand_in {
            "config" => app.stack.config_service.faults(),
            "pipeline" => app.stack.ai_pipeline.faults(),
            _ => app.stack.kubernetes.faults(),
        };
        faults.fail_next_matching(method, path, 1, status);
        let team = format!("permanent-{i}");
        let body = json!({"org_id": ORG, "team_node_id": team, "create_pipeline_schedule": true, "deployment_mode": "dedicated"});
        let run = json_of(provision(&app, SUPER_ADMIN, body).await).await;
        assert_eq!(run["status"], "failed", "{step_name}: {run:#}");
        assert_eq!(run["error_detail"]["step"], step_name);
        assert_eq!(step(&run, step_name)["status"], "failed");
        assert_eq!(
            step(&run, step_name)["attempts"],
            1,
            "{step_name}: a 4xx is not retried"
        );
        faults.reset();
    }
    // And a transient failure of the last step is retried like the others.
    // (kube-rs itself retries 429, 503 and 504; a 500 is left to the workflow.)
    app.stack
        .kubernetes
        .faults()
        .fail_next_matching(Some("PATCH"), "/services", 1, 500);
    let run = json_of(
        provision(
            &app,
            SUPER_ADMIN,
            json!({"org_id": ORG, "team_node_id": "transient-dedicated", "deployment_mode": "dedicated"}),
        )
        .await,
    )
    .await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(step(&run, "dedicated_deployment")["attempts"], 2);
}

#[tokio::test]
async fn a_team_whose_name_sanitises_like_another_cannot_take_over_its_objects() {
    let app = TestApp::spawn().await;
    let first = json_of(
        provision(
            &app,
            SUPER_ADMIN,
            json!({"org_id": ORG, "team_node_id": "eu-sre", "pipeline_schedule": "0 1 * * *"}),
        )
        .await,
    )
    .await;
    assert_eq!(first["status"], "succeeded", "{first:#}");
    // "eu_sre" sanitises to the same object name, "ai-pipeline-acme-eu-sre".
    let second = json_of(
        provision(&app, SUPER_ADMIN, json!({"org_id": ORG, "team_node_id": "eu_sre", "pipeline_schedule": "0 9 * * *", "rollback_on_failure": true})).await,
    )
    .await;
    assert_eq!(second["status"], "rolled_back", "{second:#}");
    assert_eq!(second["error_detail"]["code"], "kubernetes_name_taken");
    let cronjob = app
        .stack
        .kubernetes
        .state()
        .get("cronjobs", "incidentfox", "ai-pipeline-acme-eu-sre")
        .expect("still there");
    assert_eq!(
        cronjob["spec"]["schedule"], "0 1 * * *",
        "the first team's CronJob is untouched"
    );
    assert_eq!(
        cronjob["metadata"]["annotations"]["incidentfox.io/team-node-id"],
        "eu-sre"
    );
}

#[tokio::test]
async fn a_run_whose_lock_session_dies_is_resumed_once_and_completes() {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_PROVISION_RESUME_INTERVAL_MS".into(), "200".into());
    })
    .await;
    app.stack.ai_pipeline.faults().set_latency(Duration::from_millis(1500));
    let response = provision_async(
        &app,
        json!({"org_id": ORG, "team_node_id": "lost-lock", "create_pipeline_schedule": true}),
    )
    .await;
    let run_id = json_of(response).await["provisioning_run_id"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(20, "the bootstrap to be in flight", || async {
        (!app.stack.ai_pipeline.calls_to("POST", "/bootstrap").is_empty()).then_some(())
    })
    .await;
    // A failover or an idle-session killer ends the session that holds the advisory lock.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
         WHERE l.locktype = 'advisory' AND d.datname = current_database()) t",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    app.stack.ai_pipeline.faults().reset();
    let run = wait_for_status(&app, &run_id, "succeeded").await;
    assert!(run["executions"].as_i64().unwrap() >= 2, "{run:#}");
    assert_eq!(app.stack.config_service.state().issued_token_count(ORG, "lost-lock"), 1);
    assert_eq!(app.stack.ai_pipeline.state().bootstraps().len(), 1);
    assert_eq!(app.stack.kubernetes.state().objects("cronjobs").len(), 1);
}

/// An app whose resumer scanned at start-up and then sleeps: an orphan inserted now waits.
pub(crate) async fn app_with_a_sleeping_resumer() -> TestApp {
    TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_PROVISION_RESUME_INTERVAL_MS".into(), "600000".into());
    })
    .await
}

/// A provisioning run left `running` by an owner that died before its first step.
pub(crate) async fn insert_orphan(app: &TestApp, team: &str) -> uuid::Uuid {
    use orchestrator::provisioning::request::{ProvisionRequest, TeamSpec};
    use orchestrator::provisioning::store;
    let request = ProvisionRequest::parse(&json!({"org_id": ORG, "team_node_id": team})).unwrap();
    let spec = TeamSpec::resolve(None, &request);
    let orphan = uuid::Uuid::now_v7();
    let mut conn = app.db.pool.acquire().await.unwrap();
    store::insert_run(
        &mut conn,
        store::NewRun::provision(orphan, &request, &spec, "someone", 3600.0),
    )
    .await
    .unwrap();
    orphan
}

#[tokio::test]
async fn an_orphaned_run_is_resumed_before_a_newer_run_can_start() {
    let app = app_with_a_sleeping_resumer().await;
    let orphan = insert_orphan(&app, "haunted").await;
    let response = provision(
        &app,
        SUPER_ADMIN,
        json!({"org_id": ORG, "team_node_id": "haunted", "create_pipeline_schedule": true}),
    )
    .await;
    assert_eq!(response.status(), 409);
    assert_eq!(json_of(response).await["provisioning_run_id"], orphan.to_string());
    // Once a resumer finishes it, newer runs go ahead.
    let resumer = app
        .another(|env| {
            env.insert("ORCHESTRATOR_PROVISION_RESUME_INTERVAL_MS".into(), "200".into());
        })
        .await;
    wait_for_status(&resumer, &orphan.to_string(), "succeeded").await;
    let newer = json_of(
        provision(
            &app,
            SUPER_ADMIN,
            json!({"org_id": ORG, "team_node_id": "haunted", "create_pipeline_schedule": true}),
        )
        .await,
    )
    .await;
    assert_eq!(newer["status"], "succeeded", "{newer:#}");
}
