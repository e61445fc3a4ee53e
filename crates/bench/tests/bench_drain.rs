//! A small `livemig-bench drain` as a smoke test: every configuration's row is there with
//! every VM verified, QEMU's too, each with the model's prediction; the reference's scenarios
//! are predicted. No timing assertions. Needs root, /dev/kvm and QEMU: ignored, saying so,
//! without them.
use std::process::Command;

mod common;
use common::{bench_with_qemu, every_row, BENCH};

const LIVEMIG_ROWS: [(&str, &str); 5] = [
    ("tcp c2 (unoptimised)", "1g-1"),
    ("tcp auto", "1g-1"),
    ("compressed auto", "1g-1"),
    ("direct auto", "10g-1"),
    ("direct+multichannel auto", "10g-1+10g-2"),
];
const QEMU_ROWS: [(&str, &str); 3] = [
    ("tcp c2", "1g-1"),
    ("multifd+zstd c2", "1g-1"),
    ("multifd c2", "10g-1"),
];

#[test]
#[cfg_attr(
    any(no_kvm, no_root, no_qemu),
    ignore = "needs /dev/kvm, root and qemu-system-x86_64"
)]
fn bench_drain_smoke_has_every_row_verified() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, b) = bench_with_qemu(
        &[
            "drain",
            "--vms",
            "3",
            "--vm-memory",
            "128M",
            "--scale",
            "0.5",
            "--testbed",
            "lmdrain",
        ],
        dir.path(),
    );
    for (peer, config, _, r) in every_row(&b, &LIVEMIG_ROWS, &QEMU_ROWS, &stdout) {
        assert_eq!(r["vms"], 3, "{r}");
        assert_eq!(
            r["verified"], 3,
            "{peer} {config}: not every VM verified: {r}"
        );
        assert!(r["makespan_ms"].as_u64().unwrap() > 0, "{r}");
        assert!(r["predicted_makespan_ms"].as_u64().unwrap() > 0, "{r}");
        assert!(r["model_error"].as_f64().unwrap().is_finite(), "{r}");
        assert_eq!(r["timeline"].as_array().unwrap().len(), 3, "{r}");
        // Each transport starts from fresh guests (and they all move and verify again).
        let fresh = peer == "livemig" && !config.contains("unoptimised");
        assert_eq!(r["fresh_guests"], fresh, "{peer} {config}: {r}");
        assert!(
            stdout.contains(&format!("{peer:<7} {config}")),
            "{config} not printed:\n{stdout}"
        );
    }
    let refs = b["references"].as_array().unwrap();
    assert!(
        refs.iter().any(|r| r["reference_s"] == 78.0),
        "{}",
        b["references"]
    );
    assert!(stdout.contains("host of 31 x 8 GB VMs"), "{stdout}");
    let png = std::fs::read(dir.path().join("bench.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "bench.png is a PNG");
    let st = Command::new(BENCH)
        .args(["testbed", "status", "--name", "lmdrain"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(
        st["present"], false,
        "the bench removed the testbed it made"
    );
}
