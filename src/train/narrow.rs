//! Building a narrower student from the teacher (distillation): each hidden layer keeps the
//! teacher's most important channels, and the layers that read those channels keep the
//! matching inputs.
//!
//! A layer is narrowed when its output reaches exactly one weighted consumer through ops that
//! act channel by channel:
//! - producers: `MatMul` and `Gemm` with a 2-D weight initializer (channels on the weight's
//!   output axis, the value's last axis), `Conv` with `group` 1 (channels on axis 1);
//! - on the way: unary activations, pools (convolutions only), and `Add`/`Sub`/`Mul`/`Div`
//!   with a per-channel initializer (a bias: sliced too) or a scalar;
//! - the consumer: `MatMul`/`Gemm` reading the value as its first input, or `Conv` with
//!   `group` 1; its weight keeps the inputs of the kept channels.
//!
//! Anything else (a reshape between a convolution and a dense layer, a residual add, a graph
//! output) leaves the layer as it is, and [`Narrowing::skipped`] says why. Every tensor
//! touched must be read by that one node only.
//!
//! Importance of channel c (Molchanov et al.'s first-order view, data-driven): the RMS of
//! the value the consumer reads, over the training rows, times the L2 norm of the consumer's
//! weights on that input. The kept channels stay in their original order.

use crate::model::Tensor as ModelTensor;
use serde::Serialize;
use std::collections::HashMap;
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto};

/// One layer to narrow.
#[derive(Debug, Clone, Serialize)]
pub struct Cut {
    /// The producing node's weight.
    pub layer: String,
    /// Channels before.
    pub channels: usize,
    /// The kept channels, ascending (filled by [`choose`]).
    pub keep: Vec<usize>,
    /// The value the consumer reads (where importance is measured), and its channel axis.
    pub feature: String,
    #[serde(skip)]
    pub feature_axis: usize,
    /// Tensors sliced to the kept channels: (tensor index, axis).
    #[serde(skip)]
    pub slices: Vec<(usize, usize)>,
    /// The consumer's weight (index, input axis).
    #[serde(skip)]
    pub consumer: (usize, usize),
    /// The consumer's weight name.
    pub into: String,
}

/// The layers that can be narrowed, and why the others cannot.
#[derive(Debug, Clone, Serialize)]
pub struct Narrowing {
    pub cuts: Vec<Cut>,
    pub skipped: Vec<String>,
}

fn attr_int(n: &NodeProto, name: &str, default: i64) -> i64 {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.i)
}

/// How a value's channels lie: on the last axis (dense layers) or on axis 1 (convolutions).
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Last,
    Nchw,
}

const UNARY: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Elu",
    "Selu",
    "Softplus",
    "HardSigmoid",
    "HardSwish",
    "Identity",
];

/// Finds the layers of the main graph that can be narrowed.
pub fn find(model: &ModelProto, tensors: &[ModelTensor]) -> Narrowing {
    let empty = GraphProto::default();
    let g = model.graph.as_ref().unwrap_or(&empty);
    let inits: HashMap<&str, usize> = g
        .initializer
        .iter()
        .filter_map(|i| {
            tensors
                .iter()
                .position(|t| t.name == i.name)
                .map(|k| (i.name.as_str(), k))
        })
        .collect();
    // How many times each name is read, in the main graph and in every subgraph.
    let mut reads: HashMap<String, usize> = HashMap::new();
    fn count(g: &GraphProto, reads: &mut HashMap<String, usize>) {
        for n in &g.node {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                *reads.entry(i.clone()).or_default() += 1;
            }
            for a in &n.attribute {
                for sub in a.g.iter().chain(&a.graphs) {
                    count(sub, reads);
                }
            }
        }
    }
    count(g, &mut reads);
    let outputs: Vec<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    let consumers = |v: &str| -> Vec<&NodeProto> {
        g.node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == v))
            .collect()
    };
    // A 2-D or wider float initializer read by this node only.
    let weight = |name: &str| -> Option<usize> {
        let &k = inits.get(name)?;
        (reads.get(name) == Some(&1) && tensors[k].dtype.is_float()).then_some(k)
    };
    let mut narrowing = Narrowing {
        cuts: Vec::new(),
        skipped: Vec::new(),
    };
    for n in &g.node {
        let Some(w) = n.input.get(1).and_then(|b| weight(b)) else {
            continue;
        };
        let shape = &tensors[w].shape;
        let (layout, out_axis) = match n.op_type.as_str() {
            "MatMul" if shape.len() == 2 => (Layout::Last, 1),
            "Gemm" if shape.len() == 2 => (
                Layout::Last,
                if attr_int(n, "transB", 0) != 0 { 0 } else { 1 },
            ),
            "Conv" if shape.len() >= 3 && attr_int(n, "group", 1) == 1 => (Layout::Nchw, 0),
            _ => continue,
        };
        let name = tensors[w].name.clone();
        let channels = shape[out_axis];
        let mut slices = vec![(w, out_axis)];
        let skip = |why: String| format!("{name}: {why}");
        // The producer's own bias (Gemm's C, broadcast over rows; Conv's B, one value per
        // output channel, 1-D).
        if let Some(b) = n.input.get(2).filter(|b| !b.is_empty()) {
            match per_channel(b, channels, Layout::Last, &weight, tensors) {
                Ok(Some(s)) => slices.push(s),
                Ok(None) => {}
                Err(why) => {
                    narrowing.skipped.push(skip(why));
                    continue;
                }
            }
        }
        let Some(mut v) = n.output.first().cloned() else {
            continue;
        };
        let found = loop {
            if outputs.contains(&v.as_str()) {
                break Err(format!("{v:?} is a graph output"));
            }
            let cs = consumers(&v);
            let [c] = cs.as_slice() else {
                break Err(format!("{v:?} is read by {} nodes", cs.len()));
            };
            if c.input.iter().filter(|i| **i == v).count() != 1 {
                break Err(format!("{} reads {v:?} twice", c.op_type));
            }
            let op = c.op_type.as_str();
            let next = c.output.first().cloned().unwrap_or_default();
            if UNARY.contains(&op)
                || (layout == Layout::Nchw && matches!(op, "MaxPool" | "AveragePool"))
            {
                if c.output.len() != 1 {
                    break Err(format!("{op} has several outputs"));
                }
                v = next;
                continue;
            }
            if matches!(op, "Add" | "Sub" | "Mul" | "Div") {
                let other = c
                    .input
                    .iter()
                    .find(|i| **i != v)
                    .cloned()
                    .unwrap_or_default();
                match per_channel(&other, channels, layout, &weight, tensors) {
                    Ok(Some(s)) => slices.push(s),
                    Ok(None) => {}
                    Err(why) => break Err(format!("{op}: {why}")),
                }
                v = next;
                continue;
            }
            let first = c.input.first() == Some(&v);
            let consumer = c.input.get(1).and_then(|b| weight(b));
            let axis = match (op, layout, consumer) {
                ("MatMul", Layout::Last, Some(k)) if first && tensors[k].shape.len() == 2 => {
                    Some((k, 0))
                }
                ("Gemm", Layout::Last, Some(k))
                    if first && attr_int(c, "transA", 0) == 0 && tensors[k].shape.len() == 2 =>
                {
                    Some((k, if attr_int(c, "transB", 0) != 0 { 1 } else { 0 }))
                }
                ("Conv", Layout::Nchw, Some(k))
                    if first && attr_int(c, "group", 1) == 1 && tensors[k].shape.len() >= 3 =>
                {
                    Some((k, 1))
                }
                _ => None,
            };
            match axis {
                Some((k, a)) if tensors[k].shape[a] == channels => {
                    break Ok((k, a, v.clone()));
                }
                Some(_) => break Err(format!("{op} reads a different width")),
                None => break Err(format!("{op} after it does not act channel by channel")),
            }
        };
        match found {
            Ok((k, a, feature)) => {
                slices.push((k, a));
                narrowing.cuts.push(Cut {
                    layer: name,
                    channels,
                    keep: (0..channels).collect(),
                    feature,
                    feature_axis: if layout == Layout::Last {
                        usize::MAX
                    } else {
                        1
                    },
                    slices,
                    consumer: (k, a),
                    into: tensors[k].name.clone(),
                });
            }
            Err(why) => narrowing.skipped.push(skip(why)),
        }
    }
    // A tensor sliced by two cuts on the same axis would be cut twice: keep the first.
    let mut taken: Vec<(usize, usize)> = Vec::new();
    let mut kept = Vec::new();
    for c in std::mem::take(&mut narrowing.cuts) {
        if c.slices.iter().any(|s| taken.contains(s)) {
            narrowing
                .skipped
                .push(format!("{}: shares a tensor with another layer", c.layer));
            continue;
        }
        taken.extend(&c.slices);
        kept.push(c);
    }
    narrowing.cuts = kept;
    narrowing
}

/// The slice a per-channel operand takes: Some((tensor, axis)), None for a scalar, or why
/// it cannot be sliced.
fn per_channel(
    name: &str,
    channels: usize,
    layout: Layout,
    weight: &dyn Fn(&str) -> Option<usize>,
    tensors: &[ModelTensor],
) -> Result<Option<(usize, usize)>, String> {
    let k = weight(name).ok_or_else(|| format!("{name:?} is not a weight read once"))?;
    let s = &tensors[k].shape;
    let count: usize = s.iter().product();
    if count == 1 {
        return Ok(None);
    }
    // Right-aligned broadcast: the channel axis is the last one, or the third from the end
    // for NCHW values ([C, 1, 1] or [1, C, 1, 1]).
    let axis = match layout {
        Layout::Last => s.len().checked_sub(1),
        Layout::Nchw => s.len().checked_sub(3),
    };
    match axis {
        Some(a) if s[a] == channels && count == channels => Ok(Some((k, a))),
        _ => Err(format!(
            "{name:?} of shape {s:?} is not one value per channel"
        )),
    }
}

/// Chooses the `keep` most important channels of each cut, from the per-channel RMS of the
/// feature each cut names (`rms[i]` for `cuts[i]`).
pub fn choose(narrowing: &mut Narrowing, tensors: &[ModelTensor], rms: &[Vec<f64>], width: f64) {
    for (c, r) in narrowing.cuts.iter_mut().zip(rms) {
        let norms = axis_norms(&tensors[c.consumer.0], c.consumer.1);
        let importance: Vec<f64> = (0..c.channels)
            .map(|i| r.get(i).copied().unwrap_or(0.0) * norms.get(i).copied().unwrap_or(0.0))
            .collect();
        let k = ((c.channels as f64 * width).round() as usize).clamp(1, c.channels);
        let mut order: Vec<usize> = (0..c.channels).collect();
        // Most important first; ties by index, so the choice is deterministic.
        order.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]).then(a.cmp(&b)));
        let mut keep = order[..k].to_vec();
        keep.sort_unstable();
        c.keep = keep;
    }
}

/// L2 norm of each slice of `t` along `axis`.
fn axis_norms(t: &ModelTensor, axis: usize) -> Vec<f64> {
    let v = t.to_f32().unwrap_or_default();
    let d = t.shape[axis];
    let inner: usize = t.shape[axis + 1..].iter().product();
    let mut out = vec![0.0f64; d];
    for (i, x) in v.iter().enumerate() {
        out[(i / inner) % d] += f64::from(*x).powi(2);
    }
    out.iter().map(|s| s.sqrt()).collect()
}

/// `t` with only the indices `keep` along `axis`.
pub fn slice(t: &ModelTensor, axis: usize, keep: &[usize]) -> ModelTensor {
    let size = t.dtype.size();
    let d = t.shape[axis];
    let inner = t.shape[axis + 1..].iter().product::<usize>() * size;
    let outer: usize = t.shape[..axis].iter().product();
    let mut data = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let at = (o * d + k) * inner;
            data.extend_from_slice(&t.data[at..at + inner]);
        }
    }
    let mut shape = t.shape.clone();
    shape[axis] = keep.len();
    ModelTensor {
        shape,
        data,
        ..t.clone()
    }
}

/// The student's tensors: every cut applied.
pub fn apply(narrowing: &Narrowing, tensors: &[ModelTensor]) -> Vec<ModelTensor> {
    let mut out = tensors.to_vec();
    for c in &narrowing.cuts {
        for &(k, axis) in &c.slices {
            out[k] = slice(&out[k], axis, &c.keep);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DType, Role};

    fn tensor(name: &str, shape: &[usize], values: &[f32]) -> ModelTensor {
        ModelTensor {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            role: Role::Weight,
            output_axis: None,
        }
    }

    /// The obvious slice: index arithmetic written out per element.
    fn slice_reference(t: &ModelTensor, axis: usize, keep: &[usize]) -> Vec<f32> {
        let v = t.to_f32().unwrap();
        let rank = t.shape.len();
        let mut shape = t.shape.clone();
        shape[axis] = keep.len();
        let count: usize = shape.iter().product();
        (0..count)
            .map(|flat| {
                let mut idx = vec![0; rank];
                let mut r = flat;
                for a in (0..rank).rev() {
                    idx[a] = r % shape[a];
                    r /= shape[a];
                }
                idx[axis] = keep[idx[axis]];
                let src = idx.iter().zip(&t.shape).fold(0, |src, (i, d)| src * d + i);
                v[src]
            })
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn slice_matches_reference(
            dims in proptest::collection::vec(1usize..5, 1..4),
            axis_pick in 0usize..8,
            keep_seed in 0u64..1000,
        ) {
            let axis = axis_pick % dims.len();
            let n: usize = dims.iter().product();
            let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let t = tensor("w", &dims, &values);
            let keep: Vec<usize> = (0..dims[axis]).filter(|i| (keep_seed >> i) & 1 == 1).collect();
            let keep = if keep.is_empty() { vec![0] } else { keep };
            let got = slice(&t, axis, &keep);
            proptest::prop_assert_eq!(got.to_f32().unwrap(), slice_reference(&t, axis, &keep));
            proptest::prop_assert_eq!(got.shape[axis], keep.len());
        }
    }

    /// A shared case's ONNX model and the layers `find` finds in it.
    fn found(rel: &str) -> (crate::formats::TensorSet, Narrowing) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/cases")
            .join(rel);
        let set = crate::formats::read_path(&path).unwrap();
        let crate::formats::Container::Onnx(c) = &set.container else {
            panic!("not onnx")
        };
        let n = find(&c.model, &set.tensors);
        (set, n)
    }

    #[test]
    fn digits_mlp_narrows_both_hidden_layers() {
        let (set, mut n) = found("digits_mlp_control/digits_mlp.onnx");
        let layers: Vec<(&str, &str, usize)> = n
            .cuts
            .iter()
            .map(|c| (c.layer.as_str(), c.into.as_str(), c.channels))
            .collect();
        assert_eq!(
            layers,
            [
                ("coefficient", "coefficient1", 256),
                ("coefficient1", "coefficient2", 128)
            ]
        );
        // The output layer feeds Softmax and the graph's outputs: it keeps its 10 classes.
        assert_eq!(n.skipped.len(), 1, "{:?}", n.skipped);
        let rms = vec![vec![1.0; 256], vec![1.0; 128]];
        choose(&mut n, &set.tensors, &rms, 0.5);
        let student = apply(&n, &set.tensors);
        let shape = |name: &str| {
            student
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.shape.clone())
                .unwrap()
        };
        assert_eq!(shape("coefficient"), [64, 128]);
        assert_eq!(shape("intercepts"), [1, 128]);
        assert_eq!(shape("coefficient1"), [128, 64]);
        assert_eq!(shape("intercepts1"), [1, 64]);
        assert_eq!(shape("coefficient2"), [64, 10]);
        // With equal activations, the kept inputs are those with the largest outgoing norms.
        let norms = axis_norms(
            &set.tensors[set
                .tensors
                .iter()
                .position(|t| t.name == "coefficient2")
                .unwrap()],
            0,
        );
        let kept_min = n.cuts[1]
            .keep
            .iter()
            .map(|&i| norms[i])
            .fold(f64::INFINITY, f64::min);
        let dropped_max = (0..128)
            .filter(|i| !n.cuts[1].keep.contains(i))
            .map(|i| norms[i])
            .fold(0.0, f64::max);
        assert!(kept_min >= dropped_max);
    }

    #[test]
    fn mnist8_narrows_the_first_convolution_only() {
        let (set, n) = found("mnist8/mnist-8.onnx");
        let layers: Vec<&str> = n.cuts.iter().map(|c| c.layer.as_str()).collect();
        assert_eq!(layers, ["Parameter5"]);
        // Its bias [8, 1, 1] is sliced with it, and the second convolution's inputs.
        let names: Vec<(&str, usize)> = n.cuts[0]
            .slices
            .iter()
            .map(|&(k, a)| (set.tensors[k].name.as_str(), a))
            .collect();
        assert_eq!(
            names,
            [("Parameter5", 0), ("Parameter6", 0), ("Parameter87", 1)]
        );
        assert!(
            n.skipped.iter().any(|s| s.starts_with("Parameter87")),
            "{:?}",
            n.skipped
        );
    }

    /// silero_vad's 1-D encoder: each convolution's own bias (1-D, one value per output
    /// channel) is sliced with it; the STFT (read by two Slices), the last encoder layer
    /// (a Transpose feeds the LSTM) and the output layer stay whole.
    #[test]
    fn silero_narrows_three_encoder_convolutions_with_their_biases() {
        let (set, n) = found("silero_vad/silero_vad_16k_sequence.onnx");
        let layers: Vec<&str> = n.cuts.iter().map(|c| c.layer.as_str()).collect();
        assert_eq!(
            layers,
            ["encoder.0.weight", "encoder.1.weight", "encoder.2.weight"]
        );
        let names: Vec<(&str, usize)> = n.cuts[0]
            .slices
            .iter()
            .map(|&(k, a)| (set.tensors[k].name.as_str(), a))
            .collect();
        assert_eq!(
            names,
            [
                ("encoder.0.weight", 0),
                ("encoder.0.bias", 0),
                ("encoder.1.weight", 1)
            ]
        );
        assert_eq!(n.skipped.len(), 3, "{:?}", n.skipped);
    }
}
