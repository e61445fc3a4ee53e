//! A raw disk image and its lock: one writer per image across every host that reaches it
//! (open file description locks, which NFS and SMB carry to the server), readers share.
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub const SECTOR: u64 = 512;

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ImageError {
    /// opening {path}: {source}
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// {path} is locked by another process: another VM has this disk open
    Locked { path: PathBuf },
    /// locking {path}: {source}
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Image {
    file: File,
    path: PathBuf,
    readonly: bool,
    locked: AtomicBool,
}

impl Image {
    /// Opens the image (not yet locked).
    pub fn open(path: &Path, readonly: bool) -> Result<Self, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| ImageError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Image {
            file,
            path: path.to_path_buf(),
            readonly,
            locked: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Bytes in the image.
    pub fn size(&self) -> std::io::Result<u64> {
        self.file.metadata().map(|m| m.len())
    }

    /// Takes the image's lock: exclusive for a writer, shared for a reader; refused while
    /// another process holds a conflicting one. Holding it already is fine.
    pub fn lock(&self) -> Result<(), ImageError> {
        if self.locked.load(Ordering::SeqCst) {
            return Ok(());
        }
        let kind = if self.readonly {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        };
        match self.set_lock(kind) {
            Ok(()) => {
                self.locked.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                Err(ImageError::Locked {
                    path: self.path.clone(),
                })
            }
            Err(source) => Err(ImageError::Lock {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Writes what the image holds to stable storage, then lets go of its lock.
    pub fn flush_and_unlock(&self) -> Result<(), ImageError> {
        let err = |source| ImageError::Lock {
            path: self.path.clone(),
            source,
        };
        self.flush().map_err(err)?;
        if self.locked.swap(false, Ordering::SeqCst) {
            self.set_lock(libc::F_UNLCK).map_err(err)?;
        }
        Ok(())
    }

    pub fn locked(&self) -> bool {
        self.locked.load(Ordering::SeqCst)
    }

    fn set_lock(&self, kind: i32) -> std::io::Result<()> {
        let fl = libc::flock {
            l_type: kind as i16,
            l_whence: libc::SEEK_SET as i16,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        // SAFETY: F_OFD_SETLK reads the flock we pass by pointer for the duration of the call;
        // the fd is ours and open.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    pub fn flush(&self) -> std::io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One writer: a second open of the image is refused its lock until the first lets go;
    /// readers share.
    #[test]
    fn one_writer_per_image() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let a = Image::open(f.path(), false).unwrap();
        let b = Image::open(f.path(), false).unwrap();
        a.lock().unwrap();
        a.lock().unwrap();
        let e = b.lock().unwrap_err();
        assert!(matches!(e, ImageError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("another VM has this disk open"));
        let r = Image::open(f.path(), true).unwrap();
        assert!(matches!(r.lock(), Err(ImageError::Locked { .. })));
        a.flush_and_unlock().unwrap();
        assert!(!a.locked());
        b.lock().unwrap();
        assert!(a.lock().is_err());
        b.flush_and_unlock().unwrap();
        r.lock().unwrap();
        Image::open(f.path(), true).unwrap().lock().unwrap();
        assert!(b.lock().is_err(), "a reader holds it");
    }
}
