//! Prometheus metrics on the service's own registry.
//!
//! Labels are bounded by construction: routes are templates, sources, steps, statuses and
//! neighbours are closed sets. Never an id, a team name or an error's text.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for HTTP and neighbour calls: 1 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// prometheus_client's default buckets, which the existing service's HTTP histogram used.
const PYTHON_CLIENT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Buckets for work measured in seconds to minutes (agent runs, dispatch, provisioning steps).
const LONG_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

pub struct Metrics {
    registry: Registry,
    pub http_requests_total: IntCounterVec,
    pub http_request_duration_seconds: HistogramVec,

    pub provisioning_runs_total: IntCounterVec,
    pub provisioning_runs_in_progress: IntGauge,
    pub provisioning_step_duration_seconds: HistogramVec,
    pub provisioning_lock_wait_seconds: Histogram,
    pub provisioning_runs_resumed_total: prometheus::IntCounter,

    pub neighbour_request_duration_seconds: HistogramVec,
    pub neighbour_requests_total: IntCounterVec,

    pub webhook_deliveries_total: IntCounterVec,
    pub webhook_rejections_total: IntCounterVec,
    pub webhook_inbox_events: IntGaugeVec,
    pub webhook_dispatch_attempts_total: IntCounterVec,
    pub webhook_dispatch_latency_seconds: HistogramVec,

    pub agent_run_duration_seconds: HistogramVec,
    pub agent_runs_total: IntCounterVec,

    pub reconcile_drift_found_total: IntCounterVec,
    pub reconcile_drift_repaired_total: IntCounterVec,
    pub reconcile_duration_seconds: HistogramVec,
    pub reconcile_objects_watched: IntGaugeVec,
    pub reconcile_errors_total: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;

        let build_info = IntGaugeVec::new(
            Opts::new("orchestrator_build_info", "Build information; always 1."),
            &["version"],
        )?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build_info))?;

        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram =
            |name: &str, help: &str, labels: &[&str], buckets: &[f64]| -> Result<HistogramVec, prometheus::Error> {
                let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };

        let provisioning_runs_in_progress = IntGauge::new(
            "provisioning_runs_in_progress",
            "Provisioning runs being executed by this replica.",
        )?;
        registry.register(Box::new(provisioning_runs_in_progress.clone()))?;
        let provisioning_lock_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "provisioning_lock_wait_seconds",
                "Time spent waiting for a team's provisioning lock.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(provisioning_lock_wait_seconds.clone()))?;
        let provisioning_runs_resumed_total = prometheus::IntCounter::new(
            "provisioning_runs_resumed_total",
            "Orphaned provisioning runs resumed by this replica.",
        )?;
        registry.register(Box::new(provisioning_runs_resumed_total.clone()))?;

        Ok(Self {
            // The existing service's names, label names and buckets, so its dashboards and alerts
            // keep working; `path` holds the route template, never the raw path.
            http_requests_total: counter(
                "incidentfox_orchestrator_http_requests_total",
                "Total HTTP requests, by method, route template (path) and status code.",
                &["method", "path", "status_code"],
            )?,
            http_request_duration_seconds: histogram(
                "incidentfox_orchestrator_http_request_duration_seconds",
                "HTTP request duration in seconds, by method and route template (path).",
                &["method", "path"],
                PYTHON_CLIENT_BUCKETS,
            )?,
            provisioning_runs_total: counter(
                "provisioning_runs_total",
                "Runs (provisioning and deprovisioning) that reached a final status, by workflow and status.",
                &["workflow", "status"],
            )?,
            provisioning_runs_in_progress,
            provisioning_step_duration_seconds: histogram(
                "provisioning_step_duration_seconds",
                "Duration of one provisioning step execution, by step and outcome.",
                &["step", "outcome"],
                LONG_BUCKETS,
            )?,
            provisioning_lock_wait_seconds,
            provisioning_runs_resumed_total,
            neighbour_request_duration_seconds: histogram(
                "neighbour_request_duration_seconds",
                "Latency of calls to neighbouring services.",
                &["neighbour"],
                LATENCY_BUCKETS,
            )?,
            neighbour_requests_total: counter(
                "neighbour_requests_total",
                "Calls to neighbouring services by outcome (ok, client_error, server_error, timeout, transport_error).",
                &["neighbour", "outcome"],
            )?,
            webhook_deliveries_total: counter(
                "webhook_deliveries_total",
                "Webhook deliveries received, by source and outcome (accepted, duplicate, rejected, rate_limited, protocol).",
                &["source", "outcome"],
            )?,
            webhook_rejections_total: counter(
                "webhook_rejections_total",
                "Webhook deliveries rejected, by source and reason code.",
                &["source", "reason"],
            )?,
            webhook_inbox_events: gauge_vec(
                "webhook_inbox_events",
                "Inbox events by status: pending and processing sampled every 15 s, the other statuses every hour.",
                &["status"],
            )?,
            webhook_dispatch_attempts_total: counter(
                "webhook_dispatch_attempts_total",
                "Dispatch attempts by source and outcome (delivered, retry, dead_letter, skipped, unrouted).",
                &["source", "outcome"],
            )?,
            webhook_dispatch_latency_seconds: histogram(
                "webhook_dispatch_latency_seconds",
                "Time from receiving an event to its final dispatch outcome.",
                &["source"],
                LONG_BUCKETS,
            )?,
            agent_run_duration_seconds: histogram(
                "agent_run_duration_seconds",
                "Agent call latency by trigger source (slack, github, pagerduty, incidentio, admin).",
                &["source"],
                LONG_BUCKETS,
            )?,
            agent_runs_total: counter(
                "agent_runs_total",
                "Agent calls by trigger source and outcome (ok, failed, timeout, upstream_error).",
                &["source", "outcome"],
            )?,
            reconcile_drift_found_total: counter(
                "reconcile_drift_found_total",
                "Drift found in the teams' Kubernetes objects, by object kind (pipeline_cronjob, discovery_cronjob, deployment, service) and drift (missing, modified, unexpected, orphan).",
                &["kind", "drift"],
            )?,
            reconcile_drift_repaired_total: counter(
                "reconcile_drift_repaired_total",
                "Drift the reconciler repaired, by object kind and drift.",
                &["kind", "drift"],
            )?,
            reconcile_duration_seconds: histogram(
                "reconcile_duration_seconds",
                "Duration of a reconcile pass, by trigger (resync: every object listed; watch: the objects of a batch of watch events).",
                &["trigger"],
                LONG_BUCKETS,
            )?,
            reconcile_objects_watched: gauge_vec(
                "reconcile_objects_watched",
                "Objects with the orchestrator's managed-by label, by resource (cronjobs, deployments, services), as of the last resync.",
                &["resource"],
            )?,
            reconcile_errors_total: counter(
                "reconcile_errors_total",
                "Reconciler failures, by stage (list, watch, database, repair); each is retried with backoff.",
                &["stage"],
            )?,
            registry,
        })
    }

    /// The text exposition of every metric in the registry.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    /// Records one call to a neighbour.
    pub fn observe_neighbour(&self, neighbour: &str, outcome: &str, elapsed: std::time::Duration) {
        self.neighbour_request_duration_seconds
            .with_label_values(&[neighbour])
            .observe(elapsed.as_secs_f64());
        self.neighbour_requests_total
            .with_label_values(&[neighbour, outcome])
            .inc();
    }
}
