//! How a form goes into `model.onnx`: the small graph-building interface a form lowers
//! itself through ([`Form::lower`](super::form::Form::lower)), implemented by `deploy::onnx`
//! over the ONNX protobuf. A form adds compact parts (initializers, or `Constant` nodes where
//! the weight was one) and the nodes that rebuild the dense weight under its own name, so
//! every consumer reads it unchanged; or, where every consumer allows it, asks for a
//! [`Rewrite`] that puts its parts in the consumers' compute path.
//!
//! The interface speaks of values by name and of element types by [`Elem`], so the forms
//! need nothing of the protobuf; the surgery (fresh names, pools of packed digits shared
//! between weights, splicing a `Constant`'s replacement where it stood, rewriting consumers)
//! is `deploy`'s.

use super::DeployStyle;

/// The element type of a compact part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    F16,
    Bf16,
    I8,
    U8,
    I64,
}

/// A node attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Int(&'static str, i64),
    Ints(&'static str, Vec<i64>),
}

/// How every consumer of a weight reads it, where one kind fits them all and the weight is
/// neither a graph output nor read inside a subgraph (nor a `Constant` node's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumers {
    /// The right operand of `MatMul`, a 2-D weight.
    MatMul,
    /// The kernel of an ungrouped `Conv`.
    Conv,
}

/// What each consumer `op(X, W, …)` of the weight becomes (see [`Graph::rewrite`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Rewrite {
    /// `op_type` in `domain` reading `X` and `inputs`, with `attrs`: an integer kernel that
    /// takes the packed weight itself (onnxruntime's `com.microsoft.MatMulNBits`).
    Kernel {
        domain: &'static str,
        op_type: &'static str,
        inputs: Vec<String>,
        attrs: Vec<Attr>,
    },
    /// `X·W = (X·a)·b`, W = a·b.
    MatMulFactors { a: String, b: String },
    /// `Conv(X, W) = Conv1×1(Conv(X', spatial), pointwise)` with the consumer's window, pads,
    /// strides and bias; `X' = Conv1×1(X, first)` when `first` is given, else `X`.
    ConvFactors {
        first: Option<String>,
        spatial: String,
        pointwise: String,
    },
}

/// The deploy writer as a form sees it while lowering one weight.
pub trait Graph {
    /// The default-domain opset of the model being written.
    fn opset(&self) -> i64;
    fn style(&self) -> DeployStyle;
    /// Static int8: the weight must be a `DequantizeLinear` (runtimes fuse it with its
    /// consumer and the activations' quantization into an integer kernel).
    fn as_operator(&self) -> bool;
    /// How the weight's consumers read it, where one [`Consumers`] kind fits them all.
    fn consumers(&self) -> Option<Consumers>;
    /// A compact part holding `raw` (little-endian elements); returns its name.
    fn part(&mut self, elem: Elem, dims: &[usize], raw: Vec<u8>) -> String;
    /// An int64 vector (shapes, sizes, bounds), stored compactly.
    fn int64s(&mut self, values: &[i64]) -> String;
    /// Adds a node; its output is a fresh name, or the weight's own name when `last`.
    fn op(&mut self, op_type: &str, inputs: Vec<String>, attrs: Vec<Attr>, last: bool) -> String;
    /// `symbols` of `width` bits (1..=8), less `minus`, as float32 values [count], packed
    /// and unpacked by standard ops (digits of one width are shared between the weights).
    fn unpack(&mut self, symbols: &[u32], width: u8, minus: f32) -> String;
    /// Rewrites every consumer instead of rebuilding the weight; only when
    /// [`Graph::consumers`] allowed the rewrite's kind.
    fn rewrite(&mut self, rewrite: Rewrite);

    fn floats(&mut self, dims: &[usize], values: &[f32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.part(Elem::F32, dims, raw)
    }
    fn cast(&mut self, x: String, to: Elem, last: bool) -> String {
        self.op("Cast", vec![x], vec![Attr::Int("to", onnx_type(to))], last)
    }
    fn binary(&mut self, op: &str, a: String, b: String, last: bool) -> String {
        self.op(op, vec![a, b], Vec::new(), last)
    }
    fn reshape(&mut self, x: String, dims: &[usize], last: bool) -> String {
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let shape = self.int64s(&dims);
        self.op("Reshape", vec![x, shape], Vec::new(), last)
    }
    /// Elements `start..end` along `axis` (Slice takes attributes before opset 10).
    fn slice(&mut self, x: String, axis: usize, start: usize, end: usize) -> String {
        let (axis, start, end) = (axis as i64, start as i64, end as i64);
        if self.opset() >= 10 {
            let starts = self.int64s(&[start]);
            let ends = self.int64s(&[end]);
            let axes = self.int64s(&[axis]);
            self.op("Slice", vec![x, starts, ends, axes], Vec::new(), false)
        } else {
            let attrs = vec![
                Attr::Ints("starts", vec![start]),
                Attr::Ints("ends", vec![end]),
                Attr::Ints("axes", vec![axis]),
            ];
            self.op("Slice", vec![x], attrs, false)
        }
    }
}

/// ONNX's `TensorProto.DataType` number of an element type.
pub fn onnx_type(e: Elem) -> i64 {
    match e {
        Elem::F32 => 1,
        Elem::U8 => 2,
        Elem::I8 => 3,
        Elem::I64 => 7,
        Elem::F16 => 10,
        Elem::Bf16 => 16,
    }
}

/// Dims that broadcast a per-channel vector along `axis` of a tensor of `shape`.
pub fn channel_dims(shape: &[usize], axis: Option<usize>) -> Vec<usize> {
    match axis {
        Some(a) if a < shape.len() => {
            let mut d = vec![shape[a]];
            d.extend(std::iter::repeat_n(1, shape.len() - a - 1));
            d
        }
        _ => Vec::new(),
    }
}

/// Symbols as `model.<ext>` stores signed codes: 1 bit is the sign, wider codes are offset
/// by 2^(bits-1) to be unsigned. Returns the symbols and the offset to subtract (½ for a
/// sign bit, which is then doubled).
pub fn unsigned_symbols(codes: &[i8], bits: u8) -> (Vec<u32>, f32) {
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

/// A codebook lookup: `indices` (each < the group's book length, `width` bits) into one book
/// per group along `axis` (`books` flat, `book_len` per group), the result reshaped to
/// `shape` and written as the weight.
pub fn gather(
    g: &mut dyn Graph,
    indices: &[u32],
    width: u8,
    books: &[f32],
    book_len: usize,
    axis: Option<usize>,
    shape: &[usize],
) {
    let mut x = g.unpack(indices, width, 0.0);
    x = g.reshape(x, shape, false);
    let groups = books.len() / book_len.max(1);
    if groups > 1 {
        let offsets: Vec<f32> = (0..groups).map(|k| (k * book_len) as f32).collect();
        let offsets = g.floats(&channel_dims(shape, axis), &offsets);
        x = g.binary("Add", x, offsets, false);
    }
    let idx = g.cast(x, Elem::I64, false);
    let book = g.floats(&[books.len()], books);
    g.op("Gather", vec![book, idx], vec![Attr::Int("axis", 0)], true);
}
