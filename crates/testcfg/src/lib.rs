//! What the machine that builds the tests offers, as cfgs for `#[cfg_attr(..., ignore)]`: a
//! test that cannot run here shows up as ignored, with its reason, in the test runner's own
//! summary, and is never counted as passed.
//!
//! | cfg       | set when                                  |
//! |-----------|-------------------------------------------|
//! | `no_kvm`  | /dev/kvm does not open as a KVM device    |
//! | `no_root` | the build does not run as root            |
//! | `no_qemu` | `qemu-system-x86_64` is not on the PATH   |
//! | `no_etcd` | `etcd` is not on the PATH                 |
//!
//! Call [`emit`] from a crate's build script. A test binary built as root and run without it
//! fails loudly, as it should.
use std::os::fd::AsRawFd;

/// KVM_GET_API_VERSION: `_IO(0xAE, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

/// Whether /dev/kvm opens and answers as KVM.
pub fn kvm() -> bool {
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    else {
        return false;
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and touches no memory of ours; the fd is
    // open for the call.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    v == 12
}

pub fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `tool` is an executable file on the PATH.
pub fn on_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// A path that never exists: tracking it makes cargo run the build script on every build.
const ALWAYS: &str = "/nonexistent/livemig-testcfg";

/// Prints the cfgs for a build script. While something is missing the script runs on every
/// build (so the tests run once it is there); while it is there, only a change of /dev/kvm
/// (its removal) or of the PATH runs it again, and nothing is rebuilt in vain.
pub fn emit() {
    println!("cargo::rustc-check-cfg=cfg(no_kvm)");
    println!("cargo::rustc-check-cfg=cfg(no_root)");
    println!("cargo::rustc-check-cfg=cfg(no_qemu)");
    println!("cargo::rustc-check-cfg=cfg(no_etcd)");
    println!("cargo::rerun-if-changed=/dev/kvm");
    println!("cargo::rerun-if-env-changed=PATH");
    let missing = [
        (!kvm()).then_some("no_kvm"),
        (!root()).then_some("no_root"),
        (!on_path("qemu-system-x86_64")).then_some("no_qemu"),
        (!on_path("etcd")).then_some("no_etcd"),
    ];
    for cfg in missing.iter().flatten() {
        println!("cargo::rustc-cfg={cfg}");
    }
    if missing.iter().any(Option::is_some) {
        println!("cargo::rerun-if-changed={ALWAYS}");
    }
}
