//! The cluster on etcd, through the `livemig` binary and a real 3-member etcd cluster each
//! test starts on loopback (ignored, with the reason, where etcd is not installed;
//! scripts/setup.sh installs etcd-server): agents join and stay live under their leases, a killed agent turns
//! unreachable within its lease and live again when it restarts, the settings are checked and
//! shown with their source, and a migration between member agents takes them.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::switchover::{redirecting_proxy, Switchover};
use common::{free_port, livemig, livemig_exe, wait, Livemig, BIN};
use host::child::AgentProcess;

/// A 3-member etcd cluster on loopback, killed when dropped.
struct Etcd {
    members: Vec<Child>,
    urls: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).unwrap();
                Command::new("etcd")
                    .args(["--name", &format!("m{i}"), "--data-dir"])
                    .arg(dir.path().join(format!("m{i}")))
                    .args([
                        "--listen-client-urls",
                        &format!("http://127.0.0.1:{client}"),
                        "--advertise-client-urls",
                        &format!("http://127.0.0.1:{client}"),
                        "--listen-peer-urls",
                        &format!("http://127.0.0.1:{peer}"),
                        "--initial-advertise-peer-urls",
                        &format!("http://127.0.0.1:{peer}"),
                        "--initial-cluster",
                        &initial.join(","),
                        "--initial-cluster-state",
                        "new",
                        "--initial-cluster-token",
                        &format!("livemig-test-{}", std::process::id()),
                    ])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap()
            })
            .collect();
        let urls = ports
            .iter()
            .map(|(c, _)| format!("http://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",");
        let e = Etcd {
            members,
            urls,
            _dir: dir,
        };
        wait(Duration::from_secs(30), "etcd to elect a leader", || {
            cluster(&e, &["status", "--json"]).status.success()
        });
        e
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

/// `livemig cluster ARGS --cluster URLS`.
fn cluster(e: &Etcd, args: &[&str]) -> std::process::Output {
    let mut a = vec!["cluster"];
    let (sub, rest) = args.split_at(if args.first() == Some(&"config") {
        2
    } else {
        1
    });
    a.extend_from_slice(sub);
    a.extend_from_slice(&["--cluster", &e.urls]);
    a.extend_from_slice(rest);
    livemig(&a)
}

fn status(e: &Etcd) -> serde_json::Value {
    let out = cluster(e, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The state the cluster gives host `name`, if it knows it.
fn state_of(e: &Etcd, name: &str) -> Option<String> {
    status(e)["hosts"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
        .map(|h| h["state"].as_str().unwrap_or("").to_string())
}

/// A host agent named `name` in the cluster, its state in `dir`.
fn agent(e: &Etcd, dir: &Path, name: &str) -> (AgentProcess, u16) {
    agent_as(&livemig_exe(), e, dir, name)
}

/// [`agent`] started from `l`.
fn agent_as(l: &Livemig, e: &Etcd, dir: &Path, name: &str) -> (AgentProcess, u16) {
    agent_with_args(l, e, dir, name, &[])
}

/// [`agent_as`] with more `host serve` arguments.
fn agent_with_args(
    l: &Livemig,
    e: &Etcd,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> (AgentProcess, u16) {
    agent_at(l, &e.urls, dir, name, extra)
}

/// An agent that reaches etcd at `urls`.
fn agent_at(
    l: &Livemig,
    urls: &str,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> (AgentProcess, u16) {
    let port = free_port();
    let mut args = vec!["--name", name, "--cluster", urls];
    args.extend_from_slice(extra);
    let a = l
        .host_serve(None, &format!("127.0.0.1:{port}"), &dir.join(name), &args)
        .unwrap();
    (a, port)
}

#[test]
#[cfg_attr(no_etcd, ignore = "needs etcd (scripts/setup.sh installs etcd-server)")]
fn agents_join_live_and_a_killed_one_is_unreachable_until_it_returns() {
    let e = Etcd::start();
    let d = tempfile::tempdir().unwrap();
    let (_a, port_a) = agent(&e, d.path(), "a");
    let (mut b, _) = agent(&e, d.path(), "b");
    let st = status(&e);
    assert_eq!(state_of(&e, "a").as_deref(), Some("live"), "{st}");
    assert_eq!(state_of(&e, "b").as_deref(), Some("live"), "{st}");
    let a = st["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "a")
        .unwrap();
    assert_eq!(a["record"]["listen"], format!("127.0.0.1:{port_a}"));
    assert!(a["record"]["room"].as_u64().unwrap() > 0);
    // Killed: no goodbye, its lease lapses.
    b.kill_agent();
    let killed = Instant::now();
    wait(Duration::from_secs(15), "b to turn unreachable", || {
        state_of(&e, "b").as_deref() == Some("unreachable")
    });
    assert!(
        killed.elapsed() <= cluster::LEASE_TTL + Duration::from_secs(3),
        "unreachable after {:?}",
        killed.elapsed()
    );
    assert_eq!(state_of(&e, "a").as_deref(), Some("live"));
    let table = cluster(&e, &["status"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("unreachable"));
    // A new agent of the same name takes its place.
    let (_b2, _) = agent(&e, d.path(), "b");
    assert_eq!(state_of(&e, "b").as_deref(), Some("live"));
    std::mem::forget(b);
}

#[test]
#[cfg_attr(no_etcd, ignore = "needs etcd (scripts/setup.sh installs etcd-server)")]
fn settings_are_checked_and_shown_with_where_they_came_from() {
    let e = Etcd::start();
    let set = cluster(&e, &["config", "set", "transport", "compressed"]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let bad = cluster(&e, &["config", "set", "channels", "99"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("channels is 0 to 16"));
    let unknown = cluster(&e, &["config", "set", "speed", "9"]);
    assert!(!unknown.status.success());
    let net = cluster(
        &e,
        &[
            "config",
            "set",
            "migration-network",
            "10.1.0.0/16, 10.2.0.0/16",
        ],
    );
    assert!(
        net.status.success(),
        "{}",
        String::from_utf8_lossy(&net.stderr)
    );
    let bad_net = cluster(&e, &["config", "set", "migration-network", "10.1.0.9/16"]);
    assert!(String::from_utf8_lossy(&bad_net.stderr).contains("host bits are not zero"));
    let get = cluster(&e, &["config", "get", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    let of = |k: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|x| x["setting"] == k)
            .unwrap()
            .clone()
    };
    assert_eq!(of("transport")["value"], "compressed");
    assert_eq!(of("transport")["source"], "cluster");
    assert_eq!(of("channels")["source"], "default");
    assert!(cluster(&e, &["config", "unset", "transport"])
        .status
        .success());
    let get = cluster(&e, &["config", "get", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(v[0]["source"], "default", "{v}");
}

/// The cluster says compressed; a migration between its agents whose request names no
/// transport goes compressed, and the cluster shows the VM on its new host.
#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_a_migration_between_member_agents_takes_the_clusters_settings() {
    let e = Etcd::start();
    assert!(cluster(&e, &["config", "set", "transport", "compressed"])
        .status
        .success());
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(&e, d.path(), "a");
    let (b, port_b) = agent(&e, d.path(), "b");
    run_vm(&a, "vm1");
    assert_eq!(owner(&e, "vm1"), Some(("a".into(), 1)));
    // Names are the cluster's: b may not start another vm1.
    let taken = b.client().run(&vm_request("vm1")).unwrap_err();
    assert_eq!(taken.status(), Some(409), "{taken}");
    assert!(taken.to_string().contains("owned by host a"), "{taken}");
    let sock = a.sock.clone();
    let moving = std::thread::spawn(move || {
        host::HostClient::new(sock)
            .waiting(Duration::from_secs(120))
            .migrate(
                "vm1",
                &migration::MigrateRequest {
                    to: format!("127.0.0.1:{port_b}"),
                    max_bandwidth: Some(100_000_000),
                    ..Default::default()
                },
            )
    });
    // The status shows it in flight, from a's record.
    wait(
        Duration::from_secs(30),
        "the cluster to show vm1 in flight",
        || {
            status(&e)["hosts"].as_array().unwrap().iter().any(|h| {
                h["name"] == "a"
                    && h["record"]["vms"].as_array().is_some_and(|v| {
                        v.iter().any(|x| {
                            x["name"] == "vm1"
                                && x["migration"]["to"] == format!("127.0.0.1:{port_b}")
                        })
                    })
            })
        },
    );
    let report = moving.join().unwrap().unwrap();
    assert_eq!(report.transport, "compressed", "{}", report.summary());
    assert!(report.guest_verified, "{}", report.summary());
    wait(
        Duration::from_secs(10),
        "the cluster to show vm1 on b",
        || {
            status(&e)["hosts"].as_array().unwrap().iter().any(|h| {
                h["name"] == "b"
                    && h["record"]["vms"]
                        .as_array()
                        .is_some_and(|v| v.iter().any(|x| x["name"] == "vm1"))
            })
        },
    );
    assert_eq!(owner(&e, "vm1"), Some(("b".into(), 2)), "committed to b");
    // Stopped, its name is free again.
    b.client().stop("vm1").unwrap();
    assert_eq!(owner(&e, "vm1"), None);
    let log = b.stderr.text();
    assert!(
        !log.contains("VM failed"),
        "a VM stopped when asked did not fail: {log}"
    );
    run_vm(&a, "vm1");
    assert_eq!(owner(&e, "vm1"), Some(("a".into(), 1)));
}

fn vm_request(name: &str) -> host::RunRequest {
    host::RunRequest {
        name: name.into(),
        memory: 256 << 20,
        vcpus: 1,
        devices: Vec::new(),
        args: vec!["--workload".into(), "sql".into()],
    }
}

/// Runs `name` on `a` (256 MiB, sql) and waits for its guest's heartbeat.
fn run_vm(a: &AgentProcess, name: &str) {
    a.client()
        .waiting(Duration::from_secs(90))
        .run(&vm_request(name))
        .unwrap();
    wait(Duration::from_secs(60), "the guest's heartbeat", || {
        a.client()
            .list()
            .is_ok_and(|l| l.iter().any(|v| v.name == name && v.heartbeat >= 1))
    });
}

/// VM `name`'s owner and generation, as `cluster status` shows them.
fn owner(e: &Etcd, name: &str) -> Option<(String, u64)> {
    status(e)["owners"]
        .as_array()?
        .iter()
        .find(|o| o["name"] == name)
        .map(|o| {
            (
                o["owner"].as_str().unwrap().to_string(),
                o["generation"].as_u64().unwrap(),
            )
        })
}

/// `name`'s heartbeat on `a` goes on.
fn assert_beating(a: &AgentProcess, name: &str) {
    let beat = || {
        a.client()
            .list()
            .unwrap()
            .into_iter()
            .find(|v| v.name == name)
            .map_or(0, |v| v.heartbeat)
    };
    let before = beat();
    wait(Duration::from_secs(30), "the heartbeat to go on", || {
        beat() > before
    });
}

fn names(a: &AgentProcess) -> Vec<String> {
    a.client()
        .list()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect()
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_a_commit_after_its_source_fenced_the_vm_is_refused_and_the_vm_stays() {
    let e = Etcd::start();
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(&e, d.path(), "a");
    let (b, port_b) = agent(&e, d.path(), "b");
    run_vm(&a, "vm1");
    let sock = a.sock.clone();
    let moving = std::thread::spawn(move || {
        host::HostClient::new(sock)
            .waiting(Duration::from_secs(120))
            .migrate(
                "vm1",
                &migration::MigrateRequest {
                    to: format!("127.0.0.1:{port_b}"),
                    max_bandwidth: Some(100_000_000),
                    ..Default::default()
                },
            )
    });
    wait(Duration::from_secs(30), "vm1 to arrive on b", || {
        names(&b).contains(&"vm1".to_string())
    });
    // What a source that lost its switchover does: the generation moves on under the
    // migration, whose commit must then fail.
    let store = cluster::Store::connect(&cluster::Endpoints::parse(&e.urls).unwrap()).unwrap();
    let fenced = store.fence("vm1", "a", Duration::from_millis(100), &|_| {});
    assert_eq!(
        fenced,
        cluster::Fenced::Kept(cluster::Owner {
            host: "a".into(),
            generation: 2
        })
    );
    let err = moving.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("fenced by its source a"), "{err}");
    assert_eq!(names(&a), ["vm1"]);
    assert_beating(&a, "vm1");
    wait(Duration::from_secs(10), "b to let the arrival go", || {
        names(&b).is_empty()
    });
    assert_eq!(owner(&e, "vm1"), Some(("a".into(), 2)));
}

/// One migration from a to b through a proxy that breaks its switchover as `mode` says: the
/// agents, and the migrate's error.
fn lost_switchover(
    e: &Etcd,
    d: &Path,
    mode: Switchover,
) -> (AgentProcess, AgentProcess, unixhttp::ApiError) {
    // Plaintext, so that the proxy reads the frames.
    let plain = Livemig::new(BIN).insecure();
    let (a, _) = agent_as(&plain, e, d, "a");
    let (b, port_b) = agent_as(&plain, e, d, "b");
    run_vm(&a, "vm1");
    let proxy = redirecting_proxy(port_b, b.sock.clone(), mode);
    let err = a
        .client()
        .waiting(Duration::from_secs(120))
        .migrate(
            "vm1",
            &migration::MigrateRequest {
                to: format!("127.0.0.1:{proxy}"),
                peer_timeout_ms: Some(3000),
                postcopy: Some(migration::policy::PostcopyMode::Off),
                ..Default::default()
            },
        )
        .unwrap_err();
    (a, b, err)
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_a_lost_confirm_is_settled_by_the_cluster_the_vm_runs_on_its_new_owner_alone() {
    let e = Etcd::start();
    let d = tempfile::tempdir().unwrap();
    let (a, b, err) = lost_switchover(&e, d.path(), Switchover::LoseConfirm);
    assert_eq!(err.status(), Some(502), "{err}");
    assert!(
        err.to_string()
            .contains("the cluster says it moved to b (generation 2)"),
        "{err}"
    );
    assert!(names(&a).is_empty(), "the stale copy on a is gone");
    assert_eq!(names(&b), ["vm1"]);
    assert_beating(&b, "vm1");
    assert_eq!(owner(&e, "vm1"), Some(("b".into(), 2)));
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_a_switchover_that_never_committed_is_kept_by_its_source() {
    let e = Etcd::start();
    let d = tempfile::tempdir().unwrap();
    let (a, b, err) = lost_switchover(&e, d.path(), Switchover::KillAtState);
    assert!(
        err.to_string()
            .contains("the cluster kept vm1 on this host (generation 2)"),
        "{err}"
    );
    assert_eq!(names(&a), ["vm1"]);
    assert_beating(&a, "vm1");
    wait(Duration::from_secs(10), "b to let the arrival go", || {
        names(&b).is_empty()
    });
    assert_eq!(owner(&e, "vm1"), Some(("a".into(), 2)));
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_a_cluster_drain_cordons_the_host_and_places_its_vms_on_the_other_members() {
    let e = Etcd::start();
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(&e, d.path(), "a");
    let (b, _) = agent(&e, d.path(), "b");
    let (c, _) = agent(&e, d.path(), "c");
    for vm in ["vm1", "vm2", "vm3"] {
        run_vm(&a, vm);
    }
    let report = d.path().join("drain.json");
    let out = livemig(&[
        "drain",
        "--cluster",
        &e.urls,
        "--host",
        "a",
        "--probe-ms",
        "0",
        "--report",
        report.to_str().unwrap(),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("cordoned a"), "{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    for v in r["vms"].as_array().unwrap() {
        assert_eq!(v["status"], "moved", "{v}");
        assert_eq!(v["guest_verified"], true, "{v}");
    }
    assert!(names(&a).is_empty(), "a is empty");
    let (on_b, on_c) = (names(&b), names(&c));
    assert_eq!(on_b.len() + on_c.len(), 3, "b: {on_b:?}, c: {on_c:?}");
    // Each VM's owner is the host it beats on.
    for (host, vms) in [("b", &on_b), ("c", &on_c)] {
        for vm in vms.iter() {
            assert_eq!(owner(&e, vm), Some((host.to_string(), 2)), "{vm}");
        }
    }
    for vm in &on_b {
        assert_beating(&b, vm);
    }
    for vm in &on_c {
        assert_beating(&c, vm);
    }
    let cordoned = |host: &str| {
        status(&e)["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == host && h["cordoned"].is_object())
    };
    assert!(cordoned("a"));
    // Cordoned, a takes no migration; uncordoned, it does again.
    let back = on_b.first().map_or("vm0", String::as_str);
    if !on_b.is_empty() {
        let port_a = status(&e)["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == "a")
            .unwrap()["record"]["listen"]
            .as_str()
            .unwrap()
            .to_string();
        let refused = b
            .client()
            .waiting(Duration::from_secs(60))
            .migrate(
                back,
                &migration::MigrateRequest {
                    to: port_a.clone(),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(
            refused.to_string().contains("host a is cordoned"),
            "{refused}"
        );
        assert_eq!(names(&b), on_b, "the refused VM stays on b");
        assert!(cluster(&e, &["uncordon", "a"]).status.success());
        assert!(!cordoned("a"));
        // The agent reads the cluster at most once a second.
        std::thread::sleep(Duration::from_millis(1100));
        let report = b
            .client()
            .waiting(Duration::from_secs(120))
            .migrate(
                back,
                &migration::MigrateRequest {
                    to: port_a,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(report.guest_verified, "{}", report.summary());
        assert_eq!(owner(&e, back), Some(("a".into(), 3)));
    }
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_rolling_maintenance_runs_the_command_on_each_host_while_it_is_empty() {
    let e = Etcd::start();
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(&e, d.path(), "a");
    let (b, _) = agent(&e, d.path(), "b");
    let (c, _) = agent(&e, d.path(), "c");
    run_vm(&a, "vm1");
    run_vm(&b, "vm2");
    // The "patch": what the host holds while it is patched.
    let exec = format!(
        "{BIN} host list --host \"$LIVEMIG_HOST_API\" --json > {}/\"$LIVEMIG_HOST\".json",
        d.path().display()
    );
    let out = cluster(&e, &["maintenance", "--hosts", "a,b", "--exec", &exec]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for h in ["a", "b"] {
        let held: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join(format!("{h}.json"))).unwrap())
                .unwrap();
        assert_eq!(
            held,
            serde_json::json!([]),
            "{h} was empty while patched: {text}"
        );
    }
    // Every VM runs on exactly one host, its owner; no host is left cordoned.
    let mut found = Vec::new();
    for (h, agent) in [("a", &a), ("b", &b), ("c", &c)] {
        for vm in names(agent) {
            assert_eq!(owner(&e, &vm).map(|o| o.0), Some(h.to_string()), "{vm}");
            assert_beating(agent, &vm);
            found.push(vm);
        }
    }
    found.sort();
    assert_eq!(found, ["vm1", "vm2"], "{text}");
    assert!(
        status(&e)["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["cordoned"].is_null()),
        "{text}"
    );
    assert!(text.matches("verified").count() >= 2, "{text}");
}

/// An outside observer of one VM: every 100 ms it reads the VM's heartbeat on each host,
/// from the VM process's own socket, and notes on which host it went up.
struct Observer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(u64, String)>>,
}

impl Observer {
    fn watch(dir: &Path, hosts: &[&str], vm: &str) -> Observer {
        let socks: Vec<(String, std::path::PathBuf)> = hosts
            .iter()
            .map(|h| {
                (
                    h.to_string(),
                    dir.join(h).join("vms").join(vm).join("api.sock"),
                )
            })
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = vec![0u64; socks.len()];
            let mut rises = Vec::new();
            let mut tick = 0u64;
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                for (i, (host, sock)) in socks.iter().enumerate() {
                    let read = vmm::api::Client::new(sock)
                        .with_timeout(Duration::from_millis(500))
                        .status();
                    let beat = read.map_or(0, |st| st.heartbeat);
                    if beat > last[i] {
                        rises.push((tick, host.clone()));
                    }
                    if beat != 0 {
                        last[i] = beat;
                    }
                }
                tick += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            rises
        });
        Observer { stop, thread }
    }

    /// The hosts the VM ran on, in turn; panics if it ever beat on two at once (a host's
    /// beat seen after another host's, then its own again, or one seen a tick after another
    /// host's took over).
    fn hosts(self) -> Vec<String> {
        // A VM that just started serving its API is read on the next ticks.
        std::thread::sleep(Duration::from_secs(2));
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let rises = self.thread.join().unwrap();
        let mut runs: Vec<(String, u64, u64)> = Vec::new();
        for (tick, host) in rises {
            match runs.last_mut() {
                Some((h, _, end)) if *h == host => *end = tick,
                _ => runs.push((host, tick, tick)),
            }
        }
        for w in runs.windows(2) {
            // The old host's last beat may be read in the tick the new one's first is.
            assert!(
                w[0].2 <= w[1].1,
                "the VM beat on {} and {} at once: {runs:?}",
                w[0].0,
                w[1].0
            );
        }
        let order: Vec<String> = runs.into_iter().map(|r| r.0).collect();
        let mut seen = order.clone();
        seen.dedup();
        assert_eq!(seen, order);
        let mut distinct = order.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), order.len(), "it came back: {order:?}");
        order
    }
}

/// One host's way to etcd: a TCP proxy in front of each member. Cut, it forwards nothing
/// (connections stay open, their bytes wait, as behind a link that is down); healed, it goes
/// on where it stopped.
struct EtcdLink {
    urls: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl EtcdLink {
    fn new(e: &Etcd) -> EtcdLink {
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let urls = e
            .urls
            .split(',')
            .map(|u| {
                let upstream = u.trim_start_matches("http://").to_string();
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let port = l.local_addr().unwrap().port();
                let cut = cut.clone();
                std::thread::spawn(move || {
                    for c in l.incoming().flatten() {
                        let Ok(up) = std::net::TcpStream::connect(&upstream) else {
                            continue;
                        };
                        for (from, to) in
                            [(c.try_clone().unwrap(), up.try_clone().unwrap()), (up, c)]
                        {
                            let cut = cut.clone();
                            std::thread::spawn(move || pump(from, to, &cut));
                        }
                    }
                });
                format!("http://127.0.0.1:{port}")
            })
            .collect::<Vec<_>>()
            .join(",");
        EtcdLink { urls, cut }
    }

    fn cut_for(&self, d: Duration) {
        use std::sync::atomic::Ordering::SeqCst;
        self.cut.store(true, SeqCst);
        std::thread::sleep(d);
        self.cut.store(false, SeqCst);
    }
}

/// Copies `from` to `to` while the link is up; holds everything while it is cut.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    cut: &std::sync::atomic::AtomicBool,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16384];
    loop {
        if cut.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A fault during a migration of vm1 from a to b, once its copy is half done.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The source's host cut off from etcd for 8 s: the destination commits without it.
    CutSource,
    /// The destination's host cut off from etcd for 8 s: its commit waits, and the source,
    /// without a Confirm, fences and keeps the VM.
    CutDestination,
    /// Every etcd member frozen (SIGSTOP) for 8 s: the commit cannot be made or known.
    FreezeEtcd,
    /// The etcd leader killed: the commit goes to the new one.
    KillLeader,
    /// The source's agent killed, then started again.
    KillSourceAgent,
}

impl Etcd {
    fn signal(&self, sig: &str) {
        for m in &self.members {
            let _ = Command::new("kill")
                .args([sig, &m.id().to_string()])
                .status();
        }
    }

    /// Kills the member that leads now.
    fn kill_leader(&mut self) {
        let urls: Vec<String> = self.urls.split(',').map(String::from).collect();
        for (i, url) in urls.iter().enumerate() {
            let addr = url.trim_start_matches("http://");
            let Ok(mut s) = std::net::TcpStream::connect(addr) else {
                continue;
            };
            use std::io::{Read, Write};
            let body = "{}";
            let _ = write!(
                s,
                "POST /v3/maintenance/status HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            let Some(json) = answer.split("\r\n\r\n").nth(1) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap_or_default();
            if v["leader"].is_string() && v["leader"] == v["header"]["member_id"] {
                let _ = self.members[i].kill();
                let _ = self.members[i].wait();
                return;
            }
        }
        panic!("no etcd member says it leads");
    }
}

/// When the fault starts.
#[derive(Clone, Copy, Debug)]
enum At {
    /// Once half of the copy is sent; it lasts through sync and the switchover.
    HalfCopy,
    /// Once the VM runs on the destination: just after the commit.
    AfterCommit,
}

fn fault_under_migration(fault: Fault) {
    fault_at(fault, At::HalfCopy);
}

fn fault_at(fault: Fault, at: At) {
    let mut e = Etcd::start();
    let d = tempfile::tempdir().unwrap();
    let (link_a, link_b) = (EtcdLink::new(&e), EtcdLink::new(&e));
    let l = livemig_exe();
    let (mut a, _) = agent_at(&l, &link_a.urls, d.path(), "a", &[]);
    let (b, port_b) = agent_at(&l, &link_b.urls, d.path(), "b", &[]);
    run_vm(&a, "vm1");
    let observer = Observer::watch(d.path(), &["a", "b"], "vm1");
    let sock = a.sock.clone();
    let moving = std::thread::spawn(move || {
        host::HostClient::new(sock)
            .waiting(Duration::from_secs(180))
            .migrate(
                "vm1",
                &migration::MigrateRequest {
                    to: format!("127.0.0.1:{port_b}"),
                    max_bandwidth: Some(200_000_000),
                    peer_timeout_ms: Some(3000),
                    ..Default::default()
                },
            )
    });
    match at {
        At::HalfCopy => wait(Duration::from_secs(60), "half of the copy", || {
            a.client()
                .progress("vm1")
                .ok()
                .flatten()
                .is_some_and(|p| p.bytes_on_wire * 2 >= p.ram_bytes)
        }),
        At::AfterCommit => wait(Duration::from_secs(90), "vm1 to run on b", || {
            b.client()
                .list()
                .is_ok_and(|l| l.iter().any(|v| v.name == "vm1" && v.state == "running"))
        }),
    }
    match fault {
        Fault::FreezeEtcd => {
            e.signal("-STOP");
            std::thread::sleep(Duration::from_secs(8));
            e.signal("-CONT");
        }
        Fault::KillLeader => e.kill_leader(),
        Fault::KillSourceAgent => a.kill_agent(),
        Fault::CutSource => link_a.cut_for(Duration::from_secs(8)),
        Fault::CutDestination => link_b.cut_for(Duration::from_secs(8)),
    }
    let answer = moving.join().unwrap();
    if matches!(fault, Fault::KillSourceAgent) {
        // Its VM process finished the migration alone; the new agent reconciles.
        std::thread::sleep(Duration::from_secs(2));
        a = agent(&e, d.path(), "a").0;
    }
    // Whatever each side learnt, exactly one host runs it, and it is its owner (an arrival
    // that could not commit takes a moment to go).
    let one = || names(&a).len() + names(&b).len() == 1;
    let t = Instant::now();
    while !one() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (on_a, on_b) = (names(&a), names(&b));
    let host = match (on_a.as_slice(), on_b.as_slice()) {
        ([], [x]) if x == "vm1" => "b",
        ([x], []) if x == "vm1" => "a",
        _ => panic!("{fault:?}: a {on_a:?}, b {on_b:?}; the migrate: {answer:?}"),
    };
    if matches!(at, At::AfterCommit) {
        assert_eq!(host, "b", "{fault:?} after the commit: {answer:?}");
    }
    let agent_of = if host == "a" { &a } else { &b };
    assert_beating(agent_of, "vm1");
    assert_eq!(
        owner(&e, "vm1").map(|o| o.0).as_deref(),
        Some(host),
        "{fault:?}: {answer:?}\n{}\n{}",
        std::fs::read_to_string(d.path().join("a.log")).unwrap_or_default(),
        std::fs::read_to_string(d.path().join("b.log")).unwrap_or_default()
    );
    let ran_on = observer.hosts();
    assert_eq!(
        ran_on.last().map(String::as_str),
        Some(host),
        "{fault:?}: {answer:?}\n{}",
        std::fs::read_to_string(d.path().join("b.log")).unwrap_or_default()
    );
    eprintln!(
        "{fault:?} at {at:?}: ran on {ran_on:?}; the migrate: {:?}",
        answer.map(|r| r.status)
    );
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_etcd_frozen_through_the_switchover_the_vm_runs_on_one_host() {
    fault_under_migration(Fault::FreezeEtcd);
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_etcd_leader_killed_under_a_migration_the_vm_runs_on_one_host() {
    fault_under_migration(Fault::KillLeader);
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_source_agent_killed_under_a_migration_the_vm_runs_on_one_host() {
    fault_under_migration(Fault::KillSourceAgent);
}

/// The CPU features `name`'s guest sees on `a`.
fn features_of(a: &AgentProcess, name: &str) -> Vec<String> {
    a.client()
        .list()
        .unwrap()
        .into_iter()
        .find(|v| v.name == name)
        .map(|v| v.cpu_features)
        .unwrap_or_default()
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_cpu_baseline_decides_which_hosts_a_vm_may_go_to() {
    let e = Etcd::start();
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(&e, d.path(), "a");
    let (b, _) = agent(&e, d.path(), "b");
    let offered: Vec<String> = status(&e)["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "a")
        .map(|h| serde_json::from_value(h["record"]["cpu_features"].clone()).unwrap())
        .unwrap();
    // An older CPU generation: c lacks avx2 (or, on a host without it, another feature).
    let feature = if offered.iter().any(|f| f == "avx2") {
        "avx2".to_string()
    } else {
        offered
            .last()
            .cloned()
            .expect("KVM offers no named feature here")
    };
    let mask = format!("-{feature}");
    let (c, port_c) = agent_with_args(
        &livemig_exe(),
        &e,
        d.path(),
        "c",
        &["--cpu-features", &mask],
    );
    let to_c = migration::MigrateRequest {
        to: format!("127.0.0.1:{port_c}"),
        ..Default::default()
    };

    // Under cpu-baseline cluster a new VM sees what every live host offers: it may go to c.
    assert!(cluster(&e, &["config", "set", "cpu-baseline", "cluster"])
        .status
        .success());
    std::thread::sleep(Duration::from_millis(1100));
    run_vm(&a, "vm1");
    assert!(
        !features_of(&a, "vm1").contains(&feature),
        "{:?}",
        features_of(&a, "vm1")
    );
    let r = a
        .client()
        .waiting(Duration::from_secs(120))
        .migrate("vm1", &to_c)
        .unwrap();
    assert!(r.guest_verified, "{}", r.summary());
    assert_eq!(names(&c), ["vm1"]);

    // Under host it sees all a offers: c refuses it before any page, naming the feature.
    assert!(cluster(&e, &["config", "set", "cpu-baseline", "host"])
        .status
        .success());
    std::thread::sleep(Duration::from_millis(1100));
    run_vm(&a, "vm2");
    assert!(features_of(&a, "vm2").contains(&feature));
    let refused = a
        .client()
        .waiting(Duration::from_secs(120))
        .migrate("vm2", &to_c)
        .unwrap_err();
    assert!(
        refused.to_string().contains(&format!(
            "host c's CPU does not offer {feature} that vm2 sees"
        )),
        "{refused}"
    );
    assert_eq!(names(&a), ["vm2"]);
    assert_beating(&a, "vm2");

    // A drain of a places it on b, not c.
    let out = livemig(&[
        "drain",
        "--cluster",
        &e.urls,
        "--host",
        "a",
        "--probe-ms",
        "0",
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(names(&b), ["vm2"], "{text}");
    assert_eq!(names(&c), ["vm1"], "{text}");
    assert_beating(&b, "vm2");
}

#[test]
#[cfg_attr(no_etcd, ignore = "needs etcd (scripts/setup.sh installs etcd-server)")]
fn a_simulated_fleet_is_registered_planned_and_taken_away() {
    let e = Etcd::start();
    let out = cluster(
        &e,
        &[
            "simulate",
            "--hosts",
            "50,600",
            "--vms-per-host",
            "8",
            "--drain",
            "2",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, n) in rows.iter().zip([50, 600]) {
        assert_eq!(row["hosts"], n, "{row}");
        assert_eq!(row["keys_written"], 2 * n, "{row}");
        assert_eq!(row["drained_hosts"], 2, "{row}");
        assert!(row["placed"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(row["unplaced"], 0, "{row}");
        assert!(row["makespan_s"].as_f64().unwrap() > 0.0, "{row}");
    }
    // 600 hosts' records take more than one page of a listing to read back.
    assert!(rows[1]["bytes_read"].as_u64().unwrap() > rows[0]["bytes_read"].as_u64().unwrap());
    let seed = &r["seed_case"];
    assert!(seed["many_destinations"].as_u64().unwrap() > 1, "{seed}");
    assert!(
        seed["many_destinations_s"].as_f64().unwrap() < seed["one_destination_s"].as_f64().unwrap(),
        "{seed}"
    );
    // The simulated hosts leave with their lease.
    let members = status(&e)["hosts"].as_array().unwrap().len();
    assert_eq!(members, 0, "{}", status(&e));
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_a_drain_ordered_through_the_cluster_is_run_by_the_hosts_agent() {
    let e = Etcd::start();
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(&e, d.path(), "a");
    let (b, _) = agent(&e, d.path(), "b");
    run_vm(&a, "vm1");
    run_vm(&a, "vm2");
    let report = d.path().join("drain.json");
    let out = livemig(&[
        "drain",
        "--cluster",
        &e.urls,
        "--host",
        "a",
        "--via-agent",
        "--probe-ms",
        "0",
        "--report",
        report.to_str().unwrap(),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ordered a's agent to drain it"), "{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let vms = r["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2, "{r}");
    for v in vms {
        assert_eq!(v["status"], "moved", "{v}");
        assert_eq!(v["guest_verified"], true, "{v}");
    }
    assert!(names(&a).is_empty());
    let mut on_b = names(&b);
    on_b.sort();
    assert_eq!(on_b, ["vm1", "vm2"]);
    // The order is gone: another may be given.
    let again = livemig(&[
        "drain",
        "--cluster",
        &e.urls,
        "--host",
        "a",
        "--via-agent",
        "--probe-ms",
        "0",
    ]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Under a migration network no member has an address on, a drain has nowhere to go.
    assert!(cluster(&e, &["uncordon", "a"]).status.success());
    assert!(
        cluster(&e, &["config", "set", "migration-network", "10.255.0.0/16"])
            .status
            .success()
    );
    let nowhere = livemig(&[
        "drain",
        "--cluster",
        &e.urls,
        "--host",
        "b",
        "--probe-ms",
        "0",
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&nowhere.stdout),
        String::from_utf8_lossy(&nowhere.stderr)
    );
    assert!(!nowhere.status.success(), "{text}");
    assert!(
        text.contains("left out a: no address on the migration network"),
        "{text}"
    );
    assert_eq!(names(&b).len(), 2, "{text}");
    // A host that is not a live member has no agent to run it.
    let nobody = livemig(&["drain", "--cluster", &e.urls, "--host", "zz", "--via-agent"]);
    assert!(!nobody.status.success());
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("not a live member"));
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_source_cut_off_from_etcd_under_a_migration_the_vm_runs_on_one_host() {
    fault_under_migration(Fault::CutSource);
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_destination_cut_off_from_etcd_under_a_migration_the_vm_runs_on_one_host() {
    fault_under_migration(Fault::CutDestination);
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_etcd_frozen_just_after_the_commit_the_vm_runs_on_its_new_owner() {
    fault_at(Fault::FreezeEtcd, At::AfterCommit);
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_etcd_leader_killed_just_after_the_commit_the_vm_runs_on_its_new_owner() {
    fault_at(Fault::KillLeader, At::AfterCommit);
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_source_agent_killed_just_after_the_commit_the_vm_runs_on_its_new_owner() {
    fault_at(Fault::KillSourceAgent, At::AfterCommit);
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_source_cut_off_from_etcd_just_after_the_commit_the_vm_runs_on_its_new_owner() {
    fault_at(Fault::CutSource, At::AfterCommit);
}

#[test]
#[cfg_attr(
    any(no_kvm, no_etcd),
    ignore = "needs /dev/kvm and etcd (scripts/setup.sh installs etcd-server)"
)]
fn kvm_destination_cut_off_from_etcd_just_after_the_commit_the_vm_runs_on_its_new_owner() {
    fault_at(Fault::CutDestination, At::AfterCommit);
}
