//! `--max-bandwidth`: one token bucket shared by every stream of a migration, and the rate
//! syntax users give it.
use std::time::Duration;

/// A token bucket shared by every stream of one migration, for `--max-bandwidth`.
/// Writers may go into debt by one write; they then sleep until it is paid off, so the long-run
/// average holds whatever the write sizes. The rate can change while it runs (a drain shares
/// one budget between the migrations in flight).
#[derive(Debug)]
pub struct RateLimit {
    state: std::sync::Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    bytes_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

/// 10 ms of burst: smooth enough for QoS, coarse enough not to spin.
fn burst(bytes_per_sec: f64) -> f64 {
    (bytes_per_sec / 100.0).max(64.0 * 1024.0)
}

impl RateLimit {
    pub fn new(bits_per_sec: u64) -> Self {
        let bytes_per_sec = (bits_per_sec.max(1)) as f64 / 8.0;
        RateLimit {
            state: std::sync::Mutex::new(Bucket {
                bytes_per_sec,
                burst: burst(bytes_per_sec),
                tokens: burst(bytes_per_sec),
                last: std::time::Instant::now(),
            }),
        }
    }

    pub fn bits_per_sec(&self) -> u64 {
        // Non-negative by construction (from a u64); `as` saturates.
        #[allow(clippy::cast_sign_loss)]
        let bits = (locks::lock(&self.state).bytes_per_sec * 8.0) as u64;
        bits
    }

    /// Changes the rate from now on (debt already taken is paid at the new rate).
    pub fn set_bits_per_sec(&self, bits_per_sec: u64) {
        let mut b = locks::lock(&self.state);
        b.bytes_per_sec = (bits_per_sec.max(1)) as f64 / 8.0;
        b.burst = burst(b.bytes_per_sec);
        b.tokens = b.tokens.min(b.burst);
    }

    /// Takes `n` bytes at time `now`; returns how long the caller must wait before sending.
    pub fn take_at(&self, n: usize, now: std::time::Instant) -> Duration {
        let mut b = locks::lock(&self.state);
        let refill = now.saturating_duration_since(b.last).as_secs_f64() * b.bytes_per_sec;
        b.tokens = (b.tokens + refill).min(b.burst) - n as f64;
        b.last = now.max(b.last);
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / b.bytes_per_sec)
        }
    }

    pub fn take(&self, n: usize) {
        let wait = self.take_at(n, std::time::Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// `200Mbit`, `1.5Gbit`, `800Kbit` (bits/s, decimal) or `100MB`, `64MiB` (bytes/s).
pub fn parse_rate(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches("/s").trim_end_matches("ps");
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let bits = match unit {
        "bit" | "b" => v,
        "Kbit" | "kbit" => v * 1e3,
        "Mbit" | "mbit" => v * 1e6,
        "Gbit" | "gbit" => v * 1e9,
        "B" => v * 8.0,
        "KB" | "kB" => v * 8e3,
        "MB" => v * 8e6,
        "GB" => v * 8e9,
        "KiB" => v * 8.0 * 1024.0,
        "MiB" => v * 8.0 * 1024.0 * 1024.0,
        "GiB" => v * 8.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    // Checked non-negative (and at least one); `as` saturates huge values.
    #[allow(clippy::cast_sign_loss)]
    let bits = (bits >= 1.0).then_some(bits as u64);
    bits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_holds_the_average_whatever_the_write_sizes() {
        let l = RateLimit::new(80_000_000); // 10 MB/s
        let t0 = std::time::Instant::now();
        // 1 MiB writes at t0: the first goes on credit, the rest wait their share.
        let mut now = t0;
        let mut sent = 0usize;
        for _ in 0..20 {
            let wait = l.take_at(1 << 20, now);
            now += wait;
            sent += 1 << 20;
        }
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = sent as f64 / secs;
        assert!(
            (rate - 10e6).abs() / 10e6 < 0.06,
            "{rate} B/s over {secs} s"
        );
        // Idle time refills at most the burst, not an unbounded credit.
        let later = now + Duration::from_secs(10);
        assert!(l.take_at(1 << 20, later) > Duration::from_millis(50));
        // A new rate holds from then on: twice the rate, half the wait for the same debt.
        let l = RateLimit::new(80_000_000);
        let t = std::time::Instant::now();
        l.take_at(2 << 20, t);
        let slow = l.take_at(1 << 20, t);
        l.set_bits_per_sec(160_000_000);
        let fast = l.take_at(0, t);
        assert!(fast < slow && fast > slow / 3, "{slow:?} -> {fast:?}");
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("200Mbit"), Some(200_000_000));
        assert_eq!(parse_rate("1.5Gbit"), Some(1_500_000_000));
        assert_eq!(parse_rate("100MB/s"), Some(800_000_000));
        assert_eq!(parse_rate("64MiB"), Some(64 * 8 * 1024 * 1024));
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_rate("10 parsecs"), None);
        assert_eq!(parse_rate("0Mbit"), None);
    }
}
