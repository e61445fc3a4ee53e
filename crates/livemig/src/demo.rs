//! `livemig demo`: the embedded default job. Starts a destination (`livemig receive`, its own
//! process, as on another host) and a source VM (1 GiB, 2 vCPUs, workload `sql`, profile
//! `server`), migrates the running VM over loopback TCP, prints the summary, writes the report,
//! and exits 0 only if the guest verified its memory on the destination.
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::child::{spawn_until, VmProcess};
use guest::WorkloadSpec;
use migration::{MigrateOptions, Report};
use vmm::profile::MemoryProfile;
use vmm::{BootSpec, Console, Kernel, Vm, VmConfig};

#[derive(clap::Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "1G", value_parser = crate::parse_size)]
    pub memory: u64,
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    #[arg(long, default_value = "sql")]
    pub workload: String,
    #[arg(long, default_value = "server")]
    pub memory_profile: MemoryProfile,
    /// tcp, compressed (lz4/zstd per batch, adaptive) or direct (zero-copy).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "compressed", "direct"])]
    pub transport: String,
    #[arg(long, default_value_t = 20)]
    pub downtime_ms: u64,
    /// Page streams beside the control connection (multichannel).
    #[arg(long, default_value_t = 0)]
    pub channels: u16,
    /// Cap what the migration sends (e.g. 200Mbit).
    #[arg(long, value_parser = crate::parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// How long the guest runs before the migration starts.
    #[arg(long, default_value_t = 1500)]
    pub run_ms: u64,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Switch over when rounds stop shrinking instead of throttling the guest's vCPUs.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Guest console file for the source and the destination (default: discarded).
    #[arg(long)]
    pub console: Option<PathBuf>,
}

/// The destination process; stopped if the demo ends early, its directory removed.
struct Destination {
    process: Option<VmProcess>,
    dir: PathBuf,
}

impl Drop for Destination {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `livemig receive` on a free loopback port; returns it and its address.
fn start_destination(
    console: &Option<PathBuf>,
) -> Result<(Destination, String), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("livemig-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut d = Destination { process: None, dir };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let api = d.dir.join("destination.sock");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["receive", "--listen", &addr, "--api"]).arg(&api);
    match console {
        Some(c) => cmd.arg("--console").arg(c),
        None => cmd.arg("--console").arg("/dev/null"),
    };
    let child = spawn_until(&mut cmd, "waiting for a VM", Duration::from_secs(10), None)
        .map_err(|e| format!("the destination did not start listening: {e}"))?;
    d.process = Some(VmProcess { child, api });
    Ok((d, addr))
}

pub fn run(a: DemoArgs) -> Result<Report, Box<dyn std::error::Error>> {
    let spec = WorkloadSpec::parse(&a.workload, a.memory)?;
    let console = a
        .console
        .clone()
        .map(Console::File)
        .unwrap_or(Console::Discard);
    let (destination, addr) = start_destination(&a.console)?;
    println!(
        "source: {} MiB, {} vCPUs, workload {}, memory profile {}; destination: livemig receive on {addr}",
        a.memory >> 20,
        a.vcpus,
        a.workload,
        a.memory_profile
    );
    let vm = Vm::boot(
        VmConfig {
            memory: a.memory,
            vcpus: a.vcpus,
        },
        &BootSpec {
            kernel: Kernel::Workload(spec),
            profile: a.memory_profile,
            seed: 1,
        },
        &console,
    )?;
    vm.io()
        .status
        .wait_for(Duration::from_secs(30), |r| r.heartbeat >= 1)
        .ok_or("the guest never sent a heartbeat")?;
    std::thread::sleep(Duration::from_millis(a.run_ms));
    let vm = Arc::new(Mutex::new(vm));
    let mut opts = MigrateOptions::new(addr);
    opts.policy.downtime_target = Duration::from_millis(a.downtime_ms);
    opts.max_bandwidth = a.max_bandwidth;
    if a.no_auto_converge {
        opts.policy.auto_converge = None;
    }
    opts.transport = a.transport.parse()?;
    opts.channels = a.channels;
    let report = migration::migrate(&vm, &opts, &|_| {})?;
    // The guest runs on at the destination for a moment before the demo stops it.
    std::thread::sleep(Duration::from_millis(300));
    drop(destination);
    println!("{}", report.summary());
    if let Some(p) = &a.report {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}
