//! The .npz and .npy readers, within the upload path's inflation caps (scaled down so that a
//! bomb is caught quickly): an error or arrays, never a panic or an allocation the file
//! merely claims.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelpress::formats::{self, limits::Inflation, npz};

fuzz_target!(|data: &[u8]| {
    let caps = Inflation {
        max_bytes: 64 << 20,
        max_ratio: 200,
    };
    if let Ok(set) = npz::read_npz_with(data, &caps) {
        let _ = formats::inventory(&set);
        if let Ok(out) = formats::write_bytes(&set) {
            npz::read_npz(&out).expect("a written .npz parses");
        }
    }
    if let Ok(set) = npz::read_npy_file(data) {
        if let Ok(out) = formats::write_bytes(&set) {
            npz::read_npy_file(&out).expect("a written .npy parses");
        }
    }
});
