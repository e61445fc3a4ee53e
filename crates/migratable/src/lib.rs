//! What a VM offers the migration engine, and nothing more (in the spirit of Cloud
//! Hypervisor's vm-migration): the engine moves anything that implements these traits, a KVM
//! VM or an in-memory fake in a test, and never sees the VMM behind them.
//!
//! - [`Pausable`]: stop and restart the guest.
//! - [`Snapshottable`]: the VM's CPU and device state as a tree of named, versioned
//!   [`Snapshot`] sections.
//! - [`Migratable`]: on the source, the RAM view ([`ram::GuestRam`]: the memfd, its extents,
//!   volatile access), the [`DirtyLog`] (every source that writes guest memory, merged), the
//!   guest's throttle and priority, and the end of the VM once it runs elsewhere.
//! - [`VmFactory`] and [`PreparedVm`]: on the destination, a VM built from its
//!   [`VmConfig`] whose RAM is filled before its state is loaded.
pub mod cpu;
mod dirty;
mod disk;
mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use dirty::{DirtyBitmap, DirtyLog, DirtyLogError};
pub use disk::{DiskSource, DiskSync, WriteStats, WriteTracker, DISK_BLOCK};
pub use ram::{GuestRam, PAGE_SIZE};
pub use snapshot::{check_sections, SectionId, Snapshot, SnapshotError};

/// The most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 64;

/// The shape of a VM: what the destination builds before any state goes in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub memory: u64,
    pub vcpus: u8,
    /// Its disks and NICs, in the order they sit on the PCI bus.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceConfig>,
    /// CPU features to hide from the guest when it starts (`--cpu-features -avx2`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_mask: Vec<String>,
    /// The CPU features its guest sees, fixed when it starts (the VMM fills them in): a host
    /// that does not offer one of them may not take it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<String>,
}

/// The most devices a VM may have (PCI slots after the host bridge).
pub const MAX_DEVICES: usize = 31;

impl VmConfig {
    /// A VM without devices.
    pub fn new(memory: u64, vcpus: u8) -> Self {
        VmConfig {
            memory,
            vcpus,
            devices: Vec::new(),
            cpu_mask: Vec::new(),
            cpu_features: Vec::new(),
        }
    }

    /// Each device with its name (`disk0`, `net0`: the nth of its kind).
    pub fn named_devices(&self) -> Vec<(String, &DeviceConfig)> {
        let (mut disks, mut nets) = (0, 0);
        self.devices
            .iter()
            .map(|d| {
                let name = match d {
                    DeviceConfig::Disk(_) => {
                        disks += 1;
                        format!("disk{}", disks - 1)
                    }
                    DeviceConfig::Net(_) => {
                        nets += 1;
                        format!("net{}", nets - 1)
                    }
                };
                (name, d)
            })
            .collect()
    }

    /// Whether the devices are ones a VMM could build (a peer's config is checked before
    /// anything is built from it).
    /// Whether every disk of a VM that arrives lies under one of this host's storage `roots`
    /// (symbolic links and `..` resolved): the source names the images, and the destination
    /// must not open whatever file a source asks for.
    pub fn check_disks_within(&self, roots: &[PathBuf]) -> Result<(), DeviceConfigError> {
        for (disk, d) in self.named_devices() {
            if let DeviceConfig::Disk(d) = d {
                disk_within(&disk, &d.path, roots)?;
            }
        }
        Ok(())
    }

    /// The same VM but for where its disks' images are (a disk copied to another host is
    /// at another path there).
    pub fn same_but_disk_paths(&self, other: &VmConfig) -> bool {
        let strip = |c: &VmConfig| {
            let mut c = c.clone();
            for d in &mut c.devices {
                if let DeviceConfig::Disk(d) = d {
                    d.path = PathBuf::new();
                }
            }
            c
        };
        strip(self) == strip(other)
    }

    /// Points disk `name` (`disk0`) at `path`; false if there is no such disk.
    pub fn set_disk_path(&mut self, name: &str, path: PathBuf) -> bool {
        let (mut n, mut found) = (0, false);
        for d in &mut self.devices {
            if let DeviceConfig::Disk(d) = d {
                if format!("disk{n}") == name {
                    d.path = path.clone();
                    found = true;
                }
                n += 1;
            }
        }
        found
    }

    pub fn check_devices(&self) -> Result<(), DeviceConfigError> {
        if self.devices.len() > MAX_DEVICES {
            return Err(DeviceConfigError::TooMany(self.devices.len()));
        }
        self.devices.iter().try_for_each(DeviceConfig::check)
    }
}

/// A device of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DeviceConfig {
    Disk(DiskConfig),
    Net(NetConfig),
}

/// A virtio-blk disk on a raw image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

/// A virtio-net NIC on a tap device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: MacAddr,
}

/// An Ethernet address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = DeviceConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeviceConfigError::Mac(s.to_string());
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() || m[0] & 1 == 1 {
            return Err(bad());
        }
        Ok(MacAddr(m))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a device's configuration is not one to build.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DeviceConfigError {
    /// {0} devices: a VM has at most 31
    TooMany(usize),
    /// a disk needs an absolute path to its image, not {0:?}
    DiskPath(String),
    /// a tap device's name is 1 to 15 characters of letters, digits, '-', '_' and '.', not {0:?}
    TapName(String),
    /// {0:?} is not a unicast MAC address (six hex pairs with colons)
    Mac(String),
    /// {disk} ({path}): this host takes no arriving disks; give its receiver --storage DIR
    NoStorage { disk: String, path: String },
    /// {disk} ({path}) is outside this host's storage ({roots}); it opens arriving disks only under its --storage directories
    Outside {
        disk: String,
        path: String,
        roots: String,
    },
    /// {disk}: resolving {path}: {why}
    Resolve {
        disk: String,
        path: String,
        why: String,
    },
}

/// Whether the image `path` of disk `disk` lies under one of `roots`, links and `..` resolved.
pub fn disk_within(disk: &str, path: &Path, roots: &[PathBuf]) -> Result<(), DeviceConfigError> {
    let shown = path.display().to_string();
    let roots: Vec<PathBuf> = roots.iter().filter_map(|r| r.canonicalize().ok()).collect();
    if roots.is_empty() {
        return Err(DeviceConfigError::NoStorage {
            disk: disk.into(),
            path: shown,
        });
    }
    let real = path
        .canonicalize()
        .map_err(|e| DeviceConfigError::Resolve {
            disk: disk.into(),
            path: shown.clone(),
            why: e.to_string(),
        })?;
    if roots.iter().any(|r| real.starts_with(r)) {
        return Ok(());
    }
    let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    Err(DeviceConfigError::Outside {
        disk: disk.into(),
        path: shown,
        roots: roots.join(", "),
    })
}

impl DeviceConfig {
    pub fn check(&self) -> Result<(), DeviceConfigError> {
        match self {
            DeviceConfig::Disk(d) => {
                let ok = d.path.is_absolute() && d.path.as_os_str().len() <= 4096;
                if !ok {
                    return Err(DeviceConfigError::DiskPath(d.path.display().to_string()));
                }
            }
            DeviceConfig::Net(n) => {
                let ok = (1..=15).contains(&n.tap.len())
                    && n.tap
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !ok {
                    return Err(DeviceConfigError::TapName(n.tap.clone()));
                }
                if n.mac.0[0] & 1 == 1 {
                    return Err(DeviceConfigError::Mac(n.mac.to_string()));
                }
            }
        }
        Ok(())
    }
}

/// An error of boxed cause: the VMM's own error behind each operation.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong in an operation the engine asked of a VM.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MigratableError {
    /// pausing the VM: {0}
    Pause(Cause),
    /// resuming the VM: {0}
    Resume(Cause),
    /// capturing the VM's state: {0}
    Snapshot(Cause),
    /// loading the VM's state: {0}
    Restore(Cause),
    /// building the VM: {0}
    Build(Cause),
    /// handing the VM's devices over to the destination: {0}
    HandOver(Cause),
    /// the VM's state: {0}
    Sections(#[from] SnapshotError),
    /// the dirty log: {0}
    DirtyLog(#[from] DirtyLogError),
    /// the guest's vCPU priority: {0}
    Priority(Cause),
}

/// Whether the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopped => "stopped",
        })
    }
}

/// A VM whose guest can be stopped and started again.
pub trait Pausable {
    fn pause(&mut self) -> Result<(), MigratableError>;
    fn resume(&mut self) -> Result<(), MigratableError>;
}

/// A VM whose state (everything but RAM) is a tree of versioned sections.
pub trait Snapshottable {
    /// The sections [`Self::snapshot`] gives, with their versions: the destination checks
    /// them before the source stops.
    fn sections(&self) -> Vec<SectionId>;
    /// The state of the paused VM.
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError>;
}

/// What the guest says of its own memory once it runs on the destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum GuestVerdict {
    /// Every page it wrote holds what it last wrote, and every disk block the device
    /// acknowledged holds its last version (`disk_blocks` checked, when it has a disk).
    Verified {
        pages: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk_blocks: Option<u64>,
    },
    /// A page does not.
    Corrupt { first_bad_addr: u64 },
    /// Disk blocks do not: read back as never written (lost), as an older version (stale), or
    /// of mixed versions or corrupt (torn).
    DiskCorrupt { lost: u64, stale: u64, torn: u64 },
    /// It did not answer within the time it had.
    NoAnswer,
    /// The guest cannot check itself.
    NotVerifiable,
}

/// A VM the engine can move: its source side.
pub trait Migratable: Pausable + Snapshottable + Send {
    /// Its shape, for the destination to build.
    fn config(&self) -> VmConfig;
    /// Whether its guest runs now (noticing a guest that stopped by itself).
    fn run_state(&mut self) -> RunState;
    /// Its RAM, shareable with the migration's threads.
    fn ram(&self) -> Arc<GuestRam>;
    /// Which pages were written: by the guest, and by the VMM on its behalf.
    fn dirty_log(&self) -> Arc<Mutex<dyn DirtyLog>>;
    /// Makes the guest sleep `pct`% of its time (0: full speed), so that a guest that writes
    /// faster than the link carries converges (auto-converge).
    fn throttle(&mut self, pct: u8);
    /// The guest's vCPUs yield the CPU to the migration's threads (`by` more nice) until
    /// [`Self::unyield`] or a pause; returns their nice value from now.
    fn yield_to(&mut self, by: i32) -> Result<i32, MigratableError>;
    fn unyield(&mut self);
    /// The VM is about to run elsewhere (its last state is captured, the destination is
    /// about to get it): give up what only one host may hold, such as its disks' locks. A
    /// resume here takes them back.
    fn hand_over(&mut self) -> Result<(), MigratableError> {
        Ok(())
    }
    /// Its disks, for a migration that copies them (shared-nothing).
    fn disks(&self) -> Vec<DiskSource> {
        Vec::new()
    }
    /// The VM runs on `to` now: stop it here for good.
    fn migrated(&mut self, to: &str);
    /// Asks the running guest to check its memory, waiting at most `timeout`.
    fn verify_guest(&mut self, timeout: Duration) -> GuestVerdict;
    /// The guest's own count of pages it wrote, when it reports one (livemig's workload
    /// guest does): a probe a migration may call at any moment, without the VM's lock.
    fn guest_writes(&self) -> Option<WritesProbe> {
        None
    }
}

/// Reads a guest's count of pages written, with its rate over about the given window.
pub type WritesProbe = Arc<dyn Fn(Duration) -> Option<GuestWrites> + Send + Sync>;

/// Pages a guest says it has written, and how fast it wrote them lately.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GuestWrites {
    pub pages: u64,
    /// Pages per second over the window asked for; None until the guest said it twice.
    pub per_s: Option<f64>,
}

/// The destination's side: builds VMs from what a source offers.
pub trait VmFactory: Sync {
    type Prepared: PreparedVm;
    /// Builds a VM of this shape with empty RAM, if this host can take one with these state
    /// sections: an unknown section or version is refused here, before the source stops.
    fn prepare(
        &self,
        config: &VmConfig,
        sections: &[SectionId],
    ) -> Result<Self::Prepared, MigratableError>;
}

/// A VM being built: its RAM is filled first, then its state loads, paused.
pub trait PreparedVm: Send {
    type Vm: Migratable;
    fn ram(&self) -> &GuestRam;
    /// Loads `state` and returns the VM, paused.
    fn restore(self, state: &Snapshot) -> Result<Self::Vm, MigratableError>;
}
