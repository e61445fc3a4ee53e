//! livemig's VMM: one KVM VM per process on rust-vmm crates.
//!
//! Data flows guest RAM ([`ram`]) ← boot ([`boot`]) ← vCPUs ([`vcpu`]) and
//! devices ([`devices`]); [`vm`] ties them together and offers them to the migration engine
//! through [`migratable`]'s traits; [`state`] and [`snapshot`] save and load them, [`api`]
//! serves control over a unix socket.
pub mod api;
pub mod boot;
pub mod devices;
pub mod dirty;
pub mod pci_devices;
pub use sched as priority;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use migratable::{DeviceConfig, RunState, VmConfig, MAX_VCPUS};
pub use state::VmState;
pub use vm::{
    Announce, BootFacts, Cmdline, Console, Kernel, KvmFactory, NetOptions, PreparedVm, Vm, VmError,
    VmStatus,
};
