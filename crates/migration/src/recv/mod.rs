//! The destination side: the state machines of [`state`] driven over the control connection
//! and the page streams; pages are placed at their final address and the VM resumes only once
//! it holds everything.
mod cache;
pub mod disks;
pub mod gate;
pub mod incoming;
mod place;
mod populate;
mod postcopy;
mod session;
pub mod state;
mod streams;

use std::sync::Arc;
use std::time::{Duration, Instant};

use migratable::{PreparedVm, VmConfig, VmFactory};

use crate::protocol::{self, Kind, Prepare, ProtocolError};
use crate::MigrationError;
pub use incoming::{Incoming, Pending};
pub use state::{ReceiveMigrationState, Step, StreamState};

/// The VM a receiver built with factory `F`.
pub type Received<F> = <<F as VmFactory>::Prepared as PreparedVm>::Vm;

/// Largest VM we agree to build for a peer.
pub const MAX_MEMORY: u64 = 1 << 40;

/// Milestones of an incoming migration, for whoever watches it (a host agent). `Running` is
/// told before the vCPUs start: a receiver that is gone without having recorded it never ran
/// the VM, which is what lets a source whose switchover's outcome is unknown resume safely.
/// Nothing is told between the pause and the Confirm: a watcher that records a milestone
/// (a file) would put its file system's waits into the downtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiveEvent {
    Receiving { session: u64, name: Option<String> },
    Running,
}

/// A watcher of [`ReceiveEvent`]s.
#[derive(Clone)]
pub struct Events(pub Arc<dyn Fn(&ReceiveEvent) + Send + Sync>);

/// The commit point of a migration into a cluster: called once the VM is loaded and paused,
/// before the source is told and before any vCPU runs. `Ok` means the cluster now names this
/// host the VM's owner (and the VM must run here whatever happens to the connection); `Err`
/// means it never will (the migration fails and the source keeps the VM). It returns only
/// when it knows which.
#[derive(Clone)]
pub struct Commit(pub Arc<CommitFn>);

/// What a [`Commit`] calls: the migration's Config in, why it will never commit out.
pub type CommitFn = dyn Fn(&Prepare) -> Result<(), String> + Send + Sync;

impl std::fmt::Debug for Commit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Commit(..)")
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events(..)")
    }
}

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
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
    /// The cluster's commit point, when this host is in one.
    pub commit: Option<Commit>,
    /// This host's page cache for a drain: its id, and where this process opens it. Used
    /// when a migration's Config names that id.
    pub host_cache: Option<(u64, std::path::PathBuf)>,
    /// Where disks that migrations copy (`--storage copy`) are written; None: this host
    /// takes none.
    pub disk_dir: Option<std::path::PathBuf>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            peer_timeout: crate::send::DEFAULT_PEER_TIMEOUT,
            verify_timeout: Duration::from_secs(60),
            handshake_timeout: crate::send::DEFAULT_PEER_TIMEOUT,
            stream_accept_timeout: crate::send::DEFAULT_PEER_TIMEOUT,
            limits: gate::Limits::default(),
            expect_session: None,
            accept_within: None,
            events: None,
            commit: None,
            host_cache: None,
            disk_dir: None,
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

/// A VM that does not fit in the memory this host has free now.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
/// a {memory_mib} MiB VM does not fit: {free_mib} MiB free, {reserve_mib} MiB kept for the host
pub struct NoRoom {
    pub memory_mib: u64,
    pub free_mib: u64,
    pub reserve_mib: u64,
}

/// Whether a VM of this shape fits in the memory free now, less what the host keeps: this
/// host's answer before anything is allocated.
pub fn fits_here(vm: &VmConfig) -> Result<(), NoRoom> {
    let free = ram::host::mem_available().unwrap_or(0);
    if vm.memory > free.saturating_sub(ram::host::RESERVE) {
        return Err(NoRoom {
            memory_mib: vm.memory >> 20,
            free_mib: free >> 20,
            reserve_mib: ram::host::RESERVE >> 20,
        });
    }
    Ok(())
}

pub(super) fn check_config(p: &Prepare) -> Result<(), ProtocolError> {
    let c = &p.vm;
    let bad = |why: String| ProtocolError::Malformed {
        kind: Kind::Config,
        why,
    };
    if c.memory == 0 || c.memory > MAX_MEMORY || c.vcpus == 0 || c.vcpus > migratable::MAX_VCPUS {
        return Err(bad(format!(
            "unreasonable VM: {} bytes, {} vCPUs",
            c.memory, c.vcpus
        )));
    }
    c.check_devices().map_err(|e| bad(e.to_string()))?;
    if p.streams > protocol::MAX_STREAMS {
        return Err(bad(format!(
            "{} page streams, the limit is {}",
            p.streams,
            protocol::MAX_STREAMS
        )));
    }
    if p.disks.len() > migratable::MAX_DEVICES {
        return Err(bad(format!("{} disks to copy", p.disks.len())));
    }
    let names: Vec<String> = c.named_devices().into_iter().map(|(n, _)| n).collect();
    for d in &p.disks {
        d.check().map_err(&bad)?;
        if !d.name.starts_with("disk") || !names.contains(&d.name) {
            return Err(bad(format!("{} is not a disk of the VM", d.name)));
        }
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

/// Receives one VM on `listener`, built by `factory`, and returns it running. Connections that
/// fail (garbage, no certificate, a cut link, a VM that does not fit) are logged and the
/// receiver goes on waiting; a second migration while one is under way is turned away. A
/// receiver for one session (`expect_session`) ends once that session has started and failed.
pub fn receive<F>(
    listener: transport::Listener,
    security: transport::Security,
    opts: ReceiveOptions,
    factory: Arc<F>,
) -> Result<(Received<F>, ReceiveStats), MigrationError>
where
    F: VmFactory + Send + 'static,
    Received<F>: 'static,
{
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
        match inc.receive(p, &*factory) {
            Ok(v) => {
                let _ = tx.send(Ok(v));
            }
            // A receiver for one session ends with it: its source retries under a new one.
            // A VM lost in post-copy ends it too: it ran here, and that must be told.
            Err(e) if inc.claimed() || matches!(e, MigrationError::VmLost(_)) => {
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
fn wait_for_vm<V>(
    rx: &std::sync::mpsc::Receiver<Result<(V, ReceiveStats), MigrationError>>,
    busy: &std::sync::atomic::AtomicBool,
    accept_within: Option<Duration>,
) -> Result<(V, ReceiveStats), MigrationError> {
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
}
