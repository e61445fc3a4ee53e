//! The workload guest is our correctness oracle: it must catch a page that does not hold what
//! it last wrote. Needs /dev/kvm: without it the test is ignored, and says why.
use std::time::Duration;

use guest::WorkloadSpec;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::VerifyResult;
use vmm::{Cmdline, Console, Kernel, Vm, VmConfig};

/// The guest agent ports the VMM serves are the ones the workload guest writes to.
#[test]
fn the_guest_speaks_the_agent_ports_abi() {
    use vmm::devices::abi as vmm_abi;
    let g = guest::abi::HEADER;
    assert_eq!(guest::abi::PORT_HEARTBEAT, vmm_abi::PORT_HEARTBEAT);
    assert_eq!(guest::abi::PORT_COMMAND, vmm_abi::PORT_COMMAND);
    assert_eq!(guest::abi::PORT_RESULT, vmm_abi::PORT_RESULT);
    assert_eq!(guest::abi::PORT_RESULT_LO, vmm_abi::PORT_RESULT_LO);
    assert_eq!(guest::abi::PORT_RESULT_HI, vmm_abi::PORT_RESULT_HI);
    assert_eq!(guest::abi::CMD_NONE, vmm_abi::CMD_NONE);
    assert_eq!(guest::abi::CMD_VERIFY, vmm_abi::CMD_VERIFY);
    assert_eq!(guest::abi::SERIAL_CMD_VERIFY, vmm_abi::SERIAL_CMD_VERIFY);
    assert_eq!(guest::abi::RESULT_VERIFY_OK, vmm_abi::RESULT_VERIFY_OK);
    assert_eq!(guest::abi::RESULT_VERIFY_BAD, vmm_abi::RESULT_VERIFY_BAD);
    assert_eq!(guest::abi::RESULT_PANIC, vmm_abi::RESULT_PANIC);
    assert_eq!(guest::abi::RESULT_READY, vmm_abi::RESULT_READY);
    assert!(g.contains("0x510"), "{g}");
}

fn verify(vm: &Vm) -> Option<VerifyResult> {
    vm.io().status.verify(Duration::from_secs(30))?.last_verify
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_guest_verify_catches_a_corrupted_page() {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    let spec = WorkloadSpec::parse("ws=4M,pattern=seq,rate=100", 64 << 20).unwrap();
    let mut vm = Vm::boot(
        VmConfig::new(64 << 20, 1),
        &Kernel {
            image: guest::WORKLOAD_ELF.into(),
            cmdline: Cmdline::AtBoot(Box::new(move |f| {
                spec.cmdline(u32::from(f.vcpus), f.tsc_khz)
            })),
        },
        &Console::File(console.clone()),
        &vmm::NetOptions::default(),
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
