//! The workload guest is our correctness oracle: it must catch a page that does not hold what
//! it last wrote. Needs /dev/kvm; says SKIPPED without it.
use std::time::Duration;

use guest::WorkloadSpec;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::VerifyResult;
use vmm::{Console, Kernel, Vm, VmConfig};

fn verify(vm: &Vm) -> Option<VerifyResult> {
    vm.io().status.verify(Duration::from_secs(30))?.last_verify
}

#[test]
fn kvm_guest_verify_catches_a_corrupted_page() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIPPED kvm_guest_verify_catches_a_corrupted_page: /dev/kvm is not available");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    let spec = WorkloadSpec::parse("ws=4M,pattern=seq,rate=100", 64 << 20).unwrap();
    let mut vm = Vm::boot(
        VmConfig {
            memory: 64 << 20,
            vcpus: 1,
        },
        &Kernel::Workload(spec),
        &Console::File(console.clone()),
        |_| Ok(()),
    )
    .unwrap();
    vm.io()
        .status
        .wait_for(Duration::from_secs(30), |r| r.heartbeat >= 2)
        .expect("heartbeats");
    assert!(matches!(verify(&vm), Some(VerifyResult::Ok { pages }) if pages > 0));

    // The same check asked for over the console, as a VMM without our command port (QEMU) does.
    let st = &vm.io().status;
    let before = st.report().verify_count;
    vm.io()
        .serial
        .lock()
        .unwrap()
        .enqueue_raw_bytes(&[guest::abi::SERIAL_CMD_VERIFY])
        .unwrap();
    let r = st
        .wait_for(Duration::from_secs(30), |r| r.verify_count > before)
        .expect("a verify asked for on COM1 runs");
    assert!(matches!(r.last_verify, Some(VerifyResult::Ok { pages }) if pages > 0));

    // The sequential writer starts at the working set's first page, which the guest announces.
    let text = std::fs::read_to_string(&console).unwrap();
    let base = text
        .split_whitespace()
        .find_map(|t| t.strip_prefix("ws_base=0x"))
        .map(|h| u64::from_str_radix(h, 16).unwrap())
        .expect("the guest prints ws_base");
    vm.pause().unwrap();
    let word: u64 = vm.ram().memory().read_obj(GuestAddress(base)).unwrap();
    assert_ne!(word, 0, "page 0 of the working set is stamped");
    vm.ram()
        .memory()
        .write_obj(word ^ 1, GuestAddress(base))
        .unwrap();
    vm.resume().unwrap();
    assert_eq!(
        verify(&vm),
        Some(VerifyResult::Bad {
            first_bad_addr: base
        })
    );
    assert!(std::fs::read_to_string(&console)
        .unwrap()
        .contains("VERIFY FAIL"));
}
