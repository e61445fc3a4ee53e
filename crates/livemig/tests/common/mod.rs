//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use host::child::{KillOnDrop, Livemig, VmProcess};

pub mod switchover;

pub const BIN: &str = env!("CARGO_BIN_EXE_livemig");

/// The test cluster's CA and one host's credentials, made once per test binary with
/// `livemig tls init`: tests run with the mutual TLS users get by default.
pub fn tls_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tls");
        let out = Command::new(BIN)
            .args([
                "tls", "init", "--host", "test", "--host", "stranger", "--out",
            ])
            .arg(&dir)
            .output()
            .expect("livemig tls init runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// LIVEMIG_TLS_* for a process of the test cluster.
pub fn tls_env() -> Vec<(&'static str, PathBuf)> {
    let d = tls_dir();
    vec![
        ("LIVEMIG_TLS_CERT", d.join("test.pem")),
        ("LIVEMIG_TLS_KEY", d.join("test.key")),
        ("LIVEMIG_TLS_CA", d.join("ca.pem")),
    ]
}

/// The livemig binary under test with the test cluster's credentials, to start processes
/// with the bench crate's helpers.
pub fn livemig_exe() -> Livemig {
    let d = tls_dir();
    Livemig::new(BIN).with_tls(&transport::tls::TlsFiles {
        cert: d.join("test.pem"),
        key: d.join("test.key"),
        ca: d.join("ca.pem"),
    })
}

pub fn wait(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `livemig ARGS` to the end, with the test cluster's credentials.
pub fn livemig(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .envs(tls_env())
        .output()
        .expect("livemig runs")
}

/// A port on 127.0.0.1 nothing listens on, for a listener a test starts next. It lies below
/// the kernel's ephemeral range (32768 and up by default): a port there can be handed to some
/// outgoing connection between this check and the listener's bind. Never the same twice in
/// one test binary, whose tests run at once.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Test binaries run one after another; the pid spreads them over the range anyway.
        let port = 20_000 + (std::process::id().wrapping_mul(7919).wrapping_add(n) % 12_000);
        let port = u16::try_from(port).expect("below 32000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A source VM in this directory (`livemig run`, API `src.sock`, console `src.console`) with
/// `vcpus` vCPUs, its guest beating.
pub fn source_vm(dir: &Path, workload: &str, memory: &str, vcpus: u8) -> VmProcess {
    let vcpus = vcpus.to_string();
    let args: Vec<String> = [
        "--memory",
        memory,
        "--vcpus",
        &vcpus,
        "--workload",
        workload,
        "--console",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([dir.join("src.console").display().to_string()])
    .collect();
    let mut vm = livemig_exe()
        .run(None, &args, &dir.join("src.sock"), None)
        .unwrap();
    vm.wait_heartbeat(2, Duration::from_secs(30)).unwrap();
    vm
}

/// `livemig migrate --api API --to TO EXTRA...` with the test cluster's credentials.
pub fn migrate_to(api: &Path, to: &str, extra: &[&str]) -> Output {
    let mut args = vec!["migrate", "--api", api.to_str().unwrap(), "--to", to];
    args.extend_from_slice(extra);
    livemig(&args)
}

/// A host agent named `name` on a free port of 127.0.0.1, with `l`'s credentials; and the
/// address it listens on.
pub fn agent_with(
    l: &Livemig,
    dir: &Path,
    name: &str,
    args: &[&str],
) -> (host::child::AgentProcess, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut all = vec!["--name", name];
    all.extend_from_slice(args);
    let a = l.host_serve(None, &listen, &dir.join(name), &all).unwrap();
    (a, listen)
}

/// [`agent_with`] the test cluster's credentials.
pub fn agent(dir: &Path, name: &str, args: &[&str]) -> (host::child::AgentProcess, String) {
    agent_with(&livemig_exe(), dir, name, args)
}

/// `livemig drain --from A --to B --report REPORT EXTRA...`, to run or spawn.
pub fn drain_cmd(
    from: &host::child::AgentProcess,
    to: &host::child::AgentProcess,
    report: &Path,
    extra: &[&str],
) -> Command {
    let mut c = Command::new(BIN);
    c.args(["drain", "--from"])
        .arg(&from.sock)
        .arg("--to")
        .arg(&to.sock)
        .arg("--report")
        .arg(report)
        .args(extra)
        .envs(tls_env());
    c
}

/// Starts VMs (NAME, MEMORY, WORKLOAD) on `a` and waits for their guests' first heartbeat.
pub fn start_vms(a: &host::child::AgentProcess, vms: &[(&str, &str, &str)]) {
    start_vms_with(a, vms, &[]);
}

/// [`start_vms`] with more `livemig run` arguments for each.
pub fn start_vms_with(a: &host::child::AgentProcess, vms: &[(&str, &str, &str)], extra: &[&str]) {
    for (i, (name, memory, workload)) in vms.iter().enumerate() {
        let seed = (i + 1).to_string();
        let mut args = vec![
            "host",
            "run",
            "--host",
            a.sock.to_str().unwrap(),
            "--name",
            name,
            "--memory",
            memory,
            "--vcpus",
            "1",
            "--workload",
            workload,
            "--seed",
            &seed,
        ];
        args.extend_from_slice(extra);
        let out = livemig(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait(
        Duration::from_secs(120),
        "every guest's first heartbeat",
        || {
            a.client()
                .list()
                .is_ok_and(|l| l.iter().all(|v| v.heartbeat >= 1))
        },
    );
}

/// Builds the foreign PVH guest (tests/fixtures/hello_pvh.S) with the host C compiler.
pub fn build_foreign_kernel(dir: &Path) -> PathBuf {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let out = dir.join("hello.elf");
    let st = Command::new("cc")
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-Wl,--no-warn-rwx-segments",
        ])
        .arg(format!(
            "-Wl,-T,{}",
            fixtures.join("hello_pvh.ld").display()
        ))
        .arg("-o")
        .arg(&out)
        .arg(fixtures.join("hello_pvh.S"))
        .status()
        .expect("the host C compiler runs");
    assert!(st.success(), "building the foreign PVH kernel failed");
    out
}

/// The testbed's hosts for one test, removed when dropped.
pub struct Hosts {
    name: String,
}

impl Hosts {
    pub fn up(name: &str) -> Hosts {
        let out = std::process::Command::new(BIN)
            .args(["testbed", "up", "--name", name, "--scale", "0.2"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Hosts { name: name.into() }
    }
    pub fn ns(&self, side: &str) -> String {
        format!("{}-{side}", self.name)
    }
    /// Takes link `link`'s B end down or up: a blackhole, no RST, nothing.
    pub fn link(&self, link: &str, up: bool) {
        let dev = format!("{}-{link}-b", self.name);
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns("b"), "ip", "link", "set", &dev])
            .arg(if up { "up" } else { "down" })
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::process::Command::new(BIN)
            .args(["testbed", "down", "--name", &self.name])
            .output();
    }
}

pub fn status(api: &Path) -> Option<serde_json::Value> {
    let out = livemig(&["status", "--api", api.to_str().unwrap()]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// The running VM's disk: it holds the image's lock and its guest's acknowledged writes.
pub fn disk_state(api: &Path) -> (bool, u64) {
    let st = status(api).expect("the VM answers");
    assert_eq!(st["state"], "running", "{st}");
    let locked = st["devices"][0]["locked"].as_bool().unwrap();
    let acked = st["guest"]["disk"]["acked_writes"].as_u64().unwrap_or(0);
    (locked, acked)
}

/// Whether some open file description holds a lock on the image that excludes a writer.
pub fn image_locked(img: &Path) -> bool {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_GETLK reads and writes the flock we pass for the duration of the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    fl.l_type != libc::F_UNLCK as i16
}

pub fn verified_with_disk(report: &Path) -> serde_json::Value {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["guest_verified"], true, "{}", r["guest_verify"]);
    assert!(
        r["guest_verify"].to_string().contains("disk blocks="),
        "the guest checked its disk: {}",
        r["guest_verify"]
    );
    r
}

/// Forwards every connection `l` accepts to port `to`, both ways, untouched.
fn forward_all(l: &TcpListener, to: u16) {
    for c in l.incoming() {
        let Ok(a) = c else { return };
        let Ok(b) = TcpStream::connect(("127.0.0.1", to)) else {
            return;
        };
        for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut into);
                let _ = into.shutdown(std::net::Shutdown::Both);
            });
        }
    }
}

/// Forwards the source's connection to `to` until the source sends its state (the VM is
/// paused, its disk handed over); then kills the destination and cuts the connection.
pub fn kill_at_switchover(listen: u16, to: u16, victim: u32) {
    let l = TcpListener::bind(("127.0.0.1", listen)).unwrap();
    std::thread::spawn(move || {
        let Ok((mut a, _)) = l.accept() else { return };
        // Connections after the control connection (post-copy's) pass untouched.
        std::thread::spawn(move || forward_all(&l, to));
        let mut b = TcpStream::connect(("127.0.0.1", to)).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
        });
        // The hello is 16 bytes, then each frame a 24-byte header (kind first, payload
        // length at 8) and its payload.
        let (mut seen, mut next, mut hdr) = (0u64, 16u64, Vec::new());
        let mut buf = vec![0u8; 64 << 10];
        'copy: loop {
            let k = match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => k,
            };
            for (i, &byte) in buf[..k].iter().enumerate() {
                if seen >= next {
                    hdr.push(byte);
                    if hdr.len() == 24 {
                        if hdr[0] == 5 {
                            let _ = b.write_all(&buf[..i]);
                            // SAFETY: kill(2) touches no memory of ours.
                            unsafe {
                                libc::kill(libc::pid_t::try_from(victim).unwrap(), libc::SIGKILL)
                            };
                            break 'copy;
                        }
                        next += 24 + u64::from(u32::from_le_bytes(hdr[8..12].try_into().unwrap()));
                        hdr.clear();
                    }
                }
                seen += 1;
            }
            if b.write_all(&buf[..k]).is_err() {
                break;
            }
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
    });
}

pub fn progress(api: &Path) -> Option<migration::Progress> {
    vmm::api::Client::new(api)
        .with_timeout(Duration::from_secs(2))
        .call::<Option<migration::Progress>>("GET", "/vm/migration", None)
        .ok()
        .flatten()
}

/// Waits until the migration on `api` is in `phase` with at least `bytes` on the wire.
pub fn wait_progress(api: &Path, phase: &str, bytes: u64) {
    wait(
        Duration::from_secs(60),
        &format!("migration in {phase}"),
        || progress(api).is_some_and(|p| p.phase == phase && p.bytes_on_wire >= bytes),
    );
}

/// A 128 MiB, 1-vCPU VM running `workload` with the image `img` as its disk (in namespace
/// `ns`, its console and API in `dir`), once its guest's heartbeat shows.
pub fn disk_vm(
    exe: &Livemig,
    ns: Option<&str>,
    dir: &Path,
    img: &Path,
    workload: &str,
) -> VmProcess {
    let args: Vec<String> = [
        "--memory",
        "128M",
        "--vcpus",
        "1",
        "--workload",
        workload,
        "--disk",
        &format!("path={}", img.display()),
        "--console",
        &dir.join("src.console").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = exe.run(ns, &args, &dir.join("src.sock"), None).unwrap();
    vm.wait_heartbeat(2, Duration::from_secs(30)).unwrap();
    vm
}
