//! Bus 0 on configuration mechanism #1: the address register at 0xCF8 selects a slot's
//! register, the data window at 0xCFC..0xCFF reads or writes it. Slot 0 is a host bridge;
//! devices take the slots after it, their BARs placed one after another in the MMIO window,
//! each aligned to its size, as firmware would.
use std::sync::{Arc, Mutex, RwLock};

use crate::config::{ConfigSpace, Identity};
use crate::PciDevice;

pub const CONFIG_ADDRESS: u16 = 0xcf8;
pub const CONFIG_DATA: u16 = 0xcfc;
/// Guest-physical addresses for BARs: in the hole below 4 GiB, under the IOAPIC.
pub const MMIO_WINDOW: std::ops::Range<u64> = 0xe000_0000..0xfe00_0000;
const ADDRESS_ENABLE: u32 = 1 << 31;
const SLOTS: usize = 32;

/// Why a device cannot join the bus.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BusError {
    /// the PCI bus has no free slot left (32 slots, one for the host bridge)
    Full,
    /// the PCI MMIO window has no room left for a BAR of {0} bytes
    NoRoom(u64),
}

struct HostBridge(ConfigSpace);

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.0
    }
    fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// A BAR's window and whose it is.
#[derive(Clone, Copy)]
struct Decode {
    start: u64,
    len: u64,
    slot: usize,
    bar: usize,
}

pub struct PciBus {
    slots: Vec<Arc<Mutex<dyn PciDevice>>>,
    address: Mutex<u32>,
    decodes: RwLock<Vec<Decode>>,
    next_mmio: u64,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    pub fn new() -> Self {
        // The host bridge QEMU's q35 machine shows, which kernels' sanity checks accept.
        let bridge = HostBridge(ConfigSpace::new(Identity {
            vendor: 0x8086,
            device: 0x29c0,
            revision: 0,
            class: [0x06, 0x00, 0x00],
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }));
        PciBus {
            slots: vec![Arc::new(Mutex::new(bridge))],
            address: Mutex::new(0),
            decodes: RwLock::new(Vec::new()),
            next_mmio: MMIO_WINDOW.start,
        }
    }

    /// Puts `device` in the next free slot with its BARs placed; returns the slot.
    pub fn add(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<usize, BusError> {
        if self.slots.len() >= SLOTS {
            return Err(BusError::Full);
        }
        {
            let mut d = locks::lock(&device);
            let bars = d.config().bars().to_vec();
            let mut next = self.next_mmio;
            for bar in &bars {
                let addr = next.next_multiple_of(bar.size);
                if addr + bar.size > MMIO_WINDOW.end {
                    return Err(BusError::NoRoom(bar.size));
                }
                next = addr + bar.size;
            }
            let mut next_placed = self.next_mmio;
            for bar in bars {
                let addr = next_placed.next_multiple_of(bar.size);
                d.config_mut().set_bar_addr(bar, addr);
                next_placed = addr + bar.size;
            }
            // Firmware leaves placed BARs decoding.
            d.config_mut().set_command(crate::COMMAND_MEMORY);
            self.next_mmio = next;
        }
        self.slots.push(device);
        let slot = self.slots.len() - 1;
        self.refresh_decodes(slot);
        Ok(slot)
    }

    /// The devices on the bus, host bridge excluded, by slot.
    pub fn devices(&self) -> impl Iterator<Item = (usize, &Arc<Mutex<dyn PciDevice>>)> {
        self.slots.iter().enumerate().skip(1)
    }

    /// After a device's configuration changed (a guest write, a restore): its BARs decode
    /// where its configuration says, and the device hears of each new place.
    pub fn refresh_decodes(&self, slot: usize) {
        let Some(dev) = self.slots.get(slot) else {
            return;
        };
        let placed: Vec<_> = locks::lock(dev).config().placed_bars().collect();
        let mut decodes = self.decodes.write().unwrap_or_else(|p| p.into_inner());
        let before: Vec<Decode> = decodes.iter().filter(|d| d.slot == slot).copied().collect();
        decodes.retain(|d| d.slot != slot);
        for p in &placed {
            decodes.push(Decode {
                start: p.addr,
                len: p.bar.size,
                slot,
                bar: p.bar.index,
            });
        }
        drop(decodes);
        let mut d = locks::lock(dev);
        for p in placed {
            if !before
                .iter()
                .any(|b| b.bar == p.bar.index && b.start == p.addr)
            {
                d.bar_placed(p.bar.index, p.addr);
            }
        }
    }

    /// Port I/O in 0xCF8..=0xCFF.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            CONFIG_ADDRESS..=0xcfb => {
                let a = locks::lock(&self.address).to_le_bytes();
                let off = usize::from(port - CONFIG_ADDRESS);
                for (i, d) in data.iter_mut().enumerate() {
                    *d = a.get(off + i).copied().unwrap_or(0xff);
                }
            }
            CONFIG_DATA..=0xcff => {
                data.fill(0xff);
                let Some((slot, reg)) = self.selected(port) else {
                    return;
                };
                if let Some(dev) = self.slots.get(slot) {
                    locks::lock(dev).read_config(reg, data);
                }
            }
            _ => data.fill(0xff),
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match port {
            CONFIG_ADDRESS..=0xcfb => {
                let mut a = locks::lock(&self.address);
                let mut b = a.to_le_bytes();
                let off = usize::from(port - CONFIG_ADDRESS);
                for (i, d) in data.iter().enumerate() {
                    if let Some(x) = b.get_mut(off + i) {
                        *x = *d;
                    }
                }
                *a = u32::from_le_bytes(b);
            }
            CONFIG_DATA..=0xcff => {
                let Some((slot, reg)) = self.selected(port) else {
                    return;
                };
                let Some(dev) = self.slots.get(slot) else {
                    return;
                };
                let moved = {
                    let mut d = locks::lock(dev);
                    d.config_mut().write(reg, data);
                    d.config_written(reg as u16, data.len());
                    let bar = d.config().bar_at(reg).is_some();
                    bar || (reg..reg + data.len()).contains(&4)
                };
                if moved {
                    self.refresh_decodes(slot);
                }
            }
            _ => {}
        }
    }

    /// The slot and register the address register selects for an access at `port`.
    fn selected(&self, port: u16) -> Option<(usize, usize)> {
        let a = *locks::lock(&self.address);
        let bus = (a >> 16) & 0xff;
        let function = (a >> 8) & 0x7;
        if a & ADDRESS_ENABLE == 0 || bus != 0 || function != 0 {
            return None;
        }
        let slot = ((a >> 11) & 0x1f) as usize;
        let reg = (a & 0xfc) as usize + usize::from(port - CONFIG_DATA);
        Some((slot, reg))
    }

    /// Whether `addr` is in a BAR: the device and BAR offset to give an MMIO access.
    fn decode(&self, addr: u64) -> Option<(usize, usize, u64)> {
        let decodes = self.decodes.read().unwrap_or_else(|p| p.into_inner());
        decodes
            .iter()
            .find(|d| addr >= d.start && addr - d.start < d.len)
            .map(|d| (d.slot, d.bar, addr - d.start))
    }

    /// An MMIO read: a BAR's device answers; anything else reads as ones. Returns whether a
    /// BAR decoded it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((slot, bar, off)) = self.decode(addr) else {
            data.fill(0xff);
            return false;
        };
        locks::lock(&self.slots[slot]).read_bar(bar, off, data);
        true
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((slot, bar, off)) = self.decode(addr) else {
            return false;
        };
        locks::lock(&self.slots[slot]).write_bar(bar, off, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Bar;

    struct Dev {
        cfg: ConfigSpace,
        placed: Vec<(usize, u64)>,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }
    impl PciDevice for Dev {
        fn config(&self) -> &ConfigSpace {
            &self.cfg
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.cfg
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 + offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
        fn bar_placed(&mut self, bar: usize, addr: u64) {
            self.placed.push((bar, addr));
        }
    }

    fn dev() -> Arc<Mutex<Dev>> {
        let mut cfg = ConfigSpace::new(Identity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: [1, 0, 0],
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        cfg.add_bar(0, 0x1_0000);
        Arc::new(Mutex::new(Dev {
            cfg,
            placed: Vec::new(),
            last_write: None,
        }))
    }

    fn select(bus: &PciBus, slot: u32, reg: u32) {
        bus.pio_write(
            CONFIG_ADDRESS,
            &(ADDRESS_ENABLE | slot << 11 | reg).to_le_bytes(),
        );
    }

    fn read32(bus: &PciBus, slot: u32, reg: u32) -> u32 {
        select(bus, slot, reg);
        let mut b = [0u8; 4];
        bus.pio_read(CONFIG_DATA, &mut b);
        u32::from_le_bytes(b)
    }

    /// What a kernel's probe does: the type 1 check, the host bridge, a device with its BAR,
    /// an empty slot; then MMIO in the BAR reaches the device until the guest moves it.
    #[test]
    fn a_kernel_probe_finds_the_devices_and_their_bars() {
        let mut bus = PciBus::new();
        let d = dev();
        assert_eq!(bus.add(d.clone()).unwrap(), 1);
        bus.pio_write(0xcfb, &[1]);
        bus.pio_write(CONFIG_ADDRESS, &ADDRESS_ENABLE.to_le_bytes());
        let mut b = [0u8; 4];
        bus.pio_read(CONFIG_ADDRESS, &mut b);
        assert_eq!(u32::from_le_bytes(b), ADDRESS_ENABLE);
        assert_eq!(read32(&bus, 0, 0), 0x29c0_8086);
        assert_eq!(read32(&bus, 0, 8) >> 16, 0x0600);
        assert_eq!(read32(&bus, 1, 0), 0x1042_1af4);
        assert_eq!(read32(&bus, 2, 0), u32::MAX, "an empty slot");
        let bar0 = read32(&bus, 1, 0x10);
        assert_eq!(u64::from(bar0 & !0xf), MMIO_WINDOW.start);
        assert_eq!(d.lock().unwrap().placed, vec![(0, MMIO_WINDOW.start)]);
        let mut r = [0u8; 2];
        assert!(bus.mmio_read(MMIO_WINDOW.start + 0x10, &mut r));
        assert_eq!(r, [0x10, 0x10]);
        assert!(!bus.mmio_read(MMIO_WINDOW.start + 0x1_0000, &mut r));
        // The guest turns decoding off, moves the BAR, and on again.
        select(&bus, 1, 4);
        bus.pio_write(CONFIG_DATA, &[0, 0]);
        assert!(!bus.mmio_write(MMIO_WINDOW.start, &[1]));
        select(&bus, 1, 0x10);
        bus.pio_write(CONFIG_DATA, &0xf000_0000u32.to_le_bytes());
        select(&bus, 1, 4);
        bus.pio_write(CONFIG_DATA, &[0x06, 0]);
        assert!(bus.mmio_write(0xf000_0004, &[9]));
        assert_eq!(d.lock().unwrap().last_write, Some((0, 4, vec![9])));
        assert_eq!(d.lock().unwrap().placed.last(), Some(&(0, 0xf000_0000)));
        let bar = Bar {
            index: 0,
            size: 0x1_0000,
        };
        assert_eq!(d.lock().unwrap().cfg.bar_addr(bar), 0xf000_0000);
    }

    #[test]
    fn other_buses_and_functions_read_as_absent() {
        let bus = PciBus::new();
        bus.pio_write(CONFIG_ADDRESS, &(ADDRESS_ENABLE | 1 << 16).to_le_bytes());
        let mut b = [0u8; 4];
        bus.pio_read(CONFIG_DATA, &mut b);
        assert_eq!(b, [0xff; 4]);
        bus.pio_write(CONFIG_ADDRESS, &(ADDRESS_ENABLE | 1 << 8).to_le_bytes());
        bus.pio_read(CONFIG_DATA, &mut b);
        assert_eq!(b, [0xff; 4]);
    }
}
