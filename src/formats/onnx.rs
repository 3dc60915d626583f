//! ONNX through the protobuf types that `tract-onnx` ships (no protoc needed). The whole
//! ModelProto is kept, so a later issue can edit the graph itself; for now only initializer
//! data changes, and an initializer whose values did not change is written back untouched.

use super::{Container, DType, Format, FormatError, Role, Tensor, TensorSet};
use prost::Message;
use std::collections::HashMap;
use tract_onnx::pb::{
    tensor_proto::DataType, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto,
};

/// The graph with its initializers' payloads taken out (the tensors hold them), so a model
/// is not kept in memory twice, plus a fingerprint of each payload as read.
#[derive(Debug, Clone)]
pub struct OnnxContainer {
    pub model: ModelProto,
    /// One per tensor: the initializers first, then the `Constant` nodes.
    originals: Vec<Original>,
    /// Where each tensor after the initializers sits: a `Constant` node's `value`, in the
    /// main graph or in the body of an `If`/`Loop`/`Scan` (at any depth).
    pub constants: Vec<ConstantSlot>,
}

/// A `Constant` node holding a weight: the hops (node, attribute, graph: 0 for `g`, 1 + j
/// for `graphs[j]`) from the main graph down to the graph that holds it, and its index there.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstantSlot {
    pub hops: Vec<(usize, usize, usize)>,
    pub node: usize,
    /// The node's output: the name its consumers read.
    pub output: String,
}

/// Subgraphs nested deeper than this are refused (a hostile file could nest thousands).
const MAX_SUBGRAPH_DEPTH: usize = 32;

fn sub_graph(a: &AttributeProto, which: usize) -> Option<&GraphProto> {
    if which == 0 {
        a.g.as_ref()
    } else {
        a.graphs.get(which - 1)
    }
}

fn sub_graph_mut(a: &mut AttributeProto, which: usize) -> Option<&mut GraphProto> {
    if which == 0 {
        a.g.as_mut()
    } else {
        a.graphs.get_mut(which - 1)
    }
}

/// The graph at the end of `hops`, from the main graph.
pub fn graph_at<'a>(g: &'a GraphProto, hops: &[(usize, usize, usize)]) -> Option<&'a GraphProto> {
    hops.iter().try_fold(g, |g, &(n, a, w)| {
        sub_graph(g.node.get(n)?.attribute.get(a)?, w)
    })
}

pub fn graph_at_mut<'a>(
    g: &'a mut GraphProto,
    hops: &[(usize, usize, usize)],
) -> Option<&'a mut GraphProto> {
    hops.iter().try_fold(g, |g, &(n, a, w)| {
        sub_graph_mut(g.node.get_mut(n)?.attribute.get_mut(a)?, w)
    })
}

fn is_constant(n: &NodeProto) -> bool {
    n.op_type == "Constant" && (n.domain.is_empty() || n.domain == "ai.onnx")
}

/// The `value` tensor of a `Constant` node, when it has one of a supported type.
fn constant_value(n: &NodeProto) -> Option<&TensorProto> {
    if !is_constant(n) {
        return None;
    }
    let t = n.attribute.iter().find(|a| a.name == "value")?.t.as_ref()?;
    dtype_from(t.data_type).ok().map(|_| t)
}

fn constant_value_mut(n: &mut NodeProto) -> Option<&mut TensorProto> {
    if !is_constant(n) {
        return None;
    }
    n.attribute
        .iter_mut()
        .find(|a| a.name == "value")?
        .t
        .as_mut()
}

/// Every `Constant` node with a tensor `value`, depth first in node order. A pure function
/// of the graph with payloads cleared, so an archive finds the same slots again.
pub fn constant_slots(g: &GraphProto) -> Result<Vec<ConstantSlot>, FormatError> {
    fn walk(
        g: &GraphProto,
        hops: &mut Vec<(usize, usize, usize)>,
        out: &mut Vec<ConstantSlot>,
    ) -> Result<(), FormatError> {
        if hops.len() > MAX_SUBGRAPH_DEPTH {
            return Err(FormatError::invalid(format!(
                "subgraphs nested deeper than {MAX_SUBGRAPH_DEPTH}"
            )));
        }
        for (ni, n) in g.node.iter().enumerate() {
            if constant_value(n).is_some() {
                out.push(ConstantSlot {
                    hops: hops.clone(),
                    node: ni,
                    output: n.output.first().cloned().unwrap_or_default(),
                });
            }
            for (ai, a) in n.attribute.iter().enumerate() {
                let subs = a.g.iter().map(|g| (0, g));
                let more = a.graphs.iter().enumerate().map(|(j, g)| (j + 1, g));
                for (w, sub) in subs.chain(more) {
                    hops.push((ni, ai, w));
                    walk(sub, hops, out)?;
                    hops.pop();
                }
            }
            if out.len() > super::limits::MAX_TENSORS {
                return Err(FormatError::invalid("too many Constant nodes"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(g, &mut Vec::new(), &mut out)?;
    Ok(out)
}

/// Every node of the graph and of its subgraphs.
fn all_nodes<'a>(g: &'a GraphProto, out: &mut Vec<&'a NodeProto>) {
    for n in &g.node {
        out.push(n);
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                all_nodes(sub, out);
            }
        }
    }
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
    if is_external(t) {
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

/// The graph's inputs that no initializer feeds, with their declared types and shapes.
pub fn graph_inputs(model: &ModelProto) -> Vec<super::GraphInput> {
    use tract_onnx::pb::{tensor_shape_proto::dimension::Value as Dim, type_proto::Value};
    let Some(g) = model.graph.as_ref() else {
        return Vec::new();
    };
    g.input
        .iter()
        .filter(|i| !g.initializer.iter().any(|t| t.name == i.name))
        .map(|i| {
            let tensor = match i.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(Value::TensorType(t)) => Some(t),
                _ => None,
            };
            super::GraphInput {
                name: i.name.clone(),
                dtype: tensor
                    .and_then(|t| dtype_from(t.elem_type).ok())
                    .map(|d| d.name().to_string()),
                shape: tensor.and_then(|t| t.shape.as_ref()).map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match d.value {
                            Some(Dim::DimValue(v)) if v >= 0 => Some(v as u64),
                            _ => None,
                        })
                        .collect()
                }),
            }
        })
        .collect()
}

/// Whether a tensor's values live in a file beside the model (ONNX external data).
fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(1) || !t.external_data.is_empty()
}

/// Refuses a tensor that points at external data wherever a tensor can sit: initializers,
/// sparse initializers, node attributes (`Constant`'s `value` and `sparse_value` included),
/// every subgraph, the training graphs and the bodies of the model's local functions. A reader that followed such a reference would open
/// a path the uploader chose (`/etc/passwd`); one that kept it would hand it to the next
/// consumer.
fn refuse_external_data(model: &ModelProto) -> Result<(), FormatError> {
    fn refuse(what: &str, name: &str) -> FormatError {
        FormatError::Unsupported(format!(
            "{what} {:?} uses ONNX external data; upload a self-contained model",
            name.chars().take(100).collect::<String>()
        ))
    }
    fn sparse(what: &str, s: &tract_onnx::pb::SparseTensorProto) -> Result<(), FormatError> {
        for t in s.values.iter().chain(s.indices.iter()) {
            if is_external(t) {
                return Err(refuse(what, &t.name));
            }
        }
        Ok(())
    }
    fn graph(g: &GraphProto) -> Result<(), FormatError> {
        for t in &g.initializer {
            if is_external(t) {
                return Err(refuse("initializer", &t.name));
            }
        }
        for s in &g.sparse_initializer {
            sparse("sparse initializer", s)?;
        }
        nodes(&g.node)
    }
    fn nodes(nodes: &[tract_onnx::pb::NodeProto]) -> Result<(), FormatError> {
        for n in nodes {
            for a in &n.attribute {
                for t in a.t.iter().chain(a.tensors.iter()) {
                    if is_external(t) {
                        return Err(refuse(&format!("{} attribute", n.op_type), &t.name));
                    }
                }
                for s in a.sparse_tensor.iter().chain(a.sparse_tensors.iter()) {
                    sparse(&format!("{} sparse attribute", n.op_type), s)?;
                }
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    graph(sub)?;
                }
            }
        }
        Ok(())
    }
    for g in model.graph.iter().chain(
        model
            .training_info
            .iter()
            .flat_map(|t| t.initialization.iter().chain(t.algorithm.iter())),
    ) {
        graph(g)?;
    }
    // The model's local functions: their bodies' Constants are tensors too.
    for f in &model.functions {
        nodes(&f.node)?;
    }
    Ok(())
}

/// Every output of the graph (and of each subgraph) is produced by something: a node, a
/// graph input or an initializer (in a subgraph, also anything of the graphs around it). A
/// runtime cannot run a model that names an output nothing writes, and tract asserts it
/// (it panicked on such a model, one byte away from mnist-8).
fn check_outputs_are_produced(g: &GraphProto) -> Result<(), FormatError> {
    fn walk<'a>(
        g: &'a GraphProto,
        outer: &mut Vec<std::collections::HashSet<&'a str>>,
    ) -> Result<(), FormatError> {
        let mut here: std::collections::HashSet<&str> = g
            .node
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str))
            .chain(g.input.iter().map(|v| v.name.as_str()))
            .chain(g.initializer.iter().map(|t| t.name.as_str()))
            .collect();
        here.remove("");
        for o in &g.output {
            if !here.contains(o.name.as_str()) && !outer.iter().any(|s| s.contains(o.name.as_str()))
            {
                return Err(FormatError::invalid(format!(
                    "not a valid ONNX model: graph output {:?} is not produced by any node, input or initializer",
                    crate::util::clip(&o.name)
                )));
            }
        }
        outer.push(here);
        for n in &g.node {
            for a in &n.attribute {
                for sub in a.g.iter().chain(&a.graphs) {
                    walk(sub, outer)?;
                }
            }
        }
        outer.pop();
        Ok(())
    }
    walk(g, &mut Vec::new())
}

pub fn read(bytes: &[u8]) -> Result<TensorSet, FormatError> {
    let model = ModelProto::decode(bytes)
        .map_err(|e| FormatError::invalid(format!("not a valid ONNX model: {e}")))?;
    refuse_external_data(&model)?;
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
    check_outputs_are_produced(graph)?;
    // Consumers across the main graph and every subgraph: a branch of an `If` may read an
    // initializer of the main graph (an outer-scope reference) or a Constant of its own.
    let mut nodes = Vec::new();
    all_nodes(graph, &mut nodes);
    let mut consumers: HashMap<&str, Vec<(&NodeProto, usize)>> = HashMap::new();
    for node in nodes {
        for (slot, input) in node.input.iter().enumerate() {
            consumers
                .entry(input.as_str())
                .or_default()
                .push((node, slot));
        }
    }
    let constants = constant_slots(graph)?;
    if graph.initializer.len() + constants.len() > super::limits::MAX_TENSORS {
        return Err(FormatError::invalid("too many tensors"));
    }
    let mut tensors = Vec::with_capacity(graph.initializer.len() + constants.len());
    let mut originals = Vec::with_capacity(tensors.capacity());
    let mut names: std::collections::HashSet<String> = std::collections::HashSet::new();
    let found = graph
        .initializer
        .iter()
        .map(|init| (init, init.name.clone(), "initializer"))
        .chain(constants.iter().filter_map(|slot| {
            let node = graph_at(graph, &slot.hops)?.node.get(slot.node)?;
            Some((constant_value(node)?, slot.output.clone(), "Constant"))
        }));
    for (init, value_name, what) in found {
        let dtype = dtype_from(init.data_type)?;
        let mut shape = Vec::with_capacity(init.dims.len());
        for &d in &init.dims {
            let d = usize::try_from(d).map_err(|_| {
                FormatError::invalid(format!("{what} {value_name:?} has a negative dimension"))
            })?;
            shape.push(d);
        }
        let count = super::element_count(&shape).ok_or_else(|| {
            FormatError::invalid(format!("{what} {value_name:?}: shape overflows"))
        })?;
        let data = initializer_bytes(init, dtype, count)?;
        originals.push(Original {
            raw: !init.raw_data.is_empty(),
            fingerprint: fingerprint(&data),
        });
        // Sibling branches may reuse a value name: the tensor's name stays unique.
        let mut name = value_name.clone();
        let mut k = 1;
        while names.contains(&name) {
            name = format!("{value_name}#{k}");
            k += 1;
        }
        names.insert(name.clone());
        let mut t = Tensor::new(name, dtype, shape, data)?;
        if let Some((role, axis)) = usage(&value_name, &t.shape, &consumers) {
            t.role = if dtype.is_float() { role } else { Role::Other };
            t.output_axis = axis;
        }
        tensors.push(t);
    }
    if constants.len() + graph.initializer.len() != tensors.len() {
        return Err(FormatError::invalid("a Constant node could not be read"));
    }
    drop(consumers);
    // A graph assigns each value once: two initializers (or an initializer and a Constant)
    // of the main graph with one name would leave a runtime to pick one. Sibling branches of
    // an `If` may reuse a name; they are separate scopes.
    super::limits::unique_names(
        graph.initializer.iter().map(|i| i.name.as_str()).chain(
            constants
                .iter()
                .filter(|c| c.hops.is_empty())
                .map(|c| c.output.as_str()),
        ),
        "initializer or Constant output",
    )?;
    let mut model = model;
    if let Some(g) = model.graph.as_mut() {
        g.initializer.iter_mut().for_each(clear_payload);
        for slot in &constants {
            if let Some(t) = graph_at_mut(g, &slot.hops)
                .and_then(|sub| sub.node.get_mut(slot.node))
                .and_then(constant_value_mut)
            {
                clear_payload(t);
            }
        }
    }
    Ok(TensorSet {
        format: Format::Onnx,
        tensors,
        container: Container::Onnx(std::sync::Arc::new(OnnxContainer {
            model,
            originals,
            constants,
        })),
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
        let slots = match model.graph.as_ref() {
            Some(g) => constant_slots(g)?,
            None => Vec::new(),
        };
        // Archives written before Constant nodes were read keep their payloads in the graph
        // and hold the initializers only.
        let constants = if tensors.len() == inits {
            Vec::new()
        } else {
            slots
        };
        if inits + constants.len() != tensors.len() || typed_fields.len() != tensors.len() {
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
        Ok(OnnxContainer {
            model,
            originals,
            constants,
        })
    }
}

/// The container of a model whose initializers took new shapes (a student narrowed from
/// this one): the initializers' dims follow `tensors`, and the graph's recorded shapes of
/// intermediate values are dropped (runtimes infer them again). Constant-node tensors must
/// keep their shapes.
pub fn resized(c: &OnnxContainer, tensors: &[Tensor]) -> Result<OnnxContainer, FormatError> {
    let mut out = c.clone();
    let graph = out
        .model
        .graph
        .as_mut()
        .ok_or_else(|| FormatError::Write("model has no graph".into()))?;
    if graph.initializer.len() + c.constants.len() != tensors.len() {
        return Err(FormatError::Write(
            "tensor count differs from the graph".into(),
        ));
    }
    let inits = graph.initializer.len();
    for (k, t) in tensors.iter().enumerate().skip(inits) {
        if c_shape(c, k).as_ref() != Some(&t.shape) {
            return Err(FormatError::Write(format!(
                "Constant {:?} changed shape",
                t.name
            )));
        }
    }
    for (init, t) in graph.initializer.iter_mut().zip(tensors) {
        init.dims = t.shape.iter().map(|&d| d as i64).collect();
    }
    graph.value_info.clear();
    for (o, t) in out.originals.iter_mut().zip(tensors) {
        // Written as raw data from now on.
        o.raw = true;
        o.fingerprint = fingerprint(&t.data);
    }
    Ok(out)
}

/// The dims of the `k`th tensor's `Constant` node (after the initializers), as sizes.
fn c_shape(c: &OnnxContainer, k: usize) -> Option<Vec<usize>> {
    let g = c.model.graph.as_ref()?;
    let slot = c.constants.get(k.checked_sub(g.initializer.len())?)?;
    let graph = graph_at(g, &slot.hops)?;
    let node = graph.node.get(slot.node)?;
    let t = node
        .attribute
        .iter()
        .find(|a| a.name == "value")
        .and_then(|a| a.t.as_ref())?;
    Some(t.dims.iter().map(|&d| d as usize).collect())
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
    let inits = graph.initializer.len();
    if inits + c.constants.len() != tensors.len() || c.originals.len() != tensors.len() {
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
    for (i, slot) in c.constants.iter().enumerate() {
        let k = inits + i;
        if leave_out.get(k).copied().unwrap_or(false) {
            continue;
        }
        let (t, orig) = (&tensors[k], &c.originals[k]);
        let value = graph_at_mut(graph, &slot.hops)
            .and_then(|g| g.node.get_mut(slot.node))
            .and_then(constant_value_mut)
            .ok_or_else(|| FormatError::Write(format!("Constant {:?} not found", slot.output)))?;
        if fingerprint(&t.data) == orig.fingerprint && !orig.raw {
            set_typed(value, t.dtype, &t.data);
        } else {
            value.raw_data = t.data.clone();
        }
    }
    Ok(model)
}
