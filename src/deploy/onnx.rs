//! `model.onnx` at its compressed size: each encoded weight's initializer is replaced by its
//! compact parts (integer codes, scales, codebooks, factors) and a small subgraph of standard
//! ONNX ops that rebuilds the dense weight under the same name, so every consumer (Conv,
//! MatMul, Gather, LSTM, a node inside an `If` branch) reads it unchanged. The subgraph only
//! depends on initializers, so runtimes fold it once at load time (onnxruntime does).
//!
//! Forms, by encoding:
//! - int8: `Cast`+`Mul`, or `DequantizeLinear` when asked for operators (per tensor from
//!   opset 10, per axis from 13);
//! - group-wise int4 MatMul weights: `com.microsoft.MatMulNBits` unless asked for folded forms;
//! - int1..int7 and k-means indices: the packed bytes of `compress::pack` unpacked with
//!   `Div`/`Floor`/`Sub` (and a `MatMul` by powers of two when a symbol spans bytes), then
//!   `Sub`/`Mul` by offsets and scales, or `Gather` from the codebook;
//! - float16/bfloat16: `Cast`;
//! - low-rank, separable and Tucker-2 factors: `MatMul` of the factors and `Reshape`;
//! - static int8 ([`Statics`]): `DequantizeLinear` weights, and a `QuantizeLinear` →
//!   `DequantizeLinear` pair (uint8, ranges from calibration) after each activation the
//!   weights' consumers read, the model raised to opset 13 where its ops allow; onnxruntime
//!   fuses the pattern into QLinearConv / MatMulIntegerToFloat.
//!
//! Every op used exists from opset 7 with numpy broadcasting; a model below that keeps dense
//! weights, and the report says so.

use super::compact::Names;
use super::TensorForm;
use crate::compress::{
    cast::CastType, cast::Halves, kmeans::Clustered, lowrank::Factors, pack, quantize::GroupLayout,
    quantize::Quantized, separable::Separable, separable::Tucker2, DeployStyle, Encoding,
};
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

    fn floats(&mut self, dims: &[usize], values: &[f32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init(DataType::Float, dims, raw)
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

    /// Adds a node; its output is a fresh name, or the weight's own name when `last`.
    fn op(
        &mut self,
        op_type: &str,
        inputs: Vec<String>,
        attribute: Vec<AttributeProto>,
        last: bool,
    ) -> String {
        let output = last.then(|| self.weight.clone());
        self.emit(op_type, inputs, attribute, output)
    }

    fn cast(&mut self, x: String, to: DataType, last: bool) -> String {
        self.op("Cast", vec![x], vec![attr_int("to", to as i64)], last)
    }

    fn binary(&mut self, op: &str, a: String, b: String, last: bool) -> String {
        self.op(op, vec![a, b], Vec::new(), last)
    }

    fn reshape(&mut self, x: String, dims: &[usize], last: bool) -> String {
        let shape = self.int64s(&dims_i64(dims));
        self.op("Reshape", vec![x, shape], Vec::new(), last)
    }

    /// Elements `start..end` along `axis` (Slice takes attributes before opset 10).
    fn slice(&mut self, x: String, axis: usize, start: usize, end: usize) -> String {
        let axis = axis as i64;
        let (start, end) = (start as i64, end as i64);
        if self.opset >= 10 {
            let starts = self.int64s(&[start]);
            let ends = self.int64s(&[end]);
            let axes = self.int64s(&[axis]);
            self.op("Slice", vec![x, starts, ends, axes], Vec::new(), false)
        } else {
            self.op(
                "Slice",
                vec![x],
                vec![
                    attr_ints("starts", vec![start]),
                    attr_ints("ends", vec![end]),
                    attr_ints("axes", vec![axis]),
                ],
                false,
            )
        }
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
        let mut x = self.cast(bytes, DataType::Float, false);
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

/// Dims that broadcast a per-channel vector along `axis` of a tensor of `shape`.
fn channel_dims(shape: &[usize], axis: Option<usize>) -> Vec<usize> {
    match axis {
        Some(a) if a < shape.len() => {
            let mut d = vec![shape[a]];
            d.extend(std::iter::repeat_n(1, shape.len() - a - 1));
            d
        }
        _ => Vec::new(),
    }
}

fn quantized(e: &mut Edit, q: &Quantized, shape: &[usize]) -> String {
    if let Some(g) = q.group_size {
        return grouped(e, q, shape, g);
    }
    let dims = channel_dims(shape, q.axis);
    if q.bits == 8 {
        let codes = q.codes.iter().map(|&c| c as u8).collect();
        let codes = e.init(DataType::Int8, shape, codes);
        let per_axis = q.axis.is_some() && q.scales.len() > 1;
        if (e.style == DeployStyle::Operators || e.as_operator)
            && (e.opset >= 13 || (!per_axis && e.opset >= 10))
        {
            let vec_dims: Vec<usize> = if per_axis {
                vec![q.scales.len()]
            } else {
                Vec::new()
            };
            let mut inputs = vec![codes, e.floats(&vec_dims, &q.scales)];
            if !q.zero_points.is_empty() {
                let zp = q.zero_points.iter().map(|&z| z as u8).collect();
                inputs.push(e.init(DataType::Int8, &vec_dims, zp));
            }
            let attrs = match (per_axis, q.axis) {
                (true, Some(a)) => vec![attr_int("axis", a as i64)],
                _ => Vec::new(),
            };
            e.op("DequantizeLinear", inputs, attrs, true);
            return "DequantizeLinear".into();
        }
        let mut x = e.cast(codes, DataType::Float, false);
        if !q.zero_points.is_empty() {
            let zp: Vec<f32> = q.zero_points.iter().map(|&z| f32::from(z)).collect();
            let zp = e.floats(&dims, &zp);
            x = e.binary("Sub", x, zp, false);
        }
        let scale = e.floats(&dims, &q.scales);
        e.binary("Mul", x, scale, true);
        return "Cast+Mul".into();
    }
    // (s - offset - zero_point) · scale: small integers until the scale, so the result
    // equals dequantize() bit for bit. One bit is the sign: (s - ½) · 2.
    let (symbols, offset) = unsigned_symbols(&q.codes, q.bits);
    let mut x = e.unpack(&symbols, q.bits, offset);
    x = e.reshape(x, shape, false);
    if q.bits == 1 {
        let two = e.floats(&[], &[2.0]);
        x = e.binary("Mul", x, two, false);
    }
    if !q.zero_points.is_empty() {
        let zp: Vec<f32> = q.zero_points.iter().map(|&z| f32::from(z)).collect();
        let zp = e.floats(&dims, &zp);
        x = e.binary("Sub", x, zp, false);
    }
    let scale = e.floats(&dims, &q.scales);
    e.binary("Mul", x, scale, true);
    format!("unpack(int{})+Mul", q.bits)
}

/// Symbols as `model.<ext>` stores them: 1 bit is the sign, wider codes are offset by
/// 2^(bits-1) to be unsigned. Returns the symbols and the offset to subtract (½ for a sign
/// bit, which is then doubled).
fn unsigned_symbols(codes: &[i8], bits: u8) -> (Vec<u32>, f32) {
    if bits == 1 {
        (codes.iter().map(|&c| u32::from(c > 0)).collect(), 0.5)
    } else {
        let off = 1i32 << (bits - 1);
        (
            codes.iter().map(|&c| (i32::from(c) + off) as u32).collect(),
            off as f32,
        )
    }
}

/// Group-wise codes: the weight viewed as [channels, blocks, group] (channel axis first, or
/// no axis) or [blocks, group, channels] (channel axis last), padded to whole blocks, scaled
/// by [channels, blocks, 1] or [blocks, 1, channels], then cut back and reshaped.
fn grouped(e: &mut Edit, q: &Quantized, shape: &[usize], group_size: usize) -> String {
    let l = GroupLayout::new(shape, q.axis, group_size);
    let (ch, nb, g) = (l.channel.channels.max(1), l.blocks, l.group_size);
    let k = l.channel.outer * l.channel.inner;
    let kp = nb * g;
    let rows_first = l.channel.outer == 1;
    let mut codes = Vec::with_capacity(ch * kp);
    if rows_first {
        for row in q.codes.chunks(k.max(1)) {
            codes.extend_from_slice(row);
            codes.extend(std::iter::repeat_n(0i8, kp - k));
        }
    } else {
        codes.extend_from_slice(&q.codes);
        codes.extend(std::iter::repeat_n(0i8, (kp - k) * ch));
    }
    let (view, scale_dims, flat) = if rows_first {
        ([ch, nb, g], [ch, nb, 1], [ch, kp])
    } else {
        ([nb, g, ch], [nb, 1, ch], [kp, ch])
    };
    // Scales are stored channel-major (c·blocks + b); the second view wants block-major.
    let reorder = |v: &[f32]| -> Vec<f32> {
        if rows_first {
            v.to_vec()
        } else {
            (0..nb)
                .flat_map(|b| (0..ch).map(move |c| v[c * nb + b]))
                .collect()
        }
    };
    let zero_points: Vec<f32> = q.zero_points.iter().map(|&z| f32::from(z)).collect();
    let (mut x, form) = if q.bits == 8 {
        let raw = codes.iter().map(|&c| c as u8).collect();
        let init = e.init(DataType::Int8, &view, raw);
        (
            e.cast(init, DataType::Float, false),
            format!("Cast+Mul(group {g})"),
        )
    } else {
        let (symbols, offset) = unsigned_symbols(&codes, q.bits);
        let x = e.unpack(&symbols, q.bits, offset);
        let mut x = e.reshape(x, &view, false);
        if q.bits == 1 {
            let two = e.floats(&[], &[2.0]);
            x = e.binary("Mul", x, two, false);
        }
        (x, format!("unpack(int{})+Mul(group {g})", q.bits))
    };
    if !zero_points.is_empty() {
        let zp = e.floats(&scale_dims, &reorder(&zero_points));
        x = e.binary("Sub", x, zp, false);
    }
    let scale = e.floats(&scale_dims, &reorder(&q.scales));
    x = e.binary("Mul", x, scale, false);
    if kp > k {
        x = e.reshape(x, &flat, false);
        x = e.slice(x, usize::from(rows_first), 0, k);
    }
    e.reshape(x, shape, true);
    form
}

fn clustered(e: &mut Edit, c: &Clustered, shape: &[usize]) -> String {
    let width = pack::width_for(c.symbols());
    let symbols: Vec<u32> = c.indices.iter().map(|&i| u32::from(i)).collect();
    let mut x = e.unpack(&symbols, width, 0.0);
    x = e.reshape(x, shape, false);
    // Each group's book gains a zero at index k, the code of weights kept out of clustering.
    let k = c.k.max(1);
    let groups = c.centroids.len() / k;
    let mut book = Vec::with_capacity(groups * (k + 1));
    for g in c.centroids.chunks_exact(k) {
        book.extend_from_slice(g);
        book.push(0.0);
    }
    if groups > 1 {
        let offsets: Vec<f32> = (0..groups).map(|g| (g * (k + 1)) as f32).collect();
        let offsets = e.floats(&channel_dims(shape, c.axis), &offsets);
        x = e.binary("Add", x, offsets, false);
    }
    let idx = e.cast(x, DataType::Int64, false);
    let book = e.floats(&[book.len()], &book);
    e.op("Gather", vec![book, idx], vec![attr_int("axis", 0)], true);
    format!("unpack(uint{width})+Gather(codebook)")
}

fn factors(e: &mut Edit, f: &Factors, shape: &[usize]) -> String {
    let a = e.floats(&[f.rows, f.rank], &f.a);
    let b = e.floats(&[f.rank, f.cols], &f.b);
    let same = shape == [f.rows, f.cols];
    let w = e.binary("MatMul", a, b, same);
    if !same {
        e.reshape(w, shape, true);
    }
    "MatMul(factors)".into()
}

/// How every consumer of a low-rank weight can take the two factors in its own compute
/// path instead of the rebuilt matrix (fewer multiply-adds, not only fewer bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Split {
    /// X·W = (X·A)·B: W [in, out] = A [in, r] · B [r, out], the right operand of MatMul.
    MatMul,
    /// Conv(X, W) = Conv1×1(Conv(X, B as r filters), A): W [O, C, k…] = A [O, r] · B [r, C·k…].
    Conv,
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

/// The split that fits every consumer of `name` in the main graph, if one does and no
/// subgraph reads it.
fn split_for(graph: &GraphProto, name: &str, shape: &[usize]) -> Option<Split> {
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
            ("MatMul", 1) if shape.len() == 2 => Some(Split::MatMul),
            ("Conv", 1) if shape.len() >= 3 && attr(n, "group").is_none_or(|g| g.i == 1) => {
                Some(Split::Conv)
            }
            _ => None,
        });
    let first = kinds.next()??;
    kinds.all(|k| k == Some(first)).then_some(first)
}

/// onnxruntime's int4 MatMul (`com.microsoft.MatMulNBits`): B [N, blocks, block·bits/8]
/// packed, scales [N·blocks], optional packed zero points; symbols are unsigned with the
/// default zero point 2^(bits-1), as `compress::pack` stores symmetric codes.
struct NBits {
    b: String,
    scales: String,
    zero_points: Option<String>,
    k: usize,
    n: usize,
    bits: u8,
    block: usize,
}

/// Where every consumer of a group-wise int4 weight is a MatMul taking it as [K, N]: the
/// MatMulNBits form, which onnxruntime (and tract) run with integer weights.
fn nbits_fits(graph: &GraphProto, name: &str, q: &Quantized, shape: &[usize]) -> bool {
    let Some(g) = q.group_size else { return false };
    q.bits == 4
        && shape.len() == 2
        && q.axis == Some(1)
        && g >= 16
        && g.is_power_of_two()
        && split_for(graph, name, shape) == Some(Split::MatMul)
}

fn nbits(e: &mut Edit, q: &Quantized, shape: &[usize]) -> NBits {
    let (k, n) = (shape[0], shape[1]);
    let g = q.group_size.unwrap_or(k);
    let blocks = k.div_ceil(g);
    let off = 1i32 << (q.bits - 1);
    // Column-major blocks: B[n, blk, :] holds W[blk·g .. (blk+1)·g, n], padded with the zero
    // symbol past K.
    let mut symbols = Vec::with_capacity(n * blocks * g);
    for col in 0..n {
        for row in 0..blocks * g {
            let code = if row < k { q.codes[row * n + col] } else { 0 };
            let zp = if row < k {
                0
            } else {
                i32::from(
                    q.zero_points
                        .get(col * blocks + row / g)
                        .copied()
                        .unwrap_or(0),
                )
            };
            symbols.push((i32::from(code) + off + zp) as u32);
        }
    }
    let packed = pack::pack(&symbols, q.bits);
    let blob = g * usize::from(q.bits) / 8;
    let b = e.init(DataType::Uint8, &[n, blocks, blob], packed);
    let scales = e.floats(&[n * blocks], &q.scales);
    let zero_points = (!q.zero_points.is_empty()).then(|| {
        let per_col = (blocks * usize::from(q.bits)).div_ceil(8);
        let mut raw = Vec::with_capacity(n * per_col);
        for col in 0..n {
            let zs: Vec<u32> = (0..blocks)
                .map(|b| (i32::from(q.zero_points[col * blocks + b]) + off) as u32)
                .collect();
            let mut p = pack::pack(&zs, q.bits);
            p.resize(per_col, 0);
            raw.extend(p);
        }
        e.init(DataType::Uint8, &[n * per_col], raw)
    });
    NBits {
        b,
        scales,
        zero_points,
        k,
        n,
        bits: q.bits,
        block: g,
    }
}

/// A consumer rewrite: factors or integer weights in the compute path.
enum Rewrite {
    Factors {
        split: Split,
        a: String,
        b: String,
    },
    NBits(NBits),
    /// Conv(X, W) = Conv1×1(Conv(Conv1×1(X, first), core), last): C → R_in → R_out → O.
    Tucker {
        first: String,
        core: String,
        last: String,
    },
}

/// Rewrites each consumer of `weight` (see [`Split`], [`NBits`], [`Rewrite::Tucker`]); the
/// splits guarantee every consumer takes the weight as its second input.
fn apply_rewrite(graph: &mut GraphProto, names: &mut Names, weight: &str, rewrite: &Rewrite) {
    let mut out = Vec::with_capacity(graph.node.len() + 4);
    for mut n in std::mem::take(&mut graph.node) {
        if n.input.get(1).is_none_or(|i| i != weight) {
            out.push(n);
            continue;
        }
        let x = n.input[0].clone();
        match rewrite {
            Rewrite::NBits(nb) => {
                let mut inputs = vec![x, nb.b.clone(), nb.scales.clone()];
                inputs.extend(nb.zero_points.clone());
                n.input = inputs;
                n.op_type = "MatMulNBits".into();
                n.domain = "com.microsoft".into();
                n.attribute = vec![
                    attr_int("K", nb.k as i64),
                    attr_int("N", nb.n as i64),
                    attr_int("bits", i64::from(nb.bits)),
                    attr_int("block_size", nb.block as i64),
                ];
                out.push(n);
            }
            Rewrite::Factors {
                split: Split::MatMul,
                a,
                b,
            } => {
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
            Rewrite::Factors {
                split: Split::Conv,
                a,
                b,
            } => {
                // The original convolution with r filters (B), then a 1×1 one with A.
                out.extend(conv_then_pointwise(n, names, x, b, a));
            }
            Rewrite::Tucker { first, core, last } => {
                let reduced = names.fresh();
                out.push(NodeProto {
                    input: vec![x, first.clone()],
                    output: vec![reduced.clone()],
                    op_type: "Conv".into(),
                    ..Default::default()
                });
                out.extend(conv_then_pointwise(n, names, reduced, core, last));
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

fn separable(e: &mut Edit, s: &Separable, shape: &[usize]) -> String {
    let [o, c, kh, kw] = s.shape;
    let v = e.floats(&[o, c, kh, s.rank], &s.v);
    let h = e.floats(&[o, c, s.rank, kw], &s.h);
    let same = shape == s.shape;
    let w = e.binary("MatMul", v, h, same);
    if !same {
        e.reshape(w, shape, true);
    }
    "MatMul(separable)".into()
}

fn tucker(e: &mut Edit, k: &Tucker2, shape: &[usize]) -> String {
    let u_in = e.floats(&[k.in_channels, k.rank_in], &k.u_in);
    let core = e.floats(&[k.rank_out, k.rank_in, k.window], &k.core);
    let u_out = e.floats(&[k.out_channels, k.rank_out], &k.u_out);
    // [C, R_in] · [R_out, R_in, window] broadcasts to [R_out, C, window].
    let t = e.binary("MatMul", u_in, core, false);
    let t = e.reshape(t, &[k.rank_out, k.in_channels * k.window], false);
    let w = e.binary("MatMul", u_out, t, false);
    e.reshape(w, shape, true);
    "MatMul(tucker2)".into()
}

fn cast(e: &mut Edit, dtype: CastType, bits: &[u16], shape: &[usize]) -> String {
    let raw = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let dt = match dtype {
        CastType::Float16 => DataType::Float16,
        CastType::Bfloat16 => DataType::Bfloat16,
    };
    let x = e.init(dt, shape, raw);
    e.cast(x, DataType::Float, true);
    "Cast".into()
}

/// Why a tensor keeps its dense weights in the deployable file, if it must.
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
    if let Encoding::Cast(Halves {
        dtype: CastType::Bfloat16,
        ..
    }) = enc
    {
        if opset < 13 {
            return Some(format!(
                "Cast from bfloat16 needs opset 13; the model has {opset}"
            ));
        }
    }
    if let Encoding::Quantized(Quantized {
        group_size: Some(g),
        axis,
        ..
    }) = enc
    {
        let l = GroupLayout::new(&t.shape, *axis, *g);
        if l.channel.outer > 1 && l.channel.inner > 1 {
            return Some(
                "group-wise codes are rewritten when the channel axis is the first or the last"
                    .into(),
            );
        }
    }
    if let Encoding::Separable(s) = enc {
        if s.shape.iter().product::<usize>() != t.len() {
            return Some("separable factors do not cover the kernel".into());
        }
    }
    None
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
            inits: Vec::new(),
            nodes: Vec::new(),
            bytes: 0,
        };
        let form = lower(&mut e, c, t, enc, slot.is_some(), &mut rewrites);
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
    let contrib = rewrites.iter().any(|(_, r)| matches!(r, Rewrite::NBits(_)));
    if contrib
        && !model
            .opset_import
            .iter()
            .any(|o| o.domain == "com.microsoft")
    {
        model.opset_import.push(tract_onnx::pb::OperatorSetIdProto {
            domain: "com.microsoft".into(),
            version: 1,
        });
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

/// Lowers one compact weight into the graph: its parts and the nodes that rebuild it (or, in
/// the compute path, a rewrite of its consumer); returns the form's name for the report.
/// `in_constant`: the weight is a `Constant` node's value, not an initializer.
fn lower(
    e: &mut Edit,
    c: &OnnxContainer,
    t: &Tensor,
    enc: &Encoding,
    in_constant: bool,
    rewrites: &mut Vec<(String, Rewrite)>,
) -> String {
    match enc {
        Encoding::Quantized(q)
            if !in_constant
                && e.style != DeployStyle::Folded
                && c.model
                    .graph
                    .as_ref()
                    .is_some_and(|g| nbits_fits(g, &t.name, q, &t.shape)) =>
        {
            let nb = nbits(e, q, &t.shape);
            let form = format!(
                "com.microsoft.MatMulNBits (int{}, block {})",
                nb.bits, nb.block
            );
            rewrites.push((t.name.clone(), Rewrite::NBits(nb)));
            form
        }
        Encoding::Quantized(q) => quantized(e, q, &t.shape),
        Encoding::Cast(h) => cast(e, h.dtype, &h.bits, &t.shape),
        Encoding::Clustered(k) => clustered(e, k, &t.shape),
        Encoding::LowRank(f) => {
            let split = match (in_constant, c.model.graph.as_ref()) {
                // The factors' rows are the weight's first axis: MatMul's inputs, Conv's
                // output channels.
                (false, Some(g)) if t.shape.first() == Some(&f.rows) => {
                    split_for(g, &t.name, &t.shape)
                }
                _ => None,
            };
            match split {
                Some(split) => {
                    // A [O, r, 1…] and B [r, C, k…] for a Conv; A, B as they are for MatMul.
                    let (a_dims, b_dims) = match split {
                        Split::MatMul => (vec![f.rows, f.rank], vec![f.rank, f.cols]),
                        Split::Conv => {
                            let mut a = vec![f.rows, f.rank];
                            a.extend(std::iter::repeat_n(1, t.shape.len() - 2));
                            let mut b = vec![f.rank];
                            b.extend_from_slice(&t.shape[1..]);
                            (a, b)
                        }
                    };
                    let a = e.floats(&a_dims, &f.a);
                    let b = e.floats(&b_dims, &f.b);
                    rewrites.push((t.name.clone(), Rewrite::Factors { split, a, b }));
                    match split {
                        Split::MatMul => "MatMul·MatMul (factors in the compute path)".into(),
                        Split::Conv => "Conv·Conv1x1 (factors in the compute path)".into(),
                    }
                }
                None => factors(e, f, &t.shape),
            }
        }
        Encoding::Separable(s) => separable(e, s, &t.shape),
        Encoding::Tucker(k)
            if !in_constant
                && t.shape.len() >= 3
                && t.shape[..2] == [k.out_channels, k.in_channels]
                && c.model
                    .graph
                    .as_ref()
                    .is_some_and(|g| split_for(g, &t.name, &t.shape) == Some(Split::Conv)) =>
        {
            let ones = t.shape.len() - 2;
            let mut first_dims = vec![k.rank_in, k.in_channels];
            first_dims.extend(std::iter::repeat_n(1, ones));
            // u_in is [C, R_in]; the first convolution's filters are its columns.
            let mut first = Vec::with_capacity(k.u_in.len());
            for b in 0..k.rank_in {
                for ci in 0..k.in_channels {
                    first.push(k.u_in[ci * k.rank_in + b]);
                }
            }
            let first = e.floats(&first_dims, &first);
            let mut core_dims = vec![k.rank_out, k.rank_in];
            core_dims.extend_from_slice(&t.shape[2..]);
            let core = e.floats(&core_dims, &k.core);
            let mut last_dims = vec![k.out_channels, k.rank_out];
            last_dims.extend(std::iter::repeat_n(1, ones));
            let last = e.floats(&last_dims, &k.u_out);
            rewrites.push((t.name.clone(), Rewrite::Tucker { first, core, last }));
            "Conv1x1·Conv·Conv1x1 (Tucker-2 in the compute path)".into()
        }
        Encoding::Tucker(k) => tucker(e, k, &t.shape),
    }
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
