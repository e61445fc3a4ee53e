//! The migration channel under fault and attack, through the `livemig` binary: one migration
//! per VM, cancel, a client that dies, peers outside the cluster, garbage and slow-loris
//! connections, a VM too big for the host, a receiver killed in each phase, links blackholed
//! (root, network namespaces). For each: the migration fails within the peer timeout (plus a
//! margin), the source keeps running, a retry migrates and verifies, and no VM ever runs on two
//! hosts. KVM tests say SKIPPED without /dev/kvm; namespace tests without root.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{
    free_port, livemig, livemig_exe, progress, status, tls_env, wait, wait_progress, Hosts,
    Livemig, VmProcess, BIN,
};

fn vm_args(workload: &str, memory: &str, console: &Path) -> Vec<String> {
    [
        "--memory",
        memory,
        "--vcpus",
        "2",
        "--workload",
        workload,
        "--console",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([console.display().to_string()])
    .collect()
}

/// A source VM (`livemig run`) in namespace `ns`, its guest beating.
fn source_in(
    exe: &Livemig,
    ns: Option<&str>,
    dir: &Path,
    workload: &str,
    memory: &str,
) -> VmProcess {
    let args = vm_args(workload, memory, &dir.join("src.console"));
    let mut vm = exe.run(ns, &args, &dir.join("src.sock"), None).unwrap();
    vm.wait_heartbeat(2, Duration::from_secs(30)).unwrap();
    vm
}

fn source(dir: &Path, workload: &str, memory: &str) -> VmProcess {
    source_in(&livemig_exe(), None, dir, workload, memory)
}

fn receiver(dir: &Path, name: &str, listen: &str) -> VmProcess {
    receiver_in(&livemig_exe(), None, dir, name, listen)
}

fn receiver_in(exe: &Livemig, ns: Option<&str>, dir: &Path, name: &str, listen: &str) -> VmProcess {
    exe.receive(
        ns,
        listen,
        &dir.join(format!("{name}.sock")),
        &dir.join(format!("{name}.console")),
        None,
    )
    .unwrap()
}

fn heartbeat(api: &Path) -> u64 {
    status(api).map_or(0, |s| s["heartbeat"].as_u64().unwrap_or(0))
}

/// The source VM still runs here: running, and its guest's heartbeat rising.
fn assert_runs(api: &Path) {
    let st = status(api).expect("the source answers");
    assert_eq!(st["state"], "running", "{st}");
    let hb = st["heartbeat"].as_u64().unwrap();
    wait(
        Duration::from_secs(5),
        "the source's heartbeat rising",
        || heartbeat(api) > hb,
    );
}

fn migrate_args<'a>(
    api: &'a Path,
    to: &'a str,
    report: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "migrate",
        "--api",
        api.to_str().unwrap(),
        "--to",
        to,
        "--report",
        report.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    a
}

fn migrate(api: &Path, to: &str, report: &Path, extra: &[&str]) -> Output {
    livemig(&migrate_args(api, to, report, extra))
}

/// `livemig migrate` in the background.
fn migrate_spawn(api: &Path, to: &str, report: &Path, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(migrate_args(api, to, report, extra))
        .envs(tls_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn output(c: Child) -> (bool, String) {
    let o = c.wait_with_output().unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn assert_verified(ok: bool, text: &str, report: &Path) {
    assert!(ok, "{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    assert_eq!(r["status"], "completed");
    assert_eq!(r["guest_verified"], true, "{r}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_second_migrate_is_refused_and_the_first_completes() {
    let d = tempfile::tempdir().unwrap();
    let to = format!("127.0.0.1:{}", free_port());
    let _dst = receiver(d.path(), "dst", &to);
    let src = source(d.path(), "sql", "256M");
    let first = migrate_spawn(
        &src.api,
        &to,
        &d.path().join("r1.json"),
        &["--max-bandwidth", "300Mbit"],
    );
    wait_progress(&src.api, "copy", 1 << 20);
    let second = migrate(&src.api, &to, &d.path().join("r2.json"), &[]);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("already under way") && err.contains("409"),
        "{err}"
    );
    let (ok, text) = output(first);
    assert_verified(ok, &text, &d.path().join("r1.json"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_cancelled_migration_leaves_the_vm_running_and_it_migrates_after() {
    let d = tempfile::tempdir().unwrap();
    let to = format!("127.0.0.1:{}", free_port());
    let dst = receiver(d.path(), "dst", &to);
    let src = source(d.path(), "sql", "256M");
    let first = migrate_spawn(
        &src.api,
        &to,
        &d.path().join("r1.json"),
        &["--max-bandwidth", "200Mbit"],
    );
    wait_progress(&src.api, "copy", 1 << 20);
    let c = livemig(&["migrate", "--cancel", "--api", src.api.to_str().unwrap()]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let (ok, text) = output(first);
    assert!(!ok && text.contains("cancelled"), "{text}");
    assert_runs(&src.api);
    wait(
        Duration::from_secs(10),
        "the destination to drop its half",
        || dst.stderr.text().contains("failed"),
    );
    // Nothing under way any more: a cancel now says so, and the next migration goes through.
    let none = livemig(&["migrate", "--cancel", "--api", src.api.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&none.stderr).contains("no migration"));
    let out = migrate(&src.api, &to, &d.path().join("r2.json"), &[]);
    assert_verified(
        out.status.success(),
        &String::from_utf8_lossy(&out.stderr),
        &d.path().join("r2.json"),
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_migrate_client_killed_mid_copy_cancels_within_its_lease() {
    let d = tempfile::tempdir().unwrap();
    let to = format!("127.0.0.1:{}", free_port());
    let _dst = receiver(d.path(), "dst", &to);
    let src = source(d.path(), "sql", "256M");
    let mut client = migrate_spawn(
        &src.api,
        &to,
        &d.path().join("r1.json"),
        &["--max-bandwidth", "100Mbit"],
    );
    wait_progress(&src.api, "copy", 1 << 20);
    client.kill().unwrap();
    let _ = client.wait();
    let killed = Instant::now();
    // The lease is 3 s; the migration is off well within the peer timeout after that.
    wait(
        Duration::from_secs(10),
        "the orphaned migration to be cancelled",
        || {
            livemig(&["migrate", "--cancel", "--api", src.api.to_str().unwrap()])
                .stderr
                .starts_with(b"livemig: DELETE /vm/migration was refused: no migration")
        },
    );
    assert!(
        killed.elapsed() < Duration::from_secs(9),
        "{:?}",
        killed.elapsed()
    );
    assert_runs(&src.api);
    let out = migrate(&src.api, &to, &d.path().join("r2.json"), &[]);
    assert_verified(
        out.status.success(),
        &String::from_utf8_lossy(&out.stderr),
        &d.path().join("r2.json"),
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_source_outside_the_cluster_is_refused_by_the_receiver() {
    let d = tempfile::tempdir().unwrap();
    let foreign = d.path().join("foreign");
    let out = Command::new(BIN)
        .args(["tls", "init", "--host", "intruder", "--out"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(out.status.success());
    let to = format!("127.0.0.1:{}", free_port());
    let dst = receiver(d.path(), "dst", &to);
    let src = source(d.path(), "idle", "128M");
    let f = |n: &str| foreign.join(n).display().to_string();
    let (cert, key, ca) = (f("intruder.pem"), f("intruder.key"), f("ca.pem"));
    let report = d.path().join("r.json");
    // A certificate from another CA: refused on both sides, before any VM state.
    let out = migrate(
        &src.api,
        &to,
        &report,
        &["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS"), "{err}");
    wait(
        Duration::from_secs(10),
        "the receiver to log the refusal",
        || dst.stderr.text().contains("TLS"),
    );
    // Plaintext: refused too.
    let out = migrate(&src.api, &to, &report, &["--insecure"]);
    assert!(!out.status.success());
    assert_runs(&src.api);
    assert!(status(&dst.api).is_none(), "no VM reached the receiver");
    // With the cluster's credentials it goes through.
    let out = migrate(&src.api, &to, &report, &[]);
    assert_verified(
        out.status.success(),
        &String::from_utf8_lossy(&out.stderr),
        &report,
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_garbage_and_slow_loris_connections_do_not_keep_a_real_migration_out() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let to = format!("127.0.0.1:{port}");
    let dst = receiver(d.path(), "dst", &to);
    let mut garbage = TcpStream::connect(&to).unwrap();
    let _ = garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    // A byte a second, for as long as it is let.
    let loris = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if s.write_all(&[0x16]).is_err() {
                return t.elapsed();
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        t.elapsed()
    });
    let src = source(d.path(), "sql", "256M");
    let report = d.path().join("r.json");
    let out = migrate(&src.api, &to, &report, &[]);
    assert_verified(
        out.status.success(),
        &String::from_utf8_lossy(&out.stderr),
        &report,
    );
    let held = loris.join().unwrap();
    assert!(
        held < Duration::from_secs(12),
        "the slow connection was cut after {held:?}"
    );
    let log = dst.stderr.text();
    assert!(log.contains("refused a connection"), "{log}");
    let mut sink = Vec::new();
    let _ = garbage.read_to_end(&mut sink);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_vm_that_does_not_fit_is_refused_before_anything_is_allocated() {
    let d = tempfile::tempdir().unwrap();
    let to = format!("127.0.0.1:{}", free_port());
    let dst = receiver(d.path(), "dst", &to);
    // More than this host has; untouched RAM costs the source nothing.
    let too_big = format!("{}G", ram::host::mem_available().unwrap() / (1 << 30) + 8);
    let mut args = vm_args("idle", &too_big, &d.path().join("src.console"));
    args.extend(["--memory-profile".into(), "zero".into()]);
    let mut src = livemig_exe()
        .run(None, &args, &d.path().join("src.sock"), None)
        .unwrap();
    src.wait_heartbeat(2, Duration::from_secs(30)).unwrap();
    let out = migrate(&src.api, &to, &d.path().join("r.json"), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not fit"), "{err}");
    assert_runs(&src.api);
    let rss = std::fs::read_to_string(format!("/proc/{}/status", dst.child.id())).unwrap();
    let kib: u64 = rss
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        kib < 200 << 10,
        "the receiver holds {kib} KiB after refusing"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_api_socket_is_private_and_bad_requests_get_a_4xx() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path(), "idle", "128M");
    let mode = std::fs::metadata(&src.api).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let ask = |req: &[u8]| {
        let mut s = UnixStream::connect(&src.api).unwrap();
        s.write_all(req).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(ask(b"NONSENSE\r\n\r\n").starts_with("HTTP/1.1 400"));
    let big = format!(
        "POST /vm/migrate HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        64 << 20
    );
    assert!(ask(big.as_bytes()).starts_with("HTTP/1.1 413"));
    assert!(
        ask(b"POST /vm/migrate HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope")
            .starts_with("HTTP/1.1 400")
    );
    assert!(ask(b"PUT /vm HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert_runs(&src.api);
    // --api never replaces what is not a stale socket.
    let file = d.path().join("precious");
    std::fs::write(&file, "data").unwrap();
    let out = Command::new(BIN)
        .args([
            "run",
            "--memory",
            "64M",
            "--workload",
            "idle",
            "--console",
            "/dev/null",
            "--api",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
}

/// Kills the receiver once the migration on `src` reached `phase`; the source fails at once
/// (the connection resets), keeps running, and migrates to a new receiver.
fn receiver_killed_in(phase: &str) {
    let d = tempfile::tempdir().unwrap();
    let to = format!("127.0.0.1:{}", free_port());
    let mut dst = receiver(d.path(), "dst", &to);
    let src = source(d.path(), "sql", "256M");
    let at = if phase == "copy" { 4 << 20 } else { 0 };
    let report = d.path().join("r1.json");
    // Whole pages in the sync rounds: as deltas they pass too fast to catch.
    let first = migrate_spawn(
        &src.api,
        &to,
        &report,
        &["--max-bandwidth", "200Mbit", "--no-delta"],
    );
    wait_progress(&src.api, phase, at);
    dst.child.kill().unwrap();
    let killed = Instant::now();
    let (ok, text) = output(first);
    assert!(!ok, "{text}");
    assert!(
        killed.elapsed() < Duration::from_secs(7),
        "failed after {:?}: {text}",
        killed.elapsed()
    );
    assert_runs(&src.api);
    let to2 = format!("127.0.0.1:{}", free_port());
    let _dst2 = receiver(d.path(), "dst2", &to2);
    let out = migrate(&src.api, &to2, &d.path().join("r2.json"), &[]);
    assert_verified(
        out.status.success(),
        &String::from_utf8_lossy(&out.stderr),
        &d.path().join("r2.json"),
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_receiver_killed_in_copy() {
    receiver_killed_in("copy");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_receiver_killed_in_sync() {
    receiver_killed_in("sync");
}

/// A proxy that forwards the source's control connection until the State frame, then holds
/// it and kills the receiver: the source has sent its last frame and hears nothing back.
fn switchover_killer(listen: u16, to: u16, receiver_pid: u32) {
    let l = TcpListener::bind(("127.0.0.1", listen)).unwrap();
    std::thread::spawn(move || {
        let Ok((mut a, _)) = l.accept() else { return };
        let mut b = TcpStream::connect(("127.0.0.1", to)).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
        });
        // Hello (16 bytes), then 24-byte frame headers with their payload lengths.
        let mut hello = [0u8; 16];
        a.read_exact(&mut hello).unwrap();
        b.write_all(&hello).unwrap();
        loop {
            let mut h = [0u8; 24];
            if a.read_exact(&mut h).is_err() {
                return;
            }
            if h[0] == 5 {
                // State: the VM is paused on the source and its last frames are on their way.
                let _ = Command::new("kill")
                    .args(["-9", &receiver_pid.to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(30));
                return;
            }
            let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
            let mut p = vec![0u8; len];
            if a.read_exact(&mut p).is_err() || b.write_all(&h).is_err() || b.write_all(&p).is_err()
            {
                return;
            }
        }
    });
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_receiver_killed_at_switchover_leaves_the_vm_paused_and_nowhere_else() {
    let d = tempfile::tempdir().unwrap();
    let (port, proxy) = (free_port(), free_port());
    let plain = Livemig::new(BIN).insecure();
    let dst = receiver_in(&plain, None, d.path(), "dst", &format!("127.0.0.1:{port}"));
    let src = source(d.path(), "sql", "256M");
    switchover_killer(proxy, port, dst.child.id());
    let t = Instant::now();
    let out = migrate(
        &src.api,
        &format!("127.0.0.1:{proxy}"),
        &d.path().join("r1.json"),
        // The proxy forwards the control connection alone: no post-copy connections.
        &["--insecure", "--peer-timeout", "3s", "--no-postcopy"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Past the point of no return, nobody can prove the destination did not resume it: the
    // VM stays paused here rather than risk running twice.
    assert!(err.contains("outcome unknown"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(60));
    let st = status(&src.api).unwrap();
    assert_eq!(st["state"], "paused", "{st}");
    assert!(
        status(&dst.api).is_none(),
        "the destination runs nothing (it is gone)"
    );
    // The operator, knowing the destination is gone, resumes it; it then migrates.
    assert!(livemig(&["resume", "--api", src.api.to_str().unwrap()])
        .status
        .success());
    assert_runs(&src.api);
    let to2 = format!("127.0.0.1:{}", free_port());
    let _dst2 = receiver(d.path(), "dst2", &to2);
    let out = migrate(&src.api, &to2, &d.path().join("r2.json"), &[]);
    assert_verified(
        out.status.success(),
        &String::from_utf8_lossy(&out.stderr),
        &d.path().join("r2.json"),
    );
}

/// Blackholes the 1g-1 link once the migration is in `phase`: the source notices within the
/// peer timeout (+2 s), keeps running, and migrates over 1g-2.
fn blackholed_in(hosts: &str, phase: &str) {
    let d = tempfile::tempdir().unwrap();
    let h = Hosts::up(hosts);
    let exe = livemig_exe();
    let dst = receiver_in(&exe, Some(&h.ns("b")), d.path(), "dst", "0.0.0.0:7400");
    let src = source_in(&exe, Some(&h.ns("a")), d.path(), "sql", "256M");
    let report = d.path().join("r1.json");
    let first = migrate_spawn(
        &src.api,
        "10.77.1.2:7400",
        &report,
        // Whole pages in the sync rounds: as deltas they pass too fast to catch.
        &["--peer-timeout", "3s", "--no-delta"],
    );
    wait_progress(&src.api, phase, if phase == "copy" { 4 << 20 } else { 0 });
    h.link("1g-1", false);
    let down = Instant::now();
    let (ok, text) = output(first);
    let took = down.elapsed();
    assert!(!ok, "{text}");
    assert!(
        took < Duration::from_secs(5),
        "noticed after {took:?}: {text}"
    );
    assert!(
        text.contains("timed out after 3 s"),
        "after {took:?}: {text}\nsource: {}",
        src.stderr.text()
    );
    assert_runs(&src.api);
    wait(
        Duration::from_secs(15),
        "the destination to drop its half",
        || dst.stderr.text().contains("failed"),
    );
    // Over the other link, to the same receiver.
    let out = migrate(&src.api, "10.77.2.2:7400", &d.path().join("r2.json"), &[]);
    assert_verified(
        out.status.success(),
        &String::from_utf8_lossy(&out.stderr),
        &d.path().join("r2.json"),
    );
    h.link("1g-1", true);
}

#[test]
#[cfg_attr(
    any(no_kvm, no_root),
    ignore = "needs /dev/kvm and root (network namespaces)"
)]
fn root_link_blackholed_in_copy() {
    blackholed_in("lmbhc", "copy");
}

#[test]
#[cfg_attr(
    any(no_kvm, no_root),
    ignore = "needs /dev/kvm and root (network namespaces)"
)]
fn root_link_blackholed_in_sync() {
    blackholed_in("lmbhs", "sync");
}

/// Starts a post-copy migration at once of a 256 MiB `sql` VM over a 100 Mbit/s cap (the push
/// takes seconds), to a receiver; returns once the VM runs on the receiver and the push is
/// under way: the source directory, the receiver, the source, the `migrate` client and its
/// report path.
fn in_post_copy() -> (
    tempfile::TempDir,
    VmProcess,
    VmProcess,
    Child,
    std::path::PathBuf,
) {
    let d = tempfile::tempdir().unwrap();
    let to = format!("127.0.0.1:{}", free_port());
    let dst = receiver(d.path(), "dst", &to);
    let src = source(d.path(), "sql", "256M");
    let report = d.path().join("r1.json");
    let first = migrate_spawn(
        &src.api,
        &to,
        &report,
        &["--postcopy-after", "0", "--max-bandwidth", "100Mbit"],
    );
    wait_progress(&src.api, "postcopy", 0);
    (d, dst, src, first, report)
}

/// The destination dies while the VM runs there without all its memory: the source cannot
/// resume it (the destination ran it, and wrote what the source never saw), so it says the VM
/// is lost, exits non-zero within the peer timeout and keeps it paused. No host runs it.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_destination_killed_in_post_copy_the_source_reports_the_vm_lost() {
    let (_d, mut dst, src, first, _report) = in_post_copy();
    dst.child.kill().unwrap();
    let killed = Instant::now();
    let (ok, text) = output(first);
    assert!(!ok, "{text}");
    assert!(text.contains("the VM is lost"), "{text}");
    assert!(
        killed.elapsed() < Duration::from_secs(8),
        "failed after {:?}: {text}",
        killed.elapsed()
    );
    let st = status(&src.api).expect("the source answers");
    assert_eq!(st["state"], "paused", "never resumed here: {st}");
    let p = progress(&src.api).expect("the migration's end");
    assert_eq!(p.phase, "lost", "{p:?}");
    assert!(status(&dst.api).is_none(), "the destination is gone");
}

/// The source dies during post-copy: the destination, which runs the VM, cannot get the pages
/// it lacks; it says the VM is lost and its receiver exits non-zero. No host runs it.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_source_killed_in_post_copy_the_destination_reports_the_vm_lost() {
    let (_d, mut dst, mut src, first, _report) = in_post_copy();
    src.child.kill().unwrap();
    let _ = output(first);
    let killed = Instant::now();
    let code = loop {
        if let Some(s) = dst.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(90),
            "the destination still runs a VM whose memory is gone"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!code.success());
    let err = dst.stderr.wait_closed(Duration::from_secs(5));
    assert!(err.contains("the VM is lost"), "{err}");
}

/// The testbed `name` up, a receiver in its host B on 0.0.0.0:7400, and a 256 MiB `sql` VM
/// in its host A: the hosts, the receiver, the source.
fn testbed_pair(name: &str, dir: &Path) -> (Hosts, VmProcess, VmProcess) {
    let h = Hosts::up(name);
    let exe = livemig_exe();
    let dst = receiver_in(&exe, Some(&h.ns("b")), dir, "dst", "0.0.0.0:7400");
    let src = source_in(&exe, Some(&h.ns("a")), dir, "sql", "256M");
    (h, dst, src)
}

/// `src`'s migration to that receiver over 1g-1, by post-copy at once (100 Mbit/s, 2 s peer
/// timeout), once its push is under way.
fn post_copy_over_1g1(src: &VmProcess, report: &Path) -> Child {
    let first = migrate_spawn(
        &src.api,
        "10.77.1.2:7400",
        report,
        &[
            "--postcopy-after",
            "0",
            "--max-bandwidth",
            "100Mbit",
            "--peer-timeout",
            "2s",
        ],
    );
    wait_progress(&src.api, "postcopy", 0);
    first
}

/// Post-copy's link blackholed while the VM runs on the destination without all its memory,
/// then back within the recovery window (`--peer-timeout` × 6): the source pauses post-copy
/// (the destination's faulting vCPUs wait), makes the link again once it is back, and the
/// migration ends verified, the VM on the destination alone.
#[test]
#[cfg_attr(
    any(no_kvm, no_root),
    ignore = "needs /dev/kvm and root (network namespaces)"
)]
fn root_link_blackholed_in_post_copy_the_migration_resumes_when_it_is_back() {
    let d = tempfile::tempdir().unwrap();
    let (h, dst, src) = testbed_pair("lmbhp", d.path());
    let report = d.path().join("r1.json");
    let first = post_copy_over_1g1(&src, &report);
    h.link("1g-1", false);
    let down = Instant::now();
    wait(
        Duration::from_secs(15),
        "the source to pause post-copy",
        || progress(&src.api).is_some_and(|p| p.phase == "postcopy-paused"),
    );
    let noticed = down.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    h.link("1g-1", true);
    let (ok, text) = output(first);
    assert_verified(ok, &text, &report);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    eprintln!(
        "blackholed; noticed after {noticed:?}; total {} ms; post-copy {}",
        r["total_ms"], r["postcopy"]
    );
    assert!(
        r["postcopy"]["recoveries"].as_u64().unwrap_or(0) >= 1,
        "noticed after {noticed:?}: {}",
        r["postcopy"]
    );
    // Its receiver hands the VM to its API once the source has closed the link.
    wait(Duration::from_secs(10), "the destination to run it", || {
        status(&dst.api).is_some_and(|s| s["state"] == "running")
    });
    assert!(
        status(&src.api).is_none_or(|s| s["state"] != "running"),
        "the source does not run it"
    );
}

/// Post-copy's link blackholed for good: the operator resumes it over the other network with
/// `migrate --resume --to`, and the migration ends verified there.
#[test]
#[cfg_attr(
    any(no_kvm, no_root),
    ignore = "needs /dev/kvm and root (network namespaces)"
)]
fn root_post_copy_resumed_by_the_operator_over_another_link_ends_verified() {
    let d = tempfile::tempdir().unwrap();
    let (h, dst, src) = testbed_pair("lmbhr", d.path());
    let api = src.api.to_str().unwrap();
    // Nothing to resume yet.
    let early = livemig(&["migrate", "--api", api, "--resume"]);
    assert!(!early.status.success());
    let report = d.path().join("r1.json");
    let first = post_copy_over_1g1(&src, &report);
    let running = livemig(&["migrate", "--api", api, "--resume"]);
    assert!(!running.status.success(), "post-copy is not paused yet");
    assert!(
        String::from_utf8_lossy(&running.stderr).contains("not paused"),
        "{}",
        String::from_utf8_lossy(&running.stderr)
    );
    h.link("1g-1", false);
    wait(
        Duration::from_secs(15),
        "the source to pause post-copy",
        || progress(&src.api).is_some_and(|p| p.phase == "postcopy-paused"),
    );
    let resumed = livemig(&[
        "migrate",
        "--api",
        api,
        "--resume",
        "--to",
        "10.77.2.2:7400",
    ]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let (ok, text) = output(first);
    assert_verified(ok, &text, &report);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(
        r["postcopy"]["recoveries"].as_u64().unwrap_or(0) >= 1,
        "{}",
        r["postcopy"]
    );
    wait(Duration::from_secs(10), "the destination to run it", || {
        status(&dst.api).is_some_and(|s| s["state"] == "running")
    });
    h.link("1g-1", true);
}
