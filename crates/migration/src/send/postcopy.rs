//! Post-copy on the source: the VM is paused here and resumes on the destination without the
//! pages it still owes. A thread answers the destination's asks on a connection of their own
//! (never behind the push), while the session pushes the rest over the control connection
//! from the guest's latest fault on. Every page stays here until the destination says it
//! holds them all.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ram::{GuestRam, PAGE_SIZE};
use transport::{Connection, ShutdownHandle};

use crate::postcopy::PageBits;
use crate::protocol::{Frame, FrameReader, FrameWriter, PageBatch, ProtocolError};
use crate::MigrationError;

/// The guest's latest fault as the destination asked for it: a count that grows with each
/// ask, and the page asked for first.
#[derive(Default)]
pub(super) struct LatestFault {
    seq: AtomicU64,
    off: AtomicU64,
}

impl LatestFault {
    pub fn get(&self) -> (u64, u64) {
        (
            self.seq.load(Ordering::SeqCst),
            self.off.load(Ordering::SeqCst),
        )
    }
}

/// The thread that answers asks, and what it shares with the push.
pub(super) struct Demand {
    thread: Option<JoinHandle<Result<(u64, u64), MigrationError>>>,
    conns: Vec<ShutdownHandle>,
    pub fault: Arc<LatestFault>,
}

impl Demand {
    /// Answers asks for pages of `ram` (paused, so it holds what the destination lacks) on
    /// `replies`, read from `requests`; marks what it sends as sent in `unsent`.
    pub fn start(
        ram: Arc<GuestRam>,
        unsent: Arc<PageBits>,
        mut requests: Connection,
        mut replies: Connection,
    ) -> Result<Self, MigrationError> {
        let handle = |c: &Connection| {
            c.shutdown_handle()
                .map_err(MigrationError::socket("cloning a post-copy connection"))
        };
        let conns = vec![handle(&requests)?, handle(&replies)?];
        // The guest may touch nothing for a long while: no deadline on the asks.
        requests
            .set_read_timeout(None)
            .map_err(MigrationError::socket("setting the read timeout"))?;
        let fault = Arc::new(LatestFault::default());
        let f = fault.clone();
        let thread = std::thread::Builder::new()
            .name("livemig-demand".into())
            .spawn(move || serve(&ram, &unsent, &f, &mut requests, &mut replies))
            .map_err(|source| MigrationError::Thread {
                what: "post-copy demand",
                source,
            })?;
        Ok(Demand {
            thread: Some(thread),
            conns,
            fault,
        })
    }

    /// Stops answering (the destination holds every page); returns the pages it sent (with
    /// data, zero).
    pub fn stop(mut self) -> Result<(u64, u64), MigrationError> {
        self.conns.iter().for_each(ShutdownHandle::shutdown);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(MigrationError::StreamFailed),
            None => Ok((0, 0)),
        }
    }
}

impl Drop for Demand {
    fn drop(&mut self) {
        self.conns.iter().for_each(ShutdownHandle::shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads asks until the connection closes; answers each with the pages' content.
fn serve(
    ram: &GuestRam,
    unsent: &PageBits,
    fault: &LatestFault,
    requests: &mut Connection,
    replies: &mut Connection,
) -> Result<(u64, u64), MigrationError> {
    let mut input = FrameReader::new(&mut requests.reader);
    let mut out = FrameWriter::new(&mut replies.writer);
    let mut pages = Pages::default();
    loop {
        let asked = match input.next_frame() {
            Ok(Frame::PageRequest(p)) => p,
            Ok(f) => {
                return Err(ProtocolError::Unexpected {
                    kind: f.kind(),
                    state: "postcopy-asks",
                }
                .into())
            }
            // Shut down by `stop`, or the destination closed it: no more asks either way.
            Err(ProtocolError::Closed | ProtocolError::Io(_)) => return Ok(pages.sent),
            Err(e) => return Err(e.into()),
        };
        if let Some(&first) = asked.first() {
            fault.off.store(first, Ordering::SeqCst);
            fault.seq.fetch_add(1, Ordering::SeqCst);
        }
        for off in asked {
            if off >= ram.size() {
                return Err(ProtocolError::Malformed {
                    kind: crate::protocol::Kind::PageRequest,
                    why: format!("page {off:#x} is beyond guest RAM"),
                }
                .into());
            }
            // Sent again even if the push took it: it may still be queued behind others.
            unsent.take(off);
            pages.add(ram, off)?;
        }
        pages.send(&mut out)?;
        out.flush()?;
    }
}

/// A batch of owed pages being built, and the pages it has taken so far.
#[derive(Default)]
pub(super) struct Pages {
    batch: PageBatch,
    data: Vec<u8>,
    page: Vec<u8>,
    /// Pages sent with their data, and as zero.
    pub sent: (u64, u64),
}

impl Pages {
    /// Adds the page at `off` (zero pages go without data).
    pub fn add(&mut self, ram: &GuestRam, off: u64) -> Result<(), MigrationError> {
        self.page.resize(PAGE_SIZE as usize, 0);
        ram.read_at(off, &mut self.page)?;
        let zero = ram::is_zero(&self.page);
        self.batch.push(off, zero);
        if zero {
            self.sent.1 += 1;
        } else {
            self.data.extend_from_slice(&self.page);
            self.sent.0 += 1;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Sends the batch as a PostcopyPages frame (nothing if empty).
    pub fn send<W: std::io::Write>(
        &mut self,
        out: &mut FrameWriter<W>,
    ) -> Result<(), MigrationError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        out.send_postcopy_pages(&self.batch.head(), &self.data)?;
        self.batch.clear();
        self.data.clear();
        Ok(())
    }
}
