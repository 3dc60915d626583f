//! ONNX through the protobuf types that `tract-onnx` ships (no protoc needed). The whole
//! ModelProto is kept, so a later issue can edit the graph itself; for now only initializer
//! data changes, and an initializer whose values did not change is written back untouched.

use super::{Container, DType, Format, FormatError, Role, Tensor, TensorSet};
use prost::Message;
use std::collections::HashMap;
use tract_onnx::pb::{tensor_proto::DataType, ModelProto, NodeProto, TensorProto};

/// The graph with its initializers' payloads taken out (the tensors hold them), so a model
/// is not kept in memory twice, plus a fingerprint of each payload as read.
#[derive(Debug, Clone)]
pub struct OnnxContainer {
    pub model: ModelProto,
    originals: Vec<Original>,
}

/// How an initializer stored its values, and a fingerprint of them: a tensor whose bytes
/// still match goes back in its original field, so untouched initializers are written as
/// they were read.
#[derive(Debug, Clone)]
struct Original {
    raw: bool,
    fingerprint: u64,
}

fn fingerprint(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

fn clear_payload(init: &mut TensorProto) {
    init.raw_data = Vec::new();
    init.float_data = Vec::new();
    init.double_data = Vec::new();
    init.int32_data = Vec::new();
    init.int64_data = Vec::new();
    init.uint64_data = Vec::new();
}

/// Puts little-endian bytes back into the typed field that ONNX uses for `dtype`.
fn set_typed(init: &mut TensorProto, dtype: DType, b: &[u8]) {
    match dtype {
        DType::F32 => {
            init.float_data = b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        DType::F64 => {
            init.double_data = b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()
        }
        DType::I64 => {
            init.int64_data = b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()
        }
        DType::U64 => {
            init.uint64_data = b
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()
        }
        DType::U32 => {
            init.uint64_data = b
                .chunks_exact(4)
                .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect()
        }
        DType::I32 => {
            init.int32_data = b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        DType::F16 | DType::BF16 | DType::U16 => {
            init.int32_data = b
                .chunks_exact(2)
                .map(|c| i32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect()
        }
        DType::I16 => {
            init.int32_data = b
                .chunks_exact(2)
                .map(|c| i32::from(i16::from_le_bytes([c[0], c[1]])))
                .collect()
        }
        DType::I8 => init.int32_data = b.iter().map(|&x| i32::from(x as i8)).collect(),
        DType::U8 | DType::Bool => init.int32_data = b.iter().map(|&x| i32::from(x)).collect(),
    }
}

fn dtype_from(code: i32) -> Result<DType, FormatError> {
    let dt = DataType::try_from(code)
        .map_err(|_| FormatError::invalid(format!("unknown ONNX data type {code}")))?;
    Ok(match dt {
        DataType::Float => DType::F32,
        DataType::Float16 => DType::F16,
        DataType::Bfloat16 => DType::BF16,
        DataType::Double => DType::F64,
        DataType::Int8 => DType::I8,
        DataType::Uint8 => DType::U8,
        DataType::Int16 => DType::I16,
        DataType::Uint16 => DType::U16,
        DataType::Int32 => DType::I32,
        DataType::Uint32 => DType::U32,
        DataType::Int64 => DType::I64,
        DataType::Uint64 => DType::U64,
        DataType::Bool => DType::Bool,
        other => {
            return Err(FormatError::Unsupported(format!(
                "ONNX initializer type {other:?}"
            )))
        }
    })
}

/// The initializer's values as little-endian bytes, whichever field holds them.
fn initializer_bytes(t: &TensorProto, dtype: DType, count: usize) -> Result<Vec<u8>, FormatError> {
    if t.data_location == Some(1) || !t.external_data.is_empty() {
        return Err(FormatError::Unsupported(format!(
            "initializer {:?} uses ONNX external data; upload a self-contained model",
            t.name
        )));
    }
    if !t.raw_data.is_empty() || count == 0 {
        return Ok(t.raw_data.clone());
    }
    // Reserve from what the file holds, never from what its dims claim.
    let held = t.float_data.len()
        + t.double_data.len()
        + t.int32_data.len()
        + t.int64_data.len()
        + t.uint64_data.len();
    let mut out = Vec::with_capacity(held.min(count).saturating_mul(dtype.size()));
    match dtype {
        DType::F32 => t
            .float_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F64 => t
            .double_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I64 => t
            .int64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::U32 => t
            .uint64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as u32).to_le_bytes())),
        DType::U64 => t
            .uint64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I32 => t
            .int32_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 | DType::BF16 | DType::I16 | DType::U16 => t
            .int32_data
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as u16).to_le_bytes())),
        DType::I8 | DType::U8 | DType::Bool => t.int32_data.iter().for_each(|v| out.push(*v as u8)),
    }
    Ok(out)
}

/// How an initializer is consumed: role and output-channel axis, following data through
/// shape-only ops (mnist-8 reshapes its 4-D FC weight before the MatMul).
fn usage(
    name: &str,
    shape: &[usize],
    consumers: &HashMap<&str, Vec<(&NodeProto, usize)>>,
) -> Option<(Role, Option<usize>)> {
    let rank = shape.len();
    let non_unit_axes = shape.iter().filter(|&&d| d != 1).count();
    let mut frontier = vec![(name.to_string(), false)];
    let mut seen = 0;
    while let Some((value, transposed)) = frontier.pop() {
        seen += 1;
        if seen > 64 {
            break;
        }
        let Some(list) = consumers.get(value.as_str()) else {
            continue;
        };
        for (node, slot) in list {
            let last = rank.checked_sub(1);
            let found = match (node.op_type.as_str(), *slot) {
                ("Conv", 1) => Some((Role::Weight, Some(0))),
                ("ConvTranspose", 1) => Some((Role::Weight, Some(1.min(rank.saturating_sub(1))))),
                ("Conv" | "ConvTranspose" | "Gemm", 2) => Some((Role::Bias, None)),
                ("MatMul", 1) => Some((Role::Weight, if transposed { Some(0) } else { last })),
                ("MatMul", 0) => Some((Role::Weight, Some(0))),
                ("Gemm", 1) => {
                    let trans_b = node
                        .attribute
                        .iter()
                        .any(|a| a.name == "transB" && a.i != 0);
                    Some((Role::Weight, if trans_b { Some(0) } else { last }))
                }
                ("Gemm", 0) => Some((Role::Weight, Some(0))),
                ("LSTM" | "GRU" | "RNN", 1 | 2) => {
                    Some((Role::Weight, Some(1.min(rank.saturating_sub(1)))))
                }
                ("LSTM" | "GRU" | "RNN", 3) => Some((Role::Bias, None)),
                ("Gather", 0) => Some((Role::Embedding, Some(0))),
                (
                    "BatchNormalization"
                    | "LayerNormalization"
                    | "InstanceNormalization"
                    | "GroupNormalization"
                    | "SimplifiedLayerNormalization",
                    s,
                ) if s > 0 => Some((Role::Norm, None)),
                ("Reshape" | "Identity" | "Squeeze" | "Unsqueeze" | "Flatten" | "Cast", 0) => {
                    node.output
                        .iter()
                        .for_each(|o| frontier.push((o.clone(), transposed)));
                    None
                }
                ("Transpose", 0) => {
                    node.output
                        .iter()
                        .for_each(|o| frontier.push((o.clone(), !transposed)));
                    None
                }
                // A broadcast addend with one non-unit axis is a bias (mnist-8's [8,1,1]).
                ("Add" | "Sub", _) if non_unit_axes <= 1 => Some((Role::Bias, None)),
                _ => None,
            };
            if found.is_some() {
                return found;
            }
        }
    }
    None
}

pub fn read(bytes: &[u8]) -> Result<TensorSet, FormatError> {
    let model = ModelProto::decode(bytes)
        .map_err(|e| FormatError::invalid(format!("not a valid ONNX model: {e}")))?;
    let Some(graph) = model.graph.as_ref() else {
        return Err(FormatError::invalid("not a valid ONNX model: no graph"));
    };
    if model.ir_version <= 0 || model.opset_import.is_empty() {
        return Err(FormatError::invalid(
            "not a valid ONNX model: missing ir_version or opset_import",
        ));
    }
    if graph.initializer.len() > super::limits::MAX_TENSORS {
        return Err(FormatError::invalid("too many initializers"));
    }
    let mut consumers: HashMap<&str, Vec<(&NodeProto, usize)>> = HashMap::new();
    for node in &graph.node {
        for (slot, input) in node.input.iter().enumerate() {
            consumers
                .entry(input.as_str())
                .or_default()
                .push((node, slot));
        }
    }
    let mut tensors = Vec::with_capacity(graph.initializer.len());
    let mut originals = Vec::with_capacity(graph.initializer.len());
    for init in &graph.initializer {
        let dtype = dtype_from(init.data_type)?;
        let mut shape = Vec::with_capacity(init.dims.len());
        for &d in &init.dims {
            let d = usize::try_from(d).map_err(|_| {
                FormatError::invalid(format!(
                    "initializer {:?} has a negative dimension",
                    init.name
                ))
            })?;
            shape.push(d);
        }
        let count = super::element_count(&shape).ok_or_else(|| {
            FormatError::invalid(format!("initializer {:?}: shape overflows", init.name))
        })?;
        let data = initializer_bytes(init, dtype, count)?;
        originals.push(Original {
            raw: !init.raw_data.is_empty(),
            fingerprint: fingerprint(&data),
        });
        let mut t = Tensor::new(init.name.clone(), dtype, shape, data)?;
        if let Some((role, axis)) = usage(&init.name, &t.shape, &consumers) {
            t.role = if dtype.is_float() { role } else { Role::Other };
            t.output_axis = axis;
        }
        tensors.push(t);
    }
    drop(consumers);
    let mut model = model;
    if let Some(g) = model.graph.as_mut() {
        g.initializer.iter_mut().for_each(clear_payload);
    }
    Ok(TensorSet {
        format: Format::Onnx,
        tensors,
        container: Container::Onnx(std::sync::Arc::new(OnnxContainer { model, originals })),
    })
}

impl OnnxContainer {
    /// The graph (initializers without payloads) as protobuf bytes, for the archive.
    pub fn graph_bytes(&self) -> Vec<u8> {
        self.model.encode_to_vec()
    }

    /// For each initializer, whether [`write`] puts these tensors back in their typed field
    /// (an untouched initializer first read from one) rather than `raw_data`.
    pub fn typed_fields(&self, tensors: &[Tensor]) -> Vec<bool> {
        tensors
            .iter()
            .zip(&self.originals)
            .map(|(t, o)| !o.raw && fingerprint(&t.data) == o.fingerprint)
            .collect()
    }

    /// Rebuilds a container from an archive's graph bytes and field table, so that
    /// [`write`] of `tensors` gives the bytes the job wrote.
    pub fn from_archive(
        graph: &[u8],
        typed_fields: &[bool],
        tensors: &[Tensor],
    ) -> Result<OnnxContainer, FormatError> {
        let model = ModelProto::decode(graph)
            .map_err(|e| FormatError::invalid(format!("archive graph is not ONNX: {e}")))?;
        let inits = model.graph.as_ref().map_or(0, |g| g.initializer.len());
        if inits != tensors.len() || typed_fields.len() != tensors.len() {
            return Err(FormatError::invalid(
                "archive graph and tensors disagree in number",
            ));
        }
        let originals = tensors
            .iter()
            .zip(typed_fields)
            .map(|(t, &typed)| Original {
                raw: !typed,
                fingerprint: fingerprint(&t.data),
            })
            .collect();
        Ok(OnnxContainer { model, originals })
    }
}

/// Writes the model with the given tensor values; tensors match initializers by position.
pub fn write(c: &OnnxContainer, tensors: &[Tensor]) -> Result<Vec<u8>, FormatError> {
    Ok(fill(c, tensors, &[])?.encode_to_vec())
}

/// The model with the given tensor values, as a protobuf to edit further. Initializers whose
/// position is `true` in `leave_out` are removed (a graph edit replaces them).
pub fn fill(
    c: &OnnxContainer,
    tensors: &[Tensor],
    leave_out: &[bool],
) -> Result<ModelProto, FormatError> {
    // Cheap: the retained graph holds no initializer payloads.
    let mut model = c.model.clone();
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| FormatError::Write("model has no graph".into()))?;
    if graph.initializer.len() != tensors.len() || c.originals.len() != tensors.len() {
        return Err(FormatError::Write(
            "tensor count differs from the graph".into(),
        ));
    }
    for (init, t) in graph.initializer.iter().zip(tensors) {
        let dtype = dtype_from(init.data_type).map_err(|e| FormatError::Write(e.to_string()))?;
        if dtype != t.dtype || init.name != t.name {
            return Err(FormatError::Write(format!(
                "initializer {:?} changed type or name",
                init.name
            )));
        }
    }
    let mut kept = Vec::with_capacity(tensors.len());
    for (i, ((mut init, t), orig)) in std::mem::take(&mut graph.initializer)
        .into_iter()
        .zip(tensors)
        .zip(&c.originals)
        .enumerate()
    {
        if leave_out.get(i).copied().unwrap_or(false) {
            continue;
        }
        let unchanged = fingerprint(&t.data) == orig.fingerprint;
        if unchanged && !orig.raw {
            set_typed(&mut init, t.dtype, &t.data);
        } else {
            init.raw_data = t.data.clone();
        }
        kept.push(init);
    }
    graph.initializer = kept;
    Ok(model)
}
