//! Small `livemig-bench transports` and `devices` runs as smoke tests: every configuration's
//! row is there and every migration verified on its destination, QEMU's too. No timing
//! assertions: figures are the bench's output, not a test's. Needs root, /dev/kvm and QEMU:
//! ignored, saying so, without them.
use std::process::Command;

mod common;
use common::{bench_with_qemu, every_row, run_bench, BENCH};

const LIVEMIG_ROWS: [(&str, &str); 8] = [
    ("tcp", "1g-1"),
    ("compressed", "1g-1"),
    ("direct", "10g-1"),
    ("direct+multichannel", "10g-1+10g-2"),
    ("tcp+tls", "1g-1"),
    ("compressed+tls", "1g-1"),
    ("direct+tls", "10g-1"),
    ("direct+multichannel+tls", "10g-1+10g-2"),
];
const QEMU_ROWS: [(&str, &str); 4] = [
    ("tcp", "1g-1"),
    ("multifd+zstd", "1g-1"),
    ("tcp", "10g-1"),
    ("multifd", "10g-1"),
];

#[test]
#[cfg_attr(
    any(no_kvm, no_root, no_qemu),
    ignore = "needs /dev/kvm, root and qemu-system-x86_64"
)]
fn bench_transports_smoke_has_every_row_verified() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, b) = bench_with_qemu(
        &[
            "transports",
            "--memory",
            "256M",
            "--scale",
            "0.25",
            "--testbed",
            "lmsmoke",
            "--run-ms",
            "1000",
        ],
        dir.path(),
    );
    for (peer, config, links, r) in every_row(&b, &LIVEMIG_ROWS, &QEMU_ROWS, &stdout) {
        assert_eq!(
            r["verified"], true,
            "{peer} {config} over {links} did not verify: {r}"
        );
        assert!(r["wire_bytes"].as_u64().unwrap() > 64 << 20, "{r}");
        assert!(!r["samples"].as_array().unwrap().is_empty(), "{r}");
        // The printed table has the row too.
        assert!(
            stdout.lines().any(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                cells.len() > 3 && cells[0] == peer && cells[1] == config && cells[2] == links
            }),
            "{peer} {config} {links} missing from the table:\n{stdout}"
        );
    }
    assert_eq!(b["links"].as_array().unwrap().len(), 3);
    // Each transport with and without TLS, side by side.
    assert_eq!(
        b["tls_costs"].as_array().unwrap().len(),
        4,
        "{}",
        b["tls_costs"]
    );
    assert_eq!(b["ratios"].as_array().unwrap().len(), 4, "{}", b["ratios"]);
    let png = std::fs::read(dir.path().join("bench.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "bench.png is a PNG");
    // The bench made its testbed and removed it.
    let st = Command::new(BENCH)
        .args(["testbed", "status", "--name", "lmsmoke"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["present"], false);
}

/// `livemig-bench mechanisms` moves every byte intact by each mechanism (the bench checks the
/// landed RAM's hash against the source's and fails otherwise) and reports each one.
#[test]
#[cfg_attr(no_root, ignore = "needs root (network namespaces)")]
fn bench_mechanisms_lands_every_byte_by_each_mechanism() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BENCH);
    cmd.args(["mechanisms", "--size", "64M", "--runs", "1"])
        .args(["--testbed", "lmmech", "--scale", "0.25", "--out"])
        .arg(dir.path());
    let (stdout, b) = run_bench(&mut cmd, dir.path());
    let rows = b["rows"].as_array().unwrap();
    let combos: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["send"].as_str().unwrap(), r["landing"].as_str().unwrap()))
        .collect();
    assert_eq!(
        combos,
        [
            ("copy", "splice"),
            ("sendfile", "splice"),
            ("zerocopy", "splice"),
            ("sendfile", "splice-fallocated"),
            ("sendfile", "read"),
        ]
    );
    for r in rows {
        assert!(r["gbps"]["median"].as_f64().unwrap() > 0.0, "{r}");
        assert!(
            r["send_cpu_s_per_gib"]["median"].as_f64().unwrap() >= 0.0,
            "{r}"
        );
    }
    assert!(rows[2]["trials"][0]["sent_by"].is_string(), "{}", rows[2]);
    assert!(stdout.contains("sendfile / copy"), "{stdout}");
}

/// The devices benches one at a time: each runs two VMMs, QEMU, a client and a disk image
/// being written on two cores, and together they starved a receiver's start past its 30 s
/// (CI, 2026-12-03).
static DEVICES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A small `livemig-bench devices` with QEMU: every row there, each VM verified with its disk
/// and no acknowledged write lost, the client's record and the checks in bench.json, the
/// round-trip chart drawn. No figure is asserted.
#[test]
#[cfg_attr(
    any(no_kvm, no_root, no_qemu),
    ignore = "needs /dev/kvm, root and qemu-system-x86_64"
)]
fn bench_devices_smoke_has_every_row_verified_with_its_disk() {
    let _alone = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BENCH);
    cmd.args(["devices", "--memory", "128M", "--run-ms", "1000"])
        .args(["--testbed", "lmdsmk", "--peer", "qemu", "--out"])
        .arg(dir.path());
    let (stdout, b) = run_bench(&mut cmd, dir.path());
    let livemig_rows = &LIVEMIG_ROWS[..4];
    for (peer, config, links, r) in every_row(&b, livemig_rows, &QEMU_ROWS, &stdout) {
        let what = format!("{peer} {config} over {links}");
        assert_eq!(r["verified"], true, "{what}: {r}");
        assert_eq!(r["disk_writes_lost"], 0, "{what}: {r}");
        assert!(r["disk_writes"].is_u64(), "{what}: {r}");
        assert!(r["packets_sent"].as_u64().unwrap() > 0, "{what}: {r}");
        assert!(r["net_gap_ms"].as_f64().unwrap() > 0.0, "{what}: {r}");
        assert!(
            !r["round_trips"].as_array().unwrap().is_empty(),
            "{what}: {r}"
        );
    }
    assert_eq!(b["checks"].as_array().unwrap().len(), 4, "{}", b["checks"]);
    let png = std::fs::read(dir.path().join("bench.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "bench.png is a PNG");
    let st = Command::new(BENCH)
        .args(["testbed", "status", "--name", "lmdsmk"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["present"], false);
}

/// The same with `--storage copy`: every VM verifies with its disk copied, livemig's and
/// QEMU's (NBD + blockdev-mirror) alike, and no hole is sent. No figure is asserted.
#[test]
#[cfg_attr(
    any(no_kvm, no_root, no_qemu),
    ignore = "needs /dev/kvm, root and qemu-system-x86_64"
)]
fn bench_devices_copy_smoke_moves_the_disk_with_every_vm() {
    let _alone = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BENCH);
    cmd.args(["devices", "--memory", "128M", "--run-ms", "1000"])
        .args([
            "--storage",
            "copy",
            "--disk-size",
            "256M",
            "--disk-data",
            "32M",
        ])
        .args(["--testbed", "lmdcmk", "--peer", "qemu", "--out"])
        .arg(dir.path());
    let (stdout, b) = run_bench(&mut cmd, dir.path());
    assert_eq!(b["storage"], "copy");
    for (peer, config, links, r) in every_row(&b, &LIVEMIG_ROWS[..4], &QEMU_ROWS, &stdout) {
        let what = format!("{peer} {config} over {links}");
        assert_eq!(r["verified"], true, "{what}: {r}");
        assert_eq!(r["disk_writes_lost"], 0, "{what}: {r}");
        assert_eq!(r["storage"], "copy", "{what}: {r}");
        assert!(r["disk_bytes"].as_u64().unwrap() >= 32 << 20, "{what}: {r}");
        assert!(r["disk_ms"].as_u64().unwrap() > 0, "{what}: {r}");
        assert!(r["write_stall_ms"].as_f64().is_some(), "{what}: {r}");
    }
    let checks = b["copy_checks"].as_array().unwrap();
    assert_eq!(checks.len(), 4, "{checks:?}");
    for c in checks {
        assert_eq!(c["holes_not_sent"], true, "{c}");
        assert!(c["qemu_total_ms"].is_u64(), "{c}");
    }
    assert!(stdout.contains("holes not sent"), "{stdout}");
}
