//! The agent-run proxy and the internal Slack trigger.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

fn body(team: &str) -> Value {
    json!({"org_id": "acme", "team_node_id": team, "agent_name": "planner", "message": "hello", "context": {"k": 1}, "timeout": 5})
}

async fn run(app: &TestApp, token: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(app.at("/api/v1/admin/agents/run"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn agent_run_rows(app: &TestApp) -> Vec<(String, Option<Value>)> {
    sqlx::query_as("SELECT status, error FROM orchestrator_agent_runs ORDER BY started_at")
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

fn team(app: &TestApp, name: &str) {
    app.stack
        .config_service
        .state()
        .set_team_config("acme", name, json!({}));
}

#[tokio::test]
async fn runs_the_agent_with_a_minted_team_credential_and_audits_it() {
    let app = TestApp::spawn().await;
    team(&app, "sre");
    let response = run(&app, SUPER_ADMIN, &body("sre")).await;
    assert_eq!(response.status(), 200);
    let answer = json_of(response).await;
    assert_eq!(answer["team_node_id"], "sre");
    assert_eq!(answer["agent_name"], "planner");
    assert_eq!(answer["agent_result"]["success"], true);
    assert_eq!(answer["agent_result"]["output"], "echo: hello");

    let call = &app.stack.agent.calls_to("POST", "/agents/planner/run")[0];
    let team_token = call.headers["x-incidentfox-team-token"].clone();
    assert_ne!(team_token, SUPER_ADMIN, "the admin's token never reaches the agent");
    assert_eq!(
        call.headers["x-correlation-id"],
        answer["correlation_id"].as_str().unwrap()
    );
    assert_eq!(call.body["context"], json!({"k": 1}));
    assert!(
        !answer.to_string().contains(&team_token),
        "the team credential never reaches the caller"
    );

    assert_eq!(call.body["trigger_source"], "api");
    assert!(
        call.body.get("output_destinations").is_none(),
        "the caller gets the answer: the agent posts it nowhere"
    );

    // The run is opened in the platform audit as contracts.md gives it, and closed off the
    // response path with a status of its vocabulary, in both audits.
    let opened = &app.stack.config_service.calls_to("POST", "/unified-audit/agent-runs")[0].body;
    assert_eq!(opened["run_id"], answer["run_id"]);
    assert_eq!(opened["trigger_source"], "api");
    assert_eq!(opened["trigger_message"], "hello");
    assert_eq!(opened["trigger_channel_id"], Value::Null);
    assert_eq!(opened["metadata"], json!({"context": {"k": 1}}));
    let audit = eventually(5, "the platform audit to close", || async {
        let audit = app.stack.config_service.state().audit_runs();
        (audit.len() == 1 && audit[0]["status"] == "completed").then_some(audit)
    })
    .await;
    assert_eq!(audit[0]["id"], answer["run_id"]);
    assert_eq!(audit[0]["output_summary"], "echo: hello");
    assert!(audit[0]["completed_at"].is_string());
    eventually(5, "the run to close", || async {
        (agent_run_rows(&app).await == vec![("succeeded".to_string(), None)]).then_some(())
    })
    .await;
    // The connection the run was recorded on is kept for the next run, not in the pool: a
    // graceful shutdown gives it back before closing the pool, whose close can wait for the
    // connections taken from it (the inbox's and outcomes' kept connections once made a
    // shutdown wait forever).
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the service stopped after a proxied run");
}

#[tokio::test]
async fn a_team_credential_is_kept_for_the_admin_who_minted_it_only() {
    let app = TestApp::spawn().await;
    team(&app, "sre");
    let mints = || app.stack.config_service.calls_to("POST", "/impersonation-token").len();
    assert_eq!(run(&app, SUPER_ADMIN, &body("sre")).await.status(), 200);
    assert_eq!(run(&app, SUPER_ADMIN, &body("sre")).await.status(), 200);
    assert_eq!(mints(), 1, "the same admin's second run reuses its credential");
    assert_eq!(run(&app, "dev-org-admin-acme", &body("sre")).await.status(), 200);
    assert_eq!(mints(), 2, "another admin never gets the first one's credential");
    let tokens: Vec<String> = app
        .stack
        .agent
        .calls_to("POST", "/agents/planner/run")
        .iter()
        .map(|c| c.headers["x-incidentfox-team-token"].clone())
        .collect();
    assert_eq!(tokens[0], tokens[1]);
    assert_ne!(tokens[1], tokens[2]);

    // The agent refuses the credential (revoked early): the next run mints a new one.
    app.stack
        .agent
        .faults()
        .fail_next_matching(Some("POST"), "/agents/", 1, 401);
    assert_eq!(run(&app, SUPER_ADMIN, &body("sre")).await.status(), 502);
    assert_eq!(run(&app, SUPER_ADMIN, &body("sre")).await.status(), 200);
    assert_eq!(mints(), 3);

    // Without the admin cache, nothing minted is kept either.
    let uncached = app
        .another(|env| {
            env.insert("ORCHESTRATOR_ADMIN_AUTH_CACHE_TTL_SECONDS".into(), "0".into());
        })
        .await;
    assert_eq!(run(&uncached, SUPER_ADMIN, &body("sre")).await.status(), 200);
    assert_eq!(run(&uncached, SUPER_ADMIN, &body("sre")).await.status(), 200);
    assert_eq!(mints(), 5);
}

/// Holds the agent-run table locked until told to let go, so a run's record waits.
async fn hold_runs_table(app: &TestApp) -> (sqlx::Transaction<'static, sqlx::Postgres>, i32) {
    let mut tx = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE orchestrator_agent_runs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    (tx, pid)
}

/// Starts a run in the background, as a client that waits for its answer.
fn spawn_run(app: &TestApp, body: Value) -> tokio::task::JoinHandle<reqwest::Response> {
    let (client, url) = (app.client.clone(), app.at("/api/v1/admin/agents/run"));
    tokio::spawn(async move {
        client
            .post(url)
            .bearer_auth(SUPER_ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap()
    })
}

/// The backend whose statement waits for the lock held by `holder`.
async fn waiting_behind(app: &TestApp, holder: i32) -> i32 {
    eventually(5, "the run's record to wait for the lock", || async {
        sqlx::query_scalar::<_, i32>("SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
            .bind(holder)
            .fetch_optional(&app.db.pool)
            .await
            .unwrap()
    })
    .await
}

#[tokio::test]
async fn the_record_and_the_agent_call_overlap_but_nothing_is_answered_before_the_record() {
    let app = TestApp::spawn().await;
    team(&app, "sre");
    // Warm: the team's credential and a kept connection, as in steady use.
    assert_eq!(run(&app, SUPER_ADMIN, &body("sre")).await.status(), 200);

    // The record waits; the agent is called meanwhile, and its answer waits for the record.
    let (held, holder) = hold_runs_table(&app).await;
    let running = spawn_run(&app, body("sre"));
    waiting_behind(&app, holder).await;
    eventually(5, "the agent to be called while the record waits", || async {
        (app.stack.agent.state().runs_completed() == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running.is_finished(), "answered before the run was on record");
    held.commit().await.unwrap();
    let response = running.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(agent_run_rows(&app).await.len(), 2);

    // A record that fails cancels the call still under way, and the caller gets a 503.
    app.stack.agent.state().set_delay(Duration::from_secs(5));
    let (held, holder) = hold_runs_table(&app).await;
    let running = spawn_run(&app, body("sre"));
    let recording = waiting_behind(&app, holder).await;
    eventually(5, "the agent to be called", || async {
        (app.stack.agent.state().in_flight() == 1).then_some(())
    })
    .await;
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(recording)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let response = running.await.unwrap();
    assert_eq!(response.status(), 503, "{:?}", response.text().await);
    eventually(5, "the agent call to be cancelled", || async {
        (app.stack.agent.state().runs_cancelled() == 1).then_some(())
    })
    .await;
    held.rollback().await.unwrap();
    assert_eq!(agent_run_rows(&app).await.len(), 2, "the failed run is not on record");
}

#[tokio::test]
async fn a_run_whose_opening_was_lost_is_recorded_whole_when_it_closes() {
    // The opening's commit does not wait for the WAL flush: a database crash right after it can
    // lose the row. Deleting it while the agent works stands for that crash.
    let app = TestApp::spawn().await;
    team(&app, "sre");
    app.stack.agent.state().set_delay(Duration::from_millis(800));
    let request = body("sre");
    let running = run(&app, SUPER_ADMIN, &request);
    let lose_opening = async {
        eventually(5, "the run to open", || async {
            (!agent_run_rows(&app).await.is_empty()).then_some(())
        })
        .await;
        sqlx::query("DELETE FROM orchestrator_agent_runs")
            .execute(&app.db.pool)
            .await
            .unwrap();
    };
    let (response, ()) = tokio::join!(running, lose_opening);
    let answer = json_of(response).await;
    let row: (String, String, String, i64, bool) = eventually(5, "the run to be recorded again", || async {
        sqlx::query_as(
            "SELECT status, team_node_id, agent_name, duration_ms,
                    finished_at - started_at BETWEEN interval '700 ms' AND interval '5 s'
             FROM orchestrator_agent_runs WHERE id = $1",
        )
        .bind(uuid::Uuid::parse_str(answer["run_id"].as_str().unwrap()).unwrap())
        .fetch_optional(&app.db.pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(
        (row.0.as_str(), row.1.as_str(), row.2.as_str(), row.4),
        ("succeeded", "sre", "planner", true),
        "{row:?}"
    );
    assert!(row.3 >= 700, "{row:?}");
}

#[tokio::test]
async fn a_dedicated_agent_url_that_is_not_the_teams_own_is_never_called() {
    // Team config is writable by org admins: a URL pointing anywhere else must not receive the
    // team credential (or the platform's investigate token).
    let app = TestApp::spawn().await;
    let elsewhere = devstack::Devstack::start().await.unwrap();
    app.stack.config_service.state().set_team_config(
        "acme",
        "vip",
        json!({"agent": {"dedicated_service_url": elsewhere.agent.url()}}),
    );
    assert_eq!(run(&app, SUPER_ADMIN, &body("vip")).await.status(), 200);
    assert!(elsewhere.agent.calls().is_empty(), "the untrusted URL got a call");
    assert_eq!(app.stack.agent.calls_to("POST", "/agents/planner/run").len(), 1);
}

/// Reads server-sent events as (arrival time, event JSON) until the stream ends.
async fn read_events(response: reqwest::Response) -> Vec<(Instant, Value)> {
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    events.push((Instant::now(), serde_json::from_str(data.trim()).unwrap()));
                }
            }
        }
    }
    events
}

#[tokio::test]
async fn streaming_passes_progress_through_before_the_run_ends() {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_AGENT_DIALECT".into(), "investigate".into());
    })
    .await;
    team(&app, "sre");
    app.stack.agent.state().set_delay(Duration::from_millis(900));
    let response = app
        .client
        .post(app.at("/api/v1/admin/agents/run"))
        .bearer_auth(SUPER_ADMIN)
        .header("Accept", "text/event-stream")
        .json(&body("sre"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = read_events(response).await;
    let kinds: Vec<&str> = events.iter().map(|(_, e)| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"thought"));
    assert_eq!(kinds.last(), Some(&"result"));
    let first = events.first().unwrap().0;
    let last = events.last().unwrap().0;
    assert!(
        last - first >= Duration::from_millis(300),
        "progress arrived before the end: {kinds:?}"
    );
    assert_eq!(events.last().unwrap().1["data"]["text"], "echo: hello");
    let investigate = &app.stack.agent.calls_to("POST", "/investigate")[0];
    assert_eq!(investigate.body["tenant_id"], "acme");
    eventually(5, "the run to close", || async {
        (agent_run_rows(&app).await == vec![("succeeded".to_string(), None)]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_and_the_run_closes_as_failed() {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_AGENT_DIALECT".into(), "investigate".into());
    })
    .await;
    team(&app, "sre");
    app.stack.agent.state().set_delay(Duration::from_secs(3));
    let response = app
        .client
        .post(app.at("/api/v1/admin/agents/run"))
        .bearer_auth(SUPER_ADMIN)
        .header("Accept", "text/event-stream")
        .json(&body("sre"))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("thought"));
    drop(stream);
    eventually(10, "the upstream call to be cancelled", || async {
        (app.stack.agent.state().runs_cancelled() == 1).then_some(())
    })
    .await;
    let rows = eventually(10, "the run to close", || async {
        let rows = agent_run_rows(&app).await;
        (rows.first().is_some_and(|(status, _)| status == "failed")).then_some(rows)
    })
    .await;
    assert_eq!(rows[0].1.as_ref().unwrap()["code"], "client_disconnected");
    eventually(5, "the platform audit to close", || async {
        let audit = app.stack.config_service.state().audit_runs();
        (audit.first().is_some_and(|r| r["status"] == "failed")).then_some(())
    })
    .await;
    assert_eq!(app.stack.agent.state().runs_completed(), 0);
}

#[tokio::test]
async fn authorization_matrix() {
    let app = TestApp::spawn().await;
    team(&app, "sre");
    let cases = [
        ("not-a-token", 401, "invalid_token"),
        ("dev-org-admin-globex", 403, "org_forbidden"),
        ("dev-readonly-acme", 403, "missing_permission"),
        ("dev-team-token", 403, "not_admin"),
    ];
    for (token, status, code) in cases {
        let response = run(&app, token, &body("sre")).await;
        assert_eq!(response.status(), status, "{token}");
        assert_eq!(json_of(response).await["code"], code, "{token}");
    }
    assert_eq!(run(&app, "dev-org-admin-acme", &body("sre")).await.status(), 200);
    let scoped = app
        .another(|env| {
            env.insert("ORCHESTRATOR_REQUIRE_ADMIN_STAR".into(), "0".into());
        })
        .await;
    assert_eq!(run(&scoped, "dev-scoped-acme", &body("sre")).await.status(), 200);
    assert!(
        app.stack.agent.calls_to("POST", "/agents/").len() == 2,
        "refused calls never reach the agent"
    );
}

#[tokio::test]
async fn every_failure_maps_to_a_clear_error_and_closes_the_run() {
    let app = TestApp::spawn().await;
    team(&app, "sre");
    let config = &app.stack.config_service;

    // Refusals before the run opens.
    config
        .faults()
        .fail_next_matching(Some("POST"), "/impersonation-token", 1, 403);
    let r = run(&app, SUPER_ADMIN, &body("sre")).await;
    assert_eq!(
        (r.status().as_u16(), json_of(r).await["code"].clone()),
        (403, json!("impersonation_forbidden"))
    );
    let r = run(&app, SUPER_ADMIN, &body("ghost")).await;
    assert_eq!(
        (r.status().as_u16(), json_of(r).await["code"].clone()),
        (404, json!("team_not_found"))
    );
    config
        .faults()
        .fail_next_matching(Some("POST"), "/impersonation-token", 1, 503);
    let r = run(&app, SUPER_ADMIN, &body("sre")).await;
    assert_eq!(
        (r.status().as_u16(), json_of(r).await["code"].clone()),
        (503, json!("config_service_unavailable"))
    );

    // Failures of the agent.
    app.stack
        .agent
        .faults()
        .fail_next_matching(Some("POST"), "/agents/", 1, 500);
    let r = run(&app, SUPER_ADMIN, &body("sre")).await;
    assert_eq!(
        (r.status().as_u16(), json_of(r).await["code"].clone()),
        (502, json!("agent_upstream_error"))
    );
    app.stack.agent.faults().drop_next(1);
    let r = run(&app, SUPER_ADMIN, &body("sre")).await;
    assert_eq!(
        (r.status().as_u16(), json_of(r).await["code"].clone()),
        (502, json!("agent_upstream_error"))
    );
    app.stack.agent.state().set_error_mode(Some("tool crashed".into()));
    let r = run(&app, SUPER_ADMIN, &body("sre")).await;
    assert_eq!(r.status(), 502);
    let error = json_of(r).await;
    assert_eq!(error["code"], "agent_error");
    assert!(error["detail"].as_str().unwrap().contains("tool crashed"));
    app.stack.agent.state().set_error_mode(None);
    app.stack.agent.state().set_delay(Duration::from_secs(3));
    let mut slow = body("sre");
    slow["timeout"] = json!(1);
    let r = run(&app, SUPER_ADMIN, &slow).await;
    assert_eq!(
        (r.status().as_u16(), json_of(r).await["code"].clone()),
        (504, json!("agent_timeout"))
    );

    let rows = eventually(10, "every run to close", || async {
        let rows = agent_run_rows(&app).await;
        (rows.len() == 7 && rows.iter().all(|(status, _)| status == "failed")).then_some(rows)
    })
    .await;
    let codes: Vec<&str> = rows
        .iter()
        .map(|(_, e)| e.as_ref().unwrap()["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes[..3],
        [
            "impersonation_forbidden",
            "team_not_found",
            "config_service_unavailable"
        ]
    );
    // Every run opened in the platform audit is closed there too, in its vocabulary: the agent's
    // timeout as `timeout`, the rest as `failed`, each with its error message.
    let audit = eventually(10, "the platform audit to close every run", || async {
        let audit = app.stack.config_service.state().audit_runs();
        (audit.len() == 7 && audit.iter().all(|r| r["status"] != "running")).then_some(audit)
    })
    .await;
    let statuses: Vec<&str> = audit.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        ["failed", "failed", "failed", "failed", "failed", "failed", "timeout"]
    );
    assert!(audit.iter().all(|r| r["error_message"].is_string()));
    assert!(app
        .stack
        .config_service
        .calls_to("PATCH", "/unified-audit/")
        .iter()
        .all(|call| call.fault.is_none()));
}

#[tokio::test]
async fn every_bad_field_is_named() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            json!({"team_node_id": "sre", "agent_name": "planner", "message": "x"}),
            "org_id",
        ),
        (
            json!({"org_id": "acme", "team_node_id": "a b", "agent_name": "planner", "message": "x"}),
            "team_node_id",
        ),
        (
            json!({"org_id": "acme", "team_node_id": "sre", "agent_name": "x".repeat(65), "message": "x"}),
            "agent_name",
        ),
        (
            json!({"org_id": "acme", "team_node_id": "sre", "agent_name": "planner", "message": ""}),
            "message",
        ),
        (
            json!({"org_id": "acme", "team_node_id": "sre", "agent_name": "planner", "message": "m".repeat(20_001)}),
            "message",
        ),
        (
            json!({"org_id": "acme", "team_node_id": "sre", "agent_name": "planner", "message": "x", "context": []}),
            "context",
        ),
        (
            json!({"org_id": "acme", "team_node_id": "sre", "agent_name": "planner", "message": "x", "timeout": 100_000}),
            "timeout",
        ),
        (
            json!({"org_id": "acme", "team_node_id": "sre", "agent_name": "planner", "message": "x", "max_turns": 0}),
            "max_turns",
        ),
    ];
    for (body, field) in cases {
        let response = run(&app, SUPER_ADMIN, &body).await;
        assert_eq!(response.status(), 422, "{field}");
        assert_eq!(json_of(response).await["field"], field);
    }
}

#[tokio::test]
async fn the_internal_slack_trigger_goes_through_the_durable_inbox() {
    let app = TestApp::spawn().await;
    app.stack
        .config_service
        .state()
        .set_team_config("acme", "sre", json!({"routing": {"slack_channel_ids": ["C5"]}}));
    let trigger = json!({"channel_id": "C5", "thread_ts": "300.1", "event_ts": "300.2", "user_id": "U1", "text": "<@UBOT> check the queue"});
    let url = app.at("/api/v1/internal/slack/trigger");
    let unauthenticated = app.client.post(&url).json(&trigger).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let wrong = app
        .client
        .post(&url)
        .bearer_auth("nope")
        .json(&trigger)
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(wrong).await["code"], "invalid_token");
    let accepted = app
        .client
        .post(&url)
        .bearer_auth(INTERNAL_TOKEN)
        .json(&trigger)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let accepted = json_of(accepted).await;
    assert_eq!(accepted["duplicate"], false);
    let again = json_of(
        app.client
            .post(&url)
            .header("X-Internal-Token", INTERNAL_TOKEN)
            .json(&trigger)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["event_id"], accepted["event_id"]);
    let id = accepted["event_id"].as_str().unwrap().to_string();
    let event = eventually(20, "the trigger to be delivered", || async {
        let event = app.admin_json(&format!("/api/v1/admin/webhooks/events/{id}")).await;
        (event["status"] == "delivered").then_some(event)
    })
    .await;
    assert_eq!(event["team_node_id"], "sre");
    let messages: Vec<Value> = app
        .stack
        .agent
        .calls_to("POST", "/agents/")
        .iter()
        .map(|c| c.body["message"].clone())
        .collect();
    assert_eq!(messages, vec![json!("check the queue")]);

    let unconfigured = app
        .another(|env| {
            env.remove("ORCHESTRATOR_INTERNAL_TOKEN");
        })
        .await;
    let refused = unconfigured
        .client
        .post(unconfigured.at("/api/v1/internal/slack/trigger"))
        .bearer_auth(INTERNAL_TOKEN)
        .json(&trigger)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(json_of(refused).await["code"], "internal_auth_not_configured");
}
