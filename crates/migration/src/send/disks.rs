//! The source's side of `--storage copy`: each disk's bulk copy (allocated extents only, in
//! offset order behind its tracker's cursor), then the blocks the guest writes again, sent in
//! rounds or mirrored as [`policy::disk_sync`] chooses, and the last of them while paused.
//! Until the switchover commits the source's image is the authority: nothing here writes it.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use migratable::{DiskSource, DiskSync, DISK_BLOCK};

use crate::codec::{self, Codec, CodecPolicy};
use crate::policy;
use crate::protocol::{DiskOffer, DiskRun, MAX_DISK_DATA, MAX_DISK_RUNS};
use crate::report::DiskReport;
use crate::MigrationError;

/// The bulk copy reads this much at a time (one frame).
const CHUNK: u64 = MAX_DISK_DATA as u64;

struct Disk {
    src: DiskSource,
    file: File,
    allocated: u64,
    report: DiskReport,
}

/// A DiskBlocks frame ready to go.
pub(super) struct DiskFrame<'a> {
    pub disk: u8,
    pub codec: Option<Codec>,
    pub runs: &'a [DiskRun],
    pub raw_len: usize,
    pub data: &'a [u8],
}

/// The disks a migration copies.
pub(super) struct DiskCopy {
    disks: Vec<Disk>,
    /// Compress frames (the compressed transport).
    compress: bool,
    buf: Vec<u8>,
    packed: Vec<u8>,
    squeezed: Vec<u8>,
    runs: Vec<DiskRun>,
    /// Writes dirtied so far, and when, for the policy's rate.
    dirtied: (u64, Instant),
    /// Whether a disk mirrors its writes (until the pause).
    mirroring: bool,
    /// The reports as the pause found them.
    paused: Option<Vec<DiskReport>>,
}

fn disk_err(d: &DiskSource, what: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    let (disk, path) = (d.name.clone(), d.path.display().to_string());
    move |source| MigrationError::Disk {
        disk,
        path,
        what,
        source,
    }
}

impl DiskCopy {
    /// Opens each disk's image for reading and measures what is allocated.
    pub fn open(sources: Vec<DiskSource>, compress: bool) -> Result<Self, MigrationError> {
        let mut disks = Vec::new();
        for src in sources {
            let file = File::open(&src.path).map_err(disk_err(&src, "opening"))?;
            let allocated: u64 = ram::extents_between(&file, 0, src.size)
                .map_err(disk_err(&src, "finding its data (SEEK_DATA)"))?
                .iter()
                .map(|(a, b)| b - a)
                .sum();
            let report = DiskReport {
                name: src.name.clone(),
                path: src.path.display().to_string(),
                size_bytes: src.size,
                allocated_bytes: allocated,
                ..DiskReport::default()
            };
            disks.push(Disk {
                src,
                file,
                allocated,
                report,
            });
        }
        Ok(DiskCopy {
            disks,
            compress,
            buf: vec![0; MAX_DISK_DATA],
            packed: Vec::with_capacity(MAX_DISK_DATA),
            squeezed: Vec::new(),
            runs: Vec::new(),
            dirtied: (0, Instant::now()),
            mirroring: false,
            paused: None,
        })
    }

    /// What the Config offers the destination.
    pub fn offers(&self) -> Vec<DiskOffer> {
        self.disks
            .iter()
            .map(|d| DiskOffer {
                name: d.src.name.clone(),
                file: d
                    .src
                    .path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                size: d.src.size,
                allocated: d.allocated,
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// The guest's writes are tracked from now on.
    pub fn start(&mut self) {
        for d in &self.disks {
            d.src.tracker.start();
        }
        self.dirtied = (0, Instant::now());
    }

    /// The bulk copy of every disk: each chunk with data goes as one frame through `send`;
    /// `between` runs after each (cancellation, progress).
    pub fn bulk(
        &mut self,
        send: &mut dyn FnMut(DiskFrame<'_>) -> Result<(), MigrationError>,
        between: &mut dyn FnMut(u64) -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        for i in 0..self.disks.len() {
            let t = Instant::now();
            let size = self.disks[i].src.size;
            let mut pos = 0;
            while pos < size {
                let d = &self.disks[i];
                let next = ram::extents_between(&d.file, pos, size)
                    .map_err(disk_err(&d.src, "finding its data (SEEK_DATA)"))?
                    .first()
                    .map_or(size, |e| e.0);
                let end = if next >= size {
                    size
                } else {
                    (next / CHUNK * CHUNK + CHUNK).min(size)
                };
                // From here a write below `end` is tracked; one before it is in what is read.
                d.src.tracker.advance(end);
                let extents = ram::extents_between(&d.file, pos, end)
                    .map_err(disk_err(&d.src, "finding its data (SEEK_DATA)"))?;
                self.runs.clear();
                self.packed.clear();
                for (a, b) in extents {
                    self.pack(i, a, b, false)?;
                }
                let n = self.packed.len() as u64;
                self.send_packed(i, send)?;
                self.disks[i].report.bulk_bytes += n;
                pos = end;
                between(n)?;
            }
            self.disks[i].report.bulk_ms = t.elapsed().as_millis() as u64;
        }
        Ok(())
    }

    /// Reads `[a, b)` of disk `i` into the frame being built, block by block, zero blocks as
    /// zero runs when `zeros` (a bulk copy's destination holds zeros already).
    fn pack(&mut self, i: usize, a: u64, b: u64, zeros: bool) -> Result<(), MigrationError> {
        let d = &mut self.disks[i];
        let len = (b - a) as usize;
        let buf = &mut self.buf[..len];
        d.file
            .read_exact_at(buf, a)
            .map_err(disk_err(&d.src, "reading"))?;
        for (k, block) in buf.chunks(DISK_BLOCK as usize).enumerate() {
            let offset = a + k as u64 * DISK_BLOCK;
            let zero = block.iter().all(|&x| x == 0);
            if zero {
                d.report.zero_bytes += block.len() as u64;
                if !zeros {
                    continue;
                }
            } else {
                self.packed.extend_from_slice(block);
            }
            let len = block.len() as u32;
            match self.runs.last_mut() {
                Some(r) if r.zero == zero && r.offset + u64::from(r.len) == offset => r.len += len,
                _ => self.runs.push(DiskRun { offset, len, zero }),
            }
        }
        Ok(())
    }

    /// Sends the frame built by [`Self::pack`], compressed when that pays.
    fn send_packed(
        &mut self,
        i: usize,
        send: &mut dyn FnMut(DiskFrame<'_>) -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        if self.runs.is_empty() {
            return Ok(());
        }
        let raw_len = self.packed.len();
        let mut codec = None;
        if self.compress && raw_len > 0 {
            codec::compress(Codec::Lz4, &self.packed, &mut self.squeezed)
                .map_err(|e| disk_err(&self.disks[i].src, "compressing")(e))?;
            if CodecPolicy::worth_sending(raw_len, self.squeezed.len()) {
                codec = Some(Codec::Lz4);
            }
        }
        let data = if codec.is_some() {
            &self.squeezed[..]
        } else {
            &self.packed[..]
        };
        self.disks[i].report.wire_bytes += data.len() as u64;
        send(DiskFrame {
            disk: i as u8,
            codec,
            runs: &self.runs,
            raw_len,
            data,
        })
    }

    /// Sends every block the guest dirtied behind the copy, `max` at most per disk (None: until
    /// none is left); returns the bytes sent. Writes waiting for them (the mirror) are released
    /// once `flush` has put them on the wire.
    pub fn resend(
        &mut self,
        max: Option<u64>,
        send: &mut dyn FnMut(DiskFrame<'_>) -> Result<(), MigrationError>,
        flush: &mut dyn FnMut() -> Result<(), MigrationError>,
    ) -> Result<u64, MigrationError> {
        let mut sent = 0;
        for i in 0..self.disks.len() {
            let mut left = max.unwrap_or(u64::MAX);
            loop {
                let want = left.min(MAX_DISK_RUNS as u64) as usize;
                let (blocks, mark) = self.disks[i].src.tracker.take(want);
                if blocks.is_empty() {
                    break;
                }
                left -= blocks.len() as u64;
                self.runs.clear();
                self.packed.clear();
                let size = self.disks[i].src.size;
                for b in &blocks {
                    self.pack(i, *b, (*b + DISK_BLOCK).min(size), true)?;
                }
                let n: u64 = self.runs.iter().map(|r| u64::from(r.len)).sum();
                self.send_packed(i, send)?;
                flush()?;
                self.disks[i].src.tracker.sent(mark);
                self.disks[i].report.resent_bytes += n;
                sent += n;
                if left == 0 {
                    break;
                }
            }
        }
        Ok(sent)
    }

    /// Bytes dirtied and not sent yet.
    pub fn dirty_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.src.tracker.dirty_bytes()).sum()
    }

    /// Whether any disk mirrors its writes.
    pub fn mirroring(&self) -> bool {
        self.mirroring
    }

    /// Lets the policy choose (again) how writes reach the destination, from the rate the
    /// guest dirtied sent blocks since the last choice and the link's rate (bytes/s), unless
    /// the operator chose (`forced`). Once mirroring, a disk stays so.
    pub fn choose_sync(&mut self, link_rate: f64, forced: Option<DiskSync>) {
        let dirtied: u64 = self
            .disks
            .iter()
            .map(|d| d.src.tracker.stats().dirtied_bytes)
            .sum();
        let secs = self.dirtied.1.elapsed().as_secs_f64().max(1e-3);
        let rate = dirtied.saturating_sub(self.dirtied.0) as f64 / secs;
        self.dirtied = (dirtied, Instant::now());
        let (mode, why) = match forced {
            Some(m) => (m, "chosen with --disk-sync".to_string()),
            None => policy::disk_sync(rate, link_rate),
        };
        for d in &mut self.disks {
            if d.src.tracker.mode() == Some(DiskSync::Mirror) {
                continue;
            }
            if d.report.sync.is_empty() || mode == DiskSync::Mirror {
                if mode == DiskSync::Mirror {
                    tracing::info!("{}: mirroring its writes: {why}", d.src.name);
                }
                d.src.tracker.set_mode(mode);
                self.mirroring |= mode == DiskSync::Mirror;
                d.report.sync = mode.to_string();
                d.report.sync_reason.clone_from(&why);
            }
        }
    }

    /// The VM is about to pause: no write may wait for the mirror (the device must drain);
    /// what is dirty goes in the paused round.
    pub fn stop_mirroring(&mut self) {
        self.mirroring = false;
        for d in &self.disks {
            d.src.tracker.set_mode(DiskSync::Rounds);
        }
    }

    /// The VM is paused and its disks sent: what the guest's writes cost is known.
    pub fn paused(&mut self) {
        self.paused = Some(self.reports());
    }

    /// The report of each disk, with what its guest's writes cost (until the pause).
    pub fn reports(&self) -> Vec<DiskReport> {
        if let Some(r) = &self.paused {
            return r.clone();
        }
        self.disks
            .iter()
            .map(|d| {
                let s = d.src.tracker.stats();
                let ms = |us: u64| us as f64 / 1e3;
                DiskReport {
                    stalled_writes: s.stalled_writes,
                    stall_total_ms: ms(s.stall_total_us),
                    stall_max_ms: ms(s.stall_max_us),
                    write_max_ms: ms(s.write_max_us),
                    dirtied_bytes: s.dirtied_bytes,
                    guest_writes_per_s_before: s.writes_per_s_before,
                    guest_writes_per_s_during: s.writes_per_s_during,
                    ..d.report.clone()
                }
            })
            .collect()
    }

    /// Removes the source's images (`--remove-source`, once the VM runs on the copies).
    pub fn remove_sources(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for d in &self.disks {
            match std::fs::remove_file(&d.src.path) {
                Ok(()) => {
                    tracing::info!("removed {}: the VM runs on its copy", d.src.path.display())
                }
                Err(e) => failed.push(format!("{}: {e}", d.src.path.display())),
            }
        }
        failed
    }
}

impl Drop for DiskCopy {
    /// However the migration ended, the guest's writes are no longer tracked or held.
    fn drop(&mut self) {
        for d in &self.disks {
            d.src.tracker.stop();
        }
    }
}
