//! One connection's sending side, the same for the control connection and each page stream:
//! frames through its buffered writer, direct page data straight from guest RAM through its
//! socket with zero-copy (plain connections; under TLS the data must be encrypted, so it is
//! copied through the writer).
use std::io::{BufReader, BufWriter};
use std::os::fd::BorrowedFd;

use ram::{GuestRam, PAGE_SIZE};
use transport::{CountingReader, CountingWriter, Io, Split, ZeroCopy};

use crate::codec::Codec;
use crate::protocol::{FrameWriter, ProtocolError};
use crate::MigrationError;

pub(super) type Reader<'a> = &'a mut BufReader<CountingReader<Io>>;
pub(super) type Writer<'a> = &'a mut BufWriter<CountingWriter<Io>>;

/// A batch ready for the wire.
pub(super) enum Outgoing {
    /// Batch head and the copied data of its non-zero pages.
    Pages { head: Vec<u8>, data: Vec<u8> },
    /// Batch head and its data pages compressed (`raw_len` bytes when decompressed).
    Compressed {
        codec: Codec,
        raw_len: usize,
        head: Vec<u8>,
        data: Vec<u8>,
    },
    /// Batch head and its data pages as runs of consecutive pages (first memfd offset,
    /// pages), sent from guest RAM as they are.
    Direct {
        head: Vec<u8>,
        runs: Vec<(u64, usize)>,
    },
}

impl Outgoing {
    /// What the batch adds to a stream's queue until written (for picking streams).
    pub fn queued_len(&self) -> usize {
        match self {
            Outgoing::Pages { head, data } | Outgoing::Compressed { head, data, .. } => {
                head.len() + data.len()
            }
            Outgoing::Direct { head, runs } => {
                head.len() + runs.iter().map(|r| r.1).sum::<usize>() * PAGE_SIZE as usize
            }
        }
    }
}

pub(super) struct Link<'a> {
    pub out: FrameWriter<Writer<'a>>,
    /// None under TLS: no zero-copy there.
    socket: Option<BorrowedFd<'a>>,
    /// Made on the first direct batch.
    zc: Option<ZeroCopy<'a>>,
    /// Scratch for direct pages copied through the writer (TLS).
    copy: Vec<u8>,
    /// How long zero-copy sends may go without completing.
    timeout: std::time::Duration,
}

impl<'a> Link<'a> {
    /// A link over a connection's parts whose frames continue at sequence `seq`, whose peer
    /// may stall for `timeout`; returns the reader too, for the answers.
    pub fn new(split: Split<'a>, seq: u32, timeout: std::time::Duration) -> (Self, Reader<'a>) {
        let link = Link {
            out: FrameWriter::with_seq(split.writer, seq),
            socket: split.socket,
            zc: None,
            copy: Vec::new(),
            timeout,
        };
        (link, split.reader)
    }

    /// Writes one batch.
    pub fn send(&mut self, ram: &GuestRam, b: Outgoing) -> Result<(), MigrationError> {
        match b {
            Outgoing::Pages { head, data } => self.out.send_pages(&head, &data)?,
            Outgoing::Compressed {
                codec,
                raw_len,
                head,
                data,
            } => self.out.send_compressed(codec, raw_len, &head, &data)?,
            Outgoing::Direct { head, runs } => self.send_direct(ram, &head, &runs)?,
        }
        Ok(())
    }

    /// How direct batches go out on this connection.
    pub fn direct_mechanism(&self) -> &'static str {
        match (&self.zc, self.socket) {
            (Some(z), _) => z.mechanism(),
            (None, Some(_)) => "zero-copy (MSG_ZEROCOPY)",
            (None, None) => "copied through TLS",
        }
    }

    /// Whether direct page data can leave straight from guest RAM (not under TLS).
    pub fn is_plain(&self) -> bool {
        self.socket.is_some()
    }

    /// One PagesDirect frame: header and head through the writer, page data zero-copy from
    /// guest RAM, or copied through the writer where the connection encrypts.
    fn send_direct(
        &mut self,
        ram: &GuestRam,
        head: &[u8],
        runs: &[(u64, usize)],
    ) -> Result<(), MigrationError> {
        let page = PAGE_SIZE as usize;
        let pages: usize = runs.iter().map(|r| r.1).sum();
        self.out.send_direct_head(head, pages * page)?;
        let Some(socket) = self.socket else {
            self.copy.resize(page, 0);
            for &(start, n) in runs {
                for o in (start..).step_by(page).take(n) {
                    ram.read_at(o, &mut self.copy)?;
                    self.out.write_raw(&self.copy)?;
                }
            }
            return Ok(());
        };
        self.out.flush()?;
        let zc = match &mut self.zc {
            Some(z) => z,
            None => {
                let (counters, limit) = self.out.inner().get_ref().accounting();
                self.zc.insert(
                    ZeroCopy::new(socket, counters, limit)
                        .map_err(MigrationError::socket("SO_ZEROCOPY"))?,
                )
            }
        };
        if zc.prefers_file() {
            let runs: Vec<(u64, u64)> = runs.iter().map(|&(o, n)| (o, (n * page) as u64)).collect();
            zc.send_file(ram.backing_file(), &runs)
                .map_err(ProtocolError::Io)?;
            return Ok(());
        }
        // One iovec per run of consecutive pages, not per page: fewer, larger fragments.
        let mut slices = Vec::new();
        for &(start, n) in runs {
            slices.extend(ram.slices_at(start, n * page)?);
        }
        zc.send_all(&slices).map_err(ProtocolError::Io)?;
        Ok(())
    }

    /// Waits until every zero-copy send has completed.
    pub fn finish(&mut self) -> Result<(), MigrationError> {
        if let Some(z) = &mut self.zc {
            z.finish(self.timeout).map_err(ProtocolError::Io)?;
        }
        Ok(())
    }
}

/// Runs of consecutive page offsets: (first, pages).
pub(super) fn consecutive(pages: &[u64]) -> Vec<(u64, usize)> {
    let mut out: Vec<(u64, usize)> = Vec::new();
    for &o in pages {
        match out.last_mut() {
            Some((start, n)) if *start + *n as u64 * PAGE_SIZE == o => *n += 1,
            _ => out.push((o, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn consecutive_pages_make_one_run() {
        let p = 4096;
        assert_eq!(
            super::consecutive(&[0, p, 2 * p, 5 * p, 6 * p, 9 * p]),
            vec![(0, 3), (5 * p, 2), (9 * p, 1)]
        );
        assert!(super::consecutive(&[]).is_empty());
    }
}
