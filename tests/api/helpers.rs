//! Test harness: a fresh database per test, the stand-in neighbours, and the real app on port 0.

use std::collections::HashMap;
use std::sync::Arc;

use devstack::Devstack;
use orchestrator::{Application, Config, Overrides};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::oneshot;

pub const SUPER_ADMIN: &str = "dev-super-admin";
pub const INTERNAL_ADMIN: &str = "dev-internal-admin";
pub const INTERNAL_TOKEN: &str = "test-internal-token";
pub const SLACK_SECRET: &str = "test-slack-secret";
pub const GITHUB_SECRET: &str = "test-github-secret";
pub const PAGERDUTY_SECRET: &str = "test-pagerduty-secret";
/// `whsec_` + base64("test-incidentio-secret").
pub const INCIDENTIO_SECRET: &str = "whsec_dGVzdC1pbmNpZGVudGlvLXNlY3JldA==";
/// base64 of 32 zero bytes: a fixed key for tests only.
pub const SECRETS_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database created for one test.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// A fresh database with every migration applied.
    pub async fn create() -> TestDb {
        let db = Self::create_unmigrated().await;
        orchestrator::db::migrate(&db.pool).await.expect("migrate test db");
        db
    }

    /// A fresh, empty database: the caller sets it up (as another service would have) and
    /// migrates it.
    pub async fn create_unmigrated() -> TestDb {
        let admin_url = admin_database_url();
        let name = format!("orch_test_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await
            .expect("TEST_DATABASE_URL must point at a running Postgres (scripts/test starts one)");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let mut url = url::Url::parse(&admin_url).expect("database url");
        url.set_path(&name);
        let url = url.to_string();
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .expect("connect test db");
        TestDb { url, pool }
    }
}

/// The environment every test app starts from; tests override single variables.
pub fn base_env(db_url: &str, stack: &Devstack) -> HashMap<String, String> {
    [
        ("DATABASE_URL", db_url.to_string()),
        ("ORCHESTRATOR_LISTEN_ADDR", "127.0.0.1:0".into()),
        ("CONFIG_SERVICE_URL", stack.config_service.url()),
        ("AGENT_API_URL", stack.agent.url()),
        ("AI_PIPELINE_API_URL", stack.ai_pipeline.url()),
        ("ORCHESTRATOR_INTERNAL_ADMIN_TOKEN", INTERNAL_ADMIN.into()),
        ("ORCHESTRATOR_INTERNAL_TOKEN", INTERNAL_TOKEN.into()),
        ("ORCHESTRATOR_SECRETS_KEY", SECRETS_KEY.into()),
        ("ORCHESTRATOR_SHUTDOWN_GRACE_SECONDS", "5".into()),
        ("SLACK_SIGNING_SECRET", SLACK_SECRET.into()),
        ("GITHUB_WEBHOOK_SECRET", GITHUB_SECRET.into()),
        ("PAGERDUTY_WEBHOOK_SECRET", PAGERDUTY_SECRET.into()),
        ("INCIDENTIO_WEBHOOK_SECRET", INCIDENTIO_SECRET.into()),
        // Fast dispatch retries so failure tests finish quickly.
        ("ORCHESTRATOR_DISPATCH_RETRY_INITIAL_MS", "10".into()),
        ("ORCHESTRATOR_DISPATCH_RETRY_MAX_MS", "50".into()),
        ("ORCHESTRATOR_DISPATCH_POLL_INTERVAL_MS", "100".into()),
        // Off unless a test is about it: a reconciler would remove the objects that other tests
        // seed for teams it does not know.
        ("ORCHESTRATOR_RECONCILE_ENABLED", "false".into()),
        ("RUST_LOG", std::env::var("TEST_LOG").unwrap_or_else(|_| "off".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// One running application. It lives in its own runtime on its own thread so that `crash`
/// kills every task and connection at once, as a dying process would.
pub struct TestApp {
    pub url: String,
    pub client: reqwest::Client,
    pub db: Arc<TestDb>,
    pub stack: Arc<Devstack>,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<()>>,
}

impl TestApp {
    /// A fresh database, fresh stand-ins and the default environment.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// Like `spawn`, with the environment adjusted by `tweak`.
    pub async fn spawn_with(tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
        Self::spawn_on(TestDb::create().await, tweak).await
    }

    /// The app on a database the test prepared, with fresh stand-ins.
    pub async fn spawn_on(db: TestDb, tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
        let db = Arc::new(db);
        let stack = Arc::new(Devstack::start().await.expect("start stand-ins"));
        let mut env = base_env(&db.url, &stack);
        tweak(&mut env);
        Self::start(db, stack, env).await
    }

    /// Another instance on the same database and stand-ins (a second replica, or a restart).
    pub async fn another(&self, tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
        let mut env = base_env(&self.db.url, &self.stack);
        tweak(&mut env);
        Self::start(self.db.clone(), self.stack.clone(), env).await
    }

    pub async fn start(db: Arc<TestDb>, stack: Arc<Devstack>, env: HashMap<String, String>) -> TestApp {
        let config = Config::from_map(&env).expect("test configuration is valid");
        orchestrator::telemetry::init(&config.log_level, config.log_format);
        let kube_url = stack.kubernetes.url();
        let namespace = config.kubernetes.namespace.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("app runtime");
        let (addr_tx, addr_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel();
        runtime.spawn(async move {
            // The Kubernetes client spawns its worker on the current runtime: build it here.
            let mut kube_config = kube::Config::new(kube_url.parse().expect("kube url"));
            kube_config.default_namespace = namespace;
            let kube = kube::Client::try_from(kube_config).expect("kube client");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let app = Application::build_with(config, listener, Overrides { kube: Some(kube) })
                .await
                .expect("build app");
            let _ = addr_tx.send(app.local_addr());
            app.run_until(async {
                let _ = stop_rx.await;
            })
            .await
            .expect("app run");
            let _ = done_tx.send(());
        });
        let addr = addr_rx.await.expect("app started");
        TestApp {
            url: format!("http://{addr}"),
            client: {
                orchestrator::startup::install_crypto_provider();
                reqwest::Client::new()
            },
            db,
            stack,
            runtime: Some(runtime),
            stop: Some(stop_tx),
            done: Some(done_rx),
        }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.at(path)).send().await.expect("request")
    }

    /// `GET path` as the super admin, answered with JSON.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        json_of(
            self.client
                .get(self.at(path))
                .bearer_auth(SUPER_ADMIN)
                .send()
                .await
                .expect("request"),
        )
        .await
    }

    /// Graceful shutdown, as on SIGTERM; returns once the app has stopped.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }

    /// Begins a graceful shutdown without waiting for it.
    pub fn signal_stop(&mut self) -> oneshot::Receiver<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.done.take().expect("not stopped yet")
    }

    /// Kills the app without any shutdown: tasks dropped, connections closed mid-flight.
    pub fn crash(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Polls `check` until it returns `Some`, or panics after `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub async fn json_of(response: reqwest::Response) -> serde_json::Value {
    response.json().await.expect("JSON body")
}
