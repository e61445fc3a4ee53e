use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod bench;
mod child;
mod demo;
mod migrate_cmd;
mod testbed;
use guest::WorkloadSpec;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm::api::{ApiServer, Client};
use vmm::devices::VerifyResult;
use vmm::profile::{MemoryProfile, ProfileFiller};
use vmm::snapshot;
use vmm::{BootSpec, Console, Kernel, RunState, Vm, VmConfig, VmError};

#[derive(Parser)]
#[command(
    name = "livemig",
    version,
    about = "Live migration of running KVM virtual machines"
)]
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
    /// Serve the control API (HTTP/JSON) on this unix socket.
    #[arg(long)]
    api: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ApiArg {
    /// The VM's API socket.
    #[arg(long)]
    api: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a VM and run it until the guest stops or the process is killed.
    Run(VmArgs),
    /// The main job on an embedded default: migrate a running VM to a destination on this
    /// machine; exits 0 only if the guest verifies its memory on the destination.
    Demo(demo::DemoArgs),
    /// Wait for one incoming VM, then run it (with its API) like `run`.
    Receive {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        api: Option<PathBuf>,
        /// COM1 output file (default: stdout).
        #[arg(long)]
        console: Option<PathBuf>,
    },
    /// Live-migrate the VM behind --api to a `livemig receive` at --to.
    Migrate {
        #[command(flatten)]
        api: ApiArg,
        #[arg(long)]
        to: String,
        /// The pause the guest may see; pre-copy iterates until the rest fits.
        #[arg(long, default_value_t = 20)]
        downtime_ms: u64,
        #[arg(long)]
        max_rounds: Option<u32>,
        /// Cap what the migration sends (e.g. 200Mbit, 1.5Gbit, 100MB), for QoS beside other traffic.
        #[arg(long, value_parser = parse_rate)]
        max_bandwidth: Option<u64>,
        /// tcp; compressed (lz4/zstd per batch, falling back to raw when that is faster); or
        /// direct (zero-copy from guest RAM, read straight into guest RAM).
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "compressed", "direct"])]
        transport: String,
        /// Page streams beside the control connection, all to --to (multichannel).
        #[arg(long, default_value_t = 0)]
        channels: u16,
        /// One page stream per NIC pair: LOCAL>REMOTE,... (e.g. 10.0.1.1>10.0.1.2,10.0.2.1>10.0.2.2).
        #[arg(long)]
        network: Option<String>,
        /// Write the JSON report here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Switch over when rounds stop shrinking instead of throttling the guest's vCPUs
        /// (auto-converge: 20%, then +10% per stall, up to 99%).
        #[arg(long)]
        no_auto_converge: bool,
    },
    /// Measured benchmarks on the testbed (needs root).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Two hosts as network namespaces with the reference NIC layout (needs root).
    Testbed {
        #[command(subcommand)]
        action: TestbedAction,
        /// Namespaces are <name>-a and <name>-b.
        #[arg(long, default_value = "livemig", global = true)]
        name: String,
        /// Shrink every link's rate by this factor (0 < scale <= 1).
        #[arg(long, default_value_t = 1.0, global = true)]
        scale: f64,
    },
    /// Print a VM's status as JSON.
    Status(ApiArg),
    /// Pause a VM's vCPUs.
    Pause(ApiArg),
    /// Resume a paused VM.
    Resume(ApiArg),
    /// Ask the workload guest to verify its memory; exits non-zero unless it reports OK.
    Verify {
        #[command(flatten)]
        api: ApiArg,
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Stop a VM and its process.
    Shutdown(ApiArg),
    /// Write a VM's complete state and memory into a directory.
    Snapshot {
        #[command(flatten)]
        api: ApiArg,
        #[arg(long)]
        out: PathBuf,
    },
    /// Start a new VM process from a snapshot; the guest continues where it stopped.
    Restore {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        api: Option<PathBuf>,
        /// COM1 output file (default: stdout).
        #[arg(long)]
        console: Option<PathBuf>,
        /// Leave the restored VM paused.
        #[arg(long)]
        paused: bool,
    },
    /// Write the workload guest's PVH ELF.
    GuestImage {
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the RAM a VM of --size boots with (memory profile, seed) as sparse blobs in
    /// guest-physical layout, for loading into another VMM; prints QEMU's loader arguments.
    MemoryImage {
        #[arg(long, default_value = "server")]
        profile: MemoryProfile,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Directory for the blobs (ram-<address>.raw).
        #[arg(long)]
        out: PathBuf,
        /// Leave out guest-physical memory below this (firmware and kernel go there).
        #[arg(long, default_value = "2M", value_parser = parse_size)]
        from: u64,
        /// Largest blob (QEMU's loader reads a blob in one read(), which stops at 2 GiB).
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        max_blob: u64,
    },
}

fn console(path: Option<PathBuf>) -> Console {
    path.map(Console::File).unwrap_or(Console::Stdout)
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("answers serialise")
    );
}

/// Runs the VM (and its API) until the guest stops or a client asks for shutdown.
fn serve(vm: Vm, api: Option<&std::path::Path>) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let vm = Arc::new(Mutex::new(vm));
    let server = api
        .map(|p| ApiServer::start(p, vm.clone(), Some(migrate_cmd::api_extension())))
        .transpose()?;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if server.as_ref().is_some_and(|s| s.shutdown_requested()) {
            break;
        }
        let mut g = vm.lock().unwrap_or_else(|e| e.into_inner());
        if g.migrated() {
            // The VM runs elsewhere now; leave once the migrate call has its answer.
            drop(g);
            while server.as_ref().is_some_and(|s| s.in_flight() > 0) {
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("livemig: VM migrated away; source process exiting");
            return Ok(ExitCode::SUCCESS);
        }
        if g.poll() == RunState::Stopped {
            let st = g.status();
            eprintln!(
                "livemig: VM stopped: {}",
                st.stop_reason.unwrap_or_default()
            );
            let code = g.io().status.exit_code();
            drop(g);
            drop(server);
            // isa-debug-exit convention: the guest's value v exits with (v << 1) | 1.
            return Ok(match code {
                Some(c) => ExitCode::from((c << 1) | 1),
                None => ExitCode::SUCCESS,
            });
        }
    }
    drop(server);
    vm.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    transport::parse_rate(s)
        .ok_or_else(|| format!("{s:?} is not a rate (e.g. 200Mbit, 1.5Gbit, 100MB)"))
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Migrate one running VM over each transport on its reference link (tcp and compressed
    /// on 1 GbE, direct on 10 GbE, direct + multichannel on both 10 GbE links), after
    /// measuring each link's raw goodput; prints the table, writes bench.json and bench.png.
    Transports(bench::TransportsArgs),
}

#[derive(Subcommand, Clone, Copy)]
enum TestbedAction {
    /// Create (or bring in line) the namespaces, links, addresses and shaping.
    Up,
    /// Remove everything `up` made.
    Down,
    /// Print the hosts and links, and whether they are there.
    Status,
}

fn parse_size(s: &str) -> Result<u64, String> {
    guest::parse_size(s).ok_or_else(|| format!("{s:?} is not a size (e.g. 512M, 1G)"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIVEMIG_LOG")
                .unwrap_or_else(|_| "warn".into()),
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
            println!(
                "wrote {} ({} bytes)",
                out.display(),
                guest::WORKLOAD_ELF.len()
            );
        }
        Cmd::MemoryImage {
            profile,
            size,
            seed,
            out,
            from,
            max_blob,
        } => {
            std::fs::create_dir_all(&out)?;
            let blobs =
                ProfileFiller::new(profile, seed)?.write_blobs(size, from, max_blob, &out)?;
            for b in &blobs {
                eprintln!(
                    "wrote {} (guest {:#x}, {} MiB)",
                    b.path.display(),
                    b.guest_addr,
                    b.len >> 20
                );
            }
            let qemu: Vec<String> = blobs
                .iter()
                .map(|b| {
                    format!(
                        "-device loader,file={},addr={:#x}",
                        b.path.display(),
                        b.guest_addr
                    )
                })
                .collect();
            println!("{}", qemu.join(" "));
        }
        Cmd::Run(a) => {
            let kernel = match &a.kernel {
                Some(p) => Kernel::Elf {
                    image: std::fs::read(p)
                        .map_err(|e| format!("reading kernel {}: {e}", p.display()))?,
                    cmdline: a.cmdline.clone(),
                },
                None => Kernel::Workload(WorkloadSpec::parse(&a.workload, a.memory)?),
            };
            let console = console(a.console);
            let spec = BootSpec {
                kernel,
                profile: a.memory_profile,
                seed: a.seed,
            };
            let vm = Vm::boot(
                VmConfig {
                    memory: a.memory,
                    vcpus: a.vcpus,
                },
                &spec,
                &console,
            )?;
            return serve(vm, a.api.as_deref());
        }
        Cmd::Restore {
            from,
            api,
            console: con,
            paused,
        } => {
            let t0 = Instant::now();
            let manifest = snapshot::read_manifest(&from)?;
            let vm = Vm::restore(&manifest.state, &console(con), paused, |ram| {
                snapshot::load_memory(&from, &manifest.memory, ram)
                    .map_err(|e| VmError::Restore(e.to_string()))
            })?;
            eprintln!(
                "livemig: restored {} in {} ms",
                from.display(),
                t0.elapsed().as_millis()
            );
            return serve(vm, api.as_deref());
        }
        Cmd::Demo(a) => {
            let r = demo::run(a)?;
            if !r.guest_verified {
                eprintln!(
                    "livemig: demo FAILED: the guest did not verify its memory on the destination"
                );
                return Ok(ExitCode::FAILURE);
            }
            println!("demo OK");
        }
        Cmd::Receive {
            listen,
            api,
            console: con,
        } => {
            let listener = transport::Listener::bind(&listen)?;
            eprintln!("livemig: waiting for a VM on {}", listener.local_addr()?);
            let opts = migration::ReceiveOptions {
                console: console(con),
                ..Default::default()
            };
            let (vm, stats) = migration::receive(&listener, &opts)?;
            eprintln!(
                "livemig: VM received ({} pages, {} zero, {} rounds) and running",
                stats.pages, stats.zero_pages, stats.rounds
            );
            return serve(vm, api.as_deref());
        }
        Cmd::Migrate {
            api,
            to,
            downtime_ms,
            max_rounds,
            max_bandwidth,
            transport,
            channels,
            network,
            report,
            no_auto_converge,
        } => {
            let req = serde_json::json!({
                "to": to, "downtime_ms": downtime_ms, "max_rounds": max_rounds,
                "max_bandwidth": max_bandwidth, "transport": transport,
                "channels": channels, "network": network,
                "auto_converge": !no_auto_converge
            });
            let r = migrate_cmd::migrate(&api.api, req, report)?;
            println!("{}", r.summary());
            // A foreign guest cannot verify itself; only a failed or missing verify of our
            // workload guest makes this a failure.
            let unverifiable = r
                .guest_verify
                .as_deref()
                .is_some_and(|d| d.starts_with("not verifiable"));
            if !r.guest_verified && !unverifiable {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Testbed {
            action,
            name,
            scale,
        } => {
            if name.len() > 7 {
                return Err(format!(
                    "--name {name:?} is too long for interface names (7 characters at most)"
                )
                .into());
            }
            let t = testbed::Testbed::new(&name, scale)?;
            match action {
                TestbedAction::Up => {
                    t.up()?;
                    print_json(&t.status()?);
                }
                TestbedAction::Down => t.down()?,
                TestbedAction::Status => print_json(&t.status()?),
            }
        }
        Cmd::Bench {
            what: BenchCmd::Transports(a),
        } => {
            let r = bench::transports(&a)?;
            print!("{}", bench::render(&r));
            println!(
                "wrote {} and {}",
                a.out.join("bench.json").display(),
                a.out.join("bench.png").display()
            );
            if r.rows.iter().any(|r| r.error.is_some() || !r.verified) {
                eprintln!("livemig: bench: not every migration completed and verified");
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Status(a) => print_json(&Client::new(a.api).status()?),
        Cmd::Pause(a) => print_json(&Client::new(a.api).pause()?),
        Cmd::Resume(a) => print_json(&Client::new(a.api).resume()?),
        Cmd::Shutdown(a) => print_json(&Client::new(a.api).shutdown()?),
        Cmd::Verify { api, timeout_ms } => {
            let r = Client::new(api.api).verify(Duration::from_millis(timeout_ms))?;
            print_json(&r);
            if !matches!(r.last_verify, Some(VerifyResult::Ok { .. })) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Snapshot { api, out } => {
            let out = std::path::absolute(&out)?;
            print_json(&Client::new(api.api).snapshot(&out)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
