//! Each format's round trip keeps untouched tensors bit for bit, on the real cases.

use crate::helpers::*;
use modelpress::compress::{self, NoControl};
use modelpress::formats::{self, Format};
use serde_json::json;

fn roundtrip(rel: &str, format: Format) {
    let bytes = case_file(rel);
    let set = formats::read_bytes(&bytes).unwrap();
    assert_eq!(set.format, format, "{rel}");
    let written = formats::write_bytes(&set).unwrap();
    let again = formats::read_bytes(&written).unwrap();
    assert_eq!(set.tensors.len(), again.tensors.len());
    for a in &set.tensors {
        let b = again.tensors.iter().find(|t| t.name == a.name).unwrap();
        assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape), "{rel}");
        assert!(a.data == b.data, "{rel}: {} changed", a.name);
    }
    // A compression leaves every tensor it does not select bit for bit.
    let plan = compress::parse_plan(&json!({"preset": "int8"}), false).unwrap();
    let out = compress::run(&set.tensors, &plan, &NoControl).unwrap();
    let restored =
        formats::read_bytes(&formats::write_bytes(&set.with_tensors(out.restored)).unwrap())
            .unwrap();
    let mut untouched = 0;
    for (a, r) in set.tensors.iter().zip(&out.report.tensors) {
        let b = restored.tensors.iter().find(|t| t.name == a.name).unwrap();
        if r.methods.is_empty() {
            assert!(a.data == b.data, "{rel}: untouched {} changed", a.name);
            untouched += 1;
        } else {
            assert!(a.data != b.data, "{rel}: {} was meant to change", a.name);
        }
    }
    assert!(untouched > 0, "{rel}");
}

#[test]
fn onnx_roundtrip_is_bit_exact() {
    roundtrip("mnist8/mnist-8.onnx", Format::Onnx);
    roundtrip("silero_vad/silero_vad_16k_sequence.onnx", Format::Onnx);
    roundtrip("digits_mlp_control/digits_mlp.onnx", Format::Onnx);
}

#[test]
fn safetensors_roundtrip_is_bit_exact() {
    roundtrip("silero_vad/silero_vad_16k.safetensors", Format::Safetensors);
    roundtrip(
        "digits_mlp_control/digits_mlp.safetensors",
        Format::Safetensors,
    );
}

#[test]
fn npz_roundtrip_is_bit_exact_and_reads_zip64_headers() {
    roundtrip("digits_mlp_control/digits_mlp_weights.npz", Format::Npz);
    // numpy's savez_compressed output (deflated members, ZIP64 local headers).
    let set = formats::read_bytes(&case_file("mnist8/eval.npz")).unwrap();
    let labels = set.tensors.iter().find(|t| t.name == "labels").unwrap();
    assert_eq!(labels.shape, vec![2000]);
}

#[test]
fn onnx_matmul_and_lstm_axes() {
    let set = formats::read_bytes(&case_file("silero_vad/silero_vad_16k_sequence.onnx")).unwrap();
    let t = |n: &str| set.tensors.iter().find(|t| t.name == n).unwrap().clone();
    assert_eq!(
        t("onnx::LSTM_209").channel_axis(),
        1,
        "LSTM W [1, 4H, in]: the 4H rows"
    );
    assert_eq!(t("encoder.3.weight").channel_axis(), 0);
    assert_eq!(format!("{:?}", t("onnx::LSTM_211").role), "Bias");
    let digits = formats::read_bytes(&case_file("digits_mlp_control/digits_mlp.onnx")).unwrap();
    for w in digits
        .tensors
        .iter()
        .filter(|t| format!("{:?}", t.role) == "Weight")
    {
        // skl2onnx writes MatMul/Gemm weights [in, out]: the output axis is the last.
        assert_eq!(w.channel_axis(), 1, "{}", w.name);
    }
}

#[test]
fn plan_predicts_what_the_run_does() {
    for (rel, spec) in [
        (
            "silero_vad/silero_vad_16k.safetensors",
            json!({"preset": "int8"}),
        ),
        ("mnist8/mnist-8.onnx", json!({"preset": "prune50-int8"})),
        (
            "digits_mlp_control/digits_mlp_weights.npz",
            json!({"pipeline": [{"method": "quantize", "scheme": "affine"}, {"method": "cast", "dtype": "float16", "include": "fc3*", "min_params": 0}]}),
        ),
        // Packed low-bit codes, codebooks (with a zero symbol after pruning), binary,
        // ternary and a fixed-rank factorization: the estimate is the stored size.
        (
            "silero_vad/silero_vad_16k.safetensors",
            json!({"preset": "int4"}),
        ),
        (
            "silero_vad/silero_vad_16k.safetensors",
            json!({"preset": "ternary"}),
        ),
        (
            "digits_mlp_control/digits_mlp.safetensors",
            json!({"preset": "binary"}),
        ),
        (
            "digits_mlp_control/digits_mlp.safetensors",
            json!({"preset": "kmeans4"}),
        ),
        ("mnist8/mnist-8.onnx", json!({"preset": "deep-compression"})),
        (
            "digits_mlp_control/digits_mlp_weights.npz",
            json!({"pipeline": [{"method": "lowrank", "rank": 8}]}),
        ),
    ] {
        let set = formats::read_bytes(&case_file(rel)).unwrap();
        let plan = compress::parse_plan(&spec, false).unwrap();
        let planned = compress::plan(&set.tensors, &plan);
        let out = compress::run(&set.tensors, &plan, &NoControl).unwrap();
        for (p, r) in planned.iter().zip(&out.report.tensors) {
            assert_eq!((&p.name, &p.steps), (&r.name, &r.methods), "{rel}");
            assert_eq!(p.estimated_bytes_after, r.bytes_after, "{rel}: {}", p.name);
        }
    }
}

#[test]
fn untouched_onnx_is_written_exactly_as_prost_reencodes_it() {
    use prost::Message;
    // Typed fields (mnist-8, skl2onnx) and raw_data (silero) both go back where they were.
    for rel in [
        "mnist8/mnist-8.onnx",
        "digits_mlp_control/digits_mlp.onnx",
        "silero_vad/silero_vad_16k_sequence.onnx",
    ] {
        let bytes = case_file(rel);
        let reencoded = tract_onnx::pb::ModelProto::decode(bytes.as_slice())
            .unwrap()
            .encode_to_vec();
        let written = formats::write_bytes(&formats::read_bytes(&bytes).unwrap()).unwrap();
        assert!(written == reencoded, "{rel}");
    }
}
