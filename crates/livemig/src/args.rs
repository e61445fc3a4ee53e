//! Arguments shared by several subcommands: one `MigrateArgs` for everything that migrates
//! (migrate, demo, bench), one `TransportArgs` for what picks a single transport, and the
//! parsers of sizes and rates.
use std::path::PathBuf;

use guest::memory_profile::MemoryProfile;
use migration::protocol::Transport;
use migration::MigrateRequest;

pub fn parse_size(s: &str) -> Result<u64, String> {
    guest::parse_size(s).ok_or_else(|| format!("{s:?} is not a size (e.g. 512M, 1G)"))
}

pub fn parse_rate(s: &str) -> Result<u64, String> {
    transport::parse_rate(s)
        .ok_or_else(|| format!("{s:?} is not a rate (e.g. 200Mbit, 1.5Gbit, 100MB)"))
}

/// How a migration converges and what it may take: the same for `migrate`, `demo` and the
/// benches.
#[derive(clap::Args, Clone, Debug)]
pub struct MigrateArgs {
    /// The pause the guest may see; pre-copy iterates until the rest fits.
    #[arg(long, default_value_t = 20)]
    pub downtime_ms: u64,
    /// Stop iterating after this many sync rounds.
    #[arg(long)]
    pub max_rounds: Option<u32>,
    /// Cap what the migration sends (e.g. 200Mbit, 1.5Gbit, 100MB), for QoS beside other traffic.
    #[arg(long, value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Switch over when rounds stop shrinking instead of throttling the guest's vCPUs
    /// (auto-converge: 20%, then +10% per stall, up to 99%).
    #[arg(long)]
    pub no_auto_converge: bool,
}

/// Which transport one migration uses, and its page streams.
#[derive(clap::Args, Clone, Debug)]
pub struct TransportArgs {
    /// tcp; compressed (lz4/zstd per batch, falling back to raw when that is faster); or
    /// direct (zero-copy from guest RAM, read straight into guest RAM).
    #[arg(long, default_value = "tcp")]
    pub transport: Transport,
    /// Page streams beside the control connection, all to the destination (multichannel).
    #[arg(long, default_value_t = 0)]
    pub channels: u16,
    /// One page stream per NIC pair: LOCAL>REMOTE,... (e.g. 10.0.1.1>10.0.1.2,10.0.2.1>10.0.2.2).
    #[arg(long)]
    pub network: Option<String>,
}

impl MigrateArgs {
    /// The request for these options, without a transport (a bench picks it per run).
    pub fn base_request(&self) -> MigrateRequest {
        MigrateRequest {
            downtime_ms: Some(self.downtime_ms),
            max_rounds: self.max_rounds,
            max_bandwidth: self.max_bandwidth,
            auto_converge: Some(!self.no_auto_converge),
            ..MigrateRequest::default()
        }
    }

    /// The request to migrate to `to` over `t`; checked, so a bad `--network` fails here.
    pub fn request(&self, to: String, t: &TransportArgs) -> Result<MigrateRequest, String> {
        let r = MigrateRequest {
            to,
            transport: Some(t.transport),
            channels: Some(t.channels),
            network: t.network.clone(),
            ..self.base_request()
        };
        r.options()?;
        Ok(r)
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

impl TransportsArgs {
    pub fn options(self, livemig: PathBuf) -> bench::transports::TransportsOptions {
        bench::transports::TransportsOptions {
            livemig,
            memory: self.memory,
            vcpus: self.vcpus,
            workload: self.workload,
            memory_profile: self.memory_profile,
            peer_qemu: self.peer.as_deref() == Some("qemu"),
            testbed: self.testbed,
            scale: self.scale,
            request: self.migrate.base_request(),
            run_ms: self.run_ms,
            goodput_secs: self.goodput_secs,
            out: self.out,
            keep_testbed: self.keep_testbed,
        }
    }
}
