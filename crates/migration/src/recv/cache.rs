//! A receiver's use of its host's page cache in a drain ([`crate::host_cache`]): the keys it
//! tells the source, the pages it places from the cache (only those whose content hashes to
//! the reference), and the pages of its own copy it adds for the migrations after it.
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::host_cache::{key, CacheError, Hash, HashIndex, HostCache, KEY_LEN};

pub(crate) struct CacheSession {
    cache: HostCache,
    /// The cache's ready pages when the migration started, and those it added since.
    index: Mutex<HashIndex>,
    /// Pages are added only during the copy: later rounds re-send pages the guest writes.
    filling: AtomicBool,
    added: AtomicU64,
}

impl CacheSession {
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let cache = HostCache::open(path)?;
        Ok(CacheSession {
            index: Mutex::new(cache.index()?),
            cache,
            filling: AtomicBool::new(true),
            added: AtomicU64::new(0),
        })
    }

    /// What the source looks pages up by.
    pub fn keys(&self) -> Vec<[u8; KEY_LEN]> {
        locks::lock(&self.index).keys().map(key).collect()
    }

    /// The cached page with content `hash` into `out`; false if the cache holds none that
    /// hashes to it.
    pub fn fetch(&self, hash: &Hash, out: &mut [u8]) -> Result<bool, CacheError> {
        let Some(slot) = locks::lock(&self.index).get(hash).copied() else {
            return Ok(false);
        };
        self.cache.read_verified(slot, hash, out)
    }

    /// Pages placed whole by the copy go into the cache, unless it holds them already.
    pub fn learn<'p>(&self, pages: impl Iterator<Item = &'p [u8]>) -> Result<(), CacheError> {
        if !self.filling.load(Ordering::Relaxed) {
            return Ok(());
        }
        let hashed: Vec<(Hash, &[u8])> = pages.map(|p| (*blake3::hash(p).as_bytes(), p)).collect();
        let mut index = locks::lock(&self.index);
        for (h, p) in hashed {
            if index.contains_key(&h) {
                continue;
            }
            let Some(slot) = self.cache.insert(p, &h)? else {
                self.filling.store(false, Ordering::Relaxed);
                break;
            };
            index.insert(h, slot);
            self.added.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The copy is over.
    pub fn copy_done(&self) {
        self.filling.store(false, Ordering::Relaxed);
    }

    /// Pages this migration added to the cache.
    pub fn added(&self) -> u64 {
        self.added.load(Ordering::Relaxed)
    }
}
