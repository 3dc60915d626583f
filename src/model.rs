//! The one in-memory model: named tensors with their dtype, shape, bytes and role. Both
//! `formats` (bytes on disk to tensors and back) and `compress` (methods over tensors) use
//! it; neither depends on the other for it.

use serde::Serialize;

/// Most dimensions one tensor may have.
pub const MAX_RANK: usize = 32;
/// Longest tensor name, in bytes.
pub const MAX_NAME_BYTES: usize = 4096;
/// Most elements in one tensor (2^40: far beyond any real model, well inside usize).
pub const MAX_ELEMENTS: u64 = 1 << 40;

/// A tensor whose name, shape or bytes break the limits or disagree: always the input's fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidTensor(pub String);

impl InvalidTensor {
    fn new(msg: impl Into<String>) -> Self {
        InvalidTensor(msg.into())
    }
}

/// Element types, little-endian in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
    /// The dtype [`DType::name`] names.
    pub fn parse(name: &str) -> Option<DType> {
        [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::F64,
            DType::I8,
            DType::U8,
            DType::I16,
            DType::U16,
            DType::I32,
            DType::U32,
            DType::I64,
            DType::U64,
            DType::Bool,
        ]
        .into_iter()
        .find(|d| d.name() == name)
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F64 => "float64",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::Bool => "bool",
        }
    }
}

/// What a tensor does in the model, which decides what compression touches by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Weight,
    Bias,
    Norm,
    Embedding,
    Other,
}

impl Role {
    /// The role [`Role::name`] names.
    pub fn parse(name: &str) -> Option<Role> {
        [
            Role::Weight,
            Role::Bias,
            Role::Norm,
            Role::Embedding,
            Role::Other,
        ]
        .into_iter()
        .find(|r| r.name() == name)
    }
    /// The role's name in inventories and reports.
    pub fn name(self) -> &'static str {
        match self {
            Role::Weight => "weight",
            Role::Bias => "bias",
            Role::Norm => "norm",
            Role::Embedding => "embedding",
            Role::Other => "other",
        }
    }
}

/// What selection needs to know of a tensor: everything but its values (an inventory row
/// has it).
#[derive(Debug, Clone, Copy)]
pub struct TensorFacts<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub role: Role,
}

/// One named tensor with its bytes (little-endian, C order).
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
    pub role: Role,
    /// The axis that indexes output channels, when the format can tell how the weight is used.
    pub output_axis: Option<usize>,
}

impl Tensor {
    /// Builds a tensor, checking that the bytes match dtype and shape.
    pub fn new(
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        data: Vec<u8>,
    ) -> Result<Tensor, InvalidTensor> {
        if name.len() > MAX_NAME_BYTES {
            return Err(InvalidTensor::new("tensor name too long"));
        }
        if shape.len() > MAX_RANK {
            return Err(InvalidTensor::new(format!(
                "tensor {name:?} has {} dimensions (limit {})",
                shape.len(),
                MAX_RANK
            )));
        }
        let count = element_count(&shape)
            .ok_or_else(|| InvalidTensor::new(format!("tensor {name:?}: shape overflows")))?;
        let bytes = count
            .checked_mul(dtype.size())
            .ok_or_else(|| InvalidTensor::new(format!("tensor {name:?}: byte size overflows")))?;
        if bytes != data.len() {
            return Err(InvalidTensor::new(format!(
                "tensor {name:?}: {} data bytes, but shape {:?} of {} needs {bytes}",
                data.len(),
                shape,
                dtype.name()
            )));
        }
        let role = role_from_name(&name, &shape, dtype);
        Ok(Tensor {
            name,
            dtype,
            shape,
            data,
            role,
            output_axis: None,
        })
    }

    pub fn facts(&self) -> TensorFacts<'_> {
        TensorFacts {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            role: self.role,
        }
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The values as f32 (None for non-float tensors).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let d = &self.data;
        Some(match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F64 => d
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            _ => return None,
        })
    }

    /// Replaces the values, keeping the tensor's float dtype.
    pub fn set_f32(&mut self, values: &[f32]) {
        self.data = f32_to_bytes(values, self.dtype);
    }

    /// The output-channel axis used for per-channel methods: the format's answer when it has
    /// one, else axis 0 (PyTorch's Linear/Conv layout).
    pub fn channel_axis(&self) -> usize {
        self.output_axis
            .unwrap_or(0)
            .min(self.shape.len().saturating_sub(1))
    }
}

/// How many values of a float dtype's little-endian bytes are NaN or infinite (0 for other
/// dtypes). A trailing partial value is ignored, so a file can be scanned in chunks whose
/// length is a multiple of the dtype's size.
pub fn non_finite(dtype: DType, bytes: &[u8]) -> u64 {
    let count = |it: &mut dyn Iterator<Item = bool>| it.filter(|finite| !finite).count() as u64;
    match dtype {
        DType::F32 => count(
            &mut bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        ),
        DType::F64 => count(&mut bytes.chunks_exact(8).map(|c| {
            f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]).is_finite()
        })),
        DType::F16 => count(
            &mut bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).is_finite()),
        ),
        DType::BF16 => count(
            &mut bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).is_finite()),
        ),
        _ => 0,
    }
}

/// Encodes f32 values as little-endian bytes of a float dtype.
pub fn f32_to_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        DType::F64 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f64::from(*v).to_le_bytes())),
        _ => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
    }
    out
}

/// Product of dimensions, None on overflow or beyond [`MAX_ELEMENTS`].
pub fn element_count(shape: &[usize]) -> Option<usize> {
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    if n as u64 > MAX_ELEMENTS {
        return None;
    }
    Some(n)
}

/// Guesses the role of a tensor from its name, for formats that carry no graph.
pub fn role_from_name(name: &str, shape: &[usize], dtype: DType) -> Role {
    let lower = name.to_ascii_lowercase();
    if !dtype.is_float() {
        return Role::Other;
    }
    let last = lower.rsplit(['.', '/', ':']).next().unwrap_or(&lower);
    let is_norm = ["norm", "ln_", "layernorm", "batchnorm", "bn"]
        .iter()
        .any(|k| lower.contains(k))
        || last == "gamma"
        || last == "beta"
        || last.starts_with("running_");
    if is_norm {
        return Role::Norm;
    }
    if last.starts_with("bias") || last == "b" || last.ends_with("_bias") {
        return Role::Bias;
    }
    if lower.contains("embed") || lower.contains("wte") || lower.contains("wpe") {
        return Role::Embedding;
    }
    if shape.len() >= 2 {
        Role::Weight
    } else {
        Role::Other
    }
}
