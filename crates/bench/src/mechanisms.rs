//! `livemig bench mechanisms`: what each way of sending guest RAM, and of landing it, costs in
//! CPU on a testbed link, with no VM and no migration around it. `direct` picks its send
//! mechanism by what the kernel does with zero-copy sends on the link, and lands pages by
//! splice; these are the figures behind those choices, and the floor any sender has there
//! (on a veth pair the receiver's TCP processing runs in the sender's thread).
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ram::GuestRam;
use serde::Serialize;
use transport::splice::ReadToFile;
use transport::zerocopy::ZeroCopy;
use transport::{Connection, Listener, Security};
use vm_memory::WriteVolatile;

use crate::netns::{spawn_in, NetnsError};
use crate::testbed::Testbed;
use crate::{step, BenchError, Route};

/// How the sender puts guest RAM on the socket.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Send {
    /// write(2) from the mapping: the kernel copies (QEMU's way; livemig's tcp).
    Copy,
    /// sendfile(2) from the memfd: page references, no copy (direct on local links).
    Sendfile,
    /// sendmsg(MSG_ZEROCOPY) from the mapping (direct on links that do not copy them).
    Zerocopy,
}

/// How the receiver puts what arrives into guest RAM.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Landing {
    /// splice(2) socket → pipe → a fresh memfd (direct's landing).
    Splice,
    /// The same into a memfd fallocated first (what the populate worker does ahead).
    SpliceFallocated,
    /// read(2) into the mapping (page streams' landing).
    Read,
}

/// The combinations measured, in the order each round runs them.
pub const COMBOS: [(Send, Landing); 5] = [
    (Send::Copy, Landing::Splice),
    (Send::Sendfile, Landing::Splice),
    (Send::Zerocopy, Landing::Splice),
    (Send::Sendfile, Landing::SpliceFallocated),
    (Send::Sendfile, Landing::Read),
];

pub struct MechanismsOptions {
    pub testbed: String,
    pub scale: f64,
    pub link: String,
    /// Bytes each run sends.
    pub bytes: u64,
    pub runs: usize,
    pub out: PathBuf,
    pub keep_testbed: bool,
}

/// One run of one combination.
#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    pub send_cpu_s: f64,
    pub receive_cpu_s: f64,
    /// The fallocate before the landing (SpliceFallocated), CPU seconds.
    pub allocate_cpu_s: f64,
    pub secs: f64,
    /// What the zero-copy sender ended up doing (the kernel may copy its sends).
    pub sent_by: Option<String>,
    /// xxh3 of the RAM as it landed (checked against the source's).
    #[serde(skip)]
    pub digest: u64,
}

/// Median and range over the runs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let (min, max) = (v.first().copied(), v.last().copied());
        let mid = v.len() / 2;
        let median = match v.len() {
            0 => 0.0,
            n if n % 2 == 0 => (v[mid - 1] + v[mid]) / 2.0,
            _ => v[mid],
        };
        Spread {
            median,
            min: min.unwrap_or(0.0),
            max: max.unwrap_or(0.0),
        }
    }
}

/// One combination over every run, per GiB sent.
#[derive(Clone, Debug, Serialize)]
pub struct MechanismRow {
    pub send: Send,
    pub landing: Landing,
    pub send_cpu_s_per_gib: Spread,
    pub receive_cpu_s_per_gib: Spread,
    pub allocate_cpu_s_per_gib: Spread,
    pub gbps: Spread,
    pub trials: Vec<Trial>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MechanismsReport {
    pub link: String,
    pub bytes: u64,
    pub runs: usize,
    pub host_cpus: usize,
    pub rows: Vec<MechanismRow>,
}

/// Runs every combination `runs` times, interleaved (so drift on the machine spreads over all).
pub fn mechanisms(o: &MechanismsOptions) -> Result<MechanismsReport, BenchError> {
    if !crate::testbed::is_root() {
        return Err(BenchError::NotRoot);
    }
    let tb = Testbed::new(&o.testbed, o.scale)?;
    let existed = tb.status()?.present;
    tb.up()?;
    let res = measure(o, &tb);
    if !existed && !o.keep_testbed {
        if let Err(e) = tb.down() {
            tracing::warn!("removing the testbed: {e}");
        }
    }
    let report = res?;
    std::fs::create_dir_all(&o.out)?;
    let json = serde_json::to_vec_pretty(&report).map_err(|e| step("bench.json")(e.to_string()))?;
    std::fs::write(o.out.join("bench.json"), json)?;
    Ok(report)
}

fn measure(o: &MechanismsOptions, tb: &Testbed) -> Result<MechanismsReport, BenchError> {
    let route = Route::new(tb, &[o.link.as_str()], true)?;
    let (local, remote) = route
        .pairs()
        .into_iter()
        .next()
        .ok_or_else(|| step("testbed")(format!("no addresses on {}", o.link)))?;
    let local: IpAddr = local
        .parse()
        .map_err(|e| step("testbed")(format!("{local}: {e}")))?;
    let source = Arc::new(filled_ram(o.bytes)?);
    let digest = content_digest(&source).map_err(|e| step("source RAM")(e.to_string()))?;
    let mut trials: Vec<Vec<Trial>> = vec![Vec::new(); COMBOS.len()];
    for _ in 0..o.runs {
        for (i, &(send, landing)) in COMBOS.iter().enumerate() {
            let t = trial(&route, local, &remote, &source, send, landing)?;
            if t.digest != digest {
                return Err(step(format!("{send:?} into {landing:?}"))(
                    "the landed bytes differ from the ones sent",
                ));
            }
            trials[i].push(t);
        }
    }
    let gib = o.bytes as f64 / f64::from(1u32 << 30);
    let rows = COMBOS
        .iter()
        .zip(trials)
        .map(|(&(send, landing), trials)| {
            let per_gib =
                |f: fn(&Trial) -> f64| Spread::of(trials.iter().map(|t| f(t) / gib).collect());
            MechanismRow {
                send,
                landing,
                send_cpu_s_per_gib: per_gib(|t| t.send_cpu_s),
                receive_cpu_s_per_gib: per_gib(|t| t.receive_cpu_s),
                allocate_cpu_s_per_gib: per_gib(|t| t.allocate_cpu_s),
                gbps: Spread::of(
                    trials
                        .iter()
                        .map(|t| o.bytes as f64 * 8.0 / t.secs.max(1e-9) / 1e9)
                        .collect(),
                ),
                trials,
            }
        })
        .collect();
    Ok(MechanismsReport {
        link: o.link.clone(),
        bytes: o.bytes,
        runs: o.runs,
        host_cpus: ram::host::cpus(),
        rows,
    })
}

/// Guest RAM of `bytes`, every page written with data that neither compresses nor is zero.
fn filled_ram(bytes: u64) -> Result<GuestRam, BenchError> {
    let ram = GuestRam::new(bytes).map_err(|e| step("source RAM")(e.to_string()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for off in (0..bytes).step_by(chunk.len()) {
        for w in chunk.chunks_exact_mut(8) {
            // xorshift64: cheap filler a compressor cannot shrink.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_ne_bytes());
        }
        let n = usize::try_from(bytes - off).map_or(chunk.len(), |left| left.min(chunk.len()));
        ram.write_at(off, &chunk[..n])
            .map_err(|e| step("source RAM")(e.to_string()))?;
    }
    Ok(ram)
}

/// xxh3 of all of `ram`'s bytes, read a MiB at a time.
fn content_digest(ram: &GuestRam) -> Result<u64, ram::MemoryError> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let size = ram.size();
    let mut off = 0;
    while off < size {
        let n = usize::try_from(size - off).map_or(buf.len(), |left| left.min(buf.len()));
        ram.read_at(off, &mut buf[..n])?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.digest())
}

/// How long either side of a transfer may wait on the other before it fails (no hang).
const STALL: Duration = Duration::from_secs(10);

/// One transfer of all of `source` from host A to host B over `route`.
fn trial(
    route: &Route,
    local: IpAddr,
    remote: &str,
    source: &Arc<GuestRam>,
    send: Send,
    landing: Landing,
) -> Result<Trial, BenchError> {
    let what = format!("{send:?} into {landing:?}");
    let bytes = source.size();
    let (tx, rx) = mpsc::channel();
    let addr = format!("{remote}:0");
    let receiver = spawn_in(route.dst_ns(), move || {
        let l = Arc::new(Listener::bind(&addr).map_err(other("listening"))?);
        let port = l
            .local_addr()
            .map_err(NetnsError::work("listening"))?
            .port();
        let _ = tx.send((port, l.clone()));
        receive(&l, bytes, landing)
    });
    let Ok((port, listener)) = rx.recv() else {
        // It ended before listening: say why.
        let why = match receiver.join() {
            Ok(Err(e)) => e.to_string(),
            _ => "the receiver did not start".into(),
        };
        return Err(step(&what)(why));
    };
    let to = format!("{remote}:{port}");
    let src = source.clone();
    let sender = spawn_in(route.src_ns(), move || {
        let timeout = Duration::from_secs(5);
        let conn = transport::connect_from(local, &to, timeout, &Security::Insecure)
            .map_err(other("connecting"))?;
        send_all(conn, &src, send)
    });
    let sent = sender
        .join()
        .map_err(|_| step(&what)("the sender panicked"))?
        .map_err(|e| {
            // Nothing will connect: free the receiver from its accept.
            listener.shutdown();
            step(&what)(e.to_string())
        })?;
    let received = receiver
        .join()
        .map_err(|_| step(&what)("the receiver panicked"))?
        .map_err(|e| step(&what)(e.to_string()))?;
    Ok(Trial {
        send_cpu_s: sent.cpu_s,
        receive_cpu_s: received.cpu_s,
        allocate_cpu_s: received.allocate_cpu_s,
        secs: received.secs,
        sent_by: sent.by,
        digest: received.digest,
    })
}

/// An error of another kind, as a measurement thread's.
fn other<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> NetnsError {
    move |e| NetnsError::work(what)(std::io::Error::other(e.to_string()))
}

struct Sent {
    cpu_s: f64,
    by: Option<String>,
}

/// Sends all of `ram` on `conn` by `send`; the sending thread's CPU.
fn send_all(mut conn: Connection, ram: &GuestRam, send: Send) -> Result<Sent, NetnsError> {
    conn.set_peer_timeout(Some(STALL))
        .map_err(NetnsError::work("sending"))?;
    let cpu0 = migration::thread_cpu_seconds();
    let sending = NetnsError::work("sending");
    let socket = conn
        .split()
        .socket
        .ok_or_else(|| sending(std::io::Error::other("no socket on a plain connection")))?;
    let len = usize::try_from(ram.size()).map_err(other("sending"))?;
    let slices = ram.slices_at(0, len).map_err(other("sending"))?;
    let mut by = None;
    match send {
        Send::Copy => {
            let mut s = std::net::TcpStream::from(socket.try_clone_to_owned().map_err(&sending)?);
            for slice in &slices {
                s.write_all_volatile(slice).map_err(other("sending"))?;
            }
        }
        Send::Sendfile => {
            let counters = Arc::new(transport::Counters::default());
            let mut zc = ZeroCopy::new(socket, counters, None).map_err(&sending)?;
            zc.send_file(ram.backing_file(), &[(0, ram.size())])
                .map_err(&sending)?;
        }
        Send::Zerocopy => {
            let counters = Arc::new(transport::Counters::default());
            let mut zc = ZeroCopy::new(socket, counters, None).map_err(&sending)?;
            zc.send_all(&slices).map_err(&sending)?;
            zc.finish(STALL).map_err(&sending)?;
            by = Some(format!(
                "the kernel copied {} of {} MSG_ZEROCOPY sends",
                zc.copied,
                zc.issued()
            ));
        }
    }
    let cpu_s = migration::thread_cpu_seconds() - cpu0;
    conn.shutdown();
    Ok(Sent { cpu_s, by })
}

struct Received {
    cpu_s: f64,
    allocate_cpu_s: f64,
    secs: f64,
    digest: u64,
}

/// Accepts one connection and lands `bytes` from it in fresh guest RAM by `landing`; the
/// receiving thread's CPU and the time from accept to the last byte.
fn receive(l: &Listener, bytes: u64, landing: Landing) -> Result<Received, NetnsError> {
    let mut conn = l.accept().map_err(other("accepting"))?;
    conn.set_peer_timeout(Some(STALL))
        .map_err(NetnsError::work("landing"))?;
    let t0 = Instant::now();
    let ram = GuestRam::new(bytes).map_err(other("guest RAM"))?;
    let len = usize::try_from(bytes).map_err(other("guest RAM"))?;
    let landing_err = NetnsError::work("landing");
    let mut allocate_cpu_s = 0.0;
    if landing == Landing::SpliceFallocated {
        let c = migration::thread_cpu_seconds();
        allocate(ram.backing_file(), bytes)?;
        allocate_cpu_s = migration::thread_cpu_seconds() - c;
    }
    let cpu0 = migration::thread_cpu_seconds();
    let reader = conn.reader.get_mut();
    match landing {
        Landing::Splice | Landing::SpliceFallocated => reader
            .read_to_file(ram.backing_file(), &[(0, len)])
            .map_err(&landing_err)?,
        Landing::Read => {
            for slice in ram.slices_at(0, len).map_err(other("landing"))? {
                reader.read_to_slice(&slice).map_err(&landing_err)?;
            }
        }
    }
    let (cpu_s, secs) = (
        migration::thread_cpu_seconds() - cpu0,
        t0.elapsed().as_secs_f64(),
    );
    Ok(Received {
        cpu_s,
        allocate_cpu_s,
        secs,
        digest: content_digest(&ram).map_err(other("reading what landed"))?,
    })
}

/// fallocate(2) over all of `file`.
fn allocate(file: &std::fs::File, bytes: u64) -> Result<(), NetnsError> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(bytes).map_err(other("fallocate"))?;
    // SAFETY: fallocate on a file descriptor the borrow keeps open; it touches no memory of
    // ours.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } != 0 {
        return Err(NetnsError::work("fallocate")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// A mechanism's name as bench.json spells it.
fn name(m: &impl Serialize) -> String {
    serde_json::to_value(m)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The table `livemig bench mechanisms` prints.
pub fn render(r: &MechanismsReport) -> String {
    let gib = r.bytes as f64 / f64::from(1u32 << 30);
    let mut out = format!(
        "livemig bench mechanisms: {:.2} GiB over {}, {} runs each, interleaved; CPU seconds per GiB (median, min-max); {} host CPUs\n\n",
        gib, r.link, r.runs, r.host_cpus
    );
    out += &format!(
        "{:<10} {:<18} {:>20} {:>20} {:>18} {:>16}\n",
        "send", "landing", "send cpu-s/GiB", "receive cpu-s/GiB", "allocate cpu-s/GiB", "Gbit/s"
    );
    let cell = |s: &Spread| format!("{:.2} ({:.2}-{:.2})", s.median, s.min, s.max);
    for row in &r.rows {
        out += &format!(
            "{:<10} {:<18} {:>20} {:>20} {:>18} {:>16}\n",
            name(&row.send),
            name(&row.landing),
            cell(&row.send_cpu_s_per_gib),
            cell(&row.receive_cpu_s_per_gib),
            cell(&row.allocate_cpu_s_per_gib),
            cell(&row.gbps),
        );
        if let Some(by) = row.trials.iter().find_map(|t| t.sent_by.clone()) {
            out += &format!("{:<10} {by}\n", "");
        }
    }
    let copy = r.rows.iter().find(|x| x.send == Send::Copy);
    let file = r
        .rows
        .iter()
        .find(|x| x.send == Send::Sendfile && x.landing == Landing::Splice);
    if let (Some(c), Some(f)) = (copy, file) {
        out += &format!(
            "\nsendfile / copy, sender CPU (medians): {:.2}x\n",
            f.send_cpu_s_per_gib.median / c.send_cpu_s_per_gib.median.max(1e-9)
        );
    }
    out
}
