//! Frames on a stream: [`FrameWriter`] and [`FrameReader`] (header, sequence number, length
//! bounded per kind, checksum), and the direct reads that land page data in guest RAM.
use std::io::{self, BufRead, Read, Write};

use vm_memory::VolatileSlice;
use xxhash_rust::xxh3::Xxh3;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::IntoBytes;

use super::*;
use crate::codec::Codec;

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

    /// The Confirm, with the destination's side of the switchover.
    pub fn send_confirm(&mut self, c: Confirmed) -> Result<(), ProtocolError> {
        let wire = ConfirmWire {
            received_us: U32::new(c.received_us),
            loaded_us: U32::new(c.loaded_us),
            confirming_us: U32::new(c.confirming_us),
        };
        self.send(Kind::Confirm, wire.as_bytes())
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

    pub fn send_owed(&mut self, owed: &Owed) -> Result<(), ProtocolError> {
        self.send(Kind::Postcopy, &owed.encode())
    }

    /// The pages still owed, as a link made again in post-copy starts.
    pub fn send_resume(&mut self, owed: &Owed) -> Result<(), ProtocolError> {
        self.send(Kind::PostcopyResume, &owed.encode())
    }

    /// Frames sent so far (the next one's sequence number).
    pub fn seq(&self) -> u32 {
        self.seq
    }

    pub fn send_postcopy_pages(&mut self, head: &[u8], data: &[u8]) -> Result<(), ProtocolError> {
        self.send_parts(Kind::PostcopyPages, &[head, data])
    }

    pub fn send_page_request(&mut self, pages: &[u64]) -> Result<(), ProtocolError> {
        self.send(Kind::PageRequest, &encode_request(pages))
    }

    pub fn send_postcopy_done(&mut self, s: &PostcopyStats) -> Result<(), ProtocolError> {
        self.send_json(Kind::PostcopyDone, s)
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
        // An Abort ends the migration wherever it falls: a peer's failure path tells why
        // without knowing how many frames its session had sent.
        if seq != self.seq && kind != Kind::Abort {
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
