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
