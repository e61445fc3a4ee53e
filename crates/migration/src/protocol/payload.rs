//! What frames carry: the typed payloads (Config, Redirect, Verified, ...), batch heads and
//! their pages, and [`decode`], which turns a payload into a [`Frame`] or refuses it.

use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, IntoBytes};

use super::*;
use crate::codec::Codec;

/// The Config frame's payload: the VM to build and the page streams that will follow.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Prepare {
    pub vm: migratable::VmConfig,
    /// Page streams beside the control connection; 0 = pages travel on the control connection.
    pub streams: u16,
    /// Ties the page streams to this migration.
    pub session: u64,
    /// The VM's name on its host (host agents keep it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The host it leaves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The VM's generation in the cluster when the migration started: what the
    /// destination's commit swaps from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The destination host's page cache this migration may use (the drain's id for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cache: Option<u64>,
    /// The state sections the source will send, with their versions: a destination that does
    /// not know one refuses the migration now, before the source stops.
    #[serde(default)]
    pub sections: Vec<migratable::SectionId>,
    /// Disks whose content the migration copies (`--storage copy`), sent as DiskBlocks; the
    /// destination writes them to its disk directory and the VM there uses the copies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskOffer>,
    /// Post-copy may follow: two more connections come after the page streams (indexes
    /// `streams` and `streams + 1`), for the destination's asks and the source's answers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy: bool,
}

/// Most extents an Extents frame announces (nearby ones are merged to fit).
pub const MAX_EXTENTS: usize = 512;

/// `extents` (ascending, disjoint) merged across their smallest gaps until at most `max`
/// remain.
pub fn coalesce(extents: &[(u64, u64)], max: usize) -> Vec<(u64, u64)> {
    let max = max.max(1);
    if extents.len() <= max {
        return extents.to_vec();
    }
    // Gap i lies between extents i and i + 1; close the smallest len - max of them.
    let mut by_size: Vec<usize> = (0..extents.len() - 1).collect();
    by_size.sort_by_key(|&i| (extents[i + 1].0.saturating_sub(extents[i].1), i));
    let mut close = vec![false; extents.len() - 1];
    for &i in &by_size[..extents.len() - max] {
        close[i] = true;
    }
    let mut out = vec![extents[0]];
    for (i, &next) in extents.iter().enumerate().skip(1) {
        match out.last_mut() {
            Some(last) if close[i - 1] => last.1 = next.1,
            _ => out.push(next),
        }
    }
    out
}

/// The Redirect frame's payload: where the receiver for this migration listens.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Redirect {
    /// Port on the host the source connected to.
    pub port: u16,
}

/// How the destination spent the switchover, from when it read the source's Paused: until
/// the last round and the state were in (`received`), the state loaded into the VM built
/// (`loaded`), and the Confirm about to leave, the cluster's commit included (`confirming`).
/// Microseconds; where the destination saw no Paused, from the last frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Confirmed {
    pub received_us: u32,
    pub loaded_us: u32,
    pub confirming_us: u32,
}

/// The end of a round: its number and how many pages it had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundEnd {
    pub round: u32,
    pub pages: u64,
}

pub(super) fn yes() -> bool {
    true
}

/// The guest's verify on the destination, as sent back to the source.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VerifyOutcome {
    pub ok: bool,
    pub detail: String,
    /// False when the guest cannot verify itself (not the livemig workload guest): `ok` then
    /// says nothing.
    #[serde(default = "yes")]
    pub verifiable: bool,
    /// CPU the destination's migration threads used.
    pub cpu_seconds: f64,
    /// From the Confirm leaving to the guest's vCPUs running, ms: the guest's pause beyond
    /// the downtime the source measures (the record that the VM runs here is synced first).
    #[serde(default)]
    pub resumed_ms: f64,
}

/// A batch head (count + entries), checked for shape: count within the limit, entries whole,
/// no unknown flags. Offsets are checked against guest RAM with [`BatchHead::check`].
#[derive(Clone, Copy, Debug)]
pub struct BatchHead<'a> {
    entries: &'a [Entry],
}

impl<'a> BatchHead<'a> {
    /// Splits `b` into its head and what follows.
    pub(super) fn parse(b: &'a [u8], kind: Kind) -> Result<(Self, &'a [u8]), ProtocolError> {
        let bad = malformed(kind);
        let (count, rest) =
            U32::read_from_prefix(b).map_err(|_| bad("shorter than its count".into()))?;
        let count = count.get() as usize;
        if count > MAX_BATCH_PAGES {
            return Err(bad(format!(
                "{count} pages, the limit is {MAX_BATCH_PAGES}"
            )));
        }
        let (entries, rest) = <[Entry]>::ref_from_prefix_with_elems(rest, count)
            .map_err(|_| bad(format!("{count} entries do not fit in {} bytes", b.len())))?;
        if let Some((i, e)) = entries
            .iter()
            .enumerate()
            .find(|(_, e)| e.unknown_flags() != 0 || e.conflicting())
        {
            return Err(bad(format!(
                "entry {i} has unknown or conflicting flag bits {:#x}",
                e.0.get()
            )));
        }
        Ok((BatchHead { entries }, rest))
    }

    pub fn entries(&self) -> &'a [Entry] {
        self.entries
    }

    /// Entries with data: whole pages and deltas.
    pub fn data_pages(&self) -> usize {
        self.entries.iter().filter(|e| !e.is_zero()).count()
    }

    pub fn delta_pages(&self) -> usize {
        self.entries.iter().filter(|e| e.is_delta()).count()
    }

    pub fn ref_pages(&self) -> usize {
        self.entries.iter().filter(|e| e.is_ref()).count()
    }

    /// Whether some entries' data is not a whole page (deltas, references).
    pub fn encoded(&self) -> bool {
        self.entries.iter().any(|e| e.is_delta() || e.is_ref())
    }

    /// The most data the entries can carry: whole pages, deltas at their largest, references.
    pub fn max_data_len(&self) -> usize {
        let (deltas, refs) = (self.delta_pages(), self.ref_pages());
        (self.data_pages() - deltas - refs) * PAGE
            + deltas * (DELTA_HEAD_LEN + crate::delta::MAX_DELTA)
            + refs * REF_HEAD_LEN
    }

    /// Every page must lie inside guest RAM of `limit` bytes.
    pub fn check(&self, limit: u64, kind: Kind) -> Result<(), ProtocolError> {
        match self.entries.iter().find(|e| e.offset() >= limit) {
            Some(e) => Err(malformed(kind)(format!(
                "page offset {:#x} is beyond guest RAM ({limit:#x})",
                e.offset()
            ))),
            None => Ok(()),
        }
    }

    /// Every page inside guest RAM of `limit` bytes, and `data_len` exactly the data pages
    /// (without deltas; with them, [`BatchHead::pages`] walks the data).
    pub fn validate(&self, data_len: usize, limit: u64, kind: Kind) -> Result<(), ProtocolError> {
        self.check(limit, kind)?;
        if !self.encoded() && data_len != self.data_pages() * PAGE {
            return Err(malformed(kind)(format!(
                "{data_len} bytes of page data for {} data pages",
                self.data_pages()
            )));
        }
        Ok(())
    }

    /// The batch's pages with their data, which must be exactly the data pages and deltas in
    /// order.
    pub fn pages<'d>(
        &self,
        data: &'d [u8],
        limit: u64,
        kind: Kind,
    ) -> Result<Vec<PageRef<'d>>, ProtocolError> {
        self.validate(data.len(), limit, kind)?;
        let bad = malformed(kind);
        let mut rest = data;
        let mut out = Vec::with_capacity(self.entries.len());
        for e in self.entries {
            let mut replace = false;
            let (data, base, from) = if e.is_zero() {
                (None, None, None)
            } else if e.is_ref() {
                let (h, tail) = RefHead::ref_from_prefix(rest).map_err(|_| {
                    bad(format!(
                        "the reference of page {:#x} is cut short",
                        e.offset()
                    ))
                })?;
                let from = match h.from.get() {
                    FROM_HOST_CACHE => RefTo::HostCache,
                    f if f % PAGE as u64 != 0 || f >= limit || f == e.offset() => {
                        return Err(bad(format!(
                            "page {:#x} refers to {f:#x}, not another page of guest RAM",
                            e.offset()
                        )))
                    }
                    f => RefTo::Page(f),
                };
                rest = tail;
                (Some(&h.hash[..]), None, Some(from))
            } else if e.is_delta() {
                let (h, tail) = DeltaHead::read_from_prefix(rest).map_err(|_| {
                    bad(format!("the delta of page {:#x} is cut short", e.offset()))
                })?;
                replace = h.len.get() & crate::delta::REPLACE != 0;
                let len = usize::from(h.len.get() & !crate::delta::REPLACE);
                if len > crate::delta::MAX_DELTA || tail.len() < len {
                    return Err(bad(format!(
                        "a delta of {len} bytes for page {:#x} ({} left, at most {})",
                        e.offset(),
                        tail.len(),
                        crate::delta::MAX_DELTA
                    )));
                }
                rest = &tail[len..];
                (Some(&tail[..len]), Some(h.base.get()), None)
            } else {
                let page = rest
                    .get(..PAGE)
                    .ok_or_else(|| bad(format!("page {:#x} is cut short", e.offset())))?;
                rest = &rest[PAGE..];
                (Some(page), None, None)
            };
            out.push(PageRef {
                offset: e.offset(),
                data,
                base,
                replace,
                from,
            });
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the last page", rest.len())));
        }
        Ok(out)
    }
}

/// One page of a decoded batch.
#[derive(Debug, PartialEq, Eq)]
pub struct PageRef<'a> {
    pub offset: u64,
    /// None = all zero.
    pub data: Option<&'a [u8]>,
    /// Some: `data` is a delta against the version of the page with this hash.
    pub base: Option<u64>,
    /// The delta's runs carry new words ([`crate::delta::REPLACE`]), not old XOR new.
    pub replace: bool,
    /// Some: the page's content is there already, and `data` is its BLAKE3 hash.
    pub from: Option<RefTo>,
}

/// A PagesCompressed payload: codec, head, compressed data, and the data's raw length.
#[derive(Debug)]
pub struct CompressedBatch<'a> {
    pub codec: Codec,
    pub head: BatchHead<'a>,
    pub data: &'a [u8],
    pub raw_len: usize,
}

/// A frame, decoded.
#[derive(Debug)]
pub enum Frame<'a> {
    Config(Prepare),
    Ready,
    Pages {
        head: BatchHead<'a>,
        data: &'a [u8],
    },
    PagesCompressed(CompressedBatch<'a>),
    /// The head; its page data follows on the stream ([`FrameReader::read_direct`]).
    PagesDirect(BatchHead<'a>),
    RoundEnd(RoundEnd),
    State(Box<migratable::Snapshot>),
    Done,
    Confirm(Confirmed),
    Verified(VerifyOutcome),
    Redirect(Redirect),
    /// Keys of the pages in the destination host's cache, [`crate::host_cache::KEY_LEN`]
    /// bytes each.
    CacheKeys(&'a [u8]),
    RoundDone(RoundEnd),
    /// The RAM the copy will send: memfd ranges `[start, end)`, as the source says (the
    /// receiver checks them against guest RAM).
    Extents(Vec<(u64, u64)>),
    DiskBlocks(DiskBlocks<'a>),
    Postcopy(Owed),
    PostcopyPages {
        head: BatchHead<'a>,
        data: &'a [u8],
    },
    PostcopyEnd,
    /// Memfd offsets of owed pages, page-aligned (checked against guest RAM by the source).
    PageRequest(Vec<u64>),
    PostcopyDone(PostcopyStats),
    NoPostcopy(String),
    OwedPlaced,
    PostcopyResume(Owed),
    Paused,
}

impl Frame<'_> {
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Config(_) => Kind::Config,
            Frame::Ready => Kind::Ready,
            Frame::Pages { .. } => Kind::Pages,
            Frame::PagesCompressed(_) => Kind::PagesCompressed,
            Frame::PagesDirect(_) => Kind::PagesDirect,
            Frame::RoundEnd(_) => Kind::RoundEnd,
            Frame::State(_) => Kind::State,
            Frame::Done => Kind::Done,
            Frame::Confirm(_) => Kind::Confirm,
            Frame::Verified(_) => Kind::Verified,
            Frame::Redirect(_) => Kind::Redirect,
            Frame::CacheKeys(_) => Kind::CacheKeys,
            Frame::RoundDone(_) => Kind::RoundDone,
            Frame::Extents(_) => Kind::Extents,
            Frame::DiskBlocks(_) => Kind::DiskBlocks,
            Frame::Postcopy(_) => Kind::Postcopy,
            Frame::PostcopyPages { .. } => Kind::PostcopyPages,
            Frame::PostcopyEnd => Kind::PostcopyEnd,
            Frame::PageRequest(_) => Kind::PageRequest,
            Frame::PostcopyDone(_) => Kind::PostcopyDone,
            Frame::NoPostcopy(_) => Kind::NoPostcopy,
            Frame::OwedPlaced => Kind::OwedPlaced,
            Frame::PostcopyResume(_) => Kind::PostcopyResume,
            Frame::Paused => Kind::Paused,
        }
    }
}

/// Decodes a checked frame's payload by its kind.
pub fn decode(kind: Kind, payload: &[u8]) -> Result<Frame<'_>, ProtocolError> {
    let bad = malformed(kind);
    let json = |e: serde_json::Error| bad(e.to_string());
    Ok(match kind {
        Kind::Config => Frame::Config(serde_json::from_slice(payload).map_err(json)?),
        Kind::Ready => Frame::Ready,
        Kind::Done => Frame::Done,
        Kind::Confirm => {
            let w = ConfirmWire::read_from_bytes(payload)
                .map_err(|_| bad(format!("{} bytes, expected 12", payload.len())))?;
            Frame::Confirm(Confirmed {
                received_us: w.received_us.get(),
                loaded_us: w.loaded_us.get(),
                confirming_us: w.confirming_us.get(),
            })
        }
        Kind::Pages => {
            let (head, data) = BatchHead::parse(payload, kind)?;
            Frame::Pages { head, data }
        }
        Kind::PagesCompressed => Frame::PagesCompressed(decode_compressed(payload)?),
        Kind::PagesDirect => {
            let head = BatchHead::parse(payload, kind)?.0;
            if head.encoded() {
                return Err(bad(
                    "deltas and references cannot travel as direct page data".into(),
                ));
            }
            Frame::PagesDirect(head)
        }
        Kind::RoundEnd | Kind::RoundDone => {
            let w = RoundEndWire::read_from_bytes(payload)
                .map_err(|_| bad(format!("{} bytes, expected 12", payload.len())))?;
            let r = RoundEnd {
                round: w.round.get(),
                pages: w.pages.get(),
            };
            if kind == Kind::RoundEnd {
                Frame::RoundEnd(r)
            } else {
                Frame::RoundDone(r)
            }
        }
        Kind::State => Frame::State(Box::new(
            migratable::Snapshot::from_bytes(payload).map_err(|e| bad(e.to_string()))?,
        )),
        Kind::Verified => Frame::Verified(serde_json::from_slice(payload).map_err(json)?),
        Kind::Redirect => Frame::Redirect(serde_json::from_slice(payload).map_err(json)?),
        Kind::CacheKeys => {
            if !payload.len().is_multiple_of(crate::host_cache::KEY_LEN) {
                return Err(bad(format!(
                    "{} bytes is not a list of keys",
                    payload.len()
                )));
            }
            Frame::CacheKeys(payload)
        }
        // The length is within the kind's limit already, so this allocates at most that.
        Kind::Extents => Frame::Extents(
            <[ExtentWire]>::ref_from_bytes(payload)
                .map_err(|_| bad(format!("{} bytes is not a list of extents", payload.len())))?
                .iter()
                .map(|e| (e.start.get(), e.end.get()))
                .collect(),
        ),
        Kind::DiskBlocks => Frame::DiskBlocks(disk::decode_disk_blocks(payload)?),
        Kind::Postcopy => Frame::Postcopy(Owed::decode(payload)?),
        Kind::PostcopyResume => Frame::PostcopyResume(Owed::decode(payload)?),
        Kind::PostcopyPages => {
            let (head, data) = BatchHead::parse(payload, kind)?;
            if head.encoded() {
                return Err(bad("post-copy pages are whole pages or zero".into()));
            }
            Frame::PostcopyPages { head, data }
        }
        Kind::PostcopyEnd => Frame::PostcopyEnd,
        Kind::OwedPlaced => Frame::OwedPlaced,
        Kind::Paused => Frame::Paused,
        Kind::PageRequest => Frame::PageRequest(decode_request(payload, MAX_POSTCOPY_RAM)?),
        Kind::PostcopyDone => Frame::PostcopyDone(serde_json::from_slice(payload).map_err(json)?),
        Kind::NoPostcopy => Frame::NoPostcopy(String::from_utf8_lossy(payload).into_owned()),
        Kind::Abort => {
            return Err(ProtocolError::PeerAborted(
                String::from_utf8_lossy(payload).into_owned(),
            ))
        }
        Kind::Busy => {
            return Err(ProtocolError::PeerBusy(
                String::from_utf8_lossy(payload).into_owned(),
            ))
        }
    })
}

pub(super) fn decode_compressed(payload: &[u8]) -> Result<CompressedBatch<'_>, ProtocolError> {
    let bad = malformed(Kind::PagesCompressed);
    let (h, rest) = CompressedHeader::read_from_prefix(payload)
        .map_err(|_| bad("shorter than its header".into()))?;
    let codec = Codec::from_u8(h.codec).ok_or_else(|| bad(format!("unknown codec {}", h.codec)))?;
    let raw_len = h.raw_len.get() as usize;
    let (head, data) = BatchHead::parse(rest, Kind::PagesCompressed)?;
    // Checked before decompressing: a frame cannot make us allocate more than a batch.
    let exact = !head.encoded();
    if (exact && raw_len != head.data_pages() * PAGE) || raw_len > head.max_data_len() {
        return Err(bad(format!(
            "raw length {raw_len} for {} data pages",
            head.data_pages()
        )));
    }
    Ok(CompressedBatch {
        codec,
        head,
        data,
        raw_len,
    })
}

/// `extents` (ascending [start, end) byte ranges) cut into pieces of at most `chunk` bytes.
pub fn chunks(extents: &[(u64, u64)], chunk: u64) -> Vec<(u64, u64)> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    for &(s, e) in extents {
        let mut at = s;
        while at < e {
            let end = e.min(at.saturating_add(chunk));
            out.push((at, end));
            at = end;
        }
    }
    out
}

/// Builds a batch head: u32 count, then count × [`Entry`]. Page data goes beside it.
#[derive(Default)]
pub struct PageBatch {
    entries: Vec<Entry>,
}

impl PageBatch {
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn push(&mut self, offset: u64, zero: bool) {
        self.entries.push(Entry::new(offset, zero));
    }

    /// A page whose data is a [`DeltaHead`] and its encoding.
    pub fn push_delta(&mut self, offset: u64) {
        self.entries.push(Entry::delta(offset));
    }

    /// A page whose data is a [`RefHead`].
    pub fn push_ref(&mut self, offset: u64) {
        self.entries.push(Entry::reference(offset));
    }

    /// The head's bytes (count + entries).
    pub fn head(&self) -> Vec<u8> {
        let count = U32::new(u32::try_from(self.entries.len()).unwrap_or(u32::MAX));
        let mut h = Vec::with_capacity(COUNT_LEN + self.entries.len() * ENTRY_LEN);
        h.extend_from_slice(count.as_bytes());
        h.extend_from_slice(self.entries.as_bytes());
        h
    }
}
