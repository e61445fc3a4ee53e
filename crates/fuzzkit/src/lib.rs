//! Fuzzing on stable Rust, bounded, for `cargo test`: a seeded mutator that turns valid inputs
//! into the malformed ones a hostile peer would send, and a global allocator that records the
//! largest single allocation, so a test can assert a decoder never allocates beyond its stated
//! limit. The same targets run under `cargo fuzz` (nightly, libFuzzer) from `fuzz/`.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// xorshift64*: deterministic from its seed, fast, good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Interesting values for length and count fields.
const EDGES: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0x100,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    u64::MAX,
];

/// One malformed variant of `seed`: a few of bit flips, random bytes, edge values written
/// over 1, 2, 4 or 8 bytes (length fields), truncation, duplication, insertion.
pub fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(v.len().max(1));
        match rng.below(7) {
            0 if !v.is_empty() => v[at] ^= 1 << rng.below(8),
            1 if !v.is_empty() => v[at] = rng.next_u64() as u8,
            2 if !v.is_empty() => {
                let w = [1usize, 2, 4, 8][rng.below(4)];
                let e = EDGES[rng.below(EDGES.len())].to_le_bytes();
                for (i, b) in e.iter().take(w).enumerate() {
                    if let Some(x) = v.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            3 => v.truncate(at),
            4 if !v.is_empty() => {
                let end = (at + 1 + rng.below(64)).min(v.len());
                let chunk = v[at..end].to_vec();
                v.splice(at..at, chunk);
            }
            5 => {
                let n = rng.below(32);
                let junk: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                v.splice(at..at, junk);
            }
            _ => {}
        }
    }
    v
}

/// Runs `target` on `n` mutations of the seeds (and on the seeds themselves); returns how many
/// inputs it ran. Each input must finish within `per_input` (no hangs).
pub fn run(
    seeds: &[Vec<u8>],
    n: usize,
    rng_seed: u64,
    per_input: Duration,
    target: impl Fn(&[u8]),
) -> usize {
    let mut rng = Rng::new(rng_seed);
    let mut count = 0;
    for s in seeds {
        check(per_input, || target(s));
        count += 1;
    }
    for i in 0..n {
        let s = &seeds[i % seeds.len()];
        let input = mutate(&mut rng, s);
        check(per_input, || target(&input));
        count += 1;
    }
    count
}

fn check(limit: Duration, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    assert!(t.elapsed() < limit, "an input took {:?}", t.elapsed());
}

/// A global allocator that records the largest single allocation: install it in a test
/// binary with `#[global_allocator]`.
pub struct Meter;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

impl Meter {
    /// The largest allocation since the last reset.
    pub fn largest() -> usize {
        LARGEST.load(Ordering::Relaxed)
    }
    pub fn reset() {
        LARGEST.store(0, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; this only records sizes.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds GlobalAlloc::alloc's contract, which System shares.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from System through `alloc`/`realloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as for alloc.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller upholds GlobalAlloc::realloc's contract, which System shares.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_varied() {
        let seed = b"LVMG\x01\x00\x01\x00 some frame bytes".to_vec();
        let a: Vec<_> = (0..50)
            .map({
                let mut r = Rng::new(7);
                move |_| mutate(&mut r, &seed)
            })
            .collect();
        let seed = b"LVMG\x01\x00\x01\x00 some frame bytes".to_vec();
        let b: Vec<_> = (0..50)
            .map({
                let mut r = Rng::new(7);
                move |_| mutate(&mut r, &seed)
            })
            .collect();
        assert_eq!(a, b);
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 40);
    }
}
