//! Child livemig processes (a destination, a VM on another host) that the demo and the bench
//! start and must always reap.
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::api::Client;

/// A livemig process serving a VM's API; asked to shut down, then killed, when dropped.
pub struct VmProcess {
    pub child: Child,
    pub api: PathBuf,
}

/// Whether `child` leaves within `timeout`.
pub fn exits_within(child: &mut Child, timeout: Duration) -> bool {
    let t = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if t.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Gives `child` `grace` to leave after it was asked to, then kills and reaps it.
pub fn reap(child: &mut Child, grace: Duration) {
    if !exits_within(child, grace) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl VmProcess {
    /// Whether the process leaves by itself within `timeout`, as a migrated-away source does.
    pub fn wait_exit_for(&mut self, timeout: Duration) -> bool {
        exits_within(&mut self.child, timeout)
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Client::new(&self.api)
                .with_timeout(Duration::from_secs(5))
                .shutdown();
        }
        reap(&mut self.child, Duration::from_secs(5));
    }
}

/// Starts `cmd` and waits until its stderr says `marker` (a receiver saying it listens:
/// connecting to check would take its one accept). Its stderr then goes on into `log`, or
/// nowhere, so it never blocks on a full pipe.
pub fn spawn_until(
    cmd: &mut Command,
    marker: &str,
    timeout: Duration,
    log: Option<PathBuf>,
) -> Result<Child, String> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {:?}: {e}", cmd.get_program()))?;
    let Some(mut err) = child.stderr.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("no stderr pipe".into());
    };
    // A reader thread, so a child that says nothing cannot hold us past the timeout.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut log = log.and_then(|p| std::fs::File::create(p).ok());
        loop {
            match err.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if let Some(f) = &mut log {
                        let _ = std::io::Write::write_all(f, &buf[..n]);
                    }
                    // Once the caller stopped listening, just keep the pipe drained.
                    let _ = tx.send(buf[..n].to_vec());
                }
            }
        }
    });
    let mut seen = Vec::new();
    let t = Instant::now();
    while !String::from_utf8_lossy(&seen).contains(marker) {
        let left = timeout.saturating_sub(t.elapsed());
        let msg = match rx.recv_timeout(left) {
            Ok(chunk) => {
                seen.extend_from_slice(&chunk);
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                format!("no {marker:?} within {timeout:?}")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                format!("it exited: {}", String::from_utf8_lossy(&seen).trim())
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        return Err(msg);
    }
    Ok(child)
}
