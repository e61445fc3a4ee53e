//! The hosts' cores as the drain's model shares them: per pool (the hosts of one kernel),
//! the guests' vCPUs and the migrations' threads, each taking an even share of the cores
//! unless it needs less (a guest that sleeps most of the time leaves the rest to others: the
//! scheduler's fairness, max-min). Pure.
use std::collections::BTreeMap;

use crate::plan::SimJob;

/// What a guest (or a migration's threads) asks of a pool's cores: `weight` runnable threads
/// that together take at most `cap` cores.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Load {
    pub weight: f64,
    pub cap: f64,
}

/// A guest's vCPUs runnable at least this share of the time want every core they can get.
pub const SATURATED: f64 = 0.95;

impl Load {
    /// `threads` that would each keep a core busy.
    pub fn busy(threads: f64) -> Self {
        let t = sane(threads);
        Load { weight: t, cap: t }
    }

    /// A guest with `vcpus` whose vCPU threads, per second, `ran` core-seconds and were
    /// `runnable` seconds (ran or waited): one runnable nearly all the time wants as much as
    /// it gets; one that slept part of it got what it wanted, and takes that.
    pub fn measured(vcpus: f64, ran: f64, runnable: f64) -> Self {
        let vcpus = sane(vcpus);
        if sane(runnable) >= SATURATED * vcpus {
            Load::busy(vcpus)
        } else {
            Load {
                weight: vcpus,
                cap: sane(ran).min(vcpus),
            }
        }
    }

    /// What is left of it without `other` (never below nothing).
    fn less(self, other: Load) -> Self {
        Load {
            weight: (self.weight - other.weight).max(0.0),
            cap: (self.cap - other.cap).max(0.0),
        }
    }

    /// The same guest while its vCPUs yield to its migration (a higher nice value): the
    /// scheduler still runs them, at a fraction of an even share.
    pub fn yielded(self) -> Self {
        Load {
            weight: self.weight * nice_weight(migration::policy::VCPU_YIELD_NICE),
            cap: self.cap,
        }
    }

    fn scaled(self, k: f64) -> Self {
        Load {
            weight: self.weight * k,
            cap: self.cap * k,
        }
    }

    /// The cores it takes where each unit of weight gets `share`.
    fn takes(self, share: f64) -> f64 {
        (self.weight * share).min(self.cap)
    }
}

/// The scheduler's weight of a thread at `nice` against one at 0 (CFS: a factor of 1.25 a
/// step).
pub fn nice_weight(nice: i32) -> f64 {
    1.25f64.powi(-nice)
}

fn sane(x: f64) -> f64 {
    if x.is_finite() {
        x.max(0.0)
    } else {
        0.0
    }
}

/// The share of `cores` each unit of weight gets when `loads` share them fairly: those that
/// need less than an even share take what they need, the rest split what is left evenly (∞:
/// every load gets all it asks for).
pub fn fair_share(cores: f64, loads: &[Load]) -> f64 {
    let mut asking: Vec<Load> = loads
        .iter()
        .filter(|l| l.weight > 0.0 && l.cap > 0.0)
        .copied()
        .collect();
    asking.sort_by(|a, b| (a.cap / a.weight).total_cmp(&(b.cap / b.weight)));
    let (mut left, mut weight) = (sane(cores), asking.iter().map(|l| l.weight).sum::<f64>());
    for l in asking {
        let share = left / weight;
        if l.cap / l.weight > share {
            return share;
        }
        left -= l.cap;
        weight -= l.weight;
    }
    f64::INFINITY
}

/// The cores the drain's migrations may use: per pool, core-seconds per second, and what the
/// guests there ask of them before the drain; which pool the source is in, and each
/// destination.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuModel {
    pub pools: Vec<f64>,
    /// Per pool, its guests' loads before the drain.
    pub guests: Vec<Vec<Load>>,
    /// Of the source's pool's guests, which is each of the source's VMs (by name); a VM
    /// not in it is taken as a like share of them all.
    pub slots: BTreeMap<String, usize>,
    pub source: usize,
    pub dests: Vec<usize>,
}

/// Where the drain's guests are at one moment of a simulation (indexes of its jobs): those
/// whose migrations move bytes (their guests yield to them, when they do), those moved,
/// and of these the ones still checking their memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct Guests<'a> {
    pub moving: &'a [usize],
    pub moved: &'a [usize],
    pub verifying: &'a [(usize, f64)],
}

impl CpuModel {
    /// A model whose guests are known only as `runnable` vCPUs per pool, each busy.
    #[cfg(test)]
    pub fn of_runnable(
        pools: Vec<f64>,
        runnable: &[f64],
        source: usize,
        dests: Vec<usize>,
    ) -> Self {
        CpuModel {
            pools,
            guests: runnable.iter().map(|&r| vec![Load::busy(r)]).collect(),
            slots: BTreeMap::new(),
            source,
            dests,
        }
    }

    /// The slot and load of the source's VM `name` with `vcpus`; one like the pool's
    /// average when it was not read apart, or no name is given.
    pub fn guest_of(&self, name: Option<&str>, vcpus: f64) -> (Option<usize>, Load) {
        let pool = self
            .guests
            .get(self.source)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if let Some(&s) = name.and_then(|n| self.slots.get(n)) {
            if let Some(l) = pool.get(s) {
                return (Some(s), *l);
            }
        }
        let (weight, cap) = pool
            .iter()
            .fold((0.0, 0.0), |(w, c), l| (w + l.weight, c + l.cap));
        let per_vcpu = if weight > 0.0 { vcpus / weight } else { 0.0 };
        (None, Load { weight, cap }.scaled(per_vcpu.min(1.0)))
    }

    /// What `job` takes of pool `p`: core-seconds per byte, and busy threads.
    fn take(&self, job: &SimJob, p: usize) -> (f64, f64) {
        let on = |pool: Option<&usize>| pool == Some(&p);
        let mut t = (0.0, 0.0);
        if on(Some(&self.source)) {
            t = (job.cpu[0], job.threads[0]);
        }
        if on(self.dests.get(job.dest)) {
            t = (t.0 + job.cpu[1], t.1 + job.threads[1]);
        }
        t
    }

    /// The guests' loads on pool `p` at `at`: the source's with the guests that yield to
    /// their moving migrations yielding, less those moved away; a destination's with those
    /// moved to it (every vCPU busy while it checks its memory).
    pub fn loads(&self, p: usize, jobs: &[SimJob], at: Guests) -> Vec<Load> {
        let mut loads = self.guests.get(p).cloned().unwrap_or_default();
        if p == self.source {
            for &j in at.moving.iter().filter(|&&j| jobs[j].yields) {
                remove(&mut loads, jobs[j].guest, jobs[j].load);
                loads.push(jobs[j].load.yielded());
            }
            for &j in at.moved {
                remove(&mut loads, jobs[j].guest, jobs[j].load);
            }
        }
        let checking: std::collections::HashSet<usize> = at.verifying.iter().map(|v| v.0).collect();
        for &j in at.moved {
            let job = &jobs[j];
            if self.dests.get(job.dest) == Some(&p) {
                loads.push(if checking.contains(&j) {
                    Load::busy(job.vcpus)
                } else {
                    job.load
                });
            }
        }
        loads
    }

    /// The rate one of `n` like migrations (`job` stands for them) moves at by the cores
    /// (∞: the cores do not limit it).
    pub fn rate_of_like(&self, job: &SimJob, n: usize) -> f64 {
        let n = n.max(1);
        let moving = vec![job; n];
        (0..self.pools.len())
            .map(|p| {
                let mut loads = self.guests.get(p).cloned().unwrap_or_default();
                if p == self.source && job.yields {
                    // `as`: a small count.
                    #[allow(clippy::cast_precision_loss)]
                    let all = job.load.scaled(n as f64);
                    remove(&mut loads, job.guest.filter(|_| n == 1), all);
                    loads.push(all.yielded());
                }
                self.rate(job, p, &moving, &loads)
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// The rate `job` can move at by pool `p`'s cores, with `moving` the jobs moving bytes
    /// and `guests` the guests' loads there: its threads get their fair share of the cores
    /// against the other migrations' and the guests'.
    pub fn rate(&self, job: &SimJob, p: usize, moving: &[&SimJob], guests: &[Load]) -> f64 {
        let (cost, threads) = self.take(job, p);
        if cost <= 0.0 {
            return f64::INFINITY;
        }
        let mut loads = guests.to_vec();
        loads.extend(moving.iter().map(|j| Load::busy(self.take(j, p).1)));
        if !moving.iter().any(|j| std::ptr::eq(*j, job)) {
            loads.push(Load::busy(threads));
        }
        let share = fair_share(self.pools.get(p).copied().unwrap_or(0.0), &loads);
        // A thread runs on one core at a time, however many are idle.
        Load::busy(threads).takes(share) / cost
    }
}

/// `loads` without `load`: from its slot, or (no slot) from each in proportion.
fn remove(loads: &mut [Load], slot: Option<usize>, load: Load) {
    if let Some(l) = slot.and_then(|s| loads.get_mut(s)) {
        *l = l.less(load);
        return;
    }
    let weight: f64 = loads.iter().map(|l| l.weight).sum();
    if weight > 0.0 {
        let k = (1.0 - load.weight / weight).max(0.0);
        loads.iter_mut().for_each(|l| *l = l.scaled(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn guests_that_need_less_than_an_even_share_leave_the_rest_to_the_others() {
        // 2 cores; a busy guest, two that need 0.15 each, an idle one, two migration threads.
        let loads = [
            Load::busy(1.0),
            Load::measured(1.0, 0.15, 0.45),
            Load::measured(1.0, 0.15, 0.45),
            Load::measured(1.0, 0.01, 0.02),
            Load::busy(2.0),
        ];
        let share = fair_share(2.0, &loads);
        assert!(close(share, (2.0 - 0.31) / 3.0), "{share}");
        // Counted as runnable threads, the same guests would leave the migration less.
        let runnable = [Load::busy(1.0 + 0.45 + 0.45 + 0.02), Load::busy(2.0)];
        assert!(close(fair_share(2.0, &runnable), 2.0 / 3.92));
        // Room for all: every load gets what it asks.
        assert_eq!(fair_share(8.0, &loads), f64::INFINITY);
        assert_eq!(fair_share(2.0, &[]), f64::INFINITY);
        assert_eq!(fair_share(0.0, &loads), 0.0);
    }

    #[test]
    fn a_guest_runnable_nearly_all_the_time_wants_every_core_it_gets() {
        assert_eq!(Load::measured(1.0, 0.4, 0.99), Load::busy(1.0));
        assert_eq!(
            Load::measured(2.0, 0.3, 0.8),
            Load {
                weight: 2.0,
                cap: 0.3
            }
        );
        assert_eq!(Load::measured(f64::NAN, 1.0, 1.0), Load::busy(0.0));
    }

    fn job(guest: Option<usize>, load: Load) -> SimJob {
        SimJob {
            cpu: [1e-9, 0.0],
            threads: [1.0, 0.0],
            guest,
            load,
            vcpus: 1.0,
            yields: true,
            ..SimJob::default()
        }
    }

    #[test]
    fn a_migration_whose_guest_is_busy_frees_more_of_the_cores_than_one_whose_guest_sleeps() {
        // One core: a busy guest and one that needs 0.1 core.
        let model = CpuModel {
            pools: vec![1.0],
            guests: vec![vec![Load::busy(1.0), Load::measured(1.0, 0.1, 0.3)]],
            slots: [("busy".to_string(), 0), ("light".to_string(), 1)].into(),
            source: 0,
            dests: vec![0],
        };
        let (s, l) = model.guest_of(Some("busy"), 1.0);
        let busy = job(s, l);
        let (s, l) = model.guest_of(Some("light"), 1.0);
        let light = job(s, l);
        // The busy guest yields (nice 10: a tenth of a thread's weight): its migration's thread
        // splits what the other leaves, 0.9 core, with it.
        let w = nice_weight(10);
        assert!((w - 110.0 / 1024.0).abs() < 1e-3, "the kernel's table: {w}");
        assert!(close(model.rate_of_like(&busy, 1), 0.9 / (1.0 + w) * 1e9));
        // The light one yields its 0.1: the thread splits the core with the busy vCPU.
        assert!(close(model.rate_of_like(&light, 1), 1.0 / (2.0 + w) * 1e9));
        // A VM not read apart is a like share of the pool's guests.
        let (slot, like) = model.guest_of(Some("other"), 1.0);
        assert_eq!(slot, None);
        assert!(close(like.weight, 1.0) && close(like.cap, 0.55));
    }

    #[test]
    fn a_moved_guest_leaves_the_source_and_is_busy_on_its_destination_while_it_checks_memory() {
        // Source pool 0 and destination pool 1, one core each; the guest is busy.
        let model = CpuModel {
            pools: vec![1.0, 1.0],
            guests: vec![vec![Load::busy(1.0)], vec![]],
            slots: [("vm".to_string(), 0)].into(),
            source: 0,
            dests: vec![1],
        };
        let (s, l) = model.guest_of(Some("vm"), 1.0);
        let jobs = [job(s, l)];
        let before = Guests::default();
        assert_eq!(model.loads(0, &jobs, before), vec![Load::busy(1.0)]);
        // While its migration moves, its vCPUs yield: there at a fraction of their weight.
        let moving = Guests {
            moving: &[0],
            ..before
        };
        assert_eq!(
            model.loads(0, &jobs, moving),
            vec![Load::busy(0.0), Load::busy(1.0).yielded()]
        );
        let moved = Guests {
            moved: &[0],
            verifying: &[(0, 1.0)],
            ..before
        };
        assert_eq!(model.loads(0, &jobs, moved), vec![Load::busy(0.0)]);
        assert_eq!(model.loads(1, &jobs, moved), vec![Load::busy(1.0)]);
        let light = SimJob {
            load: Load::measured(1.0, 0.2, 0.5),
            ..jobs[0]
        };
        let checked = Guests {
            verifying: &[],
            ..moved
        };
        assert_eq!(model.loads(1, &[light], checked), vec![light.load]);
    }
}
