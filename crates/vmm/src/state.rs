//! The complete, serialisable state of a paused VM (everything but RAM).
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use migratable::{SectionId, Snapshot, SnapshotError};
use serde::{Deserialize, Serialize};

use crate::devices::{GuestReport, UartState};
use crate::vcpu::VcpuState;

pub use migratable::VmConfig;

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
    /// Each device's section, named after it (`disk0`).
    #[serde(default)]
    pub devices: Vec<Snapshot>,
}

/// The interrupt controllers' state, one section.
#[derive(Serialize, Deserialize)]
struct Irqchips {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
}

/// The sections the state of a VM of `config` is made of, each at the version this VMM
/// writes and reads: the VM's own, then one per device.
pub fn sections(config: &VmConfig) -> Vec<SectionId> {
    let vm = [
        "config",
        "vcpus",
        "irqchip",
        "pit",
        "clock",
        "com1",
        "guest-port",
        "skipped",
    ]
    .into_iter()
    .map(|id| SectionId::new(id, 1));
    let devices = config
        .named_devices()
        .into_iter()
        .map(|(name, _)| SectionId::new(name, virtio_devices::SECTION_VERSION));
    vm.chain(devices).collect()
}

impl VmState {
    /// The state as sections (see [`sections`]).
    pub fn to_snapshot(&self) -> Result<Snapshot, SnapshotError> {
        let vcpus = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| Snapshot::new(format!("vcpu{i}"), 1, v))
            .collect::<Result<Vec<_>, _>>()?;
        let irqchip = Irqchips {
            pic_master: self.pic_master,
            pic_slave: self.pic_slave,
            ioapic: self.ioapic,
        };
        let mut sections = vec![
            Snapshot::new("config", 1, &self.config)?,
            Snapshot::node("vcpus", 1, vcpus),
            Snapshot::new("irqchip", 1, &irqchip)?,
            Snapshot::new("pit", 1, &self.pit)?,
            Snapshot::new("clock", 1, &self.clock)?,
            Snapshot::new("com1", 1, &self.uart)?,
            Snapshot::new("guest-port", 1, &self.guest)?,
            Snapshot::new("skipped", 1, &self.skipped)?,
        ];
        sections.extend(self.devices.iter().cloned());
        Ok(Snapshot::node("vm", 1, sections))
    }

    /// The state from its sections: any section or version this VMM does not know is refused.
    pub fn from_snapshot(s: &Snapshot) -> Result<Self, SnapshotError> {
        let config: VmConfig = s.section("config")?.state(1)?;
        migratable::check_sections(&sections(&config), &s.manifest())?;
        let vcpus_node = s.section("vcpus")?;
        if vcpus_node.version != 1 {
            return Err(SnapshotError::Version {
                id: "vcpus".into(),
                theirs: vcpus_node.version,
                ours: 1,
            });
        }
        let vcpus = vcpus_node
            .sections
            .iter()
            .map(|v| v.state::<VcpuState>(1))
            .collect::<Result<Vec<_>, _>>()?;
        let irq: Irqchips = s.section("irqchip")?.state(1)?;
        let devices = config
            .named_devices()
            .into_iter()
            .map(|(name, _)| s.section(&name).cloned())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmState {
            devices,
            config,
            vcpus,
            pic_master: irq.pic_master,
            pic_slave: irq.pic_slave,
            ioapic: irq.ioapic,
            pit: s.section("pit")?.state(1)?,
            clock: s.section("clock")?.state(1)?,
            uart: s.section("com1")?.state(1)?,
            guest: s.section("guest-port")?.state(1)?,
            skipped: s.section("skipped")?.state(1)?,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("VmState serialises: every field is plain data")
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every part of the state survives the trip through sections, and a section or version
    /// this VMM does not know is refused by name.
    #[test]
    fn state_round_trips_through_sections_and_unknown_ones_are_refused() {
        let s = crate::snapshot::tests::sample_state(64 << 20);
        let snap = s.to_snapshot().unwrap();
        assert_eq!(snap.manifest(), sections(&s.config));
        let back =
            VmState::from_snapshot(&Snapshot::from_bytes(&snap.to_bytes()).unwrap()).unwrap();
        assert_eq!(back.to_bytes(), s.to_bytes());
        let mut extra = snap.clone();
        extra
            .sections
            .push(Snapshot::new("virtio-net", 1, &0u8).unwrap());
        let e = VmState::from_snapshot(&extra).unwrap_err();
        assert_eq!(
            e.to_string(),
            "state section virtio-net version 1 is unknown to this host"
        );
        let mut newer = snap;
        newer.sections[3].version = 2;
        assert!(matches!(
            VmState::from_snapshot(&newer),
            Err(SnapshotError::Version { theirs: 2, .. })
        ));
    }
}
