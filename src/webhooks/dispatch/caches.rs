//! Short-lived caches in front of the config service: who owns a routing key, and a team's
//! credential and config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::agent_call::TeamAgent;
use crate::clients::config_service::RoutingMatch;

/// A routing answer is kept this long: a team that changes its routing is seen within it.
const ROUTING_TTL: Duration = Duration::from_secs(30);
/// A team's config is kept this long (its credential lives longer; see TOKEN_MARGIN).
const TEAM_CONFIG_TTL: Duration = Duration::from_secs(60);
/// An impersonation token is renewed this long before it expires.
const TOKEN_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// Entries past which a cache is pruned, so a burst of distinct keys cannot grow it for ever.
const MAX_ENTRIES: usize = 10_000;

/// A pair of strings: (routing key, value) or (org, team).
pub(super) type Key = (String, String);

#[derive(Clone, Default)]
pub struct DispatchCaches {
    routing: Arc<Mutex<HashMap<Key, (RoutingMatch, Instant)>>>,
    teams: Arc<Mutex<HashMap<Key, (TeamAgent, Instant)>>>,
}

impl DispatchCaches {
    pub(super) fn routing(&self, key: &Key) -> Option<RoutingMatch> {
        let cache = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(_, at)| at.elapsed() < ROUTING_TTL)
            .map(|(m, _)| m.clone())
    }

    pub(super) fn remember_routing(&self, key: Key, found: RoutingMatch) {
        let mut cache = self.routing.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > MAX_ENTRIES {
            cache.retain(|_, (_, at)| at.elapsed() < ROUTING_TTL);
        }
        cache.insert(key, (found, Instant::now()));
    }

    pub(super) fn team(&self, key: &Key) -> Option<TeamAgent> {
        let cache = self.teams.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(team, fetched)| {
                team.token_expires - TOKEN_MARGIN > Utc::now() && fetched.elapsed() < TEAM_CONFIG_TTL
            })
            .map(|(team, _)| team.clone())
    }

    pub(super) fn remember_team(&self, key: Key, team: TeamAgent) {
        let mut cache = self.teams.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(key, (team, Instant::now()));
    }

    pub(super) fn forget_team(&self, key: &Key) {
        self.teams.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}
