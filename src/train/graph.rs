//! An ONNX graph as a differentiable program: each node the scored output depends on is
//! mapped to candle tensor ops (which carry reverse-mode autodiff), and every float
//! initializer is a parameter the caller passes in, so gradients reach the weights wherever
//! the graph uses them (through a Reshape, as mnist-8's FC weight). Integer values (shapes,
//! axes) are computed once, on the host, when the program is built.
//!
//! The ops are those of the shared cases' classifiers (mnist-8, the digits MLP): Conv (1-D and
//! 2-D), MaxPool, AveragePool, MatMul, Gemm, Add/Sub/Mul/Div, Relu, Sigmoid, Tanh, Softmax,
//! LogSoftmax, Reshape, Flatten, Transpose, Identity, Cast (to float), Constant. A graph
//! with another op on the path to the scored output is refused with its name.

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
    Ints(Vec<i64>),
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
            t.data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        )),
        DType::I32 => Some(Known::Ints(
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
            Ok(Known::Ints(v))
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
        let mut logits = None;
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
                    Some(Known::Ints(v)) => Some(v.clone()),
                    _ => None,
                }
            };
            if op_name == "Constant" {
                if !initializer_names.contains(out.as_str()) {
                    known.insert(out, constant_node(n)?);
                }
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
                "Softmax" => {
                    if out == output
                        || g.node.iter().any(|m| {
                            m.op_type == "Identity"
                                && m.input.first() == Some(&out)
                                && m.output.first() == Some(&output)
                        })
                    {
                        logits = n.input.first().cloned();
                    }
                    Op::Softmax(int(n, "axis", -1))
                }
                "LogSoftmax" => Op::LogSoftmax(int(n, "axis", -1)),
                "Reshape" => Op::Reshape(
                    known_ints(1).ok_or_else(|| err("a Reshape whose shape is not a constant"))?,
                ),
                "Flatten" => Op::Flatten(int(n, "axis", 1)),
                "Transpose" => Op::Transpose(usizes(&ints(n, "perm").unwrap_or_default())?),
                "Identity" => Op::Identity,
                "Cast" if int(n, "to", 1) == 1 => Op::Identity,
                other => {
                    return Err(err(format!(
                        "its op {other} is not one the training engine maps"
                    )))
                }
            };
            let arity = match op {
                Op::Reshape(_) => 1,
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
        Ok(Program {
            steps,
            consts,
            inputs,
            output,
            logits,
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
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &s) in shape.iter().enumerate() {
        match s {
            0 => out.push(
                *dims
                    .get(i)
                    .ok_or_else(|| err("Reshape copies a missing axis"))?,
            ),
            -1 => {
                infer = Some(i);
                out.push(1);
            }
            s if s > 0 => out.push(s as usize),
            _ => return Err(err("a negative Reshape size")),
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
            // Asymmetric padding: pad the input, then convolve without padding.
            let symmetric =
                pads.iter().all(|(b, e)| b == e) && pads.windows(2).all(|p| p[0] == p[1]);
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
    })
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
        let constant = NodeProto {
            op_type: "Constant".into(),
            output: vec!["k".into()],
            name: "k".into(),
            attribute: vec![AttributeProto {
                name: "value".into(),
                r#type: AttributeType::Tensor as i32,
                t: Some(floats("", &[4], vec![0.1, -0.2, 0.3, 0.0])),
                ..Default::default()
            }],
            ..Default::default()
        };
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
            let ours = p.forward(&feeds, &params, None).unwrap().0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
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
            let ours = p
                .forward(&feeds, &params, None)
                .unwrap()
                .0
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
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
}
