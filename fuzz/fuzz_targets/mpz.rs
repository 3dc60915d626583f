//! The model.mpz archive reader (`modelpress decompress`): an error or the rebuilt model,
//! never a panic. The archive ends with the sha256 of the rest, so almost every mutation
//! stops at the checksum; each input is also tried with its checksum made to match, which
//! lets mutations reach the header and payload parsers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelpress::compress::archive as mpz;
use modelpress::formats;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let _ = mpz::read(data);
    if data.len() > 32 {
        let mut fixed = data.to_vec();
        let n = fixed.len() - 32;
        let sum = Sha256::digest(&fixed[..n]);
        fixed[n..].copy_from_slice(&sum);
        if let Ok(set) = mpz::read(&fixed) {
            let _ = formats::write_bytes(&set);
        }
    }
});
