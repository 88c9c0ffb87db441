//! Webhook-triggered runs reach the people who asked: each source's run carries the context,
//! session id and output destinations contracts.md gives, resolved from the team's config.

use orchestrator::config::{Secret, SecretList};
use orchestrator::webhooks::signature::{signed_headers, Source};
use serde_json::{json, Value};

use crate::helpers::*;

async fn deliver(app: &TestApp, source: Source, path: &str, body: Value, delivery_id: &str, event: Option<&str>) {
    let secret = match source {
        Source::Slack => SLACK_SECRET,
        Source::GitHub => GITHUB_SECRET,
        Source::PagerDuty => PAGERDUTY_SECRET,
        Source::IncidentIo => INCIDENTIO_SECRET,
    };
    let body = body.to_string();
    let secrets = SecretList::new(vec![Secret::new(secret)]);
    let mut request = app.client.post(app.at(path)).body(body.clone());
    for (name, value) in signed_headers(
        source,
        &secrets,
        body.as_bytes(),
        chrono::Utc::now().timestamp(),
        delivery_id,
    )
    .unwrap()
    {
        request = request.header(name, value);
    }
    if let Some(event) = event {
        request = request.header("X-GitHub-Event", event);
    }
    assert_eq!(request.send().await.unwrap().status(), 200);
}

/// The body of the one agent call, once dispatch made it.
async fn agent_call(app: &TestApp) -> Value {
    eventually(30, "the agent call", || async {
        app.stack
            .agent
            .calls_to("POST", "/agents/")
            .first()
            .map(|call| call.body.clone())
    })
    .await
}

fn team(app: &TestApp, config: Value) {
    app.stack.config_service.state().set_team_config("acme", "sre", config);
}

#[tokio::test]
async fn a_slack_mention_is_answered_in_its_thread_with_the_teams_bot() {
    let app = TestApp::spawn().await;
    team(
        &app,
        json!({"routing": {"slack_channel_ids": ["C0A4967KRBM"]}, "integrations": {"slack": {"bot_token": "xoxb-team"}}}),
    );
    let mention = json!({"type": "event_callback", "team_id": "T1", "event_id": "Ev1",
        "event": {"type": "app_mention", "channel": "C0A4967KRBM", "user": "U2", "text": "<@U1> why is checkout slow?",
            "ts": "1700000001.000200", "thread_ts": "1700000000.000100", "event_ts": "1700000001.000200"}});
    deliver(&app, Source::Slack, "/webhooks/slack/events", mention, "Ev1", None).await;
    let call = agent_call(&app).await;
    assert_eq!(call["trigger_source"], "slack");
    assert_eq!(
        call["output_destinations"],
        json!([{"type": "slack", "channel_id": "C0A4967KRBM", "thread_ts": "1700000000.000100", "bot_token": "xoxb-team"}])
    );
    let context = &call["context"];
    assert_eq!(context["trigger"], "slack");
    assert_eq!(context["user_id"], "U2");
    // The session id the existing Slack bot used, so conversations survive the cut-over.
    assert_eq!(context["session_id"], "slack-c0a4967krbm-1700000000-000100");
    assert_eq!(context["metadata"]["slack"]["channel_id"], "C0A4967KRBM");
    assert_eq!(context["metadata"]["slack"]["thread_ts"], "1700000000.000100");
    let keys: Vec<&String> = context.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["metadata", "session_id", "trigger", "user_id"]);
}

#[tokio::test]
async fn a_comment_on_a_pull_request_is_answered_on_it_and_in_slack() {
    let app = TestApp::spawn().await;
    team(
        &app,
        json!({"routing": {"github_repos": ["acme/api"]}, "notifications": {"github_output": {"slack_channel_id": "CGH"}}}),
    );
    // GitHub sends a comment on a pull request as an issue comment whose issue is the PR.
    let comment = json!({"action": "created", "issue": {"number": 7, "title": "Fix", "pull_request": {"url": "u"}},
        "comment": {"body": "@incidentfox what broke?"}, "repository": {"full_name": "acme/api"}, "sender": {"login": "alice"}});
    deliver(
        &app,
        Source::GitHub,
        "/webhooks/github",
        comment,
        "gh-1",
        Some("issue_comment"),
    )
    .await;
    let call = agent_call(&app).await;
    assert_eq!(call["trigger_source"], "github");
    assert_eq!(
        call["output_destinations"],
        json!([
            {"type": "github_pr_comment", "repo": "acme/api", "pr_number": 7},
            {"type": "slack", "channel_id": "CGH"}
        ])
    );
    assert_eq!(call["context"]["session_id"], "github-acme-api-pr-7");
    assert_eq!(call["context"]["user_id"], "alice");
    assert_eq!(call["context"]["trigger"], "github");
    assert_eq!(call["context"]["metadata"]["github"]["pr_number"], 7);
}

#[tokio::test]
async fn a_pagerduty_incident_is_answered_in_the_teams_incident_channel() {
    let app = TestApp::spawn().await;
    team(
        &app,
        json!({"routing": {"pagerduty_service_ids": ["SVC1"]},
            "notifications": {"pagerduty_output": {"slack_channel_id": "CPD"}, "default_slack_channel_id": "CALL"}}),
    );
    let incident = json!({"event": {"id": "E1", "event_type": "incident.triggered", "data": {"id": "P1", "title": "DB down",
        "urgency": "high", "status": "triggered", "service": {"id": "SVC1", "summary": "database"}}}});
    deliver(&app, Source::PagerDuty, "/webhooks/pagerduty", incident, "w-1", None).await;
    let call = agent_call(&app).await;
    assert_eq!(call["trigger_source"], "pagerduty");
    assert_eq!(
        call["output_destinations"],
        json!([{"type": "slack", "channel_id": "CPD"}])
    );
    // No conversation to resume: the session is the run's correlation id.
    let correlation = &app.stack.agent.calls_to("POST", "/agents/")[0].headers["x-correlation-id"];
    assert_eq!(call["context"]["session_id"], correlation.as_str());
    assert_eq!(call["context"]["metadata"]["pagerduty"]["incident_id"], "P1");
    assert_eq!(call["context"]["user_id"], Value::Null);
}

#[tokio::test]
async fn an_incidentio_alert_uses_the_teams_defaults_or_goes_nowhere() {
    let app = TestApp::spawn().await;
    team(
        &app,
        json!({"routing": {"incidentio_alert_source_ids": ["AS1"]},
            "output_config": {"default_destinations": [{"type": "slack", "channel_id": "CDEFAULT"}]}}),
    );
    let alert = |id: &str| {
        json!({"event_type": "public_alert.alert_created_v1", "public_alert.alert_created_v1": {"alert": {"id": id,
        "title": "Error rate high", "status": "firing", "alert_source_id": "AS1"}}})
    };
    deliver(
        &app,
        Source::IncidentIo,
        "/webhooks/incidentio",
        alert("A1"),
        "msg_1",
        None,
    )
    .await;
    let call = agent_call(&app).await;
    assert_eq!(call["trigger_source"], "incidentio");
    assert_eq!(
        call["output_destinations"],
        json!([{"type": "slack", "channel_id": "CDEFAULT"}])
    );

    // A team that configured nowhere gets an empty list, said out loud rather than left out.
    app.stack.agent.clear_calls();
    app.stack.config_service.state().set_team_config(
        "acme",
        "quiet",
        json!({"routing": {"incidentio_alert_source_ids": ["AS2"]}}),
    );
    let quiet = json!({"event_type": "public_alert.alert_created_v1", "public_alert.alert_created_v1": {"alert": {"id": "A2",
        "title": "Disk", "status": "firing", "alert_source_id": "AS2"}}});
    deliver(&app, Source::IncidentIo, "/webhooks/incidentio", quiet, "msg_2", None).await;
    let call = agent_call(&app).await;
    assert_eq!(call["output_destinations"], json!([]));
}

#[tokio::test]
async fn the_platform_bot_may_name_the_destinations_itself() {
    let app = TestApp::spawn().await;
    team(
        &app,
        json!({"routing": {"slack_channel_ids": ["C1"]}, "output_config": {"trigger_overrides": {"slack": "use_default"}}}),
    );
    let response = app
        .client
        .post(app.at("/api/v1/internal/slack/trigger"))
        .bearer_auth(INTERNAL_TOKEN)
        .json(
            &json!({"channel_id": "C1", "event_ts": "1700000000.000100", "user_id": "U9", "text": "status?",
            "output_destinations": [{"type": "slack", "channel_id": "COVERRIDE", "thread_ts": "1.2"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let call = agent_call(&app).await;
    assert_eq!(
        call["output_destinations"],
        json!([{"type": "slack", "channel_id": "COVERRIDE", "thread_ts": "1.2"}])
    );
    assert_eq!(call["context"]["session_id"], "slack-c1-1700000000-000100");

    // Without one, the team's override applies: use_default with no defaults is nobody.
    app.stack.agent.clear_calls();
    let response = app
        .client
        .post(app.at("/api/v1/internal/slack/trigger"))
        .bearer_auth(INTERNAL_TOKEN)
        .json(&json!({"channel_id": "C1", "event_ts": "1700000009.000100", "user_id": "U9", "text": "and now?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(agent_call(&app).await["output_destinations"], json!([]));
}
