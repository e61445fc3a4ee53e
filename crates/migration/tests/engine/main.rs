//! Whole migrations of an in-memory VM ([`fake::FakeVm`]) through the real engine, sockets and
//! receiver, without KVM: the copy, sync rounds with pages the guest writes during both,
//! every transport, deltas, references, page streams, TLS, a bandwidth cap, auto-converge,
//! cancellation, a destination that dies or stalls in each phase, the switchover, and state
//! sections. Each test checks every page the destination holds against the source's RAM at
//! the pause, and the guest's own verdict, not only that a call returned.
mod fake;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake::{FakeFactory, FakeVm, Workload, PAGE};
use migratable::{GuestRam, Migratable, RunState, SectionId};
use migration::protocol::Transport;
use migration::report::Verification;
use migration::{MigrateOptions, MigrationError, ReceiveOptions, Report};
use transport::Security;

const MEMORY: u64 = 64 << 20;

/// A guest that writes 4,000 pages a second over a hot set of 2,048 pages, in RAM of which the
/// first 8,192 pages were written before.
fn busy() -> Workload {
    Workload {
        filled: 8192,
        hot_start: 1024,
        hot: 2048,
        rate: 4000,
        ..Workload::default()
    }
}

/// What a migration left: its result, the source VM, and the VM the destination built.
struct Moved {
    result: Result<Report, MigrationError>,
    source: Arc<Mutex<FakeVm>>,
    dest: Option<FakeVm>,
}

impl Moved {
    fn report(&self) -> &Report {
        match &self.result {
            Ok(r) => r,
            Err(e) => panic!("the migration failed: {e}"),
        }
    }

    /// The migration completed, the guest verified itself on the destination, and every page
    /// there is the source's page at the pause.
    fn assert_moved_whole(&self) {
        let r = self.report();
        assert_eq!(r.status, "completed");
        assert_eq!(r.verification, Verification::Verified, "{}", r.summary());
        let src = self.source.lock().unwrap();
        assert_eq!(src.state(), RunState::Stopped, "the source's copy is gone");
        assert!(src.migrated_to.is_some());
        let dest = self.dest.as_ref().expect("the destination built the VM");
        assert_same_ram(&src.ram(), &dest.ram());
    }

    /// The migration failed and the VM runs on the source as before it: resumed, unthrottled,
    /// its vCPUs' priority back, the dirty log off, and its guest writing on.
    fn assert_source_runs_on(&self) {
        assert!(self.result.is_err(), "the migration should have failed");
        let mut src = self.source.lock().unwrap();
        assert_eq!(src.run_state(), RunState::Running);
        assert!(!src.logging(), "the dirty log is off");
        assert!(!src.yielded, "the vCPUs have their priority back");
        assert_eq!(src.throttle_now(), 0, "the throttle is lifted");
        assert!(src.migrated_to.is_none());
        let w = src.writes();
        drop(src);
        std::thread::sleep(Duration::from_millis(100));
        let src = self.source.lock().unwrap();
        if src.writes() > 0 {
            assert!(src.writes() > w, "the guest writes on");
        }
    }
}

/// Every page of `a` equals the same page of `b`.
fn assert_same_ram(a: &GuestRam, b: &GuestRam) {
    assert_eq!(a.size(), b.size());
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for off in (0..a.size()).step_by(1 << 20) {
        a.read_at(off, &mut x).unwrap();
        b.read_at(off, &mut y).unwrap();
        if x != y {
            let p = x
                .chunks(PAGE)
                .zip(y.chunks(PAGE))
                .position(|(p, q)| p != q)
                .unwrap_or(0);
            panic!(
                "page {:#x} differs on the destination",
                off + (p * PAGE) as u64
            );
        }
    }
}

/// A receiver of fake VMs on a port of its own, on a thread; what it received.
fn receiver(
    security: Security,
    factory: FakeFactory,
    peer_timeout: Duration,
) -> (String, std::thread::JoinHandle<Option<FakeVm>>) {
    let l = transport::Listener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let opts = ReceiveOptions {
        peer_timeout,
        handshake_timeout: peer_timeout,
        stream_accept_timeout: peer_timeout,
        accept_within: Some(Duration::from_secs(3)),
        ..Default::default()
    };
    let t = std::thread::spawn(move || {
        migration::receive(l, security, opts, Arc::new(factory))
            .ok()
            .map(|(vm, _)| vm)
    });
    (addr, t)
}

fn options(to: &str, security: Security) -> MigrateOptions {
    let mut o = MigrateOptions::new(to);
    o.security = Some(security);
    o.peer_timeout = Duration::from_secs(2);
    o
}

/// Starts `w` on a fake VM, lets the guest run `run_ms`, migrates it with `tune` applied to
/// the options (its destination: a receiver, or `to` when given).
fn migrate_with(
    w: &Workload,
    manual: bool,
    run_ms: u64,
    security: Security,
    tune: impl FnOnce(&mut MigrateOptions),
) -> Moved {
    let (to, rx) = receiver(
        security.clone(),
        FakeFactory::default(),
        Duration::from_secs(2),
    );
    let source = Arc::new(Mutex::new(FakeVm::start(MEMORY, w, manual)));
    std::thread::sleep(Duration::from_millis(run_ms));
    let mut opts = options(&to, security);
    tune(&mut opts);
    let watch = watchdog(Duration::from_secs(300));
    let result = migration::migrate(&*source, &opts, &|_| {});
    let dest = rx.join().unwrap();
    drop(watch);
    Moved {
        result,
        source,
        dest,
    }
}

/// Ends the whole test process, saying so, unless dropped within `limit`: a migration that
/// hangs fails here, not at the CI's own deadline with nothing said.
fn watchdog(limit: Duration) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let name = std::thread::current().name().unwrap_or("?").to_string();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("{name}: the migration and its receiver did not end within {limit:?}");
            std::process::abort();
        }
    });
    tx
}

fn migrate(w: &Workload, tune: impl FnOnce(&mut MigrateOptions)) -> Moved {
    migrate_with(w, true, 200, Security::Insecure, tune)
}

#[test]
fn an_idle_vm_moves_whole_in_one_copy() {
    let m = migrate(&Workload::default(), |_| {});
    m.assert_moved_whole();
    let r = m.report();
    assert!(r.pages.normal >= 4096, "{:?}", r.pages);
    assert!(r.rounds.len() >= 2, "the copy and the paused round");
    assert_eq!(r.rounds[1..].iter().map(|r| r.pages).sum::<u64>(), 0);
    assert_eq!(
        r.catch_up_rounds, 0,
        "nothing was written while it caught up"
    );
    // The destination says where its side of the downtime went, in order, and within it.
    let p = &r.phases;
    assert!(
        0.0 < p.switchover_confirming_ms
            && p.switchover_received_ms <= p.switchover_loaded_ms
            && p.switchover_loaded_ms <= p.switchover_confirming_ms
            && p.switchover_confirming_ms <= r.downtime_ms as f64 + 1.0
            && p.switchover_resumed_ms > 0.0,
        "{p:?}, downtime {} ms",
        r.downtime_ms
    );
    assert!(r.summary().contains("confirmed"), "{}", r.summary());
}

/// From the pause until the guest runs again, the migration's thread on each side runs in
/// the real-time FIFO class, and only then (where this process may: as root).
#[test]
fn while_the_vm_is_paused_the_migrations_threads_go_first() {
    let m = migrate(&busy(), |_| {});
    m.assert_moved_whole();
    let r = m.report();
    if r.switchover_priority.starts_with("not raised") {
        println!("SKIPPED: {}", r.switchover_priority);
        return;
    }
    assert!(
        r.switchover_priority.contains("real-time FIFO"),
        "{}",
        r.switchover_priority
    );
    let paused_by = m.source.lock().unwrap().paused_by_class;
    assert_eq!(paused_by, Some(libc::SCHED_FIFO), "the source paused first");
    let resumed_by = m.dest.as_ref().unwrap().resumed_by_class;
    assert_eq!(
        resumed_by,
        Some(libc::SCHED_FIFO),
        "the destination resumed first"
    );
    // The source's thread is back with the others once the destination confirmed.
    assert_eq!(fake::current_class(), libc::SCHED_OTHER);
}

#[test]
fn pages_written_during_the_copy_and_the_sync_arrive_as_last_written() {
    let m = migrate(&busy(), |o| o.max_bandwidth = Some(400_000_000));
    m.assert_moved_whole();
    let r = m.report();
    let resent: u64 = r.rounds[1..].iter().map(|r| r.pages).sum();
    assert!(
        resent > 0,
        "sync rounds sent what the guest wrote: {:?}",
        r.rounds
    );
    assert!(m.source.lock().unwrap().writes() > 100);
}

#[test]
fn the_compressed_transport_moves_the_vm_whole() {
    let w = Workload {
        text: true,
        ..busy()
    };
    let m = migrate(&w, |o| o.transport = Transport::Compressed);
    m.assert_moved_whole();
    assert!(m.report().pages.compressed > 0, "{:?}", m.report().pages);
}

#[test]
fn a_compressed_migration_held_raw_sends_every_batch_raw_and_moves_whole() {
    let w = Workload {
        text: true,
        ..busy()
    };
    let m = migrate(&w, |o| {
        o.transport = Transport::Compressed;
        o.hold_raw.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    m.assert_moved_whole();
    let c = m.report().compression.clone().unwrap();
    assert_eq!(m.report().pages.compressed, 0, "{:?}", m.report().pages);
    assert!(
        c.batches_held_raw > 0 && c.batches_held_raw == c.batches_raw,
        "{c:?}"
    );
}

#[test]
fn the_direct_transport_moves_the_vm_whole() {
    let m = migrate(&busy(), |o| o.transport = Transport::Direct);
    m.assert_moved_whole();
    assert!(m.report().direct_send.is_some());
}

#[test]
fn re_sent_pages_go_as_deltas_and_land_whole() {
    let m = migrate(&busy(), |o| o.max_bandwidth = Some(300_000_000));
    m.assert_moved_whole();
    let d = m.report().delta.clone().expect("a delta report");
    assert!(m.report().pages.delta > 0 && d.bytes_saved > 0, "{d:?}");
}

#[test]
fn without_deltas_re_sent_pages_go_whole() {
    let m = migrate(&busy(), |o| {
        o.delta = false;
        o.max_bandwidth = Some(300_000_000);
    });
    m.assert_moved_whole();
    assert_eq!(m.report().pages.delta, 0);
}

#[test]
fn repeated_pages_go_as_references_and_land_whole() {
    let w = Workload {
        repeat: 4,
        ..Workload::default()
    };
    let m = migrate(&w, |_| {});
    m.assert_moved_whole();
    // 1,023 copies of page 0; a page becomes a target once its batch is written, so the
    // copies in the batches right after it go whole.
    assert!(m.report().pages.dedup >= 768, "{:?}", m.report().pages);
}

#[test]
fn page_streams_move_the_vm_whole() {
    let m = migrate(&busy(), |o| o.channels = 3);
    m.assert_moved_whole();
}

#[test]
fn direct_page_streams_move_the_vm_whole() {
    let m = migrate(&busy(), |o| {
        o.channels = 2;
        o.transport = Transport::Direct;
    });
    m.assert_moved_whole();
}

#[test]
fn a_vm_moves_whole_over_mutual_tls() {
    let d = tempfile::tempdir().unwrap();
    transport::tls::init_cluster(d.path(), &["a".into()]).unwrap();
    let tls = transport::tls::Tls::load(&transport::tls::TlsFiles {
        cert: d.path().join("a.pem"),
        key: d.path().join("a.key"),
        ca: d.path().join("ca.pem"),
    })
    .unwrap();
    let m = migrate_with(&busy(), true, 200, Security::Tls(Arc::new(tls)), |o| {
        o.channels = 1
    });
    m.assert_moved_whole();
    assert!(m.report().tls.starts_with("tls1.3"), "{}", m.report().tls);
}

#[test]
fn without_manual_protect_the_log_is_read_and_cleared_at_once() {
    let m = migrate_with(&busy(), false, 200, Security::Insecure, |_| {});
    m.assert_moved_whole();
    assert_eq!(m.report().dirty_log, "get-and-clear");
}

#[test]
fn a_bandwidth_cap_paces_the_migration() {
    let w = Workload {
        filled: 2048,
        ..Workload::default()
    };
    let t = Instant::now();
    let m = migrate(&w, |o| o.max_bandwidth = Some(80_000_000));
    m.assert_moved_whole();
    // 8 MiB at 10 MB/s: most of a second.
    assert!(
        t.elapsed() > Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    assert!(m.report().avg_gbps < 0.1, "{}", m.report().avg_gbps);
}

#[test]
fn a_guest_that_outruns_the_link_is_throttled_and_moves_whole() {
    let w = Workload {
        filled: 4096,
        hot: 2048,
        rate: 8000,
        ..busy()
    };
    let m = migrate(&w, |o| {
        o.postcopy = migration::policy::PostcopyMode::Off;
        o.max_bandwidth = Some(100_000_000);
        o.delta = false;
        o.policy.max_rounds = 6;
    });
    m.assert_moved_whole();
    let r = m.report();
    assert!(r.throttle_pct_max > 0, "stopped: {}", r.stop_reason);
    assert_eq!(m.source.lock().unwrap().throttled_max, r.throttle_pct_max);
}

/// Post-copy: the destination runs the VM before it holds every page; what the guest touches
/// there (its verify reads every page) faults in, the rest is pushed, and every page ends as
/// the source's at the pause.
fn assert_moved_by_postcopy(m: &Moved) -> migration::report::PostcopyReport {
    m.assert_moved_whole();
    let r = m.report();
    assert_eq!(r.stop_reason, "postcopy", "{}", r.summary());
    eprintln!("{}", r.summary());
    let p = r.postcopy.clone().expect("a post-copy report");
    assert!(p.owed_pages > 0, "{p:?}");
    assert!(!p.risk.is_empty());
    p
}

#[test]
#[cfg_attr(no_root, ignore = "needs root (userfaultfd for kernel faults)")]
fn post_copy_at_once_fetches_what_the_guest_touches_and_pushes_the_rest() {
    // 8,192 pages (32 MiB) at 200 Mbit/s: the push takes over a second, and the guest's verify
    // reads every page from the first moment.
    let m = migrate(&busy(), |o| {
        o.postcopy = migration::policy::PostcopyMode::After(0);
        o.max_bandwidth = Some(200_000_000);
    });
    let p = assert_moved_by_postcopy(&m);
    assert!(p.owed_pages >= 8192, "every touched page is owed: {p:?}");
    assert!(p.faults > 0 && p.pages_demanded > 0, "{p:?}");
    assert!(p.fault_max_us >= p.fault_p99_us && p.fault_p99_us >= p.fault_p50_us);
    assert!(p.pages_pushed > 0, "{p:?}");
    assert_eq!(m.report().rounds.len(), 1, "no pre-copy round");
}

#[test]
#[cfg_attr(no_root, ignore = "needs root (userfaultfd for kernel faults)")]
fn post_copy_after_the_copy_owes_only_what_the_guest_wrote_since() {
    let m = migrate(&busy(), |o| {
        o.postcopy = migration::policy::PostcopyMode::After(1);
        o.max_bandwidth = Some(400_000_000);
    });
    let p = assert_moved_by_postcopy(&m);
    assert!(p.owed_pages < 8192, "{p:?}");
}

#[test]
#[cfg_attr(no_root, ignore = "needs root (userfaultfd for kernel faults)")]
fn a_guest_that_outruns_the_link_moves_by_post_copy_instead_of_being_throttled() {
    let w = Workload {
        rate: 20_000,
        ..busy()
    };
    let m = migrate(&w, |o| {
        o.postcopy = migration::policy::PostcopyMode::Auto;
        o.max_bandwidth = Some(40_000_000);
    });
    let p = assert_moved_by_postcopy(&m);
    assert!(p.reason.contains("would not converge"), "{p:?}");
    assert_eq!(m.report().throttle_pct_max, 0, "never throttled");
}

#[test]
#[cfg_attr(no_root, ignore = "needs root (userfaultfd for kernel faults)")]
fn post_copy_moves_the_vm_whole_over_tls_and_page_streams() {
    let d = tempfile::tempdir().unwrap();
    transport::tls::init_cluster(d.path(), &["a".into()]).unwrap();
    let tls = transport::tls::Tls::load(&transport::tls::TlsFiles {
        cert: d.path().join("a.pem"),
        key: d.path().join("a.key"),
        ca: d.path().join("ca.pem"),
    })
    .unwrap();
    let m = migrate_with(&busy(), true, 200, Security::Tls(Arc::new(tls)), |o| {
        o.postcopy = migration::policy::PostcopyMode::After(1);
        o.channels = 2;
        o.max_bandwidth = Some(400_000_000);
    });
    assert_moved_by_postcopy(&m);
}

/// What [`link_proxy`] does to the connections it forwards once told.
#[derive(Clone, Copy, PartialEq)]
enum LinkFault {
    /// Closes them: both sides see the link fail at once.
    Cut,
    /// Stops forwarding and holds them open: each side notices by its own deadline only.
    Stall,
}

/// A proxy to `to` that forwards every connection, and once `trigger` is set (and 300 ms
/// more) applies `fault` to every connection it forwarded but the first (the control
/// connection), once; later ones go through. Its address.
fn link_proxy(to: String, trigger: Arc<std::sync::atomic::AtomicBool>, fault: LinkFault) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (h, st) = (held.clone(), stalled.clone());
    std::thread::spawn(move || {
        while !trigger.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        st.store(true, Ordering::SeqCst);
        let held = std::mem::take(&mut *h.lock().unwrap());
        if fault == LinkFault::Cut {
            for s in held {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        } else {
            // Open, silent, until the test ends.
            std::mem::forget(held);
        }
    });
    std::thread::spawn(move || {
        for (i, c) in l.incoming().flatten().enumerate() {
            let Ok(up) = TcpStream::connect(&to) else {
                return;
            };
            let stall = (i > 0 && !stalled.load(Ordering::SeqCst)).then(|| stalled.clone());
            if stall.is_some() {
                let mut held = held.lock().unwrap();
                held.push(c.try_clone().unwrap());
                held.push(up.try_clone().unwrap());
            }
            let (c2, up2, stall2) = (
                c.try_clone().unwrap(),
                up.try_clone().unwrap(),
                stall.clone(),
            );
            std::thread::spawn(move || forward_unless(c, up, stall));
            std::thread::spawn(move || forward_unless(up2, c2, stall2));
        }
    });
    addr
}

/// Forwards until either side closes, or `stall` is set (then holds both open, silent).
fn forward_unless(
    mut from: TcpStream,
    mut to: TcpStream,
    stall: Option<Arc<std::sync::atomic::AtomicBool>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(k @ 1..) = from.read(&mut buf) {
        if stall.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
            std::thread::sleep(Duration::from_secs(60));
            return;
        }
        if to.write_all(&buf[..k]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Until when [`slow_answers_proxy`] holds answers back; not yet while None.
type SlowUntil = Arc<Mutex<Option<Instant>>>;

/// A proxy to `to` whose answers (destination to source) read before `until` arrive `delay`
/// late, as from a destination that takes that long to place what it is sent. Its address.
fn slow_answers_proxy(to: String, delay: Duration, until: SlowUntil) -> String {
    proxy_by(
        to,
        |c, up| forward_unless(c, up, None),
        move |up, c| forward_late(up, c, delay, until.clone()),
    )
}

/// A proxy to `to` that forwards each connection's bytes towards `to` with `out` and its
/// answers with `back` (each given where from, where to), on threads of their own; its
/// address.
fn proxy_by(
    to: String,
    out: impl Fn(TcpStream, TcpStream) + Clone + Send + 'static,
    back: impl Fn(TcpStream, TcpStream) + Clone + Send + 'static,
) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let Ok(up) = TcpStream::connect(&to) else {
                return;
            };
            let (c2, up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
            let (out, back) = (out.clone(), back.clone());
            std::thread::spawn(move || out(c, up));
            std::thread::spawn(move || back(up2, c2));
        }
    });
    addr
}

/// Forwards what `from` sends, what it reads before `until` `delay` after it came, in order,
/// until either side closes.
fn forward_late(mut from: TcpStream, mut to: TcpStream, delay: Duration, until: SlowUntil) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let closing = to.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for (due, data) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&data).is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(k @ 1..) = from.read(&mut buf) {
        let now = Instant::now();
        let slow = until.lock().unwrap().is_some_and(|u| now < u);
        let due = if slow { now + delay } else { now };
        if tx.send((due, buf[..k].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = closing.shutdown(std::net::Shutdown::Both);
}

/// Pre-copy converges, then the source waits for a destination slow to place the last rounds
/// before it pauses, while the guest writes on: what it wrote meanwhile is counted again and
/// goes in a round before the pause, not in the pause.
#[test]
fn pages_written_while_the_destination_catches_up_go_before_the_pause() {
    let (to, rx) = receiver(
        Security::Insecure,
        FakeFactory::default(),
        Duration::from_secs(5),
    );
    // The destination answers 600 ms late for the first 300 ms of the sync rounds.
    let until = SlowUntil::default();
    let via = slow_answers_proxy(to, Duration::from_millis(600), until.clone());
    // 100 pages a second: 60 while the source waits, where the pause (20 ms, less its own
    // 8 ms, at 50 Mbit/s) carries 18.
    let w = Workload {
        filled: 512,
        hot_start: 0,
        hot: 512,
        rate: 100,
        ..Workload::default()
    };
    let source = Arc::new(Mutex::new(FakeVm::start(MEMORY, &w, true)));
    std::thread::sleep(Duration::from_millis(200));
    let mut opts = options(&via, Security::Insecure);
    opts.peer_timeout = Duration::from_secs(5);
    opts.max_bandwidth = Some(50_000_000);
    let _watch = watchdog(Duration::from_secs(300));
    let result = migration::migrate(&*source, &opts, &|p| {
        let mut u = until.lock().unwrap();
        if p.phase == "sync" && u.is_none() {
            *u = Some(Instant::now() + Duration::from_millis(300));
        }
    });
    let m = Moved {
        result,
        source,
        dest: rx.join().unwrap(),
    };
    m.assert_moved_whole();
    let r = m.report();
    assert_eq!(r.stop_reason, "converged", "{}", r.summary());
    assert_eq!(r.catch_up_rounds, 1, "{}", r.summary());
    assert!(r.phases.catch_up_ms >= 300, "{:?}", r.phases);
    let paused = r.rounds.last().unwrap();
    assert!(
        paused.pages <= 18,
        "the pause carried {} pages: {:?}",
        paused.pages,
        r.rounds
    );
}

/// A post-copy migration of a busy guest through [`link_proxy`], whose fault comes as the
/// push starts; the receiver's deadline is `dest_timeout`, the source's 2 s.
fn post_copy_through(fault: LinkFault, dest_timeout: Duration) -> (Moved, Vec<String>) {
    let (to, rx) = receiver(Security::Insecure, FakeFactory::default(), dest_timeout);
    let trigger = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let via = link_proxy(to, trigger.clone(), fault);
    let source = Arc::new(Mutex::new(FakeVm::start(MEMORY, &busy(), true)));
    std::thread::sleep(Duration::from_millis(200));
    let mut opts = options(&via, Security::Insecure);
    opts.postcopy = migration::policy::PostcopyMode::After(0);
    opts.max_bandwidth = Some(100_000_000);
    let phases = Mutex::new(Vec::<String>::new());
    let _watch = watchdog(Duration::from_secs(300));
    let result = migration::migrate(&*source, &opts, &|p| {
        if p.phase == "postcopy" {
            trigger.store(true, Ordering::SeqCst);
        }
        let mut seen = phases.lock().unwrap();
        if seen.last() != Some(&p.phase) {
            seen.push(p.phase.clone());
        }
    });
    let m = Moved {
        result,
        source,
        dest: rx.join().unwrap(),
    };
    (m, phases.into_inner().unwrap())
}

/// Post-copy's link fails while the VM runs on the destination without all its memory: both
/// sides notice, the source makes the link again, the destination names what it still
/// lacks, and the VM ends whole there.
#[test]
#[cfg_attr(no_root, ignore = "needs root (userfaultfd for kernel faults)")]
fn post_copy_makes_its_link_again_when_it_fails_and_the_vm_moves_whole() {
    let (m, seen) = post_copy_through(LinkFault::Cut, Duration::from_secs(2));
    let p = assert_moved_by_postcopy(&m);
    assert!(p.recoveries >= 1, "{p:?}");
    let paused = seen.iter().position(|s| s == "postcopy-paused");
    assert!(paused.is_some(), "{seen:?}");
    assert_eq!(
        seen.get(paused.unwrap() + 1).map(String::as_str),
        Some("postcopy"),
        "{seen:?}"
    );
}

/// The link goes silent; the source notices by its 2 s deadline and makes it again well
/// before the destination's own 30 s deadline would say anything: the destination takes the
/// new link as it arrives (its source has given the old one up).
#[test]
#[cfg_attr(no_root, ignore = "needs root (userfaultfd for kernel faults)")]
fn a_silent_link_is_made_again_before_the_destinations_own_deadline() {
    let t = Instant::now();
    let (m, _) = post_copy_through(LinkFault::Stall, Duration::from_secs(30));
    let p = assert_moved_by_postcopy(&m);
    assert!(p.recoveries >= 1, "{p:?}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn a_cancel_in_the_copy_leaves_the_vm_running_here_and_it_moves_after() {
    let (to, rx) = receiver(
        Security::Insecure,
        FakeFactory::default(),
        Duration::from_secs(2),
    );
    let source = Arc::new(Mutex::new(FakeVm::start(MEMORY, &busy(), true)));
    let mut opts = options(&to, Security::Insecure);
    opts.max_bandwidth = Some(20_000_000);
    let cancel = opts.cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        cancel.request("the operator changed their mind").unwrap();
    });
    let t = Instant::now();
    let _watch = watchdog(Duration::from_secs(300));
    let result = migration::migrate(&*source, &opts, &|_| {});
    canceller.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        matches!(&result, Err(MigrationError::Cancelled(why)) if why.contains("changed their mind")),
        "{result:?}"
    );
    let _ = rx.join();
    let m = Moved {
        result,
        source: source.clone(),
        dest: None,
    };
    m.assert_source_runs_on();
    // Again, to a new receiver: it moves.
    let (to, rx) = receiver(
        Security::Insecure,
        FakeFactory::default(),
        Duration::from_secs(2),
    );
    let _watch = watchdog(Duration::from_secs(300));
    let result = migration::migrate(&*source, &options(&to, Security::Insecure), &|_| {});
    let m = Moved {
        result,
        source,
        dest: rx.join().unwrap(),
    };
    m.assert_moved_whole();
}

/// What a proxy between source and destination does to the source's bytes.
#[derive(Clone, Copy)]
enum Fault {
    /// Closes both sides once this many bytes went through.
    CutAfter(u64),
    /// Stops forwarding (keeping both sides open) once this many bytes went through.
    StallAfter(u64),
}

/// A proxy to `to` that applies `fault` to every connection; its address.
fn proxy(to: String, fault: Fault) -> String {
    proxy_by(
        to,
        move |c, up| forward(c, up, fault),
        |up, c| forward(up, c, Fault::CutAfter(u64::MAX)),
    )
}

fn forward(mut from: TcpStream, mut to: TcpStream, fault: Fault) {
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    while let Ok(k @ 1..) = from.read(&mut buf) {
        n += k as u64;
        match fault {
            Fault::CutAfter(limit) if n >= limit => break,
            Fault::StallAfter(limit) if n >= limit => {
                std::thread::sleep(Duration::from_secs(30));
                return;
            }
            _ => {}
        }
        if to.write_all(&buf[..k]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// A migration through a faulty proxy: it fails within the peer timeout (and a margin), and
/// the VM runs on at the source.
fn fails_through(fault: Fault, streams: u16) -> (Moved, Duration) {
    let (to, rx) = receiver(
        Security::Insecure,
        FakeFactory::default(),
        Duration::from_secs(2),
    );
    let via = proxy(to, fault);
    let source = Arc::new(Mutex::new(FakeVm::start(MEMORY, &busy(), true)));
    let mut opts = options(&via, Security::Insecure);
    opts.channels = streams;
    opts.max_bandwidth = Some(200_000_000);
    let t = Instant::now();
    let _watch = watchdog(Duration::from_secs(300));
    let result = migration::migrate(&*source, &opts, &|_| {});
    let took = t.elapsed();
    let dest = rx.join().unwrap();
    assert!(dest.is_none(), "the destination built nothing that runs");
    let m = Moved {
        result,
        source,
        dest,
    };
    m.assert_source_runs_on();
    (m, took)
}

#[test]
fn a_destination_that_dies_in_the_copy_leaves_the_vm_running_here() {
    let (m, took) = fails_through(Fault::CutAfter(4 << 20), 0);
    assert!(took < Duration::from_secs(4), "{took:?}");
    let e = m.result.unwrap_err().to_string();
    assert!(!e.is_empty());
}

#[test]
fn a_destination_that_stalls_in_the_copy_times_out_within_the_peer_timeout() {
    let (m, took) = fails_through(Fault::StallAfter(4 << 20), 0);
    // Socket buffers still take (and acknowledge) bytes for a while after the stall; from the
    // last acknowledgement, the peer timeout.
    assert!(took < Duration::from_secs(5), "{took:?}");
    let e = m.result.unwrap_err().to_string();
    assert!(e.contains("timed out after 2 s"), "{e}");
}

#[test]
fn a_page_stream_that_stalls_times_out_and_the_vm_runs_here() {
    let (m, took) = fails_through(Fault::StallAfter(2 << 20), 2);
    // As above: the socket buffers' drain, then the 2 s peer timeout (a loaded CI machine
    // took 4.009 s).
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(m.result.is_err());
}

/// A destination that takes everything, then goes away without confirming: the source cannot
/// know whether the VM runs there, so it stays paused and says so.
#[test]
fn a_destination_lost_at_the_switchover_leaves_the_vm_paused_and_says_why() {
    use migration::protocol::{self, Frame, FrameReader, FrameWriter, Kind, Opening};
    let l = transport::Listener::bind("127.0.0.1:0").unwrap();
    let to = l.local_addr().unwrap().to_string();
    let got_state = Arc::new(AtomicU64::new(0));
    let seen = got_state.clone();
    let dst = std::thread::spawn(move || {
        let mut c = l.accept().unwrap();
        let Ok(Opening::Control(h)) = protocol::read_opening(&mut c.reader) else {
            panic!("no hello")
        };
        protocol::answer_hello(&mut c.writer, &h).unwrap();
        let mut input = FrameReader::new(&mut c.reader);
        let mut out = FrameWriter::new(&mut c.writer);
        loop {
            match input.next_frame().unwrap() {
                Frame::Config(_) => {
                    out.send(Kind::Ready, &[]).unwrap();
                    out.flush().unwrap();
                }
                Frame::RoundEnd(r) => {
                    out.send_round_done(r).unwrap();
                    out.flush().unwrap();
                }
                Frame::State(_) => {
                    seen.store(1, Ordering::SeqCst);
                }
                Frame::Done => break,
                _ => {}
            }
        }
        // Everything is here; the host dies before it confirms.
        c.shutdown();
    });
    let source = Arc::new(Mutex::new(FakeVm::start(MEMORY, &busy(), true)));
    std::thread::sleep(Duration::from_millis(100));
    let _watch = watchdog(Duration::from_secs(300));
    let result = migration::migrate(&*source, &options(&to, Security::Insecure), &|_| {});
    dst.join().unwrap();
    assert_eq!(got_state.load(Ordering::SeqCst), 1);
    match result {
        Err(MigrationError::OutcomeUnknown(why)) => assert!(!why.is_empty()),
        r => panic!("{r:?}"),
    }
    let mut src = source.lock().unwrap();
    assert_eq!(
        src.run_state(),
        RunState::Paused,
        "never resumed on its own"
    );
    assert!(src.migrated_to.is_none());
}

#[test]
fn state_sections_unknown_to_the_destination_are_refused_before_the_source_stops() {
    let (to, rx) = receiver(
        Security::Insecure,
        FakeFactory::default(),
        Duration::from_secs(2),
    );
    let mut vm = FakeVm::start(MEMORY, &busy(), true);
    vm.extra_section = Some(SectionId::new("virtio-net", 1));
    let source = Arc::new(Mutex::new(vm));
    let _watch = watchdog(Duration::from_secs(300));
    let result = migration::migrate(&*source, &options(&to, Security::Insecure), &|_| {});
    let dest = rx.join().unwrap();
    let e = result.as_ref().unwrap_err().to_string();
    assert!(
        e.contains("state section virtio-net version 1 is unknown to this host"),
        "{e}"
    );
    let m = Moved {
        result,
        source,
        dest,
    };
    m.assert_source_runs_on();
    // Nothing was sent before the refusal: the Config is where it stopped.
    assert!(m.dest.is_none());
}

#[test]
fn the_guest_state_travels_and_the_destination_guest_verifies_itself() {
    let m = migrate(&busy(), |_| {});
    m.assert_moved_whole();
    let r = m.report();
    assert!(
        r.guest_verify
            .as_deref()
            .unwrap_or("")
            .starts_with("VERIFY OK"),
        "{:?}",
        r.guest_verify
    );
    // A page changed on the destination after the move is caught by the guest's own check.
    let mut dest = m.dest.unwrap();
    dest.ram().write_at(1024 * 4096, &[0xff; 16]).unwrap();
    assert!(matches!(
        dest.verify_guest(Duration::from_secs(1)),
        migratable::GuestVerdict::Corrupt { first_bad_addr } if first_bad_addr == 1024 * 4096
    ));
}

#[test]
fn a_migration_without_credentials_is_refused_before_it_touches_the_vm() {
    let source = Arc::new(Mutex::new(FakeVm::start(MEMORY, &busy(), true)));
    let opts = MigrateOptions::new("127.0.0.1:1");
    let e = migration::migrate(&*source, &opts, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("no TLS credentials"), "{e}");
    let mut src = source.lock().unwrap();
    assert_eq!(src.run_state(), RunState::Running);
    assert!(!src.logging());
}
