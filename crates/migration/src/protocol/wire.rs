//! Every fixed-layout header on the wire: `#[repr(C)]` structs read and written with
//! zerocopy.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::*;

/// The handshake, both ways: the source's offer and the destination's answer.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct HelloWire {
    pub(super) magic: [u8; 4],
    pub(super) version: U16,
    pub(super) transport: u8,
    /// Reply only: [`HelloStatus`].
    pub(super) status: u8,
    pub(super) capabilities: U64,
}

/// First bytes on a page stream: which migration and which stream it is.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct DataHelloWire {
    pub(super) magic: [u8; 4],
    pub(super) version: U16,
    pub(super) index: U16,
    pub(super) session: U64,
}

/// A link probe's receiver's last word, once the prober has closed its side: how its thread
/// spent the probe.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct ProbeReportWire {
    pub(super) magic: [u8; 4],
    pub(super) reserved: [u8; 4],
    pub(super) bytes: U64,
    pub(super) wall_ns: U64,
    pub(super) on_cpu_ns: U64,
    pub(super) waiting_ns: U64,
}

/// The header in front of every frame.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct FrameHeader {
    pub(super) kind: u8,
    pub(super) reserved: [u8; 3],
    pub(super) seq: U32,
    pub(super) len: U32,
    pub(super) reserved2: U32,
    /// xxh3-64 over the 16 bytes before it and the payload.
    pub(super) checksum: U64,
}

/// In front of a PagesCompressed payload's batch head.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub(super) struct CompressedHeader {
    pub(super) codec: u8,
    pub(super) reserved: [u8; 3],
    /// Length of the data pages once decompressed.
    pub(super) raw_len: U32,
}

/// A RoundEnd payload.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub(super) struct RoundEndWire {
    pub(super) round: U32,
    pub(super) pages: U64,
}

/// A Confirm's payload: the destination's side of the switchover, in µs from when it read
/// the source's Paused.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub(super) struct ConfirmWire {
    pub(super) received_us: U32,
    pub(super) loaded_us: U32,
    pub(super) confirming_us: U32,
}

/// One extent of an Extents frame: memfd offsets `[start, end)`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct ExtentWire {
    pub(super) start: U64,
    pub(super) end: U64,
}

/// One entry of a batch head: a page's memfd offset, with flags in its low bits.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(transparent)]
pub struct Entry(pub(super) U64);

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
    pub(super) fn unknown_flags(&self) -> u64 {
        self.0.get() & (PAGE as u64 - 1) & !KIND_FLAGS
    }
    /// At most one of zero, delta and reference.
    pub(super) fn conflicting(&self) -> bool {
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
pub(super) const FROM_HOST_CACHE: u64 = u64::MAX;

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
