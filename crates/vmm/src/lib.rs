//! livemig's VMM: one KVM VM per process on rust-vmm crates.
//!
//! Data flows guest RAM ([`memory`]) ← boot ([`boot`]) ← vCPUs ([`vcpu`]) and
//! devices ([`devices`]); [`vm`] ties them together, [`state`] and [`snapshot`] save and load
//! them, [`api`] serves control over a unix socket.
pub mod api;
pub mod boot;
pub mod devices;
pub mod dirty;
pub mod host;
pub mod memory;
pub mod priority;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use state::{VmConfig, VmState};
pub use vm::{Console, Kernel, PreparedVm, RunState, Vm, VmError, VmStatus};
