#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::token_verify(data));
