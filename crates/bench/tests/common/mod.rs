//! Helpers shared by the bench's tests.
#![allow(dead_code)]
use std::path::Path;
use std::process::{Command, Output};

pub const BENCH: &str = env!("CARGO_BIN_EXE_livemig-bench");

/// `livemig-bench ARGS` to the end.
pub fn livemig_bench(args: &[&str]) -> Output {
    Command::new(BENCH)
        .args(args)
        .output()
        .expect("livemig-bench runs")
}

/// Runs a bench command to the end, fails the test with its output if it failed, and returns
/// what it printed and the bench.json it wrote into `out`. The benches run the `livemig`
/// beside `livemig-bench` (`cargo test --workspace` builds both).
pub fn run_bench(cmd: &mut Command, out: &Path) -> (String, serde_json::Value) {
    let livemig = Path::new(BENCH).with_file_name("livemig");
    assert!(
        livemig.exists(),
        "{} is missing: build the workspace (cargo build --release --workspace)",
        livemig.display()
    );
    let o = cmd.output().expect("livemig-bench runs");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr);
    println!("{stdout}");
    assert!(o.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let json = std::fs::read(out.join("bench.json")).expect("the bench wrote bench.json");
    let b = serde_json::from_slice(&json).expect("bench.json is JSON");
    (stdout, b)
}

/// `livemig-bench ARGS --goodput-secs 1 --out DIR --peer qemu` run to the end (see
/// [`run_bench`]).
pub fn bench_with_qemu(args: &[&str], out: &Path) -> (String, serde_json::Value) {
    let mut cmd = Command::new(BENCH);
    cmd.args(args)
        .args(["--goodput-secs", "1", "--peer", "qemu", "--out"])
        .arg(out);
    run_bench(&mut cmd, out)
}

/// The rows of a bench's JSON, one for each of livemig's and QEMU's (config, links), and no
/// others; each checked by `check`, with the printed output to show when it fails.
pub fn every_row<'a>(
    b: &'a serde_json::Value,
    livemig_rows: &[(&str, &str)],
    qemu_rows: &[(&str, &str)],
    stdout: &str,
) -> Vec<(&'static str, String, String, &'a serde_json::Value)> {
    let rows = b["rows"].as_array().expect("bench.json has rows");
    let want: Vec<(&'static str, &str, &str)> = livemig_rows
        .iter()
        .map(|(c, l)| ("livemig", *c, *l))
        .chain(qemu_rows.iter().map(|(c, l)| ("qemu", *c, *l)))
        .collect();
    assert_eq!(rows.len(), want.len(), "{stdout}");
    want.into_iter()
        .map(|(peer, config, links)| {
            let r = rows
                .iter()
                .find(|r| r["peer"] == peer && r["config"] == config && r["links"] == links)
                .unwrap_or_else(|| panic!("no row for {peer} {config} over {links}:\n{stdout}"));
            assert_eq!(r["error"], serde_json::Value::Null, "{r}");
            (peer, config.to_string(), links.to_string(), r)
        })
        .collect()
}
