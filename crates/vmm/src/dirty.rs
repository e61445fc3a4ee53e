//! Dirty-page logging for guest RAM (mechanism only; the migration engine decides when), as
//! [`migratable::DirtyLog`]: each KVM memory slot is a RAM region of the log, and its bits
//! are what KVM logged of the guest's writes merged with what the VMM's devices wrote through
//! their view of RAM ([`ram::GuestRam::dma`], whose bitmaps record every write).
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

use migratable::{DirtyBitmap, DirtyLogError};
use ram::{HostRegion, PAGE_SIZE};
use vm_memory::GuestMemoryBackend;

use crate::vm::KvmVm;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Dirty logging over every memory slot of a VM.
pub struct DirtyLog {
    vm: Arc<KvmVm>,
    slots: Vec<(u32, HostRegion)>,
    manual: bool,
    enabled: bool,
    /// Per slot, pages the devices wrote that a fetch reported and no clear re-armed yet.
    devices: Vec<Vec<u64>>,
}

fn kvm_error(op: &'static str, slot: u32) -> impl FnOnce(kvm_ioctls::Error) -> DirtyLogError {
    move |source| DirtyLogError::Source {
        op,
        region: slot,
        source: Box::new(source),
    }
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
            devices: Vec::new(),
        }
    }

    /// Takes what the devices wrote since the last look into `devices` (per slot).
    fn gather_device_writes(&mut self) -> Result<(), DirtyLogError> {
        let dma = self.vm.ram.dma().map_err(|e| DirtyLogError::Source {
            op: "mapping the devices' view of guest RAM",
            region: 0,
            source: Box::new(e),
        })?;
        self.devices.resize(self.slots.len(), Vec::new());
        for (acc, region) in self.devices.iter_mut().zip(dma.iter()) {
            let bits = region.bitmap().get_and_reset();
            acc.resize(acc.len().max(bits.len()), 0);
            for (a, b) in acc.iter_mut().zip(bits) {
                *a |= b;
            }
        }
        Ok(())
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
            unsafe { self.vm.fd.set_user_memory_region(region) }.map_err(kvm_error(
                "KVM_SET_USER_MEMORY_REGION (dirty logging)",
                slot,
            ))?;
        }
        Ok(())
    }
}

impl migratable::DirtyLog for DirtyLog {
    /// Starts logging: from now on every guest write is recorded.
    fn start(&mut self) -> Result<(), DirtyLogError> {
        self.set_flags(KVM_MEM_LOG_DIRTY_PAGES)?;
        // Device writes before now are in RAM already: the copy reads them.
        self.gather_device_writes()?;
        self.devices.clear();
        self.enabled = true;
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        if self.enabled {
            self.set_flags(0)?;
            self.enabled = false;
        }
        Ok(())
    }

    fn is_started(&self) -> bool {
        self.enabled
    }

    /// True when clearing is separate from fetching (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
    fn manual_protect(&self) -> bool {
        self.manual
    }

    /// Pages written since the last fetch (manual protect: since the last clear of each page).
    fn fetch(&mut self) -> Result<Vec<DirtyBitmap>, DirtyLogError> {
        self.gather_device_writes()?;
        let maps = self
            .slots
            .iter()
            .zip(&self.devices)
            .map(|(&(slot, r), devices)| {
                let range = r.range;
                let mut bits = self
                    .vm
                    .fd
                    .get_dirty_log(slot, range.len as usize)
                    .map_err(kvm_error("KVM_GET_DIRTY_LOG", slot))?;
                for (b, d) in bits.iter_mut().zip(devices) {
                    *b |= d;
                }
                Ok(DirtyBitmap {
                    region: slot,
                    range,
                    bits,
                })
            })
            .collect();
        if !self.manual {
            // Get-and-clear: what was fetched is the engine's now.
            self.devices.iter_mut().for_each(|d| d.fill(0));
        }
        maps
    }

    /// Re-arms tracking for these pages before they are read and sent; a no-op without manual
    /// protect (the fetch already cleared them).
    fn clear(&mut self, b: &DirtyBitmap) -> Result<(), DirtyLogError> {
        if !self.manual || b.count() == 0 {
            return Ok(());
        }
        if let Some(d) = self.slots.iter().position(|(s, _)| *s == b.region) {
            if let Some(devices) = self.devices.get_mut(d) {
                for (w, c) in devices.iter_mut().zip(&b.bits) {
                    *w &= !c;
                }
            }
        }
        // KVM reads `num_pages` bits from the bitmap: it must be one of ours, whole.
        let slot = self.slots.iter().find(|(s, _)| *s == b.region);
        let pages = slot.map_or(0, |(_, r)| r.range.len / PAGE_SIZE);
        let num_pages = u32::try_from(pages).unwrap_or(0);
        if num_pages == 0 || (b.bits.len() as u64) * 64 < pages {
            return Err(DirtyLogError::Bitmap {
                region: b.region,
                bits: b.bits.len() as u64 * 64,
            });
        }
        let arg = kvm_clear_dirty_log {
            slot: b.region,
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
            return Err(kvm_error("KVM_CLEAR_DIRTY_LOG", b.region)(
                kvm_ioctls::Error::last(),
            ));
        }
        Ok(())
    }
}
