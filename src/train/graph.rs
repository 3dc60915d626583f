//! An ONNX graph as a differentiable program: each node the scored output depends on is
//! mapped to candle tensor ops (which carry reverse-mode autodiff), and every float
//! initializer is a parameter the caller passes in, so gradients reach the weights wherever
//! the graph uses them (through a Reshape, as mnist-8's FC weight). Integer values (shapes,
//! axes) are computed once, on the host, when the program is built.
//!
//! The ops are those of the shared cases' classifiers and detector (mnist-8, the digits MLP,
//! silero_vad): Conv (1-D and 2-D), MaxPool, AveragePool, MatMul, Gemm, Add/Sub/Mul/Div,
//! Relu, Sigmoid, Tanh, Softmax, LogSoftmax, Reshape, Flatten, Transpose, Identity, Cast (to
//! float), Constant, Pad (zeros, reflect, edge), Slice, Unsqueeze, Squeeze, Concat, Pow by a
//! constant, Sqrt, and a forward LSTM with the default activations. Shape arithmetic on
//! integer constants (ConstantOfShape, Concat, Reshape, Slice, Transpose, Cast, Unsqueeze,
//! Squeeze) is folded when the program is built. A graph with another op on the path to the
//! scored output is refused with its name.

use crate::model::{DType, Tensor as ModelTensor};
use candle_core::{Device, Tensor, D};
use std::collections::HashMap;
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto};

/// Why a graph cannot be trained.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct GraphError(pub String);

fn err(m: impl Into<String>) -> GraphError {
    GraphError(m.into())
}

impl From<candle_core::Error> for GraphError {
    fn from(e: candle_core::Error) -> Self {
        GraphError(e.to_string())
    }
}

/// A value known when the program is built.
#[derive(Debug, Clone)]
enum Known {
    /// Integers (shapes, axes, pad widths) with their dims.
    Ints(Vec<usize>, Vec<i64>),
    Floats(Vec<usize>, Vec<f32>),
}

/// One mapped node: its op, the values it reads and the one it writes.
#[derive(Debug, Clone)]
struct Step {
    op: Op,
    inputs: Vec<Source>,
    output: String,
}

/// Where a node's input comes from.
#[derive(Debug, Clone)]
enum Source {
    /// A value computed by the program (or a graph input).
    Value(String),
    /// A parameter: the caller's tensor of this index.
    Param(usize),
    /// A float constant.
    Const(usize),
}

#[derive(Debug, Clone)]
enum Op {
    Conv {
        pads: Vec<(usize, usize)>,
        stride: usize,
        dilation: usize,
        group: usize,
    },
    /// Pools whose stride equals their kernel (the build refuses others).
    MaxPool {
        kernel: (usize, usize),
    },
    AveragePool {
        kernel: (usize, usize),
    },
    MatMul,
    Gemm {
        alpha: f64,
        beta: f64,
        trans_a: bool,
        trans_b: bool,
    },
    Add,
    Sub,
    Mul,
    Div,
    Relu,
    Sigmoid,
    Tanh,
    Softmax(i64),
    LogSoftmax(i64),
    Reshape(Vec<i64>),
    Flatten(i64),
    Transpose(Vec<usize>),
    Identity,
    /// Pads widths [begin of each axis.., end of each axis..] (no negative ones).
    Pad {
        pads: Vec<i64>,
        mode: PadMode,
    },
    Slice(Vec<SliceAxis>),
    Unsqueeze(Vec<i64>),
    Squeeze(Option<Vec<i64>>),
    Concat(i64),
    /// A power by a constant exponent.
    Pow(f64),
    Sqrt,
    /// A forward LSTM with the default activations (ONNX gate order i, o, f, c), its
    /// optional inputs present or not; only its first output (Y) is computed.
    Lstm {
        hidden: usize,
        bias: bool,
        h0: bool,
        c0: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PadMode {
    Zeros,
    Reflect,
    Edge,
}

/// The program for one output of a graph.
#[derive(Debug)]
pub struct Program {
    steps: Vec<Step>,
    consts: Vec<Tensor>,
    /// The graph inputs the output needs, in the graph's order.
    pub inputs: Vec<String>,
    pub output: String,
    /// The value feeding the output's Softmax, when the output is one (a classifier's
    /// probabilities): distillation matches logits.
    pub logits: Option<String>,
    /// The head is a Sigmoid (a detector's probabilities): `logits` are its input, one
    /// independent yes/no score each.
    pub binary: bool,
    /// Names of the initializers the program reads, in parameter order.
    pub params: Vec<String>,
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a tract_onnx::pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

fn int(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map_or(default, |a| a.i)
}

fn float(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).map_or(default, |a| a.f)
}

fn string(n: &NodeProto, name: &str) -> String {
    attr(n, name)
        .map(|a| String::from_utf8_lossy(&a.s).to_string())
        .unwrap_or_default()
}

fn usizes(v: &[i64]) -> Result<Vec<usize>, GraphError> {
    v.iter()
        .map(|&x| usize::try_from(x).map_err(|_| err(format!("negative size {x}"))))
        .collect()
}

fn same(v: &[usize], what: &str) -> Result<usize, GraphError> {
    match v {
        [] => Ok(1),
        [first, rest @ ..] if rest.iter().all(|x| x == first) => Ok(*first),
        _ => Err(err(format!(
            "{what} {v:?} differ by axis (the engine takes one per convolution)"
        ))),
    }
}

fn pair(v: &[usize], what: &str) -> Result<(usize, usize), GraphError> {
    match v {
        [a, b] => Ok((*a, *b)),
        _ => Err(err(format!("a 2-D pool needs two {what}, not {v:?}"))),
    }
}

/// Pads of a convolution from its attributes and kernel (auto_pad SAME resolved on the
/// input's spatial sizes, known only at run time, so SAME is kept symbolic as None).
fn conv_pads(n: &NodeProto, kernel: &[usize]) -> Result<Option<Vec<(usize, usize)>>, GraphError> {
    let spatial = kernel.len();
    match string(n, "auto_pad").as_str() {
        "SAME_UPPER" | "SAME_LOWER" => Ok(None),
        "VALID" => Ok(Some(vec![(0, 0); spatial])),
        _ => {
            let p = usizes(&ints(n, "pads").unwrap_or_default())?;
            if p.is_empty() {
                return Ok(Some(vec![(0, 0); spatial]));
            }
            if p.len() != 2 * spatial {
                return Err(err("Conv pads do not match its kernel"));
            }
            Ok(Some((0..spatial).map(|i| (p[i], p[spatial + i])).collect()))
        }
    }
}

fn model_tensor_to_known(t: &ModelTensor) -> Option<Known> {
    match t.dtype {
        DType::I64 => Some(Known::Ints(
            t.shape.clone(),
            t.data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        )),
        DType::I32 => Some(Known::Ints(
            t.shape.clone(),
            t.data
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap_or([0; 4]))))
                .collect(),
        )),
        _ => t.to_f32().map(|v| Known::Floats(t.shape.clone(), v)),
    }
}

fn constant_node(n: &NodeProto) -> Result<Known, GraphError> {
    let t = attr(n, "value")
        .and_then(|a| a.t.as_ref())
        .ok_or_else(|| err("a Constant without a tensor value"))?;
    let dims = usizes(&t.dims)?;
    let count: usize = dims.iter().product();
    match t.data_type {
        7 => {
            let v: Vec<i64> = if !t.raw_data.is_empty() {
                t.raw_data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect()
            } else {
                t.int64_data.clone()
            };
            if v.len() != count {
                return Err(err("a Constant's data does not match its dims"));
            }
            Ok(Known::Ints(dims, v))
        }
        1 => {
            let v: Vec<f32> = if !t.raw_data.is_empty() {
                t.raw_data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
                    .collect()
            } else {
                t.float_data.clone()
            };
            if v.len() != count {
                return Err(err("a Constant's data does not match its dims"));
            }
            Ok(Known::Floats(dims, v))
        }
        other => Err(err(format!("a Constant of ONNX type {other}"))),
    }
}

/// The indices an ONNX Slice takes along an axis of `dim` values (negative starts and ends
/// count from the end; both are clamped as the operator's definition says).
fn slice_indices(dim: usize, start: i64, end: i64, step: i64) -> Result<Vec<usize>, GraphError> {
    let d = dim as i64;
    let norm = |x: i64| if x < 0 { x.saturating_add(d) } else { x };
    let (s, e) = (norm(start), norm(end));
    let mut out = Vec::new();
    if step > 0 {
        let (mut i, e) = (s.clamp(0, d), e.clamp(0, d));
        while i < e {
            out.push(i as usize);
            i += step;
        }
    } else if step < 0 {
        let (mut i, e) = (s.clamp(0, d - 1), e.clamp(-1, d - 1));
        while i > e {
            out.push(i as usize);
            i += step;
        }
    } else {
        return Err(err("a Slice with step 0"));
    }
    Ok(out)
}

/// One axis of a Slice: (axis, start, end, step), the axis not yet resolved against a rank.
type SliceAxis = (i64, i64, i64, i64);

/// The axes of a Slice from its inputs (opset 10 and later) or attributes (before).
fn slice_axes(
    n: &NodeProto,
    known_ints: &dyn Fn(usize) -> Option<Vec<i64>>,
) -> Result<Vec<SliceAxis>, GraphError> {
    let (starts, ends, axes, steps) = if n.input.len() > 1 {
        let need = |k: usize, what: &str| {
            known_ints(k).ok_or_else(|| err(format!("a Slice whose {what} are not constants")))
        };
        let starts = need(1, "starts")?;
        let ends = need(2, "ends")?;
        let axes = match n.input.get(3).filter(|x| !x.is_empty()) {
            Some(_) => Some(need(3, "axes")?),
            None => None,
        };
        let steps = match n.input.get(4).filter(|x| !x.is_empty()) {
            Some(_) => Some(need(4, "steps")?),
            None => None,
        };
        (starts, ends, axes, steps)
    } else {
        (
            ints(n, "starts").unwrap_or_default(),
            ints(n, "ends").unwrap_or_default(),
            ints(n, "axes"),
            None,
        )
    };
    if ends.len() != starts.len() {
        return Err(err("a Slice whose starts and ends differ in length"));
    }
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(err("a Slice whose axes or steps do not match its starts"));
    }
    Ok((0..starts.len())
        .map(|i| (axes[i], starts[i], ends[i], steps[i]))
        .collect())
}

/// The axes an Unsqueeze or Squeeze names: its second input (opset 13 and later) or its
/// `axes` attribute; None when it names none (Squeeze then drops every axis of 1).
fn shape_axes(
    n: &NodeProto,
    known_ints: &dyn Fn(usize) -> Option<Vec<i64>>,
) -> Result<Option<Vec<i64>>, GraphError> {
    match n.input.get(1).filter(|x| !x.is_empty()) {
        Some(_) => known_ints(1)
            .map(Some)
            .ok_or_else(|| err(format!("an {} whose axes are not a constant", n.op_type))),
        None => Ok(ints(n, "axes")),
    }
}

/// The dims after an Unsqueeze of `axes` (each counted in the output's rank).
fn unsqueezed(dims: &[usize], axes: &[i64]) -> Result<Vec<usize>, GraphError> {
    let rank = dims.len() + axes.len();
    let mut at: Vec<usize> = axes
        .iter()
        .map(|&a| axis(a, rank))
        .collect::<Result<_, _>>()?;
    at.sort_unstable();
    let mut rest = dims.iter();
    Ok((0..rank)
        .map(|i| {
            if at.binary_search(&i).is_ok() {
                1
            } else {
                rest.next().copied().unwrap_or(1)
            }
        })
        .collect())
}

/// The dims after a Squeeze of `axes` (every axis of 1 when None).
fn squeezed(dims: &[usize], axes: Option<&[i64]>) -> Result<Vec<usize>, GraphError> {
    let drop: Vec<usize> = match axes {
        Some(a) => a
            .iter()
            .map(|&a| axis(a, dims.len()))
            .collect::<Result<_, _>>()?,
        None => (0..dims.len()).filter(|&i| dims[i] == 1).collect(),
    };
    if drop.iter().any(|&i| dims[i] != 1) {
        return Err(err(format!("a Squeeze of an axis above 1 in {dims:?}")));
    }
    Ok((0..dims.len())
        .filter(|i| !drop.contains(i))
        .map(|i| dims[i])
        .collect())
}

/// A Reshape target with ONNX's 0 (copy) and -1 (infer) resolved against `dims`.
fn resolve_shape(dims: &[usize], shape: &[i64]) -> Result<Vec<usize>, GraphError> {
    let total: usize = dims.iter().product();
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &s) in shape.iter().enumerate() {
        match s {
            0 => out.push(
                *dims
                    .get(i)
                    .ok_or_else(|| err("Reshape copies a missing axis"))?,
            ),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            s if s > 0 => out.push(s as usize),
            _ => return Err(err(format!("a Reshape to {shape:?}"))),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        out[i] = total / known.max(1);
    }
    if out.iter().product::<usize>() != total {
        return Err(err(format!("cannot reshape {dims:?} to {shape:?}")));
    }
    Ok(out)
}

/// Folds a node whose inputs are all known integers: the shape arithmetic exporters emit
/// (silero's reflect-pad widths come from ConstantOfShape, Concat, Reshape, Slice,
/// Transpose, Reshape and Cast). None when the node is not such a node; it then runs as an
/// op of the program.
fn fold(n: &NodeProto, known: &HashMap<String, Known>) -> Result<Option<Known>, GraphError> {
    use ndarray::{ArrayD, Axis, IxDyn};
    let inputs: Vec<&str> = n
        .input
        .iter()
        .map(String::as_str)
        .filter(|x| !x.is_empty())
        .collect();
    let arrays: Option<Vec<ArrayD<i64>>> = inputs
        .iter()
        .map(|x| match known.get(*x) {
            Some(Known::Ints(d, v)) => ArrayD::from_shape_vec(IxDyn(d), v.clone()).ok(),
            _ => None,
        })
        .collect();
    let Some(arrays) = arrays.filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    // By the node's own input positions (an optional input left empty keeps its place).
    let k = |i: usize| -> Option<Vec<i64>> {
        match n.input.get(i).and_then(|x| known.get(x)) {
            Some(Known::Ints(_, v)) => Some(v.clone()),
            _ => None,
        }
    };
    let ints_of = |a: ArrayD<i64>| {
        let d = a.shape().to_vec();
        Known::Ints(d, a.iter().copied().collect())
    };
    let x = &arrays[0];
    Ok(Some(match n.op_type.as_str() {
        "ConstantOfShape" => {
            let dims = usizes(&k(0).unwrap_or_default())?;
            let count: usize = dims.iter().product();
            if count > 1 << 24 {
                return Err(err("a ConstantOfShape of over 16M values"));
            }
            match attr(n, "value").map(|_| constant_node(n)).transpose()? {
                Some(Known::Ints(_, v)) => {
                    Known::Ints(dims, vec![v.first().copied().unwrap_or(0); count])
                }
                Some(Known::Floats(_, v)) => {
                    Known::Floats(dims, vec![v.first().copied().unwrap_or(0.0); count])
                }
                None => Known::Floats(dims, vec![0.0; count]),
            }
        }
        "Concat" => {
            let a = axis(int(n, "axis", 0), x.ndim())?;
            let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
            ints_of(ndarray::concatenate(Axis(a), &views).map_err(|e| err(format!("Concat: {e}")))?)
        }
        "Reshape" => {
            let to = resolve_shape(x.shape(), &k(1).unwrap_or_default())?;
            Known::Ints(to, x.iter().copied().collect())
        }
        "Slice" => {
            let mut y = x.clone();
            for (a, s, e, st) in slice_axes(n, &k)? {
                let a = axis(a, y.ndim())?;
                let idx = slice_indices(y.shape()[a], s, e, st)?;
                y = y.select(Axis(a), &idx);
            }
            ints_of(y)
        }
        "Transpose" => {
            let perm = usizes(&ints(n, "perm").unwrap_or_default())?;
            let perm: Vec<usize> = if perm.is_empty() {
                (0..x.ndim()).rev().collect()
            } else {
                perm
            };
            if perm.len() != x.ndim() {
                return Err(err("a Transpose whose perm does not match its rank"));
            }
            ints_of(
                x.clone()
                    .permuted_axes(IxDyn(&perm))
                    .as_standard_layout()
                    .to_owned(),
            )
        }
        "Cast" => match int(n, "to", 0) {
            6 | 7 => ints_of(x.clone()),
            1 => Known::Floats(x.shape().to_vec(), x.iter().map(|&v| v as f32).collect()),
            _ => return Ok(None),
        },
        "Unsqueeze" => Known::Ints(
            unsqueezed(x.shape(), &shape_axes(n, &k)?.unwrap_or_default())?,
            x.iter().copied().collect(),
        ),
        "Squeeze" => Known::Ints(
            squeezed(x.shape(), shape_axes(n, &k)?.as_deref())?,
            x.iter().copied().collect(),
        ),
        "Identity" => ints_of(x.clone()),
        _ => return Ok(None),
    }))
}

impl Program {
    /// The program that computes `output` (default: the graph's first output) of `model`,
    /// whose initializers are `tensors` (in any order: matched by name).
    pub fn build(
        model: &ModelProto,
        tensors: &[ModelTensor],
        output: Option<&str>,
    ) -> Result<Program, GraphError> {
        let g: &GraphProto = model.graph.as_ref().ok_or_else(|| err("no graph"))?;
        let output = match output {
            Some(o) => o.to_string(),
            // The first float output (the digits MLP's first output is its int64 label).
            None => g
                .output
                .iter()
                .find(|o| {
                    matches!(
                        o.r#type.as_ref().and_then(|t| t.value.as_ref()),
                        Some(tract_onnx::pb::type_proto::Value::TensorType(t)) if t.elem_type == 1
                    )
                })
                .or(g.output.first())
                .map(|o| o.name.clone())
                .ok_or_else(|| err("the graph has no output"))?,
        };
        // The nodes the output depends on, in graph order.
        let producer: HashMap<&str, usize> = g
            .node
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
            .collect();
        let mut needed = vec![false; g.node.len()];
        let mut stack = vec![output.clone()];
        let mut seen = std::collections::HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v.clone()) {
                continue;
            }
            if let Some(&i) = producer.get(v.as_str()) {
                needed[i] = true;
                stack.extend(g.node[i].input.iter().filter(|x| !x.is_empty()).cloned());
            }
        }
        let by_name: HashMap<&str, &ModelTensor> =
            tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        // Initializers, and Constant nodes whose value the reader took out as a tensor (named
        // after the node's output): both are the caller's tensors.
        let initializer_names: std::collections::HashSet<&str> = g
            .initializer
            .iter()
            .map(|i| i.name.as_str())
            .chain(
                g.node
                    .iter()
                    .filter(|n| n.op_type == "Constant")
                    .filter_map(|n| n.output.first())
                    .map(String::as_str)
                    .filter(|o| by_name.contains_key(o)),
            )
            .collect();
        let mut known: HashMap<String, Known> = HashMap::new();
        let mut params: Vec<String> = Vec::new();
        let mut consts: Vec<Tensor> = Vec::new();
        let mut steps = Vec::new();
        let dev = Device::Cpu;
        let source = |name: &str,
                      known: &HashMap<String, Known>,
                      params: &mut Vec<String>,
                      consts: &mut Vec<Tensor>|
         -> Result<Source, GraphError> {
            if initializer_names.contains(name) {
                let t = by_name
                    .get(name)
                    .ok_or_else(|| err(format!("initializer {name:?} has no tensor")))?;
                if t.dtype.is_float() {
                    let i = match params.iter().position(|p| p == name) {
                        Some(i) => i,
                        None => {
                            params.push(name.to_string());
                            params.len() - 1
                        }
                    };
                    return Ok(Source::Param(i));
                }
            }
            match known.get(name) {
                Some(Known::Floats(dims, v)) => {
                    consts.push(Tensor::from_vec(v.clone(), dims.as_slice(), &dev)?);
                    Ok(Source::Const(consts.len() - 1))
                }
                _ => Ok(Source::Value(name.to_string())),
            }
        };
        for t in tensors {
            if !t.dtype.is_float() {
                if let Some(k) = model_tensor_to_known(t) {
                    known.insert(t.name.clone(), k);
                }
            }
        }
        for (i, n) in g.node.iter().enumerate() {
            if !needed[i] {
                continue;
            }
            let op_name = n.op_type.as_str();
            if !(n.domain.is_empty() || n.domain == "ai.onnx") {
                return Err(err(format!(
                    "its op {}.{op_name} is not one the training engine maps",
                    n.domain
                )));
            }
            let out = n.output.first().cloned().unwrap_or_default();
            let known_ints = |k: usize| -> Option<Vec<i64>> {
                match n.input.get(k).and_then(|x| known.get(x)) {
                    Some(Known::Ints(_, v)) => Some(v.clone()),
                    _ => None,
                }
            };
            if op_name == "Constant" {
                if !initializer_names.contains(out.as_str()) {
                    known.insert(out, constant_node(n)?);
                }
                continue;
            }
            if let Some(k) = fold(n, &known)? {
                known.insert(out, k);
                continue;
            }
            let op = match op_name {
                "Conv" => {
                    let w = n
                        .input
                        .get(1)
                        .and_then(|x| by_name.get(x.as_str()))
                        .ok_or_else(|| err("a Conv whose weight is not an initializer"))?;
                    let kernel = w.shape.get(2..).unwrap_or(&[]).to_vec();
                    if !(1..=2).contains(&kernel.len()) {
                        return Err(err("a Conv that is not 1-D or 2-D"));
                    }
                    let pads = conv_pads(n, &kernel)?;
                    let stride =
                        same(&usizes(&ints(n, "strides").unwrap_or_default())?, "strides")?;
                    let dilation = same(
                        &usizes(&ints(n, "dilations").unwrap_or_default())?,
                        "dilations",
                    )?;
                    let pads = match pads {
                        Some(p) => p,
                        None => {
                            // SAME with stride 1: pads total kernel - 1 per axis (SAME_UPPER puts
                            // the odd one at the end).
                            if stride != 1 {
                                return Err(err("auto_pad SAME with a stride above 1"));
                            }
                            let upper = string(n, "auto_pad") == "SAME_UPPER";
                            kernel
                                .iter()
                                .map(|&k| {
                                    let total = (k - 1) * dilation;
                                    let (small, big) = (total / 2, total - total / 2);
                                    if upper {
                                        (small, big)
                                    } else {
                                        (big, small)
                                    }
                                })
                                .collect()
                        }
                    };
                    Op::Conv {
                        pads,
                        stride,
                        dilation,
                        group: int(n, "group", 1).max(1) as usize,
                    }
                }
                "MaxPool" | "AveragePool" => {
                    let kernel = pair(
                        &usizes(&ints(n, "kernel_shape").unwrap_or_default())?,
                        "kernel sizes",
                    )?;
                    let strides = usizes(&ints(n, "strides").unwrap_or_default())?;
                    let stride = if strides.is_empty() {
                        (1, 1)
                    } else {
                        pair(&strides, "strides")?
                    };
                    let pads = usizes(&ints(n, "pads").unwrap_or_default())?;
                    if pads.iter().any(|&p| p != 0)
                        || !matches!(string(n, "auto_pad").as_str(), "" | "NOTSET" | "VALID")
                        || int(n, "ceil_mode", 0) != 0
                    {
                        return Err(err(format!(
                            "a padded {op_name} (the engine pools without padding)"
                        )));
                    }
                    if kernel != stride {
                        return Err(err(format!(
                            "a {op_name} whose windows overlap or leave gaps (kernel {kernel:?}, strides {stride:?}): the engine's pooling gradient needs them equal"
                        )));
                    }
                    if op_name == "MaxPool" {
                        Op::MaxPool { kernel }
                    } else {
                        Op::AveragePool { kernel }
                    }
                }
                "MatMul" => Op::MatMul,
                "Gemm" => Op::Gemm {
                    alpha: f64::from(float(n, "alpha", 1.0)),
                    beta: f64::from(float(n, "beta", 1.0)),
                    trans_a: int(n, "transA", 0) != 0,
                    trans_b: int(n, "transB", 0) != 0,
                },
                "Add" => Op::Add,
                "Sub" => Op::Sub,
                "Mul" => Op::Mul,
                "Div" => Op::Div,
                "Relu" => Op::Relu,
                "Sigmoid" => Op::Sigmoid,
                "Tanh" => Op::Tanh,
                "Softmax" => Op::Softmax(int(n, "axis", -1)),
                "LogSoftmax" => Op::LogSoftmax(int(n, "axis", -1)),
                "Reshape" => Op::Reshape(
                    known_ints(1).ok_or_else(|| err("a Reshape whose shape is not a constant"))?,
                ),
                "Flatten" => Op::Flatten(int(n, "axis", 1)),
                "Transpose" => Op::Transpose(usizes(&ints(n, "perm").unwrap_or_default())?),
                "Identity" => Op::Identity,
                "Cast" if int(n, "to", 1) == 1 => Op::Identity,
                "Pad" => {
                    let pads = match n.input.get(1).filter(|x| !x.is_empty()) {
                        Some(_) => known_ints(1)
                            .ok_or_else(|| err("a Pad whose widths are not a constant"))?,
                        None => ints(n, "pads").unwrap_or_default(),
                    };
                    if n.input.get(3).is_some_and(|x| !x.is_empty()) {
                        return Err(err("a Pad with axes (opset 18) is not mapped"));
                    }
                    if pads.iter().any(|&p| p < 0) {
                        return Err(err("a Pad with negative widths (a crop) is not mapped"));
                    }
                    let mode = match string(n, "mode").as_str() {
                        "" | "constant" => {
                            let value = match n.input.get(2).filter(|x| !x.is_empty()) {
                                Some(v) => match known.get(v) {
                                    Some(Known::Floats(_, v)) => v.first().copied(),
                                    Some(Known::Ints(_, v)) => v.first().map(|&x| x as f32),
                                    None => None,
                                },
                                None => Some(float(n, "value", 0.0)),
                            };
                            if value != Some(0.0) {
                                return Err(err("a Pad with a constant other than 0"));
                            }
                            PadMode::Zeros
                        }
                        "reflect" => PadMode::Reflect,
                        "edge" => PadMode::Edge,
                        m => return Err(err(format!("a Pad in mode {m:?}"))),
                    };
                    Op::Pad { pads, mode }
                }
                "Slice" => Op::Slice(slice_axes(n, &known_ints)?),
                "Unsqueeze" => Op::Unsqueeze(
                    shape_axes(n, &known_ints)?.ok_or_else(|| err("an Unsqueeze without axes"))?,
                ),
                "Squeeze" => Op::Squeeze(shape_axes(n, &known_ints)?),
                "Concat" => Op::Concat(int(n, "axis", 0)),
                "Pow" => {
                    // The exponent: a folded constant, or a one-value tensor the reader took
                    // out of a Constant node (silero's 2).
                    let tensor = n
                        .input
                        .get(1)
                        .and_then(|x| by_name.get(x.as_str()))
                        .and_then(|t| model_tensor_to_known(t));
                    let e = match n
                        .input
                        .get(1)
                        .and_then(|x| known.get(x))
                        .or(tensor.as_ref())
                    {
                        Some(Known::Floats(_, v)) if v.len() == 1 => f64::from(v[0]),
                        Some(Known::Ints(_, v)) if v.len() == 1 => v[0] as f64,
                        _ => return Err(err("a Pow whose exponent is not one constant")),
                    };
                    Op::Pow(e)
                }
                "Sqrt" => Op::Sqrt,
                "LSTM" => {
                    let present = |k: usize| n.input.get(k).is_some_and(|x| !x.is_empty());
                    let direction = string(n, "direction");
                    if !matches!(direction.as_str(), "" | "forward") {
                        return Err(err(format!("an LSTM in direction {direction:?}")));
                    }
                    let acts: Vec<String> = attr(n, "activations")
                        .map(|a| {
                            a.strings
                                .iter()
                                .map(|s| String::from_utf8_lossy(s).to_lowercase())
                                .collect()
                        })
                        .unwrap_or_default();
                    if !(acts.is_empty() || acts == ["sigmoid", "tanh", "tanh"])
                        || attr(n, "clip").is_some()
                        || int(n, "input_forget", 0) != 0
                        || int(n, "layout", 0) != 0
                        || present(4)
                        || present(7)
                    {
                        return Err(err(
                            "an LSTM with activations, clip, input_forget, layout, sequence_lens or peepholes (only the default forward LSTM is mapped)",
                        ));
                    }
                    if n.output
                        .iter()
                        .skip(1)
                        .filter(|o| !o.is_empty())
                        .any(|o| seen.contains(o))
                    {
                        return Err(err(
                            "the scored output reads an LSTM's final state (only its sequence output Y is mapped)",
                        ));
                    }
                    Op::Lstm {
                        hidden: usize::try_from(int(n, "hidden_size", 0))
                            .ok()
                            .filter(|&h| h > 0)
                            .ok_or_else(|| err("an LSTM without hidden_size"))?,
                        bias: present(3),
                        h0: present(5),
                        c0: present(6),
                    }
                }
                other => {
                    return Err(err(format!(
                        "its op {other} is not one the training engine maps"
                    )))
                }
            };
            let arity = match op {
                Op::Reshape(_)
                | Op::Pad { .. }
                | Op::Slice(_)
                | Op::Unsqueeze(_)
                | Op::Squeeze(_)
                | Op::Pow(_) => 1,
                _ => n.input.len(),
            };
            let inputs = n.input[..arity.min(n.input.len())]
                .iter()
                .filter(|x| !x.is_empty())
                .map(|x| source(x, &known, &mut params, &mut consts))
                .collect::<Result<Vec<_>, _>>()?;
            steps.push(Step {
                op,
                inputs,
                output: out,
            });
        }
        let produced: std::collections::HashSet<&str> =
            steps.iter().map(|s| s.output.as_str()).collect();
        let inputs: Vec<String> = g
            .input
            .iter()
            .filter(|i| !initializer_names.contains(i.name.as_str()))
            .filter(|i| {
                steps.iter().any(|s| {
                    s.inputs
                        .iter()
                        .any(|x| matches!(x, Source::Value(v) if *v == i.name))
                })
            })
            .map(|i| i.name.clone())
            .collect();
        if !produced.contains(output.as_str()) {
            return Err(err(format!("no mapped node writes the output {output:?}")));
        }
        let graph_inputs: std::collections::HashSet<&str> =
            g.input.iter().map(|i| i.name.as_str()).collect();
        let mut written: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for s in &steps {
            for x in &s.inputs {
                if let Source::Value(v) = x {
                    if !written.contains(v.as_str()) && !graph_inputs.contains(v.as_str()) {
                        return Err(err(format!(
                            "the value {v:?} is not computed by a mapped op (only a node's first output is)"
                        )));
                    }
                }
            }
            written.insert(s.output.as_str());
        }
        // The head: a Softmax or Sigmoid reached back from the output through ops that only
        // move values. Training matches the values that feed it.
        let (mut logits, mut binary) = (None, false);
        let mut v = output.clone();
        while let Some(s) = steps.iter().find(|s| s.output == v) {
            match (&s.op, s.inputs.first()) {
                (Op::Softmax(_), Some(Source::Value(x))) => {
                    logits = Some(x.clone());
                    break;
                }
                (Op::Sigmoid, Some(Source::Value(x))) => {
                    logits = Some(x.clone());
                    binary = true;
                    break;
                }
                (
                    Op::Reshape(_)
                    | Op::Identity
                    | Op::Squeeze(_)
                    | Op::Unsqueeze(_)
                    | Op::Flatten(_),
                    Some(Source::Value(x)),
                ) => v = x.clone(),
                _ => break,
            }
        }
        Ok(Program {
            steps,
            consts,
            inputs,
            output,
            logits,
            binary,
            params,
        })
    }

    /// Runs the program on `feeds` (tensors for [`Program::inputs`], in order) with `params`
    /// (tensors for [`Program::params`], in order); returns the output and, when asked, the
    /// value `also` names.
    pub fn forward(
        &self,
        feeds: &[Tensor],
        params: &[Tensor],
        also: Option<&str>,
    ) -> Result<(Tensor, Option<Tensor>), GraphError> {
        let mut keep = vec![self.output.as_str()];
        keep.extend(also);
        let mut got = self.run(feeds, params, &keep)?.into_iter();
        let out = got
            .next()
            .ok_or_else(|| err("the output was not computed"))?;
        Ok((out, got.next()))
    }

    /// The outputs of the weighted ops (Conv, MatMul, Gemm) before the scored one: the
    /// features a hint loss matches.
    pub fn features(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|s| matches!(s.op, Op::Conv { .. } | Op::MatMul | Op::Gemm { .. }))
            .map(|s| s.output.clone())
            .filter(|o| *o != self.output && Some(o) != self.logits.as_ref())
            .collect()
    }

    /// Runs the program and returns the values `keep` names, in order.
    pub fn run(
        &self,
        feeds: &[Tensor],
        params: &[Tensor],
        keep: &[&str],
    ) -> Result<Vec<Tensor>, GraphError> {
        let mut values: HashMap<&str, Tensor> = HashMap::new();
        for (name, t) in self.inputs.iter().zip(feeds) {
            values.insert(name.as_str(), t.clone());
        }
        for s in &self.steps {
            let get = |k: usize| -> Result<Tensor, GraphError> {
                match s.inputs.get(k) {
                    Some(Source::Param(i)) => params
                        .get(*i)
                        .cloned()
                        .ok_or_else(|| err("a parameter is missing")),
                    // Constants follow the feeds' dtype (the gradient tests run in f64).
                    Some(Source::Const(i)) => match feeds.first().map(Tensor::dtype) {
                        Some(d) if d != self.consts[*i].dtype() => Ok(self.consts[*i].to_dtype(d)?),
                        _ => Ok(self.consts[*i].clone()),
                    },
                    Some(Source::Value(v)) => values
                        .get(v.as_str())
                        .cloned()
                        .ok_or_else(|| err(format!("the value {v:?} is not computed"))),
                    None => Err(err(format!("{:?} lacks input {k}", s.op))),
                }
            };
            let y = apply(&s.op, &get, s.inputs.len())?;
            values.insert(s.output.as_str(), y);
        }
        keep.iter()
            .map(|k| {
                values
                    .get(k)
                    .cloned()
                    .ok_or_else(|| err(format!("the value {k:?} was not computed")))
            })
            .collect()
    }
}

fn axis(a: i64, rank: usize) -> Result<usize, GraphError> {
    let r = rank as i64;
    let a = if a < 0 { a + r } else { a };
    usize::try_from(a)
        .ok()
        .filter(|&a| a < rank.max(1))
        .ok_or_else(|| err(format!("axis {a} out of range for rank {rank}")))
}

/// A Reshape target with ONNX's 0 (copy) and -1 (infer) resolved. A target that fixes the
/// batch to 1 (mnist-8 reshapes to [1, 256]) follows the batch the program runs on, so that
/// models exported for one row train on many.
fn reshape_dims(x: &Tensor, shape: &[i64]) -> Result<Vec<usize>, GraphError> {
    let dims = x.dims();
    let total: usize = dims.iter().product();
    let batch = dims.first().copied().unwrap_or(1);
    let rest: i64 = shape.iter().skip(1).product();
    if shape.first() == Some(&1) && batch > 1 && rest > 0 && rest as usize * batch == total {
        let mut out = vec![batch];
        out.extend(shape[1..].iter().map(|&s| s as usize));
        return Ok(out);
    }
    resolve_shape(dims, shape)
}

/// The windows of a pool whose stride equals its kernel, as the last axis:
/// [n, c, h, w] -> [n, c, h / kh, w / kw, kh * kw], rows and columns no window covers cut off
/// (mnist-8 pools 14 by windows of 3). A max or mean over that axis is the pool, and its
/// gradient is the reduction's. (candle 0.11's own max_pool2d gradient is scaled by
/// 1 / (kh * kw) where a window has one maximum, and its pools' gradients are wrong where the
/// windows do not tile the input: the finite-difference tests below caught both.)
fn windows(x: Tensor, kernel: (usize, usize)) -> Result<Tensor, GraphError> {
    let (n, c, h, w) = x.dims4()?;
    let (kh, kw) = kernel;
    let (oh, ow) = (h / kh.max(1), w / kw.max(1));
    let x = if oh * kh < h {
        x.narrow(2, 0, oh * kh)?
    } else {
        x
    };
    let x = if ow * kw < w {
        x.narrow(3, 0, ow * kw)?
    } else {
        x
    };
    Ok(x.contiguous()?
        .reshape((n, c, oh, kh, ow, kw))?
        .permute((0, 1, 2, 4, 3, 5))?
        .contiguous()?
        .reshape((n, c, oh, ow, kh * kw))?)
}

fn apply(
    op: &Op,
    get: &dyn Fn(usize) -> Result<Tensor, GraphError>,
    arity: usize,
) -> Result<Tensor, GraphError> {
    Ok(match op {
        Op::Conv {
            pads,
            stride,
            dilation,
            group,
        } => {
            // candle's convolution gradients assume contiguous operands (a transposed input
            // gave wrong kernel gradients in the finite-difference tests).
            let mut x = get(0)?.contiguous()?;
            let w = get(1)?.contiguous()?;
            let spatial = pads.len();
            // Asymmetric padding, or a stride above 1: pad the input, then convolve without
            // padding.
            let symmetric = *stride == 1
                && pads.iter().all(|(b, e)| b == e)
                && pads.windows(2).all(|p| p[0] == p[1]);
            let pad = if symmetric {
                pads.first().map_or(0, |p| p.0)
            } else {
                0
            };
            if !symmetric {
                for (i, (b, e)) in pads.iter().enumerate() {
                    x = x.pad_with_zeros(2 + i, *b, *e)?;
                }
            }
            // With a stride, the trailing inputs no window reaches are cut off: candle 0.11's
            // input gradient of a strided convolution has the wrong length when the windows
            // do not end on the input's last value (silero's stride-2 encoder convolutions).
            if *stride > 1 {
                let kernel = &w.dims()[2..];
                for (i, &k) in kernel.iter().enumerate() {
                    let len = x.dims()[2 + i];
                    let reach = dilation * (k.max(1) - 1) + 1;
                    if len >= reach {
                        let unused = (len - reach) % stride;
                        if unused > 0 {
                            x = x.narrow(2 + i, 0, len - unused)?;
                        }
                    }
                }
            }
            // A 1-D convolution runs as a 2-D one of height 1 on the input padded here (candle
            // 0.11's conv1d kernel gradient disagreed with finite differences).
            let mut y = if spatial == 1 {
                if pad > 0 {
                    x = x.pad_with_zeros(2, pad, pad)?;
                }
                x.unsqueeze(2)?
                    .conv2d(&w.unsqueeze(2)?, 0, *stride, *dilation, *group)?
                    .squeeze(2)?
            } else {
                x.conv2d(&w, pad, *stride, *dilation, *group)?
            };
            if arity > 2 {
                let b = get(2)?;
                let shape: Vec<usize> = std::iter::once(1)
                    .chain(std::iter::once(b.elem_count()))
                    .chain(std::iter::repeat_n(1, spatial))
                    .collect();
                y = y.broadcast_add(&b.reshape(shape)?)?;
            }
            y
        }
        Op::MaxPool { kernel } => {
            // The maximum as a weighted sum of its window, the weights (1 / ties on each
            // maximum) held constant: the gradient is shared among tied maxima (mnist-8's
            // blank background pools equal values) instead of given whole to each.
            let w = windows(get(0)?, *kernel)?;
            let top = w.max_keepdim(D::Minus1)?.detach();
            let mask = w.broadcast_eq(&top)?.to_dtype(w.dtype())?;
            let share = mask.broadcast_div(&mask.sum_keepdim(D::Minus1)?)?.detach();
            (w * share)?.sum(D::Minus1)?
        }
        Op::AveragePool { kernel } => windows(get(0)?, *kernel)?.mean(D::Minus1)?,
        Op::MatMul => {
            let (a, b) = (get(0)?, get(1)?);
            if a.rank() == 2 && b.rank() == 2 {
                a.matmul(&b)?
            } else {
                a.broadcast_matmul(&b)?
            }
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let mut a = get(0)?;
            let mut b = get(1)?;
            if *trans_a {
                a = a.t()?;
            }
            if *trans_b {
                b = b.t()?;
            }
            let mut y = a.matmul(&b)?;
            if *alpha != 1.0 {
                y = (y * *alpha)?;
            }
            if arity > 2 {
                let mut c = get(2)?;
                if *beta != 1.0 {
                    c = (c * *beta)?;
                }
                y = y.broadcast_add(&c)?;
            }
            y
        }
        Op::Add => get(0)?.broadcast_add(&get(1)?)?,
        Op::Sub => get(0)?.broadcast_sub(&get(1)?)?,
        Op::Mul => get(0)?.broadcast_mul(&get(1)?)?,
        Op::Div => get(0)?.broadcast_div(&get(1)?)?,
        Op::Relu => get(0)?.relu()?,
        Op::Sigmoid => candle_nn::ops::sigmoid(&get(0)?)?,
        Op::Tanh => get(0)?.tanh()?,
        Op::Softmax(a) => {
            let x = get(0)?;
            let a = axis(*a, x.rank())?;
            candle_nn::ops::softmax(&x, a)?
        }
        Op::LogSoftmax(a) => {
            let x = get(0)?;
            let a = axis(*a, x.rank())?;
            candle_nn::ops::log_softmax(&x, a)?
        }
        Op::Reshape(shape) => {
            let x = get(0)?;
            let dims = reshape_dims(&x, shape)?;
            x.reshape(dims)?
        }
        Op::Flatten(a) => {
            let x = get(0)?;
            let a = if *a < 0 { *a + x.rank() as i64 } else { *a } as usize;
            let outer: usize = x.dims()[..a.min(x.rank())].iter().product();
            let n = x.elem_count();
            x.reshape((outer, n / outer.max(1)))?
        }
        Op::Transpose(perm) => {
            let x = get(0)?;
            let perm: Vec<usize> = if perm.is_empty() {
                (0..x.rank()).rev().collect()
            } else {
                perm.clone()
            };
            x.permute(perm)?
        }
        Op::Identity => get(0)?,
        Op::Pad { pads, mode } => {
            let mut x = get(0)?;
            let rank = x.rank();
            if pads.len() != 2 * rank {
                return Err(err(format!("{} pad widths for rank {rank}", pads.len())));
            }
            for a in 0..rank {
                let (b, e) = (pads[a] as usize, pads[a + rank] as usize);
                if b == 0 && e == 0 {
                    continue;
                }
                x = match mode {
                    PadMode::Zeros => x.pad_with_zeros(a, b, e)?,
                    PadMode::Reflect | PadMode::Edge => {
                        let idx = pad_index(x.dims()[a], b, e, *mode)?;
                        let n = idx.len();
                        x.contiguous()?
                            .index_select(&Tensor::from_vec(idx, n, x.device())?, a)?
                    }
                };
            }
            x
        }
        Op::Slice(axes) => {
            let mut x = get(0)?;
            for &(a, s, e, st) in axes {
                let a = axis(a, x.rank())?;
                let idx = slice_indices(x.dims()[a], s, e, st)?;
                if idx.is_empty() {
                    return Err(err("a Slice that keeps nothing"));
                }
                x = if st == 1 {
                    x.narrow(a, idx[0], idx.len())?
                } else {
                    let n = idx.len();
                    let idx: Vec<u32> = idx.into_iter().map(|i| i as u32).collect();
                    x.contiguous()?
                        .index_select(&Tensor::from_vec(idx, n, x.device())?, a)?
                };
            }
            x
        }
        Op::Unsqueeze(axes) => {
            let x = get(0)?;
            let dims = unsqueezed(x.dims(), axes)?;
            x.reshape(dims)?
        }
        Op::Squeeze(axes) => {
            let x = get(0)?;
            let dims = squeezed(x.dims(), axes.as_deref())?;
            x.reshape(dims)?
        }
        Op::Concat(a) => {
            let xs = (0..arity).map(get).collect::<Result<Vec<_>, _>>()?;
            let a = axis(*a, xs.first().map_or(1, Tensor::rank))?;
            Tensor::cat(&xs, a)?
        }
        Op::Pow(e) => {
            let x = get(0)?;
            if *e == 2.0 {
                x.sqr()?
            } else if *e == 1.0 {
                x
            } else {
                x.powf(*e)?
            }
        }
        // The square root of x + 1e-12: the same value to float precision wherever x is not
        // tiny, and a finite gradient where x is 0 (the STFT magnitude of a silent frame).
        Op::Sqrt => (get(0)? + 1e-12)?.sqrt()?,
        Op::Lstm {
            hidden,
            bias,
            h0,
            c0,
        } => lstm(get, *hidden, *bias, *h0, *c0)?,
    })
}

/// The source indices of a reflect or edge pad of `b` before and `e` after an axis of `d`.
fn pad_index(d: usize, b: usize, e: usize, mode: PadMode) -> Result<Vec<u32>, GraphError> {
    if mode == PadMode::Reflect && (b >= d || e >= d) {
        return Err(err(format!(
            "a reflect pad of {b}/{e} on an axis of {d} (at most {})",
            d.saturating_sub(1)
        )));
    }
    if d == 0 {
        return Err(err("a pad of an empty axis"));
    }
    let before = (1..=b)
        .rev()
        .map(|k| if mode == PadMode::Reflect { k } else { 0 });
    let after = (1..=e).map(|k| {
        if mode == PadMode::Reflect {
            d - 1 - k
        } else {
            d - 1
        }
    });
    Ok(before.chain(0..d).chain(after).map(|i| i as u32).collect())
}

/// ONNX LSTM, forward, default activations: X [T, B, I], W [1, 4H, I], R [1, 4H, H], B [1, 8H],
/// initial h and c [1, B, H]; returns Y [T, 1, B, H]. Gates in ONNX's order i, o, f, c.
fn lstm(
    get: &dyn Fn(usize) -> Result<Tensor, GraphError>,
    hidden: usize,
    bias: bool,
    has_h0: bool,
    has_c0: bool,
) -> Result<Tensor, GraphError> {
    let x = get(0)?;
    let (t, b, i) = x.dims3()?;
    let w = get(1)?.squeeze(0)?;
    let r = get(2)?.squeeze(0)?.t()?.contiguous()?;
    let mut k = 3;
    let mut xw = x
        .reshape((t * b, i))?
        .matmul(&w.t()?.contiguous()?)?
        .reshape((t, b, 4 * hidden))?;
    if bias {
        let bb = get(k)?.squeeze(0)?;
        k += 1;
        let sum = (bb.narrow(0, 0, 4 * hidden)? + bb.narrow(0, 4 * hidden, 4 * hidden)?)?;
        xw = xw.broadcast_add(&sum)?;
    }
    let state = |present: bool, k: &mut usize| -> Result<Tensor, GraphError> {
        if present {
            let s = get(*k)?;
            *k += 1;
            Ok(s.reshape((b, hidden))?)
        } else {
            Ok(Tensor::zeros((b, hidden), x.dtype(), x.device())?)
        }
    };
    let mut h = state(has_h0, &mut k)?;
    let mut c = state(has_c0, &mut k)?;
    let mut ys = Vec::with_capacity(t);
    for step in 0..t {
        let g = (xw.get(step)? + h.matmul(&r)?)?;
        let gate = |j: usize| g.narrow(1, j * hidden, hidden);
        let ig = candle_nn::ops::sigmoid(&gate(0)?)?;
        let og = candle_nn::ops::sigmoid(&gate(1)?)?;
        let fg = candle_nn::ops::sigmoid(&gate(2)?)?;
        let cg = gate(3)?.tanh()?;
        c = ((fg * &c)? + (ig * cg)?)?;
        h = (og * c.tanh()?)?;
        ys.push(h.clone());
    }
    Ok(Tensor::stack(&ys, 0)?.unsqueeze(1)?)
}

#[cfg(test)]
mod tests {
    //! Every mapped op against tract (forward) and against central finite differences
    //! (gradient): a synthetic graph that chains all of them on random weights, and the shared
    //! cases' classifiers on their own data.
    use super::*;
    use candle_core::Var;
    use proptest::prelude::*;
    use tract_onnx::pb::{
        attribute_proto::AttributeType, tensor_proto::DataType, type_proto, AttributeProto,
        OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    };
    use tract_onnx::prelude::*;

    /// Forward outputs of the program and of tract agree within this relative L2 error.
    const FORWARD_TOLERANCE: f64 = 1e-5;
    /// An analytic gradient entry agrees with its central difference within this fraction of
    /// the parameter's largest gradient entry.
    const GRADIENT_TOLERANCE: f64 = 2e-2;

    fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            name: output.into(),
            attribute: attrs,
            ..Default::default()
        }
    }
    fn a_ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v.to_vec(),
            ..Default::default()
        }
    }
    fn a_int(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Int as i32,
            i: v,
            ..Default::default()
        }
    }
    fn a_float(name: &str, v: f32) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Float as i32,
            f: v,
            ..Default::default()
        }
    }
    fn floats(name: &str, dims: &[i64], v: Vec<f32>) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            float_data: v,
            ..Default::default()
        }
    }
    fn int64s(name: &str, v: &[i64]) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: vec![v.len() as i64],
            data_type: DataType::Int64 as i32,
            int64_data: v.to_vec(),
            ..Default::default()
        }
    }
    fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
        use tract_onnx::pb::tensor_shape_proto::{dimension::Value as D, Dimension};
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: DataType::Float as i32,
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| Dimension {
                                value: Some(D::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                denotation: String::new(),
            }),
            ..Default::default()
        }
    }

    /// A deterministic generator of values in [lo, hi).
    struct Gen(u64);
    impl Gen {
        fn f(&mut self, lo: f32, hi: f32) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((self.0 >> 40) as f32 / (1u64 << 24) as f32)
        }
        fn v(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
            (0..n).map(|_| self.f(lo, hi)).collect()
        }
    }

    const BATCH: usize = 2;

    /// A graph that chains every mapped op: asymmetric-padded Conv, Tanh, MaxPool, Relu,
    /// AveragePool, Flatten, Gemm (transB, alpha, beta), Sigmoid, MatMul, Mul/Sub/Div by
    /// weights, Add of a Constant, Reshape/Transpose/Reshape, Identity, Cast, a 1-D Conv
    /// (SAME_UPPER), Softmax and LogSoftmax.
    fn synthetic(seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut g = Gen(seed);
        let inits = vec![
            floats("w1", &[3, 2, 3, 3], g.v(54, -0.5, 0.5)),
            floats("b1", &[3], g.v(3, -0.2, 0.2)),
            floats("w2", &[5, 12], g.v(60, -0.6, 0.6)),
            floats("b2", &[5], g.v(5, -0.2, 0.2)),
            floats("w3", &[5, 4], g.v(20, -1.0, 1.0)),
            floats("scale", &[4], g.v(4, 0.5, 1.5)),
            floats("shift", &[4], g.v(4, -0.5, 0.5)),
            floats("div", &[4], g.v(4, 1.5, 2.5)),
            floats("w4", &[2, 2, 3], g.v(12, -0.8, 0.8)),
            int64s("to3", &[0, 2, -1]),
            int64s("to2", &[-1, 4]),
        ];
        let constant = constant_of("k", floats("", &[4], vec![0.1, -0.2, 0.3, 0.0]));
        let nodes = vec![
            node(
                "Conv",
                &["x", "w1", "b1"],
                "c1",
                vec![a_ints("pads", &[1, 0, 0, 1])],
            ),
            node("Tanh", &["c1"], "t1", vec![]),
            node(
                "MaxPool",
                &["t1"],
                "p1",
                vec![a_ints("kernel_shape", &[2, 2]), a_ints("strides", &[2, 2])],
            ),
            node("Relu", &["p1"], "r1", vec![]),
            node(
                "AveragePool",
                &["r1"],
                "p2",
                vec![a_ints("kernel_shape", &[2, 2]), a_ints("strides", &[2, 2])],
            ),
            node("Flatten", &["p2"], "f", vec![a_int("axis", 1)]),
            node(
                "Gemm",
                &["f", "w2", "b2"],
                "g",
                vec![
                    a_int("transB", 1),
                    a_float("alpha", 0.7),
                    a_float("beta", 1.3),
                ],
            ),
            node("Sigmoid", &["g"], "s", vec![]),
            node("MatMul", &["s", "w3"], "m", vec![]),
            node("Mul", &["m", "scale"], "m2", vec![]),
            node("Sub", &["m2", "shift"], "m3", vec![]),
            node("Div", &["m3", "div"], "m4", vec![]),
            constant,
            node("Add", &["m4", "k"], "m5", vec![]),
            node("Reshape", &["m5", "to3"], "r3", vec![]),
            node("Transpose", &["r3"], "tr", vec![a_ints("perm", &[0, 2, 1])]),
            node(
                "Conv",
                &["tr", "w4"],
                "c2",
                vec![AttributeProto {
                    name: "auto_pad".into(),
                    r#type: AttributeType::String as i32,
                    s: b"SAME_UPPER".to_vec(),
                    ..Default::default()
                }],
            ),
            node("Identity", &["c2"], "id", vec![]),
            node("Cast", &["id"], "cast", vec![a_int("to", 1)]),
            node("Reshape", &["cast", "to2"], "r2", vec![]),
            node("LogSoftmax", &["r2"], "ls", vec![a_int("axis", -1)]),
            node("Softmax", &["ls"], "y", vec![a_int("axis", 1)]),
        ];
        let model = ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                name: "synthetic".into(),
                node: nodes,
                initializer: inits,
                input: vec![value("x", &[BATCH as i64, 2, 10, 10])],
                output: vec![value("y", &[BATCH as i64, 4])],
                ..Default::default()
            }),
            ..Default::default()
        };
        let x = g.v(BATCH * 200, -1.0, 1.0);
        (prost::Message::encode_to_vec(&model), x)
    }

    fn tract_run(bytes: &[u8], x: &[f32], shape: &[usize]) -> Vec<f32> {
        let plan = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(bytes))
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let input = tract_ndarray::ArrayD::from_shape_vec(shape, x.to_vec()).unwrap();
        let out = plan
            .run(tvec![tract_onnx::prelude::Tensor::from(input).into()])
            .unwrap();
        out[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    /// The program's output, flattened.
    fn flat_output(
        p: &Program,
        feeds: &[candle_core::Tensor],
        params: &[candle_core::Tensor],
    ) -> Vec<f32> {
        p.forward(feeds, params, None)
            .unwrap()
            .0
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    }

    fn program_of(bytes: &[u8], output: Option<&str>) -> (Program, Vec<candle_core::Tensor>) {
        let set = crate::formats::read_bytes(bytes).unwrap();
        let crate::formats::Container::Onnx(c) = &set.container else {
            panic!("not onnx")
        };
        let p = Program::build(&c.model, &set.tensors, output).unwrap();
        let params = p
            .params
            .iter()
            .map(|n| {
                let t = set.tensors.iter().find(|t| &t.name == n).unwrap();
                candle_core::Tensor::from_vec(t.to_f32().unwrap(), t.shape.as_slice(), &Device::Cpu)
                    .unwrap()
            })
            .collect();
        (p, params)
    }

    /// Sum of the output weighted by `r`.
    fn weighted(
        p: &Program,
        feeds: &[candle_core::Tensor],
        params: &[candle_core::Tensor],
        r: &[f64],
    ) -> f64 {
        let (y, _) = p.forward(feeds, params, None).unwrap();
        y.flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .zip(r)
            .map(|(a, b)| a * b)
            .sum()
    }

    fn f64s(ts: &[candle_core::Tensor]) -> Vec<candle_core::Tensor> {
        ts.iter()
            .map(|t| t.to_dtype(candle_core::DType::F64).unwrap())
            .collect()
    }

    /// Checks the gradient of `sum(output * r)` with respect to `checked` entries of every
    /// parameter against central differences, all in f64. An entry whose two step sizes
    /// disagree sits on a kink (Relu, MaxPool) and is left out; at most a quarter may be.
    fn check_gradients(
        p: &Program,
        feeds: &[candle_core::Tensor],
        params: &[candle_core::Tensor],
        seed: u64,
        checked: usize,
    ) {
        let (feeds, params) = (f64s(feeds), f64s(params));
        let out = p.forward(&feeds, &params, None).unwrap().0;
        let mut g = Gen(seed ^ 0x5eed);
        let r: Vec<f64> = g
            .v(out.elem_count(), -1.0, 1.0)
            .into_iter()
            .map(f64::from)
            .collect();
        let vars: Vec<Var> = params
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<candle_core::Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (y, _) = p.forward(&feeds, &ts, None).unwrap();
        let rt = candle_core::Tensor::from_vec(r.clone(), y.dims(), &Device::Cpu).unwrap();
        let loss = (y * rt).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (k, v) in vars.iter().enumerate() {
            let grad = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient reaches {}", p.params[k]))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = params[k].flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let biggest = grad.iter().fold(0f64, |m, x| m.max(x.abs()));
            let n = base.len();
            let mut kinks = 0;
            let entries: Vec<usize> = (0..checked.min(n))
                .map(|i| i * n / checked.min(n))
                .collect();
            for &i in &entries {
                let at = |eps: f64| {
                    let moved = |d: f64| {
                        let mut w = base.clone();
                        w[i] += d;
                        let mut ps = params.clone();
                        ps[k] = candle_core::Tensor::from_vec(w, params[k].dims(), &Device::Cpu)
                            .unwrap();
                        weighted(p, &feeds, &ps, &r)
                    };
                    (moved(eps) - moved(-eps)) / (2.0 * eps)
                };
                let scale = base[i].abs().max(0.1);
                let (coarse, fine) = (at(2e-6 * scale), at(1e-6 * scale));
                let tol = GRADIENT_TOLERANCE * biggest.max(1e-6);
                if (coarse - fine).abs() > tol {
                    kinks += 1;
                    continue;
                }
                assert!(
                    (grad[i] - fine).abs() <= tol,
                    "{}[{i}]: analytic {} against finite difference {fine}",
                    p.params[k],
                    grad[i]
                );
            }
            assert!(
                kinks * 4 <= entries.len(),
                "{}: {kinks} of {} entries on kinks",
                p.params[k],
                entries.len()
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn synthetic_graph_matches_tract_and_finite_differences(seed in any::<u64>()) {
            let (bytes, x) = synthetic(seed);
            let (p, params) = program_of(&bytes, None);
            prop_assert_eq!(p.params.len(), 10);
            let shape = [BATCH, 2, 10, 10];
            let feeds = vec![candle_core::Tensor::from_vec(x.clone(), &shape, &Device::Cpu).unwrap()];
            let ours = flat_output(&p, &feeds, &params);
            let theirs = tract_run(&bytes, &x, &shape);
            prop_assert!(rel_l2(&ours, &theirs) < FORWARD_TOLERANCE, "{:?} vs {:?}", ours, theirs);
            check_gradients(&p, &feeds, &params, seed, 6);
        }
    }

    /// The cases' classifiers: the program's output on eval rows equals tract's, and the
    /// gradient of every weight agrees with finite differences. mnist-8 (opset 8: SAME_UPPER
    /// Conv, MaxPool, a weight read through a Reshape, batch fixed to 1 in the graph and run
    /// here on 8 rows) and the digits MLP (MatMul, Add, Relu, Softmax; its ai.onnx.ml label
    /// output is not on the scored path).
    #[test]
    fn cases_match_tract_and_finite_differences() {
        let cases = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/cases");
        for (model, data, output, rows) in [
            ("mnist8/mnist-8.onnx", "mnist8/eval.npz", None, 8usize),
            (
                "digits_mlp_control/digits_mlp.onnx",
                "digits_mlp_control/eval.npz",
                Some("probabilities"),
                16,
            ),
        ] {
            let bytes = std::fs::read(cases.join(model)).unwrap();
            let data =
                crate::eval::run::Dataset::from_npz(&std::fs::read(cases.join(data)).unwrap())
                    .unwrap();
            let (p, params) = program_of(&bytes, output);
            let x = &data.arrays.iter().find(|a| a.name == p.inputs[0]).unwrap();
            let row: usize = x.shape[1..].iter().product();
            let values: Vec<f32> = x.data[..rows * row * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let mut shape = x.shape.clone();
            shape[0] = rows;
            let feeds =
                vec![
                    candle_core::Tensor::from_vec(values.clone(), shape.as_slice(), &Device::Cpu)
                        .unwrap(),
                ];
            let ours = flat_output(&p, &feeds, &params);
            // tract runs mnist-8 one row at a time (its graph fixes the batch to 1).
            let mut theirs = Vec::new();
            if model.starts_with("mnist8") {
                let mut one = shape.clone();
                one[0] = 1;
                for r in 0..rows {
                    theirs.extend(tract_run(&bytes, &values[r * row..(r + 1) * row], &one));
                }
            } else {
                let plan = tract_onnx::onnx()
                    .model_for_read(&mut std::io::Cursor::new(&bytes))
                    .unwrap();
                let outs = plan.output_outlets().unwrap().to_vec();
                let idx = outs
                    .iter()
                    .position(|o| plan.outlet_label(*o) == Some("probabilities"))
                    .unwrap();
                let mut plan = plan;
                plan.select_output_outlets(&[outs[idx]]).unwrap();
                plan.set_input_fact(
                    0,
                    InferenceFact::dt_shape(f32::datum_type(), shape.as_slice()),
                )
                .unwrap();
                let plan = plan.into_optimized().unwrap().into_runnable().unwrap();
                let input = tract_ndarray::ArrayD::from_shape_vec(shape.as_slice(), values.clone())
                    .unwrap();
                let out = plan
                    .run(tvec![tract_onnx::prelude::Tensor::from(input).into()])
                    .unwrap();
                theirs = out[0]
                    .to_plain_array_view::<f32>()
                    .unwrap()
                    .iter()
                    .copied()
                    .collect();
            }
            assert!(
                rel_l2(&ours, &theirs) < FORWARD_TOLERANCE,
                "{model}: {}",
                rel_l2(&ours, &theirs)
            );
            check_gradients(&p, &feeds, &params, 11, 8);
        }
    }
    /// A feed: values and shape.
    type Feed = (Vec<f32>, Vec<usize>);

    fn tract_run_many(bytes: &[u8], inputs: &[Feed]) -> Vec<f32> {
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(bytes))
            .unwrap();
        for (i, (_, shape)) in inputs.iter().enumerate() {
            model
                .set_input_fact(
                    i,
                    InferenceFact::dt_shape(f32::datum_type(), shape.as_slice()),
                )
                .unwrap();
        }
        let outs = model.output_outlets().unwrap().to_vec();
        model.select_output_outlets(&outs[..1]).unwrap();
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        let feeds: TVec<TValue> = inputs
            .iter()
            .map(|(v, shape)| {
                let a = tract_ndarray::ArrayD::from_shape_vec(shape.as_slice(), v.clone()).unwrap();
                tract_onnx::prelude::Tensor::from(a).into()
            })
            .collect();
        let out = plan.run(feeds).unwrap();
        out[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    /// A Constant node named after its output, holding `t`.
    fn constant_of(name: &str, t: TensorProto) -> NodeProto {
        NodeProto {
            op_type: "Constant".into(),
            output: vec![name.into()],
            name: name.into(),
            attribute: vec![AttributeProto {
                name: "value".into(),
                r#type: AttributeType::Tensor as i32,
                t: Some(t),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn int_constant(name: &str, dims: &[i64], v: &[i64]) -> NodeProto {
        let mut t = int64s("", v);
        t.dims = dims.to_vec();
        constant_of(name, t)
    }

    const STEPS: usize = 5;
    const HIDDEN: usize = 3;

    /// A small detector built like silero_vad: pad widths computed from constants
    /// (ConstantOfShape, Concat, Reshape, a reversing Slice, Transpose, Reshape, Cast), a
    /// reflect Pad, Unsqueeze, a strided 1-D Conv, Slices, Pow, Add, Sqrt, Convs with Relu,
    /// Transpose, an LSTM with bias and initial state, Squeeze, a 1x1 Conv, Sigmoid, Reshape.
    /// Inputs x [STEPS, 10], h and c [1, 1, HIDDEN]. Both strided convolutions leave
    /// trailing inputs no window reaches (15 by 5 in steps of 3, 6 by 3 in steps of 2).
    fn sequence(seed: u64) -> (Vec<u8>, Vec<Feed>) {
        let mut g = Gen(seed);
        let h = HIDDEN as i64;
        let inits = vec![
            floats("basis", &[6, 1, 5], g.v(30, -0.5, 0.5)),
            floats("e1", &[4, 3, 3], g.v(36, -0.6, 0.6)),
            floats("e1b", &[4], g.v(4, -0.1, 0.3)),
            floats("e2", &[4, 4, 2], g.v(32, -0.6, 0.6)),
            floats("e2b", &[4], g.v(4, -0.1, 0.3)),
            floats("lw", &[1, 4 * h, 4], g.v(48, -0.8, 0.8)),
            floats("lr", &[1, 4 * h, h], g.v(36, -0.8, 0.8)),
            floats("lb", &[1, 8 * h], g.v(24, -0.3, 0.3)),
            floats("ow", &[1, h, 1], g.v(3, -1.0, 1.0)),
            floats("ob", &[1], g.v(1, -0.2, 0.2)),
        ];
        let two = constant_of("two", floats("", &[], vec![2.0]));
        let nodes = vec![
            int_constant("n2", &[1], &[2]),
            node(
                "ConstantOfShape",
                &["n2"],
                "zeros",
                vec![AttributeProto {
                    name: "value".into(),
                    r#type: AttributeType::Tensor as i32,
                    t: Some(int64s("", &[0])),
                    ..Default::default()
                }],
            ),
            int_constant("widths", &[2], &[2, 3]),
            node(
                "Concat",
                &["widths", "zeros"],
                "cat",
                vec![a_int("axis", 0)],
            ),
            int_constant("by2", &[2], &[-1, 2]),
            node("Reshape", &["cat", "by2"], "pairs", vec![]),
            int_constant("s_start", &[1], &[-1]),
            int_constant("s_end", &[1], &[-1000]),
            int_constant("s_axis", &[1], &[0]),
            int_constant("s_step", &[1], &[-1]),
            node(
                "Slice",
                &["pairs", "s_start", "s_end", "s_axis", "s_step"],
                "rev",
                vec![],
            ),
            node("Transpose", &["rev"], "tp", vec![a_ints("perm", &[1, 0])]),
            int_constant("flat", &[1], &[-1]),
            node("Reshape", &["tp", "flat"], "pads0", vec![]),
            node("Cast", &["pads0"], "pads", vec![a_int("to", 7)]),
            NodeProto {
                op_type: "Pad".into(),
                input: vec!["x".into(), "pads".into()],
                output: vec!["padded".into()],
                attribute: vec![AttributeProto {
                    name: "mode".into(),
                    r#type: AttributeType::String as i32,
                    s: b"reflect".to_vec(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            int_constant("one", &[1], &[1]),
            node("Unsqueeze", &["padded", "one"], "u", vec![]),
            node(
                "Conv",
                &["u", "basis"],
                "spec",
                vec![a_ints("strides", &[3])],
            ),
            int_constant("zero", &[1], &[0]),
            int_constant("three", &[1], &[3]),
            int_constant("six", &[1], &[6]),
            node("Slice", &["spec", "zero", "three", "one"], "re", vec![]),
            node("Slice", &["spec", "three", "six", "one"], "im", vec![]),
            two,
            node("Pow", &["re", "two"], "re2", vec![]),
            node("Pow", &["im", "two"], "im2", vec![]),
            node("Add", &["re2", "im2"], "pow", vec![]),
            node("Sqrt", &["pow"], "mag", vec![]),
            node(
                "Conv",
                &["mag", "e1", "e1b"],
                "c1",
                vec![a_ints("pads", &[1, 1]), a_ints("strides", &[2])],
            ),
            node("Relu", &["c1"], "r1", vec![]),
            node("Conv", &["r1", "e2", "e2b"], "c2", vec![]),
            node("Relu", &["c2"], "r2", vec![]),
            node(
                "Transpose",
                &["r2"],
                "seq",
                vec![a_ints("perm", &[0, 2, 1])],
            ),
            NodeProto {
                op_type: "LSTM".into(),
                input: ["seq", "lw", "lr", "lb", "", "h", "c"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                output: vec!["ly".into(), "hn".into(), "cn".into()],
                attribute: vec![a_int("hidden_size", h)],
                ..Default::default()
            },
            node("Squeeze", &["ly", "one"], "sq", vec![]),
            node("Relu", &["sq"], "r3", vec![]),
            node("Transpose", &["r3"], "t3", vec![a_ints("perm", &[1, 2, 0])]),
            node("Conv", &["t3", "ow", "ob"], "logit", vec![]),
            node("Sigmoid", &["logit"], "prob", vec![]),
            node("Reshape", &["prob", "flat"], "y", vec![]),
        ];
        let t = STEPS as i64;
        let model = ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 16,
            }],
            graph: Some(GraphProto {
                name: "sequence".into(),
                node: nodes,
                initializer: inits,
                input: vec![
                    value("x", &[t, 10]),
                    value("h", &[1, 1, h]),
                    value("c", &[1, 1, h]),
                ],
                output: vec![value("y", &[t]), value("hn", &[1, 1, h])],
                ..Default::default()
            }),
            ..Default::default()
        };
        let feeds = vec![
            (g.v(STEPS * 10, -1.0, 1.0), vec![STEPS, 10]),
            (g.v(HIDDEN, -0.5, 0.5), vec![1, 1, HIDDEN]),
            (g.v(HIDDEN, -0.5, 0.5), vec![1, 1, HIDDEN]),
        ];
        (prost::Message::encode_to_vec(&model), feeds)
    }

    fn tensors_of(feeds: &[Feed]) -> Vec<candle_core::Tensor> {
        feeds
            .iter()
            .map(|(v, s)| {
                candle_core::Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu).unwrap()
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn sequence_graph_matches_tract_and_finite_differences(seed in any::<u64>()) {
            let (bytes, feeds) = sequence(seed);
            let (p, params) = program_of(&bytes, Some("y"));
            prop_assert_eq!(p.params.len(), 10);
            prop_assert!(p.binary);
            prop_assert_eq!(p.logits.as_deref(), Some("logit"));
            prop_assert_eq!(&p.inputs, &["x", "h", "c"]);
            let ts = tensors_of(&feeds);
            let ours = flat_output(&p, &ts, &params);
            let theirs = tract_run_many(&bytes, &feeds);
            prop_assert!(rel_l2(&ours, &theirs) < FORWARD_TOLERANCE, "{:?} vs {:?}", ours, theirs);
            check_gradients(&p, &ts, &params, seed, 6);
        }
    }

    /// Reading an LSTM's final state on the scored path is refused with a reason, not run
    /// wrong.
    #[test]
    fn an_lstm_state_output_is_refused() {
        let (bytes, _) = sequence(3);
        let set = crate::formats::read_bytes(&bytes).unwrap();
        let crate::formats::Container::Onnx(c) = &set.container else {
            panic!("not onnx")
        };
        let e = Program::build(&c.model, &set.tensors, Some("hn")).unwrap_err();
        assert!(e.0.contains("final state"), "{e}");
    }

    /// silero_vad (reflect Pad with widths computed from constants, the STFT as a strided
    /// Conv, Pow/Sqrt magnitude, Conv1d encoder, LSTM, Sigmoid head): the program's output on
    /// the first chunks of eval.npz equals tract's, and every weight's gradient (the LSTM's
    /// three included) agrees with finite differences.
    #[test]
    fn silero_matches_tract_and_finite_differences() {
        let cases = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/cases");
        let bytes = std::fs::read(cases.join("silero_vad/silero_vad_16k_sequence.onnx")).unwrap();
        let data = crate::eval::run::Dataset::from_npz(
            &std::fs::read(cases.join("silero_vad/eval.npz")).unwrap(),
        )
        .unwrap();
        let (p, params) = program_of(&bytes, Some("speech_probs"));
        assert!(p.binary);
        assert_eq!(p.params.len(), 14, "{:?}", p.params);
        // Chunks 300.. hold speech; 12 of them, the state as stored (zeros).
        let (from, steps) = (300usize, 12usize);
        let feeds: Vec<Feed> = p
            .inputs
            .iter()
            .map(|name| {
                let a = data.arrays.iter().find(|a| &a.name == name).unwrap();
                let v: Vec<f32> = a
                    .data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                if name == "input" {
                    let row = a.shape[1];
                    (
                        v[from * row..(from + steps) * row].to_vec(),
                        vec![steps, row],
                    )
                } else {
                    (v, a.shape.clone())
                }
            })
            .collect();
        let ts = tensors_of(&feeds);
        let ours = flat_output(&p, &ts, &params);
        let theirs = tract_run_many(&bytes, &feeds);
        assert!(
            rel_l2(&ours, &theirs) < FORWARD_TOLERANCE,
            "{}: {ours:?} vs {theirs:?}",
            rel_l2(&ours, &theirs)
        );
        check_gradients(&p, &ts, &params, 5, 4);
    }
}
