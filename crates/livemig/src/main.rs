use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use guest::WorkloadSpec;
use vmm::profile::{MemoryProfile, ProfileFiller};
use vmm::{BootSpec, Console, Kernel, RunState, Vm, VmConfig};

#[derive(Parser)]
#[command(name = "livemig", version, about = "Live migration of running KVM virtual machines")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct VmArgs {
    /// Guest RAM (e.g. 512M, 1G, 8G).
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
    #[arg(long, default_value = "")]
    cmdline: String,
    #[arg(long, default_value = "server")]
    memory_profile: MemoryProfile,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// COM1 output file (default: stdout).
    #[arg(long)]
    console: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a VM and run it until the guest stops or the process is killed.
    Run(VmArgs),
    /// Write the workload guest's PVH ELF.
    GuestImage {
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a memory profile's bytes as a raw (sparse) file.
    MemoryImage {
        #[arg(long, default_value = "server")]
        profile: MemoryProfile,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    guest::parse_size(s).ok_or_else(|| format!("{s:?} is not a size (e.g. 512M, 1G)"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIVEMIG_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("livemig: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cli.cmd {
        Cmd::GuestImage { out } => {
            std::fs::write(&out, guest::WORKLOAD_ELF)?;
            println!("wrote {} ({} bytes)", out.display(), guest::WORKLOAD_ELF.len());
        }
        Cmd::MemoryImage { profile, size, seed, out } => {
            let st = ProfileFiller::new(profile, seed)?.write_image(size, &out)?;
            println!("wrote {} ({size} bytes): {st:?}", out.display());
        }
        Cmd::Run(a) => {
            let kernel = match &a.kernel {
                Some(p) => Kernel::Elf { image: std::fs::read(p)?, cmdline: a.cmdline.clone() },
                None => Kernel::Workload(WorkloadSpec::parse(&a.workload, a.memory)?),
            };
            let console = a.console.clone().map(Console::File).unwrap_or(Console::Stdout);
            let spec = BootSpec { kernel, profile: a.memory_profile, seed: a.seed };
            let mut vm = Vm::boot(VmConfig { memory: a.memory, vcpus: a.vcpus }, &spec, &console)?;
            loop {
                std::thread::sleep(Duration::from_millis(100));
                if vm.poll() == RunState::Stopped {
                    let st = vm.status();
                    eprintln!("livemig: VM stopped: {}", st.stop_reason.unwrap_or_default());
                    break;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
