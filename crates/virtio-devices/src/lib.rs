//! virtio 1.x devices for livemig's VMM, on the modern PCI transport ([`VirtioPci`]): a
//! device ([`VirtioDevice`]) says what it is and offers, and hands the transport a
//! [`Worker`] that does its I/O on a thread of its own once the driver has set it up. The
//! transport pauses that thread (the worker completing and flushing what is in flight), saves
//! and restores everything the guest set up as versioned state, and raises the device's
//! interrupts as MSI-X messages.
//!
//! - [`block`]: virtio-blk on a raw image held under an exclusive lock.
//! - [`net`]: virtio-net on a tap device, announcing the guest's MAC after a move.
mod interrupt;
mod transport;
mod worker;

pub mod block;
pub mod net;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use interrupt::Interrupt;
pub use transport::{IoEvents, VirtioPci, VirtioPciState};
pub use worker::{Ctx, Worker, WorkerError};

/// The device type IDs the virtio spec gives.
pub const TYPE_NET: u16 = 1;
pub const TYPE_BLOCK: u16 = 2;

/// The feature every modern device offers: virtio 1.x, not legacy.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Why a device could not do what the VMM asked of it.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DeviceError {
    /// {device}: opening {path}: {source}
    Open {
        device: String,
        path: String,
        source: std::io::Error,
    },
    /// {device}: {path} is locked by another process (another VM has this disk open)
    Locked { device: String, path: String },
    /// {device}: locking {path}: {source}
    Lock {
        device: String,
        path: String,
        source: std::io::Error,
    },
    /// {device}: the tap device {tap}: {source}
    Tap {
        device: String,
        tap: String,
        source: std::io::Error,
    },
    /// {0}: starting its I/O thread: {1}
    Spawn(String, std::io::Error),
    /// {0}: its I/O thread failed: {1}
    Worker(String, WorkerError),
    /// {0}: its I/O thread panicked
    WorkerPanicked(String),
    /// {device}: {what}
    Restore { device: String, what: String },
    /// {device}: registering its queue notifications with KVM: {source}
    IoEvent {
        device: String,
        source: std::io::Error,
    },
    /// {device}: guest memory: {source}
    Memory {
        device: String,
        source: ram::MemoryError,
    },
    /// {0} must be paused for this
    NotPaused(String),
    /// {device}'s state: {source}
    State {
        device: String,
        source: migratable::SnapshotError,
    },
}

/// What a virtio device is and does, behind the transport.
pub trait VirtioDevice: Send + 'static {
    type Worker: Worker;
    /// The device's own state (its configuration, what its backend needs to agree on).
    type State: Serialize + DeserializeOwned;
    /// Its name in logs and errors: `disk0`, `net1`.
    fn name(&self) -> &str;
    /// The virtio device type ([`TYPE_BLOCK`], [`TYPE_NET`]).
    fn device_type(&self) -> u16;
    /// PCI class, subclass, programming interface.
    fn class(&self) -> [u8; 3];
    /// Each queue's maximum size.
    fn queue_sizes(&self) -> Vec<u16>;
    /// The features offered ([`F_VERSION_1`] and the device's own).
    fn features(&self) -> u64;
    /// Reads the device configuration space (beyond it: zeros).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The worker for a device the driver activated with `features`.
    fn worker(&mut self, features: u64) -> Result<Self::Worker, DeviceError>;
    fn state(&self) -> Self::State;
    /// Loads the device's saved state: refused when it does not fit this device (another
    /// disk size, another MAC).
    fn restore(&mut self, s: &Self::State) -> Result<(), DeviceError>;
    /// The VM is about to run on another host: give up what only one host may hold.
    fn hand_over(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The VM runs here (again): hold what [`Self::hand_over`] gave up. Called before any
    /// vCPU runs, on every resume.
    fn take_back(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The VM runs again after it was restored from saved state (a migration's
    /// destination): tell the world (the network) it is here.
    fn restored_vm_runs(&mut self) {}
    /// What the device reports in the VM's status.
    fn status(&self) -> serde_json::Value;
}

/// A device as the VM sees it when it pauses, saves, restores or moves: one object-safe face
/// for every kind of device on the bus.
pub trait Device: pci::PciDevice {
    fn name(&self) -> &str;
    /// Stops the device's I/O, completing and flushing what is in flight.
    fn pause(&mut self) -> Result<(), DeviceError>;
    /// Takes back what a move gave up, then restarts the device's I/O.
    fn resume(&mut self) -> Result<(), DeviceError>;
    /// The paused device's state, as the section named after it.
    fn snapshot(&self) -> Result<migratable::Snapshot, DeviceError>;
    /// Loads the device's section into this freshly built device.
    fn restore(&mut self, s: &migratable::Snapshot) -> Result<(), DeviceError>;
    fn hand_over(&mut self) -> Result<(), DeviceError>;
    fn status(&self) -> serde_json::Value;
}

/// The version of the state sections [`Device::snapshot`] writes.
pub const SECTION_VERSION: u16 = 1;

impl<D: VirtioDevice> Device for VirtioPci<D> {
    fn name(&self) -> &str {
        VirtioPci::name(self)
    }

    fn pause(&mut self) -> Result<(), DeviceError> {
        VirtioPci::pause(self)
    }

    fn resume(&mut self) -> Result<(), DeviceError> {
        VirtioPci::resume(self)
    }

    fn snapshot(&self) -> Result<migratable::Snapshot, DeviceError> {
        let state = self.state()?;
        migratable::Snapshot::new(self.name(), SECTION_VERSION, &state).map_err(|source| {
            DeviceError::State {
                device: self.name().to_string(),
                source,
            }
        })
    }

    fn restore(&mut self, s: &migratable::Snapshot) -> Result<(), DeviceError> {
        let state = s
            .state(SECTION_VERSION)
            .map_err(|source| DeviceError::State {
                device: self.name().to_string(),
                source,
            })?;
        VirtioPci::restore(self, &state)
    }

    fn hand_over(&mut self) -> Result<(), DeviceError> {
        self.device_mut().hand_over()
    }

    fn status(&self) -> serde_json::Value {
        self.device().status()
    }
}
