//! `livemig-bench`: livemig's measured benchmarks, a binary apart from the `livemig` users
//! install (it drives QEMU, builds network namespaces and draws charts). Run as root.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cliargs::{parse_size, MigrateArgs};
use guest::memory_profile::{MemoryProfile, DEFAULT_IMAGE_SHARE_PCT};

type CmdResult = Result<ExitCode, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "livemig-bench",
    version,
    about = "livemig's measured benchmarks on an emulated two-host network (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Migrate one running VM over each transport on its reference link (tcp and compressed
    /// on 1 GbE, direct on 10 GbE, direct + multichannel on both 10 GbE links), after
    /// measuring each link's raw goodput; prints the table, writes bench.json and bench.png.
    Transports(TransportsArgs),
    /// Migrate a VM whose guest outruns the link by pre-copy (auto-converge), post-copy after
    /// the first pass and hybrid, over 1 GbE and 10 GbE, once per memory size (QEMU's
    /// pre-copy and post-copy beside it with --peer qemu); prints the table with the guest's
    /// own pace during each migration against before it and the fault latency; writes
    /// bench.json and bench.png per size.
    Postcopy(PostcopyArgs),
    /// Drain N VMs between the testbed's hosts once per configuration (tcp at concurrency 2,
    /// the unoptimised row; then tcp, compressed, direct and direct + multichannel at the
    /// concurrencies asked for, a level's transports one after the other, each from freshly
    /// booted guests), QEMU beside it with --peer qemu; prints the table with the
    /// drain-time model's prediction for each row and the reference's scenarios; writes
    /// bench.json and bench.png.
    Drain(DrainBenchArgs),
    /// Migrate a VM with a disk and a NIC over each transport while it writes its disk and the
    /// client namespace sends it UDP echo requests (QEMU beside it with --peer qemu); prints
    /// the table (downtime, the client's longest silence, requests and disk writes lost),
    /// writes bench.json and bench.png (the round trips across each switchover).
    Devices(DevicesArgs),
    /// Send guest RAM over one testbed link by each mechanism (write from the mapping, sendfile
    /// from the memfd, MSG_ZEROCOPY) and land it by splice (into a fresh or a fallocated
    /// memfd) or read into the mapping, with no VM; prints CPU seconds per GiB on each side
    /// and writes bench.json.
    Mechanisms(MechanismsArgs),
    /// Two hosts as network namespaces with the reference NIC layout.
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

fn main() -> ExitCode {
    cliargs::init_logging();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("livemig-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> CmdResult {
    match cli.cmd {
        Cmd::Transports(a) => transports(a),
        Cmd::Postcopy(a) => postcopy(a),
        Cmd::Drain(a) => drain(a),
        Cmd::Devices(a) => devices(a),
        Cmd::Mechanisms(a) => mechanisms(&a.options()),
        Cmd::Testbed {
            action,
            name,
            scale,
        } => testbed(action, &name, scale),
    }
}

/// The `livemig` the benches run: the one installed beside this binary.
fn livemig() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name("livemig");
    if !path.exists() {
        return Err(format!(
            "no livemig beside {} (build the workspace: cargo build --release)",
            me.display()
        )
        .into());
    }
    Ok(path)
}

fn print_json<T: serde::Serialize>(v: &T) -> CmdResult {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(ExitCode::SUCCESS)
}

fn testbed(action: TestbedAction, name: &str, scale: f64) -> CmdResult {
    if name.len() > 7 {
        return Err(format!(
            "--name {name:?} is too long for interface names (7 characters at most)"
        )
        .into());
    }
    let t = bench::testbed::Testbed::new(name, scale)?;
    match action {
        TestbedAction::Up => {
            t.up()?;
            print_json(&t.status()?)
        }
        TestbedAction::Down => {
            t.down()?;
            Ok(ExitCode::SUCCESS)
        }
        TestbedAction::Status => print_json(&t.status()?),
    }
}

fn transports(a: TransportsArgs) -> CmdResult {
    let o = a.options(livemig()?);
    let r = bench::transports::transports(&o)?;
    print!("{}", bench::table::render(&r));
    println!(
        "wrote {} and {}",
        o.out.join("bench.json").display(),
        o.out.join("bench.png").display()
    );
    if r.rows.iter().any(|r| r.error.is_some() || !r.verified) {
        eprintln!("livemig-bench: not every migration completed and verified");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn postcopy(a: PostcopyArgs) -> CmdResult {
    let me = livemig()?;
    let mut ok = true;
    for &memory in &a.memory {
        let o = a.options(me.clone(), memory);
        let r = bench::transports::transports(&o)?;
        print!("{}", bench::table::render(&r));
        println!(
            "wrote {} and {}",
            o.out.join("bench.json").display(),
            o.out.join("bench.png").display()
        );
        ok &= r.rows.iter().all(|r| r.error.is_none() && r.verified);
    }
    if !ok {
        eprintln!("livemig-bench: not every migration completed and verified");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn devices(a: DevicesArgs) -> CmdResult {
    let o = a.options(livemig()?);
    let r = bench::devices::devices(&o)?;
    print!("{}", bench::devices::render(&r));
    println!(
        "wrote {} and {}",
        o.out.join("bench.json").display(),
        o.out.join("bench.png").display()
    );
    if !r.all_verified() {
        eprintln!(
            "livemig-bench: not every migration completed and verified with no disk write lost"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn mechanisms(o: &bench::mechanisms::MechanismsOptions) -> CmdResult {
    let r = bench::mechanisms::mechanisms(o)?;
    print!("{}", bench::mechanisms::render(&r));
    println!("wrote {}", o.out.join("bench.json").display());
    Ok(ExitCode::SUCCESS)
}

fn drain(a: DrainBenchArgs) -> CmdResult {
    if a.model {
        let refs = drain::model::references(
            bench::hostdrain::DEFAULT_COMPRESS_RATIO,
            bench::hostdrain::REFERENCE_DIRTY_MB_S,
            2,
        );
        print!("{}", bench::hostdrain::table::references(&refs, None));
        return Ok(ExitCode::SUCCESS);
    }
    let o = a.options(livemig()?);
    let r = bench::hostdrain::bench_drain(&o)?;
    print!("{}", bench::hostdrain::table::render(&r));
    println!(
        "wrote {} and {}",
        o.out.join("bench.json").display(),
        o.out.join("bench.png").display()
    );
    let incomplete = r
        .rows
        .iter()
        .any(|r| r.error.is_some() || r.verified < r.vms);
    if incomplete {
        eprintln!("livemig-bench: not every drain completed with every VM verified");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `livemig-bench drain`.
#[derive(clap::Args)]
pub struct DrainBenchArgs {
    /// VMs on host A (the default set: 2 x sql, 2 x web, idle, stress; 512 MiB to 1 GiB).
    #[arg(long, default_value_t = 6)]
    pub vms: usize,
    /// Give every VM this much memory instead.
    #[arg(long, value_parser = parse_size)]
    pub vm_memory: Option<u64>,
    /// The VMs' workloads in turn instead of the set's (e.g. sql,web,sql,web,stress,stress).
    #[arg(long, value_delimiter = ',', value_parser = ["idle", "sql", "web", "stress"])]
    pub workloads: Vec<String>,
    /// Only these transports' drains, beside the unoptimised one (default: all).
    #[arg(long, value_delimiter = ',', value_parser = ["tcp", "compressed", "direct", "direct+multichannel"])]
    pub transports: Vec<String>,
    /// The VMs' OS images: each its own (`different`: they share only zero pages) or one for
    /// all (`same`: they share its OS part).
    #[arg(long, default_value = "different")]
    pub images: bench::hostdrain::Images,
    /// Page cache of each destination for dedup across the VMs (as `livemig drain`).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub dedup_cache: u64,
    /// Run each optimised configuration at each of these `livemig drain --reserve-cpu`
    /// percentages (0: without), e.g. 0,50.
    #[arg(long, value_delimiter = ',')]
    pub reserve_cpu: Vec<f64>,
    /// Percent of each VM's RAM its OS image takes.
    #[arg(long, value_name = "PCT", default_value_t = DEFAULT_IMAGE_SHARE_PCT)]
    pub image_share: u8,
    /// Also drain the same guests and RAM with this VMM on the same links.
    #[arg(long, value_parser = ["qemu"])]
    pub peer: Option<String>,
    /// Concurrencies each optimised configuration runs at (e.g. 1,2,4,auto).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub concurrency: Vec<drain::Concurrency>,
    /// Orders each optimised configuration runs with (e.g. auto,name).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub order: Vec<drain::Order>,
    /// `tls` (mutual TLS between the agents, livemig's default) or `insecure` (plaintext, as
    /// QEMU runs).
    #[arg(long, default_value = "tls", value_parser = ["tls", "insecure"])]
    pub security: String,
    /// Print the model's predictions of the reference's scenarios and stop (no root needed).
    #[arg(long)]
    pub model: bool,
    /// Testbed namespaces <name>-a and <name>-b (brought up if missing, removed afterwards).
    #[arg(long, default_value = "livemig")]
    pub testbed: String,
    /// Shrink every link's rate by this factor (0 < scale <= 1).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    #[command(flatten)]
    pub migrate: MigrateArgs,
    /// Measuring window of each link's goodput stream (after 0.5 s of warm-up).
    #[arg(long, default_value_t = 3.0)]
    pub goodput_secs: f64,
    /// Directory for bench.json, bench.png and logs.
    #[arg(long, default_value = "livemig-bench-drain")]
    pub out: PathBuf,
    /// Leave the testbed up afterwards even if this run created it.
    #[arg(long)]
    pub keep_testbed: bool,
}

impl DrainBenchArgs {
    pub fn options(self, livemig: PathBuf) -> bench::hostdrain::DrainBenchOptions {
        bench::hostdrain::DrainBenchOptions {
            livemig,
            vms: bench::hostdrain::vm_set(
                self.vms,
                self.vm_memory,
                &self.workloads,
                self.images,
                self.image_share,
            ),
            peer_qemu: self.peer.as_deref() == Some("qemu"),
            dedup_cache: self.dedup_cache,
            reserve_cpu: self.reserve_cpu,
            concurrency: self.concurrency,
            orders: self.order,
            transports: self.transports,
            tls: self.security == "tls",
            testbed: self.testbed,
            scale: self.scale,
            request: self.migrate.base_request(),
            goodput_secs: self.goodput_secs,
            out: self.out,
            keep_testbed: self.keep_testbed,
        }
    }
}

#[derive(clap::Args)]
pub struct TransportsArgs {
    /// Guest RAM (8G reproduces the reference VM).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub memory: u64,
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    #[arg(long, default_value = "sql")]
    pub workload: String,
    #[arg(long, default_value = "server")]
    pub memory_profile: MemoryProfile,
    /// Also migrate the same guest and RAM with this VMM on the same links.
    #[arg(long, value_parser = ["qemu"])]
    pub peer: Option<String>,
    /// livemig's runs: `insecure` (plaintext, as QEMU runs by default), `tls` (mutual TLS,
    /// livemig's default) or `both` (what TLS costs on each transport).
    #[arg(long, default_value = "both")]
    pub security: bench::transports::Security,
    /// Testbed namespaces <name>-a and <name>-b (brought up if missing, removed afterwards).
    #[arg(long, default_value = "livemig")]
    pub testbed: String,
    /// Shrink every link's rate by this factor (0 < scale <= 1).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Options of every migration (the downtime target is QEMU's downtime-limit too).
    #[command(flatten)]
    pub migrate: MigrateArgs,
    /// How long the guest runs before the first migration.
    #[arg(long, default_value_t = 3000)]
    pub run_ms: u64,
    /// Measuring window of each link's goodput stream (after 0.5 s of warm-up).
    #[arg(long, default_value_t = 3.0)]
    pub goodput_secs: f64,
    /// Directory for bench.json, bench.png, consoles and logs.
    #[arg(long, default_value = "livemig-bench")]
    pub out: PathBuf,
    /// Leave the testbed up afterwards even if this run created it.
    #[arg(long)]
    pub keep_testbed: bool,
}

#[derive(clap::Args)]
pub struct PostcopyArgs {
    /// Guest RAM, one bench per size (e.g. 1G,2G).
    #[arg(long, value_delimiter = ',', default_value = "1G,2G", value_parser = parse_size)]
    pub memory: Vec<u64>,
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    /// A guest that rewrites its memory faster than 1 GbE carries it.
    #[arg(long, default_value = "stress")]
    pub workload: String,
    #[arg(long, default_value = "server")]
    pub memory_profile: MemoryProfile,
    /// Also migrate the same guest and RAM with this VMM on the same links.
    #[arg(long, value_parser = ["qemu"])]
    pub peer: Option<String>,
    /// Testbed namespaces <name>-a and <name>-b (brought up if missing, removed afterwards).
    #[arg(long, default_value = "livemig")]
    pub testbed: String,
    /// Shrink every link's rate by this factor (0 < scale <= 1).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Options of every migration (each run sets its own post-copy mode).
    #[command(flatten)]
    pub migrate: MigrateArgs,
    /// How long the guest runs before the first migration.
    #[arg(long, default_value_t = 3000)]
    pub run_ms: u64,
    /// Measuring window of each link's goodput stream (after 0.5 s of warm-up).
    #[arg(long, default_value_t = 3.0)]
    pub goodput_secs: f64,
    /// Directory for each size's bench.json, bench.png, consoles and logs (in <out>/<size>).
    #[arg(long, default_value = "livemig-bench-postcopy")]
    pub out: PathBuf,
    /// Leave the testbed up afterwards even if this run created it.
    #[arg(long)]
    pub keep_testbed: bool,
}

impl PostcopyArgs {
    pub fn options(&self, livemig: PathBuf, memory: u64) -> bench::transports::TransportsOptions {
        bench::transports::TransportsOptions {
            livemig,
            memory,
            vcpus: self.vcpus,
            workload: self.workload.clone(),
            memory_profile: self.memory_profile,
            peer_qemu: self.peer.as_deref() == Some("qemu"),
            security: bench::transports::Security::Insecure,
            testbed: self.testbed.clone(),
            scale: self.scale,
            request: self.migrate.base_request(),
            run_ms: self.run_ms,
            goodput_secs: self.goodput_secs,
            out: self.out.join(format!("{}M", memory >> 20)),
            keep_testbed: self.keep_testbed,
            suite: bench::transports::Suite::Postcopy,
        }
    }
}

#[derive(clap::Args)]
pub struct DevicesArgs {
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// The guest's memory workload (the bench adds disk=RATE and its address). The guest's
    /// vCPUs are emulated on this machine: a busy guest cannot answer 1 kHz of echo.
    #[arg(long, default_value = "idle")]
    pub workload: String,
    #[arg(long, default_value = "server")]
    pub memory_profile: MemoryProfile,
    /// Stamped 4 KiB disk writes a second.
    #[arg(long, default_value_t = 100)]
    pub disk_rate: u32,
    /// The disk image's size (default 64M; with --storage copy 2G).
    #[arg(long, value_parser = parse_size)]
    pub disk_size: Option<u64>,
    /// Data written into the image before the VM boots, the rest holes (default none; with
    /// --storage copy half the image).
    #[arg(long, value_parser = parse_size)]
    pub disk_data: Option<u64>,
    /// UDP echo requests a second from the client namespace.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub echo_hz: u32,
    /// livemig's RARP announcements after the destination resumes.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub announce_rounds: u32,
    /// Also migrate the same guest with its devices under this VMM on the same links.
    #[arg(long, value_parser = ["qemu"])]
    pub peer: Option<String>,
    /// Testbed namespaces <name>-a, <name>-b and <name>-client (brought up if missing,
    /// removed afterwards).
    #[arg(long, default_value = "livemig")]
    pub testbed: String,
    /// Shrink every link's rate by this factor (0 < scale <= 1).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Options of every migration (the downtime target is QEMU's downtime-limit too).
    #[command(flatten)]
    pub migrate: MigrateArgs,
    /// How long the guest runs, answering the client, before the first migration (the
    /// baseline: the client's longest silence with nothing migrating).
    #[arg(long, default_value_t = 3000)]
    pub run_ms: u64,
    /// Directory for bench.json, bench.png, disk images, consoles and logs.
    #[arg(long, default_value = "livemig-bench-devices")]
    pub out: PathBuf,
    /// Leave the testbed up afterwards even if this run created it.
    #[arg(long)]
    pub keep_testbed: bool,
}

impl DevicesArgs {
    pub fn options(self, livemig: PathBuf) -> bench::devices::DevicesOptions {
        bench::devices::DevicesOptions {
            livemig,
            memory: self.memory,
            vcpus: self.vcpus,
            workload: self.workload,
            memory_profile: self.memory_profile,
            disk_rate: self.disk_rate,
            disk_size: self.disk_size,
            disk_data: self.disk_data,
            echo_hz: self.echo_hz,
            announce_rounds: self.announce_rounds,
            peer_qemu: self.peer.as_deref() == Some("qemu"),
            testbed: self.testbed,
            scale: self.scale,
            request: self.migrate.base_request(),
            run_ms: self.run_ms,
            out: self.out,
            keep_testbed: self.keep_testbed,
        }
    }
}

#[derive(clap::Args)]
pub struct MechanismsArgs {
    /// The testbed link to send over.
    #[arg(long, default_value = "10g-1")]
    pub link: String,
    /// Bytes each run sends (filler that neither compresses nor is zero).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Runs of every mechanism, interleaved.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub runs: u16,
    /// Testbed namespaces <name>-a and <name>-b (brought up if missing, removed afterwards).
    #[arg(long, default_value = "livemig")]
    pub testbed: String,
    /// Shrink every link's rate by this factor (0 < scale <= 1).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Directory for bench.json.
    #[arg(long, default_value = "livemig-bench")]
    pub out: PathBuf,
    /// Leave the testbed up afterwards even if this run created it.
    #[arg(long)]
    pub keep_testbed: bool,
}

impl MechanismsArgs {
    pub fn options(&self) -> bench::mechanisms::MechanismsOptions {
        bench::mechanisms::MechanismsOptions {
            testbed: self.testbed.clone(),
            scale: self.scale,
            link: self.link.clone(),
            bytes: self.size,
            runs: usize::from(self.runs),
            out: self.out.clone(),
            keep_testbed: self.keep_testbed,
        }
    }
}

impl TransportsArgs {
    pub fn options(self, livemig: PathBuf) -> bench::transports::TransportsOptions {
        bench::transports::TransportsOptions {
            livemig,
            memory: self.memory,
            vcpus: self.vcpus,
            workload: self.workload,
            memory_profile: self.memory_profile,
            peer_qemu: self.peer.as_deref() == Some("qemu"),
            security: self.security,
            testbed: self.testbed,
            scale: self.scale,
            request: self.migrate.base_request(),
            run_ms: self.run_ms,
            goodput_secs: self.goodput_secs,
            out: self.out,
            keep_testbed: self.keep_testbed,
            suite: bench::transports::Suite::Transports,
        }
    }
}
