//! Streams between migration peers. Mechanism only: which stream and how many is policy that
//! lives in the migration engine. Every stream counts the bytes it moves, so the engine can
//! measure bandwidth and report bytes on the wire, and every stream has a deadline on
//! progress, so a dead or silent peer is noticed within a bounded time.
//!
//! A connection is plain TCP or mutual TLS 1.3 ([`tls`]); [`zerocopy`] sends guest RAM without
//! copies and [`splice`] receives into it, on plain connections; [`rate`] paces a migration.
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod rate;
pub mod splice;
pub mod tls;
pub mod zerocopy;

pub use rate::{parse_rate, RateLimit};
pub use splice::ReadToFile;
pub use zerocopy::ZeroCopy;

const BUF: usize = 1 << 20;
/// The reader's buffer is small on purpose: a read it serves fills it with what follows a
/// frame header, and page data that lands there must be copied once more (direct pages are
/// spliced from the socket only after it). Large payloads bypass it anyway.
const READ_BUF: usize = 16 << 10;

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TransportError {
    /// resolving {addr}: {source}
    Resolve { addr: String, source: io::Error },
    /// connecting to {addr}: {source}
    Connect { addr: String, source: io::Error },
    /// listening on {addr}: {source}
    Listen { addr: String, source: io::Error },
    /// accepting a connection on {addr}: {source}
    Accept { addr: String, source: io::Error },
    /// configuring the socket to {peer}: {source}
    Configure { peer: String, source: io::Error },
    /// TLS with {peer} failed: {why}
    Handshake { peer: String, why: String },
    /// the destination {peer} does not speak TLS: it runs --insecure (plaintext), and this side requires mutual TLS
    NoTlsThere { peer: String },
    /// {peer} spoke plaintext to a listener that requires mutual TLS; told it so and closed
    PlaintextPeer { peer: String },
    /// {peer} started TLS with a listener that runs --insecure (plaintext); told it so and closed
    TlsPeer { peer: String },
    /// {peer} closed the connection during the TLS handshake: it may be busy (too many connections at once) or not a livemig listener
    HandshakeClosed { peer: String },
    /// {peer} sent nothing within {secs} s of connecting
    Silent { peer: String, secs: f64 },
}

/// A listener's plaintext answer to a peer that does not speak its protection, sent before it
/// closes: 16 bytes laid out as the migration protocol's hello answer (magic `LVMG`, version 0,
/// status at byte 7), so a plaintext source reads it as the answer to its hello, and a TLS
/// source finds it where the server's first TLS record should be.
pub mod mismatch {
    /// This listener requires mutual TLS; the peer spoke plaintext.
    pub const TLS_REQUIRED: u8 = 3;
    /// This listener runs plaintext (`--insecure`); the peer started TLS.
    pub const NO_TLS: u8 = 4;
    pub const LEN: usize = 16;
    const MAGIC: &[u8; 4] = b"LVMG";

    pub fn notice(status: u8) -> [u8; LEN] {
        let mut m = [0u8; LEN];
        m[..4].copy_from_slice(MAGIC);
        m[7] = status;
        m
    }

    /// The status a notice carries, if `bytes` (at least its first 8) is one.
    pub fn status(bytes: &[u8]) -> Option<u8> {
        (bytes.len() >= 8 && bytes.starts_with(MAGIC) && bytes[4..6] == [0, 0])
            .then_some(bytes[7])
            .filter(|s| matches!(*s, TLS_REQUIRED | NO_TLS))
    }
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How a connection is protected.
#[derive(Clone, Debug)]
pub enum Security {
    /// Plain TCP: only with `--insecure`, and said so.
    Insecure,
    /// Mutual TLS 1.3 with certificates from the cluster CA.
    Tls(Arc<tls::Tls>),
}

impl Security {
    /// How connections are protected, and where TLS runs: always rustls in user space; the
    /// kernel's `tls` ULP, which would let direct pages keep splice and MSG_ZEROCOPY under TLS,
    /// is named when this kernel has it, so a report says what was left on the table.
    pub fn name(&self) -> &'static str {
        match (self, kernel_tls()) {
            (Security::Insecure, _) => "none (insecure)",
            (Security::Tls(_), false) => {
                "tls1.3 (rustls, user space; no tls ULP registered for kernel TLS)"
            }
            (Security::Tls(_), true) => {
                "tls1.3 (rustls, user space; the kernel's tls ULP is there but livemig does not use it yet)"
            }
        }
    }
}

/// Whether this kernel offers kernel TLS (the `tls` upper-layer protocol).
pub fn kernel_tls() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"))
}

/// Bytes moved by one connection, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// Who is at the other end, and how long a read or write may wait for them: what a timeout
/// error says.
#[derive(Debug)]
pub struct SocketInfo {
    peer: String,
    timeout_ms: AtomicU64,
}

impl SocketInfo {
    /// Turns a socket timeout (EAGAIN on a blocking socket) into an error that says so.
    fn explain(&self, e: io::Error, waiting_for: &str) -> io::Error {
        if !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            return e;
        }
        let secs = self.timeout_ms.load(Ordering::Relaxed) as f64 / 1e3;
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "timed out after {secs} s waiting for {} {waiting_for}",
                self.peer
            ),
        )
    }
}

/// A TLS session, over the socket it encrypts.
pub enum TlsStream {
    Client(rustls::StreamOwned<rustls::ClientConnection, TcpStream>),
    Server(rustls::StreamOwned<rustls::ServerConnection, TcpStream>),
}

/// The byte stream under a connection's reader and writer.
pub enum Io {
    Plain(TcpStream),
    /// One TLS session shared by the reader and the writer (a connection's two directions are
    /// used from one thread at a time, so the lock is not contended).
    Tls(Arc<Mutex<TlsStream>>),
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.read(buf),
            Io::Tls(t) => match &mut *locks::lock(t) {
                TlsStream::Client(s) => s.read(buf),
                TlsStream::Server(s) => s.read(buf),
            },
        }
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.write(buf),
            Io::Tls(t) => match &mut *locks::lock(t) {
                TlsStream::Client(s) => s.write(buf),
                TlsStream::Server(s) => s.write(buf),
            },
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.write_vectored(bufs),
            Io::Tls(_) => {
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
                self.write(first)
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Io::Plain(s) => s.flush(),
            Io::Tls(t) => match &mut *locks::lock(t) {
                TlsStream::Client(s) => s.flush(),
                TlsStream::Server(s) => s.flush(),
            },
        }
    }
}

pub struct CountingReader<R> {
    inner: R,
    counters: Arc<Counters>,
    info: Arc<SocketInfo>,
    /// For splicing socket data into files; made on first use.
    pipe: Option<splice::Pipe>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self
            .inner
            .read(buf)
            .map_err(|e| self.info.explain(e, "to send"))?;
        self.counters
            .received
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

pub struct CountingWriter<W> {
    inner: W,
    counters: Arc<Counters>,
    info: Arc<SocketInfo>,
    limit: Option<Arc<RateLimit>>,
}

impl<W: Write> CountingWriter<W> {
    /// Counts and pays for what a write took: the bytes actually written, which under TLS are
    /// often fewer than offered (rustls takes a record's worth at a time), so paying for the
    /// offer would throttle far below the cap.
    fn account(&self, n: usize) -> io::Result<()> {
        self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        match &self.limit {
            Some(l) => l.take(n),
            None => Ok(()),
        }
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self
            .inner
            .write(buf)
            .map_err(|e| self.info.explain(e, "to take more data"))?;
        self.account(n)?;
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = self
            .inner
            .write_vectored(bufs)
            .map_err(|e| self.info.explain(e, "to take more data"))?;
        self.account(n)?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner
            .flush()
            .map_err(|e| self.info.explain(e, "to take more data"))
    }
}

impl<W> CountingWriter<W> {
    /// What this writer counts its bytes into, and the rate limit it obeys: a zero-copy
    /// sender on the same socket shares both.
    pub fn accounting(&self) -> (Arc<Counters>, Option<Arc<RateLimit>>) {
        (self.counters.clone(), self.limit.clone())
    }
}

/// One connection, split into a buffered reader and writer.
pub struct Connection {
    pub reader: BufReader<CountingReader<Io>>,
    pub writer: BufWriter<CountingWriter<Io>>,
    pub counters: Arc<Counters>,
    pub peer: SocketAddr,
    info: Arc<SocketInfo>,
    /// The socket itself, for options, shutdown and zero-copy (plain connections only).
    socket: TcpStream,
    tls: bool,
}

/// A connection's parts, borrowed together ([`Connection::split`]).
pub struct Split<'a> {
    pub reader: &'a mut BufReader<CountingReader<Io>>,
    pub writer: &'a mut BufWriter<CountingWriter<Io>>,
    /// The socket for zero-copy sends; None under TLS, where data must be encrypted first.
    pub socket: Option<BorrowedFd<'a>>,
}

fn configure(peer: &str) -> impl Fn(io::Error) -> TransportError + '_ {
    move |source| TransportError::Configure {
        peer: peer.to_string(),
        source,
    }
}

impl Connection {
    /// `peer`: read when the connection opened; a peer that has reset since has no address
    /// to read, and its connection fails at its first read, naming it.
    fn new(
        socket: TcpStream,
        peer: SocketAddr,
        io_r: Io,
        io_w: Io,
        tls: bool,
    ) -> Result<Self, TransportError> {
        socket
            .set_nodelay(true)
            .map_err(configure(&peer.to_string()))?;
        let counters = Arc::new(Counters::default());
        let info = Arc::new(SocketInfo {
            peer: peer.to_string(),
            timeout_ms: AtomicU64::new(0),
        });
        let reader = BufReader::with_capacity(
            READ_BUF,
            CountingReader {
                inner: io_r,
                counters: counters.clone(),
                info: info.clone(),
                pipe: None,
            },
        );
        let writer = BufWriter::with_capacity(
            BUF,
            CountingWriter {
                inner: io_w,
                counters: counters.clone(),
                info: info.clone(),
                limit: None,
            },
        );
        Ok(Connection {
            reader,
            writer,
            counters,
            peer,
            info,
            socket,
            tls,
        })
    }

    /// A plain connection over `socket`.
    fn plain(socket: TcpStream, peer: SocketAddr) -> Result<Self, TransportError> {
        let clone = || socket.try_clone().map_err(configure(&peer.to_string()));
        let (r, w) = (Io::Plain(clone()?), Io::Plain(clone()?));
        Self::new(socket, peer, r, w, false)
    }

    /// Wraps an established TLS session.
    fn over_tls(socket: TcpStream, peer: SocketAddr, t: TlsStream) -> Result<Self, TransportError> {
        let t = Arc::new(Mutex::new(t));
        Self::new(socket, peer, Io::Tls(t.clone()), Io::Tls(t), true)
    }

    /// The server side of a new connection: TLS (if `security` asks for it) completed within
    /// `timeout`, or an error; a peer without a certificate from the cluster CA fails here. A
    /// peer that speaks the other protection (plaintext to a TLS listener, TLS to an
    /// `--insecure` one) is told so in plaintext ([`mismatch`]) before the connection closes.
    pub fn accept(
        socket: TcpStream,
        security: &Security,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let addr = socket.peer_addr().map_err(configure("?"))?;
        let peer = addr.to_string();
        let speaks_tls = first_byte(&socket, timeout, &peer)? == TLS_HANDSHAKE_RECORD;
        let tell = |status| {
            let _ = (&socket).write_all(&mismatch::notice(status));
            let _ = socket.shutdown(std::net::Shutdown::Both);
        };
        match security {
            Security::Insecure if speaks_tls => {
                tell(mismatch::NO_TLS);
                Err(TransportError::TlsPeer { peer })
            }
            Security::Insecure => Self::plain(socket, addr),
            Security::Tls(_) if !speaks_tls => {
                tell(mismatch::TLS_REQUIRED);
                Err(TransportError::PlaintextPeer { peer })
            }
            Security::Tls(t) => {
                let hs = |why: String| TransportError::Handshake {
                    peer: peer.clone(),
                    why,
                };
                let conn = rustls::ServerConnection::new(t.server.clone())
                    .map_err(|e| hs(e.to_string()))?;
                let s = handshake(rustls::StreamOwned::new(conn, socket), timeout, &peer)?;
                let sock = s.sock.try_clone().map_err(configure(&peer))?;
                Self::over_tls(sock, addr, TlsStream::Server(s))
            }
        }
    }

    /// True when the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Paces everything this connection sends (share one limit across a migration's streams).
    pub fn set_rate_limit(&mut self, limit: Option<Arc<RateLimit>>) {
        self.writer.get_mut().limit = limit;
    }

    /// Marks what this connection sends from now on as urgent signalling ([`expedite`]).
    pub fn expedite(&self) -> io::Result<()> {
        expedite(&self.socket)
    }

    /// The deadline on progress: a read or write that waits longer fails ("timed out after
    /// N s waiting for PEER ..."), and so does data the peer has not acknowledged for a second
    /// more (TCP_USER_TIMEOUT), idle connections included (keepalive probes every second).
    /// None waits forever on reads and writes; keepalive still notices a dead peer.
    pub fn set_peer_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        set_peer_timeout(&self.socket, t)?;
        let ms = t.map_or(0, |t| t.as_millis() as u64);
        self.info.timeout_ms.store(ms, Ordering::Relaxed);
        Ok(())
    }

    /// Only the read side's deadline (a read expected to take longer, such as the guest's
    /// verify on the destination).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket.set_read_timeout(t)?;
        if let Some(t) = t {
            self.info
                .timeout_ms
                .store(t.as_millis() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A handle that can close this connection from another thread.
    pub fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        Ok(ShutdownHandle(self.socket.try_clone()?, self.info.clone()))
    }

    /// Ends what this side sends (under TLS a close_notify first), keeping the other
    /// direction open: the peer reads to its end and may still answer.
    pub fn close_write(&mut self) -> io::Result<()> {
        self.writer.flush()?;
        if let Io::Tls(t) = &self.writer.get_ref().inner {
            match &mut *locks::lock(t) {
                TlsStream::Client(s) => {
                    s.conn.send_close_notify();
                    s.flush()?;
                }
                TlsStream::Server(s) => {
                    s.conn.send_close_notify();
                    s.flush()?;
                }
            }
        }
        self.socket.shutdown(std::net::Shutdown::Write)
    }

    /// Closes both directions at once (the peer sees EOF; our pending reads fail).
    pub fn shutdown(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// The reader, the writer and the socket at once: a zero-copy sender borrows the socket
    /// while frames go through the writer.
    pub fn split(&mut self) -> Split<'_> {
        Split {
            reader: &mut self.reader,
            writer: &mut self.writer,
            socket: (!self.tls).then(|| self.socket.as_fd()),
        }
    }
}

/// DSCP CS5, signalling (RFC 4594), in the IP header: what a network with QoS forwards ahead
/// of bulk classes.
pub const SIGNALLING_TOS: u32 = 40 << 2;
/// The host's interactive band (TC_PRIO_INTERACTIVE): pfifo_fast and prio qdiscs send it
/// ahead of bulk data queued for the same link.
pub const INTERACTIVE_PRIORITY: u32 = 6;

/// Marks what `s` sends from now on as urgent signalling, so that it does not wait behind
/// bulk transfers queued for the same link: DSCP CS5 for the network, the interactive band
/// for this host's queues. Neither needs privileges.
fn expedite(s: &TcpStream) -> io::Result<()> {
    let sock = socket2::SockRef::from(s);
    match s.local_addr()? {
        SocketAddr::V4(_) => sock.set_tos_v4(SIGNALLING_TOS)?,
        SocketAddr::V6(a) => {
            set_tclass_v6(s, SIGNALLING_TOS)?;
            // An IPv4 peer on a dual-stack socket gets IPv4 headers.
            if a.ip().to_ipv4_mapped().is_some() {
                sock.set_tos_v4(SIGNALLING_TOS)?;
            }
        }
    }
    // Setting the TOS also sets the priority (from its old meaning): the priority goes last.
    sock.set_priority(INTERACTIVE_PRIORITY)
}

/// IPV6_TCLASS, which socket2 does not set.
fn set_tclass_v6(s: &TcpStream, class: u32) -> io::Result<()> {
    let v = libc::c_int::try_from(class).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `v`, which lives across the
    // call; the fd is owned by `s` and open.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            (&raw const v).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Read and write deadlines, TCP_USER_TIMEOUT and keepalive on `s` (see
/// [`Connection::set_peer_timeout`]).
fn set_peer_timeout(s: &TcpStream, t: Option<Duration>) -> io::Result<()> {
    s.set_read_timeout(t)?;
    s.set_write_timeout(t)?;
    let sock = socket2::SockRef::from(s);
    let second = Duration::from_secs(1);
    let ka = socket2::TcpKeepalive::new()
        .with_time(second)
        .with_interval(second)
        .with_retries(t.map_or(10, |t| t.as_secs().clamp(1, 60) as u32));
    sock.set_tcp_keepalive(&ka)?;
    sock.set_keepalive(true)?;
    // A second longer than the deadline: the engine's watchdog, which watches the same
    // acknowledgements, fires first and says what the migration waited for; this is the
    // backstop for a connection nothing else watches.
    sock.set_tcp_user_timeout(t.map(|t| t + Duration::from_secs(1)))
}

/// Drives a TLS handshake to its end within `timeout`.
fn handshake<C, S>(
    mut s: rustls::StreamOwned<C, TcpStream>,
    timeout: Duration,
    peer: &str,
) -> Result<rustls::StreamOwned<C, TcpStream>, TransportError>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    let hs = |why: String| TransportError::Handshake {
        peer: peer.to_string(),
        why,
    };
    let deadline = Instant::now() + timeout;
    while s.conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(hs(format!("no TLS handshake within {timeout:?}")));
        }
        s.sock
            .set_read_timeout(Some(left))
            .map_err(configure(peer))?;
        s.sock
            .set_write_timeout(Some(left))
            .map_err(configure(peer))?;
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    hs(format!("no TLS handshake within {timeout:?}"))
                }
                _ => hs(e.to_string()),
            })?;
    }
    // Flush the handshake's last flight (the client's Finished) before frames follow.
    while s.conn.wants_write() {
        s.conn
            .write_tls(&mut s.sock)
            .map_err(|e| hs(e.to_string()))?;
    }
    Ok(s)
}

/// The first byte a new connection's peer sends, within `timeout` (left unread).
fn first_byte(socket: &TcpStream, timeout: Duration, peer: &str) -> Result<u8, TransportError> {
    socket
        .set_read_timeout(Some(timeout))
        .map_err(configure(peer))?;
    let mut b = [0u8; 1];
    match socket.peek(&mut b) {
        Ok(1) => Ok(b[0]),
        Ok(_) => Err(TransportError::Handshake {
            peer: peer.to_string(),
            why: "closed before saying anything".into(),
        }),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(TransportError::Silent {
                peer: peer.to_string(),
                secs: timeout.as_secs_f64(),
            })
        }
        Err(e) => Err(TransportError::Handshake {
            peer: peer.to_string(),
            why: e.to_string(),
        }),
    }
}

/// Sends a TLS client's first flight and looks at what comes back before rustls reads it: a
/// listener that runs plaintext answers with a [`mismatch`] notice, one that closes says
/// nothing; either is an error that says so.
fn first_flight_answered(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    timeout: Duration,
    peer: &str,
) -> Result<(), TransportError> {
    let hs = |why: String| TransportError::Handshake {
        peer: peer.to_string(),
        why,
    };
    s.sock
        .set_write_timeout(Some(timeout))
        .map_err(configure(peer))?;
    while s.conn.wants_write() {
        s.conn
            .write_tls(&mut s.sock)
            .map_err(|e| hs(e.to_string()))?;
    }
    let deadline = Instant::now() + timeout;
    let mut head = [0u8; mismatch::LEN];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(hs(format!("no TLS handshake within {timeout:?}")));
        }
        s.sock
            .set_read_timeout(Some(left))
            .map_err(configure(peer))?;
        let n = match s.sock.peek(&mut head) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(hs(e.to_string())),
        };
        if n == 0 {
            return Err(TransportError::HandshakeClosed {
                peer: peer.to_string(),
            });
        }
        if head[0] == TLS_HANDSHAKE_RECORD || n >= 8 {
            return match mismatch::status(&head[..n]) {
                Some(_) => Err(TransportError::NoTlsThere {
                    peer: peer.to_string(),
                }),
                None => Ok(()),
            };
        }
        if !head[..n].iter().zip(b"LVMG").all(|(a, b)| a == b) {
            return Ok(());
        }
        // The start of a notice: wait for the rest of it.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Connects from a chosen local address, so each stream of a multichannel migration leaves
/// through its own NIC.
pub fn connect_from(
    local: std::net::IpAddr,
    addr: &str,
    timeout: Duration,
    security: &Security,
) -> Result<Connection, TransportError> {
    let err = |source| TransportError::Connect {
        addr: format!("{addr} from {local}"),
        source,
    };
    let remote: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|source| TransportError::Resolve {
            addr: addr.into(),
            source,
        })?
        .find(|a| a.is_ipv4() == local.is_ipv4())
        .ok_or_else(|| {
            err(io::Error::new(
                io::ErrorKind::NotFound,
                "no address of the local address's family",
            ))
        })?;
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(remote),
        socket2::Type::STREAM,
        None,
    )
    .map_err(err)?;
    sock.bind(&SocketAddr::new(local, 0).into()).map_err(err)?;
    sock.connect_timeout(&remote.into(), timeout).map_err(err)?;
    client(sock.into(), timeout, security)
}

pub fn connect(
    addr: &str,
    timeout: Duration,
    security: &Security,
) -> Result<Connection, TransportError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| TransportError::Resolve {
            addr: addr.into(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return client(s, timeout, security),
            Err(e) => last = e,
        }
    }
    Err(TransportError::Connect {
        addr: addr.into(),
        source: last,
    })
}

/// The client side of a new connection: TLS (if asked for) within `timeout`.
fn client(
    socket: TcpStream,
    timeout: Duration,
    security: &Security,
) -> Result<Connection, TransportError> {
    let peer = socket.peer_addr().map_err(configure("?"))?;
    let Security::Tls(t) = security else {
        return Connection::plain(socket, peer);
    };
    let hs = |why: String| TransportError::Handshake {
        peer: peer.to_string(),
        why,
    };
    // The name is not checked (see `tls`); the peer's address stands in for it.
    let name = rustls::pki_types::ServerName::IpAddress(peer.ip().into());
    let conn =
        rustls::ClientConnection::new(t.client.clone(), name).map_err(|e| hs(e.to_string()))?;
    let mut s = rustls::StreamOwned::new(conn, socket);
    first_flight_answered(&mut s, timeout, &peer.to_string())?;
    let s = handshake(s, timeout, &peer.to_string())?;
    let sock = s.sock.try_clone().map_err(configure(&peer.to_string()))?;
    Connection::over_tls(sock, peer, TlsStream::Client(s))
}

/// Closes a connection from another thread (to unblock its reader or writer), and reads its
/// socket's state.
pub struct ShutdownHandle(TcpStream, Arc<SocketInfo>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }

    /// Sets the socket's read timeout (shared with the connection it came from).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(t)?;
        if let Some(t) = t {
            self.1
                .timeout_ms
                .store(t.as_millis() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Marks what the socket sends from now on as urgent signalling ([`expedite`]).
    pub fn expedite(&self) -> io::Result<()> {
        expedite(&self.0)
    }

    /// Sets the socket's deadlines, keepalive and user timeout as
    /// [`Connection::set_peer_timeout`] does.
    pub fn set_peer_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        set_peer_timeout(&self.0, t)?;
        let ms = t.map_or(0, |t| t.as_millis() as u64);
        self.1.timeout_ms.store(ms, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes the peer has acknowledged, and bytes received from it, over the connection's life
    /// (TCP_INFO): what crossed the link, whatever encryption or buffering sits above it.
    pub fn delivered(&self) -> io::Result<(u64, u64)> {
        // SAFETY: an all-zero tcp_info is a valid value of this plain C struct.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `info`, which lives across the
        // call, and updates `len`; the fd is owned by self.0 and open.
        let rc = unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast::<libc::c_void>(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((info.tcpi_bytes_acked, info.tcpi_bytes_received))
    }

    /// Bytes written to the socket that the peer has not acknowledged yet (unsent, queued in
    /// a qdisc, or in flight): what still has to cross the link before newer data can.
    pub fn unacked(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one c_int to the pointer, which is valid for the call; the
        // fd is owned by self.0 and open.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), libc::TIOCOUTQ, &mut n) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

/// Connections the kernel queues for a listener (capped by net.core.somaxconn).
const BACKLOG: i32 = 1024;

pub struct Listener {
    inner: TcpListener,
    addr: String,
}

impl Listener {
    /// Listens on `addr` with a deep accept queue ([`BACKLOG`]), so a burst of connections
    /// does not make the kernel drop a cluster member's SYN (which it would resend only a
    /// second later).
    pub fn bind(addr: &str) -> Result<Self, TransportError> {
        let err = |source| TransportError::Listen {
            addr: addr.into(),
            source,
        };
        let at: SocketAddr = addr
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| err(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
        let s = socket2::Socket::new(
            socket2::Domain::for_address(at),
            socket2::Type::STREAM,
            None,
        )
        .map_err(err)?;
        s.set_reuse_address(true).map_err(err)?;
        s.bind(&at.into()).map_err(err)?;
        s.listen(BACKLOG).map_err(err)?;
        Ok(Listener {
            inner: s.into(),
            addr: addr.into(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The next incoming TCP connection, before any handshake: whoever accepts it decides
    /// how long the peer gets to prove itself ([`Connection::accept`]).
    pub fn accept_raw(&self) -> Result<(TcpStream, SocketAddr), TransportError> {
        self.inner
            .accept()
            .map_err(|source| TransportError::Accept {
                addr: self.addr.clone(),
                source,
            })
    }

    /// Wakes and stops whoever waits in accept (the listening socket stays bound until dropped).
    pub fn shutdown(&self) {
        let _ = socket2::SockRef::from(&self.inner).shutdown(std::net::Shutdown::Both);
    }

    /// Accepts one plain connection (tests and tools; migrations go through a dispatcher).
    pub fn accept(&self) -> Result<Connection, TransportError> {
        let (s, peer) = self.accept_raw()?;
        Connection::plain(s, peer)
    }
}

#[cfg(test)]
mod tests;
