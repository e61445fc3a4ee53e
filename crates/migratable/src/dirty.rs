//! Which pages of guest RAM were written: per RAM region, a bitmap the engine reads and
//! re-arms. A VMM merges every source that writes guest memory (the guest's writes as the
//! hypervisor logs them, and its own device writes) into one log.
use ram::{RamRange, PAGE_SIZE};

use crate::Cause;

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DirtyLogError {
    /// {op} on RAM region {region} failed: {source}
    Source {
        op: &'static str,
        region: u32,
        source: Cause,
    },
    /// a dirty bitmap of {bits} bits does not cover RAM region {region}
    Bitmap { region: u32, bits: u64 },
}

/// One RAM region's dirty bitmap: bit i = page i of the region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// The region, as the log numbers them.
    pub region: u32,
    pub range: RamRange,
    pub bits: Vec<u64>,
}

impl DirtyBitmap {
    /// An empty bitmap of `range`.
    pub fn empty(region: u32, range: RamRange) -> Self {
        let words = usize::try_from((range.len / PAGE_SIZE).div_ceil(64)).unwrap_or(0);
        DirtyBitmap {
            region,
            range,
            bits: vec![0; words],
        }
    }

    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Marks the page at memfd offset `off`, if it lies in this region.
    pub fn mark(&mut self, off: u64) {
        let Some(page) = off.checked_sub(self.range.file_offset) else {
            return;
        };
        if page >= self.range.len {
            return;
        }
        let i = page / PAGE_SIZE;
        if let Some(w) = usize::try_from(i / 64)
            .ok()
            .and_then(|w| self.bits.get_mut(w))
        {
            *w |= 1 << (i % 64);
        }
    }

    /// Adds the pages another source saw written in the same region.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }

    /// Memfd offsets of the dirty pages, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let base = self.range.file_offset;
        self.bits.iter().enumerate().flat_map(move |(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(base + (i as u64 * 64 + b) * PAGE_SIZE)
            })
        })
    }
}

/// A VM's dirty-page log. With manual protect, [`DirtyLog::fetch`] only reads and
/// [`DirtyLog::clear`] re-arms exactly the pages about to be sent, so that work stays out of
/// the downtime; without it, a fetch reads and clears at once.
pub trait DirtyLog: Send {
    /// Starts logging: from now on every write is recorded.
    fn start(&mut self) -> Result<(), DirtyLogError>;
    fn stop(&mut self) -> Result<(), DirtyLogError>;
    fn is_started(&self) -> bool;
    /// True when clearing is separate from fetching.
    fn manual_protect(&self) -> bool;
    /// Pages written since the last fetch (manual protect: since each page's last clear).
    fn fetch(&mut self) -> Result<Vec<DirtyBitmap>, DirtyLogError>;
    /// Re-arms tracking for these pages before they are read and sent.
    fn clear(&mut self, b: &DirtyBitmap) -> Result<(), DirtyLogError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> RamRange {
        RamRange {
            guest: 1 << 32,
            len: 1 << 30,
            file_offset: 3 << 30,
        }
    }

    #[test]
    fn bitmap_pages_are_memfd_offsets() {
        let b = DirtyBitmap {
            region: 1,
            range: region(),
            bits: vec![0b1001, 0, 1 << 63],
        };
        assert_eq!(b.count(), 3);
        let p: Vec<u64> = b.pages().collect();
        assert_eq!(
            p,
            vec![3 << 30, (3 << 30) + 3 * 4096, (3 << 30) + 191 * 4096]
        );
    }

    #[test]
    fn marks_and_merges_stay_within_the_region() {
        let mut a = DirtyBitmap::empty(1, region());
        a.mark(3 << 30);
        a.mark((3 << 30) + 4096 * 70);
        a.mark(0);
        a.mark((3 << 30) + (1 << 30));
        let mut b = DirtyBitmap::empty(1, region());
        b.mark((3 << 30) + 4096);
        a.merge(&b);
        let p: Vec<u64> = a.pages().collect();
        assert_eq!(p, vec![3 << 30, (3 << 30) + 4096, (3 << 30) + 4096 * 70]);
    }
}
