//! Post-copy on the source: the VM is paused here and resumes on the destination without the
//! pages it still owes. A thread answers the destination's asks on a connection of their own
//! (never behind the push), while the session pushes the rest over a third from the guest's
//! latest fault on. Every page stays here until the destination says it holds them all, so a
//! link that fails is made again ([`dial`]) and goes on from what the destination still lacks.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ram::{GuestRam, PAGE_SIZE};
use transport::{Connection, RateLimit, ShutdownHandle};

use super::MigrateOptions;
use crate::postcopy::PageBits;
use crate::protocol::{self, Frame, FrameReader, FrameWriter, Owed, PageBatch, ProtocolError};
use crate::MigrationError;

/// Post-copy's link on this side: asks come in on `requests`, answers go out on `replies`, the
/// push on `push` (paced with the page streams), which brings PostcopyDone back.
pub(super) struct Link {
    pub requests: Connection,
    pub replies: Connection,
    pub push: Connection,
    /// Frames the destination has sent on `push` already (a remade link's PostcopyResume).
    pub push_seq: u32,
}

impl Link {
    pub fn into_conns(self) -> [Connection; 3] {
        [self.requests, self.replies, self.push]
    }

    /// The link opened with the page streams (they came last of them).
    pub fn of(conns: [Connection; 3]) -> Self {
        let [requests, replies, push] = conns;
        Link {
            requests,
            replies,
            push,
            push_seq: 0,
        }
    }

    /// The pages the destination still lacks, as a remade link starts.
    pub fn resumed(&mut self, ram_bytes: u64) -> Result<Owed, MigrationError> {
        let mut input = FrameReader::new(&mut self.push.reader);
        let frame = input.next_frame()?;
        let owed = match frame {
            Frame::PostcopyResume(owed) if owed.ram_bytes == ram_bytes => Ok(owed),
            Frame::PostcopyResume(owed) => Err(ProtocolError::Malformed {
                kind: protocol::Kind::PostcopyResume,
                why: format!(
                    "a bitmap over {} bytes for {ram_bytes} bytes of guest RAM",
                    owed.ram_bytes
                ),
            }
            .into()),
            f => Err(ProtocolError::Unexpected {
                kind: f.kind(),
                state: "awaiting-postcopy-resume",
            }
            .into()),
        };
        self.push_seq = 1;
        owed
    }

    fn handles(&self) -> Result<Arc<[ShutdownHandle]>, MigrationError> {
        crate::postcopy::link_handles([&self.requests, &self.replies, &self.push])
    }
}

/// Dials post-copy's link to `to` (each connection made `within` that long): attempt
/// `attempt` of migration `session`, whose page streams are `streams`. The push is paced by `limit`; the asks and answers are not (the
/// answers are what the guest waits for).
pub(super) fn dial(
    opts: &MigrateOptions,
    to: &str,
    (streams, session, attempt): (u16, u64, u32),
    limit: &Option<Arc<RateLimit>>,
    within: std::time::Duration,
) -> Result<Link, MigrationError> {
    let mut conns = Vec::with_capacity(3);
    for k in 0..protocol::LINK_CONNS {
        let index = protocol::link_index(streams, attempt, k).ok_or_else(|| {
            MigrationError::Postcopy(format!("no index left for link attempt {attempt}"))
        })?;
        let pace = (k == 2).then(|| limit.clone()).flatten();
        conns.push(super::dial_data(
            opts,
            (None, to),
            (index, session),
            pace,
            within,
        )?);
    }
    let conns: [Connection; 3] = conns
        .try_into()
        .map_err(|_| MigrationError::Postcopy("a link of three connections".into()))?;
    crate::postcopy::expedite(&conns[1], "answers");
    Ok(Link::of(conns))
}

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
    link: Arc<[ShutdownHandle]>,
    stopped: Arc<AtomicBool>,
    pub fault: Arc<LatestFault>,
}

impl Demand {
    /// Answers asks for pages of `ram` (paused, so it holds what the destination lacks) that
    /// come on `link`'s requests, on its replies; marks what it sends as sent in `unsent`.
    /// Returns the push connection, which the session keeps. When the asks or answers fail,
    /// the whole link is closed, so the push fails too and the link is made again.
    pub fn start(
        ram: Arc<GuestRam>,
        unsent: Arc<PageBits>,
        link: Link,
    ) -> Result<(Self, Connection, u32), MigrationError> {
        let handles = link.handles()?;
        let Link {
            mut requests,
            mut replies,
            push,
            push_seq,
        } = link;
        // The guest may touch nothing for a long while: no deadline on the asks.
        requests
            .set_read_timeout(None)
            .map_err(MigrationError::socket("setting the read timeout"))?;
        let fault = Arc::new(LatestFault::default());
        let stopped = Arc::new(AtomicBool::new(false));
        let (f, h, st) = (fault.clone(), handles.clone(), stopped.clone());
        let thread = std::thread::Builder::new()
            .name("livemig-demand".into())
            .spawn(move || {
                let r = serve(&ram, &unsent, &f, &mut requests, &mut replies);
                if !st.load(Ordering::SeqCst) {
                    h.iter().for_each(ShutdownHandle::shutdown);
                }
                r
            })
            .map_err(|source| MigrationError::Thread {
                what: "post-copy demand",
                source,
            })?;
        let demand = Demand {
            thread: Some(thread),
            link: handles,
            stopped,
            fault,
        };
        Ok((demand, push, push_seq))
    }

    /// Stops answering (the destination holds every page, or the link failed); returns the
    /// pages it sent (with data, zero).
    pub fn stop(mut self) -> Result<(u64, u64), MigrationError> {
        self.stopped.store(true, Ordering::SeqCst);
        // The asks and answers; the push stays for the guest's verdict.
        self.link[..2].iter().for_each(ShutdownHandle::shutdown);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(MigrationError::StreamFailed),
            None => Ok((0, 0)),
        }
    }
}

impl Drop for Demand {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.link[..2].iter().for_each(ShutdownHandle::shutdown);
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

    /// Drops the batch being built (its link failed; the destination says what it lacks).
    pub fn discard(&mut self) {
        self.batch.clear();
        self.data.clear();
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
