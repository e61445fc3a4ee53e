//! The two-host testbed: namespaces, veth pairs, shaping. Needs root: ignored, saying so,
//! without it.
use std::process::Command;

mod common;
use common::livemig_bench as livemig;

#[test]
#[cfg_attr(no_root, ignore = "needs root (network namespaces)")]
fn testbed_up_is_idempotent_shaped_and_down_removes_it() {
    fn args(a: &str) -> Vec<&str> {
        vec!["testbed", a, "--name", "lmtest", "--scale", "0.1"]
    }
    let _ = livemig(&args("down"));
    for _ in 0..2 {
        let out = livemig(&args("up"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let st: serde_json::Value = serde_json::from_slice(&livemig(&args("status")).stdout).unwrap();
    assert_eq!(st["present"], true);
    let links = st["links"].as_array().unwrap();
    assert_eq!(links.len(), 5);
    assert!(links.iter().all(|l| l["up"] == true), "{st}");
    assert_eq!(links[1]["shaped_bps"], 100_000_000);
    // The shaping is really there, on both ends, at the scaled rate.
    for (ns, dev) in [("lmtest-a", "lmtest-1g-1-a"), ("lmtest-b", "lmtest-1g-1-b")] {
        let q = Command::new("tc")
            .args(["-n", ns, "qdisc", "show", "dev", dev])
            .output()
            .unwrap();
        let q = String::from_utf8_lossy(&q.stdout);
        assert!(
            q.contains("tbf") && q.contains("100Mbit"),
            "{ns}/{dev}: {q}"
        );
    }
    let addrs = Command::new("ip")
        .args(["-n", "lmtest-b", "-o", "addr"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&addrs.stdout).contains("10.77.3.2/24"));
    assert!(livemig(&args("down")).status.success());
    let st: serde_json::Value = serde_json::from_slice(&livemig(&args("status")).stdout).unwrap();
    assert_eq!(st["present"], false);
    assert!(
        livemig(&args("down")).status.success(),
        "down twice is fine"
    );
}

#[test]
fn testbed_refuses_bad_arguments_clearly() {
    let out = livemig(&["testbed", "up", "--scale", "3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--scale"));
    let out = livemig(&["testbed", "up", "--name", "muchtoolongname"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("too long"));
}
