//! Dead-cluster withdrawal: when a peer counts as lost, and when its backends are demoted.
//!
//! A peer is *lost* while its connection is down, or while its heartbeat has not changed for
//! longer than the heartbeat timeout. A peer lost for longer than the grace period is
//! [`ClusterHealth::Stale`]: its backends are used only if nothing healthier exists. It is
//! healthy again as soon as it is connected with a fresh heartbeat: nothing is relisted for
//! that, the state the agent holds is simply trusted again.
//!
//! [`PeerHealth`] is a pure state machine over [`tokio::time::Instant`]s: the owner feeds it
//! events and calls [`PeerHealth::evaluate`] at [`PeerHealth::deadline`], so tests drive it
//! with paused time.

use std::time::Duration;

use tokio::time::Instant;

use crate::merge::ClusterHealth;

/// How quickly a lost peer is demoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// How long a peer may be lost before its backends are demoted.
    pub grace: Duration,
    /// How long the peer's heartbeat may stay unchanged before the peer counts as lost (the
    /// apiserver rewrites it every 5 s by default).
    pub heartbeat_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            grace: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(15),
        }
    }
}

pub use agent_api::LostReason;

/// One peer's health.
#[derive(Clone, Debug)]
pub struct PeerHealth {
    config: HealthConfig,
    connected: bool,
    /// When the connection state last changed.
    link_since: Instant,
    /// When the heartbeat last changed (or the connection came up, which counts as one).
    last_heartbeat: Instant,
    /// Evaluation suspended: the agent cannot observe the peer (its own store is down).
    suspended: bool,
    health: ClusterHealth,
}

/// A change of health, to log and count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The new health.
    pub health: ClusterHealth,
    /// Why the peer was lost (for a change to stale).
    pub reason: Option<LostReason>,
    /// Since when it was lost.
    pub lost_for: Duration,
}

impl PeerHealth {
    /// A peer first heard of at `now`, not connected yet and healthy for now: it is demoted
    /// only if it stays unreachable for the grace period.
    pub fn new(config: HealthConfig, now: Instant) -> Self {
        PeerHealth {
            config,
            connected: false,
            link_since: now,
            last_heartbeat: now,
            suspended: false,
            health: ClusterHealth::Healthy,
        }
    }

    /// The current health.
    pub fn health(&self) -> ClusterHealth {
        self.health
    }

    /// Whether the connection is up.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Since when the peer is lost, and why; `None` while it is not lost.
    pub fn lost(&self, now: Instant) -> Option<(Instant, LostReason)> {
        if self.suspended {
            return None;
        }
        if !self.connected {
            return Some((self.link_since, LostReason::Disconnected));
        }
        let expires = self.last_heartbeat + self.config.heartbeat_timeout;
        (now >= expires).then_some((expires, LostReason::HeartbeatTimeout))
    }

    /// The connection went up or down at `at`: a loss found by a probe that timed out is
    /// dated back to the start of the silence, so the grace counts from there.
    pub fn set_connected(&mut self, connected: bool, at: Instant) {
        if connected != self.connected {
            self.connected = connected;
            self.link_since = at;
            if connected {
                // A new connection starts a new heartbeat period.
                self.last_heartbeat = at;
            }
        }
    }

    /// The peer's heartbeat changed.
    pub fn heartbeat(&mut self, now: Instant) {
        self.last_heartbeat = now;
    }

    /// Stops (or resumes) judging the peer, while the agent cannot see it for reasons of its
    /// own. Resuming starts a new heartbeat period.
    pub fn set_suspended(&mut self, suspended: bool, now: Instant) {
        if self.suspended && !suspended {
            self.last_heartbeat = now;
            if !self.connected {
                self.link_since = now;
            }
        }
        self.suspended = suspended;
    }

    /// Recomputes the health at `now`; returns the transition if it changed.
    pub fn evaluate(&mut self, now: Instant) -> Option<Transition> {
        let lost = self.lost(now);
        let health = match lost {
            Some((since, _)) if now.duration_since(since) >= self.config.grace => {
                ClusterHealth::Stale
            }
            _ => ClusterHealth::Healthy,
        };
        if health == self.health {
            return None;
        }
        self.health = health;
        Some(Transition {
            health,
            reason: lost.map(|(_, r)| r),
            lost_for: lost.map_or(Duration::ZERO, |(since, _)| now.duration_since(since)),
        })
    }

    /// When [`evaluate`](Self::evaluate) must run next for a change to be noticed on time
    /// (events in between call it anyway); `None` when only an event can change the health.
    pub fn deadline(&self) -> Option<Instant> {
        if self.suspended || self.health == ClusterHealth::Stale {
            return None;
        }
        if !self.connected {
            return Some(self.link_since + self.config.grace);
        }
        Some(self.last_heartbeat + self.config.heartbeat_timeout + self.config.grace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HealthConfig {
        HealthConfig {
            grace: Duration::from_secs(3),
            heartbeat_timeout: Duration::from_secs(10),
        }
    }

    /// Sleeps (paused time) until the peer's deadline and evaluates it.
    async fn run_to_deadline(peer: &mut PeerHealth) -> Option<Transition> {
        let deadline = peer.deadline()?;
        tokio::time::sleep_until(deadline).await;
        peer.evaluate(Instant::now())
    }

    /// A loss found after a silence (a partition: a probe timed out) counts the grace from
    /// the silence's start: longer than the grace, demoted at once; shorter, the rest of it.
    #[tokio::test(start_paused = true)]
    async fn a_loss_dated_back_to_its_silence_counts_the_grace_from_there() {
        let start = Instant::now();
        let mut long = PeerHealth::new(config(), start);
        long.set_connected(true, start);
        let mut short = long.clone();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = Instant::now();
        long.set_connected(false, now - config().grace - Duration::from_millis(1));
        let t = long.evaluate(now).expect("stale at once");
        assert_eq!(t.health, ClusterHealth::Stale);
        assert!(t.lost_for > config().grace, "{t:?}");

        short.set_connected(false, now - Duration::from_secs(2));
        assert_eq!(short.evaluate(now), None);
        let t = run_to_deadline(&mut short).await.expect("transition");
        assert_eq!(
            Instant::now() - now,
            config().grace - Duration::from_secs(2)
        );
        assert_eq!(t.health, ClusterHealth::Stale);
    }

    #[tokio::test(start_paused = true)]
    async fn disconnect_is_withdrawn_after_grace_and_restored_on_return() {
        let start = Instant::now();
        let mut peer = PeerHealth::new(config(), start);
        peer.set_connected(true, start);
        assert_eq!(peer.evaluate(Instant::now()), None);

        tokio::time::sleep(Duration::from_secs(1)).await;
        peer.set_connected(false, Instant::now());
        let lost_at = Instant::now();
        // Within the grace: still healthy.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(peer.evaluate(Instant::now()), None);
        assert_eq!(peer.health(), ClusterHealth::Healthy);
        // At the grace: stale.
        let t = run_to_deadline(&mut peer).await.expect("transition");
        assert_eq!(Instant::now() - lost_at, config().grace);
        assert_eq!(t.health, ClusterHealth::Stale);
        assert_eq!(t.reason, Some(LostReason::Disconnected));
        assert_eq!(peer.deadline(), None, "only an event revives it");
        // Back: healthy at once.
        tokio::time::sleep(Duration::from_secs(30)).await;
        peer.set_connected(true, Instant::now());
        let t = peer.evaluate(Instant::now()).expect("transition");
        assert_eq!(t.health, ClusterHealth::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn short_blip_is_not_a_withdrawal() {
        let mut peer = PeerHealth::new(config(), Instant::now());
        peer.set_connected(true, Instant::now());
        peer.set_connected(false, Instant::now());
        tokio::time::sleep(Duration::from_millis(2999)).await;
        peer.set_connected(true, Instant::now());
        assert_eq!(peer.evaluate(Instant::now()), None);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(peer.evaluate(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_timeout_plus_grace() {
        let start = Instant::now();
        let mut peer = PeerHealth::new(config(), start);
        peer.set_connected(true, start);
        // Heartbeats keep it healthy.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(9)).await;
            peer.heartbeat(Instant::now());
            assert_eq!(peer.evaluate(Instant::now()), None);
        }
        let last = Instant::now();
        let t = run_to_deadline(&mut peer).await.expect("transition");
        assert_eq!(Instant::now() - last, Duration::from_secs(13));
        assert_eq!(t.reason, Some(LostReason::HeartbeatTimeout));
        assert_eq!(t.lost_for, Duration::from_secs(3));
        peer.heartbeat(Instant::now());
        assert_eq!(
            peer.evaluate(Instant::now()).map(|t| t.health),
            Some(ClusterHealth::Healthy)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_connected_peer_is_demoted_after_grace() {
        let mut peer = PeerHealth::new(config(), Instant::now());
        let t = run_to_deadline(&mut peer).await.expect("transition");
        assert_eq!(t.health, ClusterHealth::Stale);
    }

    #[tokio::test(start_paused = true)]
    async fn suspended_peer_is_not_judged() {
        let mut peer = PeerHealth::new(config(), Instant::now());
        peer.set_connected(true, Instant::now());
        peer.set_suspended(true, Instant::now());
        assert_eq!(peer.deadline(), None);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(peer.evaluate(Instant::now()), None);
        peer.set_suspended(false, Instant::now());
        assert_eq!(
            peer.evaluate(Instant::now()),
            None,
            "a new heartbeat period starts"
        );
        assert!(run_to_deadline(&mut peer).await.is_some());
    }
}
