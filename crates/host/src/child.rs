//! Child processes the demo, the benches and the tests start and must always reap: livemig
//! destinations and VMs, QEMU. One place knows how to start them, read what they say and stop
//! them.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::api::Client;

/// Why a child process did not get where it was to go.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ChildError {
    /// starting {program}: {source}
    Start {
        program: String,
        source: std::io::Error,
    },
    /// {program} has no stderr pipe
    NoStderr { program: String },
    /// {program} exited: {stderr}
    Exited { program: String, stderr: String },
    /// {program} did not say {marker:?} within {timeout:?}
    Silent {
        program: String,
        marker: String,
        timeout: Duration,
    },
    /// no heartbeat {n} from the VM behind {api} within {timeout:?}
    NoHeartbeat {
        n: u64,
        api: PathBuf,
        timeout: Duration,
    },
    /// the VM process exited ({status}): {stderr}
    VmExited { status: String, stderr: String },
    /// {what} on {at} did not start: {source}
    NotStarted {
        what: &'static str,
        at: String,
        source: Box<ChildError>,
    },
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

/// A child that is killed and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A livemig process serving a VM's API; asked to shut down, then killed, when dropped.
pub struct VmProcess {
    pub child: Child,
    pub api: PathBuf,
    /// What it said on stderr.
    pub stderr: Stderr,
}

impl VmProcess {
    /// Whether the process leaves by itself within `timeout`, as a migrated-away source does.
    pub fn wait_exit_for(&mut self, timeout: Duration) -> bool {
        exits_within(&mut self.child, timeout)
    }

    /// Waits until its guest sent `n` heartbeats.
    pub fn wait_heartbeat(&mut self, n: u64, timeout: Duration) -> Result<(), ChildError> {
        let t = Instant::now();
        loop {
            if Client::new(&self.api)
                .status()
                .is_ok_and(|st| st.heartbeat >= n)
            {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ChildError::VmExited {
                    status: status.to_string(),
                    stderr: self
                        .stderr
                        .wait_closed(Duration::from_secs(2))
                        .trim()
                        .to_string(),
                });
            }
            if t.elapsed() > timeout {
                return Err(ChildError::NoHeartbeat {
                    n,
                    api: self.api.clone(),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

/// A child's stderr as it arrives, kept (up to a bound) for error messages and tests.
#[derive(Clone, Default)]
pub struct Stderr {
    text: Arc<Mutex<Vec<u8>>>,
    closed: Arc<AtomicBool>,
}

/// Keep at most this much of a child's stderr; a log file gets all of it.
const STDERR_KEEP: usize = 1 << 20;

impl Stderr {
    /// What the child said so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&locks::lock(&self.text)).into_owned()
    }

    /// True once the child closed its stderr (it exited, usually).
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Waits until the child closed its stderr, then returns all of it.
    pub fn wait_closed(&self, timeout: Duration) -> String {
        let t = Instant::now();
        while !self.closed() && t.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.text()
    }

    /// Drains `pipe` on its own thread into the buffer and `log`, so the child never blocks
    /// on a full pipe.
    fn follow(&self, mut pipe: impl Read + Send + 'static, log: Option<PathBuf>) {
        let (text, closed) = (self.text.clone(), self.closed.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut log = log.and_then(|p| std::fs::File::create(p).ok());
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Some(f) = &mut log {
                    let _ = std::io::Write::write_all(f, &buf[..n]);
                }
                let mut t = locks::lock(&text);
                if t.len() + n <= STDERR_KEEP {
                    t.extend_from_slice(&buf[..n]);
                }
            }
            closed.store(true, Ordering::SeqCst);
        });
    }
}

/// Starts `cmd` and waits until its stderr says `marker` (a receiver saying it listens:
/// connecting to check would take its one accept). Its stderr goes on into the returned
/// [`Stderr`] and, if given, into `log`.
pub fn spawn_until(
    cmd: &mut Command,
    marker: &str,
    timeout: Duration,
    log: Option<PathBuf>,
) -> Result<(Child, Stderr), ChildError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ChildError::Start {
            program: program.clone(),
            source,
        })?;
    let Some(pipe) = child.stderr.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ChildError::NoStderr { program });
    };
    let stderr = Stderr::default();
    stderr.follow(pipe, log);
    let t = Instant::now();
    while !stderr.text().contains(marker) {
        let why = if stderr.closed() {
            ChildError::Exited {
                program,
                stderr: stderr.text().trim().to_string(),
            }
        } else if t.elapsed() >= timeout {
            ChildError::Silent {
                program,
                marker: marker.to_string(),
                timeout,
            }
        } else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = child.kill();
        let _ = child.wait();
        return Err(why);
    }
    Ok((child, stderr))
}

/// How to start livemig processes: the binary, the credentials they use, and the network
/// namespace to run them in.
const TLS_VARS: [&str; 4] = [
    "LIVEMIG_TLS_CERT",
    "LIVEMIG_TLS_KEY",
    "LIVEMIG_TLS_CA",
    "LIVEMIG_INSECURE",
];

#[derive(Clone, Debug)]
pub struct Livemig {
    pub exe: PathBuf,
    env: Vec<(String, String)>,
}

impl Livemig {
    pub fn new(exe: impl Into<PathBuf>) -> Self {
        Livemig {
            exe: exe.into(),
            env: Vec::new(),
        }
    }

    fn set_env(mut self, vars: &[&str], values: Vec<(&str, String)>) -> Self {
        self.env.retain(|(k, _)| !vars.contains(&k.as_str()));
        self.env
            .extend(values.into_iter().map(|(k, v)| (k.to_string(), v)));
        self
    }

    /// Processes started from here use these credentials (LIVEMIG_TLS_*).
    pub fn with_tls(self, f: &transport::tls::TlsFiles) -> Self {
        self.set_env(
            &TLS_VARS,
            vec![
                ("LIVEMIG_TLS_CERT", f.cert.display().to_string()),
                ("LIVEMIG_TLS_KEY", f.key.display().to_string()),
                ("LIVEMIG_TLS_CA", f.ca.display().to_string()),
            ],
        )
    }

    /// Processes started from here run plaintext (`--insecure` through its variable).
    pub fn insecure(self) -> Self {
        self.set_env(&TLS_VARS, vec![("LIVEMIG_INSECURE", "true".into())])
    }

    /// VMs started from here put their taps on `bridge` and announce themselves `rounds`
    /// times when they arrive (LIVEMIG_BRIDGE, LIVEMIG_ANNOUNCE_ROUNDS).
    pub fn with_net(self, bridge: Option<&str>, rounds: u32) -> Self {
        let mut v = vec![("LIVEMIG_ANNOUNCE_ROUNDS", rounds.to_string())];
        if let Some(b) = bridge {
            v.push(("LIVEMIG_BRIDGE", b.to_string()));
        }
        self.set_env(&["LIVEMIG_BRIDGE", "LIVEMIG_ANNOUNCE_ROUNDS"], v)
    }

    /// VMs arriving through processes started from here may open disks under `dirs` only.
    pub fn with_storage(self, dirs: &[PathBuf]) -> Self {
        let joined: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        self.set_env(
            &["LIVEMIG_STORAGE"],
            vec![("LIVEMIG_STORAGE", joined.join(","))],
        )
    }

    /// Disks that migrations copy to processes started from here are written in `dir`.
    pub fn with_disk_dir(self, dir: Option<&std::path::Path>) -> Self {
        let v = dir
            .map(|d| vec![("LIVEMIG_DISK_DIR", d.display().to_string())])
            .unwrap_or_default();
        self.set_env(&["LIVEMIG_DISK_DIR"], v)
    }

    /// `livemig ARGS` in namespace `ns` (None: this one).
    pub fn command(&self, ns: Option<&str>) -> Command {
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `livemig receive` on `listen`, its API at `api`, its guest console into `console`;
    /// returns once it listens.
    pub fn receive(
        &self,
        ns: Option<&str>,
        listen: &str,
        api: &Path,
        console: &Path,
        log: Option<PathBuf>,
    ) -> Result<VmProcess, ChildError> {
        let _ = std::fs::remove_file(api);
        let mut cmd = self.command(ns);
        cmd.args(["receive", "--listen", listen, "--api"])
            .arg(api)
            .arg("--console")
            .arg(console);
        let (child, stderr) =
            spawn_until(&mut cmd, "waiting for a VM", Duration::from_secs(30), log).map_err(
                |e| ChildError::NotStarted {
                    what: "livemig receive",
                    at: listen.to_string(),
                    source: Box::new(e),
                },
            )?;
        Ok(VmProcess {
            child,
            api: api.to_path_buf(),
            stderr,
        })
    }

    /// `livemig run ARGS --api API`; returns once its guest sent a heartbeat.
    pub fn run(
        &self,
        ns: Option<&str>,
        args: &[String],
        api: &Path,
        log: Option<PathBuf>,
    ) -> Result<VmProcess, ChildError> {
        let _ = std::fs::remove_file(api);
        let mut cmd = self.command(ns);
        cmd.arg("run").args(args).arg("--api").arg(api);
        let (child, stderr) = spawn_until(&mut cmd, "", Duration::from_secs(5), log)?;
        let mut vm = VmProcess {
            child,
            api: api.to_path_buf(),
            stderr,
        };
        vm.wait_heartbeat(1, Duration::from_secs(120))?;
        Ok(vm)
    }
}

/// `livemig run` options that give a VM `devices`.
pub fn device_args(devices: &[migratable::DeviceConfig]) -> Vec<String> {
    use migratable::DeviceConfig;
    devices
        .iter()
        .flat_map(|d| match d {
            DeviceConfig::Disk(d) => [
                "--disk".to_string(),
                format!(
                    "path={}{}",
                    d.path.display(),
                    if d.readonly { ",readonly=on" } else { "" }
                ),
            ],
            DeviceConfig::Net(n) => ["--net".to_string(), format!("tap={},mac={}", n.tap, n.mac)],
        })
        .collect()
}

/// A `livemig host serve` process. Dropping it stops the agent and every VM process it ran
/// (they outlive an agent by design, but not a test or a bench).
pub struct AgentProcess {
    pub child: Child,
    pub sock: PathBuf,
    pub dir: PathBuf,
    pub stderr: Stderr,
}

impl AgentProcess {
    pub fn client(&self) -> crate::HostClient {
        crate::HostClient::new(&self.sock)
    }

    /// Kills the agent alone (its VMs go on), as a crash would.
    pub fn kill_agent(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills every VM process the agent lists, then the agent.
    fn kill_all(&mut self) {
        if let Ok(vms) = self.client().list() {
            for v in vms {
                if let Ok(pid) = libc::pid_t::try_from(v.pid) {
                    // SAFETY: kill(2) with a pid and a signal number touches no memory.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        self.kill_agent();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill_all();
    }
}

impl Livemig {
    /// `livemig host serve --listen LISTEN --dir DIR ARGS` in namespace `ns`; returns once its
    /// API answers.
    pub fn host_serve(
        &self,
        ns: Option<&str>,
        listen: &str,
        dir: &Path,
        args: &[&str],
    ) -> Result<AgentProcess, ChildError> {
        let mut cmd = self.command(ns);
        cmd.args(["host", "serve", "--listen", listen, "--dir"])
            .arg(dir)
            .args(args);
        let (child, stderr) = spawn_until(
            &mut cmd,
            "host agent",
            Duration::from_secs(30),
            Some(dir.with_extension("log")),
        )
        .map_err(|e| ChildError::NotStarted {
            what: "livemig host serve",
            at: listen.to_string(),
            source: Box::new(e),
        })?;
        Ok(AgentProcess {
            child,
            sock: dir.join("host.sock"),
            dir: dir.to_path_buf(),
            stderr,
        })
    }
}
