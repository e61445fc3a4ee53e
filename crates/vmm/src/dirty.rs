//! KVM dirty-page logging for guest RAM (mechanism only; the migration engine decides when).
//!
//! With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_GET_DIRTY_LOG only reads the bitmap and
//! KVM_CLEAR_DIRTY_LOG re-protects exactly the pages we are about to send, so the
//! write-protection work happens during the rounds, not in the downtime window. Without it,
//! KVM_GET_DIRTY_LOG reads and clears in one call.
use std::sync::Arc;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap,
    kvm_userspace_memory_region, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::memory::{HostRegion, RamRange, PAGE_SIZE};
use crate::vm::KvmVm;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DirtyLogError {
    /// {op} on memory slot {slot} failed: {source}
    Kvm {
        op: &'static str,
        slot: u32,
        source: kvm_ioctls::Error,
    },
    /// a dirty bitmap of {bits} bits does not cover memory slot {slot}
    Bitmap { slot: u32, bits: u64 },
}

/// One memory slot's dirty bitmap: bit i = page i of the slot.
#[derive(Clone, Debug)]
pub struct SlotBitmap {
    pub slot: u32,
    pub range: RamRange,
    pub bits: Vec<u64>,
}

impl SlotBitmap {
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Memfd offsets of the dirty pages, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let base = self.range.file_offset;
        self.bits.iter().enumerate().flat_map(move |(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(base + (i as u64 * 64 + b) * PAGE_SIZE)
            })
        })
    }
}

/// Dirty logging over every memory slot of a VM.
pub struct DirtyLog {
    vm: Arc<KvmVm>,
    slots: Vec<(u32, HostRegion)>,
    manual: bool,
    enabled: bool,
}

impl DirtyLog {
    pub(crate) fn new(vm: Arc<KvmVm>) -> Self {
        let slots = (0u32..).zip(vm.ram.host_regions()).collect();
        let fd = &vm.fd;
        // Without the capability we fall back to get-and-clear.
        let manual = fd.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()) > 0
            && fd
                .enable_cap(&kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64, 0, 0, 0],
                    ..Default::default()
                })
                .is_ok();
        DirtyLog {
            vm,
            slots,
            manual,
            enabled: false,
        }
    }

    /// True when clearing is separate from fetching (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
    pub fn manual_protect(&self) -> bool {
        self.manual
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    fn set_flags(&mut self, flags: u32) -> Result<(), DirtyLogError> {
        for &(slot, r) in &self.slots {
            let region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: r.range.guest,
                memory_size: r.range.len,
                userspace_addr: r.host_addr,
            };
            // SAFETY: the same live mapping of `self.vm.ram` the slot was created with (see
            // KvmVm for why it outlives the slot); only the flags change.
            unsafe { self.vm.fd.set_user_memory_region(region) }.map_err(|source| {
                DirtyLogError::Kvm {
                    op: "KVM_SET_USER_MEMORY_REGION (dirty logging)",
                    slot,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Starts logging: from now on every guest write is recorded.
    pub fn enable(&mut self) -> Result<(), DirtyLogError> {
        self.set_flags(KVM_MEM_LOG_DIRTY_PAGES)?;
        self.enabled = true;
        Ok(())
    }

    pub fn disable(&mut self) -> Result<(), DirtyLogError> {
        if self.enabled {
            self.set_flags(0)?;
            self.enabled = false;
        }
        Ok(())
    }

    /// Pages written since the last fetch (manual protect: since the last clear of each page).
    pub fn fetch(&self) -> Result<Vec<SlotBitmap>, DirtyLogError> {
        self.slots
            .iter()
            .map(|&(slot, r)| {
                let range = r.range;
                let bits =
                    self.vm
                        .fd
                        .get_dirty_log(slot, range.len as usize)
                        .map_err(|source| DirtyLogError::Kvm {
                            op: "KVM_GET_DIRTY_LOG",
                            slot,
                            source,
                        })?;
                Ok(SlotBitmap { slot, range, bits })
            })
            .collect()
    }

    /// Re-arms tracking for these pages before they are read and sent; a no-op without manual
    /// protect (the fetch already cleared them).
    pub fn clear(&self, b: &SlotBitmap) -> Result<(), DirtyLogError> {
        if !self.manual || b.count() == 0 {
            return Ok(());
        }
        // KVM reads `num_pages` bits from the bitmap: it must be one of ours, whole.
        let slot = self.slots.iter().find(|(s, _)| *s == b.slot);
        let pages = slot.map_or(0, |(_, r)| r.range.len / PAGE_SIZE);
        let num_pages = u32::try_from(pages).unwrap_or(0);
        if num_pages == 0 || (b.bits.len() as u64) * 64 < pages {
            return Err(DirtyLogError::Bitmap {
                slot: b.slot,
                bits: b.bits.len() as u64 * 64,
            });
        }
        let arg = kvm_clear_dirty_log {
            slot: b.slot,
            num_pages,
            first_page: 0,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: b.bits.as_ptr().cast_mut().cast::<libc::c_void>(),
            },
        };
        // SAFETY: the bitmap holds at least `num_pages` bits (checked above against our own
        // slot's size), KVM only reads it, and it outlives the call; the fd is a live VM fd.
        let rc = unsafe { ioctl_with_ref(&self.vm.fd, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if rc < 0 {
            return Err(DirtyLogError::Kvm {
                op: "KVM_CLEAR_DIRTY_LOG",
                slot: b.slot,
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_pages_are_memfd_offsets() {
        let b = SlotBitmap {
            slot: 1,
            range: RamRange {
                guest: 1 << 32,
                len: 1 << 30,
                file_offset: 3 << 30,
            },
            bits: vec![0b1001, 0, 1 << 63],
        };
        assert_eq!(b.count(), 3);
        let p: Vec<u64> = b.pages().collect();
        assert_eq!(
            p,
            vec![3 << 30, (3 << 30) + 3 * 4096, (3 << 30) + 191 * 4096]
        );
    }
}
