//! virtio-blk on a raw image: reads, writes, FLUSH and GET_ID, done on the device's own
//! thread. The image is locked while the VM runs on this host ([`image`]); a move flushes
//! and releases it on the source, and the destination takes it before its vCPUs start.
pub mod image;
mod persist;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::bitmap::BitmapSlice;

use crate::worker::{Ctx, Worker, WorkerError};
use crate::{DeviceError, VirtioDevice, F_VERSION_1, TYPE_BLOCK};
use image::{Image, ImageError, SECTOR};
pub use migratable::DiskConfig;
use migratable::{DiskSource, WriteTracker};
pub use persist::BlockState;

const QUEUE_SIZE: u16 = 256;
/// Bytes moved between the image and guest memory per step of a request.
const CHUNK: usize = 64 << 10;

/// What the device did, for the VM's status.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BlockCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub errors: AtomicU64,
}

impl BlockCounters {
    fn add(n: &AtomicU64, v: u64) {
        n.fetch_add(v, Ordering::Relaxed);
    }
}

pub struct Block {
    name: String,
    image: Arc<Image>,
    capacity: u64,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    counters: Arc<BlockCounters>,
    /// Guest writes while a migration copies the disk.
    tracker: Arc<WriteTracker>,
}

fn image_error(name: &str, e: ImageError) -> DeviceError {
    match e {
        ImageError::Open { path, source } => DeviceError::Open {
            device: name.into(),
            path: path.display().to_string(),
            source,
        },
        ImageError::Locked { path } => DeviceError::Locked {
            device: name.into(),
            path: path.display().to_string(),
        },
        ImageError::Lock { path, source } => DeviceError::Lock {
            device: name.into(),
            path: path.display().to_string(),
            source,
        },
    }
}

impl Block {
    /// Opens the disk of `cfg`; `lock`: take its lock now (a VM that boots here), or leave it
    /// for the restore (a VM arriving, whose source holds it until the switchover).
    pub fn open(name: &str, cfg: &DiskConfig, lock: bool) -> Result<Self, DeviceError> {
        let image = Image::open(&cfg.path, cfg.readonly).map_err(|e| image_error(name, e))?;
        if lock {
            image.lock().map_err(|e| image_error(name, e))?;
        }
        let len = image.size().map_err(|source| DeviceError::Open {
            device: name.into(),
            path: cfg.path.display().to_string(),
            source,
        })?;
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let id = format!("livemig-{name}");
        let n = id.len().min(serial.len());
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block {
            name: name.to_string(),
            image: Arc::new(image),
            capacity: len / SECTOR,
            serial,
            counters: Arc::new(BlockCounters::default()),
            tracker: Arc::new(WriteTracker::new(len / SECTOR * SECTOR)),
        })
    }

    /// The disk as a migration that copies it sees it.
    pub fn disk_source(&self) -> DiskSource {
        DiskSource {
            name: self.name.clone(),
            path: self.image.path().to_path_buf(),
            size: self.capacity * SECTOR,
            readonly: self.image.readonly(),
            tracker: self.tracker.clone(),
        }
    }

    pub fn path(&self) -> &Path {
        self.image.path()
    }

    pub fn locked(&self) -> bool {
        self.image.locked()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Drops the image's lock (a VM that stops for good keeps nothing).
    pub fn release(&self) -> Result<(), DeviceError> {
        self.image
            .flush_and_unlock()
            .map_err(|e| image_error(&self.name, e))
    }
}

impl VirtioDevice for Block {
    type Worker = BlockWorker;
    type State = BlockState;

    fn name(&self) -> &str {
        &self.name
    }

    fn device_type(&self) -> u16 {
        TYPE_BLOCK
    }

    fn class(&self) -> [u8; 3] {
        // Mass storage, SCSI: what QEMU's virtio-blk-pci shows.
        [0x01, 0x00, 0x00]
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = F_VERSION_1
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.image.readonly() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity, size_max, seg_max, geometry, blk_size.
        let mut cfg = [0u8; 24];
        cfg[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        cfg[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        cfg[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn worker(&mut self, _features: u64) -> Result<BlockWorker, DeviceError> {
        Ok(BlockWorker {
            image: self.image.clone(),
            capacity: self.capacity,
            serial: self.serial,
            counters: self.counters.clone(),
            tracker: self.tracker.clone(),
            buf: vec![0; CHUNK],
        })
    }

    fn state(&self) -> BlockState {
        BlockState::of(self)
    }

    fn restore(&mut self, s: &BlockState) -> Result<(), DeviceError> {
        s.apply(self)
    }

    fn hand_over(&mut self) -> Result<(), DeviceError> {
        self.release()
    }

    fn take_back(&mut self) -> Result<(), DeviceError> {
        self.image.lock().map_err(|e| image_error(&self.name, e))
    }

    fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "kind": "disk",
            "name": self.name,
            "path": self.image.path(),
            "readonly": self.image.readonly(),
            "capacity_bytes": self.capacity * SECTOR,
            "locked": self.image.locked(),
            "reads": n(&c.reads),
            "writes": n(&c.writes),
            "flushes": n(&c.flushes),
            "read_bytes": n(&c.read_bytes),
            "written_bytes": n(&c.written_bytes),
            "errors": n(&c.errors),
        })
    }
}

/// The block device's I/O: requests are done one after another, synchronously, so nothing is
/// in flight between two events.
pub struct BlockWorker {
    image: Arc<Image>,
    capacity: u64,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    counters: Arc<BlockCounters>,
    tracker: Arc<WriteTracker>,
    buf: Vec<u8>,
}

type Memory<'a> = &'a ram::DmaMemory;

impl BlockWorker {
    /// Does one request; returns the bytes written into the driver's buffers.
    fn execute(&mut self, chain: DescriptorChain<Memory>, mem: Memory) -> u32 {
        let Ok(mut reader) = chain.clone().reader(mem) else {
            return 0;
        };
        let Ok(mut writer) = chain.writer(mem) else {
            return 0;
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            // No room for the status: nothing can be said back.
            BlockCounters::add(&self.counters.errors, 1);
            return 0;
        }
        let Ok(mut status_writer) = writer.split_at(writable - 1) else {
            return 0;
        };
        let mut header = [0u8; 16];
        let status = match reader.read_exact(&mut header) {
            Err(_) => VIRTIO_BLK_S_IOERR,
            Ok(()) => {
                let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                let mut s = [0u8; 8];
                s.copy_from_slice(&header[8..16]);
                self.request(kind, u64::from_le_bytes(s), &mut reader, &mut writer)
            }
        };
        if status != VIRTIO_BLK_S_OK {
            BlockCounters::add(&self.counters.errors, 1);
        }
        let _ = status_writer.write_all(&[status as u8]);
        (writer.bytes_written() + status_writer.bytes_written()) as u32
    }

    fn request<B: BitmapSlice>(
        &mut self,
        kind: u32,
        sector: u64,
        reader: &mut Reader<'_, B>,
        writer: &mut Writer<'_, B>,
    ) -> u32 {
        let in_range = |bytes: usize| {
            sector
                .checked_mul(SECTOR)
                .and_then(|start| start.checked_add(bytes as u64))
                .is_some_and(|end| end <= self.capacity * SECTOR)
        };
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                if !in_range(len) {
                    return VIRTIO_BLK_S_IOERR;
                }
                let mut done = 0usize;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    let at = sector * SECTOR + done as u64;
                    if self.image.read_at(&mut self.buf[..n], at).is_err()
                        || writer.write_all(&self.buf[..n]).is_err()
                    {
                        return VIRTIO_BLK_S_IOERR;
                    }
                    done += n;
                }
                BlockCounters::add(&self.counters.reads, 1);
                BlockCounters::add(&self.counters.read_bytes, len as u64);
                VIRTIO_BLK_S_OK
            }
            VIRTIO_BLK_T_OUT => {
                let len = reader.available_bytes();
                if self.image.readonly() || !in_range(len) {
                    return VIRTIO_BLK_S_IOERR;
                }
                let t = std::time::Instant::now();
                let mut done = 0usize;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    let at = sector * SECTOR + done as u64;
                    if reader.read_exact(&mut self.buf[..n]).is_err()
                        || self.image.write_at(&self.buf[..n], at).is_err()
                    {
                        return VIRTIO_BLK_S_IOERR;
                    }
                    done += n;
                }
                // Before the guest hears of it: a migration copying the disk sends it again.
                self.tracker
                    .written(sector * SECTOR, len as u64, t.elapsed());
                BlockCounters::add(&self.counters.writes, 1);
                BlockCounters::add(&self.counters.written_bytes, len as u64);
                VIRTIO_BLK_S_OK
            }
            VIRTIO_BLK_T_FLUSH => {
                BlockCounters::add(&self.counters.flushes, 1);
                match self.image.flush() {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(_) => VIRTIO_BLK_S_IOERR,
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(self.serial.len());
                match writer.write_all(&self.serial[..n]) {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(_) => VIRTIO_BLK_S_IOERR,
                }
            }
            _ => VIRTIO_BLK_S_UNSUPP,
        }
    }
}

impl Worker for BlockWorker {
    fn queue_notified(&mut self, q: usize, cx: &mut Ctx) -> Result<(), WorkerError> {
        let mem = cx.mem;
        let queue = &mut cx.queues[q];
        if !queue.ready() {
            return Ok(());
        }
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.execute(chain, mem);
            queue
                .add_used(mem, head, len)
                .map_err(|source| WorkerError::Queue { queue: q, source })?;
            used = true;
        }
        if used
            && queue
                .needs_notification(mem)
                .map_err(|source| WorkerError::Queue { queue: q, source })?
        {
            cx.irq.queue(q);
        }
        Ok(())
    }

    fn drain_and_flush(&mut self, _cx: &mut Ctx) -> Result<(), WorkerError> {
        // Requests complete as they are taken: only the image's cache is left to flush.
        self.image.flush().map_err(WorkerError::Backend)
    }
}
