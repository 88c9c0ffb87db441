//! What each source's deliveries mean: at ingress, the delivery id, event kind, ordering key and
//! rate-limit key (or a protocol message to answer directly); at dispatch, whether to act, which
//! team owns the event, and the message and context for the agent.

use axum::http::HeaderMap;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::destinations::ReplyTo;
use super::signature::Source;

/// What ingress learns from a verified delivery.
#[derive(Debug, PartialEq)]
pub enum Envelope {
    /// Answer directly, store nothing (Slack url_verification and ssl_check, GitHub ping).
    Protocol(Value),
    Event(EventMeta),
}

#[derive(Debug, PartialEq)]
pub struct EventMeta {
    pub kind: String,
    pub delivery_id: String,
    pub ordering_key: Option<String>,
    /// The rate-limit key: Slack team and channel, GitHub repository, PagerDuty service,
    /// Incident.io alert source.
    pub sender_key: String,
    /// Headers kept with the event.
    pub headers: Value,
}

#[derive(Debug)]
pub struct MalformedDelivery(pub String);

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

pub use crate::db::storable_text as strip_nul;

/// `Value::pointer` without its allocations: it unescapes every segment into a new `String`, and
/// our paths are literals with nothing to unescape. A perf profile under `scripts/bench pipeline`
/// put 2.6% of the service's CPU in those lookups.
pub(crate) fn at<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    debug_assert!(!path.contains('~'), "escaped JSON pointers are not supported: {path}");
    path.strip_prefix('/')?
        .split('/')
        .try_fold(value, |target, segment| match target {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        })
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    at(value, pointer).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// What ingress stores must be storable: no NUL anywhere in the text columns.
fn storable(meta: EventMeta) -> EventMeta {
    EventMeta {
        kind: strip_nul(&meta.kind),
        delivery_id: strip_nul(&meta.delivery_id),
        ordering_key: meta.ordering_key.as_deref().map(strip_nul),
        sender_key: meta.sender_key,
        headers: crate::db::storable_json(&meta.headers),
    }
}

fn body_digest(body: &[u8]) -> String {
    hex::encode(&Sha256::digest(body)[..16])
}

fn json_body(body: &[u8]) -> Result<Value, MalformedDelivery> {
    serde_json::from_slice(body).map_err(|e| MalformedDelivery(format!("the body is not JSON: {e}")))
}

/// Slack interactions arrive form-encoded with the JSON in `payload`.
pub fn slack_interaction_payload(body: &[u8]) -> Result<Value, MalformedDelivery> {
    let form: Vec<(String, String)> =
        serde_urlencoded::from_bytes(body).map_err(|_| MalformedDelivery("the body is not form-encoded".into()))?;
    let payload = form
        .into_iter()
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| v)
        .ok_or_else(|| MalformedDelivery("no payload field".into()))?;
    serde_json::from_str(&payload).map_err(|e| MalformedDelivery(format!("payload is not JSON: {e}")))
}

fn is_ssl_check(body: &[u8]) -> bool {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .map(|form| form.iter().any(|(k, v)| k == "ssl_check" && v == "1"))
        .unwrap_or(false)
}

/// `slack_interactions` tells the two Slack routes apart.
pub fn envelope(
    source: Source,
    slack_interactions: bool,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Envelope, MalformedDelivery> {
    Ok(match read_envelope(source, slack_interactions, headers, body)? {
        Envelope::Event(meta) => Envelope::Event(storable(meta)),
        protocol => protocol,
    })
}

fn read_envelope(
    source: Source,
    slack_interactions: bool,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Envelope, MalformedDelivery> {
    match source {
        Source::Slack if slack_interactions => {
            if is_ssl_check(body) {
                return Ok(Envelope::Protocol(json!({"ok": true})));
            }
            let payload = slack_interaction_payload(body)?;
            let team = str_at(&payload, "/team/id").unwrap_or("-");
            let channel = str_at(&payload, "/channel/id")
                .or_else(|| str_at(&payload, "/container/channel_id"))
                .unwrap_or("-");
            let delivery_id = str_at(&payload, "/trigger_id")
                .map(str::to_string)
                .unwrap_or_else(|| body_digest(body));
            Ok(Envelope::Event(EventMeta {
                kind: format!("interaction.{}", str_at(&payload, "/type").unwrap_or("unknown")),
                delivery_id: format!("interaction:{delivery_id}"),
                ordering_key: None,
                sender_key: format!("{team}:{channel}"),
                headers: json!({}),
            }))
        }
        Source::Slack => {
            if is_ssl_check(body) {
                return Ok(Envelope::Protocol(json!({"ok": true})));
            }
            let value = json_body(body)?;
            match str_at(&value, "/type") {
                Some("url_verification") => {
                    let challenge = value.get("challenge").cloned().unwrap_or(Value::Null);
                    Ok(Envelope::Protocol(json!({ "challenge": challenge })))
                }
                Some("ssl_check") => Ok(Envelope::Protocol(json!({"ok": true}))),
                _ => {
                    let event_id = str_at(&value, "/event_id")
                        .map(str::to_string)
                        .unwrap_or_else(|| body_digest(body));
                    let channel = str_at(&value, "/event/channel").unwrap_or("-");
                    let team = str_at(&value, "/team_id").unwrap_or("-");
                    let thread = str_at(&value, "/event/thread_ts").or_else(|| str_at(&value, "/event/ts"));
                    let mut kept = Map::new();
                    if let Some(retry) = header(headers, "x-slack-retry-num") {
                        kept.insert("x-slack-retry-num".into(), retry.into());
                    }
                    Ok(Envelope::Event(EventMeta {
                        kind: str_at(&value, "/event/type")
                            .or_else(|| str_at(&value, "/type"))
                            .unwrap_or("unknown")
                            .to_string(),
                        delivery_id: event_id,
                        ordering_key: thread.map(|t| format!("slack:{channel}:{t}")),
                        sender_key: format!("{team}:{channel}"),
                        headers: Value::Object(kept),
                    }))
                }
            }
        }
        Source::GitHub => {
            let kind = header(headers, "x-github-event").unwrap_or_else(|| "unknown".into());
            if kind == "ping" {
                return Ok(Envelope::Protocol(json!({"ok": true})));
            }
            let value = json_body(body)?;
            let delivery = header(headers, "x-github-delivery")
                .ok_or_else(|| MalformedDelivery("X-GitHub-Delivery is missing".into()))?;
            let delivery_id = match header(headers, "x-github-hook-id") {
                Some(hook) => format!("{hook}:{delivery}"),
                None => delivery.clone(),
            };
            let repo = str_at(&value, "/repository/full_name").unwrap_or("-").to_string();
            let number = at(&value, "/pull_request/number")
                .or_else(|| at(&value, "/issue/number"))
                .and_then(Value::as_u64);
            let ordering_key = match (number, str_at(&value, "/ref")) {
                (Some(n), _) => Some(format!("github:{repo}#{n}")),
                (None, Some(git_ref)) => Some(format!("github:{repo}@{git_ref}")),
                _ => None,
            };
            Ok(Envelope::Event(EventMeta {
                kind,
                delivery_id,
                ordering_key,
                sender_key: repo,
                headers: json!({"x-github-delivery": delivery, "x-github-hook-id": header(headers, "x-github-hook-id")}),
            }))
        }
        Source::PagerDuty => {
            let value = json_body(body)?;
            let legacy = at(&value, "/messages/0");
            let (kind, event_id, incident, service) = match legacy {
                Some(message) => (
                    str_at(message, "/event")
                        .or_else(|| str_at(message, "/type"))
                        .unwrap_or("unknown"),
                    str_at(message, "/id"),
                    str_at(message, "/incident/id"),
                    str_at(message, "/incident/service/id"),
                ),
                None => (
                    str_at(&value, "/event/event_type").unwrap_or("unknown"),
                    str_at(&value, "/event/id"),
                    str_at(&value, "/event/data/id"),
                    str_at(&value, "/event/data/service/id"),
                ),
            };
            // The event id is inside the signed body; X-Webhook-Id is not signed, so a replayed body
            // with a new header would otherwise pass as a new delivery.
            let delivery_id = event_id
                .map(str::to_string)
                .or_else(|| header(headers, "x-webhook-id"))
                .unwrap_or_else(|| body_digest(body));
            Ok(Envelope::Event(EventMeta {
                kind: kind.to_string(),
                delivery_id,
                ordering_key: incident.map(|i| format!("pagerduty:{i}")),
                sender_key: service.unwrap_or("-").to_string(),
                headers: json!({"x-webhook-id": header(headers, "x-webhook-id")}),
            }))
        }
        Source::IncidentIo => {
            let value = json_body(body)?;
            let delivery_id =
                header(headers, "webhook-id").ok_or_else(|| MalformedDelivery("webhook-id is missing".into()))?;
            let kind = str_at(&value, "/event_type").unwrap_or("unknown").to_string();
            let (incident, alert) = incidentio_objects(&value);
            let ordering_key = incident
                .and_then(|i| str_at(i, "/id"))
                .map(|id| format!("incidentio:incident:{id}"))
                .or_else(|| {
                    alert
                        .and_then(|a| str_at(a, "/id"))
                        .map(|id| format!("incidentio:alert:{id}"))
                });
            let sender_key = alert
                .and_then(|a| str_at(a, "/alert_source_id"))
                .unwrap_or("-")
                .to_string();
            Ok(Envelope::Event(EventMeta {
                kind,
                ordering_key,
                sender_key,
                headers: json!({"webhook-id": &delivery_id}),
                delivery_id,
            }))
        }
    }
}

/// Incident.io nests the object under the event type's name (or sends it at the top level).
fn incidentio_objects(value: &Value) -> (Option<&Value>, Option<&Value>) {
    let nested = str_at(value, "/event_type").and_then(|t| value.get(t));
    let find = |name: &str| {
        nested
            .and_then(|n| n.get(name))
            .or_else(|| value.get(name))
            .filter(|v| v.is_object())
    };
    (find("incident"), find("alert"))
}

/// What dispatch does with one event.
#[derive(Debug, PartialEq)]
pub enum Plan {
    Skip(String),
    /// A Slack feedback button: forward to the config service.
    Feedback(Value),
    Run(RunPlan),
}

#[derive(Debug, PartialEq)]
pub struct RunPlan {
    /// The routing identifier (`slack_channel_id`, `github_repo`, ...) and its value.
    pub routing_key: &'static str,
    pub routing_value: String,
    pub message: String,
    /// What the agent's context carries under `metadata.<source>`.
    pub metadata: Value,
    /// Who asked, when the source says (the Slack user, the GitHub sender).
    pub user_id: Option<String>,
    /// Stable per conversation (`contracts.md`), so the agent keeps its memory of a thread, a pull
    /// request or an issue; `None` means the run's correlation id.
    pub session_id: Option<String>,
    /// Where the source's own default answer goes.
    pub reply_to: ReplyTo,
    /// Destinations the sender chose itself (the platform's Slack bot may), used as they are.
    pub destinations: Option<Vec<Value>>,
}

impl RunPlan {
    /// The run dialect's `context`: `{user_id, session_id, metadata: {<source>: ...}, trigger}`.
    pub fn context(&self, source: Source, session_id: &str) -> Value {
        json!({
            "user_id": self.user_id,
            "session_id": session_id,
            "metadata": {source.as_str(): self.metadata},
            "trigger": source.as_str(),
        })
    }
}

/// `slack-<channel, lower case>-<thread_ts with "." as "-">`: the session id the Slack bot has
/// always used, so conversations survive the cut-over.
pub fn slack_session_id(channel: &str, thread_ts: &str) -> String {
    format!("slack-{}-{}", channel.to_lowercase(), thread_ts.replace('.', "-"))
}

const GITHUB_ACTIONABLE: &[&str] = &[
    "pull_request",
    "push",
    "issues",
    "issue_comment",
    "pull_request_review",
    "pull_request_review_comment",
];
const PAGERDUTY_ACTIONABLE: &[&str] = &[
    "incident.triggered",
    "incident.reopened",
    "incident.escalated",
    "incident.trigger",
    "incident.escalate",
];

pub fn plan(source: Source, kind: &str, body: &[u8]) -> Plan {
    let result = match source {
        Source::Slack if kind.starts_with("interaction.") => plan_slack_interaction(body),
        Source::Slack => plan_slack(kind, body),
        Source::GitHub => plan_github(kind, body),
        Source::PagerDuty => plan_pagerduty(kind, body),
        Source::IncidentIo => plan_incidentio(kind, body),
    };
    result.unwrap_or_else(|MalformedDelivery(reason)| Plan::Skip(reason))
}

/// `<@U123>` mentions out, whitespace collapsed.
pub fn strip_mentions(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<@") {
        out.push_str(&rest[..start]);
        match rest[start..].find('>') {
            Some(end) => rest = &rest[start + end + 1..],
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn plan_slack(kind: &str, body: &[u8]) -> Result<Plan, MalformedDelivery> {
    let value = json_body(body)?;
    // The internal trigger (the platform's own bot) stores a flat body.
    let event = if kind == "internal_trigger" {
        &value
    } else {
        value.get("event").unwrap_or(&Value::Null)
    };
    let is_dm = str_at(event, "/channel_type") == Some("im");
    if kind != "internal_trigger" && !(kind == "app_mention" || (kind == "message" && is_dm)) {
        return Ok(Plan::Skip(format!(
            "slack {kind} events carry nothing to act on (only app mentions and direct messages)"
        )));
    }
    if event.get("bot_id").is_some_and(|b| !b.is_null()) || str_at(event, "/subtype").is_some() {
        return Ok(Plan::Skip("a bot's own message, or an edit".into()));
    }
    let channel = str_at(event, "/channel")
        .or_else(|| str_at(event, "/channel_id"))
        .ok_or_else(|| MalformedDelivery("no channel".into()))?;
    let ts = str_at(event, "/ts")
        .or_else(|| str_at(event, "/event_ts"))
        .unwrap_or("");
    let event_ts = str_at(event, "/event_ts").unwrap_or(ts);
    let thread = str_at(event, "/thread_ts").unwrap_or(ts);
    let user = str_at(event, "/user").or_else(|| str_at(event, "/user_id"));
    let text = strip_mentions(str_at(event, "/text").unwrap_or(""));
    if text.is_empty() {
        return Ok(Plan::Skip("the message has no text after mentions".into()));
    }
    let destinations = event
        .get("output_destinations")
        .and_then(Value::as_array)
        .filter(|_| kind == "internal_trigger")
        .cloned();
    Ok(Plan::Run(RunPlan {
        routing_key: "slack_channel_id",
        routing_value: channel.to_string(),
        message: text,
        metadata: json!({
            "channel_id": channel, "thread_ts": thread, "event_ts": event_ts, "ts": ts, "user_id": user,
            "team_id": str_at(&value, "/team_id").or_else(|| str_at(event, "/team_id")),
        }),
        user_id: user.map(str::to_string),
        session_id: (!thread.is_empty()).then(|| slack_session_id(channel, thread)),
        reply_to: ReplyTo::SlackThread {
            channel_id: channel.to_string(),
            thread_ts: thread.to_string(),
        },
        destinations,
    }))
}

fn plan_slack_interaction(body: &[u8]) -> Result<Plan, MalformedDelivery> {
    let payload = slack_interaction_payload(body)?;
    let Some(action) = at(&payload, "/actions/0") else {
        return Ok(Plan::Skip("an interaction without an action".into()));
    };
    let feedback = match str_at(action, "/action_id") {
        Some("feedback_positive") => "positive",
        Some("feedback_negative") => "negative",
        other => {
            return Ok(Plan::Skip(format!(
                "interaction {} is not feedback",
                other.unwrap_or("unknown")
            )))
        }
    };
    let value: Value = str_at(action, "/value")
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or(Value::Null);
    Ok(Plan::Feedback(json!({
        "run_id": value.get("run_id"),
        "correlation_id": value.get("correlation_id"),
        "feedback": feedback,
        "user_id": str_at(&payload, "/user/id"),
        "source": "slack",
    })))
}

fn plan_github(kind: &str, body: &[u8]) -> Result<Plan, MalformedDelivery> {
    if !GITHUB_ACTIONABLE.contains(&kind) {
        return Ok(Plan::Skip(format!("github {kind} events carry nothing to act on")));
    }
    let value = json_body(body)?;
    let repo =
        str_at(&value, "/repository/full_name").ok_or_else(|| MalformedDelivery("no repository.full_name".into()))?;
    let actor = str_at(&value, "/sender/login").unwrap_or("someone");
    let action = str_at(&value, "/action").unwrap_or("updated");
    let (message, number) = match kind {
        "pull_request" | "pull_request_review" | "pull_request_review_comment" => {
            let number = at(&value, "/pull_request/number").and_then(Value::as_u64).unwrap_or(0);
            let title = str_at(&value, "/pull_request/title").unwrap_or("");
            (
                format!("GitHub PR #{number} {action} in {repo} by {actor}: {title}"),
                Some(number),
            )
        }
        "issues" => {
            let number = at(&value, "/issue/number").and_then(Value::as_u64).unwrap_or(0);
            let title = str_at(&value, "/issue/title").unwrap_or("");
            (
                format!("GitHub issue #{number} {action} in {repo} by {actor}: {title}"),
                Some(number),
            )
        }
        "issue_comment" => {
            let number = at(&value, "/issue/number").and_then(Value::as_u64).unwrap_or(0);
            let comment = crate::clients::truncate(str_at(&value, "/comment/body").unwrap_or(""), 2000);
            (
                format!("GitHub comment on #{number} in {repo} by {actor}: {comment}"),
                Some(number),
            )
        }
        _ => {
            let git_ref = str_at(&value, "/ref").unwrap_or("");
            let commits = value.get("commits").and_then(Value::as_array).map_or(0, Vec::len);
            let head = str_at(&value, "/head_commit/message").unwrap_or("");
            (
                format!("GitHub push to {git_ref} in {repo} by {actor}: {commits} commit(s); head: {head}"),
                None,
            )
        }
    };
    // A comment on a pull request arrives as an issue comment whose issue is a pull request.
    let is_pull_request = kind.starts_with("pull_request") || at(&value, "/issue/pull_request").is_some();
    let (pr_number, issue_number) = match number {
        Some(n) if is_pull_request => (Some(n), None),
        Some(n) => (None, Some(n)),
        None => (None, None),
    };
    let session_id = match (pr_number, issue_number) {
        (Some(n), _) => Some(format!("github-{}-pr-{n}", repo.replace('/', "-"))),
        (None, Some(n)) => Some(format!("github-{}-issue-{n}", repo.replace('/', "-"))),
        (None, None) => None,
    };
    Ok(Plan::Run(RunPlan {
        routing_key: "github_repo",
        routing_value: repo.to_string(),
        message,
        metadata: json!({"event_type": kind, "action": action, "repo": repo, "pr_number": pr_number,
            "issue_number": issue_number, "sender": actor,
            "url": str_at(&value, "/pull_request/html_url").or_else(|| str_at(&value, "/issue/html_url"))}),
        user_id: str_at(&value, "/sender/login").map(str::to_string),
        session_id,
        reply_to: match (pr_number, issue_number) {
            (None, None) => ReplyTo::Nowhere,
            _ => ReplyTo::GitHub {
                repo: repo.to_string(),
                pr_number,
                issue_number,
            },
        },
        destinations: None,
    }))
}

fn plan_pagerduty(kind: &str, body: &[u8]) -> Result<Plan, MalformedDelivery> {
    if !PAGERDUTY_ACTIONABLE.contains(&kind) {
        return Ok(Plan::Skip(format!("pagerduty {kind} events carry nothing to act on")));
    }
    let value = json_body(body)?;
    let incident = at(&value, "/messages/0/incident")
        .or_else(|| at(&value, "/event/data"))
        .ok_or_else(|| MalformedDelivery("no incident".into()))?;
    let service = str_at(incident, "/service/id").ok_or_else(|| MalformedDelivery("no service id".into()))?;
    let id = str_at(incident, "/id").unwrap_or("");
    let number = incident.get("number").map(|n| format!("#{n} ")).unwrap_or_default();
    let title = str_at(incident, "/title").unwrap_or("");
    let service_name = str_at(incident, "/service/summary")
        .or_else(|| str_at(incident, "/service/name"))
        .unwrap_or(service);
    let urgency = str_at(incident, "/urgency").unwrap_or("unknown");
    let status = str_at(incident, "/status").unwrap_or("unknown");
    Ok(Plan::Run(RunPlan {
        routing_key: "pagerduty_service_id",
        routing_value: service.to_string(),
        message: format!(
            "PagerDuty incident {number}{kind} on {service_name}: {title} (urgency {urgency}, status {status})"
        ),
        metadata: json!({"event_type": kind, "incident_id": id, "service_id": service, "title": title,
            "urgency": urgency, "status": status, "url": str_at(incident, "/html_url")}),
        user_id: None,
        session_id: None,
        reply_to: ReplyTo::Incident,
        destinations: None,
    }))
}

fn plan_incidentio(kind: &str, body: &[u8]) -> Result<Plan, MalformedDelivery> {
    let value = json_body(body)?;
    let (incident, alert) = incidentio_objects(&value);
    if let Some(alert) = alert {
        let Some(source_id) = str_at(alert, "/alert_source_id") else {
            return Ok(Plan::Skip("an alert without an alert source".into()));
        };
        let title = str_at(alert, "/title").unwrap_or("");
        let status = str_at(alert, "/status").unwrap_or("unknown");
        let id = str_at(alert, "/id").unwrap_or("");
        return Ok(Plan::Run(RunPlan {
            routing_key: "incidentio_alert_source_id",
            routing_value: source_id.to_string(),
            message: format!("Incident.io alert: {title} (status {status})"),
            metadata: json!({"event_type": kind, "alert_id": id, "alert_source_id": source_id, "title": title, "status": status}),
            user_id: None,
            session_id: None,
            reply_to: ReplyTo::Incident,
            destinations: None,
        }));
    }
    let Some(incident) = incident else {
        return Ok(Plan::Skip(format!("incidentio {kind} events carry nothing to act on")));
    };
    let team = str_at(incident, "/team_id")
        .or_else(|| str_at(incident, "/teams/0/id"))
        .or_else(|| str_at(&value, "/team_id"));
    let Some(team) = team else {
        return Ok(Plan::Skip("an incident without a team to route by".into()));
    };
    let id = str_at(incident, "/id").unwrap_or("");
    let reference = str_at(incident, "/reference").unwrap_or(id);
    let name = str_at(incident, "/name").unwrap_or("");
    let severity = str_at(incident, "/severity/name").unwrap_or("unknown");
    let status = str_at(incident, "/incident_status/name")
        .or_else(|| str_at(incident, "/status"))
        .unwrap_or("unknown");
    Ok(Plan::Run(RunPlan {
        routing_key: "incidentio_team_id",
        routing_value: team.to_string(),
        message: format!("Incident.io incident {reference}: {name} (severity {severity}, status {status})"),
        metadata: json!({"event_type": kind, "incident_id": id, "reference": reference, "name": name,
            "severity": severity, "status": status, "url": str_at(incident, "/permalink")}),
        user_id: None,
        session_id: None,
        reply_to: ReplyTo::Incident,
        destinations: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_find_what_a_json_pointer_finds() {
        let value = json!({"messages": [{"incident": {"id": "P1"}}], "a": {"b": 1}, "empty": {}});
        for path in [
            "/messages/0/incident/id",
            "/messages/0",
            "/a/b",
            "/a",
            "/empty",
            "/messages/1",
            "/a/b/c",
            "/messages/x",
            "/missing",
            "/",
        ] {
            assert_eq!(at(&value, path), value.pointer(path), "{path}");
        }
    }

    #[test]
    fn github_pull_requests_become_a_one_line_message() {
        let body = json!({"action": "opened", "number": 7, "pull_request": {"number": 7, "title": "Fix the cache"},
            "repository": {"full_name": "acme/api"}, "sender": {"login": "alice"}});
        let Plan::Run(run) = plan(Source::GitHub, "pull_request", body.to_string().as_bytes()) else {
            panic!()
        };
        assert_eq!(run.message, "GitHub PR #7 opened in acme/api by alice: Fix the cache");
        assert_eq!(
            (run.routing_key, run.routing_value.as_str()),
            ("github_repo", "acme/api")
        );
        assert!(matches!(plan(Source::GitHub, "star", b"{}"), Plan::Skip(_)));
    }

    #[test]
    fn slack_mentions_are_stripped_and_bots_skipped() {
        assert_eq!(
            strip_mentions("<@U123>  what broke\tin prod? <@U9>"),
            "what broke in prod?"
        );
        let body = json!({"team_id": "T1", "event": {"type": "app_mention", "channel": "C1", "ts": "1.2", "text": "<@U1> hi", "user": "U2"}});
        let Plan::Run(run) = plan(Source::Slack, "app_mention", body.to_string().as_bytes()) else {
            panic!()
        };
        assert_eq!(run.message, "hi");
        assert_eq!(run.session_id.as_deref(), Some("slack-c1-1-2"));
        let bot = json!({"event": {"type": "app_mention", "channel": "C1", "text": "x", "bot_id": "B1"}});
        assert!(matches!(
            plan(Source::Slack, "app_mention", bot.to_string().as_bytes()),
            Plan::Skip(_)
        ));
        assert!(matches!(plan(Source::Slack, "reaction_added", b"{}"), Plan::Skip(_)));
    }

    #[test]
    fn pagerduty_v3_and_legacy_shapes_route_by_service() {
        let v3 = json!({"event": {"id": "E1", "event_type": "incident.triggered", "data": {"id": "P1", "title": "DB down", "urgency": "high", "status": "triggered", "service": {"id": "SVC1", "summary": "db"}}}});
        let Plan::Run(run) = plan(Source::PagerDuty, "incident.triggered", v3.to_string().as_bytes()) else {
            panic!()
        };
        assert_eq!(run.routing_value, "SVC1");
        assert!(run.message.contains("DB down") && run.message.contains("urgency high"));
        let legacy = json!({"messages": [{"id": "M1", "event": "incident.trigger", "incident": {"id": "P2", "title": "x", "service": {"id": "SVC2"}}}]});
        let Envelope::Event(meta) = envelope(
            Source::PagerDuty,
            false,
            &HeaderMap::new(),
            legacy.to_string().as_bytes(),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (meta.kind.as_str(), meta.delivery_id.as_str()),
            ("incident.trigger", "M1")
        );
        let Plan::Run(run) = plan(Source::PagerDuty, "incident.trigger", legacy.to_string().as_bytes()) else {
            panic!()
        };
        assert_eq!(run.routing_value, "SVC2");
    }

    #[test]
    fn nul_characters_never_reach_the_database() {
        let body = json!({"type": "event_callback", "event_id": "Ev\u{0}1", "team_id": "T1",
            "event": {"type": "app_\u{0}mention", "channel": "C\u{0}1", "ts": "1.2"}});
        let Envelope::Event(meta) =
            envelope(Source::Slack, false, &HeaderMap::new(), body.to_string().as_bytes()).unwrap()
        else {
            panic!()
        };
        assert_eq!((meta.delivery_id.as_str(), meta.kind.as_str()), ("Ev1", "app_mention"));
        assert!(!meta.ordering_key.unwrap().contains('\0'));
    }

    #[test]
    fn protocol_messages_are_recognised() {
        let challenge = json!({"type": "url_verification", "challenge": "abc"});
        assert_eq!(
            envelope(
                Source::Slack,
                false,
                &HeaderMap::new(),
                challenge.to_string().as_bytes()
            )
            .unwrap(),
            Envelope::Protocol(json!({"challenge": "abc"}))
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-github-event", "ping".parse().unwrap());
        assert!(matches!(
            envelope(Source::GitHub, false, &headers, b"{}").unwrap(),
            Envelope::Protocol(_)
        ));
    }
}
