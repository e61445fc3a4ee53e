//! The drain itself: a sliding window of migrations (one starts as soon as one ends, none
//! waits for a batch), each asked of the source's agent on its own thread and watched
//! through it (which also renews the migration's lease: a drain that dies cancels its
//! migrations). Failures are retried after the others; a switchover whose outcome is unknown
//! is settled with the destination's agent ([`crate::resolve`]); Ctrl-C cancels what is in
//! flight and starts nothing more.
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migration::{MigrateRequest, Progress, Report};
use unixhttp::ApiError;

use crate::pace::paces;
use crate::plan;
use crate::pricing::{Pricing, RawCosts};
use crate::report::{DrainReport, PlanSummary, Status, VmOutcome};
use crate::survey::Survey;
use crate::view::View;
use crate::window::{Concurrency, Window, MEASURE_S, SETTLE_S};
use crate::DrainOptions;

/// How often the run looks at its migrations (an ending migration wakes it at once).
const TICK: Duration = Duration::from_millis(50);
/// A migration's client lease: the drain renews it every tick.
const LEASE: Duration = Duration::from_secs(3);
/// A failed VM is tried again no sooner than this (the destination clears its arrival).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Times a VM is tried again on a busy destination before it is left behind.
const MAX_BUSY_RETRIES: u32 = 60;

/// How long a VM waits before trying a busy destination again: 1 s, doubling, at most 10 s.
fn busy_backoff(times: u32) -> Duration {
    RETRY_AFTER
        .saturating_mul(1 << times.saturating_sub(1).min(4))
        .min(Duration::from_secs(10))
}

/// Why a migration the plan started raw sends raw, in the report.
const MODEL_RAW: &str = "the model: sooner raw";
/// A slot refilled within this long still counts as a full window for `auto`.
const REFILL_GRACE: Duration = Duration::from_millis(250);
/// A page of guest RAM, as progress counts pages.
const PAGE: u64 = 4096;
/// Window per destination `auto` is priced at before the model chooses where it starts
/// (which migrations go raw, the link probe's streams); its ETA is at that start.
pub(crate) const AUTO_ETA_WINDOW: usize = 2;

/// The survey's facts with the page-cache hits each VM can expect when the VMs go in `order`
/// (none when the drain uses no caches).
pub(crate) fn with_cache_hits(
    o: &DrainOptions,
    s: &Survey,
    order: &[usize],
    placement: &[Result<usize, crate::plan::NoRoom>],
) -> Vec<crate::predict::VmFacts> {
    let mut vms = s.vms.clone();
    if !crate::cache::wanted(o) {
        return vms;
    }
    for d in 0..s.dests.len() {
        let going: Vec<usize> = order
            .iter()
            .copied()
            .filter(|i| placement[*i] == Ok(d))
            .collect();
        let mut mine: Vec<_> = going.iter().map(|i| vms[*i].clone()).collect();
        crate::cache::expect_hits(&mut mine);
        for (i, v) in going.into_iter().zip(mine) {
            vms[i] = v;
        }
    }
    vms
}

/// The plan: placement, order, predictions and ETA.
pub struct Planned {
    pub order: Vec<usize>,
    pub placement: Vec<Result<usize, crate::plan::NoRoom>>,
    pub predicted: Vec<Option<f64>>,
    /// Per VM, the bytes the model expects its migration to put on the wire.
    pub wire: Vec<Option<f64>>,
    /// Per VM, when the model has its migration start and end, seconds from the first start.
    pub spans: Vec<Option<[f64; 2]>>,
    /// Per VM, the guest RAM per second the model has its migration send while it moves.
    pub ram_rates: Vec<Option<f64>>,
    /// Per VM, the share of its pages the model expects its destination's page cache to hold.
    pub cache_hits: Vec<Option<f64>>,
    /// Whether the model says it will move by post-copy (its pre-copy would not converge at
    /// its share of the link, or post-copy was asked for).
    pub postcopy: Vec<bool>,
    pub eta_s: Option<f64>,
    /// Bytes the model expects the migrations to put on the wire (None: a link unmeasured).
    pub wire_bytes: Option<f64>,
    /// The hosts' cores in the model (None: the source has not learnt the transport's cost).
    pub cpu: Option<plan::PlanCpu>,
    /// Per VM, what the model says held its migration back.
    pub bounds: Vec<Option<plan::Bound>>,
    /// Per VM, what the model has its migration take of the cores.
    pub cores: Vec<Option<crate::report::PredictedCores>>,
    /// For `auto`, the model's makespan at each level from 1 (empty otherwise).
    pub level_etas: Vec<f64>,
    /// What the hosts learn this drain's costs under ([`drain_cost_key`]).
    pub cost_key: String,
    /// Seconds each migration takes beyond its bytes ([`crate::predict::overhead`]).
    pub overhead_s: f64,
    /// Per VM, whether its migration starts raw: the drain compresses, and the model says
    /// the drain ends sooner with it sent raw ([`plan::choose_raw`]).
    pub raw: Vec<bool>,
    /// The plan weighed each VM's codec ([`Pricing::weighs_codecs`]): what paid for one
    /// migration at run time does not override its choice for the next.
    pub codecs_chosen: bool,
    /// What those sent raw were priced at (None when none is).
    pub raw_costs: Option<RawCosts>,
    /// How long planning took, milliseconds.
    pub took_ms: u64,
}

impl Planned {
    /// The VMs planned for destination `d` (indices into the survey's).
    pub fn vms_to(&self, d: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.placement.len()).filter(move |&i| self.placement[i] == Ok(d))
    }

    /// Guest RAM of the VMs planned for destination `d`.
    pub fn memory_to(&self, d: usize, s: &Survey) -> u64 {
        self.vms_to(d).map(|i| s.vms[i].memory).sum()
    }

    pub fn make(o: &DrainOptions, s: &Survey, meter: Option<&crate::cpu::Meter>) -> Self {
        let t0 = std::time::Instant::now();
        let placement = place(o, s);
        let cached = cached_dests(o, s, &placement);
        let key = cost_key(&o.request, cached.contains(&true));
        let overhead = crate::predict::overhead(meter.and_then(|m| m.setup_s(&key)));
        let window = match o.concurrency {
            Concurrency::Fixed(n) => n,
            Concurrency::Auto => AUTO_ETA_WINDOW * s.dests.len(),
        };
        let cpu = meter.and_then(|m| plan_cpu(o, m, &key, window));
        let raw_costs = meter.and_then(|m| raw_costs(o, m, cached.contains(&true), window));
        let p = Pricing::new(
            o,
            s,
            &placement,
            &cached,
            cpu.clone(),
            raw_costs.clone(),
            overhead,
            window,
        );
        let raw = p.choose_raw(window);
        let (p, raw) = if raw.contains(&true) {
            p.ordered_as_sent(o, &placement, &cached, &raw)
        } else {
            (p, raw)
        };
        let (sim, level_etas, raw) = match o.concurrency {
            Concurrency::Auto => auto_priced(&p, raw, window, accepted_at_once(s)),
            Concurrency::Fixed(_) => (p.simulate(window, &raw), Vec::new(), raw),
        };
        let ram_rates = sim.as_ref().map_or(vec![None; s.vms.len()], |sim| {
            by_vm(&p.placed, p.ram_rates(sim, &raw), s.vms.len())
                .into_iter()
                .map(Option::flatten)
                .collect()
        });
        let by_vm = per_vm(&p.placed, sim.as_ref(), s.vms.len());
        let raw = p.by_vm(&raw);
        Planned {
            cache_hits: cache_hits_by_vm(p.vms(), &placement, &cached),
            order: p.order.clone(),
            predicted: p.predicted(&placement, &raw),
            postcopy: p.postcopy(&placement, &raw),
            placement,
            wire: by_vm.wire,
            spans: by_vm.spans,
            ram_rates,
            eta_s: sim.as_ref().map(|s| s.makespan),
            wire_bytes: sim.map(|s| s.jobs.iter().map(|x| x.bytes).sum()),
            cpu,
            bounds: by_vm.bounds,
            cores: by_vm.cores,
            level_etas,
            raw_costs: raw_costs.filter(|_| raw.contains(&true)),
            raw,
            codecs_chosen: p.weighs_codecs(),
            cost_key: key,
            overhead_s: overhead,
            took_ms: t0.elapsed().as_millis() as u64,
        }
    }

    fn summary(&self, o: &DrainOptions, s: &Survey, used: usize) -> PlanSummary {
        PlanSummary {
            order: o.order,
            concurrency: o.concurrency.to_string(),
            concurrency_used: used,
            link_bits_per_s: s
                .dests
                .iter()
                .map(|d| d.facts.rate.map(|r| r * 8.0))
                .collect(),
            link_is_floor: s.dests.iter().map(|d| d.facts.rate_is_floor).collect(),
            eta_s: self.eta_s,
            // Finite and non-negative; `as` saturates.
            #[allow(clippy::cast_sign_loss)]
            wire_bytes_predicted: self.wire_bytes.map(|b| b as u64),
            // The survey gave every VM the one the source learnt.
            dirty_ratio: s.vms.first().map_or(1.0, |v| v.dirty_ratio),
            overhead_s: self.overhead_s,
            cpu: self.cpu.clone(),
            raw: self.raw_costs.clone(),
            level_etas_s: self.level_etas.clone(),
        }
    }

    /// Every VM's outcome before anything ran: planned, no room or skipped.
    fn outcomes(&self, s: &Survey, planned: Status) -> Vec<VmOutcome> {
        let mut out: Vec<VmOutcome> = s
            .vms
            .iter()
            .enumerate()
            .map(|(i, v)| VmOutcome {
                name: v.name.clone(),
                memory: v.memory,
                destination: self.placement[i]
                    .as_ref()
                    .ok()
                    .map(|d| s.dests[*d].name.clone()),
                disks_copied: self.placement[i]
                    .as_ref()
                    .ok()
                    .filter(|d| plan::must_copy(&v.needs, &s.dests[**d].facts))
                    .map(|_| v.needs.disk_bytes),
                status: if self.placement[i].is_ok() {
                    planned
                } else {
                    Status::NoRoom
                },
                guest_verified: false,
                attempts: 0,
                start_ms: None,
                end_ms: None,
                verify_ms: None,
                predicted_s: self.predicted[i],
                // Finite and non-negative; `as` saturates.
                #[allow(clippy::cast_sign_loss)]
                predicted_wire_bytes: self.wire[i].map(|b| b as u64),
                predicted_span_s: self.spans[i],
                cache_hits_expected: self.cache_hits[i],
                bound: self.bounds[i],
                predicted_cores: self.cores[i],
                postcopy: self.postcopy[i] && self.placement[i].is_ok(),
                started_raw: planned == Status::Planned && self.raw[i],
                sample: v.sample.clone(),
                error: self.placement[i].as_ref().err().map(ToString::to_string),
                earlier_errors: Vec::new(),
                busy_retries: 0,
                report: None,
            })
            .collect();
        out.extend(s.skipped.iter().map(|(v, why)| VmOutcome {
            disks_copied: None,
            name: v.name.clone(),
            memory: v.memory,
            destination: None,
            status: Status::Skipped,
            guest_verified: false,
            attempts: 0,
            start_ms: None,
            end_ms: None,
            verify_ms: None,
            predicted_s: None,
            predicted_wire_bytes: None,
            predicted_span_s: None,
            cache_hits_expected: None,
            bound: None,
            predicted_cores: None,
            postcopy: false,
            started_raw: false,
            sample: None,
            error: Some(why.clone()),
            earlier_errors: Vec::new(),
            busy_retries: 0,
            report: None,
        }));
        out
    }

    /// `--dry-run`: the plan as a report, VMs in the order they would leave.
    pub fn dry_report(&self, o: &DrainOptions, s: &Survey) -> DrainReport {
        let mut outcomes = self.outcomes(s, Status::Planned);
        let rank = |name: &str| {
            self.order
                .iter()
                .position(|i| s.vms[*i].name == name)
                .unwrap_or(usize::MAX)
        };
        outcomes.sort_by_key(|v| rank(&v.name));
        let used = match o.concurrency {
            Concurrency::Fixed(n) => n,
            Concurrency::Auto => Window::guided(o.concurrency, self.level_etas.clone())
                .at_most(accepted_at_once(s))
                .limit(),
        };
        DrainReport::new(
            s.source.clone(),
            s.dests.iter().map(|d| d.name.clone()).collect(),
            self.summary(o, s, used),
            outcomes,
            0,
            0,
            false,
        )
    }
}

/// One attempt at moving a VM.
#[derive(Clone, Copy, Debug)]
struct Job {
    vm: usize,
    dest: usize,
    attempt: u32,
}

/// A migration in flight.
struct Flight {
    job: Job,
    session: u64,
    worker: JoinHandle<Result<Report, ApiError>>,
    last: Option<Progress>,
    paced: Option<u64>,
    /// Past its switchover: the VM runs on the destination, whose guest verifies it; the
    /// link and the window are free for the next.
    switched: bool,
    /// Held raw by the host-wide codec policy.
    held_raw: bool,
    /// The plan sent it raw: the codec policy leaves it so.
    planned_raw: bool,
    /// The codec policy (held or released) or the plan has chosen for it: "raw paid" applies
    /// only to migrations neither has, or it would undo their choices.
    codec_chosen: bool,
    /// Its codec change is the one under judgement: undoing it undoes this one.
    judged: bool,
    /// It goes by plain tcp ([`by_tcp`]): no codec to change.
    by_tcp: bool,
}

pub struct Run<'a> {
    o: &'a DrainOptions,
    s: &'a Survey,
    planned: &'a Planned,
    t0: Instant,
    queue: VecDeque<Job>,
    /// Failed attempts to try again, and when.
    retry: Vec<(Job, Instant)>,
    flights: Vec<Flight>,
    outcomes: Vec<VmOutcome>,
    window: Window,
    /// `auto`'s changes, for the report.
    window_steps: Vec<crate::report::WindowStep>,
    full_since: Option<Instant>,
    /// (when, guest RAM sent so far) once the window had been full for `SETTLE_S`: where
    /// the level's mean throughput is measured from.
    settle_mark: Option<(Instant, u64)>,
    /// When the window last dropped below full.
    not_full_since: Option<Instant>,
    /// (when, bytes on the wire so far, guest RAM sent so far): the aggregate throughput on
    /// the links, and the drain's progress (which compression and references make larger).
    wire: VecDeque<(Instant, u64, u64)>,
    /// Guest RAM the migrations that ended had sent.
    sent_done: u64,
    wire_done: u64,
    ram_done: u64,
    peak: usize,
    interrupted: bool,
    view: View,
    survey_ms: u64,
    /// Migrate calls that ended wake the loop.
    ended: (std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>),
    /// Per destination, the page cache its migrations share.
    caches: Vec<Option<host::api::CacheInfo>>,
    /// Per destination, whether a migration there has finished its copy (so its cache holds
    /// pages for the others).
    seeded: Vec<bool>,
    /// The hosts' CPU, and `--reserve-cpu`'s hold on the budget.
    cpu: Option<CpuWatch>,
}

/// The CPU the run watches: its meter, each pool's VMM share before the drain, and the
/// governor when `--reserve-cpu` asks for one.
struct CpuWatch {
    meter: crate::cpu::Meter,
    /// What the hosts learn the drain's costs under.
    key: String,
    governor: Option<crate::cpu::Governor>,
    last: Instant,
    /// The host-wide codec policy, in a compressed drain: what it did, and its tuner.
    codec: Option<(crate::cpu::CodecReport, crate::cpu::CodecTuner)>,
}

impl CpuWatch {
    fn new(o: &DrainOptions, s: &Survey, meter: crate::cpu::Meter, key: String) -> Self {
        let governor = o.budget.reserve_cpu.map(|reserve| {
            let src = meter.source();
            let transport = &key;
            // Both sides' cost where the source shares its cores with a destination.
            let shared = meter.pools().first().is_some_and(|p| p.len() > 1);
            let cost =
                crate::cpu::cost_per_byte(crate::cpu::learnt(&src.costs, transport), true, shared);
            let links: f64 = s.dests.iter().filter_map(|d| d.facts.rate).sum::<f64>() * 8.0;
            let ceiling = o.budget.max_bandwidth.map_or(
                if links > 0.0 {
                    links
                } else {
                    UNMEASURED_CEILING
                },
                |b| b as f64,
            );
            crate::cpu::Governor::new(reserve, src.cores, cost, ceiling)
        });
        let compressed = compresses(&o.request);
        CpuWatch {
            meter,
            key,
            governor,
            last: Instant::now(),
            codec: compressed.then(|| {
                (
                    crate::cpu::CodecReport::default(),
                    crate::cpu::CodecTuner::default(),
                )
            }),
        }
    }

    /// Every [`crate::cpu::READ_EVERY_MS`], reads the hosts (so that a VM process that
    /// leaves has its CPU counted until shortly before): per pool, the shares since the
    /// reading before.
    fn read(&mut self) -> Option<Vec<Option<crate::cpu::Shares>>> {
        if self.last.elapsed() < Duration::from_millis(crate::cpu::READ_EVERY_MS) {
            return None;
        }
        self.last = Instant::now();
        Some(self.meter.tick())
    }

    /// Feeds the governor what the VMM threads (the migrations') took of the busiest pool.
    /// Whether the budget changed.
    fn govern(&mut self, shares: &[Option<crate::cpu::Shares>]) -> bool {
        let Some(g) = self.governor.as_mut() else {
            return false;
        };
        let took = shares.iter().flatten().map(|s| s.vmm).fold(0.0, f64::max);
        g.observe(took).is_some()
    }

    /// The budget the governor allows, bits/s.
    fn budget(&self) -> Option<u64> {
        // Positive and finite; `as` saturates.
        #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
        self.governor.as_ref().map(|g| g.budget as u64)
    }

    /// The report, once the hosts have learnt what the drain's `wire` bytes cost them and
    /// how its `vms`' guests kept their pace.
    fn report(
        mut self,
        o: &DrainOptions,
        wire: u64,
        vms: &[VmOutcome],
        peak: usize,
    ) -> crate::cpu::CpuReport {
        let pools = self.meter.report();
        // What a migration started raw shows is not what the drain's codec costs: the hosts
        // learn from the others, and their share of the VMM threads' CPU.
        let all = migrations_cpu(vms);
        let raw_wire: u64 = vms
            .iter()
            .filter(|v| v.started_raw)
            .filter_map(|v| v.report.as_ref())
            .map(|r| r.bytes_on_wire)
            .sum();
        let vms: Vec<VmOutcome> = vms.iter().filter(|v| !v.started_raw).cloned().collect();
        let vms = &vms[..];
        let taught = migrations_cpu(vms);
        let codec = compressed_cpu(vms);
        let (streams, cores) = (page_streams(&o.request), self.meter.source().cores);
        let shown = crate::cpu::Shown {
            dirty_ratio: crate::predict::drain_dirty_ratio(&dirty_ratios(vms)),
            concurrency: o.concurrency.fixed(),
            peak,
            busy_workers: crate::cpu::busy_workers(&codec, streams, cores),
            workers_per_share: crate::cpu::workers_per_share(&codec, streams, cores),
            setup_s: mean_setup_s(vms),
            verify_s_per_gb: verify_s_per_gb(vms),
            vmm_share: crate::cpu::vmm_share(&taught, &all),
            migrations: taught,
        };
        self.meter
            .teach(&self.key, wire.saturating_sub(raw_wire), shown);
        crate::cpu::CpuReport {
            pools,
            reserve_cpu_pct: o.budget.reserve_cpu.map(|r| r * 100.0),
            governor: self.governor,
            codec: self.codec.map(|c| c.0),
        }
    }
}

/// What each VM moved by pre-copy shows of its guest's pace while it moved (its first sync
/// round resent what the guest dirtied during the copy), with its sampled rate as weight.
fn dirty_ratios(vms: &[VmOutcome]) -> Vec<(f64, f64)> {
    vms.iter()
        .filter(|v| v.status == Status::Moved && !v.postcopy)
        .filter_map(|v| {
            let (s, r) = (v.sample.as_ref()?, v.report.as_ref()?);
            let (copy, first) = (r.rounds.first()?, r.rounds.get(1)?);
            let secs = copy.ms as f64 / 1e3;
            let ratio = crate::predict::implied_dirty_ratio(s, secs, first.pages as f64)?;
            Some((ratio, s.dirty_pages_per_s))
        })
        .collect()
}

/// The CPU side of the plan: the pools' cores and what the source learnt of `key`'s costs
/// and busy threads, `level` migrations at once. None before it learnt them.
fn plan_cpu(
    o: &DrainOptions,
    m: &crate::cpu::Meter,
    key: &str,
    level: usize,
) -> Option<plan::PlanCpu> {
    let cores = m.source().cores;
    let threads = busy_threads(&o.request, cores, m.busy_workers(key));
    let cpu = m.plan(o.budget.reserve_cpu, key, threads, level)?;
    Some(if compresses(&o.request) {
        cpu.with_workers(m.workers_per_share(key), cores as f64)
    } else {
        cpu
    })
}

/// What sending a compressed drain's VM raw costs, `level` migrations at once, as the source
/// learnt it of tcp drains with the same page streams and caches (`cached`). None when the
/// drain does not compress or the source has not learnt it.
fn raw_costs(
    o: &DrainOptions,
    m: &crate::cpu::Meter,
    cached: bool,
    level: usize,
) -> Option<RawCosts> {
    use migration::protocol::Transport;
    if !compresses(&o.request) {
        return None;
    }
    let tcp = MigrateRequest {
        transport: Some(Transport::Tcp),
        ..o.request.clone()
    };
    let key = cost_key(&tcp, cached);
    let threads = busy_threads(&tcp, m.source().cores, None);
    Some(RawCosts {
        cpu: m.plan(o.budget.reserve_cpu, &key, threads, level)?,
        dirty_ratio: m.dirty_ratio(&key, o.concurrency.fixed()),
    })
}

/// Per destination, which of the `placed` migrations (VM, destination, in order) fills its
/// page cache, alone: the first there, where it keeps one (`cached`).
pub(crate) fn seeders(cached: &[bool], placed: &[(usize, usize)]) -> Vec<Option<usize>> {
    (0..cached.len())
        .map(|d| {
            cached[d]
                .then(|| placed.iter().position(|(_, to)| *to == d))
                .flatten()
        })
        .collect()
}

/// What the moved VMs' migrations took besides moving pages and disks (connecting, the
/// destination's build and its cache's keys, the switchover), s: their mean. Post-copy's
/// are left out (their pages move after the switchover). None when none moved.
fn mean_setup_s(vms: &[VmOutcome]) -> Option<f64> {
    let setups: Vec<f64> = vms
        .iter()
        .filter(|v| v.status == Status::Moved && !v.postcopy)
        .filter_map(|v| v.report.as_ref())
        .map(setup_s)
        .collect();
    (!setups.is_empty()).then(|| setups.iter().sum::<f64>() / setups.len() as f64)
}

/// How long the moved guests checked their memory after their switchover, over what they
/// had touched: s per GB. None when none moved by pre-copy with a sample.
fn verify_s_per_gb(vms: &[VmOutcome]) -> Option<f64> {
    let (mut secs, mut gb) = (0.0, 0.0);
    for v in vms
        .iter()
        .filter(|v| v.status == Status::Moved && !v.postcopy)
    {
        if let (Some(ms), Some(s)) = (v.verify_ms, &v.sample) {
            secs += ms as f64 / 1e3;
            gb += s.touched_bytes as f64 / 1e9;
        }
    }
    (gb > 0.0).then(|| secs / gb)
}

/// Each moved VM's migration's own CPU, with its bytes on the wire and the RAM (and disks)
/// it landed: as many as a host learns from.
fn migrations_cpu(vms: &[VmOutcome]) -> Vec<host::cpu::MigrationCpu> {
    vms.iter()
        .filter(|v| v.status == Status::Moved)
        .filter_map(|v| v.report.as_ref())
        .take(host::cpu::MAX_MIGRATIONS)
        .map(|r| {
            let pages = r.pages.landed();
            let codec = r.compression.as_ref().map_or(0.0, |c| c.codec_cpu_seconds);
            let gb =
                |pages: u64| pages.saturating_mul(migration::protocol::PAGE as u64) as f64 / 1e9;
            host::cpu::MigrationCpu {
                wire_gb: r.bytes_on_wire as f64 / 1e9,
                landed_gb: gb(pages) + r.disk_bytes as f64 / 1e9,
                compressed_gb: gb(r.pages.compressed),
                source_s: r.cpu_seconds.source + codec,
                destination_s: r.cpu_seconds.destination,
            }
        })
        .collect()
}

/// What a migration took besides its copy, its sync rounds and its disks' bulk copy, s.
fn setup_s(r: &Report) -> f64 {
    let p = &r.phases;
    let moving = p
        .copy_ms
        .saturating_add(p.sync_ms)
        .saturating_add(r.disk_ms);
    r.total_ms.saturating_sub(moving) as f64 / 1e3
}

/// Each compressed migration's CPU: its workers', its sending threads' (the source's other
/// migration threads), and the share of its pages the workers compressed.
fn compressed_cpu(vms: &[VmOutcome]) -> Vec<crate::cpu::CodecCpu> {
    vms.iter()
        .filter_map(|v| v.report.as_ref())
        .filter_map(|r| {
            Some(crate::cpu::CodecCpu {
                codec_s: r.compression.as_ref()?.codec_cpu_seconds,
                sending_s: r.cpu_seconds.source,
                compressed_share: r.pages.compressed_share(),
            })
        })
        .collect()
}

/// Whether a migration the plan starts `raw` goes by plain tcp rather than by its drain's
/// compressed transport held raw: where the drain moves one at a time, nothing moves beside
/// it, so the codec policy never releases it to compress, and tcp sends its pages without
/// the codec's pipeline, which held raw still passes each batch through (docs/drain.md,
/// "Which VMs start raw").
pub(crate) fn by_tcp(raw: bool, r: &MigrateRequest, concurrency: Concurrency) -> bool {
    raw && compresses(r) && concurrency == Concurrency::Fixed(1)
}

/// Whether `r`'s migrations go by the compressed transport.
pub(crate) fn compresses(r: &MigrateRequest) -> bool {
    r.transport == Some(migration::protocol::Transport::Compressed)
}

/// Page streams per migration: one per address pair of `--network`, or `--channels`.
fn page_streams(r: &MigrateRequest) -> usize {
    let pairs = r.network.as_deref().map_or(0, |n| n.split(',').count());
    pairs.max(usize::from(r.channels.unwrap_or(0))).max(1)
}

/// A migration's threads that are busy when the cores hold it back, on the source and on
/// the destination: one per page stream (the control connection's when it has none), and
/// on the source the compressed transport's workers busy alongside them: as many as the
/// source learnt (`busy_workers`), or all of them, one per core.
fn busy_threads(r: &MigrateRequest, source_cores: usize, busy_workers: Option<f64>) -> [f64; 2] {
    let streams = page_streams(r) as f64;
    let workers = if compresses(r) {
        busy_workers.unwrap_or(source_cores as f64)
    } else {
        0.0
    };
    [streams + workers, streams]
}

/// What the hosts learn a drain's costs under: its transport, `+multichannel` when its
/// migrations run more than one page stream (each stream's threads add their own cost per
/// byte), `+cache` when it keeps page caches on its destinations (a reference carries a page
/// in a few bytes on the wire, and the destination copies it from the cache: the cores'
/// work per byte on the wire is another).
pub(crate) fn cost_key(r: &MigrateRequest, caches: bool) -> String {
    let mut key = r
        .transport
        .map_or("tcp", migration::protocol::Transport::name)
        .to_string();
    if page_streams(r) > 1 {
        key += "+multichannel";
    }
    if caches {
        key += crate::cpu::CACHE_SUFFIX;
    }
    key
}

/// What held each of `n` VMs back, from the simulation's `bounds` of the `placed` VMs (in
/// order, with their destinations); None for those not placed.
fn by_vm<T: Clone>(
    placed: &[(usize, usize)],
    per_job: impl IntoIterator<Item = T>,
    n: usize,
) -> Vec<Option<T>> {
    let mut out = vec![None; n];
    for ((i, _), x) in placed.iter().zip(per_job) {
        out[*i] = Some(x);
    }
    out
}

/// Per VM, what the simulation says of its migration.
struct SimByVm {
    bounds: Vec<Option<plan::Bound>>,
    wire: Vec<Option<f64>>,
    spans: Vec<Option<[f64; 2]>>,
    cores: Vec<Option<crate::report::PredictedCores>>,
}

/// What the model has `job` take of the cores (None: the cores are not in the model).
fn predicted_cores(job: &plan::SimJob) -> Option<crate::report::PredictedCores> {
    (job.cpu != [0.0; 2]).then(|| crate::report::PredictedCores {
        cost_s_per_gb: job.cpu.map(|c| c * 1e9),
        threads: job.threads,
    })
}

/// Per VM of `n`, from the simulation of the `placed` migrations: what held its migration
/// back, its bytes on the wire, its span and its cores (None for those not placed, or not
/// simulated).
fn per_vm(placed: &[(usize, usize)], sim: Option<&plan::Simulated>, n: usize) -> SimByVm {
    match sim {
        Some(s) => SimByVm {
            bounds: by_vm(placed, s.bounds.iter().copied(), n),
            wire: by_vm(placed, s.jobs.iter().map(|x| x.bytes), n),
            spans: by_vm(placed, s.spans.iter().copied(), n),
            cores: by_vm(placed, s.jobs.iter().map(predicted_cores), n)
                .into_iter()
                .map(Option::flatten)
                .collect(),
        },
        None => SimByVm {
            bounds: vec![None; n],
            wire: vec![None; n],
            spans: vec![None; n],
            cores: vec![None; n],
        },
    }
}

/// Per VM, the share of its pages the model expects its destination's page cache to hold
/// (None when it goes to a destination without one, or nowhere).
fn cache_hits_by_vm(
    vms: &[crate::predict::VmFacts],
    placement: &[Result<usize, plan::NoRoom>],
    cached: &[bool],
) -> Vec<Option<f64>> {
    vms.iter()
        .zip(placement)
        .map(|(v, d)| d.as_ref().ok().filter(|d| cached[**d]).map(|_| v.cached))
        .collect()
}

/// [`cost_key`] for this drain, with the page caches its plan keeps.
pub(crate) fn drain_cost_key(o: &DrainOptions, s: &Survey) -> String {
    let cached = cached_dests(o, s, &place(o, s));
    cost_key(&o.request, cached.contains(&true))
}

/// Where each VM goes, as the plan places them.
fn place(o: &DrainOptions, s: &Survey) -> Vec<Result<usize, plan::NoRoom>> {
    let compressed = compresses(&o.request);
    let dest_facts: Vec<_> = s.dests.iter().map(|d| d.facts.clone()).collect();
    plan::place(&s.vms, &dest_facts, o.copies_disks(), compressed)
}

/// Per destination, whether the drain keeps a page cache there: the VMs `placement` sends
/// there are worth one ([`crate::cache::worth_one`]).
fn cached_dests(
    o: &DrainOptions,
    s: &Survey,
    placement: &[Result<usize, plan::NoRoom>],
) -> Vec<bool> {
    (0..s.dests.len())
        .map(|d| {
            let fps: Vec<Option<&[u64]>> = (0..s.vms.len())
                .filter(|i| placement[*i] == Ok(d))
                .map(|i| s.vms[i].sample.as_ref().map(|x| &x.fingerprint[..]))
                .collect();
            !fps.is_empty() && crate::cache::worth_one(o, &fps)
        })
        .collect()
}

/// The destinations' facts with their links as the budget lets the drain use them, `window`
/// migrations at once spread over them.
pub(crate) fn budgeted_facts(o: &DrainOptions, s: &Survey, window: usize) -> Vec<plan::DestFacts> {
    let mut facts: Vec<_> = s.dests.iter().map(|d| d.facts.clone()).collect();
    let per_dest = vec![window.div_ceil(s.dests.len().max(1)).max(1); s.dests.len()];
    let links: Vec<Option<f64>> = facts.iter().map(|d| d.rate).collect();
    for (d, rate) in facts
        .iter_mut()
        .zip(crate::pace::budgeted(&o.budget, &per_dest, &links))
    {
        d.rate = rate;
    }
    facts
}

/// The most migrations the destinations take arriving at once.
fn accepted_at_once(s: &Survey) -> usize {
    s.dests.iter().map(|d| d.max_inbound).sum()
}

/// `auto` priced where the model starts it (the level it takes as good as the best), with the
/// model's makespan at each level from 1 and which VMs start raw: chosen again at the level
/// it runs at when that is not the pricing `window` (a compressed drain at four at once sends
/// fewer VMs raw than one priced at two).
fn auto_priced(
    p: &Pricing,
    raw: Vec<bool>,
    window: usize,
    at_most: usize,
) -> (Option<plan::Simulated>, Vec<f64>, Vec<bool>) {
    let levels = p.order.len().clamp(1, crate::window::AUTO_MAX);
    let etas_of = |raw: &[bool]| -> Vec<f64> {
        (1..=levels)
            .map(|w| {
                p.at_level(w)
                    .simulate(w, raw)
                    .map_or(f64::INFINITY, |s| s.makespan)
            })
            .collect()
    };
    let mut etas = etas_of(&raw);
    let mut raw = raw;
    let runs_at = crate::window::runs_at(|w| etas[w - 1], levels, at_most);
    if runs_at != window && p.weighs_codecs() {
        let again = p.at_level(runs_at).choose_raw(runs_at);
        if again != raw {
            etas = etas_of(&again);
            raw = again;
        }
    }
    let first = crate::window::first_level(|w| etas[w - 1], levels);
    let sim = p.at_level(first).simulate(first, &raw);
    // Unpriced (a link unmeasured): it grows by measure alone, from 1.
    if !etas.iter().all(|t| t.is_finite()) {
        etas = Vec::new();
    }
    (sim, etas, raw)
}

/// A governor's ceiling when no link was measured and no `--max-bandwidth` given, bits/s.
const UNMEASURED_CEILING: f64 = 100e9;

impl<'a> Run<'a> {
    pub fn new(
        o: &'a DrainOptions,
        s: &'a Survey,
        planned: &'a Planned,
        t0: Instant,
        cpu: Option<crate::cpu::Meter>,
    ) -> Self {
        let queue = planned
            .order
            .iter()
            .filter_map(|i| {
                let dest = *planned.placement[*i].as_ref().ok()?;
                Some(Job {
                    vm: *i,
                    dest,
                    attempt: 1,
                })
            })
            .collect::<VecDeque<_>>();
        let total: u64 = queue.iter().map(|j| s.vms[j.vm].memory).sum();
        Run {
            o,
            s,
            planned,
            t0,
            queue,
            retry: Vec::new(),
            flights: Vec::new(),
            outcomes: planned.outcomes(s, Status::Cancelled),
            window: Window::guided(o.concurrency, planned.level_etas.clone())
                .at_most(accepted_at_once(s)),
            window_steps: Vec::new(),
            full_since: None,
            settle_mark: None,
            not_full_since: None,
            wire: VecDeque::new(),
            wire_done: 0,
            ram_done: 0,
            sent_done: 0,
            peak: 0,
            interrupted: false,
            view: View::new(o.show, total),
            survey_ms: t0.elapsed().as_millis() as u64,
            ended: std::sync::mpsc::channel(),
            caches: crate::cache::open(o, s, planned),
            seeded: vec![false; s.dests.len()],
            cpu: cpu.map(|m| CpuWatch::new(o, s, m, planned.cost_key.clone())),
        }
    }

    /// Runs until every VM has moved or is left behind with a reason, or until interrupted
    /// and nothing is in flight any more.
    pub fn go(mut self) -> DrainReport {
        self.announce();
        loop {
            self.collect_finished();
            if self.o.interrupted.load(Ordering::SeqCst) && !self.interrupted {
                self.interrupt();
            }
            // Before starting more: a migration past its switchover frees its slot now, not
            // a tick later.
            self.watch();
            if !self.interrupted {
                self.start_more();
            }
            let nothing_left = self.queue.is_empty() && self.retry.is_empty();
            if self.flights.is_empty() && (self.interrupted || nothing_left) {
                break;
            }
            self.tune_window();
            self.watch_cpu();
            self.repace();
            let _ = self.ended.1.recv_timeout(TICK);
        }
        self.view.finish();
        crate::cache::close(self.s, &self.caches);
        let summary = self.planned.summary(self.o, self.s, self.window.limit());
        let wall_ms = self.t0.elapsed().as_millis() as u64;
        // The host is empty once the last VM has switched over.
        let makespan_ms = self
            .outcomes
            .iter()
            .filter(|o| o.status == Status::Moved)
            .filter_map(|o| o.end_ms)
            .max()
            .unwrap_or(wall_ms);
        let mut r = DrainReport::new(
            self.s.source.clone(),
            self.s.dests.iter().map(|d| d.name.clone()).collect(),
            summary,
            self.outcomes,
            makespan_ms,
            self.peak,
            self.interrupted,
        );
        r.survey_ms = self.survey_ms;
        r.survey = crate::report::SurveyTook {
            plan_ms: self.planned.took_ms,
            ..self.s.took
        };
        r.summary += &r.survey_line();
        r.wall_ms = wall_ms;
        r.window_steps = self.window_steps;
        r.dedup_cache_bytes = self.caches.iter().flatten().map(|c| c.bytes).sum();
        r.cpu = self
            .cpu
            .map(|c| c.report(self.o, r.bytes_on_wire, &r.vms, self.peak));
        if let Some(line) = r.cpu.as_ref().map(crate::cpu::CpuReport::line) {
            r.summary += &line;
        }
        r
    }

    fn announce(&self) {
        for o in self.outcomes.iter().filter(|o| o.status.left_behind()) {
            if let (Status::NoRoom | Status::Skipped, Some(e)) = (o.status, &o.error) {
                self.view.line(&format!("drain: {} stays: {e}", o.name));
            }
        }
    }

    /// Starts migrations while the window has room, in plan order, skipping (for now) those
    /// whose destination already takes all it accepts. Retries come after the others.
    fn start_more(&mut self) {
        if self.queue.is_empty() {
            let now = Instant::now();
            let (due, later) = std::mem::take(&mut self.retry)
                .into_iter()
                .partition(|(_, at)| *at <= now);
            self.retry = later;
            self.queue.extend(due.into_iter().map(|(j, _)| j));
        }
        while self.moving() < self.window.limit() {
            let busy = |d: usize, f: &[Flight]| {
                let arriving = f.iter().filter(|x| x.job.dest == d && !x.switched).count();
                let to_d = f.iter().filter(|x| x.job.dest == d).count();
                arriving >= self.s.dests[d].max_inbound
                    || crate::cache::waits_for_seed(self.caches[d].is_some(), self.seeded[d], to_d)
            };
            let Some(pos) = self.queue.iter().position(|j| !busy(j.dest, &self.flights)) else {
                return;
            };
            if let Some(job) = self.queue.remove(pos) {
                self.start(job);
            }
        }
    }

    fn start(&mut self, job: Job) {
        let vm = &self.s.vms[job.vm];
        let dest = &self.s.dests[job.dest];
        let session = migration::session_id();
        let mut counts = self.in_flight_per_dest();
        counts[job.dest] += 1;
        let pace = self.pace_for(job.dest, &counts);
        let raw = self.planned.raw[job.vm];
        let by_tcp = by_tcp(raw, &self.o.request, self.o.concurrency);
        let storage = if plan::must_copy(&vm.needs, &dest.facts) {
            migration::Storage::Copy
        } else {
            migration::Storage::Shared
        };
        let req = MigrateRequest {
            to: dest.address.clone(),
            storage: Some(storage),
            session: Some(session),
            lease_ms: Some(LEASE.as_millis() as u64),
            max_bandwidth: pace.or(self.o.request.max_bandwidth),
            host_cache: self.caches[job.dest].as_ref().map(|c| c.id),
            codec: (raw && !by_tcp).then_some(migration::api::CodecMode::Raw),
            transport: if by_tcp {
                Some(migration::protocol::Transport::Tcp)
            } else {
                self.o.request.transport
            },
            ..self.o.request.clone()
        };
        let client = self.s.client.waiting(Duration::from_secs(7 * 24 * 3600));
        let name = vm.name.clone();
        let ended = self.ended.0.clone();
        let worker = std::thread::spawn(move || {
            let r = client.migrate(&name, &req);
            let _ = ended.send(());
            r
        });
        let out = &mut self.outcomes[job.vm];
        out.attempts = job.attempt;
        out.started_raw = raw;
        out.start_ms
            .get_or_insert(self.t0.elapsed().as_millis() as u64);
        self.view
            .started(&vm.name, &dest.name, vm.memory, job.attempt);
        self.flights.push(Flight {
            job,
            session,
            worker,
            last: None,
            paced: pace,
            switched: false,
            held_raw: raw,
            planned_raw: raw,
            codec_chosen: raw || self.planned.codecs_chosen,
            judged: false,
            by_tcp,
        });
        if raw {
            self.started_raw(&vm.name, by_tcp);
        }
        self.peak = self.peak.max(self.moving());
    }

    /// Counts a migration held raw for `why` in the codec report, and the most held at once.
    fn count_held(&mut self, why: &str) {
        let held = self.flights.iter().filter(|f| f.held_raw).count();
        if let Some((report, _)) = self.cpu.as_mut().and_then(|c| c.codec.as_mut()) {
            *report.held_raw.entry(why.into()).or_default() += 1;
            report.most_held = report.most_held.max(held);
        }
    }

    /// Counts a migration the plan started raw, in the report and the view.
    fn started_raw(&mut self, name: &str, by_tcp: bool) {
        self.count_held(MODEL_RAW);
        let how = if by_tcp { "goes by tcp" } else { "sends raw" };
        self.view
            .line(&format!("drain: {name} {how} ({MODEL_RAW})"));
    }

    /// Settles every migration that ended.
    fn collect_finished(&mut self) {
        let (done, running): (Vec<Flight>, Vec<Flight>) = std::mem::take(&mut self.flights)
            .into_iter()
            .partition(|f| f.worker.is_finished());
        self.flights = running;
        for f in done {
            self.seeded[f.job.dest] = true;
            self.sent_done += f.last.as_ref().map_or(0, |p| p.pages_sent * PAGE);
            let result = f.worker.join().unwrap_or_else(|_| {
                Err(ApiError::BadResponse {
                    path: self.o.from.clone(),
                    why: "the migrate thread panicked".into(),
                })
            });
            self.settle(f.job, f.session, result);
        }
    }

    fn settle(&mut self, job: Job, session: u64, result: Result<Report, ApiError>) {
        use crate::resolve::{self, Verdict};
        let name = self.s.vms[job.vm].name.clone();
        let verdict = match result {
            Ok(report) => return self.moved(job, Some(report), None),
            // The destination could not take it now: again later, not counted as a failure.
            Err(e) if e.status() == Some(503) => return self.busy(job, refusal(&e)),
            // The switchover's outcome is unknown: the destination settles it.
            Err(e) if e.status() == Some(502) => {
                resolve::resolve(self.s, job.dest, &name, session, &e)
            }
            // Its process died on the source: it runs on the destination, or nowhere.
            Err(e) if e.status() == Some(410) => {
                resolve::source_died(self.s, job.dest, &name, session, &e)
            }
            Err(e) => return self.failed(job, refusal(&e)),
        };
        match verdict {
            Verdict::Moved { verified, note } => self.moved(job, None, Some((verified, note))),
            Verdict::Resumed(why) => self.failed(job, why),
            Verdict::Unresolved(why) => self.left(job, Status::Unresolved, why),
            Verdict::Lost(why) => self.left(job, Status::Failed, why),
        }
    }

    /// The destination turned the migration away for now (it takes too many at once): the VM
    /// runs on the source and goes again after the others, without using up a retry, a
    /// bounded number of times.
    fn busy(&mut self, job: Job, why: String) {
        if self.interrupted {
            return self.left(job, Status::Cancelled, format!("{why} (drain interrupted)"));
        }
        let out = &mut self.outcomes[job.vm];
        out.busy_retries += 1;
        if out.busy_retries > MAX_BUSY_RETRIES {
            let why = format!("{why} ({MAX_BUSY_RETRIES} times; gave up)");
            return self.left(job, Status::Failed, why);
        }
        let wait = busy_backoff(out.busy_retries);
        let name = out.name.clone();
        self.view.finished(
            &name,
            &format!(
                "destination busy, will try again in {:.1} s: {why}",
                wait.as_secs_f64()
            ),
        );
        self.retry.push((job, Instant::now() + wait));
    }

    fn moved(&mut self, job: Job, report: Option<Report>, resolved: Option<(bool, String)>) {
        let now = self.t0.elapsed().as_millis() as u64;
        // It left the source at its switchover; its guest's verify came after.
        let end = match (&report, self.outcomes[job.vm].start_ms) {
            (Some(r), Some(start)) if r.total_ms > 0 => (start + r.total_ms).min(now),
            _ => now,
        };
        let vm = &self.s.vms[job.vm];
        self.ram_done += vm.memory;
        self.wire_done += report.as_ref().map_or(vm.memory, |r| r.bytes_on_wire);
        let out = &mut self.outcomes[job.vm];
        out.status = Status::Moved;
        out.end_ms = Some(end);
        out.verify_ms = report.as_ref().map(|_| now.saturating_sub(end));
        out.error = None;
        let msg = match (&report, resolved) {
            (Some(r), _) => {
                out.guest_verified = r.guest_verified;
                out.postcopy = r.postcopy.is_some();
                format!(
                    "moved to {} in {:.1} s{}, downtime {} ms{}",
                    self.s.dests[job.dest].name,
                    r.total_ms as f64 / 1e3,
                    if out.postcopy { " by post-copy" } else { "" },
                    r.downtime_ms,
                    if r.guest_verified {
                        ", verified"
                    } else {
                        ", NOT verified"
                    }
                )
            }
            (None, Some((verified, note))) => {
                out.guest_verified = verified;
                out.error = Some(note.clone());
                note
            }
            (None, None) => "moved".into(),
        };
        out.report = report;
        self.view.finished(&vm.name, &msg);
    }

    /// A failed attempt: the VM runs on the source; it is tried again after the others, or
    /// left behind with its error. An interrupted drain does not retry.
    fn failed(&mut self, job: Job, why: String) {
        if self.interrupted {
            return self.left(job, Status::Cancelled, format!("{why} (drain interrupted)"));
        }
        let out = &mut self.outcomes[job.vm];
        if job.attempt <= self.o.retries {
            out.earlier_errors.push(why.clone());
            let name = out.name.clone();
            self.view.finished(
                &name,
                &format!("attempt {} failed, will retry: {why}", job.attempt),
            );
            let again = Job {
                attempt: job.attempt + 1,
                ..job
            };
            self.retry.push((again, Instant::now() + RETRY_AFTER));
            return;
        }
        self.left(job, Status::Failed, why);
    }

    fn left(&mut self, job: Job, status: Status, why: String) {
        let out = &mut self.outcomes[job.vm];
        out.status = status;
        out.end_ms = Some(self.t0.elapsed().as_millis() as u64);
        out.error = Some(why.clone());
        let name = out.name.clone();
        self.view
            .finished(&name, &format!("left on {}: {why}", self.s.source));
    }

    /// Ctrl-C: cancel every migration in flight (those past their switchover complete), start
    /// nothing more; the VMs not started stay where they are.
    fn interrupt(&mut self) {
        self.interrupted = true;
        self.view
            .line("drain: interrupted: cancelling the migrations in flight");
        for f in &self.flights {
            let name = &self.s.vms[f.job.vm].name;
            if let Err(e) = self.s.client.cancel(name) {
                self.view.line(&format!("drain: cancelling {name}: {e}"));
            }
        }
        let retries = self.retry.drain(..).map(|(j, _)| j);
        for j in self.queue.drain(..).chain(retries) {
            let out = &mut self.outcomes[j.vm];
            out.status = Status::Cancelled;
            out.error = Some("not started: the drain was interrupted".into());
        }
    }

    /// Progress of every migration in flight (renewing their leases), bars and the total.
    fn watch(&mut self) {
        let mut wire = self.wire_done;
        let mut ram = self.ram_done;
        let mut sent = self.sent_done;
        for f in &mut self.flights {
            let name = &self.s.vms[f.job.vm].name;
            if let Ok(Some(p)) = self.s.client.progress(name) {
                self.view.progress(name, &p, &self.s.dests[f.job.dest].name);
                f.switched |= p.phase == "verify";
                self.seeded[f.job.dest] |= !matches!(p.phase.as_str(), "prepare" | "copy");
                f.last = Some(p);
            }
            if let Some(p) = &f.last {
                wire += p.bytes_on_wire;
                ram += p.bytes_on_wire.min(p.ram_bytes);
                sent += p.pages_sent * PAGE;
            }
        }
        let now = Instant::now();
        self.wire.push_back((now, wire, sent));
        while self
            .wire
            .front()
            .is_some_and(|(t, ..)| now.duration_since(*t).as_secs_f64() > 2.0 * MEASURE_S)
        {
            self.wire.pop_front();
        }
        let (rate, ram_rate) = self.rates();
        tracing::debug!(
            t_ms = self.t0.elapsed().as_millis() as u64,
            moving = self.moving(),
            limit = self.window.limit(),
            wire_per_s = rate,
            ram_per_s = ram_rate,
            "drain: rates"
        );
        self.view.total(ram, rate);
    }

    /// Aggregate bytes/s over the last [`MEASURE_S`]: on the wire, and of guest RAM sent.
    fn rates(&self) -> (f64, f64) {
        let Some(&(t1, w1, s1)) = self.wire.back() else {
            return (0.0, 0.0);
        };
        let from = self
            .wire
            .iter()
            .find(|(t, ..)| t1.duration_since(*t).as_secs_f64() <= MEASURE_S);
        match from {
            Some(&(t0, w0, s0)) if t1 > t0 => {
                let dt = (t1 - t0).as_secs_f64();
                (
                    w1.saturating_sub(w0) as f64 / dt,
                    s1.saturating_sub(s0) as f64 / dt,
                )
            }
            _ => (0.0, 0.0),
        }
    }

    /// Guest RAM sent per second since the window had been full for [`SETTLE_S`] (None:
    /// not that long yet).
    fn level_rate(&mut self, full_for: f64) -> Option<f64> {
        let &(t1, _, s1) = self.wire.back()?;
        if full_for < SETTLE_S {
            return None;
        }
        let &mut (t0, s0) = self.settle_mark.get_or_insert((t1, s1));
        let dt = t1.duration_since(t0).as_secs_f64();
        (dt > 0.0).then(|| s1.saturating_sub(s0) as f64 / dt)
    }

    /// Migrations in flight that still move bytes (not yet switched over).
    fn moving(&self) -> usize {
        self.flights.iter().filter(|f| !f.switched).count()
    }

    /// `auto`: feeds the window how long it has been full and how much guest RAM the drain
    /// has sent per second since it settled there (not wire bytes: compression and
    /// references send less for more).
    fn tune_window(&mut self) {
        if self.window.settled() {
            return;
        }
        if self.moving() < self.window.limit() {
            // A slot refilled at once (one migration switched over, the next starts) keeps
            // the window full: short migrations must not keep `auto` from measuring.
            let idle = *self.not_full_since.get_or_insert_with(Instant::now);
            if idle.elapsed() > REFILL_GRACE {
                self.full_since = None;
                self.settle_mark = None;
            }
            return;
        }
        self.not_full_since = None;
        let full_for = self
            .full_since
            .get_or_insert_with(Instant::now)
            .elapsed()
            .as_secs_f64();
        let Some(ram_per_s) = self.level_rate(full_for) else {
            return;
        };
        if self.window.observe(full_for, ram_per_s) {
            self.full_since = None;
            self.settle_mark = None;
            self.window_steps.push(crate::report::WindowStep {
                at_ms: self.t0.elapsed().as_millis() as u64,
                level: self.window.limit(),
                settled: self.window.settled(),
                ram_per_s,
            });
            self.view.line(&format!(
                "drain: concurrency {}{}",
                self.window.limit(),
                if self.window.settled() {
                    " (settled)"
                } else {
                    ""
                }
            ));
        }
    }

    /// Reads the hosts' CPU now and then; while migrations move bytes, `--reserve-cpu` and
    /// the host-wide codec policy act on what it says.
    fn watch_cpu(&mut self) {
        let Some(shares) = self.cpu.as_mut().and_then(CpuWatch::read) else {
            return;
        };
        if self.moving() == 0 {
            return;
        }
        if self.cpu.as_mut().is_some_and(|c| c.govern(&shares)) {
            self.view.line(&format!(
                "drain: --reserve-cpu: budget {:.0} Mbit/s",
                self.cpu.as_ref().and_then(CpuWatch::budget).unwrap_or(0) as f64 / 1e6
            ));
        }
        // Only the migrating VMs' vCPUs yield; the other guests compete with the migrations
        // for the cores, so every busy core counts.
        let busy = shares.iter().flatten().map(|s| s.busy).fold(0.0, f64::max);
        self.codec_policy(busy);
    }

    /// The host-wide codec policy: one migration more held raw while the cores are full and
    /// the links are not, one released when the links fill or the cores free up; the least
    /// compressible held first and released last.
    fn codec_policy(&mut self, busy: f64) {
        let links: f64 = self
            .in_flight_per_dest()
            .iter()
            .zip(&self.s.dests)
            .filter(|(n, _)| **n > 0)
            .filter_map(|(_, d)| d.facts.rate)
            .sum();
        if links <= 0.0 {
            return;
        }
        let (wire, ram) = self.rates();
        let ceiling = self.raw_ceiling(links);
        if ceiling >= ram * crate::cpu::RAW_GAIN {
            self.start_raw_where_it_pays(busy);
        }
        let moving: Vec<u64> = self
            .flights
            .iter()
            .filter(|f| !f.switched)
            .map(|f| f.session)
            .collect();
        let sample = crate::cpu::CodecSample {
            now: self.t0.elapsed().as_secs_f64(),
            busy,
            link: wire / links,
            rate: ram,
            raw_ceiling: ceiling,
            planned: self.planned_ram_rate(),
            moving: &moving,
            least_left: self.least_left(ram),
        };
        let Some(c) = self.cpu.as_mut().and_then(|c| c.codec.as_mut()) else {
            return;
        };
        let Some((step, why)) = c.1.decide(&sample) else {
            return;
        };
        let made = self.codec_pick(step, why).filter(|&i| {
            let raw = step == crate::cpu::CodecStep::HoldRaw;
            let name = &self.s.vms[self.flights[i].job.vm].name;
            self.s.client.codec(name, raw).is_ok()
        });
        if let Some(c) = self.cpu.as_mut().and_then(|c| c.codec.as_mut()) {
            match made {
                Some(_) => c.1.made(),
                None => c.1.not_made(),
            }
        }
        if let Some(i) = made {
            self.codec_made(i, step, why, busy);
        }
    }

    /// Which migration a codec step changes: an undo, the one under judgement; otherwise
    /// as [`crate::cpu::pick`] says.
    fn codec_pick(&self, step: crate::cpu::CodecStep, why: &str) -> Option<usize> {
        if crate::cpu::undoes(why) {
            return self.flights.iter().position(|f| f.judged && !f.switched);
        }
        let candidates: Vec<crate::cpu::CodecCandidate> = self
            .flights
            .iter()
            .map(|f| crate::cpu::CodecCandidate {
                switched: f.switched,
                by_tcp: f.by_tcp,
                held_raw: f.held_raw,
                planned_raw: f.planned_raw,
                ratio: self.s.vms[f.job.vm]
                    .sample
                    .as_ref()
                    .map_or(1.0, |s| s.compress_ratio),
            })
            .collect();
        crate::cpu::pick(step, &candidates)
    }

    /// Records a codec change made to migration `i`, in the flights, the report and the view.
    fn codec_made(&mut self, i: usize, step: crate::cpu::CodecStep, why: &str, busy: f64) {
        let raw = step == crate::cpu::CodecStep::HoldRaw;
        for (j, f) in self.flights.iter_mut().enumerate() {
            f.judged = j == i;
        }
        let name = &self.s.vms[self.flights[i].job.vm].name;
        self.flights[i].held_raw = raw;
        self.flights[i].codec_chosen = true;
        let held = self.flights.iter().filter(|f| f.held_raw).count();
        let Some((report, _)) = self.cpu.as_mut().and_then(|c| c.codec.as_mut()) else {
            return;
        };
        let count = if raw {
            &mut report.held_raw
        } else {
            &mut report.released
        };
        *count.entry(why.to_string()).or_default() += 1;
        report.most_held = report.most_held.max(held);
        self.view.line(&format!(
            "drain: {name} {} ({why}; busy {:.0}%)",
            if raw { "sends raw" } else { "compresses again" },
            busy * 100.0
        ));
    }

    /// Guest RAM per second the plan expects of the migrations moving now (∞ where it
    /// expects nothing of one: the codec policy then reads the cores and the links alone).
    fn planned_ram_rate(&self) -> f64 {
        self.flights
            .iter()
            .filter(|f| !f.switched)
            .map(|f| self.planned.ram_rates[f.job.vm].unwrap_or(f64::INFINITY))
            .sum()
    }

    /// The least time, seconds, any moving migration has left of its copy (the pages its
    /// sample found not zero), each moving an even share of the drain's `rate` of guest RAM
    /// sent: past its copy, it is about to end.
    fn least_left(&self, rate: f64) -> f64 {
        let moving = self.moving();
        if moving == 0 || rate <= 0.0 {
            return 0.0;
        }
        let pace = rate / moving as f64;
        self.flights
            .iter()
            .filter(|f| !f.switched)
            .map(|f| {
                let vm = &self.s.vms[f.job.vm];
                let zero = vm.sample.as_ref().map_or(0.0, |s| s.zero_fraction);
                let copy = vm.memory as f64 * (1.0 - zero.clamp(0.0, 1.0));
                let sent = f.last.as_ref().map_or(0, |p| p.pages_sent * PAGE);
                (copy - sent as f64).max(0.0) / pace
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// The most guest RAM per second the drain could move with one more migration raw over
    /// `links` bytes/s ([`crate::cpu::raw_ceiling`]); unbounded where a link is known only as
    /// a floor.
    fn raw_ceiling(&self, links: f64) -> f64 {
        let moving: Vec<&Flight> = self.flights.iter().filter(|f| !f.switched).collect();
        if moving
            .iter()
            .any(|f| self.s.dests[f.job.dest].facts.rate_is_floor)
        {
            return f64::INFINITY;
        }
        let held = moving.iter().filter(|f| f.held_raw).count();
        crate::cpu::raw_ceiling(links, moving.len(), held)
    }

    /// While sending raw is what paid last, a migration that started since goes raw too.
    fn start_raw_where_it_pays(&mut self, busy: f64) {
        if !self
            .cpu
            .as_ref()
            .and_then(|c| c.codec.as_ref())
            .is_some_and(|c| c.1.raw_pays())
        {
            return;
        }
        for i in 0..self.flights.len() {
            let f = &self.flights[i];
            if f.switched || f.held_raw || f.codec_chosen {
                continue;
            }
            let name = &self.s.vms[f.job.vm].name;
            if self.s.client.codec(name, true).is_err() {
                continue;
            }
            self.flights[i].held_raw = true;
            self.flights[i].codec_chosen = true;
            self.count_held("raw paid");
            self.view.line(&format!(
                "drain: {name} sends raw (raw paid; busy {:.0}%)",
                busy * 100.0
            ));
        }
    }

    fn in_flight_per_dest(&self) -> Vec<usize> {
        let mut n = vec![0; self.s.dests.len()];
        for f in self.flights.iter().filter(|f| !f.switched) {
            n[f.job.dest] += 1;
        }
        n
    }

    /// A migration's pace on destination `d` with `counts` in flight; None: unpaced.
    fn pace_for(&self, d: usize, counts: &[usize]) -> Option<u64> {
        let links: Vec<Option<f64>> = self
            .s
            .dests
            .iter()
            .map(|x| x.facts.rate.map(|r| r * 8.0))
            .collect();
        let floor = migration::request::min_bandwidth(Duration::from_millis(
            self.o.request.peer_timeout_ms.unwrap_or(5000),
        ));
        let mut budget = self.o.budget;
        if let Some(cap) = self.cpu.as_ref().and_then(CpuWatch::budget) {
            budget.max_bandwidth = Some(budget.max_bandwidth.map_or(cap, |b| b.min(cap)));
        }
        paces(&budget, counts, &links)[d].map(|p| p.max(floor))
    }

    /// Re-paces the migrations in flight to their fair share; one that has not registered
    /// its migration yet is tried again next tick.
    fn repace(&mut self) {
        let counts = self.in_flight_per_dest();
        let wanted: Vec<Option<u64>> = self
            .flights
            .iter()
            .map(|f| self.pace_for(f.job.dest, &counts))
            .collect();
        for (f, want) in self.flights.iter_mut().zip(wanted) {
            let Some(p) = want.filter(|p| Some(*p) != f.paced) else {
                continue;
            };
            if self.s.client.pace(&self.s.vms[f.job.vm].name, p).is_ok() {
                f.paced = Some(p);
            }
        }
    }
}

/// What an agent's refusal says, without the HTTP wrapping.
fn refusal(e: &ApiError) -> String {
    match e {
        ApiError::Refused { message, .. } => message.clone(),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::protocol::Transport;

    #[test]
    fn each_placed_vm_reports_the_cores_the_model_gave_its_migration() {
        let job = plan::SimJob {
            bytes: 1e9,
            cpu: [0.5e-9, 2e-9],
            threads: [2.5, 1.0],
            ..plan::SimJob::default()
        };
        let sim = plan::Simulated {
            makespan: 2.0,
            bounds: vec![plan::Bound::Cpu],
            jobs: vec![job],
            spans: vec![[0.0, 2.0]],
        };
        // Of two VMs, the second placed.
        let by = per_vm(&[(1, 0)], Some(&sim), 2);
        assert_eq!(by.cores[0], None);
        let c = by.cores[1].expect("the placed VM's cores");
        assert!((c.cost_s_per_gb[0] - 0.5).abs() < 1e-9 && (c.cost_s_per_gb[1] - 2.0).abs() < 1e-9);
        assert_eq!(c.threads, [2.5, 1.0]);
        assert_eq!(by.bounds[1], Some(plan::Bound::Cpu));
        assert!(per_vm(&[(1, 0)], None, 2).cores.iter().all(Option::is_none));
        // A plan without the cores reports none.
        let linked = plan::Simulated {
            jobs: vec![plan::SimJob::default()],
            ..sim
        };
        assert_eq!(per_vm(&[(0, 0)], Some(&linked), 1).cores, [None]);
    }

    #[test]
    fn a_migrations_setup_is_what_it_took_besides_moving_pages_and_disks() {
        let mut r = Report {
            total_ms: 2_460,
            disk_ms: 100,
            ..Default::default()
        };
        r.phases.copy_ms = 2_066;
        r.phases.sync_ms = 27;
        assert!((setup_s(&r) - 0.267).abs() < 1e-9);
        // Phases that add up to more than the whole (clocks apart): no setup, not less.
        r.phases.copy_ms = u64::MAX;
        assert_eq!(setup_s(&r), 0.0);
        // Learnt: the drain's gap and the setup; the default before.
        let gap = crate::predict::DRAIN_GAP_S;
        assert_eq!(crate::predict::overhead(None), crate::predict::OVERHEAD_S);
        assert!((crate::predict::overhead(Some(0.267)) - (gap + 0.267)).abs() < 1e-12);
        assert_eq!(
            crate::predict::overhead(Some(f64::NAN)),
            crate::predict::OVERHEAD_S
        );
        assert_eq!(crate::predict::overhead(Some(-1.0)), gap);
    }

    #[test]
    fn a_vm_planned_raw_one_at_a_time_goes_by_tcp() {
        let compressed = MigrateRequest {
            transport: Some(Transport::Compressed),
            ..Default::default()
        };
        let one = Concurrency::Fixed(1);
        assert!(by_tcp(true, &compressed, one));
        // Compressing, or with others beside it that may release it to compress: held raw.
        assert!(!by_tcp(false, &compressed, one));
        assert!(!by_tcp(true, &compressed, Concurrency::Fixed(2)));
        assert!(!by_tcp(true, &compressed, Concurrency::Auto));
        // A drain that does not compress sends its own way.
        let direct = MigrateRequest {
            transport: Some(Transport::Direct),
            ..Default::default()
        };
        assert!(!by_tcp(true, &direct, one));
    }

    #[test]
    fn costs_are_learnt_per_transport_with_multichannel_and_caches_apart() {
        let tcp = MigrateRequest::default();
        assert_eq!(cost_key(&tcp, false), "tcp");
        assert_eq!(cost_key(&tcp, true), "tcp+cache");
        let direct = MigrateRequest {
            transport: Some(Transport::Direct),
            ..Default::default()
        };
        assert_eq!(cost_key(&direct, false), "direct");
        let two_nics = MigrateRequest {
            network: Some("10.0.0.1>10.0.0.2,10.0.1.1>10.0.1.2".into()),
            ..direct.clone()
        };
        assert_eq!(cost_key(&two_nics, false), "direct+multichannel");
        let channels = MigrateRequest {
            channels: Some(4),
            ..direct
        };
        assert_eq!(cost_key(&channels, false), "direct+multichannel");
        let compressed = MigrateRequest {
            transport: Some(Transport::Compressed),
            channels: Some(2),
            ..Default::default()
        };
        assert_eq!(cost_key(&compressed, true), "compressed+multichannel+cache");
        assert_eq!(page_streams(&channels), 4);
    }
}
