//! What a failed dispatch leads to: another attempt after a backoff, or a dead letter.

use std::time::Duration;

use crate::agent_call::TeamAgentError;
use crate::clients::agent::AgentError;
use crate::clients::NeighbourError;
use crate::retry::RetryPolicy;

/// Why dispatching an event failed this time.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("routing lookup failed: {0}")]
    Routing(NeighbourError),
    #[error("ORCHESTRATOR_INTERNAL_ADMIN_TOKEN is not set: cannot act for a team")]
    NoCredential,
    #[error("{0}")]
    Team(#[from] TeamAgentError),
    #[error("agent run failed: {0}")]
    Agent(AgentError),
    #[error("forwarding feedback failed: {0}")]
    Feedback(NeighbourError),
    #[error("lost the lease while dispatching")]
    LeaseLost,
}

impl DispatchError {
    /// Whether another attempt may succeed. A neighbour's 4xx (but 408 and 429) is an answer that
    /// will not change; an agent's 401 or 403 is not one of them, since a fresh team credential
    /// may be all it takes.
    pub fn is_retryable(&self) -> bool {
        let neighbour = match self {
            Self::Routing(e) | Self::Feedback(e) => e,
            Self::Team(e) => e.neighbour(),
            Self::Agent(AgentError::Upstream(e)) if matches!(e.status(), Some(401 | 403)) => return true,
            Self::Agent(AgentError::Upstream(e)) => e,
            Self::Agent(AgentError::Timeout(_) | AgentError::Failed(_)) | Self::NoCredential | Self::LeaseLost => {
                return true
            }
        };
        neighbour.is_transient() || matches!(neighbour, NeighbourError::Decode { .. })
    }
}

impl DispatchError {
    /// The platform is down, not the event: a neighbour unreachable, timing out, rate limiting or
    /// answering 502, 503 or 504, or this replica losing its lease. Such attempts do not count
    /// toward `ORCHESTRATOR_DISPATCH_MAX_ATTEMPTS` (an outage would otherwise dead-letter every
    /// event it touches); only the event's age bounds them. A 500 counts: it may be this event
    /// that breaks the neighbour.
    pub fn is_outage(&self) -> bool {
        let neighbour = match self {
            Self::Routing(e) | Self::Feedback(e) | Self::Agent(AgentError::Upstream(e)) => e,
            Self::Team(e) => e.neighbour(),
            Self::LeaseLost => return true,
            Self::Agent(AgentError::Timeout(_) | AgentError::Failed(_)) | Self::NoCredential => return false,
        };
        neighbour.is_transient() && neighbour.status() != Some(500)
    }
}

#[derive(Debug, PartialEq)]
pub enum AfterFailure {
    /// Back in the queue, due after this pause.
    Retry(Duration),
    /// Given up: kept for an operator to see and replay.
    DeadLetter,
}

/// `attempts` made so far (this one included) over `age` since the event arrived.
pub fn after_failure(policy: &RetryPolicy, attempts: u32, age: Duration, error: &DispatchError) -> AfterFailure {
    let delay = policy.delay(attempts.max(1), None);
    let allowed = if error.is_outage() {
        age + delay < policy.max_elapsed
    } else {
        policy.allows_another(attempts.max(1), age, delay)
    };
    if error.is_retryable() && allowed {
        AfterFailure::Retry(delay)
    } else {
        AfterFailure::DeadLetter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            max_attempts: 8,
            max_elapsed: Duration::from_secs(86_400),
        }
    }

    fn status(status: u16) -> NeighbourError {
        NeighbourError::Status {
            neighbour: "agent",
            status,
            detail: String::new(),
            retry_after: None,
        }
    }

    #[test]
    fn an_outage_is_retried_until_the_event_is_too_old_however_many_attempts() {
        for unavailable in [
            DispatchError::Agent(AgentError::Upstream(status(503))),
            DispatchError::Routing(NeighbourError::Transport {
                neighbour: "config_service",
                message: "connection refused".into(),
            }),
            DispatchError::Team(TeamAgentError::Config(status(502))),
            DispatchError::LeaseLost,
        ] {
            assert!(matches!(
                after_failure(&policy(), 1, Duration::ZERO, &unavailable),
                AfterFailure::Retry(d) if d <= Duration::from_secs(1)
            ));
            assert!(
                matches!(
                    after_failure(&policy(), 50, Duration::from_secs(3600), &unavailable),
                    AfterFailure::Retry(_)
                ),
                "{unavailable}"
            );
            assert_eq!(
                after_failure(&policy(), 2, Duration::from_secs(86_400), &unavailable),
                AfterFailure::DeadLetter
            );
        }
    }

    #[test]
    fn a_failure_of_the_event_itself_counts_toward_the_attempts() {
        for failure in [
            DispatchError::Agent(AgentError::Timeout(Duration::from_secs(300))),
            DispatchError::Agent(AgentError::Upstream(status(500))),
        ] {
            assert!(matches!(
                after_failure(&policy(), 3, Duration::ZERO, &failure),
                AfterFailure::Retry(_)
            ));
            assert_eq!(
                after_failure(&policy(), 8, Duration::ZERO, &failure),
                AfterFailure::DeadLetter
            );
        }
    }

    #[test]
    fn an_answer_that_will_not_change_is_dead_lettered_at_once() {
        for error in [
            DispatchError::Agent(AgentError::Upstream(status(400))),
            DispatchError::Routing(status(422)),
            DispatchError::Team(TeamAgentError::Impersonation(status(404))),
        ] {
            assert_eq!(
                after_failure(&policy(), 1, Duration::ZERO, &error),
                AfterFailure::DeadLetter,
                "{error}"
            );
        }
        // A refused team credential may have been revoked: a fresh one is minted next time.
        let refused = DispatchError::Agent(AgentError::Upstream(status(403)));
        assert!(matches!(
            after_failure(&policy(), 1, Duration::ZERO, &refused),
            AfterFailure::Retry(_)
        ));
        let limited = DispatchError::Routing(status(429));
        assert!(matches!(
            after_failure(&policy(), 1, Duration::ZERO, &limited),
            AfterFailure::Retry(_)
        ));
    }
}
