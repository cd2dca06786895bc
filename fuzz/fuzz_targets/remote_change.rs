#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::remote_change(data));
