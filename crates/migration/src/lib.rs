//! Pre-copy live migration of anything [`migratable::Migratable`]. Data flows one way: guest
//! RAM → dirty tracking ([`migratable::DirtyLog`]) →
//! page encoding ([`codec`], [`protocol`]) → transport → [`recv`] → guest RAM.
//! [`policy`] and the codec policy decide (when to stop iterating, which stream, which codec);
//! [`send`] and [`recv`] carry the decisions out; [`report`] says what happened;
//! [`request`] is what a user asks for.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod api;
pub mod codec;
pub mod delta;
pub mod fuzz;
pub mod host_cache;
pub mod policy;
pub mod postcopy;
pub mod protocol;
pub mod recv;
pub mod report;
pub mod request;
pub mod sample;
pub mod send;

pub use protocol::VerifyOutcome;
pub use recv::{
    receive, Commit, Events, Incoming, Pending, ReceiveEvent, ReceiveOptions, ReceiveStats,
};
pub use report::Report;
pub use request::MigrateRequest;
pub use send::{migrate, session_id, Cancel, MigrateOptions, Progress, SourceVm};

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MigrationError {
    /// {0}
    Transport(#[from] transport::TransportError),
    /// protocol: {0}
    Protocol(#[from] protocol::ProtocolError),
    /// control connection to {peer}: {source}
    Control {
        peer: String,
        source: protocol::ProtocolError,
    },
    /// page stream {index} ({peer}) failed: {cause}
    Stream {
        index: usize,
        peer: String,
        cause: Box<MigrationError>,
    },
    /// it stopped early
    StoppedEarly,
    /// a page stream failed; the migration is off
    StreamFailed,
    /// the destination {peer} expects TLS: it requires mutual TLS with the cluster's certificates, and this side runs --insecure
    PlainRefused { peer: String },
    /// guest RAM: {0}
    GuestMemory(#[from] ram::MemoryError),
    /// the host's page cache: {0}
    HostCache(#[from] host_cache::CacheError),
    /// finding the memory the guest touched (SEEK_DATA on its memfd): {0}
    Extents(std::io::Error),
    /// {what} on a migration socket: {source}
    Socket {
        what: &'static str,
        source: std::io::Error,
    },
    /// starting the {what} thread: {source}
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
    /// VM: {0}
    Vm(#[from] migratable::MigratableError),
    /// dirty log: {0}
    DirtyLog(#[from] migratable::DirtyLogError),
    /// the VM's state: {0}
    State(#[from] migratable::SnapshotError),
    /// timed out after {secs} s waiting for {waiting_for}
    TimedOut { secs: f64, waiting_for: String },
    /// this host refused the VM: {0}
    Refused(String),
    /// the migration was cancelled ({0}); the VM keeps running on the source
    Cancelled(String),
    /// the source VM is {0}; only a running VM migrates
    SourceNotRunning(String),
    /// the destination {peer} is busy: {why}; the VM keeps running here, and a later attempt may succeed
    Busy { peer: String, why: String },
    /// disk {disk} ({path}): {what}: {source}
    Disk {
        disk: String,
        path: String,
        what: &'static str,
        source: std::io::Error,
    },
    /// post-copy: {0}
    Postcopy(String),
    /// post-copy failed after the VM resumed on the destination: the VM is lost ({0}); neither host can run it from a complete memory
    VmLost(String),
    /// the cluster did not make this host the VM's owner: {0}; the VM stays with its source
    NotCommitted(String),
    /// switchover outcome unknown ({0}): the VM stays paused on the source because it may be running on the destination; check the destination before resuming it
    OutcomeUnknown(String),
}

/// Where a migrating VM's disks are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On storage both hosts reach at the same path: only the lock moves.
    #[default]
    Shared,
    /// Copied to the destination with the VM (shared-nothing).
    Copy,
}

impl std::fmt::Display for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Storage::Shared => "shared",
            Storage::Copy => "copy",
        })
    }
}

impl std::str::FromStr for Storage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shared" => Ok(Storage::Shared),
            "copy" => Ok(Storage::Copy),
            other => Err(format!(
                "unknown storage {other:?} (expected shared or copy)"
            )),
        }
    }
}

impl MigrationError {
    /// A failed local operation on a migration socket (`what`: the call or option).
    pub fn socket(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| MigrationError::Socket { what, source }
    }

    /// Whether the destination turned the migration away because it was busy: worth trying
    /// again later.
    pub fn is_busy(&self) -> bool {
        matches!(self, MigrationError::Busy { .. })
    }

    /// Whether a connection failed (cut, reset, silent past its deadline) rather than a peer
    /// saying something wrong: post-copy makes its link again after one.
    pub fn is_link_failure(&self) -> bool {
        use protocol::ProtocolError as P;
        match self {
            MigrationError::Protocol(P::Io(_) | P::Truncated(_) | P::Closed)
            | MigrationError::Transport(_)
            | MigrationError::Socket { .. }
            | MigrationError::TimedOut { .. } => true,
            MigrationError::Stream { cause, .. } => cause.is_link_failure(),
            _ => false,
        }
    }

    /// Names the peer on an error of the control connection.
    fn on_control(self, peer: &str) -> Self {
        match self {
            MigrationError::Protocol(protocol::ProtocolError::PeerBusy(why)) => {
                MigrationError::Busy {
                    peer: peer.to_string(),
                    why,
                }
            }
            MigrationError::Protocol(source) => MigrationError::Control {
                peer: peer.to_string(),
                source,
            },
            e => e,
        }
    }
}

/// The calling thread goes first until the guard drops (the switchover's downtime), or why
/// it cannot here.
pub(crate) fn go_first() -> Result<sched::Boosted, String> {
    sched::boost_current().map_err(|e| e.to_string())
}

/// CPU time of the calling thread (the migration's own work, not the guest's vCPUs).
pub fn thread_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into the struct we pass, which lives across the call;
    // RUSAGE_THREAD is valid on Linux.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The bytes a migration's connections sent, summed.
#[derive(Clone, Default)]
pub struct Wire(pub Vec<Arc<transport::Counters>>);

impl Wire {
    pub fn sent(&self) -> u64 {
        self.0.iter().map(|c| c.sent.load(Ordering::Relaxed)).sum()
    }
    pub fn received(&self) -> u64 {
        self.0
            .iter()
            .map(|c| c.received.load(Ordering::Relaxed))
            .sum()
    }
}

/// Samples the sent-bytes counters every `interval` into bits/s.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<report::Sample>>>,
}

impl Sampler {
    pub fn start(counters: Wire, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || {
                let t0 = Instant::now();
                let mut last = (t0, counters.sent());
                let mut out = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    let now = (Instant::now(), counters.sent());
                    let dt = now.0.duration_since(last.0).as_secs_f64();
                    out.push(report::Sample {
                        t_ms: now.0.duration_since(t0).as_millis() as u64,
                        bits_per_s: report::rate_bits(now.1 - last.1, dt),
                    });
                    last = now;
                }
                out
            })
            .ok();
        Sampler { stop, thread }
    }

    /// Stops sampling; returns the samples and the peak rate in bits/s.
    pub fn finish(mut self) -> (Vec<report::Sample>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let peak = samples.iter().map(|s| s.bits_per_s).max().unwrap_or(0);
        (samples, peak)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
