//! The migration wire protocol.
//!
//! Handshake (16 bytes each way): magic `LVMG`, version u16, transport u8, status u8 (reply
//! only), capabilities u64. Then frames: a 24-byte header (kind u8, 3 reserved, seq u32 counting
//! from 0 per direction, payload length u32, reserved u32, xxh3-64 over header bytes 0..16 and
//! the payload) and the payload. Lengths are bounded per kind; anything else is an error.
use std::io::{self, BufRead, Read, Write};

use xxhash_rust::xxh3::Xxh3;

pub const MAGIC: [u8; 4] = *b"LVMG";
pub const VERSION: u16 = 1;
pub const HELLO_LEN: usize = 16;
pub const HEADER_LEN: usize = 24;
pub const PAGE: usize = 4096;
/// Pages per batch frame: 1 MiB of data, big enough to amortise headers and checksums.
pub const MAX_BATCH_PAGES: usize = 256;
const ZERO_FLAG: u64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
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
    /// src→dst: JSON VmConfig; the destination builds the VM.
    Config = 1,
    /// dst→src: the VM is built.
    Ready = 2,
    /// src→dst: a batch of pages.
    Pages = 3,
    /// src→dst: u32 round, u64 pages in it.
    RoundEnd = 4,
    /// src→dst: JSON VmState (the VM is paused on the source).
    State = 5,
    /// src→dst: nothing more follows.
    Done = 6,
    /// dst→src: everything is in place; the destination resumes the VM.
    Confirm = 7,
    /// dst→src: JSON outcome of the guest's own verify on the destination.
    Verified = 8,
    /// either way: UTF-8 reason; the migration is off.
    Abort = 9,
    /// src→dst: codec u8, 3 reserved, raw data length u32, then a Pages head (count +
    /// entries), then the non-zero pages' data compressed as one block.
    PagesCompressed = 10,
    /// src→dst: a Pages head, then the data pages straight from guest RAM. The checksum covers
    /// the header and the head: the data may be changed by the running guest after it was read
    /// for a checksum, so it rests on TCP's; a torn page is dirty and always sent again, and the
    /// last (paused) round cannot tear.
    PagesDirect = 11,
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
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_len(self) -> usize {
        match self {
            Kind::Ready | Kind::Done | Kind::Confirm => 0,
            Kind::RoundEnd => 12,
            Kind::Config | Kind::Verified | Kind::Abort => 64 << 10,
            Kind::Pages | Kind::PagesDirect => 4 + MAX_BATCH_PAGES * (8 + PAGE),
            // Incompressible data can grow a little; never past this.
            Kind::PagesCompressed => 8 + 4 + MAX_BATCH_PAGES * (8 + PAGE) + (64 << 10),
            Kind::State => 32 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the stream ended in the middle of {0}")]
    Truncated(&'static str),
    #[error("the peer closed the connection")]
    Closed,
    #[error("bad magic {0:02x?}: the peer is not livemig")]
    BadMagic([u8; 4]),
    #[error("protocol version {theirs} is not supported (this livemig speaks {VERSION})")]
    Version { theirs: u16 },
    #[error("transport {0} is not supported by the destination")]
    TransportUnsupported(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{kind:?} frame of {len} bytes exceeds its limit of {max}")]
    Oversized { kind: Kind, len: usize, max: usize },
    #[error("frame {seq} ({kind:?}) failed its checksum")]
    Checksum { seq: u32, kind: Kind },
    #[error("frame out of order: expected sequence {expected}, got {got}")]
    OutOfOrder { expected: u32, got: u32 },
    #[error("{kind:?} frame not expected while {state}")]
    Unexpected { kind: Kind, state: &'static str },
    #[error("malformed {kind:?} frame: {why}")]
    Malformed { kind: Kind, why: String },
    #[error("the peer aborted: {0}")]
    PeerAborted(String),
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

/// Page streams a migration may open beside its control connection.
pub const MAX_STREAMS: u16 = 16;
const DATA_MAGIC: [u8; 4] = *b"LVMD";

/// The Config frame's payload: the VM to build and the page streams that will follow.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Prepare {
    pub vm: vmm::VmConfig,
    /// Page streams beside the control connection; 0 = pages travel on the control connection.
    pub streams: u16,
    /// Ties the page streams to this migration.
    pub session: u64,
}

/// First 16 bytes on a page stream: magic `LVMD`, version, stream index, session.
pub fn write_data_hello(w: &mut impl Write, index: u16, session: u64) -> io::Result<()> {
    let mut b = [0u8; HELLO_LEN];
    b[..4].copy_from_slice(&DATA_MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&index.to_le_bytes());
    b[8..16].copy_from_slice(&session.to_le_bytes());
    w.write_all(&b)?;
    w.flush()
}

/// Reads a page stream's hello; returns its index.
pub fn read_data_hello(
    r: &mut impl Read,
    session: u64,
    streams: u16,
) -> Result<u16, ProtocolError> {
    let mut b = [0u8; HELLO_LEN];
    read_full(r, &mut b, "a page stream's handshake")?;
    let magic: [u8; 4] = b[..4].try_into().expect("4 bytes");
    if magic != DATA_MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(ProtocolError::Version { theirs: version });
    }
    let index = u16::from_le_bytes([b[6], b[7]]);
    let theirs = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    if theirs != session || index >= streams {
        return Err(ProtocolError::Malformed {
            kind: Kind::Config,
            why: format!("page stream {index} of session {theirs:#x} does not belong to session {session:#x} with {streams} streams"),
        });
    }
    Ok(index)
}

/// What the source offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub transport: Transport,
    pub capabilities: u64,
}

pub fn write_hello(w: &mut impl Write, h: &Hello) -> io::Result<()> {
    let mut b = [0u8; HELLO_LEN];
    b[..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&h.version.to_le_bytes());
    b[6] = h.transport as u8;
    b[8..16].copy_from_slice(&h.capabilities.to_le_bytes());
    w.write_all(&b)?;
    w.flush()
}

/// Reads the source's hello; on a version or transport we do not speak, tells the peer why.
pub fn accept_hello(r: &mut impl Read, w: &mut impl Write) -> Result<Hello, ProtocolError> {
    let mut b = [0u8; HELLO_LEN];
    read_full(r, &mut b, "the handshake")?;
    let magic: [u8; 4] = b[..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    let mut reply = [0u8; HELLO_LEN];
    reply[..4].copy_from_slice(&MAGIC);
    reply[4..6].copy_from_slice(&VERSION.to_le_bytes());
    let transport = Transport::from_u8(b[6]);
    let status = match (version == VERSION, transport) {
        (false, _) => 1,
        (true, None) => 2,
        (true, Some(_)) => 0,
    };
    reply[7] = status;
    w.write_all(&reply)?;
    w.flush()?;
    match (status, transport) {
        (0, Some(t)) => Ok(Hello {
            version,
            transport: t,
            capabilities: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        }),
        (1, _) => Err(ProtocolError::Version { theirs: version }),
        _ => Err(ProtocolError::TransportUnsupported(b[6])),
    }
}

/// Reads the destination's answer to our hello.
pub fn read_hello_reply(r: &mut impl Read, ours: &Hello) -> Result<(), ProtocolError> {
    let mut b = [0u8; HELLO_LEN];
    read_full(r, &mut b, "the handshake reply")?;
    let magic: [u8; 4] = b[..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    match b[7] {
        0 => Ok(()),
        1 => Err(ProtocolError::Version {
            theirs: u16::from_le_bytes([b[4], b[5]]),
        }),
        _ => Err(ProtocolError::TransportUnsupported(ours.transport as u8)),
    }
}

fn header(kind: Kind, seq: u32, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    h[4..8].copy_from_slice(&seq.to_le_bytes());
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

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

    /// Sends one frame whose payload is the concatenation of `parts` (no copy into one buffer).
    pub fn send_parts(&mut self, kind: Kind, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(
            len <= kind.max_len(),
            "{kind:?} payload {len} over its limit"
        );
        let mut h = header(kind, self.seq, len);
        let mut sum = Xxh3::new();
        sum.update(&h[..16]);
        for p in parts {
            sum.update(p);
        }
        h[16..24].copy_from_slice(&sum.digest().to_le_bytes());
        self.w.write_all(&h)?;
        for p in parts {
            self.w.write_all(p)?;
        }
        self.seq = self.seq.wrapping_add(1);
        Ok(())
    }

    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        self.send_parts(kind, &[payload])
    }

    /// Writes a PagesDirect header and head; the caller then sends exactly `data_len` bytes of
    /// page data itself (zero-copy), after flushing this writer.
    pub fn send_direct_head(&mut self, head: &[u8], data_len: usize) -> io::Result<()> {
        let mut h = header(Kind::PagesDirect, self.seq, head.len() + data_len);
        let mut sum = Xxh3::new();
        sum.update(&h[..16]);
        sum.update(head);
        h[16..24].copy_from_slice(&sum.digest().to_le_bytes());
        self.w.write_all(&h)?;
        self.w.write_all(head)?;
        self.seq = self.seq.wrapping_add(1);
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
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
    /// Moves the next `len` bytes into `file` at `off`.
    fn read_direct(&mut self, file: &std::fs::File, off: u64, len: usize) -> io::Result<()>;
}

impl<T: transport::ReadToFile> DirectRead for &mut io::BufReader<T> {
    fn read_direct(&mut self, file: &std::fs::File, off: u64, len: usize) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // What the reader already buffered goes first; the rest comes straight from the source.
        let have = self.buffer().len().min(len);
        file.write_all_at(&self.buffer()[..have], off)?;
        self.consume(have);
        self.get_mut()
            .read_to_file(file, off + have as u64, len - have)
    }
}

impl<R: Read> FrameReader<R> {
    pub fn new(r: R) -> Self {
        FrameReader {
            r,
            seq: 0,
            buf: Vec::new(),
            direct_left: 0,
        }
    }

    pub fn recv(&mut self) -> Result<(Kind, &[u8]), ProtocolError> {
        if self.direct_left != 0 {
            return Err(ProtocolError::Malformed {
                kind: Kind::PagesDirect,
                why: format!("{} bytes of page data were not read", self.direct_left),
            });
        }
        let mut h = [0u8; HEADER_LEN];
        read_full(&mut self.r, &mut h, "a frame header")?;
        let kind = Kind::from_u8(h[0]).ok_or(ProtocolError::UnknownKind(h[0]))?;
        let seq = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as usize;
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
            // Only the head is ours to read; its entries tell how much page data follows.
            let bad = |why: String| ProtocolError::Malformed { kind, why };
            let mut count = [0u8; 4];
            read_full(&mut self.r, &mut count, "a frame payload")?;
            let n = u32::from_le_bytes(count) as usize;
            if n > MAX_BATCH_PAGES || 4 + n * 8 > len {
                return Err(bad(format!("{n} pages in a {len}-byte frame")));
            }
            self.buf.clear();
            self.buf.extend_from_slice(&count);
            self.buf.resize(4 + n * 8, 0);
            read_full(&mut self.r, &mut self.buf[4..], "a frame payload")?;
            let mut sum = Xxh3::new();
            sum.update(&h[..16]);
            sum.update(&self.buf);
            if sum.digest() != u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")) {
                return Err(ProtocolError::Checksum { seq, kind });
            }
            let data_pages = (0..n)
                .filter(|i| self.buf[4 + i * 8] & ZERO_FLAG as u8 == 0)
                .count();
            if len != 4 + n * 8 + data_pages * PAGE {
                return Err(bad(format!("{len} bytes for {data_pages} data pages")));
            }
            self.direct_left = data_pages * PAGE;
            self.seq = self.seq.wrapping_add(1);
            return Ok((kind, &self.buf));
        }
        self.buf.resize(len, 0);
        read_full(&mut self.r, &mut self.buf, "a frame payload")?;
        let mut sum = Xxh3::new();
        sum.update(&h[..16]);
        sum.update(&self.buf);
        if sum.digest() != u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")) {
            return Err(ProtocolError::Checksum { seq, kind });
        }
        self.seq = self.seq.wrapping_add(1);
        if kind == Kind::Abort {
            return Err(ProtocolError::PeerAborted(
                String::from_utf8_lossy(&self.buf).into_owned(),
            ));
        }
        Ok((kind, &self.buf))
    }

    pub fn inner(&mut self) -> &mut R {
        &mut self.r
    }

    /// Reads the next `dst.len()` bytes of a PagesDirect frame's page data into `dst`.
    pub fn read_direct(
        &mut self,
        file: &std::fs::File,
        off: u64,
        len: usize,
    ) -> Result<(), ProtocolError>
    where
        R: DirectRead,
    {
        if len > self.direct_left {
            return Err(ProtocolError::Malformed {
                kind: Kind::PagesDirect,
                why: "reading past the frame's page data".into(),
            });
        }
        self.r
            .read_direct(file, off, len)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => ProtocolError::Truncated("page data"),
                _ => ProtocolError::Io(e),
            })?;
        self.direct_left -= len;
        Ok(())
    }
}

/// Builds a Pages payload: u32 count, count × u64 (memfd offset | zero flag), then the data
/// of the non-zero pages in order.
#[derive(Default)]
pub struct PageBatch {
    entries: Vec<u8>,
    count: u32,
    pub zero: u32,
}

impl PageBatch {
    pub fn clear(&mut self) {
        self.entries.clear();
        self.count = 0;
        self.zero = 0;
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn push(&mut self, offset: u64, zero: bool) {
        let v = offset | if zero { ZERO_FLAG } else { 0 };
        self.entries.extend_from_slice(&v.to_le_bytes());
        self.count += 1;
        self.zero += zero as u32;
    }

    /// The payload's head (count + entries); page data follows as separate parts.
    pub fn head(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(4 + self.entries.len());
        h.extend_from_slice(&self.count.to_le_bytes());
        h.extend_from_slice(&self.entries);
        h
    }
}

/// One page of a decoded batch.
#[derive(Debug, PartialEq, Eq)]
pub struct PageRef<'a> {
    pub offset: u64,
    /// None = all zero.
    pub data: Option<&'a [u8]>,
}

/// Checks a Pages payload completely, then returns its pages; `limit` bounds the offsets.
pub fn decode_pages(payload: &[u8], limit: u64) -> Result<Vec<PageRef<'_>>, ProtocolError> {
    let head_len = head_len(payload, Kind::Pages)?;
    decode_batch(
        &payload[..head_len],
        &payload[head_len..],
        limit,
        Kind::Pages,
    )
}

/// Length of the head (count + entries) at the start of `b`.
fn head_len(b: &[u8], kind: Kind) -> Result<usize, ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed { kind, why };
    if b.len() < 4 {
        return Err(bad("shorter than its count".into()));
    }
    let count = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
    if count > MAX_BATCH_PAGES {
        return Err(bad(format!(
            "{count} pages, the limit is {MAX_BATCH_PAGES}"
        )));
    }
    if b.len() < 4 + count * 8 {
        return Err(bad(format!(
            "{count} entries do not fit in {} bytes",
            b.len()
        )));
    }
    Ok(4 + count * 8)
}

/// A PagesCompressed payload, split: codec, head, compressed data, and the raw data length.
pub struct CompressedBatch<'a> {
    pub codec: crate::codec::Codec,
    pub head: &'a [u8],
    pub data: &'a [u8],
    pub raw_len: usize,
}

pub fn split_compressed(payload: &[u8]) -> Result<CompressedBatch<'_>, ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed {
        kind: Kind::PagesCompressed,
        why,
    };
    if payload.len() < 8 {
        return Err(bad("shorter than its header".into()));
    }
    let codec = crate::codec::Codec::from_u8(payload[0])
        .ok_or_else(|| bad(format!("unknown codec {}", payload[0])))?;
    let raw_len = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes")) as usize;
    let rest = &payload[8..];
    let head_len = head_len(rest, Kind::PagesCompressed)?;
    let head = &rest[..head_len];
    let count = (head_len - 4) / 8;
    let nonzero = (0..count)
        .filter(|i| head[4 + i * 8] & ZERO_FLAG as u8 == 0)
        .count();
    // Checked before decompressing: a frame cannot make us allocate more than a batch.
    if raw_len != nonzero * PAGE {
        return Err(bad(format!(
            "raw length {raw_len} for {nonzero} data pages"
        )));
    }
    Ok(CompressedBatch {
        codec,
        head,
        data: &rest[head_len..],
        raw_len,
    })
}

/// A batch head's entries as (memfd offset, is zero), checked against `limit`.
pub fn parse_entries(
    head: &[u8],
    limit: u64,
    kind: Kind,
) -> Result<Vec<(u64, bool)>, ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed { kind, why };
    let count = (head_len(head, kind)? - 4) / 8;
    (0..count)
        .map(|i| {
            let e = u64::from_le_bytes(head[4 + i * 8..12 + i * 8].try_into().expect("8 bytes"));
            let offset = e & !(PAGE as u64 - 1);
            if e & (PAGE as u64 - 1) & !ZERO_FLAG != 0 {
                return Err(bad(format!("entry {i} has unknown flag bits {e:#x}")));
            }
            if offset >= limit {
                return Err(bad(format!(
                    "page offset {offset:#x} is beyond guest RAM ({limit:#x})"
                )));
            }
            Ok((offset, e & ZERO_FLAG != 0))
        })
        .collect()
}

/// Decodes a batch from its head and its (uncompressed) page data.
pub fn decode_batch<'a>(
    head: &[u8],
    data_bytes: &'a [u8],
    limit: u64,
    kind: Kind,
) -> Result<Vec<PageRef<'a>>, ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed { kind, why };
    let count = (head_len(head, kind)? - 4) / 8;
    let payload = head;
    let mut out = Vec::with_capacity(count);
    let mut data = 0usize;
    for i in 0..count {
        let e = u64::from_le_bytes(payload[4 + i * 8..12 + i * 8].try_into().expect("8 bytes"));
        let zero = e & ZERO_FLAG != 0;
        let offset = e & !(PAGE as u64 - 1);
        if e & (PAGE as u64 - 1) & !ZERO_FLAG != 0 {
            return Err(bad(format!("entry {i} has unknown flag bits {e:#x}")));
        }
        if offset >= limit {
            return Err(bad(format!(
                "page offset {offset:#x} is beyond guest RAM ({limit:#x})"
            )));
        }
        if zero {
            out.push(PageRef { offset, data: None });
        } else {
            let page = data_bytes
                .get(data..data + PAGE)
                .ok_or_else(|| bad(format!("data for page {i} is missing")))?;
            out.push(PageRef {
                offset,
                data: Some(page),
            });
            data += PAGE;
        }
    }
    if data != data_bytes.len() {
        return Err(bad(format!("{} trailing bytes", data_bytes.len() - data)));
    }
    Ok(out)
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
                data: None
            }
        );
        assert!(pages[2].data.unwrap().iter().all(|&b| b == 9));
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
        reader.read_direct(&file, 4096, 2 * PAGE).unwrap();
        let mut p = vec![0u8; 2 * PAGE];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut p, 4096).unwrap();
        assert!(p[..PAGE].iter().all(|&x| x == 7) && p[PAGE..].iter().all(|&x| x == 9));
        assert!(
            reader.read_direct(&file, 0, 1).is_err(),
            "no more data in this frame"
        );
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
            fr.read_direct(&tempfile::tempfile().unwrap(), 0, 2 * PAGE),
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
        let b = split_compressed(&ok).unwrap();
        assert_eq!(
            (b.raw_len, b.head.len(), b.data),
            (4096, head.len(), &b"compressed bytes"[..])
        );
        // A raw length that does not match the data pages (a decompression bomb, say).
        assert!(split_compressed(&frame(1, 1 << 30)).is_err());
        assert!(split_compressed(&frame(1, 8192)).is_err());
        assert!(split_compressed(&frame(7, 4096)).is_err(), "unknown codec");
        assert!(split_compressed(&ok[..6]).is_err(), "short header");
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
