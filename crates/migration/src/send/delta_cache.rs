//! What the source remembers of what the destination holds: the last-sent content of the pages
//! likely to be sent again, so a re-sent page can go as a delta ([`crate::delta`]). Pages enter
//! when the dirty log shows the guest writing them (hot) or when a sync round re-sends them;
//! the oldest leave first when the cache is full. Bounded: `--delta-cache`, or by default
//! twice the hot set seen so far, within [`MIN_AUTO`] and a quarter of guest RAM.
//!
//! Of every page it sends the source also keeps a sketch (136 bytes: [`delta::Sketch`]). A
//! re-sent page the cache does not hold (one the guest wrote once, long after it was sent)
//! then goes as the blocks that changed, replacing those the destination holds.
use std::collections::{HashMap, VecDeque};

use super::page_set::PageSet;
use crate::delta::{self, Sketch, BLOCKS, PAGE};
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
    sketches: Sketches,
    pub report: DeltaReport,
}

/// How a page goes as a delta: against the destination's version with this base hash, as
/// XOR runs or as replacement runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Delta {
    pub base: u64,
    pub replace: bool,
}

/// A sketch of every page sent and not since forgotten, by page: virtual memory of 136 bytes
/// per page of guest RAM, touched (and so backed) only where pages were sent.
struct Sketches {
    key: delta::SketchKey,
    /// The sketch of a zero page: what the destination holds where no sketch is (pages never
    /// sent, or sent as zeros).
    zero: Sketch,
    present: PageSet,
    /// [`BLOCKS`] + 1 words per page: base hash, then block hashes.
    words: Vec<u64>,
}

const STRIDE: usize = BLOCKS + 1;

impl Sketches {
    fn new(ram_bytes: u64) -> Self {
        let pages = usize::try_from(ram_bytes / PAGE as u64).unwrap_or(0);
        let key = delta::sketch_key();
        Sketches {
            zero: Sketch::of(&[0u8; PAGE], &key),
            key,
            present: PageSet::new(ram_bytes),
            words: vec![0; pages * STRIDE],
        }
    }

    fn slot(&self, off: u64) -> Option<std::ops::Range<usize>> {
        let i = usize::try_from(off / PAGE as u64).ok()? * STRIDE;
        (i + STRIDE <= self.words.len()).then_some(i..i + STRIDE)
    }

    /// Records `now` for the page at `off`; returns the sketch of what the destination held
    /// until now (a zero page's where none was recorded).
    fn replace(&mut self, off: u64, now: &Sketch) -> Option<Sketch> {
        let slot = self.slot(off)?;
        let w = &mut self.words[slot];
        let was = if self.present.contains(off) {
            let mut blocks = [0u64; BLOCKS];
            blocks.copy_from_slice(&w[1..]);
            Sketch { base: w[0], blocks }
        } else {
            self.zero
        };
        w[0] = now.base;
        w[1..].copy_from_slice(&now.blocks);
        self.present.insert(off);
        Some(was)
    }

    fn forget(&mut self, off: u64) {
        self.present.remove(off);
    }
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
            sketches: Sketches::new(ram_bytes),
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

    /// `page` goes out at `off`, in a sync round when `resend`. Returns how it goes as a delta,
    /// with the encoding in `out`: against the cached version (XOR) when the cache holds it
    /// and the delta is small, else as the blocks changed since its sketch when those are
    /// few. The page's new content is remembered if it is cached, hot or re-sent, and its
    /// sketch always.
    pub fn encode(
        &mut self,
        off: u64,
        page: &[u8],
        out: &mut Vec<u8>,
        resend: bool,
    ) -> Option<Delta> {
        let now = Sketch::of(page, &self.sketches.key);
        let was = self.sketches.replace(off, &now);
        if let Some(old) = self.pages.get_mut(&off) {
            let base = delta::base_hash(old);
            let small = delta::encode(old, page, out);
            old.copy_from_slice(page);
            if small {
                self.report.hits += 1;
                self.saved(out.len());
                return Some(Delta {
                    base,
                    replace: false,
                });
            }
            self.report.too_different += 1;
            return None;
        }
        if resend || self.is_hot(off) {
            self.insert(off, page);
        }
        if let Some(was) = was.filter(|w| w.encode(&now, page, out)) {
            self.report.sketch_hits += 1;
            self.saved(out.len());
            return Some(Delta {
                base: was.base,
                replace: true,
            });
        }
        if resend {
            self.report.misses += 1;
        }
        None
    }

    fn saved(&mut self, encoded: usize) {
        let sent = crate::protocol::DELTA_HEAD_LEN + encoded;
        self.report.bytes_saved += (PAGE - sent.min(PAGE)) as u64;
    }

    /// The page went out as zeros (a hole): nothing to keep.
    pub fn forget(&mut self, off: u64) {
        self.pages.remove(&off);
        self.sketches.forget(off);
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
        let d = c.encode(4096, &changed, &mut out, true).unwrap();
        assert_eq!(d.base, delta::base_hash(&page(1)));
        assert!(!d.replace);
        let mut there = page(1);
        delta::apply(&mut there, &out).unwrap();
        assert_eq!(there, changed);
        // The next delta is against what went out last.
        let again = c.encode(4096, &page(1), &mut out, true).unwrap();
        assert_eq!(again.base, delta::base_hash(&changed));
        assert_eq!(c.encode(0, &page(2), &mut out, true), None);
        assert_eq!((c.report.hits, c.report.misses), (2, 1));
        // A page that became zero is forgotten.
        c.forget(4096);
        assert_eq!(c.encode(4096, &page(1), &mut out, true), None);
    }

    /// A page not in the cache goes as the blocks changed since its sketch: since it was
    /// sent, or since zero where the destination holds zeros (never sent, or sent as zero).
    #[test]
    fn an_uncached_page_goes_as_the_blocks_changed_since_its_sketch() {
        let mut c = DeltaCache::new(64 << 20, Some(0));
        let mut out = Vec::new();
        let sent: Vec<u8> = (0..PAGE).map(|i| (i % 253) as u8).collect();
        assert_eq!(c.encode(0, &sent, &mut out, false), None);
        let mut changed = sent.clone();
        changed[2000] ^= 1;
        let d = c.encode(0, &changed, &mut out, true).unwrap();
        assert_eq!(d.base, delta::base_hash(&sent));
        assert!(d.replace);
        let mut there = sent.clone();
        delta::apply_replace(&mut there, &out).unwrap();
        assert_eq!(there, changed);
        // A page written once where the destination holds zeros: its non-zero block.
        let mut sparse = vec![0u8; PAGE];
        sparse[100] = 1;
        let d = c.encode(8192, &sparse, &mut out, true).unwrap();
        assert_eq!((d.base, d.replace), (delta::base_hash(&[0; PAGE]), true));
        let mut there = vec![0u8; PAGE];
        delta::apply_replace(&mut there, &out).unwrap();
        assert_eq!(there, sparse);
        // Forgotten (sent as zero): zeros are the base again.
        c.forget(0);
        let d = c.encode(0, &sparse, &mut out, true).unwrap();
        assert_eq!(d.base, delta::base_hash(&[0; PAGE]));
        assert_eq!((c.report.sketch_hits, c.report.misses), (3, 0));
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
