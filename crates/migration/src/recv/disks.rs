//! The destination's copies of the disks a migration brings (`--storage copy`). Each is
//! written at its final path in the disk directory beside a marker, `NAME.livemig-incomplete`,
//! that this receiver holds locked while it copies: until the commit the source's image is the
//! authority, and a copy whose marker is there is not a disk. A migration that fails removes
//! its copies; one whose receiver died leaves a marker nobody holds, and the next receiver
//! that uses the directory removes that copy ([`clean_stale`]).
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::codec;
use crate::protocol::{DiskBlocks, Kind, Prepare, ProtocolError};
use crate::MigrationError;

/// What marks a copy not yet complete: its file name and this.
pub use crate::protocol::INCOMPLETE_SUFFIX as INCOMPLETE;

/// Free space kept beyond what the copies need.
const SPACE_MARGIN: u64 = 64 << 20;

struct Copy {
    name: String,
    path: PathBuf,
    marker: PathBuf,
    /// Held locked until the commit: the copy is ours.
    _marker: File,
    file: File,
    size: u64,
}

/// The disks an incoming migration copies here.
pub struct DiskSink {
    copies: Vec<Copy>,
    scratch: Vec<u8>,
    /// Bytes written into the copies.
    pub bytes: u64,
    committed: bool,
    keep: bool,
}

fn disk_err<'a>(
    c: &'a Copy,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> MigrationError + 'a {
    move |source| MigrationError::Disk {
        disk: c.name.clone(),
        path: c.path.display().to_string(),
        what,
        source,
    }
}

/// Takes an OFD write lock on `f`; false if another open file description holds one.
fn try_lock(f: &File) -> std::io::Result<bool> {
    let fl = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads the flock we pass by pointer for the duration of the call; the
    // fd is open and ours.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// Removes the copies in `dir` whose receiver is gone (their marker is there and nobody holds
/// it); returns the images removed.
pub fn clean_stale(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let marker = entry?.path();
        let Some(name) = marker.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(image) = name.strip_suffix(INCOMPLETE) else {
            continue;
        };
        let f = OpenOptions::new().read(true).write(true).open(&marker)?;
        if !try_lock(&f)? {
            continue;
        }
        let image = dir.join(image);
        match std::fs::remove_file(&image) {
            Ok(()) => removed.push(image.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::remove_file(&marker)?;
        tracing::info!(
            "removed {}: the copy of a migration whose receiver is gone",
            image.display()
        );
    }
    Ok(removed)
}

/// Creates `marker` already locked: made and locked under a name of its own, then linked to
/// its name (which fails if it exists), so no receiver cleaning the directory ever sees it
/// unlocked.
fn locked_marker(dir: &Path, marker: &Path) -> std::io::Result<File> {
    let tmp = dir.join(format!(
        ".livemig-marker-{}-{:x}",
        std::process::id(),
        crate::send::session_id()
    ));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let linked = match try_lock(&f) {
        Ok(true) => std::fs::hard_link(&tmp, marker),
        Ok(false) => Err(std::io::Error::other("locked")),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&tmp);
    linked.map(|()| f)
}

/// Bytes free for an unprivileged writer on the filesystem of `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: statvfs fills the struct we pass for the NUL-terminated path, which outlives the
    // call.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl DiskSink {
    /// The copies for the disks `prep` offers, created empty (sparse) in `dir`; the VM's
    /// configuration then names them. None when it copies no disk. Refused when this host
    /// has no disk directory, a file of that name is there, or the space is not.
    pub fn create(dir: Option<&Path>, prep: &mut Prepare) -> Result<Option<Self>, MigrationError> {
        if prep.disks.is_empty() {
            return Ok(None);
        }
        let Some(dir) = dir else {
            return Err(MigrationError::Refused(
                "the migration copies its disks and this host takes no copies: give its receiver --disk-dir DIR".into(),
            ));
        };
        let refused = |why: String| MigrationError::Refused(why);
        clean_stale(dir).map_err(|e| refused(format!("cleaning {}: {e}", dir.display())))?;
        let mut files: Vec<&str> = prep.disks.iter().map(|d| d.file.as_str()).collect();
        files.sort_unstable();
        if files.windows(2).any(|w| w[0] == w[1]) {
            return Err(refused("two of its disks have the same file name".into()));
        }
        let need: u64 = prep.disks.iter().map(|d| d.allocated).sum();
        let free = free_bytes(dir).map_err(|e| refused(format!("{}: {e}", dir.display())))?;
        if need.saturating_add(SPACE_MARGIN) > free {
            return Err(refused(format!(
                "its disks need {} MiB and {} has {} MiB free",
                need >> 20,
                dir.display(),
                free >> 20
            )));
        }
        let mut sink = DiskSink {
            copies: Vec::new(),
            scratch: Vec::new(),
            bytes: 0,
            committed: false,
            keep: false,
        };
        for d in &prep.disks {
            let path = dir.join(&d.file);
            let marker = dir.join(format!("{}{INCOMPLETE}", d.file));
            let marker_file = locked_marker(dir, &marker)
                .map_err(|e| refused(format!("{}: {e}", marker.display())))?;
            // A guest's disk is for its owner's eyes only.
            let created = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            let file = match created {
                Ok(f) => f,
                Err(e) => {
                    let _ = std::fs::remove_file(&marker);
                    return Err(refused(format!(
                        "{}: {e}; a copy never replaces a file",
                        path.display()
                    )));
                }
            };
            let copy = Copy {
                name: d.name.clone(),
                path: path.clone(),
                marker,
                _marker: marker_file,
                file,
                size: d.size,
            };
            copy.file
                .set_len(d.size)
                .map_err(disk_err(&copy, "sizing the copy"))?;
            sink.copies.push(copy);
            if !prep.vm.set_disk_path(&d.name, path) {
                return Err(refused(format!("the VM has no disk {}", d.name)));
            }
        }
        Ok(Some(sink))
    }

    /// Writes one DiskBlocks frame into its copy.
    pub fn write(&mut self, b: &DiskBlocks<'_>) -> Result<(), MigrationError> {
        let bad = |why: String| ProtocolError::Malformed {
            kind: Kind::DiskBlocks,
            why,
        };
        let c = self
            .copies
            .get(b.disk)
            .ok_or_else(|| bad(format!("disk {} was not offered", b.disk)))?;
        let data = match b.codec {
            None => b.data,
            Some(codec) => {
                codec::decompress(codec, b.data, b.raw_len, &mut self.scratch)
                    .map_err(|e| bad(e.to_string()))?;
                &self.scratch[..]
            }
        };
        let mut at = 0usize;
        for r in &b.runs {
            let end = r.offset + u64::from(r.len);
            if end > c.size {
                return Err(bad(format!(
                    "{} bytes at {:#x} are beyond {} ({} bytes)",
                    r.len, r.offset, c.name, c.size
                ))
                .into());
            }
            if r.zero {
                punch(&c.file, r.offset, u64::from(r.len)).map_err(disk_err(c, "zeroing"))?;
            } else {
                let len = r.len as usize;
                c.file
                    .write_all_at(&data[at..at + len], r.offset)
                    .map_err(disk_err(c, "writing"))?;
                at += len;
            }
        }
        self.bytes += b.raw_len as u64;
        Ok(())
    }

    /// Makes what was written durable (at round ends, so little is left for the switchover).
    pub fn sync(&self) -> Result<(), MigrationError> {
        for c in &self.copies {
            c.file.sync_data().map_err(disk_err(c, "syncing"))?;
        }
        Ok(())
    }

    /// Everything is here: the copies are durable and complete (their markers go).
    pub fn commit(&mut self) -> Result<(), MigrationError> {
        self.sync()?;
        for c in &self.copies {
            std::fs::remove_file(&c.marker).map_err(disk_err(c, "removing the marker"))?;
        }
        if let Some(dir) = self.copies.first().and_then(|c| c.path.parent()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.committed = true;
        Ok(())
    }

    /// The VM runs on the copies: they stay.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for DiskSink {
    /// A migration that did not end with the VM running here leaves no copy behind.
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for c in &self.copies {
            let _ = std::fs::remove_file(&c.path);
            if !self.committed {
                let _ = std::fs::remove_file(&c.marker);
            }
            tracing::info!(
                "removed {}: the migration did not complete",
                c.path.display()
            );
        }
    }
}

/// Makes `len` bytes at `off` read as zeros, freeing their blocks.
fn punch(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on our own open fd; it takes no pointers.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return f.write_all_at(&vec![0u8; len as usize], off);
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DiskOffer, DiskRun};
    use migratable::{DeviceConfig, DiskConfig, VmConfig};

    fn prepare(file: &str) -> Prepare {
        let mut vm = VmConfig::new(1 << 20, 1);
        vm.devices.push(DeviceConfig::Disk(DiskConfig {
            path: PathBuf::from("/src/vm1.img"),
            readonly: false,
        }));
        Prepare {
            vm,
            streams: 0,
            session: 1,
            name: None,
            origin: None,
            generation: None,
            host_cache: None,
            sections: Vec::new(),
            disks: vec![DiskOffer {
                name: "disk0".into(),
                file: file.into(),
                size: 1 << 20,
                allocated: 8192,
            }],
            postcopy: false,
        }
    }

    /// A copy is written where the VM's configuration now points, sparse; a failed migration
    /// leaves nothing; a committed one loses its marker and stays once kept.
    #[test]
    fn copies_are_written_then_removed_or_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = prepare("vm1.img");
        assert!(DiskSink::create(None, &mut p).is_err(), "no disk directory");
        let mut sink = DiskSink::create(Some(dir.path()), &mut p).unwrap().unwrap();
        let path = dir.path().join("vm1.img");
        assert_eq!(
            p.vm.devices[0],
            DeviceConfig::Disk(DiskConfig {
                path: path.clone(),
                readonly: false
            })
        );
        let marker = dir.path().join("vm1.img.livemig-incomplete");
        assert!(marker.exists());
        let data = vec![9u8; 4096];
        let runs = [DiskRun {
            offset: 8192,
            len: 4096,
            zero: false,
        }];
        let b = DiskBlocks {
            disk: 0,
            codec: None,
            runs: runs.to_vec(),
            raw_len: 4096,
            data: &data,
        };
        sink.write(&b).unwrap();
        let beyond = DiskBlocks {
            runs: vec![DiskRun {
                offset: 1 << 20,
                len: 512,
                zero: true,
            }],
            raw_len: 0,
            data: &[],
            ..b
        };
        assert!(sink.write(&beyond).is_err());
        let image = std::fs::read(&path).unwrap();
        assert_eq!(image.len(), 1 << 20);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only its owner reads a guest's disk");
        assert_eq!(&image[8192..12288], &data[..]);
        // A second migration of a disk of that name is refused while this one runs.
        assert!(DiskSink::create(Some(dir.path()), &mut prepare("vm1.img")).is_err());
        assert!(DiskSink::create(None, &mut prepare("vm1.img")).is_err());
        drop(sink);
        assert!(
            !path.exists() && !marker.exists(),
            "a failed copy is removed"
        );

        let mut sink = DiskSink::create(Some(dir.path()), &mut p).unwrap().unwrap();
        sink.commit().unwrap();
        assert!(!marker.exists());
        sink.keep();
        assert!(path.exists());
        // A copy never replaces a file.
        let e = DiskSink::create(Some(dir.path()), &mut prepare("vm1.img"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("never replaces"), "{e}");
    }

    /// The copy of a receiver that died (its marker held by nobody) goes when the directory
    /// is next used.
    #[test]
    fn a_dead_receivers_copy_is_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vm2.img");
        std::fs::write(&image, b"partial").unwrap();
        std::fs::write(dir.path().join("vm2.img.livemig-incomplete"), b"").unwrap();
        std::fs::write(dir.path().join("other.img"), b"a disk").unwrap();
        assert_eq!(clean_stale(dir.path()).unwrap(), vec![image.clone()]);
        assert!(!image.exists());
        assert!(dir.path().join("other.img").exists());
    }
}
