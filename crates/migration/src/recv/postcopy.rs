//! Post-copy on the destination: the pages the source still owes are made missing (holes in
//! the memfd) and every view of guest RAM is registered with userfaultfd before the VM loads
//! its state, so whatever touches one of them (a vCPU through KVM, a device, the state's own
//! loading) waits while a fault thread asks the source for it. Owed pages arrive by demand on
//! a connection of their own and by the source's push on another; each is placed with
//! UFFDIO_COPY, which never overwrites a page already there (a stale pushed copy must not
//! undo what the guest wrote since). Pages the source never had are zero-filled here without
//! asking.
//!
//! The three connections are post-copy's link ([`Link`]). When it fails, the vCPUs that fault
//! wait (the others run), and the source makes it again: the new link starts with the pages
//! still owed here, and every ask still waiting goes out again.
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ram::{GuestRam, HostRegion, PAGE_SIZE};
use transport::{Connection, ShutdownHandle};
use userfaultfd::{Event, EventBuffer, Uffd, UffdBuilder};

use super::state::PushState;
use super::Step;
use crate::postcopy::PageBits;
use crate::protocol::{
    BatchHead, Frame, FrameReader, FrameWriter, Kind, Owed, PostcopyStats, ProtocolError,
    VerifyOutcome, MAX_REQUEST_PAGES,
};
use crate::MigrationError;

/// How often the fault thread looks up from the fault queue (to stop, or to flush asks).
const FAULT_POLL_MS: i32 = 20;

/// How often the doorway looks up from its arrivals (to stop).
const DOORWAY_POLL: Duration = Duration::from_millis(20);

/// How often the link looks for the guest's verdict once every page is here.
const VERDICT_POLL: Duration = Duration::from_millis(50);

/// What the fault thread, the reply thread and the push share.
struct Shared {
    uffd: Uffd,
    /// Every view of guest RAM; pages are copied into the first and woken in the others.
    views: Vec<Vec<HostRegion>>,
    ram_bytes: u64,
    /// Owed pages not placed yet.
    owed: PageBits,
    /// Owed pages asked for.
    asked: PageBits,
    /// When each asked page's first fault was seen.
    waiting: Mutex<HashMap<u64, Instant>>,
    latencies_us: Mutex<Vec<u64>>,
    faults: AtomicU64,
    pushed: AtomicU64,
    stop: AtomicBool,
    /// The first failure of a helper thread that no new link mends.
    failed: Mutex<Option<String>>,
    /// Where asks go: the link's request connection, while it is up.
    asks: Mutex<Option<Asks>>,
    /// Why the link being served failed, once it has.
    link_lost: Mutex<Option<String>>,
    /// The link being served: its attempt and its connections.
    serving: Mutex<Option<(u32, Arc<[ShutdownHandle]>)>>,
}

/// Post-copy's link on this side: asks go out on `requests`, the source's answers come on
/// `replies`, its push on `push` (which takes PostcopyDone back).
pub(super) struct Link {
    pub requests: Connection,
    pub replies: Connection,
    pub push: Connection,
    /// Which of the source's attempts it is (0: opened with the page streams).
    pub attempt: u32,
}

impl Link {
    /// The link's connections in the order of their indexes (asks, answers, push), with their
    /// deadlines: the answers may be quiet as long as the guest touches nothing missing.
    pub fn new(
        conns: [Connection; 3],
        attempt: u32,
        peer_timeout: Duration,
    ) -> Result<Self, MigrationError> {
        for c in &conns {
            c.set_peer_timeout(Some(peer_timeout))
                .map_err(MigrationError::socket("setting the peer timeout"))?;
        }
        let [requests, replies, push] = conns;
        crate::postcopy::expedite(&requests, "asks");
        replies
            .set_read_timeout(None)
            .map_err(MigrationError::socket("setting the read timeout"))?;
        Ok(Link {
            requests,
            replies,
            push,
            attempt,
        })
    }

    fn handles(&self) -> Result<Arc<[ShutdownHandle]>, MigrationError> {
        crate::postcopy::link_handles([&self.requests, &self.replies, &self.push])
    }
}

/// Where the links the source makes again come in.
pub(super) struct Doorway {
    shared: Arc<Shared>,
    streams: u16,
    peer_timeout: Duration,
}

impl Doorway {
    /// Takes connections from `arrivals` until `stop` (any order, any attempt) and gathers
    /// each attempt's three. Each whole link newer than the last goes out on `out`; the link
    /// being served, if older, is closed then: its source has given it up, whatever this
    /// side's own deadline still says.
    pub fn run(
        self,
        arrivals: &Receiver<(u16, Connection)>,
        out: &Sender<Link>,
        stop: &AtomicBool,
    ) {
        let mut newest = 0;
        let mut parts: HashMap<u32, [Option<Connection>; 3]> = HashMap::new();
        while !stop.load(Ordering::SeqCst) {
            let Ok((index, conn)) = arrivals.recv_timeout(DOORWAY_POLL) else {
                continue;
            };
            let Some((attempt, k)) = crate::protocol::link_slot(self.streams, index)
                .filter(|(a, _)| *a > newest && (parts.len() < 8 || parts.contains_key(a)))
            else {
                tracing::warn!(
                    "refused connection {index} from {}: not of a new link",
                    conn.peer
                );
                continue;
            };
            let p = parts.entry(attempt).or_default();
            p[usize::from(k)] = Some(conn);
            if !p.iter().all(Option::is_some) {
                continue;
            }
            let Some([Some(a), Some(b), Some(c)]) = parts.remove(&attempt) else {
                continue;
            };
            newest = attempt;
            parts.retain(|a, _| *a > attempt);
            let link = match Link::new([a, b, c], attempt, self.peer_timeout) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("refused link attempt {attempt}: {e}");
                    continue;
                }
            };
            if let Some((serving, handles)) = locks::lock(&self.shared.serving).as_ref() {
                if *serving < attempt {
                    let gone = ProtocolError::Io(std::io::Error::other(format!(
                        "the source made the link again (attempt {attempt})"
                    )));
                    self.shared.lose_link(&gone.into(), handles);
                }
            }
            if out.send(link).is_err() {
                return;
            }
        }
    }
}

/// The request connection and its frames' count, and the link it belongs to.
struct Asks {
    conn: Connection,
    seq: u32,
    link: Arc<[ShutdownHandle]>,
}

impl Asks {
    fn send(&mut self, pages: &[u64]) -> Result<(), ProtocolError> {
        let mut out = FrameWriter::with_seq(&mut self.conn.writer, self.seq);
        let sent = out.send_page_request(pages).and_then(|()| out.flush());
        self.seq = out.seq();
        sent
    }
}

/// How serving one link ended.
pub(super) enum Served {
    /// Every owed page is here, and the source was told so and given the guest's verdict.
    Done,
    /// The link failed (why); the source may make it again.
    Lost(String),
}

/// Makes the pages `owed` names missing here (holes in the memfd), so that touching one
/// faults once the RAM is registered.
pub(super) fn drop_owed(ram: &GuestRam, owed: &Owed) -> Result<(), MigrationError> {
    let t = Instant::now();
    let mut runs = 0;
    for (start, end) in owed.runs() {
        ram.zero_range(start, end - start)?;
        runs += 1;
    }
    tracing::debug!(
        runs,
        pages = owed.pages,
        last = owed.last,
        ms = t.elapsed().as_millis(),
        "post-copy: owed pages dropped"
    );
    Ok(())
}

/// Why this host cannot take a VM by post-copy, if it cannot: it needs a userfaultfd that
/// catches the kernel's faults too (KVM's), which takes root (CAP_SYS_PTRACE) or access to
/// /dev/userfaultfd.
pub(super) fn unavailable() -> Option<String> {
    uffd().err().map(|e| e.to_string())
}

fn uffd() -> Result<Uffd, MigrationError> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        // KVM's accesses to guest RAM fault in the kernel.
        .user_mode_only(false)
        .create()
        .map_err(|e| failed("creating a userfaultfd for kernel faults", e))
}

/// Post-copy running here: the registration, the fault and reply threads.
pub(super) struct Postcopy {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Links served so far: each after the first starts with PostcopyResume.
    links: u32,
    /// What post-copy measured, once every page is here.
    done: Option<PostcopyStats>,
    resumed: Option<Instant>,
    complete_ms: Option<u64>,
    owed_at_start: u64,
    /// The guest's own write count, and what it said at the resume.
    writes: Option<(migratable::WritesProbe, u64)>,
    guest_pages_written: Option<u64>,
    guest_writes_per_s: Option<f64>,
}

impl Postcopy {
    /// Registers every view of `ram` (whose owed pages [`drop_owed`] made missing) and starts
    /// the thread that reads faults; [`Self::serve`] gives it a link to ask over.
    pub fn start(ram: &GuestRam, owed: &Owed) -> Result<Self, MigrationError> {
        let uffd = uffd()?;
        let views = ram.views()?;
        for r in views.iter().flatten() {
            uffd.register(r.host_addr as *mut _, r.range.len as usize)
                .map_err(|e| failed("registering guest RAM with userfaultfd", e))?;
        }
        let shared = Arc::new(Shared {
            uffd,
            views,
            ram_bytes: ram.size(),
            owed: PageBits::from_owed(owed),
            asked: PageBits::new(owed.ram_bytes),
            waiting: Mutex::new(HashMap::new()),
            latencies_us: Mutex::new(Vec::new()),
            faults: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            failed: Mutex::new(None),
            asks: Mutex::new(None),
            link_lost: Mutex::new(None),
            serving: Mutex::new(None),
        });
        let mut pc = Postcopy {
            shared,
            threads: Vec::new(),
            links: 0,
            done: None,
            resumed: None,
            complete_ms: None,
            owed_at_start: owed.pages,
            writes: None,
            guest_pages_written: None,
            guest_writes_per_s: None,
        };
        let s = pc.shared.clone();
        let faults = std::thread::Builder::new()
            .name("livemig-faults".into())
            .spawn(move || {
                if let Err(e) = fault_loop(&s) {
                    s.fail(&e);
                }
            })
            .map_err(|source| MigrationError::Thread {
                what: "post-copy faults",
                source,
            })?;
        pc.threads.push(faults);
        Ok(pc)
    }

    /// Serves one link until every owed page is here (then says PostcopyDone on it) or the
    /// link fails. A link after the first starts by naming the pages still owed, and the asks
    /// still waiting go out on it again. Once post-copy is complete, a new link (the source
    /// missed PostcopyDone) is told nothing is owed and gets PostcopyDone again.
    pub fn serve(
        &mut self,
        link: Link,
        timeout: Duration,
        verdict: &Mutex<Option<VerifyOutcome>>,
    ) -> Result<Served, MigrationError> {
        let handles = link.handles()?;
        *locks::lock(&self.shared.link_lost) = None;
        *locks::lock(&self.shared.serving) = Some((link.attempt, handles.clone()));
        let Link {
            requests,
            replies,
            mut push,
            ..
        } = link;
        let retired = Arc::new(AtomicBool::new(false));
        let (s, r) = (self.shared.clone(), retired.clone());
        let link_of_replies = handles.clone();
        let replier = std::thread::Builder::new()
            .name("livemig-replies".into())
            .spawn(move || {
                if let Err(e) = reply_loop(&s, replies) {
                    if !r.load(Ordering::SeqCst) {
                        s.lose_link(&e, &link_of_replies);
                    }
                }
            })
            .map_err(|source| MigrationError::Thread {
                what: "post-copy replies",
                source,
            })?;
        let served = self.serve_push(
            (&mut push, requests),
            (&handles, &retired),
            timeout,
            verdict,
        );
        retired.store(true, Ordering::SeqCst);
        locks::lock(&self.shared.serving).take();
        handles.iter().for_each(ShutdownHandle::shutdown);
        let _ = replier.join();
        locks::lock(&self.shared.asks).take();
        match served {
            Ok(()) => Ok(Served::Done),
            Err(e) if e.is_link_failure() => {
                let why = locks::lock(&self.shared.link_lost).take();
                self.check()?;
                Ok(Served::Lost(why.unwrap_or_else(|| e.to_string())))
            }
            Err(e) => Err(e),
        }
    }

    /// The push connection's part of [`Self::serve`]: the resume, the asks handed over, the
    /// push placed until its end, PostcopyDone once every owed page is here; then the guest's
    /// verdict, once it is in, and the source's close.
    fn serve_push(
        &mut self,
        (push, requests): (&mut Connection, Connection),
        (link, retired): (&Arc<[ShutdownHandle]>, &AtomicBool),
        timeout: Duration,
        verdict: &Mutex<Option<VerifyOutcome>>,
    ) -> Result<(), MigrationError> {
        let mut out = FrameWriter::new(&mut push.writer);
        if self.links > 0 {
            out.send_resume(&self.shared.owed.to_owed())?;
            out.flush()?;
        }
        self.links += 1;
        self.shared.hand_asks(Asks {
            conn: requests,
            seq: 0,
            link: link.clone(),
        })?;
        let mut input = FrameReader::new(&mut push.reader);
        let mut state = PushState::Pushing;
        while state == PushState::Pushing {
            let (next, step) = state.next(input.next_frame()?)?;
            state = next;
            if let Step::Pages { head, data } = step {
                self.place(&head, data)?;
            }
        }
        if self.done.is_none() {
            self.wait_complete(timeout)?;
            self.done = Some(self.complete());
        }
        let stats = self.done.clone().unwrap_or_default();
        // The source closes the asks and answers once it has this.
        retired.store(true, Ordering::SeqCst);
        out.send_postcopy_done(&stats)?;
        out.flush()?;
        // Quiet from here until the verdict: the link's failure shows as its close.
        link[2]
            .set_read_timeout(Some(VERDICT_POLL))
            .map_err(MigrationError::socket("setting the read timeout"))?;
        let outcome = loop {
            if let Some(v) = locks::lock(verdict).clone() {
                break v;
            }
            match input.next_frame() {
                Err(ProtocolError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Ok(f) => {
                    return Err(ProtocolError::Unexpected {
                        kind: f.kind(),
                        state: "postcopy-done",
                    }
                    .into())
                }
                Err(e) => return Err(e.into()),
            }
        };
        out.send_verified(&outcome)?;
        out.flush()?;
        link[2]
            .set_read_timeout(Some(timeout))
            .map_err(MigrationError::socket("setting the read timeout"))?;
        // The source closes the link once it has the verdict.
        let _ = input.next_frame();
        Ok(())
    }

    /// The VM runs from now; `writes` reads its guest's own write count, if it keeps one.
    pub fn resumed(&mut self, writes: Option<migratable::WritesProbe>) {
        self.resumed = Some(Instant::now());
        self.writes = writes.and_then(|p| {
            let at = p(Duration::from_secs(1))?.pages;
            Some((p, at))
        });
    }

    /// Places a pushed batch.
    fn place(&self, head: &BatchHead<'_>, data: &[u8]) -> Result<(), MigrationError> {
        self.check()?;
        let n = place_batch(&self.shared, head, data)?;
        self.shared.pushed.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn note_complete(&self) -> Option<u64> {
        self.resumed.map(|t| t.elapsed().as_millis() as u64)
    }

    /// The first failure of the fault or reply thread.
    fn check(&self) -> Result<(), MigrationError> {
        match locks::lock(&self.shared.failed).clone() {
            Some(why) => Err(MigrationError::Postcopy(why)),
            None => Ok(()),
        }
    }

    /// Waits until every owed page is here (the source has said it sent them all); fails as
    /// the link does, or once nothing arrived for `timeout`.
    fn wait_complete(&mut self, timeout: Duration) -> Result<(), MigrationError> {
        let mut last = (self.shared.owed.count(), Instant::now());
        while self.shared.owed.count() > 0 {
            self.check()?;
            if let Some(why) = locks::lock(&self.shared.link_lost).clone() {
                return Err(ProtocolError::Io(std::io::Error::other(why)).into());
            }
            let left = self.shared.owed.count();
            if left != last.0 {
                last = (left, Instant::now());
            } else if last.1.elapsed() > timeout {
                return Err(MigrationError::TimedOut {
                    secs: timeout.as_secs_f64(),
                    waiting_for: format!("{left} owed pages the source says it sent"),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Every page is here: the registration ends, the fault thread stops, and what post-copy
    /// measured is taken.
    fn complete(&mut self) -> PostcopyStats {
        self.complete_ms = self.note_complete();
        // Its reports since the resume (its rate's samples restarted with the VM here).
        let since = self.resumed.map_or(Duration::from_secs(1), |t| t.elapsed());
        if let Some((probe, at)) = &self.writes {
            if let Some(w) = probe(since) {
                self.guest_pages_written = Some(w.pages.saturating_sub(*at));
                self.guest_writes_per_s = w.per_s;
            }
        }
        self.stop();
        let s = &self.shared;
        let mut lat = std::mem::take(&mut *locks::lock(&s.latencies_us));
        lat.sort_unstable();
        // The smallest latency at or above `p` percent of them.
        let pct = |p: usize| {
            lat.get((lat.len() * p).div_ceil(100).saturating_sub(1))
                .copied()
                .unwrap_or(0)
        };
        PostcopyStats {
            faults: s.faults.load(Ordering::Relaxed),
            fault_p50_us: pct(50),
            fault_p99_us: pct(99),
            fault_max_us: lat.last().copied().unwrap_or(0),
            pages_demanded: s.asked.count(),
            pages_pushed: s.pushed.load(Ordering::Relaxed),
            complete_ms: self.complete_ms.unwrap_or(0),
            guest_pages_written: self.guest_pages_written,
            guest_writes_per_s: self.guest_writes_per_s,
            recoveries: self.links.saturating_sub(1),
        }
    }

    /// Where the links the source makes again come in, for a migration with `streams` page
    /// streams.
    pub fn doorway(&self, streams: u16, peer_timeout: Duration) -> Doorway {
        Doorway {
            shared: self.shared.clone(),
            streams,
            peer_timeout,
        }
    }

    /// What post-copy measured, once complete.
    pub fn stats(&self) -> Option<&PostcopyStats> {
        self.done.as_ref()
    }

    /// Pages owed at the switch.
    pub fn owed_pages(&self) -> u64 {
        self.owed_at_start
    }

    /// Ends the registration (which wakes any access still waiting: from here a missing page
    /// reads as zero) and stops the fault thread.
    fn stop(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        let views = || self.shared.views.iter().flatten();
        for r in views() {
            if let Err(e) = self
                .shared
                .uffd
                .unregister(r.host_addr as *mut _, r.range.len as usize)
            {
                tracing::warn!("post-copy: unregistering guest RAM: {e}");
            }
        }
        // The unregistration wakes the faults queued when it starts, but a fault taken under
        // the VMA's own lock can queue after that wake-up and before the range stops being
        // registered; nothing would wake it then.
        for r in views() {
            let _ = self
                .shared
                .uffd
                .wake(r.host_addr as *mut _, r.range.len as usize);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Postcopy {
    /// A failed post-copy must not leave the VM's threads waiting for pages forever.
    fn drop(&mut self) {
        self.stop();
    }
}

fn failed(what: &'static str, e: userfaultfd::Error) -> MigrationError {
    MigrationError::Postcopy(format!("{what}: {e}"))
}

impl Shared {
    /// A failure no new link mends.
    fn fail(&self, e: &MigrationError) {
        if !self.stop.load(Ordering::SeqCst) {
            locks::lock(&self.failed).get_or_insert(e.to_string());
        }
    }

    /// A connection of the link failed: every one of them is closed, so whatever waits on
    /// one fails and the link is made again; a failure that is not the link's is kept.
    fn lose_link(&self, e: &MigrationError, link: &[ShutdownHandle]) {
        if !e.is_link_failure() {
            self.fail(e);
        }
        locks::lock(&self.link_lost).get_or_insert(e.to_string());
        link.iter().for_each(ShutdownHandle::shutdown);
    }

    /// Asks the source for `pages` while the link is up; otherwise they wait in `waiting`
    /// for the next link.
    fn ask(&self, pages: &[u64]) {
        let mut asks = locks::lock(&self.asks);
        if let Some(a) = asks.as_mut() {
            if let Err(e) = a.send(pages) {
                let link = a.link.clone();
                *asks = None;
                self.lose_link(&e.into(), &link);
            }
        }
    }

    /// Asks go over a new link from now, starting with every page a fault still waits for.
    fn hand_asks(&self, mut a: Asks) -> Result<(), MigrationError> {
        let mut asks = locks::lock(&self.asks);
        let waiting: Vec<u64> = locks::lock(&self.waiting)
            .keys()
            .copied()
            .filter(|off| self.owed.test(*off))
            .collect();
        for pages in waiting.chunks(MAX_REQUEST_PAGES) {
            a.send(pages)?;
        }
        *asks = Some(a);
        Ok(())
    }

    /// The memfd offset of host address `addr` in any view, and the view's address of it.
    fn offset_of(&self, addr: u64) -> Option<u64> {
        self.views.iter().flatten().find_map(|r| {
            (addr >= r.host_addr && addr < r.host_addr + r.range.len)
                .then(|| r.range.file_offset + (addr - r.host_addr))
        })
    }

    /// Host addresses of memfd offset `off` in each view.
    fn addrs(&self, off: u64) -> impl Iterator<Item = u64> + '_ {
        self.views.iter().filter_map(move |v| {
            v.iter().find_map(|r| {
                (off >= r.range.file_offset && off < r.range.file_offset + r.range.len)
                    .then(|| r.host_addr + (off - r.range.file_offset))
            })
        })
    }

    /// Puts a page's content (None: zeros) at memfd offset `off` unless a page is there
    /// already, and wakes whatever waits for it in every view. Returns whether this placed it.
    fn fill(&self, off: u64, data: Option<&[u8]>) -> Result<bool, MigrationError> {
        let mut addrs = self.addrs(off);
        let Some(first) = addrs.next() else {
            return Err(MigrationError::Postcopy(format!(
                "page {off:#x} is outside guest RAM"
            )));
        };
        let len = PAGE_SIZE as usize;
        let r = match data {
            // SAFETY: `first` is a page of a mapping registered with this userfaultfd, and the
            // kernel copies `len` bytes from `d`, a page of ours, into it; it refuses (EEXIST)
            // rather than overwrite a page already there.
            Some(d) => unsafe {
                self.uffd
                    .copy(d.as_ptr().cast(), first as *mut _, len, true)
            },
            // SAFETY: as above, with zeros and no source buffer.
            None => unsafe { self.uffd.zeropage(first as *mut _, len, true) },
        };
        let placed = match r {
            Ok(_) => true,
            Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e))
                if e as i32 == libc::EEXIST =>
            {
                false
            }
            Err(e) => return Err(failed("placing a page", e)),
        };
        // A refused copy wakes no one, so the first view is woken too.
        for a in std::iter::once(first).filter(|_| !placed).chain(addrs) {
            let _ = self.uffd.wake(a as *mut _, len);
        }
        Ok(placed)
    }

    /// An owed page's content arrived: placed, and no longer owed.
    fn arrived(&self, off: u64, data: Option<&[u8]>) -> Result<bool, MigrationError> {
        if !self.owed.test(off) {
            return Ok(false);
        }
        self.fill(off, data)?;
        // Cleared after the copy: a fault that finds the page not owed may zero-fill, which
        // the copy has made a no-op.
        let won = self.owed.take(off);
        if won {
            if let Some(t) = locks::lock(&self.waiting).remove(&off) {
                locks::lock(&self.latencies_us).push(t.elapsed().as_micros() as u64);
            }
        }
        Ok(won)
    }
}

/// Places a batch of owed pages; returns how many it placed.
fn place_batch(s: &Shared, head: &BatchHead<'_>, data: &[u8]) -> Result<u64, MigrationError> {
    head.validate(data.len(), s.ram_bytes, Kind::PostcopyPages)?;
    let mut rest = data;
    let mut placed = 0;
    for e in head.entries() {
        let page = if e.is_zero() {
            None
        } else {
            let (p, tail) = rest.split_at(PAGE_SIZE as usize);
            rest = tail;
            Some(p)
        };
        placed += u64::from(s.arrived(e.offset(), page)?);
    }
    Ok(placed)
}

/// Reads faults; asks the source for owed pages (each once) and zero-fills the others.
fn fault_loop(s: &Shared) -> Result<(), MigrationError> {
    let mut buf = EventBuffer::new(64);
    let mut ask = Vec::with_capacity(MAX_REQUEST_PAGES);
    while !s.stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: s.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd of ours, for the call's duration.
        let n = unsafe { libc::poll(&mut pfd, 1, FAULT_POLL_MS) };
        if n <= 0 {
            continue;
        }
        let events = s
            .uffd
            .read_events(&mut buf)
            .map_err(|e| failed("reading faults", e))?;
        for ev in events {
            let Event::Pagefault { addr, .. } = ev.map_err(|e| failed("reading a fault", e))?
            else {
                continue;
            };
            let Some(off) = s.offset_of(addr as u64) else {
                continue;
            };
            let off = off & !(PAGE_SIZE - 1);
            if s.owed.test(off) {
                if s.asked.put(off) {
                    s.faults.fetch_add(1, Ordering::Relaxed);
                    locks::lock(&s.waiting).insert(off, Instant::now());
                    ask.push(off);
                }
            } else {
                // Never on the source, or placed since the fault: zeros, or a no-op.
                s.fill(off, None)?;
            }
            if ask.len() == MAX_REQUEST_PAGES {
                s.ask(&ask);
                ask.clear();
            }
        }
        if !ask.is_empty() {
            s.ask(&ask);
            ask.clear();
        }
    }
    Ok(())
}

/// Places the source's answers to the asks, until the link ends.
fn reply_loop(s: &Shared, mut replies: Connection) -> Result<(), MigrationError> {
    let mut input = FrameReader::new(&mut replies.reader);
    loop {
        match input.next_frame() {
            Ok(Frame::PostcopyPages { head, data }) => {
                place_batch(s, &head, data)?;
            }
            Ok(f) => {
                return Err(ProtocolError::Unexpected {
                    kind: f.kind(),
                    state: "postcopy-replies",
                }
                .into())
            }
            Err(e) => return Err(e.into()),
        }
    }
}
