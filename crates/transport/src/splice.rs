//! Received bytes straight into guest RAM: into its memfd at an offset with splice(2), or
//! into its mapping with read(2), from a plain socket; a buffered copy from anything else (a
//! TLS stream).
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::{CountingReader, Io};

/// A source that can put bytes straight into a file at an offset: how direct page data lands
/// in guest RAM (its memfd) at the page's own place.
pub trait ReadToFile: Read {
    /// Moves the next bytes into `file`, run after run: `len` bytes at `off` for each
    /// `(off, len)` of `runs`. By default through a buffer; sockets splice instead.
    fn read_to_file(&mut self, file: &std::fs::File, runs: &[(u64, usize)]) -> io::Result<()> {
        copy_runs_to_file(self, file, runs)
    }

    /// Fills `dst` (guest RAM's mapping) with the next bytes. By default through a buffer;
    /// sockets read straight into it.
    fn read_to_slice(&mut self, dst: &VolatileSlice<'_>) -> io::Result<()> {
        copy_to_slice(self, dst)
    }
}

/// Reads from `r` into `file` through a buffer, run after run (`len` bytes at `off` each).
fn copy_runs_to_file(
    r: &mut (impl Read + ?Sized),
    file: &std::fs::File,
    runs: &[(u64, usize)],
) -> io::Result<()> {
    runs.iter()
        .try_for_each(|&(off, len)| copy_to_file(r, file, off, len))
}

/// Reads exactly `len` bytes from `r` into `file` at `off` through a buffer.
fn copy_to_file(
    r: &mut (impl Read + ?Sized),
    file: &std::fs::File,
    off: u64,
    len: usize,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    through_buffer(r, len, |chunk, done| {
        file.write_all_at(chunk, off + done as u64)
    })
}

/// Fills `dst` from `r` through a buffer.
fn copy_to_slice(r: &mut (impl Read + ?Sized), dst: &VolatileSlice<'_>) -> io::Result<()> {
    through_buffer(r, dst.len(), |chunk, done| {
        dst.write_slice(chunk, done).map_err(io::Error::other)
    })
}

/// Reads exactly `len` bytes from `r` in buffer-sized chunks, handing each to `put` with
/// how much came before it.
fn through_buffer(
    r: &mut (impl Read + ?Sized),
    len: usize,
    mut put: impl FnMut(&[u8], usize) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(256 << 10)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len());
        r.read_exact(&mut buf[..n])?;
        put(&buf[..n], done)?;
        done += n;
    }
    Ok(())
}

impl<T: AsRef<[u8]>> ReadToFile for io::Cursor<T> {}

impl ReadToFile for CountingReader<Io> {
    /// From a plain socket: socket → pipe → file with splice(2), so the kernel copies the
    /// received data into the file's pages once, with no user-space copy and no page faults on
    /// a mapping (which cost more than the copy itself when the pages are new). From TLS: the
    /// data must be decrypted in user space first, so through a buffer.
    fn read_to_file(&mut self, file: &std::fs::File, runs: &[(u64, usize)]) -> io::Result<()> {
        let fd = match &self.inner {
            Io::Plain(s) => s.as_raw_fd(),
            Io::Tls(_) => return copy_runs_to_file(self, file, runs),
        };
        self.splice_to_file(fd, file, runs)
            .map_err(|e| self.info.explain(e, "to send page data"))
    }

    /// From a plain socket: read(2) straight into the mapping. Unlike a splice into the memfd
    /// it takes no lock on the file, so page streams fill guest RAM in parallel.
    fn read_to_slice(&mut self, dst: &VolatileSlice<'_>) -> io::Result<()> {
        let r = match &self.inner {
            Io::Plain(s) => read_socket_to_slice(s, dst, &self.counters.received),
            Io::Tls(_) => return copy_to_slice(self, dst),
        };
        r.map_err(|e| self.info.explain(e, "to send page data"))
    }
}

/// read(2)s from `s` until `dst` is full, counting what arrives.
fn read_socket_to_slice(
    mut s: &std::net::TcpStream,
    dst: &VolatileSlice<'_>,
    received: &std::sync::atomic::AtomicU64,
) -> io::Result<()> {
    let mut done = 0;
    while done < dst.len() {
        let mut rest = dst.offset(done).map_err(io::Error::other)?;
        let n = match s.read_volatile(&mut rest) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::Interrupted => {
                continue
            }
            Err(VolatileMemoryError::IOError(e)) => return Err(e),
            Err(e) => return Err(io::Error::other(e)),
        };
        received.fetch_add(n as u64, Ordering::Relaxed);
        done += n;
    }
    Ok(())
}

impl CountingReader<Io> {
    /// Socket → pipe → file: the pipe takes up to its size from the socket at once, across
    /// runs, and each run leaves it for its own offset. A batch of scattered pages then costs
    /// one splice from the socket per pipeful, not one per run. Never reads past the runs.
    fn splice_to_file(
        &mut self,
        fd: libc::c_int,
        file: &std::fs::File,
        runs: &[(u64, usize)],
    ) -> io::Result<()> {
        let pipe = match self.pipe.take() {
            Some(p) => self.pipe.insert(p),
            None => self.pipe.insert(Pipe::new()?),
        };
        let mut unread: usize = runs.iter().map(|r| r.1).sum();
        let mut in_pipe = 0;
        for &(off, len) in runs {
            let mut pos = libc::loff_t::try_from(off).map_err(io::Error::other)?;
            let mut left = len;
            while left > 0 {
                if in_pipe == 0 {
                    in_pipe = splice(fd, None, pipe.write.as_raw_fd(), unread.min(pipe.size))?;
                    if in_pipe == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    unread -= in_pipe;
                    self.counters
                        .received
                        .fetch_add(in_pipe as u64, Ordering::Relaxed);
                }
                let m = splice(
                    pipe.read.as_raw_fd(),
                    Some(&mut pos),
                    file.as_raw_fd(),
                    left.min(in_pipe),
                )?;
                if m == 0 {
                    return Err(io::Error::other("splice into the file moved nothing"));
                }
                in_pipe -= m;
                left -= m;
            }
        }
        Ok(())
    }
}

/// A pipe as splice's go-between, as large as the system allows us (fewer round trips).
pub(crate) struct Pipe {
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
