//! A team's whole lifecycle against real Postgres and the stand-ins: changes converge,
//! deprovisioning removes everything, runs can be cancelled and time out, and the teams view.

use std::time::Duration;

use orchestrator::webhooks::signature::Source;
use serde_json::{json, Value};

use crate::dropin::old_cronjob;
use crate::helpers::*;
use crate::provisioning::{
    app_with_a_sleeping_resumer, insert_orphan, provision, provision_async, step, wait_for_status, ORG,
};
use crate::webhooks::{deliver, github_pr, slack_mention, wait_for_event_status};

async fn deprovision(app: &TestApp, body: Value) -> reqwest::Response {
    app.client
        .post(app.at("/api/v1/admin/deprovision/team"))
        .bearer_auth(SUPER_ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn cancel(app: &TestApp, run_id: &str, query: &str) -> reqwest::Response {
    app.client
        .post(app.at(&format!("/api/v1/admin/provision/runs/{run_id}/cancel{query}")))
        .bearer_auth(SUPER_ADMIN)
        .send()
        .await
        .unwrap()
}

async fn get_as(app: &TestApp, token: &str, path: &str) -> reqwest::Response {
    app.client.get(app.at(path)).bearer_auth(token).send().await.unwrap()
}

/// The names of the objects of a kind, sorted.
fn names(app: &TestApp, resource: &str) -> Vec<String> {
    let mut names: Vec<String> = app
        .stack
        .kubernetes
        .state()
        .objects(resource)
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn succeeded(run: &Value) {
    assert_eq!(run["status"], "succeeded", "{run:#}");
}

fn run_id_of(run: &Value) -> String {
    run["provisioning_run_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn each_change_to_a_team_converges_it_with_nothing_left_behind() {
    let app = TestApp::spawn().await;
    let config = || app.stack.config_service.state().node_config(ORG, "life").unwrap();
    let change = |body: Value| async {
        let mut body = body;
        body["org_id"] = json!(ORG);
        body["team_node_id"] = json!("life");
        let run = json_of(provision(&app, SUPER_ADMIN, body).await).await;
        succeeded(&run);
        run
    };

    change(
        json!({"slack_channel_ids": ["C1"], "routing": {"github_repos": ["acme/life"]},
        "pipeline_schedule": "0 3 * * *", "deployment_mode": "dedicated"}),
    )
    .await;
    assert_eq!(names(&app, "cronjobs"), ["ai-pipeline-acme-life"]);
    assert_eq!(names(&app, "deployments"), ["agent-dedicated-acme-life"]);
    assert_eq!(names(&app, "services"), ["agent-dedicated-acme-life"]);
    assert!(config()["agent"]["dedicated_service_url"].is_string());

    // The schedule off: its CronJob goes; what was asked before and not named now stays.
    let run = change(json!({"create_pipeline_schedule": false})).await;
    assert!(names(&app, "cronjobs").is_empty());
    assert_eq!(names(&app, "deployments"), ["agent-dedicated-acme-life"]);
    assert_eq!(
        step(&run, "bootstrap")["status"],
        "skipped",
        "the first ingestion runs once"
    );
    assert_eq!(run["steps"]["team_token"]["created"], false);
    assert_eq!(run["steps"]["pipeline_cronjob"]["removed"]["deleted"], true);

    // Dedicated to shared: the Deployment, the Service and the URL go, so the team's agent runs
    // go to the shared agent again.
    change(json!({"deployment_mode": "shared"})).await;
    assert!(names(&app, "deployments").is_empty() && names(&app, "services").is_empty());
    assert!(config()["agent"]["dedicated_service_url"].is_null(), "{:#}", config());

    // And back, with the schedule on again (its cron expression kept).
    change(json!({"deployment_mode": "dedicated", "create_pipeline_schedule": true})).await;
    assert_eq!(names(&app, "deployments"), ["agent-dedicated-acme-life"]);
    assert_eq!(names(&app, "services"), ["agent-dedicated-acme-life"]);
    assert!(config()["agent"]["dedicated_service_url"].is_string());
    let cronjob = app
        .stack
        .kubernetes
        .state()
        .get("cronjobs", "incidentfox", "ai-pipeline-acme-life")
        .unwrap();
    assert_eq!(cronjob["spec"]["schedule"], "0 3 * * *");

    // A routing list given replaces that list; the others stay.
    change(json!({"slack_channel_ids": ["C2"]})).await;
    assert_eq!(config()["routing"]["slack_channel_ids"], json!(["C2"]));
    assert_eq!(config()["routing"]["github_repos"], json!(["acme/life"]));
    deliver(
        &app,
        Source::Slack,
        &slack_mention("Ev-old", "C1", "1.1", "hi"),
        "Ev-old",
        &[],
    )
    .await;
    let unrouted = wait_for_event_status(&app, "unrouted", 1).await;
    assert!(
        unrouted[0]["last_error"].as_str().unwrap().contains("C1"),
        "{unrouted:#?}"
    );

    let team = app.admin_json("/api/v1/admin/teams/acme/life").await;
    assert_eq!(team["status"], "active");
    assert_eq!(team["desired"]["routing"]["slack_channel_ids"], json!(["C2"]));
    assert_eq!(team["desired"]["routing"]["github_repos"], json!(["acme/life"]));
    assert_eq!(team["desired"]["pipeline_schedule_enabled"], true);
    assert_eq!(team["desired"]["deployment_mode"], "dedicated");
    assert_eq!(team["live"]["token_active"], true);
    assert_eq!(team["live"]["pipeline_cronjob"]["schedule"], "0 3 * * *");
    assert_eq!(team["live"]["dedicated_agent"]["name"], "agent-dedicated-acme-life");
    assert!(team["live"]["dependency_discovery_cronjob"].is_null());
    assert_eq!(team["recent_runs"].as_array().unwrap().len(), 5);
    assert_eq!(team["recent_runs"][0]["provisioning_run_id"], team["last_run_id"]);
    // Nothing was issued or bootstrapped twice.
    assert_eq!(app.stack.config_service.state().issued_token_count(ORG, "life"), 1);
    assert_eq!(app.stack.ai_pipeline.state().bootstraps().len(), 1);
}

#[tokio::test]
async fn deprovisioning_removes_every_object_token_and_route_and_a_second_is_a_no_op() {
    let app = TestApp::spawn().await;
    let provisioned = json_of(
        provision(
            &app,
            SUPER_ADMIN,
            json!({"org_id": ORG, "team_node_id": "gone", "routing": {"github_repos": ["acme/gone"]},
                "create_pipeline_schedule": true, "deployment_mode": "dedicated"}),
        )
        .await,
    )
    .await;
    succeeded(&provisioned);
    // The dependency-discovery CronJob, as the existing service's sync created it.
    app.stack
        .kubernetes
        .state()
        .insert("cronjobs", old_cronjob(ORG, "gone", "dep-discovery-acme-gone"))
        .unwrap();
    let everything = || {
        (
            names(&app, "cronjobs"),
            names(&app, "deployments"),
            names(&app, "services"),
        )
    };
    let before = everything();
    assert_eq!(before.0.len(), 2);

    // A dry run: the plan from live state, and nothing changes.
    let plan = deprovision(&app, json!({"org_id": ORG, "team_node_id": "gone", "dry_run": true})).await;
    assert_eq!(plan.status(), 200);
    let plan = json_of(plan).await;
    assert_eq!(plan["ok"], true, "{plan:#}");
    assert_eq!(plan["dry_run"], true);
    assert!(plan["provisioning_run_id"].is_null());
    let deleted = &plan["deleted"];
    assert_eq!(deleted["pipeline_cronjob"]["would_delete"], true, "{plan:#}");
    assert_eq!(deleted["dependency_discovery_cronjob"]["would_delete"], true);
    assert_eq!(deleted["dedicated_deployment"]["would_delete_deployment"], true);
    assert_eq!(deleted["team_tokens"]["would_revoke"].as_array().unwrap().len(), 1);
    assert_eq!(deleted["routing"]["would_clear"], json!(["github_repos"]));
    assert_eq!(everything(), before);
    assert!(app.stack.config_service.state().team_tokens(ORG, "gone")[0]
        .revoked_at
        .is_none());
    let runs = app
        .admin_json("/api/v1/admin/provision/runs?workflow=deprovision")
        .await;
    assert!(runs["items"].as_array().unwrap().is_empty(), "a dry run records no run");

    // The real thing.
    let response = deprovision(&app, json!({"org_id": ORG, "team_node_id": "gone"})).await;
    assert_eq!(response.status(), 200);
    let done = json_of(response).await;
    assert_eq!(done["ok"], true, "{done:#}");
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["errors"], json!([]));
    let deleted = &done["deleted"];
    assert_eq!(deleted["pipeline_cronjob"]["deleted"], true, "{done:#}");
    assert_eq!(deleted["dependency_discovery_cronjob"]["deleted"], true);
    assert_eq!(deleted["dedicated_deployment"]["deployment_deleted"], true);
    assert_eq!(deleted["dedicated_deployment"]["service_deleted"], true);
    assert_eq!(deleted["team_tokens"]["revoked"].as_array().unwrap().len(), 1);
    assert_eq!(deleted["routing"]["cleared"], json!(["github_repos"]));
    assert_eq!(deleted["routing"]["dedicated_service_url"], true);
    assert_eq!(everything(), (vec![], vec![], vec![]));
    let tokens = app.stack.config_service.state().team_tokens(ORG, "gone");
    assert!(tokens.iter().all(|t| t.revoked_at.is_some()));
    let config = app.stack.config_service.state().node_config(ORG, "gone").unwrap();
    assert_eq!(config["routing"]["github_repos"], json!([]));
    assert!(config["agent"]["dedicated_service_url"].is_null());

    let team = app.admin_json("/api/v1/admin/teams/acme/gone").await;
    assert_eq!(team["status"], "deprovisioned");
    assert!(team["deprovisioned_at"].is_string());
    assert_eq!(team["live"]["token_active"], false);
    // Its runs stay readable.
    let old_run = app
        .admin_json(&format!("/api/v1/admin/provision/runs/{}", run_id_of(&provisioned)))
        .await;
    succeeded(&old_run);

    // A webhook for the team now finds nobody.
    deliver(&app, Source::GitHub, &github_pr("acme/gone", 1, "x"), "gone-1", &[]).await;
    wait_for_event_status(&app, "unrouted", 1).await;

    // Again: nothing is left to remove, and nothing is written anywhere.
    let writes = || {
        (
            app.stack.kubernetes.calls_to("DELETE", "").len(),
            app.stack.kubernetes.calls_to("PATCH", "").len(),
            app.stack.config_service.calls_to("DELETE", "/tokens").len(),
            app.stack.config_service.calls_to("PUT", "/config").len(),
        )
    };
    let writes_before = writes();
    let again = json_of(deprovision(&app, json!({"org_id": ORG, "team_node_id": "gone"})).await).await;
    assert_eq!(again["ok"], true, "{again:#}");
    assert_eq!(again["deleted"]["pipeline_cronjob"], "not_found");
    assert_eq!(again["deleted"]["dependency_discovery_cronjob"], "not_found");
    assert_eq!(again["deleted"]["dedicated_deployment"], "not_found");
    assert_eq!(again["deleted"]["team_tokens"]["revoked"], json!([]));
    assert_eq!(again["deleted"]["routing"]["cleared"], json!([]));
    assert_eq!(writes(), writes_before);

    // An unknown team is 404, dry run or not.
    for dry_run in [true, false] {
        let unknown = deprovision(
            &app,
            json!({"org_id": ORG, "team_node_id": "never", "dry_run": dry_run}),
        )
        .await;
        assert_eq!(unknown.status(), 404);
        assert_eq!(json_of(unknown).await["code"], "team_not_found");
    }
    // And the team can be provisioned again from nothing.
    let again = json_of(provision(&app, SUPER_ADMIN, json!({"org_id": ORG, "team_node_id": "gone"})).await).await;
    succeeded(&again);
    assert_eq!(step(&again, "bootstrap")["status"], "succeeded");
    // A deprovisioned team may have kept its objects (`delete_k8s_resources: false`): the
    // removal is checked, and finds nothing here.
    assert_eq!(again["steps"]["dedicated_deployment"]["removed"], "not_found");
}

#[tokio::test]
async fn a_crash_in_the_middle_of_a_deprovision_resumes_elsewhere_and_finishes_once() {
    let fast_resume = |env: &mut std::collections::HashMap<String, String>| {
        env.insert("ORCHESTRATOR_PROVISION_RESUME_INTERVAL_MS".into(), "200".into());
    };
    let app = TestApp::spawn_with(fast_resume).await;
    succeeded(
        &json_of(
            provision(
                &app,
                SUPER_ADMIN,
                json!({"org_id": ORG, "team_node_id": "doomed", "create_pipeline_schedule": true,
                    "deployment_mode": "dedicated"}),
            )
            .await,
        )
        .await,
    );
    let patches_before = app.stack.config_service.calls_to("PUT", "/config").len();
    app.stack.kubernetes.faults().set_latency(Duration::from_millis(1500));
    let started = app
        .client
        .post(app.at("/api/v1/admin/deprovision/team"))
        .bearer_auth(SUPER_ADMIN)
        .header("Prefer", "respond-async")
        .json(&json!({"org_id": ORG, "team_node_id": "doomed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let run_id = json_of(started).await["provisioning_run_id"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(30, "a CronJob's deletion to be in flight", || async {
        (!app.stack.kubernetes.calls_to("DELETE", "/cronjobs").is_empty()).then_some(())
    })
    .await;
    let successor = app.another(fast_resume).await;
    app.stack.kubernetes.faults().reset();
    app.crash();

    let run = wait_for_status(&successor, &run_id, "succeeded").await;
    assert!(run["executions"].as_i64().unwrap() >= 2, "{run:#}");
    assert_eq!(run["workflow"], "deprovision");
    let stack = &successor.stack;
    assert_eq!(
        stack.config_service.calls_to("DELETE", "/tokens").len(),
        1,
        "the token was revoked once"
    );
    assert_eq!(
        stack.config_service.calls_to("PUT", "/config").len(),
        patches_before + 1,
        "the routing was cleared once"
    );
    assert!(names(&successor, "cronjobs").is_empty());
    assert!(names(&successor, "deployments").is_empty() && names(&successor, "services").is_empty());
    let team = successor.admin_json("/api/v1/admin/teams/acme/doomed").await;
    assert_eq!(team["status"], "deprovisioned");
}

#[tokio::test]
async fn a_cancelled_run_stops_at_the_next_step_boundary_and_undoes_only_when_asked() {
    let app = TestApp::spawn().await;
    app.stack.ai_pipeline.faults().set_latency(Duration::from_millis(800));
    let bootstraps_in_flight = |count: usize| {
        let app = &app;
        async move {
            eventually(30, "the bootstrap to be in flight", || async {
                (app.stack.ai_pipeline.calls_to("POST", "/bootstrap").len() >= count).then_some(())
            })
            .await
        }
    };

    let run = json_of(
        provision_async(
            &app,
            json!({"org_id": ORG, "team_node_id": "halt", "create_pipeline_schedule": true}),
        )
        .await,
    )
    .await;
    let run_id = run_id_of(&run);
    bootstraps_in_flight(1).await;
    let response = cancel(&app, &run_id, "").await;
    assert_eq!(response.status(), 200, "answered once the run stopped");
    let cancelled = json_of(response).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled:#}");
    assert_eq!(cancelled["cancel_requested"], true);
    assert_eq!(cancelled["cancelled_by"], "super-admin");
    assert_eq!(cancelled["error_detail"]["code"], "cancelled");
    assert_eq!(
        step(&cancelled, "bootstrap")["status"],
        "succeeded",
        "the step in flight finished"
    );
    assert_eq!(
        step(&cancelled, "pipeline_cronjob")["status"],
        "pending",
        "the next did not start"
    );
    assert!(names(&app, "cronjobs").is_empty());
    let tokens = app.stack.config_service.state().team_tokens(ORG, "halt");
    assert!(tokens[0].revoked_at.is_none(), "nothing undone unless asked");
    let team = app.admin_json("/api/v1/admin/teams/acme/halt").await;
    assert_eq!(team["status"], "failed");

    // A finished run cannot be cancelled: 409 with its status.
    let again = cancel(&app, &run_id, "").await;
    assert_eq!(again.status(), 409);
    let again = json_of(again).await;
    assert_eq!(again["code"], "run_finished");
    assert_eq!(again["status"], "cancelled");

    // With undo: what the run did is undone, in reverse.
    let run = json_of(
        provision_async(
            &app,
            json!({"org_id": ORG, "team_node_id": "halt-undo", "create_pipeline_schedule": true}),
        )
        .await,
    )
    .await;
    bootstraps_in_flight(2).await;
    let undone = json_of(cancel(&app, &run_id_of(&run), "?undo=true").await).await;
    assert_eq!(undone["status"], "cancelled", "{undone:#}");
    assert_eq!(undone["error_detail"]["undone"], true);
    assert_eq!(step(&undone, "team_token")["status"], "rolled_back");
    let tokens = app.stack.config_service.state().team_tokens(ORG, "halt-undo");
    assert!(tokens[0].revoked_at.is_some(), "the token it issued is revoked");
    assert!(undone["team_token"].is_null() && undone["team_token_held"] == false);
}

#[tokio::test]
async fn a_run_nobody_executes_is_cancelled_at_once() {
    let app = app_with_a_sleeping_resumer().await;
    let orphan = insert_orphan(&app, "abandoned").await;
    let response = cancel(&app, &orphan.to_string(), "").await;
    assert_eq!(response.status(), 200);
    let run = json_of(response).await;
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert_eq!(run["executions"], 2, "taken over to be stopped");
    assert!(
        app.stack.config_service.calls_to("PUT", "/config").is_empty(),
        "no step ran"
    );
}

#[tokio::test]
async fn a_run_past_its_deadline_times_out_and_a_retry_finishes_it() {
    let app = TestApp::spawn_with(|env| {
        env.insert("ORCHESTRATOR_RUN_DEADLINE_SECONDS".into(), "1".into());
    })
    .await;
    app.stack.ai_pipeline.faults().set_latency(Duration::from_millis(1500));
    let response = provision(
        &app,
        SUPER_ADMIN,
        json!({"org_id": ORG, "team_node_id": "late", "create_pipeline_schedule": true}),
    )
    .await;
    assert_eq!(response.status(), 504);
    let run = json_of(response).await;
    assert_eq!(run["status"], "timed_out", "{run:#}");
    assert_eq!(run["error_detail"]["code"], "deadline_exceeded");
    assert_eq!(run["error_detail"]["step"], "pipeline_cronjob");
    assert_eq!(step(&run, "pipeline_cronjob")["status"], "pending");
    assert!(run["team_token"].is_string(), "the token issued before is handed out");

    app.stack.ai_pipeline.faults().reset();
    let retried = app
        .client
        .post(app.at(&format!("/api/v1/admin/provision/runs/{}/retry", run_id_of(&run))))
        .bearer_auth(SUPER_ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    let retried = json_of(retried).await;
    succeeded(&retried);
    assert_eq!(retried["executions"], 2);
    assert_eq!(names(&app, "cronjobs"), ["ai-pipeline-acme-late"]);
    assert_eq!(app.stack.ai_pipeline.state().bootstraps().len(), 1);
}

#[tokio::test]
async fn the_teams_view_is_org_scoped_and_pages() {
    let app = TestApp::spawn().await;
    for (org, team, body) in [
        ("acme", "t1", json!({})),
        ("acme", "t2", json!({"create_pipeline_schedule": true})),
        ("acme", "t3", json!({"deployment_mode": "dedicated"})),
        ("globex", "g1", json!({})),
    ] {
        let mut body = body;
        body["org_id"] = json!(org);
        body["team_node_id"] = json!(team);
        succeeded(&json_of(provision(&app, SUPER_ADMIN, body).await).await);
    }
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                format!(
                    "{}/{}",
                    t["org_id"].as_str().unwrap(),
                    t["team_node_id"].as_str().unwrap()
                )
            })
            .collect()
    };
    let all = app.admin_json("/api/v1/admin/teams").await;
    assert_eq!(ids(&all), ["acme/t1", "acme/t2", "acme/t3", "globex/g1"]);
    let first = app.admin_json("/api/v1/admin/teams?limit=3").await;
    assert_eq!(ids(&first), ["acme/t1", "acme/t2", "acme/t3"]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = app
        .admin_json(&format!("/api/v1/admin/teams?limit=3&cursor={cursor}"))
        .await;
    assert_eq!(ids(&second), ["globex/g1"]);
    assert!(second["next_cursor"].is_null());
    let active = app.admin_json("/api/v1/admin/teams?status=active&org_id=globex").await;
    assert_eq!(ids(&active), ["globex/g1"]);

    // An org admin sees its own org only.
    let own = json_of(get_as(&app, "dev-org-admin-acme", "/api/v1/admin/teams").await).await;
    assert_eq!(ids(&own), ["acme/t1", "acme/t2", "acme/t3"]);
    for path in [
        "/api/v1/admin/teams?org_id=globex",
        "/api/v1/admin/teams/globex/g1",
        "/api/v1/admin/teams/globex/g1/deployment",
        "/api/v1/admin/teams/globex/g1/pipeline",
    ] {
        let response = get_as(&app, "dev-org-admin-acme", path).await;
        assert_eq!(response.status(), 403, "{path}");
        assert_eq!(json_of(response).await["code"], "org_forbidden", "{path}");
    }
    let unknown = get_as(&app, SUPER_ADMIN, "/api/v1/admin/teams/acme/nobody").await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(json_of(unknown).await["code"], "team_not_found");
    let bad = get_as(&app, SUPER_ADMIN, "/api/v1/admin/teams?status=sleeping").await;
    assert_eq!(bad.status(), 422);
    assert_eq!(json_of(bad).await["field"], "status");
    // A cursor this service did not issue (here one naming "a\0" as the org) is 422, not 500.
    let forged = get_as(&app, SUPER_ADMIN, "/api/v1/admin/teams?cursor=YQB8Yg").await;
    assert_eq!(forged.status(), 422);
    assert_eq!(json_of(forged).await["field"], "cursor");

    // The existing service's views of one team.
    let shared = app.admin_json("/api/v1/admin/teams/acme/t1/deployment").await;
    assert_eq!(shared["mode"], "shared");
    assert!(shared["name"].is_null());
    let dedicated = app.admin_json("/api/v1/admin/teams/acme/t3/deployment").await;
    assert_eq!(dedicated["mode"], "dedicated", "{dedicated:#}");
    assert_eq!(dedicated["name"], "agent-dedicated-acme-t3");
    assert_eq!(dedicated["replicas"], 1);
    assert_eq!(
        dedicated["service_url"],
        "http://agent-dedicated-acme-t3.incidentfox.svc.cluster.local:8000"
    );
    assert!(dedicated["conditions"].is_array());
    let pipeline = app.admin_json("/api/v1/admin/teams/acme/t2/pipeline").await;
    assert_eq!(pipeline["configured"], true, "{pipeline:#}");
    assert_eq!(pipeline["name"], "ai-pipeline-acme-t2");
    assert_eq!(pipeline["schedule"], "0 2 * * *");
    assert_eq!(pipeline["suspended"], false);
    assert_eq!(pipeline["active_jobs"], 0);
    let none = app.admin_json("/api/v1/admin/teams/acme/t1/pipeline").await;
    assert_eq!(none["configured"], false);
}

#[tokio::test]
async fn deprovisioning_and_cancelling_need_their_permission_and_the_org() {
    let app = TestApp::spawn().await;
    succeeded(&json_of(provision(&app, SUPER_ADMIN, json!({"org_id": "globex", "team_node_id": "g1"})).await).await);
    let run = json_of(provision(&app, SUPER_ADMIN, json!({"org_id": ORG, "team_node_id": "mine"})).await).await;
    let post = |token: &'static str, path: String, body: Value| {
        let app = &app;
        async move {
            app.client
                .post(app.at(&path))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let deprovision_path = || "/api/v1/admin/deprovision/team".to_string();
    let other_org = post(
        "dev-org-admin-acme",
        deprovision_path(),
        json!({"org_id": "globex", "team_node_id": "g1"}),
    )
    .await;
    assert_eq!(other_org.status(), 403);
    assert_eq!(json_of(other_org).await["code"], "org_forbidden");
    let readonly = post(
        "dev-readonly-acme",
        deprovision_path(),
        json!({"org_id": ORG, "team_node_id": "mine"}),
    )
    .await;
    assert_eq!(readonly.status(), 403);
    assert_eq!(json_of(readonly).await["code"], "missing_permission");
    let cancel_path = format!("/api/v1/admin/provision/runs/{}/cancel", run_id_of(&run));
    let readonly = post("dev-readonly-acme", cancel_path, json!({})).await;
    assert_eq!(readonly.status(), 403);
    // Nothing was removed.
    assert!(app.stack.config_service.calls_to("DELETE", "/tokens").is_empty());
    let team = app.admin_json("/api/v1/admin/teams/globex/g1").await;
    assert_eq!(team["status"], "active");
}

#[tokio::test]
async fn a_rollback_undoes_only_what_the_run_created() {
    let app = TestApp::spawn().await;
    succeeded(
        &json_of(
            provision(
                &app,
                SUPER_ADMIN,
                json!({"org_id": ORG, "team_node_id": "keep", "create_pipeline_schedule": true}),
            )
            .await,
        )
        .await,
    );
    // A change that fails at its last step and rolls back: the CronJob it only updated stays.
    app.stack
        .kubernetes
        .faults()
        .fail_next_matching(Some("PATCH"), "/services", 1, 422);
    let run = json_of(
        provision(
            &app,
            SUPER_ADMIN,
            json!({"org_id": ORG, "team_node_id": "keep", "pipeline_schedule": "0 4 * * *",
                "deployment_mode": "dedicated", "rollback_on_failure": true}),
        )
        .await,
    )
    .await;
    assert_eq!(run["status"], "rolled_back", "{run:#}");
    assert_eq!(step(&run, "pipeline_cronjob")["status"], "rolled_back");
    assert_eq!(
        names(&app, "cronjobs"),
        ["ai-pipeline-acme-keep"],
        "the team had it before"
    );
    // What the failed step itself created is gone too.
    assert!(names(&app, "deployments").is_empty() && names(&app, "services").is_empty());
    // Not applied, so not what is asked of the team: a later change builds on what was.
    let team = app.admin_json("/api/v1/admin/teams/acme/keep").await;
    assert_eq!(team["desired"]["deployment_mode"], "shared");
    assert!(team["desired"]["pipeline_schedule"].is_null());
}

#[tokio::test]
async fn a_cancel_that_came_too_late_does_not_cancel_the_retry() {
    let app = TestApp::spawn().await;
    app.stack.ai_pipeline.faults().set_latency(Duration::from_millis(600));
    app.stack.ai_pipeline.faults().fail_next(1, 400);
    let run = json_of(provision_async(&app, json!({"org_id": ORG, "team_node_id": "late-cancel"})).await).await;
    let run_id = run_id_of(&run);
    eventually(30, "the bootstrap to be in flight", || async {
        (!app.stack.ai_pipeline.calls_to("POST", "/bootstrap").is_empty()).then_some(())
    })
    .await;
    let cancel_async = app
        .client
        .post(app.at(&format!("/api/v1/admin/provision/runs/{run_id}/cancel?undo=true")))
        .bearer_auth(SUPER_ADMIN)
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(cancel_async.status(), 202);
    // The step failed before the boundary where the cancel would have been acted on.
    let failed = wait_for_status(&app, &run_id, "failed").await;
    assert_eq!(failed["error_detail"]["step"], "bootstrap", "{failed:#}");
    app.stack.ai_pipeline.faults().reset();
    let retried = app
        .client
        .post(app.at(&format!("/api/v1/admin/provision/runs/{run_id}/retry")))
        .bearer_auth(SUPER_ADMIN)
        .send()
        .await
        .unwrap();
    let retried = json_of(retried).await;
    succeeded(&retried);
    assert_eq!(retried["cancel_requested"], false);
    let tokens = app.stack.config_service.state().team_tokens(ORG, "late-cancel");
    assert!(tokens.iter().all(|t| t.revoked_at.is_none()), "nothing was undone");
}
