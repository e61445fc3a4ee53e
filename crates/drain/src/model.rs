//! The drain-time model: the makespan of emptying a host, predicted from what can be known
//! before it starts — each link's goodput, each VM's size, compressibility and dirty rate,
//! and how many migrations run at once. It is [`crate::plan::simulate`] (each migration pays
//! a fixed overhead, then the migrations on a link share it evenly, each losing its own dirty
//! rate) fed with [`crate::predict::VmFacts`]; the bench checks it against every drain it
//! measures and uses it for the reference's scenarios.
use migration::sample::VmSample;
use serde::Serialize;

use crate::plan::{migration_rate, simulate_refined, SimJob};
use crate::predict::VmFacts;

/// A drain to predict.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub vms: Vec<VmFacts>,
    /// Goodput of the one link (or the links of one multichannel destination), bytes/s.
    pub link: f64,
    /// Migrations at once.
    pub concurrency: usize,
    pub compressed: bool,
    /// Wire bytes per payload byte beyond the model's (framing, TLS): 1.0 for none.
    pub framing: f64,
    /// The hosts' cores and what a byte costs them (None: CPU does not limit).
    pub cpu: Option<crate::plan::PlanCpu>,
    /// The guests yield to their migrations (the default).
    pub vcpu_yield: bool,
    /// The destination keeps a page cache for the drain: the first VM (`vms` are in the
    /// drain's order) runs alone until its copy is done.
    pub cache: bool,
    /// Seconds each migration takes beyond its bytes ([`crate::predict::overhead`]).
    pub overhead: f64,
    /// Per VM (as `vms`; empty: none), whether a compressed drain sends it raw, at the costs
    /// of `raw_cpu` (tcp's, as the plan priced it).
    pub raw: Vec<bool>,
    pub raw_cpu: Option<crate::plan::PlanCpu>,
}

impl Scenario {
    /// Whether VM `i` is sent raw.
    fn raw(&self, i: usize) -> bool {
        self.raw.get(i).copied().unwrap_or(false)
    }

    /// Whether VM `i`'s migration compresses.
    fn compresses(&self, i: usize) -> bool {
        self.compressed && !self.raw(i)
    }

    /// The costs VM `i`'s migration is priced at.
    fn cpu_of(&self, i: usize) -> Option<&crate::plan::PlanCpu> {
        if self.raw(i) {
            self.raw_cpu.as_ref().or(self.cpu.as_ref())
        } else {
            self.cpu.as_ref()
        }
    }
}

/// The predicted makespan, seconds. Each migration's resent bytes are those of the rate the
/// simulation gives it.
pub fn makespan(s: &Scenario) -> f64 {
    simulated(s).0
}

/// The bytes the scenario's migrations are predicted to put on the wire.
pub fn wire_bytes(s: &Scenario) -> f64 {
    simulated(s).1.iter().map(|j| j.bytes).sum()
}

/// The scenario simulated, each migration's bytes at the rate the simulation gives it.
fn simulated(s: &Scenario) -> (f64, Vec<SimJob>) {
    let cpu = s.cpu.as_ref().map(|c| &c.model);
    let bytes = |i: usize, rate: f64| s.vms[i].wire_bytes(rate, s.compresses(i)) * s.framing;
    let sim = simulate_refined(&jobs(s), bytes, &[s.link], s.concurrency, usize::MAX, cpu);
    (sim.makespan, sim.jobs)
}

/// Each VM's migration, with its bytes at its rate when all run at once: its share of the
/// link, or of the cores where they give less.
fn jobs(s: &Scenario) -> Vec<SimJob> {
    let n = s.concurrency.clamp(1, s.vms.len().max(1)) as f64;
    let model = s.cpu.as_ref().map(|c| &c.model);
    s.vms
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (cpu, compressed) = (s.cpu_of(i), s.compresses(i));
            let threads = match cpu {
                Some(c) if compressed => c.threads_of(v.compressed_share(s.link / n)),
                Some(c) => c.threads,
                None => [1.0; 2],
            };
            let job = SimJob {
                dest: 0,
                bytes: 0.0,
                cpu: cpu.map_or([0.0; 2], |c| c.cost_per_byte()),
                threads,
                seeds: if s.cache && i == 0 {
                    v.first_pass_bytes(compressed) * s.framing
                } else {
                    0.0
                },
                overhead: s.overhead,
                verify_s: cpu.map_or(0.0, |c| c.verify_of(v.touched_bytes())),
                ..SimJob::default()
            };
            let job = match cpu {
                Some(c) => c.with_guest(job, Some(&v.name), f64::from(v.vcpus), s.vcpu_yield),
                None => job,
            };
            let rate = migration_rate(Some(s.link), false, n, &job, model);
            let wire = v.wire_bytes(rate, compressed) * s.framing;
            let landed = v.landed_bytes(rate, compressed);
            let packed = v.compressed_bytes(rate, compressed);
            SimJob {
                bytes: wire,
                cpu: cpu.map_or([0.0; 2], |c| c.cost_per_byte_of(wire, landed, packed)),
                ..job
            }
        })
        .collect()
}

/// One of the reference's scenarios: its description, its measured figure, and ours.
#[derive(Clone, Debug, Serialize)]
pub struct Reference {
    pub scenario: String,
    pub link: String,
    /// What the reference measured or computed, seconds (None: it has no such figure).
    pub reference_s: Option<f64>,
    pub predicted_s: f64,
}

/// A VM of the reference: an 8 GB SQL Server whose buffer pool fills its RAM (all of it
/// touched, no zero pages), compressing as our `server` memory profile does, dirtying
/// `dirty_mb_s` MB/s.
pub fn reference_vm(name: &str, gib: u64, compress_ratio: f64, dirty_mb_s: f64) -> VmFacts {
    let rate = dirty_mb_s.max(0.0) * 1e6 / 4096.0;
    let hot_set = rate * REFERENCE_HOT_SET_S;
    // What a one-second sample of writes spread over that hot set sees.
    let seen = |window_s: f64| {
        // Non-negative and finite for any sane rate; `as` saturates.
        #[allow(clippy::cast_sign_loss)]
        let pages = (hot_set * -(-rate * window_s / hot_set.max(1.0)).exp_m1()) as u64;
        pages
    };
    VmFacts {
        name: name.into(),
        memory: gib << 30,
        sample: Some(VmSample {
            memory_bytes: gib << 30,
            touched_bytes: gib << 30,
            zero_fraction: 0.0,
            compress_ratio,
            dirty_pages_per_s: rate,
            // A server's hot set: a few seconds of its dirtying.
            dirty_set_pages: seen(1.0),
            dirty_set_half_pages: seen(0.5),
            window_ms: 1000,
            fingerprint: Vec::new(),
            fingerprint_costs: Vec::new(),
            // How SQL Server rewrites its pages is not known here: resent whole.
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
        // The reference (Hyper-V) has no post-copy.
        postcopy: migration::policy::PostcopyMode::Off,
        dirty_ratio: 1.0,
    }
}

/// The reference VMs' working set: what they dirty in this many seconds.
pub const REFERENCE_HOT_SET_S: f64 = 5.0;

/// Links of the reference and beyond, as (name, goodput bytes/s): 95% of the line rate, as
/// the reference's plain TCP run reached on 1 GbE.
pub const LINKS: [(&str, f64); 5] = [
    ("1 GbE", 0.95e9 / 8.0),
    ("10 GbE", 9.5e9 / 8.0),
    ("2 x 10 GbE", 19.0e9 / 8.0),
    ("25 GbE", 23.75e9 / 8.0),
    ("100 GbE", 95.0e9 / 8.0),
];

/// The reference's scenarios predicted: the 8 GB SQL VM over 1 GbE (78 s), the 56 GB VM over
/// two 10 GbE links (35 s), and a 250 GB host of 8 GB VMs (42 min over 1 GbE, 2.5 min over two
/// RDMA 10 GbE links), on each link, plain and compressed. `compress_ratio` and `dirty_mb_s`
/// describe the guests (measured on ours).
pub fn references(compress_ratio: f64, dirty_mb_s: f64, concurrency: usize) -> Vec<Reference> {
    let sql = |n: usize, gib| -> Vec<VmFacts> {
        (0..n)
            .map(|i| reference_vm(&format!("vm{i}"), gib, compress_ratio, dirty_mb_s))
            .collect()
    };
    let host = sql(250 / 8, 8);
    let mut out = Vec::new();
    for (link, rate) in LINKS {
        for compressed in [false, true] {
            let how = if compressed { "compressed" } else { "plain" };
            let known = |one_gbe, two_ten| match (link, compressed) {
                ("1 GbE", false) => one_gbe,
                ("2 x 10 GbE", false) => two_ten,
                _ => None,
            };
            let mut add = |scenario: &str, vms: &Vec<VmFacts>, reference_s, n| {
                out.push(Reference {
                    scenario: format!("{scenario}, {how}"),
                    link: link.into(),
                    reference_s,
                    predicted_s: makespan(&Scenario {
                        vms: vms.clone(),
                        link: rate,
                        concurrency: n,
                        compressed,
                        framing: 1.0,
                        cpu: None,
                        vcpu_yield: true,
                        cache: false,
                        overhead: crate::predict::OVERHEAD_S,
                        raw: Vec::new(),
                        raw_cpu: None,
                    }),
                });
            };
            add("one 8 GB SQL VM", &sql(1, 8), known(Some(78.0), None), 1);
            add("one 56 GB VM", &sql(1, 56), known(None, Some(35.0)), 1);
            add(
                "host of 31 x 8 GB VMs (248 GB)",
                &host,
                known(Some(42.0 * 60.0), Some(2.5 * 60.0)),
                concurrency,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_vm_over_one_gbe_takes_its_bytes_over_the_goodput() {
        let s = Scenario {
            vms: vec![reference_vm("sql", 8, 1.0, 0.0)],
            link: 0.95e9 / 8.0,
            concurrency: 1,
            compressed: false,
            framing: 1.0,
            cpu: None,
            vcpu_yield: true,
            cache: false,
            overhead: crate::predict::OVERHEAD_S,
            raw: Vec::new(),
            raw_cpu: None,
        };
        let t = makespan(&s);
        let bytes = (8u64 << 30) as f64;
        assert!(
            (t - crate::predict::OVERHEAD_S - bytes / s.link).abs() < 1e-6,
            "{t}"
        );
    }

    #[test]
    fn a_compressed_vm_whose_pages_go_as_references_keeps_fewer_workers_busy() {
        // Cores, not the 10 GbE link, hold a compressed migration back: one core for both
        // sides, a core-second per GB. Its threads share it with 1 busy guest vCPU.
        let model = crate::plan::CpuModel::of_runnable(vec![1.0], &[1.0], 0, vec![0]);
        let cpu = crate::plan::PlanCpu::new(model, vec![1.0], [1.0, 0.0], [3.0, 1.0]);
        let mut vm = reference_vm("sql", 1, 0.5, 0.0);
        vm.cached = 0.9;
        let s = Scenario {
            vms: vec![vm],
            link: 10e9 / 8.0,
            concurrency: 1,
            compressed: true,
            framing: 1.0,
            cpu: Some(cpu.clone()),
            vcpu_yield: false,
            cache: false,
            overhead: 0.0,
            raw: Vec::new(),
            raw_cpu: None,
        };
        // At the drain's mean its 4 threads (2 workers, a sending and a receiving thread)
        // take 4/5 of the core; a tenth of its pages compressed keeps 0.35 of the 2 workers
        // busy: 2.35 threads take 2.35/3.35 of it.
        let mean = makespan(&s);
        let per_vm = makespan(&Scenario {
            cpu: Some(cpu.with_workers(Some(3.5), 2.0)),
            ..s
        });
        let expected = (4.0 / 5.0) / (2.35 / 3.35);
        assert!((per_vm / mean - expected).abs() < 0.01, "{per_vm} {mean}");
    }

    #[test]
    fn the_reference_host_is_tens_of_minutes_on_one_gbe_and_minutes_on_two_ten() {
        let r = references(0.6, 10.0, 2);
        let find = |sc: &str, link: &str| {
            r.iter()
                .find(|x| x.scenario == sc && x.link == link)
                .unwrap()
                .predicted_s
        };
        let slow = find("host of 31 x 8 GB VMs (248 GB), plain", "1 GbE");
        let fast = find("host of 31 x 8 GB VMs (248 GB), plain", "2 x 10 GbE");
        assert!(slow > 30.0 * 60.0 && slow < 50.0 * 60.0, "{slow}");
        assert!(fast > 60.0 && fast < 4.0 * 60.0, "{fast}");
        assert!(find("host of 31 x 8 GB VMs (248 GB), compressed", "1 GbE") < slow);
    }
}
