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

/// KVM tests run only where /dev/kvm opens; otherwise they say so (never a silent pass).
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        println!("SKIPPED {test}: /dev/kvm is not available");
        eprintln!("SKIPPED {test}: /dev/kvm is not available");
    }
    ok
}

/// Tests that make namespaces and links run only as root; otherwise they say so.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        println!("SKIPPED {test}: needs root");
        eprintln!("SKIPPED {test}: needs root");
    }
    root
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

/// Runs a bench command to the end, fails the test with its output if it failed, and returns
/// what it printed and the bench.json it wrote into `out`.
pub fn run_bench(cmd: &mut Command, out: &Path) -> (String, serde_json::Value) {
    let o = cmd.output().expect("livemig bench runs");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr);
    println!("{stdout}");
    assert!(o.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let json = std::fs::read(out.join("bench.json")).expect("the bench wrote bench.json");
    let b = serde_json::from_slice(&json).expect("bench.json is JSON");
    (stdout, b)
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
