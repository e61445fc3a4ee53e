//! Builds the workload guest kernel (kernel/*.S, kernel/*.c) into a PVH ELF with the host C
//! toolchain: no extra rustup target, no prebuilt binary.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kernel = dir.join("kernel");
    for f in [
        "entry.S",
        "main.c",
        "devices.c",
        "guest.h",
        "abi.h",
        "link.ld",
    ] {
        println!("cargo:rerun-if-changed=kernel/{f}");
    }
    // cc finds the host compiler the same way it would for any -sys crate.
    let compiler = cc::Build::new()
        .target("x86_64-unknown-linux-gnu")
        .host("x86_64-unknown-linux-gnu")
        .opt_level(2)
        .cargo_metadata(false)
        .get_compiler();
    let elf = out.join("workload.elf");
    let status = Command::new(compiler.path())
        .args([
            "-m64",
            "-O2",
            "-std=gnu11",
            "-Wall",
            "-Werror",
            "-ffreestanding",
            "-fno-builtin",
            "-fno-stack-protector",
            "-fno-pic",
            "-fno-pie",
            "-fno-asynchronous-unwind-tables",
            "-fcf-protection=none",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-mcmodel=small",
            "-nostdlib",
            "-nostartfiles",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-Wl,-n",
            "-Wl,--no-warn-rwx-segments",
        ])
        .arg(format!("-Wl,-T,{}", kernel.join("link.ld").display()))
        .arg("-o")
        .arg(&elf)
        .arg(kernel.join("entry.S"))
        .arg(kernel.join("main.c"))
        .arg(kernel.join("devices.c"))
        .status()
        .expect("the host C compiler runs (install gcc)");
    assert!(
        status.success(),
        "building the workload guest kernel failed"
    );
}
