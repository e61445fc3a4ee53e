//! virtio-net on a tap: frames the guest puts on its transmit queue go out on the tap, frames
//! from the tap fill the buffers of its receive queue. No offloads: each frame comes with a
//! zeroed virtio-net header. After a move it announces the guest's MAC ([`announce`]).
pub mod announce;
mod persist;
pub mod tap;

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use migratable::{MacAddr, NetConfig};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::QueueT;

use crate::worker::{Ctx, Worker, WorkerError};
use crate::{DeviceError, VirtioDevice, F_VERSION_1, TYPE_NET};
pub use announce::Announce;
pub use persist::NetState;
use tap::Tap;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// virtio_net_hdr_v1: flags, gso type, header length, gso size, checksum start and offset,
/// buffers.
const HDR: usize = 12;
/// The largest frame carried (no TSO: an MTU of at most 64 KiB).
const MAX_FRAME: usize = 65_550;

/// What the host decides for the NICs of the VMs it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetOptions {
    /// The bridge the taps it creates go on.
    pub bridge: Option<String>,
    /// How a VM that arrives announces itself.
    pub announce: Announce,
}

/// What the NIC did, for the VM's status.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_dropped: AtomicU64,
}

fn add(n: &AtomicU64) {
    n.fetch_add(1, Ordering::Relaxed);
}

pub struct Net {
    name: String,
    tap: Tap,
    mac: MacAddr,
    options: NetOptions,
    counters: Arc<NetCounters>,
}

impl Net {
    /// Opens (or creates) the tap of `cfg`, up and on the host's bridge.
    pub fn open(name: &str, cfg: &NetConfig, options: &NetOptions) -> Result<Self, DeviceError> {
        let err = |source| DeviceError::Tap {
            device: name.to_string(),
            tap: cfg.tap.clone(),
            source,
        };
        let tap = Tap::open(&cfg.tap).map_err(err)?;
        if let Some(b) = &options.bridge {
            tap.attach(b).map_err(|e| DeviceError::Tap {
                device: name.to_string(),
                tap: format!("{} on bridge {b}", cfg.tap),
                source: e,
            })?;
        }
        Ok(Net {
            name: name.to_string(),
            tap,
            mac: cfg.mac,
            options: options.clone(),
            counters: Arc::new(NetCounters::default()),
        })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }
}

impl VirtioDevice for Net {
    type Worker = NetWorker;
    type State = NetState;

    fn name(&self) -> &str {
        &self.name
    }

    fn device_type(&self) -> u16 {
        TYPE_NET
    }

    fn class(&self) -> [u8; 3] {
        [0x02, 0x00, 0x00]
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac, status.
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac.0);
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn worker(&mut self, _features: u64) -> Result<NetWorker, DeviceError> {
        let tap = self.tap.try_clone().map_err(|source| DeviceError::Tap {
            device: self.name.clone(),
            tap: self.tap.name().to_string(),
            source,
        })?;
        Ok(NetWorker {
            tap,
            counters: self.counters.clone(),
            buf: vec![0; HDR + MAX_FRAME],
            pending: None,
        })
    }

    fn state(&self) -> NetState {
        NetState::of(self)
    }

    fn restore(&mut self, s: &NetState) -> Result<(), DeviceError> {
        s.apply(self)
    }

    fn restored_vm_runs(&mut self) {
        match self.tap.try_clone() {
            Ok(tap) => announce::spawn(&self.name, tap, self.mac, self.options.announce),
            Err(e) => tracing::warn!("{}: not announced: {e}", self.name),
        }
    }

    fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "kind": "net",
            "name": self.name,
            "tap": self.tap.name(),
            "mac": self.mac.to_string(),
            "bridge": self.options.bridge,
            "rx_frames": n(&c.rx_frames),
            "tx_frames": n(&c.tx_frames),
            "rx_dropped": n(&c.rx_dropped),
            "tx_dropped": n(&c.tx_dropped),
        })
    }
}

/// The NIC's I/O between its tap and its queues.
pub struct NetWorker {
    tap: Tap,
    counters: Arc<NetCounters>,
    /// A frame's room, behind the header's.
    buf: Vec<u8>,
    /// A frame read from the tap that no receive buffer took yet (its length).
    pending: Option<usize>,
}

impl NetWorker {
    /// Frames from the tap into the guest's receive buffers, until either runs out.
    fn receive(&mut self, cx: &mut Ctx) -> Result<(), WorkerError> {
        let mem = cx.mem;
        let q = &mut cx.queues[RX];
        if !q.ready() {
            return Ok(());
        }
        let mut used = false;
        loop {
            let len = match self.pending.take() {
                Some(n) => n,
                None => match self.tap.recv(&mut self.buf[HDR..]) {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(e) => return Err(WorkerError::Backend(e)),
                },
            };
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // No buffer: the frame waits, the tap is not read until the guest adds some.
                self.pending = Some(len);
                cx.fd_wanted[0] = false;
                break;
            };
            let head = chain.head_index();
            let mut written = 0;
            match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= HDR + len => {
                    self.buf[..HDR].fill(0);
                    // num_buffers: the frame is in this one chain.
                    self.buf[10] = 1;
                    if w.write_all(&self.buf[..HDR + len]).is_ok() {
                        written = (HDR + len) as u32;
                        add(&self.counters.rx_frames);
                    } else {
                        add(&self.counters.rx_dropped);
                    }
                }
                _ => add(&self.counters.rx_dropped),
            }
            q.add_used(mem, head, written)
                .map_err(|source| WorkerError::Queue { queue: RX, source })?;
            used = true;
        }
        if used
            && q.needs_notification(mem)
                .map_err(|source| WorkerError::Queue { queue: RX, source })?
        {
            cx.irq.queue(RX);
        }
        Ok(())
    }

    /// Every frame the guest queued for sending goes out on the tap.
    fn transmit(&mut self, cx: &mut Ctx) -> Result<(), WorkerError> {
        let mem = cx.mem;
        let q = &mut cx.queues[TX];
        if !q.ready() {
            return Ok(());
        }
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let sent = match chain.reader(mem) {
                Ok(mut r) => {
                    let len = r.available_bytes();
                    if (HDR..=HDR + MAX_FRAME).contains(&len)
                        && r.read_exact(&mut self.buf[..len]).is_ok()
                    {
                        self.tap
                            .send(&self.buf[HDR..len])
                            .map_err(WorkerError::Backend)?
                    } else {
                        false
                    }
                }
                Err(_) => false,
            };
            add(if sent {
                &self.counters.tx_frames
            } else {
                &self.counters.tx_dropped
            });
            q.add_used(mem, head, 0)
                .map_err(|source| WorkerError::Queue { queue: TX, source })?;
            used = true;
        }
        if used
            && q.needs_notification(mem)
                .map_err(|source| WorkerError::Queue { queue: TX, source })?
        {
            cx.irq.queue(TX);
        }
        Ok(())
    }
}

impl Worker for NetWorker {
    fn fds(&self) -> Vec<RawFd> {
        vec![self.tap.fd()]
    }

    fn queue_notified(&mut self, q: usize, cx: &mut Ctx) -> Result<(), WorkerError> {
        match q {
            RX => {
                cx.fd_wanted[0] = true;
                self.receive(cx)
            }
            _ => self.transmit(cx),
        }
    }

    fn fd_ready(&mut self, _i: usize, cx: &mut Ctx) -> Result<(), WorkerError> {
        self.receive(cx)
    }

    fn drain_and_flush(&mut self, cx: &mut Ctx) -> Result<(), WorkerError> {
        // What the guest sent goes out; what has not reached it may be dropped.
        self.transmit(cx)
    }
}
