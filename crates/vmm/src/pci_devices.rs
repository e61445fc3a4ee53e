//! The VM's disks and NICs: virtio devices on one PCI bus, built from the VM's configuration
//! in its order, their interrupts sent as MSI through KVM and their queue notifications
//! taken by ioeventfds. The VM pauses, saves, restores and hands them over together.
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_msi;
use kvm_ioctls::{IoEventAddress, NoDatamatch};
use migratable::{DeviceConfig, Snapshot, VmConfig};
use pci::{MsiSink, PciBus};
use virtio_devices::block::Block;
use virtio_devices::net::{Net, NetOptions};
use virtio_devices::{Device, DeviceError, IoEvents, VirtioPci};
use vmm_sys_util::eventfd::EventFd;

use crate::vm::KvmVm;

/// Why the VM's devices could not be built.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DevicesError {
    /// {0}
    Device(#[from] DeviceError),
    /// {0}
    Bus(#[from] pci::BusError),
    /// the saved state has no section for {0}
    MissingState(String),
}

/// MSI messages into the VM's local APICs.
struct KvmMsi(Arc<KvmVm>);

impl MsiSink for KvmMsi {
    fn signal_msi(&self, addr: u64, data: u32) -> std::io::Result<()> {
        let msi = kvm_msi {
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
            ..Default::default()
        };
        self.0
            .fd
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Guest writes to queue notification addresses, signalled by KVM without a vCPU exit.
struct KvmIoEvents(Arc<KvmVm>);

impl IoEvents for KvmIoEvents {
    fn register(&self, event: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, event: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .fd
            .unregister_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// A function on the bus, as the bus sees it.
type Function = Arc<Mutex<dyn pci::PciDevice>>;
/// The same, as the VM pauses, saves and moves it.
type VmDevice = Arc<Mutex<dyn Device>>;

fn both<D: virtio_devices::VirtioDevice>(d: VirtioPci<D>) -> (Function, VmDevice) {
    let d = Arc::new(Mutex::new(d));
    (d.clone(), d)
}

pub struct PciDevices {
    bus: Arc<PciBus>,
    /// Each device and its slot, in the configuration's order.
    devices: Vec<(usize, VmDevice)>,
    /// The disks, as a migration that copies them sees them.
    disks: Vec<migratable::DiskSource>,
}

impl PciDevices {
    /// Builds the devices of `config` on a new bus. A VM booting here (`arriving` false) locks
    /// its disks now; one arriving from elsewhere locks them when its state is restored.
    /// NICs get taps set up as `net` says.
    pub fn build(
        config: &VmConfig,
        vm: &Arc<KvmVm>,
        arriving: bool,
        net: &NetOptions,
    ) -> Result<Self, DevicesError> {
        let mut bus = PciBus::new();
        let mut devices = Vec::new();
        let mut disks = Vec::new();
        let sink: Arc<dyn MsiSink> = Arc::new(KvmMsi(vm.clone()));
        let ioevents: Arc<dyn IoEvents> = Arc::new(KvmIoEvents(vm.clone()));
        for (name, d) in config.named_devices() {
            let (ram, sink, ioevents) = (vm.ram.clone(), sink.clone(), ioevents.clone());
            let (pci, dev) = match d {
                DeviceConfig::Disk(disk) => {
                    let b = Block::open(&name, disk, !arriving)?;
                    disks.push(b.disk_source());
                    both(VirtioPci::new(b, ram, sink, ioevents)?)
                }
                DeviceConfig::Net(cfg) => {
                    let n = Net::open(&name, cfg, net)?;
                    both(VirtioPci::new(n, ram, sink, ioevents)?)
                }
            };
            let slot = bus.add(pci)?;
            devices.push((slot, dev));
        }
        Ok(PciDevices {
            bus: Arc::new(bus),
            devices,
            disks,
        })
    }

    pub fn disks(&self) -> Vec<migratable::DiskSource> {
        self.disks.clone()
    }

    pub fn bus(&self) -> Arc<PciBus> {
        self.bus.clone()
    }

    fn each(
        &self,
        mut f: impl FnMut(&mut dyn Device) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        self.devices
            .iter()
            .try_for_each(|(_, d)| f(&mut *locks::lock(d)))
    }

    /// Stops every device's I/O, in-flight requests completed and flushed.
    pub fn pause(&self) -> Result<(), DeviceError> {
        self.each(|d| d.pause())
    }

    /// Takes back what a move gave up and restarts every device's I/O.
    pub fn resume(&self) -> Result<(), DeviceError> {
        self.each(|d| d.resume())
    }

    pub fn hand_over(&self) -> Result<(), DeviceError> {
        self.each(|d| d.hand_over())
    }

    /// Each paused device's state section.
    pub fn snapshot(&self) -> Result<Vec<Snapshot>, DeviceError> {
        self.devices
            .iter()
            .map(|(_, d)| locks::lock(d).snapshot())
            .collect()
    }

    /// Loads each device's section (by its name); the bus then decodes the BARs where the
    /// guest had placed them.
    pub fn restore(&self, sections: &[Snapshot]) -> Result<(), DevicesError> {
        for (slot, d) in &self.devices {
            {
                let mut d = locks::lock(d);
                let name = d.name().to_string();
                let s = sections
                    .iter()
                    .find(|s| s.id == name)
                    .ok_or(DevicesError::MissingState(name))?;
                d.restore(s)?;
            }
            self.bus.refresh_decodes(*slot);
        }
        Ok(())
    }

    pub fn status(&self) -> Vec<serde_json::Value> {
        self.devices
            .iter()
            .map(|(_, d)| locks::lock(d).status())
            .collect()
    }
}
