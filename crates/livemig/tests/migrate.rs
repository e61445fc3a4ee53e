//! Live migration end to end through the `livemig` binary: under load, with the connection
//! cut in each phase, and with a destination fed garbage. Says SKIPPED without /dev/kvm.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::{
    build_foreign_kernel, free_port, livemig, livemig_exe, source_vm, wait, KillOnDrop, Livemig,
    VmProcess, BIN,
};

fn source(dir: &Path, workload: &str, memory: &str) -> (VmProcess, PathBuf) {
    let vm = source_vm(dir, workload, memory, 2);
    let api = vm.api.clone();
    (vm, api)
}

/// `livemig receive` on loopback `port` with the test cluster's TLS credentials, its API and
/// console named after `name`.
fn receiver(dir: &Path, name: &str, port: u16) -> VmProcess {
    receiver_with(livemig_exe(), dir, name, port)
}

/// A plaintext receiver (`--insecure`), for tests that read or cut the byte stream.
fn receiver_plain(dir: &Path, name: &str, port: u16) -> VmProcess {
    receiver_with(Livemig::new(BIN).insecure(), dir, name, port)
}

fn receiver_with(exe: Livemig, dir: &Path, name: &str, port: u16) -> VmProcess {
    exe.receive(
        None,
        &format!("127.0.0.1:{port}"),
        &dir.join(format!("{name}.sock")),
        &dir.join(format!("{name}.console")),
        None,
    )
    .unwrap()
}

fn status(api: &Path) -> Option<serde_json::Value> {
    let out = livemig(&["status", "--api", api.to_str().unwrap()]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn heartbeat(api: &Path) -> u64 {
    status(api).map_or(0, |s| s["heartbeat"].as_u64().unwrap_or(0))
}

fn migrate(api: &Path, port: u16, report: &Path) -> Output {
    migrate_with(api, port, report, &[])
}

fn migrate_with(api: &Path, port: u16, report: &Path, extra: &[&str]) -> Output {
    let to = format!("127.0.0.1:{port}");
    let mut args = vec![
        "migrate",
        "--api",
        api.to_str().unwrap(),
        "--to",
        &to,
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    livemig(&args)
}

/// After a failed migration: the destination logged the failure, dropped its half and goes
/// on waiting (no API: it has no VM), and the source still runs the guest, its heartbeat rising.
fn assert_failed_cleanly(dst: &mut VmProcess, src_api: &Path) {
    wait(
        Duration::from_secs(30),
        "the destination to log the failure",
        || dst.stderr.text().contains("failed"),
    );
    assert!(
        dst.child.try_wait().unwrap().is_none(),
        "the receiver goes on"
    );
    assert!(
        status(&dst.api).is_none(),
        "nothing of the VM is left there"
    );
    let st = status(src_api).expect("source still answers");
    assert_eq!(st["state"], "running", "{st}");
    let hb = st["heartbeat"].as_u64().unwrap();
    wait(Duration::from_secs(5), "source heartbeat rising", || {
        heartbeat(src_api) > hb
    });
}

fn check_report(report: &Path) -> serde_json::Value {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    assert_eq!(r["status"], "completed");
    assert_eq!(r["guest_verified"], true, "{}", r["guest_verify"]);
    for p in [
        "prepare_ms",
        "copy_ms",
        "sync_ms",
        "switchover_ms",
        "cleanup_ms",
    ] {
        assert!(r["phases"][p].is_u64(), "phase {p} timed");
    }
    // Post-copy at once has no copy round, only the push.
    let least = if r["postcopy"]["reason"]
        .as_str()
        .is_some_and(|w| w.contains("no pre-copy"))
    {
        1
    } else {
        2
    };
    assert!(
        r["rounds"].as_array().unwrap().len() >= least,
        "copy and final round at least"
    );
    assert!(r["bytes_on_wire"].as_u64().unwrap() > 0);
    assert!(r["samples"].is_array());
    r
}

fn migrate_under(workload: &str) {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let dst = receiver(d.path(), "dst", port);
    let dst_api = dst.api.clone();
    let (mut src, src_api) = source(d.path(), workload, "512M");
    let before = heartbeat(&src_api);
    let out = migrate(&src_api, port, &d.path().join("r.json"));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = check_report(&d.path().join("r.json"));
    println!(
        "{workload}: total {} ms, downtime {} ms, rounds {}",
        r["total_ms"],
        r["downtime_ms"],
        r["rounds"].as_array().unwrap().len()
    );
    // The source process is gone; the guest runs on at the destination, its heartbeat continuing.
    wait(Duration::from_secs(10), "source exit", || {
        src.child.try_wait().unwrap().is_some()
    });
    let st = status(&dst_api).expect("destination API");
    assert_eq!(st["state"], "running");
    assert!(
        st["heartbeat"].as_u64().unwrap() >= before,
        "heartbeat continues, not reset"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_migrates_under_sql() {
    migrate_under("sql");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_migrates_under_stress() {
    migrate_under("stress");
}

/// Follows the source's byte stream frame by frame (16-byte hello, then 24-byte headers
/// announcing their payload length), across any read boundaries.
struct FrameWatch {
    bytes: u64,
    next: u64,
    hdr: Vec<u8>,
    round_ends: u32,
}

impl Default for FrameWatch {
    fn default() -> Self {
        FrameWatch {
            bytes: 0,
            next: 16,
            hdr: Vec::with_capacity(24),
            round_ends: 0,
        }
    }
}

impl FrameWatch {
    fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if self.bytes >= self.next {
                self.hdr.push(b);
                if self.hdr.len() == 24 {
                    let len = u32::from_le_bytes(self.hdr[8..12].try_into().unwrap()) as u64;
                    if self.hdr[0] == 4 {
                        self.round_ends += 1;
                    }
                    self.next += 24 + len;
                    self.hdr.clear();
                }
            }
            self.bytes += 1;
        }
    }
}

fn cut_test(cut: impl Fn(&FrameWatch) -> bool + Send + Sync + 'static) {
    let d = tempfile::tempdir().unwrap();
    let (dst_port, proxy_port) = (free_port(), free_port());
    // Plaintext, so the proxy can follow the frames it cuts.
    let mut dst = receiver_plain(d.path(), "dst", dst_port);
    let (_src, src_api) = source(d.path(), "sql", "512M");
    let cut_done = proxy(proxy_port, dst_port, 0, cut);
    let out = migrate_with(
        &src_api,
        proxy_port,
        &d.path().join("r.json"),
        &["--insecure"],
    );
    assert!(
        !out.status.success(),
        "a cut connection must fail the migration"
    );
    assert!(cut_done.load(Ordering::SeqCst));
    assert_failed_cleanly(&mut dst, &src_api);
    // ...and the source migrates fine afterwards, to the same receiver.
    let out = migrate_with(
        &src_api,
        dst_port,
        &d.path().join("r2.json"),
        &["--insecure"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_report(&d.path().join("r2.json"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_connection_cut_in_copy_phase_leaves_source_running() {
    cut_test(|w| w.bytes > 20 << 20);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_connection_cut_in_sync_phase_leaves_source_running() {
    cut_test(|w| w.round_ends >= 1);
}

fn feed_receiver(name: &str, bytes: &[u8], expect: &str) {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    // Plaintext: these bytes are for the migration protocol itself, not for TLS.
    let mut dst = receiver_plain(d.path(), "dst", port);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    wait(
        Duration::from_secs(30),
        "the receiver to log the refusal",
        || dst.stderr.text().contains(expect),
    );
    assert!(
        dst.child.try_wait().unwrap().is_none(),
        "{name}: the receiver survives a bad connection"
    );
    // A real migration still gets in.
    let (_src, src_api) = source(d.path(), "idle", "128M");
    let out = migrate_with(&src_api, port, &d.path().join("r.json"), &["--insecure"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_report(&d.path().join("r.json"));
}

fn hello(version: u16) -> Vec<u8> {
    let mut h = b"LVMG".to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.push(1);
    h.push(0);
    h.extend_from_slice(&0u64.to_le_bytes());
    h
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_receiver_refuses_garbage() {
    feed_receiver(
        "kvm_receiver_refuses_garbage",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "magic",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_receiver_refuses_a_wrong_version() {
    feed_receiver(
        "kvm_receiver_refuses_a_wrong_version",
        &hello(7),
        "version 7",
    );
}

/// A hostile source announces RAM the VM does not have: the receiver refuses the frame by name
/// and goes on waiting (the populate worker never sees the extent).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_receiver_refuses_extents_beyond_guest_ram() {
    use migration::protocol::{FrameWriter, Prepare};
    let mut w = FrameWriter::new(hello(migration::protocol::VERSION));
    w.send_config(&Prepare {
        vm: vmm::VmConfig::new(64 << 20, 1),
        streams: 0,
        session: 1,
        name: None,
        origin: None,
        generation: None,
        host_cache: None,
        sections: vmm::state::sections(&vmm::VmConfig::new(64 << 20, 1)),
        disks: Vec::new(),
        postcopy: false,
    })
    .unwrap();
    w.send_extents(&[(0, 4096), (60 << 20, 1 << 30)]).unwrap();
    feed_receiver(
        "kvm_receiver_refuses_extents_beyond_guest_ram",
        w.inner(),
        "malformed Extents frame: extent [0x3c00000, 0x40000000) is empty, out of order or beyond guest RAM",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_receiver_refuses_a_truncated_stream() {
    // A valid hello and the start of a frame header, then EOF.
    let mut b = hello(migration::protocol::VERSION);
    b.extend_from_slice(&[1, 0, 0, 0, 0, 0]);
    feed_receiver(
        "kvm_receiver_refuses_a_truncated_stream",
        &b,
        "ended in the middle",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_foreign_guest_migrates_and_its_console_continues() {
    let d = tempfile::tempdir().unwrap();
    let kernel = build_foreign_kernel(d.path());
    let port = free_port();
    let _dst = receiver(d.path(), "dst", port);
    let src_api = d.path().join("src.sock");
    let _src = KillOnDrop(
        Command::new(BIN)
            .args([
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                "64M",
                "--vcpus",
                "1",
                "--api",
            ])
            .arg(&src_api)
            .arg("--console")
            .arg(d.path().join("src.console"))
            .spawn()
            .unwrap(),
    );
    wait(Duration::from_secs(30), "source API", || src_api.exists());
    let out = migrate(&src_api, port, &d.path().join("r.json"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("r.json")).unwrap()).unwrap();
    assert_eq!(r["status"], "completed");
    assert!(
        r["guest_verify"]
            .as_str()
            .unwrap()
            .starts_with("not verifiable"),
        "{r}"
    );
    // A guest that cannot verify itself is not a failed verify: n/a, and the command succeeds.
    assert_eq!(r["verification"], "not-verifiable", "{r}");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("guest verified on destination: n/a (not verifiable"),
        "{summary}"
    );
    // A foreign guest boots with zeroed RAM, as on any host: only what it touched moves.
    assert!(
        r["bytes_on_wire"].as_u64().unwrap() < 16 << 20,
        "a 64 MiB guest that touched little sent {}",
        r["bytes_on_wire"]
    );
    let lines = |f: &str| {
        std::fs::read_to_string(d.path().join(f))
            .unwrap_or_default()
            .matches("hello from a foreign PVH guest")
            .count()
    };
    let n = lines("dst.console");
    wait(
        Duration::from_secs(10),
        "the guest printing on at the destination",
        || lines("dst.console") > n.max(1),
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_bandwidth_cap_is_applied_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let _dst = receiver(d.path(), "dst", port);
    let (_src, src_api) = source(d.path(), "idle", "128M");
    let report = d.path().join("r.json");
    let out = migrate_with(&src_api, port, &report, &["--max-bandwidth", "2Gbit"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = check_report(&report);
    assert_eq!(r["max_bandwidth_gbps"], 2.0);
    // The figure itself is a benchmark matter; here only that the cap was not blown through.
    assert!(
        r["avg_gbps"].as_f64().unwrap() <= 2.0 * 1.25,
        "{}",
        r["avg_gbps"]
    );
    let bad = livemig(&[
        "migrate",
        "--api",
        src_api.to_str().unwrap(),
        "--to",
        "127.0.0.1:1",
        "--max-bandwidth",
        "lots",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a rate"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_compressed_transport_migrates_and_compresses_on_a_slow_link() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let _dst = receiver(d.path(), "dst", port);
    let (_src, src_api) = source(d.path(), "sql", "256M");
    let report = d.path().join("r.json");
    // A capped link is slower than the codecs: the adaptive policy must compress.
    let out = migrate_with(
        &src_api,
        port,
        &report,
        &["--transport", "compressed", "--max-bandwidth", "1Gbit"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = check_report(&report);
    assert_eq!(r["transport"], "compressed");
    let c = &r["compression"];
    assert!(r["pages"]["compressed"].as_u64().unwrap() > 0, "{c}");
    assert!(
        c["batches_lz4"].as_u64().unwrap() + c["batches_zstd"].as_u64().unwrap() > 0,
        "{c}"
    );
    assert!(
        c["ratio"].as_f64().unwrap() < 0.9,
        "server memory compresses: {c}"
    );
    assert!(c["codec_cpu_seconds"].as_f64().unwrap() > 0.0);
}

/// Forwards every connection to `to`; the `cut_conn`-th one accepted (0 = control) is closed,
/// both ways, as soon as `cut` says so about what the source sent on it.
fn proxy(
    listen: u16,
    to: u16,
    cut_conn: usize,
    cut: impl Fn(&FrameWatch) -> bool + Send + Sync + 'static,
) -> Arc<AtomicBool> {
    let l = TcpListener::bind(("127.0.0.1", listen)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (flag, cut) = (done.clone(), Arc::new(cut));
    std::thread::spawn(move || {
        for (n, a) in l.incoming().enumerate() {
            let Ok(mut a) = a else { break };
            let Ok(mut b) = TcpStream::connect(("127.0.0.1", to)) else {
                break;
            };
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut b2, &mut a2);
            });
            let (flag, cut) = (flag.clone(), cut.clone());
            std::thread::spawn(move || {
                let mut w = FrameWatch::default();
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let k = match a.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => k,
                    };
                    if n == cut_conn {
                        w.feed(&buf[..k]);
                        if cut(&w) {
                            flag.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                    if b.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
                let _ = a.shutdown(std::net::Shutdown::Both);
                let _ = b.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    done
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_one_page_stream_failing_aborts_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let (dst_port, proxy_port) = (free_port(), free_port());
    let mut dst = receiver_plain(d.path(), "dst", dst_port);
    let (_src, src_api) = source(d.path(), "sql", "512M");
    // Connection 2 is the second page stream; it dies 10 MiB in.
    let cut = proxy(proxy_port, dst_port, 2, |w| w.bytes > 10 << 20);
    let out = migrate_with(
        &src_api,
        proxy_port,
        &d.path().join("r.json"),
        &["--channels", "2", "--insecure"],
    );
    assert!(
        !out.status.success(),
        "a failed stream must fail the migration"
    );
    assert!(
        cut.load(Ordering::SeqCst),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dst.stderr.text()
    );
    assert_failed_cleanly(&mut dst, &src_api);
    // Two streams, each from its own local address, with compression and TLS: the whole
    // combination.
    let port2 = free_port();
    let _dst2 = receiver(d.path(), "dst2", port2);
    let out = migrate_with(
        &src_api,
        port2,
        &d.path().join("r2.json"),
        &[
            "--network",
            "127.0.0.1>127.0.0.1,127.0.0.2>127.0.0.1",
            "--transport",
            "compressed",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = check_report(&d.path().join("r2.json"));
    assert_eq!(r["transport"], "compressed");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_multichannel_migrates_under_stress() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let _dst = receiver(d.path(), "dst", port);
    let (_src, src_api) = source(d.path(), "stress", "512M");
    let out = migrate_with(
        &src_api,
        port,
        &d.path().join("r.json"),
        &["--channels", "4"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_report(&d.path().join("r.json"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_direct_transport_migrates_alone_and_over_streams() {
    let d = tempfile::tempdir().unwrap();
    for (i, extra) in [
        vec!["--transport", "direct"],
        vec!["--transport", "direct", "--channels", "2"],
    ]
    .into_iter()
    .enumerate()
    {
        let port = free_port();
        let _dst = receiver(d.path(), &format!("dst{i}"), port);
        let dir = d.path().join(format!("run{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (_src, src_api) = source(&dir, "sql", "256M");
        let report = dir.join("r.json");
        let out = migrate_with(&src_api, port, &report, &extra);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = check_report(&report);
        assert_eq!(r["transport"], "direct");
        // `sql` writes words all over its working set: its sync rounds are scattered
        // pages, which go copied in batches (and the guest verified them above).
        let synced: u64 = r["rounds"].as_array().unwrap()[1..]
            .iter()
            .map(|x| x["pages"].as_u64().unwrap())
            .sum();
        let copied = r["direct_copied_pages"].as_u64().unwrap();
        assert!(copied <= r["pages"]["normal"].as_u64().unwrap());
        if synced >= 256 {
            assert!(copied > 0, "{extra:?}: {synced} pages synced, none copied");
        }
        eprintln!("{extra:?}: {synced} pages in sync rounds, {copied} direct pages copied");
    }
}

/// The nice values of a process's vCPU threads.
fn vcpu_nice(pid: u32) -> Vec<i64> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("vcpu") {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
        // After the parenthesised name: nice is the 19th field of the line, the 17th here.
        let rest = stat.rsplit_once(')').unwrap().1;
        out.push(rest.split_whitespace().nth(16).unwrap().parse().unwrap());
    }
    out
}

/// A migration lets the vCPUs yield the CPU to it (its report says so), and they get their
/// priority back when it fails.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_vcpus_yield_to_their_migration_and_get_their_priority_back() {
    let d = tempfile::tempdir().unwrap();
    let (src, src_api) = source(d.path(), "sql", "128M");
    let pid = src.child.id();
    assert_eq!(vcpu_nice(pid), vec![0, 0]);
    // Nobody listens on the destination: the migration fails after the vCPUs yielded.
    let dead = free_port();
    let report = d.path().join("r.json");
    let out = migrate_with(&src_api, dead, &report, &[]);
    assert!(!out.status.success());
    assert_eq!(
        vcpu_nice(pid),
        vec![0, 0],
        "priority given back after a failure"
    );

    let port = free_port();
    let _dst = receiver(d.path(), "dst", port);
    let out = migrate_with(&src_api, port, &report, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = check_report(&report);
    let said = r["vcpu_yield"].as_str().unwrap();
    assert!(
        said == "vCPUs at nice 10 until the pause" || said.starts_with("not applied: "),
        "{said}"
    );
}

/// By default (hybrid), the guest that outruns the link is not throttled: once the rounds stop
/// shrinking the VM resumes on the destination and fetches what it lacks as it touches it.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_guest_that_outruns_the_link_moves_by_post_copy_unthrottled() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let dst = receiver(d.path(), "dst", port);
    let (_src, src_api) = source(d.path(), "stress", "256M");
    let report = d.path().join("r.json");
    let out = migrate_with(
        &src_api,
        port,
        &report,
        // Half of what `stress` writes even when it shares two cores with both VMMs.
        &[
            "--max-bandwidth",
            "400Mbit",
            "--no-delta",
            "--no-vcpu-yield",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = check_report(&report);
    assert_eq!(r["stop_reason"], "postcopy", "{r}");
    assert_eq!(r["throttle_pct_max"], 0, "{r}");
    let p = &r["postcopy"];
    assert!(p["owed_pages"].as_u64().unwrap() > 0, "{r}");
    assert!(
        p["faults"].as_u64().unwrap() > 0,
        "the guest ran there at once: {r}"
    );
    assert!(
        p["reason"].as_str().unwrap().contains("would not converge"),
        "{r}"
    );

    // At once (no pre-copy): every page the guest ever touched comes by demand or push.
    let port2 = free_port();
    let _back = receiver(d.path(), "back", port2);
    let report2 = d.path().join("r2.json");
    let out = migrate_with(&dst.api, port2, &report2, &["--postcopy-after", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = check_report(&report2);
    assert_eq!(r["stop_reason"], "postcopy", "{r}");
    assert_eq!(r["rounds"].as_array().unwrap().len(), 1, "no pre-copy: {r}");
    assert!(r["postcopy"]["faults"].as_u64().unwrap() > 0, "{r}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_auto_converge_throttles_a_guest_that_outruns_the_link() {
    let d = tempfile::tempdir().unwrap();
    // `stress` rewrites a working set that 400 Mbit/s never carries within a 10 ms pause:
    // rounds stop shrinking above the target and stall. At 1 Gbit/s a machine that runs the
    // guest slowly (17-23k pages written a second) converged unthrottled; where a 99%
    // throttle leaves the rounds whole, the test accepts the switchover at that throttle.
    // (Its writes change a few words a page, so as deltas it would not outrun the link.)
    let port = free_port();
    let dst = receiver(d.path(), "dst", port);
    let (_src, src_api) = source(d.path(), "stress", "256M");
    let report = d.path().join("r.json");
    let out = migrate_with(
        &src_api,
        port,
        &report,
        // The guest at full speed, so that it outruns the link.
        &[
            "--max-bandwidth",
            "400Mbit",
            "--downtime-ms",
            "10",
            "--no-delta",
            "--no-vcpu-yield",
            "--no-postcopy",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = check_report(&report);
    assert!(r["throttle_pct_max"].as_u64().unwrap() >= 20, "{r}");
    // It converged, or reached the highest throttle and switched over as it stood (how far
    // a 99% throttle shrinks a round depends on how fast this machine runs the guest).
    let stop = r["stop_reason"].as_str().unwrap();
    assert!(
        stop == "converged" || (stop == "stalled" && r["throttle_pct_max"] == 99),
        "{r}"
    );

    // Without auto-converge the same guest stalls and switches over as it stands.
    let port2 = free_port();
    let _back = receiver(d.path(), "back", port2);
    let report2 = d.path().join("r2.json");
    let out = migrate_with(
        &dst.api,
        port2,
        &report2,
        &[
            "--max-bandwidth",
            "400Mbit",
            "--downtime-ms",
            "10",
            "--no-auto-converge",
            "--no-delta",
            "--no-vcpu-yield",
            "--no-postcopy",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unthrottled = check_report(&report2);
    assert_eq!(unthrottled["throttle_pct_max"], 0, "{unthrottled}");
    assert_eq!(unthrottled["stop_reason"], "stalled", "{unthrottled}");
    // The throttle is what shrank the rounds: what the pause took is a fraction of what it
    // takes unthrottled.
    let last_round = |r: &serde_json::Value| {
        r["rounds"]
            .as_array()
            .and_then(|a| a.last())
            .and_then(|x| x["pages"].as_u64())
            .unwrap()
    };
    assert!(
        last_round(&r) * 4 < last_round(&unthrottled),
        "throttled {r}\nunthrottled {unthrottled}"
    );
}
