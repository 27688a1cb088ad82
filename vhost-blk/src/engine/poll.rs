//! Adaptive busy-polling of a queue thread: how long it spins for the guest's next
//! request and the engine's completions before it sleeps.

use std::time::{Duration, Instant};

/// Default longest busy-poll of the avail ring and completion queue before the queue thread
/// sleeps (`ExportConfig::poll_us`).
pub const DEFAULT_POLL_US: u32 = 50;
const MIN_POLL: Duration = Duration::from_micros(8);
/// Most wake-ups slept through after a poll that took too long.
const MAX_HOLD_OFF: u32 = 1024;
/// Short polls in a row that end a growing hold-off.
const SHORT_RUN: u32 = 8;

/// Adaptive busy-poll window of one queue thread. After a batch, with at most one request
/// in flight, the thread polls for new requests and completions (guest notifications stay
/// off meanwhile, so the guest does not kick) for `window`, then sleeps. The window is set
/// from the last sleep: a wake-up that came within `max` of going to sleep would have been
/// caught by polling twice as long as that gap. An idle queue costs one failed poll, then
/// nothing.
///
/// Polling pays only for short waits. A poll that found nothing, or found work only after
/// more than half of `max`, was a wait the thread is better off sleeping through: the next
/// 1, 2, 4, ... (up to [`MAX_HOLD_OFF`]) wake-ups sleep without polling; [`SHORT_RUN`]
/// polls in a row that find work within a third of `max` bring the next hold-off back to
/// one wake-up (one short poll does not: where waits of both kinds alternate, a device's
/// latency and the guest's answer, the long ones must win). Spinning through a device's
/// latency also takes the CPU its completion work would run on, so on a loop device it
/// costs more CPU per request than sleeping, while a file in memory (nothing to wait for
/// but the guest) is served at lower latency for less CPU per request than sleeping
/// (bench/RESULTS.md, "Busy-poll").
#[derive(Debug, Default)]
pub(crate) struct Poll {
    /// Longest window (zero: never poll).
    max: Duration,
    window: Duration,
    asleep_since: Option<Instant>,
    /// Wake-ups left to sleep through before polling again.
    hold_off: u32,
    /// Hold-off after the next poll that takes too long.
    next_hold_off: u32,
    /// Short polls in a row.
    short_run: u32,
}

impl Poll {
    pub(crate) fn new(max: Duration) -> Poll {
        Poll {
            max,
            next_hold_off: 1,
            ..Poll::default()
        }
    }

    /// The queue thread woke up (guest kick or completion).
    pub(crate) fn woke(&mut self) {
        if let Some(t) = self.asleep_since.take() {
            self.woke_after(t.elapsed());
        }
    }

    /// A wake-up `gap` after going to sleep.
    fn woke_after(&mut self, gap: Duration) {
        if self.max.is_zero() {
            return;
        }
        if self.hold_off > 0 {
            self.hold_off -= 1;
            return;
        }
        if gap <= self.max {
            self.window = (gap * 2).clamp(MIN_POLL.min(self.max), self.max);
        }
    }

    /// The queue thread goes to sleep.
    pub(crate) fn sleeping(&mut self) {
        self.asleep_since = Some(Instant::now());
    }

    /// Current window (zero: do not poll).
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// A poll found nothing: sleep through the next wake-ups.
    pub(crate) fn missed(&mut self) {
        self.hold_off();
    }

    /// A poll found a new request after spinning for `spun`.
    pub(crate) fn caught(&mut self, spun: Duration) {
        if spun * 2 > self.max {
            self.hold_off();
        } else if spun * 3 <= self.max {
            self.short_run += 1;
            if self.short_run >= SHORT_RUN {
                self.next_hold_off = 1;
            }
        } else {
            self.short_run = 0;
        }
    }

    fn hold_off(&mut self) {
        self.short_run = 0;
        self.window = Duration::ZERO;
        self.hold_off = self.next_hold_off;
        self.next_hold_off = (self.next_hold_off * 2).min(MAX_HOLD_OFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    /// A wake-up 2 µs after going to sleep: polling is on unless held off. (Not timed:
    /// under load a real gap can exceed the window.)
    fn wake(p: &mut Poll) -> bool {
        p.woke_after(Duration::from_micros(2));
        !p.window().is_zero()
    }

    #[test]
    fn short_waits_keep_polling() {
        let mut p = Poll::new(MAX);
        assert!(wake(&mut p));
        for _ in 0..100 {
            p.caught(Duration::from_micros(12));
            assert!(wake(&mut p));
        }
    }

    #[test]
    fn long_waits_are_slept_through_for_longer_and_longer() {
        let mut p = Poll::new(MAX);
        // Each wait that took over half the window doubles the wake-ups slept through.
        for expect in [1, 2, 4, 8, 16] {
            assert!(wake(&mut p));
            p.caught(Duration::from_micros(30));
            assert!(p.window().is_zero());
            for _ in 0..expect {
                assert!(!wake(&mut p));
            }
        }
        // Middling waits neither hold off nor reset...
        assert!(wake(&mut p));
        p.caught(Duration::from_micros(20));
        assert!(wake(&mut p));
        p.caught(Duration::from_micros(40));
        assert_eq!((0..32).filter(|_| !wake(&mut p)).count(), 32);
        // ...nor does one short wait, nor seven in a row...
        for _ in 0..7 {
            p.caught(Duration::from_micros(10));
        }
        p.caught(Duration::from_micros(40));
        assert_eq!((0..64).filter(|_| !wake(&mut p)).count(), 64);
        // ...eight in a row do: the next long wait costs one wake-up again.
        for _ in 0..8 {
            p.caught(Duration::from_micros(10));
        }
        p.caught(Duration::from_micros(40));
        assert!(!wake(&mut p));
        assert!(wake(&mut p));
    }

    #[test]
    fn a_poll_that_finds_nothing_holds_off_and_the_hold_off_is_bounded() {
        let mut p = Poll::new(MAX);
        for _ in 0..20 {
            assert!(wake(&mut p));
            p.missed();
            while !wake(&mut p) {}
        }
        assert_eq!(p.next_hold_off, MAX_HOLD_OFF);
        p.missed();
        assert_eq!(
            (0..MAX_HOLD_OFF).filter(|_| !wake(&mut p)).count() as u32,
            MAX_HOLD_OFF
        );
        assert!(wake(&mut p));
    }

    #[test]
    fn zero_max_never_polls() {
        let mut p = Poll::new(Duration::ZERO);
        assert!(!wake(&mut p));
        p.caught(Duration::ZERO);
        assert!(!wake(&mut p));
    }
}
