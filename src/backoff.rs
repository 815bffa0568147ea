//! Exponential backoff with jitter, one reusable type for every retry loop
//! (Redis writes, Redis reconnects, Kafka metadata).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Backoff {
            initial,
            max,
            current: initial,
            seed,
        }
    }

    /// The next delay: the current step with up to ±25% jitter (so many
    /// gateways behind one outage do not retry in lockstep), then doubles.
    pub fn next_delay(&mut self) -> Duration {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let permille = 750 + (self.seed % 501); // 0.75 ..= 1.25
        let delay = self.current.mul_f64(permille as f64 / 1000.0);
        self.current = (self.current * 2).min(self.max);
        delay.min(self.max)
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_bounded_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(75) && first <= Duration::from_millis(125));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_millis(1500), "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(125));
    }
}
