//! A type 0 configuration space: the header's identity registers, the command and status
//! registers, memory BARs sized by the device and placed by the VMM (or moved by the guest),
//! and a capability list. Writes go through a per-bit mask, as hardware's read-only bits.
use serde::{Deserialize, Serialize};

/// The command register's Memory Space Enable bit: BARs decode only while it is set.
pub const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;

const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR: usize = 0x2c;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_PIN: usize = 0x3d;
const CAPABILITIES_START: usize = 0x40;
pub(crate) const SPACE_SIZE: usize = 256;
const BAR_COUNT: usize = 6;
const BAR_MEM_64: u32 = 0b100;

/// What a function is: the header fields that identify it.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class, subclass, programming interface.
    pub class: [u8; 3],
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A 64-bit memory BAR the device decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    /// The BAR register's index (0, 2 or 4: 64-bit BARs take two registers).
    pub index: usize,
    /// Bytes, a power of two of at least 4 KiB.
    pub size: u64,
}

/// Where a BAR decodes now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarState {
    pub bar: Bar,
    pub addr: u64,
}

/// The configuration space as saved: its bytes (BAR addresses included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    pub bytes: Vec<u8>,
}

/// Why a saved configuration space cannot be loaded.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ConfigError {
    /// a saved configuration space has {0} bytes, not 256
    Size(usize),
    /// the saved configuration space is of device {theirs:04x}:{their_device:04x}, this one is {ours:04x}:{our_device:04x}
    Identity {
        theirs: u16,
        their_device: u16,
        ours: u16,
        our_device: u16,
    },
}

/// A function's 256 bytes of configuration space.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; SPACE_SIZE],
    /// Bits the guest may change.
    writable: [u8; SPACE_SIZE],
    bars: Vec<Bar>,
    /// Where the next capability goes, and the previous one's next pointer.
    next_cap: usize,
    last_cap_next: Option<usize>,
}

impl ConfigSpace {
    pub fn new(id: Identity) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; SPACE_SIZE],
            writable: [0; SPACE_SIZE],
            bars: Vec::new(),
            next_cap: CAPABILITIES_START,
            last_cap_next: None,
        };
        c.put_u16(0x00, id.vendor);
        c.put_u16(0x02, id.device);
        c.bytes[0x08] = id.revision;
        c.bytes[0x09] = id.class[2];
        c.bytes[0x0a] = id.class[1];
        c.bytes[0x0b] = id.class[0];
        c.put_u16(SUBSYSTEM_VENDOR, id.subsystem_vendor);
        c.put_u16(SUBSYSTEM_VENDOR + 2, id.subsystem);
        // No INTx pin: the devices interrupt by MSI-X only.
        c.bytes[INTERRUPT_PIN] = 0;
        let command = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        // Interrupt line: scratch for the guest.
        c.writable[0x3c] = 0xff;
        c
    }

    /// Adds a 64-bit memory BAR of `size` bytes at register `index` (0, 2 or 4).
    pub fn add_bar(&mut self, index: usize, size: u64) -> Bar {
        assert!(
            index.is_multiple_of(2)
                && index + 1 < BAR_COUNT
                && size.is_power_of_two()
                && size >= 4096,
            "a 64-bit BAR at an even register below 5, of a power of two of at least 4 KiB"
        );
        let bar = Bar { index, size };
        let off = BAR0 + index * 4;
        self.put_u32(off, BAR_MEM_64);
        let mask = !(size - 1);
        self.writable[off..off + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        self.writable[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        self.bars.push(bar);
        bar
    }

    /// Appends a capability of `id` with `body` (the bytes after its id and next pointer);
    /// `writable` masks the body's bytes the guest may change. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let off = self.next_cap;
        let len = 2 + body.len();
        assert!(off + len <= SPACE_SIZE, "capabilities fit in 256 bytes");
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + len].copy_from_slice(body);
        for (w, m) in self.writable[off + 2..off + len].iter_mut().zip(writable) {
            *w = *m;
        }
        match self.last_cap_next {
            None => {
                self.bytes[CAPABILITIES_POINTER] = off as u8;
                let status = self.u16_at(STATUS) | STATUS_CAPABILITIES;
                self.put_u16(STATUS, status);
            }
            Some(p) => self.bytes[p] = off as u8,
        }
        self.last_cap_next = Some(off + 1);
        // Capabilities start on dword boundaries.
        self.next_cap = (off + len + 3) & !3;
        off
    }

    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    /// Where each BAR decodes, if memory decoding is on.
    pub fn placed_bars(&self) -> impl Iterator<Item = BarState> + '_ {
        let on = self.command() & COMMAND_MEMORY != 0;
        self.bars.iter().filter(move |_| on).map(|&bar| BarState {
            bar,
            addr: self.bar_addr(bar),
        })
    }

    pub fn bar_addr(&self, bar: Bar) -> u64 {
        let off = BAR0 + bar.index * 4;
        let lo = u64::from(self.u32_at(off) & !0xf);
        let hi = u64::from(self.u32_at(off + 4));
        (hi << 32 | lo) & !(bar.size - 1)
    }

    /// Places BAR `bar` at `addr` (the VMM's firmware role; the guest may move it later).
    pub fn set_bar_addr(&mut self, bar: Bar, addr: u64) {
        let off = BAR0 + bar.index * 4;
        self.put_u32(off, (addr as u32 & !0xf) | BAR_MEM_64);
        self.put_u32(off + 4, (addr >> 32) as u32);
    }

    /// Sets the command register as firmware leaves it for the guest.
    pub fn set_command(&mut self, v: u16) {
        self.put_u16(COMMAND, v);
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// The BAR a write at `offset` touched, if any.
    pub fn bar_at(&self, offset: usize) -> Option<Bar> {
        self.bars
            .iter()
            .copied()
            .find(|b| (BAR0 + b.index * 4..BAR0 + b.index * 4 + 8).contains(&offset))
    }

    /// Reads `data.len()` (1, 2 or 4) bytes at `offset`; beyond the space reads as ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes through the mask: read-only bits keep their value.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, d) in data.iter().enumerate() {
            let Some(m) = self.writable.get(offset + i).copied() else {
                return;
            };
            let b = &mut self.bytes[offset + i];
            *b = (*b & !m) | (d & m);
        }
    }

    pub fn u8_at(&self, offset: usize) -> u8 {
        self.bytes[offset]
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    /// The device's own update of a register (a capability's read-only field).
    pub fn put_u16(&mut self, offset: usize, v: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn put_u32(&mut self, offset: usize, v: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn state(&self) -> ConfigState {
        ConfigState {
            bytes: self.bytes.to_vec(),
        }
    }

    /// Loads a saved space into this device's (same identity, same layout of BARs and
    /// capabilities: only the guest's writes and placements differ).
    pub fn restore(&mut self, s: &ConfigState) -> Result<(), ConfigError> {
        if s.bytes.len() != SPACE_SIZE {
            return Err(ConfigError::Size(s.bytes.len()));
        }
        let id = |b: &[u8]| {
            (
                u16::from_le_bytes([b[0], b[1]]),
                u16::from_le_bytes([b[2], b[3]]),
            )
        };
        let (theirs, their_device) = id(&s.bytes);
        let (ours, our_device) = id(&self.bytes);
        if (theirs, their_device) != (ours, our_device) {
            return Err(ConfigError::Identity {
                theirs,
                their_device,
                ours,
                our_device,
            });
        }
        // Writable bits come from the saved space; read-only ones are this device's.
        for i in 0..SPACE_SIZE {
            let m = self.writable[i];
            self.bytes[i] = (self.bytes[i] & !m) | (s.bytes[i] & m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(Identity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: [0x01, 0x00, 0x00],
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        })
    }

    /// A BAR is sized as a guest sizes it: write all ones, read back the size mask.
    #[test]
    fn bars_size_and_place_as_a_guest_probes_them() {
        let mut c = space();
        let bar = c.add_bar(0, 0x1_0000);
        c.set_bar_addr(bar, 0xe000_0000);
        assert_eq!(c.bar_addr(bar), 0xe000_0000);
        c.write(0x10, &u32::MAX.to_le_bytes());
        c.write(0x14, &u32::MAX.to_le_bytes());
        let lo = c.u32_at(0x10);
        let hi = c.u32_at(0x14);
        assert_eq!(lo, 0xffff_0000 | BAR_MEM_64);
        assert_eq!(hi, u32::MAX);
        c.write(0x10, &0xe001_0000u32.to_le_bytes());
        c.write(0x14, &0u32.to_le_bytes());
        assert_eq!(c.bar_addr(bar), 0xe001_0000);
        assert_eq!(c.bar_at(0x14), Some(bar));
        assert_eq!(c.bar_at(0x18), None);
    }

    #[test]
    fn read_only_bits_stay_and_capabilities_chain() {
        let mut c = space();
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(c.u16_at(0), 0x1af4, "vendor id is read-only");
        let a = c.add_capability(0x09, &[4, 1, 2, 3], &[0; 4]);
        let b = c.add_capability(0x11, &[0, 0, 1, 0, 0, 0, 2, 0, 0, 0], &[0, 0xc0]);
        assert_eq!(c.u8_at(CAPABILITIES_POINTER) as usize, a);
        assert_eq!(c.u8_at(a + 1) as usize, b);
        assert_eq!(c.u8_at(b + 1), 0);
        assert_eq!(b % 4, 0);
        assert_ne!(c.u16_at(STATUS) & STATUS_CAPABILITIES, 0);
        c.write(b + 2, &[0xff, 0xff]);
        assert_eq!(
            c.u16_at(b + 2),
            0xc000,
            "only the enable and mask bits move"
        );
    }

    #[test]
    fn restore_keeps_the_guests_writes_and_refuses_another_device() {
        let mut a = space();
        let bar = a.add_bar(0, 0x1_0000);
        a.set_bar_addr(bar, 0xe000_0000);
        a.write(COMMAND, &[0x06, 0]);
        let mut b = space();
        b.add_bar(0, 0x1_0000);
        b.restore(&a.state()).unwrap();
        assert_eq!(b.state(), a.state());
        let mut other = ConfigSpace::new(Identity {
            device: 0x1041,
            ..Identity {
                vendor: 0x1af4,
                device: 0,
                revision: 1,
                class: [2, 0, 0],
                subsystem_vendor: 0x1af4,
                subsystem: 1,
            }
        });
        assert!(matches!(
            other.restore(&a.state()),
            Err(ConfigError::Identity { .. })
        ));
        assert!(matches!(
            b.restore(&ConfigState { bytes: vec![0; 3] }),
            Err(ConfigError::Size(3))
        ));
    }
}
