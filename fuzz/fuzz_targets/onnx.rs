//! The ONNX reader: an error or a model, never a panic; what parses writes back and parses
//! again, and its graph inputs can be listed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelpress::formats::{self, onnx, Container};

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = onnx::read(data) {
        if let Container::Onnx(c) = &set.container {
            let _ = onnx::graph_inputs(&c.model);
        }
        let _ = formats::inventory(&set);
        if let Ok(out) = formats::write_bytes(&set) {
            onnx::read(&out).expect("a written model parses");
        }
    }
});
