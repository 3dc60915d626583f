//! Which node multiplies a weight by an activation, and how: the value calibration must
//! observe for the weight, the value the node writes, and the layout of the inputs each
//! output channel sees.

use crate::model::Tensor;
use tract_onnx::pb::{GraphProto, NodeProto};

/// Inputs per channel beyond which no second moment is collected (it is dim² f64).
pub const MAX_HESSIAN_DIM: usize = 8192;

/// How the consumer presents inputs to each output channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Geometry {
    /// Rows of `dim` inputs: the last axis of a MatMul's or Gemm's X.
    Rows { dim: usize },
    /// Patches of a convolution's input.
    Conv(ConvGeometry),
}

impl Geometry {
    /// Inputs per output channel.
    pub fn dim(&self) -> usize {
        match self {
            Geometry::Rows { dim } => *dim,
            Geometry::Conv(c) => c.patch_len(),
        }
    }
}

/// Padding of a convolution: explicit begins and ends per spatial axis, or ONNX's
/// `auto_pad` SAME (the output has ceil(in / stride) positions; the odd pad at the end for
/// SAME_UPPER, at the start for SAME_LOWER).
#[derive(Debug, Clone, PartialEq)]
pub enum Pads {
    Explicit { begin: Vec<usize>, end: Vec<usize> },
    SameUpper,
    SameLower,
}

/// A convolution with one group: input channels, kernel, strides, dilations, padding.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvGeometry {
    pub channels: usize,
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pads: Pads,
}

impl ConvGeometry {
    /// Inputs of one patch: C·∏kernel, in the weight's order (channel, then kernel axes).
    pub fn patch_len(&self) -> usize {
        self.channels * self.kernel.iter().product::<usize>()
    }
}

/// A node that multiplies a weight by an activation.
#[derive(Debug, Clone, PartialEq)]
pub struct Consumer {
    pub node: String,
    pub op: String,
    /// The activation multiplied by the weight.
    pub input: String,
    /// The value the node writes.
    pub output: String,
    pub geometry: Geometry,
}

impl Consumer {
    /// The values static int8 quantizes around this consumer: its activation input always;
    /// its output only for a convolution, which onnxruntime runs as QLinearConv only between
    /// quantized values. A MatMul or Gemm with a float output still runs on integers
    /// (MatMulIntegerToFloat), and its wide-ranged outputs lose less left in float: on
    /// paraphrase-MiniLM-L3, min-max static int8 of the 18 MatMuls keeps mean cosine 0.9929
    /// with float outputs and 0.961 with uint8 outputs.
    pub fn quantized_values(&self) -> Vec<&String> {
        if self.op == "Conv" {
            vec![&self.input, &self.output]
        } else {
            vec![&self.input]
        }
    }
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a tract_onnx::pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

fn int(n: &NodeProto, name: &str) -> Option<i64> {
    attr(n, name).map(|a| a.i)
}

fn reads_in_subgraph(g: &GraphProto, name: &str) -> bool {
    g.node.iter().any(|n| {
        n.attribute.iter().any(|a| {
            a.g.iter().chain(&a.graphs).any(|sub| {
                sub.node.iter().any(|m| m.input.iter().any(|i| i == name))
                    || reads_in_subgraph(sub, name)
            })
        })
    })
}

fn usize_all(v: &[i64]) -> Option<Vec<usize>> {
    v.iter().map(|&x| usize::try_from(x).ok()).collect()
}

fn conv_geometry(n: &NodeProto, t: &Tensor) -> Result<ConvGeometry, String> {
    if int(n, "group").unwrap_or(1) != 1 {
        return Err("its Conv has several groups (calibration measures group 1)".into());
    }
    if !(3..=4).contains(&t.shape.len()) {
        return Err(format!(
            "its Conv is {}-dimensional (calibration measures 1-D and 2-D convolutions)",
            t.shape.len().saturating_sub(2)
        ));
    }
    let spatial = t.shape.len() - 2;
    let kernel = t.shape[2..].to_vec();
    let list = |name: &str, default: usize| -> Result<Vec<usize>, String> {
        match ints(n, name).filter(|v| !v.is_empty()) {
            None => Ok(vec![default; spatial]),
            Some(v) => usize_all(&v)
                .filter(|v| v.len() == spatial && v.iter().all(|&x| x > 0))
                .ok_or_else(|| format!("its Conv has an unusable {name}")),
        }
    };
    let strides = list("strides", 1)?;
    let dilations = list("dilations", 1)?;
    let auto_pad = attr(n, "auto_pad")
        .map(|a| String::from_utf8_lossy(&a.s).to_string())
        .unwrap_or_default();
    let pads = match auto_pad.as_str() {
        "SAME_UPPER" => Pads::SameUpper,
        "SAME_LOWER" => Pads::SameLower,
        "VALID" => Pads::Explicit {
            begin: vec![0; spatial],
            end: vec![0; spatial],
        },
        "" | "NOTSET" => match ints(n, "pads").filter(|v| !v.is_empty()) {
            None => Pads::Explicit {
                begin: vec![0; spatial],
                end: vec![0; spatial],
            },
            Some(p) => {
                let p = usize_all(&p)
                    .filter(|p| p.len() == 2 * spatial)
                    .ok_or("its Conv has unusable pads")?;
                Pads::Explicit {
                    begin: p[..spatial].to_vec(),
                    end: p[spatial..].to_vec(),
                }
            }
        },
        other => return Err(format!("its Conv has auto_pad {other:?}")),
    };
    if let Some(k) = ints(n, "kernel_shape").and_then(|k| usize_all(&k)) {
        if k != kernel {
            return Err("its Conv's kernel_shape differs from the weight".into());
        }
    }
    Ok(ConvGeometry {
        channels: t.shape[1],
        kernel,
        strides,
        dilations,
        pads,
    })
}

/// Shape-only ops a weight may pass through on its way to the consumer (mnist-8 reshapes its
/// 4-D FC weight before the MatMul): the flat order of the values does not change.
fn reshapes(op: &str) -> bool {
    matches!(
        op,
        "Reshape" | "Identity" | "Flatten" | "Squeeze" | "Unsqueeze"
    )
}

/// The consumers of weight `t` in the main graph, with their input layout; or why calibration
/// cannot serve it.
pub fn of(graph: &GraphProto, t: &Tensor) -> Result<Vec<Consumer>, String> {
    if graph.output.iter().any(|o| o.name == t.name) {
        return Err("it is a graph output".into());
    }
    let mut frontier = vec![t.name.clone()];
    let mut found = Vec::new();
    let mut hops = 0;
    while let Some(value) = frontier.pop() {
        hops += 1;
        if hops > 16 {
            return Err("it passes through too many reshapes".into());
        }
        if reads_in_subgraph(graph, &value) {
            return Err("a subgraph (If/Loop/Scan branch) reads it".into());
        }
        for n in graph.node.iter() {
            for (slot, input) in n.input.iter().enumerate() {
                if *input != value {
                    continue;
                }
                let op = n.op_type.as_str();
                let domain_ok = n.domain.is_empty() || n.domain == "ai.onnx";
                let output = n.output.first().cloned().unwrap_or_default();
                let x = n.input.first().cloned().unwrap_or_default();
                let channels = t.shape.get(t.channel_axis()).copied().unwrap_or(1).max(1);
                let geometry = match (op, slot) {
                    _ if !domain_ok => {
                        return Err(format!("its consumer is {}.{op}", n.domain));
                    }
                    (op, 0) if reshapes(op) => {
                        frontier.push(output);
                        continue;
                    }
                    ("MatMul", 1) if t.channel_axis() + 1 == t.shape.len() => Geometry::Rows {
                        dim: t.len() / channels,
                    },
                    ("Gemm", 1) if int(n, "transA").unwrap_or(0) == 0 => Geometry::Rows {
                        dim: t.len() / channels,
                    },
                    ("Conv", 1) => Geometry::Conv(conv_geometry(n, t)?),
                    _ => {
                        return Err(format!(
                            "its consumer is a {op} taking it as input {slot} (calibration measures the inputs of MatMul, Gemm and Conv weights)"
                        ))
                    }
                };
                found.push(Consumer {
                    node: n.name.clone(),
                    op: op.to_string(),
                    input: x,
                    output,
                    geometry,
                });
            }
        }
    }
    if found.is_empty() {
        return Err("no node of the main graph reads it".into());
    }
    Ok(found)
}
