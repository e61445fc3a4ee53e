//! Pre-copy live migration. Data flows one way: guest RAM → dirty tracking (vmm::dirty) →
//! page batches ([`protocol`]) → transport → [`recv`] → guest RAM. [`policy`] decides when to
//! stop iterating; [`send`] and [`recv`] are the mechanism; [`report`] says what happened.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod codec;
pub mod policy;
pub mod protocol;
pub mod recv;
pub mod report;
pub mod send;

pub use recv::{receive, ReceiveOptions, ReceiveStats};
pub use report::Report;
pub use send::{migrate, MigrateOptions, Progress};

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("protocol: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    #[error("VM: {0}")]
    Vm(#[from] vmm::VmError),
    #[error("dirty log: {0}")]
    DirtyLog(#[from] vmm::dirty::DirtyLogError),
    #[error("encoding: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a page stream failed; the migration is off")]
    StreamFailed,
    #[error("the source VM is {0}; only a running VM migrates")]
    SourceNotRunning(String),
    #[error(
        "switchover outcome unknown ({0}): the VM stays paused on the source because it may be running on the destination; check the destination before resuming it"
    )]
    OutcomeUnknown(String),
}

impl From<std::io::Error> for MigrationError {
    fn from(e: std::io::Error) -> Self {
        let p = match e.kind() {
            std::io::ErrorKind::UnexpectedEof => protocol::ProtocolError::Closed,
            _ => protocol::ProtocolError::Io(e),
        };
        MigrationError::Protocol(p)
    }
}

/// The guest's verify on the destination, as sent back to the source.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VerifyOutcome {
    pub ok: bool,
    pub detail: String,
    /// CPU the destination's receive thread used.
    pub cpu_seconds: f64,
}

/// CPU time of the calling thread (the migration's own work, not the guest's vCPUs).
pub fn thread_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_THREAD is valid on Linux.
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
                        bits_per_s: ((now.1 - last.1) as f64 * 8.0 / dt) as u64,
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
