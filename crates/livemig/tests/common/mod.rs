//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use host::child::{KillOnDrop, Livemig, VmProcess};

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
