//! The fake Kubernetes API server speaks enough of the real protocol for kube-rs.

use k8s_openapi::api::batch::v1::CronJob;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;

fn cronjob(name: &str, schedule: &str) -> CronJob {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "incidentfox-orchestrator"}},
        "spec": {
            "schedule": schedule,
            "jobTemplate": {"spec": {"template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox"}]
            }}}}
        }
    }))
    .unwrap()
}

fn status_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[tokio::test]
async fn kube_client_create_apply_get_delete_against_the_fake_api_server() {
    let stack = devstack::Devstack::start().await.unwrap();
    let config = kube::Config::new(stack.kubernetes.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let api: Api<CronJob> = Api::namespaced(client, "incidentfox");

    let missing = api.get("nope").await.unwrap_err();
    assert_eq!(status_code(&missing), Some(404), "{missing:?}");

    let created = api
        .create(&PostParams::default(), &cronjob("job-a", "0 2 * * *"))
        .await
        .unwrap();
    let first_version = created.metadata.resource_version.clone().unwrap();
    assert!(created.metadata.uid.is_some());

    let duplicate = api
        .create(&PostParams::default(), &cronjob("job-a", "0 2 * * *"))
        .await
        .unwrap_err();
    assert_eq!(status_code(&duplicate), Some(409), "{duplicate:?}");

    let params = PatchParams::apply("incidentfox-orchestrator").force();
    let applied = api
        .patch("job-a", &params, &Patch::Apply(cronjob("job-a", "0 3 * * *")))
        .await
        .unwrap();
    assert_eq!(applied.spec.unwrap().schedule, "0 3 * * *");
    assert_ne!(applied.metadata.resource_version.unwrap(), first_version);
    assert_eq!(applied.metadata.uid, created.metadata.uid, "apply updates in place");

    let applied_new = api
        .patch("job-b", &params, &Patch::Apply(cronjob("job-b", "0 4 * * *")))
        .await
        .unwrap();
    assert_eq!(applied_new.metadata.name.as_deref(), Some("job-b"), "apply creates");

    let listed = api
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=incidentfox-orchestrator"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 2);

    let fetched = api.get("job-a").await.unwrap();
    assert_eq!(fetched.spec.unwrap().schedule, "0 3 * * *");

    api.delete("job-a", &DeleteParams::default()).await.unwrap();
    let gone = api.get("job-a").await.unwrap_err();
    assert_eq!(status_code(&gone), Some(404));
    let gone_again = api.delete("job-a", &DeleteParams::default()).await.unwrap_err();
    assert_eq!(status_code(&gone_again), Some(404));

    let too_long = "x".repeat(53);
    let invalid = api
        .patch(&too_long, &params, &Patch::Apply(cronjob(&too_long, "0 2 * * *")))
        .await
        .unwrap_err();
    assert_eq!(status_code(&invalid), Some(422), "{invalid:?}");
}
