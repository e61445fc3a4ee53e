#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    migration::fuzz::stream_frames(&migration::fuzz::rechecksum(data))
});
