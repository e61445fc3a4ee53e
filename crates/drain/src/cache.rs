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

/// What a VM going to a destination with a page cache can expect there.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Expected {
    /// The share of its fingerprint keys an earlier VM brought.
    pub hits: f64,
    /// Per byte of them, what its pages the cache will not hold cost: zstd-compressed, and
    /// in a copy with deltas (from its fingerprint pages no earlier VM brought). None when
    /// fewer than [`MIN_PRICED`] of them were priced.
    pub whole_costs: Option<[f64; 2]>,
    /// Of those pages, the share a copy with deltas sends whole
    /// ([`crate::predict::whole_in_copy`]).
    pub whole_in_copy: Option<f64>,
}

/// Fewer priced pages than this say too little of what the rest cost.
pub const MIN_PRICED: usize = 16;

/// A VM's fingerprint keys and, when its sample has them, what each page costs.
pub type Fingerprint<'a> = (&'a [u64], &'a [[u16; 2]]);

/// A VM's fingerprint, from its sample.
pub fn fingerprint_of(s: &migration::sample::VmSample) -> Fingerprint<'_> {
    (&s.fingerprint, &s.fingerprint_costs)
}

/// For VMs going, in this order, to one destination with a page cache: the share of each
/// one's fingerprint keys an earlier one had, whose pages are in the cache by the time it
/// goes (the first one to a cache runs alone until its copy is done, [`waits_for_seed`]),
/// and what its other pages cost. An unsampled VM expects none and adds none.
pub fn hits_in_order(fingerprints: &[Option<Fingerprint>]) -> Vec<Expected> {
    let mut held = std::collections::HashSet::<u64>::new();
    fingerprints
        .iter()
        .map(|fp| {
            let Some((keys, costs)) = fp else {
                return Expected::default();
            };
            // Costs that do not go with every key (a sample without them) are left out.
            let priced = costs.len() == keys.len();
            let mine: std::collections::HashMap<u64, Option<[u16; 2]>> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| (*k, costs.get(i).copied().filter(|_| priced)))
                .collect();
            let hits = mine.keys().filter(|k| held.contains(k)).count();
            let whole: Vec<[u16; 2]> = mine
                .iter()
                .filter(|(k, _)| !held.contains(k))
                .filter_map(|(_, c)| *c)
                .collect();
            held.extend(mine.keys().copied());
            Expected {
                hits: if mine.is_empty() {
                    0.0
                } else {
                    hits as f64 / mine.len() as f64
                },
                whole_costs: per_byte(&whole),
                whole_in_copy: crate::predict::whole_in_copy(&whole),
            }
        })
        .collect()
}

/// Bytes per byte of page of `costs` (see [`Expected::whole_costs`]).
fn per_byte(costs: &[[u16; 2]]) -> Option<[f64; 2]> {
    if costs.len() < MIN_PRICED {
        return None;
    }
    let bytes = (costs.len() * 4096) as f64;
    let sum = |i: usize| costs.iter().map(|c| f64::from(c[i])).sum::<f64>() / bytes;
    Some([sum(0).min(1.0), sum(1).min(1.0)])
}

/// Sets [`VmFacts::cached`] and [`VmFacts::whole_costs`] of `vms` (all bound for one
/// destination, in the order they go) as a page cache there would serve them: none when
/// their memory repeats too little for [`open`] to ask for one.
pub fn expect_hits(vms: &mut [VmFacts]) {
    let fps: Vec<Option<Fingerprint>> = vms
        .iter()
        .map(|v| v.sample.as_ref().map(fingerprint_of))
        .collect();
    let keys: Vec<Option<&[u64]>> = fps.iter().map(|f| f.map(|f| f.0)).collect();
    let expected = if shared_share(&keys).is_some_and(|f| f < MIN_SHARED) {
        vec![Expected::default(); vms.len()]
    } else {
        hits_in_order(&fps)
    };
    for (v, e) in vms.iter_mut().zip(expected) {
        v.cached = e.hits;
        v.whole_costs = e.whole_costs;
        v.whole_in_copy = e.whole_in_copy;
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
        const A: [u64; 4] = [1, 2, 3, 4];
        let (a, b, c) = (&A, &[3u64, 4, 5, 6], &[1u64, 2, 5, 6]);
        let fp = |k: &'static [u64]| Some((k, &[][..]));
        let hits = |e: Vec<Expected>| e.iter().map(|e| e.hits).collect::<Vec<_>>();
        assert_eq!(
            hits(hits_in_order(&[fp(a), fp(b), None, fp(c)])),
            vec![0.0, 0.5, 0.0, 1.0]
        );
        // One image: every VM after the first finds its OS pages there.
        assert_eq!(hits(hits_in_order(&[fp(a), fp(a)])), vec![0.0, 1.0]);
        assert!(hits(hits_in_order(&[fp(&[]), fp(a)]))
            .iter()
            .all(|h| *h == 0.0));
    }

    #[test]
    fn the_pages_that_still_go_whole_are_priced_from_their_own_keys() {
        // The shared pages (keys 0..32) compress to a quarter and go whole in a copy; the
        // second VM's own (100..132) compress to an eighth and go as deltas of 512 bytes.
        let shared: Vec<u64> = (0..32).collect();
        let own: Vec<u64> = shared
            .iter()
            .chain(&(100..132).collect::<Vec<_>>())
            .copied()
            .collect();
        let first_costs = [[1024u16, 4096]; 32];
        let second_costs: Vec<[u16; 2]> = (0..64)
            .map(|i| if i < 32 { [1024, 4096] } else { [512, 512] })
            .collect();
        let e = hits_in_order(&[
            Some((&shared[..], &first_costs[..])),
            Some((&own[..], &second_costs[..])),
        ]);
        assert_eq!(e[0].hits, 0.0);
        assert_eq!(e[0].whole_costs, Some([0.25, 1.0]));
        assert_eq!(e[0].whole_in_copy, Some(1.0), "no delta fits its pages");
        assert_eq!(e[1].hits, 0.5);
        assert_eq!(e[1].whole_costs, Some([0.125, 0.125]));
        assert_eq!(e[1].whole_in_copy, Some(0.0), "all go as deltas");
        // Too few priced pages, or costs that do not go with the keys, price nothing.
        let few = hits_in_order(&[Some((&shared[..8], &first_costs[..8]))]);
        assert_eq!(few[0].whole_costs, None);
        let torn = hits_in_order(&[Some((&own[..], &first_costs[..]))]);
        assert_eq!(torn[0].whole_costs, None);
        assert_eq!(torn[0].hits, 0.0);
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
