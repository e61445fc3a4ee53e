//! A VM with a disk, end to end through the `livemig` binary: its stamped writes survive
//! migrations back and forth, its image lock follows it and never has two holders, and a
//! cancelled migration or a destination killed at switchover leaves the source running with
//! its lock. Says SKIPPED without /dev/kvm.
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;
use common::{
    disk_state, free_port, image_locked, kill_at_switchover, livemig, livemig_exe, migrate_to,
    status, verified_with_disk, wait, Livemig, VmProcess, BIN,
};

const WORKLOAD: &str = "idle,disk=40,disk_blocks=256";

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    p
}

fn disk_vm(exe: &Livemig, dir: &Path, img: &Path) -> VmProcess {
    common::disk_vm(exe, None, dir, img, WORKLOAD)
}

/// A receiver that takes disks from `dir` (its --storage).
fn receiver(exe: &Livemig, dir: &Path, name: &str, port: u16) -> VmProcess {
    exe.clone()
        .with_storage(&[dir.to_path_buf()])
        .receive(
            None,
            &format!("127.0.0.1:{port}"),
            &dir.join(format!("{name}.sock")),
            &dir.join(format!("{name}.console")),
            None,
        )
        .unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_disk_vm_moves_back_and_forth_with_its_writes_and_its_lock() {
    let d = tempfile::tempdir().unwrap();
    let exe = livemig_exe();
    let img = image(d.path());
    let mut vm = disk_vm(&exe, d.path(), &img);
    wait(Duration::from_secs(30), "disk writes", || {
        disk_state(&vm.api).1 > 10
    });
    let mut acked = 0;
    for hop in 0..6 {
        let host = if hop % 2 == 0 { "b" } else { "a" };
        let port = free_port();
        let next = receiver(&exe, d.path(), &format!("{host}{hop}"), port);
        let report = d.path().join(format!("hop{hop}.json"));
        let out = migrate_to(
            &vm.api,
            &format!("127.0.0.1:{port}"),
            &["--report", report.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "hop {hop}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        verified_with_disk(&report);
        let left = vm.child.wait().unwrap();
        assert!(left.success(), "hop {hop}: the source ends after the move");
        vm = next;
        wait(Duration::from_secs(30), "the moved VM's status", || {
            status(&vm.api).is_some()
        });
        let (locked, now) = disk_state(&vm.api);
        assert!(locked, "hop {hop}: the VM that runs holds its disk");
        assert!(image_locked(&img), "hop {hop}: the image is locked");
        assert!(now >= acked, "hop {hop}: acknowledged writes carried over");
        acked = now;
    }
    wait(Duration::from_secs(30), "disk writes after 6 moves", || {
        disk_state(&vm.api).1 > acked
    });
}

/// A migration the operator cancels in its copy phase: the source keeps running and keeps
/// its disk; the next attempt moves both.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_cancelled_migration_leaves_the_disk_with_the_source() {
    let d = tempfile::tempdir().unwrap();
    let exe = livemig_exe();
    let img = image(d.path());
    let mut vm = disk_vm(&exe, d.path(), &img);
    let port = free_port();
    let _dst = receiver(&exe, d.path(), "dst", port);
    let to = format!("127.0.0.1:{port}");
    let api = vm.api.clone();
    let slow = std::thread::spawn(move || migrate_to(&api, &to, &["--max-bandwidth", "8Mbit"]));
    // At 8 Mbit/s the copy takes tens of seconds: cancel it while it runs.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!slow.is_finished(), "the migration is still copying");
    let out = livemig(&["migrate", "--api", vm.api.to_str().unwrap(), "--cancel"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = slow.join().unwrap();
    assert!(!out.status.success(), "the cancelled migration fails");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cancelled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (locked, acked) = disk_state(&vm.api);
    assert!(locked && image_locked(&img));
    wait(Duration::from_secs(30), "disk writes go on", || {
        disk_state(&vm.api).1 > acked
    });
    let port = free_port();
    let next = receiver(&exe, d.path(), "retry", port);
    let report = d.path().join("retry.json");
    let out = migrate_to(
        &vm.api,
        &format!("127.0.0.1:{port}"),
        &["--report", report.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    verified_with_disk(&report);
    vm.child.wait().unwrap();
    assert!(disk_state(&next.api).0);
}

/// The destination dies at switchover, after the source handed its disk over: the source
/// does not run on its own (the outcome is not known to it), the operator resumes it, and
/// it runs holding its disk again; the next attempt succeeds.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_destination_killed_at_switchover_gives_the_disk_back() {
    let d = tempfile::tempdir().unwrap();
    let plain = Livemig::new(BIN).insecure();
    let img = image(d.path());
    let mut vm = disk_vm(&plain, d.path(), &img);
    let (port, proxy) = (free_port(), free_port());
    let mut dst = receiver(&plain, d.path(), "dst", port);
    kill_at_switchover(proxy, port, dst.child.id());
    let out = livemig(&[
        "migrate",
        "--insecure",
        "--api",
        vm.api.to_str().unwrap(),
        "--to",
        &format!("127.0.0.1:{proxy}"),
    ]);
    assert!(!out.status.success(), "the migration fails");
    dst.child.wait().unwrap();
    let st = status(&vm.api).unwrap();
    if st["state"] == "paused" {
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("switchover outcome unknown"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!image_locked(&img), "the disk was handed over");
        let r = livemig(&["resume", "--api", vm.api.to_str().unwrap()]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    let (locked, acked) = disk_state(&vm.api);
    assert!(
        locked && image_locked(&img),
        "the source holds its disk again"
    );
    wait(Duration::from_secs(30), "disk writes go on", || {
        disk_state(&vm.api).1 > acked
    });
    let port = free_port();
    let next = receiver(&plain, d.path(), "retry", port);
    let report = d.path().join("retry.json");
    let out = livemig(&[
        "migrate",
        "--insecure",
        "--api",
        vm.api.to_str().unwrap(),
        "--to",
        &format!("127.0.0.1:{port}"),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    verified_with_disk(&report);
    vm.child.wait().unwrap();
    assert!(disk_state(&next.api).0);
}

/// A second VM on an image another VM runs with is refused, by name.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_second_vm_on_a_locked_image_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    let _vm = disk_vm(&livemig_exe(), d.path(), &img);
    let out = std::process::Command::new(BIN)
        .args(["run", "--memory", "64M", "--vcpus", "1", "--disk"])
        .arg(format!("path={}", img.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is locked by another process (another VM has this disk open)"),
        "{err}"
    );
}

/// The acceptance run: a VM with a disk and a NIC on the testbed's VM network moves from
/// host A to B and back 20 times while the client sends it UDP echo requests: every move
/// verified with its disk, the echo stream answering again after each, the image locked by
/// the VM that runs.
#[test]
#[cfg_attr(
    any(no_kvm, no_root),
    ignore = "needs /dev/kvm and root (network namespaces)"
)]
fn root_a_vm_with_a_disk_and_a_nic_moves_between_hosts_20_times() {
    use bench::echo::EchoClient;
    use bench::testbed::{vm_addr, VM_BRIDGE};
    let h = common::Hosts::up("lmpp");
    let d = tempfile::tempdir().unwrap();
    let exe = livemig_exe()
        .with_net(Some(VM_BRIDGE), 5)
        .with_storage(&[d.path().to_path_buf()]);
    let img = image(d.path());
    let ip = vm_addr(0);
    let args: Vec<String> = [
        "--memory",
        "128M",
        "--vcpus",
        "1",
        "--workload",
        &format!("{WORKLOAD},ip={ip}/24"),
        "--disk",
        &format!("path={}", img.display()),
        "--net",
        "tap=lmppvm0",
        "--console",
        &d.path().join("src.console").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = exe
        .run(Some(&h.ns("a")), &args, &d.path().join("src.sock"), None)
        .unwrap();
    let client = EchoClient::start(&h.ns("client"), format!("{ip}:7").parse().unwrap(), 200);
    wait(Duration::from_secs(30), "the guest answering", || {
        client.last_reply_ms().is_some()
    });
    let mut acked = 0;
    for hop in 0..40 {
        let (side, addr) = if hop % 2 == 0 {
            ("b", "10.77.1.2")
        } else {
            ("a", "10.77.1.1")
        };
        let to = format!("{addr}:{}", free_port());
        let next = exe
            .receive(
                Some(&h.ns(side)),
                &to,
                &d.path().join(format!("{side}{hop}.sock")),
                &d.path().join(format!("{side}{hop}.console")),
                None,
            )
            .unwrap();
        let report = d.path().join(format!("hop{hop}.json"));
        let moved_at = client.now_ms();
        let started = std::time::Instant::now();
        let out = migrate_to(&vm.api, &to, &["--report", report.to_str().unwrap()]);
        let migrated = started.elapsed();
        assert!(
            out.status.success(),
            "hop {hop}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = verified_with_disk(&report);
        assert!(vm.child.wait().unwrap().success());
        vm = next;
        wait(
            Duration::from_secs(10),
            &format!("hop {hop}: the echo stream answering again"),
            || client.last_reply_ms().is_some_and(|t| t > moved_at),
        );
        eprintln!(
            "hop {hop}: migrate {} ms (total_ms {}, downtime_ms {}), echo again after {} ms",
            migrated.as_millis(),
            r["total_ms"],
            r["downtime_ms"],
            started.elapsed().as_millis()
        );
        let (locked, now) = disk_state(&vm.api);
        assert!(
            locked && image_locked(&img),
            "hop {hop}: the VM that runs holds its disk"
        );
        assert!(now >= acked, "hop {hop}: acknowledged writes carried over");
        acked = now;
    }
    let record = client.finish().unwrap();
    eprintln!(
        "40 moves: {} echo requests, {} lost, longest silence {:.1} ms",
        record.sent,
        record.lost(),
        record.longest_gap_ms()
    );
    assert!(record.received > 0);
}

/// `livemig drain` empties a host of six VMs with disks and NICs into another whose agent
/// has the VM bridge: every VM moves, verified with its disk, each answering its clients on
/// the destination; a host without the bridge is refused before anything moves.
#[test]
#[cfg_attr(
    any(no_kvm, no_root),
    ignore = "needs /dev/kvm and root (network namespaces)"
)]
fn root_drain_moves_six_vms_with_disks_and_nics() {
    use bench::echo::EchoClient;
    use bench::testbed::{vm_addr, VM_BRIDGE};
    let h = common::Hosts::up("lmdr");
    let d = tempfile::tempdir().unwrap();
    let storage = d.path().display().to_string();
    let agent = |name: &str, side: &str, addr: &str, bridge: bool| {
        let mut args = vec!["--name", name, "--storage", &storage];
        if bridge {
            args.extend(["--bridge", VM_BRIDGE]);
        }
        livemig_exe()
            .host_serve(
                Some(&h.ns(side)),
                &format!("{addr}:{}", free_port()),
                &d.path().join(name),
                &args,
            )
            .unwrap()
    };
    let a = agent("a", "a", "10.77.1.1", true);
    let b = agent("b", "b", "10.77.1.2", true);
    let names: Vec<String> = (0..6).map(|i| format!("vm{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let img = d.path().join(format!("{name}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let out = livemig(&[
            "host",
            "run",
            "--host",
            a.sock.to_str().unwrap(),
            "--name",
            name,
            "--memory",
            "128M",
            "--vcpus",
            "1",
            "--workload",
            &format!("idle,disk=20,disk_blocks=128,ip={}/24", vm_addr(i as u8)),
            "--disk",
            &format!("path={}", img.display()),
            "--net",
            &format!("tap=lmdr{name}"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let clients: Vec<EchoClient> = (0..6)
        .map(|i| {
            EchoClient::start(
                &h.ns("client"),
                format!("{}:7", vm_addr(i)).parse().unwrap(),
                50,
            )
        })
        .collect();
    wait(Duration::from_secs(60), "every guest answering", || {
        clients.iter().all(|c| c.last_reply_ms().is_some())
    });

    // A third host with room but no VM bridge takes none of them.
    let c = agent("c", "b", "10.77.1.2", false);
    let report = d.path().join("refused.json");
    let out = common::drain_cmd(&a, &c, &report, &["--dry-run"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("has no VM bridge for its NICs"), "{text}");
    drop(c);

    let report = d.path().join("drain.json");
    let out = common::drain_cmd(&a, &b, &report, &[]).output().unwrap();
    let drained_at: Vec<f64> = clients.iter().map(EchoClient::now_ms).collect();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let vms = r["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 6, "{r}");
    for v in vms {
        assert_eq!(v["status"], "moved", "{v}");
        assert_eq!(v["guest_verified"], true, "{v}");
        let detail = v["report"]["guest_verify"].to_string();
        assert!(detail.contains("disk blocks="), "{v}");
    }
    assert!(a.client().list().unwrap().is_empty(), "the source is empty");
    let on_b = b.client().list().unwrap();
    assert_eq!(on_b.len(), 6);
    for v in &on_b {
        assert_eq!(v.nics, 1, "{v:?}");
        assert_eq!(v.disks.len(), 1, "{v:?}");
    }
    for (i, c) in clients.iter().enumerate() {
        wait(
            Duration::from_secs(20),
            &format!("vm{i} answering from B"),
            || c.last_reply_ms().is_some_and(|t| t > drained_at[i] + 1.0),
        );
    }
    for (i, c) in clients.into_iter().enumerate() {
        let rec = c.finish().unwrap();
        eprintln!(
            "vm{i}: {} echo requests, {} lost, longest silence {:.1} ms",
            rec.sent,
            rec.lost(),
            rec.longest_gap_ms()
        );
    }
}

/// A destination opens an arriving VM's disks only under its --storage: one without it, or
/// with another directory, refuses the VM before the source stops, and the source runs on
/// holding its disk.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_destination_refuses_disks_outside_its_storage() {
    let d = tempfile::tempdir().unwrap();
    let exe = livemig_exe();
    let img = image(d.path());
    let vm = disk_vm(&exe, d.path(), &img);
    let other = tempfile::tempdir().unwrap();
    for (name, storage, says) in [
        ("none", None, "takes no arriving disks"),
        (
            "other",
            Some(other.path()),
            "is outside this host's storage",
        ),
    ] {
        let port = free_port();
        let exe = match storage {
            Some(dir) => exe.clone().with_storage(&[dir.to_path_buf()]),
            None => exe.clone(),
        };
        let mut dst = exe
            .receive(
                None,
                &format!("127.0.0.1:{port}"),
                &d.path().join(format!("{name}.sock")),
                &d.path().join(format!("{name}.console")),
                None,
            )
            .unwrap();
        let out = migrate_to(&vm.api, &format!("127.0.0.1:{port}"), &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{name}: {err}");
        let _ = dst.child.kill();
        let _ = dst.child.wait();
        let (locked, _) = disk_state(&vm.api);
        assert!(
            locked && image_locked(&img),
            "{name}: the source keeps its disk"
        );
        assert_eq!(status(&vm.api).unwrap()["state"], "running", "{name}");
    }
}
