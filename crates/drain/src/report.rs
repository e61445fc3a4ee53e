//! What a drain did: each VM's outcome with its migration report, and the totals, as JSON
//! (`--report`) and as a human summary.
use migration::Report;
use serde::Serialize;

/// What became of one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// It runs on its destination now.
    Moved,
    /// Every attempt failed; it runs on the source.
    Failed,
    /// It fits on no destination; it runs on the source, not attempted.
    NoRoom,
    /// Not running (failed, arriving, ...) when the drain began; left alone.
    Skipped,
    /// The drain was interrupted before it moved; it runs on the source.
    Cancelled,
    /// Its switchover's outcome is unknown and the destination could not prove it does not
    /// run there: paused on the source until an operator decides.
    Unresolved,
    /// `--dry-run`: what would happen.
    Planned,
}

impl Status {
    /// Whether it is still on the source.
    pub fn left_behind(self) -> bool {
        !matches!(self, Status::Moved | Status::Planned)
    }
}

/// A migration's cores in the model, on the source and on the destination.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct PredictedCores {
    /// Core-seconds per GB it puts on the wire.
    pub cost_s_per_gb: [f64; 2],
    /// Its threads busy while the cores hold it back.
    pub threads: [f64; 2],
}

#[derive(Clone, Debug, Serialize)]
pub struct VmOutcome {
    pub name: String,
    pub memory: u64,
    pub destination: Option<String>,
    /// Its disks go with it (`--storage copy`, the destination cannot open them): bytes
    /// allocated in them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks_copied: Option<u64>,
    pub status: Status,
    /// The guest verified all of its memory on the destination.
    pub guest_verified: bool,
    pub attempts: u32,
    /// Since the drain's start.
    pub start_ms: Option<u64>,
    pub end_ms: Option<u64>,
    /// From its switchover until its migration ended: its guest checking its memory on the
    /// destination (livemig's workload guest does), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_ms: Option<u64>,
    pub predicted_s: Option<f64>,
    /// Bytes the model expects its migration to put on the wire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_wire_bytes: Option<u64>,
    /// When the model has its migration start and end, seconds from the first migration's
    /// start (`start_ms` counts the survey before it as well).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_span_s: Option<[f64; 2]>,
    /// The share of its non-zero pages the model expects its destination's page cache to
    /// hold when it arrives (sent as references).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hits_expected: Option<f64>,
    /// What the model says held its migration back: its share of the link or of the cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound: Option<crate::plan::Bound>,
    /// What the model has its migration take of the cores on each side (None: the cores
    /// were not in the model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_cores: Option<PredictedCores>,
    /// It moves by post-copy (planned: the model says its pre-copy would not converge at its
    /// share of the link; after the drain: its migration did). While post-copy runs, losing
    /// either host loses the VM.
    #[serde(default)]
    pub postcopy: bool,
    /// Its compressed migration started raw (planned: will start raw): the model said the
    /// drain would end sooner.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started_raw: bool,
    /// What sampling the VM before the drain found.
    pub sample: Option<migration::sample::VmSample>,
    pub error: Option<String>,
    /// Errors of earlier attempts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub earlier_errors: Vec<String>,
    /// Times its destination turned it away as busy (tried again later, not counted as
    /// attempts).
    pub busy_retries: u32,
    pub report: Option<Report>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlanSummary {
    pub order: crate::plan::Order,
    pub concurrency: String,
    /// The level `auto` settled on (or the fixed one).
    pub concurrency_used: usize,
    /// Per destination: what its link carried when probed, bits/s.
    pub link_bits_per_s: Vec<Option<f64>>,
    /// Per destination: the cores, not the link, held its probe back (the link carries at
    /// least that much; the model takes the cores as the bound).
    pub link_is_floor: Vec<bool>,
    pub eta_s: Option<f64>,
    /// What the model expects the migrations to put on the wire (references for pages a
    /// destination's cache holds, deltas for re-sent pages, compression), bytes.
    pub wire_bytes_predicted: Option<u64>,
    /// Of the VMs' sampled dirty rates, the share the model takes their guests to keep while
    /// they move: what the source learnt of its drains by this transport, 1 before it had.
    pub dirty_ratio: f64,
    /// Seconds the model gives each migration beyond its bytes: the drain's gap between
    /// migrations and the setup the source learnt its migrations take.
    #[serde(default)]
    pub overhead_s: f64,
    /// The hosts' cores as the model took them (None: the source had not learnt what the
    /// transport costs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<crate::plan::PlanCpu>,
    /// What the VMs a compressed drain starts raw were priced at: the costs the source
    /// learnt of tcp (None when none starts raw).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<crate::pricing::RawCosts>,
    /// For `auto`, the model's makespan at each level from 1 (after the survey): where it
    /// starts, and which way it leans where a step's throughput says nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub level_etas_s: Vec<f64>,
}

/// A change of `auto`'s window.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct WindowStep {
    /// Since the drain began.
    pub at_ms: u64,
    pub level: usize,
    /// Where it stays.
    pub settled: bool,
    /// Guest RAM the drain moved per second at the level before, as measured for the step.
    pub ram_per_s: f64,
}

/// Where a drain's time before its first migration went, milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SurveyTook {
    /// Asking the agents what they run and can take, and which disks they reach.
    pub agents_ms: u64,
    /// Measuring the links (`--probe-ms`, and the streams' setup).
    pub probe_ms: u64,
    /// Sampling the VMs (`--sample-ms`, and reading what they hold).
    pub sample_ms: u64,
    /// Planning: placement, order, codecs and the model's makespan at each level.
    pub plan_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DrainReport {
    pub source: String,
    pub destinations: Vec<String>,
    pub plan: PlanSummary,
    pub vms: Vec<VmOutcome>,
    pub makespan_ms: u64,
    /// Of the makespan, the survey before the first migration (agents, probes, samples).
    pub survey_ms: u64,
    /// What the survey's steps took, and the plan after them.
    pub survey: SurveyTook,
    /// Until the drain ended: the makespan, then the last guests' verify on the destination.
    pub wall_ms: u64,
    pub downtime_ms_sum: u64,
    pub downtime_ms_max: u64,
    pub bytes_on_wire: u64,
    /// Pages over all migrations: sent whole, compressed, as deltas, zero.
    pub pages: migration::report::PageCounts,
    /// Page bytes the deltas did not send, over all migrations.
    pub delta_bytes_saved: u64,
    /// Page bytes references to pages of the same VM did not send.
    pub dedup_bytes_saved: u64,
    /// Page bytes references to the destination's page cache (pages of the drain's earlier
    /// VMs) did not send.
    pub dedup_host_bytes_saved: u64,
    /// The page caches the destinations gave this drain, in all.
    pub dedup_cache_bytes: u64,
    /// Guest RAM of the VMs moved.
    pub ram_moved_bytes: u64,
    pub ram_moved_per_s: f64,
    pub peak_concurrency: usize,
    /// `auto`'s window as it changed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub window_steps: Vec<WindowStep>,
    pub moved: usize,
    pub left_behind: Vec<String>,
    pub interrupted: bool,
    pub summary: String,
    /// The hosts' CPU before and during the drain, and what `--reserve-cpu` did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<crate::cpu::CpuReport>,
}

impl DrainReport {
    /// Totals from the outcomes, and the summary.
    pub fn new(
        source: String,
        destinations: Vec<String>,
        plan: PlanSummary,
        vms: Vec<VmOutcome>,
        makespan_ms: u64,
        peak_concurrency: usize,
        interrupted: bool,
    ) -> Self {
        let reports = || vms.iter().filter_map(|v| v.report.as_ref());
        let moved: Vec<&VmOutcome> = vms.iter().filter(|v| v.status == Status::Moved).collect();
        let ram_moved_bytes: u64 = moved.iter().map(|v| v.memory).sum();
        let pages = reports().fold(migration::report::PageCounts::default(), |mut t, r| {
            t.add(&r.pages);
            t
        });
        let (dedup_bytes_saved, dedup_host_bytes_saved) = pages.dedup_bytes_saved();
        let mut r = DrainReport {
            source,
            destinations,
            plan,
            makespan_ms,
            survey_ms: 0,
            survey: SurveyTook::default(),
            wall_ms: makespan_ms,
            downtime_ms_sum: reports().map(|r| r.downtime_ms).sum(),
            downtime_ms_max: reports().map(|r| r.downtime_ms).max().unwrap_or(0),
            bytes_on_wire: reports().map(|r| r.bytes_on_wire).sum(),
            pages,
            dedup_bytes_saved,
            dedup_host_bytes_saved,
            dedup_cache_bytes: 0,
            delta_bytes_saved: reports()
                .filter_map(|r| r.delta.as_ref())
                .map(|d| d.bytes_saved)
                .sum(),
            ram_moved_bytes,
            ram_moved_per_s: ram_moved_bytes as f64 / (makespan_ms.max(1) as f64 / 1e3),
            peak_concurrency,
            window_steps: Vec::new(),
            moved: moved.len(),
            left_behind: vms
                .iter()
                .filter(|v| v.status.left_behind())
                .map(|v| v.name.clone())
                .collect(),
            interrupted,
            vms,
            summary: String::new(),
            cpu: None,
        };
        r.summary = r.human();
        r
    }

    /// Where the time before the first migration went, as a line of the summary.
    pub fn survey_line(&self) -> String {
        let (t, s) = (&self.survey, |ms: u64| ms as f64 / 1e3);
        format!(
            "\nbefore the first migration: {:.1} s (agents {:.1} s, links {:.1} s, samples {:.1} s, plan {:.1} s)",
            s(self.survey_ms),
            s(t.agents_ms),
            s(t.probe_ms),
            s(t.sample_ms),
            s(t.plan_ms)
        )
    }

    /// Whether every VM moved (and verified).
    pub fn complete(&self) -> bool {
        self.left_behind.is_empty()
            && !self.interrupted
            && self
                .vms
                .iter()
                .all(|v| v.status != Status::Moved || v.guest_verified)
    }

    fn human(&self) -> String {
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        let mut s = format!(
            "drained {} of {} VMs ({:.2} GiB) from {} in {:.1} s: {:.2} GiB/s of RAM, {:.2} GiB on the wire, downtime max {} ms (sum {} ms), up to {} at once",
            self.moved,
            self.vms.len(),
            gib(self.ram_moved_bytes),
            self.source,
            self.makespan_ms as f64 / 1e3,
            self.ram_moved_per_s / f64::from(1u32 << 30),
            gib(self.bytes_on_wire),
            self.downtime_ms_max,
            self.downtime_ms_sum,
            self.peak_concurrency
        );
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        if self.pages.delta + self.pages.dedup + self.pages.dedup_host > 0 {
            s += &format!(
                "\npages: {} whole, {} compressed, {} as deltas ({:.1} MiB not sent), {} as references within a VM ({:.1} MiB), {} to the destination's page cache ({:.1} MiB), {} zero",
                self.pages.normal + self.pages.raw_fallback,
                self.pages.compressed,
                self.pages.delta,
                mib(self.delta_bytes_saved),
                self.pages.dedup,
                mib(self.dedup_bytes_saved),
                self.pages.dedup_host,
                mib(self.dedup_host_bytes_saved),
                self.pages.zero
            );
        }
        if self.interrupted {
            s += "\ninterrupted: migrations in flight were cancelled";
        }
        if let Some(p) = self.postcopy_line() {
            s += &format!("\n{p}");
        }
        for v in self.vms.iter().filter(|v| v.status.left_behind()) {
            s += &format!(
                "\nleft on {}: {} ({:?}){}",
                self.source,
                v.name,
                v.status,
                v.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
        for v in self
            .vms
            .iter()
            .filter(|v| v.status == Status::Moved && !v.guest_verified)
        {
            s += &format!("\nmoved but not verified by its guest: {}", v.name);
        }
        s
    }
}

impl DrainReport {
    /// The plan as a table: VMs in the order they leave, where they go, what sampling found,
    /// and the predicted time of each; then the concurrency, the links, the ETA and the bytes
    /// expected on the wire.
    pub fn plan_table(&self) -> String {
        let mut s = format!(
            "{:>2} {:<16} {:>7} {:>8} {:>5} {:>8} {:>10} {:>5} {:<12} {:>9} {:>5}\n",
            "#",
            "VM",
            "MEMORY",
            "TOUCHED",
            "ZERO",
            "COMPRESS",
            "DIRTY MB/s",
            "DELTA",
            "TO",
            "PREDICTED",
            "BOUND"
        );
        for (i, v) in self.vms.iter().enumerate() {
            let none = || {
                [
                    "-".to_string(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]
            };
            let [touched, zero, ratio, dirty, delta] = v.sample.as_ref().map_or_else(none, |x| {
                [
                    format!("{}M", x.touched_bytes >> 20),
                    format!("{:.0}%", x.zero_fraction * 100.0),
                    format!("{:.2}", x.compress_ratio),
                    format!("{:.1}", x.dirty_pages_per_s * 4096.0 / 1e6),
                    x.delta_ratio.map_or("-".into(), |d| format!("{d:.2}")),
                ]
            });
            let to = match v.status {
                Status::Planned | Status::Moved => v.destination.clone().unwrap_or_default(),
                st => format!("{st:?}").to_lowercase(),
            };
            let to = match v.disks_copied {
                Some(b) => format!("{to} +{}M disk", b >> 20),
                None => to,
            };
            let to = if v.postcopy {
                format!("{to} post-copy")
            } else {
                to
            };
            let to = if v.started_raw {
                format!("{to} raw")
            } else {
                to
            };
            s += &format!(
                "{:>2} {:<16} {:>6}M {:>8} {:>5} {:>8} {:>10} {:>5} {:<12} {:>9} {:>5}\n",
                i + 1,
                v.name,
                v.memory >> 20,
                touched,
                zero,
                ratio,
                dirty,
                delta,
                to,
                v.predicted_s.map_or("-".into(), |p| format!("{p:.1} s")),
                v.bound.map_or("-", |b| match b {
                    crate::plan::Bound::Link => "link",
                    crate::plan::Bound::Cpu => "cpu",
                })
            );
        }
        let links: Vec<String> = self
            .destinations
            .iter()
            .zip(&self.plan.link_bits_per_s)
            .zip(
                self.plan
                    .link_is_floor
                    .iter()
                    .chain(std::iter::repeat(&false)),
            )
            .map(|((d, r), floor)| match (r, floor) {
                (Some(r), false) => format!("{d} {:.2} Gbit/s", r / 1e9),
                (Some(r), true) => {
                    format!("{d} ≥ {:.2} Gbit/s (the cores held the probe)", r / 1e9)
                }
                (None, _) => format!("{d} unmeasured"),
            })
            .collect();
        s += &format!(
            "order {:?}, concurrency {} ({} at once), links: {}, ETA {}{}\n",
            self.plan.order,
            self.plan.concurrency,
            self.plan.concurrency_used,
            links.join(", "),
            self.plan
                .eta_s
                .map_or("unknown (links unmeasured)".into(), |e| format!("{e:.1} s")),
            self.plan
                .wire_bytes_predicted
                .map_or(String::new(), |b| format!(", {} MiB on the wire", b >> 20))
        );
        s += &self.level_etas_line();
        s += &self.cpu_line();
        s += &self.learnt_lines();
        if let Some(r) = self.raw_line() {
            s += &format!("{r}\n");
        }
        if let Some(p) = self.postcopy_line() {
            s += &format!("{p}\n");
        }
        for v in self.vms.iter().filter(|v| v.status.left_behind()) {
            if let Some(e) = &v.error {
                s += &format!("{} stays on {}: {e}\n", v.name, self.source);
            }
        }
        s
    }

    /// For `auto`, the model's ETA at each level.
    fn level_etas_line(&self) -> String {
        if self.plan.level_etas_s.is_empty() {
            return String::new();
        }
        let etas: Vec<String> = self
            .plan
            .level_etas_s
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{}: {t:.1} s", i + 1))
            .collect();
        format!("auto: the model's ETA at each level: {}\n", etas.join(", "))
    }

    /// The cores as the plan took them: per pool, and the guests there as the model shares
    /// the cores with them.
    fn cpu_line(&self) -> String {
        match &self.plan.cpu {
            Some(c) => format!(
                "cpu: {} cores for migrations against {} guest vCPUs runnable (of which {} busy, the rest taking {} cores); a GB on the wire costs {:.2} core-s on the source and {:.2} on the destination, where a migration keeps {:.1} and {:.1} threads busy{}\n",
                joined(&c.pool_cores, 2),
                joined(&c.guest_vcpus_runnable, 1),
                joined(&c.guest_vcpus_busy, 1),
                joined(&c.guest_cores_light, 2),
                c.cost_s_per_gb[0],
                c.cost_s_per_gb[1],
                c.threads[0],
                c.threads[1],
                c.workers_per_share.map_or(String::new(), |(k, most)| format!(
                    " on the mean (each compressed one its page streams' and {k:.1} workers per share of its pages they compress, at most {most:.0})"
                ))
            ),
            None => "cpu: not in the plan (the source has not yet learnt what this transport costs)\n"
                .to_string(),
        }
    }

    /// What the plan took from earlier drains, a line each (none before any).
    fn learnt_lines(&self) -> String {
        let mut s = String::new();
        if let Some([(sa, sb, sc), (da, db, dc)]) =
            self.plan.cpu.as_ref().and_then(|c| c.cost_fit_s_per_gb)
        {
            s += &format!(
                "cpu per migration (learnt from their own): {sa:.2} core-s per GB on the wire + {sb:.2} per GB of RAM landed + {sc:.2} per GB compressed on the source, {da:.2} + {db:.2} + {dc:.2} on the destination\n"
            );
        }
        if self.plan.overhead_s != crate::predict::OVERHEAD_S {
            s += &format!(
                "each migration takes {:.0} ms besides its bytes: connecting, the destination's build, the switchover, the drain starting the next (learnt from earlier drains)\n",
                self.plan.overhead_s * 1e3
            );
        }
        if self.plan.dirty_ratio < 1.0 {
            s += &format!(
                "guests dirty at {:.0}% of their sampled rate while they move (learnt from earlier drains)\n",
                self.plan.dirty_ratio * 100.0
            );
        }
        if let Some(r) = self
            .plan
            .cpu
            .as_ref()
            .map(|c| c.cost_ratio)
            .filter(|r| *r != 1.0)
        {
            s += &format!(
                "cpu at the plan's concurrency: {:.0}% of what migrations cost over all levels (learnt from earlier drains at it or the levels around it; in the costs above)\n",
                r * 100.0
            );
        }
        s
    }

    /// The names of the VMs `pick` picks.
    fn names_where(&self, pick: impl Fn(&VmOutcome) -> bool) -> Vec<&str> {
        self.vms
            .iter()
            .filter(|v| pick(v))
            .map(|v| v.name.as_str())
            .collect()
    }

    /// The VMs a compressed drain starts raw, and the costs that priced them; None when none.
    fn raw_line(&self) -> Option<String> {
        let r = self.plan.raw.as_ref()?;
        let names = self.names_where(|v| v.started_raw);
        Some(format!(
            "raw: {} start raw, the drain ending sooner as the model prices them at tcp's {:.2} and {:.2} core-s per GB",
            names.join(", "),
            r.cpu.cost_s_per_gb[0],
            r.cpu.cost_s_per_gb[1],
        ))
    }

    /// The VMs that go (or went) by post-copy, and what that risks; None when none does.
    fn postcopy_line(&self) -> Option<String> {
        let names = self.names_where(|v| v.postcopy);
        (!names.is_empty()).then(|| {
            format!(
                "post-copy for {}: {}",
                names.join(", "),
                migration::report::POSTCOPY_RISK
            )
        })
    }
}

/// Per pool figures, `+` between them.
fn joined(xs: &[f64], decimals: usize) -> String {
    xs.iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join("+")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(name: &str, sample: Option<migration::sample::VmSample>) -> VmOutcome {
        VmOutcome {
            disks_copied: None,
            name: name.into(),
            memory: 512 << 20,
            destination: Some("b".into()),
            status: Status::Planned,
            guest_verified: false,
            attempts: 0,
            start_ms: None,
            end_ms: None,
            verify_ms: None,
            predicted_s: Some(3.25),
            predicted_wire_bytes: None,
            predicted_span_s: None,
            cache_hits_expected: None,
            bound: None,
            predicted_cores: None,
            started_raw: false,
            postcopy: false,
            sample,
            error: None,
            earlier_errors: Vec::new(),
            busy_retries: 0,
            report: None,
        }
    }

    #[test]
    fn the_plan_says_what_each_vm_rewrites_and_what_the_drain_will_send() {
        let sample = migration::sample::VmSample {
            memory_bytes: 512 << 20,
            touched_bytes: 300 << 20,
            zero_fraction: 0.25,
            compress_ratio: 0.5,
            delta_ratio: Some(0.04),
            copy_delta_ratio: None,
            ..Default::default()
        };
        let plan = PlanSummary {
            order: crate::plan::Order::Auto,
            concurrency: "auto".into(),
            concurrency_used: 2,
            link_bits_per_s: vec![Some(1e9)],
            link_is_floor: vec![true],
            eta_s: Some(12.5),
            dirty_ratio: 0.25,
            wire_bytes_predicted: Some(900 << 20),
            overhead_s: 0.4,
            cpu: None,
            raw: Some(crate::pricing::RawCosts {
                cpu: crate::plan::PlanCpu::new(
                    Default::default(),
                    Vec::new(),
                    [1.5, 1.25],
                    [1.0; 2],
                ),
                dirty_ratio: None,
            }),
            level_etas_s: vec![20.0, 12.5, 12.4],
        };
        let raw = VmOutcome {
            started_raw: true,
            ..planned("idle2", None)
        };
        let vms = vec![planned("sql1", Some(sample)), raw];
        let r = DrainReport::new("a".into(), vec!["b".into()], plan, vms, 0, 0, false);
        let t = r.plan_table();
        assert!(
            t.contains("auto: the model's ETA at each level: 1: 20.0 s, 2: 12.5 s, 3: 12.4 s"),
            "{t}"
        );
        let line = |n: &str| t.lines().find(|l| l.contains(n)).unwrap().to_string();
        assert!(line("DELTA").contains("PREDICTED"), "{t}");
        let sql = line("sql1");
        assert!(
            sql.contains("300M") && sql.contains("0.04") && sql.contains("3.2 s"),
            "{t}"
        );
        assert!(line("idle2").contains(" - "), "{t}");
        assert!(
            line("idle2").contains(" raw") && !line("sql1").contains(" raw"),
            "{t}"
        );
        assert!(
            t.contains("raw: idle2 start raw") && t.contains("tcp's 1.50 and 1.25 core-s per GB"),
            "{t}"
        );
        assert!(t.contains("ETA 12.5 s, 900 MiB on the wire"), "{t}");
        assert!(
            t.contains("each migration takes 400 ms besides its bytes"),
            "a learnt setup: {t}"
        );
        assert!(
            t.contains("links: b ≥ 1.00 Gbit/s (the cores held the probe)"),
            "{t}"
        );
        assert!(!t.contains("post-copy"), "nothing goes post-copy: {t}");
        assert!(
            t.contains("guests dirty at 25% of their sampled rate"),
            "{t}"
        );
        assert!(
            !t.contains("cpu at the plan's concurrency"),
            "no CPU in the plan: {t}"
        );
        // A level whose drains cost 85% of the rest says so.
        let cpu = crate::plan::PlanCpu::new(Default::default(), Vec::new(), [2.0, 3.0], [1.0; 2]);
        let mut r = r;
        r.plan.cpu = Some(cpu.clone().at_ratio(0.85));
        let t = r.plan_table();
        assert!(
            t.contains("cpu at the plan's concurrency: 85% of what migrations cost"),
            "{t}"
        );
        assert!(
            t.contains("costs 1.70 core-s on the source and 2.55"),
            "{t}"
        );
        assert!(!t.contains("per share of its pages"), "{t}");
        // A compressed drain whose source learnt its workers per share says how it prices them.
        r.plan.cpu = Some(cpu.with_workers(Some(3.5), 2.0));
        let t = r.plan_table();
        assert!(
            t.contains("and 3.5 workers per share of its pages they compress, at most 2"),
            "{t}"
        );
    }

    /// A VM the model says moves by post-copy is marked so, and the plan states the risk.
    #[test]
    fn the_plan_names_the_vms_that_go_post_copy_and_the_risk() {
        let plan = PlanSummary {
            order: crate::plan::Order::Auto,
            concurrency: "1".into(),
            concurrency_used: 1,
            link_bits_per_s: vec![Some(1e9)],
            link_is_floor: vec![false],
            eta_s: Some(20.0),
            dirty_ratio: 1.0,
            wire_bytes_predicted: None,
            overhead_s: crate::predict::OVERHEAD_S,
            cpu: None,
            raw: None,
            level_etas_s: Vec::new(),
        };
        let hot = VmOutcome {
            postcopy: true,
            ..planned("stress1", None)
        };
        let vms = vec![hot, planned("web1", None)];
        let r = DrainReport::new("a".into(), vec!["b".into()], plan, vms, 0, 0, false);
        let survey = DrainReport {
            survey_ms: 2_600,
            survey: SurveyTook {
                agents_ms: 120,
                probe_ms: 1_240,
                sample_ms: 1_150,
                plan_ms: 40,
            },
            ..r.clone()
        };
        assert_eq!(
            survey.survey_line(),
            "\nbefore the first migration: 2.6 s (agents 0.1 s, links 1.2 s, samples 1.1 s, plan 0.0 s)"
        );
        let t = r.plan_table();
        let line = |n: &str| t.lines().find(|l| l.contains(n)).unwrap().to_string();
        assert!(line("stress1").contains("b post-copy"), "{t}");
        assert!(!line("web1").contains("post-copy"), "{t}");
        assert!(
            t.contains("post-copy for stress1") && t.contains(migration::report::POSTCOPY_RISK),
            "{t}"
        );
    }
}
