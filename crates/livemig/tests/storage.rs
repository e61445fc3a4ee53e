//! Shared-nothing migration (`--storage copy`) end to end through the `livemig` binary: the
//! disk moves with its VM between hosts whose disk directories are apart, holes stay holes,
//! a guest that writes faster than the link converges by the mirror, and a destination killed
//! in the bulk copy, in the mirror or at switchover, or a link blackholed in the bulk copy,
//! leaves the source running on its complete image, no copy behind once a receiver uses the
//! directory again, and a retry that succeeds. Says SKIPPED without /dev/kvm (and root, for
//! the blackholed link).
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::{
    disk_state, free_port, image_locked, kill_at_switchover, livemig, livemig_exe, migrate_to,
    status, verified_with_disk, wait, wait_progress, Hosts, Livemig, VmProcess, BIN,
};

const WORKLOAD: &str = "idle,disk=40,disk_blocks=256";
const MIB: u64 = 1 << 20;

/// A 64 MiB image with `data` MiB of data at 16 MiB (the guest writes its first MiB); the
/// rest is holes.
fn image(dir: &Path, data: u64) -> PathBuf {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(64 * MIB).unwrap();
    let block: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8 + 1).collect();
    for i in 0..data {
        f.write_all_at(&block, (16 + i) * MIB).unwrap();
    }
    p
}

/// Bytes the file has allocated.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// The files in `dir`, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// [`common::disk_vm`], once its guest has written its disk.
fn disk_vm(exe: &Livemig, ns: Option<&str>, dir: &Path, img: &Path, workload: &str) -> VmProcess {
    let vm = common::disk_vm(exe, ns, dir, img, workload);
    wait(Duration::from_secs(30), "disk writes", || {
        disk_state(&vm.api).1 > 5
    });
    vm
}

/// A receiver that writes the disks it is brought into `disks`.
fn receiver(
    exe: &Livemig,
    ns: Option<&str>,
    dir: &Path,
    name: &str,
    listen: &str,
    disks: &Path,
) -> VmProcess {
    std::fs::create_dir_all(disks).unwrap();
    exe.clone()
        .with_disk_dir(Some(disks))
        .receive(
            ns,
            listen,
            &dir.join(format!("{name}.sock")),
            &dir.join(format!("{name}.console")),
            None,
        )
        .unwrap()
}

fn local(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The VM moves A→B→A with `--storage copy --remove-source`: its stamped writes verify after
/// each move, the VM that runs holds the copy's lock, the copy is as sparse as the image, the
/// source's image is gone and no marker is left.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_disk_moves_with_its_vm_between_hosts_that_share_no_storage() {
    let d = tempfile::tempdir().unwrap();
    let exe = livemig_exe();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let img = image(&a, 4);
    let src_alloc = allocated(&img);
    let mut vm = disk_vm(&exe, None, d.path(), &img, WORKLOAD);
    let mut acked = 0;
    for hop in 0..2 {
        let (from, to) = if hop == 0 { (&a, &b) } else { (&b, &a) };
        let port = free_port();
        let next = receiver(&exe, None, d.path(), &format!("h{hop}"), &local(port), to);
        let path = d.path().join(format!("hop{hop}.json"));
        let out = migrate_to(
            &vm.api,
            &local(port),
            &[
                "--storage",
                "copy",
                "--remove-source",
                "--report",
                path.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "hop {hop}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = verified_with_disk(&path);
        assert_eq!(r["storage"], "copy");
        let disk = &r["disks"][0];
        let (bulk, alloc, dirtied) = (
            disk["bulk_bytes"].as_u64().unwrap(),
            disk["allocated_bytes"].as_u64().unwrap(),
            disk["dirtied_bytes"].as_u64().unwrap(),
        );
        assert!(
            bulk <= alloc + dirtied + MIB,
            "hop {hop}: holes are not sent: {disk}"
        );
        assert!(
            bulk < 16 * MIB,
            "hop {hop}: 64 MiB image, ~5 MiB of data: {disk}"
        );
        assert!(r["disk_bytes"].as_u64().unwrap() >= bulk);
        assert!(
            vm.child.wait().unwrap().success(),
            "hop {hop}: the source ends"
        );
        vm = next;
        wait(Duration::from_secs(30), "the moved VM's status", || {
            status(&vm.api).is_some()
        });
        let copy = to.join("disk.img");
        let st = status(&vm.api).unwrap();
        assert_eq!(st["devices"][0]["path"], copy.display().to_string(), "{st}");
        let (locked, now) = disk_state(&vm.api);
        assert!(
            locked && image_locked(&copy),
            "hop {hop}: the VM holds its copy"
        );
        assert!(now >= acked, "hop {hop}: acknowledged writes carried over");
        acked = now;
        assert!(
            !from.join("disk.img").exists(),
            "hop {hop}: --remove-source"
        );
        assert_eq!(files(to), vec!["disk.img"], "hop {hop}: no marker left");
        assert!(
            allocated(&copy) <= src_alloc + 2 * MIB,
            "hop {hop}: the copy is sparse: {} of {src_alloc}",
            allocated(&copy)
        );
    }
    wait(
        Duration::from_secs(30),
        "disk writes after the moves",
        || disk_state(&vm.api).1 > acked,
    );
}

/// A VM whose guest writes 2,000 disk blocks a second to an image with `data` MiB of data
/// moves with `--storage copy` and `extra` to a receiver; the migration must succeed (a failure names its cause: what the
/// migration said, and its report if it wrote one). Its stdout, and its report, which says
/// the guest verified its memory and disk on the destination.
fn busy_disk_vm_moves(data: u64, extra: &[&str]) -> (String, serde_json::Value) {
    let d = tempfile::tempdir().unwrap();
    let exe = livemig_exe();
    let img = image(&d.path().join("a"), data);
    let vm = disk_vm(
        &exe,
        None,
        d.path(),
        &img,
        "idle,disk=2000,disk_blocks=4096",
    );
    let port = free_port();
    let _next = receiver(&exe, None, d.path(), "b", &local(port), &d.path().join("b"));
    let path = d.path().join("r.json");
    let mut args = vec!["--storage", "copy", "--report", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = migrate_to(&vm.api, &local(port), &args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&path).unwrap_or_default()
    );
    (stdout, verified_with_disk(&path))
}

/// A guest that writes its disk faster than the capped link carries: the policy mirrors its
/// writes, the migration converges and verifies, and the report says how long writes were
/// held. Its vCPU keeps its priority (`--no-vcpu-yield`): on a busy host a yielding guest
/// wrote too slowly to outrun even this link.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_guest_writing_faster_than_the_link_converges_by_the_mirror() {
    let (stdout, r) = busy_disk_vm_moves(2, &["--max-bandwidth", "16Mbit", "--no-vcpu-yield"]);
    let disk = &r["disks"][0];
    assert_eq!(disk["sync"], "mirror", "{disk}");
    assert!(disk["stalled_writes"].as_u64().unwrap() > 0, "{disk}");
    assert!(r["write_stall_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(stdout.contains("held by the mirror"), "{stdout}");
}

/// A VM with a copied disk moves by post-copy: the disk's last blocks, taken at the pause,
/// reach the destination between the pages named ahead and the rest, and the guest verifies
/// its memory and its disk there. The bulk copy is long enough (16 MiB at 200 Mbit/s) for
/// the guest to write behind it even where its vCPU gets little CPU.
#[test]
#[cfg_attr(
    any(no_kvm, no_root),
    ignore = "needs /dev/kvm and root (userfaultfd for kernel faults)"
)]
fn root_a_disk_vm_moves_by_post_copy_with_its_last_blocks() {
    let (_, r) = busy_disk_vm_moves(16, &["--postcopy-after", "0", "--max-bandwidth", "200Mbit"]);
    assert_eq!(r["stop_reason"], "postcopy", "{r}");
    assert!(r["disks"][0]["dirtied_bytes"].as_u64() > Some(0), "{r}");
}

/// After a migration that failed: the source runs on its complete image and holds it, its
/// guest writes on; the next receiver on `disks` takes the retry, which verifies, and leaves
/// nothing but the copy in `disks`.
fn source_keeps_its_disk_and_a_retry_succeeds(
    exe: &Livemig,
    d: &Path,
    vm: VmProcess,
    img: &Path,
    disks: &Path,
    extra: &[&str],
) {
    let mut vm = vm;
    let st = status(&vm.api).unwrap();
    if st["state"] == "paused" {
        let r = livemig(&["resume", "--api", vm.api.to_str().unwrap()]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    let (locked, acked) = disk_state(&vm.api);
    assert!(locked && image_locked(img), "the source holds its image");
    wait(
        Duration::from_secs(30),
        "the source's disk writes go on",
        || disk_state(&vm.api).1 > acked,
    );
    let port = free_port();
    let next = receiver(exe, None, d, "retry", &local(port), disks);
    let path = d.join("retry.json");
    let mut args = vec!["--storage", "copy", "--report", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = migrate_to(&vm.api, &local(port), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    verified_with_disk(&path);
    vm.child.wait().unwrap();
    assert!(disk_state(&next.api).0);
    assert_eq!(files(disks), vec!["disk.img"], "only the retry's copy");
    assert!(
        img.exists(),
        "without --remove-source the source's image stays"
    );
}

/// The destination is killed while `phase` runs (after `bytes` on the wire): the migration
/// fails, the killed receiver's copy is marked incomplete, and the retry goes through.
fn destination_killed_in(phase: &str, bytes: u64, extra: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let exe = livemig_exe();
    let img = image(&d.path().join("a"), 16);
    let vm = disk_vm(&exe, None, d.path(), &img, WORKLOAD);
    let disks = d.path().join("b");
    let port = free_port();
    let mut dst = receiver(&exe, None, d.path(), "dst", &local(port), &disks);
    let api = vm.api.clone();
    let mut args: Vec<String> = ["--storage", "copy", "--max-bandwidth", "24Mbit"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let to = local(port);
    let run = std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        migrate_to(&api, &to, &a)
    });
    wait_progress(&vm.api, phase, bytes);
    dst.child.kill().unwrap();
    dst.child.wait().unwrap();
    let out = run.join().unwrap();
    assert!(!out.status.success(), "the migration fails");
    assert!(
        files(&disks).contains(&"disk.img.livemig-incomplete".to_string()),
        "the killed receiver's copy is marked: {:?}",
        files(&disks)
    );
    source_keeps_its_disk_and_a_retry_succeeds(&exe, d.path(), vm, &img, &disks, extra);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_destination_killed_in_the_bulk_copy() {
    destination_killed_in("disks", 2 * MIB, &[]);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_destination_killed_in_the_mirror() {
    destination_killed_in("copy", 2 * MIB, &["--disk-sync", "mirror"]);
}

/// The destination dies when the paused source sends its state: the source either resumed
/// (the last frame had not left) or waits paused for the operator; either way it runs on its
/// image again, and the retry succeeds.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_destination_killed_at_switchover() {
    let d = tempfile::tempdir().unwrap();
    let plain = Livemig::new(BIN).insecure();
    let img = image(&d.path().join("a"), 4);
    let vm = disk_vm(&plain, None, d.path(), &img, WORKLOAD);
    let disks = d.path().join("b");
    let (port, proxy) = (free_port(), free_port());
    let mut dst = receiver(&plain, None, d.path(), "dst", &local(port), &disks);
    kill_at_switchover(proxy, port, dst.child.id());
    let out = livemig(&[
        "migrate",
        "--insecure",
        "--storage",
        "copy",
        "--api",
        vm.api.to_str().unwrap(),
        "--to",
        &local(proxy),
    ]);
    assert!(!out.status.success(), "the migration fails");
    dst.child.wait().unwrap();
    source_keeps_its_disk_and_a_retry_succeeds(&plain, d.path(), vm, &img, &disks, &["--insecure"]);
}

/// The link between the hosts is blackholed in the bulk copy: the source notices within its
/// peer timeout and runs on; the destination's receiver, alive, gives up too and removes its
/// copy at once; the retry over the other link succeeds.
#[test]
#[cfg_attr(
    any(no_kvm, no_root),
    ignore = "needs /dev/kvm and root (network namespaces)"
)]
fn root_link_blackholed_in_the_bulk_copy() {
    let d = tempfile::tempdir().unwrap();
    let h = Hosts::up("lmsbh");
    let exe = livemig_exe();
    let disks = d.path().join("b");
    let dst = receiver(
        &exe,
        Some(&h.ns("b")),
        d.path(),
        "dst",
        "0.0.0.0:7400",
        &disks,
    );
    let img = image(&d.path().join("a"), 16);
    let mut vm = disk_vm(&exe, Some(&h.ns("a")), d.path(), &img, WORKLOAD);
    let api = vm.api.clone();
    let first = std::thread::spawn(move || {
        migrate_to(
            &api,
            "10.77.1.2:7400",
            &[
                "--storage",
                "copy",
                "--max-bandwidth",
                "24Mbit",
                "--peer-timeout",
                "3s",
            ],
        )
    });
    wait_progress(&vm.api, "disks", 2 * MIB);
    h.link("1g-1", false);
    let down = Instant::now();
    let out = first.join().unwrap();
    let took = down.elapsed();
    assert!(!out.status.success());
    assert!(
        took < Duration::from_secs(6),
        "noticed after {took:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (locked, acked) = disk_state(&vm.api);
    assert!(locked && image_locked(&img), "the source holds its image");
    wait(
        Duration::from_secs(15),
        "the destination to drop its copy",
        || files(&disks).is_empty(),
    );
    let path = d.path().join("retry.json");
    let out = migrate_to(
        &vm.api,
        "10.77.2.2:7400",
        &["--storage", "copy", "--report", path.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    verified_with_disk(&path);
    assert!(report(&path)["disks"][0]["bulk_bytes"].as_u64().unwrap() > 0);
    vm.child.wait().unwrap();
    assert_eq!(files(&disks), vec!["disk.img"]);
    assert!(disk_state(&dst.api).1 >= acked);
    h.link("1g-1", true);
}

/// A drain from a host whose disks the other cannot open: without `--storage copy` it
/// refuses the VMs and says why; with it, their disks go along into the destination's disk
/// directory, the plan counts them, and every VM verifies its memory and disk there.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_drain_copies_the_disks_the_destination_cannot_reach() {
    let d = tempfile::tempdir().unwrap();
    let (a_disks, b_disks) = (d.path().join("a-disks"), d.path().join("b-disks"));
    std::fs::create_dir_all(&b_disks).unwrap();
    let a_storage = format!("--storage={}", a_disks.display());
    let b_disk_dir = format!("--disk-dir={}", b_disks.display());
    let (a, _) = common::agent(d.path(), "a", &[&a_storage]);
    let (b, _) = common::agent(d.path(), "b", &[&b_disk_dir]);
    let imgs: Vec<PathBuf> = (0..2)
        .map(|i| {
            let dir = a_disks.join(format!("vm{i}"));
            let p = image(&dir, 2);
            let to = a_disks.join(format!("vm{i}.img"));
            std::fs::rename(&p, &to).unwrap();
            to
        })
        .collect();
    for (i, img) in imgs.iter().enumerate() {
        let disk = format!("path={}", img.display());
        common::start_vms_with(
            &a,
            &[(&format!("vm{i}"), "128M", WORKLOAD)],
            &["--disk", &disk],
        );
    }
    let dry = d.path().join("dry.json");
    let out = common::drain_cmd(&a, &b, &dry, &["--dry-run"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--storage copy would copy it"),
        "a drain that may not copy says why: {text}"
    );
    let path = d.path().join("drain.json");
    let out = common::drain_cmd(&a, &b, &path, &["--storage", "copy"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&path);
    for v in r["vms"].as_array().unwrap() {
        assert_eq!(v["status"], "moved", "{v}");
        assert_eq!(v["guest_verified"], true, "{v}");
        assert!(v["disks_copied"].as_u64().unwrap() >= 2 * MIB, "{v}");
        assert_eq!(v["report"]["storage"], "copy", "{v}");
        assert!(
            v["report"]["guest_verify"]
                .to_string()
                .contains("disk blocks="),
            "{v}"
        );
    }
    assert_eq!(files(&b_disks), vec!["vm0.img", "vm1.img"]);
}
