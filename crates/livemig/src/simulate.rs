//! `livemig cluster simulate`: the cluster past this machine. It registers N simulated agents
//! in a real etcd (no VMs run: each host's memory, NIC and VMs are drawn from a seed). Then it
//! plans the drain of K hosts at once as `drain --cluster` would: it reads the cluster's
//! status and places every VM of the drained hosts on the others by the drain's plan. It
//! reports the time and the etcd bytes of each step, and the makespan the model predicts.
//! Last comes the seed's case: one host holding 250 GB of VMs, drained into one destination,
//! and into all the others of a 100-host fleet.
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cluster::{HostRecord, VmSummary};
use drain::plan::{DestFacts, Needs};
use drain::predict::VmFacts;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cluster_cmd::ClusterArgs;
use crate::CmdResult;

const GIB: u64 = 1 << 30;
/// How long the simulated hosts outlive the run if it dies (their records are under a lease).
const SIM_LEASE: Duration = Duration::from_secs(300);

#[derive(clap::Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Fleet sizes to simulate, one after the other (e.g. 100,1000,5000).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    hosts: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    vms_per_host: usize,
    /// Hosts drained at once.
    #[arg(long, default_value_t = 1)]
    drain: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

/// One simulated host.
#[derive(Clone, Debug, PartialEq)]
pub struct SimHost {
    pub name: String,
    /// Where sources would reach it.
    pub listen: String,
    pub memory: u64,
    /// Its NIC, bits/s.
    pub nic_bits: u64,
    pub vms: Vec<u64>,
}

impl SimHost {
    fn room(&self) -> u64 {
        self.memory
            .saturating_sub(self.vms.iter().sum::<u64>())
            .saturating_sub(8 * GIB)
    }

    fn record(&self) -> HostRecord {
        HostRecord {
            name: self.name.clone(),
            listen: self.listen.clone(),
            memory_total: self.memory,
            room: self.room(),
            vms: self
                .vms
                .iter()
                .enumerate()
                .map(|(i, m)| VmSummary {
                    name: format!("{}-vm{i}", self.name),
                    memory: *m,
                    state: "running".into(),
                    migration: None,
                })
                .collect(),
            max_inbound: 4,
            nic_bits_per_s: self.nic_bits,
            ..Default::default()
        }
    }
}

/// `n` hosts of `m` VMs each, drawn from `seed`: 256–1024 GiB of RAM, a 10, 25 or 2×25 Gbit
/// NIC, VMs of 2–32 GiB that fit in it.
pub fn fleet(n: usize, m: usize, seed: u64) -> Vec<SimHost> {
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let memory = [256, 384, 512, 768, 1024][rng.random_range(0..5)] * GIB;
            let nic_bits = [10, 25, 50][rng.random_range(0..3)] * 1_000_000_000;
            let mut vms = Vec::new();
            let mut left = memory / 2;
            for _ in 0..m {
                let size = [2, 4, 8, 16, 32][rng.random_range(0..5)] * GIB;
                if size <= left {
                    left -= size;
                    vms.push(size);
                }
            }
            SimHost {
                name: format!("sim-{i:05}"),
                listen: format!("10.{}.{}.{}:7000", 64 + i / 65536, (i / 256) % 256, i % 256),
                memory,
                nic_bits,
                vms,
            }
        })
        .collect()
}

/// The drain's makespan as the model predicts it: every migration moves at the slower of its
/// source's and destination's NIC shares. Each host's NIC carries the bytes it sends or
/// receives in turn, so the slowest NIC bounds it: max over NICs of bytes / rate.
/// `moves`: (source, destination, bytes).
pub fn makespan(moves: &[(usize, usize, f64)], src_nic: &[f64], dst_nic: &[f64]) -> f64 {
    let mut out = vec![0.0; src_nic.len()];
    let mut inn = vec![0.0; dst_nic.len()];
    for (s, d, b) in moves {
        out[*s] += b;
        inn[*d] += b;
    }
    let worst = |load: &[f64], nic: &[f64]| {
        load.iter()
            .zip(nic)
            .map(|(l, r)| l / r.max(1.0))
            .fold(0.0, f64::max)
    };
    worst(&out, src_nic).max(worst(&inn, dst_nic)) + drain::predict::OVERHEAD_S
}

/// A simulated destination as the plan sees it: its room, and its NIC as its link.
fn facts(name: &str, room: u64, nic_bits: u64) -> DestFacts {
    DestFacts {
        name: name.to_string(),
        room,
        rate: Some(nic_bits as f64 / 8.0),
        rate_is_floor: false,
        bridge: true,
        unreachable: Vec::new(),
        copy_room: None,
        cpu_features: None,
    }
}

fn vm(name: String, memory: u64) -> VmFacts {
    VmFacts {
        name,
        memory,
        sample: None,
        delta: false,
        cached: 0.0,
        whole_costs: None,
        whole_in_copy: None,
        self_dup: 0.0,
        vcpus: 1,
        needs: Needs::default(),
        postcopy: migration::policy::PostcopyMode::Off,
        dirty_ratio: 1.0,
    }
}

/// One fleet size's figures.
#[derive(Debug, Serialize)]
struct Row {
    hosts: usize,
    vms: usize,
    keys_written: usize,
    register_ms: u64,
    bytes_written: usize,
    plan_ms: u64,
    status_ms: u64,
    bytes_read: usize,
    drained_hosts: usize,
    drained_gib: f64,
    placed: usize,
    unplaced: usize,
    makespan_s: f64,
}

/// The seed's case: a host with 250 GB of VMs in a 100-host fleet.
#[derive(Debug, Serialize)]
struct SeedCase {
    source_gbit: f64,
    one_destination_gbit: f64,
    one_destination_s: f64,
    many_destinations: usize,
    many_destinations_s: f64,
    speedup: f64,
}

pub fn main(a: SimulateArgs) -> CmdResult {
    let store = a.cluster.store()?;
    let mut rows = Vec::new();
    for &n in &a.hosts {
        rows.push(simulate(&store, n, &a)?);
        if !a.json {
            let r = rows.last().ok_or("no row")?;
            println!(
                "{:>6} hosts {:>7} VMs: registered {} keys ({:.1} MB) in {} ms; plan {} ms \
                 (status {} ms, {:.1} MB read); {} host(s), {:.0} GiB: {} VMs placed, {} not; \
                 makespan {:.1} s",
                r.hosts,
                r.vms,
                r.keys_written,
                r.bytes_written as f64 / 1e6,
                r.register_ms,
                r.plan_ms,
                r.status_ms,
                r.bytes_read as f64 / 1e6,
                r.drained_hosts,
                r.drained_gib,
                r.placed,
                r.unplaced,
                r.makespan_s
            );
        }
    }
    let seed = seed_case(a.seed);
    if a.json {
        crate::out::say(&serde_json::to_string_pretty(
            &serde_json::json!({ "rows": rows, "seed_case": seed }),
        )?);
    } else {
        println!(
            "250 GB host, {:.0} Gbit/s NIC, 100-host fleet: into one {:.0} Gbit/s destination \
             {:.0} s; into {} destinations {:.0} s ({:.1}x)",
            seed.source_gbit,
            seed.one_destination_gbit,
            seed.one_destination_s,
            seed.many_destinations,
            seed.many_destinations_s,
            seed.speedup
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Registers a fleet of `n`, plans the drain of `a.drain` of its hosts, and takes the
/// fleet away again.
fn simulate(
    store: &cluster::Store,
    n: usize,
    a: &SimulateArgs,
) -> Result<Row, Box<dyn std::error::Error>> {
    let hosts = fleet(n, a.vms_per_host, a.seed);
    let lease = store.grant(SIM_LEASE)?;
    let t = Instant::now();
    let mut pairs = Vec::with_capacity(2 * n);
    for h in &hosts {
        let member = cluster::Member {
            name: h.name.clone(),
            joined_ms: 0,
        };
        pairs.push((
            format!("members/{}", h.name),
            serde_json::to_string(&member)?,
        ));
        pairs.push((
            format!("hosts/{}", h.name),
            serde_json::to_string(&h.record())?,
        ));
    }
    let bytes_written: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
    store.put_many(&pairs, Some(lease))?;
    let register_ms = t.elapsed().as_millis() as u64;

    // What `drain --cluster --host` does before it moves anything: the status, then the plan.
    let t = Instant::now();
    let status = store.status()?;
    let status_ms = t.elapsed().as_millis() as u64;
    let bytes_read: usize = status
        .hosts
        .iter()
        .filter_map(|h| h.record.as_ref())
        .map(|r| serde_json::to_string(r).map_or(0, |s| s.len()) + r.name.len() * 2)
        .sum();
    let drained: Vec<&str> = hosts
        .iter()
        .take(a.drain)
        .map(|h| h.name.as_str())
        .collect();
    let records: Vec<&HostRecord> = status
        .hosts
        .iter()
        .filter_map(|h| h.record.as_ref())
        .filter(|r| r.name.starts_with("sim-"))
        .collect();
    let sources: Vec<&HostRecord> = records
        .iter()
        .copied()
        .filter(|r| drained.contains(&r.name.as_str()))
        .collect();
    let dests: Vec<&HostRecord> = records
        .iter()
        .copied()
        .filter(|r| !drained.contains(&r.name.as_str()))
        .collect();
    let mut vms = Vec::new();
    let mut from = Vec::new();
    for (s, r) in sources.iter().enumerate() {
        for v in &r.vms {
            vms.push(vm(v.name.clone(), v.memory));
            from.push(s);
        }
    }
    let facts: Vec<DestFacts> = dests
        .iter()
        .map(|r| facts(&r.name, r.room, r.nic_bits_per_s))
        .collect();
    let placement = drain::plan::place(&vms, &facts, false, false);
    let plan_ms = t.elapsed().as_millis() as u64;
    store.revoke(lease)?;

    let moves: Vec<(usize, usize, f64)> = placement
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.as_ref().ok().map(|d| (from[i], *d, vms[i].memory as f64)))
        .collect();
    let src_nic: Vec<f64> = sources
        .iter()
        .map(|r| r.nic_bits_per_s as f64 / 8.0)
        .collect();
    let dst_nic: Vec<f64> = dests
        .iter()
        .map(|r| r.nic_bits_per_s as f64 / 8.0)
        .collect();
    Ok(Row {
        hosts: n,
        vms: hosts.iter().map(|h| h.vms.len()).sum(),
        keys_written: pairs.len(),
        register_ms,
        bytes_written,
        plan_ms,
        status_ms,
        bytes_read,
        drained_hosts: sources.len(),
        drained_gib: vms.iter().map(|v| v.memory).sum::<u64>() as f64 / GIB as f64,
        placed: moves.len(),
        unplaced: placement.len() - moves.len(),
        makespan_s: makespan(&moves, &src_nic, &dst_nic),
    })
}

/// 250 GB of VMs on a host with a 2×25 Gbit NIC, into one 25 Gbit destination or into the
/// 99 others of a fleet drawn from `seed` (placed by the plan).
fn seed_case(seed: u64) -> SeedCase {
    let src = 50e9 / 8.0;
    // 15 × 16 GB + 8 GB + 2 GB.
    let sizes = [16u64; 15].into_iter().chain([8, 2]);
    let vms: Vec<VmFacts> = sizes
        .enumerate()
        .map(|(i, g)| vm(format!("vm{i}"), g * 1_000_000_000))
        .collect();
    let one = 25e9 / 8.0;
    let all: Vec<(usize, usize, f64)> = vms.iter().map(|v| (0, 0, v.memory as f64)).collect();
    let one_s = makespan(&all, &[src], &[one]);
    let fleet = fleet(99, 10, seed);
    let facts: Vec<DestFacts> = fleet
        .iter()
        .map(|h| facts(&h.name, h.room(), h.nic_bits))
        .collect();
    let placement = drain::plan::place(&vms, &facts, false, false);
    let moves: Vec<(usize, usize, f64)> = placement
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.as_ref().ok().map(|d| (0, *d, vms[i].memory as f64)))
        .collect();
    let nics: Vec<f64> = fleet.iter().map(|h| h.nic_bits as f64 / 8.0).collect();
    let many_s = makespan(&moves, &[src], &nics);
    let used = {
        let mut d: Vec<usize> = moves.iter().map(|m| m.1).collect();
        d.sort_unstable();
        d.dedup();
        d.len()
    };
    SeedCase {
        source_gbit: src * 8.0 / 1e9,
        one_destination_gbit: one * 8.0 / 1e9,
        one_destination_s: one_s,
        many_destinations: used,
        many_destinations_s: many_s,
        speedup: one_s / many_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_is_drawn_from_its_seed_and_its_vms_fit() {
        let a = fleet(50, 10, 7);
        assert_eq!(a, fleet(50, 10, 7));
        assert_ne!(a, fleet(50, 10, 8));
        for h in &a {
            assert!(h.vms.iter().sum::<u64>() <= h.memory / 2, "{h:?}");
        }
    }

    #[test]
    fn the_slowest_nic_for_its_load_bounds_the_makespan() {
        let gb = 1e9;
        // 100 GB out of one host at 5 GB/s into two at 2.5 GB/s each: 20 s.
        let two = [(0, 0, 50.0 * gb), (0, 1, 50.0 * gb)];
        let t = makespan(&two, &[5.0 * gb], &[2.5 * gb, 2.5 * gb]);
        assert!((t - 20.0 - drain::predict::OVERHEAD_S).abs() < 1e-9, "{t}");
        // Into one of them alone: 40 s.
        let one = [(0, 0, 100.0 * gb)];
        let t = makespan(&one, &[5.0 * gb], &[2.5 * gb]);
        assert!((t - 40.0 - drain::predict::OVERHEAD_S).abs() < 1e-9, "{t}");
    }

    #[test]
    fn many_destinations_drain_the_seed_case_faster_than_one() {
        let c = seed_case(1);
        assert!(c.many_destinations > 1, "{c:?}");
        assert!(c.many_destinations_s < c.one_destination_s, "{c:?}");
    }
}
