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
        let exe = if tls { &self.exe } else { &self.insecure };
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
        let mut q = Qemu::start(&self.machine, &name, route.dst_ns(), true)?;
        q.incoming(mode, &format!("0.0.0.0:{port}"))?;
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
        let info = src.migrate(
            mode,
            &format!("{}:{port}", route.pairs()[0].1),
            self.downtime_ms,
            route.timeout(self.machine.memory),
        )?;
        dst.wait_running(Duration::from_secs(30))?;
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
        // QEMU resumes its source after a failed migration.
        if migrated {
            (dst, true)
        } else {
            (src, false)
        }
    }
}
