//! Disks that move with the VM (`--storage copy`): which ones the Config offers
//! ([`DiskOffer`]), and the DiskBlocks frame that carries their content: a [`DiskHeader`],
//! runs of bytes ([`DiskRunWire`], zero runs carry no data), then the data of the non-zero
//! runs, raw or compressed as one block.
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::*;
use crate::codec::Codec;

/// Runs a DiskBlocks frame may carry.
pub const MAX_DISK_RUNS: usize = 256;
/// Bytes of disk a DiskBlocks frame may cover with data.
pub const MAX_DISK_DATA: usize = 1 << 20;
/// The largest disk a source may offer to copy (64 TiB).
pub const MAX_DISK_SIZE: u64 = 1 << 46;
/// Runs and offsets are in whole sectors.
pub const DISK_SECTOR: u64 = 512;
/// What marks a destination's copy not yet complete: its file name and this. A disk offered
/// under such a name is refused (its copy would pass for another's marker).
pub const INCOMPLETE_SUFFIX: &str = ".livemig-incomplete";
/// The run is zeros: no data follows for it.
const RUN_ZERO: u32 = 1;

/// A disk the source copies to the destination, as its Config offers it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskOffer {
    /// The device (`disk0`) whose image this is.
    pub name: String,
    /// The image's file name on the source: the copy takes it in the destination's disk
    /// directory.
    pub file: String,
    /// Bytes the guest sees.
    pub size: u64,
    /// Bytes allocated on the source (holes are not sent): what the destination needs free.
    pub allocated: u64,
}

impl DiskOffer {
    /// Whether the offer is one a destination could write: a plain file name, a size in
    /// whole sectors within the limit.
    pub fn check(&self) -> Result<(), String> {
        let f = &self.file;
        let plain = !f.is_empty()
            && f.len() <= 200
            && f != "."
            && f != ".."
            && !f.starts_with('.')
            && !f.ends_with(INCOMPLETE_SUFFIX)
            && !f.contains(['/', '\0']);
        if !plain {
            return Err(format!("{}: {f:?} is not a plain file name", self.name));
        }
        if self.size == 0 || self.size > MAX_DISK_SIZE || !self.size.is_multiple_of(DISK_SECTOR) {
            return Err(format!(
                "{}: a disk of {} bytes (whole sectors, at most {MAX_DISK_SIZE})",
                self.name, self.size
            ));
        }
        if self.allocated > self.size {
            return Err(format!(
                "{}: {} bytes allocated of {}",
                self.name, self.allocated, self.size
            ));
        }
        Ok(())
    }
}

/// In front of a DiskBlocks payload.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub(super) struct DiskHeader {
    /// Index into the Config's disk offers.
    pub(super) disk: u8,
    /// 0: raw; otherwise a [`Codec`].
    pub(super) codec: u8,
    pub(super) reserved: [u8; 2],
    pub(super) runs: U32,
    /// Bytes of data once decompressed: the non-zero runs' lengths.
    pub(super) raw_len: U32,
    pub(super) reserved2: U32,
}

/// One run of a DiskBlocks frame.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct DiskRunWire {
    offset: U64,
    len: U32,
    flags: U32,
}

/// A run of a disk: `len` bytes at `offset`, zeros or the next `len` bytes of the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskRun {
    pub offset: u64,
    pub len: u32,
    pub zero: bool,
}

/// A DiskBlocks frame, decoded and checked for shape (offsets against the disk's size are
/// the receiver's to check).
#[derive(Debug)]
pub struct DiskBlocks<'a> {
    pub disk: usize,
    pub codec: Option<Codec>,
    pub runs: Vec<DiskRun>,
    pub raw_len: usize,
    pub data: &'a [u8],
}

/// The largest DiskBlocks payload: header, runs, data that compression made a little larger.
pub(super) const DISK_BLOCKS_MAX: usize = std::mem::size_of::<DiskHeader>()
    + MAX_DISK_RUNS * std::mem::size_of::<DiskRunWire>()
    + MAX_DISK_DATA
    + (64 << 10);

impl<W: std::io::Write> FrameWriter<W> {
    /// A DiskBlocks frame; `data` is the non-zero runs' bytes (`raw_len` of them),
    /// compressed with `codec` if given.
    pub fn send_disk_blocks(
        &mut self,
        disk: u8,
        codec: Option<Codec>,
        runs: &[DiskRun],
        raw_len: usize,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        let h = DiskHeader {
            disk,
            codec: codec.map_or(0, |c| c as u8),
            reserved: [0; 2],
            runs: U32::new(u32::try_from(runs.len()).unwrap_or(u32::MAX)),
            raw_len: U32::new(u32::try_from(raw_len).unwrap_or(u32::MAX)),
            reserved2: U32::new(0),
        };
        let wire: Vec<DiskRunWire> = runs
            .iter()
            .map(|r| DiskRunWire {
                offset: U64::new(r.offset),
                len: U32::new(r.len),
                flags: U32::new(if r.zero { RUN_ZERO } else { 0 }),
            })
            .collect();
        self.send_parts(Kind::DiskBlocks, &[h.as_bytes(), wire.as_bytes(), data])
    }
}

pub(super) fn decode_disk_blocks(payload: &[u8]) -> Result<DiskBlocks<'_>, ProtocolError> {
    let bad = malformed(Kind::DiskBlocks);
    let (h, rest) =
        DiskHeader::read_from_prefix(payload).map_err(|_| bad("shorter than its header".into()))?;
    let codec = match h.codec {
        0 => None,
        c => Some(Codec::from_u8(c).ok_or_else(|| bad(format!("unknown codec {c}")))?),
    };
    let n = h.runs.get() as usize;
    if n > MAX_DISK_RUNS {
        return Err(bad(format!("{n} runs, the limit is {MAX_DISK_RUNS}")));
    }
    let (wire, data) = <[DiskRunWire]>::ref_from_prefix_with_elems(rest, n)
        .map_err(|_| bad(format!("{n} runs do not fit in {} bytes", rest.len())))?;
    let mut runs = Vec::with_capacity(n);
    let mut raw = 0usize;
    for w in wire {
        let (offset, len, flags) = (w.offset.get(), w.len.get(), w.flags.get());
        if flags & !RUN_ZERO != 0
            || len == 0
            || len as usize > MAX_DISK_DATA
            || !offset.is_multiple_of(DISK_SECTOR)
            || !u64::from(len).is_multiple_of(DISK_SECTOR)
            || offset.checked_add(u64::from(len)).is_none()
        {
            return Err(bad(format!(
                "run of {len} bytes at {offset:#x} (flags {flags:#x}): not whole sectors"
            )));
        }
        let zero = flags & RUN_ZERO != 0;
        if !zero {
            raw += len as usize;
        }
        runs.push(DiskRun { offset, len, zero });
    }
    let raw_len = h.raw_len.get() as usize;
    if raw != raw_len || raw_len > MAX_DISK_DATA || (codec.is_none() && data.len() != raw_len) {
        return Err(bad(format!(
            "{} bytes of data ({raw_len} raw) for runs of {raw}",
            data.len()
        )));
    }
    Ok(DiskBlocks {
        disk: usize::from(h.disk),
        codec,
        runs,
        raw_len,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(codec: Option<Codec>, runs: &[DiskRun], data: &[u8], raw: usize) -> Vec<u8> {
        let mut buf = Vec::new();
        FrameWriter::new(&mut buf)
            .send_disk_blocks(2, codec, runs, raw, data)
            .unwrap();
        buf
    }

    #[test]
    fn disk_blocks_round_trip_and_bad_ones_are_refused() {
        let runs = [
            DiskRun {
                offset: 0,
                len: 4096,
                zero: false,
            },
            DiskRun {
                offset: 1 << 20,
                len: 8192,
                zero: true,
            },
        ];
        let data = vec![7u8; 4096];
        let buf = roundtrip(None, &runs, &data, 4096);
        let mut r = FrameReader::new(&buf[..]);
        match r.next_frame().unwrap() {
            Frame::DiskBlocks(d) => {
                assert_eq!(d.disk, 2);
                assert_eq!(d.runs, runs);
                assert_eq!(d.data, &data[..]);
            }
            f => panic!("{f:?}"),
        }
        // Data that does not match the runs, and a run not in whole sectors.
        let buf = roundtrip(None, &runs, &data[..100], 4096);
        let e = FrameReader::new(&buf[..]).next_frame().unwrap_err();
        assert!(e.to_string().contains("bytes of data"), "{e}");
        let odd = [DiskRun {
            offset: 3,
            len: 512,
            zero: true,
        }];
        let buf = roundtrip(None, &odd, &[], 0);
        let e = FrameReader::new(&buf[..]).next_frame().unwrap_err();
        assert!(e.to_string().contains("whole sectors"), "{e}");
    }

    #[test]
    fn offers_name_plain_files() {
        let o = |file: &str, size| DiskOffer {
            name: "disk0".into(),
            file: file.into(),
            size,
            allocated: 0,
        };
        assert!(o("vm1.img", 1 << 30).check().is_ok());
        for f in [
            "",
            "..",
            "a/b",
            ".hidden",
            "x\0y",
            "vm.img.livemig-incomplete",
        ] {
            assert!(o(f, 1 << 30).check().is_err(), "{f:?}");
        }
        assert!(o("vm1.img", 1000).check().is_err());
        assert!(o("vm1.img", MAX_DISK_SIZE * 2).check().is_err());
    }
}
