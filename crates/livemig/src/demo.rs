//! `livemig demo`: the embedded default job. Starts a destination (`livemig receive`, its own
//! process, as on another host) and a source VM (1 GiB, 2 vCPUs, workload `sql`, profile
//! `server`), migrates the running VM over loopback TCP, prints the summary, writes the report,
//! and exits 0 only if the guest verified its memory on the destination.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use guest::memory_profile::{Content, MemoryProfile};
use guest::WorkloadSpec;
use host::child::{Livemig, VmProcess};
use migration::Report;
use vmm::{Console, Vm, VmConfig};

use crate::args::{parse_size, MigrateArgs, TransportArgs};
use transport::tls::{Tls, TlsFiles};
use transport::Security;

#[derive(clap::Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub memory: u64,
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    #[arg(long, default_value = "sql")]
    pub workload: String,
    #[arg(long, default_value = "server")]
    pub memory_profile: MemoryProfile,
    #[command(flatten)]
    pub devices: crate::args::DeviceArgs,
    #[command(flatten)]
    pub net: crate::args::NetHostArgs,
    #[command(flatten)]
    pub migrate: MigrateArgs,
    #[command(flatten)]
    pub transport: TransportArgs,
    /// How long the guest runs before the migration starts.
    #[arg(long, default_value_t = 1500)]
    pub run_ms: u64,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Guest console file for the source and the destination (default: discarded).
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Run plaintext instead of the mutual TLS the demo sets up for itself.
    #[arg(long)]
    pub insecure: bool,
}

/// The destination process and its directory; stopped and removed when the demo ends.
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

/// A cluster CA and two hosts' credentials, in the demo's directory: the demo runs with the
/// mutual TLS every migration uses by default, with no set-up of its own.
fn credentials(dir: &std::path::Path) -> Result<(TlsFiles, TlsFiles), Box<dyn std::error::Error>> {
    let tls = dir.join("tls");
    transport::tls::init_cluster(&tls, &["source".into(), "destination".into()])?;
    let files = |h: &str| TlsFiles {
        cert: tls.join(format!("{h}.pem")),
        key: tls.join(format!("{h}.key")),
        ca: tls.join("ca.pem"),
    };
    Ok((files("source"), files("destination")))
}

/// Starts `livemig receive` on a free loopback port; returns it, its address and the
/// source's security.
fn start_destination(
    a: &DemoArgs,
) -> Result<(Destination, String, Security), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("livemig-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut d = Destination { process: None, dir };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let console = a.console.clone().unwrap_or_else(|| "/dev/null".into());
    let mut exe = Livemig::new(std::env::current_exe()?);
    let security = if a.insecure {
        exe = exe.insecure();
        Security::Insecure
    } else {
        let (source, destination) = credentials(&d.dir)?;
        exe = exe.with_tls(&destination);
        Security::Tls(std::sync::Arc::new(Tls::load(&source)?))
    };
    // The destination is this host: it takes the demo's own disks where they are, or with
    // --storage copy writes their copies in its own directory.
    let copies = d.dir.join("disks");
    std::fs::create_dir_all(&copies)?;
    exe = exe
        .with_net(a.net.bridge.as_deref(), a.net.announce_rounds)
        .with_storage(&disk_dirs(&a.devices.devices()))
        .with_disk_dir(Some(&copies));
    let api = d.dir.join("destination.sock");
    d.process = Some(exe.receive(None, &addr, &api, &console, None)?);
    Ok((d, addr, security))
}

/// The directories the disks are in.
fn disk_dirs(devices: &[vmm::DeviceConfig]) -> Vec<PathBuf> {
    devices
        .iter()
        .filter_map(|d| match d {
            vmm::DeviceConfig::Disk(disk) => disk.path.parent().map(Path::to_path_buf),
            vmm::DeviceConfig::Net(_) => None,
        })
        .collect()
}

/// Boots the source VM in this process and lets its guest run a while.
fn boot_source(a: &DemoArgs) -> Result<Vm, Box<dyn std::error::Error>> {
    let console = a
        .console
        .clone()
        .map(Console::File)
        .unwrap_or(Console::Discard);
    let spec = WorkloadSpec::parse(&a.workload, a.memory)?;
    let written = spec.written_bytes();
    let kernel = crate::workload_kernel(spec);
    let config = VmConfig {
        devices: a.devices.devices(),
        ..VmConfig::new(a.memory, a.vcpus)
    };
    let prefill = crate::profile_prefill(
        Some(Content {
            profile: a.memory_profile,
            seed: 1,
            image: None,
        }),
        written,
    );
    let vm = Vm::boot(config, &kernel, &console, &a.net.options(), prefill)?;
    vm.io()
        .status
        .wait_for(Duration::from_secs(30), |r| r.heartbeat >= 1)
        .ok_or("the guest never sent a heartbeat")?;
    std::thread::sleep(Duration::from_millis(a.run_ms));
    Ok(vm)
}

pub fn run(a: &DemoArgs) -> Result<Report, Box<dyn std::error::Error>> {
    let (destination, addr, security) = start_destination(a)?;
    crate::out::say(&format!(
        "source: {} MiB, {} vCPUs, workload {}, memory profile {}; destination: livemig receive on {addr}",
        a.memory >> 20,
        a.vcpus,
        a.workload,
        a.memory_profile
    ));
    let mut opts = a.migrate.request(addr, &a.transport)?.options()?;
    opts.security = Some(security);
    let vm: Mutex<Vm> = Mutex::new(boot_source(a)?);
    let report = migration::migrate(&vm, &opts, &|_| {})?;
    // The guest runs on at the destination for a moment before the demo stops it.
    std::thread::sleep(Duration::from_millis(300));
    drop(destination);
    crate::out::say(&report.summary());
    if let Some(p) = &a.report {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}

/// `livemig demo`: succeeds only if the guest verified its memory on the destination.
pub fn main(a: DemoArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let r = run(&a)?;
    if !r.guest_verified {
        eprintln!("livemig: demo FAILED: the guest did not verify its memory on the destination");
        return Ok(ExitCode::FAILURE);
    }
    crate::out::say("demo OK");
    Ok(ExitCode::SUCCESS)
}
