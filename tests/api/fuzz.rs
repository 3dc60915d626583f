//! Every parser, fed mutated and truncated real files: an error or a model, never a panic,
//! never an allocation driven by a length the file merely claims (convention 8).

use crate::helpers::*;
use modelpress::formats;
use proptest::prelude::*;

fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(at, v) in flips {
        let n = bytes.len();
        if n > 0 {
            bytes[at % n] = v;
        }
    }
    if let Some(c) = cut {
        let n = bytes.len();
        bytes.truncate(c % (n + 1));
    }
    bytes
}

fn check(rel: &str, flips: &[(usize, u8)], cut: Option<usize>) {
    let bytes = mutate(case_file(rel), flips, cut);
    if let Ok(set) = formats::read_bytes(&bytes) {
        // Whatever parses must also write back and parse again.
        if let Ok(out) = formats::write_bytes(&set) {
            formats::read_bytes(&out).expect("a written model parses");
        }
    }
}

fn edits() -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>)> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        prop::option::of(any::<usize>()),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn onnx_never_panics((flips, cut) in edits()) {
        check("mnist8/mnist-8.onnx", &flips, cut);
    }

    #[test]
    fn safetensors_never_panics((flips, cut) in edits()) {
        check("digits_mlp_control/digits_mlp.safetensors", &flips, cut);
    }

    #[test]
    fn npz_never_panics((flips, cut) in edits()) {
        check("digits_mlp_control/digits_mlp_weights.npz", &flips, cut);
    }

    #[test]
    fn header_bytes_never_panic(flips in prop::collection::vec((0usize..160, any::<u8>()), 1..6)) {
        // Concentrated on the headers, where the lengths live.
        check("digits_mlp_control/digits_mlp.safetensors", &flips, None);
        check("digits_mlp_control/digits_mlp_weights.npz", &flips, None);
        check("mnist8/mnist-8.onnx", &flips, None);
    }
}

#[test]
fn onnx_dims_without_data_do_not_allocate_what_they_claim() {
    use tract_onnx::pb;
    // Typed (not raw) storage, dims of 2^40 elements, two floats present.
    let init = pb::TensorProto {
        name: "w".into(),
        dims: vec![1 << 20, 1 << 20],
        data_type: 1,
        float_data: vec![1.0, 2.0],
        ..Default::default()
    };
    let model = crate::corrupt::onnx_with_initializer(init);
    let err = formats::read_bytes(&model).unwrap_err();
    assert!(err.is_user_error(), "{err}");
}
