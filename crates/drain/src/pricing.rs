//! The placed migrations as the drain's model prices them: the bytes each puts on the wire
//! and what a byte costs the cores, by the drain's codec or raw (a compressed drain's VM
//! the model sends raw, at the costs the source learnt for tcp), and the drain's makespan
//! when they run so.
use crate::plan::{self, CpuModel, DestFacts, NoRoom, PlanCpu, SimJob, Simulated};
use crate::predict::VmFacts;
use crate::survey::Survey;
use crate::DrainOptions;

/// What sending one of a compressed drain's VMs raw costs: the source's costs of tcp with
/// the same page streams and caches, and the share of their pace its guests kept under it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RawCosts {
    pub cpu: PlanCpu,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_ratio: Option<f64>,
}

/// A simulated drain: its makespan, what held each migration back, and each as last priced.

#[derive(Clone)]
pub struct Pricing<'a> {
    s: &'a Survey,
    /// The VMs' facts with the page-cache hits their order gives them; and the same as
    /// their guests would keep their pace sent raw.
    vms: Vec<VmFacts>,
    raw_vms: Vec<VmFacts>,
    /// The VMs in the order they leave.
    pub order: Vec<usize>,
    /// The placed VMs in order, and their destinations.
    pub placed: Vec<(usize, usize)>,
    /// Per destination, which of `placed` fills its page cache, alone.
    seeder: Vec<Option<usize>>,
    dest_facts: Vec<DestFacts>,
    cpu: Option<PlanCpu>,
    raw: Option<PlanCpu>,
    /// The share of their dirty rate guests keep sent raw, where the source learnt it.
    raw_dirty: Option<f64>,
    compressed: bool,
    yields: bool,
    overhead: f64,
    /// The VMs' mean vCPUs: a migration that stands for them all has these.
    mean_vcpus: f64,
    /// The links as the simulation takes them ([`plan::sim_link`]).
    links: Vec<f64>,
    inbound: usize,
    /// Migrations at once per destination, at the plan's window.
    per_dest: f64,
}

impl<'a> Pricing<'a> {
    /// Prices the drain's `placement` (`cached`: its destinations with a page cache) with
    /// `cpu` for its codec and `raw` for sending raw, `window` migrations at once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        o: &DrainOptions,
        s: &'a Survey,
        placement: &[Result<usize, NoRoom>],
        cached: &[bool],
        cpu: Option<PlanCpu>,
        raw: Option<RawCosts>,
        overhead: f64,
        window: usize,
    ) -> Self {
        let compressed = crate::run::compresses(&o.request);
        let (raw, raw_dirty) = match raw.filter(|_| compressed) {
            Some(r) => (Some(r.cpu), r.dirty_ratio),
            None => (None, None),
        };
        let mut p = Pricing {
            s,
            vms: s.vms.clone(),
            raw_vms: Vec::new(),
            order: Vec::new(),
            placed: Vec::new(),
            seeder: Vec::new(),
            dest_facts: crate::run::budgeted_facts(o, s, window),
            cpu,
            raw,
            raw_dirty,
            compressed,
            yields: o.request.vcpu_yield != Some(false),
            overhead,
            mean_vcpus: s.vms.iter().map(|v| f64::from(v.vcpus)).sum::<f64>()
                / s.vms.len().max(1) as f64,
            links: Vec::new(),
            inbound: s.dests.iter().map(|d| d.max_inbound).min().unwrap_or(1),
            per_dest: (window as f64 / s.dests.len() as f64).max(1.0),
        };
        p.links = p.sim_links();
        let compressed = vec![p.compressed; s.vms.len()];
        p.in_order(o, placement, cached, &compressed);
        p
    }

    /// The placed VMs in the order `o` asks for, each priced as `compressed` (per VM of
    /// the survey) says it goes, with the page-cache hits and seeders that order gives.
    fn in_order(
        &mut self,
        o: &DrainOptions,
        placement: &[Result<usize, NoRoom>],
        cached: &[bool],
        compressed: &[bool],
    ) {
        self.order = self.order(o, placement, compressed);
        self.vms = crate::run::with_cache_hits(o, self.s, &self.order, placement);
        self.raw_vms = self.vms.clone();
        if let Some(r) = self.raw_dirty {
            self.raw_vms.iter_mut().for_each(|v| v.dirty_ratio = r);
        }
        self.placed = self
            .order
            .iter()
            .filter_map(|i| Some((*i, *placement[*i].as_ref().ok()?)))
            .collect();
        self.seeder = crate::run::seeders(cached, &self.placed);
    }

    /// The same drain with the placed migrations `raw` says go raw ordered as they go (the
    /// longest first is longest as sent): the order was chosen before the codecs were, as
    /// if every VM compressed. `raw` as it maps to the new order.
    pub fn ordered_as_sent(
        &self,
        o: &DrainOptions,
        placement: &[Result<usize, NoRoom>],
        cached: &[bool],
        raw: &[bool],
    ) -> (Self, Vec<bool>) {
        let by_vm = self.by_vm(raw);
        let compressed: Vec<bool> = by_vm.iter().map(|r| self.compressed && !r).collect();
        let mut p = self.clone();
        p.in_order(o, placement, cached, &compressed);
        let raw = p.placed.iter().map(|(i, _)| by_vm[*i]).collect();
        (p, raw)
    }

    /// The same drain priced `level` migrations at once: its costs, and raw's, at that
    /// level's ratio ([`PlanCpu::at_level`]).
    pub fn at_level(&self, level: usize) -> Self {
        let mut p = Pricing {
            cpu: self.cpu.clone().map(|c| c.at_level(level)),
            raw: self.raw.clone().map(|c| c.at_level(level)),
            ..self.clone()
        };
        p.links = p.sim_links();
        p
    }

    /// The links as the simulation takes them, at these costs.
    fn sim_links(&self) -> Vec<f64> {
        (0..self.dest_facts.len())
            .map(|d| plan::sim_link(&self.dest_facts[d], &self.like(d, false), self.model()))
            .collect()
    }

    /// The placed VMs in the order `o` asks for, hot VMs (those that dirty faster than their
    /// share of the link carries) last; each priced as `compressed` (per VM) says.
    fn order(
        &self,
        o: &DrainOptions,
        placement: &[Result<usize, NoRoom>],
        compressed: &[bool],
    ) -> Vec<usize> {
        let placed: Vec<usize> = (0..self.s.vms.len())
            .filter(|i| placement[*i].is_ok())
            .collect();
        let placed_vms: Vec<_> = placed.iter().map(|i| self.s.vms[*i].clone()).collect();
        let codecs: Vec<bool> = placed.iter().map(|i| compressed[*i]).collect();
        let first_share = if self.dest_facts.is_empty() {
            f64::INFINITY
        } else {
            self.share(0, false)
        };
        plan::order(&placed_vms, o.order, first_share, &codecs)
            .into_iter()
            .map(|k| placed[k])
            .collect()
    }

    /// The cores' model, when the source learnt the drain's costs.
    pub fn model(&self) -> Option<&CpuModel> {
        self.cpu.as_ref().map(|c| &c.model)
    }

    /// The costs a migration is priced at: raw's, or the drain's codec's.
    fn costs(&self, raw: bool) -> Option<&PlanCpu> {
        if raw {
            self.raw.as_ref()
        } else {
            self.cpu.as_ref()
        }
    }

    /// VM `i`'s facts, sent raw or by the drain's codec.
    fn facts(&self, i: usize, raw: bool) -> &VmFacts {
        if raw {
            &self.raw_vms[i]
        } else {
            &self.vms[i]
        }
    }

    /// Whether a migration sent raw or not compresses.
    fn compresses(&self, raw: bool) -> bool {
        self.compressed && !raw
    }

    /// A migration to `d` as the cores see it, of VM `vm` (None: one like them all, with
    /// their mean vCPUs).
    fn job_to(&self, d: usize, vm: Option<&VmFacts>, raw: bool) -> SimJob {
        let c = self.costs(raw);
        let job = SimJob {
            dest: d,
            bytes: 0.0,
            cpu: c.map_or([0.0; 2], PlanCpu::cost_per_byte),
            threads: c.map_or([1.0; 2], |c| c.threads),
            seeds: 0.0,
            overhead: self.overhead,
            ..SimJob::default()
        };
        let Some(c) = c else { return job };
        match vm {
            Some(v) => c.with_guest(job, Some(&v.name), f64::from(v.vcpus), self.yields),
            None => c.with_guest(job, None, self.mean_vcpus, self.yields),
        }
    }

    /// One that stands for them all: the VMs' mean vCPUs.
    fn like(&self, d: usize, raw: bool) -> SimJob {
        self.job_to(d, None, raw)
    }

    /// What a migration to `d` moves at while `per` go there at once.
    fn rate_at(&self, d: usize, per: f64, raw: bool) -> f64 {
        let f = &self.dest_facts[d];
        plan::migration_rate(
            f.rate,
            f.rate_is_floor,
            per,
            &self.like(d, raw),
            self.model(),
        )
    }

    /// A migration's rate at the plan's window (its share of the link or of the cores).
    fn share(&self, d: usize, raw: bool) -> f64 {
        self.rate_at(d, self.per_dest, raw)
    }

    /// VM `i`'s copied disks' bytes, when it goes to `d` and cannot open them there.
    fn disk_bytes(&self, i: usize, d: usize) -> f64 {
        let v = &self.s.vms[i];
        if plan::must_copy(&v.needs, &self.dest_facts[d]) {
            v.needs.disk_bytes as f64
        } else {
            0.0
        }
    }

    /// Per VM, the seconds its migration takes at its share (its copied disks first), sent
    /// raw where `raw` (per VM) says; None where it is not placed or its share is unknown.
    pub fn predicted(&self, placement: &[Result<usize, NoRoom>], raw: &[bool]) -> Vec<Option<f64>> {
        (0..self.s.vms.len())
            .map(|i| {
                let d = *placement[i].as_ref().ok()?;
                let share = self.share(d, raw[i]);
                share.is_finite().then(|| {
                    self.facts(i, raw[i]).predict_secs_after(
                        self.overhead,
                        share,
                        self.compresses(raw[i]),
                    ) + self.disk_bytes(i, d) / share
                })
            })
            .collect()
    }

    /// Per VM, whether the model says it moves by post-copy.
    pub fn postcopy(&self, placement: &[Result<usize, NoRoom>], raw: &[bool]) -> Vec<bool> {
        (0..self.s.vms.len())
            .map(|i| match &placement[i] {
                Ok(d) => self
                    .facts(i, raw[i])
                    .moves_by_postcopy(self.share(*d, raw[i]), self.compresses(raw[i])),
                Err(_) => false,
            })
            .collect()
    }

    /// Placed migration `k`'s bytes at `rate`, its VM's and its copied disks'.
    fn bytes(&self, k: usize, rate: f64, raw: bool) -> f64 {
        let (i, d) = self.placed[k];
        self.facts(i, raw).wire_bytes(rate, self.compresses(raw)) + self.disk_bytes(i, d)
    }

    /// Placed migration `k` with the bytes the model expects it to send when `per` go to
    /// its destination at once.
    fn job(&self, k: usize, per: f64, raw: bool) -> SimJob {
        let (i, d) = self.placed[k];
        let v = self.facts(i, raw);
        let c = self.costs(raw);
        let seeds = if self.seeder[d] == Some(k) {
            v.first_pass_bytes(self.compresses(raw)) + self.disk_bytes(i, d)
        } else {
            0.0
        };
        let rate = self.rate_at(d, per, raw);
        let wire = self.bytes(k, rate, raw);
        let landed = v.landed_bytes(rate, self.compresses(raw)) + self.disk_bytes(i, d);
        let compressed = v.compressed_bytes(rate, self.compresses(raw));
        let like = self.job_to(d, Some(v), raw);
        SimJob {
            bytes: wire,
            seeds,
            cpu: c.map_or([0.0; 2], |c| c.cost_per_byte_of(wire, landed, compressed)),
            verify_s: c.map_or(0.0, |c| c.verify_of(v.touched_bytes())),
            threads: match c {
                Some(c) if self.compresses(raw) => c.threads_of(v.compressed_share(rate)),
                _ => like.threads,
            },
            ..like
        }
    }

    /// The drain, `window` migrations at once, the placed ones `raw` says sent raw: None
    /// while a link is not measured.
    pub fn simulate(&self, window: usize, raw: &[bool]) -> Option<Simulated> {
        if self.dest_facts.iter().any(|d| d.rate.is_none()) {
            return None;
        }
        let per = (window as f64 / self.s.dests.len() as f64).max(1.0);
        let jobs: Vec<SimJob> = (0..self.placed.len())
            .map(|k| self.job(k, per, raw[k]))
            .collect();
        Some(plan::simulate_refined(
            &jobs,
            |k, r| self.bytes(k, r, raw[k]),
            &self.links,
            window,
            self.inbound,
            self.model(),
        ))
    }

    /// Per placed migration of `sim` (with `raw`), the guest RAM per second the plan expects
    /// it to send while it moves: what it lands at its pace on the wire over those seconds
    /// (None where the simulation has it move nothing).
    pub fn ram_rates(&self, sim: &Simulated, raw: &[bool]) -> Vec<Option<f64>> {
        (self.placed.iter().zip(raw).zip(plan::moving(sim)))
            .map(|(((i, _), raw), moving)| {
                let (secs, pace) = moving?;
                let v = self.facts(*i, *raw);
                Some(v.landed_bytes(pace, self.compresses(*raw)) / secs)
            })
            .collect()
    }

    /// Which placed migrations go raw, `window` at once ([`plan::choose_raw`]): none unless
    /// the drain compresses and the source learnt what raw costs.
    pub fn choose_raw(&self, window: usize) -> Vec<bool> {
        if !self.weighs_codecs() {
            return vec![false; self.placed.len()];
        }
        let own: Vec<f64> = self
            .placed
            .iter()
            .map(|&(i, d)| {
                let share = self.share(d, false);
                self.vms[i].predict_secs_after(self.overhead, share, true)
            })
            .collect();
        plan::choose_raw(&own, |raw| {
            self.simulate(window, raw)
                .map_or((f64::INFINITY, 0.0), |s| {
                    (s.makespan, plan::core_seconds(&s.jobs))
                })
        })
    }

    /// Whether the plan weighs each VM's codec: the drain compresses, and the source learnt
    /// what its codec and raw cost.
    pub fn weighs_codecs(&self) -> bool {
        self.raw.is_some() && self.cpu.is_some()
    }

    /// `raw` per placed migration as per VM of the survey.
    pub fn by_vm(&self, raw: &[bool]) -> Vec<bool> {
        let mut out = vec![false; self.s.vms.len()];
        for ((i, _), r) in self.placed.iter().zip(raw) {
            out[*i] = *r;
        }
        out
    }

    /// Per VM, the facts as priced: with their page-cache hits.
    pub fn vms(&self) -> &[VmFacts] {
        &self.vms
    }
}
