//! The migration's own progress watchdog, beside the sockets' timeouts: while armed, it
//! checks every 100 ms that the destination acknowledged more data or sent something; after
//! the peer timeout without either it closes every socket of the migration, so whatever the
//! engine is blocked in fails at once. Whichever gives first (the watchdog, or a socket the
//! kernel gave up on), the error says what happened rather than how the socket died (a user
//! timeout shows as a broken pipe on the next write).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use transport::{RateLimit, ShutdownHandle};

use crate::MigrationError;

struct Inner {
    sockets: Vec<ShutdownHandle>,
    /// The migration's pace, whose waits end when the watchdog fires.
    limit: Option<Arc<RateLimit>>,
    armed: AtomicBool,
    stop: AtomicBool,
    /// The last progress figure seen, and when it changed.
    last: Mutex<(u64, Instant)>,
    fired: AtomicBool,
}

impl Inner {
    /// Bytes the destination acknowledged or sent us, as TCP counts them (TLS and buffering
    /// above the sockets do not blur it).
    fn progress(&self) -> u64 {
        self.sockets
            .iter()
            .filter_map(|s| s.delivered().ok())
            .map(|(acked, received)| acked.saturating_add(received))
            .sum()
    }

    /// How long the destination has been silent, measured now.
    fn silent_for(&self) -> Duration {
        let now = self.progress();
        let mut last = locks::lock(&self.last);
        if now > last.0 || !self.armed.load(Ordering::SeqCst) {
            *last = (now, Instant::now());
        } else {
            last.0 = now;
        }
        last.1.elapsed()
    }
}

pub(super) struct Watchdog {
    inner: Arc<Inner>,
    timeout: Duration,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(
        sockets: Vec<ShutdownHandle>,
        limit: Option<Arc<RateLimit>>,
        timeout: Duration,
    ) -> Result<Self, MigrationError> {
        let inner = Arc::new(Inner {
            last: Mutex::new((0, Instant::now())),
            sockets,
            limit,
            armed: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            fired: AtomicBool::new(false),
        });
        inner.silent_for();
        let i = inner.clone();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                while !i.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                    if i.silent_for() >= timeout {
                        i.fired.store(true, Ordering::SeqCst);
                        i.sockets.iter().for_each(ShutdownHandle::shutdown);
                        if let Some(l) = &i.limit {
                            l.abort();
                        }
                        return;
                    }
                }
            })
            .map_err(|source| MigrationError::Thread {
                what: "watchdog",
                source,
            })?;
        Ok(Watchdog {
            inner,
            timeout,
            thread: Some(thread),
        })
    }

    /// Stops watching (waits that may be long, such as the guest's verify, follow).
    pub fn disarm(&self) {
        self.inner.armed.store(false, Ordering::SeqCst);
    }

    /// After a failure: the timeout that explains it, if the watchdog fired or the destination
    /// has in fact been silent for the whole timeout (a socket's own deadline gave first).
    pub fn timed_out(&self) -> Option<MigrationError> {
        let fired = self.inner.fired.load(Ordering::SeqCst);
        // As last measured: a socket that died has no unacknowledged bytes left to count.
        let quiet = locks::lock(&self.inner.last).1.elapsed();
        let silent = self.inner.armed.load(Ordering::SeqCst) && quiet >= self.timeout.mul_f64(0.9);
        (fired || silent).then(|| MigrationError::TimedOut {
            secs: self.timeout.as_secs_f64(),
            waiting_for: format!(
                "the destination (nothing acknowledged or received for {} s)",
                self.timeout.as_secs_f64()
            ),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
