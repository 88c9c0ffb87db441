//! Where a webhook-triggered run's answer goes: the agent posts it to `output_destinations`, and
//! an empty list means nobody sees it. Resolved from the team's effective config, first match
//! wins (`contracts.md`): an explicit override, then the team's per-source override
//! (`output_config.trigger_overrides`), then the source's own default (the Slack thread, the pull
//! request, the team's incident channel), then the team's `output_config.default_destinations`,
//! else nothing.

use serde_json::{json, Value};

use super::signature::Source;
use super::sources::at;

/// Where the event came from, as far as answering it goes.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplyTo {
    /// A Slack message: answer in its thread.
    SlackThread { channel_id: String, thread_ts: String },
    /// A pull request or an issue (a comment on a pull request is the pull request).
    GitHub {
        repo: String,
        pr_number: Option<u64>,
        issue_number: Option<u64>,
    },
    /// A PagerDuty or Incident.io incident or alert: answered in the team's channel.
    Incident,
    /// Nothing to answer in (a push).
    Nowhere,
}

/// Resolves the destinations of one run. `fallback_bot_token` is the deployment's
/// `SLACK_BOT_TOKEN`, used when the team's config has no `integrations.slack.bot_token`.
pub fn resolve(
    source: Source,
    reply_to: &ReplyTo,
    team_config: &Value,
    explicit: Option<&[Value]>,
    fallback_bot_token: Option<&str>,
) -> Vec<Value> {
    if let Some(explicit) = explicit.filter(|list| !list.is_empty()) {
        return explicit.to_vec();
    }
    let bot_token = at(team_config, "/integrations/slack/bot_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .or(fallback_bot_token);
    let slack = |channel_id: &str, thread_ts: Option<&str>| {
        let mut destination = json!({"type": "slack", "channel_id": channel_id});
        if let Some(thread_ts) = thread_ts {
            destination["thread_ts"] = json!(thread_ts);
        }
        if let Some(token) = bot_token {
            destination["bot_token"] = json!(token);
        }
        destination
    };
    let defaults = || -> Vec<Value> {
        at(team_config, "/output_config/default_destinations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let config_str = |pointer: &str| {
        at(team_config, pointer)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };

    let source_name = source.as_str();
    let override_rule = config_str(&format!("/output_config/trigger_overrides/{source_name}"));
    match (override_rule, reply_to) {
        (Some("reply_in_thread"), ReplyTo::SlackThread { channel_id, thread_ts }) if source == Source::Slack => {
            return vec![slack(channel_id, Some(thread_ts))];
        }
        (Some("comment_on_pr"), ReplyTo::GitHub { .. }) if source == Source::GitHub => {
            return github_comment(reply_to).into_iter().collect();
        }
        (Some("use_default"), _) => return defaults(),
        _ => {}
    }

    let mut destinations = Vec::new();
    match reply_to {
        ReplyTo::SlackThread { channel_id, thread_ts } => destinations.push(slack(channel_id, Some(thread_ts))),
        ReplyTo::GitHub { .. } => {
            destinations.extend(github_comment(reply_to));
            if let Some(channel) = config_str("/notifications/github_output/slack_channel_id") {
                destinations.push(slack(channel, None));
            }
        }
        ReplyTo::Incident => {
            let channel = config_str(&format!("/notifications/{source_name}_output/slack_channel_id"))
                .or_else(|| config_str("/notifications/default_slack_channel_id"));
            if let Some(channel) = channel {
                destinations.push(slack(channel, None));
            }
        }
        ReplyTo::Nowhere => {}
    }
    if destinations.is_empty() {
        destinations = defaults();
    }
    destinations
}

fn github_comment(reply_to: &ReplyTo) -> Option<Value> {
    let ReplyTo::GitHub {
        repo,
        pr_number,
        issue_number,
    } = reply_to
    else {
        return None;
    };
    match (pr_number, issue_number) {
        (Some(pr), _) => Some(json!({"type": "github_pr_comment", "repo": repo, "pr_number": pr})),
        (None, Some(issue)) => Some(json!({"type": "github_issue_comment", "repo": repo, "issue_number": issue})),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread() -> ReplyTo {
        ReplyTo::SlackThread {
            channel_id: "C1".into(),
            thread_ts: "1700000000.000100".into(),
        }
    }

    fn pr() -> ReplyTo {
        ReplyTo::GitHub {
            repo: "acme/api".into(),
            pr_number: Some(7),
            issue_number: None,
        }
    }

    #[test]
    fn an_explicit_override_wins_over_everything() {
        let explicit = [json!({"type": "slack", "channel_id": "COVERRIDE"})];
        let config = json!({"output_config": {"trigger_overrides": {"slack": "use_default"}, "default_destinations": [{"type": "x"}]}});
        assert_eq!(
            resolve(Source::Slack, &thread(), &config, Some(&explicit), None),
            explicit.to_vec()
        );
        // An empty override is no override.
        assert_eq!(
            resolve(Source::Slack, &thread(), &json!({}), Some(&[]), None),
            vec![json!({"type": "slack", "channel_id": "C1", "thread_ts": "1700000000.000100"})]
        );
    }

    #[test]
    fn the_teams_per_source_override_comes_next() {
        let defaults = json!([{"type": "slack", "channel_id": "CDEFAULT"}]);
        let config = json!({"output_config": {"trigger_overrides": {"github": "use_default", "slack": "reply_in_thread"},
            "default_destinations": defaults}});
        assert_eq!(
            resolve(Source::GitHub, &pr(), &config, None, None),
            defaults.as_array().unwrap().clone()
        );
        let config = json!({"output_config": {"trigger_overrides": {"github": "comment_on_pr"}},
            "notifications": {"github_output": {"slack_channel_id": "CGH"}}});
        // comment_on_pr answers on the pull request only, without the Slack copy of the default.
        assert_eq!(
            resolve(Source::GitHub, &pr(), &config, None, None),
            vec![json!({"type": "github_pr_comment", "repo": "acme/api", "pr_number": 7})]
        );
        let config = json!({"output_config": {"trigger_overrides": {"slack": "reply_in_thread"}},
            "integrations": {"slack": {"bot_token": "xoxb-team"}}});
        assert_eq!(
            resolve(Source::Slack, &thread(), &config, None, Some("xoxb-env")),
            vec![
                json!({"type": "slack", "channel_id": "C1", "thread_ts": "1700000000.000100", "bot_token": "xoxb-team"})
            ]
        );
    }

    #[test]
    fn each_source_has_its_own_default() {
        assert_eq!(
            resolve(Source::Slack, &thread(), &json!({}), None, Some("xoxb-env")),
            vec![
                json!({"type": "slack", "channel_id": "C1", "thread_ts": "1700000000.000100", "bot_token": "xoxb-env"})
            ]
        );
        let config = json!({"notifications": {"github_output": {"slack_channel_id": "CGH"}}});
        assert_eq!(
            resolve(Source::GitHub, &pr(), &config, None, None),
            vec![
                json!({"type": "github_pr_comment", "repo": "acme/api", "pr_number": 7}),
                json!({"type": "slack", "channel_id": "CGH"})
            ]
        );
        let issue = ReplyTo::GitHub {
            repo: "acme/api".into(),
            pr_number: None,
            issue_number: Some(3),
        };
        assert_eq!(
            resolve(Source::GitHub, &issue, &json!({}), None, None),
            vec![json!({"type": "github_issue_comment", "repo": "acme/api", "issue_number": 3})]
        );
        let config = json!({"notifications": {"pagerduty_output": {"slack_channel_id": "CPD"}, "default_slack_channel_id": "CALL"}});
        assert_eq!(
            resolve(Source::PagerDuty, &ReplyTo::Incident, &config, None, None),
            vec![json!({"type": "slack", "channel_id": "CPD"})]
        );
        assert_eq!(
            resolve(Source::IncidentIo, &ReplyTo::Incident, &config, None, None),
            vec![json!({"type": "slack", "channel_id": "CALL"})]
        );
    }

    #[test]
    fn then_the_teams_defaults_then_nothing() {
        let defaults = json!([{"type": "slack", "channel_id": "CDEFAULT"}]);
        let config = json!({"output_config": {"default_destinations": defaults}});
        assert_eq!(
            resolve(Source::PagerDuty, &ReplyTo::Incident, &config, None, None),
            defaults.as_array().unwrap().clone()
        );
        let push = ReplyTo::Nowhere;
        assert_eq!(
            resolve(Source::GitHub, &push, &config, None, None),
            defaults.as_array().unwrap().clone()
        );
        assert!(resolve(Source::PagerDuty, &ReplyTo::Incident, &json!({}), None, None).is_empty());
        assert!(resolve(Source::GitHub, &push, &json!({}), None, None).is_empty());
    }
}
