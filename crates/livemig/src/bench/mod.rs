//! `livemig bench transports`: the measured comparison. One running VM migrates between the
//! testbed's two hosts once per transport configuration, on the links the reference layout
//! gives each (tcp and compressed on one 1 GbE link, direct on one 10 GbE link, direct +
//! multichannel on both), after each link's raw goodput is measured in the same run.
//! `--peer qemu` migrates the same guest and RAM with QEMU on the same links.
mod chart;
mod netns;
mod qemu;
mod table;

pub use table::render;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use guest::WorkloadSpec;
use migration::Report;
use serde::Serialize;
use vmm::api::Client;
use vmm::profile::{MemoryProfile, ProfileFiller};

use crate::child::{spawn_until, VmProcess};
use crate::testbed::{Link, Testbed};
use netns::{measure_goodput, Goodput, TxSampler};
use qemu::{Machine, Mode, Qemu};

#[derive(clap::Args)]
pub struct TransportsArgs {
    /// Guest RAM (8G reproduces the reference VM).
    #[arg(long, default_value = "2G", value_parser = crate::parse_size)]
    pub memory: u64,
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    #[arg(long, default_value = "sql")]
    pub workload: String,
    #[arg(long, default_value = "server")]
    pub memory_profile: MemoryProfile,
    /// Also migrate the same guest and RAM with this VMM on the same links.
    #[arg(long, value_parser = ["qemu"])]
    pub peer: Option<String>,
    /// Testbed namespaces <name>-a and <name>-b (brought up if missing, removed afterwards).
    #[arg(long, default_value = "livemig")]
    pub testbed: String,
    /// Shrink every link's rate by this factor (0 < scale <= 1).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Downtime target for every migration (QEMU's downtime-limit too).
    #[arg(long, default_value_t = 20)]
    pub downtime_ms: u64,
    /// How long the guest runs before the first migration.
    #[arg(long, default_value_t = 3000)]
    pub run_ms: u64,
    /// Measuring window of each link's goodput stream (after 0.5 s of warm-up).
    #[arg(long, default_value_t = 3.0)]
    pub goodput_secs: f64,
    /// Directory for bench.json, bench.png, consoles and logs.
    #[arg(long, default_value = "livemig-bench")]
    pub out: PathBuf,
    /// Leave the testbed up afterwards even if this run created it.
    #[arg(long)]
    pub keep_testbed: bool,
}

/// Which VMM migrates, and how.
#[derive(Clone, Copy, Debug)]
enum Setup {
    Livemig {
        transport: &'static str,
        /// One page stream per link (`--network`), beyond the control connection.
        per_link_streams: bool,
    },
    Qemu(Mode),
}

#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    setup: Setup,
    links: &'static [&'static str],
}

const LIVEMIG_RUNS: [Config; 4] = [
    Config {
        name: "tcp",
        setup: Setup::Livemig {
            transport: "tcp",
            per_link_streams: false,
        },
        links: &["1g-1"],
    },
    Config {
        name: "compressed",
        setup: Setup::Livemig {
            transport: "compressed",
            per_link_streams: false,
        },
        links: &["1g-1"],
    },
    Config {
        name: "direct",
        setup: Setup::Livemig {
            transport: "direct",
            per_link_streams: false,
        },
        links: &["10g-1"],
    },
    Config {
        name: "direct+multichannel",
        setup: Setup::Livemig {
            transport: "direct",
            per_link_streams: true,
        },
        links: &["10g-1", "10g-2"],
    },
];

const QEMU_RUNS: [Config; 4] = [
    Config {
        name: "tcp",
        setup: Setup::Qemu(Mode::Tcp),
        links: &["1g-1"],
    },
    Config {
        name: "multifd+zstd",
        setup: Setup::Qemu(Mode::MultifdZstd { channels: 2 }),
        links: &["1g-1"],
    },
    Config {
        name: "tcp",
        setup: Setup::Qemu(Mode::Tcp),
        links: &["10g-1"],
    },
    Config {
        name: "multifd",
        setup: Setup::Qemu(Mode::Multifd { channels: 2 }),
        links: &["10g-1"],
    },
];

/// Rows compared side by side: (livemig config, QEMU config, links).
const PAIRS: [(&str, &str, &str); 4] = [
    ("tcp", "tcp", "1g-1"),
    ("compressed", "multifd+zstd", "1g-1"),
    ("direct", "tcp", "10g-1"),
    ("direct+multichannel", "multifd", "10g-1"),
];

/// A failed livemig run: why, and the destination process if one was started.
type Failed = Box<(BenchError, Option<VmProcess>)>;

/// One migration's row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub peer: String,
    pub config: String,
    pub links: String,
    pub direction: String,
    pub total_ms: u64,
    pub downtime_ms: Option<u64>,
    pub setup_ms: Option<u64>,
    /// Bytes the sending interfaces counted (payload and headers), for every peer alike.
    pub wire_bytes: u64,
    /// What the VMM itself says it sent.
    pub reported_bytes: u64,
    /// wire_bytes over total_ms.
    pub avg_gbps: f64,
    /// The same links' rate in the raw goodput stream, counted the same way (interface).
    pub link_gbps: f64,
    pub utilisation: f64,
    pub cpu_source_s: Option<f64>,
    pub cpu_destination_s: Option<f64>,
    pub verified: bool,
    pub verify: String,
    pub error: Option<String>,
    /// (seconds since start, Gbit/s) from the interface counters.
    pub samples: Vec<(f64, f64)>,
    /// The VMM's own account: livemig's report, QEMU's query-migrate.
    pub detail: serde_json::Value,
}

#[derive(Clone, Debug, Serialize)]
pub struct LinkMeasure {
    pub links: String,
    pub nominal_gbps: f64,
    pub shaped_gbps: f64,
    #[serde(flatten)]
    pub measured: Goodput,
}

#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub livemig: String,
    pub qemu: String,
    pub links: String,
    /// livemig / QEMU
    pub total: f64,
    pub downtime: Option<f64>,
    pub wire_bytes: f64,
    pub cpu_source: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub workload: String,
    pub memory_profile: String,
    pub downtime_target_ms: u64,
    pub scale: f64,
    pub host_cpus: usize,
    pub links: Vec<LinkMeasure>,
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the bench needs root (network namespaces); run as root")]
    NotRoot,
    #[error("/dev/kvm is not available; the bench boots VMs")]
    NoKvm,
    #[error("--peer qemu: qemu-system-x86_64 is not installed (scripts/setup.sh installs it)")]
    NoQemu,
    #[error("testbed: {0}")]
    Testbed(#[from] crate::testbed::TestbedError),
    #[error("measuring link goodput: {0}")]
    Netns(#[from] netns::NetnsError),
    #[error("{0}")]
    Qemu(#[from] qemu::QemuError),
    #[error("{what}: {msg}")]
    Step { what: String, msg: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn step(what: impl Into<String>) -> impl FnOnce(String) -> BenchError {
    let what = what.into();
    move |msg| BenchError::Step { what, msg }
}

/// Progress on a terminal (a bar with the live rate), plain lines otherwise.
struct Ui {
    bar: Option<indicatif::ProgressBar>,
}

impl Ui {
    fn new(steps: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(steps);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {pos}/{len} {wide_msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Ui { bar }
    }

    fn start(&self, what: &str) {
        match &self.bar {
            Some(b) => b.set_message(what.to_string()),
            None => eprintln!("bench: {what}"),
        }
    }

    fn done(&self, line: &str) {
        match &self.bar {
            Some(b) => {
                b.println(line);
                b.inc(1);
            }
            None => eprintln!("bench: {line}"),
        }
    }

    /// A callback for the byte sampler: the live amount and rate on the bar.
    fn live(&self, what: &str) -> impl Fn(Duration, u64) + Send + 'static {
        let bar = self.bar.clone();
        let what = what.to_string();
        move |t, bytes| {
            if let Some(b) = &bar {
                let gbps = bytes as f64 * 8.0 / t.as_secs_f64().max(1e-3) / 1e9;
                b.set_message(format!("{what}: {} MiB, {gbps:.2} Gbit/s", bytes >> 20));
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Where a migration goes: the testbed's two hosts and the links of a config.
struct Route<'a> {
    tb: &'a Testbed,
    from_a: bool,
    links: Vec<&'a Link>,
}

impl Route<'_> {
    fn src_ns(&self) -> &str {
        if self.from_a {
            &self.tb.host_a
        } else {
            &self.tb.host_b
        }
    }
    fn dst_ns(&self) -> &str {
        if self.from_a {
            &self.tb.host_b
        } else {
            &self.tb.host_a
        }
    }
    /// (local, remote) address per link.
    fn pairs(&self) -> Vec<(String, String)> {
        self.links
            .iter()
            .map(|l| {
                if self.from_a {
                    (l.addr_a.clone(), l.addr_b.clone())
                } else {
                    (l.addr_b.clone(), l.addr_a.clone())
                }
            })
            .collect()
    }
    fn src_devs(&self) -> Vec<String> {
        self.links
            .iter()
            .map(|l| if self.from_a { &l.dev_a } else { &l.dev_b }.clone())
            .collect()
    }
    fn direction(&self) -> String {
        format!("{} -> {}", self.src_ns(), self.dst_ns())
    }
    /// The slowest time a migration of `memory` bytes may take before it counts as failed.
    fn timeout(&self, memory: u64) -> Duration {
        let bps: u64 = self
            .links
            .iter()
            .map(|l| l.shaped_bps.unwrap_or(10_000_000_000))
            .sum();
        // A fifth of the link, three times over: a stuck migration, not a slow one.
        Duration::from_secs(60) + Duration::from_secs_f64(memory as f64 * 8.0 * 15.0 / bps as f64)
    }
}

fn links_name(links: &[&str]) -> String {
    links.join("+")
}

/// Everything one bench needs while it runs.
struct Bench<'a> {
    a: &'a TransportsArgs,
    tb: &'a Testbed,
    ui: &'a Ui,
    dir: PathBuf,
    goodput: Vec<LinkMeasure>,
    port: u16,
}

impl Bench<'_> {
    fn route(&self, links: &[&str], from_a: bool) -> Result<Route<'_>, BenchError> {
        let links = links
            .iter()
            .map(|n| {
                self.tb
                    .links
                    .iter()
                    .find(|l| l.name == *n)
                    .ok_or_else(|| step("testbed")(format!("no link {n}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Route {
            tb: self.tb,
            from_a,
            links,
        })
    }

    fn next_port(&mut self) -> u16 {
        self.port += 1;
        self.port
    }

    fn link_gbps(&self, links: &str) -> f64 {
        self.goodput
            .iter()
            .find(|g| g.links == links)
            .map_or(0.0, |g| g.measured.interface_bps / 1e9)
    }

    fn measure_links(&mut self) -> Result<(), BenchError> {
        let sets: [&'static [&'static str]; 3] = [&["1g-1"], &["10g-1"], &["10g-1", "10g-2"]];
        for set in sets {
            let name = links_name(set);
            self.ui.start(&format!("raw goodput of {name}"));
            let r = self.route(set, true)?;
            let g = measure_goodput(
                r.src_ns(),
                r.dst_ns(),
                &r.pairs(),
                r.src_devs(),
                Duration::from_millis(500),
                Duration::from_secs_f64(self.a.goodput_secs.max(0.5)),
            )?;
            let nominal: u64 = r.links.iter().filter_map(|l| l.nominal_bps).sum();
            let shaped: u64 = r.links.iter().filter_map(|l| l.shaped_bps).sum();
            self.ui.done(&format!(
                "link {name}: goodput {:.3} Gbit/s ({:.3} on the interface), shaped {:.2}, nominal {:.1}",
                g.goodput_bps / 1e9,
                g.interface_bps / 1e9,
                shaped as f64 / 1e9,
                nominal as f64 / 1e9
            ));
            self.goodput.push(LinkMeasure {
                links: name,
                nominal_gbps: nominal as f64 / 1e9,
                shaped_gbps: shaped as f64 / 1e9,
                measured: g,
            });
        }
        Ok(())
    }

    /// A row with nothing measured yet: who, what, where.
    fn empty_row(&self, peer: &str, cfg: &Config, direction: String) -> Row {
        let links = links_name(cfg.links);
        Row {
            peer: peer.into(),
            config: cfg.name.into(),
            link_gbps: self.link_gbps(&links),
            links,
            direction,
            total_ms: 0,
            downtime_ms: None,
            setup_ms: None,
            wire_bytes: 0,
            reported_bytes: 0,
            avg_gbps: 0.0,
            utilisation: 0.0,
            cpu_source_s: None,
            cpu_destination_s: None,
            verified: false,
            verify: String::new(),
            error: None,
            samples: Vec::new(),
            detail: serde_json::Value::Null,
        }
    }

    /// A row from what every run measures alike.
    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        peer: &str,
        cfg: &Config,
        route: &Route,
        total_ms: u64,
        samples: &[(Duration, u64)],
        reported_bytes: u64,
        detail: serde_json::Value,
    ) -> Row {
        let mut r = self.empty_row(peer, cfg, route.direction());
        r.total_ms = total_ms;
        r.wire_bytes = samples.last().map_or(0, |s| s.1);
        r.reported_bytes = reported_bytes;
        r.avg_gbps = r.wire_bytes as f64 * 8.0 / (total_ms.max(1) as f64 / 1e3) / 1e9;
        if r.link_gbps > 0.0 {
            r.utilisation = r.avg_gbps / r.link_gbps;
        }
        // The chart shows the migration, not the verify that follows it.
        r.samples = rates(samples)
            .into_iter()
            .filter(|(t, _)| *t <= total_ms as f64 / 1e3 + 0.2)
            .collect();
        r.detail = detail;
        r
    }

    fn failed_row(&self, peer: &str, cfg: &Config, from_a: bool, e: &BenchError) -> Row {
        let direction = self
            .route(cfg.links, from_a)
            .map(|r| r.direction())
            .unwrap_or_default();
        let mut r = self.empty_row(peer, cfg, direction);
        r.verify = "not reached".into();
        r.error = Some(e.to_string());
        r
    }

    // ---- livemig ----

    fn boot_livemig(&self, ns: &str) -> Result<VmProcess, BenchError> {
        let api = self.dir.join("livemig-0.sock");
        let _ = std::fs::remove_file(&api);
        let exe = std::env::current_exe()?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args(["run", "--memory", &format!("{}M", self.a.memory >> 20)])
            .args(["--vcpus", &self.a.vcpus.to_string()])
            .args(["--workload", &self.a.workload])
            .args(["--memory-profile", &self.a.memory_profile.to_string()])
            .arg("--console")
            .arg(self.dir.join("livemig-0.console"))
            .arg("--api")
            .arg(&api)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("livemig-0.log"))?)
            .spawn()
            .map_err(|e| step("starting the livemig VM")(e.to_string()))?;
        let vm = VmProcess { child, api };
        let t = Instant::now();
        loop {
            if let Ok(st) = Client::new(&vm.api).status() {
                if st.heartbeat >= 1 {
                    return Ok(vm);
                }
            }
            if t.elapsed() > Duration::from_secs(120) {
                return Err(step("livemig VM")("no heartbeat within 120 s".into()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Migrates the VM behind `vm` along `route`; returns the row and the VM's new process.
    /// On failure, the destination process too if it was started: the caller decides where
    /// the VM is.
    fn migrate_livemig(
        &mut self,
        vm: &VmProcess,
        cfg: &Config,
        from_a: bool,
        index: usize,
    ) -> Result<(Row, VmProcess), Failed> {
        let Setup::Livemig {
            transport,
            per_link_streams,
        } = cfg.setup
        else {
            return Err(Box::new((
                step("bench")("not a livemig config".into()),
                None,
            )));
        };
        let port = self.next_port();
        let route = self
            .route(cfg.links, from_a)
            .map_err(|e| Box::new((e, None)))?;
        let pairs = route.pairs();
        let api = self.dir.join(format!("livemig-{index}.sock"));
        let _ = std::fs::remove_file(&api);
        let exe = std::env::current_exe().map_err(|e| Box::new((e.into(), None)))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", route.dst_ns()])
            .arg(exe)
            .args(["receive", "--listen", &format!("0.0.0.0:{port}")])
            .arg("--api")
            .arg(&api)
            .arg("--console")
            .arg(self.dir.join(format!("livemig-{index}.console")));
        let child = spawn_until(
            &mut cmd,
            "waiting for a VM",
            Duration::from_secs(30),
            Some(self.dir.join(format!("livemig-{index}.log"))),
        )
        .map_err(|e| Box::new((step("starting livemig receive")(e), None)))?;
        let dst = VmProcess { child, api };
        let network = per_link_streams.then(|| {
            pairs
                .iter()
                .map(|(l, r)| format!("{l}>{r}"))
                .collect::<Vec<_>>()
                .join(",")
        });
        let req = serde_json::json!({
            "to": format!("{}:{port}", pairs[0].1),
            "transport": transport,
            "network": network,
            "downtime_ms": self.a.downtime_ms,
        });
        let what = format!("livemig {} over {}", cfg.name, links_name(cfg.links));
        let sampler = TxSampler::start(
            route.src_ns(),
            route.src_devs(),
            Duration::from_millis(100),
            self.ui.live(&what),
        );
        let res = Client::new(&vm.api)
            .with_timeout(route.timeout(self.a.memory))
            .call::<Report>("POST", "/vm/migrate", Some(req));
        let samples = match sampler.finish() {
            Ok(s) => s,
            Err(e) => return Err(Box::new((e.into(), Some(dst)))),
        };
        let report = match res {
            Ok(r) => r,
            Err(e) => return Err(Box::new((step(&what)(e.to_string()), Some(dst)))),
        };
        let mut row = self.row(
            "livemig",
            cfg,
            &route,
            report.total_ms,
            &samples,
            report.bytes_on_wire,
            serde_json::to_value(&report).unwrap_or_default(),
        );
        row.downtime_ms = Some(report.downtime_ms);
        row.setup_ms = Some(report.phases.prepare_ms);
        row.cpu_source_s = Some(report.cpu_seconds.source);
        row.cpu_destination_s = Some(report.cpu_seconds.destination);
        row.verified = report.guest_verified;
        row.verify = report.guest_verify.clone().unwrap_or_default();
        Ok((row, dst))
    }

    fn livemig_runs(&mut self, rows: &mut Vec<Row>) -> Result<(), BenchError> {
        self.ui.start("booting the livemig VM");
        let mut vm = Some(self.boot_livemig(&self.tb.host_a)?);
        std::thread::sleep(Duration::from_millis(self.a.run_ms));
        self.ui.done("livemig VM running");
        let mut from_a = true;
        for (i, cfg) in LIVEMIG_RUNS.iter().enumerate() {
            let what = format!("livemig {} over {}", cfg.name, links_name(cfg.links));
            let Some(mut v) = vm.take() else {
                rows.push(self.failed_row(
                    "livemig",
                    cfg,
                    from_a,
                    &step(&what)("no VM left after an earlier failure".into()),
                ));
                continue;
            };
            self.ui.start(&what);
            match self.migrate_livemig(&v, cfg, from_a, i + 1) {
                Ok((row, next)) => {
                    self.ui.done(&table::line(&row));
                    rows.push(row);
                    // The source process leaves by itself once the VM runs on the destination.
                    v.wait_exit_for(Duration::from_secs(10));
                    vm = Some(next);
                    from_a = !from_a;
                }
                Err(failed) => {
                    let (e, dst) = *failed;
                    self.ui.done(&format!("{what}: FAILED: {e}"));
                    rows.push(self.failed_row("livemig", cfg, from_a, &e));
                    // A failed migration leaves the VM running on its source. If the source
                    // left all the same, the VM made it and only the answer was lost: go on
                    // from the destination.
                    let moved = dst.filter(|d| {
                        v.wait_exit_for(Duration::from_secs(5))
                            && Client::new(&d.api)
                                .status()
                                .is_ok_and(|st| st.state == vmm::RunState::Running)
                    });
                    match moved {
                        Some(d) => {
                            vm = Some(d);
                            from_a = !from_a;
                        }
                        None => vm = Some(v),
                    }
                }
            }
        }
        Ok(())
    }

    // ---- QEMU ----

    fn qemu_machine(&self) -> Result<Machine, BenchError> {
        let dir = self.dir.join("qemu");
        std::fs::create_dir_all(&dir)?;
        let kernel = dir.join("guest.elf");
        std::fs::write(&kernel, guest::WORKLOAD_ELF)?;
        let spec = WorkloadSpec::parse(&self.a.workload, self.a.memory)
            .map_err(|e| step("--workload")(e.to_string()))?;
        let tsc =
            vmm::vcpu::host_tsc_khz().map_err(|e| step("reading the TSC rate")(e.to_string()))?;
        let ram = dir.join("ram");
        std::fs::create_dir_all(&ram)?;
        self.ui.start("writing the RAM image for QEMU");
        let blobs = ProfileFiller::new(self.a.memory_profile, 1)
            .and_then(|f| f.write_blobs(self.a.memory, 2 << 20, 1 << 30, &ram))
            .map_err(|e| step("RAM image")(e.to_string()))?;
        Ok(Machine {
            memory: self.a.memory,
            vcpus: self.a.vcpus,
            kernel,
            cmdline: spec.cmdline(self.a.vcpus as u32, Some(tsc)),
            blobs: blobs.into_iter().map(|b| (b.path, b.guest_addr)).collect(),
            dir,
        })
    }

    fn migrate_qemu(
        &mut self,
        m: &Machine,
        src: &mut Qemu,
        cfg: &Config,
        from_a: bool,
        index: usize,
    ) -> Result<(Row, Qemu), BenchError> {
        let Setup::Qemu(mode) = cfg.setup else {
            return Err(step("bench")("not a QEMU config".into()));
        };
        let port = self.next_port();
        let route = self.route(cfg.links, from_a)?;
        let mut dst = Qemu::start(m, &format!("qemu-{index}"), route.dst_ns(), true)?;
        dst.incoming(mode, &format!("0.0.0.0:{port}"))?;
        let what = format!("qemu {} over {}", cfg.name, links_name(cfg.links));
        let (cpu_s0, cpu_d0) = (src.migration_cpu_seconds(), dst.migration_cpu_seconds());
        let sampler = TxSampler::start(
            route.src_ns(),
            route.src_devs(),
            Duration::from_millis(100),
            self.ui.live(&what),
        );
        let res = src.migrate(
            mode,
            &format!("{}:{port}", route.pairs()[0].1),
            self.a.downtime_ms,
            route.timeout(self.a.memory),
        );
        let samples = sampler.finish()?;
        let info = res?;
        dst.wait_running(Duration::from_secs(30))?;
        let (cpu_s1, cpu_d1) = (src.migration_cpu_seconds(), dst.migration_cpu_seconds());
        let ram = &info["ram"];
        let mut row = self.row(
            "qemu",
            cfg,
            &route,
            info["total-time"].as_u64().unwrap_or(0),
            &samples,
            ram["transferred"].as_u64().unwrap_or(0),
            info.clone(),
        );
        row.downtime_ms = info["downtime"].as_u64();
        row.setup_ms = info["setup-time"].as_u64();
        row.cpu_source_s = Some(cpu_s1 - cpu_s0);
        row.cpu_destination_s = Some(cpu_d1 - cpu_d0);
        match dst.verify(Duration::from_secs(60)) {
            Ok(v) => {
                row.verified = true;
                row.verify = v;
            }
            Err(e) => row.verify = e.to_string(),
        }
        Ok((row, dst))
    }

    fn qemu_runs(&mut self, rows: &mut Vec<Row>) -> Result<(), BenchError> {
        let m = self.qemu_machine()?;
        self.ui.start("booting the QEMU VM");
        let mut vm = Some(Qemu::start(&m, "qemu-0", &self.tb.host_a, false)?);
        if let Some(v) = &vm {
            v.wait_console("HB ", Duration::from_secs(120))?;
        }
        std::thread::sleep(Duration::from_millis(self.a.run_ms));
        self.ui.done("QEMU VM running");
        let mut from_a = true;
        for (i, cfg) in QEMU_RUNS.iter().enumerate() {
            let what = format!("qemu {} over {}", cfg.name, links_name(cfg.links));
            let Some(mut src) = vm.take() else {
                rows.push(self.failed_row(
                    "qemu",
                    cfg,
                    from_a,
                    &step(&what)("no VM left after an earlier failure".into()),
                ));
                continue;
            };
            self.ui.start(&what);
            match self.migrate_qemu(&m, &mut src, cfg, from_a, i + 1) {
                Ok((row, next)) => {
                    self.ui.done(&table::line(&row));
                    rows.push(row);
                    drop(src);
                    vm = Some(next);
                    from_a = !from_a;
                }
                Err(e) => {
                    self.ui.done(&format!("{what}: FAILED: {e}"));
                    rows.push(self.failed_row("qemu", cfg, from_a, &e));
                    // QEMU resumes its source after a failed migration.
                    vm = Some(src);
                }
            }
        }
        drop(vm);
        let _ = std::fs::remove_dir_all(m.dir.join("ram"));
        Ok(())
    }
}

/// Cumulative byte samples into (seconds, Gbit/s) per interval.
fn rates(samples: &[(Duration, u64)]) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .filter_map(|w| {
            let dt = (w[1].0 - w[0].0).as_secs_f64();
            (dt > 0.0).then(|| {
                (
                    w[1].0.as_secs_f64(),
                    (w[1].1 - w[0].1) as f64 * 8.0 / dt / 1e9,
                )
            })
        })
        .collect()
}

fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let find = |peer: &str, cfg: &str, links: &str| {
        rows.iter()
            .find(|r| r.peer == peer && r.config == cfg && r.links.starts_with(links))
            .filter(|r| r.error.is_none())
    };
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    PAIRS
        .iter()
        .filter_map(|(lm, q, links)| {
            let l = find("livemig", lm, links)?;
            let qr = find("qemu", q, links)?;
            Some(Ratio {
                livemig: format!("{} {}", l.config, l.links),
                qemu: format!("{} {}", qr.config, qr.links),
                links: links.to_string(),
                total: div(l.total_ms as f64, qr.total_ms as f64),
                downtime: l
                    .downtime_ms
                    .zip(qr.downtime_ms)
                    .map(|(a, b)| div(a as f64, b.max(1) as f64)),
                wire_bytes: div(l.wire_bytes as f64, qr.wire_bytes as f64),
                cpu_source: l.cpu_source_s.zip(qr.cpu_source_s).map(|(a, b)| div(a, b)),
            })
        })
        .collect()
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

pub fn transports(a: &TransportsArgs) -> Result<BenchReport, BenchError> {
    if !crate::testbed::is_root() {
        return Err(BenchError::NotRoot);
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err(BenchError::NoKvm);
    }
    let with_qemu = a.peer.as_deref() == Some("qemu");
    if with_qemu && !qemu::available() {
        return Err(BenchError::NoQemu);
    }
    if a.testbed.len() > 7 {
        return Err(step("--testbed")(format!(
            "{:?} is too long for interface names (7 characters at most)",
            a.testbed
        )));
    }
    // Peak memory: two livemig VMs mid-migration; for QEMU, its source keeps a copy of the RAM
    // image it loaded (to reload on reset) beside the RAM, plus the destination.
    let need = a.memory * if with_qemu { 3 } else { 2 } + (512 << 20);
    if let Some(avail) = mem_available() {
        if need > avail {
            return Err(step("--memory")(format!(
                "{} MiB of guest needs about {} MiB free {}, this machine has {} MiB",
                a.memory >> 20,
                need >> 20,
                if with_qemu { "with --peer qemu" } else { "" },
                avail >> 20
            )));
        }
    }
    let dir = std::path::absolute(&a.out)?;
    std::fs::create_dir_all(&dir)?;
    let tb = Testbed::new(&a.testbed, a.scale)?;
    let existed = tb.status()?.present;
    tb.up()?;
    let steps = 3
        + 1
        + LIVEMIG_RUNS.len() as u64
        + if with_qemu {
            1 + QEMU_RUNS.len() as u64
        } else {
            0
        };
    let ui = Ui::new(steps);
    let mut bench = Bench {
        a,
        tb: &tb,
        ui: &ui,
        dir: dir.clone(),
        goodput: Vec::new(),
        port: 7700,
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let res = (|| {
        bench.measure_links()?;
        bench.livemig_runs(&mut rows)?;
        if with_qemu {
            bench.qemu_runs(&mut rows)?;
        }
        Ok::<_, BenchError>(())
    })();
    ui.finish();
    if !existed && !a.keep_testbed {
        if let Err(e) = tb.down() {
            notes.push(format!("removing the testbed: {e}"));
        }
    }
    res?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    notes.push(format!(
        "{cpus} host CPUs run both hosts, both VMs and every migration thread; a veth pair \
         here carries ~15 Gbit/s in total, so rows on 10 GbE links can be capped by the \
         machine, not by the link"
    ));
    let report = BenchReport {
        memory_bytes: a.memory,
        vcpus: a.vcpus,
        workload: a.workload.clone(),
        memory_profile: a.memory_profile.to_string(),
        downtime_target_ms: a.downtime_ms,
        scale: a.scale,
        host_cpus: cpus,
        links: bench.goodput.clone(),
        ratios: ratios(&rows),
        rows,
        notes,
    };
    std::fs::write(
        dir.join("bench.json"),
        serde_json::to_vec_pretty(&report).map_err(|e| step("bench.json")(e.to_string()))?,
    )?;
    chart::draw(&report, &dir.join("bench.png")).map_err(step("bench.png"))?;
    Ok(report)
}
