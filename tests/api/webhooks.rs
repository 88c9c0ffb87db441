//! The webhook front door end to end: signed deliveries, the durable inbox, dispatch to agents.

use std::time::Duration;

use orchestrator::config::{Secret, SecretList};
use orchestrator::webhooks::signature::{signed_headers, Source};
use serde_json::{json, Value};

use crate::helpers::*;

pub(crate) fn secret_of(source: Source) -> &'static str {
    match source {
        Source::Slack => SLACK_SECRET,
        Source::GitHub => GITHUB_SECRET,
        Source::PagerDuty => PAGERDUTY_SECRET,
        Source::IncidentIo => INCIDENTIO_SECRET,
    }
}

pub(crate) fn path_of(source: Source) -> &'static str {
    match source {
        Source::Slack => "/webhooks/slack/events",
        Source::GitHub => "/webhooks/github",
        Source::PagerDuty => "/webhooks/pagerduty",
        Source::IncidentIo => "/webhooks/incidentio",
    }
}

/// Posts `body` to the source's route, correctly signed, with `extra` headers.
pub(crate) async fn deliver(
    app: &TestApp,
    source: Source,
    body: &[u8],
    delivery_id: &str,
    extra: &[(&str, &str)],
) -> reqwest::Response {
    deliver_to(app, source, path_of(source), body, delivery_id, extra).await
}

pub(crate) async fn deliver_to(
    app: &TestApp,
    source: Source,
    path: &str,
    body: &[u8],
    delivery_id: &str,
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let secrets = SecretList::new(vec![Secret::new(secret_of(source))]);
    let headers = signed_headers(source, &secrets, body, chrono::Utc::now().timestamp(), delivery_id).unwrap();
    let mut request = app.client.post(app.at(path)).body(body.to_vec());
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let names_event = extra
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("x-github-event"));
    if source == Source::GitHub && !names_event {
        request = request.header("X-GitHub-Event", "pull_request");
    }
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

pub(crate) fn github_pr(repo: &str, number: u64, title: &str) -> Vec<u8> {
    json!({"action": "opened", "number": number, "pull_request": {"number": number, "title": title},
        "repository": {"full_name": repo}, "sender": {"login": "alice"}})
    .to_string()
    .into_bytes()
}

pub(crate) fn slack_mention(event_id: &str, channel: &str, ts: &str, text: &str) -> Vec<u8> {
    json!({"type": "event_callback", "team_id": "T1", "event_id": event_id,
        "event": {"type": "app_mention", "channel": channel, "user": "U2", "text": text, "ts": ts}})
    .to_string()
    .into_bytes()
}

fn own(app: &TestApp, team: &str, routing: Value) {
    app.stack
        .config_service
        .state()
        .set_team_config("acme", team, json!({ "routing": routing }));
}

pub(crate) async fn event_rows(app: &TestApp) -> Vec<Value> {
    let page = app.admin_json("/api/v1/admin/webhooks/events?limit=100").await;
    page["items"].as_array().cloned().unwrap_or_default()
}

pub(crate) async fn wait_for_event_status(app: &TestApp, status: &str, count: usize) -> Vec<Value> {
    eventually(30, &format!("{count} event(s) {status}"), || async {
        let rows = event_rows(app).await;
        let matching: Vec<Value> = rows.into_iter().filter(|e| e["status"] == status).collect();
        (matching.len() >= count).then_some(matching)
    })
    .await
}

fn agent_messages(app: &TestApp) -> Vec<String> {
    app.stack
        .agent
        .calls_to("POST", "/agents/")
        .iter()
        .filter(|c| c.fault.is_none())
        .filter_map(|c| c.body["message"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn a_github_pull_request_becomes_one_agent_run_for_the_owning_team() {
    let app = TestApp::spawn().await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    let response = deliver(
        &app,
        Source::GitHub,
        &github_pr("acme/api", 7, "Fix the cache"),
        "d-1",
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(json_of(response).await, json!({"ok": true}));
    let delivered = wait_for_event_status(&app, "delivered", 1).await;
    assert_eq!(delivered[0]["org_id"], "acme");
    assert_eq!(delivered[0]["team_node_id"], "sre");
    assert_eq!(delivered[0]["attempts"], 1);
    assert_eq!(
        agent_messages(&app),
        vec!["GitHub PR #7 opened in acme/api by alice: Fix the cache"]
    );
    let call = &app.stack.agent.calls_to("POST", "/agents/planner/run")[0];
    assert!(call
        .headers
        .get("x-incidentfox-team-token")
        .is_some_and(|t| !t.is_empty()));
    assert_eq!(
        call.headers.get("x-correlation-id").map(String::as_str),
        delivered[0]["id"].as_str()
    );
}

#[tokio::test]
async fn slack_duplicates_and_retries_run_once_and_protocol_messages_are_answered() {
    let app = TestApp::spawn().await;
    own(&app, "sre", json!({"slack_channel_ids": ["C1"]}));
    let body = slack_mention("Ev1", "C1", "100.1", "<@UBOT> why is checkout slow?");
    let first = deliver(&app, Source::Slack, &body, "", &[]).await;
    assert_eq!(json_of(first).await, json!({"ok": true}));
    let retry = deliver(
        &app,
        Source::Slack,
        &body,
        "",
        &[("X-Slack-Retry-Num", "1"), ("X-Slack-Retry-Reason", "http_timeout")],
    )
    .await;
    assert_eq!(json_of(retry).await, json!({"ok": true, "duplicate": true}));
    wait_for_event_status(&app, "delivered", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(agent_messages(&app), vec!["why is checkout slow?"]);
    assert_eq!(event_rows(&app).await.len(), 1);

    let challenge = deliver(
        &app,
        Source::Slack,
        json!({"type": "url_verification", "challenge": "xyz"})
            .to_string()
            .as_bytes(),
        "",
        &[],
    )
    .await;
    assert_eq!(json_of(challenge).await, json!({"challenge": "xyz"}));
    let ping = deliver(
        &app,
        Source::GitHub,
        b"{\"zen\":\"hi\"}",
        "p-1",
        &[("X-GitHub-Event", "ping")],
    )
    .await;
    assert_eq!(ping.status(), 200);
    assert_eq!(event_rows(&app).await.len(), 1, "protocol messages store nothing");
}

#[tokio::test]
async fn pagerduty_and_incidentio_route_to_their_teams() {
    let app = TestApp::spawn().await;
    own(
        &app,
        "oncall",
        json!({"pagerduty_service_ids": ["SVC1"], "incidentio_alert_source_ids": ["AS1"]}),
    );
    let pd = json!({"event": {"id": "E1", "event_type": "incident.triggered", "data": {"id": "P1", "number": 42, "title": "DB down",
        "urgency": "high", "status": "triggered", "service": {"id": "SVC1", "summary": "database"}}}});
    assert_eq!(
        deliver(&app, Source::PagerDuty, pd.to_string().as_bytes(), "w-1", &[])
            .await
            .status(),
        200
    );
    let alert = json!({"event_type": "public_alert.alert_created_v1", "public_alert.alert_created_v1": {"alert": {"id": "A1",
        "title": "Error rate high", "status": "firing", "alert_source_id": "AS1"}}});
    assert_eq!(
        deliver(&app, Source::IncidentIo, alert.to_string().as_bytes(), "msg_1", &[])
            .await
            .status(),
        200
    );
    wait_for_event_status(&app, "delivered", 2).await;
    let messages = agent_messages(&app);
    assert!(
        messages
            .iter()
            .any(|m| m.contains("DB down") && m.contains("urgency high")),
        "{messages:?}"
    );
    assert!(messages.iter().any(|m| m.contains("Error rate high")), "{messages:?}");
}

#[tokio::test]
async fn bad_signatures_are_401_with_a_reason_and_store_nothing() {
    let app = TestApp::spawn_with(|env| {
        env.remove("PAGERDUTY_WEBHOOK_SECRET");
    })
    .await;
    let body = github_pr("acme/api", 1, "x");
    let forged = app
        .client
        .post(app.at("/webhooks/github"))
        .header("X-Hub-Signature-256", format!("sha256={}", "0".repeat(64)))
        .header("X-GitHub-Event", "pull_request")
        .header("X-GitHub-Delivery", "d")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    assert_eq!(json_of(forged).await["code"], "bad_signature");
    let unsigned = app
        .client
        .post(app.at("/webhooks/github"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    assert_eq!(json_of(unsigned).await["code"], "missing_signature");
    // Signed for GitHub, sent to Slack's route.
    let crossed = deliver_to(&app, Source::GitHub, "/webhooks/slack/events", &body, "d-2", &[]).await;
    assert_eq!(crossed.status(), 401);
    let unconfigured = deliver(&app, Source::GitHub, &body, "d-3", &[]).await;
    assert_eq!(unconfigured.status(), 200, "GitHub is configured");
    let pd = app
        .client
        .post(app.at("/webhooks/pagerduty"))
        .header("X-PagerDuty-Signature", "v1=00")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(pd.status(), 401);
    assert_eq!(json_of(pd).await["code"], "source_not_configured");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"webhook_rejections_total{reason="bad_signature",source="github"} 1"#),
        "{metrics}"
    );
    assert_eq!(event_rows(&app).await.len(), 1);
}

#[tokio::test]
async fn a_sender_over_its_rate_gets_429_with_retry_after() {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_GITHUB_RATE_LIMIT_PER_MINUTE".into(), "1".into());
        env.insert("ORCHESTRATOR_GITHUB_RATE_LIMIT_BURST".into(), "2".into());
    })
    .await;
    for i in 0..2 {
        let r = deliver(
            &app,
            Source::GitHub,
            &github_pr("acme/api", i, "x"),
            &format!("r-{i}"),
            &[],
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    let limited = deliver(&app, Source::GitHub, &github_pr("acme/api", 3, "x"), "r-3", &[]).await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    assert_eq!(json_of(limited).await["code"], "rate_limited");
    let other_repo = deliver(&app, Source::GitHub, &github_pr("acme/web", 1, "x"), "r-4", &[]).await;
    assert_eq!(other_repo.status(), 200, "limits are per sender");
}

#[tokio::test]
async fn the_database_down_answers_503_so_the_source_retries() {
    let app = TestApp::spawn_with(|env| {
        env.insert("DATABASE_URL".into(), "postgres://postgres@127.0.0.1:1/none".into());
        env.insert("ORCHESTRATOR_DB_ACQUIRE_TIMEOUT_SECONDS".into(), "1".into());
    })
    .await;
    let response = deliver(&app, Source::GitHub, &github_pr("acme/api", 1, "x"), "down-1", &[]).await;
    assert_eq!(response.status(), 503);
    assert_eq!(json_of(response).await["code"], "storage_unavailable");
}

#[tokio::test]
async fn the_agent_down_then_up_is_retried_then_delivered() {
    let app = TestApp::spawn().await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    app.stack
        .agent
        .faults()
        .fail_next_matching(Some("POST"), "/agents/", 2, 503);
    deliver(&app, Source::GitHub, &github_pr("acme/api", 9, "retry me"), "ad-1", &[]).await;
    let delivered = wait_for_event_status(&app, "delivered", 1).await;
    assert_eq!(delivered[0]["attempts"], 3);
    assert_eq!(agent_messages(&app).len(), 1);
}

#[tokio::test]
async fn exhausted_retries_dead_letter_and_an_operator_can_replay() {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_DISPATCH_MAX_ATTEMPTS".into(), "2".into());
    })
    .await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    app.stack
        .agent
        .faults()
        .fail_next_matching(Some("POST"), "/agents/", 2, 500);
    deliver(&app, Source::GitHub, &github_pr("acme/api", 5, "doomed"), "dl-1", &[]).await;
    let dead = wait_for_event_status(&app, "dead_letter", 1).await;
    assert_eq!(dead[0]["attempts"], 2);
    assert!(dead[0]["last_error"].as_str().unwrap().contains("500"), "{dead:?}");
    let id = dead[0]["id"].as_str().unwrap().to_string();

    let detail = app
        .admin_json(&format!("/api/v1/admin/webhooks/events/{id}?include_body=true"))
        .await;
    assert!(detail["body_text"].as_str().unwrap().contains("doomed"));
    let without = app.admin_json(&format!("/api/v1/admin/webhooks/events/{id}")).await;
    assert!(without.get("body_text").is_none());

    let replay = app
        .client
        .post(app.at(&format!("/api/v1/admin/webhooks/events/{id}/replay")))
        .bearer_auth(SUPER_ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 200);
    assert_eq!(json_of(replay).await["replayed"], 1);
    wait_for_event_status(&app, "delivered", 1).await;
    let audit = app.admin_json("/api/v1/admin/audit?limit=100").await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"webhook.dead_lettered") && actions.contains(&"webhook.replayed"),
        "{actions:?}"
    );
    let again = app
        .client
        .post(app.at(&format!("/api/v1/admin/webhooks/events/{id}/replay")))
        .bearer_auth(SUPER_ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200, "a delivered event may be replayed deliberately");
}

#[tokio::test]
async fn bulk_replay_takes_a_filter_and_is_bounded() {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_DISPATCH_MAX_ATTEMPTS".into(), "1".into());
    })
    .await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    app.stack
        .agent
        .faults()
        .fail_next_matching(Some("POST"), "/agents/", 3, 500);
    for i in 0..3 {
        deliver(
            &app,
            Source::GitHub,
            &github_pr("acme/api", i, "bulk"),
            &format!("b-{i}"),
            &[],
        )
        .await;
    }
    wait_for_event_status(&app, "dead_letter", 3).await;
    let report = json_of(
        app.client
            .post(app.at("/api/v1/admin/webhooks/replay"))
            .bearer_auth(SUPER_ADMIN)
            .json(&json!({"source": "github", "status": "dead_letter", "limit": 2}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(report["replayed"], 2);
    assert_eq!(report["truncated"], true);
    wait_for_event_status(&app, "delivered", 2).await;
    let bad = app
        .client
        .post(app.at("/api/v1/admin/webhooks/replay"))
        .bearer_auth(SUPER_ADMIN)
        .json(&json!({"limit": 5000}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
}

#[tokio::test]
async fn an_event_nobody_owns_is_unrouted_and_not_retried() {
    let app = TestApp::spawn().await;
    deliver(&app, Source::GitHub, &github_pr("nobody/repo", 1, "x"), "u-1", &[]).await;
    let unrouted = wait_for_event_status(&app, "unrouted", 1).await;
    assert_eq!(unrouted[0]["attempts"], 1);
    assert!(unrouted[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("github_repo=nobody/repo"));
    assert!(agent_messages(&app).is_empty());
    let skipped_body = json!({"repository": {"full_name": "acme/api"}}).to_string();
    deliver(
        &app,
        Source::GitHub,
        skipped_body.as_bytes(),
        "s-1",
        &[("X-GitHub-Event", "star")],
    )
    .await;
    let skipped = wait_for_event_status(&app, "skipped", 1).await;
    assert!(skipped[0]["skip_reason"].as_str().unwrap().contains("star"));
}

#[tokio::test]
async fn events_of_one_thread_are_dispatched_in_order() {
    let app = TestApp::spawn().await;
    own(&app, "sre", json!({"slack_channel_ids": ["C9"]}));
    app.stack.agent.state().set_delay(Duration::from_millis(150));
    for i in 0..4 {
        let body = json!({"type": "event_callback", "team_id": "T1", "event_id": format!("Ev-order-{i}"),
            "event": {"type": "app_mention", "channel": "C9", "user": "U2", "text": format!("message {i}"), "ts": format!("200.{i}"), "thread_ts": "200.0"}});
        deliver(&app, Source::Slack, body.to_string().as_bytes(), "", &[]).await;
    }
    wait_for_event_status(&app, "delivered", 4).await;
    assert_eq!(
        agent_messages(&app),
        vec!["message 0", "message 1", "message 2", "message 3"]
    );
}

/// Where the quiet sender's event was dispatched among a flood of another sender's, sent first,
/// and how many of the flood's events the agent had been sent before the quiet one was delivered.
async fn quiet_position_behind_a_flood(fair_shares: &str) -> (usize, usize) {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_DISPATCH_WORKERS".into(), "1".into());
        env.insert("ORCHESTRATOR_DISPATCH_FAIR_SHARES".into(), fair_shares.into());
    })
    .await;
    own(&app, "flood", json!({"github_repos": ["acme/flood"]}));
    own(&app, "quiet", json!({"github_repos": ["acme/quiet"]}));
    app.stack.agent.state().set_delay(Duration::from_millis(50));
    for i in 0..20 {
        let body = github_pr("acme/flood", i, "flood");
        let response = deliver(&app, Source::GitHub, &body, &format!("flood-{i}"), &[]).await;
        assert_eq!(response.status(), 200);
    }
    let already_sent = agent_messages(&app).len();
    let response = deliver(
        &app,
        Source::GitHub,
        &github_pr("acme/quiet", 1, "quiet"),
        "quiet-1",
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    wait_for_event_status(&app, "delivered", 21).await;
    let messages = agent_messages(&app);
    assert_eq!(messages.len(), 21, "{messages:?}");
    let position = messages
        .iter()
        .position(|m| m.contains("acme/quiet"))
        .expect("the quiet sender's event was dispatched");
    (position, already_sent)
}

#[tokio::test]
async fn a_flooding_sender_waits_for_itself() {
    // One worker, a 50 ms agent: the flood's twenty events take a second to dispatch, and the
    // first of them go while the rest are still being delivered (more of them on a slower
    // machine: CI once found the quiet event 4th). The quiet sender's event, sent after all of them,
    // goes with the next claim or the one after (a tie with the flood's next tag goes to the
    // event that arrived first), whatever had gone before it arrived.
    let (fair, already_sent) = quiet_position_behind_a_flood("true").await;
    assert!(
        fair <= already_sent + 3,
        "dispatched {fair}th, {already_sent} of the flood sent before it was delivered"
    );
    // Without fair shares it waits for the whole flood.
    assert_eq!(quiet_position_behind_a_flood("false").await.0, 20);
}

#[tokio::test]
async fn a_crash_after_acknowledging_still_dispatches() {
    let short_lease = |env: &mut std::collections::HashMap<String, String>| {
        env.insert("ORCHESTRATOR_DISPATCH_LEASE_SECONDS".into(), "5".into());
    };
    let app = TestApp::spawn_with(short_lease).await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    // The routing lookup hangs, so the first instance dies mid-dispatch.
    app.stack.config_service.faults().set_latency(Duration::from_secs(3));
    assert_eq!(
        deliver(&app, Source::GitHub, &github_pr("acme/api", 3, "survive"), "c-1", &[])
            .await
            .status(),
        200
    );
    eventually(10, "the dispatch to start", || async {
        (!app.stack.config_service.calls_to("POST", "/routing/lookup").is_empty()).then_some(())
    })
    .await;
    // A claim only takes a lease; operators see the leased event as processing, and the status
    // filter agrees.
    let processing = wait_for_event_status(&app, "processing", 1).await;
    let filtered = app.admin_json("/api/v1/admin/webhooks/events?status=processing").await;
    assert_eq!(filtered["items"][0]["id"], processing[0]["id"]);
    assert_eq!(processing[0]["attempts"], 1);
    let successor = app.another(short_lease).await;
    app.stack.config_service.faults().reset();
    app.crash();
    wait_for_event_status(&successor, "delivered", 1).await;
    assert_eq!(
        agent_messages(&successor),
        vec!["GitHub PR #3 opened in acme/api by alice: survive"]
    );
}

#[tokio::test]
async fn slack_feedback_buttons_reach_the_config_service() {
    let app = TestApp::spawn().await;
    let payload = json!({"type": "block_actions", "trigger_id": "tr-1", "user": {"id": "U7"}, "team": {"id": "T1"}, "channel": {"id": "C1"},
        "actions": [{"action_id": "feedback_positive", "value": "{\"run_id\":\"run-1\",\"correlation_id\":\"corr-1\"}"}]});
    let body = serde_urlencoded::to_string([("payload", payload.to_string())]).unwrap();
    let response = deliver_to(
        &app,
        Source::Slack,
        "/webhooks/slack/interactions",
        body.as_bytes(),
        "",
        &[("Content-Type", "application/x-www-form-urlencoded")],
    )
    .await;
    assert_eq!(response.status(), 200);
    wait_for_event_status(&app, "delivered", 1).await;
    let feedback = app.stack.config_service.state().feedback();
    assert_eq!(feedback.len(), 1);
    assert_eq!(feedback[0]["feedback"], "positive");
    assert_eq!(feedback[0]["run_id"], "run-1");
    assert_eq!(feedback[0]["user_id"], "U7");
}

#[tokio::test]
async fn operators_see_only_their_org_and_bodies_only_on_request() {
    let app = TestApp::spawn().await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    deliver(&app, Source::GitHub, &github_pr("acme/api", 1, "x"), "o-1", &[]).await;
    deliver(&app, Source::GitHub, &github_pr("nobody/else", 1, "x"), "o-2", &[]).await;
    wait_for_event_status(&app, "delivered", 1).await;
    wait_for_event_status(&app, "unrouted", 1).await;
    let acme = json_of(
        app.client
            .get(app.at("/api/v1/admin/webhooks/events"))
            .bearer_auth("dev-org-admin-acme")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(acme["items"].as_array().unwrap().len(), 1);
    let globex = json_of(
        app.client
            .get(app.at("/api/v1/admin/webhooks/events"))
            .bearer_auth("dev-org-admin-globex")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(globex["items"].as_array().unwrap().len(), 0);
    let id = acme["items"][0]["id"].as_str().unwrap();
    let foreign = app
        .client
        .get(app.at(&format!("/api/v1/admin/webhooks/events/{id}")))
        .bearer_auth("dev-org-admin-globex")
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 404);
    let filtered = app
        .admin_json("/api/v1/admin/webhooks/events?source=github&status=unrouted")
        .await;
    assert_eq!(filtered["items"].as_array().unwrap().len(), 1);
    let bad = app
        .client
        .get(app.at("/api/v1/admin/webhooks/events?status=lost"))
        .bearer_auth(SUPER_ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
}

#[tokio::test]
async fn the_sign_command_produces_a_delivery_the_service_accepts() {
    let app = TestApp::spawn().await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    let dir = std::env::temp_dir().join(format!("sign-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let body_path = dir.join("pr.json");
    std::fs::write(&body_path, github_pr("acme/api", 11, "signed by the CLI")).unwrap();
    for source in ["github", "pagerduty", "incidentio", "slack"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
            .args(["webhook", "sign", "--source", source, "--body"])
            .arg(&body_path)
            .args(["--url", &app.url])
            .env_clear()
            .env("GITHUB_WEBHOOK_SECRET", GITHUB_SECRET)
            .env("PAGERDUTY_WEBHOOK_SECRET", PAGERDUTY_SECRET)
            .env("INCIDENTIO_WEBHOOK_SECRET", INCIDENTIO_SECRET)
            .env("SLACK_SIGNING_SECRET", SLACK_SECRET)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(stdout.contains("curl -sS -X POST"), "{stdout}");
        if source != "github" {
            continue;
        }
        let mut request = app
            .client
            .post(app.at("/webhooks/github"))
            .header("X-GitHub-Event", "pull_request")
            .body(std::fs::read(&body_path).unwrap());
        for line in stdout.lines().take_while(|l| !l.is_empty()) {
            if let Some((name, value)) = line.split_once(": ") {
                if !value.starts_with('<') {
                    request = request.header(name, value);
                }
            }
        }
        assert_eq!(request.send().await.unwrap().status(), 200);
    }
    wait_for_event_status(&app, "delivered", 1).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn concurrent_twins_are_stored_once_even_in_the_same_batch() {
    let app = TestApp::spawn().await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    let deliveries = (0..25).flat_map(|i| {
        let body = github_pr("acme/api", i, "twin");
        let id = format!("twin-{i}");
        [(body.clone(), id.clone()), (body, id)]
    });
    let responses = futures::future::join_all(deliveries.map(|(body, id)| {
        let app = &app;
        async move { json_of(deliver(app, Source::GitHub, &body, &id, &[]).await).await }
    }))
    .await;
    let duplicates = responses.iter().filter(|r| r["duplicate"] == true).count();
    assert_eq!(duplicates, 25, "{responses:?}");
    assert!(responses.iter().all(|r| r["ok"] == true));
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orchestrator_webhook_events")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 25);
    wait_for_event_status(&app, "delivered", 25).await;
    assert_eq!(agent_messages(&app).len(), 25);
}

#[tokio::test]
async fn a_body_over_the_source_limit_is_413_before_anything_else() {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_GITHUB_BODY_LIMIT_BYTES".into(), "1024".into());
    })
    .await;
    let big = github_pr("acme/api", 1, &"x".repeat(2048));
    let response = deliver(&app, Source::GitHub, &big, "big-1", &[]).await;
    assert_eq!(response.status(), 413);
    assert_eq!(json_of(response).await["code"], "payload_too_large");
    // Unsigned too: the limit comes before verification.
    let unsigned = app
        .client
        .post(app.at("/webhooks/github"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 413);
    // Other sources keep their own limit.
    let slack = deliver(
        &app,
        Source::Slack,
        &slack_mention("Ev-big", "C1", "1.1", &"y".repeat(2048)),
        "",
        &[],
    )
    .await;
    assert_eq!(slack.status(), 200);
}

#[tokio::test]
async fn retention_purges_old_events_but_keeps_their_delivery_ids_for_dedupe() {
    let app = TestApp::spawn().await;
    deliver(&app, Source::GitHub, &github_pr("nobody/repo", 1, "old"), "old-1", &[]).await;
    wait_for_event_status(&app, "unrouted", 1).await;
    // Two days later, with one day of retention and the default week of dedupe.
    sqlx::query(
        "UPDATE orchestrator_webhook_events SET finished_at = now() - interval '2 days', received_at = now() - interval '2 days'",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE orchestrator_webhook_deliveries SET received_at = now() - interval '2 days'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (events, deliveries) = orchestrator::webhooks::store::purge(&app.db.pool, 1, 7).await.unwrap();
    assert_eq!((events, deliveries), (1, 0));
    let redelivered = deliver(&app, Source::GitHub, &github_pr("nobody/repo", 1, "old"), "old-1", &[]).await;
    assert_eq!(
        json_of(redelivered).await["duplicate"],
        true,
        "a late retry is still a duplicate"
    );
    // After the dedupe window the id goes too.
    sqlx::query("UPDATE orchestrator_webhook_deliveries SET received_at = now() - interval '8 days'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        orchestrator::webhooks::store::purge(&app.db.pool, 1, 7).await.unwrap(),
        (0, 1)
    );
}

#[tokio::test]
async fn a_delivery_with_room_goes_straight_to_dispatch_and_other_replicas_hear_of_the_rest() {
    let app = TestApp::spawn().await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    // Until its first look has found nothing else due (at start-up), the claim loop takes no
    // hand-offs: one delivery dispatched either way comes first.
    let response = deliver(&app, Source::GitHub, &github_pr("acme/api", 8, "First"), "n-0", &[]).await;
    assert_eq!(response.status(), 200);
    wait_for_event_status(&app, "delivered", 1).await;
    // Its NOTIFY reaches this replica too and makes the claim loop look once more; let it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // What another replica's dispatcher listens on.
    let mut listener = sqlx::postgres::PgListener::connect_with(&app.db.pool).await.unwrap();
    listener.listen("orchestrator_webhook_inbox").await.unwrap();

    // Idle workers, nothing due: stored leased to this replica and dispatched without a claim;
    // nobody else needs to hear of it.
    let response = deliver(&app, Source::GitHub, &github_pr("acme/api", 9, "Handed"), "n-1", &[]).await;
    assert_eq!(response.status(), 200);
    wait_for_event_status(&app, "delivered", 2).await;
    assert_eq!(agent_messages(&app).len(), 2);
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM orchestrator_webhook_events WHERE delivery_id = 'n-1'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 1, "taken once, by the hand-over");
    let heard = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(heard.is_err(), "a NOTIFY for an event handed over: {heard:?}");

    // A pull request with an unfinished event waits its turn: stored unleased, and announced.
    sqlx::query(
        "INSERT INTO orchestrator_webhook_events (id, source, kind, delivery_id, body, ordering_key, next_attempt_at)
         VALUES (gen_random_uuid(), 'github', 'pull_request', 'earlier', '\\x7b7d', 'github:acme/api#10',
                 now() + interval '1 hour')",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    let response = deliver(&app, Source::GitHub, &github_pr("acme/api", 10, "Waits"), "n-2", &[]).await;
    assert_eq!(response.status(), 200);
    let heard = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    assert!(
        matches!(heard, Ok(Ok(_))),
        "no NOTIFY after storing an event for any replica to claim: {heard:?}"
    );
    let leased: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT lease_owner FROM orchestrator_webhook_events WHERE delivery_id = 'n-2'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(leased, None);
}

#[tokio::test]
async fn an_offered_lease_is_taken_only_by_the_first_unfinished_event_of_its_conversation() {
    use orchestrator::webhooks::store::{insert_events, Inserted, NewEvent};
    let db = TestDb::create().await;
    sqlx::query(
        "INSERT INTO orchestrator_webhook_events (id, source, kind, delivery_id, body, ordering_key)
         VALUES (gen_random_uuid(), 'slack', 'app_mention', 'before', '\\x7b7d', 'slack:C1:busy')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let event = |delivery: &str, conversation: Option<&str>| NewEvent {
        id: uuid::Uuid::now_v7(),
        source: "slack".into(),
        kind: "app_mention".into(),
        delivery_id: delivery.into(),
        headers: json!({}),
        body: b"{}".to_vec(),
        ordering_key: conversation.map(str::to_string),
        fair_tag: 0,
    };
    let events = [
        event("alone", None),
        event("first", Some("slack:C1:t1")),
        event("second", Some("slack:C1:t1")),
        event("behind", Some("slack:C1:busy")),
        event("not-offered", Some("slack:C1:t2")),
        event("twin", None),
        event("twin", None),
    ];
    let leases: Vec<Option<uuid::Uuid>> = (0..events.len()).map(|i| (i != 4).then(uuid::Uuid::new_v4)).collect();
    let mut connection = db.pool.acquire().await.unwrap();
    let results = insert_events(&mut connection, &events, &leases, 30.0).await.unwrap();
    let leased: Vec<bool> = results.iter().map(|r| matches!(r, Inserted::Leased { .. })).collect();
    assert_eq!(leased, [true, true, false, false, false, true, false]);
    assert!(matches!(results[6], Inserted::Duplicate(id) if id == events[5].id));
    if let Inserted::Leased { lease, .. } = results[0] {
        assert_eq!(Some(lease), leases[0]);
    }
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orchestrator_webhook_events
         WHERE lease_until > now() + interval '20 seconds' AND attempts = 1 AND status = 'pending'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(live, 3);
}

/// The service's queue pool ([`orchestrator::db::queue_pool`]) on a test database.
fn queue_pool_of(db: &TestDb) -> sqlx::PgPool {
    let config = orchestrator::config::DatabaseConfig {
        display_url: String::new(),
        url: Secret::new(db.url.clone()),
        pool_size: 1,
        acquire_timeout: Duration::from_secs(10),
        lock_pool_size: 1,
        auto_migrate: false,
    };
    orchestrator::db::queue_pool(&config).unwrap()
}

/// The plan Postgres picks for `sql` with these parameters on `pool`, as text.
async fn plan_of(pool: &sqlx::PgPool, sql: &str, bind: impl FnOnce(PlanQuery<'_>) -> PlanQuery<'_>) -> String {
    let explain = format!("EXPLAIN {sql}");
    let rows: Vec<String> = bind(sqlx::query_scalar(&explain)).fetch_all(pool).await.unwrap();
    rows.join("\n")
}

/// The plan of a claim of 32 from the whole fair index.
async fn claim_plan(pool: &sqlx::PgPool) -> String {
    use orchestrator::webhooks::store::CLAIM_SQL;
    plan_of(pool, CLAIM_SQL, |q| {
        q.bind(32_i64).bind(60.0_f64).bind(i64::MIN).bind(i64::MAX)
    })
    .await
}

type PlanQuery<'q> = sqlx::query::QueryScalar<'q, sqlx::Postgres, String, sqlx::postgres::PgArguments>;

#[tokio::test]
async fn claims_and_outcomes_keep_their_plans_when_the_statistics_say_the_inbox_is_empty() {
    use orchestrator::webhooks::store::RECORD_OUTCOMES_SQL;
    let db = TestDb::create().await;
    // Statistics taken while the inbox was empty, then a burst they have not seen.
    sqlx::query("ANALYZE orchestrator_webhook_events")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO orchestrator_webhook_events (id, source, kind, delivery_id, body, ordering_key)
         SELECT gen_random_uuid(), 'github', 'pull_request', 'd-' || g, convert_to(repeat('x', 400), 'UTF8'),
                'github:acme/api#' || g
         FROM generate_series(1, 5000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let queue = queue_pool_of(&db);

    let claim = claim_plan(&queue).await;
    assert!(
        claim.contains("Index Scan using orchestrator_webhook_events_fair_idx"),
        "{claim}"
    );
    for unbounded in ["Sort", "Bitmap", "Seq Scan"] {
        assert!(
            !claim.contains(unbounded),
            "a claim must not read the whole backlog:\n{claim}"
        );
    }

    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM orchestrator_webhook_events LIMIT 30")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let texts = vec![None::<String>; ids.len()];
    let outcomes = plan_of(&queue, RECORD_OUTCOMES_SQL, |q| {
        q.bind(ids.clone())
            .bind(ids.clone())
            .bind(vec!["delivered"; ids.len()])
            .bind(vec![None::<chrono::DateTime<chrono::Utc>>; ids.len()])
            .bind(texts.clone())
            .bind(texts.clone())
            .bind(texts.clone())
            .bind(texts.clone())
            .bind(texts.clone())
            .bind(texts.clone())
    })
    .await;
    assert!(
        outcomes.contains("Index Scan using orchestrator_webhook_events_pkey"),
        "{outcomes}"
    );
    for unbounded in ["Seq Scan", "Hash Join", "Merge Join"] {
        assert!(
            !outcomes.contains(unbounded),
            "an outcome batch must not read the whole table:\n{outcomes}"
        );
    }
    queue.close().await;
}

#[tokio::test]
async fn claims_and_leases_keep_their_index_lookups_on_a_new_inbox() {
    use orchestrator::webhooks::store::{RELEASE_LEASES_SQL, RENEW_LEASES_SQL};
    // A new inbox, never analyzed (a fresh database, or wherever autovacuum is off): every partial
    // index of pending events looks as cheap as a lookup, and the queue pool's generic plans,
    // made once per connection, keep what was chosen then. The claim's probe for an earlier event
    // of the conversation walked the whole fair index once per candidate, and a renewal the whole
    // ordering index once per lease.
    let db = TestDb::create().await;
    let queue = queue_pool_of(&db);
    let claim = claim_plan(&queue).await;
    assert!(
        claim.contains("Index Scan using orchestrator_webhook_events_ordering_idx"),
        "{claim}"
    );
    assert_eq!(
        claim.matches("orchestrator_webhook_events_fair_idx").count(),
        1,
        "only the claim's own walk reads the fair index:\n{claim}"
    );

    let leases = vec![uuid::Uuid::new_v4(); 3];
    let renew = plan_of(&queue, RENEW_LEASES_SQL, |q| {
        q.bind(leases.clone()).bind(leases.clone()).bind(6.0_f64)
    })
    .await;
    let release = plan_of(&queue, RELEASE_LEASES_SQL, |q| {
        q.bind(leases.clone()).bind(leases.clone())
    })
    .await;
    for (name, plan) in [("renewal", renew), ("release", release)] {
        let scans: Vec<&str> = plan.lines().filter(|l| l.contains("Index Scan")).collect();
        assert!(
            !scans.is_empty() && scans.iter().all(|l| l.contains("orchestrator_webhook_events_pkey")),
            "a {name} looks each lease up by its event id:\n{plan}"
        );
    }
    queue.close().await;
}

#[tokio::test]
async fn storing_events_probes_each_conversation_whatever_the_statistics_say() {
    use orchestrator::webhooks::store::INSERT_EVENTS_SQL;
    let db = TestDb::create().await;
    // Statistics taken while every event was finished, then a backlog they have not seen. Written
    // as NOT EXISTS, the probe became one read of every pending entry, hashed (no key condition).
    sqlx::query(
        "INSERT INTO orchestrator_webhook_events (id, source, kind, delivery_id, body, ordering_key, status)
         SELECT gen_random_uuid(), 'github', 'pull_request', 'done-' || g, '\\x7b7d', 'github:acme/api#' || g,
                'delivered'
         FROM generate_series(1, 20000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE orchestrator_webhook_events")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO orchestrator_webhook_events (id, source, kind, delivery_id, body, ordering_key)
         SELECT gen_random_uuid(), 'github', 'pull_request', 'open-' || g, '\\x7b7d', 'github:acme/web#' || g
         FROM generate_series(1, 5000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let queue = queue_pool_of(&db);
    let n = 12;
    let plan = plan_of(&queue, INSERT_EVENTS_SQL, |q| {
        q.bind((0..n).map(|_| uuid::Uuid::now_v7()).collect::<Vec<_>>())
            .bind(vec!["github"; n])
            .bind(vec!["pull_request"; n])
            .bind((0..n).map(|i| format!("new-{i}")).collect::<Vec<_>>())
            .bind(vec!["{}"; n])
            .bind(vec![b"{}".to_vec(); n])
            .bind((0..n).map(|i| format!("github:acme/web#{i}")).collect::<Vec<_>>())
            .bind(vec![0_i64; n])
            .bind((0..n).map(|_| Some(uuid::Uuid::new_v4())).collect::<Vec<_>>())
            .bind(6.0_f64)
    })
    .await;
    assert!(
        plan.contains("Index Cond: (ordering_key = i.ordering_key)"),
        "each event must probe its own conversation:\n{plan}"
    );
    assert!(
        !plan.contains("Seq Scan on orchestrator_webhook_events"),
        "storing a batch must not read every pending event:\n{plan}"
    );
    queue.close().await;
}

/// The nice value of each of this process's threads with the given name.
#[cfg(target_os = "linux")]
fn nice_of_threads(name: &str) -> Vec<i64> {
    let mut nices = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis start at the third (state); nice is the 19th.
        if let Some(nice) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(16))
            .and_then(|n| n.parse().ok())
        {
            nices.push(nice);
        }
    }
    nices
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn dispatch_runs_on_threads_of_lower_priority_than_requests() {
    let app = TestApp::spawn().await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    assert_eq!(
        deliver(&app, Source::GitHub, &github_pr("acme/api", 9, "nice"), "n-1", &[])
            .await
            .status(),
        200
    );
    wait_for_event_status(&app, "delivered", 1).await;
    let nices = nice_of_threads("dispatch");
    assert!(!nices.is_empty(), "no dispatch threads");
    // Tests run in parallel, each app with its own dispatch threads, all at the default.
    assert!(nices.iter().all(|&n| n == 10), "{nices:?}");
    // The request threads keep their priority.
    assert!(nice_of_threads("tokio-runtime-w").iter().all(|&n| n == 0));
}

#[tokio::test]
async fn the_inbox_depth_gauge_reads_only_open_events() {
    use orchestrator::webhooks::store::{open_counts, OPEN_COUNTS_SQL};
    let db = TestDb::create().await;
    // A long history of finished events and a few waiting ones, with statistics that know it.
    sqlx::query(
        "INSERT INTO orchestrator_webhook_events (id, source, kind, delivery_id, body, status, finished_at)
         SELECT gen_random_uuid(), 'github', 'push', 'd-' || g, NULL,
                CASE WHEN g <= 3 THEN 'pending' ELSE 'delivered' END, CASE WHEN g > 3 THEN now() END
         FROM generate_series(1, 20000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE orchestrator_webhook_events")
        .execute(&db.pool)
        .await
        .unwrap();
    let plan = plan_of(&db.pool, OPEN_COUNTS_SQL, |q| q).await;
    assert!(
        !plan.contains("Seq Scan"),
        "counting open events must not read the history:\n{plan}"
    );
    assert_eq!(open_counts(&db.pool).await.unwrap(), vec![("pending".to_string(), 3)]);
}

/// Chaos: a replica killed (every task and connection at once, as `kill -9`) in the middle of a
/// stream of deliveries. Nothing acknowledged is lost, what it held is taken over within about a
/// lease (6 s by default), and only the agent calls in flight at the kill are made again.
#[tokio::test]
async fn a_dispatch_whose_lease_is_taken_over_stops() {
    // Renewals every second; the agent takes 6 s.
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_DISPATCH_LEASE_SECONDS".into(), "3".into());
    })
    .await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    app.stack.agent.state().set_delay(Duration::from_secs(6));
    let response = deliver(&app, Source::GitHub, &github_pr("acme/api", 1, "slow"), "t-1", &[]).await;
    assert_eq!(response.status(), 200);
    eventually(5, "the agent call to start", || async {
        (!app.stack.agent.calls_to("POST", "/agents/").is_empty()).then_some(())
    })
    .await;
    // Another replica takes the event over (as if this one had stalled past its lease).
    sqlx::query("UPDATE orchestrator_webhook_events SET lease_owner = gen_random_uuid()")
        .execute(&app.db.pool)
        .await
        .unwrap();
    eventually(4, "the dispatch to stop and cancel its agent call", || async {
        (app.stack.agent.state().runs_cancelled() == 1).then_some(())
    })
    .await;
    assert_eq!(app.stack.agent.state().runs_completed(), 0);
}

#[tokio::test]
async fn a_replica_killed_mid_stream_loses_nothing_and_its_work_is_taken_over_in_seconds() {
    let app = TestApp::spawn().await;
    let survivor = app.another(|_| {}).await;
    own(&app, "sre", json!({"github_repos": ["acme/api"]}));
    // Agent runs long enough that the victim holds several at the kill.
    app.stack.agent.state().set_delay(Duration::from_millis(800));
    let total = 40u64;
    for n in 0..total / 2 {
        let response = deliver(
            &app,
            Source::GitHub,
            &github_pr("acme/api", n, "chaos"),
            &format!("c-{n}"),
            &[],
        )
        .await;
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows = event_rows(&survivor).await;
    let in_flight = rows.iter().filter(|e| e["status"] == "processing").count();
    app.crash();
    let killed = std::time::Instant::now();
    for n in total / 2..total {
        let response = deliver(
            &survivor,
            Source::GitHub,
            &github_pr("acme/api", n, "chaos"),
            &format!("c-{n}"),
            &[],
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    wait_for_event_status(&survivor, "delivered", total as usize).await;
    let taken_over = killed.elapsed();
    let messages = agent_messages(&survivor);
    for n in 0..total {
        let expected = format!("GitHub PR #{n} opened in acme/api by alice: chaos");
        assert!(messages.contains(&expected), "event {n} was lost");
    }
    let repeated = messages.len() - total as usize;
    assert!(
        repeated <= in_flight.max(1) + 2,
        "{repeated} agent calls were repeated with {in_flight} in flight at the kill"
    );
    // Everything was delivered within the lease (6 s) plus the agent's 0.8 s a run, with margin
    // for a loaded test machine.
    assert!(taken_over < Duration::from_secs(20), "took {taken_over:?}");
    survivor.stop().await;
}

#[tokio::test]
async fn an_event_waiting_behind_its_thread_does_not_keep_the_claim_loop_busy() {
    // The service's own poll interval: an event that waited for it would show.
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_DISPATCH_POLL_INTERVAL_MS".into(), "2000".into());
    })
    .await;
    own(&app, "sre", json!({"slack_channel_ids": ["C9"]}));
    app.stack.agent.state().set_delay(Duration::from_secs(4));
    for i in 0..2 {
        let body = json!({"type": "event_callback", "team_id": "T1", "event_id": format!("Ev-wait-{i}"),
            "event": {"type": "app_mention", "channel": "C9", "user": "U2", "text": format!("message {i}"), "ts": format!("300.{i}"), "thread_ts": "300.0"}});
        deliver(&app, Source::Slack, body.to_string().as_bytes(), "", &[]).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app.stack.agent.state().runs_started() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first event never reached the agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The second event is due but waits for the first: while it does, the claim loop looks at
    // the inbox once a poll interval, not in a loop (once it spun: 5,174 transactions in 2 s).
    // Backends report their counts late, so start-up's own transactions may land in the window.
    let commits = || async {
        sqlx::query_scalar::<_, i64>("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&app.db.pool)
            .await
            .unwrap()
    };
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = commits().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = commits().await - before;
    assert!(
        during < 200,
        "{during} transactions in 2 s while one event waited for its thread"
    );
    // And it goes as soon as the first is done, without waiting for the poll interval (2 s).
    let agent = app.stack.agent.state();
    while agent.runs_completed() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(5),
            "the first run never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_done = tokio::time::Instant::now();
    while agent.runs_started() < 2 {
        assert!(
            first_done.elapsed() < Duration::from_secs(1),
            "the second event of the thread waited over a second after the first was done"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for_event_status(&app, "delivered", 2).await;
    assert_eq!(agent_messages(&app), vec!["message 0", "message 1"]);
}
