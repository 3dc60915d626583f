//! The model.mpz archive reader (`modelpress decompress`): an error or the rebuilt model,
//! never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelpress::formats::{self, mpz};

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = mpz::read(data) {
        let _ = formats::write_bytes(&set);
    }
});
