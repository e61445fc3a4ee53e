//! Memory profiles: realistic guest RAM content before boot, deterministic from a seed on a
//! given host, so compression and zero-page results mean something. The VMM knows nothing of
//! them: it offers a pre-fill hook, and whoever boots a VM for a benchmark fills RAM from here
//! (and writes the same bytes as files for another VMM, [`ProfileFiller::write_blobs`]).
//!
//! `server` mixes ~35% zero pages, ~30% machine code sampled from ELF files under /usr/lib,
//! ~20% text sampled from /usr/share and ~15% random (incompressible) pages. Classes are chosen
//! per 64 KiB extent, as real memory has runs of similar pages. Every non-zero page is stamped
//! with its identity (8 bytes), so sampling from small pools repeats no page: a VM's non-zero
//! pages are unique, as Barker et al. (ATC'12) found real memory to be once zero pages are left
//! out.
//!
//! An OS image ([`OsImage`]) makes VMs share like clones of one template: every VM started
//! with the same image seed holds the same OS part (a share of its RAM, default
//! [`DEFAULT_IMAGE_SHARE_PCT`]%), the same content at addresses of its own (an affine
//! permutation of its extents, keyed by the VM's seed). VMs of different images share only zero
//! pages. The OS part has the non-zero mix of the rest (code, text, and already-compressed
//! files), and the zero share of the whole stays ~35%.
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rand::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

const PAGE_SIZE: u64 = 4096;
const PAGE: usize = PAGE_SIZE as usize;
const EXTENT_PAGES: u64 = 16;
const EXTENT_BYTES: u64 = EXTENT_PAGES * PAGE_SIZE;
const CODE_POOL_BYTES: usize = 48 << 20;
const TEXT_POOL_BYTES: usize = 16 << 20;
const MAX_BYTES_PER_FILE: u64 = 2 << 20;
/// Percent of RAM that is zero pages in `server` memory.
const ZERO_PCT: f64 = 35.0;

/// The OS part's default share of RAM. VMware measures that "many nearly identical virtual
/// machines might free up more than thirty percent of memory" with page sharing (TPS); N clones
/// sharing a fraction s free s(N-1)/N, so >30% over 4-10 VMs means s of 35-40%. Difference
/// Engine's "up to 90%" for homogeneous VMs counts sub-page patches too, and Barker et al.'s
/// "under 15% excluding zero pages" is for mixed desktops, which here are VMs of different
/// images (they share nothing but zero pages).
pub const DEFAULT_IMAGE_SHARE_PCT: u8 = 35;
/// At most the non-zero part of `server` memory.
pub const MAX_IMAGE_SHARE_PCT: u8 = 65;

/// The OS image a VM was cloned from: `seed` names the image, `share_pct` is the percent of
/// RAM its OS part takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OsImage {
    pub seed: u64,
    pub share_pct: u8,
}

/// Where [`ProfileFiller::fill_with`] puts a run of non-zero pages: (offset from the base, bytes).
pub type PageSink<'a, E> = dyn Fn(u64, &[u8]) -> Result<(), E> + Sync + 'a;

/// One piece of a RAM image written by [`ProfileFiller::write_blobs`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct Blob {
    pub path: PathBuf,
    pub guest_addr: u64,
    pub len: u64,
    pub stats: FillStats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryProfile {
    Server,
    Zero,
    Random,
    Text,
}

impl std::str::FromStr for MemoryProfile {
    type Err = ProfileError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "server" => Ok(Self::Server),
            "zero" => Ok(Self::Zero),
            "random" => Ok(Self::Random),
            "text" => Ok(Self::Text),
            other => Err(ProfileError::Unknown(other.to_string())),
        }
    }
}

impl std::fmt::Display for MemoryProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Server => "server",
            Self::Zero => "zero",
            Self::Random => "random",
            Self::Text => "text",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("unknown memory profile {0:?} (expected server, zero, random or text)")]
    Unknown(String),
    #[error("no {what} found under {dir} to sample memory content from")]
    EmptyPool { what: &'static str, dir: String },
    #[error("an OS image takes {0}% of RAM; at most {MAX_IMAGE_SHARE_PCT}% is not zero pages")]
    ImageShare(u8),
    #[error("an OS image needs the server memory profile, not {0}")]
    ImageProfile(MemoryProfile),
    #[error("writing memory image {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageClass {
    Zero,
    Code,
    Text,
    Random,
}

/// Page counts per class after a fill.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FillStats {
    pub zero: u64,
    pub code: u64,
    pub text: u64,
    pub random: u64,
}

impl FillStats {
    fn add(&mut self, c: PageClass) {
        match c {
            PageClass::Zero => self.zero += 1,
            PageClass::Code => self.code += 1,
            PageClass::Text => self.text += 1,
            PageClass::Random => self.random += 1,
        }
    }
    fn merge(&mut self, o: FillStats) {
        self.zero += o.zero;
        self.code += o.code;
        self.text += o.text;
        self.random += o.random;
    }
}

/// The class of a `server` extent: zero pages take `zero` of the `of` units its origin stands
/// for, and code, text and random split the rest 30:20:15.
fn server_class(o: Origin) -> PageClass {
    let u = (mix64(o.key ^ mix64(o.extent ^ 0x5e7e)) >> 11) as f64 / (1u64 << 53) as f64;
    let x = u * o.of;
    if x < o.zero {
        return PageClass::Zero;
    }
    let y = (x - o.zero) / (o.of - o.zero) * 65.0;
    match y {
        y if y < 30.0 => PageClass::Code,
        y if y < 50.0 => PageClass::Text,
        _ => PageClass::Random,
    }
}

struct Pools {
    code: Vec<u8>,
    text: Vec<u8>,
}

fn looks_like_text(head: &[u8]) -> bool {
    !head.is_empty()
        && head
            .iter()
            .filter(|&&b| b == b'\n' || b == b'\t' || (0x20..0x7f).contains(&b))
            .count()
            * 100
            >= head.len() * 97
}

/// Concatenates sampled files from `dir` (sorted walk, so stable on one host) up to `limit`.
fn build_pool(dir: &Path, limit: usize, min_size: u64, accept: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut pool = Vec::with_capacity(limit);
    let walk = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file());
    for e in walk {
        if pool.len() >= limit {
            break;
        }
        let Ok(meta) = e.metadata() else { continue };
        if meta.len() < min_size {
            continue;
        }
        let Ok(mut f) = std::fs::File::open(e.path()) else {
            continue;
        };
        let mut head = [0u8; 512];
        let Ok(n) = f.read(&mut head) else { continue };
        if !accept(&head[..n]) || f.seek(SeekFrom::Start(0)).is_err() {
            continue;
        }
        let take = meta
            .len()
            .min(MAX_BYTES_PER_FILE)
            .min((limit - pool.len()) as u64);
        let start = pool.len();
        if f.take(take).read_to_end(&mut pool).is_err() {
            pool.truncate(start);
        }
    }
    // Whole pages only, so a sampled page never straddles the pool's end.
    pool.truncate(pool.len() / PAGE * PAGE);
    pool
}

fn pools() -> Result<&'static Pools, ProfileError> {
    static POOLS: OnceLock<Pools> = OnceLock::new();
    if let Some(p) = POOLS.get() {
        return Ok(p);
    }
    let code = build_pool(Path::new("/usr/lib"), CODE_POOL_BYTES, 64 << 10, |h| {
        h.starts_with(b"\x7fELF")
    });
    if code.is_empty() {
        return Err(ProfileError::EmptyPool {
            what: "ELF files",
            dir: "/usr/lib".into(),
        });
    }
    let text = build_pool(
        Path::new("/usr/share"),
        TEXT_POOL_BYTES,
        8 << 10,
        looks_like_text,
    );
    if text.is_empty() {
        return Err(ProfileError::EmptyPool {
            what: "text files",
            dir: "/usr/share".into(),
        });
    }
    Ok(POOLS.get_or_init(|| Pools { code, text }))
}

fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^ (x >> 33)
}

impl OsImage {
    /// The `livemig run` arguments that give a VM this image.
    pub fn run_args(&self) -> [String; 4] {
        [
            "--image".into(),
            self.seed.to_string(),
            "--image-share".into(),
            self.share_pct.to_string(),
        ]
    }
}

/// What one VM's RAM holds before boot: a profile, the VM's own seed, and the OS image it
/// was cloned from, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Content {
    pub profile: MemoryProfile,
    pub seed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<OsImage>,
}

impl Content {
    /// The filler for a VM whose RAM is `ram` (guest-physical start and length of each range)
    /// and whose workload writes the bottom `written` bytes of it (see
    /// [`ProfileFiller::with_image`]).
    pub fn filler(&self, ram: &[(u64, u64)], written: u64) -> Result<ProfileFiller, ProfileError> {
        let f = ProfileFiller::new(self.profile, self.seed)?;
        match self.image {
            Some(image) => f.with_image(image, ram, written),
            None => Ok(f),
        }
    }
}

/// Where the OS part sits in one VM: its RAM as dense extents (`ranges`: guest-physical start,
/// length, first dense extent). The OS part lies at and above dense extent `floor`, of which
/// extent `floor + e` holds image extent `(a*e + b) mod (extents - floor)` when that is below
/// `os_extents`.
#[derive(Clone, Debug)]
struct ImageLayout {
    seed: u64,
    share_pct: f64,
    ranges: Vec<(u64, u64, u64)>,
    floor: u64,
    extents: u64,
    os_extents: u64,
    a: u64,
    b: u64,
}

impl ImageLayout {
    /// The layout for a VM of RAM `ram` whose workload writes its bottom `written` bytes:
    /// the OS part goes above them, as far as RAM leaves room for it.
    fn new(image: OsImage, vm_seed: u64, ram: &[(u64, u64)], written: u64) -> Self {
        let mut ranges = Vec::with_capacity(ram.len());
        let mut extents = 0;
        for &(start, len) in ram {
            ranges.push((start, len, extents));
            extents += len / EXTENT_BYTES;
        }
        let extents = extents.max(1);
        let os_extents = extents * u64::from(image.share_pct) / 100;
        let floor = written
            .div_ceil(EXTENT_BYTES)
            .min(extents - os_extents.max(1));
        let span = extents - floor;
        let mut a = (mix64(vm_seed ^ 0xa11e) % span) | 1;
        while gcd(a, span) != 1 {
            a += 2;
        }
        ImageLayout {
            seed: mix64(image.seed ^ 0x05_1a6e),
            share_pct: f64::from(image.share_pct),
            os_extents,
            b: mix64(vm_seed ^ 0xb0ff) % span,
            ranges,
            floor,
            extents,
            a,
        }
    }

    /// The image extent at guest page `page`, if it is part of the OS.
    fn image_extent(&self, page: u64) -> Option<u64> {
        let addr = page * PAGE_SIZE;
        let &(start, _, dense) = self
            .ranges
            .iter()
            .find(|&&(start, len, _)| (start..start + len).contains(&addr))?;
        let e = (dense + (addr - start) / EXTENT_BYTES).checked_sub(self.floor)?;
        let j = ((u128::from(self.a) * u128::from(e) + u128::from(self.b))
            % u128::from(self.extents - self.floor)) as u64;
        (j < self.os_extents).then_some(j)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Whose content an extent holds: a key (the VM's seed, or the image's), the extent's number
/// under that key, and the percent of RAM that is zero among such extents' neighbours.
#[derive(Clone, Copy)]
struct Origin {
    key: u64,
    extent: u64,
    /// Of 100 units of RAM the origin's extents stand for, how many are zero pages.
    zero: f64,
    /// The units they stand for in all (100 for a VM without image).
    of: f64,
}

/// Fills guest pages with a profile's content.
pub struct ProfileFiller {
    profile: MemoryProfile,
    seed: u64,
    pools: Option<&'static Pools>,
    image: Option<ImageLayout>,
}

impl ProfileFiller {
    pub fn new(profile: MemoryProfile, seed: u64) -> Result<Self, ProfileError> {
        let pools = match profile {
            MemoryProfile::Server | MemoryProfile::Text => Some(pools()?),
            MemoryProfile::Zero | MemoryProfile::Random => None,
        };
        Ok(ProfileFiller {
            profile,
            seed,
            pools,
            image: None,
        })
    }

    /// Gives the VM whose RAM is `ram` (guest-physical start and length of each range) the OS
    /// part of `image`, laid out above the bottom `written` bytes of RAM (not counting holes)
    /// where RAM leaves room: the workload writes there, and an OS part is kernel and library
    /// code and files that no program writes (a workload writing over it would be rewriting
    /// its kernel). Where the room is short, the rest of the OS part goes below.
    pub fn with_image(
        mut self,
        image: OsImage,
        ram: &[(u64, u64)],
        written: u64,
    ) -> Result<Self, ProfileError> {
        if self.profile != MemoryProfile::Server {
            return Err(ProfileError::ImageProfile(self.profile));
        }
        if image.share_pct > MAX_IMAGE_SHARE_PCT {
            return Err(ProfileError::ImageShare(image.share_pct));
        }
        self.image = Some(ImageLayout::new(image, self.seed, ram, written));
        Ok(self)
    }

    /// Whose content the extent of page `page` holds.
    fn origin(&self, page: u64) -> Origin {
        let own = |share: f64| Origin {
            key: self.seed,
            extent: page / EXTENT_PAGES,
            zero: ZERO_PCT,
            of: 100.0 - share,
        };
        match &self.image {
            None => own(0.0),
            Some(img) => match img.image_extent(page) {
                Some(j) => Origin {
                    key: img.seed,
                    extent: j,
                    zero: 0.0,
                    of: img.share_pct,
                },
                None => own(img.share_pct),
            },
        }
    }

    /// What the page with this index (counted from guest-physical 0) holds.
    pub fn class(&self, page: u64) -> PageClass {
        match self.profile {
            MemoryProfile::Zero => PageClass::Zero,
            MemoryProfile::Random => PageClass::Random,
            MemoryProfile::Text => PageClass::Text,
            MemoryProfile::Server => server_class(self.origin(page)),
        }
    }

    /// Writes page `page` into `out` (4 KiB); zero pages are left untouched, so callers pass
    /// zeroed memory and untouched RAM stays unbacked.
    pub fn fill_page(&self, page: u64, out: &mut [u8]) -> PageClass {
        let class = self.class(page);
        let o = match self.profile {
            MemoryProfile::Server => self.origin(page),
            _ => Origin {
                key: self.seed,
                extent: page / EXTENT_PAGES,
                zero: 0.0,
                of: 100.0,
            },
        };
        // The page's identity under its origin: the same in every VM of one image.
        let id = mix64(
            o.key
                ^ (o.extent * EXTENT_PAGES + page % EXTENT_PAGES).wrapping_mul(0x9e3779b97f4a7c15),
        );
        // An extent holds consecutive pages of one file region, as a mapped library or file
        // does in real memory (and as compressors see it).
        let region = mix64(o.key ^ o.extent.wrapping_mul(0x9e3779b97f4a7c15));
        let sample = |pool: &[u8], out: &mut [u8]| {
            let pages = (pool.len() / PAGE) as u64;
            let start = region % pages.saturating_sub(EXTENT_PAGES).max(1);
            let off = ((start + page % EXTENT_PAGES) % pages) as usize * PAGE;
            out.copy_from_slice(&pool[off..off + PAGE]);
            out[..8].copy_from_slice(&id.to_le_bytes());
        };
        match (class, self.pools) {
            (PageClass::Zero, _) => {}
            (PageClass::Code, Some(p)) => sample(&p.code, out),
            (PageClass::Text, Some(p)) => sample(&p.text, out),
            (PageClass::Random, _) | (_, None) => {
                Xoshiro256PlusPlus::seed_from_u64(id).fill_bytes(out)
            }
        }
        class
    }

    /// Produces the content of guest-physical `[guest_base, guest_base + len)` on all cores and
    /// hands each run of non-zero pages to `sink(offset from guest_base, bytes)`; zero pages are
    /// never handed over, so untouched RAM stays unbacked. `len` is a multiple of a page.
    pub fn fill_with<E: Send>(
        &self,
        guest_base: u64,
        len: u64,
        sink: &PageSink<'_, E>,
    ) -> Result<FillStats, E> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let extent = EXTENT_PAGES * PAGE_SIZE;
        let per_thread = len.div_ceil(threads).div_ceil(extent).max(1) * extent;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|i| i * per_thread)
                .filter(|&start| start < len)
                .map(|start| {
                    let end = (start + per_thread).min(len);
                    s.spawn(move || self.fill_part(guest_base, start, end, sink))
                })
                .collect();
            let mut total = FillStats::default();
            for h in handles {
                match h.join() {
                    Ok(st) => total.merge(st?),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            Ok(total)
        })
    }

    /// One thread's share of [`Self::fill_with`]: `[start, end)` from `guest_base`, an extent
    /// at a time.
    fn fill_part<E>(
        &self,
        guest_base: u64,
        start: u64,
        end: u64,
        sink: &PageSink<'_, E>,
    ) -> Result<FillStats, E> {
        let mut st = FillStats::default();
        let mut buf = vec![0u8; (EXTENT_PAGES * PAGE_SIZE) as usize];
        let mut off = start;
        while off < end {
            let n = (end - off).min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            let mut zero = [true; EXTENT_PAGES as usize];
            for (j, page) in buf[..n].chunks_exact_mut(PAGE).enumerate() {
                let class = self.fill_page((guest_base + off) / PAGE_SIZE + j as u64, page);
                st.add(class);
                zero[j] = class == PageClass::Zero;
            }
            // Runs of non-zero pages go to the sink in one piece each.
            let pages = n / PAGE;
            let mut j = 0;
            while j < pages {
                if zero[j] {
                    j += 1;
                    continue;
                }
                let r = j;
                while j < pages && !zero[j] {
                    j += 1;
                }
                sink(off + (r * PAGE) as u64, &buf[r * PAGE..j * PAGE])?;
            }
            off += n as u64;
        }
        Ok(st)
    }

    /// Writes the bytes of guest-physical `[guest_base, guest_base + len)` to a sparse file.
    pub fn write_image(
        &self,
        guest_base: u64,
        len: u64,
        path: &Path,
    ) -> Result<FillStats, ProfileError> {
        let err = |source| ProfileError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::create(path).map_err(err)?;
        let mut st = FillStats::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            let part = &mut buf[..n];
            let mut any = false;
            for (j, page) in part.chunks_exact_mut(PAGE).enumerate() {
                let c = self.fill_page((guest_base + off) / PAGE_SIZE + j as u64, page);
                any |= c != PageClass::Zero;
                st.add(c);
            }
            if any {
                f.seek(SeekFrom::Start(off)).map_err(err)?;
                f.write_all(part).map_err(err)?;
            }
            off += n as u64;
        }
        f.set_len(len).map_err(err)?;
        Ok(st)
    }

    /// Writes a VM's RAM, as a VMM lays it out in guest-physical space (`ranges`: start and
    /// length of each RAM range), into `dir` as blobs of at most `max_blob` bytes, leaving out
    /// everything below `from` (where firmware and kernel go). Another VMM loads them at their
    /// addresses to start from the same memory (QEMU: `-device loader,file=...,addr=...`, which
    /// reads a blob in one read(), so blobs must stay under 2 GiB).
    pub fn write_blobs(
        &self,
        ranges: &[(u64, u64)],
        from: u64,
        max_blob: u64,
        dir: &Path,
    ) -> Result<Vec<Blob>, ProfileError> {
        let max_blob = max_blob.max(PAGE_SIZE) / PAGE_SIZE * PAGE_SIZE;
        let mut blobs = Vec::new();
        for &(start, len) in ranges {
            let mut addr = start.max(from.div_ceil(PAGE_SIZE) * PAGE_SIZE);
            let end = start + len;
            while addr < end {
                let len = (end - addr).min(max_blob);
                let path = dir.join(format!("ram-{addr:#011x}.raw"));
                let stats = self.write_image(addr, len, &path)?;
                blobs.push(Blob {
                    path,
                    guest_addr: addr,
                    len,
                    stats,
                });
                addr += len;
            }
        }
        Ok(blobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill_at(profile: MemoryProfile, seed: u64, base: u64, len: usize) -> (Vec<u8>, FillStats) {
        let mem = std::sync::Mutex::new(vec![0u8; len]);
        let st = ProfileFiller::new(profile, seed)
            .unwrap()
            .fill_with(base, len as u64, &|off, bytes| {
                let off = off as usize;
                mem.lock().unwrap()[off..off + bytes.len()].copy_from_slice(bytes);
                Ok::<(), ()>(())
            })
            .unwrap();
        (mem.into_inner().unwrap(), st)
    }

    fn fill(profile: MemoryProfile, seed: u64) -> (Vec<u8>, FillStats) {
        fill_at(profile, seed, 0, 8 << 20)
    }

    #[test]
    fn same_seed_same_bytes() {
        for p in [
            MemoryProfile::Server,
            MemoryProfile::Random,
            MemoryProfile::Text,
        ] {
            let (a, sa) = fill(p, 7);
            let (b, sb) = fill(p, 7);
            assert_eq!(sa, sb);
            assert!(a == b, "{p} is not deterministic");
        }
    }

    #[test]
    fn other_seed_other_bytes() {
        assert!(fill(MemoryProfile::Server, 1).0 != fill(MemoryProfile::Server, 2).0);
    }

    #[test]
    fn server_mix_is_close_to_the_brief() {
        let (mem, st) = fill(MemoryProfile::Server, 3);
        let pages = (mem.len() / PAGE) as f64;
        let pct = |n: u64| n as f64 * 100.0 / pages;
        assert!((25.0..45.0).contains(&pct(st.zero)), "{st:?}");
        assert!((20.0..40.0).contains(&pct(st.code)), "{st:?}");
        assert!((12.0..28.0).contains(&pct(st.text)), "{st:?}");
        assert!((8.0..22.0).contains(&pct(st.random)), "{st:?}");
        let zero_pages = mem
            .chunks(PAGE)
            .filter(|p| p.iter().all(|&b| b == 0))
            .count() as u64;
        assert!(zero_pages >= st.zero);
    }

    #[test]
    fn zero_profile_writes_nothing() {
        let (mem, st) = fill(MemoryProfile::Zero, 1);
        assert!(mem.iter().all(|&b| b == 0));
        assert_eq!(st.zero, (mem.len() / PAGE) as u64);
    }

    #[test]
    fn image_file_matches_fill() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem.raw");
        let f = ProfileFiller::new(MemoryProfile::Server, 11).unwrap();
        f.write_image(4 << 30, 4 << 20, &path).unwrap();
        let (mem, _) = fill_at(MemoryProfile::Server, 11, 4 << 30, 4 << 20);
        assert!(std::fs::read(&path).unwrap() == mem);
    }

    #[test]
    fn blobs_follow_the_guest_physical_layout() {
        let dir = tempfile::tempdir().unwrap();
        let f = ProfileFiller::new(MemoryProfile::Zero, 1).unwrap();
        // Sparse files: 5 GiB of zero profile costs nothing.
        // The VMM's layout of 5 GiB: 3 GiB low, the rest above 4 GiB.
        let ranges = [(0, 3 << 30), (4 << 30, 2 << 30)];
        let blobs = f
            .write_blobs(&ranges, 2 << 20, 1 << 30, dir.path())
            .unwrap();
        let spans: Vec<(u64, u64)> = blobs.iter().map(|b| (b.guest_addr, b.len)).collect();
        assert_eq!(
            spans,
            vec![
                (2 << 20, 1 << 30),
                ((1 << 30) + (2 << 20), 1 << 30),
                ((2 << 30) + (2 << 20), (1 << 30) - (2 << 20)),
                (4 << 30, 1 << 30),
                (5 << 30, 1 << 30),
            ]
        );
        for b in &blobs {
            assert_eq!(std::fs::metadata(&b.path).unwrap().len(), b.len);
        }
    }

    /// The non-zero pages of `mem` by content, with their offsets.
    fn contents(mem: &[u8]) -> std::collections::HashMap<&[u8], Vec<usize>> {
        let mut m = std::collections::HashMap::<&[u8], Vec<usize>>::new();
        for (i, p) in mem.chunks(PAGE).enumerate() {
            if p.iter().any(|&b| b != 0) {
                m.entry(p).or_default().push(i * PAGE);
            }
        }
        m
    }

    fn fill_image(seed: u64, image: u64, share_pct: u8) -> Vec<u8> {
        fill_image_above(seed, image, share_pct, 0)
    }

    fn fill_image_above(seed: u64, image: u64, share_pct: u8, written: u64) -> Vec<u8> {
        let len = 16usize << 20;
        let mem = std::sync::Mutex::new(vec![0u8; len]);
        ProfileFiller::new(MemoryProfile::Server, seed)
            .unwrap()
            .with_image(
                OsImage {
                    seed: image,
                    share_pct,
                },
                &[(0, len as u64)],
                written,
            )
            .unwrap()
            .fill_with(0, len as u64, &|off, bytes| {
                let off = off as usize;
                mem.lock().unwrap()[off..off + bytes.len()].copy_from_slice(bytes);
                Ok::<(), ()>(())
            })
            .unwrap();
        mem.into_inner().unwrap()
    }

    #[test]
    fn non_zero_pages_are_unique_within_a_vm() {
        let (mem, st) = fill_at(MemoryProfile::Server, 5, 0, 64 << 20);
        let c = contents(&mem);
        assert_eq!(c.len() as u64, st.code + st.text + st.random);
        let mem = fill_image(5, 9, DEFAULT_IMAGE_SHARE_PCT);
        assert!(contents(&mem).values().all(|at| at.len() == 1));
    }

    #[test]
    fn vms_of_one_image_share_its_os_part_at_addresses_of_their_own() {
        let (a, b) = (fill_image(1, 7, 35), fill_image(2, 7, 35));
        let (ca, cb) = (contents(&a), contents(&b));
        let shared: Vec<_> = ca.iter().filter(|(p, _)| cb.contains_key(*p)).collect();
        let pages = (a.len() / PAGE) as f64;
        let pct = shared.len() as f64 * 100.0 / pages;
        assert!((30.0..40.0).contains(&pct), "{pct:.1}% of RAM shared");
        let same_place = shared.iter().filter(|(p, at)| cb[*p] == **at).count();
        assert!(
            same_place * 20 < shared.len(),
            "{same_place} of {}",
            shared.len()
        );
        let zero = a.chunks(PAGE).filter(|p| p.iter().all(|&b| b == 0)).count();
        let zero_pct = zero as f64 * 100.0 / pages;
        assert!((30.0..40.0).contains(&zero_pct), "{zero_pct:.1}% zero");
    }

    /// The OS part keeps out of what the workload writes, and keeps its share.
    #[test]
    fn the_os_part_lies_above_the_workloads_memory() {
        let half = 8 << 20;
        let (a, b) = (fill_image_above(1, 7, 35, half), fill_image(2, 7, 35));
        let (ca, cb) = (contents(&a), contents(&b));
        let shared: Vec<usize> = ca
            .iter()
            .filter(|(p, _)| cb.contains_key(*p))
            .flat_map(|(_, at)| at.iter().copied())
            .collect();
        let pct = shared.len() as f64 * 100.0 / (a.len() / PAGE) as f64;
        assert!((30.0..40.0).contains(&pct), "{pct:.1}% of RAM shared");
        assert!(shared.iter().all(|&at| at >= half as usize));
        // Where the room above is short, the OS part takes what there is and goes below.
        let most = fill_image_above(1, 7, 35, 15 << 20);
        let c = contents(&most);
        let low = cb
            .keys()
            .filter_map(|p| c.get(p))
            .flatten()
            .filter(|&&at| at < 15 << 20)
            .count();
        assert!(low > 0);
    }

    #[test]
    fn vms_of_different_images_share_only_zero_pages() {
        let (ca, cb) = (fill_image(1, 7, 35), fill_image(2, 8, 35));
        let (ca, cb) = (contents(&ca), contents(&cb));
        assert_eq!(ca.keys().filter(|p| cb.contains_key(*p)).count(), 0);
    }

    #[test]
    fn an_image_needs_server_memory_and_a_share_that_fits() {
        let img = |share_pct| OsImage { seed: 1, share_pct };
        let f = || ProfileFiller::new(MemoryProfile::Server, 1).unwrap();
        assert!(f().with_image(img(66), &[(0, 1 << 20)], 0).is_err());
        assert!(f().with_image(img(65), &[(0, 1 << 20)], 1 << 20).is_ok());
        let z = ProfileFiller::new(MemoryProfile::Zero, 1).unwrap();
        assert!(z.with_image(img(35), &[(0, 1 << 20)], 0).is_err());
    }

    #[test]
    fn unknown_profile_is_refused() {
        assert!("sparse".parse::<MemoryProfile>().is_err());
    }
}
