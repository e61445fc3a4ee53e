//! `--max-bandwidth`: one token bucket shared by every stream of a migration, and the rate
//! syntax users give it.
use std::time::Duration;

/// A token bucket shared by every stream of one migration, for `--max-bandwidth`.
/// Writers may go into debt by one write; they then wait until it is paid off, so the long-run
/// average holds whatever the write sizes. The rate can change while it runs (a drain shares
/// one budget between the migrations in flight), and a wait is reckoned again when it does.
/// [`RateLimit::abort`] ends every wait at once: a cancelled or timed-out migration never
/// sleeps on its debt.
#[derive(Debug)]
pub struct RateLimit {
    state: std::sync::Mutex<Bucket>,
    /// Woken when the rate changes or the limit is aborted.
    changed: std::sync::Condvar,
}

#[derive(Debug)]
struct Bucket {
    bytes_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
    aborted: bool,
}

impl Bucket {
    /// Refills the tokens up to `now`.
    fn refill(&mut self, now: std::time::Instant) {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.bytes_per_sec;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now.max(self.last);
    }

    /// How long until the debt is paid at the current rate.
    fn debt_wait(&self) -> Duration {
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.bytes_per_sec)
        }
    }
}

/// 10 ms of burst: smooth enough for QoS, coarse enough not to spin.
fn burst(bytes_per_sec: f64) -> f64 {
    (bytes_per_sec / 100.0).max(64.0 * 1024.0)
}

/// What a write paced by an aborted limit fails with.
pub const ABORTED: &str =
    "the migration was stopped while paced (cancelled, or its peer timed out)";

impl RateLimit {
    pub fn new(bits_per_sec: u64) -> Self {
        let bytes_per_sec = (bits_per_sec.max(1)) as f64 / 8.0;
        RateLimit {
            state: std::sync::Mutex::new(Bucket {
                bytes_per_sec,
                burst: burst(bytes_per_sec),
                tokens: burst(bytes_per_sec),
                last: std::time::Instant::now(),
                aborted: false,
            }),
            changed: std::sync::Condvar::new(),
        }
    }

    pub fn bits_per_sec(&self) -> u64 {
        // Non-negative by construction (from a u64); `as` saturates.
        #[allow(clippy::cast_sign_loss)]
        let bits = (locks::lock(&self.state).bytes_per_sec * 8.0) as u64;
        bits
    }

    /// Changes the rate from now on (debt already taken is paid at the new rate, and writers
    /// waiting on it reckon their wait again).
    pub fn set_bits_per_sec(&self, bits_per_sec: u64) {
        let mut b = locks::lock(&self.state);
        b.refill(std::time::Instant::now());
        b.bytes_per_sec = (bits_per_sec.max(1)) as f64 / 8.0;
        b.burst = burst(b.bytes_per_sec);
        b.tokens = b.tokens.min(b.burst);
        self.changed.notify_all();
    }

    /// Ends every wait now and from now on: paced writes fail with [`ABORTED`].
    pub fn abort(&self) {
        locks::lock(&self.state).aborted = true;
        self.changed.notify_all();
    }

    /// Takes `n` bytes at time `now`; returns how long the caller must wait before sending.
    pub fn take_at(&self, n: usize, now: std::time::Instant) -> Duration {
        let mut b = locks::lock(&self.state);
        b.refill(now);
        b.tokens -= n as f64;
        b.debt_wait()
    }

    /// Takes `n` bytes and waits until they are paid for; fails at once if the limit is (or
    /// gets) aborted.
    pub fn take(&self, n: usize) -> std::io::Result<()> {
        let mut b = locks::lock(&self.state);
        b.refill(std::time::Instant::now());
        b.tokens -= n as f64;
        loop {
            if b.aborted {
                return Err(std::io::Error::other(ABORTED));
            }
            b.refill(std::time::Instant::now());
            let wait = b.debt_wait();
            if wait.is_zero() {
                return Ok(());
            }
            b = locks::wait_timeout(&self.changed, b, wait);
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

    /// A writer deep in debt at a crawl is let go at once by a faster rate, and fails at once
    /// when the limit is aborted: no wait outlasts a cancel.
    #[test]
    fn a_wait_ends_when_the_rate_rises_or_the_limit_is_aborted() {
        /// A writer 1 MiB in debt at 1000 bit/s, let go by `release` 50 ms later; what it got
        /// and how long it waited.
        fn crawl(release: impl FnOnce(&RateLimit)) -> (std::io::Result<()>, Duration) {
            let l = std::sync::Arc::new(RateLimit::new(1000));
            let t0 = std::time::Instant::now();
            let w = {
                let l = l.clone();
                std::thread::spawn(move || l.take(1 << 20))
            };
            std::thread::sleep(Duration::from_millis(50));
            release(&l);
            (w.join().unwrap(), t0.elapsed())
        }
        let (r, took) = crawl(|l| l.set_bits_per_sec(10_000_000_000));
        assert!(r.is_ok() && took < Duration::from_secs(2), "{took:?}");
        let (r, took) = crawl(RateLimit::abort);
        assert_eq!(r.unwrap_err().to_string(), ABORTED);
        assert!(took < Duration::from_secs(2), "{took:?}");
        let l = RateLimit::new(1000);
        l.abort();
        assert!(l.take(1).is_err(), "an aborted limit stays aborted");
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
