//! Application state and lifecycle: build from config, serve on a bound listener, shut down
//! within a bounded grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::AdminVerifier;
use crate::clients::agent::AgentClient;
use crate::clients::ai_pipeline::AiPipelineClient;
use crate::clients::config_service::ConfigServiceClient;
use crate::clients::kubernetes::KubeClient;
use crate::clients::Transport;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::provisioning::sealing::Sealer;
use crate::provisioning::workflow::{Provisioning, RunRegistry};
use crate::webhooks::dispatch::{DispatchCaches, Dispatcher};
use crate::webhooks::ingress::RateLimits;
use crate::webhooks::writer::InboxWriter;
use crate::{db, http};

/// Shared by every handler and background task. One reference count to clone: axum clones the
/// state for every request.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The handles the service runs on.
pub struct Services {
    pub config: Arc<Config>,
    pub db: PgPool,
    pub lock_db: PgPool,
    pub http: reqwest::Client,
    pub kube: KubeClient,
    pub metrics: Arc<Metrics>,
    pub config_service: ConfigServiceClient,
    pub ai_pipeline: AiPipelineClient,
    pub agent: AgentClient,
    pub admin_verifier: AdminVerifier,
    pub webhook_rate_limits: RateLimits,
    pub dispatch_caches: DispatchCaches,
    /// Stores webhook events with group commit.
    pub inbox: InboxWriter,
    /// This replica's webhook dispatch workers.
    pub dispatcher: Dispatcher,
    pub provisioning: Provisioning,
    shutting_down: Arc<AtomicBool>,
}

impl Services {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Replacements for what the application would otherwise build from the environment; tests use
/// them to point the Kubernetes client at the stand-in API server.
#[derive(Default)]
pub struct Overrides {
    pub kube: Option<kube::Client>,
}

/// How long background tasks get to finish after the server has stopped.
const BACKGROUND_STOP_GRACE: Duration = Duration::from_secs(10);

pub struct Application {
    listener: TcpListener,
    state: AppState,
}

/// Installs the process-wide TLS provider; rustls refuses to pick one when none is set.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Application {
    /// Binds `config.listen_addr` and builds every client from the environment.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {} (ORCHESTRATOR_LISTEN_ADDR)", config.listen_addr))?;
        Self::build_with(config, listener, Overrides::default()).await
    }

    pub async fn build_with(config: Config, listener: TcpListener, overrides: Overrides) -> anyhow::Result<Self> {
        install_crypto_provider();
        let db = db::request_pool(&config.database).context("DATABASE_URL")?;
        let lock_db = db::lock_pool(&config.database).context("DATABASE_URL")?;
        if config.database.auto_migrate {
            db::migrate(&db)
                .await
                .context("applying migrations at start-up (ORCHESTRATOR_AUTO_CREATE_TABLES)")?;
        }
        let kube = match overrides.kube {
            Some(client) => client,
            None => kube::Client::try_default()
                .await
                .context("no Kubernetes access: run in a cluster with a service account, or set KUBECONFIG")?,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("incidentfox-orchestrator/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        let metrics = Arc::new(Metrics::new().context("registering metrics")?);
        let transport = Transport {
            http: http.clone(),
            timeout: config.neighbours.timeout,
            metrics: metrics.clone(),
        };
        let config_service = ConfigServiceClient::new(transport.clone(), config.neighbours.config_service_url.clone());
        let ai_pipeline = AiPipelineClient::new(transport.clone(), config.neighbours.ai_pipeline_api_url.clone());
        let agent = AgentClient::new(
            transport.clone(),
            config.neighbours.agent_api_url.clone(),
            config.neighbours.agent_dialect,
            config.neighbours.investigate_auth_token.clone(),
        );
        let admin_verifier = AdminVerifier::new(config_service.clone(), &config.auth);
        let webhook_rate_limits = RateLimits::new(&config.webhooks);
        let sealer = match &config.secrets_key {
            Some(key) => Sealer::new(&key.0),
            None => {
                tracing::warn!(
                    "ORCHESTRATOR_SECRETS_KEY is not set: one-time team tokens are sealed with a key that dies with this \
                     process, so a token not received in the provisioning response cannot be handed out after a restart \
                     or by another replica"
                );
                let mut key = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
                Sealer::new(&key)
            }
        };
        let provisioning = Provisioning {
            registry: RunRegistry::default(),
            sealer,
            tracker: tokio_util::task::TaskTracker::new(),
            stop: CancellationToken::new(),
        };
        let queue_db = db::queue_pool(&config.database).context("DATABASE_URL")?;
        let dispatcher = Dispatcher::new(queue_db, config.webhooks.dispatch_workers);
        let inbox = InboxWriter::inbox(db.clone(), dispatcher.queued.clone());
        let kube = KubeClient::new(kube, config.kubernetes.namespace.clone(), metrics.clone());
        let state = AppState(Arc::new(Services {
            config: Arc::new(config),
            db,
            lock_db,
            http,
            kube,
            metrics,
            config_service,
            ai_pipeline,
            agent,
            admin_verifier,
            webhook_rate_limits,
            dispatch_caches: DispatchCaches::default(),
            inbox,
            dispatcher,
            provisioning,
            shutting_down: Arc::new(AtomicBool::new(false)),
        }));
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.state.config.listen_addr)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
    /// within the configured grace period, and finally stops the background tasks.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Application { listener, state } = self;
        let grace = state.config.shutdown_grace;
        let stop_serving = CancellationToken::new();
        let stop_background = CancellationToken::new();

        let mut background = JoinSet::new();
        crate::http::spawn_background(&state, &stop_background, &mut background);

        let router = http::router(state.clone());
        let server = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(stop_serving.clone().cancelled_owned());
        let mut server = tokio::spawn(async move { server.await });

        {
            let stop_serving = stop_serving.clone();
            let state = state.clone();
            tokio::spawn(async move {
                shutdown.await;
                state.shutting_down.store(true, Ordering::Relaxed);
                tracing::info!(
                    grace_seconds = grace.as_secs(),
                    "shutdown requested: draining in-flight requests"
                );
                stop_serving.cancel();
            });
        }

        let grace_expired = async {
            stop_serving.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            result = &mut server => match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "server failed"),
                Err(e) => tracing::error!(error = %e, "server task failed"),
            },
            () = grace_expired => {
                tracing::warn!("grace period elapsed with requests still in flight; closing them");
                server.abort();
            }
        }

        stop_background.cancel();
        // Provisioning runs stop at their next step boundary; whatever is left is resumed by
        // another replica (or this one on restart).
        state.provisioning.stop.cancel();
        state.provisioning.tracker.close();
        let drained = tokio::time::timeout(BACKGROUND_STOP_GRACE, async {
            while background.join_next().await.is_some() {}
            state.provisioning.tracker.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("background tasks did not stop in time; aborting them");
            background.abort_all();
        }
        state.db.close().await;
        state.dispatcher.queue_db.close().await;
        state.lock_db.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
