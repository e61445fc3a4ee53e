//! The source side, in the phases operators know: prepare (the destination builds the VM),
//! copy (all RAM the guest ever touched), sync (rounds from the dirty log until the rest fits
//! the downtime), switchover (pause, last pages, device state, the destination's
//! confirmation), cleanup (the VM is destroyed here). On any failure before the confirmation
//! the VM keeps running here.
mod cancel;
mod compress;
mod dedup;
mod delta_cache;
mod disks;
mod link;
mod page_set;
mod pages;
mod postcopy;
mod resume;
mod streams;
mod watchdog;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migratable::{DirtyBitmap, DirtyLog, Migratable, RunState, VmConfig};
use ram::{data_extents, GuestRam, PAGE_SIZE};
use transport::{Connection, RateLimit, Security};

use crate::policy::{self, ConvergencePolicy, Decision};
use crate::postcopy::PageBits;
use crate::protocol::{self, Frame, FrameReader, FrameWriter, Hello, Kind, RoundEnd, Transport};
use crate::report::{self, CpuSeconds, Report, Round, Verification};
use crate::{thread_cpu_seconds, MigrationError, Sampler, Wire};
pub use cancel::{Cancel, TOO_LATE};
use compress::Compressor;
use link::{Link, Reader};
use pages::{LinkMeter, PagePath, PageSender};
pub use resume::Resume;
use streams::Streams;
use watchdog::Watchdog;

#[derive(Clone, Debug)]
pub struct MigrateOptions {
    pub to: String,
    pub policy: ConvergencePolicy,
    pub connect_timeout: Duration,
    /// The deadline on progress: a destination that neither acknowledges nor answers for this
    /// long, in any phase and on any stream, fails the migration.
    pub peer_timeout: Duration,
    /// How long the destination's guest may take to verify its memory after resuming.
    pub verify_timeout: Duration,
    /// Mutual TLS or plain TCP; None, the default, means mutual TLS with credentials not given
    /// yet, and the migration refuses to start.
    pub security: Option<Security>,
    /// Stops the migration from another thread.
    pub cancel: Cancel,
    /// The pace, when the caller wants to change it while the migration runs (a drain sharing
    /// one budget); otherwise made from `max_bandwidth`.
    pub limit: Option<Arc<RateLimit>>,
    /// While set, the compressed transport sends its batches raw: a drain whose hosts' CPU,
    /// not the link, holds it back has it spend no CPU on compression.
    pub hold_raw: Arc<std::sync::atomic::AtomicBool>,
    /// The VM's name and its host, for the destination's agent.
    pub name: Option<String>,
    pub origin: Option<String>,
    /// The VM's generation in the cluster, when it is in one.
    pub generation: Option<u64>,
    /// The migration's session id (random if not given): a drain picks it, to ask the
    /// destination about this migration later.
    pub session: Option<u64>,
    /// Cap on what the migration sends, in bits/s, across all its streams.
    pub max_bandwidth: Option<u64>,
    pub transport: Transport,
    /// Page streams beside the control connection (0: pages go on the control connection).
    pub channels: u16,
    /// Per page stream, the local address to leave from and the remote host to reach (the
    /// port is `to`'s): one NIC pair each. Overrides `channels` when set.
    pub network: Vec<(std::net::IpAddr, String)>,
    /// Re-sent pages go as deltas against what the destination holds (tcp and compressed).
    pub delta: bool,
    /// Bytes of last-sent pages kept for deltas; None: twice the hot set, within bounds.
    pub delta_cache: Option<u64>,
    /// A page whose content the destination holds already goes as a reference (tcp and
    /// compressed).
    pub dedup: bool,
    /// The destination host's page cache to use and fill (a drain's id for it), with dedup.
    pub host_cache: Option<u64>,
    /// The guest's vCPUs yield the CPU to the migration's threads until the pause
    /// ([`policy::VCPU_YIELD_NICE`]).
    pub vcpu_yield: bool,
    /// Whether the disks stay where both hosts reach them or move with the VM.
    pub storage: crate::Storage,
    /// With `--storage copy`: remove the source's images once the VM runs on the copies.
    pub remove_source: bool,
    /// How copied disks keep up with the guest's writes; None: the policy chooses
    /// ([`policy::disk_sync`]).
    pub disk_sync: Option<migratable::DiskSync>,
    /// Whether and when the VM may move to the destination before all its memory is there.
    pub postcopy: policy::PostcopyMode,
    /// Makes a paused post-copy try again from another thread (`migrate --resume`).
    pub resume: Resume,
}

impl MigrateOptions {
    pub fn new(to: impl Into<String>) -> Self {
        MigrateOptions {
            to: to.into(),
            policy: ConvergencePolicy::default(),
            connect_timeout: Duration::from_secs(10),
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            verify_timeout: Duration::from_secs(60),
            security: None,
            cancel: Cancel::default(),
            limit: None,
            hold_raw: Arc::default(),
            name: None,
            origin: None,
            generation: None,
            session: None,
            max_bandwidth: None,
            transport: Transport::Tcp,
            channels: 0,
            network: Vec::new(),
            delta: true,
            delta_cache: None,
            dedup: true,
            host_cache: None,
            vcpu_yield: true,
            storage: crate::Storage::Shared,
            remove_source: false,
            disk_sync: None,
            postcopy: policy::PostcopyMode::Auto,
            resume: Resume::default(),
        }
    }

    /// How the connections are protected; an error when no credentials were given.
    fn security(&self) -> Result<&Security, MigrationError> {
        self.security
            .as_ref()
            .ok_or_else(|| MigrationError::Refused(crate::request::NO_CREDENTIALS.into()))
    }

    /// Whether pages may go as references (not on the direct path, which copies nothing).
    fn dedups(&self) -> bool {
        self.dedup && self.transport != Transport::Direct
    }

    /// Where each page stream connects from (None: the default route) and to, when the
    /// control connection goes to `to`.
    fn stream_targets(&self, to: &str) -> Vec<(Option<std::net::IpAddr>, String)> {
        let port = to.rsplit_once(':').map_or("", |(_, p)| p);
        let targets: Vec<_> = if self.network.is_empty() {
            (0..self.channels).map(|_| (None, to.to_string())).collect()
        } else {
            self.network
                .iter()
                .map(|(l, r)| (Some(*l), format!("{r}:{port}")))
                .collect()
        };
        targets
            .into_iter()
            .take(protocol::MAX_STREAMS as usize)
            .collect()
    }
}

/// Where a running migration is; for progress bars. Once it has ended, `phase` says how
/// (`completed`, `cancelled`, `failed`, `busy`, `unknown` for a lost switchover or `lost` for
/// a VM lost in post-copy) and `error` why.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub phase: String,
    pub round: u32,
    pub bytes_on_wire: u64,
    pub pages_sent: u64,
    pub ram_bytes: u64,
    pub last_round_pages: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Progress {
    /// The last progress of a migration that ended with `result`, saying how it ended.
    pub fn ended(last: Progress, result: &Result<Report, MigrationError>) -> Progress {
        let (phase, error) = match result {
            Ok(r) => (r.status.clone(), None),
            Err(e) => {
                let phase = match e {
                    MigrationError::Cancelled(_) => "cancelled",
                    MigrationError::Busy { .. } => "busy",
                    MigrationError::OutcomeUnknown(_) => "unknown",
                    MigrationError::VmLost(_) => "lost",
                    _ => "failed",
                };
                (phase.to_string(), Some(e.to_string()))
            }
        };
        Progress {
            phase,
            error,
            ..last
        }
    }

    /// Whether the migration has ended (see [`Self::ended`]).
    pub fn is_over(&self) -> bool {
        matches!(
            self.phase.as_str(),
            "completed" | "cancelled" | "failed" | "busy" | "unknown" | "lost"
        )
    }
}

/// `--peer-timeout`'s default.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// A round must move at least this much to update the measured throughput.
const MIN_RATE_SAMPLE: u64 = 1 << 20;
/// Progress is reported this often within a round (a drain measures throughput from it).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// The VM a migration moves: anything [`Migratable`], behind the lock its other users (an
/// API) share.
pub type SourceVm = Mutex<dyn Migratable>;

/// Moves the VM behind `vm` to `opts.to`. On success the source VM is destroyed; on any
/// failure before the destination holds everything it keeps running here.
pub fn migrate(
    vm: &SourceVm,
    opts: &MigrateOptions,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Report, MigrationError> {
    run(vm, opts, progress).map_err(|e| {
        // A cancel closes the sockets: whatever failed next, the cancel is why.
        if opts.cancel.requested() && !matches!(e, MigrationError::OutcomeUnknown(_)) {
            return opts.cancel.error();
        }
        e.on_control(&opts.to)
    })
}

fn run(
    vm: &SourceVm,
    opts: &MigrateOptions,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<Report, MigrationError> {
    let (t0, cpu0) = (Instant::now(), thread_cpu_seconds());
    opts.security()?;
    let source = Source::of(vm)?;
    let disks = match opts.storage {
        crate::Storage::Copy => Some(disks::DiskCopy::open(
            source.disks.clone(),
            opts.transport == Transport::Compressed,
        )?),
        crate::Storage::Shared => None,
    }
    .filter(|d| !d.is_empty());
    let limit = opts
        .limit
        .clone()
        .or_else(|| opts.max_bandwidth.map(|b| Arc::new(RateLimit::new(b))));
    let session = opts.session.unwrap_or_else(session_id);
    if let Some(l) = &limit {
        opts.cancel.watch_limit(l.clone());
    }
    // Dirty logging first: then one scan for touched memory serves the offer and the copy (a
    // page first written after it is in the dirty log).
    let mut guard = SourceGuard::arm(vm, &source.dirty)?;
    // From here the migration's threads (the scan's too) run ahead of the guest's vCPUs.
    let vcpu_yield = guard.yield_vcpus(opts.vcpu_yield);
    let offer = Offer {
        config: &source.config,
        sections: &source.sections,
        session,
        disks: disks
            .as_ref()
            .map(disks::DiskCopy::offers)
            .unwrap_or_default(),
    };
    let ((mut conn, mut streams, to, preamble), scanned) =
        open_while_scanning(opts, &offer, &limit, &source.ram, t0)?;
    // Post-copy's link came last.
    let link = if opts.postcopy.possible() {
        let n = streams
            .len()
            .saturating_sub(usize::from(protocol::LINK_CONNS));
        let conns: Option<[Connection; 3]> = streams.split_off(n).try_into().ok();
        conns.map(postcopy::Link::of)
    } else {
        None
    };
    let redial = Redial {
        streams: u16::try_from(opts.stream_targets(&to).len()).unwrap_or(u16::MAX),
        to: to.clone(),
        session,
        limit: limit.clone(),
    };
    let (extents, extents_ms) = (scanned.extents, scanned.ended_ms);
    let prepare_ms = t0.elapsed().as_millis() as u64;
    tracing::debug!(
        extents_ms,
        prepare_ms,
        "prepare at the source: extents found, destination ready"
    );
    let mut watched = Vec::new();
    for c in std::iter::once(&conn).chain(&streams) {
        let h = || {
            c.shutdown_handle()
                .map_err(MigrationError::socket("cloning a socket"))
        };
        opts.cancel.watch(h()?);
        watched.push(h()?);
    }
    opts.cancel.check()?;
    let watchdog = Watchdog::start(watched, limit.clone(), opts.peer_timeout)?;
    let phases = || {
        let writes = source.writes.clone();
        let mut s = Session::new(vm, opts, progress, source, &mut conn, streams, t0)?;
        s.writes = GuestRate::start(writes);
        s.disks = disks;
        s.report.phases.prepare_ms = prepare_ms;
        s.report.destination = to;
        s.preamble(preamble)?;
        s.report.dirty_log = guard.mode.into();
        s.report.vcpu_yield.clone_from(&vcpu_yield);
        s.sender.announce_extents(&extents)?;
        s.link = link;
        s.redial = Some(redial);
        s.copy_disks()?;
        let postcopy = if policy::switch_to_postcopy(s.postcopy, 0, Decision::Continue) {
            s.report.stop_reason = "postcopy".into();
            Some("--postcopy-after 0: no pre-copy".to_string())
        } else {
            s.copy(&extents)?;
            s.sync()?
        };
        match postcopy {
            Some(reason) => s.postcopy(&mut guard, &extents, reason, &watchdog)?,
            None => s.switchover(&mut guard)?,
        }
        // The guest's verify on the destination may take longer than the peer timeout.
        watchdog.disarm();
        s.cleanup();
        Ok(s.finish(cpu0))
    };
    phases().map_err(|e| match (e, watchdog.timed_out()) {
        // Past the point of no return the VM's state stays what the error says; the
        // watchdog only says why.
        (MigrationError::OutcomeUnknown(why), Some(t)) => {
            MigrationError::OutcomeUnknown(format!("{t}; {why}"))
        }
        (e @ MigrationError::OutcomeUnknown(_), None) => e,
        (_, Some(t)) => t,
        (e, None) => e,
    })
}

/// What the migration takes from the VM: its shape, its RAM and its dirty log.
struct Source {
    config: VmConfig,
    ram: Arc<GuestRam>,
    dirty: Arc<Mutex<dyn DirtyLog>>,
    sections: Vec<migratable::SectionId>,
    disks: Vec<migratable::DiskSource>,
    writes: Option<migratable::WritesProbe>,
}

impl Source {
    fn of(vm: &SourceVm) -> Result<Self, MigrationError> {
        let mut g = locks::lock(vm);
        match g.run_state() {
            RunState::Running => Ok(Source {
                config: g.config(),
                ram: g.ram(),
                dirty: g.dirty_log(),
                sections: g.sections(),
                disks: g.disks(),
                writes: g.guest_writes(),
            }),
            other => Err(MigrationError::SourceNotRunning(other.to_string())),
        }
    }
}

/// Phase 1 with the scan for touched memory beside it, on a thread of its own: the scan runs
/// while the destination builds the VM. (Scanning on into the copy, to start it on the first
/// slice, was slower where cores are short: the scan takes its CPU from the copy; see
/// docs/bench/choices.md.) Returns what [`open`] does, and what the scan found.
fn open_while_scanning(
    opts: &MigrateOptions,
    offer: &Offer<'_>,
    limit: &Option<Arc<RateLimit>>,
    ram: &GuestRam,
    t0: Instant,
) -> Result<(Opened, Scanned), MigrationError> {
    let (scanned, opened) = std::thread::scope(|sc| {
        let scan = sc.spawn(|| {
            let extents = data_extents(ram.backing_file(), ram.size());
            (extents, t0.elapsed().as_millis())
        });
        let opened = open(opts, offer, limit);
        let scanned = scan.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        (scanned, opened)
    });
    let opened = opened?;
    let extents = scanned.0.map_err(MigrationError::Extents)?;
    let ended_ms = scanned.1;
    Ok((opened, Scanned { extents, ended_ms }))
}

/// What the scan for touched memory found: the data extents, and when it ended (ms since the
/// migration began).
struct Scanned {
    extents: Vec<(u64, u64)>,
    ended_ms: u128,
}

/// Ties the page streams to this migration: random (std's hasher keys come from the OS),
/// so nobody can guess a migration's session to slip a stream into it.
pub fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// What the destination said before Ready: the keys of its host's cache (when the Config
/// named it), why it cannot take post-copy (when it cannot), and how many frames that was.
#[derive(Default)]
struct Preamble {
    keys: Option<Vec<u8>>,
    no_postcopy: Option<String>,
    frames: u32,
}

/// An opened migration: the control connection, the page streams, where they go (after any
/// redirect) and what the destination said before Ready.
type Opened = (Connection, Vec<Connection>, String, Preamble);

/// Phase 1, prepare: the control connection and the page streams, until the destination says
/// the VM is built (Ready), after the keys of its host's page cache if the Config named one.
/// A host agent may answer Redirect instead: its own receiver for this VM waits on another
/// port, and everything starts again there (once). Returns the connections, where they go and
/// the keys.
fn open(
    opts: &MigrateOptions,
    offer: &Offer<'_>,
    limit: &Option<Arc<RateLimit>>,
) -> Result<Opened, MigrationError> {
    let session = offer.session;
    let mut to = opts.to.clone();
    for attempt in 0..2 {
        let mut conn = connect(opts, &to, offer, limit)?;
        let streams = connect_streams(opts, &to, session, limit)?;
        // The Config went out as frame 0; the answer is the destination's frame 0.
        let mut input = FrameReader::new(&mut conn.reader);
        let mut pre = Preamble::default();
        let mut frame = input.next_frame()?;
        if let Frame::CacheKeys(k) = frame {
            if opts.host_cache.is_none() {
                return Err(protocol::ProtocolError::Unexpected {
                    kind: Kind::CacheKeys,
                    state: "awaiting-ready without a host cache",
                }
                .into());
            }
            pre.keys = Some(k.to_vec());
            pre.frames += 1;
            frame = input.next_frame()?;
        }
        if let Frame::NoPostcopy(why) = frame {
            pre.no_postcopy = Some(why);
            pre.frames += 1;
            frame = input.next_frame()?;
        }
        match frame {
            Frame::Ready => {
                pre.frames += 1;
                return Ok((conn, streams, to, pre));
            }
            Frame::Redirect(r) if attempt == 0 => {
                let host = to.rsplit_once(':').map_or(to.as_str(), |(h, _)| h);
                to = format!("{host}:{}", r.port);
                tracing::info!(%to, "the destination's agent redirected the migration");
            }
            f => {
                return Err(protocol::ProtocolError::Unexpected {
                    kind: f.kind(),
                    state: "awaiting-ready",
                }
                .into())
            }
        }
    }
    Err(protocol::ProtocolError::Malformed {
        kind: Kind::Redirect,
        why: "redirected twice".into(),
    }
    .into())
}

/// The guest's write rate as it counts it: over the seconds before the migration, and while
/// it ran during it (here until the pause, then on the destination until post-copy ended).
struct GuestRate {
    probe: migratable::WritesProbe,
    start: (Instant, migratable::GuestWrites),
    paused: Option<(Instant, u64)>,
}

/// The window the guest's rate before the migration is taken over.
const RATE_BEFORE: Duration = Duration::from_secs(2);

impl GuestRate {
    fn start(probe: Option<migratable::WritesProbe>) -> Option<Self> {
        let probe = probe?;
        let at = probe(RATE_BEFORE)?;
        Some(GuestRate {
            probe,
            start: (Instant::now(), at),
            paused: None,
        })
    }

    fn paused(&mut self) {
        self.paused = (self.probe)(RATE_BEFORE).map(|w| (Instant::now(), w.pages));
    }

    /// Before, during and their ratio, into the report (the destination's part of post-copy
    /// from its figures there).
    fn report_into(&self, r: &mut Report) {
        let Some((t, pages)) = self.paused else {
            return;
        };
        let (mut written, mut secs) = (
            pages.saturating_sub(self.start.1.pages) as f64,
            t.duration_since(self.start.0).as_secs_f64(),
        );
        // On the destination: its rate over its own reports (they come a heartbeat apart), or
        // what it wrote there over post-copy's time.
        if let Some(p) = &r.postcopy {
            let there = p.complete_ms as f64 / 1e3;
            let pages = p
                .guest_writes_per_s
                .map(|rate| rate * there)
                .or(p.guest_pages_written.map(|n| n as f64));
            if let Some(n) = pages {
                written += n;
                secs += there;
            }
        }
        let during = (secs > 0.0).then(|| written / secs);
        r.guest_writes_per_s_before = self.start.1.per_s;
        r.guest_writes_per_s_during = during;
        r.guest_rate_ratio = during
            .zip(self.start.1.per_s)
            .filter(|(_, b)| *b > 0.0)
            .map(|(d, b)| d / b);
    }
}

/// How long post-copy waits between two attempts to make its link again.
const RELINK_PAUSE: Duration = Duration::from_millis(200);

/// How often, and for how long in all, post-copy's link was made again.
#[derive(Default)]
struct Recovered {
    times: u32,
    ms: u64,
}

/// Whether `e` says nobody listens at the destination any more.
fn is_refused(e: &MigrationError) -> bool {
    matches!(e, MigrationError::Transport(transport::TransportError::Connect { source, .. })
        if source.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Pages per post-copy push batch (256 KiB): small, so an answer to an ask does not queue
/// behind much of the push at the link.
const PUSH_BATCH: usize = 64;

/// Pages between two looks for disk writes the mirror holds (64 KiB).
const MIRROR_EVERY: u64 = 16;

/// With deltas, the copy goes in chunks this large, spread over RAM.
const SPREAD_CHUNK: u64 = 2 << 20;

/// The copy looks at which pages the guest writes after this many pages (1 MiB), then after
/// twice as many each time up to every [`peek_every`] pages.
const FIRST_PEEK_PAGES: u64 = 256;

/// Pages between the copy's looks at the dirty log: 4 MiB, or 1/256 of guest RAM when that is
/// more (each look reads a bitmap of all of RAM).
fn peek_every(ram_bytes: u64) -> u64 {
    (ram_bytes / 256).max(4 << 20) / PAGE_SIZE
}

/// A round's page counts as it goes.
struct Counting {
    /// Pages put into batches.
    sent: u64,
    /// Pages looked at (deferred ones twice).
    seen: u64,
    next_peek: u64,
    /// Pages sent by earlier rounds, for progress.
    base: u64,
    told: Instant,
}

/// The delta cache for this migration: None with `--no-delta` or on the direct transport,
/// whose pages go from guest RAM to the socket untouched.
fn delta_cache(opts: &MigrateOptions, ram_bytes: u64) -> Option<delta_cache::DeltaCache> {
    crate::request::sends_deltas(opts.delta, opts.transport)
        .then(|| delta_cache::DeltaCache::new(ram_bytes, opts.delta_cache))
}

/// What Prepare says of the VM: its shape and the session.
struct Offer<'a> {
    config: &'a VmConfig,
    sections: &'a [migratable::SectionId],
    session: u64,
    disks: Vec<protocol::DiskOffer>,
}

/// The control connection: connected, paced, handshake done and the VM's shape sent.
fn connect(
    opts: &MigrateOptions,
    to: &str,
    offer: &Offer<'_>,
    limit: &Option<Arc<RateLimit>>,
) -> Result<Connection, MigrationError> {
    let mut conn = transport::connect(to, opts.connect_timeout, opts.security()?)?;
    conn.set_peer_timeout(Some(opts.peer_timeout))
        .map_err(MigrationError::socket("setting the peer timeout"))?;
    conn.set_rate_limit(limit.clone());
    let hello = Hello {
        version: protocol::VERSION,
        transport: opts.transport,
        capabilities: 0,
    };
    protocol::write_hello(&mut conn.writer, &hello)?;
    protocol::read_hello_reply(&mut conn.reader, &hello).map_err(|e| match e {
        // A TLS listener answers a plaintext hello with a notice (an older one just closes).
        protocol::ProtocolError::TlsRequired => MigrationError::PlainRefused {
            peer: to.to_string(),
        },
        protocol::ProtocolError::Truncated(_) if !conn.is_tls() => MigrationError::PlainRefused {
            peer: to.to_string(),
        },
        e => e.into(),
    })?;
    let prepare = protocol::Prepare {
        vm: offer.config.clone(),
        streams: u16::try_from(opts.stream_targets(to).len()).unwrap_or(0),
        session: offer.session,
        name: opts.name.clone(),
        origin: opts.origin.clone(),
        generation: opts.generation,
        host_cache: opts.host_cache.filter(|_| opts.dedups()),
        sections: offer.sections.to_vec(),
        disks: offer.disks.clone(),
        postcopy: opts.postcopy.possible(),
    };
    let mut out = FrameWriter::new(&mut conn.writer);
    out.send_config(&prepare)?;
    out.flush()?;
    Ok(conn)
}

/// The page streams: one per NIC pair with `network`, else `channels` to the same address;
/// then post-copy's link, when post-copy may come.
fn connect_streams(
    opts: &MigrateOptions,
    to: &str,
    session: u64,
    limit: &Option<Arc<RateLimit>>,
) -> Result<Vec<Connection>, MigrationError> {
    let mut conns = Vec::new();
    let targets = opts.stream_targets(to);
    let streams = u16::try_from(targets.len()).unwrap_or(u16::MAX);
    for (i, (local, remote)) in (0u16..).zip(targets) {
        conns.push(dial_data(
            opts,
            (local, &remote),
            (i, session),
            limit.clone(),
            opts.connect_timeout,
        )?);
    }
    if opts.postcopy.possible() {
        let link = postcopy::dial(opts, to, (streams, session, 0), limit, opts.connect_timeout)?;
        conns.extend(link.into_conns());
    }
    Ok(conns)
}

/// A data connection (page stream or post-copy's) to `remote`, from `local` if given, made
/// `within` that long: its hello names its `index` in migration `session`; paced by `limit`
/// if given.
fn dial_data(
    opts: &MigrateOptions,
    (local, remote): (Option<std::net::IpAddr>, &str),
    (index, session): (u16, u64),
    limit: Option<Arc<RateLimit>>,
    within: Duration,
) -> Result<Connection, MigrationError> {
    let mut c = match local {
        Some(l) => transport::connect_from(l, remote, within, opts.security()?)?,
        None => transport::connect(remote, within, opts.security()?)?,
    };
    c.set_peer_timeout(Some(opts.peer_timeout))
        .map_err(MigrationError::socket("setting the peer timeout"))?;
    c.set_rate_limit(limit);
    protocol::write_data_hello(&mut c.writer, index, session).map_err(|e| {
        MigrationError::Stream {
            index: index.into(),
            peer: remote.to_string(),
            cause: Box::new(e.into()),
        }
    })?;
    Ok(c)
}

/// What it takes to make post-copy's link again: where it goes (after any redirect), the
/// migration's session, its page streams (the link's indexes come after theirs), the pace.
struct Redial {
    to: String,
    session: u64,
    streams: u16,
    limit: Option<Arc<RateLimit>>,
}

/// Undoes what a failed migration changed on the source: dirty logging off, throttle off,
/// vCPU priority back, VM running again. Disarmed once the last frame is out: from then the VM
/// may be running on the destination, and the source must not resume on its own.
struct SourceGuard<'a> {
    vm: &'a SourceVm,
    dirty: Arc<Mutex<dyn DirtyLog>>,
    paused_by_us: bool,
    armed: bool,
    mode: &'static str,
}

impl<'a> SourceGuard<'a> {
    /// Starts dirty logging.
    fn arm(vm: &'a SourceVm, dirty: &Arc<Mutex<dyn DirtyLog>>) -> Result<Self, MigrationError> {
        let manual = {
            let mut d = locks::lock(dirty);
            d.start()?;
            d.manual_protect()
        };
        Ok(SourceGuard {
            vm,
            dirty: dirty.clone(),
            paused_by_us: false,
            armed: true,
            mode: if manual {
                "manual-protect"
            } else {
                "get-and-clear"
            },
        })
    }

    /// Lets the guest's vCPUs yield the CPU to this migration's threads, if `wanted`; says
    /// what was done, for the report.
    fn yield_vcpus(&mut self, wanted: bool) -> String {
        if !wanted {
            return "off".into();
        }
        match locks::lock(self.vm).yield_to(policy::VCPU_YIELD_NICE) {
            Ok(nice) => format!("vCPUs at nice {nice} until the pause"),
            Err(e) => {
                tracing::info!("{e}");
                format!("not applied: {e}")
            }
        }
    }
}

impl SourceGuard<'_> {
    /// A destination that refused the VM after the last frame left (an Abort in place of its
    /// Confirm: it will not run it) gives it back: the VM resumes here.
    fn take_back(&mut self, e: &MigrationError) {
        if matches!(
            e,
            MigrationError::Protocol(protocol::ProtocolError::PeerAborted(_))
        ) {
            self.armed = true;
        }
    }
}

impl Drop for SourceGuard<'_> {
    /// Dirty logging, the throttle and the vCPUs' yield end whatever happened; the VM resumes
    /// only while the guard is armed (before the point of no return).
    fn drop(&mut self) {
        let mut g = locks::lock(self.vm);
        g.throttle(0);
        g.unyield();
        let _ = locks::lock(&self.dirty).stop();
        if self.armed && self.paused_by_us {
            if let Err(e) = g.resume() {
                tracing::error!("resuming the source VM after a failed migration: {e}");
            }
        }
    }
}

/// A migration under way: its connections, its page sender and what it measured so far.
struct Session<'a> {
    vm: &'a SourceVm,
    opts: &'a MigrateOptions,
    progress: &'a (dyn Fn(&Progress) + Sync),
    prog: Progress,
    ram: Arc<GuestRam>,
    dirty: Arc<Mutex<dyn DirtyLog>>,
    sender: PageSender<'a>,
    input: FrameReader<Reader<'a>>,
    /// The control socket, to give the guest's verify a longer read timeout.
    control: transport::ShutdownHandle,
    wire: Wire,
    sampler: Sampler,
    report: Report,
    t0: Instant,
    /// Throughput of the last round big enough to measure the link, bytes/s.
    bw: f64,
    /// Wire bytes per page in the copy round (zero pages are cheap).
    per_page: u64,
    /// The last sync round's number.
    round: u32,
    /// Dirty pages fetched (and, without manual protect, cleared from the log) but not sent.
    unsent: Vec<DirtyBitmap>,
    /// Pre-copy stopped because the rest fit the downtime target (not on a limit or stall).
    converged: bool,
    /// The disks that move with the VM (`--storage copy`).
    disks: Option<disks::DiskCopy>,
    /// Post-copy's link, when it may happen, and how to make it again.
    link: Option<postcopy::Link>,
    redial: Option<Redial>,
    /// Where the guest's verdict comes from when not the control connection: post-copy's
    /// push connection, and the destination's frames sent on it so far.
    verdict_from: Option<(Connection, u32)>,
    /// Whether and when post-copy may come (`opts.postcopy`, unless the destination cannot).
    postcopy: policy::PostcopyMode,
    /// The guest's own write counts, for its rate before and during the migration.
    writes: Option<GuestRate>,
    /// This thread's priority while the VM is paused, until the destination confirms.
    first: Option<sched::Boosted>,
}

impl<'a> Session<'a> {
    fn new(
        vm: &'a SourceVm,
        opts: &'a MigrateOptions,
        progress: &'a (dyn Fn(&Progress) + Sync),
        source: Source,
        conn: &'a mut Connection,
        stream_conns: Vec<Connection>,
        t0: Instant,
    ) -> Result<Self, MigrationError> {
        let mut wire = Wire(vec![conn.counters.clone()]);
        wire.0
            .extend(stream_conns.iter().map(|c| c.counters.clone()));
        let control = conn
            .shutdown_handle()
            .map_err(MigrationError::socket("cloning the control socket"))?;
        let control2 = conn
            .shutdown_handle()
            .map_err(MigrationError::socket("cloning the control socket"))?;
        let streams = Streams::start(stream_conns, &source.ram, opts.peer_timeout)?;
        let path = match opts.transport {
            Transport::Tcp => PagePath::Copy,
            Transport::Compressed => PagePath::Compressed {
                workers: Box::new(Compressor::start(
                    opts.max_bandwidth,
                    opts.hold_raw.clone(),
                )?),
                meter: LinkMeter::new(wire.clone()),
            },
            Transport::Direct => PagePath::Direct { pages: Vec::new() },
        };
        // The Config frame went out first, as frame 0.
        let (link, reader) = Link::new(conn.split(), 1, opts.peer_timeout);
        let report = Report {
            transport: opts.transport.name().into(),
            destination: opts.to.clone(),
            memory_bytes: source.config.memory,
            max_bandwidth_gbps: opts.max_bandwidth.map(|b| b as f64 / 1e9),
            tls: opts.security()?.name().into(),
            ..Default::default()
        };
        let prog = Progress {
            phase: "prepare".into(),
            ram_bytes: source.config.memory,
            ..Default::default()
        };
        progress(&prog);
        Ok(Session {
            vm,
            opts,
            progress,
            prog,
            sender: PageSender::new(
                link,
                source.ram.clone(),
                path,
                streams,
                control,
                delta_cache(opts, source.ram.size()),
                opts.dedups().then(dedup::Dedup::default),
            ),
            // Ready was the destination's frame 0.
            input: FrameReader::with_seq(reader, 1),
            control: control2,
            sampler: Sampler::start(wire.clone(), Duration::from_millis(100)),
            wire,
            ram: source.ram,
            dirty: source.dirty,
            report,
            t0,
            bw: 0.0,
            per_page: PAGE_SIZE,
            round: 0,
            unsent: Vec::new(),
            converged: false,
            disks: None,
            link: None,
            redial: None,
            verdict_from: None,
            postcopy: opts.postcopy,
            writes: None,
            first: None,
        })
    }

    /// What the destination said before Ready: the keys of its host's cache, and whether it
    /// can take post-copy (without it, `auto` falls back to pre-copy alone and an explicit
    /// `--postcopy` is refused before anything is sent).
    fn preamble(&mut self, pre: Preamble) -> Result<(), MigrationError> {
        self.input.expect_seq(pre.frames);
        if let Some(keys) = pre.keys {
            let t = Instant::now();
            self.sender.set_host_keys(&keys);
            tracing::debug!(
                keys = keys.len() / crate::host_cache::KEY_LEN,
                took_ms = t.elapsed().as_millis(),
                "the destination host's cache keys taken"
            );
        }
        if let Some(why) = pre.no_postcopy {
            match self.postcopy {
                policy::PostcopyMode::Auto => {
                    tracing::info!("pre-copy only: {why}");
                    self.report.postcopy_unavailable = Some(why);
                    self.postcopy = policy::PostcopyMode::Off;
                }
                policy::PostcopyMode::After(_) => {
                    return Err(MigrationError::Refused(format!(
                        "post-copy asked for, and the destination cannot take it: {why}"
                    )))
                }
                policy::PostcopyMode::Off => {}
            }
        }
        Ok(())
    }

    fn phase(&mut self, name: &str) {
        self.prog.phase = name.into();
        (self.progress)(&self.prog);
    }

    /// Sends one round of pages and its end marker; with `deliver`, waits until the
    /// destination has all of it.
    fn send_round(
        &mut self,
        round: u32,
        pages: impl Iterator<Item = u64>,
        deliver: bool,
    ) -> Result<Round, MigrationError> {
        let (t, w0) = (Instant::now(), self.wire.sent());
        let mut c = Counting {
            sent: 0,
            seen: 0,
            next_peek: FIRST_PEEK_PAGES,
            base: self.prog.pages_sent,
            told: Instant::now(),
        };
        if round == 0 {
            self.sender.start_deferring();
        }
        for off in pages {
            self.one_page(round, off, &mut c)?;
        }
        // The copy's hot pages, held back until the guest's writes were known: sent last,
        // and kept for the deltas of the rounds that will send them again.
        for off in self.sender.take_deferred() {
            self.one_page(round, off, &mut c)?;
        }
        let n = c.sent;
        self.prog.pages_sent = c.base + n;
        self.sender.round_end(RoundEnd { round, pages: n })?;
        if deliver {
            self.sender.wait_delivered(self.opts.peer_timeout, round)?;
        }
        Ok(Round {
            pages: n,
            bytes: self.wire.sent() - w0,
            ms: t.elapsed().as_millis() as u64,
        })
    }

    /// One page of a round, with the copy's looks at the dirty log, cancellation and progress.
    fn one_page(&mut self, round: u32, off: u64, c: &mut Counting) -> Result<(), MigrationError> {
        c.sent += u64::from(self.sender.page(off)?);
        c.seen += 1;
        if round == 0 && c.seen == c.next_peek {
            // Often at first, when little is known, then at a steady pace.
            c.next_peek += c.next_peek.min(peek_every(self.ram.size()));
            self.peek_hot()?;
        }
        // Writes held by the mirror wait for this: often (a few ms of the link at most).
        if c.seen.is_multiple_of(MIRROR_EVERY) {
            self.service_mirror()?;
        }
        if c.seen.is_multiple_of(256) {
            self.opts.cancel.check()?;
            if c.told.elapsed() >= PROGRESS_EVERY {
                c.told = Instant::now();
                self.prog.pages_sent = c.base + c.sent;
                self.prog.bytes_on_wire = self.wire.sent();
                (self.progress)(&self.prog);
            }
        }
        Ok(())
    }

    /// During the copy: which pages the guest has written so far (the dirty log read without
    /// clearing it, so only with manual protect). The delta cache keeps what it sends of them;
    /// without deltas the copy leaves them to the first sync round, which sends them anyway.
    fn peek_hot(&mut self) -> Result<(), MigrationError> {
        let bitmaps = {
            let mut d = locks::lock(&self.dirty);
            if !d.manual_protect() {
                return Ok(());
            }
            d.fetch()?
        };
        for b in bitmaps {
            self.sender.written_in_copy(b.pages());
        }
        Ok(())
    }

    /// The disks' bulk copy (`--storage copy`), before RAM's: RAM would be written again
    /// while the disks went, and what the guest writes to a disk after its bulk copy is little
    /// beside it and kept in step (rounds or the mirror) until the pause.
    fn copy_disks(&mut self) -> Result<(), MigrationError> {
        let Some(disks) = &mut self.disks else {
            return Ok(());
        };
        self.prog.phase = "disks".into();
        (self.progress)(&self.prog);
        let (t, w0) = (Instant::now(), self.wire.sent());
        disks.start();
        let (sender, cancel, progress, prog, wire) = (
            &mut self.sender,
            &self.opts.cancel,
            self.progress,
            &mut self.prog,
            &self.wire,
        );
        let mut told = Instant::now();
        disks.bulk(&mut |f| sender.send_disk(f), &mut |_| {
            cancel.check()?;
            if told.elapsed() >= PROGRESS_EVERY {
                told = Instant::now();
                prog.bytes_on_wire = wire.sent();
                progress(prog);
            }
            Ok(())
        })?;
        self.sender.flush_control()?;
        let ms = t.elapsed().as_millis() as u64;
        let rate = (self.wire.sent() - w0) as f64 / (ms.max(1) as f64 / 1e3);
        disks.choose_sync(rate, self.opts.disk_sync);
        self.report.disk_ms = ms;
        tracing::debug!(ms, bytes = self.wire.sent() - w0, "disks: bulk copy done");
        Ok(())
    }

    /// Sends what mirrored disks hold waiting writes for.
    fn service_mirror(&mut self) -> Result<(), MigrationError> {
        let Some(disks) = &mut self.disks else {
            return Ok(());
        };
        if !disks.mirroring() {
            return Ok(());
        }
        // RAM goes in short batches, each straight to the socket, while writes are mirrored: a
        // held write's blocks wait for what is buffered ahead of them (and the pace it costs).
        self.sender.flush_pages()?;
        self.sender.flush_control()?;
        if disks.dirty_bytes() == 0 {
            return Ok(());
        }
        let sender = &mut self.sender;
        let sent = std::cell::RefCell::new(sender);
        disks.resend(None, &mut |f| sent.borrow_mut().send_disk(f), &mut || {
            sent.borrow_mut().flush_control()
        })?;
        Ok(())
    }

    /// A sync round's disk blocks: what the guest dirtied since the last (rounds), or what the
    /// mirror holds; `all` while paused.
    fn disk_round(&mut self, all: bool) -> Result<u64, MigrationError> {
        let Some(disks) = &mut self.disks else {
            return Ok(0);
        };
        let max = (!all).then(|| disks.dirty_bytes() / migratable::DISK_BLOCK);
        let sent = std::cell::RefCell::new(&mut self.sender);
        disks.resend(max, &mut |f| sent.borrow_mut().send_disk(f), &mut || {
            sent.borrow_mut().flush_control()
        })
    }

    /// Disk bytes dirtied and not sent.
    fn disk_dirty(&self) -> u64 {
        self.disks.as_ref().map_or(0, disks::DiskCopy::dirty_bytes)
    }

    /// Phase 2, copy: every page the guest (or the VMM, before boot) ever touched; holes are never
    /// read. In address order; with deltas, in 2 MiB chunks spread over RAM (see
    /// [`policy::spread_order`]), so the dirty log shows the guest's writes before the copy has
    /// sent whole regions of them.
    fn copy(&mut self, extents: &[(u64, u64)]) -> Result<(), MigrationError> {
        self.phase("copy");
        let chunks = protocol::chunks(extents, SPREAD_CHUNK);
        let order: Vec<usize> = if self.sender.sends_deltas() {
            policy::spread_order(chunks.len())
        } else {
            (0..chunks.len()).collect()
        };
        let pages = order
            .into_iter()
            .flat_map(|i| (chunks[i].0..chunks[i].1).step_by(PAGE_SIZE as usize));
        let r = self.send_round(0, pages, true)?;
        self.report.phases.copy_ms = r.ms;
        self.bw = r.bytes as f64 / (r.ms.max(1) as f64 / 1e3);
        if r.pages > 0 {
            self.per_page = r.bytes.div_ceil(r.pages);
        }
        self.report.rounds.push(r);
        Ok(())
    }

    /// The pages in `bitmaps`, and what sending them and the disks' dirty blocks would put on
    /// the wire at the bytes per page measured.
    fn remaining(&self, bitmaps: &[DirtyBitmap]) -> (u64, u64) {
        let pages: u64 = bitmaps.iter().map(DirtyBitmap::count).sum();
        let bytes = pages
            .saturating_mul(self.per_page)
            .saturating_add(self.disk_dirty());
        (pages, bytes)
    }

    /// The pages written since the last fetch, and those a fetch found but no round sent.
    fn fetch_dirty(&mut self) -> Result<Vec<DirtyBitmap>, MigrationError> {
        let mut maps = locks::lock(&self.dirty).fetch()?;
        for old in std::mem::take(&mut self.unsent) {
            match maps.iter_mut().find(|m| m.region == old.region) {
                Some(m) => m.merge(&old),
                None => maps.push(old),
            }
        }
        Ok(maps)
    }

    /// Phase 3, sync: rounds from the dirty log until the rest fits the downtime target (or the
    /// policy stops it), throttling a guest that outruns the link (auto-converge). Returns
    /// why it hands over to post-copy, when it does.
    fn sync(&mut self) -> Result<Option<String>, MigrationError> {
        self.phase("sync");
        self.sender.start_resending();
        let t_sync = Instant::now();
        let manual = locks::lock(&self.dirty).manual_protect();
        let mut history: Vec<u64> = Vec::new();
        let (mut throttle, mut throttled_since) = (0u8, 0usize);
        let decision = loop {
            let bitmaps = self.fetch_dirty()?;
            let (dirty_pages, remaining) = self.remaining(&bitmaps);
            let d = self.opts.policy.decide(
                remaining,
                self.bw,
                &history,
                throttled_since,
                self.t0.elapsed(),
            );
            let passes = 1 + self.round;
            if policy::switch_to_postcopy(self.postcopy, passes, d) {
                self.unsent = bitmaps;
                self.report.stop_reason = "postcopy".into();
                self.report.phases.sync_ms = t_sync.elapsed().as_millis() as u64;
                let why = match self.postcopy {
                    policy::PostcopyMode::After(n) => format!("--postcopy-after {n}"),
                    _ => format!(
                        "pre-copy would not converge ({}) after {passes} passes",
                        format!("{d:?}").to_lowercase()
                    ),
                };
                return Ok(Some(why));
            }
            let stop = match d {
                Decision::Continue => false,
                Decision::Stalled => match self.opts.policy.next_throttle(throttle) {
                    Some(t) => {
                        throttle = t;
                        throttled_since = history.len();
                        self.throttle(t);
                        false
                    }
                    None => true,
                },
                _ => true,
            };
            if stop {
                // Without manual protect that fetch cleared the log: the paused round must
                // still send those pages.
                self.unsent = bitmaps;
                break d;
            }
            self.round += 1;
            let r = self.sync_round(&bitmaps)?;
            history.push(dirty_pages);
            self.report.rounds.push(r);
            if !manual && dirty_pages == 0 {
                break Decision::Converged;
            }
        };
        self.converged = decision == Decision::Converged;
        self.report.stop_reason = format!("{decision:?}").to_lowercase();
        self.report.phases.sync_ms = t_sync.elapsed().as_millis() as u64;
        Ok(None)
    }

    /// Before the pause, the destination places every round sent. A busy destination takes
    /// its time, and the guest writes on meanwhile: once pre-copy converged, the pages are
    /// counted again, and while they no longer fit the downtime another round goes first
    /// (at most [`policy::ConvergencePolicy::CATCH_UP_ROUNDS`]).
    fn catch_up(&mut self) -> Result<(), MigrationError> {
        let t = Instant::now();
        self.wait_caught_up()?;
        let mut rounds = 0;
        while self.converged && rounds < policy::ConvergencePolicy::CATCH_UP_ROUNDS {
            let bitmaps = self.fetch_dirty()?;
            if self.opts.policy.fits(self.remaining(&bitmaps).1, self.bw) {
                self.unsent = bitmaps;
                break;
            }
            rounds += 1;
            self.round += 1;
            let r = self.sync_round(&bitmaps)?;
            self.report.rounds.push(r);
            self.wait_caught_up()?;
        }
        self.report.catch_up_rounds = rounds;
        self.report.phases.catch_up_ms = t.elapsed().as_millis() as u64;
        Ok(())
    }

    /// One sync round: re-arm tracking for the pages about to be read, then send them.
    fn sync_round(&mut self, bitmaps: &[DirtyBitmap]) -> Result<Round, MigrationError> {
        if let Some(d) = &mut self.disks {
            d.choose_sync(self.bw, self.opts.disk_sync);
        }
        self.disk_round(false)?;
        {
            let mut d = locks::lock(&self.dirty);
            for b in bitmaps {
                d.clear(b)?;
            }
        }
        let r = self.send_round(
            self.round,
            bitmaps.iter().flat_map(DirtyBitmap::pages),
            true,
        )?;
        // Small rounds measure the round trip more than the link.
        if r.bytes >= MIN_RATE_SAMPLE {
            self.bw = r.bytes as f64 / (r.ms.max(1) as f64 / 1e3);
        }
        self.prog.round = self.round;
        self.prog.last_round_pages = r.pages;
        self.prog.bytes_on_wire = self.wire.sent();
        (self.progress)(&self.prog);
        Ok(r)
    }

    /// Auto-converge: slows the guest's vCPUs to `pct`% asleep.
    fn throttle(&mut self, pct: u8) {
        locks::lock(self.vm).throttle(pct);
        self.report.throttle_pct_max = pct;
        tracing::info!(
            throttle = pct,
            round = self.round,
            "rounds stopped shrinking: throttling the guest"
        );
    }

    /// Waits until the destination has placed every round sent so far (its RoundDone for the
    /// last), so the pause does not wait behind pages it still had to place: a link that
    /// carries pages faster than the destination places them (references, which are small on
    /// the wire) leaves a backlog in its socket buffers.
    fn wait_caught_up(&mut self) -> Result<(), MigrationError> {
        loop {
            match self.input.next_frame()? {
                Frame::RoundDone(r) if r.round >= self.round => return Ok(()),
                Frame::RoundDone(_) => {}
                f => {
                    return Err(protocol::ProtocolError::Unexpected {
                        kind: f.kind(),
                        state: "awaiting-round-done",
                    }
                    .into())
                }
            }
        }
    }

    /// The destination's Confirm, after the paused round's RoundDone if one comes, with its
    /// side of the switchover for the report; anything else leaves the outcome unknown (the
    /// VM may run there).
    fn await_confirm(&mut self) -> Result<(), MigrationError> {
        let answer = loop {
            match self.input.next_frame() {
                Ok(Frame::RoundDone(_)) => {}
                other => break other,
            }
        };
        match answer {
            Ok(Frame::Confirm(times)) => {
                let ms = |us: u32| f64::from(us) / 1e3;
                let p = &mut self.report.phases;
                p.switchover_received_ms = ms(times.received_us);
                p.switchover_loaded_ms = ms(times.loaded_us);
                p.switchover_confirming_ms = ms(times.confirming_us);
                Ok(())
            }
            Ok(f) => Err(MigrationError::OutcomeUnknown(format!(
                "{:?} instead of Confirm",
                f.kind()
            ))),
            // It says why it will not run the VM: a known outcome.
            Err(e @ protocol::ProtocolError::PeerAborted(_)) => Err(e.into()),
            Err(e) => Err(MigrationError::OutcomeUnknown(e.to_string())),
        }
    }

    /// The switchover's first step: the VM paused here (the guard resumes it on a failure
    /// before the last frame leaves) and its state captured. Returns when it paused, and the
    /// state.
    fn pause(
        &mut self,
        guard: &mut SourceGuard,
    ) -> Result<(Instant, migratable::Snapshot), MigrationError> {
        self.phase("switchover");
        // From the pause to the Confirm, this thread goes first, and tells the destination's
        // to.
        self.report.switchover_priority = match crate::go_first() {
            Ok(b) => {
                let class = b.describe();
                self.first = Some(b);
                format!("the migration's thread {class} until the destination confirmed")
            }
            Err(why) => format!("not raised: {why}"),
        };
        // The last round, the state and the Confirm do not queue behind other transfers'
        // data on the link.
        if let Err(e) = self.control.expedite() {
            tracing::debug!("the switchover's frames keep their class on the wire: {e}");
        }
        let t_pause = Instant::now();
        let state = {
            let mut g = locks::lock(self.vm);
            g.pause()?;
            guard.paused_by_us = true;
            g.snapshot()?
        };
        self.sender.control_out().send(Kind::Paused, &[])?;
        self.sender.flush_control()?;
        self.sender.paused();
        if let Some(w) = &mut self.writes {
            w.paused();
        }
        Ok((t_pause, state))
    }

    /// Phase 4, switchover: pause, last pages and device state; the destination confirms and
    /// resumes. Before the last frame leaves, any failure resumes the VM here (the guard);
    /// after it, the VM stays paused unless the confirmation arrives.
    fn switchover(&mut self, guard: &mut SourceGuard) -> Result<(), MigrationError> {
        self.catch_up()?;
        // The page streams end before the pause: the paused last round is small and goes on
        // the control connection, so stream hand-offs stay out of the downtime.
        self.sender.finish_streams()?;
        // A write held by the mirror would keep the disk from draining at the pause.
        if let Some(d) = &mut self.disks {
            d.stop_mirroring();
        }
        let (t_pause, state) = self.pause(guard)?;
        let captured_ms = t_pause.elapsed().as_millis();
        // The disks are drained and flushed: the last of their blocks.
        let disk_last = self.disk_round(true)?;
        if let Some(d) = &mut self.disks {
            d.paused();
        }
        let bitmaps = self.fetch_dirty()?;
        let mut last = self.send_round(
            self.round + 1,
            bitmaps.iter().flat_map(DirtyBitmap::pages),
            false,
        )?;
        self.sender.finish_direct()?;
        // The point of no return: a cancel from here on is refused.
        self.opts.cancel.commit()?;
        // What only one host may hold (disk locks) is let go before the destination can
        // load the state; a failure before the last frame leaves resumes the VM here, which
        // takes it back.
        locks::lock(self.vm).hand_over()?;
        self.sender.send_state_and_done(&state)?;
        let sent_ms = t_pause.elapsed().as_millis();
        // From here the destination may hold everything: the source must not resume on its own.
        guard.armed = false;
        self.await_confirm().inspect_err(|e| guard.take_back(e))?;
        self.first.take();
        let downtime = t_pause.elapsed().as_millis() as u64;
        tracing::debug!(
            captured_ms,
            sent_ms,
            confirmed_ms = downtime,
            pages = last.pages,
            disk_last,
            "switchover: paused, state captured, last round and state sent, confirmed"
        );
        last.ms = downtime;
        self.report.rounds.push(last);
        self.report.downtime_ms = downtime;
        self.report.phases.switchover_ms = downtime;
        self.report.phases.switchover_captured_ms = captured_ms as u64;
        self.report.phases.switchover_sent_ms = sent_ms as u64;
        Ok(())
    }

    /// Phase 4 in post-copy: pause, the disks' last blocks, then the pages the destination
    /// still lacks named instead of sent; the VM resumes there at once, and this side answers
    /// its asks and pushes the rest until it holds every page. Before the last frame leaves,
    /// a failure resumes the VM here; after the destination's Confirm, one loses the VM.
    fn postcopy(
        &mut self,
        guard: &mut SourceGuard,
        extents: &[(u64, u64)],
        reason: String,
        watchdog: &Watchdog,
    ) -> Result<(), MigrationError> {
        let Some(link) = self.link.take() else {
            return Err(MigrationError::Postcopy(
                "its connections were not opened".into(),
            ));
        };
        // Rounds sent (the copy at least) are placed before the pause.
        if !self.report.rounds.is_empty() {
            self.wait_caught_up()?;
        }
        self.sender.finish_streams()?;
        if let Some(d) = &mut self.disks {
            d.stop_mirroring();
        }
        // What the destination must drop, most of it while the guest still runs here.
        let mut owed = self.owed_ahead(extents)?;
        self.sender.control_out().send_owed(&owed)?;
        self.sender.flush_control()?;
        match self.input.next_frame()? {
            Frame::OwedPlaced => {}
            f => {
                return Err(protocol::ProtocolError::Unexpected {
                    kind: f.kind(),
                    state: "awaiting-owed-placed",
                }
                .into())
            }
        }
        let (t_pause, state) = self.pause(guard)?;
        self.disk_round(true)?;
        if let Some(d) = &mut self.disks {
            d.paused();
        }
        let last = self.owed_at_pause()?;
        self.sender.control_out().send_owed(&last)?;
        self.sender.flush_control()?;
        owed.merge(&last);
        let unsent = Arc::new(PageBits::from_owed(&owed));
        self.count_wire(&link);
        // Threads started from here would inherit this thread's priority for good.
        self.first.take();
        // Loading the state on the destination may already fault.
        let demand = postcopy::Demand::start(self.ram.clone(), unsent.clone(), link)?;
        self.opts.cancel.commit()?;
        locks::lock(self.vm).hand_over()?;
        self.sender.send_state_and_done(&state)?;
        guard.armed = false;
        self.await_confirm().inspect_err(|e| guard.take_back(e))?;
        self.first.take();
        // From here post-copy's link watches the destination, and is made again when it
        // fails; the guest's verdict comes over it too.
        watchdog.disarm();
        let downtime = t_pause.elapsed().as_millis() as u64;
        self.report.downtime_ms = downtime;
        self.report.phases.switchover_ms = downtime;
        tracing::info!(
            owed = owed.pages,
            downtime,
            "post-copy: the VM runs on the destination; pushing what it lacks"
        );
        let w0 = self.wire.sent();
        let mut recovered = Recovered::default();
        let (sent, stats) = self
            .serve_links(unsent, demand, &mut recovered)
            .map_err(|e| MigrationError::VmLost(e.to_string()))?;
        self.report.rounds.push(Round {
            pages: sent.0 + sent.1,
            bytes: self.wire.sent() - w0,
            ms: t_pause.elapsed().as_millis() as u64,
        });
        self.report.postcopy = Some(report::PostcopyReport {
            reason,
            owed_pages: owed.pages,
            sent_data_pages: sent.0,
            sent_zero_pages: sent.1,
            faults: stats.faults,
            fault_p50_us: stats.fault_p50_us,
            fault_p99_us: stats.fault_p99_us,
            fault_max_us: stats.fault_max_us,
            pages_demanded: stats.pages_demanded,
            pages_pushed: stats.pages_pushed,
            complete_ms: stats.complete_ms,
            guest_pages_written: stats.guest_pages_written,
            guest_writes_per_s: stats.guest_writes_per_s,
            recoveries: recovered.times,
            recovery_ms: recovered.ms,
            risk: report::POSTCOPY_RISK.into(),
        });
        Ok(())
    }

    /// Post-copy after the resume: the push over the link until the destination holds every
    /// page; a link that fails is made again and the push goes on from what the destination
    /// still lacks. Returns the pages sent (with data, zero) and the destination's figures.
    fn serve_links(
        &mut self,
        mut unsent: Arc<PageBits>,
        first: (postcopy::Demand, Connection, u32),
        recovered: &mut Recovered,
    ) -> Result<((u64, u64), protocol::PostcopyStats), MigrationError> {
        let (mut demand, mut push, mut seq) = first;
        let mut pages = postcopy::Pages::default();
        let mut attempt = 0;
        loop {
            let pushed = self.push(&unsent, &demand, (&mut push, seq), &mut pages);
            let served = demand.stop();
            let answered = match served {
                Ok(n) => n,
                Err(e) if e.is_link_failure() => (0, 0),
                Err(e) => return Err(e),
            };
            pages.sent.0 += answered.0;
            pages.sent.1 += answered.1;
            match pushed {
                Ok(stats) => {
                    // The guest's verdict follows PostcopyDone there.
                    self.verdict_from = Some((push, seq + 1));
                    return Ok((pages.sent, stats));
                }
                Err(e) if e.is_link_failure() => {
                    pages.discard();
                    let t = Instant::now();
                    let (link, owed) = self.relink(&mut attempt, &e)?;
                    recovered.times += 1;
                    recovered.ms += t.elapsed().as_millis() as u64;
                    unsent = Arc::new(PageBits::from_owed(&owed));
                    self.count_wire(&link);
                    (demand, push, seq) =
                        postcopy::Demand::start(self.ram.clone(), unsent.clone(), link)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes post-copy's link again after `why`, within the recovery window: the next
    /// attempt's connections, and the pages the destination says it still lacks. A
    /// destination that refuses the connection is gone (its receiver ran the VM).
    fn relink(
        &mut self,
        attempt: &mut u32,
        why: &MigrationError,
    ) -> Result<(postcopy::Link, protocol::Owed), MigrationError> {
        let window = crate::postcopy::recovery_window(self.opts.peer_timeout);
        let Some(mut r) = self.redial.take() else {
            return Err(MigrationError::Postcopy(format!("the link failed: {why}")));
        };
        self.phase("postcopy-paused");
        self.opts.resume.set_paused(true);
        tracing::warn!("post-copy: the link failed ({why}); making it again within {window:?}");
        let t = Instant::now();
        let mut since = t;
        let mut last = why.to_string();
        let made = loop {
            if let Some(to) = self.opts.resume.take() {
                // The operator's word: at once, where they say, with a new window.
                r.to = to.unwrap_or(r.to);
                since = Instant::now();
                tracing::info!(to = %r.to, "post-copy: resuming as asked");
            }
            let left = window.saturating_sub(since.elapsed());
            if left.is_zero() {
                break Err(MigrationError::Postcopy(format!(
                    "the link failed ({why}) and was not made again within {window:?} (last: {last})"
                )));
            }
            *attempt += 1;
            // Short attempts: one that hangs on a dead path must not delay a resume.
            let tries = left.min(self.opts.peer_timeout);
            let dialed = postcopy::dial(
                self.opts,
                &r.to,
                (r.streams, r.session, *attempt),
                &r.limit,
                tries,
            )
            .and_then(|mut l| l.resumed(self.ram.size()).map(|owed| (l, owed)));
            match dialed {
                Ok(made) => break Ok(made),
                Err(e) if is_refused(&e) => {
                    break Err(MigrationError::Postcopy(format!(
                    "the link failed ({why}), and then {e}: the receiver that ran the VM is gone"
                )))
                }
                Err(e) => {
                    last = e.to_string();
                    std::thread::sleep(RELINK_PAUSE.min(left));
                }
            }
        };
        self.opts.resume.set_paused(false);
        self.redial = Some(r);
        let made = made?;
        tracing::info!(after = ?t.elapsed(), owed = made.1.pages, "post-copy: the link is made again");
        self.phase("postcopy");
        Ok(made)
    }

    /// The link's bytes count in the migration's.
    fn count_wire(&mut self, link: &postcopy::Link) {
        for c in [&link.requests, &link.replies, &link.push] {
            self.wire.0.push(c.counters.clone());
        }
    }

    /// The pages the destination lacks, as far as the guest has written them so far: those
    /// written since they were last sent (the log re-armed for them), and with no pre-copy
    /// every page the guest ever touched.
    fn owed_ahead(&mut self, extents: &[(u64, u64)]) -> Result<protocol::Owed, MigrationError> {
        let maps = self.fetch_dirty()?;
        {
            let mut d = locks::lock(&self.dirty);
            for b in &maps {
                d.clear(b)?;
            }
        }
        let mut owed = protocol::Owed::new(self.ram.size());
        for b in &maps {
            b.pages().for_each(|off| owed.mark(off));
        }
        if self.report.rounds.is_empty() {
            for &(start, end) in extents {
                (start..end)
                    .step_by(PAGE_SIZE as usize)
                    .for_each(|off| owed.mark(off));
            }
        }
        Ok(owed)
    }

    /// The rest, with the VM paused: the pages written since [`Self::owed_ahead`].
    fn owed_at_pause(&mut self) -> Result<protocol::Owed, MigrationError> {
        let mut owed = protocol::Owed::new(self.ram.size());
        for b in self.fetch_dirty()? {
            b.pages().for_each(|off| owed.mark(off));
        }
        owed.last = true;
        Ok(owed)
    }

    /// Post-copy's background push over `push`: every page still unsent, from the guest's
    /// latest fault on, then PostcopyEnd; returns once the destination says it holds every
    /// page (PostcopyDone after the `seq` frames it sent there), with its figures.
    fn push(
        &mut self,
        unsent: &PageBits,
        demand: &postcopy::Demand,
        (push, seq): (&mut Connection, u32),
        pages: &mut postcopy::Pages,
    ) -> Result<protocol::PostcopyStats, MigrationError> {
        self.phase("postcopy");
        let mut out = FrameWriter::new(&mut push.writer);
        let mut order = crate::postcopy::PushOrder::default();
        let mut told = Instant::now();
        while let Some(off) = order.next(unsent, demand.fault.get()) {
            if !unsent.take(off) {
                continue;
            }
            pages.add(&self.ram, off)?;
            if pages.len() == PUSH_BATCH {
                pages.send(&mut out)?;
                out.flush()?;
                self.prog.pages_sent += PUSH_BATCH as u64;
                if told.elapsed() >= PROGRESS_EVERY {
                    told = Instant::now();
                    self.prog.bytes_on_wire = self.wire.sent();
                    (self.progress)(&self.prog);
                }
            }
        }
        pages.send(&mut out)?;
        out.send(Kind::PostcopyEnd, &[])?;
        out.flush()?;
        match FrameReader::with_seq(&mut push.reader, seq).next_frame()? {
            Frame::PostcopyDone(s) => Ok(s),
            f => Err(protocol::ProtocolError::Unexpected {
                kind: f.kind(),
                state: "awaiting-postcopy-done",
            }
            .into()),
        }
    }

    /// Phase 5, cleanup: the VM runs on the destination; destroy it here.
    fn cleanup(&mut self) {
        let t = Instant::now();
        locks::lock(self.vm).migrated(&self.opts.to);
        if let Some(d) = self.disks.as_ref().filter(|_| self.opts.remove_source) {
            for e in d.remove_sources() {
                tracing::warn!("--remove-source: {e}");
            }
        }
        self.report.phases.cleanup_ms = t.elapsed().as_millis() as u64;
        self.report.total_ms = self.t0.elapsed().as_millis() as u64;
    }

    /// The report, with the guest's own verdict from the destination.
    fn finish(mut self, cpu0: f64) -> Report {
        // Samples cover the migration, not the wait for the guest's verdict.
        let (samples, peak) = self.sampler.finish();
        let mut r = self.report;
        if let Some(w) = &self.writes {
            w.report_into(&mut r);
        }
        self.sender.report_into(&mut r);
        if let Some(p) = &r.postcopy {
            r.pages.normal += p.sent_data_pages;
            r.pages.zero += p.sent_zero_pages;
        }
        r.storage = self.opts.storage.to_string();
        if let Some(d) = &self.disks {
            r.disks = d.reports();
            r.disk_bytes = r.disks.iter().map(|d| d.bulk_bytes + d.resent_bytes).sum();
            r.write_stall_ms = r.disks.iter().map(|d| d.write_max_ms).fold(0.0, f64::max);
        }
        let cpu_src = thread_cpu_seconds() - cpu0 + self.sender.stream_cpu_seconds();
        self.prog.phase = "verify".into();
        (self.progress)(&self.prog);
        // The guest verifies every page it wrote before the destination answers.
        let wait = Some(self.opts.verify_timeout + self.opts.peer_timeout);
        let verdict = |f: Result<Frame<'_>, protocol::ProtocolError>| match f {
            Ok(Frame::Verified(v)) => Ok(v),
            Ok(f) => Err(format!("{:?} instead of the guest's verdict", f.kind())),
            Err(e) => Err(e.to_string()),
        };
        let verified = match &mut self.verdict_from {
            Some((conn, seq)) => {
                let _ = conn.set_read_timeout(wait);
                verdict(FrameReader::with_seq(&mut conn.reader, *seq).next_frame())
            }
            None => {
                let _ = self.control.set_read_timeout(wait);
                verdict(self.input.next_frame())
            }
        };
        r.bytes_on_wire = self.wire.sent() + self.wire.received();
        r.avg_gbps = self.wire.sent() as f64 * 8.0 / 1e9 / (r.total_ms.max(1) as f64 / 1e3);
        r.peak_gbps = peak as f64 / 1e9;
        r.samples = samples;
        r.cpu_seconds = CpuSeconds {
            source: cpu_src,
            destination: verified.as_ref().map_or(0.0, |v| v.cpu_seconds),
        };
        r.guest_verified = verified.as_ref().is_ok_and(|v| v.ok && v.verifiable);
        r.phases.switchover_resumed_ms = verified.as_ref().map_or(0.0, |v| v.resumed_ms);
        r.verification = match &verified {
            Ok(v) if !v.verifiable => Verification::NotVerifiable,
            Ok(v) if v.ok => Verification::Verified,
            Ok(_) => Verification::Failed,
            Err(_) => Verification::DestinationLost,
        };
        r.guest_verify = Some(match verified {
            Ok(v) => v.detail,
            Err(e) => format!(
                "the destination {} was lost after the commit, before the guest's verdict: {e}",
                self.opts.to
            ),
        });
        r.status = "completed".into();
        r
    }
}
