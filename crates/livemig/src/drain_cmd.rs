//! `livemig drain`: empty a host agent's host into others.
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use drain::{Budget, Concurrency, Destination, DrainOptions, Order};

use crate::args::{MigrateArgs, TransportArgs};
use crate::CmdResult;

#[derive(clap::Args)]
pub struct DrainArgs {
    /// The source agent's API socket.
    #[arg(long, required_unless_present = "host", conflicts_with = "host")]
    from: Option<PathBuf>,
    /// The destination agents' API sockets.
    #[arg(long, value_delimiter = ',', required_unless_present = "host")]
    to: Vec<PathBuf>,
    /// Drain this cluster member (with --cluster): cordon it, and move its VMs to the other
    /// live members that are not cordoned, as the plan places them. Run it on that host.
    #[arg(long, requires = "cluster", conflicts_with_all = ["to", "address"])]
    host: Option<String>,
    /// Hand the drain to the host's agent through the cluster and follow it from here (the
    /// default when its API socket is not on this machine).
    #[arg(long, requires = "host")]
    via_agent: bool,
    #[command(flatten)]
    cluster: crate::cluster_cmd::ClusterArgs,
    /// Per destination, the HOST:PORT sources connect to (the link); default: where it listens.
    #[arg(long, value_delimiter = ',')]
    address: Vec<String>,
    /// Migrations at once: a number, or auto (adds one while the aggregate throughput grows).
    #[arg(long, default_value = "auto")]
    concurrency: Concurrency,
    /// auto (longest predicted first, VMs dirtying faster than their share last), largest,
    /// smallest or name.
    #[arg(long, default_value = "auto")]
    order: Order,
    /// Share of each link left for other traffic (e.g. 20 or 20%).
    #[arg(long, default_value = "0", value_parser = parse_percent)]
    reserve: f64,
    /// Share of each host's CPU left to its guests (e.g. 50 or 50%): the drain's bandwidth
    /// is lowered while its migrations take more than the rest, measured every 0.5 s.
    #[arg(long, value_parser = parse_percent)]
    reserve_cpu: Option<f64>,
    /// Attempts after the first for a VM whose migration failed (after the other VMs).
    #[arg(long, default_value_t = 1)]
    retries: u32,
    /// Page cache each destination keeps of the pages this drain brings it, so a later VM's
    /// page with the same content goes as a reference (dedup across VMs; 0: none). Counted
    /// against the destination's free memory, within the room its planned VMs leave; not
    /// used by the direct transport.
    #[arg(long, default_value = "1G", value_parser = crate::args::parse_size)]
    dedup_cache: u64,
    /// Print the plan (order, placement, concurrency) and an ETA; move nothing.
    #[arg(long)]
    dry_run: bool,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Measure each link this long first (0: do not).
    #[arg(long, default_value_t = 1000)]
    probe_ms: u64,
    /// Sample each VM (touched memory, compressibility, dirty rate) this long first, for the
    /// order, the plan's predictions and the ETA (0: do not).
    #[arg(long, default_value_t = 500)]
    sample_ms: u64,
    /// Every migration's options; --max-bandwidth is the whole drain's budget, shared evenly
    /// by the migrations in flight.
    #[command(flatten)]
    migrate: MigrateArgs,
    #[command(flatten)]
    transport: TransportArgs,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage"))?;
    if (0.0..100.0).contains(&v) {
        Ok(v / 100.0)
    } else {
        Err(format!("{s}: a percentage from 0 to 99"))
    }
}

/// A cluster member's drain: the host cordoned (not on a dry run), its agent's socket, and
/// every other live member that is not cordoned as a destination.
pub(crate) fn in_cluster(
    store: &cluster::Store,
    host: &str,
    dry_run: bool,
) -> Result<(PathBuf, Vec<Destination>), Box<dyn std::error::Error>> {
    let status = store.status()?;
    let me = status
        .hosts
        .iter()
        .find(|h| h.name == host)
        .ok_or_else(|| format!("{host} is not a member of the cluster"))?;
    let record = me
        .record
        .as_ref()
        .ok_or_else(|| format!("{host} is unreachable: its agent must be live to drain it"))?;
    if !record.api.exists() {
        return Err(format!(
            "{host}'s agent API ({}) is not on this machine: run the drain on {host}",
            record.api.display()
        )
        .into());
    }
    // The cluster's migration network, if set: each destination on its address there.
    let nets = store
        .settings()?
        .migration_network
        .map(|n| cluster::settings::parse_networks(&n))
        .transpose()?;
    let to: Vec<Destination> = status
        .drain_targets(host)
        .into_iter()
        .filter_map(|r| {
            let address = match &nets {
                Some(n) => r.address_in(n),
                None => r.address(),
            };
            if address.is_none() {
                crate::out::say(&format!(
                    "left out {}: no address on the migration network",
                    r.name
                ));
            }
            Some(Destination::Member(drain::Member {
                name: r.name.clone(),
                address: address?,
                room: r.room,
                bridge: r.bridge.is_some(),
                storage: r.storage.clone(),
                max_inbound: r.max_inbound,
                cpu_features: r.cpu_features.clone(),
            }))
        })
        .collect();
    if to.is_empty() {
        return Err(format!("no live member of the cluster but {host} takes VMs").into());
    }
    if !dry_run {
        store.cordon(host, "drain")?;
        crate::out::say(&format!(
            "cordoned {host}: nothing new is placed there until `livemig cluster uncordon {host}`"
        ));
    }
    Ok((record.api.clone(), to))
}

/// Progress bars on a terminal, lines otherwise.
pub(crate) fn show() -> drain::view::Show {
    if std::io::stderr().is_terminal() {
        drain::view::Show::Bars
    } else {
        drain::view::Show::Lines
    }
}

/// Ctrl-C and SIGTERM set the flag (a drain then cancels what is in flight and starts nothing
/// more); a second one ends the process at once.
pub(crate) fn interrupt_flag() -> Result<Arc<AtomicBool>, std::io::Error> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal ends the drain at once (the migrations' leases then cancel them).
        signal_hook::flag::register_conditional_shutdown(sig, 130, interrupted.clone())?;
        signal_hook::flag::register(sig, interrupted.clone())?;
    }
    Ok(interrupted)
}

/// Flags of `drain` that the agent's own drain gets from the agent, with their values.
const NOT_FORWARDED: [&str; 6] = [
    "--cluster",
    "--cluster-ca",
    "--cluster-cert",
    "--cluster-key",
    "--host",
    "--report",
];

/// This command's `drain` options, less those the agent sets (`--via-agent` too).
fn forwarded(argv: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = argv.iter().skip_while(|a| *a != "drain").skip(1);
    while let Some(a) = it.next() {
        let flag = a.split_once('=').map_or(a.as_str(), |(f, _)| f);
        if NOT_FORWARDED.contains(&flag) {
            if !a.contains('=') {
                it.next();
            }
        } else if a != "--via-agent" {
            out.push(a.clone());
        }
    }
    out
}

/// The drain of `host` by its own agent: ordered through the cluster, followed until it ends;
/// Ctrl-C asks the agent to interrupt it.
fn delegate(a: &DrainArgs, host: &str) -> CmdResult {
    let store = a.cluster.store()?;
    let args = forwarded(&std::env::args().collect::<Vec<_>>());
    let interrupted = interrupt_flag()?;
    let done = drain_by_agent(&store, host, args, &interrupted)?;
    if let (Some(p), Some(r)) = (&a.report, &done.report) {
        std::fs::write(p, serde_json::to_vec_pretty(r)?)?;
    }
    crate::out::say(&done.summary);
    Ok(
        if done.state == cluster::DrainState::Done && done.complete {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// Orders `host`'s agent to drain it with `args`, and follows the order until it ends; sets
/// `cancel` in it once `interrupted` is. The order as it ended.
pub(crate) fn drain_by_agent(
    store: &cluster::Store,
    host: &str,
    args: Vec<String>,
    interrupted: &AtomicBool,
) -> Result<cluster::DrainOrder, Box<dyn std::error::Error>> {
    let live = store
        .status()?
        .hosts
        .iter()
        .any(|h| h.name == host && h.record.is_some());
    if !live {
        return Err(
            format!("{host} is not a live member of the cluster: no agent to drain it").into(),
        );
    }
    let order = cluster::DrainOrder {
        id: rand::random(),
        state: cluster::DrainState::Requested,
        args,
        cancel: false,
        complete: false,
        summary: String::new(),
        report: None,
    };
    if !store.order_drain(host, &order)? {
        return Err(format!(
            "a drain of {host} is under way already (drains/{host} in the cluster)"
        )
        .into());
    }
    crate::out::say(&format!("ordered {host}'s agent to drain it; following"));
    let mut last = cluster::DrainState::Requested;
    let mut asked_cancel = false;
    let t = std::time::Instant::now();
    let done = loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let Some(now) = store.drain_order(host)?.filter(|o| o.id == order.id) else {
            return Err(format!("{host}'s drain order was taken away").into());
        };
        if interrupted.load(std::sync::atomic::Ordering::SeqCst) && !asked_cancel {
            let cancel = cluster::DrainOrder {
                cancel: true,
                ..now.clone()
            };
            asked_cancel = store.update_drain(host, &now, &cancel)?;
            crate::out::say("asked the agent to interrupt the drain");
        }
        if now.state != last {
            crate::out::say(&format!("{host}: drain {:?}", now.state).to_lowercase());
            last = now.state;
        }
        match now.state {
            cluster::DrainState::Done | cluster::DrainState::Failed => break now,
            // Nobody took it: the agent is not running, or not in this cluster.
            cluster::DrainState::Requested if t.elapsed() > std::time::Duration::from_secs(30) => {
                store.clear_drain(host)?;
                return Err(
                    format!("{host}'s agent did not take the drain order within 30 s").into(),
                );
            }
            _ => {}
        }
    };
    store.clear_drain(host)?;
    Ok(done)
}

/// Whether `host`'s agent API socket (as its record says) is on this machine.
pub(crate) fn api_here(
    store: &cluster::Store,
    host: &str,
) -> Result<bool, Box<dyn std::error::Error>> {
    Ok(store
        .status()?
        .hosts
        .iter()
        .find(|h| h.name == host)
        .and_then(|h| h.record.as_ref())
        .is_some_and(|r| r.api.exists()))
}

pub fn main(a: DrainArgs) -> CmdResult {
    if let Some(host) = &a.host {
        if a.via_agent || !api_here(&a.cluster.store()?, host)? {
            return delegate(&a, host);
        }
    }
    if !a.address.is_empty() && a.address.len() != a.to.len() {
        return Err(format!(
            "{} --address for {} --to: give one per destination",
            a.address.len(),
            a.to.len()
        )
        .into());
    }
    let interrupted = interrupt_flag()?;
    let mut request = a.migrate.request(String::new(), &a.transport)?;
    request.max_bandwidth = None;
    let (from, to) = match &a.host {
        Some(host) => in_cluster(&a.cluster.store()?, host, a.dry_run)?,
        None => (
            a.from
                .clone()
                .ok_or("--from the source agent's API socket")?,
            a.to.iter()
                .enumerate()
                .map(|(i, sock)| Destination::Agent {
                    sock: sock.clone(),
                    address: a.address.get(i).cloned(),
                })
                .collect(),
        ),
    };
    let o = DrainOptions {
        from,
        to,
        request,
        concurrency: a.concurrency,
        order: a.order,
        budget: Budget {
            max_bandwidth: a.migrate.max_bandwidth,
            reserve: a.reserve,
            reserve_cpu: a.reserve_cpu,
        },
        retries: a.retries,
        dedup_cache: a.dedup_cache,
        dry_run: a.dry_run,
        probe_ms: a.probe_ms,
        sample_ms: a.sample_ms,
        show: show(),
        interrupted,
    };
    let r = drain::drain(&o)?;
    if let Some(p) = &a.report {
        std::fs::write(p, serde_json::to_vec_pretty(&r)?)?;
    }
    if a.dry_run {
        print!("{}", r.plan_table());
        return Ok(ExitCode::SUCCESS);
    }
    crate::out::say(&r.summary);
    Ok(if r.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_gets_the_drain_options_but_not_the_cluster_host_or_report() {
        let argv: Vec<String> = [
            "livemig",
            "drain",
            "--cluster",
            "http://a:2379",
            "--host=a",
            "--via-agent",
            "--probe-ms",
            "0",
            "--report",
            "r.json",
            "--cluster-ca=ca.pem",
            "--transport",
            "compressed",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            forwarded(&argv),
            ["--probe-ms", "0", "--transport", "compressed"]
        );
    }
}
