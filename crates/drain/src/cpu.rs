//! The drain and the hosts' CPU: what the guests and the migrations take of each host's
//! cores (hosts that run on one kernel share them: one pool), and `--reserve-cpu`, which
//! keeps the migrations under their share by lowering the drain's bandwidth budget when they
//! take more and raising it when they take less. The policy ([`shares`], [`Governor`]) is
//! pure; [`Meter`] reads the agents.
use host::cpu::{CpuCost, CpuCosts, CpuUsage};

use std::collections::BTreeMap;

use crate::cores::Load;
use crate::plan::{CpuModel, PlanCpu};
use crate::window::MEASURE_S;
use host::HostClient;
use serde::Serialize;

/// Shares of a pool's cores over an interval, 0..1 each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Shares {
    /// Everything busy on the pool's kernel.
    pub busy: f64,
    /// The guests' vCPU threads, on every host of the pool.
    pub guests: f64,
    /// The VM processes' other threads: migrations in and out, devices.
    pub vmm: f64,
    /// How many guest vCPUs were runnable on average (not a share): what a migration's
    /// threads compete with for the cores.
    #[serde(default)]
    pub guests_runnable: f64,
}

/// The shares between two readings of the same hosts (one pool: one kernel, so its busy time
/// is counted once). None when the readings are not comparable (another kernel, a restarted
/// agent, no time between them).
pub fn shares(before: &[CpuUsage], after: &[CpuUsage]) -> Option<Shares> {
    let (b0, a0) = (before.first()?, after.first()?);
    if before.len() != after.len()
        || before
            .iter()
            .zip(after)
            .any(|(b, a)| b.boot_id != b0.boot_id || a.boot_id != b0.boot_id)
    {
        return None;
    }
    let secs = a0.at_ms.checked_sub(b0.at_ms)? as f64 / 1e3;
    let cores = a0.cores.max(1) as f64;
    if secs <= 0.0 {
        return None;
    }
    let sum = |f: fn(&CpuUsage) -> f64| {
        before
            .iter()
            .zip(after)
            .map(|(b, a)| (f(a) - f(b)).max(0.0))
            .sum::<f64>()
    };
    let share = |core_s: f64| (core_s / secs / cores).clamp(0.0, 1.0);
    Some(Shares {
        busy: share((a0.busy_s - b0.busy_s).max(0.0)),
        guests: share(sum(|u| u.guests_s)),
        vmm: share(sum(|u| u.vmm_s)),
        guests_runnable: sum(|u| u.guests_runnable_s) / secs,
    })
}

/// The hosts' indexes grouped by kernel: each group is one pool of cores.
pub fn pools(readings: &[CpuUsage]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, r) in readings.iter().enumerate() {
        match out
            .iter_mut()
            .find(|p| !r.boot_id.is_empty() && readings[p[0]].boot_id == r.boot_id)
        {
            Some(p) => p.push(i),
            None => out.push(vec![i]),
        }
    }
    out
}

/// What a cost key ([`crate::run::cost_key`]) ends with when the drain keeps page caches.
pub const CACHE_SUFFIX: &str = "+cache";

/// What the host learnt of drains of kind `key`; before any, of drains by the same
/// transport with page caches where this one has none, or the other way round: a
/// migration's CPU splits between its bytes on the wire and the RAM it lands, and that fit
/// holds either way (a page that goes as a reference costs a page's work for a few bytes).
/// A transport never drained is not guessed at.
pub fn learnt<'c>(costs: &'c CpuCosts, key: &str) -> Option<&'c CpuCost> {
    costs
        .0
        .get(key)
        .or_else(|| costs.0.get(&other_caching(key)))
}

/// `key` with page caches where it has none, and without them where it has.
fn other_caching(key: &str) -> String {
    key.strip_suffix(CACHE_SUFFIX)
        .map_or_else(|| format!("{key}{CACHE_SUFFIX}"), str::to_string)
}

/// What a migration by `transport` costs a pool, core-seconds per byte on the wire: the
/// source's side, the destination's, or both when one pool runs both. From what the source
/// learnt of its own migrations; None before it has moved one that way.
pub fn cost_per_byte(costs: Option<&CpuCost>, source: bool, destination: bool) -> Option<f64> {
    let c = costs?;
    let s = if source { c.source_s_per_gb } else { 0.0 }
        + if destination {
            c.destination_s_per_gb
        } else {
            0.0
        };
    (s > 0.0).then_some(s / 1e9)
}

/// The model never leaves the migrations less than this share of a pool's cores.
const MIN_FREE: f64 = 0.05;

/// Reads the hosts' CPU (and re-checks the migrations' share) this often.
pub const READ_EVERY_MS: u64 = 250;
/// The budget never falls below this (bits/s): a migration must keep moving.
pub const MIN_BUDGET: f64 = 8e6;

/// `--reserve-cpu PCT`: the migrations (the VMM threads, which are theirs while they run) may
/// take at most 100 − PCT % of each pool's cores. Feedback on the drain's budget, which the
/// run splits between the migrations as it splits `--max-bandwidth`.
#[derive(Clone, Debug, Serialize)]
pub struct Governor {
    /// Share of the cores the migrations may take, 0..1.
    pub cap: f64,
    /// The drain's budget now, bits/s.
    pub budget: f64,
    /// No higher than this: the links' or `--max-bandwidth`'s, bits/s.
    pub ceiling: f64,
    /// How often the budget went down, and up.
    pub lowered: u32,
    pub raised: u32,
    /// The lowest budget it set, bits/s.
    pub lowest: f64,
}

impl Governor {
    /// A governor leaving `reserve` (0..1) of the cores to the guests. Its first budget is
    /// what the cap pays for at `cost` core-seconds per byte, when the source knows it.
    pub fn new(reserve: f64, cores: usize, cost: Option<f64>, ceiling: f64) -> Self {
        let cap = (1.0 - reserve).clamp(0.0, 1.0);
        let ceiling = ceiling.max(MIN_BUDGET);
        let first = cost.map_or(ceiling, |c| cap * cores as f64 / c * 8.0);
        let budget = first.clamp(MIN_BUDGET, ceiling);
        Governor {
            cap,
            budget,
            ceiling,
            lowered: 0,
            raised: 0,
            lowest: budget,
        }
    }

    /// The migrations took `took` of the cores over the last interval (the VMM threads'
    /// share less theirs before the drain); returns the new budget when it changed.
    pub fn observe(&mut self, took: f64) -> Option<f64> {
        let took = took.max(0.0);
        let next = if took > self.cap {
            // Over: down in proportion, by a fifth at least and by half at most.
            self.budget * (self.cap / took).clamp(0.5, 0.8)
        } else if took < 0.8 * self.cap && self.budget < self.ceiling {
            let room = if took > 0.0 { self.cap / took } else { 1.25 };
            self.budget * room.clamp(1.0, 1.25)
        } else {
            return None;
        };
        let next = next.clamp(MIN_BUDGET, self.ceiling);
        if (next - self.budget).abs() < 1.0 {
            return None;
        }
        if next < self.budget {
            self.lowered += 1;
        } else {
            self.raised += 1;
        }
        self.budget = next;
        self.lowest = self.lowest.min(next);
        Some(next)
    }
}

/// The host-wide codec policy over time: each change [`codec_step`] asks for is judged by
/// what the drain then moves (guest RAM per second), and undone when it moved less (the
/// seed's saw-tooth, measured rather than assumed). The drain's rate jumps whenever a
/// migration starts or ends, so a change is made and judged only while the same migrations
/// move. It decides and judges on means since the drain last changed ([`Span`]), not on one
/// reading: a dip in one would make the link look free or a change look paid. Pure: the run
/// feeds it what it reads ([`CodecSample`]) and says what it made of each step.
#[derive(Clone, Debug, Default)]
pub struct CodecTuner {
    /// The change under judgement.
    pending: Option<Pending>,
    /// No change before this.
    quiet_until: f64,
    /// The last change judged was a migration held raw, and it paid: migrations that start
    /// now start raw.
    raw_pays: bool,
    /// The migrations moving, and since when: no change until their rate has settled, or
    /// it would be judged against a start or an end.
    moving: Vec<u64>,
    moving_since: f64,
    /// The readings since the drain last changed.
    span: Span,
    /// When it was last asked.
    now: f64,
}

/// A codec change under judgement.
#[derive(Clone, Copy, Debug)]
struct Pending {
    at: f64,
    step: CodecStep,
    /// The drain's mean guest RAM per second before it.
    before: f64,
}

/// Means of the readings since the drain last changed (a migration started or ended, a
/// codec changed), leaving out the first [`MEASURE_S`]: their rates still measure the drain
/// before the change.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    since: f64,
    readings: u32,
    busy: f64,
    link: f64,
    rate: f64,
}

impl Span {
    fn restart(&mut self, now: f64) {
        *self = Span {
            since: now,
            ..Span::default()
        };
    }

    fn add(&mut self, at: &CodecSample) {
        if at.now - self.since < MEASURE_S {
            return;
        }
        self.readings += 1;
        self.busy += at.busy;
        self.link += at.link;
        self.rate += at.rate;
    }

    /// (busy, link, rate) means; None before any reading counts.
    fn means(&self) -> Option<(f64, f64, f64)> {
        let n = f64::from(self.readings);
        (self.readings > 0).then(|| (self.busy / n, self.link / n, self.rate / n))
    }
}

/// What the codec policy reads at one moment of a compressed drain.
#[derive(Clone, Debug)]
pub struct CodecSample<'a> {
    /// Seconds since the drain began.
    pub now: f64,
    /// The busiest pool's share of its cores in use.
    pub busy: f64,
    /// The share of the links the drain fills.
    pub link: f64,
    /// Guest RAM moving, bytes/s.
    pub rate: f64,
    /// The most it could move with one more migration raw ([`raw_ceiling`]).
    pub raw_ceiling: f64,
    /// Guest RAM per second the plan expects of the migrations moving (∞: it does not say).
    pub planned: f64,
    /// The migrations moving (any stable id each).
    pub moving: &'a [u64],
    /// The least time, seconds, any of them has left at its pace: a change that could not
    /// be judged before one ends is not made.
    pub least_left: f64,
}

impl CodecTuner {
    /// The change to make now, if any, and why. The caller makes it to one migration and
    /// says so ([`Self::made`]), or says it could not ([`Self::not_made`]).
    pub fn decide(&mut self, at: &CodecSample) -> Option<(CodecStep, &'static str)> {
        self.now = at.now;
        if self.moving != at.moving {
            self.moving = at.moving.to_vec();
            self.moving_since = at.now;
            self.span.restart(at.now);
            // A hold under judgement cannot be judged any more: the operator's codec.
            if let Some(p) = self.pending.take() {
                if p.step == CodecStep::HoldRaw {
                    return Some((CodecStep::Release, SET_CHANGED));
                }
            }
        }
        self.span.add(at);
        if at.now - self.moving_since < CODEC_JUDGE_S {
            return None;
        }
        if let Some(p) = self.pending {
            if at.now - p.at < CODEC_JUDGE_S {
                return None;
            }
            self.pending = None;
            let after = self.span.means().map_or(0.0, |m| m.2);
            // Sending raw gives up the operator's codec: it stays only when it moved more.
            let paid = match p.step {
                CodecStep::HoldRaw => after >= p.before * RAW_GAIN,
                _ => after >= p.before * CODEC_KEEP,
            };
            self.raw_pays = (p.step == CodecStep::HoldRaw) == paid;
            if !paid {
                self.quiet_until = at.now + CODEC_BACKOFF_S;
                let undo = match p.step {
                    CodecStep::HoldRaw => CodecStep::Release,
                    _ => CodecStep::HoldRaw,
                };
                return Some((undo, NOT_PAID));
            }
        }
        if at.now < self.quiet_until || at.least_left < CODEC_JUDGE_S {
            return None;
        }
        let (busy, link, rate) = self.span.means()?;
        let (step, why) = codec_step(busy, link);
        if step == CodecStep::Keep || step == CodecStep::HoldRaw && !raw_may_pay(at, rate) {
            return None;
        }
        self.pending = Some(Pending {
            at: at.now,
            step,
            before: rate,
        });
        Some((step, why))
    }

    /// The step it asked for was made: the drain changed.
    pub fn made(&mut self) {
        self.span.restart(self.now);
    }

    /// The change it asked for could not be made (no migration to change): nothing to judge.
    pub fn not_made(&mut self) {
        self.pending = None;
    }

    /// Whether migrations that start now should go raw: sending raw is what paid last.
    pub fn raw_pays(&self) -> bool {
        self.raw_pays
    }
}

/// Whether holding one more migration raw may move more than the drain's `rate` does: the
/// links carry more than compression moves, and the drain has fallen behind its plan. The
/// plan priced each codec with the cores in view, so cores full and a link not full is
/// what it chose while the drain moves what it expected.
fn raw_may_pay(at: &CodecSample, rate: f64) -> bool {
    at.raw_ceiling >= rate * RAW_GAIN && rate < at.planned * ON_PLAN
}

/// Why a change is undone: it did not move more, or the migrations it was judged over changed.
pub const NOT_PAID: &str = "did not pay";
pub const SET_CHANGED: &str = "migrations changed";

/// Whether a step [`CodecTuner::decide`] gave for `why` undoes the change under judgement
/// (and so applies to the migration that change was made to).
pub fn undoes(why: &str) -> bool {
    why == NOT_PAID || why == SET_CHANGED
}

/// The most guest RAM per second a drain over links that carry `links` bytes/s could move
/// with one more of its `moving` migrations raw, `held` of them raw already: once none
/// compresses, what the links carry. While others still compress, the cores a raw one frees
/// may speed them up: no bound (∞).
pub fn raw_ceiling(links: f64, moving: usize, held: usize) -> f64 {
    if moving == held + 1 {
        links
    } else {
        f64::INFINITY
    }
}

/// What the host-wide codec policy does next with a compressed drain's migrations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum CodecStep {
    /// One more migration sends raw: the cores, not the link, hold the drain back.
    HoldRaw,
    /// One migration held raw compresses again: the link is full, or the cores have room.
    Release,
    Keep,
}

/// Above this share of its cores busy, a pool has none to spare for compression.
pub const CPU_BOUND_BUSY: f64 = 0.90;
/// ... unless the link is this full: then compression is what the drain needs.
pub const LINK_FULL: f64 = 0.90;
/// Below this share busy, the cores have room for compression again.
pub const CPU_ROOM: f64 = 0.75;
/// Below this share of the link in use, with the cores busy, the drain is CPU-bound.
pub const LINK_SLACK: f64 = 0.75;
/// After a change, the codec policy measures the drain this long before it judges it; it
/// makes none this long after the drain's migrations start moving.
pub const CODEC_JUDGE_S: f64 = 1.5;
/// Compressing again is undone when the drain then moves less guest RAM per second than
/// this share of before.
pub const CODEC_KEEP: f64 = 0.97;
/// Holding a migration raw is undone unless the drain then moves this much more guest RAM
/// per second than before: within the noise, the operator's codec stays.
pub const RAW_GAIN: f64 = 1.10;
/// After undoing a change, the codec policy waits this long before the next.
pub const CODEC_BACKOFF_S: f64 = 5.0;
/// A drain moving this share of the guest RAM per second its plan expected, or more, is on
/// plan (the model's own tolerance): the codec policy holds none of it raw.
pub const ON_PLAN: f64 = 0.90;

/// The host-wide codec policy (the seed's "Live Migration will switch to TCP/IP if
/// compression is contending for resources"): `busy` is the busiest pool's share of its
/// cores in use, `link` the share of the links the drain fills. Compression trades cores for
/// link bytes, so it backs off while the cores are full and the link is not, and comes back
/// when the link is full or the cores free up. With the reason, for the report.
pub fn codec_step(busy: f64, link: f64) -> (CodecStep, &'static str) {
    if link >= LINK_FULL {
        (CodecStep::Release, "link full")
    } else if busy >= CPU_BOUND_BUSY && link < LINK_SLACK {
        (CodecStep::HoldRaw, "cores full, link not")
    } else if busy < CPU_ROOM {
        (CodecStep::Release, "cores have room")
    } else {
        (CodecStep::Keep, "")
    }
}

/// A migration of a compressed drain, as the codec policy picks among them.
#[derive(Clone, Copy, Debug)]
pub struct CodecCandidate {
    /// Past its switchover: nothing left to change.
    pub switched: bool,
    /// It goes by plain tcp: no codec to hold or release, though it moves beside the others.
    pub by_tcp: bool,
    pub held_raw: bool,
    /// The plan sent it raw.
    pub planned_raw: bool,
    /// Its sample's compressed size over its pages' (1: incompressible).
    pub ratio: f64,
}

/// Which migration `step` changes: the least compressible moving one to hold, the most
/// compressible held one to release, the plan's raw ones last. One the plan sent raw is
/// released only while others move beside it: alone, it fills its link as the plan
/// expected when it priced it both ways ("link full" is no news), and compressing it only
/// takes cores; beside others, the link it frees is theirs.
pub fn pick(step: CodecStep, migrations: &[CodecCandidate]) -> Option<usize> {
    let moving = migrations.iter().enumerate().filter(|(_, m)| !m.switched);
    let alone = moving.clone().count() < 2;
    let moving = moving.filter(|(_, m)| !m.by_tcp);
    match step {
        CodecStep::HoldRaw => moving
            .filter(|(_, m)| !m.held_raw)
            .max_by(|a, b| a.1.ratio.total_cmp(&b.1.ratio)),
        CodecStep::Release => moving
            .filter(|(_, m)| m.held_raw && !(m.planned_raw && alone))
            .min_by(|a, b| {
                (a.1.planned_raw.cmp(&b.1.planned_raw)).then(a.1.ratio.total_cmp(&b.1.ratio))
            }),
        CodecStep::Keep => None,
    }
    .map(|(i, _)| i)
}

/// What the codec policy did in a drain.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CodecReport {
    /// Times a migration was held raw, and released, by reason.
    pub held_raw: std::collections::BTreeMap<String, u32>,
    pub released: std::collections::BTreeMap<String, u32>,
    /// The most migrations held raw at once.
    pub most_held: usize,
}

/// One pool's CPU through the drain, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct PoolReport {
    pub hosts: Vec<String>,
    pub cores: usize,
    /// During the survey, before any migration.
    pub before: Shares,
    /// From the first migration's start to the last switchover.
    pub during: Shares,
}

/// The drain's CPU, in its report.
#[derive(Clone, Debug, Serialize)]
pub struct CpuReport {
    pub pools: Vec<PoolReport>,
    /// `--reserve-cpu`, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserve_cpu_pct: Option<f64>,
    /// What `--reserve-cpu` did to the budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub governor: Option<Governor>,
    /// What the host-wide codec policy did (compressed drains).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec: Option<CodecReport>,
}

impl CpuReport {
    /// For the drain's summary: per pool, the guests' and the VMM's share before and during.
    pub fn line(&self) -> String {
        let pct = |x: f64| x * 100.0;
        let mut s = String::new();
        for p in &self.pools {
            s += &format!(
                "
cpu of {} ({} cores): guests {:.0}% before, {:.0}% during; VMM threads {:.0}% before, {:.0}% during",
                p.hosts.join("+"),
                p.cores,
                pct(p.before.guests),
                pct(p.during.guests),
                pct(p.before.vmm),
                pct(p.during.vmm)
            );
        }
        if let (Some(r), Some(g)) = (self.reserve_cpu_pct, &self.governor) {
            s += &format!(
                "
--reserve-cpu {r:.0}%: budget lowered {} times, raised {}, lowest {:.0} Mbit/s",
                g.lowered,
                g.raised,
                g.lowest / 1e6
            );
        }
        if let Some(c) = &self.codec {
            let list = |m: &std::collections::BTreeMap<String, u32>| {
                let v: Vec<String> = m.iter().map(|(k, n)| format!("{n} ({k})")).collect();
                if v.is_empty() {
                    "0".to_string()
                } else {
                    v.join(", ")
                }
            };
            s += &format!(
                "\ncodec: migrations held raw {}, released {}; at most {} at once",
                list(&c.held_raw),
                list(&c.released),
                c.most_held
            );
        }
        s
    }
}

/// Readings of the drain's hosts (the source first, then the destinations this process
/// reaches), grouped into pools.
pub struct Meter {
    names: Vec<String>,
    clients: Vec<HostClient>,
    /// Per destination of the drain, its host's index here (None: not reached from here).
    dest_at: Vec<Option<usize>>,
    pools: Vec<Vec<usize>>,
    /// At the survey's start, its end, and the latest.
    first: Vec<CpuUsage>,
    start: Option<Vec<CpuUsage>>,
    last: Vec<CpuUsage>,
}

impl Meter {
    /// Reads the source and every destination it is given a client of, once; None when one
    /// of them does not answer (an older agent).
    pub fn start(
        source: (String, HostClient),
        dests: Vec<(String, Option<HostClient>)>,
    ) -> Option<Self> {
        let (mut names, mut clients) = (vec![source.0], vec![source.1]);
        let dest_at = dests
            .into_iter()
            .map(|(name, client)| {
                let c = client?;
                names.push(name);
                clients.push(c);
                Some(clients.len() - 1)
            })
            .collect();
        let first = read(&clients)?;
        Some(Meter {
            pools: pools(&first),
            names,
            clients,
            dest_at,
            last: first.clone(),
            first,
            start: None,
        })
    }

    /// The source's reading: its cores and what it learnt.
    pub fn source(&self) -> &CpuUsage {
        &self.first[0]
    }

    /// The pools as (host indexes), the source's first.
    pub fn pools(&self) -> &[Vec<usize>] {
        &self.pools
    }

    /// Marks the end of the survey (the guests' share before) and the start of the drain.
    pub fn started(&mut self) {
        if let Some(now) = read(&self.clients) {
            self.last = now.clone();
            self.start = Some(now);
        }
    }

    /// The cores the drain's migrations may use and what a byte costs them, for the plan:
    /// per pool, its cores less what other processes took before the drain, at most `1 - reserve` of them (`--reserve-cpu`, as the governor holds it),
    /// shared with the guest vCPUs that were runnable before; `threads`: a migration's busy
    /// threads on each side; the costs as drains `level` at once showed them against the
    /// rest ([`host::cpu::level_ratio`]). None until the source has learnt what `transport`
    /// costs.
    pub fn plan(
        &self,
        reserve: Option<f64>,
        transport: &str,
        threads: [f64; 2],
        level: usize,
    ) -> Option<PlanCpu> {
        let cost = learnt(&self.first[0].costs, transport)?;
        let own = self.first[0].costs.0.contains_key(transport);
        let start = self.start.as_ref()?;
        let before = self.per_pool(&self.first, start);
        let mut cores: Vec<f64> = self
            .pools
            .iter()
            .zip(&before)
            .map(|(p, b)| {
                let n = self.first[p[0]].cores as f64;
                let b = b.unwrap_or_default();
                let others = (b.busy - b.guests - b.vmm).max(0.0);
                let free = (1.0 - others).min(1.0 - reserve.unwrap_or(0.0));
                n * free.max(MIN_FREE)
            })
            .collect();
        let mut runnable: Vec<f64> = before
            .iter()
            .map(|b| b.unwrap_or_default().guests_runnable)
            .collect();
        let (mut guests, slots) = self.guests(start, &runnable);
        let pool_of = |host: usize| self.pools.iter().position(|p| p.contains(&host));
        let source = pool_of(0)?;
        let dests = self
            .dest_at
            .iter()
            .map(|at| {
                at.and_then(pool_of).unwrap_or_else(|| {
                    // Not reached from here: its cores are not known, and do not limit.
                    cores.push(f64::INFINITY);
                    runnable.push(0.0);
                    guests.push(Vec::new());
                    cores.len() - 1
                })
            })
            .collect();
        let plan = PlanCpu::new(
            CpuModel {
                pools: cores,
                guests,
                slots,
                source,
                dests,
            },
            runnable,
            [cost.source_s_per_gb, cost.destination_s_per_gb],
            threads,
        );
        Some(
            plan.with_fit(cost.fit.as_ref().and_then(host::cpu::CostFit::per_gb))
                .with_verify(cost.verify_s_per_gb)
                .at_ratio(cost.cost_ratio_at(Some(level)))
                .with_level_ratios(cost.cost_ratio_at.clone())
                .learnt_as((!own).then(|| other_caching(transport))),
        )
    }

    /// Per pool, its guests' loads over the survey (from the first reading to `start`): each
    /// VM read apart where its agent tells them, what the pool's vCPUs were runnable beyond
    /// those as busy vCPUs (`runnable`, per pool); and which of the source pool's loads is
    /// each of the source's VMs.
    fn guests(
        &self,
        start: &[CpuUsage],
        runnable: &[f64],
    ) -> (Vec<Vec<Load>>, BTreeMap<String, usize>) {
        let mut slots = BTreeMap::new();
        let guests = self
            .pools
            .iter()
            .zip(runnable)
            .map(|(pool, &runnable)| {
                let mut loads = Vec::new();
                let mut read = 0.0;
                for &h in pool {
                    let (Some(a), Some(b)) = (self.first.get(h), start.get(h)) else {
                        continue;
                    };
                    for (name, load, r) in vm_loads(a, b) {
                        if h == 0 {
                            slots.insert(name, loads.len());
                        }
                        read += r;
                        loads.push(load);
                    }
                }
                let rest = runnable - read;
                if rest > UNREAD_RUNNABLE {
                    loads.push(Load::busy(rest));
                }
                loads
            })
            .collect();
        (guests, slots)
    }

    /// Reads again; per pool, the shares since the reading before.
    pub fn tick(&mut self) -> Vec<Option<Shares>> {
        let Some(now) = read(&self.clients) else {
            return vec![None; self.pools.len()];
        };
        let out = self.per_pool(&self.last, &now);
        self.last = now;
        out
    }

    fn per_pool(&self, a: &[CpuUsage], b: &[CpuUsage]) -> Vec<Option<Shares>> {
        let pick = |r: &[CpuUsage], p: &[usize]| -> Vec<CpuUsage> {
            p.iter().filter_map(|&i| r.get(i).cloned()).collect()
        };
        self.pools
            .iter()
            .map(|p| shares(&pick(a, p), &pick(b, p)))
            .collect()
    }

    /// Of its VMs' sampled dirty rate, the share their guests keep while they move by
    /// `transport`, `concurrency` at once when it is fixed, as the source learnt it: of drains
    /// at that level when it knows it, or of them all; None before a drain showed it.
    pub fn dirty_ratio(&self, transport: &str, concurrency: Option<usize>) -> Option<f64> {
        learnt(&self.first[0].costs, transport)?.dirty_ratio_at(concurrency)
    }

    /// Of a compressed migration's workers, how many are busy while its sending thread is,
    /// as the source learnt it of drains by `transport`; None before one showed it.
    pub fn busy_workers(&self, transport: &str) -> Option<f64> {
        learnt(&self.first[0].costs, transport)?.busy_workers
    }

    /// The same per share of a migration's pages compressed; None before a drain showed it.
    pub fn workers_per_share(&self, transport: &str) -> Option<f64> {
        learnt(&self.first[0].costs, transport)?.workers_per_share
    }

    /// A migration's setup (besides moving pages and disks), as the source learnt it of
    /// drains by `transport`; None before one showed it.
    pub fn setup_s(&self, transport: &str) -> Option<f64> {
        learnt(&self.first[0].costs, transport)?.setup_s
    }

    /// Tells every host what the drain's migrations cost: the VMM threads' CPU on the source
    /// and on the destinations since the drain started, over `wire` bytes by `transport`;
    /// and what its migrations showed of their guests' pace and their workers.
    pub fn teach(&self, transport: &str, wire: u64, shown: Shown) {
        let Some(start) = &self.start else { return };
        let Some(mut lesson) = lesson(start, &self.last, transport, wire) else {
            return;
        };
        lesson.source_s *= shown.vmm_share[0];
        lesson.destination_s *= shown.vmm_share[1];
        lesson.dirty_rate_ratio = shown.dirty_ratio;
        lesson.concurrency = shown.concurrency.and_then(|n| u16::try_from(n).ok());
        lesson.peak_concurrency = u16::try_from(shown.peak).ok().filter(|&n| n > 0);
        lesson.busy_workers = shown.busy_workers;
        lesson.workers_per_share = shown.workers_per_share;
        lesson.setup_s = shown.setup_s;
        lesson.verify_s_per_gb = shown.verify_s_per_gb;
        lesson.migrations = shown.migrations;
        for c in &self.clients {
            if let Err(e) = c.learn_cpu(&lesson) {
                tracing::warn!(
                    "could not tell {} what the drain cost: {e}",
                    c.path().display()
                );
            }
        }
    }

    /// Reads the hosts a last time: before and during, per pool.
    pub fn report(&mut self) -> Vec<PoolReport> {
        if let Some(now) = read(&self.clients) {
            self.last = now;
        }
        let start = self.start.clone().unwrap_or_else(|| self.last.clone());
        let before = self.per_pool(&self.first, &start);
        let during = self.per_pool(&start, &self.last);
        self.pools
            .iter()
            .zip(before.into_iter().zip(during))
            .map(|(p, (b, d))| PoolReport {
                hosts: p.iter().map(|&i| self.names[i].clone()).collect(),
                cores: self.first[p[0]].cores,
                before: b.unwrap_or_default(),
                during: d.unwrap_or_default(),
            })
            .collect()
    }
}

/// One compressed migration's CPU, as its report gives it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CodecCpu {
    /// Core-seconds its compression workers took, and its sending threads.
    pub codec_s: f64,
    pub sending_s: f64,
    /// Of the pages it sent, the share its workers compressed (the rest went as references,
    /// deltas, zeros, or raw while the codec was held back).
    pub compressed_share: f64,
}

impl CodecCpu {
    /// Of its `workers`, how many were busy while its sending threads were: the workers' CPU
    /// over the busiest thread's, taking the workers' as even and each of the `streams` page
    /// streams' as an even share of the sending threads'. None when it took no CPU.
    fn busy(&self, streams: usize, workers: usize) -> Option<f64> {
        let busiest =
            (self.sending_s / streams.max(1) as f64).max(self.codec_s / workers.max(1) as f64);
        let sane =
            busiest > 0.0 && self.codec_s >= 0.0 && (self.codec_s + self.sending_s).is_finite();
        sane.then(|| self.codec_s / busiest)
    }

    fn weight(&self) -> f64 {
        self.codec_s + self.sending_s
    }
}

/// Of compressed migrations' `workers` (one per core of the source), how many are busy
/// while their sending threads are ([`CodecCpu::busy`]): the mean, weighted by their CPU;
/// None when there is none.
pub fn busy_workers(cpu: &[CodecCpu], streams: usize, workers: usize) -> Option<f64> {
    weighted_mean(
        cpu.iter()
            .filter_map(|c| Some((c.busy(streams, workers)?, c.weight()))),
    )
}

/// A migration whose workers were this busy, of all of them, is taken as short of workers:
/// it shows only a floor of what its pages would keep busy.
const ALL_BUSY: f64 = 0.95;
/// A migration that compressed less of its pages than this says little of what they cost.
const MIN_COMPRESSED_SHARE: f64 = 0.05;

/// Compressed migrations' busy workers per share of their pages compressed: the mean over
/// those that left some of their `workers` idle, weighted by their CPU; None when none did.
pub fn workers_per_share(cpu: &[CodecCpu], streams: usize, workers: usize) -> Option<f64> {
    weighted_mean(cpu.iter().filter_map(|c| {
        let busy = c.busy(streams, workers)?;
        let share = c.compressed_share;
        let telling = busy < ALL_BUSY * workers as f64 && share >= MIN_COMPRESSED_SHARE;
        (telling && share <= 1.0).then(|| (busy / share, c.weight()))
    }))
}

/// The mean of `(value, weight)`s; None when their weights add to nothing.
fn weighted_mean(of: impl Iterator<Item = (f64, f64)>) -> Option<f64> {
    let (sum, weight) = of
        .filter(|(v, w)| v.is_finite() && w.is_finite() && *w > 0.0)
        .fold((0.0, 0.0), |(s, t), (v, w)| (s + v * w, t + w));
    (weight > 0.0).then(|| sum / weight)
}

/// What a drain's migrations showed besides their cost, for the hosts to learn.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shown {
    /// Of their sampled dirty rate, the share their guests kept while they moved.
    pub dirty_ratio: Option<f64>,
    /// How many moved at once, when the drain fixed it.
    pub concurrency: Option<usize>,
    /// The most that moved at once.
    pub peak: usize,
    /// Of a compressed migration's workers, how many were busy while its sending thread was.
    pub busy_workers: Option<f64>,
    /// The same per share of its pages compressed ([`workers_per_share`]).
    pub workers_per_share: Option<f64>,
    /// Their mean setup: what they took besides moving pages and disks, s.
    pub setup_s: Option<f64>,
    /// How long their guests checked their memory after the switchover, s per GB touched.
    pub verify_s_per_gb: Option<f64>,
    /// Each one's own CPU, bytes on the wire and RAM landed.
    pub migrations: Vec<host::cpu::MigrationCpu>,
    /// Per side, the share of the drain's VMM threads' CPU that is theirs: 1 unless some of
    /// the drain's migrations are not taught (those a compressed drain started raw), then
    /// what the taught ones took of all the migrations' own CPU.
    pub vmm_share: [f64; 2],
}

/// Per side, the share of `all` migrations' own CPU that `taught` took: 1 where none took any.
pub fn vmm_share(taught: &[host::cpu::MigrationCpu], all: &[host::cpu::MigrationCpu]) -> [f64; 2] {
    let side = |m: &[host::cpu::MigrationCpu], s: usize| -> f64 {
        m.iter()
            .map(|c| if s == 0 { c.source_s } else { c.destination_s })
            .filter(|x| x.is_finite() && *x >= 0.0)
            .sum()
    };
    [0, 1].map(|s| {
        let of = side(all, s);
        if of > 0.0 {
            (side(taught, s) / of).clamp(0.0, 1.0)
        } else {
            1.0
        }
    })
}

/// What a drain's migrations cost each side: the VMM threads' core-seconds from `start` to
/// `end`, on the source (first) and on the destinations. What the VMs' own device threads
/// take is in it: the survey's reading before is the sampling's, not theirs at rest.
pub fn lesson(
    start: &[CpuUsage],
    end: &[CpuUsage],
    transport: &str,
    wire: u64,
) -> Option<host::cpu::Learn> {
    let (s0, e0) = (start.first()?, end.first()?);
    e0.at_ms.checked_sub(s0.at_ms)?;
    let took =
        |i: usize| -> Option<f64> { Some((end.get(i)?.vmm_s - start.get(i)?.vmm_s).max(0.0)) };
    Some(host::cpu::Learn {
        transport: transport.to_string(),
        source_s: took(0)?,
        destination_s: (1..end.len()).filter_map(took).sum(),
        bytes_on_wire: wire,
        ..host::cpu::Learn::default()
    })
}

/// Runnable vCPUs a pool's VMs read apart may leave unexplained (rounding, a VM that came or
/// went) before the rest counts as busy vCPUs of its own.
const UNREAD_RUNNABLE: f64 = 0.05;

/// The VMs one host read apart in both readings (same process): name, load and runnable
/// vCPUs between them; at most [`MAX_VMS`] of them.
fn vm_loads(a: &CpuUsage, b: &CpuUsage) -> Vec<(String, Load, f64)> {
    let secs = b.at_ms.saturating_sub(a.at_ms) as f64 / 1e3;
    if secs <= 0.0 {
        return Vec::new();
    }
    let before: std::collections::HashMap<(&str, u32), &host::cpu::VmCpu> = a
        .vms
        .iter()
        .take(MAX_VMS)
        .map(|v| ((v.name.as_str(), v.pid), v))
        .collect();
    b.vms
        .iter()
        .take(MAX_VMS)
        .filter_map(|v| {
            let was = before.get(&(v.name.as_str(), v.pid))?;
            let ran = (v.run_s - was.run_s).max(0.0) / secs;
            let runnable = (v.runnable_s - was.runnable_s).max(0.0) / secs;
            let vcpus = v.vcpus.min(MAX_VCPUS) as f64;
            Some((
                v.name.clone(),
                Load::measured(vcpus, ran, runnable),
                runnable,
            ))
        })
        .collect()
}

/// More vCPUs than a VM can have, and more VMs than a host runs: an agent that says so is
/// not believed past them.
const MAX_VCPUS: usize = 1024;
const MAX_VMS: usize = 4096;

fn read(clients: &[HostClient]) -> Option<Vec<CpuUsage>> {
    clients.iter().map(|c| c.cpu().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_of_a_new_kind_is_priced_as_its_transport_with_or_without_page_caches() {
        let cost = |s: f64| CpuCost {
            source_s_per_gb: s,
            destination_s_per_gb: 1.0,
            drains: 1,
            ..CpuCost::default()
        };
        let mut costs = CpuCosts::default();
        costs.0.insert("compressed+cache".into(), cost(9.0));
        costs.0.insert("tcp".into(), cost(2.0));
        let source = |costs: &CpuCosts, key: &str| learnt(costs, key).map(|c| c.source_s_per_gb);
        assert_eq!(
            source(&costs, "compressed"),
            Some(9.0),
            "learnt with caches"
        );
        assert_eq!(source(&costs, "tcp+cache"), Some(2.0), "learnt without");
        assert_eq!(source(&costs, "compressed+cache"), Some(9.0));
        assert_eq!(
            source(&costs, "direct"),
            None,
            "another transport is not guessed at"
        );
        costs.0.insert("compressed".into(), cost(7.0));
        assert_eq!(
            source(&costs, "compressed"),
            Some(7.0),
            "its own, once learnt"
        );
        assert_eq!(source(&costs, "compressed+multichannel"), None);
        assert_eq!(other_caching("tcp+multichannel"), "tcp+multichannel+cache");
        assert_eq!(other_caching("tcp+multichannel+cache"), "tcp+multichannel");
    }

    fn at(boot: &str, ms: u64, busy: f64, guests: f64, vmm: f64) -> CpuUsage {
        CpuUsage {
            boot_id: boot.into(),
            cores: 2,
            at_ms: ms,
            busy_s: busy,
            guests_s: guests,
            vmm_s: vmm,
            guests_runnable_s: 0.0,
            vcpus: 0,
            vms: Vec::new(),
            costs: Default::default(),
        }
    }

    #[test]
    fn each_vm_is_read_apart_and_a_restarted_one_is_not_compared() {
        let vm = |name: &str, pid: u32, run_s: f64, runnable_s: f64| host::cpu::VmCpu {
            name: name.into(),
            pid,
            vcpus: 1,
            run_s,
            runnable_s,
        };
        let mut a = at("k", 1000, 0.0, 0.0, 0.0);
        let mut b = at("k", 3000, 0.0, 0.0, 0.0);
        a.vms = vec![
            vm("sql", 1, 10.0, 20.0),
            vm("web", 2, 5.0, 9.0),
            vm("new", 3, 0.0, 0.0),
        ];
        // Over 2 s: sql runnable all the time; web a fifth of a core, runnable half the
        // time; `new` restarted (another process).
        b.vms = vec![
            vm("sql", 1, 11.0, 22.0),
            vm("web", 2, 5.4, 10.0),
            vm("new", 4, 1.0, 2.0),
        ];
        let loads = vm_loads(&a, &b);
        assert_eq!(loads.len(), 2);
        assert_eq!(loads[0], ("sql".into(), Load::busy(1.0), 1.0));
        let (name, web, runnable) = &loads[1];
        assert_eq!((name.as_str(), *runnable), ("web", 0.5));
        assert!((web.cap - 0.2).abs() < 1e-9 && web.weight == 1.0, "{web:?}");
        // Readings out of order, or a lying agent: nothing, or bounded.
        assert!(vm_loads(&b, &a).is_empty());
        b.vms[0].vcpus = usize::MAX;
        assert_eq!(vm_loads(&a, &b)[0].1.weight, MAX_VCPUS as f64);
    }

    #[test]
    fn hosts_of_one_kernel_share_its_cores_and_its_busy_time_counts_once() {
        let before = [at("k", 1000, 10.0, 5.0, 1.0), at("k", 1000, 10.0, 3.0, 0.0)];
        let after = [at("k", 2000, 12.0, 5.5, 1.5), at("k", 2000, 12.0, 3.5, 0.4)];
        let s = shares(&before, &after).unwrap();
        assert!((s.busy - 1.0).abs() < 1e-9, "{s:?}");
        assert!((s.guests - 0.5).abs() < 1e-9 && (s.vmm - 0.45).abs() < 1e-9);
        assert_eq!(
            pools(&[
                after[0].clone(),
                at("j", 0, 0.0, 0.0, 0.0),
                after[1].clone()
            ]),
            [vec![0, 2], vec![1]]
        );
        // Another kernel, or no time between: not comparable.
        assert!(shares(&before, &[at("j", 2000, 0.0, 0.0, 0.0), after[1].clone()]).is_none());
        assert!(shares(&before, &before).is_none());
    }

    #[test]
    fn the_governor_keeps_the_migrations_under_their_share() {
        // 50% reserved; 1 Gbit/s of links.
        let mut g = Governor::new(0.5, 2, None, 1e9);
        assert_eq!(g.budget, 1e9);
        // Migrations at 85%: down in proportion.
        let b = g.observe(0.85).unwrap();
        assert!((b - 1e9 * 0.5 / 0.85).abs() < 1.0, "{b}");
        // Within the cap and above 80% of it: left alone.
        assert_eq!(g.observe(0.45), None);
        // Well under: up, by a quarter at most, never past the links.
        let up = g.observe(0.15).unwrap();
        assert!((up - b * 1.25).abs() < 1.0);
        for _ in 0..20 {
            g.observe(0.01);
        }
        assert_eq!(g.budget, 1e9);
        assert!(g.lowered == 1 && g.raised >= 2 && g.lowest < 1e9);
        // Never below the floor, however far over.
        for _ in 0..50 {
            g.observe(1.0);
        }
        assert_eq!(g.budget, MIN_BUDGET);
    }

    #[test]
    fn a_lesson_is_the_vmm_threads_time_on_each_side() {
        let start = [at("k", 1000, 0.0, 0.0, 0.2), at("k", 1000, 0.0, 0.0, 0.0)];
        let end = [
            at("k", 11_000, 0.0, 0.0, 6.2),
            at("k", 11_000, 0.0, 0.0, 5.0),
        ];
        let l = lesson(&start, &end, "tcp", 1 << 30).unwrap();
        assert!(
            (l.source_s - 6.0).abs() < 1e-9 && (l.destination_s - 5.0).abs() < 1e-9,
            "{l:?}"
        );
        assert_eq!(l.transport, "tcp");
        assert!(
            lesson(&end, &start, "tcp", 1).is_none(),
            "time ran backwards"
        );
    }

    #[test]
    fn compression_backs_off_while_the_cores_are_full_and_the_link_is_not() {
        assert_eq!(codec_step(0.97, 0.50).0, CodecStep::HoldRaw);
        // The link is what limits: compress, however busy the cores.
        assert_eq!(codec_step(0.99, 0.95).0, CodecStep::Release);
        assert_eq!(codec_step(0.60, 0.50).0, CodecStep::Release);
        // In between: as it is (no flapping at the edges).
        assert_eq!(codec_step(0.85, 0.50).0, CodecStep::Keep);
        assert_eq!(codec_step(0.95, 0.80).0, CodecStep::Keep);
    }

    /// What the tuner reads at `now` with the cores `busy`, the link `link` full and `rate`
    /// moving, the same two migrations moving, neither near its end.
    fn sample(now: f64, busy: f64, link: f64, rate: f64) -> CodecSample<'static> {
        CodecSample {
            now,
            busy,
            link,
            rate,
            raw_ceiling: f64::INFINITY,
            planned: f64::INFINITY,
            moving: &[1, 2],
            least_left: 10.0,
        }
    }

    /// Feeds the tuner `like`'s reading every 0.25 s (the run reads the hosts every
    /// [`READ_EVERY_MS`]) from `from` until it asks for a step: when, which and why; None
    /// when `to` came first.
    fn until_step(
        t: &mut CodecTuner,
        from: f64,
        to: f64,
        like: &CodecSample,
    ) -> Option<(f64, CodecStep, &'static str)> {
        let mut now = from;
        while now < to {
            let at = CodecSample {
                now,
                ..like.clone()
            };
            if let Some((step, why)) = t.decide(&at) {
                return Some((now, step, why));
            }
            now += 0.25;
        }
        None
    }

    const CPU_BOUND: &str = "cores full, link not";

    #[test]
    fn a_codec_change_that_moves_less_is_undone_and_the_policy_waits() {
        let mut t = CodecTuner::default();
        let cpu_bound = |rate| sample(0.0, 0.97, 0.5, rate);
        // Once the migrations' rate has settled (1.5 s): one migration raw.
        assert_eq!(
            until_step(&mut t, 0.0, 20.0, &cpu_bound(100.0)),
            Some((1.5, CodecStep::HoldRaw, CPU_BOUND))
        );
        t.made();
        // Judged 1.5 s later: it moved less. Undone, then quiet for 5 s.
        assert_eq!(
            until_step(&mut t, 1.75, 20.0, &cpu_bound(80.0)),
            Some((3.0, CodecStep::Release, NOT_PAID))
        );
        t.made();
        assert_eq!(
            until_step(&mut t, 3.25, 20.0, &cpu_bound(100.0)),
            Some((8.0, CodecStep::HoldRaw, CPU_BOUND))
        );
        t.made();
        assert!(!t.raw_pays());
        // Moving as much is not enough: undone.
        assert_eq!(
            until_step(&mut t, 8.25, 20.0, &cpu_bound(108.0)),
            Some((9.5, CodecStep::Release, NOT_PAID))
        );
        t.made();
        assert!(!t.raw_pays());
        // Again later; this time it pays and stays, and the next is held at once.
        assert_eq!(
            until_step(&mut t, 9.75, 20.0, &cpu_bound(100.0)),
            Some((14.5, CodecStep::HoldRaw, CPU_BOUND))
        );
        t.made();
        let paid = sample(0.0, 0.97, 0.6, 120.0);
        assert_eq!(
            until_step(&mut t, 14.75, 20.0, &paid),
            Some((16.0, CodecStep::HoldRaw, CPU_BOUND))
        );
        assert!(
            t.raw_pays(),
            "the first hold paid: new migrations start raw"
        );
    }

    #[test]
    fn one_low_reading_neither_holds_a_migration_raw_nor_makes_raw_look_paid() {
        let mut t = CodecTuner::default();
        // Cores full, the link 80% full: as it is.
        assert_eq!(
            until_step(&mut t, 0.0, 3.0, &sample(0.0, 0.97, 0.8, 100.0)),
            None
        );
        // One reading of a dip: the link half full. The mean since the drain last changed
        // is still over 75%.
        assert_eq!(t.decide(&sample(3.0, 0.97, 0.5, 60.0)), None);
        // CPU-bound for real: held raw.
        assert_eq!(
            until_step(&mut t, 3.25, 9.0, &sample(0.0, 0.97, 0.5, 100.0)),
            Some((3.25, CodecStep::HoldRaw, CPU_BOUND))
        );
        t.made();
        // The last reading after it is 15% up, the mean since it 5%: not enough.
        assert_eq!(
            until_step(&mut t, 3.5, 4.5, &sample(0.0, 0.97, 0.5, 100.0)),
            None
        );
        assert_eq!(
            t.decide(&sample(4.75, 0.97, 0.5, 115.0)),
            Some((CodecStep::Release, NOT_PAID))
        );
    }

    #[test]
    fn a_codec_change_is_made_and_judged_only_while_the_same_migrations_move() {
        let mut t = CodecTuner::default();
        let cpu_bound = |moving, rate| CodecSample {
            moving,
            ..sample(0.0, 0.97, 0.5, rate)
        };
        assert_eq!(
            until_step(&mut t, 0.0, 1.0, &cpu_bound(&[1, 2], 100.0)),
            None
        );
        // A third starts: its rate has to settle again.
        assert_eq!(
            until_step(&mut t, 1.0, 9.0, &cpu_bound(&[1, 2, 3], 100.0)),
            Some((2.5, CodecStep::HoldRaw, CPU_BOUND))
        );
        t.made();
        // One ends before the hold is judged: the drain's rate jumps, but the hold is not
        // what moved it. Undone, and raw has not paid.
        assert_eq!(
            until_step(&mut t, 2.75, 9.0, &cpu_bound(&[1, 3], 150.0)),
            Some((2.75, CodecStep::Release, SET_CHANGED))
        );
        t.made();
        assert!(!t.raw_pays());
        // Settled, but one of them ends within the time a change is judged over: none made.
        let ending = CodecSample {
            least_left: 1.0,
            ..cpu_bound(&[1, 3], 150.0)
        };
        assert_eq!(until_step(&mut t, 3.0, 5.0, &ending), None);
        assert_eq!(
            until_step(&mut t, 5.0, 9.0, &cpu_bound(&[1, 3], 150.0)),
            Some((5.0, CodecStep::HoldRaw, CPU_BOUND))
        );
        t.made();
        // Judged over the same two: it paid.
        assert_eq!(
            until_step(&mut t, 5.25, 9.0, &cpu_bound(&[1, 3], 170.0)),
            Some((6.5, CodecStep::HoldRaw, CPU_BOUND))
        );
        assert!(t.raw_pays());
    }

    #[test]
    fn a_migration_the_plan_sent_raw_compresses_again_only_beside_others() {
        let m = |held_raw, planned_raw, ratio| CodecCandidate {
            switched: false,
            by_tcp: false,
            held_raw,
            planned_raw,
            ratio,
        };
        let mut all = vec![
            m(true, true, 0.3),
            m(true, false, 0.5),
            m(false, false, 0.9),
            CodecCandidate {
                switched: true,
                ..m(false, false, 1.0)
            },
        ];
        // The least compressible still moving goes raw; the held one the policy chose
        // compresses again before the more compressible one the plan sent raw.
        assert_eq!(pick(CodecStep::HoldRaw, &all), Some(2));
        assert_eq!(pick(CodecStep::Release, &all), Some(1));
        all[1].held_raw = false;
        assert_eq!(pick(CodecStep::Release, &all), Some(0));
        // Beside one that goes by tcp, it compresses again; one by tcp is never picked.
        all[1].switched = true;
        all[2].by_tcp = true;
        assert_eq!(pick(CodecStep::Release, &all), Some(0));
        all[0].held_raw = false;
        assert_eq!(pick(CodecStep::HoldRaw, &all), Some(0));
        all[0].held_raw = true;
        // Alone, the plan's raw one stays raw.
        all[2].switched = true;
        assert_eq!(pick(CodecStep::Release, &all), None);
        assert_eq!(pick(CodecStep::Keep, &all), None);
    }

    #[test]
    fn no_migration_goes_raw_where_the_links_carry_less_than_compression_moves() {
        // The one migration compressing, over a 120 MB/s link: raw moves at most 120.
        assert_eq!(raw_ceiling(120.0, 1, 0), 120.0);
        // The last of two: the same.
        assert_eq!(raw_ceiling(120.0, 2, 1), 120.0);
        // One of two: the cores it frees may speed the other.
        assert_eq!(raw_ceiling(120.0, 2, 0), f64::INFINITY);
        let mut t = CodecTuner::default();
        let over = |raw_ceiling| CodecSample {
            raw_ceiling,
            ..sample(0.0, 0.97, 0.5, 150.0)
        };
        assert_eq!(
            until_step(&mut t, 0.0, 3.0, &over(120.0)),
            None,
            "cannot pay"
        );
        assert_eq!(
            until_step(&mut t, 3.0, 9.0, &over(1200.0)),
            Some((3.0, CodecStep::HoldRaw, CPU_BOUND))
        );
    }

    #[test]
    fn no_migration_goes_raw_while_the_drain_moves_what_its_plan_expected() {
        let mut t = CodecTuner::default();
        // Cores full, link half used, 100 MB/s of guest RAM moving.
        let planned = |planned| CodecSample {
            planned,
            ..sample(0.0, 0.97, 0.5, 100.0)
        };
        // The plan expected 105 (or 111: within its tolerance): compressing is its choice.
        assert_eq!(until_step(&mut t, 0.0, 3.0, &planned(105.0)), None);
        assert_eq!(until_step(&mut t, 3.0, 6.0, &planned(111.0)), None);
        // It expected 125: the drain has fallen behind, and raw may pay.
        assert_eq!(
            until_step(&mut t, 6.0, 9.0, &planned(125.0)),
            Some((6.0, CodecStep::HoldRaw, CPU_BOUND))
        );
    }

    #[test]
    fn workers_count_as_busy_as_their_share_of_the_sending_threads_work() {
        let cpu = |codec_s: f64, sending_s: f64| CodecCpu {
            codec_s,
            sending_s,
            compressed_share: 1.0,
        };
        // Sending took 2 s, its 2 workers 1 s between them: each busy a quarter of the time.
        assert_eq!(busy_workers(&[cpu(1.0, 2.0)], 1, 2), Some(0.5));
        // The workers are the busiest: both always, the sender less.
        assert_eq!(busy_workers(&[cpu(4.0, 1.0)], 1, 2), Some(2.0));
        // Two page streams share the sending: each took 1 s, as each worker did.
        assert_eq!(busy_workers(&[cpu(2.0, 2.0)], 2, 2), Some(2.0));
        // Weighted by CPU: (0.5 x 3 + 2 x 5) / 8.
        let mean = busy_workers(&[cpu(1.0, 2.0), cpu(4.0, 1.0)], 1, 2).unwrap();
        assert!((mean - 11.5 / 8.0).abs() < 1e-12, "{mean}");
        assert_eq!(busy_workers(&[], 1, 2), None);
        assert_eq!(
            busy_workers(&[cpu(0.0, 0.0), cpu(f64::NAN, 1.0)], 1, 2),
            None
        );
    }

    #[test]
    fn busy_workers_are_learnt_per_share_of_pages_compressed_where_some_were_idle() {
        let cpu = |codec_s: f64, sending_s: f64, compressed_share: f64| CodecCpu {
            codec_s,
            sending_s,
            compressed_share,
        };
        // 1 of 2 workers busy while a quarter of the pages were compressed: 4 per share.
        assert_eq!(workers_per_share(&[cpu(1.0, 1.0, 0.25)], 1, 2), Some(4.0));
        // Both busy: it shows only that there were too few, and teaches nothing.
        assert_eq!(workers_per_share(&[cpu(4.0, 1.0, 0.9)], 1, 2), None);
        // Nor does a migration that compressed next to nothing, or a share past all.
        assert_eq!(workers_per_share(&[cpu(0.1, 1.0, 0.01)], 1, 2), None);
        assert_eq!(workers_per_share(&[cpu(1.0, 1.0, 1.5)], 1, 2), None);
        // Weighted by CPU: (4 x 2 + 2 x 6) / 8.
        let mean = workers_per_share(
            &[cpu(1.0, 1.0, 0.25), cpu(4.0, 1.0, 0.9), cpu(3.0, 3.0, 0.5)],
            1,
            2,
        )
        .unwrap();
        assert!((mean - 20.0 / 8.0).abs() < 1e-12, "{mean}");
    }

    #[test]
    fn a_known_cost_sets_the_first_budget() {
        // 2 cores, half for migrations, 2 core-seconds per GB: 0.5 GB/s = 4 Gbit/s.
        let g = Governor::new(0.5, 2, Some(2.0 / 1e9), 1e10);
        assert!((g.budget - 4e9).abs() < 1.0, "{}", g.budget);
        let c = CpuCost {
            source_s_per_gb: 1.5,
            destination_s_per_gb: 0.5,
            drains: 3,
            ..CpuCost::default()
        };
        assert_eq!(cost_per_byte(Some(&c), true, true), Some(2.0 / 1e9));
        assert_eq!(cost_per_byte(Some(&c), true, false), Some(1.5 / 1e9));
        assert_eq!(cost_per_byte(None, true, true), None);
    }

    #[test]
    fn a_drains_lesson_counts_the_vmm_share_of_the_migrations_it_teaches() {
        let m = |source_s, destination_s| host::cpu::MigrationCpu {
            wire_gb: 0.2,
            landed_gb: 0.5,
            source_s,
            destination_s,
            ..host::cpu::MigrationCpu::default()
        };
        let all = [m(3.0, 1.0), m(1.0, 1.0), m(0.0, 2.0)];
        // The first taught, the other two started raw: 3 of 4 core-s on the source, 1 of 4
        // on the destination.
        assert_eq!(vmm_share(&all[..1], &all), [0.75, 0.25]);
        assert_eq!(vmm_share(&all, &all), [1.0, 1.0]);
        assert_eq!(vmm_share(&[], &all), [0.0, 0.0]);
        // Nothing measured: the whole.
        assert_eq!(vmm_share(&[], &[]), [1.0, 1.0]);
        assert_eq!(
            vmm_share(&[m(f64::NAN, 1.0)], &[m(f64::NAN, 1.0)]),
            [1.0, 1.0]
        );
    }
}
