//! QEMU's side of the drain bench: the same guests and RAM images in QEMU, drained the way
//! libvirt and KubeVirt drain a host: a fixed number of migrations at once over QMP, each to a
//! new QEMU started with `-incoming defer` on the other host.
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drain::predict::VmFacts;
use drain::Concurrency;

use super::{Config, DrainBenchOptions, DrainOutcome, Drainer, How, VmRun};
use crate::qemu::{Machine, Mode, Qemu};
use crate::testbed::Testbed;
use crate::{step, BenchError, Route, Ui};

pub struct QemuHosts {
    names: Vec<String>,
    machines: Vec<Machine>,
    /// Each VM's QEMU, wherever it runs now.
    vms: Vec<Mutex<Option<Qemu>>>,
    /// Per VM, whether it is on host A.
    on_a: Mutex<Vec<bool>>,
    /// Drains so far: names each drain's processes apart.
    generation: usize,
    port: AtomicU16,
    downtime_ms: u64,
    facts: Vec<VmFacts>,
}

impl QemuHosts {
    /// Writes each VM's RAM image and boots it in host A; refuses up front if this machine
    /// cannot hold QEMU's copies.
    pub fn start(
        o: &DrainBenchOptions,
        tb: &Testbed,
        dir: &Path,
        facts: Vec<VmFacts>,
        ui: &Ui,
    ) -> Result<Self, BenchError> {
        check_memory(o)?;
        let qdir = dir.join("qemu-drain");
        let mut machines = Vec::new();
        for v in &o.vms {
            ui.start(&format!("writing {}'s RAM image for QEMU", v.name));
            machines.push(Machine::prepare(
                &qdir,
                &qdir.join(format!("ram-{}", v.name)),
                v.memory,
                1,
                &v.workload,
                v.content,
            )?);
        }
        ui.start("booting the QEMU VMs");
        let mut vms = Vec::new();
        for (v, m) in o.vms.iter().zip(&machines) {
            let q = Qemu::start(m, &format!("{}-0", v.name), &tb.host_a, false)?;
            q.wait_console("HB ", Duration::from_secs(180))?;
            vms.push(Mutex::new(Some(q)));
        }
        ui.done(&format!("{} QEMU VMs running on host A", vms.len()));
        Ok(QemuHosts {
            names: o.vms.iter().map(|v| v.name.clone()).collect(),
            machines,
            on_a: Mutex::new(vec![true; vms.len()]),
            vms,
            generation: 0,
            port: AtomicU16::new(7800),
            downtime_ms: o.request.downtime_ms.unwrap_or(20),
            facts,
        })
    }

    /// Moves VM `i` along `route`; its run, and where it is now (the source if it failed).
    fn migrate_one(&self, i: usize, mode: Mode, route: &Route, t0: Instant) -> VmRun {
        let name = &self.names[i];
        let mut run = VmRun {
            name: name.clone(),
            memory: self.machines[i].memory,
            start_ms: t0.elapsed().as_millis() as u64,
            end_ms: 0,
            downtime_ms: None,
            cpu_seconds: None,
            moved: false,
            verified: false,
            error: None,
            stop_reason: None,
            throttle_pct_max: None,
            codec_cpu_seconds: None,
        };
        let Some(mut src) = locks::lock(&self.vms[i]).take() else {
            run.error = Some("no QEMU for it".into());
            return run;
        };
        match self.to_destination(i, &mut src, mode, route) {
            Ok((dst, info, cpu)) => {
                run.moved = true;
                run.downtime_ms = info["downtime"].as_u64();
                run.cpu_seconds = Some(cpu);
                match dst.verify(Duration::from_secs(120)) {
                    Ok(_) => run.verified = true,
                    Err(e) => run.error = Some(e.to_string()),
                }
                *locks::lock(&self.vms[i]) = Some(dst);
                locks::lock(&self.on_a)[i] = !route.from_a;
            }
            Err(e) => {
                run.error = Some(e.to_string());
                // QEMU resumes its source after a failed migration.
                *locks::lock(&self.vms[i]) = Some(src);
            }
        }
        run.end_ms = t0.elapsed().as_millis() as u64;
        run
    }

    /// A destination QEMU, the migration, and its CPU seconds on both ends.
    fn to_destination(
        &self,
        i: usize,
        src: &mut Qemu,
        mode: Mode,
        route: &Route,
    ) -> Result<(Qemu, serde_json::Value, f64), BenchError> {
        let port = self.port.fetch_add(1, Ordering::SeqCst);
        let name = format!("{}-{}", self.names[i], self.generation + 1);
        let mut dst = Qemu::start(&self.machines[i], &name, route.dst_ns(), true)?;
        dst.incoming(mode, &format!("0.0.0.0:{port}"))?;
        let (cs, cd) = (src.migration_cpu_seconds(), dst.migration_cpu_seconds());
        let info = src.migrate(
            mode,
            &format!("{}:{port}", route.pairs()[0].1),
            self.downtime_ms,
            route.timeout(self.machines[i].memory),
        )?;
        dst.wait_running(Duration::from_secs(30))?;
        let cpu = src.migration_cpu_seconds() - cs + dst.migration_cpu_seconds() - cd;
        Ok((dst, info, cpu))
    }
}

/// QEMU's source keeps a copy of the RAM image it loaded beside the RAM; destinations in
/// flight hold another copy each.
fn check_memory(o: &DrainBenchOptions) -> Result<(), BenchError> {
    let total: u64 = o.vms.iter().map(|v| v.memory).sum();
    let largest = o.vms.iter().map(|v| v.memory).max().unwrap_or(0);
    let need = 2 * total + 2 * largest + (1 << 30);
    match ram::host::mem_available() {
        Some(avail) if need > avail => Err(step("QEMU")(format!(
            "{} MiB of QEMU VMs need about {} MiB free (the source keeps a copy of each RAM image), this machine has {} MiB",
            total >> 20,
            need >> 20,
            avail >> 20
        ))),
        _ => Ok(()),
    }
}

impl Drainer for QemuHosts {
    fn peer(&self) -> &'static str {
        "qemu"
    }

    fn on_a(&self) -> bool {
        let sides = locks::lock(&self.on_a);
        sides.iter().filter(|a| **a).count() * 2 >= sides.len()
    }

    fn fresh_guests(&mut self) -> Result<(), BenchError> {
        Err(step("booting QEMU's VMs afresh")(
            "QEMU's VMs boot once per bench, before its first row",
        ))
    }

    fn drain(&mut self, cfg: &Config, route: &Route) -> Result<DrainOutcome, BenchError> {
        let How::Qemu(mode) = cfg.how else {
            return Err(step("bench")("not a QEMU configuration"));
        };
        let window = match cfg.concurrency {
            Concurrency::Fixed(n) => n,
            Concurrency::Auto => 2,
        };
        // The VMs on the route's source host.
        let here: VecDeque<usize> = locks::lock(&self.on_a)
            .iter()
            .enumerate()
            .filter(|(_, a)| **a == route.from_a)
            .map(|(i, _)| i)
            .collect();
        let n = here.len();
        let queue = Mutex::new(here);
        let runs = Mutex::new(Vec::new());
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..window.min(n) {
                s.spawn(|| loop {
                    let Some(i) = locks::lock(&queue).pop_front() else {
                        return;
                    };
                    let run = self.migrate_one(i, mode, route, t0);
                    locks::lock(&runs).push(run);
                });
            }
        });
        let makespan_ms = t0.elapsed().as_millis() as u64;
        let mut vms = runs.into_inner().unwrap_or_default();
        vms.sort_by_key(|v| v.start_ms);
        self.generation += 1;
        Ok(DrainOutcome {
            makespan_ms,
            concurrency_used: window,
            peak: window.min(vms.len()),
            survey_s: 0.0,
            facts: self.facts.clone(),
            cpu: None,
            vcpu_yield: false,
            vms,
            path_bps: None,
            path_is_floor: false,
            cache: false,
            overhead_s: drain::predict::OVERHEAD_S,
            raw: Vec::new(),
            raw_cpu: None,
            detail: serde_json::Value::Null,
        })
    }
}
