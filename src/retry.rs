//! Declarative retry: exponential backoff with full jitter, a cap, bounded attempts and elapsed
//! time, and `Retry-After` honoured. Used by provisioning steps and webhook dispatch.

use std::time::Duration;

use rand::Rng;

#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub multiplier: f64,
    pub max_delay: Duration,
    pub max_attempts: u32,
    pub max_elapsed: Duration,
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`, given that `attempt` attempts (1-based) failed.
    /// Full jitter: uniformly random up to the exponential ceiling, so retries from many
    /// replicas do not synchronise.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30) as i32;
        let ceiling = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let ceiling = ceiling.min(self.max_delay.as_secs_f64());
        let jittered = Duration::from_secs_f64(rand::rng().random_range(0.0..=ceiling.max(0.0)));
        match retry_after {
            // The neighbour said when: never sooner, but within our cap.
            Some(after) => after.min(self.max_delay).max(jittered),
            None => jittered,
        }
    }

    /// Whether another attempt is allowed after `attempts` failures and `elapsed` time, if the
    /// next one would start after `next_delay`.
    pub fn allows_another(&self, attempts: u32, elapsed: Duration, next_delay: Duration) -> bool {
        attempts < self.max_attempts && elapsed + next_delay < self.max_elapsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(2),
            max_attempts: 5,
            max_elapsed: Duration::from_secs(60),
        }
    }

    #[test]
    fn delays_grow_and_stay_under_the_cap() {
        let p = policy();
        for attempt in 1..40 {
            let d = p.delay(attempt, None);
            assert!(d <= p.max_delay, "attempt {attempt}: {d:?}");
            let ceiling = Duration::from_millis(100 * 2u64.pow(attempt.min(20) - 1)).min(p.max_delay);
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
        }
    }

    #[test]
    fn retry_after_is_honoured_within_the_cap() {
        let p = policy();
        assert!(p.delay(1, Some(Duration::from_secs(1))) >= Duration::from_secs(1));
        assert_eq!(p.delay(1, Some(Duration::from_secs(3600))), p.max_delay);
    }

    #[test]
    fn attempts_and_elapsed_time_are_bounded() {
        let p = policy();
        assert!(p.allows_another(4, Duration::ZERO, Duration::ZERO));
        assert!(!p.allows_another(5, Duration::ZERO, Duration::ZERO));
        assert!(!p.allows_another(1, Duration::from_secs(59), Duration::from_secs(2)));
    }
}
