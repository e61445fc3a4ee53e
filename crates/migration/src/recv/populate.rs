//! Guest RAM allocated ahead of the pages. Writing a page into a fresh memfd page allocates
//! it there and then, one page at a time (allocation, memory-cgroup charge, page-cache
//! insertion), on the receiving thread. Allocating ahead costs more CPU in all
//! (docs/bench/choices.md); it pays only when another core does it, taking it off the
//! receiving thread's path. The source announces the
//! extents it will send (the Extents frame); a worker fallocates them ahead of the copy, from
//! the first, when a core is free. Correctness never depends on it: a page the worker has
//! not reached is allocated by its write, and fallocate leaves allocated pages alone.
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ram::GuestRam;

/// Allocated per fallocate call: small enough to stop soon, large enough to batch.
const CHUNK: u64 = 32 << 20;

pub(super) struct Populate {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Populate {
    /// Starts allocating `extents` (memfd offsets, checked against the RAM's size by the
    /// caller) of `ram`'s memfd when a core is free; None when there is nothing to do, no free
    /// core (the worker would take CPU from the receiving threads) or no thread.
    pub fn start(ram: &GuestRam, extents: &[(u64, u64)]) -> Option<Self> {
        if extents.is_empty() || !core_free() {
            return None;
        }
        let file = ram.backing_file().try_clone().ok()?;
        let extents = extents.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("populate".into())
            .spawn(move || allocate(&file, &extents, &s))
            .ok()?;
        Some(Populate {
            stop,
            thread: Some(thread),
        })
    }

    /// Tells the worker to stop after its current chunk, without waiting for it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Stops the worker and waits for it (before nothing may fill a page any more).
    pub fn finish(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop();
        if let Some(mib) = self.thread.take().and_then(|t| t.join().ok()) {
            tracing::debug!(
                "allocated {} MiB of guest RAM ahead of its pages",
                mib >> 20
            );
        }
    }
}

impl Drop for Populate {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Whether fewer threads are runnable on this host than it has CPUs (one of them is ours).
fn core_free() -> bool {
    let runnable = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| {
        l.split_whitespace()
            .nth(3)?
            .split('/')
            .next()?
            .parse::<usize>()
            .ok()
    });
    match runnable {
        Some(r) => r < ram::host::cpus(),
        None => false,
    }
}

/// fallocate(2) over the extents in order, a chunk at a time, until done, stopped, or the
/// kernel declines (then the writes allocate as they would have).
fn allocate(file: &std::fs::File, extents: &[(u64, u64)], stop: &AtomicBool) -> u64 {
    let mut done = 0;
    for &(start, end) in extents {
        let mut off = start;
        while off < end {
            if stop.load(Ordering::Relaxed) {
                return done;
            }
            let len = (end - off).min(CHUNK);
            let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
                return done;
            };
            // SAFETY: fallocate on a file descriptor this thread owns (a dup of the memfd);
            // it touches no memory of ours.
            if unsafe { libc::fallocate(file.as_raw_fd(), 0, o, l) } != 0 {
                tracing::debug!(
                    "populating guest RAM stopped: {}",
                    std::io::Error::last_os_error()
                );
                return done;
            }
            done += len;
            off += len;
        }
    }
    done
}
