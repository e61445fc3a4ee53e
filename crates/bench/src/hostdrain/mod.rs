//! `livemig bench drain`: the host-drain comparison. N VMs start on host A and are drained
//! A→B, B→A, ... once per configuration (the unoptimised tcp at concurrency 2, then each
//! transport on its reference links at the concurrencies asked for, one level at a time with
//! its transports side by side, each from freshly booted guests), measured alike for
//! livemig (host agents and `livemig drain`) and QEMU (two concurrent migrations over QMP, as
//! libvirt and KubeVirt drain). Every row carries the drain-time model's prediction and
//! error; the model also predicts the reference's scenarios.
use std::path::PathBuf;
use std::time::Duration;

use drain::model::{self, Reference, Scenario};
use drain::predict::VmFacts;
use drain::{Concurrency, Order};
use guest::memory_profile::{Content, MemoryProfile, OsImage};
use migration::protocol::Transport;
use migration::MigrateRequest;
use serde::Serialize;

use crate::netns::{LinkMeasure, TxSampler};
use crate::qemu::Mode;
use crate::testbed::Testbed;
use crate::{step, BenchError, Route, Ui};

pub mod chart;
mod livemig;
mod qemu_side;
pub mod table;

/// What to run; `livemig bench drain` fills it from its arguments.
#[derive(Clone, Debug)]
pub struct DrainBenchOptions {
    pub livemig: PathBuf,
    pub vms: Vec<VmSpec>,
    pub peer_qemu: bool,
    /// Concurrencies each optimised configuration runs at.
    pub concurrency: Vec<Concurrency>,
    pub orders: Vec<Order>,
    /// Transports the optimised configurations run (tcp, compressed, direct,
    /// direct+multichannel); all when empty.
    pub transports: Vec<String>,
    /// Mutual TLS between the agents (livemig's default) or plaintext (as QEMU runs).
    pub tls: bool,
    pub testbed: String,
    pub scale: f64,
    /// Options every migration takes (downtime target, auto-converge, peer timeout).
    pub request: MigrateRequest,
    /// Page cache per destination for dedup across the VMs (`livemig drain --dedup-cache`).
    pub dedup_cache: u64,
    /// `livemig drain --reserve-cpu` percentages each optimised configuration also runs
    /// with (0: none).
    pub reserve_cpu: Vec<f64>,
    pub goodput_secs: f64,
    pub out: PathBuf,
    pub keep_testbed: bool,
}

/// One VM of the bench.
#[derive(Clone, Debug, Serialize)]
pub struct VmSpec {
    pub name: String,
    pub memory: u64,
    pub workload: String,
    /// Its RAM before boot: server memory, seeded by its place in the set.
    pub content: Content,
}

/// Which OS images the bench's VMs are cloned from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Images {
    /// Each VM its own image: they share only zero pages.
    Different,
    /// All of one image: they share its OS part.
    Same,
}

impl std::str::FromStr for Images {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "different" => Ok(Images::Different),
            "same" => Ok(Images::Same),
            other => Err(format!("{other:?}: expected different or same")),
        }
    }
}

/// The default VM set (2 × sql, 2 × web, idle, stress; 512 MiB to 1 GiB) or `n` of it, all of
/// `memory` when given, running `workloads` in turn instead when given; OS images as `images`
/// says, each taking `share_pct` of RAM.
pub fn vm_set(
    n: usize,
    memory: Option<u64>,
    workloads: &[String],
    images: Images,
    share_pct: u8,
) -> Vec<VmSpec> {
    const SET: [(&str, u64); 6] = [
        ("sql", 1 << 30),
        ("web", 768 << 20),
        ("sql", 768 << 20),
        ("web", 512 << 20),
        ("idle", 512 << 20),
        ("stress", 512 << 20),
    ];
    (0..n)
        .map(|i| {
            let (w, m) = SET[i % SET.len()];
            let w = workloads
                .get(i % workloads.len().max(1))
                .map_or(w, String::as_str);
            VmSpec {
                name: format!("{w}{}", i + 1),
                memory: memory.unwrap_or(m),
                workload: w.into(),
                content: Content {
                    profile: MemoryProfile::Server,
                    seed: i as u64 + 1,
                    image: Some(OsImage {
                        seed: match images {
                            Images::Different => i as u64 + 1,
                            Images::Same => 1,
                        },
                        share_pct,
                    }),
                },
            }
        })
        .collect()
}

/// How a configuration migrates.
#[derive(Clone, Copy, Debug)]
pub enum How {
    Livemig(Transport),
    Qemu(Mode),
}

/// One drain of the bench: what, over which links, how many at once.
#[derive(Clone, Debug)]
pub struct Config {
    pub name: String,
    pub links: &'static [&'static str],
    pub how: How,
    pub concurrency: Concurrency,
    pub order: Order,
    /// `livemig drain --reserve-cpu`, 0..1.
    pub reserve_cpu: Option<f64>,
    /// The drain starts from freshly booted guests: a guest checks every page it ever wrote
    /// after each move, so without this later rows would move older guests.
    pub fresh_guests: bool,
}

impl Config {
    fn compressed(&self) -> bool {
        matches!(
            self.how,
            How::Livemig(Transport::Compressed) | How::Qemu(Mode::MultifdZstd { .. })
        )
    }
}

const ONE_G: &[&str] = &["1g-1"];
const TEN_G: &[&str] = &["10g-1"];
const TWO_TEN_G: &[&str] = &["10g-1", "10g-2"];
/// What drains ran at before anyone tuned them (Hyper-V's and KubeVirt's default of 2).
pub const UNOPTIMISED: &str = "tcp c2 (unoptimised)";

/// livemig's configurations as the table shows them: the unoptimised row, then each of
/// `transports` (all when empty) on its reference links at each concurrency and order asked
/// for; with `reserve_cpu` (percent), each of those again for each reserve. Every row but
/// the unoptimised one starts from freshly booted guests. [`run_order`] is the order they run
/// in.
pub fn livemig_configs(
    concurrency: &[Concurrency],
    orders: &[Order],
    transports: &[String],
    reserve_cpu: &[f64],
) -> Vec<Config> {
    let mut out = vec![Config {
        name: UNOPTIMISED.into(),
        links: ONE_G,
        how: How::Livemig(Transport::Tcp),
        concurrency: Concurrency::Fixed(2),
        order: Order::Name,
        reserve_cpu: None,
        fresh_guests: false,
    }];
    let reserves: Vec<Option<f64>> = if reserve_cpu.is_empty() {
        vec![None]
    } else {
        reserve_cpu
            .iter()
            .map(|r| (*r > 0.0).then_some(r / 100.0))
            .collect()
    };
    let runs: [(&str, Transport, &'static [&'static str]); 4] = [
        ("tcp", Transport::Tcp, ONE_G),
        ("compressed", Transport::Compressed, ONE_G),
        ("direct", Transport::Direct, TEN_G),
        ("direct+multichannel", Transport::Direct, TWO_TEN_G),
    ];
    let wanted = |name: &str| transports.is_empty() || transports.iter().any(|t| t == name);
    for (name, t, links) in runs.into_iter().filter(|r| wanted(r.0)) {
        for c in concurrency {
            for o in orders {
                let c_name = match c {
                    Concurrency::Fixed(n) => format!("c{n}"),
                    Concurrency::Auto => "auto".into(),
                };
                let o_name = if orders.len() > 1 {
                    format!(" {}", order_name(*o))
                } else {
                    String::new()
                };
                for r in &reserves {
                    let r_name = r.map_or(String::new(), |r| format!(" cpu{:.0}", r * 100.0));
                    out.push(Config {
                        name: format!("{name} {c_name}{o_name}{r_name}"),
                        links,
                        how: How::Livemig(t),
                        concurrency: *c,
                        order: *o,
                        reserve_cpu: *r,
                        fresh_guests: true,
                    });
                }
            }
        }
    }
    out
}

/// The order the bench runs `configs` in (indices into them): the first as it comes, then
/// one level (concurrency, order and reserve) at a time, its transports side by side, first
/// to last at one level and last to first at the next. A later row of one bench run is slower
/// on some hosts whatever it drains (docs/drain.md): rows that are compared with each other
/// run one after the other, neither always first.
pub fn run_order(configs: &[Config]) -> Vec<usize> {
    if configs.is_empty() {
        return Vec::new();
    }
    let level = |i: usize| {
        let c = &configs[i];
        (c.concurrency, c.order, c.reserve_cpu.map(f64::to_bits))
    };
    let mut levels = Vec::new();
    for i in 1..configs.len() {
        if !levels.contains(&level(i)) {
            levels.push(level(i));
        }
    }
    let mut out = vec![0];
    for (n, l) in levels.into_iter().enumerate() {
        let mut side_by_side: Vec<usize> = (1..configs.len()).filter(|&i| level(i) == l).collect();
        if n % 2 == 1 {
            side_by_side.reverse();
        }
        out.extend(side_by_side);
    }
    out
}

fn order_name(o: Order) -> &'static str {
    match o {
        Order::Auto => "order-auto",
        Order::Largest => "order-largest",
        Order::Smallest => "order-smallest",
        Order::Name => "order-name",
    }
}

/// QEMU's, drained the way libvirt and KubeVirt do: two at a time.
pub fn qemu_configs() -> Vec<Config> {
    let c = |name: &str, mode, links| Config {
        name: name.into(),
        links,
        how: How::Qemu(mode),
        concurrency: Concurrency::Fixed(2),
        order: Order::Name,
        reserve_cpu: None,
        fresh_guests: false,
    };
    vec![
        c("tcp c2", Mode::Tcp, ONE_G),
        c("multifd+zstd c2", Mode::MultifdZstd { channels: 2 }, ONE_G),
        c("multifd c2", Mode::Multifd { channels: 2 }, TEN_G),
    ]
}

/// One VM's migration within a drain.
#[derive(Clone, Debug, Serialize)]
pub struct VmRun {
    pub name: String,
    pub memory: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub downtime_ms: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub moved: bool,
    pub verified: bool,
    pub error: Option<String>,
    /// Why its pre-copy stopped (`postcopy` when it moved by post-copy), as livemig reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// The most its guest was throttled (auto-converge), percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_pct_max: Option<u8>,
    /// Of its CPU, what its compression workers took (livemig's compressed transport).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec_cpu_seconds: Option<f64>,
}

/// What a VMM says about one drain.
pub struct DrainOutcome {
    pub makespan_ms: u64,
    pub vms: Vec<VmRun>,
    /// Migrations at once: the fixed window, or where `auto` settled.
    pub concurrency_used: usize,
    pub peak: usize,
    /// Time before the first migration (sampling the VMs), in the makespan.
    pub survey_s: f64,
    pub facts: Vec<VmFacts>,
    /// The hosts' cores as the drain's plan took them (livemig, once its source has learnt
    /// the transport's cost).
    pub cpu: Option<drain::plan::PlanCpu>,
    /// The guests yielded to their migrations.
    pub vcpu_yield: bool,
    /// What the path carried, bits/s, probed just before with the VMs running (the link,
    /// or the machine, whichever gives out first).
    pub path_bps: Option<f64>,
    /// The cores, not the link, held the drain's probe back: `path_bps` is a floor.
    pub path_is_floor: bool,
    /// The destination kept a page cache for the drain (`facts` are in the drain's order:
    /// the first filled it, alone).
    pub cache: bool,
    /// Seconds each migration takes beyond its bytes, as the drain's plan took it.
    pub overhead_s: f64,
    /// Per VM as `facts`, whether the compressed drain started it raw, and what its plan
    /// priced those at (livemig).
    pub raw: Vec<bool>,
    pub raw_cpu: Option<drain::plan::PlanCpu>,
    /// The VMM's own account (livemig's drain report).
    pub detail: serde_json::Value,
}

/// A VMM whose VMs the bench drains from one host to the other.
pub trait Drainer {
    fn peer(&self) -> &'static str;
    /// Whether (most of) its VMs are on host A.
    fn on_a(&self) -> bool;
    /// Stops its VMs wherever they are and boots them again on host A.
    fn fresh_guests(&mut self) -> Result<(), BenchError>;
    fn drain(&mut self, cfg: &Config, route: &Route) -> Result<DrainOutcome, BenchError>;
    /// Its source learns what drains cost its cores, and plans with that once it has.
    fn learns_costs(&self) -> bool {
        false
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct DrainRow {
    pub peer: String,
    pub config: String,
    pub links: String,
    pub direction: String,
    pub concurrency: String,
    pub concurrency_used: usize,
    pub order: String,
    /// The drain started from freshly booted guests.
    pub fresh_guests: bool,
    pub vms: usize,
    pub moved: usize,
    pub verified: usize,
    pub makespan_ms: u64,
    pub predicted_makespan_ms: u64,
    /// (measured − predicted) / measured.
    pub model_error: f64,
    /// Bytes the model expects on the wire (payload: references, deltas and compression
    /// counted; `wire_bytes` also counts headers).
    pub predicted_wire_bytes: u64,
    pub ram_bytes: u64,
    pub ram_gib_per_s: f64,
    /// What the sending interfaces counted (payload and headers).
    pub wire_bytes: u64,
    pub wire_gbps: f64,
    /// The links' raw goodput in the same run, counted the same way.
    pub link_gbps: f64,
    pub utilisation: f64,
    pub downtime_ms_sum: u64,
    pub downtime_ms_max: u64,
    pub cpu_seconds: f64,
    /// The guests' share of the source's cores before the drain and during it, 0..1 (None:
    /// not measured).
    pub guests_cpu_before: Option<f64>,
    pub guests_cpu_during: Option<f64>,
    pub peak_concurrency: usize,
    /// The same peer's unoptimised makespan over this one's.
    pub speedup: Option<f64>,
    pub timeline: Vec<VmRun>,
    /// (seconds, Gbit/s) from the interface counters.
    pub throughput: Vec<(f64, f64)>,
    /// Pages re-sent as deltas over the drain's migrations (livemig; None for QEMU).
    pub delta_pages: Option<u64>,
    /// Pages sent as references, within a VM and to the destination's page cache (livemig).
    pub ref_pages: Option<u64>,
    /// MiB of pages deltas and references did not send (livemig).
    pub delta_mib_saved: Option<f64>,
    pub ref_mib_saved: Option<f64>,
    pub error: Option<String>,
    pub detail: serde_json::Value,
}

#[derive(Clone, Debug, Serialize)]
pub struct DrainBenchReport {
    pub vms: Vec<VmSpec>,
    pub tls: bool,
    pub scale: f64,
    pub host_cpus: usize,
    pub links: Vec<LinkMeasure>,
    pub rows: Vec<DrainRow>,
    /// The guests' measured compressibility, which the reference's scenarios assume.
    pub guest_compress_ratio: Option<f64>,
    /// The reference's scenarios, predicted.
    pub references: Vec<Reference>,
    pub notes: Vec<String>,
}

/// Runs the bench: links measured, livemig's drains, QEMU's, the model.
pub fn bench_drain(o: &DrainBenchOptions) -> Result<DrainBenchReport, BenchError> {
    preflight(o)?;
    let dir = std::path::absolute(&o.out)?;
    std::fs::create_dir_all(&dir)?;
    let tb = Testbed::new(&o.testbed, o.scale)?;
    let existed = tb.status()?.present;
    tb.up()?;
    let configs = livemig_configs(&o.concurrency, &o.orders, &o.transports, &o.reserve_cpu);
    let qemu = if o.peer_qemu {
        qemu_configs()
    } else {
        Vec::new()
    };
    let boots = configs.iter().filter(|c| c.fresh_guests).count();
    let ui = Ui::new(3 + 2 + (configs.len() + boots + qemu.len()) as u64);
    let mut notes = Vec::new();
    let reporting = crate::hostmem::Reporting::read();
    let result = run_all(o, &tb, &ui, &dir, &configs, &qemu, &mut notes);
    notes.extend(crate::hostmem::note(
        reporting,
        crate::hostmem::Reporting::read(),
    ));
    ui.finish();
    if !existed && !o.keep_testbed {
        if let Err(e) = tb.down() {
            notes.push(format!("removing the testbed: {e}"));
        }
    }
    let m = result?;
    let report = finish(o, m.links, m.rows, notes, &m.facts);
    std::fs::write(
        dir.join("bench.json"),
        serde_json::to_vec_pretty(&report).map_err(|e| step("bench.json")(e.to_string()))?,
    )?;
    chart::draw(&report, &dir.join("bench.png")).map_err(step("bench.png"))?;
    Ok(report)
}

fn run_all(
    o: &DrainBenchOptions,
    tb: &Testbed,
    ui: &Ui,
    dir: &std::path::Path,
    configs: &[Config],
    qemu: &[Config],
    notes: &mut Vec<String>,
) -> Result<Measured, BenchError> {
    let links = crate::netns::measure_link_sets(tb, ui, o.goodput_secs)?;
    let bench = Bench {
        tb,
        ui,
        links: &links,
    };
    let mut rows = Vec::new();
    let facts = {
        ui.start("starting two host agents and the VMs");
        let mut hosts = livemig::LivemigHosts::start(o, tb, dir)?;
        ui.done(&format!("{} VMs running on host A", o.vms.len()));
        bench.drains(&mut hosts, configs, &mut rows, notes);
        hosts.facts()
    };
    if !qemu.is_empty() {
        match qemu_side::QemuHosts::start(o, tb, dir, facts.clone(), ui) {
            Ok(mut q) => bench.drains(&mut q, qemu, &mut rows, notes),
            Err(e) => notes.push(format!("QEMU rows not run: {e}")),
        }
    }
    Ok(Measured { links, rows, facts })
}

/// What a bench run measured.
struct Measured {
    links: Vec<LinkMeasure>,
    rows: Vec<DrainRow>,
    /// Each VM as sampled before the drains.
    facts: Vec<VmFacts>,
}

/// What every drain is measured against.
struct Bench<'a> {
    tb: &'a Testbed,
    ui: &'a Ui,
    links: &'a [LinkMeasure],
}

impl Bench<'_> {
    /// Each of `configs` drained once, in [`run_order`], and measured; their rows join `rows`
    /// in the order of `configs`. A drain whose source had not learnt what it costs the cores
    /// (its plan had none: the first of its kind on the host) taught it, and the row is the
    /// drain after it, as on a host that has drained before (`notes` says so).
    fn drains(
        &self,
        d: &mut impl Drainer,
        configs: &[Config],
        rows: &mut Vec<DrainRow>,
        notes: &mut Vec<String>,
    ) {
        let mut measured: Vec<(usize, DrainRow)> = Vec::with_capacity(configs.len());
        for i in run_order(configs) {
            let cfg = &configs[i];
            let (mut row, unpriced) = self.drain_once(d, cfg);
            if unpriced {
                notes.push(format!(
                    "{} {}: the first drain of its kind on the source, whose plan had no CPU costs; it taught them, and the row is the drain after it",
                    d.peer(),
                    cfg.name
                ));
                self.ui.more(1 + u64::from(cfg.fresh_guests));
                row = self.drain_once(d, cfg).0;
            }
            measured.push((i, row));
        }
        measured.sort_by_key(|(i, _)| *i);
        rows.extend(measured.into_iter().map(|(_, row)| row));
    }

    /// `cfg` drained once (from fresh guests when it says so), and whether its plan lacked
    /// the cores because its source had not learnt their cost.
    fn drain_once(&self, d: &mut impl Drainer, cfg: &Config) -> (DrainRow, bool) {
        let what = format!("{} {} over {}", d.peer(), cfg.name, cfg.links.join("+"));
        if cfg.fresh_guests {
            self.ui
                .start(&format!("{} booting the VMs afresh", d.peer()));
            if let Err(e) = d.fresh_guests() {
                return (self.failed(d.peer(), cfg, String::new(), &e), false);
            }
            self.ui.done("the VMs run afresh on host A");
        }
        self.ui.start(&what);
        let (row, unpriced) = self.measure(d, cfg);
        self.ui.done(&match &row.error {
            None => table::line(&row),
            Some(e) => format!("{what}: FAILED: {e}"),
        });
        (row, unpriced && d.learns_costs())
    }

    /// One drain from wherever the VMs are, with the interfaces counted around it; and
    /// whether it moved VMs with no CPU in its plan.
    fn measure(&self, d: &mut impl Drainer, cfg: &Config) -> (DrainRow, bool) {
        let route = match Route::new(self.tb, cfg.links, d.on_a()) {
            Ok(r) => r,
            Err(e) => return (self.failed(d.peer(), cfg, String::new(), &e), false),
        };
        let what = format!("{} {}", d.peer(), cfg.name);
        let sampler = TxSampler::start(
            route.src_ns(),
            route.src_devs(),
            Duration::from_millis(100),
            self.ui.live(&what),
        );
        let out = d.drain(cfg, &route);
        let samples = sampler.finish();
        match (out, samples) {
            (Ok(out), Ok(s)) => {
                let unpriced = out.cpu.is_none() && out.vms.iter().any(|v| v.moved);
                (self.row(d.peer(), cfg, &route, &out, &s), unpriced)
            }
            (Err(e), _) => (self.failed(d.peer(), cfg, route.direction(), &e), false),
            (_, Err(e)) => (
                self.failed(d.peer(), cfg, route.direction(), &e.into()),
                false,
            ),
        }
    }

    /// The links' raw goodput, bits/s: the payload rate (for the model) and the interface
    /// rate (for utilisation).
    fn goodput(&self, links: &str) -> (f64, f64) {
        self.links
            .iter()
            .find(|l| l.links == links)
            .map_or((0.0, 0.0), |l| {
                (l.measured.goodput_bps, l.measured.interface_bps)
            })
    }

    fn row(
        &self,
        peer: &str,
        cfg: &Config,
        route: &Route,
        out: &DrainOutcome,
        samples: &[(Duration, u64)],
    ) -> DrainRow {
        let mut r = self.empty_row(peer, cfg, route.direction());
        let secs = out.makespan_ms.max(1) as f64 / 1e3;
        let moved: Vec<&VmRun> = out.vms.iter().filter(|v| v.moved).collect();
        r.vms = out.vms.len();
        r.moved = moved.len();
        r.verified = out.vms.iter().filter(|v| v.verified).count();
        r.makespan_ms = out.makespan_ms;
        r.concurrency_used = out.concurrency_used;
        r.peak_concurrency = out.peak;
        r.ram_bytes = moved.iter().map(|v| v.memory).sum();
        r.ram_gib_per_s = r.ram_bytes as f64 / f64::from(1u32 << 30) / secs;
        r.wire_bytes = samples.last().map_or(0, |s| s.1);
        r.wire_gbps = r.wire_bytes as f64 * 8.0 / secs / 1e9;
        if r.link_gbps > 0.0 {
            r.utilisation = r.wire_gbps / r.link_gbps;
        }
        let downtimes = || out.vms.iter().filter_map(|v| v.downtime_ms);
        r.downtime_ms_sum = downtimes().sum();
        r.downtime_ms_max = downtimes().max().unwrap_or(0);
        r.cpu_seconds = out.vms.iter().filter_map(|v| v.cpu_seconds).sum();
        let share = |p: &str| out.detail.pointer(p).and_then(serde_json::Value::as_f64);
        r.guests_cpu_before = share("/cpu/pools/0/before/guests");
        r.guests_cpu_during = share("/cpu/pools/0/during/guests");
        // The probe under the drain's load, unless the cores held it back and the model
        // knows what they cost: then the link is what the bench measured of it alone, and
        // the cores bound the migrations (as the drain's plan takes it).
        let goodput = self.goodput(&route.name()).0;
        let link = match out.path_bps {
            Some(p) if !out.path_is_floor || out.cpu.is_none() => p.min(goodput),
            _ => goodput,
        };
        r.predicted_makespan_ms = (predict(cfg, out, link) * 1e3) as u64;
        r.predicted_wire_bytes = model::wire_bytes(&scenario(cfg, out, link)) as u64;
        r.model_error = (r.makespan_ms as f64 - r.predicted_makespan_ms as f64) / secs / 1e3;
        r.timeline = out.vms.clone();
        let n = |p: &str| out.detail.pointer(p).and_then(serde_json::Value::as_u64);
        let mib = |p: &str| n(p).map(|b| b as f64 / f64::from(1u32 << 20));
        r.delta_pages = n("/pages/delta");
        r.ref_pages = n("/pages/dedup")
            .zip(n("/pages/dedup_host"))
            .map(|(a, b)| a + b);
        r.delta_mib_saved = mib("/delta_bytes_saved");
        r.ref_mib_saved = mib("/dedup_bytes_saved")
            .zip(mib("/dedup_host_bytes_saved"))
            .map(|(a, b)| a + b);
        r.detail = out.detail.clone();
        r.throughput = crate::transports::rates(samples);
        r.error = out
            .vms
            .iter()
            .find_map(|v| v.error.as_ref().map(|e| format!("{}: {e}", v.name)));
        r
    }

    fn empty_row(&self, peer: &str, cfg: &Config, direction: String) -> DrainRow {
        let links = cfg.links.join("+");
        DrainRow {
            peer: peer.into(),
            config: cfg.name.clone(),
            link_gbps: self.goodput(&links).1 / 1e9,
            links,
            direction,
            concurrency: cfg.concurrency.to_string(),
            concurrency_used: 0,
            order: format!("{:?}", cfg.order).to_lowercase(),
            fresh_guests: cfg.fresh_guests,
            vms: 0,
            moved: 0,
            verified: 0,
            makespan_ms: 0,
            predicted_makespan_ms: 0,
            predicted_wire_bytes: 0,
            model_error: 0.0,
            ram_bytes: 0,
            ram_gib_per_s: 0.0,
            wire_bytes: 0,
            wire_gbps: 0.0,
            utilisation: 0.0,
            downtime_ms_sum: 0,
            downtime_ms_max: 0,
            cpu_seconds: 0.0,
            guests_cpu_before: None,
            guests_cpu_during: None,
            peak_concurrency: 0,
            speedup: None,
            timeline: Vec::new(),
            throughput: Vec::new(),
            error: None,
            delta_pages: None,
            ref_pages: None,
            delta_mib_saved: None,
            ref_mib_saved: None,
            detail: serde_json::Value::Null,
        }
    }

    fn failed(&self, peer: &str, cfg: &Config, direction: String, e: &BenchError) -> DrainRow {
        let mut r = self.empty_row(peer, cfg, direction);
        r.error = Some(e.to_string());
        r
    }
}

/// The model's makespan for a drain, seconds: its survey, then the drain of its VMs' facts
/// over the path's measured rate at the concurrency its window settled at ([`scenario`]:
/// `auto` passes through others briefly; its peak also counts migrations only verifying, so
/// it bounds the level rather than replacing it).
pub fn predict(cfg: &Config, out: &DrainOutcome, goodput_bps: f64) -> f64 {
    out.survey_s + model::makespan(&scenario(cfg, out, goodput_bps))
}

/// A drain's VMs as the model takes them: over the path's rate at the concurrency its window
/// settled at, or for `auto` the most it ran at once where that is less (a window can settle
/// above what the VMs left let it run), their CPU priced at that level.
fn scenario(cfg: &Config, out: &DrainOutcome, goodput_bps: f64) -> Scenario {
    let used = out.concurrency_used.max(1);
    let (concurrency, auto) = match cfg.concurrency {
        Concurrency::Auto => (used.min(out.peak.max(1)), true),
        Concurrency::Fixed(_) => (used, false),
    };
    let priced = |c: &Option<drain::plan::PlanCpu>| {
        c.clone()
            .map(|c| if auto { c.at_level(concurrency) } else { c })
    };
    Scenario {
        vms: out.facts.clone(),
        link: goodput_bps / 8.0,
        concurrency,
        compressed: cfg.compressed(),
        framing: 1.0,
        cpu: priced(&out.cpu),
        vcpu_yield: out.vcpu_yield,
        cache: out.cache,
        overhead: out.overhead_s,
        raw: out.raw.clone(),
        raw_cpu: priced(&out.raw_cpu),
    }
}

/// Speedups against each peer's unoptimised row, the reference scenarios, the notes.
fn finish(
    o: &DrainBenchOptions,
    links: Vec<LinkMeasure>,
    mut rows: Vec<DrainRow>,
    mut notes: Vec<String>,
    facts: &[VmFacts],
) -> DrainBenchReport {
    for peer in ["livemig", "qemu"] {
        let base = rows
            .iter()
            .find(|r| r.peer == peer && r.error.is_none())
            .map(|r| r.makespan_ms);
        for r in rows
            .iter_mut()
            .filter(|r| r.peer == peer && r.error.is_none())
        {
            r.speedup = base.map(|b| b as f64 / r.makespan_ms.max(1) as f64);
        }
    }
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    notes.push(format!(
        "{host_cpus} host CPUs run both hosts, every guest (by instruction emulation here) and \
         every migration thread: rows on 10 GbE links are capped by the machine, not the link"
    ));
    DrainBenchReport {
        vms: o.vms.clone(),
        tls: o.tls,
        scale: o.scale,
        host_cpus,
        links,
        guest_compress_ratio: compress_ratio(facts),
        references: model::references(
            compress_ratio(facts).unwrap_or(DEFAULT_COMPRESS_RATIO),
            REFERENCE_DIRTY_MB_S,
            2,
        ),
        rows,
        notes,
    }
}

/// The guests' compressed bytes per raw byte (zstd), weighted by what they touched.
fn compress_ratio(facts: &[VmFacts]) -> Option<f64> {
    let (raw, packed) =
        facts
            .iter()
            .filter_map(|f| f.sample.as_ref())
            .fold((0.0, 0.0), |(r, p), s| {
                let t = s.touched_bytes as f64;
                (r + t, p + t * s.compress_ratio)
            });
    (raw > 0.0).then(|| packed / raw)
}

/// What the model assumes of the reference's SQL Server VMs (see the README): they compress
/// as the guests measured here (our `server` memory profile), or as this when none was, and
/// dirty 10 MB/s (our emulated guests cannot show a real server's rate).
pub const DEFAULT_COMPRESS_RATIO: f64 = 0.6;
pub const REFERENCE_DIRTY_MB_S: f64 = 10.0;

/// What the bench refuses before it starts.
fn preflight(o: &DrainBenchOptions) -> Result<(), BenchError> {
    if !crate::testbed::is_root() {
        return Err(BenchError::NotRoot);
    }
    if !crate::kvm_available() {
        return Err(BenchError::NoKvm);
    }
    if o.peer_qemu && !crate::qemu::available() {
        return Err(BenchError::NoQemu);
    }
    if o.vms.is_empty() {
        return Err(step("--vms")("no VMs to drain"));
    }
    let total: u64 = o.vms.iter().map(|v| v.memory).sum();
    let largest = o.vms.iter().map(|v| v.memory).max().unwrap_or(0);
    // Every VM once, and the largest few twice while they are in flight.
    let need = total + 4 * largest + (512 << 20);
    match ram::host::mem_available() {
        Some(avail) if need > avail => Err(step("--vms/--vm-memory")(format!(
            "{} MiB of VMs need about {} MiB free, this machine has {} MiB",
            total >> 20,
            need >> 20,
            avail >> 20
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_optimised_row_starts_from_fresh_guests() {
        let c = [Concurrency::Fixed(1), Concurrency::Auto];
        let configs = livemig_configs(&c, &[Order::Name], &[], &[]);
        assert_eq!(configs.len(), 1 + 4 * 2);
        assert!(
            !configs[0].fresh_guests,
            "the unoptimised row runs first, as booted"
        );
        assert!(configs[1..].iter().all(|c| c.fresh_guests));
    }

    fn names(configs: &[Config], order: &[usize]) -> Vec<String> {
        order.iter().map(|&i| configs[i].name.clone()).collect()
    }

    #[test]
    fn a_levels_transports_run_side_by_side_first_to_last_then_last_to_first() {
        let c = [
            Concurrency::Fixed(1),
            Concurrency::Fixed(4),
            Concurrency::Auto,
        ];
        let configs = livemig_configs(&c, &[Order::Name], &[], &[]);
        let shown: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(&shown[..3], [UNOPTIMISED, "tcp c1", "tcp c4"]);
        let run = run_order(&configs);
        assert_eq!(
            names(&configs, &run),
            [
                UNOPTIMISED,
                "tcp c1",
                "compressed c1",
                "direct c1",
                "direct+multichannel c1",
                "direct+multichannel c4",
                "direct c4",
                "compressed c4",
                "tcp c4",
                "tcp auto",
                "compressed auto",
                "direct auto",
                "direct+multichannel auto",
            ]
        );
        let only = livemig_configs(&c, &[Order::Name], &["compressed".into()], &[]);
        assert_eq!(run_order(&only), [0, 1, 2, 3]);
        let reserves = livemig_configs(&c[..1], &[Order::Name], &["tcp".into()], &[0.0, 50.0]);
        assert_eq!(
            names(&reserves, &run_order(&reserves)),
            [UNOPTIMISED, "tcp c1", "tcp c1 cpu50"]
        );
        assert_eq!(run_order(&qemu_configs()), [0, 1, 2]);
        assert!(run_order(&[]).is_empty());
    }
}
