//! Uniform quantization: symmetric or affine, per tensor, per output channel or per group of
//! inputs within each channel. The `quantize` method, and the [`Quantized`] form that
//! `binary` and `ternary` leave too.

use super::activations::{ActivationSpec, RangeMethod, DEFAULT_PERCENTILE};
use super::coding::{self, f32_bytes, CodingStats, Payload, Repr, StageBytes};
use super::form::{Form, Parts, Stored, Trained};
use super::gptq::{gptq, Grid, DEFAULT_DAMP};
use super::lower::{channel_dims, unsigned_symbols, Attr, Consumers, Elem, Graph, Rewrite};
use super::method::{self, int_in, spec_err, Applied, Kind, Method, Needs, Registration, Working};
use super::{pack, CompressError, DeployStyle};
use crate::model::{DType, Tensor};
use serde::Serialize;
use serde_json::{json, Map, Value};

pub const METHOD: Registration = Registration {
    name: "quantize",
    about: "uniform int2..int8, symmetric or affine, per tensor, per channel or group-wise",
    file: "src/compress/quantize.rs",
    parse,
    forms: &[method::Decoder {
        encoding: "linear",
        decode: decode_archive,
    }],
};

/// The archive entry: integer codes `q`, `w = (q - zero_point)·scale`; symbol = q +
/// 2^(bits-1) (bits ≥ 2) or (q + 1)/2 (bits = 1). Sections: the stream's, `scales` (f32),
/// `zero_points` (i8).
#[derive(Serialize, serde::Deserialize)]
struct LinearRepr {
    bits: u8,
    scheme: Scheme,
    axis: Option<usize>,
    stream: coding::Stream,
    /// Group-wise quantization: inputs per scale within each channel (absent in archives
    /// written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group_size: Option<usize>,
}

fn decode_archive(
    repr: &Repr,
    shape: &[usize],
    section: &coding::Section<'_, '_>,
) -> Result<Vec<f32>, coding::DecodeError> {
    let p: LinearRepr = repr.params()?;
    let q = Quantized::from_archive(
        p.bits,
        p.scheme,
        p.axis,
        p.group_size,
        &p.stream,
        shape,
        section,
    )?;
    Ok(dequantize(&q, shape))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    bits: Option<u64>,
    scheme: Option<Scheme>,
    granularity: Option<Granularity>,
    group_size: Option<u64>,
    /// GPTQ on the job's calibration data instead of rounding to nearest.
    calibrated: Option<bool>,
    /// GPTQ's dampening, a fraction of the inputs' mean second moment.
    damp: Option<f64>,
    /// Static int8: the activations feeding (and leaving) each consumer of the weight are
    /// quantized too, with ranges from the calibration data.
    activations: Option<RangeMethod>,
    percentile: Option<f64>,
}

fn parse(
    obj: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<Box<dyn Method>, CompressError> {
    let p: Params = method::params(obj, METHOD.name, at)?;
    let bits = int_in(p.bits, &at("bits"), 2, 8)?.unwrap_or(8) as u8;
    let granularity = p.granularity.unwrap_or(Granularity::Channel);
    let group_size = int_in(p.group_size, &at("group_size"), 16, 256)?;
    if group_size.is_some() && granularity == Granularity::Tensor {
        return Err(spec_err(
            &at("group_size"),
            "groups split each output channel: it goes with granularity \"channel\"",
        ));
    }
    let calibrated = p.calibrated.unwrap_or(false);
    let damp = match p.damp {
        None => DEFAULT_DAMP,
        Some(_) if !calibrated => {
            return Err(spec_err(&at("damp"), "goes with \"calibrated\": true"));
        }
        Some(d) if d > 0.0 && d <= 1.0 => d,
        Some(_) => return Err(spec_err(&at("damp"), "must be a number in (0, 1]")),
    };
    if p.activations.is_some() && (bits != 8 || group_size.is_some()) {
        return Err(spec_err(
            &at("activations"),
            "static activation quantization goes with int8 weights per channel or per tensor (bits 8, no group_size)",
        ));
    }
    let percentile = match (p.percentile, p.activations) {
        (None, _) => DEFAULT_PERCENTILE,
        (Some(x), Some(RangeMethod::Percentile)) if x > 50.0 && x < 100.0 => x,
        (Some(_), Some(RangeMethod::Percentile)) => {
            return Err(spec_err(&at("percentile"), "must be a number in (50, 100)"));
        }
        (Some(_), _) => {
            return Err(spec_err(
                &at("percentile"),
                "goes with \"activations\": \"percentile\"",
            ));
        }
    };
    Ok(Box::new(Quantize {
        bits,
        scheme: p.scheme.unwrap_or(Scheme::Symmetric),
        granularity,
        group_size: group_size.map(|g| g as usize),
        calibrated: calibrated.then_some(damp),
        activations: p
            .activations
            .map(|method| ActivationSpec { method, percentile }),
    }))
}

/// The `quantize` step.
#[derive(Debug, Clone)]
pub struct Quantize {
    pub bits: u8,
    pub scheme: Scheme,
    pub granularity: Granularity,
    /// Group-wise: inputs per scale within each output channel.
    pub group_size: Option<usize>,
    /// GPTQ with this dampening, where the runner measured the weight's inputs.
    pub calibrated: Option<f64>,
    /// Static int8: activation ranges by this method.
    pub activations: Option<ActivationSpec>,
}

impl Granularity {
    pub fn name(self) -> &'static str {
        match self {
            Granularity::Channel => "channel",
            Granularity::Tensor => "tensor",
        }
    }
    /// The axis per-channel scales run along for `t`, None per tensor.
    pub fn axis(self, t: &Tensor) -> Option<usize> {
        (self == Granularity::Channel).then(|| t.channel_axis())
    }
    /// How many scales (or codebooks) `t` gets.
    pub fn channels(self, t: &Tensor) -> u64 {
        match self {
            Granularity::Channel => t.shape.get(t.channel_axis()).copied().unwrap_or(1) as u64,
            Granularity::Tensor => 1,
        }
    }
}

impl Method for Quantize {
    fn label(&self) -> String {
        let mut extra = String::new();
        if self.calibrated.is_some() {
            extra.push_str(",gptq");
        }
        if let Some(a) = self.activations {
            extra.push_str(",static ");
            extra.push_str(a.method.name());
        }
        format!(
            "quantize(int{},{},{}{extra})",
            self.bits,
            if self.scheme == Scheme::Affine {
                "affine"
            } else {
                "symmetric"
            },
            match self.group_size {
                Some(g) => format!("group {g}"),
                None => self.granularity.name().to_string(),
            }
        )
    }
    fn needs(&self) -> Needs {
        Needs {
            hessian: self.calibrated.is_some(),
            activations: self.activations,
        }
    }
    fn kind(&self) -> Kind {
        Kind::Encode
    }
    fn estimate(&self, t: &Tensor, _pruned_first: bool) -> Option<u64> {
        let ch = match self.group_size {
            Some(g) => GroupLayout::new(&t.shape, self.granularity.axis(t), g).groups() as u64,
            None => self.granularity.channels(t),
        };
        let per_scale = if self.scheme == Scheme::Affine { 5 } else { 4 };
        Some((t.len() as u64 * u64::from(self.bits)).div_ceil(8) + ch * per_scale)
    }
    fn apply(&self, t: &Tensor, w: &mut Working) -> Result<Applied, CompressError> {
        let axis = self.granularity.axis(t);
        let calibrated = match (self.calibrated, &w.calibration) {
            (None, _) => None,
            (Some(damp), Ok(h)) => {
                let grid = Grid {
                    bits: self.bits,
                    scheme: self.scheme,
                    axis: t.channel_axis(),
                    per_tensor: axis.is_none(),
                    group_size: self.group_size,
                };
                let fixed: Vec<bool> = if w.pruned {
                    w.values.iter().map(|v| *v == 0.0).collect()
                } else {
                    Vec::new()
                };
                match gptq(&w.values, &t.shape, grid, h, damp, &fixed) {
                    Ok(q) => {
                        w.details.insert(
                            "calibration".into(),
                            json!({"method": "gptq", "damp": damp, "samples": h.samples}),
                        );
                        Some(q)
                    }
                    Err(e) => {
                        w.calibration_missed(t, &e.to_string());
                        None
                    }
                }
            }
            (Some(_), Err(why)) => {
                let why = why.clone();
                w.calibration_missed(t, &why);
                None
            }
        };
        let q = match (calibrated, self.group_size) {
            (Some(q), _) => q,
            (None, Some(g)) => {
                quantize_grouped(&w.values, &t.shape, self.bits, self.scheme, axis, g)
            }
            (None, None) => quantize(&w.values, &t.shape, self.bits, self.scheme, axis),
        };
        w.values = dequantize(&q, &t.shape);
        w.encoding = Some(super::form::Encoding::new(q));
        w.activations = self.activations;
        Ok(Applied::Ran)
    }
}

impl Quantized {
    /// Archive symbols (code + 2^(bits-1), or 0/1 for binary), the alphabet, and the symbol
    /// that means zero when there is one.
    fn symbols(&self) -> (Vec<u32>, u32, Option<u32>) {
        if self.bits == 1 {
            let s = self.codes.iter().map(|&c| u32::from(c > 0)).collect();
            return (s, 2, None);
        }
        let off = 1i32 << (self.bits - 1);
        let s = self
            .codes
            .iter()
            .map(|&c| (i32::from(c) + off) as u32)
            .collect();
        let zero = match self.scheme {
            Scheme::Symmetric => Some(off as u32),
            Scheme::Affine => {
                let first = self.zero_points.first().copied().unwrap_or(0);
                self.zero_points
                    .iter()
                    .all(|&z| z == first)
                    .then_some((i32::from(first) + off) as u32)
            }
        };
        (s, 1 << self.bits, zero)
    }
}

impl Form for Quantized {
    fn decode(&self, shape: &[usize]) -> Vec<f32> {
        dequantize(self, shape)
    }
    fn trained(&self, _shape: &[usize]) -> Trained {
        Trained::Dense
    }
    fn rezero(&mut self, values: &[f32], shape: &[usize]) -> Result<(), String> {
        if self.bits == 1 {
            return Err("binary (it has no zero)".into());
        }
        if self.zero_points.is_empty() {
            for (c, v) in self.codes.iter_mut().zip(values) {
                if *v == 0.0 {
                    *c = 0;
                }
            }
            return Ok(());
        }
        // A zero decodes from the zero point of its own scale: per group when group-wise.
        let groups = self
            .group_size
            .map(|g| GroupLayout::new(shape, self.axis, g));
        let channels = ChannelLayout::new(shape, self.axis);
        for (j, v) in values.iter().enumerate() {
            if *v == 0.0 {
                let k = match &groups {
                    Some(g) => g.group_of(j),
                    None => channels.channel_of(j),
                };
                self.codes[j] = self.zero_points.get(k).copied().unwrap_or(0);
            }
        }
        Ok(())
    }
    fn store(&self, t: &Tensor, parts: &mut Parts) -> Stored {
        let scale_name = parts.name("scale");
        let zp_name = parts.name("zero_point");
        let nscales = self.scales.len();
        let (data, storage, stored_shape) = if self.bits == 8 {
            (
                self.codes.iter().map(|c| *c as u8).collect::<Vec<u8>>(),
                "int8",
                t.shape.clone(),
            )
        } else {
            let (symbols, _, _) = self.symbols();
            let packed = pack::pack(&symbols, self.bits);
            let len = packed.len();
            (packed, "packed", vec![len])
        };
        let dtype = if self.bits == 8 { DType::I8 } else { DType::U8 };
        let mut bytes = parts.push(t.name.clone(), dtype, stored_shape, data);
        bytes += parts.push(
            scale_name.clone(),
            DType::F32,
            vec![nscales],
            f32_bytes(&self.scales),
        );
        if !self.zero_points.is_empty() {
            bytes += parts.push(
                zp_name.clone(),
                DType::I8,
                vec![nscales],
                self.zero_points.iter().map(|z| *z as u8).collect(),
            );
        }
        let decode = if self.bits == 8 {
            "w = (q - zero_point) * scale, scale broadcast along axis"
        } else if self.bits == 1 {
            "unpack 1-bit symbols s (LSB first); q = 2s - 1; w = q * scale along axis"
        } else {
            "unpack bits-wide symbols s (LSB first); q = s - 2^(bits-1); w = (q - zero_point) * scale along axis"
        };
        Stored {
            bytes,
            axis: self.axis,
            description: json!({
                "encoding": "linear_quantized",
                "bits": self.bits,
                "storage": storage,
                "shape": t.shape,
                "scheme": self.scheme,
                "granularity": if self.group_size.is_some() { "group" } else if self.axis.is_some() { "channel" } else { "tensor" },
                "axis": self.axis,
                "group_size": self.group_size,
                "scale": scale_name,
                "zero_point": if self.zero_points.is_empty() { Value::Null } else { Value::String(zp_name) },
                "original_dtype": t.dtype.name(),
                "decode": decode,
            }),
        }
    }
    fn payload(
        &self,
        values: &[f32],
        huffman: bool,
        pruned: bool,
    ) -> (Payload, Option<CodingStats>, StageBytes) {
        let (syms, alphabet, zero) = self.symbols();
        let mut tables = vec![("scales".to_string(), f32_bytes(&self.scales))];
        if !self.zero_points.is_empty() {
            tables.push((
                "zero_points".into(),
                self.zero_points.iter().map(|&z| z as u8).collect(),
            ));
        }
        coding::index_stream(
            &syms,
            alphabet,
            zero,
            tables,
            values,
            huffman,
            pruned,
            |stream| {
                Repr::new(
                    "linear",
                    &LinearRepr {
                        bits: self.bits,
                        scheme: self.scheme,
                        axis: self.axis,
                        stream,
                        group_size: self.group_size,
                    },
                )
            },
        )
    }
    fn deploy_refusal(&self, shape: &[usize], _opset: i64) -> Option<String> {
        let g = self.group_size?;
        let l = GroupLayout::new(shape, self.axis, g);
        (l.channel.outer > 1 && l.channel.inner > 1).then(|| {
            "group-wise codes are rewritten when the channel axis is the first or the last".into()
        })
    }
    fn lower(&self, g: &mut dyn Graph, shape: &[usize]) -> String {
        if g.style() != DeployStyle::Folded
            && self.nbits_fits(shape)
            && g.consumers() == Some(Consumers::MatMul)
        {
            return self.lower_nbits(g, shape);
        }
        if let Some(size) = self.group_size {
            return self.lower_grouped(g, shape, size);
        }
        let dims = channel_dims(shape, self.axis);
        if self.bits == 8 {
            return self.lower_int8(g, shape, &dims);
        }
        // (s - offset - zero_point) · scale: small integers until the scale, so the result
        // equals dequantize() bit for bit. One bit is the sign: (s - ½) · 2.
        let (symbols, offset) = unsigned_symbols(&self.codes, self.bits);
        let mut x = g.unpack(&symbols, self.bits, offset);
        x = g.reshape(x, shape, false);
        if self.bits == 1 {
            let two = g.floats(&[], &[2.0]);
            x = g.binary("Mul", x, two, false);
        }
        if !self.zero_points.is_empty() {
            let zp: Vec<f32> = self.zero_points.iter().map(|&z| f32::from(z)).collect();
            let zp = g.floats(&dims, &zp);
            x = g.binary("Sub", x, zp, false);
        }
        let scale = g.floats(&dims, &self.scales);
        g.binary("Mul", x, scale, true);
        format!("unpack(int{})+Mul", self.bits)
    }
}

impl Quantized {
    /// int8: `DequantizeLinear` where asked for operators (per tensor from opset 10, per
    /// axis from 13), else `Cast`+`Mul`.
    fn lower_int8(&self, g: &mut dyn Graph, shape: &[usize], dims: &[usize]) -> String {
        let codes = self.codes.iter().map(|&c| c as u8).collect();
        let codes = g.part(Elem::I8, shape, codes);
        let per_axis = self.axis.is_some() && self.scales.len() > 1;
        if (g.style() == DeployStyle::Operators || g.as_operator())
            && (g.opset() >= 13 || (!per_axis && g.opset() >= 10))
        {
            let vec_dims: Vec<usize> = if per_axis {
                vec![self.scales.len()]
            } else {
                Vec::new()
            };
            let mut inputs = vec![codes, g.floats(&vec_dims, &self.scales)];
            if !self.zero_points.is_empty() {
                let zp = self.zero_points.iter().map(|&z| z as u8).collect();
                inputs.push(g.part(Elem::I8, &vec_dims, zp));
            }
            let attrs = match (per_axis, self.axis) {
                (true, Some(a)) => vec![Attr::Int("axis", a as i64)],
                _ => Vec::new(),
            };
            g.op("DequantizeLinear", inputs, attrs, true);
            return "DequantizeLinear".into();
        }
        let mut x = g.cast(codes, Elem::F32, false);
        if !self.zero_points.is_empty() {
            let zp: Vec<f32> = self.zero_points.iter().map(|&z| f32::from(z)).collect();
            let zp = g.floats(dims, &zp);
            x = g.binary("Sub", x, zp, false);
        }
        let scale = g.floats(dims, &self.scales);
        g.binary("Mul", x, scale, true);
        "Cast+Mul".into()
    }

    /// Group-wise codes: the weight viewed as [channels, blocks, group] (channel axis first,
    /// or no axis) or [blocks, group, channels] (channel axis last), padded to whole blocks,
    /// scaled by [channels, blocks, 1] or [blocks, 1, channels], then cut back and reshaped.
    fn lower_grouped(&self, g: &mut dyn Graph, shape: &[usize], group_size: usize) -> String {
        let l = GroupLayout::new(shape, self.axis, group_size);
        let (ch, nb, gs) = (l.channel.channels.max(1), l.blocks, l.group_size);
        let k = l.channel.outer * l.channel.inner;
        let kp = nb * gs;
        let rows_first = l.channel.outer == 1;
        let mut codes = Vec::with_capacity(ch * kp);
        if rows_first {
            for row in self.codes.chunks(k.max(1)) {
                codes.extend_from_slice(row);
                codes.extend(std::iter::repeat_n(0i8, kp - k));
            }
        } else {
            codes.extend_from_slice(&self.codes);
            codes.extend(std::iter::repeat_n(0i8, (kp - k) * ch));
        }
        let (view, scale_dims, flat) = if rows_first {
            ([ch, nb, gs], [ch, nb, 1], [ch, kp])
        } else {
            ([nb, gs, ch], [nb, 1, ch], [kp, ch])
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
        let zero_points: Vec<f32> = self.zero_points.iter().map(|&z| f32::from(z)).collect();
        let (mut x, form) = if self.bits == 8 {
            let raw = codes.iter().map(|&c| c as u8).collect();
            let init = g.part(Elem::I8, &view, raw);
            (
                g.cast(init, Elem::F32, false),
                format!("Cast+Mul(group {gs})"),
            )
        } else {
            let (symbols, offset) = unsigned_symbols(&codes, self.bits);
            let x = g.unpack(&symbols, self.bits, offset);
            let mut x = g.reshape(x, &view, false);
            if self.bits == 1 {
                let two = g.floats(&[], &[2.0]);
                x = g.binary("Mul", x, two, false);
            }
            (x, format!("unpack(int{})+Mul(group {gs})", self.bits))
        };
        if !zero_points.is_empty() {
            let zp = g.floats(&scale_dims, &reorder(&zero_points));
            x = g.binary("Sub", x, zp, false);
        }
        let scale = g.floats(&scale_dims, &reorder(&self.scales));
        x = g.binary("Mul", x, scale, false);
        if kp > k {
            x = g.reshape(x, &flat, false);
            x = g.slice(x, usize::from(rows_first), 0, k);
        }
        g.reshape(x, shape, true);
        form
    }

    /// Whether the codes fit onnxruntime's int4 MatMul (`com.microsoft.MatMulNBits`) as a
    /// [K, N] MatMul weight, group-wise along K.
    fn nbits_fits(&self, shape: &[usize]) -> bool {
        let Some(size) = self.group_size else {
            return false;
        };
        self.bits == 4
            && shape.len() == 2
            && self.axis == Some(1)
            && size >= 16
            && size.is_power_of_two()
    }

    /// `com.microsoft.MatMulNBits` in place of each consumer MatMul: B [N, blocks,
    /// block·bits/8] packed, scales [N·blocks], optional packed zero points; symbols are
    /// unsigned with the default zero point 2^(bits-1), as `compress::pack` stores symmetric
    /// codes. onnxruntime (and tract) run it with integer weights.
    fn lower_nbits(&self, g: &mut dyn Graph, shape: &[usize]) -> String {
        let (k, n) = (shape[0], shape[1]);
        let size = self.group_size.unwrap_or(k);
        let blocks = k.div_ceil(size);
        let off = 1i32 << (self.bits - 1);
        // Column-major blocks: B[n, blk, :] holds W[blk·size .. (blk+1)·size, n], padded
        // with the zero symbol past K.
        let mut symbols = Vec::with_capacity(n * blocks * size);
        for col in 0..n {
            for row in 0..blocks * size {
                let code = if row < k {
                    self.codes[row * n + col]
                } else {
                    0
                };
                let zp = if row < k {
                    0
                } else {
                    i32::from(
                        self.zero_points
                            .get(col * blocks + row / size)
                            .copied()
                            .unwrap_or(0),
                    )
                };
                symbols.push((i32::from(code) + off + zp) as u32);
            }
        }
        let packed = pack::pack(&symbols, self.bits);
        let blob = size * usize::from(self.bits) / 8;
        let b = g.part(Elem::U8, &[n, blocks, blob], packed);
        let scales = g.floats(&[n * blocks], &self.scales);
        let mut inputs = vec![b, scales];
        if !self.zero_points.is_empty() {
            let per_col = (blocks * usize::from(self.bits)).div_ceil(8);
            let mut raw = Vec::with_capacity(n * per_col);
            for col in 0..n {
                let zs: Vec<u32> = (0..blocks)
                    .map(|b| (i32::from(self.zero_points[col * blocks + b]) + off) as u32)
                    .collect();
                let mut p = pack::pack(&zs, self.bits);
                p.resize(per_col, 0);
                raw.extend(p);
            }
            inputs.push(g.part(Elem::U8, &[n * per_col], raw));
        }
        g.rewrite(Rewrite::Kernel {
            domain: "com.microsoft",
            op_type: "MatMulNBits",
            inputs,
            attrs: vec![
                Attr::Int("K", k as i64),
                Attr::Int("N", n as i64),
                Attr::Int("bits", i64::from(self.bits)),
                Attr::Int("block_size", size as i64),
            ],
        });
        format!("com.microsoft.MatMulNBits (int{}, block {size})", self.bits)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Symmetric,
    Affine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Tensor,
    Channel,
}

/// Integer codes plus what dequantizes them: `w ≈ (q - zero_point) · scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub bits: u8,
    pub scheme: Scheme,
    /// The channel axis, or None for one scale over the whole tensor.
    pub axis: Option<usize>,
    pub scales: Vec<f32>,
    /// Empty for the symmetric scheme (its zero point is 0).
    pub zero_points: Vec<i8>,
    pub codes: Vec<i8>,
    /// Group-wise quantization: inputs per scale within each channel (see [`GroupLayout`]);
    /// `scales` then holds channels × blocks values. None: one scale per channel.
    pub group_size: Option<usize>,
}

/// The tensor viewed as `outer × channels × inner` blocks around the channel axis.
#[derive(Debug, Clone, Copy)]
pub struct ChannelLayout {
    pub outer: usize,
    pub channels: usize,
    pub inner: usize,
}

impl ChannelLayout {
    pub fn new(shape: &[usize], axis: Option<usize>) -> ChannelLayout {
        let n: usize = shape.iter().product();
        match axis {
            Some(a) if a < shape.len() => ChannelLayout {
                outer: shape[..a].iter().product(),
                channels: shape[a],
                inner: shape[a + 1..].iter().product(),
            },
            _ => ChannelLayout {
                outer: 1,
                channels: 1,
                inner: n,
            },
        }
    }
    /// The channel of flat element `i` (used by the reference implementations).
    pub fn channel_of(&self, i: usize) -> usize {
        (i / self.inner.max(1)) % self.channels.max(1)
    }
}

/// Group-wise (block) layout: the tensor viewed as `outer × channels × inner` around its
/// channel axis; a channel's inputs are k = outer_index·inner + inner_index (a MatMul weight
/// [in, out]: the rows; a conv kernel [O, C, kh, kw]: C·kh·kw; an embedding [V, D]: D), cut
/// into blocks of `group_size` (the last one may be shorter). Scale `c·blocks + k/group_size`.
#[derive(Debug, Clone, Copy)]
pub struct GroupLayout {
    pub channel: ChannelLayout,
    pub group_size: usize,
    /// Blocks per channel.
    pub blocks: usize,
}

impl GroupLayout {
    pub fn new(shape: &[usize], axis: Option<usize>, group_size: usize) -> GroupLayout {
        let channel = ChannelLayout::new(shape, axis);
        let inputs = channel.outer * channel.inner;
        // A group wider than the inputs is one group: stored as such, so that archives name
        // no group larger than their tensor.
        let group_size = group_size.clamp(1, inputs.max(1));
        GroupLayout {
            channel,
            group_size,
            blocks: inputs.div_ceil(group_size).max(1),
        }
    }
    /// Number of scales.
    pub fn groups(&self) -> usize {
        self.channel.channels.max(1) * self.blocks
    }
    /// The group of flat element `i` (used by the reference implementations).
    pub fn group_of(&self, i: usize) -> usize {
        let inner = self.channel.inner.max(1);
        let ch = self.channel.channels.max(1);
        let (rest, j) = (i / inner, i % inner);
        let (o, c) = (rest / ch, rest % ch);
        c * self.blocks + (o * inner + j) / self.group_size
    }
    /// Calls `f(range, group)` for runs of consecutive elements in one group, in order.
    fn for_each_run(&self, mut f: impl FnMut(std::ops::Range<usize>, usize)) {
        let inner = self.channel.inner.max(1);
        let ch = self.channel.channels.max(1);
        for o in 0..self.channel.outer {
            for c in 0..ch {
                let base = (o * ch + c) * inner;
                let k0 = o * inner;
                let mut j = 0;
                while j < inner {
                    let block = (k0 + j) / self.group_size;
                    let end = ((block + 1) * self.group_size - k0).min(inner);
                    f(base + j..base + end, c * self.blocks + block);
                    j = end;
                }
            }
        }
    }
}

/// Group-wise quantization: one scale (and zero point) per channel per block of
/// `group_size` inputs. Values must be finite.
pub fn quantize_grouped(
    values: &[f32],
    shape: &[usize],
    bits: u8,
    scheme: Scheme,
    axis: Option<usize>,
    group_size: usize,
) -> Quantized {
    let layout = GroupLayout::new(shape, axis, group_size);
    let groups = layout.groups();
    let (mut lo, mut hi) = (vec![f32::INFINITY; groups], vec![f32::NEG_INFINITY; groups]);
    layout.for_each_run(|r, g| {
        let (l, h) = min_max(&values[r]);
        lo[g] = lo[g].min(l);
        hi[g] = hi[g].max(h);
    });
    let (scales, zps) = params_all(&lo, &hi, bits, scheme);
    let (qmin, qmax) = code_range(bits, scheme);
    let mut codes = vec![0i8; values.len()];
    layout.for_each_run(|r, g| {
        let (s, z) = (scales[g], f32::from(zps[g]));
        for (o, &v) in codes[r.clone()].iter_mut().zip(&values[r]) {
            *o = fast_round((v / s).round_ties_even_fast().add_clamped(z, qmin, qmax));
        }
    });
    let mut q = quantized(bits, scheme, axis, scales, zps, codes);
    q.group_size = Some(layout.group_size);
    q
}

/// The slow, obvious version of [`quantize_grouped`]: each element's group from its flat
/// index.
pub fn quantize_grouped_reference(
    values: &[f32],
    shape: &[usize],
    bits: u8,
    scheme: Scheme,
    axis: Option<usize>,
    group_size: usize,
) -> Quantized {
    let layout = GroupLayout::new(shape, axis, group_size);
    let mut q = reference_by(
        values,
        layout.groups(),
        |i| layout.group_of(i),
        bits,
        scheme,
        axis,
    );
    q.group_size = Some(layout.group_size);
    q
}

/// Round to nearest with one scale (and zero point) per group, each element's group from
/// `group_of`: the slow, obvious core of both references.
fn reference_by(
    values: &[f32],
    groups: usize,
    group_of: impl Fn(usize) -> usize,
    bits: u8,
    scheme: Scheme,
    axis: Option<usize>,
) -> Quantized {
    let mut lo = vec![f32::INFINITY; groups];
    let mut hi = vec![f32::NEG_INFINITY; groups];
    for (i, &v) in values.iter().enumerate() {
        let g = group_of(i);
        lo[g] = lo[g].min(v);
        hi[g] = hi[g].max(v);
    }
    let (scales, zps) = params_all(&lo, &hi, bits, scheme);
    let (qmin, qmax) = code_range(bits, scheme);
    let codes = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let g = group_of(i);
            ((v / scales[g]).round_ties_even() + f32::from(zps[g])).clamp(qmin, qmax) as i8
        })
        .collect();
    quantized(bits, scheme, axis, scales, zps, codes)
}

pub(super) fn code_range(bits: u8, scheme: Scheme) -> (f32, f32) {
    let half = (1i32 << (bits - 1)) as f32;
    match scheme {
        // Symmetric leaves out -2^(b-1) so that +max and -max are both representable.
        Scheme::Symmetric => (-(half - 1.0), half - 1.0),
        Scheme::Affine => (-half, half - 1.0),
    }
}

/// Scale and zero point from a channel's min and max.
pub(super) fn params(lo: f32, hi: f32, bits: u8, scheme: Scheme) -> (f32, i8) {
    let (qmin, qmax) = code_range(bits, scheme);
    match scheme {
        Scheme::Symmetric => {
            let m = lo.abs().max(hi.abs());
            let s = m / qmax;
            (if s > 0.0 && s.is_finite() { s } else { 1.0 }, 0)
        }
        Scheme::Affine => {
            // The range always holds 0, so that 0 (and every pruned weight) stays exact.
            let (lo, hi) = (lo.min(0.0), hi.max(0.0));
            let s = (hi - lo) / (qmax - qmin);
            let s = if s > 0.0 && s.is_finite() { s } else { 1.0 };
            let zp = (qmin - lo / s).round_ties_even().clamp(qmin, qmax);
            (s, zp as i8)
        }
    }
}

/// Scale and zero point of each group from its min and max (an empty group: 0..0).
fn params_all(lo: &[f32], hi: &[f32], bits: u8, scheme: Scheme) -> (Vec<f32>, Vec<i8>) {
    lo.iter()
        .zip(hi)
        .map(|(&l, &h)| {
            let (l, h) = if l > h { (0.0, 0.0) } else { (l, h) };
            params(l, h, bits, scheme)
        })
        .unzip()
}

/// The codes and their parameters; the symmetric scheme keeps no zero points.
pub(super) fn quantized(
    bits: u8,
    scheme: Scheme,
    axis: Option<usize>,
    scales: Vec<f32>,
    zps: Vec<i8>,
    codes: Vec<i8>,
) -> Quantized {
    Quantized {
        bits,
        scheme,
        axis,
        scales,
        zero_points: if scheme == Scheme::Affine {
            zps
        } else {
            Vec::new()
        },
        codes,
        group_size: None,
    }
}

const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer, ties to even.
const MAGIC_BITS: i32 = 0x4B40_0000;

/// Round-half-even of an already clamped value in the int8 range, without a saturating
/// float→int cast (which blocks vectorization; see ../shared/STACK.md).
#[inline(always)]
fn fast_round(x: f32) -> i8 {
    ((x + MAGIC).to_bits() as i32 - MAGIC_BITS) as i8
}

fn min_max(values: &[f32]) -> (f32, f32) {
    values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Quantizes `values` (C order, `shape`). Values must be finite.
pub fn quantize(
    values: &[f32],
    shape: &[usize],
    bits: u8,
    scheme: Scheme,
    axis: Option<usize>,
) -> Quantized {
    let layout = ChannelLayout::new(shape, axis);
    let ch = layout.channels.max(1);
    let (mut lo, mut hi) = (vec![f32::INFINITY; ch], vec![f32::NEG_INFINITY; ch]);
    if layout.inner == 1 && ch > 1 {
        for row in values.chunks_exact(ch) {
            for c in 0..ch {
                lo[c] = lo[c].min(row[c]);
                hi[c] = hi[c].max(row[c]);
            }
        }
    } else {
        for (b, block) in values.chunks(layout.inner.max(1)).enumerate() {
            let c = b % ch;
            let (l, h) = min_max(block);
            lo[c] = lo[c].min(l);
            hi[c] = hi[c].max(h);
        }
    }
    let (scales, zps) = params_all(&lo, &hi, bits, scheme);
    let (qmin, qmax) = code_range(bits, scheme);
    let mut codes = vec![0i8; values.len()];
    if layout.inner == 1 && ch > 1 {
        let zpf: Vec<f32> = zps.iter().map(|&z| f32::from(z)).collect();
        for (row, out) in values.chunks_exact(ch).zip(codes.chunks_exact_mut(ch)) {
            for c in 0..ch {
                out[c] = fast_round(
                    (row[c] / scales[c])
                        .round_ties_even_fast()
                        .add_clamped(zpf[c], qmin, qmax),
                );
            }
        }
    } else {
        let n = layout.inner.max(1);
        for (b, (block, out)) in values.chunks(n).zip(codes.chunks_mut(n)).enumerate() {
            let c = b % ch;
            let (s, z) = (scales[c], f32::from(zps[c]));
            for (o, &v) in out.iter_mut().zip(block) {
                // Rounding v/s before adding the integral zero point equals rounding the sum.
                *o = fast_round((v / s).round_ties_even_fast().add_clamped(z, qmin, qmax));
            }
        }
    }
    quantized(bits, scheme, axis, scales, zps, codes)
}

trait RoundHelpers {
    fn round_ties_even_fast(self) -> f32;
    fn add_clamped(self, z: f32, lo: f32, hi: f32) -> f32;
}

impl RoundHelpers for f32 {
    #[inline(always)]
    fn round_ties_even_fast(self) -> f32 {
        // Exact for |x| < 2^22; larger values are already integers or get clamped below.
        if self.abs() < 4_194_304.0 {
            (self + MAGIC) - MAGIC
        } else {
            self
        }
    }
    #[inline(always)]
    fn add_clamped(self, z: f32, lo: f32, hi: f32) -> f32 {
        (self + z).clamp(lo, hi)
    }
}

/// Values the codes stand for.
pub fn dequantize(q: &Quantized, shape: &[usize]) -> Vec<f32> {
    if let Some(g) = q.group_size {
        let layout = GroupLayout::new(shape, q.axis, g);
        let zp = |g: usize| f32::from(q.zero_points.get(g).copied().unwrap_or(0));
        let mut out = vec![0f32; q.codes.len()];
        layout.for_each_run(|r, g| {
            let (s, z) = (q.scales[g], zp(g));
            for (v, &k) in out[r.clone()].iter_mut().zip(&q.codes[r]) {
                *v = (f32::from(k) - z) * s;
            }
        });
        return out;
    }
    let layout = ChannelLayout::new(shape, q.axis);
    let ch = layout.channels.max(1);
    let zp = |c: usize| f32::from(q.zero_points.get(c).copied().unwrap_or(0));
    let mut out = vec![0f32; q.codes.len()];
    if layout.inner == 1 && ch > 1 {
        for (codes, o) in q.codes.chunks_exact(ch).zip(out.chunks_exact_mut(ch)) {
            for c in 0..ch {
                o[c] = (f32::from(codes[c]) - zp(c)) * q.scales[c];
            }
        }
    } else {
        let n = layout.inner.max(1);
        for (b, (codes, o)) in q.codes.chunks(n).zip(out.chunks_mut(n)).enumerate() {
            let c = b % ch;
            let (s, z) = (q.scales[c], zp(c));
            for (v, &k) in o.iter_mut().zip(codes) {
                *v = (f32::from(k) - z) * s;
            }
        }
    }
    out
}

/// The slow, obvious version: one element at a time, channel from the flat index.
pub fn quantize_reference(
    values: &[f32],
    shape: &[usize],
    bits: u8,
    scheme: Scheme,
    axis: Option<usize>,
) -> Quantized {
    let layout = ChannelLayout::new(shape, axis);
    reference_by(
        values,
        layout.channels.max(1),
        |i| layout.channel_of(i),
        bits,
        scheme,
        axis,
    )
}

impl Quantized {
    /// The form from its archive entry (`model.mpz`): every length checked against the shape.
    pub(super) fn from_archive<'a>(
        bits: u8,
        scheme: Scheme,
        axis: Option<usize>,
        group_size: Option<usize>,
        stream: &coding::Stream,
        shape: &[usize],
        section: &coding::Section<'_, 'a>,
    ) -> Result<Quantized, coding::DecodeError> {
        let err = coding::err;
        let n = crate::model::element_count(shape).ok_or_else(|| err("shape overflows"))?;
        if !(1..=8).contains(&bits)
            || axis.is_some_and(|a| a >= shape.len())
            || stream.alphabet != 1 << bits
            || group_size.is_some_and(|g| g == 0 || g > n.max(1))
        {
            return Err(err("linear parameters out of range"));
        }
        let syms = coding::read_stream(stream, n, section)?;
        let ch = match group_size {
            Some(g) => GroupLayout::new(shape, axis, g).groups(),
            None => axis.map_or(1, |a| shape[a]),
        };
        let scales = coding::f32_section(section("scales")?, ch, "scales")?;
        let zero_points: Vec<i8> = match scheme {
            Scheme::Symmetric => Vec::new(),
            Scheme::Affine => {
                let z = section("zero_points")?;
                if z.len() != ch {
                    return Err(err("zero_points length differs from the channels"));
                }
                z.iter().map(|&b| b as i8).collect()
            }
        };
        let codes = if bits == 1 {
            syms.iter()
                .map(|&s| if s == 1 { 1i8 } else { -1 })
                .collect()
        } else {
            let off = 1i32 << (bits - 1);
            syms.iter().map(|&s| (s as i32 - off) as i8).collect()
        };
        Ok(Quantized {
            bits,
            scheme,
            axis,
            scales,
            zero_points,
            codes,
            group_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::testing::Tolerance;
    use proptest::prelude::*;

    /// Pruning after affine quantization: every zeroed weight decodes to exactly zero, also
    /// group-wise, where the zero point is per group and not per channel.
    #[test]
    fn rezero_after_affine_quantization_decodes_zeros() {
        let shape = [4usize, 64];
        let values: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 20.0) / 17.0 + (i / 32) as f32)
            .collect();
        for group_size in [None, Some(16), Some(32)] {
            let mut q = match group_size {
                Some(g) => quantize_grouped(&values, &shape, 4, Scheme::Affine, Some(0), g),
                None => quantize(&values, &shape, 4, Scheme::Affine, Some(0)),
            };
            let mut pruned = dequantize(&q, &shape);
            for v in pruned.iter_mut().step_by(3) {
                *v = 0.0;
            }
            q.rezero(&pruned, &shape).unwrap();
            assert_eq!(dequantize(&q, &shape), pruned, "group_size {group_size:?}");
        }
    }

    /// A random tensor with a random shape, channel axis and scheme.
    #[derive(Debug, Clone)]
    struct QuantizeProblem {
        shape: Vec<usize>,
        values: Vec<f32>,
        bits: u8,
        scheme: Scheme,
        axis: Option<usize>,
    }

    fn problem() -> impl Strategy<Value = QuantizeProblem> {
        (
            prop::collection::vec(1usize..6, 1..4),
            2u8..=8,
            any::<bool>(),
            any::<bool>(),
            0usize..4,
        )
            .prop_flat_map(|(shape, bits, affine, per_channel, axis)| {
                let n: usize = shape.iter().product();
                let rank = shape.len();
                (
                    Just(shape),
                    prop::collection::vec(-1000f32..1000f32, n),
                    Just(bits),
                    Just(if affine {
                        Scheme::Affine
                    } else {
                        Scheme::Symmetric
                    }),
                    Just(if per_channel { Some(axis % rank) } else { None }),
                )
            })
            .prop_map(|(shape, values, bits, scheme, axis)| QuantizeProblem {
                shape,
                values,
                bits,
                scheme,
                axis,
            })
    }

    impl QuantizeProblem {
        fn check(&self) {
            let fast = quantize(&self.values, &self.shape, self.bits, self.scheme, self.axis);
            let slow =
                quantize_reference(&self.values, &self.shape, self.bits, self.scheme, self.axis);
            Tolerance::Exact.assert_i8(&fast.codes, &slow.codes);
            assert_eq!(fast.scales, slow.scales);
            assert_eq!(fast.zero_points, slow.zero_points);
            // Round-to-nearest error bound: half a step, per element, in its own channel.
            let back = dequantize(&fast, &self.shape);
            let layout = ChannelLayout::new(&self.shape, self.axis);
            for (i, (&v, &d)) in self.values.iter().zip(&back).enumerate() {
                let s = fast.scales[layout.channel_of(i)];
                Tolerance::HalfStep(s).assert_close(v, d);
            }
        }
    }

    proptest! {
        #[test]
        fn quantize_matches_reference(p in problem()) {
            p.check();
        }

        #[test]
        fn grouped_quantize_matches_reference(p in problem(), group in 1usize..9) {
            GroupedProblem { base: p, group }.check();
        }
    }

    /// A [`QuantizeProblem`] quantized in blocks of `group` inputs per channel.
    #[derive(Debug, Clone)]
    struct GroupedProblem {
        base: QuantizeProblem,
        group: usize,
    }

    impl GroupedProblem {
        fn check(&self) {
            let p = &self.base;
            let fast = quantize_grouped(&p.values, &p.shape, p.bits, p.scheme, p.axis, self.group);
            let slow = quantize_grouped_reference(
                &p.values, &p.shape, p.bits, p.scheme, p.axis, self.group,
            );
            Tolerance::Exact.assert_i8(&fast.codes, &slow.codes);
            assert_eq!(fast.scales, slow.scales);
            assert_eq!(fast.zero_points, slow.zero_points);
            let layout = GroupLayout::new(&p.shape, p.axis, self.group);
            assert_eq!(fast.scales.len(), layout.groups());
            let back = dequantize(&fast, &p.shape);
            for (i, (&v, &d)) in p.values.iter().zip(&back).enumerate() {
                Tolerance::HalfStep(fast.scales[layout.group_of(i)]).assert_close(v, d);
            }
            // A group as wide as the inputs is per-channel quantization.
            let whole = quantize_grouped(
                &p.values,
                &p.shape,
                p.bits,
                p.scheme,
                p.axis,
                p.values.len(),
            );
            let channel = quantize(&p.values, &p.shape, p.bits, p.scheme, p.axis);
            assert_eq!(whole.codes, channel.codes);
            assert_eq!(whole.scales, channel.scales);
        }
    }

    #[test]
    fn groups_cut_a_matmul_weights_rows_and_an_embeddings_columns() {
        // MatMul [in=4, out=2], channel axis last: groups of 2 rows per column.
        let l = GroupLayout::new(&[4, 2], Some(1), 2);
        let groups: Vec<usize> = (0..8).map(|i| l.group_of(i)).collect();
        assert_eq!(groups, [0, 2, 0, 2, 1, 3, 1, 3]);
        // Embedding [2, 6], channel axis first: groups of 4 columns, the last one short.
        let l = GroupLayout::new(&[2, 6], Some(0), 4);
        let groups: Vec<usize> = (0..12).map(|i| l.group_of(i)).collect();
        assert_eq!(groups, [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]);
    }

    #[test]
    fn per_channel_error_is_at_most_per_tensor_error() {
        // Channels with very different ranges, like silero's encoder.3.weight.
        let shape = [4usize, 64];
        let values: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * [0.09f32, 1.0, 7.0, 54.9][i / 64])
            .collect();
        for scheme in [Scheme::Symmetric, Scheme::Affine] {
            let err = |axis| {
                let q = quantize(&values, &shape, 8, scheme, axis);
                let d = dequantize(&q, &shape);
                values
                    .iter()
                    .zip(&d)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f32>()
            };
            assert!(err(Some(0)) <= err(None), "{scheme:?}");
        }
    }

    #[test]
    fn matmul_layout_uses_last_axis() {
        // [in=3, out=2]: channel = column.
        let values = [1.0f32, 100.0, -1.0, -100.0, 0.5, 50.0];
        let q = quantize(&values, &[3, 2], 8, Scheme::Symmetric, Some(1));
        assert_eq!(q.scales.len(), 2);
        assert!((q.scales[0] - 1.0 / 127.0).abs() < 1e-9);
        assert!((q.scales[1] - 100.0 / 127.0).abs() < 1e-6);
    }

    #[test]
    fn zero_tensor_is_exact() {
        let q = quantize(&[0.0; 8], &[2, 4], 8, Scheme::Affine, Some(0));
        assert_eq!(dequantize(&q, &[2, 4]), vec![0.0; 8]);
    }
}
