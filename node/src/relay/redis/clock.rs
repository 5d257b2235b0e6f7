//! The cluster's one reference clock: Redis's `TIME`, read on this node
//! through its own monotonic clock.
//!
//! Nodes' wall clocks may disagree by any amount (a drifting VM, a host
//! without NTP), so no decision between two nodes may compare one node's
//! wall-clock time with another's. Every such decision uses this clock
//! instead:
//!
//! * a forwarded request's deadline (`forwarding.rs`): the sender writes
//!   it on this clock, the owner turns it into a deadline on its own
//!   monotonic clock;
//! * the stamp that orders one client's subscription requests
//!   ([`RedisClock::stamp`]), taken by the node that received the request;
//! * membership deadlines (`membership.rs`), which do not even need this
//!   estimate: the scripts read `TIME` inside Redis.
//!
//! Every heartbeat reads `TIME` (inside the heartbeat script) and notes
//! this node's monotonic clock just before and just after. The offset
//! between the two clocks is taken at the midpoint; its error is at most
//! half the round trip. A sample is kept while it stays the most precise
//! one, its error growing by [`DRIFT_PPM`] of its age (monotonic clocks
//! run at slightly different rates), and is always replaced after
//! [`MAX_SAMPLE_AGE`], so that a step of Redis's own clock is followed.
//!
//! On a Redis Cluster, `TIME` is read on the primary that holds the
//! membership keys (their hash tag), the same server for every node.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use parking_lot::Mutex;
use tokio::time::Instant;

/// How fast two monotonic clocks may drift apart, in parts per million.
pub(super) const DRIFT_PPM: u64 = 100;
/// A sample older than this is replaced whatever its precision.
pub(super) const MAX_SAMPLE_AGE: Duration = Duration::from_secs(15);

/// A reading of the reference clock: microseconds since the Unix epoch on
/// Redis's clock, and how far off it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reading {
    pub us: u64,
    pub err_us: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Redis's time minus this node's monotonic time, in µs.
    offset_us: i64,
    /// Half the round trip of the `TIME` read.
    err_us: u64,
    /// When it was taken (this node's monotonic µs).
    at_us: u64,
}

/// Redis's clock as this node sees it. See the module documentation.
pub(super) struct RedisClock {
    base: Instant,
    sample: Mutex<Option<Sample>>,
    /// The last stamp handed out: stamps never repeat or go back.
    last_stamp: AtomicU64,
}

impl RedisClock {
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
            sample: Mutex::new(None),
            last_stamp: AtomicU64::new(0),
        }
    }

    fn mono_us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_micros() as u64
    }

    /// Record a `TIME` answer (`redis_us`, µs since the epoch) read between
    /// `before` and `after` on this node's monotonic clock.
    pub fn record(&self, before: Instant, after: Instant, redis_us: u64) {
        let (b, a) = (self.mono_us(before), self.mono_us(after));
        let mid = b + (a.saturating_sub(b)) / 2;
        let new = Sample {
            offset_us: redis_us as i64 - mid as i64,
            err_us: a.saturating_sub(b).div_ceil(2),
            at_us: mid,
        };
        let mut sample = self.sample.lock();
        let keep = sample.is_some_and(|old| {
            mid.saturating_sub(old.at_us) < MAX_SAMPLE_AGE.as_micros() as u64
                && Self::error_at(&old, mid) < new.err_us
        });
        if !keep {
            *sample = Some(new);
        }
    }

    fn error_at(s: &Sample, mono_us: u64) -> u64 {
        s.err_us + mono_us.saturating_sub(s.at_us) * DRIFT_PPM / 1_000_000
    }

    /// Redis's time now, or `None` before `TIME` was first read.
    pub fn now(&self) -> Option<Reading> {
        let s = (*self.sample.lock())?;
        let mono = self.mono_us(Instant::now());
        Some(Reading {
            us: (mono as i64 + s.offset_us).max(0) as u64,
            err_us: Self::error_at(&s, mono),
        })
    }

    /// A stamp for a request received now: Redis's time in µs, strictly
    /// greater than every stamp this node handed out before (a new sample
    /// may move the estimate back a little).
    pub fn stamp(&self) -> Option<u64> {
        let now = self.now()?.us;
        let prev = self
            .last_stamp
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                Some(now.max(last + 1))
            })
            .expect("always Some");
        Some(now.max(prev + 1))
    }

    /// The local monotonic instant by which this node must have finished
    /// work whose answer is due at `deadline_ms` (Unix ms) on Redis's
    /// clock: that time, less this node's error, less one round trip to
    /// Redis (twice the error) for the answer to travel back. `None` if
    /// that is already past (or the clock was never read).
    pub fn local_deadline(&self, deadline_ms: u64) -> Option<Instant> {
        let now = self.now()?;
        let left = (deadline_ms * 1000).checked_sub(now.us + 3 * now.err_us)?;
        (left > 0).then(|| Instant::now() + Duration::from_micros(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn readings_follow_the_monotonic_clock_from_the_sample() {
        let c = RedisClock::new();
        assert_eq!(c.now(), None);
        let t0 = Instant::now();
        tokio::time::advance(Duration::from_millis(2)).await;
        let t1 = Instant::now();
        c.record(t0, t1, 5_000_000_000);
        tokio::time::advance(Duration::from_millis(10)).await;
        let r = c.now().unwrap();
        // Read at the midpoint (1 ms after t0), 11 ms ago.
        assert_eq!(r.us, 5_000_011_000);
        assert_eq!(r.err_us, 1000 + 11_000 * DRIFT_PPM / 1_000_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_less_precise_sample_does_not_replace_a_recent_precise_one() {
        let c = RedisClock::new();
        let t0 = Instant::now();
        c.record(t0, t0, 1_000_000);
        tokio::time::advance(Duration::from_secs(1)).await;
        let t1 = Instant::now();
        tokio::time::advance(Duration::from_millis(400)).await;
        // A slow read whose midpoint estimate is 150 ms off.
        c.record(t1, Instant::now(), 1_000_000 + 1_350_000);
        assert_eq!(c.now().unwrap().us, 1_000_000 + 1_400_000);
        // Past the maximum age it is replaced all the same.
        tokio::time::advance(MAX_SAMPLE_AGE).await;
        let t2 = Instant::now();
        tokio::time::advance(Duration::from_millis(400)).await;
        c.record(t2, Instant::now(), 7);
        assert_eq!(c.now().unwrap().us, 7 + 200_000);
    }

    #[tokio::test(start_paused = true)]
    async fn stamps_strictly_increase_even_when_the_estimate_moves_back() {
        let c = RedisClock::new();
        let t0 = Instant::now();
        c.record(t0, t0, 10_000_000);
        let a = c.stamp().unwrap();
        let b = c.stamp().unwrap();
        assert!(b > a);
        tokio::time::advance(MAX_SAMPLE_AGE * 2).await;
        let t1 = Instant::now();
        // Redis's clock stepped back by a second.
        c.record(
            t1,
            t1,
            10_000_000 + (MAX_SAMPLE_AGE * 2).as_micros() as u64 - 1_000_000,
        );
        assert!(c.stamp().unwrap() > b);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_converts_to_a_local_instant_minus_the_error_and_a_round_trip() {
        let c = RedisClock::new();
        assert_eq!(c.local_deadline(1), None);
        let t0 = Instant::now();
        tokio::time::advance(Duration::from_millis(2)).await;
        let t1 = Instant::now();
        c.record(t0, t1, 50_000_000);
        // Redis reads 50.001 s now, ±1 ms; a round trip takes 2 ms.
        let d = c.local_deadline(50_101).unwrap();
        assert_eq!(d - Instant::now(), Duration::from_millis(97));
        assert_eq!(c.local_deadline(50_004), None);
    }
}
