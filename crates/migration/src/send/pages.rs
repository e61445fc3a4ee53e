//! Pages from guest RAM into batches, and batches onto the wire by one of three page paths.
use std::sync::Arc;
use std::time::{Duration, Instant};

use migratable::Snapshot;
use ram::{is_zero, GuestRam, PAGE_SIZE};
use transport::ShutdownHandle;
use zerocopy::IntoBytes;

use super::compress::{Compressor, Job};
use super::dedup::Dedup;
use super::delta_cache::DeltaCache;
use super::link::{consecutive, Link, Outgoing};
use super::page_set::PageSet;
use super::streams::Streams;
use crate::codec::{Choice, Codec, CodecPolicy};
use crate::policy;
use crate::protocol::{DeltaHead, Kind, PageBatch, RefHead, RefTo, RoundEnd, MAX_BATCH_PAGES};
use crate::report::{CompressionReport, PageCounts};
use crate::{MigrationError, Report, Wire};

const PAGE: usize = PAGE_SIZE as usize;
const BATCH_BYTES: usize = MAX_BATCH_PAGES * PAGE;
/// The link is measured over windows this long.
const LINK_WINDOW: Duration = Duration::from_millis(20);
/// Data always waiting in the sockets at least this much means the link set the pace.
const SATURATED_BACKLOG: usize = 128 << 10;

/// How page data gets from guest RAM onto the wire; one per migration.
pub(super) enum PagePath {
    /// Copied into the batch: the guest keeps writing, so the bytes we checksum must be the
    /// bytes we send. A page torn by a concurrent write is dirty again and goes next round.
    Copy,
    /// Copied, then compressed on worker threads whenever the codec policy says it pays.
    Compressed {
        workers: Box<Compressor>,
        meter: LinkMeter,
    },
    /// Not copied: data pages go from guest RAM to the socket when their batch is written.
    Direct { pages: Vec<u64> },
}

/// What the link delivered since the last sample (the codec policy's view of the link).
pub(super) struct LinkMeter {
    wire: Wire,
    since: Instant,
    delivered: u64,
    /// The least data that waited for the link at any check in the window.
    min_backlog: usize,
}

impl LinkMeter {
    pub fn new(wire: Wire) -> Self {
        LinkMeter {
            wire,
            since: Instant::now(),
            delivered: 0,
            min_backlog: usize::MAX,
        }
    }

    /// Adds one look at the sockets (`pending`: not yet acknowledged by the peer, of which
    /// `waiting` still in our queues); once a window has passed, tells the policy the rate the
    /// peer acknowledged and whether data waited for the link throughout.
    fn observe(&mut self, pending: usize, waiting: usize, policy: &mut CodecPolicy) {
        let in_sockets = pending.saturating_sub(waiting) as u64;
        let delivered = self.wire.sent().saturating_sub(in_sockets);
        self.min_backlog = self.min_backlog.min(pending);
        let dt = self.since.elapsed();
        if dt < LINK_WINDOW {
            return;
        }
        let rate = delivered.saturating_sub(self.delivered) as f64 / dt.as_secs_f64();
        policy.record_link(rate, self.min_backlog >= SATURATED_BACKLOG);
        self.since = Instant::now();
        self.delivered = delivered;
        self.min_backlog = usize::MAX;
    }
}

/// Batches pages and writes them: on the control connection, or on page streams.
pub(super) struct PageSender<'a> {
    link: Link<'a>,
    ram: Arc<GuestRam>,
    batch: PageBatch,
    data: Vec<u8>,
    path: PagePath,
    streams: Streams,
    pages: PageCounts,
    /// The control connection's socket, to see what it has not delivered yet.
    control: ShutdownHandle,
    /// Last-sent pages, for deltas (tcp and compressed paths, unless `--no-delta`).
    delta: Option<DeltaCache>,
    delta_buf: Vec<u8>,
    /// Sync rounds: pages going out have gone before.
    resend: bool,
    /// Whole pages in the batch being built.
    batch_full: u64,
    /// During the copy: hot pages held back to go last (see [`Self::start_deferring`]).
    deferred: Option<Vec<u64>>,
    /// During a copy without deltas: pages the dirty log showed written, which the copy
    /// leaves to the first sync round (manual protect keeps them in the log until then).
    written: Option<PageSet>,
    /// Pages the copy left to the first sync round.
    left_to_sync: u64,
    /// Pages the destination holds by content, for references (unless `--no-dedup`, or once
    /// they stopped paying).
    dedup: Option<Dedup>,
    /// Pages looked up when references stopped paying.
    dedup_stopped_after: Option<u64>,
    /// Direct pages read to find zero pages so far, and how many were.
    zero_scan: (u64, u64),
    /// Direct pages read when looking for zero pages stopped paying.
    zero_scan_stopped_after: Option<u64>,
    /// Direct pages that went copied, in scattered batches ([`policy::copy_scattered`]).
    direct_copied: u64,
    /// Batches built so far: the id of the next.
    batches: u64,
}

/// How one page went into the batch.
enum Placed {
    Zero,
    Whole,
    Delta,
    Ref,
    HostRef,
}

impl<'a> PageSender<'a> {
    /// From the next page on, pages go again (sync rounds): their last-sent content is kept
    /// for deltas, and nothing is looked up by content.
    pub fn start_resending(&mut self) {
        self.resend = true;
    }

    /// Whether re-sent pages go as deltas.
    pub fn sends_deltas(&self) -> bool {
        self.delta.is_some()
    }

    /// The keys of the destination host's page cache, for references to it.
    pub fn set_host_keys(&mut self, keys: &[u8]) {
        if let Some(d) = &mut self.dedup {
            d.set_host_keys(keys);
        }
    }

    /// The paused VM's state and the end of the migration's frames, on the control
    /// connection.
    pub fn send_state_and_done(&mut self, state: &Snapshot) -> Result<(), MigrationError> {
        let out = &mut self.link.out;
        out.send_state(state)?;
        out.send(Kind::Done, &[])?;
        Ok(out.flush()?)
    }

    /// CPU the page streams' threads used.
    pub fn stream_cpu_seconds(&self) -> f64 {
        self.streams.cpu_seconds
    }

    /// What the page path did, into the migration's report.
    pub fn report_into(&mut self, r: &mut Report) {
        r.pages = self.pages.clone();
        r.compression = self.compression_report();
        r.direct_send = Some(self.direct_mechanism().to_string()).filter(|m| !m.is_empty());
        r.direct_recv = Some(self.direct_landing()).filter(|m| !m.is_empty());
        r.delta = self.delta.as_ref().map(|c| c.report.clone());
        r.dedup_stopped_after_pages = self.dedup_stopped_after;
        r.zero_scan_stopped_after_pages = self.zero_scan_stopped_after;
        r.copy_left_to_sync_pages = self.left_to_sync;
        r.direct_copied_pages = self.direct_copied;
    }

    pub fn new(
        link: Link<'a>,
        ram: Arc<GuestRam>,
        path: PagePath,
        streams: Streams,
        control: ShutdownHandle,
        delta: Option<DeltaCache>,
        dedup: Option<Dedup>,
    ) -> Self {
        PageSender {
            link,
            ram,
            batch: PageBatch::default(),
            data: Vec::with_capacity(BATCH_BYTES),
            path,
            streams,
            pages: PageCounts::default(),
            control,
            delta,
            delta_buf: Vec::new(),
            resend: false,
            batch_full: 0,
            deferred: None,
            written: None,
            left_to_sync: 0,
            direct_copied: 0,
            dedup,
            dedup_stopped_after: None,
            zero_scan: (0, 0),
            zero_scan_stopped_after: None,
            batches: 0,
        }
    }

    /// The copy begins. Pages the guest is known to write will go again in the next round
    /// anyway: with deltas the copy holds them back until its end, when more of its writes
    /// are known and what is sent of them is kept for deltas; without, it leaves them to that
    /// round.
    pub fn start_deferring(&mut self) {
        if self.delta.is_some() {
            self.deferred = Some(Vec::new());
        } else {
            self.written = Some(PageSet::new(self.ram.size()));
        }
    }

    /// The VM is paused: what is left goes from this thread alone, which goes first
    /// ([`super::compress::Compressor::compress_here`]).
    pub fn paused(&mut self) {
        if let PagePath::Compressed { workers, .. } = &mut self.path {
            workers.compress_here();
        }
    }

    /// The pages held back; from now on nothing is.
    pub fn take_deferred(&mut self) -> Vec<u64> {
        self.written = None;
        self.deferred.take().unwrap_or_default()
    }

    /// During the copy, the dirty log (read without clearing it) showed these pages written.
    pub fn written_in_copy(&mut self, pages: impl Iterator<Item = u64>) {
        if let Some(c) = &mut self.delta {
            c.mark_hot(pages);
        } else if let Some(w) = &mut self.written {
            pages.for_each(|off| w.insert(off));
        }
    }

    /// Queues one page (memfd offset); writes the batch when it is full. False: held back
    /// for the end of the copy.
    pub fn page(&mut self, off: u64) -> Result<bool, MigrationError> {
        if self.written.as_ref().is_some_and(|w| w.contains(off)) {
            self.left_to_sync += 1;
            return Ok(false);
        }
        if let (Some(d), Some(c)) = (&mut self.deferred, &self.delta) {
            if c.is_hot(off) {
                d.push(off);
                return Ok(false);
            }
        }
        let placed = if let PagePath::Direct { .. } = self.path {
            self.direct_page(off)?
        } else {
            self.copy_page(off)?
        };
        match placed {
            Placed::Zero => {
                self.pages.zero += 1;
                self.batch.push(off, true);
            }
            Placed::Whole => {
                self.batch_full += 1;
                self.batch.push(off, false);
            }
            Placed::Delta => {
                self.pages.delta += 1;
                self.batch.push_delta(off);
            }
            Placed::Ref => {
                self.pages.dedup += 1;
                self.batch.push_ref(off);
            }
            Placed::HostRef => {
                self.pages.dedup_host += 1;
                self.batch.push_ref(off);
            }
        }
        if self.batch.len() == MAX_BATCH_PAGES {
            self.flush_batch()?;
        }
        Ok(true)
    }

    /// A direct page goes from guest RAM as it is, unless it is zero; pages are read to tell
    /// only while that pays ([`policy::zero_scan_pays`]).
    fn direct_page(&mut self, off: u64) -> Result<Placed, MigrationError> {
        if self.zero_scan_stopped_after.is_none() {
            let zero = self.ram.page_is_zero(off)?;
            let (read, found) = &mut self.zero_scan;
            *read += 1;
            *found += u64::from(zero);
            if !policy::zero_scan_pays(*read, *found) {
                self.zero_scan_stopped_after = Some(*read);
            }
            if zero {
                return Ok(Placed::Zero);
            }
        }
        if let PagePath::Direct { pages } = &mut self.path {
            pages.push(off);
        }
        Ok(Placed::Whole)
    }

    /// Copies the page into the batch's data: whole; as a delta against what the destination
    /// holds when that is known and small; in the copy, as a reference when the destination
    /// holds the same content elsewhere; zero pages take no data.
    fn copy_page(&mut self, off: u64) -> Result<Placed, MigrationError> {
        let start = self.data.len();
        self.data.resize(start + PAGE, 0);
        self.ram.read_at(off, &mut self.data[start..])?;
        if is_zero(&self.data[start..]) {
            self.data.truncate(start);
            if let Some(c) = &mut self.delta {
                c.forget(off);
            }
            self.forget_content(off);
            return Ok(Placed::Zero);
        }
        let delta = self
            .delta
            .as_mut()
            .and_then(|c| c.encode(off, &self.data[start..], &mut self.delta_buf, self.resend));
        if let Some(d) = delta {
            self.forget_content(off);
            self.data.truncate(start);
            let head = if d.replace {
                DeltaHead::replace(d.base, self.delta_buf.len())
            } else {
                DeltaHead::new(d.base, self.delta_buf.len())
            };
            self.data.extend_from_slice(head.as_bytes());
            self.data.extend_from_slice(&self.delta_buf);
            return Ok(Placed::Delta);
        }
        // References only in the copy: a re-sent page seldom matches another, and hashing it
        // would add work to the sync rounds and to the pause.
        let reference = match &mut self.dedup {
            Some(d) if !self.resend => d.lookup(off, &self.data[start..]),
            _ => {
                self.forget_content(off);
                None
            }
        };
        self.stop_dedup_unless_it_pays();
        if let Some((to, hash)) = reference {
            self.data.truncate(start);
            let (head, placed) = match to {
                RefTo::Page(from) => (RefHead::new(from, hash), Placed::Ref),
                RefTo::HostCache => (RefHead::host_cache(hash), Placed::HostRef),
            };
            self.data.extend_from_slice(head.as_bytes());
            return Ok(placed);
        }
        Ok(Placed::Whole)
    }

    /// Drops dedup for the rest of the migration once its trial found too few repeats: no
    /// reference is made after, so no target can go stale.
    fn stop_dedup_unless_it_pays(&mut self) {
        if let Some((false, looked)) = self.dedup.as_ref().map(Dedup::pays) {
            tracing::info!(
                looked,
                "pages do not repeat: no more references this migration"
            );
            self.dedup = None;
            self.dedup_stopped_after = Some(looked);
        }
    }

    /// `off` goes out with content the dedup index does not learn: it is no target any more.
    fn forget_content(&mut self, off: u64) {
        if let Some(d) = &mut self.dedup {
            d.forget(off);
        }
    }

    /// The batch being built gets its id (for dedup: its pages are targets once written).
    fn next_batch(&mut self) -> u64 {
        self.batches += 1;
        if let Some(d) = &mut self.dedup {
            d.built(self.batches);
        }
        self.batches
    }

    /// Batch `id` went onto the wire.
    fn written(&mut self, id: u64) {
        let streams = !self.streams.is_empty();
        if let Some(d) = &mut self.dedup {
            d.written(id, streams);
        }
    }

    fn take_data(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.data, Vec::with_capacity(BATCH_BYTES))
    }

    /// Writes the batch being built (through the compressors on the compressed path).
    fn flush_batch(&mut self) -> Result<(), MigrationError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let head = self.batch.head();
        self.batch.clear();
        let data = self.take_data();
        let data_pages = std::mem::take(&mut self.batch_full);
        let id = self.next_batch();
        let out = match &mut self.path {
            PagePath::Direct { pages } => {
                self.pages.normal += pages.len() as u64;
                let pages = std::mem::take(pages);
                let runs = consecutive(&pages);
                if policy::copy_scattered(pages.len(), runs.len()) {
                    self.direct_copied += pages.len() as u64;
                    Outgoing::Pages {
                        head,
                        data: read_pages(&self.ram, &pages, data)?,
                    }
                } else {
                    Outgoing::Direct { head, runs }
                }
            }
            PagePath::Copy => {
                self.pages.normal += data_pages;
                Outgoing::Pages { head, data }
            }
            PagePath::Compressed { workers, .. } => {
                let choice = workers.choose();
                if choice != Choice::Raw {
                    workers.submit(Job {
                        id,
                        head,
                        data,
                        pages: data_pages,
                        out: Vec::new(),
                        choice,
                        secs: 0.0,
                    })?;
                    return self.drain(false);
                }
                // Raw batches skip the workers: no hand-off, no wait.
                workers.stats.batches_raw += 1;
                self.pages.normal += data_pages;
                Outgoing::Pages { head, data }
            }
        };
        self.emit(out)?;
        self.written(id);
        self.drain(false)
    }

    /// Writes a batch on the control connection, or queues it on a page stream.
    fn emit(&mut self, b: Outgoing) -> Result<(), MigrationError> {
        if self.streams.is_empty() {
            self.link.send(&self.ram, b)?;
        } else {
            self.streams.send(b)?;
        }
        self.meter_link()
    }

    /// Writes the batches the compressors finished; with `all`, waits for every one in flight.
    fn drain(&mut self, all: bool) -> Result<(), MigrationError> {
        loop {
            let PagePath::Compressed { workers, .. } = &mut self.path else {
                return Ok(());
            };
            let Some(job) = workers.finished(all)? else {
                return Ok(());
            };
            let id = job.id;
            let out = encoded(job, workers, &mut self.pages);
            self.emit(out)?;
            self.written(id);
        }
    }

    /// Ends a round: everything batched goes out, then the round's end on every connection.
    pub fn round_end(&mut self, r: RoundEnd) -> Result<(), MigrationError> {
        self.flush_batch()?;
        self.drain(true)?;
        self.streams.round_end(r)?;
        self.link.out.send_round_end(r)?;
        self.link.out.flush()?;
        if let Some(d) = &mut self.dedup {
            d.round_end();
        }
        Ok(())
    }

    /// Sends the batch being built now, however few pages it has.
    pub fn flush_pages(&mut self) -> Result<(), MigrationError> {
        self.flush_batch()
    }

    /// One DiskBlocks frame, on the control connection (in order with every other disk frame).
    pub fn send_disk(&mut self, f: super::disks::DiskFrame<'_>) -> Result<(), MigrationError> {
        self.link
            .out
            .send_disk_blocks(f.disk, f.codec, f.runs, f.raw_len, f.data)?;
        Ok(())
    }

    /// The control connection's frame writer, for frames outside the page path.
    pub fn control_out(&mut self) -> &mut crate::protocol::FrameWriter<super::link::Writer<'a>> {
        &mut self.link.out
    }

    /// Puts what the control connection buffered on the wire.
    pub fn flush_control(&mut self) -> Result<(), MigrationError> {
        Ok(self.link.out.flush()?)
    }

    /// Tells the destination which RAM the copy will send (the first frame after Ready), at
    /// once: it may allocate it ahead of the pages.
    pub fn announce_extents(&mut self, extents: &[(u64, u64)]) -> Result<(), MigrationError> {
        self.link.out.send_extents(extents)?;
        self.link.out.flush()?;
        Ok(())
    }

    /// Bytes written that the peer has not acknowledged, and how many of them wait in our
    /// stream queues.
    fn pending(&self) -> Result<(usize, usize), MigrationError> {
        let control = self
            .control
            .unacked()
            .map_err(MigrationError::socket("SIOCOUTQ"))?;
        let (streams, waiting) = self.streams.pending()?;
        Ok((control + streams, waiting))
    }

    /// Waits until every connection has handed all it was given to the kernel and the peer
    /// has acknowledged it. A round then ends when the destination has it, so its time is the
    /// link's, and nothing queued (socket buffers, a shaper's queue) is left to cross the link
    /// after the pause, inside the downtime. Fails when nothing is acknowledged for `timeout`.
    pub fn wait_delivered(&mut self, timeout: Duration, round: u32) -> Result<(), MigrationError> {
        self.link.out.flush()?;
        let mut last = (usize::MAX, Instant::now());
        loop {
            let pending = self.pending()?.0;
            if pending == 0 {
                return Ok(());
            }
            if pending < last.0 {
                last = (pending, Instant::now());
            } else if last.1.elapsed() >= timeout {
                return Err(MigrationError::TimedOut {
                    secs: timeout.as_secs_f64(),
                    waiting_for: format!(
                        "the destination to acknowledge round {round} ({pending} bytes outstanding)"
                    ),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// How this migration's direct batches go out ("" on the other paths).
    pub fn direct_mechanism(&self) -> &'static str {
        match self.path {
            // With page streams, they carried all but the last round.
            PagePath::Direct { .. } => self
                .streams
                .direct_mechanism
                .unwrap_or_else(|| self.link.direct_mechanism()),
            _ => "",
        }
    }

    /// How the destination lands this migration's direct pages ("" on the other paths): the
    /// same policy, of the same stream count, runs there.
    pub fn direct_landing(&self) -> String {
        if !matches!(self.path, PagePath::Direct { .. }) {
            return String::new();
        }
        let how = policy::describe_landing(self.streams.started);
        if self.link.is_plain() {
            how.to_string()
        } else {
            format!("decrypted in user space, then {how}")
        }
    }

    /// Feeds the codec policy the link's rate (compressed path only).
    fn meter_link(&mut self) -> Result<(), MigrationError> {
        // Held raw, the policy's choice is not asked for: no flush per batch to measure for it.
        if !matches!(&self.path, PagePath::Compressed { workers, .. } if !workers.held_raw()) {
            return Ok(());
        }
        if self.streams.is_empty() {
            // Bytes in our BufWriter are not the kernel's yet; the meter needs them there.
            self.link.out.flush()?;
        }
        let (unacked, waiting) = self.pending()?;
        if let PagePath::Compressed { workers, meter } = &mut self.path {
            meter.observe(unacked, waiting, &mut workers.policy);
        }
        Ok(())
    }

    /// Ends the page streams: from here pages go on the control connection.
    pub fn finish_streams(&mut self) -> Result<(), MigrationError> {
        self.streams.finish()
    }

    /// Waits for the control connection's zero-copy sends (before device state goes out).
    pub fn finish_direct(&mut self) -> Result<(), MigrationError> {
        self.link.finish()
    }

    /// What the compressed path did, with its workers' CPU; None on other paths.
    pub fn compression_report(&mut self) -> Option<CompressionReport> {
        match &mut self.path {
            PagePath::Compressed { workers, .. } => Some(workers.report()),
            _ => None,
        }
    }
}

/// A finished compression job as the batch that goes out: compressed if that saved something
/// real, else raw (counted as a fallback).
fn encoded(job: Job, workers: &mut Compressor, pages: &mut PageCounts) -> Outgoing {
    let n = job.pages;
    let raw = job.data.len();
    let codec = match job.choice {
        Choice::Compress(codec) => codec,
        Choice::Raw => {
            pages.normal += n;
            workers.stats.batches_raw += 1;
            return Outgoing::Pages {
                head: job.head,
                data: job.data,
            };
        }
    };
    workers
        .policy
        .record_codec(codec, raw, job.out.len(), job.secs);
    if !CodecPolicy::worth_sending(raw, job.out.len()) {
        pages.raw_fallback += n;
        workers.stats.batches_raw += 1;
        return Outgoing::Pages {
            head: job.head,
            data: job.data,
        };
    }
    pages.compressed += n;
    let st = &mut workers.stats;
    st.raw_bytes += raw as u64;
    st.compressed_bytes += job.out.len() as u64;
    match codec {
        Codec::Lz4 => st.batches_lz4 += 1,
        Codec::Zstd => st.batches_zstd += 1,
    }
    Outgoing::Compressed {
        codec,
        raw_len: raw,
        head: job.head,
        data: job.out,
    }
}

/// The data of `pages`, read from guest RAM into `data` (emptied first), in batch order.
fn read_pages(ram: &GuestRam, pages: &[u64], mut data: Vec<u8>) -> Result<Vec<u8>, MigrationError> {
    data.clear();
    data.resize(pages.len() * PAGE, 0);
    for (&off, page) in pages.iter().zip(data.chunks_exact_mut(PAGE)) {
        ram.read_at(off, page)?;
    }
    Ok(data)
}
