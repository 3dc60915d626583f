//! `model.mpz`, the modelpress archive: a self-describing, versioned, checksummed container
//! holding each tensor in its compressed representation plus what the original format needs
//! to be rebuilt. The byte format is documented in `docs/ARCHIVE.md`; [`read`] treats every
//! length in it as hostile.
//!
//! This is the container only: the representations are the compression forms' own
//! (`compress::archive` writes and reads them through [`Representation`]).

use super::{limits, onnx, Container, DType, Format, FormatError, Tensor, TensorSet};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};

pub const MAGIC: &[u8; 8] = b"\x89MPZ\r\n\x1a\n";
pub const VERSION: u32 = 1;
/// magic, version, flags, header length, inflated header length.
const PREAMBLE: usize = 8 + 4 + 4 + 8 + 8;
const CHECKSUM: usize = 32;
/// Largest inflated header or ONNX graph accepted.
pub const MAX_METADATA_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SectionRef {
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum ContainerEntry {
    /// The ModelProto without initializer payloads (deflated), and for each initializer
    /// whether it goes back in its typed field (`float_data`, …) rather than `raw_data`.
    Onnx {
        graph: SectionRef,
        graph_inflated_bytes: u64,
        typed_fields: Vec<bool>,
    },
    Safetensors {
        metadata: Option<BTreeMap<String, String>>,
    },
    Npy,
    Npz {
        compressed: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct TensorEntry<R> {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    repr: R,
    sections: BTreeMap<String, SectionRef>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header<R> {
    format_version: u32,
    producer: String,
    source_format: Format,
    container: ContainerEntry,
    tensors: Vec<TensorEntry<R>>,
    payload_bytes: u64,
}

/// A tensor's stored representation, as the archive's header records it.
pub trait Representation: Serialize + DeserializeOwned {
    /// Rebuilds the tensor's values; `section` fetches a named section of its bytes. None:
    /// the tensor is stored as it is, in its `data` section.
    fn decode<'a>(
        &self,
        shape: &[usize],
        section: &dyn Fn(&str) -> Result<&'a [u8], String>,
    ) -> Result<Option<Vec<f32>>, String>;
}

/// One tensor to write: its representation and its named sections, in the order they are
/// laid out.
pub struct Stored<'a, R> {
    pub repr: &'a R,
    pub sections: Vec<(&'a str, &'a [u8])>,
}

fn deflate(bytes: &[u8]) -> Result<Vec<u8>, FormatError> {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes)
        .and_then(|_| enc.finish())
        .map_err(|e| FormatError::Write(e.to_string()))
}

/// Inflates exactly `expected` bytes, never more.
fn inflate(bytes: &[u8], expected: u64, what: &str) -> Result<Vec<u8>, FormatError> {
    if expected > MAX_METADATA_BYTES {
        return Err(FormatError::invalid(format!("archive {what} too large")));
    }
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(bytes)
        .take(expected + 1)
        .read_to_end(&mut out)
        .map_err(|e| FormatError::invalid(format!("archive {what} is corrupt: {e}")))?;
    if out.len() as u64 != expected {
        return Err(FormatError::invalid(format!(
            "archive {what} has the wrong length"
        )));
    }
    Ok(out)
}

/// Writes the archive for a run: `restored` are the dense restored tensors (their names,
/// dtypes and shapes), `stored` one per tensor.
pub fn write<R: Serialize>(
    set: &TensorSet,
    restored: &[Tensor],
    stored: &[Stored<R>],
) -> Result<Vec<u8>, FormatError> {
    if restored.len() != stored.len() {
        return Err(FormatError::Write(
            "one payload per tensor is needed".into(),
        ));
    }
    let mut payload: Vec<u8> = Vec::new();
    let mut put = |bytes: &[u8]| -> SectionRef {
        let r = SectionRef {
            offset: payload.len() as u64,
            length: bytes.len() as u64,
        };
        payload.extend_from_slice(bytes);
        r
    };
    let container = match &set.container {
        Container::Onnx(c) => {
            let graph = c.graph_bytes();
            let deflated = deflate(&graph)?;
            ContainerEntry::Onnx {
                graph: put(&deflated),
                graph_inflated_bytes: graph.len() as u64,
                typed_fields: c.typed_fields(restored),
            }
        }
        Container::Safetensors { metadata } => ContainerEntry::Safetensors {
            metadata: metadata
                .as_ref()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        },
        Container::Npy => ContainerEntry::Npy,
        Container::Npz { compressed } => ContainerEntry::Npz {
            compressed: *compressed,
        },
    };
    let mut tensors = Vec::with_capacity(restored.len());
    for (t, p) in restored.iter().zip(stored) {
        let mut sections = BTreeMap::new();
        for (name, bytes) in &p.sections {
            sections.insert(name.to_string(), put(bytes));
        }
        tensors.push(TensorEntry {
            name: t.name.clone(),
            dtype: t.dtype.name().into(),
            shape: t.shape.clone(),
            repr: p.repr,
            sections,
        });
    }
    let header = Header {
        format_version: VERSION,
        producer: format!("modelpress {}", env!("CARGO_PKG_VERSION")),
        source_format: set.format,
        container,
        tensors,
        payload_bytes: payload.len() as u64,
    };
    let json = serde_json::to_vec(&header).map_err(|e| FormatError::Write(e.to_string()))?;
    let head = deflate(&json)?;
    let mut out = Vec::with_capacity(PREAMBLE + head.len() + payload.len() + CHECKSUM);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&payload);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    Ok(out)
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Parses an archive and rebuilds the dense model: the tensors equal the job's `restored`
/// artifact bit for bit, and [`super::write_bytes`] of the result writes the same file.
pub fn read<R: Representation>(bytes: &[u8]) -> Result<TensorSet, FormatError> {
    if bytes.len() < PREAMBLE + CHECKSUM || &bytes[..8] != MAGIC {
        return Err(FormatError::invalid(
            "not a modelpress archive (bad magic or too short)",
        ));
    }
    let version = le_u32(&bytes[8..12]);
    if version != VERSION {
        return Err(FormatError::Unsupported(format!(
            "archive format version {version} (this build reads {VERSION})"
        )));
    }
    let body = &bytes[..bytes.len() - CHECKSUM];
    if Sha256::digest(body)[..] != bytes[bytes.len() - CHECKSUM..] {
        return Err(FormatError::invalid(
            "archive checksum mismatch: the file is corrupt or truncated",
        ));
    }
    let head_len = le_u64(&bytes[16..24]);
    let json_len = le_u64(&bytes[24..32]);
    let rest = (body.len() - PREAMBLE) as u64;
    if head_len > rest {
        return Err(FormatError::invalid("archive header runs past the end"));
    }
    let head_end = PREAMBLE + head_len as usize;
    let json = inflate(&bytes[PREAMBLE..head_end], json_len, "header")?;
    let header: Header<R> = serde_json::from_slice(&json)
        .map_err(|e| FormatError::invalid(format!("archive header: {e}")))?;
    let payload = &body[head_end..];
    if header.format_version != VERSION || header.payload_bytes != payload.len() as u64 {
        return Err(FormatError::invalid(
            "archive header disagrees with the file",
        ));
    }
    if header.tensors.len() > limits::MAX_TENSORS {
        return Err(FormatError::invalid("too many tensors"));
    }
    let slice = |r: &SectionRef| -> Option<&[u8]> {
        let end = r.offset.checked_add(r.length)?;
        if end > payload.len() as u64 {
            return None;
        }
        payload.get(r.offset as usize..end as usize)
    };
    let mut tensors = Vec::with_capacity(header.tensors.len());
    for e in &header.tensors {
        let dtype = DType::parse(&e.dtype)
            .ok_or_else(|| FormatError::invalid(format!("tensor {:?}: unknown dtype", e.name)))?;
        if e.shape.len() > limits::MAX_RANK {
            return Err(FormatError::invalid(format!(
                "tensor {:?}: too many dimensions",
                e.name
            )));
        }
        let section = |name: &str| -> Result<&[u8], String> {
            e.sections
                .get(name)
                .and_then(slice)
                .ok_or_else(|| format!("section {name} missing or out of bounds"))
        };
        let bad = |m: String| FormatError::invalid(format!("tensor {:?}: {m}", e.name));
        let data = match e.repr.decode(&e.shape, &section).map_err(bad)? {
            None => section("data").map_err(bad)?.to_vec(),
            Some(values) => {
                if !dtype.is_float() {
                    return Err(bad(
                        "a compressed representation of a non-float tensor".into()
                    ));
                }
                super::f32_to_bytes(&values, dtype)
            }
        };
        let mut t = Tensor::new(e.name.clone(), dtype, e.shape.clone(), data)?;
        t.output_axis = None;
        tensors.push(t);
    }
    let container = match header.container {
        ContainerEntry::Onnx {
            graph,
            graph_inflated_bytes,
            typed_fields,
        } => {
            let raw =
                slice(&graph).ok_or_else(|| FormatError::invalid("graph section out of bounds"))?;
            let graph = inflate(raw, graph_inflated_bytes, "ONNX graph")?;
            if typed_fields.len() != tensors.len() {
                return Err(FormatError::invalid(
                    "archive field table disagrees with the tensors",
                ));
            }
            Container::Onnx(std::sync::Arc::new(onnx::OnnxContainer::from_archive(
                &graph,
                &typed_fields,
                &tensors,
            )?))
        }
        ContainerEntry::Safetensors { metadata } => Container::Safetensors {
            metadata: metadata.map(|m| m.into_iter().collect()),
        },
        ContainerEntry::Npy => {
            if tensors.len() != 1 {
                return Err(FormatError::invalid(
                    "an .npy archive holds exactly one tensor",
                ));
            }
            Container::Npy
        }
        ContainerEntry::Npz { compressed } => Container::Npz { compressed },
    };
    let format = match &container {
        Container::Onnx(_) => Format::Onnx,
        Container::Safetensors { .. } => Format::Safetensors,
        Container::Npy => Format::Npy,
        Container::Npz { .. } => Format::Npz,
    };
    if format != header.source_format {
        return Err(FormatError::invalid(
            "archive source format disagrees with its container",
        ));
    }
    Ok(TensorSet {
        format,
        tensors,
        container,
    })
}
