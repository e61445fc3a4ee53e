//! The migration wire protocol, all of it: every fixed-layout header is a `#[repr(C)]` struct
//! read and written with zerocopy, and every frame kind is encoded and decoded here.
//!
//! Handshake (16 bytes each way, [`HelloWire`]): magic `LVMG`, version, transport, status
//! (reply only), capabilities. Page streams open with their own 16 bytes ([`DataHelloWire`]).
//! Then frames: a 24-byte [`FrameHeader`] (kind, sequence number counting from 0 per
//! direction, payload length, xxh3-64 over header bytes 0..16 and the payload) and the payload.
//! Lengths are bounded per kind before anything is allocated; anything else is an error.
use std::io::{self, Read};

use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, IntoBytes};

pub const MAGIC: [u8; 4] = *b"LVMG";
const DATA_MAGIC: [u8; 4] = *b"LVMD";
const PROBE_MAGIC: [u8; 4] = *b"LVMP";
const PROBE_REPORT_MAGIC: [u8; 4] = *b"LVMR";
pub const VERSION: u16 = 5;
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

mod disk;
mod frame;
mod handshake;
mod payload;
mod postcopy;
mod wire;

pub use disk::*;
pub use frame::*;
pub use handshake::*;
pub use payload::*;
pub use postcopy::*;
pub use wire::*;

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
    /// src→dst: [`DiskBlocks`] of a disk the migration copies (`--storage copy`).
    DiskBlocks = 17,
    /// src→dst, instead of the paused round: the pages the destination does not hold yet
    /// ([`Owed`]); the VM resumes there without them (post-copy).
    Postcopy = 18,
    /// src→dst in post-copy: owed pages, a batch as [`Kind::Pages`] without deltas or
    /// references; pushed on the push connection, asked for on their own.
    PostcopyPages = 19,
    /// src→dst: every owed page has been sent (pushed or asked for).
    PostcopyEnd = 20,
    /// dst→src on the request connection: memfd offsets of owed pages the guest touched.
    PageRequest = 21,
    /// dst→src: JSON [`PostcopyStats`]; the destination holds every page.
    PostcopyDone = 22,
    /// dst→src, before Ready when the Config offered post-copy: UTF-8 reason this host cannot
    /// take a VM by post-copy (no userfaultfd for kernel faults here).
    NoPostcopy = 23,
    /// dst→src: the pages of a Postcopy frame sent while the guest still ran are dropped
    /// here; the source may pause.
    OwedPlaced = 24,
    /// dst→src, first on the push connection of a link made again after a failure in
    /// post-copy: the pages the destination still lacks ([`Owed`]).
    PostcopyResume = 25,
    /// src→dst, control: the VM has just paused; what follows is the downtime, and the
    /// destination's migration thread goes first until it confirms.
    Paused = 26,
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
            17 => Kind::DiskBlocks,
            18 => Kind::Postcopy,
            19 => Kind::PostcopyPages,
            20 => Kind::PostcopyEnd,
            21 => Kind::PageRequest,
            22 => Kind::PostcopyDone,
            23 => Kind::NoPostcopy,
            24 => Kind::OwedPlaced,
            25 => Kind::PostcopyResume,
            26 => Kind::Paused,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_len(self) -> usize {
        const BATCH: usize = COUNT_LEN + MAX_BATCH_PAGES * (ENTRY_LEN + PAGE);
        match self {
            Kind::Ready | Kind::Done | Kind::PostcopyEnd | Kind::OwedPlaced | Kind::Paused => 0,
            Kind::RoundEnd | Kind::RoundDone => std::mem::size_of::<RoundEndWire>(),
            Kind::Confirm => std::mem::size_of::<ConfirmWire>(),
            Kind::Config | Kind::Verified | Kind::Abort | Kind::Busy | Kind::Redirect => 64 << 10,
            Kind::Pages | Kind::PagesDirect | Kind::PostcopyPages => BATCH,
            Kind::Postcopy | Kind::PostcopyResume => {
                postcopy::OWED_HEAD_LEN + (postcopy::MAX_POSTCOPY_RAM / PAGE as u64 / 8) as usize
            }
            Kind::PageRequest => postcopy::MAX_REQUEST_PAGES * 8,
            Kind::PostcopyDone | Kind::NoPostcopy => 64 << 10,
            // Incompressible data can grow a little; never past this.
            Kind::PagesCompressed => std::mem::size_of::<CompressedHeader>() + BATCH + (64 << 10),
            Kind::State => 32 << 20,
            Kind::CacheKeys => {
                crate::host_cache::MAX_CACHE_PAGES as usize * crate::host_cache::KEY_LEN
            }
            Kind::Extents => MAX_EXTENTS * std::mem::size_of::<ExtentWire>(),
            Kind::DiskBlocks => disk::DISK_BLOCKS_MAX,
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
    /// protocol version {theirs} is not supported (this livemig speaks 5)
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

#[cfg(test)]
mod tests;
