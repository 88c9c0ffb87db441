//! A run on record: its record sent before anything acts for the team and committed before
//! anything is answered, opened in the platform audit meanwhile, and closed in both on every
//! path, the client going away included.

use std::time::Instant;

use serde_json::{json, Value};
use uuid::Uuid;

use super::{store, AgentProxy};
use crate::auth::Admin;
use crate::clients::agent::AgentError;
use crate::db::HeldConnection;
use crate::domain::AgentRunStatus;

/// The platform audit shows a one-line summary: longer answers are cut here.
const OUTPUT_SUMMARY_CHARS: usize = 200;
/// The platform audit keeps the message that started a run; a long one is cut.
const TRIGGER_MESSAGE_CHARS: usize = 4000;

/// What a run is about, for its audit records.
pub struct RunRecord<'a> {
    pub run_id: Uuid,
    pub correlation_id: Uuid,
    pub org_id: &'a str,
    pub team_node_id: &'a str,
    pub agent_name: &'a str,
    pub message: &'a str,
    pub context: &'a Value,
    pub streaming: bool,
}

/// An opened run. Closing it is mandatory: if it is dropped unclosed (the client went away,
/// the task was cancelled) it closes itself as failed in the background.
pub struct OpenRun {
    proxy: AgentProxy,
    run: Option<store::NewRun>,
    started: Instant,
    platform: Option<PlatformOpening>,
}

/// How a run ended, for both audits: ours (`succeeded` or `failed`) and the platform's.
pub struct Closing {
    status: AgentRunStatus,
    platform_status: PlatformStatus,
    summary: Option<Value>,
    error: Option<Value>,
    report: PlatformReport,
}

/// The platform audit's vocabulary for a run's end: anything else is a 422 (`contracts.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum PlatformStatus {
    Completed,
    Failed,
    Timeout,
}

/// What the platform audit shows of a run's end.
#[derive(Default)]
struct PlatformReport {
    tool_calls_count: i64,
    output_summary: Option<String>,
    output_json: Option<Value>,
    confidence: Option<f64>,
    error_message: Option<String>,
}

impl Closing {
    /// The agent answered; `answer` is its whole answer and `output` the part that is its output.
    /// An answer that says `success: false` is a failed run in the platform audit.
    pub fn answered(answer: &Value, output: &Value) -> Self {
        let summary = json!({"success": answer.get("success"), "output_chars": output.to_string().len()});
        let succeeded = answer.get("success").and_then(Value::as_bool) != Some(false);
        let summary_text = match output {
            Value::String(text) => Some(text.clone()),
            Value::Object(fields) => ["summary", "root_cause"]
                .iter()
                .find_map(|k| fields.get(*k).and_then(Value::as_str).map(str::to_string)),
            _ => None,
        };
        Self {
            status: AgentRunStatus::Succeeded,
            platform_status: if succeeded {
                PlatformStatus::Completed
            } else {
                PlatformStatus::Failed
            },
            summary: Some(summary),
            error: None,
            report: PlatformReport {
                tool_calls_count: answer.get("tool_calls_count").and_then(Value::as_i64).unwrap_or(0),
                output_summary: summary_text.map(|t| crate::clients::truncate(&t, OUTPUT_SUMMARY_CHARS)),
                output_json: match output {
                    Value::Object(_) => Some(output.clone()),
                    Value::String(text) => Some(json!({"text": text})),
                    _ => None,
                },
                confidence: output.get("confidence").and_then(Value::as_f64),
                error_message: None,
            },
        }
    }

    pub fn failed(code: &str, message: &str) -> Self {
        Self {
            status: AgentRunStatus::Failed,
            platform_status: PlatformStatus::Failed,
            summary: None,
            error: Some(json!({"code": code, "message": message})),
            report: PlatformReport {
                error_message: Some(message.to_string()),
                ..PlatformReport::default()
            },
        }
    }

    pub fn timed_out(message: &str) -> Self {
        Self {
            platform_status: PlatformStatus::Timeout,
            ..Self::failed("timeout", message)
        }
    }

    pub fn from_error(e: &AgentError) -> Self {
        match e {
            AgentError::Timeout(_) => Self::timed_out(&e.to_string()),
            other => Self::failed(crate::agent_call::error_label(other), &other.to_string()),
        }
    }
}

/// A run about to be recorded: the connection its record is written on is in hand, and its
/// opening in the platform audit is under way.
pub struct Opening<'p> {
    proxy: &'p AgentProxy,
    run: store::NewRun,
    detail: Value,
    connection: HeldConnection<'p>,
    platform: PlatformOpening,
    started: Instant,
}

/// Opens the run in the platform audit (in the background) and takes the connection its record
/// will be written on. A run that cannot get one is closed there as failed, in the background.
pub async fn begin<'p>(
    proxy: &'p AgentProxy,
    admin: &Admin,
    record: &RunRecord<'_>,
) -> Result<Opening<'p>, sqlx::Error> {
    let platform = open_in_platform_audit(proxy, admin, record);
    let detail = json!({"agent_run_id": record.run_id, "correlation_id": record.correlation_id,
        "agent_name": record.agent_name, "streaming": record.streaming});
    let run = store::NewRun {
        id: record.run_id,
        correlation_id: record.correlation_id,
        org_id: record.org_id.to_string(),
        team_node_id: record.team_node_id.to_string(),
        agent_name: record.agent_name.to_string(),
        actor_subject: admin.subject().to_string(),
        actor_email: admin.email().map(str::to_string),
        streaming: record.streaming,
    };
    match proxy.held.take().await {
        Ok(connection) => Ok(Opening {
            proxy,
            run,
            detail,
            connection,
            platform,
            started: Instant::now(),
        }),
        Err(e) => {
            not_recorded(proxy, run, platform);
            Err(e)
        }
    }
}

impl Opening<'_> {
    /// Records the run (our table and audit trail, in one statement) for the admin who asked.
    /// The statement is written to Postgres when this future is first polled, so polled before
    /// the agent call starts, it is on its way before the agent hears of the run.
    pub async fn record(self) -> Result<OpenRun, sqlx::Error> {
        let Opening {
            proxy,
            run,
            detail,
            mut connection,
            platform,
            started,
        } = self;
        match store::open(&mut *connection, &run, &detail).await {
            Ok(()) => {
                connection.keep();
                Ok(OpenRun {
                    proxy: proxy.clone(),
                    run: Some(run),
                    started,
                    platform: Some(platform),
                })
            }
            Err(e) => {
                not_recorded(proxy, run, platform);
                Err(e)
            }
        }
    }
}

/// A run that could not be recorded is closed in the platform audit as failed, in the background.
fn not_recorded(proxy: &AgentProxy, run: store::NewRun, platform: PlatformOpening) {
    let (proxy, run_id, org) = (proxy.clone(), run.id, run.org_id);
    tokio::spawn(async move {
        let closing = Closing::failed("storage_unavailable", "the run could not be recorded");
        platform.close(&proxy, run_id, &org, &closing).await;
    });
}

/// A run's opening in the platform audit, under way in the background: the platform audit is a
/// record, not a gate, so the agent call never waits for it (it ran beside the run's own record
/// and the credential, and on a warm credential it was the slowest of the three). Whatever closes
/// the run there waits for it first, so the platform sees the start before the end.
struct PlatformOpening(Option<tokio::task::JoinHandle<()>>);

impl PlatformOpening {
    async fn done(self) {
        if let Some(opening) = self.0 {
            // A panic in the opening was already reported by the runtime; the close goes on.
            let _ = opening.await;
        }
    }

    /// Closes the run in the platform audit once its opening is done.
    async fn close(self, proxy: &AgentProxy, run_id: Uuid, org: &str, closing: &Closing) {
        self.done().await;
        close_in_platform_audit(proxy, run_id, org, closing).await;
    }
}

/// Starts opening the run in the platform audit, as `contracts.md` gives the body. A failure is
/// logged and the run goes on.
fn open_in_platform_audit(proxy: &AgentProxy, admin: &Admin, record: &RunRecord<'_>) -> PlatformOpening {
    let Some(internal) = proxy.internal_admin_token.clone() else {
        return PlatformOpening(None);
    };
    let body = json!({
        "run_id": record.run_id,
        "org_id": record.org_id,
        "team_node_id": record.team_node_id,
        "correlation_id": record.correlation_id,
        "trigger_source": "api",
        "trigger_actor": admin.email().unwrap_or(admin.subject()),
        "trigger_message": crate::clients::truncate(record.message, TRIGGER_MESSAGE_CHARS),
        "trigger_channel_id": null,
        "agent_name": record.agent_name,
        "metadata": {"context": record.context},
    });
    let (proxy, run_id, org) = (proxy.clone(), record.run_id, record.org_id.to_string());
    PlatformOpening(Some(tokio::spawn(async move {
        if let Err(e) = proxy.config_service.audit_agent_run_start(&internal, &org, &body).await {
            tracing::warn!(%run_id, error = %e, "recording the run in the platform audit failed");
        }
    })))
}

impl OpenRun {
    /// Closes the run in the background: the caller's answer never waits for the bookkeeping. A
    /// crash before it lands leaves the run to the sweeper.
    pub fn finish(mut self, closing: Closing) {
        self.spawn_close(closing);
    }

    fn spawn_close(&mut self, closing: Closing) {
        let Some(run) = self.run.take() else {
            return;
        };
        let (proxy, started) = (self.proxy.clone(), self.started);
        let platform = self.platform.take().unwrap_or(PlatformOpening(None));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { close(&proxy, &run, started, platform, closing).await });
        }
    }
}

impl Drop for OpenRun {
    fn drop(&mut self) {
        self.spawn_close(Closing::failed(
            "client_disconnected",
            "the client went away before the run finished; the agent call was cancelled",
        ));
    }
}

async fn close(proxy: &AgentProxy, run: &store::NewRun, started: Instant, platform: PlatformOpening, closing: Closing) {
    let duration_ms = started.elapsed().as_millis() as i64;
    let detail = json!({"agent_run_id": run.id, "duration_ms": duration_ms, "error": closing.error});
    let end = store::RunEnd {
        status: closing.status,
        duration_ms,
        summary: closing.summary.as_ref(),
        error: closing.error.as_ref(),
        audit_detail: &detail,
    };
    let closed = async {
        let mut connection = proxy.held.take().await?;
        store::close(&mut *connection, run, &end).await?;
        connection.keep();
        Ok::<_, sqlx::Error>(())
    };
    if let Err(e) = closed.await {
        tracing::error!(run_id = %run.id, error = %e, "closing an agent run in the database failed; the sweeper will close it");
    }
    platform.close(proxy, run.id, &run.org_id, &closing).await;
}

/// Closes the run in the platform audit, in its vocabulary (`contracts.md`).
pub async fn close_in_platform_audit(proxy: &AgentProxy, run_id: Uuid, org: &str, closing: &Closing) {
    let Some(admin) = &proxy.internal_admin_token else {
        return;
    };
    let report = &closing.report;
    let update = json!({
        "run_id": run_id,
        "status": closing.platform_status,
        "tool_calls_count": report.tool_calls_count,
        "output_summary": report.output_summary,
        "output_json": report.output_json,
        "error_message": report.error_message,
        "confidence": report.confidence,
    });
    if let Err(e) = proxy
        .config_service
        .audit_agent_run_update(admin, org, &run_id.to_string(), &update)
        .await
    {
        tracing::warn!(%run_id, error = %e, "closing the run in the platform audit failed");
    }
}
