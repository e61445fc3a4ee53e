//! `livemig demo`: the embedded default job. Starts a destination (`livemig receive`, its own
//! process, as on another host) and a source VM (1 GiB, 2 vCPUs, workload `sql`, profile
//! `server`), migrates the running VM over loopback TCP, prints the summary, writes the report,
//! and exits 0 only if the guest verified its memory on the destination.
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest::WorkloadSpec;
use migration::{MigrateOptions, Report};
use vmm::api::Client;
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
    /// Guest console file for the source and the destination (default: discarded).
    #[arg(long)]
    pub console: Option<PathBuf>,
}

/// The destination process; killed if the demo ends early.
struct Destination {
    child: std::process::Child,
    api: PathBuf,
    dir: PathBuf,
}

impl Drop for Destination {
    fn drop(&mut self) {
        let _ = Client::new(&self.api).shutdown();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `livemig receive` on a free loopback port; returns it and its address.
fn start_destination(
    console: &Option<PathBuf>,
) -> Result<(Destination, String), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("livemig-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let api = dir.join("destination.sock");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["receive", "--listen", &addr, "--api"]).arg(&api);
    match console {
        Some(c) => cmd.arg("--console").arg(c),
        None => cmd.arg("--console").arg("/dev/null"),
    };
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    // It says when it listens (connecting to check would take its one accept).
    let mut err = child.stderr.take().ok_or("no stderr pipe")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    let t = Instant::now();
    while !String::from_utf8_lossy(&seen).contains("waiting for a VM") {
        if t.elapsed() > Duration::from_secs(10) {
            return Err("the destination did not start listening".into());
        }
        match err.read(&mut buf) {
            Ok(0) | Err(_) => {
                return Err(
                    format!("the destination exited: {}", String::from_utf8_lossy(&seen)).into(),
                )
            }
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    // Keep draining its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut err, &mut std::io::sink());
    });
    Ok((Destination { child, api, dir }, addr))
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
