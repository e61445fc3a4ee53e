//! The source side: prepare, copy, sync rounds, switchover, cleanup.
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use transport::Connection;
use vmm::memory::{data_extents, GuestRam, PAGE_SIZE};
use vmm::Vm;

use crate::codec::{self, Choice, Codec, CodecPolicy};
use crate::policy::{ConvergencePolicy, Decision};
use crate::protocol::{
    self, FrameReader, FrameWriter, Hello, Kind, PageBatch, Transport, MAX_BATCH_PAGES,
};
use crate::report::{CompressionReport, CpuSeconds, PageCounts, Report, Round};
use crate::{thread_cpu_seconds, MigrationError, Sampler, VerifyOutcome, Wire};

#[derive(Clone, Debug)]
pub struct MigrateOptions {
    pub to: String,
    pub policy: ConvergencePolicy,
    pub connect_timeout: Duration,
    /// How long to wait for the destination at each handshake step and for its confirmation.
    pub peer_timeout: Duration,
    /// Cap on what the migration sends, in bits/s, across all its streams.
    pub max_bandwidth: Option<u64>,
    pub transport: Transport,
    /// Page streams beside the control connection (0: pages go on the control connection).
    pub channels: u16,
    /// Per page stream, the local address to leave from and the remote host to reach (the
    /// port is `to`'s): one NIC pair each. Overrides `channels` when set.
    pub network: Vec<(std::net::IpAddr, String)>,
}

impl MigrateOptions {
    pub fn new(to: impl Into<String>) -> Self {
        MigrateOptions {
            to: to.into(),
            policy: ConvergencePolicy::default(),
            connect_timeout: Duration::from_secs(10),
            peer_timeout: Duration::from_secs(120),
            max_bandwidth: None,
            transport: Transport::Tcp,
            channels: 0,
            network: Vec::new(),
        }
    }
}

/// Where a running migration is; for progress bars.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub phase: String,
    pub round: u32,
    pub bytes_on_wire: u64,
    pub pages_sent: u64,
    pub ram_bytes: u64,
    pub last_round_pages: u64,
}

type Writer<'a> =
    FrameWriter<&'a mut std::io::BufWriter<transport::CountingWriter<std::net::TcpStream>>>;

/// Longest wait for a round to be delivered; past it the migration goes on (a dead peer
/// shows up as a failed write or read, not here).
const DELIVERY_WAIT: Duration = Duration::from_secs(10);
/// A round must move at least this much to update the measured throughput.
const MIN_RATE_SAMPLE: u64 = 1 << 20;

struct Sender<'a> {
    out: Writer<'a>,
    ram: &'a GuestRam,
    batch: PageBatch,
    /// Copies of the batch's non-zero pages: the guest keeps writing, so the bytes we checksum
    /// must be the bytes we send. A page torn by a concurrent write is dirty again and goes out
    /// in the next round.
    data: Vec<u8>,
    pages: PageCounts,
    compressor: Option<Compressor>,
    /// Page streams; empty = pages go on the control connection.
    channels: Vec<Channel>,
    /// CPU seconds the page stream threads used.
    stream_cpu: f64,
    /// Direct transport: zero-copy sends on the control connection, and the data pages of
    /// the batch being built (memfd offsets; sent from guest RAM as they are).
    direct: Option<transport::ZeroCopy>,
    direct_pages: Vec<u64>,
    direct_mode: bool,
    ram_arc: Arc<GuestRam>,
    /// The control connection's socket, to see what it has not delivered yet.
    control: transport::ShutdownHandle,
    link_meter: Option<LinkMeter>,
}

/// What the link delivered since the last sample (compressed transport only).
struct LinkMeter {
    wire: crate::Wire,
    since: Instant,
    delivered: u64,
    /// The least data that waited for the link at any check in the window.
    min_backlog: usize,
}

/// The link is measured over windows this long.
const LINK_WINDOW: Duration = Duration::from_millis(20);
/// Data always waiting in the sockets at least this much means the link set the pace.
const SATURATED_BACKLOG: usize = 128 << 10;

enum ChannelMsg {
    Frame(Kind, Vec<Vec<u8>>),
    /// A PagesDirect batch: its head and the memfd offsets of its data pages.
    Direct(Vec<u8>, Vec<u64>),
    RoundEnd([u8; 12]),
    Done,
}

/// One page stream: a thread writing frames from its own queue to its own connection.
struct Channel {
    tx: Option<std::sync::mpsc::SyncSender<ChannelMsg>>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<std::io::Result<f64>>>,
    shutdown: transport::ShutdownHandle,
}

impl Channel {
    fn start(
        index: usize,
        conn: Connection,
        direct: Option<Arc<GuestRam>>,
    ) -> std::io::Result<Self> {
        let mut zc = match direct {
            Some(_) => Some(transport::ZeroCopy::new(&conn)?),
            None => None,
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<ChannelMsg>(4);
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let q = queued.clone();
        let shutdown = conn.shutdown_handle()?;
        let thread = std::thread::Builder::new()
            .name(format!("stream{index}"))
            .spawn(move || {
                // The whole connection lives here: the zero-copy sender uses its socket's fd
                // (a closure would otherwise capture only the writer and drop the rest).
                let mut conn = conn;
                let cpu0 = thread_cpu_seconds();
                let mut out = FrameWriter::new(&mut conn.writer);
                for msg in rx {
                    match msg {
                        ChannelMsg::Frame(kind, parts) => {
                            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
                            out.send_parts(kind, &refs)?;
                            q.fetch_sub(parts.iter().map(|p| p.len()).sum(), Ordering::Relaxed);
                        }
                        ChannelMsg::Direct(head, pages) => {
                            let ram = direct
                                .as_ref()
                                .expect("direct batches only on direct streams");
                            let zc = zc.as_mut().expect("direct batches only on direct streams");
                            send_direct(&mut out, zc, ram, &head, &pages)?;
                            q.fetch_sub(pages.len() * PAGE_SIZE as usize, Ordering::Relaxed);
                        }
                        ChannelMsg::RoundEnd(p) => {
                            out.send(Kind::RoundEnd, &p)?;
                            out.flush()?;
                            q.fetch_sub(1, Ordering::Relaxed);
                        }
                        ChannelMsg::Done => {
                            out.send(Kind::Done, &[])?;
                            out.flush()?;
                            if let Some(z) = zc.as_mut() {
                                z.finish()?;
                            }
                            break;
                        }
                    }
                }
                Ok(thread_cpu_seconds() - cpu0)
            })?;
        Ok(Channel {
            tx: Some(tx),
            queued,
            thread: Some(thread),
            shutdown,
        })
    }

    fn send(&self, msg: ChannelMsg) -> std::io::Result<()> {
        self.tx
            .as_ref()
            .ok_or_else(|| std::io::Error::other("page stream closed"))?
            .send(msg)
            .map_err(|_| std::io::Error::other("a page stream failed"))
    }

    /// The reason a stream failed, from its thread (for the error the user sees).
    fn failure(&mut self) -> std::io::Error {
        match self.join() {
            Err(e) => std::io::Error::other(format!("a page stream failed: {e}")),
            Ok(_) => std::io::Error::other("a page stream stopped early"),
        }
    }

    /// Waits for the stream's thread: the CPU seconds it used, or its error.
    fn join(&mut self) -> std::io::Result<f64> {
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("a page stream thread panicked")),
            None => Ok(0.0),
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // On failure the thread may be blocked writing to a dead peer: unblock it.
        if self.thread.is_some() {
            self.shutdown.shutdown();
            let _ = self.join();
        }
    }
}

/// One PagesDirect frame: header and head through the writer, page data zero-copy from RAM.
fn send_direct<W: std::io::Write>(
    out: &mut FrameWriter<W>,
    zc: &mut transport::ZeroCopy,
    ram: &GuestRam,
    head: &[u8],
    pages: &[u64],
) -> std::io::Result<()> {
    out.send_direct_head(head, pages.len() * PAGE_SIZE as usize)?;
    out.flush()?;
    let slices: Vec<&[u8]> = pages
        .iter()
        .map(|&o| {
            ram.slice_at(o, PAGE_SIZE as usize)
                .expect("queued pages are inside guest RAM")
        })
        .collect();
    zc.send_all(&slices)
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to splits at alignment boundaries.
    let (pre, words, post) = unsafe { page.align_to::<u64>() };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// A batch on its way through a compression worker.
struct Job {
    head: Vec<u8>,
    data: Vec<u8>,
    out: Vec<u8>,
    choice: Choice,
    secs: f64,
}

/// Compression workers, pipelined with sending: the main thread copies pages and writes
/// frames while workers compress the batches in flight.
struct Compressor {
    policy: CodecPolicy,
    jobs: Option<std::sync::mpsc::SyncSender<Job>>,
    done: std::sync::mpsc::Receiver<Job>,
    workers: Vec<std::thread::JoinHandle<f64>>,
    in_flight: usize,
    max_in_flight: usize,
    stats: CompressionReport,
}

impl Compressor {
    /// `cap`: the migration's bandwidth cap in bits/s, if any.
    fn start(cap: Option<u64>) -> std::io::Result<Self> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (jtx, jrx) = std::sync::mpsc::sync_channel::<Job>(2 * n);
        let (dtx, drx) = std::sync::mpsc::channel::<Job>();
        let jrx = Arc::new(Mutex::new(jrx));
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (jrx, dtx) = (jrx.clone(), dtx.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("compress{i}"))
                    .spawn(move || {
                        let cpu0 = thread_cpu_seconds();
                        loop {
                            let job = jrx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                            let Ok(mut job) = job else { break };
                            if let Choice::Compress(c) = job.choice {
                                let t = Instant::now();
                                if codec::compress(c, &job.data, &mut job.out).is_err() {
                                    job.choice = Choice::Raw;
                                }
                                job.secs = t.elapsed().as_secs_f64();
                            }
                            if dtx.send(job).is_err() {
                                break;
                            }
                        }
                        thread_cpu_seconds() - cpu0
                    })?,
            );
        }
        Ok(Compressor {
            policy: CodecPolicy::new(n).with_cap(cap.map(|bps| bps as f64 / 8.0)),
            jobs: Some(jtx),
            done: drx,
            workers,
            in_flight: 0,
            max_in_flight: 2 * n,
            stats: CompressionReport::default(),
        })
    }

    /// Stops the workers; returns their CPU seconds.
    fn finish(&mut self) -> f64 {
        self.jobs = None;
        self.workers.drain(..).filter_map(|w| w.join().ok()).sum()
    }
}

impl Drop for Compressor {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Sender<'_> {
    /// Sends a page frame: on the control connection, or on the least loaded page stream.
    fn emit(&mut self, kind: Kind, parts: Vec<Vec<u8>>) -> std::io::Result<()> {
        if self.channels.is_empty() {
            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            return self.out.send_parts(kind, &refs);
        }
        let ch = self
            .channels
            .iter()
            .min_by_key(|c| c.queued.load(Ordering::Relaxed))
            .expect("channels is not empty");
        ch.queued
            .fetch_add(parts.iter().map(|p| p.len()).sum(), Ordering::Relaxed);
        ch.send(ChannelMsg::Frame(kind, parts))
    }

    /// Queues one page (memfd offset); sends a batch frame when full.
    fn page(&mut self, off: u64) -> std::io::Result<()> {
        let src = self
            .ram
            .slice_at(off, PAGE_SIZE as usize)
            .expect("dirty and touched pages are inside guest RAM");
        if self.direct_mode {
            // No copy: the page goes from guest RAM to the socket when the batch is sent.
            let zero = is_zero(src);
            if zero {
                self.pages.zero += 1;
            } else {
                self.direct_pages.push(off);
            }
            self.batch.push(off, zero);
            if self.batch.len() == MAX_BATCH_PAGES {
                self.flush_batch()?;
            }
            return Ok(());
        }
        let start = self.data.len();
        self.data.extend_from_slice(src);
        let zero = is_zero(&self.data[start..]);
        if zero {
            self.data.truncate(start);
            self.pages.zero += 1;
        }
        self.batch.push(off, zero);
        if self.batch.len() == MAX_BATCH_PAGES {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> std::io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let head = self.batch.head();
        self.batch.clear();
        if self.direct_mode {
            let pages = std::mem::take(&mut self.direct_pages);
            self.pages.normal += pages.len() as u64;
            if self.channels.is_empty() {
                let zc = self
                    .direct
                    .as_mut()
                    .expect("direct mode has a zero-copy sender");
                return send_direct(&mut self.out, zc, &self.ram_arc, &head, &pages);
            }
            let ch = self
                .channels
                .iter_mut()
                .min_by_key(|c| c.queued.load(Ordering::Relaxed))
                .expect("channels is not empty");
            ch.queued
                .fetch_add(pages.len() * PAGE_SIZE as usize, Ordering::Relaxed);
            return ch
                .send(ChannelMsg::Direct(head, pages))
                .map_err(|_| ch.failure());
        }
        let Some(c) = self.compressor.as_mut() else {
            self.pages.normal += (self.data.len() / PAGE_SIZE as usize) as u64;
            if self.channels.is_empty() {
                self.out.send_parts(Kind::Pages, &[&head, &self.data])?;
                self.data.clear();
            } else {
                let data = std::mem::replace(
                    &mut self.data,
                    Vec::with_capacity(MAX_BATCH_PAGES * PAGE_SIZE as usize),
                );
                self.emit(Kind::Pages, vec![head, data])?;
            }
            return Ok(());
        };
        let choice = c.policy.choose();
        let data = std::mem::replace(
            &mut self.data,
            Vec::with_capacity(MAX_BATCH_PAGES * PAGE_SIZE as usize),
        );
        if choice == Choice::Raw {
            // Raw batches skip the workers: no hand-off, no wait.
            c.stats.batches_raw += 1;
            self.pages.normal += (data.len() / PAGE_SIZE as usize) as u64;
            self.emit(Kind::Pages, vec![head, data])?;
            self.meter_link()?;
            return self.drain(false);
        }
        let job = Job {
            head,
            data,
            out: Vec::new(),
            choice,
            secs: 0.0,
        };
        let jobs = c
            .jobs
            .as_ref()
            .ok_or_else(|| std::io::Error::other("compression stopped"))?;
        jobs.send(job)
            .map_err(|_| std::io::Error::other("compression workers are gone"))?;
        c.in_flight += 1;
        self.drain(false)
    }

    /// Writes finished batches; with `all`, waits for every batch in flight.
    fn drain(&mut self, all: bool) -> std::io::Result<()> {
        loop {
            let Some(c) = self.compressor.as_mut() else {
                return Ok(());
            };
            if c.in_flight == 0 {
                return Ok(());
            }
            let job = if all || c.in_flight >= c.max_in_flight {
                c.done
                    .recv()
                    .map_err(|_| std::io::Error::other("compression workers are gone"))?
            } else {
                match c.done.try_recv() {
                    Ok(j) => j,
                    Err(_) => return Ok(()),
                }
            };
            c.in_flight -= 1;
            let pages = (job.data.len() / PAGE_SIZE as usize) as u64;
            let raw = job.data.len();
            let (kind, parts) = match job.choice {
                Choice::Compress(codec) => {
                    c.policy.record_codec(codec, raw, job.out.len(), job.secs);
                    // Worth sending compressed only if it saved something real.
                    if job.out.len() < raw - raw / 16 {
                        let mut hdr = vec![0u8; 8];
                        hdr[0] = codec as u8;
                        hdr[4..8].copy_from_slice(&(raw as u32).to_le_bytes());
                        self.pages.compressed += pages;
                        c.stats.raw_bytes += raw as u64;
                        c.stats.compressed_bytes += job.out.len() as u64;
                        match codec {
                            Codec::Lz4 => c.stats.batches_lz4 += 1,
                            Codec::Zstd => c.stats.batches_zstd += 1,
                        }
                        (Kind::PagesCompressed, vec![hdr, job.head, job.out])
                    } else {
                        self.pages.raw_fallback += pages;
                        c.stats.batches_raw += 1;
                        (Kind::Pages, vec![job.head, job.data])
                    }
                }
                Choice::Raw => {
                    self.pages.normal += pages;
                    c.stats.batches_raw += 1;
                    (Kind::Pages, vec![job.head, job.data])
                }
            };
            self.emit(kind, parts)?;
            self.meter_link()?;
        }
    }

    fn round_end(&mut self, round: u32, pages: u64) -> std::io::Result<()> {
        self.flush_batch()?;
        self.drain(true)?;
        let mut p = [0u8; 12];
        p[..4].copy_from_slice(&round.to_le_bytes());
        p[4..].copy_from_slice(&pages.to_le_bytes());
        for ch in &mut self.channels {
            // Counted as queued until the stream has flushed it (see wait_delivered).
            ch.queued.fetch_add(1, Ordering::Relaxed);
            if ch.send(ChannelMsg::RoundEnd(p)).is_err() {
                return Err(ch.failure());
            }
        }
        self.out.send(Kind::RoundEnd, &p)?;
        self.out.flush()
    }

    /// Feeds the codec policy the link's rate: what the peer acknowledged per unit of time,
    /// and whether data waited for the link throughout (then the rate is the link's own).
    fn meter_link(&mut self) -> std::io::Result<()> {
        let Some(m) = self.link_meter.as_mut() else {
            return Ok(());
        };
        if self.channels.is_empty() {
            // Bytes in our BufWriter are not the kernel's yet; the meter needs them there.
            self.out.flush()?;
        }
        let mut in_socket = self.control.unacked()?;
        let mut waiting = 0;
        for ch in &self.channels {
            in_socket += ch.shutdown.unacked()?;
            waiting += ch.queued.load(Ordering::Relaxed);
        }
        let delivered = m.wire.sent().saturating_sub(in_socket as u64);
        m.min_backlog = m.min_backlog.min(in_socket + waiting);
        let dt = m.since.elapsed();
        if dt < LINK_WINDOW {
            return Ok(());
        }
        let rate = delivered.saturating_sub(m.delivered) as f64 / dt.as_secs_f64();
        let saturated = m.min_backlog >= SATURATED_BACKLOG;
        m.since = Instant::now();
        m.delivered = delivered;
        m.min_backlog = usize::MAX;
        if let Some(c) = self.compressor.as_mut() {
            c.policy.record_link(rate, saturated);
        }
        Ok(())
    }

    /// Waits until every stream has handed all it was given to the kernel and the peer has
    /// acknowledged it (or `timeout` passed). A round then ends when the destination has it,
    /// so its time is the link's, and nothing queued (socket buffers, a shaper's queue) is
    /// left to cross the link after the pause, inside the downtime.
    fn wait_delivered(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.out.flush()?;
        let t = Instant::now();
        loop {
            let mut pending = self.control.unacked()?;
            for ch in &self.channels {
                pending += ch.queued.load(Ordering::Relaxed) + ch.shutdown.unacked()?;
            }
            if pending == 0 || t.elapsed() >= timeout {
                return Ok(());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Ends every page stream and waits until each has written all it was given.
    fn finish_channels(&mut self) -> std::io::Result<()> {
        for ch in &mut self.channels {
            if ch.send(ChannelMsg::Done).is_err() {
                return Err(ch.failure());
            }
        }
        for ch in &mut self.channels {
            self.stream_cpu += ch.join()?;
        }
        // From here pages go on the control connection.
        self.channels.clear();
        Ok(())
    }
}

/// Undoes what a failed migration changed on the source: dirty logging off, VM running again.
struct SourceGuard<'a> {
    vm: &'a Mutex<Vm>,
    paused_by_us: bool,
    armed: bool,
}

impl Drop for SourceGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut g = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        g.set_throttle(0);
        let dirty = g.dirty_log();
        let _ = dirty.lock().unwrap_or_else(|e| e.into_inner()).disable();
        if self.paused_by_us {
            if let Err(e) = g.resume() {
                tracing::error!("resuming the source VM after a failed migration: {e}");
            }
        }
    }
}

/// Moves the VM behind `vm` to `opts.to`. On success the source VM is destroyed; on any
/// failure before the destination holds everything it keeps running here.
pub fn migrate(
    vm: &Arc<Mutex<Vm>>,
    opts: &MigrateOptions,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Report, MigrationError> {
    let t0 = Instant::now();
    let cpu0 = thread_cpu_seconds();
    let (config, ram, dirty) = {
        let mut g = vm.lock().unwrap_or_else(|e| e.into_inner());
        if g.poll() != vmm::RunState::Running {
            return Err(MigrationError::SourceNotRunning(g.poll().to_string()));
        }
        (g.config().clone(), g.ram_arc(), g.dirty_log())
    };
    let mut report = Report {
        transport: opts.transport.name().into(),
        destination: opts.to.clone(),
        memory_bytes: config.memory,
        ..Default::default()
    };
    let mut prog = Progress {
        phase: "prepare".into(),
        ram_bytes: config.memory,
        ..Default::default()
    };
    progress(&prog);

    let mut conn: Connection = transport::connect(&opts.to, opts.connect_timeout)?;
    conn.set_read_timeout(Some(opts.peer_timeout))?;
    let limit = opts
        .max_bandwidth
        .map(|b| Arc::new(transport::RateLimit::new(b)));
    conn.set_rate_limit(limit.clone());
    report.max_bandwidth_gbps = opts.max_bandwidth.map(|b| b as f64 / 1e9);
    let hello = Hello {
        version: protocol::VERSION,
        transport: opts.transport,
        capabilities: 0,
    };
    protocol::write_hello(&mut conn.writer, &hello)?;
    protocol::read_hello_reply(&mut conn.reader, &hello)?;

    // The page streams: one per NIC pair with --network, else --channels to the same address.
    let port = opts
        .to
        .rsplit_once(':')
        .map(|(_, p)| p.to_string())
        .unwrap_or_default();
    let targets: Vec<(Option<std::net::IpAddr>, String)> = if opts.network.is_empty() {
        (0..opts.channels)
            .map(|_| (None, opts.to.clone()))
            .collect()
    } else {
        opts.network
            .iter()
            .map(|(l, r)| (Some(*l), format!("{r}:{port}")))
            .collect()
    };
    let streams = targets.len().min(protocol::MAX_STREAMS as usize) as u16;
    let session = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ (std::process::id() as u64) << 32;
    let prepare = protocol::Prepare {
        vm: config.clone(),
        streams,
        session,
    };
    {
        let mut out = FrameWriter::new(&mut conn.writer);
        out.send(Kind::Config, &serde_json::to_vec(&prepare)?)?;
        out.flush()?;
    }
    let mut wire = Wire(vec![conn.counters.clone()]);
    let mut channels = Vec::with_capacity(streams as usize);
    for (i, (local, remote)) in targets.iter().take(streams as usize).enumerate() {
        let mut c = match local {
            Some(l) => transport::connect_from(*l, remote, opts.connect_timeout)?,
            None => transport::connect(remote, opts.connect_timeout)?,
        };
        c.set_rate_limit(limit.clone());
        protocol::write_data_hello(&mut c.writer, i as u16, session)?;
        wire.0.push(c.counters.clone());
        let direct = (opts.transport == Transport::Direct).then(|| ram.clone());
        channels.push(Channel::start(i, c, direct)?);
    }
    let control_zc = match opts.transport {
        Transport::Direct => Some(transport::ZeroCopy::new(&conn)?),
        _ => None,
    };
    let sampler = Sampler::start(wire.clone(), Duration::from_millis(100));
    let control = conn.shutdown_handle()?;
    let mut input = FrameReader::new(&mut conn.reader);
    let mut sender = Sender {
        out: FrameWriter::with_seq(&mut conn.writer, 1),
        ram: &ram,
        batch: PageBatch::default(),
        data: Vec::with_capacity(MAX_BATCH_PAGES * PAGE_SIZE as usize),
        pages: PageCounts::default(),
        compressor: match opts.transport {
            Transport::Compressed => Some(Compressor::start(opts.max_bandwidth)?),
            Transport::Tcp | Transport::Direct => None,
        },
        channels,
        stream_cpu: 0.0,
        direct: control_zc,
        direct_pages: Vec::new(),
        direct_mode: opts.transport == Transport::Direct,
        ram_arc: ram.clone(),
        control,
        link_meter: (opts.transport == Transport::Compressed).then(|| LinkMeter {
            wire: wire.clone(),
            since: Instant::now(),
            delivered: 0,
            min_backlog: usize::MAX,
        }),
    };

    // 1. Prepare: the destination builds the VM.
    match input.recv()? {
        (Kind::Ready, _) => {}
        (k, _) => {
            return Err(protocol::ProtocolError::Unexpected {
                kind: k,
                state: "waiting for Ready",
            }
            .into())
        }
    }
    report.phases.prepare_ms = t0.elapsed().as_millis() as u64;

    let mut guard = SourceGuard {
        vm,
        paused_by_us: false,
        armed: true,
    };
    let manual = {
        let mut d = dirty.lock().unwrap_or_else(|e| e.into_inner());
        d.enable()?;
        d.manual_protect()
    };
    report.dirty_log = if manual {
        "manual-protect"
    } else {
        "get-and-clear"
    }
    .into();

    // 2. Copy: every page the guest (or we, before boot) ever touched; holes are never read.
    prog.phase = "copy".into();
    progress(&prog);
    let t_copy = Instant::now();
    let wire0 = wire.sent();
    let mut copied = 0u64;
    for (s, e) in data_extents(ram.backing_file(), ram.size)? {
        let mut off = s;
        while off < e {
            sender.page(off)?;
            copied += 1;
            off += PAGE_SIZE;
            if copied.is_multiple_of(16384) {
                prog.pages_sent = copied;
                prog.bytes_on_wire = wire.sent();
                progress(&prog);
            }
        }
    }
    sender.round_end(0, copied)?;
    sender.wait_delivered(DELIVERY_WAIT)?;
    let copy_ms = t_copy.elapsed();
    let copy_bytes = wire.sent() - wire0;
    report.rounds.push(Round {
        pages: copied,
        bytes: copy_bytes,
        ms: copy_ms.as_millis() as u64,
    });
    report.phases.copy_ms = copy_ms.as_millis() as u64;
    let mut bw = copy_bytes as f64 / copy_ms.as_secs_f64().max(1e-6);

    // 3. Sync rounds from the dirty log until the rest fits the downtime target.
    prog.phase = "sync".into();
    let t_sync = Instant::now();
    let mut history: Vec<u64> = Vec::new();
    let mut round = 0u32;
    let mut throttle = 0u8;
    let mut throttled_since = 0usize;
    let decision = loop {
        let bitmaps = dirty.lock().unwrap_or_else(|e| e.into_inner()).fetch()?;
        let dirty_pages: u64 = bitmaps.iter().map(|b| b.count()).sum();
        // Bytes per dirty page on the wire, as measured (zero pages are cheap).
        let per_page = if copied > 0 {
            copy_bytes as f64 / copied as f64
        } else {
            PAGE_SIZE as f64
        };
        let d = opts.policy.decide(
            (dirty_pages as f64 * per_page) as u64,
            bw,
            &history,
            throttled_since,
            t0.elapsed(),
        );
        match d {
            Decision::Continue => {}
            Decision::Stalled => match opts.policy.next_throttle(throttle) {
                // Auto-converge: slow the guest down and keep iterating.
                Some(t) => {
                    throttle = t;
                    throttled_since = history.len();
                    vm.lock().unwrap_or_else(|e| e.into_inner()).set_throttle(t);
                    report.throttle_pct_max = t;
                    tracing::info!(
                        throttle = t,
                        round,
                        "rounds stopped shrinking: throttling the guest"
                    );
                }
                None => break d,
            },
            _ => break d,
        }
        round += 1;
        let t = Instant::now();
        let w0 = wire.sent();
        let d = dirty.lock().unwrap_or_else(|e| e.into_inner());
        for b in &bitmaps {
            d.clear(b)?;
        }
        drop(d);
        for b in &bitmaps {
            for off in b.pages() {
                sender.page(off)?;
            }
        }
        sender.round_end(round, dirty_pages)?;
        sender.wait_delivered(DELIVERY_WAIT)?;
        let ms = t.elapsed();
        let bytes = wire.sent() - w0;
        // Small rounds measure the round trip more than the link.
        if bytes >= MIN_RATE_SAMPLE {
            bw = bytes as f64 / ms.as_secs_f64().max(1e-6);
        }
        history.push(dirty_pages);
        report.rounds.push(Round {
            pages: dirty_pages,
            bytes,
            ms: ms.as_millis() as u64,
        });
        prog.round = round;
        prog.last_round_pages = dirty_pages;
        prog.bytes_on_wire = wire.sent();
        progress(&prog);
        if !manual && dirty_pages == 0 {
            break Decision::Converged;
        }
    };
    report.stop_reason = format!("{decision:?}").to_lowercase();
    report.phases.sync_ms = t_sync.elapsed().as_millis() as u64;

    // The page streams end before the pause: the paused last round is small and goes on the
    // control connection, so stream hand-offs stay out of the downtime.
    sender.finish_channels()?;

    // 4. Switchover: pause, last pages, device state; the destination confirms and resumes.
    prog.phase = "switchover".into();
    progress(&prog);
    let t_pause = Instant::now();
    let state = {
        let mut g = vm.lock().unwrap_or_else(|e| e.into_inner());
        g.pause()?;
        guard.paused_by_us = true;
        g.capture()?
    };
    let w0 = wire.sent();
    let bitmaps = dirty.lock().unwrap_or_else(|e| e.into_inner()).fetch()?;
    let last: u64 = bitmaps.iter().map(|b| b.count()).sum();
    for b in &bitmaps {
        for off in b.pages() {
            sender.page(off)?;
        }
    }
    sender.round_end(round + 1, last)?;
    if let Some(z) = sender.direct.as_mut() {
        z.finish()?;
    }
    sender.out.send(Kind::State, &state.to_bytes())?;
    sender.out.send(Kind::Done, &[])?;
    sender.out.flush()?;
    // From here the destination may hold everything: the source must not resume on its own.
    guard.armed = false;
    let confirmed = match input.recv() {
        Ok((Kind::Confirm, _)) => Ok(()),
        Ok((k, _)) => Err(MigrationError::OutcomeUnknown(format!(
            "{k:?} instead of Confirm"
        ))),
        Err(e) => Err(MigrationError::OutcomeUnknown(e.to_string())),
    };
    // On error the VM stays paused here: it may be running on the destination.
    confirmed?;
    let downtime = t_pause.elapsed();
    report.rounds.push(Round {
        pages: last,
        bytes: wire.sent() - w0,
        ms: downtime.as_millis() as u64,
    });
    report.downtime_ms = downtime.as_millis() as u64;
    report.phases.switchover_ms = downtime.as_millis() as u64;

    // 5. Destroy the VM on the source.
    let t_clean = Instant::now();
    {
        let mut g = vm.lock().unwrap_or_else(|e| e.into_inner());
        g.mark_migrated(&opts.to);
        g.shutdown();
    }
    report.phases.cleanup_ms = t_clean.elapsed().as_millis() as u64;
    report.total_ms = t0.elapsed().as_millis() as u64;
    // Samples cover the migration, not the wait for the guest's verdict.
    let (samples, peak) = sampler.finish();
    report.pages = sender.pages.clone();
    if let Some(c) = sender.compressor.as_mut() {
        let mut r = c.stats.clone();
        r.codec_cpu_seconds = c.finish();
        r.ratio = if r.raw_bytes > 0 {
            r.compressed_bytes as f64 / r.raw_bytes as f64
        } else {
            1.0
        };
        report.compression = Some(r);
    }
    let cpu_src = thread_cpu_seconds() - cpu0 + sender.stream_cpu;

    // The guest's own verdict, from the destination.
    prog.phase = "verify".into();
    progress(&prog);
    let verified: Option<VerifyOutcome> = match input.recv() {
        Ok((Kind::Verified, p)) => serde_json::from_slice(p).ok(),
        _ => None,
    };
    report.bytes_on_wire = wire.sent() + wire.received();
    report.avg_gbps = wire.sent() as f64 * 8.0 / 1e9 / (report.total_ms.max(1) as f64 / 1e3);
    report.peak_gbps = peak as f64 / 1e9;
    report.samples = samples;
    report.cpu_seconds = CpuSeconds {
        source: cpu_src,
        destination: verified.as_ref().map_or(0.0, |v| v.cpu_seconds),
    };
    report.guest_verified = verified.as_ref().is_some_and(|v| v.ok);
    report.guest_verify = verified.map(|v| v.detail);
    report.status = "completed".into();
    Ok(report)
}
