//! What the source remembers of what the destination holds: the last-sent content of the pages
//! likely to be sent again, so a re-sent page can go as a delta ([`crate::delta`]). Pages enter
//! when the dirty log shows the guest writing them (hot) or when a sync round re-sends them;
//! the oldest leave first when the cache is full. Bounded: `--delta-cache`, or by default
//! twice the hot set seen so far, within [`MIN_AUTO`] and a quarter of guest RAM.
use std::collections::{HashMap, VecDeque};

use super::page_set::PageSet;
use crate::delta::{self, PAGE};
use crate::report::DeltaReport;

/// The automatic capacity never goes below this (bytes).
pub const MIN_AUTO: u64 = 16 << 20;

pub(super) struct DeltaCache {
    pages: HashMap<u64, Box<[u8]>>,
    /// Offsets in the order they entered, for eviction (stale ones are skipped).
    order: VecDeque<u64>,
    /// Pages the dirty log showed written.
    hot: PageSet,
    capacity: usize,
    /// Set by `--delta-cache`; otherwise it follows the hot set.
    fixed: bool,
    ram_pages: u64,
    pub report: DeltaReport,
}

impl DeltaCache {
    pub fn new(ram_bytes: u64, capacity_bytes: Option<u64>) -> Self {
        let ram_pages = ram_bytes / PAGE as u64;
        let cap = capacity_bytes.unwrap_or(MIN_AUTO.min(ram_bytes / 4)) / PAGE as u64;
        let mut c = DeltaCache {
            pages: HashMap::new(),
            order: VecDeque::new(),
            hot: PageSet::new(ram_bytes),
            capacity: usize::try_from(cap).unwrap_or(usize::MAX),
            fixed: capacity_bytes.is_some(),
            ram_pages,
            report: DeltaReport::default(),
        };
        c.report.capacity_bytes = c.capacity as u64 * PAGE as u64;
        c
    }

    /// The guest wrote these pages (memfd offsets): what is sent of them is kept.
    pub fn mark_hot(&mut self, pages: impl Iterator<Item = u64>) {
        for off in pages {
            self.hot.insert(off);
        }
        if !self.fixed {
            let want = (2 * self.hot.len())
                .max(MIN_AUTO / PAGE as u64)
                .min(self.ram_pages / 4);
            self.capacity = self
                .capacity
                .max(usize::try_from(want).unwrap_or(usize::MAX));
            self.report.capacity_bytes = self.capacity as u64 * PAGE as u64;
        }
    }

    /// Whether the dirty log showed the guest writing this page.
    pub fn is_hot(&self, off: u64) -> bool {
        self.hot.contains(off)
    }

    /// `page` goes out at `off`, in a sync round when `resend`. Returns the base hash with the
    /// delta in `out` when the destination's version is known here and the delta is small;
    /// the page's new content is remembered either way if it is cached, hot or re-sent.
    pub fn encode(
        &mut self,
        off: u64,
        page: &[u8],
        out: &mut Vec<u8>,
        resend: bool,
    ) -> Option<u64> {
        if let Some(old) = self.pages.get_mut(&off) {
            let base = delta::base_hash(old);
            let small = delta::encode(old, page, out);
            old.copy_from_slice(page);
            if small {
                self.report.hits += 1;
                let sent = crate::protocol::DELTA_HEAD_LEN + out.len();
                self.report.bytes_saved += (PAGE - sent.min(PAGE)) as u64;
                return Some(base);
            }
            self.report.too_different += 1;
            return None;
        }
        if resend {
            self.report.misses += 1;
        }
        if resend || self.is_hot(off) {
            self.insert(off, page);
        }
        None
    }

    /// The page went out as zeros (a hole): nothing to keep.
    pub fn forget(&mut self, off: u64) {
        self.pages.remove(&off);
    }

    fn insert(&mut self, off: u64, page: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        while self.pages.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    if self.pages.remove(&old).is_some() {
                        self.report.evicted += 1;
                    }
                }
                None => return,
            }
        }
        self.pages.insert(off, page.into());
        self.order.push_back(off);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u8) -> Vec<u8> {
        vec![v; PAGE]
    }

    #[test]
    fn a_hot_page_sent_again_goes_as_a_delta_against_what_was_sent() {
        let mut c = DeltaCache::new(64 << 20, None);
        let mut out = Vec::new();
        // Not hot, first pass: not kept, so its re-send is a miss.
        assert_eq!(c.encode(0, &page(1), &mut out, false), None);
        c.mark_hot([4096u64].into_iter());
        assert_eq!(c.encode(4096, &page(1), &mut out, false), None);
        let mut changed = page(1);
        changed[16] = 9;
        let base = c.encode(4096, &changed, &mut out, true).unwrap();
        assert_eq!(base, delta::base_hash(&page(1)));
        let mut there = page(1);
        delta::apply(&mut there, &out).unwrap();
        assert_eq!(there, changed);
        // The next delta is against what went out last.
        let again = c.encode(4096, &page(1), &mut out, true).unwrap();
        assert_eq!(again, delta::base_hash(&changed));
        assert_eq!(c.encode(0, &page(2), &mut out, true), None);
        assert_eq!((c.report.hits, c.report.misses), (2, 1));
        // A page that became zero is forgotten.
        c.forget(4096);
        assert_eq!(c.encode(4096, &page(1), &mut out, true), None);
    }

    #[test]
    fn it_holds_at_most_its_capacity_and_evicts_the_oldest() {
        let mut c = DeltaCache::new(1 << 30, Some(2 * PAGE as u64));
        let mut out = Vec::new();
        for off in [0u64, 4096, 8192] {
            c.encode(off, &page(1), &mut out, true);
        }
        assert_eq!(c.pages.len(), 2);
        assert_eq!(c.report.evicted, 1);
        assert!(c.encode(0, &page(2), &mut out, true).is_none(), "evicted");
        // The automatic size follows the hot set, within a quarter of RAM.
        let mut auto = DeltaCache::new(64 << 20, None);
        auto.mark_hot((0..8192u64).map(|p| p * PAGE as u64));
        assert_eq!(auto.capacity as u64, (64 << 20) / 4 / PAGE as u64);
    }
}
