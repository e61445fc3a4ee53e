//! The peer: QEMU (Debian's qemu-system-x86_64, KVM) running the same workload guest and the
//! same RAM image, driven over QMP with `-incoming defer`.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(
        "starting {what}: {source} (is qemu-system-x86 installed? scripts/setup.sh installs it)"
    )]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} exited early ({status}); its log: {log}")]
    Exited {
        what: String,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("QMP socket of {what}: {source}")]
    Qmp {
        what: String,
        source: std::io::Error,
    },
    #[error("QMP {cmd} on {what}: {error}")]
    Command {
        what: String,
        cmd: String,
        error: String,
    },
    #[error("{what}: {msg}")]
    Guest { what: String, msg: String },
}

/// A QMP session: one JSON object per line each way; events are skipped.
struct Qmp {
    what: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(what: &str, path: &Path, child: &mut Child, log: &Path) -> Result<Self, QemuError> {
        let t = Instant::now();
        let qerr = |source| QemuError::Qmp {
            what: what.into(),
            source,
        };
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > Duration::from_secs(60) => return Err(qerr(e)),
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(QemuError::Exited {
                            what: what.into(),
                            status,
                            log: std::fs::read_to_string(log).unwrap_or_default(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(qerr)?;
        let mut q = Qmp {
            what: what.into(),
            writer: stream.try_clone().map_err(qerr)?,
            reader: BufReader::new(stream),
        };
        q.read()?; // greeting
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QemuError::Qmp {
                what: self.what.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QemuError::Qmp {
                what: self.what.clone(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| QemuError::Qmp {
            what: self.what.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    fn cmd(&mut self, cmd: &str, args: Value) -> Result<Value, QemuError> {
        let msg = json!({"execute": cmd, "arguments": args}).to_string() + "\n";
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|source| QemuError::Qmp {
                what: self.what.clone(),
                source,
            })?;
        loop {
            let mut r = self.read()?;
            if let Some(v) = r.get_mut("return") {
                return Ok(v.take());
            }
            if let Some(e) = r.get("error") {
                return Err(QemuError::Command {
                    what: self.what.clone(),
                    cmd: cmd.into(),
                    error: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
        }
    }
}

/// How QEMU migrates in one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Tcp,
    Multifd {
        channels: u8,
    },
    MultifdZstd {
        channels: u8,
    },
    /// `postcopy-ram`, switched to post-copy (`migrate-start-postcopy`) once the first pass
    /// is over; the destination measures its vCPUs' blocked time (`postcopy-blocktime`).
    Postcopy,
}

impl Mode {
    fn caps(&self) -> Value {
        let multifd = matches!(self, Mode::Multifd { .. } | Mode::MultifdZstd { .. });
        let postcopy = matches!(self, Mode::Postcopy);
        // auto-converge, as livemig's pre-copy does: throttle the guest when rounds stall.
        json!({"capabilities": [
            {"capability": "multifd", "state": multifd},
            {"capability": "auto-converge", "state": !postcopy},
            {"capability": "postcopy-ram", "state": postcopy},
            {"capability": "postcopy-blocktime", "state": postcopy}
        ]})
    }

    /// Parameters both ends must agree on.
    fn params(&self) -> Value {
        match *self {
            Mode::Tcp | Mode::Postcopy => json!({}),
            Mode::Multifd { channels } => {
                json!({"multifd-channels": channels, "multifd-compression": "none"})
            }
            Mode::MultifdZstd { channels } => {
                json!({"multifd-channels": channels, "multifd-compression": "zstd"})
            }
        }
    }
}

/// What the guest and machine look like; the same for every QEMU process of a bench.
pub struct Machine {
    pub memory: u64,
    pub vcpus: u8,
    pub kernel: PathBuf,
    pub cmdline: String,
    /// (file, guest-physical address) for the source's `-device loader`.
    pub blobs: Vec<(PathBuf, u64)>,
    pub dir: PathBuf,
    pub devices: Option<Devices>,
}

/// A disk and a NIC, as livemig's `--disk` and `--net` give its VMs: modern-only virtio over
/// PCI (`disable-legacy=on`), the disk a raw image both hosts reach, the NIC a tap on each
/// host's bridge (made before QEMU starts: QEMU opens it by name and attaches nothing).
#[derive(Clone, Debug)]
pub struct Devices {
    pub disk: PathBuf,
    pub tap: String,
    pub mac: String,
    pub bridge: String,
    /// The disk as a named block node (`-blockdev`), for a mirror to copy it.
    pub blockdev: bool,
}

impl Devices {
    fn args(&self) -> Vec<String> {
        let drive = if self.blockdev {
            vec![
                "-blockdev".into(),
                format!(
                    "driver=file,filename={},node-name=file0",
                    self.disk.display()
                ),
                "-blockdev".into(),
                "driver=raw,file=file0,node-name=disk0".into(),
            ]
        } else {
            vec![
                "-drive".into(),
                format!("file={},format=raw,if=none,id=disk0", self.disk.display()),
            ]
        };
        drive
            .into_iter()
            .chain([
                "-device".into(),
                "virtio-blk-pci,drive=disk0,disable-legacy=on".into(),
                "-netdev".into(),
                format!("tap,id=net0,ifname={},script=no,downscript=no", self.tap),
                "-device".into(),
                format!(
                    "virtio-net-pci,netdev=net0,mac={},disable-legacy=on",
                    self.mac
                ),
            ])
            .collect()
    }

    /// The tap in `ns`, up on the bridge (again if an earlier QEMU left it).
    fn tap_up(&self, ns: &str) -> Result<(), QemuError> {
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", ns, "ip"])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
        };
        let _ = ip(&["link", "del", &self.tap]);
        for args in [
            vec!["tuntap", "add", "dev", &self.tap, "mode", "tap"],
            vec!["link", "set", &self.tap, "master", &self.bridge, "up"],
        ] {
            let out = ip(&args).map_err(|source| QemuError::Spawn {
                what: "ip".into(),
                source,
            })?;
            if !out.status.success() {
                return Err(QemuError::Guest {
                    what: format!("tap {} in {ns}", self.tap),
                    msg: format!(
                        "ip {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Machine {
    /// A machine for our workload guest: its ELF and command line (TSC rate included) in
    /// `dir`, and the RAM a livemig VM of this content boots with, written in
    /// guest-physical layout as `-device loader` blobs into `ram`.
    pub fn prepare(
        dir: &Path,
        ram: &Path,
        memory: u64,
        vcpus: u8,
        workload: &str,
        content: guest::memory_profile::Content,
    ) -> Result<Machine, crate::BenchError> {
        let step = crate::step;
        std::fs::create_dir_all(ram)?;
        let kernel = dir.join("guest.elf");
        std::fs::write(&kernel, guest::WORKLOAD_ELF)?;
        let spec = guest::WorkloadSpec::parse(workload, memory)
            .map_err(|e| step("--workload")(e.to_string()))?;
        let tsc =
            vmm::vcpu::host_tsc_khz().map_err(|e| step("reading the TSC rate")(e.to_string()))?;
        let ranges: Vec<(u64, u64)> = ram::layout(memory)
            .iter()
            .map(|r| (r.guest, r.len))
            .collect();
        let blobs = content
            .filler(&ranges, spec.written_bytes())
            .and_then(|f| f.write_blobs(&ranges, 2 << 20, 1 << 30, ram))
            .map_err(|e| step("RAM image")(e.to_string()))?;
        Ok(Machine {
            memory,
            vcpus,
            kernel,
            cmdline: spec.cmdline(u32::from(vcpus), Some(tsc)),
            blobs: blobs.into_iter().map(|b| (b.path, b.guest_addr)).collect(),
            dir: dir.to_path_buf(),
            devices: None,
        })
    }
}

/// One QEMU process in a host namespace.
pub struct Qemu {
    pub name: String,
    child: Child,
    qmp: Qmp,
    serial: PathBuf,
    pub console: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.qmp.cmd("quit", json!({}));
        host::child::reap(&mut self.child, Duration::from_secs(5));
    }
}

impl Qemu {
    /// Starts QEMU in `ns`: booting with the RAM image (`incoming` false) or waiting for a
    /// migration (`incoming` true, `-incoming defer`).
    pub fn start(m: &Machine, name: &str, ns: &str, incoming: bool) -> Result<Self, QemuError> {
        let qmp = m.dir.join(format!("{name}.qmp"));
        let serial = m.dir.join(format!("{name}.serial"));
        let console = m.dir.join(format!("{name}.console"));
        let log = m.dir.join(format!("{name}.log"));
        for p in [&qmp, &serial] {
            let _ = std::fs::remove_file(p);
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "qemu-system-x86_64"])
            // i440fx with RAM split at 3 GiB: the layout livemig's VMM uses, so the RAM image
            // lands at the same guest-physical addresses.
            .args(["-machine", "pc,max-ram-below-4g=3G", "-accel", "kvm"])
            .args(["-m", &format!("{}M", m.memory >> 20)])
            .args(["-smp", &m.vcpus.to_string()])
            // vCPU threads named "CPU n/KVM", so the migration's CPU leaves them out.
            .args(["-name", "peer,debug-threads=on"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-kernel")
            .arg(&m.kernel)
            .args(["-append", &m.cmdline])
            .arg("-chardev")
            .arg(format!(
                "socket,id=con,path={},server=on,wait=off,logfile={}",
                serial.display(),
                console.display()
            ))
            .args(["-serial", "chardev:con"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(d) = &m.devices {
            d.tap_up(ns)?;
            cmd.args(d.args());
        }
        if incoming {
            cmd.args(["-incoming", "defer"]);
        } else {
            for (file, addr) in &m.blobs {
                cmd.arg("-device")
                    .arg(format!("loader,file={},addr={addr:#x}", file.display()));
            }
        }
        let logf = std::fs::File::create(&log).map_err(|source| QemuError::Spawn {
            what: name.into(),
            source,
        })?;
        let err = logf.try_clone().map_err(|source| QemuError::Spawn {
            what: name.into(),
            source,
        })?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(err)
            .spawn()
            .map_err(|source| QemuError::Spawn {
                what: format!("qemu-system-x86_64 ({name})"),
                source,
            })?;
        let qmp = match Qmp::connect(name, &qmp, &mut child, &log) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Qemu {
            name: name.into(),
            child,
            qmp,
            serial,
            console,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the guest's console shows `what`.
    pub fn wait_console(&self, what: &str, timeout: Duration) -> Result<(), QemuError> {
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.console).unwrap_or_default();
            if text.contains(what) {
                return Ok(());
            }
            if t.elapsed() > timeout {
                return Err(QemuError::Guest {
                    what: self.name.clone(),
                    msg: format!("no {what:?} on the guest console within {timeout:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Destination: accept one migration on `listen` (HOST:PORT).
    pub fn incoming(&mut self, mode: Mode, listen: &str) -> Result<(), QemuError> {
        self.qmp.cmd("migrate-set-capabilities", mode.caps())?;
        self.qmp.cmd("migrate-set-parameters", mode.params())?;
        self.qmp
            .cmd("migrate-incoming", json!({"uri": format!("tcp:{listen}")}))?;
        Ok(())
    }

    /// Source: migrate to `to` (HOST:PORT) and wait for the end; returns `query-migrate`.
    pub fn migrate(
        &mut self,
        mode: Mode,
        to: &str,
        downtime_ms: u64,
        timeout: Duration,
    ) -> Result<Value, QemuError> {
        self.qmp.cmd("migrate-set-capabilities", mode.caps())?;
        let mut p = mode.params();
        // 7.2 caps migration at 128 MiB/s unless told otherwise.
        p["max-bandwidth"] = json!(100u64 << 30);
        p["downtime-limit"] = json!(downtime_ms);
        self.qmp.cmd("migrate-set-parameters", p)?;
        self.qmp
            .cmd("migrate", json!({"uri": format!("tcp:{to}")}))?;
        let t = Instant::now();
        let mut switched = false;
        loop {
            let r = self.qmp.cmd("query-migrate", json!({}))?;
            // The first pass is over once the dirty bitmap was synced a second time.
            if matches!(mode, Mode::Postcopy)
                && !switched
                && r["status"] == "active"
                && r["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2
            {
                self.qmp.cmd("migrate-start-postcopy", json!({}))?;
                switched = true;
            }
            match r["status"].as_str() {
                Some("completed") => return Ok(with_total_time(r, t.elapsed())),
                Some("failed") | Some("cancelled") => {
                    return Err(QemuError::Guest {
                        what: self.name.clone(),
                        msg: format!(
                            "migration {}: {}",
                            r["status"],
                            r["error-desc"].as_str().unwrap_or("no reason given")
                        ),
                    })
                }
                _ if t.elapsed() > timeout => {
                    let _ = self.qmp.cmd("migrate_cancel", json!({}));
                    return Err(QemuError::Guest {
                        what: self.name.clone(),
                        msg: format!("migration did not complete within {timeout:?}"),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The migration's state as this QEMU sees it (on a post-copy destination: its vCPUs'
    /// blocked time).
    pub fn query_migrate(&mut self) -> Result<Value, QemuError> {
        self.qmp.cmd("query-migrate", json!({}))
    }

    /// Destination: serves the disk over NBD on `listen` (HOST:PORT), writable, for the
    /// source's mirror (as libvirt does for a migration without shared storage).
    pub fn export_disk(&mut self, listen: &str) -> Result<(), QemuError> {
        let (host, port) = listen.rsplit_once(':').unwrap_or((listen, "10809"));
        self.qmp.cmd(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": host, "port": port}}}),
        )?;
        self.qmp.cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "exp0", "node-name": "disk0", "name": "disk0", "writable": true}),
        )?;
        Ok(())
    }

    /// Destination, after the migration: the NBD server goes.
    pub fn stop_export(&mut self) -> Result<(), QemuError> {
        self.qmp.cmd("nbd-server-stop", json!({}))?;
        Ok(())
    }

    /// Source: mirrors the disk to the destination's NBD export at `to` (HOST:PORT), a full
    /// copy, then every guest write synchronously (`copy-mode=write-blocking`); returns once
    /// the job is ready (the copy caught up).
    pub fn mirror_disk(&mut self, to: &str, timeout: Duration) -> Result<(), QemuError> {
        let (host, port) = to.rsplit_once(':').unwrap_or((to, "10809"));
        self.qmp.cmd(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "target0", "export": "disk0",
                   "server": {"type": "inet", "host": host, "port": port}}),
        )?;
        self.qmp.cmd(
            "blockdev-mirror",
            json!({"job-id": "mirror0", "device": "disk0", "target": "target0",
                   "sync": "full", "copy-mode": "write-blocking"}),
        )?;
        let t = Instant::now();
        loop {
            let jobs = self.qmp.cmd("query-block-jobs", json!({}))?;
            let job = jobs
                .as_array()
                .and_then(|j| j.iter().find(|j| j["device"] == "mirror0"));
            match job {
                Some(j) if j["ready"] == true => return Ok(()),
                Some(_) => {}
                None => {
                    return Err(QemuError::Guest {
                        what: self.name.clone(),
                        msg: "the disk mirror ended before it was ready".into(),
                    })
                }
            }
            if t.elapsed() > timeout {
                let _ = self.qmp.cmd(
                    "block-job-cancel",
                    json!({"device": "mirror0", "force": true}),
                );
                return Err(QemuError::Guest {
                    what: self.name.clone(),
                    msg: format!("the disk mirror was not ready within {timeout:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Source, after the migration: the ready mirror completes without a switch (its target
    /// holds every write) and goes.
    pub fn end_mirror(&mut self) -> Result<(), QemuError> {
        self.qmp
            .cmd("block-job-cancel", json!({"device": "mirror0"}))?;
        let t = Instant::now();
        loop {
            let jobs = self.qmp.cmd("query-block-jobs", json!({}))?;
            if !jobs
                .as_array()
                .is_some_and(|j| j.iter().any(|j| j["device"] == "mirror0"))
            {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err(QemuError::Guest {
                    what: self.name.clone(),
                    msg: "the disk mirror did not end within 30 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the VM runs (a destination after the migration).
    pub fn wait_running(&mut self, timeout: Duration) -> Result<(), QemuError> {
        let t = Instant::now();
        loop {
            let r = self.qmp.cmd("query-status", json!({}))?;
            if r["status"] == "running" {
                return Ok(());
            }
            if t.elapsed() > timeout {
                return Err(QemuError::Guest {
                    what: self.name.clone(),
                    msg: format!("VM is {} after the migration, not running", r["status"]),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the workload guest to verify its memory (and its disk, first) over COM1;
    /// Ok(detail) only for VERIFY OK after no DISK VERIFY FAIL.
    pub fn verify(&self, timeout: Duration) -> Result<String, QemuError> {
        let gerr = |msg: String| QemuError::Guest {
            what: self.name.clone(),
            msg,
        };
        let mut s =
            UnixStream::connect(&self.serial).map_err(|e| gerr(format!("serial socket: {e}")))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| gerr(format!("serial socket: {e}")))?;
        s.write_all(&[guest::abi::SERIAL_CMD_VERIFY])
            .map_err(|e| gerr(format!("serial socket: {e}")))?;
        let t = Instant::now();
        for line in BufReader::new(s).lines() {
            let line = line.map_err(|e| gerr(format!("waiting for VERIFY on the console: {e}")))?;
            if line.trim().starts_with("DISK VERIFY FAIL") {
                return Err(gerr(format!("guest says: {}", line.trim())));
            }
            if let Some(rest) = line.trim().strip_prefix("VERIFY ") {
                return if rest.starts_with("OK") {
                    Ok(line.trim().to_string())
                } else {
                    Err(gerr(format!("guest says: {}", line.trim())))
                };
            }
            if t.elapsed() > timeout {
                break;
            }
        }
        Err(gerr("the guest did not answer the verify".into()))
    }

    /// CPU seconds used so far by everything but the vCPU threads ("CPU n/KVM"): migration
    /// threads, the main loop, multifd workers (exited threads count in the process total).
    pub fn migration_cpu_seconds(&self) -> f64 {
        let pid = self.pid();
        let process = cpu_of(&format!("/proc/{pid}/stat"));
        let mut vcpus = 0.0;
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                if comm.starts_with("CPU ") && comm.trim_end().ends_with("/KVM") {
                    vcpus += cpu_of(&t.path().join("stat").to_string_lossy());
                }
            }
        }
        (process - vcpus).max(0.0)
    }
}

/// QEMU 7.2 sometimes reports a completed migration's `total-time` and `downtime` as 0 (seen
/// at 512 MiB over 10 GbE): then the time from the `migrate` command to the poll that saw it
/// complete stands in (at most one 20 ms poll late), and the downtime is unknown.
fn with_total_time(mut info: Value, polled: Duration) -> Value {
    if info["total-time"].as_u64().unwrap_or(0) == 0 {
        info["total-time"] = json!(polled.as_millis() as u64);
        if let Some(m) = info.as_object_mut() {
            m.remove("downtime");
        }
        info["total-time-from"] = json!("bench polling (QEMU reported 0)");
    }
    info
}

/// utime + stime of a /proc stat file, in seconds.
fn cpu_of(path: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / hz
}

/// Whether QEMU is installed.
pub fn available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_total_time_is_replaced_by_the_polled_time() {
        let info = json!({"status": "completed", "total-time": 0, "downtime": 0});
        let r = with_total_time(info, Duration::from_millis(312));
        assert_eq!(r["total-time"], 312);
        assert!(r.get("downtime").is_none());
        let info = json!({"status": "completed", "total-time": 305, "downtime": 7});
        let r = with_total_time(info.clone(), Duration::from_millis(312));
        assert_eq!(r, info);
    }
}
