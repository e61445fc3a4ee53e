//! Pages of this migration the destination already holds, by content (BLAKE3), so a page with
//! the same content goes as a reference to one of them. A page becomes a target only once the
//! destination is sure to have placed it before anything that refers to it: on one connection,
//! once its batch is written (frames are applied in order); with page streams, once its round
//! ended (streams meet at every round's end). A page sent again stops being a target at once.
use std::collections::HashMap;

/// Targets kept at most: about 100 bytes each (two maps), so 2 Mi targets (8 GiB of distinct
/// pages) is some 200 MiB of the source's memory; pages beyond go whole.
pub const MAX_TARGETS: usize = 2 << 20;

type Hash = [u8; 32];

#[derive(Default)]
pub(super) struct Dedup {
    by_hash: HashMap<Hash, u64>,
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
}

impl Dedup {
    /// `page` goes out at `off`: the place the destination already holds this content, with
    /// its hash, or None (then it will hold it at `off` once this batch is placed).
    pub fn lookup(&mut self, off: u64, page: &[u8]) -> Option<(u64, Hash)> {
        self.forget(off);
        let hash = *blake3::hash(page).as_bytes();
        match self.by_hash.get(&hash) {
            Some(&from) => Some((from, hash)),
            None => {
                self.building.push((hash, off));
                self.staged.insert(off, hash);
                None
            }
        }
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
        assert_eq!(from, 0);
        assert_eq!(hash, *blake3::hash(&a).as_bytes());
        // Page 0 queued again with other content: it stops being a target at once; the
        // other page that held `a` may still be one.
        assert_eq!(d.lookup(0, &b), None);
        assert!(d.lookup(12288, &a).is_none_or(|(f, _)| f != 0));
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
        assert_eq!(d.lookup(8192, &a).map(|r| r.0), Some(0));
        // A page queued again before its batch was written never becomes a target.
        let mut d = Dedup::default();
        d.lookup(0, &a);
        d.built(1);
        d.forget(0);
        d.written(1, false);
        assert_eq!(d.lookup(4096, &a), None);
    }
}
