//! virtio-blk's saved state: what the guest was told of the disk, which the destination's
//! image must match, and the device's counters. Restoring takes the image's lock: the VM
//! runs on this host from now on, before any vCPU starts.
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::{image_error, Block, BlockCounters};
use crate::DeviceError;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Sectors, as the guest knows the disk.
    pub capacity: u64,
    pub readonly: bool,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub errors: u64,
}

impl BlockState {
    pub(super) fn of(b: &Block) -> Self {
        let c = &b.counters;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        BlockState {
            capacity: b.capacity,
            readonly: b.image.readonly(),
            reads: n(&c.reads),
            writes: n(&c.writes),
            flushes: n(&c.flushes),
            read_bytes: n(&c.read_bytes),
            written_bytes: n(&c.written_bytes),
            errors: n(&c.errors),
        }
    }

    pub(super) fn apply(&self, b: &mut Block) -> Result<(), DeviceError> {
        let bad = |what: String| DeviceError::Restore {
            device: b.name.clone(),
            what,
        };
        if self.capacity != b.capacity {
            return Err(bad(format!(
                "the guest knows this disk as {} sectors, {} here has {}",
                self.capacity,
                b.image.path().display(),
                b.capacity
            )));
        }
        if self.readonly != b.image.readonly() {
            return Err(bad(format!(
                "the disk was read-only {}, here {}",
                self.readonly,
                b.image.readonly()
            )));
        }
        b.image.lock().map_err(|e| image_error(&b.name, e))?;
        b.counters = std::sync::Arc::new(BlockCounters {
            reads: self.reads.into(),
            writes: self.writes.into(),
            flushes: self.flushes.into(),
            read_bytes: self.read_bytes.into(),
            written_bytes: self.written_bytes.into(),
            errors: self.errors.into(),
        });
        Ok(())
    }
}
