//! Post-copy's frames. At the switch the source sends [`Kind::Postcopy`] twice: first, while
//! the guest still runs, the pages it has written since they were last sent (the destination
//! drops them, and says [`Kind::OwedPlaced`] once it has, so that this work stays out of the
//! pause); then, paused, those written since ([`OWED_FINAL`]). Each is a bitmap over the
//! memfd, one bit a page; together they are the pages the destination does not hold. The
//! destination resumes the VM with those pages missing; it asks for the ones the guest
//! touches with [`Kind::PageRequest`] on a connection of their own, and the source answers on
//! another with [`Kind::PostcopyPages`], while it pushes the rest over a third (also
//! PostcopyPages) and says [`Kind::PostcopyEnd`] when every owed page has left.
//! [`Kind::PostcopyDone`] on that third says the destination holds all of them.
//!
//! These three connections are post-copy's link; the control connection stays quiet until the
//! guest's verdict. When the link fails, the source dials the three again (the same session,
//! the next attempt's indexes, [`link_index`]) and the destination starts the new push
//! connection with [`Kind::PostcopyResume`]: the pages it still lacks, which the source sends
//! again whatever it sent before.
use zerocopy::byteorder::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{malformed, ProtocolError, PAGE};
use crate::protocol::Kind;

/// The head of a Postcopy frame; the bitmap's u64 words follow.
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug)]
#[repr(C)]
pub struct OwedWire {
    /// Bytes of guest RAM the bitmap covers.
    pub ram_bytes: U64,
    /// Bits set: the pages owed.
    pub pages: U64,
    /// [`OWED_FINAL`], or 0 for the part sent while the guest still runs.
    pub flags: U64,
}

/// The part sent with the VM paused: nothing more is owed.
pub const OWED_FINAL: u64 = 1;

pub const OWED_HEAD_LEN: usize = std::mem::size_of::<OwedWire>();

/// Largest guest RAM post-copy moves (the bitmap is 32 MiB then).
pub const MAX_POSTCOPY_RAM: u64 = 1 << 40;

/// Most pages one PageRequest asks for.
pub const MAX_REQUEST_PAGES: usize = 256;

/// Post-copy's link: asks, answers, push.
pub const LINK_CONNS: u16 = 3;

/// The data hello index of connection `k` (0 asks, 1 answers, 2 push) of the link's
/// `attempt` (0: the one opened with the page streams), after `streams` page streams; None
/// past what an index can say.
pub fn link_index(streams: u16, attempt: u32, k: u16) -> Option<u16> {
    let i = u32::from(streams) + attempt.checked_mul(LINK_CONNS.into())? + u32::from(k);
    u16::try_from(i).ok()
}

/// Which attempt and which of its connections a data hello index names, if it names one.
pub fn link_slot(streams: u16, index: u16) -> Option<(u32, u16)> {
    let i = index.checked_sub(streams)?;
    Some((u32::from(i / LINK_CONNS), i % LINK_CONNS))
}

/// The pages the destination does not hold at the switch: one bit a page of guest RAM, by
/// memfd offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owed {
    pub ram_bytes: u64,
    pub words: Vec<u64>,
    pub pages: u64,
    /// The part sent with the VM paused (the last).
    pub last: bool,
}

impl Owed {
    /// No page owed, over `ram_bytes` of RAM.
    pub fn new(ram_bytes: u64) -> Self {
        let pages = ram_bytes / PAGE as u64;
        Owed {
            ram_bytes,
            words: vec![0; pages.div_ceil(64) as usize],
            pages: 0,
            last: false,
        }
    }

    /// Adds the pages `other` owes (over the same RAM).
    pub fn merge(&mut self, other: &Owed) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
        self.pages = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// Marks the page at memfd offset `off` owed (once).
    pub fn mark(&mut self, off: u64) {
        let p = off / PAGE as u64;
        let (w, b) = ((p / 64) as usize, p % 64);
        if let Some(word) = self.words.get_mut(w) {
            if *word & (1 << b) == 0 {
                *word |= 1 << b;
                self.pages += 1;
            }
        }
    }

    /// Whether the page at memfd offset `off` is owed.
    pub fn is_owed(&self, off: u64) -> bool {
        let p = off / PAGE as u64;
        self.words
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    /// Owed pages' memfd offsets, ascending.
    pub fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = u64::from(w.trailing_zeros());
                    w &= w - 1;
                    (i as u64 * 64 + b) * PAGE as u64
                })
            })
        })
    }

    /// Runs of consecutive owed pages, as memfd ranges `[start, end)`, ascending (made as
    /// they are walked: a scattered bitmap allocates nothing).
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut offs = self.offsets().peekable();
        std::iter::from_fn(move || {
            let start = offs.next()?;
            let mut end = start + PAGE as u64;
            while offs.peek() == Some(&end) {
                offs.next();
                end += PAGE as u64;
            }
            Some((start, end))
        })
    }

    /// The frame's payload.
    pub fn encode(&self) -> Vec<u8> {
        let head = OwedWire {
            ram_bytes: U64::new(self.ram_bytes),
            pages: U64::new(self.pages),
            flags: U64::new(if self.last { OWED_FINAL } else { 0 }),
        };
        let mut out = Vec::with_capacity(OWED_HEAD_LEN + self.words.len() * 8);
        out.extend_from_slice(head.as_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// A Postcopy frame's payload, checked whole: the bitmap covers exactly the RAM it names
    /// (whole pages, at most [`MAX_POSTCOPY_RAM`]), no bit past its end, the count right.
    pub fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let bad = malformed(Kind::Postcopy);
        let (head, rest) =
            OwedWire::read_from_prefix(payload).map_err(|_| bad("shorter than its head".into()))?;
        let ram_bytes = head.ram_bytes.get();
        let flags = head.flags.get();
        if flags & !OWED_FINAL != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        if ram_bytes == 0 || ram_bytes > MAX_POSTCOPY_RAM || !ram_bytes.is_multiple_of(PAGE as u64)
        {
            return Err(bad(format!("a bitmap over {ram_bytes} bytes of RAM")));
        }
        let pages = ram_bytes / PAGE as u64;
        let want = pages.div_ceil(64) as usize * 8;
        if rest.len() != want {
            return Err(bad(format!(
                "{} bytes of bitmap for {pages} pages (expected {want})",
                rest.len()
            )));
        }
        let words: Vec<u64> = rest
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let tail = pages % 64;
        if tail != 0 && words.last().is_some_and(|w| w >> tail != 0) {
            return Err(bad("bits set past the end of guest RAM".into()));
        }
        let count: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        if count != head.pages.get() {
            return Err(bad(format!(
                "{count} bits set, the head says {}",
                head.pages.get()
            )));
        }
        Ok(Owed {
            ram_bytes,
            words,
            pages: count,
            last: flags & OWED_FINAL != 0,
        })
    }
}

/// A PageRequest's payload: memfd offsets of pages, page-aligned, at most
/// [`MAX_REQUEST_PAGES`]; checked against guest RAM of `limit` bytes.
pub fn decode_request(payload: &[u8], limit: u64) -> Result<Vec<u64>, ProtocolError> {
    let bad = malformed(Kind::PageRequest);
    let offs = <[U64]>::ref_from_bytes(payload)
        .map_err(|_| bad(format!("{} bytes is not a list of offsets", payload.len())))?;
    if offs.is_empty() || offs.len() > MAX_REQUEST_PAGES {
        return Err(bad(format!("{} pages asked for", offs.len())));
    }
    offs.iter()
        .map(|o| {
            let o = o.get();
            if !o.is_multiple_of(PAGE as u64) || o >= limit {
                Err(bad(format!("{o:#x} is not a page of guest RAM")))
            } else {
                Ok(o)
            }
        })
        .collect()
}

/// A PageRequest's payload for `pages` (memfd offsets).
pub fn encode_request(pages: &[u64]) -> Vec<u8> {
    pages.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// What post-copy measured on the destination (the PostcopyDone frame, JSON).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PostcopyStats {
    /// Faults on owed pages: the guest (or a device) touched a page not here yet.
    pub faults: u64,
    pub fault_p50_us: u64,
    pub fault_p99_us: u64,
    pub fault_max_us: u64,
    /// Pages asked for on the request connection.
    pub pages_demanded: u64,
    /// Owed pages that arrived by the background push first.
    pub pages_pushed: u64,
    /// From the resume until every owed page was here, ms.
    pub complete_ms: u64,
    /// Pages the guest wrote here in that time, by its own count (None: it does not count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_pages_written: Option<u64>,
    /// Its pages written per second here, over its own reports in that time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_writes_per_s: Option<f64>,
    /// Times the link failed and was made again.
    #[serde(default)]
    pub recoveries: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_attempt_of_the_link_has_indexes_of_its_own() {
        assert_eq!(link_index(2, 0, 0), Some(2));
        assert_eq!(link_index(2, 1, 2), Some(7));
        assert_eq!(link_slot(2, 7), Some((1, 2)));
        assert_eq!(link_slot(2, 1), None, "a page stream");
        for a in 0..100 {
            for k in 0..LINK_CONNS {
                assert_eq!(link_slot(4, link_index(4, a, k).unwrap()), Some((a, k)));
            }
        }
        assert_eq!(link_index(0, u32::MAX, 0), None);
        assert_eq!(link_index(0, 30_000, 0), None);
    }

    #[test]
    fn owed_pages_round_trip_and_give_their_runs() {
        let mut o = Owed::new(64 << 20);
        for off in [0, 4096, 8192, 40960, (64 << 20) - 4096] {
            o.mark(off);
        }
        o.mark(4096);
        assert_eq!(o.pages, 5);
        o.last = true;
        let back = Owed::decode(&o.encode()).unwrap();
        assert_eq!(back, o);
        let mut more = Owed::new(64 << 20);
        more.mark(0);
        more.mark(1 << 20);
        more.merge(&o);
        assert_eq!(more.pages, 6);
        assert_eq!(
            back.runs().collect::<Vec<_>>(),
            vec![(0, 12288), (40960, 45056), ((64 << 20) - 4096, 64 << 20)]
        );
        assert!(back.is_owed(8192) && !back.is_owed(12288));
    }

    #[test]
    fn hostile_bitmaps_are_refused() {
        let o = Owed::new(1 << 20);
        let mut b = o.encode();
        b.pop();
        assert!(Owed::decode(&b).is_err(), "short bitmap");
        let mut wrong_count = o.encode();
        wrong_count[8] = 3;
        assert!(Owed::decode(&wrong_count).is_err(), "count");
        let mut flags = o.encode();
        flags[16] = 2;
        assert!(Owed::decode(&flags).is_err(), "unknown flags");
        // 1 MiB is 256 pages: 4 words exactly. 1 MiB + 4 KiB leaves bits past the end.
        let mut odd = Owed::new((1 << 20) + 4096);
        odd.mark(1 << 20);
        let mut b = odd.encode();
        let last = b.len() - 8;
        b[last] |= 0b100; // page 258, past the end
        b[8] = 2;
        assert!(Owed::decode(&b).is_err(), "bit past the end");
        let mut huge = Owed::new(1 << 20).encode();
        huge[..8].copy_from_slice(&(MAX_POSTCOPY_RAM * 2).to_le_bytes());
        assert!(Owed::decode(&huge).is_err(), "RAM too large");
        assert!(Owed::decode(&[1, 2, 3]).is_err());
    }

    #[test]
    fn requests_name_pages_inside_ram() {
        let ok = encode_request(&[0, 8192]);
        assert_eq!(decode_request(&ok, 1 << 20).unwrap(), vec![0, 8192]);
        assert!(decode_request(&encode_request(&[4097]), 1 << 20).is_err());
        assert!(decode_request(&encode_request(&[1 << 20]), 1 << 20).is_err());
        assert!(decode_request(&[], 1 << 20).is_err());
        assert!(decode_request(&[0; 7], 1 << 20).is_err());
        let many: Vec<u64> = (0..=MAX_REQUEST_PAGES as u64).map(|p| p * 4096).collect();
        assert!(decode_request(&encode_request(&many), 1 << 40).is_err());
    }
}
