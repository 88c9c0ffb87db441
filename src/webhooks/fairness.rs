//! Fair shares of dispatch: start-time fair queueing over the inbox.
//!
//! Every event gets a tag when it is accepted, and dispatch claims due events in tag order. Each
//! sender (a Slack channel, a GitHub repository, a PagerDuty service, an Incident.io alert source:
//! what routes to one team) has its own run of tags: its next event is tagged one after its
//! previous one, but never below the tag dispatch has reached. A sender that floods the inbox
//! pushes its own tags ahead of everyone's and waits for itself; a quiet sender's next event is
//! tagged where dispatch is now and goes out with the next claim. A sender gets no credit for
//! having been quiet (its tags restart at the current one), so a burst after a pause does not
//! starve the others either.
//!
//! Compared with a claim that picks events round-robin per sender at claim time, the claim stays
//! one walk of one index in order, so fairness costs nothing per claim whatever the number of
//! senders (River Pro's fair queueing halved its throughput; this is measured by `scripts/bench
//! fairness`). The price: each replica keeps its own run of tags per sender, so a sender whose
//! deliveries are spread over N replicas gets up to N shares; and a replica that claims little
//! learns where dispatch is only from the events it starts.
//!
//! Events of one conversation keep their order regardless (the claim's ordering-key check).

use std::collections::HashMap;
use std::sync::Mutex;

use sqlx::PgExecutor;

/// Senders remembered at most; past it, those whose tags dispatch has passed are forgotten (a
/// forgotten sender's next tag is the current one, exactly as if it were remembered).
const MAX_SENDERS: usize = 10_000;

pub struct FairShares {
    /// Off, every event shares one run of tags: first in, first out.
    per_sender: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The highest tag dispatch on this replica has started.
    reached: i64,
    /// Each sender's next tag.
    next: HashMap<String, i64>,
}

impl FairShares {
    /// Learns where dispatch is from the database (at start-up: until then, and if this fails,
    /// from the claims): the head of the pending events, or past the newest event.
    pub async fn catch_up(&self, executor: impl PgExecutor<'_>) -> Result<(), sqlx::Error> {
        let reached = sqlx::query_scalar!(
            r#"SELECT coalesce(
                 (SELECT fair_tag FROM orchestrator_webhook_events WHERE status = 'pending'
                  ORDER BY fair_tag LIMIT 1),
                 (SELECT fair_tag + 1 FROM orchestrator_webhook_events ORDER BY received_at DESC LIMIT 1),
                 0) AS "tag!""#
        )
        .fetch_one(executor)
        .await?;
        self.dispatched(reached);
        Ok(())
    }

    pub fn starting_at(reached: i64, per_sender: bool) -> Self {
        Self {
            per_sender,
            state: Mutex::new(State {
                reached,
                next: HashMap::new(),
            }),
        }
    }

    /// The tag of a new event from `sender` (any text naming it within its source).
    pub fn tag(&self, source: &str, sender: &str) -> i64 {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let reached = state.reached;
        if state.next.len() >= MAX_SENDERS {
            state.next.retain(|_, next| *next > reached);
        }
        let key = if self.per_sender {
            format!("{source}:{sender}")
        } else {
            String::new()
        };
        let next = state.next.entry(key).or_insert(reached);
        let tag = (*next).max(reached);
        *next = tag + 1;
        tag
    }

    /// The highest tag dispatch has started: a pending event tagged at most this is from a sender
    /// within its share (a flooding sender's events are all tagged beyond it).
    pub fn reached(&self) -> i64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).reached
    }

    /// Dispatch started an event with this tag (started, not claimed: an event claimed ahead is
    /// still waiting, and one that arrives meanwhile from a quiet sender may go before it).
    pub fn dispatched(&self, tag: i64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.reached = state.reached.max(tag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_sender_is_tagged_where_dispatch_is_and_a_flood_waits_for_itself() {
        let shares = FairShares::starting_at(100, true);
        let flood: Vec<i64> = (0..1000).map(|_| shares.tag("github", "acme/flood")).collect();
        assert_eq!(flood.first(), Some(&100));
        assert_eq!(flood.last(), Some(&1099));
        // Dispatch has taken ten of the flood's events: a quiet sender goes next.
        shares.dispatched(109);
        assert_eq!(shares.tag("github", "acme/quiet"), 109);
        assert_eq!(shares.tag("github", "acme/quiet"), 110);
        // The flood's next event queues behind its own.
        assert_eq!(shares.tag("github", "acme/flood"), 1100);
    }

    #[test]
    fn a_sender_gets_no_credit_for_silence() {
        let shares = FairShares::starting_at(0, true);
        assert_eq!(shares.tag("slack", "T1:C1"), 0);
        shares.dispatched(5_000);
        assert_eq!(shares.tag("slack", "T1:C1"), 5_000);
    }

    #[test]
    fn without_fair_shares_tags_follow_arrival() {
        let shares = FairShares::starting_at(7, false);
        let tags: Vec<i64> = ["a", "b", "a", "c"].iter().map(|s| shares.tag("github", s)).collect();
        assert_eq!(tags, vec![7, 8, 9, 10]);
    }

    #[test]
    fn forgetting_senders_keeps_their_tags_right() {
        let shares = FairShares::starting_at(0, true);
        for i in 0..MAX_SENDERS {
            shares.tag("pagerduty", &format!("P{i}"));
        }
        shares.dispatched(10);
        // Past the bound, senders dispatch has passed are forgotten; the next tag is unchanged.
        assert_eq!(shares.tag("pagerduty", "P3"), 10);
        assert!(shares.state.lock().unwrap().next.len() < MAX_SENDERS);
    }
}
