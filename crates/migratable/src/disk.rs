//! A disk that moves with its VM (shared-nothing migration): the image the source reads, and
//! the [`WriteTracker`] its device tells of every guest write. The bulk copy goes through the
//! image once, in offset order, behind a cursor; a write behind the cursor (to what was sent
//! already) marks its blocks dirty. The migration sends dirty blocks in rounds, or mirrors
//! them: in [`DiskSync::Mirror`] a write completes only once its blocks have gone to the
//! destination, so the guest cannot dirty the disk faster than the link carries it and the
//! copy always converges (the guest's writes are slowed instead, and the tracker says by how
//! much).
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The unit the tracker marks and the migration resends.
pub const DISK_BLOCK: u64 = 4096;

/// A mirrored write waits at most this long for its blocks to go out; the migration fails
/// long before (its peer timeout), and its end releases every waiter.
const MIRROR_WAIT_MAX: Duration = Duration::from_secs(60);

/// How guest writes to blocks already sent reach the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskSync {
    /// Marked dirty and sent again in rounds beside RAM's; the guest is never slowed.
    Rounds,
    /// Write-blocking: each write completes once its blocks are on the wire.
    Mirror,
}

impl std::fmt::Display for DiskSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskSync::Rounds => "rounds",
            DiskSync::Mirror => "mirror",
        })
    }
}

/// A disk of the VM as the migration copies it.
#[derive(Clone)]
pub struct DiskSource {
    /// The device's name (`disk0`).
    pub name: String,
    pub path: PathBuf,
    /// Bytes the guest sees.
    pub size: u64,
    pub readonly: bool,
    pub tracker: Arc<WriteTracker>,
}

/// What the guest's writes cost it while the disk moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WriteStats {
    /// Bytes of blocks newly dirtied behind the cursor (each block counted once until sent).
    pub dirtied_bytes: u64,
    /// Writes that waited for the mirror, and how long in all and at most.
    pub stalled_writes: u64,
    pub stall_total_us: u64,
    pub stall_max_us: u64,
    /// Longest time a write took from the device's request to its completion, tracked or not.
    pub write_max_us: u64,
    /// The guest's writes per second before the migration (since the VM started here or the
    /// last migration ended) and during it: how much the migration slowed them.
    pub writes_per_s_before: f64,
    pub writes_per_s_during: f64,
}

#[derive(Default)]
struct Inner {
    active: bool,
    size: u64,
    /// Everything below was sent by the bulk copy.
    cursor: u64,
    dirty: Vec<u64>,
    dirty_blocks: u64,
    mode: Option<DiskSync>,
    /// Marks so far, and the last mark whose blocks are on the wire.
    marks: u64,
    sent: u64,
    stats: WriteStats,
    /// Every write the device made, and the count and time the current period began with
    /// (the tracker's start or stop).
    writes: u64,
    period: Option<(Instant, u64)>,
}

impl Inner {
    /// Writes per second in the current period.
    fn rate(&self) -> f64 {
        self.period.map_or(0.0, |(t, n)| {
            (self.writes - n) as f64 / t.elapsed().as_secs_f64().max(1e-3)
        })
    }

    fn set(&mut self, block: u64) -> bool {
        let (w, b) = ((block / 64) as usize, block % 64);
        match self.dirty.get_mut(w) {
            Some(word) if *word & (1 << b) == 0 => {
                *word |= 1 << b;
                self.dirty_blocks += 1;
                true
            }
            _ => false,
        }
    }
}

/// Guest writes to a disk during its migration; idle (one lock per write) otherwise.
pub struct WriteTracker {
    inner: Mutex<Inner>,
    sent: Condvar,
}

impl WriteTracker {
    pub fn new(size: u64) -> Self {
        WriteTracker {
            inner: Mutex::new(Inner {
                size,
                ..Inner::default()
            }),
            sent: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A migration begins: nothing sent yet, writes not blocked.
    pub fn start(&self) {
        let mut g = self.lock();
        let before = g.rate();
        g.period = Some((Instant::now(), g.writes));
        let words = g.size.div_ceil(DISK_BLOCK).div_ceil(64) as usize;
        g.dirty = vec![0; words];
        g.dirty_blocks = 0;
        g.cursor = 0;
        g.mode = Some(DiskSync::Rounds);
        g.marks = 0;
        g.sent = 0;
        g.stats = WriteStats {
            writes_per_s_before: before,
            ..WriteStats::default()
        };
        g.active = true;
    }

    /// The migration ended, however: writes are neither tracked nor held any more.
    pub fn stop(&self) {
        let mut g = self.lock();
        g.period = Some((Instant::now(), g.writes));
        g.active = false;
        g.dirty = Vec::new();
        g.dirty_blocks = 0;
        self.sent.notify_all();
    }

    /// The bulk copy is about to read everything below `to`: a write there from now on is
    /// tracked (one before is in what it reads).
    pub fn advance(&self, to: u64) {
        let mut g = self.lock();
        g.cursor = g.cursor.max(to);
    }

    pub fn set_mode(&self, mode: DiskSync) {
        let mut g = self.lock();
        if g.active {
            g.mode = Some(mode);
        }
        self.sent.notify_all();
    }

    pub fn mode(&self) -> Option<DiskSync> {
        let g = self.lock();
        g.active.then_some(g.mode).flatten()
    }

    /// The device wrote `len` bytes at `off`, `took` after the request came: marks what was
    /// sent already, and when mirroring waits until it is sent again.
    pub fn written(&self, off: u64, len: u64, took: Duration) {
        let mut g = self.lock();
        g.writes += 1;
        if g.period.is_none() {
            g.period = Some((Instant::now(), g.writes - 1));
        }
        if !g.active {
            return;
        }
        let took_us = took.as_micros() as u64;
        g.stats.write_max_us = g.stats.write_max_us.max(took_us);
        let end = off.saturating_add(len).min(g.cursor);
        if len == 0 || off >= end {
            return;
        }
        let mut fresh = 0;
        for block in off / DISK_BLOCK..end.div_ceil(DISK_BLOCK) {
            fresh += u64::from(g.set(block));
        }
        g.stats.dirtied_bytes += fresh * DISK_BLOCK;
        g.marks += 1;
        let mark = g.marks;
        if g.mode != Some(DiskSync::Mirror) {
            return;
        }
        let t = Instant::now();
        let mut waited = false;
        while g.active && g.mode == Some(DiskSync::Mirror) && g.sent < mark {
            let left = MIRROR_WAIT_MAX.saturating_sub(t.elapsed());
            if left.is_zero() {
                break;
            }
            waited = true;
            g = self
                .sent
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if waited {
            let stall = t.elapsed().as_micros() as u64;
            g.stats.stalled_writes += 1;
            g.stats.stall_total_us += stall;
            g.stats.stall_max_us = g.stats.stall_max_us.max(stall);
            g.stats.write_max_us = g.stats.write_max_us.max(stall + took_us);
        }
    }

    /// Takes up to `max` dirty blocks (their offsets, ascending), clearing them, and the mark
    /// that [`Self::sent`] must be told once they are out.
    pub fn take(&self, max: usize) -> (Vec<u64>, u64) {
        let mut g = self.lock();
        let mut out = Vec::new();
        for w in 0..g.dirty.len() {
            while g.dirty[w] != 0 && out.len() < max {
                let b = u64::from(g.dirty[w].trailing_zeros());
                g.dirty[w] &= !(1 << b);
                out.push((w as u64 * 64 + b) * DISK_BLOCK);
            }
            if out.len() >= max {
                break;
            }
        }
        g.dirty_blocks -= out.len() as u64;
        // Every write marked so far is covered once these go out, unless blocks are left.
        let mark = if g.dirty_blocks == 0 { g.marks } else { g.sent };
        (out, mark)
    }

    /// Blocks taken with `mark` are on the wire: writes waiting for them complete.
    pub fn sent(&self, mark: u64) {
        let mut g = self.lock();
        if mark > g.sent {
            g.sent = mark;
            self.sent.notify_all();
        }
    }

    /// Bytes marked and not taken.
    pub fn dirty_bytes(&self) -> u64 {
        self.lock().dirty_blocks * DISK_BLOCK
    }

    pub fn stats(&self) -> WriteStats {
        let g = self.lock();
        WriteStats {
            writes_per_s_during: if g.active { g.rate() } else { 0.0 },
            ..g.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writes_behind_the_cursor_are_dirty() {
        let t = WriteTracker::new(1 << 20);
        t.written(0, 4096, Duration::ZERO);
        assert_eq!(t.dirty_bytes(), 0, "not tracking yet");
        t.start();
        t.advance(64 << 10);
        t.written(60 << 10, 8192, Duration::ZERO); // one block behind, one ahead
        t.written(512, 512, Duration::ZERO);
        t.written(100 << 10, 4096, Duration::ZERO);
        assert_eq!(t.dirty_bytes(), 2 * DISK_BLOCK);
        let (blocks, mark) = t.take(16);
        assert_eq!(blocks, vec![0, 60 << 10]);
        assert_eq!(t.dirty_bytes(), 0);
        t.sent(mark);
        assert_eq!(t.stats().dirtied_bytes, 2 * DISK_BLOCK);
        t.stop();
        t.written(0, 4096, Duration::ZERO);
        assert_eq!(t.dirty_bytes(), 0);
    }

    #[test]
    fn take_is_bounded_and_leaves_the_rest() {
        let t = WriteTracker::new(1 << 20);
        t.start();
        t.advance(1 << 20);
        t.written(0, 1 << 20, Duration::ZERO);
        let (a, _) = t.take(100);
        assert_eq!(a.len(), 100);
        assert_eq!(t.dirty_bytes(), 156 * DISK_BLOCK);
        let (b, _) = t.take(1000);
        assert_eq!(b.len(), 156);
        assert_eq!(b[0], 100 * DISK_BLOCK);
    }

    /// A mirrored write completes only once the sender has sent its blocks.
    #[test]
    fn a_mirrored_write_waits_until_its_blocks_are_sent() {
        let t = Arc::new(WriteTracker::new(1 << 20));
        t.start();
        t.advance(1 << 20);
        t.set_mode(DiskSync::Mirror);
        let w = {
            let t = t.clone();
            std::thread::spawn(move || t.written(8192, 4096, Duration::ZERO))
        };
        while t.dirty_bytes() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            !w.is_finished(),
            "the write completed before its block was sent"
        );
        let (blocks, mark) = t.take(16);
        assert_eq!(blocks, vec![8192]);
        t.sent(mark);
        w.join().unwrap();
        let s = t.stats();
        assert_eq!(s.stalled_writes, 1);
        assert!(s.stall_max_us >= 30_000, "{s:?}");
    }

    /// Leaving mirror mode (the pause) or the migration's end releases waiting writes.
    #[test]
    fn the_end_of_mirroring_releases_waiting_writes() {
        let t = Arc::new(WriteTracker::new(1 << 20));
        t.start();
        t.advance(1 << 20);
        t.set_mode(DiskSync::Mirror);
        let w = {
            let t = t.clone();
            std::thread::spawn(move || t.written(0, 4096, Duration::ZERO))
        };
        while t.dirty_bytes() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        t.set_mode(DiskSync::Rounds);
        w.join().unwrap();
        assert_eq!(
            t.dirty_bytes(),
            DISK_BLOCK,
            "still to send in the next round"
        );
        let w = {
            let t = t.clone();
            t.set_mode(DiskSync::Mirror);
            std::thread::spawn(move || t.written(4096, 4096, Duration::ZERO))
        };
        while t.dirty_bytes() < 2 * DISK_BLOCK {
            std::thread::sleep(Duration::from_millis(1));
        }
        t.stop();
        w.join().unwrap();
    }
}
