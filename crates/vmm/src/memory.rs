//! Guest RAM: one memfd, mapped shared with MAP_NORESERVE so untouched RAM costs nothing, split
//! around the 32-bit MMIO hole (LAPIC/IOAPIC live below 4 GiB).
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

pub const PAGE_SIZE: u64 = 4096;
/// RAM below this address; the rest goes above 4 GiB.
pub const LOW_RAM_END: u64 = 0xC000_0000;
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Smallest VM we build: the guest kernel, its tables and some working set.
pub const MIN_MEMORY: u64 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} bytes is not a multiple of 2 MiB or below {MIN_MEMORY} bytes")]
    BadSize(u64),
    #[error("memfd_create for {size} bytes of guest RAM failed: {source}")]
    Memfd { size: u64, source: std::io::Error },
    #[error("mapping {size} bytes of guest RAM at {addr:#x} failed: {source}")]
    Map {
        addr: u64,
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest RAM regions rejected by vm-memory: {0}")]
    Regions(#[from] vm_memory::GuestRegionCollectionError),
    #[error("fstat on the guest RAM memfd failed: {0}")]
    Stat(std::io::Error),
}

/// Offsets in `f` that hold data, as sorted [start, end) extents (SEEK_DATA / SEEK_HOLE). On the
/// guest RAM memfd these are the pages the guest or the VMM ever touched.
pub fn data_extents(f: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a valid fd; errors are checked.
        let start = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if start < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.push((start as u64, (end as u64).min(size)));
        pos = end;
    }
    Ok(out)
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

/// Guest RAM plus the memfd behind it.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub size: u64,
    file: std::sync::Arc<File>,
}

impl GuestRam {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < MIN_MEMORY || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(size));
        }
        // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked below
        // and owned by the File from then on.
        let fd = unsafe { libc::memfd_create(c"livemig-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd {
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| MemoryError::Memfd { size, source })?;
        let file = std::sync::Arc::new(file);
        let mut regions = Vec::new();
        for r in layout(size) {
            let region = MmapRegion::<()>::build(
                Some(FileOffset::from_arc(file.clone(), r.file_offset)),
                r.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
            .map_err(|source| MemoryError::Map {
                addr: r.guest,
                size: r.len,
                source,
            })?;
            regions.push(
                GuestRegionMmap::new(region, GuestAddress(r.guest))
                    .ok_or(vm_memory::GuestRegionCollectionError::NoMemoryRegion)?,
            );
        }
        let mem = GuestMemoryMmap::from_regions(regions)?;
        Ok(GuestRam { mem, size, file })
    }

    /// Bytes of guest RAM the host actually backs with pages.
    pub fn resident_bytes(&self) -> Result<u64, MemoryError> {
        // SAFETY: fstat writes into the zeroed struct we pass; the fd is valid while self lives.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let rc = unsafe { libc::fstat(self.file.as_raw_fd(), &mut st) };
        if rc != 0 {
            return Err(MemoryError::Stat(std::io::Error::last_os_error()));
        }
        Ok(st.st_blocks as u64 * 512)
    }

    /// Each RAM range as a host slice, for bulk work (fill, snapshot, checksums).
    pub fn ranges(&self) -> Vec<(RamRange, &[u8])> {
        layout(self.size)
            .into_iter()
            .zip(self.mem.iter())
            .map(|(r, region)| {
                let host = region
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .expect("region start is inside the region");
                // SAFETY: the mapping is `len` bytes long and lives as long as self. Guest vCPUs
                // may write concurrently; readers treat the bytes as a racy snapshot, which is what
                // a running VM's memory is.
                let s = unsafe { std::slice::from_raw_parts(host as *const u8, r.len as usize) };
                (r, s)
            })
            .collect()
    }

    /// Mutable host view of each RAM range; for filling before boot and loading a snapshot.
    #[allow(clippy::mut_from_ref)]
    pub fn ranges_mut(&self) -> Vec<(RamRange, &mut [u8])> {
        layout(self.size)
            .into_iter()
            .zip(self.mem.iter())
            .map(|(r, region)| {
                let host = region
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .expect("region start is inside the region");
                // SAFETY: as in ranges(); callers use this only while no vCPU runs.
                let s = unsafe { std::slice::from_raw_parts_mut(host, r.len as usize) };
                (r, s)
            })
            .collect()
    }

    /// The memfd behind guest RAM, in [`RamRange::file_offset`] order.
    pub fn backing_file(&self) -> &File {
        &self.file
    }

    /// Host bytes at memfd offset `off` (the migration's page address space).
    pub fn slice_at(&self, off: u64, len: usize) -> Option<&[u8]> {
        self.ranges().into_iter().find_map(|(r, s)| {
            let start = off.checked_sub(r.file_offset)? as usize;
            s.get(start..start.checked_add(len)?)
        })
    }

    /// Writes `data` at memfd offset `off` through the file, not the mapping: shmem then fills
    /// fresh pages without zeroing them first, which on fresh memory costs more than the copy.
    pub fn write_at(&self, off: u64, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, off)
    }

    /// Makes [off, off+len) zero by freeing its pages (never reading or allocating them).
    pub fn zero_range(&self, off: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate on our own memfd; the range is checked by the kernel.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn last_addr(&self) -> u64 {
        self.mem.last_addr().raw_value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_mmio_hole() {
        assert_eq!(layout(1 << 30).len(), 1);
        let l = layout(4 << 30);
        assert_eq!(l[0].len, LOW_RAM_END);
        assert_eq!(l[1].guest, HIGH_RAM_START);
        assert_eq!(l[1].len, (4 << 30) - LOW_RAM_END);
        assert_eq!(l[1].file_offset, LOW_RAM_END);
    }

    #[test]
    fn untouched_ram_costs_nothing() {
        let ram = GuestRam::new(8 << 30).expect("8 GiB of NORESERVE RAM maps");
        assert!(ram.resident_bytes().unwrap() < (1 << 20));
        let ranges = ram.ranges_mut();
        let (_, s) = ranges.into_iter().next().unwrap();
        s[..(4 << 20)].fill(1);
        let r = ram.resident_bytes().unwrap();
        assert!((4 << 20..8 << 20).contains(&r), "resident {r}");
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
