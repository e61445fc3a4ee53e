//! `livemig demo`: the embedded default job. Boots a source VM (1 GiB, 2 vCPUs, workload
//! `sql`, profile `server`) and a destination on this machine, migrates the running VM over
//! loopback TCP, prints the summary, writes the report, and exits 0 only if the guest verified
//! its memory on the destination.
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest::WorkloadSpec;
use migration::{MigrateOptions, ReceiveOptions, Report};
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
    /// Only tcp exists so far.
    #[arg(long, default_value = "tcp", value_parser = ["tcp"])]
    pub transport: String,
    #[arg(long, default_value_t = 20)]
    pub downtime_ms: u64,
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

pub fn run(a: DemoArgs) -> Result<Report, Box<dyn std::error::Error>> {
    let spec = WorkloadSpec::parse(&a.workload, a.memory)?;
    let console = a
        .console
        .clone()
        .map(Console::File)
        .unwrap_or(Console::Discard);
    let listener = transport::Listener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let dst_console = console.clone();
    let destination = std::thread::Builder::new()
        .name("destination".into())
        .spawn(move || {
            let conn = listener.accept()?;
            let opts = ReceiveOptions {
                console: dst_console,
                ..Default::default()
            };
            let (mut vm, _) = migration::receive(conn, &opts)?;
            // Let the migrated guest run on for a moment, then stop it: the demo is over.
            std::thread::sleep(Duration::from_millis(500));
            vm.shutdown();
            Ok::<_, migration::MigrationError>(())
        })?;

    println!(
        "source: {} MiB, {} vCPUs, workload {}, memory profile {}; destination {addr}",
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
    let result = migration::migrate(&vm, &opts, &|_| {});
    let dst = destination
        .join()
        .map_err(|_| "the destination thread panicked")?;
    // The destination's error is the cause when both failed (the source then sees a closed pipe).
    if let Err(e) = dst {
        return Err(format!(
            "destination: {e}{}",
            result
                .err()
                .map(|s| format!("; source: {s}"))
                .unwrap_or_default()
        )
        .into());
    }
    let report = result?;
    println!("{}", report.summary());
    if let Some(p) = &a.report {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}
