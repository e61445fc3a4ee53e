//! What a drain wants to know about a VM before it moves it: how much memory it touched, how
//! well that compresses, how fast the guest dirties it (sampled from the dirty log) and what
//! a page it writes again costs as a delta.
use std::time::{Duration, Instant};

use migratable::DirtyBitmap;
use ram::{data_extents, is_zero, PAGE_SIZE};
use serde::{Deserialize, Serialize};

use crate::MigrationError;

/// A VM, sampled.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VmSample {
    pub memory_bytes: u64,
    /// Memory the guest (or the VMM) ever touched: what a migration's copy phase reads.
    pub touched_bytes: u64,
    /// Of the touched pages sampled, the share that is zero (sent as flags).
    pub zero_fraction: f64,
    /// Compressed bytes per raw byte over the sampled non-zero pages, as the copy packs them:
    /// zstd over runs of neighbouring pages.
    pub compress_ratio: f64,
    /// Pages the guest dirtied per second during the sample window, counted every
    /// [`FETCH_EVERY`] (a page written in two periods counts twice): the rate a short
    /// pre-copy round sees.
    pub dirty_pages_per_s: f64,
    /// Distinct pages dirtied over the whole window (`window_ms`) and over its first half:
    /// how the set a round resends grows with the round's length.
    #[serde(default)]
    pub dirty_set_pages: u64,
    #[serde(default)]
    pub dirty_set_half_pages: u64,
    #[serde(default)]
    pub window_ms: u64,
    /// Content-defined sample of the non-zero pages: the xxh3 of each whose first 256 bytes
    /// hash to 0 modulo [`FINGERPRINT_RATE`] (at most [`MAX_FINGERPRINT`]). Equal pages are picked in every VM
    /// whatever their address, so two VMs' fingerprints share keys as their memory shares
    /// pages: how a drain learns whether dedup across its VMs can pay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fingerprint: Vec<u64>,
    /// What each fingerprint page, in turn, costs in bytes: zstd-compressed (packed alone,
    /// scaled by what packing with its neighbours gained over the sampled runs), and in a copy
    /// with deltas (against the zero page; the whole page when no delta fits). The pages a
    /// destination's cache will hold are the ones another VM shares, and they compress
    /// unlike the rest, so a drain prices the pages that still go whole from these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fingerprint_costs: Vec<[u16; 2]>,
    /// What a page the guest writes after it was sent costs as a delta, per byte of the page,
    /// as the engine sends it: against the version sent ([`crate::delta::encode`]) when the
    /// guest wrote the page often enough for the engine to keep it, else as the 256-byte
    /// blocks that changed ([`crate::delta::Sketch`]), or whole when no delta fits. Measured
    /// on up to [`DELTA_PROBE_PAGES`] touched pages kept at the window's start, spread evenly
    /// (a round resends every page written once as well as the hot ones). None: the guest
    /// wrote none of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_ratio: Option<f64>,
    /// What a sampled non-zero page costs in the copy when the migration sends deltas, per
    /// byte of it: a page never sent is encoded against the zero page the destination holds
    /// (its changed blocks, or the whole page when more would change), so a sparse page goes
    /// cheaply. None: not measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_delta_ratio: Option<f64>,
}

/// Bytes at the start of a page that decide whether it is in a fingerprint.
const PICK_BYTES: usize = 256;

/// One page in this many is in a fingerprint. Equal pages are picked together in every VM,
/// so what VMs share is sampled once for all of them: at 1 in 256, a shared 180 MiB came out
/// 8% short in every VM at once.
pub const FINGERPRINT_RATE: u64 = 64;
/// Keys a fingerprint holds at most (4 GiB of non-zero pages at the rate above).
pub const MAX_FINGERPRINT: usize = 16384;

/// The dirty log is read this often during a sample.
pub const FETCH_EVERY: Duration = Duration::from_millis(50);

/// Runs of neighbouring touched pages read for the zero, compressibility and copy-delta
/// estimates, and the pages in each: the copy compresses neighbours together.
const SAMPLE_RUNS: u64 = 256;
const RUN_PAGES: u64 = 16;

/// Touched pages whose version at the window's start is kept for the delta estimate.
pub const DELTA_PROBE_PAGES: u64 = 4096;

/// Samples `vm` for `window` (the dirty rate needs the guest running meanwhile). The dirty log
/// must be free: not while a migration runs.
/// With `fingerprint`, also reads every touched page for [`VmSample::fingerprint`].
pub fn sample(
    vm: &crate::SourceVm,
    window: Duration,
    fingerprint: bool,
) -> Result<VmSample, MigrationError> {
    let (ram, dirty, memory) = {
        let g = locks::lock(vm);
        (g.ram(), g.dirty_log(), g.config().memory)
    };
    let extents = data_extents(ram.backing_file(), ram.size()).map_err(MigrationError::Extents)?;
    let touched: u64 = extents.iter().map(|(s, e)| e - s).sum();
    // The content and the fingerprint read pages while the window waits for the guest to
    // write, not after it.
    let (c, fingerprint, d) = std::thread::scope(|sc| {
        let c = sc.spawn(|| content(&ram, &extents, touched));
        let keys = fingerprint.then(|| sc.spawn(|| content_keys(&ram, &extents)));
        let d = dirtying(&dirty, &ram, &extents, window);
        // A panic there is this thread's to carry on.
        let c = c.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        let keys = match keys {
            Some(k) => k.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
            None => Ok(Default::default()),
        };
        (c, keys, d)
    });
    let (c, (fingerprint, fingerprint_costs), d) = (c?, fingerprint?, d?);
    let fingerprint_costs = batched(fingerprint_costs, c.batch_gain);
    Ok(VmSample {
        memory_bytes: memory,
        touched_bytes: touched,
        zero_fraction: c.zero_fraction,
        compress_ratio: c.compress_ratio,
        dirty_pages_per_s: d.rate,
        dirty_set_pages: d.set,
        dirty_set_half_pages: d.half_set,
        window_ms: window.as_millis() as u64,
        fingerprint,
        fingerprint_costs,
        delta_ratio: d.delta_ratio,
        copy_delta_ratio: c.copy_delta_ratio,
    })
}

/// The content-defined sample of every touched non-zero page (see [`VmSample::fingerprint`]),
/// and what each of its pages costs ([`VmSample::fingerprint_costs`]).
fn content_keys(
    ram: &ram::GuestRam,
    extents: &[(u64, u64)],
) -> Result<(Vec<u64>, Vec<[u16; 2]>), MigrationError> {
    let mut page = vec![0u8; PAGE];
    let (mut keys, mut costs) = (Vec::new(), Vec::new());
    let mut pricer = PagePricer::new();
    for &(s, e) in extents {
        for off in (s..e).step_by(PAGE) {
            // Picked by their first bytes (equal pages have equal ones), so only the picked
            // pages are read whole.
            ram.read_at(off, &mut page[..PICK_BYTES])?;
            if !xxhash_rust::xxh3::xxh3_64(&page[..PICK_BYTES]).is_multiple_of(FINGERPRINT_RATE) {
                continue;
            }
            ram.read_at(off, &mut page)?;
            if !is_zero(&page) {
                keys.push(xxhash_rust::xxh3::xxh3_64(&page));
                // At most a page each, which fits; a page that would not compress goes whole.
                let [packed, in_copy] = pricer.costs(&page).unwrap_or([PAGE; 2]);
                let fit = |b: usize| u16::try_from(b).unwrap_or(u16::MAX);
                costs.push([fit(packed), fit(in_copy)]);
                if keys.len() == MAX_FINGERPRINT {
                    return Ok((keys, costs));
                }
            }
        }
    }
    Ok((keys, costs))
}

/// Fingerprint pages' costs with their packed bytes as in the copy's batches: each page
/// was packed alone, which `gain` corrects.
// Non-negative (`gain` is clamped) and at most the page's own cost; `as` saturates.
#[allow(clippy::cast_sign_loss)]
fn batched(costs: Vec<[u16; 2]>, gain: f64) -> Vec<[u16; 2]> {
    let gain = gain.clamp(0.0, 1.0);
    costs
        .into_iter()
        .map(|[packed, in_copy]| [(f64::from(packed) * gain).round() as u16, in_copy])
        .collect()
}

/// What a non-zero page costs a migration in bytes, as its copy sends it.
struct PagePricer {
    /// The copy encodes a page never sent against the zero page; the key only hides which
    /// blocks collide, and a fresh one does as well here.
    key: crate::delta::SketchKey,
    zero_page: crate::delta::Sketch,
    /// None: no context could be made; nothing is priced.
    zstd: Option<crate::codec::Zstd>,
    out: Vec<u8>,
}

impl PagePricer {
    fn new() -> Self {
        let key = crate::delta::sketch_key();
        let zero_page = crate::delta::Sketch::of(&[0u8; PAGE], &key);
        PagePricer {
            key,
            zero_page,
            zstd: crate::codec::Zstd::new().ok(),
            out: Vec::new(),
        }
    }

    /// `input` zstd-compressed into `out`.
    fn pack(&mut self, input: &[u8]) -> Option<usize> {
        let zstd = self.zstd.as_mut()?;
        zstd.compress(input, &mut self.out).ok()?;
        Some(self.out.len())
    }

    /// Its bytes zstd-compressed (at most the page), and as a delta against the zero page
    /// (the page when no delta fits). None when compression failed.
    fn costs(&mut self, page: &[u8]) -> Option<[usize; 2]> {
        self.pack(page)?;
        let packed = self.out.len().min(page.len());
        let now = crate::delta::Sketch::of(page, &self.key);
        let in_copy = if self.zero_page.encode(&now, page, &mut self.out) {
            crate::protocol::DELTA_HEAD_LEN + self.out.len()
        } else {
            page.len()
        };
        Some([packed, in_copy])
    }
}

/// What the dirty log showed over a sample window.
struct Dirtying {
    rate: f64,
    set: u64,
    half_set: u64,
    delta_ratio: Option<f64>,
}

/// Touched pages, spread evenly, with their content at the window's start: the versions
/// the delta estimate encodes what the guest wrote since against.
struct DeltaProbe {
    offsets: Vec<u64>,
    content: Vec<u8>,
    /// In how many of the window's periods the guest wrote each.
    written: Vec<u8>,
}

impl DeltaProbe {
    /// Up to [`DELTA_PROBE_PAGES`] of the `touched` bytes in `extents`, spread evenly.
    fn take(
        ram: &ram::GuestRam,
        extents: &[(u64, u64)],
        touched: u64,
    ) -> Result<Self, MigrationError> {
        let step = (touched / PAGE_SIZE).div_ceil(DELTA_PROBE_PAGES).max(1);
        let offsets: Vec<u64> = extents
            .iter()
            .flat_map(|&(s, e)| (s..e).step_by(PAGE))
            .step_by(usize::try_from(step).unwrap_or(usize::MAX))
            .take(usize::try_from(DELTA_PROBE_PAGES).unwrap_or(usize::MAX))
            .collect();
        let mut content = vec![0u8; offsets.len() * PAGE];
        for (off, page) in offsets.iter().zip(content.chunks_exact_mut(PAGE)) {
            ram.read_at(*off, page)?;
        }
        let written = vec![0; offsets.len()];
        Ok(DeltaProbe {
            offsets,
            content,
            written,
        })
    }

    /// Counts the probed pages one period's log (`maps`) shows written.
    fn mark(&mut self, maps: &[DirtyBitmap]) {
        for page in maps.iter().flat_map(DirtyBitmap::pages) {
            if let Ok(i) = self.offsets.binary_search(&page) {
                self.written[i] = self.written[i].saturating_add(1);
            }
        }
    }

    /// Wire bytes per page byte of the written pages sent as deltas, as the engine's cache
    /// would send them: a page written in more than one period is one the engine sees hot
    /// and keeps, so it goes as XOR runs against its old version; one written once goes as
    /// its changed blocks. A whole page where no delta fits. None when none was written.
    fn ratio(&self, ram: &ram::GuestRam) -> Result<Option<f64>, MigrationError> {
        let (mut pages, mut bytes) = (0usize, 0usize);
        let (mut now, mut delta) = (vec![0u8; PAGE], Vec::new());
        let key = crate::delta::sketch_key();
        for (i, old) in self.content.chunks_exact(PAGE).enumerate() {
            if self.written[i] == 0 {
                continue;
            }
            ram.read_at(self.offsets[i], &mut now)?;
            pages += 1;
            let fits = if self.written[i] > 1 {
                crate::delta::encode(old, &now, &mut delta)
            } else {
                let was = crate::delta::Sketch::of(old, &key);
                was.encode(&crate::delta::Sketch::of(&now, &key), &now, &mut delta)
            };
            bytes += if fits {
                crate::protocol::DELTA_HEAD_LEN + delta.len()
            } else {
                PAGE
            };
        }
        Ok((pages > 0).then(|| bytes as f64 / (pages * PAGE) as f64))
    }
}

const PAGE: usize = PAGE_SIZE as usize;

/// Logs the guest's writes for `window`, reading (and re-arming) the log every
/// [`FETCH_EVERY`]: the rate per period, and the distinct pages over the window.
fn dirtying(
    dirty: &std::sync::Mutex<dyn migratable::DirtyLog>,
    ram: &ram::GuestRam,
    extents: &[(u64, u64)],
    window: Duration,
) -> Result<Dirtying, MigrationError> {
    {
        let mut d = locks::lock(dirty);
        if d.is_started() {
            return Err(MigrationError::Refused(
                "the dirty log is in use (a migration is under way)".into(),
            ));
        }
        d.start()?;
    }
    // Kept once the log runs: what the guest writes from here on is both logged and new.
    let touched = extents.iter().map(|(s, e)| e - s).sum();
    let mut probe = match DeltaProbe::take(ram, extents, touched) {
        Ok(p) => p,
        Err(e) => {
            locks::lock(dirty).stop()?;
            return Err(e);
        }
    };
    let t = Instant::now();
    let mut union: Vec<Vec<u64>> = Vec::new();
    let mut counted = 0u64;
    let mut half_set = None;
    let result: Result<(), MigrationError> = loop {
        std::thread::sleep(FETCH_EVERY.min(window));
        let mut d = locks::lock(dirty);
        let maps = match d.fetch() {
            Ok(m) => m,
            Err(e) => break Err(e.into()),
        };
        if let Some(e) = maps.iter().find_map(|m| d.clear(m).err()) {
            break Err(e.into());
        }
        drop(d);
        probe.mark(&maps);
        for (i, m) in maps.iter().enumerate() {
            counted += m.count();
            if union.len() <= i {
                union.push(vec![0; m.bits.len()]);
            }
            for (u, w) in union[i].iter_mut().zip(&m.bits) {
                *u |= *w;
            }
        }
        if half_set.is_none() && t.elapsed() >= window / 2 {
            half_set = Some(popcount(&union));
        }
        if t.elapsed() >= window {
            break Ok(());
        }
    };
    let secs = t.elapsed().as_secs_f64();
    locks::lock(dirty).stop()?;
    result?;
    let set = popcount(&union);
    let delta_ratio = probe.ratio(ram)?;
    Ok(Dirtying {
        rate: counted as f64 / secs.max(1e-3),
        set,
        half_set: half_set.unwrap_or(set),
        delta_ratio,
    })
}

fn popcount(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// What the sampled touched pages hold.
struct Content {
    zero_fraction: f64,
    /// As the copy compresses them: batches of contiguous pages.
    compress_ratio: f64,
    /// What the batches packed to against the same pages packed one by one (as the
    /// fingerprint prices them).
    batch_gain: f64,
    copy_delta_ratio: Option<f64>,
}

/// Bytes of the sampled pages: non-zero, packed one by one, in batches, in a copy with deltas.
#[derive(Default)]
struct Tally {
    zero: u64,
    seen: u64,
    raw: usize,
    single: usize,
    batched: usize,
    in_copy: usize,
}

impl Tally {
    /// Counts a run of contiguous pages: each alone, then its non-zero ones as one batch (the
    /// copy batches neighbours, and pages compress better with theirs).
    fn run(&mut self, pages: &[u8], pricer: &mut PagePricer, batch: &mut Vec<u8>) {
        batch.clear();
        for page in pages.chunks_exact(PAGE) {
            self.seen += 1;
            if is_zero(page) {
                self.zero += 1;
            } else if let Some([p, c]) = pricer.costs(page) {
                self.raw += PAGE;
                self.single += p;
                self.in_copy += c;
                batch.extend_from_slice(page);
            }
        }
        if !batch.is_empty() {
            self.batched += pricer
                .pack(batch)
                .map_or(batch.len(), |n| n.min(batch.len()));
        }
    }

    fn content(&self) -> Content {
        let per_byte = |b: usize| {
            if self.raw > 0 {
                b as f64 / self.raw as f64
            } else {
                1.0
            }
        };
        Content {
            zero_fraction: self.zero as f64 / self.seen.max(1) as f64,
            compress_ratio: per_byte(self.batched),
            batch_gain: if self.single > 0 {
                (self.batched as f64 / self.single as f64).min(1.0)
            } else {
                1.0
            },
            copy_delta_ratio: (self.raw > 0).then(|| per_byte(self.in_copy)),
        }
    }
}

/// Reads runs of neighbouring touched pages spread evenly over them: the zero share, and how
/// the rest compresses and goes in a copy with deltas. A run goes on across the gap to the
/// next extent, as the copy's batches do: every touched page is as likely to be read (a run
/// cut at its extent's end would read pages in small extents less often than the rest).
fn content(
    ram: &ram::GuestRam,
    extents: &[(u64, u64)],
    touched: u64,
) -> Result<Content, MigrationError> {
    let step = (touched / PAGE_SIZE / SAMPLE_RUNS).max(1);
    let run = RUN_PAGES.min(step) as usize;
    let (mut tally, mut pricer) = (Tally::default(), PagePricer::new());
    let (mut pages, mut batch) = (vec![0u8; run * PAGE], Vec::new());
    let (mut index, mut filled) = (0u64, 0usize);
    for &(s, e) in extents {
        for off in (s..e).step_by(PAGE) {
            if index % step < run as u64 {
                ram.read_at(off, &mut pages[filled * PAGE..(filled + 1) * PAGE])?;
                filled += 1;
                if filled == run {
                    tally.run(&pages, &mut pricer, &mut batch);
                    filled = 0;
                }
            }
            index += 1;
        }
    }
    if filled > 0 {
        tally.run(&pages[..filled * PAGE], &mut pricer, &mut batch);
    }
    if tally.seen == 0 {
        return Ok(Content {
            zero_fraction: 1.0,
            compress_ratio: 1.0,
            batch_gain: 1.0,
            copy_delta_ratio: None,
        });
    }
    Ok(tally.content())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ram::RamRange;

    fn bitmap(pages: &[u64]) -> DirtyBitmap {
        let mut bits = vec![0u64; 4];
        for p in pages {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        DirtyBitmap {
            region: 0,
            range: RamRange {
                guest: 0,
                len: 256 * PAGE_SIZE,
                file_offset: 0,
            },
            bits,
        }
    }

    #[test]
    fn a_written_page_costs_what_the_engine_sends_of_it() {
        let ram = ram::GuestRam::new(64 << 20).unwrap();
        for p in 0..8 {
            ram.write_at(p * PAGE_SIZE, &[p as u8 + 1; PAGE]).unwrap();
        }
        let mut probe = DeltaProbe::take(&ram, &[(0, 8 * PAGE_SIZE)], 8 * PAGE_SIZE).unwrap();
        assert_eq!(
            probe.offsets,
            (0..8).map(|p| p * PAGE_SIZE).collect::<Vec<_>>()
        );
        // Page 1 gets one new word in two periods (hot: the engine keeps it, XOR runs);
        // page 3 one new word once (its changed block); page 2 all new words; page 5 is
        // written with what it held; page 9 was not probed; the others are not written.
        ram.write_at(PAGE_SIZE + 64, &[0xee; 8]).unwrap();
        ram.write_at(3 * PAGE_SIZE + 64, &[0xee; 8]).unwrap();
        ram.write_at(2 * PAGE_SIZE, &[0x55; PAGE]).unwrap();
        probe.mark(&[bitmap(&[1, 2, 3, 5, 9])]);
        probe.mark(&[bitmap(&[1])]);
        assert_eq!(probe.written, [0, 2, 1, 1, 0, 1, 0, 0]);
        let head = crate::protocol::DELTA_HEAD_LEN;
        let (xor_word, block) = (head + 4 + 8, head + 4 + 256);
        let want = (xor_word + PAGE + block + head) as f64 / (4 * PAGE) as f64;
        let got = probe.ratio(&ram).unwrap().unwrap();
        assert!((got - want).abs() < 1e-9, "{got} against {want}");
    }

    #[test]
    fn the_delta_probe_spreads_over_the_touched_pages() {
        let ram = ram::GuestRam::new(128 << 20).unwrap();
        let pages = 3 * DELTA_PROBE_PAGES;
        let extents = [
            (0, pages / 2 * PAGE_SIZE),
            (pages * PAGE_SIZE, 2 * pages * PAGE_SIZE),
        ];
        let touched = extents.iter().map(|(s, e)| e - s).sum();
        let probe = DeltaProbe::take(&ram, &extents, touched).unwrap();
        let n = probe.offsets.len() as u64;
        assert!(
            n <= DELTA_PROBE_PAGES && n * 5 >= DELTA_PROBE_PAGES * 4,
            "{n}"
        );
        assert!(probe.offsets.windows(2).all(|w| w[0] < w[1]));
        assert!(probe
            .offsets
            .iter()
            .all(|o| extents.iter().any(|(s, e)| s <= o && o < e)));
        // Both extents are probed, in proportion to their size.
        let first = probe
            .offsets
            .iter()
            .filter(|&&o| o < pages * PAGE_SIZE)
            .count() as u64;
        assert!(first * 3 >= n - 3 && first * 3 <= n + 3, "{first} of {n}");
    }

    #[test]
    fn a_sparse_page_costs_its_changed_blocks_in_a_copy_with_deltas() {
        let ram = ram::GuestRam::new(64 << 20).unwrap();
        // Page 0 holds one word, page 1 is full, page 2 stays zero.
        ram.write_at(64, &[7u8; 8]).unwrap();
        ram.write_at(PAGE_SIZE, &[9u8; PAGE]).unwrap();
        let c = content(&ram, &[(0, 3 * PAGE_SIZE)], 3 * PAGE_SIZE).unwrap();
        assert!((c.zero_fraction - 1.0 / 3.0).abs() < 1e-9);
        // One 256-byte block and its run head, against a whole page.
        let sparse = crate::protocol::DELTA_HEAD_LEN + 4 + 256;
        let want = (sparse + PAGE) as f64 / (2 * PAGE) as f64;
        let got = c.copy_delta_ratio.unwrap();
        assert!((got - want).abs() < 1e-9, "{got} against {want}");
        let none = content(&ram, &[(2 * PAGE_SIZE, 3 * PAGE_SIZE)], PAGE_SIZE).unwrap();
        assert_eq!(none.copy_delta_ratio, None);
    }

    /// `pages` pages from 0, each the same random page but for its stamp, or each random.
    fn stamped(ram: &ram::GuestRam, pages: u64, alike: bool) {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut page = vec![0u8; PAGE];
        for p in 0..pages {
            if p == 0 || !alike {
                for w in page.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
            }
            page[..8].copy_from_slice(&(p + 1).to_le_bytes());
            ram.write_at(p * PAGE_SIZE, &page).unwrap();
        }
    }

    #[test]
    fn neighbouring_pages_are_priced_as_the_copy_batches_them() {
        let pages = SAMPLE_RUNS * RUN_PAGES * 2;
        let touched = pages * PAGE_SIZE;
        // Alike neighbours: each page alone does not compress, a run of them packs to
        // about one page.
        let ram = ram::GuestRam::new(64 << 20).unwrap();
        stamped(&ram, pages, true);
        let c = content(&ram, &[(0, touched)], touched).unwrap();
        assert_eq!(c.zero_fraction, 0.0);
        let run = 1.0 / RUN_PAGES as f64;
        assert!(c.compress_ratio < 1.5 * run, "{}", c.compress_ratio);
        assert!(c.batch_gain < 1.5 * run, "{}", c.batch_gain);
        // Random neighbours gain nothing from each other.
        let ram = ram::GuestRam::new(64 << 20).unwrap();
        stamped(&ram, pages, false);
        let c = content(&ram, &[(0, touched)], touched).unwrap();
        assert!(c.compress_ratio > 0.99, "{}", c.compress_ratio);
        assert!(c.batch_gain > 0.99, "{}", c.batch_gain);
    }

    #[test]
    fn pages_in_small_extents_are_read_as_often_as_the_rest() {
        // Half the touched pages are random in one extent, half are sparse, each an extent
        // of its own: a sample of both halves alike costs half a page and a block per page.
        let half = SAMPLE_RUNS * RUN_PAGES;
        let ram = ram::GuestRam::new(64 << 20).unwrap();
        stamped(&ram, half, false);
        let mut extents = vec![(0, half * PAGE_SIZE)];
        for k in 0..half {
            let at = (half + 2 * k) * PAGE_SIZE;
            ram.write_at(at, &(k + 1).to_le_bytes()).unwrap();
            extents.push((at, at + PAGE_SIZE));
        }
        let c = content(&ram, &extents, 2 * half * PAGE_SIZE).unwrap();
        let block = (crate::protocol::DELTA_HEAD_LEN + 4 + 256) as f64 / PAGE as f64;
        let want = (1.0 + block) / 2.0;
        let got = c.copy_delta_ratio.unwrap();
        assert!((got - want).abs() < 0.05, "{got} against {want}");
    }

    #[test]
    fn a_fingerprint_page_is_priced_at_what_its_batch_gains() {
        let costs = batched(vec![[4000, 4096], [100, 300]], 0.5);
        assert_eq!(costs, [[2000, 4096], [50, 300]]);
        assert_eq!(batched(vec![[4000, 4096]], 2.0), [[4000, 4096]]);
    }

    #[test]
    fn every_fingerprint_page_comes_with_what_it_costs() {
        let ram = ram::GuestRam::new(64 << 20).unwrap();
        let pages = 4096u64;
        // Even pages are sparse (a stamp and a word in their first block), odd ones random.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut sparse = std::collections::HashSet::new();
        let mut page = vec![0u8; PAGE];
        for p in 0..pages {
            page.fill(0);
            page[..8].copy_from_slice(&(p + 1).to_le_bytes());
            if p % 2 == 0 {
                page[64..72].copy_from_slice(&[7; 8]);
                sparse.insert(xxhash_rust::xxh3::xxh3_64(&page));
            } else {
                for w in page.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
            }
            ram.write_at(p * PAGE_SIZE, &page).unwrap();
        }
        let (keys, costs) = content_keys(&ram, &[(0, pages * PAGE_SIZE)]).unwrap();
        assert_eq!(keys.len(), costs.len());
        let expected = pages / FINGERPRINT_RATE;
        assert!(
            keys.len() as u64 >= expected / 2 && keys.len() as u64 <= expected * 2,
            "{} keys for {pages} pages",
            keys.len()
        );
        let block = (crate::protocol::DELTA_HEAD_LEN + 4 + 256) as u16;
        for (k, [packed, in_copy]) in keys.iter().zip(&costs) {
            if sparse.contains(k) {
                assert_eq!(*in_copy, block, "a sparse page goes as its one block");
                assert!(*packed < 256, "and compresses well: {packed}");
            } else {
                assert_eq!(*in_copy, PAGE as u16, "a random page goes whole");
                assert!(*packed > 4000, "and does not compress: {packed}");
            }
        }
        assert!(keys.iter().any(|k| sparse.contains(k)));
        assert!(keys.iter().any(|k| !sparse.contains(k)));
    }

    #[test]
    fn nothing_written_says_nothing() {
        let ram = ram::GuestRam::new(64 << 20).unwrap();
        let mut probe = DeltaProbe::take(&ram, &[(0, 8 * PAGE_SIZE)], 8 * PAGE_SIZE).unwrap();
        probe.mark(&[bitmap(&[10])]);
        assert_eq!(probe.ratio(&ram).unwrap(), None);
        let none = DeltaProbe::take(&ram, &[], 0).unwrap();
        assert_eq!(none.ratio(&ram).unwrap(), None);
    }
}
