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
mod dirty;
mod snapshot;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use dirty::{DirtyBitmap, DirtyLog, DirtyLogError};
pub use ram::{GuestRam, PAGE_SIZE};
pub use snapshot::{check_sections, SectionId, Snapshot, SnapshotError};

/// The most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 64;

/// The shape of a VM: what the destination builds before any state goes in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub memory: u64,
    pub vcpus: u8,
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
    /// Every page it wrote holds what it last wrote.
    Verified { pages: u64 },
    /// A page does not.
    Corrupt { first_bad_addr: u64 },
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
    /// The VM runs on `to` now: stop it here for good.
    fn migrated(&mut self, to: &str);
    /// Asks the running guest to check its memory, waiting at most `timeout`.
    fn verify_guest(&mut self, timeout: Duration) -> GuestVerdict;
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
