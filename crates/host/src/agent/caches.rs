//! Page caches for drains ([`migration::host_cache`]): one per drain that asks, its full size
//! counted against this host's memory, handed to the receivers of that drain's migrations, and
//! dropped when the drain ends (or once unused for [`CACHE_IDLE`], if the drain died).
use std::collections::HashMap;
use std::time::{Duration, Instant};

use migration::host_cache::HostCache;
use serde_json::json;
use unixhttp::Reply;

use super::Agent;
use crate::api::CacheInfo;

/// A cache no migration used for this long goes (its drain is gone).
const CACHE_IDLE: Duration = Duration::from_secs(600);

pub(super) struct Held {
    cache: HostCache,
    used: Instant,
}

pub(super) type Caches = HashMap<u64, Held>;

impl Agent {
    /// A new cache of at most `bytes`, if the host has room for all of it.
    pub(super) fn create_cache(&self, bytes: u64) -> Reply {
        let vms = locks::lock(&self.vms);
        let room = self.capacity_of(&vms).room;
        let cache = HostCache::create(bytes).map_err(|e| (400, e.to_string()))?;
        if cache.bytes() > room {
            return Err((
                409,
                format!(
                    "a page cache of {} MiB does not fit on host {}: room for {} MiB",
                    cache.bytes() >> 20,
                    self.cfg.name,
                    room >> 20
                ),
            ));
        }
        let id = migration::session_id();
        let info = CacheInfo {
            id,
            bytes: cache.bytes(),
            pages: cache.capacity(),
        };
        let held = Held {
            cache,
            used: Instant::now(),
        };
        locks::lock(&self.caches).insert(id, held);
        tracing::info!(id, mib = info.bytes >> 20, "page cache created");
        Ok(json!(info))
    }

    pub(super) fn drop_cache(&self, id: u64) -> Reply {
        match locks::lock(&self.caches).remove(&id) {
            Some(_) => Ok(json!({})),
            None => Err((404, format!("no page cache {id:#x} on this host"))),
        }
    }

    /// Bytes the caches take when full.
    pub(super) fn cache_bytes(&self) -> u64 {
        locks::lock(&self.caches)
            .values()
            .map(|h| h.cache.bytes())
            .sum()
    }

    /// `livemig receive`'s arguments for the cache a migration names, if this host holds it.
    pub(super) fn cache_args(&self, id: Option<u64>) -> Vec<String> {
        let mut caches = locks::lock(&self.caches);
        let Some((id, held)) = id.and_then(|id| Some((id, caches.get_mut(&id)?))) else {
            return Vec::new();
        };
        held.used = Instant::now();
        vec![
            "--host-cache".into(),
            held.cache.path().display().to_string(),
            "--host-cache-id".into(),
            id.to_string(),
        ]
    }

    pub(super) fn expire_caches(&self) {
        locks::lock(&self.caches).retain(|id, h| {
            let keep = h.used.elapsed() < CACHE_IDLE;
            if !keep {
                tracing::info!(id, "page cache unused for {CACHE_IDLE:?}: dropped");
            }
            keep
        });
    }
}
