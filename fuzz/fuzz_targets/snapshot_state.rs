#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmm::snapshot::check_state_file(data, 64 << 20);
});
