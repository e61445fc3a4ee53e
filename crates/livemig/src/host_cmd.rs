//! `livemig host`: run a host agent (`serve`) and talk to one (`run`, `stop`, `list`, `info`).
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guest::memory_profile::MemoryProfile;
use host::child::Livemig;
use host::{AgentConfig, HostClient, RunRequest, VmInfo};

use crate::args::{parse_duration, parse_size, TlsArgs};
use crate::CmdResult;

#[derive(clap::Subcommand)]
pub enum HostCmd {
    /// Run this host's agent: its VMs, each its own process, and migrations in and out, on
    /// one listening address; its API is DIR/host.sock. VMs keep running when it stops, and
    /// it finds them again when it starts.
    Serve(ServeArgs),
    /// Start a VM on a host.
    Run(RunArgs),
    /// Stop a VM on a host.
    Stop {
        #[command(flatten)]
        host: HostArg,
        name: String,
    },
    /// List a host's VMs.
    List {
        #[command(flatten)]
        host: HostArg,
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What a host holds and can take (JSON).
    Info {
        #[command(flatten)]
        host: HostArg,
    },
}

#[derive(clap::Args)]
pub struct HostArg {
    /// The agent's API socket (DIR/host.sock).
    #[arg(long = "host")]
    pub sock: PathBuf,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Where migrations come in (e.g. 0.0.0.0:7000).
    #[arg(long)]
    listen: String,
    /// The agent's state: host.sock and a directory per VM.
    #[arg(long)]
    dir: PathBuf,
    /// This host's name (default: the system's host name).
    #[arg(long)]
    name: Option<String>,
    /// Incoming migrations at once; more are refused with a reason.
    #[arg(long, default_value_t = 4)]
    max_inbound: usize,
    /// Memory this host gives VMs in all (default: all it has less 256 MiB).
    #[arg(long, value_parser = parse_size)]
    vm_memory: Option<u64>,
    /// The deadline on progress of every migration in or out.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    peer_timeout: Duration,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    net: crate::args::NetHostArgs,
    #[command(flatten)]
    storage: crate::args::StorageArgs,
    #[command(flatten)]
    cpu: crate::args::CpuArgs,
    /// Serve the agent's metrics in the Prometheus text format at http://ADDR:PORT/metrics
    /// (plaintext: bind it to a management address).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,
    /// Join this cluster: the host's record in etcd under a lease it keeps alive, and the
    /// cluster's live-migration settings for its migrations.
    #[command(flatten)]
    cluster: crate::cluster_cmd::ClusterArgs,
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    host: HostArg,
    #[arg(long)]
    name: String,
    /// Guest RAM (e.g. 512M, 1G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    memory: u64,
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Workload preset (idle, web, sql, stress) and/or key=value,... for our guest.
    #[arg(long, default_value = "sql")]
    workload: String,
    /// Boot this PVH ELF instead of the workload guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Command line for --kernel.
    #[arg(long)]
    cmdline: Option<String>,
    /// Fill RAM before boot (server, zero, random, text).
    #[arg(long)]
    memory_profile: Option<MemoryProfile>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    image: crate::args::ImageArgs,
    #[command(flatten)]
    devices: crate::args::DeviceArgs,
}

pub fn main(cmd: HostCmd) -> CmdResult {
    match cmd {
        HostCmd::Serve(a) => serve(a),
        HostCmd::Run(a) => run(a),
        HostCmd::Stop { host, name } => {
            HostClient::new(host.sock).stop(&name)?;
            crate::out::say(&format!("stopped {name}"));
            Ok(ExitCode::SUCCESS)
        }
        HostCmd::List { host, json } => {
            let vms = HostClient::new(host.sock).list()?;
            if json {
                crate::out::say(&serde_json::to_string_pretty(&vms)?);
            } else {
                print!("{}", table(&vms));
            }
            Ok(ExitCode::SUCCESS)
        }
        HostCmd::Info { host } => crate::print_json(&HostClient::new(host.sock).capacity()?),
    }
}

fn serve(a: ServeArgs) -> CmdResult {
    let security = a.tls.required()?;
    let exe = std::env::current_exe()?;
    let livemig = match a.tls.files()? {
        Some(f) if !a.tls.insecure => Livemig::new(exe).with_tls(&f),
        _ => Livemig::new(exe).insecure(),
    }
    .with_net(a.net.bridge.as_deref(), a.net.announce_rounds)
    .with_storage(&a.storage.storage)
    .with_disk_dir(a.storage.disk_dir()?.as_deref());
    let name = a.name.unwrap_or_else(system_host_name);
    let running = host::Agent::start(AgentConfig {
        name: name.clone(),
        listen: a.listen,
        dir: std::path::absolute(&a.dir)?,
        max_inbound: a.max_inbound,
        vm_memory: a.vm_memory,
        peer_timeout: a.peer_timeout,
        security: security.clone(),
        livemig,
        bridge: a.net.bridge.clone(),
        storage: a.storage.storage.clone(),
        disk_dir: a.storage.disk_dir()?,
        cluster: a.cluster.endpoints()?,
        cpu_mask: a.cpu.mask(),
        metrics: a.metrics.clone(),
    })?;
    eprintln!(
        "livemig: host agent {name} listening on {} ({}), API {}",
        running.agent.listen_addr(),
        security.name(),
        running.agent.api_path().display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("livemig: host agent {name} stopping; its VMs keep running");
    running.stop();
    Ok(ExitCode::SUCCESS)
}

fn system_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn run(a: RunArgs) -> CmdResult {
    let mut args = vec!["--workload".to_string(), a.workload, "--seed".into()];
    args.push(a.seed.to_string());
    args.extend(a.image.to_args());
    if let Some(k) = a.kernel {
        args.extend([
            "--kernel".into(),
            std::path::absolute(k)?.display().to_string(),
        ]);
    }
    if let Some(c) = a.cmdline {
        args.extend(["--cmdline".into(), c]);
    }
    if let Some(p) = a.memory_profile {
        args.extend(["--memory-profile".into(), p.to_string()]);
    }
    let vm = HostClient::new(a.host.sock)
        .waiting(Duration::from_secs(90))
        .run(&RunRequest {
            name: a.name,
            memory: a.memory,
            vcpus: a.vcpus,
            devices: a.devices.devices(),
            args,
        })?;
    print!("{}", table(&[vm]));
    Ok(ExitCode::SUCCESS)
}

fn table(vms: &[VmInfo]) -> String {
    let mut out = format!(
        "{:<20} {:<12} {:>8} {:>5} {:>10} {:<16} {:>8}\n",
        "NAME", "STATE", "MEMORY", "VCPUS", "HEARTBEAT", "ORIGIN", "PID"
    );
    for v in vms {
        out += &format!(
            "{:<20} {:<12} {:>7}M {:>5} {:>10} {:<16} {:>8}\n",
            v.name,
            v.state,
            v.memory >> 20,
            v.vcpus,
            v.heartbeat,
            v.origin,
            v.pid
        );
        if let Some(e) = &v.error {
            out += &format!("  {e}\n");
        }
    }
    out
}
