//! Delta encoding of a re-sent page against the version the destination holds: the XOR of old
//! and new, as runs of differing 64-bit words. A guest that changed a few words of a page
//! sends those words, not 4 KiB. The destination applies a delta only to the exact version it
//! was computed against ([`base_hash`] of its page must match), and refuses anything else.
//!
//! Encoding: a sequence of runs, each `skip: u16` (unchanged words before it), `words: u16`,
//! then `words` × 8 bytes of old XOR new; runs are in page order and never pass its end.
//!
//! A source that no longer holds the old content sends replacement runs instead (the
//! [`REPLACE`] bit of the delta's length): the same runs, carrying the new words. It knows
//! which parts changed from a sketch of what it sent ([`Sketch`]): a keyed hash per 256-byte
//! block.
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_secret};

/// Bytes of a page.
pub const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
const RUN_HEAD: usize = 4;

/// A delta is sent only when it is at most this much of a page (a smaller delta than this
/// saves little, and the full page then refreshes the base).
pub const MAX_DELTA: usize = PAGE / 2;

/// Set in a delta's length: its runs carry new words, not old XOR new.
pub const REPLACE: u16 = 0x8000;

/// The hash a delta names its base by: what the destination must hold for the page.
pub fn base_hash(page: &[u8]) -> u64 {
    xxh3_64(page)
}

fn word(p: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&p[i * 8..i * 8 + 8]);
    u64::from_ne_bytes(w)
}

/// Encodes `new` against `old` (both one page) into `out` (cleared first). Returns false, with
/// `out` unspecified, when the delta would be larger than [`MAX_DELTA`].
pub fn encode(old: &[u8], new: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    if old.len() != PAGE || new.len() != PAGE {
        return false;
    }
    let mut i = 0;
    let mut last_end = 0;
    while i < WORDS {
        if word(old, i) == word(new, i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < WORDS && word(old, i) != word(new, i) {
            i += 1;
        }
        if out.len() + RUN_HEAD + (i - start) * 8 > MAX_DELTA {
            return false;
        }
        // Both fit in u16: at most 512 words in a page.
        out.extend_from_slice(&((start - last_end) as u16).to_le_bytes());
        out.extend_from_slice(&((i - start) as u16).to_le_bytes());
        for j in start..i {
            out.extend_from_slice(&(word(old, j) ^ word(new, j)).to_ne_bytes());
        }
        last_end = i;
    }
    true
}

/// Why a delta does not apply.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
pub enum DeltaError {
    /// a page of {0} bytes
    PageSize(usize),
    /// a run header cut short at byte {0}
    HeaderCut(usize),
    /// a run of {words} words at word {start} does not fit in a page
    RunBeyondPage { words: usize, start: usize },
    /// a run of {words} words cut short at byte {at}
    RunCut { words: usize, at: usize },
}

/// Applies `delta` to `page` in place. Every run must lie inside the page and the encoding
/// must end exactly at a run's end; anything else is an error and `page` is left unchanged.
pub fn apply(page: &mut [u8], delta: &[u8]) -> Result<(), DeltaError> {
    if page.len() != PAGE {
        return Err(DeltaError::PageSize(page.len()));
    }
    let runs = parse(delta)?;
    for (start, xor) in runs {
        for (k, chunk) in xor.chunks_exact(8).enumerate() {
            let at = (start + k) * 8;
            let mut x = [0u8; 8];
            x.copy_from_slice(chunk);
            let v = word(page, start + k) ^ u64::from_ne_bytes(x);
            page[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        }
    }
    Ok(())
}

/// Applies replacement runs to `page` in place, checked like [`apply`]'s.
pub fn apply_replace(page: &mut [u8], delta: &[u8]) -> Result<(), DeltaError> {
    if page.len() != PAGE {
        return Err(DeltaError::PageSize(page.len()));
    }
    for (start, words) in parse(delta)? {
        page[start * 8..start * 8 + words.len()].copy_from_slice(words);
    }
    Ok(())
}

/// Bytes of a sketched block.
const BLOCK: usize = 256;
/// Blocks of a page.
pub const BLOCKS: usize = PAGE / BLOCK;

/// The secret block hashes are keyed with: random per migration (xxh3 takes it as its
/// secret, so nothing is derived per call).
pub type SketchKey = [u8; 192];

/// A fresh random [`SketchKey`].
pub fn sketch_key() -> SketchKey {
    use std::hash::{BuildHasher, Hasher};
    let mut key = [0u8; 192];
    for (i, chunk) in key.chunks_exact_mut(8).enumerate() {
        // std's hasher keys come from the OS's random source, fresh per RandomState.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    key
}

/// What the source keeps of a page it sent, instead of the page: its [`base_hash`] and a hash
/// of each block, keyed by a per-migration secret so a guest cannot aim for a collision (a
/// collision would keep its own old block). 136 bytes against 4096.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sketch {
    pub base: u64,
    pub blocks: [u64; BLOCKS],
}

impl Sketch {
    pub fn of(page: &[u8], key: &SketchKey) -> Self {
        let mut blocks = [0u64; BLOCKS];
        for (b, chunk) in blocks.iter_mut().zip(page.chunks_exact(BLOCK)) {
            *b = xxh3_64_with_secret(chunk, key);
        }
        Sketch {
            base: base_hash(page),
            blocks,
        }
    }

    /// Replacement runs that turn the sketched page into `new` (one run per stretch of
    /// changed blocks) into `out` (cleared first), if at most [`MAX_DELTA`] bytes; `now` is
    /// `new`'s own sketch.
    pub fn encode(&self, now: &Sketch, new: &[u8], out: &mut Vec<u8>) -> bool {
        out.clear();
        let words_per_block = BLOCK / 8;
        let (mut b, mut last_end) = (0, 0);
        while b < BLOCKS {
            if self.blocks[b] == now.blocks[b] {
                b += 1;
                continue;
            }
            let first = b;
            while b < BLOCKS && self.blocks[b] != now.blocks[b] {
                b += 1;
            }
            let (start, words) = (first * words_per_block, (b - first) * words_per_block);
            if out.len() + RUN_HEAD + words * 8 > MAX_DELTA {
                return false;
            }
            // At most 512 words in a page: both fit in u16.
            out.extend_from_slice(&((start - last_end) as u16).to_le_bytes());
            out.extend_from_slice(&(words as u16).to_le_bytes());
            out.extend_from_slice(&new[start * 8..(start + words) * 8]);
            last_end = start + words;
        }
        true
    }
}

/// The runs of an encoding as (first word, XOR bytes), checked before anything is applied.
fn parse(delta: &[u8]) -> Result<Vec<(usize, &[u8])>, DeltaError> {
    let mut runs = Vec::new();
    let (mut at, mut word_at) = (0, 0usize);
    while at < delta.len() {
        let head = delta
            .get(at..at + RUN_HEAD)
            .ok_or(DeltaError::HeaderCut(at))?;
        let skip = usize::from(u16::from_le_bytes([head[0], head[1]]));
        let words = usize::from(u16::from_le_bytes([head[2], head[3]]));
        let start = word_at + skip;
        if words == 0 || start + words > WORDS {
            return Err(DeltaError::RunBeyondPage { words, start });
        }
        at += RUN_HEAD;
        let xor = delta
            .get(at..at + words * 8)
            .ok_or(DeltaError::RunCut { words, at })?;
        runs.push((start, xor));
        at += words * 8;
        word_at = start + words;
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        (0..PAGE)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn a_sketch_finds_the_changed_blocks_and_replaces_exactly_them() {
        let old = page(1);
        let mut new = old.clone();
        new[8] ^= 1;
        new[300] ^= 1;
        new[4095] ^= 1;
        let (k, other) = (sketch_key(), sketch_key());
        assert_ne!(k, other);
        let (was, now) = (Sketch::of(&old, &k), Sketch::of(&new, &k));
        assert_eq!(was.base, base_hash(&old));
        let mut d = Vec::new();
        assert!(was.encode(&now, &new, &mut d));
        // Blocks 0 and 1 as one run, block 15 as another.
        assert_eq!(d.len(), 2 * RUN_HEAD + 3 * BLOCK);
        let mut got = old.clone();
        apply_replace(&mut got, &d).unwrap();
        assert_eq!(got, new);
        // Unchanged: nothing to send; everything changed: too large.
        assert!(was.encode(&was, &old, &mut d) && d.is_empty());
        assert!(!was.encode(&Sketch::of(&page(2), &k), &page(2), &mut d));
        // Another key, other hashes.
        assert_ne!(Sketch::of(&old, &other).blocks, was.blocks);
        // Replacement runs are checked like XOR runs.
        assert!(apply_replace(&mut got, &[0, 0, 0, 2]).is_err());
        assert!(apply_replace(&mut got, &[0, 0, 1, 0]).is_err());
    }

    #[test]
    fn a_few_changed_words_make_a_small_delta_that_applies_exactly() {
        let old = page(1);
        let mut new = old.clone();
        new[8..16].copy_from_slice(&42u64.to_ne_bytes());
        new[4088..].copy_from_slice(&7u64.to_ne_bytes());
        new[100] ^= 0xff;
        let mut d = Vec::new();
        assert!(encode(&old, &new, &mut d));
        assert_eq!(d.len(), 3 * (RUN_HEAD + 8));
        let mut got = old.clone();
        apply(&mut got, &d).unwrap();
        assert_eq!(got, new);
        // Same page: an empty delta.
        assert!(encode(&old, &old, &mut d) && d.is_empty());
    }

    #[test]
    fn a_rewritten_page_is_not_worth_a_delta() {
        assert!(!encode(&page(1), &page(2), &mut Vec::new()));
    }

    #[test]
    fn malformed_deltas_are_refused_and_change_nothing() {
        let mut p = page(3);
        let before = p.clone();
        for bad in [
            vec![0u8, 0, 0],                         // header cut short
            vec![0, 0, 1, 0],                        // data cut short
            vec![0, 0, 0, 0],                        // an empty run
            [vec![0, 2, 1, 0], vec![0; 8]].concat(), // starts past the page
            // The first run ends at the page's end; a second one cannot follow.
            [
                vec![0xff, 1, 1, 0],
                vec![0; 8],
                vec![0, 0, 1, 0],
                vec![0; 8],
            ]
            .concat(),
        ] {
            assert!(apply(&mut p, &bad).is_err(), "{bad:?}");
            assert_eq!(p, before);
        }
    }
}
