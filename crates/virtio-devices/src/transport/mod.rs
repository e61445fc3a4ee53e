//! The virtio 1.x PCI transport (modern only): one 64 KiB memory BAR holding the common
//! configuration, the ISR, the device configuration, the queue notification addresses and
//! the MSI-X table and pending bits; virtio capabilities in configuration space that point
//! at each, and the PCI configuration access window.
mod persist;

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use pci::{Bar, ConfigSpace, Identity, MsiSink, Msix, PciDevice, NO_VECTOR};
use ram::GuestRam;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::worker::{Running, Spawn, Stopped};
use crate::{DeviceError, Interrupt, VirtioDevice};
pub use persist::VirtioPciState;

const VIRTIO_VENDOR: u16 = 0x1af4;
const MODERN_DEVICE_BASE: u16 = 0x1040;
const BAR_SIZE: u64 = 0x1_0000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x8000;
const MSIX_PBA: u64 = 0xc000;
const CAP_VENDOR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
const FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;

/// Registers an eventfd that KVM signals on a guest write to an address (an ioeventfd), so
/// queue notifications reach the device's thread without a vCPU exit.
pub trait IoEvents: Send + Sync {
    fn register(&self, event: &EventFd, addr: u64) -> std::io::Result<()>;
    fn unregister(&self, event: &EventFd, addr: u64) -> std::io::Result<()>;
}

/// One queue as the driver configured it through the common configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegs {
    pub max_size: u16,
    pub size: u16,
    pub vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            vector: NO_VECTOR,
            ..Default::default()
        }
    }
}

/// The common configuration's device-wide registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommonRegs {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub generation: u8,
    pub queue_select: u16,
}

/// The device's I/O thread, by what it is doing.
enum Io<W> {
    /// Not activated by the driver.
    Idle,
    Running(Running<W>),
    /// Stopped for a pause (or loaded from saved state), with its queues.
    Parked(W, Vec<Queue>),
}

/// A virtio device on the PCI bus.
pub struct VirtioPci<D: VirtioDevice> {
    device: D,
    config: ConfigSpace,
    bar: Bar,
    msix: Arc<Mutex<Msix>>,
    sink: Arc<dyn MsiSink>,
    ioevents: Arc<dyn IoEvents>,
    ram: Arc<GuestRam>,
    regs: CommonRegs,
    config_vector: Arc<AtomicU16>,
    isr: Arc<AtomicU8>,
    queues: Vec<QueueRegs>,
    queue_events: Vec<Arc<EventFd>>,
    /// Where the queue notifications are registered with KVM.
    notify_at: Option<u64>,
    /// The configuration access capability's offset.
    cfg_window: usize,
    io: Io<D::Worker>,
    /// Restored from saved state: the next resume is the VM's first run here.
    restored: bool,
}

impl<D: VirtioDevice> VirtioPci<D> {
    pub fn new(
        device: D,
        ram: Arc<GuestRam>,
        sink: Arc<dyn MsiSink>,
        ioevents: Arc<dyn IoEvents>,
    ) -> Result<Self, DeviceError> {
        let sizes = device.queue_sizes();
        let mut config = ConfigSpace::new(Identity {
            vendor: VIRTIO_VENDOR,
            device: MODERN_DEVICE_BASE + device.device_type(),
            revision: 1,
            class: device.class(),
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x40,
        });
        let bar = config.add_bar(0, BAR_SIZE);
        let notify_len = sizes.len() as u32 * NOTIFY_MULTIPLIER;
        add_virtio_cap(&mut config, CAP_COMMON, COMMON, COMMON_LEN as u32, &[]);
        add_virtio_cap(
            &mut config,
            CAP_NOTIFY,
            NOTIFY,
            notify_len,
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        );
        add_virtio_cap(&mut config, CAP_ISR, ISR, 1, &[]);
        add_virtio_cap(&mut config, CAP_DEVICE, DEVICE, DEVICE_LEN as u32, &[]);
        let cfg_window = add_cfg_window(&mut config);
        // A vector per queue and one for configuration changes.
        let vectors = sizes.len() as u16 + 1;
        let msix = Msix::new(&mut config, vectors, 0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let queue_events = sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DeviceError::Spawn(device.name().to_string(), e))?;
        Ok(VirtioPci {
            queues: sizes.into_iter().map(QueueRegs::new).collect(),
            device,
            config,
            bar,
            msix: Arc::new(Mutex::new(msix)),
            sink,
            ioevents,
            ram,
            regs: CommonRegs::default(),
            config_vector: Arc::new(AtomicU16::new(NO_VECTOR)),
            isr: Arc::new(AtomicU8::new(0)),
            queue_events,
            notify_at: None,
            cfg_window,
            io: Io::Idle,
            restored: false,
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn name(&self) -> &str {
        self.device.name()
    }

    /// Whether the driver has set the device up (DRIVER_OK).
    pub fn activated(&self) -> bool {
        !matches!(self.io, Io::Idle)
    }

    /// Stops the I/O thread: what is in flight completes and is flushed first.
    pub fn pause(&mut self) -> Result<(), DeviceError> {
        let Io::Running(r) = std::mem::replace(&mut self.io, Io::Idle) else {
            return Ok(());
        };
        let name = self.device.name().to_string();
        let t = std::time::Instant::now();
        let Stopped {
            worker,
            queues,
            failure,
        } = r.stop().ok_or(DeviceError::WorkerPanicked(name.clone()))?;
        tracing::debug!(device = %name, us = t.elapsed().as_micros(), "I/O thread stopped");
        self.io = Io::Parked(worker, queues);
        match failure {
            Some(e) => {
                self.regs.status |= NEEDS_RESET;
                Err(DeviceError::Worker(name, e))
            }
            None => Ok(()),
        }
    }

    /// Holds what the device gave up for a move, then restarts its I/O thread.
    pub fn resume(&mut self) -> Result<(), DeviceError> {
        self.device.take_back()?;
        if std::mem::take(&mut self.restored) {
            self.device.restored_vm_runs();
        }
        let Io::Parked(worker, queues) = std::mem::replace(&mut self.io, Io::Idle) else {
            return Ok(());
        };
        self.start(worker, queues)
    }

    fn start(&mut self, worker: D::Worker, queues: Vec<Queue>) -> Result<(), DeviceError> {
        let vectors = self.queues.iter().map(|q| q.vector).collect();
        let irq = Interrupt::new(
            self.msix.clone(),
            self.sink.clone(),
            vectors,
            self.config_vector.clone(),
            self.isr.clone(),
        );
        let running = Running::spawn(Spawn {
            name: self.device.name().to_string(),
            worker,
            queues,
            ram: self.ram.clone(),
            irq,
            queue_events: self.queue_events.clone(),
        })
        .map_err(|e| DeviceError::Spawn(self.device.name().to_string(), e))?;
        self.io = Io::Running(running);
        Ok(())
    }

    /// The driver set DRIVER_OK: its queues go live and the I/O thread starts.
    fn activate(&mut self) {
        let queues = match self.live_queues() {
            Ok(q) => q,
            Err(why) => {
                tracing::warn!("{}: the driver's queues are unusable: {why}", self.name());
                self.regs.status |= NEEDS_RESET;
                return;
            }
        };
        let started = self
            .device
            .worker(self.regs.driver_features)
            .and_then(|w| self.start(w, queues));
        if let Err(e) = started {
            tracing::error!("{e}");
            self.regs.status |= NEEDS_RESET;
        }
    }

    fn live_queues(&self) -> Result<Vec<Queue>, String> {
        let mem = self.ram.dma().map_err(|e| e.to_string())?;
        let event_idx = self.regs.driver_features
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        self.queues
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut q = Queue::new(r.max_size).map_err(|e| format!("queue {i}: {e}"))?;
                if r.enabled {
                    q.try_set_size(r.size)
                        .map_err(|e| format!("queue {i}: {e}"))?;
                    q.set_desc_table_address(Some(r.desc as u32), Some((r.desc >> 32) as u32));
                    q.set_avail_ring_address(Some(r.driver as u32), Some((r.driver >> 32) as u32));
                    q.set_used_ring_address(Some(r.device as u32), Some((r.device >> 32) as u32));
                    q.set_event_idx(event_idx);
                    q.set_ready(true);
                    if !q.is_valid(mem) {
                        return Err(format!("queue {i}'s rings are not in guest memory"));
                    }
                }
                Ok(q)
            })
            .collect()
    }

    /// The driver wrote 0 to the status: stop and forget everything it set up.
    fn reset(&mut self) {
        if let Err(e) = self.pause() {
            tracing::warn!("resetting: {e}");
        }
        self.io = Io::Idle;
        let sizes: Vec<u16> = self.queues.iter().map(|q| q.max_size).collect();
        self.queues = sizes.into_iter().map(QueueRegs::new).collect();
        self.regs = CommonRegs {
            generation: self.regs.generation,
            ..Default::default()
        };
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        self.isr.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.regs.status;
        let mut v = v;
        if v & FEATURES_OK != 0 && old & FEATURES_OK == 0 {
            // Features the device did not offer are refused: FEATURES_OK does not stick.
            if self.regs.driver_features & !self.device.features() != 0 {
                v &= !FEATURES_OK;
            }
        }
        self.regs.status = v | (old & NEEDS_RESET);
        let now_ok = v & DRIVER_OK != 0 && old & DRIVER_OK == 0;
        if now_ok && v & FEATURES_OK != 0 && v & FAILED == 0 && !self.activated() {
            self.activate();
        }
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.regs.queue_select as usize)
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let r = &self.regs;
        let q = self.queues.get(r.queue_select as usize).copied();
        let features = self.device.features();
        let v: u64 = match offset {
            0x00 => r.device_feature_select.into(),
            0x04 => match r.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            0x08 => r.driver_feature_select.into(),
            0x0c => match r.driver_feature_select {
                0 => r.driver_features & 0xffff_ffff,
                1 => r.driver_features >> 32,
                _ => 0,
            },
            0x10 => self.config_vector.load(Ordering::SeqCst).into(),
            0x12 => self.queues.len() as u64,
            0x14 => r.status.into(),
            0x15 => r.generation.into(),
            0x16 => r.queue_select.into(),
            0x18 => q.map_or(0, |q| q.size.into()),
            0x1a => q.map_or(NO_VECTOR, |q| q.vector).into(),
            0x1c => q.is_some_and(|q| q.enabled).into(),
            0x1e => u64::from(r.queue_select),
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.driver),
            0x2c => q.map_or(0, |q| q.driver >> 32),
            0x30 => q.map_or(0, |q| q.device),
            0x34 => q.map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&b[..n]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let live = self.regs.status & DRIVER_OK != 0;
        let vectors = self.msix_vectors();
        let lo = |old: u64| (old & !0xffff_ffff) | (v & 0xffff_ffff);
        let hi = |old: u64| (old & 0xffff_ffff) | (v << 32);
        match offset {
            0x00 => self.regs.device_feature_select = v as u32,
            0x08 => self.regs.driver_feature_select = v as u32,
            0x0c if !live => match self.regs.driver_feature_select {
                0 => self.regs.driver_features = lo(self.regs.driver_features),
                1 => self.regs.driver_features = hi(self.regs.driver_features),
                _ => {}
            },
            0x10 => {
                let vector = if (v as u16) < vectors {
                    v as u16
                } else {
                    NO_VECTOR
                };
                self.config_vector.store(vector, Ordering::SeqCst);
            }
            0x14 => self.set_status(v as u8),
            0x16 => self.regs.queue_select = v as u16,
            // Queue registers change only while the device is not live.
            _ if live => {}
            0x18 => {
                if let Some(q) = self.selected() {
                    if (v as u16).is_power_of_two() && v as u16 <= q.max_size {
                        q.size = v as u16;
                    }
                }
            }
            0x1a => {
                if let Some(q) = self.selected() {
                    q.vector = if (v as u16) < vectors {
                        v as u16
                    } else {
                        NO_VECTOR
                    };
                }
            }
            0x1c => {
                if let Some(q) = self.selected() {
                    q.enabled = v & 1 == 1;
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 => {
                if let Some(q) = self.selected() {
                    let field = match offset {
                        0x20 | 0x24 => &mut q.desc,
                        0x28 | 0x2c => &mut q.driver,
                        _ => &mut q.device,
                    };
                    *field = if offset.is_multiple_of(8) {
                        if n == 8 {
                            v
                        } else {
                            lo(*field)
                        }
                    } else {
                        hi(*field)
                    };
                }
            }
            _ => {}
        }
    }

    fn msix_vectors(&self) -> u16 {
        locks::lock(&self.msix).vectors() as u16
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON + COMMON_LEN => self.read_common(o, data),
            ISR => data[0] = self.isr.swap(0, Ordering::SeqCst),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                locks::lock(&self.msix).read_table(o - MSIX_TABLE, data)
            }
            o if o >= MSIX_PBA => locks::lock(&self.msix).read_pba(o - MSIX_PBA, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.write_common(o, data),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE, data)
            }
            o if (NOTIFY..NOTIFY + self.queues.len() as u64 * u64::from(NOTIFY_MULTIPLIER))
                .contains(&o) =>
            {
                // Reached only without an ioeventfd (or before KVM has it).
                let q = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                let _ = self.queue_events[q].write(1);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                locks::lock(&self.msix).write_table(o - MSIX_TABLE, data, &*self.sink)
            }
            _ => {}
        }
    }

    /// Moves the queue notifications' ioeventfds to the BAR at `addr`.
    fn register_notify(&mut self, addr: u64) {
        let unregister = self.notify_at.take();
        for (q, e) in self.queue_events.iter().enumerate() {
            let off = NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER);
            if let Some(old) = unregister {
                let _ = self.ioevents.unregister(e, old + off);
            }
            if let Err(err) = self.ioevents.register(e, addr + off) {
                tracing::warn!(
                    "{}: queue {q}'s notifications exit to the VMM: {err}",
                    self.device.name()
                );
            }
        }
        self.notify_at = Some(addr);
    }
}

impl<D: VirtioDevice> Drop for VirtioPci<D> {
    fn drop(&mut self) {
        if let Io::Running(r) = std::mem::replace(&mut self.io, Io::Idle) {
            let _ = r.stop();
        }
        if let Some(at) = self.notify_at.take() {
            for (q, e) in self.queue_events.iter().enumerate() {
                let off = NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER);
                let _ = self.ioevents.unregister(e, at + off);
            }
        }
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPci<D> {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.cfg_window + 16;
        if offset == window {
            let (bar, off, len) = self.window();
            if bar == 0 && matches!(len, 1 | 2 | 4) && len as usize <= data.len() {
                self.bar_read(u64::from(off), &mut data[..len as usize]);
                return;
            }
        }
        self.config.read(offset, data);
    }

    fn config_written(&mut self, offset: u16, len: usize) {
        let offset = offset as usize;
        let window = self.cfg_window + 16;
        if offset == window {
            let (bar, off, wlen) = self.window();
            if bar == 0 && matches!(wlen, 1 | 2 | 4) && wlen as usize <= len {
                let mut d = [0u8; 4];
                self.config.read(window, &mut d);
                self.bar_write(u64::from(off), &d[..wlen as usize]);
            }
        }
        let mut m = locks::lock(&self.msix);
        if m.touches_control(offset, len) {
            m.control_written(&self.config, &*self.sink);
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == self.bar.index {
            self.bar_read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == self.bar.index {
            self.bar_write(offset, data);
        }
    }

    fn bar_placed(&mut self, bar: usize, addr: u64) {
        if bar == self.bar.index {
            self.register_notify(addr);
        }
    }
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// The configuration access window's BAR, offset and length.
    fn window(&self) -> (u8, u32, u32) {
        let c = self.cfg_window;
        (
            self.config.u8_at(c + 4),
            self.config.u32_at(c + 8),
            self.config.u32_at(c + 12),
        )
    }
}

/// A virtio_pci_cap for a structure at `offset` of BAR 0, `extra` bytes after it.
fn add_virtio_cap(config: &mut ConfigSpace, kind: u8, offset: u64, len: u32, extra: &[u8]) {
    let cap_len = 16 + extra.len() as u8;
    let mut body = vec![cap_len, kind, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&len.to_le_bytes());
    body.extend_from_slice(extra);
    config.add_capability(CAP_VENDOR, &body, &[]);
}

/// The PCI configuration access capability: its BAR, offset, length and data are the
/// driver's to write; reading or writing its data reaches the BAR.
fn add_cfg_window(config: &mut ConfigSpace) -> usize {
    let mut body = vec![20, CAP_PCI_CFG, 0, 0, 0, 0];
    body.extend_from_slice(&[0; 12]);
    let mut writable = vec![0, 0, 0xff, 0, 0, 0];
    writable.extend_from_slice(&[0xff; 12]);
    config.add_capability(CAP_VENDOR, &body, &writable)
}
