//! The destination side: the state machines of [`state`] driven over the control connection
//! and the page streams; pages are placed at their final address and the VM resumes only once
//! it holds everything.
mod cache;
pub mod gate;
pub mod incoming;
mod populate;
pub mod state;
mod streams;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use transport::{Connection, ShutdownHandle};
use vmm::memory::{GuestRam, PAGE_SIZE};
use vmm::{Console, PreparedVm, Vm, VmState};

use crate::codec;
use crate::policy::{self, Landing};
use crate::protocol::{
    self, BatchHead, CompressedBatch, DirectRead, Entry, FrameReader, FrameWriter, Kind, Prepare,
    ProtocolError, RefTo, Transport, VerifyOutcome,
};
use crate::{thread_cpu_seconds, MigrationError};
pub use incoming::{Incoming, Pending};
pub use state::{ReceiveMigrationState, Step, StreamState};
use streams::RoundBarrier;

/// Largest VM we agree to build for a peer.
pub const MAX_MEMORY: u64 = 1 << 40;

/// Milestones of an incoming migration, for whoever watches it (a host agent). `Confirming`
/// is told before the Confirm goes out, `Running` before the vCPUs start: a receiver that is
/// gone without having recorded `Running` never ran the VM, which is what lets a source whose
/// switchover's outcome is unknown resume safely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiveEvent {
    Receiving { session: u64, name: Option<String> },
    Confirming,
    Running,
}

/// A watcher of [`ReceiveEvent`]s.
#[derive(Clone)]
pub struct Events(pub Arc<dyn Fn(&ReceiveEvent) + Send + Sync>);

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events(..)")
    }
}

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub console: Console,
    /// The deadline on progress: a source silent for this long on any stream is taken for
    /// dead and the migration fails.
    pub peer_timeout: Duration,
    /// How long the guest gets to verify its memory after resume.
    pub verify_timeout: Duration,
    /// How long a new connection has to finish TLS and say what it is.
    pub handshake_timeout: Duration,
    /// How long a migration has, after its Config, to connect the page streams it announced.
    pub stream_accept_timeout: Duration,
    /// Connections the listener holds at once, before and after they authenticate.
    pub limits: gate::Limits,
    /// Take only the migration with this session (a host agent's receiver for one VM).
    pub expect_session: Option<u64>,
    /// Give up if no migration has started within this (none: wait forever).
    pub accept_within: Option<Duration>,
    pub events: Option<Events>,
    /// This host's page cache for a drain: its id, and where this process opens it. Used
    /// when a migration's Config names that id.
    pub host_cache: Option<(u64, std::path::PathBuf)>,
}

/// Where pages land: guest RAM, and the host's page cache when the migration uses one.
#[derive(Clone, Copy)]
pub(crate) struct Dest<'a> {
    pub ram: &'a GuestRam,
    pub cache: Option<&'a cache::CacheSession>,
}

impl<'a> Dest<'a> {
    #[cfg(test)]
    pub fn ram(ram: &'a GuestRam) -> Self {
        Dest { ram, cache: None }
    }

    /// A round ended: the copy is over.
    fn round_end(&self) {
        if let Some(c) = self.cache {
            c.copy_done();
        }
    }
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            console: Console::Discard,
            peer_timeout: crate::send::DEFAULT_PEER_TIMEOUT,
            verify_timeout: Duration::from_secs(60),
            handshake_timeout: crate::send::DEFAULT_PEER_TIMEOUT,
            stream_accept_timeout: crate::send::DEFAULT_PEER_TIMEOUT,
            limits: gate::Limits::default(),
            expect_session: None,
            accept_within: None,
            events: None,
            host_cache: None,
        }
    }
}

/// What the destination saw.
#[derive(Clone, Debug, Default)]
pub struct ReceiveStats {
    pub pages: u64,
    pub zero_pages: u64,
    /// Pages that came as deltas against the version held here.
    pub delta_pages: u64,
    /// Pages that came as references to pages placed here before.
    pub ref_pages: u64,
    /// Pages that came as references to this host's page cache.
    pub host_ref_pages: u64,
    /// Pages this migration added to the host's page cache.
    pub cached_pages: u64,
    pub rounds: u32,
    /// CPU seconds of the page stream threads.
    pub stream_cpu_seconds: f64,
    pub peer: Option<std::net::SocketAddr>,
}

impl ReceiveStats {
    fn add(&mut self, o: &ReceiveStats) {
        self.pages += o.pages;
        self.zero_pages += o.zero_pages;
        self.delta_pages += o.delta_pages;
        self.ref_pages += o.ref_pages;
        self.host_ref_pages += o.host_ref_pages;
        self.cached_pages += o.cached_pages;
        self.stream_cpu_seconds += o.stream_cpu_seconds;
    }
}

/// Whether this host takes a VM a source offers: its answer before anything is allocated.
pub type Admit<'a> = &'a dyn Fn(&Prepare) -> Result<(), String>;

/// This host's default answer: the VM fits in the memory free now.
pub fn admit_if_it_fits(p: &Prepare) -> Result<(), String> {
    vmm::host::can_hold(&p.vm, 0)
}

fn check_config(p: &Prepare) -> Result<(), ProtocolError> {
    let c = &p.vm;
    let bad = |why: String| ProtocolError::Malformed {
        kind: Kind::Config,
        why,
    };
    if c.memory == 0 || c.memory > MAX_MEMORY || c.vcpus == 0 || c.vcpus > vmm::vm::MAX_VCPUS {
        return Err(bad(format!(
            "unreasonable VM: {} bytes, {} vCPUs",
            c.memory, c.vcpus
        )));
    }
    if p.streams > protocol::MAX_STREAMS {
        return Err(bad(format!(
            "{} page streams, the limit is {}",
            p.streams,
            protocol::MAX_STREAMS
        )));
    }
    Ok(())
}

/// The announced extents: at most [`protocol::MAX_EXTENTS`], ascending, disjoint, non-empty
/// and within guest RAM.
pub(crate) fn check_extents(extents: &[(u64, u64)], memory: u64) -> Result<(), String> {
    if extents.len() > protocol::MAX_EXTENTS {
        return Err(format!(
            "{} extents, the limit is {}",
            extents.len(),
            protocol::MAX_EXTENTS
        ));
    }
    let mut end = 0;
    for &(s, e) in extents {
        if s < end || s >= e || e > memory {
            return Err(format!(
                "extent [{s:#x}, {e:#x}) is empty, out of order or beyond guest RAM ({memory:#x})"
            ));
        }
        end = e;
    }
    Ok(())
}

/// Receives one VM on `listener` and returns it running. Connections that fail (garbage, no
/// certificate, a cut link, a VM that does not fit) are logged and the receiver goes on
/// waiting; a second migration while one is under way is turned away. A receiver for one
/// session (`expect_session`) ends once that session has started and failed.
pub fn receive(
    listener: transport::Listener,
    security: transport::Security,
    opts: ReceiveOptions,
) -> Result<(Vm, ReceiveStats), MigrationError> {
    let incoming = Incoming::new(listener, security, opts);
    let (tx, rx) = std::sync::mpsc::channel();
    let busy_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = busy_flag.clone();
    let inc = incoming.clone();
    let on_migration: incoming::OnMigration = Arc::new(move |p: Pending| {
        use std::sync::atomic::Ordering::SeqCst;
        if busy.swap(true, SeqCst) {
            return p.busy("this receiver is already taking a VM");
        }
        let peer = p.peer;
        match inc.receive(p, &admit_if_it_fits) {
            Ok(v) => {
                let _ = tx.send(Ok(v));
            }
            // A receiver for one session ends with it: its source retries under a new one.
            Err(e) if inc.claimed() => {
                let _ = tx.send(Err(e));
            }
            Err(e) => {
                tracing::warn!("incoming migration from {peer} failed: {e}; waiting for another");
                busy.store(false, SeqCst);
            }
        }
    });
    let server = incoming.clone();
    let accept = std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || server.serve(on_migration))
        .map_err(|source| MigrationError::Thread {
            what: "accept",
            source,
        })?;
    let received = wait_for_vm(&rx, &busy_flag, incoming.opts.accept_within);
    incoming.stop();
    let _ = accept.join();
    received
}

/// The received VM, or an error once `accept_within` passed with no migration under way.
fn wait_for_vm(
    rx: &std::sync::mpsc::Receiver<Result<(Vm, ReceiveStats), MigrationError>>,
    busy: &std::sync::atomic::AtomicBool,
    accept_within: Option<Duration>,
) -> Result<(Vm, ReceiveStats), MigrationError> {
    let t = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(v) => return v,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(MigrationError::StreamFailed)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let idle = !busy.load(std::sync::atomic::Ordering::SeqCst);
        if let Some(limit) = accept_within.filter(|l| idle && t.elapsed() > *l) {
            return Err(MigrationError::TimedOut {
                secs: limit.as_secs_f64(),
                waiting_for: "a migration to arrive".into(),
            });
        }
    }
}

impl Incoming {
    fn tell(&self, e: &ReceiveEvent) {
        if let Some(Events(f)) = &self.opts.events {
            f(e);
        }
    }

    /// Runs the migration behind a control connection into a new VM, if `admit` lets this host
    /// take it. Returns the VM running; on any error the source is told why, and nothing of the
    /// VM is left here.
    pub fn receive(
        &self,
        p: Pending,
        admit: Admit<'_>,
    ) -> Result<(Vm, ReceiveStats), MigrationError> {
        let (mut conn, hello, peer) = p.into_parts();
        let cpu0 = thread_cpu_seconds();
        let result = self.run(&mut conn, hello, admit, cpu0);
        if let Err(e) = &result {
            // Best effort: tell the source why, so it can say so too.
            if !matches!(e, MigrationError::Protocol(ProtocolError::PeerAborted(_))) {
                let _ = FrameWriter::new(&mut conn.writer).send_abort(&e.to_string());
            }
            conn.shutdown();
        }
        result.map(|(vm, mut st)| {
            st.peer = Some(peer);
            (vm, st)
        })
    }

    fn run(
        &self,
        conn: &mut Connection,
        hello: protocol::Hello,
        admit: Admit<'_>,
        cpu0: f64,
    ) -> Result<(Vm, ReceiveStats), MigrationError> {
        let opts = &self.opts;
        let control = conn
            .shutdown_handle()
            .map_err(MigrationError::socket("cloning the control socket"))?;
        // The Config within the deadline on progress: nobody holds the slot dribbling. Then
        // the page streams within theirs.
        let watchdog = incoming::Watchdog::arm(
            conn.shutdown_handle()
                .map_err(MigrationError::socket("cloning the control socket"))?,
            opts.peer_timeout,
        );
        conn.set_peer_timeout(Some(opts.peer_timeout))
            .map_err(MigrationError::socket("setting the peer timeout"))?;
        let split = conn.split();
        let mut input = FrameReader::new(split.reader);
        let mut out = FrameWriter::new(split.writer);

        // Prepare: refuse what this host cannot hold before anything is allocated, build the
        // VM, take the page streams it announces.
        let t_config = Instant::now();
        let taken = self.take_config(&mut input, admit);
        if watchdog.disarm() {
            return Err(MigrationError::TimedOut {
                secs: opts.peer_timeout.as_secs_f64(),
                waiting_for: "the source's Config".into(),
            });
        }
        let (state, prep) = taken?;
        let config_ms = t_config.elapsed().as_millis();
        let streams = self.collect_streams(&prep)?;
        for s in &streams {
            s.set_peer_timeout(Some(opts.peer_timeout))
                .map_err(MigrationError::socket("setting the peer timeout"))?;
        }
        let t_build = Instant::now();
        let prepared = PreparedVm::new(&prep.vm)?;
        tracing::debug!(
            config_ms,
            build_ms = t_build.elapsed().as_millis(),
            "prepare here: Config taken, VM built"
        );
        if !streams.is_empty() {
            // The control connection is quiet while the streams carry the rounds: keepalive
            // watches it, and a failing stream closes it.
            control
                .set_read_timeout(None)
                .map_err(MigrationError::socket("setting the read timeout"))?;
        }
        let cache = self.host_cache_for(&prep)?;
        if let Some(c) = &cache {
            out.send_cache_keys(&c.keys())?;
        }
        out.send(Kind::Ready, &[])?;
        out.flush()?;

        // Memory, until the paused source's state and Done.
        let dst = Dest {
            ram: prepared.ram(),
            cache: cache.as_ref(),
        };
        let (vm_state, mut stats) = receive_memory(
            &mut input,
            &mut out,
            state,
            dst,
            streams,
            hello.transport,
            &control,
        )?;
        let t_done = Instant::now();
        stats.cached_pages = cache.as_ref().map_or(0, |c| c.added());

        // Everything is here: load the state paused, confirm, then run.
        let mut vm = prepared.finish(&vm_state, &opts.console, true)?;
        let loaded_ms = t_done.elapsed().as_millis();
        self.tell(&ReceiveEvent::Confirming);
        out.send(Kind::Confirm, &[])?;
        out.flush()?;
        tracing::debug!(
            loaded_ms,
            confirmed_ms = t_done.elapsed().as_millis(),
            "switchover here: everything received, state loaded, confirmed"
        );
        self.tell(&ReceiveEvent::Running);
        vm.resume()?;
        let outcome = VerifyOutcome {
            cpu_seconds: thread_cpu_seconds() - cpu0 + stats.stream_cpu_seconds,
            ..verify(&vm, opts.verify_timeout)
        };
        out.send_verified(&outcome)?;
        out.flush()?;
        let _ = out.inner().flush();
        // Unmapping the cache tears down a page table entry per page it holds: not in the
        // downtime window.
        drop(cache);
        Ok((vm, stats))
    }
}

impl Incoming {
    /// The source's Config, checked and admitted by this host (nothing is allocated before).
    fn take_config<R: DirectRead>(
        &self,
        input: &mut FrameReader<R>,
        admit: Admit<'_>,
    ) -> Result<(ReceiveMigrationState, Prepare), MigrationError> {
        let (state, prep) = match ReceiveMigrationState::AwaitingConfig.next(input.next_frame()?)? {
            (s, Step::Prepare(p)) => (s, p),
            (s, _) => {
                return Err(ProtocolError::Unexpected {
                    kind: Kind::Config,
                    state: s.name(),
                }
                .into())
            }
        };
        check_config(&prep)?;
        if let Some(s) = self.opts.expect_session.filter(|s| *s != prep.session) {
            return Err(MigrationError::Refused(format!(
                "this receiver waits for migration {s:#x}, not {:#x}",
                prep.session
            )));
        }
        admit(&prep).map_err(MigrationError::Refused)?;
        if self.opts.expect_session.is_some() {
            self.claim();
        }
        self.tell(&ReceiveEvent::Receiving {
            session: prep.session,
            name: prep.name.clone(),
        });
        Ok((state, prep))
    }

    /// The host's page cache, when the Config names the one this receiver was given.
    fn host_cache_for(
        &self,
        prep: &Prepare,
    ) -> Result<Option<cache::CacheSession>, MigrationError> {
        match (&self.opts.host_cache, prep.host_cache) {
            (Some((id, path)), Some(asked)) if *id == asked => {
                Ok(Some(cache::CacheSession::open(path)?))
            }
            _ => Ok(None),
        }
    }
}

/// The memory phase: the control connection's state machine on this thread, one thread per
/// page stream; any failure closes every connection so no thread waits for a dead peer.
fn receive_memory<R: DirectRead, W: Write>(
    input: &mut FrameReader<R>,
    out: &mut FrameWriter<W>,
    state: ReceiveMigrationState,
    dst: Dest<'_>,
    streams: Vec<Connection>,
    transport: Transport,
    control: &ShutdownHandle,
) -> Result<(VmState, ReceiveStats), MigrationError> {
    let handles = streams
        .iter()
        .map(|c| c.shutdown_handle())
        .collect::<Result<Vec<_>, _>>()
        .map_err(MigrationError::socket("cloning a page stream's socket"))?;
    let barrier = RoundBarrier::new(streams.len());
    let count = streams.len();
    std::thread::scope(|sc| {
        let workers: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let barrier = &barrier;
                sc.spawn(move || {
                    let landing = policy::landing(i, count);
                    let r = streams::page_stream(i, c, dst, barrier, transport, landing);
                    if r.is_err() {
                        barrier.abort();
                        control.shutdown();
                    }
                    r
                })
            })
            .collect();
        let r = control_loop((input, out), state, dst, transport, &barrier);
        if r.is_err() {
            barrier.abort();
            handles.iter().for_each(ShutdownHandle::shutdown);
        }
        let mut stats = ReceiveStats::default();
        let mut first_err = None;
        for w in workers {
            match w.join() {
                Ok(Ok(s)) => stats.add(&s),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(MigrationError::StreamFailed);
                }
            }
        }
        // The stream that failed first says why better than the control connection it closed.
        let (vm_state, control_stats) = match (r, first_err) {
            (Ok(v), None) => v,
            (_, Some(e)) | (Err(e), None) => return Err(e),
        };
        stats.add(&control_stats);
        stats.rounds = control_stats.rounds;
        Ok((vm_state, stats))
    })
}

/// The control connection after Ready: the state machine until Complete.
/// Every round's end is answered with RoundDone once its pages are in place, here and on
/// every page stream.
fn control_loop<R: DirectRead, W: Write>(
    (input, out): (&mut FrameReader<R>, &mut FrameWriter<W>),
    mut state: ReceiveMigrationState,
    dst: Dest<'_>,
    transport: Transport,
    streams: &RoundBarrier,
) -> Result<(VmState, ReceiveStats), MigrationError> {
    let mut stats = ReceiveStats::default();
    let mut scratch = Vec::new();
    let mut rounds = 0;
    let mut populate = None;
    loop {
        let (next, step) = state.next(input.next_frame()?)?;
        state = next;
        if matches!(
            step,
            Step::Pages { .. } | Step::Compressed(_) | Step::Direct(_)
        ) {
            // With page streams, the control connection carries only the last (paused)
            // round, which must land after everything the streams brought.
            streams.wait_all_finished()?;
        }
        match step {
            Step::Extents(e) => {
                check_extents(&e, dst.ram.size()).map_err(|why| ProtocolError::Malformed {
                    kind: Kind::Extents,
                    why,
                })?;
                populate = populate::Populate::start(dst.ram, &e);
            }
            Step::Direct(entries) => {
                place_direct(input, &entries, dst.ram, Landing::Splice, &mut stats)?
            }
            Step::RoundEnd(r) => {
                dst.round_end();
                rounds += 1;
                streams.wait_rounds(rounds)?;
                out.send_round_done(r)?;
                out.flush()?;
            }
            step => place(step, dst, transport, &mut scratch, &mut stats)?,
        }
        if let ReceiveMigrationState::Complete { rounds, state } = state {
            if let Some(p) = populate {
                let mib = p.finish() >> 20;
                tracing::debug!("allocated {mib} MiB of guest RAM ahead of its pages");
            }
            stats.rounds = rounds;
            return Ok((*state, stats));
        }
    }
}

/// Carries out a step that needs no more of the stream: places a batch (decompressing it
/// first), or nothing.
fn place(
    step: Step<'_>,
    dst: Dest<'_>,
    transport: Transport,
    scratch: &mut Vec<u8>,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    match step {
        Step::Pages { head, data } => place_batch(dst, &head, data, Kind::Pages, stats),
        Step::Compressed(b) if transport == Transport::Compressed => {
            place_compressed(dst, &b, scratch, stats)
        }
        Step::Compressed(_) | Step::Direct(_) => Err(ProtocolError::Unexpected {
            kind: if matches!(step, Step::Direct(_)) {
                Kind::PagesDirect
            } else {
                Kind::PagesCompressed
            },
            state: "a transport that does not send it",
        }
        .into()),
        Step::Prepare(_) | Step::Extents(_) | Step::RoundEnd(_) | Step::Nothing => Ok(()),
    }
}

fn place_compressed(
    dst: Dest<'_>,
    b: &CompressedBatch<'_>,
    scratch: &mut Vec<u8>,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    codec::decompress(b.codec, b.data, b.raw_len, scratch).map_err(|e| {
        ProtocolError::Malformed {
            kind: Kind::PagesCompressed,
            why: e.to_string(),
        }
    })?;
    place_batch(dst, &b.head, scratch, Kind::PagesCompressed, stats)
}

/// Puts a PagesDirect frame's page data straight into guest RAM at its final place: spliced
/// into the memfd (from the socket a pipeful at a time, into the file a run at a time), or
/// one read into the mapping per run of consecutive data pages; zero pages as holes.
fn place_direct<R: DirectRead>(
    input: &mut FrameReader<R>,
    entries: &[Entry],
    ram: &GuestRam,
    landing: Landing,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    if let Some(e) = entries.iter().find(|e| e.offset() >= ram.size()) {
        return Err(ProtocolError::Malformed {
            kind: Kind::PagesDirect,
            why: format!("page offset {:#x} is beyond guest RAM", e.offset()),
        }
        .into());
    }
    let mut data = Vec::new();
    for (off, n, zero) in runs(entries.iter().map(|e| (e.offset(), e.is_zero()))) {
        let len = n as u64 * PAGE_SIZE;
        if zero {
            ram.zero_range(off, len)?;
            stats.zero_pages += n as u64;
        } else {
            data.push((off, len as usize));
        }
        stats.pages += n as u64;
    }
    land(input, ram, &data, landing)
}

/// The frame's page data from the stream into guest RAM, run after run: `len` bytes at memfd
/// offset `off` for each `(off, len)` of `runs`.
fn land<R: DirectRead>(
    input: &mut FrameReader<R>,
    ram: &GuestRam,
    runs: &[(u64, usize)],
    landing: Landing,
) -> Result<(), MigrationError> {
    match landing {
        // Memfd offsets: a run is contiguous in the file even where it crosses from low to
        // high RAM; in the mapping it is one slice per RAM range.
        Landing::Splice => input.read_direct(ram.backing_file(), runs)?,
        Landing::Mapped => {
            for &(off, len) in runs {
                for slice in ram.slices_at(off, len)? {
                    input.read_direct_mapped(&slice)?;
                }
            }
        }
    }
    Ok(())
}

/// Runs of consecutive pages of one kind: (first offset, pages, zero).
fn runs(pages: impl Iterator<Item = (u64, bool)>) -> Vec<(u64, usize, bool)> {
    let mut out: Vec<(u64, usize, bool)> = Vec::new();
    for (off, zero) in pages {
        match out.last_mut() {
            Some((start, n, z)) if *z == zero && *start + *n as u64 * PAGE_SIZE == off => *n += 1,
            _ => out.push((off, 1, zero)),
        }
    }
    out
}

/// Puts a batch's pages at their final place: runs of consecutive pages of one kind in one
/// call, data through the memfd (no pre-zeroing of fresh pages), zero pages as holes.
fn place_batch(
    dst: Dest<'_>,
    head: &BatchHead<'_>,
    data: &[u8],
    kind: Kind,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    if head.encoded() {
        return place_pages(dst, head, data, kind, stats);
    }
    let ram = dst.ram;
    head.validate(data.len(), ram.size(), kind)?;
    if let Some(c) = dst.cache {
        c.learn(data.chunks_exact(PAGE_SIZE as usize))?;
    }
    let mut at = 0;
    for (off, n, zero) in runs(head.entries().iter().map(|e| (e.offset(), e.is_zero()))) {
        let len = n as u64 * PAGE_SIZE;
        if zero {
            ram.zero_range(off, len)?;
            stats.zero_pages += n as u64;
        } else {
            // Consecutive data pages sit back to back in the batch's data: one write.
            let end = at + len as usize;
            ram.write_at(off, &data[at..end])?;
            at = end;
        }
        stats.pages += n as u64;
    }
    Ok(())
}

/// A batch with deltas or references, page by page. A delta applies only to the version of
/// the page it was computed against: the page here must hash to its base. A reference copies
/// a page placed here before, whose BLAKE3 hash must be the one it names. Otherwise the
/// migration is off: a source that lost track of what we hold, or one that lies, never gets
/// a page placed.
fn place_pages(
    dst: Dest<'_>,
    head: &BatchHead<'_>,
    data: &[u8],
    kind: Kind,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    let ram = dst.ram;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for p in head.pages(data, ram.size(), kind)? {
        match (p.data, p.base, p.from) {
            (None, _, _) => {
                ram.zero_range(p.offset, PAGE_SIZE)?;
                stats.zero_pages += 1;
            }
            (Some(hash), _, Some(RefTo::HostCache)) => {
                let hash: &[u8; 32] = hash
                    .try_into()
                    .map_err(|_| ProtocolError::HostRefMissing { offset: p.offset })?;
                let found = match dst.cache {
                    Some(c) => c.fetch(hash, &mut page)?,
                    None => false,
                };
                if !found {
                    return Err(ProtocolError::HostRefMissing { offset: p.offset }.into());
                }
                ram.write_at(p.offset, &page)?;
                stats.host_ref_pages += 1;
            }
            (Some(hash), _, Some(RefTo::Page(from))) => {
                ram.read_at(from, &mut page)?;
                if blake3::hash(&page).as_bytes()[..] != *hash {
                    return Err(ProtocolError::RefMismatch {
                        offset: p.offset,
                        from,
                    }
                    .into());
                }
                ram.write_at(p.offset, &page)?;
                stats.ref_pages += 1;
            }
            (Some(d), None, None) => {
                ram.write_at(p.offset, d)?;
                if let Some(c) = dst.cache {
                    c.learn(std::iter::once(d))?;
                }
            }
            (Some(d), Some(base), None) => {
                ram.read_at(p.offset, &mut page)?;
                let held = crate::delta::base_hash(&page);
                if held != base {
                    return Err(ProtocolError::DeltaBase {
                        offset: p.offset,
                        base,
                        held,
                    }
                    .into());
                }
                let apply = if p.replace {
                    crate::delta::apply_replace
                } else {
                    crate::delta::apply
                };
                apply(&mut page, d).map_err(|why| ProtocolError::Malformed {
                    kind,
                    why: format!("the delta of page {:#x}: {why}", p.offset),
                })?;
                ram.write_at(p.offset, &page)?;
                stats.delta_pages += 1;
            }
        }
        stats.pages += 1;
    }
    Ok(())
}

/// The guest's own verdict on its memory, once it runs here.
fn verify(vm: &Vm, timeout: Duration) -> VerifyOutcome {
    let st = &vm.io().status;
    let outcome = |ok: bool, detail: String| VerifyOutcome {
        ok,
        detail,
        verifiable: true,
        cpu_seconds: 0.0,
    };
    if st.report().ready_pages.is_none() {
        return VerifyOutcome {
            verifiable: false,
            ..outcome(
                false,
                "not verifiable: the guest is not the livemig workload guest".into(),
            )
        };
    }
    let t = Instant::now();
    let o = match st.verify(timeout).and_then(|r| r.last_verify) {
        Some(vmm::devices::VerifyResult::Ok { pages }) => {
            outcome(true, format!("VERIFY OK pages={pages}"))
        }
        Some(vmm::devices::VerifyResult::Bad { first_bad_addr }) => outcome(
            false,
            format!("VERIFY FAIL first bad address {first_bad_addr:#x}"),
        ),
        None => outcome(
            false,
            format!("no verify result within {timeout:?} (not our workload guest?)"),
        ),
    };
    tracing::info!(
        "guest verify on the destination took {:?}: {}",
        t.elapsed(),
        o.detail
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Announced extents are refused unless ascending, disjoint, non-empty, within guest RAM
    /// and few enough: the populate worker only ever allocates what the VM has.
    #[test]
    fn announced_extents_must_fit_guest_ram() {
        let mem = 64 << 20;
        assert!(check_extents(&[], mem).is_ok());
        assert!(check_extents(&[(0, 4096), (8192, mem)], mem).is_ok());
        for bad in [
            vec![(0, mem + 4096)],
            vec![(8192, 8192)],
            vec![(8192, 4096)],
            vec![(8192, 16384), (0, 4096)],
            vec![(0, 8192), (4096, 16384)],
        ] {
            let e = check_extents(&bad, mem).unwrap_err();
            assert!(e.contains("beyond guest RAM"), "{bad:?}: {e}");
        }
        let many: Vec<(u64, u64)> = (0..=protocol::MAX_EXTENTS as u64)
            .map(|i| (i * 8192, i * 8192 + 4096))
            .collect();
        assert!(check_extents(&many, mem)
            .unwrap_err()
            .contains("the limit is"));
    }

    #[test]
    fn a_reference_to_the_host_cache_places_only_what_it_holds_under_that_hash() {
        use crate::host_cache::HostCache;
        use crate::protocol::{decode, Frame, PageBatch, RefHead};
        use zerocopy::IntoBytes;
        let ram = GuestRam::new(64 << 20).unwrap();
        let cache = HostCache::create(1 << 20).unwrap();
        let (held, forged) = (vec![3u8; 4096], vec![4u8; 4096]);
        let h_held = *blake3::hash(&held).as_bytes();
        cache.insert(&held, &h_held).unwrap();
        // A slot filed under the hash of other content (as a collision would be).
        let h_forged = *blake3::hash(&forged).as_bytes();
        cache.insert(&[5u8; 4096], &h_forged).unwrap();
        let session = cache::CacheSession::open(&cache.path()).unwrap();
        assert_eq!(session.keys().len(), 2);
        let mut b = PageBatch::default();
        b.push_ref(4096);
        let payload = |hash: [u8; 32]| {
            let mut p = b.head();
            p.extend_from_slice(RefHead::host_cache(hash).as_bytes());
            p
        };
        let place =
            |p: &[u8], cache, stats: &mut ReceiveStats| match decode(Kind::Pages, p).unwrap() {
                Frame::Pages { head, data } => {
                    place_batch(Dest { ram: &ram, cache }, &head, data, Kind::Pages, stats)
                }
                f => panic!("{:?}", f.kind()),
            };
        let at = || {
            let mut got = vec![0u8; 4096];
            ram.read_at(4096, &mut got).unwrap();
            got
        };
        let mut st = ReceiveStats::default();
        // Without the cache, a page not held under the hash, or one whose content does not
        // hash to it: refused, nothing placed.
        for (hash, cache) in [
            (h_held, None),
            ([8u8; 32], Some(&session)),
            (h_forged, Some(&session)),
        ] {
            let e = place(&payload(hash), cache, &mut st).unwrap_err();
            assert!(e.to_string().contains("refused"), "{e}");
            assert_eq!(at(), vec![0u8; 4096]);
        }
        place(&payload(h_held), Some(&session), &mut st).unwrap();
        assert_eq!(at(), held);
        assert_eq!(st.host_ref_pages, 1);
    }

    #[test]
    fn the_copy_fills_the_host_cache_and_later_rounds_do_not() {
        use crate::host_cache::HostCache;
        use crate::protocol::{decode, Frame, PageBatch};
        let ram = GuestRam::new(64 << 20).unwrap();
        let cache = HostCache::create(1 << 20).unwrap();
        let session = cache::CacheSession::open(&cache.path()).unwrap();
        let dst = Dest {
            ram: &ram,
            cache: Some(&session),
        };
        let batch = |fill: u8| {
            let mut b = PageBatch::default();
            b.push(0, false);
            let mut p = b.head();
            p.extend_from_slice(&[fill; 4096]);
            p
        };
        let mut st = ReceiveStats::default();
        for fill in [1u8, 1, 2] {
            let p = batch(fill);
            let Frame::Pages { head, data } = decode(Kind::Pages, &p).unwrap() else {
                panic!()
            };
            place_batch(dst, &head, data, Kind::Pages, &mut st).unwrap();
        }
        // Two distinct pages, the repeat added once.
        assert_eq!(session.added(), 2);
        dst.round_end();
        let p = batch(3);
        let Frame::Pages { head, data } = decode(Kind::Pages, &p).unwrap() else {
            panic!()
        };
        place_batch(dst, &head, data, Kind::Pages, &mut st).unwrap();
        assert_eq!(session.added(), 2);
        assert_eq!(
            HostCache::open(&cache.path())
                .unwrap()
                .index()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_reference_copies_only_a_page_whose_content_has_its_hash() {
        use crate::protocol::{decode, Frame, PageBatch, RefHead};
        use zerocopy::IntoBytes;
        let ram = GuestRam::new(64 << 20).unwrap();
        let a = vec![7u8; 4096];
        ram.write_at(0, &a).unwrap();
        let mut b = PageBatch::default();
        b.push_ref(8192);
        let payload = |from: u64, hash: [u8; 32]| {
            let mut p = b.head();
            p.extend_from_slice(RefHead::new(from, hash).as_bytes());
            p
        };
        let place = |p: &[u8], stats: &mut ReceiveStats| match decode(Kind::Pages, p).unwrap() {
            Frame::Pages { head, data } => {
                place_batch(Dest::ram(&ram), &head, data, Kind::Pages, stats)
            }
            f => panic!("{:?}", f.kind()),
        };
        let at = |off| {
            let mut got = vec![0u8; 4096];
            ram.read_at(off, &mut got).unwrap();
            got
        };
        let mut stats = ReceiveStats::default();
        // A crafted reference: the hash of content that is not at `from` (a page the guest
        // wants copied elsewhere cannot be named by a hash it chose): refused, nothing placed.
        let e = place(
            &payload(0, *blake3::hash(&[9u8; 4096]).as_bytes()),
            &mut stats,
        )
        .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        assert_eq!(at(8192), vec![0u8; 4096]);
        // Beyond guest RAM, or to itself: malformed.
        assert!(decode(Kind::Pages, &payload(64 << 20, [0; 32]))
            .ok()
            .and_then(|f| match f {
                Frame::Pages { head, data } => head.pages(data, 64 << 20, Kind::Pages).ok(),
                _ => None,
            })
            .is_none());
        // The right hash: copied.
        place(&payload(0, *blake3::hash(&a).as_bytes()), &mut stats).unwrap();
        assert_eq!(at(8192), a);
        assert_eq!(stats.ref_pages, 1);
    }

    /// Places a batch of one delta page at `off`: `head` (base, and how the runs apply), then
    /// `enc`.
    fn place_delta(
        ram: &GuestRam,
        off: u64,
        head: crate::protocol::DeltaHead,
        enc: &[u8],
        stats: &mut ReceiveStats,
    ) -> Result<(), MigrationError> {
        use crate::protocol::{decode, Frame, PageBatch};
        use zerocopy::IntoBytes;
        let mut b = PageBatch::default();
        b.push_delta(off);
        let mut p = b.head();
        p.extend_from_slice(head.as_bytes());
        p.extend_from_slice(enc);
        match decode(Kind::Pages, &p).unwrap() {
            Frame::Pages { head, data } => {
                place_batch(Dest::ram(ram), &head, data, Kind::Pages, stats)
            }
            f => panic!("{:?}", f.kind()),
        }
    }

    fn page_at(ram: &GuestRam, off: u64) -> Vec<u8> {
        let mut got = vec![0u8; 4096];
        ram.read_at(off, &mut got).unwrap();
        got
    }

    #[test]
    fn a_delta_applies_only_to_the_version_it_was_computed_against() {
        use crate::delta;
        use crate::protocol::DeltaHead;
        let ram = GuestRam::new(64 << 20).unwrap();
        let old = vec![5u8; 4096];
        ram.write_at(4096, &old).unwrap();
        let mut new = old.clone();
        new[0] = 6;
        let mut enc = Vec::new();
        assert!(delta::encode(&old, &new, &mut enc));
        let head = |base: u64| DeltaHead::new(base, enc.len());
        let mut stats = ReceiveStats::default();
        // Against another version (a hostile or confused source): refused, nothing placed.
        let hostile = head(delta::base_hash(&[9u8; 4096]));
        let e = place_delta(&ram, 4096, hostile, &enc, &mut stats).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        assert_eq!(page_at(&ram, 4096), old);
        // Against what is here: applied.
        place_delta(&ram, 4096, head(delta::base_hash(&old)), &enc, &mut stats).unwrap();
        assert_eq!(page_at(&ram, 4096), new);
        assert_eq!(stats.delta_pages, 1);
        // The same delta again is against a version no longer here.
        assert!(place_delta(&ram, 4096, head(delta::base_hash(&old)), &enc, &mut stats).is_err());
        assert_eq!(page_at(&ram, 4096), new);
    }

    /// Replacement runs (a source that kept only a sketch of the page) are held to the same
    /// base check, and replace exactly the blocks they carry.
    #[test]
    fn replaced_blocks_apply_only_to_the_version_they_were_computed_against() {
        use crate::delta::{self, Sketch};
        use crate::protocol::DeltaHead;
        let ram = GuestRam::new(64 << 20).unwrap();
        let old: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        ram.write_at(8192, &old).unwrap();
        let mut new = old.clone();
        new[1000] ^= 0x55;
        let mut enc = Vec::new();
        let k = delta::sketch_key();
        assert!(Sketch::of(&old, &k).encode(&Sketch::of(&new, &k), &new, &mut enc));
        let head = |base: u64| DeltaHead::replace(base, enc.len());
        let mut stats = ReceiveStats::default();
        assert!(place_delta(&ram, 8192, head(delta::base_hash(&new)), &enc, &mut stats).is_err());
        assert_eq!(page_at(&ram, 8192), old);
        place_delta(&ram, 8192, head(delta::base_hash(&old)), &enc, &mut stats).unwrap();
        assert_eq!(page_at(&ram, 8192), new);
        assert_eq!(stats.delta_pages, 1);
    }

    #[test]
    fn runs_group_consecutive_pages_of_one_kind() {
        let p = PAGE_SIZE;
        let r = runs(
            [
                (0, false),
                (p, false),
                (2 * p, true),
                (3 * p, true),
                (9 * p, true),
                (10 * p, false),
            ]
            .into_iter(),
        );
        assert_eq!(
            r,
            vec![
                (0, 2, false),
                (2 * p, 2, true),
                (9 * p, 1, true),
                (10 * p, 1, false)
            ]
        );
    }

    #[test]
    fn a_batch_lands_at_its_offsets() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let mut b = protocol::PageBatch::default();
        b.push(0, false);
        b.push(4096, false);
        b.push(1 << 20, true);
        let mut payload = b.head();
        payload.extend(std::iter::repeat_n(7u8, 4096));
        payload.extend(std::iter::repeat_n(9u8, 4096));
        let protocol::Frame::Pages { head, data } =
            protocol::decode(Kind::Pages, &payload).unwrap()
        else {
            panic!("not a Pages frame")
        };
        let mut st = ReceiveStats::default();
        place_batch(Dest::ram(&ram), &head, data, Kind::Pages, &mut st).unwrap();
        let mut wrong = ReceiveStats::default();
        assert!(place_batch(
            Dest::ram(&ram),
            &head,
            &data[..4096],
            Kind::Pages,
            &mut wrong
        )
        .is_err());
        let mut back = vec![0u8; 8192];
        ram.read_at(0, &mut back).unwrap();
        assert!(back[..4096].iter().all(|&x| x == 7) && back[4096..].iter().all(|&x| x == 9));
        assert_eq!((st.pages, st.zero_pages), (3, 1));
    }

    #[test]
    fn a_batch_beyond_guest_ram_is_refused() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let mut br = std::io::BufReader::new(std::io::Cursor::new(Vec::new()));
        let mut input = FrameReader::new(&mut br);
        let e = place_direct(
            &mut input,
            &[Entry::new(64 << 20, true)],
            &ram,
            Landing::Splice,
            &mut ReceiveStats::default(),
        );
        assert!(e.is_err());
    }
}
