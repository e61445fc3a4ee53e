//! Mechanism for the benchmark's two hosts: threads that enter a host's network namespace, a
//! raw TCP goodput measurement (what iperf3 would report), and interface byte counters sampled
//! over time (what actually crossed a link, for any peer).
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {ns:?} (/run/netns/{ns}): {source}")]
    Open { ns: String, source: std::io::Error },
    #[error("entering network namespace {ns:?}: {source}")]
    Enter { ns: String, source: std::io::Error },
    #[error("goodput stream {from} -> {to}: {source}")]
    Stream {
        from: String,
        to: String,
        source: std::io::Error,
    },
    #[error("reading interface counters in {ns:?}: {source}")]
    Counters { ns: String, source: std::io::Error },
    #[error("interface {dev:?} is not in namespace {ns:?}")]
    NoDevice { ns: String, dev: String },
    #[error("a measurement thread panicked")]
    Panicked,
    #[error("{what}: {source}")]
    Work {
        what: String,
        source: std::io::Error,
    },
}

impl NetnsError {
    /// What a measurement thread was doing when `e` happened.
    pub fn work(what: &str) -> impl Fn(std::io::Error) -> NetnsError + '_ {
        move |source| NetnsError::Work {
            what: what.to_string(),
            source,
        }
    }
}

/// Moves the calling thread (only) into network namespace `ns`.
fn enter(ns: &str) -> Result<(), NetnsError> {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|source| NetnsError::Open {
        ns: ns.into(),
        source,
    })?;
    // SAFETY: setns only reads the fd, which stays open for the call; CLONE_NEWNET affects just
    // this thread, which the callers spawn for the purpose.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetnsError::Enter {
            ns: ns.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Runs `f` on a new thread inside namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, NetnsError> + Send + 'static,
) -> JoinHandle<Result<T, NetnsError>> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns)?;
        f()
    })
}

fn join<T>(h: JoinHandle<Result<T, NetnsError>>) -> Result<T, NetnsError> {
    h.join().map_err(|_| NetnsError::Panicked)?
}

/// Transmitted bytes of `devs` (summed) as the kernel counts them, read in the caller's netns.
fn tx_bytes(ns: &str, devs: &[String]) -> Result<u64, NetnsError> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").map_err(|source| {
        NetnsError::Counters {
            ns: ns.into(),
            source,
        }
    })?;
    let mut total = 0;
    for dev in devs {
        let line = text
            .lines()
            .find_map(|l| {
                let (name, rest) = l.split_once(':')?;
                (name.trim() == dev).then_some(rest)
            })
            .ok_or_else(|| NetnsError::NoDevice {
                ns: ns.into(),
                dev: dev.clone(),
            })?;
        // Receive has 8 columns, then transmit bytes.
        total += line
            .split_whitespace()
            .nth(8)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// Samples the bytes `devs` transmit, every `period`, until stopped.
pub struct TxSampler {
    /// When the baseline was read; sample times count from here.
    pub t0: Instant,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Vec<(Duration, u64)>, NetnsError>>,
}

impl TxSampler {
    /// `on_sample(elapsed, bytes since start)` runs on the sampling thread.
    pub fn start(
        ns: &str,
        devs: Vec<String>,
        period: Duration,
        on_sample: impl Fn(Duration, u64) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let name = ns.to_string();
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = spawn_in(ns, move || {
            let base = tx_bytes(&name, &devs);
            let t0 = Instant::now();
            let _ = ready_tx.send(t0);
            let base = base?;
            let mut out = vec![(Duration::ZERO, 0)];
            loop {
                let done = s.load(Ordering::Acquire);
                let t = t0.elapsed();
                let b = tx_bytes(&name, &devs)?.saturating_sub(base);
                if t > Duration::ZERO {
                    out.push((t, b));
                }
                on_sample(t, b);
                if done {
                    return Ok(out);
                }
                std::thread::sleep(period);
            }
        });
        // The first reading is the baseline: start the measured work only after it.
        let t0 = ready_rx.recv().unwrap_or_else(|_| Instant::now());
        TxSampler { t0, stop, handle }
    }

    /// Stops and returns (elapsed, cumulative bytes) samples, the last one taken now.
    pub fn finish(self) -> Result<Vec<(Duration, u64)>, NetnsError> {
        self.stop.store(true, Ordering::Release);
        join(self.handle)
    }
}

/// One link's (or several links' together) raw TCP goodput.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Goodput {
    /// Payload bits/s the receivers got, after the warm-up.
    pub goodput_bps: f64,
    /// Bits/s the sending interfaces counted over the same window (payload + headers).
    pub interface_bps: f64,
}

/// Streams from `src_ns` to `dst_ns` over each (local, remote) address pair at once, like an
/// iperf3 client per link, for `warmup + window`; measures only the window (a shaper's burst
/// and slow start stay out of it).
pub fn measure_goodput(
    src_ns: &str,
    dst_ns: &str,
    pairs: &[(String, String)],
    src_devs: Vec<String>,
    warmup: Duration,
    window: Duration,
) -> Result<Goodput, NetnsError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut sinks = Vec::new();
    let mut sources = Vec::new();
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + warmup;
    let measure_to = measure_from + window;
    for (local, remote) in pairs {
        let (port_tx, port_rx) = mpsc::channel();
        let remote_ip = remote.clone();
        let stream_err = {
            let (l, r) = (local.clone(), remote.clone());
            move |source| NetnsError::Stream {
                from: l.clone(),
                to: r.clone(),
                source,
            }
        };
        let e1 = stream_err.clone();
        sinks.push(spawn_in(dst_ns, move || {
            let listener = TcpListener::bind((remote_ip.as_str(), 0)).map_err(&e1)?;
            let _ = port_tx.send(listener.local_addr().map_err(&e1)?.port());
            let (mut conn, _) = listener.accept().map_err(&e1)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut counted = 0u64;
            loop {
                let n = conn.read(&mut buf).map_err(&e1)?;
                if n == 0 {
                    return Ok(counted);
                }
                let now = Instant::now();
                if now >= measure_from && now < measure_to {
                    counted += n as u64;
                }
            }
        }));
        let port = port_rx.recv().map_err(|_| NetnsError::Panicked)?;
        let (l, r) = (local.clone(), remote.clone());
        let s = stop.clone();
        let e2 = stream_err;
        sources.push(spawn_in(src_ns, move || {
            let to: SocketAddr = format!("{r}:{port}")
                .parse()
                .map_err(|e| e2(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .map_err(&e2)?;
            let from: SocketAddr = format!("{l}:0")
                .parse()
                .map_err(|e| e2(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
            sock.bind(&from.into()).map_err(&e2)?;
            sock.connect(&to.into()).map_err(&e2)?;
            let mut conn: TcpStream = sock.into();
            let buf = vec![0x5au8; 1 << 20];
            while !s.load(Ordering::Acquire) {
                conn.write_all(&buf).map_err(&e2)?;
            }
            Ok(())
        }));
    }
    let sampler = TxSampler::start(src_ns, src_devs, Duration::from_millis(50), |_, _| {});
    let t0 = sampler.t0;
    std::thread::sleep(measure_to.saturating_duration_since(Instant::now()));
    stop.store(true, Ordering::Release);
    let samples = sampler.finish()?;
    for s in sources {
        join(s)?;
    }
    let mut bytes = 0;
    for s in sinks {
        bytes += join(s)?;
    }
    // Interface rate over the same window, from the samples bracketing it.
    let rel = |t: Instant| t.saturating_duration_since(t0);
    let at = |d: Duration| {
        samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= d)
            .map_or((Duration::ZERO, 0), |s| *s)
    };
    let (t1, b1) = at(rel(measure_from));
    let (t2, b2) = at(rel(measure_to));
    let iface = if t2 > t1 {
        (b2 - b1) as f64 * 8.0 / (t2 - t1).as_secs_f64()
    } else {
        0.0
    };
    Ok(Goodput {
        goodput_bps: bytes as f64 * 8.0 / window.as_secs_f64(),
        interface_bps: iface,
    })
}

/// One set of links' raw goodput, as a bench reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LinkMeasure {
    pub links: String,
    pub nominal_gbps: f64,
    pub shaped_gbps: f64,
    #[serde(flatten)]
    pub measured: Goodput,
}

/// The link sets the benches use (one 1 GbE link, one 10 GbE link, both 10 GbE links), each
/// measured from host A for `secs` after half a second of warm-up.
pub fn measure_link_sets(
    tb: &crate::testbed::Testbed,
    ui: &crate::Ui,
    secs: f64,
) -> Result<Vec<LinkMeasure>, crate::BenchError> {
    let sets: [&[&str]; 3] = [&["1g-1"], &["10g-1"], &["10g-1", "10g-2"]];
    let mut out = Vec::new();
    for set in sets {
        let r = crate::Route::new(tb, set, true)?;
        let name = r.name();
        ui.start(&format!("raw goodput of {name}"));
        let g = measure_goodput(
            r.src_ns(),
            r.dst_ns(),
            &r.pairs(),
            r.src_devs(),
            Duration::from_millis(500),
            Duration::from_secs_f64(secs.max(0.5)),
        )?;
        let nominal: u64 = r.links.iter().filter_map(|l| l.nominal_bps).sum();
        let shaped: u64 = r.links.iter().filter_map(|l| l.shaped_bps).sum();
        ui.done(&format!(
            "link {name}: goodput {:.3} Gbit/s ({:.3} on the interface), shaped {:.2}, nominal {:.1}",
            g.goodput_bps / 1e9,
            g.interface_bps / 1e9,
            shaped as f64 / 1e9,
            nominal as f64 / 1e9
        ));
        out.push(LinkMeasure {
            links: name,
            nominal_gbps: nominal as f64 / 1e9,
            shaped_gbps: shaped as f64 / 1e9,
            measured: g,
        });
    }
    Ok(out)
}
