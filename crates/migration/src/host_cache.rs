//! The destination host's page cache for one drain: pages its earlier migrations brought, by
//! content (BLAKE3), so that a later VM's page with the same content travels as a reference.
//! One memfd, created by the host agent and shared by the receivers of that drain (each opens
//! it through the agent's `/proc/PID/fd/N`).
//!
//! Slots are append-only: a receiver reserves one (an atomic counter in the header), writes
//! the page and its hash, then marks it ready; a ready slot never changes, and once every slot
//! is taken nothing more is added. A receiver reads the ready slots' hashes when its migration
//! starts ([`HostCache::index`]) and tells the source their keys; it places a reference only
//! when the slot's content hashes to the reference's full hash.
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

/// Most pages a cache holds (4 GiB); the key list a source receives is at most 16 MiB.
pub const MAX_CACHE_PAGES: u64 = 1 << 20;
/// Bytes of a key: the first half of a page's BLAKE3 hash.
pub const KEY_LEN: usize = 16;

const PAGE: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"LMPCACHE");
const HEADER: usize = 64;
/// Per slot: the hash (32 bytes), then the ready flag (8).
const ENTRY: usize = 40;
const OFF_CAPACITY: usize = 8;
const OFF_NEXT: usize = 16;

pub type Hash = [u8; 32];

/// Maps and sets keyed by page hashes: a seeded fast hasher rather than SipHash, which a
/// full cache's index spends much of its time in. The keys are BLAKE3 hashes of page
/// contents, which a peer cannot steer onto one bucket of a hasher whose seed it does not know.
pub type FastState = foldhash::fast::RandomState;
pub type HashIndex = HashMap<Hash, u64, FastState>;

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum CacheError {
    /// a page cache of {0} bytes holds no page or more than 4 GiB
    Size(u64),
    /// creating the page cache: {0}
    Create(#[from] ram::MemoryError),
    /// opening the page cache {path}: {source}
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// mapping the page cache: {0}
    Map(#[from] vm_memory::mmap::MmapRegionError),
    /// the page cache {0} is not one (bad header or size)
    NotACache(PathBuf),
    /// page cache memory: {0}
    Access(#[from] vm_memory::volatile_memory::Error),
}

/// One drain's page cache, mapped.
pub struct HostCache {
    map: MmapRegion<()>,
    file: File,
    capacity: u64,
}

fn pages_at(capacity: u64) -> usize {
    (HEADER + capacity as usize * ENTRY).div_ceil(PAGE) * PAGE
}

fn size_of(capacity: u64) -> u64 {
    (pages_at(capacity) + capacity as usize * PAGE) as u64
}

impl HostCache {
    /// A new, empty cache of at most `bytes` (the agent's).
    pub fn create(bytes: u64) -> Result<Self, CacheError> {
        let capacity = bytes / (PAGE + ENTRY) as u64;
        if capacity == 0 || capacity > MAX_CACHE_PAGES {
            return Err(CacheError::Size(bytes));
        }
        let file = ram::memfd(c"livemig-page-cache", size_of(capacity))?;
        let c = Self::map(file, capacity)?;
        c.word(0)?.store(MAGIC, Ordering::Relaxed);
        c.word(OFF_CAPACITY)?.store(capacity, Ordering::Release);
        Ok(c)
    }

    /// The cache another process created, at `path` (its `/proc/PID/fd/N`).
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| CacheError::Open {
                path: path.into(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| CacheError::Open {
                path: path.into(),
                source,
            })?
            .len();
        let not = || CacheError::NotACache(path.into());
        if len < HEADER as u64 || len > size_of(MAX_CACHE_PAGES) {
            return Err(not());
        }
        let head = Self::map(file, 0)?;
        let magic = head.word(0)?.load(Ordering::Relaxed);
        let capacity = head.word(OFF_CAPACITY)?.load(Ordering::Acquire);
        if magic != MAGIC || capacity == 0 || capacity > MAX_CACHE_PAGES || size_of(capacity) != len
        {
            return Err(not());
        }
        Self::map(head.file, capacity)
    }

    fn map(file: File, capacity: u64) -> Result<Self, CacheError> {
        let len = if capacity == 0 {
            HEADER
        } else {
            size_of(capacity) as usize
        };
        let fo = FileOffset::new(
            file.try_clone().map_err(|source| CacheError::Open {
                path: "memfd".into(),
                source,
            })?,
            0,
        );
        let map = MmapRegion::build(
            Some(fo),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )?;
        Ok(HostCache {
            map,
            file,
            capacity,
        })
    }

    fn word(&self, off: usize) -> Result<&AtomicU64, CacheError> {
        Ok(self.map.get_atomic_ref::<AtomicU64>(off)?)
    }

    /// Where another process of this host opens it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }

    /// Bytes the cache takes when full (what the host counts against its free memory).
    pub fn bytes(&self) -> u64 {
        size_of(self.capacity)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The ready slots by hash (the first of equal ones).
    pub fn index(&self) -> Result<HashIndex, CacheError> {
        let taken = self
            .word(OFF_NEXT)?
            .load(Ordering::Acquire)
            .min(self.capacity) as usize;
        // Which slots are ready first (each flag read with Acquire, so the hash written before
        // it is visible to every read after), then their hashes in one copy of the table.
        let ready: Vec<bool> = (0..taken)
            .map(|slot| {
                Ok(self
                    .word(HEADER + slot * ENTRY + 32)?
                    .load(Ordering::Acquire)
                    == 1)
            })
            .collect::<Result<_, CacheError>>()?;
        let mut table = vec![0u8; taken * ENTRY];
        self.map
            .get_slice(HEADER, table.len())?
            .copy_to(&mut table[..]);
        let mut out = HashIndex::with_capacity_and_hasher(taken, FastState::default());
        for (slot, entry) in table.chunks_exact(ENTRY).enumerate() {
            if ready[slot] {
                let mut h = [0u8; 32];
                h.copy_from_slice(&entry[..32]);
                out.entry(h).or_insert(slot as u64);
            }
        }
        Ok(out)
    }

    /// The hash slot `slot` was filed under, once it is ready.
    fn hash_of(&self, slot: u64) -> Result<Option<Hash>, CacheError> {
        let e = HEADER + slot as usize * ENTRY;
        if self.word(e + 32)?.load(Ordering::Acquire) != 1 {
            return Ok(None);
        }
        let mut h = [0u8; 32];
        self.map.get_slice(e, 32)?.copy_to(&mut h[..]);
        Ok(Some(h))
    }

    /// Adds `page` under `hash`: its slot, or None once the cache is full.
    pub fn insert(&self, page: &[u8], hash: &Hash) -> Result<Option<u64>, CacheError> {
        let slot = self.word(OFF_NEXT)?.fetch_add(1, Ordering::AcqRel);
        if slot >= self.capacity {
            return Ok(None);
        }
        let e = HEADER + slot as usize * ENTRY;
        self.map
            .get_slice(pages_at(self.capacity) + slot as usize * PAGE, PAGE)?
            .copy_from(&page[..PAGE]);
        self.map.get_slice(e, 32)?.copy_from(&hash[..]);
        self.word(e + 32)?.store(1, Ordering::Release);
        Ok(Some(slot))
    }

    /// Copies slot `slot`'s page into `out` if it is ready and its content hashes to `hash`.
    pub fn read_verified(
        &self,
        slot: u64,
        hash: &Hash,
        out: &mut [u8],
    ) -> Result<bool, CacheError> {
        if slot >= self.capacity || self.hash_of(slot)?.as_ref() != Some(hash) {
            return Ok(false);
        }
        self.map
            .get_slice(pages_at(self.capacity) + slot as usize * PAGE, PAGE)?
            .copy_to(&mut out[..PAGE]);
        Ok(blake3::hash(&out[..PAGE]).as_bytes() == hash)
    }
}

/// The key a source looks a page's hash up by.
pub fn key(hash: &Hash) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&hash[..KEY_LEN]);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE]
    }

    #[test]
    fn another_process_view_sees_ready_pages_by_hash() {
        let c = HostCache::create(1 << 20).unwrap();
        let (a, b) = (page(1), page(2));
        let (ha, hb) = (*blake3::hash(&a).as_bytes(), *blake3::hash(&b).as_bytes());
        assert_eq!(c.insert(&a, &ha).unwrap(), Some(0));
        assert_eq!(c.insert(&b, &hb).unwrap(), Some(1));
        let other = HostCache::open(&c.path()).unwrap();
        let idx = other.index().unwrap();
        assert_eq!(idx.len(), 2);
        let mut out = page(0);
        assert!(other.read_verified(idx[&hb], &hb, &mut out).unwrap());
        assert_eq!(out, b);
        // A slot asked for under another hash gives nothing.
        assert!(!other.read_verified(idx[&hb], &ha, &mut out).unwrap());
        assert!(!other.read_verified(99, &ha, &mut out).unwrap());
    }

    #[test]
    fn a_slot_whose_content_does_not_hash_to_its_key_is_never_read() {
        let c = HostCache::create(1 << 20).unwrap();
        let forged = *blake3::hash(&page(7)).as_bytes();
        // Filed under another page's hash (a collision, or a cache written wrongly).
        c.insert(&page(8), &forged).unwrap();
        let mut out = page(0);
        assert!(!c.read_verified(0, &forged, &mut out).unwrap());
    }

    #[test]
    fn the_index_leaves_out_slots_still_being_written_and_keeps_the_first_of_equal_pages() {
        let c = HostCache::create(8 * (PAGE + ENTRY) as u64).unwrap();
        let (a, b) = (page(1), page(2));
        let (ha, hb) = (*blake3::hash(&a).as_bytes(), *blake3::hash(&b).as_bytes());
        c.insert(&a, &ha).unwrap();
        // Another receiver reserved slot 1 and is writing it: its hash is there, not its flag.
        let slot = c.word(OFF_NEXT).unwrap().fetch_add(1, Ordering::AcqRel);
        c.map
            .get_slice(HEADER + slot as usize * ENTRY, 32)
            .unwrap()
            .copy_from(&hb[..]);
        c.insert(&a, &ha).unwrap();
        let idx = HostCache::open(&c.path()).unwrap().index().unwrap();
        assert_eq!(idx.len(), 1, "{idx:?}");
        assert_eq!(idx[&ha], 0);
        assert!(!idx.contains_key(&hb));
    }

    #[test]
    fn a_full_cache_takes_nothing_more() {
        let c = HostCache::create(3 * (PAGE + ENTRY) as u64).unwrap();
        assert_eq!(c.capacity(), 3);
        for i in 0..3 {
            assert!(c.insert(&page(i), &[i; 32]).unwrap().is_some());
        }
        assert!(c.insert(&page(9), &[9; 32]).unwrap().is_none());
        assert_eq!(c.index().unwrap().len(), 3);
    }

    #[test]
    fn what_is_not_a_cache_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        assert!(matches!(HostCache::open(&p), Err(CacheError::NotACache(_))));
        assert!(HostCache::create(100).is_err());
        assert!(HostCache::create(8 << 30).is_err());
    }
}
