//! Short-lived caches in front of the config service: who owns a routing key, and a team's
//! credential and config.

use std::time::Duration;

use crate::agent_call::TeamAgents;
use crate::cache::TtlCache;
use crate::clients::config_service::RoutingMatch;

/// A routing answer is kept this long: a team that changes its routing is seen within it.
const ROUTING_TTL: Duration = Duration::from_secs(30);
/// A team's config is kept this long (its credential lives longer; see `TeamAgents`).
const TEAM_CONFIG_TTL: Duration = Duration::from_secs(60);
/// Entries past which a cache drops its oldest, so a burst of distinct keys cannot grow it for ever.
const MAX_ENTRIES: usize = 10_000;

/// A pair of strings: (routing key, value) or (org, team).
pub(super) type Key = (String, String);

#[derive(Clone)]
pub struct DispatchCaches {
    pub(super) routing: TtlCache<Key, RoutingMatch>,
    /// Minted with the orchestrator's own admin token: one entry per team.
    pub(super) teams: TeamAgents<Key>,
}

impl Default for DispatchCaches {
    fn default() -> Self {
        Self {
            routing: TtlCache::new(ROUTING_TTL, MAX_ENTRIES),
            teams: TeamAgents::new(TEAM_CONFIG_TTL, MAX_ENTRIES),
        }
    }
}
