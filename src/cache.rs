//! A small bounded map whose entries expire: what the service keeps of its neighbours' answers
//! (verified admins, routing, team credentials), so the hot paths do not ask again every time.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Clones share the entries. A zero `ttl` keeps nothing.
pub struct TtlCache<K, V> {
    ttl: Duration,
    capacity: usize,
    entries: Arc<Mutex<HashMap<K, (V, Instant)>>>,
}

impl<K, V> Clone for TtlCache<K, V> {
    fn clone(&self) -> Self {
        Self {
            ttl: self.ttl,
            capacity: self.capacity,
            entries: self.entries.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            entries: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The value stored under `key` within the last `ttl`.
    pub fn get(&self, key: &K) -> Option<V> {
        self.get_if(key, |_| true)
    }

    /// As `get`, and only if `still_good` says the value itself has not gone stale.
    pub fn get_if(&self, key: &K, still_good: impl FnOnce(&V) -> bool) -> Option<V> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(value, at)| at.elapsed() < self.ttl && still_good(value))
            .map(|(value, _)| value.clone())
    }

    pub fn insert(&self, key: K, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            let ttl = self.ttl;
            entries.retain(|_, (_, at)| at.elapsed() < ttl);
            if entries.len() >= self.capacity {
                // Still full of live entries (a burst of distinct keys): drop the oldest rather
                // than grow. A scan, but only when the cache is full of live entries.
                if let Some(oldest) = entries.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone()) {
                    entries.remove(&oldest);
                }
            }
        }
        entries.insert(key, (value, Instant::now()));
    }

    pub fn remove(&self, key: &K) {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_cache_stays_within_its_capacity() {
        let cache = TtlCache::new(Duration::from_millis(50), 2);
        cache.insert(1, "a");
        cache.insert(2, "b");
        cache.insert(3, "c");
        assert_eq!(cache.get(&1), None, "the oldest live entry makes room");
        assert_eq!((cache.get(&2), cache.get(&3)), (Some("b"), Some("c")));
        assert_eq!(cache.get_if(&2, |v| *v != "b"), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get(&3), None);
    }

    #[test]
    fn a_zero_ttl_keeps_nothing() {
        let cache = TtlCache::new(Duration::ZERO, 10);
        cache.insert("k", 1);
        assert_eq!(cache.get(&"k"), None);
    }
}
