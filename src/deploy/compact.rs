//! The bytes of `model.onnx` outside its weights. In a model of a few kilobytes they weigh
//! as much as the weights: mnist-8 spends 2.4 KB of its 26 KB on names, node names, shape
//! hints, initializers listed again as inputs and attributes that repeat their defaults. So
//! the deploy writer gives what it adds short names ([`Names::fresh`]) and [`compact`]
//! renames the model's own intermediate values and drops what a runtime does not need.
//! What a caller or a report names keeps its name: the graph's inputs and outputs, and
//! every weight (initializer) of the original model.

use std::collections::{HashMap, HashSet};
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, ModelProto,
};

/// Every value and node name in the model, subgraphs included, so new names never clash.
pub struct Names {
    taken: HashSet<String>,
    next: u64,
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(char::from(DIGITS[(n % 36) as usize]));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.iter().rev().collect()
}

/// Calls `f` on the graph and on every subgraph inside it, outermost first.
fn each_graph(g: &GraphProto, f: &mut impl FnMut(&GraphProto)) {
    f(g);
    for n in &g.node {
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                each_graph(sub, f);
            }
        }
    }
}

fn each_graph_mut(g: &mut GraphProto, f: &mut impl FnMut(&mut GraphProto)) {
    f(g);
    for n in &mut g.node {
        for a in &mut n.attribute {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                each_graph_mut(sub, f);
            }
        }
    }
}

impl Names {
    pub fn of(model: &ModelProto) -> Names {
        let mut taken = HashSet::new();
        if let Some(g) = &model.graph {
            each_graph(g, &mut |g| {
                for v in g.input.iter().chain(&g.output).chain(&g.value_info) {
                    taken.insert(v.name.clone());
                }
                for i in &g.initializer {
                    taken.insert(i.name.clone());
                }
                for n in &g.node {
                    taken.insert(n.name.clone());
                    for x in n.input.iter().chain(&n.output) {
                        taken.insert(x.clone());
                    }
                }
            });
        }
        Names { taken, next: 0 }
    }

    /// A short name no value or node of the model has: `_0`, `_1`, … `_z`, `_10`, …
    pub fn fresh(&mut self) -> String {
        loop {
            let name = format!("_{}", base36(self.next));
            self.next += 1;
            if self.taken.insert(name.clone()) {
                return name;
            }
        }
    }
}

/// What [`compact`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Compacted {
    /// Values renamed.
    pub values: usize,
    /// Graph inputs dropped because they only listed an initializer (IR version < 4).
    pub initializer_inputs: usize,
    /// `value_info` entries dropped.
    pub value_infos: usize,
    /// Attributes dropped because they held their operator's default.
    pub default_attributes: usize,
}

/// An attribute value that an operator takes when the attribute is absent.
enum Implied {
    Int(i64),
    /// Every element equal to this (strides, dilations, pads).
    Each(i64),
    Float(f32),
    Text(&'static str),
    /// Any value: the operator infers it from its inputs.
    Inferred,
}

/// Defaults that every opset of the operator shares (ONNX operator specs).
const DEFAULTS: &[(&str, &str, Implied)] = &[
    ("Conv", "auto_pad", Implied::Text("NOTSET")),
    ("Conv", "group", Implied::Int(1)),
    ("Conv", "dilations", Implied::Each(1)),
    ("Conv", "strides", Implied::Each(1)),
    ("Conv", "pads", Implied::Each(0)),
    ("Conv", "kernel_shape", Implied::Inferred),
    ("ConvTranspose", "auto_pad", Implied::Text("NOTSET")),
    ("ConvTranspose", "group", Implied::Int(1)),
    ("ConvTranspose", "dilations", Implied::Each(1)),
    ("ConvTranspose", "strides", Implied::Each(1)),
    ("ConvTranspose", "pads", Implied::Each(0)),
    ("ConvTranspose", "output_padding", Implied::Each(0)),
    ("MaxPool", "auto_pad", Implied::Text("NOTSET")),
    ("MaxPool", "pads", Implied::Each(0)),
    ("MaxPool", "ceil_mode", Implied::Int(0)),
    ("MaxPool", "storage_order", Implied::Int(0)),
    ("AveragePool", "auto_pad", Implied::Text("NOTSET")),
    ("AveragePool", "pads", Implied::Each(0)),
    ("AveragePool", "ceil_mode", Implied::Int(0)),
    ("AveragePool", "count_include_pad", Implied::Int(0)),
    ("Gemm", "alpha", Implied::Float(1.0)),
    ("Gemm", "beta", Implied::Float(1.0)),
    ("Gemm", "transA", Implied::Int(0)),
    ("Gemm", "transB", Implied::Int(0)),
];

fn is_default(op: &str, a: &AttributeProto) -> bool {
    DEFAULTS
        .iter()
        .filter(|(o, name, _)| *o == op && *name == a.name)
        .any(|(_, _, d)| match d {
            Implied::Int(v) => a.r#type == AttributeType::Int as i32 && a.i == *v,
            Implied::Each(v) => {
                a.r#type == AttributeType::Ints as i32 && a.ints.iter().all(|x| x == v)
            }
            Implied::Float(v) => a.r#type == AttributeType::Float as i32 && a.f == *v,
            Implied::Text(v) => a.r#type == AttributeType::String as i32 && a.s == v.as_bytes(),
            Implied::Inferred => true,
        })
}

fn is_float(data_type: i32) -> bool {
    [
        DataType::Float,
        DataType::Float16,
        DataType::Bfloat16,
        DataType::Double,
    ]
    .iter()
    .any(|&t| t as i32 == data_type)
}

/// Renames every intermediate value of the model (subgraphs included) to a fresh short name;
/// clears node names and doc strings; drops `value_info` (shape hints that onnxruntime and
/// tract infer again), attributes that hold their operator's default, and a `Conv`'s
/// `kernel_shape` (the spec infers it from the weight). Kept: the main graph's inputs and
/// outputs, every float initializer (the weights a report names), and the names in `keep`
/// (weights now rebuilt by nodes). One map serves every graph, so a subgraph reading an outer value
/// reads its new name.
///
/// A model below IR version 4 lists every initializer as a graph input as well; it is
/// raised to IR 4, where an initializer needs no input entry, and those entries go.
pub fn compact(model: &mut ModelProto, names: &mut Names, keep: &HashSet<String>) -> Compacted {
    let mut done = Compacted::default();
    let Some(graph) = model.graph.as_mut() else {
        return done;
    };
    if model.ir_version < 4 {
        let inits: HashSet<String> = graph.initializer.iter().map(|i| i.name.clone()).collect();
        let before = graph.input.len();
        graph.input.retain(|i| !inits.contains(&i.name));
        done.initializer_inputs = before - graph.input.len();
        model.ir_version = 4;
    }
    let mut fixed: HashSet<String> = keep.clone();
    fixed.extend(graph.input.iter().map(|v| v.name.clone()));
    fixed.extend(graph.output.iter().map(|v| v.name.clone()));
    fixed.insert(String::new());
    each_graph(graph, &mut |g| {
        fixed.extend(
            g.initializer
                .iter()
                .filter(|i| is_float(i.data_type))
                .map(|i| i.name.clone()),
        );
    });
    // Every other name a graph defines (a subgraph's formal inputs, integer initializers such
    // as Reshape's shapes, node outputs), in order of appearance so the new names follow the
    // graph.
    let mut map: HashMap<String, String> = HashMap::new();
    each_graph(graph, &mut |g| {
        let defined = g
            .input
            .iter()
            .map(|v| &v.name)
            .chain(g.initializer.iter().map(|i| &i.name))
            .chain(g.node.iter().flat_map(|n| n.output.iter()));
        for name in defined {
            if !fixed.contains(name) && !map.contains_key(name) {
                map.insert(name.clone(), names.fresh());
            }
        }
    });
    done.values = map.len();
    let rename = |s: &mut String| {
        if let Some(new) = map.get(s.as_str()) {
            s.clone_from(new);
        }
    };
    model.doc_string.clear();
    each_graph_mut(graph, &mut |g| {
        g.doc_string.clear();
        done.value_infos += g.value_info.len();
        g.value_info.clear();
        for v in g.input.iter_mut().chain(&mut g.output) {
            rename(&mut v.name);
            v.doc_string.clear();
        }
        for i in &mut g.initializer {
            rename(&mut i.name);
            i.doc_string.clear();
        }
        for n in &mut g.node {
            n.name.clear();
            n.doc_string.clear();
            n.input
                .iter_mut()
                .chain(n.output.iter_mut())
                .for_each(rename);
            let before = n.attribute.len();
            let op = n.op_type.clone();
            n.attribute
                .retain(|a| !(n.domain.is_empty() && is_default(&op, a)));
            done.default_attributes += before - n.attribute.len();
        }
    });
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::run::{self, Dataset, Feed};
    use prost::Message;
    use tract_onnx::pb::{NodeProto, TensorProto, ValueInfoProto};

    #[test]
    fn base36_counts() {
        let got: Vec<String> = [0, 9, 10, 35, 36, 1295, 1296].map(base36).to_vec();
        assert_eq!(got, ["0", "9", "a", "z", "10", "zz", "100"]);
    }

    fn case(path: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/cases")
            .join(path)
    }

    fn outputs(model: &[u8], data: &Dataset, feed: Feed) -> Vec<f32> {
        run::run(model, data, feed, None, &mut |_, _| true)
            .map_err(|e| e.to_string())
            .expect("tract runs the model")
            .values
    }

    /// On the real cases: the same outputs bit for bit in tract, the same inputs, outputs and
    /// float initializers by name, and a smaller file.
    #[test]
    fn compacted_cases_compute_the_same_outputs_with_the_same_interface() {
        for (model, data, feed, most) in [
            (
                "mnist8/mnist-8.onnx",
                "mnist8/calib.npz",
                Feed::PerSample,
                24_800,
            ),
            (
                "silero_vad/silero_vad_16k_sequence.onnx",
                "silero_vad/eval.npz",
                Feed::Whole,
                1_246_165,
            ),
            (
                "digits_mlp_control/digits_mlp.onnx",
                "digits_mlp_control/eval.npz",
                Feed::Batched(64),
                204_592,
            ),
        ] {
            let bytes = std::fs::read(case(model)).unwrap();
            let data = Dataset::from_npz(&std::fs::read(case(data)).unwrap()).unwrap();
            let original = ModelProto::decode(bytes.as_slice()).unwrap();
            let mut small = original.clone();
            let mut names = Names::of(&small);
            let done = compact(&mut small, &mut names, &HashSet::new());
            let written = small.encode_to_vec();
            assert!(
                written.len() < bytes.len() && written.len() <= most,
                "{model}: {} B from {} B ({done:?})",
                written.len(),
                bytes.len()
            );
            assert!(
                outputs(&written, &data, feed) == outputs(&bytes, &data, feed),
                "{model}"
            );
            let (g0, g1) = (original.graph.unwrap(), small.graph.unwrap());
            let io = |g: &GraphProto, inits: &HashSet<&String>| {
                let inputs: Vec<String> = g
                    .input
                    .iter()
                    .filter(|v| !inits.contains(&v.name))
                    .map(|v| v.name.clone())
                    .collect();
                let outputs: Vec<String> = g.output.iter().map(|v| v.name.clone()).collect();
                (inputs, outputs)
            };
            let inits0: HashSet<&String> = g0.initializer.iter().map(|i| &i.name).collect();
            assert_eq!(io(&g0, &inits0), io(&g1, &HashSet::new()), "{model}");
            let floats = |g: &GraphProto| -> Vec<String> {
                g.initializer
                    .iter()
                    .filter(|i| is_float(i.data_type))
                    .map(|i| i.name.clone())
                    .collect()
            };
            assert_eq!(floats(&g0), floats(&g1), "{model}");
            assert!(g1.value_info.is_empty() && g1.node.iter().all(|n| n.name.is_empty()));
        }
    }

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            name: format!("{op} node"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn attr(name: &str, r#type: AttributeType) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: r#type as i32,
            ..Default::default()
        }
    }

    /// A subgraph reads an outer value and defines its own: both take the one new name
    /// everywhere; defaults go, other attributes stay; an IR 3 model loses its initializer
    /// inputs, and kept names stay.
    #[test]
    fn one_map_renames_every_graph_and_defaults_go() {
        let init = |name: &str, dt: DataType| TensorProto {
            name: name.into(),
            data_type: dt as i32,
            ..Default::default()
        };
        let value = |name: &str| ValueInfoProto {
            name: name.into(),
            ..Default::default()
        };
        let mut conv = node("Conv", &["x", "weight"], &["conv out"]);
        let mut group = attr("group", AttributeType::Int);
        group.i = 1;
        let mut strides = attr("strides", AttributeType::Ints);
        strides.ints = vec![2, 2];
        let mut pads = attr("pads", AttributeType::Ints);
        pads.ints = vec![0, 0, 0, 0];
        conv.attribute = vec![group, strides, pads];
        let branch = GraphProto {
            node: vec![node("Add", &["conv out", "shape"], &["inner"])],
            output: vec![value("inner")],
            ..Default::default()
        };
        let mut cond = node("If", &["flag"], &["y"]);
        let mut then_branch = attr("then_branch", AttributeType::Graph);
        then_branch.g = Some(branch);
        cond.attribute = vec![then_branch];
        let mut model = ModelProto {
            ir_version: 3,
            graph: Some(GraphProto {
                node: vec![conv, cond],
                input: vec![value("x"), value("flag"), value("weight"), value("shape")],
                output: vec![value("y")],
                initializer: vec![
                    init("weight", DataType::Float),
                    init("shape", DataType::Int64),
                ],
                value_info: vec![value("conv out")],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut names = Names::of(&model);
        let done = compact(&mut model, &mut names, &HashSet::new());
        assert_eq!(model.ir_version, 4);
        assert_eq!(
            done,
            Compacted {
                values: 3,
                initializer_inputs: 2,
                value_infos: 1,
                default_attributes: 2
            }
        );
        let g = model.graph.unwrap();
        let inputs: Vec<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(inputs, ["x", "flag"]);
        assert_eq!(g.initializer[0].name, "weight");
        let shape = g.initializer[1].name.clone();
        let conv_out = g.node[0].output[0].clone();
        assert!(shape.starts_with('_') && conv_out.starts_with('_') && shape != conv_out);
        let attrs: Vec<&str> = g.node[0]
            .attribute
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(attrs, ["strides"]);
        let inner = g.node[1].attribute[0].g.as_ref().unwrap();
        assert_eq!(inner.node[0].input, [conv_out, shape]);
        assert_eq!(inner.output[0].name, inner.node[0].output[0]);
        assert_eq!(g.node[1].output, ["y"]);
        assert!(g.node.iter().all(|n| n.name.is_empty()));
    }
}
