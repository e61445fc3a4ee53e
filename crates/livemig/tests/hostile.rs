//! The listener and the API under attack, and what each outcome tells the user (KVM): floods
//! of idle connections and slow TLS handshakes from one address and from sixteen, against a
//! host agent, while migrations and a drain go through; an authenticated peer that sends a
//! Config and goes silent; a pace below the protocol's minimum; a busy destination.
mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use host::child::AgentProcess;
use migration::MigrateRequest;

/// Starts `name` (128 MiB) on `a` and waits for its guest's first heartbeat.
fn start_vm(a: &AgentProcess, name: &str, workload: &str) {
    start_vms(a, &[(name, "128M", workload)]);
}

/// Moves `name` from `from` to the agent listening on `to`; its report.
fn move_vm(from: &AgentProcess, name: &str, to: &str) -> migration::Report {
    let r = from
        .client()
        .waiting(Duration::from_secs(300))
        .migrate(name, &MigrateRequest::new(to))
        .unwrap_or_else(|e| panic!("migrating {name} to {to}: {e}"));
    assert_eq!(r.status, "completed");
    assert!(r.guest_verified, "{}", r.summary());
    r
}

/// Attackers without a certificate, each from its own address: `idle` connections that say
/// nothing and `slow` TLS handshakes fed a byte every 3 s, each reopened a second after the
/// listener closes it, until dropped.
struct Flood {
    stop: Arc<AtomicBool>,
    reopened: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Attacker {
    source: IpAddr,
    slow: bool,
    conn: Option<TcpStream>,
    /// When it was closed (reopened a second later), or when it last sent a byte.
    at: Instant,
    sent: usize,
}

/// The start of a ClientHello: a handshake record of 512 bytes, which never comes whole.
const HELLO_START: [u8; 5] = [0x16, 0x03, 0x01, 0x02, 0x00];

impl Attacker {
    fn open(&mut self, target: SocketAddr) {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(self.source, 0).into()).unwrap();
        self.conn = s
            .connect_timeout(&target.into(), Duration::from_secs(1))
            .ok()
            .map(|()| {
                let c: TcpStream = s.into();
                c.set_nonblocking(true).unwrap();
                c
            });
        self.at = Instant::now();
        self.sent = 0;
    }

    /// Whether the listener closed it.
    fn closed(&self) -> bool {
        let Some(c) = &self.conn else { return true };
        let mut b = [0u8; 64];
        match c.peek(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }

    fn tick(&mut self, target: SocketAddr, reopened: &AtomicU64) {
        if self.conn.is_some() && self.closed() {
            self.conn = None;
            self.at = Instant::now();
        }
        if self.conn.is_none() {
            if self.at.elapsed() >= Duration::from_secs(1) {
                self.open(target);
                reopened.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        if self.slow && self.at.elapsed() >= Duration::from_secs(3) {
            let byte = HELLO_START.get(self.sent).copied().unwrap_or(0);
            if let Some(c) = &mut self.conn {
                let _ = c.write(&[byte]);
            }
            self.sent += 1;
            self.at = Instant::now();
        }
    }
}

impl Flood {
    fn start(target: &str, sources: &[IpAddr], idle: usize, slow: usize) -> Self {
        let target: SocketAddr = target.parse().unwrap();
        let mut all: Vec<Attacker> = Vec::new();
        for &source in sources {
            for i in 0..idle + slow {
                let mut a = Attacker {
                    source,
                    slow: i >= idle,
                    conn: None,
                    at: Instant::now(),
                    sent: 0,
                };
                a.open(target);
                all.push(a);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let reopened = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), reopened.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for a in &mut all {
                    a.tick(target, &r);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Flood {
            stop,
            reopened,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.reopened.load(Ordering::Relaxed)
    }
}

/// How long each flood is held before the migrations under it (the done-when figure is 60 s;
/// `LIVEMIG_TEST_FLOOD_SECS` sets it).
fn flood_secs() -> u64 {
    std::env::var("LIVEMIG_TEST_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

/// Migrations into a flooded agent and a drain through it succeed, each prepared within a
/// second of the same migration without the flood: the flood's connections are closed by
/// their deadline or to make room, and a cluster member's always gets a slot.
fn flooded(sources: &[IpAddr]) {
    let d = tempfile::tempdir().unwrap();
    let (a, _a_listen) = agent(d.path(), "a", &[]);
    let (b, b_listen) = agent(d.path(), "b", &[]);
    for v in ["v1", "v2", "v3"] {
        start_vm(&a, v, "idle");
    }
    let calm = move_vm(&a, "v1", &b_listen);
    let flood = Flood::start(&b_listen, sources, 200, 32);
    let hold = Instant::now();
    std::thread::sleep(Duration::from_secs(flood_secs()));
    let under = move_vm(&a, "v2", &b_listen);
    let report = d.path().join("drain.json");
    let out = drain_cmd(&a, &b, &report, &["--address", &b_listen])
        .output()
        .unwrap();
    let held = hold.elapsed();
    let reopened = flood.stop();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let v3 = &r["vms"][0];
    assert_eq!(v3["status"], "moved", "{r}");
    assert_eq!(v3["guest_verified"], true, "{r}");
    let drained = v3["report"]["phases"]["prepare_ms"].as_u64().unwrap();
    let (p0, p1) = (calm.phases.prepare_ms, under.phases.prepare_ms);
    println!(
        "{} attacking addresses, flood held {held:?} ({reopened} connections reopened after the listener closed them): prepare {p0} ms calm, {p1} ms flooded, {drained} ms in the drain",
        sources.len()
    );
    for p in [p1, drained] {
        assert!(
            p <= p0 + 1000,
            "prepare took {p} ms under the flood, {p0} ms without"
        );
    }
    assert!(
        reopened > 0,
        "the listener closed none of the flood's connections"
    );
    let log = b.stderr.text();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_flood_from_one_address_keeps_no_migration_out() {
    flooded(&[IpAddr::from([127, 0, 0, 2])]);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_flood_from_sixteen_addresses_keeps_no_migration_out() {
    let sources: Vec<IpAddr> = (1..=16).map(|i| IpAddr::from([127, 0, 1, i])).collect();
    flooded(&sources);
}

/// A cluster member that sends a Config and goes silent, to the agent and then to the
/// receiver it is sent to: the slot is free again within the peer timeout each time.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_silent_authenticated_peer_frees_its_inbound_slot_within_the_peer_timeout() {
    use migration::protocol::{self, Frame, FrameReader, FrameWriter, Hello, Prepare, Transport};
    let d = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(2);
    let (b, b_listen) = agent(d.path(), "b", &["--peer-timeout", "2s"]);
    let tls = {
        let t = tls_dir();
        transport::Security::Tls(Arc::new(
            transport::tls::Tls::load(&transport::tls::TlsFiles {
                cert: t.join("test.pem"),
                key: t.join("test.key"),
                ca: t.join("ca.pem"),
            })
            .unwrap(),
        ))
    };
    let offer = |to: &str, session: u64| {
        let mut c = transport::connect(to, Duration::from_secs(5), &tls).unwrap();
        let hello = Hello {
            version: protocol::VERSION,
            transport: Transport::Tcp,
            capabilities: 0,
        };
        protocol::write_hello(&mut c.writer, &hello).unwrap();
        protocol::read_hello_reply(&mut c.reader, &hello).unwrap();
        let mut w = FrameWriter::new(&mut c.writer);
        w.send_config(&Prepare {
            vm: vmm::VmConfig::new(64 << 20, 1),
            streams: 0,
            session,
            name: Some(format!("ghost-{session}")),
            origin: None,
            generation: None,
            host_cache: None,
            sections: vmm::state::sections(&vmm::VmConfig::new(64 << 20, 1)),
            disks: Vec::new(),
            postcopy: false,
        })
        .unwrap();
        w.flush().unwrap();
        c
    };
    let inbound = || b.client().capacity().unwrap().inbound;
    // To the agent: redirected, and never followed.
    let mut c = offer(&b_listen, 1);
    let Frame::Redirect(r) = FrameReader::new(&mut c.reader).next_frame().unwrap() else {
        panic!("not redirected")
    };
    let t = Instant::now();
    assert_eq!(inbound(), 1);
    wait(Duration::from_secs(10), "the slot to be free again", || {
        inbound() == 0
    });
    let freed = t.elapsed();
    // Followed, with a Config to the receiver, and silence.
    let _c = offer(&b_listen, 2);
    let port = {
        let mut c = offer(&b_listen, 3);
        match FrameReader::new(&mut c.reader).next_frame().unwrap() {
            Frame::Redirect(r) => r.port,
            _ => panic!("not redirected"),
        }
    };
    let _silent = offer(&format!("127.0.0.1:{port}"), 3);
    let t2 = Instant::now();
    wait(
        Duration::from_secs(10),
        "the slots to be free again",
        || inbound() == 0,
    );
    let freed2 = t2.elapsed();
    println!("slot freed {freed:?} after a redirect not followed (port {}), {freed2:?} after a silent Config", r.port);
    let margin = Duration::from_millis(700);
    assert!(freed <= timeout + margin, "{freed:?}");
    assert!(freed2 <= timeout + margin, "{freed2:?}");
    // The agent takes real migrations after.
    let (a, _) = agent(d.path(), "a", &[]);
    start_vm(&a, "real", "idle");
    move_vm(&a, "real", &b_listen);
}

/// A pace below what the peer timeout allows is refused with the minimum named; a migration
/// paced at the minimum is cancelled within 2 s, and the VM then migrates at once.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_pace_below_the_minimum_is_refused_and_a_crawling_migration_cancels_at_once() {
    let d = tempfile::tempdir().unwrap();
    let to = format!("127.0.0.1:{}", free_port());
    let _dst = livemig_exe()
        .receive(
            None,
            &to,
            &d.path().join("dst.sock"),
            &d.path().join("dst.console"),
            None,
        )
        .unwrap();
    let mut src = livemig_exe()
        .run(
            None,
            &[
                "--memory".into(),
                "256M".into(),
                "--workload".into(),
                "sql".into(),
                "--console".into(),
                d.path().join("src.console").display().to_string(),
            ],
            &d.path().join("src.sock"),
            None,
        )
        .unwrap();
    src.wait_heartbeat(2, Duration::from_secs(30)).unwrap();
    let api = src.api.clone();
    let report = d.path().join("r.json");
    let migrate = Command::new(BIN)
        .args(["migrate", "--api", api.to_str().unwrap(), "--to", &to])
        .args(["--max-bandwidth", "200Mbit", "--report"])
        .arg(&report)
        .envs(tls_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = vmm::api::Client::new(&api).with_timeout(Duration::from_secs(5));
    wait(Duration::from_secs(30), "the copy", || {
        client
            .call::<Option<migration::Progress>>("GET", "/vm/migration", None)
            .ok()
            .flatten()
            .is_some_and(|p| p.phase == "copy" && p.bytes_on_wire > 1 << 20)
    });
    let pace = |bits: u64| {
        client.call::<serde_json::Value>(
            "PATCH",
            "/vm/migration",
            Some(serde_json::json!({ "max_bandwidth": bits })),
        )
    };
    let min = migration::request::min_bandwidth(Duration::from_secs(5));
    let e = pace(1000).unwrap_err().to_string();
    assert!(
        e.contains("400")
            && e.contains(&format!("below the minimum {:.2} Mbit/s", min as f64 / 1e6)),
        "{e}"
    );
    pace(min).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    client
        .call::<serde_json::Value>("DELETE", "/vm/migration", None)
        .unwrap();
    let out = migrate.wait_with_output().unwrap();
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("cancelled"),
        "{text}"
    );
    assert!(took < Duration::from_secs(2), "the cancel took {took:?}");
    let p = client
        .call::<Option<migration::Progress>>("GET", "/vm/migration", None)
        .unwrap()
        .unwrap();
    assert_eq!(p.phase, "cancelled", "{p:?}");
    let out = migrate_to(&api, &to, &["--report", report.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["guest_verified"], true, "{r}");
}

/// A destination that takes as many migrations as it may says it is busy (not a bare refusal),
/// and a drain into it tries its VM again later instead of failing it.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_busy_destination_says_so_and_the_drain_waits_for_it() {
    let d = tempfile::tempdir().unwrap();
    let (a, _) = agent(d.path(), "a", &[]);
    let (c, _) = agent(d.path(), "c", &[]);
    let (b, b_listen) = agent(d.path(), "b", &["--max-inbound", "1"]);
    start_vm(&c, "slow", "sql");
    start_vm(&a, "w1", "idle");
    // A slow migration from another host holds B's one inbound slot.
    let holder = {
        let client = c.client().waiting(Duration::from_secs(300));
        let to = b_listen.clone();
        std::thread::spawn(move || {
            let req = MigrateRequest {
                max_bandwidth: Some(100_000_000),
                ..MigrateRequest::new(to)
            };
            client.migrate("slow", &req)
        })
    };
    wait(Duration::from_secs(30), "B to take the slow one", || {
        b.client().capacity().unwrap().inbound == 1
    });
    let e = a
        .client()
        .migrate("w1", &MigrateRequest::new(&b_listen))
        .unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("is busy") && msg.contains("--max-inbound 1"),
        "{msg}"
    );
    // The drain asks B for its room first (max_inbound 1, nothing arriving in its plan), is
    // turned away while the slow one arrives, and goes again once it has.
    let report = d.path().join("drain.json");
    let out = drain_cmd(&a, &b, &report, &["--address", &b_listen])
        .output()
        .unwrap();
    assert!(holder.join().unwrap().is_ok());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let w1 = &r["vms"][0];
    assert_eq!(w1["status"], "moved", "{r}");
    assert_eq!(w1["guest_verified"], true, "{r}");
    assert!(w1["busy_retries"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(w1["attempts"], 1, "busy is not a failed attempt: {r}");
}
