//! The migration's decisions, pure functions of measured figures so they are unit-tested apart
//! from any socket or ioctl: when to stop pre-copy rounds and switch over, how hard to throttle
//! a guest that outruns the link, which page stream takes the next batch, and how direct
//! pages land on the destination. (Which codec is
//! [`crate::codec::CodecPolicy`]'s.)
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ConvergencePolicy {
    /// The pause the guest may see.
    pub downtime_target: Duration,
    /// Switchover work besides the last pages: pause, state capture and load, confirmation.
    pub switchover_overhead: Duration,
    pub max_rounds: u32,
    pub max_time: Duration,
    /// A round counts as shrinking when it has fewer pages than this fraction of the last.
    pub shrink_ratio: f64,
    /// Rounds in a row that did not shrink before giving up on convergence.
    pub stall_rounds: u32,
    /// Auto-converge: on a stall, throttle the guest's vCPUs (this percent at first, then
    /// this much more per stall, up to the max) instead of switching over with a long pause.
    /// None: switch over on a stall.
    pub auto_converge: Option<AutoConverge>,
}

#[derive(Clone, Copy, Debug)]
pub struct AutoConverge {
    pub initial_pct: u8,
    pub step_pct: u8,
    pub max_pct: u8,
}

impl Default for AutoConverge {
    /// QEMU's cpu-throttle defaults (20%, +10%), up to 99%.
    fn default() -> Self {
        AutoConverge {
            initial_pct: 20,
            step_pct: 10,
            max_pct: 99,
        }
    }
}

impl Default for ConvergencePolicy {
    fn default() -> Self {
        ConvergencePolicy {
            downtime_target: Duration::from_millis(20),
            switchover_overhead: Duration::from_millis(8),
            max_rounds: 60,
            max_time: Duration::from_secs(300),
            shrink_ratio: 0.9,
            stall_rounds: 2,
            auto_converge: Some(AutoConverge::default()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Continue,
    /// The remaining set goes out within the downtime target.
    Converged,
    /// Rounds stopped shrinking: the guest dirties as fast as we send.
    Stalled,
    RoundLimit,
    TimeLimit,
}

impl ConvergencePolicy {
    /// `remaining_bytes`: what the last round would send now; `bytes_per_sec`: effective
    /// throughput just measured; `history`: pages sent per sync round so far, of which only
    /// those from `since` on count for a stall (the rounds since the throttle last changed).
    pub fn decide(
        &self,
        remaining_bytes: u64,
        bytes_per_sec: f64,
        history: &[u64],
        since: usize,
        elapsed: Duration,
    ) -> Decision {
        if self.fits(remaining_bytes, bytes_per_sec) {
            return Decision::Converged;
        }
        // Once throttled, one round that does not shrink is enough to step up: rounds are long
        // when the guest outruns the link, and each step needs its own evidence.
        let n = if since > 0 {
            1
        } else {
            self.stall_rounds as usize
        };
        let window = &history[since.min(history.len())..];
        if window.len() > n {
            let recent = &window[window.len() - n - 1..];
            if recent
                .windows(2)
                .all(|w| w[1] as f64 >= w[0] as f64 * self.shrink_ratio)
            {
                return Decision::Stalled;
            }
        }
        if history.len() as u32 >= self.max_rounds {
            return Decision::RoundLimit;
        }
        if elapsed >= self.max_time {
            return Decision::TimeLimit;
        }
        Decision::Continue
    }
}

impl ConvergencePolicy {
    /// Whether `remaining_bytes` at `bytes_per_sec` go out, with the switchover's own work,
    /// within the downtime target.
    pub fn fits(&self, remaining_bytes: u64, bytes_per_sec: f64) -> bool {
        let eta = if bytes_per_sec > 0.0 {
            remaining_bytes as f64 / bytes_per_sec
        } else {
            f64::INFINITY
        };
        eta + self.switchover_overhead.as_secs_f64() <= self.downtime_target.as_secs_f64()
    }

    /// Rounds that may still go out after pre-copy converged, before the pause, when the guest
    /// wrote more than fits while the destination caught up: a destination slower than the
    /// guest's writes must not hold the pause off for ever.
    pub const CATCH_UP_ROUNDS: u32 = 3;

    /// After a stall at throttle `current`: the next throttle, or None to switch over as it
    /// stands (auto-converge off, or already at its maximum).
    pub fn next_throttle(&self, current: u8) -> Option<u8> {
        let a = self.auto_converge?;
        let next = if current == 0 {
            a.initial_pct
        } else {
            current.saturating_add(a.step_pct)
        }
        .min(a.max_pct);
        (next > current).then_some(next)
    }
}

/// When a migration hands the VM to the destination before all its memory is there
/// (post-copy): the destination runs it at once and fetches each missing page when the guest
/// touches it. A host lost during post-copy loses the VM: neither side holds all of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PostcopyMode {
    /// Never: a guest that outruns the link is throttled (auto-converge).
    #[default]
    Off,
    /// After this many passes over RAM (0: at once, no pre-copy; 1: after the copy; each
    /// sync round is one more), unless pre-copy converges first.
    After(u32),
    /// Hybrid: pre-copy while the rounds shrink; when they stop, post-copy instead of
    /// throttling the guest.
    Auto,
}

impl std::fmt::Display for PostcopyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PostcopyMode::Off => f.write_str("off"),
            PostcopyMode::After(n) => write!(f, "after {n} passes"),
            PostcopyMode::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for PostcopyMode {
    type Err = String;
    /// `--postcopy-after`'s value: a number of passes, or `auto`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(PostcopyMode::Auto),
            n => n.parse().map(PostcopyMode::After).map_err(|_| {
                format!("--postcopy-after takes a number of passes or auto, not {n:?}")
            }),
        }
    }
}

/// What a migration does when it is not told: hybrid.
pub const DEFAULT_POSTCOPY: PostcopyMode = PostcopyMode::Auto;

impl PostcopyMode {
    /// Whether the migration may end in post-copy (and so opens its connections).
    pub fn possible(self) -> bool {
        self != PostcopyMode::Off
    }
}

/// Whether to switch to post-copy now, after `passes` passes over RAM (the copy is the first)
/// and the convergence policy's `decision` on what is left: never when pre-copy converged
/// (post-copy is not chosen for a VM whose pre-copy completes), at the pass `After` names,
/// and with `Auto` when pre-copy would otherwise throttle the guest or give up.
pub fn switch_to_postcopy(mode: PostcopyMode, passes: u32, decision: Decision) -> bool {
    match (mode, decision) {
        (_, Decision::Converged) | (PostcopyMode::Off, _) => false,
        (PostcopyMode::After(n), _) => passes >= n,
        (PostcopyMode::Auto, d) => d != Decision::Continue,
    }
}

/// The page stream for the next batch: the one with the least data queued (the first such,
/// so streams fill in turn when idle). None when there are no streams.
pub fn pick_stream(queued: &[usize]) -> Option<usize> {
    queued
        .iter()
        .enumerate()
        .min_by_key(|&(i, &q)| (q, i))
        .map(|(i, _)| i)
}

/// An order for `n` pieces of RAM that spreads over all of it from the start: index i goes
/// at the bit-reversed position of i (van der Corput), so any first k pieces are nearly
/// evenly spaced. The copy uses it so that no region is sent whole before the dirty log has
/// had time to show which of its pages the guest writes.
pub fn spread_order(n: usize) -> Vec<usize> {
    if n < 2 {
        return (0..n).collect();
    }
    let bits = usize::BITS - (n - 1).leading_zeros();
    let mut out: Vec<usize> = (0..1usize << bits)
        .map(|i| i.reverse_bits() >> (usize::BITS - bits))
        .filter(|&i| i < n)
        .collect();
    out.truncate(n);
    out
}

/// Direct batches whose runs of consecutive pages are shorter than this on average go copied.
pub const SCATTERED_RUN_PAGES: usize = 4;

/// Whether a direct batch of `pages` data pages in `runs` runs of consecutive pages goes
/// copied into one frame instead of straight from guest RAM. Straight costs a sendfile per
/// run on the source and a splice in and out of a pipe per run on the destination; copied
/// costs one write and one read per batch and a memory copy per page on each side. Sync
/// rounds are scattered (the pages the guest wrote) and go faster copied
/// (docs/bench/choices.md); the copy is contiguous and keeps going straight.
pub fn copy_scattered(pages: usize, runs: usize) -> bool {
    runs * SCATTERED_RUN_PAGES > pages
}

/// Direct pages read for zeros before deciding whether that pays: 64 MiB.
pub const ZERO_TRIAL_PAGES: u64 = 16 << 10;

/// Whether reading direct pages to find zero pages goes on paying, after `read` pages showed
/// `zero` zeros: once the trial finds at least 1% zero. The copy sends only memory the guest
/// touched (holes are never read), so a guest that does not zero what it frees shows almost
/// none, and then reading every page (and mapping it into this process) costs the source
/// more CPU than the zero pages' bytes cost the link; sendfile sends a page without reading
/// it. A guest that zeroes freed memory shows them in the trial, and the reads go on.
pub fn zero_scan_pays(read: u64, zero: u64) -> bool {
    read < ZERO_TRIAL_PAGES || zero * 100 >= read
}

/// How far the guest's vCPUs step back (nice) while their VM's pages are sent. The VM's own
/// migration threads then get about 90% of a core they share with a vCPU (weights 1024 against
/// 110), and nothing changes while cores are idle (docs/bench/choices.md). Auto-converge is
/// the other lever: it slows the guest even when cores are idle, and only once rounds stall.
pub const VCPU_YIELD_NICE: i32 = 10;

/// How direct page data lands in the destination's guest RAM from a plain socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Landing {
    /// splice(2) into guest RAM's memfd: the kernel copies once, with no page faults; the
    /// cheapest (docs/bench/choices.md).
    /// But every write to the memfd holds its inode lock, so streams would take turns.
    Splice,
    /// read(2) into guest RAM's mapping: page faults allocate (and zero) the pages, and take
    /// no lock on the file, so page streams fill RAM in parallel.
    Mapped,
}

/// Page stream `index` of `page_streams` (the control connection: 0 of 0 or 1): the first
/// splices, the others read into the mapping. Only one writer then holds the memfd's inode
/// lock, and the readers' page faults do not take it (with page streams, the control
/// connection writes only after they all finished).
pub fn landing(index: usize, page_streams: usize) -> Landing {
    if index == 0 || page_streams <= 1 {
        Landing::Splice
    } else {
        Landing::Mapped
    }
}

/// How `page_streams` streams land their pages, for the report.
pub fn describe_landing(page_streams: usize) -> &'static str {
    if page_streams > 1 {
        "page stream 0 spliced into guest RAM's memfd, the others read into its mapping, in parallel"
    } else {
        "spliced into guest RAM's memfd"
    }
}

/// How a copied disk keeps up with the guest's writes after its bulk copy, from the rate the
/// guest dirtied blocks already sent (`dirty_rate`) and the rate the link carried the copy
/// (`link_rate`), both bytes/s. Rounds while the guest dirties under half of what the link
/// carries: each round is then at most half the last, as RAM's must be, and the guest is never
/// slowed. At or above that rounds would not shrink: the mirror (write-blocking) holds each
/// write until it is on the wire, so what is left at the pause stays small whatever the guest
/// does, at the cost of its write latency. Returns the choice and why.
pub fn disk_sync(dirty_rate: f64, link_rate: f64) -> (migratable::DiskSync, String) {
    use migratable::DiskSync;
    let mb = |r: f64| r / 1e6;
    if link_rate <= 0.0 {
        return (DiskSync::Mirror, "the link's rate is not known yet".into());
    }
    if dirty_rate * 2.0 < link_rate {
        (
            DiskSync::Rounds,
            format!(
                "the guest dirtied {:.1} MB/s of sent blocks, under half the link's {:.1} MB/s",
                mb(dirty_rate),
                mb(link_rate)
            ),
        )
    } else {
        (
            DiskSync::Mirror,
            format!(
                "the guest dirtied {:.1} MB/s of sent blocks, at least half the link's {:.1} MB/s: rounds would not shrink",
                mb(dirty_rate),
                mb(link_rate)
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scattered_direct_batches_go_copied() {
        use super::copy_scattered;
        // One run of 256 pages (the copy), or runs of 4: straight from guest RAM.
        assert!(!copy_scattered(256, 1));
        assert!(!copy_scattered(256, 64));
        // Runs of under 4 pages on average, down to single pages (a sync round): copied.
        assert!(copy_scattered(256, 65));
        assert!(copy_scattered(256, 256));
        assert!(copy_scattered(1, 1));
        assert!(!copy_scattered(0, 0));
    }

    #[test]
    fn zero_scans_stop_where_touched_memory_is_seldom_zero() {
        use super::{zero_scan_pays, ZERO_TRIAL_PAGES as T};
        assert!(zero_scan_pays(0, 0));
        assert!(zero_scan_pays(T - 1, 0));
        assert!(!zero_scan_pays(T, 0));
        assert!(!zero_scan_pays(T, T / 100 - 1));
        assert!(zero_scan_pays(T, T / 100 + 1));
        assert!(zero_scan_pays(10 * T, 5 * T));
    }

    #[test]
    fn the_spread_order_visits_everything_once_and_spreads_from_the_start() {
        use super::spread_order;
        assert_eq!(spread_order(0), Vec::<usize>::new());
        assert_eq!(spread_order(1), vec![0]);
        assert_eq!(spread_order(8), vec![0, 4, 2, 6, 1, 5, 3, 7]);
        for n in [3, 5, 100, 513] {
            let mut o = spread_order(n);
            // The first half already reaches the last quarter.
            assert!(o[..n.div_ceil(2)].iter().any(|&i| i >= n * 3 / 4), "{n}");
            o.sort_unstable();
            assert_eq!(o, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn one_writer_splices_and_several_read_into_the_mapping() {
        use super::{landing, Landing};
        assert_eq!(landing(0, 0), Landing::Splice);
        assert_eq!(landing(0, 1), Landing::Splice);
        assert_eq!(landing(0, 2), Landing::Splice);
        assert_eq!(landing(1, 2), Landing::Mapped);
        assert_eq!(landing(3, 4), Landing::Mapped);
    }

    #[test]
    fn the_least_loaded_stream_takes_the_batch() {
        assert_eq!(super::pick_stream(&[]), None);
        assert_eq!(super::pick_stream(&[0, 0, 0]), Some(0));
        assert_eq!(super::pick_stream(&[3 << 20, 1 << 20, 2 << 20]), Some(1));
        assert_eq!(super::pick_stream(&[5, 0, 0]), Some(1));
    }

    use super::*;

    const GBIT: f64 = 125_000_000.0;

    #[test]
    fn converges_when_the_rest_fits_the_downtime() {
        let p = ConvergencePolicy::default();
        // 1 MiB at 1 Gbit/s is ~8.4 ms.
        assert_eq!(
            p.decide(1 << 20, GBIT, &[1000], 0, Duration::ZERO),
            Decision::Converged
        );
        // 10 MiB is ~84 ms: keep going.
        assert_eq!(
            p.decide(10 << 20, GBIT, &[5000], 0, Duration::ZERO),
            Decision::Continue
        );
        // A faster link makes the same set fit.
        assert_eq!(
            p.decide(10 << 20, 10.0 * GBIT, &[5000], 0, Duration::ZERO),
            Decision::Converged
        );
    }

    #[test]
    fn stops_when_rounds_stop_shrinking() {
        let p = ConvergencePolicy::default();
        assert_eq!(
            p.decide(100 << 20, GBIT, &[9000, 5000, 3000], 0, Duration::ZERO),
            Decision::Continue
        );
        assert_eq!(
            p.decide(100 << 20, GBIT, &[9000, 8900, 9100], 0, Duration::ZERO),
            Decision::Stalled
        );
    }

    #[test]
    fn a_stall_raises_the_throttle_until_its_maximum() {
        let p = ConvergencePolicy::default();
        assert_eq!(p.next_throttle(0), Some(20));
        assert_eq!(p.next_throttle(20), Some(30));
        assert_eq!(p.next_throttle(90), Some(99));
        assert_eq!(p.next_throttle(99), None, "at the maximum: switch over");
        let off = ConvergencePolicy {
            auto_converge: None,
            ..Default::default()
        };
        assert_eq!(off.next_throttle(0), None);
        // Only rounds since the throttle changed count for the next stall.
        let h = [9000, 8900, 9100, 4000];
        assert_eq!(
            p.decide(100 << 20, GBIT, &h, 0, Duration::ZERO),
            Decision::Continue
        );
        assert_eq!(
            p.decide(100 << 20, GBIT, &[9000, 8900, 9100], 0, Duration::ZERO),
            Decision::Stalled
        );
        assert_eq!(
            p.decide(100 << 20, GBIT, &[9000, 8900, 9100], 2, Duration::ZERO),
            Decision::Continue,
            "one round at the new throttle says nothing yet"
        );
        assert_eq!(
            p.decide(
                100 << 20,
                GBIT,
                &[9000, 8900, 9100, 9050],
                2,
                Duration::ZERO
            ),
            Decision::Stalled,
            "a second round that did not shrink steps the throttle up"
        );
    }

    #[test]
    fn limits_hold() {
        let p = ConvergencePolicy {
            max_rounds: 3,
            ..Default::default()
        };
        assert_eq!(
            p.decide(100 << 20, GBIT, &[9000, 5000, 2000], 0, Duration::ZERO),
            Decision::RoundLimit
        );
        assert_eq!(
            p.decide(100 << 20, GBIT, &[9000], 0, Duration::from_secs(301)),
            Decision::TimeLimit
        );
        assert_eq!(
            p.decide(1 << 30, 0.0, &[1], 0, Duration::ZERO),
            Decision::Continue,
            "no bandwidth yet"
        );
    }

    #[test]
    fn a_disk_written_faster_than_half_the_link_is_mirrored() {
        use migratable::DiskSync;
        assert_eq!(super::disk_sync(1e6, 100e6).0, DiskSync::Rounds);
        assert_eq!(super::disk_sync(50e6, 100e6).0, DiskSync::Mirror);
        assert_eq!(super::disk_sync(200e6, 100e6).0, DiskSync::Mirror);
        assert_eq!(super::disk_sync(0.0, 0.0).0, DiskSync::Mirror);
        assert!(super::disk_sync(1e6, 100e6).1.contains("under half"));
    }
}
