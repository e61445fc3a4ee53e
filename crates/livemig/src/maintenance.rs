//! `livemig cluster maintenance`: rolling maintenance of cluster members. Each batch of hosts
//! (`--max-unavailable` at a time) is cordoned, drained into the other members, handed to
//! the operator's command while empty, waited for until its agent is live again, and
//! uncordoned; then the next. Any step that fails stops the run with that batch cordoned,
//! so nothing is placed on a host in an unknown state.
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drain::{Budget, Concurrency, DrainOptions, Order};

use crate::cluster_cmd::ClusterArgs;
use crate::CmdResult;

#[derive(clap::Args)]
pub struct MaintenanceArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The hosts, in the order they are taken down.
    #[arg(long, value_delimiter = ',', required = true)]
    hosts: Vec<String>,
    /// Hosts down at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    max_unavailable: u16,
    /// Run this (with `sh -c`) for each host while it is empty: the patch, the reboot. It
    /// gets LIVEMIG_HOST (the host's name) and LIVEMIG_HOST_API (its agent's socket).
    #[arg(long)]
    exec: Option<String>,
    /// How long a host has to be live in the cluster again after the command.
    #[arg(long, default_value = "10m", value_parser = crate::args::parse_duration)]
    rejoin_within: Duration,
}

/// The hosts in batches of `n`, in the order given.
pub fn batches(hosts: &[String], n: usize) -> Vec<Vec<String>> {
    hosts.chunks(n.max(1)).map(<[String]>::to_vec).collect()
}

pub fn main(a: MaintenanceArgs) -> CmdResult {
    let store = a.cluster.store()?;
    let interrupted = crate::drain_cmd::interrupt_flag()?;
    let members = store.status()?;
    if let Some(h) = a
        .hosts
        .iter()
        .find(|h| !members.hosts.iter().any(|m| &m.name == *h))
    {
        return Err(format!("{h} is not a member of the cluster").into());
    }
    for batch in batches(&a.hosts, usize::from(a.max_unavailable)) {
        if interrupted.load(Ordering::SeqCst) {
            return Err("interrupted: the hosts not yet done were left as they were".into());
        }
        maintain(&a, &store, &batch, &interrupted)?;
    }
    crate::out::say(&format!(
        "maintenance done: {} host(s), every VM running on one host",
        a.hosts.len()
    ));
    Ok(ExitCode::SUCCESS)
}

/// One batch: cordoned together (so none of them takes the others' VMs), drained one after
/// the other, the command run on each, each waited for, all uncordoned.
fn maintain(
    a: &MaintenanceArgs,
    store: &cluster::Store,
    batch: &[String],
    interrupted: &Arc<AtomicBool>,
) -> Result<(), Box<dyn std::error::Error>> {
    for h in batch {
        store.cordon(h, "maintenance")?;
    }
    for h in batch {
        let api = drain_host(store, h, interrupted)?;
        if let Some(cmd) = &a.exec {
            run_exec(cmd, h, &api)?;
        }
    }
    for h in batch {
        wait_live(store, h, a.rejoin_within)?;
        store.uncordon(h)?;
        crate::out::say(&format!("{h}: back in the cluster and uncordoned"));
    }
    Ok(())
}

/// Drains `host` into the other live, uncordoned members: here if its agent's socket is
/// here, else by its agent (ordered through the cluster). Its agent's socket.
fn drain_host(
    store: &cluster::Store,
    host: &str,
    interrupted: &Arc<AtomicBool>,
) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    crate::out::say(&format!("{host}: draining"));
    if !crate::drain_cmd::api_here(store, host)? {
        let done = crate::drain_cmd::drain_by_agent(store, host, Vec::new(), interrupted)?;
        crate::out::say(&format!("{host}: {}", done.summary));
        if !(done.state == cluster::DrainState::Done && done.complete) {
            return Err(format!("{host} is not empty: stopped here, with it cordoned").into());
        }
        let api = store
            .status()?
            .hosts
            .into_iter()
            .find(|h| h.name == host)
            .and_then(|h| h.record)
            .map(|r| r.api)
            .unwrap_or_default();
        return Ok(api);
    }
    let (from, to) = crate::drain_cmd::in_cluster(store, host, false)?;
    let o = DrainOptions {
        from: from.clone(),
        to,
        request: migration::MigrateRequest::default(),
        concurrency: Concurrency::Auto,
        order: Order::Auto,
        budget: Budget {
            max_bandwidth: None,
            reserve: 0.0,
            reserve_cpu: None,
        },
        retries: 1,
        dedup_cache: 0,
        dry_run: false,
        probe_ms: 1000,
        sample_ms: 500,
        show: crate::drain_cmd::show(),
        interrupted: interrupted.clone(),
    };
    let r = drain::drain(&o)?;
    crate::out::say(&format!("{host}: {}", r.summary));
    if !r.complete() {
        return Err(format!("{host} is not empty: stopped here, with it cordoned").into());
    }
    Ok(from)
}

fn run_exec(cmd: &str, host: &str, api: &std::path::Path) -> Result<(), String> {
    crate::out::say(&format!("{host}: empty; running {cmd:?}"));
    let st = Command::new("sh")
        .args(["-c", cmd])
        .env("LIVEMIG_HOST", host)
        .env("LIVEMIG_HOST_API", api)
        .status()
        .map_err(|e| format!("{host}: running {cmd:?}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!(
            "{host}: {cmd:?} failed ({st}): stopped here, with it cordoned and empty"
        ))
    }
}

/// Waits for `host`'s agent to be live in the cluster (its record present).
fn wait_live(store: &cluster::Store, host: &str, within: Duration) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let live = store
            .status()
            .map(|s| s.hosts.iter().any(|h| h.name == host && h.record.is_some()));
        if matches!(live, Ok(true)) {
            return Ok(());
        }
        if t.elapsed() > within {
            return Err(format!(
                "{host} did not rejoin the cluster within {within:?}: left cordoned"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_go_down_in_batches_in_the_order_given() {
        let h: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_eq!(batches(&h, 1), [vec!["a"], vec!["b"], vec!["c"]]);
        assert_eq!(batches(&h, 2), [vec!["a", "b"], vec!["c"]]);
        assert_eq!(batches(&h, 5), [vec!["a", "b", "c"]]);
    }
}
