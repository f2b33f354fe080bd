//! Fuzz target `quantize`: see `checks::quantize`.
#![no_main]

#[path = "checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::quantize(data));
