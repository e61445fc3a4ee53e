//! The per-migration report (BRIEF "Report") and its human summary.
use serde::{Deserialize, Serialize};

/// Bits per second for `bytes` over `secs` (0 for an empty interval).
pub fn rate_bits(bytes: u64, secs: f64) -> u64 {
    if secs <= 0.0 {
        return 0;
    }
    // Non-negative; `as` saturates.
    #[allow(clippy::cast_sign_loss)]
    let r = (bytes as f64 * 8.0 / secs) as u64;
    r
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Phases {
    pub prepare_ms: u64,
    pub copy_ms: u64,
    pub sync_ms: u64,
    pub switchover_ms: u64,
    pub cleanup_ms: u64,
    /// Of the switchover: from the pause until the guest was still and its state captured,
    /// and until the last frame left (the rest is the destination's, to its Confirm).
    #[serde(default)]
    pub switchover_captured_ms: u64,
    #[serde(default)]
    pub switchover_sent_ms: u64,
    /// The destination's side, by its clock from when it read the Paused: until the last
    /// round and the state were in, the state loaded, and its Confirm about to leave (the
    /// rest of the downtime is the wire's and the wait for the cores on either side).
    #[serde(default)]
    pub switchover_received_ms: f64,
    #[serde(default)]
    pub switchover_loaded_ms: f64,
    #[serde(default)]
    pub switchover_confirming_ms: f64,
    /// From the destination's Confirm leaving to the guest running there (it records that
    /// the VM runs there, synced, first): the guest's pause beyond `switchover_ms`, as the
    /// destination's verdict tells it.
    #[serde(default)]
    pub switchover_resumed_ms: f64,
    /// Before the pause: the destination placing every round sent, and the rounds that went
    /// while the guest wrote more than the pause could carry.
    #[serde(default)]
    pub catch_up_ms: u64,
}

impl Phases {
    /// Where the downtime went, both sides; empty when the destination did not say.
    fn switchover_line(&self) -> String {
        if self.switchover_confirming_ms <= 0.0 {
            return String::new();
        }
        format!(
            "  switchover: state captured at {} ms, last frame out at {} ms; the destination had it all {:.1} ms, had loaded it {:.1} ms and confirmed {:.1} ms after it read the pause, and ran the guest {:.1} ms after its Confirm\n",
            self.switchover_captured_ms,
            self.switchover_sent_ms,
            self.switchover_received_ms,
            self.switchover_loaded_ms,
            self.switchover_confirming_ms,
            self.switchover_resumed_ms
        )
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Round {
    pub pages: u64,
    pub bytes: u64,
    pub ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PageCounts {
    pub normal: u64,
    pub zero: u64,
    pub compressed: u64,
    pub raw_fallback: u64,
    /// Re-sent pages that went as deltas against the version the destination held (then
    /// through the batch codec on the compressed transport).
    #[serde(default)]
    pub delta: u64,
    /// Pages that went as references to a page of this migration with the same content.
    #[serde(default)]
    pub dedup: u64,
    /// Pages that went as references to the destination host's page cache (pages earlier
    /// migrations of a drain brought there).
    #[serde(default)]
    pub dedup_host: u64,
}

impl PageCounts {
    /// Adds another migration's counts.
    pub fn add(&mut self, o: &PageCounts) {
        self.normal += o.normal;
        self.zero += o.zero;
        self.compressed += o.compressed;
        self.raw_fallback += o.raw_fallback;
        self.delta += o.delta;
        self.dedup += o.dedup;
        self.dedup_host += o.dedup_host;
    }

    /// Non-zero pages landed on the destination: whole, compressed, as deltas or references.
    pub fn landed(&self) -> u64 {
        let whole = self.normal + self.compressed + self.raw_fallback;
        whole + self.delta + self.dedup + self.dedup_host
    }

    /// Of the pages landed, the share the compressed transport's workers compressed (or
    /// tried to: those that went raw as no smaller).
    pub fn compressed_share(&self) -> f64 {
        (self.compressed + self.raw_fallback) as f64 / self.landed().max(1) as f64
    }

    /// Page bytes references did not send: (within this VM, from the host's cache).
    pub fn dedup_bytes_saved(&self) -> (u64, u64) {
        let per = (crate::protocol::PAGE - crate::protocol::REF_HEAD_LEN - 8) as u64;
        (self.dedup * per, self.dedup_host * per)
    }
}

/// What delta encoding of re-sent pages did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeltaReport {
    /// The cache of last-sent pages at its largest.
    pub capacity_bytes: u64,
    /// Re-sent pages found in the cache and sent as deltas.
    pub hits: u64,
    /// Pages the cache did not hold, sent as the blocks changed since their sketch (or, where
    /// the destination holds zeros, as their non-zero blocks).
    #[serde(default)]
    pub sketch_hits: u64,
    /// Re-sent pages the cache did not hold and whose sketch showed too much changed (sent
    /// whole).
    pub misses: u64,
    /// Cached pages that changed too much for a delta (sent whole).
    pub too_different: u64,
    pub evicted: u64,
    /// Page bytes the deltas did not send (before any batch codec).
    pub bytes_saved: u64,
}

/// What the compressed transport did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CompressionReport {
    /// Wire bytes / raw bytes over the batches that went compressed.
    pub ratio: f64,
    pub raw_bytes: u64,
    pub compressed_bytes: u64,
    pub batches_lz4: u64,
    pub batches_zstd: u64,
    /// Batches sent raw: the policy's choice, or compression that did not pay.
    pub batches_raw: u64,
    /// Of those, batches sent raw because the migration was held raw (a drain's hosts' CPU
    /// was what limited it).
    #[serde(default)]
    pub batches_held_raw: u64,
    /// CPU the compression workers used.
    pub codec_cpu_seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    pub t_ms: u64,
    pub bits_per_s: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CpuSeconds {
    pub source: f64,
    pub destination: f64,
}

/// The guest's own verdict on its memory, once it ran on the destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verification {
    /// Not asked yet (the migration did not get that far).
    #[default]
    None,
    /// It checked every page it wrote: all there.
    Verified,
    /// It found a page that is not what it last wrote.
    Failed,
    /// The guest cannot check itself (not the livemig workload guest).
    NotVerifiable,
    /// The destination went away after the commit, before the verdict came.
    DestinationLost,
}

impl Verification {
    /// What the summary says.
    pub fn says(self) -> &'static str {
        match self {
            Verification::Verified => "yes",
            Verification::Failed => "NO",
            Verification::NotVerifiable => "n/a",
            Verification::DestinationLost => "unknown: the destination was lost after the commit",
            Verification::None => "not asked",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub status: String,
    pub transport: String,
    pub destination: String,
    pub memory_bytes: u64,
    pub total_ms: u64,
    /// Pause on the source to the destination's confirmation that it resumed.
    pub downtime_ms: u64,
    pub phases: Phases,
    /// Round 0 is the copy of all touched RAM; then sync rounds; the last is the final one,
    /// sent while paused.
    pub rounds: Vec<Round>,
    pub stop_reason: String,
    /// Rounds sent after pre-copy converged, because the guest wrote more than the downtime
    /// allows while the destination caught up (see `phases.catch_up_ms`).
    #[serde(default)]
    pub catch_up_rounds: u32,
    /// The highest vCPU throttle auto-converge applied (percent of time asleep); 0 = none.
    #[serde(default)]
    pub throttle_pct_max: u8,
    pub bytes_on_wire: u64,
    pub pages: PageCounts,
    pub avg_gbps: f64,
    pub peak_gbps: f64,
    /// The `--max-bandwidth` cap, if any; compare with avg_gbps.
    pub max_bandwidth_gbps: Option<f64>,
    pub samples: Vec<Sample>,
    pub cpu_seconds: CpuSeconds,
    pub guest_verified: bool,
    /// How the guest's verify on the destination came out (with `guest_verify`'s detail).
    #[serde(default)]
    pub verification: Verification,
    pub guest_verify: Option<String>,
    pub compression: Option<CompressionReport>,
    pub dirty_log: String,
    /// How the channel was protected: mutual TLS or plain (insecure).
    #[serde(default)]
    pub tls: String,
    /// The direct transport's send path: zero-copy, or copied where TLS encrypts in user
    /// space (no kernel TLS here).
    #[serde(default)]
    pub direct_send: Option<String>,
    /// How the destination put direct pages into guest RAM: spliced into its memfd, or read
    /// into its mapping by page streams in parallel.
    #[serde(default)]
    pub direct_recv: Option<String>,
    /// Delta encoding of re-sent pages; None when off (`--no-delta`, or the direct transport,
    /// which sends pages from guest RAM untouched).
    #[serde(default)]
    pub delta: Option<DeltaReport>,
    /// Dedup was on, but its first pages showed under 1% repeating and no host cache: it
    /// stopped after looking up this many (its hashing would have cost more than it saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_stopped_after_pages: Option<u64>,
    /// Direct pages were read to find zero pages, until the first this many showed under 1%
    /// zero: from then on they went unread ([`crate::policy::zero_scan_pays`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_scan_stopped_after_pages: Option<u64>,
    /// Pages the copy did not send because the guest had written them since the migration
    /// began: the first sync round sent them (without deltas, with manual-protect dirty logs).
    #[serde(default)]
    pub copy_left_to_sync_pages: u64,
    /// Direct pages that went copied rather than straight from guest RAM: those of batches
    /// too scattered for a sendfile and a splice per run to pay
    /// ([`crate::policy::copy_scattered`]), mostly sync rounds.
    #[serde(default)]
    pub direct_copied_pages: u64,
    /// Whether the guest's vCPUs yielded the CPU to the migration until the pause: "off",
    /// "vCPUs at nice N until the pause", or why not.
    #[serde(default)]
    pub vcpu_yield: String,
    /// The migration's thread here while the VM was paused: how much it went first, or why
    /// it could not.
    #[serde(default)]
    pub switchover_priority: String,
    /// Where the disks were: `shared` (both hosts reach them) or `copy` (they moved with the
    /// VM).
    #[serde(default)]
    pub storage: String,
    /// With `--storage copy`: each disk's copy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskReport>,
    /// Disk bytes sent (before compression), over every disk: the bulk copy and what was
    /// sent again.
    #[serde(default)]
    pub disk_bytes: u64,
    /// The bulk copy of the disks, before RAM's.
    #[serde(default)]
    pub disk_ms: u64,
    /// The longest a guest write took while the disks moved (the mirror holds writes until
    /// they are on the wire).
    #[serde(default)]
    pub write_stall_ms: f64,
    /// Set when the migration ended in post-copy: the VM ran on the destination before all
    /// its memory was there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyReport>,
    /// Why post-copy (the default when pre-copy would not converge) was off for this
    /// migration: the destination could not take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_unavailable: Option<String>,
    /// The guest's own count of pages it wrote per second, over the 2 s before the migration
    /// and while it ran during it (to its pause; with post-copy, on the destination until
    /// post-copy completed), and their ratio: how much of its pace the migration left it.
    /// None for a guest that does not count (not livemig's workload guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_writes_per_s_before: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_writes_per_s_during: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_rate_ratio: Option<f64>,
    pub error: Option<String>,
}

/// What post-copy did: the destination's faults and their latency, and how the owed pages
/// went.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PostcopyReport {
    /// Why it switched (`--postcopy-after`'s pass, or the rounds that stopped shrinking).
    pub reason: String,
    /// Pages the destination lacked when the VM resumed there.
    pub owed_pages: u64,
    pub faults: u64,
    pub fault_p50_us: u64,
    pub fault_p99_us: u64,
    pub fault_max_us: u64,
    /// Pages the destination asked for (the guest touched them first).
    pub pages_demanded: u64,
    /// Pages that arrived by the background push first.
    pub pages_pushed: u64,
    /// Pages the source sent in post-copy (asked for or pushed; one asked for while its push
    /// was under way goes twice), with data and as zero.
    pub sent_data_pages: u64,
    pub sent_zero_pages: u64,
    /// From the resume until the destination held every page, ms.
    pub complete_ms: u64,
    /// Pages the guest wrote on the destination in that time, by its own count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_pages_written: Option<u64>,
    /// Its pages written per second there, over its own reports in that time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_writes_per_s: Option<f64>,
    /// Times post-copy's link failed and was made again.
    #[serde(default)]
    pub recoveries: u32,
    /// Time spent making it again (the vCPUs that faulted meanwhile waited), ms.
    #[serde(default)]
    pub recovery_ms: u64,
    /// The risk taken: while post-copy ran, losing either host lost the VM.
    pub risk: String,
}

/// What every post-copy report and plan says of its risk.
pub const POSTCOPY_RISK: &str = "until post-copy completes, the VM's memory is split between the hosts: losing either host, or the link for longer than the recovery window (the peer timeout × 6), loses the VM";

/// One disk that moved with the VM.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiskReport {
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
    /// Allocated on the source: all the bulk copy reads (holes are not sent).
    pub allocated_bytes: u64,
    pub bulk_bytes: u64,
    /// Blocks the guest wrote again after they were sent, sent again.
    pub resent_bytes: u64,
    /// Bytes that went as zero runs (no data).
    pub zero_bytes: u64,
    /// What the frames carried of data, after compression.
    pub wire_bytes: u64,
    pub bulk_ms: u64,
    /// How writes to what was sent reached the destination: `rounds` or `mirror`
    /// (write-blocking), and why the policy chose it.
    pub sync: String,
    pub sync_reason: String,
    /// Guest writes that waited for the mirror; how long in all and at most.
    pub stalled_writes: u64,
    pub stall_total_ms: f64,
    pub stall_max_ms: f64,
    /// The longest guest write while the disk moved.
    pub write_max_ms: f64,
    /// Blocks the guest dirtied behind the copy.
    pub dirtied_bytes: u64,
    /// The guest's disk writes per second before the migration and during it.
    pub guest_writes_per_s_before: f64,
    pub guest_writes_per_s_during: f64,
}

impl Report {
    /// The summary's lines on how pages were encoded: compression and deltas.
    fn encodings(&self) -> String {
        let mut s = String::new();
        if let Some(c) = &self.compression {
            s += &format!(
                "  compression: {} pages compressed, {} raw fallback; ratio {:.2}; batches lz4 {} / zstd {} / raw {}; codec cpu {:.2} s\n",
                self.pages.compressed, self.pages.raw_fallback, c.ratio, c.batches_lz4, c.batches_zstd, c.batches_raw, c.codec_cpu_seconds
            );
        }
        let (within, host) = self.pages.dedup_bytes_saved();
        if self.pages.dedup > 0 {
            s += &format!(
                "  dedup: {} pages as references to a page of the same content sent before ({:.1} MiB not sent)\n",
                self.pages.dedup,
                within as f64 / (1 << 20) as f64
            );
        }
        if let Some(n) = self.dedup_stopped_after_pages {
            s += &format!(
                "  dedup: stopped after {n} pages, under 1% of which repeated (hashing would cost more than it saves)\n"
            );
        }
        if self.pages.dedup_host > 0 {
            s += &format!(
                "  dedup: {} pages as references to the destination host's page cache ({:.1} MiB not sent)\n",
                self.pages.dedup_host,
                host as f64 / (1 << 20) as f64
            );
        }
        if let Some(d) = &self.delta {
            s += &format!(
                "  delta: {} re-sent pages as deltas against the cache, {} as changed blocks, {} whole (too changed), {} too changed in the cache; {:.1} MiB of pages not sent; cache {} MiB\n",
                d.hits,
                d.sketch_hits,
                d.misses,
                d.too_different,
                d.bytes_saved as f64 / (1 << 20) as f64,
                d.capacity_bytes >> 20
            );
        }
        s
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "migration {} over {} to {}: {} MiB VM\n",
            self.status,
            self.transport,
            self.destination,
            self.memory_bytes >> 20
        );
        s += &format!(
            "  total {} ms, downtime {} ms; prepare {} / copy {} / sync {} / switchover {} / cleanup {} ms\n",
            self.total_ms,
            self.downtime_ms,
            self.phases.prepare_ms,
            self.phases.copy_ms,
            self.phases.sync_ms,
            self.phases.switchover_ms,
            self.phases.cleanup_ms
        );
        s += &self.phases.switchover_line();
        for d in &self.disks {
            s += &format!(
                "  {} copied ({} MiB of {} MiB allocated, {} MiB in all) in {} ms; then {} ({}); {} MiB sent again; guest writes: {} held by the mirror for {:.1} ms in all, the longest write {:.1} ms, {:.0}/s during against {:.0}/s before\n",
                d.name,
                d.bulk_bytes >> 20,
                d.allocated_bytes >> 20,
                d.size_bytes >> 20,
                d.bulk_ms,
                d.sync,
                d.sync_reason,
                d.resent_bytes >> 20,
                d.stalled_writes,
                d.stall_total_ms,
                d.write_max_ms,
                d.guest_writes_per_s_during,
                d.guest_writes_per_s_before
            );
        }
        let rounds: Vec<String> = self
            .rounds
            .iter()
            .map(|r| format!("{}p/{}ms", r.pages, r.ms))
            .collect();
        s += &format!(
            "  rounds ({}): {} (stopped: {})\n",
            self.rounds.len(),
            rounds.join(", "),
            self.stop_reason
        );
        if self.catch_up_rounds > 0 {
            s += &format!(
                "  {} round(s) more while the destination caught up ({} ms before the pause): the guest wrote more than the downtime allows meanwhile\n",
                self.catch_up_rounds, self.phases.catch_up_ms
            );
        }
        if let Some(p) = &self.postcopy {
            s += &format!(
                "  post-copy ({}): {} pages owed at the resume; {} faults (p50 {} us, p99 {} us, max {} us), {} pages asked for, {} pushed; complete {} ms after the resume\n",
                p.reason,
                p.owed_pages,
                p.faults,
                p.fault_p50_us,
                p.fault_p99_us,
                p.fault_max_us,
                p.pages_demanded,
                p.pages_pushed,
                p.complete_ms
            );
            if p.recoveries > 0 {
                s += &format!(
                    "  post-copy's link failed and was made again {} time(s), {} ms in all\n",
                    p.recoveries, p.recovery_ms
                );
            }
        }
        if let (Some(b), Some(d)) = (
            self.guest_writes_per_s_before,
            self.guest_writes_per_s_during,
        ) {
            s += &format!(
                "  guest: {d:.0} pages written/s during the migration against {b:.0}/s before ({:.0}%)\n",
                self.guest_rate_ratio.unwrap_or(0.0) * 100.0
            );
        }
        if self.throttle_pct_max > 0 {
            s += &format!(
                "  auto-converge throttled the guest's vCPUs up to {}%\n",
                self.throttle_pct_max
            );
        }
        s += &format!(
            "  {:.1} MiB on the wire, pages {} sent / {} zero, avg {:.2} Gbit/s, peak {:.2} Gbit/s\n",
            self.bytes_on_wire as f64 / (1 << 20) as f64,
            self.pages.normal,
            self.pages.zero,
            self.avg_gbps,
            self.peak_gbps
        );
        s += &self.encodings();
        if let Some(cap) = self.max_bandwidth_gbps {
            s += &format!(
                "  bandwidth cap {cap:.3} Gbit/s: achieved {:.1}% of it\n",
                self.avg_gbps * 100.0 / cap
            );
        }
        s += &format!("  channel: {}", self.tls);
        if let Some(d) = &self.direct_send {
            s += &format!("; direct pages: {d}");
            if self.direct_copied_pages > 0 {
                s += &format!(
                    " ({} scattered pages copied, in batches)",
                    self.direct_copied_pages
                );
            }
        }
        if let Some(d) = &self.direct_recv {
            s += &format!(", {d}");
        }
        s += "\n";
        if !self.switchover_priority.is_empty() {
            s += &format!("  while paused: {}\n", self.switchover_priority);
        }
        if !self.vcpu_yield.is_empty() {
            s += &format!("  guest vCPUs: {}\n", self.vcpu_yield);
        }
        s += &format!(
            "  cpu {:.2} s source, {:.2} s destination; guest verified on destination: {}",
            self.cpu_seconds.source,
            self.cpu_seconds.destination,
            self.verification.says()
        );
        match (self.verification, &self.guest_verify) {
            (Verification::Verified | Verification::None, _) | (_, None) => {}
            (_, Some(d)) => s += &format!(" ({d})"),
        }
        if let Some(e) = &self.error {
            s += &format!("\n  error: {e}");
        }
        s
    }
}
