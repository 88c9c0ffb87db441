//! The composition root: builds every capability from the configuration, serves the router on a
//! bound listener, runs the background workers, and stops all of it within bounded grace periods.
//! A worker that ends on its own stops the service with an error, so its supervisor restarts it.

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

use crate::agent_call::TeamAgents;
use crate::agent_runs::{self, AgentProxy, ProxyParts};
use crate::auth::AdminVerifier;
use crate::clients::agent::AgentClient;
use crate::clients::ai_pipeline::AiPipelineClient;
use crate::clients::config_service::ConfigServiceClient;
use crate::clients::kubernetes::KubeClient;
use crate::clients::Transport;
use crate::config::Config;
use crate::db::HeldConnections;
use crate::metrics::Metrics;
use crate::provisioning::engine::{Engine, EngineHandles};
use crate::provisioning::reconcile::{self, Parts as ReconcileParts, Reconciler};
use crate::provisioning::resume;
use crate::provisioning::sealing::Sealer;
use crate::state::{AppState, Handles};
use crate::webhooks::dispatch::{self, DispatchSettings, Dispatcher, Housekeeping};
use crate::webhooks::fairness::FairShares;
use crate::webhooks::ingress::RateLimits;
use crate::webhooks::writer::InboxWriter;
use crate::{db, http};

/// Connections the agent-run proxy keeps for its statements: admin runs are few at once.
const PROXY_HELD_CONNECTIONS: usize = 4;

/// Replacements for what the application would otherwise build from the environment; tests use
/// them to point the Kubernetes client at the stand-in API server.
#[derive(Default)]
pub struct Overrides {
    pub kube: Option<kube::Client>,
}

/// How long background work gets to finish after the server has stopped.
const BACKGROUND_STOP_GRACE: Duration = Duration::from_secs(10);

/// The service, built and bound, not yet serving.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    router: axum::Router,
    workers: Workers,
    /// Pools the workers hold connections of, closed last.
    lock_db: PgPool,
}

/// The background work, each with exactly the handles it uses.
struct Workers {
    engine: Engine,
    reconciler: Reconciler,
    dispatcher: Arc<Dispatcher>,
    housekeeping: Housekeeping,
    agent_proxy: AgentProxy,
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
        let config = Arc::new(config);
        let db = db::request_pool(&config.database).context("DATABASE_URL")?;
        let lock_db = db::lock_pool(&config.database).context("DATABASE_URL")?;
        let queue_db = db::queue_pool(&config.database).context("DATABASE_URL")?;
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
        let metrics = Arc::new(Metrics::new().context("registering metrics")?);
        let transport = Transport {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("incidentfox-orchestrator/", env!("CARGO_PKG_VERSION")))
                .build()
                .context("building the HTTP client")?,
            timeout: config.neighbours.timeout,
            metrics: metrics.clone(),
        };
        let neighbours = &config.neighbours;
        let config_service = ConfigServiceClient::new(transport.clone(), neighbours.config_service_url.clone());
        let ai_pipeline = AiPipelineClient::new(transport.clone(), neighbours.ai_pipeline_api_url.clone());
        let agent = AgentClient::new(
            transport,
            neighbours.agent_api_url.clone(),
            neighbours.agent_dialect,
            neighbours.investigate_auth_token.clone(),
        );
        let namespace = config.kubernetes.namespace.clone();

        let engine = Engine::new(EngineHandles {
            db: db.clone(),
            lock_db: lock_db.clone(),
            kube: KubeClient::new(kube, namespace.clone(), metrics.clone()),
            config_service: config_service.clone(),
            ai_pipeline,
            metrics: metrics.clone(),
            sealer: sealer(&config),
            kubernetes: config.kubernetes.clone(),
            config_service_url: neighbours.config_service_url.to_string(),
            settings: config.provisioning.clone(),
            internal_admin_token: config.internal_admin_token.clone(),
        });
        let reconciler = Reconciler::new(ReconcileParts {
            db: db.clone(),
            lock_db: lock_db.clone(),
            kube: engine.kube.clone(),
            metrics: metrics.clone(),
            kubernetes: config.kubernetes.clone(),
            config_service_url: neighbours.config_service_url.to_string(),
            settings: config.reconcile.clone(),
            reported: Default::default(),
        });
        let fair_shares = Arc::new(FairShares::starting_at(0, config.webhooks.dispatch_fair_shares));
        let dispatcher = Arc::new(Dispatcher::new(
            queue_db.clone(),
            db.clone(),
            DispatchSettings::new(
                &config.webhooks,
                &namespace,
                config.internal_admin_token.clone(),
                config.slack_bot_token.clone(),
            ),
            config_service.clone(),
            agent.clone(),
            metrics.clone(),
            fair_shares.clone(),
        ));
        let rate_limits = RateLimits::new(&config.webhooks);
        let agent_proxy = AgentProxy::new(ProxyParts {
            db: db.clone(),
            held: HeldConnections::new(db.clone(), PROXY_HELD_CONNECTIONS),
            config_service: config_service.clone(),
            agent,
            metrics: metrics.clone(),
            internal_admin_token: config.internal_admin_token.clone(),
            namespace,
            limits: config.agent_runs.clone(),
            credentials: TeamAgents::new(config.auth.cache_ttl, config.auth.cache_capacity),
        });
        let housekeeping = Housekeeping {
            db: db.clone(),
            metrics: metrics.clone(),
            rate_limits: rate_limits.clone(),
            retention_days: config.webhooks.retention_days,
            dedupe_days: config.webhooks.dedupe_days,
        };

        let (routes, openapi) = http::routes(&config);
        let state = AppState::new(Handles {
            admin_verifier: AdminVerifier::new(config_service, &config.auth),
            inbox: InboxWriter::inbox(queue_db, dispatcher.hand_off()),
            fair_shares,
            config,
            db,
            metrics,
            provisioning: engine.clone(),
            reconciler: reconciler.clone(),
            agent_proxy: agent_proxy.clone(),
            webhook_rate_limits: rate_limits,
            openapi: Arc::new(openapi),
            shutting_down: Arc::new(AtomicBool::new(false)),
        });
        let router = http::with_middleware(routes, state.clone());
        Ok(Self {
            listener,
            state,
            router,
            workers: Workers {
                engine,
                reconciler,
                dispatcher,
                housekeeping,
                agent_proxy,
            },
            lock_db,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.state.config.listen_addr)
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
    /// within the configured grace period, and finally stops the background work. A worker that
    /// ends before that stops the service too, and the result is an error naming it.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Application {
            listener,
            state,
            router,
            workers,
            lock_db,
        } = self;
        let grace = state.config.shutdown_grace;
        let stop_serving = CancellationToken::new();
        let stop_background = CancellationToken::new();
        let background = workers.start(&stop_background);
        let engine = workers.engine.clone();
        let dispatcher = workers.dispatcher.clone();

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

        let mut background = background;
        let mut failed_worker: Option<&'static str> = None;
        let grace_expired = async {
            stop_serving.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(grace_expired);
        loop {
            tokio::select! {
                result = &mut server => {
                    match result {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "server failed"),
                        Err(e) => tracing::error!(error = %e, "server task failed"),
                    }
                    break;
                }
                () = &mut grace_expired => {
                    tracing::warn!("grace period elapsed with requests still in flight; closing them");
                    server.abort();
                    break;
                }
                Some(ended) = background.join_next(), if failed_worker.is_none() => {
                    let name = match ended {
                        Ok(name) => name,
                        Err(e) => {
                            tracing::error!(error = %e, "a background worker panicked");
                            "a background worker"
                        }
                    };
                    tracing::error!(worker = name, "a background worker stopped on its own; shutting down");
                    failed_worker = Some(name);
                    state.shutting_down.store(true, Ordering::Relaxed);
                    stop_serving.cancel();
                }
            }
        }

        stop_background.cancel();
        let drained = tokio::time::timeout(BACKGROUND_STOP_GRACE, async {
            while background.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("background workers did not stop in time; aborting them");
            background.abort_all();
        }
        if !engine.stop(BACKGROUND_STOP_GRACE).await {
            tracing::warn!("provisioning runs did not stop in time; they will be resumed");
        }
        state.agent_proxy.held.release();
        state.db.close().await;
        state.inbox.release_connections();
        dispatcher.close().await;
        lock_db.close().await;
        tracing::info!("stopped");
        match failed_worker {
            Some(name) => anyhow::bail!("{name} stopped unexpectedly"),
            None => Ok(()),
        }
    }
}

impl Workers {
    /// Starts every worker; each task ends with its name.
    fn start(&self, stop: &CancellationToken) -> JoinSet<&'static str> {
        let mut tasks = JoinSet::new();
        let (engine, stop_resumer) = (self.engine.clone(), stop.clone());
        tasks.spawn(async move {
            resume::run(engine, stop_resumer).await;
            "the provisioning resumer"
        });
        let (dispatcher, stop_dispatch) = (self.dispatcher.clone(), stop.clone());
        tasks.spawn(async move {
            dispatch::run_at_lower_priority(dispatcher, stop_dispatch).await;
            "webhook dispatch"
        });
        let (housekeeping, stop_housekeeping) = (self.housekeeping.clone(), stop.clone());
        tasks.spawn(async move {
            dispatch::housekeeping(housekeeping, stop_housekeeping).await;
            "webhook housekeeping"
        });
        let (reconciler, stop_reconcile) = (self.reconciler.clone(), stop.clone());
        tasks.spawn(async move {
            reconcile::run(reconciler, stop_reconcile).await;
            "the reconciler"
        });
        let (proxy, stop_sweep) = (self.agent_proxy.clone(), stop.clone());
        tasks.spawn(async move {
            agent_runs::sweep::run(proxy, stop_sweep).await;
            "the agent-run sweeper"
        });
        tasks
    }
}

/// The key sealing one-time team tokens at rest; without `ORCHESTRATOR_SECRETS_KEY`, one that dies
/// with this process.
fn sealer(config: &Config) -> Sealer {
    match &config.secrets_key {
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
