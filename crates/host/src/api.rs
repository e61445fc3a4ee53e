//! The host agent's API (HTTP/JSON on `DIR/host.sock`) and its typed client.
//!
//! | method | path                        | body                 | answer                     |
//! |--------|-----------------------------|----------------------|----------------------------|
//! | GET    | /host                       |                      | [`Capacity`]               |
//! | GET    | /vms                        |                      | `[VmInfo]`                 |
//! | GET    | /cpu                        |                      | [`crate::cpu::CpuUsage`]   |
//! | POST   | /cpu/costs                  | [`crate::cpu::Learn`] | `{}` (learns a migration's CPU cost) |
//! | POST   | /vms                        | [`RunRequest`]       | [`VmInfo`]                 |
//! | DELETE | /vms/NAME                   |                      | `{}`                       |
//! | POST   | /vms/NAME/migrate           | `MigrateRequest`     | the migration's report     |
//! | GET    | /vms/NAME/migration         |                      | its progress               |
//! | DELETE | /vms/NAME/migration         |                      | cancels it                 |
//! | PATCH  | /vms/NAME/migration         | `{"max_bandwidth"}`, `{"codec": "raw"\|"auto"}` | re-paces it, holds it raw |
//! | POST   | /vms/NAME/sample            | `{"ms": N, "fingerprint": B}` | `VmSample`        |
//! | POST   | /vms/NAME/resume            |                      | the VM's status            |
//! | POST   | /vms/NAME/discard           |                      | `{}` (kills a stale copy)  |
//! | GET    | /incoming/SESSION[?abandon] |                      | [`IncomingFate`]           |
//! | POST   | /probe                      | [`ProbeRequest`]     | [`ProbeResult`]            |
//! | POST   | /reach                      | [`ReachRequest`]     | [`Reach`]                  |
//! | POST   | /caches                     | [`CacheRequest`]     | [`CacheInfo`]              |
//! | DELETE | /caches/ID                  |                      | `{}`                       |
use std::path::{Path, PathBuf};
use std::time::Duration;

use migration::sample::VmSample;
use migration::{MigrateRequest, Progress, Report};
use serde::{Deserialize, Serialize};
use serde_json::json;
use unixhttp::{ApiError, Client};

/// One VM of a host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmInfo {
    pub name: String,
    pub memory: u64,
    pub vcpus: u8,
    /// starting, running, paused, incoming, migrating, failed
    pub state: String,
    pub heartbeat: u64,
    /// Where it came from: `local`, or the host it migrated from.
    pub origin: String,
    /// Its own API socket.
    pub api: PathBuf,
    pub pid: u32,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its disks' images (a destination must reach each).
    #[serde(default)]
    pub disks: Vec<PathBuf>,
    /// Its NICs (a destination needs a VM bridge for them).
    #[serde(default)]
    pub nics: u32,
    /// Bytes its disks' images have allocated: what copying them sends and takes.
    #[serde(default)]
    pub disk_bytes: u64,
    /// The CPU features its guest sees: a destination must offer them all.
    #[serde(default)]
    pub cpu_features: Vec<String>,
}

/// What a host holds and can take.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Capacity {
    pub name: String,
    /// The address migrations come in on.
    pub listen: String,
    pub memory_total: u64,
    /// Memory free now (MemAvailable).
    pub memory_free: u64,
    /// Memory promised to VMs (running, starting or arriving).
    pub committed: u64,
    /// Of that, promised to VMs still arriving (not yet resident).
    pub arriving: u64,
    /// Memory drains' page caches take when full (counted against the room).
    #[serde(default)]
    pub caches: u64,
    /// What a VM arriving now may have: free memory less arrivals and the host's reserve.
    pub room: u64,
    pub vms: usize,
    pub inbound: usize,
    pub outbound: usize,
    pub max_inbound: usize,
    /// The bridge its VMs' taps go on, if it has one and it exists.
    #[serde(default)]
    pub bridge: Option<String>,
    /// Bytes free in its disk directory for disks migrations copy here (None: it takes no
    /// copies).
    #[serde(default)]
    pub copy_room: Option<u64>,
    /// The CPU features it offers guests (None: unknown, e.g. no /dev/kvm).
    #[serde(default)]
    pub cpu_features: Option<Vec<String>>,
}

/// The most disk images one `/reach` asks about.
pub const MAX_REACH_PATHS: usize = 256;

/// Disk images a drain would bring here.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReachRequest {
    pub disks: Vec<PathBuf>,
}

/// Those of them this host cannot open for writing, and why.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Reach {
    pub unreachable: Vec<(PathBuf, String)>,
}

/// A drain's page cache to create on the destination host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheRequest {
    /// At most this much memory.
    pub bytes: u64,
}

/// A page cache created for a drain: its id (which its migrations name) and size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheInfo {
    pub id: u64,
    /// What it takes when full.
    pub bytes: u64,
    pub pages: u64,
}

/// `livemig host run`: a VM to start, with `livemig run`'s arguments.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRequest {
    pub name: String,
    pub memory: u64,
    pub vcpus: u8,
    /// Its disks and NICs.
    #[serde(default)]
    pub devices: Vec<migratable::DeviceConfig>,
    /// Further `livemig run` arguments (workload, memory profile, kernel, ...).
    #[serde(default)]
    pub args: Vec<String>,
}

/// What became of an incoming migration: the proof a source needs before it resumes a VM
/// whose switchover's outcome it does not know.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum IncomingFate {
    /// The VM was confirmed here: it runs (or ran) here; the source must not resume.
    Confirmed,
    /// Still arriving (not confirmed); ask with `abandon` to end it and get a proof.
    Arriving,
    /// Never confirmed and its receiver is gone: the VM never ran here.
    NeverRan,
    /// This host never took that migration.
    Unknown,
}

/// Links to measure at once, each from a local address (None: the default route) to another
/// agent's migration address.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeRequest {
    pub paths: Vec<(Option<std::net::IpAddr>, String)>,
    pub ms: u64,
    /// Streams per path at once (default 1): the sum is what that many migrations at once
    /// get, when something other than the link (one core's crypto) caps a stream.
    #[serde(default = "one_stream")]
    pub streams: u16,
}

fn one_stream() -> u16 {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeResult {
    /// What the link carried, as TCP acknowledged it.
    pub bits_per_s: f64,
    /// The sending streams' mean share of the probe on a core or waiting for one (None: not
    /// known). Near 1 on either end, the cores held the probe back and the link carries more.
    #[serde(default)]
    pub sender_runnable: Option<f64>,
    /// The receiving streams' share, as the receiver reported it.
    #[serde(default)]
    pub receiver_runnable: Option<f64>,
}

/// A typed client of one host agent.
#[derive(Clone, Debug)]
pub struct HostClient(Client);

impl HostClient {
    pub fn new(sock: impl Into<PathBuf>) -> Self {
        HostClient(Client::new(sock).with_timeout(Duration::from_secs(30)))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// A client whose calls may wait `t` (a migration).
    pub fn waiting(&self, t: Duration) -> Self {
        HostClient(self.0.clone().with_timeout(t))
    }

    /// A page cache for a drain, of at most `bytes`.
    pub fn create_cache(&self, bytes: u64) -> Result<CacheInfo, ApiError> {
        self.0
            .call("POST", "/caches", Some(json!(CacheRequest { bytes })))
    }

    pub fn drop_cache(&self, id: u64) -> Result<serde_json::Value, ApiError> {
        self.0.call("DELETE", &format!("/caches/{id}"), None)
    }

    pub fn capacity(&self) -> Result<Capacity, ApiError> {
        self.0.call("GET", "/host", None)
    }

    /// Which of `disks` this host cannot open for writing.
    pub fn reach(&self, disks: &[PathBuf]) -> Result<Reach, ApiError> {
        self.0.call(
            "POST",
            "/reach",
            Some(json!(ReachRequest {
                disks: disks.to_vec()
            })),
        )
    }

    /// Tells the host what a migration to it cost.
    pub fn learn_cpu(&self, l: &crate::cpu::Learn) -> Result<serde_json::Value, ApiError> {
        self.0.call("POST", "/cpu/costs", Some(json!(l)))
    }

    /// The host's CPU counters now.
    pub fn cpu(&self) -> Result<crate::cpu::CpuUsage, ApiError> {
        self.0.call("GET", "/cpu", None)
    }

    pub fn list(&self) -> Result<Vec<VmInfo>, ApiError> {
        self.0.call("GET", "/vms", None)
    }

    pub fn run(&self, r: &RunRequest) -> Result<VmInfo, ApiError> {
        self.0.call("POST", "/vms", Some(json!(r)))
    }

    pub fn stop(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        self.0.call("DELETE", &format!("/vms/{name}"), None)
    }

    pub fn migrate(&self, name: &str, r: &MigrateRequest) -> Result<Report, ApiError> {
        self.0
            .call("POST", &format!("/vms/{name}/migrate"), Some(json!(r)))
    }

    pub fn progress(&self, name: &str) -> Result<Option<Progress>, ApiError> {
        self.0.call("GET", &format!("/vms/{name}/migration"), None)
    }

    pub fn cancel(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        self.0
            .call("DELETE", &format!("/vms/{name}/migration"), None)
    }

    pub fn pace(&self, name: &str, bits_per_s: u64) -> Result<serde_json::Value, ApiError> {
        self.0.call(
            "PATCH",
            &format!("/vms/{name}/migration"),
            Some(json!({ "max_bandwidth": bits_per_s })),
        )
    }

    /// Holds a compressed migration's batches raw (`raw`), or lets its codec policy choose.
    pub fn codec(&self, name: &str, raw: bool) -> Result<serde_json::Value, ApiError> {
        self.0.call(
            "PATCH",
            &format!("/vms/{name}/migration"),
            Some(json!({ "codec": if raw { "raw" } else { "auto" } })),
        )
    }

    /// Samples a VM for `ms`; with `fingerprint`, also its content fingerprint.
    pub fn sample(&self, name: &str, ms: u64, fingerprint: bool) -> Result<VmSample, ApiError> {
        self.0.call(
            "POST",
            &format!("/vms/{name}/sample"),
            Some(json!({ "ms": ms, "fingerprint": fingerprint })),
        )
    }

    pub fn resume(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        self.0.call("POST", &format!("/vms/{name}/resume"), None)
    }

    pub fn discard(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        self.0.call("POST", &format!("/vms/{name}/discard"), None)
    }

    pub fn incoming(&self, session: u64, abandon: bool) -> Result<IncomingFate, ApiError> {
        let q = if abandon { "?abandon" } else { "" };
        self.0.call("GET", &format!("/incoming/{session}{q}"), None)
    }

    pub fn probe(
        &self,
        paths: Vec<(Option<std::net::IpAddr>, String)>,
        ms: u64,
        streams: u16,
    ) -> Result<ProbeResult, ApiError> {
        self.0.call(
            "POST",
            "/probe",
            Some(json!(ProbeRequest { paths, ms, streams })),
        )
    }
}
