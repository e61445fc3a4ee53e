//! How a thread spent its time: on a core, waiting in a run queue for one, or neither (asleep:
//! blocked on a socket, a lock, a timer). A thread that was on a core or waiting for one all
//! the time was held back by the cores, not by what it would otherwise wait on.
use std::time::Duration;

/// A thread's scheduler times since it started, or over a span ([`ThreadTimes::since`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadTimes {
    /// Time on a core.
    pub on_cpu: Duration,
    /// Time runnable, waiting for a core.
    pub waiting: Duration,
}

impl ThreadTimes {
    /// The calling thread's (None: the kernel keeps no scheduler statistics).
    pub fn current() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
    }

    /// From a schedstat line: nanoseconds on a core, nanoseconds waiting, time slices.
    fn parse(line: &str) -> Option<Self> {
        let mut f = line.split_ascii_whitespace().map(str::parse::<u64>);
        let on_cpu = Duration::from_nanos(f.next()?.ok()?);
        let waiting = Duration::from_nanos(f.next()?.ok()?);
        Some(ThreadTimes { on_cpu, waiting })
    }

    /// What was spent between `earlier` and these.
    pub fn since(&self, earlier: &ThreadTimes) -> ThreadTimes {
        ThreadTimes {
            on_cpu: self.on_cpu.saturating_sub(earlier.on_cpu),
            waiting: self.waiting.saturating_sub(earlier.waiting),
        }
    }

    /// The share of `wall` the thread was on a core or waiting for one (0 to 1).
    pub fn runnable_share(&self, wall: Duration) -> f64 {
        if wall.is_zero() {
            return 0.0;
        }
        ((self.on_cpu + self.waiting).as_secs_f64() / wall.as_secs_f64()).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedstat_line_gives_the_times_on_and_waiting_for_a_core() {
        let t = ThreadTimes::parse("993350 1200 1\n").unwrap();
        assert_eq!(t.on_cpu, Duration::from_nanos(993_350));
        assert_eq!(t.waiting, Duration::from_nanos(1200));
        assert_eq!(ThreadTimes::parse("x y z"), None);
        assert_eq!(ThreadTimes::parse(""), None);
    }

    #[test]
    fn a_busy_thread_is_runnable_all_the_time_and_a_sleeping_one_is_not() {
        let Some(t0) = ThreadTimes::current() else {
            eprintln!("SKIPPED: this kernel keeps no scheduler statistics");
            return;
        };
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let busy = ThreadTimes::current().unwrap().since(&t0);
        assert!(
            busy.runnable_share(start.elapsed()) > 0.9,
            "{busy:?} over {:?}",
            start.elapsed()
        );
        let (t1, start) = (ThreadTimes::current().unwrap(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(100));
        let asleep = ThreadTimes::current().unwrap().since(&t1);
        assert!(asleep.runnable_share(start.elapsed()) < 0.1, "{asleep:?}");
    }
}
