//! Schedules the operator controls, the existing service's sync and trigger endpoints, and the
//! reconciler: drift found and repaired (or only reported), orphans removed, one correction
//! across replicas, and the resync alone when watches are refused.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::helpers::*;
use crate::provisioning::{provision, ORG};

const NAMESPACE: &str = "incidentfox";

/// The reconciler on, with a short resync (the bound on detection when watches fail).
fn reconciling(env: &mut HashMap<String, String>) {
    env.insert("ORCHESTRATOR_RECONCILE_ENABLED".into(), "true".into());
    env.insert("ORCHESTRATOR_RECONCILE_INTERVAL_SECONDS".into(), "2".into());
}

async fn provisioned(app: &TestApp, team: &str, body: Value) {
    let mut body = body;
    body["org_id"] = json!(ORG);
    body["team_node_id"] = json!(team);
    let run = json_of(provision(app, SUPER_ADMIN, body).await).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
}

fn cronjob(app: &TestApp, name: &str) -> Option<Value> {
    app.stack.kubernetes.state().get("cronjobs", NAMESPACE, name)
}

async fn put_json(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.client
        .put(app.at(path))
        .bearer_auth(SUPER_ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn post_json(app: &TestApp, token: &str, path: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.at(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn audit_rows(app: &TestApp, action: &str) -> Vec<Value> {
    let page = app
        .admin_json(&format!("/api/v1/admin/audit?action={action}&limit=100"))
        .await;
    page["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_deleted_cronjob_comes_back_and_the_audit_row_shows_it() {
    let app = TestApp::spawn_with(reconciling).await;
    provisioned(&app, "rec-del", json!({"pipeline_schedule": "0 3 * * *"})).await;
    let name = "ai-pipeline-acme-rec-del";
    let before = cronjob(&app, name).expect("provisioned");
    assert!(app.stack.kubernetes.state().delete_behind("cronjobs", NAMESPACE, name));

    let back = eventually(10, "the CronJob to come back", || async { cronjob(&app, name) }).await;
    assert_ne!(back["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(back["spec"]["schedule"], "0 3 * * *");

    let rows = eventually(5, "the audit row", || async {
        let rows = audit_rows(&app, "team.drift_repaired").await;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let detail = &rows[0]["detail"];
    assert_eq!(detail["kind"], "pipeline_cronjob");
    assert_eq!(detail["drift"], "missing");
    assert!(detail["before"].is_null());
    assert_eq!(detail["after"]["schedule"], "0 3 * * *");
    assert_eq!(rows[0]["actor_subject"], "reconciler");
    assert_eq!(rows[0]["team_node_id"], "rec-del");

    // The team's view records the pass once its repairs are accounted for, a statement after the
    // audit row.
    let team = eventually(5, "the team's last drift", || async {
        let team = app.admin_json("/api/v1/admin/teams/acme/rec-del").await;
        (!team["last_drift"].is_null()).then_some(team)
    })
    .await;
    assert_eq!(team["last_drift"]["drift"][0]["drift"], "missing");
    assert_eq!(team["last_drift"]["drift"][0]["repaired"], true);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"reconcile_drift_repaired_total{drift="missing",kind="pipeline_cronjob"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_edited_schedule_and_image_are_reverted_with_before_and_after() {
    let app = TestApp::spawn_with(reconciling).await;
    provisioned(&app, "rec-edit", json!({"pipeline_schedule": "0 3 * * *"})).await;
    let name = "ai-pipeline-acme-rec-edit";
    app.stack
        .kubernetes
        .state()
        .edit_behind("cronjobs", NAMESPACE, name, |o| {
            o["spec"]["schedule"] = json!("*/5 * * * *");
            o["spec"]["suspend"] = json!(true);
        });
    eventually(10, "the schedule to be reverted", || async {
        cronjob(&app, name).filter(|c| c["spec"]["schedule"] == "0 3 * * *" && c["spec"]["suspend"] == false)
    })
    .await;
    let rows = eventually(5, "the audit row", || async {
        let rows = audit_rows(&app, "team.drift_repaired").await;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    let detail = &rows[0]["detail"];
    assert_eq!(detail["drift"], "modified");
    assert_eq!(detail["fields"], json!(["/spec/schedule", "/spec/suspend"]));
    assert_eq!(detail["before"]["/spec/schedule"], "*/5 * * * *");
    assert_eq!(detail["after"]["/spec/schedule"], "0 3 * * *");
    assert_eq!(detail["before"]["/spec/suspend"], true);
}

#[tokio::test]
async fn in_report_mode_nothing_changes_and_the_drift_is_visible() {
    let app = TestApp::spawn_with(reconciling).await;
    provisioned(&app, "rec-report", json!({"pipeline_schedule": "0 3 * * *"})).await;
    let answer = put_json(
        &app,
        "/api/v1/admin/teams/acme/rec-report/drift-policy",
        json!({"policy": "report"}),
    )
    .await;
    assert_eq!(answer.status(), 200);
    let bad = put_json(
        &app,
        "/api/v1/admin/teams/acme/rec-report/drift-policy",
        json!({"policy": "fix"}),
    )
    .await;
    assert_eq!(bad.status(), 422);
    assert_eq!(json_of(bad).await["field"], "policy");

    let name = "ai-pipeline-acme-rec-report";
    app.stack
        .kubernetes
        .state()
        .edit_behind("cronjobs", NAMESPACE, name, |o| {
            o["spec"]["schedule"] = json!("*/5 * * * *");
        });
    let team = eventually(10, "the drift to be recorded", || async {
        let team = app.admin_json("/api/v1/admin/teams/acme/rec-report").await;
        (!team["last_drift"].is_null()).then_some(team)
    })
    .await;
    assert_eq!(team["drift_policy"], "report");
    assert_eq!(team["last_drift"]["drift"][0]["drift"], "modified");
    assert_eq!(team["last_drift"]["drift"][0]["repaired"], false);
    // Several passes later, still as edited, and never audited as repaired.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(cronjob(&app, name).unwrap()["spec"]["schedule"], "*/5 * * * *");
    assert!(audit_rows(&app, "team.drift_repaired").await.is_empty());

    let plan = app.admin_json("/api/v1/admin/teams/acme/rec-report/drift").await;
    assert_eq!(plan["in_sync"], false, "{plan:#}");
    assert_eq!(plan["policy"], "report");
    assert_eq!(plan["drift"][0]["fields"], json!(["/spec/schedule"]));
    assert_eq!(plan["drift"][0]["after"]["/spec/schedule"], "0 3 * * *");
    assert_eq!(
        cronjob(&app, name).unwrap()["spec"]["schedule"],
        "*/5 * * * *",
        "a plan changes nothing"
    );
}

#[tokio::test]
async fn a_disabled_schedule_suspends_its_cronjob_and_enabling_resumes_it() {
    let app = TestApp::spawn().await;
    provisioned(&app, "sched", json!({"pipeline_schedule": "0 3 * * *"})).await;
    let path = "/api/v1/admin/teams/acme/sched/schedules";
    let listed = app.admin_json(path).await;
    assert_eq!(listed["schedules"][0]["schedule_type"], "ingestion");
    assert_eq!(listed["schedules"][0]["cron_expression"], "0 3 * * *");
    assert_eq!(listed["schedules"][0]["enabled"], true);
    assert_eq!(listed["schedules"][0]["k8s_cronjob_name"], "ai-pipeline-acme-sched");

    let paused = json_of(
        put_json(
            &app,
            path,
            json!({"schedules": [{"schedule_type": "ingestion", "enabled": false}]}),
        )
        .await,
    )
    .await;
    assert_eq!(paused["schedules"][0]["enabled"], false, "{paused:#}");
    let cronjob_now = cronjob(&app, "ai-pipeline-acme-sched").expect("suspended, not deleted");
    assert_eq!(cronjob_now["spec"]["suspend"], true);
    assert_eq!(cronjob_now["spec"]["schedule"], "0 3 * * *");

    let resumed = put_json(
        &app,
        path,
        json!({"schedules": [
            {"schedule_type": "ai_pipeline", "enabled": true, "cron_expression": "30 4 * * *"},
            {"schedule_type": "dependency_discovery"}
        ]}),
    )
    .await;
    assert_eq!(resumed.status(), 200);
    let cronjob_now = cronjob(&app, "ai-pipeline-acme-sched").unwrap();
    assert_eq!(cronjob_now["spec"]["suspend"], false);
    assert_eq!(cronjob_now["spec"]["schedule"], "30 4 * * *");
    let discovery = cronjob(&app, "dep-discovery-acme-sched").expect("dependency discovery created");
    assert_eq!(discovery["spec"]["schedule"], "0 */2 * * *");

    // Provisioning the team again keeps what the operator set.
    provisioned(&app, "sched", json!({})).await;
    assert_eq!(
        cronjob(&app, "ai-pipeline-acme-sched").unwrap()["spec"]["schedule"],
        "30 4 * * *"
    );

    // Bad input.
    let invalid = put_json(
        &app,
        path,
        json!({"schedules": [{"schedule_type": "ingestion", "cron_expression": "61 * * * *"}]}),
    )
    .await;
    assert_eq!(invalid.status(), 422);
    assert_eq!(json_of(invalid).await["field"], "schedules[0].cron_expression");
    let unknown_type = put_json(&app, path, json!({"schedules": [{"schedule_type": "eval"}]})).await;
    assert_eq!(json_of(unknown_type).await["field"], "schedules[0].schedule_type");
    let unknown = put_json(
        &app,
        "/api/v1/admin/teams/acme/nobody/schedules",
        json!({"schedules": []}),
    )
    .await;
    assert_eq!(unknown.status(), 404);

    let deprovisioned = post_json(
        &app,
        SUPER_ADMIN,
        "/api/v1/admin/deprovision/team",
        json!({"org_id": ORG, "team_node_id": "sched"}),
    )
    .await;
    assert_eq!(deprovisioned.status(), 200);
    assert!(app.admin_json(path).await["schedules"].as_array().unwrap().is_empty());
    assert!(cronjob(&app, "dep-discovery-acme-sched").is_none());
    let gone = put_json(&app, path, json!({"schedules": [{"schedule_type": "ingestion"}]})).await;
    assert_eq!(gone.status(), 404);
}

#[tokio::test]
async fn an_orphan_of_a_deprovisioned_team_is_removed_and_what_its_deprovisioning_kept_stays() {
    let app = TestApp::spawn_with(reconciling).await;
    // Deprovisioned with its objects kept on purpose: they stay.
    provisioned(
        &app,
        "kept",
        json!({"deployment_mode": "dedicated", "pipeline_schedule": "0 3 * * *"}),
    )
    .await;
    // Creation times are whole seconds: let the objects be from before the deprovisioning.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let answer = post_json(
        &app,
        SUPER_ADMIN,
        "/api/v1/admin/deprovision/team",
        json!({"org_id": ORG, "team_node_id": "kept", "delete_k8s_resources": false}),
    )
    .await;
    assert_eq!(answer.status(), 200);

    // Deprovisioned, then its objects come back (a stale apply, a restored backup): orphans.
    provisioned(
        &app,
        "orphan",
        json!({"deployment_mode": "dedicated", "pipeline_schedule": "0 3 * * *"}),
    )
    .await;
    let kube = app.stack.kubernetes.state();
    let objects: Vec<(&str, Value)> = ["cronjobs", "deployments", "services"]
        .into_iter()
        .map(|resource| {
            let object = kube
                .objects(resource)
                .into_iter()
                .find(|o| o["metadata"]["name"].as_str().unwrap().ends_with("-acme-orphan"))
                .unwrap();
            (resource, object)
        })
        .collect();
    let answer = post_json(
        &app,
        SUPER_ADMIN,
        "/api/v1/admin/deprovision/team",
        json!({"org_id": ORG, "team_node_id": "orphan"}),
    )
    .await;
    assert_eq!(json_of(answer).await["ok"], true);
    for (resource, object) in &objects {
        let mut object = object.clone();
        for field in ["uid", "resourceVersion", "creationTimestamp"] {
            object["metadata"].as_object_mut().unwrap().remove(field);
        }
        kube.insert(resource, object).unwrap();
    }
    eventually(10, "the orphans to be removed", || async {
        let state = app.stack.kubernetes.state();
        (cronjob(&app, "ai-pipeline-acme-orphan").is_none()
            && state
                .get("deployments", NAMESPACE, "agent-dedicated-acme-orphan")
                .is_none()
            && state
                .get("services", NAMESPACE, "agent-dedicated-acme-orphan")
                .is_none())
        .then_some(())
    })
    .await;
    // Each audit row is written just after its deletion.
    let rows = eventually(5, "an audit row per orphan", || async {
        let rows = audit_rows(&app, "team.drift_repaired").await;
        (rows.len() >= 3).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 3, "{rows:#?}");
    assert!(rows
        .iter()
        .all(|r| r["detail"]["drift"] == "orphan" && r["detail"]["after"].is_null() && r["team_node_id"] == "orphan"));
    assert!(
        cronjob(&app, "ai-pipeline-acme-kept").is_some(),
        "kept by its deprovisioning"
    );
    assert!(kube
        .get("deployments", NAMESPACE, "agent-dedicated-acme-kept")
        .is_some());
}

#[tokio::test]
async fn two_instances_correct_one_drift_once() {
    let first = TestApp::spawn_with(reconciling).await;
    let second = first.another(reconciling).await;
    provisioned(&first, "twice", json!({"pipeline_schedule": "0 3 * * *"})).await;
    let name = "ai-pipeline-acme-twice";
    for round in 0..3 {
        first
            .stack
            .kubernetes
            .state()
            .delete_behind("cronjobs", NAMESPACE, name);
        eventually(10, "the CronJob to come back", || async { cronjob(&first, name) }).await;
        // Both replicas saw the deletion; let both finish whatever they would do.
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        let rows = audit_rows(&first, "team.drift_repaired").await;
        assert_eq!(rows.len(), round + 1, "one correction per drift: {rows:#?}");
    }
    second.stop().await;
}

#[tokio::test]
async fn with_watches_refused_the_resync_alone_finds_drift() {
    let db = TestDb::create().await;
    let app = TestApp::spawn_on(db, |env| {
        reconciling(env);
        env.insert("ORCHESTRATOR_RECONCILE_INTERVAL_SECONDS".into(), "1".into());
    })
    .await;
    app.stack.kubernetes.state().refuse_watches(true);
    provisioned(&app, "nowatch", json!({"pipeline_schedule": "0 3 * * *"})).await;
    let name = "ai-pipeline-acme-nowatch";
    app.stack.kubernetes.state().delete_behind("cronjobs", NAMESPACE, name);
    eventually(10, "the resync to repair it", || async { cronjob(&app, name) }).await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"reconcile_errors_total{stage="watch"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"reconcile_objects_watched{resource="cronjobs"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn sync_cronjobs_follows_the_team_config() {
    let app = TestApp::spawn().await;
    provisioned(&app, "sync", json!({"pipeline_schedule": "0 3 * * *"})).await;
    let config = app.stack.config_service.state().node_config(ORG, "sync").unwrap();
    let mut config = config;
    config["ai_pipeline"] = json!({"enabled": true, "schedule": "15 1 * * *"});
    config["dependency_discovery"] = json!({"enabled": true});
    app.stack
        .config_service
        .state()
        .set_team_config(ORG, "sync", config.clone());

    let body = json!({"org_id": ORG, "team_node_id": "sync"});
    let answer = json_of(post_json(&app, SUPER_ADMIN, "/api/v1/admin/teams/sync-cronjobs", body.clone()).await).await;
    assert_eq!(answer["ok"], true, "{answer:#}");
    assert_eq!(answer["message"], "CronJobs synced");
    assert_eq!(answer["ai_pipeline"]["name"], "ai-pipeline-acme-sync");
    assert_eq!(answer["ai_pipeline"]["schedule"], "15 1 * * *");
    assert_eq!(answer["ai_pipeline"]["created"], false);
    assert_eq!(answer["dependency_discovery"]["name"], "dep-discovery-acme-sync");
    assert_eq!(answer["dependency_discovery"]["schedule"], "0 */2 * * *");
    assert_eq!(answer["dependency_discovery"]["created"], true);
    assert_eq!(
        cronjob(&app, "ai-pipeline-acme-sync").unwrap()["spec"]["schedule"],
        "15 1 * * *"
    );

    // Dependency discovery turned off, through the team's own token.
    config["dependency_discovery"] = json!({"enabled": false});
    app.stack.config_service.state().set_team_config(ORG, "sync", config);
    app.stack.config_service.state().add_admin_token(
        "team-sync-token",
        json!({"role": "team", "org_id": ORG, "team_node_id": "sync"}),
    );
    let answer = json_of(
        app.client
            .post(app.at("/api/v1/teams/me/sync-cronjobs"))
            .header("X-IncidentFox-Team-Token", "team-sync-token")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer["ok"], true, "{answer:#}");
    assert_eq!(answer["dependency_discovery"]["deleted"], true);
    assert!(cronjob(&app, "dep-discovery-acme-sync").is_none());
    let again = json_of(
        app.client
            .post(app.at("/api/v1/teams/me/sync-cronjobs"))
            .bearer_auth("team-sync-token")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        again["dependency_discovery"],
        json!({"skipped": true, "reason": "not_found"})
    );

    let no_token = app
        .client
        .post(app.at("/api/v1/teams/me/sync-cronjobs"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    let bad_token = app
        .client
        .post(app.at("/api/v1/teams/me/sync-cronjobs"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_token.status(), 401);
    let unknown = post_json(
        &app,
        SUPER_ADMIN,
        "/api/v1/admin/teams/sync-cronjobs",
        json!({"org_id": ORG, "team_node_id": "nobody"}),
    )
    .await;
    assert_eq!(unknown.status(), 404);
    let missing = post_json(
        &app,
        SUPER_ADMIN,
        "/api/v1/admin/teams/sync-cronjobs",
        json!({"org_id": ORG}),
    )
    .await;
    assert_eq!(missing.status(), 422);
    assert_eq!(json_of(missing).await["field"], "team_node_id");
}

#[tokio::test]
async fn the_pipeline_trigger_asks_the_ai_pipeline_for_a_run() {
    let app = TestApp::spawn().await;
    provisioned(&app, "trig", json!({})).await;
    let answer = json_of(
        post_json(
            &app,
            SUPER_ADMIN,
            "/api/v1/admin/pipeline/trigger",
            json!({"org_id": ORG, "team_node_id": "trig"}),
        )
        .await,
    )
    .await;
    assert_eq!(answer["ok"], true, "{answer:#}");
    assert_eq!(answer["message"], "Pipeline run triggered");
    let runs = app.stack.ai_pipeline.state().runs();
    assert_eq!(runs.len(), 1);
    assert_eq!(answer["job_name"], runs[0].job_name.as_str());
    assert_eq!(runs[0].team, "trig");
    assert_eq!(runs[0].org_id.as_deref(), Some(ORG));

    let unknown = post_json(
        &app,
        SUPER_ADMIN,
        "/api/v1/admin/pipeline/trigger",
        json!({"org_id": ORG, "team_node_id": "nobody"}),
    )
    .await;
    assert_eq!(unknown.status(), 404);
    let rows = audit_rows(&app, "pipeline.triggered").await;
    assert_eq!(rows.len(), 1);
}

#[tokio::test]
async fn a_watch_finds_drift_long_before_the_next_resync() {
    let app = TestApp::spawn_with(|env| {
        reconciling(env);
        env.insert("ORCHESTRATOR_RECONCILE_INTERVAL_SECONDS".into(), "3600".into());
    })
    .await;
    provisioned(&app, "watched", json!({"pipeline_schedule": "0 3 * * *"})).await;
    let name = "ai-pipeline-acme-watched";
    // The first resync ran at start-up; the next one is an hour away.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    app.stack.kubernetes.state().delete_behind("cronjobs", NAMESPACE, name);
    eventually(5, "the watch to repair it", || async { cronjob(&app, name) }).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let watches = app.stack.kubernetes.calls_to("GET", "/cronjobs");
    assert!(
        watches
            .iter()
            .any(|c| c.query.as_deref().is_some_and(|q| q.contains("watch=true"))),
        "{watches:#?}"
    );
}
