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
    Adopted(u32),
}

impl Proc {
    pub fn pid(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted(p) => *p,
        }
    }

    /// How it ended, once it has (a child is reaped here).
    pub fn exited(&mut self) -> Option<String> {
        match self {
            Proc::Child(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
            Proc::Adopted(p) => (!pid_alive(*p)).then(|| format!("pid {p} is gone")),
        }
    }

    pub fn kill(&mut self) {
        match self {
            Proc::Child(c) => {
                let _ = c.kill();
            }
            Proc::Adopted(p) => {
                if let Ok(pid) = libc::pid_t::try_from(*p) {
                    // SAFETY: kill(2) with a pid and a signal number touches no memory.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
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
