//! Fuzz target `header_structured`: see `checks::header_structured`.
#![no_main]

#[path = "checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::header_structured(data));
