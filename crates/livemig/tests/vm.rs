//! KVM integration tests through the `livemig` binary: boot, API, foreign kernels, snapshot and
//! restore across processes, refusal of corrupt snapshots. Each says SKIPPED without /dev/kvm.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{build_foreign_kernel, livemig, wait, KillOnDrop, BIN};

struct Vm {
    _child: KillOnDrop,
    api: PathBuf,
    console: PathBuf,
}

impl Vm {
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> Vm {
        let api = dir.join(format!("{name}.sock"));
        let console = dir.join(format!("{name}.console"));
        let child = Command::new(BIN)
            .args(args)
            .arg("--api")
            .arg(&api)
            .arg("--console")
            .arg(&console)
            .stdout(Stdio::null())
            .spawn()
            .expect("livemig starts");
        Vm {
            _child: KillOnDrop(child),
            api,
            console,
        }
    }

    fn cli(&self, cmd: &str) -> Output {
        livemig(&[cmd, "--api", self.api.to_str().unwrap()])
    }

    fn json(&self, cmd: &str) -> serde_json::Value {
        let out = self.cli(cmd);
        assert!(
            out.status.success(),
            "livemig {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON answer")
    }

    fn wait_api(&self) {
        wait(Duration::from_secs(60), "API socket", || self.api.exists());
    }

    fn snapshot(&self, dir: &Path) {
        let out = livemig(&[
            "snapshot",
            "--api",
            self.api.to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn heartbeats(&self) -> Vec<u64> {
        heartbeats(&self.console)
    }
}

fn heartbeats(console: &Path) -> Vec<u64> {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("HB ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_sql_workload_boots_reports_status_pauses_and_verifies() {
    let d = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let vm = Vm::spawn(
        d.path(),
        "vm",
        &["run", "--memory", "1G", "--vcpus", "2", "--workload", "sql"],
    );
    wait(Duration::from_secs(30), "a rising heartbeat", || {
        vm.heartbeats().len() >= 2
    });
    println!("rising heartbeat after {:?}", t0.elapsed());
    let hb = vm.heartbeats();
    assert!(
        hb.windows(2).all(|w| w[1] == w[0] + 1),
        "heartbeat must count up by one: {hb:?}"
    );

    vm.wait_api();
    let st = vm.json("status");
    assert_eq!(st["state"], "running");
    assert_eq!(st["vcpus"], 2);
    assert_eq!(st["memory_bytes"], 1u64 << 30);
    assert!(st["heartbeat"].as_u64().unwrap() >= 1, "{st}");
    let resident = st["resident_bytes"].as_u64().unwrap();
    assert!(
        resident > 0 && resident < 1 << 30,
        "server profile leaves zero pages unbacked: {resident}"
    );

    let v = vm.json("verify");
    assert_eq!(v["last_verify"]["result"], "ok", "{v}");
    assert!(
        v["last_verify"]["pages"].as_u64().unwrap() > 0,
        "the sql workload wrote pages: {v}"
    );

    let p = vm.json("pause");
    assert_eq!(p["state"], "paused");
    let frozen = vm.json("status")["heartbeat"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        vm.json("status")["heartbeat"].as_u64().unwrap(),
        frozen,
        "a paused guest must not beat"
    );
    assert_eq!(vm.json("resume")["state"], "running");
    wait(Duration::from_secs(10), "heartbeat after resume", || {
        vm.json("status")["heartbeat"].as_u64().unwrap() > frozen
    });
    let st = vm.json("status");
    assert_eq!(
        st["last_verify"]["result"], "ok",
        "status carries the last verify: {st}"
    );
    assert!(livemig(&["shutdown", "--api", vm.api.to_str().unwrap()])
        .status
        .success());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_boots_a_foreign_pvh_kernel() {
    let d = tempfile::tempdir().unwrap();
    let kernel = build_foreign_kernel(d.path());
    let vm = Vm::spawn(
        d.path(),
        "hello",
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
            "--vcpus",
            "1",
        ],
    );
    wait(
        Duration::from_secs(30),
        "the foreign guest's output",
        || {
            std::fs::read_to_string(&vm.console)
                .unwrap_or_default()
                .matches("hello from a foreign PVH guest")
                .count()
                >= 2
        },
    );
    vm.wait_api();
    assert_eq!(vm.json("status")["state"], "running");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_non_pvh_kernel_is_refused_clearly() {
    let out = livemig(&[
        "run",
        "--kernel",
        "/bin/true",
        "--memory",
        "64M",
        "--vcpus",
        "1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PVH") || err.contains("ELF"), "{err}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_snapshot_restore_continues_in_a_fresh_process() {
    let d = tempfile::tempdir().unwrap();
    let snap = d.path().join("snap");
    let last;
    let resident_before;
    {
        let vm = Vm::spawn(
            d.path(),
            "src",
            &[
                "run",
                "--memory",
                "256M",
                "--vcpus",
                "2",
                "--workload",
                "sql",
            ],
        );
        wait(Duration::from_secs(30), "heartbeats", || {
            vm.heartbeats().len() >= 3
        });
        vm.wait_api();
        assert_eq!(vm.json("pause")["state"], "paused");
        vm.snapshot(&snap);
        last = *vm.heartbeats().last().unwrap();
        let st = vm.json("status");
        assert_eq!(st["heartbeat"].as_u64().unwrap(), last);
        resident_before = st["resident_bytes"].as_u64().unwrap();
    }
    let vm = Vm::spawn(
        d.path(),
        "dst",
        &["restore", "--from", snap.to_str().unwrap()],
    );
    wait(Duration::from_secs(60), "heartbeats after restore", || {
        vm.heartbeats().len() >= 2
    });
    let hb = vm.heartbeats();
    assert_eq!(
        hb[0],
        last + 1,
        "the heartbeat continues where it stopped: before {last}, after {hb:?}"
    );
    vm.wait_api();
    let v = vm.json("verify");
    assert_eq!(v["last_verify"]["result"], "ok", "{v}");
    assert!(v["heartbeat"].as_u64().unwrap() > last);
    // Zero pages stay unbacked through snapshot and restore.
    let resident_after = vm.json("status")["resident_bytes"].as_u64().unwrap();
    assert!(
        resident_after < resident_before + (16 << 20),
        "restore backed pages that were zero: {resident_before} -> {resident_after}"
    );
    assert!(resident_after < 256 << 20);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_corrupt_snapshots_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let snap = d.path().join("snap");
    {
        let vm = Vm::spawn(
            d.path(),
            "src",
            &[
                "run",
                "--memory",
                "64M",
                "--vcpus",
                "1",
                "--workload",
                "web",
            ],
        );
        wait(Duration::from_secs(30), "heartbeats", || {
            vm.heartbeats().len() >= 2
        });
        vm.wait_api();
        vm.snapshot(&snap);
    }
    let state = std::fs::read(snap.join("state.bin")).unwrap();
    let memory = std::fs::read(snap.join("memory.raw")).unwrap();
    let first_data = memory
        .iter()
        .position(|&b| b != 0)
        .expect("memory has data");
    let mut cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = Vec::new();
    let mut s = state.clone();
    s[state.len() / 2] ^= 0x40;
    cases.push(("flipped state byte", s, memory.clone(), "checksum"));
    let mut m = memory.clone();
    m[first_data + 100] ^= 0x01;
    cases.push(("flipped memory byte", state.clone(), m, "corrupt"));
    cases.push((
        "truncated state",
        state[..state.len() - 3].to_vec(),
        memory.clone(),
        "length",
    ));
    cases.push((
        "truncated memory",
        state.clone(),
        memory[..memory.len() / 2].to_vec(),
        "bytes",
    ));
    for (what, st, mem, word) in cases {
        let bad = d.path().join("bad");
        let _ = std::fs::remove_dir_all(&bad);
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("state.bin"), st).unwrap();
        std::fs::write(bad.join("memory.raw"), mem).unwrap();
        let out = livemig(&[
            "restore",
            "--from",
            bad.to_str().unwrap(),
            "--console",
            "/dev/null",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: restore must fail");
        assert!(
            err.contains(word),
            "{what}: error should mention {word:?}: {err}"
        );
    }
}
