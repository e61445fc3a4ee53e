//! The migration wire protocol, all of it: every fixed-layout header is a `#[repr(C)]` struct
//! read and written with zerocopy, and every frame kind is encoded and decoded here.
//!
//! Handshake (16 bytes each way, [`HelloWire`]): magic `LVMG`, version, transport, status
//! (reply only), capabilities. Page streams open with their own 16 bytes ([`DataHelloWire`]).
//! Then frames: a 24-byte [`FrameHeader`] (kind, sequence number counting from 0 per
//! direction, payload length, xxh3-64 over header bytes 0..16 and the payload) and the payload.
//! Lengths are bounded per kind before anything is allocated; anything else is an error.
use std::io::{self, BufRead, Read, Write};

use vm_memory::VolatileSlice;
use xxhash_rust::xxh3::Xxh3;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::codec::Codec;

pub const MAGIC: [u8; 4] = *b"LVMG";
const DATA_MAGIC: [u8; 4] = *b"LVMD";
const PROBE_MAGIC: [u8; 4] = *b"LVMP";
pub const VERSION: u16 = 3;
pub const HELLO_LEN: usize = std::mem::size_of::<HelloWire>();
pub const HEADER_LEN: usize = std::mem::size_of::<FrameHeader>();
pub const PAGE: usize = 4096;
/// Pages per batch frame: 1 MiB of data, big enough to amortise headers and checksums.
pub const MAX_BATCH_PAGES: usize = 256;
/// Page streams a migration may open beside its control connection.
pub const MAX_STREAMS: u16 = 16;
const ZERO_FLAG: u64 = 1;
/// The entry's data is a [`DeltaHead`] and a delta encoding ([`crate::delta`]), not a page.
const DELTA_FLAG: u64 = 2;
/// The entry's data is a [`RefHead`]: the page holds what another page of this VM holds.
const REF_FLAG: u64 = 4;
const KIND_FLAGS: u64 = ZERO_FLAG | DELTA_FLAG | REF_FLAG;
const ENTRY_LEN: usize = std::mem::size_of::<Entry>();
const COUNT_LEN: usize = std::mem::size_of::<U32>();

/// The handshake, both ways: the source's offer and the destination's answer.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct HelloWire {
    magic: [u8; 4],
    version: U16,
    transport: u8,
    /// Reply only: [`HelloStatus`].
    status: u8,
    capabilities: U64,
}

/// First bytes on a page stream: which migration and which stream it is.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct DataHelloWire {
    magic: [u8; 4],
    version: U16,
    index: U16,
    session: U64,
}

/// The header in front of every frame.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct FrameHeader {
    kind: u8,
    reserved: [u8; 3],
    seq: U32,
    len: U32,
    reserved2: U32,
    /// xxh3-64 over the 16 bytes before it and the payload.
    checksum: U64,
}

/// In front of a PagesCompressed payload's batch head.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
struct CompressedHeader {
    codec: u8,
    reserved: [u8; 3],
    /// Length of the data pages once decompressed.
    raw_len: U32,
}

/// A RoundEnd payload.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
struct RoundEndWire {
    round: U32,
    pages: U64,
}

/// One extent of an Extents frame: memfd offsets `[start, end)`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct ExtentWire {
    start: U64,
    end: U64,
}

/// One entry of a batch head: a page's memfd offset, with flags in its low bits.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(transparent)]
pub struct Entry(U64);

impl Entry {
    pub fn new(offset: u64, zero: bool) -> Self {
        Entry(U64::new(offset | if zero { ZERO_FLAG } else { 0 }))
    }
    pub fn offset(&self) -> u64 {
        self.0.get() & !(PAGE as u64 - 1)
    }
    /// A page sent as a delta against the version the destination holds.
    pub fn delta(offset: u64) -> Self {
        Entry(U64::new(offset | DELTA_FLAG))
    }
    pub fn is_zero(&self) -> bool {
        self.0.get() & ZERO_FLAG != 0
    }
    pub fn is_delta(&self) -> bool {
        self.0.get() & DELTA_FLAG != 0
    }
    /// A page with the content of another page the destination already placed.
    pub fn reference(offset: u64) -> Self {
        Entry(U64::new(offset | REF_FLAG))
    }
    pub fn is_ref(&self) -> bool {
        self.0.get() & REF_FLAG != 0
    }
    fn unknown_flags(&self) -> u64 {
        self.0.get() & (PAGE as u64 - 1) & !KIND_FLAGS
    }
    /// At most one of zero, delta and reference.
    fn conflicting(&self) -> bool {
        (self.0.get() & KIND_FLAGS).count_ones() > 1
    }
}

/// A reference entry's data: where the same content already is, and its BLAKE3 hash, which
/// the destination checks there before copying it (a guest cannot make another page's
/// content land in its place by crafting a collision).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RefHead {
    pub from: U64,
    pub hash: [u8; 32],
}

pub const REF_HEAD_LEN: usize = std::mem::size_of::<RefHead>();

/// `from` of a reference to the destination host's page cache ([`crate::host_cache`]) rather
/// than to a page of this VM: no page offset (those are page-aligned).
const FROM_HOST_CACHE: u64 = u64::MAX;

impl RefHead {
    pub fn new(from: u64, hash: [u8; 32]) -> Self {
        RefHead {
            from: U64::new(from),
            hash,
        }
    }

    /// A page the destination host holds in its page cache under this hash.
    pub fn host_cache(hash: [u8; 32]) -> Self {
        Self::new(FROM_HOST_CACHE, hash)
    }
}

/// Where a reference's content is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefTo {
    /// Another page of this VM, placed before.
    Page(u64),
    /// The destination host's page cache.
    HostCache,
}

/// In front of a delta entry's encoding in a batch's data.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct DeltaHead {
    /// [`crate::delta::base_hash`] of the version the delta was computed against.
    pub base: U64,
    /// Bytes of encoding that follow, at most [`crate::delta::MAX_DELTA`].
    pub len: U16,
}

pub const DELTA_HEAD_LEN: usize = std::mem::size_of::<DeltaHead>();

impl DeltaHead {
    /// `len` is at most [`crate::delta::MAX_DELTA`], so it fits.
    pub fn new(base: u64, len: usize) -> Self {
        DeltaHead {
            base: U64::new(base),
            len: U16::new(u16::try_from(len).unwrap_or(u16::MAX)),
        }
    }

    /// A delta of replacement runs ([`crate::delta::apply_replace`]).
    pub fn replace(base: u64, len: usize) -> Self {
        let mut h = Self::new(base, len);
        h.len = U16::new(h.len.get() | crate::delta::REPLACE);
        h
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp = 1,
    /// Page batches may be lz4/zstd compressed (PagesCompressed frames).
    Compressed = 2,
    /// Page data goes from guest RAM to the socket without copies and is read straight into
    /// guest RAM at its final address (PagesDirect frames).
    Direct = 3,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Compressed => "compressed",
            Transport::Direct => "direct",
        }
    }
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Transport::Tcp),
            2 => Some(Transport::Compressed),
            3 => Some(Transport::Direct),
            _ => None,
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "compressed" => Ok(Transport::Compressed),
            "direct" => Ok(Transport::Direct),
            other => Err(format!(
                "unknown transport {other:?} (expected tcp, compressed or direct)"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// src→dst: JSON [`Prepare`]; the destination builds the VM.
    Config = 1,
    /// dst→src: the VM is built.
    Ready = 2,
    /// src→dst: a batch of pages.
    Pages = 3,
    /// src→dst: [`RoundEnd`].
    RoundEnd = 4,
    /// src→dst: JSON [`migratable::Snapshot`], the VM's state sections (the VM is paused on
    /// the source).
    State = 5,
    /// src→dst: nothing more follows.
    Done = 6,
    /// dst→src: everything is in place; the destination resumes the VM.
    Confirm = 7,
    /// dst→src: JSON [`VerifyOutcome`] of the guest's own verify on the destination.
    Verified = 8,
    /// either way: UTF-8 reason; the migration is off.
    Abort = 9,
    /// src→dst: a [`CompressedHeader`], a batch head (count + entries), then the non-zero
    /// pages' data compressed as one block.
    PagesCompressed = 10,
    /// src→dst: a batch head, then the data pages straight from guest RAM. The checksum covers
    /// the header and the head: the data may be changed by the running guest after it was read
    /// for a checksum, so it rests on TCP's; a torn page is dirty and always sent again, and the
    /// last (paused) round cannot tear.
    PagesDirect = 11,
    /// dst→src, instead of Ready: JSON [`Redirect`]; a host agent admitted the VM and a
    /// receiver of its own waits for it on another port: connect there and start again.
    Redirect = 12,
    /// dst→src, before Ready when the Config named the host's page cache: the keys
    /// ([`crate::host_cache::key`], 16 bytes each) of the pages it holds.
    CacheKeys = 13,
    /// dst→src: [`RoundEnd`] of a round whose pages are all in place here, so the source
    /// pauses only once the destination has caught up (what it still had to place would
    /// otherwise be in the downtime).
    RoundDone = 14,
    /// src→dst, first after Ready: the RAM the copy will send, as memfd ranges `[start, end)`
    /// ([`ExtentWire`], at most [`MAX_EXTENTS`]), which the destination may allocate ahead of
    /// the pages. Not in the Config, so the source looks for them while the destination builds.
    Extents = 15,
    /// dst→src, instead of Ready (or for an authenticated connection the listener has no
    /// room for, as its hello's answer): UTF-8 reason; this host cannot take the migration
    /// now (too many at once) and a later attempt may succeed.
    Busy = 16,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Config,
            2 => Kind::Ready,
            3 => Kind::Pages,
            4 => Kind::RoundEnd,
            5 => Kind::State,
            6 => Kind::Done,
            7 => Kind::Confirm,
            8 => Kind::Verified,
            9 => Kind::Abort,
            10 => Kind::PagesCompressed,
            11 => Kind::PagesDirect,
            12 => Kind::Redirect,
            13 => Kind::CacheKeys,
            14 => Kind::RoundDone,
            15 => Kind::Extents,
            16 => Kind::Busy,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_len(self) -> usize {
        const BATCH: usize = COUNT_LEN + MAX_BATCH_PAGES * (ENTRY_LEN + PAGE);
        match self {
            Kind::Ready | Kind::Done | Kind::Confirm => 0,
            Kind::RoundEnd | Kind::RoundDone => std::mem::size_of::<RoundEndWire>(),
            Kind::Config | Kind::Verified | Kind::Abort | Kind::Busy | Kind::Redirect => 64 << 10,
            Kind::Pages | Kind::PagesDirect => BATCH,
            // Incompressible data can grow a little; never past this.
            Kind::PagesCompressed => std::mem::size_of::<CompressedHeader>() + BATCH + (64 << 10),
            Kind::State => 32 << 20,
            Kind::CacheKeys => {
                crate::host_cache::MAX_CACHE_PAGES as usize * crate::host_cache::KEY_LEN
            }
            Kind::Extents => MAX_EXTENTS * std::mem::size_of::<ExtentWire>(),
        }
    }
}

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ProtocolError {
    /// connection: {0}
    Io(#[from] io::Error),
    /// the stream ended in the middle of {0}
    Truncated(&'static str),
    /// the peer closed the connection
    Closed,
    /// bad magic {0:02x?}: the peer is not livemig
    BadMagic([u8; 4]),
    /// protocol version {theirs} is not supported (this livemig speaks 3)
    Version { theirs: u16 },
    /// transport {0} is not supported by the destination
    TransportUnsupported(u8),
    /// unknown frame kind {0}
    UnknownKind(u8),
    /// page {offset:#x} refers to page {from:#x}, whose content here does not have the hash it names: refused
    RefMismatch { offset: u64, from: u64 },
    /// page {offset:#x} refers to a page of this host's cache that it does not hold with the hash it names: refused
    HostRefMissing { offset: u64 },
    /// a delta for page {offset:#x} against version {base:016x}, but this host holds version {held:016x}: refused
    DeltaBase { offset: u64, base: u64, held: u64 },
    /// {kind:?} frame of {len} bytes exceeds its limit of {max}
    Oversized { kind: Kind, len: usize, max: usize },
    /// frame {seq} ({kind:?}) failed its checksum
    Checksum { seq: u32, kind: Kind },
    /// frame out of order: expected sequence {expected}, got {got}
    OutOfOrder { expected: u32, got: u32 },
    /// {kind:?} frame not expected in state {state}
    Unexpected { kind: Kind, state: &'static str },
    /// malformed {kind:?} frame: {why}
    Malformed { kind: Kind, why: String },
    /// the peer aborted: {0}
    PeerAborted(String),
    /// the destination is busy: {0}
    PeerBusy(String),
    /// the destination expects TLS: it requires mutual TLS with the cluster's certificates, and this side runs --insecure
    TlsRequired,
}

fn malformed(kind: Kind) -> impl Fn(String) -> ProtocolError {
    move |why| ProtocolError::Malformed { kind, why }
}

fn read_full(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), ProtocolError> {
    let mut off = 0;
    while off < buf.len() {
        match r.read(&mut buf[off..]) {
            Ok(0) if off == 0 && what == "a frame header" => return Err(ProtocolError::Closed),
            Ok(0) => return Err(ProtocolError::Truncated(what)),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads one fixed-layout header.
fn read_header<T: FromBytes + IntoBytes>(
    r: &mut impl Read,
    what: &'static str,
) -> Result<T, ProtocolError> {
    let mut v = T::new_zeroed();
    read_full(r, v.as_mut_bytes(), what)?;
    Ok(v)
}

// ---- handshake ----

/// What the source offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub transport: Transport,
    pub capabilities: u64,
}

/// The destination's answer to a hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum HelloStatus {
    Ok = 0,
    Version = 1,
    Transport = 2,
    // 3 and 4: a listener's notice to a peer of the other protection ([`transport::mismatch`]).
    /// The listener has no room for another connection now; the reason follows as a Busy
    /// frame's payload would, as a u16 length and UTF-8.
    Busy = 5,
}

pub fn write_hello(w: &mut impl Write, h: &Hello) -> Result<(), ProtocolError> {
    let wire = HelloWire {
        magic: MAGIC,
        version: U16::new(h.version),
        transport: h.transport as u8,
        status: 0,
        capabilities: U64::new(h.capabilities),
    };
    w.write_all(wire.as_bytes())?;
    Ok(w.flush()?)
}

/// What a new connection says it is, from its first 16 bytes.
#[derive(Clone, Copy, Debug)]
pub enum Opening {
    /// A source opening a migration; answer with [`answer_hello`].
    Control(HelloWire),
    /// A page stream of migration `session`.
    Stream { index: u16, session: u64 },
    /// A link probe: bytes to discard, counted by the sender (host agents measure links).
    Probe,
}

/// Reads a connection's first 16 bytes: a migration's hello or a page stream's.
pub fn read_opening(r: &mut impl Read) -> Result<Opening, ProtocolError> {
    let h: HelloWire = read_header(r, "the handshake")?;
    if h.magic == MAGIC {
        return Ok(Opening::Control(h));
    }
    if h.magic == PROBE_MAGIC {
        return Ok(Opening::Probe);
    }
    if h.magic != DATA_MAGIC {
        return Err(ProtocolError::BadMagic(h.magic));
    }
    // The same 16 bytes, read as a page stream's hello.
    let d = DataHelloWire::read_from_bytes(h.as_bytes())
        .map_err(|_| ProtocolError::Truncated("a page stream's handshake"))?;
    if d.version.get() != VERSION {
        return Err(ProtocolError::Version {
            theirs: d.version.get(),
        });
    }
    Ok(Opening::Stream {
        index: d.index.get(),
        session: d.session.get(),
    })
}

/// Answers a source's hello; on a version or transport we do not speak, tells the peer why.
pub fn answer_hello(w: &mut impl Write, h: &HelloWire) -> Result<Hello, ProtocolError> {
    let transport = Transport::from_u8(h.transport);
    let status = match (h.version.get() == VERSION, transport) {
        (false, _) => HelloStatus::Version,
        (true, None) => HelloStatus::Transport,
        (true, Some(_)) => HelloStatus::Ok,
    };
    let reply = HelloWire {
        magic: MAGIC,
        version: U16::new(VERSION),
        transport: h.transport,
        status: status as u8,
        capabilities: U64::new(0),
    };
    w.write_all(reply.as_bytes())?;
    w.flush()?;
    match (status, transport) {
        (HelloStatus::Ok, Some(t)) => Ok(Hello {
            version: h.version.get(),
            transport: t,
            capabilities: h.capabilities.get(),
        }),
        (HelloStatus::Version, _) => Err(ProtocolError::Version {
            theirs: h.version.get(),
        }),
        _ => Err(ProtocolError::TransportUnsupported(h.transport)),
    }
}

/// Reads the source's hello and answers it (a connection known to be a control connection).
pub fn accept_hello(r: &mut impl Read, w: &mut impl Write) -> Result<Hello, ProtocolError> {
    match read_opening(r)? {
        Opening::Control(h) => answer_hello(w, &h),
        Opening::Stream { .. } => Err(ProtocolError::BadMagic(DATA_MAGIC)),
        Opening::Probe => Err(ProtocolError::BadMagic(PROBE_MAGIC)),
    }
}

/// First bytes of a link probe; the rest is filler the receiver discards.
pub fn write_probe_hello(w: &mut impl Write) -> Result<(), ProtocolError> {
    let wire = HelloWire {
        magic: PROBE_MAGIC,
        version: U16::new(VERSION),
        transport: 0,
        status: 0,
        capabilities: U64::new(0),
    };
    w.write_all(wire.as_bytes())?;
    Ok(w.flush()?)
}

/// Reads the destination's answer to our hello.
pub fn read_hello_reply(r: &mut impl Read, ours: &Hello) -> Result<(), ProtocolError> {
    let h: HelloWire = read_header(r, "the handshake reply")?;
    if transport::mismatch::status(h.as_bytes()) == Some(transport::mismatch::TLS_REQUIRED) {
        return Err(ProtocolError::TlsRequired);
    }
    if h.magic != MAGIC {
        return Err(ProtocolError::BadMagic(h.magic));
    }
    match h.status {
        s if s == HelloStatus::Ok as u8 => Ok(()),
        s if s == HelloStatus::Version as u8 => Err(ProtocolError::Version {
            theirs: h.version.get(),
        }),
        s if s == HelloStatus::Busy as u8 => Err(ProtocolError::PeerBusy(read_reason(r)?)),
        _ => Err(ProtocolError::TransportUnsupported(ours.transport as u8)),
    }
}

/// Answers a hello with Busy and why: the listener has no room for this connection now.
pub fn answer_busy(w: &mut impl Write, why: &str) -> Result<(), ProtocolError> {
    let reply = HelloWire {
        magic: MAGIC,
        version: U16::new(VERSION),
        transport: 0,
        status: HelloStatus::Busy as u8,
        capabilities: U64::new(0),
    };
    let why = &why.as_bytes()[..why.len().min(MAX_REASON)];
    w.write_all(reply.as_bytes())?;
    w.write_all(U16::new(u16::try_from(why.len()).unwrap_or(u16::MAX)).as_bytes())?;
    w.write_all(why)?;
    Ok(w.flush()?)
}

/// The longest reason a Busy hello answer carries.
const MAX_REASON: usize = 1024;

/// A Busy hello answer's reason: a u16 length (at most [`MAX_REASON`]) and UTF-8.
fn read_reason(r: &mut impl Read) -> Result<String, ProtocolError> {
    let len: U16 = read_header(r, "a busy answer's reason")?;
    let len = usize::from(len.get());
    if len > MAX_REASON {
        return Err(ProtocolError::Malformed {
            kind: Kind::Busy,
            why: format!("a reason of {len} bytes, the limit is {MAX_REASON}"),
        });
    }
    let mut why = vec![0u8; len];
    read_full(r, &mut why, "a busy answer's reason")?;
    Ok(String::from_utf8_lossy(&why).into_owned())
}

/// First bytes on a page stream: magic `LVMD`, version, stream index, session.
pub fn write_data_hello(w: &mut impl Write, index: u16, session: u64) -> Result<(), ProtocolError> {
    let wire = DataHelloWire {
        magic: DATA_MAGIC,
        version: U16::new(VERSION),
        index: U16::new(index),
        session: U64::new(session),
    };
    w.write_all(wire.as_bytes())?;
    Ok(w.flush()?)
}

/// Reads a page stream's hello and checks it belongs to `session` with `streams` streams;
/// returns its index.
pub fn read_data_hello(
    r: &mut impl Read,
    session: u64,
    streams: u16,
) -> Result<u16, ProtocolError> {
    match read_opening(r)? {
        Opening::Stream { index, session: s } => check_stream(index, s, session, streams),
        Opening::Control(h) => Err(ProtocolError::BadMagic(h.magic)),
        Opening::Probe => Err(ProtocolError::BadMagic(PROBE_MAGIC)),
    }
}

/// A page stream `index` of session `theirs` must be one of `streams` of `session`.
pub fn check_stream(
    index: u16,
    theirs: u64,
    session: u64,
    streams: u16,
) -> Result<u16, ProtocolError> {
    if theirs != session || index >= streams {
        return Err(malformed(Kind::Config)(format!(
            "page stream {index} of session {theirs:#x} does not belong to session {session:#x} with {streams} streams"
        )));
    }
    Ok(index)
}

// ---- typed payloads ----

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
    /// The destination host's page cache this migration may use (the drain's id for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cache: Option<u64>,
    /// The state sections the source will send, with their versions: a destination that does
    /// not know one refuses the migration now, before the source stops.
    #[serde(default)]
    pub sections: Vec<migratable::SectionId>,
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

/// The end of a round: its number and how many pages it had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundEnd {
    pub round: u32,
    pub pages: u64,
}

fn yes() -> bool {
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
}

/// A batch head (count + entries), checked for shape: count within the limit, entries whole,
/// no unknown flags. Offsets are checked against guest RAM with [`BatchHead::check`].
#[derive(Clone, Copy, Debug)]
pub struct BatchHead<'a> {
    entries: &'a [Entry],
}

impl<'a> BatchHead<'a> {
    /// Splits `b` into its head and what follows.
    fn parse(b: &'a [u8], kind: Kind) -> Result<(Self, &'a [u8]), ProtocolError> {
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
    Confirm,
    Verified(VerifyOutcome),
    Redirect(Redirect),
    /// Keys of the pages in the destination host's cache, [`crate::host_cache::KEY_LEN`]
    /// bytes each.
    CacheKeys(&'a [u8]),
    RoundDone(RoundEnd),
    /// The RAM the copy will send: memfd ranges `[start, end)`, as the source says (the
    /// receiver checks them against guest RAM).
    Extents(Vec<(u64, u64)>),
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
            Frame::Confirm => Kind::Confirm,
            Frame::Verified(_) => Kind::Verified,
            Frame::Redirect(_) => Kind::Redirect,
            Frame::CacheKeys(_) => Kind::CacheKeys,
            Frame::RoundDone(_) => Kind::RoundDone,
            Frame::Extents(_) => Kind::Extents,
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
        Kind::Confirm => Frame::Confirm,
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

fn decode_compressed(payload: &[u8]) -> Result<CompressedBatch<'_>, ProtocolError> {
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

// ---- frames ----

/// Writes frames with sequence numbers and checksums.
pub struct FrameWriter<W: Write> {
    w: W,
    seq: u32,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter { w, seq: 0 }
    }

    /// Continues a stream whose first `seq` frames another writer sent.
    pub fn with_seq(w: W, seq: u32) -> Self {
        FrameWriter { w, seq }
    }

    fn header(&self, kind: Kind, len: usize, sum_of: &[&[u8]]) -> FrameHeader {
        let mut h = FrameHeader {
            kind: kind as u8,
            reserved: [0; 3],
            seq: U32::new(self.seq),
            len: U32::new(u32::try_from(len).unwrap_or(u32::MAX)),
            reserved2: U32::new(0),
            checksum: U64::new(0),
        };
        let mut sum = Xxh3::new();
        sum.update(&h.as_bytes()[..16]);
        for p in sum_of {
            sum.update(p);
        }
        h.checksum = U64::new(sum.digest());
        h
    }

    /// Sends one frame whose payload is the concatenation of `parts` (no copy into one buffer).
    pub fn send_parts(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), ProtocolError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > kind.max_len() {
            return Err(ProtocolError::Oversized {
                kind,
                len,
                max: kind.max_len(),
            });
        }
        let h = self.header(kind, len, parts);
        self.w.write_all(h.as_bytes())?;
        for p in parts {
            self.w.write_all(p)?;
        }
        self.seq = self.seq.wrapping_add(1);
        Ok(())
    }

    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
        self.send_parts(kind, &[payload])
    }

    fn send_json(&mut self, kind: Kind, v: &impl serde::Serialize) -> Result<(), ProtocolError> {
        let body = serde_json::to_vec(v).map_err(|e| malformed(kind)(e.to_string()))?;
        self.send(kind, &body)
    }

    pub fn send_config(&mut self, p: &Prepare) -> Result<(), ProtocolError> {
        self.send_json(Kind::Config, p)
    }

    pub fn send_state(&mut self, s: &migratable::Snapshot) -> Result<(), ProtocolError> {
        self.send(Kind::State, &s.to_bytes())
    }

    pub fn send_verified(&mut self, v: &VerifyOutcome) -> Result<(), ProtocolError> {
        self.send_json(Kind::Verified, v)
    }

    pub fn send_cache_keys(
        &mut self,
        keys: &[[u8; crate::host_cache::KEY_LEN]],
    ) -> Result<(), ProtocolError> {
        self.send(Kind::CacheKeys, keys.as_flattened())
    }

    /// An Extents frame; more than [`MAX_EXTENTS`] are merged across their smallest gaps.
    pub fn send_extents(&mut self, extents: &[(u64, u64)]) -> Result<(), ProtocolError> {
        let wire: Vec<ExtentWire> = coalesce(extents, MAX_EXTENTS)
            .into_iter()
            .map(|(start, end)| ExtentWire {
                start: U64::new(start),
                end: U64::new(end),
            })
            .collect();
        self.send(Kind::Extents, wire.as_bytes())
    }

    pub fn send_redirect(&mut self, r: &Redirect) -> Result<(), ProtocolError> {
        self.send_json(Kind::Redirect, r)
    }

    pub fn send_round_end(&mut self, r: RoundEnd) -> Result<(), ProtocolError> {
        self.send_round_marker(Kind::RoundEnd, r)
    }

    pub fn send_round_done(&mut self, r: RoundEnd) -> Result<(), ProtocolError> {
        self.send_round_marker(Kind::RoundDone, r)
    }

    fn send_round_marker(&mut self, kind: Kind, r: RoundEnd) -> Result<(), ProtocolError> {
        let wire = RoundEndWire {
            round: U32::new(r.round),
            pages: U64::new(r.pages),
        };
        self.send(kind, wire.as_bytes())
    }

    /// A Pages frame: the batch head and the data of its non-zero pages.
    pub fn send_pages(&mut self, head: &[u8], data: &[u8]) -> Result<(), ProtocolError> {
        self.send_parts(Kind::Pages, &[head, data])
    }

    /// A PagesCompressed frame: `data` is the batch's page data (`raw_len` bytes) compressed.
    pub fn send_compressed(
        &mut self,
        codec: Codec,
        raw_len: usize,
        head: &[u8],
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        let h = CompressedHeader {
            codec: codec as u8,
            reserved: [0; 3],
            raw_len: U32::new(u32::try_from(raw_len).unwrap_or(u32::MAX)),
        };
        self.send_parts(Kind::PagesCompressed, &[h.as_bytes(), head, data])
    }

    /// Writes a PagesDirect header and head; the caller then sends exactly `data_len` bytes of
    /// page data itself (zero-copy), after flushing this writer.
    pub fn send_direct_head(&mut self, head: &[u8], data_len: usize) -> Result<(), ProtocolError> {
        let h = self.header(Kind::PagesDirect, head.len() + data_len, &[head]);
        self.w.write_all(h.as_bytes())?;
        self.w.write_all(head)?;
        self.seq = self.seq.wrapping_add(1);
        Ok(())
    }

    /// Writes page data that follows a [`Self::send_direct_head`] through this writer.
    pub fn write_raw(&mut self, data: &[u8]) -> Result<(), ProtocolError> {
        Ok(self.w.write_all(data)?)
    }

    pub fn send_abort(&mut self, reason: &str) -> Result<(), ProtocolError> {
        self.send_reason(Kind::Abort, reason)
    }

    /// Turns a migration away for now: this host cannot take it at the moment.
    pub fn send_busy(&mut self, reason: &str) -> Result<(), ProtocolError> {
        self.send_reason(Kind::Busy, reason)
    }

    /// A frame whose payload is a reason, cut to the kind's limit at a character boundary.
    fn send_reason(&mut self, kind: Kind, reason: &str) -> Result<(), ProtocolError> {
        let max = kind.max_len();
        let mut end = reason.len().min(max);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.send(kind, &reason.as_bytes()[..end])?;
        self.flush()
    }

    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        Ok(self.w.flush()?)
    }

    pub fn inner(&mut self) -> &mut W {
        &mut self.w
    }
}

/// Reads and checks frames; the payload is valid until the next call.
pub struct FrameReader<R: Read> {
    r: R,
    seq: u32,
    buf: Vec<u8>,
    /// Page data of a PagesDirect frame still on the wire for the caller to read.
    direct_left: usize,
}

/// A buffered reader whose buffered bytes can be taken without further I/O, so the rest of a
/// read can go straight from the socket into its destination.
pub trait DirectRead: Read {
    /// Moves the next bytes into `file`, run after run: `len` bytes at `off` for each
    /// `(off, len)` of `runs`.
    fn read_direct(&mut self, file: &std::fs::File, runs: &[(u64, usize)]) -> io::Result<()>;

    /// Fills `dst` (mapped guest RAM) with the next bytes.
    fn read_direct_mapped(&mut self, dst: &VolatileSlice<'_>) -> io::Result<()>;
}

impl<T: transport::ReadToFile> DirectRead for &mut io::BufReader<T> {
    fn read_direct(&mut self, file: &std::fs::File, runs: &[(u64, usize)]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // What the reader already buffered goes first; the rest comes straight from the source.
        let mut rest = Vec::with_capacity(runs.len());
        for &(off, len) in runs {
            let have = self.buffer().len().min(len);
            file.write_all_at(&self.buffer()[..have], off)?;
            self.consume(have);
            if have < len {
                rest.push((off + have as u64, len - have));
            }
        }
        self.get_mut().read_to_file(file, &rest)
    }

    fn read_direct_mapped(&mut self, dst: &VolatileSlice<'_>) -> io::Result<()> {
        use vm_memory::Bytes;
        let have = self.buffer().len().min(dst.len());
        dst.write_slice(&self.buffer()[..have], 0)
            .map_err(io::Error::other)?;
        self.consume(have);
        let rest = dst.offset(have).map_err(io::Error::other)?;
        self.get_mut().read_to_slice(&rest)
    }
}

impl<R: Read> FrameReader<R> {
    pub fn new(r: R) -> Self {
        Self::with_seq(r, 0)
    }

    /// Continues a stream whose first `seq` frames another reader took.
    /// The next frame is the peer's frame `seq`.
    pub fn expect_seq(&mut self, seq: u32) {
        self.seq = seq;
    }

    pub fn with_seq(r: R, seq: u32) -> Self {
        FrameReader {
            r,
            seq,
            buf: Vec::new(),
            direct_left: 0,
        }
    }

    /// The next frame, decoded.
    pub fn next_frame(&mut self) -> Result<Frame<'_>, ProtocolError> {
        let (kind, payload) = self.recv()?;
        decode(kind, payload)
    }

    /// The next frame's kind and checked payload (an Abort is returned as an error).
    pub fn recv(&mut self) -> Result<(Kind, &[u8]), ProtocolError> {
        if self.direct_left != 0 {
            return Err(malformed(Kind::PagesDirect)(format!(
                "{} bytes of page data were not read",
                self.direct_left
            )));
        }
        let h: FrameHeader = read_header(&mut self.r, "a frame header")?;
        let kind = Kind::from_u8(h.kind).ok_or(ProtocolError::UnknownKind(h.kind))?;
        let (seq, len) = (h.seq.get(), h.len.get() as usize);
        // Checked from the header alone, before any buffer grows.
        if len > kind.max_len() {
            return Err(ProtocolError::Oversized {
                kind,
                len,
                max: kind.max_len(),
            });
        }
        if seq != self.seq {
            return Err(ProtocolError::OutOfOrder {
                expected: self.seq,
                got: seq,
            });
        }
        if kind == Kind::PagesDirect {
            self.read_direct_head(len)?;
        } else {
            self.read_payload(len)?;
        }
        let mut sum = Xxh3::new();
        sum.update(&h.as_bytes()[..16]);
        sum.update(&self.buf);
        if sum.digest() != h.checksum.get() {
            return Err(ProtocolError::Checksum { seq, kind });
        }
        if kind == Kind::PagesDirect {
            self.direct_left = self.direct_data_len(len)?;
        }
        self.seq = self.seq.wrapping_add(1);
        let reason = || String::from_utf8_lossy(&self.buf).into_owned();
        match kind {
            Kind::Abort => return Err(ProtocolError::PeerAborted(reason())),
            Kind::Busy => return Err(ProtocolError::PeerBusy(reason())),
            _ => {}
        }
        Ok((kind, &self.buf))
    }

    /// Reads `len` payload bytes into the buffer, growing it as they arrive: a header alone
    /// (a peer announcing a large frame and sending nothing) allocates little.
    fn read_payload(&mut self, len: usize) -> Result<(), ProtocolError> {
        const STEP: usize = 1 << 20;
        self.buf.clear();
        while self.buf.len() < len {
            let at = self.buf.len();
            let n = (len - at).min(STEP);
            self.buf.resize(at + n, 0);
            read_full(&mut self.r, &mut self.buf[at..], "a frame payload")?;
        }
        Ok(())
    }

    /// Reads a PagesDirect frame's head (only the head is ours to read; its entries tell how
    /// much page data follows) into the buffer.
    fn read_direct_head(&mut self, len: usize) -> Result<(), ProtocolError> {
        let bad = malformed(Kind::PagesDirect);
        let count: U32 = read_header(&mut self.r, "a frame payload")?;
        let n = count.get() as usize;
        let head_len = COUNT_LEN + n * ENTRY_LEN;
        if n > MAX_BATCH_PAGES || head_len > len {
            return Err(bad(format!("{n} pages in a {len}-byte frame")));
        }
        self.buf.clear();
        self.buf.extend_from_slice(count.as_bytes());
        self.buf.resize(head_len, 0);
        read_full(&mut self.r, &mut self.buf[COUNT_LEN..], "a frame payload")?;
        Ok(())
    }

    /// The page data that follows a checked PagesDirect head in a frame of `len` bytes.
    fn direct_data_len(&self, len: usize) -> Result<usize, ProtocolError> {
        let (head, _) = BatchHead::parse(&self.buf, Kind::PagesDirect)?;
        let data = head.data_pages() * PAGE;
        if len != self.buf.len() + data {
            return Err(malformed(Kind::PagesDirect)(format!(
                "{len} bytes for {} data pages",
                head.data_pages()
            )));
        }
        Ok(data)
    }

    pub fn inner(&mut self) -> &mut R {
        &mut self.r
    }

    /// Reads the next bytes of a PagesDirect frame's page data into `file`, run after run:
    /// `len` bytes at `off` for each `(off, len)` of `runs`.
    pub fn read_direct(
        &mut self,
        file: &std::fs::File,
        runs: &[(u64, usize)],
    ) -> Result<(), ProtocolError>
    where
        R: DirectRead,
    {
        let len = runs
            .iter()
            .try_fold(0usize, |sum, r| sum.checked_add(r.1))
            .ok_or_else(|| malformed(Kind::PagesDirect)("runs longer than memory".into()))?;
        self.take_direct(len, |r| r.read_direct(file, runs))
    }

    /// Reads the next `dst.len()` bytes of a PagesDirect frame's page data into `dst`.
    pub fn read_direct_mapped(&mut self, dst: &VolatileSlice<'_>) -> Result<(), ProtocolError>
    where
        R: DirectRead,
    {
        self.take_direct(dst.len(), |r| r.read_direct_mapped(dst))
    }

    /// Moves `len` bytes of the frame's page data with `read`, never past the frame.
    fn take_direct(
        &mut self,
        len: usize,
        read: impl FnOnce(&mut R) -> io::Result<()>,
    ) -> Result<(), ProtocolError> {
        if len > self.direct_left {
            return Err(malformed(Kind::PagesDirect)(
                "reading past the frame's page data".into(),
            ));
        }
        read(&mut self.r).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ProtocolError::Truncated("page data"),
            _ => ProtocolError::Io(e),
        })?;
        self.direct_left -= len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn frames(list: &[(Kind, Vec<u8>)]) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        for (k, p) in list {
            w.send(*k, p).unwrap();
        }
        w.inner().clone()
    }

    fn batch(pages: &[(u64, Option<u8>)]) -> Vec<u8> {
        let mut b = PageBatch::default();
        let mut data = Vec::new();
        for (off, fill) in pages {
            b.push(*off, fill.is_none());
            if let Some(f) = fill {
                data.extend(std::iter::repeat_n(*f, PAGE));
            }
        }
        let mut p = b.head();
        p.extend(data);
        p
    }

    fn decode_pages(payload: &[u8], limit: u64) -> Result<Vec<PageRef<'_>>, ProtocolError> {
        match decode(Kind::Pages, payload)? {
            Frame::Pages { head, data } => head.pages(data, limit, Kind::Pages),
            f => panic!("{:?}", f.kind()),
        }
    }

    #[test]
    fn headers_have_their_wire_sizes() {
        assert_eq!(HELLO_LEN, 16);
        assert_eq!(std::mem::size_of::<DataHelloWire>(), 16);
        assert_eq!(HEADER_LEN, 24);
        assert_eq!(std::mem::size_of::<CompressedHeader>(), 8);
        assert_eq!(std::mem::size_of::<RoundEndWire>(), 12);
        assert_eq!(ENTRY_LEN, 8);
    }

    #[test]
    fn frames_round_trip() {
        let bytes = frames(&[
            (Kind::Config, b"{}".to_vec()),
            (Kind::Ready, vec![]),
            (Kind::Done, vec![]),
        ]);
        let mut r = FrameReader::new(Cursor::new(bytes));
        assert_eq!(r.recv().unwrap(), (Kind::Config, &b"{}"[..]));
        assert_eq!(r.recv().unwrap().0, Kind::Ready);
        assert_eq!(r.recv().unwrap().0, Kind::Done);
        assert!(matches!(r.recv(), Err(ProtocolError::Closed)));
    }

    #[test]
    fn extents_merge_across_their_smallest_gaps() {
        let e = [(0, 10), (12, 20), (100, 110), (111, 120), (500, 510)];
        assert_eq!(coalesce(&e, 10), e.to_vec());
        assert_eq!(coalesce(&e, 3), vec![(0, 20), (100, 120), (500, 510)]);
        assert_eq!(coalesce(&e, 1), vec![(0, 510)]);
        let total = |v: &[(u64, u64)]| v.iter().map(|(s, e)| e - s).sum::<u64>();
        assert!(
            total(&coalesce(&e, 2)) >= total(&e),
            "merging only ever covers more"
        );
    }

    #[test]
    fn every_kind_encodes_and_decodes_here() {
        let mut w = FrameWriter::new(Vec::new());
        let prep = Prepare {
            vm: migratable::VmConfig {
                memory: 64 << 20,
                vcpus: 2,
            },
            streams: 3,
            session: 0xfeed,
            name: Some("web-1".into()),
            origin: None,
            host_cache: None,
            sections: vec![migratable::SectionId::new("clock", 1)],
        };
        w.send_config(&prep).unwrap();
        w.send_extents(&[(0, 8192), (1 << 20, 2 << 20)]).unwrap();
        w.send_redirect(&Redirect { port: 7001 }).unwrap();
        w.send_round_end(RoundEnd {
            round: 7,
            pages: 1 << 40,
        })
        .unwrap();
        w.send_round_done(RoundEnd { round: 7, pages: 3 }).unwrap();
        w.send_cache_keys(&[[1; 16], [2; 16]]).unwrap();
        w.send_verified(&VerifyOutcome {
            ok: true,
            verifiable: true,
            detail: "VERIFY OK pages=3".into(),
            cpu_seconds: 0.5,
        })
        .unwrap();
        let mut b = PageBatch::default();
        b.push(4096, true);
        b.push(8192, false);
        w.send_compressed(Codec::Lz4, PAGE, &b.head(), b"zz")
            .unwrap();
        let mut r = FrameReader::new(Cursor::new(w.inner().clone()));
        match r.next_frame().unwrap() {
            Frame::Config(p) => {
                assert_eq!((p.streams, p.session, p.vm.vcpus), (3, 0xfeed, 2));
                assert_eq!(p.name.as_deref(), Some("web-1"));
            }
            f => panic!("{:?}", f.kind()),
        }
        match r.next_frame().unwrap() {
            Frame::Extents(e) => assert_eq!(e, vec![(0, 8192), (1 << 20, 2 << 20)]),
            f => panic!("{:?}", f.kind()),
        }
        match r.next_frame().unwrap() {
            Frame::Redirect(d) => assert_eq!(d.port, 7001),
            f => panic!("{:?}", f.kind()),
        }
        match r.next_frame().unwrap() {
            Frame::RoundEnd(e) => assert_eq!(
                e,
                RoundEnd {
                    round: 7,
                    pages: 1 << 40
                }
            ),
            f => panic!("{:?}", f.kind()),
        }
        match r.next_frame().unwrap() {
            Frame::RoundDone(e) => assert_eq!(e, RoundEnd { round: 7, pages: 3 }),
            f => panic!("{:?}", f.kind()),
        }
        match r.next_frame().unwrap() {
            Frame::CacheKeys(k) => assert_eq!(k.len(), 32),
            f => panic!("{:?}", f.kind()),
        }
        match r.next_frame().unwrap() {
            Frame::Verified(v) => assert!(v.ok && v.detail.contains("pages=3")),
            f => panic!("{:?}", f.kind()),
        }
        match r.next_frame().unwrap() {
            Frame::PagesCompressed(c) => {
                assert_eq!((c.codec, c.raw_len, c.data), (Codec::Lz4, PAGE, &b"zz"[..]));
                assert_eq!(c.head.entries().len(), 2);
                assert!(c.head.entries()[0].is_zero());
                assert_eq!(c.head.entries()[1].offset(), 8192);
            }
            f => panic!("{:?}", f.kind()),
        }
        // A RoundEnd of the wrong size is malformed, not a panic.
        let bad = frames(&[(Kind::RoundEnd, vec![0; 5])]);
        assert!(matches!(
            FrameReader::new(Cursor::new(bad)).next_frame(),
            Err(ProtocolError::Malformed {
                kind: Kind::RoundEnd,
                ..
            })
        ));
        let bad = frames(&[(Kind::Config, b"{\"vm\":1}".to_vec())]);
        assert!(FrameReader::new(Cursor::new(bad)).next_frame().is_err());
        // Keys are whole or the frame is malformed.
        let bad = frames(&[(Kind::CacheKeys, vec![0; 17])]);
        assert!(FrameReader::new(Cursor::new(bad)).next_frame().is_err());
        // Extents are whole, and no more than the limit (merged to fit when sent).
        let bad = frames(&[(Kind::Extents, vec![0; 24])]);
        assert!(matches!(
            FrameReader::new(Cursor::new(bad)).next_frame(),
            Err(ProtocolError::Malformed {
                kind: Kind::Extents,
                ..
            })
        ));
        assert!(matches!(
            FrameWriter::new(Vec::new()).send(Kind::Extents, &vec![0; (MAX_EXTENTS + 1) * 16]),
            Err(ProtocolError::Oversized {
                kind: Kind::Extents,
                ..
            })
        ));
        let many: Vec<(u64, u64)> = (0..2 * MAX_EXTENTS as u64)
            .map(|i| (i * 8192, i * 8192 + 4096))
            .collect();
        let mut w = FrameWriter::new(Vec::new());
        w.send_extents(&many).unwrap();
        match FrameReader::new(Cursor::new(w.inner().clone())).next_frame() {
            Ok(Frame::Extents(e)) => assert_eq!(e.len(), MAX_EXTENTS),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn every_malformed_frame_is_refused() {
        let good = frames(&[(Kind::Config, b"{\"a\":1}".to_vec())]);
        let check = |bytes: Vec<u8>, want: &dyn Fn(&ProtocolError) -> bool, what: &str| {
            let e = FrameReader::new(Cursor::new(bytes)).recv().expect_err(what);
            assert!(want(&e), "{what}: got {e}");
        };
        // Truncated header, truncated payload.
        check(
            good[..10].to_vec(),
            &|e| matches!(e, ProtocolError::Truncated(_)),
            "short header",
        );
        check(
            good[..good.len() - 1].to_vec(),
            &|e| matches!(e, ProtocolError::Truncated(_)),
            "short payload",
        );
        // Unknown kind.
        let mut b = good.clone();
        b[0] = 77;
        check(
            b,
            &|e| matches!(e, ProtocolError::UnknownKind(77)),
            "unknown kind",
        );
        // Oversized length for the kind.
        let mut b = good.clone();
        b[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
        check(
            b,
            &|e| matches!(e, ProtocolError::Oversized { .. }),
            "oversized",
        );
        let mut b = frames(&[(Kind::Ready, vec![])]);
        b[8] = 1;
        b.push(0);
        check(
            b,
            &|e| {
                matches!(
                    e,
                    ProtocolError::Oversized {
                        kind: Kind::Ready,
                        ..
                    }
                )
            },
            "payload on empty kind",
        );
        // Flipped payload byte, flipped header byte, flipped checksum.
        for at in [HEADER_LEN + 2, 1, 20] {
            let mut b = good.clone();
            b[at] ^= 0x10;
            check(
                b,
                &|e| matches!(e, ProtocolError::Checksum { .. }),
                "checksum",
            );
        }
        // Out of order: a frame with sequence 1 first.
        let two = frames(&[(Kind::Ready, vec![]), (Kind::Done, vec![])]);
        check(
            two[HEADER_LEN..].to_vec(),
            &|e| {
                matches!(
                    e,
                    ProtocolError::OutOfOrder {
                        expected: 0,
                        got: 1
                    }
                )
            },
            "seq",
        );
        // An abort carries its reason.
        check(
            frames(&[(Kind::Abort, b"disk full".to_vec())]),
            &|e| matches!(e, ProtocolError::PeerAborted(r) if r == "disk full"),
            "abort",
        );
    }

    #[test]
    fn a_writer_refuses_to_send_an_oversized_frame() {
        let mut w = FrameWriter::new(Vec::new());
        assert!(matches!(
            w.send(Kind::RoundEnd, &[0; 13]),
            Err(ProtocolError::Oversized { .. })
        ));
        assert!(w.inner().is_empty(), "nothing went out");
    }

    /// A listener with no room answers a hello with Busy and why; a TLS listener answers a
    /// plaintext hello with its notice: each reads as what it is, not as a broken handshake.
    #[test]
    fn busy_and_tls_required_answers_say_so() {
        let ours = Hello {
            version: VERSION,
            transport: Transport::Tcp,
            capabilities: 0,
        };
        let mut reply = Vec::new();
        answer_busy(
            &mut reply,
            "64 authenticated connections are opening at once",
        )
        .unwrap();
        match read_hello_reply(&mut Cursor::new(reply), &ours) {
            Err(ProtocolError::PeerBusy(why)) => assert!(why.starts_with("64 auth"), "{why}"),
            r => panic!("{r:?}"),
        }
        let notice = transport::mismatch::notice(transport::mismatch::TLS_REQUIRED);
        assert!(matches!(
            read_hello_reply(&mut Cursor::new(notice.to_vec()), &ours),
            Err(ProtocolError::TlsRequired)
        ));
        // A hostile answer claiming a long reason is refused from its length.
        let mut reply = Vec::new();
        answer_busy(&mut reply, "x").unwrap();
        reply[16..18].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            read_hello_reply(&mut Cursor::new(reply), &ours),
            Err(ProtocolError::Malformed { .. })
        ));
        // A Busy frame reads as the peer being busy.
        let mut w = FrameWriter::new(Vec::new());
        w.send_busy("host b already takes 4 incoming migrations")
            .unwrap();
        let bytes = w.inner().clone();
        let mut r = std::io::BufReader::new(Cursor::new(bytes));
        assert!(matches!(
            FrameReader::new(&mut r).next_frame(),
            Err(ProtocolError::PeerBusy(w)) if w.contains("4 incoming")
        ));
    }

    #[test]
    fn handshake_accepts_ours_and_refuses_others() {
        let ours = Hello {
            version: VERSION,
            transport: Transport::Tcp,
            capabilities: 0,
        };
        let mut hello = Vec::new();
        write_hello(&mut hello, &ours).unwrap();
        let mut reply = Vec::new();
        assert_eq!(
            accept_hello(&mut Cursor::new(hello.clone()), &mut reply).unwrap(),
            ours
        );
        read_hello_reply(&mut Cursor::new(reply), &ours).unwrap();

        let mut v2 = hello.clone();
        v2[4] = 2;
        let mut reply = Vec::new();
        assert!(matches!(
            accept_hello(&mut Cursor::new(v2), &mut reply),
            Err(ProtocolError::Version { theirs: 2 })
        ));
        assert!(matches!(
            read_hello_reply(&mut Cursor::new(reply), &ours),
            Err(ProtocolError::Version { .. })
        ));

        let mut t = hello.clone();
        t[6] = 9;
        assert!(matches!(
            accept_hello(&mut Cursor::new(t), &mut Vec::new()),
            Err(ProtocolError::TransportUnsupported(9))
        ));
        assert!(matches!(
            accept_hello(
                &mut Cursor::new(b"GET / HTTP/1.1\r\n".to_vec()),
                &mut Vec::new()
            ),
            Err(ProtocolError::BadMagic(_))
        ));
        assert!(matches!(
            accept_hello(&mut Cursor::new(hello[..7].to_vec()), &mut Vec::new()),
            Err(ProtocolError::Truncated(_))
        ));
    }

    #[test]
    fn data_stream_hello_checks_session_and_index() {
        let mut b = Vec::new();
        write_data_hello(&mut b, 1, 0xabc).unwrap();
        assert_eq!(
            read_data_hello(&mut Cursor::new(b.clone()), 0xabc, 2).unwrap(),
            1
        );
        assert!(
            read_data_hello(&mut Cursor::new(b.clone()), 0xabd, 2).is_err(),
            "other session"
        );
        assert!(
            read_data_hello(&mut Cursor::new(b.clone()), 0xabc, 1).is_err(),
            "index out of range"
        );
        assert!(matches!(
            read_data_hello(&mut Cursor::new(b[..9].to_vec()), 0xabc, 2),
            Err(ProtocolError::Truncated(_))
        ));
        let mut h = Vec::new();
        write_hello(
            &mut h,
            &Hello {
                version: VERSION,
                transport: Transport::Tcp,
                capabilities: 0,
            },
        )
        .unwrap();
        assert!(matches!(
            read_data_hello(&mut Cursor::new(h), 0, 2),
            Err(ProtocolError::BadMagic(_))
        ));
    }

    #[test]
    fn page_batches_round_trip_with_zero_pages() {
        let p = batch(&[(0, Some(7)), (4096, None), (1 << 20, Some(9))]);
        let pages = decode_pages(&p, 2 << 20).unwrap();
        assert_eq!(pages.len(), 3);
        assert_eq!(pages[0].offset, 0);
        assert!(pages[0].data.unwrap().iter().all(|&b| b == 7));
        assert_eq!(
            pages[1],
            PageRef {
                offset: 4096,
                data: None,
                base: None,
                replace: false,
                from: None
            }
        );
        assert!(pages[2].data.unwrap().iter().all(|&b| b == 9));
    }

    #[test]
    fn extents_cut_into_chunks() {
        assert_eq!(
            chunks(&[(0, 5), (8, 10)], 2),
            vec![(0, 2), (2, 4), (4, 5), (8, 10)]
        );
        assert!(chunks(&[], 2).is_empty());
    }

    #[test]
    fn delta_entries_carry_their_encoding_and_lies_are_refused() {
        let delta_of = |base: u64, enc: &[u8]| {
            let mut d = DeltaHead::new(base, enc.len()).as_bytes().to_vec();
            d.extend_from_slice(enc);
            d
        };
        let mut b = PageBatch::default();
        b.push(0, false);
        b.push_delta(4096);
        b.push(8192, true);
        let enc = [0u8, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let mut p = b.head();
        p.extend(std::iter::repeat_n(7u8, PAGE));
        p.extend(delta_of(42, &enc));
        let pages = decode_pages(&p, 1 << 20).unwrap();
        assert_eq!(
            (pages[1].offset, pages[1].base, pages[1].data),
            (4096, Some(42), Some(&enc[..]))
        );
        assert_eq!((pages[0].base, pages[2].data), (None, None));
        // Cut short, too long, bytes left over: refused.
        assert!(decode_pages(&p[..p.len() - 1], 1 << 20).is_err());
        let mut extra = p.clone();
        extra.push(0);
        assert!(decode_pages(&extra, 1 << 20).is_err());
        let mut long = b.head();
        long.extend(std::iter::repeat_n(7u8, PAGE));
        long.extend(delta_of(42, &vec![0u8; crate::delta::MAX_DELTA + 1]));
        assert!(decode_pages(&long, 1 << 20).is_err());
        // A delta cannot be a zero page or a reference too, nor travel as direct page data.
        for flags in [
            ZERO_FLAG | DELTA_FLAG,
            DELTA_FLAG | REF_FLAG,
            ZERO_FLAG | REF_FLAG,
        ] {
            let both = Entry(U64::new(4096 | flags));
            let mut h = U32::new(1).as_bytes().to_vec();
            h.extend_from_slice(both.as_bytes());
            assert!(decode(Kind::Pages, &h).is_err());
        }
        assert!(decode(Kind::PagesDirect, &b.head()).is_err());
        let mut r = PageBatch::default();
        r.push_ref(4096);
        assert!(decode(Kind::PagesDirect, &r.head()).is_err());
        // A reference carries where and what; it must name another page inside guest RAM.
        let mut p = r.head();
        p.extend_from_slice(RefHead::new(8192, [5; 32]).as_bytes());
        let pages = decode_pages(&p, 1 << 20).unwrap();
        assert_eq!(
            (pages[0].from, pages[0].data),
            (Some(RefTo::Page(8192)), Some(&[5u8; 32][..]))
        );
        let mut p = r.head();
        p.extend_from_slice(RefHead::host_cache([6; 32]).as_bytes());
        let pages = decode_pages(&p, 1 << 20).unwrap();
        assert_eq!(pages[0].from, Some(RefTo::HostCache));
        for bad in [4096u64, 1 << 20, 8193] {
            let mut p = r.head();
            p.extend_from_slice(RefHead::new(bad, [5; 32]).as_bytes());
            assert!(decode_pages(&p, 1 << 20).is_err(), "{bad:#x}");
        }
    }

    #[test]
    fn direct_frames_carry_their_data_outside_the_payload() {
        let mut b = PageBatch::default();
        b.push(0, false);
        b.push(4096, true);
        b.push(8192, false);
        let head = b.head();
        let mut w = FrameWriter::new(Vec::new());
        w.send_direct_head(&head, 2 * PAGE).unwrap();
        let mut bytes = w.inner().clone();
        bytes.extend(std::iter::repeat_n(7u8, PAGE));
        bytes.extend(std::iter::repeat_n(9u8, PAGE));
        w.inner().clear();
        let mut br = std::io::BufReader::new(Cursor::new(bytes.clone()));
        let mut reader = FrameReader::new(&mut br);
        let (k, h) = reader.recv().unwrap();
        assert_eq!((k, h.to_vec()), (Kind::PagesDirect, head.clone()));
        // The next frame may not be read before the page data.
        assert!(reader.recv().is_err());
        let mut br = std::io::BufReader::new(Cursor::new(bytes.clone()));
        let mut reader = FrameReader::new(&mut br);
        reader.recv().unwrap();
        let file = tempfile::tempfile().unwrap();
        // Two runs, the second page first in the file.
        reader
            .read_direct(&file, &[(5 * 4096, PAGE), (4096, PAGE)])
            .unwrap();
        let mut p = vec![0u8; PAGE];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut p, 5 * 4096).unwrap();
        assert!(p.iter().all(|&x| x == 7));
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut p, 4096).unwrap();
        assert!(p.iter().all(|&x| x == 9));
        assert!(
            reader.read_direct(&file, &[(0, 1)]).is_err(),
            "no more data in this frame"
        );
        // The same data read into a mapping instead, in two pieces.
        let mut br = std::io::BufReader::new(Cursor::new(bytes.clone()));
        let mut reader = FrameReader::new(&mut br);
        reader.recv().unwrap();
        let mut m = vec![0u8; 2 * PAGE];
        // SAFETY: `m` outlives the slice and is not touched otherwise while it lives.
        let dst = unsafe { VolatileSlice::new(m.as_mut_ptr(), m.len()) };
        reader
            .read_direct_mapped(&dst.subslice(0, PAGE).unwrap())
            .unwrap();
        reader
            .read_direct_mapped(&dst.subslice(PAGE, PAGE).unwrap())
            .unwrap();
        assert!(
            reader
                .read_direct_mapped(&dst.subslice(0, 1).unwrap())
                .is_err(),
            "no more data in this frame"
        );
        assert!(m[..PAGE].iter().all(|&x| x == 7) && m[PAGE..].iter().all(|&x| x == 9));
        // A flipped entry fails the checksum; a short stream is truncated.
        let mut bad = bytes.clone();
        bad[HEADER_LEN + 5] ^= 1;
        let mut br = std::io::BufReader::new(Cursor::new(bad));
        assert!(matches!(
            FrameReader::new(&mut br).recv(),
            Err(ProtocolError::Checksum { .. })
        ));
        let mut short = std::io::BufReader::new(Cursor::new(bytes[..bytes.len() - 10].to_vec()));
        let mut fr = FrameReader::new(&mut short);
        fr.recv().unwrap();
        assert!(matches!(
            fr.read_direct(&tempfile::tempfile().unwrap(), &[(0, 2 * PAGE)]),
            Err(ProtocolError::Truncated(_))
        ));
    }

    #[test]
    fn compressed_batches_split_and_refuse_lies() {
        let head = {
            let mut b = PageBatch::default();
            b.push(0, false);
            b.push(4096, true);
            b.head()
        };
        let frame = |codec: u8, raw: u32| {
            let mut p = vec![codec, 0, 0, 0];
            p.extend_from_slice(&raw.to_le_bytes());
            p.extend_from_slice(&head);
            p.extend_from_slice(b"compressed bytes");
            p
        };
        let ok = frame(1, 4096);
        let b = decode_compressed(&ok).unwrap();
        assert_eq!(
            (b.raw_len, b.head.entries().len(), b.data),
            (4096, 2, &b"compressed bytes"[..])
        );
        // A raw length that does not match the data pages (a decompression bomb, say).
        assert!(decode_compressed(&frame(1, 1 << 30)).is_err());
        assert!(decode_compressed(&frame(1, 8192)).is_err());
        assert!(decode_compressed(&frame(7, 4096)).is_err(), "unknown codec");
        assert!(decode_compressed(&ok[..6]).is_err(), "short header");
    }

    #[test]
    fn malformed_page_batches_are_refused() {
        let good = batch(&[(0, Some(1)), (8192, None)]);
        let bad = |p: &[u8], limit: u64| decode_pages(p, limit).is_err();
        assert!(bad(&good[..2], 1 << 20), "short count");
        assert!(bad(&good[..good.len() - 1], 1 << 20), "short data");
        let mut extra = good.clone();
        extra.push(0);
        assert!(bad(&extra, 1 << 20), "trailing bytes");
        assert!(bad(&good, 4096), "offset beyond RAM");
        let mut flags = good.clone();
        flags[4] |= 0x2;
        assert!(bad(&flags, 1 << 20), "unknown flag bits");
        let mut many = good.clone();
        many[..4].copy_from_slice(&(MAX_BATCH_PAGES as u32 + 1).to_le_bytes());
        assert!(bad(&many, 1 << 20), "too many pages");
        let mut lie = good.clone();
        lie[..4].copy_from_slice(&3u32.to_le_bytes());
        assert!(bad(&lie, 1 << 20), "count larger than the table");
    }
}
