//! `livemig cluster`: the cluster's state in etcd, as its host agents keep it (`host serve
//! --cluster`): who is a member and alive, what each holds, and the live-migration settings
//! every agent applies.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cluster::{ClusterTls, Endpoints, Setting, Store};

use crate::CmdResult;

/// How to reach the cluster's etcd.
#[derive(clap::Args, Clone)]
pub struct ClusterArgs {
    /// The etcd members' client URLs (http://H:2379,... or https:// with the TLS files).
    #[arg(long, value_name = "URLS", env = "LIVEMIG_CLUSTER")]
    pub cluster: Option<String>,
    /// The CA that signed the etcd members' certificates.
    #[arg(long, requires_all = ["cluster_cert", "cluster_key"], env = "LIVEMIG_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// This client's certificate for etcd.
    #[arg(long, requires = "cluster_ca", env = "LIVEMIG_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// Its key.
    #[arg(long, requires = "cluster_ca", env = "LIVEMIG_CLUSTER_KEY")]
    pub cluster_key: Option<PathBuf>,
}

impl ClusterArgs {
    /// The endpoints, if `--cluster` was given.
    pub fn endpoints(&self) -> Result<Option<Endpoints>, cluster::ClusterError> {
        let Some(list) = &self.cluster else {
            return Ok(None);
        };
        let mut e = Endpoints::parse(list)?;
        if let (Some(ca), Some(cert), Some(key)) =
            (&self.cluster_ca, &self.cluster_cert, &self.cluster_key)
        {
            e.tls = Some(ClusterTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        Ok(Some(e))
    }

    pub(crate) fn store(&self) -> Result<Store, Box<dyn std::error::Error>> {
        let e = self
            .endpoints()?
            .ok_or("--cluster URLS (or LIVEMIG_CLUSTER) names the cluster's etcd")?;
        Ok(Store::connect(&e)?)
    }
}

#[derive(clap::Subcommand)]
pub enum ClusterCmd {
    /// The members (live or unreachable), their VMs, and the settings.
    Status {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[arg(long)]
        json: bool,
        /// Show it again every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// The cluster's live-migration settings.
    Config {
        #[command(subcommand)]
        what: ConfigCmd,
    },
    /// Take a host out of placement: no VM is sent to it until it is uncordoned.
    Cordon {
        #[command(flatten)]
        cluster: ClusterArgs,
        host: String,
    },
    /// Put a host back into placement.
    Uncordon {
        #[command(flatten)]
        cluster: ClusterArgs,
        host: String,
    },
    /// Rolling maintenance: each host (or --max-unavailable at a time) cordoned, drained into
    /// the other members, given to --exec while empty, waited for until live again, and
    /// uncordoned. Run it where the hosts' agent sockets are.
    Maintenance(crate::maintenance::MaintenanceArgs),
    /// A simulated fleet in a real etcd: N agents (no VMs run) registered, the drain of K of
    /// them planned; the time and etcd bytes of each step and the predicted makespan, then
    /// the seed's 250 GB case into one destination and into many.
    Simulate(crate::simulate::SimulateArgs),
}

#[derive(clap::Subcommand)]
pub enum ConfigCmd {
    /// Set one for every host: transport (tcp|compressed|direct), channels (0-16),
    /// max-bandwidth (e.g. 800Mbit), max-concurrent-per-host (1-64), cpu-baseline
    /// (host|cluster), migration-network (IPv4 CIDRs, comma-separated).
    Set {
        #[command(flatten)]
        cluster: ClusterArgs,
        setting: Setting,
        value: String,
    },
    /// Take one back to the hosts' own default.
    Unset {
        #[command(flatten)]
        cluster: ClusterArgs,
        setting: Setting,
    },
    /// Every setting's effective value and where it came from (cluster or default).
    Get {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[arg(long)]
        json: bool,
    },
}

pub fn main(cmd: ClusterCmd) -> CmdResult {
    match cmd {
        ClusterCmd::Status {
            cluster,
            json,
            watch,
        } => status(&cluster, json, watch),
        ClusterCmd::Config { what } => config(what),
        ClusterCmd::Maintenance(a) => crate::maintenance::main(a),
        ClusterCmd::Simulate(a) => crate::simulate::main(a),
        ClusterCmd::Cordon { cluster, host } => {
            let store = cluster.store()?;
            member(&store, &host)?;
            store.cordon(&host, "operator")?;
            crate::out::say(&format!("cordoned {host}: nothing new is placed there"));
            Ok(ExitCode::SUCCESS)
        }
        ClusterCmd::Uncordon { cluster, host } => {
            let store = cluster.store()?;
            member(&store, &host)?;
            store.uncordon(&host)?;
            crate::out::say(&format!("uncordoned {host}: it takes VMs again"));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Refuses a host the cluster does not know.
fn member(store: &Store, host: &str) -> Result<(), Box<dyn std::error::Error>> {
    if store.status()?.hosts.iter().any(|h| h.name == host) {
        Ok(())
    } else {
        Err(format!("{host} is not a member of the cluster").into())
    }
}

fn status(c: &ClusterArgs, json: bool, watch: bool) -> CmdResult {
    let store = c.store()?;
    loop {
        let st = store.status()?;
        if json {
            crate::out::say(&serde_json::to_string_pretty(&st)?);
        } else {
            print!("{}", st.render());
        }
        if !watch {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(1));
        println!();
    }
}

fn config(what: ConfigCmd) -> CmdResult {
    match what {
        ConfigCmd::Set {
            cluster,
            setting,
            value,
        } => {
            let v = cluster.store()?.set(setting, &value)?;
            crate::out::say(&format!("{} = {v} for every host", setting.name()));
        }
        ConfigCmd::Unset { cluster, setting } => {
            cluster.store()?.unset(setting)?;
            crate::out::say(&format!(
                "{} back to the hosts' default ({})",
                setting.name(),
                setting.default_value()
            ));
        }
        ConfigCmd::Get { cluster, json } => {
            let s = cluster.store()?.settings()?;
            let e = s.effective();
            if json {
                crate::out::say(&serde_json::to_string_pretty(&e)?);
            } else {
                for x in &e {
                    println!("{:<24} {:<26} {}", x.setting, x.value, x.source);
                }
                for (k, why) in &s.refused {
                    eprintln!("livemig: ignored cluster setting {k}: {why}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
