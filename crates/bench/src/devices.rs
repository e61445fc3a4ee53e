//! `livemig bench devices`: a VM with a disk and a NIC, migrated while it works. The same
//! workload guest runs under livemig (`--disk`, `--net` on the testbed's VM bridge) and, with
//! the QEMU peer, under QEMU (`virtio-blk-pci`/`virtio-net-pci`, modern only, a tap on the same
//! bridge, QEMU's announce defaults). The guest writes stamped blocks to its disk and answers
//! UDP echo; the client namespace sends it requests at a steady rate. Each run migrates the VM
//! to the other host and the guest verifies its memory and disk there. A row says how long the
//! client heard nothing, what it lost, and whether every acknowledged write survived.
use std::path::{Path, PathBuf};
use std::time::Duration;

use guest::memory_profile::MemoryProfile;
use migration::MigrateRequest;
use serde::Serialize;

use crate::echo::{EchoClient, EchoRecord};
use crate::peer::{LivemigPeer, Outcome, Peer, QemuPeer};
use crate::qemu::{Devices, Machine};
use crate::testbed::{vm_addr, Testbed, VM_BRIDGE};
use crate::transports::{Run, LIVEMIG_RUNS, PAIRS, QEMU_RUNS};
use crate::{step, BenchError, Route, Ui};
use host::child::Livemig;

/// How long after a migration ends the client's record still counts for its row: the
/// destination's resume, its announcements and the first replies fall in it.
const SETTLE_MS: f64 = 1000.0;
/// The round trips a row's chart panel shows before the migration's end.
const CHART_BEFORE_MS: f64 = 1000.0;
/// The part of a row's window around its switchover: from this long before the end of the
/// migration (less its downtime) to [`SWITCHOVER_AFTER_MS`] after it (the destination's
/// resume and first announcement).
const SWITCHOVER_BEFORE_MS: f64 = 50.0;
const SWITCHOVER_AFTER_MS: f64 = 250.0;
/// Where the data written before boot begins: past the 16 MiB the guest writes.
const DISK_DATA_AT: u64 = 64 << 20;
/// How much more a livemig gap may be than its reported downtime and still pass.
const GAP_OVER_DOWNTIME_MS: f64 = 10.0;

/// What to run; `livemig bench devices` fills it from its arguments.
#[derive(Clone, Debug)]
pub struct DevicesOptions {
    /// The livemig binary the VMs run as.
    pub livemig: PathBuf,
    pub memory: u64,
    pub vcpus: u8,
    /// The guest's memory workload; the bench adds its disk rate and address.
    pub workload: String,
    pub memory_profile: MemoryProfile,
    /// Stamped disk writes a second.
    pub disk_rate: u32,
    /// The image's size and the data written into it before boot (None: the defaults for
    /// the storage).
    pub disk_size: Option<u64>,
    pub disk_data: Option<u64>,
    /// UDP echo requests a second from the client.
    pub echo_hz: u32,
    /// livemig's RARP announcements after the destination resumes.
    pub announce_rounds: u32,
    pub peer_qemu: bool,
    pub testbed: String,
    pub scale: f64,
    /// Options every livemig migration takes; each run's transport is its own.
    pub request: MigrateRequest,
    /// How long the guest runs (and the client sends) before the first migration.
    pub run_ms: u64,
    /// Directory for bench.json, bench.png, disk images, consoles and logs.
    pub out: PathBuf,
    pub keep_testbed: bool,
}

impl DevicesOptions {
    fn downtime_ms(&self) -> u64 {
        self.request.downtime_ms.unwrap_or(20)
    }

    /// Whether the disk moves with the VM (`--storage copy`).
    fn copies(&self) -> bool {
        self.request.storage == Some(migration::Storage::Copy)
    }

    fn disk_size(&self) -> u64 {
        self.disk_size
            .unwrap_or(if self.copies() { 2 << 30 } else { 64 << 20 })
    }

    /// Data before boot: half the image with --storage copy, else none.
    fn disk_data(&self) -> u64 {
        let room = self.disk_size().saturating_sub(DISK_DATA_AT);
        self.disk_data
            .unwrap_or(if self.copies() {
                self.disk_size() / 2
            } else {
                0
            })
            .min(room)
    }

    fn workload(&self, ip: &str) -> String {
        // A copy's runs are long: the guest writes over 4 MiB only, so each verify (every
        // block it wrote, read back one at a time by the emulated guest) ends within its 60 s.
        let blocks = if self.copies() {
            ",disk_blocks=1024"
        } else {
            ""
        };
        format!(
            "{},disk={}{blocks},ip={ip}/24",
            self.workload, self.disk_rate
        )
    }
}

/// One migration of the VM with its devices.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceRow {
    pub peer: String,
    pub config: String,
    pub links: String,
    pub direction: String,
    pub total_ms: u64,
    /// As the VMM reports it.
    pub downtime_ms: Option<u64>,
    /// The longest time the client heard nothing, from the migration's start to a second
    /// after its end.
    pub net_gap_ms: f64,
    /// The longest silence around the switchover alone (from 50 ms before the pause to 250
    /// ms after the end).
    pub switchover_gap_ms: f64,
    /// The longest silence in as long a window (at most --run-ms) while this VM ran before its
    /// first migration:
    /// what this machine's scheduling costs the client with nothing migrating.
    pub baseline_gap_ms: f64,
    pub packets_sent: u64,
    pub packets_lost: u64,
    /// Writes the guest had acknowledged since the previous verify (all of them for the first).
    pub disk_writes: Option<u64>,
    /// Acknowledged blocks the verify found lost, stale or torn.
    pub disk_writes_lost: Option<u64>,
    /// `shared` or `copy`.
    pub storage: String,
    /// With --storage copy: what the disk's copy sent (livemig: the disk bytes its report
    /// counts, bulk and resent, before compression; QEMU: what the link carried while its
    /// mirror caught up, NBD headers included), and how long that took.
    pub disk_bytes: Option<u64>,
    pub disk_ms: Option<u64>,
    /// The longest a guest write took, as the guest measured it, since its previous verify
    /// (this migration and the second after it).
    pub write_stall_ms: Option<f64>,
    /// livemig's report of the disk's copy (bulk, resent, sync mode, held writes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<serde_json::Value>,
    pub verified: bool,
    pub verify: String,
    pub error: Option<String>,
    /// (ms from the migration's end, round trip in ms; None: never answered) of the requests
    /// sent from a second before the end to a second after.
    pub round_trips: Vec<(f64, Option<f64>)>,
}

/// A livemig row against QEMU's over the same link.
#[derive(Clone, Debug, Serialize)]
pub struct GapCheck {
    pub livemig: String,
    pub links: String,
    pub net_gap_ms: f64,
    pub downtime_ms: Option<u64>,
    /// net_gap_ms <= downtime_ms + 10 ms
    pub within_downtime: bool,
    pub qemu: Option<String>,
    pub qemu_net_gap_ms: Option<f64>,
    /// net_gap_ms <= QEMU's over the same link
    pub at_most_qemu: Option<bool>,
}

/// With --storage copy: a livemig row's total time against QEMU's over the same link, and
/// what its disk's copy sent against what the image holds.
#[derive(Clone, Debug, Serialize)]
pub struct CopyCheck {
    pub livemig: String,
    pub links: String,
    pub total_ms: u64,
    pub qemu_total_ms: Option<u64>,
    /// total_ms <= 0.8 × QEMU's
    pub within_0_8_of_qemu: Option<bool>,
    /// The bulk copy's bytes (resent blocks aside) against the image's allocated bytes at
    /// the start and the blocks the guest wrote meanwhile: holes are not sent.
    pub bulk_bytes: Option<u64>,
    pub allocated_bytes: Option<u64>,
    pub holes_not_sent: bool,
}

/// The workload guest writes its disk in 4 KiB blocks.
const GUEST_DISK_BLOCK: u64 = 4096;

/// Each livemig row against QEMU's over the same link, for a bench whose disks move.
pub fn copy_checks(rows: &[DeviceRow]) -> Vec<CopyCheck> {
    let ok = |r: &&DeviceRow| r.error.is_none();
    rows.iter()
        .filter(|r| r.peer == "livemig" && r.storage == "copy")
        .filter(ok)
        .map(|l| {
            let q = qemu_pair(rows, l);
            let disk = l.disk.clone().unwrap_or_default();
            let (bulk, alloc) = (
                disk["bulk_bytes"].as_u64(),
                disk["allocated_bytes"].as_u64(),
            );
            // Blocks the guest wrote during the migration may be data by the time the bulk
            // copy reads them (ahead of its cursor), or sent again (behind it).
            let written = l.disk_writes.unwrap_or(0) * GUEST_DISK_BLOCK;
            let dirtied = disk["dirtied_bytes"].as_u64().unwrap_or(0).max(written);
            CopyCheck {
                livemig: l.config.clone(),
                links: l.links.clone(),
                total_ms: l.total_ms,
                qemu_total_ms: q.map(|q| q.total_ms),
                within_0_8_of_qemu: q.map(|q| l.total_ms as f64 <= 0.8 * q.total_ms as f64),
                bulk_bytes: bulk,
                allocated_bytes: alloc,
                holes_not_sent: matches!((bulk, alloc), (Some(b), Some(a)) if b <= a + dirtied),
            }
        })
        .collect()
}

#[derive(Clone, Debug, Serialize)]
pub struct DevicesReport {
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub workload: String,
    pub memory_profile: String,
    pub disk_rate: u32,
    pub echo_hz: u32,
    pub announce_rounds: u32,
    pub downtime_target_ms: u64,
    pub scale: f64,
    pub host_cpus: usize,
    pub storage: String,
    pub disk_size: u64,
    pub disk_data: u64,
    pub rows: Vec<DeviceRow>,
    pub checks: Vec<GapCheck>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub copy_checks: Vec<CopyCheck>,
    pub notes: Vec<String>,
}

impl DevicesReport {
    /// Every row migrated and verified with no acknowledged write lost.
    pub fn all_verified(&self) -> bool {
        self.rows
            .iter()
            .all(|r| r.error.is_none() && r.verified && r.disk_writes_lost == Some(0))
    }
}

/// The guest's disk verdict on its console: `DISK VERIFY OK blocks=N writes=W` or
/// `DISK VERIFY FAIL lost=L stale=S torn=T blocks=N writes=W`, the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskVerdict {
    pub writes: u64,
    pub bad: u64,
    /// The longest write since the previous verify, in µs (older guests do not say).
    pub wmax_us: Option<u64>,
}

pub fn disk_verdict(console: &str) -> Option<DiskVerdict> {
    let line = console.lines().rev().find(|l| l.contains("DISK VERIFY "))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let bad = if line.contains("DISK VERIFY OK") {
        0
    } else {
        field("lost")? + field("stale")? + field("torn")?
    };
    Some(DiskVerdict {
        writes: field("writes")?,
        bad,
        wmax_us: field("wmax_us"),
    })
}

/// Where each run's migration sits on the client's clock.
struct Mark {
    row: usize,
    start_ms: f64,
    end_ms: f64,
}

/// QEMU's row (completed) that livemig's row `l` is compared with: the pair's, same link.
fn qemu_pair<'a>(rows: &'a [DeviceRow], l: &DeviceRow) -> Option<&'a DeviceRow> {
    let (_, q, links) = PAIRS
        .iter()
        .find(|(lm, _, links)| *lm == l.config && l.links.starts_with(links))?;
    rows.iter()
        .find(|r| r.error.is_none() && r.peer == "qemu" && r.config == *q && r.links == *links)
}

/// Each livemig row against its reported downtime and QEMU's row over the same link.
pub fn gap_checks(rows: &[DeviceRow]) -> Vec<GapCheck> {
    let ok = |r: &&DeviceRow| r.error.is_none();
    rows.iter()
        .filter(|r| r.peer == "livemig")
        .filter(ok)
        .map(|l| {
            let q = qemu_pair(rows, l);
            GapCheck {
                livemig: l.config.clone(),
                links: l.links.clone(),
                net_gap_ms: l.net_gap_ms,
                downtime_ms: l.downtime_ms,
                within_downtime: l
                    .downtime_ms
                    .is_some_and(|d| l.net_gap_ms <= d as f64 + GAP_OVER_DOWNTIME_MS),
                qemu: q.map(|q| format!("{} over {}", q.config, q.links)),
                qemu_net_gap_ms: q.map(|q| q.net_gap_ms),
                at_most_qemu: q.map(|q| l.net_gap_ms <= q.net_gap_ms),
            }
        })
        .collect()
}

/// One peer's VM through every run, with the client listening to it throughout.
struct Session<'a> {
    o: &'a DevicesOptions,
    tb: &'a Testbed,
    ui: &'a Ui,
    port: u16,
}

impl Session<'_> {
    fn runs<P: Peer>(
        &mut self,
        peer: &mut P,
        ip: &str,
        runs: &[Run],
        rows: &mut Vec<DeviceRow>,
    ) -> Result<(), BenchError> {
        self.ui.start(&format!("booting the {} VM", peer.name()));
        let mut vm = Some(peer.boot(&self.tb.host_a)?);
        let target = format!("{ip}:7")
            .parse()
            .map_err(|e| step("the guest's address")(format!("{ip}: {e}")))?;
        let client = EchoClient::start(&self.tb.vm_network.client, target, self.o.echo_hz);
        wait_for_replies(&client, peer.name())?;
        let quiet_from = client.now_ms();
        std::thread::sleep(Duration::from_millis(self.o.run_ms));
        let quiet = (quiet_from, client.now_ms());
        self.ui
            .done(&format!("{} VM running and answering", peer.name()));
        let mut marks = Vec::new();
        let mut from_a = true;
        let mut writes_before = 0;
        for (i, run) in runs.iter().enumerate() {
            let what = format!("{} {} over {}", peer.name(), run.name, run.links.join("+"));
            let Some(src) = vm.take() else {
                let e = step(&what)("no VM left after an earlier failure");
                rows.push(failed_row(peer.name(), run, "", &e));
                continue;
            };
            self.ui.start(&what);
            let start_ms = client.now_ms();
            let (result, next, moved) = self.run_one(peer, src, run, from_a, i + 1);
            let mut row = match result {
                Ok((o, direction)) => {
                    marks.push(Mark {
                        row: rows.len(),
                        start_ms,
                        end_ms: start_ms + o.total_ms as f64,
                    });
                    let console = std::fs::read_to_string(peer.console(i + 1)).unwrap_or_default();
                    let storage = if self.o.copies() { "copy" } else { "shared" };
                    row(
                        peer.name(),
                        run,
                        direction,
                        o,
                        disk_verdict(&console),
                        storage,
                    )
                }
                Err(e) => failed_row(peer.name(), run, "", &e),
            };
            if let Some(w) = row.disk_writes {
                row.disk_writes = Some(w.saturating_sub(writes_before));
                writes_before = w;
            }
            let window_end = start_ms + row.total_ms as f64 + SETTLE_MS;
            rows.push(row);
            vm = Some(next);
            from_a ^= moved;
            // The next run starts after this one's window closes.
            while client.now_ms() < window_end {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        std::thread::sleep(Duration::from_millis(SETTLE_MS as u64));
        let record = client.finish()?;
        drop(vm);
        for m in &marks {
            fill_from_record(&mut rows[m.row], &record, m, quiet);
            self.ui.done(&line(&rows[m.row]));
        }
        Ok(())
    }

    /// One migration; returns its outcome and direction, where the VM is now and whether it
    /// moved.
    fn run_one<P: Peer>(
        &mut self,
        peer: &mut P,
        mut src: P::Vm,
        run: &Run,
        from_a: bool,
        index: usize,
    ) -> (Result<(Outcome, String), BenchError>, P::Vm, bool) {
        let route = match Route::new(self.tb, run.links, from_a) {
            Ok(r) => r,
            Err(e) => return (Err(e), src, false),
        };
        self.port += 1;
        let mut dst = match peer.destination(run.setup, &route, self.port, index) {
            Ok(d) => d,
            Err(e) => return (Err(e), src, false),
        };
        let res = peer.migrate(&mut src, &mut dst, run.setup, &route, self.port);
        let (vm, moved) = peer.settle(src, dst, res.is_ok());
        (res.map(|o| (o, route.direction())), vm, moved)
    }
}

fn wait_for_replies(client: &EchoClient, peer: &str) -> Result<(), BenchError> {
    let t = std::time::Instant::now();
    while client.last_reply_ms().is_none() {
        if t.elapsed() > Duration::from_secs(60) {
            return Err(step(format!("the {peer} VM"))(
                "no UDP echo reply from the guest within 60 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn row(
    peer: &str,
    run: &Run,
    direction: String,
    o: Outcome,
    disk: Option<DiskVerdict>,
    storage: &str,
) -> DeviceRow {
    DeviceRow {
        peer: peer.into(),
        config: run.name.into(),
        links: run.links.join("+"),
        direction,
        total_ms: o.total_ms,
        downtime_ms: o.downtime_ms,
        net_gap_ms: 0.0,
        switchover_gap_ms: 0.0,
        baseline_gap_ms: 0.0,
        packets_sent: 0,
        packets_lost: 0,
        disk_writes: disk.map(|d| d.writes),
        disk_writes_lost: disk.map(|d| d.bad),
        storage: storage.into(),
        disk_bytes: o.detail["disk_bytes"]
            .as_u64()
            .filter(|_| storage == "copy"),
        disk_ms: o.detail["disk_ms"].as_u64().filter(|_| storage == "copy"),
        write_stall_ms: disk.and_then(|d| d.wmax_us).map(|us| us as f64 / 1e3),
        disk: Some(o.detail["disks"][0].clone()).filter(|d| !d.is_null()),
        verified: o.verified && disk.is_some_and(|d| d.bad == 0),
        verify: o.verify,
        error: None,
        round_trips: Vec::new(),
    }
}

fn failed_row(peer: &str, run: &Run, direction: &str, e: &BenchError) -> DeviceRow {
    DeviceRow {
        peer: peer.into(),
        config: run.name.into(),
        links: run.links.join("+"),
        direction: direction.into(),
        total_ms: 0,
        downtime_ms: None,
        net_gap_ms: 0.0,
        switchover_gap_ms: 0.0,
        baseline_gap_ms: 0.0,
        packets_sent: 0,
        packets_lost: 0,
        disk_writes: None,
        disk_writes_lost: None,
        storage: String::new(),
        disk_bytes: None,
        disk_ms: None,
        write_stall_ms: None,
        disk: None,
        verified: false,
        verify: "not reached".into(),
        error: Some(e.to_string()),
        round_trips: Vec::new(),
    }
}

/// A row's figures from the client's record; `quiet` is when the VM ran before its first
/// migration.
fn fill_from_record(r: &mut DeviceRow, record: &EchoRecord, m: &Mark, quiet: (f64, f64)) {
    let w = record.window(m.start_ms, m.end_ms + SETTLE_MS);
    r.net_gap_ms = w.longest_gap_ms;
    let paused = m.end_ms - r.downtime_ms.unwrap_or(0) as f64;
    r.switchover_gap_ms = record
        .window(
            paused - SWITCHOVER_BEFORE_MS,
            m.end_ms + SWITCHOVER_AFTER_MS,
        )
        .longest_gap_ms;
    let length = (m.end_ms + SETTLE_MS - m.start_ms).min(quiet.1 - quiet.0);
    r.baseline_gap_ms = record.window(quiet.0, quiet.0 + length).longest_gap_ms;
    r.packets_sent = w.sent;
    r.packets_lost = w.lost;
    r.round_trips = record.round_trips(m.end_ms - CHART_BEFORE_MS, m.end_ms + SETTLE_MS, m.end_ms);
}

/// One row as a progress line.
pub fn line(r: &DeviceRow) -> String {
    match &r.error {
        Some(e) => format!("{} {} over {}: FAILED: {e}", r.peer, r.config, r.links),
        None => format!(
            "{} {} over {}: {:.2} s, downtime {} ms, net gap {:.1} ms, {} of {} echo requests lost, {} disk writes, {} lost, verified {}",
            r.peer,
            r.config,
            r.links,
            r.total_ms as f64 / 1e3,
            r.downtime_ms.map_or("-".into(), |d| d.to_string()),
            r.net_gap_ms,
            r.packets_lost,
            r.packets_sent,
            r.disk_writes.map_or("-".into(), |w| w.to_string()),
            r.disk_writes_lost.map_or("-".into(), |w| w.to_string()),
            if r.verified { "yes" } else { "NO" }
        ),
    }
}

pub fn render(b: &DevicesReport) -> String {
    let mut s = format!(
        "livemig bench devices: {} MiB, {} vCPUs, workload {}, memory {}, disk writes {}/s, UDP echo {}/s, downtime target {} ms, link scale {}\n\n",
        b.memory_bytes >> 20,
        b.vcpus,
        b.workload,
        b.memory_profile,
        b.disk_rate,
        b.echo_hz,
        b.downtime_target_ms,
        b.scale
    );
    let header = [
        "peer",
        "config",
        "link",
        "total s",
        "downtime",
        "net gap",
        "switchover",
        "baseline",
        "sent",
        "lost",
        "disk writes",
        "writes lost",
        "write max",
        "disk MiB",
        "disk s",
        "verified",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let opt = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    for r in &b.rows {
        cells.push(vec![
            r.peer.clone(),
            r.config.clone(),
            r.links.clone(),
            if r.error.is_some() {
                "FAILED".into()
            } else {
                format!("{:.2}", r.total_ms as f64 / 1e3)
            },
            r.downtime_ms.map_or("-".into(), |d| format!("{d} ms")),
            format!("{:.1} ms", r.net_gap_ms),
            format!("{:.1} ms", r.switchover_gap_ms),
            format!("{:.1} ms", r.baseline_gap_ms),
            r.packets_sent.to_string(),
            r.packets_lost.to_string(),
            opt(r.disk_writes),
            opt(r.disk_writes_lost),
            r.write_stall_ms
                .map_or("-".into(), |w| format!("{w:.1} ms")),
            r.disk_bytes.map_or("-".into(), |b| {
                format!("{:.0}", b as f64 / (1 << 20) as f64)
            }),
            r.disk_ms
                .map_or("-".into(), |m| format!("{:.2}", m as f64 / 1e3)),
            if r.verified { "yes" } else { "NO" }.into(),
        ]);
    }
    s += &crate::table::grid(&cells, 3);
    for r in &b.rows {
        if let Some(e) = &r.error {
            s += &format!("  {} {} over {} failed: {e}\n", r.peer, r.config, r.links);
        }
    }
    s += "\nnet gap: the client's longest silence from the migration's start to a second after \
          its end; switchover: from 50 ms before the pause to 250 ms after the end; baseline: \
          the longest in as long a window before the first migration (nothing migrating)\n";
    if !b.checks.is_empty() {
        s += "\nlivemig's net gap against its downtime (+10 ms) and QEMU's over the same link:\n";
        for c in &b.checks {
            s += &format!(
                "  {:<22} {:<12} gap {:>7.1} ms, downtime {:>4} ms: {}; {}\n",
                c.livemig,
                c.links,
                c.net_gap_ms,
                c.downtime_ms.map_or("-".into(), |d| d.to_string()),
                if c.within_downtime { "within" } else { "OVER" },
                match (&c.qemu, c.qemu_net_gap_ms, c.at_most_qemu) {
                    (Some(q), Some(g), Some(ok)) => format!(
                        "QEMU {q}: {g:.1} ms, {}",
                        if ok {
                            "livemig at most"
                        } else {
                            "livemig LONGER"
                        }
                    ),
                    _ => "no QEMU row".into(),
                }
            );
        }
    }
    if !b.copy_checks.is_empty() {
        s += "\nlivemig's total time against 0.8 × QEMU's over the same link, and its bulk copy against the image's data:\n";
        for c in &b.copy_checks {
            s += &format!(
                "  {:<22} {:<12} {:>7.2} s against QEMU {}: {}; bulk {} MiB of {} MiB allocated: {}\n",
                c.livemig,
                c.links,
                c.total_ms as f64 / 1e3,
                c.qemu_total_ms
                    .map_or("-".into(), |t| format!("{:.2} s", t as f64 / 1e3)),
                match c.within_0_8_of_qemu {
                    Some(true) => "within",
                    Some(false) => "OVER",
                    None => "no QEMU row",
                },
                c.bulk_bytes.unwrap_or(0) >> 20,
                c.allocated_bytes.unwrap_or(0) >> 20,
                if c.holes_not_sent { "holes not sent" } else { "MORE than allocated" }
            );
        }
    }
    for n in &b.notes {
        s += &format!("\nnote: {n}");
    }
    s + "\n"
}

/// A sparse raw image of `size` bytes the VM's disk lives on, with `data` bytes written at
/// [`DISK_DATA_AT`]: blocks half pseudo-random, half zeros (they compress to about half).
fn disk_image(path: &Path, size: u64, data: u64) -> Result<PathBuf, BenchError> {
    use std::os::unix::fs::FileExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for at in (0..data).step_by(chunk.len()) {
        for block in chunk.chunks_mut(4096) {
            for w in block[..2048].chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
        }
        let n = (data - at).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], DISK_DATA_AT + at)?;
    }
    // On disk before the VM boots: its first flush must not write back the image's making.
    f.sync_all()?;
    Ok(path.to_path_buf())
}

/// Where the VM's disk starts: beside the bench's files (both testbed hosts see this
/// filesystem), or with --storage copy in the first host's disk directory.
fn first_disk(
    o: &DevicesOptions,
    dir: &Path,
    tb: &Testbed,
    file: &str,
) -> Result<PathBuf, BenchError> {
    let path = if o.copies() {
        crate::peer::host_disk_dir(dir, &tb.host_a).join(file)
    } else {
        dir.join(file)
    };
    disk_image(&path, o.disk_size(), o.disk_data())
}

fn livemig_peer(o: &DevicesOptions, dir: &Path, tb: &Testbed) -> Result<LivemigPeer, BenchError> {
    let tls = dir.join("tls");
    transport::tls::init_cluster(&tls, &["bench".into()])
        .map_err(|e| step("TLS credentials")(e.to_string()))?;
    let files = transport::tls::TlsFiles {
        cert: tls.join("bench.pem"),
        key: tls.join("bench.key"),
        ca: tls.join("ca.pem"),
    };
    let net = |l: Livemig| {
        l.with_net(Some(VM_BRIDGE), o.announce_rounds)
            .with_storage(&[dir.to_path_buf()])
    };
    let disk = first_disk(o, dir, tb, "livemig.img")?;
    let mut request = o.request.clone();
    // The VM goes back and forth: a host's old image must not be in the way of the next copy.
    request.remove_source |= o.copies();
    Ok(LivemigPeer {
        exe: net(Livemig::new(&o.livemig).with_tls(&files)),
        insecure: net(Livemig::new(&o.livemig).insecure()),
        tls: files,
        dir: dir.to_path_buf(),
        vm_args: vec![
            "--memory".into(),
            format!("{}M", o.memory >> 20),
            "--vcpus".into(),
            o.vcpus.to_string(),
            "--workload".into(),
            o.workload(&vm_addr(0)),
            "--memory-profile".into(),
            o.memory_profile.to_string(),
            "--disk".into(),
            format!("path={}", disk.display()),
            "--net".into(),
            format!("tap={}-lvm,mac=52:54:00:77:09:0a", tb_prefix(tb)),
        ],
        request,
        memory: o.memory,
        disk_dirs: o.copies().then(|| dir.to_path_buf()),
    })
}

fn qemu_peer(o: &DevicesOptions, dir: &Path, tb: &Testbed) -> Result<QemuPeer, BenchError> {
    let mut machine = Machine::prepare(
        &dir.join("qemu"),
        &dir.join("qemu").join("ram"),
        o.memory,
        o.vcpus,
        &o.workload(&vm_addr(1)),
        guest::memory_profile::Content {
            profile: o.memory_profile,
            seed: 1,
            image: None,
        },
    )?;
    machine.devices = Some(Devices {
        disk: first_disk(o, dir, tb, "qemu.img")?,
        tap: format!("{}-qvm", tb_prefix(tb)),
        mac: "52:54:00:77:09:0b".into(),
        bridge: VM_BRIDGE.into(),
        blockdev: o.copies(),
    });
    Ok(QemuPeer::new(
        machine,
        o.downtime_ms(),
        o.copies().then(|| dir.to_path_buf()),
    ))
}

/// The testbed's name (its hosts are <name>-a and <name>-b).
fn tb_prefix(tb: &Testbed) -> &str {
    tb.host_a.strip_suffix("-a").unwrap_or(&tb.host_a)
}

pub fn devices(o: &DevicesOptions) -> Result<DevicesReport, BenchError> {
    crate::preflight(o.peer_qemu, &o.testbed, o.memory)?;
    let dir = std::path::absolute(&o.out)?;
    std::fs::create_dir_all(&dir)?;
    let tb = Testbed::new(&o.testbed, o.scale)?;
    let existed = tb.status()?.present;
    tb.up()?;
    let qemu_steps = if o.peer_qemu { 1 + QEMU_RUNS.len() } else { 0 };
    let ui = Ui::new((1 + LIVEMIG_RUNS.len() + qemu_steps) as u64);
    let mut session = Session {
        o,
        tb: &tb,
        ui: &ui,
        port: 7800,
    };
    let mut rows = Vec::new();
    let res = (|| {
        let mut lm = livemig_peer(o, &dir, &tb)?;
        session.runs(&mut lm, &vm_addr(0), &LIVEMIG_RUNS, &mut rows)?;
        if o.peer_qemu {
            let mut q = qemu_peer(o, &dir, &tb)?;
            session.runs(&mut q, &vm_addr(1), &QEMU_RUNS, &mut rows)?;
            let ram = q.machine.dir.join("ram");
            drop(q);
            let _ = std::fs::remove_dir_all(ram);
        }
        Ok::<_, BenchError>(())
    })();
    ui.finish();
    let mut notes = Vec::new();
    if !existed && !o.keep_testbed {
        if let Err(e) = tb.down() {
            notes.push(format!("removing the testbed: {e}"));
        }
    }
    res?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    notes.push(format!(
        "{cpus} host CPUs run both hosts, both VMs, the client and every migration thread; the \
         guest's vCPUs are emulated here, so its replies come late when it is busy"
    ));
    let report = DevicesReport {
        memory_bytes: o.memory,
        vcpus: o.vcpus,
        workload: o.workload.clone(),
        memory_profile: o.memory_profile.to_string(),
        disk_rate: o.disk_rate,
        echo_hz: o.echo_hz,
        announce_rounds: o.announce_rounds,
        downtime_target_ms: o.downtime_ms(),
        scale: o.scale,
        host_cpus: cpus,
        storage: if o.copies() { "copy" } else { "shared" }.into(),
        disk_size: o.disk_size(),
        disk_data: o.disk_data(),
        checks: gap_checks(&rows),
        copy_checks: copy_checks(&rows),
        rows,
        notes,
    };
    std::fs::write(
        dir.join("bench.json"),
        serde_json::to_vec_pretty(&report).map_err(|e| step("bench.json")(e.to_string()))?,
    )?;
    crate::chart::round_trips(&report, &dir.join("bench.png")).map_err(step("bench.png"))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_verdict_is_the_last_on_the_console() {
        let c = "HB 1\nDISK VERIFY OK blocks=10 writes=12\nVERIFY OK pages=3\n\
                 DISK VERIFY FAIL lost=1 stale=2 torn=0 blocks=40 writes=51 wmax_us=900\nVERIFY OK\n";
        assert_eq!(
            disk_verdict(c),
            Some(DiskVerdict {
                writes: 51,
                bad: 3,
                wmax_us: Some(900)
            })
        );
        assert_eq!(
            disk_verdict("DISK VERIFY OK blocks=10 writes=12\n"),
            Some(DiskVerdict {
                writes: 12,
                bad: 0,
                wmax_us: None
            })
        );
        assert_eq!(disk_verdict("VERIFY OK pages=3\n"), None);
        assert_eq!(disk_verdict("DISK VERIFY FAIL lost=x\n"), None);
    }

    fn r(peer: &str, config: &str, links: &str, gap: f64, downtime: Option<u64>) -> DeviceRow {
        let mut r = failed_row(peer, &LIVEMIG_RUNS[0], "", &step("x")("y"));
        r.error = None;
        r.config = config.into();
        r.links = links.into();
        r.net_gap_ms = gap;
        r.downtime_ms = downtime;
        r
    }

    #[test]
    fn livemig_rows_are_checked_against_downtime_and_qemu_on_the_same_link() {
        let rows = vec![
            r("livemig", "tcp", "1g-1", 14.0, Some(5)),
            r("livemig", "direct", "10g-1", 30.0, Some(5)),
            r("livemig", "compressed", "1g-1", 9.0, Some(2)),
            r("qemu", "tcp", "1g-1", 60.0, Some(40)),
            r("qemu", "tcp", "10g-1", 20.0, Some(15)),
        ];
        let c = gap_checks(&rows);
        assert_eq!(c.len(), 3);
        assert!(c[0].within_downtime);
        assert_eq!(c[0].at_most_qemu, Some(true));
        assert_eq!(c[0].qemu.as_deref(), Some("tcp over 1g-1"));
        assert!(!c[1].within_downtime);
        assert_eq!(c[1].at_most_qemu, Some(false));
        // compressed pairs with QEMU's multifd+zstd, which has no row here.
        assert_eq!(c[2].at_most_qemu, None);
    }
}
