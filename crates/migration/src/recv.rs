//! The destination side: an explicit receive state machine that builds the VM, places pages
//! at their final address, and resumes only once it holds everything.
use std::io::Write;
use std::time::{Duration, Instant};

use transport::Connection;
use vmm::memory::PAGE_SIZE;
use vmm::{Console, PreparedVm, Vm, VmConfig, VmState};

use crate::codec;
use crate::protocol::{
    self, decode_pages, FrameReader, FrameWriter, Kind, ProtocolError, Transport,
};
use crate::{thread_cpu_seconds, MigrationError, VerifyOutcome};

/// Largest VM we agree to build for a peer.
pub const MAX_MEMORY: u64 = 1 << 40;

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub console: Console,
    /// A peer silent for this long is taken for dead.
    pub peer_timeout: Duration,
    /// How long the guest gets to verify its memory after resume.
    pub verify_timeout: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            console: Console::Discard,
            peer_timeout: Duration::from_secs(60),
            verify_timeout: Duration::from_secs(60),
        }
    }
}

/// A barrier for the page streams' round markers that a failing stream can break, so no
/// thread waits forever for a peer that died.
struct RoundBarrier {
    n: usize,
    /// (waiting, generation, aborted, streams finished)
    state: std::sync::Mutex<(usize, u64, bool, usize)>,
    cv: std::sync::Condvar,
}

impl RoundBarrier {
    fn new(n: usize) -> Self {
        RoundBarrier {
            n,
            state: std::sync::Mutex::new((0, 0, false, 0)),
            cv: std::sync::Condvar::new(),
        }
    }

    fn wait(&self) -> Result<(), MigrationError> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if g.2 {
            return Err(MigrationError::StreamFailed);
        }
        g.0 += 1;
        if g.0 == self.n {
            g.0 = 0;
            g.1 += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let gen = g.1;
        while g.1 == gen && !g.2 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if g.2 {
            Err(MigrationError::StreamFailed)
        } else {
            Ok(())
        }
    }

    /// A stream delivered its Done.
    fn finished(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).3 += 1;
        self.cv.notify_all();
    }

    /// Waits until every stream delivered its Done (the control connection's pages come after).
    fn wait_all_finished(&self) -> Result<(), MigrationError> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while g.3 < self.n && !g.2 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if g.2 {
            Err(MigrationError::StreamFailed)
        } else {
            Ok(())
        }
    }

    fn abort(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).2 = true;
        self.cv.notify_all();
    }
}

/// What the destination saw.
#[derive(Clone, Debug, Default)]
pub struct ReceiveStats {
    pub pages: u64,
    pub zero_pages: u64,
    pub rounds: u32,
    /// CPU seconds of the page stream threads.
    pub stream_cpu_seconds: f64,
}

fn check_config(c: &VmConfig) -> Result<(), ProtocolError> {
    if c.memory == 0 || c.memory > MAX_MEMORY || c.vcpus == 0 || c.vcpus > vmm::vm::MAX_VCPUS {
        return Err(ProtocolError::Malformed {
            kind: Kind::Config,
            why: format!("unreasonable VM: {} bytes, {} vCPUs", c.memory, c.vcpus),
        });
    }
    Ok(())
}

/// Receives one VM: accepts its control connection and page streams on `listener`. Returns
/// the VM running; on any error nothing is left behind.
pub fn receive(
    listener: &transport::Listener,
    opts: &ReceiveOptions,
) -> Result<(Vm, ReceiveStats), MigrationError> {
    let mut conn = listener.accept()?;
    conn.set_read_timeout(Some(opts.peer_timeout))?;
    let cpu0 = thread_cpu_seconds();
    let result = run(&mut conn, listener, opts, cpu0);
    if let Err(e) = &result {
        // Best effort: tell the source why, so it can say so too.
        if !matches!(e, MigrationError::Protocol(ProtocolError::PeerAborted(_))) {
            let mut w = FrameWriter::new(&mut conn.writer);
            let _ = w.send(Kind::Abort, e.to_string().as_bytes());
            let _ = w.flush();
        }
        conn.shutdown();
    }
    result
}

fn run(
    conn: &mut Connection,
    listener: &transport::Listener,
    opts: &ReceiveOptions,
    cpu0: f64,
) -> Result<(Vm, ReceiveStats), MigrationError> {
    let hello = protocol::accept_hello(&mut conn.reader, &mut conn.writer)?;
    let control = conn.shutdown_handle()?;
    let mut input = FrameReader::new(&mut conn.reader);
    let mut out = FrameWriter::new(&mut conn.writer);

    // Prepare: build the VM and take the page streams it announces.
    let prep: protocol::Prepare = match input.recv()? {
        (Kind::Config, p) => serde_json::from_slice(p).map_err(|e| ProtocolError::Malformed {
            kind: Kind::Config,
            why: e.to_string(),
        })?,
        (k, _) => {
            return Err(ProtocolError::Unexpected {
                kind: k,
                state: "waiting for the VM config",
            }
            .into())
        }
    };
    check_config(&prep.vm)?;
    if prep.streams > protocol::MAX_STREAMS {
        return Err(ProtocolError::Malformed {
            kind: Kind::Config,
            why: format!(
                "{} page streams, the limit is {}",
                prep.streams,
                protocol::MAX_STREAMS
            ),
        }
        .into());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut slots: Vec<Option<Connection>> = (0..prep.streams).map(|_| None).collect();
    for _ in 0..prep.streams {
        let mut c = listener.accept_until(deadline)?;
        c.set_read_timeout(Some(opts.peer_timeout))?;
        let i = protocol::read_data_hello(&mut c.reader, prep.session, prep.streams)? as usize;
        if slots[i].replace(c).is_some() {
            return Err(ProtocolError::Malformed {
                kind: Kind::Config,
                why: format!("page stream {i} connected twice"),
            }
            .into());
        }
    }
    let streams: Vec<Connection> = slots.into_iter().flatten().collect();
    if !streams.is_empty() {
        // The control connection is quiet while the streams carry the rounds; a dead peer
        // shows on the streams, which then close it.
        control.set_read_timeout(Some(opts.peer_timeout.max(Duration::from_secs(3600))))?;
    }
    let prepared = PreparedVm::new(&prep.vm)?;
    out.send(Kind::Ready, &[])?;
    out.flush()?;

    let handles: Vec<transport::ShutdownHandle> = streams
        .iter()
        .map(|c| c.shutdown_handle())
        .collect::<Result<_, _>>()?;
    let barrier = RoundBarrier::new(streams.len());
    let (state, stats) =
        std::thread::scope(|sc| -> Result<(VmState, ReceiveStats), MigrationError> {
            let ram = prepared.ram();
            let workers: Vec<_> = streams
                .into_iter()
                .map(|c| {
                    let (barrier, control) = (&barrier, &control);
                    sc.spawn(move || {
                        let r = page_stream(c, ram, barrier, hello.transport);
                        if r.is_err() {
                            barrier.abort();
                            control.shutdown();
                        }
                        r
                    })
                })
                .collect();
            let r = control_loop(&mut input, ram, hello.transport, &barrier);
            if r.is_err() {
                barrier.abort();
                for h in &handles {
                    h.shutdown();
                }
            }
            let mut stats = ReceiveStats::default();
            let mut first_err = None;
            for w in workers {
                match w.join() {
                    Ok(Ok(s)) => {
                        stats.pages += s.pages;
                        stats.zero_pages += s.zero_pages;
                        stats.stream_cpu_seconds += s.stream_cpu_seconds;
                    }
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert(MigrationError::StreamFailed);
                    }
                }
            }
            // The stream that failed first says why better than the control connection it closed.
            let (state, control_stats) = match (r, first_err) {
                (Ok(v), None) => v,
                (_, Some(e)) => return Err(e),
                (Err(e), None) => return Err(e),
            };
            stats.pages += control_stats.pages;
            stats.zero_pages += control_stats.zero_pages;
            stats.rounds = control_stats.rounds;
            Ok((state, stats))
        })?;

    // Everything is here: load the state paused, confirm, then run.
    let mut vm = prepared.finish(&state, &opts.console, true)?;
    out.send(Kind::Confirm, &[])?;
    out.flush()?;
    vm.resume()?;
    let t = Instant::now();
    let outcome = verify(&vm, opts.verify_timeout);
    tracing::info!(
        "guest verify on the destination took {:?}: {}",
        t.elapsed(),
        outcome.detail
    );
    let outcome = VerifyOutcome {
        cpu_seconds: thread_cpu_seconds() - cpu0 + stats.stream_cpu_seconds,
        ..outcome
    };
    out.send(Kind::Verified, &serde_json::to_vec(&outcome)?)?;
    out.flush()?;
    let _ = out.inner().flush();
    Ok((vm, stats))
}

/// Places one page frame (plain or compressed) into guest RAM.
fn take_pages(
    kind: Kind,
    payload: &[u8],
    ram: &vmm::memory::GuestRam,
    transport: Transport,
    scratch: &mut Vec<u8>,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    match kind {
        Kind::Pages => place(ram, decode_pages(payload, ram.size)?, stats)?,
        Kind::PagesCompressed if transport == Transport::Compressed => {
            let b = protocol::split_compressed(payload)?;
            codec::decompress(b.codec, b.data, b.raw_len, scratch)?;
            place(
                ram,
                protocol::decode_batch(b.head, scratch, ram.size, kind)?,
                stats,
            )?;
        }
        k => {
            return Err(ProtocolError::Unexpected {
                kind: k,
                state: "receiving memory over a transport that does not send it",
            }
            .into())
        }
    }
    Ok(())
}

/// Puts a PagesDirect frame's page data straight into guest RAM at its final place: one splice
/// from the socket into the memfd per run of consecutive data pages, zero pages as holes.
fn place_direct<R: protocol::DirectRead>(
    input: &mut FrameReader<R>,
    head: &[u8],
    ram: &vmm::memory::GuestRam,
    stats: &mut ReceiveStats,
) -> Result<(), MigrationError> {
    let entries = protocol::parse_entries(head, ram.size, Kind::PagesDirect)?;
    let mut i = 0;
    while i < entries.len() {
        let (off, zero) = entries[i];
        let mut j = i + 1;
        while j < entries.len()
            && entries[j].1 == zero
            && entries[j].0 == entries[j - 1].0 + PAGE_SIZE
        {
            j += 1;
        }
        let len = (j - i) as u64 * PAGE_SIZE;
        if zero {
            ram.zero_range(off, len)?;
            stats.zero_pages += (j - i) as u64;
        } else {
            // Memfd offsets: a run is contiguous in the file even where it crosses from low
            // to high RAM.
            input.read_direct(ram.backing_file(), off, len as usize)?;
        }
        stats.pages += (j - i) as u64;
        i = j;
    }
    Ok(())
}

/// The control connection after Ready: pages (single-stream), round ends, state, done.
fn control_loop(
    input: &mut FrameReader<
        &mut std::io::BufReader<transport::CountingReader<std::net::TcpStream>>,
    >,
    ram: &vmm::memory::GuestRam,
    transport: Transport,
    streams: &RoundBarrier,
) -> Result<(VmState, ReceiveStats), MigrationError> {
    let mut stats = ReceiveStats::default();
    let mut scratch = Vec::new();
    let mut state: Option<VmState> = None;
    loop {
        let (kind, payload) = input.recv()?;
        match (kind, &state) {
            (Kind::PagesDirect, None) if transport == Transport::Direct => {
                streams.wait_all_finished()?;
                let head = payload.to_vec();
                place_direct(input, &head, ram, &mut stats)?
            }
            (Kind::Pages | Kind::PagesCompressed, None) => {
                // With page streams, the control connection carries only the last (paused)
                // round, which must land after everything the streams brought.
                streams.wait_all_finished()?;
                take_pages(kind, payload, ram, transport, &mut scratch, &mut stats)?
            }
            (Kind::RoundEnd, None) => {
                if payload.len() != 12 {
                    return Err(ProtocolError::Malformed {
                        kind,
                        why: format!("{} bytes, expected 12", payload.len()),
                    }
                    .into());
                }
                stats.rounds += 1;
            }
            (Kind::State, None) => {
                let s = VmState::from_bytes(payload).map_err(|e| ProtocolError::Malformed {
                    kind,
                    why: e.to_string(),
                })?;
                if s.config.memory != ram.size {
                    return Err(ProtocolError::Malformed {
                        kind,
                        why: format!(
                            "state is for {} bytes of RAM, the VM has {}",
                            s.config.memory, ram.size
                        ),
                    }
                    .into());
                }
                state = Some(s);
            }
            (Kind::Done, Some(_)) => {
                return Ok((state.take().expect("matched Some"), stats));
            }
            (k, s) => {
                return Err(ProtocolError::Unexpected {
                    kind: k,
                    state: if s.is_some() {
                        "waiting for the end of the stream"
                    } else {
                        "receiving memory"
                    },
                }
                .into())
            }
        }
    }
}

/// One page stream: pages until Done, meeting the other streams at every round end.
fn page_stream(
    mut conn: Connection,
    ram: &vmm::memory::GuestRam,
    barrier: &RoundBarrier,
    transport: Transport,
) -> Result<ReceiveStats, MigrationError> {
    let cpu0 = thread_cpu_seconds();
    let mut input = FrameReader::new(&mut conn.reader);
    let mut stats = ReceiveStats::default();
    let mut scratch = Vec::new();
    loop {
        let (kind, payload) = input.recv()?;
        stats.stream_cpu_seconds = thread_cpu_seconds() - cpu0;
        match kind {
            Kind::PagesDirect if transport == Transport::Direct => {
                let head = payload.to_vec();
                place_direct(&mut input, &head, ram, &mut stats)?
            }
            Kind::Pages | Kind::PagesCompressed => {
                take_pages(kind, payload, ram, transport, &mut scratch, &mut stats)?
            }
            // No stream applies round k+1 before every stream applied round k.
            Kind::RoundEnd if payload.len() == 12 => barrier.wait()?,
            Kind::Done => {
                barrier.finished();
                return Ok(stats);
            }
            k => {
                return Err(ProtocolError::Unexpected {
                    kind: k,
                    state: "on a page stream",
                }
                .into())
            }
        }
    }
}

/// Puts a batch's pages at their final place: runs of consecutive pages of one kind in one
/// call, data through the memfd (no pre-zeroing of fresh pages), zero pages as holes.
fn place(
    ram: &vmm::memory::GuestRam,
    pages: Vec<protocol::PageRef<'_>>,
    stats: &mut ReceiveStats,
) -> std::io::Result<()> {
    let mut i = 0;
    while i < pages.len() {
        let zero = pages[i].data.is_none();
        let mut j = i + 1;
        let adjacent = |a: &protocol::PageRef<'_>, b: &protocol::PageRef<'_>| match (a.data, b.data)
        {
            (None, None) => true,
            (Some(x), Some(y)) => y.as_ptr() as usize == x.as_ptr() as usize + PAGE_SIZE as usize,
            _ => false,
        };
        while j < pages.len()
            && adjacent(&pages[j - 1], &pages[j])
            && pages[j].offset == pages[j - 1].offset + PAGE_SIZE
        {
            j += 1;
        }
        let off = pages[i].offset;
        if zero {
            ram.zero_range(off, (j - i) as u64 * PAGE_SIZE)?;
            stats.zero_pages += (j - i) as u64;
        } else if j - i == 1 {
            ram.write_at(off, pages[i].data.expect("a data page"))?;
        } else {
            // Consecutive data pages that sit back to back in the batch go in one write.
            let first = pages[i].data.expect("a data run").as_ptr();
            // SAFETY: `adjacent` checked that each of pages i..j starts right where the previous
            // PAGE_SIZE slice ends, so the run is one contiguous range of the same live buffer.
            let run = unsafe { std::slice::from_raw_parts(first, (j - i) * PAGE_SIZE as usize) };
            ram.write_at(off, run)?;
        }
        stats.pages += (j - i) as u64;
        i = j;
    }
    Ok(())
}

fn verify(vm: &Vm, timeout: Duration) -> VerifyOutcome {
    let st = &vm.io().status;
    if st.report().ready_pages.is_none() {
        return VerifyOutcome {
            ok: false,
            detail: "not verifiable: the guest is not the livemig workload guest".into(),
            cpu_seconds: 0.0,
        };
    }
    let before = st.report().verify_count;
    st.request_verify();
    match st
        .wait_for(timeout, |r| r.verify_count > before)
        .and_then(|r| r.last_verify)
    {
        Some(vmm::devices::VerifyResult::Ok { pages }) => VerifyOutcome {
            ok: true,
            detail: format!("VERIFY OK pages={pages}"),
            cpu_seconds: 0.0,
        },
        Some(vmm::devices::VerifyResult::Bad { first_bad_addr }) => VerifyOutcome {
            ok: false,
            detail: format!("VERIFY FAIL first bad address {first_bad_addr:#x}"),
            cpu_seconds: 0.0,
        },
        None => VerifyOutcome {
            ok: false,
            detail: format!("no verify result within {timeout:?} (not our workload guest?)"),
            cpu_seconds: 0.0,
        },
    }
}
