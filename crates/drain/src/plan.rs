//! The plan of a drain, as pure policy: where each VM goes (never overcommitting a
//! destination), in which order they leave, and how long that should take.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

pub use crate::cores::CpuModel;
use crate::cores::{Guests, Load};
use crate::predict::VmFacts;

/// `--order`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// Longest predicted first (LPT); VMs that dirty faster than their share of the link
    /// last, when the others are done and they get more of it.
    Auto,
    Largest,
    Smallest,
    Name,
}

impl std::str::FromStr for Order {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Order::Auto),
            "largest" => Ok(Order::Largest),
            "smallest" => Ok(Order::Smallest),
            "name" => Ok(Order::Name),
            _ => Err(format!(
                "{s:?} is not an order (auto, largest, smallest, name)"
            )),
        }
    }
}

/// A destination as the plan sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct DestFacts {
    pub name: String,
    /// Memory it can take now.
    pub room: u64,
    /// What its link carries, bytes/s (measured; None: not measured).
    pub rate: Option<f64>,
    /// The probe was held back by the cores, not the link ([`held_by_cores`]): the link
    /// carries at least `rate`, and how much more is not known.
    pub rate_is_floor: bool,
    /// It has a bridge for VMs' NICs.
    pub bridge: bool,
    /// Disk images of this drain it cannot open, and why.
    pub unreachable: Vec<(PathBuf, String)>,
    /// Bytes free in its disk directory for disks copied there (None: it takes no copies).
    pub copy_room: Option<u64>,
    /// The CPU features it offers guests (None: unknown, not checked).
    pub cpu_features: Option<std::collections::BTreeSet<String>>,
}

/// A probe thread runnable (on a core or waiting for one) this share of the time or more was
/// held back by the cores: a thread the link holds back sleeps until the socket takes more.
pub const CORES_HELD_PROBE: f64 = 0.9;

/// Whether a link probe was held back by the cores, from its sending and receiving threads'
/// runnable shares (unknown counts as not).
pub fn held_by_cores(sender: Option<f64>, receiver: Option<f64>) -> bool {
    [sender, receiver]
        .into_iter()
        .flatten()
        .any(|s| s >= CORES_HELD_PROBE)
}

/// What a VM's devices need of a destination: a bridge for its NICs, its disks reachable.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Needs {
    pub disks: Vec<PathBuf>,
    pub nics: u32,
    /// Bytes its disks have allocated: what copying them sends and takes at the destination.
    pub disk_bytes: u64,
    /// The CPU features its guest sees.
    pub cpu_features: Vec<String>,
}

/// Whether a VM that needs `n` can go to `d` only with its disks copied (`d` cannot open
/// one of them where it is).
pub fn must_copy(n: &Needs, d: &DestFacts) -> bool {
    n.disks
        .iter()
        .any(|p| d.unreachable.iter().any(|(u, _)| u == p))
}

/// Why `d` cannot take a VM that needs `n`, if it cannot. `copy_left`: with `--storage copy`,
/// the bytes `d`'s disk directory has left for copies (None there: it takes none); None: the
/// drain does not copy disks.
pub fn refuses(n: &Needs, d: &DestFacts, copy_left: Option<Option<u64>>) -> Option<String> {
    if n.nics > 0 && !d.bridge {
        return Some(format!("{} has no VM bridge for its NICs", d.name));
    }
    if let Some(offered) = &d.cpu_features {
        let missing = migratable::cpu::missing(&n.cpu_features, offered);
        if !missing.is_empty() {
            return Some(format!(
                "{}'s CPU does not offer {} that it sees",
                d.name,
                missing.join(", ")
            ));
        }
    }
    if !must_copy(n, d) {
        return None;
    }
    let mib = |b: u64| b >> 20;
    match copy_left {
        None => n.disks.iter().find_map(|p| {
            d.unreachable.iter().find(|(u, _)| u == p).map(|(u, why)| {
                format!(
                    "{} cannot open {}: {why} (drain --storage copy would copy it)",
                    d.name,
                    u.display()
                )
            })
        }),
        Some(None) => Some(format!(
            "{} cannot open its disks and takes no copies (its agent has no --disk-dir)",
            d.name
        )),
        Some(Some(left)) if left < n.disk_bytes => Some(format!(
            "{} cannot open its disks and its disk directory has {} MiB free for copies, they need {} MiB",
            d.name,
            mib(left),
            mib(n.disk_bytes)
        )),
        Some(Some(_)) => None,
    }
}

/// The order VMs leave in: indices into `vms`, each sent compressed where `compressed`
/// (per VM) says. `share`: the link bytes/s one migration gets, for telling hot VMs apart
/// (auto).
pub fn order(vms: &[VmFacts], how: Order, share: f64, compressed: &[bool]) -> Vec<usize> {
    let compressed = |i: &usize| compressed.get(*i).copied().unwrap_or(false);
    let mut idx: Vec<usize> = (0..vms.len()).collect();
    let name = |i: &usize| vms[*i].name.clone();
    match how {
        Order::Name => idx.sort_by_key(name),
        Order::Largest => idx.sort_by(|a, b| {
            vms[*b]
                .memory
                .cmp(&vms[*a].memory)
                .then(name(a).cmp(&name(b)))
        }),
        Order::Smallest => idx.sort_by(|a, b| {
            vms[*a]
                .memory
                .cmp(&vms[*b].memory)
                .then(name(a).cmp(&name(b)))
        }),
        Order::Auto => {
            let t = |i: &usize| vms[*i].predict_secs(share, compressed(i));
            let (mut cold, mut hot): (Vec<usize>, Vec<usize>) = idx
                .into_iter()
                .partition(|i| !vms[*i].is_hot(share, compressed(i)));
            cold.sort_by(|a, b| t(b).total_cmp(&t(a)).then(name(a).cmp(&name(b))));
            // The least hot of the hot first: each later one finds more of the link free.
            let d = |i: &usize| vms[*i].dirty_bytes_per_s(compressed(i));
            hot.sort_by(|a, b| d(a).total_cmp(&d(b)).then(name(a).cmp(&name(b))));
            cold.extend(hot);
            idx = cold;
        }
    }
    idx
}

/// Where each VM goes, largest VMs placed first (so a big VM is not squeezed out by small
/// ones), among the destinations that hold it and take its devices:
///
/// - when every such link was measured, the one that would finish earliest: the seconds the
///   model predicts for the VMs placed there so far, plus this one's at that link's rate
///   (earliest-finish-time list scheduling; largest first makes it LPT-like);
/// - otherwise the one with the most room left.
///
/// `Err` says why it fits nowhere. Destinations are never promised more than their room.
/// With `copy`, a VM whose disks a destination cannot open goes there with its disks copied
/// if its disk directory has room for them (counted as VMs are placed).
pub fn place(
    vms: &[VmFacts],
    dests: &[DestFacts],
    copy: bool,
    compressed: bool,
) -> Vec<Result<usize, NoRoom>> {
    let mut busy_s: Vec<f64> = vec![0.0; dests.len()];
    let secs = |i: usize, d: usize| dests[d].rate.map(|r| vms[i].predict_secs(r, compressed));
    let mut left: Vec<u64> = dests.iter().map(|d| d.room).collect();
    let mut copy_left: Vec<Option<u64>> = dests.iter().map(|d| d.copy_room).collect();
    let copying = |d: usize, copy_left: &[Option<u64>]| copy.then_some(copy_left[d]);
    let mut by_size: Vec<usize> = (0..vms.len()).collect();
    by_size.sort_by(|a, b| vms[*b].memory.cmp(&vms[*a].memory).then(a.cmp(b)));
    let mut placed: Vec<Result<usize, NoRoom>> = vec![Err(NoRoom::default()); vms.len()];
    for i in by_size {
        let refused: Vec<String> = (0..dests.len())
            .filter_map(|d| refuses(&vms[i].needs, &dests[d], copying(d, &copy_left)))
            .collect();
        let candidates: Vec<usize> = (0..dests.len())
            .filter(|d| {
                left[*d] >= vms[i].memory
                    && refuses(&vms[i].needs, &dests[*d], copying(*d, &copy_left)).is_none()
            })
            .collect();
        let finish = |d: usize| secs(i, d).map(|s| busy_s[d] + s);
        let fits = if candidates.iter().all(|d| finish(*d).is_some()) {
            candidates.iter().copied().min_by(|a, b| {
                let (fa, fb) = (finish(*a).unwrap_or(0.0), finish(*b).unwrap_or(0.0));
                fa.total_cmp(&fb)
                    .then(left[*b].cmp(&left[*a]))
                    .then(a.cmp(b))
            })
        } else {
            candidates
                .iter()
                .copied()
                .max_by_key(|d| (left[*d], std::cmp::Reverse(*d)))
        };
        placed[i] = match fits {
            Some(d) => {
                busy_s[d] += secs(i, d).unwrap_or(0.0);
                left[d] -= vms[i].memory;
                if must_copy(&vms[i].needs, &dests[d]) {
                    if let Some(l) = &mut copy_left[d] {
                        *l -= vms[i].needs.disk_bytes;
                    }
                }
                Ok(d)
            }
            None => Err(NoRoom {
                refused,
                ..no_room(&vms[i], dests, &left)
            }),
        };
    }
    placed
}

/// A VM that fits on no destination: the room each had left, and those that cannot take its
/// devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
#[error("{name} ({memory_mib} MiB) fits on no destination (room left: {}{})", rooms(.left), refusals(.refused))]
pub struct NoRoom {
    pub name: String,
    pub memory_mib: u64,
    /// Each destination's name and the MiB it had left.
    pub left: Vec<(String, u64)>,
    /// Why destinations cannot take its devices.
    pub refused: Vec<String>,
}

fn refusals(r: &[String]) -> String {
    if r.is_empty() {
        String::new()
    } else {
        format!("; {}", r.join("; "))
    }
}

fn rooms(left: &[(String, u64)]) -> String {
    let r: Vec<String> = left.iter().map(|(d, l)| format!("{d} {l} MiB")).collect();
    r.join(", ")
}

fn no_room(vm: &VmFacts, dests: &[DestFacts], left: &[u64]) -> NoRoom {
    NoRoom {
        name: vm.name.clone(),
        memory_mib: vm.memory >> 20,
        left: dests
            .iter()
            .zip(left)
            .map(|(d, l)| (d.name.clone(), l >> 20))
            .collect(),
        refused: Vec::new(),
    }
}

/// One migration for [`simulate`]: its destination and the bytes it puts on the wire.
#[derive(Clone, Copy, Debug)]
pub struct SimJob {
    pub dest: usize,
    pub bytes: f64,
    /// Core-seconds per byte on the wire it takes on the source and on the destination
    /// (0: not known, not limited by CPU).
    pub cpu: [f64; 2],
    /// Its threads that are busy when the cores are what holds it back, on each side.
    pub threads: [f64; 2],
    /// Its guest: which of the source's pool's guests ([`CpuModel::guest_of`]; None: a
    /// like share of them all), what it asks of the cores, and its vCPUs.
    pub guest: Option<usize>,
    pub load: Load,
    pub vcpus: f64,
    /// Its guest yields its vCPUs to its migration while the migration moves bytes.
    pub yields: bool,
    /// Bytes it sends before another migration to its destination may start (its copy, when
    /// it is the first to a destination's page cache and fills it); 0: none.
    pub seeds: f64,
    /// Seconds it takes before it moves bytes ([`crate::predict::overhead`]).
    pub overhead: f64,
    /// After its switchover, its guest checks its memory for this many seconds, every vCPU
    /// busy (0: none).
    pub verify_s: f64,
}

impl Default for SimJob {
    /// No bytes, no CPU known, and the overhead of a migration no drain has shown.
    fn default() -> Self {
        SimJob {
            dest: 0,
            bytes: 0.0,
            cpu: [0.0; 2],
            threads: [0.0; 2],
            guest: None,
            load: Load::default(),
            vcpus: 0.0,
            yields: false,
            seeds: 0.0,
            overhead: crate::predict::OVERHEAD_S,
            verify_s: 0.0,
        }
    }
}

/// The CPU side of a plan: the pools' cores for migrations and what a byte on the wire
/// costs each side, as the source learnt it for the drain's transport.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PlanCpu {
    #[serde(skip)]
    pub model: CpuModel,
    /// Per pool, cores the migrations may use.
    pub pool_cores: Vec<f64>,
    /// Per pool, the guest vCPUs runnable on average before the drain.
    pub guest_vcpus_runnable: Vec<f64>,
    /// Core-seconds per GB on the wire, on the source and on the destination.
    pub cost_s_per_gb: [f64; 2],
    /// A migration's busy threads on each side.
    pub threads: [f64; 2],
    /// Per pool, the guests' vCPUs that were busy before the drain, and the cores the others
    /// (those that slept part of the time) took.
    pub guest_vcpus_busy: Vec<f64>,
    pub guest_cores_light: Vec<f64>,
    /// Per side, core-seconds per GB on the wire, per GB of RAM landed and per GB
    /// compressed, as the source learnt them of its migrations' own CPU
    /// ([`host::cpu::CostFit`]); None before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_fit_s_per_gb: Option<host::cpu::PerGb>,
    /// Seconds a moved guest checks its memory after its switchover, per GB it touched, as
    /// the source learnt it; None before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_s_per_gb: Option<f64>,
    /// What migrations cost at this drain's concurrency against the costs learnt over all
    /// (`cost_ratio_at` of the source's costs; 1 when it has not seen the level): already
    /// in the costs above.
    pub cost_ratio: f64,
    /// The same ratio for each concurrency drains ran at, to price the plan at another
    /// level ([`Self::at_level`]): where an `auto` drain settled.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cost_ratio_at: BTreeMap<u16, f64>,
    /// A compressed migration's busy workers per share of its pages they compress, and its
    /// workers: each migration's busy threads on the source, where [`Self::threads`] has
    /// the drain's mean. None where the drain does not compress or the source has not
    /// learnt it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers_per_share: Option<(f64, f64)>,
    /// The kind of drain these costs were learnt of, where the source has not learnt this
    /// drain's own ([`crate::cpu::learnt`]: its transport with page caches, or without).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learnt_as: Option<String>,
}

impl PlanCpu {
    /// The plan's CPU side: `runnable`, per pool, the guest vCPUs runnable before the drain.
    pub fn new(
        model: CpuModel,
        runnable: Vec<f64>,
        cost_s_per_gb: [f64; 2],
        threads: [f64; 2],
    ) -> Self {
        let sum = |busy: bool, of: fn(&Load) -> f64| -> Vec<f64> {
            let pick = move |l: &&Load| (l.cap >= l.weight) == busy;
            let pool = |g: &Vec<Load>| g.iter().filter(pick).map(of).sum();
            model.guests.iter().map(pool).collect()
        };
        PlanCpu {
            pool_cores: model.pools.clone(),
            guest_vcpus_runnable: runnable,
            guest_vcpus_busy: sum(true, |l| l.weight),
            guest_cores_light: sum(false, |l| l.cap),
            model,
            cost_s_per_gb,
            threads,
            cost_fit_s_per_gb: None,
            verify_s_per_gb: None,
            cost_ratio: 1.0,
            cost_ratio_at: BTreeMap::new(),
            workers_per_share: None,
            learnt_as: None,
        }
    }

    /// Priced with the costs learnt of drains of kind `key` rather than this one's (None:
    /// its own).
    pub fn learnt_as(self, key: Option<String>) -> Self {
        PlanCpu {
            learnt_as: key,
            ..self
        }
    }

    /// With a compressed migration's busy `workers` on the source taken as `per_share` of
    /// each share of its pages they compress, when the source learnt it.
    pub fn with_workers(self, per_share: Option<f64>, workers: f64) -> Self {
        let sane = |k: &f64| k.is_finite() && *k > 0.0 && workers > 0.0;
        PlanCpu {
            workers_per_share: per_share.filter(sane).map(|k| (k, workers)),
            ..self
        }
    }

    /// The busy threads of a migration whose workers compress `compressed_share` of its
    /// pages: on the source its page streams' (the destination's) and as many workers as that
    /// share keeps busy, at most all of them; the drain's mean before that was learnt.
    pub fn threads_of(&self, compressed_share: f64) -> [f64; 2] {
        match self.workers_per_share {
            Some((per_share, workers)) if compressed_share.is_finite() => {
                let busy = (per_share * compressed_share.clamp(0.0, 1.0)).min(workers);
                [self.threads[1] + busy, self.threads[1]]
            }
            _ => self.threads,
        }
    }

    /// With the ratios learnt for each level (`cost_ratio_at` of the source's costs).
    pub fn with_level_ratios(self, cost_ratio_at: BTreeMap<u16, f64>) -> Self {
        PlanCpu {
            cost_ratio_at,
            ..self
        }
    }

    /// Priced for `concurrency` migrations at once rather than the plan's level: the costs
    /// at that level's ratio as drains showed it ([`host::cpu::level_ratio`]).
    pub fn at_level(self, concurrency: usize) -> Self {
        let ratio = host::cpu::level_ratio(&self.cost_ratio_at, concurrency);
        let current = Some(self.cost_ratio)
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or(1.0);
        self.repriced(ratio / current, ratio)
    }

    /// With the costs at `ratio` times those learnt (what migrations cost at this drain's
    /// concurrency); as they were where `ratio` is not a positive number.
    pub fn at_ratio(self, ratio: f64) -> Self {
        if !(ratio.is_finite() && ratio > 0.0) {
            return self;
        }
        self.repriced(ratio, ratio)
    }

    /// With every cost `by` times what it is, at level ratio `ratio`.
    fn repriced(self, by: f64, ratio: f64) -> Self {
        PlanCpu {
            cost_s_per_gb: self.cost_s_per_gb.map(|c| c * by),
            cost_fit_s_per_gb: self
                .cost_fit_s_per_gb
                .map(|f| f.map(|(a, b, c)| (a * by, b * by, c * by))),
            cost_ratio: ratio,
            ..self
        }
    }

    /// With how long moved guests check their memory, as the source learnt it.
    pub fn with_verify(self, verify_s_per_gb: Option<f64>) -> Self {
        PlanCpu {
            verify_s_per_gb,
            ..self
        }
    }

    /// How long a moved guest checks its memory ([`SimJob::verify_s`]), for `touched` bytes.
    pub fn verify_of(&self, touched: f64) -> f64 {
        self.verify_s_per_gb
            .filter(|v| v.is_finite() && *v > 0.0)
            .map_or(0.0, |per_gb| per_gb * touched.max(0.0) / 1e9)
    }

    /// With what the source learnt of how its migrations' CPU splits between the wire, the
    /// RAM they land and the pages they compress.
    pub fn with_fit(self, fit: Option<host::cpu::PerGb>) -> Self {
        PlanCpu {
            cost_fit_s_per_gb: fit,
            ..self
        }
    }

    /// A migration of the source's VM `name` (None: one like them all) with `vcpus`, as the
    /// cores see its guest ([`CpuModel::guest_of`]); `yields`: its vCPUs yield to it.
    pub fn with_guest(&self, job: SimJob, name: Option<&str>, vcpus: f64, yields: bool) -> SimJob {
        let (guest, load) = self.model.guest_of(name, vcpus);
        SimJob {
            guest,
            load,
            vcpus,
            yields,
            ..job
        }
    }

    /// Core-seconds per byte on the wire, source and destination.
    pub fn cost_per_byte(&self) -> [f64; 2] {
        self.cost_s_per_gb.map(|c| c / 1e9)
    }

    /// Core-seconds per byte on the wire of a migration that puts `wire` bytes on it, lands
    /// `landed` bytes of RAM and compresses `compressed` of them: a page sent as a reference
    /// costs the cores a page's work for a few bytes on the wire, a compressed one its
    /// codec's work for fewer. [`Self::cost_per_byte`] before the split was learnt.
    pub fn cost_per_byte_of(&self, wire: f64, landed: f64, compressed: f64) -> [f64; 2] {
        match self.cost_fit_s_per_gb {
            Some(fit) if wire > 0.0 && landed.is_finite() && compressed.is_finite() => {
                fit.map(|(a, b, c)| {
                    (a + (b * landed.max(0.0) + c * compressed.max(0.0)) / wire) / 1e9
                })
            }
            _ => self.cost_per_byte(),
        }
    }
}

/// What one of `n` like migrations to a destination moves at (`job` stands for them): its
/// share of the link, and no faster than its threads' share of the cores pays for. A link
/// known only as a floor (the cores held its probe back) carries what the cores send.
/// ∞ when neither is known.
pub fn migration_rate(
    link: Option<f64>,
    floor: bool,
    n: f64,
    job: &SimJob,
    cpu: Option<&CpuModel>,
) -> f64 {
    let n = n.max(1.0);
    let link = link.map_or(f64::INFINITY, |r| r / n);
    // A small count of migrations; `as` saturates.
    #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
    let cores = cpu.map_or(f64::INFINITY, |c| c.rate_of_like(job, n.ceil() as usize));
    if floor && cores.is_finite() {
        cores
    } else {
        link.min(cores)
    }
}

/// A destination's link as [`simulate_with_cpu`] takes it: a floor is no limit where the
/// cores bound the migrations (`job` stands for them), as they held its probe back.
pub fn sim_link(d: &DestFacts, job: &SimJob, cpu: Option<&CpuModel>) -> f64 {
    let cores_bound = cpu.is_some_and(|c| c.rate_of_like(job, 1).is_finite());
    if d.rate_is_floor && cores_bound {
        f64::INFINITY
    } else {
        d.rate.unwrap_or(1.0)
    }
}

/// What held a migration back, most of its time in the simulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    /// Its share of the link.
    Link,
    /// Its share of the cores, on the source or the destination.
    Cpu,
}

/// The makespan of running `jobs` in order, at most `window` at once and `per_dest` per
/// destination: each first pays [`crate::predict::OVERHEAD_S`] (connect, prepare), then
/// shares its destination's link evenly with the others moving bytes there (what TCP does).
pub fn simulate(jobs: &[SimJob], links: &[f64], window: usize, per_dest: usize) -> f64 {
    simulate_with_cpu(jobs, links, window, per_dest, None).0
}

/// [`simulate`], where the migrations also share the cores of `cpu`'s pools: a migration
/// moves no faster than its share of the link, nor than its threads' share of each pool's
/// cores (against the other migrations' threads and the guests' vCPUs) pays for at its cost
/// per byte there. Also what bound each job.
pub fn simulate_with_cpu(
    jobs: &[SimJob],
    links: &[f64],
    window: usize,
    per_dest: usize,
    cpu: Option<&CpuModel>,
) -> (f64, Vec<Bound>) {
    let o = run_simulation(jobs, links, window, per_dest, cpu);
    (o.makespan, o.bounds)
}

/// The model's error, as a share of a migration's own predicted time: a compressed drain's
/// migration goes raw when the drain then ends sooner by more than this, or no later than
/// this while it spares the cores (raw takes fewer core-seconds: the guests come first).
pub const RAW_PLAN_GAIN: f64 = 0.05;

/// Which of a compressed drain's `own.len()` migrations go raw (each moved alone takes
/// `own[k]` seconds compressed): one at a time, in order, each kept raw when the drain
/// (`eta` of which go raw: its makespan and the migrations' core-seconds) then ends sooner
/// by at least [`RAW_PLAN_GAIN`] of the migration's own time, or, within that of the
/// soonest end so far, takes fewer core-seconds. Raw trades link bytes for cores, so a
/// migration goes raw where the cores, not the link, hold the drain back (the seed's
/// fallback to TCP when compression competes with the VMs for CPU); the one that fills a
/// page cache first usually stays compressed, as its pages cross whole.
pub fn choose_raw(own: &[f64], eta: impl Fn(&[bool]) -> (f64, f64)) -> Vec<bool> {
    let mut raw = vec![false; own.len()];
    let (mut best, mut cores) = eta(&raw);
    for (k, secs) in own.iter().enumerate() {
        raw[k] = true;
        let (t, c) = eta(&raw);
        let margin = RAW_PLAN_GAIN * secs.max(0.0);
        let sooner = t < best - margin;
        let spares = t <= best + margin && c < cores;
        if t.is_finite() && (sooner || spares) {
            best = best.min(t);
            cores = c;
        } else {
            raw[k] = false;
        }
    }
    raw
}

/// What `jobs` take of the cores, core-seconds on both sides.
pub fn core_seconds(jobs: &[SimJob]) -> f64 {
    jobs.iter().map(|j| j.bytes * (j.cpu[0] + j.cpu[1])).sum()
}

/// How often [`simulate_refined`] re-estimates the jobs' bytes.
const REFINE: usize = 3;

/// [`simulate_with_cpu`] where a job's bytes depend on the rate it moves at (`bytes(i, r)`
/// for job `i` at `r` bytes/s: its guest dirties more while it moves slower). `jobs` come
/// with their bytes at a first guess of their rates; each is estimated again at the mean rate
/// the last simulation gave it (a migration that starts when others end gets more of the
/// link than an even share), [`REFINE`] times. Also the jobs as last estimated.
pub fn simulate_refined(
    jobs: &[SimJob],
    bytes: impl Fn(usize, f64) -> f64,
    links: &[f64],
    window: usize,
    per_dest: usize,
    cpu: Option<&CpuModel>,
) -> Simulated {
    let mut jobs = jobs.to_vec();
    let mut o = run_simulation(&jobs, links, window, per_dest, cpu);
    for _ in 0..REFINE {
        for (i, (job, rate)) in jobs.iter_mut().zip(&o.rates).enumerate() {
            if rate.is_finite() && *rate > 0.0 {
                job.bytes = bytes(i, *rate);
            }
        }
        o = run_simulation(&jobs, links, window, per_dest, cpu);
    }
    Simulated {
        makespan: o.makespan,
        bounds: o.bounds,
        jobs,
        spans: o.spans,
    }
}

/// A drain as the model sees it: its makespan, seconds; what bound each job; the jobs with
/// the bytes they send at the rates they got; when each started and ended, seconds.
#[derive(Clone, Debug)]
pub struct Simulated {
    pub makespan: f64,
    pub bounds: Vec<Bound>,
    pub jobs: Vec<SimJob>,
    pub spans: Vec<[f64; 2]>,
}

/// Per job of `sim`, how long it moves bytes (its span less its overhead) and its bytes on
/// the wire per second then; None where it moves nothing.
pub fn moving(sim: &Simulated) -> Vec<Option<(f64, f64)>> {
    sim.spans
        .iter()
        .zip(&sim.jobs)
        .map(|(span, job)| {
            let secs = span[1] - span[0] - job.overhead;
            (secs > 0.0 && job.bytes > 0.0).then(|| (secs, job.bytes / secs))
        })
        .collect()
}

/// A simulation's result: the makespan, what bound each job, each job's mean rate while it
/// moved bytes, and when it started and ended.
struct SimOutcome {
    makespan: f64,
    bounds: Vec<Bound>,
    rates: Vec<f64>,
    spans: Vec<[f64; 2]>,
}

fn run_simulation(
    jobs: &[SimJob],
    links: &[f64],
    window: usize,
    per_dest: usize,
    cpu: Option<&CpuModel>,
) -> SimOutcome {
    let (window, per_dest) = (window.max(1), per_dest.max(1));
    let mut pending: std::collections::VecDeque<usize> = (0..jobs.len()).collect();
    let mut active: Vec<Active> = Vec::new();
    let mut now = 0.0;
    // Moved guests, and those checking their memory: (job, seconds left).
    let mut moved: Vec<usize> = Vec::new();
    let mut verifying: Vec<(usize, f64)> = Vec::new();
    // Per job, seconds under each bound.
    let mut held = vec![[0.0f64; 2]; jobs.len()];
    let mut spans = vec![[0.0f64; 2]; jobs.len()];
    loop {
        let was = active.len();
        admit(jobs, &mut pending, &mut active, window, per_dest);
        for a in &active[was..] {
            spans[a.job][0] = now;
        }
        if active.is_empty() {
            let bounds = held
                .iter()
                .map(|h| if h[1] > h[0] { Bound::Cpu } else { Bound::Link })
                .collect();
            let rates = jobs
                .iter()
                .zip(&held)
                .map(|(j, h)| j.bytes / (h[0] + h[1]))
                .collect();
            return SimOutcome {
                makespan: now,
                bounds,
                rates,
                spans,
            };
        }
        let moving_ix: Vec<usize> = active
            .iter()
            .filter(|a| a.overhead <= 0.0)
            .map(|a| a.job)
            .collect();
        let moving: Vec<&SimJob> = moving_ix.iter().map(|&j| &jobs[j]).collect();
        let at = Guests {
            moving: &moving_ix,
            moved: &moved,
            verifying: &verifying,
        };
        let guests: Vec<Vec<Load>> = cpu.map_or(Vec::new(), |c| {
            (0..c.pools.len()).map(|p| c.loads(p, jobs, at)).collect()
        });
        let rates: Vec<(f64, Bound)> = active
            .iter()
            .map(|a| {
                let job = &jobs[a.job];
                let n = moving.iter().filter(|j| j.dest == job.dest).count().max(1);
                let link = links.get(job.dest).copied().unwrap_or(1.0).max(1.0) / n as f64;
                let cores = cpu.map_or(f64::INFINITY, |c| {
                    (0..c.pools.len())
                        .map(|p| c.rate(job, p, &moving, &guests[p]))
                        .fold(f64::INFINITY, f64::min)
                });
                if cores < link {
                    (cores.max(1.0), Bound::Cpu)
                } else {
                    (link, Bound::Link)
                }
            })
            .collect();
        let rates_only: Vec<f64> = rates.iter().map(|r| r.0).collect();
        let rates = &rates;
        let dt = active
            .iter()
            .zip(&rates_only)
            .map(|(a, r)| {
                if a.overhead > 0.0 {
                    a.overhead
                } else {
                    // Until it ends, or until it has seeded its destination's cache.
                    let seeding = seeding_left(&jobs[a.job], a);
                    (if seeding > 0.0 { seeding } else { a.left }) / r
                }
            })
            .fold(f64::INFINITY, f64::min)
            .min(verifying.iter().map(|v| v.1).fold(f64::INFINITY, f64::min));
        now += dt;
        for v in &mut verifying {
            v.1 -= dt;
        }
        verifying.retain(|v| v.1 > 1e-9);
        for (a, (r, bound)) in active.iter_mut().zip(rates) {
            if a.overhead > 0.0 {
                a.overhead -= dt;
            } else {
                a.left -= r * dt;
                held[a.job][usize::from(*bound == Bound::Cpu)] += dt;
            }
        }
        for a in active
            .iter()
            .filter(|a| a.overhead <= 1e-9 && a.left <= 1e-6)
        {
            spans[a.job][1] = now;
            moved.push(a.job);
            if jobs[a.job].verify_s > 0.0 {
                verifying.push((a.job, jobs[a.job].verify_s));
            }
        }
        active.retain(|a| a.overhead > 1e-9 || a.left > 1e-6);
    }
}

/// A simulated migration under way.
struct Active {
    job: usize,
    overhead: f64,
    left: f64,
}

/// Bytes `a` (moving `job`) still sends before the others to its destination may start.
fn seeding_left(job: &SimJob, a: &Active) -> f64 {
    if job.seeds <= 0.0 || a.left <= 1e-6 {
        return 0.0;
    }
    (job.seeds.min(job.bytes) - (job.bytes - a.left)).max(0.0)
}

/// Starts pending jobs, in order, while the window and their destination allow.
fn admit(
    jobs: &[SimJob],
    pending: &mut std::collections::VecDeque<usize>,
    active: &mut Vec<Active>,
    window: usize,
    per_dest: usize,
) {
    let mut skipped = std::collections::VecDeque::new();
    while active.len() < window {
        let Some(j) = pending.pop_front() else { break };
        let on_dest = || active.iter().filter(|a| jobs[a.job].dest == jobs[j].dest);
        // None starts while the first to its destination's cache fills it.
        let seeding = on_dest().any(|a| seeding_left(&jobs[a.job], a) > 1e-6);
        if on_dest().count() < per_dest && !seeding {
            active.push(Active {
                job: j,
                overhead: jobs[j].overhead,
                left: jobs[j].bytes,
            });
        } else {
            skipped.push_back(j);
        }
    }
    while let Some(j) = skipped.pop_back() {
        pending.push_front(j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_whose_thread_was_always_runnable_was_held_by_the_cores() {
        assert!(held_by_cores(Some(0.4), Some(0.97)));
        assert!(held_by_cores(Some(0.95), None));
        assert!(!held_by_cores(Some(0.4), Some(0.5)));
        assert!(!held_by_cores(None, None));
    }

    #[test]
    fn a_migrations_bytes_are_those_of_the_rate_the_simulation_gives_it() {
        // Each migration sends 100 bytes and, while it moves, its guest dirties 1 byte per
        // second more: bytes = 100 + 100 / rate * 1 at the rate it gets.
        let bytes = |_: usize, rate: f64| 100.0 + 100.0 / rate;
        // Two at once on a 10 B/s link: the even share (5 B/s) guesses 120 bytes each.
        let guess = SimJob {
            bytes: bytes(0, 5.0),
            ..SimJob::default()
        };
        let sim = simulate_refined(&[guess, guess], bytes, &[10.0], 2, 2, None);
        let (t, jobs) = (sim.makespan, sim.jobs);
        for j in &jobs {
            assert!((j.bytes - 120.0).abs() < 1e-6, "{jobs:?}");
        }
        assert!(
            (t - (24.0 + crate::predict::OVERHEAD_S)).abs() < 1e-6,
            "{t}"
        );
        // One at a time, each has the whole link: 110 bytes each, not the guess.
        let sim = simulate_refined(&[guess, guess], bytes, &[10.0], 1, 1, None);
        let (t, jobs) = (sim.makespan, sim.jobs);
        for j in &jobs {
            assert!((j.bytes - 110.0).abs() < 1e-6, "{jobs:?}");
        }
        assert!(
            (t - 2.0 * (11.0 + crate::predict::OVERHEAD_S)).abs() < 1e-6,
            "{t}"
        );
    }

    #[test]
    fn the_first_migration_to_a_cache_runs_alone_until_its_copy_is_done() {
        // 4 cores, nothing else on them; a GB costs a core-second on each side and each side
        // has one thread: one migration alone moves 1 GB/s, two at once 1 GB/s each. The link
        // does not limit.
        let cpu = CpuModel::of_runnable(vec![4.0], &[0.0], 0, vec![0, 0]);
        let job = SimJob {
            bytes: 1e9,
            cpu: [1e-9, 1e-9],
            threads: [1.0, 1.0],
            ..SimJob::default()
        };
        let o = crate::predict::OVERHEAD_S;
        let run = |jobs: &[SimJob]| simulate_with_cpu(jobs, &[1e12, 1e12], 2, 2, Some(&cpu)).0;
        // Without a cache: both at once.
        let t = run(&[job, job]);
        assert!((t - (o + 1.0)).abs() < 1e-6, "{t}");
        // The first fills the cache with its first 0.8 GB, alone; then the second starts (and
        // pays its overhead while the first sends 0.15 GB more); they share 0.05 s; the
        // second's last 0.95 GB go alone.
        let seeding = SimJob {
            seeds: 0.8e9,
            ..job
        };
        let t = run(&[seeding, job]);
        let want = o + 0.8 + o + 0.05 + 0.95;
        assert!((t - want).abs() < 1e-6, "{t} against {want}");
        // A migration to another destination does not wait.
        let elsewhere = SimJob { dest: 1, ..job };
        let t = run(&[seeding, elsewhere]);
        assert!((t - (o + 1.0)).abs() < 1e-6, "{t}");
    }

    #[test]
    fn a_link_known_only_as_a_floor_carries_what_the_cores_send() {
        let cpu = CpuModel::of_runnable(vec![2.0], &[0.0], 0, vec![0]);
        // One core-second per GB on each side: one migration's two threads get both cores.
        let job = SimJob {
            cpu: [1e-9, 1e-9],
            threads: [1.0, 1.0],
            ..SimJob::default()
        };
        let cores = cpu.rate_of_like(&job, 1);
        assert!((cores - 1e9).abs() < 1.0, "{cores}");
        // Known: the link's share, or the cores' where they give less.
        assert_eq!(migration_rate(Some(4e8), false, 2.0, &job, Some(&cpu)), 2e8);
        assert!((migration_rate(Some(8e9), false, 1.0, &job, Some(&cpu)) - 1e9).abs() < 1.0);
        // A floor: the cores, faster or slower than the probe.
        assert!((migration_rate(Some(4e8), true, 1.0, &job, Some(&cpu)) - 1e9).abs() < 1.0);
        assert!((migration_rate(Some(8e9), true, 1.0, &job, Some(&cpu)) - 1e9).abs() < 1.0);
        // Without the cores' costs, the floor is all that is known.
        assert_eq!(migration_rate(Some(4e8), true, 2.0, &job, None), 2e8);
        let floor = DestFacts {
            name: "b".into(),
            room: 1 << 30,
            rate: Some(4e8),
            rate_is_floor: true,
            bridge: false,
            unreachable: Vec::new(),
            copy_room: None,
            cpu_features: None,
        };
        assert_eq!(sim_link(&floor, &job, Some(&cpu)), f64::INFINITY);
        // On a host of many idle cores, a migration's two threads take two of them.
        let big = CpuModel {
            pools: vec![32.0],
            ..cpu.clone()
        };
        assert!((big.rate_of_like(&job, 1) - 1e9).abs() < 1.0);
        assert_eq!(sim_link(&floor, &job, None), 4e8);
        // So a drain over it is predicted at the cores' rate, and says the cores bound it.
        let jobs = [SimJob { bytes: 2e9, ..job }];
        let (t, bounds) = simulate_with_cpu(
            &jobs,
            &[sim_link(&floor, &job, Some(&cpu))],
            1,
            1,
            Some(&cpu),
        );
        assert!((t - (2.0 + crate::predict::OVERHEAD_S)).abs() < 1e-6, "{t}");
        assert_eq!(bounds, [Bound::Cpu]);
    }
    use migration::sample::VmSample;

    fn vm(name: &str, mib: u64, dirty_pages_per_s: f64) -> VmFacts {
        VmFacts {
            name: name.into(),
            memory: mib << 20,
            sample: Some(VmSample {
                memory_bytes: mib << 20,
                touched_bytes: mib << 20,
                zero_fraction: 0.0,
                compress_ratio: 0.5,
                dirty_pages_per_s,
                dirty_set_pages: 0,
                dirty_set_half_pages: 0,
                window_ms: 0,
                fingerprint: Vec::new(),
                fingerprint_costs: Vec::new(),
                delta_ratio: None,
                copy_delta_ratio: None,
            }),
            delta: false,
            cached: 0.0,
            whole_costs: None,
            whole_in_copy: None,
            self_dup: 0.0,
            vcpus: 1,
            needs: Default::default(),
            postcopy: migration::policy::PostcopyMode::Off,
            dirty_ratio: 1.0,
        }
    }

    fn names(vms: &[VmFacts], idx: &[usize]) -> Vec<String> {
        idx.iter().map(|i| vms[*i].name.clone()).collect()
    }

    #[test]
    fn orders_by_name_size_and_predicted_time_with_hot_vms_last() {
        let vms = [
            vm("c", 256, 0.0),
            vm("a", 512, 0.0),
            vm("hot", 1024, 1e6),
            vm("b", 128, 0.0),
        ];
        let share = 100e6;
        assert_eq!(
            names(&vms, &order(&vms, Order::Name, share, &[])),
            ["a", "b", "c", "hot"]
        );
        assert_eq!(
            names(&vms, &order(&vms, Order::Largest, share, &[])),
            ["hot", "a", "c", "b"]
        );
        assert_eq!(
            names(&vms, &order(&vms, Order::Smallest, share, &[])),
            ["b", "c", "a", "hot"]
        );
        assert_eq!(
            names(&vms, &order(&vms, Order::Auto, share, &[])),
            ["a", "c", "b", "hot"]
        );
        // Longest first as each is sent: "a" compressed (half its bytes) is shorter than "c"
        // sent raw.
        let both = [vm("c", 256, 0.0), vm("a", 384, 0.0)];
        assert_eq!(
            names(&both, &order(&both, Order::Auto, share, &[false, true])),
            ["c", "a"],
            "c's 256 MiB raw take longer than a's 384 compressed to half"
        );
        assert_eq!(
            names(&both, &order(&both, Order::Auto, share, &[false, false])),
            ["a", "c"]
        );
    }

    #[test]
    fn placement_never_overcommits_and_says_why_a_vm_fits_nowhere() {
        let vms = [
            vm("a", 128, 0.0),
            vm("b", 128, 0.0),
            vm("c", 256, 0.0),
            vm("d", 256, 0.0),
        ];
        let dests = [DestFacts {
            name: "B".into(),
            room: 400 << 20,
            rate: None,
            rate_is_floor: false,
            bridge: false,
            unreachable: Vec::new(),
            copy_room: None,
            cpu_features: None,
        }];
        let p = place(&vms, &dests, false, false);
        let used: u64 = p
            .iter()
            .zip(&vms)
            .filter(|(r, _)| r.is_ok())
            .map(|(_, v)| v.memory)
            .sum();
        assert!(used <= 400 << 20);
        // Largest first: one 256 and one 128 fit.
        assert_eq!(p.iter().filter(|r| r.is_ok()).count(), 2);
        let why = p.iter().find_map(|r| r.clone().err()).unwrap().to_string();
        assert!(
            why.contains("fits on no destination") && why.contains("B 16 MiB"),
            "{why}"
        );
    }

    #[test]
    fn with_measured_links_each_vm_goes_where_it_would_finish_first() {
        let vms: Vec<VmFacts> = (0..8).map(|i| vm(&format!("v{i}"), 1024, 0.0)).collect();
        let d = |n: &str, gbit: f64| DestFacts {
            name: n.into(),
            room: 64 << 30,
            rate: Some(gbit * 1e9 / 8.0),
            rate_is_floor: false,
            bridge: false,
            unreachable: Vec::new(),
            copy_room: None,
            cpu_features: None,
        };
        // A link three times faster takes three VMs for each the slow one takes.
        let p = place(&vms, &[d("fast", 3.0), d("slow", 1.0)], false, false);
        let on = |k: usize| p.iter().filter(|r| **r == Ok(k)).count();
        assert_eq!((on(0), on(1)), (6, 2), "{p:?}");
        // Equal links share evenly.
        let p = place(&vms, &[d("b", 1.0), d("c", 1.0)], false, false);
        let on = |k: usize| p.iter().filter(|r| **r == Ok(k)).count();
        assert_eq!((on(0), on(1)), (4, 4), "{p:?}");
    }

    #[test]
    fn a_vm_never_goes_where_the_cpu_lacks_a_feature_it_sees() {
        let mut modern = vm("modern", 100, 0.0);
        modern.needs.cpu_features = vec!["avx2".into(), "sse2".into()];
        let plain = vm("plain", 100, 0.0);
        let d = |n: &str, features: &[&str]| DestFacts {
            name: n.into(),
            room: 1 << 30,
            rate: None,
            rate_is_floor: false,
            bridge: false,
            unreachable: Vec::new(),
            copy_room: None,
            cpu_features: Some(features.iter().map(|f| f.to_string()).collect()),
        };
        // The older CPU has more room, but only the plain VM may go there.
        let old = DestFacts {
            room: 2 << 30,
            ..d("old", &["sse2"])
        };
        let p = place(
            &[modern.clone(), plain],
            &[old.clone(), d("new", &["avx2", "sse2"])],
            false,
            false,
        );
        assert_eq!(p, [Ok(1), Ok(0)]);
        let p = place(&[modern], &[old], false, false);
        let why = p[0].clone().unwrap_err().to_string();
        assert!(why.contains("old's CPU does not offer avx2"), "{why}");
    }

    #[test]
    fn placement_spreads_over_destinations_by_room() {
        let vms = [vm("a", 100, 0.0), vm("b", 100, 0.0)];
        let d = |n: &str| DestFacts {
            name: n.into(),
            room: 150 << 20,
            rate: None,
            rate_is_floor: false,
            bridge: false,
            unreachable: Vec::new(),
            copy_room: None,
            cpu_features: None,
        };
        let p = place(&vms, &[d("B"), d("C")], false, false);
        assert_eq!(p, vec![Ok(0), Ok(1)]);
    }

    #[test]
    fn a_vm_goes_only_where_its_nics_have_a_bridge_and_its_disks_open() {
        let disk = PathBuf::from("/shared/web.img");
        let mut web = vm("web", 100, 0.0);
        web.needs = Needs {
            disks: vec![disk.clone()],
            nics: 1,
            disk_bytes: 300 << 20,
            cpu_features: Vec::new(),
        };
        let d = |n: &str, bridge: bool, unreachable: Vec<(PathBuf, String)>| DestFacts {
            name: n.into(),
            room: 1 << 30,
            rate: None,
            rate_is_floor: false,
            bridge,
            unreachable,
            copy_room: None,
            cpu_features: None,
        };
        let no_bridge = d("B", false, vec![]);
        let no_disk = d("C", true, vec![(disk.clone(), "No such file".into())]);
        let good = d("D", true, vec![]);
        // D has less room than B and C but is the only one that can take it.
        let good = DestFacts {
            room: 200 << 20,
            ..good
        };
        let vms = [web, vm("plain", 100, 0.0)];
        let p = place(
            &vms,
            &[no_bridge.clone(), no_disk.clone(), good],
            false,
            false,
        );
        assert_eq!(p[0], Ok(2));
        let p = place(&vms, &[no_bridge.clone(), no_disk.clone()], false, false);
        let why = p[0].clone().unwrap_err().to_string();
        assert!(
            why.contains("B has no VM bridge")
                && why.contains("C cannot open /shared/web.img: No such file"),
            "{why}"
        );
        assert!(why.contains("--storage copy would copy it"), "{why}");
        // A VM without devices goes anywhere with room.
        assert!(p[1].is_ok());
        // Copying: C takes the disk if its disk directory has room for it, counted as VMs are
        // placed.
        let p = place(&vms, &[no_bridge.clone(), no_disk.clone()], true, false);
        let why = p[0].clone().unwrap_err().to_string();
        assert!(why.contains("takes no copies"), "{why}");
        let roomy = DestFacts {
            copy_room: Some(400 << 20),
            cpu_features: None,
            ..no_disk.clone()
        };
        let p = place(&vms, &[no_bridge.clone(), roomy.clone()], true, false);
        assert_eq!(p[0], Ok(1));
        assert!(must_copy(&vms[0].needs, &roomy));
        let mut two = web_twice(&vms[0]);
        two.push(vms[1].clone());
        let p = place(&two, &[no_bridge, roomy], true, false);
        assert_eq!(p[0], Ok(1));
        let why = p[1].clone().unwrap_err().to_string();
        assert!(
            why.contains("100 MiB free for copies, they need 300 MiB"),
            "{why}"
        );
    }

    fn web_twice(web: &VmFacts) -> Vec<VmFacts> {
        let mut b = web.clone();
        b.name = "web2".into();
        vec![web.clone(), b]
    }

    #[test]
    fn a_moved_guest_checking_its_memory_slows_the_next_migration() {
        // One core shared by source and destination, nothing else on it; 100 bytes per
        // migration at 0.01 core-s per byte on both sides: 100 B/s alone, 1 s each.
        let job = SimJob {
            bytes: 100.0,
            cpu: [0.005, 0.005],
            threads: [1.0, 1.0],
            overhead: 0.0,
            ..SimJob::default()
        };
        let model = CpuModel::of_runnable(vec![1.0], &[0.0], 0, vec![0]);
        let (t, _) = simulate_with_cpu(&[job, job], &[1e9], 1, 1, Some(&model));
        assert!((t - 2.0).abs() < 1e-6, "{t}");
        // The first guest checks itself for 1 s with a vCPU: the second migration's two
        // threads get 2/3 of the core meanwhile (66.7 B/s for 1 s), then all of it.
        let checks = SimJob {
            verify_s: 1.0,
            vcpus: 1.0,
            ..job
        };
        let (t, _) = simulate_with_cpu(&[checks, checks], &[1e9], 1, 1, Some(&model));
        let second = 1.0 + (100.0 - 200.0 / 3.0) / 100.0;
        assert!((t - (1.0 + second)).abs() < 1e-6, "{t}");
        // Where the learnt time is known, the plan gives a guest its check.
        let plan = PlanCpu::new(model, Vec::new(), [1.0; 2], [1.0; 2]).with_verify(Some(2.0));
        assert_eq!(plan.verify_of(5e8), 1.0);
        assert_eq!(plan.with_verify(None).verify_of(5e8), 0.0);
    }

    #[test]
    fn a_plan_prices_its_cpu_at_the_level_an_auto_drain_settled_at() {
        let model = CpuModel::of_runnable(vec![2.0], &[0.0], 0, vec![0]);
        let ratios = BTreeMap::from([(1, 0.9), (4, 1.1)]);
        let auto = PlanCpu::new(model, Vec::new(), [2.0, 3.0], [1.0; 2])
            .with_fit(Some([(1.0, 1.0, 0.0), (2.0, 0.5, 0.0)]))
            .with_level_ratios(ratios.clone());
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let at4 = auto.clone().at_level(4);
        assert!(close(at4.cost_s_per_gb[0], 2.2) && close(at4.cost_s_per_gb[1], 3.3));
        let fit = at4.cost_fit_s_per_gb.unwrap();
        assert!(close(fit[0].0, 1.1) && close(fit[1].1, 0.55), "{fit:?}");
        assert!(close(at4.cost_ratio, 1.1));
        // A level no drain ran at costs what its neighbours show.
        let at3 = auto.clone().at_level(3);
        assert!(close(at3.cost_s_per_gb[0], 2.0 * (0.9 + 0.2 * 2.0 / 3.0)));
        assert!(close(auto.clone().at_level(8).cost_ratio, 1.1));
        // A plan already at one level's ratio goes to another's, not on top of it.
        let one = auto.at_ratio(0.9);
        let moved = one.at_level(4);
        assert!(
            close(moved.cost_s_per_gb[0], 2.2),
            "{:?}",
            moved.cost_s_per_gb
        );
    }

    #[test]
    fn the_simulation_says_when_each_migration_starts_and_ends() {
        let job = SimJob {
            bytes: 100.0,
            overhead: 0.5,
            ..SimJob::default()
        };
        let bytes = |_: usize, _: f64| 100.0;
        // One at a time over a 100 B/s link: each takes its overhead and a second.
        let serial = simulate_refined(&[job, job], bytes, &[100.0], 1, 1, None);
        assert_eq!(serial.spans, [[0.0, 1.5], [1.5, 3.0]]);
        assert_eq!(serial.makespan, 3.0);
        // Both at once share it: they start together and end together.
        let both = simulate_refined(&[job, job], bytes, &[100.0], 2, 2, None);
        assert_eq!(both.spans, [[0.0, 2.5], [0.0, 2.5]]);
        // Each moves for 2 s of its span, at 50 B/s; one that sends nothing, never.
        assert_eq!(moving(&both), [Some((2.0, 50.0)), Some((2.0, 50.0))]);
        let nothing = Simulated {
            jobs: vec![SimJob { bytes: 0.0, ..job }],
            spans: vec![[0.0, 0.5]],
            ..both
        };
        assert_eq!(moving(&nothing), [None]);
    }

    #[test]
    fn simulation_shares_a_link_and_uses_two() {
        let job = |dest| SimJob {
            dest,
            bytes: 100.0,
            ..SimJob::default()
        };
        let one_link = simulate(&[job(0), job(0)], &[100.0], 2, 4);
        let serial = simulate(&[job(0), job(0)], &[100.0], 1, 4);
        // Sharing one link moves the same bytes in the same time; overheads overlap.
        assert!(
            (one_link - (2.0 + crate::predict::OVERHEAD_S)).abs() < 1e-6,
            "{one_link}"
        );
        assert!(serial > one_link);
        let two_links = simulate(&[job(0), job(1)], &[100.0, 100.0], 2, 4);
        assert!((two_links - (1.0 + crate::predict::OVERHEAD_S)).abs() < 1e-6);
        // A per-destination limit of one serialises them.
        let limited = simulate(&[job(0), job(0)], &[100.0], 2, 1);
        assert!(limited > one_link);
    }

    #[test]
    fn a_migration_keeps_as_many_workers_busy_as_its_pages_compressed_ask() {
        let mean = PlanCpu::new(CpuModel::default(), Vec::new(), [4.0, 2.0], [2.7, 1.0]);
        // Before the source learnt it, every migration has the drain's mean.
        assert_eq!(mean.threads_of(0.1), [2.7, 1.0]);
        let per = mean.clone().with_workers(Some(3.5), 2.0);
        // A fifth of its pages compressed keeps 0.7 workers busy; most of them, all 2.
        let [source, destination] = per.threads_of(0.2);
        assert!(
            (source - 1.7).abs() < 1e-9 && destination == 1.0,
            "{source}"
        );
        assert_eq!(per.threads_of(0.9), [3.0, 1.0]);
        assert_eq!(per.threads_of(0.0), [1.0, 1.0]);
        assert_eq!(per.threads_of(f64::NAN), [2.7, 1.0]);
        // Nonsense learnt is not believed.
        assert_eq!(
            mean.with_workers(Some(-1.0), 2.0).threads_of(0.2),
            [2.7, 1.0]
        );
    }

    #[test]
    fn a_migration_of_references_costs_the_cores_more_per_byte_on_the_wire() {
        let plan = PlanCpu::new(CpuModel::default(), Vec::new(), [4.0, 2.0], [1.0; 2]);
        // Before the split is learnt: the transport's cost per byte on the wire.
        assert_eq!(plan.cost_per_byte_of(1e9, 4e9, 0.0), [4e-9, 2e-9]);
        // Source 1 + 0.5 per GB landed, destination 0 + 1: a migration that lands 4 GB for
        // 1 GB on the wire costs 3 and 4 core-s per GB on the wire; one that sends every
        // page whole, 1.5 and 1.
        let plan = plan.with_fit(Some([(1.0, 0.5, 3.0), (0.0, 1.0, 1.0)]));
        let refs = plan.cost_per_byte_of(1e9, 4e9, 0.0);
        assert!((refs[0] - 3e-9).abs() < 1e-18 && (refs[1] - 4e-9).abs() < 1e-18);
        let whole = plan.cost_per_byte_of(2e9, 2e9, 0.0);
        assert!((whole[0] - 1.5e-9).abs() < 1e-18 && (whole[1] - 1e-9).abs() < 1e-18);
        // Source 3 and destination 1 per GB compressed: 1 GB compressed of 2 landed for
        // 1.2 GB on the wire costs (1.2 + 1 + 3) / 1.2 and (2 + 1) / 1.2 per GB on the wire.
        let packed = plan.cost_per_byte_of(1.2e9, 2e9, 1e9);
        assert!((packed[0] - 5.2e-9 / 1.2).abs() < 1e-18, "{packed:?}");
        assert!((packed[1] - 3e-9 / 1.2).abs() < 1e-18, "{packed:?}");
        // Nothing on the wire: the transport's.
        assert_eq!(plan.cost_per_byte_of(0.0, 1e9, 0.0), [4e-9, 2e-9]);
        // At a concurrency whose drains cost 0.75 of the rest: every cost is 0.75 of it.
        let one = plan.clone().at_ratio(0.75);
        assert_eq!(one.cost_ratio, 0.75);
        assert_eq!(one.cost_s_per_gb, [3.0, 1.5]);
        let refs = one.cost_per_byte_of(1e9, 4e9, 0.0);
        assert!((refs[0] - 2.25e-9).abs() < 1e-18 && (refs[1] - 3e-9).abs() < 1e-18);
        // Nothing sane: as it was.
        let same = plan.clone().at_ratio(f64::NAN).at_ratio(0.0);
        assert_eq!(same.cost_s_per_gb, plan.cost_s_per_gb);
        assert_eq!(same.cost_ratio, 1.0);
    }

    #[test]
    fn cores_bound_migrations_that_the_link_would_not() {
        // Two migrations of 100 bytes over a 100 B/s link, each byte costing 0.01 core-s on
        // each side with one thread each; source and destination on one kernel with 1 core
        // and no guests: each gets half of it, 0.5 / 0.02 = 25 B/s, not its 50 B/s share of
        // the link.
        let job = SimJob {
            dest: 0,
            bytes: 100.0,
            cpu: [0.01, 0.01],
            threads: [1.0, 1.0],
            ..SimJob::default()
        };
        let pool = |pools: Vec<f64>, dests| CpuModel {
            pools,
            source: 0,
            dests,
            ..CpuModel::default()
        };
        let shared = pool(vec![1.0], vec![0]);
        let (t, bounds) = simulate_with_cpu(&[job, job], &[100.0], 2, 4, Some(&shared));
        assert!((t - (4.0 + crate::predict::OVERHEAD_S)).abs() < 1e-6, "{t}");
        assert_eq!(bounds, [Bound::Cpu, Bound::Cpu]);
        // Two kernels of half a core each: each pays 0.01 per byte of each migration.
        let apart = pool(vec![0.5, 0.5], vec![1]);
        let (t, _) = simulate_with_cpu(&[job, job], &[100.0], 2, 4, Some(&apart));
        assert!((t - (4.0 + crate::predict::OVERHEAD_S)).abs() < 1e-6, "{t}");
        // Plenty of cores: the link again; unknown costs are free.
        let big = pool(vec![100.0], vec![0]);
        let (t, bounds) = simulate_with_cpu(&[job, job], &[100.0], 2, 4, Some(&big));
        assert!((t - (2.0 + crate::predict::OVERHEAD_S)).abs() < 1e-6, "{t}");
        assert_eq!(bounds, [Bound::Link, Bound::Link]);
        let free = SimJob {
            cpu: [0.0, 0.0],
            ..job
        };
        let (t, _) = simulate_with_cpu(&[free, free], &[100.0], 2, 4, Some(&shared));
        assert!((t - (2.0 + crate::predict::OVERHEAD_S)).abs() < 1e-6, "{t}");
        // Six busy guest vCPUs on 2 cores: one migration's two threads get 2 x 2/8 = 0.5
        // core (25 B/s); two at once get 2 x 4/10 = 0.8 (20 B/s each, 40 in all): more at
        // once moves more, as on a host whose guests compete for the cores.
        let busy = CpuModel::of_runnable(vec![2.0], &[6.0], 0, vec![0]);
        let (one, _) = simulate_with_cpu(&[job, job], &[1000.0], 1, 4, Some(&busy));
        let (two, _) = simulate_with_cpu(&[job, job], &[1000.0], 2, 4, Some(&busy));
        assert!(
            (one - 2.0 * (4.0 + crate::predict::OVERHEAD_S)).abs() < 1e-6,
            "{one}"
        );
        assert!(
            (two - (5.0 + crate::predict::OVERHEAD_S)).abs() < 1e-6,
            "{two}"
        );
    }

    #[test]
    fn a_compressed_drain_sends_raw_what_the_cores_would_hold_back_and_only_that() {
        // Compressed: 50 bytes at 0.04 core-s each, on one core: 25 B/s, 2 s. Raw: 100 bytes
        // at 0.005: the link's.
        let pool = CpuModel::of_runnable(vec![1.0], &[0.0], 0, vec![0]);
        let packed = SimJob {
            bytes: 50.0,
            cpu: [0.04, 0.0],
            threads: [1.0, 1.0],
            overhead: 0.0,
            ..SimJob::default()
        };
        let raw = SimJob {
            bytes: 100.0,
            cpu: [0.005, 0.0],
            ..packed
        };
        let pool = &pool;
        let eta = |link: f64| {
            move |r: &[bool]| {
                let jobs: Vec<SimJob> = r.iter().map(|&r| if r { raw } else { packed }).collect();
                let t = simulate_with_cpu(&jobs, &[link], 1, 4, Some(pool)).0;
                (t, core_seconds(&jobs))
            }
        };
        // A 100 B/s link: raw takes 1 s against 2, for each.
        assert_eq!(choose_raw(&[2.0, 2.0], eta(100.0)), [true, true]);
        // A 10 B/s link: raw would take 10 s; compression is what the drain needs.
        assert_eq!(choose_raw(&[2.0, 2.0], eta(10.0)), [false, false]);
        // 52 B/s: raw ends 0.08 s sooner each, under 5% of a 2 s migration, and takes a
        // quarter of the cores: raw.
        assert_eq!(choose_raw(&[2.0, 2.0], eta(52.0)), [true, true]);
        // 48 B/s: raw ends 0.08 s later each; within 5% of the soonest end once, not twice.
        assert_eq!(choose_raw(&[2.0, 2.0], eta(48.0)), [true, false]);
        // 45 B/s: 0.22 s later, beyond the model's error: compressed.
        assert_eq!(choose_raw(&[2.0, 2.0], eta(45.0)), [false, false]);
        // Nothing known: nothing changes.
        assert_eq!(choose_raw(&[2.0], |_| (f64::INFINITY, 0.0)), [false]);
        assert!(choose_raw(&[], eta(100.0)).is_empty());
    }
}
