//! Streams between migration peers. Mechanism only: which stream and how many is policy that
//! lives in the migration engine. Every stream counts the bytes it moves, so the engine can
//! measure bandwidth and report bytes on the wire.
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::VolatileSlice;

const BUF: usize = 1 << 20;

/// A token bucket shared by every stream of one migration, for `--max-bandwidth`.
/// Writers may go into debt by one write; they then sleep until it is paid off, so the long-run
/// average holds whatever the write sizes.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: f64,
    burst: f64,
    state: std::sync::Mutex<(f64, std::time::Instant)>,
}

impl RateLimit {
    pub fn new(bits_per_sec: u64) -> Self {
        let bytes_per_sec = bits_per_sec as f64 / 8.0;
        // 10 ms of burst: smooth enough for QoS, coarse enough not to spin.
        let burst = (bytes_per_sec / 100.0).max(64.0 * 1024.0);
        RateLimit {
            bytes_per_sec,
            burst,
            state: std::sync::Mutex::new((burst, std::time::Instant::now())),
        }
    }

    pub fn bits_per_sec(&self) -> u64 {
        // Non-negative by construction (from a u64); `as` saturates.
        #[allow(clippy::cast_sign_loss)]
        let bits = (self.bytes_per_sec * 8.0) as u64;
        bits
    }

    /// Takes `n` bytes at time `now`; returns how long the caller must wait before sending.
    pub fn take_at(&self, n: usize, now: std::time::Instant) -> Duration {
        let mut st = locks::lock(&self.state);
        let (tokens, last) = *st;
        let refill = now.saturating_duration_since(last).as_secs_f64() * self.bytes_per_sec;
        let tokens = (tokens + refill).min(self.burst) - n as f64;
        *st = (tokens, now.max(last));
        if tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-tokens / self.bytes_per_sec)
        }
    }

    pub fn take(&self, n: usize) {
        let wait = self.take_at(n, std::time::Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// `200Mbit`, `1.5Gbit`, `800Kbit` (bits/s, decimal) or `100MB`, `64MiB` (bytes/s).
pub fn parse_rate(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches("/s").trim_end_matches("ps");
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let bits = match unit {
        "bit" | "b" => v,
        "Kbit" | "kbit" => v * 1e3,
        "Mbit" | "mbit" => v * 1e6,
        "Gbit" | "gbit" => v * 1e9,
        "B" => v * 8.0,
        "KB" | "kB" => v * 8e3,
        "MB" => v * 8e6,
        "GB" => v * 8e9,
        "KiB" => v * 8.0 * 1024.0,
        "MiB" => v * 8.0 * 1024.0 * 1024.0,
        "GiB" => v * 8.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    // Checked non-negative (and at least one); `as` saturates huge values.
    #[allow(clippy::cast_sign_loss)]
    let bits = (bits >= 1.0).then_some(bits as u64);
    bits
}

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
}

/// Bytes moved by one connection, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

pub struct CountingReader<R> {
    inner: R,
    counters: Arc<Counters>,
    /// For splicing socket data into files; made on first use.
    pipe: Option<Pipe>,
}

/// A source that can put bytes straight into a file at an offset: how direct page data lands
/// in guest RAM (its memfd) at the page's own place.
pub trait ReadToFile: Read {
    /// Moves exactly `len` bytes into `file` at `off`. By default through a buffer; sockets
    /// splice instead.
    fn read_to_file(&mut self, file: &std::fs::File, off: u64, len: usize) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len.min(256 << 10)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len());
            self.read_exact(&mut buf[..n])?;
            file.write_all_at(&buf[..n], off + done as u64)?;
            done += n;
        }
        Ok(())
    }
}

impl<T: AsRef<[u8]>> ReadToFile for io::Cursor<T> {}

impl ReadToFile for CountingReader<TcpStream> {
    /// socket → pipe → file with splice(2): the kernel copies the received data into the
    /// file's pages once, with no user-space copy and no page faults on a mapping (which cost
    /// more than the copy itself when the pages are new).
    fn read_to_file(&mut self, file: &std::fs::File, off: u64, len: usize) -> io::Result<()> {
        let pipe = match self.pipe.take() {
            Some(p) => self.pipe.insert(p),
            None => self.pipe.insert(Pipe::new()?),
        };
        let mut pos = libc::loff_t::try_from(off).map_err(io::Error::other)?;
        let mut left = len;
        while left > 0 {
            let n = splice(
                self.inner.as_raw_fd(),
                None,
                pipe.write.as_raw_fd(),
                left.min(pipe.size),
            )?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.counters
                .received
                .fetch_add(n as u64, Ordering::Relaxed);
            let mut in_pipe = n;
            while in_pipe > 0 {
                let m = splice(
                    pipe.read.as_raw_fd(),
                    Some(&mut pos),
                    file.as_raw_fd(),
                    in_pipe,
                )?;
                if m == 0 {
                    return Err(io::Error::other("splice into the file moved nothing"));
                }
                in_pipe -= m;
            }
            left -= n;
        }
        Ok(())
    }
}

/// A pipe as splice's go-between, as large as the system allows us (fewer round trips).
struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        use std::os::fd::FromRawFd;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two fds into the array, which is valid for the call.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are fresh and owned by nothing else.
        let (read, write) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        // SAFETY: fcntl on our own open pipe fd touches no memory of ours; failure leaves the
        // default size.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        let size = if size > 0 {
            size
        } else {
            // SAFETY: as above; F_GETPIPE_SZ only reads the size.
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) }
        };
        Ok(Pipe {
            read,
            write,
            size: usize::try_from(size).unwrap_or(0).max(4096),
        })
    }
}

/// One splice(2) call, from `from` (at `off` if given) into `to`; retried on EINTR. A socket
/// read timeout shows as TimedOut.
fn splice(
    from: libc::c_int,
    off_out: Option<&mut libc::loff_t>,
    to: libc::c_int,
    len: usize,
) -> io::Result<usize> {
    let (off_in, off_out) = match off_out {
        // Pipe → file at an offset.
        Some(o) => (std::ptr::null_mut(), o as *mut libc::loff_t),
        None => (std::ptr::null_mut(), std::ptr::null_mut()),
    };
    loop {
        // SAFETY: both fds are open for the call; the offset pointer is null or points to a
        // loff_t the caller owns for the call.
        let n = unsafe { libc::splice(from, off_in, to, off_out, len, libc::SPLICE_F_MOVE) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Err(io::ErrorKind::TimedOut.into()),
            _ => return Err(e),
        }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counters
            .received
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

pub struct CountingWriter<W> {
    inner: W,
    counters: Arc<Counters>,
    limit: Option<Arc<RateLimit>>,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(l) = &self.limit {
            l.take(buf.len());
        }
        let n = self.inner.write(buf)?;
        self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        if let Some(l) = &self.limit {
            l.take(bufs.iter().map(|b| b.len()).sum());
        }
        let n = self.inner.write_vectored(bufs)?;
        self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One TCP connection, split into a buffered reader and writer.
pub struct Connection {
    pub reader: BufReader<CountingReader<TcpStream>>,
    pub writer: BufWriter<CountingWriter<TcpStream>>,
    pub counters: Arc<Counters>,
    pub peer: SocketAddr,
    stream: TcpStream,
}

impl Connection {
    fn new(stream: TcpStream) -> Result<Self, TransportError> {
        let peer = stream
            .peer_addr()
            .map_err(|source| TransportError::Configure {
                peer: "?".into(),
                source,
            })?;
        let cfg = |source| TransportError::Configure {
            peer: peer.to_string(),
            source,
        };
        stream.set_nodelay(true).map_err(cfg)?;
        let counters = Arc::new(Counters::default());
        let reader = BufReader::with_capacity(
            BUF,
            CountingReader {
                inner: stream.try_clone().map_err(cfg)?,
                counters: counters.clone(),
                pipe: None,
            },
        );
        let writer = BufWriter::with_capacity(
            BUF,
            CountingWriter {
                inner: stream.try_clone().map_err(cfg)?,
                counters: counters.clone(),
                limit: None,
            },
        );
        Ok(Connection {
            reader,
            writer,
            counters,
            peer,
            stream,
        })
    }

    /// Paces everything this connection sends (share one limit across a migration's streams).
    pub fn set_rate_limit(&mut self, limit: Option<Arc<RateLimit>>) {
        self.writer.get_mut().limit = limit;
    }

    /// A read that waits longer than this fails: how a dead peer is noticed.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(t)
    }

    /// A handle that can close this connection from another thread.
    pub fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        Ok(ShutdownHandle(self.stream.try_clone()?))
    }

    /// Closes both directions at once (the peer sees EOF; our pending reads fail).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// The reader, the writer and the socket at once: a zero-copy sender borrows the socket
    /// while frames go through the writer.
    pub fn split(&mut self) -> Split<'_> {
        Split {
            reader: &mut self.reader,
            writer: &mut self.writer,
            socket: self.stream.as_fd(),
        }
    }
}

/// A connection's parts, borrowed together ([`Connection::split`]).
pub struct Split<'a> {
    pub reader: &'a mut BufReader<CountingReader<TcpStream>>,
    pub writer: &'a mut BufWriter<CountingWriter<TcpStream>>,
    pub socket: BorrowedFd<'a>,
}

impl<W> CountingWriter<W> {
    /// What this writer counts its bytes into, and the rate limit it obeys: a zero-copy
    /// sender on the same socket shares both.
    pub fn accounting(&self) -> (Arc<Counters>, Option<Arc<RateLimit>>) {
        (self.counters.clone(), self.limit.clone())
    }
}

/// Connects from a chosen local address, so each stream of a multichannel migration leaves
/// through its own NIC.
pub fn connect_from(
    local: std::net::IpAddr,
    addr: &str,
    timeout: Duration,
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
    Connection::new(sock.into())
}

/// From linux/socket.h and linux/errqueue.h (not in the libc crate).
const SO_ZEROCOPY: libc::c_int = 60;
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// Sends guest memory without copying it (MSG_ZEROCOPY): the kernel pins the pages and
/// reports completion on the socket's error queue, which this reaps. It borrows the socket of
/// a connection whose writer carries the frames around the data.
pub struct ZeroCopy<'a> {
    fd: BorrowedFd<'a>,
    counters: Arc<Counters>,
    limit: Option<Arc<RateLimit>>,
    issued: u64,
    completed: u64,
    /// Sends the kernel had to copy after all (loopback does).
    pub copied: u64,
}

impl<'a> ZeroCopy<'a> {
    /// Turns SO_ZEROCOPY on for `socket`; sent bytes count into `counters`, paced by `limit`.
    pub fn new(
        socket: BorrowedFd<'a>,
        counters: Arc<Counters>,
        limit: Option<Arc<RateLimit>>,
    ) -> io::Result<Self> {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket the borrow keeps open, reading one c_int from a
        // pointer that is valid for the call, with its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ZEROCOPY,
                (&raw const one).cast::<libc::c_void>(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ZeroCopy {
            fd: socket,
            counters,
            limit,
            issued: 0,
            completed: 0,
            copied: 0,
        })
    }

    /// Sends all of `bufs` with MSG_ZEROCOPY (anything buffered in the connection's writer must
    /// have been flushed first). The memory behind the slices may change while it is sent (a
    /// running guest); the kernel keeps the pages pinned until the send completes.
    pub fn send_all(&mut self, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        if let Some(l) = &self.limit {
            l.take(bufs.iter().map(|b| b.len()).sum());
        }
        // Volatile slices hand out raw pointers only; the kernel reads through them.
        let guards: Vec<_> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| (b.ptr_guard(), b.len()))
            .collect();
        let mut iov: Vec<libc::iovec> = guards
            .iter()
            .map(|(g, len)| libc::iovec {
                iov_base: g.as_ptr().cast_mut().cast::<libc::c_void>(),
                iov_len: *len,
            })
            .collect();
        let mut first = 0;
        while first < iov.len() {
            let end = (first + 1024).min(iov.len());
            match self.send_some(&mut iov[first..end])? {
                None => continue,
                Some(n) => first += advance(&mut iov[first..], n),
            }
            self.reap(false)?;
        }
        Ok(())
    }

    /// One sendmsg(MSG_ZEROCOPY) of `iov`: Some(bytes sent), or None to try again (interrupted,
    /// or the kernel's budget of pending zero-copy sends was full and we reaped some).
    fn send_some(&mut self, iov: &mut [libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: an all-zero msghdr is a valid empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        // SAFETY: msghdr points at live iovecs whose buffers are guest RAM mappings kept alive
        // by the caller's slices for the call; the kernel pins the pages it keeps for later.
        let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_ZEROCOPY) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => Ok(None),
                // Too many sends awaiting completion: collect some, then retry.
                Some(libc::ENOBUFS) => self.reap(true).map(|()| None),
                _ => Err(e),
            };
        }
        self.issued += 1;
        let n = n.unsigned_abs();
        self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(Some(n))
    }

    /// Collects completion notifications; with `wait`, blocks until at least one arrives.
    pub fn reap(&mut self, wait: bool) -> io::Result<()> {
        loop {
            if self.completed >= self.issued {
                return Ok(());
            }
            let mut cbuf = [0u64; 32];
            // SAFETY: an all-zero msghdr is a valid empty message.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_control = cbuf.as_mut_ptr().cast::<libc::c_void>();
            msg.msg_controllen = std::mem::size_of_val(&cbuf);
            // SAFETY: msghdr with only a control buffer, which lives across the call; the borrow
            // keeps the socket open.
            let n = unsafe {
                libc::recvmsg(
                    self.fd.as_raw_fd(),
                    &mut msg,
                    libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    if !wait {
                        return Ok(());
                    }
                    let mut p = libc::pollfd {
                        fd: self.fd.as_raw_fd(),
                        events: 0,
                        revents: 0,
                    };
                    // SAFETY: one live pollfd; POLLERR is always reported.
                    unsafe { libc::poll(&mut p, 1, 1000) };
                    continue;
                }
                return Err(e);
            }
            // SAFETY: walking the control messages the kernel wrote into cbuf.
            let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            while !c.is_null() {
                // SAFETY: c points at a control message header inside cbuf.
                let data = unsafe { libc::CMSG_DATA(c) };
                // SAFETY: IP(V6)_RECVERR messages carry a sock_extended_err, inside cbuf; it is
                // read unaligned, so the pointer's alignment does not matter.
                let ee: libc::sock_extended_err =
                    unsafe { std::ptr::read_unaligned(data.cast_const().cast()) };
                if ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY {
                    // ee_info..=ee_data is the range of sendmsg calls now complete.
                    let n = (ee.ee_data.wrapping_sub(ee.ee_info) as u64) + 1;
                    self.completed += n;
                    if ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                        self.copied += n;
                    }
                }
                // SAFETY: advancing within the same msghdr's control buffer.
                c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
            }
            if !wait {
                continue;
            }
            return Ok(());
        }
    }

    /// Waits until every send has completed (before the memory may change hands).
    pub fn finish(&mut self) -> io::Result<()> {
        while self.completed < self.issued {
            self.reap(true)?;
        }
        Ok(())
    }
}

/// Moves `iov` past `n` sent bytes: whole entries are skipped (their count is returned), and a
/// partly sent entry starts at its first unsent byte.
fn advance(iov: &mut [libc::iovec], mut n: usize) -> usize {
    let mut skipped = 0;
    for v in iov.iter_mut() {
        if n < v.iov_len {
            // SAFETY: the new base stays inside the same buffer, `n` bytes from its start.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast::<libc::c_void>();
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        skipped += 1;
        if n == 0 {
            break;
        }
    }
    skipped
}

/// Closes a connection from another thread (to unblock its reader or writer).
pub struct ShutdownHandle(TcpStream);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }

    /// Sets the socket's read timeout (shared with the connection it came from).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(t)
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

pub fn connect(addr: &str, timeout: Duration) -> Result<Connection, TransportError> {
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
            Ok(s) => return Connection::new(s),
            Err(e) => last = e,
        }
    }
    Err(TransportError::Connect {
        addr: addr.into(),
        source: last,
    })
}

pub struct Listener {
    inner: TcpListener,
    addr: String,
}

impl Listener {
    pub fn bind(addr: &str) -> Result<Self, TransportError> {
        let inner = TcpListener::bind(addr).map_err(|source| TransportError::Listen {
            addr: addr.into(),
            source,
        })?;
        Ok(Listener {
            inner,
            addr: addr.into(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Accepts one connection, or fails once `deadline` passes.
    pub fn accept_until(&self, deadline: std::time::Instant) -> Result<Connection, TransportError> {
        let err = |source| TransportError::Accept {
            addr: self.addr.clone(),
            source,
        };
        self.inner.set_nonblocking(true).map_err(err)?;
        let r = loop {
            match self.inner.accept() {
                Ok((s, _)) => break s.set_nonblocking(false).map(|_| s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        break Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no connection in time",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => break Err(e),
            }
        };
        self.inner.set_nonblocking(false).map_err(err)?;
        Connection::new(r.map_err(err)?)
    }

    pub fn accept(&self) -> Result<Connection, TransportError> {
        let (s, _) = self
            .inner
            .accept()
            .map_err(|source| TransportError::Accept {
                addr: self.addr.clone(),
                source,
            })?;
        Connection::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_both_directions() {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            let mut c = l.accept().unwrap();
            let mut b = [0u8; 5];
            c.reader.read_exact(&mut b).unwrap();
            c.writer.write_all(b"ok").unwrap();
            c.writer.flush().unwrap();
            (b, c.counters.received.load(Ordering::Relaxed))
        });
        let mut c = connect(&addr, Duration::from_secs(5)).unwrap();
        c.writer.write_all(b"hello").unwrap();
        c.writer.flush().unwrap();
        let mut r = [0u8; 2];
        c.reader.read_exact(&mut r).unwrap();
        let (got, recv) = t.join().unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(recv, 5);
        assert_eq!(c.counters.sent.load(Ordering::Relaxed), 5);
        assert_eq!(&r, b"ok");
    }

    #[test]
    fn rate_limit_holds_the_average_whatever_the_write_sizes() {
        let l = RateLimit::new(80_000_000); // 10 MB/s
        let t0 = std::time::Instant::now();
        // 1 MiB writes at t0: the first goes on credit, the rest wait their share.
        let mut now = t0;
        let mut sent = 0usize;
        for _ in 0..20 {
            let wait = l.take_at(1 << 20, now);
            now += wait;
            sent += 1 << 20;
        }
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = sent as f64 / secs;
        assert!(
            (rate - 10e6).abs() / 10e6 < 0.06,
            "{rate} B/s over {secs} s"
        );
        // Idle time refills at most the burst, not an unbounded credit.
        let later = now + Duration::from_secs(10);
        assert!(l.take_at(1 << 20, later) > Duration::from_millis(50));
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("200Mbit"), Some(200_000_000));
        assert_eq!(parse_rate("1.5Gbit"), Some(1_500_000_000));
        assert_eq!(parse_rate("100MB/s"), Some(800_000_000));
        assert_eq!(parse_rate("64MiB"), Some(64 * 8 * 1024 * 1024));
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_rate("10 parsecs"), None);
        assert_eq!(parse_rate("0Mbit"), None);
    }

    #[test]
    fn connect_from_binds_the_local_address() {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let c = connect_from("127.0.0.2".parse().unwrap(), &addr, Duration::from_secs(5)).unwrap();
        let server = l.accept().unwrap();
        assert_eq!(server.peer.ip().to_string(), "127.0.0.2");
        drop(c);
        let late = l.accept_until(std::time::Instant::now() + Duration::from_millis(50));
        assert!(late.is_err(), "nobody else connects");
    }

    #[test]
    fn zero_copy_sends_arrive_intact_and_complete() {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let data: Vec<u8> = (0u32..(4 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        let expect = data.clone();
        let t = std::thread::spawn(move || {
            let mut c = l.accept().unwrap();
            let mut got = vec![0u8; 4 << 20];
            c.reader.read_exact(&mut got).unwrap();
            got
        });
        let mut c = connect(&addr, Duration::from_secs(5)).unwrap();
        let mut data = data;
        let parts: Vec<VolatileSlice<'_>> =
            data.chunks_mut(4096).map(VolatileSlice::from).collect();
        let (counters, limit) = c.writer.get_ref().accounting();
        let mut z = ZeroCopy::new(c.split().socket, counters, limit).unwrap();
        z.send_all(&parts).unwrap();
        z.finish().unwrap();
        assert!(t.join().unwrap() == expect);
        assert_eq!(c.counters.sent.load(Ordering::Relaxed), 4 << 20);
    }

    #[test]
    fn socket_data_splices_into_a_file_at_its_offset_and_eof_is_truncation() {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let data: Vec<u8> = (0u32..(3 << 20) + 100)
            .map(|i| (i * 13 % 251) as u8)
            .collect();
        let sent = data.clone();
        let t = std::thread::spawn(move || {
            let mut c = connect(&addr, Duration::from_secs(5)).unwrap();
            c.writer.write_all(&sent).unwrap();
            c.writer.flush().unwrap();
        });
        let mut c = l.accept().unwrap();
        let dir = std::env::temp_dir().join(format!("lm-splice-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .unwrap();
        let _ = std::fs::remove_file(&dir);
        let src = c.reader.get_mut();
        src.read_to_file(&file, 8192, 3 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        let mut got = vec![0u8; 3 << 20];
        file.read_exact_at(&mut got, 8192).unwrap();
        assert!(got == data[..3 << 20]);
        assert_eq!(c.counters.received.load(Ordering::Relaxed), 3 << 20);
        t.join().unwrap();
        // 100 bytes left, then EOF: asking for more is an error, not a short success.
        let e = src.read_to_file(&file, 0, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn refused_connection_is_a_clear_error() {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let e = connect(&addr, Duration::from_secs(2)).err().unwrap();
        assert!(e.to_string().contains(&addr), "{e}");
    }
}
