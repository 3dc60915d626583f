//! The one in-memory model ([`TensorSet`]), content sniffing, and one module per format.
//! Formats are the only code that knows bytes on disk.

pub mod limits;
pub mod mpz;
pub mod npz;
pub mod onnx;
pub mod safetensors;

use serde::Serialize;
use std::path::Path;

/// Errors while reading or writing a model file. Every variant is the user's input except
/// [`FormatError::Io`] and [`FormatError::Write`].
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{0}")]
    Invalid(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("could not write model: {0}")]
    Write(String),
}

impl FormatError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        FormatError::Invalid(msg.into())
    }
    /// True when the input, not this program, is at fault.
    pub fn is_user_error(&self) -> bool {
        matches!(self, FormatError::Invalid(_) | FormatError::Unsupported(_))
    }
}

/// Model container formats, detected from content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Onnx,
    Safetensors,
    Npy,
    Npz,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Onnx => "onnx",
            Format::Safetensors => "safetensors",
            Format::Npy => "npy",
            Format::Npz => "npz",
        }
    }
    pub fn extension(self) -> &'static str {
        self.as_str()
    }
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "onnx" => Some(Format::Onnx),
            "safetensors" => Some(Format::Safetensors),
            "npy" => Some(Format::Npy),
            "npz" => Some(Format::Npz),
            _ => None,
        }
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
    ) -> Result<Tensor, FormatError> {
        if name.len() > limits::MAX_NAME_BYTES {
            return Err(FormatError::invalid("tensor name too long"));
        }
        if shape.len() > limits::MAX_RANK {
            return Err(FormatError::invalid(format!(
                "tensor {name:?} has {} dimensions (limit {})",
                shape.len(),
                limits::MAX_RANK
            )));
        }
        let count = element_count(&shape)
            .ok_or_else(|| FormatError::invalid(format!("tensor {name:?}: shape overflows")))?;
        let bytes = count
            .checked_mul(dtype.size())
            .ok_or_else(|| FormatError::invalid(format!("tensor {name:?}: byte size overflows")))?;
        if bytes != data.len() {
            return Err(FormatError::invalid(format!(
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

/// Product of dimensions, None on overflow or beyond [`limits::MAX_ELEMENTS`].
pub fn element_count(shape: &[usize]) -> Option<usize> {
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    if n as u64 > limits::MAX_ELEMENTS {
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

/// Container-specific state needed to write the model back in its own format.
#[derive(Debug, Clone)]
pub enum Container {
    /// Shared: a restored copy of the set must not copy the whole graph and its weights.
    Onnx(std::sync::Arc<onnx::OnnxContainer>),
    Safetensors {
        metadata: Option<std::collections::HashMap<String, String>>,
    },
    /// One array; written back in C order.
    Npy,
    Npz {
        compressed: bool,
    },
}

/// A parsed, validated model: its tensors plus what its format needs to be rebuilt.
#[derive(Debug, Clone)]
pub struct TensorSet {
    pub format: Format,
    pub tensors: Vec<Tensor>,
    pub container: Container,
}

impl TensorSet {
    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(|t| t.len() as u64).sum()
    }
}

/// Detects the format from the first bytes of a file.
pub fn sniff(head: &[u8]) -> Option<Format> {
    if head.starts_with(b"\x93NUMPY") {
        return Some(Format::Npy);
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Some(Format::Npz);
    }
    if head.len() >= 9 && head[8] == b'{' {
        return Some(Format::Safetensors);
    }
    // ONNX is a protobuf with no magic; a ModelProto starts with field 1 (ir_version, varint)
    // or, from some writers, another top-level field. Leave the decoder to decide.
    if !head.is_empty() {
        return Some(Format::Onnx);
    }
    None
}

/// Parses and validates a model file of any supported format.
pub fn read_path(path: &Path) -> Result<TensorSet, FormatError> {
    let bytes = std::fs::read(path)?;
    read_bytes(&bytes)
}

/// Validates a model file and lists its tensors. An .npy is checked from its header and
/// length alone (constant memory); other formats are parsed whole.
pub fn inspect_path(path: &Path) -> Result<(Format, Vec<TensorInfo>, u64), FormatError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)?.take(16).read_to_end(&mut head)?;
    if sniff(&head) == Some(Format::Npy) {
        let (dtype, shape) = npz::inspect_npy_path(path)?;
        let parameters = element_count(&shape).unwrap_or(0) as u64;
        let info = TensorInfo {
            name: "array".into(),
            dtype: dtype.name().into(),
            parameters,
            role: inventory_role(role_from_name("array", &shape, dtype)),
            shape,
        };
        return Ok((Format::Npy, vec![info], parameters));
    }
    let set = read_path(path)?;
    Ok((set.format, inventory(&set), set.parameter_count()))
}

/// Parses and validates a model held in memory.
pub fn read_bytes(bytes: &[u8]) -> Result<TensorSet, FormatError> {
    if bytes.starts_with(mpz::MAGIC) {
        return Err(FormatError::Unsupported(
            "this is a modelpress archive (model.mpz); rebuild the model with `modelpress decompress` first".into(),
        ));
    }
    match sniff(bytes) {
        Some(Format::Npy) => npz::read_npy_file(bytes),
        Some(Format::Npz) => npz::read_npz(bytes),
        Some(Format::Safetensors) => safetensors::read(bytes),
        Some(Format::Onnx) => onnx::read(bytes),
        None => Err(FormatError::invalid("empty file")),
    }
}

/// Serialises a tensor set back into its own format.
pub fn write_bytes(set: &TensorSet) -> Result<Vec<u8>, FormatError> {
    match &set.container {
        Container::Onnx(c) => onnx::write(c, &set.tensors),
        Container::Safetensors { metadata } => {
            safetensors::write(&set.tensors, metadata.clone(), None)
        }
        Container::Npy => {
            let t = set
                .tensors
                .first()
                .ok_or_else(|| FormatError::Write("an .npy holds exactly one array".into()))?;
            npz::write_npy(t)
        }
        Container::Npz { compressed } => npz::write_npz(&set.tensors, *compressed, None),
    }
}

/// The inventory row of one tensor, as `GET /v1/models/{id}/tensors` returns it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub parameters: u64,
    pub role: String,
}

pub fn inventory(set: &TensorSet) -> Vec<TensorInfo> {
    set.tensors
        .iter()
        .map(|t| TensorInfo {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype.name().to_string(),
            parameters: t.len() as u64,
            role: inventory_role(t.role),
        })
        .collect()
}

pub fn inventory_role(role: Role) -> String {
    match role {
        Role::Weight => "weight",
        Role::Bias => "bias",
        Role::Norm => "norm",
        Role::Embedding => "embedding",
        Role::Other => "other",
    }
    .to_string()
}

/// Serialises the compact form of a compressed model in the input's format family; returns
/// the bytes and the file extension. `description` says how to decode each tensor.
pub fn write_encoded(
    set: &TensorSet,
    tensors: &[Tensor],
    description: &serde_json::Value,
) -> Result<(Vec<u8>, &'static str), FormatError> {
    let desc = description.to_string();
    match &set.container {
        Container::Safetensors { metadata } => {
            let extra = std::collections::HashMap::from([("modelpress".to_string(), desc)]);
            Ok((
                safetensors::write(tensors, metadata.clone(), Some(extra))?,
                "safetensors",
            ))
        }
        Container::Npz { .. } | Container::Npy => {
            // NumPy has no bfloat16: store its bit patterns as uint16; the description in the
            // archive comment says what they are. One .npy cannot hold codes and scales, so an
            // .npy input gets an .npz model.
            let tensors: Vec<Tensor> = tensors
                .iter()
                .map(|t| {
                    let mut t = t.clone();
                    if t.dtype == DType::BF16 {
                        t.dtype = DType::U16;
                    }
                    t
                })
                .collect();
            let compressed = matches!(set.container, Container::Npz { compressed: true });
            Ok((npz::write_npz(&tensors, compressed, Some(desc))?, "npz"))
        }
        Container::Onnx(_) => Err(FormatError::Write(
            "ONNX models are written through their graph (see write_bytes)".into(),
        )),
    }
}
