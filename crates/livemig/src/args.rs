//! Arguments shared by several subcommands: one `MigrateArgs` for everything that migrates
//! (migrate, demo, bench), one `TransportArgs` for what picks a single transport, and the
//! parsers of sizes and rates.
use std::path::PathBuf;
use std::time::Duration;

use guest::memory_profile::{MemoryProfile, OsImage, DEFAULT_IMAGE_SHARE_PCT};
use migration::protocol::Transport;
use migration::MigrateRequest;
use transport::tls::{Tls, TlsFiles};
use transport::Security;

/// The OS image a VM's memory is cloned from (server memory profile only).
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct ImageArgs {
    /// OS image: VMs started with the same image seed hold the same OS part of their RAM (at
    /// addresses of their own); VMs of different images share only zero pages. Without it a
    /// VM shares nothing with others.
    #[arg(long, value_name = "SEED")]
    pub image: Option<u64>,
    /// Percent of RAM the OS image takes (at most 65: server memory is 35% zero pages).
    #[arg(long, value_name = "PCT", default_value_t = DEFAULT_IMAGE_SHARE_PCT, requires = "image")]
    pub image_share: u8,
}

impl ImageArgs {
    pub fn os_image(&self) -> Option<OsImage> {
        self.image.map(|seed| OsImage {
            seed,
            share_pct: self.image_share,
        })
    }

    /// The same options for a child `livemig run`.
    pub fn to_args(self) -> Vec<String> {
        self.os_image()
            .map(|i| i.run_args().to_vec())
            .unwrap_or_default()
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    guest::parse_size(s).ok_or_else(|| format!("{s:?} is not a size (e.g. 512M, 1G)"))
}

/// `5s`, `500ms`, `2m`, or plain seconds (`5`, `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len()),
    );
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 5s, 500ms)"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1e3,
        "m" | "min" => v * 60.0,
        _ => return Err(format!("{s:?} is not a duration (e.g. 5s, 500ms)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
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
    /// The deadline on progress: a peer silent this long, in any phase on any stream, fails
    /// the migration (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub peer_timeout: Duration,
    /// Send re-sent pages whole instead of as deltas against what the destination holds.
    #[arg(long)]
    pub no_delta: bool,
    /// Last-sent pages the source keeps for deltas (e.g. 256M); default: twice the set of
    /// pages the guest writes, at least 16 MiB, at most a quarter of its RAM.
    #[arg(long, value_parser = parse_size)]
    pub delta_cache: Option<u64>,
    /// Send every page's data instead of a reference to a page of the same content the
    /// destination already holds.
    #[arg(long)]
    pub no_dedup: bool,
    /// Keep the guest's vCPUs at their priority while pages are sent (by default they yield the
    /// CPU to the migration's own threads until the pause, which matters only when the host's
    /// cores are all busy).
    #[arg(long)]
    pub no_vcpu_yield: bool,
}

/// Mutual TLS credentials (the default), or `--insecure`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// This host's certificate (PEM), made by `livemig tls init`.
    #[arg(long, env = "LIVEMIG_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This host's private key (PEM).
    #[arg(long, env = "LIVEMIG_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): only peers with a certificate it signed are accepted.
    #[arg(long, env = "LIVEMIG_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Run plaintext: no authentication, no encryption (anyone who reaches the port can read
    /// guest memory or push a VM).
    #[arg(long, env = "LIVEMIG_INSECURE")]
    pub insecure: bool,
}

impl TlsArgs {
    /// The three files, absolute, when all are given; an error naming what is missing when
    /// only some are.
    pub fn files(&self) -> Result<Option<TlsFiles>, String> {
        let abs = |p: &PathBuf| std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()));
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
                cert: abs(cert)?,
                key: abs(key)?,
                ca: abs(ca)?,
            })),
            _ => Err("--tls-cert, --tls-key and --tls-ca go together: give all three".into()),
        }
    }

    /// How to protect connections: TLS with these credentials, plaintext if `--insecure`
    /// (said on stderr), else None.
    pub fn security(&self) -> Result<Option<Security>, String> {
        if self.insecure {
            eprintln!(
                "livemig: --insecure: connections run plaintext, unauthenticated and unencrypted"
            );
            return Ok(Some(Security::Insecure));
        }
        match self.files()? {
            Some(f) => Ok(Some(Security::Tls(std::sync::Arc::new(
                Tls::load(&f).map_err(|e| e.to_string())?,
            )))),
            None => Ok(None),
        }
    }

    /// As [`Self::security`], where running without either is an error.
    pub fn required(&self) -> Result<Security, String> {
        self.security()?
            .ok_or_else(|| migration::request::NO_CREDENTIALS.to_string())
    }
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
            delta: Some(!self.no_delta),
            delta_cache: self.delta_cache,
            dedup: Some(!self.no_dedup),
            vcpu_yield: Some(!self.no_vcpu_yield),
            peer_timeout_ms: Some(self.peer_timeout.as_millis() as u64),
            ..MigrateRequest::default()
        }
    }

    /// The request to migrate to `to` over `t`; checked, so a bad `--network` fails here.
    pub fn request(
        &self,
        to: String,
        t: &TransportArgs,
    ) -> Result<MigrateRequest, migration::request::RequestError> {
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

/// `livemig bench drain`.
#[derive(clap::Args)]
pub struct DrainBenchArgs {
    /// VMs on host A (the default set: 2 x sql, 2 x web, idle, stress; 512 MiB to 1 GiB).
    #[arg(long, default_value_t = 6)]
    pub vms: usize,
    /// Give every VM this much memory instead.
    #[arg(long, value_parser = parse_size)]
    pub vm_memory: Option<u64>,
    /// The VMs' OS images: each its own (`different`: they share only zero pages) or one for
    /// all (`same`: they share its OS part).
    #[arg(long, default_value = "different")]
    pub images: bench::hostdrain::Images,
    /// Page cache of each destination for dedup across the VMs (as `livemig drain`).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub dedup_cache: u64,
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
            vms: bench::hostdrain::vm_set(self.vms, self.vm_memory, self.images, self.image_share),
            peer_qemu: self.peer.as_deref() == Some("qemu"),
            dedup_cache: self.dedup_cache,
            concurrency: self.concurrency,
            orders: self.order,
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
        }
    }
}
