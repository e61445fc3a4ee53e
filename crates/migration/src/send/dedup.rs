//! Pages of this migration the destination already holds, by content (BLAKE3), so a page with
//! the same content goes as a reference to one of them. A page becomes a target only once the
//! destination is sure to have placed it before anything that refers to it: on one connection,
//! once its batch is written (frames are applied in order); with page streams, once its round
//! ended (streams meet at every round's end). A page sent again stops being a target at once.
//!
//! In a drain, the destination host may also hold pages of earlier migrations in its page
//! cache ([`crate::host_cache`]); it sent their keys before the copy, and a page whose hash has
//! one of them goes as a reference to the cache.
use std::collections::{HashMap, HashSet};

use crate::host_cache::{key, FastState, KEY_LEN};
use crate::protocol::RefTo;

/// Targets kept at most: about 100 bytes each (two maps), so 2 Mi targets (8 GiB of distinct
/// pages) is some 200 MiB of the source's memory; pages beyond go whole.
pub const MAX_TARGETS: usize = 2 << 20;

type Hash = [u8; 32];

/// Pages looked up before deciding whether references pay: 64 MiB, spread over RAM when the
/// copy goes in spread order.
pub const TRIAL_PAGES: u64 = 16 << 10;

/// Whether looking pages up goes on paying, after `looked` lookups found `found` references:
/// always with the host's cache (its pages are the point), otherwise once the trial shows at
/// least 1% of pages repeating. Below that, the hashing costs more CPU than the bytes it saves
/// (a BLAKE3 per page, where compression is CPU-bound).
pub fn pays(looked: u64, found: u64, host_cache: bool) -> bool {
    host_cache || looked < TRIAL_PAGES || found * 100 >= looked
}

#[derive(Default)]
pub(super) struct Dedup {
    by_hash: HashMap<Hash, u64, FastState>,
    by_off: HashMap<u64, Hash>,
    /// Pages queued whole and not yet targets, with their content: a page queued again (or
    /// forgotten) before its batch was written leaves, so it never becomes a stale target.
    staged: HashMap<u64, Hash>,
    /// Queued in the batch being built.
    building: Vec<(Hash, u64)>,
    /// Batches built but not yet written, by batch id.
    written_later: HashMap<u64, Vec<(Hash, u64)>>,
    /// Written, waiting for their round's end (page streams).
    round: Vec<(Hash, u64)>,
    /// Keys of the pages in the destination host's cache.
    host: HashSet<[u8; KEY_LEN], FastState>,
    looked: u64,
    found: u64,
}

impl Dedup {
    /// The destination host's cache holds pages with these keys.
    pub fn set_host_keys(&mut self, keys: &[u8]) {
        let mut host =
            HashSet::with_capacity_and_hasher(keys.len() / KEY_LEN, FastState::default());
        host.extend(
            keys.chunks_exact(KEY_LEN)
                .filter_map(|k| <[u8; KEY_LEN]>::try_from(k).ok()),
        );
        self.host = host;
    }

    /// `page` goes out at `off`: where the destination already holds this content, with its
    /// hash, or None (then it will hold it at `off` once this batch is placed).
    pub fn lookup(&mut self, off: u64, page: &[u8]) -> Option<(RefTo, Hash)> {
        self.forget(off);
        self.looked += 1;
        let hash = *blake3::hash(page).as_bytes();
        if let Some(&from) = self.by_hash.get(&hash) {
            self.found += 1;
            return Some((RefTo::Page(from), hash));
        }
        // Whole or from the host's cache, the page holds this content once placed.
        self.building.push((hash, off));
        self.staged.insert(off, hash);
        let host = self.host.contains(&key(&hash));
        self.found += u64::from(host);
        host.then_some((RefTo::HostCache, hash))
    }

    /// Whether looking pages up still pays ([`pays`]); pages looked up so far.
    pub fn pays(&self) -> (bool, u64) {
        (
            pays(self.looked, self.found, !self.host.is_empty()),
            self.looked,
        )
    }

    /// `off` goes out some other way (zero, delta): whatever it held, it will not hold now.
    pub fn forget(&mut self, off: u64) {
        if let Some(h) = self.by_off.remove(&off) {
            if self.by_hash.get(&h) == Some(&off) {
                self.by_hash.remove(&h);
            }
        }
        self.staged.remove(&off);
    }

    /// The batch being built is done, as batch `id`.
    pub fn built(&mut self, id: u64) {
        let b = std::mem::take(&mut self.building);
        if !b.is_empty() {
            self.written_later.insert(id, b);
        }
    }

    /// Batch `id` was written: on one connection its pages are targets now; with page
    /// streams, at the round's end.
    pub fn written(&mut self, id: u64, streams: bool) {
        let Some(b) = self.written_later.remove(&id) else {
            return;
        };
        if streams {
            self.round.extend(b);
        } else {
            self.add(b);
        }
    }

    /// The round ended on every connection.
    pub fn round_end(&mut self) {
        let b = std::mem::take(&mut self.round);
        self.add(b);
    }

    /// Targets, unless their page was queued again since (or the index is full).
    fn add(&mut self, pages: Vec<(Hash, u64)>) {
        for (h, off) in pages {
            if self.staged.get(&off) != Some(&h) {
                continue;
            }
            self.staged.remove(&off);
            if self.by_off.len() < MAX_TARGETS {
                self.by_hash.entry(h).or_insert(off);
                self.by_off.insert(off, h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_a_target_once_written_and_not_after_it_changes() {
        let (a, b) = (vec![1u8; 4096], vec![2u8; 4096]);
        let mut d = Dedup::default();
        assert_eq!(d.lookup(0, &a), None);
        // Same batch, not written yet: no reference to it.
        assert_eq!(d.lookup(4096, &a), None);
        d.built(1);
        d.written(1, false);
        let (from, hash) = d.lookup(8192, &a).unwrap();
        assert_eq!(from, RefTo::Page(0));
        assert_eq!(hash, *blake3::hash(&a).as_bytes());
        // Page 0 queued again with other content: it stops being a target at once; the
        // other page that held `a` may still be one.
        assert_eq!(d.lookup(0, &b), None);
        assert!(d.lookup(12288, &a).is_none_or(|(f, _)| f != RefTo::Page(0)));
    }

    #[test]
    fn with_streams_targets_wait_for_the_round_end() {
        let a = vec![3u8; 4096];
        let mut d = Dedup::default();
        d.lookup(0, &a);
        d.built(7);
        d.written(7, true);
        assert_eq!(d.lookup(4096, &a), None);
        d.round_end();
        assert_eq!(d.lookup(8192, &a).map(|r| r.0), Some(RefTo::Page(0)));
        // A page queued again before its batch was written never becomes a target.
        let mut d = Dedup::default();
        d.lookup(0, &a);
        d.built(1);
        d.forget(0);
        d.written(1, false);
        assert_eq!(d.lookup(4096, &a), None);
    }

    #[test]
    fn references_stop_where_pages_do_not_repeat_unless_the_host_has_a_cache() {
        assert!(pays(TRIAL_PAGES - 1, 0, false));
        assert!(!pays(TRIAL_PAGES, TRIAL_PAGES / 101, false));
        assert!(pays(TRIAL_PAGES, TRIAL_PAGES.div_ceil(100), false));
        assert!(pays(TRIAL_PAGES * 4, 0, true));
    }

    #[test]
    fn a_page_the_host_holds_goes_as_a_reference_to_its_cache() {
        let (a, b) = (vec![4u8; 4096], vec![5u8; 4096]);
        let mut d = Dedup::default();
        d.set_host_keys(&key(blake3::hash(&a).as_bytes()));
        assert_eq!(d.lookup(0, &a).map(|r| r.0), Some(RefTo::HostCache));
        assert_eq!(d.lookup(4096, &b), None);
        // Once placed, the page is a target of this migration like any other.
        d.built(1);
        d.written(1, false);
        assert_eq!(d.lookup(8192, &a).map(|r| r.0), Some(RefTo::Page(0)));
    }
}
