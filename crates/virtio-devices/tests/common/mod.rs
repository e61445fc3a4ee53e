//! A virtio driver as a guest kernel's would be, in the test process: it finds the device's
//! capabilities, negotiates features, lays out split queues in guest RAM, enables MSI-X, and
//! submits descriptor chains through the device's BAR as a vCPU's MMIO would.
#![allow(dead_code)]
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pci::{MsiSink, PciDevice};
use ram::GuestRam;
use virtio_devices::IoEvents;
use vmm_sys_util::eventfd::EventFd;

pub const MSI_ADDR: u64 = 0xfee0_0000;

/// MSI messages the device sent.
#[derive(Default)]
pub struct Msis(pub Mutex<Vec<(u64, u32)>>);

impl MsiSink for Msis {
    fn signal_msi(&self, addr: u64, data: u32) -> std::io::Result<()> {
        self.0.lock().unwrap().push((addr, data));
        Ok(())
    }
}

impl Msis {
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// No KVM here: notifications reach the device through its BAR.
pub struct NoIoEvents;

impl IoEvents for NoIoEvents {
    fn register(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn unregister(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn ram() -> Arc<GuestRam> {
    Arc::new(GuestRam::new(64 << 20).unwrap())
}

/// One split virtqueue in guest RAM, driven from here.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub last_used: u16,
}

/// A buffer of a chain: guest address, length, device-writable.
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub struct Driver {
    pub ram: Arc<GuestRam>,
    pub rings: Vec<Ring>,
    caps: Caps,
}

#[derive(Clone, Copy, Default)]
struct Caps {
    common: u64,
    notify: u64,
    notify_mult: u64,
    device: u64,
    msix: usize,
}

fn rd<D: PciDevice + ?Sized>(d: &mut D, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.read_bar(0, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn wr<D: PciDevice + ?Sized>(d: &mut D, off: u64, len: usize, v: u64) {
    d.write_bar(0, off, &v.to_le_bytes()[..len]);
}

fn find_caps<D: PciDevice + ?Sized>(d: &mut D) -> Caps {
    let c = d.config().clone();
    let mut caps = Caps::default();
    let mut p = c.u8_at(0x34) as usize;
    while p != 0 {
        match c.u8_at(p) {
            0x11 => caps.msix = p,
            0x09 => {
                let off = u64::from(c.u32_at(p + 8));
                match c.u8_at(p + 3) {
                    1 => caps.common = off,
                    2 => {
                        caps.notify = off;
                        caps.notify_mult = u64::from(c.u32_at(p + 16));
                    }
                    4 => caps.device = off,
                    _ => {}
                }
            }
            _ => {}
        }
        p = c.u8_at(p + 1) as usize;
    }
    caps
}

impl Driver {
    /// Sets the device up as a kernel's virtio-pci driver does; queue `i`'s rings at
    /// 0x10000 + i * 0x10000, its MSI-X vector `i` (data 0x30 + i), configuration vector last.
    pub fn init<D: PciDevice + ?Sized>(
        d: &mut D,
        ram: Arc<GuestRam>,
        features: u64,
        queues: u16,
    ) -> Self {
        let caps = find_caps(d);
        let c = caps.common;
        wr(d, c + 0x14, 1, 0);
        wr(d, c + 0x14, 1, 1 | 2);
        wr(d, c, 4, 0);
        let lo = rd(d, c + 4, 4);
        wr(d, c, 4, 1);
        let hi = rd(d, c + 4, 4);
        let offered = hi << 32 | lo;
        assert_eq!(features & !offered, 0, "the device offers {offered:#x}");
        wr(d, c + 8, 4, 0);
        wr(d, c + 0xc, 4, features & 0xffff_ffff);
        wr(d, c + 8, 4, 1);
        wr(d, c + 0xc, 4, features >> 32);
        wr(d, c + 0x14, 1, 1 | 2 | 8);
        assert_eq!(rd(d, c + 0x14, 1) & 8, 8, "FEATURES_OK sticks");
        // MSI-X on, every vector unmasked.
        let ctl = caps.msix + 2;
        d.config_mut().write(ctl, &0x8000u16.to_le_bytes());
        d.config_written(ctl as u16, 2);
        for v in 0..=u64::from(queues) {
            let e = 0x8000 + v * 16;
            wr(d, e, 4, MSI_ADDR);
            wr(d, e + 4, 4, 0);
            wr(d, e + 8, 4, 0x30 + v);
            wr(d, e + 12, 4, 0);
        }
        wr(d, c + 0x10, 2, u64::from(queues));
        let mut rings = Vec::new();
        for i in 0..queues {
            wr(d, c + 0x16, 2, i.into());
            let size = rd(d, c + 0x18, 2) as u16;
            let base = 0x10000 + u64::from(i) * 0x10000;
            let r = Ring {
                index: i,
                size,
                desc: base,
                avail: base + 16 * u64::from(size),
                used: base + 0x8000,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            };
            wr(d, c + 0x1a, 2, i.into());
            wr(d, c + 0x20, 8, r.desc);
            wr(d, c + 0x28, 4, r.avail);
            wr(d, c + 0x2c, 4, 0);
            wr(d, c + 0x30, 8, r.used);
            wr(d, c + 0x1c, 2, 1);
            rings.push(r);
        }
        wr(d, c + 0x14, 1, 1 | 2 | 8 | 4);
        Driver { ram, rings, caps }
    }

    pub fn status<D: PciDevice + ?Sized>(&self, d: &mut D) -> u8 {
        rd(d, self.caps.common + 0x14, 1) as u8
    }

    pub fn read_device_config<D: PciDevice + ?Sized>(
        &self,
        d: &mut D,
        off: u64,
        len: usize,
    ) -> u64 {
        rd(d, self.caps.device + off, len)
    }

    /// Puts a chain on queue `q`'s available ring (not yet notified); returns its head.
    pub fn add(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let r = &mut self.rings[q];
        let head = r.next_desc;
        for (k, b) in bufs.iter().enumerate() {
            let i = (r.next_desc + k as u16) % r.size;
            let next = (i + 1) % r.size;
            let more = k + 1 < bufs.len();
            let flags: u16 = u16::from(more) | if b.write { 2 } else { 0 };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&b.addr.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&(if more { next } else { 0 }).to_le_bytes());
            self.ram.write_at(r.desc + 16 * u64::from(i), &d).unwrap();
        }
        r.next_desc = (r.next_desc + bufs.len() as u16) % r.size;
        let slot = r.avail + 4 + 2 * u64::from(r.avail_idx % r.size);
        self.ram.write_at(slot, &head.to_le_bytes()).unwrap();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        self.ram
            .write_at(r.avail + 2, &r.avail_idx.to_le_bytes())
            .unwrap();
        head
    }

    pub fn notify<D: PciDevice + ?Sized>(&self, d: &mut D, q: usize) {
        let off = self.caps.notify + q as u64 * self.caps.notify_mult;
        wr(d, off, 2, q as u64);
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        let mut b = [0u8; 2];
        self.ram.read_at(self.rings[q].used + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    /// Waits for the next used element of queue `q`: (head, length).
    pub fn wait_used(&mut self, q: usize) -> (u16, u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx(q) == self.rings[q].last_used {
            assert!(
                Instant::now() < deadline,
                "queue {q}: nothing used within 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = &mut self.rings[q];
        let at = r.used + 4 + 8 * u64::from(r.last_used % r.size);
        let mut e = [0u8; 8];
        self.ram.read_at(at, &mut e).unwrap();
        r.last_used = r.last_used.wrapping_add(1);
        (
            u16::from_le_bytes([e[0], e[1]]),
            u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        )
    }
}
