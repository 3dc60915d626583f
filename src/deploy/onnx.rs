//! `model.onnx` at its compressed size: each encoded weight's initializer is replaced by its
//! compact parts (integer codes, scales, codebooks, factors) and a small subgraph of standard
//! ONNX ops that rebuilds the dense weight under the same name, so every consumer (Conv,
//! MatMul, Gather, LSTM, a node inside an `If` branch) reads it unchanged. The subgraph only
//! depends on initializers, so runtimes fold it once at load time (onnxruntime does).
//!
//! Each form lowers itself (`Form::lower` in its method's file) through
//! [`crate::compress::lower::Graph`], which [`Edit`] implements here: compact parts as
//! initializers (or `Constant` nodes where the weight was one), nodes with fresh names, the
//! packed digits of every weight of one width pooled into one initializer and one unpacking
//! subgraph ([`Pools`]), and consumer rewrites ([`Rewrite`]: an integer kernel such as
//! `com.microsoft.MatMulNBits`, or factors in the compute path). Static int8 ([`Statics`]):
//! the weights as `DequantizeLinear`, and a `QuantizeLinear` → `DequantizeLinear` pair
//! (uint8, ranges from calibration) after each activation the weights' consumers read, the
//! model raised to opset 13 where its ops allow; onnxruntime fuses the pattern into
//! QLinearConv / MatMulIntegerToFloat.
//!
//! Every op used exists from opset 7 with numpy broadcasting; a model below that keeps dense
//! weights, and the report says so.

use super::compact::Names;
use super::TensorForm;
use crate::compress::lower::{Attr, Consumers, Elem, Graph, Rewrite};
use crate::compress::{pack, DeployStyle, Encoding};
use crate::formats::onnx::{self as onnx_format, OnnxContainer};
use crate::formats::{DType, FormatError, Tensor};
use prost::Message;
use std::collections::HashSet;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, ModelProto,
    NodeProto, TensorProto,
};

/// Cast with an integer `to` and Floor exist from opset 6; numpy broadcasting in
/// Add/Sub/Mul/Div from 7.
pub const MIN_OPSET: i64 = 7;

/// The deployable model and how each encoded tensor went into it.
pub struct Deployed {
    pub bytes: Vec<u8>,
    pub tensors: Vec<TensorForm>,
    /// The default-domain opset of the written model.
    pub opset: i64,
    /// Static int8: activations quantized, and why they are not when asked for.
    pub statics: StaticsWritten,
}

/// Static int8 (weights and activations): the activations to quantize, with their uint8
/// scale and zero point, and the weights whose consumers read them (written as
/// `DequantizeLinear`, so that a runtime fuses `DequantizeLinear → Conv/MatMul →
/// QuantizeLinear` into an integer kernel: onnxruntime's QLinearConv and QLinearMatMul).
#[derive(Debug, Clone, Default)]
pub struct Statics {
    pub values: Vec<(String, f32, u8)>,
    /// Indices (into `restored`) of the weights whose consumers are quantized.
    pub weights: HashSet<usize>,
}

/// What the writer did with [`Statics`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StaticsWritten {
    pub activations: usize,
    /// Why static quantization was not written (the weights stay weight-only int8).
    pub refused: Option<String>,
}

/// Per-axis `QuantizeLinear`/`DequantizeLinear` (per-channel weights).
pub const STATIC_OPSET: i64 = 13;

/// The default ONNX domain's opset version (0 when the model imports none).
pub fn default_opset(model: &ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .unwrap_or(0)
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints,
        ..Default::default()
    }
}

fn dims_i64(dims: &[usize]) -> Vec<i64> {
    dims.iter().map(|&d| d as i64).collect()
}

/// The graph edits that rebuild one weight.
struct Edit<'a> {
    names: &'a mut Names,
    pools: &'a mut Pools,
    opset: i64,
    style: DeployStyle,
    /// The value the last node writes: the weight's name as its consumers read it.
    weight: String,
    /// Compact parts as `Constant` nodes (the weight was one) instead of initializers.
    as_constants: bool,
    /// Static int8: the weight must be a `DequantizeLinear` (runtimes fuse it with its
    /// consumer and the activations' quantization into an integer kernel).
    as_operator: bool,
    /// The model's main graph and the weight's shape, for [`Graph::consumers`] (None for a
    /// `Constant` node's value).
    graph: Option<&'a GraphProto>,
    shape: &'a [usize],
    /// What the form asked its consumers to become, if it did.
    rewrite: Option<Rewrite>,
    inits: Vec<TensorProto>,
    nodes: Vec<NodeProto>,
    bytes: u64,
}

impl Edit<'_> {
    fn init(&mut self, dt: DataType, dims: &[usize], raw: Vec<u8>) -> String {
        self.bytes += raw.len() as u64;
        self.place(TensorProto {
            data_type: dt as i32,
            dims: dims_i64(dims),
            raw_data: raw,
            ..Default::default()
        })
    }

    /// Names a compact part and puts it in the model: an initializer, or a `Constant` node
    /// where the weight was one.
    fn place(&mut self, tensor: TensorProto) -> String {
        let name = self.names.fresh();
        if self.as_constants {
            self.nodes.push(NodeProto {
                output: vec![name.clone()],
                op_type: "Constant".into(),
                attribute: vec![AttributeProto {
                    name: "value".into(),
                    r#type: AttributeType::Tensor as i32,
                    t: Some(tensor),
                    ..Default::default()
                }],
                ..Default::default()
            });
        } else {
            self.inits.push(TensorProto {
                name: name.clone(),
                ..tensor
            });
        }
        name
    }

    /// Adds a node writing `output`, or a fresh name when None; returns the name.
    fn emit(
        &mut self,
        op_type: &str,
        inputs: Vec<String>,
        attribute: Vec<AttributeProto>,
        output: Option<String>,
    ) -> String {
        let output = output.unwrap_or_else(|| self.names.fresh());
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![output.clone()],
            op_type: op_type.into(),
            attribute,
            ..Default::default()
        });
        output
    }

    /// Every digit of `digit` bits in `packed`, least significant first, as float32 values
    /// [words · digits per word] (see [`word`]), the last node writing `output` when given.
    /// A word of three bytes is first joined into one number below 2^24 by a product with
    /// (1, 256, 65536). Every step is exact: the values are integers below 2^24.
    fn digits(&mut self, mut packed: Vec<u8>, digit: u8, output: Option<String>) -> String {
        let (word_bytes, per_word) = word(digit);
        packed.resize(packed.len().div_ceil(word_bytes) * word_bytes, 0);
        let words = packed.len() / word_bytes;
        if digit == 8 {
            let codes = self.init(DataType::Uint8, &[words], packed);
            let to = vec![attr_int("to", DataType::Float as i64)];
            return self.emit("Cast", vec![codes], to, output);
        }
        let bytes = self.init(DataType::Uint8, &[words, word_bytes], packed);
        let mut x = self.cast(bytes, Elem::F32, false);
        if word_bytes > 1 {
            let places: Vec<f32> = (0..word_bytes).map(|j| (1u32 << (8 * j)) as f32).collect();
            let places = self.floats(&[word_bytes, 1], &places);
            x = self.binary("MatMul", x, places, false);
        }
        let shifts: Vec<f32> = (0..per_word)
            .map(|j| (1u32 << (j * usize::from(digit))) as f32)
            .collect();
        let shifts = self.floats(&[per_word], &shifts);
        let shifted = self.binary("Div", x, shifts, false);
        let shifted = self.op("Floor", vec![shifted], Vec::new(), false);
        let base = self.floats(&[], &[(1u32 << digit) as f32]);
        let above = self.binary("Div", shifted.clone(), base.clone(), false);
        let above = self.op("Floor", vec![above], Vec::new(), false);
        let above = self.binary("Mul", above, base, false);
        let digits = self.binary("Sub", shifted, above, false);
        let shape = self.int64s(&[(words * per_word) as i64]);
        self.emit("Reshape", vec![digits, shape], Vec::new(), output)
    }

    /// Writes a pool: its digits packed and unpacked, then split among its members, each
    /// less its `minus`: once before the split when every member subtracts the same, else
    /// after it. A pool of one member that fills its last word writes the member directly.
    fn pool(&mut self, digit: u8, pool: Pool) {
        let (word_bytes, per_word) = word(digit);
        let total: usize = pool.members.iter().map(|m| m.count).sum();
        let packed = pack::pack(&pool.digits, digit);
        let pad = packed.len().div_ceil(word_bytes) * per_word - total;
        let first = pool.members[0].minus;
        let shared = pool.members.iter().all(|m| m.minus == first);
        let subtract = |e: &mut Edit, x: String, minus: f32, output: Option<String>| {
            if minus == 0.0 {
                return x;
            }
            let m = e.floats(&[], &[minus]);
            e.emit("Sub", vec![x, m], Vec::new(), output)
        };
        if pool.members.len() == 1 && pad == 0 {
            let member = &pool.members[0];
            if member.minus == 0.0 {
                self.digits(packed, digit, Some(member.value.clone()));
            } else {
                let d = self.digits(packed, digit, None);
                subtract(self, d, member.minus, Some(member.value.clone()));
            }
            return;
        }
        let mut flat = self.digits(packed, digit, None);
        if shared {
            flat = subtract(self, flat, first, None);
        }
        // Each member's part: its value itself, or a fresh name its own Sub reads.
        let parts: Vec<String> = pool
            .members
            .iter()
            .map(|m| {
                if shared || m.minus == 0.0 {
                    m.value.clone()
                } else {
                    self.names.fresh()
                }
            })
            .collect();
        let mut outputs = parts.clone();
        let mut sizes: Vec<i64> = pool.members.iter().map(|m| m.count as i64).collect();
        if pad > 0 {
            outputs.push(self.names.fresh());
            sizes.push(pad as i64);
        }
        // Split's sizes are an attribute before opset 13 and an input from it; axis 0 is
        // the default.
        let mut input = vec![flat];
        let mut attribute = Vec::new();
        if self.opset >= 13 {
            input.push(self.int64s(&sizes));
        } else {
            attribute.push(attr_ints("split", sizes));
        }
        self.nodes.push(NodeProto {
            input,
            output: outputs,
            op_type: "Split".into(),
            attribute,
            ..Default::default()
        });
        if !shared {
            for (m, part) in pool.members.iter().zip(parts) {
                if part != m.value {
                    subtract(self, part, m.minus, Some(m.value.clone()));
                }
            }
        }
    }
}

impl Graph for Edit<'_> {
    fn opset(&self) -> i64 {
        self.opset
    }
    fn style(&self) -> DeployStyle {
        self.style
    }
    fn as_operator(&self) -> bool {
        self.as_operator
    }
    fn consumers(&self) -> Option<Consumers> {
        split_for(self.graph?, &self.weight, self.shape)
    }
    fn part(&mut self, elem: Elem, dims: &[usize], raw: Vec<u8>) -> String {
        self.init(data_type(elem), dims, raw)
    }
    /// An int64 vector (shapes, split sizes, slice bounds), stored as varints in
    /// `int64_data`: a small value takes one or two bytes there, against eight raw.
    fn int64s(&mut self, values: &[i64]) -> String {
        self.bytes += values
            .iter()
            .map(|&v| prost::encoding::encoded_len_varint(v as u64) as u64)
            .sum::<u64>();
        self.place(TensorProto {
            data_type: DataType::Int64 as i32,
            dims: vec![values.len() as i64],
            int64_data: values.to_vec(),
            ..Default::default()
        })
    }

    fn op(&mut self, op_type: &str, inputs: Vec<String>, attrs: Vec<Attr>, last: bool) -> String {
        let output = last.then(|| self.weight.clone());
        let attrs = attrs.into_iter().map(attribute).collect();
        self.emit(op_type, inputs, attrs, output)
    }
    /// `symbols` of `width` bits, less `minus`, as float32 values [count]. A width that
    /// divides 8 or 24 is stored as digits of that width (see [`word`]); 5 and 7 bits go
    /// through single bits, regrouped by a product with powers of two.
    ///
    /// The digits of an initializer weight join the [`Pools`]: every weight with the same
    /// digit width shares one `uint8` initializer and one unpacking subgraph, and a `Split`
    /// hands each its part, so a model with several small weights pays for the subgraph
    /// once. A weight that was a
    /// `Constant` node unpacks its own, in its own graph.
    fn unpack(&mut self, symbols: &[u32], width: u8, minus: f32) -> String {
        let digit = if 8 % width == 0 || 24 % width == 0 {
            width
        } else {
            1
        };
        let whole = digit == width;
        let digits: Vec<u32> = if whole {
            symbols.to_vec()
        } else {
            symbols
                .iter()
                .flat_map(|&s| (0..width).map(move |j| (s >> j) & 1))
                .collect()
        };
        let value = self.names.fresh();
        let pool = Pool {
            members: vec![Member {
                value: value.clone(),
                count: digits.len(),
                minus: if whole { minus } else { 0.0 },
            }],
            digits,
        };
        if self.as_constants {
            self.pool(digit, pool);
        } else {
            self.bytes += pack::packed_len(pool.digits.len(), digit) as u64;
            self.pools.join(digit, pool);
        }
        if whole {
            return value;
        }
        let bits = self.reshape(value, &[symbols.len(), usize::from(width)], false);
        let powers: Vec<f32> = (0..width).map(|j| (1u32 << j) as f32).collect();
        let powers = self.floats(&[usize::from(width)], &powers);
        let x = self.binary("MatMul", bits, powers, false);
        if minus == 0.0 {
            return x;
        }
        let minus = self.floats(&[], &[minus]);
        self.binary("Sub", x, minus, false)
    }

    fn rewrite(&mut self, rewrite: Rewrite) {
        self.rewrite = Some(rewrite);
    }
}

fn data_type(e: Elem) -> DataType {
    match e {
        Elem::F32 => DataType::Float,
        Elem::F16 => DataType::Float16,
        Elem::Bf16 => DataType::Bfloat16,
        Elem::I8 => DataType::Int8,
        Elem::U8 => DataType::Uint8,
        Elem::I64 => DataType::Int64,
    }
}

fn attribute(a: Attr) -> AttributeProto {
    match a {
        Attr::Int(name, i) => attr_int(name, i),
        Attr::Ints(name, ints) => attr_ints(name, ints),
    }
}

/// How digits of `digit` bits sit in the packed bytes: (bytes per word, digits per word). A
/// width that divides 8 takes whole digits from each byte; 3 and 6 bits take 8 and 4 digits
/// from each three bytes (24 bits, still exact in float32).
fn word(digit: u8) -> (usize, usize) {
    if 8 % digit == 0 {
        (1, usize::from(8 / digit))
    } else {
        (3, usize::from(24 / digit))
    }
}

/// Digits of one width, every member's in order.
struct Pool {
    digits: Vec<u32>,
    members: Vec<Member>,
}

/// A weight's part of a pool: the value its digits are written to, how many, and what is
/// subtracted from each (whole-symbol digits: the symbols' offset).
struct Member {
    value: String,
    count: usize,
    minus: f32,
}

/// The pools of a model's initializer weights, by digit width (see [`Edit::unpack`]),
/// written by [`Pools::write`] once every weight has joined.
#[derive(Default)]
struct Pools {
    by_digit: std::collections::BTreeMap<u8, Pool>,
}

impl Pools {
    fn join(&mut self, digit: u8, pool: Pool) {
        match self.by_digit.entry(digit) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(pool);
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                let p = o.get_mut();
                p.digits.extend(pool.digits);
                p.members.extend(pool.members);
            }
        }
    }

    /// Each pool's initializer and the nodes that unpack it.
    fn write(self, names: &mut Names, opset: i64) -> (Vec<TensorProto>, Vec<NodeProto>) {
        let mut none = Pools::default();
        let mut e = Edit {
            names,
            pools: &mut none,
            opset,
            style: DeployStyle::Folded,
            weight: String::new(),
            as_constants: false,
            as_operator: false,
            graph: None,
            shape: &[],
            rewrite: None,
            inits: Vec::new(),
            nodes: Vec::new(),
            bytes: 0,
        };
        for (digit, pool) in self.by_digit {
            e.pool(digit, pool);
        }
        (e.inits, e.nodes)
    }
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

/// The split that fits every consumer of `name` in the main graph, if one does and no
/// subgraph reads it.
fn split_for(graph: &GraphProto, name: &str, shape: &[usize]) -> Option<Consumers> {
    fn used_in_subgraph(g: &GraphProto, name: &str) -> bool {
        g.node.iter().any(|n| {
            n.attribute.iter().any(|a| {
                a.g.iter().chain(&a.graphs).any(|sub| {
                    sub.node.iter().any(|m| m.input.iter().any(|i| i == name))
                        || used_in_subgraph(sub, name)
                })
            })
        })
    }
    if used_in_subgraph(graph, name) || graph.output.iter().any(|o| o.name == name) {
        return None;
    }
    let mut kinds = graph
        .node
        .iter()
        .flat_map(|n| {
            n.input
                .iter()
                .enumerate()
                .filter(|(_, i)| *i == name)
                .map(move |(k, _)| (n, k))
        })
        .map(|(n, k)| match (n.op_type.as_str(), k) {
            ("MatMul", 1) if shape.len() == 2 => Some(Consumers::MatMul),
            ("Conv", 1) if shape.len() >= 3 && attr(n, "group").is_none_or(|g| g.i == 1) => {
                Some(Consumers::Conv)
            }
            _ => None,
        });
    let first = kinds.next()??;
    kinds.all(|k| k == Some(first)).then_some(first)
}

/// Rewrites each consumer of `weight` as the form asked (see [`Rewrite`]); the consumer
/// kinds [`split_for`] allows all take the weight as their second input.
fn apply_rewrite(graph: &mut GraphProto, names: &mut Names, weight: &str, rewrite: &Rewrite) {
    let mut out = Vec::with_capacity(graph.node.len() + 4);
    for mut n in std::mem::take(&mut graph.node) {
        if n.input.get(1).is_none_or(|i| i != weight) {
            out.push(n);
            continue;
        }
        let x = n.input[0].clone();
        match rewrite {
            Rewrite::Kernel {
                domain,
                op_type,
                inputs,
                attrs,
            } => {
                n.input = std::iter::once(x).chain(inputs.iter().cloned()).collect();
                n.op_type = (*op_type).into();
                n.domain = (*domain).into();
                n.attribute = attrs.iter().cloned().map(attribute).collect();
                out.push(n);
            }
            Rewrite::MatMulFactors { a, b } => {
                // X·A first, then the consumer multiplies by B.
                let inner = names.fresh();
                out.push(NodeProto {
                    input: vec![x, a.clone()],
                    output: vec![inner.clone()],
                    op_type: "MatMul".into(),
                    ..Default::default()
                });
                n.input = vec![inner, b.clone()];
                out.push(n);
            }
            Rewrite::ConvFactors {
                first,
                spatial,
                pointwise,
            } => {
                let x = match first {
                    Some(first) => {
                        let reduced = names.fresh();
                        out.push(NodeProto {
                            input: vec![x, first.clone()],
                            output: vec![reduced.clone()],
                            op_type: "Conv".into(),
                            ..Default::default()
                        });
                        reduced
                    }
                    None => x,
                };
                out.extend(conv_then_pointwise(n, names, x, spatial, pointwise));
            }
        }
    }
    graph.node = out;
}

/// The consumer Conv `n` as two: a copy that keeps its window, pads, strides and dilations,
/// reading `x` with the `spatial` filters, then `n` itself as a 1×1 convolution by
/// `pointwise` with its bias.
fn conv_then_pointwise(
    mut n: NodeProto,
    names: &mut Names,
    x: String,
    spatial: &str,
    pointwise: &str,
) -> [NodeProto; 2] {
    let inner = names.fresh();
    let mut first = n.clone();
    first.name = String::new();
    first.input = vec![x, spatial.into()];
    first.output = vec![inner.clone()];
    first.attribute.retain(|a| a.name != "kernel_shape");
    let mut inputs = vec![inner, pointwise.into()];
    inputs.extend(n.input.get(2).cloned());
    n.input = inputs;
    n.attribute.clear();
    [first, n]
}

/// Why a tensor keeps its dense weights in the deployable file, if it must: the writer's
/// reasons first, then the form's own.
fn refusal(t: &Tensor, enc: &Encoding, opset: i64) -> Option<String> {
    if t.dtype != DType::F32 {
        return Some(format!(
            "only float32 weights are rewritten; this one is {}",
            t.dtype.name()
        ));
    }
    if opset < MIN_OPSET {
        return Some(format!(
            "the model's opset {opset} is below {MIN_OPSET}, the first with the ops the compact form needs"
        ));
    }
    enc.form().deploy_refusal(&t.shape, opset)
}

/// Writes `model.onnx`: `restored` for every tensor without an encoding, the compact form
/// for every encoded one. `encodings` is parallel to `restored`.
pub fn write(
    c: &OnnxContainer,
    restored: &[Tensor],
    encodings: &[Option<Encoding>],
    style: DeployStyle,
    statics: &Statics,
) -> Result<Deployed, FormatError> {
    let original_opset = default_opset(&c.model);
    let mut written = StaticsWritten::default();
    // Static int8 needs per-axis (De)QuantizeLinear: the model is raised to opset 13 when
    // its ops allow it.
    let statics_ok = !statics.values.is_empty()
        && match super::opset::can_raise(&c.model, original_opset, STATIC_OPSET) {
            Ok(()) => true,
            Err(why) => {
                written.refused = Some(format!(
                    "per-channel QuantizeLinear/DequantizeLinear need opset {STATIC_OPSET}, and the model (opset {original_opset}) cannot be raised to it: {why}"
                ));
                false
            }
        };
    let opset = if statics_ok {
        original_opset.max(STATIC_OPSET)
    } else {
        original_opset
    };
    let mut names = Names::of(&c.model);
    let mut pools = Pools::default();
    let mut leave_out = vec![false; restored.len()];
    let mut forms = Vec::new();
    let mut inits = Vec::new();
    let mut nodes = Vec::new();
    let n_inits = restored.len() - c.constants.len();
    // Constant nodes replaced by their compact parts and decode nodes, in the same graph.
    let mut spliced: Vec<(&onnx_format::ConstantSlot, Vec<NodeProto>)> = Vec::new();
    let mut rewrites: Vec<(String, Rewrite)> = Vec::new();
    for (i, (t, enc)) in restored.iter().zip(encodings).enumerate() {
        let Some(enc) = enc else { continue };
        if let Some(why) = refusal(t, enc, opset) {
            forms.push(TensorForm {
                name: t.name.clone(),
                form: "dense".into(),
                bytes: t.data.len() as u64,
                note: Some(why),
            });
            continue;
        }
        let slot = i.checked_sub(n_inits).and_then(|k| c.constants.get(k));
        let mut e = Edit {
            names: &mut names,
            pools: &mut pools,
            opset,
            style,
            weight: slot.map_or_else(|| t.name.clone(), |s| s.output.clone()),
            as_constants: slot.is_some(),
            as_operator: statics_ok && statics.weights.contains(&i),
            graph: if slot.is_some() {
                None
            } else {
                c.model.graph.as_ref()
            },
            shape: &t.shape,
            rewrite: None,
            inits: Vec::new(),
            nodes: Vec::new(),
            bytes: 0,
        };
        let form = enc.form().lower(&mut e, &t.shape);
        if let Some(r) = e.rewrite.take() {
            rewrites.push((t.name.clone(), r));
        }
        leave_out[i] = true;
        forms.push(TensorForm {
            name: t.name.clone(),
            form,
            bytes: e.bytes,
            note: None,
        });
        inits.extend(e.inits);
        match slot {
            Some(slot) => spliced.push((slot, e.nodes)),
            None => nodes.extend(e.nodes),
        }
    }
    // The shared unpacking subgraphs come first: the weights' slices read them.
    let (pool_inits, mut pool_nodes) = pools.write(&mut names, opset);
    inits.extend(pool_inits);
    pool_nodes.append(&mut nodes);
    let mut nodes = pool_nodes;
    let mut model = onnx_format::fill(c, restored, &leave_out)?;
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| FormatError::Write("model has no graph".into()))?;
    // A replaced weight is now a node output, so it can no longer be a graph input too
    // (before IR 4 every initializer is one; from IR 4 an initializer listed as an input is
    // a default the caller may override, which a compressed weight no longer offers).
    let replaced: HashSet<&str> = restored[..n_inits]
        .iter()
        .zip(&leave_out)
        .filter(|(_, &out)| out)
        .map(|(t, _)| t.name.as_str())
        .collect();
    graph.input.retain(|v| !replaced.contains(v.name.as_str()));
    graph.initializer.extend(inits);
    // A Constant's replacement goes where it stood. Last slot first: splicing never moves a
    // node that a later-processed slot's path goes through.
    spliced.sort_by(|a, b| (&b.0.hops, b.0.node).cmp(&(&a.0.hops, a.0.node)));
    for (slot, new_nodes) in spliced {
        let sub = onnx_format::graph_at_mut(graph, &slot.hops)
            .filter(|g| slot.node < g.node.len())
            .ok_or_else(|| FormatError::Write(format!("Constant {:?} not found", slot.output)))?;
        sub.node.splice(slot.node..=slot.node, new_nodes);
    }
    for (weight, rewrite) in &rewrites {
        apply_rewrite(graph, &mut names, weight, rewrite);
    }
    for (_, r) in &rewrites {
        if let Rewrite::Kernel { domain, .. } = r {
            if !model.opset_import.iter().any(|o| o.domain == *domain) {
                model.opset_import.push(tract_onnx::pb::OperatorSetIdProto {
                    domain: (*domain).into(),
                    version: 1,
                });
            }
        }
    }
    // The new nodes read only initializers: placed first, the graph stays topologically sorted.
    nodes.append(&mut graph.node);
    graph.node = nodes;
    if statics_ok {
        written.activations = quantize_activations(graph, &mut names, &statics.values);
        super::opset::raise(&mut model, opset);
    }
    // Short names for the model's own intermediate values; the weights keep theirs (the
    // report names them), and a model below IR 4 no longer lists them as inputs.
    let keep: HashSet<String> = restored
        .iter()
        .zip(&leave_out)
        .filter(|(t, &out)| out || t.dtype.is_float())
        .map(|(t, _)| t.name.clone())
        .collect();
    super::compact::compact(&mut model, &mut names, &keep);
    Ok(Deployed {
        bytes: model.encode_to_vec(),
        tensors: forms,
        opset,
        statics: written,
    })
}

/// `QuantizeLinear → DequantizeLinear` (uint8, per tensor) right after each value's
/// producer; every reader in the main graph then reads the dequantized value, so a runtime
/// sees each weighted op between quantized activations. A graph output keeps its float
/// value (its readers inside the graph read the quantized one). Returns how many values
/// were quantized.
fn quantize_activations(
    graph: &mut GraphProto,
    names: &mut Names,
    values: &[(String, f32, u8)],
) -> usize {
    let mut done = 0;
    for (value, scale, zero) in values {
        let producer = graph
            .node
            .iter()
            .position(|n| n.output.iter().any(|o| o == value));
        let is_input = graph.input.iter().any(|i| &i.name == value);
        if producer.is_none() && !is_input {
            continue;
        }
        let s = names.fresh();
        let z = names.fresh();
        graph.initializer.push(TensorProto {
            name: s.clone(),
            data_type: DataType::Float as i32,
            raw_data: scale.to_le_bytes().to_vec(),
            ..Default::default()
        });
        graph.initializer.push(TensorProto {
            name: z.clone(),
            data_type: DataType::Uint8 as i32,
            raw_data: vec![*zero],
            ..Default::default()
        });
        let q = names.fresh();
        let dq = names.fresh();
        for n in &mut graph.node {
            for i in n.input.iter_mut().filter(|i| *i == value) {
                i.clone_from(&dq);
            }
        }
        let pair = [
            NodeProto {
                input: vec![value.clone(), s.clone(), z.clone()],
                output: vec![q.clone()],
                op_type: "QuantizeLinear".into(),
                ..Default::default()
            },
            NodeProto {
                input: vec![q, s, z],
                output: vec![dq],
                op_type: "DequantizeLinear".into(),
                ..Default::default()
            },
        ];
        let at = producer.map_or(0, |p| p + 1);
        graph.node.splice(at..at, pair);
        done += 1;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A graph `y = x · W` (W [4, 3]) and one with W read by a Conv too.
    fn graph(extra_conv: bool) -> ModelProto {
        let mut node = vec![NodeProto {
            input: vec!["x".into(), "W".into()],
            output: vec!["y".into()],
            op_type: "MatMul".into(),
            ..Default::default()
        }];
        if extra_conv {
            node.push(NodeProto {
                input: vec!["x".into(), "W".into()],
                output: vec!["z".into()],
                op_type: "Conv".into(),
                ..Default::default()
            });
        }
        ModelProto {
            graph: Some(GraphProto {
                node,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn edit<'a>(
        names: &'a mut Names,
        pools: &'a mut Pools,
        g: Option<&'a GraphProto>,
        shape: &'a [usize],
    ) -> Edit<'a> {
        Edit {
            names,
            pools,
            opset: 13,
            style: DeployStyle::Auto,
            weight: "W".into(),
            as_constants: false,
            as_operator: false,
            graph: g,
            shape,
            rewrite: None,
            inits: Vec::new(),
            nodes: Vec::new(),
            bytes: 0,
        }
    }

    #[test]
    fn consumers_are_one_kind_or_none() {
        let (one, two) = (graph(false), graph(true));
        let (mut names, mut pools) = (Names::of(&one), Pools::default());
        let e = edit(&mut names, &mut pools, one.graph.as_ref(), &[4, 3]);
        assert_eq!(e.consumers(), Some(Consumers::MatMul));
        let e = edit(&mut names, &mut pools, two.graph.as_ref(), &[4, 3]);
        assert_eq!(e.consumers(), None, "a MatMul and a Conv read it");
        // A Constant's value (no graph given) never has its consumers rewritten.
        let e = edit(&mut names, &mut pools, None, &[4, 3]);
        assert_eq!(e.consumers(), None);
    }

    #[test]
    fn parts_count_their_bytes_and_the_last_node_writes_the_weight() {
        let m = graph(false);
        let (mut names, mut pools) = (Names::of(&m), Pools::default());
        let mut e = edit(&mut names, &mut pools, m.graph.as_ref(), &[4, 3]);
        let codes = e.part(Elem::I8, &[4, 3], vec![1; 12]);
        let x = e.cast(codes.clone(), Elem::F32, false);
        let s = e.floats(&[], &[0.5]);
        let w = e.binary("Mul", x, s, true);
        assert_eq!(w, "W");
        assert_eq!(e.bytes, 12 + 4);
        assert_eq!(e.inits.len(), 2);
        assert_eq!(e.inits[0].name, codes);
        assert_eq!(e.inits[0].data_type, DataType::Int8 as i32);
        let cast = &e.nodes[0];
        assert_eq!(cast.attribute[0].i, DataType::Float as i64);
        assert_eq!(e.nodes.last().unwrap().output, vec!["W".to_string()]);
    }

    #[test]
    fn rewrites_replace_every_consumer() {
        let mut m = graph(false);
        let mut names = Names::of(&m);
        let g = m.graph.as_mut().unwrap();
        let kernel = Rewrite::Kernel {
            domain: "com.microsoft",
            op_type: "MatMulNBits",
            inputs: vec!["b".into(), "s".into()],
            attrs: vec![Attr::Int("bits", 4)],
        };
        apply_rewrite(g, &mut names, "W", &kernel);
        assert_eq!(g.node[0].op_type, "MatMulNBits");
        assert_eq!(g.node[0].domain, "com.microsoft");
        assert_eq!(g.node[0].input, ["x", "b", "s"]);
        assert_eq!(g.node[0].output, ["y"]);

        let mut m = graph(false);
        let g = m.graph.as_mut().unwrap();
        let factors = Rewrite::MatMulFactors {
            a: "a".into(),
            b: "b".into(),
        };
        apply_rewrite(g, &mut names, "W", &factors);
        assert_eq!(g.node.len(), 2);
        assert_eq!(g.node[0].input[..], ["x".to_string(), "a".to_string()]);
        assert_eq!(
            g.node[1].input[..],
            [g.node[0].output[0].clone(), "b".to_string()]
        );
        assert_eq!(g.node[1].output, ["y"]);
    }
}
