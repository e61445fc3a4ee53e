//! What this host's CPU does, as counters that only grow: the kernel's busy time, and the
//! threads of its VM processes split into the guests' (vCPU threads) and the VMM's own
//! (migrations, devices, the API). A drain reads them twice and divides by the time between,
//! which is how it sees what migrations take from the guests. Also what a migration cost here
//! per byte on the wire, learned from the drains from and to this host.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One reading of a host's CPU counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuUsage {
    /// The kernel's boot id: hosts that give the same one share its cores.
    pub boot_id: String,
    /// Cores the kernel runs on.
    pub cores: usize,
    /// CLOCK_MONOTONIC at the reading, ms (comparable between hosts of one kernel).
    pub at_ms: u64,
    /// Core-seconds the kernel spent busy (not idle, not waiting for I/O) since boot.
    pub busy_s: f64,
    /// Core-seconds the guests' vCPU threads took, since the agent started counting.
    pub guests_s: f64,
    /// Seconds the guests' vCPU threads were runnable (running or waiting for a core), summed
    /// over them: over an interval, how many vCPUs on average compete for the cores.
    #[serde(default)]
    pub guests_runnable_s: f64,
    /// The guests' vCPU threads now.
    #[serde(default)]
    pub vcpus: usize,
    /// Core-seconds the other threads of VM processes took (migrations in and out, devices).
    pub vmm_s: f64,
    /// Each VM process's vCPU threads now, by the VM's name: what each guest takes of the
    /// cores, which the sums above do not tell apart (a guest that sleeps most of the time
    /// leaves the cores to others).
    #[serde(default)]
    pub vms: Vec<VmCpu>,
    /// What a migration sent from here cost, by transport.
    #[serde(default)]
    pub costs: CpuCosts,
}

/// One VM process's vCPU threads, as counters that only grow while the process lives.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VmCpu {
    pub name: String,
    /// The process: a reading of another process under the same name is not comparable.
    pub pid: u32,
    pub vcpus: usize,
    /// Core-seconds its vCPU threads ran, and seconds they were runnable (ran or waited).
    pub run_s: f64,
    pub runnable_s: f64,
}

/// Core-seconds per GB on the wire that migrations took on each side, by transport (`tcp`,
/// `compressed`, `direct`, ...): the VMM threads' CPU on the source and on the destinations
/// over a drain from or to this host, as the drain measured it ([`CpuUsage::vmm_s`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuCosts(pub BTreeMap<String, CpuCost>);

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuCost {
    /// Source core-seconds per GB on the wire.
    pub source_s_per_gb: f64,
    /// Destination core-seconds per GB on the wire.
    pub destination_s_per_gb: f64,
    /// Drains it was learned from.
    pub drains: u64,
    /// Of the dirty rate its VMs were sampled at, the share their guests kept while their
    /// own migrations ran (the migrations take the cores, and their vCPUs yield to them): as
    /// the pages their first sync rounds resent imply. None until a drain has shown it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_rate_ratio: Option<f64>,
    /// The same, learnt apart for each `--concurrency N` drains ran at: alone, a moving guest
    /// keeps more of its pace than among several migrations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dirty_rate_ratio_at: BTreeMap<u16, f64>,
    /// Of a compressed migration's workers, how many are busy while its sending thread is
    /// (pages that go as references, deltas or zeros leave them idle): its workers' CPU over
    /// the busiest of its threads'. None until a compressed drain has shown it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_workers: Option<f64>,
    /// The same per share of a migration's pages its workers compress: a migration whose
    /// pages mostly go as references or deltas keeps fewer of them busy than one whose
    /// pages go whole. Learnt of the migrations that left some workers idle (the others
    /// show only that there were too few); None until a compressed drain has shown it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_per_share: Option<f64>,
    /// Seconds a migration spends besides moving its pages and disks: connecting, the
    /// destination building the VM (and telling the keys of its page cache), the
    /// switchover. The mean over a drain's migrations; None until a drain has shown it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_s: Option<f64>,
    /// How a migration's CPU splits between its bytes on the wire, the RAM it lands (a
    /// page that goes as a reference costs a few bytes on the wire and a page's work on
    /// both sides) and the pages its workers compressed. None until a drain has shown its
    /// migrations' own CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<CostFit>,
    /// Seconds a moved guest spent checking its memory after its switchover (livemig's
    /// workload guest does; others take none), per GB it had touched. None until a drain
    /// has shown it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_s_per_gb: Option<f64>,
    /// For each `--concurrency N` drains ran at, what they cost per GB on the wire (both
    /// sides) over what had been learnt before each: migrations at once contend for the
    /// cores' caches and each other's locks, so one at a time costs less per byte.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cost_ratio_at: BTreeMap<u16, f64>,
}

/// Least squares over the migrations drains showed (older drains weighted down): a
/// migration's CPU on each side as `a` core-seconds per GB on the wire plus `b` per GB of RAM
/// it lands plus `c` per GB its workers compressed, none negative, times what the side's VMM
/// threads took over the migrations' own (`scale`: the devices' and the agents' threads,
/// which the migrations' reports do not count). A compressed page costs its codec's work for
/// fewer bytes on the wire, so no sum of the first two prices a drain whose migrations
/// compress some pages and send others raw.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CostFit {
    /// Σ w², Σ w·r, Σ r² over the migrations (w: GB on the wire, r: GB of RAM landed).
    pub ww: f64,
    pub wr: f64,
    pub rr: f64,
    /// Σ w·c, Σ r·c, Σ c² (c: GB the workers compressed); 0 in fits learnt before them.
    #[serde(default)]
    pub wc: f64,
    #[serde(default)]
    pub rc: f64,
    #[serde(default)]
    pub cc: f64,
    /// Per side (source, destination): Σ w·y, Σ r·y and Σ c·y (y: the migration's
    /// core-seconds).
    pub wy: [f64; 2],
    pub ry: [f64; 2],
    #[serde(default)]
    pub cy: [f64; 2],
    pub scale: [f64; 2],
}

/// Per side, core-seconds per GB on the wire, per GB of RAM landed and per GB compressed.
pub type PerGb = [(f64, f64, f64); 2];

/// One migration's CPU, as its report gives it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MigrationCpu {
    /// GB it put on the wire, and of RAM (and disk) it landed on the destination.
    pub wire_gb: f64,
    pub landed_gb: f64,
    /// GB of the pages it landed that its workers compressed.
    #[serde(default)]
    pub compressed_gb: f64,
    /// Core-seconds its threads took: on the source (compression workers included) and on
    /// the destination.
    pub source_s: f64,
    pub destination_s: f64,
}

impl MigrationCpu {
    /// Whether a drain's report of this migration is learnt from, and priced: every figure a
    /// finite non-negative number, and bytes on the wire.
    fn counts(&self) -> bool {
        let sane = |x: f64| x.is_finite() && x >= 0.0;
        [
            self.wire_gb,
            self.landed_gb,
            self.compressed_gb,
            self.source_s,
            self.destination_s,
        ]
        .into_iter()
        .all(sane)
            && self.wire_gb > 0.0
    }
}

/// A predictor this close to the others taken with it (the square of its multiple
/// correlation with them) cannot be told apart from them: that set is not fitted.
const COLLINEAR: f64 = 0.998;

/// The regressors' sets tried, wire first: where two fit equally well (the same bytes
/// counted twice), the earlier is taken.
const SUBSETS: [&[usize]; 7] = [&[0, 1, 2], &[0, 1], &[0, 2], &[1, 2], &[0], &[1], &[2]];

/// Least squares with no coefficient negative, from the regressors' Gram matrix and their
/// moments with y: of the sets of regressors whose fit has none negative, the one that fits
/// best (the largest βᵀ·Xᵀy, which is Σy² less the residual). All zero when none fits.
fn non_negative_fit(gram: &[[f64; 3]; 3], moments: &[f64; 3]) -> [f64; 3] {
    let mut best = ([0.0; 3], 0.0);
    for set in SUBSETS {
        let Some(beta) = fit_on(gram, moments, set) else {
            continue;
        };
        let explained: f64 = set.iter().map(|&i| beta[i] * moments[i]).sum();
        if explained > best.1 {
            best = (beta, explained);
        }
    }
    best.0
}

/// Least squares on the regressors `set` names (elimination on their Gram matrix): None
/// where one is too close to the others ([`COLLINEAR`]), or a coefficient is negative.
fn fit_on(gram: &[[f64; 3]; 3], moments: &[f64; 3], set: &[usize]) -> Option<[f64; 3]> {
    let n = set.len();
    let mut a = [[0.0; 4]; 3];
    for (r, &i) in set.iter().enumerate() {
        for (c, &j) in set.iter().enumerate() {
            a[r][c] = gram[i][j];
        }
        a[r][n] = moments[i];
    }
    for p in 0..n {
        // What is left of the pivot after the regressors before it: 1 − R² of its diagonal.
        let diag = gram[set[p]][set[p]];
        if !(diag > 0.0 && diag.is_finite() && a[p][p] > (1.0 - COLLINEAR) * diag) {
            return None;
        }
        let pivot = a[p];
        for row in a.iter_mut().take(n).skip(p + 1) {
            let f = row[p] / pivot[p];
            for (x, y) in row[p..=n].iter_mut().zip(&pivot[p..=n]) {
                *x -= f * y;
            }
        }
    }
    let mut beta = [0.0; 3];
    for p in (0..n).rev() {
        let rest: f64 = (p + 1..n).map(|c| a[p][c] * beta[set[c]]).sum();
        let x = (a[p][n] - rest) / a[p][p];
        if !(x.is_finite() && x >= 0.0) {
            return None;
        }
        beta[set[p]] = x;
    }
    Some(beta)
}

impl CostFit {
    /// Per side, (core-seconds per GB on the wire, per GB of RAM landed, per GB compressed),
    /// scaled to the VMM threads' CPU: none negative. None before a migration was learnt
    /// from.
    pub fn per_gb(&self) -> Option<PerGb> {
        if !(self.ww > 0.0 && self.ww.is_finite()) {
            return None;
        }
        let gram = [
            [self.ww, self.wr, self.wc],
            [self.wr, self.rr, self.rc],
            [self.wc, self.rc, self.cc],
        ];
        Some([0, 1].map(|s| {
            let moments = [self.wy[s], self.ry[s], self.cy[s]];
            let [a, b, c] = non_negative_fit(&gram, &moments);
            let k = self.scale[s];
            let ok = |x: f64| if x.is_finite() { (x * k).max(0.0) } else { 0.0 };
            (ok(a), ok(b), ok(c))
        }))
    }

    /// Adds a drain's migrations with weight `w` (the older ones weighted down by `1 - w`,
    /// the new ones counting `w / LEARN_WEIGHT` each); `vmm_s`: what each side's VMM threads
    /// took over the drain.
    fn learn(&mut self, w: f64, m: &[MigrationCpu], vmm_s: [f64; 2], first: bool) {
        let (keep, new) = (1.0 - w, w / LEARN_WEIGHT);
        let m: Vec<&MigrationCpu> = m.iter().filter(|c| c.counts()).collect();
        if m.is_empty() {
            return;
        }
        // Learnt before the pages compressed were counted, its migrations read as if they
        // compressed none: it starts again from the first drain that counts them.
        let first = if self.cc == 0.0 && m.iter().any(|c| c.compressed_gb > 0.0) {
            *self = CostFit::default();
            true
        } else {
            first
        };
        let own = [
            m.iter().map(|c| c.source_s).sum::<f64>(),
            m.iter().map(|c| c.destination_s).sum::<f64>(),
        ];
        for v in [
            &mut self.ww,
            &mut self.wr,
            &mut self.rr,
            &mut self.wc,
            &mut self.rc,
            &mut self.cc,
        ] {
            *v *= keep;
        }
        for s in 0..2 {
            self.wy[s] *= keep;
            self.ry[s] *= keep;
            self.cy[s] *= keep;
        }
        for m in m {
            let (x, r, c) = (m.wire_gb, m.landed_gb, m.compressed_gb);
            self.ww += new * x * x;
            self.wr += new * x * r;
            self.rr += new * r * r;
            self.wc += new * x * c;
            self.rc += new * r * c;
            self.cc += new * c * c;
            for (s, y) in [m.source_s, m.destination_s].into_iter().enumerate() {
                self.wy[s] += new * x * y;
                self.ry[s] += new * r * y;
                self.cy[s] += new * c * y;
            }
        }
        for s in 0..2 {
            if own[s] > 0.0 && vmm_s[s] > 0.0 && vmm_s[s].is_finite() {
                let k = (vmm_s[s] / own[s]).clamp(MIN_SCALE, MAX_SCALE);
                self.scale[s] = if first {
                    k
                } else {
                    self.scale[s] + w * (k - self.scale[s])
                };
            } else if first {
                self.scale[s] = 1.0;
            }
        }
    }
}

/// The VMM threads' CPU over the migrations' own is believed between these.
const MIN_SCALE: f64 = 0.5;
const MAX_SCALE: f64 = 4.0;
/// At most this many migrations of a drain are learnt from.
pub const MAX_MIGRATIONS: usize = 256;

impl CpuCost {
    /// What the costs learnt so far expect drain `l` to cost each side at the ratio of 1,
    /// core-seconds for its `gb` on the wire (None before any drain): as the fit prices its
    /// migrations' bytes on the wire and RAM landed, once it was learnt. A drain whose pages
    /// went mostly as references (a page's work each for a few bytes on the wire) costs more
    /// per byte on the wire at any level: against the cost per byte, the level it ran at was
    /// taken as the dearer one (docs/drain.md, "What a level of concurrency costs").
    fn expected(&self, l: &Learn, gb: f64) -> Option<[f64; 2]> {
        if self.drains == 0 {
            return None;
        }
        let per_wire = [self.source_s_per_gb * gb, self.destination_s_per_gb * gb];
        let m: Vec<&MigrationCpu> = l
            .migrations
            .iter()
            .take(MAX_MIGRATIONS)
            .filter(|c| c.counts())
            .collect();
        let wire: f64 = m.iter().map(|m| m.wire_gb).sum();
        let by_fit = self
            .fit
            .as_ref()
            .and_then(CostFit::per_gb)
            .filter(|_| wire > 0.0)
            .map(|fit| {
                // Scaled to all the drain's bytes, where it named fewer migrations.
                fit.map(|(a, b, c)| {
                    m.iter()
                        .map(|m| a * m.wire_gb + b * m.landed_gb + c * m.compressed_gb)
                        .sum::<f64>()
                        * gb
                        / wire
                })
            })
            .filter(|e| e.iter().all(|v| v.is_finite()) && e[0] + e[1] > 0.0);
        Some(by_fit.unwrap_or(per_wire))
    }

    /// What migrations cost `concurrency` at once (when fixed) against the costs learnt
    /// ([`level_ratio`]); 1 when it is not fixed.
    pub fn cost_ratio_at(&self, concurrency: Option<usize>) -> f64 {
        concurrency.map_or(1.0, |n| level_ratio(&self.cost_ratio_at, n))
    }

    /// The share of their dirty rate guests keep while they move `concurrency` at once (when
    /// fixed): as drains at that level showed, or drains at any.
    pub fn dirty_ratio_at(&self, concurrency: Option<usize>) -> Option<f64> {
        concurrency
            .and_then(|n| u16::try_from(n).ok())
            .and_then(|n| self.dirty_rate_ratio_at.get(&n).copied())
            .or(self.dirty_rate_ratio)
    }
}

/// What migrations cost `n` at once against the costs learnt, of the ratios drains showed
/// per level (`at`): that level's where they ran at it; between two levels they ran at, on
/// the line between theirs; below or above them all, the nearest's; 1 before any. Not the
/// mean over all levels for a level no drain ran at: what is learnt over all levels is
/// what they cost at their own ratios, so the ratios need not gather around 1.
pub fn level_ratio(at: &BTreeMap<u16, f64>, n: usize) -> f64 {
    let sane = |r: &f64| r.is_finite() && *r > 0.0;
    let n = u16::try_from(n).unwrap_or(u16::MAX);
    let below = at.range(..=n).rev().find(|(_, r)| sane(r));
    let above = at.range(n..).find(|(_, r)| sane(r));
    match (below, above) {
        (Some((&a, &ra)), Some((&b, &rb))) if b > a => {
            ra + (rb - ra) * f64::from(n - a) / f64::from(b - a)
        }
        (Some((_, &r)), _) | (None, Some((_, &r))) => r,
        (None, None) => 1.0,
    }
}

/// What a drain's migrations cost, to learn from (`POST /cpu/costs`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Learn {
    pub transport: String,
    pub source_s: f64,
    pub destination_s: f64,
    pub bytes_on_wire: u64,
    /// The drain's [`CpuCost::dirty_rate_ratio`], when its migrations showed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_rate_ratio: Option<f64>,
    /// The drain's `--concurrency N`, when it was fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u16>,
    /// The most of its migrations that moved at once: where the drain chose its concurrency,
    /// its costs are taken at that level's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_concurrency: Option<u16>,
    /// The drain's [`CpuCost::busy_workers`], when its migrations compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_workers: Option<f64>,
    /// The drain's [`CpuCost::workers_per_share`], when its migrations showed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_per_share: Option<f64>,
    /// The drain's [`CpuCost::setup_s`], when its migrations showed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_s: Option<f64>,
    /// The drain's [`CpuCost::verify_s_per_gb`], when its guests showed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_s_per_gb: Option<f64>,
    /// Its migrations' own CPU, for [`CpuCost::fit`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<MigrationCpu>,
}

/// Longest transport name learnt from.
const MAX_TRANSPORT_NAME: usize = 64;

/// Drains smaller than this on the wire teach nothing: their fixed costs dominate.
const LEARN_FROM_BYTES: u64 = 64 << 20;
/// Weight of the newest drain in what is learned.
const LEARN_WEIGHT: f64 = 0.3;
/// A level's cost against the learnt one is believed between these.
const MIN_RATIO: f64 = 0.5;
const MAX_RATIO: f64 = 2.0;
/// At most this many concurrency levels are remembered per transport.
const MAX_LEVELS: usize = 16;
/// More compression workers than this are not believed.
const MAX_WORKERS: f64 = 1024.0;
/// A drain whose migrations cost a side more than this many times what was learnt, or less
/// than its inverse, is taken as an outlier there (a host still busy with what came before
/// it: the first drain after its VMs booted has cost one destination three times the next
/// ones, and its source no more).
const OUTLIER: f64 = 1.5;
/// ... and moves what is learnt this much only.
const OUTLIER_WEIGHT: f64 = 0.1;

/// The weight of a drain that cost `now` core-seconds per GB, where `learnt` was learnt.
fn cost_weight(now: f64, learnt: f64) -> f64 {
    if learnt > 0.0 && (now > learnt * OUTLIER || now * OUTLIER < learnt) {
        OUTLIER_WEIGHT
    } else {
        LEARN_WEIGHT
    }
}

/// A guest's check of its memory slower than this is not believed, s per GB.
const MAX_VERIFY_S_PER_GB: f64 = 600.0;
/// A migration's setup longer than this is not believed, s.
const MAX_SETUP_S: f64 = 60.0;
/// At most this many transports are remembered (the names come from reports).
const MAX_TRANSPORTS: usize = 32;

impl CpuCosts {
    /// Learns from one drain: its migrations' CPU on both sides over their bytes on the wire,
    /// and what their guests kept of their dirty rate.
    pub fn learn(&mut self, l: &Learn) {
        let sane = |s: f64| s.is_finite() && s >= 0.0;
        if l.bytes_on_wire < LEARN_FROM_BYTES || !sane(l.source_s) || !sane(l.destination_s) {
            return;
        }
        if !self.0.contains_key(&l.transport) && self.0.len() >= MAX_TRANSPORTS {
            return;
        }
        let gb = l.bytes_on_wire as f64 / 1e9;
        let c = self.0.entry(l.transport.clone()).or_default();
        let expected = c.expected(l, gb);
        // This drain's cost against what was learnt (None: nothing was).
        let measured = expected
            .map(|[s, d]| s + d)
            .filter(|e| *e > 0.0)
            .map(|e| ((l.source_s + l.destination_s) / e).clamp(MIN_RATIO, MAX_RATIO));
        // A level seen for the first time learns its ratio before anything else: the first
        // drain's level is where the costs are learnt (1), a later one's is its costs against
        // them. Else its first drain moves what every other level is predicted to cost by
        // its own level's difference, and the level it came at is priced as they are.
        if let Some(n) = l.concurrency.filter(|n| !c.cost_ratio_at.contains_key(n)) {
            let first = (c.drains == 0).then_some(1.0);
            if let Some(ratio) = first
                .or(measured)
                .filter(|_| c.cost_ratio_at.len() < MAX_LEVELS)
            {
                c.cost_ratio_at.insert(n, ratio);
            }
        }
        // What is learnt over all levels takes this drain's costs at its level's ratio: else
        // drains at a busy level raise what one at a time is predicted to cost, and the
        // order drains come in moves every prediction.
        let level = c.cost_ratio_at(l.concurrency.or(l.peak_concurrency).map(usize::from));
        let (source, destination) = (l.source_s / level, l.destination_s / level);
        let [ws, wd] = expected.map_or([1.0; 2], |[s, d]| {
            [cost_weight(source, s), cost_weight(destination, d)]
        });
        // The fit and the level's ratio learn both sides together: as little as the side
        // that was an outlier.
        let w = ws.min(wd);
        if let (Some(n), Some(ratio)) = (l.concurrency, measured) {
            if let Some(k) = c.cost_ratio_at.get_mut(&n) {
                *k += w * (ratio - *k);
            }
        }
        c.source_s_per_gb += ws * (source / gb - c.source_s_per_gb);
        c.destination_s_per_gb += wd * (destination / gb - c.destination_s_per_gb);
        c.drains += 1;
        let learnt = |was: Option<f64>, now: Option<f64>, max: f64| match (was, now) {
            (Some(was), Some(r)) if r.is_finite() => {
                Some(was + LEARN_WEIGHT * (r.clamp(0.0, max) - was))
            }
            (None, Some(r)) if r.is_finite() => Some(r.clamp(0.0, max)),
            (was, _) => was,
        };
        c.dirty_rate_ratio = learnt(c.dirty_rate_ratio, l.dirty_rate_ratio, 1.0);
        if let Some(n) = l.concurrency {
            let known = c.dirty_rate_ratio_at.get(&n).copied();
            if known.is_some() || c.dirty_rate_ratio_at.len() < MAX_LEVELS {
                if let Some(r) = learnt(known, l.dirty_rate_ratio, 1.0) {
                    c.dirty_rate_ratio_at.insert(n, r);
                }
            }
        }
        c.busy_workers = learnt(c.busy_workers, l.busy_workers, MAX_WORKERS);
        c.workers_per_share = learnt(c.workers_per_share, l.workers_per_share, MAX_WORKERS);
        c.setup_s = learnt(c.setup_s, l.setup_s, MAX_SETUP_S);
        c.verify_s_per_gb = learnt(c.verify_s_per_gb, l.verify_s_per_gb, MAX_VERIFY_S_PER_GB);
        if !l.migrations.is_empty() {
            let first = c.fit.is_none();
            let m: Vec<MigrationCpu> = l.migrations[..l.migrations.len().min(MAX_MIGRATIONS)]
                .iter()
                .map(|m| MigrationCpu {
                    source_s: m.source_s / level,
                    destination_s: m.destination_s / level,
                    ..*m
                })
                .collect();
            c.fit.get_or_insert_with(CostFit::default).learn(
                if first { LEARN_WEIGHT } else { w },
                &m,
                [source, destination],
                first,
            );
        }
    }

    /// What was learned, from `path` (nothing when it is missing or not ours).
    pub fn load(path: &Path) -> Self {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }
}

/// The agent's counters: each reading adds what each of its VM processes took since the one
/// before: its vCPU threads' time to the guests', the rest of the process's (threads that
/// have ended included, as the kernel keeps them) to the VMM's. A process that ended between
/// two readings is not counted after the first.
#[derive(Debug, Default)]
pub struct CpuMeter {
    /// pid → its [`Process`] at the last reading.
    seen: HashMap<u32, Process>,
    guests_s: f64,
    guests_runnable_s: f64,
    vmm_s: f64,
    costs_path: Option<PathBuf>,
    costs: CpuCosts,
}

impl CpuMeter {
    /// A meter whose learned costs persist at `costs_path`.
    pub fn new(costs_path: PathBuf) -> Self {
        CpuMeter {
            costs: CpuCosts::load(&costs_path),
            costs_path: Some(costs_path),
            ..Default::default()
        }
    }

    /// Reads the counters, with `vms` the host's VM processes now (name, pid).
    pub fn read(&mut self, vms: &[(String, u32)]) -> CpuUsage {
        let mut now = HashMap::new();
        let mut per_vm = Vec::new();
        for (name, pid) in vms {
            if let Some(p) = process(*pid) {
                now.insert(*pid, p);
                per_vm.push(VmCpu {
                    name: name.clone(),
                    pid: *pid,
                    vcpus: p.vcpu_threads,
                    run_s: p.vcpus_ran,
                    runnable_s: p.vcpus_runnable,
                });
            }
        }
        for (pid, p) in &now {
            // A process first seen counts from its start: it began since the last reading,
            // or the agent has just started (the first reading is a baseline either way).
            let was = self.seen.get(pid).copied().unwrap_or_default();
            let guests = (p.vcpus - was.vcpus).max(0.0);
            self.guests_s += guests;
            self.guests_runnable_s += (p.vcpus_runnable - was.vcpus_runnable).max(0.0);
            self.vmm_s += ((p.total - was.total) - guests).max(0.0);
        }
        let vcpus = now.values().map(|p| p.vcpu_threads).sum();
        self.seen = now;
        CpuUsage {
            boot_id: boot_id(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            at_ms: monotonic_ms(),
            busy_s: busy_seconds(),
            guests_s: self.guests_s,
            guests_runnable_s: self.guests_runnable_s,
            vcpus,
            vmm_s: self.vmm_s,
            vms: per_vm,
            costs: self.costs.clone(),
        }
    }

    /// Learns from a drain from or to here, and keeps it.
    pub fn learn(&mut self, l: &Learn) {
        if l.transport.len() > MAX_TRANSPORT_NAME {
            return;
        }
        self.costs.learn(l);
        if let Some(p) = &self.costs_path {
            if let Err(e) = self.costs.save(p) {
                tracing::warn!("could not keep the CPU costs at {}: {e}", p.display());
            }
        }
    }
}

fn ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`, which lives across the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Busy core-seconds since boot, from /proc/stat's first line.
fn busy_seconds() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next().map(parse_busy_ticks))
        .unwrap_or(0.0)
        / ticks_per_s()
}

/// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`: all but idle and
/// iowait (guest time is already inside user).
fn parse_busy_ticks(line: &str) -> f64 {
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0);
    at(0) + at(1) + at(2) + at(5) + at(6) + at(7)
}

/// What one VM process has taken, in seconds.
#[derive(Clone, Copy, Debug, Default)]
struct Process {
    /// Core-seconds of all its threads, ended ones included.
    total: f64,
    /// Core-seconds of its vCPU threads.
    vcpus: f64,
    /// Seconds its vCPU threads ran (as the scheduler counts, finer than the ticks above)
    /// and were runnable, summed.
    vcpus_ran: f64,
    vcpus_runnable: f64,
    /// Its vCPU threads.
    vcpu_threads: usize,
}

/// Process `pid`, read from /proc.
fn process(pid: u32) -> Option<Process> {
    let tps = ticks_per_s();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, total) = parse_thread_stat(&stat)?;
    let mut p = Process {
        total: total / tps,
        ..Process::default()
    };
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Some((comm, ticks)) = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(|s| parse_thread_stat(s).map(|(c, t)| (c.to_string(), t)))
        else {
            continue;
        };
        if comm.starts_with("vcpu") {
            p.vcpu_threads += 1;
            p.vcpus += ticks / tps;
            let sched = std::fs::read_to_string(e.path().join("schedstat")).unwrap_or_default();
            let (ran, waited) = parse_schedstat(&sched);
            p.vcpus_ran += ran;
            p.vcpus_runnable += ran + waited;
        }
    }
    Some(p)
}

/// A thread's `schedstat` (`run_ns wait_ns slices`): seconds it ran, and it waited for a core.
fn parse_schedstat(s: &str) -> (f64, f64) {
    let mut ns = s
        .split_whitespace()
        .map(|x| x.parse::<f64>().unwrap_or(0.0));
    let ran = ns.next().unwrap_or(0.0);
    (ran / 1e9, ns.next().unwrap_or(0.0) / 1e9)
}

/// A thread's name and its user + system ticks from its `stat` line. The name is between the
/// first `(` and the last `)`, and may hold anything.
fn parse_thread_stat(stat: &str) -> Option<(&str, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15.
    let utime: f64 = rest.get(11)?.parse().ok()?;
    let stime: f64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_stat_line_gives_its_name_and_ticks_whatever_the_name_holds() {
        let line = "4242 (vcpu0) S 1 2 3 4 5 6 7 8 9 10 120 30 0 0 20 0 1 0";
        assert_eq!(parse_thread_stat(line), Some(("vcpu0", 150.0)));
        let odd = "7 (a) b (c)) R 1 2 3 4 5 6 7 8 9 10 5 6 0";
        assert_eq!(parse_thread_stat(odd), Some(("a) b (c)", 11.0)));
        assert_eq!(parse_thread_stat("7 (short) R 1"), None);
        assert_eq!(parse_thread_stat("garbage"), None);
    }

    #[test]
    fn a_schedstat_gives_the_time_running_and_waiting() {
        assert_eq!(parse_schedstat("1500000000 500000000 42\n"), (1.5, 0.5));
        assert_eq!(parse_schedstat(""), (0.0, 0.0));
        assert_eq!(parse_schedstat("x y"), (0.0, 0.0));
    }

    #[test]
    fn busy_time_leaves_out_idle_and_iowait() {
        let line = "cpu  100 10 50 1000 40 5 5 3 0 0";
        assert_eq!(parse_busy_ticks(line), 173.0);
    }

    #[test]
    fn this_process_is_read_its_ended_threads_count_and_counters_only_grow() {
        let mut m = CpuMeter::default();
        let me = [("me".to_string(), std::process::id())];
        let a = m.read(&me);
        // Burn a little CPU on a (non-vCPU) thread that ends before the next reading.
        std::thread::spawn(|| {
            let t = std::time::Instant::now();
            let mut x = 0u64;
            while t.elapsed().as_millis() < 50 {
                x = x.wrapping_mul(31).wrapping_add(7);
            }
            std::hint::black_box(x);
        })
        .join()
        .unwrap();
        let b = m.read(&me);
        assert!(b.vmm_s > a.vmm_s, "{a:?} then {b:?}");
        assert_eq!(b.guests_s, 0.0);
        assert_eq!(b.vms.len(), 1);
        assert_eq!((b.vms[0].name.as_str(), b.vms[0].vcpus), ("me", 0));
        assert!(b.cores >= 1 && b.at_ms >= a.at_ms && b.busy_s >= a.busy_s);
        // A process gone: nothing taken away.
        let c = m.read(&[]);
        assert_eq!(c.vmm_s, b.vmm_s);
        assert!(c.vms.is_empty());
        a_vms_vcpu_threads_are_read_on_their_own();
    }

    /// In the test above: another test's vCPU thread would be counted as its guest's.
    fn a_vms_vcpu_threads_are_read_on_their_own() {
        let mut m = CpuMeter::default();
        let me = [("guest".to_string(), std::process::id())];
        let (stop, ready) = (
            std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
            std::sync::Arc::new(std::sync::Barrier::new(2)),
        );
        let (s, r) = (stop.clone(), ready.clone());
        // A thread named as a vCPU thread, which burns CPU until told to stop.
        let vcpu = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                r.wait();
                let mut x = 0u64;
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_mul(31).wrapping_add(7);
                }
                std::hint::black_box(x);
            })
            .unwrap();
        ready.wait();
        let a = m.read(&me);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let b = m.read(&me);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        vcpu.join().unwrap();
        let (va, vb) = (&a.vms[0], &b.vms[0]);
        assert_eq!((vb.vcpus, vb.pid), (1, std::process::id()));
        assert!(vb.run_s > va.run_s, "{va:?} then {vb:?}");
        assert!(vb.runnable_s - va.runnable_s >= vb.run_s - va.run_s - 1e-3);
    }

    #[test]
    fn a_drain_that_cost_far_more_or_less_than_was_learnt_moves_it_a_little() {
        let drain = |source_s: f64| Learn {
            transport: "tcp".into(),
            source_s,
            destination_s: 1.0,
            bytes_on_wire: 1_000_000_000,
            ..Learn::default()
        };
        let mut c = CpuCosts::default();
        c.learn(&drain(2.0));
        // 7 core-s per GB against 3 learnt: a tenth of the way.
        c.learn(&drain(6.0));
        assert!((c.0["tcp"].source_s_per_gb - 2.4).abs() < 1e-9, "{c:?}");
        // 1.2 against 3.4: the same.
        c.learn(&drain(0.2));
        assert!((c.0["tcp"].source_s_per_gb - 2.18).abs() < 1e-9, "{c:?}");
        // Within half as much again: 0.3 of the way.
        c.learn(&drain(3.18));
        assert!((c.0["tcp"].source_s_per_gb - 2.48).abs() < 1e-9, "{c:?}");
        assert_eq!(cost_weight(1.0, 0.0), LEARN_WEIGHT, "nothing learnt yet");
        // Each side is judged apart: a destination at three times what it cost (and a
        // source as before) moves the destination's a tenth of the way, the source's 0.3.
        let mut c = CpuCosts::default();
        let both = |source_s: f64, destination_s: f64| Learn {
            destination_s,
            ..drain(source_s)
        };
        c.learn(&both(2.0, 1.0));
        c.learn(&both(2.2, 3.0));
        let t = &c.0["tcp"];
        assert!((t.source_s_per_gb - 2.06).abs() < 1e-9, "{t:?}");
        assert!((t.destination_s_per_gb - 1.2).abs() < 1e-9, "{t:?}");
    }

    /// A tcp drain of 1 GB at `--concurrency n` that cost `source_s` core-seconds on the
    /// source and 1 on the destination.
    fn drain(n: u16, source_s: f64) -> Learn {
        Learn {
            transport: "tcp".into(),
            source_s,
            destination_s: 1.0,
            bytes_on_wire: 1_000_000_000,
            concurrency: Some(n),
            ..Learn::default()
        }
    }

    #[test]
    fn each_concurrency_learns_what_it_costs_against_the_rest() {
        let mut c = CpuCosts::default();
        // The first drain sets the costs, at its level.
        c.learn(&drain(2, 3.0));
        assert_eq!(c.0["tcp"].cost_ratio_at.get(&2), Some(&1.0));
        // One at a time: 3 core-s per GB against 4 learnt. Its level's ratio is learnt
        // first, so what the levels share stays at 4.
        c.learn(&drain(1, 2.0));
        let t = &c.0["tcp"];
        assert!((t.cost_ratio_at(Some(1)) - 0.75).abs() < 1e-9, "{t:?}");
        let base = t.source_s_per_gb + t.destination_s_per_gb;
        assert!((base - 4.0).abs() < 1e-9, "{t:?}");
        assert!(
            (t.cost_ratio_at(Some(4)) - 1.0).abs() < 1e-9,
            "no drain at 4: at 2's"
        );
        assert_eq!(t.cost_ratio_at(None), 1.0, "auto");
        // Again at 1, 2.5 core-s per GB: 0.3 of the way from 0.75 to 2.5 against 4.
        c.learn(&drain(1, 1.5));
        let want = 0.75 + LEARN_WEIGHT * (2.5 / 4.0 - 0.75);
        let got = c.0["tcp"].cost_ratio_at(Some(1));
        assert!((got - want).abs() < 1e-9, "{got} against {want}");
        // A ratio past the believable is taken at its bound.
        c.learn(&drain(8, 40.0));
        assert_eq!(c.0["tcp"].cost_ratio_at(Some(8)), MAX_RATIO);
    }

    /// Drains at every level whose migrations cost the same per byte on the wire and per
    /// byte landed learn a ratio of 1 at each, however their pages went: one whose pages went
    /// mostly as references is not taken as a dearer level, one of whole pages as a cheaper.
    #[test]
    fn a_level_is_priced_against_what_its_migrations_bytes_cost() {
        // Source: 1 core-s per GB on the wire, 2 per GB landed; destination: 3 per GB landed.
        // Each migration as (MB on the wire, GB landed).
        let drain = |n: u16, ms: &[(u32, f64)]| {
            let migrations: Vec<MigrationCpu> = ms
                .iter()
                .map(|&(mb, r)| {
                    let w = f64::from(mb) / 1e3;
                    MigrationCpu {
                        wire_gb: w,
                        landed_gb: r,
                        source_s: w + 2.0 * r,
                        destination_s: 3.0 * r,
                        ..MigrationCpu::default()
                    }
                })
                .collect();
            Learn {
                transport: "compressed+cache".into(),
                source_s: migrations.iter().map(|c| c.source_s).sum(),
                destination_s: migrations.iter().map(|c| c.destination_s).sum(),
                bytes_on_wire: ms.iter().map(|&(mb, _)| u64::from(mb)).sum::<u64>() * 1_000_000,
                concurrency: Some(n),
                migrations,
                ..Learn::default()
            }
        };
        let mut c = CpuCosts::default();
        // One at a time over one image: the first VM's pages whole, the others' references.
        c.learn(&drain(
            1,
            &[(1000, 1.0), (100, 1.0), (200, 1.0), (100, 0.8)],
        ));
        // Four at once: only the references went compressed (the rest raw, not taught).
        c.learn(&drain(4, &[(100, 1.0), (50, 0.6)]));
        // Two at once: whole pages.
        c.learn(&drain(2, &[(1000, 1.0), (600, 0.6)]));
        let t = &c.0["compressed+cache"];
        for n in [1, 2, 4] {
            let r = t.cost_ratio_at(Some(n));
            assert!((r - 1.0).abs() < 0.02, "at {n}: {r}: {t:?}");
        }
    }

    #[test]
    fn a_level_no_drain_ran_at_costs_what_its_neighbours_show() {
        let at = BTreeMap::from([(1, 0.8), (2, 0.7), (4, 0.9)]);
        let close = |n: usize, want: f64| {
            let got = level_ratio(&at, n);
            assert!((got - want).abs() < 1e-9, "at {n}: {got} against {want}");
        };
        close(1, 0.8);
        close(2, 0.7);
        close(3, 0.8);
        close(4, 0.9);
        close(16, 0.9);
        close(0, 0.8);
        close(usize::MAX, 0.9);
        assert_eq!(level_ratio(&BTreeMap::new(), 3), 1.0);
        // A ratio that is not a cost (from a file) is passed over.
        let odd = BTreeMap::from([(1, f64::NAN), (2, 0.7), (4, -1.0)]);
        assert!((level_ratio(&odd, 3) - 0.7).abs() < 1e-9);
        assert!((level_ratio(&odd, 1) - 0.7).abs() < 1e-9);
    }

    /// Drains at one level after another do not move what the others are predicted to
    /// cost: each teaches the costs over all levels at its own level's ratio.
    #[test]
    fn drains_at_a_busy_level_leave_what_one_at_a_time_costs() {
        let predicted = |c: &CpuCosts, n: usize| {
            let t = &c.0["tcp"];
            (t.source_s_per_gb + t.destination_s_per_gb) * t.cost_ratio_at(Some(n))
        };
        let mut c = CpuCosts::default();
        // 4 core-s per GB at two at once, 3 at one, then 6 at four, five times.
        c.learn(&drain(2, 3.0));
        c.learn(&drain(1, 2.0));
        for _ in 0..5 {
            c.learn(&drain(4, 5.0));
        }
        let (one, four) = (predicted(&c, 1), predicted(&c, 4));
        assert!((one - 3.0).abs() < 0.15, "one at a time: {one} against 3");
        assert!((four - 6.0).abs() < 0.3, "four at once: {four} against 6");
    }

    /// A drain that chose its concurrency teaches at the ratio of the most it ran at once.
    #[test]
    fn an_auto_drain_teaches_at_its_peak_levels_ratio() {
        let mut c = CpuCosts::default();
        let drain = |concurrency: Option<u16>, peak: Option<u16>, source_s: f64| Learn {
            transport: "tcp".into(),
            source_s,
            destination_s: 0.0,
            bytes_on_wire: 1_000_000_000,
            concurrency,
            peak_concurrency: peak,
            ..Learn::default()
        };
        c.learn(&drain(None, None, 4.0));
        c.learn(&drain(Some(4), Some(4), 8.0));
        let (base, ratio) = (
            c.0["tcp"].source_s_per_gb,
            c.0["tcp"].cost_ratio_at(Some(4)),
        );
        assert!((ratio - 2.0).abs() < 1e-9, "{ratio}");
        // An auto drain that reached four at once and cost what four do teaches nothing new.
        c.learn(&drain(None, Some(4), base * ratio));
        let t = &c.0["tcp"];
        assert!((t.source_s_per_gb - base).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn a_migrations_cpu_splits_between_its_wire_bytes_and_the_ram_it_lands() {
        // Source: 1 core-s per GB on the wire and 2 per GB landed; destination: 3 per GB
        // landed only. The VMM threads took 1.5 times the migrations' own CPU on the
        // source, as much on the destination.
        let m = |w: f64, r: f64| MigrationCpu {
            wire_gb: w,
            landed_gb: r,
            source_s: w + 2.0 * r,
            destination_s: 3.0 * r,
            ..MigrationCpu::default()
        };
        let drain = vec![m(0.5, 1.0), m(0.1, 1.0), m(1.0, 1.0), m(0.2, 0.4)];
        let own = |f: fn(&MigrationCpu) -> f64| drain.iter().map(f).sum::<f64>();
        let lesson = Learn {
            transport: "tcp+cache".into(),
            source_s: 1.5 * own(|c| c.source_s),
            destination_s: own(|c| c.destination_s),
            bytes_on_wire: 1_800_000_000,
            migrations: drain.clone(),
            ..Learn::default()
        };
        let mut c = CpuCosts::default();
        c.learn(&lesson);
        let fit = c.0["tcp+cache"].fit.clone().unwrap();
        let [(a, b, c), (a2, b2, c2)] = fit.per_gb().unwrap();
        assert!((a - 1.5).abs() < 1e-9 && (b - 3.0).abs() < 1e-9, "{a} {b}");
        assert!(a2.abs() < 1e-9 && (b2 - 3.0).abs() < 1e-9, "{a2} {b2}");
        assert!(c == 0.0 && c2 == 0.0, "nothing compressed: {c} {c2}");
        // Every page on the wire whole: the two cannot be told apart, the wire takes it all
        // (the VMM threads' CPU unknown: the migrations' own).
        let mut whole = CostFit::default();
        whole.learn(LEARN_WEIGHT, &[m(1.0, 1.0), m(2.0, 2.0)], [0.0; 2], true);
        let [(a, b, _), _] = whole.per_gb().unwrap();
        assert!((a - 3.0).abs() < 1e-9 && b == 0.0, "{a} {b}");
        // Nothing sane: nothing learnt.
        let mut none = CostFit::default();
        none.learn(
            LEARN_WEIGHT,
            &[m(f64::NAN, 1.0), m(0.0, 1.0)],
            [1.0; 2],
            true,
        );
        assert_eq!(none.per_gb(), None);
    }

    #[test]
    fn a_compressed_page_costs_its_codec_whatever_it_saves_on_the_wire() {
        // As a one-image drain showed them: the page cache's filler compresses most of its
        // pages, followers send theirs as references and compress the rest, others go raw.
        // Source: 0.5 core-s per GB on the wire, 1 per GB landed, 5 per GB compressed;
        // destination: 1 per GB on the wire, 0.5 per GB landed, 1 per GB compressed.
        let m = |w: f64, r: f64, c: f64| MigrationCpu {
            wire_gb: w,
            landed_gb: r,
            compressed_gb: c,
            source_s: 0.5 * w + r + 5.0 * c,
            destination_s: w + 0.5 * r + c,
        };
        let drain = [
            m(0.40, 0.77, 0.69),
            m(0.14, 0.58, 0.24),
            m(0.24, 0.53, 0.0),
            m(0.10, 0.35, 0.16),
            m(0.18, 0.50, 0.0),
            m(0.10, 0.36, 0.16),
        ];
        let mut fit = CostFit::default();
        fit.learn(LEARN_WEIGHT, &drain, [0.0; 2], true);
        let [(a, b, c), (a2, b2, c2)] = fit.per_gb().unwrap();
        let close = |x: f64, y: f64| (x - y).abs() < 1e-6;
        assert!(
            close(a, 0.5) && close(b, 1.0) && close(c, 5.0),
            "{a} {b} {c}"
        );
        assert!(
            close(a2, 1.0) && close(b2, 0.5) && close(c2, 1.0),
            "{a2} {b2} {c2}"
        );
        // Without the pages compressed, the follower costs less than half what it does.
        let mut blind = CostFit::default();
        let no_c: Vec<MigrationCpu> = drain
            .iter()
            .map(|m| MigrationCpu {
                compressed_gb: 0.0,
                ..*m
            })
            .collect();
        blind.learn(LEARN_WEIGHT, &no_c, [0.0; 2], true);
        let [(a, b, _), _] = blind.per_gb().unwrap();
        let follower = drain[1];
        assert!(a * follower.wire_gb + b * follower.landed_gb < 0.8 * follower.source_s);
        // A fit learnt before the pages compressed were counted reads as the two-way one,
        // and starts again from the first drain that counts them.
        let mut old: CostFit = serde_json::from_str(
            r#"{"ww":1.0,"wr":1.0,"rr":2.0,"wy":[1.0,1.0],"ry":[3.0,1.0],"scale":[2.0,2.0]}"#,
        )
        .unwrap();
        let [(a, b, c), _] = old.per_gb().unwrap();
        assert!(close(a, 0.0) && close(b, 3.0) && c == 0.0, "{a} {b} {c}");
        old.learn(0.3, &drain, [0.0; 2], false);
        assert_eq!(old.per_gb(), fit.per_gb());
    }

    #[test]
    fn a_fit_never_prices_a_byte_below_nothing() {
        // Cost falls as the RAM landed grows: no negative price for it, the wire takes it.
        let m = |w: f64, r: f64, y: f64| MigrationCpu {
            wire_gb: w,
            landed_gb: r,
            source_s: y,
            destination_s: y,
            ..MigrationCpu::default()
        };
        let mut fit = CostFit::default();
        fit.learn(
            LEARN_WEIGHT,
            &[m(1.0, 0.1, 2.0), m(1.0, 2.0, 1.0), m(2.0, 1.0, 3.0)],
            [0.0; 2],
            true,
        );
        for (a, b, c) in fit.per_gb().unwrap() {
            assert!(a > 0.0 && b == 0.0 && c == 0.0, "{a} {b} {c}");
        }
    }

    #[test]
    fn costs_are_learned_from_big_migrations_only_and_survive_a_restart() {
        let mut c = CpuCosts::default();
        let drain = |transport: &str, source_s: f64, wire: u64, ratio: Option<f64>| Learn {
            transport: transport.into(),
            source_s,
            destination_s: 1.0,
            bytes_on_wire: wire,
            dirty_rate_ratio: ratio,
            concurrency: Some(1),
            peak_concurrency: Some(1),
            busy_workers: ratio.map(|r| r * 4.0),
            workers_per_share: ratio.map(|r| r * 8.0),
            setup_s: ratio.map(|r| r * 200.0),
            verify_s_per_gb: ratio,
            migrations: Vec::new(),
        };
        c.learn(&drain("tcp", 3.0, 1_000_000_000, None));
        c.learn(&drain("tcp", 4.0, 1_000_000_000, Some(0.5)));
        c.learn(&drain("tcp", 4.0, 1_000_000_000, Some(f64::NAN)));
        c.learn(&drain("tcp", 4.0, 1_000_000_000, Some(0.25)));
        let tcp = c.0["tcp"].clone();
        // 4 + 1 core-s per GB at one at a time, after a first drain at 3 + 1: what is
        // predicted at that level comes within 2% of it.
        let at_one = (tcp.source_s_per_gb + tcp.destination_s_per_gb) * tcp.cost_ratio_at(Some(1));
        assert!((at_one - 5.0).abs() < 0.1, "{at_one}: {tcp:?}");
        assert_eq!(tcp.drains, 4);
        // The ratio from the drains that showed one: 0.5, then 0.3 of the way to 0.25.
        assert!(
            (tcp.dirty_rate_ratio.unwrap() - 0.425).abs() < 1e-9,
            "{tcp:?}"
        );
        assert!((tcp.busy_workers.unwrap() - 1.7).abs() < 1e-9, "{tcp:?}");
        assert!(
            (tcp.workers_per_share.unwrap() - 3.4).abs() < 1e-9,
            "{tcp:?}"
        );
        // A setup past a minute is not believed: 100 s is taken as 60, then 0.3 of the way
        // to 50.
        assert!((tcp.setup_s.unwrap() - 57.0).abs() < 1e-9, "{tcp:?}");
        assert!(
            (tcp.verify_s_per_gb.unwrap() - 0.425).abs() < 1e-9,
            "{tcp:?}"
        );
        // Each level apart: at 1 as above; at 4 only its own drain.
        assert_eq!(tcp.dirty_rate_ratio_at[&1], tcp.dirty_rate_ratio.unwrap());
        c.learn(&Learn {
            concurrency: Some(4),
            ..drain("tcp", 4.0, 1_000_000_000, Some(0.2))
        });
        let tcp = &c.0["tcp"];
        assert_eq!(tcp.dirty_rate_ratio_at[&4], 0.2);
        assert!(
            (tcp.dirty_rate_ratio_at[&1] - 0.425).abs() < 1e-9,
            "{tcp:?}"
        );
        assert_eq!(tcp.dirty_ratio_at(Some(4)), Some(0.2));
        assert_eq!(
            tcp.dirty_ratio_at(Some(2)),
            tcp.dirty_rate_ratio,
            "not seen: all"
        );
        assert_eq!(tcp.dirty_ratio_at(None), tcp.dirty_rate_ratio);
        // A drain that names too many levels is remembered only by the first 16.
        for n in 0..100 {
            c.learn(&Learn {
                concurrency: Some(100 + n),
                ..drain("web", 1.0, 1_000_000_000, Some(0.5))
            });
        }
        assert_eq!(c.0["web"].dirty_rate_ratio_at.len(), MAX_LEVELS);
        c.learn(&drain("direct", 1.0, 1 << 20, Some(0.5)));
        c.learn(&drain("direct", f64::NAN, 1 << 30, Some(0.5)));
        assert!(!c.0.contains_key("direct"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cpu-costs.json");
        c.save(&p).unwrap();
        assert_eq!(CpuCosts::load(&p), c);
        std::fs::write(&p, b"not json").unwrap();
        assert_eq!(CpuCosts::load(&p), CpuCosts::default());
    }
}
