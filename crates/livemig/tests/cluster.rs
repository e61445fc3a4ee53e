//! The cluster on etcd, through the `livemig` binary and a real 3-member etcd cluster each
//! test starts on loopback (ignored, with the reason, where etcd is not installed;
//! scripts/setup.sh installs etcd-server): agents join and stay live under their leases, a killed agent turns
//! unreachable within its lease and live again when it restarts, the settings are checked and
//! shown with their source, and a migration between member agents takes them.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, livemig, livemig_exe, wait};
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
    let port = free_port();
    let a = livemig_exe()
        .host_serve(
            None,
            &format!("127.0.0.1:{port}"),
            &dir.join(name),
            &["--name", name, "--cluster", &e.urls],
        )
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
    a.client()
        .waiting(Duration::from_secs(90))
        .run(&host::RunRequest {
            name: "vm1".into(),
            memory: 256 << 20,
            vcpus: 1,
            devices: Vec::new(),
            args: vec!["--workload".into(), "sql".into()],
        })
        .unwrap();
    wait(Duration::from_secs(60), "vm1's heartbeat", || {
        a.client()
            .list()
            .is_ok_and(|l| l.iter().any(|v| v.heartbeat >= 1))
    });
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
    drop(b);
}
