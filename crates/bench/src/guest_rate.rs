//! The guest's own pace, read the same way for every VMM: the workload guest prints `HB n
//! writes=W` (pages written so far) on its console at every heartbeat, on the source and, once
//! it runs there, on the destination. A sampler reads the last count on either console every
//! 100 ms; the rate before a migration and during it come from the same samples.
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The last `writes=` count on a console, from its last few KiB.
pub fn last_writes(console: &Path) -> Option<u64> {
    let mut f = std::fs::File::open(console).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
    let mut tail = String::new();
    let mut raw = Vec::new();
    f.read_to_end(&mut raw).ok()?;
    tail.push_str(&String::from_utf8_lossy(&raw));
    tail.lines()
        .rev()
        .filter(|l| l.starts_with("HB "))
        .find_map(|l| l.split_once("writes=")?.1.trim().parse().ok())
}

/// The guest's writes per second before and during a migration, and their ratio.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct GuestRate {
    pub before_per_s: f64,
    pub during_per_s: f64,
    pub ratio: f64,
}

/// Samples the largest count on the consoles (the guest's count only grows; whichever host
/// runs it has the latest).
pub struct Sampler {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    pub fn start(consoles: Vec<PathBuf>) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                if let Some(n) = consoles.iter().filter_map(|c| last_writes(c)).max() {
                    locks::lock(&s).push((Instant::now(), n));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; the rate over [`from`, `mid`) and over [`mid`, `mid + during`).
    pub fn finish(mut self, from: Instant, mid: Instant, during: Duration) -> Option<GuestRate> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let s = locks::lock(&self.samples).clone();
        rates(&s, from, mid, mid + during)
    }
}

/// The count's rate over [a, b) and over [b, c), from samples of it (each interval's first
/// and last sample inside it).
pub fn rates(s: &[(Instant, u64)], a: Instant, b: Instant, c: Instant) -> Option<GuestRate> {
    let rate = |from: Instant, to: Instant| {
        let inside: Vec<_> = s.iter().filter(|(t, _)| *t >= from && *t <= to).collect();
        let (first, last) = (inside.first()?, inside.last()?);
        let secs = (last.0 - first.0).as_secs_f64();
        (secs > 0.0).then(|| last.1.saturating_sub(first.1) as f64 / secs)
    };
    let before = rate(a, b)?;
    let during = rate(b, c)?;
    Some(GuestRate {
        before_per_s: before,
        during_per_s: during,
        ratio: if before > 0.0 { during / before } else { 0.0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_count_on_a_console_is_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c");
        std::fs::write(
            &p,
            "READY workers=2\nHB 1 writes=10\nHB 2 writes=250\nVERIFY OK\n",
        )
        .unwrap();
        assert_eq!(last_writes(&p), Some(250));
        assert_eq!(last_writes(&d.path().join("none")), None);
    }

    #[test]
    fn rates_before_and_during_come_from_the_same_samples() {
        let t0 = Instant::now();
        let at = |ms: u64, n: u64| (t0 + Duration::from_millis(ms), n);
        // 1000 pages/s for 2 s, then 250 pages/s.
        let s = [
            at(0, 0),
            at(1000, 1000),
            at(2000, 2000),
            at(3000, 2250),
            at(4000, 2500),
        ];
        let r = rates(
            &s,
            t0,
            t0 + Duration::from_millis(2000),
            t0 + Duration::from_millis(4000),
        )
        .unwrap();
        assert!((r.before_per_s - 1000.0).abs() < 1e-6);
        assert!((r.during_per_s - 250.0).abs() < 1e-6);
        assert!((r.ratio - 0.25).abs() < 1e-6);
    }
}
