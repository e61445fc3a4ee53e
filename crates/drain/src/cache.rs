//! Page caches on the destinations for dedup across the drain's VMs: how large (policy, pure)
//! and their opening and closing through the destination agents (mechanism).
use host::api::CacheInfo;
use migration::protocol::Transport;

use crate::predict::VmFacts;
use crate::run::Planned;
use crate::survey::Survey;
use crate::DrainOptions;

/// A cache smaller than this is not worth its key lists.
pub const MIN_CACHE: u64 = 16 << 20;
/// VMs whose fingerprints repeat less than this share of their keys get no cache: the
/// hashing and the first VM's head start would cost more than the pages saved.
pub const MIN_SHARED: f64 = 0.05;

/// Of the fingerprint keys of the VMs bound for one destination, the share that repeats a key
/// of another of them (what a cache could save); None when a VM was not sampled.
pub fn shared_share(fingerprints: &[Option<&[u64]>]) -> Option<f64> {
    let mut seen = std::collections::HashMap::<u64, usize>::new();
    let mut total = 0usize;
    for (i, fp) in fingerprints.iter().enumerate() {
        let mut mine: Vec<u64> = fp.as_deref()?.to_vec();
        mine.sort_unstable();
        mine.dedup();
        total += mine.len();
        for k in mine {
            seen.entry(k).or_insert(i);
        }
    }
    Some(if total == 0 {
        0.0
    } else {
        1.0 - seen.len() as f64 / total as f64
    })
}

/// For VMs going, in this order, to one destination with a page cache: the share of each
/// one's fingerprint keys an earlier one had, whose pages are in the cache by the time it
/// goes (the first one to a cache runs alone until its copy is done, [`waits_for_seed`]).
/// An unsampled VM expects none and adds none.
pub fn hits_in_order(fingerprints: &[Option<&[u64]>]) -> Vec<f64> {
    let mut held = std::collections::HashSet::<u64>::new();
    fingerprints
        .iter()
        .map(|fp| {
            let Some(fp) = fp else {
                return 0.0;
            };
            let mine: std::collections::HashSet<u64> = fp.iter().copied().collect();
            let hits = mine.iter().filter(|k| held.contains(k)).count();
            held.extend(mine.iter().copied());
            if mine.is_empty() {
                0.0
            } else {
                hits as f64 / mine.len() as f64
            }
        })
        .collect()
}

/// Sets [`VmFacts::cached`] of `vms` (all bound for one destination, in the order they go)
/// as a page cache there would serve them: none when their memory repeats too little for
/// [`open`] to ask for one.
pub fn expect_hits(vms: &mut [VmFacts]) {
    let fps: Vec<Option<&[u64]>> = vms
        .iter()
        .map(|v| v.sample.as_ref().map(|x| &x.fingerprint[..]))
        .collect();
    let hits = if shared_share(&fps).is_some_and(|f| f < MIN_SHARED) {
        vec![0.0; vms.len()]
    } else {
        hits_in_order(&fps)
    };
    for (v, h) in vms.iter_mut().zip(hits) {
        v.cached = h;
    }
}

/// The cache a destination gets: what was asked for, within the room its planned VMs leave;
/// none when that is less than [`MIN_CACHE`].
pub fn cache_size(asked: u64, room: u64, planned: u64) -> Option<u64> {
    let size = asked.min(room.saturating_sub(planned));
    (size >= MIN_CACHE).then_some(size)
}

/// Whether a migration to a destination with a page cache waits: the first one there runs
/// alone until its copy is done, so that every later one finds its pages in the cache (VMs
/// started together would each find the cache empty).
pub fn waits_for_seed(has_cache: bool, seeded: bool, in_flight: usize) -> bool {
    has_cache && !seeded && in_flight > 0
}

/// Whether this drain's migrations can use page caches at all.
pub fn wanted(o: &DrainOptions) -> bool {
    o.dedup_cache > 0
        && o.request.dedup != Some(false)
        && o.request.transport != Some(Transport::Direct)
}

/// Whether the VMs going to a destination, with these fingerprints, are worth a cache there
/// (their memory repeats across them, or was not sampled), when the drain wants caches.
pub fn worth_one(o: &DrainOptions, fingerprints: &[Option<&[u64]>]) -> bool {
    wanted(o) && !shared_share(fingerprints).is_some_and(|f| f < MIN_SHARED)
}

/// Opens a cache on every destination with VMs planned whose memory repeats across them (or
/// was not sampled) and room to spare; a destination that refuses goes without (said in the
/// log).
pub fn open(o: &DrainOptions, s: &Survey, planned: &Planned) -> Vec<Option<CacheInfo>> {
    s.dests
        .iter()
        .enumerate()
        .map(|(d, dest)| {
            if !wanted(o) {
                return None;
            }
            let mine = planned.memory_to(d, s);
            if mine == 0 {
                return None;
            }
            let fps: Vec<Option<&[u64]>> = planned
                .vms_to(d)
                .map(|v| s.vms[v].sample.as_ref().map(|x| &x.fingerprint[..]))
                .collect();
            if !worth_one(o, &fps) {
                tracing::info!("{}: its VMs share no memory; no page cache", dest.name);
                return None;
            }
            let size = cache_size(o.dedup_cache, dest.facts.room, mine)?;
            dest.client
                .as_ref()?
                .create_cache(size)
                .inspect_err(|e| tracing::warn!("{}: no page cache for this drain: {e}", dest.name))
                .ok()
        })
        .collect()
}

/// Drops the caches (the destinations also drop them once unused for a while).
pub fn close(s: &Survey, caches: &[Option<CacheInfo>]) {
    for (dest, c) in s.dests.iter().zip(caches) {
        if let (Some(c), Some(client)) = (c, &dest.client) {
            if let Err(e) = client.drop_cache(c.id) {
                tracing::warn!("{}: dropping page cache {:#x}: {e}", dest.name, c.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_migration_to_a_cache_runs_alone_until_its_copy_is_done() {
        assert!(waits_for_seed(true, false, 1));
        assert!(!waits_for_seed(true, false, 0));
        assert!(!waits_for_seed(true, true, 3));
        assert!(!waits_for_seed(false, false, 3));
    }

    #[test]
    fn sharing_is_the_share_of_keys_another_vm_repeats() {
        let (a, b, c) = ([1u64, 2, 3, 4], [3u64, 4, 5, 6], [7u64, 8, 9, 10]);
        assert_eq!(shared_share(&[Some(&a), Some(&c)]), Some(0.0));
        assert_eq!(shared_share(&[Some(&a), Some(&b)]), Some(0.25));
        let three = shared_share(&[Some(&a), Some(&a), Some(&a)]).unwrap();
        assert!((three - 2.0 / 3.0).abs() < 1e-9, "{three}");
        assert_eq!(shared_share(&[Some(&a), None]), None);
    }

    #[test]
    fn a_vm_expects_the_keys_earlier_vms_brought() {
        let (a, b, c) = ([1u64, 2, 3, 4], [3u64, 4, 5, 6], [1u64, 2, 5, 6]);
        let hits = hits_in_order(&[Some(&a), Some(&b), None, Some(&c)]);
        assert_eq!(hits, vec![0.0, 0.5, 0.0, 1.0]);
        // One image: every VM after the first finds its OS pages there.
        assert_eq!(hits_in_order(&[Some(&a), Some(&a)]), vec![0.0, 1.0]);
        assert!(hits_in_order(&[Some(&[]), Some(&a)])
            .iter()
            .all(|h| *h == 0.0));
    }

    #[test]
    fn a_cache_takes_only_the_room_the_planned_vms_leave() {
        const G: u64 = 1 << 30;
        assert_eq!(cache_size(G, 8 * G, 4 * G), Some(G));
        assert_eq!(cache_size(G, 5 * G, 4 * G + G / 2), Some(G / 2));
        assert_eq!(cache_size(G, 4 * G, 4 * G), None);
        assert_eq!(cache_size(8 << 20, 8 * G, G), None);
    }
}
