//! Host agents and `livemig drain` (KVM): VMs started on one agent, drained into another,
//! verified there; what does not fit stays; a migration cut mid-copy is retried; Ctrl-C
//! leaves every VM running exactly once; an agent restarted finds its VMs; a switchover whose
//! answer was lost is settled with the destination's agent.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::switchover::{redirecting_proxy, Switchover};
use common::*;
use host::child::AgentProcess;
use host::{HostClient, VmInfo};
use serde_json::Value;

fn list(a: &AgentProcess) -> Vec<VmInfo> {
    a.client().list().unwrap()
}

fn names(vms: &[VmInfo]) -> Vec<String> {
    let mut n: Vec<String> = vms.iter().map(|v| v.name.clone()).collect();
    n.sort();
    n
}

/// Every listed VM's guest keeps beating.
fn assert_all_beating(a: &AgentProcess) {
    let before = list(a);
    std::thread::sleep(Duration::from_millis(1500));
    let after = list(a);
    for v in &before {
        let now = after.iter().find(|x| x.name == v.name).unwrap();
        assert_eq!(now.state, "running", "{now:?}");
        assert!(
            now.heartbeat > v.heartbeat,
            "{} is not beating: {now:?}",
            v.name
        );
    }
}

/// A drain of one VM at a time at `rate`, in name order, in the background (its output piped).
fn slow_drain(
    a: &AgentProcess,
    b: &AgentProcess,
    report: &Path,
    rate: &str,
) -> std::process::Child {
    drain_cmd(
        a,
        b,
        report,
        &[
            "--max-bandwidth",
            rate,
            "--concurrency",
            "1",
            "--order",
            "name",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

fn run_drain(
    from: &AgentProcess,
    to: &AgentProcess,
    report: &Path,
    extra: &[&str],
) -> (bool, String, Value) {
    let out = drain_cmd(from, to, report, extra).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value =
        serde_json::from_slice(&std::fs::read(report).unwrap_or_default()).unwrap_or(Value::Null);
    (out.status.success(), text, r)
}

fn vm_entry<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in the report: {r}"))
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_drain_moves_four_vms_between_two_agents() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(d.path(), "a", &[]);
    let (b, b_listen) = agent(d.path(), "b", &[]);
    start_vms(
        &a,
        &[
            ("web1", "128M", "web"),
            ("idle1", "128M", "idle"),
            ("sql1", "256M", "sql"),
            ("web2", "192M", "web"),
        ],
    );
    // Hostile neighbours on B's migration port: garbage, and a connection that says nothing.
    let mut garbage = TcpStream::connect(&b_listen).unwrap();
    let _ = garbage.write_all(b"GET / HTTP/1.1\r\n\r\n");
    let _silent = TcpStream::connect(&b_listen).unwrap();
    let report = d.path().join("drain.json");
    let (ok, text, r) = run_drain(&a, &b, &report, &[]);
    assert!(ok, "{text}");
    let vms = r["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 4, "{r}");
    for v in vms {
        assert_eq!(v["status"], "moved", "{v}");
        assert_eq!(v["guest_verified"], true, "{v}");
        assert!(v["end_ms"].as_u64() >= v["start_ms"].as_u64(), "{v}");
        assert!(v["report"]["downtime_ms"].is_u64(), "{v}");
    }
    for field in [
        "makespan_ms",
        "downtime_ms_sum",
        "downtime_ms_max",
        "bytes_on_wire",
        "ram_moved_per_s",
        "peak_concurrency",
    ] {
        assert!(r[field].is_number(), "{field} missing: {r}");
    }
    assert!(text.contains("drained 4 of 4 VMs"), "{text}");
    assert!(list(&a).is_empty(), "the source is empty");
    let on_b = list(&b);
    assert_eq!(names(&on_b), ["idle1", "sql1", "web1", "web2"]);
    assert!(on_b.iter().all(|v| v.origin == "a"), "{on_b:?}");
    assert_all_beating(&b);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_drain_measures_the_hosts_cpu_and_learns_what_its_migrations_cost() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(d.path(), "a", &[]);
    let (b, _) = agent(d.path(), "b", &[]);
    start_vms(
        &a,
        &[
            ("sql1", "192M", "sql"),
            ("web1", "192M", "web"),
            ("stress1", "128M", "stress"),
        ],
    );
    let report = d.path().join("out.json");
    let args = ["--transport", "compressed", "--reserve-cpu", "50"];
    let (ok, text, r) = run_drain(&a, &b, &report, &args);
    assert!(ok, "{text}");
    // Both agents run on this kernel: one pool of its cores, with both hosts in it.
    let pool = &r["cpu"]["pools"][0];
    assert_eq!(pool["hosts"].as_array().map(Vec::len), Some(2), "{r}");
    for when in ["before", "during"] {
        for what in ["busy", "guests", "vmm"] {
            let x = pool[when][what].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&x), "{when}.{what} = {x}: {r}");
        }
    }
    assert!(
        pool["before"]["guests"].as_f64() > Some(0.0),
        "the guests ran: {r}"
    );
    assert!(
        pool["during"]["vmm"].as_f64() > Some(0.0),
        "the migrations ran: {r}"
    );
    assert_eq!(r["cpu"]["reserve_cpu_pct"], 50.0, "{r}");
    assert_eq!(r["cpu"]["governor"]["cap"], 0.5, "{r}");
    assert!(
        r["cpu"]["codec"].is_object(),
        "a compressed drain has the codec policy: {r}"
    );
    assert!(
        text.contains("cpu of a+b (") && text.contains("--reserve-cpu 50%"),
        "{text}"
    );
    // Nothing was learnt before this drain; both hosts have learnt it now, so the drain back
    // plans with what a compressed byte costs their cores.
    assert!(r["plan"]["cpu"].is_null(), "{r}");
    // With them, what its guests kept of their pace while they moved, which the drain back
    // plans with.
    let costs = std::fs::read(d.path().join("b").join("cpu-costs.json")).unwrap();
    let costs: Value = serde_json::from_slice(&costs).unwrap();
    let kept = costs["compressed"]["dirty_rate_ratio"]
        .as_f64()
        .unwrap_or(-1.0);
    assert!(kept > 0.0 && kept <= 1.0, "{costs}");
    // And what its migrations took besides their pages, how long its guests checked
    // themselves, and how their own CPU splits between the wire and the RAM they landed.
    let learnt = &costs["compressed"];
    let setup = learnt["setup_s"].as_f64().unwrap_or(-1.0);
    assert!(setup > 0.0 && setup < 60.0, "{costs}");
    assert!(learnt["verify_s_per_gb"].as_f64() > Some(0.0), "{costs}");
    assert!(learnt["fit"]["ww"].as_f64() > Some(0.0), "{costs}");
    for v in r["vms"].as_array().unwrap() {
        assert!(v["verify_ms"].as_u64().is_some(), "{v}");
    }
    let back = d.path().join("back.json");
    let (ok, text, r) = run_drain(&b, &a, &back, &["--transport", "compressed"]);
    assert!(ok, "{text}");
    let cost = &r["plan"]["cpu"]["cost_s_per_gb"];
    assert!(
        cost[0].as_f64() > Some(0.0) && cost[1].as_f64() > Some(0.0),
        "{r}"
    );
    assert!(
        r["plan"]["cpu"]["pool_cores"][0].as_f64() > Some(0.0),
        "{r}"
    );
    assert_eq!(r["plan"]["dirty_ratio"].as_f64(), Some(kept), "{r}");
    assert!(
        (r["plan"]["overhead_s"].as_f64().unwrap_or(0.0) - (0.1 + setup)).abs() < 1e-9,
        "{r}"
    );
    let fit = &r["plan"]["cpu"]["cost_fit_s_per_gb"];
    assert!(
        fit[0][0].as_f64() >= Some(0.0) && fit[1][1].as_f64() >= Some(0.0),
        "{r}"
    );
    assert!(
        r["plan"]["cpu"]["verify_s_per_gb"].as_f64() > Some(0.0),
        "{r}"
    );
    for v in r["vms"].as_array().unwrap() {
        assert_eq!(v["status"], "moved", "{v}");
        assert_eq!(v["guest_verified"], true, "{v}");
        assert!(v["bound"] == "link" || v["bound"] == "cpu", "{v}");
    }
    assert_eq!(names(&list(&a)), ["sql1", "stress1", "web1"]);
    assert_all_beating(&a);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_drain_sends_pages_of_one_os_image_once() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(d.path(), "a", &[]);
    let (b, _) = agent(d.path(), "b", &[]);
    let vms = [
        ("web1", "128M", "web"),
        ("idle1", "128M", "idle"),
        ("web2", "128M", "web"),
    ];
    start_vms_with(&a, &vms, &["--image", "7"]);
    let report = d.path().join("drain.json");
    let (ok, text, r) = run_drain(
        &a,
        &b,
        &report,
        &["--transport", "compressed", "--dedup-cache", "64M"],
    );
    assert!(ok, "{text}");
    assert!(r["dedup_cache_bytes"].as_u64() > Some(0), "{r}");
    let mut from_cache = 0;
    for v in r["vms"].as_array().unwrap() {
        assert_eq!(v["guest_verified"], true, "{v}");
        from_cache += v["report"]["pages"]["dedup_host"].as_u64().unwrap();
    }
    // The later VMs find (most of) their 35% OS part in the cache: 2 x 11468 pages at most.
    assert!(
        from_cache > 10_000,
        "{from_cache} pages from the cache: {r}"
    );
    assert_eq!(r["pages"]["dedup_host"].as_u64(), Some(from_cache));
    assert!(r["dedup_host_bytes_saved"].as_u64() > Some(0), "{r}");
    // The drain gave its cache back.
    assert_eq!(b.client().capacity().unwrap().caches, 0);
    assert_all_beating(&b);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_drain_leaves_what_does_not_fit_and_says_so() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(d.path(), "a", &[]);
    let (b, _) = agent(d.path(), "b", &["--vm-memory", "400M"]);
    start_vms(
        &a,
        &[
            ("s1", "128M", "idle"),
            ("s2", "128M", "web"),
            ("l1", "256M", "idle"),
            ("l2", "256M", "sql"),
        ],
    );
    let report = d.path().join("drain.json");
    let (ok, text, r) = run_drain(&a, &b, &report, &["--order", "name"]);
    assert!(!ok, "a drain that leaves VMs behind fails: {text}");
    let moved: Vec<&Value> = r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["status"] == "moved")
        .collect();
    let stayed: Vec<&Value> = r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["status"] == "no-room")
        .collect();
    assert_eq!((moved.len(), stayed.len()), (2, 2), "{r}");
    for v in &stayed {
        assert_eq!(v["attempts"], 0, "never attempted: {v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("fits on no destination"),
            "{v}"
        );
        let name = v["name"].as_str().unwrap();
        assert!(text.contains(&format!("left on a: {name}")), "{text}");
    }
    let used: u64 = list(&b).iter().map(|v| v.memory).sum();
    assert!(used <= 400 << 20, "B was overcommitted: {used}");
    assert_eq!(list(&a).len(), 2);
    assert_all_beating(&a);
    assert_all_beating(&b);
}

/// Waits until VM `name` arrives on `b` and its migration has put `bytes` on the wire; the
/// receiver's pid.
fn receiver_in_copy(a: &AgentProcess, b: &AgentProcess, name: &str, bytes: u64) -> u32 {
    let mut pid = 0;
    wait(
        Duration::from_secs(60),
        "the migration to be in its copy",
        || {
            let arriving = list(b)
                .into_iter()
                .find(|v| v.name == name && v.state == "incoming");
            let copied = a
                .client()
                .progress(name)
                .ok()
                .flatten()
                .is_some_and(|p| p.phase == "copy" && p.bytes_on_wire >= bytes);
            if let (Some(v), true) = (arriving, copied) {
                pid = v.pid;
                return true;
            }
            false
        },
    );
    pid
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_drain_retries_a_migration_cut_mid_copy() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(d.path(), "a", &[]);
    let (b, _) = agent(d.path(), "b", &[]);
    start_vms(&a, &[("db", "256M", "sql")]);
    let report = d.path().join("drain.json");
    let mut drain = drain_cmd(
        &a,
        &b,
        &report,
        &["--max-bandwidth", "300Mbit", "--concurrency", "1"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let pid = receiver_in_copy(&a, &b, "db", 8 << 20);
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let mut text = String::new();
    let _ = drain.stderr.take().unwrap().read_to_string(&mut text);
    assert!(drain.wait().unwrap().success(), "{text}");
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let v = vm_entry(&r, "db");
    assert_eq!(v["status"], "moved", "{v}");
    assert_eq!(v["attempts"], 2, "{v}");
    assert_eq!(v["guest_verified"], true, "{v}");
    assert_eq!(v["earlier_errors"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(text.contains("will retry"), "{text}");
    assert!(list(&a).is_empty());
    assert_eq!(names(&list(&b)), ["db"]);
}

/// A VM whose process is killed while it migrates: the drain reports it `failed`, as its
/// agent lists it, with why; the other VM moves.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_drain_reports_a_vm_whose_process_died_as_its_agent_does() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(d.path(), "a", &[]);
    let (b, _) = agent(d.path(), "b", &[]);
    start_vms(&a, &[("doomed", "256M", "sql"), ("fine", "128M", "idle")]);
    let report = d.path().join("drain.json");
    let mut drain = slow_drain(&a, &b, &report, "300Mbit");
    receiver_in_copy(&a, &b, "doomed", 8 << 20);
    let pid = list(&a).iter().find(|v| v.name == "doomed").unwrap().pid;
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let mut text = String::new();
    let _ = drain.stderr.take().unwrap().read_to_string(&mut text);
    assert!(!drain.wait().unwrap().success(), "{text}");
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let v = vm_entry(&r, "doomed");
    let on_a = list(&a);
    let listed = on_a.iter().find(|v| v.name == "doomed").unwrap();
    assert_eq!(listed.state, "failed", "{listed:?}");
    assert_eq!(
        v["status"],
        "failed",
        "the drain says what its agent says: {}\n{}",
        v["error"],
        a.stderr.text()
    );
    assert_eq!(v["attempts"], 1, "a dead VM is not retried: {v}");
    assert!(v["error"].as_str().unwrap().contains("process died"), "{v}");
    assert_eq!(vm_entry(&r, "fine")["status"], "moved", "{r}");
    assert!(!names(&list(&b)).contains(&"doomed".to_string()));
}

/// `--dry-run` plans with the budget the drain would run under: at 4 Mbit/s the ETA is what
/// 4 Mbit/s carries, not what the links do.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_drain_dry_run_plans_within_the_bandwidth_budget() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(d.path(), "a", &[]);
    let (b, _) = agent(d.path(), "b", &[]);
    start_vms(&a, &[("v1", "128M", "web"), ("v2", "128M", "idle")]);
    let eta = |extra: &[&str]| {
        let report = d.path().join("plan.json");
        let mut args = vec!["--dry-run"];
        args.extend_from_slice(extra);
        let (ok, text, r) = run_drain(&a, &b, &report, &args);
        assert!(ok, "{text}");
        let bytes = r["plan"]["wire_bytes_predicted"].as_f64().unwrap();
        (r["plan"]["eta_s"].as_f64().unwrap(), bytes)
    };
    let (free, _) = eta(&[]);
    let (capped, bytes) = eta(&["--max-bandwidth", "4Mbit"]);
    let floor = bytes * 8.0 / 4e6;
    println!("ETA {free:.1} s unbudgeted, {capped:.1} s at 4 Mbit/s ({bytes:.0} bytes: {floor:.1} s at 4 Mbit/s)");
    assert!(
        capped >= floor * 0.9,
        "{capped} s for {bytes} bytes at 4 Mbit/s"
    );
    assert!(capped > 10.0 * free, "{capped} vs {free}");
    assert_eq!(list(&a).len(), 2, "a dry run moves nothing");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_drain_interrupted_leaves_every_vm_running_exactly_once() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(d.path(), "a", &[]);
    let (b, _) = agent(d.path(), "b", &[]);
    let vms = [
        ("v1", "192M", "sql"),
        ("v2", "128M", "web"),
        ("v3", "128M", "idle"),
    ];
    start_vms(&a, &vms);
    let report = d.path().join("drain.json");
    let mut drain = slow_drain(&a, &b, &report, "200Mbit");
    receiver_in_copy(&a, &b, "v1", 4 << 20);
    let t = Instant::now();
    Command::new("kill")
        .args(["-INT", &drain.id().to_string()])
        .status()
        .unwrap();
    let mut text = String::new();
    let _ = drain.stderr.take().unwrap().read_to_string(&mut text);
    let st = drain.wait().unwrap();
    assert!(!st.success(), "an interrupted drain fails: {text}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["interrupted"], true, "{r}");
    assert_eq!(vm_entry(&r, "v1")["status"], "cancelled", "{r}");
    assert_eq!(vm_entry(&r, "v3")["status"], "cancelled", "{r}");
    // Every VM runs exactly once, here or there; the cancelled arrival is gone from B.
    wait(
        Duration::from_secs(15),
        "B to clear the cancelled arrival",
        || list(&b).iter().all(|v| v.state != "incoming"),
    );
    let mut everywhere = names(&list(&a));
    everywhere.extend(names(&list(&b)));
    everywhere.sort();
    assert_eq!(everywhere, ["v1", "v2", "v3"]);
    assert_all_beating(&a);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_agent_refuses_a_source_outside_the_cluster() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(d.path(), "a", &[]);
    let (b, listen_b) = agent(d.path(), "b", &[]);
    start_vms(&a, &[("vm", "128M", "idle")]);
    let api = list(&a)[0].api.display().to_string();
    let foreign = d.path().join("foreign");
    let out = livemig(&[
        "tls",
        "init",
        "--host",
        "intruder",
        "--out",
        foreign.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let f = |n: &str| foreign.join(n).display().to_string();
    let (cert, key, ca) = (f("intruder.pem"), f("intruder.key"), f("ca.pem"));
    // Another CA's certificate, then plaintext: both refused before any VM state.
    for extra in [
        vec!["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca],
        vec!["--insecure"],
    ] {
        let mut args = vec!["migrate", "--api", &api, "--to", &listen_b];
        args.extend(extra);
        let out = livemig(&args);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("TLS"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(list(&b).is_empty(), "nothing reached the agent");
    }
    assert_all_beating(&a);
    // The cluster's own credentials go through.
    let out = livemig(&["migrate", "--api", &api, "--to", &listen_b]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = Instant::now();
    while !list(&b).iter().any(|v| v.state == "running") {
        assert!(t0.elapsed() < Duration::from_secs(20), "b: {:?}", list(&b));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A link probe through the agent's API: two streams measure, and both ends say how their
/// threads spent it; more streams than a probe may run, or none, are refused with a 400 that
/// says so, and the agent goes on serving.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_agent_probe_takes_two_streams_and_refuses_too_many() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(d.path(), "a", &[]);
    let (_b, listen_b) = agent(d.path(), "b", &[]);
    let client = HostClient::new(&a.sock).waiting(Duration::from_secs(30));
    let paths = || vec![(None, listen_b.clone())];
    let two = client.probe(paths(), 300, 2).unwrap();
    assert!(two.bits_per_s > 0.0, "{}", two.bits_per_s);
    for share in [two.sender_runnable, two.receiver_runnable] {
        assert!(share.is_some_and(|s| (0.0..=1.0).contains(&s)), "{two:?}");
    }
    for streams in [0, 5] {
        let e = client.probe(paths(), 300, streams).unwrap_err().to_string();
        assert!(e.contains("400") && e.contains("probe streams"), "{e}");
    }
    assert!(list(&a).is_empty());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_agent_survives_a_dead_vm_and_finds_its_vms_after_a_restart() {
    let d = tempfile::tempdir().unwrap();
    let l = livemig_exe();
    let (mut a, listen) = agent_with(&l, d.path(), "a", &[]);
    start_vms(&a, &[("keep", "128M", "idle"), ("doomed", "128M", "web")]);
    let doomed = list(&a).into_iter().find(|v| v.name == "doomed").unwrap();
    Command::new("kill")
        .args(["-9", &doomed.pid.to_string()])
        .status()
        .unwrap();
    wait(
        Duration::from_secs(10),
        "the dead VM to be reported failed",
        || {
            list(&a)
                .iter()
                .any(|v| v.name == "doomed" && v.state == "failed")
        },
    );
    assert!(list(&a)
        .iter()
        .find(|v| v.name == "doomed")
        .unwrap()
        .error
        .is_some());
    // The agent dies; its VMs do not. A new agent on the same directory finds them.
    a.kill_agent();
    assert!(
        HostClient::new(&a.sock).list().is_err(),
        "the old agent is gone"
    );
    let again = l
        .host_serve(None, &listen, &a.dir, &["--name", "a"])
        .unwrap();
    let found = list(&again);
    assert_eq!(names(&found), ["doomed", "keep"]);
    let k = found.iter().find(|v| v.name == "keep").unwrap();
    assert_eq!(k.state, "running", "{k:?}");
    assert!(k.heartbeat >= 1);
    assert_eq!(
        found.iter().find(|v| v.name == "doomed").unwrap().state,
        "failed"
    );
    // It still runs and stops them.
    let out = livemig(&[
        "host",
        "stop",
        "--host",
        again.sock.to_str().unwrap(),
        "keep",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(names(&list(&again)), ["doomed"]);
    // The first handle's drop must not kill what the second agent runs: forget its VMs.
    std::mem::forget(a);
}

/// One VM drained through a proxy that breaks its switchover as `mode` says.
fn lost_switchover(
    mode: Switchover,
) -> (tempfile::TempDir, AgentProcess, AgentProcess, Value, String) {
    let d = tempfile::tempdir().unwrap();
    // Plaintext, so the proxy can read the frames.
    let plain = Livemig::new(BIN).insecure();
    let (a, _) = agent_with(&plain, d.path(), "a", &[]);
    let (b, b_listen) = agent_with(&plain, d.path(), "b", &[]);
    start_vms(&a, &[("db", "128M", "sql")]);
    let agent_port: u16 = b_listen.rsplit_once(':').unwrap().1.parse().unwrap();
    let proxy = redirecting_proxy(agent_port, b.sock.clone(), mode);
    let report = d.path().join("drain.json");
    let address = format!("127.0.0.1:{proxy}");
    let (ok, text, r) = run_drain(
        &a,
        &b,
        &report,
        &[
            "--address",
            &address,
            "--peer-timeout",
            "3s",
            "--retries",
            "0",
            "--probe-ms",
            "0",
            // The proxies pass the control connection alone: no post-copy connections.
            "--no-postcopy",
        ],
    );
    let _ = ok;
    (d, a, b, r, text)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_drain_settles_a_lost_confirm_with_the_destination() {
    let (_d, a, b, r, text) = lost_switchover(Switchover::LoseConfirm);
    let v = vm_entry(&r, "db");
    assert_eq!(v["status"], "moved", "{text}");
    assert!(v["error"].as_str().unwrap().contains("confirmed it"), "{v}");
    assert_eq!(v["guest_verified"], true, "{v}");
    assert!(list(&a).is_empty(), "the stale copy on the source is gone");
    assert_eq!(names(&list(&b)), ["db"]);
    assert_all_beating(&b);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_drain_resumes_a_vm_the_destination_proves_never_ran() {
    let (d, a, b, r, text) = lost_switchover(Switchover::KillAtState);
    let v = vm_entry(&r, "db");
    assert_eq!(v["status"], "failed", "{text}");
    let err = v["error"].as_str().unwrap();
    assert!(
        err.contains("outcome unknown") && err.contains("never ran there"),
        "{err}"
    );
    assert!(list(&b).is_empty(), "nothing of it on the destination");
    assert_eq!(names(&list(&a)), ["db"]);
    assert_all_beating(&a);
    // A drain over the real address moves it.
    let (ok, text, _) = run_drain(&a, &b, &d.path().join("again.json"), &["--probe-ms", "0"]);
    assert!(ok, "{text}");
    assert!(list(&a).is_empty());
    assert_eq!(names(&list(&b)), ["db"]);
}

/// `GET /metrics` from an agent's metrics address.
fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_agents_count_their_migrations_for_prometheus() {
    let d = tempfile::tempdir().unwrap();
    let (ma, mb) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let (a, _) = agent(d.path(), "a", &["--metrics", &ma]);
    let (_b, b_listen) = agent(d.path(), "b", &["--metrics", &mb]);
    start_vms(&a, &[("db", "128M", "sql")]);
    assert!(scrape(&ma).contains("livemig_vms{state=\"running\"} 1"));
    let r = a
        .client()
        .waiting(Duration::from_secs(120))
        .migrate(
            "db",
            &migration::MigrateRequest {
                to: b_listen,
                ..Default::default()
            },
        )
        .unwrap();
    let out = scrape(&ma);
    assert!(
        out.contains("livemig_migrations_total{direction=\"out\",outcome=\"completed\"} 1"),
        "{out}"
    );
    assert!(
        out.contains("livemig_migration_downtime_seconds_count 1"),
        "{out}"
    );
    assert!(
        out.contains("livemig_migration_duration_seconds_count 1"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "livemig_migration_wire_bytes_total {}",
            r.bytes_on_wire
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "livemig_migration_pages_total{{encoding=\"normal\"}} {}",
            r.pages.normal
        )),
        "{out}"
    );
    assert!(!out.contains("livemig_vms{state=\"running\"} 1"), "{out}");
    wait(Duration::from_secs(10), "b to count the arrival", || {
        scrape(&mb).contains("livemig_migrations_total{direction=\"in\",outcome=\"completed\"} 1")
    });
    assert!(scrape(&mb).contains("livemig_vms{state=\"running\"} 1"));
    // Anything but GET /metrics is turned away.
    let mut s = TcpStream::connect(&ma).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
}
