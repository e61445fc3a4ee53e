//! virtio-net's saved state: the MAC the guest knows, which the destination's NIC must have,
//! and the device's counters.
use std::sync::atomic::Ordering;

use migratable::MacAddr;
use serde::{Deserialize, Serialize};

use super::{Net, NetCounters};
use crate::DeviceError;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: MacAddr,
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

impl NetState {
    pub(super) fn of(n: &Net) -> Self {
        let c = &n.counters;
        let v = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        NetState {
            mac: n.mac,
            rx_frames: v(&c.rx_frames),
            tx_frames: v(&c.tx_frames),
            rx_dropped: v(&c.rx_dropped),
            tx_dropped: v(&c.tx_dropped),
        }
    }

    pub(super) fn apply(&self, n: &mut Net) -> Result<(), DeviceError> {
        if self.mac != n.mac {
            return Err(DeviceError::Restore {
                device: n.name.clone(),
                what: format!(
                    "the guest knows this NIC as {}, here it is {}",
                    self.mac, n.mac
                ),
            });
        }
        n.counters = std::sync::Arc::new(NetCounters {
            rx_frames: self.rx_frames.into(),
            tx_frames: self.tx_frames.into(),
            rx_dropped: self.rx_dropped.into(),
            tx_dropped: self.tx_dropped.into(),
        });
        Ok(())
    }
}
