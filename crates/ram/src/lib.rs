//! Guest RAM: one memfd, mapped shared with MAP_NORESERVE so untouched RAM costs nothing, split
//! around the 32-bit MMIO hole (LAPIC/IOAPIC live below 4 GiB).
//!
//! Running vCPUs write this memory at any time, so no safe function here hands out `&[u8]` or
//! `&mut [u8]` over it: reads and writes go through vm-memory's volatile slices or through the
//! memfd (`pread`/`pwrite`, which the kernel does as copies). Migration addresses RAM by its
//! offset in the memfd ("memfd offset"), which is contiguous across the MMIO hole.
pub mod host;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap, MmapRegion,
    VolatileMemory, VolatileSlice,
};

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Guest memory as the VMM's devices write it (virtqueues, DMA): the same memfd mapped once
/// more, with vm-memory's bitmap recording every page written through it, so that a
/// migration's dirty log can merge the device's writes with the guest's.
pub type DmaMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

pub const PAGE_SIZE: u64 = 4096;
/// RAM below this address; the rest goes above 4 GiB.
pub const LOW_RAM_END: u64 = 0xC000_0000;
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Smallest VM we build: the guest kernel, its tables and some working set.
pub const MIN_MEMORY: u64 = 32 << 20;

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MemoryError {
    /// guest memory size {0} bytes is not a multiple of 2 MiB or below 32 MiB
    BadSize(u64),
    /// memfd_create for {size} bytes failed: {source}
    Memfd { size: u64, source: std::io::Error },
    /// mapping {size} bytes of guest RAM at {addr:#x} failed: {source}
    Map {
        addr: u64,
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    /// guest RAM regions rejected by vm-memory: {0}
    Regions(#[from] vm_memory::GuestRegionCollectionError),
    /// fstat on the guest RAM memfd failed: {0}
    Stat(std::io::Error),
    /// memfd range [{offset:#x}, +{len:#x}) is not inside guest RAM of {size:#x} bytes
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// {op} at memfd offset {offset:#x} (+{len:#x}) of guest RAM failed: {source}
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        source: std::io::Error,
    },
}

/// Offsets in `f` that hold data, as sorted [start, end) extents (SEEK_DATA / SEEK_HOLE). On the
/// guest RAM memfd these are the pages the guest or the VMM ever touched. The kernel walks
/// every data page to find the next hole, so a large file is scanned in slices by several
/// threads, their extents joined where they meet.
pub fn data_extents(f: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let parts = u64::try_from(host::cpus().min(MAX_SCAN_THREADS)).unwrap_or(1);
    if parts < 2 || size < PARALLEL_SCAN_FROM {
        return extents_in(fd, 0, size);
    }
    let step = (size / parts).next_multiple_of(PAGE_SIZE);
    let slices: Vec<(u64, u64)> = (0..parts)
        .map(|i| (i * step, ((i + 1) * step).min(size)))
        .filter(|(a, b)| a < b)
        .collect();
    let found = std::thread::scope(|scope| {
        let scans: Vec<_> = slices
            .iter()
            .map(|&(from, to)| scope.spawn(move || extents_in(fd, from, to)))
            .collect();
        scans
            .into_iter()
            .map(|s| {
                s.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a scan thread panicked")))
            })
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    Ok(join_extents(found))
}

/// The data extents of `f` within `[from, to)` (SEEK_DATA/SEEK_HOLE, one thread).
pub fn extents_between(f: &File, from: u64, to: u64) -> std::io::Result<Vec<(u64, u64)>> {
    extents_in(f.as_raw_fd(), from, to)
}

/// Files this large are scanned by several threads.
const PARALLEL_SCAN_FROM: u64 = 256 << 20;
/// Threads for one scan, at most.
const MAX_SCAN_THREADS: usize = 8;

/// The data extents of `fd` within [from, to).
fn extents_in(fd: libc::c_int, from: u64, to: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        let Some(start) = seek(fd, pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= to {
            break;
        }
        let end = seek(fd, start, libc::SEEK_HOLE)?.unwrap_or(to).min(to);
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// Extents of consecutive slices as one sorted list; an extent cut at a slice's edge is whole
/// again.
fn join_extents(slices: Vec<Vec<(u64, u64)>>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in slices.into_iter().flatten() {
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// One lseek(2); None where SEEK_DATA finds no data past `pos` (ENXIO).
fn seek(fd: libc::c_int, pos: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let pos = libc::off_t::try_from(pos).map_err(std::io::Error::other)?;
    // SAFETY: lseek on an fd the caller keeps open; it touches no memory of ours.
    let r = unsafe { libc::lseek(fd, pos, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(u64::try_from(r).ok())
}

/// Whether `b` is all zero bytes (a page, mostly): 16 bytes at a time.
pub fn is_zero(b: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns, and align_to only reinterprets the aligned
    // middle of a slice we hold a shared borrow of.
    let (pre, words, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&x| x == 0)
}

/// One contiguous piece of guest RAM: guest-physical start, length, offset in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub guest: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Where `size` bytes of RAM go in guest-physical space.
pub fn layout(size: u64) -> Vec<RamRange> {
    let low = size.min(LOW_RAM_END);
    let mut v = vec![RamRange {
        guest: 0,
        len: low,
        file_offset: 0,
    }];
    if size > low {
        v.push(RamRange {
            guest: HIGH_RAM_START,
            len: size - low,
            file_offset: low,
        });
    }
    v
}

/// A RAM range and the host address of its mapping, for KVM memory slots. The address is only
/// a number here; whoever hands it to KVM must keep the mapping alive as long as the slot.
#[derive(Clone, Copy, Debug)]
pub struct HostRegion {
    pub range: RamRange,
    pub host_addr: u64,
}

/// Guest RAM plus the memfd behind it.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
    file: std::sync::Arc<File>,
    /// The devices' view, made on first use.
    dma: std::sync::OnceLock<DmaMemory>,
}

impl GuestRam {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < MIN_MEMORY || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(size));
        }
        let file = std::sync::Arc::new(memfd(c"livemig-guest-ram", size)?);
        let mem = map(&file, size)?;
        Ok(GuestRam {
            mem,
            size,
            file,
            dma: std::sync::OnceLock::new(),
        })
    }

    /// The devices' view of guest RAM: what they write through it is in its regions'
    /// bitmaps (one bit a page, regions as [`layout`]), read by a migration's dirty log.
    pub fn dma(&self) -> Result<&DmaMemory, MemoryError> {
        if let Some(d) = self.dma.get() {
            return Ok(d);
        }
        let d = map(&self.file, self.size)?;
        Ok(self.dma.get_or_init(|| d))
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The guest-physical view, for loaders that write through vm-memory's volatile API.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Bytes of guest RAM the host actually backs with pages.
    pub fn resident_bytes(&self) -> Result<u64, MemoryError> {
        let meta = self.file.metadata().map_err(MemoryError::Stat)?;
        Ok(std::os::unix::fs::MetadataExt::blocks(&meta) * 512)
    }

    /// Each RAM range with its mapping's host address, for KVM memory slots.
    pub fn host_regions(&self) -> Vec<HostRegion> {
        layout(self.size)
            .into_iter()
            .zip(self.mem.iter())
            .map(|(range, region)| HostRegion {
                range,
                host_addr: region.as_ptr() as u64,
            })
            .collect()
    }

    /// Every mapping of guest RAM in this process (the guest's view first, then the
    /// devices', made now if it was not yet), each as its ranges with their host addresses:
    /// what must be registered to catch every access to a page (post-copy).
    pub fn views(&self) -> Result<Vec<Vec<HostRegion>>, MemoryError> {
        let dma = self.dma()?;
        let view = |regions: Vec<u64>| {
            layout(self.size)
                .into_iter()
                .zip(regions)
                .map(|(range, host_addr)| HostRegion { range, host_addr })
                .collect()
        };
        Ok(vec![
            view(self.mem.iter().map(|r| r.as_ptr() as u64).collect()),
            view(dma.iter().map(|r| r.as_ptr() as u64).collect()),
        ])
    }

    /// The memfd behind guest RAM, in [`RamRange::file_offset`] order.
    pub fn backing_file(&self) -> &File {
        &self.file
    }

    /// Guest RAM at memfd offset `off`, `len` bytes, as a volatile slice: vCPUs may write it
    /// while it is read. The range must lie within one [`RamRange`].
    pub fn slice_at(&self, off: u64, len: usize) -> Result<VolatileSlice<'_>, MemoryError> {
        let out = || MemoryError::OutOfRange {
            offset: off,
            len: len as u64,
            size: self.size,
        };
        let r = layout(self.size)
            .into_iter()
            .find(|r| off >= r.file_offset && off < r.file_offset + r.len)
            .ok_or_else(out)?;
        let addr = GuestAddress(r.guest + (off - r.file_offset));
        self.mem.get_slice(addr, len).map_err(|_| out())
    }

    /// Copies guest RAM at memfd offset `off` into `buf` (a racy snapshot if the VM runs).
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut done = 0;
        // A read may span the MMIO hole's split; each piece stays inside its range.
        while done < buf.len() {
            let pos = off + done as u64;
            let piece = self.contiguous_len(pos, buf.len() - done)?;
            let n = self
                .slice_at(pos, piece)?
                .copy_to(&mut buf[done..done + piece]);
            done += n;
        }
        Ok(())
    }

    /// Guest RAM from memfd offset `off`, `len` bytes, as volatile slices, one per RAM range it
    /// crosses (a run of consecutive memfd pages may span the MMIO hole's split).
    pub fn slices_at(&self, off: u64, len: usize) -> Result<Vec<VolatileSlice<'_>>, MemoryError> {
        let mut out = Vec::new();
        let mut done = 0;
        while done < len {
            let pos = off + done as u64;
            let piece = self.contiguous_len(pos, len - done)?;
            out.push(self.slice_at(pos, piece)?);
            done += piece;
        }
        Ok(out)
    }

    /// How many of `want` bytes from memfd offset `off` lie in one RAM range.
    fn contiguous_len(&self, off: u64, want: usize) -> Result<usize, MemoryError> {
        layout(self.size)
            .into_iter()
            .find(|r| off >= r.file_offset && off < r.file_offset + r.len)
            .map(|r| (r.file_offset + r.len - off).min(want as u64) as usize)
            .ok_or(MemoryError::OutOfRange {
                offset: off,
                len: want as u64,
                size: self.size,
            })
    }

    /// Whether the page at memfd offset `off` is all zero, read in place with volatile loads
    /// (no copy; most non-zero pages answer at their first word).
    pub fn page_is_zero(&self, off: u64) -> Result<bool, MemoryError> {
        let page = self.slice_at(off, PAGE_SIZE as usize)?;
        let words = page
            .get_array_ref::<u64>(0, PAGE_SIZE as usize / 8)
            .map_err(|_| MemoryError::OutOfRange {
                offset: off,
                len: PAGE_SIZE,
                size: self.size,
            })?;
        Ok((0..words.len()).all(|i| words.load(i) == 0))
    }

    /// Writes `data` at memfd offset `off` through the file, not the mapping: shmem then fills
    /// fresh pages without zeroing them first, which on fresh memory costs more than the copy.
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.check(off, data.len() as u64)?;
        self.file
            .write_all_at(data, off)
            .map_err(|source| MemoryError::Io {
                op: "pwrite",
                offset: off,
                len: data.len() as u64,
                source,
            })
    }

    /// Makes [off, off+len) zero by freeing its pages (never reading or allocating them).
    pub fn zero_range(&self, off: u64, len: u64) -> Result<(), MemoryError> {
        self.check(off, len)?;
        let io = |source| MemoryError::Io {
            op: "fallocate(PUNCH_HOLE)",
            offset: off,
            len,
            source,
        };
        let (o, l) = (
            libc::off_t::try_from(off).map_err(|e| io(std::io::Error::other(e)))?,
            libc::off_t::try_from(len).map_err(|e| io(std::io::Error::other(e)))?,
        );
        // SAFETY: fallocate on our own open memfd touches no memory of this process; the range
        // was checked against the file's size above.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        if rc != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// A range of memfd offsets must lie inside guest RAM.
    fn check(&self, off: u64, len: u64) -> Result<(), MemoryError> {
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MemoryError::OutOfRange {
                offset: off,
                len,
                size: self.size,
            }),
        }
    }

    pub fn last_addr(&self) -> u64 {
        self.mem.last_addr().raw_value()
    }
}

/// The memfd mapped shared, region by region as [`layout`] says, with bitmap `B` per region.
fn map<B: vm_memory::bitmap::NewBitmap>(
    file: &std::sync::Arc<File>,
    size: u64,
) -> Result<vm_memory::GuestMemoryMmap<B>, MemoryError> {
    let mut regions = Vec::new();
    for r in layout(size) {
        let map_err = |source| MemoryError::Map {
            addr: r.guest,
            size: r.len,
            source,
        };
        let len = usize::try_from(r.len).map_err(|_| MemoryError::BadSize(size))?;
        let region = MmapRegion::<B>::build(
            Some(FileOffset::from_arc(file.clone(), r.file_offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(map_err)?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(r.guest))
                .ok_or(vm_memory::GuestRegionCollectionError::NoMemoryRegion)?,
        );
    }
    Ok(vm_memory::GuestMemoryMmap::from_regions(regions)?)
}

/// A memfd of `size` bytes (sparse: nothing is backed until written).
pub fn memfd(name: &std::ffi::CStr, size: u64) -> Result<File, MemoryError> {
    let err = |source| MemoryError::Memfd { size, source };
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns; the File owns it now.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(err)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_splits_around_the_mmio_hole() {
        assert_eq!(layout(1 << 30).len(), 1);
        let l = layout(4 << 30);
        assert_eq!(l[0].len, LOW_RAM_END);
        assert_eq!(l[1].guest, HIGH_RAM_START);
        assert_eq!(l[1].len, (4 << 30) - LOW_RAM_END);
        assert_eq!(l[1].file_offset, LOW_RAM_END);
    }

    /// The scan in slices finds what one pass finds, extents across slice edges included.
    #[test]
    fn data_extents_in_slices_match_one_pass() {
        let size = 1u64 << 30;
        let ram = GuestRam::new(size).unwrap();
        let step = size / 8;
        // Data across every slice edge, at both ends, and scattered pages.
        ram.write_at(0, &[1u8; 4096]).unwrap();
        for i in 1..8 {
            ram.write_at(i * step - 3 * PAGE_SIZE, &vec![2u8; 6 * PAGE_SIZE as usize])
                .unwrap();
        }
        for p in (0..size).step_by(7 << 20) {
            ram.write_at(p + PAGE_SIZE * 5, &[3u8; 8]).unwrap();
        }
        ram.write_at(size - PAGE_SIZE, &[4u8; 4096]).unwrap();
        let fd = ram.backing_file().as_raw_fd();
        let one = extents_in(fd, 0, size).unwrap();
        assert_eq!(data_extents(ram.backing_file(), size).unwrap(), one);
        assert!(one.contains(&(step - 3 * PAGE_SIZE, step + 3 * PAGE_SIZE)));
        assert_eq!(one.last(), Some(&(size - PAGE_SIZE, size)));
        let joined = join_extents(vec![
            vec![(0, 4), (8, 12)],
            vec![(12, 16)],
            vec![],
            vec![(20, 24)],
        ]);
        assert_eq!(joined, vec![(0, 4), (8, 16), (20, 24)]);
    }

    /// What the devices' view writes is guest RAM, and its bitmap says which pages.
    #[test]
    fn writes_through_the_dma_view_land_in_ram_and_in_its_bitmap() {
        let ram = GuestRam::new((3 << 30) + (8 << 20)).unwrap();
        let dma = ram.dma().unwrap();
        dma.write_slice(&[7u8; 16], GuestAddress(5 * PAGE_SIZE))
            .unwrap();
        dma.write_slice(&[9u8; 8], GuestAddress(HIGH_RAM_START + PAGE_SIZE))
            .unwrap();
        let mut b = [0u8; 16];
        ram.read_at(5 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [7u8; 16]);
        ram.read_at(LOW_RAM_END + PAGE_SIZE, &mut b[..8]).unwrap();
        assert_eq!(b[..8], [9u8; 8]);
        let maps: Vec<Vec<u64>> = dma.iter().map(|r| r.bitmap().get_and_reset()).collect();
        assert_eq!(maps[0][0], 1 << 5);
        assert_eq!(maps[1][0], 1 << 1);
        assert!(dma
            .iter()
            .all(|r| r.bitmap().get_and_reset().iter().all(|w| *w == 0)));
    }

    #[test]
    fn untouched_ram_costs_nothing() {
        let ram = GuestRam::new(8 << 30).expect("8 GiB of NORESERVE RAM maps");
        assert!(ram.resident_bytes().unwrap() < (1 << 20));
        ram.write_at(0, &vec![1u8; 4 << 20]).unwrap();
        let r = ram.resident_bytes().unwrap();
        assert!((4 << 20..8 << 20).contains(&r), "resident {r}");
    }

    #[test]
    fn reads_and_writes_meet_across_the_mmio_split() {
        let ram = GuestRam::new((3 << 30) + (4 << 20)).unwrap();
        let at = LOW_RAM_END - PAGE_SIZE;
        let data: Vec<u8> = (0..2 * PAGE_SIZE as usize).map(|i| i as u8 | 1).collect();
        ram.write_at(at, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        ram.read_at(at, &mut back).unwrap();
        assert_eq!(back, data);
        // The high half is at guest-physical 4 GiB.
        let mut b = [0u8; 4];
        ram.memory()
            .read_slice(&mut b, GuestAddress(HIGH_RAM_START))
            .unwrap();
        assert_eq!(b, data[PAGE_SIZE as usize..][..4]);
        assert!(!ram.page_is_zero(at).unwrap());
        ram.zero_range(at, PAGE_SIZE).unwrap();
        assert!(ram.page_is_zero(at).unwrap());
        assert!(ram.page_is_zero(0).unwrap());
    }

    #[test]
    fn out_of_range_access_is_an_error() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert!(matches!(
            ram.write_at(64 << 20, &[1]),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(ram.read_at((64 << 20) - 2, &mut [0u8; 4]).is_err());
        assert!(ram.slice_at(64 << 20, 1).is_err());
        assert!(ram.zero_range(u64::MAX - 1, 4096).is_err());
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            GuestRam::new(1 << 20),
            Err(MemoryError::BadSize(_))
        ));
        assert!(matches!(
            GuestRam::new((64 << 20) + 4096),
            Err(MemoryError::BadSize(_))
        ));
    }
}
