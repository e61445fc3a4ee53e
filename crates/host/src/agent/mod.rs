//! The host agent: the VMs of one host, each its own process, and the migrations into and out
//! of it. Its state is a map of VM entries under one lock, mirrored on disk in `DIR/vms/NAME`
//! so that a restarted agent finds its VMs again; a reaper notices VM processes that end.
//!
//! - [`vms`]: a VM's record, process and phase.
//! - [`inbound`]: incoming migrations, each handed to its own receiver process, and what became
//!   of them (the proof a source needs before resuming a VM whose switchover it lost track of).
//! - [`routes`]: the API (see [`crate::api`]).
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use migration::Incoming;
use transport::Security;
use vmm::VmConfig;

use crate::api::{Capacity, IncomingFate};
use crate::child::Livemig;

mod caches;
mod drains;
mod inbound;
mod membership;
mod metrics;
mod routes;
mod vms;

use vms::{Entry, Phase, Proc};

/// How an agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This host's name, as VMs that leave it give their origin.
    pub name: String,
    /// Where migrations come in (`0.0.0.0:7000`).
    pub listen: String,
    /// Its state: `host.sock`, and `vms/NAME/` per VM.
    pub dir: PathBuf,
    /// Incoming migrations at once; more are refused with a reason.
    pub max_inbound: usize,
    /// Memory this host gives VMs in all (None: all it has less [`ram::host::RESERVE`]).
    pub vm_memory: Option<u64>,
    /// The deadline on progress of every migration in or out.
    pub peer_timeout: Duration,
    /// The credentials of the listener and of every VM process.
    pub security: Security,
    /// How to start VM processes (`livemig run`, `livemig receive`).
    pub livemig: Livemig,
    /// The bridge VMs' taps go on here (the same as `livemig`'s children are told).
    pub bridge: Option<String>,
    /// The directories arriving VMs' disks may be in.
    pub storage: Vec<PathBuf>,
    /// Where disks that migrations copy here are written (`--disk-dir`).
    pub disk_dir: Option<PathBuf>,
    /// The cluster's etcd, when the host is a member of one (`--cluster`).
    pub cluster: Option<cluster::Endpoints>,
    /// CPU features this host does not offer (`--cpu-features -avx2`).
    pub cpu_mask: Vec<String>,
    /// Where to serve the Prometheus metrics (`--metrics ADDR:PORT`).
    pub metrics: Option<String>,
}

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum AgentError {
    /// preparing the agent's directory {path}: {source}
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// {0}
    Listen(#[from] transport::TransportError),
    /// {0}
    Api(#[from] unixhttp::ApiError),
    /// {0}
    Cluster(#[from] cluster::ClusterError),
    /// {0}
    Metrics(#[from] metrics::MetricsError),
    /// starting the agent's {what} thread: {source}
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Why a VM may not come to (or start on) this host now.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum AdmitError {
    /// {0}
    Name(#[from] vms::BadName),
    /// a VM named {name} is already on host {host}
    NameTaken { name: String, host: String },
    /// an earlier migration of {name} is still arriving on host {host}: its receiver gives up within its accept window if no source comes
    StillArriving { name: String, host: String },
    /// host {host} already takes {inbound} incoming migrations (--max-inbound {max})
    Busy {
        host: String,
        inbound: usize,
        max: usize,
    },
    /// {vcpus} vCPUs: this VMM runs 1 to {max}
    Vcpus { vcpus: u8, max: u8 },
    /// {name} ({memory_mib} MiB) does not fit on host {host}: room for {room_mib} MiB ({free_mib} MiB free, {committed_mib} MiB promised to {vms} VMs, {arriving_mib} MiB arriving)
    NoRoom {
        name: String,
        host: String,
        memory_mib: u64,
        room_mib: u64,
        free_mib: u64,
        committed_mib: u64,
        vms: usize,
        arriving_mib: u64,
    },
    /// host {host} is cordoned in the cluster: it takes no VMs until it is uncordoned
    Cordoned { host: String },
    /// host {host}'s CPU does not offer {missing} that {name} sees
    CpuFeatures {
        name: String,
        host: String,
        missing: String,
    },
    /// starting a receiver for {name}: {why}
    Receiver { name: String, why: String },
}

impl AdmitError {
    /// Whether a later attempt may succeed without anything changing but time: the host
    /// takes too many migrations at once (a source is told the destination is busy).
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            AdmitError::Busy { .. } | AdmitError::StillArriving { .. }
        )
    }

    /// Why a VM named `name` cannot come to `host`, where a VM of that name is in `phase`:
    /// for now while an earlier migration of it still arrives (an attempt its source gave up
    /// on leaves a receiver waiting until its accept window ends), else for good.
    fn name_taken(name: &str, host: &str, phase: &vms::Phase, inbound: bool) -> Self {
        let (name, host) = (name.to_string(), host.to_string());
        if inbound && *phase == vms::Phase::Arriving {
            AdmitError::StillArriving { name, host }
        } else {
            AdmitError::NameTaken { name, host }
        }
    }
}

/// Remember what became of this many incoming migrations.
const MAX_FATES: usize = 256;
/// How often the reaper looks at the VM processes (an arrival whose source went silent frees
/// its slot this long after its receiver gave up).
const REAP_EVERY: Duration = Duration::from_millis(100);
/// In a cluster, failed VMs are checked for having moved every this many reaps (2 s).
const MOVED_EVERY_TICKS: u32 = 20;

pub struct Agent {
    cfg: AgentConfig,
    listen: SocketAddr,
    vms: Mutex<BTreeMap<String, Entry>>,
    fates: Mutex<VecDeque<(u64, IncomingFate)>>,
    incoming: Arc<Incoming>,
    stopped: AtomicBool,
    /// Drains' page caches, by id.
    caches: Mutex<caches::Caches>,
    /// The cluster it belongs to, if any.
    cluster: Option<membership::InCluster>,
    /// The CPU features it offers guests (None: unknown).
    cpu_features: Option<std::collections::BTreeSet<String>>,
    metrics: metrics::Metrics,
    /// Its VM processes' CPU, and what its migrations cost.
    cpu: Mutex<crate::cpu::CpuMeter>,
}

/// A started agent: its API answers and its listener takes migrations until [`Self::stop`].
pub struct Running {
    pub agent: Arc<Agent>,
    server: Option<unixhttp::Server>,
    threads: Vec<JoinHandle<()>>,
    /// Its place in the cluster, left when it stops.
    membership: Option<cluster::Membership>,
    metrics: Option<metrics::Server>,
}

impl Agent {
    /// Prepares `cfg.dir`, finds the VMs a previous agent left running, listens, and serves
    /// the API on `DIR/host.sock`.
    pub fn start(cfg: AgentConfig) -> Result<Running, AgentError> {
        let dir_err = |path: &PathBuf| {
            let path = path.clone();
            move |source| AgentError::Dir { path, source }
        };
        let vms_dir = cfg.dir.join("vms");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vms_dir)
            .map_err(dir_err(&vms_dir))?;
        let listener = transport::Listener::bind(&cfg.listen)?;
        let listen = listener.local_addr().map_err(dir_err(&cfg.dir))?;
        let opts = migration::ReceiveOptions {
            peer_timeout: cfg.peer_timeout,
            handshake_timeout: cfg.peer_timeout,
            stream_accept_timeout: cfg.peer_timeout,
            ..Default::default()
        };
        let incoming = Incoming::new(listener, cfg.security.clone(), opts);
        let cluster = cfg
            .cluster
            .as_ref()
            .map(membership::InCluster::connect)
            .transpose()?;
        let cpu_features = vmm::vm::host_cpu_features(&cfg.cpu_mask)
            .map_err(|e| tracing::warn!("this host's CPU features are unknown: {e}"))
            .ok();
        let agent = Arc::new(Agent {
            metrics: metrics::Metrics::new(),
            cpu: Mutex::new(crate::cpu::CpuMeter::new(cfg.dir.join("cpu-costs.json"))),
            cpu_features,
            cfg,
            listen,
            vms: Mutex::new(BTreeMap::new()),
            fates: Mutex::new(VecDeque::new()),
            incoming,
            stopped: AtomicBool::new(false),
            caches: Mutex::new(caches::Caches::new()),
            cluster,
        });
        agent.adopt();
        agent.reconcile();
        let mut threads = vec![agent.spawn_accept()?, agent.spawn_reaper()?];
        threads.extend(agent.spawn_drains()?);
        let server = routes::serve(&agent)?;
        let metrics = match &agent.cfg.metrics {
            Some(addr) => Some(metrics::Server::start(&agent, addr)?),
            None => None,
        };
        let membership = agent.join()?;
        Ok(Running {
            agent,
            server: Some(server),
            threads,
            membership,
            metrics,
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn api_path(&self) -> PathBuf {
        self.cfg.dir.join("host.sock")
    }

    fn spawn_accept(self: &Arc<Self>) -> Result<JoinHandle<()>, AgentError> {
        let a = self.clone();
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || {
                let me = a.clone();
                a.incoming
                    .serve(Arc::new(move |p| me.clone().on_migration(p)));
            })
            .map_err(|source| AgentError::Thread {
                what: "accept",
                source,
            })
    }

    fn spawn_reaper(self: &Arc<Self>) -> Result<JoinHandle<()>, AgentError> {
        let a = self.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                let mut ticks = 0u32;
                while !a.stopped.load(Ordering::SeqCst) {
                    a.reap();
                    a.expire_caches();
                    ticks = ticks.wrapping_add(1);
                    if ticks.is_multiple_of(MOVED_EVERY_TICKS) {
                        a.forget_moved();
                    }
                    std::thread::sleep(REAP_EVERY);
                }
            })
            .map_err(|source| AgentError::Thread {
                what: "reaper",
                source,
            })
    }

    /// Finds the VMs a previous agent left: their process still serving their API socket is
    /// the proof they are ours. Arrivals whose receiver is gone without having run the VM are
    /// cleared; VMs whose process is gone are listed as failed.
    fn adopt(&self) {
        let Ok(dirs) = std::fs::read_dir(self.cfg.dir.join("vms")) else {
            return;
        };
        let mut vms = locks::lock(&self.vms);
        for dir in dirs.flatten().map(|d| d.path()) {
            let Some(rec) = vms::read_record(&dir) else {
                tracing::warn!("{}: no readable vm.json; left alone", dir.display());
                continue;
            };
            let api = vms::api_of(&dir);
            let adopted = vms::Adopted::take(rec.pid, &api);
            let alive = adopted.is_some();
            let mut e = Entry {
                proc: Proc::Adopted(adopted.unwrap_or_else(|| vms::Adopted::gone(rec.pid, &api))),
                phase: Phase::Running,
                dir,
                rec,
            };
            let status = e.status_file().read();
            let ran = status.as_ref().is_none_or(|s| s.may_have_run());
            e.phase = match (alive, ran) {
                (true, true) => Phase::Running,
                (true, false) => Phase::Arriving,
                (false, true) => Phase::Failed(format!(
                    "its process (pid {}) was gone when the agent started",
                    e.rec.pid
                )),
                (false, false) => {
                    self.forget(e, IncomingFate::NeverRan);
                    continue;
                }
            };
            tracing::info!(name = %e.rec.name, phase = e.phase.name(), "found a VM");
            vms.insert(e.rec.name.clone(), e);
        }
    }

    /// Notices VM processes that ended and arrivals that completed or failed.
    fn reap(&self) {
        self.reap_in(&mut locks::lock(&self.vms));
    }

    fn reap_in(&self, vms: &mut BTreeMap<String, Entry>) {
        let mut gone = Vec::new();
        for (name, e) in vms.iter_mut() {
            match &e.phase {
                Phase::Arriving => {
                    if let Some(fate) = self.check_arrival(e) {
                        gone.push((name.clone(), fate));
                    }
                }
                Phase::Starting | Phase::Running | Phase::Unresolved(_) => {
                    if let Some(how) = e.proc.exited() {
                        let why = format!("the VM process exited ({how}): {}", e.log_tail());
                        tracing::warn!(name = %name, "VM failed: {why}");
                        e.phase = Phase::Failed(why);
                    }
                }
                // A migrating VM's process ends when it has moved, a stopping one's when
                // it was told to: their routes decide.
                Phase::Migrating { .. } | Phase::Stopping | Phase::Failed(_) => {}
            }
        }
        for (name, fate) in gone {
            if let Some(e) = vms.remove(&name) {
                self.forget(e, fate);
            }
        }
    }

    /// An arriving VM's receiver, looked at: running (the VM arrived), still at it, or gone;
    /// gone without having run the VM means it never ran here, and its entry goes.
    fn check_arrival(&self, e: &mut Entry) -> Option<IncomingFate> {
        let status = e.status_file().read();
        let ran = status.as_ref().is_some_and(|s| s.may_have_run());
        match (e.proc.exited(), ran) {
            (None, true) => {
                e.phase = Phase::Running;
                self.metrics.count("in", "completed");
                None
            }
            (None, false) => None,
            (Some(how), true) => {
                e.phase = Phase::Failed(format!(
                    "the VM process exited ({how}) after the VM arrived: {}",
                    e.log_tail()
                ));
                None
            }
            (Some(how), false) => {
                self.metrics.count("in", "failed");
                tracing::warn!(
                    name = %e.rec.name,
                    "incoming migration failed ({how}): {}",
                    match status {
                        Some(crate::status::Incoming::Failed { error }) => error,
                        _ => e.log_tail(),
                    }
                );
                Some(IncomingFate::NeverRan)
            }
        }
    }

    /// Removes a VM's directory; an arrival's fate is remembered for its source.
    fn forget(&self, e: Entry, fate: IncomingFate) {
        if let Some(s) = e.rec.session {
            let mut f = locks::lock(&self.fates);
            if f.len() >= MAX_FATES {
                f.pop_front();
            }
            f.push_back((s, fate));
        }
        if let Err(err) = std::fs::remove_dir_all(&e.dir) {
            tracing::warn!("removing {}: {err}", e.dir.display());
        }
    }

    /// What this host holds and can take, from its VM map.
    fn capacity_of(&self, vms: &BTreeMap<String, Entry>) -> Capacity {
        let memory_total = ram::host::mem_total().unwrap_or(0);
        let memory_free = ram::host::mem_available().unwrap_or(0);
        let committing = || vms.values().filter(|e| e.phase.commits_memory());
        let committed: u64 = committing().map(|e| e.rec.memory).sum();
        let arriving_vms = || vms.values().filter(|e| e.phase == Phase::Arriving);
        let arriving: u64 = arriving_vms().map(|e| e.rec.memory).sum();
        let budget = self
            .cfg
            .vm_memory
            .unwrap_or(memory_total.saturating_sub(ram::host::RESERVE));
        // Promised memory counts whole against the budget (no overcommit), and arrivals
        // against what is free now (they are not resident yet); so do page caches.
        let caches = self.cache_bytes();
        let room = budget.saturating_sub(committed + caches).min(
            memory_free
                .saturating_sub(ram::host::RESERVE)
                .saturating_sub(arriving + caches),
        );
        let outbound = vms
            .values()
            .filter(|e| matches!(e.phase, Phase::Migrating { .. }))
            .count();
        Capacity {
            name: self.cfg.name.clone(),
            listen: self.listen.to_string(),
            memory_total,
            memory_free,
            committed,
            arriving,
            caches,
            room,
            vms: vms.len(),
            inbound: arriving_vms().count(),
            outbound,
            max_inbound: self.max_inbound(),
            bridge: self
                .cfg
                .bridge
                .clone()
                .filter(|b| Path::new("/sys/class/net").join(b).join("bridge").exists()),
            copy_room: self
                .cfg
                .disk_dir
                .as_deref()
                .and_then(|d| migration::recv::disks::free_bytes(d).ok()),
            cpu_features: self
                .cpu_features
                .as_ref()
                .map(|f| f.iter().cloned().collect()),
        }
    }

    /// Whether a VM named `name` of this shape may come here now; why not, if not.
    fn admit(
        &self,
        vms: &BTreeMap<String, Entry>,
        name: &str,
        vm: &VmConfig,
        inbound: bool,
    ) -> Result<(), AdmitError> {
        vms::check_name(name)?;
        let host = &self.cfg.name;
        if let Some(e) = vms.get(name) {
            return Err(AdmitError::name_taken(name, host, &e.phase, inbound));
        }
        if inbound && self.cordoned() {
            return Err(AdmitError::Cordoned { host: host.clone() });
        }
        let cap = self.capacity_of(vms);
        let max_inbound = self.max_inbound();
        if inbound && cap.inbound >= max_inbound {
            return Err(AdmitError::Busy {
                host: host.clone(),
                inbound: cap.inbound,
                max: max_inbound,
            });
        }
        if vm.vcpus == 0 || vm.vcpus > vmm::vm::MAX_VCPUS {
            return Err(AdmitError::Vcpus {
                vcpus: vm.vcpus,
                max: vmm::vm::MAX_VCPUS,
            });
        }
        if let Some(offered) = self.cpu_features.as_ref().filter(|_| inbound) {
            let missing = migratable::cpu::missing(&vm.cpu_features, offered);
            if !missing.is_empty() {
                return Err(AdmitError::CpuFeatures {
                    name: name.into(),
                    host: host.clone(),
                    missing: missing.join(", "),
                });
            }
        }
        if vm.memory > cap.room {
            return Err(AdmitError::NoRoom {
                name: name.into(),
                host: host.clone(),
                memory_mib: vm.memory >> 20,
                room_mib: cap.room >> 20,
                free_mib: cap.memory_free >> 20,
                committed_mib: cap.committed >> 20,
                vms: cap.vms,
                arriving_mib: cap.arriving >> 20,
            });
        }
        Ok(())
    }
}

impl Running {
    /// Stops listening and serving the API. The VMs go on running: a new agent on the same
    /// directory finds them.
    pub fn stop(mut self) {
        // Out of the cluster first: nothing is placed here from now.
        self.membership.take();
        self.metrics.take();
        self.agent.stopped.store(true, Ordering::SeqCst);
        self.agent.incoming.stop();
        self.server.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_still_arriving_turns_a_migration_away_for_now_and_a_running_one_for_good() {
        let arriving = AdmitError::name_taken("sql3", "a", &vms::Phase::Arriving, true);
        assert!(arriving.is_busy(), "{arriving}");
        assert!(arriving.to_string().contains("still arriving on host a"));
        let running = AdmitError::name_taken("sql3", "a", &vms::Phase::Running, true);
        assert!(!running.is_busy());
        assert_eq!(running.to_string(), "a VM named sql3 is already on host a");
        // Creating a VM (not a migration) under a name that arrives: taken.
        assert!(!AdmitError::name_taken("sql3", "a", &vms::Phase::Arriving, false).is_busy());
    }
}
