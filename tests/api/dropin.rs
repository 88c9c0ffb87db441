//! The swap: a database and a namespace as the service this one replaces left them, then this
//! service migrates, serves the old runs and provisions the old teams.

use serde_json::{json, Value};

use crate::helpers::*;

/// Relations in the database's schema, with their kind (table, index, ...).
async fn relations(pool: &sqlx::PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT c.relname::text, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'i', 'S', 'v') ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn columns(pool: &sqlx::PgPool, table: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The database of a running platform: the config service's tables and the existing
/// orchestrator's runs.
async fn existing_platform() -> TestDb {
    let db = TestDb::create_unmigrated().await;
    sqlx::raw_sql(include_str!("fixtures/existing_platform.sql"))
        .execute(&db.pool)
        .await
        .expect("the fixture applies");
    db
}

#[tokio::test]
async fn migrations_run_beside_the_config_services_tables_and_touch_none_of_them() {
    let db = existing_platform().await;
    let before = relations(&db.pool).await;
    let audit_columns = columns(&db.pool, "agent_runs").await;

    orchestrator::db::migrate(&db.pool)
        .await
        .expect("migrations run on the shared database");
    orchestrator::db::migrate(&db.pool)
        .await
        .expect("and again: nothing to do");

    assert_eq!(columns(&db.pool, "agent_runs").await, audit_columns);
    for table in [
        "agent_runs",
        "team_tokens",
        "org_nodes",
        "node_configurations",
        "alembic_version",
    ] {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(rows >= 1, "{table} lost its rows");
    }
    // Everything the migrations created is the orchestrator's by name.
    let created: Vec<(String, String)> = relations(&db.pool)
        .await
        .into_iter()
        .filter(|r| !before.contains(r))
        .collect();
    assert!(!created.is_empty());
    for (name, _) in &created {
        assert!(name.starts_with("orchestrator_"), "{name} is not prefixed: {created:?}");
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM orchestrator_provisioning_runs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 3, "the existing runs are kept");
}

#[tokio::test]
async fn a_table_of_the_runs_name_in_another_shape_stops_the_migration_with_a_reason() {
    let db = TestDb::create_unmigrated().await;
    // The shape an unrelated tool might have given it.
    sqlx::query("CREATE TABLE orchestrator_provisioning_runs (run_id VARCHAR(64) PRIMARY KEY, status VARCHAR(32))")
        .execute(&db.pool)
        .await
        .unwrap();
    let error = orchestrator::db::migrate(&db.pool).await.unwrap_err().to_string();
    assert!(error.contains("is not the orchestrator's runs table"), "{error}");
}

/// The objects the existing service created for a team, as it created them: no ownership
/// annotations, its command and args split, its selector.
pub(crate) fn old_cronjob(org: &str, team: &str, name: &str) -> Value {
    let labels = json!({"app.kubernetes.io/name": "ai-pipeline", "app.kubernetes.io/component": "scheduled-ingestion",
        "app.kubernetes.io/managed-by": "incidentfox-orchestrator", "incidentfox.io/org-id": org.to_lowercase(),
        "incidentfox.io/team-node-id": team.to_lowercase()});
    json!({"apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": name, "namespace": "incidentfox", "labels": labels},
        "spec": {"schedule": "0 2 * * *", "concurrencyPolicy": "Forbid", "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 3,
            "jobTemplate": {"metadata": {"labels": labels}, "spec": {"ttlSecondsAfterFinished": 86400, "backoffLimit": 2,
                "template": {"metadata": {"labels": labels}, "spec": {"restartPolicy": "Never", "serviceAccountName": "ai-pipeline",
                    "containers": [{"name": "ai-pipeline", "image": "incidentfox/ai-pipeline:latest", "imagePullPolicy": "Always",
                        "command": ["python", "-m", "ai_learning_pipeline", "run-scheduled"],
                        "args": ["--team-id", team, "--org-id", org]}]}}}}}})
}

fn old_dedicated(org: &str, team: &str, name: &str) -> (Value, Value) {
    let labels = json!({"app.kubernetes.io/name": "incidentfox-agent", "app.kubernetes.io/component": "dedicated-agent",
        "app.kubernetes.io/managed-by": "incidentfox-orchestrator", "incidentfox.io/org-id": org,
        "incidentfox.io/team-node-id": team, "incidentfox.io/deployment-mode": "dedicated"});
    let selector = json!({"app.kubernetes.io/name": "incidentfox-agent", "incidentfox.io/org-id": org,
        "incidentfox.io/team-node-id": team});
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "incidentfox", "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": {"serviceAccountName": "incidentfox-agent",
                "containers": [{"name": "agent", "image": "incidentfox/agent:latest", "imagePullPolicy": "Always",
                    "ports": [{"containerPort": 8000, "name": "http"}]}]}}}});
    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "incidentfox", "labels": labels},
        "spec": {"type": "ClusterIP", "selector": selector, "ports": [{"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]}});
    (deployment, service)
}

#[tokio::test]
async fn the_new_service_serves_the_old_runs_and_provisions_the_old_teams() {
    let db = existing_platform().await;
    orchestrator::db::migrate(&db.pool).await.unwrap();
    let app = TestApp::spawn_on(db, |_| {}).await;
    let k8s = app.stack.kubernetes.state();
    // An org over 20 characters with a dedicated agent, a team over 30 with a CronJob.
    let (long_org, long_team) = ("a-very-long-organisation-name", "platform-reliability-engineering-eu");
    k8s.insert(
        "cronjobs",
        old_cronjob("acme", long_team, "ai-pipeline-acme-platform-reliability-engineeri"),
    )
    .unwrap();
    k8s.insert(
        "cronjobs",
        old_cronjob(long_org, "sre", "ai-pipeline-a-very-long-organisa-sre"),
    )
    .unwrap();
    let (deployment, service) = old_dedicated(long_org, "sre", "agent-dedicated-a-very-long-organisa-sre");
    k8s.insert("deployments", deployment.clone()).unwrap();
    k8s.insert("services", service).unwrap();

    // The old runs are readable by id, in the existing service's shape.
    let old = app
        .admin_json("/api/v1/admin/provision/runs/11111111-1111-4111-8111-111111111111")
        .await;
    assert_eq!(old["status"], "succeeded");
    assert_eq!(old["steps"]["bootstrap"]["run"]["run_id"], "bootstrap-old");
    assert_eq!(old["pipeline_bootstrap"]["run_id"], "bootstrap-old");
    let failed = app
        .admin_json("/api/v1/admin/provision/runs/22222222-2222-4222-8222-222222222222")
        .await;
    assert_eq!(
        (failed["status"].as_str(), failed["error"].as_str()),
        (Some("failed"), Some("upstream_error"))
    );
    let listed = app.admin_json("/api/v1/admin/provision/runs?org_id=acme").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);

    // Their idempotency keys are honoured: the same key answers with the old run, doing nothing.
    let replay = app
        .client
        .post(app.at("/api/v1/admin/provision/team"))
        .bearer_auth(SUPER_ADMIN)
        .json(&json!({"org_id": "acme", "team_node_id": "sre", "idempotency_key": "onboard-sre", "slack_channel_ids": ["C1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 200);
    assert_eq!(
        json_of(replay).await["provisioning_run_id"],
        "11111111-1111-4111-8111-111111111111"
    );
    assert!(app.stack.ai_pipeline.state().bootstraps().is_empty());

    // A run the existing service left `running` when it died does not hold the team forever, and
    // the old teams are provisioned again over their existing objects: no error, no duplicate,
    // the selector untouched.
    let provision = |org: &'static str, team: &'static str, extra: Value| {
        let mut body = json!({"org_id": org, "team_node_id": team, "create_pipeline_schedule": true});
        if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
            body.extend(extra);
        }
        app.client
            .post(app.at("/api/v1/admin/provision/team"))
            .bearer_auth(SUPER_ADMIN)
            .json(&body)
            .send()
    };
    for (org, team, extra) in [
        ("acme", "sre", json!({})),
        ("acme", long_team, json!({})),
        (long_org, "sre", json!({"deployment_mode": "dedicated"})),
    ] {
        app.stack.config_service.state().set_team_config(org, team, json!({}));
        let response = provision(org, team, extra).await.unwrap();
        let status = response.status();
        let run = json_of(response).await;
        assert_eq!(
            (status.as_u16(), run["status"].as_str()),
            (200, Some("succeeded")),
            "{org}/{team}: {run:#}"
        );
    }
    let names = |resource: &str| -> Vec<String> {
        k8s.objects(resource)
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names("cronjobs"),
        [
            "ai-pipeline-a-very-long-organisa-sre",
            "ai-pipeline-acme-platform-reliability-engineeri",
            "ai-pipeline-acme-sre"
        ]
    );
    assert_eq!(names("deployments"), ["agent-dedicated-a-very-long-organisa-sre"]);
    assert_eq!(names("services"), ["agent-dedicated-a-very-long-organisa-sre"]);
    let adopted = k8s
        .get("deployments", "incidentfox", "agent-dedicated-a-very-long-organisa-sre")
        .unwrap();
    assert_eq!(adopted["spec"]["selector"], deployment["spec"]["selector"]);
    assert_eq!(
        adopted["metadata"]["annotations"]["incidentfox.io/org-id"], long_org,
        "adopted: it now carries its exact owner"
    );
    // The adopted CronJob runs the same invocation once, not its arguments twice.
    let cronjob = k8s
        .get(
            "cronjobs",
            "incidentfox",
            "ai-pipeline-acme-platform-reliability-engineeri",
        )
        .unwrap();
    let container = &cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["command"],
        json!([
            "python",
            "-m",
            "ai_learning_pipeline",
            "run-scheduled",
            "--team-id",
            long_team,
            "--org-id",
            "acme"
        ])
    );
    assert_eq!(container["args"], json!([]));
    assert_eq!(
        app.stack.config_service.state().node_config(long_org, "sre").unwrap()["agent"]["dedicated_service_url"],
        "http://agent-dedicated-a-very-long-organisa-sre.incidentfox.svc.cluster.local:8000"
    );
}

/// The reconciler on a namespace as the existing service left it: the objects of a team it knew
/// are adopted and kept; one of a team this service never heard of (and that it did not create)
/// is reported, never deleted.
#[tokio::test]
async fn the_reconciler_keeps_what_the_existing_service_left() {
    let db = existing_platform().await;
    orchestrator::db::migrate(&db.pool).await.unwrap();
    sqlx::query("UPDATE orchestrator_teams SET status = 'active' WHERE org_id = 'acme' AND team_node_id = 'sre'")
        .execute(&db.pool)
        .await
        .unwrap();
    let app = TestApp::spawn_on(db, |env| {
        env.insert("ORCHESTRATOR_RECONCILE_ENABLED".into(), "true".into());
        env.insert("ORCHESTRATOR_RECONCILE_INTERVAL_SECONDS".into(), "1".into());
    })
    .await;
    let k8s = app.stack.kubernetes.state();
    k8s.insert("cronjobs", old_cronjob("acme", "sre", "ai-pipeline-acme-sre"))
        .unwrap();
    let mut discovery = old_cronjob("acme", "sre", "dep-discovery-acme-sre");
    discovery["spec"]["schedule"] = json!("0 */4 * * *");
    k8s.insert("cronjobs", discovery).unwrap();
    k8s.insert(
        "cronjobs",
        old_cronjob("globex", "unknown", "ai-pipeline-globex-unknown"),
    )
    .unwrap();

    let schedules = eventually(10, "the CronJobs to be adopted", || async {
        let listed = app.admin_json("/api/v1/admin/teams/acme/sre/schedules").await;
        (listed["schedules"].as_array().map_or(0, Vec::len) == 2).then_some(listed)
    })
    .await;
    let discovery = schedules["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["schedule_type"] == "dependency_discovery")
        .cloned()
        .unwrap();
    assert_eq!(discovery["cron_expression"], "0 */4 * * *");
    // Several resyncs later, nothing was deleted.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut names: Vec<String> = k8s
        .objects("cronjobs")
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ai-pipeline-acme-sre",
            "ai-pipeline-globex-unknown",
            "dep-discovery-acme-sre"
        ]
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"reconcile_drift_found_total{drift="orphan",kind="pipeline_cronjob"} 1"#),
        "{metrics}"
    );
}
