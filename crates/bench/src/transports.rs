//! `livemig bench transports`: the measured comparison. One running VM migrates between the
//! testbed's two hosts once per transport configuration, on the links the reference layout
//! gives each (tcp and compressed on one 1 GbE link, direct on one 10 GbE link, direct +
//! multichannel on both), after each link's raw goodput is measured in the same run. With the
//! QEMU peer, the same guest and RAM migrate with QEMU on the same links. Both VMMs run
//! through one loop ([`Bench::runs`]), measured the same way.
use std::path::PathBuf;
use std::time::Duration;

use guest::memory_profile::MemoryProfile;
use migration::protocol::Transport;
use migration::MigrateRequest;
use serde::Serialize;

pub use crate::netns::LinkMeasure;
use crate::netns::TxSampler;
use crate::peer::{LivemigPeer, Outcome, Peer, QemuPeer, Setup};
use crate::qemu::{Machine, Mode};
use crate::testbed::Testbed;
use crate::{guest_rate, step, table, BenchError, Route, Ui};

/// How long the guest's pace is read before each migration (`bench postcopy`).
const PACE_BEFORE: Duration = Duration::from_secs(2);
use host::child::Livemig;

/// What to run; `livemig bench transports` fills it from its arguments.
#[derive(Clone, Debug)]
pub struct TransportsOptions {
    /// The livemig binary the VMs run as.
    pub livemig: PathBuf,
    pub memory: u64,
    pub vcpus: u8,
    pub workload: String,
    pub memory_profile: MemoryProfile,
    /// Also migrate the same guest and RAM with QEMU on the same links.
    pub peer_qemu: bool,
    /// livemig's runs: plaintext, over mutual TLS, or both.
    pub security: Security,
    /// Testbed namespaces <name>-a and <name>-b (brought up if missing, removed afterwards).
    pub testbed: String,
    pub scale: f64,
    /// Options every livemig migration takes (downtime target, auto-converge, rounds, cap);
    /// the transport and streams are each run's own.
    pub request: MigrateRequest,
    /// How long the guest runs before the first migration.
    pub run_ms: u64,
    /// Measuring window of each link's goodput stream (after 0.5 s of warm-up).
    pub goodput_secs: f64,
    /// Directory for bench.json, bench.png, consoles and logs.
    pub out: PathBuf,
    pub keep_testbed: bool,
    /// Which runs: every transport, or pre-copy against post-copy.
    pub suite: Suite,
}

/// What a bench of one VM compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// Every transport on its reference link (`livemig bench transports`).
    Transports,
    /// Pre-copy with auto-converge, post-copy after the first pass and hybrid, on 1 GbE and
    /// 10 GbE, with the guest's own pace measured (`livemig bench postcopy`).
    Postcopy,
}

impl TransportsOptions {
    fn downtime_ms(&self) -> u64 {
        self.request.downtime_ms.unwrap_or(20)
    }
}

/// One run: its name, how it migrates, over which links.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub(crate) name: &'static str,
    pub(crate) setup: Setup,
    pub(crate) links: &'static [&'static str],
}

const fn livemig(
    name: &'static str,
    transport: Transport,
    links: &'static [&'static str],
    tls: bool,
) -> Run {
    Run {
        name,
        setup: Setup::Livemig {
            transport,
            per_link_streams: links.len() > 1,
            tls,
            postcopy: None,
        },
        links,
    }
}

const fn livemig_postcopy(
    name: &'static str,
    postcopy: migration::policy::PostcopyMode,
    links: &'static [&'static str],
) -> Run {
    Run {
        name,
        setup: Setup::Livemig {
            transport: Transport::Tcp,
            per_link_streams: false,
            tls: false,
            postcopy: Some(postcopy),
        },
        links,
    }
}

const fn qemu(name: &'static str, mode: Mode, links: &'static [&'static str]) -> Run {
    Run {
        name,
        setup: Setup::Qemu(mode),
        links,
    }
}

use migration::policy::PostcopyMode::{After, Auto, Off};

/// `bench postcopy`'s livemig runs: plaintext tcp, as QEMU's.
pub(crate) const LIVEMIG_POSTCOPY_RUNS: [Run; 6] = [
    livemig_postcopy("pre-copy", Off, &["1g-1"]),
    livemig_postcopy("post-copy", After(1), &["1g-1"]),
    livemig_postcopy("hybrid", Auto, &["1g-1"]),
    livemig_postcopy("pre-copy", Off, &["10g-1"]),
    livemig_postcopy("post-copy", After(1), &["10g-1"]),
    livemig_postcopy("hybrid", Auto, &["10g-1"]),
];

/// QEMU's: pre-copy with auto-converge, and post-copy after the first pass.
pub(crate) const QEMU_POSTCOPY_RUNS: [Run; 4] = [
    qemu("pre-copy", Mode::Tcp, &["1g-1"]),
    qemu("post-copy", Mode::Postcopy, &["1g-1"]),
    qemu("pre-copy", Mode::Tcp, &["10g-1"]),
    qemu("post-copy", Mode::Postcopy, &["10g-1"]),
];

/// `bench postcopy`'s rows side by side (livemig has no hybrid peer in QEMU 7.2: its hybrid
/// is compared with QEMU's post-copy).
pub(crate) const POSTCOPY_PAIRS: [(&str, &str, &str); 6] = [
    ("pre-copy", "pre-copy", "1g-1"),
    ("post-copy", "post-copy", "1g-1"),
    ("hybrid", "post-copy", "1g-1"),
    ("pre-copy", "pre-copy", "10g-1"),
    ("post-copy", "post-copy", "10g-1"),
    ("hybrid", "post-copy", "10g-1"),
];

impl Suite {
    fn livemig_runs(self, security: Security) -> Vec<Run> {
        match self {
            Suite::Transports => security.runs(),
            Suite::Postcopy => LIVEMIG_POSTCOPY_RUNS.to_vec(),
        }
    }

    fn qemu_runs(self) -> &'static [Run] {
        match self {
            Suite::Transports => &QEMU_RUNS,
            Suite::Postcopy => &QEMU_POSTCOPY_RUNS,
        }
    }

    fn pairs(self) -> &'static [(&'static str, &'static str, &'static str)] {
        match self {
            Suite::Transports => &PAIRS,
            Suite::Postcopy => &POSTCOPY_PAIRS,
        }
    }
}

const MULTI: &[&str] = &["10g-1", "10g-2"];

/// Plaintext, as QEMU runs by default: the rows compared with QEMU's.
pub(crate) const LIVEMIG_RUNS: [Run; 4] = [
    livemig("tcp", Transport::Tcp, &["1g-1"], false),
    livemig("compressed", Transport::Compressed, &["1g-1"], false),
    livemig("direct", Transport::Direct, &["10g-1"], false),
    livemig("direct+multichannel", Transport::Direct, MULTI, false),
];

/// The same over mutual TLS (livemig's default): what security costs on each transport.
const LIVEMIG_TLS_RUNS: [Run; 4] = [
    livemig("tcp+tls", Transport::Tcp, &["1g-1"], true),
    livemig("compressed+tls", Transport::Compressed, &["1g-1"], true),
    livemig("direct+tls", Transport::Direct, &["10g-1"], true),
    livemig("direct+multichannel+tls", Transport::Direct, MULTI, true),
];

/// Which livemig runs a bench makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// Plaintext only (comparable with QEMU's default).
    Insecure,
    /// Mutual TLS only.
    Tls,
    /// Both, to measure what TLS costs.
    Both,
}

impl std::str::FromStr for Security {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "insecure" => Ok(Security::Insecure),
            "tls" => Ok(Security::Tls),
            "both" => Ok(Security::Both),
            _ => Err(format!("{s:?}: expected insecure, tls or both")),
        }
    }
}

impl Security {
    fn runs(self) -> Vec<Run> {
        match self {
            Security::Insecure => LIVEMIG_RUNS.to_vec(),
            Security::Tls => LIVEMIG_TLS_RUNS.to_vec(),
            Security::Both => LIVEMIG_RUNS.into_iter().chain(LIVEMIG_TLS_RUNS).collect(),
        }
    }
}

pub(crate) const QEMU_RUNS: [Run; 4] = [
    Run {
        name: "tcp",
        setup: Setup::Qemu(Mode::Tcp),
        links: &["1g-1"],
    },
    Run {
        name: "multifd+zstd",
        setup: Setup::Qemu(Mode::MultifdZstd { channels: 2 }),
        links: &["1g-1"],
    },
    Run {
        name: "tcp",
        setup: Setup::Qemu(Mode::Tcp),
        links: &["10g-1"],
    },
    Run {
        name: "multifd",
        setup: Setup::Qemu(Mode::Multifd { channels: 2 }),
        links: &["10g-1"],
    },
];

/// Rows compared side by side: (livemig run, QEMU run, links).
pub(crate) const PAIRS: [(&str, &str, &str); 4] = [
    ("tcp", "tcp", "1g-1"),
    ("compressed", "multifd+zstd", "1g-1"),
    ("direct", "tcp", "10g-1"),
    ("direct+multichannel", "multifd", "10g-1"),
];

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
    /// Pages re-sent as deltas (livemig's report; None for QEMU).
    pub delta_pages: Option<u64>,
    /// (seconds since start, Gbit/s) from the interface counters.
    pub samples: Vec<(f64, f64)>,
    /// The guest's own pages written per second before and during the migration, from its
    /// console, the same for every VMM (`bench postcopy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_rate: Option<crate::guest_rate::GuestRate>,
    /// Post-copy's faults: livemig's latency percentiles; QEMU 7.2 gives only its vCPUs'
    /// total blocked time, shown as the mean per page it asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_p50_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_p99_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_mean_us: Option<u64>,
    /// The VMM's own account: livemig's report, QEMU's query-migrate.
    pub detail: serde_json::Value,
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

/// What mutual TLS costs one transport: its run with and without it, same VM, same links.
#[derive(Clone, Debug, Serialize)]
pub struct TlsCost {
    pub config: String,
    pub links: String,
    pub plain_ms: u64,
    pub tls_ms: u64,
    /// tls_ms / plain_ms
    pub time: f64,
    pub cpu_source_plain_s: Option<f64>,
    pub cpu_source_tls_s: Option<f64>,
    pub cpu_destination_plain_s: Option<f64>,
    pub cpu_destination_tls_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// `transports` or `postcopy`.
    pub suite: String,
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
    pub tls_costs: Vec<TlsCost>,
    pub notes: Vec<String>,
}

/// Everything one bench needs while it runs.
struct Bench<'a> {
    o: &'a TransportsOptions,
    tb: &'a Testbed,
    ui: &'a Ui,
    dir: PathBuf,
    goodput: Vec<LinkMeasure>,
    port: u16,
}

impl<'a> Bench<'a> {
    fn route(&self, links: &[&str], from_a: bool) -> Result<Route<'a>, BenchError> {
        Route::new(self.tb, links, from_a)
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
        self.goodput = crate::netns::measure_link_sets(self.tb, self.ui, self.o.goodput_secs)?;
        Ok(())
    }

    /// A row with nothing measured yet: who, what, where.
    fn empty_row(&self, peer: &str, run: &Run, direction: String) -> Row {
        let links = run.links.join("+");
        Row {
            peer: peer.into(),
            config: run.name.into(),
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
            delta_pages: None,
            samples: Vec::new(),
            guest_rate: None,
            fault_p50_us: None,
            fault_p99_us: None,
            fault_mean_us: None,
            detail: serde_json::Value::Null,
        }
    }

    /// A row from what every run measures alike, and what the VMM says.
    fn row(
        &self,
        peer: &str,
        run: &Run,
        route: &Route,
        samples: &[(Duration, u64)],
        o: Outcome,
    ) -> Row {
        let mut r = self.empty_row(peer, run, route.direction());
        r.total_ms = o.total_ms;
        r.wire_bytes = samples.last().map_or(0, |s| s.1);
        r.reported_bytes = o.reported_bytes;
        r.avg_gbps = r.wire_bytes as f64 * 8.0 / (o.total_ms.max(1) as f64 / 1e3) / 1e9;
        if r.link_gbps > 0.0 {
            r.utilisation = r.avg_gbps / r.link_gbps;
        }
        // The chart shows the migration, not the verify that follows it.
        r.samples = rates(samples)
            .into_iter()
            .filter(|(t, _)| *t <= o.total_ms as f64 / 1e3 + 0.2)
            .collect();
        r.downtime_ms = o.downtime_ms;
        r.setup_ms = o.setup_ms;
        r.cpu_source_s = o.cpu_source_s;
        r.cpu_destination_s = o.cpu_destination_s;
        r.verified = o.verified;
        r.verify = o.verify;
        r.delta_pages = o
            .detail
            .pointer("/pages/delta")
            .and_then(serde_json::Value::as_u64);
        (r.fault_p50_us, r.fault_p99_us, r.fault_mean_us) = faults(&o.detail);
        r.detail = o.detail;
        r
    }

    fn failed_row(&self, peer: &str, run: &Run, from_a: bool, e: &BenchError) -> Row {
        let direction = self
            .route(run.links, from_a)
            .map(|r| r.direction())
            .unwrap_or_default();
        let mut r = self.empty_row(peer, run, direction);
        r.verify = "not reached".into();
        r.error = Some(e.to_string());
        r
    }

    /// Boots `peer`'s VM in host A and migrates it A→B→A… once per run; a failed run leaves
    /// a failed row and the VM wherever it now runs.
    fn runs<P: Peer>(
        &mut self,
        peer: &mut P,
        runs: &[Run],
        rows: &mut Vec<Row>,
    ) -> Result<(), BenchError> {
        self.ui.start(&format!("booting the {} VM", peer.name()));
        let mut vm = Some(peer.boot(&self.tb.host_a)?);
        std::thread::sleep(Duration::from_millis(self.o.run_ms));
        self.ui.done(&format!("{} VM running", peer.name()));
        let (mut from_a, mut at) = (true, 0);
        for (i, run) in runs.iter().enumerate() {
            let what = format!("{} {} over {}", peer.name(), run.name, run.links.join("+"));
            let Some(src) = vm.take() else {
                let e = step(&what)("no VM left after an earlier failure");
                rows.push(self.failed_row(peer.name(), run, from_a, &e));
                continue;
            };
            self.ui.start(&what);
            let (row, next, moved) = self.run_one(peer, src, run, from_a, (at, i + 1));
            self.ui.done(&match &row.error {
                None => table::line(&row),
                Some(e) => format!("{what}: FAILED: {e}"),
            });
            rows.push(row);
            vm = Some(next);
            from_a ^= moved;
            if moved {
                at = i + 1;
            }
        }
        Ok(())
    }

    /// One migration, measured; returns its row, where the VM is now and whether it moved.
    /// `index`: the runs the VM and its destination belong to (their consoles).
    fn run_one<P: Peer>(
        &mut self,
        peer: &mut P,
        mut src: P::Vm,
        run: &Run,
        from_a: bool,
        (at, index): (usize, usize),
    ) -> (Row, P::Vm, bool) {
        let name = peer.name();
        let failed = |b: &Self, e: BenchError| b.failed_row(name, run, from_a, &e);
        let route = match self.route(run.links, from_a) {
            Ok(r) => r,
            Err(e) => return (failed(self, e), src, false),
        };
        let port = self.next_port();
        let mut dst = match peer.destination(run.setup, &route, port, index) {
            Ok(d) => d,
            Err(e) => return (failed(self, e), src, false),
        };
        let what = format!("{} {} over {}", peer.name(), run.name, route.name());
        // The guest's pace: its console over the seconds before, then during the migration
        // (before the interface sampler starts: the chart begins with the migration).
        let pace = (self.o.suite == Suite::Postcopy).then(|| {
            let s = guest_rate::Sampler::start(vec![peer.console(at), peer.console(index)]);
            let t = std::time::Instant::now();
            std::thread::sleep(PACE_BEFORE);
            (s, t)
        });
        let sampler = TxSampler::start(
            route.src_ns(),
            route.src_devs(),
            Duration::from_millis(100),
            self.ui.live(&what),
        );
        let t_migrate = std::time::Instant::now();
        let res = peer.migrate(&mut src, &mut dst, run.setup, &route, port);
        let samples = sampler.finish();
        let rate = pace.and_then(|(s, t)| {
            let total = res
                .as_ref()
                .map_or(Duration::ZERO, |o| Duration::from_millis(o.total_ms));
            // The destination's console shows the guest's count a heartbeat or two late.
            std::thread::sleep(Duration::from_millis(500));
            s.finish(t, t_migrate, total)
        });
        let (vm, moved) = peer.settle(src, dst, res.is_ok());
        let mut row = match (res, samples) {
            (Ok(o), Ok(s)) => self.row(peer.name(), run, &route, &s, o),
            (Err(e), _) => failed(self, e),
            (_, Err(e)) => failed(self, e.into()),
        };
        row.guest_rate = rate;
        (row, vm, moved)
    }

    /// The QEMU machine: the same guest and RAM as the livemig VM.
    fn qemu_machine(&self) -> Result<Machine, BenchError> {
        let o = self.o;
        self.ui.start("writing the RAM image for QEMU");
        Machine::prepare(
            &self.dir.join("qemu"),
            &self.dir.join("qemu").join("ram"),
            o.memory,
            o.vcpus,
            &o.workload,
            guest::memory_profile::Content {
                profile: o.memory_profile,
                seed: 1,
                image: None,
            },
        )
    }

    /// livemig processes with a cluster CA and credentials of the bench's own.
    fn livemig_peer(&self) -> Result<LivemigPeer, BenchError> {
        let o = self.o;
        let tls = self.dir.join("tls");
        transport::tls::init_cluster(&tls, &["bench".into()])
            .map_err(|e| step("TLS credentials")(e.to_string()))?;
        let files = transport::tls::TlsFiles {
            cert: tls.join("bench.pem"),
            key: tls.join("bench.key"),
            ca: tls.join("ca.pem"),
        };
        Ok(LivemigPeer {
            exe: Livemig::new(&o.livemig).with_tls(&files),
            insecure: Livemig::new(&o.livemig).insecure(),
            tls: files,
            dir: self.dir.clone(),
            vm_args: vec![
                "--memory".into(),
                format!("{}M", o.memory >> 20),
                "--vcpus".into(),
                o.vcpus.to_string(),
                "--workload".into(),
                o.workload.clone(),
                "--memory-profile".into(),
                o.memory_profile.to_string(),
            ],
            request: o.request.clone(),
            memory: o.memory,
            disk_dirs: None,
        })
    }

    fn all_runs(&mut self, rows: &mut Vec<Row>) -> Result<(), BenchError> {
        self.measure_links()?;
        let mut lm = self.livemig_peer()?;
        self.runs(&mut lm, &self.o.suite.livemig_runs(self.o.security), rows)?;
        if self.o.peer_qemu {
            let machine = self.qemu_machine()?;
            let ram = machine.dir.join("ram");
            let mut q = QemuPeer::new(machine, self.o.downtime_ms(), None);
            self.runs(&mut q, self.o.suite.qemu_runs(), rows)?;
            drop(q);
            let _ = std::fs::remove_dir_all(ram);
        }
        Ok(())
    }
}

/// Post-copy's fault figures in a VMM's own account: livemig's percentiles, or QEMU's vCPU
/// blocked time (on its destination) over the pages it asked for.
fn faults(detail: &serde_json::Value) -> (Option<u64>, Option<u64>, Option<u64>) {
    if let Some(p) = detail.get("postcopy").filter(|p| p.is_object()) {
        return (p["fault_p50_us"].as_u64(), p["fault_p99_us"].as_u64(), None);
    }
    let blocked_ms: Option<u64> = detail
        .pointer("/destination/postcopy-vcpu-blocktime")
        .and_then(serde_json::Value::as_array)
        .map(|v| v.iter().filter_map(serde_json::Value::as_u64).sum());
    let asked = detail
        .pointer("/ram/postcopy-requests")
        .and_then(serde_json::Value::as_u64)
        .filter(|n| *n > 0);
    let mean = blocked_ms.zip(asked).map(|(ms, n)| ms * 1000 / n);
    (None, None, mean)
}

/// Cumulative byte samples into (seconds, Gbit/s) per interval.
pub fn rates(samples: &[(Duration, u64)]) -> Vec<(f64, f64)> {
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

fn ratios(rows: &[Row], pairs: &[(&str, &str, &str)]) -> Vec<Ratio> {
    let find = |peer: &str, cfg: &str, links: &str| {
        rows.iter()
            .find(|r| r.peer == peer && r.config == cfg && r.links.starts_with(links))
            .filter(|r| r.error.is_none())
    };
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    pairs
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

/// Each livemig run next to its run over TLS.
fn tls_costs(rows: &[Row]) -> Vec<TlsCost> {
    let ok = |r: &&Row| r.peer == "livemig" && r.error.is_none();
    rows.iter()
        .filter(ok)
        .filter_map(|p| {
            let t = rows
                .iter()
                .filter(ok)
                .find(|t| t.config == format!("{}+tls", p.config) && t.links == p.links)?;
            Some(TlsCost {
                config: p.config.clone(),
                links: p.links.clone(),
                plain_ms: p.total_ms,
                tls_ms: t.total_ms,
                time: t.total_ms as f64 / p.total_ms.max(1) as f64,
                cpu_source_plain_s: p.cpu_source_s,
                cpu_source_tls_s: t.cpu_source_s,
                cpu_destination_plain_s: p.cpu_destination_s,
                cpu_destination_tls_s: t.cpu_destination_s,
            })
        })
        .collect()
}

pub fn transports(o: &TransportsOptions) -> Result<BenchReport, BenchError> {
    crate::preflight(o.peer_qemu, &o.testbed, o.memory)?;
    let dir = std::path::absolute(&o.out)?;
    std::fs::create_dir_all(&dir)?;
    let tb = Testbed::new(&o.testbed, o.scale)?;
    let existed = tb.status()?.present;
    tb.up()?;
    let qemu_steps = if o.peer_qemu {
        1 + o.suite.qemu_runs().len() as u64
    } else {
        0
    };
    let ui = Ui::new(3 + 1 + o.suite.livemig_runs(o.security).len() as u64 + qemu_steps);
    let mut bench = Bench {
        o,
        tb: &tb,
        ui: &ui,
        dir: dir.clone(),
        goodput: Vec::new(),
        port: 7700,
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let res = bench.all_runs(&mut rows);
    ui.finish();
    if !existed && !o.keep_testbed {
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
        suite: match o.suite {
            Suite::Transports => "transports",
            Suite::Postcopy => "postcopy",
        }
        .into(),
        memory_bytes: o.memory,
        vcpus: o.vcpus,
        workload: o.workload.clone(),
        memory_profile: o.memory_profile.to_string(),
        downtime_target_ms: o.downtime_ms(),
        scale: o.scale,
        host_cpus: cpus,
        links: bench.goodput.clone(),
        ratios: ratios(&rows, o.suite.pairs()),
        tls_costs: tls_costs(&rows),
        rows,
        notes,
    };
    std::fs::write(
        dir.join("bench.json"),
        serde_json::to_vec_pretty(&report).map_err(|e| step("bench.json")(e.to_string()))?,
    )?;
    crate::chart::draw(&report, &dir.join("bench.png")).map_err(step("bench.png"))?;
    Ok(report)
}
