//! What a VM's migration will cost, from its sample: bytes on the wire and seconds on a link.
//! Pure arithmetic, so plans and ETAs are testable without a VM.
use migration::sample::VmSample;

/// What the drain knows of a VM before it moves it.
#[derive(Clone, Debug, PartialEq)]
pub struct VmFacts {
    pub name: String,
    pub memory: u64,
    /// From `POST /vms/NAME/sample`; None: assume all of its memory, no dirtying.
    pub sample: Option<VmSample>,
}

/// Fixed cost of one migration beyond its bytes (connect, prepare, switchover).
pub const OVERHEAD_S: f64 = 0.15;
/// A round this short ends pre-copy (the default downtime target).
const FINAL_ROUND_S: f64 = 0.02;
/// Rounds that stop shrinking are throttled (auto-converge) and end after this many.
const STALLED_ROUNDS: u32 = 8;

impl VmFacts {
    /// Bytes the first pass puts on the wire: touched non-zero pages, compressed if the
    /// transport compresses.
    pub fn first_pass_bytes(&self, compressed: bool) -> f64 {
        let Some(s) = &self.sample else {
            return self.memory as f64;
        };
        let data = s.touched_bytes as f64 * (1.0 - s.zero_fraction.clamp(0.0, 1.0));
        data * self.ratio(compressed)
    }

    fn ratio(&self, compressed: bool) -> f64 {
        match (&self.sample, compressed) {
            (Some(s), true) => s.compress_ratio.clamp(0.0, 1.0),
            _ => 1.0,
        }
    }

    /// Bytes per second the guest dirties (as they go on the wire), over short periods.
    pub fn dirty_bytes_per_s(&self, compressed: bool) -> f64 {
        let Some(s) = &self.sample else {
            return 0.0;
        };
        s.dirty_pages_per_s.max(0.0) * 4096.0 * self.ratio(compressed)
    }

    /// Bytes of distinct pages the guest dirties in `t` seconds: what a round that long
    /// leaves to resend. The set sampled over the window and its first half give how it
    /// grows (a power of the time: 1 for a guest that keeps writing new pages, towards 0 for
    /// one rewriting a small hot set); never more than the short-period rate allows, nor
    /// than it touched.
    pub fn dirtied_in(&self, t: f64, compressed: bool) -> f64 {
        let Some(s) = &self.sample else {
            return 0.0;
        };
        let by_rate = s.dirty_pages_per_s.max(0.0) * t;
        let pages = if s.dirty_set_pages == 0 || s.window_ms == 0 {
            by_rate
        } else {
            let window = s.window_ms as f64 / 1e3;
            let set = s.dirty_set_pages as f64;
            let growth = (set / s.dirty_set_half_pages.max(1) as f64)
                .log2()
                .clamp(0.0, 1.0);
            (set * (t / window).powf(growth)).min(by_rate)
        };
        pages.min(s.touched_bytes as f64 / 4096.0) * 4096.0 * self.ratio(compressed)
    }

    /// Whether it dirties faster than `share` (bytes/s) carries: it needs more of the link.
    pub fn is_hot(&self, share: f64, compressed: bool) -> bool {
        self.dirty_bytes_per_s(compressed) >= share
    }

    /// Bytes the sync rounds add at `rate` bytes/s: each resends what the guest dirtied during
    /// the one before ([`Self::dirtied_in`]), until a round fits the downtime target; rounds
    /// that stop shrinking are throttled and end after [`STALLED_ROUNDS`].
    pub fn resend_bytes(&self, rate: f64, compressed: bool) -> f64 {
        let rate = rate.max(1.0);
        let mut t = self.first_pass_bytes(compressed) / rate;
        let (mut total, mut last) = (0.0, f64::INFINITY);
        let mut stalled = 0;
        for _ in 0..64 {
            let round = self.dirtied_in(t, compressed);
            total += round;
            if round <= rate * FINAL_ROUND_S {
                break;
            }
            stalled += u32::from(round >= last);
            if stalled >= STALLED_ROUNDS {
                break;
            }
            last = round;
            t = round / rate;
        }
        total
    }

    /// Bytes its migration puts on the wire at `rate` bytes/s.
    pub fn wire_bytes(&self, rate: f64, compressed: bool) -> f64 {
        self.first_pass_bytes(compressed) + self.resend_bytes(rate, compressed)
    }

    /// Seconds to move it alone at `rate` bytes/s.
    pub fn predict_secs(&self, rate: f64, compressed: bool) -> f64 {
        OVERHEAD_S + self.wire_bytes(rate, compressed) / rate.max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(touched: u64, zero: f64, ratio: f64, dirty: f64) -> VmFacts {
        VmFacts {
            name: "v".into(),
            memory: 1 << 30,
            sample: Some(VmSample {
                memory_bytes: 1 << 30,
                touched_bytes: touched,
                zero_fraction: zero,
                compress_ratio: ratio,
                dirty_pages_per_s: dirty,
                dirty_set_pages: 0,
                dirty_set_half_pages: 0,
                window_ms: 0,
            }),
        }
    }

    #[test]
    fn bytes_follow_touched_zero_and_compression() {
        let v = vm(1 << 29, 0.5, 0.25, 0.0);
        assert_eq!(v.first_pass_bytes(false), (1u64 << 28) as f64);
        assert_eq!(v.first_pass_bytes(true), (1u64 << 26) as f64);
        let unsampled = VmFacts {
            sample: None,
            ..v.clone()
        };
        assert_eq!(unsampled.first_pass_bytes(true), (1u64 << 30) as f64);
    }

    #[test]
    fn resent_bytes_are_bounded_by_the_working_set() {
        let rate = 100e6;
        let quiet = vm(1 << 30, 0.0, 1.0, 0.0);
        assert_eq!(quiet.resend_bytes(rate, false), 0.0);
        // 50 MB/s in short periods, but a hot set of 5000 pages that no longer grows.
        let mut busy = vm(1 << 30, 0.0, 1.0, 12_207.0);
        if let Some(s) = busy.sample.as_mut() {
            (s.dirty_set_pages, s.dirty_set_half_pages, s.window_ms) = (5000, 5000, 500);
        }
        let extra = busy.resend_bytes(rate, false);
        assert!(extra >= 5000.0 * 4096.0, "{extra}");
        assert!(extra < 3.0 * 5000.0 * 4096.0, "{extra}");
        // One that keeps writing new pages resends in proportion to the round.
        let mut spreading = busy.clone();
        if let Some(s) = spreading.sample.as_mut() {
            s.dirty_set_half_pages = 2500;
        }
        assert!(spreading.dirtied_in(4.0, false) > 4.0 * busy.dirtied_in(4.0, false));
        assert!(busy.predict_secs(rate, false) > quiet.predict_secs(rate, false));
        // Dirtying faster than the link: throttled after a few stalled rounds, still finite.
        let hot = vm(1 << 30, 0.0, 1.0, 1e6);
        assert!(hot.is_hot(rate, false) && !quiet.is_hot(rate, false));
        assert!(hot.predict_secs(rate, false).is_finite());
    }
}
