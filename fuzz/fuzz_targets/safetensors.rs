//! The safetensors reader: an error or a model, never a panic; what parses writes back and
//! parses again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelpress::formats::{self, safetensors};

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = safetensors::read(data) {
        let _ = formats::inventory(&set);
        if let Ok(out) = formats::write_bytes(&set) {
            safetensors::read(&out).expect("a written model parses");
        }
    }
});
