//! Small statistics helpers: percentiles over latency samples.

use std::time::Duration;

/// Latency percentiles of one sample set, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub samples: usize,
}

/// Nearest-rank percentile (`p` in 0..=100) of an ascending-sorted slice.
fn nearest_rank(sorted: &[Duration], p: f64) -> Duration {
    debug_assert!(!sorted.is_empty());
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Computes p50 and p99 of `samples` (order does not matter). Panics on an empty set, which
/// would mean the workload measured nothing.
pub fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    assert!(!samples.is_empty(), "no latency samples were collected");
    samples.sort_unstable();
    Percentiles {
        p50_ms: nearest_rank(&samples, 50.0).as_secs_f64() * 1e3,
        p99_ms: nearest_rank(&samples, 99.0).as_secs_f64() * 1e3,
        samples: samples.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let p = percentiles(samples);
        assert_eq!(p.p50_ms, 50.0);
        assert_eq!(p.p99_ms, 99.0);
        assert_eq!(p.samples, 100);

        let one = percentiles(vec![Duration::from_millis(7)]);
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
    }
}
