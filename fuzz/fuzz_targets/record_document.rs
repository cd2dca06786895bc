#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::record_document(data));
