//! A parsed model with what its format needs to be rebuilt ([`TensorSet`]), content
//! sniffing, and one module per format. The tensors themselves live in [`crate::model`].
//! Formats are the only code that knows bytes on disk.

pub mod limits;
pub mod mpz;
pub mod npz;
pub mod onnx;
pub mod safetensors;

pub use crate::model::{element_count, f32_to_bytes, role_from_name, DType, Role, Tensor};
use serde::Serialize;
use std::path::Path;

/// Errors while reading or writing a model file. Every variant is the user's input except
/// [`FormatError::Io`] and [`FormatError::Write`].
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{0}")]
    Invalid(String),
    /// The file would inflate beyond the configured [`limits::Inflation`].
    #[error("{0}")]
    TooLarge(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("could not write model: {0}")]
    Write(String),
}

impl From<crate::model::InvalidTensor> for FormatError {
    fn from(e: crate::model::InvalidTensor) -> Self {
        FormatError::Invalid(e.0)
    }
}

impl FormatError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        FormatError::Invalid(msg.into())
    }
    /// True when the input, not this program, is at fault.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            FormatError::Invalid(_) | FormatError::Unsupported(_) | FormatError::TooLarge(_)
        )
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
    /// The same model with other tensors (e.g. a compression's restored values).
    pub fn with_tensors(&self, tensors: Vec<Tensor>) -> TensorSet {
        TensorSet {
            format: self.format,
            tensors,
            container: self.container.clone(),
        }
    }
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

/// What an upload holds: its format, the tensor inventory, the parameter count and, for a
/// graph (ONNX), the inputs a dataset must feed.
pub struct Inspection {
    pub format: Format,
    pub inventory: Vec<TensorInfo>,
    pub parameters: u64,
    pub inputs: Option<Vec<GraphInput>>,
}

/// One input of a graph that is not an initializer: what a dataset array must match.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct GraphInput {
    pub name: String,
    /// None when the graph does not declare a tensor type this program reads.
    pub dtype: Option<String>,
    /// None when the graph declares no shape; an axis is None when it is symbolic
    /// (`batch`, `sequence_length`) or unset.
    pub shape: Option<Vec<Option<u64>>>,
}

/// Validates a model file and lists its tensors. An .npy is checked from its header and
/// length alone (constant memory); other formats are parsed whole, an .npz within
/// `inflation`.
pub fn inspect_path(path: &Path, inflation: &limits::Inflation) -> Result<Inspection, FormatError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)?.take(16).read_to_end(&mut head)?;
    if sniff(&head) == Some(Format::Npy) {
        let (dtype, shape, non_finite) = npz::inspect_npy_path(path)?;
        let parameters = element_count(&shape).unwrap_or(0) as u64;
        let info = TensorInfo {
            name: "array".into(),
            dtype: dtype.name().into(),
            parameters,
            role: inventory_role(role_from_name("array", &shape, dtype)),
            shape,
            non_finite,
        };
        return Ok(Inspection {
            format: Format::Npy,
            inventory: vec![info],
            parameters,
            inputs: None,
        });
    }
    let bytes = std::fs::read(path)?;
    let set = if sniff(&bytes) == Some(Format::Npz) {
        npz::read_npz_with(&bytes, inflation)?
    } else {
        read_bytes(&bytes)?
    };
    drop(bytes);
    let inputs = match &set.container {
        Container::Onnx(c) => Some(onnx::graph_inputs(&c.model)),
        _ => None,
    };
    Ok(Inspection {
        format: set.format,
        inventory: inventory(&set),
        parameters: set.parameter_count(),
        inputs,
    })
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
    /// NaN and infinite values: a job that would compress this tensor is refused at submit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub non_finite: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
            non_finite: crate::model::non_finite(t.dtype, &t.data),
        })
        .collect()
}

pub fn inventory_role(role: Role) -> String {
    role.name().to_string()
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
