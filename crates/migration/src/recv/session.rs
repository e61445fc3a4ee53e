//! One incoming migration, on the thread of its control connection: the Config admitted and
//! the VM built, the memory phase over the control connection and the page streams, then the
//! state loaded, the confirmation, the VM resumed and the guest's verdict sent back.
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use migratable::{GuestVerdict, Migratable, Pausable, PreparedVm, Snapshot, VmFactory};
use transport::{Connection, ShutdownHandle};

use super::disks;
use super::place::{place, place_direct, Dest};
use super::postcopy;
use super::streams::{self, RoundBarrier};
use super::Received;
use super::{cache, incoming, populate, Events, Incoming, Pending, ReceiveEvent, ReceiveStats};
use super::{check_config, check_extents, fits_here, ReceiveMigrationState, Step};
use crate::policy::{self, Landing};
use crate::protocol::{
    self, Confirmed, DirectRead, FrameReader, FrameWriter, Kind, Owed, Prepare, ProtocolError,
    Transport, VerifyOutcome,
};
use crate::{thread_cpu_seconds, MigrationError};

impl Incoming {
    fn tell(&self, e: &ReceiveEvent) {
        if let Some(Events(f)) = &self.opts.events {
            f(e);
        }
    }

    /// Runs the migration behind a control connection into a new VM that `factory` builds, if
    /// it fits here. Returns the VM running; on any error the source is told why, and nothing
    /// of the VM is left here.
    pub fn receive<F: VmFactory>(
        &self,
        p: Pending,
        factory: &F,
    ) -> Result<(Received<F>, ReceiveStats), MigrationError> {
        let (mut conn, hello, peer) = p.into_parts();
        let cpu0 = thread_cpu_seconds();
        let result = self.run(&mut conn, hello, factory, cpu0);
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

    fn run<F: VmFactory>(
        &self,
        conn: &mut Connection,
        hello: protocol::Hello,
        factory: &F,
        cpu0: f64,
    ) -> Result<(Received<F>, ReceiveStats), MigrationError> {
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
        let taken = self.take_config(&mut input);
        if watchdog.disarm() {
            return Err(MigrationError::TimedOut {
                secs: opts.peer_timeout.as_secs_f64(),
                waiting_for: "the source's Config".into(),
            });
        }
        let (state, mut prep) = taken?;
        // Copied disks get their files here first; the VM is built on them.
        let mut disks = disks::DiskSink::create(opts.disk_dir.as_deref(), &mut prep)?;
        let config_ms = t_config.elapsed().as_millis();
        let (mut streams, slot) = self.collect_streams(&prep)?;
        // Post-copy's link came last; the slot stays while it may be made again.
        let link = prep.postcopy.then(|| take_link(&mut streams)).flatten();
        let relink = prep.postcopy.then_some(slot);
        for s in &streams {
            s.set_peer_timeout(Some(opts.peer_timeout))
                .map_err(MigrationError::socket("setting the peer timeout"))?;
        }
        let t_build = Instant::now();
        let prepared = factory.prepare(&prep.vm, &prep.sections)?;
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
        let cache = self.host_cache_for(&prep, &mut out)?;
        if let Some(why) = prep.postcopy.then(postcopy::unavailable).flatten() {
            out.send(Kind::NoPostcopy, why.as_bytes())?;
        }
        out.send(Kind::Ready, &[])?;
        out.flush()?;

        // Memory, until the paused source's state and Done.
        let dst = Dest {
            ram: prepared.ram(),
            cache: cache.as_ref(),
        };
        let (vm_state, mut stats, owed, held) = receive_memory(
            (&mut input, &mut out),
            state,
            dst,
            streams,
            hello.transport,
            &control,
            disks.as_mut(),
        )?;
        if let Some(d) = &mut disks {
            d.commit()?;
        }
        let t_done = Instant::now();
        stats.cached_pages = cache.as_ref().map_or(0, |c| c.added());
        // Post-copy: the owed pages go missing and are fetched when touched, from before the
        // state loads (loading it may read guest RAM).
        let postcopy = start_postcopy(prepared.ram(), owed, link, opts.peer_timeout)?;

        // Everything is here (or, in post-copy, on its way): load the state paused, confirm,
        // then run.
        let mut vm = prepared.restore(&vm_state)?;
        // From the Confirm on the VM runs on the copies.
        if let Some(d) = disks {
            d.keep();
        }
        let since = held.paused.unwrap_or(t_done);
        self.confirm(&mut out, &prep, since, (t_done - since, since.elapsed()))?;
        let t_confirmed = Instant::now();
        self.tell(&ReceiveEvent::Running);
        vm.resume()?;
        let resumed_ms = t_confirmed.elapsed().as_secs_f64() * 1e3;
        // The guest runs: the downtime is over (threads started meanwhile did not inherit it).
        drop(held);
        let outcome = match (postcopy, relink) {
            (Some((pc, link)), Some(slot)) => {
                // The verdict goes over post-copy's link, which may have moved to another
                // network; the control connection is done with.
                let cpu = || thread_cpu_seconds() - cpu0 + stats.stream_cpu_seconds;
                let doorway = pc.doorway(prep.streams, opts.peer_timeout);
                verify_in_postcopy(
                    &mut vm,
                    (pc, link),
                    (slot, doorway),
                    opts,
                    (cpu, resumed_ms),
                )?;
                drop(cache);
                return Ok((vm, stats));
            }
            _ => verify(&mut vm, opts.verify_timeout),
        };
        let outcome = VerifyOutcome {
            cpu_seconds: thread_cpu_seconds() - cpu0 + stats.stream_cpu_seconds,
            resumed_ms,
            ..outcome
        };
        // The VM runs here now: a source gone before the verdict costs the report, not the VM.
        if let Err(e) = out.send_verified(&outcome).and_then(|()| out.flush()) {
            tracing::warn!("the guest's verdict did not reach the source: {e}");
        }
        let _ = out.inner().flush();
        // Unmapping the cache tears down a page table entry per page it holds: not in the
        // downtime window.
        drop(cache);
        Ok((vm, stats))
    }
}

impl Incoming {
    /// The cluster's commit point, if this host is in one: whether it committed (an error
    /// if it never will).
    fn commit(&self, prep: &Prepare) -> Result<bool, MigrationError> {
        let Some(super::Commit(commit)) = &self.opts.commit else {
            return Ok(false);
        };
        let t = Instant::now();
        commit(prep).map_err(MigrationError::NotCommitted)?;
        tracing::debug!(
            commit_ms = t.elapsed().as_millis(),
            "committed: the cluster names this host the VM's owner"
        );
        Ok(true)
    }

    /// Commits (in a cluster) and confirms, with the destination's side of the switchover
    /// from `since` (the Paused): `received` and `loaded` so far, and the Confirm now.
    fn confirm<W: Write>(
        &self,
        out: &mut FrameWriter<W>,
        prep: &Prepare,
        since: Instant,
        (received, loaded): (Duration, Duration),
    ) -> Result<(), MigrationError> {
        let committed = self.commit(prep)?;
        let times = Confirmed {
            received_us: micros(received),
            loaded_us: micros(loaded),
            confirming_us: micros(since.elapsed()),
        };
        match out.send_confirm(times).and_then(|()| out.flush()) {
            // Owned here now: the source learns it from the cluster if not from us.
            Err(e) if committed => {
                tracing::warn!("the Confirm did not reach the source ({e}); the VM runs here");
            }
            r => r?,
        }
        tracing::debug!(?times, "switchover here: received, loaded, confirmed");
        Ok(())
    }

    /// The source's Config, checked and admitted by this host (nothing is allocated before).
    fn take_config<R: DirectRead>(
        &self,
        input: &mut FrameReader<R>,
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
        fits_here(&prep.vm).map_err(|e| MigrationError::Refused(e.to_string()))?;
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
    /// The host's page cache, when the source asked for the one this receiver was given,
    /// with its keys sent to the source.
    fn host_cache_for<W: Write>(
        &self,
        prep: &Prepare,
        out: &mut FrameWriter<W>,
    ) -> Result<Option<cache::CacheSession>, MigrationError> {
        let path = match (&self.opts.host_cache, prep.host_cache) {
            (Some((id, path)), Some(asked)) if *id == asked => path,
            _ => return Ok(None),
        };
        let t = Instant::now();
        let cache = cache::CacheSession::open(path)?;
        let index_ms = t.elapsed().as_millis();
        let keys = cache.keys();
        out.send_cache_keys(&keys)?;
        tracing::debug!(
            index_ms,
            keys_ms = t.elapsed().as_millis() - index_ms,
            keys = keys.len(),
            "prepare here: the host's page cache indexed, its keys sent"
        );
        Ok(Some(cache))
    }
}

/// The memory phase: the control connection's state machine on this thread, one thread per
/// page stream; any failure closes every connection so no thread waits for a dead peer.
fn receive_memory<R: DirectRead, W: Write>(
    (input, out): (&mut FrameReader<R>, &mut FrameWriter<W>),
    state: ReceiveMigrationState,
    dst: Dest<'_>,
    streams: Vec<Connection>,
    transport: Transport,
    control: &ShutdownHandle,
    disks: Option<&mut disks::DiskSink>,
) -> Result<Memory, MigrationError> {
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
        let r = control_loop(
            (input, out),
            state,
            dst,
            transport,
            &barrier,
            control,
            disks,
        );
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
        let (vm_state, control_stats, owed, held) = match (r, first_err) {
            (Ok(v), None) => v,
            (_, Some(e)) | (Err(e), None) => return Err(e),
        };
        stats.add(&control_stats);
        stats.rounds = control_stats.rounds;
        Ok((vm_state, stats, owed, held))
    })
}

/// What the memory phase leaves: the paused source's state, the figures, the pages it still
/// owes (post-copy), and what the switchover holds until the guest runs.
type Memory = (Snapshot, ReceiveStats, Option<Box<Owed>>, Held);

/// What is held from the source's Paused until the guest runs here, then let go: this
/// thread's priority, and the allocation ahead, told to stop but joined only then (it is
/// time-shared; the downtime must not wait for its last chunk).
#[derive(Default)]
struct Held {
    /// When the source's Paused was read: the destination's share of the downtime counts
    /// from here.
    paused: Option<Instant>,
    first: Option<sched::Boosted>,
    _populate: Option<populate::Populate>,
}

/// The control connection after Ready: the state machine until Complete.
/// Every round's end is answered with RoundDone once its pages are in place, here and on
/// every page stream. From the source's Paused on, this thread goes first.
fn control_loop<R: DirectRead, W: Write>(
    (input, out): (&mut FrameReader<R>, &mut FrameWriter<W>),
    mut state: ReceiveMigrationState,
    dst: Dest<'_>,
    transport: Transport,
    streams: &RoundBarrier,
    control: &ShutdownHandle,
    mut disks: Option<&mut disks::DiskSink>,
) -> Result<Memory, MigrationError> {
    let mut held = Held::default();
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
            Step::Owed(part) => {
                // Nothing may fill a page after it is dropped: the streams are done, and the
                // allocation ahead stops first.
                streams.wait_all_finished()?;
                if let Some(p) = populate.take() {
                    p.finish();
                }
                postcopy::drop_owed(dst.ram, &part)?;
                if !part.last {
                    out.send(Kind::OwedPlaced, &[])?;
                    out.flush()?;
                }
            }
            Step::Disk(b) => match disks.as_deref_mut() {
                Some(d) => d.write(&b)?,
                None => {
                    return Err(ProtocolError::Unexpected {
                        kind: Kind::DiskBlocks,
                        state: "receiving-memory without copied disks",
                    }
                    .into())
                }
            },
            Step::Paused => {
                held.paused = Some(Instant::now());
                held.first = switchover_first(control);
            }
            Step::RoundEnd(r) => {
                // What the copies hold is made durable off the switchover.
                if let Some(d) = &disks {
                    d.sync()?;
                }
                dst.round_end();
                rounds += 1;
                streams.wait_rounds(rounds)?;
                out.send_round_done(r)?;
                out.flush()?;
            }
            step => place(step, dst, transport, &mut scratch, &mut stats)?,
        }
        if let ReceiveMigrationState::Complete {
            rounds,
            state,
            owed,
        } = state
        {
            // Every page is here: allocating ahead has nothing left to win.
            if let Some(p) = &populate {
                p.stop();
            }
            held._populate = populate;
            stats.rounds = rounds;
            tracing::debug!(
                received_ms = held.paused.map(|t| t.elapsed().as_millis()),
                "switchover here: the paused round and the state received"
            );
            return Ok((*state, stats, owed, held));
        }
    }
}

/// From the source's Paused to the Confirm, this thread goes first on the cores and its
/// answers go first on the wire; where this host allows neither, the switchover goes as it
/// can.
fn switchover_first(control: &ShutdownHandle) -> Option<sched::Boosted> {
    if let Err(e) = control.expedite() {
        tracing::debug!("the switchover's answers keep their class on the wire: {e}");
    }
    crate::go_first()
        .inspect_err(|why| tracing::debug!("the switchover keeps its priority: {why}"))
        .ok()
}

/// A duration in whole microseconds, as a Confirm carries them (at most about 71 minutes).
fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Post-copy's link, which comes after the page streams: asks, answers, push.
fn take_link(streams: &mut Vec<Connection>) -> Option<[Connection; 3]> {
    let n = streams
        .len()
        .checked_sub(usize::from(protocol::LINK_CONNS))?;
    streams.split_off(n).try_into().ok()
}

/// Post-copy, when the source named owed pages: every view of guest RAM registered and the
/// fault thread started, before the state loads (loading it may read guest RAM).
fn start_postcopy(
    ram: &ram::GuestRam,
    owed: Option<Box<Owed>>,
    link: Option<[Connection; 3]>,
    peer_timeout: Duration,
) -> Result<Option<(postcopy::Postcopy, postcopy::Link)>, MigrationError> {
    match (owed, link) {
        (Some(owed), Some(link)) => Ok(Some((
            postcopy::Postcopy::start(ram, &owed)?,
            postcopy::Link::new(link, 0, peer_timeout)?,
        ))),
        (Some(_), None) => Err(ProtocolError::Unexpected {
            kind: Kind::Postcopy,
            state: "a migration that did not announce post-copy",
        }
        .into()),
        (None, _) => Ok(None),
    }
}

/// The guest's verdict on its memory while post-copy brings in what it lacks (its reads fault
/// pages in), sent over post-copy's link once post-copy is done; a failure of post-copy
/// loses the VM. `cpu` says what this side has spent.
fn verify_in_postcopy<V: Migratable>(
    vm: &mut V,
    (mut pc, link): (postcopy::Postcopy, postcopy::Link),
    (slot, doorway): (incoming::StreamSlot<'_>, postcopy::Doorway),
    opts: &super::ReceiveOptions,
    (cpu, resumed_ms): (impl Fn() -> f64, f64),
) -> Result<(), MigrationError> {
    pc.resumed(vm.guest_writes());
    let verdict = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let (tx, links) = std::sync::mpsc::channel();
    let done = std::thread::scope(|sc| {
        let (verdict, stop) = (&verdict, &stop);
        sc.spawn(move || doorway.run(&slot.arrivals, &tx, stop));
        let push = sc.spawn(move || finish_postcopy(pc, link, &links, opts.peer_timeout, verdict));
        let outcome = verify(vm, opts.verify_timeout);
        *locks::lock(verdict) = Some(VerifyOutcome {
            cpu_seconds: cpu(),
            resumed_ms,
            ..outcome
        });
        let done = push
            .join()
            .unwrap_or_else(|_| Err(MigrationError::StreamFailed));
        stop.store(true, Ordering::SeqCst);
        done
    });
    let stats = done.map_err(|e| MigrationError::VmLost(e.to_string()))?;
    tracing::info!(?stats, "post-copy complete here");
    Ok(())
}

/// Post-copy after the resume: links served until every owed page is here and the source has
/// been told, and given the guest's verdict; a failed link is waited for again (the vCPUs
/// that fault wait with it) within the recovery window, from `links`. Once every page is
/// here, a source that does not come back only misses the verdict: the VM runs here, whole.
fn finish_postcopy(
    mut pc: postcopy::Postcopy,
    link: postcopy::Link,
    links: &Receiver<postcopy::Link>,
    timeout: Duration,
    verdict: &Mutex<Option<VerifyOutcome>>,
) -> Result<protocol::PostcopyStats, MigrationError> {
    let window = crate::postcopy::recovery_window(timeout);
    let mut link = link;
    loop {
        let why = match pc.serve(link, timeout, verdict)? {
            postcopy::Served::Done => break,
            postcopy::Served::Lost(why) => why,
        };
        let complete = pc.stats().is_some();
        tracing::warn!(
            complete,
            "post-copy: the link failed ({why}); waiting for the source to make it again (within {window:?})"
        );
        let t = Instant::now();
        match newest(links, window) {
            Some(l) => link = l,
            None if complete => {
                tracing::warn!("post-copy: the source did not come back for the guest's verdict; the VM runs here, whole");
                break;
            }
            None => {
                return Err(MigrationError::Postcopy(format!(
                    "the link failed ({why}) and the source did not make it again within {window:?}"
                )))
            }
        }
        tracing::info!(after = ?t.elapsed(), "post-copy: the link is made again");
    }
    let stats = pc.stats().cloned().unwrap_or_default();
    tracing::debug!(
        owed = pc.owed_pages(),
        ?stats,
        "post-copy: every owed page is here"
    );
    Ok(stats)
}

/// The newest link that came within `within` (older ones, queued, were given up by the source).
fn newest(links: &Receiver<postcopy::Link>, within: Duration) -> Option<postcopy::Link> {
    let first = links.recv_timeout(within).ok()?;
    Some(links.try_iter().last().unwrap_or(first))
}

/// The guest's own verdict on its memory, once it runs here.
fn verify(vm: &mut impl Migratable, timeout: Duration) -> VerifyOutcome {
    let t = Instant::now();
    let (ok, verifiable, detail) = match vm.verify_guest(timeout) {
        GuestVerdict::Verified {
            pages,
            disk_blocks: None,
        } => (true, true, format!("VERIFY OK pages={pages}")),
        GuestVerdict::Verified {
            pages,
            disk_blocks: Some(blocks),
        } => (
            true,
            true,
            format!("VERIFY OK pages={pages} disk blocks={blocks}"),
        ),
        GuestVerdict::DiskCorrupt { lost, stale, torn } => (
            false,
            true,
            format!("DISK VERIFY FAIL lost={lost} stale={stale} torn={torn}"),
        ),
        GuestVerdict::Corrupt { first_bad_addr } => (
            false,
            true,
            format!("VERIFY FAIL first bad address {first_bad_addr:#x}"),
        ),
        GuestVerdict::NoAnswer => (false, true, format!("no verify result within {timeout:?}")),
        GuestVerdict::NotVerifiable => (
            false,
            false,
            "not verifiable: the guest is not the livemig workload guest".into(),
        ),
    };
    tracing::info!(
        "guest verify on the destination took {:?}: {detail}",
        t.elapsed()
    );
    VerifyOutcome {
        ok,
        detail,
        verifiable,
        cpu_seconds: 0.0,
        resumed_ms: 0.0,
    }
}
