//! The VMMs a bench migrates with, behind one trait: livemig and QEMU boot the same guest and
//! RAM and migrate it along the same route, and the bench measures every run alike around them.
use std::path::PathBuf;
use std::time::Duration;

use migration::{MigrateRequest, Report};
use serde_json::Value;
use vmm::api::Client;

use crate::qemu::{Machine, Mode, Qemu};
use crate::{step, BenchError, Route};
use host::child::{Livemig, VmProcess};

/// What a VMM says about one of its migrations.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub total_ms: u64,
    pub downtime_ms: Option<u64>,
    pub setup_ms: Option<u64>,
    /// What the VMM itself says it sent.
    pub reported_bytes: u64,
    pub cpu_source_s: Option<f64>,
    pub cpu_destination_s: Option<f64>,
    pub verified: bool,
    pub verify: String,
    /// The VMM's own account: livemig's report, QEMU's query-migrate.
    pub detail: Value,
}

/// How one run migrates: livemig's transport and streams, or QEMU's mode.
#[derive(Clone, Copy, Debug)]
pub enum Setup {
    Livemig {
        transport: migration::protocol::Transport,
        /// One page stream per link (`--network`), beyond the control connection.
        per_link_streams: bool,
        /// Mutual TLS (else plaintext, as QEMU runs by default).
        tls: bool,
        /// Post-copy for this run (None: as the bench's request says).
        postcopy: Option<migration::policy::PostcopyMode>,
    },
    Qemu(Mode),
}

/// A VMM the bench drives.
pub trait Peer {
    /// A running VM (or one waiting for a migration).
    type Vm;

    fn name(&self) -> &'static str;

    /// Boots the VM in namespace `ns`; returns once its guest runs.
    fn boot(&mut self, ns: &str) -> Result<Self::Vm, BenchError>;

    /// Starts the destination of a run, listening on `port` in the route's destination host.
    fn destination(
        &mut self,
        setup: Setup,
        route: &Route,
        port: u16,
        index: usize,
    ) -> Result<Self::Vm, BenchError>;

    /// Migrates `src` to `dst` and waits for the end.
    fn migrate(
        &mut self,
        src: &mut Self::Vm,
        dst: &mut Self::Vm,
        setup: Setup,
        route: &Route,
        port: u16,
    ) -> Result<Outcome, BenchError>;

    /// After a run: where the VM is now, and whether that is the destination.
    fn settle(&mut self, src: Self::Vm, dst: Self::Vm, migrated: bool) -> (Self::Vm, bool);

    /// The guest console of the VM booted (`index` 0) or received by run `index`.
    fn console(&self, index: usize) -> PathBuf;
}

/// livemig: `livemig run` / `livemig receive` processes, migrated through the VM's API.
pub struct LivemigPeer {
    /// Processes with the bench's cluster credentials (for TLS runs).
    pub exe: Livemig,
    /// The same binary, plaintext.
    pub insecure: Livemig,
    /// The bench's credentials, sent with each TLS run's request (the VM may have arrived in a
    /// plaintext receiver, whose own default is plaintext).
    pub tls: transport::tls::TlsFiles,
    pub dir: PathBuf,
    /// The VM: `livemig run` arguments (memory, vCPUs, workload, memory profile).
    pub vm_args: Vec<String>,
    /// Options every migration takes (downtime target, auto-converge, ...).
    pub request: MigrateRequest,
    pub memory: u64,
    /// With disks that move (`--storage copy`): each host's disk directory is
    /// `<this>/<host>-disks`.
    pub disk_dirs: Option<PathBuf>,
}

/// Where a host keeps the disks that migrations copy to it.
pub fn host_disk_dir(base: &std::path::Path, ns: &str) -> PathBuf {
    base.join(format!("{ns}-disks"))
}

impl Peer for LivemigPeer {
    type Vm = VmProcess;

    fn name(&self) -> &'static str {
        "livemig"
    }

    fn boot(&mut self, ns: &str) -> Result<VmProcess, BenchError> {
        let mut args = self.vm_args.clone();
        args.push("--console".into());
        args.push(self.dir.join("livemig-0.console").display().to_string());
        self.exe
            .run(
                Some(ns),
                &args,
                &self.dir.join("livemig-0.sock"),
                Some(self.dir.join("livemig-0.log")),
            )
            .map_err(step("starting the livemig VM"))
    }

    fn destination(
        &mut self,
        setup: Setup,
        route: &Route,
        port: u16,
        index: usize,
    ) -> Result<VmProcess, BenchError> {
        let tls = matches!(setup, Setup::Livemig { tls: true, .. });
        let mut exe = if tls { &self.exe } else { &self.insecure }.clone();
        if let Some(base) = &self.disk_dirs {
            let d = host_disk_dir(base, route.dst_ns());
            std::fs::create_dir_all(&d)?;
            exe = exe.with_disk_dir(Some(&d));
        }
        exe.receive(
            Some(route.dst_ns()),
            &format!("0.0.0.0:{port}"),
            &self.dir.join(format!("livemig-{index}.sock")),
            &self.dir.join(format!("livemig-{index}.console")),
            Some(self.dir.join(format!("livemig-{index}.log"))),
        )
        .map_err(step("starting livemig receive"))
    }

    fn migrate(
        &mut self,
        src: &mut VmProcess,
        _dst: &mut VmProcess,
        setup: Setup,
        route: &Route,
        port: u16,
    ) -> Result<Outcome, BenchError> {
        let Setup::Livemig {
            transport,
            per_link_streams,
            tls,
            postcopy,
        } = setup
        else {
            return Err(step("bench")("not a livemig run"));
        };
        let pairs = route.pairs();
        let req = MigrateRequest {
            to: format!("{}:{port}", pairs[0].1),
            transport: Some(transport),
            network: per_link_streams.then(|| {
                pairs
                    .iter()
                    .map(|(l, r)| format!("{l}>{r}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            insecure: !tls,
            tls: tls.then(|| self.tls.clone()),
            postcopy: postcopy.or(self.request.postcopy),
            ..self.request.clone()
        };
        let body =
            serde_json::to_value(&req).map_err(|e| step("migrate request")(e.to_string()))?;
        let report: Report = Client::new(&src.api)
            .with_timeout(route.timeout(self.memory))
            .call("POST", "/vm/migrate", Some(body))
            .map_err(|e| {
                step(format!("livemig {transport} over {}", route.name()))(e.to_string())
            })?;
        Ok(Outcome {
            total_ms: report.total_ms,
            downtime_ms: Some(report.downtime_ms),
            setup_ms: Some(report.phases.prepare_ms),
            reported_bytes: report.bytes_on_wire,
            cpu_source_s: Some(report.cpu_seconds.source),
            cpu_destination_s: Some(report.cpu_seconds.destination),
            verified: report.guest_verified,
            verify: report.guest_verify.clone().unwrap_or_default(),
            detail: serde_json::to_value(&report).unwrap_or_default(),
        })
    }

    fn console(&self, index: usize) -> PathBuf {
        self.dir.join(format!("livemig-{index}.console"))
    }

    fn settle(&mut self, mut src: VmProcess, dst: VmProcess, migrated: bool) -> (VmProcess, bool) {
        if migrated {
            // The source process leaves by itself once the VM runs on the destination.
            src.wait_exit_for(Duration::from_secs(10));
            return (dst, true);
        }
        // A failed migration leaves the VM running on its source. If the source left all the
        // same, the VM made it and only the answer was lost: go on from the destination.
        let moved = src.wait_exit_for(Duration::from_secs(5))
            && Client::new(&dst.api)
                .status()
                .is_ok_and(|st| st.state == vmm::RunState::Running);
        if moved {
            (dst, true)
        } else {
            (src, false)
        }
    }
}

/// QEMU: Debian's qemu-system-x86_64 with the same guest and RAM, driven over QMP.
pub struct QemuPeer {
    pub machine: Machine,
    pub downtime_ms: u64,
    /// With disks that move: each host's disk directory is `<this>/<host>-disks`, and the
    /// disk goes by NBD and `blockdev-mirror` (write-blocking), as libvirt moves it.
    pub disk_dirs: Option<PathBuf>,
    /// Where the VM's disk is now, and where the run under way copies it.
    pub disk: Option<PathBuf>,
    pending: Option<PathBuf>,
}

impl QemuPeer {
    pub fn new(machine: Machine, downtime_ms: u64, disk_dirs: Option<PathBuf>) -> Self {
        let disk = machine.devices.as_ref().map(|d| d.disk.clone());
        QemuPeer {
            machine,
            downtime_ms,
            disk_dirs,
            disk,
            pending: None,
        }
    }

    /// An empty (sparse) image the size of the VM's disk on the destination, which the
    /// destination QEMU is started on.
    fn target_disk(&mut self, route: &Route) -> Result<(), BenchError> {
        let (Some(base), Some(disk), Some(dev)) =
            (&self.disk_dirs, &self.disk, self.machine.devices.as_mut())
        else {
            return Ok(());
        };
        let dir = host_disk_dir(base, route.dst_ns());
        std::fs::create_dir_all(&dir)?;
        let target = dir.join("qemu.img");
        let _ = std::fs::remove_file(&target);
        let size = std::fs::metadata(disk)?.len();
        std::fs::File::create(&target)?.set_len(size)?;
        dev.disk.clone_from(&target);
        self.pending = Some(target);
        Ok(())
    }
}

/// Bytes `dev` has sent in namespace `ns`.
fn tx_bytes(ns: &str, dev: &str) -> u64 {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/{dev}/statistics/tx_bytes"))
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// The port a destination QEMU serves its disk on, beside the migration's.
fn nbd_port(port: u16) -> u16 {
    port + 100
}

impl Peer for QemuPeer {
    type Vm = Qemu;

    fn name(&self) -> &'static str {
        "qemu"
    }

    fn boot(&mut self, ns: &str) -> Result<Qemu, BenchError> {
        let vm = Qemu::start(&self.machine, "qemu-0", ns, false)?;
        vm.wait_console("HB ", Duration::from_secs(120))?;
        Ok(vm)
    }

    fn destination(
        &mut self,
        setup: Setup,
        route: &Route,
        port: u16,
        index: usize,
    ) -> Result<Qemu, BenchError> {
        let Setup::Qemu(mode) = setup else {
            return Err(step("bench")("not a QEMU run"));
        };
        let name = format!("qemu-{index}");
        self.target_disk(route)?;
        let mut q = Qemu::start(&self.machine, &name, route.dst_ns(), true)?;
        q.incoming(mode, &format!("0.0.0.0:{port}"))?;
        if self.pending.is_some() {
            q.export_disk(&format!("0.0.0.0:{}", nbd_port(port)))?;
        }
        Ok(q)
    }

    fn migrate(
        &mut self,
        src: &mut Qemu,
        dst: &mut Qemu,
        setup: Setup,
        route: &Route,
        port: u16,
    ) -> Result<Outcome, BenchError> {
        let Setup::Qemu(mode) = setup else {
            return Err(step("bench")("not a QEMU run"));
        };
        let (cpu_s0, cpu_d0) = (src.migration_cpu_seconds(), dst.migration_cpu_seconds());
        let mut disk = None;
        if self.pending.is_some() {
            let link = route.links[0];
            let dev = if route.from_a {
                &link.dev_a
            } else {
                &link.dev_b
            };
            let (t, b0) = (std::time::Instant::now(), tx_bytes(route.src_ns(), dev));
            src.mirror_disk(
                &format!("{}:{}", route.pairs()[0].1, nbd_port(port)),
                route.timeout(self.machine.memory + (4 << 30)),
            )?;
            disk = Some((
                t.elapsed().as_millis() as u64,
                tx_bytes(route.src_ns(), dev).saturating_sub(b0),
            ));
        }
        let mut info = src.migrate(
            mode,
            &format!("{}:{port}", route.pairs()[0].1),
            self.downtime_ms,
            route.timeout(self.machine.memory),
        )?;
        dst.wait_running(Duration::from_secs(30))?;
        if matches!(mode, crate::qemu::Mode::Postcopy) {
            // Post-copy's fault figures are the destination's.
            info["destination"] = dst.query_migrate()?;
        }
        if let Some((ms, bytes)) = disk {
            src.end_mirror()?;
            dst.stop_export()?;
            info["disk_ms"] = ms.into();
            info["disk_bytes"] = bytes.into();
            let ram = info["total-time"].as_u64().unwrap_or(0);
            info["total-time"] = (ram + ms).into();
        }
        let (cpu_s1, cpu_d1) = (src.migration_cpu_seconds(), dst.migration_cpu_seconds());
        let (verified, verify) = match dst.verify(Duration::from_secs(60)) {
            Ok(v) => (true, v),
            Err(e) => (false, e.to_string()),
        };
        Ok(Outcome {
            total_ms: info["total-time"].as_u64().unwrap_or(0),
            downtime_ms: info["downtime"].as_u64(),
            setup_ms: info["setup-time"].as_u64(),
            reported_bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
            cpu_source_s: Some(cpu_s1 - cpu_s0),
            cpu_destination_s: Some(cpu_d1 - cpu_d0),
            verified,
            verify,
            detail: info,
        })
    }

    fn console(&self, index: usize) -> PathBuf {
        self.machine.dir.join(format!("qemu-{index}.console"))
    }

    fn settle(&mut self, src: Qemu, dst: Qemu, migrated: bool) -> (Qemu, bool) {
        // A copied disk: the VM's is the copy now, and the source's goes (--remove-source);
        // after a failure the copy goes.
        if let Some(target) = self.pending.take() {
            let old = if migrated {
                self.disk.replace(target)
            } else {
                Some(target)
            };
            if let (Some(d), Some(now)) = (self.machine.devices.as_mut(), &self.disk) {
                d.disk.clone_from(now);
            }
            if let Some(old) = old {
                let _ = std::fs::remove_file(old);
            }
        }
        // QEMU resumes its source after a failed migration.
        if migrated {
            (dst, true)
        } else {
            (src, false)
        }
    }
}
