//! One VM of the host as the agent keeps it: its record on disk (so a restarted agent finds it
//! again), its process, and where it is in its life.
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::child::Livemig;
use crate::status::StatusFile;

/// `DIR/vms/NAME/vm.json`: what the agent must know of a VM after a restart.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(super) struct Record {
    pub name: String,
    pub memory: u64,
    pub vcpus: u8,
    /// `local`, or the host it came from.
    pub origin: String,
    pub pid: u32,
    /// The migration it arrived with, if it arrived.
    #[serde(default)]
    pub session: Option<u64>,
    /// The CPU features its guest sees.
    #[serde(default)]
    pub cpu_features: Vec<String>,
}

/// Where a VM is in its life on this host.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Phase {
    Starting,
    Running,
    /// Its receiver waits for or takes the migration.
    Arriving,
    Migrating {
        to: String,
    },
    /// Its migration's switchover outcome is unknown: paused here until the destination
    /// says whether it runs there (then `resume` or `discard`).
    Unresolved(String),
    /// Asked to stop: its process's exit is expected, not a failure.
    Stopping,
    Failed(String),
}

impl Phase {
    /// What `host list` shows when the VM's own status does not say more.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Arriving => "incoming",
            Phase::Migrating { .. } => "migrating",
            Phase::Unresolved(_) => "unresolved",
            Phase::Stopping => "stopping",
            Phase::Failed(_) => "failed",
        }
    }

    /// Memory it holds or will hold on this host.
    pub fn commits_memory(&self) -> bool {
        !matches!(self, Phase::Failed(_))
    }
}

/// A VM process: started by this agent, or found running by it after a restart.
pub(super) enum Proc {
    Child(Child),
    Adopted(Adopted),
}

/// A VM process a previous agent started, held by a pidfd opened once it was proven to be
/// that VM's: whatever later takes its pid, signals reach only it.
pub(super) struct Adopted {
    pid: u32,
    /// None where the kernel has no pidfd_open: the pid and the API socket are checked
    /// before every signal instead.
    pidfd: Option<std::os::fd::OwnedFd>,
    api: PathBuf,
}

impl Adopted {
    /// The process `pid`, if it is the livemig process serving `api`.
    pub fn take(pid: u32, api: &Path) -> Option<Adopted> {
        let pidfd = pidfd_open(pid);
        // Checked after the pidfd is open: the fd then names the process that passed.
        serves(pid, api).then(|| Adopted {
            pid,
            pidfd,
            api: api.to_path_buf(),
        })
    }

    /// A process that was already gone (or was not that VM's) when the agent looked: never
    /// signalled.
    pub fn gone(pid: u32, api: &Path) -> Adopted {
        Adopted {
            pid,
            pidfd: None,
            api: api.to_path_buf(),
        }
    }

    fn has_ended(&self) -> bool {
        match &self.pidfd {
            // A pidfd polls readable once its process has exited.
            Some(fd) => {
                use std::os::fd::AsRawFd;
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd, valid for the call; a zero timeout does not block.
                let n = unsafe { libc::poll(&mut p, 1, 0) };
                n != 0
            }
            None => !serves(self.pid, &self.api),
        }
    }

    fn kill(&self) {
        match &self.pidfd {
            Some(fd) => {
                use std::os::fd::AsRawFd;
                // SAFETY: pidfd_send_signal with a pidfd we own, a signal number, no siginfo
                // and no flags touches no memory of ours.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
            }
            None if serves(self.pid, &self.api) => {
                if let Ok(pid) = libc::pid_t::try_from(self.pid) {
                    // SAFETY: kill(2) with a pid and a signal number touches no memory.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            None => {}
        }
    }
}

/// A pidfd for `pid` (Linux 5.3 and later), or None.
fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; it touches no
    // memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` is a fresh descriptor nothing else owns; the OwnedFd closes it.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

impl Proc {
    pub fn pid(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted(a) => a.pid,
        }
    }

    /// How it ended, once it has (a child is reaped here).
    pub fn exited(&mut self) -> Option<String> {
        match self {
            Proc::Child(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
            Proc::Adopted(a) => a.has_ended().then(|| format!("pid {} is gone", a.pid)),
        }
    }

    pub fn kill(&mut self) {
        match self {
            Proc::Child(c) => {
                let _ = c.kill();
            }
            Proc::Adopted(a) => a.kill(),
        }
    }

    /// Whether it exits within `t`.
    pub fn wait_exit(&mut self, t: Duration) -> bool {
        let start = Instant::now();
        while self.exited().is_none() {
            if start.elapsed() >= t {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

/// Whether `pid` runs (not a zombie).
fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with signal 0 only checks the pid; it touches no memory.
    let r = unsafe { libc::kill(p, 0) };
    // A zombie still answers kill(0); its /proc status says Z.
    r == 0
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
}

/// Whether `pid` is a livemig process serving `api` (not another process that took its pid).
pub(super) fn serves(pid: u32, api: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = api.as_os_str().as_encoded_bytes();
    pid_alive(pid) && cmdline.split(|b| *b == 0).any(|arg| arg == want)
}

pub(super) struct Entry {
    pub rec: Record,
    pub proc: Proc,
    pub phase: Phase,
    pub dir: PathBuf,
}

impl Entry {
    pub fn api(&self) -> PathBuf {
        api_of(&self.dir)
    }

    pub fn status_file(&self) -> StatusFile {
        StatusFile::new(self.dir.join("incoming.json"))
    }

    /// Writes the record (atomically: a crash leaves the old or the new one).
    pub fn save(&self) -> std::io::Result<()> {
        let tmp = self.dir.join("vm.json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&self.rec).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join("vm.json"))
    }

    /// The end of the VM process's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read(self.dir.join("vm.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&text[text.len().saturating_sub(2048)..]).into_owned();
        text.lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

pub(super) fn api_of(dir: &Path) -> PathBuf {
    dir.join("api.sock")
}

pub(super) fn read_record(dir: &Path) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(dir.join("vm.json")).ok()?).ok()
}

/// Starts `livemig ARGS` for a VM in `dir`: its own process group (a signal to the agent's
/// terminal or a restart of the agent leaves it running), its output into `dir/vm.log`.
pub(super) fn spawn(livemig: &Livemig, args: &[String], dir: &Path) -> std::io::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("vm.log"))?;
    livemig
        .command(None)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
}

/// {0:?} is not a VM name (1-64 of A-Z a-z 0-9 - _ ., not starting with .)
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub struct BadName(pub String);

/// A VM name: what fits in a directory name and a URL path segment.
pub(super) fn check_name(name: &str) -> Result<(), BadName> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(BadName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An adopted process is the one proven to serve its API socket: signals reach it, and
    /// nothing that merely has the pid (or is not that VM's) is adopted.
    #[test]
    fn only_the_vm_that_serves_its_socket_is_adopted_and_signalled() {
        let d = tempfile::tempdir().unwrap();
        let api = d.path().join("api.sock");
        let mut vm = std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 30; true")
            .arg(&api)
            .spawn()
            .unwrap();
        // Until the child has exec'd, its command line reads empty.
        let t = Instant::now();
        while !serves(vm.id(), &api) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let other = d.path().join("other.sock");
        assert!(Adopted::take(vm.id(), &other).is_none(), "not that VM's");
        let a = Adopted::take(vm.id(), &api).expect("it serves api.sock");
        assert!(!a.has_ended());
        a.kill();
        let st = vm.wait().unwrap();
        assert!(!st.success());
        assert!(a.has_ended());
        let gone = Adopted::gone(vm.id(), &api);
        assert!(gone.has_ended());
    }

    #[test]
    fn names_are_safe_path_segments() {
        for good in ["web-1", "db_2", "a.b", "X"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "..", ".hidden", "a/b", "a b", "ü", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn our_own_process_is_alive_and_serves_nothing() {
        assert!(pid_alive(std::process::id()));
        assert!(!serves(
            std::process::id(),
            Path::new("/nonexistent/api.sock")
        ));
        assert!(!pid_alive(u32::MAX));
    }
}
