//! The migration's own progress watchdog, beside the sockets' timeouts: while armed, it
//! checks every 100 ms that the destination acknowledged more data or sent something; after
//! the peer timeout without either it closes every socket of the migration, so whatever the
//! engine is blocked in fails at once, and the error says what happened rather than how the
//! socket died (a user timeout shows as a broken pipe on the next write).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use transport::ShutdownHandle;

use crate::{MigrationError, Wire};

pub(super) struct Watchdog {
    armed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Set when it fired: what it waited for.
    fired: Arc<Mutex<Option<String>>>,
    timeout: Duration,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Bytes the destination has: sent, minus what still sits unacknowledged in our sockets, plus
/// what it sent us.
fn progress(wire: &Wire, sockets: &[ShutdownHandle]) -> u64 {
    let unacked: usize = sockets.iter().map(|s| s.unacked().unwrap_or(0)).sum();
    (wire.sent().saturating_sub(unacked as u64)).saturating_add(wire.received())
}

impl Watchdog {
    pub fn start(
        wire: Wire,
        sockets: Vec<ShutdownHandle>,
        timeout: Duration,
    ) -> Result<Self, MigrationError> {
        let armed = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(Mutex::new(None));
        let (a, s, f) = (armed.clone(), stop.clone(), fired.clone());
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut last = (progress(&wire, &sockets), Instant::now());
                while !s.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                    let now = progress(&wire, &sockets);
                    if now != last.0 || !a.load(Ordering::SeqCst) {
                        last = (now, Instant::now());
                    } else if last.1.elapsed() >= timeout {
                        *locks::lock(&f) = Some(format!(
                            "the destination (nothing acknowledged or received for {} s)",
                            timeout.as_secs_f64()
                        ));
                        sockets.iter().for_each(ShutdownHandle::shutdown);
                        return;
                    }
                }
            })
            .map_err(|source| MigrationError::Thread {
                what: "watchdog",
                source,
            })?;
        Ok(Watchdog {
            armed,
            stop,
            fired,
            timeout,
            thread: Some(thread),
        })
    }

    /// Stops watching (waits that may be long, such as the guest's verify, follow).
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    /// The error to report if it fired: it explains whatever the engine saw next.
    pub fn timed_out(&self) -> Option<MigrationError> {
        locks::lock(&self.fired)
            .clone()
            .map(|waiting_for| MigrationError::TimedOut {
                secs: self.timeout.as_secs_f64(),
                waiting_for,
            })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
