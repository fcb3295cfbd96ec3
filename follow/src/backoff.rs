//! Jittered exponential backoff, so a mesh of clusters that lost a peer at the same moment
//! does not reconnect to it in lockstep.

use std::time::Duration;

use rand::Rng;

/// A session that stayed connected this long shows the peer healthy again: the next delay
/// starts over at `base`. A shorter one (a peer that accepts and drops at once) keeps backing
/// off, so a flapping peer is not hammered at the base rate.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// Delays that double from `base` up to `max`, each drawn uniformly from the upper half of
/// its step (`[step/2, step]`): never zero, never above `max` (the flag users set means a
/// ceiling), never in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The step (before jitter) of the next delay.
    fn step(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next delay; each call doubles the step until it reaches `max`.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step();
        self.attempt = self.attempt.saturating_add(1);
        jitter(step)
    }

    /// A delay at the maximum step, for failures that will not heal quickly (a refused peer).
    pub fn max_delay(&self) -> Duration {
        jitter(self.max)
    }

    /// Starts over at `base`, after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Notes how long the session that just ended was connected (`None`: never): only a
    /// [`HEALTHY_SESSION`] resets the delays.
    pub fn session_ended(&mut self, connected_for: Option<Duration>) {
        if connected_for.is_some_and(|d| d >= HEALTHY_SESSION) {
            self.reset();
        }
    }
}

/// Uniform in `[step/2, step]`.
fn jitter(step: Duration) -> Duration {
    let fraction: f64 = rand::rng().random_range(0.5..=1.0);
    step.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_with_jitter() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let mut backoff = Backoff::new(base, max);
        let mut steps = Vec::new();
        for _ in 0..10 {
            let step = backoff.step();
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} outside [{step:?}/2, {step:?}]"
            );
            steps.push(step);
        }
        assert_eq!(steps[0], base);
        assert_eq!(steps[1], base * 2);
        assert_eq!(steps[4], Duration::from_millis(1600));
        assert!(steps[5..].iter().all(|s| *s == max));
        backoff.reset();
        assert_eq!(backoff.step(), base);
        assert!(backoff.max_delay() <= max && backoff.max_delay() >= max / 2);
    }

    /// The agent's direct mode used to reset its backoff as soon as a watch was open, so a
    /// peer that accepted and dropped every session was reconnected to at the base rate;
    /// kvstoremesh reset only after a healthy session, and that rule is now the only one.
    #[test]
    fn a_flapping_peer_keeps_backing_off() {
        let base = Duration::from_millis(100);
        let mut backoff = Backoff::new(base, Duration::from_secs(10));
        for _ in 0..4 {
            backoff.next_delay();
            backoff.session_ended(Some(Duration::from_secs(1)));
        }
        assert_eq!(backoff.step(), base * 16, "short sessions do not reset");
        backoff.session_ended(None);
        assert_eq!(backoff.step(), base * 16);
        backoff.session_ended(Some(HEALTHY_SESSION));
        assert_eq!(backoff.step(), base, "a healthy session does");
    }

    #[test]
    fn delays_are_spread() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let delays: std::collections::HashSet<_> =
            (0..20).map(|_| backoff.max_delay().as_micros()).collect();
        assert!(delays.len() > 1, "no jitter: {delays:?}");
    }
}
