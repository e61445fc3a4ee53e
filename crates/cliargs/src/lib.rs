//! The command-line options `livemig` and `livemig-bench` share: one [`MigrateArgs`] for
//! everything that migrates (migrate, demo, drain, the benches), one [`TransportArgs`] for what
//! picks a single transport, [`TlsArgs`] for credentials, and the parsers of sizes, durations
//! and rates.
use std::path::PathBuf;
use std::time::Duration;

use guest::memory_profile::{OsImage, DEFAULT_IMAGE_SHARE_PCT};
use migratable::{DeviceConfig, DiskConfig, MacAddr, NetConfig};
use migration::protocol::Transport;
use migration::MigrateRequest;
use transport::tls::{Tls, TlsFiles};
use transport::Security;
use virtio_devices::net::{Announce, NetOptions};

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

/// Logs to stderr, filtered by `LIVEMIG_LOG` (a tracing env filter; default `warn`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIVEMIG_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// An option's value that does not parse, or credentials that do not go together or load.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ArgError {
    /// {0:?} is not a size (e.g. 512M, 1G)
    Size(String),
    /// {0:?} is not a duration (e.g. 5s, 500ms)
    Duration(String),
    /// {0:?} is not a rate (e.g. 200Mbit, 1.5Gbit, 100MB)
    Rate(String),
    /// --tls-cert, --tls-key and --tls-ca go together: give all three
    PartialTls,
    /// {path}: {source}
    Path {
        path: PathBuf,
        source: std::io::Error,
    },
    /// {0}
    Tls(#[from] transport::tls::TlsError),
    /// no TLS credentials: give --tls-cert, --tls-key and --tls-ca (create them with `livemig tls init`), or --insecure to run plaintext
    NoCredentials,
    /// --{option} {value:?}: {why}
    Device {
        option: &'static str,
        value: String,
        why: String,
    },
}

/// A VM's disks and NICs (`run`, `host run`, `demo`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DeviceArgs {
    /// A disk: virtio-blk on a raw image; repeat for more. The VM holds the image's lock (one
    /// writer per image) while it runs here.
    #[arg(long = "disk", value_name = "path=FILE[,readonly=on]", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,
    /// A NIC: virtio-net on a tap device (created if it does not exist, then up and on the
    /// host's --bridge); repeat for more. Without mac=, one is made up (52:54:00:...).
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,
}

impl DeviceArgs {
    /// The devices, disks first, then NICs, each in the order given.
    pub fn devices(&self) -> Vec<DeviceConfig> {
        let disks = self.disks.iter().cloned().map(DeviceConfig::Disk);
        disks
            .chain(self.nets.iter().cloned().map(DeviceConfig::Net))
            .collect()
    }
}

/// How this host plugs its VMs' NICs in (`run`, `receive`, `restore`, `host serve`, `demo`).
#[derive(clap::Args, Clone, Debug)]
pub struct NetHostArgs {
    /// The bridge the taps of this host's VMs go on.
    #[arg(long, value_name = "NAME", env = "LIVEMIG_BRIDGE")]
    pub bridge: Option<String>,
    /// Announcements (reverse ARP from each NIC's MAC) a VM that arrives here sends on its
    /// taps, the first at once, then over about a second.
    #[arg(
        long,
        default_value_t = 5,
        env = "LIVEMIG_ANNOUNCE_ROUNDS",
        value_parser = clap::value_parser!(u32).range(0..=100)
    )]
    pub announce_rounds: u32,
}

/// CPU features this host hides from its guests (`run`, `receive`, `host serve`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct CpuArgs {
    /// Mask CPU features (e.g. -avx2,-avx512f): VMs started here do not see them, and VMs
    /// that see them may not come here (standing for an older CPU generation).
    #[arg(
        long = "cpu-features",
        value_name = "-FEATURE,...",
        env = "LIVEMIG_CPU_FEATURES",
        value_parser = parse_cpu_mask,
        allow_hyphen_values = true
    )]
    pub cpu_mask: Option<CpuMask>,
}

/// The CPU features `--cpu-features` masks.
#[derive(Clone, Debug, Default)]
pub struct CpuMask(pub Vec<String>);

impl CpuArgs {
    /// The features masked.
    pub fn mask(&self) -> Vec<String> {
        self.cpu_mask.clone().unwrap_or_default().0
    }
}

fn parse_cpu_mask(s: &str) -> Result<CpuMask, String> {
    migratable::cpu::parse_removed(s).map(CpuMask)
}

/// Where disks of VMs arriving on this host may be (`receive`, `host serve`, `demo`).
#[derive(clap::Args, Clone, Debug)]
pub struct StorageArgs {
    /// Directories whose disk images VMs that arrive here may open (repeat, or separate with
    /// commas); a VM arriving with a disk elsewhere is refused before its source stops.
    #[arg(
        long,
        value_name = "DIR",
        env = "LIVEMIG_STORAGE",
        value_delimiter = ','
    )]
    pub storage: Vec<std::path::PathBuf>,
    /// Where disks that migrations copy here (`--storage copy` on the source) are written; a
    /// copy never replaces a file, and one left by a receiver that died is removed.
    #[arg(long, value_name = "DIR", env = "LIVEMIG_DISK_DIR")]
    pub disk_dir: Option<std::path::PathBuf>,
}

impl StorageArgs {
    /// The directories arriving disks may be in: `--storage`'s and the disk directory.
    pub fn roots(&self) -> Vec<std::path::PathBuf> {
        let mut r = self.storage.clone();
        r.extend(self.disk_dir.clone());
        r
    }

    /// The disk directory, absolute and created if missing.
    pub fn disk_dir(&self) -> Result<Option<std::path::PathBuf>, ArgError> {
        let Some(d) = &self.disk_dir else {
            return Ok(None);
        };
        let err = |source| ArgError::Path {
            path: d.clone(),
            source,
        };
        std::fs::create_dir_all(d).map_err(err)?;
        Ok(Some(std::path::absolute(d).map_err(err)?))
    }
}

impl NetHostArgs {
    pub fn options(&self) -> NetOptions {
        NetOptions {
            bridge: self.bridge.clone(),
            announce: Announce {
                rounds: self.announce_rounds,
                ..Announce::default()
            },
        }
    }
}

/// `key=value,...` pairs of a device option.
fn device_options<'a>(
    option: &'static str,
    s: &'a str,
    keys: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, ArgError> {
    let bad = |why: String| ArgError::Device {
        option,
        value: s.to_string(),
        why,
    };
    s.split(',')
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("{kv:?} is not key=value")))?;
            if !keys.contains(&k) {
                return Err(bad(format!(
                    "unknown key {k:?} (expected {})",
                    keys.join(", ")
                )));
            }
            Ok((k, v))
        })
        .collect()
}

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// `tap=NAME[,mac=MAC]`; without a MAC, a random one of QEMU's locally administered prefix.
pub fn parse_net(s: &str) -> Result<NetConfig, ArgError> {
    let bad = |why: &str| ArgError::Device {
        option: "net",
        value: s.to_string(),
        why: why.to_string(),
    };
    let mut tap = None;
    let mut mac = None;
    for (k, v) in device_options("net", s, &["tap", "mac"])? {
        match k {
            "tap" => tap = Some(v.to_string()),
            _ => mac = Some(v.parse::<MacAddr>().map_err(|e| bad(&e.to_string()))?),
        }
    }
    let tap = tap.ok_or_else(|| bad("tap=NAME is missing"))?;
    let mac = mac.unwrap_or_else(|| {
        let r: [u8; 3] = rand::random();
        MacAddr([0x52, 0x54, 0x00, r[0], r[1], r[2]])
    });
    let n = NetConfig { tap, mac };
    DeviceConfig::Net(n.clone())
        .check()
        .map_err(|e| bad(&e.to_string()))?;
    Ok(n)
}

/// `path=FILE[,readonly=on]`; a relative path is taken from the current directory.
pub fn parse_disk(s: &str) -> Result<DiskConfig, ArgError> {
    let bad = |why: &str| ArgError::Device {
        option: "disk",
        value: s.to_string(),
        why: why.to_string(),
    };
    let mut path = None;
    let mut readonly = false;
    for (k, v) in device_options("disk", s, &["path", "readonly"])? {
        match k {
            "path" => path = Some(v),
            _ => readonly = on_off(v).ok_or_else(|| bad("readonly is on or off"))?,
        }
    }
    let path = path
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("path=FILE is missing"))?;
    let path = std::path::absolute(path).map_err(|e| bad(&e.to_string()))?;
    let d = DiskConfig { path, readonly };
    DeviceConfig::Disk(d.clone())
        .check()
        .map_err(|e| bad(&e.to_string()))?;
    Ok(d)
}

pub fn parse_size(s: &str) -> Result<u64, ArgError> {
    guest::parse_size(s).ok_or_else(|| ArgError::Size(s.to_string()))
}

/// `5s`, `500ms`, `2m`, or plain seconds (`5`, `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, ArgError> {
    let s = s.trim();
    let bad = || ArgError::Duration(s.to_string());
    let (num, unit) = s.split_at(
        s.find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len()),
    );
    let v: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1e3,
        "m" | "min" => v * 60.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

pub fn parse_rate(s: &str) -> Result<u64, ArgError> {
    transport::parse_rate(s).ok_or_else(|| ArgError::Rate(s.to_string()))
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
    /// Where the VM's disks are: `shared` (storage both hosts reach at the same path: only
    /// the lock moves) or `copy` (shared-nothing: each disk goes with the VM, into the
    /// destination's --disk-dir).
    #[arg(long, default_value = "shared")]
    pub storage: migration::Storage,
    /// With --storage copy: remove the source's images once the VM runs on the copies (by
    /// default they stay, unlocked).
    #[arg(long)]
    pub remove_source: bool,
    /// With --storage copy, how the guest's writes to blocks already copied reach the
    /// destination: `rounds` (sent again beside RAM's rounds; the guest is never slowed) or
    /// `mirror` (write-blocking: a write completes once it is on the wire, so the copy
    /// converges however hard the guest writes). Default: chosen from the guest's write rate
    /// and the link, and reported.
    #[arg(long, value_parser = parse_disk_sync)]
    pub disk_sync: Option<migratable::DiskSync>,
    /// Move the VM by post-copy after the copy pass: it resumes on the destination at once and
    /// fetches the pages the guest wrote since as it touches them (same as
    /// --postcopy-after 1). A host lost before it completes, or the link for longer than
    /// the peer timeout × 6 (the recovery window), loses the VM.
    #[arg(long, conflicts_with_all = ["postcopy_after", "no_postcopy"])]
    pub postcopy: bool,
    /// Post-copy after N passes over RAM (0: at once, no pre-copy), or `auto` (the default):
    /// pre-copy while its rounds shrink, post-copy instead of throttling the guest when they
    /// stop.
    #[arg(long, conflicts_with = "no_postcopy")]
    pub postcopy_after: Option<migration::policy::PostcopyMode>,
    /// Never post-copy: a guest that outruns the link is throttled (auto-converge) or, with
    /// --no-auto-converge, switched over with a longer pause.
    #[arg(long)]
    pub no_postcopy: bool,
}

impl MigrateArgs {
    /// What `--postcopy`, `--postcopy-after` and `--no-postcopy` ask for (None: the default).
    pub fn postcopy_mode(&self) -> Option<migration::policy::PostcopyMode> {
        use migration::policy::PostcopyMode;
        if self.no_postcopy {
            Some(PostcopyMode::Off)
        } else if self.postcopy {
            Some(PostcopyMode::After(1))
        } else {
            self.postcopy_after
        }
    }
}

fn parse_disk_sync(s: &str) -> Result<migratable::DiskSync, String> {
    match s {
        "rounds" => Ok(migratable::DiskSync::Rounds),
        "mirror" => Ok(migratable::DiskSync::Mirror),
        other => Err(format!("{other:?}: expected rounds or mirror")),
    }
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
    pub fn files(&self) -> Result<Option<TlsFiles>, ArgError> {
        let abs = |p: &PathBuf| {
            std::path::absolute(p).map_err(|source| ArgError::Path {
                path: p.clone(),
                source,
            })
        };
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
                cert: abs(cert)?,
                key: abs(key)?,
                ca: abs(ca)?,
            })),
            _ => Err(ArgError::PartialTls),
        }
    }

    /// How to protect connections: TLS with these credentials, plaintext if `--insecure`
    /// (said on stderr), else None.
    pub fn security(&self) -> Result<Option<Security>, ArgError> {
        if self.insecure {
            eprintln!(
                "livemig: --insecure: connections run plaintext, unauthenticated and unencrypted"
            );
            return Ok(Some(Security::Insecure));
        }
        match self.files()? {
            Some(f) => Ok(Some(Security::Tls(std::sync::Arc::new(Tls::load(&f)?)))),
            None => Ok(None),
        }
    }

    /// As [`Self::security`], where running without either is an error.
    pub fn required(&self) -> Result<Security, ArgError> {
        self.security()?.ok_or(ArgError::NoCredentials)
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
            storage: Some(self.storage).filter(|s| *s != migration::Storage::Shared),
            remove_source: self.remove_source,
            disk_sync: self.disk_sync,
            postcopy: self.postcopy_mode(),
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
