//! The transport's saved state: the PCI configuration space (BAR placement, command,
//! MSI-X enable and mask), the MSI-X vectors and pending bits, the common configuration as
//! the driver left it, and, once the device is live, each queue's indices (virtio-queue-ser).
use std::sync::atomic::Ordering;

use pci::{ConfigState, MsixState};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use virtio_queue_ser::QueueStateSer;

use super::{CommonRegs, Io, QueueRegs, VirtioPci};
use crate::{DeviceError, VirtioDevice};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioPciState<S> {
    pub pci: ConfigState,
    pub msix: MsixState,
    pub common: CommonRegs,
    pub config_vector: u16,
    pub isr: u8,
    pub queues: Vec<QueueRegs>,
    /// The live queues (next available and used indices), once the driver set DRIVER_OK.
    pub live: Option<Vec<QueueStateSer>>,
    pub device: S,
}

// virtio-queue-ser speaks virtio-queue 0.17's QueueState; ours is 0.18's, field for field.
fn to_ser(s: &QueueState) -> QueueStateSer {
    QueueStateSer {
        max_size: s.max_size,
        next_avail: s.next_avail,
        next_used: s.next_used,
        event_idx_enabled: s.event_idx_enabled,
        size: s.size,
        ready: s.ready,
        desc_table: s.desc_table,
        avail_ring: s.avail_ring,
        used_ring: s.used_ring,
    }
}

fn from_ser(s: &QueueStateSer) -> QueueState {
    QueueState {
        max_size: s.max_size,
        next_avail: s.next_avail,
        next_used: s.next_used,
        event_idx_enabled: s.event_idx_enabled,
        size: s.size,
        ready: s.ready,
        desc_table: s.desc_table,
        avail_ring: s.avail_ring,
        used_ring: s.used_ring,
    }
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// The device's state; it must be paused (its I/O thread stopped, nothing in flight).
    pub fn state(&self) -> Result<VirtioPciState<D::State>, DeviceError> {
        let live = match &self.io {
            super::Io::Running(_) => {
                return Err(DeviceError::NotPaused(self.device.name().to_string()))
            }
            super::Io::Idle => None,
            super::Io::Parked(_, queues) => {
                Some(queues.iter().map(|q| to_ser(&q.state())).collect())
            }
        };
        Ok(VirtioPciState {
            pci: self.config.state(),
            msix: locks::lock(&self.msix).state(),
            common: self.regs.clone(),
            config_vector: self.config_vector.load(Ordering::SeqCst),
            isr: self.isr.load(Ordering::SeqCst),
            queues: self.queues.clone(),
            live,
            device: self.device.state(),
        })
    }

    /// Loads saved state into this freshly built device; its I/O thread starts on resume.
    /// The bus must then refresh its decodes: the guest's BAR placement came with it.
    pub fn restore(&mut self, s: &VirtioPciState<D::State>) -> Result<(), DeviceError> {
        let name = self.device.name().to_string();
        let bad = |what: String| DeviceError::Restore {
            device: name.clone(),
            what,
        };
        if s.queues.len() != self.queues.len()
            || s.queues
                .iter()
                .zip(&self.queues)
                .any(|(a, b)| a.max_size != b.max_size)
        {
            return Err(bad(format!(
                "the saved device has {} queues of other sizes than this one's {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        self.device.restore(&s.device)?;
        self.config
            .restore(&s.pci)
            .map_err(|e| bad(e.to_string()))?;
        locks::lock(&self.msix)
            .restore(&s.msix, &self.config)
            .map_err(|e| bad(e.to_string()))?;
        self.regs = s.common.clone();
        self.config_vector.store(s.config_vector, Ordering::SeqCst);
        self.isr.store(s.isr, Ordering::SeqCst);
        self.queues = s.queues.clone();
        self.io = match &s.live {
            None => Io::Idle,
            Some(live) => {
                if live.len() != self.queues.len() {
                    return Err(bad(format!(
                        "{} live queues saved for {} queues",
                        live.len(),
                        self.queues.len()
                    )));
                }
                let queues = live
                    .iter()
                    .enumerate()
                    .map(|(i, q)| {
                        Queue::try_from(from_ser(q)).map_err(|e| bad(format!("queue {i}: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let worker = self.device.worker(self.regs.driver_features)?;
                Io::Parked(worker, queues)
            }
        };
        self.restored = true;
        Ok(())
    }
}
