//! A tap device: frames the guest sends go out on it, frames for the guest come in on it.
//! Opening a name that does not exist creates the tap (it goes away with the VM); an existing
//! persistent tap (`ip tuntap add`) is attached to. It is brought up, and put on a bridge
//! when the host says which.
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const SIOCBRADDIF: libc::c_ulong = 0x89a2;

pub struct Tap {
    file: File,
    name: String,
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name and a union of integers and addresses), for which
    // all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s.cast_signed();
    }
    r
}

/// An ioctl on a socket, for interface flags and bridges.
fn sock_ioctl(request: libc::c_ulong, r: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: a plain socket(2) call; the fd is owned by the File below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just opened and own from here on.
    let sock = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: the request is an interface ioctl that reads (and may write) the ifreq we pass,
    // which lives for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, r as *mut libc::ifreq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Opens (or creates) the tap `name`, non-blocking, and brings it up.
    pub fn open(name: &str) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut r = ifreq(name);
        r.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads the ifreq we pass, which lives for the duration of the
        // call, on the tun fd we own.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut r) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.up()?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn up(&self) -> std::io::Result<()> {
        let mut r = ifreq(&self.name);
        sock_ioctl(libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { r.ifr_ifru.ifru_flags };
        r.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        sock_ioctl(libc::SIOCSIFFLAGS, &mut r)
    }

    /// Puts the tap on `bridge` (already there: fine).
    pub fn attach(&self, bridge: &str) -> std::io::Result<()> {
        let mut r = ifreq(&self.name);
        sock_ioctl(libc::SIOCGIFINDEX, &mut r)?;
        // SAFETY: SIOCGIFINDEX filled the ifindex member of the union.
        let index = unsafe { r.ifr_ifru.ifru_ifindex };
        let mut b = ifreq(bridge);
        b.ifr_ifru.ifru_ifindex = index;
        match sock_ioctl(SIOCBRADDIF, &mut b) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            other => other,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// One frame, if one is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one frame; a full queue drops it, as a NIC drops what its link cannot take.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<bool> {
        match (&self.file).write(frame) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }
}
