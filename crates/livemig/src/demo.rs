//! `livemig demo`: the embedded default job. Boots the workload guest, lets it dirty memory,
//! has it verify, snapshots the running VM, restores it into a fresh KVM VM and has the guest
//! verify again there. Exits 0 only if both verifies pass and the heartbeat carried on.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use guest::WorkloadSpec;
use serde::Serialize;
use vmm::devices::VerifyResult;
use vmm::profile::MemoryProfile;
use vmm::{snapshot, BootSpec, Console, Kernel, Vm, VmConfig, VmError};

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
    /// How long the guest runs before the snapshot.
    #[arg(long, default_value_t = 2000)]
    pub run_ms: u64,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Guest console file (default: discarded).
    #[arg(long)]
    pub console: Option<PathBuf>,
}

#[derive(Serialize)]
pub struct DemoReport {
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub workload: String,
    pub boot_to_first_heartbeat_ms: u64,
    pub resident_bytes: u64,
    pub verify_before: Option<VerifyResult>,
    pub heartbeat_at_snapshot: u64,
    pub snapshot_ms: u64,
    pub snapshot_data_bytes: u64,
    pub restore_ms: u64,
    pub heartbeat_after_restore: u64,
    pub verify_after: Option<VerifyResult>,
    pub skipped_state: Vec<String>,
    pub ok: bool,
}

fn verify(vm: &mut Vm) -> Option<VerifyResult> {
    let io = vm.io().clone();
    let before = io.status.report().verify_count;
    io.status.request_verify();
    io.status
        .wait_for(Duration::from_secs(60), |r| r.verify_count > before)
        .and_then(|r| r.last_verify)
}

pub fn run(a: DemoArgs) -> Result<DemoReport, Box<dyn std::error::Error>> {
    let spec = WorkloadSpec::parse(&a.workload, a.memory)?;
    let console = a
        .console
        .clone()
        .map(Console::File)
        .unwrap_or(Console::Discard);
    let config = VmConfig {
        memory: a.memory,
        vcpus: a.vcpus,
    };
    println!(
        "booting {} MiB, {} vCPUs, workload {}, memory profile {}",
        a.memory >> 20,
        a.vcpus,
        a.workload,
        a.memory_profile
    );
    let t0 = Instant::now();
    let boot = BootSpec {
        kernel: Kernel::Workload(spec),
        profile: a.memory_profile,
        seed: 1,
    };
    let mut vm = Vm::boot(config, &boot, &console)?;
    vm.io()
        .status
        .wait_for(Duration::from_secs(30), |r| r.heartbeat >= 1)
        .ok_or("the guest never sent a heartbeat")?;
    let boot_ms = t0.elapsed().as_millis() as u64;
    println!(
        "first heartbeat after {boot_ms} ms; running for {} ms",
        a.run_ms
    );
    std::thread::sleep(Duration::from_millis(a.run_ms));
    let verify_before = verify(&mut vm);
    println!("guest verify: {verify_before:?}");
    let resident = vm.status().resident_bytes;

    let dir = std::env::temp_dir().join(format!("livemig-demo-{}", std::process::id()));
    let t1 = Instant::now();
    vm.pause()?;
    let state = vm.capture()?;
    let snap = snapshot::write(&dir, &state, vm.ram())?;
    let snapshot_ms = t1.elapsed().as_millis() as u64;
    let hb_at_snapshot = state.guest.heartbeat;
    let skipped: Vec<String> = state
        .skipped
        .iter()
        .map(|s| format!("{}: {}", s.what, s.why))
        .collect();
    vm.shutdown();
    drop(vm);
    println!(
        "snapshot: {} ms, {} MiB of data written (heartbeat {hb_at_snapshot})",
        snapshot_ms,
        snap.data_bytes_written >> 20
    );

    let t2 = Instant::now();
    let manifest = snapshot::read_manifest(&dir)?;
    let mut restored = Vm::restore(&manifest.state, &console, false, |ram| {
        snapshot::load_memory(&dir, &manifest.memory, ram)
            .map_err(|e| VmError::Restore(e.to_string()))
    })?;
    let restore_ms = t2.elapsed().as_millis() as u64;
    let hb_after = restored
        .io()
        .status
        .wait_for(Duration::from_secs(10), |r| r.heartbeat > hb_at_snapshot)
        .map_or(0, |r| r.heartbeat);
    let verify_after = verify(&mut restored);
    restored.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    println!("restore: {restore_ms} ms; heartbeat continued at {hb_after}; guest verify: {verify_after:?}");

    let ok = matches!(verify_before, Some(VerifyResult::Ok { .. }))
        && matches!(verify_after, Some(VerifyResult::Ok { .. }))
        && hb_after > hb_at_snapshot;
    Ok(DemoReport {
        memory_bytes: a.memory,
        vcpus: a.vcpus,
        workload: a.workload,
        boot_to_first_heartbeat_ms: boot_ms,
        resident_bytes: resident,
        verify_before,
        heartbeat_at_snapshot: hb_at_snapshot,
        snapshot_ms,
        snapshot_data_bytes: snap.data_bytes_written,
        restore_ms,
        heartbeat_after_restore: hb_after,
        verify_after,
        skipped_state: skipped,
        ok,
    })
}
