//! The `livemig` command line: one function per subcommand, each reading as the steps it takes.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use cliargs as args;
use guest::memory_profile::{Content, MemoryProfile};
use guest::WorkloadSpec;
use ram::GuestRam;
use vmm::api::{Client, VmRoutes};
use vmm::devices::VerifyResult;
use vmm::snapshot;
use vmm::{Cmdline, Console, Kernel, KvmFactory, RunState, Vm, VmConfig, VmError};

mod cluster_cmd;
mod demo;
mod drain_cmd;
mod host_cmd;
mod maintenance;
mod migrate_cmd;
mod out;
mod simulate;

use args::{parse_duration, parse_size, MigrateArgs, TlsArgs, TransportArgs};

pub(crate) type CmdResult = Result<ExitCode, Box<dyn std::error::Error>>;

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
    #[command(flatten)]
    cpu: args::CpuArgs,
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
    /// Fill RAM before boot (server, zero, random, text). Default: server for the workload
    /// guest; zeroed RAM, as on any host, for --kernel.
    #[arg(long)]
    memory_profile: Option<MemoryProfile>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    image: args::ImageArgs,
    #[command(flatten)]
    devices: args::DeviceArgs,
    #[command(flatten)]
    net: args::NetHostArgs,
    /// COM1 output file (default: stdout).
    #[arg(long)]
    console: Option<PathBuf>,
    /// Serve the control API (HTTP/JSON) on this unix socket.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Credentials for migrations asked for through the API (a request may bring its own).
    #[command(flatten)]
    tls: TlsArgs,
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
    /// Wait for an incoming VM, then run it (with its API) like `run`. Connections that fail
    /// are logged and it goes on waiting.
    Receive {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        api: Option<PathBuf>,
        /// COM1 output file (default: stdout).
        #[arg(long)]
        console: Option<PathBuf>,
        /// The deadline on progress: a source silent this long fails its migration.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        peer_timeout: Duration,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        net: args::NetHostArgs,
        #[command(flatten)]
        storage: args::StorageArgs,
        #[command(flatten)]
        cpu: args::CpuArgs,
        #[command(flatten)]
        agent: ReceiveAgentArgs,
    },
    /// Live-migrate the VM behind --api to a `livemig receive` (or host agent) at --to.
    Migrate {
        #[command(flatten)]
        api: ApiArg,
        /// Where to (with --resume: another address of the same receiver, optional).
        #[arg(long, required_unless_present_any = ["cancel", "resume"])]
        to: Option<String>,
        /// Cancel the migration under way on this VM (it keeps running here).
        #[arg(long, conflicts_with = "resume")]
        cancel: bool,
        /// Make the failed post-copy link of the migration under way again now (to --to if
        /// given, another network to the same receiver), with a new recovery window.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        migrate: MigrateArgs,
        #[command(flatten)]
        transport: TransportArgs,
        #[command(flatten)]
        tls: TlsArgs,
        /// Write the JSON report here.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// A host agent: run one (`serve`), or start, stop and list the VMs of one.
    Host {
        #[command(subcommand)]
        what: host_cmd::HostCmd,
    },
    /// The cluster of host agents in etcd: members, their VMs, live-migration settings.
    Cluster {
        #[command(subcommand)]
        what: cluster_cmd::ClusterCmd,
    },
    /// Move every running VM off a host agent's host onto others: a sliding window of
    /// migrations, placed where they fit, retried, visible, and abortable with Ctrl-C.
    Drain(drain_cmd::DrainArgs),
    /// Credentials for mutual TLS between hosts.
    Tls {
        #[command(subcommand)]
        what: TlsCmd,
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
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        net: args::NetHostArgs,
    },
    /// Write the workload guest's PVH ELF.
    GuestImage {
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the RAM a VM of --size boots with (memory profile, seed) as sparse blobs in
    /// guest-physical layout, for loading into another VMM; prints QEMU's loader arguments.
    MemoryImage(MemoryImageArgs),
}

/// What a host agent's receiver for one VM is told.
#[derive(clap::Args)]
struct ReceiveAgentArgs {
    /// Record the migration's milestones here (JSON), for the host agent.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Take only the migration with this session id.
    #[arg(long)]
    expect_session: Option<u64>,
    /// Give up if no migration has started within this.
    #[arg(long, value_parser = parse_duration)]
    accept_within: Option<Duration>,
    /// The host's page cache of a drain (opened at this path, the agent's /proc/PID/fd/N),
    /// for a migration whose Config names --host-cache-id.
    #[arg(long, requires = "host_cache_id")]
    host_cache: Option<PathBuf>,
    #[arg(long, requires = "host_cache")]
    host_cache_id: Option<u64>,
    /// This host's name in the cluster (`--cluster`): the migration commits there, moving the
    /// VM's ownership from its origin to this host before its vCPUs start.
    #[arg(long, requires = "cluster")]
    cluster_host: Option<String>,
    #[command(flatten)]
    cluster: crate::cluster_cmd::ClusterArgs,
}

impl ReceiveAgentArgs {
    /// The cluster's commit point, when this receiver commits in one.
    fn commit(&self) -> Result<Option<migration::Commit>, cluster::ClusterError> {
        let (Some(e), Some(me)) = (self.cluster.endpoints()?, self.cluster_host.clone()) else {
            return Ok(None);
        };
        let arrival = cluster::Arrival::new(e, me);
        Ok(Some(migration::Commit(Arc::new(move |prep| {
            let (Some(name), Some(from), Some(generation)) =
                (&prep.name, &prep.origin, prep.generation)
            else {
                return Err(
                    "a migration into a cluster names its VM, its origin and its generation".into(),
                );
            };
            let start = cluster::Owner {
                host: from.clone(),
                generation,
            };
            let owner = arrival.commit(name, &start)?;
            tracing::info!(vm = %name, generation = owner.generation, "committed in the cluster");
            Ok(())
        }))))
    }
}

#[derive(clap::Args)]
struct MemoryImageArgs {
    #[arg(long, default_value = "server")]
    profile: MemoryProfile,
    #[arg(long, value_parser = parse_size)]
    size: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    image: args::ImageArgs,
    /// The workload the VM will run (as `run --workload`): an OS image's part is laid out clear
    /// of the memory it writes, as `run` does. Without it, the OS part may lie anywhere.
    #[arg(long)]
    workload: Option<String>,
    /// Directory for the blobs (ram-<address>.raw).
    #[arg(long)]
    out: PathBuf,
    /// Leave out guest-physical memory below this (firmware and kernel go there).
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    from: u64,
    /// Largest blob (QEMU's loader reads a blob in one read(), which stops at 2 GiB).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    max_blob: u64,
}

#[derive(Subcommand)]
enum TlsCmd {
    /// Create a cluster CA (DIR/ca.pem) and a certificate and key per host (DIR/NAME.pem,
    /// DIR/NAME.key); an existing CA in DIR is kept, so hosts can be added later.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// A host's name; repeat for each host.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
}

/// Environment variables the command line reads options from.
const OPTION_VARS: &[&str] = &[
    "LIVEMIG_TLS_CERT",
    "LIVEMIG_TLS_KEY",
    "LIVEMIG_TLS_CA",
    "LIVEMIG_INSECURE",
    "LIVEMIG_BRIDGE",
    "LIVEMIG_ANNOUNCE_ROUNDS",
    "LIVEMIG_STORAGE",
];

/// Subcommands that belong to `livemig-bench` (a binary of its own, so that this one carries
/// no benchmark harness): `livemig bench ...` and `livemig testbed ...` run it.
fn forward_to_bench() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    let first = args.next()?;
    let rest: Vec<std::ffi::OsString> = match first.to_str() {
        Some("bench") => args.collect(),
        Some("testbed") => std::iter::once(first.clone()).chain(args).collect(),
        _ => return None,
    };
    let exe = std::env::current_exe()
        .map(|e| e.with_file_name("livemig-bench"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("livemig-bench"));
    use std::os::unix::process::CommandExt;
    let e = std::process::Command::new(&exe).args(rest).exec();
    eprintln!(
        "livemig: {} is livemig-bench's: running {}: {e}",
        first.to_string_lossy(),
        exe.display()
    );
    Some(ExitCode::FAILURE)
}

fn main() -> ExitCode {
    if let Some(code) = forward_to_bench() {
        return code;
    }
    // An empty variable counts as unset (`LIVEMIG_TLS_CERT= livemig receive --insecure`), as
    // it does for most tools; clap would take it for an option given without its value.
    for var in OPTION_VARS {
        if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
            // The process is still single-threaded: nothing reads the environment meanwhile.
            std::env::remove_var(var);
        }
    }
    cliargs::init_logging();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("livemig: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> CmdResult {
    match cli.cmd {
        Cmd::Run(a) => run_vm(a),
        Cmd::Demo(a) => demo::main(a),
        Cmd::Receive {
            listen,
            api,
            console: con,
            peer_timeout,
            tls,
            net,
            storage,
            cpu,
            agent,
        } => receive(
            &listen,
            api.as_deref(),
            KvmFactory {
                console: console(con),
                net: net.options(),
                storage: storage.roots(),
                cpu_mask: cpu.mask(),
            },
            storage.disk_dir()?,
            peer_timeout,
            &tls,
            &agent,
        ),
        Cmd::Migrate {
            api, cancel: true, ..
        } => migrate_cmd::cancel(&api.api),
        Cmd::Migrate {
            api,
            resume: true,
            to,
            ..
        } => migrate_cmd::resume(&api.api, to),
        Cmd::Migrate {
            api,
            to,
            migrate,
            transport,
            tls,
            report,
            ..
        } => {
            let mut req = migrate.request(to.unwrap_or_default(), &transport)?;
            req.tls = tls.files()?;
            req.insecure = tls.insecure;
            migrate_cmd::main(&api.api, req, report)
        }
        Cmd::Host { what } => host_cmd::main(what),
        Cmd::Cluster { what } => cluster_cmd::main(what),
        Cmd::Drain(a) => drain_cmd::main(a),
        Cmd::Tls {
            what: TlsCmd::Init { out, hosts },
        } => tls_init(&out, &hosts),
        Cmd::Status(a) => print_json(&Client::new(a.api).status()?),
        Cmd::Pause(a) => print_json(&Client::new(a.api).pause()?),
        Cmd::Resume(a) => print_json(&Client::new(a.api).resume()?),
        Cmd::Shutdown(a) => print_json(&Client::new(a.api).shutdown()?),
        Cmd::Verify { api, timeout_ms } => verify(&api.api, Duration::from_millis(timeout_ms)),
        Cmd::Snapshot { api, out } => {
            print_json(&Client::new(api.api).snapshot(&std::path::absolute(&out)?)?)
        }
        Cmd::Restore {
            from,
            api,
            console: con,
            paused,
            tls,
            net,
        } => restore(&from, api.as_deref(), console(con), &net, paused, &tls),
        Cmd::GuestImage { out } => guest_image(&out),
        Cmd::MemoryImage(a) => memory_image(a),
    }
}

fn console(path: Option<PathBuf>) -> Console {
    path.map(Console::File).unwrap_or(Console::Stdout)
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> CmdResult {
    crate::out::say(&serde_json::to_string_pretty(v)?);
    Ok(ExitCode::SUCCESS)
}

/// The workload guest, its command line rendered once the VMM knows the vCPUs and the TSC.
pub(crate) fn workload_kernel(spec: WorkloadSpec) -> Kernel {
    Kernel {
        image: guest::WORKLOAD_ELF.into(),
        cmdline: Cmdline::AtBoot(Box::new(move |f| {
            spec.cmdline(u32::from(f.vcpus), f.tsc_khz)
        })),
    }
}

/// Fills guest RAM from a memory profile before boot: the VMM's pre-fill hook. `written`: the
/// bytes at the bottom of RAM its workload writes (see [`WorkloadSpec::written_bytes`]).
pub(crate) fn profile_prefill(
    content: Option<Content>,
    written: u64,
) -> impl FnOnce(&GuestRam) -> Result<(), VmError> {
    move |ram| {
        let Some(content) = content else {
            return Ok(());
        };
        let err = |e: &dyn std::fmt::Display| VmError::Prefill(format!("{}: {e}", content.profile));
        let layout = ram::layout(ram.size());
        let ranges: Vec<(u64, u64)> = layout.iter().map(|r| (r.guest, r.len)).collect();
        let filler = content.filler(&ranges, written).map_err(|e| err(&e))?;
        for r in layout {
            filler
                .fill_with(r.guest, r.len, &|off, bytes| {
                    ram.write_at(r.file_offset + off, bytes)
                })
                .map_err(|e| err(&e))?;
        }
        Ok(())
    }
}

fn run_vm(a: VmArgs) -> CmdResult {
    let (kernel, default_profile, written) = match &a.kernel {
        Some(p) => {
            let image =
                std::fs::read(p).map_err(|e| format!("reading kernel {}: {e}", p.display()))?;
            let kernel = Kernel {
                image: image.into(),
                cmdline: Cmdline::Fixed(a.cmdline.clone()),
            };
            // Where a foreign kernel writes is unknown.
            (kernel, None, 0)
        }
        None => {
            let spec = WorkloadSpec::parse(&a.workload, a.memory)?;
            let written = spec.written_bytes();
            (workload_kernel(spec), Some(MemoryProfile::Server), written)
        }
    };
    let config = VmConfig {
        devices: a.devices.devices(),
        cpu_mask: a.cpu.mask(),
        ..VmConfig::new(a.memory, a.vcpus)
    };
    let content = a.memory_profile.or(default_profile).map(|profile| Content {
        profile,
        seed: a.seed,
        image: a.image.os_image(),
    });
    let prefill = profile_prefill(content, written);
    let security = a.tls.security()?;
    let vm = Vm::boot(
        config,
        &kernel,
        &console(a.console),
        &a.net.options(),
        prefill,
    )?;
    serve(vm, a.api.as_deref(), security)
}

/// `livemig receive`: waits for one VM, builds it as `factory` says, and serves it.
fn receive(
    listen: &str,
    api: Option<&Path>,
    factory: KvmFactory,
    disk_dir: Option<PathBuf>,
    peer_timeout: Duration,
    tls: &TlsArgs,
    agent: &ReceiveAgentArgs,
) -> CmdResult {
    let security = tls.required()?;
    let listener = transport::Listener::bind(listen)?;
    let addr = listener.local_addr()?;
    eprintln!("livemig: waiting for a VM on {addr} ({})", security.name());
    let status = agent.status_file.clone().map(host::status::StatusFile::new);
    if let Some(f) = &status {
        f.write(&host::status::Incoming::listening(addr.port()))?;
    }
    let opts = migration::ReceiveOptions {
        peer_timeout,
        handshake_timeout: peer_timeout,
        stream_accept_timeout: peer_timeout,
        expect_session: agent.expect_session,
        accept_within: agent.accept_within,
        events: status.clone().map(|f| f.events()),
        host_cache: agent.host_cache_id.zip(agent.host_cache.clone()),
        commit: agent.commit()?,
        disk_dir,
        ..Default::default()
    };
    let factory = Arc::new(factory);
    let received = migration::receive(listener, security.clone(), opts, factory);
    if let (Err(e), Some(f)) = (&received, &status) {
        let _ = f.write(&host::status::Incoming::failed(&e.to_string()));
    }
    let (vm, stats) = received?;
    eprintln!(
        "livemig: VM received from {} ({} pages, {} zero, {} rounds) and running",
        stats.peer.map_or("?".into(), |p| p.to_string()),
        stats.pages,
        stats.zero_pages,
        stats.rounds
    );
    serve(vm, api, Some(security))
}

fn tls_init(out: &Path, hosts: &[String]) -> CmdResult {
    for p in transport::tls::init_cluster(out, hosts)? {
        crate::out::say(&format!("wrote {}", p.display()));
    }
    Ok(ExitCode::SUCCESS)
}

fn restore(
    from: &Path,
    api: Option<&Path>,
    console: Console,
    net: &args::NetHostArgs,
    paused: bool,
    tls: &TlsArgs,
) -> CmdResult {
    let security = tls.security()?;
    let t0 = Instant::now();
    let manifest = snapshot::read_manifest(from)?;
    let vm = Vm::restore(&manifest.state, &console, &net.options(), paused, |ram| {
        snapshot::load_memory(from, &manifest.memory, ram)
            .map_err(|e| VmError::Restore(e.to_string()))
    })?;
    eprintln!(
        "livemig: restored {} in {} ms",
        from.display(),
        t0.elapsed().as_millis()
    );
    serve(vm, api, security)
}

fn verify(api: &Path, timeout: Duration) -> CmdResult {
    let r = Client::new(api).verify(timeout)?;
    print_json(&r)?;
    // A guest with a disk checks it first: its last check is this verify's.
    let disk_ok = r
        .disk
        .and_then(|d| d.last_check)
        .is_none_or(|c| c.bad() == 0);
    Ok(match r.last_verify {
        Some(VerifyResult::Ok { .. }) if disk_ok => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

fn guest_image(out: &Path) -> CmdResult {
    std::fs::write(out, guest::WORKLOAD_ELF)?;
    crate::out::say(&format!(
        "wrote {} ({} bytes)",
        out.display(),
        guest::WORKLOAD_ELF.len()
    ));
    Ok(ExitCode::SUCCESS)
}

fn memory_image(a: MemoryImageArgs) -> CmdResult {
    std::fs::create_dir_all(&a.out)?;
    let written = match &a.workload {
        Some(w) => WorkloadSpec::parse(w, a.size)?.written_bytes(),
        None => 0,
    };
    let ranges: Vec<(u64, u64)> = ram::layout(a.size)
        .iter()
        .map(|r| (r.guest, r.len))
        .collect();
    let content = Content {
        profile: a.profile,
        seed: a.seed,
        image: a.image.os_image(),
    };
    let blobs = content
        .filler(&ranges, written)?
        .write_blobs(&ranges, a.from, a.max_blob, &a.out)?;
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
    crate::out::say(&qemu.join(" "));
    Ok(ExitCode::SUCCESS)
}

/// Runs the VM (and its API) until the guest stops or a client asks for shutdown;
/// `security`: the credentials migrations asked for through the API use by default.
fn serve(vm: Vm, api: Option<&Path>, security: Option<transport::Security>) -> CmdResult {
    let vm = Arc::new(Mutex::new(vm));
    let vm_routes = VmRoutes::new(vm.clone());
    let migration_routes = migration::api::MigrationRoutes::new(vm.clone(), security);
    let server = api
        .map(|p| {
            let routes: Vec<Arc<dyn unixhttp::Routes>> = vec![vm_routes.clone(), migration_routes];
            unixhttp::Server::start(p, unixhttp::serve_all(routes), unixhttp::Limits::default())
        })
        .transpose()?;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if vm_routes.shutdown_requested() {
            break;
        }
        let mut g = locks::lock(&vm);
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
    locks::lock(&vm).shutdown();
    Ok(ExitCode::SUCCESS)
}
