//! Pages into guest RAM at their final place: plain, compressed, delta and reference
//! batches; direct page data from the stream; zero pages as holes. A delta applies only to the
//! version it was computed against, a reference only to content with the hash it names.
use ram::{GuestRam, PAGE_SIZE};

use super::cache;
use super::ReceiveStats;
use crate::codec;
use crate::policy::Landing;
use crate::protocol::{
    BatchHead, CompressedBatch, DirectRead, Entry, FrameReader, Kind, ProtocolError, RefTo,
    Transport,
};
use crate::recv::state::Step;
use crate::MigrationError;

/// Where pages land: guest RAM, and the host's page cache when the migration uses one.
#[derive(Clone, Copy)]
pub(crate) struct Dest<'a> {
    pub ram: &'a GuestRam,
    pub cache: Option<&'a cache::CacheSession>,
}

impl<'a> Dest<'a> {
    #[cfg(test)]
    pub fn ram(ram: &'a GuestRam) -> Self {
        Dest { ram, cache: None }
    }

    /// A round ended: the copy is over.
    pub(super) fn round_end(&self) {
        if let Some(c) = self.cache {
            c.copy_done();
        }
    }
}

/// Carries out a step that needs no more of the stream: places a batch (decompressing it
/// first), or nothing.
pub(super) fn place(
    step: Step<'_>,
    dst: Dest<'_>,
    transport: Transport,
    scratch: &mut Vec<u8>,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    match step {
        Step::Pages { head, data } => place_batch(dst, &head, data, Kind::Pages, stats),
        Step::Compressed(b) if transport == Transport::Compressed => {
            place_compressed(dst, &b, scratch, stats)
        }
        Step::Compressed(_) | Step::Direct(_) => Err(ProtocolError::Unexpected {
            kind: if matches!(step, Step::Direct(_)) {
                Kind::PagesDirect
            } else {
                Kind::PagesCompressed
            },
            state: "a transport that does not send it",
        }
        .into()),
        Step::Prepare(_)
        | Step::Extents(_)
        | Step::Disk(_)
        | Step::RoundEnd(_)
        | Step::Owed(_)
        | Step::Paused
        | Step::Nothing => Ok(()),
    }
}

pub(super) fn place_compressed(
    dst: Dest<'_>,
    b: &CompressedBatch<'_>,
    scratch: &mut Vec<u8>,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    codec::decompress(b.codec, b.data, b.raw_len, scratch).map_err(|e| {
        ProtocolError::Malformed {
            kind: Kind::PagesCompressed,
            why: e.to_string(),
        }
    })?;
    place_batch(dst, &b.head, scratch, Kind::PagesCompressed, stats)
}

/// Puts a PagesDirect frame's page data straight into guest RAM at its final place: spliced
/// into the memfd (from the socket a pipeful at a time, into the file a run at a time), or
/// one read into the mapping per run of consecutive data pages; zero pages as holes.
pub(super) fn place_direct<R: DirectRead>(
    input: &mut FrameReader<R>,
    entries: &[Entry],
    ram: &GuestRam,
    landing: Landing,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    if let Some(e) = entries.iter().find(|e| e.offset() >= ram.size()) {
        return Err(ProtocolError::Malformed {
            kind: Kind::PagesDirect,
            why: format!("page offset {:#x} is beyond guest RAM", e.offset()),
        }
        .into());
    }
    let mut data = Vec::new();
    for (off, n, zero) in runs(entries.iter().map(|e| (e.offset(), e.is_zero()))) {
        let len = n as u64 * PAGE_SIZE;
        if zero {
            ram.zero_range(off, len)?;
            stats.zero_pages += n as u64;
        } else {
            data.push((off, len as usize));
        }
        stats.pages += n as u64;
    }
    land(input, ram, &data, landing)
}

/// The frame's page data from the stream into guest RAM, run after run: `len` bytes at memfd
/// offset `off` for each `(off, len)` of `runs`.
pub(super) fn land<R: DirectRead>(
    input: &mut FrameReader<R>,
    ram: &GuestRam,
    runs: &[(u64, usize)],
    landing: Landing,
) -> Result<(), MigrationError> {
    match landing {
        // Memfd offsets: a run is contiguous in the file even where it crosses from low to
        // high RAM; in the mapping it is one slice per RAM range.
        Landing::Splice => input.read_direct(ram.backing_file(), runs)?,
        Landing::Mapped => {
            for &(off, len) in runs {
                for slice in ram.slices_at(off, len)? {
                    input.read_direct_mapped(&slice)?;
                }
            }
        }
    }
    Ok(())
}

/// Runs of consecutive pages of one kind: (first offset, pages, zero).
pub(super) fn runs(pages: impl Iterator<Item = (u64, bool)>) -> Vec<(u64, usize, bool)> {
    let mut out: Vec<(u64, usize, bool)> = Vec::new();
    for (off, zero) in pages {
        match out.last_mut() {
            Some((start, n, z)) if *z == zero && *start + *n as u64 * PAGE_SIZE == off => *n += 1,
            _ => out.push((off, 1, zero)),
        }
    }
    out
}

/// Puts a batch's pages at their final place: runs of consecutive pages of one kind in one
/// call, data through the memfd (no pre-zeroing of fresh pages), zero pages as holes.
pub(super) fn place_batch(
    dst: Dest<'_>,
    head: &BatchHead<'_>,
    data: &[u8],
    kind: Kind,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    if head.encoded() {
        return place_pages(dst, head, data, kind, stats);
    }
    let ram = dst.ram;
    head.validate(data.len(), ram.size(), kind)?;
    if let Some(c) = dst.cache {
        c.learn(data.chunks_exact(PAGE_SIZE as usize))?;
    }
    let mut at = 0;
    for (off, n, zero) in runs(head.entries().iter().map(|e| (e.offset(), e.is_zero()))) {
        let len = n as u64 * PAGE_SIZE;
        if zero {
            ram.zero_range(off, len)?;
            stats.zero_pages += n as u64;
        } else {
            // Consecutive data pages sit back to back in the batch's data: one write.
            let end = at + len as usize;
            ram.write_at(off, &data[at..end])?;
            at = end;
        }
        stats.pages += n as u64;
    }
    Ok(())
}

/// A batch with deltas or references, page by page. A delta applies only to the version of
/// the page it was computed against: the page here must hash to its base. A reference copies
/// a page placed here before, whose BLAKE3 hash must be the one it names. Otherwise the
/// migration is off: a source that lost track of what we hold, or one that lies, never gets
/// a page placed.
pub(super) fn place_pages(
    dst: Dest<'_>,
    head: &BatchHead<'_>,
    data: &[u8],
    kind: Kind,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    let ram = dst.ram;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for p in head.pages(data, ram.size(), kind)? {
        match (p.data, p.base, p.from) {
            (None, _, _) => {
                ram.zero_range(p.offset, PAGE_SIZE)?;
                stats.zero_pages += 1;
            }
            (Some(hash), _, Some(RefTo::HostCache)) => {
                let hash: &[u8; 32] = hash
                    .try_into()
                    .map_err(|_| ProtocolError::HostRefMissing { offset: p.offset })?;
                let found = match dst.cache {
                    Some(c) => c.fetch(hash, &mut page)?,
                    None => false,
                };
                if !found {
                    return Err(ProtocolError::HostRefMissing { offset: p.offset }.into());
                }
                ram.write_at(p.offset, &page)?;
                stats.host_ref_pages += 1;
            }
            (Some(hash), _, Some(RefTo::Page(from))) => {
                ram.read_at(from, &mut page)?;
                if blake3::hash(&page).as_bytes()[..] != *hash {
                    return Err(ProtocolError::RefMismatch {
                        offset: p.offset,
                        from,
                    }
                    .into());
                }
                ram.write_at(p.offset, &page)?;
                stats.ref_pages += 1;
            }
            (Some(d), None, None) => {
                ram.write_at(p.offset, d)?;
                if let Some(c) = dst.cache {
                    c.learn(std::iter::once(d))?;
                }
            }
            (Some(d), Some(base), None) => {
                ram.read_at(p.offset, &mut page)?;
                let held = crate::delta::base_hash(&page);
                if held != base {
                    return Err(ProtocolError::DeltaBase {
                        offset: p.offset,
                        base,
                        held,
                    }
                    .into());
                }
                let apply = if p.replace {
                    crate::delta::apply_replace
                } else {
                    crate::delta::apply
                };
                apply(&mut page, d).map_err(|why| ProtocolError::Malformed {
                    kind,
                    why: format!("the delta of page {:#x}: {why}", p.offset),
                })?;
                ram.write_at(p.offset, &page)?;
                stats.delta_pages += 1;
            }
        }
        stats.pages += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_to_the_host_cache_places_only_what_it_holds_under_that_hash() {
        use crate::host_cache::HostCache;
        use crate::protocol::{decode, Frame, PageBatch, RefHead};
        use zerocopy::IntoBytes;
        let ram = GuestRam::new(64 << 20).unwrap();
        let cache = HostCache::create(1 << 20).unwrap();
        let (held, forged) = (vec![3u8; 4096], vec![4u8; 4096]);
        let h_held = *blake3::hash(&held).as_bytes();
        cache.insert(&held, &h_held).unwrap();
        // A slot filed under the hash of other content (as a collision would be).
        let h_forged = *blake3::hash(&forged).as_bytes();
        cache.insert(&[5u8; 4096], &h_forged).unwrap();
        let session = cache::CacheSession::open(&cache.path()).unwrap();
        assert_eq!(session.keys().len(), 2);
        let mut b = PageBatch::default();
        b.push_ref(4096);
        let payload = |hash: [u8; 32]| {
            let mut p = b.head();
            p.extend_from_slice(RefHead::host_cache(hash).as_bytes());
            p
        };
        let place =
            |p: &[u8], cache, stats: &mut ReceiveStats| match decode(Kind::Pages, p).unwrap() {
                Frame::Pages { head, data } => {
                    place_batch(Dest { ram: &ram, cache }, &head, data, Kind::Pages, stats)
                }
                f => panic!("{:?}", f.kind()),
            };
        let at = || {
            let mut got = vec![0u8; 4096];
            ram.read_at(4096, &mut got).unwrap();
            got
        };
        let mut st = ReceiveStats::default();
        // Without the cache, a page not held under the hash, or one whose content does not
        // hash to it: refused, nothing placed.
        for (hash, cache) in [
            (h_held, None),
            ([8u8; 32], Some(&session)),
            (h_forged, Some(&session)),
        ] {
            let e = place(&payload(hash), cache, &mut st).unwrap_err();
            assert!(e.to_string().contains("refused"), "{e}");
            assert_eq!(at(), vec![0u8; 4096]);
        }
        place(&payload(h_held), Some(&session), &mut st).unwrap();
        assert_eq!(at(), held);
        assert_eq!(st.host_ref_pages, 1);
    }

    #[test]
    fn the_copy_fills_the_host_cache_and_later_rounds_do_not() {
        use crate::host_cache::HostCache;
        use crate::protocol::{decode, Frame, PageBatch};
        let ram = GuestRam::new(64 << 20).unwrap();
        let cache = HostCache::create(1 << 20).unwrap();
        let session = cache::CacheSession::open(&cache.path()).unwrap();
        let dst = Dest {
            ram: &ram,
            cache: Some(&session),
        };
        let batch = |fill: u8| {
            let mut b = PageBatch::default();
            b.push(0, false);
            let mut p = b.head();
            p.extend_from_slice(&[fill; 4096]);
            p
        };
        let mut st = ReceiveStats::default();
        for fill in [1u8, 1, 2] {
            let p = batch(fill);
            let Frame::Pages { head, data } = decode(Kind::Pages, &p).unwrap() else {
                panic!()
            };
            place_batch(dst, &head, data, Kind::Pages, &mut st).unwrap();
        }
        // Two distinct pages, the repeat added once.
        assert_eq!(session.added(), 2);
        dst.round_end();
        let p = batch(3);
        let Frame::Pages { head, data } = decode(Kind::Pages, &p).unwrap() else {
            panic!()
        };
        place_batch(dst, &head, data, Kind::Pages, &mut st).unwrap();
        assert_eq!(session.added(), 2);
        assert_eq!(
            HostCache::open(&cache.path())
                .unwrap()
                .index()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_reference_copies_only_a_page_whose_content_has_its_hash() {
        use crate::protocol::{decode, Frame, PageBatch, RefHead};
        use zerocopy::IntoBytes;
        let ram = GuestRam::new(64 << 20).unwrap();
        let a = vec![7u8; 4096];
        ram.write_at(0, &a).unwrap();
        let mut b = PageBatch::default();
        b.push_ref(8192);
        let payload = |from: u64, hash: [u8; 32]| {
            let mut p = b.head();
            p.extend_from_slice(RefHead::new(from, hash).as_bytes());
            p
        };
        let place = |p: &[u8], stats: &mut ReceiveStats| match decode(Kind::Pages, p).unwrap() {
            Frame::Pages { head, data } => {
                place_batch(Dest::ram(&ram), &head, data, Kind::Pages, stats)
            }
            f => panic!("{:?}", f.kind()),
        };
        let at = |off| {
            let mut got = vec![0u8; 4096];
            ram.read_at(off, &mut got).unwrap();
            got
        };
        let mut stats = ReceiveStats::default();
        // A crafted reference: the hash of content that is not at `from` (a page the guest
        // wants copied elsewhere cannot be named by a hash it chose): refused, nothing placed.
        let e = place(
            &payload(0, *blake3::hash(&[9u8; 4096]).as_bytes()),
            &mut stats,
        )
        .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        assert_eq!(at(8192), vec![0u8; 4096]);
        // Beyond guest RAM, or to itself: malformed.
        assert!(decode(Kind::Pages, &payload(64 << 20, [0; 32]))
            .ok()
            .and_then(|f| match f {
                Frame::Pages { head, data } => head.pages(data, 64 << 20, Kind::Pages).ok(),
                _ => None,
            })
            .is_none());
        // The right hash: copied.
        place(&payload(0, *blake3::hash(&a).as_bytes()), &mut stats).unwrap();
        assert_eq!(at(8192), a);
        assert_eq!(stats.ref_pages, 1);
    }

    /// Places a batch of one delta page at `off`: `head` (base, and how the runs apply), then
    /// `enc`.
    fn place_delta(
        ram: &GuestRam,
        off: u64,
        head: crate::protocol::DeltaHead,
        enc: &[u8],
        stats: &mut ReceiveStats,
    ) -> Result<(), MigrationError> {
        use crate::protocol::{decode, Frame, PageBatch};
        use zerocopy::IntoBytes;
        let mut b = PageBatch::default();
        b.push_delta(off);
        let mut p = b.head();
        p.extend_from_slice(head.as_bytes());
        p.extend_from_slice(enc);
        match decode(Kind::Pages, &p).unwrap() {
            Frame::Pages { head, data } => {
                place_batch(Dest::ram(ram), &head, data, Kind::Pages, stats)
            }
            f => panic!("{:?}", f.kind()),
        }
    }

    fn page_at(ram: &GuestRam, off: u64) -> Vec<u8> {
        let mut got = vec![0u8; 4096];
        ram.read_at(off, &mut got).unwrap();
        got
    }

    #[test]
    fn a_delta_applies_only_to_the_version_it_was_computed_against() {
        use crate::delta;
        use crate::protocol::DeltaHead;
        let ram = GuestRam::new(64 << 20).unwrap();
        let old = vec![5u8; 4096];
        ram.write_at(4096, &old).unwrap();
        let mut new = old.clone();
        new[0] = 6;
        let mut enc = Vec::new();
        assert!(delta::encode(&old, &new, &mut enc));
        let head = |base: u64| DeltaHead::new(base, enc.len());
        let mut stats = ReceiveStats::default();
        // Against another version (a hostile or confused source): refused, nothing placed.
        let hostile = head(delta::base_hash(&[9u8; 4096]));
        let e = place_delta(&ram, 4096, hostile, &enc, &mut stats).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        assert_eq!(page_at(&ram, 4096), old);
        // Against what is here: applied.
        place_delta(&ram, 4096, head(delta::base_hash(&old)), &enc, &mut stats).unwrap();
        assert_eq!(page_at(&ram, 4096), new);
        assert_eq!(stats.delta_pages, 1);
        // The same delta again is against a version no longer here.
        assert!(place_delta(&ram, 4096, head(delta::base_hash(&old)), &enc, &mut stats).is_err());
        assert_eq!(page_at(&ram, 4096), new);
    }

    /// Replacement runs (a source that kept only a sketch of the page) are held to the same
    /// base check, and replace exactly the blocks they carry.
    #[test]
    fn replaced_blocks_apply_only_to_the_version_they_were_computed_against() {
        use crate::delta::{self, Sketch};
        use crate::protocol::DeltaHead;
        let ram = GuestRam::new(64 << 20).unwrap();
        let old: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        ram.write_at(8192, &old).unwrap();
        let mut new = old.clone();
        new[1000] ^= 0x55;
        let mut enc = Vec::new();
        let k = delta::sketch_key();
        assert!(Sketch::of(&old, &k).encode(&Sketch::of(&new, &k), &new, &mut enc));
        let head = |base: u64| DeltaHead::replace(base, enc.len());
        let mut stats = ReceiveStats::default();
        assert!(place_delta(&ram, 8192, head(delta::base_hash(&new)), &enc, &mut stats).is_err());
        assert_eq!(page_at(&ram, 8192), old);
        place_delta(&ram, 8192, head(delta::base_hash(&old)), &enc, &mut stats).unwrap();
        assert_eq!(page_at(&ram, 8192), new);
        assert_eq!(stats.delta_pages, 1);
    }

    #[test]
    fn runs_group_consecutive_pages_of_one_kind() {
        let p = PAGE_SIZE;
        let r = runs(
            [
                (0, false),
                (p, false),
                (2 * p, true),
                (3 * p, true),
                (9 * p, true),
                (10 * p, false),
            ]
            .into_iter(),
        );
        assert_eq!(
            r,
            vec![
                (0, 2, false),
                (2 * p, 2, true),
                (9 * p, 1, true),
                (10 * p, 1, false)
            ]
        );
    }

    #[test]
    fn a_batch_lands_at_its_offsets() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let mut b = crate::protocol::PageBatch::default();
        b.push(0, false);
        b.push(4096, false);
        b.push(1 << 20, true);
        let mut payload = b.head();
        payload.extend(std::iter::repeat_n(7u8, 4096));
        payload.extend(std::iter::repeat_n(9u8, 4096));
        let crate::protocol::Frame::Pages { head, data } =
            crate::protocol::decode(Kind::Pages, &payload).unwrap()
        else {
            panic!("not a Pages frame")
        };
        let mut st = ReceiveStats::default();
        place_batch(Dest::ram(&ram), &head, data, Kind::Pages, &mut st).unwrap();
        let mut wrong = ReceiveStats::default();
        assert!(place_batch(
            Dest::ram(&ram),
            &head,
            &data[..4096],
            Kind::Pages,
            &mut wrong
        )
        .is_err());
        let mut back = vec![0u8; 8192];
        ram.read_at(0, &mut back).unwrap();
        assert!(back[..4096].iter().all(|&x| x == 7) && back[4096..].iter().all(|&x| x == 9));
        assert_eq!((st.pages, st.zero_pages), (3, 1));
    }

    #[test]
    fn a_batch_beyond_guest_ram_is_refused() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let mut br = std::io::BufReader::new(std::io::Cursor::new(Vec::new()));
        let mut input = FrameReader::new(&mut br);
        let e = place_direct(
            &mut input,
            &[Entry::new(64 << 20, true)],
            &ram,
            Landing::Splice,
            &mut ReceiveStats::default(),
        );
        assert!(e.is_err());
    }
}
