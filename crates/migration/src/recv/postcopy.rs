//! Post-copy on the destination: the pages the source still owes are made missing (holes in
//! the memfd) and every view of guest RAM is registered with userfaultfd before the VM loads
//! its state, so whatever touches one of them (a vCPU through KVM, a device, the state's own
//! loading) waits while a fault thread asks the source for it. Owed pages arrive by demand on
//! a connection of their own and by the source's push on the control connection; each is
//! placed with UFFDIO_COPY, which never overwrites a page already there (a stale pushed copy
//! must not undo what the guest wrote since). Pages the source never had are zero-filled here
//! without asking.
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ram::{GuestRam, HostRegion, PAGE_SIZE};
use transport::{Connection, ShutdownHandle};
use userfaultfd::{Event, EventBuffer, Uffd, UffdBuilder};

use crate::postcopy::PageBits;
use crate::protocol::{
    BatchHead, Frame, FrameReader, FrameWriter, Kind, Owed, PostcopyStats, ProtocolError,
    MAX_REQUEST_PAGES,
};
use crate::MigrationError;

/// How often the fault thread looks up from the fault queue (to stop, or to flush asks).
const FAULT_POLL_MS: i32 = 20;

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
    /// The first failure of a helper thread.
    failed: Mutex<Option<String>>,
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
    conns: Vec<ShutdownHandle>,
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
    /// the threads that fetch pages from the source: `requests` carries asks to it, `replies` its pages.
    pub fn start(
        ram: &GuestRam,
        owed: &Owed,
        requests: Connection,
        replies: Connection,
    ) -> Result<Self, MigrationError> {
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
        });
        let conns = vec![
            requests
                .shutdown_handle()
                .map_err(MigrationError::socket("cloning the request connection"))?,
            replies
                .shutdown_handle()
                .map_err(MigrationError::socket("cloning the reply connection"))?,
        ];
        let mut pc = Postcopy {
            shared,
            threads: Vec::new(),
            conns,
            resumed: None,
            complete_ms: None,
            owed_at_start: owed.pages,
            writes: None,
            guest_pages_written: None,
            guest_writes_per_s: None,
        };
        pc.spawn("livemig-faults", move |s| fault_loop(&s, requests))?;
        pc.spawn("livemig-replies", move |s| reply_loop(&s, replies))?;
        Ok(pc)
    }

    fn spawn(
        &mut self,
        name: &str,
        f: impl FnOnce(Arc<Shared>) -> Result<(), MigrationError> + Send + 'static,
    ) -> Result<(), MigrationError> {
        let s = self.shared.clone();
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(e) = f(s.clone()) {
                    if !s.stop.load(Ordering::SeqCst) {
                        locks::lock(&s.failed).get_or_insert(e.to_string());
                    }
                }
            })
            .map_err(|source| MigrationError::Thread {
                what: "post-copy",
                source,
            })?;
        self.threads.push(t);
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
    pub fn place(&self, head: &BatchHead<'_>, data: &[u8]) -> Result<(), MigrationError> {
        self.check()?;
        let n = place_batch(&self.shared, head, data)?;
        self.shared.pushed.fetch_add(n, Ordering::Relaxed);
        if self.shared.owed.count() == 0 {
            self.note_complete();
        }
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

    /// Waits until every owed page is here (the source has said it sent them all), or fails
    /// once nothing arrived for `timeout`.
    pub fn wait_complete(&mut self, timeout: Duration) -> Result<(), MigrationError> {
        let mut last = (self.shared.owed.count(), Instant::now());
        while self.shared.owed.count() > 0 {
            self.check()?;
            let left = self.shared.owed.count();
            if left != last.0 {
                last = (left, Instant::now());
            } else if last.1.elapsed() > timeout {
                return Err(MigrationError::Postcopy(format!(
                    "{left} owed pages still missing {timeout:?} after the source's last"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.complete_ms = self.note_complete();
        // Its reports since the resume (its rate's samples restarted with the VM here).
        let since = self.resumed.map_or(Duration::from_secs(1), |t| t.elapsed());
        if let Some((probe, at)) = &self.writes {
            if let Some(w) = probe(since) {
                self.guest_pages_written = Some(w.pages.saturating_sub(*at));
                self.guest_writes_per_s = w.per_s;
            }
        }
        Ok(())
    }

    /// Every page is here: the registration ends and the threads stop. Returns what
    /// post-copy measured.
    pub fn finish(mut self) -> PostcopyStats {
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
        }
    }

    /// Pages owed at the switch.
    pub fn owed_pages(&self) -> u64 {
        self.owed_at_start
    }

    /// Ends the registration (which wakes any access still waiting: from here a missing page
    /// reads as zero) and stops the threads.
    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for r in self.shared.views.iter().flatten() {
            let _ = self
                .shared
                .uffd
                .unregister(r.host_addr as *mut _, r.range.len as usize);
        }
        self.conns.iter().for_each(ShutdownHandle::shutdown);
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
        for a in addrs {
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
fn fault_loop(s: &Shared, mut requests: Connection) -> Result<(), MigrationError> {
    let mut out = FrameWriter::new(&mut requests.writer);
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
                out.send_page_request(&ask)?;
                ask.clear();
            }
        }
        if !ask.is_empty() {
            out.send_page_request(&ask)?;
            out.flush()?;
            ask.clear();
        }
    }
    Ok(())
}

/// Places the source's answers to the asks.
fn reply_loop(s: &Shared, mut replies: Connection) -> Result<(), MigrationError> {
    let mut input = FrameReader::new(&mut replies.reader);
    while !s.stop.load(Ordering::SeqCst) {
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
            Err(ProtocolError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
