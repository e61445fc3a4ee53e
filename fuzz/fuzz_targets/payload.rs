#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| migration::fuzz::payload(data));
