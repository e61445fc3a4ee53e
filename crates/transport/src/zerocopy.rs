//! MSG_ZEROCOPY sends from guest RAM: the kernel pins the pages instead of copying them.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::VolatileSlice;

use crate::{Counters, RateLimit};

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
    /// The kernel copied the first sends (the peer is on this host: loopback, veth): from
    /// then on the data goes by sendfile(2) from guest RAM's file, whose page-cache pages the
    /// kernel delivers locally without a copy (zero-copy pages it copies on delivery, with
    /// completion work on top); the rest of the batch it decided in goes as plain sends.
    plain: bool,
}

/// Completions looked at before deciding whether zero-copy pays on this link.
const PROBE_SENDS: u64 = 16;

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
            plain: false,
        })
    }

    /// Sends all of `bufs` with MSG_ZEROCOPY (anything buffered in the connection's writer must
    /// have been flushed first). The memory behind the slices may change while it is sent (a
    /// running guest); the kernel keeps the pages pinned until the send completes.
    pub fn send_all(&mut self, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        if let Some(l) = &self.limit {
            l.take(bufs.iter().map(|b| b.len()).sum())?;
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

    /// Zero-copy sends issued so far (each sendmsg call is one; [`Self::copied`] of them the
    /// kernel reported copying).
    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// Whether the data should go by [`Self::send_file`]: the kernel copied zero-copy sends.
    pub fn prefers_file(&self) -> bool {
        self.plain
    }

    /// Sends `runs` (offset, length) of `file` with sendfile(2), which hands the socket the
    /// file's pages instead of copying them (anything buffered in the connection's writer must
    /// have been flushed first). The file's content may change while it is sent, as with
    /// [`Self::send_all`].
    pub fn send_file(&mut self, file: &std::fs::File, runs: &[(u64, u64)]) -> io::Result<()> {
        if let Some(l) = &self.limit {
            l.take(
                runs.iter()
                    .map(|&(_, len)| usize::try_from(len).unwrap_or(usize::MAX))
                    .sum(),
            )?;
        }
        for &(start, len) in runs {
            let mut off = libc::off_t::try_from(start).map_err(io::Error::other)?;
            let mut left = usize::try_from(len).map_err(io::Error::other)?;
            while left > 0 {
                // SAFETY: sendfile between two descriptors this call keeps open (the borrows),
                // updating `off`, which lives across the call; it touches no other memory.
                let n = unsafe {
                    libc::sendfile(self.fd.as_raw_fd(), file.as_raw_fd(), &mut off, left)
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("guest RAM's file ends at {off}, before the pages sent"),
                    ));
                }
                let n = n.unsigned_abs();
                left -= n;
                self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
            }
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
        let flags = if self.plain { 0 } else { libc::MSG_ZEROCOPY };
        // SAFETY: msghdr points at live iovecs whose buffers are guest RAM mappings kept alive
        // by the caller's slices for the call; with MSG_ZEROCOPY the kernel pins the pages it
        // keeps for later, without it the data is copied before the call returns.
        let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => Ok(None),
                // Too many sends awaiting completion: collect some, then retry.
                Some(libc::ENOBUFS) => self.reap(true).map(|()| None),
                _ => Err(e),
            };
        }
        self.issued += u64::from(!self.plain);
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
                    unsafe { libc::poll(&mut p, 1, 100) };
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
                    self.decide();
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

    /// After the first completions: if the kernel copied most of them, zero-copy only adds
    /// work on this link, and plain sends follow.
    fn decide(&mut self) {
        if !self.plain && self.completed >= PROBE_SENDS && self.copied * 2 >= self.completed {
            self.plain = true;
        }
    }

    /// How the data goes: zero-copy, or plain sends after the kernel copied the first.
    pub fn mechanism(&self) -> &'static str {
        if self.plain {
            "sendfile from guest RAM's file (the kernel copied zero-copy sends on this link)"
        } else {
            "zero-copy (MSG_ZEROCOPY)"
        }
    }

    /// Waits until every send has completed (before the memory may change hands).
    /// Fails if no send completes for `stall` (the peer stopped acknowledging).
    pub fn finish(&mut self, stall: std::time::Duration) -> io::Result<()> {
        let mut last = (self.completed, std::time::Instant::now());
        while self.completed < self.issued {
            self.reap(true)?;
            if self.completed > last.0 {
                last = (self.completed, std::time::Instant::now());
            } else if last.1.elapsed() >= stall {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "timed out after {} s waiting for {} zero-copy sends to complete",
                        stall.as_secs_f64(),
                        self.issued - self.completed
                    ),
                ));
            }
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
