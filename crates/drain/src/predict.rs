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

/// Fixed cost of one migration beyond its bytes (connect, prepare, switchover, verify).
pub const OVERHEAD_S: f64 = 0.2;
/// A guest dirtying at least this share of its link never converges without throttling.
const HOT: f64 = 0.9;

impl VmFacts {
    /// Bytes the first pass puts on the wire: touched non-zero pages, compressed if the
    /// transport compresses.
    pub fn first_pass_bytes(&self, compressed: bool) -> f64 {
        let Some(s) = &self.sample else {
            return self.memory as f64;
        };
        let data = s.touched_bytes as f64 * (1.0 - s.zero_fraction.clamp(0.0, 1.0));
        if compressed {
            data * s.compress_ratio.clamp(0.0, 1.0)
        } else {
            data
        }
    }

    /// Bytes per second the guest dirties (as they go on the wire).
    pub fn dirty_bytes_per_s(&self, compressed: bool) -> f64 {
        let Some(s) = &self.sample else {
            return 0.0;
        };
        let raw = s.dirty_pages_per_s.max(0.0) * 4096.0;
        if compressed {
            raw * s.compress_ratio.clamp(0.0, 1.0)
        } else {
            raw
        }
    }

    /// Whether it dirties faster than `share` (bytes/s) carries: it needs more of the link.
    pub fn is_hot(&self, share: f64, compressed: bool) -> bool {
        self.dirty_bytes_per_s(compressed) >= share
    }

    /// Seconds to move it alone at `rate` bytes/s: the copy, then the rounds of what was
    /// dirtied meanwhile (a geometric series while it dirties slower than the link).
    pub fn predict_secs(&self, rate: f64, compressed: bool) -> f64 {
        let rate = rate.max(1.0);
        let r = (self.dirty_bytes_per_s(compressed) / rate).min(HOT);
        OVERHEAD_S + self.first_pass_bytes(compressed) / rate / (1.0 - r)
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
    fn dirtying_stretches_a_migration_and_hot_guests_are_capped() {
        let rate = 100e6;
        let quiet = vm(1 << 30, 0.0, 1.0, 0.0);
        let busy = vm(1 << 30, 0.0, 1.0, 12_207.0); // 50 MB/s: half the link
        let t_quiet = quiet.predict_secs(rate, false);
        let t_busy = busy.predict_secs(rate, false);
        assert!((t_busy - OVERHEAD_S) > 1.9 * (t_quiet - OVERHEAD_S));
        let hot = vm(1 << 30, 0.0, 1.0, 1e6);
        assert!(hot.is_hot(rate, false) && !quiet.is_hot(rate, false));
        assert!(hot.predict_secs(rate, false).is_finite());
    }
}
