//! The complete, serialisable state of a paused VM (everything but RAM).
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};

use crate::devices::{GuestReport, UartState};
use crate::vcpu::VcpuState;

/// The shape of a VM: what the destination/restore side builds before loading state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub memory: u64,
    pub vcpus: u8,
}

/// A piece of state this host's KVM could not capture, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub what: String,
    pub why: String,
}

impl Skipped {
    pub fn new(what: impl Into<String>, why: impl Into<String>) -> Self {
        Skipped {
            what: what.into(),
            why: why.into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub config: VmConfig,
    pub vcpus: Vec<VcpuState>,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub uart: UartState,
    pub guest: GuestReport,
    pub skipped: Vec<Skipped>,
}

impl VmState {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("VmState serialises: every field is plain data")
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(b)
    }
}
