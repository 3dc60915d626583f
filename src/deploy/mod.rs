//! Deployable forms: the compressed model written so that a real runtime runs it at its
//! compressed size. `compress/` says how each tensor is encoded; `formats/` knows the bytes
//! of each container; this module joins the two (it depends on both, neither on it).

pub mod compact;
pub mod latency;
pub mod onnx;
pub mod opset;

use serde::Serialize;

/// How one tensor is stored in the deployable file, and why when it stayed dense.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TensorForm {
    pub name: String,
    /// e.g. `DequantizeLinear`, `unpack+Mul`, `Gather(codebook)`, `MatMul(factors)`, `dense`.
    pub form: String,
    /// Bytes of the tensor's initializers in the deployable file.
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}
