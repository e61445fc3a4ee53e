//! Post-copy's pieces both sides keep: a page bitmap threads share, and the order in which the
//! source pushes what it still owes (from the guest's latest fault on, as QEMU does: what a
//! guest touches next is mostly near what it touched last).
use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::{Owed, PAGE};

const PAGE_U64: u64 = PAGE as u64;

/// Handles that close each of post-copy's link connections (asks, answers, push) from any
/// thread: when one fails, all of them are closed.
pub(crate) fn link_handles(
    conns: [&transport::Connection; 3],
) -> Result<std::sync::Arc<[transport::ShutdownHandle]>, crate::MigrationError> {
    conns
        .iter()
        .map(|c| {
            c.shutdown_handle().map_err(crate::MigrationError::socket(
                "cloning a post-copy connection",
            ))
        })
        .collect()
}

/// A post-copy connection whose frames a faulting vCPU waits for (the asks, the answers)
/// goes ahead of bulk data on the link, the push's included; where it cannot, it goes as it
/// can.
pub(crate) fn expedite(c: &transport::Connection, what: &str) {
    if let Err(e) = c.expedite() {
        tracing::debug!("post-copy's {what} keep their class on the wire: {e}");
    }
}

/// A link that fails in post-copy is made again within this many peer timeouts; past them,
/// the VM is lost.
pub const RECOVERY_TIMEOUTS: u32 = 6;

/// How long either side tries to make post-copy's link again, for a peer timeout `t`.
pub fn recovery_window(t: std::time::Duration) -> std::time::Duration {
    t * RECOVERY_TIMEOUTS
}

/// One bit a page of guest RAM, by memfd offset, set and cleared from several threads.
pub struct PageBits {
    words: Vec<AtomicU64>,
    pages: u64,
    set: AtomicU64,
}

impl PageBits {
    /// The pages `owed` names, set.
    pub fn from_owed(owed: &Owed) -> Self {
        PageBits {
            words: owed.words.iter().map(|w| AtomicU64::new(*w)).collect(),
            pages: owed.ram_bytes / PAGE_U64,
            set: AtomicU64::new(owed.pages),
        }
    }

    /// No bit set, over `ram_bytes`.
    pub fn new(ram_bytes: u64) -> Self {
        Self::from_owed(&Owed::new(ram_bytes))
    }

    fn at(&self, off: u64) -> Option<(&AtomicU64, u64)> {
        let p = off / PAGE_U64;
        (p < self.pages).then(|| (&self.words[(p / 64) as usize], 1 << (p % 64)))
    }

    /// Whether the page at memfd offset `off` is set.
    pub fn test(&self, off: u64) -> bool {
        self.at(off)
            .is_some_and(|(w, b)| w.load(Ordering::SeqCst) & b != 0)
    }

    /// Clears the page's bit; whether it was set (one caller wins).
    pub fn take(&self, off: u64) -> bool {
        let won = self
            .at(off)
            .is_some_and(|(w, b)| w.fetch_and(!b, Ordering::SeqCst) & b != 0);
        if won {
            self.set.fetch_sub(1, Ordering::SeqCst);
        }
        won
    }

    /// Sets the page's bit; whether it was clear (one caller wins).
    pub fn put(&self, off: u64) -> bool {
        let won = self
            .at(off)
            .is_some_and(|(w, b)| w.fetch_or(b, Ordering::SeqCst) & b == 0);
        if won {
            self.set.fetch_add(1, Ordering::SeqCst);
        }
        won
    }

    /// The pages set now, as a bitmap to send.
    pub fn to_owed(&self) -> Owed {
        let mut owed = Owed::new(self.pages * PAGE_U64);
        for (o, w) in owed.words.iter_mut().zip(&self.words) {
            *o = w.load(Ordering::SeqCst);
        }
        owed.pages = owed.words.iter().map(|w| u64::from(w.count_ones())).sum();
        owed
    }

    /// Pages set.
    pub fn count(&self) -> u64 {
        self.set.load(Ordering::SeqCst)
    }

    /// The first set page at or after memfd offset `from`, wrapping around once.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let n = self.words.len();
        if n == 0 || self.count() == 0 {
            return None;
        }
        let start = ((from / PAGE_U64).min(self.pages.saturating_sub(1))) as usize;
        let (w0, b0) = (start / 64, start % 64);
        // The first word from bit b0, the others whole, then the first word's low bits.
        for i in 0..=n {
            let wi = (w0 + i) % n;
            let mut w = self.words[wi].load(Ordering::SeqCst);
            if i == 0 {
                w &= !0u64 << b0;
            } else if i == n {
                w &= (1u64 << b0).wrapping_sub(1);
            }
            if w != 0 {
                return Some((wi as u64 * 64 + u64::from(w.trailing_zeros())) * PAGE_U64);
            }
        }
        None
    }
}

/// Where the push goes next: on from the last page pushed, or from the guest's latest fault
/// when there is a new one.
#[derive(Default)]
pub struct PushOrder {
    cursor: u64,
    fault_seen: u64,
}

impl PushOrder {
    /// The next page still owed in `owed`, given the latest fault (a sequence number that grows
    /// with each fault, and the fault's memfd offset).
    pub fn next(&mut self, owed: &PageBits, fault: (u64, u64)) -> Option<u64> {
        if fault.0 != self.fault_seen {
            self.fault_seen = fault.0;
            self.cursor = fault.1;
        }
        let off = owed.next_set(self.cursor)?;
        self.cursor = off + PAGE_U64;
        Some(off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_won_once() {
        let b = PageBits::new(1 << 20);
        assert!(b.put(4096));
        assert!(!b.put(4096));
        assert!(b.test(4096) && !b.test(0));
        assert_eq!(b.count(), 1);
        assert!(b.take(4096));
        assert!(!b.take(4096));
        assert_eq!(b.count(), 0);
        // Past the end: never set.
        assert!(!b.put(1 << 20));
    }

    #[test]
    fn the_bits_set_now_go_out_as_a_bitmap() {
        let mut owed = Owed::new(1 << 20);
        [0, 4096, 200 * 4096].iter().for_each(|o| owed.mark(*o));
        let b = PageBits::from_owed(&owed);
        b.take(4096);
        let now = b.to_owed();
        assert_eq!(now.pages, 2);
        assert_eq!(now.offsets().collect::<Vec<_>>(), vec![0, 200 * 4096]);
        assert_eq!(Owed::decode(&now.encode()).unwrap(), now);
    }

    #[test]
    fn the_next_set_page_wraps_around() {
        let b = PageBits::new(1 << 20);
        for off in [8192, 70 * 4096, 255 * 4096] {
            b.put(off);
        }
        assert_eq!(b.next_set(0), Some(8192));
        assert_eq!(b.next_set(8192), Some(8192));
        assert_eq!(b.next_set(12288), Some(70 * 4096));
        assert_eq!(b.next_set(71 * 4096), Some(255 * 4096));
        b.take(255 * 4096);
        assert_eq!(b.next_set(71 * 4096), Some(8192), "wraps");
        b.take(8192);
        b.take(70 * 4096);
        assert_eq!(b.next_set(0), None);
    }

    #[test]
    fn the_push_follows_the_latest_fault_then_goes_on() {
        let owed = PageBits::new(1 << 20);
        for p in 0..256 {
            owed.put(p * 4096);
        }
        let mut order = PushOrder::default();
        let mut take = |fault| {
            let off = order.next(&owed, fault).unwrap();
            owed.take(off);
            off / 4096
        };
        assert_eq!(take((0, 0)), 0);
        assert_eq!(take((0, 0)), 1);
        // A fault at page 200: the push goes there and on from it.
        assert_eq!(take((1, 200 * 4096)), 200);
        assert_eq!(take((1, 200 * 4096)), 201);
        // The same fault again changes nothing.
        assert_eq!(take((1, 200 * 4096)), 202);
        for _ in 203..256 {
            take((1, 0));
        }
        // Past the end it wraps to what the start left.
        assert_eq!(take((1, 0)), 2);
    }
}
